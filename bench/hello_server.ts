/**
 * The long-run bench's baseline (`bench/long_run.ts`): a hello-world srvx server that answers
 * every request with the broker's 401 JSON, without reading the body, on whichever runtime
 * runs it (Node 22, Deno or Bun). It listens on 127.0.0.1, port 0, and logs the same
 * `{"msg":"listening","url":…}` line on stderr as `src/main.ts`, so the bench starts both the
 * same way. One SIGTERM (or SIGINT) closes it and exits 0.
 *
 * ```sh
 * node_modules/.bin/node bench/hello_server.ts
 * node_modules/.bin/deno run -A bench/hello_server.ts
 * node_modules/.bin/bun bench/hello_server.ts
 * ```
 *
 * @module
 */

import process from "node:process";
import { serve } from "srvx";

// Built once: the server's own cost per request should be srvx's, not this script's.
const BODY = JSON.stringify({
  error: { code: "unauthorized", message: "Wrong X-Internal-Secret header" },
});

const server = serve({
  hostname: "127.0.0.1",
  port: 0,
  silent: true,
  gracefulShutdown: false,
  fetch: () => new Response(BODY, { status: 401, headers: { "content-type": "application/json" } }),
});
await server.ready();
const url = (server.url ?? "").replace(/\/$/, "");
process.stderr.write(`${JSON.stringify({ level: "info", msg: "listening", url })}\n`);

let stopping = false;
const stop = async () => {
  if (stopping) return;
  stopping = true;
  // The bench's client has gone by now; forcing also cuts any connection it left half-open.
  await server.close(true).catch(() => {});
  process.exit(0);
};
process.on("SIGTERM", stop);
process.on("SIGINT", stop);

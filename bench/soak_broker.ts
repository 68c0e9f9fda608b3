/**
 * The process the soak bench measures (`bench/soak.ts` runs it on each runtime): the real
 * broker handler (`createTurnsHandler` over a `Pool`) served by srvx on 127.0.0.1, port 0,
 * every workspace dialing the fake app-server at `--url`. Besides the broker's routes it
 * answers `GET /soak/stats` with what the soak checks, after a full garbage collection
 * where the runtime offers one:
 *
 * - `rssMb`, `heapUsedMb`: `process.memoryUsage()`;
 * - `pool`: the pool's entries, releases and socket closes under way, and whether its
 *   reaper timer runs (`src/_internals.ts`);
 * - `conns`: summed over the open connections: requests awaiting an answer, tracked call
 *   deadlines, calls and turns in flight, held thread lanes, attached threads (an LRU,
 *   bounded by `maxAttachedThreads`, not expected back to zero);
 * - `fds`: open file descriptors (`/proc/self/fd`), on every runtime;
 * - `resources`: `process.getActiveResourcesInfo()` by kind (Node lists sockets, pipes and
 *   timers; Deno lists timers only; Bun returns an empty list).
 *
 * It logs `{"msg":"listening","url":…}` on stderr and stops on SIGTERM.
 *
 * ```sh
 * node_modules/.bin/node --expose-gc bench/soak_broker.ts --url ws://127.0.0.1:4500
 * ```
 *
 * @module
 */

import { readdirSync } from "node:fs";
import process from "node:process";
import { collectGarbage } from "./_gc.ts";
import { parseArgs } from "node:util";
import { serve } from "srvx";
import type { Conn } from "../src/conn.ts";
import { createTurnsHandler } from "../src/handler.ts";
import { Pool, type PoolEvent } from "../src/pool.ts";
import { type InternalSizes, internalSizes } from "../src/_internals.ts";
import { SOAK_SECRET, type SoakStats } from "./_soak_shared.ts";

const { values } = parseArgs({ options: { url: { type: "string" } } });
const url = values.url;
if (url === undefined) throw new TypeError("--url is required");

const pool = new Pool(() => Promise.resolve(url));
const conns = new Set<Conn>();
pool.addEventListener("dial", (event) => {
  const conn = (event as PoolEvent).conn;
  if (!conn) return;
  conns.add(conn);
  conn.addEventListener("close", () => conns.delete(conn), { once: true });
});
const handler = createTurnsHandler(pool, { secret: SOAK_SECRET });

function stats(): SoakStats {
  const gc = collectGarbage();
  const sum: InternalSizes = {};
  for (const conn of conns) {
    for (const [key, value] of Object.entries(internalSizes(conn) ?? {})) {
      sum[key] = (sum[key] ?? 0) + value;
    }
  }
  const resources: Record<string, number> = {};
  for (const kind of process.getActiveResourcesInfo?.() ?? []) {
    resources[kind] = (resources[kind] ?? 0) + 1;
  }
  const memory = process.memoryUsage();
  let fds = NaN;
  try {
    fds = readdirSync("/proc/self/fd").length;
  } catch {
    // No /proc.
  }
  return {
    rssMb: memory.rss / 2 ** 20,
    heapUsedMb: memory.heapUsed / 2 ** 20,
    pool: internalSizes(pool) ?? {},
    conns: sum,
    connCount: conns.size,
    fds,
    resources,
    gc,
  };
}

const server = serve({
  hostname: "127.0.0.1",
  port: 0,
  silent: true,
  gracefulShutdown: false,
  fetch: (request) => {
    if (request.method === "GET" && new URL(request.url).pathname === "/soak/stats") {
      return Response.json(stats());
    }
    return handler(request);
  },
});
await server.ready();
process.stderr.write(
  `${JSON.stringify({ msg: "listening", url: (server.url ?? "").replace(/\/$/, "") })}\n`,
);
const stop = async () => {
  await pool.close().catch(() => {});
  await server.close(true).catch(() => {});
  process.exit(0);
};
process.on("SIGTERM", stop);
process.on("SIGINT", stop);

/**
 * A stand-in for `codex app-server` that answers every turn at once, for the P4 throughput
 * bench (`bench/p4.ts`). The broker runs it through `--codex` (a shell wrapper execs it with
 * Node 22), the way it runs codex: `app-server --listen ws://127.0.0.1:0 --ws-auth
 * capability-token --ws-token-sha256 HEX` (or `--ws-token-file FILE`). It then
 *
 * - listens on a loopback port and prints `listening on: ws://127.0.0.1:PORT` on stderr, as
 *   codex does;
 * - answers `GET /readyz` with 200, and refuses upgrades without the token;
 * - answers `initialize`, `thread/start`, `thread/resume` and `turn/start`, and completes
 *   each turn at once with codex's sequence (`turn/started`, two `item/completed`,
 *   `turn/completed`), built with the tests' fake's shapes;
 * - except a turn whose first input is the text `delay:MS` (the soak bench's slow turns):
 *   that one completes after MS milliseconds, or at once as `interrupted` on
 *   `turn/interrupt` or when the connection closes.
 *
 * Without `--listen` (the broker's credentials check speaks stdio) it exits at once. The
 * minimal client of the bench dials the same program, started by the bench with a token
 * file of its own. No schema checks and no message log: the fake must cost little, since
 * its CPU shares the machine with what is measured.
 *
 * @module
 */

import { createHash } from "node:crypto";
import { readFileSync } from "node:fs";
import { createServer } from "node:http";
import process from "node:process";
import { WebSocketServer } from "ws";
import {
  agentMessage,
  itemCompleted,
  threadResult,
  turnObject,
} from "../tests/_fake_app_server.ts";

const args = process.argv.slice(2);
const flag = (name: string) => {
  const index = args.indexOf(name);
  return index === -1 ? undefined : args[index + 1];
};
if (flag("--listen") === undefined) process.exit(0);
// The broker gives the token's SHA-256 (as codex takes it); the bench's minimal client a file.
const tokenFile = flag("--ws-token-file");
const tokenSha256 = flag("--ws-token-sha256");
const token = tokenFile === undefined ? undefined : readFileSync(tokenFile, "utf8").trim();
function authorized(header: string | undefined): boolean {
  if (tokenSha256 !== undefined) {
    const bearer = header?.startsWith("Bearer ") ? header.slice(7) : "";
    return createHash("sha256").update(bearer).digest("hex") === tokenSha256;
  }
  return token === undefined || header === `Bearer ${token}`;
}

const INIT_RESULT = {
  userAgent: "instant/0.0.0",
  codexHome: "/tmp/instant",
  platformFamily: "unix",
  platformOs: "linux",
};

/** The delay of a turn whose first input text is `delay:MS`; 0 for any other. */
function delayOf(input: unknown): number {
  const first = Array.isArray(input) ? input[0] : undefined;
  const text = typeof first?.text === "string" ? first.text : "";
  const match = /^delay:(\d+)$/.exec(text);
  return match ? Number(match[1]) : 0;
}

const http = createServer((request, response) => {
  response.writeHead(request.url === "/readyz" ? 200 : 404).end();
});
const wss = new WebSocketServer({ noServer: true });
http.on("upgrade", (request, socket, head) => {
  if (!authorized(request.headers.authorization)) {
    socket.end("HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    return;
  }
  wss.handleUpgrade(request, socket, head, (ws) => {
    let threads = 0;
    let turns = 0;
    const delayed = new Map<string, { turnId: string; finish: () => void }>();
    ws.on("close", () => {
      for (const running of [...delayed.values()]) running.finish();
    });
    const send = (message: unknown) => ws.send(JSON.stringify(message));
    ws.on("message", (data, isBinary) => {
      if (isBinary) return;
      // deno-lint-ignore no-explicit-any -- arbitrary JSON-RPC from the client
      let m: any;
      try {
        m = JSON.parse(String(data));
      } catch {
        return;
      }
      switch (m.method) {
        case "initialize":
          send({ id: m.id, result: INIT_RESULT });
          return;
        case "thread/start":
          send({ id: m.id, result: threadResult(`thr-${++threads}`) });
          return;
        case "thread/resume":
          send({ id: m.id, result: threadResult(m.params.threadId) });
          return;
        case "turn/interrupt": {
          send({ id: m.id, result: {} });
          const running = delayed.get(m.params.threadId);
          if (running !== undefined && running.turnId === m.params.turnId) running.finish();
          return;
        }
        case "turn/start": {
          const threadId = m.params.threadId as string;
          const turnId = `turn-${++turns}`;
          const item = agentMessage(`msg-${turnId}`, `echo ${turnId}`);
          send({ id: m.id, result: { turn: turnObject(turnId, "inProgress") } });
          send({
            method: "turn/started",
            params: { threadId, turn: turnObject(turnId, "inProgress") },
          });
          send({
            method: "item/completed",
            params: itemCompleted(threadId, turnId, {
              type: "userMessage",
              id: `user-${turnId}`,
              content: m.params.input,
            }),
          });
          const complete = (status: string) => {
            if (status === "completed") {
              send({ method: "item/completed", params: itemCompleted(threadId, turnId, item) });
            }
            send({
              method: "turn/completed",
              params: {
                threadId,
                turn: turnObject(turnId, status, status === "completed" ? [item] : []),
              },
            });
          };
          const delayMs = delayOf(m.params.input);
          if (delayMs === 0) {
            complete("completed");
            return;
          }
          // A slow turn: completes after the delay, or as interrupted on turn/interrupt.
          const timer = setTimeout(() => {
            delayed.delete(threadId);
            complete("completed");
          }, delayMs);
          delayed.set(threadId, {
            turnId,
            finish: () => {
              clearTimeout(timer);
              delayed.delete(threadId);
              complete("interrupted");
            },
          });
          return;
        }
        default:
          if (m.id !== undefined && m.method !== undefined) {
            send({ id: m.id, error: { code: -32601, message: `Unknown method ${m.method}` } });
          }
      }
    });
  });
});
http.listen(0, "127.0.0.1", () => {
  const address = http.address();
  const port = typeof address === "object" && address ? address.port : 0;
  process.stderr.write(`listening on: ws://127.0.0.1:${port}\n`);
});
const stop = () => process.exit(0);
process.on("SIGTERM", stop);
process.on("SIGINT", stop);

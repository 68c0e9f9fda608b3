/**
 * The P5 bench's fake app-servers (`bench/p5.ts` runs it with Node 22): `--ports` loopback
 * listeners (several, so 10,000 connections and their TIME_WAIT ports spread over more
 * than one address pair) that accept any number of WebSocket connections, answer
 * `initialize` and refuse every other request with -32601. The connections then stay idle.
 * It prints `{"urls":[…]}` as its first stdout line and exits when its stdin closes.
 *
 * @module
 */

import { createServer } from "node:http";
import process from "node:process";
import { parseArgs } from "node:util";
import { WebSocketServer } from "ws";

const { values } = parseArgs({ options: { ports: { type: "string", default: "8" } } });
const INIT_RESULT = JSON.stringify({
  userAgent: "idle/0.0.0",
  codexHome: "/tmp/idle",
  platformFamily: "unix",
  platformOs: "linux",
});

const urls: string[] = [];
const servers = await Promise.all(
  Array.from({ length: Number(values.ports) }, async () => {
    const http = createServer((_request, response) => response.writeHead(426).end());
    const wss = new WebSocketServer({ server: http });
    wss.on("connection", (ws) => {
      ws.on("message", (data) => {
        let message: { id?: unknown; method?: unknown };
        try {
          message = JSON.parse(String(data));
        } catch {
          return;
        }
        if (message.id === undefined || typeof message.method !== "string") return;
        const id = JSON.stringify(message.id);
        ws.send(
          message.method === "initialize"
            ? `{"id":${id},"result":${INIT_RESULT}}`
            : `{"id":${id},"error":{"code":-32601,"message":"Unknown method"}}`,
        );
      });
    });
    await new Promise<void>((resolve) => http.listen(0, "127.0.0.1", resolve));
    const address = http.address();
    urls.push(`ws://127.0.0.1:${typeof address === "object" && address ? address.port : 0}`);
    return { http, wss };
  }),
);
process.stdout.write(`${JSON.stringify({ urls })}\n`);
process.stdin.resume();
process.stdin.on("end", () => {
  for (const { http, wss } of servers) {
    for (const ws of wss.clients) ws.terminate();
    http.closeAllConnections();
    http.close();
  }
  process.exit(0);
});

import { test } from "./_test.ts";
import assert from "node:assert/strict";
import { createServer as createHttpServer, type IncomingMessage } from "node:http";
import { createServer as createTcpServer, type Socket } from "node:net";
import { FORWARDED_HEADER, forwardTurn } from "../src/_forward.ts";

const body = new TextEncoder().encode('{"params":{"input":[]}}');

function request(): Request {
  return new Request("http://broker-b/api/turns", {
    method: "POST",
    headers: { "content-type": "application/json", "x-internal-secret": "s", accept: "*/*" },
    body,
  });
}

test("forwardTurn() counts an owner that accepts connections but never answers as unreachable within the probe deadline", async () => {
  // A machine whose broker hangs (or a blackholed address) would hold a forwarded turn until
  // the OS gives up; the probe's deadline tells the forwarder to fall back on the lease.
  const sockets = new Set<Socket>();
  const server = createTcpServer((socket) => {
    sockets.add(socket);
    socket.on("error", () => {});
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address() as { port: number };
  try {
    const started = Date.now();
    const result = await forwardTurn(`http://127.0.0.1:${port}`, request(), {
      workspaceId: "ws-1",
      body,
    }, { from: "b", signal: new AbortController().signal, probeTimeoutMs: 150 });
    assert.equal(result.kind, "unreachable");
    assert.ok(Date.now() - started < 2_000, `took ${Date.now() - started} ms`);
  } finally {
    for (const socket of sockets) socket.destroy();
    await new Promise<void>((resolve) => server.close(() => resolve()));
  }
});

test("forwardTurn() sends the turn to the owner's path route marked as forwarded and relays its answer", async () => {
  const seen: IncomingMessage[] = [];
  const server = createHttpServer((req, res) => {
    seen.push(req);
    req.resume();
    req.once("end", () => {
      if (req.url === "/healthz") {
        res.writeHead(200).end("{}");
      } else if (req.url?.endsWith("/ws-2/turns")) {
        res.writeHead(421).end("{}");
      } else {
        res.writeHead(200, { "content-type": "application/json", "x-broker-id": "owner" });
        res.end('{"threadId":"t1"}');
      }
    });
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address() as { port: number };
  try {
    const options = { from: "broker-b", signal: new AbortController().signal };
    const result = await forwardTurn(`http://127.0.0.1:${port}/`, request(), {
      workspaceId: "ws-1",
      body,
    }, options);
    assert.equal(result.kind, "answered");
    if (result.kind !== "answered") return;
    assert.equal(result.response.headers.get("x-broker-id"), "owner");
    assert.deepEqual(await result.response.json(), { threadId: "t1" });
    const turn = seen.find((req) => req.method === "POST")!;
    assert.equal(turn.url, "/api/workspaces/ws-1/turns");
    assert.equal(turn.headers[FORWARDED_HEADER], "broker-b");
    assert.equal(turn.headers["x-internal-secret"], "s");
    const notOwner = await forwardTurn(`http://127.0.0.1:${port}`, request(), {
      workspaceId: "ws-2",
      body,
    }, options);
    assert.equal(notOwner.kind, "notOwner");
  } finally {
    server.closeAllConnections();
    await new Promise<void>((resolve) => server.close(() => resolve()));
  }
});

/**
 * The broker's HTTP server in this process (`startBroker` from src/main.ts on port 0), seen
 * through raw TCP where the connection itself is the subject. The file runs under each
 * runtime, so `deno test`, `bun test` and `node --test` each test that runtime's server.
 * Most tests run no turn, so their codex is a path that does not exist.
 */

import { test } from "./_test.ts";
import assert from "node:assert/strict";
import { mkdtemp, realpath, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { type Broker, type BrokerOptions, type LogEntry, startBroker } from "../src/main.ts";
import { makeCodexHome } from "./_codex_home.ts";
import { type RawClient, rawClient, responseHeads } from "./_raw_http.ts";
import { type MockModel, startMockModel } from "./_mock_model.ts";

const SECRET = "server-test-secret";
// Bun's own default is 5 s per test.
const TIMEOUT = { timeout: 30_000 };

interface Running {
  broker: Broker;
  port: number;
  logs: LogEntry[];
}

/** Runs `fn` against a broker on a free port, then stops the broker and removes its files. */
async function withBroker(
  fn: (running: Running) => Promise<void>,
  options: Partial<BrokerOptions> & { realCodex?: boolean } = {},
): Promise<void> {
  const dir = await realpath(await mkdtemp(join(tmpdir(), "server-test-")));
  const logs: LogEntry[] = [];
  const { realCodex, ...rest } = options;
  const broker = await startBroker({
    secret: SECRET,
    port: 0,
    workspacesDir: join(dir, "workspaces"),
    ...(realCodex ? {} : { codex: join(dir, "no-such-codex") }),
    log: (entry) => logs.push(entry),
    ...rest,
  });
  try {
    await fn({ broker, port: Number(new URL(broker.url).port), logs });
  } finally {
    await broker.close();
    await rm(dir, { recursive: true, force: true });
  }
}

const BODY_BYTES = 300_000;

/** Sends a POST and its whole body, as Content-Length or chunked. */
function sendPost(client: RawClient, head: string, size: number, chunked: boolean): void {
  const framing = chunked ? "Transfer-Encoding: chunked" : `Content-Length: ${size}`;
  client.socket.write(`${head}Host: broker.test\r\n${framing}\r\n\r\n`);
  const piece = "x".repeat(16 * 1024);
  for (let sent = 0; sent < size; sent += piece.length) {
    const part = piece.slice(0, Math.min(piece.length, size - sent));
    client.socket.write(chunked ? `${part.length.toString(16)}\r\n${part}\r\n` : part);
  }
  if (chunked) client.socket.write("0\r\n\r\n");
}

const earlyAnswers: [number, string, string, number][] = [
  [
    401,
    "without the secret",
    "POST /api/turns HTTP/1.1\r\nContent-Type: application/json\r\n",
    BODY_BYTES,
  ],
  [
    415,
    "with a text/plain body",
    `POST /api/turns HTTP/1.1\r\nX-Internal-Secret: ${SECRET}\r\nContent-Type: text/plain\r\n`,
    BODY_BYTES,
  ],
  [404, "to an unknown path", "POST /api/nothing HTTP/1.1\r\n", BODY_BYTES],
  [
    413,
    "over the body limit",
    `POST /api/turns HTTP/1.1\r\nX-Internal-Secret: ${SECRET}\r\nContent-Type: application/json\r\n`,
    2 * 1024 * 1024,
  ],
];

for (const [status, reason, head, size] of earlyAnswers) {
  test(
    `a POST answered ${status} ${reason} before its body was read leaves the keep-alive connection usable or closed with Connection: close`,
    TIMEOUT,
    async () => {
      await withBroker(async ({ port }) => {
        for (const chunked of [false, true]) {
          const framing = chunked ? "chunked" : "Content-Length";
          const client = await rawClient(port);
          try {
            sendPost(client, head, size, chunked);
            await client.until(
              () => responseHeads(client.received).length > 0 || client.closed,
              5_000,
              `the POST's answer (${framing})`,
            );
            // The next request on the same connection, once the answer is in: keep-alive, not
            // pipelining (Bun 1.4 answers nothing on a connection that pipelines requests to
            // an async handler).
            if (!client.closed) {
              client.socket.write("GET /healthz HTTP/1.1\r\nHost: b.test\r\n\r\n");
            }
            const healthz = () => /"status":"ok"/.test(client.received);
            await client.until(
              () => healthz() || client.closed,
              5_000,
              `the GET /healthz answer or a close (${framing})`,
            );
            const [first, second] = responseHeads(client.received);
            assert.equal(first?.status, status, `${framing}: the POST's answer`);
            if (healthz()) {
              assert.equal(second?.status, 200, `${framing}: GET /healthz on the same socket`);
            } else {
              assert.equal(
                first?.headers.get("connection")?.toLowerCase(),
                "close",
                `${framing}: the server closed the connection without Connection: close`,
              );
            }
          } finally {
            await client.destroy();
          }
        }
      });
    },
  );
}

test(
  "the server builds no AbortSignal.any per request: 1,000 refused POSTs call it zero times",
  TIMEOUT,
  async () => {
    const any = AbortSignal.any;
    let calls = 0;
    AbortSignal.any = (signals: Iterable<AbortSignal>) => {
      calls++;
      return any.call(AbortSignal, [...signals]);
    };
    try {
      await withBroker(async ({ port }) => {
        const request = "POST /api/turns HTTP/1.1\r\nHost: broker.test\r\n" +
          "Content-Type: application/json\r\nX-Internal-Secret: wrong\r\nContent-Length: 2\r\n\r\n{}";
        const clients = await Promise.all([1, 2, 3, 4].map(() => rawClient(port)));
        try {
          // 4 keep-alive connections × 250 requests, each sent once the one before is answered
          // (Bun 1.4 answers no request at all of several that arrive in one packet).
          await Promise.all(clients.map(async (client) => {
            for (let i = 1; i <= 250; i++) {
              client.socket.write(request);
              await client.until(
                () => (client.received.match(/HTTP\/1\.1 401/g)?.length ?? 0) >= i,
                5_000,
                `answer ${i}`,
              );
            }
          }));
        } finally {
          await Promise.all(clients.map((client) => client.destroy()));
        }
      });
    } finally {
      AbortSignal.any = any;
    }
    assert.equal(calls, 0);
  },
);

/** A broker over the real codex whose model hangs, and an event stream of a turn in flight. */
async function withStreamInFlight(
  fn: (running: Running, stream: Response, model: MockModel) => Promise<void>,
  options: Partial<BrokerOptions>,
): Promise<void> {
  const model = await startMockModel({ respond: () => ({ type: "hang" }) });
  const home = await makeCodexHome(model.baseUrl);
  try {
    await withBroker(async (running) => {
      const response = await fetch(`${running.broker.url}/api/turns`, {
        method: "POST",
        headers: {
          "content-type": "application/json",
          "x-internal-secret": SECRET,
          accept: "text/event-stream",
        },
        body: JSON.stringify({
          workspaceId: "ws-1",
          params: { input: [{ type: "text", text: "hello", text_elements: [] }] },
        }),
      });
      assert.equal(response.status, 200);
      await model.waitForRequests(1);
      await fn(running, response, model);
    }, { realCodex: true, codexHome: home.path, ...options });
  } finally {
    await model.close();
    await home.cleanup();
  }
}

/** Reads the stream to its end and returns the data of its last event, a `result`. */
async function lastResult(response: Response): Promise<{ error?: { code: string } }> {
  const last = (await response.text()).trimEnd().split("\n\n").at(-1)!;
  assert.match(last, /^event: result\ndata: /);
  return JSON.parse(last.slice(last.indexOf("data: ") + 6));
}

test(
  "Broker.close() counts an event stream in flight until its end: it waits the grace period, then interrupts the turn, whose stream ends with unavailable",
  TIMEOUT,
  async () => {
    await withStreamInFlight(async ({ broker, logs }, stream, model) => {
      assert.equal(broker.inFlight, 1);
      const closing = broker.close();
      assert.equal((await lastResult(stream)).error?.code, "unavailable");
      // codex may wait on the hung model stream after SIGTERM until the supervisor's SIGKILL.
      await model.close();
      await closing;
      assert.equal(broker.inFlight, 0);
      const msgs = logs.map((entry) => entry.msg);
      assert.ok(msgs.includes("interrupting turns"), msgs.join(", "));
      assert.equal(msgs.at(-1), "stopped");
    }, { graceMs: 300 });
  },
);

test(
  "Broker.close() waits out a graceMs past 2^31 ms instead of interrupting at once",
  TIMEOUT,
  async () => {
    await withStreamInFlight(async ({ broker, logs }, stream, model) => {
      const closing = broker.close();
      await new Promise((resolve) => setTimeout(resolve, 100));
      assert.ok(!logs.some((entry) => entry.msg === "interrupting turns"), "still in grace");
      assert.equal(broker.inFlight, 1);
      broker.hurry();
      assert.equal((await lastResult(stream)).error?.code, "unavailable");
      await model.close();
      await closing;
      assert.ok(logs.some((entry) => entry.msg === "interrupting turns"));
    }, { graceMs: 3_000_000_000 });
  },
);

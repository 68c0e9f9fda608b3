/**
 * The bad-input corpus (issue 10, §1): every 4xx the README documents, and the clients that
 * misbehave at the connection level (a body that trickles in, oversized headers, idle
 * keep-alive connections, an upload cut off mid-way), each against the broker's real HTTP
 * server (`startBroker` on port 0) over raw TCP. Each gets a clear JSON error, or a closed
 * socket where that is the contract, within a bounded time, and none starts a turn or leaves
 * a request in flight. The file runs under each runtime, so each runtime's server is tested.
 * No test runs a turn: codex is a path that does not exist, and a turn that reached the pool
 * would show as a `dial` in the log.
 */

import { test } from "./_test.ts";
import assert from "node:assert/strict";
import { mkdtemp, realpath, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import process from "node:process";
import {
  type Broker,
  type BrokerOptions,
  type LogEntry,
  parseFlags,
  startBroker,
  USAGE,
  UsageError,
} from "../src/main.ts";
import { type RawClient, rawClient, type RawResponse, responses } from "./_raw_http.ts";
import { waitFor, within } from "./_wait.ts";
import { Pool } from "../mod.ts";
import { SignJWT } from "jose";
import { createTurnsHandler } from "../src/handler.ts";
import { codelessBroker } from "./_codeless_broker.ts";

const SECRET = "bad-clients-test-secret";
// Bun's own default is 5 s per test.
const TIMEOUT = { timeout: 60_000 };
const RUNTIME = "Deno" in globalThis ? "deno" : process.versions.bun ? "bun" : "node";
const INPUT = [{ type: "text", text: "hi", text_elements: [] }];

interface Running {
  broker: Broker;
  port: number;
  logs: LogEntry[];
}

/** Runs `fn` against a broker on a free port, then stops it and removes its files. */
async function withBroker(
  fn: (running: Running) => Promise<void>,
  options: Partial<BrokerOptions> = {},
): Promise<void> {
  const dir = await realpath(await mkdtemp(join(tmpdir(), "bad-clients-test-")));
  const logs: LogEntry[] = [];
  const broker = await startBroker({
    ...codelessBroker(dir, SECRET),
    log: (entry) => logs.push(entry),
    ...options,
  });
  try {
    await fn({ broker, port: Number(new URL(broker.url).port), logs });
  } finally {
    await broker.close();
    await rm(dir, { recursive: true, force: true });
  }
}

/** Nothing of the request is left: no request in flight, no turn, no codex dialled. */
async function assertNothingLeft({ broker, logs }: Running): Promise<void> {
  await waitFor("no request in flight", () => broker.inFlight === 0, 5_000);
  const metrics = await (await fetch(`${broker.url}/metrics`)).text();
  assert.ok(
    !/^codex_broker_(turns_total\{.*|dials_total) [1-9]/m.test(metrics),
    `a turn was counted:\n${metrics}`,
  );
  assert.match(metrics, /^codex_broker_open_connections 0$/m);
  assert.deepEqual(
    logs.filter((entry) => entry.msg === "dial" || entry.msg === "turn"),
    [],
    "no turn reached the pool",
  );
}

/** A request's bytes: the head with `Host`, and `Content-Length` when there is a body. */
function request(
  method: string,
  path: string,
  headers: Record<string, string> = {},
  body?: string,
): string {
  const lines = [`${method} ${path} HTTP/1.1`, "Host: broker.test"];
  for (const [name, value] of Object.entries(headers)) lines.push(`${name}: ${value}`);
  if (body !== undefined) lines.push(`Content-Length: ${body.length}`);
  return `${lines.join("\r\n")}\r\n\r\n${body ?? ""}`;
}

const JSON_HEADERS = { "Content-Type": "application/json", "X-Internal-Secret": SECRET };

/** A `POST /api/turns` with the secret and a JSON content type. */
function postTurn(body: unknown, headers: Record<string, string> = {}): string {
  return request("POST", "/api/turns", { ...JSON_HEADERS, ...headers }, JSON.stringify(body));
}

/** Sends `bytes` on a new connection and waits for one whole answer, or a close. */
async function exchange(
  port: number,
  bytes: string,
): Promise<{ response: RawResponse | undefined; client: RawClient }> {
  const client = await rawClient(port);
  try {
    client.socket.write(bytes, "latin1");
    await client.until(
      () => responses(client.received)[0]?.body !== undefined || client.closed,
      10_000,
      "an answer or a close",
    );
    return { response: responses(client.received)[0], client };
  } finally {
    await client.destroy();
  }
}

/** The JSON error of an answer. */
function errorOf(response: RawResponse | undefined): { code: string; message: string } {
  assert.ok(response?.body, "an answer with a body");
  assert.equal(response.headers.get("content-type"), "application/json");
  const parsed = JSON.parse(response.body) as { error?: { code: string; message: string } };
  assert.ok(parsed.error, response.body);
  assert.equal(typeof parsed.error.message, "string");
  return parsed.error;
}

interface Case {
  status: number;
  code: string;
  why: string;
  bytes: string;
  /** More to check on the answer. */
  check?: (response: RawResponse) => void;
  /** How the broker is started, when the defaults do not give this answer. */
  options?: Partial<BrokerOptions>;
}

// Bearer tokens for the cases that need a broker taking them (--jwt-secret-file).
const JWT_KEY = "bad-clients-jwt-key-0123456789-0123456789";
const WITH_TOKENS: Partial<BrokerOptions> = { jwtSecret: JWT_KEY };
function token(
  claims: Record<string, unknown>,
  expiresIn: string | number = "10m",
): Promise<string> {
  return new SignJWT({ workspaces: ["ws-1"], scope: "turns:write", ...claims })
    .setProtectedHeader({ alg: "HS256" })
    .setSubject("client")
    .setExpirationTime(expiresIn)
    .sign(new TextEncoder().encode(JWT_KEY));
}
const bearer = (jwt: string) => ({
  "Content-Type": "application/json",
  Authorization: `Bearer ${jwt}`,
});
const BODY_WS_1 = JSON.stringify({ workspaceId: "ws-1", params: { input: INPUT } });
const TOKEN_WS_2 = await token({ workspaces: ["ws-2"] });
const TOKEN_READ_ONLY = await token({ scope: "turns:read" });
const TOKEN_EXPIRED = await token({}, Math.floor(Date.now() / 1000) - 3600);

const closes = (response: RawResponse) =>
  assert.equal(response.headers.get("connection")?.toLowerCase(), "close");

/** Every 4xx of the README's REST contract that a request alone can cause. */
const CORPUS: Case[] = [
  { status: 400, code: "invalidJson", why: "a body that is not JSON", bytes: postTurnRaw("{") },
  { status: 400, code: "invalidJson", why: "a body that is not UTF-8", bytes: postTurnRaw("\xff") },
  { status: 400, code: "invalidBody", why: "a JSON array body", bytes: postTurn([]) },
  {
    status: 400,
    code: "invalidWorkspaceId",
    why: "a workspaceId with a slash",
    bytes: postTurn({ workspaceId: "../x", params: { input: INPUT } }),
  },
  {
    status: 400,
    code: "invalidWorkspaceId",
    why: "no workspaceId",
    bytes: postTurn({ params: { input: INPUT } }),
  },
  {
    status: 400,
    code: "invalidWorkspaceId",
    why: "a bad workspace id in the path",
    bytes: request(
      "POST",
      "/api/workspaces/a%20b/turns",
      JSON_HEADERS,
      JSON.stringify({ params: { input: INPUT } }),
    ),
  },
  {
    status: 400,
    code: "invalidThreadId",
    why: "an empty threadId",
    bytes: postTurn({ workspaceId: "ws-1", threadId: "", params: { input: INPUT } }),
  },
  {
    status: 400,
    code: "invalidParams",
    why: "params that are not an object",
    bytes: postTurn({ workspaceId: "ws-1", params: 1 }),
  },
  {
    status: 400,
    code: "invalidInput",
    why: "params without input",
    bytes: postTurn({ workspaceId: "ws-1", params: {} }),
  },
  {
    status: 400,
    code: "threadIdInParams",
    why: "a threadId inside params",
    bytes: postTurn({ workspaceId: "ws-1", params: { input: INPUT, threadId: "t" } }),
  },
  {
    status: 400,
    code: "invalidTimeout",
    why: "a timeoutMs of 0",
    bytes: postTurn({ workspaceId: "ws-1", params: { input: INPUT }, timeoutMs: 0 }),
  },
  {
    status: 400,
    code: "invalidTimeout",
    why: "a timeoutMs over maxTimeoutMs",
    bytes: postTurn({ workspaceId: "ws-1", params: { input: INPUT }, timeoutMs: 1e9 }),
  },
  {
    status: 400,
    code: "invalidThreadParams",
    why: "threadParams that are not an object",
    bytes: postTurn({ workspaceId: "ws-1", params: { input: INPUT }, threadParams: [] }),
  },
  {
    status: 400,
    code: "workspaceMismatch",
    why: "a body workspaceId that differs from the path",
    bytes: request(
      "POST",
      "/api/workspaces/ws-1/turns",
      JSON_HEADERS,
      JSON.stringify({ workspaceId: "ws-2", params: { input: INPUT } }),
    ),
  },
  {
    status: 400,
    code: "workspaceMismatch",
    why: "an X-Workspace-Id that differs from the body",
    bytes: postTurn({ workspaceId: "ws-1", params: { input: INPUT } }, {
      "X-Workspace-Id": "ws-2",
    }),
  },
  {
    status: 401,
    code: "unauthorized",
    why: "no X-Internal-Secret",
    bytes: request("POST", "/api/turns", { "Content-Type": "application/json" }, "{}"),
  },
  {
    status: 401,
    code: "unauthorized",
    why: "a wrong X-Internal-Secret",
    bytes: postTurn({ workspaceId: "ws-1", params: { input: INPUT } }, {
      "X-Internal-Secret": "wrong",
    }),
  },
  { status: 404, code: "notFound", why: "an unknown path", bytes: request("GET", "/api/nothing") },
  {
    status: 405,
    code: "methodNotAllowed",
    why: "GET on the turns route",
    bytes: request("GET", "/api/turns"),
    check: (response) => assert.equal(response.headers.get("allow"), "POST"),
  },
  {
    status: 413,
    code: "bodyTooLarge",
    why: "a declared Content-Length over 1 MiB",
    bytes: `POST /api/turns HTTP/1.1\r\nHost: broker.test\r\nContent-Type: application/json\r\n` +
      `X-Internal-Secret: ${SECRET}\r\nContent-Length: ${2 * 1024 * 1024}\r\n\r\n{`,
    check: closes,
  },
  {
    status: 413,
    code: "bodyTooLarge",
    why: "a chunked body that grows past 1 MiB",
    bytes: `POST /api/turns HTTP/1.1\r\nHost: broker.test\r\nContent-Type: application/json\r\n` +
      `X-Internal-Secret: ${SECRET}\r\nTransfer-Encoding: chunked\r\n\r\n` +
      `${(64 * 1024).toString(16)}\r\n${"x".repeat(64 * 1024)}\r\n`.repeat(17),
    check: closes,
  },
  {
    status: 415,
    code: "unsupportedMediaType",
    why: "a text/plain body",
    bytes: request("POST", "/api/turns", {
      "Content-Type": "text/plain",
      "X-Internal-Secret": SECRET,
    }, "{}"),
  },
  {
    status: 415,
    code: "unsupportedMediaType",
    why: "no Content-Type",
    bytes: request("POST", "/api/turns", { "X-Internal-Secret": SECRET }, "{}"),
  },
  {
    status: 421,
    code: "notOwner",
    why: "a turn forwarded by another broker for a workspace this one does not own",
    bytes: postTurn({ workspaceId: "ws-1", params: { input: INPUT } }, {
      "X-Codex-Broker-Forwarded": "broker-b",
    }),
  },
  {
    status: 403,
    code: "forbiddenParam",
    why: "a cwd outside the workspace (the default policy)",
    bytes: postTurn({ workspaceId: "ws-1", params: { input: INPUT }, threadParams: { cwd: "/" } }),
    check: (response) => assert.equal(JSON.parse(response.body!).error.field, "threadParams.cwd"),
  },
  {
    status: 401,
    code: "unauthorized",
    why: "a bearer token at a broker that takes none",
    bytes: request("POST", "/api/turns", bearer(TOKEN_WS_2), BODY_WS_1),
  },
  {
    status: 401,
    code: "unauthorized",
    why: "an expired bearer token",
    bytes: request("POST", "/api/turns", bearer(TOKEN_EXPIRED), BODY_WS_1),
    options: WITH_TOKENS,
    check: (response) =>
      assert.match(response.headers.get("www-authenticate") ?? "", /invalid_token/),
  },
  {
    status: 403,
    code: "forbiddenWorkspace",
    why: "a bearer token for another workspace",
    bytes: request("POST", "/api/turns", bearer(TOKEN_WS_2), BODY_WS_1),
    options: WITH_TOKENS,
  },
  {
    status: 403,
    code: "insufficientScope",
    why: "a bearer token without turns:write",
    bytes: request("POST", "/api/turns", bearer(TOKEN_READ_ONLY), BODY_WS_1),
    options: WITH_TOKENS,
  },
];

function postTurnRaw(body: string): string {
  return request("POST", "/api/turns", JSON_HEADERS, body);
}

for (const { status, code, why, bytes, check, options } of CORPUS) {
  test(
    `a request with ${why} is answered ${status} ${code} and starts no turn`,
    TIMEOUT,
    async () => {
      await withBroker(async (running) => {
        const { response } = await exchange(running.port, bytes);
        assert.equal(response?.status, status, running.logs.map((e) => e.msg).join(", "));
        assert.equal(errorOf(response).code, code);
        check?.(response!);
        assert.ok(
          running.logs.some((entry) => entry.msg === "bad request" && entry.status === status),
          "logged as a bad request",
        );
        await assertNothingLeft(running);
      }, options);
    },
  );
}

/** Writes one byte every `everyMs` until the socket closes; returns a stop function. */
function trickle(client: RawClient, bytes: string, everyMs: number): () => void {
  let at = 0;
  const timer = setInterval(() => {
    if (client.closed || at >= bytes.length) return;
    client.socket.write(bytes[at++]!);
  }, everyMs);
  return () => clearInterval(timer);
}

const REQUEST_TIMEOUT_MS = 300;

test(
  "a body that trickles in is answered 408 requestTimeout with Connection: close once the request deadline passes, and the socket is closed",
  TIMEOUT,
  async () => {
    await withBroker(async (running) => {
      const body = JSON.stringify({ workspaceId: "ws-1", params: { input: INPUT } });
      const client = await rawClient(running.port);
      const started = performance.now();
      client.socket.write(
        request("POST", "/api/turns", {
          ...JSON_HEADERS,
          "Content-Length": String(body.length),
        }),
      );
      const stop = trickle(client, body, 25);
      try {
        await client.until(
          () => responses(client.received)[0]?.body !== undefined,
          10_000,
          "the 408",
        );
        const answeredMs = performance.now() - started;
        const [response] = responses(client.received);
        assert.equal(response!.status, 408);
        assert.equal(errorOf(response).code, "requestTimeout");
        closes(response!);
        assert.ok(answeredMs >= REQUEST_TIMEOUT_MS - 50, `answered after ${answeredMs} ms`);
        // The client goes on sending; the server closes the connection all the same.
        await client.until(() => client.closed, 5_000, "the server to close the socket");
      } finally {
        stop();
        await client.destroy();
      }
      assert.ok(
        running.logs.some((entry) => entry.msg === "bad request" && entry.status === 408),
      );
      await assertNothingLeft(running);
    }, { requestTimeoutMs: REQUEST_TIMEOUT_MS });
  },
);

test(
  "a body that arrives whole within the request deadline is read as usual",
  TIMEOUT,
  async () => {
    await withBroker(async (running) => {
      // Invalid on purpose: the answer shows the body was read and parsed, with no turn.
      const { response } = await exchange(running.port, postTurn({ workspaceId: "ws-1" }));
      assert.equal(errorOf(response).code, "invalidParams");
    }, { requestTimeoutMs: REQUEST_TIMEOUT_MS });
  },
);

test(
  "bodies that arrive in pieces, with Content-Length and chunked, are read whole, one after the other on a keep-alive connection",
  TIMEOUT,
  async () => {
    await withBroker(async (running) => {
      // Invalid on purpose: each answer shows its whole body was read and parsed.
      const body = JSON.stringify({ workspaceId: "ws-1", note: "x".repeat(20_000) });
      const half = body.length >> 1;
      const client = await rawClient(running.port);
      try {
        client.socket.write(
          request("POST", "/api/turns", { ...JSON_HEADERS, "Content-Length": String(body.length) }),
        );
        for (const piece of [body.slice(0, half), body.slice(half)]) {
          await new Promise((resolve) => setTimeout(resolve, 20));
          client.socket.write(piece);
        }
        await client.until(() => responses(client.received).length === 1, 5_000, "answer 1");
        client.socket.write(
          request("POST", "/api/turns", { ...JSON_HEADERS, "Transfer-Encoding": "chunked" }),
        );
        for (const piece of [body.slice(0, half), body.slice(half)]) {
          await new Promise((resolve) => setTimeout(resolve, 20));
          client.socket.write(`${piece.length.toString(16)}\r\n${piece}\r\n`);
        }
        client.socket.write("0\r\n\r\n");
        await client.until(() => responses(client.received).length === 2, 5_000, "answer 2");
        for (const response of responses(client.received)) {
          assert.equal(response.status, 400);
          assert.equal(errorOf(response).code, "invalidParams");
        }
        assert.equal(client.closed, false);
      } finally {
        await client.destroy();
      }
      await assertNothingLeft(running);
    });
  },
);

/** A `GET /healthz` whose head carries `bytes` more in one header field. */
function bigHead(bytes: number): string {
  return request("GET", "/healthz", { "X-Padding": "a".repeat(bytes) });
}

test(
  "a request head over 16 KiB is answered 431 with Connection: close by the runtime's HTTP parser, before the handler sees it",
  TIMEOUT,
  async () => {
    await withBroker(async (running) => {
      const { response } = await exchange(running.port, bigHead(20 * 1024));
      assert.equal(response?.status, 431);
      closes(response!);
      // Bare: the handler's own JSON headersTooLarge is for a server that lets such a head
      // through (Deno.serve passes up to about 64 KiB).
      assert.equal(response!.body ?? "", "");
      assert.ok(!running.logs.some((entry) => entry.msg === "bad request"), "no handler saw it");
      await assertNothingLeft(running);
    });
  },
);

test(
  "startBroker() with denoServer native serves with Deno.serve on Deno, where the handler answers a head over 16 KiB 431 headersTooLarge as JSON; elsewhere the option changes nothing",
  TIMEOUT,
  async () => {
    await withBroker(async (running) => {
      const { response } = await exchange(running.port, bigHead(20 * 1024));
      assert.equal(response?.status, 431);
      if ("Deno" in globalThis) {
        assert.equal(errorOf(response).code, "headersTooLarge");
      } else {
        assert.equal(response!.body ?? "", "");
      }
      await assertNothingLeft(running);
    }, { denoServer: "native" });
  },
);

test(
  "a request head of several hundred KiB gets a 431 or a closed socket at once, and the server serves the next client",
  TIMEOUT,
  async () => {
    await withBroker(async (running) => {
      for (const size of [100 * 1024, 1024 * 1024]) {
        const { response, client } = await exchange(running.port, bigHead(size));
        // The 431 may be lost to a reset: the server closes without reading the rest of the head.
        assert.ok(
          response?.status === 431 || (client.closed && (response?.status ?? 400) >= 400),
          `${size} bytes: ${response?.status}`,
        );
        if (response) closes(response);
      }
      const { response } = await exchange(running.port, request("GET", "/healthz"));
      assert.equal(response?.status, 200);
      await assertNothingLeft(running);
    });
  },
);

test(
  "a request head just under 16 KiB is served",
  TIMEOUT,
  async () => {
    await withBroker(async (running) => {
      const { response } = await exchange(running.port, bigHead(15 * 1024));
      assert.equal(response?.status, 200);
    });
  },
);

test(
  "a request head that trickles in is answered 408 or its socket closed in bounded time (Node and Deno: the request deadline; Bun: its 10 s idle timeout)",
  TIMEOUT,
  async () => {
    await withBroker(async (running) => {
      const client = await rawClient(running.port);
      const stop = trickle(client, `GET /healthz HTTP/1.1\r\nX-Slow: ${"a".repeat(10_000)}`, 50);
      try {
        await client.until(() => client.closed, 30_000, "the server to close the socket");
        const [response] = responses(client.received);
        if (response) assert.equal(response.status, 408);
      } finally {
        stop();
        await client.destroy();
      }
      await assertNothingLeft(running);
    }, { requestTimeoutMs: REQUEST_TIMEOUT_MS });
  },
);

test(
  "a client that aborts mid-upload starts no turn, leaves no request in flight, and is logged and counted as one 400 invalidBody",
  TIMEOUT,
  async () => {
    await withBroker(async (running) => {
      const body = JSON.stringify({ workspaceId: "ws-1", params: { input: INPUT } });
      const client = await rawClient(running.port);
      client.socket.write(
        request("POST", "/api/turns", {
          ...JSON_HEADERS,
          "Content-Length": String(body.length),
        }) + body.slice(0, 20),
      );
      await waitFor("the handler to take the request", () => running.broker.inFlight === 1);
      await client.destroy();
      // Well within the request deadline: the abort itself ends the request.
      await waitFor("the request to end", () => running.broker.inFlight === 0, 10_000);
      // The read fails: one bad request, answered to nobody, counted as such.
      assert.deepEqual(
        running.logs.filter((entry) => entry.msg === "bad request").map((e) => [e.status, e.code]),
        [[400, "invalidBody"]],
      );
      const metrics = await (await fetch(`${running.broker.url}/metrics`)).text();
      assert.match(metrics, /^codex_broker_bad_requests_total\{status="400"\} 1$/m);
      await assertNothingLeft(running);
    });
  },
);

const IDLE_CONNECTIONS = 1_000;
/** How long each runtime keeps an idle keep-alive connection (Deno serves with `node:http`). */
const IDLE_CLOSE_MS = { node: 5_000, bun: 10_000, deno: 5_000 }[RUNTIME]!;

test(
  `${IDLE_CONNECTIONS} idle keep-alive connections hold little memory, the broker serves other clients meanwhile, and the server closes them once idle`,
  TIMEOUT,
  async () => {
    await withBroker(async (running) => {
      const clients: RawClient[] = [];
      // When each connection got its answer, and when the server closed it.
      const answeredAt = new Map<RawClient, number>();
      const closedAt = new Map<RawClient, number>();
      const healthz = request("GET", "/healthz");
      try {
        const before = process.memoryUsage().rss;
        const opened = performance.now();
        for (let i = 0; i < IDLE_CONNECTIONS; i += 100) {
          const batch = await Promise.all(
            Array.from({ length: 100 }, () => rawClient(running.port)),
          );
          clients.push(...batch);
          await Promise.all(batch.map(async (client) => {
            client.socket.once("close", () => closedAt.set(client, performance.now()));
            client.socket.write(healthz);
            await client.until(
              () => responses(client.received)[0]?.body !== undefined,
              10_000,
              "the healthz answer",
            );
            answeredAt.set(client, performance.now());
          }));
        }
        // Both ends of every connection live in this process.
        const grownMb = (process.memoryUsage().rss - before) / 1024 / 1024;
        console.log(
          `${RUNTIME}: ${IDLE_CONNECTIONS} connections in ${
            Math.round(performance.now() - opened)
          } ms, RSS +${grownMb.toFixed(1)} MB`,
        );
        assert.ok(grownMb < 100, `RSS grew ${grownMb.toFixed(1)} MB`);

        const started = performance.now();
        const { response } = await exchange(
          running.port,
          postTurn({}, { "X-Internal-Secret": "x" }),
        );
        assert.equal(response?.status, 401);
        assert.ok(performance.now() - started < 5_000, "answered at once");

        await waitFor(
          "the server to close every idle connection",
          () => clients.every((client) => client.closed),
          IDLE_CLOSE_MS + 30_000,
          50,
        );
        const idleMs = clients.map((client) => closedAt.get(client)! - answeredAt.get(client)!);
        const shortest = Math.min(...idleMs);
        assert.ok(shortest >= IDLE_CLOSE_MS - 1_000, `one was closed after ${shortest} ms idle`);
      } finally {
        await Promise.all(clients.map((client) => client.destroy()));
      }
      await assertNothingLeft(running);
    });
  },
);

test("--request-timeout sets requestTimeoutMs; zero or a bad duration is a usage error", () => {
  const parsed = parseFlags(["--request-timeout", "30s"], { BROKER_SECRET: SECRET });
  assert.ok(!parsed.help);
  assert.equal(parsed.options.requestTimeoutMs, 30_000);
  assert.throws(() => parseFlags(["--request-timeout=0"]), UsageError);
  assert.throws(() => parseFlags(["--request-timeout=soon"]), UsageError);
  assert.match(USAGE, /--request-timeout <duration>/);
});

test(
  "createTurnsHandler() answers a body that never ends 408 requestTimeout after requestTimeoutMs, and lets go of the body (cancelled; on Node released, the connection closing it)",
  TIMEOUT,
  async () => {
    const pool = new Pool(() => Promise.reject(new Error("no codex here")));
    const handler = createTurnsHandler(pool, { secret: SECRET, requestTimeoutMs: 50 });
    let cancelled = false;
    const body = new ReadableStream<Uint8Array>({
      start(controller) {
        controller.enqueue(new TextEncoder().encode('{"workspaceId":'));
      },
      cancel() {
        cancelled = true;
      },
    });
    const request = new Request("http://broker.test/api/turns", {
      method: "POST",
      headers: { "content-type": "application/json", "x-internal-secret": SECRET },
      body,
      duplex: "half",
    } as RequestInit);
    try {
      const started = performance.now();
      const response = await within(handler(request), 5_000, "the handler's answer");
      assert.ok(performance.now() - started >= 45, "answered at the deadline, not before");
      assert.equal(response.status, 408);
      assert.equal(response.headers.get("connection"), "close");
      assert.equal((await response.json()).error.code, "requestTimeout");
      // Node releases it (see releaseBody in src/_validate.ts), the others cancel it.
      if (RUNTIME === "node") assert.equal(request.body!.locked, false, "the body was released");
      else assert.ok(cancelled, "the body was cancelled");
      assert.equal(pool.size, 0);
    } finally {
      if (!request.body!.locked) await request.body!.cancel();
      await pool.close();
    }
  },
);

test("createTurnsHandler() refuses a requestTimeoutMs that is not a positive integer", async () => {
  const pool = new Pool(() => Promise.reject(new Error("no codex here")));
  try {
    for (const requestTimeoutMs of [0, -1, 1.5, NaN]) {
      assert.throws(
        () => createTurnsHandler(pool, { secret: SECRET, requestTimeoutMs }),
        RangeError,
      );
    }
  } finally {
    await pool.close();
  }
});

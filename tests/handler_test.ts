import { test } from "./_test.ts";
import { within } from "./_wait.ts";
import { readEvents } from "./_sse_events.ts";
import assert from "node:assert/strict";
import { Pool, PoolClosedError, type PoolOptions } from "../mod.ts";
import { createTurnsHandler, type TurnsHandlerOptions } from "../src/handler.ts";
import {
  agentMessage,
  codexLike,
  type FakeAppServer,
  type FakePeer,
  gatedCodex,
  type Message,
  type Req,
  serverRequestParams,
  startFakeAppServer,
  threadResult,
  turnObject,
} from "./_fake_app_server.ts";

const SECRET = "test-secret-0123456789";
const URL_TURNS = "http://broker.test/api/turns";
const input = [{ type: "text", text: "hi", text_elements: [] }];

interface Harness {
  server: FakeAppServer;
  pool: Pool;
  handler: (request: Request) => Promise<Response>;
  logs: Record<string, unknown>[];
  /** Resolves with the first log entry (past or future) that matches. */
  logged(match: (entry: Record<string, unknown>) => boolean): Promise<Record<string, unknown>>;
  close(): Promise<void>;
}

/** A handler over a pool whose resolver points at a fresh fake app-server. */
async function harness(
  script: (peer: FakePeer) => void | Promise<void>,
  options: {
    pool?: PoolOptions;
    handler?: Partial<TurnsHandlerOptions>;
    resolver?: (workspaceId: string) => Promise<string>;
  } = {},
): Promise<Harness> {
  const server = await startFakeAppServer(script);
  const pool = new Pool(options.resolver ?? (() => Promise.resolve(server.url)), options.pool);
  const logs: Record<string, unknown>[] = [];
  const waiters: {
    match: (entry: Record<string, unknown>) => boolean;
    resolve: (entry: Record<string, unknown>) => void;
  }[] = [];
  const handler = createTurnsHandler(pool, {
    secret: SECRET,
    log: (entry) => {
      logs.push(entry);
      for (const waiter of waiters.splice(0)) {
        if (waiter.match(entry)) waiter.resolve(entry);
        else waiters.push(waiter);
      }
    },
    ...options.handler,
  });
  return {
    server,
    pool,
    handler,
    logs,
    logged(match) {
      const found = logs.find(match);
      if (found) return Promise.resolve(found);
      return new Promise((resolve) => waiters.push({ match, resolve }));
    },
    async close() {
      await pool.close();
      await server.close();
    },
  };
}

function post(
  body: unknown,
  init: { headers?: Record<string, string>; signal?: AbortSignal } = {},
) {
  return new Request(URL_TURNS, {
    method: "POST",
    headers: {
      "content-type": "application/json",
      "x-internal-secret": SECRET,
      ...init.headers,
    },
    body: typeof body === "string" ? body : JSON.stringify(body),
    ...(init.signal ? { signal: init.signal } : {}),
  });
}

async function errorOf(response: Response): Promise<{ code: string; message: string }> {
  assert.equal(response.headers.get("content-type"), "application/json");
  const body = await response.json();
  assert.equal(typeof body.error?.code, "string");
  assert.equal(typeof body.error?.message, "string");
  return body.error;
}

function assertNothingReachedCodex(h: Harness): void {
  assert.equal(h.server.peers.length, 0, "no connection was made to the app-server");
  assert.equal(h.pool.size, 0);
}

/**
 * Counts the intervals started and not yet cleared from now on. Deno's sanitizers do not
 * cover `node:test` tests and Node merely hangs on a live interval, so tests that must stop
 * a timer check it with this. `restore()` puts the globals back and clears leftovers.
 */
function trackIntervals(): { readonly live: number; restore(): void } {
  const live = new Set<ReturnType<typeof setInterval>>();
  const set = globalThis.setInterval;
  const clear = globalThis.clearInterval;
  globalThis.setInterval = ((...args: Parameters<typeof setInterval>) => {
    const id = set(...args);
    live.add(id);
    return id;
  }) as typeof setInterval;
  globalThis.clearInterval = ((id: ReturnType<typeof setInterval> | undefined) => {
    if (id !== undefined) live.delete(id);
    clear(id);
  }) as typeof clearInterval;
  return {
    get live() {
      return live.size;
    },
    restore() {
      globalThis.setInterval = set;
      globalThis.clearInterval = clear;
      for (const id of live) clear(id);
    },
  };
}

/**
 * A codex that answers thread/start with `thr-1` and every turn/start with `turn-1`, so two
 * runs of the same turn answer alike. Before completing it waits for `gate`.
 */
function fixedTurn(peer: FakePeer, gate: () => Promise<void> = async () => {}): void {
  // Another thread's event on the same connection: must not show in this turn's stream.
  const otherThread = () =>
    peer.notify("item/completed", {
      completedAtMs: 1,
      threadId: "thr-other",
      turnId: "x",
      item: agentMessage("o", "no"),
    });
  gatedCodex(async () => {
    otherThread();
    await gate();
  }, (peer, threadId) => {
    const item = agentMessage("msg-1", "hello");
    peer.notify("item/agentMessage/delta", {
      threadId,
      turnId: "turn-1",
      itemId: "m1",
      delta: "hello",
    });
    peer.notify("item/completed", { completedAtMs: 1, threadId, turnId: "turn-1", item });
    peer.notify("turn/completed", { threadId, turn: turnObject("turn-1", "completed", [item]) });
  })(peer);
}

/** A codex whose turns hang until interrupted, telling when a turn starts and is interrupted. */
function hangingCodex() {
  const started = Promise.withResolvers<void>();
  const interrupted = Promise.withResolvers<Message>();
  return {
    started: within(started.promise, 5_000, "turn/start"),
    interrupted: () => within(interrupted.promise, 5_000, "turn/interrupt"),
    script(peer: FakePeer) {
      // Looks at the messages and lets codexLike answer them.
      peer.handle((m) => {
        if (m.method === "turn/start") started.resolve();
        if (m.method === "turn/interrupt") interrupted.resolve(m);
        return false;
      });
      codexLike(peer, { hang: true });
    },
  };
}

// --- bad requests: nothing reaches codex --------------------------------------------------

const badBodies: [string, unknown, string][] = [
  ["the body is not JSON", "{not json", "invalidJson"],
  ["the body is not a JSON object", [1, 2], "invalidBody"],
  ["workspaceId is missing", { params: { input } }, "invalidWorkspaceId"],
  [
    "workspaceId is not a valid id",
    { workspaceId: "../etc", params: { input } },
    "invalidWorkspaceId",
  ],
  [
    "threadId is an empty string",
    { workspaceId: "ws-1", threadId: "", params: { input } },
    "invalidThreadId",
  ],
  [
    "threadId is not a string",
    { workspaceId: "ws-1", threadId: 7, params: { input } },
    "invalidThreadId",
  ],
  ["params is missing", { workspaceId: "ws-1" }, "invalidParams"],
  ["params is an array", { workspaceId: "ws-1", params: [input] }, "invalidParams"],
  ["params.input is missing", { workspaceId: "ws-1", params: {} }, "invalidInput"],
  [
    "params.input is not an array",
    { workspaceId: "ws-1", params: { input: "hi" } },
    "invalidInput",
  ],
  [
    "params holds threadId",
    { workspaceId: "ws-1", params: { input, threadId: "t" } },
    "threadIdInParams",
  ],
  ["timeoutMs is 0", { workspaceId: "ws-1", params: { input }, timeoutMs: 0 }, "invalidTimeout"],
  [
    "timeoutMs is not an integer",
    { workspaceId: "ws-1", params: { input }, timeoutMs: 1.5 },
    "invalidTimeout",
  ],
  [
    "timeoutMs is a string",
    { workspaceId: "ws-1", params: { input }, timeoutMs: "100" },
    "invalidTimeout",
  ],
  [
    "timeoutMs exceeds maxTimeoutMs",
    { workspaceId: "ws-1", params: { input }, timeoutMs: 60_001 },
    "invalidTimeout",
  ],
  [
    "threadParams is not an object",
    { workspaceId: "ws-1", params: { input }, threadParams: "x" },
    "invalidThreadParams",
  ],
];

for (const [reason, body, code] of badBodies) {
  test(`POST /api/turns answers 400 ${code} when ${reason}, and nothing reaches codex`, async () => {
    const h = await harness((peer) => codexLike(peer), { handler: { maxTimeoutMs: 60_000 } });
    try {
      const response = await h.handler(post(body));
      assert.equal(response.status, 400);
      assert.equal((await errorOf(response)).code, code);
      assertNothingReachedCodex(h);
      assert.deepEqual(h.logs, [{ msg: "bad request", status: 400, code }]);
    } finally {
      await h.close();
    }
  });
}

test("POST /api/turns answers 401 without X-Internal-Secret, before looking at the body", async () => {
  const h = await harness((peer) => codexLike(peer));
  try {
    const response = await h.handler(
      new Request(URL_TURNS, {
        method: "POST",
        headers: { "content-type": "text/plain" },
        body: "{",
      }),
    );
    assert.equal(response.status, 401);
    assert.equal((await errorOf(response)).code, "unauthorized");
    assertNothingReachedCodex(h);
  } finally {
    await h.close();
  }
});

test("POST /api/turns answers 401 for a wrong secret of the same or another length", async () => {
  const h = await harness((peer) => codexLike(peer));
  try {
    const wrong = [SECRET.slice(0, -1) + "X", "short", SECRET + SECRET, ""];
    for (const secret of wrong) {
      const response = await h.handler(
        post({ workspaceId: "ws-1", params: { input } }, {
          headers: { "x-internal-secret": secret },
        }),
      );
      assert.equal(response.status, 401, `secret ${JSON.stringify(secret)}`);
      assert.equal((await errorOf(response)).code, "unauthorized");
    }
    assertNothingReachedCodex(h);
    assert.ok(!JSON.stringify(h.logs).includes(SECRET), "the secret is never logged");
  } finally {
    await h.close();
  }
});

test("the handler answers 404 for an unknown path", async () => {
  const h = await harness((peer) => codexLike(peer));
  try {
    const response = await h.handler(
      new Request("http://broker.test/api/turn", { headers: { "x-internal-secret": SECRET } }),
    );
    assert.equal(response.status, 404);
    assert.equal((await errorOf(response)).code, "notFound");
    assertNothingReachedCodex(h);
  } finally {
    await h.close();
  }
});

test("the handler answers 405 with Allow for a wrong method, on every route", async () => {
  const h = await harness((peer) => codexLike(peer));
  try {
    const cases: [string, string, string][] = [
      ["GET", "/api/turns", "POST"],
      ["PUT", "/api/turns", "POST"],
      ["POST", "/healthz", "GET, HEAD"],
      ["DELETE", "/metrics", "GET, HEAD"],
    ];
    for (const [method, path, allow] of cases) {
      const response = await h.handler(
        new Request(`http://broker.test${path}`, {
          method,
          headers: { "x-internal-secret": SECRET },
        }),
      );
      assert.equal(response.status, 405, `${method} ${path}`);
      assert.equal(response.headers.get("allow"), allow);
      assert.equal((await errorOf(response)).code, "methodNotAllowed");
    }
    assertNothingReachedCodex(h);
  } finally {
    await h.close();
  }
});

test("POST /api/turns answers 415 unless the Content-Type is application/json", async () => {
  const h = await harness((peer) => codexLike(peer));
  try {
    for (const type of [undefined, "text/plain", "application/jsonx", "multipart/form-data"]) {
      const headers: Record<string, string> = { "x-internal-secret": SECRET };
      if (type) headers["content-type"] = type;
      const response = await h.handler(
        new Request(URL_TURNS, {
          method: "POST",
          headers,
          body: JSON.stringify({ workspaceId: "ws-1", params: { input } }),
        }),
      );
      assert.equal(response.status, 415, `content-type ${type}`);
      assert.equal((await errorOf(response)).code, "unsupportedMediaType");
    }
    assertNothingReachedCodex(h);
  } finally {
    await h.close();
  }
});

test("POST /api/turns answers 413 with Connection: close on a Content-Length over maxBodyBytes without reading the body", async () => {
  const h = await harness((peer) => codexLike(peer), { handler: { maxBodyBytes: 1024 } });
  try {
    const request = post("x".repeat(2048), { headers: { "content-length": "2048" } });
    const response = await h.handler(request);
    assert.equal(response.status, 413);
    assert.equal(response.headers.get("connection"), "close", "the rest of the body is not read");
    assert.equal((await errorOf(response)).code, "bodyTooLarge");
    assert.equal(request.bodyUsed, false, "the body was not read");
    assertNothingReachedCodex(h);
  } finally {
    await h.close();
  }
});

test("POST /api/turns answers 413 with Connection: close on an endless body without Content-Length, and stops reading it", async () => {
  const h = await harness((peer) => codexLike(peer), { handler: { maxBodyBytes: 4096 } });
  try {
    let pulled = 0;
    const body = new ReadableStream<Uint8Array>({
      pull(controller) {
        pulled++;
        controller.enqueue(new Uint8Array(1000).fill(0x20));
      },
    });
    const request = new Request(URL_TURNS, {
      method: "POST",
      headers: { "content-type": "application/json", "x-internal-secret": SECRET },
      body,
      duplex: "half",
    } as RequestInit);
    assert.equal(request.headers.get("content-length"), null);
    // Endless: a handler that kept reading would never answer.
    const response = await within(h.handler(request), 5_000, "the 413 answer");
    assert.equal(response.status, 413);
    assert.equal(response.headers.get("connection"), "close", "the rest of the body is not read");
    assert.equal((await errorOf(response)).code, "bodyTooLarge");
    assert.ok(pulled < 10, `read about the limit only (${pulled} chunks of 1000 bytes)`);
    assertNothingReachedCodex(h);
  } finally {
    await h.close();
  }
});

test("POST /api/turns checks in order: secret, then content type, then size, then JSON", async () => {
  const h = await harness((peer) => codexLike(peer), { handler: { maxBodyBytes: 16 } });
  try {
    const big = { "content-length": "99" };
    const cases: [Record<string, string>, number][] = [
      [{ "x-internal-secret": "wrong", "content-type": "text/plain", ...big }, 401],
      [{ "content-type": "text/plain", ...big }, 415],
      [big, 413],
      [{}, 400],
    ];
    for (const [headers, status] of cases) {
      const response = await h.handler(post("{not json", { headers }));
      assert.equal(response.status, status, JSON.stringify(headers));
      await response.body?.cancel();
    }
    assertNothingReachedCodex(h);
  } finally {
    await h.close();
  }
});

// --- successful turns -------------------------------------------------------------------

test("POST /api/turns without threadId starts a thread with threadParams and answers the turn", async () => {
  const h = await harness((peer) => codexLike(peer));
  try {
    const response = await h.handler(post(
      {
        workspaceId: "ws-1",
        threadId: null,
        params: { input },
        threadParams: { cwd: "/srv/ws-1" },
      },
      { headers: { "content-type": "application/json; charset=utf-8" } },
    ));
    assert.equal(response.status, 200);
    assert.equal(response.headers.get("content-type"), "application/json");
    const body = await response.json();
    assert.equal(body.threadId, "thr-1");
    assert.equal(body.turn.id, "turn-1");
    assert.equal(body.turn.status, "completed");
    assert.equal(body.turn.itemsView, "full");
    assert.deepEqual(body.turn.items.map((item: { type: string }) => item.type), [
      "userMessage",
      "agentMessage",
    ]);
    const sent = h.server.peers[0]!.received.filter((m) => m.id !== undefined);
    assert.deepEqual(sent.map((m) => m.method), ["initialize", "thread/start", "turn/start"]);
    assert.deepEqual(sent[1]!.params, { cwd: "/srv/ws-1" });
    assert.deepEqual(sent[2]!.params, { input, threadId: "thr-1" });
    const entry = h.logs.at(-1)!;
    assert.equal(typeof entry.durationMs, "number");
    assert.deepEqual({ ...entry, durationMs: 0 }, {
      msg: "turn",
      workspaceId: "ws-1",
      threadId: "thr-1",
      turnId: "turn-1",
      status: "completed",
      outcome: "completed",
      durationMs: 0,
      stream: false,
      principal: "operator",
    });
  } finally {
    await h.close();
  }
});

test("the handler answers 431 headersTooLarge with Connection: close to a head over 16 KiB on any route, unless checkHeadSize is off", async () => {
  const big = { "x-padding": "a".repeat(17 * 1024) };
  const h = await harness(() => {});
  const off = await harness(() => {}, { handler: { checkHeadSize: false } });
  try {
    for (
      const request of [
        new Request("http://broker.test/healthz", { headers: big }),
        post({}, { headers: big }),
      ]
    ) {
      const response = await h.handler(request);
      assert.equal(response.status, 431);
      assert.equal(response.headers.get("connection"), "close");
      assert.equal((await errorOf(response)).code, "headersTooLarge");
    }
    const small = await h.handler(
      new Request("http://broker.test/healthz", {
        headers: { "x-padding": "a".repeat(15 * 1024) },
      }),
    );
    assert.equal(small.status, 200);
    // A server that caps heads itself never hands such a request over; the handler serves it.
    const unchecked = await off.handler(
      new Request("http://broker.test/healthz", { headers: big }),
    );
    assert.equal(unchecked.status, 200);
    assertNothingReachedCodex(h);
  } finally {
    await h.close();
    await off.close();
  }
});

test("createTurnsHandler() answers every JSON answer through jsonResponse, refusals included", async () => {
  const made: { body: string; status: number; headers: Record<string, string> }[] = [];
  class OwnResponse extends Response {}
  const h = await harness((peer) => codexLike(peer), {
    handler: {
      brokerId: "broker-a",
      jsonResponse: (body, init) => {
        made.push({ body, status: init.status, headers: { ...init.headers } });
        return new OwnResponse(body, init);
      },
    },
  });
  try {
    const turn = await h.handler(post({ workspaceId: "ws-1", params: { input } }));
    assert.ok(turn instanceof OwnResponse);
    assert.equal(turn.status, 200);
    assert.equal(turn.headers.get("x-broker-id"), "broker-a");
    const body = await turn.json();
    assert.equal(body.turn.id, "turn-1");
    assert.deepEqual(made[0], {
      body: JSON.stringify(body),
      status: 200,
      // Named from the start, not added to the made answer afterwards.
      headers: { "content-type": "application/json", "x-broker-id": "broker-a" },
    });
    const refused = await h.handler(new Request(URL_TURNS, { method: "DELETE" }));
    assert.ok(refused instanceof OwnResponse);
    assert.equal(refused.status, 405);
    assert.equal(made.length, 2);
    assert.equal(made[1]!.status, 405);
    assert.equal(JSON.parse(made[1]!.body).error.code, "methodNotAllowed");
    assert.equal(made[1]!.headers.allow, "POST");
    assert.equal(made[1]!.headers["content-type"], "application/json");
  } finally {
    await h.close();
  }
});

test("POST /api/turns with a threadId resumes that thread and runs the turn on it", async () => {
  const h = await harness((peer) => codexLike(peer));
  try {
    const response = await h.handler(
      post({ workspaceId: "ws-1", threadId: "thr-9", params: { input }, timeoutMs: 10_000 }),
    );
    assert.equal(response.status, 200);
    const body = await response.json();
    assert.equal(body.threadId, "thr-9");
    assert.equal(body.turn.status, "completed");
    const sent = h.server.peers[0]!.received.filter((m) => m.id !== undefined);
    assert.deepEqual(sent.map((m) => m.method), ["initialize", "thread/resume", "turn/start"]);
    assert.deepEqual(sent[1]!.params, { threadId: "thr-9" });
  } finally {
    await h.close();
  }
});

// --- transport failures -----------------------------------------------------------------

test("POST /api/turns answers transport brokerTimeout when the turn misses its timeoutMs", async () => {
  const h = await harness((peer) => codexLike(peer, { hang: true }));
  try {
    // Dialed beforehand, so that the deadline passes in the turn and not while dialing.
    await h.pool.get("ws-1");
    const response = await h.handler(
      post({ workspaceId: "ws-1", params: { input }, timeoutMs: 300 }),
    );
    assert.equal(response.status, 200);
    const body = await response.json();
    assert.equal(body.threadId, "thr-1");
    assert.equal(body.transport.code, "brokerTimeout");
    assert.match(body.transport.message, /turn-1.*did not complete in time/);
    assert.equal(h.logs.at(-1)!.outcome, "brokerTimeout");
    assert.equal(h.logs.at(-1)!.turnId, "turn-1");
  } finally {
    await h.close();
  }
});

test("POST /api/turns answers transport subprocessCrash with threadId null when the resolver fails", async () => {
  const h = await harness((peer) => codexLike(peer), {
    resolver: () => Promise.reject(new Error("spawn codex: exit code 3")),
  });
  try {
    const response = await h.handler(post({ workspaceId: "ws-1", params: { input } }));
    assert.equal(response.status, 200);
    const body = await response.json();
    assert.equal(body.threadId, null);
    assert.equal(body.transport.code, "subprocessCrash");
    assert.match(body.transport.message, /ws-1.*exit code 3/);
    assert.equal(h.server.peers.length, 0);
  } finally {
    await h.close();
  }
});

test("POST /api/turns answers transport wsDisconnect with the thread when the socket dies mid-turn", async () => {
  const h = await harness(async (peer) => {
    const start = await peer.expect("thread/start");
    peer.reply(start, threadResult("thr-1"));
    await peer.expect("turn/start");
    peer.terminate();
  });
  try {
    const response = await h.handler(post({ workspaceId: "ws-1", params: { input } }));
    assert.equal(response.status, 200);
    const body = await response.json();
    assert.equal(body.threadId, "thr-1");
    assert.equal(body.transport.code, "wsDisconnect");
    assert.equal(response.headers.get("retry-after"), null);
  } finally {
    await h.close();
  }
});

test("POST /api/turns answers transport subprocessCrash when the app-server died mid-turn", async () => {
  const server = await startFakeAppServer(async (peer) => {
    const start = await peer.expect("thread/start");
    peer.reply(start, threadResult("thr-1"));
    await peer.expect("turn/start");
    peer.terminate();
  });
  const asked: string[] = [];
  const pool = new Pool({
    resolve: () => Promise.resolve(server.url),
    // What the supervisor says once the process behind the socket has exited.
    crashed: (workspaceId) => {
      asked.push(workspaceId);
      return Promise.resolve(true);
    },
  });
  try {
    const handler = createTurnsHandler(pool, { secret: SECRET });
    const response = await handler(post({ workspaceId: "ws-1", params: { input } }));
    const body = await response.json();
    assert.equal(body.threadId, "thr-1");
    assert.equal(body.transport.code, "subprocessCrash");
    assert.deepEqual(asked, ["ws-1"]);
  } finally {
    await pool.close();
    await server.close();
  }
});

test("POST /api/turns answers transport rpcError with the JSON-RPC code and data", async () => {
  const h = await harness(async (peer) => {
    const start = await peer.expect("thread/start");
    peer.reply(start, threadResult("thr-1"));
    const turn = await peer.expect("turn/start");
    peer.replyError(turn, -32602, "Invalid input", { field: "input" });
  });
  try {
    const response = await h.handler(post({ workspaceId: "ws-1", params: { input } }));
    assert.equal(response.status, 200);
    assert.deepEqual(await response.json(), {
      threadId: "thr-1",
      transport: {
        code: "rpcError",
        message: "Invalid input",
        data: { code: -32602, data: { field: "input" } },
      },
    });
  } finally {
    await h.close();
  }
});

test("POST /api/turns answers transport overloaded with Retry-After when codex stays at -32001 and Conn gives up retrying", async () => {
  let attempts = 0;
  const h = await harness((peer) => {
    peer.handle((m) => {
      if (m.method !== "turn/start") return false;
      attempts++;
      peer.replyError(m as Req, -32001, "Server overloaded; retry later");
      return true;
    });
    codexLike(peer);
  }, {
    // Conn retries -32001 until the next backoff would pass the deadline. With fast retries
    // (a few ms) the deadline often fires during the last round trip instead, which is then
    // a brokerTimeout; a first backoff far beyond the deadline makes the give-up certain.
    pool: { dial: { retry: { initialDelayMs: 1e12, maxDelayMs: 1e12 } } },
  });
  try {
    const response = await h.handler(
      post({ workspaceId: "ws-1", params: { input }, timeoutMs: 5_000 }),
    );
    assert.equal(response.status, 200);
    assert.equal(response.headers.get("retry-after"), "1");
    const body = await response.json();
    assert.equal(body.threadId, "thr-1");
    assert.equal(body.transport.code, "overloaded");
    assert.deepEqual(body.transport.data, { code: -32001, data: null });
    assert.ok(attempts >= 1);
  } finally {
    await h.close();
  }
});

test("POST /api/turns answers 503 atCapacity with Retry-After when every workspace the pool may run is busy", async () => {
  const codex = hangingCodex();
  const h = await harness(codex.script, { pool: { maxConnections: 1 } });
  const busy = new AbortController();
  try {
    const first = h.handler(
      post({ workspaceId: "ws-a", params: { input } }, { signal: busy.signal }),
    );
    await codex.started;
    const response = await h.handler(post({ workspaceId: "ws-b", params: { input } }));
    assert.equal(response.status, 503);
    assert.equal(response.headers.get("retry-after"), "1");
    const body = await response.json();
    assert.equal(body.error.code, "atCapacity");
    assert.match(body.error.message, /all 1 workspaces are busy/);
    busy.abort();
    await first;
  } finally {
    await h.close();
  }
});

test("POST /api/turns answers 503 unavailable with Retry-After once the pool is closed", async () => {
  const h = await harness((peer) => codexLike(peer));
  try {
    await h.pool.close();
    const response = await h.handler(post({ workspaceId: "ws-1", params: { input } }));
    assert.equal(response.status, 503);
    assert.equal(response.headers.get("retry-after"), "1");
    assert.equal((await errorOf(response)).code, "unavailable");
  } finally {
    await h.close();
  }
});

// --- streaming --------------------------------------------------------------------------

test("POST /api/turns with Accept: text/event-stream streams thread, the thread's notifications, heartbeats, then the JSON answer as result", async () => {
  let sawPing!: () => void;
  const pinged = new Promise<void>((resolve) => (sawPing = resolve));
  const h = await harness((peer) => fixedTurn(peer, () => pinged), {
    handler: { heartbeatMs: 10 },
  });
  const intervals = trackIntervals();
  try {
    const body = { workspaceId: "ws-1", params: { input } };
    const response = await h.handler(
      post(body, { headers: { accept: "application/json, text/event-stream" } }),
    );
    assert.equal(response.status, 200);
    assert.equal(response.headers.get("content-type"), "text/event-stream");
    assert.equal(response.headers.get("cache-control"), "no-cache");
    const events = await within(
      readEvents(response, (event) => {
        if (event.event === ":") sawPing();
      }),
      5_000,
      "the event stream to end",
    );
    assert.ok(events.some((e) => e.event === ":" && e.data === "ping"), "a heartbeat was sent");
    const named = events.filter((e) => e.event !== ":");
    assert.deepEqual(named[0], { event: "thread", data: { threadId: "thr-1" } });
    assert.deepEqual(named.slice(1, -1).map((e) => e.event), [
      "turn/started",
      "item/agentMessage/delta",
      "item/completed",
      "turn/completed",
    ]);
    assert.ok(
      named.slice(1, -1).every((e) => (e.data as { threadId: string }).threadId === "thr-1"),
    );
    const result = named.at(-1)!;
    assert.equal(result.event, "result");

    // The same turn, answered as JSON: the stream's result is exactly that body.
    const plain = await h.handler(post(body));
    assert.deepEqual(result.data, await plain.json());
    assert.equal(h.logs.at(-2)!.stream, true);
    await h.close();
    assert.equal(intervals.live, 0, "the heartbeat stopped with the stream");
  } finally {
    intervals.restore();
    await h.close();
  }
});

test("POST /api/turns streams only its own turn's events when it waited behind another turn on the thread", async () => {
  const h = await harness(async (peer) => {
    const first = await peer.expect("turn/start");
    peer.reply(first, { turn: turnObject("u1", "inProgress") });
    const second = peer.expect("turn/start");
    peer.notify("item/completed", {
      completedAtMs: 1,
      threadId: "t1",
      turnId: "u1",
      item: { type: "agentMessage", id: "a1", text: "first" },
    });
    peer.notify("turn/completed", { threadId: "t1", turn: turnObject("u1") });
    const start = await second;
    peer.notify("turn/started", { threadId: "t1", turn: turnObject("u2", "inProgress") });
    peer.reply(start, { turn: turnObject("u2", "inProgress") });
    peer.notify("item/completed", {
      completedAtMs: 1,
      threadId: "t1",
      turnId: "u2",
      item: { type: "agentMessage", id: "a2", text: "second" },
    });
    peer.notify("turn/completed", { threadId: "t1", turn: turnObject("u2") });
  });
  try {
    const plain = h.handler(post({ workspaceId: "ws-1", threadId: "t1", params: { input } }));
    // The streaming request must queue behind the first turn, so it waits for that turn/start.
    while (!h.server.peers[0]?.received.some((m) => m.method === "turn/start")) {
      await new Promise((resolve) => setTimeout(resolve, 2));
    }
    const streamed = h.handler(
      post({ workspaceId: "ws-1", threadId: "t1", params: { input } }, {
        headers: { accept: "text/event-stream" },
      }),
    );
    const events = await within(readEvents(await streamed), 5_000, "the event stream to end");
    const named = events.filter((e) => e.event !== ":");
    assert.deepEqual(named.map((e) => e.event), [
      "thread",
      "turn/started",
      "item/completed",
      "turn/completed",
      "result",
    ]);
    for (const event of named.slice(1, -1)) {
      const data = event.data as { turnId?: string; turn?: { id: string } };
      assert.equal(data.turnId ?? data.turn?.id, "u2");
    }
    assert.equal(((await (await plain).json()) as { turn: { id: string } }).turn.id, "u1");
  } finally {
    await h.close();
  }
});

test("POST /api/turns streams a transport failure as the result event", async () => {
  const h = await harness((peer) => codexLike(peer, { hang: true }));
  try {
    await h.pool.get("ws-1"); // so that the deadline passes in the turn, not while dialing
    const response = await h.handler(post(
      { workspaceId: "ws-1", params: { input }, timeoutMs: 300 },
      { headers: { accept: "text/event-stream" } },
    ));
    const named = (await within(readEvents(response), 5_000, "the stream to end"))
      .filter((e) => e.event !== ":");
    assert.equal(named[0]!.event, "thread");
    const result = named.at(-1)!;
    assert.equal(result.event, "result");
    assert.equal((result.data as { transport: { code: string } }).transport.code, "brokerTimeout");
  } finally {
    await h.close();
  }
});

test("POST /api/turns answers a bad streaming request as a plain JSON error", async () => {
  const h = await harness((peer) => codexLike(peer));
  try {
    const response = await h.handler(
      post({ workspaceId: "", params: { input } }, { headers: { accept: "text/event-stream" } }),
    );
    assert.equal(response.status, 400);
    assert.equal((await errorOf(response)).code, "invalidWorkspaceId");
    assertNothingReachedCodex(h);
  } finally {
    await h.close();
  }
});

// --- a client that does not read --------------------------------------------------------

/**
 * A codex whose first turn floods `count` deltas of `size` bytes and then hangs until it is
 * interrupted; later turns complete at once.
 */
function floodingCodex(count: number, size: number) {
  const interrupted = Promise.withResolvers<Message>();
  return {
    interrupted: () => within(interrupted.promise, 5_000, "turn/interrupt"),
    script(peer: FakePeer) {
      let turns = 0;
      peer.handle((m) => {
        if (m.method === "thread/start") {
          peer.reply(m as Req, threadResult("thr-1"));
          return true;
        }
        if (m.method === "turn/interrupt") {
          interrupted.resolve(m);
          peer.reply(m as Req, {});
          peer.notify("turn/completed", {
            threadId: m.params.threadId,
            turn: turnObject(m.params.turnId, "interrupted"),
          });
          return true;
        }
        if (m.method !== "turn/start") return false;
        const threadId = m.params.threadId as string;
        const turnId = `turn-${++turns}`;
        peer.reply(m as Req, { turn: turnObject(turnId, "inProgress") });
        peer.notify("turn/started", { threadId, turn: turnObject(turnId, "inProgress") });
        if (turns === 1) {
          const delta = "x".repeat(size);
          for (let i = 0; i < count; i++) {
            peer.notify("item/agentMessage/delta", { threadId, turnId, itemId: "m1", delta });
          }
        } else {
          const item = agentMessage(`msg-${turnId}`, "after the flood");
          peer.notify("item/completed", { completedAtMs: 1, threadId, turnId, item });
          peer.notify("turn/completed", {
            threadId,
            turn: turnObject(turnId, "completed", [item]),
          });
        }
        return true;
      });
    },
  };
}

test("a streaming client that does not read while codex floods is cut off at maxStreamBufferBytes with a slowReader result, its turn interrupted and counted, and the thread serves its next turn", async () => {
  const budget = 64 * 1024;
  const codex = floodingCodex(3_000, 1024);
  const h = await harness(codex.script, { handler: { maxStreamBufferBytes: budget } });
  try {
    const response = await h.handler(
      post({ workspaceId: "ws-1", params: { input } }, {
        headers: { accept: "text/event-stream" },
      }),
    );
    // Nobody reads the body while codex floods.
    const sent = await codex.interrupted();
    assert.deepEqual(sent.params, { threadId: "thr-1", turnId: "turn-1" });
    const entry = await within(h.logged((e) => e.msg === "turn"), 5_000, "the turn's log entry");
    assert.equal(entry.outcome, "slowReader");

    // Read afterwards: what was held, then the reason it ended.
    const bytes = new Uint8Array(await response.arrayBuffer());
    assert.ok(bytes.byteLength < budget + 4096, `held ${bytes.byteLength} bytes`);
    const events = await readEvents(new Response(bytes));
    const named = events.filter((e) => e.event !== ":");
    assert.equal(named[0]!.event, "thread");
    const deltas = named.filter((e) => e.event === "item/agentMessage/delta").length;
    assert.ok(deltas > 10 && deltas < 3_000, `${deltas} deltas were streamed`);
    const last = named.at(-1)!;
    assert.equal(last.event, "result");
    const error = (last.data as { error: { code: string; message: string } }).error;
    assert.equal(error.code, "slowReader");
    assert.match(error.message, /fell 65536 bytes behind/);

    const metrics = await (await h.handler(new Request("http://broker.test/metrics"))).text();
    assert.ok(metrics.split("\n").includes("codex_broker_slow_readers_total 1"), metrics);
    assert.ok(metrics.includes('codex_broker_turns_total{outcome="slowReader"} 1'), metrics);

    const next = await h.handler(
      post({ workspaceId: "ws-1", threadId: "thr-1", params: { input }, timeoutMs: 5_000 }),
    );
    const body = await next.json();
    assert.equal(body.turn.status, "completed");
    assert.equal(body.turn.items.at(-1).text, "after the flood");
  } finally {
    await h.close();
  }
});

test("heartbeats do not pile up for a streaming client that does not read", async () => {
  const codex = hangingCodex();
  const h = await harness(codex.script, { handler: { heartbeatMs: 10 } });
  try {
    const controller = new AbortController();
    const response = await h.handler(
      post({ workspaceId: "ws-1", params: { input } }, {
        headers: { accept: "text/event-stream" },
        signal: controller.signal,
      }),
    );
    await codex.started;
    // Twenty heartbeat intervals pass while the client reads nothing.
    await new Promise((resolve) => setTimeout(resolve, 200));
    const reader = response.body!.getReader();
    const decoder = new TextDecoder();
    let held = "";
    // What the stream holds comes out of read() at once; a new chunk needs a timer to fire.
    for (;;) {
      let timer: ReturnType<typeof setTimeout> | undefined;
      const late = new Promise<undefined>((resolve) =>
        timer = setTimeout(() => resolve(undefined), 0)
      );
      const chunk = await Promise.race([reader.read(), late]);
      clearTimeout(timer);
      if (chunk === undefined || chunk.done) break;
      held += decoder.decode(chunk.value, { stream: true });
    }
    assert.match(held, /event: thread\n/);
    const pings = held.split(": ping\n\n").length - 1;
    // One ping may wait for the client, and another may fire while the loop above reads on
    // a busy machine; twenty would be the old pile-up.
    assert.ok(pings <= 2, `${pings} heartbeats were held for the client`);
    controller.abort();
    await reader.cancel();
    await codex.interrupted();
  } finally {
    await h.close();
  }
});

test("a heartbeatMs past 2^31 ms is capped, not turned into a heartbeat every millisecond", async () => {
  const codex = hangingCodex();
  const h = await harness(codex.script, { handler: { heartbeatMs: 3_000_000_000 } });
  try {
    const response = await h.handler(
      post({ workspaceId: "ws-1", params: { input } }, {
        headers: { accept: "text/event-stream" },
      }),
    );
    const reader = response.body!.getReader();
    const decoder = new TextDecoder();
    let seen = "";
    while (!seen.includes("event: turn/started\n")) {
      seen += decoder.decode((await reader.read()).value, { stream: true });
    }
    // The turn hangs now: within 50 ms only a heartbeat could come.
    let timer: ReturnType<typeof setTimeout> | undefined;
    const quiet = new Promise<"quiet">((resolve) => timer = setTimeout(() => resolve("quiet"), 50));
    const next = await Promise.race([reader.read(), quiet]);
    clearTimeout(timer);
    if (next !== "quiet") seen += decoder.decode(next.value);
    assert.ok(!seen.includes(": ping"), `a heartbeat was sent:\n${seen}`);
    await reader.cancel();
    await codex.interrupted();
  } finally {
    await h.close();
  }
});

// --- the client goes away ---------------------------------------------------------------

test("a turn aborted with a PoolClosedError (the server's grace period ended) answers 503 unavailable, not 499", async () => {
  const codex = hangingCodex();
  const h = await harness(codex.script);
  try {
    const controller = new AbortController();
    const answer = h.handler(
      post({ workspaceId: "ws-1", params: { input } }, { signal: controller.signal }),
    );
    await codex.started;
    controller.abort(new PoolClosedError("Cannot run turn: broker is shutting down"));
    const response = await answer;
    assert.equal(response.status, 503);
    assert.equal(response.headers.get("retry-after"), "1");
    assert.equal((await errorOf(response)).code, "unavailable");
    assert.equal(h.logs.at(-1)!.outcome, "unavailable");
    await codex.interrupted();
  } finally {
    await h.close();
  }
});

test("a client that aborts a JSON request gets its turn interrupted (turn/interrupt reaches codex)", async () => {
  const codex = hangingCodex();
  const h = await harness(codex.script);
  try {
    const controller = new AbortController();
    const answer = h.handler(
      post({ workspaceId: "ws-1", params: { input } }, { signal: controller.signal }),
    );
    await codex.started;
    controller.abort();
    const sent = await codex.interrupted();
    assert.deepEqual(sent.params, { threadId: "thr-1", turnId: "turn-1" });
    const response = await answer;
    assert.equal(response.status, 499);
    await response.body?.cancel();
    assert.equal(h.logs.at(-1)!.outcome, "cancelled");
  } finally {
    await h.close();
  }
});

test("a client that cancels the event stream gets its turn interrupted and the heartbeat stopped", async () => {
  const codex = hangingCodex();
  const h = await harness(codex.script, { handler: { heartbeatMs: 5 } });
  const intervals = trackIntervals();
  try {
    const response = await h.handler(
      post({ workspaceId: "ws-1", params: { input } }, {
        headers: { accept: "text/event-stream" },
      }),
    );
    await codex.started;
    const reader = response.body!.getReader();
    const decoder = new TextDecoder();
    let seen = "";
    while (!seen.includes("event: thread\n")) {
      seen += decoder.decode((await reader.read()).value, { stream: true });
    }
    await reader.cancel();
    const sent = await codex.interrupted();
    assert.deepEqual(sent.params, { threadId: "thr-1", turnId: "turn-1" });
    const entry = await within(h.logged((e) => e.msg === "turn"), 5_000, "the turn's log entry");
    assert.equal(entry.outcome, "cancelled");
    assert.equal(entry.stream, true);
    await h.close();
    assert.equal(intervals.live, 0, "the heartbeat stopped with the stream");
  } finally {
    intervals.restore();
    await h.close();
  }
});

// --- the server shuts down --------------------------------------------------------------

test("shutdownSignal interrupts a running JSON turn and answers 503 unavailable with Retry-After", async () => {
  const codex = hangingCodex();
  const shutdown = new AbortController();
  const h = await harness(codex.script, { handler: { shutdownSignal: shutdown.signal } });
  try {
    const answer = h.handler(post({ workspaceId: "ws-1", params: { input } }));
    await codex.started;
    shutdown.abort(new PoolClosedError("Cannot run turn: broker is shutting down"));
    const sent = await codex.interrupted();
    assert.deepEqual(sent.params, { threadId: "thr-1", turnId: "turn-1" });
    const response = await within(answer, 5_000, "the answer");
    assert.equal(response.status, 503);
    assert.equal(response.headers.get("retry-after"), "1");
    assert.equal((await errorOf(response)).code, "unavailable");
    assert.equal(h.logs.at(-1)!.outcome, "unavailable");
  } finally {
    await h.close();
  }
});

test("shutdownSignal interrupts a streamed turn, whose stream ends with an unavailable result", async () => {
  const codex = hangingCodex();
  const shutdown = new AbortController();
  const h = await harness(codex.script, { handler: { shutdownSignal: shutdown.signal } });
  try {
    const response = await h.handler(
      post({ workspaceId: "ws-1", params: { input } }, {
        headers: { accept: "text/event-stream" },
      }),
    );
    await codex.started;
    shutdown.abort(new PoolClosedError("Cannot run turn: broker is shutting down"));
    await codex.interrupted();
    const named = (await within(readEvents(response), 5_000, "the stream to end"))
      .filter((e) => e.event !== ":");
    const result = named.at(-1)!;
    assert.equal(result.event, "result");
    assert.equal((result.data as { error: { code: string } }).error.code, "unavailable");
  } finally {
    await h.close();
  }
});

test("a request that arrives after shutdownSignal aborted is answered 503 at once", async () => {
  const shutdown = new AbortController();
  shutdown.abort(new PoolClosedError("Cannot run turn: broker is shutting down"));
  const h = await harness((peer) => codexLike(peer), {
    handler: { shutdownSignal: shutdown.signal },
  });
  try {
    const response = await h.handler(post({ workspaceId: "ws-1", params: { input } }));
    assert.equal(response.status, 503);
    assert.equal((await errorOf(response)).code, "unavailable");
    assert.ok(
      !(h.server.peers[0]?.received ?? []).some((m) => m.method === "turn/start"),
      "no turn was started",
    );
  } finally {
    await h.close();
  }
});

test("the handler listens to shutdownSignal once, for every turn: 1,000 refused POSTs and finished turns add no listener and build no AbortSignal.any on it", async () => {
  const shutdown = new AbortController();
  const signal = shutdown.signal;
  let live = 0;
  let added = 0;
  const add = signal.addEventListener.bind(signal);
  const remove = signal.removeEventListener.bind(signal);
  signal.addEventListener = ((...args: Parameters<AbortSignal["addEventListener"]>) => {
    added++;
    live++;
    add(...args);
  }) as AbortSignal["addEventListener"];
  signal.removeEventListener = ((...args: Parameters<AbortSignal["removeEventListener"]>) => {
    live--;
    remove(...args);
  }) as AbortSignal["removeEventListener"];
  const any = AbortSignal.any;
  let dependents = 0;
  AbortSignal.any = (signals: Iterable<AbortSignal>) => {
    const list = [...signals];
    if (list.includes(signal)) dependents++;
    return any.call(AbortSignal, list);
  };
  const h = await harness((peer) => codexLike(peer), { handler: { shutdownSignal: signal } });
  try {
    for (let i = 0; i < 1_000; i++) {
      const response = await h.handler(
        post({ workspaceId: "ws-1", params: { input } }, {
          headers: { "x-internal-secret": "wrong" },
        }),
      );
      assert.equal(response.status, 401);
      await response.body?.cancel();
    }
    assert.equal(added, 1, "one listener, the handler's own");
    assert.equal(live, 1);
    for (let i = 0; i < 3; i++) {
      const plain = await h.handler(post({ workspaceId: "ws-1", params: { input } }));
      assert.equal((await plain.json()).turn.status, "completed");
      const streamed = await h.handler(
        post({ workspaceId: "ws-1", params: { input } }, {
          headers: { accept: "text/event-stream" },
        }),
      );
      assert.equal((await readEvents(streamed)).at(-1)!.event, "result");
    }
    assert.equal(added, 1, "no listener per turn");
    assert.equal(live, 1);
    assert.equal(dependents, 0, "no AbortSignal.any depends on the shutdown signal");
  } finally {
    AbortSignal.any = any;
    await h.close();
  }
});

test("onRequestEnd reports each request once: a refused or JSON answer as it returns, an event stream at its end", async () => {
  const codex = hangingCodex();
  const ended: string[] = [];
  const h = await harness(codex.script, {
    handler: { onRequestEnd: (request) => ended.push(new URL(request.url).pathname) },
  });
  try {
    await (await h.handler(new Request("http://broker.test/healthz"))).body?.cancel();
    await (await h.handler(post("{", { headers: { "x-internal-secret": "x" } }))).body?.cancel();
    assert.deepEqual(ended, ["/healthz", "/api/turns"]);
    const response = await h.handler(
      post({ workspaceId: "ws-1", params: { input } }, {
        headers: { accept: "text/event-stream" },
      }),
    );
    await codex.started;
    assert.equal(ended.length, 2, "a stream that goes on has not ended");
    await response.body!.cancel();
    assert.deepEqual(ended, ["/healthz", "/api/turns", "/api/turns"]);
    await codex.interrupted();
  } finally {
    await h.close();
  }
});

// --- operations -------------------------------------------------------------------------

test("GET /healthz answers status, workspaces and version without a secret", async () => {
  const h = await harness((peer) => codexLike(peer), { handler: { version: "9.9.9-test" } });
  try {
    const before = await h.handler(new Request("http://broker.test/healthz"));
    assert.equal(before.status, 200);
    assert.deepEqual(await before.json(), { status: "ok", workspaces: 0, version: "9.9.9-test" });
    await (await h.handler(post({ workspaceId: "ws-1", params: { input } }))).json();
    const after = await h.handler(new Request("http://broker.test/healthz"));
    assert.deepEqual(await after.json(), { status: "ok", workspaces: 1, version: "9.9.9-test" });
    const head = await h.handler(new Request("http://broker.test/healthz", { method: "HEAD" }));
    assert.equal(head.status, 200);
    assert.equal(head.body, null);
    await h.pool.close();
    const draining = await h.handler(new Request("http://broker.test/healthz"));
    assert.equal(draining.status, 503, "a closing pool tells load balancers to stop");
    assert.equal(((await draining.json()) as { status: string }).status, "draining");
  } finally {
    await h.close();
  }
});

test("GET /metrics answers Prometheus text with turns, durations, connections, server requests and bad requests", async () => {
  const h = await harness(async (peer) => {
    codexLike(peer);
    // One approval request, and one with a method that needs label escaping.
    await peer.request(
      "item/commandExecution/requestApproval",
      serverRequestParams("item/commandExecution/requestApproval"),
      "a1",
    );
    await peer.request('odd"\\method\n', {}, "a2", { unchecked: true });
  });
  try {
    for (let i = 0; i < 2; i++) {
      const response = await h.handler(post({ workspaceId: "ws-1", params: { input } }));
      assert.equal((await response.json()).turn.status, "completed");
    }
    await (await h.handler(post({ workspaceId: "ws-1", params: { input } }, {
      headers: { "x-internal-secret": "nope" },
    }))).body?.cancel();
    await within(h.server.scriptsDone(), 5_000, "the server requests to be answered");
    const response = await h.handler(new Request("http://broker.test/metrics"));
    assert.equal(response.status, 200);
    assert.equal(response.headers.get("content-type"), "text/plain; version=0.0.4; charset=utf-8");
    const text = await response.text();
    const lines = text.split("\n");
    for (
      const expected of [
        "# TYPE codex_broker_turns_total counter",
        'codex_broker_turns_total{outcome="completed"} 2',
        'codex_broker_turns_total{outcome="brokerTimeout"} 0',
        'codex_broker_turns_total{outcome="turnLost"} 0',
        "# TYPE codex_broker_turn_duration_seconds histogram",
        'codex_broker_turn_duration_seconds_bucket{le="+Inf"} 2',
        "codex_broker_turn_duration_seconds_count 2",
        "# TYPE codex_broker_open_connections gauge",
        "codex_broker_open_connections 1",
        "codex_broker_dials_total 1",
        "codex_broker_reaps_total 0",
        "codex_broker_evictions_total 0",
        "codex_broker_connection_closes_total 0",
        'codex_broker_server_requests_total{method="item/commandExecution/requestApproval",decision="decline"} 1',
        'codex_broker_server_requests_total{method="odd\\"\\\\method\\n",decision="error"} 1',
        'codex_broker_bad_requests_total{status="401"} 1',
      ]
    ) {
      assert.ok(lines.includes(expected), `missing line: ${expected}\n${text}`);
    }
    assert.ok(lines.some((line) => /^codex_broker_turn_duration_seconds_sum \d/.test(line)));
    const buckets = lines.filter((line) =>
      line.startsWith("codex_broker_turn_duration_seconds_bucket")
    )
      .map((line) => Number(line.split(" ")[1]));
    assert.deepEqual(buckets, [...buckets].sort((a, b) => a - b), "buckets are cumulative");
    assert.ok(text.endsWith("\n"));
  } finally {
    await h.close();
  }
});

test("createTurnsHandler() refuses a missing secret and invalid limits", async () => {
  const pool = new Pool(() => Promise.resolve("ws://127.0.0.1:1"));
  try {
    assert.throws(() => createTurnsHandler(pool, {} as TurnsHandlerOptions), TypeError);
    assert.throws(() => createTurnsHandler(pool, { secret: "" }), TypeError);
    assert.throws(() => createTurnsHandler(pool, { secret: "s", maxBodyBytes: 0 }), RangeError);
    assert.throws(() => createTurnsHandler(pool, { secret: "s", heartbeatMs: -1 }), RangeError);
    assert.throws(
      () => createTurnsHandler(pool, { secret: "s", defaultTimeoutMs: 10, maxTimeoutMs: 5 }),
      RangeError,
    );
  } finally {
    await pool.close();
  }
});

// --- the workspace in the path, X-Workspace-Id, X-Broker-Id -----------------------------

function postTo(
  path: string,
  body: unknown,
  init: { headers?: Record<string, string> } = {},
): Request {
  return new Request(`http://broker.test${path}`, {
    method: "POST",
    headers: { "content-type": "application/json", "x-internal-secret": SECRET, ...init.headers },
    body: JSON.stringify(body),
  });
}

test("POST /api/workspaces/{workspaceId}/turns runs a turn like /api/turns, on the path's workspace", async () => {
  const resolved: string[] = [];
  let url = "";
  const h = await harness((peer) => codexLike(peer), {
    resolver: (id) => (resolved.push(id), Promise.resolve(url)),
  });
  url = h.server.url;
  try {
    // The body may leave workspaceId out, repeat it, and X-Workspace-Id may repeat it too.
    const first = await h.handler(postTo("/api/workspaces/ws-7/turns", { params: { input } }));
    assert.equal(first.status, 200);
    const body = await first.json();
    assert.equal(body.threadId, "thr-1");
    assert.equal(body.turn.status, "completed");
    const second = await h.handler(postTo(
      "/api/workspaces/ws-7/turns",
      { workspaceId: "ws-7", threadId: body.threadId, params: { input } },
      { headers: { "x-workspace-id": "ws-7" } },
    ));
    assert.equal(second.status, 200);
    assert.equal((await second.json()).turn.status, "completed");
    assert.deepEqual(resolved, ["ws-7"], "the path's workspace was resolved, once");
    const sent = h.server.peers[0]!.received.filter((m) => m.id !== undefined);
    assert.deepEqual(sent.map((m) => m.method), [
      "initialize",
      "thread/start",
      "turn/start",
      "turn/start",
    ]);
    assert.equal(h.logs.at(-1)!.workspaceId, "ws-7");
  } finally {
    await h.close();
  }
});

test("POST /api/workspaces/{workspaceId}/turns answers 400 workspaceMismatch when the body names another workspace, and nothing reaches codex", async () => {
  const h = await harness((peer) => codexLike(peer));
  try {
    const response = await h.handler(
      postTo("/api/workspaces/ws-1/turns", { workspaceId: "ws-2", params: { input } }),
    );
    assert.equal(response.status, 400);
    const error = await errorOf(response);
    assert.equal(error.code, "workspaceMismatch");
    assert.match(error.message, /ws-2.*ws-1/);
    assertNothingReachedCodex(h);
  } finally {
    await h.close();
  }
});

test("an X-Workspace-Id header that differs from the workspace is answered 400 workspaceMismatch, and nothing reaches codex", async () => {
  const h = await harness((peer) => codexLike(peer));
  try {
    const cases: [string, Record<string, unknown>][] = [
      ["/api/turns", { workspaceId: "ws-1", params: { input } }],
      ["/api/workspaces/ws-1/turns", { params: { input } }],
      ["/api/workspaces/ws-1/turns", { workspaceId: "ws-1", params: { input } }],
    ];
    for (const [path, body] of cases) {
      const response = await h.handler(
        postTo(path, body, { headers: { "x-workspace-id": "ws-2" } }),
      );
      assert.equal(response.status, 400, path);
      const error = await errorOf(response);
      assert.equal(error.code, "workspaceMismatch", path);
      assert.match(error.message, /X-Workspace-Id/);
    }
    assertNothingReachedCodex(h);
  } finally {
    await h.close();
  }
});

test("POST /api/workspaces/{workspaceId}/turns answers 400 invalidWorkspaceId for a bad id in the path, and nothing reaches codex", async () => {
  const h = await harness((peer) => codexLike(peer));
  try {
    // A segment that is "." or ".." once decoded (%2E%2E) is a dot segment the URL parser
    // resolves before any router sees it, so ".." can reach the path only with more to it.
    const bad = [
      "..%2Fetc",
      "a%2Fb",
      "%2E%2E%2F",
      "..%5C",
      "ws%201",
      "x".repeat(129),
      "y".repeat(200),
    ];
    for (const segment of bad) {
      // The body names no workspace: the path alone is refused.
      const response = await h.handler(
        postTo(`/api/workspaces/${segment}/turns`, { params: { input } }),
      );
      assert.equal(response.status, 400, segment);
      const error = await errorOf(response);
      assert.equal(error.code, "invalidWorkspaceId", segment);
      assert.match(error.message, /path/);
    }
    assertNothingReachedCodex(h);
  } finally {
    await h.close();
  }
});

test("every answer carries X-Broker-Id when brokerId is set: turns, refusals, streams, health and metrics", async () => {
  const h = await harness((peer) => codexLike(peer), {
    handler: { brokerId: "broker-7", maxBodyBytes: 1024 },
  });
  try {
    const requests: [string, Request][] = [
      ["200 turn", post({ workspaceId: "ws-1", params: { input } })],
      ["200 turn by path", postTo("/api/workspaces/ws-1/turns", { params: { input } })],
      [
        "200 event stream",
        post({ workspaceId: "ws-1", params: { input } }, {
          headers: { accept: "text/event-stream" },
        }),
      ],
      ["400", post({ workspaceId: "../x", params: { input } })],
      [
        "401",
        post({ workspaceId: "ws-1", params: { input } }, {
          headers: { "x-internal-secret": "no" },
        }),
      ],
      ["404", new Request("http://broker.test/nowhere")],
      ["405", new Request("http://broker.test/api/turns")],
      ["413", post("x".repeat(2048))],
      ["415", post("{}", { headers: { "content-type": "text/plain" } })],
      ["healthz", new Request("http://broker.test/healthz")],
      ["HEAD healthz", new Request("http://broker.test/healthz", { method: "HEAD" })],
      ["metrics", new Request("http://broker.test/metrics")],
    ];
    for (const [what, request] of requests) {
      const response = await h.handler(request);
      assert.equal(response.headers.get("x-broker-id"), "broker-7", what);
      if (what === "200 event stream") {
        const events = await within(readEvents(response), 5_000, "the stream to end");
        assert.equal(events.at(-1)!.event, "result");
      } else {
        await response.body?.cancel();
      }
    }
    await h.pool.close();
    const unavailable = await h.handler(post({ workspaceId: "ws-1", params: { input } }));
    assert.equal(unavailable.status, 503);
    assert.equal(unavailable.headers.get("x-broker-id"), "broker-7", "503");
    await unavailable.body?.cancel();
  } finally {
    await h.close();
  }
});

test("without brokerId no answer carries X-Broker-Id", async () => {
  const h = await harness((peer) => codexLike(peer));
  try {
    const turn = await h.handler(post({ workspaceId: "ws-1", params: { input } }));
    assert.equal(turn.headers.get("x-broker-id"), null);
    await turn.body?.cancel();
    const health = await h.handler(new Request("http://broker.test/healthz"));
    assert.equal(health.headers.get("x-broker-id"), null);
    await health.body?.cancel();
  } finally {
    await h.close();
  }
});

// --- a shutdown keeps the thread ----------------------------------------------------------

test("a JSON turn cut off by shutdownSignal answers 503 unavailable with the threadId it created", async () => {
  const codex = hangingCodex();
  const shutdown = new AbortController();
  const h = await harness(codex.script, { handler: { shutdownSignal: shutdown.signal } });
  try {
    const answer = h.handler(post({ workspaceId: "ws-1", params: { input } }));
    await codex.started;
    shutdown.abort(new PoolClosedError("Cannot run turn: broker is shutting down"));
    const response = await within(answer, 5_000, "the answer");
    assert.equal(response.status, 503);
    assert.deepEqual(await response.json(), {
      error: { code: "unavailable", message: "Cannot run turn: broker is shutting down" },
      threadId: "thr-1",
    });
    assert.equal(h.logs.at(-1)!.threadId, "thr-1");
  } finally {
    await h.close();
  }
});

test("a streamed turn cut off by shutdownSignal ends with an unavailable result that names its threadId", async () => {
  const codex = hangingCodex();
  const shutdown = new AbortController();
  const h = await harness(codex.script, { handler: { shutdownSignal: shutdown.signal } });
  try {
    const response = await h.handler(
      post({ workspaceId: "ws-1", params: { input } }, {
        headers: { accept: "text/event-stream" },
      }),
    );
    await codex.started;
    shutdown.abort(new PoolClosedError("Cannot run turn: broker is shutting down"));
    const named = (await within(readEvents(response), 5_000, "the stream to end"))
      .filter((e) => e.event !== ":");
    assert.deepEqual(named.at(-1), {
      event: "result",
      data: {
        error: { code: "unavailable", message: "Cannot run turn: broker is shutting down" },
        threadId: "thr-1",
      },
    });
  } finally {
    await h.close();
  }
});

test("a request that arrives after shutdownSignal aborted answers 503 with threadId null, or the thread it asked for", async () => {
  const shutdown = new AbortController();
  shutdown.abort(new PoolClosedError("Cannot run turn: broker is shutting down"));
  const h = await harness((peer) => codexLike(peer), {
    handler: { shutdownSignal: shutdown.signal },
  });
  try {
    const fresh = await h.handler(post({ workspaceId: "ws-1", params: { input } }));
    assert.equal(fresh.status, 503);
    assert.equal((await fresh.json()).threadId, null);
    const resumed = await h.handler(
      post({ workspaceId: "ws-1", threadId: "thr-9", params: { input } }),
    );
    assert.equal(resumed.status, 503);
    assert.equal((await resumed.json()).threadId, "thr-9");
  } finally {
    await h.close();
  }
});

// --- the last error codex reported --------------------------------------------------------

/** A codex `error` notification for a turn. */
function errorNote(
  threadId: string,
  turnId: string,
  message: string,
  codexErrorInfo: unknown,
  willRetry: boolean,
) {
  return {
    error: { message, codexErrorInfo, additionalDetails: null },
    willRetry,
    threadId,
    turnId,
  };
}

test("POST /api/turns puts the last error codex reported for the turn into a brokerTimeout", async () => {
  const h = await harness((peer) => {
    // Ahead of codexLike, which answers turn/start (turn-1) and then leaves it hanging.
    peer.handle((m) => {
      if (m.method !== "turn/start") return false;
      const threadId = m.params.threadId;
      queueMicrotask(() => {
        const stream = { responseStreamDisconnected: { httpStatusCode: null } };
        peer.notify("error", errorNote(threadId, "turn-1", "Reconnecting... 1/5", stream, true));
        peer.notify("error", errorNote(threadId, "turn-1", "Reconnecting... 2/5", stream, true));
        // Another turn's error is not this turn's.
        peer.notify("error", errorNote(threadId, "turn-9", "not this turn", "other", false));
      });
      return false;
    });
    codexLike(peer, { hang: true });
  });
  try {
    await h.pool.get("ws-1");
    const response = await h.handler(
      post({ workspaceId: "ws-1", params: { input }, timeoutMs: 300 }),
    );
    const body = await response.json();
    assert.equal(body.transport.code, "brokerTimeout");
    assert.match(
      body.transport.message,
      /turn-1.*did not complete in time; codex last reported: Reconnecting\.\.\. 2\/5$/,
    );
    assert.deepEqual(body.transport.codexError, {
      code: "responseStreamDisconnected",
      message: "Reconnecting... 2/5",
      codexErrorInfo: { responseStreamDisconnected: { httpStatusCode: null } },
      httpStatusCode: null,
      additionalDetails: null,
      willRetry: true,
    });
    assert.equal(h.logs.at(-1)!.codexError, "responseStreamDisconnected");
  } finally {
    await h.close();
  }
});

test("POST /api/turns answers a brokerTimeout without codexError when codex reported none", async () => {
  const h = await harness((peer) => codexLike(peer, { hang: true }));
  try {
    await h.pool.get("ws-1");
    const response = await h.handler(
      post({ workspaceId: "ws-1", params: { input }, timeoutMs: 200 }),
    );
    const body = await response.json();
    assert.equal(body.transport.code, "brokerTimeout");
    assert.equal("codexError" in body.transport, false);
    assert.doesNotMatch(body.transport.message, /codex last reported/);
  } finally {
    await h.close();
  }
});

test("POST /api/turns answers a turn failed by the provider's 401 with codexError.code unauthorized", async () => {
  const info = { httpConnectionFailed: { httpStatusCode: 401 } };
  const message = "unexpected status 401 Unauthorized: bad key";
  const h = await harness((peer) => {
    peer.handle((m) => {
      if (m.method === "thread/start") {
        peer.reply(m as Req, threadResult("thr-1"));
        return true;
      }
      if (m.method !== "turn/start") return false;
      peer.reply(m as Req, { turn: turnObject("turn-1", "inProgress") });
      peer.notify("error", errorNote("thr-1", "turn-1", message, info, false));
      peer.notify("turn/completed", {
        threadId: "thr-1",
        turn: {
          ...turnObject("turn-1", "failed"),
          error: { message, codexErrorInfo: info, additionalDetails: null },
        },
      });
      return true;
    });
  });
  try {
    const body = await (await h.handler(post({ workspaceId: "ws-1", params: { input } }))).json();
    assert.equal(body.turn.status, "failed");
    assert.deepEqual(body.turn.error.codexErrorInfo, info, "codex's own error is kept as is");
    assert.deepEqual(body.codexError, {
      code: "unauthorized",
      message,
      codexErrorInfo: info,
      httpStatusCode: 401,
      additionalDetails: null,
      willRetry: null,
    });
    assert.equal(h.logs.at(-1)!.codexError, "unauthorized");
  } finally {
    await h.close();
  }
});

test("GET /healthz reports codex's credentials when the handler is given codexHealth", async () => {
  let credentials: "ok" | "missing" | "unknown" = "unknown";
  const h = await harness((peer) => codexLike(peer), {
    handler: { codexHealth: () => ({ credentials }) },
  });
  try {
    const get = async () =>
      await (await h.handler(new Request("http://broker.test/healthz"))).json();
    assert.deepEqual((await get()).codex, { credentials: "unknown" });
    credentials = "missing";
    assert.deepEqual((await get()).codex, { credentials: "missing" });
  } finally {
    await h.close();
  }
});

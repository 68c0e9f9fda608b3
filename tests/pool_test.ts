import { test } from "./_test.ts";
import { waitFor } from "./_wait.ts";
import assert from "node:assert/strict";
import {
  type Conn,
  ConnectionClosedError,
  Pool,
  PoolClosedError,
  PoolEvent,
  PoolFullError,
  WorkspaceUnavailableError,
} from "../mod.ts";
import { codexLike, type FakeAppServer, startFakeAppServer } from "./_fake_app_server.ts";

const input = [{ type: "text", text: "hi", text_elements: [] }];

/** A resolver over one fake server that counts calls and releases. */
function countingResolver(server: FakeAppServer) {
  const calls: string[] = [];
  const released: string[] = [];
  return {
    calls,
    released,
    resolve: async (workspaceId: string) => {
      calls.push(workspaceId);
      await new Promise((resolve) => setTimeout(resolve, 5));
      return server.url;
    },
    release: (workspaceId: string) => {
      released.push(workspaceId);
    },
  };
}

function events(pool: Pool): string[] {
  const seen: string[] = [];
  for (const type of ["dial", "reap", "evict", "close"]) {
    pool.addEventListener(type, (event) => {
      assert.ok(event instanceof PoolEvent);
      seen.push(`${type}:${event.workspaceId}`);
    });
  }
  return seen;
}

test("Pool.get() shares one resolve and one dial among 100 concurrent callers", async () => {
  const server = await startFakeAppServer((peer) => codexLike(peer));
  const resolver = countingResolver(server);
  const pool = new Pool(resolver);
  try {
    const conns = await Promise.all(Array.from({ length: 100 }, () => pool.get("ws-1")));
    assert.equal(new Set(conns).size, 1);
    assert.deepEqual(resolver.calls, ["ws-1"]);
    assert.equal(server.peers.length, 1);
    assert.equal(pool.size, 1);
    assert.equal(await pool.get("ws-1"), conns[0]);
  } finally {
    await pool.close();
    await server.close();
  }
});

test("Pool.get() gives every waiter the same error with the workspace id, and retries next time", async () => {
  let attempts = 0;
  const cause = new Error("spawn failed: exit code 3");
  const server = await startFakeAppServer((peer) => codexLike(peer));
  const pool = new Pool(async () => {
    attempts++;
    await new Promise((resolve) => setTimeout(resolve, 5));
    if (attempts === 1) throw cause;
    return server.url;
  });
  try {
    const results = await Promise.allSettled(Array.from({ length: 10 }, () => pool.get("ws-1")));
    const errors = results.map((r) => (r as PromiseRejectedResult).reason);
    assert.ok(errors.every((e) => e === errors[0]));
    assert.ok(errors[0] instanceof WorkspaceUnavailableError);
    assert.equal(errors[0].workspaceId, "ws-1");
    assert.equal(errors[0].cause, cause);
    assert.match(errors[0].message, /ws-1.*exit code 3/);
    assert.equal(pool.size, 0);
    const conn = await pool.get("ws-1");
    assert.equal(conn.closed, false);
    assert.equal(attempts, 2);
  } finally {
    await pool.close();
    await server.close();
  }
});

test("Pool.get() wraps a failed dial (refused upgrade) in WorkspaceUnavailableError", async () => {
  const server = await startFakeAppServer(() => {}, { token: "t" });
  const pool = new Pool(() =>
    Promise.resolve({ url: server.url, headers: { Authorization: "Bearer x" } })
  );
  try {
    await assert.rejects(pool.get("ws-1"), (error: unknown) => {
      assert.ok(error instanceof WorkspaceUnavailableError);
      assert.match(error.message, /HTTP 401/);
      return true;
    });
  } finally {
    await pool.close();
    await server.close();
  }
});

test("Pool.get() dials with the endpoint's headers over the pool's dial options", async () => {
  const server = await startFakeAppServer(() => {}, { token: "tok" });
  const pool = new Pool(
    () => Promise.resolve({ url: server.url, headers: { Authorization: "Bearer tok" } }),
    {
      dial: { headers: { "X-Extra": "1" } },
    },
  );
  try {
    await pool.get("ws-1");
    assert.equal(server.peers[0]!.headers["x-extra"], "1");
  } finally {
    await pool.close();
    await server.close();
  }
});

test("Pool.get() never hands out a closed connection and redials through the resolver", async () => {
  const server = await startFakeAppServer((peer) => codexLike(peer));
  const resolver = countingResolver(server);
  const pool = new Pool(resolver);
  const seen = events(pool);
  try {
    const first = await pool.get("ws-1");
    server.peers[0]!.terminate();
    await waitFor("the connection to close", () => first.closed);
    const second = await pool.get("ws-1");
    assert.notEqual(second, first);
    assert.equal(second.closed, false);
    assert.deepEqual(resolver.calls, ["ws-1", "ws-1"]);
    assert.deepEqual(seen, ["dial:ws-1", "close:ws-1", "dial:ws-1"]);
  } finally {
    await pool.close();
    await server.close();
  }
});

test("Pool.get() rejects with signal.reason for its caller only, the dial goes on for others", async () => {
  const server = await startFakeAppServer((peer) => codexLike(peer));
  const pool = new Pool(countingResolver(server));
  try {
    const controller = new AbortController();
    const mine = pool.get("ws-1", { signal: controller.signal });
    const other = pool.get("ws-1");
    controller.abort(new Error("gave up"));
    await assert.rejects(mine, /gave up/);
    assert.equal((await other).closed, false);
  } finally {
    await pool.close();
    await server.close();
  }
});

test("Pool reaps a connection idle for idleTtlMs, closes it and calls release", async () => {
  const server = await startFakeAppServer((peer) => codexLike(peer));
  const resolver = countingResolver(server);
  const pool = new Pool(resolver, { idleTtlMs: 40, sweepIntervalMs: 5 });
  const seen = events(pool);
  try {
    const conn = await pool.get("ws-1");
    await waitFor("the idle connection to be reaped", () => conn.closed);
    assert.deepEqual(seen, ["dial:ws-1", "reap:ws-1"]);
    assert.deepEqual(resolver.released, ["ws-1"]);
    assert.equal(pool.size, 0);
    const again = await pool.get("ws-1");
    assert.notEqual(again, conn);
    assert.equal(again.closed, false);
  } finally {
    await pool.close();
    await server.close();
  }
});

test("Pool.touch() and Pool.get() count as activity and keep a connection from being reaped", async () => {
  const server = await startFakeAppServer((peer) => codexLike(peer));
  const pool = new Pool(countingResolver(server), { idleTtlMs: 60, sweepIntervalMs: 5 });
  try {
    const conn = await pool.get("ws-1");
    for (let i = 0; i < 8; i++) {
      await new Promise((resolve) => setTimeout(resolve, 15));
      if (i % 2 === 0) pool.touch("ws-1");
      else await pool.get("ws-1");
    }
    assert.equal(conn.closed, false, "120 ms of touches and gets with a 60 ms TTL");
    await waitFor("the reap once the touches stop", () => conn.closed);
  } finally {
    await pool.close();
    await server.close();
  }
});

test("Pool never reaps a connection with a silent turn still waiting for its result", async () => {
  const server = await startFakeAppServer((peer) => codexLike(peer, { hang: true }));
  const pool = new Pool(countingResolver(server), { idleTtlMs: 30, sweepIntervalMs: 5 });
  try {
    const conn = await pool.get("ws-1");
    const turn = conn.turn("t1", { input }, { timeoutMs: 150 });
    const outcome = await turn.then(() => "completed", (error: Error) => error.name);
    assert.equal(outcome, "TimeoutError", "the turn ran to its own deadline, not a reap");
    assert.equal(conn.closed, false);
  } finally {
    await pool.close();
    await server.close();
  }
});

test("Pool never reaps a connection whose long turn keeps streaming", async () => {
  const server = await startFakeAppServer((peer) => codexLike(peer, { hang: true }));
  const pool = new Pool(countingResolver(server), { idleTtlMs: 30, sweepIntervalMs: 5 });
  try {
    const conn = await pool.get("ws-1");
    const turning = conn.turn("t1", { input }, { timeoutMs: 2_000 });
    const peer = server.peers[0]!;
    await waitFor("turn/start", () => peer.received.some((m) => m.method === "turn/start"));
    for (let i = 0; i < 6; i++) {
      await new Promise((resolve) => setTimeout(resolve, 15));
      peer.notify("item/agentMessage/delta", {
        threadId: "t1",
        turnId: "turn-1",
        itemId: "m1",
        delta: "x",
      });
    }
    peer.notify("turn/completed", {
      threadId: "t1",
      turn: { id: "turn-1", items: [], status: "completed", error: null },
    });
    assert.equal((await turning).status, "completed");
    assert.equal(conn.closed, false);
  } finally {
    await pool.close();
    await server.close();
  }
});

test("Pool with maxConnections evicts the least recently used idle connection", async () => {
  const server = await startFakeAppServer((peer) => codexLike(peer));
  const resolver = countingResolver(server);
  const pool = new Pool(resolver, { maxConnections: 2 });
  const seen = events(pool);
  try {
    const a = await pool.get("ws-a");
    await new Promise((resolve) => setTimeout(resolve, 5));
    const b = await pool.get("ws-b");
    await new Promise((resolve) => setTimeout(resolve, 5));
    pool.touch("ws-a");
    const c = await pool.get("ws-c");
    assert.equal(b.closed, true);
    assert.equal(a.closed, false);
    assert.equal(c.closed, false);
    assert.equal(pool.size, 2);
    assert.ok(seen.includes("evict:ws-b"));
    assert.deepEqual(resolver.released, ["ws-b"]);
  } finally {
    await pool.close();
    await server.close();
  }
});

test("Pool with maxConnections rejects with PoolFullError rather than evict a busy connection", async () => {
  const server = await startFakeAppServer((peer) => codexLike(peer, { hang: true }));
  const pool = new Pool(countingResolver(server), { maxConnections: 1 });
  try {
    const a = await pool.get("ws-a");
    const busy = a.turn("t1", { input }, { timeoutMs: 300 }).catch(() => {});
    await waitFor("the turn to start", () => a.inFlight > 0);
    await assert.rejects(pool.get("ws-b"), (error: unknown) => {
      assert.ok(error instanceof PoolFullError);
      assert.equal(error.workspaceId, "ws-b");
      assert.equal(error.maxConnections, 1);
      return true;
    });
    assert.equal(a.closed, false);
    a.close();
    await busy;
  } finally {
    await pool.close();
    await server.close();
  }
});

test("Pool.close() closes every connection, releases every workspace, and get rejects after", async () => {
  const server = await startFakeAppServer((peer) => codexLike(peer, { hang: true }));
  const resolver = countingResolver(server);
  const pool = new Pool(resolver);
  try {
    const a = await pool.get("ws-a");
    const b = await pool.get("ws-b");
    const turning = a.turn("t1", { input }).then(() => undefined, (error: unknown) => error);
    const closing = pool.close();
    assert.equal(pool.close(), closing, "idempotent");
    await closing;
    assert.ok((await turning) instanceof ConnectionClosedError);
    assert.equal(a.closed, true);
    assert.equal(b.closed, true);
    assert.deepEqual(resolver.released.sort(), ["ws-a", "ws-b"]);
    assert.equal(pool.size, 0);
    await assert.rejects(pool.get("ws-a"), PoolClosedError);
    await assert.rejects(pool.turn("ws-a", null, { input }), PoolClosedError);
  } finally {
    await pool.close();
    await server.close();
  }
});

test("Pool.close() during a dial rejects its waiters with PoolClosedError and leaves no connection", async () => {
  const server = await startFakeAppServer((peer) => codexLike(peer));
  let proceed!: () => void;
  const gate = new Promise<void>((resolve) => (proceed = resolve));
  const pool = new Pool(async () => {
    await gate;
    return server.url;
  });
  try {
    const waiting = pool.get("ws-1");
    const closing = pool.close();
    proceed();
    await assert.rejects(waiting, PoolClosedError);
    await closing;
    await new Promise((resolve) => setTimeout(resolve, 10));
    assert.ok(server.peers.every((peer) => peer.ws.readyState !== peer.ws.OPEN));
  } finally {
    await server.close();
  }
});

test("Pool.turn() starts a thread when threadId is null, then continues it", async () => {
  const server = await startFakeAppServer((peer) => codexLike(peer));
  const pool = new Pool(countingResolver(server));
  try {
    const threads: string[] = [];
    const first = await pool.turn("ws-1", null, { input }, {
      threadParams: { cwd: "/srv/ws-1" },
      onThread: (threadId: string, _conn: Conn) => threads.push(threadId),
    });
    assert.equal(first.threadId, "thr-1");
    assert.equal(first.turn.status, "completed");
    assert.deepEqual(threads, ["thr-1"]);
    const second = await pool.turn("ws-1", first.threadId, { input });
    assert.equal(second.threadId, "thr-1");
    assert.notEqual(second.turn.id, first.turn.id);
    const sent = server.peers[0]!.received.filter((m) => m.id !== undefined);
    assert.deepEqual(sent.map((m) => m.method), [
      "initialize",
      "thread/start",
      "turn/start",
      "turn/start",
    ]);
    assert.deepEqual(sent[1]!.params, { cwd: "/srv/ws-1" });
  } finally {
    await pool.close();
    await server.close();
  }
});

test("new Pool() rejects a non-positive idleTtlMs or maxConnections with a RangeError", () => {
  assert.throws(() => new Pool(() => Promise.resolve("ws://x"), { idleTtlMs: 0 }), RangeError);
  assert.throws(
    () => new Pool(() => Promise.resolve("ws://x"), { maxConnections: -1 }),
    RangeError,
  );
});

test("Pool.close() waits for the release of a workspace that was reaped just before", async () => {
  const server = await startFakeAppServer((peer) => codexLike(peer));
  let released = false;
  const pool = new Pool({
    resolve: () => Promise.resolve(server.url),
    release: async () => {
      await new Promise((resolve) => setTimeout(resolve, 50));
      released = true;
    },
  }, { idleTtlMs: 20, sweepIntervalMs: 5 });
  try {
    const reaped = new Promise((resolve) => pool.addEventListener("reap", resolve, { once: true }));
    await pool.get("ws-1");
    await reaped;
    await pool.close();
    assert.equal(released, true);
  } finally {
    await pool.close();
    await server.close();
  }
});

test("Pool.get() does not cache the failure of a resolver that throws synchronously", async () => {
  const server = await startFakeAppServer((peer) => codexLike(peer));
  let calls = 0;
  const pool = new Pool((): Promise<string> => {
    if (++calls === 1) throw new Error("not yet");
    return Promise.resolve(server.url);
  });
  try {
    await assert.rejects(pool.get("ws-1"), WorkspaceUnavailableError);
    assert.equal(pool.size, 0);
    assert.equal((await pool.get("ws-1")).closed, false);
  } finally {
    await pool.close();
    await server.close();
  }
});

test("Pool calls release once when the app-server closes the connection on its own", async () => {
  const server = await startFakeAppServer((peer) => codexLike(peer));
  const resolver = countingResolver(server);
  const pool = new Pool(resolver);
  const seen = events(pool);
  try {
    const conn = await pool.get("ws-1");
    server.peers[0]!.close(1001, "draining");
    await waitFor("the release", () => resolver.released.length > 0, 1_000);
    assert.equal(conn.closed, true);
    assert.deepEqual(seen, ["dial:ws-1", "close:ws-1"]);
    await pool.close();
    assert.deepEqual(resolver.released, ["ws-1"], "not released a second time by close()");
  } finally {
    await pool.close();
    await server.close();
  }
});

test("Pool calls release when the dial fails after the resolve succeeded (HTTP 401)", async () => {
  const server = await startFakeAppServer(() => {}, { token: "t" });
  const released: string[] = [];
  const pool = new Pool({
    resolve: () => Promise.resolve({ url: server.url, headers: { Authorization: "Bearer x" } }),
    release: (workspaceId) => {
      released.push(workspaceId);
    },
  });
  try {
    await assert.rejects(pool.get("ws-1"), WorkspaceUnavailableError);
    assert.deepEqual(released, ["ws-1"]);
    await pool.close();
    assert.deepEqual(released, ["ws-1"]);
  } finally {
    await pool.close();
    await server.close();
  }
});

test("Pool calls release when the dial fails after the resolve succeeded (handshake timeout)", async () => {
  // Accepts the WebSocket, never answers initialize.
  const server = await startFakeAppServer(() => {}, { handshake: false });
  const released: string[] = [];
  const pool = new Pool({
    resolve: () => Promise.resolve(server.url),
    release: (workspaceId) => {
      released.push(workspaceId);
    },
  }, { dial: { handshakeTimeoutMs: 30 } });
  try {
    await assert.rejects(pool.get("ws-1"), WorkspaceUnavailableError);
    assert.deepEqual(released, ["ws-1"]);
  } finally {
    await pool.close();
    await server.close();
  }
});

test("Pool does not call release for a resolve that failed", async () => {
  const released: string[] = [];
  const pool = new Pool({
    resolve: () => Promise.reject(new Error("no app-server for you")),
    release: (workspaceId) => {
      released.push(workspaceId);
    },
  });
  try {
    await assert.rejects(pool.get("ws-1"), WorkspaceUnavailableError);
    await pool.close();
    assert.deepEqual(released, []);
  } finally {
    await pool.close();
  }
});

test("Pool.get() does not resolve a workspace again until its release has settled", async () => {
  const server = await startFakeAppServer((peer) => codexLike(peer));
  const log: string[] = [];
  let finishRelease!: () => void;
  const gate = new Promise<void>((resolve) => (finishRelease = resolve));
  const pool = new Pool({
    resolve: () => {
      log.push("resolve");
      return Promise.resolve(server.url);
    },
    release: async () => {
      log.push("release");
      await gate;
      log.push("released");
    },
  });
  try {
    const first = await pool.get("ws-1");
    server.peers[0]!.close();
    await waitFor("the release to start", () => log.includes("release"), 1_000);
    const second = pool.get("ws-1");
    // Long enough for a resolve and a dial on loopback, had the get not waited.
    await new Promise((resolve) => setTimeout(resolve, 30));
    assert.deepEqual(log, ["resolve", "release"]);
    assert.equal(server.peers.length, 1);
    finishRelease();
    const conn = await second;
    assert.notEqual(conn, first);
    assert.equal(conn.closed, false);
    assert.deepEqual(log, ["resolve", "release", "released", "resolve"]);
  } finally {
    finishRelease();
    await pool.close();
    await server.close();
  }
});

test("Pool.close() waits for the release of a connection the app-server closed", async () => {
  const server = await startFakeAppServer((peer) => codexLike(peer));
  let started = false;
  let released = false;
  const pool = new Pool({
    resolve: () => Promise.resolve(server.url),
    release: async () => {
      started = true;
      await new Promise((resolve) => setTimeout(resolve, 50));
      released = true;
    },
  });
  try {
    await pool.get("ws-1");
    server.peers[0]!.terminate();
    await waitFor("the release to start", () => started, 1_000);
    await pool.close();
    assert.equal(released, true);
  } finally {
    await pool.close();
    await server.close();
  }
});

test("Pool with an idleTtlMs of 3000 hours neither spins its sweep nor reaps", async () => {
  const server = await startFakeAppServer((peer) => codexLike(peer));
  // The default sweep interval, idleTtlMs / 4, is past what a timer can wait (2^31 - 1 ms).
  const pool = new Pool(countingResolver(server), { idleTtlMs: 3_000 * 3_600_000 });
  try {
    const conn = await pool.get("ws-1");
    // Every sweep asks each connection whether a call is in flight: count the questions.
    let sweeps = 0;
    Object.defineProperty(conn, "inFlight", {
      configurable: true,
      get: () => {
        sweeps++;
        return 0;
      },
    });
    await new Promise((resolve) => setTimeout(resolve, 50));
    assert.equal(sweeps, 0, "an overflowed interval fires every millisecond");
    assert.equal(conn.closed, false);
  } finally {
    await pool.close();
    await server.close();
  }
});

test("Pool reaps a mass of idle connections in batches, with the event loop served between them", async () => {
  const server = await startFakeAppServer();
  const pool = new Pool(() => Promise.resolve(server.url), {
    idleTtlMs: 60_000,
    sweepIntervalMs: 5,
  });
  const total = 250;
  const realNow = Date.now;
  try {
    await Promise.all(Array.from({ length: total }, (_, i) => pool.get(`ws-${i}`)));
    let reaped = 0;
    let reapedBeforeTimer: number | undefined;
    pool.addEventListener("reap", () => {
      // A task queued at the first reap runs once the sweep gives the event loop back.
      if (reaped++ === 0) setTimeout(() => reapedBeforeTimer = reaped, 0);
    });
    // Every connection is idle past its TTL at once, as after a quiet night.
    Date.now = () => realNow() + 120_000;
    await waitFor("every idle connection to be reaped", () => pool.size === 0);
    await waitFor("the task queued at the first reap", () => reapedBeforeTimer !== undefined);
    assert.equal(reaped, total);
    assert.ok(
      reapedBeforeTimer! < total,
      `all ${total} connections were reaped in one go, before any other task could run`,
    );
  } finally {
    Date.now = realNow;
    await pool.close();
    await server.close();
  }
});

test("Pool reaps an idle connection dialed after one that is kept in use", async () => {
  const server = await startFakeAppServer();
  const pool = new Pool(() => Promise.resolve(server.url), { idleTtlMs: 40, sweepIntervalMs: 5 });
  const keepAlive = setInterval(() => pool.touch("ws-busy"), 5);
  try {
    const busy = await pool.get("ws-busy");
    const idle = await pool.get("ws-idle");
    await waitFor("the connection dialed later and left idle to be reaped", () => idle.closed);
    assert.equal(busy.closed, false);
    assert.equal(pool.size, 1);
  } finally {
    clearInterval(keepAlive);
    await pool.close();
    await server.close();
  }
});

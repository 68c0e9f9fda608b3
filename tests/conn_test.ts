import { test } from "./_test.ts";
import { waitFor } from "./_wait.ts";
import { watchUnhandledRejections } from "./_unhandled.ts";
import { trackTimers } from "./_timers.ts";
import { MAX_TIMER_DELAY_MS } from "../src/_timer.ts";
import assert from "node:assert/strict";
import { createServer } from "node:net";
import {
  Conn,
  ConnCloseEvent,
  ConnectionClosedError,
  DialError,
  NotificationEvent,
  RpcError,
  type ServerRequestEvent,
  TimeoutError,
  TurnRpcError,
} from "../mod.ts";
import {
  agentMessage,
  codexLike,
  type FakePeer,
  itemCompleted,
  type Message,
  type Req,
  serverRequestParams,
  startFakeAppServer,
  threadResult,
  turnObject,
} from "./_fake_app_server.ts";

const input = [{ type: "text", text: "hi", text_elements: [] }];
const fastRetry = { initialDelayMs: 2, maxDelayMs: 10 };

async function freePort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const address = server.address();
  await new Promise<void>((resolve) => server.close(() => resolve()));
  return typeof address === "object" && address ? address.port : 0;
}

/** The turn a notification names, or "-" for a thread-level one. */
function turnOf(params: Record<string, unknown>): string {
  if (typeof params.turnId === "string") return params.turnId;
  const turn = params.turn as { id?: unknown } | undefined;
  return typeof turn?.id === "string" ? turn.id : "-";
}

function completeTurn(peer: FakePeer, threadId: string, turnId: string, items: unknown[] = []) {
  peer.notify("turn/completed", { threadId, turn: turnObject(turnId, "completed", items) });
}

test("Conn.dial() sends initialize with clientInfo, then initialized, with the upgrade headers", async () => {
  const server = await startFakeAppServer(() => {}, { handshake: false });
  try {
    const dialing = Conn.dial(server.url, {
      headers: { Authorization: "Bearer secret-token" },
      clientInfo: { name: "test_client", title: "Test", version: "1.2.3" },
    });
    const peer = await server.nextPeer();
    assert.equal(peer.headers.authorization, "Bearer secret-token");
    const init = await peer.expect("initialize");
    assert.deepEqual(init.params, {
      clientInfo: { name: "test_client", title: "Test", version: "1.2.3" },
      capabilities: null,
    });
    peer.reply(init, {
      userAgent: "fake",
      codexHome: "/tmp/fake",
      platformFamily: "unix",
      platformOs: "linux",
    });
    const conn = await dialing;
    const initialized = await peer.next();
    assert.equal(initialized.method, "initialized");
    assert.equal(initialized.id, undefined);
    assert.equal(conn.closed, false);
    conn.close();
  } finally {
    await server.close();
  }
});

test("Conn.dial() rejects with DialError when the connection is refused", async () => {
  const port = await freePort();
  await assert.rejects(Conn.dial(`ws://127.0.0.1:${port}`), (error: unknown) => {
    assert.ok(error instanceof DialError);
    assert.match(error.message, /^Cannot connect to ws:\/\/127\.0\.0\.1:\d+\/: connection refused/);
    assert.equal(error.status, undefined);
    return true;
  });
});

test("Conn.dial() rejects with DialError status 401 when the token is missing or wrong", async () => {
  const server = await startFakeAppServer(() => {}, { token: "right" });
  try {
    for (const headers of [{}, { Authorization: "Bearer wrong" }]) {
      await assert.rejects(Conn.dial(server.url, { headers }), (error: unknown) => {
        assert.ok(error instanceof DialError);
        assert.equal(error.status, 401);
        assert.match(error.message, /HTTP 401/);
        return true;
      });
    }
    const conn = await Conn.dial(server.url, { headers: { Authorization: "Bearer right" } });
    conn.close();
  } finally {
    await server.close();
  }
});

test("Conn.dial() rejects with DialError carrying the RpcError when initialize fails", async () => {
  const server = await startFakeAppServer(async (peer) => {
    peer.replyError(await peer.expect("initialize"), -32600, "Already initialized");
  }, { handshake: false });
  try {
    await assert.rejects(Conn.dial(server.url), (error: unknown) => {
      assert.ok(error instanceof DialError);
      assert.match(error.message, /Already initialized/);
      assert.ok(error.cause instanceof RpcError);
      assert.equal(error.cause.code, -32600);
      return true;
    });
  } finally {
    await server.close();
  }
});

test("Conn.dial() rejects with DialError when the socket closes during the handshake", async () => {
  const server = await startFakeAppServer(async (peer) => {
    await peer.expect("initialize");
    peer.close(1011, "going away");
  }, { handshake: false });
  try {
    await assert.rejects(Conn.dial(server.url), (error: unknown) => {
      assert.ok(error instanceof DialError);
      assert.ok(error.cause instanceof ConnectionClosedError);
      return true;
    });
  } finally {
    await server.close();
  }
});

test("Conn.dial() rejects with DialError at the handshake deadline", async () => {
  const server = await startFakeAppServer(() => {}, { handshake: false });
  try {
    const started = Date.now();
    await assert.rejects(Conn.dial(server.url, { handshakeTimeoutMs: 50 }), (error: unknown) => {
      assert.ok(error instanceof DialError);
      assert.match(error.message, /no answer within 50 ms/);
      return true;
    });
    assert.ok(Date.now() - started < 2_000);
  } finally {
    await server.close();
  }
});

test("Conn.dial() rejects with the signal's reason when aborted", async () => {
  const server = await startFakeAppServer(() => {}, { handshake: false });
  try {
    const controller = new AbortController();
    const reason = new Error("caller gave up");
    const dialing = Conn.dial(server.url, { signal: controller.signal });
    await server.nextPeer();
    controller.abort(reason);
    await assert.rejects(dialing, (error) => error === reason);
  } finally {
    await server.close();
  }
});

test("Conn.dial() rejects a URL that is not ws:// with a TypeError", async () => {
  await assert.rejects(Conn.dial("http://127.0.0.1:1"), TypeError);
});

test("Conn.startThread() returns the thread id and the first turn on it sends no thread/resume", async () => {
  const server = await startFakeAppServer((peer) => codexLike(peer));
  const conn = await Conn.dial(server.url);
  try {
    const threadId = await conn.startThread({ cwd: "/tmp/ws" });
    assert.equal(threadId, "thr-1");
    const turn = await conn.turn(threadId, { input });
    assert.equal(turn.status, "completed");
    const methods = server.peers[0]!.received.map((m) => m.method);
    assert.deepEqual(methods, ["initialize", "initialized", "thread/start", "turn/start"]);
  } finally {
    conn.close();
    await server.close();
  }
});

test("Conn.turn() sends thread/resume once before the first turn on a thread it did not start", async () => {
  const server = await startFakeAppServer((peer) => codexLike(peer));
  const conn = await Conn.dial(server.url);
  try {
    await conn.turn("thr-elsewhere", { input });
    await conn.turn("thr-elsewhere", { input });
    const sent = server.peers[0]!.received.filter((m) => m.id !== undefined && m.method);
    assert.deepEqual(sent.map((m) => m.method), [
      "initialize",
      "thread/resume",
      "turn/start",
      "turn/start",
    ]);
    assert.deepEqual(sent[1]!.params, { threadId: "thr-elsewhere" });
  } finally {
    conn.close();
    await server.close();
  }
});

test("Conn.turn() rejects with TurnRpcError when thread/resume fails", async () => {
  const server = await startFakeAppServer(async (peer) => {
    peer.replyError(await peer.expect("thread/resume"), -32600, "no rollout found", { x: 1 });
  }, { autoResume: false });
  const conn = await Conn.dial(server.url);
  try {
    await assert.rejects(conn.turn("thr-gone", { input }), (error: unknown) => {
      assert.ok(error instanceof TurnRpcError);
      assert.equal(error.message, "no rollout found");
      assert.deepEqual(error.data, { x: 1 });
      return true;
    });
  } finally {
    conn.close();
    await server.close();
  }
});

test("Conn.turn() resolves a turn/completed that arrives before the turn/start response", async () => {
  const server = await startFakeAppServer((peer) => codexLike(peer, { completeFirst: true }));
  const conn = await Conn.dial(server.url);
  try {
    const threadId = await conn.startThread();
    const turn = await conn.turn(threadId, { input }, { timeoutMs: 2_000 });
    assert.equal(turn.id, "turn-1");
    assert.equal(turn.status, "completed");
    assert.equal(turn.items.length, 2);
  } finally {
    conn.close();
    await server.close();
  }
});

test("Conn.turn() collects item/completed in arrival order, sets itemsView full and keeps other fields", async () => {
  const server = await startFakeAppServer(async (peer) => {
    const start = await peer.expect("turn/start");
    const { threadId } = start.params;
    peer.reply(start, { turn: turnObject("u1", "inProgress") });
    peer.notify(
      "item/completed",
      itemCompleted(threadId, "u1", { type: "userMessage", id: "a", content: [] }),
    );
    peer.notify("item/completed", itemCompleted(threadId, "other", agentMessage("stray", "")));
    peer.notify("item/completed", itemCompleted(threadId, "u1", agentMessage("b", "done")));
    peer.notify("turn/completed", {
      threadId,
      turn: {
        ...turnObject("u1", "completed", [agentMessage("b", "done")]),
        extra: { kept: true },
      },
    });
  });
  const conn = await Conn.dial(server.url);
  try {
    const turn = await conn.turn("t1", { input });
    assert.deepEqual(turn.items.map((item) => item.id), ["a", "b"]);
    assert.equal(turn.itemsView, "full");
    assert.deepEqual(turn.extra, { kept: true });
    assert.equal(turn.durationMs, 1);
    assert.equal(conn.stats.dropped.unknownTurn, 1);
  } finally {
    conn.close();
    await server.close();
  }
});

test("Conn.turn() returns the turn untouched when no item/completed was seen", async () => {
  const original = {
    ...turnObject("u1", "completed", [agentMessage("m", "hi")]),
    itemsView: "summary",
  };
  const server = await startFakeAppServer(async (peer) => {
    const start = await peer.expect("turn/start");
    peer.reply(start, { turn: turnObject("u1", "inProgress") });
    peer.notify("turn/completed", { threadId: start.params.threadId, turn: original });
  });
  const conn = await Conn.dial(server.url);
  try {
    assert.deepEqual(await conn.turn("t1", { input }), original);
  } finally {
    conn.close();
    await server.close();
  }
});

test("Conn.turn() merges threadId into the caller's params and rejects a threadId inside them", async () => {
  const server = await startFakeAppServer((peer) => codexLike(peer));
  const conn = await Conn.dial(server.url);
  try {
    await assert.rejects(
      conn.turn("t1", { input, threadId: "t2" } as never),
      (error: unknown) =>
        error instanceof TypeError && /must not contain threadId/.test(error.message),
    );
    await assert.rejects(conn.turn("t1", { text: "no input" } as never), TypeError);
    await conn.turn("t1", { input, model: "m1" });
    const start = server.peers[0]!.received.find((m) => m.method === "turn/start")!;
    assert.deepEqual(start.params, { input, model: "m1", threadId: "t1" });
    assert.equal(server.peers[0]!.received.filter((m) => m.method === "turn/start").length, 1);
  } finally {
    conn.close();
    await server.close();
  }
});

test("Conn tells a server request with id 0 from the response to client request id 0 or 1", async () => {
  const server = await startFakeAppServer(async (peer) => {
    const start = await peer.expect("thread/start");
    // Server request ids start at 0 like the client's: the same id, different meaning.
    const answer0 = await peer.request(
      "item/commandExecution/requestApproval",
      { ...serverRequestParams("item/commandExecution/requestApproval"), command: "ls" },
      start.id,
    );
    assert.equal(answer0.result.decision, "decline");
    const answer1 = await peer.request(
      "item/tool/requestUserInput",
      serverRequestParams("item/tool/requestUserInput"),
      0,
    );
    assert.deepEqual(answer1.result, { answers: {} });
    peer.reply(start, threadResult("thr-x"));
  }, { handshake: true });
  const conn = await Conn.dial(server.url);
  try {
    assert.equal(await conn.startThread(), "thr-x");
  } finally {
    conn.close();
    await server.close();
  }
});

test("Conn.turn() runs two turns on the same thread one after the other", async () => {
  const server = await startFakeAppServer(async (peer) => {
    const first = await peer.expect("turn/start");
    peer.reply(first, { turn: turnObject("u1", "inProgress") });
    const next = peer.expect("turn/start");
    const early = await Promise.race([next, new Promise((resolve) => setTimeout(resolve, 30))]);
    assert.equal(early, undefined, "second turn/start must wait for the first turn to complete");
    completeTurn(peer, "t1", "u1");
    const second = await next;
    peer.reply(second, { turn: turnObject("u2", "inProgress") });
    completeTurn(peer, "t1", "u2");
  });
  const conn = await Conn.dial(server.url);
  try {
    const [a, b] = await Promise.all([
      conn.turn("t1", { input }),
      conn.turn("t1", { input }),
    ]);
    assert.equal(a.id, "u1");
    assert.equal(b.id, "u2");
  } finally {
    conn.close();
    await server.close();
  }
});

test("Conn.turn() completes 200 concurrent turns on different threads of one connection", async () => {
  const server = await startFakeAppServer((peer) =>
    codexLike(peer, { text: (i) => JSON.stringify(i) })
  );
  const conn = await Conn.dial(server.url);
  try {
    const threads = await Promise.all(Array.from({ length: 200 }, () => conn.startThread()));
    assert.equal(new Set(threads).size, 200);
    const turns = await Promise.all(
      threads.map((threadId, i) =>
        conn.turn(threadId, { input: [{ type: "text", text: `n${i}`, text_elements: [] }] })
      ),
    );
    turns.forEach((turn, i) => {
      assert.equal(turn.status, "completed");
      assert.match(String(turn.items[1]?.text), new RegExp(`"n${i}"`));
    });
    assert.equal(new Set(turns.map((t) => t.id)).size, 200);
    assert.equal(conn.inFlight, 0);
  } finally {
    conn.close();
    await server.close();
  }
});

test("Conn.turn() rejects with ConnectionClosedError at once when the peer dies mid-turn", async () => {
  const server = await startFakeAppServer(async (peer) => {
    peer.reply(await peer.expect("turn/start"), { turn: turnObject("u1", "inProgress") });
    peer.terminate();
  });
  const conn = await Conn.dial(server.url);
  try {
    let closeEvents = 0;
    conn.addEventListener("close", (event) => {
      closeEvents++;
      assert.ok(event instanceof ConnCloseEvent);
    });
    await assert.rejects(conn.turn("t1", { input }), ConnectionClosedError);
    assert.equal(conn.closed, true);
    await assert.rejects(conn.turn("t1", { input }), ConnectionClosedError);
    await assert.rejects(conn.startThread(), ConnectionClosedError);
    await assert.rejects(conn.request("x"), ConnectionClosedError);
    conn.close();
    assert.equal(closeEvents, 1);
  } finally {
    await server.close();
  }
});

test("Conn.close() rejects pending calls and waiting turns with ConnectionClosedError and is idempotent", async () => {
  const server = await startFakeAppServer(async (peer) => {
    peer.reply(await peer.expect("turn/start"), { turn: turnObject("u1", "inProgress") });
  });
  const conn = await Conn.dial(server.url);
  try {
    const first = conn.turn("t1", { input });
    const queued = conn.turn("t1", { input });
    const call = conn.request("thread/list");
    await server.peers[0]!.expect("thread/list");
    conn.close();
    conn.close();
    await assert.rejects(first, ConnectionClosedError);
    await assert.rejects(queued, ConnectionClosedError);
    await assert.rejects(call, ConnectionClosedError);
    assert.equal(conn.closed, true);
    assert.equal(conn.inFlight, 0);
  } finally {
    await server.close();
  }
});

test("Conn.turn() on timeout sends turn/interrupt and rejects with TimeoutError carrying both ids", async () => {
  const server = await startFakeAppServer((peer) => codexLike(peer, { hang: true }));
  const conn = await Conn.dial(server.url);
  try {
    const threadId = await conn.startThread();
    const other = await conn.startThread();
    const started = Date.now();
    await assert.rejects(conn.turn(threadId, { input }, { timeoutMs: 40 }), (error: unknown) => {
      assert.ok(error instanceof TimeoutError);
      assert.equal(error.name, "TimeoutError");
      assert.equal(error.threadId, threadId);
      assert.equal(error.turnId, "turn-1");
      return true;
    });
    assert.ok(Date.now() - started < 1_000);
    const peer = server.peers[0]!;
    await waitFor("turn/interrupt", () => peer.received.some((m) => m.method === "turn/interrupt"));
    const interrupt = peer.received.find((m) => m.method === "turn/interrupt");
    assert.deepEqual(interrupt?.params, { threadId, turnId: "turn-1" });
    // Other turns on the connection are unaffected.
    await assert.rejects(conn.turn(other, { input }, { timeoutMs: 30 }), TimeoutError);
    assert.equal(conn.closed, false);
  } finally {
    conn.close();
    await server.close();
  }
});

test("Conn.turn() keeps the thread busy until an interrupted turn has stopped", async () => {
  const controller = new AbortController();
  const server = await startFakeAppServer(async (peer) => {
    const first = await peer.expect("turn/start");
    peer.reply(first, { turn: turnObject("u1", "inProgress") });
    controller.abort(new Error("caller left"));
    const interrupt = await peer.expect("turn/interrupt");
    assert.deepEqual(interrupt.params, { threadId: "t1", turnId: "u1" });
    peer.reply(interrupt, {});
    // While u1 still runs, the next turn/start must not be sent.
    const next = peer.expect("turn/start");
    const early = await Promise.race([next, new Promise((resolve) => setTimeout(resolve, 30))]);
    assert.equal(early, undefined);
    peer.notify("turn/completed", { threadId: "t1", turn: turnObject("u1", "interrupted") });
    const second = await next;
    peer.reply(second, { turn: turnObject("u2", "inProgress") });
    completeTurn(peer, "t1", "u2");
  });
  const conn = await Conn.dial(server.url);
  try {
    await assert.rejects(conn.turn("t1", { input }, { signal: controller.signal }), /caller left/);
    const next = await conn.turn("t1", { input }, { timeoutMs: 2_000 });
    assert.equal(next.id, "u2");
    await server.scriptsDone();
  } finally {
    conn.close();
    await server.close();
  }
});

test("Conn.turn() frees the thread after interruptTimeoutMs when codex never stops the turn", async () => {
  const controller = new AbortController();
  const server = await startFakeAppServer(async (peer) => {
    peer.reply(await peer.expect("turn/start"), { turn: turnObject("u1", "inProgress") });
    controller.abort(new Error("caller left"));
    await peer.expect("turn/interrupt"); // never answered, like a repeated interrupt upstream
    const second = await peer.expect("turn/start");
    peer.reply(second, { turn: turnObject("u2", "inProgress") });
    completeTurn(peer, "t1", "u2");
  });
  const conn = await Conn.dial(server.url, { interruptTimeoutMs: 40 });
  try {
    await assert.rejects(conn.turn("t1", { input }, { signal: controller.signal }), /caller left/);
    assert.equal((await conn.turn("t1", { input }, { timeoutMs: 2_000 })).id, "u2");
    // The unanswered turn/interrupt gives up at its own deadline, about when the lane did.
    await waitFor("the unanswered interrupt to give up", () => conn.inFlight === 0);
  } finally {
    conn.close();
    await server.close();
  }
});

test("Conn.turn() times out with turnId null while waiting in line", async () => {
  const server = await startFakeAppServer((peer) => codexLike(peer, { hang: true }));
  const conn = await Conn.dial(server.url, { interruptTimeoutMs: 50 });
  try {
    const first = conn.turn("t1", { input }, { timeoutMs: 200 });
    await assert.rejects(conn.turn("t1", { input }, { timeoutMs: 20 }), (error: unknown) => {
      assert.ok(error instanceof TimeoutError);
      assert.equal(error.turnId, null);
      return true;
    });
    await assert.rejects(first, TimeoutError);
  } finally {
    conn.close();
    await server.close();
  }
});

test("Conn.turn() on abort sends turn/interrupt and rejects with signal.reason", async () => {
  const server = await startFakeAppServer((peer) => codexLike(peer, { hang: true }));
  const conn = await Conn.dial(server.url);
  try {
    const controller = new AbortController();
    const reason = new Error("client went away");
    const turning = conn.turn("t1", { input }, { signal: controller.signal });
    const peer = server.peers[0]!;
    await waitFor("turn/start", () => peer.received.some((m) => m.method === "turn/start"));
    await new Promise((resolve) => setTimeout(resolve, 10));
    controller.abort(reason);
    await assert.rejects(turning, (error) => error === reason);
    await waitFor("turn/interrupt", () => peer.received.some((m) => m.method === "turn/interrupt"));
    const interrupt = peer.received.find((m) => m.method === "turn/interrupt")!;
    assert.deepEqual(interrupt.params, { threadId: "t1", turnId: "turn-1" });
  } finally {
    conn.close();
    await server.close();
  }
});

test("Conn.turn() interrupts a turn whose turn/start response arrives after the abort", async () => {
  let release!: () => void;
  const gate = new Promise<void>((resolve) => (release = resolve));
  const server = await startFakeAppServer(async (peer) => {
    const start = await peer.expect("turn/start");
    await gate;
    peer.reply(start, { turn: turnObject("late", "inProgress") });
    const interrupt = await peer.expect("turn/interrupt");
    peer.reply(interrupt, {});
    assert.deepEqual(interrupt.params, { threadId: "t1", turnId: "late" });
    peer.notify("turn/completed", { threadId: "t1", turn: turnObject("late", "interrupted") });
  });
  const conn = await Conn.dial(server.url);
  try {
    const controller = new AbortController();
    const turning = conn.turn("t1", { input }, { signal: controller.signal });
    const peer = server.peers[0]!;
    await waitFor("turn/start", () => peer.received.some((m) => m.method === "turn/start"));
    controller.abort(new Error("stop"));
    await assert.rejects(turning, /stop/);
    release();
    await waitFor("the interrupted turn to stop", () => conn.inFlight === 0);
  } finally {
    conn.close();
    await server.close();
  }
});

test("Conn.turn() retries -32001 overloaded answers with backoff and then succeeds", async () => {
  const server = await startFakeAppServer(async (peer) => {
    for (let i = 0; i < 3; i++) {
      peer.replyError(await peer.expect("turn/start"), -32001, "Server overloaded; retry later.");
    }
    const start = await peer.expect("turn/start");
    peer.reply(start, { turn: turnObject("u1", "inProgress") });
    completeTurn(peer, "t1", "u1");
  });
  const conn = await Conn.dial(server.url, { retry: fastRetry });
  try {
    assert.equal((await conn.turn("t1", { input })).id, "u1");
    const starts = server.peers[0]!.received.filter((m) => m.method === "turn/start");
    assert.equal(starts.length, 4);
    assert.equal(new Set(starts.map((m) => m.id)).size, 4, "ids never repeat");
  } finally {
    conn.close();
    await server.close();
  }
});

test("Conn.turn() surfaces -32001 as TurnRpcError once the deadline leaves no room to retry", async () => {
  const server = await startFakeAppServer((peer) => {
    peer.handle((m) => {
      if (m.method !== "turn/start") return false;
      peer.send({ id: m.id, error: { code: -32001, message: "Server overloaded; retry later." } });
      return true;
    });
  });
  const conn = await Conn.dial(server.url, { retry: { initialDelayMs: 10, maxDelayMs: 20 } });
  try {
    const started = Date.now();
    // Long enough for many attempts: the room kept for the last one grows with the slowest
    // answer seen, so a load spike on a busy machine does not turn it into a timeout.
    await assert.rejects(conn.turn("t1", { input }, { timeoutMs: 400 }), (error: unknown) => {
      assert.ok(error instanceof TurnRpcError);
      assert.equal(error.code, -32001);
      return true;
    });
    assert.ok(Date.now() - started < 1_000);
    assert.ok(server.peers[0]!.received.filter((m) => m.method === "turn/start").length > 1);
  } finally {
    conn.close();
    await server.close();
  }
});

test("Conn.turn() surfaces -32001 when the deadline passes mid-retry, not a timeout", async () => {
  const server = await startFakeAppServer((peer) => {
    peer.handle((m) => {
      if (m.method !== "turn/start" && m.method !== "thread/list") return false;
      setTimeout(
        () => peer.send({ id: m.id, error: { code: -32001, message: "Server overloaded" } }),
        15,
      );
      return true;
    });
  });
  const conn = await Conn.dial(server.url, { retry: { initialDelayMs: 1, maxDelayMs: 1 } });
  try {
    await conn.request("thread/resume", { threadId: "t1" }); // warm the socket
    await assert.rejects(conn.turn("t1", { input }, { timeoutMs: 100 }), (error: unknown) => {
      assert.ok(error instanceof TurnRpcError, `got ${String(error)}`);
      assert.equal(error.code, -32001);
      return true;
    });
    await assert.rejects(conn.request("thread/list", {}, { timeoutMs: 100 }), (error: unknown) => {
      assert.ok(error instanceof RpcError, `got ${String(error)}`);
      assert.equal(error.code, -32001);
      return true;
    });
    await new Promise((resolve) => setTimeout(resolve, 40)); // let the late answers land
  } finally {
    conn.close();
    await server.close();
  }
});

test("Conn.turn() calls onStart with the turn id once codex accepted the turn", async () => {
  const server = await startFakeAppServer((peer) => codexLike(peer));
  const conn = await Conn.dial(server.url);
  try {
    const started: string[] = [];
    const turn = await conn.turn("t1", { input }, { onStart: (turnId) => started.push(turnId) });
    assert.deepEqual(started, [turn.id]);
  } finally {
    conn.close();
    await server.close();
  }
});

test("Conn.turn() rejects with TurnRpcError carrying code and data when turn/start fails", async () => {
  const server = await startFakeAppServer(async (peer) => {
    peer.replyError(await peer.expect("turn/start"), -32602, "Invalid params: input", {
      field: "input",
    });
    codexLike(peer);
  });
  const conn = await Conn.dial(server.url);
  try {
    const threadId = "t1";
    await assert.rejects(conn.turn(threadId, { input }), (error: unknown) => {
      assert.ok(error instanceof TurnRpcError);
      assert.equal(error.code, -32602);
      assert.equal(error.message, "Invalid params: input");
      assert.deepEqual(error.data, { field: "input" });
      return true;
    });
    assert.equal((await conn.turn(threadId, { input })).status, "completed");
  } finally {
    conn.close();
    await server.close();
  }
});

test("Conn closes itself on a draining (serverShuttingDown) error so a pool can redial", async () => {
  const server = await startFakeAppServer(async (peer) => {
    peer.replyError(
      await peer.expect("thread/start"),
      -32600,
      "Server is draining; retry after reconnecting",
      { reason: "serverShuttingDown" },
    );
  });
  const conn = await Conn.dial(server.url);
  try {
    await assert.rejects(conn.startThread(), (error: unknown) => {
      assert.ok(error instanceof ConnectionClosedError);
      assert.ok(error.cause instanceof RpcError);
      return true;
    });
    assert.equal(conn.closed, true);
  } finally {
    conn.close();
    await server.close();
  }
});

test("Conn answers each server request per the default decline policy", async () => {
  const answers: Record<string, unknown> = {};
  const server = await startFakeAppServer(async (peer) => {
    const methods = [
      "item/commandExecution/requestApproval",
      "item/fileChange/requestApproval",
      "item/permissions/requestApproval",
      "item/tool/requestUserInput",
      "mcpServer/elicitation/request",
      "item/tool/call",
      "applyPatchApproval",
      "something/unknown",
    ];
    for (const [i, method] of methods.entries()) {
      const answer = method === "something/unknown"
        ? await peer.request(method, {}, i, { unchecked: true })
        : await peer.request(method, serverRequestParams(method), i);
      answers[method] = answer.error ? { code: answer.error.code } : answer.result;
    }
  });
  const conn = await Conn.dial(server.url);
  try {
    const events: string[] = [];
    conn.addEventListener("serverrequest", (event) => {
      const { request, outcome } = event as ServerRequestEvent;
      events.push(`${request.method}:${outcome}`);
    });
    await server.scriptsDone();
    assert.deepEqual(answers, {
      "item/commandExecution/requestApproval": { decision: "decline" },
      "item/fileChange/requestApproval": { decision: "decline" },
      "item/permissions/requestApproval": { permissions: {} },
      "item/tool/requestUserInput": { answers: {} },
      "mcpServer/elicitation/request": { action: "decline", content: null, _meta: null },
      "item/tool/call": { code: -32601 },
      "applyPatchApproval": { code: -32601 },
      "something/unknown": { code: -32601 },
    });
    assert.equal(events[0], "item/commandExecution/requestApproval:decline");
    assert.equal(events[7], "something/unknown:error");
  } finally {
    conn.close();
    await server.close();
  }
});

test("Conn answers approvals with accept when approvals is accept", async () => {
  const answers: unknown[] = [];
  const server = await startFakeAppServer(async (peer) => {
    for (const [i, method] of ["commandExecution", "permissions"].entries()) {
      const name = `item/${method}/requestApproval`;
      answers.push((await peer.request(name, serverRequestParams(name), i)).result);
    }
  });
  const conn = await Conn.dial(server.url, { approvals: "accept" });
  try {
    await server.scriptsDone();
    assert.deepEqual(answers, [{ decision: "accept" }, {
      permissions: { network: { enabled: true } },
    }]);
  } finally {
    conn.close();
    await server.close();
  }
});

test("Conn answers with an approval function, and with an error when it throws or rejects", async () => {
  const answers: unknown[] = [];
  const server = await startFakeAppServer(async (peer) => {
    for (const [i, method] of ["ok", "sync-throw", "async-reject", "undefined"].entries()) {
      // Methods of the test's own: the policy function sees any method codex may add.
      answers.push(await peer.request(method, { n: i }, i, { unchecked: true }));
    }
  });
  const conn = await Conn.dial(server.url, {
    approvals: async (request) => {
      if (request.method === "sync-throw") throw new Error("bad policy");
      await new Promise((resolve) => setTimeout(resolve, 1));
      if (request.method === "async-reject") throw new Error("async bad policy");
      if (request.method === "undefined") return undefined;
      return { decision: "acceptForSession", echo: request.params };
    },
  });
  try {
    await server.scriptsDone();
    const [ok, syncThrow, asyncReject, none] = answers as {
      result?: unknown;
      error?: { code: number; message: string };
    }[];
    assert.deepEqual(ok!.result, { decision: "acceptForSession", echo: { n: 0 } });
    assert.equal(syncThrow!.error?.code, -32603);
    assert.match(syncThrow!.error!.message, /bad policy/);
    assert.match(asyncReject!.error!.message, /async bad policy/);
    assert.match(none!.error!.message, /no result/);
  } finally {
    conn.close();
    await server.close();
  }
});

test("Conn drops and counts bad frames and stays usable", async () => {
  const server = await startFakeAppServer(async (peer) => {
    const start = await peer.expect("thread/start");
    peer.sendRaw("this is not json");
    peer.sendRaw(new Uint8Array([1, 2, 3]));
    peer.sendRaw(JSON.stringify({ id: 999, result: {} }));
    // Our ids are numbers: the same id as a string answers nothing.
    peer.sendRaw(JSON.stringify({ id: String(start.id), result: threadResult("thr-wrong") }));
    peer.sendRaw(
      JSON.stringify({ method: "item/completed", params: { threadId: "nope", turnId: "x" } }),
    );
    peer.sendRaw(
      JSON.stringify({ method: "turn/completed", params: { threadId: "nope", turn: { id: "x" } } }),
    );
    peer.sendRaw(JSON.stringify([1, 2]));
    peer.sendRaw(JSON.stringify({ nothing: true }));
    peer.sendRaw(JSON.stringify({ method: "x", params: "y".repeat(2_000) }));
    peer.sendRaw(
      JSON.stringify({ method: "item/agentMessage/delta", params: { ok: "é".repeat(300) } }),
    );
    peer.reply(start, threadResult("thr-ok"));
    codexLike(peer);
  });
  const conn = await Conn.dial(server.url, { maxMessageBytes: 1_000 });
  try {
    assert.equal(await conn.startThread(), "thr-ok");
    assert.equal((await conn.turn("thr-ok", { input })).status, "completed");
    assert.deepEqual(conn.stats.dropped, {
      binary: 1,
      oversized: 1,
      invalidJson: 1,
      invalidMessage: 2,
      unknownId: 2,
      unknownTurn: 2,
    });
  } finally {
    conn.close();
    await server.close();
  }
});

test("Conn dispatches every notification as an event with method and params", async () => {
  const server = await startFakeAppServer((peer) => codexLike(peer));
  const conn = await Conn.dial(server.url);
  try {
    const seen: string[] = [];
    conn.addEventListener("notification", (event) => {
      assert.ok(event instanceof NotificationEvent);
      seen.push(event.method);
    });
    const threadId = await conn.startThread();
    await conn.turn(threadId, { input });
    assert.deepEqual(seen, ["turn/started", "item/completed", "item/completed", "turn/completed"]);
  } finally {
    conn.close();
    await server.close();
  }
});

test("Conn.lastActivity moves with frames in either direction", async () => {
  const server = await startFakeAppServer((peer) => codexLike(peer));
  const conn = await Conn.dial(server.url);
  try {
    const before = conn.lastActivity;
    await new Promise((resolve) => setTimeout(resolve, 15));
    await conn.startThread();
    assert.ok(conn.lastActivity > before);
  } finally {
    conn.close();
    await server.close();
  }
});

test("Conn.request() rejects with a TimeoutError DOMException when no answer comes", async () => {
  const server = await startFakeAppServer(() => {});
  const conn = await Conn.dial(server.url);
  try {
    await assert.rejects(
      conn.request("never/answered", {}, { timeoutMs: 20 }),
      (error: unknown) => {
        assert.equal((error as Error).name, "TimeoutError");
        return true;
      },
    );
    assert.equal(conn.inFlight, 0);
  } finally {
    conn.close();
    await server.close();
  }
});

test("Conn.finished resolves once the socket has closed, after close() or a peer close", async () => {
  const server = await startFakeAppServer(() => {});
  try {
    const mine = await Conn.dial(server.url);
    const theirs = await Conn.dial(server.url);
    let settled = false;
    mine.finished.then(() => (settled = true));
    assert.equal(settled, false);
    mine.close();
    await mine.finished;
    server.peers[1]!.close(1001, "bye");
    await theirs.finished;
    assert.equal(theirs.closed, true);
  } finally {
    await server.close();
  }
});

test("Conn.turn() hands onNotification its own turn's notifications in order, early and thread-level ones included", async () => {
  const server = await startFakeAppServer(async (peer) => {
    const first = await peer.expect("turn/start");
    peer.reply(first, { turn: turnObject("u1", "inProgress") });
    peer.notify("turn/started", { threadId: "t1", turn: turnObject("u1", "inProgress") });
    completeTurn(peer, "t1", "u1");
    const second = await peer.expect("turn/start");
    // Before the turn/start response: a late one of u1, then u2's own (codex does not order
    // these and the response).
    peer.notify("item/agentMessage/delta", {
      threadId: "t1",
      turnId: "u1",
      itemId: "m",
      delta: "late",
    });
    peer.notify("thread/status/changed", {
      threadId: "t1",
      status: { type: "active", activeFlags: [] },
    });
    peer.notify("turn/started", { threadId: "t1", turn: turnObject("u2", "inProgress") });
    peer.reply(second, { turn: turnObject("u2", "inProgress") });
    peer.notify("item/agentMessage/delta", {
      threadId: "t1",
      turnId: "u2",
      itemId: "m",
      delta: "a",
    });
    peer.notify("item/agentMessage/delta", {
      threadId: "t1",
      turnId: "u1",
      itemId: "m",
      delta: "later",
    });
    peer.notify("item/agentMessage/delta", {
      threadId: "t2",
      turnId: "u2",
      itemId: "m",
      delta: "elsewhere",
    });
    peer.notify("item/completed", itemCompleted("t1", "u2", agentMessage("m", "a")));
    peer.notify("thread/status/changed", { threadId: "t1", status: { type: "idle" } });
    completeTurn(peer, "t1", "u2");
    peer.notify("thread/status/changed", {
      threadId: "t1",
      status: { type: "active", activeFlags: [] },
    });
  });
  const conn = await Conn.dial(server.url);
  try {
    const firstSeen: string[] = [];
    await conn.turn("t1", { input }, {
      onNotification: (method, params) => firstSeen.push(`${method} ${turnOf(params)}`),
    });
    const seen: string[] = [];
    const turn = await conn.turn("t1", { input }, {
      onNotification: (method, params) => seen.push(`${method} ${turnOf(params)}`),
    });
    assert.equal(turn.id, "u2");
    assert.deepEqual(firstSeen, ["turn/started u1", "turn/completed u1"]);
    assert.deepEqual(seen, [
      "thread/status/changed -",
      "turn/started u2",
      "item/agentMessage/delta u2",
      "item/completed u2",
      "thread/status/changed -",
      "turn/completed u2",
    ]);
    await server.scriptsDone();
  } finally {
    conn.close();
    await server.close();
  }
});

test("Conn.turn() hands a turn waiting in line none of the running turn's notifications", async () => {
  const flood = 10_000;
  const server = await startFakeAppServer(async (peer) => {
    const first = await peer.expect("turn/start");
    peer.reply(first, { turn: turnObject("u1", "inProgress") });
    for (let i = 0; i < flood / 2; i++) {
      peer.notify("item/agentMessage/delta", {
        threadId: "t1",
        turnId: "u1",
        itemId: "m",
        delta: `${i}`,
      });
      peer.notify("thread/status/changed", {
        threadId: "t1",
        status: { type: "active", activeFlags: [] },
      });
    }
    completeTurn(peer, "t1", "u1");
    const second = await peer.expect("turn/start");
    peer.reply(second, { turn: turnObject("u2", "inProgress") });
    peer.notify("turn/started", { threadId: "t1", turn: turnObject("u2", "inProgress") });
    completeTurn(peer, "t1", "u2");
  });
  const conn = await Conn.dial(server.url);
  try {
    let firstCount = 0;
    let secondCountWhileWaiting = -1;
    const secondSeen: string[] = [];
    const first = conn.turn("t1", { input }, {
      onNotification: (method) => {
        firstCount++;
        if (method === "turn/completed") secondCountWhileWaiting = secondSeen.length;
      },
    });
    const second = conn.turn("t1", { input }, {
      onNotification: (method, params) => secondSeen.push(`${method} ${turnOf(params)}`),
    });
    assert.equal((await first).id, "u1");
    assert.equal((await second).id, "u2");
    assert.equal(firstCount, flood + 1);
    assert.equal(secondCountWhileWaiting, 0);
    // Nothing was held for it either: a held thread-level notification would show up here
    // once its turn id was known.
    assert.deepEqual(secondSeen, ["turn/started u2", "turn/completed u2"]);
    await server.scriptsDone();
  } finally {
    conn.close();
    await server.close();
  }
});

test("Conn answers with an error when an approval policy's result cannot be sent as JSON", async () => {
  const answers = new Map<string, Message>();
  const methods = ["bigint", "circular", "function", "sync-bigint", "odd-throw", "ok"];
  const server = await startFakeAppServer(async (peer) => {
    for (const [i, method] of methods.entries()) {
      answers.set(method, await peer.request(method, {}, i, { unchecked: true }));
    }
  });
  const rejections = watchUnhandledRejections();
  const circular: Record<string, unknown> = { decision: "accept" };
  circular.self = circular;
  const conn = await Conn.dial(server.url, {
    approvals: (request) => {
      switch (request.method) {
        case "bigint":
          return Promise.resolve({ decision: "accept", n: 10n });
        case "circular":
          return Promise.resolve(circular);
        case "function":
          return Promise.resolve(() => "accept");
        case "sync-bigint":
          return { decision: "accept", n: 10n };
        case "odd-throw":
          throw Object.create(null); // no message, no toString
        default:
          return { decision: "accept" };
      }
    },
  });
  try {
    const outcomes: string[] = [];
    conn.addEventListener("serverrequest", (event) => {
      const { request, outcome } = event as ServerRequestEvent;
      outcomes.push(`${request.method}:${outcome}`);
    });
    await waitFor("every request answered", () => answers.size === methods.length, 2_000);
    for (const method of ["bigint", "circular", "function", "sync-bigint"]) {
      const answer = answers.get(method)!;
      assert.equal(answer.result, undefined, method);
      assert.equal(answer.error?.code, -32603, method);
      assert.match(answer.error!.message, /cannot be sent as JSON/, method);
    }
    assert.equal(answers.get("odd-throw")!.error?.code, -32603);
    assert.deepEqual(answers.get("ok")!.result, { decision: "accept" });
    assert.deepEqual(outcomes, [
      "bigint:error",
      "circular:error",
      "function:error",
      "sync-bigint:error",
      "odd-throw:error",
      "ok:custom",
    ]);
    assert.deepEqual(rejections.reasons, []);
    assert.equal(conn.closed, false);
  } finally {
    rejections.restore();
    conn.close();
    await server.close();
  }
});

test("Conn leaves no timer armed once 300 turns and requests with distinct timeouts have settled", async () => {
  const server = await startFakeAppServer((peer) => codexLike(peer));
  const conn = await Conn.dial(server.url);
  const timers = trackTimers();
  try {
    const threads = await Promise.all(
      Array.from({ length: 150 }, (_, i) => conn.startThread({}, { timeoutMs: 60_000 + i })),
    );
    await Promise.all(
      threads.map((threadId, i) => conn.turn(threadId, { input }, { timeoutMs: 120_000 + i })),
    );
    assert.ok(timers.delays.length > 0, "the calls had deadlines");
    assert.deepEqual(timers.live().map((timer) => timer.delay), []);
  } finally {
    timers.restore();
    conn.close();
    await server.close();
  }
});

test("Conn caps the timer of a deadline past the timer limit and does not time out early", async () => {
  const server = await startFakeAppServer(() => {});
  const conn = await Conn.dial(server.url);
  const timers = trackTimers();
  try {
    const timeoutMs = 3_000 * 3_600_000;
    let settled = false;
    const call = conn.request("never/answered", {}, { timeoutMs });
    call.catch(() => {}).finally(() => (settled = true));
    await new Promise((resolve) => setTimeout(resolve, 30));
    assert.equal(settled, false);
    assert.ok(timers.delays.length > 0);
    assert.ok(Math.max(...timers.delays) <= MAX_TIMER_DELAY_MS, `${Math.max(...timers.delays)}`);
    conn.close();
    await assert.rejects(call, ConnectionClosedError);
  } finally {
    timers.restore();
    conn.close();
    await server.close();
  }
});

test("Conn.turn() keeps the thread of an abandoned turn busy for an interruptTimeoutMs past the timer limit", async () => {
  const controller = new AbortController();
  const server = await startFakeAppServer(async (peer) => {
    peer.reply(await peer.expect("turn/start"), { turn: turnObject("u1", "inProgress") });
    controller.abort(new Error("caller left"));
    await peer.expect("turn/interrupt"); // never answered, and u1 never stops
  });
  const conn = await Conn.dial(server.url, { interruptTimeoutMs: 3_000 * 3_600_000 });
  const timers = trackTimers();
  try {
    await assert.rejects(conn.turn("t1", { input }, { signal: controller.signal }), /caller left/);
    await server.scriptsDone();
    // The lane stays held: a second turn/start now would be merged into u1 by codex.
    await assert.rejects(conn.turn("t1", { input }, { timeoutMs: 40 }), (error: unknown) => {
      assert.ok(error instanceof TimeoutError);
      assert.equal(error.turnId, null);
      return true;
    });
    assert.equal(server.peers[0]!.received.filter((m) => m.method === "turn/start").length, 1);
    assert.ok(Math.max(...timers.delays) <= MAX_TIMER_DELAY_MS, `${Math.max(...timers.delays)}`);
  } finally {
    timers.restore();
    conn.close();
    await server.close();
  }
});

test("Conn.turn() resumes a thread again once maxAttachedThreads has forgotten it", async () => {
  const server = await startFakeAppServer((peer) => codexLike(peer));
  const conn = await Conn.dial(server.url, { maxAttachedThreads: 2 });
  try {
    for (const threadId of ["a", "b", "a", "c", "a", "b"]) await conn.turn(threadId, { input });
    const resumed = server.peers[0]!.received
      .filter((m) => m.method === "thread/resume")
      .map((m) => m.params.threadId);
    // a and b are attached; a's use keeps it while c pushes b out; b comes back.
    assert.deepEqual(resumed, ["a", "b", "c", "b"]);
  } finally {
    conn.close();
    await server.close();
  }
});

test("Conn remembers at most 10,000 attached threads by default", async () => {
  const server = await startFakeAppServer((peer) => codexLike(peer));
  const conn = await Conn.dial(server.url);
  try {
    const threads: string[] = [];
    for (let batch = 0; batch < 10; batch++) {
      threads.push(...await Promise.all(Array.from({ length: 1_000 }, () => conn.startThread())));
    }
    await conn.turn(threads[0]!, { input }); // still attached: the 10,000th
    threads.push(await conn.startThread()); // the 10,001st pushes out the least recent, thr-2
    await conn.turn(threads[1]!, { input });
    await conn.turn(threads[0]!, { input });
    const resumed = server.peers[0]!.received
      .filter((m) => m.method === "thread/resume")
      .map((m) => m.params.threadId);
    assert.deepEqual(resumed, [threads[1]]);
  } finally {
    conn.close();
    await server.close();
  }
});

test("Conn.dial() refuses a maxAttachedThreads that is not a positive integer", async () => {
  for (const maxAttachedThreads of [0, 1.5, -3]) {
    await assert.rejects(Conn.dial("ws://127.0.0.1:1", { maxAttachedThreads }), RangeError);
  }
});

test("Conn.turn() times out, not with a stale overload, when turn/start gets no answer after thread/resume was retried", async () => {
  let resumes = 0;
  const server = await startFakeAppServer((peer) => {
    peer.handle((m) => {
      if (m.method === "thread/resume") {
        if (resumes++ === 0) peer.replyError(m as Req, -32001, "Server overloaded; retry later.");
        else peer.reply(m as Req, threadResult("t1"));
        return true;
      }
      return m.method === "turn/start"; // never answered
    });
  }, { autoResume: false });
  const conn = await Conn.dial(server.url, { retry: fastRetry, interruptTimeoutMs: 20 });
  try {
    await assert.rejects(conn.turn("t1", { input }, { timeoutMs: 150 }), (error: unknown) => {
      assert.ok(error instanceof TimeoutError, `got ${String(error)}`);
      assert.equal(error.turnId, null);
      return true;
    });
    assert.equal(resumes, 2);
  } finally {
    conn.close();
    await server.close();
  }
});

test("Conn.turn() times out, not with the overload, when the retry of an overloaded turn/start gets no answer", async () => {
  let starts = 0;
  const server = await startFakeAppServer((peer) => {
    peer.handle((m) => {
      if (m.method !== "turn/start") return false;
      if (starts++ === 0) peer.replyError(m as Req, -32001, "Server overloaded; retry later.");
      return true; // the retry is never answered
    });
  });
  const conn = await Conn.dial(server.url, { retry: fastRetry, interruptTimeoutMs: 20 });
  try {
    await assert.rejects(conn.turn("t1", { input }, { timeoutMs: 150 }), (error: unknown) => {
      assert.ok(error instanceof TimeoutError, `got ${String(error)}`);
      return true;
    });
    assert.equal(starts, 2);
  } finally {
    conn.close();
    await server.close();
  }
});

test("Conn.request() times out, not with the overload, when the retry of an overloaded call gets no answer", async () => {
  let calls = 0;
  const server = await startFakeAppServer((peer) => {
    peer.handle((m) => {
      if (m.method !== "thread/list") return false;
      if (calls++ === 0) peer.replyError(m as Req, -32001, "Server overloaded; retry later.");
      return true; // the retry is never answered
    });
  });
  const conn = await Conn.dial(server.url, { retry: fastRetry });
  try {
    await assert.rejects(conn.request("thread/list", {}, { timeoutMs: 150 }), (error: unknown) => {
      assert.ok(!(error instanceof RpcError), `got ${String(error)}`);
      assert.equal((error as Error).name, "TimeoutError");
      return true;
    });
    assert.equal(calls, 2);
  } finally {
    conn.close();
    await server.close();
  }
});

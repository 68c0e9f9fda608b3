// Property-based test of Conn's demultiplexing: fast-check generates calls, what the server
// answers to each, noise and a close, plus the order in which the server's frames and the
// callers' aborts happen; an in-process FakeWebSocket plays the server, so one scenario runs
// in a few ms plus its short deadlines. `CONN_PROPERTY_RUNS` and `CONN_PROPERTY_SEED`
// override the number of runs and the seed (fast-check prints the seed of a failure).
import { test } from "./_test.ts";
import { type TimerTracker, trackTimers } from "./_timers.ts";
import { watchUnhandledRejections } from "./_unhandled.ts";
import { FakeWebSocket, installFakeWebSocket } from "./_fake_socket.ts";
import assert from "node:assert/strict";
import process from "node:process";
import fc from "fast-check";
import {
  type Approvals,
  Conn,
  ConnectionClosedError,
  RpcError,
  TimeoutError,
  type Turn,
  TurnRpcError,
} from "../mod.ts";

const NUM_RUNS = Number(process.env.CONN_PROPERTY_RUNS ?? 150);
const SEED = Number(process.env.CONN_PROPERTY_SEED ?? 20261129);
/** Deadline of calls that must not time out: far beyond a scenario's length. */
const LONG_MS = 5_000;
const INTERRUPT_TIMEOUT_MS = 25;
/** The last one is not started on the connection: its first turn resumes it. */
const THREADS = ["thread-0", "thread-1", "thread-2"];
const STARTED_THREADS = 2;

interface RequestPlan {
  readonly kind: "request";
  /**
   * "twice": the response comes twice; "overloaded": the first attempt is answered -32001,
   * the retry with the result; "silent": never, so the call times out.
   */
  readonly answer: "result" | "error" | "twice" | "overloaded" | "silent";
  readonly abort: boolean;
  /** Started by a ready action rather than at once: after some frames, maybe after a close. */
  readonly late: boolean;
  readonly timeoutMs: number;
}

interface TurnPlan {
  readonly kind: "turn";
  readonly thread: number;
  /**
   * The turn/start response; "overloaded": -32001 to the first attempt, then as "ok";
   * "silent": none, and no notifications either.
   */
  readonly answer: "ok" | "overloaded" | "error" | "silent";
  /** item/completed notifications codex sends for the turn, in this order. */
  readonly items: number;
  /** A delta of the turn before each item. */
  readonly deltas: boolean;
  /** Whether codex completes the turn on its own. */
  readonly complete: boolean;
  /** What codex does on turn/interrupt: completes the turn as interrupted, or nothing. */
  readonly onInterrupt: "complete" | "ignore";
  readonly abort: boolean;
  readonly late: boolean;
  readonly timeoutMs: number;
}

type CallPlan = RequestPlan | TurnPlan;

type Noise =
  | { readonly kind: "bad"; readonly frame: number }
  | { readonly kind: "serverRequest"; readonly id: number | string; readonly method: string }
  | { readonly kind: "stray"; readonly which: number };

interface Scenario {
  readonly calls: CallPlan[];
  readonly noise: Noise[];
  readonly close: "none" | "server" | "client";
  readonly approvals: "decline" | "accept" | "throws";
  /** Which ready frame or action goes next, cycled. */
  readonly picks: number[];
}

const BAD_FRAMES: (string | "binary")[] = [
  "not json",
  "{",
  "[]",
  "42",
  "null",
  '{"id":{"x":1},"result":1}',
  '{"method":5}',
  '{"method":"x","id":{}}',
  '{"jsonrpc":"2.0"}',
  '{"id":987654,"result":{}}',
  "binary",
];
const INVALID_JSON = new Set([0, 1]);

function strays(): { method: string; params: Record<string, unknown> }[] {
  const item = { type: "agentMessage", id: "stray", text: "stray" };
  return [
    { method: "item/completed", params: { threadId: "thread-x", turnId: "turn-0", item } },
    { method: "item/completed", params: { threadId: "thread-0", turnId: "turn-ghost", item } },
    {
      method: "turn/completed",
      params: { threadId: "thread-1", turn: { id: "turn-ghost", status: "completed", items: [] } },
    },
    { method: "thread/tokenUsage/updated", params: { threadId: "thread-0", tokenUsage: {} } },
    { method: "item/started", params: { threadId: "thread-1", turnId: "turn-1", item } },
  ];
}

const shortMs = fc.integer({ min: 5, max: 30 });

const requestPlan: fc.Arbitrary<RequestPlan> = fc.record({
  kind: fc.constant("request" as const),
  answer: fc.constantFrom(
    "result" as const,
    "error" as const,
    "twice" as const,
    "overloaded" as const,
    "silent" as const,
  ),
  abort: fc.boolean(),
  late: fc.boolean(),
  timeoutMs: shortMs,
}).map((plan) => ({ ...plan, timeoutMs: plan.answer === "silent" ? plan.timeoutMs : LONG_MS }));

const turnPlan: fc.Arbitrary<TurnPlan> = fc.record({
  kind: fc.constant("turn" as const),
  thread: fc.integer({ min: 0, max: THREADS.length - 1 }),
  answer: fc.constantFrom(
    "ok" as const,
    "ok" as const,
    "overloaded" as const,
    "error" as const,
    "silent" as const,
  ),
  items: fc.integer({ min: 0, max: 3 }),
  deltas: fc.boolean(),
  complete: fc.boolean(),
  onInterrupt: fc.constantFrom("complete" as const, "ignore" as const),
  abort: fc.boolean(),
  late: fc.boolean(),
  timeoutMs: shortMs,
}).map((plan) => ({
  ...plan,
  // Only a turn codex never finishes (or never answers) may time out; the others must not.
  timeoutMs: plan.answer === "silent" || (plan.answer !== "error" && !plan.complete)
    ? plan.timeoutMs
    : LONG_MS,
}));

const noise: fc.Arbitrary<Noise> = fc.oneof(
  fc.record({
    kind: fc.constant("bad" as const),
    frame: fc.integer({ min: 0, max: BAD_FRAMES.length - 1 }),
  }),
  fc.record({
    kind: fc.constant("serverRequest" as const),
    // Small numbers collide with the ids of our own requests on purpose.
    id: fc.oneof(fc.integer({ min: 0, max: 5 }), fc.constantFrom("s-a", "s-b")),
    method: fc.constantFrom(
      "item/commandExecution/requestApproval",
      "item/fileChange/requestApproval",
      "mcpServer/elicitation/request",
      "some/unknownRequest",
    ),
  }),
  fc.record({ kind: fc.constant("stray" as const), which: fc.integer({ min: 0, max: 4 }) }),
);

const scenario: fc.Arbitrary<Scenario> = fc.record({
  calls: fc.array(fc.oneof(requestPlan, turnPlan), { minLength: 1, maxLength: 6 }),
  noise: fc.array(noise, { maxLength: 5 }),
  close: fc.constantFrom("none" as const, "none" as const, "server" as const, "client" as const),
  approvals: fc.constantFrom("decline" as const, "accept" as const, "throws" as const),
  picks: fc.array(fc.nat(), { minLength: 1, maxLength: 30 }),
});

/** What happened to one call. */
interface Outcome {
  settled: number;
  /** Listeners still on the caller's signal. */
  listeners: () => number;
  value?: unknown;
  error?: unknown;
  /** The turn's own deltas, items (by id) and completion passed to onNotification. */
  notified: string[];
  /** onNotification calls after the caller saw the turn fail. */
  lateNotifications: number;
  starts: number;
}

function reply(id: unknown, result: unknown): string {
  return JSON.stringify({ id, result });
}

function notification(method: string, params: unknown): string {
  return JSON.stringify({ method, params });
}

function completed(threadId: string, turnId: string, status: string): string {
  return notification("turn/completed", { threadId, turn: { id: turnId, status, items: [] } });
}

function itemIds(items: unknown): string[] {
  return (items as { id: string }[]).map((item) => item.id);
}

/**
 * Counts the listeners code under test keeps on a caller's signal. Once the signal aborted,
 * its `once` listeners are gone by themselves, so it counts none.
 */
function watchListeners(signal: AbortSignal): () => number {
  const live = new Set<unknown>();
  const add = signal.addEventListener.bind(signal);
  const remove = signal.removeEventListener.bind(signal);
  signal.addEventListener = ((type: string, listener: EventListener, options?: unknown) => {
    live.add(listener);
    add(type, listener, options as AddEventListenerOptions);
  }) as typeof signal.addEventListener;
  signal.removeEventListener = ((type: string, listener: EventListener, options?: unknown) => {
    live.delete(listener);
    remove(type, listener, options as EventListenerOptions);
  }) as typeof signal.removeEventListener;
  return () => signal.aborted ? 0 : live.size;
}

async function flushMicrotasks(): Promise<void> {
  for (let i = 0; i < 50; i++) await Promise.resolve();
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

const input = (text: string) => [{ type: "text", text, text_elements: [] }];

async function runScenario(s: Scenario): Promise<void> {
  const timers = trackTimers();
  let ws: FakeWebSocket | undefined;
  const uninstall = installFakeWebSocket((socket) => (ws = socket));
  try {
    await runOn(s, () => ws!, timers);
  } finally {
    uninstall();
    timers.restore();
  }
  assert.deepEqual(timers.live().map((t) => t.delay), [], "no timer is left armed");
}

async function runOn(
  s: Scenario,
  socket: () => FakeWebSocket,
  timers: TimerTracker,
): Promise<void> {
  /** Sequences of frames or actions; each runs in order, the sequences interleave. */
  const ready: (() => void)[][] = [];
  let threadCount = 0;
  /** Threads started or resumed on the connection. */
  const attached = new Set<string>();
  /** While the driver loop runs, answers wait in `ready`; afterwards they come at once. */
  let driving = true;
  /** Calls whose first attempt was answered overloaded. */
  const overloaded = new Set<string>();
  const approvals: Approvals = s.approvals === "throws"
    ? () => {
      throw new Error("policy failed");
    }
    : s.approvals;
  const deliverNow = (frame: string) => queueMicrotask(() => socket().deliver(frame));
  const turnIdOfK = (k: number) => `turn-${k}`;

  const onClientFrame = (frame: string) => {
    const message = JSON.parse(frame) as {
      id?: number;
      method?: string;
      params?: Record<string, unknown>;
    };
    const { id, method, params = {} } = message;
    if (method === undefined || id === undefined) return;
    const ws = socket();
    const deliver = (text: string) => () => void ws.deliver(text);
    if (method === "initialize") return deliverNow(reply(id, { userAgent: "fake" }));
    if (method === "thread/start") {
      const threadId = THREADS[threadCount++]!;
      attached.add(threadId);
      return deliverNow(reply(id, { thread: { id: threadId } }));
    }
    if (method === "test/fresh") return deliverNow(reply(id, { fresh: params.k }));
    if (method === "test/call") {
      const plan = s.calls[params.k as number] as RequestPlan;
      if (plan.answer === "overloaded" && !overloaded.has(`request ${params.k}`)) {
        overloaded.add(`request ${params.k}`);
        ready.push([deliver(JSON.stringify({ id, error: { code: -32001, message: "busy" } }))]);
        return;
      }
      if (plan.answer !== "error" && plan.answer !== "silent") {
        ready.push([deliver(reply(id, { k: params.k }))]);
      }
      if (plan.answer === "twice") ready.push([deliver(reply(id, { k: params.k }))]);
      if (plan.answer === "error") {
        ready.push([
          deliver(JSON.stringify({ id, error: { code: -32000, message: "refused" } })),
        ]);
      }
      return;
    }
    if (method === "turn/start") {
      const threadId = params.threadId as string;
      const text = (params.input as { text: string }[])[0]!.text;
      if (!attached.has(threadId)) {
        // Like codex: a thread must be started or resumed on the connection first.
        const error = { code: -32600, message: `thread not found: ${threadId}` };
        return deliverNow(JSON.stringify({ id, error }));
      }
      if (text === "fresh") {
        const turnId = `fresh-${threadId}`;
        deliverNow(reply(id, { turn: { id: turnId, status: "inProgress", items: [] } }));
        deliverNow(
          notification("item/completed", {
            threadId,
            turnId,
            item: { type: "agentMessage", id: "fresh-item", text: "ok" },
          }),
        );
        return deliverNow(completed(threadId, turnId, "completed"));
      }
      const k = Number(text);
      const plan = s.calls[k] as TurnPlan;
      const turnId = turnIdOfK(k);
      if (plan.answer === "silent") return;
      if (plan.answer === "error") {
        ready.push([
          deliver(JSON.stringify({ id, error: { code: -32000, message: "refused" } })),
        ]);
        return;
      }
      if (plan.answer === "overloaded" && !overloaded.has(turnId)) {
        overloaded.add(turnId);
        ready.push([deliver(JSON.stringify({ id, error: { code: -32001, message: "busy" } }))]);
        return;
      }
      ready.push([deliver(reply(id, { turn: { id: turnId, status: "inProgress", items: [] } }))]);
      // codex's own order for the turn; the response above is not ordered with it.
      const stream: (() => void)[] = [];
      for (let i = 0; i < plan.items; i++) {
        if (plan.deltas) {
          stream.push(
            deliver(notification("item/agentMessage/delta", { threadId, turnId, delta: "x" })),
          );
        }
        const item = { type: "agentMessage", id: `${k}-${i}`, text: "t" };
        stream.push(deliver(notification("item/completed", { threadId, turnId, item })));
      }
      if (plan.complete) stream.push(deliver(completed(threadId, turnId, "completed")));
      if (stream.length > 0) ready.push(stream);
      return;
    }
    if (method === "turn/interrupt") {
      const turnId = params.turnId as string;
      const k = Number(turnId.slice("turn-".length));
      ready.push([deliver(reply(id, {}))]);
      if ((s.calls[k] as TurnPlan).onInterrupt === "complete") {
        ready.push([deliver(completed(params.threadId as string, turnId, "interrupted"))]);
      }
      return;
    }
    if (method === "thread/resume") {
      attached.add(params.threadId as string);
      const answer = reply(id, { thread: { id: params.threadId } });
      if (driving) ready.push([deliver(answer)]);
      else deliverNow(answer);
      return;
    }
    throw new Error(`Unexpected request ${method}`);
  };

  const conn = await dialFake(approvals, socket, onClientFrame);
  for (let i = 0; i < STARTED_THREADS; i++) await conn.startThread({}, { timeoutMs: LONG_MS });
  let closeEvents = 0;
  let serverRequestEvents = 0;
  conn.addEventListener("close", () => closeEvents++);
  conn.addEventListener("serverrequest", () => serverRequestEvents++);
  const ws = socket();

  // Noise and the close are ready from the start; calls' frames once the call is sent.
  const deliveredRequests: (number | string)[] = [];
  let badJson = 0;
  let badBinary = 0;
  for (const entry of s.noise) {
    if (entry.kind === "bad") {
      const frame = BAD_FRAMES[entry.frame]!;
      ready.push([() => {
        const sent = ws.deliver(frame === "binary" ? new Uint8Array([1, 2]).buffer : frame);
        if (sent && frame === "binary") badBinary++;
        else if (sent && INVALID_JSON.has(entry.frame)) badJson++;
      }]);
    } else if (entry.kind === "serverRequest") {
      const params = { threadId: "thread-0", turnId: "turn-0", itemId: "i" };
      ready.push([() => {
        const frame = JSON.stringify({ id: entry.id, method: entry.method, params });
        if (ws.deliver(frame)) deliveredRequests.push(entry.id);
      }]);
    } else {
      const stray = strays()[entry.which]!;
      ready.push([() => void ws.deliver(notification(stray.method, stray.params))]);
    }
  }
  let closedAt = false;
  if (s.close !== "none") {
    ready.push([() => {
      closedAt = true;
      if (s.close === "server") ws.drop();
      else conn.close();
    }]);
  }

  const outcomes: Outcome[] = [];
  const reasons: Error[] = [];
  const promises: Promise<void>[] = [];
  s.calls.forEach((plan, k) => {
    const controller = new AbortController();
    const outcome: Outcome = {
      settled: 0,
      listeners: watchListeners(controller.signal),
      notified: [],
      lateNotifications: 0,
      starts: 0,
    };
    outcomes.push(outcome);
    const reason = new Error(`caller ${k} gave up`);
    reasons.push(reason);
    if (plan.abort) ready.push([() => controller.abort(reason)]);
    let failed = false;
    const startCall = (): Promise<unknown> =>
      plan.kind === "request"
        ? conn.request("test/call", { k }, { signal: controller.signal, timeoutMs: plan.timeoutMs })
        : conn.turn(THREADS[plan.thread]!, { input: input(String(k)) }, {
          signal: controller.signal,
          timeoutMs: plan.timeoutMs,
          onStart: () => outcome.starts++,
          onNotification: (method, params) => {
            if (failed) outcome.lateNotifications++;
            if (method === "item/agentMessage/delta") outcome.notified.push("delta");
            if (method === "item/completed") {
              outcome.notified.push((params.item as { id: string }).id);
            }
            if (method === "turn/completed") outcome.notified.push("completed");
          },
        });
    const settle = (call: Promise<unknown>) =>
      call.then(
        (value) => {
          outcome.settled++;
          outcome.value = value;
        },
        (error) => {
          failed = true;
          outcome.settled++;
          outcome.error = error;
        },
      );
    const start = () => promises.push(settle(startCall()));
    if (plan.late) ready.push([start]);
    else start();
  });

  // The server side: one ready frame or action at a time, in the order the picks choose;
  // when none is ready, real time passes for deadlines to expire.
  let pick = 0;
  const giveUpAt = Date.now() + 3_000;
  for (;;) {
    await flushMicrotasks();
    if (ready.length > 0) {
      const index = s.picks[pick++ % s.picks.length]! % ready.length;
      const sequence = ready[index]!;
      const action = sequence.shift()!;
      if (sequence.length === 0) ready.splice(index, 1);
      action();
      continue;
    }
    if (outcomes.every((o) => o.settled > 0) && conn.inFlight === 0) break;
    if (Date.now() > giveUpAt) {
      const stuck = `settled ${outcomes.map((o) => o.settled)}, inFlight ${conn.inFlight}`;
      conn.close();
      await conn.finished;
      assert.fail(`Scenario stuck: ${stuck}`);
    }
    await sleep(2);
  }
  await Promise.all(promises);
  driving = false;

  // Every call settled exactly once, with an outcome its plan allows.
  s.calls.forEach((plan, k) => {
    const o = outcomes[k]!;
    assert.equal(o.settled, 1, `call ${k} settles exactly once`);
    assert.equal(o.listeners(), 0, `call ${k} leaves no listener on its signal`);
    const clean = !plan.abort && s.close === "none";
    const error = o.error;
    if (plan.kind === "request") {
      if (error === undefined) {
        assert.ok(plan.answer !== "error" && plan.answer !== "silent", `call ${k} resolved`);
        assert.deepEqual(o.value, { k });
      } else if (error instanceof RpcError) {
        assert.equal(plan.answer, "error");
        assert.equal(error.code, -32000);
      } else if (error === reasons[k]) {
        assert.ok(plan.abort);
      } else if (error instanceof DOMException && error.name === "TimeoutError") {
        assert.equal(plan.answer, "silent", `call ${k} timed out though answered`);
      } else if (error instanceof ConnectionClosedError) {
        assert.notEqual(s.close, "none");
      } else {
        assert.fail(`call ${k} failed with ${error}`);
      }
      if (clean && plan.answer !== "silent") {
        assert.equal(error === undefined, plan.answer !== "error", `call ${k} outcome`);
      }
      return;
    }
    const expected = Array.from({ length: plan.items }, (_, i) => `${k}-${i}`);
    const stream = [...expected.flatMap((id) => plan.deltas ? ["delta", id] : [id]), "completed"];
    assert.ok(o.starts <= 1, `turn ${k} starts at most once`);
    assert.equal(o.lateNotifications, 0, `turn ${k} gets no notification once it failed`);
    // What it was told of is codex's stream for the turn, in codex's order, nothing foreign.
    assert.deepEqual(o.notified, stream.slice(0, o.notified.length), `turn ${k} stream order`);
    if (error === undefined) {
      const turn = o.value as Turn;
      assert.equal(turn.id, `turn-${k}`);
      assert.equal(turn.status, "completed");
      assert.deepEqual(itemIds(turn.items), expected, `turn ${k} collects its items in order`);
      assert.deepEqual(o.notified, stream);
      assert.equal(o.starts, 1);
    } else if (error instanceof TurnRpcError) {
      // An overload surfaces when the deadline leaves no room for a retry.
      assert.ok(
        plan.answer === "error" || (plan.answer === "overloaded" && error.code === -32001),
        `turn ${k} failed with ${error.code}`,
      );
    } else if (error === reasons[k]) {
      assert.ok(plan.abort);
    } else if (error instanceof TimeoutError) {
      assert.ok(plan.timeoutMs < LONG_MS, `turn ${k} timed out though completed`);
    } else if (error instanceof ConnectionClosedError) {
      assert.notEqual(s.close, "none");
    } else {
      assert.fail(`turn ${k} failed with ${error}`);
    }
    if (clean && (plan.answer === "ok" || plan.answer === "overloaded") && plan.complete) {
      assert.equal(error, undefined, `turn ${k} resolves`);
    }
    if (clean && plan.answer === "error") assert.ok(error instanceof TurnRpcError);
  });

  // Every server request delivered got exactly one answer.
  const answers = ws.sent.map((frame) => JSON.parse(frame) as Record<string, unknown>)
    .filter((message) => message.method === undefined);
  for (const id of new Set(deliveredRequests)) {
    const delivered = deliveredRequests.filter((x) => x === id).length;
    const answered = answers.filter((message) => message.id === id);
    assert.equal(answered.length, delivered, `server request ${id} answered once per delivery`);
    for (const answer of answered) assert.ok("result" in answer || "error" in answer);
  }
  assert.equal(answers.length, deliveredRequests.length, "no answer to anything else");
  assert.equal(serverRequestEvents, deliveredRequests.length, "one event per server request");
  assert.equal(closeEvents, closedAt ? 1 : 0, "one close event once closed");
  assert.equal(conn.stats.dropped.invalidJson, badJson);
  assert.equal(conn.stats.dropped.binary, badBinary);
  assert.equal(conn.inFlight, 0);
  assert.equal(conn.closed, closedAt);
  // Idle, the connection arms no timer (the driver's own sleeps have all fired by now).
  assert.deepEqual(timers.live().map((t) => t.delay), [], "no timer is left once idle");

  // Unless closed, the connection still works: a request and a turn on every thread.
  if (!conn.closed) {
    assert.deepEqual(await conn.request("test/fresh", { k: 1 }, { timeoutMs: LONG_MS }), {
      fresh: 1,
    });
    for (const threadId of THREADS) {
      const turn = await conn.turn(threadId, { input: input("fresh") }, { timeoutMs: LONG_MS });
      assert.equal(turn.id, `fresh-${threadId}`);
      assert.deepEqual(itemIds(turn.items), ["fresh-item"]);
    }
    assert.equal(conn.inFlight, 0);
  }
  conn.close();
  await conn.finished;
  assert.equal(ws.readyState, FakeWebSocket.CLOSED);
  assert.equal(closeEvents, 1, "exactly one close event");
}

async function dialFake(
  approvals: Approvals,
  socket: () => FakeWebSocket,
  onClientFrame: (frame: string) => void,
): Promise<Conn> {
  const dialing = Conn.dial("ws://fake.invalid/", {
    approvals,
    interruptTimeoutMs: INTERRUPT_TIMEOUT_MS,
    handshakeTimeoutMs: LONG_MS,
    retry: { initialDelayMs: 2, maxDelayMs: 5 },
  });
  // The constructor ran synchronously inside dial; the socket opens on a microtask.
  socket().onClientFrame = onClientFrame;
  return await dialing;
}

test("Conn settles every call once, keeps each turn's items in order and leaves nothing behind, whatever the server's order", async () => {
  const unhandled = watchUnhandledRejections();
  try {
    await fc.assert(fc.asyncProperty(scenario, runScenario), {
      numRuns: NUM_RUNS,
      seed: SEED,
    });
  } finally {
    unhandled.restore();
  }
  assert.deepEqual(unhandled.reasons, []);
});

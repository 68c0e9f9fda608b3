import { test } from "./_test.ts";
import assert from "node:assert/strict";
import {
  abortable,
  createScope,
  DeadlineClock,
  delay,
  HookedController,
} from "../src/_deadline.ts";
import { MAX_TIMER_DELAY_MS, unrefTimer } from "../src/_timer.ts";
import { trackTimers } from "./_timers.ts";

const HOURS_3000 = 3_000 * 3_600_000;

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

test("DeadlineClock expires each scope at its own deadline, skipping settled ones", async () => {
  const clock = new DeadlineClock();
  const first = createScope([], 100, clock);
  await sleep(50);
  const second = createScope([], 100, clock);
  first.dispose(); // settled early: its armed timer must not expire the second one early
  await sleep(60);
  assert.equal(first.signal.aborted, false);
  assert.equal(second.signal.aborted, false, "second has ~40 ms left");
  await sleep(60);
  assert.equal(second.signal.aborted, true);
  assert.equal(second.timedOut, true);
  assert.equal((second.signal.reason as DOMException).name, "TimeoutError");
  clock.close(new Error("done"));
});

test("DeadlineClock serves different timeouts independently", async () => {
  const clock = new DeadlineClock();
  const long = createScope([], 60, clock);
  const short = createScope([], 10, clock);
  await sleep(30);
  assert.equal(short.timedOut, true);
  assert.equal(long.signal.aborted, false);
  long.dispose();
  clock.close(new Error("done"));
});

test("DeadlineClock.close() aborts live scopes with the reason and new scopes at once", () => {
  const clock = new DeadlineClock();
  const live = createScope([], 1_000, clock);
  const reason = new Error("closed");
  clock.close(reason);
  assert.equal(live.signal.reason, reason);
  assert.equal(live.timedOut, false);
  const late = createScope([], 1_000, clock);
  assert.equal(late.signal.reason, reason);
});

test("a scope aborts with its parent's reason and abortable() rejects with it", async () => {
  const clock = new DeadlineClock();
  const parent = new AbortController();
  const scope = createScope([parent.signal], 1_000, clock);
  const waiting = abortable(new Promise(() => {}), scope);
  const reason = new Error("caller left");
  parent.abort(reason);
  await assert.rejects(waiting, (error) => error === reason);
  assert.equal(scope.timedOut, false);
  clock.close(new Error("done"));
});

test("a scope created in an expiring scope's abort hook still gets its own deadline", async () => {
  const clock = new DeadlineClock();
  const first = createScope([], 10, clock);
  let second: ReturnType<typeof createScope> | undefined;
  first.onAbort(() => (second = createScope([], 10, clock)));
  await sleep(15);
  assert.equal(first.timedOut, true);
  assert.ok(second);
  assert.equal(second.signal.aborted, false);
  await sleep(20);
  assert.equal(second.timedOut, true);
  clock.close(new Error("done"));
});

test("DeadlineClock leaves no timer armed once its scopes have settled", () => {
  const timers = trackTimers();
  const clock = new DeadlineClock();
  try {
    const scopes = Array.from({ length: 300 }, (_, i) => createScope([], 60_000 + i, clock));
    assert.ok(timers.live().length <= 1, `${timers.live().length} timers for 300 scopes`);
    for (const scope of scopes) scope.dispose();
    assert.equal(timers.live().length, 0);
    // Settling in another order (latest deadline first) leaves none either.
    const more = Array.from({ length: 300 }, (_, i) => createScope([], 90_000 - i, clock));
    for (const scope of more.reverse()) scope.dispose();
    assert.equal(timers.live().length, 0);
    assert.equal(clock.size, 0);
  } finally {
    timers.restore();
    clock.close(new Error("done"));
  }
});

test("unrefTimer() lets a timer stop holding the process open", () => {
  const timer = setTimeout(() => {}, 60_000);
  try {
    unrefTimer(timer);
    const refs = timer as unknown as { hasRef?(): boolean };
    // Node, Bun and Deno 2 give timer objects; a numeric id has nothing to ask.
    if (typeof refs.hasRef === "function") assert.equal(refs.hasRef(), false);
  } finally {
    clearTimeout(timer);
  }
});

test("DeadlineClock expires scopes of many distinct timeouts each at its own deadline", async () => {
  const clock = new DeadlineClock();
  const scopes = [40, 10, 30, 20, 50].map((ms) => createScope([], ms, clock));
  const order: number[] = [];
  scopes.forEach((scope, i) => scope.onAbort(() => order.push(i)));
  scopes[2]!.dispose(); // settled: never expires
  await sleep(80);
  assert.deepEqual(order, [1, 3, 0, 4]);
  assert.ok(scopes.every((scope, i) => i === 2 ? !scope.signal.aborted : scope.timedOut));
  clock.close(new Error("done"));
});

test("DeadlineClock caps a deadline past the timer limit and re-arms until it", async () => {
  const timers = trackTimers();
  const clock = new DeadlineClock();
  try {
    const scope = createScope([], HOURS_3000, clock);
    await sleep(20);
    assert.equal(scope.signal.aborted, false);
    const [timer] = timers.live();
    assert.ok(timer);
    assert.ok(timer.delay <= MAX_TIMER_DELAY_MS, `delay ${timer.delay}`);
    timer.fire(); // what the capped timer does after 24.8 days
    assert.equal(scope.signal.aborted, false);
    assert.equal(timers.live().length, 1);
    assert.ok(timers.live()[0]!.delay <= MAX_TIMER_DELAY_MS);
    scope.dispose();
    assert.equal(timers.live().length, 0);
  } finally {
    timers.restore();
    clock.close(new Error("done"));
  }
});

test("a scope without a clock caps a deadline past the timer limit and re-arms until it", async () => {
  const timers = trackTimers();
  try {
    const scope = createScope([], HOURS_3000);
    await sleep(20);
    assert.equal(scope.signal.aborted, false);
    const [timer] = timers.live();
    assert.ok(timer && timer.delay <= MAX_TIMER_DELAY_MS, `delay ${timer?.delay}`);
    timer.fire();
    assert.equal(scope.signal.aborted, false);
    assert.ok(timers.live()[0]!.delay <= MAX_TIMER_DELAY_MS);
    scope.dispose();
    assert.equal(timers.live().length, 0);
  } finally {
    timers.restore();
  }
});

test("delay() waits out a delay past the timer limit in capped timers", async () => {
  const timers = trackTimers();
  const controller = new AbortController();
  try {
    let resolved = false;
    const waiting = delay(HOURS_3000, controller.signal).then(() => (resolved = true));
    await sleep(20);
    const [timer] = timers.live();
    assert.ok(timer && timer.delay <= MAX_TIMER_DELAY_MS, `delay ${timer?.delay}`);
    timer.fire();
    await sleep(0);
    assert.equal(resolved, false);
    assert.equal(timers.live().length, 1);
    controller.abort(new Error("stop"));
    await assert.rejects(waiting, /stop/);
    assert.equal(timers.live().length, 0);
  } finally {
    timers.restore();
  }
});

test("delay() with a scope resolves after the delay and rejects when the scope aborts", async () => {
  const clock = new DeadlineClock();
  const scope = createScope([], 1_000, clock);
  await delay(5, scope);
  const parent = new AbortController();
  const child = createScope([parent.signal], 1_000, clock);
  const waiting = delay(1_000, child);
  parent.abort(new Error("left"));
  await assert.rejects(waiting, /left/);
  scope.dispose();
  clock.close(new Error("done"));
});

test("a scope makes its AbortSignal only when asked, aborted with the reason if the scope already is", () => {
  const real = globalThis.AbortController;
  let made = 0;
  globalThis.AbortController = class extends real {
    constructor() {
      super();
      made++;
    }
  };
  try {
    const clock = new DeadlineClock();
    const parent = new real();
    const scope = createScope([parent.signal], 60_000, clock);
    assert.equal(scope.aborted, false);
    parent.abort("gone");
    assert.deepEqual([scope.aborted, scope.reason, made], [true, "gone", 0]);
    assert.equal(scope.signal.aborted, true);
    assert.equal(scope.signal.reason, "gone");
    assert.equal(made, 1);
    const live = createScope([], 60_000, clock);
    const signal = live.signal;
    live.dispose();
    clock.close("closed");
    assert.equal(signal.aborted, false, "a disposed scope is not aborted by its clock");
  } finally {
    globalThis.AbortController = real;
  }
});

test("a HookedController's signal is heard by scopes and waits without event listeners, and by others' listeners as usual", async () => {
  const controller = new HookedController();
  const signal = controller.signal;
  let listeners = 0;
  const add = signal.addEventListener.bind(signal);
  signal.addEventListener = ((...args: Parameters<AbortSignal["addEventListener"]>) => {
    listeners++;
    add(...args);
  }) as AbortSignal["addEventListener"];
  const clock = new DeadlineClock();
  const scope = createScope([signal], 60_000, clock);
  const waiting = delay(60_000, signal);
  const work = abortable(new Promise<never>(() => {}), signal);
  const removed = createScope([signal], 60_000, clock);
  removed.dispose();
  assert.equal(listeners, 0, "no event listener for this module's scopes and waits");
  const heard: unknown[] = [];
  signal.addEventListener("abort", () => heard.push(signal.reason));
  const reason = new Error("gone");
  controller.abort(reason);
  controller.abort(new Error("again"));
  assert.deepEqual(heard, [reason], "another's listener hears it once");
  assert.equal(scope.reason, reason);
  assert.equal(removed.aborted, false, "a disposed scope hears nothing");
  await assert.rejects(waiting, (error) => error === reason);
  await assert.rejects(work, (error) => error === reason);
  const bare = new HookedController();
  const bareScope = createScope([bare.signal], 60_000);
  bare.abort();
  assert.equal((bareScope.reason as DOMException).name, "AbortError");
  assert.equal(bareScope.reason, bare.signal.reason);
  clock.close(new Error("done"));
});

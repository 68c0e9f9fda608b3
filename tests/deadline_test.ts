import { test } from "./_test.ts";
import assert from "node:assert/strict";
import { abortable, createScope, DeadlineClock } from "../src/_deadline.ts";

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

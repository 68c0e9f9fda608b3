import { test } from "./_test.ts";
import assert from "node:assert/strict";
import { WorkspaceLimits } from "../src/_workspace_limits.ts";

const never = new AbortController().signal;

test("WorkspaceLimits admits maxRunning at once, maxWaiting in line, and refuses the next", () => {
  const limits = new WorkspaceLimits(2, 1);
  const admitted = [limits.admit("ws"), limits.admit("ws"), limits.admit("ws")];
  assert.ok(admitted.every((a) => a !== undefined));
  assert.equal(limits.admit("ws"), undefined);
  assert.deepEqual(limits.load("ws"), { running: 2, waiting: 1 });
  assert.notEqual(limits.admit("other"), undefined);
});

test("WorkspaceLimits hands a released slot to the first in line, in order", async () => {
  const limits = new WorkspaceLimits(1, 2);
  const running = limits.admit("ws")!;
  const first = limits.admit("ws")!;
  const second = limits.admit("ws")!;
  const order: string[] = [];
  const firstReady = first.ready(never).then(() => order.push("first"));
  const secondReady = second.ready(never).then(() => order.push("second"));
  running.release();
  await firstReady;
  assert.deepEqual(order, ["first"]);
  first.release();
  await secondReady;
  assert.deepEqual(order, ["first", "second"]);
  second.release();
  assert.deepEqual(limits.load("ws"), { running: 0, waiting: 0 });
});

test("WorkspaceLimits lets a waiter leave the line on abort, and frees its place", async () => {
  const limits = new WorkspaceLimits(1, 1);
  const running = limits.admit("ws")!;
  const waiting = limits.admit("ws")!;
  const client = new AbortController();
  const ready = waiting.ready(client.signal);
  client.abort(new Error("client left"));
  await assert.rejects(ready, /client left/);
  waiting.release();
  assert.deepEqual(limits.load("ws"), { running: 1, waiting: 0 });
  assert.notEqual(limits.admit("ws"), undefined);
  running.release();
});

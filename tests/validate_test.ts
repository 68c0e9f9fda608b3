import { test } from "./_test.ts";
import assert from "node:assert/strict";
import { PassThrough } from "node:stream";
import { readTurnRequest, type TurnRequestLimits } from "../src/_validate.ts";
import { trackTimers } from "./_timers.ts";

const LIMITS: TurnRequestLimits = {
  maxBodyBytes: 1024,
  defaultTimeoutMs: 60_000,
  maxTimeoutMs: 600_000,
  requestTimeoutMs: 40,
};
const BODY = JSON.stringify({ workspaceId: "ws-1", params: { input: [] } });

/** A request as srvx's `node:http` adapter makes it: the Node request underneath. */
function nodeRequest(req: PassThrough & { complete?: boolean }): Request {
  const request = new Request("http://127.0.0.1/api/turns", {
    method: "POST",
    headers: { "content-type": "application/json" },
  });
  return Object.assign(request, { runtime: { node: { req } } });
}

test("readTurnRequest() reads a Node request's body that is in whole without arming a deadline", async () => {
  const req = Object.assign(new PassThrough(), { complete: true });
  req.end(BODY);
  const timers = trackTimers();
  try {
    const read = await readTurnRequest(nodeRequest(req), LIMITS);
    assert.equal(read.ok, true);
    assert.equal(read.ok && read.value.workspaceId, "ws-1");
    assert.deepEqual(timers.delays, []);
  } finally {
    timers.restore();
  }
});

test("readTurnRequest() gives a Node request's body still arriving its deadline, and answers 408 past it", async () => {
  const req = Object.assign(new PassThrough(), { complete: false });
  req.write(BODY.slice(0, 10));
  const timers = trackTimers();
  try {
    const read = await readTurnRequest(nodeRequest(req), LIMITS);
    assert.equal(read.ok, false);
    assert.equal(!read.ok && read.status, 408);
    // Bun may fire a hair early; the clock then re-arms for the rest.
    assert.ok(timers.delays.length >= 1);
    assert.ok(Math.abs(timers.delays[0]! - LIMITS.requestTimeoutMs) < 1, `${timers.delays}`);
    assert.equal(timers.live().length, 0);
  } finally {
    timers.restore();
    req.destroy();
  }
});

test("readTurnRequest() reads a Node request's body that arrives in pieces before its deadline", async () => {
  const req = Object.assign(new PassThrough(), { complete: false });
  req.write(BODY.slice(0, 10));
  const timers = trackTimers();
  try {
    const reading = readTurnRequest(nodeRequest(req), LIMITS);
    setTimeout(() => req.end(BODY.slice(10)), 5);
    const read = await reading;
    assert.equal(read.ok, true);
    assert.equal(timers.live().length, 0, "the deadline is cleared once the body is in");
  } finally {
    timers.restore();
  }
});

import { test } from "./_test.ts";
import assert from "node:assert/strict";
import { ActiveTurns } from "../src/_active_turns.ts";
import { ThreadLanes } from "../src/_thread_lanes.ts";
import type { DroppedFrames } from "../src/_rpc_session.ts";

function dropped(): DroppedFrames {
  return {
    binary: 0,
    oversized: 0,
    invalidJson: 0,
    invalidMessage: 0,
    unknownId: 0,
    unknownTurn: 0,
  };
}

function turn(id: string, status = "completed") {
  return { id, items: [], status };
}

test("ActiveTurns holds nothing for a turn waiting in line while the running turn floods its thread", async () => {
  // Conn's order: take the thread's lane, then register the turn, then send turn/start.
  const lanes = new ThreadLanes();
  const turns = new ActiveTurns(dropped());
  const never = new AbortController().signal;
  const releaseFirst = await lanes.acquire("t1", never);
  let firstCount = 0;
  const first = turns.open("t1", () => firstCount++);
  turns.bind(first, { turn: turn("u1", "inProgress") });
  let secondCount = 0;
  const waiting = lanes.acquire("t1", never);
  for (let i = 0; i < 5_000; i++) {
    turns.route("item/agentMessage/delta", { threadId: "t1", turnId: "u1", delta: "x" });
    turns.route("thread/status/changed", { threadId: "t1", status: { type: "active" } });
  }
  assert.equal(firstCount, 10_000);
  assert.equal(turns.buffered, 0);
  turns.route("turn/completed", { threadId: "t1", turn: turn("u1") });
  assert.equal((await first.completed.promise).id, "u1");
  releaseFirst();
  const releaseSecond = await waiting;
  const second = turns.open("t1", () => secondCount++);
  assert.equal(secondCount, 0);
  // Before its turn/start response, the thread's notifications are held (codex does not
  // order the two): that is the only buffering there is, and it ends with the turn id.
  turns.route("item/agentMessage/delta", { threadId: "t1", turnId: "u1", delta: "late" });
  turns.route("turn/started", { threadId: "t1", turn: turn("u2", "inProgress") });
  assert.equal(turns.buffered, 2);
  turns.bind(second, { turn: turn("u2", "inProgress") });
  assert.equal(turns.buffered, 0);
  assert.equal(secondCount, 1, "only its own turn/started");
  turns.route("turn/completed", { threadId: "t1", turn: turn("u2") });
  await second.completed.promise;
  assert.equal(turns.size, 0);
  releaseSecond();
});

test("ActiveTurns counts turn notifications of threads and turns nobody waits for", () => {
  const counters = dropped();
  const turns = new ActiveTurns(counters);
  const active = turns.open("t1", undefined);
  turns.bind(active, { turn: turn("u1", "inProgress") });
  turns.route("item/completed", { threadId: "t1", turnId: "u0", item: { type: "x", id: "a" } });
  turns.route("turn/completed", { threadId: "t9", turn: turn("u9") });
  turns.route("item/agentMessage/delta", { threadId: "t9", turnId: "u9" });
  assert.equal(counters.unknownTurn, 2);
  assert.equal(active.items.length, 0);
});

test("ActiveTurns.bind() replays nothing that came after the turn's turn/completed", async () => {
  // Node dispatches the frames of one TCP chunk back to back, so a whole turn, and what
  // follows it, can arrive before the turn/start response is read.
  const counters = dropped();
  const turns = new ActiveTurns(counters);
  const seen: string[] = [];
  const active = turns.open("t1", (method) => seen.push(method));
  turns.route("turn/started", { threadId: "t1", turn: turn("u1", "inProgress") });
  turns.route("item/completed", { threadId: "t1", turnId: "u1", item: { type: "x", id: "a" } });
  turns.route("turn/completed", { threadId: "t1", turn: turn("u1") });
  turns.route("thread/status/changed", { threadId: "t1", status: { type: "idle" } });
  turns.route("item/completed", { threadId: "t1", turnId: "u1", item: { type: "x", id: "b" } });
  turns.bind(active, { turn: turn("u1", "inProgress") });
  assert.deepEqual(seen, ["turn/started", "item/completed", "turn/completed"]);
  const completed = await active.completed.promise;
  assert.deepEqual(completed.items.map((item) => item.id), ["a"]);
  assert.equal(counters.unknownTurn, 1);
  assert.equal(turns.size, 0);
});

// deno-lint-ignore-file no-explicit-any -- frames are arbitrary JSON.
/**
 * The schema checks of tests/_schema.ts, against the installed codex's own schema: they must
 * reject a protocol drift and name the message, accept what codex really exchanges, and hook
 * the fake app-server and the broker's sockets.
 */

import { test } from "./_test.ts";
import assert from "node:assert/strict";
import { Conn } from "../mod.ts";
import { codexSchema, SchemaViolationError, tapSentFrames } from "./_schema.ts";
import {
  codexLike,
  serverRequestParams,
  startFakeAppServer,
  threadResult,
  turnObject,
} from "./_fake_app_server.ts";

const APPROVAL = "item/commandExecution/requestApproval";
const input = [{ type: "text", text: "hi", text_elements: [] }];
const noRequest = () => undefined;

function assertViolation(
  violation: SchemaViolationError | undefined,
  method: string,
  problem: RegExp,
): void {
  assert.ok(violation instanceof SchemaViolationError, "the frame was accepted");
  assert.equal(violation.method, method);
  assert.ok(violation.message.includes(method), violation.message);
  assert.match(violation.message, problem);
}

test("codex's schema rejects a turn/start without input and names turn/start", () => {
  const violation = codexSchema().checkClientFrame(
    { id: 3, method: "turn/start", params: { threadId: "thr-1" } },
    noRequest,
  );
  assertViolation(violation, "turn/start", /\/params must have required property 'input'/);
});

test("codex's schema rejects a client request with an unknown method and names it", () => {
  const violation = codexSchema().checkClientFrame(
    { id: 3, method: "turn/strat", params: { threadId: "thr-1", input } },
    noRequest,
  );
  assertViolation(violation, "turn/strat", /unknown client request method/);
});

test("codex's schema rejects a turn/completed whose turn has no id and names turn/completed", () => {
  const turn = turnObject("turn-1");
  delete turn.id;
  const violation = codexSchema().checkServerFrame(
    { method: "turn/completed", params: { threadId: "thr-1", turn } },
    noRequest,
  );
  assertViolation(violation, "turn/completed", /\/params\/turn must have required property 'id'/);
});

test("codex's schema rejects an approval answer with a decision codex does not know and names the request", () => {
  const requests = new Map<unknown, string>([[0, APPROVAL]]);
  const violation = codexSchema().checkClientFrame(
    { id: 0, result: { decision: "approve" } },
    (id) => requests.get(id),
  );
  assertViolation(violation, APPROVAL, /result\/decision must be one of .*"accept"/);
});

test("codex's schema accepts the frames the broker sends: handshake, thread and turn requests, an approval answer", () => {
  const schema = codexSchema();
  const frames = [
    {
      id: 0,
      method: "initialize",
      params: {
        clientInfo: { name: "codex_broker", title: null, version: "0" },
        capabilities: null,
      },
    },
    { method: "initialized" },
    { id: 1, method: "thread/start", params: { cwd: "/tmp", approvalPolicy: "never" } },
    { id: 2, method: "thread/resume", params: { threadId: "thr-1" } },
    { id: 3, method: "turn/start", params: { threadId: "thr-1", input } },
    { id: 4, method: "turn/interrupt", params: { threadId: "thr-1", turnId: "turn-1" } },
    { id: 0, result: { decision: "accept" } },
    { id: 1, error: { code: -32601, message: "Method not found" } },
  ];
  const requests = new Map<unknown, string>([[0, APPROVAL], [1, "item/tool/call"]]);
  for (const frame of frames) {
    assert.equal(schema.checkClientFrame(frame, (id) => requests.get(id))?.message, undefined);
  }
});

test("codex's schema checks a response against its request's method: thread/start needs the whole thread", () => {
  const schema = codexSchema();
  const method = () => "thread/start";
  assert.equal(
    schema.checkServerFrame({ id: 1, result: threadResult("thr-1") }, method),
    undefined,
  );
  const violation = schema.checkServerFrame(
    { id: 1, result: { ...threadResult("thr-1"), thread: { id: "thr-1" } } },
    method,
  );
  assertViolation(violation, "thread/start", /result\/thread must have required property 'cwd'/);
});

test("the fake app-server fails close() with the violation of a frame it sent, and sendUnchecked is exempt", async () => {
  const server = await startFakeAppServer(async (peer) => {
    const start = await peer.expect("thread/start");
    peer.sendUnchecked({ method: "turn/completed", params: { threadId: "x" } });
    peer.notify("turn/completed", { threadId: "thr-1", turn: { items: [], status: "completed" } });
    peer.reply(start, threadResult("thr-1"));
  });
  const conn = await Conn.dial(server.url);
  try {
    assert.equal(await conn.startThread(), "thr-1");
  } finally {
    conn.close();
    await conn.finished;
  }
  await assert.rejects(server.close(), (error: unknown) => {
    assert.ok(error instanceof SchemaViolationError);
    assert.equal(error.method, "turn/completed");
    assert.match(error.message, /^server frame .*turn\/completed notification: \/params\/turn/);
    return true;
  });
});

test("tapSentFrames checks every frame a Conn sends, the answer to a server request against that request", async () => {
  const tap = tapSentFrames();
  const server = await startFakeAppServer(async (peer) => {
    const start = await peer.expect("thread/start");
    const answer = await peer.request(APPROVAL, serverRequestParams(APPROVAL), 0);
    assert.deepEqual(answer.result, { decision: "decline" });
    peer.reply(start, threadResult("thr-1"));
    codexLike(peer);
  });
  try {
    const conn = await Conn.dial(server.url);
    try {
      const threadId = await conn.startThread();
      await server.scriptsDone();
      await conn.turn(threadId, { input });
    } finally {
      conn.close();
      await conn.finished;
    }
  } finally {
    tap.restore();
    await server.close();
  }
  assert.deepEqual(tap.frames.map((f: any) => f.method ?? f.result), [
    "initialize",
    "initialized",
    "thread/start",
    { decision: "decline" },
    "turn/start",
  ]);
  assert.deepEqual(tap.violations, []);
});

test("tapSentFrames records a frame that breaks codex's schema, named by its method", async () => {
  const server = await startFakeAppServer(() => {}, { handshake: false });
  const tap = tapSentFrames();
  try {
    const ws = new WebSocket(server.url);
    await new Promise((resolve, reject) => {
      ws.onopen = resolve;
      ws.onerror = reject;
    });
    const closed = new Promise((resolve) => ws.onclose = resolve);
    ws.send(JSON.stringify({ id: 0, method: "thread/strat", params: {} }));
    ws.send(JSON.stringify({ id: 1, method: "turn/interrupt", params: { threadId: "thr-1" } }));
    ws.close();
    await closed;
  } finally {
    tap.restore();
    await server.close();
  }
  assert.deepEqual(tap.violations.map((v) => v.method), ["thread/strat", "turn/interrupt"]);
  assert.match(tap.violations[1]!.message, /\/params must have required property 'turnId'/);
});

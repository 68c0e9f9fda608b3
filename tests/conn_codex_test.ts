/**
 * `Conn` against the real `codex app-server` from `@openai/codex`, started by the supervisor
 * with a capability token and pointed at the loopback mock model. One codex process serves
 * every test of this file but the kill test, which gets a workspace (and process) of its own.
 *
 * Deno runs these tests with its sanitizers on, so everything a test starts it also stops
 * before it returns: connections are closed and their sockets awaited (`conn.finished`), and
 * the kill test releases its codex. The shared codex is spawned in `before` and stopped in
 * `after`, outside every test, since a process a test did not start must not exit in it.
 */

import { test as register } from "./_test.ts";
import { checkingSentFrames } from "./_schema.ts";
import { useCodexFixture } from "./_codex_fixture.ts";
import { isAlive, waitFor } from "./_wait.ts";
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { connect } from "node:net";
import { join } from "node:path";
import process from "node:process";
import {
  Conn,
  ConnectionClosedError,
  DialError,
  type NotificationEvent,
  type ServerRequestEvent,
  TimeoutError,
  type Turn,
} from "../mod.ts";
import type { Endpoint } from "../src/resolver.ts";
import { echo, execThenReply, reply } from "./_mock_model.ts";

// Every frame the broker sends to the real codex must conform to codex's own schema.
const test = checkingSentFrames(register);

const WORKSPACE = "conn-codex";
const COMMAND_APPROVAL = "item/commandExecution/requestApproval";

const h = useCodexFixture("conn-codex-test-", [WORKSPACE]);

function workspaceDir(workspaceId = WORKSPACE): string {
  return join(h().dir, "workspaces", workspaceId);
}

/**
 * The workspace's endpoint. The shared workspace's codex runs from `before` on; any other
 * workspace's is spawned on first use, and the test that uses it must release it.
 */
function endpoint(workspaceId = WORKSPACE): Promise<Endpoint> {
  return h().resolver.resolve(workspaceId);
}

async function dial(
  options: { approvals?: "accept" | "decline"; workspaceId?: string } = {},
): Promise<Conn> {
  const { url, headers = {} } = await endpoint(options.workspaceId);
  return await Conn.dial(url, {
    headers,
    handshakeTimeoutMs: 5_000,
    ...(options.approvals ? { approvals: options.approvals } : {}),
  });
}

/** Closes the connections and waits until their sockets have really closed. */
async function closeAll(...conns: Conn[]): Promise<void> {
  for (const conn of conns) conn.close();
  await Promise.all(conns.map((conn) => conn.finished));
}

function text(value: string) {
  return { input: [{ type: "text", text: value, text_elements: [] }] };
}

function itemsOfType(turn: Turn, type: string): Record<string, unknown>[] {
  return turn.items.filter((item) => item.type === type);
}

function agentTexts(turn: Turn): unknown[] {
  return itemsOfType(turn, "agentMessage").map((item) => item.text);
}

function userTexts(turn: Turn): unknown[] {
  return itemsOfType(turn, "userMessage").flatMap((item) =>
    (item.content as { type: string; text?: string }[])
      .filter((part) => part.type === "text")
      .map((part) => part.text)
  );
}

/** Every user text the mock model saw in a request's input: the thread's history. */
function historyOf(requestIndex: number): (string | undefined)[] {
  const request = h().model.requests[requestIndex];
  assert.ok(request, `the mock model saw no request #${requestIndex}`);
  return request.input
    .filter((item) => item.type === "message" && item.role === "user")
    .flatMap((item) => item.content as { type: string; text?: string }[])
    .filter((part) => part.type === "input_text")
    .map((part) => part.text)
    // codex adds its own user-role context (`<environment_context>…`) to the history.
    .filter((text) => !text?.startsWith("<"));
}

function recordNotifications(conn: Conn): NotificationEvent[] {
  const seen: NotificationEvent[] = [];
  conn.addEventListener("notification", (event) => seen.push(event as NotificationEvent));
  return seen;
}

function recordServerRequests(conn: Conn): ServerRequestEvent[] {
  const seen: ServerRequestEvent[] = [];
  conn.addEventListener("serverrequest", (event) => seen.push(event as ServerRequestEvent));
  return seen;
}

/**
 * The status line codex answers to a real WebSocket upgrade request, sent by hand: the
 * WebSocket APIs hide it, and a plain GET without the upgrade headers gets a 400 instead.
 */
function upgradeStatus(wsUrl: string, headers: Record<string, string>): Promise<string> {
  const url = new URL(wsUrl);
  return new Promise((resolve, reject) => {
    const socket = connect(Number(url.port), url.hostname, () => {
      const lines = [
        `GET / HTTP/1.1`,
        `Host: ${url.host}`,
        `Connection: Upgrade`,
        `Upgrade: websocket`,
        `Sec-WebSocket-Version: 13`,
        `Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==`,
        ...Object.entries(headers).map(([name, value]) => `${name}: ${value}`),
      ];
      socket.write(lines.join("\r\n") + "\r\n\r\n");
    });
    let received = "";
    socket.setEncoding("utf8");
    socket.on("data", (chunk: string) => {
      received += chunk;
      const end = received.indexOf("\r\n");
      if (end >= 0) {
        socket.destroy();
        resolve(received.slice(0, end));
      }
    });
    socket.on("error", reject);
    socket.on("close", () => resolve(received));
  });
}

const isNode = !("Deno" in globalThis) && !("Bun" in globalThis);

test("Conn.turn() against the real codex returns the model's agentMessage and the userMessage with itemsView full", async () => {
  const { model } = h();
  model.respond = reply("hello from the mock model");
  const conn = await dial();
  try {
    const threadId = await conn.startThread({ cwd: workspaceDir() });
    assert.match(threadId, /\S/);
    const turn = await conn.turn(threadId, text("say hello"), { timeoutMs: 10_000 });
    assert.equal(turn.status, "completed");
    assert.equal(turn.error, null);
    assert.equal(turn.itemsView, "full");
    assert.deepEqual(agentTexts(turn), ["hello from the mock model"]);
    assert.deepEqual(userTexts(turn), ["say hello"]);
    // Arrival order: codex completes the user message before the agent's.
    assert.deepEqual(turn.items.map((item) => item.type), ["userMessage", "agentMessage"]);
    assert.equal(model.requests.at(-1)?.lastUserText, "say hello");
  } finally {
    await closeAll(conn);
  }
});

test("Conn.turn() completes a second turn on the same real codex thread, which carries the first turn's history", async () => {
  const { model } = h();
  model.respond = echo("echo: ");
  const conn = await dial();
  try {
    const threadId = await conn.startThread({ cwd: workspaceDir() });
    const first = await conn.turn(threadId, text("first"), { timeoutMs: 10_000 });
    const second = await conn.turn(threadId, text("second"), { timeoutMs: 10_000 });
    assert.equal(first.status, "completed");
    assert.equal(second.status, "completed");
    assert.notEqual(second.id, first.id);
    assert.deepEqual(agentTexts(second), ["echo: second"]);
    assert.deepEqual(userTexts(second), ["second"]);
    assert.deepEqual(historyOf(model.requests.length - 1), ["first", "second"]);
  } finally {
    await closeAll(conn);
  }
});

test("Conn.turn() on a second connection resumes a real codex thread started elsewhere and completes", async () => {
  const { model } = h();
  model.respond = echo("echo: ");
  const owner = await dial();
  const other = await dial();
  try {
    const threadId = await owner.startThread({ cwd: workspaceDir() });
    await owner.turn(threadId, text("from the owner"), { timeoutMs: 10_000 });

    // `other` never saw this thread, so it sends thread/resume before its turn/start.
    const resumed = await other.turn(threadId, text("from the other"), { timeoutMs: 10_000 });
    assert.equal(resumed.status, "completed");
    assert.equal(resumed.itemsView, "full");
    assert.deepEqual(userTexts(resumed), ["from the other"]);
    assert.deepEqual(agentTexts(resumed), ["echo: from the other"]);
    assert.deepEqual(historyOf(model.requests.length - 1), ["from the owner", "from the other"]);

    // Both connections are attached now; the owner's next turn still completes.
    const back = await owner.turn(threadId, text("owner again"), { timeoutMs: 10_000 });
    assert.equal(back.status, "completed");
    assert.deepEqual(agentTexts(back), ["echo: owner again"]);

    // And after both are gone, a third connection picks the thread up again.
    await closeAll(owner, other);
    const third = await dial();
    try {
      const later = await third.turn(threadId, text("third"), { timeoutMs: 10_000 });
      assert.equal(later.status, "completed");
      assert.deepEqual(historyOf(model.requests.length - 1), [
        "from the owner",
        "from the other",
        "owner again",
        "third",
      ]);
    } finally {
      await closeAll(third);
    }
  } finally {
    await closeAll(owner, other);
  }
});

test("Conn.dial() without the capability token is refused by the real codex with DialError", async () => {
  const { url, headers = {} } = await endpoint();
  // What codex answers, for the record: 401 to an upgrade without (or with a wrong) token.
  assert.equal(await upgradeStatus(url, {}), "HTTP/1.1 401 Unauthorized");
  assert.equal(
    await upgradeStatus(url, { Authorization: `Bearer ${"0".repeat(64)}` }),
    "HTTP/1.1 401 Unauthorized",
  );
  assert.equal(await upgradeStatus(url, headers), "HTTP/1.1 101 Switching Protocols");

  for (const attempt of [{}, { Authorization: `Bearer ${"0".repeat(64)}` }]) {
    const error = await Conn.dial(url, { headers: attempt, handshakeTimeoutMs: 5_000 }).then(
      async (conn) => {
        await closeAll(conn);
        return undefined;
      },
      (error: unknown) => error,
    );
    assert.ok(error instanceof DialError, `expected a DialError, got ${error}`);
    assert.equal(error.name, "DialError");
    assert.equal(error.url, new URL(url).href);
    assert.match(error.message, /^Cannot connect to ws:\/\/127\.0\.0\.1:\d+\/: /);
    // Deno's and Bun's fetch can repeat the upgrade and see codex's 401. Node's fetch
    // refuses upgrade headers and its WebSocket reports no status, so there the probe can
    // only say that the server answers (400 to a plain request).
    if (isNode) {
      assert.equal(error.status, undefined);
      assert.match(error.message, /upgrade refused, the server answers HTTP 400/);
    } else {
      assert.equal(error.status, 401);
      assert.match(error.message, /HTTP 401 \(missing or wrong token\)/);
    }
  }
});

test('Conn with approvals "accept" lets the real codex run the model\'s exec_command, which creates the file', async () => {
  const { model } = h();
  const file = join(workspaceDir(), "made-by-codex-accept");
  model.respond = execThenReply(`touch ${file}`, "touched it");
  const conn = await dial({ approvals: "accept" });
  const answered = recordServerRequests(conn);
  try {
    // workspace-write: with the default read-only sandbox the accepted command usually
    // fails with "Read-only file system", so the outcome would not show the approval.
    const threadId = await conn.startThread({
      cwd: workspaceDir(),
      approvalPolicy: "untrusted",
      sandbox: "workspace-write",
    });
    const turn = await conn.turn(threadId, text("touch the file"), { timeoutMs: 10_000 });
    assert.equal(turn.status, "completed");
    assert.equal(existsSync(file), true);
    assert.deepEqual(
      answered.map((event) => [event.request.method, event.outcome]),
      [[COMMAND_APPROVAL, "accept"]],
    );
    const params = answered[0]?.request.params as { threadId?: string; turnId?: string };
    assert.equal(params.threadId, threadId);
    assert.equal(params.turnId, turn.id);
    const commands = itemsOfType(turn, "commandExecution");
    assert.equal(commands.length, 1);
    assert.equal(commands[0]?.status, "completed");
    assert.deepEqual(agentTexts(turn), ["touched it"]);
  } finally {
    await closeAll(conn);
  }
});

test('Conn with the default approvals ("decline") keeps the real codex from running the model\'s exec_command', async () => {
  const { model } = h();
  const file = join(workspaceDir(), "made-by-codex-decline");
  model.respond = execThenReply(`touch ${file}`, "could not touch it");
  const conn = await dial();
  const answered = recordServerRequests(conn);
  try {
    const threadId = await conn.startThread({
      cwd: workspaceDir(),
      approvalPolicy: "untrusted",
      sandbox: "workspace-write",
    });
    const turn = await conn.turn(threadId, text("touch the file"), { timeoutMs: 10_000 });
    assert.equal(turn.status, "completed");
    assert.equal(existsSync(file), false);
    assert.deepEqual(
      answered.map((event) => [event.request.method, event.outcome]),
      [[COMMAND_APPROVAL, "decline"]],
    );
    const commands = itemsOfType(turn, "commandExecution");
    assert.equal(commands.length, 1);
    assert.equal(commands[0]?.status, "declined");
    assert.match(model.requests.at(-1)?.toolOutputs.at(-1) ?? "", /rejected/);
    assert.deepEqual(agentTexts(turn), ["could not touch it"]);
  } finally {
    await closeAll(conn);
  }
});

test("Conn.turn() times out with TimeoutError carrying both ids, and the real codex reports the turn interrupted", async () => {
  const { model } = h();
  model.respond = () => ({ type: "hang" });
  const conn = await dial();
  const notifications = recordNotifications(conn);
  try {
    const threadId = await conn.startThread({ cwd: workspaceDir() });
    const started = Date.now();
    const error = await conn.turn(threadId, text("never answered"), { timeoutMs: 300 }).then(
      () => undefined,
      (error: unknown) => error,
    );
    const elapsed = Date.now() - started;
    assert.ok(error instanceof TimeoutError, `expected a TimeoutError, got ${error}`);
    assert.equal(error.name, "TimeoutError");
    assert.equal(error.threadId, threadId);
    assert.equal(typeof error.turnId, "string");
    assert.ok(elapsed >= 290 && elapsed < 2_000, `timed out after ${elapsed} ms`);

    const completedAs = (turnId: string | null) =>
      notifications
        .filter((event) => event.method === "turn/completed")
        .map((event) => event.params as { threadId: string; turn: Turn })
        .find((params) => params.threadId === threadId && params.turn.id === turnId)
        ?.turn.status;
    await waitFor(
      "turn/completed of the timed-out turn",
      () => completedAs(error.turnId) !== undefined,
    );
    assert.equal(completedAs(error.turnId), "interrupted");

    // The thread is usable again right away.
    model.respond = reply("back after the interrupt");
    const next = await conn.turn(threadId, text("try again"), { timeoutMs: 10_000 });
    assert.equal(next.status, "completed");
    assert.notEqual(next.id, error.turnId);
    assert.deepEqual(agentTexts(next), ["back after the interrupt"]);
  } finally {
    await closeAll(conn);
  }
});

test("Conn.turn() rejects with ConnectionClosedError within 1 s when the real codex is killed with SIGKILL mid-turn", async () => {
  const { model, resolver } = h();
  const workspaceId = `${WORKSPACE}-kill`;
  model.respond = () => ({ type: "hang" });
  let conn: Conn | undefined;
  try {
    conn = await dial({ workspaceId });
    const threadId = await conn.startThread({ cwd: workspaceDir(workspaceId) });
    const seen = model.requests.length;
    const turn = conn.turn(threadId, text("you will not finish"), { timeoutMs: 10_000 });
    const outcome = turn.then(() => undefined, (error: unknown) => error);
    await model.waitForRequests(seen + 1, 5_000); // codex is waiting on the model
    const pid = resolver.pid(workspaceId);
    assert.ok(pid !== undefined && isAlive(pid));

    const killedAt = Date.now();
    process.kill(pid, "SIGKILL");
    const error = await outcome;
    const elapsed = Date.now() - killedAt;
    assert.ok(
      error instanceof ConnectionClosedError,
      `expected ConnectionClosedError, got ${error}`,
    );
    assert.ok(elapsed < 1_000, `rejected ${elapsed} ms after the kill`);
    assert.equal(conn.closed, true);
    await assert.rejects(conn.turn(threadId, text("again")), ConnectionClosedError);
    await waitFor("the killed codex to be gone", () => !isAlive(pid));
  } finally {
    if (conn) await closeAll(conn);
    // This test spawned the workspace's codex: release() returns once the resolver has seen
    // the killed process exit and forgotten it, so nothing of it outlives the test.
    await resolver.release(workspaceId);
  }
});

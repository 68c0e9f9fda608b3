/**
 * `Pool` with the supervisor's resolver against the real `codex app-server` from
 * `@openai/codex`, pointed at the loopback mock model (issue 3, "Tests against the real
 * codex"). Tests that do not check what release does share their codex processes through a
 * resolver without `release`; the others hand the pool the resolver itself.
 *
 * Deno runs these tests with its sanitizers on, so a codex process is started and stopped by
 * the same test, or outside of every test: the shared workspaces' codex processes are spawned
 * in `before` and stopped in `after`, and a test that makes the resolver spawn another one
 * stops it before it returns (`pool.close()` releases it, or the test closes its own resolver).
 */

import { test as register } from "./_test.ts";
import { checkingSentFrames } from "./_schema.ts";
import { fixtureResolver, useCodexFixture } from "./_codex_fixture.ts";
import { isAlive, waitFor } from "./_wait.ts";
import assert from "node:assert/strict";
import { existsSync, readdirSync, readFileSync, readlinkSync } from "node:fs";
import { realpath } from "node:fs/promises";
import { type AddressInfo, connect, createServer, type Socket } from "node:net";
import { join } from "node:path";
import process from "node:process";
import {
  type Conn,
  ConnectionClosedError,
  Pool,
  PoolClosedError,
  type PoolEvent,
  type PoolOptions,
  type Resolver,
  TimeoutError,
  type Turn,
  TurnRpcError,
} from "../mod.ts";
import type { CodexResolver } from "../src/supervisor.ts";
import { echo, execThenReply, reply } from "./_mock_model.ts";

// Every frame the broker sends to the real codex must conform to codex's own schema.
const test = checkingSentFrames(register);

const TURN_TIMEOUT_MS = 10_000;
/** The workspaces whose codex processes every test may use through {@linkcode keepAlive}. */
const SHARED_WORKSPACES = ["ws-a", "ws-b"];

const h = useCodexFixture("pool-codex-test-", SHARED_WORKSPACES);

function workspaceDir(workspaceId: string, dir = h().dir): string {
  return join(dir, "workspaces", workspaceId);
}

/**
 * The shared resolver without `release`: closing such a pool leaves its codex processes
 * running for the next test, which saves a spawn per test. Only for the
 * {@linkcode SHARED_WORKSPACES}, whose processes run from `before` to `after`: any other
 * workspace would be spawned inside a test and never stopped by it.
 */
function keepAlive(): Resolver {
  const { resolver } = h();
  return {
    resolve: (workspaceId, signal) => {
      if (!SHARED_WORKSPACES.includes(workspaceId)) {
        throw new Error(`keepAlive() serves only ${SHARED_WORKSPACES}, not ${workspaceId}`);
      }
      return resolver.resolve(workspaceId, signal);
    },
  };
}

interface Recorded {
  readonly type: string;
  readonly workspaceId: string;
  readonly conn: Conn | undefined;
}

function recordEvents(pool: Pool): Recorded[] {
  const seen: Recorded[] = [];
  for (const type of ["dial", "reap", "evict", "close"]) {
    pool.addEventListener(type, (event) => {
      const { workspaceId, conn } = event as PoolEvent;
      seen.push({ type, workspaceId, conn });
    });
  }
  return seen;
}

function eventsOf(events: Recorded[], workspaceId: string): string[] {
  return events.filter((event) => event.workspaceId === workspaceId).map((event) => event.type);
}

function text(value: string) {
  return { input: [{ type: "text", text: value, text_elements: [] }] };
}

function agentTexts(turn: Turn): unknown[] {
  return turn.items.filter((item) => item.type === "agentMessage").map((item) => item.text);
}

/** The user texts of the last model request whose newest user text is `last`. */
function historyEndingWith(last: string): (string | undefined)[] {
  const request = h().model.requests.findLast((request) => request.lastUserText === last);
  assert.ok(request, `the mock model saw no request ending with ${JSON.stringify(last)}`);
  return request.input
    .filter((item) => item.type === "message" && item.role === "user")
    .flatMap((item) => item.content as { type: string; text?: string }[])
    .filter((part) => part.type === "input_text")
    .map((part) => part.text)
    // codex adds its own user-role context (`<environment_context>…`) to the history.
    .filter((text) => !text?.startsWith("<"));
}

/** The `<cwd>` codex told the model about in the request whose newest user text is `last`. */
function modelSawCwd(last: string): string | undefined {
  const request = h().model.requests.findLast((request) => request.lastUserText === last);
  return /<cwd>([^<]*)<\/cwd>/.exec(JSON.stringify(request?.input ?? []))?.[1];
}

function pidOf(workspaceId: string, resolver: CodexResolver = h().resolver): number {
  const pid = resolver.pid(workspaceId);
  assert.ok(pid !== undefined, `no codex runs for workspace ${workspaceId}`);
  return pid;
}

interface Proc {
  readonly pid: number;
  readonly command: string;
}

/** Processes whose working directory is under `dir` (Linux only; elsewhere none are found). */
function processesIn(dir: string): Proc[] {
  if (!existsSync("/proc/self/cwd")) return [];
  const found: Proc[] = [];
  for (const name of readdirSync("/proc")) {
    if (!/^\d+$/.test(name)) continue;
    try {
      const cwd = readlinkSync(`/proc/${name}/cwd`);
      if (cwd !== dir && !cwd.startsWith(`${dir}/`)) continue;
      const command = readFileSync(`/proc/${name}/cmdline`, "utf8").replaceAll("\0", " ").trim();
      found.push({ pid: Number(name), command });
    } catch {
      // Gone already, or not ours to inspect.
    }
  }
  return found;
}

interface TcpProxy {
  readonly port: number;
  /** Destroys every proxied connection, as a failing network would. */
  cut(): void;
  close(): Promise<void>;
}

/** Forwards 127.0.0.1:<port> to a loopback port, so a test can cut the line. */
async function startTcpProxy(targetPort: number): Promise<TcpProxy> {
  const sockets = new Set<Socket>();
  const server = createServer((client) => {
    const upstream = connect(targetPort, "127.0.0.1");
    for (const [socket, other] of [[client, upstream], [upstream, client]] as const) {
      sockets.add(socket);
      socket.on("error", () => other.destroy());
      socket.on("close", () => {
        sockets.delete(socket);
        other.destroy();
      });
    }
    client.pipe(upstream).pipe(client);
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const cut = () => {
    for (const socket of sockets) socket.destroy();
  };
  return {
    port: (server.address() as AddressInfo).port,
    cut,
    close: () => {
      cut();
      return new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}

function settle<T>(promise: Promise<T>): Promise<T | unknown> {
  return promise.then((value) => value, (error: unknown) => error);
}

async function withPool<T>(
  resolver: Resolver,
  options: PoolOptions,
  body: (pool: Pool, events: Recorded[]) => Promise<T>,
): Promise<T> {
  const pool = new Pool(resolver, options);
  const events = recordEvents(pool);
  try {
    return await body(pool, events);
  } finally {
    await pool.close();
  }
}

test("Pool runs two workspaces on two codex subprocesses, each in its own cwd", async () => {
  const { model, resolver } = h();
  model.respond = echo("echo: ");
  await withPool(keepAlive(), {}, async (pool, events) => {
    // No cwd in thread/start: each thread runs where its app-server runs.
    const [a, b] = await Promise.all([
      pool.turn("ws-a", null, text("hello from a"), { timeoutMs: TURN_TIMEOUT_MS }),
      pool.turn("ws-b", null, text("hello from b"), { timeoutMs: TURN_TIMEOUT_MS }),
    ]);
    assert.equal(a.turn.status, "completed");
    assert.equal(b.turn.status, "completed");
    assert.deepEqual(agentTexts(a.turn), ["echo: hello from a"]);
    assert.deepEqual(agentTexts(b.turn), ["echo: hello from b"]);
    assert.notEqual(a.threadId, b.threadId);

    assert.equal(pool.size, 2);
    assert.deepEqual(eventsOf(events, "ws-a"), ["dial"]);
    assert.deepEqual(eventsOf(events, "ws-b"), ["dial"]);
    const [connA, connB] = await Promise.all([pool.get("ws-a"), pool.get("ws-b")]);
    assert.notEqual(connA.url, connB.url);

    const pidA = pidOf("ws-a");
    const pidB = pidOf("ws-b");
    assert.notEqual(pidA, pidB);
    assert.ok(isAlive(pidA) && isAlive(pidB));
    if (existsSync(`/proc/${pidA}/cwd`)) {
      assert.equal(await realpath(`/proc/${pidA}/cwd`), workspaceDir("ws-a"));
      assert.equal(await realpath(`/proc/${pidB}/cwd`), workspaceDir("ws-b"));
    }
    assert.equal(modelSawCwd("hello from a"), workspaceDir("ws-a"));
    assert.equal(modelSawCwd("hello from b"), workspaceDir("ws-b"));
    assert.equal(resolver.pid("ws-a"), pidA);
  });
});

test("Pool.turn() runs a second turn on the same thread: same thread id, completed, with the first turn's history", async () => {
  const { model } = h();
  model.respond = echo("echo: ");
  await withPool(keepAlive(), {}, async (pool, events) => {
    const first = await pool.turn("ws-a", null, text("first"), { timeoutMs: TURN_TIMEOUT_MS });
    const second = await pool.turn("ws-a", first.threadId, text("second"), {
      timeoutMs: TURN_TIMEOUT_MS,
    });
    assert.equal(second.threadId, first.threadId);
    assert.equal(first.turn.status, "completed");
    assert.equal(second.turn.status, "completed");
    assert.notEqual(second.turn.id, first.turn.id);
    assert.equal(second.turn.itemsView, "full");
    assert.deepEqual(agentTexts(second.turn), ["echo: second"]);
    assert.deepEqual(historyEndingWith("second"), ["first", "second"]);
    // One connection served both turns.
    assert.deepEqual(eventsOf(events, "ws-a"), ["dial"]);
  });
});

test('Pool with dial approvals "accept" lets the real codex run the exec_command that creates the file', async () => {
  const { model } = h();
  const file = join(workspaceDir("ws-a"), "made-through-the-pool-accept");
  model.respond = execThenReply(`touch ${file}`, "touched it");
  await withPool(keepAlive(), { dial: { approvals: "accept" } }, async (pool) => {
    const { turn } = await pool.turn("ws-a", null, text("touch it"), {
      timeoutMs: TURN_TIMEOUT_MS,
      // workspace-write: under the default read-only sandbox an accepted `touch` usually
      // fails with "Read-only file system" (and sometimes does not; see conn_codex_test.ts).
      threadParams: { approvalPolicy: "untrusted", sandbox: "workspace-write" },
    });
    assert.equal(turn.status, "completed");
    assert.equal(existsSync(file), true);
    const commands = turn.items.filter((item) => item.type === "commandExecution");
    assert.deepEqual(commands.map((item) => item.status), ["completed"]);
    assert.deepEqual(agentTexts(turn), ["touched it"]);
  });
});

test('Pool with the default approvals ("decline") keeps the real codex from running the exec_command, and the turn completes', async () => {
  const { model } = h();
  const file = join(workspaceDir("ws-a"), "made-through-the-pool-decline");
  model.respond = execThenReply(`touch ${file}`, "could not touch it");
  await withPool(keepAlive(), {}, async (pool) => {
    const { turn } = await pool.turn("ws-a", null, text("touch it"), {
      timeoutMs: TURN_TIMEOUT_MS,
      threadParams: { approvalPolicy: "untrusted", sandbox: "workspace-write" },
    });
    assert.equal(turn.status, "completed");
    assert.equal(existsSync(file), false);
    const commands = turn.items.filter((item) => item.type === "commandExecution");
    assert.deepEqual(commands.map((item) => item.status), ["declined"]);
    assert.deepEqual(agentTexts(turn), ["could not touch it"]);
  });
});

test("Pool.turn() rejects with ConnectionClosedError within 1 s when codex is killed mid-turn, then recovers on a fresh subprocess", async () => {
  const { model, resolver } = h();
  const workspaceId = "ws-kill";
  await withPool(resolver, {}, async (pool, events) => {
    model.respond = () => ({ type: "hang" });
    const seen = model.requests.length;
    let oldThreadId: string | undefined;
    const pending = settle(
      pool.turn(workspaceId, null, text("you will not finish"), {
        timeoutMs: TURN_TIMEOUT_MS,
        onThread: (threadId) => {
          oldThreadId = threadId;
        },
      }),
    );
    await model.waitForRequests(seen + 1, 5_000); // codex is waiting on the model
    const oldPid = pidOf(workspaceId);

    const killedAt = Date.now();
    process.kill(oldPid, "SIGKILL");
    const error = await pending;
    const elapsed = Date.now() - killedAt;
    assert.ok(
      error instanceof ConnectionClosedError,
      `expected ConnectionClosedError, got ${error}`,
    );
    assert.ok(elapsed < 1_000, `rejected ${elapsed} ms after the kill`);
    assert.deepEqual(eventsOf(events, workspaceId), ["dial", "close"]);
    assert.equal(pool.size, 0);
    assert.equal(await pool.crashed(workspaceId, 2_000), true, "the pool can tell it was a crash");

    // The next turn redials through the resolver, which starts a fresh codex.
    model.respond = reply("back on a fresh codex");
    const recovered = await pool.turn(workspaceId, null, text("are you there?"), {
      timeoutMs: TURN_TIMEOUT_MS,
    });
    assert.equal(recovered.turn.status, "completed");
    assert.deepEqual(agentTexts(recovered.turn), ["back on a fresh codex"]);
    const newPid = pidOf(workspaceId);
    assert.notEqual(newPid, oldPid);
    assert.equal(isAlive(oldPid), false);
    assert.deepEqual(eventsOf(events, workspaceId), ["dial", "close", "dial"]);

    // The old thread, whose only turn died with the process: the fresh codex either resumes
    // it from its rollout or refuses with a clear error. It must not hang either way.
    assert.ok(oldThreadId !== undefined);
    model.respond = echo("echo: ");
    const resumed = await settle(
      pool.turn(workspaceId, oldThreadId, text("resume the old thread"), { timeoutMs: 5_000 }),
    );
    assert.ok(!(resumed instanceof TimeoutError), `resuming hung: ${resumed}`);
    if (resumed instanceof TurnRpcError) {
      assert.match(resumed.message, /\S/);
    } else {
      // What codex 0.169 does: the rollout on disk is enough, history included.
      const result = resumed as { threadId: string; turn: Turn };
      assert.equal(result.threadId, oldThreadId);
      assert.equal(result.turn.status, "completed");
      assert.deepEqual(agentTexts(result.turn), ["echo: resume the old thread"]);
      assert.deepEqual(historyEndingWith("resume the old thread"), [
        "you will not finish",
        "resume the old thread",
      ]);
    }
    assert.equal(pidOf(workspaceId), newPid);
  });
});

test("Pool releases a workspace whose connection the peer side dropped, and its codex exits", async () => {
  const { resolver } = h();
  const workspaceId = "ws-cut";
  let proxy: TcpProxy | undefined;
  // The pool reaches codex through a proxy, whose line the test cuts: the broker sees its
  // connection close under it while codex itself lives on.
  const throughProxy: Resolver = {
    resolve: async (id, signal) => {
      const endpoint = await resolver.resolve(id, signal);
      proxy ??= await startTcpProxy(Number(new URL(endpoint.url).port));
      return { ...endpoint, url: `ws://127.0.0.1:${proxy.port}` };
    },
    release: (id) => resolver.release(id),
  };
  try {
    await withPool(throughProxy, {}, async (pool, events) => {
      const conn = await pool.get(workspaceId);
      const pid = pidOf(workspaceId);
      assert.ok(isAlive(pid));
      proxy!.cut();
      await waitFor("the connection to close", () => conn.closed, 2_000);
      await waitFor("the released codex to exit", () => !isAlive(pid), 2_000);
      assert.equal(resolver.pid(workspaceId), undefined);
      assert.deepEqual(eventsOf(events, workspaceId), ["dial", "close"]);
      assert.equal(await pool.crashed(workspaceId, 0), false, "stopped, not crashed");
    });
  } finally {
    await proxy?.close();
  }
});

test("Pool reaps an idle workspace after idleTtlMs and its codex exits; a later get() brings both back", async () => {
  const { model, resolver } = h();
  const workspaceId = "ws-idle";
  model.respond = echo("echo: ");
  await withPool(resolver, { idleTtlMs: 150, sweepIntervalMs: 25 }, async (pool, events) => {
    const first = await pool.turn(workspaceId, null, text("before the nap"), {
      timeoutMs: TURN_TIMEOUT_MS,
    });
    assert.equal(first.turn.status, "completed");
    const idleFrom = Date.now();
    const oldPid = pidOf(workspaceId);
    const oldConn = await pool.get(workspaceId);

    await waitFor("the reap event", () => eventsOf(events, workspaceId).includes("reap"));
    const reapedAfter = Date.now() - idleFrom;
    assert.ok(reapedAfter >= 140, `reaped after only ${reapedAfter} ms`);
    assert.deepEqual(eventsOf(events, workspaceId), ["dial", "reap"]);
    assert.equal(oldConn.closed, true);
    // The pool closed it, and pool.close() will not wait for a socket it no longer holds.
    await oldConn.finished;
    assert.equal(pool.size, 0);
    await waitFor("the idle codex to exit", () => !isAlive(oldPid));
    await waitFor("the resolver to forget it", () => resolver.pid(workspaceId) === undefined);

    const conn = await pool.get(workspaceId);
    assert.notEqual(conn, oldConn);
    const newPid = pidOf(workspaceId);
    assert.notEqual(newPid, oldPid);
    assert.ok(isAlive(newPid));
    assert.deepEqual(eventsOf(events, workspaceId), ["dial", "reap", "dial"]);
    const again = await pool.turn(workspaceId, first.threadId, text("after the nap"), {
      timeoutMs: TURN_TIMEOUT_MS,
    });
    assert.equal(again.turn.status, "completed");
    assert.deepEqual(historyEndingWith("after the nap"), ["before the nap", "after the nap"]);
  });
});

test("Pool does not reap a workspace whose turn waits on a silent model for longer than idleTtlMs", async () => {
  const { model, resolver } = h();
  const workspaceId = "ws-idle";
  // codex sends nothing while it waits on the model: no frames, but a turn in flight.
  model.respond = () => ({ type: "message", text: "worth the wait", delayMs: 400 });
  await withPool(resolver, { idleTtlMs: 150, sweepIntervalMs: 25 }, async (pool, events) => {
    const conn = await pool.get(workspaceId);
    const pid = pidOf(workspaceId);
    const { turn } = await pool.turn(workspaceId, null, text("take your time"), {
      timeoutMs: TURN_TIMEOUT_MS,
    });
    assert.equal(turn.status, "completed");
    assert.deepEqual(agentTexts(turn), ["worth the wait"]);
    assert.deepEqual(eventsOf(events, workspaceId), ["dial"]);
    assert.equal(conn.closed, false);
    assert.equal(await pool.get(workspaceId), conn);
    assert.equal(pidOf(workspaceId), pid);
  });
});

test("Pool.close() and resolver.close() leave no codex process behind, even with a command running mid-turn", async () => {
  const { model, home } = h();
  // A resolver and directory of its own, so the checks see only this test's processes.
  const dir = join(h().dir, "close-test");
  // On SIGTERM codex waits for its turns to finish: a codex busy with a turn only stops at
  // the SIGKILL that follows stopTimeoutMs (3 s by default), so keep that short here.
  const resolver = fixtureResolver(home, dir, { stopTimeoutMs: 300 });
  const longCommand = execThenReply("sleep 30", "never sent");
  const chat = echo("echo: ");
  model.respond = (request) =>
    request.lastUserText === "run a long command" ? longCommand(request) : chat(request);
  const pool = new Pool(resolver, { dial: { approvals: "accept" } });
  try {
    const busy = settle(
      pool.turn("ws-c1", null, text("run a long command"), {
        timeoutMs: TURN_TIMEOUT_MS,
        threadParams: { approvalPolicy: "untrusted", sandbox: "workspace-write" },
      }),
    );
    const idle = await pool.turn("ws-c2", null, text("just talk"), {
      timeoutMs: TURN_TIMEOUT_MS,
    });
    assert.equal(idle.turn.status, "completed");
    const pids = [pidOf("ws-c1", resolver), pidOf("ws-c2", resolver)];
    assert.ok(pids.every(isAlive));
    let sleeper: number | undefined;
    if (existsSync("/proc/self/cwd")) {
      await waitFor("the model's command to run", () => {
        sleeper = processesIn(dir).find((proc) => proc.command === "sleep 30")?.pid;
        return sleeper !== undefined;
      });
    }

    await pool.close();
    const error = await busy;
    assert.ok(
      error instanceof ConnectionClosedError,
      `expected ConnectionClosedError, got ${error}`,
    );
    await resolver.close();
    assert.deepEqual(pids.map(isAlive), [false, false]);
    assert.equal(resolver.pid("ws-c1"), undefined);
    assert.equal(resolver.pid("ws-c2"), undefined);
    // codex takes its command down with it (bwrap --die-with-parent, or the parent-death
    // signal outside the sandbox); give the kernel a moment to deliver it.
    if (sleeper !== undefined) {
      const pid = sleeper;
      await waitFor("the model's command to die with codex", () => !isAlive(pid), 1_000);
    }
    // codex runs a login shell per thread (its shell snapshot) in a session of its own and
    // does not stop it on SIGTERM: it can outlive codex briefly, but must not linger.
    await waitFor("every process in the workspaces to exit", () => processesIn(dir).length === 0);

    assert.equal(pool.size, 0);
    await assert.rejects(pool.get("ws-c1"), PoolClosedError);
    await pool.close(); // idempotent
  } finally {
    await pool.close();
    await resolver.close();
  }
});

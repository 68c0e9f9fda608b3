import { test } from "./_test.ts";
import { isAlive, waitFor } from "./_wait.ts";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { createHash } from "node:crypto";
import { existsSync, readFileSync } from "node:fs";
import {
  chmod,
  mkdir,
  mkdtemp,
  readdir,
  readFile,
  realpath,
  rename,
  rm,
  stat,
  symlink,
  writeFile,
} from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import process from "node:process";
import { fileURLToPath } from "node:url";
import type { Endpoint } from "../src/resolver.ts";
import { type CodexResolverOptions, createCodexResolver, SpawnError } from "../src/supervisor.ts";
import { hostIdentity, processInfo, type ProcessRecord } from "../src/_process_record.ts";
import { makeCodexHome, type TempCodexHome } from "./_codex_home.ts";
import { reply, startMockModel } from "./_mock_model.ts";
import {
  isDead,
  killGroup,
  liveGroupMembers,
  runDirOf,
  runScript,
  runtimeCommand,
  tokenDigestOf,
} from "./_processes.ts";

const RESOLVER_HOST = fileURLToPath(new URL("./_resolver_host.ts", import.meta.url));
const FAKE_CODEX = fileURLToPath(new URL("./_fake_codex.ts", import.meta.url));
// Bun's own default is 5 s per test; these start a runtime and codex.
const SLOW = { timeout: 30_000 };

// Everything a test creates lives under one temp dir, removed at the end.
interface Sandbox {
  dir: string;
  home: TempCodexHome;
  options(extra?: CodexResolverOptions): CodexResolverOptions;
  cleanup(): Promise<void>;
}

async function sandbox(modelBaseUrl = "http://127.0.0.1:9/v1"): Promise<Sandbox> {
  const dir = await realpath(await mkdtemp(join(tmpdir(), "supervisor-test-")));
  const home = await makeCodexHome(modelBaseUrl);
  return {
    dir,
    home,
    options: (extra = {}) => ({
      codexHome: () => home.path,
      cwd: (id) => join(dir, "workspaces", id),
      ...extra,
    }),
    cleanup: async () => {
      await home.cleanup();
      await rm(dir, { recursive: true, force: true });
    },
  };
}

async function script(dir: string, name: string, body: string): Promise<string> {
  const path = join(dir, name);
  await writeFile(path, `#!/bin/sh\n${body}\n`);
  await chmod(path, 0o755);
  return path;
}

function commandLine(pid: number): string[] {
  if (existsSync(`/proc/${pid}/cmdline`)) {
    return readFileSync(`/proc/${pid}/cmdline`, "utf8").split("\0").filter(Boolean);
  }
  return execFileSync("ps", ["-ww", "-o", "args=", "-p", String(pid)], { encoding: "utf8" })
    .trim().split(/\s+/);
}

async function readyz(endpoint: Endpoint): Promise<number> {
  const response = await fetch(endpoint.url.replace(/^ws/, "http") + "/readyz");
  await response.body?.cancel();
  return response.status;
}

async function refusesConnections(endpoint: Endpoint): Promise<boolean> {
  try {
    await readyz(endpoint);
    return false;
  } catch {
    return true;
  }
}

// Deno, Bun and Node 22 accept upgrade headers as a non-standard second argument.
type WebSocketWithHeaders = new (
  url: string,
  options: { headers: Record<string, string> },
) => WebSocket;

function openSocket(url: string, headers?: Record<string, string>): WebSocket {
  return headers
    ? new (WebSocket as unknown as WebSocketWithHeaders)(url, { headers })
    : new WebSocket(url);
}

/** Resolves "open" once the socket opens, or "refused" if it fails before opening. */
function settle(socket: WebSocket): Promise<"open" | "refused"> {
  return new Promise((resolve) => {
    socket.addEventListener("open", () => resolve("open"), { once: true });
    // Node 22 reports a refused upgrade with 'error' only: no 'close', and readyState
    // stays CONNECTING. Deno and Bun follow with 'close'.
    socket.addEventListener("error", () => resolve("refused"), { once: true });
    socket.addEventListener("close", () => resolve("refused"), { once: true });
  });
}

async function closeSocket(socket: WebSocket): Promise<void> {
  if (socket.readyState !== WebSocket.OPEN && socket.readyState !== WebSocket.CLOSING) return;
  const closed = new Promise((resolve) => socket.addEventListener("close", resolve));
  socket.close();
  await closed;
}

async function connects(endpoint: Endpoint): Promise<boolean> {
  const socket = openSocket(endpoint.url, endpoint.headers);
  const outcome = await settle(socket);
  await closeSocket(socket);
  return outcome === "open";
}

test("createCodexResolver() spawns codex and returns a ready endpoint with a bearer token", async () => {
  const box = await sandbox();
  const resolver = createCodexResolver(box.options());
  try {
    const endpoint = await resolver.resolve("ws-1");
    assert.match(endpoint.url, /^ws:\/\/127\.0\.0\.1:\d+$/);
    assert.match(endpoint.headers?.Authorization ?? "", /^Bearer [0-9a-f]{64}$/);
    assert.equal(await readyz(endpoint), 200);
    const pid = resolver.pid("ws-1");
    assert.ok(pid !== undefined && isAlive(pid));
  } finally {
    await resolver.close();
    await box.cleanup();
  }
});

test("createCodexResolver() endpoint refuses a WebSocket upgrade without the token", async () => {
  const box = await sandbox();
  const resolver = createCodexResolver(box.options());
  try {
    const endpoint = await resolver.resolve("ws-1");
    const anonymous = openSocket(endpoint.url);
    assert.equal(await settle(anonymous), "refused");
    const wrongToken = openSocket(endpoint.url, { Authorization: `Bearer ${"0".repeat(64)}` });
    assert.equal(await settle(wrongToken), "refused");
    assert.equal(await connects(endpoint), true);
  } finally {
    await resolver.close();
    await box.cleanup();
  }
});

test("createCodexResolver() shares one spawn between concurrent resolves of a workspace", async () => {
  const box = await sandbox();
  const resolver = createCodexResolver(box.options());
  try {
    const endpoints = await Promise.all(
      Array.from({ length: 10 }, () => resolver.resolve("ws-1")),
    );
    assert.equal(new Set(endpoints.map((endpoint) => endpoint.url)).size, 1);
    assert.equal(new Set(endpoints.map((endpoint) => endpoint.headers?.Authorization)).size, 1);
    const pid = resolver.pid("ws-1");
    assert.ok(pid !== undefined);
    assert.equal((await resolver.resolve("ws-1")).url, endpoints[0]?.url);
    assert.equal(resolver.pid("ws-1"), pid);
  } finally {
    await resolver.close();
    await box.cleanup();
  }
});

test("createCodexResolver() gives each workspace its own process and a cwd created on demand", async () => {
  const box = await sandbox();
  const resolver = createCodexResolver(box.options());
  try {
    const dirA = join(box.dir, "workspaces", "ws-a");
    const dirB = join(box.dir, "workspaces", "ws-b");
    assert.equal(existsSync(dirA), false);
    const [a, b] = await Promise.all([resolver.resolve("ws-a"), resolver.resolve("ws-b")]);
    assert.notEqual(a.url, b.url);
    assert.notEqual(a.headers?.Authorization, b.headers?.Authorization);
    const pidA = resolver.pid("ws-a");
    const pidB = resolver.pid("ws-b");
    assert.ok(pidA !== undefined && pidB !== undefined && pidA !== pidB);
    assert.ok((await stat(dirA)).isDirectory());
    assert.ok((await stat(dirB)).isDirectory());
    if (existsSync(`/proc/${pidA}/cwd`)) {
      assert.equal(await realpath(`/proc/${pidA}/cwd`), dirA);
      assert.equal(await realpath(`/proc/${pidB}/cwd`), dirB);
    }
  } finally {
    await resolver.close();
    await box.cleanup();
  }
});

test("createCodexResolver() replaces a codex killed with SIGKILL on the next resolve", async () => {
  const box = await sandbox();
  const resolver = createCodexResolver(box.options());
  try {
    const first = await resolver.resolve("ws-1");
    const firstPid = resolver.pid("ws-1")!;
    process.kill(firstPid, "SIGKILL");
    // Wait for the death itself, not for our 'exit' event: the quirk under test is the
    // window in which the socket is gone but the runtime has not reported the exit yet.
    await waitFor("the old app-server to stop listening", () => refusesConnections(first));
    const second = await resolver.resolve("ws-1");
    const secondPid = resolver.pid("ws-1");
    assert.ok(secondPid !== undefined && secondPid !== firstPid);
    assert.notEqual(second.url, first.url);
    assert.equal(isAlive(firstPid), false);
    assert.equal(await connects(second), true);
  } finally {
    await resolver.close();
    await box.cleanup();
  }
});

test("createCodexResolver() crashed() tells a killed codex from a live or released one", async () => {
  const box = await sandbox();
  const resolver = createCodexResolver(box.options());
  try {
    await resolver.resolve("ws-live");
    await resolver.resolve("ws-killed");
    await resolver.resolve("ws-released");
    assert.equal(await resolver.crashed("ws-live", 30), false);
    await resolver.release("ws-released");
    assert.equal(await resolver.crashed("ws-released", 30), false);
    process.kill(resolver.pid("ws-killed")!, "SIGKILL");
    // Asked at once, before the exit is reported: crashed() waits for the news.
    assert.equal(await resolver.crashed("ws-killed", 2_000), true);
    assert.equal(await resolver.crashed("ws-killed", 0), true, "remembered until a respawn");
    await resolver.resolve("ws-killed");
    assert.equal(await resolver.crashed("ws-killed", 30), false, "a fresh process");
  } finally {
    await resolver.close();
    await box.cleanup();
  }
});

test("createCodexResolver() crashed() is true for a codex killed just before its release", async () => {
  const box = await sandbox();
  const resolver = createCodexResolver(box.options());
  try {
    await resolver.resolve("ws-1");
    const pid = resolver.pid("ws-1")!;
    // What a pool does when the crash drops its connection: release at once, before the
    // runtime has reported the exit.
    process.kill(pid, "SIGKILL");
    await resolver.release("ws-1");
    assert.equal(isAlive(pid), false);
    assert.equal(await resolver.crashed("ws-1", 0), true);
  } finally {
    await resolver.close();
    await box.cleanup();
  }
});

test("createCodexResolver() runs each codex in a process group of its own", async () => {
  const box = await sandbox();
  const resolver = createCodexResolver(box.options());
  try {
    await resolver.resolve("ws-1");
    const pid = resolver.pid("ws-1")!;
    // Field 5 of /proc/PID/stat is the process group; the comm field before it has no spaces.
    const group = Number(readFileSync(`/proc/${pid}/stat`, "utf8").split(" ")[4]);
    assert.equal(group, pid, "Ctrl+C on the broker's terminal must not reach codex");
  } finally {
    await resolver.close();
    await box.cleanup();
  }
});

test("createCodexResolver() rejects with SpawnError when the codex binary is missing", async () => {
  const box = await sandbox();
  const command = join(box.dir, "no-such-codex");
  const resolver = createCodexResolver(box.options({ command }));
  try {
    const error = await resolver.resolve("ws-1").then(() => undefined, (error) => error);
    assert.ok(error instanceof SpawnError, String(error));
    assert.equal(error.name, "SpawnError");
    assert.equal(error.workspaceId, "ws-1");
    assert.match(error.message, /^Cannot start codex for workspace ws-1: command not found: /);
    assert.ok(error.message.includes(command));
    assert.equal(resolver.pid("ws-1"), undefined);
  } finally {
    await resolver.close();
    await box.cleanup();
  }
});

test("createCodexResolver() rejects with the exit code and stderr of a codex that exits before listening", async () => {
  const box = await sandbox();
  const command = await script(box.dir, "exits", "echo starting; echo boom >&2; exit 3");
  const resolver = createCodexResolver(box.options({ command }));
  try {
    const error = await resolver.resolve("ws-1").then(() => undefined, (error) => error);
    assert.ok(error instanceof SpawnError, String(error));
    assert.equal(error.exitCode, 3);
    assert.equal(error.signal, null);
    assert.match(error.message, /exited with code 3 before listening/);
    assert.match(error.message, /boom/);
    assert.equal(error.stderrTail, "boom\n");
    // A failure is not cached: the next resolve tries again (and fails again).
    await assert.rejects(resolver.resolve("ws-1"), SpawnError);
  } finally {
    await resolver.close();
    await box.cleanup();
  }
});

test("createCodexResolver() drains a chatty child and keeps only the last 8 KiB of its stderr", async () => {
  const box = await sandbox();
  // Far more than a pipe buffer on both streams: an undrained pipe would block the child
  // forever instead of letting it reach its exit.
  const command = await script(
    box.dir,
    "chatty",
    `line=$(printf '%0100d' 0)
i=0
while [ $i -lt 3000 ]; do echo "out $line"; echo "err $i $line" >&2; i=$((i+1)); done
echo last-words >&2
exit 4`,
  );
  const resolver = createCodexResolver(box.options({ command }));
  try {
    const error = await resolver.resolve("ws-1").then(() => undefined, (error) => error);
    assert.ok(error instanceof SpawnError, String(error));
    assert.equal(error.exitCode, 4);
    assert.ok(error.stderrTail.length <= 8 * 1024);
    assert.ok(error.stderrTail.endsWith("err 2999 " + "0".repeat(100) + "\nlast-words\n"));
    assert.match(error.message, /last-words$/);
  } finally {
    await resolver.close();
    await box.cleanup();
  }
});

test("createCodexResolver() rejects with SpawnError and stops the process when /readyz never answers in time", async () => {
  const box = await sandbox();
  const pidFile = join(box.dir, "pid");
  // Port 1 refuses connections, so /readyz never answers.
  const command = await script(
    box.dir,
    "never-ready",
    `echo $$ > ${pidFile}\necho "  listening on: ws://127.0.0.1:1" >&2\nexec sleep 30`,
  );
  const resolver = createCodexResolver(box.options({ command, readyTimeoutMs: 300 }));
  try {
    const error = await resolver.resolve("ws-1").then(() => undefined, (error) => error);
    assert.ok(error instanceof SpawnError, String(error));
    assert.match(error.message, /did not become ready within 300 ms/);
    assert.match(error.message, /listening on: ws:\/\/127\.0\.0\.1:1/);
    const pid = Number(await readFile(pidFile, "utf8"));
    assert.equal(isAlive(pid), false);
  } finally {
    await resolver.close();
    await box.cleanup();
  }
});

test("createCodexResolver() sends SIGKILL after stopTimeoutMs to a process that ignores SIGTERM", async () => {
  const box = await sandbox();
  const pidFile = join(box.dir, "pid");
  // An ignored signal stays ignored across exec, so sleep shrugs off SIGTERM.
  const command = await script(
    box.dir,
    "stubborn",
    `trap '' TERM\necho $$ > ${pidFile}\nexec sleep 30`,
  );
  const resolver = createCodexResolver(
    box.options({ command, readyTimeoutMs: 200, stopTimeoutMs: 200 }),
  );
  try {
    const started = Date.now();
    await assert.rejects(resolver.resolve("ws-1"), /did not become ready within 200 ms/);
    assert.ok(Date.now() - started >= 400);
    assert.equal(isAlive(Number(await readFile(pidFile, "utf8"))), false);
  } finally {
    await resolver.close();
    await box.cleanup();
  }
});

test("createCodexResolver() rejects an aborted resolve with the signal's reason and stops the half-started process", async () => {
  const box = await sandbox();
  const command = await script(box.dir, "slow", "exec sleep 30");
  const resolver = createCodexResolver(box.options({ command }));
  try {
    const controller = new AbortController();
    const pending = resolver.resolve("ws-1", controller.signal);
    await waitFor("the spawn", () => resolver.pid("ws-1") !== undefined);
    const pid = resolver.pid("ws-1")!;
    const reason = new Error("caller gave up");
    controller.abort(reason);
    await assert.rejects(pending, (error) => error === reason);
    assert.equal(isAlive(pid), false);
    assert.equal(resolver.pid("ws-1"), undefined);
  } finally {
    await resolver.close();
    await box.cleanup();
  }
});

test("createCodexResolver() release() stops the process and deletes its private run directory", async () => {
  const box = await sandbox();
  const resolver = createCodexResolver(box.options());
  try {
    const endpoint = await resolver.resolve("ws-1");
    const pid = resolver.pid("ws-1")!;
    const args = commandLine(pid);
    const tokenDir = runDirOf(pid, tmpdir());
    assert.equal((await stat(tokenDir)).mode & 0o777, 0o700);
    assert.deepEqual(await readdir(tokenDir), ["codex.json"]);
    assert.ok(!args.some((arg) => endpoint.headers?.Authorization?.includes(arg)));

    await resolver.release("ws-1");
    assert.equal(isAlive(pid), false);
    assert.equal(resolver.pid("ws-1"), undefined);
    assert.equal(existsSync(tokenDir), false);
    // Released is not closed: the workspace can come back.
    await resolver.resolve("ws-1");
    assert.notEqual(resolver.pid("ws-1"), pid);
  } finally {
    await resolver.close();
    await box.cleanup();
  }
});

test("createCodexResolver() reports a token directory it cannot remove to onError, and release() still resolves", async () => {
  const box = await sandbox();
  // The token directory goes under os.tmpdir(), which follows TMPDIR.
  const tmp = join(box.dir, "tmp");
  await mkdir(tmp);
  const savedTmpdir = process.env.TMPDIR;
  const restoreTmpdir = () => {
    if (savedTmpdir === undefined) delete process.env.TMPDIR;
    else process.env.TMPDIR = savedTmpdir;
  };
  process.env.TMPDIR = tmp;
  const errors: Error[] = [];
  const resolver = createCodexResolver(box.options({
    env: { TMPDIR: savedTmpdir },
    onError: (error) => errors.push(error),
  }));
  try {
    await resolver.resolve("ws-1");
    restoreTmpdir();
    const pid = resolver.pid("ws-1")!;
    // Root may remove anything, but not through a symlink loop: every path under `tmp`
    // now fails with ELOOP.
    await rename(tmp, `${tmp}.moved`);
    await symlink(tmp, tmp);
    await resolver.release("ws-1");
    assert.equal(isAlive(pid), false);
    assert.equal(resolver.pid("ws-1"), undefined);
    assert.equal(errors.length, 1);
    assert.match(
      errors[0]!.message,
      /^Cannot remove the token directory \S+\/codex-broker-\S+ of workspace ws-1: /,
    );
    assert.equal((errors[0]!.cause as { code?: string }).code, "ELOOP");
    // Released is not broken: the workspace comes back.
    await resolver.resolve("ws-1");
    assert.ok(resolver.pid("ws-1") !== undefined);
  } finally {
    restoreTmpdir();
    await resolver.close();
    await box.cleanup();
  }
});

test("createCodexResolver() rejects a readyTimeoutMs or stopTimeoutMs no timer can wait for with a RangeError", async () => {
  for (const name of ["readyTimeoutMs", "stopTimeoutMs"]) {
    assert.throws(
      () => createCodexResolver({ [name]: 3_000 * 3_600_000 }),
      (error: unknown) => {
        assert.ok(error instanceof RangeError);
        assert.match(error.message, new RegExp(`^Invalid ${name}: .*up to 2147483647`));
        return true;
      },
    );
  }
  // The largest delay a timer honours is still accepted.
  await createCodexResolver({ readyTimeoutMs: 2 ** 31 - 1, stopTimeoutMs: 2 ** 31 - 1 }).close();
});

test("createCodexResolver() close() leaves no child behind and refuses later resolves", async () => {
  const box = await sandbox();
  const resolver = createCodexResolver(box.options());
  try {
    await Promise.all([resolver.resolve("ws-a"), resolver.resolve("ws-b")]);
    const pids = [resolver.pid("ws-a")!, resolver.pid("ws-b")!];
    assert.ok(pids.every(isAlive));
    await resolver.close();
    assert.deepEqual(pids.map(isAlive), [false, false]);
    await resolver.close();
    await assert.rejects(resolver.resolve("ws-a"), /the codex resolver is closed/);
  } finally {
    await resolver.close();
    await box.cleanup();
  }
});

test("createCodexResolver() rejects invalid workspace ids with TypeError before touching the file system", async () => {
  const box = await sandbox();
  const touched: string[] = [];
  const resolver = createCodexResolver(box.options({
    cwd: (id) => {
      touched.push(id);
      return join(box.dir, id);
    },
  }));
  try {
    for (const id of ["a/b", "../x", "", ".", "..", "x".repeat(129), "a b", "é", "a\0b"]) {
      await assert.rejects(resolver.resolve(id), TypeError, `id ${JSON.stringify(id)}`);
    }
    await assert.rejects(resolver.release("a/b"), TypeError);
    await assert.rejects(resolver.resolve(42 as unknown as string), /expected a string/);
    assert.deepEqual(touched, []);
  } finally {
    await resolver.close();
    await box.cleanup();
  }
});

/**
 * A codex stand-in that first starts `sleep 30` in its process group, as codex starts the
 * commands a model runs, and writes that helper's pid to `pidFile`.
 */
async function fakeCodexWithHelper(dir: string, pidFile: string, helperIgnoresTerm: boolean) {
  const [runtime, prefix] = runtimeCommand(FAKE_CODEX);
  const quote = (arg: string) => `'${arg.replaceAll("'", `'\\''`)}'`;
  // An ignored signal stays ignored across exec: only the helper ignores SIGTERM.
  const helper = helperIgnoresTerm ? "(trap '' TERM; exec sleep 30)" : "sleep 30";
  return await script(
    dir,
    "fake-codex",
    `${helper} </dev/null >/dev/null 2>&1 &
echo $! > ${quote(pidFile)}
exec ${[runtime, ...prefix, FAKE_CODEX].map(quote).join(" ")}`,
  );
}

/** The run directories (`codex-broker-*`) directly under `dir`. */
async function runDirsUnder(dir: string): Promise<string[]> {
  const names = await readdir(dir).catch(() => []);
  return names.filter((name) => name.startsWith("codex-broker-")).map((name) => join(dir, name));
}

test(
  "createCodexResolver() leaves no codex and no token behind when its host process is killed with SIGKILL",
  SLOW,
  async () => {
    const box = await sandbox();
    const host = runScript(RESOLVER_HOST, [JSON.stringify({
      root: join(box.dir, "workspaces"),
      codexHome: box.home.path,
      workspaces: ["ws-a", "ws-b"],
      layout: "temp",
    })]);
    const pids: number[] = [];
    const tokenDirs: string[] = [];
    try {
      const started = JSON.parse(await host.firstLine) as { pids: Record<string, number> };
      pids.push(...Object.values(started.pids));
      tokenDirs.push(...pids.map((pid) => runDirOf(pid, tmpdir())));
      assert.equal(pids.length, 2);
      assert.ok(tokenDirs.every((dir) => existsSync(join(dir, "codex.json"))));

      host.child.kill("SIGKILL");
      await host.closed;
      await waitFor("every codex to die", () => pids.every(isDead), 5_000);
      await waitFor("every token directory to go", () => !tokenDirs.some(existsSync), 5_000);
      // Nothing of theirs is left either: no watchdog, no helper in their groups.
      await waitFor("their process groups to empty", () => {
        return pids.every((pid) => liveGroupMembers(pid).length === 0);
      }, 5_000);
    } finally {
      host.child.kill("SIGKILL");
      await host.closed;
      for (const pid of pids) killGroup(pid);
      for (const dir of tokenDirs) await rm(dir, { recursive: true, force: true });
      await box.cleanup();
    }
  },
);

test(
  "createCodexResolver() leaves no codex and no token under runDir when its host process is killed with SIGKILL",
  SLOW,
  async () => {
    const box = await sandbox();
    const root = join(box.dir, "workspaces");
    const host = runScript(RESOLVER_HOST, [JSON.stringify({
      root,
      codexHome: box.home.path,
      workspaces: ["ws-a"],
      layout: "workspace",
    })]);
    let pid: number | undefined;
    try {
      const started = JSON.parse(await host.firstLine) as { pids: Record<string, number> };
      pid = started.pids["ws-a"]!;
      const runDir = join(root, "ws-a", "run");
      const [spawnDir, ...others] = await runDirsUnder(runDir);
      assert.deepEqual(others, []);
      assert.equal(runDirOf(pid, runDir), spawnDir);

      host.child.kill("SIGKILL");
      await host.closed;
      await waitFor("codex to die", () => isDead(pid!), 5_000);
      await waitFor("its run directory to go", () => !existsSync(spawnDir!), 5_000);
      await waitFor("its process group to empty", () => liveGroupMembers(pid!).length === 0);
      // The workspace's state stays: its own directory, home and the (empty) run directory.
      assert.deepEqual(await readdir(runDir), []);
      assert.ok(existsSync(join(root, "ws-a", "codex-home", "config.toml")));
      assert.ok((await stat(join(root, "ws-a", "work"))).isDirectory());
    } finally {
      host.child.kill("SIGKILL");
      await host.closed;
      if (pid !== undefined) killGroup(pid);
      await box.cleanup();
    }
  },
);

test(
  "createCodexResolver() kills what a crashed codex left running in its process group",
  SLOW,
  async () => {
    const box = await sandbox();
    const helperPidFile = join(box.dir, "helper.pid");
    const command = await fakeCodexWithHelper(box.dir, helperPidFile, false);
    const resolver = createCodexResolver(box.options({ command }));
    let helper: number | undefined;
    try {
      await resolver.resolve("ws-1");
      const pid = resolver.pid("ws-1")!;
      helper = Number(await readFile(helperPidFile, "utf8"));
      assert.equal(isDead(helper), false);
      process.kill(pid, "SIGKILL");
      assert.equal(await resolver.crashed("ws-1", 5_000), true);
      await waitFor("the crashed codex's helper to die", () => isDead(helper!), 2_000);
      await waitFor("its process group to empty", () => liveGroupMembers(pid).length === 0);
    } finally {
      await resolver.close();
      if (helper !== undefined && !isDead(helper)) process.kill(helper, "SIGKILL");
      await box.cleanup();
    }
  },
);

test(
  "createCodexResolver() release() leaves no member of codex's process group behind, even one that ignores SIGTERM",
  SLOW,
  async () => {
    const box = await sandbox();
    const helperPidFile = join(box.dir, "helper.pid");
    const command = await fakeCodexWithHelper(box.dir, helperPidFile, true);
    const resolver = createCodexResolver(box.options({ command }));
    let helper: number | undefined;
    try {
      await resolver.resolve("ws-1");
      const pid = resolver.pid("ws-1")!;
      helper = Number(await readFile(helperPidFile, "utf8"));
      await resolver.release("ws-1");
      assert.equal(isDead(pid), true);
      await waitFor("the helper that ignores SIGTERM to die", () => isDead(helper!), 2_000);
      await waitFor("its process group to empty", () => liveGroupMembers(pid).length === 0);
    } finally {
      await resolver.close();
      if (helper !== undefined && !isDead(helper)) process.kill(helper, "SIGKILL");
      await box.cleanup();
    }
  },
);

test("createCodexResolver() release() of one workspace leaves nothing of its codex behind while another runs", async () => {
  const box = await sandbox();
  const resolver = createCodexResolver(box.options());
  try {
    await resolver.resolve("ws-a");
    await resolver.resolve("ws-b");
    const [a, b] = [resolver.pid("ws-a")!, resolver.pid("ws-b")!];
    const tokenDir = runDirOf(a, tmpdir());
    // A second codex must not hold a copy of the first one's watchdog pipe, or the first
    // watchdog would wait for the second codex to end.
    await resolver.release("ws-a");
    assert.equal(existsSync(tokenDir), false);
    // SIGKILL is sent to the whole group at once; the last members may take a moment to go.
    await waitFor("ws-a's process group to empty", () => liveGroupMembers(a).length === 0, 1_000);
    assert.ok(liveGroupMembers(b).includes(b));
  } finally {
    await resolver.close();
    await box.cleanup();
  }
});

test("createCodexResolver() keeps a process record in a private directory under runDir, and the token nowhere on disk: codex gets its SHA-256", async () => {
  const box = await sandbox();
  const runDir = join(box.dir, "ws-1", "run");
  const resolver = createCodexResolver(box.options({
    runDir: (id) => join(box.dir, id, "run"),
    brokerId: "broker-7",
  }));
  try {
    const endpoint = await resolver.resolve("ws-1");
    const pid = resolver.pid("ws-1")!;
    const [spawnDir, ...others] = await runDirsUnder(runDir);
    assert.ok(spawnDir !== undefined);
    assert.deepEqual(others, []);
    assert.equal((await stat(runDir)).mode & 0o777, 0o700);
    assert.equal((await stat(spawnDir)).mode & 0o777, 0o700);
    assert.deepEqual(await readdir(spawnDir), ["codex.json"]);
    const token = endpoint.headers!.Authorization!.replace(/^Bearer /, "");
    assert.match(token, /^[0-9a-f]{64}$/);
    const tokenSha256 = createHash("sha256").update(token).digest("hex");
    assert.equal(tokenDigestOf(pid), tokenSha256);
    assert.ok(!commandLine(pid).some((arg) => arg.includes(token)));

    const recordFile = join(spawnDir, "codex.json");
    assert.equal((await stat(recordFile)).mode & 0o777, 0o600);
    const record = JSON.parse(await readFile(recordFile, "utf8")) as ProcessRecord;
    const here = hostIdentity();
    assert.deepEqual(record, {
      version: 1,
      workspaceId: "ws-1",
      pid,
      pgid: pid,
      startTime: processInfo(pid)!.startTime,
      bootId: here.bootId,
      hostname: here.hostname,
      pidNamespace: here.pidNamespace,
      tokenSha256,
      brokerId: "broker-7",
      brokerPid: process.pid,
      brokerStartTime: processInfo(process.pid)!.startTime,
    });
    assert.match(record.bootId ?? "", /^[0-9a-f-]{36}$/);

    await resolver.release("ws-1");
    assert.equal(existsSync(spawnDir), false);
    assert.deepEqual(await readdir(runDir), [], "the run directory itself stays");
  } finally {
    await resolver.close();
    await box.cleanup();
  }
});

test(
  "createCodexResolver() gives a workspace its own codex home seeded from codexHomeTemplate, and keeps its threads there",
  SLOW,
  async () => {
    const model = await startMockModel({ respond: reply("hello from the workspace's home") });
    const box = await sandbox(model.baseUrl);
    const template = box.home.path;
    await writeFile(join(template, "auth.json"), `{"OPENAI_API_KEY":"sk-test"}`, { mode: 0o644 });
    await mkdir(join(template, "sessions"));
    await writeFile(join(template, "history.jsonl"), "");
    const workspaceHome = join(box.dir, "ws-1", "codex-home");
    const resolver = createCodexResolver({
      cwd: (id) => join(box.dir, id, "work"),
      codexHome: (id) => join(box.dir, id, "codex-home"),
      codexHomeTemplate: template,
    });
    let socket: WebSocket | undefined;
    try {
      const endpoint = await resolver.resolve("ws-1");
      assert.equal((await stat(workspaceHome)).mode & 0o777, 0o700);
      assert.equal((await stat(join(workspaceHome, "auth.json"))).mode & 0o777, 0o600);
      assert.equal(
        await readFile(join(workspaceHome, "config.toml"), "utf8"),
        await readFile(join(template, "config.toml"), "utf8"),
      );
      assert.equal(existsSync(join(workspaceHome, "history.jsonl")), false);

      // The copied config.toml is what points codex at the mock model.
      socket = openSocket(endpoint.url, endpoint.headers);
      const rpc = rpcClient(socket);
      assert.equal(await settle(socket), "open");
      await rpc.call(0, "initialize", {
        clientInfo: { name: "supervisor_test", title: "Supervisor test", version: "0.0.0" },
        capabilities: null,
      });
      rpc.notify("initialized");
      const initialize = rpc.inbox.find((message) => message.id === 0)!.result as {
        codexHome: string;
      };
      assert.equal(await realpath(initialize.codexHome), workspaceHome);
      const cwd = join(box.dir, "ws-1", "work");
      const started = await rpc.call(1, "thread/start", { cwd }) as { thread: { id: string } };
      await rpc.call(2, "turn/start", {
        threadId: started.thread.id,
        input: [{ type: "text", text: "hi", text_elements: [] }],
      });
      const completed = await rpc.next((message) => message.method === "turn/completed");
      assert.equal((completed.params as { turn: { status: string } }).turn.status, "completed");
      assert.equal(model.requests.length, 1);

      // The thread lives in the workspace's home, not in the template nor in the work dir.
      const rollouts = (await readdir(join(workspaceHome, "sessions"), { recursive: true }))
        .filter((name) => String(name).endsWith(".jsonl"));
      assert.equal(rollouts.length, 1);
      assert.ok(String(rollouts[0]).includes(started.thread.id));
      assert.deepEqual(await readdir(join(template, "sessions")), []);
      assert.deepEqual(await readdir(cwd), []);
    } finally {
      if (socket) await closeSocket(socket);
      await resolver.close();
      await box.cleanup();
      await model.close();
    }
  },
);

test("createCodexResolver() rejects codexHomeTemplate without codexHome with a TypeError", () => {
  assert.throws(
    () => createCodexResolver({ codexHomeTemplate: "/tmp/template" }),
    (error: unknown) => error instanceof TypeError && /codexHome is required/.test(error.message),
  );
});

interface RpcMessage {
  id?: number;
  method?: string;
  params?: Record<string, unknown>;
  result?: unknown;
  error?: unknown;
}

/** A bare JSON-RPC client, so the harness is proven without the project's Conn. */
function rpcClient(socket: WebSocket) {
  const inbox: RpcMessage[] = [];
  const wakers = new Set<() => void>();
  socket.addEventListener("message", (event) => {
    const message = JSON.parse(String(event.data)) as RpcMessage;
    if (message.method !== undefined && message.id !== undefined) {
      // An unexpected server request would stall the turn; refuse it instead.
      socket.send(JSON.stringify({
        id: message.id,
        error: { code: -32601, message: "not supported" },
      }));
    }
    inbox.push(message);
    for (const wake of wakers) wake();
  });

  async function next(match: (message: RpcMessage) => boolean): Promise<RpcMessage> {
    const deadline = Date.now() + 10_000;
    for (;;) {
      const found = inbox.find(match);
      if (found) return found;
      if (Date.now() > deadline) throw new Error("Timed out waiting for a message");
      await new Promise<void>((resolve) => {
        const wake = () => {
          clearTimeout(timer);
          wakers.delete(wake);
          resolve();
        };
        const timer = setTimeout(wake, 100);
        wakers.add(wake);
      });
    }
  }

  async function call(id: number, method: string, params: unknown): Promise<unknown> {
    socket.send(JSON.stringify({ id, method, params }));
    const answer = await next((message) => message.id === id && message.method === undefined);
    if (answer.error) throw new Error(`${method} failed: ${JSON.stringify(answer.error)}`);
    return answer.result;
  }

  function notify(method: string): void {
    socket.send(JSON.stringify({ method }));
  }

  return { inbox, next, call, notify };
}

test("createCodexResolver() endpoint runs a real turn against the mock model", async () => {
  const model = await startMockModel({ respond: reply("hello from the mock model") });
  const box = await sandbox(model.baseUrl);
  const resolver = createCodexResolver(box.options());
  let socket: WebSocket | undefined;
  try {
    const endpoint = await resolver.resolve("ws-1");
    socket = openSocket(endpoint.url, endpoint.headers);
    const rpc = rpcClient(socket);
    assert.equal(await settle(socket), "open");

    await rpc.call(0, "initialize", {
      clientInfo: { name: "supervisor_test", title: "Supervisor test", version: "0.0.0" },
      capabilities: null,
    });
    rpc.notify("initialized");
    const cwd = join(box.dir, "workspaces", "ws-1");
    const started = await rpc.call(1, "thread/start", { cwd }) as { thread: { id: string } };
    const threadId = started.thread.id;
    await rpc.call(2, "turn/start", {
      threadId,
      input: [{ type: "text", text: "hi", text_elements: [] }],
    });
    const completed = await rpc.next((message) => message.method === "turn/completed");
    const params = completed.params as { threadId: string; turn: { status: string } };
    assert.equal(params.threadId, threadId);
    assert.equal(params.turn.status, "completed");
    const texts = rpc.inbox
      .filter((message) => message.method === "item/completed")
      .map((message) => (message.params as { item: { type: string; text?: string } }).item)
      .filter((item) => item.type === "agentMessage")
      .map((item) => item.text);
    assert.deepEqual(texts, ["hello from the mock model"]);
    assert.equal(model.requests[0]?.lastUserText, "hi");
  } finally {
    if (socket) await closeSocket(socket);
    await resolver.close();
    await box.cleanup();
    await model.close();
  }
});

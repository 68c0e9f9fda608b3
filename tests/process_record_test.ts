import { test } from "./_test.ts";
import assert from "node:assert/strict";
import { type ChildProcess, spawn } from "node:child_process";
import { existsSync } from "node:fs";
import { mkdir, mkdtemp, realpath, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import process from "node:process";
import {
  cleanUpLeftovers,
  hostIdentity,
  processInfo,
  type ProcessRecord,
  writeProcessRecord,
} from "../src/_process_record.ts";
import { makeCodexHome } from "./_codex_home.ts";
import { codexBinary, isDead, killGroup, liveGroupMembers } from "./_processes.ts";
import { waitFor } from "./_wait.ts";

// Bun's own default is 5 s per test; one of these starts codex.
const SLOW = { timeout: 30_000 };

/** A process started by a test, in a process group of its own. */
interface Started {
  readonly child: ChildProcess;
  readonly pid: number;
  readonly startTime: number;
  readonly exited: Promise<void>;
  /** SIGKILL to its group, then waits for its exit. */
  stop(): Promise<void>;
}

function start(command: string, args: string[], env?: Record<string, string>): Started {
  const child = spawn(command, args, {
    detached: true,
    stdio: ["ignore", "ignore", "pipe"],
    ...(env ? { env: { ...process.env, ...env } } : {}),
  });
  const exited = new Promise<void>((resolve) => child.once("close", () => resolve()));
  child.stderr!.resume();
  const pid = child.pid!;
  return {
    child,
    pid,
    startTime: processInfo(pid)!.startTime,
    exited,
    async stop() {
      killGroup(pid);
      await exited;
    },
  };
}

/** A broker that has exited: its pid and start time name no live process. */
async function deadBroker(): Promise<{ brokerPid: number; brokerStartTime: number }> {
  const broker = start("sleep", ["30"]);
  await broker.stop();
  return { brokerPid: broker.pid, brokerStartTime: broker.startTime };
}

async function withRunDir(fn: (runDir: string) => Promise<void>): Promise<void> {
  const dir = await realpath(await mkdtemp(join(tmpdir(), "process-record-test-")));
  try {
    const runDir = join(dir, "ws-1", "run");
    await mkdir(runDir, { recursive: true });
    await fn(runDir);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

/** Writes `<runDir>/<name>/codex.json` and a token beside it, the way the supervisor does. */
async function leftover(
  runDir: string,
  name: string,
  fields: Partial<ProcessRecord> & Pick<ProcessRecord, "pid" | "brokerPid">,
): Promise<string> {
  const dir = join(runDir, name);
  await mkdir(dir, { mode: 0o700 });
  const tokenFile = join(dir, "token");
  const here = hostIdentity();
  await writeProcessRecord(dir, {
    version: 1,
    workspaceId: "ws-1",
    pgid: fields.pid,
    startTime: null,
    bootId: here.bootId,
    hostname: here.hostname,
    pidNamespace: here.pidNamespace,
    tokenFile,
    brokerStartTime: null,
    ...fields,
  });
  await writeFile(tokenFile, "0".repeat(64), { mode: 0o600 });
  return dir;
}

/**
 * A process whose command line reads like codex's app-server with `tokenFile`, without
 * being codex: `sh -c 'sleep 30; :' sh app-server --ws-token-file FILE`.
 */
async function lookalike(tokenFile: string): Promise<Started> {
  const started = start("/bin/sh", [
    "-c",
    "sleep 30; :",
    "sh",
    "app-server",
    "--ws-token-file",
    tokenFile,
  ]);
  // A runtime may hand out the pid before the child has run exec.
  await waitFor("the lookalike to run", () => {
    return processInfo(started.pid)?.cmdline.includes("app-server") ?? false;
  });
  return started;
}

test(
  "cleanUpLeftovers() kills the codex app-server a dead broker left running, with its group, and removes its run directory",
  SLOW,
  async () => {
    await withRunDir(async (runDir) => {
      const home = await makeCodexHome("http://127.0.0.1:9/v1");
      const spawnDir = join(runDir, "codex-broker-a1b2c3");
      await mkdir(spawnDir, { mode: 0o700 });
      const tokenFile = join(spawnDir, "token");
      await writeFile(tokenFile, "1".repeat(64), { mode: 0o600 });
      const codex = start(codexBinary(), [
        "app-server",
        "--listen",
        "ws://127.0.0.1:0",
        "--ws-auth",
        "capability-token",
        "--ws-token-file",
        tokenFile,
      ], { CODEX_HOME: home.path });
      try {
        await new Promise<void>((resolve, reject) => {
          let text = "";
          codex.child.stderr!.setEncoding("utf8");
          codex.child.stderr!.on("data", (chunk: string) => {
            text += chunk;
            if (text.includes("listening on:")) resolve();
          });
          codex.exited.then(() => reject(new Error(`codex exited first:\n${text}`)));
        });
        const here = hostIdentity();
        await writeProcessRecord(spawnDir, {
          version: 1,
          workspaceId: "ws-1",
          pid: codex.pid,
          pgid: codex.pid,
          startTime: codex.startTime,
          bootId: here.bootId,
          hostname: here.hostname,
          pidNamespace: here.pidNamespace,
          tokenFile,
          brokerId: "crashed-broker",
          ...await deadBroker(),
        });

        const report = await cleanUpLeftovers([runDir]);
        assert.deepEqual(report, {
          killed: [codex.pid],
          removed: [spawnDir],
          kept: [],
          errors: [],
        });
        await codex.exited;
        assert.equal(isDead(codex.pid), true);
        await waitFor("its process group to empty", () => liveGroupMembers(codex.pid).length === 0);
        assert.equal(existsSync(spawnDir), false);
        assert.ok(existsSync(runDir), "the workspace's run directory itself stays");
      } finally {
        await codex.stop();
        await home.cleanup();
      }
    });
  },
);

test("cleanUpLeftovers() never signals a live process that only reuses a recorded pid, and removes the stale record", async () => {
  await withRunDir(async (runDir) => {
    const broker = await deadBroker();
    const sleeper = start("sleep", ["30"]);
    const other = await lookalike("/elsewhere/codex-broker-x/token");
    try {
      const stale = [
        // Another process got the pid: a different start time.
        await leftover(runDir, "codex-broker-starttime", {
          pid: sleeper.pid,
          startTime: sleeper.startTime - 1,
          ...broker,
        }),
        // The start time matches, but it is not codex's app-server.
        await leftover(runDir, "codex-broker-cmdline", {
          pid: sleeper.pid,
          startTime: sleeper.startTime,
          ...broker,
        }),
        // An app-server command line, but with another token: not the recorded codex.
        await leftover(runDir, "codex-broker-token", {
          pid: other.pid,
          startTime: other.startTime,
          ...broker,
        }),
      ];
      const report = await cleanUpLeftovers([runDir]);
      assert.deepEqual(report.killed, []);
      assert.deepEqual(report.removed.sort(), stale.sort());
      assert.deepEqual(report.errors, []);
      assert.equal(isDead(sleeper.pid), false);
      assert.equal(isDead(other.pid), false);
      for (const dir of stale) assert.equal(existsSync(dir), false);
    } finally {
      await sleeper.stop();
      await other.stop();
    }
  });
});

test("cleanUpLeftovers() leaves alone the records of another host, boot or pid namespace, of a live broker, and a directory without a record", async () => {
  await withRunDir(async (runDir) => {
    const broker = await deadBroker();
    const tokenFile = join(runDir, "shared", "token");
    // It matches every record below, so only the record's origin keeps it alive.
    const codex = await lookalike(tokenFile);
    try {
      const match = { pid: codex.pid, startTime: codex.startTime, tokenFile };
      const kept = {
        otherHost: await leftover(runDir, "codex-broker-host", {
          ...match,
          ...broker,
          hostname: `not-${hostIdentity().hostname}`,
        }),
        otherBoot: await leftover(runDir, "codex-broker-boot", {
          ...match,
          ...broker,
          bootId: "00000000-0000-0000-0000-000000000000",
        }),
        otherPidNamespace: await leftover(runDir, "codex-broker-pidns", {
          ...match,
          ...broker,
          pidNamespace: "pid:[1]",
        }),
        ownerAlive: await leftover(runDir, "codex-broker-owner", {
          ...match,
          brokerPid: process.pid,
          brokerStartTime: processInfo(process.pid)!.startTime,
        }),
        noRecord: join(runDir, "codex-broker-norecord"),
      };
      await mkdir(kept.noRecord);
      await writeFile(join(kept.noRecord, "token"), "2".repeat(64));

      const report = await cleanUpLeftovers([runDir, join(runDir, "missing")]);
      assert.deepEqual(report.killed, []);
      assert.deepEqual(report.removed, []);
      assert.deepEqual(report.errors, []);
      assert.deepEqual(
        Object.fromEntries(report.kept.map(({ path, reason }) => [reason, path])),
        kept,
      );
      assert.equal(isDead(codex.pid), false);
      for (const dir of Object.values(kept)) assert.ok(existsSync(dir), dir);

      // The same process, recorded by a broker that died: now it goes.
      const orphan = await leftover(runDir, "codex-broker-orphan", { ...match, ...broker });
      const second = await cleanUpLeftovers([runDir]);
      assert.deepEqual(second.killed, [codex.pid], JSON.stringify(second));
      assert.deepEqual(second.removed, [orphan]);
      await codex.exited;
    } finally {
      await codex.stop();
    }
  });
});

test("cleanUpLeftovers() removes the run directory of a codex that is already gone", async () => {
  await withRunDir(async (runDir) => {
    const gone = start("sleep", ["30"]);
    await gone.stop();
    const dir = await leftover(runDir, "codex-broker-gone", {
      pid: gone.pid,
      startTime: gone.startTime,
      ...await deadBroker(),
    });
    // Before the process was spawned, the record has no pid yet.
    const pending = await leftover(runDir, "codex-broker-pending", {
      pid: null,
      ...await deadBroker(),
    });
    const report = await cleanUpLeftovers([runDir]);
    assert.deepEqual(report.killed, []);
    assert.deepEqual(report.removed.sort(), [dir, pending].sort());
    assert.equal(existsSync(dir), false);
    assert.equal(existsSync(pending), false);
  });
});

test("cleanUpLeftovers() kills the process a record names by its --ws-token-sha256 digest, and no app-server with another digest", async () => {
  await withRunDir(async (runDir) => {
    const broker = await deadBroker();
    const digest = "a".repeat(64);
    const digestLookalike = async (hex: string) => {
      const started = start("/bin/sh", [
        "-c",
        "sleep 30; :",
        "sh",
        "app-server",
        "--ws-token-sha256",
        hex,
      ]);
      await waitFor("the lookalike to run", () => {
        return processInfo(started.pid)?.cmdline.includes("app-server") ?? false;
      });
      return started;
    };
    const codex = await digestLookalike(digest);
    const other = await digestLookalike("b".repeat(64));
    try {
      const here = hostIdentity();
      const record = (pid: number, startTime: number): ProcessRecord => ({
        version: 1,
        workspaceId: "ws-1",
        pid,
        pgid: pid,
        startTime,
        bootId: here.bootId,
        hostname: here.hostname,
        pidNamespace: here.pidNamespace,
        tokenSha256: digest,
        ...broker,
      });
      const named = join(runDir, "codex-broker-named");
      const mismatched = join(runDir, "codex-broker-other");
      await mkdir(named, { mode: 0o700 });
      await mkdir(mismatched, { mode: 0o700 });
      await writeProcessRecord(named, record(codex.pid, codex.startTime));
      await writeProcessRecord(mismatched, record(other.pid, other.startTime));
      const report = await cleanUpLeftovers([runDir]);
      assert.deepEqual(report.killed, [codex.pid]);
      assert.deepEqual(report.removed.sort(), [mismatched, named].sort());
      assert.deepEqual(report.errors, []);
      await codex.exited;
      assert.equal(isDead(other.pid), false);
    } finally {
      await codex.stop();
      await other.stop();
    }
  });
});

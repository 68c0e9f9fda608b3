/**
 * What a command the model runs can find of the broker, through the real codex on the
 * loopback model: a broker subprocess (src/main.ts) whose model asks codex to run `env` and
 * to read the broker's `/proc/<pid>/environ`, and, as root, one that runs codex as another
 * user (`--codex-user`). The command's output is read from the turn's `commandExecution`
 * item.
 */

import { test } from "./_test.ts";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { existsSync, readFileSync, rmSync } from "node:fs";
import {
  chmod,
  lstat,
  mkdir,
  mkdtemp,
  realpath,
  rm,
  stat,
  symlink,
  writeFile,
} from "node:fs/promises";
import { tmpdir } from "node:os";
import { dirname, join, relative } from "node:path";
import process from "node:process";
import {
  type BrokerProcess,
  childEnv,
  descendants,
  isRunning,
  records,
  spawnBroker,
} from "./_broker_process.ts";
import { codexBinary } from "./_processes.ts";
import { makeCodexHome, type TempCodexHome } from "./_codex_home.ts";
import { startBroker, USAGE } from "../src/main.ts";
import { execThenReply, type MockModel, startMockModel } from "./_mock_model.ts";

const SECRET = "isolation-test-secret-7c1e9a";
const TIMEOUT = { timeout: 60_000 };
const IS_ROOT = process.getuid?.() === 0;
const TEST_USER = "codex-broker-test";
// Proves that the command could read the broker's environment at all: a /proc read that
// failed would otherwise pass for one that found no secret.
const MARKER = "ISOLATION_TEST_MARKER=visible-to-commands";
const POLICY = {
  credentials: {
    secret: {
      sandbox: ["read-only", "workspace-write", "danger-full-access"],
      neverWithNetwork: true,
    },
  },
};

interface Fixture {
  model: MockModel;
  home: TempCodexHome;
  dir: string;
  broker: BrokerProcess;
  url: string;
  cleanup(): Promise<void>;
}

/** codex's files (binary and resources) linked, or copied, into `dir`; returns the binary. */
function reachableCodex(dir: string): string {
  const vendor = dirname(dirname(codexBinary()));
  const copy = join(dir, "codex-vendor");
  try {
    execFileSync("cp", ["-al", vendor, copy]);
  } catch {
    // Another file system: a copy, then.
    rmSync(copy, { recursive: true, force: true });
    execFileSync("cp", ["-a", vendor, copy]);
  }
  execFileSync("chmod", ["-R", "a+rX", copy]);
  return join(copy, relative(vendor, codexBinary()));
}

async function startFixture(
  args: string[],
  env: Record<string, string>,
  prepare?: (dir: string) => Promise<void>,
): Promise<Fixture> {
  const model = await startMockModel();
  const home = await makeCodexHome(model.baseUrl);
  // Its config.toml names its model catalogue by path, which codex then reads: as another
  // user with --codex-user (the copied config.toml and auth.json it gets in its own home).
  await chmod(home.path, 0o755);
  const dir = await realpath(await mkdtemp(join(tmpdir(), "isolation-test-")));
  // mkdtemp makes it 0700; another user must reach the workspaces below it.
  await chmod(dir, 0o755);
  await prepare?.(dir);
  // The codex user must reach codex's binary, and a checkout in a 0700 directory (mktemp's
  // default, as CI's fresh clone may be) keeps it out: hand it a linked copy in reach.
  const codexArgs = args.includes("--codex-user") ? ["--codex", reachableCodex(dir)] : [];
  // The commands must run outside codex's sandbox, whose pid namespace hides the broker's
  // /proc entry. A broker with a policy (issue 11 §2) refuses danger-full-access by
  // default: the operator allows it for the secret, as for a trusted caller.
  const policy = join(dir, "policy.json");
  await writeFile(policy, JSON.stringify(POLICY));
  const policyArgs = USAGE.includes("--policy ") ? ["--policy", policy] : [];
  const broker = spawnBroker([
    ...policyArgs,
    "--port",
    "0",
    "--workspaces-dir",
    join(dir, "workspaces"),
    "--codex-home",
    home.path,
    ...codexArgs,
    ...args,
  ], childEnv({ ISOLATION_TEST_MARKER: "visible-to-commands", ...env }));
  const cleanup = async () => {
    await model.close();
    broker.kill("SIGTERM");
    await broker.status;
    await home.cleanup();
    await rm(dir, { recursive: true, force: true });
  };
  try {
    const line = await broker.waitForLine((l) => l.includes('"msg":"listening"'), "listening");
    return { model, home, dir, broker, url: JSON.parse(line).url as string, cleanup };
  } catch (error) {
    await cleanup();
    throw error;
  }
}

/**
 * Runs one turn whose model has codex run `script`, and returns the command's output, split
 * into the sections the script announces with `echo "== name"`.
 */
async function runCommand(
  fx: Fixture,
  script: string,
  workspaceId = "ws-1",
): Promise<Record<string, string>> {
  fx.model.respond = execThenReply(script, "ran it");
  const seen = fx.model.requests.length;
  const response = await fetch(`${fx.url}/api/turns`, {
    method: "POST",
    headers: { "content-type": "application/json", "x-internal-secret": SECRET },
    body: JSON.stringify({
      workspaceId,
      threadParams: { approvalPolicy: "never", sandbox: "danger-full-access" },
      params: { input: [{ type: "text", text: "run it", text_elements: [] }] },
    }),
  });
  assert.equal(response.status, 200);
  const body = await response.json();
  assert.equal(body.turn?.status, "completed", JSON.stringify(body));
  const commands = (body.turn.items as Record<string, unknown>[]).filter((item) =>
    item.type === "commandExecution"
  );
  assert.ok(commands.length <= 1, JSON.stringify(body.turn.items));
  // What the model got back is the channel a secret would leave by. Under heavy load the
  // turn's items have been seen to lack the commandExecution item while the model did get
  // the command's output: read that output then.
  const toolOutputs = fx.model.requests.slice(seen).flatMap((request) => request.toolOutputs);
  assert.ok(commands.length === 1 || toolOutputs.length > 0, "the command did not run");
  const output = commands.length === 1
    ? String(commands[0]!.aggregatedOutput ?? "")
    : toolOutputs.join("\n");
  const sections: Record<string, string> = {};
  let current = "";
  for (const line of output.split("\n")) {
    const heading = /^== (\S+)$/.exec(line);
    if (heading) current = heading[1]!;
    else sections[current] = `${sections[current] ?? ""}${line}\n`;
  }
  return sections;
}

/** Runs `fn` with a 0600 file holding the secret and a newline, removed afterwards. */
async function withSecretFile(fn: (file: string) => Promise<void>): Promise<void> {
  const dir = await realpath(await mkdtemp(join(tmpdir(), "isolation-secret-")));
  try {
    const file = join(dir, "secret");
    await writeFile(file, `${SECRET}\n`, { mode: 0o600 });
    await fn(file);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

/** `env`, then the broker's initial environment from /proc, one variable a line. */
function envScript(brokerPid: number): string {
  return `echo "== env"; env; echo "== proc"; tr '\\0' '\\n' < /proc/${brokerPid}/environ`;
}

test(
  "a command the model runs finds the broker's --secret-file secret neither in its environment nor in /proc/<broker pid>/environ",
  TIMEOUT,
  async () => {
    await withSecretFile(async (secretFile) => {
      const fx = await startFixture(["--secret-file", secretFile], {});
      try {
        const out = await runCommand(fx, envScript(fx.broker.pid));
        assert.ok(out.env?.includes("CODEX_HOME="), out.env);
        assert.ok(out.proc?.includes(MARKER), `the broker's environ was not read: ${out.proc}`);
        assert.ok(!JSON.stringify(out).includes(SECRET), JSON.stringify(out));
        assert.ok(!fx.broker.lines.some((line) => line.includes(SECRET)));
        assert.equal(
          records(fx.broker.lines).find((r) => r.msg === "start")?.secretFrom,
          "file",
        );
      } finally {
        await fx.cleanup();
      }
    });
  },
);

test(
  "a command the model runs finds BROKER_SECRET neither in its environment nor, on Linux, in /proc/<broker pid>/environ",
  TIMEOUT,
  async () => {
    const fx = await startFixture([], { BROKER_SECRET: SECRET });
    try {
      const out = await runCommand(fx, envScript(fx.broker.pid));
      assert.ok(out.env?.includes("CODEX_HOME="), out.env);
      assert.ok(!out.env?.includes("BROKER_SECRET"), out.env);
      // The kernel shows the environment the broker started with, which unsetting the
      // variable does not change: the broker erased the value's bytes there itself.
      assert.ok(out.proc?.includes(MARKER), `the broker's environ was not read: ${out.proc}`);
      assert.ok(!out.proc?.includes(SECRET), out.proc);
      assert.ok(out.proc?.includes("BROKER_SECRET="), "only the value is erased");
      assert.ok(!fx.broker.lines.some((line) => line.includes("BROKER_SECRET stays readable")));
    } finally {
      await fx.cleanup();
    }
  },
);

test(
  "a command the model runs in one workspace finds no capability token of another workspace's codex on disk",
  TIMEOUT,
  async () => {
    const fx = await startFixture(["--secret", SECRET], {});
    try {
      const workspaces = join(fx.dir, "workspaces");
      await runCommand(fx, "true", "ws-b");
      // Every file in every run directory but the process records (which name a process,
      // and the token's digest that its command line shows anyway).
      const out = await runCommand(
        fx,
        `echo "== ls"; ls ${workspaces}/ws-b/run/codex-broker-*/; echo "== files"; ` +
          `for f in ${workspaces}/*/run/codex-broker-*/*; do ` +
          `case "$f" in *codex.json) ;; *) echo "$f"; cat "$f" 2>&1; echo ;; esac; done`,
        "ws-a",
      );
      // Same user, so the directory can be read; it holds nothing that opens ws-b's codex.
      assert.match(out.ls ?? "", /codex\.json/);
      assert.doesNotMatch(out.files ?? "", /[0-9a-f]{64}/, out.files);
    } finally {
      await fx.cleanup();
    }
  },
);

/** The real and effective uid of a process, from /proc. */
function uidOf(pid: number): [number, number] {
  const match = /^Uid:\s+(\d+)\s+(\d+)/m.exec(readFileSync(`/proc/${pid}/status`, "utf8"));
  assert.ok(match, `no Uid line for ${pid}`);
  return [Number(match[1]), Number(match[2])];
}

/** Creates the test's system user if it is missing; returns its uid. */
function ensureTestUser(): number {
  try {
    return Number(execFileSync("id", ["-u", TEST_USER], { encoding: "utf8" }).trim());
  } catch {
    execFileSync("useradd", ["--system", "--no-create-home", TEST_USER], { stdio: "ignore" });
    return Number(execFileSync("id", ["-u", TEST_USER], { encoding: "utf8" }).trim());
  }
}

test(
  "with --codex-user, codex and the commands it runs are that user, which cannot read the broker's secret file or its /proc environ" +
    (IS_ROOT ? "" : " (skipped: --codex-user needs a broker running as root)"),
  { ...TIMEOUT, skip: !IS_ROOT },
  async () => {
    const uid = ensureTestUser();
    await withSecretFile(async (secretFile) => {
      // Reachable, so that only the file's own mode keeps the user out.
      await chmod(dirname(secretFile), 0o755);
      const fx = await startFixture(
        ["--secret-file", secretFile, "--codex-user", TEST_USER],
        { BROKER_SECRET: "ignored-in-favour-of-the-file" },
      );
      try {
        const out = await runCommand(
          fx,
          `echo "== id"; id -u; echo "== file"; cat ${secretFile} 2>&1; ` +
            `echo "== proc"; cat /proc/${fx.broker.pid}/environ 2>&1; echo "== env"; env`,
        );
        assert.equal(out.id?.trim(), String(uid));
        assert.match(out.file ?? "", /Permission denied/);
        assert.match(out.proc ?? "", /Permission denied/);
        assert.ok(out.env?.includes("CODEX_HOME="), out.env);
        assert.ok(!JSON.stringify(out).includes(SECRET), JSON.stringify(out));
        assert.ok(!JSON.stringify(out).includes("ignored-in-favour-of-the-file"));

        const codex = records(fx.broker.lines).find((r) => r.msg === "dial")?.pid as number;
        assert.ok(isRunning(codex));
        assert.deepEqual(uidOf(codex), [uid, uid]);
        // Its watchdog (and whatever else it started) too.
        for (const pid of descendants(codex)) {
          if (isRunning(pid)) assert.deepEqual(uidOf(pid), [uid, uid], `pid ${pid}`);
        }
        const workspace = join(fx.dir, "workspaces", "ws-1");
        for (const [name, owner] of [["work", uid], ["codex-home", uid], ["run", 0]] as const) {
          const stats = await stat(join(workspace, name));
          assert.equal(stats.uid, owner, name);
          assert.equal(stats.mode & 0o777, 0o700, name);
        }
        assert.equal((await stat(join(workspace, "codex-home", "config.toml"))).uid, uid);
      } finally {
        await fx.cleanup();
      }
      assert.equal(existsSync(fx.dir), false);
    });
  },
);

test(
  "with --codex-user, handing a workspace's directories to the user never follows a link out of them" +
    (IS_ROOT ? "" : " (skipped: --codex-user needs a broker running as root)"),
  { ...TIMEOUT, skip: !IS_ROOT },
  async () => {
    const uid = ensureTestUser();
    let victim = "";
    const fx = await startFixture(
      ["--secret", SECRET, "--codex-user", TEST_USER],
      {},
      async (dir) => {
        // A workspace a broker without --codex-user ran before: root's, with links in it.
        victim = join(dir, "victim");
        await writeFile(victim, "root's own file", { mode: 0o600 });
        const workspace = join(dir, "workspaces", "ws-1");
        for (const name of ["work", "codex-home"]) {
          await mkdir(join(workspace, name, "sub"), { recursive: true });
          await symlink(victim, join(workspace, name, "sub", "link"));
        }
      },
    );
    try {
      const out = await runCommand(fx, `echo "== id"; id -u`);
      assert.equal(out.id?.trim(), String(uid));
      assert.equal((await stat(victim)).uid, 0);
      const workspace = join(fx.dir, "workspaces", "ws-1");
      // What the workspace held is the user's now: the links themselves included.
      for (const name of ["work", "codex-home"]) {
        assert.equal((await lstat(join(workspace, name, "sub", "link"))).uid, uid);
        assert.equal((await lstat(join(workspace, name, "sub"))).uid, uid);
      }
    } finally {
      await fx.cleanup();
    }
  },
);

test(
  "startBroker() with a codexUser refuses a workspaces dir that user cannot reach, naming both" +
    (IS_ROOT ? "" : " (skipped: a codexUser needs a broker running as root)"),
  { ...TIMEOUT, skip: !IS_ROOT },
  async () => {
    const uid = ensureTestUser();
    const gid = Number(execFileSync("id", ["-g", TEST_USER], { encoding: "utf8" }).trim());
    // mkdtemp's 0700 keeps every other user out.
    const dir = await realpath(await mkdtemp(join(tmpdir(), "isolation-closed-")));
    try {
      await assert.rejects(
        startBroker({
          secret: SECRET,
          port: 0,
          workspacesDir: join(dir, "workspaces"),
          codexUser: { name: TEST_USER, uid, gid },
          checkCredentials: false,
        }),
        (error: unknown) =>
          error instanceof Error &&
          error.message.startsWith(
            `Cannot start broker: the codex user ${TEST_USER} cannot reach the workspaces dir ` +
              `${join(dir, "workspaces")}: `,
          ),
      );
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  },
);

/**
 * Deployment tests: the broker as operators run it. `npm start` under a process manager
 * that sends SIGTERM to the top process, the single binary of `npm run build` started from a
 * directory outside the repository, and `src/main.ts` finding codex from such a directory.
 * The npm and binary tests start the same programs whatever the test's runtime, so each runs
 * under one runner only (named in the test), and is skipped under the others.
 */

import { test } from "./_test.ts";
import { within } from "./_wait.ts";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { existsSync, readFileSync } from "node:fs";
import { mkdtemp, realpath, rm, symlink } from "node:fs/promises";
import { tmpdir } from "node:os";
import { basename, delimiter, join } from "node:path";
import process from "node:process";
import {
  type BrokerProcess,
  childEnv,
  commandLine,
  descendants,
  isRunning,
  records,
  spawnBroker,
  type SpawnBrokerOptions,
  type Status,
} from "./_broker_process.ts";
import { makeCodexHome } from "./_codex_home.ts";
import { type MockModel, reply, startMockModel } from "./_mock_model.ts";
import { codexBinary, ROOT } from "./_processes.ts";
import { pretenuringFlag } from "../src/_v8_tuning.ts";

const SECRET = "deploy-test-secret-5d1e";
// Bun's own default is 5 s per test; these start a broker and codex, one also builds.
const TIMEOUT = { timeout: 60_000 };
const RUNNER = "Deno" in globalThis ? "deno" : "Bun" in globalThis ? "bun" : "node";
const BIN = join(ROOT, "node_modules", ".bin");

/** PATH without any directory that holds a `codex`: only the lookup under test may find it. */
function pathWithoutCodex(): string {
  return (process.env.PATH ?? "").split(delimiter)
    .filter((dir) => dir !== "" && !existsSync(join(dir, "codex"))).join(delimiter);
}

interface Deployment {
  model: MockModel;
  dir: string;
  broker: BrokerProcess;
  url: string;
  /** Stops whatever is left (by pid), then removes the files. */
  cleanup(): Promise<void>;
}

/**
 * A mock model, a codex home for it, and a broker started with `options` in a temp dir
 * outside the repository (its cwd unless `options.cwd` says otherwise).
 */
async function deploy(
  options: SpawnBrokerOptions & { env?: Record<string, string>; dir?: string } = {},
): Promise<Deployment> {
  const model = await startMockModel({ respond: reply("hello from the mock") });
  const home = await makeCodexHome(model.baseUrl);
  const dir = options.dir ?? await realpath(await mkdtemp(join(tmpdir(), "deploy-test-")));
  const { env, dir: _dir, ...spawnOptions } = options;
  const broker = spawnBroker(
    [
      "--port",
      "0",
      "--secret",
      SECRET,
      "--workspaces-dir",
      join(dir, "ws"),
      "--codex-home",
      home.path,
    ],
    childEnv(env),
    { cwd: dir, ...spawnOptions },
  );
  const isOurs = (pid: number) => commandLine(pid).includes(dir) || /codex/.test(commandLine(pid));
  const seen = new Set<number>();
  const watch = setInterval(() => {
    for (const pid of descendants(broker.pid)) seen.add(pid);
  }, 50);
  const cleanup = async () => {
    clearInterval(watch);
    await model.close();
    broker.kill("SIGTERM");
    // The pipes stay open while a broker the top process left behind (the bug under test)
    // holds them: stop every process of ours first (SIGTERM, then SIGKILL), then wait.
    const exited = await within(broker.status, 15_000, "the exit").then(() => true, () => false);
    const left = () => [...seen].filter((pid) => isRunning(pid) && isOurs(pid));
    for (const pid of left()) process.kill(pid, "SIGTERM");
    for (let i = 0; i < 100 && left().length > 0; i++) {
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
    for (const pid of left()) process.kill(pid, "SIGKILL");
    if (!exited) broker.kill("SIGKILL");
    await broker.status;
    await home.cleanup();
    await rm(dir, { recursive: true, force: true });
  };
  try {
    const line = await broker.waitForLine((l) => l.includes('"msg":"listening"'), "listening");
    return { model, dir, broker, url: JSON.parse(line).url as string, cleanup };
  } catch (error) {
    await cleanup();
    throw error;
  }
}

/** One turn through the broker; returns the agent's text and the pid of the codex it ran. */
async function runTurn(deployment: Deployment): Promise<{ text: string; codex: number }> {
  const response = await fetch(`${deployment.url}/api/turns`, {
    method: "POST",
    headers: { "content-type": "application/json", "x-internal-secret": SECRET },
    body: JSON.stringify({
      workspaceId: "ws-1",
      params: { input: [{ type: "text", text: "hello", text_elements: [] }] },
    }),
  });
  const body = await response.json();
  assert.equal(response.status, 200, JSON.stringify(body));
  assert.equal(body.turn?.status, "completed", JSON.stringify(body));
  const agent = body.turn.items.find((item: { type: string }) => item.type === "agentMessage");
  const dial = records(deployment.broker.lines).find((r) => r.msg === "dial");
  assert.ok(dial, deployment.broker.lines.join("\n"));
  return { text: agent?.text, codex: dial.pid as number };
}

/** The codex processes below `root` (codex's own login-shell helpers end by themselves). */
function codexBelow(root: number): number[] {
  return descendants(root).filter((pid) =>
    basename(commandLine(pid).split(" ")[0] ?? "") === "codex"
  );
}

test(
  `\`npm start\` runs the broker under Deno with V8's allocation-site pretenuring off, and SIGTERM to it stops the broker gracefully: npm exits 0 and no broker or codex is left (Node runner only: npm is the same program under every runtime)`,
  { ...TIMEOUT, skip: RUNNER !== "node" },
  async () => {
    const deployment = await deploy({ cwd: ROOT, command: ["npm", "start", "--"] });
    try {
      const { text, codex } = await runTurn(deployment);
      assert.equal(text, "hello from the mock");
      const below = descendants(deployment.broker.pid);
      const brokers = below.filter((pid) =>
        basename(commandLine(pid).split(" ")[0] ?? "") === "deno" &&
        commandLine(pid).includes("src/main.ts")
      );
      assert.equal(brokers.length, 1, below.map((pid) => commandLine(pid)).join("\n"));
      // Deno's V8 takes flags only on its command line (the broker's --v8-pretenuring is
      // Node's); under load pretenuring cost the broker about 8% of its CPU per turn.
      assert.ok(
        commandLine(brokers[0]!).includes(` --v8-flags=${pretenuringFlag("off")} `),
        commandLine(brokers[0]!),
      );
      const codexes = codexBelow(deployment.broker.pid);
      assert.ok(codexes.includes(codex));
      deployment.broker.kill("SIGTERM");
      const status = await within(
        deployment.broker.status,
        15_000,
        "npm's exit and the end of its output (which a process left behind keeps open)",
      );
      assert.deepEqual(status, { code: 0, signal: null } satisfies Status);
      const left = [...below, ...codexes].filter((pid) =>
        isRunning(pid) && (brokers.includes(pid) || codexes.includes(pid))
      );
      assert.deepEqual(left, [], left.map((pid) => `${pid}: ${commandLine(pid)}`).join("\n"));
      const log = records(deployment.broker.lines).map((r) => r.msg);
      assert.deepEqual(log.slice(-2), ["shutdown", "stopped"]);
    } finally {
      await deployment.cleanup();
    }
  },
);

test(
  "src/main.ts started from a directory outside the repository finds codex in the package's node_modules",
  TIMEOUT,
  async () => {
    const deployment = await deploy({ env: { PATH: pathWithoutCodex() } });
    try {
      const { text, codex } = await runTurn(deployment);
      assert.equal(text, "hello from the mock");
      assert.equal(commandLine(codex).split(" ")[0], codexBinary());
    } finally {
      await deployment.cleanup();
    }
  },
);

/** Runs `npm run build`'s command with the output in `outfile`; resolves with its output. */
function build(outfile: string): Promise<string> {
  const scripts = JSON.parse(readFileSync(join(ROOT, "package.json"), "utf8")).scripts;
  const script = String(scripts.build);
  assert.ok(script.includes("dist/codex-broker"), script);
  const command = script.replace("dist/codex-broker", JSON.stringify(outfile));
  return new Promise((resolve, reject) => {
    const child = spawn("sh", ["-c", command], {
      cwd: ROOT,
      env: { ...childEnv(), PATH: `${BIN}${delimiter}${process.env.PATH ?? ""}` },
      stdio: ["ignore", "pipe", "pipe"],
    });
    let output = "";
    child.stdout!.on("data", (data) => output += data);
    child.stderr!.on("data", (data) => output += data);
    child.once("close", (code) => {
      if (code === 0) resolve(output);
      else reject(new Error(`${command} exited ${code}:\n${output}`));
    });
  });
}

test(
  `the binary of \`npm run build\`, run outside the repository, serves a turn with the codex beside it and stops on SIGTERM (Node runner only: the binary is the same under every runtime)`,
  { ...TIMEOUT, skip: RUNNER !== "node" },
  async () => {
    const dir = await realpath(await mkdtemp(join(tmpdir(), "deploy-test-")));
    const binary = join(dir, "codex-broker");
    try {
      await build(binary);
      await symlink(codexBinary(), join(dir, "codex"));
    } catch (error) {
      await rm(dir, { recursive: true, force: true });
      throw error;
    }
    const deployment = await deploy({ dir, command: [binary], env: { PATH: pathWithoutCodex() } });
    try {
      const { text, codex } = await runTurn(deployment);
      assert.equal(text, "hello from the mock");
      assert.equal(commandLine(codex).split(" ")[0], join(dir, "codex"));
      deployment.broker.kill("SIGTERM");
      const status = await within(deployment.broker.status, 15_000, "the binary's exit");
      assert.deepEqual(status, { code: 0, signal: null } satisfies Status);
      assert.equal(isRunning(codex), false);
    } finally {
      await deployment.cleanup();
    }
  },
);

test(
  "SIGTERM to `npm run demo` stops its broker gracefully: npm exits 0 and no broker or codex is left (Node runner only: npm is the same program under every runtime)",
  { ...TIMEOUT, skip: RUNNER !== "node" },
  async () => {
    const npm = spawn("npm", ["run", "demo"], {
      cwd: ROOT,
      env: childEnv({ NO_COLOR: "1" }),
      stdio: ["ignore", "pipe", "pipe"],
    });
    let output = "";
    const seen = new Set<number>();
    const watch = setInterval(() => {
      for (const pid of descendants(npm.pid!)) seen.add(pid);
    }, 20);
    const closed = new Promise<Status>((resolve) =>
      npm.once("close", (code, signal) => resolve({ code, signal }))
    );
    const listening = new Promise<void>((resolve) => {
      const onData = (data: Buffer) => {
        output += data;
        if (/broker: +http:\S+ \(pid \d+\)/.test(output)) resolve();
      };
      npm.stdout!.on("data", onData);
      npm.stderr!.on("data", onData);
    });
    const ours = () =>
      [...seen].filter((pid) =>
        isRunning(pid) &&
        ["deno", "codex"].includes(basename(commandLine(pid).split(" ")[0] ?? ""))
      );
    try {
      await within(Promise.race([listening, closed]), 30_000, "the demo's broker");
      // The first turn is on its way: its codex starts while the broker stops.
      npm.kill("SIGTERM");
      const status = await within(
        closed,
        20_000,
        "npm's exit and the end of its output (which a process left behind keeps open)",
      );
      clearInterval(watch);
      assert.deepEqual(status, { code: 0, signal: null } satisfies Status, output);
      assert.match(output, /Stopped by SIGTERM: the broker exited with code 0/);
      const left = ours();
      assert.deepEqual(left, [], left.map((pid) => `${pid}: ${commandLine(pid)}`).join("\n"));
    } finally {
      clearInterval(watch);
      for (const pid of ours()) process.kill(pid, "SIGKILL");
      npm.kill("SIGKILL");
      await closed;
    }
  },
);

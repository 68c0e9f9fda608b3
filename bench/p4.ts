/**
 * P4 (issue 10, section 5): REST throughput of the broker with an instantly answering codex,
 * at concurrency 64, a new thread per request, against the lower of two baselines from the
 * same run on the same runtime. Per runtime (Deno, Bun, Node 22), one after the other:
 *
 * - **hello srvx**: `bench/hello_server.ts` (a hello-world srvx server, 401 JSON without
 *   reading the body) on that runtime, loaded by `wrk`;
 * - **minimal ws client**: `bench/p4_minimal_client.ts` on that runtime, the same JSON-RPC
 *   exchange the broker does per request (`thread/start`, `turn/start`, wait for
 *   `turn/completed`; `initialize` once) straight to the instant fake codex over one
 *   WebSocket, 64 requests in flight;
 * - **broker**: `src/main.ts` on that runtime with `--codex` a wrapper that runs
 *   `bench/_instant_codex.ts` (Node 22): the stand-in prints codex's listening line, answers
 *   `/readyz` and completes every turn at once. Loaded by the same `wrk` command as hello
 *   srvx: `POST /api/turns` for one workspace with no `threadId` (a new thread each time).
 *   After the run the broker's `/metrics` must count every answered request as a
 *   `completed` turn, so an error answer cannot pass for throughput. The broker runs with
 *   `--max-workspace-turns` set to the concurrency, so that like the minimal client it has
 *   every request in flight to codex (with its default of 16 it holds the other 48 in its
 *   own line, and codex gets smaller batches); then also with `--ws-client web` (the
 *   runtime's own WebSocket to codex, as the minimal client uses), on Deno with
 *   `--deno-server native` and with V8's pretenuring on (`deno run` without the
 *   `--v8-flags=--no-allocation-site-pretenuring` of `npm start`), on Node with
 *   `--v8-pretenuring on` (V8's default, which the command turns off), and last with its
 *   defaults. On Deno every other row runs with the runtime flags of `npm start`.
 *
 * Hello srvx and the minimal client stay up for the runtime, each warmed up alone for
 * `BENCH_P4_WARMUP_SECONDS` (5); one broker at a time runs beside them, as one broker runs
 * on a machine (two or more brokers taking turns ran slower than one alone: Deno's at
 * 164–193 µs per turn against 122). Each broker is warmed up alone as long: it has far more
 * code for the JIT to compile than hello srvx or the minimal client, and under this load its
 * CPU per turn only settles after about 5 s (on Node: 201, 154, 128, 126 µs in its first four
 * 2-second windows). Then the three take turns in `BENCH_P4_ROUNDS` (3) rounds of one
 * `BENCH_P4_SECONDS` (2) window each, the order rotating each round. Each is idle between
 * its windows, but loaded for `BENCH_P4_REWARM_SECONDS` (1), unmeasured, right before each:
 * a server idle for seconds met the load cold. The first configuration runs so with
 * `BENCH_P4_GENERATIONS` (2) brokers one after the other, the others with one.
 *
 * Why so: this machine's speed drifts within seconds (the minimal client alone gave 8,615 to
 * 16,456 turns/s in 3-s windows back to back), so each round's ratio compares windows taken
 * together; and processes differ (two brokers of the same code, taking turns, differed by up
 * to 6% in CPU per turn), so the first row does not rest on one process. A row's ratio is
 * the median of its rounds' ratios, its figures those of the windows with the median rate.
 *
 * The load generator is Debian's `wrk` (`apt-get install wrk`): `wrk -t1 -c64` on keep-alive
 * connections, one run per window. It prints req/s (turns/s) per server, the server's CPU
 * per request, and broker / min(hello, minimal) against the goal {@linkcode P4_GOAL}. The
 * machine's load average goes beside it: wrk, the server and the fake codex share the cores.
 *
 * `BENCH_P4_PROFILE=DIR` runs the broker under the runtime's CPU profiler (`--cpu-prof`
 * for Node and Deno; Bun's is `--cpu-prof` too where it has one), writing into DIR.
 *
 * ```sh
 * npm run bench -- p4
 * BENCH_P4_RUNTIMES=node BENCH_P4_SECONDS=10 npm run bench -- p4
 * ```
 *
 * Environment: `BENCH_P4_SECONDS` (2, one window), `BENCH_P4_ROUNDS` (3, per broker),
 * `BENCH_P4_GENERATIONS` (2), `BENCH_P4_REWARM_SECONDS` (1, 0 for none),
 * `BENCH_P4_WARMUP_SECONDS` (5, for every server alike), `BENCH_P4_CONCURRENCY` (64),
 * `BENCH_P4_RUNTIMES` (`deno,bun,node`), `BENCH_P4_PROFILE`, `BENCH_P4_BROKER_ONLY=1` (the
 * brokers alone: for comparing two versions of `src/` under the same load, by CPU per
 * request), and `BENCH_P4_FIRST_ONLY=1` (the broker in its first configuration only).
 *
 * @module
 */

import { chmod, mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { P4MinimalResult } from "./p4_minimal_client.ts";
import {
  BENCH_RUNTIMES,
  type BenchRuntime,
  BIN,
  cpuUs,
  loadText,
  ROOT,
  type RunningServer,
  runtimeCommand,
  serviceFlags,
  startServer,
} from "./_procs.ts";
import { envInt, RESULT_MARKER, table } from "./_stats.ts";
import { commandLine, descendants } from "../tests/_broker_process.ts";
import { abortable } from "../src/_deadline.ts";

/** The goal: the broker keeps at least this share of the lower baseline. */
export const P4_GOAL = 0.5;

const SECRET = "p4-bench-secret-0123456789";
const WORKSPACE = "p4";

/** What to run. */
export interface P4Config {
  /** One measured window. */
  seconds: number;
  /** The warm-up of each server, alone, before the rounds. */
  warmupSeconds: number;
  /** Unmeasured load right before each measured window. */
  rewarmSeconds: number;
  concurrency: number;
  runtimes: BenchRuntime[];
  /** Directory for the broker's CPU profiles, or undefined. */
  profileDir: string | undefined;
  /** Run the broker alone, without the baselines (for before/after comparisons). */
  brokerOnly: boolean;
  /** Run the broker in its first configuration only, not the others. */
  firstOnly: boolean;
  /** Rounds per broker process: a window of each server per round. */
  rounds: number;
  /** Broker processes for the first configuration, one after the other. */
  generations: number;
}

/** One server's or client's figures. */
export interface P4Figure {
  /** Requests (turns) per second. */
  perSec: number;
  /** Requests (turns) in the measured run. */
  count: number;
  /** CPU of the measured process per request, µs (the server; the minimal client). */
  cpuUsPerRequest: number;
  /** Anything that went wrong: non-2xx answers, socket errors, missing turns. */
  problems: string[];
}

/** One runtime's figures. */
export interface P4Run {
  runtime: BenchRuntime;
  /** How the row is named, when not by its runtime alone. */
  label?: string;
  hello: P4Figure | string;
  minimal: P4Figure | string;
  broker: P4Figure | string;
  /** The instant codex's CPU per broker turn, µs. */
  codexCpuUsPerTurn: number;
  /** Each round's broker / min(hello, minimal). */
  ratios: number[];
  load: string;
}

/**
 * Reads the configuration from the environment.
 *
 * @returns The configuration.
 * @throws {TypeError} If a variable is not valid.
 */
export function p4Config(): P4Config {
  const seconds = envInt("BENCH_P4_SECONDS", 2, 1);
  const raw = Deno.env.get("BENCH_P4_RUNTIMES") || BENCH_RUNTIMES.join(",");
  const names = raw.split(",").map((r) => r.trim()).filter((r) => r !== "");
  const runtimes = names.filter((r): r is BenchRuntime =>
    (BENCH_RUNTIMES as readonly string[]).includes(r)
  );
  if (runtimes.length !== names.length || runtimes.length === 0) {
    throw new TypeError(
      `BENCH_P4_RUNTIMES must list some of ${BENCH_RUNTIMES.join(",")}, got "${raw}"`,
    );
  }
  return {
    seconds,
    warmupSeconds: envInt("BENCH_P4_WARMUP_SECONDS", 5, 1),
    rewarmSeconds: envInt("BENCH_P4_REWARM_SECONDS", 1, 0),
    concurrency: envInt("BENCH_P4_CONCURRENCY", 64, 1),
    runtimes,
    profileDir: Deno.env.get("BENCH_P4_PROFILE") || undefined,
    brokerOnly: Deno.env.get("BENCH_P4_BROKER_ONLY") === "1",
    firstOnly: Deno.env.get("BENCH_P4_FIRST_ONLY") === "1",
    rounds: envInt("BENCH_P4_ROUNDS", 3, 1),
    generations: envInt("BENCH_P4_GENERATIONS", 2, 1),
  };
}

interface WrkResult {
  requests: number;
  perSec: number;
  non2xx: number;
  socketErrors: string | null;
}

async function wrk(
  url: string,
  script: string,
  concurrency: number,
  seconds: number,
): Promise<WrkResult> {
  const output = await new Deno.Command("wrk", {
    args: ["-t1", `-c${concurrency}`, `-d${seconds}s`, "--timeout", "10s", "-s", script, url],
    stdout: "piped",
    stderr: "piped",
    signal: AbortSignal.timeout((seconds + 30) * 1000),
  }).output();
  const text = new TextDecoder().decode(output.stdout);
  if (!output.success) {
    throw new Error(`wrk failed: ${new TextDecoder().decode(output.stderr)}${text}`);
  }
  const requests = Number(/(\d+) requests in/.exec(text)?.[1] ?? NaN);
  const perSec = Number(/Requests\/sec:\s+([\d.]+)/.exec(text)?.[1] ?? NaN);
  const non2xx = Number(/Non-2xx or 3xx responses:\s+(\d+)/.exec(text)?.[1] ?? 0);
  const socketErrors = /Socket errors:.*/.exec(text)?.[0] ?? null;
  return { requests, perSec, non2xx, socketErrors };
}

function message(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

/**
 * One of the three measured at once: it stays up, warm and idle between its windows, so
 * that the three can take turns within seconds of each other.
 */
interface Contender {
  /** Loads it for `seconds` and returns its figures for that window. */
  window(seconds: number): Promise<P4Figure>;
  stop(): Promise<void>;
}

/** A wrk window against a server, with the server's CPU per request over it. */
async function wrkWindow(
  server: RunningServer,
  script: string,
  config: P4Config,
  seconds: number,
): Promise<{ result: WrkResult; cpuUsPerRequest: number }> {
  const before = cpuUs(server.pid);
  const result = await wrk(`${server.url}/api/turns`, script, config.concurrency, seconds);
  return { result, cpuUsPerRequest: (cpuUs(server.pid) - before) / result.requests };
}

async function startHello(
  runtime: BenchRuntime,
  script: string,
  config: P4Config,
): Promise<Contender> {
  const [binary, args] = runtimeCommand(runtime, "bench/hello_server.ts");
  const server = await startServer(binary, args);
  return {
    async window(seconds) {
      const { result, cpuUsPerRequest } = await wrkWindow(server, script, config, seconds);
      const problems: string[] = [];
      // Every answer is the 401 it is meant to give: non-2xx is all of them.
      if (result.non2xx !== result.requests) {
        problems.push(`${result.requests - result.non2xx} answers other than 401`);
      }
      if (result.socketErrors) problems.push(result.socketErrors);
      return { perSec: result.perSec, count: result.requests, cpuUsPerRequest, problems };
    },
    stop: async () => void await server.stop(),
  };
}

async function startMinimal(
  runtime: BenchRuntime,
  dir: string,
  config: P4Config,
): Promise<Contender> {
  const token = "p4-minimal-token";
  const tokenFile = join(dir, "minimal-token");
  await writeFile(tokenFile, token);
  const codex = await startServer(`${BIN}/node`, [
    "bench/_instant_codex.ts",
    "app-server",
    "--listen",
    "ws://127.0.0.1:0",
    "--ws-token-file",
    tokenFile,
  ]);
  const [binary, args] = runtimeCommand(runtime, "bench/p4_minimal_client.ts", [
    "--url",
    codex.url,
    "--token",
    token,
    "--concurrency",
    String(config.concurrency),
  ]);
  const child = new Deno.Command(binary, {
    args,
    cwd: ROOT,
    stdin: "piped",
    stdout: "piped",
    stderr: "inherit",
  }).spawn();
  const input = child.stdin.getWriter();
  const lines = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
  let buffered = "";
  async function nextResult(): Promise<P4MinimalResult> {
    for (;;) {
      const end = buffered.indexOf("\n");
      if (end !== -1) {
        const line = buffered.slice(0, end);
        buffered = buffered.slice(end + 1);
        if (line.startsWith(RESULT_MARKER)) {
          return JSON.parse(line.slice(RESULT_MARKER.length)) as P4MinimalResult;
        }
        continue;
      }
      const { value, done } = await lines.read();
      if (done) throw new Error(`minimal client exited (${(await child.status).code})`);
      buffered += value;
    }
  }
  return {
    async window(seconds) {
      await input.write(new TextEncoder().encode(`run ${seconds * 1000}\n`));
      const result = await abortable(nextResult(), AbortSignal.timeout((seconds + 60) * 1000));
      return {
        perSec: result.turns / (result.ms / 1000),
        count: result.turns,
        cpuUsPerRequest: result.cpuUs / result.turns,
        problems: [],
      };
    },
    async stop() {
      await input.close().catch(() => {});
      const timer = setTimeout(() => child.kill("SIGKILL"), 10_000);
      try {
        await child.status;
      } finally {
        clearTimeout(timer);
        await lines.cancel().catch(() => {});
        await codex.stop();
      }
    },
  };
}

/** A sample of the broker's `/metrics`, by its series (name and labels), or `missing`. */
async function metric(url: string, series: string, missing = NaN): Promise<number> {
  const text = await (await fetch(`${url}/metrics`)).text();
  const line = text.split("\n").find((l) => l.startsWith(`${series} `));
  return line === undefined ? missing : Number(line.slice(series.length + 1));
}

function completedTurns(url: string): Promise<number> {
  return metric(url, 'codex_broker_turns_total{outcome="completed"}', 0);
}

function profileFlags(runtime: BenchRuntime, dir: string): string[] {
  const name = `broker-${runtime}-${Date.now()}.cpuprofile`;
  switch (runtime) {
    case "node":
      return ["--cpu-prof", `--cpu-prof-dir=${dir}`, `--cpu-prof-name=${name}`];
    case "deno":
      return ["--cpu-prof", `--cpu-prof-dir=${dir}`, `--cpu-prof-name=${name}`, "--cpu-prof-md"];
    case "bun":
      return ["--cpu-prof", `--cpu-prof-dir=${dir}`, `--cpu-prof-name=${name}`];
  }
}

/** One row's broker: its label (none for the first row), its arguments, the runtime's flags. */
interface BrokerVariant {
  label: string | undefined;
  args: string[];
  runtimeFlags: string[];
}

/** The broker, with the instant codex's CPU per turn beside each window's figures. */
interface BrokerContender extends Contender {
  window(seconds: number): Promise<BrokerFigure>;
}

async function startBrokerContender(
  runtime: BenchRuntime,
  dir: string,
  script: string,
  config: P4Config,
  variant: BrokerVariant,
): Promise<BrokerContender> {
  // The broker spawns `--codex` itself: a wrapper that execs the stand-in on Node 22.
  const wrapper = join(dir, "codex");
  await writeFile(
    wrapper,
    `#!/bin/sh\nexec ${JSON.stringify(`${BIN}/node`)} ${
      JSON.stringify(`${ROOT}/bench/_instant_codex.ts`)
    } "$@"\n`,
  );
  await chmod(wrapper, 0o755);
  const workspaces = await mkdtemp(join(dir, "workspaces-"));
  const flags = [
    ...variant.runtimeFlags,
    ...(config.profileDir ? profileFlags(runtime, config.profileDir) : []),
  ];
  const [binary, args] = runtimeCommand(runtime, "src/main.ts", [
    "--port",
    "0",
    "--secret",
    SECRET,
    "--workspaces-dir",
    workspaces,
    "--codex",
    wrapper,
    ...variant.args,
  ], flags);
  const server = await startServer(binary, args, {
    // An empty codex home to copy from: the operator's own is none of the bench's business.
    env: { CODEX_HOME: await mkdtemp(join(dir, "codex-home-")) },
  });
  let codexPid: number | undefined;
  try {
    // The first turn spawns the workspace's codex; it is not part of the throughput.
    const first = await fetch(`${server.url}/api/turns`, {
      method: "POST",
      headers: { "content-type": "application/json", "x-internal-secret": SECRET },
      body: turnBody(),
    });
    const answer = await first.json() as { turn?: { status?: string } };
    if (answer.turn?.status !== "completed") {
      throw new Error(`the first turn did not complete: ${JSON.stringify(answer)}`);
    }
    codexPid = codexPidOf(server.pid);
  } catch (error) {
    await server.stop(15_000);
    throw error;
  }
  return {
    async window(seconds) {
      const completedBefore = await completedTurns(server.url);
      const codexBefore = codexPid === undefined ? NaN : cpuUs(codexPid);
      const { result, cpuUsPerRequest } = await wrkWindow(server, script, config, seconds);
      const codexCpuUsPerTurn = codexPid === undefined
        ? NaN
        : (cpuUs(codexPid) - codexBefore) / result.requests;
      const completed = await completedTurns(server.url) - completedBefore;
      const problems: string[] = [];
      if (result.non2xx > 0) problems.push(`${result.non2xx} non-2xx answers`);
      if (result.socketErrors) problems.push(result.socketErrors);
      // wrk counts answers; requests cut off at its end are turns without an answer.
      if (completed < result.requests) {
        problems.push(`${result.requests - completed} answers without a completed turn`);
      }
      // One workspace, one connection: a redial would be a fault, and its cost in the figures.
      const dials = await metric(server.url, "codex_broker_dials_total");
      if (dials !== 1) problems.push(`${dials} dials to codex, not 1`);
      return {
        perSec: result.perSec,
        count: result.requests,
        cpuUsPerRequest,
        problems,
        codexCpuUsPerTurn,
      };
    },
    stop: async () => void await server.stop(15_000),
  };
}

/**
 * The instant codex serving the broker's connection, at whatever depth (a watchdog puts it
 * lower). Only the one that listens: the broker also runs codex briefly to check its
 * credentials, and such a process would be gone by the time its CPU is read.
 */
function codexPidOf(pid: number): number | undefined {
  return descendants(pid).find((child) => {
    const command = commandLine(child);
    return command.includes("_instant_codex") && command.includes("--listen");
  });
}

function turnBody(): string {
  return JSON.stringify({
    workspaceId: WORKSPACE,
    params: { input: [{ type: "text", text: "hi", text_elements: [] }] },
  });
}

/**
 * Runs P4 on each runtime of the configuration.
 *
 * @param config What to run.
 * @returns Each runtime's figures.
 */
export async function runP4(config: P4Config): Promise<P4Run[]> {
  const dir = await mkdtemp(join(tmpdir(), "codex-broker-p4-"));
  const script = join(dir, "post.lua");
  await writeFile(
    script,
    [
      'wrk.method = "POST"',
      `wrk.body = '${turnBody()}'`,
      'wrk.headers["Content-Type"] = "application/json"',
      `wrk.headers["X-Internal-Secret"] = "${SECRET}"`,
      "",
    ].join("\n"),
  );
  const runs: P4Run[] = [];
  try {
    for (const runtime of config.runtimes) {
      // Like the minimal client, the broker keeps every request in flight to codex: its
      // per-workspace limit (16 by default) is raised to the concurrency, or it would queue
      // the rest itself and send codex smaller batches. The defaults are shown too. On Deno
      // the broker serves through node:http unless told otherwise: both are shown. Each
      // runtime also runs with its own WebSocket to codex, for the client's share, and Node
      // with V8's own pretenuring, which the command turns off; Deno takes V8 flags only on
      // its command line, so there the broker runs as `npm start` runs it, and once without.
      const inFlight = ["--max-workspace-turns", String(config.concurrency)];
      const runtimeFlags = serviceFlags(runtime);
      const variant = (label: string | undefined, args: string[]): BrokerVariant => ({
        label,
        args,
        runtimeFlags,
      });
      const variants: BrokerVariant[] = [
        variant(undefined, inFlight),
        ...(runtime === "deno"
          ? [
            variant("deno, --deno-server native", [...inFlight, "--deno-server", "native"]),
            { label: "deno, V8's pretenuring on", args: inFlight, runtimeFlags: [] },
          ]
          : []),
        variant(`${runtime}, --ws-client web`, [...inFlight, "--ws-client", "web"]),
        ...(runtime !== "node"
          ? []
          : [variant(`${runtime}, --v8-pretenuring on`, [...inFlight, "--v8-pretenuring", "on"])]),
        variant(`${runtime}, defaults (16 turns per workspace)`, []),
      ];
      const configurations = config.firstOnly ? variants.slice(0, 1) : variants;
      runs.push(...await measureRounds(runtime, dir, script, config, configurations));
    }
  } finally {
    await rm(dir, { recursive: true, force: true }).catch(() => {});
  }
  return runs;
}

type BrokerFigure = P4Figure & { codexCpuUsPerTurn: number };

/** Windows taken round by round: one of each per round, in the same order. */
interface Rounds {
  hellos: (P4Figure | string)[];
  minimals: (P4Figure | string)[];
  brokers: (BrokerFigure | string)[];
}

/** A window of load, measured or not; a contender that failed to start gives its error. */
async function runWindow<F>(
  contender: { window(seconds: number): Promise<F> } | string,
  seconds: number,
): Promise<F | string> {
  if (typeof contender === "string") return contender;
  return await contender.window(seconds).catch(message);
}

/**
 * Every configuration's row. Hello srvx and the minimal client stay up for the runtime; one
 * broker at a time runs beside them, as one broker runs on a machine: two or more brokers
 * taking turns ran slower than one alone (Deno's: 164–193 µs per turn against 122). The
 * first configuration runs in `config.generations` generations of a fresh broker, the
 * others in one. Each generation: the broker warmed up alone, then `config.rounds` rounds of
 * a window of each of the three, back to back: this machine's speed drifts within seconds,
 * and each round's ratio compares windows taken together. A row's ratio is the median of
 * its rounds' ratios, its baselines the median of the windows taken in its rounds.
 */
async function measureRounds(
  runtime: BenchRuntime,
  dir: string,
  script: string,
  config: P4Config,
  configurations: readonly BrokerVariant[],
): Promise<P4Run[]> {
  const started: Contender[] = [];
  async function start<T extends Contender>(make: () => Promise<T>): Promise<T | string> {
    try {
      const contender = await make();
      started.push(contender);
      return contender;
    } catch (error) {
      return message(error);
    }
  }
  try {
    const hello = config.brokerOnly
      ? "skipped"
      : await start(() => startHello(runtime, script, config));
    const minimal = config.brokerOnly
      ? "skipped"
      : await start(() => startMinimal(runtime, dir, config));
    for (const contender of [hello, minimal]) {
      await runWindow(contender, config.warmupSeconds);
    }
    const runs: P4Run[] = [];
    for (const [i, variant] of configurations.entries()) {
      const rounds: Rounds = { hellos: [], minimals: [], brokers: [] };
      for (let generation = 0; generation < (i === 0 ? config.generations : 1); generation++) {
        await measureGeneration(
          rounds,
          hello,
          minimal,
          () => startBrokerContender(runtime, dir, script, config, variant),
          config,
        );
      }
      runs.push({
        runtime,
        ...(variant.label === undefined ? {} : { label: variant.label }),
        hello: medianFigure(rounds.hellos),
        minimal: medianFigure(rounds.minimals),
        broker: medianFigure(rounds.brokers),
        codexCpuUsPerTurn: median(
          rounds.brokers.map((f) => typeof f === "string" ? NaN : f.codexCpuUsPerTurn),
        ),
        ratios: rounds.brokers.map((f, round) =>
          ratio(f, rounds.hellos[round]!, rounds.minimals[round]!)
        ),
        load: loadText(),
      });
    }
    return runs;
  } finally {
    for (const contender of started.reverse()) await contender.stop().catch(() => {});
  }
}

/**
 * One broker process: started, warmed up alone, then `config.rounds` rounds of a window of
 * hello srvx, the minimal client and the broker, the order rotating each round so that none
 * always follows the same other. Each is idle between its windows, but loaded right before
 * each for `config.rewarmSeconds`, unmeasured: a server idle for seconds meets load cold.
 */
async function measureGeneration(
  rounds: Rounds,
  hello: Contender | string,
  minimal: Contender | string,
  startBroker: () => Promise<BrokerContender>,
  config: P4Config,
): Promise<void> {
  let broker: BrokerContender | string;
  try {
    broker = await startBroker();
  } catch (error) {
    broker = message(error);
  }
  try {
    await runWindow(broker, config.warmupSeconds);
    const measured = async <F>(contender: { window(seconds: number): Promise<F> } | string) => {
      if (config.rewarmSeconds > 0) await runWindow(contender, config.rewarmSeconds);
      return await runWindow(contender, config.seconds);
    };
    for (let round = 0; round < config.rounds; round++) {
      for (let i = 0; i < 3; i++) {
        const index = (round + i) % 3;
        if (index === 0) rounds.hellos.push(await measured(hello));
        else if (index === 1) rounds.minimals.push(await measured(minimal));
        else rounds.brokers.push(await measured(broker));
      }
    }
  } finally {
    if (typeof broker !== "string") await broker.stop();
  }
}

/** The median; of an even count, the mean of the two middle values. */
function median(values: readonly number[]): number {
  const sorted = values.filter((v) => !Number.isNaN(v)).sort((a, b) => a - b);
  if (sorted.length === 0) return NaN;
  const middle = sorted.length >> 1;
  return sorted.length % 2 === 1 ? sorted[middle]! : (sorted[middle - 1]! + sorted[middle]!) / 2;
}

/** The round with the median rate, or the first failure if every round failed. */
function medianFigure(figures: readonly (P4Figure | string)[]): P4Figure | string {
  const ok = figures.filter((f): f is P4Figure => typeof f !== "string");
  if (ok.length === 0) return figures[0]!;
  const sorted = [...ok].sort((a, b) => a.perSec - b.perSec);
  const picked = sorted[Math.floor((sorted.length - 1) / 2)]!;
  // Problems of any round stay visible.
  const problems = [...new Set(figures.flatMap((f) => typeof f === "string" ? [f] : f.problems))];
  return { ...picked, problems };
}

/** broker / min(hello, minimal) of one round. */
function ratio(
  broker: P4Figure | string,
  hello: P4Figure | string,
  minimal: P4Figure | string,
): number {
  const rate = (f: P4Figure | string) => typeof f === "string" ? NaN : f.perSec;
  return rate(broker) / Math.min(rate(hello), rate(minimal));
}

function num(value: number, digits = 0): string {
  return Number.isFinite(value)
    ? value.toLocaleString("en-US", {
      minimumFractionDigits: digits,
      maximumFractionDigits: digits,
    })
    : "-";
}

/**
 * Formats the P4 figures: per runtime, each figure beside the baseline, and the ratio.
 *
 * @param runs The runs.
 * @param config What ran.
 * @returns The text.
 */
export function formatP4(runs: P4Run[], config: P4Config): string {
  const figure = (f: P4Figure | string) => typeof f === "string" ? NaN : f.perSec;
  const rows = runs.map((run) => {
    const hello = figure(run.hello);
    const minimal = figure(run.minimal);
    const broker = figure(run.broker);
    const baseline = Math.min(hello, minimal);
    // The median of the rounds' own ratios, each from windows taken back to back.
    const ratio = median(run.ratios);
    const cpu = (f: P4Figure | string) => typeof f === "string" ? "-" : num(f.cpuUsPerRequest);
    return [
      run.label ?? run.runtime,
      num(broker),
      num(hello),
      num(minimal),
      `${hello <= minimal ? "hello" : "minimal"} ${num(baseline)}`,
      run.ratios.length > 1
        ? `${num(ratio, 2)} (${run.ratios.map((r) => num(r, 2)).join(", ")})`
        : num(ratio, 2),
      ratio >= P4_GOAL ? "met" : "not met",
      `${cpu(run.broker)} + codex ${num(run.codexCpuUsPerTurn)} / ${cpu(run.hello)} / ${
        cpu(run.minimal)
      }`,
    ];
  });
  const lines = [
    `P4: REST turns/s with an instant fake codex, a new thread per request, wrk -t1 ` +
    `-c${config.concurrency}; hello srvx, the minimal client and one broker up at once, each ` +
    `warmed up ${config.warmupSeconds} s, then ${config.rounds} rounds of one ${config.seconds}-s ` +
    `window each (after ${config.rewarmSeconds} s of unmeasured load), taking turns; the first ` +
    `row with ${config.generations} brokers one after the other. The figures of each one's ` +
    `median window, and broker/baseline the median of the rounds' ratios (in brackets)`,
    "",
    table(
      [
        "runtime",
        "broker req/s",
        "hello srvx req/s",
        "minimal ws turns/s",
        "baseline (lower)",
        "broker/baseline",
        `goal >=${P4_GOAL}`,
        "CPU us/req broker / hello / minimal",
      ],
      rows,
    ),
  ];
  const problems = (name: string, f: P4Figure | string) => {
    if (typeof f === "string") lines.push(`${name}: failed: ${f}`);
    else if (f.problems.length > 0) lines.push(`${name}: ${f.problems.join("; ")}`);
  };
  for (const [i, run] of runs.entries()) {
    // The rows of a runtime share its baselines and its time: they are told once.
    const firstOfRuntime = runs[i - 1]?.runtime !== run.runtime;
    if (firstOfRuntime) {
      problems(`${run.runtime} hello`, run.hello);
      problems(`${run.runtime} minimal`, run.minimal);
    }
    problems(`${run.label ?? run.runtime} broker`, run.broker);
    const lastOfRuntime = runs[i + 1]?.runtime !== run.runtime;
    if (lastOfRuntime) lines.push(`${run.runtime}: ${run.load} at its end`);
  }
  return lines.join("\n");
}

if (import.meta.main) {
  const config = p4Config();
  const runs = await runP4(config);
  console.log(formatP4(runs, config));
}

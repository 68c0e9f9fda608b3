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
 *   `--deno-server native`, on Node with `--v8-pretenuring on` (V8's default, which the
 *   command turns off), and last with its defaults.
 *
 * The baselines and the broker's first configuration run in `BENCH_P4_ROUNDS` (3) rounds,
 * one after the other in each round: the machine's speed drifts over minutes, so each round's
 * ratio compares figures taken together, and the row shows their median.
 *
 * The load generator is Debian's `wrk` (`apt-get install wrk`): `wrk -t1 -c64` on keep-alive
 * connections, a warm-up run, then the measured run. The warm-up is as long as the
 * measurement (5 s): the broker has far more code for the JIT to compile than hello srvx or
 * the minimal client, and under this load its CPU per turn only settles after about 5 s
 * (on Node: 201, 154, 128, 126 µs in its first four 2-second windows, then 101–144). It prints req/s (turns/s) per server,
 * the server's CPU per request, and broker / min(hello, minimal) against the goal
 * {@linkcode P4_GOAL}. The machine's load average goes beside it: wrk, the server and the
 * fake codex share the cores.
 *
 * `BENCH_P4_PROFILE=DIR` runs the broker under the runtime's CPU profiler (`--cpu-prof`
 * for Node and Deno; Bun's is `--cpu-prof` too where it has one), writing into DIR.
 *
 * ```sh
 * npm run bench -- p4
 * BENCH_P4_RUNTIMES=node BENCH_P4_SECONDS=10 npm run bench -- p4
 * ```
 *
 * Environment: `BENCH_P4_SECONDS` (5, the measured run), `BENCH_P4_WARMUP_SECONDS` (5, the
 * warm-up before it, for every server alike), `BENCH_P4_CONCURRENCY` (64), `BENCH_P4_RUNTIMES` (`deno,bun,node`),
 * `BENCH_P4_PROFILE`, `BENCH_P4_BROKER_ONLY=1` (the broker alone: for comparing two
 * versions of `src/` under the same load, by CPU per request), and `BENCH_P4_FIRST_ONLY=1`
 * (the broker in its first configuration only), `BENCH_P4_ROUNDS` (3).
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
  startServer,
} from "./_procs.ts";
import { envInt, RESULT_MARKER, table } from "./_stats.ts";
import { commandLine, descendants } from "../tests/_broker_process.ts";

/** The goal: the broker keeps at least this share of the lower baseline. */
export const P4_GOAL = 0.5;

const SECRET = "p4-bench-secret-0123456789";
const WORKSPACE = "p4";

/** What to run. */
export interface P4Config {
  seconds: number;
  warmupSeconds: number;
  concurrency: number;
  runtimes: BenchRuntime[];
  /** Directory for the broker's CPU profiles, or undefined. */
  profileDir: string | undefined;
  /** Run the broker alone, without the baselines (for before/after comparisons). */
  brokerOnly: boolean;
  /** Run the broker in its first configuration only, not the others. */
  firstOnly: boolean;
  /** Rounds of the baselines and the broker's first configuration. */
  rounds: number;
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
  /** Each round's broker / min(hello, minimal), for the configuration run in rounds. */
  ratios?: number[];
  load: string;
}

/**
 * Reads the configuration from the environment.
 *
 * @returns The configuration.
 * @throws {TypeError} If a variable is not valid.
 */
export function p4Config(): P4Config {
  const seconds = envInt("BENCH_P4_SECONDS", 5, 1);
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
    concurrency: envInt("BENCH_P4_CONCURRENCY", 64, 1),
    runtimes,
    profileDir: Deno.env.get("BENCH_P4_PROFILE") || undefined,
    brokerOnly: Deno.env.get("BENCH_P4_BROKER_ONLY") === "1",
    firstOnly: Deno.env.get("BENCH_P4_FIRST_ONLY") === "1",
    rounds: envInt("BENCH_P4_ROUNDS", 3, 1),
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

/** Runs wrk against a server: a warm-up, then the measured run, with the server's CPU. */
async function load(
  server: RunningServer,
  path: string,
  script: string,
  config: P4Config,
): Promise<{ result: WrkResult; cpuUsPerRequest: number }> {
  await wrk(`${server.url}${path}`, script, config.concurrency, config.warmupSeconds);
  const before = cpuUs(server.pid);
  const result = await wrk(`${server.url}${path}`, script, config.concurrency, config.seconds);
  return { result, cpuUsPerRequest: (cpuUs(server.pid) - before) / result.requests };
}

function message(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

async function runHello(runtime: BenchRuntime, script: string, config: P4Config) {
  const [binary, args] = runtimeCommand(runtime, "bench/hello_server.ts");
  const server = await startServer(binary, args);
  try {
    const { result, cpuUsPerRequest } = await load(server, "/api/turns", script, config);
    const problems: string[] = [];
    // Every answer is the 401 it is meant to give: non-2xx is all of them.
    if (result.non2xx !== result.requests) {
      problems.push(`${result.requests - result.non2xx} answers other than 401`);
    }
    if (result.socketErrors) problems.push(result.socketErrors);
    return { perSec: result.perSec, count: result.requests, cpuUsPerRequest, problems };
  } finally {
    await server.stop();
  }
}

async function runMinimal(
  runtime: BenchRuntime,
  dir: string,
  config: P4Config,
): Promise<P4Figure> {
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
  try {
    const [binary, args] = runtimeCommand(runtime, "bench/p4_minimal_client.ts", [
      "--url",
      codex.url,
      "--token",
      token,
      "--concurrency",
      String(config.concurrency),
      "--duration-ms",
      String(config.seconds * 1000),
      "--warmup-ms",
      String(config.warmupSeconds * 1000),
    ]);
    const output = await new Deno.Command(binary, {
      args,
      cwd: ROOT,
      stdout: "piped",
      stderr: "inherit",
      signal: AbortSignal.timeout((config.seconds + config.warmupSeconds + 60) * 1000),
    }).output();
    const stdout = new TextDecoder().decode(output.stdout);
    const line = stdout.split("\n").find((l) => l.startsWith(RESULT_MARKER));
    if (!output.success || line === undefined) {
      throw new Error(`minimal client failed (exit ${output.code}): ${stdout.trim()}`);
    }
    const result = JSON.parse(line.slice(RESULT_MARKER.length)) as P4MinimalResult;
    return {
      perSec: result.turns / (result.ms / 1000),
      count: result.turns,
      cpuUsPerRequest: result.cpuUs / result.turns,
      problems: [],
    };
  } finally {
    await codex.stop();
  }
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

async function runBroker(
  runtime: BenchRuntime,
  dir: string,
  script: string,
  config: P4Config,
  extraFlags: string[] = [],
): Promise<{ figure: P4Figure; codexCpuUsPerTurn: number }> {
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
  const flags = config.profileDir ? profileFlags(runtime, config.profileDir) : [];
  const [binary, args] = runtimeCommand(runtime, "src/main.ts", [
    "--port",
    "0",
    "--secret",
    SECRET,
    "--workspaces-dir",
    workspaces,
    "--codex",
    wrapper,
    ...extraFlags,
  ], flags);
  const server = await startServer(binary, args, {
    // An empty codex home to copy from: the operator's own is none of the bench's business.
    env: { CODEX_HOME: await mkdtemp(join(dir, "codex-home-")) },
  });
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
    const codexPid = codexPidOf(server.pid);
    await wrk(`${server.url}/api/turns`, script, config.concurrency, config.warmupSeconds);
    const completedWarm = await completedTurns(server.url);
    const before = cpuUs(server.pid);
    const codexWarm = codexPid === undefined ? NaN : cpuUs(codexPid);
    const result = await wrk(`${server.url}/api/turns`, script, config.concurrency, config.seconds);
    const cpuUsPerRequest = (cpuUs(server.pid) - before) / result.requests;
    const codexCpuUsPerTurn = codexPid === undefined
      ? NaN
      : (cpuUs(codexPid) - codexWarm) / result.requests;
    const completed = await completedTurns(server.url) - completedWarm;
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
      figure: { perSec: result.perSec, count: result.requests, cpuUsPerRequest, problems },
      codexCpuUsPerTurn,
    };
  } finally {
    await server.stop(15_000);
  }
}

/** The instant codex the broker spawned, at whatever depth (a watchdog puts it lower). */
function codexPidOf(pid: number): number | undefined {
  return descendants(pid).find((child) => commandLine(child).includes("_instant_codex"));
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
  const broker = async (runtime: BenchRuntime, extraFlags: string[]) => {
    try {
      const result = await runBroker(runtime, dir, script, config, extraFlags);
      return { figure: result.figure as P4Figure | string, codex: result.codexCpuUsPerTurn };
    } catch (error) {
      return { figure: message(error), codex: NaN };
    }
  };
  try {
    for (const runtime of config.runtimes) {
      // Like the minimal client, the broker keeps every request in flight to codex: its
      // per-workspace limit (16 by default) is raised to the concurrency, or it would queue
      // the rest itself and send codex smaller batches. The defaults are shown too. On Deno
      // the broker serves through node:http unless told otherwise: both are shown. Each
      // runtime also runs with its own WebSocket to codex, for the client's share, and Node
      // with V8's own pretenuring, which the command turns off.
      const inFlight = ["--max-workspace-turns", String(config.concurrency)];
      const variants: [string | undefined, string[]][] = [
        [undefined, inFlight],
        ...(runtime === "deno"
          ? [[
            "deno, --deno-server native",
            [...inFlight, "--deno-server", "native"],
          ] as [string, string[]]]
          : []),
        [`${runtime}, --ws-client web`, [...inFlight, "--ws-client", "web"]],
        ...(runtime !== "node" ? [] : [[
          `${runtime}, --v8-pretenuring on`,
          [...inFlight, "--v8-pretenuring", "on"],
        ] as [string, string[]]]),
        [`${runtime}, defaults (16 turns per workspace)`, []],
      ];
      // The baselines and the first configuration take turns, round after round: this
      // machine's speed drifts over minutes, and each round's ratio compares figures taken
      // within a minute of each other.
      const rounds: {
        hello: P4Figure | string;
        minimal: P4Figure | string;
        broker: P4Figure | string;
        codex: number;
      }[] = [];
      for (let round = 0; round < config.rounds; round++) {
        const hello = config.brokerOnly
          ? "skipped"
          : await runHello(runtime, script, config).catch(message);
        const minimal = config.brokerOnly
          ? "skipped"
          : await runMinimal(runtime, dir, config).catch(message);
        const first = await broker(runtime, variants[0]![1]);
        rounds.push({ hello, minimal, broker: first.figure, codex: first.codex });
      }
      const hello = medianFigure(rounds.map((r) => r.hello));
      const minimal = medianFigure(rounds.map((r) => r.minimal));
      runs.push({
        runtime,
        hello,
        minimal,
        broker: medianFigure(rounds.map((r) => r.broker)),
        codexCpuUsPerTurn: median(rounds.map((r) => r.codex)),
        ratios: rounds.map((r) => ratio(r.broker, r.hello, r.minimal)),
        load: loadText(),
      });
      for (const [label, extraFlags] of config.firstOnly ? [] : variants.slice(1)) {
        const other = await broker(runtime, extraFlags);
        runs.push({
          runtime,
          ...(label === undefined ? {} : { label }),
          hello,
          minimal,
          broker: other.figure,
          codexCpuUsPerTurn: other.codex,
          load: loadText(),
        });
      }
    }
  } finally {
    await rm(dir, { recursive: true, force: true }).catch(() => {});
  }
  return runs;
}

function median(values: readonly number[]): number {
  const sorted = values.filter((v) => !Number.isNaN(v)).sort((a, b) => a - b);
  return sorted.length === 0 ? NaN : sorted[Math.floor((sorted.length - 1) / 2)]!;
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
    // Rounds: the median of the rounds' own ratios, each from figures taken together.
    const ratio = run.ratios ? median(run.ratios) : broker / baseline;
    const cpu = (f: P4Figure | string) => typeof f === "string" ? "-" : num(f.cpuUsPerRequest);
    return [
      run.label ?? run.runtime,
      num(broker),
      num(hello),
      num(minimal),
      `${hello <= minimal ? "hello" : "minimal"} ${num(baseline)}`,
      run.ratios && run.ratios.length > 1
        ? `${num(ratio, 2)} (${run.ratios.map((r) => num(r, 2)).join(", ")})`
        : num(ratio, 2),
      ratio >= P4_GOAL ? "met" : "not met",
      `${cpu(run.broker)} + codex ${num(run.codexCpuUsPerTurn)} / ${cpu(run.hello)} / ${
        cpu(run.minimal)
      }`,
    ];
  });
  const lines = [
    `P4: REST turns/s with an instant fake codex, wrk -t1 -c${config.concurrency} -d${config.seconds}s ` +
    `after ${config.warmupSeconds} s warm-up, a new thread per request; the baselines and the ` +
    `first row ran in ${config.rounds} alternating rounds: their medians, and broker/baseline ` +
    `the median of the rounds' ratios (each round's in brackets)`,
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
  for (const run of runs) {
    for (
      const [name, f] of [["hello", run.hello], ["minimal", run.minimal], [
        "broker",
        run.broker,
      ]] as const
    ) {
      if (typeof f === "string") lines.push(`${run.runtime} ${name}: failed: ${f}`);
      else if (f.problems.length > 0) {
        lines.push(`${run.runtime} ${name}: ${f.problems.join("; ")}`);
      }
    }
    lines.push(`${run.runtime}: ${run.load} at its end`);
  }
  return lines.join("\n");
}

if (import.meta.main) {
  const config = p4Config();
  const runs = await runP4(config);
  console.log(formatP4(runs, config));
}

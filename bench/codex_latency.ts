/**
 * Real-codex turn latency on the loopback model (issue 4, section 4): sequential turns on
 * one thread after a warm-up, measured three ways in the same run, plus the cold path.
 *
 * - **rest**: the broker (`src/main.ts` under Deno, a subprocess on port 0, as
 *   `bench/demo.ts` runs it) over `POST /api/turns` with `fetch`, continuing one thread.
 * - **floor**: a minimal hand-written WebSocket client (`_minimal_client.ts`) straight to a
 *   codex app-server this bench spawns through `createCodexResolver` (so the same binary,
 *   flags, capability token and `CODEX_HOME` as the broker's): `turn/start`, then wait for
 *   the matching `turn/completed`.
 * - **exec**: `codex exec --experimental-json --skip-git-repo-check PROMPT`, a new process
 *   per turn with the same `CODEX_HOME` (a new thread each time), run as the native binary
 *   the way `@openai/codex-sdk` runs it. **exec resume** is what the SDK runs for the second
 *   and later turns of a thread: `codex exec … resume THREAD PROMPT`.
 * - **cold rest**: the first REST turn of a new workspace (a fresh id each), so it includes
 *   the spawn of its codex, `/readyz`, the dial and `thread/start`. **cold floor** does the
 *   same by hand (resolve, connect, `thread/start`, turn), to tell the spawn from the broker.
 *
 * One mock model (`tests/_mock_model.ts`, in this process) serves every method and answers
 * every request at once with the same text. The measured turns run in rounds: each round
 * runs one rest and one floor turn, swapping their order every round; the exec, exec resume
 * and cold turns are spread evenly over the rounds, before the pair in every other pair of
 * rounds and after it in the others. So drift and other load on the machine hit all methods
 * alike, and the per-round rest/floor ratio pairs turns taken moments apart. Each round ends
 * with a `GET /healthz`: the HTTP round trip alone, to size the broker's share.
 *
 * Nothing is left behind: the broker gets SIGTERM and must exit 0 (it stops its codex
 * processes), the floor's codex processes are stopped, and every temp directory is removed.
 *
 * ```sh
 * node_modules/.bin/deno run -A bench/codex_latency.ts   # or: npm run bench -- codex
 * ```
 *
 * Environment: `BENCH_CODEX_WARMUP` (3 turns per method), `BENCH_CODEX_TURNS` (100 rounds,
 * so 100 rest and 100 floor turns: enough for a p99 and a p50 ratio that noise moves by a
 * few percent, not ten), `BENCH_CODEX_EXEC` (10 exec and 10 exec resume turns),
 * `BENCH_CODEX_COLD` (3 cold rest and 3 cold floor turns). About 20 s in all here.
 *
 * @module
 */

import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import process from "node:process";
import { join } from "node:path";
import { createCodexResolver } from "../src/supervisor.ts";
import { makeCodexHome } from "../tests/_codex_home.ts";
import { reply, startMockModel } from "../tests/_mock_model.ts";
import { MinimalClient } from "./_minimal_client.ts";
import { envInt, ms, ratioInterval, type Stats, stats, table } from "./_stats.ts";

/** REST p50 may be at most this multiple of the floor's p50. */
export const FLOOR_GOAL = 1.05;
/** `codex exec` p50 must be at least this multiple of REST p50. */
export const EXEC_GOAL = 4;

const ROOT = decodeURIComponent(new URL("..", import.meta.url).pathname).replace(/\/$/, "");
const SECRET = "bench-secret";
const WORKSPACE = "bench";
const PROMPT = "Say ok.";
const ANSWER = "ok";
const TURN_PARAMS = { input: [{ type: "text", text: PROMPT, text_elements: [] }] };
const BROKER_START_TIMEOUT_MS = 30_000;
const BROKER_STOP_TIMEOUT_MS = 20_000;
const TURN_TIMEOUT_MS = 30_000;

/** How many turns of each kind; see the module doc for the variables. */
export interface CodexLatencyConfig {
  warmup: number;
  turns: number;
  execTurns: number;
  coldTurns: number;
}

/** The method names, in the order the tables print them. */
export const METHODS = ["rest", "floor", "exec", "execResume", "cold", "coldFloor"] as const;
export type Method = typeof METHODS[number];

/** Everything one run measured, in milliseconds. */
export interface CodexLatencyResult {
  config: CodexLatencyConfig;
  /** Wall time per measured turn, per method. */
  samples: Record<Method, number[]>;
  /** The broker's own `durationMs` (its "turn" log line) for each rest turn, same order. */
  restInBroker: number[];
  /** codex's `turn.durationMs` for each rest and floor turn, same order as `samples`. */
  codexTurnMs: { rest: number[]; floor: number[] };
  /**
   * CPU time per turn, ms, over the rest and floor turns: this bench process (client and
   * mock model), the broker, and the codex app-server of each. NaN without `/proc`.
   */
  cpuMsPerTurn: {
    rest: { bench: number; broker: number; codex: number };
    floor: { bench: number; codex: number };
  };
  /** Per round, one `GET /healthz` to the broker: the HTTP round trip alone, no codex. */
  healthz: number[];
  /** Per round, rest / floor wall time: pairs taken moments apart, so slow drift cancels. */
  pairedRatios: number[];
  /** Broker exit code after SIGTERM (null: killed by a signal). */
  brokerExit: number | null;
  /** Setup (mock, broker, floor codex), warm-up, measured rounds, teardown, whole run. */
  phasesMs: { setup: number; warmup: number; measured: number; teardown: number; total: number };
}

/**
 * Reads the configuration from the environment.
 *
 * @returns The counts; defaults 3 warm-up, 100 rest/floor, 10 exec, 3 cold.
 * @throws {TypeError} If a variable is not a valid count.
 */
export function codexLatencyConfig(): CodexLatencyConfig {
  return {
    warmup: envInt("BENCH_CODEX_WARMUP", 3, 1),
    turns: envInt("BENCH_CODEX_TURNS", 100, 1),
    execTurns: envInt("BENCH_CODEX_EXEC", 10, 0),
    coldTurns: envInt("BENCH_CODEX_COLD", 3, 0),
  };
}

/** The native codex binary of `@openai/codex`, as the supervisor and the SDK run it. */
function codexBinary(): string {
  const triples: Record<string, [string, string]> = {
    "linux-x86_64": ["codex-linux-x64", "x86_64-unknown-linux-musl"],
    "linux-aarch64": ["codex-linux-arm64", "aarch64-unknown-linux-musl"],
    "darwin-x86_64": ["codex-darwin-x64", "x86_64-apple-darwin"],
    "darwin-aarch64": ["codex-darwin-arm64", "aarch64-apple-darwin"],
  };
  const target = triples[`${Deno.build.os}-${Deno.build.arch}`];
  if (target) {
    const modules = `${ROOT}/node_modules/@openai`;
    for (
      const base of [
        `${modules}/${target[0]}`,
        `${modules}/codex/node_modules/@openai/${target[0]}`,
      ]
    ) {
      const binary = `${base}/vendor/${target[1]}/bin/codex`;
      try {
        if (Deno.statSync(binary).isFile) return binary;
      } catch {
        // Not installed there.
      }
    }
  }
  return `${ROOT}/node_modules/.bin/codex`;
}

/**
 * CPU time (user + system) a process has used so far, ms, from `/proc` (10 ms ticks; summed
 * over many turns the rounding averages out). NaN where there is no `/proc` or no pid.
 */
function processCpuMs(pid: number | undefined): number {
  if (pid === undefined) return NaN;
  try {
    const stat = Deno.readTextFileSync(`/proc/${pid}/stat`);
    // The command name may hold spaces; the fields after it are space-separated.
    const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    return (Number(fields[11]) + Number(fields[12])) * 10;
  } catch {
    return NaN;
  }
}

/** This process's CPU time so far, ms. */
function ownCpuMs(): number {
  const { user, system } = process.cpuUsage();
  return (user + system) / 1000;
}

/** The broker subprocess, as `bench/demo.ts` runs it. */
interface BrokerProcess {
  url: string;
  pid: number;
  /** The pid of each workspace's codex, from the broker's "dial" log lines. */
  codexPids: Map<string, number>;
  /** `durationMs` of each "turn" log line, by workspace, in order. */
  turnLogs: Map<string, number[]>;
  /** SIGTERM, then the exit code (null if a signal ended it); SIGKILL after a timeout. */
  stop(): Promise<number | null>;
}

async function startBroker(workspacesDir: string, codexHome: string): Promise<BrokerProcess> {
  const child = new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "-A",
      "src/main.ts",
      "--port",
      "0",
      "--secret",
      SECRET,
      "--workspaces-dir",
      workspacesDir,
      "--codex-home",
      codexHome,
    ],
    cwd: ROOT,
    stdin: "null",
    stdout: "null",
    stderr: "piped",
  }).spawn();
  const listening = Promise.withResolvers<string>();
  const turnLogs = new Map<string, number[]>();
  const codexPids = new Map<string, number>();
  const tail: string[] = [];
  // Drained to the end: a full pipe would block the broker's logging, and so its turns.
  const drained = (async () => {
    let partial = "";
    for await (const text of child.stderr.pipeThrough(new TextDecoderStream())) {
      const lines = (partial + text).split("\n");
      partial = lines.pop() ?? "";
      for (const line of lines) {
        tail.push(line);
        if (tail.length > 20) tail.shift();
        let entry: {
          msg?: unknown;
          url?: unknown;
          workspaceId?: unknown;
          durationMs?: unknown;
          pid?: unknown;
        };
        try {
          entry = JSON.parse(line);
        } catch {
          continue;
        }
        if (entry.msg === "listening") listening.resolve(String(entry.url));
        if (entry.msg === "dial" && typeof entry.pid === "number") {
          codexPids.set(String(entry.workspaceId), entry.pid);
        }
        if (entry.msg === "turn" && typeof entry.durationMs === "number") {
          const id = String(entry.workspaceId);
          turnLogs.set(id, [...turnLogs.get(id) ?? [], entry.durationMs]);
        }
      }
    }
    listening.reject(new Error(`the broker exited before listening:\n${tail.join("\n")}`));
  })();
  let stopping: Promise<number | null> | undefined;
  const stop = () =>
    stopping ??= (async () => {
      try {
        child.kill("SIGTERM");
      } catch {
        // Already exited.
      }
      const timer = setTimeout(() => {
        try {
          child.kill("SIGKILL");
        } catch {
          // Exited meanwhile.
        }
      }, BROKER_STOP_TIMEOUT_MS);
      const [status] = await Promise.all([child.status, drained]);
      clearTimeout(timer);
      return status.signal ? null : status.code;
    })();
  const timer = setTimeout(
    () => listening.reject(new Error("the broker did not listen in time")),
    BROKER_START_TIMEOUT_MS,
  );
  try {
    const url = await listening.promise;
    return { url, pid: child.pid, codexPids, turnLogs, stop };
  } catch (error) {
    await stop();
    throw error;
  } finally {
    clearTimeout(timer);
  }
}

interface CodexTurn {
  id: string;
  status: string;
  durationMs?: number | null;
  items?: { type: string; text?: string }[];
}

function checkTurn(method: string, turn: CodexTurn | undefined, raw: unknown): CodexTurn {
  if (turn?.status !== "completed") {
    throw new Error(`${method} turn did not complete: ${JSON.stringify(raw).slice(0, 500)}`);
  }
  return turn;
}

/** One REST turn; returns the thread id, codex's turn and the wall time. */
async function restTurn(
  url: string,
  workspaceId: string,
  threadId: string | null,
): Promise<{ threadId: string; turn: CodexTurn; ms: number }> {
  const t0 = performance.now();
  const response = await fetch(`${url}/api/turns`, {
    method: "POST",
    headers: { "content-type": "application/json", "x-internal-secret": SECRET },
    body: JSON.stringify({ workspaceId, threadId, params: TURN_PARAMS }),
    signal: AbortSignal.timeout(TURN_TIMEOUT_MS),
  });
  const body = await response.json() as { threadId?: string; turn?: CodexTurn };
  const ms = performance.now() - t0;
  if (response.status !== 200 || typeof body.threadId !== "string") {
    throw new Error(`REST turn failed: HTTP ${response.status} ${JSON.stringify(body)}`);
  }
  const turn = checkTurn("REST", body.turn, body);
  const text = turn.items?.find((item) => item.type === "agentMessage")?.text;
  if (text !== ANSWER) throw new Error(`REST turn answered ${JSON.stringify(text)}`);
  return { threadId: body.threadId, turn, ms };
}

async function floorTurn(
  client: MinimalClient,
  threadId: string,
): Promise<{ turn: CodexTurn; ms: number }> {
  const t0 = performance.now();
  let timer: ReturnType<typeof setTimeout> | undefined;
  const raw = await Promise.race([
    client.turn(threadId, TURN_PARAMS),
    new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error("floor turn timed out")), TURN_TIMEOUT_MS);
    }),
  ]).finally(() => clearTimeout(timer));
  const ms = performance.now() - t0;
  return { turn: checkTurn("floor", raw as CodexTurn, raw), ms };
}

/** One `codex exec` process; from spawn until it has exited and its output is read. */
async function execTurn(
  binary: string,
  cwd: string,
  codexHome: string,
  resumeThreadId: string | null,
): Promise<{ threadId: string; ms: number }> {
  const args = ["exec", "--experimental-json", "--skip-git-repo-check"];
  if (resumeThreadId !== null) args.push("resume", resumeThreadId);
  args.push(PROMPT);
  const t0 = performance.now();
  const output = await new Deno.Command(binary, {
    args,
    cwd,
    env: { CODEX_HOME: codexHome },
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
    signal: AbortSignal.timeout(TURN_TIMEOUT_MS),
  }).output();
  const ms = performance.now() - t0;
  const stdout = new TextDecoder().decode(output.stdout);
  const events = stdout.split("\n").filter((line) => line.startsWith("{")).map((line) =>
    JSON.parse(line) as { type?: string; thread_id?: string; item?: { text?: string } }
  );
  const threadId = events.find((event) => event.type === "thread.started")?.thread_id;
  const answered = events.some((event) => event.item?.text === ANSWER);
  if (
    !output.success || threadId === undefined || !answered ||
    !events.some((event) => event.type === "turn.completed")
  ) {
    throw new Error(
      `codex exec failed (exit ${output.code}):\n${stdout}\n${
        new TextDecoder().decode(output.stderr).slice(-2000)
      }`,
    );
  }
  return { threadId, ms };
}

/** The round each of `count` extra turns goes into: spread evenly over `rounds`. */
function slots(count: number, rounds: number): number[] {
  return Array.from({ length: count }, (_, i) => Math.floor(((i + 0.5) * rounds) / count));
}

type Step = () => Promise<void>;

/**
 * Runs the whole measurement and cleans up after itself: the broker gets SIGTERM, the
 * floor's codex processes are stopped, the mock closes and every temp directory is removed.
 *
 * @param config How many turns of each kind.
 * @param progress Receives a line now and then (default: stderr).
 * @returns The samples.
 * @throws {Error} If any turn fails or the broker does not exit 0 on SIGTERM.
 */
export async function runCodexLatency(
  config: CodexLatencyConfig,
  progress: (line: string) => void = (line) => console.error(line),
): Promise<CodexLatencyResult> {
  const began = performance.now();
  const samples: Record<Method, number[]> = {
    rest: [],
    floor: [],
    exec: [],
    execResume: [],
    cold: [],
    coldFloor: [],
  };
  const codexTurnMs = { rest: [] as number[], floor: [] as number[] };
  const pairedRatios: number[] = [];
  const healthz: number[] = [];
  const cpu = {
    rest: { bench: 0, broker: 0, codex: 0 },
    floor: { bench: 0, codex: 0 },
  };
  const phases = { setup: 0, warmup: 0, measured: 0, teardown: 0, total: 0 };
  let brokerExit: number | null = null;
  let restInBroker: number[] = [];

  const model = await startMockModel({ respond: reply(ANSWER) });
  const home = await makeCodexHome(model.baseUrl);
  const dir = await mkdtemp(join(tmpdir(), "codex-broker-bench-"));
  const execDir = join(dir, "exec");
  await Deno.mkdir(execDir);
  const binary = codexBinary();
  // The floor's codex processes: spawned the way the broker's are (same supervisor, binary,
  // flags, token and CODEX_HOME), each in a workspace directory of its own.
  const resolver = createCodexResolver({
    cwd: (id) => join(dir, "floor", id),
    codexHome: () => home.path,
    env: { BROKER_SECRET: undefined },
  });
  const connectFloor = async (id: string) => {
    const { url, headers } = await resolver.resolve(id);
    return await MinimalClient.connect(url, headers);
  };
  let broker: BrokerProcess | undefined;
  let client: MinimalClient | undefined;
  let failure: unknown;
  try {
    [broker, client] = await Promise.all([
      startBroker(join(dir, "workspaces"), home.path),
      connectFloor(WORKSPACE),
    ]);
    const floorThread = await client.startThread();
    const brokerUrl = broker.url;
    const floor = client;
    phases.setup = performance.now() - began;
    progress(`codex latency: broker at ${brokerUrl}, codex ${binary}`);

    // Warm-up: the first REST turn also starts the workspace's codex and the thread.
    const warmupStarted = performance.now();
    let restThread: string | null = null;
    let execThread: string | null = null;
    for (let i = 0; i < config.warmup; i++) {
      restThread = (await restTurn(brokerUrl, WORKSPACE, restThread)).threadId;
      await floorTurn(floor, floorThread);
      if (config.execTurns > 0) {
        const { threadId } = await execTurn(binary, execDir, home.path, execThread);
        execThread ??= threadId;
      }
    }
    phases.warmup = performance.now() - warmupStarted;
    progress(
      `codex latency: warm-up done in ${
        (phases.warmup / 1000).toFixed(1)
      } s; measuring ${config.turns} rounds`,
    );

    // The extra turns, each assigned to a round; exec and exec resume alternate.
    const extras = new Map<number, Step[]>();
    const add = (round: number, step: Step) =>
      extras.set(round, [...extras.get(round) ?? [], step]);
    slots(2 * config.execTurns, config.turns).forEach((round, i) => {
      const resume = i % 2 === 1 ? execThread : null;
      add(round, async () => {
        const { ms } = await execTurn(binary, execDir, home.path, resume);
        samples[resume === null ? "exec" : "execResume"].push(ms);
      });
    });
    const runId = crypto.randomUUID().slice(0, 8);
    slots(2 * config.coldTurns, config.turns).forEach((round, i) => {
      const workspaceId = `cold-${runId}-${i}`;
      add(
        round,
        i % 2 === 0
          ? async () => {
            samples.cold.push((await restTurn(brokerUrl, workspaceId, null)).ms);
          }
          : async () => {
            // By hand: spawn (with the supervisor's readiness wait), connect, thread/start,
            // turn. Stopping the process afterwards is off the clock.
            const t0 = performance.now();
            const cold = await connectFloor(workspaceId);
            try {
              await floorTurn(cold, await cold.startThread());
              samples.coldFloor.push(performance.now() - t0);
            } finally {
              cold.close();
              await resolver.release(workspaceId);
            }
          },
      );
    });

    const brokerPid = broker.pid;
    const brokerCodexPid = broker.codexPids.get(WORKSPACE);
    const floorCodexPid = resolver.pid(WORKSPACE);
    const measuredStarted = performance.now();
    for (let round = 0; round < config.turns; round++) {
      let restMs = NaN;
      let floorMs = NaN;
      const rest: Step = async () => {
        const before = [ownCpuMs(), processCpuMs(brokerPid), processCpuMs(brokerCodexPid)];
        const done = await restTurn(brokerUrl, WORKSPACE, restThread);
        cpu.rest.bench += ownCpuMs() - before[0]!;
        cpu.rest.broker += processCpuMs(brokerPid) - before[1]!;
        cpu.rest.codex += processCpuMs(brokerCodexPid) - before[2]!;
        restMs = done.ms;
        samples.rest.push(done.ms);
        codexTurnMs.rest.push(done.turn.durationMs ?? NaN);
      };
      const floorStep: Step = async () => {
        const before = [ownCpuMs(), processCpuMs(floorCodexPid)];
        const done = await floorTurn(floor, floorThread);
        cpu.floor.bench += ownCpuMs() - before[0]!;
        cpu.floor.codex += processCpuMs(floorCodexPid) - before[1]!;
        floorMs = done.ms;
        samples.floor.push(done.ms);
        codexTurnMs.floor.push(done.turn.durationMs ?? NaN);
      };
      const probe: Step = async () => {
        const t0 = performance.now();
        const response = await fetch(`${brokerUrl}/healthz`);
        await response.arrayBuffer();
        healthz.push(performance.now() - t0);
        if (response.status !== 200) throw new Error(`GET /healthz: HTTP ${response.status}`);
      };
      // rest and floor swap places every round; the extras of a round go before them in
      // every other pair of rounds and after them in the rest, so each method follows each
      // other one about equally often. The tiny /healthz probe goes last.
      const pair = round % 2 === 0 ? [rest, floorStep] : [floorStep, rest];
      const more = extras.get(round) ?? [];
      const order = Math.floor(round / 2) % 2 === 0 ? [...more, ...pair] : [...pair, ...more];
      for (const step of [...order, probe]) await step();
      pairedRatios.push(restMs / floorMs);
    }
    phases.measured = performance.now() - measuredStarted;
    // The broker logs the turn once its answer is ready; the last one may still be in the pipe.
    await new Promise((resolve) => setTimeout(resolve, 50));
    const logged = broker.turnLogs.get(WORKSPACE) ?? [];
    restInBroker = logged.slice(config.warmup, config.warmup + config.turns);
  } catch (error) {
    failure = error;
  } finally {
    const teardownStarted = performance.now();
    client?.close();
    const [exit] = await Promise.all([
      broker?.stop() ?? Promise.resolve(0),
      resolver.close(),
    ]);
    brokerExit = exit;
    await model.close();
    await home.cleanup();
    await rm(dir, { recursive: true, force: true });
    phases.teardown = performance.now() - teardownStarted;
  }
  if (failure !== undefined) throw failure;
  if (brokerExit !== 0) throw new Error(`the broker exited with ${brokerExit} after SIGTERM`);
  phases.total = performance.now() - began;
  return {
    config,
    samples,
    restInBroker,
    codexTurnMs,
    pairedRatios,
    cpuMsPerTurn: {
      rest: {
        bench: cpu.rest.bench / config.turns,
        broker: cpu.rest.broker / config.turns,
        codex: cpu.rest.codex / config.turns,
      },
      floor: { bench: cpu.floor.bench / config.turns, codex: cpu.floor.codex / config.turns },
    },
    healthz,
    brokerExit,
    phasesMs: phases,
  };
}

const LABELS: Record<Method, string> = {
  rest: "rest (broker, warm)",
  floor: "floor (minimal ws client)",
  exec: "codex exec (new thread)",
  execResume: "codex exec resume (same thread)",
  cold: "cold rest (new workspace)",
  coldFloor: "cold floor (spawn + minimal client)",
};

function verdict(ok: boolean): string {
  return ok ? "goal met" : "goal not met";
}

/**
 * Formats a run: the latency table, the ratios against their goals, and where the
 * broker's time goes.
 *
 * @param result One run.
 * @returns The report, as text.
 */
export function formatCodexLatency(result: CodexLatencyResult): string {
  const { config, samples, phasesMs } = result;
  const s = Object.fromEntries(METHODS.map((m) => [m, stats(samples[m])])) as Record<
    Method,
    Stats
  >;
  const title = `codex latency on the loopback model (instant mock): ${config.warmup} warm-up ` +
    `turns per method, then ${config.turns} rounds of one rest and one floor turn, with ` +
    `${config.execTurns} exec, ${config.execTurns} exec resume, ${config.coldTurns} cold rest ` +
    `and ${config.coldTurns} cold floor turns spread over them; order alternating; run took ${
      (phasesMs.total / 1000).toFixed(1)
    } s`;
  const main = table(
    ["method", "n", "p50 ms", "p90 ms", "p99 ms", "min ms", "max ms"],
    METHODS.filter((m) => s[m].n > 0).map((m) => [
      LABELS[m],
      String(s[m].n),
      ms(s[m].p50),
      ms(s[m].p90),
      ms(s[m].p99),
      ms(s[m].min),
      ms(s[m].max),
    ]),
  );

  const lines: string[] = [];
  const floorRatio = s.rest.p50 / s.floor.p50;
  const paired = stats(result.pairedRatios);
  const [low, high] = ratioInterval(samples.rest, samples.floor);
  lines.push(
    `REST p50 / floor p50 = ${floorRatio.toFixed(3)} (goal <= ${FLOOR_GOAL.toFixed(2)}): ${
      verdict(floorRatio <= FLOOR_GOAL)
    }; REST - floor p50 = ${ms(s.rest.p50 - s.floor.p50)} ms; noise: 90% bootstrap interval ${
      low.toFixed(3)
    }-${high.toFixed(3)}, median of per-round ratios ${paired.p50.toFixed(3)}`,
  );
  for (const m of ["exec", "execResume"] as const) {
    if (s[m].n === 0) continue;
    const ratio = s[m].p50 / s.rest.p50;
    lines.push(
      `${m === "exec" ? "exec" : "exec resume"} p50 / REST p50 = ${
        ratio.toFixed(1)
      }x (goal >= ${EXEC_GOAL}x): ${verdict(ratio >= EXEC_GOAL)}`,
    );
  }
  if (s.cold.n > 0) {
    lines.push(
      `cold REST p50 ${ms(s.cold.p50)} ms = ${(s.cold.p50 / s.rest.p50).toFixed(1)}x warm REST ` +
        `p50 (+${ms(s.cold.p50 - s.rest.p50)} ms: spawn, /readyz, dial, thread/start)` +
        (s.coldFloor.n > 0
          ? `; cold floor p50 ${ms(s.coldFloor.p50)} ms, cold REST / cold floor = ${
            (s.cold.p50 / s.coldFloor.p50).toFixed(2)
          }`
          : ""),
    );
  }

  // Where the REST time goes: the broker's own turn time (its log) and codex's (Turn.durationMs).
  const inBroker = stats(result.restInBroker);
  const cpu = result.cpuMsPerTurn;
  const codexRest = stats(result.codexTurnMs.rest);
  const codexFloor = stats(result.codexTurnMs.floor);
  const breakdown = table(
    ["p50 ms", "rest", "floor"],
    [
      ["client wall time", ms(s.rest.p50), ms(s.floor.p50)],
      ["broker handler (its 'turn' log, whole ms)", ms(inBroker.p50), "-"],
      [
        "wall - broker handler (median of per-turn)",
        ms(stats(samples.rest.map((v, i) => v - (result.restInBroker[i] ?? NaN))).p50),
        "-",
      ],
      ["GET /healthz round trip (no codex)", ms(stats(result.healthz).p50), "-"],
      ["codex Turn.durationMs", ms(codexRest.p50), ms(codexFloor.p50)],
      [
        "broker handler - codex Turn.durationMs (median of per-turn)",
        ms(stats(result.restInBroker.map((v, i) => v - (result.codexTurnMs.rest[i] ?? NaN))).p50),
        "-",
      ],
      [
        "wall - codex Turn.durationMs (median of per-turn)",
        ms(stats(samples.rest.map((v, i) => v - (result.codexTurnMs.rest[i] ?? NaN))).p50),
        ms(stats(samples.floor.map((v, i) => v - (result.codexTurnMs.floor[i] ?? NaN))).p50),
      ],
      [
        "CPU per turn (mean): bench process (client + mock model)",
        ms(cpu.rest.bench),
        ms(cpu.floor.bench),
      ],
      ["CPU per turn (mean): broker", ms(cpu.rest.broker), "-"],
      ["CPU per turn (mean): codex app-server", ms(cpu.rest.codex), ms(cpu.floor.codex)],
    ],
  );
  const phases = `setup ${(phasesMs.setup / 1000).toFixed(1)} s, warm-up ${
    (phasesMs.warmup / 1000).toFixed(1)
  } s, measured ${(phasesMs.measured / 1000).toFixed(1)} s, teardown ${
    (phasesMs.teardown / 1000).toFixed(1)
  } s; broker exit after SIGTERM: ${result.brokerExit}`;
  return `${title}\n\n${main}\n\n${lines.join("\n")}\n\n${breakdown}\n${phases}\n`;
}

if (import.meta.main) {
  const result = await runCodexLatency(codexLatencyConfig());
  console.log(formatCodexLatency(result));
}

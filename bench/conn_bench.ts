/**
 * `Conn.turn()` throughput and latency next to a minimal hand-written client (the floor),
 * against the fake app-server answering at once. Runs unchanged on Deno, Bun and Node 22;
 * `bench/main.ts` runs it on all three.
 *
 * ```sh
 * node_modules/.bin/deno run -A bench/conn_bench.ts            # in-process fake server, table
 * node_modules/.bin/bun bench/conn_bench.ts --url ws://… --json  # as main.ts runs it
 * ```
 *
 * Each cell (concurrency 1, 16, 256) gives both clients one connection each, with one
 * thread per worker; every worker runs turns one after another on its own thread. Both
 * clients warm up, then run `BENCH_ROUNDS` rounds of `BENCH_ROUND_MS` each, alternating
 * which client goes first so drift (GC, JIT, other load on the machine) does not favour one.
 * Throughput is the median round's; latency percentiles pool every measured turn. The
 * warm-up also absorbs Deno's first exchange after a burst of sends, which can stall ~40 ms
 * (its WebSocket client does not set TCP_NODELAY: Nagle meets delayed ACK); a stall that
 * slipped into a measured round shows as "max ms".
 * Environment: `BENCH_ROUNDS` (4), `BENCH_ROUND_MS` (750), `BENCH_WARMUP_MS` (400),
 * `BENCH_CONCURRENCY` (`1,16,256`).
 *
 * @module
 */

import process from "node:process";
import { Conn, type Turn } from "../mod.ts";
import { CPU_METHOD, type ServerCpu } from "./_control.ts";
import { MinimalClient } from "./_minimal_client.ts";
import {
  type CellResult,
  type ClientResult,
  formatRuntime,
  percentile,
  RESULT_MARKER,
  type RuntimeResult,
  Samples,
} from "./_stats.ts";

const TURN_PARAMS = { input: [{ type: "text", text: "bench", text_elements: [] }] };

interface BenchClient {
  readonly name: "broker" | "minimal";
  readonly threads: string[];
  turn(threadId: string): Promise<unknown>;
  close(): void;
}

interface RoundResult {
  turns: number;
  wallMs: number;
  cpuUs: number;
  serverCpuUs: number | null;
}

function envInt(name: string, fallback: number): number {
  const raw = process.env[name];
  if (raw === undefined || raw === "") return fallback;
  const value = Number(raw);
  if (!Number.isInteger(value) || value <= 0) {
    throw new TypeError(`${name} must be a positive integer, got "${raw}"`);
  }
  return value;
}

function argValue(args: string[], name: string): string | undefined {
  const index = args.indexOf(name);
  return index === -1 ? undefined : args[index + 1];
}

async function brokerClient(url: string, threadCount: number): Promise<BenchClient> {
  const conn = await Conn.dial(url);
  const threads: string[] = [];
  for (let i = 0; i < threadCount; i++) threads.push(await conn.startThread());
  return {
    name: "broker",
    threads,
    turn: (threadId) => conn.turn(threadId, TURN_PARAMS),
    close: () => conn.close(),
  };
}

async function minimalClient(url: string, threadCount: number): Promise<BenchClient> {
  const client = await MinimalClient.connect(url);
  const threads: string[] = [];
  for (let i = 0; i < threadCount; i++) threads.push(await client.startThread());
  return {
    name: "minimal",
    threads,
    turn: (threadId) => client.turn(threadId, TURN_PARAMS),
    close: () => client.close(),
  };
}

// A bench that measures an error path, or a turn the fake did not complete, measures nothing.
async function assertRealExchange(broker: BenchClient, minimal: BenchClient): Promise<void> {
  const threadId = broker.threads[0];
  const minimalThreadId = minimal.threads[0];
  if (threadId === undefined || minimalThreadId === undefined) throw new Error("no threads");
  const turn = await broker.turn(threadId) as Turn;
  if (turn.status !== "completed" || turn.itemsView !== "full" || turn.items.length !== 2) {
    throw new Error(`broker turn is not a completed codex turn: ${JSON.stringify(turn)}`);
  }
  const floor = await minimal.turn(minimalThreadId) as Turn;
  if (floor.status !== "completed") {
    throw new Error(`minimal turn is not a completed codex turn: ${JSON.stringify(floor)}`);
  }
}

async function runRound(
  client: BenchClient,
  concurrency: number,
  durationMs: number,
  samples: Samples | undefined,
  serverCpu: (() => Promise<number>) | undefined,
): Promise<RoundResult> {
  const threads = client.threads.slice(0, concurrency);
  const serverBefore = serverCpu ? await serverCpu() : 0;
  const cpuBefore = process.cpuUsage();
  const start = performance.now();
  const end = start + durationMs;
  let turns = 0;
  await Promise.all(threads.map(async (threadId) => {
    while (performance.now() < end) {
      const t0 = performance.now();
      await client.turn(threadId);
      samples?.push(performance.now() - t0);
      turns++;
    }
  }));
  const wallMs = performance.now() - start;
  const cpu = process.cpuUsage(cpuBefore);
  const serverCpuUs = serverCpu ? (await serverCpu()) - serverBefore : null;
  return { turns, wallMs, cpuUs: cpu.user + cpu.system, serverCpuUs };
}

interface Accumulator {
  samples: Samples;
  rounds: RoundResult[];
}

// One round disturbed by something else on the machine moves a median less than a mean.
function median(values: number[]): number {
  const sorted = values.toSorted((a, b) => a - b);
  const mid = sorted.length >> 1;
  return sorted.length % 2 === 1
    ? sorted[mid] ?? NaN
    : ((sorted[mid - 1] ?? NaN) + (sorted[mid] ?? NaN)) / 2;
}

function summarize(acc: Accumulator): ClientResult {
  const sorted = acc.samples.sorted();
  let turns = 0;
  let wallMs = 0;
  let cpuUs = 0;
  let serverCpuUs: number | null = 0;
  for (const round of acc.rounds) {
    turns += round.turns;
    wallMs += round.wallMs;
    cpuUs += round.cpuUs;
    serverCpuUs = serverCpuUs === null || round.serverCpuUs === null
      ? null
      : serverCpuUs + round.serverCpuUs;
  }
  const roundTurnsPerSec = acc.rounds.map((r) => r.turns / (r.wallMs / 1000));
  return {
    turns,
    turnsPerSec: median(roundTurnsPerSec),
    p50Ms: percentile(sorted, 50),
    p99Ms: percentile(sorted, 99),
    maxMs: percentile(sorted, 100),
    roundTurnsPerSec,
    cpuUsPerTurn: cpuUs / turns,
    clientCpuPct: (cpuUs / (wallMs * 1000)) * 100,
    serverCpuPct: serverCpuUs === null ? null : (serverCpuUs / (wallMs * 1000)) * 100,
  };
}

async function main(): Promise<void> {
  const args = process.argv.slice(2);
  const json = args.includes("--json");
  const rounds = envInt("BENCH_ROUNDS", 4);
  const roundMs = envInt("BENCH_ROUND_MS", 750);
  const warmupMs = envInt("BENCH_WARMUP_MS", 400);
  const levels = (process.env.BENCH_CONCURRENCY ?? "1,16,256").split(",").map(Number);
  if (levels.some((c) => !Number.isInteger(c) || c <= 0)) {
    throw new TypeError(`BENCH_CONCURRENCY must list positive integers, got "${levels}"`);
  }
  const runtime = navigator.userAgent;
  const began = performance.now();

  let url = argValue(args, "--url");
  let closeServer: (() => Promise<void>) | undefined;
  if (url === undefined) {
    // Standalone convenience only; main.ts runs the server in its own process (see there).
    const { startBenchServer } = await import("./_fake_server.ts");
    const server = await startBenchServer();
    url = server.url;
    closeServer = () => server.close();
  }

  const threadCount = Math.max(...levels);
  const broker = await brokerClient(url, threadCount);
  const minimal = await minimalClient(url, threadCount);
  const control = closeServer ? undefined : await MinimalClient.connect(url);
  const serverCpu = control
    ? async () => {
      const { user, system } = await control.call(CPU_METHOD, null) as ServerCpu;
      return user + system;
    }
    : undefined;
  await assertRealExchange(broker, minimal);

  const cells: CellResult[] = [];
  for (const concurrency of levels) {
    console.error(`${runtime}: concurrency ${concurrency}`);
    for (const client of [broker, minimal]) {
      await runRound(client, concurrency, warmupMs, undefined, undefined);
    }
    const brokerAcc: Accumulator = { samples: new Samples(), rounds: [] };
    const minimalAcc: Accumulator = { samples: new Samples(), rounds: [] };
    const order: [BenchClient, Accumulator][] = [[broker, brokerAcc], [minimal, minimalAcc]];
    for (let r = 0; r < rounds; r++) {
      for (const [client, acc] of r % 2 === 0 ? order : order.toReversed()) {
        acc.rounds.push(await runRound(client, concurrency, roundMs, acc.samples, serverCpu));
      }
    }
    cells.push({ concurrency, broker: summarize(brokerAcc), minimal: summarize(minimalAcc) });
  }

  broker.close();
  minimal.close();
  control?.close();
  await closeServer?.();
  const result: RuntimeResult = {
    runtime,
    server: closeServer ? "inprocess" : "process",
    rounds,
    roundMs,
    warmupMs,
    cells,
    totalMs: performance.now() - began,
  };
  console.log(json ? `${RESULT_MARKER}${JSON.stringify(result)}` : formatRuntime(result));
}

try {
  await main();
  process.exit(0);
} catch (error) {
  console.error(error);
  process.exit(1);
}

/**
 * P5 (issue 10, section 5): 10,000 pooled idle connections. Per runtime (Deno, Bun,
 * Node 22), against one Node 22 process of fake app-servers (`bench/_idle_fake.ts`, eight
 * listeners that answer `initialize` and then leave the connections idle):
 *
 * - `bench/p5_pool.ts --mode raw`: 10,000 plain `WebSocket`s, each with the same `initialize`
 *   exchange and nothing more: the runtime's own cost;
 * - `bench/p5_pool.ts --mode pool`: a `Pool` dialing 10,000 workspaces (a `Conn` each,
 *   handshake included), RSS before and after (forced GC), then the reaper's sweep timed:
 *   20 sweeps with nothing to reap, and, with all 10,000 due, the first sweep and the
 *   time until the pool is empty. Twice: with the runtime's `WebSocket` (`--client web`,
 *   the library's default) and with the service's own client on `node:net` (`--client
 *   net`, what `src/main.ts` dials with by default).
 *
 * It prints the pool's RSS growth against the goal {@linkcode P5_RSS_GOAL_MB} MB and beside
 * the raw sockets' growth, and the sweep times against {@linkcode P5_SWEEP_GOAL_MS} ms.
 *
 * ```sh
 * npm run bench -- p5
 * BENCH_P5_RUNTIMES=node BENCH_P5_CONNECTIONS=2000 npm run bench -- p5
 * ```
 *
 * Environment: `BENCH_P5_CONNECTIONS` (10000), `BENCH_P5_RUNTIMES` (`deno,bun,node`).
 *
 * @module
 */

import type { P5Result } from "./p5_pool.ts";
import {
  BENCH_RUNTIMES,
  type BenchRuntime,
  loadText,
  ROOT,
  runtimeCommand,
  startAnnouncing,
} from "./_procs.ts";
import { envInt, ms, percentile, RESULT_MARKER, table } from "./_stats.ts";

/** The goal: the pool's RSS growth with 10,000 idle connections stays below this. */
export const P5_RSS_GOAL_MB = 200;
/** The goal: one reaper sweep takes less than this. */
export const P5_SWEEP_GOAL_MS = 10;

/** What to run. */
export interface P5Config {
  connections: number;
  runtimes: BenchRuntime[];
}

/** One runtime's run. */
export interface P5Run {
  runtime: BenchRuntime;
  /** The pool's WebSocket client: the runtime's (`web`) or the service's own (`net`). */
  client: "web" | "net";
  raw: P5Result | string;
  pool: P5Result | string;
  load: string;
}

/**
 * Reads the configuration from the environment.
 *
 * @returns The configuration.
 * @throws {TypeError} If a variable is not valid.
 */
export function p5Config(): P5Config {
  const raw = Deno.env.get("BENCH_P5_RUNTIMES") || BENCH_RUNTIMES.join(",");
  const names = raw.split(",").map((r) => r.trim()).filter((r) => r !== "");
  const runtimes = names.filter((r): r is BenchRuntime =>
    (BENCH_RUNTIMES as readonly string[]).includes(r)
  );
  if (runtimes.length !== names.length || runtimes.length === 0) {
    throw new TypeError(
      `BENCH_P5_RUNTIMES must list some of ${BENCH_RUNTIMES.join(",")}, got "${raw}"`,
    );
  }
  return { connections: envInt("BENCH_P5_CONNECTIONS", 10_000, 1), runtimes };
}

async function runMode(
  runtime: BenchRuntime,
  mode: "raw" | "pool",
  urls: string[],
  config: P5Config,
  client: "web" | "net" = "web",
): Promise<P5Result> {
  const flags = runtime === "node"
    ? ["--expose-gc"]
    : runtime === "deno"
    ? ["--v8-flags=--expose-gc"]
    : [];
  const [binary, args] = runtimeCommand(
    runtime,
    "bench/p5_pool.ts",
    [
      "--urls",
      urls.join(","),
      "--count",
      String(config.connections),
      "--mode",
      mode,
      "--client",
      client,
    ],
    flags,
  );
  const output = await new Deno.Command(binary, {
    args,
    cwd: ROOT,
    stdout: "piped",
    stderr: "inherit",
    signal: AbortSignal.timeout(5 * 60_000),
  }).output();
  const stdout = new TextDecoder().decode(output.stdout);
  const line = stdout.split("\n").find((l) => l.startsWith(RESULT_MARKER));
  if (!output.success || line === undefined) {
    throw new Error(`p5 ${mode} failed (exit ${output.code}): ${stdout.trim()}`);
  }
  return JSON.parse(line.slice(RESULT_MARKER.length)) as P5Result;
}

/**
 * Runs P5 on each runtime of the configuration.
 *
 * @param config What to run.
 * @returns Each runtime's run.
 */
export async function runP5(config: P5Config): Promise<P5Run[]> {
  const runs: P5Run[] = [];
  for (const runtime of config.runtimes) {
    const fake = await startAnnouncing<{ urls: string[] }>(
      "bench/_idle_fake.ts",
      ["--ports", "8"],
      {
        killAfterMs: 10_000,
      },
    );
    const message = (error: unknown) => error instanceof Error ? error.message : String(error);
    try {
      const raw = await runMode(runtime, "raw", fake.info.urls, config).catch(message);
      for (const client of ["web", "net"] as const) {
        const pool = await runMode(runtime, "pool", fake.info.urls, config, client)
          .catch(message);
        runs.push({ runtime, client, raw, pool, load: loadText() });
      }
    } finally {
      await fake.stop();
    }
  }
  return runs;
}

/**
 * Formats the P5 runs.
 *
 * @param runs The runs.
 * @param config What ran.
 * @returns The text.
 */
export function formatP5(runs: P5Run[], config: P5Config): string {
  const growth = (r: P5Result | string) =>
    typeof r === "string" ? NaN : r.openRssMb - r.baselineRssMb;
  const rows = runs.map((run) => {
    const pool = typeof run.pool === "string" ? undefined : run.pool;
    const poolGrowth = growth(run.pool);
    const rawGrowth = growth(run.raw);
    const sweeps = Float64Array.from(pool?.idleSweepsMs ?? []).sort();
    const idleP50 = percentile(sweeps, 50);
    const idleMax = sweeps.length > 0 ? sweeps[sweeps.length - 1]! : NaN;
    return [
      `${run.runtime} (${run.client})`,
      pool ? `${pool.baselineRssMb.toFixed(0)} -> ${pool.openRssMb.toFixed(0)}` : "-",
      `${poolGrowth.toFixed(0)} (${(poolGrowth * 1024 / config.connections).toFixed(1)} KB/conn)`,
      `${rawGrowth.toFixed(0)} (${(rawGrowth * 1024 / config.connections).toFixed(1)} KB/conn)`,
      (poolGrowth / rawGrowth).toFixed(2),
      poolGrowth < P5_RSS_GOAL_MB ? "met" : "not met",
      `${ms(idleP50)} / ${ms(idleMax)}`,
      `${ms(pool?.reapSweepMs ?? NaN)} / ${ms(pool?.reapAllMs ?? NaN)}`,
      Math.max(idleP50, pool?.reapSweepMs ?? NaN) < P5_SWEEP_GOAL_MS ? "met" : "not met",
      pool ? `${(pool.openMs / 1000).toFixed(1)} s` : "-",
    ];
  });
  const lines = [
    `P5: ${config.connections} idle pooled connections (Conn + handshake each) against fake ` +
    "app-servers in a Node 22 process; RSS after a forced GC",
    "",
    table(
      [
        "runtime",
        "pool RSS MB",
        "pool growth MB",
        "raw WebSocket growth MB",
        "pool/raw",
        `goal <${P5_RSS_GOAL_MB} MB`,
        "idle sweep p50/max ms",
        "reap-all: first sweep / all ms",
        `goal <${P5_SWEEP_GOAL_MS} ms`,
        "dial all",
      ],
      rows,
    ),
  ];
  for (const run of runs) {
    const name = `${run.runtime} (${run.client})`;
    if (typeof run.pool === "string") lines.push(`${name} pool: failed: ${run.pool}`);
    else if (run.pool.entriesAfterReap !== 0) {
      lines.push(`${name}: ${run.pool.entriesAfterReap} entries left after the reap`);
    }
    if (typeof run.raw === "string") lines.push(`${run.runtime} raw: failed: ${run.raw}`);
    lines.push(
      `${name}: GC ${typeof run.pool === "string" ? "-" : run.pool.gc}; ${run.load}`,
    );
  }
  lines.push(
    "The sweep goal is read on the median idle sweep (the one every interval pays; the max " +
      "shows preemption by other load) and on the first sweep of the reap-all, which closes " +
      "a batch of 100 and queues the rest.",
  );
  return lines.join("\n");
}

if (import.meta.main) {
  const config = p5Config();
  console.log(formatP5(await runP5(config), config));
}

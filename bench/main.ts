/**
 * `npm run bench` (`deno run -A bench/main.ts`) runs these benches, one after the other:
 *
 * 1. **Conn throughput** (`bench/conn_bench.ts`) on Deno, Bun and Node 22, one runtime
 *    after the other, against a fake app-server; it prints each runtime's table, then the
 *    broker/minimal ratios side by side.
 * 2. **codex latency** (`bench/codex_latency.ts`, "codex"): the real codex on the loopback
 *    model, sequential turns on one thread through the broker over REST, through a minimal
 *    WebSocket client straight to an app-server (the floor), and through `codex exec` per
 *    turn, plus the cold first turn of a new workspace. It prints the p50s (p90/p99 where
 *    the sample count allows), REST/floor (goal <= 1.05) and exec/REST (goal >= 4x) with
 *    "goal met" or "not met", the cold p50 against the warm one, and where the broker's
 *    time goes. About 20 s.
 * 3. **Scale-out** (`bench/scale_out.ts`, "scaleout"): three Deno brokers on one shared
 *    workspaces dir behind nginx with the shipped `deploy/nginx.conf`, the real codex on the
 *    loopback model. Turn p50 through nginx against straight to the owner broker, on one
 *    thread, interleaved (goal <= 1.05x), and the failover time from `kill -9` of a
 *    workspace's owner to its first successful turn through nginx (goal <= lease TTL + 2 s),
 *    split into the lease wait and the cold start on the new broker, with the thread kept.
 *    About a minute and a half.
 * 4. **Long run** (`bench/long_run.ts`, "longrun"): per runtime (Node 22, Deno, Bun), the
 *    broker (`src/main.ts`) and a hello-world srvx server side by side, each as a subprocess
 *    loaded by a Node 22 client process with 100,000 POSTs to `/api/turns` with a wrong
 *    secret (answered 401) at concurrency 32 on keep-alive connections. It prints RSS growth,
 *    the 10k-request windows (first, median, slowest, last; last/first and slowest/median),
 *    failed requests and whether one SIGTERM stopped the server, then the broker against the
 *    goals of issue 7 (RSS growth <= hello's + 60 MB, no window > 3x the median, no failed
 *    request, SIGTERM stops it) with "goal met" or "not met". About a minute per runtime,
 *    more while the Node broker stalls (47-113 s for Node alone before the fix).
 *
 * 5. **Soak** (`bench/soak.ts`, "soak"): per runtime, 10,000 REST turns through the real
 *    handler over HTTP against a fake app-server, 10% timing out and 10% aborted by the
 *    client; RSS, the pool's and connections' pending maps, open fds and active resources
 *    at start, after a warm-up and at the end, which must be back at the warm-up's.
 * 6. **P4** (`bench/p4.ts`, "p4"): per runtime, REST throughput with an instantly answering
 *    fake codex (`--codex`), `wrk -c64`, a new thread per request, against the lower of a
 *    hello-world srvx server and a minimal ws client doing the same exchange (goal >= 0.5).
 *    Needs `wrk` (Debian: `apt-get install wrk`).
 * 7. **P5** (`bench/p5.ts`, "p5"): per runtime, 10,000 pooled idle connections: RSS growth
 *    (goal < 200 MB) beside 10,000 plain WebSockets, and the reaper's sweep (goal < 10 ms).
 *
 * Options: arguments pick the parts, in any order; none runs everything.
 *
 * ```sh
 * npm run bench                     # everything: Conn bench, codex latency, scale-out, long run
 * npm run bench -- codex            # codex latency only
 * npm run bench -- deno node        # Conn bench on these runtimes only (no codex, no long run)
 * npm run bench -- bun codex        # Conn bench on bun, then codex latency
 * npm run bench -- scaleout         # scale-out only
 * npm run bench -- longrun          # long run only
 * BENCH_LONGRUN_RUNTIMES=node npm run bench -- longrun   # long run on Node 22 only
 * npm run bench -- soak p4 p5       # soak, P4 throughput, P5 idle connections
 * ```
 *
 * Soak, P4 and P5 read `BENCH_SOAK_*`, `BENCH_P4_*` and `BENCH_P5_*` (see their modules;
 * `*_RUNTIMES` picks the runtimes of each).
 *
 * The `BENCH_*` variables of `conn_bench.ts` (`BENCH_ROUNDS`, `BENCH_ROUND_MS`,
 * `BENCH_WARMUP_MS`, `BENCH_CONCURRENCY`, and `BENCH_SERVER` below) and of
 * `codex_latency.ts` (`BENCH_CODEX_WARMUP`, `BENCH_CODEX_TURNS`, `BENCH_CODEX_EXEC`,
 * `BENCH_CODEX_COLD`) pass through, and so do those of `scale_out.ts`
 * (`BENCH_SCALEOUT_TURNS`, `BENCH_SCALEOUT_WARMUP`, `BENCH_SCALEOUT_KILLS`,
 * `BENCH_SCALEOUT_LEASE_TTL`) and of `long_run.ts`:
 * `BENCH_LONGRUN_REQUESTS` (100000 measured requests per server, in windows of 10,000),
 * `BENCH_LONGRUN_CONCURRENCY` (32) and `BENCH_LONGRUN_RUNTIMES` (`node,deno,bun`; the
 * runtimes the long run starts its servers on, independent of the Conn bench's arguments).
 *
 * In the Conn bench, the fake app-server runs in its own process (Node 22, a fresh one per
 * runtime), not in the client's: in one process the server's work (parsing each
 * turn/start, serializing five frames back) shares the client's event loop and CPU. That
 * adds the same cost to both clients and so pulls the ratio towards 1, hiding part of the
 * broker's overhead (in one Deno run at concurrency 256: 0.81 in-process, 0.66 in its own
 * process). It is also the same server, on the same runtime, for all three client
 * runtimes. The price: the numbers need two free cores, so other load on the machine shows
 * up in turns/s; the CPU per turn column is the steadier comparison.
 * `BENCH_SERVER=inprocess` runs the server in the client's process instead.
 *
 * @module
 */

import { codexLatencyConfig, formatCodexLatency, runCodexLatency } from "./codex_latency.ts";
import { formatLongRun, type LongRunConfig, longRunConfig, runLongRun } from "./long_run.ts";
import { formatScaleOut, runScaleOut, type ScaleOutConfig, scaleOutConfig } from "./scale_out.ts";
import { formatSoak, runSoak, type SoakConfig, soakConfig } from "./soak.ts";
import { formatP4, type P4Config, p4Config, runP4 } from "./p4.ts";
import { formatP5, type P5Config, p5Config, runP5 } from "./p5.ts";
import { formatRuntime, GOAL_RATIO, RESULT_MARKER, type RuntimeResult } from "./_stats.ts";
import {
  BENCH_RUNTIMES,
  type BenchRuntime,
  ROOT,
  runtimeCommand,
  startAnnouncing,
} from "./_procs.ts";

const RUNTIMES = BENCH_RUNTIMES;
type Runtime = BenchRuntime;
/** The argument that selects the real-codex latency run. */
const CODEX = "codex";
/** The argument that selects the scale-out run. */
const SCALEOUT = "scaleout";
/** The argument that selects the long run. */
const LONGRUN = "longrun";
/** The arguments that select the soak, P4 and P5 (issue 10, section 5). */
const SOAK = "soak";
const P4 = "p4";
const P5 = "p5";

// Far above a normal run (about 20 s per runtime): only a hung run should hit it.
const RUNTIME_TIMEOUT_MS = 3 * 60_000;
const SERVER_START_TIMEOUT_MS = 30_000;

async function runOne(runtime: Runtime, inProcess: boolean): Promise<RuntimeResult> {
  const server = inProcess ? undefined : await startAnnouncing<{ url: string }>(
    "bench/server_process.ts",
    [],
    { timeoutMs: SERVER_START_TIMEOUT_MS },
  );
  try {
    const [binary, args] = runtimeCommand(runtime, "bench/conn_bench.ts");
    const output = await new Deno.Command(binary, {
      args: [...args, "--json", ...(server ? ["--url", server.info.url] : [])],
      cwd: ROOT,
      stdout: "piped",
      stderr: "inherit",
      signal: AbortSignal.timeout(RUNTIME_TIMEOUT_MS),
    }).output();
    const stdout = new TextDecoder().decode(output.stdout);
    const line = stdout.split("\n").find((l) => l.startsWith(RESULT_MARKER));
    if (!output.success || line === undefined) {
      throw new Error(
        `${runtime} bench failed (exit ${output.code}${
          output.signal ? `, ${output.signal}` : ""
        })` +
          (stdout.trim() ? `:\n${stdout.trim()}` : ""),
      );
    }
    return JSON.parse(line.slice(RESULT_MARKER.length)) as RuntimeResult;
  } finally {
    await server?.stop();
  }
}

function summary(results: RuntimeResult[]): string {
  const levels = [...new Set(results.flatMap((r) => r.cells.map((c) => c.concurrency)))];
  const header = ["conc", ...results.map((r) => r.runtime)];
  const rows = levels.map((concurrency) => [
    String(concurrency),
    ...results.map((r) => {
      const cell = r.cells.find((c) => c.concurrency === concurrency);
      if (!cell) return "-";
      const ratio = cell.broker.turnsPerSec / cell.minimal.turnsPerSec;
      const cpu = cell.minimal.cpuUsPerTurn / cell.broker.cpuUsPerTurn;
      return `${ratio.toFixed(2)} ${ratio >= GOAL_RATIO ? "met" : "not met"} (CPU ${
        cpu.toFixed(2)
      })`;
    }),
  ]);
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]?.length ?? 0)));
  const line = (cells: string[]) =>
    cells.map((c, i) => (i === 0 ? c.padEnd(widths[i] ?? 0) : c.padStart(widths[i] ?? 0)))
      .join("  ");
  return [
    `broker/minimal throughput, goal >=${
      GOAL_RATIO.toFixed(2)
    } (CPU: minimal/broker CPU per turn):`,
    line(header),
    widths.map((w) => "-".repeat(w)).join("  "),
    ...rows.map(line),
  ].join("\n");
}

async function main(): Promise<number> {
  const began = performance.now();
  const parts: readonly string[] = [...RUNTIMES, CODEX, SCALEOUT, LONGRUN, SOAK, P4, P5];
  const wanted = Deno.args.length > 0 ? Deno.args : parts;
  const unknown = wanted.filter((r) => !parts.includes(r));
  if (unknown.length > 0) {
    console.error(`Unknown part(s) ${unknown.join(", ")}; expected some of ${parts.join(", ")}`);
    return 2;
  }
  const runtimes = RUNTIMES.filter((r) => wanted.includes(r));
  let scaleOut: ScaleOutConfig | undefined;
  let longRun: LongRunConfig | undefined;
  let soak: SoakConfig | undefined;
  let p4: P4Config | undefined;
  let p5: P5Config | undefined;
  try {
    // Read first: a bad variable should not wait for the other benches to surface.
    if (wanted.includes(SCALEOUT)) scaleOut = scaleOutConfig();
    if (wanted.includes(LONGRUN)) longRun = longRunConfig();
    if (wanted.includes(SOAK)) soak = soakConfig();
    if (wanted.includes(P4)) p4 = p4Config();
    if (wanted.includes(P5)) p5 = p5Config();
  } catch (error) {
    console.error(error instanceof Error ? error.message : error);
    return 2;
  }
  const inProcess = Deno.env.get("BENCH_SERVER") === "inprocess";
  const results: RuntimeResult[] = [];
  let failed = 0;
  for (const runtime of runtimes) {
    try {
      const result = await runOne(runtime, inProcess);
      results.push(result);
      console.log(formatRuntime(result));
    } catch (error) {
      failed++;
      console.error(`=== ${runtime}: ${error instanceof Error ? error.message : error}\n`);
    }
  }
  if (results.length > 0) console.log(summary(results));
  if (wanted.includes(CODEX)) {
    if (runtimes.length > 0) console.log("");
    try {
      console.log(formatCodexLatency(await runCodexLatency(codexLatencyConfig())));
    } catch (error) {
      failed++;
      console.error(`=== codex latency: ${error instanceof Error ? error.message : error}\n`);
    }
  }
  if (scaleOut) {
    if (runtimes.length > 0 || wanted.includes(CODEX)) console.log("");
    try {
      console.log(formatScaleOut(await runScaleOut(scaleOut)));
    } catch (error) {
      failed++;
      console.error(`=== scale-out: ${error instanceof Error ? error.message : error}\n`);
    }
  }
  if (longRun) {
    if (runtimes.length > 0 || wanted.includes(CODEX) || scaleOut) console.log("");
    try {
      const result = await runLongRun(longRun);
      console.log(formatLongRun(result));
      for (const run of result.runs) {
        for (const error of [run.broker.error, run.hello.error]) {
          if (error === null) continue;
          failed++;
          console.error(`=== long run: ${error}\n`);
        }
      }
    } catch (error) {
      failed++;
      console.error(`=== long run: ${error instanceof Error ? error.message : error}\n`);
    }
  }
  if (soak) {
    console.log("");
    try {
      const runs = await runSoak(soak);
      console.log(formatSoak(runs, soak));
      for (const run of runs) {
        if (run.error !== null || run.settleMs === null) failed++;
      }
    } catch (error) {
      failed++;
      console.error(`=== soak: ${error instanceof Error ? error.message : error}\n`);
    }
  }
  if (p4) {
    console.log("");
    try {
      console.log(formatP4(await runP4(p4), p4));
    } catch (error) {
      failed++;
      console.error(`=== p4: ${error instanceof Error ? error.message : error}\n`);
    }
  }
  if (p5) {
    console.log("");
    try {
      console.log(formatP5(await runP5(p5), p5));
    } catch (error) {
      failed++;
      console.error(`=== p5: ${error instanceof Error ? error.message : error}\n`);
    }
  }
  console.log(`\nbench took ${((performance.now() - began) / 1000).toFixed(1)} s`);
  return failed > 0 ? 1 : 0;
}

Deno.exit(await main());

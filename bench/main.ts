/**
 * `npm run bench` (`deno run -A bench/main.ts`): runs `bench/conn_bench.ts` on Deno, Bun and
 * Node 22, one runtime after the other, and prints each runtime's table, then the
 * broker/minimal ratios side by side.
 *
 * The fake app-server runs in its own process (Node 22, a fresh one per runtime), not in the
 * client's: in one process the server's work (parsing each turn/start, serializing five
 * frames back) shares the client's event loop and CPU. That adds the same cost to both
 * clients and so pulls the ratio towards 1, hiding part of the broker's overhead (in one
 * Deno run at concurrency 256: 0.81 in-process, 0.66 in its own process). It is also the
 * same server, on the same runtime, for all three client runtimes. The price: the numbers
 * need two free cores, so other load on the machine shows up in turns/s; the CPU per turn
 * column is the steadier comparison. `BENCH_SERVER=inprocess` runs the server in the
 * client's process instead.
 *
 * Arguments pick runtimes (`npm run bench -- deno node`); the `BENCH_*` variables of
 * `conn_bench.ts` pass through.
 *
 * @module
 */

import { formatRuntime, GOAL_RATIO, RESULT_MARKER, type RuntimeResult } from "./_stats.ts";

const ROOT = decodeURIComponent(new URL("..", import.meta.url).pathname).replace(/\/$/, "");
const BIN = `${ROOT}/node_modules/.bin`;
const RUNTIMES = ["deno", "bun", "node"] as const;
type Runtime = typeof RUNTIMES[number];

// Far above a normal run (about 20 s per runtime): only a hung run should hit it.
const RUNTIME_TIMEOUT_MS = 3 * 60_000;
const SERVER_START_TIMEOUT_MS = 30_000;

function clientCommand(runtime: Runtime): [string, string[]] {
  const script = "bench/conn_bench.ts";
  switch (runtime) {
    case "deno":
      return [`${BIN}/deno`, ["run", "-A", script]];
    case "bun":
      return [`${BIN}/bun`, [script]];
    case "node":
      // The global `node` is Node 20, which cannot run .ts files; this one is Node 22.
      return [`${BIN}/node`, [script]];
  }
}

/** A fake server process; `stop()` closes its stdin, on which it exits. */
interface ServerProcess {
  url: string;
  stop(): Promise<void>;
}

async function startServer(): Promise<ServerProcess> {
  const child = new Deno.Command(`${BIN}/node`, {
    args: ["bench/server_process.ts"],
    cwd: ROOT,
    stdin: "piped",
    stdout: "piped",
    stderr: "inherit",
  }).spawn();
  const stop = async () => {
    await child.stdin.close().catch(() => {});
    const timer = setTimeout(() => child.kill("SIGKILL"), 5_000);
    await child.status;
    clearTimeout(timer);
  };
  const reader = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
  const timer = setTimeout(() => child.kill("SIGKILL"), SERVER_START_TIMEOUT_MS);
  try {
    let text = "";
    while (!text.includes("\n")) {
      const { value, done } = await reader.read();
      if (done) throw new Error("fake server exited before printing its URL");
      text += value;
    }
    const { url } = JSON.parse(text.slice(0, text.indexOf("\n"))) as { url: string };
    return { url, stop };
  } catch (error) {
    await stop();
    throw error;
  } finally {
    clearTimeout(timer);
    // It prints nothing more; releasing the pipe keeps it from holding the bench open.
    await reader.cancel().catch(() => {});
  }
}

async function runOne(runtime: Runtime, inProcess: boolean): Promise<RuntimeResult> {
  const server = inProcess ? undefined : await startServer();
  try {
    const [binary, args] = clientCommand(runtime);
    const output = await new Deno.Command(binary, {
      args: [...args, "--json", ...(server ? ["--url", server.url] : [])],
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
  const wanted = Deno.args.length > 0 ? Deno.args : [...RUNTIMES];
  const unknown = wanted.filter((r) => !(RUNTIMES as readonly string[]).includes(r));
  if (unknown.length > 0) {
    console.error(`Unknown runtime(s) ${unknown.join(", ")}; expected ${RUNTIMES.join(", ")}`);
    return 2;
  }
  const runtimes = RUNTIMES.filter((r) => wanted.includes(r));
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
  console.log(`\nbench took ${((performance.now() - began) / 1000).toFixed(1)} s`);
  return failed > 0 ? 1 : 0;
}

Deno.exit(await main());

/**
 * Soak (issue 10, section 5): 10,000 REST turns through the real broker handler over HTTP,
 * 10% of them timing out and 10% aborted by the client mid-turn; does everything the
 * broker holds come back to where it was? Per runtime (Deno, Bun, Node 22):
 *
 * - the fake app-server: `bench/_instant_codex.ts` in its own Node 22 process, which
 *   completes a turn at once, or after `delay:MS` for a slow one (interrupted at once on
 *   `turn/interrupt`);
 * - the broker: `bench/soak_broker.ts` on the runtime (`createTurnsHandler` over a `Pool`,
 *   served by srvx), with `GET /soak/stats` for RSS, the pool's and connections' pending
 *   maps (`src/_internals.ts`), open file descriptors and active resources;
 * - the client: this process, `fetch` on its own HTTP client, 32 requests in flight, over
 *   four workspaces, each a new thread.
 *
 * A warm-up of 500 plain turns comes first, so the connections are dialed and the code is
 * compiled; its stats (after the client's connections are closed) are the baseline. Then
 * the 10,000 turns: every tenth with `timeoutMs` 100 on a turn that takes 2 s (answered
 * `transport.code` `brokerTimeout`), every tenth (offset 5) on a 2 s turn that the client
 * aborts after 50 ms, the rest plain. The client then closes its connections, and the
 * stats are read until they are back at the baseline (at most 10 s; each read collects
 * garbage first where the runtime allows: Node and Deno with `--expose-gc`, Bun.gc). It
 * prints each figure at start (before any request), after the warm-up and at the end,
 * with the end against the warm-up, and every answer that was not what its kind expects.
 *
 * ```sh
 * npm run bench -- soak
 * BENCH_SOAK_RUNTIMES=node BENCH_SOAK_TURNS=2000 npm run bench -- soak
 * ```
 *
 * Environment: `BENCH_SOAK_TURNS` (10000), `BENCH_SOAK_CONCURRENCY` (32),
 * `BENCH_SOAK_RUNTIMES` (`deno,bun,node`), `BENCH_SOAK_PROFILE=DIR` (the broker process
 * under the runtime's CPU profiler, `--cpu-prof`, writing into DIR).
 *
 * @module
 */

import { SOAK_SECRET, type SoakStats } from "./_soak_shared.ts";
import {
  BENCH_RUNTIMES,
  type BenchRuntime,
  BIN,
  loadText,
  runtimeCommand,
  startServer,
} from "./_procs.ts";
import { envInt, table } from "./_stats.ts";

const WARMUP_TURNS = 500;
const WORKSPACES = 4;
const SLOW_TURN_MS = 2_000;
const TIMEOUT_MS = 100;
const ABORT_AFTER_MS = 50;
const SETTLE_MS = 10_000;

/** What to run. */
export interface SoakConfig {
  turns: number;
  concurrency: number;
  runtimes: BenchRuntime[];
}

/** The kinds of turn the soak sends. */
type Kind = "plain" | "timeout" | "abort";

/** One runtime's soak. */
export interface SoakRun {
  runtime: BenchRuntime;
  /** Before any request, after the warm-up, at the end. */
  start: SoakStats | null;
  warm: SoakStats | null;
  end: SoakStats | null;
  /** Turns sent, by kind. */
  sent: Record<Kind, number>;
  /** Answers that were not what their kind expects, by description. */
  unexpected: Record<string, number>;
  /** Wall time of the 10,000 turns, ms. */
  soakMs: number;
  /** From the last answer until the stats were back at the baseline, ms; null if never. */
  settleMs: number | null;
  error: string | null;
  load: string;
}

/**
 * Reads the configuration from the environment.
 *
 * @returns The configuration.
 * @throws {TypeError} If a variable is not valid.
 */
export function soakConfig(): SoakConfig {
  const raw = Deno.env.get("BENCH_SOAK_RUNTIMES") || BENCH_RUNTIMES.join(",");
  const names = raw.split(",").map((r) => r.trim()).filter((r) => r !== "");
  const runtimes = names.filter((r): r is BenchRuntime =>
    (BENCH_RUNTIMES as readonly string[]).includes(r)
  );
  if (runtimes.length !== names.length || runtimes.length === 0) {
    throw new TypeError(
      `BENCH_SOAK_RUNTIMES must list some of ${BENCH_RUNTIMES.join(",")}, got "${raw}"`,
    );
  }
  return {
    turns: envInt("BENCH_SOAK_TURNS", 10_000, 10),
    concurrency: envInt("BENCH_SOAK_CONCURRENCY", 32, 1),
    runtimes,
  };
}

function kindOf(index: number): Kind {
  return index % 10 === 0 ? "timeout" : index % 10 === 5 ? "abort" : "plain";
}

function body(index: number, kind: Kind): string {
  const text = kind === "plain" ? "hi" : `delay:${SLOW_TURN_MS}`;
  return JSON.stringify({
    workspaceId: `soak-${index % WORKSPACES}`,
    params: { input: [{ type: "text", text, text_elements: [] }] },
    ...(kind === "timeout" ? { timeoutMs: TIMEOUT_MS } : {}),
  });
}

/** Sends one turn and says what came back, or "ok" when it is what `kind` expects. */
async function turn(
  url: string,
  client: Deno.HttpClient,
  index: number,
  kind: Kind,
): Promise<string> {
  const abort = new AbortController();
  const timer = kind === "abort" ? setTimeout(() => abort.abort(), ABORT_AFTER_MS) : undefined;
  try {
    const response = await fetch(`${url}/api/turns`, {
      method: "POST",
      headers: { "content-type": "application/json", "x-internal-secret": SOAK_SECRET },
      body: body(index, kind),
      signal: abort.signal,
      client,
    });
    const answer = await response.json() as {
      turn?: { status?: string };
      transport?: { code?: string };
      error?: { code?: string };
    };
    const got = answer.turn?.status ?? answer.transport?.code ?? answer.error?.code ?? "other";
    const expected = kind === "plain" ? "completed" : kind === "timeout" ? "brokerTimeout" : "";
    return response.status === 200 && got === expected
      ? "ok"
      : `${kind}: ${response.status} ${got}`;
  } catch (error) {
    if (kind === "abort" && abort.signal.aborted) return "ok";
    return `${kind}: ${error instanceof Error ? error.name : String(error)}`;
  } finally {
    clearTimeout(timer);
  }
}

async function runTurns(
  url: string,
  first: number,
  count: number,
  concurrency: number,
  kinds: (index: number) => Kind,
  unexpected: Record<string, number>,
  sent?: Record<Kind, number>,
): Promise<void> {
  const client = Deno.createHttpClient({});
  let next = first;
  const end = first + count;
  const worker = async () => {
    while (next < end) {
      const index = next++;
      const kind = kinds(index);
      if (sent) sent[kind]++;
      const outcome = await turn(url, client, index, kind);
      if (outcome !== "ok") unexpected[outcome] = (unexpected[outcome] ?? 0) + 1;
    }
  };
  try {
    await Promise.all(Array.from({ length: concurrency }, worker));
  } finally {
    // Closing the client closes its keep-alive connections: the broker's end must not
    // count sockets the client merely kept.
    client.close();
  }
}

async function readStats(url: string, client: Deno.HttpClient): Promise<SoakStats> {
  const response = await fetch(`${url}/soak/stats`, { client });
  return await response.json() as SoakStats;
}

/** Whether the pending maps and handles are back at the baseline's. */
function settled(warm: SoakStats, now: SoakStats): boolean {
  const same = (a: Record<string, number>, b: Record<string, number>, skip: string[] = []) =>
    Object.keys({ ...a, ...b }).every((k) => skip.includes(k) || (a[k] ?? 0) === (b[k] ?? 0));
  return same(warm.pool, now.pool) && same(warm.conns, now.conns, ["attachedThreads"]) &&
    warm.fds === now.fds && same(warm.resources, now.resources) &&
    warm.connCount === now.connCount;
}

/** `BENCH_SOAK_PROFILE=DIR`: the broker process under the runtime's CPU profiler. */
function profileFlags(runtime: BenchRuntime): string[] {
  const dir = Deno.env.get("BENCH_SOAK_PROFILE");
  if (!dir) return [];
  const name = `soak-${runtime}-${Date.now()}.cpuprofile`;
  return ["--cpu-prof", `--cpu-prof-dir=${dir}`, `--cpu-prof-name=${name}`];
}

function gcFlags(runtime: BenchRuntime): string[] {
  switch (runtime) {
    case "node":
      return ["--expose-gc"];
    case "deno":
      return ["--v8-flags=--expose-gc"];
    case "bun":
      return [];
  }
}

async function runOne(runtime: BenchRuntime, config: SoakConfig): Promise<SoakRun> {
  const run: SoakRun = {
    runtime,
    start: null,
    warm: null,
    end: null,
    sent: { plain: 0, timeout: 0, abort: 0 },
    unexpected: {},
    soakMs: NaN,
    settleMs: null,
    error: null,
    load: "",
  };
  const codex = await startServer(`${BIN}/node`, [
    "bench/_instant_codex.ts",
    "app-server",
    "--listen",
    "ws://127.0.0.1:0",
  ]);
  try {
    const [binary, args] = runtimeCommand(
      runtime,
      "bench/soak_broker.ts",
      ["--url", codex.url],
      [...gcFlags(runtime), ...profileFlags(runtime)],
    );
    const broker = await startServer(binary, args);
    const stats = Deno.createHttpClient({});
    try {
      run.start = await readStats(broker.url, stats);
      await runTurns(broker.url, 0, WARMUP_TURNS, config.concurrency, () => "plain", {});
      await new Promise((resolve) => setTimeout(resolve, 200));
      run.warm = await readStats(broker.url, stats);
      const began = performance.now();
      await runTurns(
        broker.url,
        0,
        config.turns,
        config.concurrency,
        kindOf,
        run.unexpected,
        run.sent,
      );
      const done = performance.now();
      run.soakMs = done - began;
      for (;;) {
        const now = await readStats(broker.url, stats);
        run.end = now;
        if (settled(run.warm, now)) {
          run.settleMs = performance.now() - done;
          break;
        }
        if (performance.now() - done > SETTLE_MS) break;
        await new Promise((resolve) => setTimeout(resolve, 100));
      }
    } finally {
      stats.close();
      await broker.stop();
    }
  } catch (error) {
    run.error = error instanceof Error ? error.message : String(error);
  } finally {
    await codex.stop();
  }
  run.load = loadText();
  return run;
}

/**
 * Runs the soak on each runtime of the configuration.
 *
 * @param config What to run.
 * @returns Each runtime's run.
 */
export async function runSoak(config: SoakConfig): Promise<SoakRun[]> {
  const runs: SoakRun[] = [];
  for (const runtime of config.runtimes) runs.push(await runOne(runtime, config));
  return runs;
}

function mb(value: number | undefined): string {
  return value === undefined || !Number.isFinite(value) ? "-" : value.toFixed(1);
}

function resourcesText(resources: Record<string, number> | undefined): string {
  if (!resources) return "-";
  const entries = Object.entries(resources).sort(([a], [b]) => a.localeCompare(b));
  return entries.length === 0 ? "(none listed)" : entries.map(([k, v]) => `${k} ${v}`).join(", ");
}

/**
 * Formats the soak's runs.
 *
 * @param runs The runs.
 * @param config What ran.
 * @returns The text.
 */
export function formatSoak(runs: SoakRun[], config: SoakConfig): string {
  const lines = [
    `Soak: ${config.turns} REST turns at concurrency ${config.concurrency} over ` +
    `${WORKSPACES} workspaces (every tenth times out at ${TIMEOUT_MS} ms, every tenth is ` +
    `aborted by the client after ${ABORT_AFTER_MS} ms), after ${WARMUP_TURNS} plain ` +
    "warm-up turns; stats after a forced GC",
  ];
  for (const run of runs) {
    lines.push("");
    if (run.error !== null) lines.push(`${run.runtime}: failed: ${run.error}`);
    const { start, warm, end } = run;
    const keys = (pick: (s: SoakStats) => Record<string, number>) => [
      ...new Set([start, warm, end].flatMap((s) => (s ? Object.keys(pick(s)) : []))),
    ];
    const row = (name: string, get: (s: SoakStats) => number, fmt = (v: number) => String(v)) => {
      const w = warm ? get(warm) : NaN;
      const e = end ? get(end) : NaN;
      return [
        name,
        start ? fmt(get(start)) : "-",
        warm ? fmt(w) : "-",
        end ? fmt(e) : "-",
        Number.isFinite(w) && Number.isFinite(e) ? fmt(e - w) : "-",
      ];
    };
    const rows = [
      row("RSS MB", (s) => s.rssMb, mb),
      row("heap used MB", (s) => s.heapUsedMb, mb),
      ...keys((s) => s.pool).map((k) => row(`pool ${k}`, (s) => s.pool[k] ?? 0)),
      row("open connections", (s) => s.connCount),
      ...keys((s) => s.conns).map((k) => row(`conns ${k}`, (s) => s.conns[k] ?? 0)),
      row("open fds", (s) => s.fds),
      ...keys((s) => s.resources).map((k) => row(`resource ${k}`, (s) => s.resources[k] ?? 0)),
    ];
    const sent =
      `${run.sent.plain} plain, ${run.sent.timeout} timing out, ${run.sent.abort} aborted`;
    lines.push(
      `${run.runtime}: ${sent} in ${(run.soakMs / 1000).toFixed(1)} s; ` +
        (run.settleMs === null
          ? `NOT back at the baseline ${SETTLE_MS / 1000} s after the last answer`
          : `back at the baseline ${run.settleMs.toFixed(0)} ms after the last answer`) +
        `; GC: ${end?.gc ?? "-"}; ${run.load}`,
    );
    lines.push(table(["", "start", "after warm-up", "end", "end - warm-up"], rows));
    lines.push(`resources (getActiveResourcesInfo) at the end: ${resourcesText(end?.resources)}`);
    const unexpected = Object.entries(run.unexpected);
    lines.push(
      unexpected.length === 0
        ? "every answer as expected (plain: completed; timing out: 200 brokerTimeout; " +
          "aborted: the fetch aborted)"
        : `unexpected answers: ${unexpected.map(([k, v]) => `${k} x${v}`).join(", ")}`,
    );
  }
  return lines.join("\n");
}

if (import.meta.main) {
  const config = soakConfig();
  console.log(formatSoak(await runSoak(config), config));
}

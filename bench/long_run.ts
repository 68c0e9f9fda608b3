/**
 * Long run (issue 7, item 2): does the broker's per-request state stay bounded over 100,000
 * requests? For each runtime, in the same run, one after the other:
 *
 * - **broker**: `src/main.ts` as a subprocess on that runtime, on port 0, with `--secret`
 *   and a temp `--workspaces-dir` (no turn runs, so no codex is spawned);
 * - **hello srvx**: `bench/hello_server.ts`, a hello-world srvx server on the same runtime
 *   that answers 401 JSON to everything without reading the body: the floor.
 *
 * The load client (`bench/long_run_client.ts`) runs in its own Node 22 process: POSTs to
 * `/api/turns` with a small JSON body and a wrong `X-Internal-Secret` (answered 401), over
 * `node:http` keep-alive connections, one request at a time on each. It reads the server's
 * RSS (`VmRSS` in `/proc/<pid>/status`) at the start and after a warm-up of 2,000 requests (a
 * fifth of a window), then times every window of 10,000 requests and reads the RSS after
 * each, and at the end the peak (`VmHWM`). RSS growth is after the run minus after the
 * warm-up; the peak shows what a collection during the run gave back. A request fails
 * when it errors (`ECONNRESET`, …), gets anything but 401, or no answer within 30 s. At the
 * end the server gets one SIGTERM and must exit 0 within 5 s; SIGKILL follows otherwise, so
 * nothing is left running, also when a step fails.
 *
 * It prints, per runtime, broker and hello srvx side by side: RSS at start, after the
 * warm-up, after the run, peak, and growth,
 * server CPU per request, the windows (first, median, slowest, last; last/first and
 * slowest/median), failed requests and how SIGTERM went; then the broker against the
 * issue's goals, each "goal met" or "not met":
 *
 * - RSS growth at most the hello server's plus {@linkcode RSS_MARGIN_MB} MB;
 * - no window slower than {@linkcode WINDOW_GOAL}x the median window;
 * - no failed request;
 * - one SIGTERM stops it (exit 0 within 5 s).
 *
 * ```sh
 * node_modules/.bin/deno run -A bench/long_run.ts   # or: npm run bench -- longrun
 * BENCH_LONGRUN_RUNTIMES=node BENCH_LONGRUN_REQUESTS=20000 npm run bench -- longrun
 * ```
 *
 * Environment:
 * - `BENCH_LONGRUN_REQUESTS` (100000): measured requests per server. Windows hold 10,000
 *   requests, or a tenth of the run when it is shorter; a remainder short of a window is not
 *   sent.
 * - `BENCH_LONGRUN_CONCURRENCY` (32): requests in flight, one keep-alive connection each.
 * - `BENCH_LONGRUN_RUNTIMES` (`node,deno,bun`): the runtimes, in this order.
 *
 * Each server gets a deadline of 60 s plus 3 ms per request (6 min for 100k); past it the
 * client stops sending and the run is reported as cut short. A 10k window takes about
 * 0.4 s for hello srvx on Node here and 1.5 s for the broker, so the whole part runs in
 * about a minute per runtime, more when the broker stalls (47 s and 113 s for Node alone
 * before the fix of issue 7). Other load on the machine stretches single windows, so the
 * slowest/median ratio is noisy, the more so the shorter the windows: read it with the
 * list of windows printed below each table, and beside the hello server's.
 *
 * @module
 */

import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { LongRunClientResult } from "./long_run_client.ts";
import { envInt, percentile, RESULT_MARKER, table } from "./_stats.ts";
import { serviceFlags } from "./_procs.ts";

/** The broker's RSS growth may exceed the hello server's by at most this many MB. */
export const RSS_MARGIN_MB = 60;
/** No window may take longer than this multiple of the median window. */
export const WINDOW_GOAL = 3;

const ROOT = decodeURIComponent(new URL("..", import.meta.url).pathname).replace(/\/$/, "");
const BIN = `${ROOT}/node_modules/.bin`;
/** The runtimes, in the default order: Node first, where issue 7 saw the defect. */
export const LONG_RUN_RUNTIMES = ["node", "deno", "bun"] as const;
/** A runtime the long run can start the servers on. */
export type LongRunRuntime = typeof LONG_RUN_RUNTIMES[number];
/** The two servers of each runtime, in the order they run. */
export const SERVERS = ["broker", "hello"] as const;
/** Which server: the broker or the hello srvx floor. */
export type ServerKind = typeof SERVERS[number];

const SECRET = "long-run-secret";
const WINDOW_SIZE = 10_000;
const START_TIMEOUT_MS = 30_000;
const STOP_TIMEOUT_MS = 5_000;
// How long to wait for the end of a server's stderr once it has exited.
const DRAIN_TIMEOUT_MS = 2_000;
// The client's own per-request timeout (30 s) plus room: only a hung client hits this.
const CLIENT_BACKSTOP_MS = 60_000;

/** What to run; see the module doc for the variables. */
export interface LongRunConfig {
  /** Measured requests per server, a whole number of windows. */
  requests: number;
  /** Requests per window. */
  windowSize: number;
  /** Requests before the first RSS reading. */
  warmup: number;
  concurrency: number;
  runtimes: LongRunRuntime[];
  /** Per server: the client stops sending after this long. */
  deadlineMs: number;
}

/** How one SIGTERM went. */
export interface StopResult {
  /** Exit code, or null when a signal ended the process. */
  code: number | null;
  signal: string | null;
  /** From SIGTERM to exit, ms. */
  ms: number;
  /** The server had exited before the SIGTERM. */
  exitedEarly: boolean;
  /** It was still running after {@linkcode STOP_TIMEOUT_MS} and got SIGKILL. */
  killed: boolean;
}

/** One server's run; `error` says why a part is missing. */
export interface ServerRun {
  client: LongRunClientResult | null;
  stop: StopResult | null;
  error: string | null;
}

/** Both servers on one runtime. */
export interface RuntimeRun {
  runtime: LongRunRuntime;
  /** Its version number, from `<runtime> --version`. */
  version: string;
  broker: ServerRun;
  hello: ServerRun;
}

/** A whole long run. */
export interface LongRunResult {
  config: LongRunConfig;
  runs: RuntimeRun[];
  /** Wall time, ms. */
  totalMs: number;
}

/**
 * Reads the configuration from the environment.
 *
 * @returns 100,000 requests in windows of 10,000 at concurrency 32 on node, deno and bun,
 *   unless the variables say otherwise.
 * @throws {TypeError} If a variable is not valid.
 */
export function longRunConfig(): LongRunConfig {
  const wanted = envInt("BENCH_LONGRUN_REQUESTS", 100_000, 10);
  const concurrency = envInt("BENCH_LONGRUN_CONCURRENCY", 32, 1);
  const raw = Deno.env.get("BENCH_LONGRUN_RUNTIMES") || LONG_RUN_RUNTIMES.join(",");
  const names = raw.split(",").map((r) => r.trim()).filter((r) => r !== "");
  const runtimes = names.filter((r): r is LongRunRuntime =>
    (LONG_RUN_RUNTIMES as readonly string[]).includes(r)
  );
  if (runtimes.length !== names.length || runtimes.length === 0) {
    throw new TypeError(
      `BENCH_LONGRUN_RUNTIMES must list some of ${LONG_RUN_RUNTIMES.join(",")}, got "${raw}"`,
    );
  }
  // At least ten windows, so a median and a slowest window mean something.
  const windowSize = Math.min(WINDOW_SIZE, Math.floor(wanted / 10));
  const requests = Math.floor(wanted / windowSize) * windowSize;
  const warmup = Math.ceil(windowSize / 5);
  return {
    requests,
    windowSize,
    warmup,
    concurrency,
    runtimes,
    deadlineMs: 60_000 + 3 * (warmup + requests),
  };
}

function command(runtime: LongRunRuntime, script: string, args: string[]): [string, string[]] {
  switch (runtime) {
    case "node":
      // The global `node` is Node 20, which cannot run .ts files; this one is Node 22.
      return [`${BIN}/node`, [script, ...args]];
    case "deno":
      // The broker as npm start runs it, V8 flags included.
      return [`${BIN}/deno`, [
        "run",
        "-A",
        ...(script === "src/main.ts" ? serviceFlags("deno") : []),
        script,
        ...args,
      ]];
    case "bun":
      return [`${BIN}/bun`, [script, ...args]];
  }
}

async function version(runtime: LongRunRuntime): Promise<string> {
  try {
    const output = await new Deno.Command(`${BIN}/${runtime}`, {
      args: ["--version"],
      stdout: "piped",
      stderr: "null",
      signal: AbortSignal.timeout(10_000),
    }).output();
    // "v22.23.3", "deno 2.9.6 (stable, …)", "1.4.5": the number is what matters.
    const text = new TextDecoder().decode(output.stdout);
    return /\d+\.\d+\.\d+/.exec(text)?.[0] ?? "unknown version";
  } catch {
    return "unknown version";
  }
}

/** A running server; `stop()` sends one SIGTERM (SIGKILL after a timeout), once. */
interface ServerProcess {
  url: string;
  pid: number;
  stop(): Promise<StopResult>;
}

async function startServer(
  runtime: LongRunRuntime,
  kind: ServerKind,
  workspacesDir: string,
): Promise<ServerProcess> {
  const [binary, args] = kind === "broker"
    ? command(runtime, "src/main.ts", [
      "--port",
      "0",
      "--secret",
      SECRET,
      "--workspaces-dir",
      workspacesDir,
    ])
    : command(runtime, "bench/hello_server.ts", []);
  const child = new Deno.Command(binary, {
    args,
    cwd: ROOT,
    stdin: "null",
    stdout: "null",
    stderr: "piped",
  }).spawn();
  let exited = false;
  const status = child.status.finally(() => exited = true);
  const listening = Promise.withResolvers<string>();
  listening.promise.catch(() => {});
  // The last lines, for the error message when it fails to start.
  const tail: string[] = [];
  // Drained to the end: a full pipe would block the broker's log of every 401. Once the URL
  // is known the rest is only drained, not decoded: 100k log lines, on a shared CPU.
  const reader = child.stderr.getReader();
  const drained = (async () => {
    const decoder = new TextDecoder();
    let partial = "";
    let found = false;
    try {
      while (true) {
        const { value, done } = await reader.read();
        if (done) break;
        if (found) continue;
        const lines = (partial + decoder.decode(value, { stream: true })).split("\n");
        partial = lines.pop() ?? "";
        for (const line of lines) {
          tail.push(line);
          if (tail.length > 20) tail.shift();
          if (!line.includes('"listening"')) continue;
          try {
            const entry = JSON.parse(line) as { msg?: unknown; url?: unknown };
            if (entry.msg === "listening" && typeof entry.url === "string") {
              found = true;
              listening.resolve(entry.url);
            }
          } catch {
            // Not a log record.
          }
        }
      }
    } catch {
      // Cancelled after the process exited.
    }
    listening.reject(new Error(`it exited before listening:\n${tail.join("\n")}`));
  })();

  let stopping: Promise<StopResult> | undefined;
  const stop = () =>
    stopping ??= (async () => {
      const exitedEarly = exited;
      const began = performance.now();
      let killed = false;
      if (!exitedEarly) {
        try {
          child.kill("SIGTERM");
        } catch {
          // Exited just now.
        }
      }
      const timer = setTimeout(() => {
        killed = true;
        try {
          child.kill("SIGKILL");
        } catch {
          // Exited meanwhile.
        }
      }, STOP_TIMEOUT_MS);
      const { code, signal } = await status;
      const ms = performance.now() - began;
      clearTimeout(timer);
      // A grandchild holding the pipe must not hold the bench.
      let drainTimer: ReturnType<typeof setTimeout> | undefined;
      await Promise.race([
        drained,
        new Promise((resolve) => drainTimer = setTimeout(resolve, DRAIN_TIMEOUT_MS)),
      ]);
      clearTimeout(drainTimer);
      await reader.cancel().catch(() => {});
      return { code: signal ? null : code, signal, ms, exitedEarly, killed };
    })();

  const timer = setTimeout(
    () => listening.reject(new Error(`it did not listen within ${START_TIMEOUT_MS} ms`)),
    START_TIMEOUT_MS,
  );
  try {
    const url = await listening.promise;
    return { url, pid: child.pid, stop };
  } catch (error) {
    await stop();
    throw error;
  } finally {
    clearTimeout(timer);
  }
}

async function runClient(
  config: LongRunConfig,
  server: ServerProcess,
  label: string,
): Promise<LongRunClientResult> {
  const output = await new Deno.Command(`${BIN}/node`, {
    args: [
      "bench/long_run_client.ts",
      "--url",
      server.url,
      "--pid",
      String(server.pid),
      "--requests",
      String(config.requests),
      "--window",
      String(config.windowSize),
      "--warmup",
      String(config.warmup),
      "--concurrency",
      String(config.concurrency),
      "--deadline-ms",
      String(config.deadlineMs),
      "--label",
      label,
    ],
    cwd: ROOT,
    stdin: "null",
    stdout: "piped",
    stderr: "inherit",
    signal: AbortSignal.timeout(config.deadlineMs + CLIENT_BACKSTOP_MS),
  }).output();
  const stdout = new TextDecoder().decode(output.stdout);
  const line = stdout.split("\n").find((l) => l.startsWith(RESULT_MARKER));
  if (!output.success || line === undefined) {
    throw new Error(
      `the load client failed (exit ${output.code}${output.signal ? `, ${output.signal}` : ""})` +
        (stdout.trim() ? `:\n${stdout.trim()}` : ""),
    );
  }
  return JSON.parse(line.slice(RESULT_MARKER.length)) as LongRunClientResult;
}

function messageOf(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

async function runServer(
  config: LongRunConfig,
  runtime: LongRunRuntime,
  kind: ServerKind,
  workspacesDir: string,
): Promise<ServerRun> {
  const run: ServerRun = { client: null, stop: null, error: null };
  let server: ServerProcess;
  try {
    server = await startServer(runtime, kind, workspacesDir);
  } catch (error) {
    run.error = `${runtime} ${kind} did not start: ${messageOf(error)}`;
    return run;
  }
  try {
    run.client = await runClient(config, server, `${runtime} ${kind}`);
  } catch (error) {
    run.error = `${runtime} ${kind}: ${messageOf(error)}`;
  } finally {
    run.stop = await server.stop();
  }
  if (run.stop.exitedEarly) {
    const how = run.stop.signal ?? `exit code ${run.stop.code}`;
    run.error ??= `${runtime} ${kind} exited during the run (${how})`;
  }
  return run;
}

/**
 * Runs the long run: for each runtime the broker, then the hello srvx server, each loaded
 * by its own client process and stopped with SIGTERM. A server that fails to start or a
 * client that fails is recorded in its {@linkcode ServerRun} and the run goes on; every
 * process it started is stopped and the temp directory removed before it returns.
 *
 * @param config What to run, e.g. from {@linkcode longRunConfig}.
 * @param progress Receives a line now and then (default: stderr).
 * @returns Both servers' numbers for each runtime.
 */
export async function runLongRun(
  config: LongRunConfig,
  progress: (line: string) => void = (line) => console.error(line),
): Promise<LongRunResult> {
  const began = performance.now();
  const dir = await mkdtemp(join(tmpdir(), "codex-broker-longrun-"));
  const runs: RuntimeRun[] = [];
  try {
    for (const runtime of config.runtimes) {
      const runtimeVersion = await version(runtime);
      progress(
        `long run on ${runtime} ${runtimeVersion}: ${config.requests} POSTs answered 401 ` +
          `per server, concurrency ${config.concurrency}`,
      );
      const broker = await runServer(config, runtime, "broker", join(dir, runtime));
      const hello = await runServer(config, runtime, "hello", join(dir, runtime));
      runs.push({ runtime, version: runtimeVersion, broker, hello });
    }
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
  return { config, runs, totalMs: performance.now() - began };
}

/** One server's figures, NaN where the run did not get that far. */
interface Figures {
  rssStart: number;
  rssPeak: number;
  rssBefore: number;
  rssAfter: number;
  rssGrowth: number;
  cpuUs: number;
  first: number;
  median: number;
  slowest: number;
  last: number;
  failed: number;
}

function figures(run: ServerRun): Figures {
  const client = run.client;
  const windows = client?.windowsMs ?? [];
  const sorted = Float64Array.from(windows).sort();
  const rssAfter = client?.rssAfterMb.at(-1) ?? NaN;
  const rssBefore = client?.rssBeforeMb ?? NaN;
  return {
    rssStart: client?.rssStartMb ?? NaN,
    rssPeak: client?.rssPeakMb ?? NaN,
    rssBefore,
    rssAfter,
    rssGrowth: rssAfter - rssBefore,
    cpuUs: client?.serverCpuUsPerRequest ?? NaN,
    first: windows[0] ?? NaN,
    median: percentile(sorted, 50),
    slowest: percentile(sorted, 100),
    last: windows.at(-1) ?? NaN,
    failed: client ? Object.values(client.failures).reduce((a, b) => a + b, 0) : NaN,
  };
}

function fixed(value: number, digits: number): string {
  return Number.isFinite(value) ? value.toFixed(digits) : "-";
}

function mb(value: number, sign = false): string {
  if (!Number.isFinite(value)) return "-";
  return `${sign && value >= 0 ? "+" : ""}${value.toFixed(1)}`;
}

function seconds(ms: number): string {
  return fixed(ms / 1000, 2);
}

function failedText(run: ServerRun, f: Figures): string {
  if (!run.client) return "-";
  const kinds = Object.entries(run.client.failures).map(([kind, n]) => `${kind} ${n}`);
  return kinds.length === 0 ? "0" : `${f.failed} (${kinds.join(", ")})`;
}

function stopText(stop: StopResult | null): string {
  if (!stop) return "-";
  if (stop.exitedEarly) {
    return `had exited (${stop.signal ?? `exit ${stop.code}`})`;
  }
  const how = stop.signal ? stop.signal : `exit ${stop.code}`;
  return `${how} in ${fixed(stop.ms / 1000, 2)} s${stop.killed ? " (SIGKILL)" : ""}`;
}

function stopOk(stop: StopResult | null): boolean {
  return stop !== null && !stop.exitedEarly && !stop.killed && stop.code === 0;
}

function verdict(ok: boolean | null): string {
  return ok === null ? "n/a" : ok ? "goal met" : "not met";
}

/** The four goals for the broker, each true, false, or null when it cannot be judged. */
interface Goals {
  rss: boolean | null;
  windows: boolean | null;
  failed: boolean | null;
  sigterm: boolean | null;
}

function goals(run: RuntimeRun): Goals {
  const broker = figures(run.broker);
  const hello = figures(run.hello);
  const rssLimit = hello.rssGrowth + RSS_MARGIN_MB;
  const client = run.broker.client;
  const complete = client !== null && !client.timedOut && !run.broker.stop?.exitedEarly;
  return {
    rss: Number.isFinite(broker.rssGrowth) && Number.isFinite(rssLimit)
      ? broker.rssGrowth <= rssLimit
      : null,
    // Windows of refused connections say nothing about a server that died; a run the deadline
    // cut short had a window that never ended.
    windows: client === null || run.broker.stop?.exitedEarly
      ? null
      : complete && broker.slowest <= WINDOW_GOAL * broker.median,
    failed: client ? complete && broker.failed === 0 : null,
    sigterm: run.broker.stop ? stopOk(run.broker.stop) : null,
  };
}

function formatRuntimeRun(config: LongRunConfig, run: RuntimeRun): string {
  const b = figures(run.broker);
  const h = figures(run.hello);
  const title = `long run on ${run.runtime} ${run.version}: ${config.requests} POSTs per ` +
    `server with a wrong X-Internal-Secret (401), concurrency ${config.concurrency} on ` +
    `keep-alive connections, windows of ${config.windowSize}, after ${config.warmup} ` +
    `warm-up requests; client: Node 22 in its own process`;
  const main = table(
    ["", "broker", "hello srvx"],
    [
      ["RSS at start (MB)", mb(b.rssStart), mb(h.rssStart)],
      ["RSS after warm-up (MB)", mb(b.rssBefore), mb(h.rssBefore)],
      ["RSS after run (MB)", mb(b.rssAfter), mb(h.rssAfter)],
      ["RSS peak (MB)", mb(b.rssPeak), mb(h.rssPeak)],
      ["RSS growth (MB)", mb(b.rssGrowth, true), mb(h.rssGrowth, true)],
      ["server CPU (us/request)", fixed(b.cpuUs, 0), fixed(h.cpuUs, 0)],
      ["window first (s)", seconds(b.first), seconds(h.first)],
      ["window median (s)", seconds(b.median), seconds(h.median)],
      ["window slowest (s)", seconds(b.slowest), seconds(h.slowest)],
      ["window last (s)", seconds(b.last), seconds(h.last)],
      ["last/first", fixed(b.last / b.first, 2), fixed(h.last / h.first, 2)],
      ["slowest/median", fixed(b.slowest / b.median, 2), fixed(h.slowest / h.median, 2)],
      ["failed requests", failedText(run.broker, b), failedText(run.hello, h)],
      ["SIGTERM", stopText(run.broker.stop), stopText(run.hello.stop)],
    ],
  );
  const lines: string[] = [];
  for (const kind of SERVERS) {
    const client = run[kind].client;
    if (client) {
      lines.push(
        `${kind === "broker" ? "broker" : "hello srvx"} windows (s): ${
          client.windowsMs.map(seconds).join(" ")
        }; RSS after each (MB): ${client.rssAfterMb.map((v) => fixed(v, 0)).join(" ")}` +
          (client.timedOut ? `; cut at the deadline after ${client.measured} requests` : ""),
      );
    }
    const error = run[kind].error;
    if (error) lines.push(`error: ${error}`);
  }
  const g = goals(run);
  const rssLimit = h.rssGrowth + RSS_MARGIN_MB;
  const goalLines = [
    `broker goals on ${run.runtime}:`,
    `  RSS growth <= hello's + ${RSS_MARGIN_MB} MB: ${mb(b.rssGrowth, true)} MB, limit ${
      mb(rssLimit, true)
    } MB: ${verdict(g.rss)}`,
    `  no window slower than ${WINDOW_GOAL}x the median: slowest/median ${
      fixed(b.slowest / b.median, 2)
    }: ${verdict(g.windows)}`,
    `  no failed request: ${failedText(run.broker, b)}${
      run.broker.client?.timedOut ? " (run cut short)" : ""
    }: ${verdict(g.failed)}`,
    `  one SIGTERM stops it (exit 0 within ${STOP_TIMEOUT_MS / 1000} s): ${
      stopText(run.broker.stop)
    }: ${verdict(g.sigterm)}`,
  ];
  return `${title}\n\n${main}\n${lines.join("\n")}\n\n${goalLines.join("\n")}\n`;
}

/**
 * Formats a long run: per runtime, the broker beside hello srvx and the broker's goals, then
 * one summary line per runtime.
 *
 * @param result One run.
 * @returns The report, as text.
 */
export function formatLongRun(result: LongRunResult): string {
  const sections = result.runs.map((run) => formatRuntimeRun(result.config, run));
  const pair = (run: RuntimeRun, text: (kind: ServerKind, f: Figures) => string) =>
    `${text("broker", figures(run.broker))} | ${text("hello", figures(run.hello))}`;
  const summary = table(
    [
      "runtime",
      "RSS growth MB",
      "last/first",
      "slowest/median",
      "failed",
      "SIGTERM",
      "broker goals met",
    ],
    result.runs.map((run) => {
      const g = goals(run);
      const judged = Object.values(g).filter((v) => v !== null);
      return [
        run.runtime,
        pair(run, (_, f) => mb(f.rssGrowth, true)),
        pair(run, (_, f) => fixed(f.last / f.first, 2)),
        pair(run, (_, f) => fixed(f.slowest / f.median, 2)),
        pair(run, (_, f) => fixed(f.failed, 0)),
        pair(run, (kind) => stopOk(run[kind].stop) ? "ok" : "no"),
        `${judged.filter((v) => v).length}/${Object.keys(g).length}`,
      ];
    }),
  );
  return `${sections.join("\n")}\nlong run summary, broker | hello srvx (same run), ${
    (result.totalMs / 1000).toFixed(1)
  } s:\n${summary}\n`;
}

if (import.meta.main) {
  console.log(formatLongRun(await runLongRun(longRunConfig())));
}

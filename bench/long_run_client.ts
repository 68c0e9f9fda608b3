/**
 * The long-run bench's load client (`bench/long_run.ts` runs it with Node 22, in its own
 * process): POSTs to `/api/turns` with a small JSON body and a wrong `X-Internal-Secret`,
 * which the server answers 401, over `node:http` with a keep-alive agent of `--concurrency`
 * sockets, one request at a time per socket. It reads the server's RSS, sends `--warmup`
 * requests, reads the RSS again and sends `--requests` more, timing each window of
 * `--window` answers and reading the RSS after each; at the end it reads the server's peak
 * RSS (`VmHWM`).
 *
 * A request fails when it errors (`ECONNRESET`, …), is answered anything but 401, or gets no
 * answer within 30 s. At `--deadline-ms` it stops sending; the requests in flight still end.
 * The result is one `BENCH_RESULT {…}` line on stdout ({@linkcode LongRunClientResult});
 * progress goes to stderr.
 *
 * ```sh
 * node_modules/.bin/node bench/long_run_client.ts --url http://127.0.0.1:8787 --pid 1234 \
 *   --requests 100000 --window 10000 --warmup 2000 --concurrency 32 --deadline-ms 400000
 * ```
 *
 * @module
 */

import { readFileSync } from "node:fs";
import http from "node:http";
import process from "node:process";
import { parseArgs } from "node:util";
import { RESULT_MARKER } from "./_stats.ts";

/** What one run of the client reports. */
export interface LongRunClientResult {
  /** Warm-up requests sent before the measured ones. */
  warmup: number;
  /** Measured requests that ended (answered or failed). */
  measured: number;
  /** Requests per window. */
  windowSize: number;
  /** Wall time of each full window, ms, in order. */
  windowsMs: number[];
  /** Server RSS before the first request, MB; NaN without `/proc` or a pid. */
  rssStartMb: number;
  /** Server RSS after the warm-up, MB. */
  rssBeforeMb: number;
  /** Server RSS after each window, MB, in order. */
  rssAfterMb: number[];
  /** The server's peak RSS since it started (`VmHWM`), read after the last request, MB. */
  rssPeakMb: number;
  /** Server CPU time (user + system) per measured request, µs; NaN without `/proc`. */
  serverCpuUsPerRequest: number;
  /** Failed requests, warm-up included, by kind: an error code, `status 500`, `timeout`. */
  failures: Record<string, number>;
  /** Whether the deadline stopped the run before every request was sent. */
  timedOut: boolean;
  /** Wall time of the measured requests, ms. */
  measuredMs: number;
}

// Far above any answer of a healthy server, even in a stalled window: only a connection
// that will never answer (issue 7, item 1) should hit it.
const REQUEST_TIMEOUT_MS = 30_000;
const BODY = JSON.stringify({
  workspaceId: "bench",
  input: [{ type: "text", text: "hi", text_elements: [] }],
});

function positiveInt(name: string, raw: string | undefined): number {
  const value = Number(raw);
  if (raw === undefined || !Number.isInteger(value) || value <= 0) {
    throw new TypeError(`--${name} must be a positive integer, got ${JSON.stringify(raw)}`);
  }
  return value;
}

/**
 * A process's `VmRSS` (or `VmHWM`, its peak), MB; NaN where there is no `/proc` or no such
 * process.
 */
function rssMb(pid: number | undefined, field: "VmRSS" | "VmHWM" = "VmRSS"): number {
  if (pid === undefined) return NaN;
  try {
    const status = readFileSync(`/proc/${pid}/status`, "utf8");
    const match = new RegExp(`^${field}:\\s+(\\d+) kB`, "m").exec(status);
    return match ? Number(match[1]) / 1024 : NaN;
  } catch {
    return NaN;
  }
}

/** CPU time (user + system) of a process so far, µs, from `/proc` (10 ms ticks). */
function cpuUs(pid: number | undefined): number {
  if (pid === undefined) return NaN;
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    // The command name may hold spaces; the fields after it are space-separated.
    const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    return (Number(fields[11]) + Number(fields[12])) * 10_000;
  } catch {
    return NaN;
  }
}

function failureKind(error: unknown): string {
  const code = (error as { code?: unknown } | null)?.code;
  if (typeof code === "string") return code;
  return error instanceof Error ? error.message : String(error);
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      url: { type: "string" },
      pid: { type: "string" },
      requests: { type: "string", default: "100000" },
      window: { type: "string", default: "10000" },
      warmup: { type: "string", default: "2000" },
      concurrency: { type: "string", default: "32" },
      "deadline-ms": { type: "string", default: String(10 * 60_000) },
      label: { type: "string", default: "long run" },
    },
  });
  if (values.url === undefined) throw new TypeError("--url is required");
  const target = new URL("/api/turns", values.url);
  const pid = values.pid === undefined ? undefined : positiveInt("pid", values.pid);
  const requests = positiveInt("requests", values.requests);
  const windowSize = positiveInt("window", values.window);
  const warmup = positiveInt("warmup", values.warmup);
  const concurrency = positiveInt("concurrency", values.concurrency);
  const deadline = performance.now() + positiveInt("deadline-ms", values["deadline-ms"]);
  const label = values.label;

  const agent = new http.Agent({ keepAlive: true, maxSockets: concurrency });
  const options: http.RequestOptions = {
    agent,
    host: target.hostname,
    port: target.port,
    path: target.pathname,
    method: "POST",
    headers: {
      "content-type": "application/json",
      "content-length": String(new TextEncoder().encode(BODY).length),
      "x-internal-secret": "not-the-secret",
    },
  };
  const failures: Record<string, number> = {};
  const fail = (kind: string) => failures[kind] = (failures[kind] ?? 0) + 1;

  /** One POST; resolves with why it failed, or undefined for the expected 401. */
  const post = () =>
    new Promise<string | undefined>((resolve) => {
      let settled = false;
      const settle = (failure: string | undefined) => {
        if (settled) return;
        settled = true;
        resolve(failure);
      };
      const request = http.request(options, (response) => {
        const status = response.statusCode;
        response.on("end", () => settle(status === 401 ? undefined : `status ${status}`));
        response.on("close", () => settle(response.complete ? undefined : "response cut"));
        response.on("error", (error) => settle(failureKind(error)));
        response.resume();
      });
      request.on("error", (error) => settle(failureKind(error)));
      request.setTimeout(REQUEST_TIMEOUT_MS, () => {
        settle("timeout");
        request.destroy();
      });
      request.end(BODY);
    });

  let timedOut = false;
  /** Sends `count` requests, `concurrency` at a time; calls `onEnd` after each one ends. */
  const phase = async (count: number, onEnd: (ended: number) => void) => {
    let sent = 0;
    let ended = 0;
    const worker = async () => {
      while (sent < count) {
        if (performance.now() > deadline) {
          timedOut = true;
          return;
        }
        sent++;
        const failure = await post();
        if (failure !== undefined) fail(failure);
        onEnd(++ended);
      }
    };
    await Promise.all(Array.from({ length: concurrency }, worker));
    return ended;
  };

  const rssStartMb = rssMb(pid);
  await phase(warmup, () => {});
  const rssBeforeMb = rssMb(pid);
  const cpuBefore = cpuUs(pid);
  const windowsMs: number[] = [];
  const rssAfterMb: number[] = [];
  const began = performance.now();
  let windowBegan = began;
  const measured = await phase(requests, (ended) => {
    if (ended % windowSize !== 0) return;
    const now = performance.now();
    windowsMs.push(now - windowBegan);
    windowBegan = now;
    rssAfterMb.push(rssMb(pid));
    const failed = Object.values(failures).reduce((a, b) => a + b, 0);
    process.stderr.write(
      `${label}: window ${windowsMs.length}: ${((windowsMs.at(-1) ?? 0) / 1000).toFixed(2)} s, ` +
        `RSS ${(rssAfterMb.at(-1) ?? NaN).toFixed(0)} MB, ${failed} failed\n`,
    );
  });
  const measuredMs = performance.now() - began;
  const serverCpuUsPerRequest = (cpuUs(pid) - cpuBefore) / measured;
  const rssPeakMb = rssMb(pid, "VmHWM");
  agent.destroy();
  const result: LongRunClientResult = {
    warmup,
    measured,
    windowSize,
    windowsMs,
    rssStartMb,
    rssBeforeMb,
    rssAfterMb,
    rssPeakMb,
    serverCpuUsPerRequest,
    failures,
    timedOut,
    measuredMs,
  };
  // Pipes are asynchronous on some platforms: the line must be out before the exit.
  await new Promise<void>((resolve) =>
    process.stdout.write(`${RESULT_MARKER}${JSON.stringify(result)}\n`, () => resolve())
  );
}

try {
  await main();
  process.exit(0);
} catch (error) {
  console.error(error);
  process.exit(1);
}

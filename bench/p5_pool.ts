/**
 * The process P5 measures (`bench/p5.ts` runs it on each runtime, twice):
 *
 * - `--mode pool`: a `Pool` whose resolver spreads `--count` workspaces over the fake
 *   app-servers at `--urls`; it dials them all (`pool.get`, `--concurrency` at a time: a
 *   WebSocket and the initialize handshake each), then leaves them idle. It reads the RSS
 *   before the first dial and after the last (both after a forced GC and a short settle),
 *   then times the pool's reaper: the sweep callback the pool hands to `setInterval` (a
 *   wrapper records it; its interval is set so it never fires by itself) is called
 *   {@linkcode SWEEPS} times with nothing to reap, then once with the clock (`Date.now`)
 *   moved past the idle TTL, so that every connection is due: that sweep reaps a batch
 *   and leaves the rest to the sweeps it queues, timed until the pool is empty.
 * - `--mode raw`: the same number of plain `WebSocket`s opened to the same servers, each
 *   with the same `initialize` exchange and nothing else: what the runtime itself holds
 *   per connection, for comparison.
 *
 * Prints one `BENCH_RESULT {…}` line ({@linkcode P5Result}).
 *
 * @module
 */

import process from "node:process";
import { collectGarbage } from "./_gc.ts";
import { parseArgs } from "node:util";
import { Pool } from "../src/pool.ts";
import { openNetWebSocket } from "../src/net_websocket.ts";
import { internalSizes } from "../src/_internals.ts";
import { RESULT_MARKER } from "./_stats.ts";

/** What one run prints. */
export interface P5Result {
  mode: "pool" | "raw";
  count: number;
  /** RSS before the first connection, MB. */
  baselineRssMb: number;
  /** RSS with every connection open and idle, MB. */
  openRssMb: number;
  /** JS heap in use, before and with the connections, MB. */
  baselineHeapMb: number;
  openHeapMb: number;
  /** Time to open them all, ms. */
  openMs: number;
  /** Sweeps with nothing to reap, ms each (pool mode). */
  idleSweepsMs: number[];
  /** The first sweep once all are idle past the TTL, ms (pool mode). */
  reapSweepMs: number;
  /** From that sweep until the pool was empty, ms (pool mode). */
  reapAllMs: number;
  /** Pool entries after that sweep (pool mode; 0 expected). */
  entriesAfterReap: number;
  /** How the collection was forced. */
  gc: string;
}

const SWEEPS = 20;
// Distinctive, so the wrapper can tell the pool's sweeper from other intervals; far longer
// than the run, so it never fires by itself.
const SWEEP_INTERVAL_MS = 987_654;
const IDLE_TTL_MS = 3_600_000;
const INITIALIZE_PARAMS = {
  clientInfo: { name: "p5_raw", title: "p5", version: "0.0.0" },
  capabilities: null,
};

const { values } = parseArgs({
  options: {
    urls: { type: "string" },
    count: { type: "string", default: "10000" },
    concurrency: { type: "string", default: "64" },
    mode: { type: "string", default: "pool" },
    // The pool's WebSocket: the runtime's (web) or the service's own on node:net (net).
    client: { type: "string", default: "web" },
  },
});
const urls = (values.urls ?? "").split(",").filter((u) => u !== "");
if (urls.length === 0) throw new TypeError("--urls is required");
const count = Number(values.count);
const concurrency = Number(values.concurrency);
const mode = values.mode === "raw" ? "raw" : "pool";
const client = values.client === "net" ? "net" : "web";

async function memory(): Promise<{ rss: number; heap: number; gc: string }> {
  const gc = collectGarbage();
  await new Promise((resolve) => setTimeout(resolve, 200));
  collectGarbage();
  const { rss, heapUsed } = process.memoryUsage();
  return { rss: rss / 2 ** 20, heap: heapUsed / 2 ** 20, gc };
}

async function inBatches(task: (index: number) => Promise<void>): Promise<void> {
  let next = 0;
  const worker = async () => {
    while (next < count) await task(next++);
  };
  await Promise.all(Array.from({ length: concurrency }, worker));
}

// The pool's sweeper, as it hands it to setInterval.
let sweep: (() => void) | undefined;
const realSetInterval = globalThis.setInterval;
globalThis.setInterval = ((fn: () => void, ms?: number) => {
  if (ms === SWEEP_INTERVAL_MS) sweep = fn;
  return realSetInterval(fn, ms);
}) as typeof setInterval;

const before = await memory();
const result: P5Result = {
  mode,
  count,
  baselineRssMb: before.rss,
  openRssMb: NaN,
  baselineHeapMb: before.heap,
  openHeapMb: NaN,
  openMs: NaN,
  idleSweepsMs: [],
  reapSweepMs: NaN,
  reapAllMs: NaN,
  entriesAfterReap: NaN,
  gc: before.gc,
};

if (mode === "pool") {
  const pool = new Pool(
    (workspaceId) => Promise.resolve(urls[Number(workspaceId.slice(3)) % urls.length]!),
    {
      idleTtlMs: IDLE_TTL_MS,
      sweepIntervalMs: SWEEP_INTERVAL_MS,
      ...(client === "net" ? { dial: { webSocket: openNetWebSocket } } : {}),
    },
  );
  const began = performance.now();
  await inBatches(async (index) => {
    await pool.get(`ws-${index}`);
  });
  result.openMs = performance.now() - began;
  const open = await memory();
  result.openRssMb = open.rss;
  result.openHeapMb = open.heap;
  if (sweep === undefined) throw new Error("The pool's sweeper was not found");
  for (let i = 0; i < SWEEPS; i++) {
    const start = performance.now();
    sweep();
    result.idleSweepsMs.push(performance.now() - start);
  }
  // Every connection idle past the TTL at once: the sweep reaps them, in batches.
  const realNow = Date.now;
  Date.now = () => realNow() + 2 * IDLE_TTL_MS;
  try {
    const start = performance.now();
    sweep();
    result.reapSweepMs = performance.now() - start;
    const deadline = start + 120_000;
    while ((internalSizes(pool)?.entries ?? 0) > 0 && performance.now() < deadline) {
      await new Promise((resolve) => setTimeout(resolve, 1));
    }
    result.reapAllMs = performance.now() - start;
  } finally {
    Date.now = realNow;
  }
  result.entriesAfterReap = internalSizes(pool)?.entries ?? NaN;
  await pool.close();
} else {
  const sockets: WebSocket[] = [];
  const began = performance.now();
  await inBatches(async (index) => {
    const ws = new WebSocket(urls[index % urls.length]!);
    sockets.push(ws);
    await new Promise<void>((resolve, reject) => {
      ws.onopen = () => resolve();
      ws.onerror = () => reject(new Error("Cannot open WebSocket"));
    });
    // The same exchange as Conn's handshake: a runtime may hold read buffers per socket
    // only once a message has come in.
    ws.send(JSON.stringify({ id: 0, method: "initialize", params: INITIALIZE_PARAMS }));
    await new Promise<void>((resolve) => ws.onmessage = () => resolve());
    ws.send(JSON.stringify({ method: "initialized" }));
    ws.onmessage = null;
  });
  result.openMs = performance.now() - began;
  const open = await memory();
  result.openRssMb = open.rss;
  result.openHeapMb = open.heap;
  for (const ws of sockets) ws.close();
}
process.stdout.write(`${RESULT_MARKER}${JSON.stringify(result)}\n`);
process.exit(0);

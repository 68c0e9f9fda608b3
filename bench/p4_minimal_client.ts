/**
 * The P4 bench's second baseline (`bench/p4.ts` runs it on each runtime): the same exchange
 * the broker does for one `POST /api/turns` with a new thread, straight to the instant fake
 * codex over one WebSocket: `initialize` once, then per request `thread/start`, `turn/start`
 * and the wait for `turn/completed`, with `--concurrency` requests in flight. After
 * `--warmup-ms` it counts the turns completed in `--duration-ms`, and prints one
 * `BENCH_RESULT {"turns","ms","cpuUs"}` line.
 *
 * ```sh
 * node_modules/.bin/node bench/p4_minimal_client.ts --url ws://127.0.0.1:4500 \
 *   --token TOKEN --concurrency 64 --duration-ms 5000 --warmup-ms 1000
 * ```
 *
 * @module
 */

import process from "node:process";
import { parseArgs } from "node:util";
import { MinimalClient } from "./_minimal_client.ts";
import { RESULT_MARKER } from "./_stats.ts";

/** What one run prints. */
export interface P4MinimalResult {
  /** Turns completed in the measured window. */
  turns: number;
  /** The measured window, ms. */
  ms: number;
  /** This process's CPU time (user + system) over the window, µs. */
  cpuUs: number;
}

const { values } = parseArgs({
  options: {
    url: { type: "string" },
    token: { type: "string" },
    concurrency: { type: "string", default: "64" },
    "duration-ms": { type: "string", default: "5000" },
    "warmup-ms": { type: "string", default: "1000" },
  },
});
if (values.url === undefined) throw new TypeError("--url is required");
const concurrency = Number(values.concurrency);
const durationMs = Number(values["duration-ms"]);
const warmupMs = Number(values["warmup-ms"]);

const client = await MinimalClient.connect(
  values.url,
  values.token === undefined ? undefined : { authorization: `Bearer ${values.token}` },
);
const params = { input: [{ type: "text", text: "hi", text_elements: [] }] };
let counting = false;
let turns = 0;
let stopping = false;

async function worker(): Promise<void> {
  while (!stopping) {
    const threadId = await client.startThread();
    await client.turn(threadId, params);
    if (counting) turns++;
  }
}

const workers = Array.from({ length: concurrency }, () => worker());
await new Promise((resolve) => setTimeout(resolve, warmupMs));
const cpuBefore = process.cpuUsage();
const began = performance.now();
counting = true;
await new Promise((resolve) => setTimeout(resolve, durationMs));
counting = false;
const ms = performance.now() - began;
const cpu = process.cpuUsage(cpuBefore);
stopping = true;
await Promise.all(workers);
client.close();
const result: P4MinimalResult = { turns, ms, cpuUs: cpu.user + cpu.system };
process.stdout.write(`${RESULT_MARKER}${JSON.stringify(result)}\n`);
process.exit(0);

/**
 * The P4 bench's second baseline (`bench/p4.ts` runs it on each runtime): the same exchange
 * the broker does for one `POST /api/turns` with a new thread, straight to the instant fake
 * codex over one WebSocket: `initialize` once, then per request `thread/start`, `turn/start`
 * and the wait for `turn/completed`, with `--concurrency` requests in flight.
 *
 * It runs in windows, on command: each line `run MS` on stdin runs one window of MS
 * milliseconds and prints one `BENCH_RESULT {"turns","ms","cpuUs"}` line, the turns
 * completed in it; between windows nothing is in flight. The bench keeps it, hello srvx and
 * the broker up at once and measures them taking turns, so each is warm and each round's
 * figures are taken within seconds of each other. `quit`, or the end of stdin, closes it.
 *
 * ```sh
 * printf 'run 1000\nrun 3000\n' | node_modules/.bin/node bench/p4_minimal_client.ts \
 *   --url ws://127.0.0.1:4500 --token TOKEN --concurrency 64
 * ```
 *
 * @module
 */

import process from "node:process";
import { createInterface } from "node:readline";
import { parseArgs } from "node:util";
import { MinimalClient } from "./_minimal_client.ts";
import { RESULT_MARKER } from "./_stats.ts";

/** What one run prints. */
export interface P4MinimalResult {
  /** Turns completed in the window. */
  turns: number;
  /** The window, ms. */
  ms: number;
  /** This process's CPU time (user + system) over the window, µs. */
  cpuUs: number;
}

const { values } = parseArgs({
  options: {
    url: { type: "string" },
    token: { type: "string" },
    concurrency: { type: "string", default: "64" },
  },
});
if (values.url === undefined) throw new TypeError("--url is required");
const concurrency = Number(values.concurrency);

const client = await MinimalClient.connect(
  values.url,
  values.token === undefined ? undefined : { authorization: `Bearer ${values.token}` },
);
const params = { input: [{ type: "text", text: "hi", text_elements: [] }] };

/** One window: `concurrency` turns in flight for `ms`, then none. */
async function runWindow(ms: number): Promise<P4MinimalResult> {
  let counting = true;
  let stopping = false;
  let turns = 0;
  const worker = async () => {
    while (!stopping) {
      const threadId = await client.startThread();
      await client.turn(threadId, params);
      if (counting) turns++;
    }
  };
  const cpuBefore = process.cpuUsage();
  const began = performance.now();
  const workers = Array.from({ length: concurrency }, worker);
  await new Promise((resolve) => setTimeout(resolve, ms));
  counting = false;
  const elapsed = performance.now() - began;
  const cpu = process.cpuUsage(cpuBefore);
  stopping = true;
  // The turns still in flight end before the next window, so none of them counts there.
  await Promise.all(workers);
  return { turns, ms: elapsed, cpuUs: cpu.user + cpu.system };
}

for await (const line of createInterface({ input: process.stdin })) {
  const command = line.trim();
  if (command === "quit") break;
  const match = /^run (\d+)$/.exec(command);
  if (match === null) throw new TypeError(`Unknown command: ${JSON.stringify(command)}`);
  const result = await runWindow(Number(match[1]));
  process.stdout.write(`${RESULT_MARKER}${JSON.stringify(result)}\n`);
}
client.close();
process.exit(0);

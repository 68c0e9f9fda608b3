/**
 * Runs the bench's fake app-server as its own process (`node bench/server_process.ts`,
 * Node 22). Prints `{"url": "ws://…"}` as its first stdout line and exits when its stdin
 * closes, so it never outlives the bench that started it.
 *
 * @module
 */

import process from "node:process";
import { startBenchServer } from "./_fake_server.ts";

const server = await startBenchServer();
process.stdout.write(`${JSON.stringify({ url: server.url })}\n`);
process.stdin.resume();
process.stdin.on("end", async () => {
  await server.close().catch(() => {});
  process.exit(0);
});

/**
 * The tests' fake app-server, set up for benchmarking: `codexLike` answers at once, plus a
 * `bench/cpu` request so the client can read the server's CPU use over a round.
 *
 * @module
 */

import process from "node:process";
import { codexLike, type FakeAppServer, startFakeAppServer } from "../tests/_fake_app_server.ts";
import { CPU_METHOD, type ServerCpu } from "./_control.ts";

// FakePeer keeps every received message for test assertions; over a few hundred thousand
// turns that log would turn the server's GC into part of the measurement.
const RECEIVED_LOG_CAP = 1024;

/**
 * Starts the fake server on 127.0.0.1, port 0.
 *
 * @returns The running server.
 */
export function startBenchServer(): Promise<FakeAppServer> {
  // The bench measures throughput; checking every frame against the schema would count in it.
  return startFakeAppServer((peer) => {
    peer.handle((message) => {
      if (peer.received.length > RECEIVED_LOG_CAP) peer.received.length = 0;
      if (message.method !== CPU_METHOD || message.id === undefined) return false;
      const { user, system } = process.cpuUsage();
      peer.send({ id: message.id, result: { user, system } satisfies ServerCpu });
      return true;
    });
    codexLike(peer);
  }, { schema: false });
}

// Drives a connection whose codex has stopped reading until it closes as stalled.
import assert from "node:assert/strict";
import { type Conn, ConnectionClosedError } from "../mod.ts";

/**
 * Sends requests of 256 KiB, one per event-loop turn, far beyond what the kernel's socket
 * buffers hold (at most 400), until the connection closes as stalled. Checks that it did and
 * that every call rejected with a `ConnectionClosedError`.
 *
 * @returns The error of the last call.
 */
export async function sendUntilStalled(conn: Conn): Promise<ConnectionClosedError> {
  const chunk = "x".repeat(256 * 1024);
  const calls: Promise<unknown>[] = [];
  for (let i = 0; i < 400 && !conn.closed; i++) {
    const call = conn.request("thread/read", { threadId: chunk });
    call.catch(() => {});
    calls.push(call);
    await new Promise((resolve) => setTimeout(resolve, 1));
  }
  assert.equal(conn.closed, true, "the connection closed as stalled");
  const outcomes = await Promise.allSettled(calls);
  for (const outcome of outcomes) {
    assert.equal(outcome.status, "rejected");
    assert.ok(outcome.reason instanceof ConnectionClosedError);
  }
  return (outcomes.at(-1) as PromiseRejectedResult).reason;
}

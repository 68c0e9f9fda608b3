/**
 * The broker's default log sink: stderr, written in batches. Runtime-specific (`node:`
 * modules).
 *
 * @module
 */

import process from "node:process";
import { setTimeout } from "node:timers";

/** How long a log line may wait for others to share its write. */
const FLUSH_MS = 10;
/** Past this much text, it is written at once. */
const FLUSH_BYTES = 64 * 1024;

/**
 * Makes a sink that appends text to stderr, with what is given within
 * {@linkcode FLUSH_MS} ms (up to {@linkcode FLUSH_BYTES} characters) in one write.
 *
 * One write per log line (one per turn) was 5% of the broker's CPU on Node and 11% on Deno
 * and Bun with an instant codex: a write to a pipe is a system call, and wakes the reader.
 * Batching per turn of the event loop halved it on Node but did little on Deno, whose
 * loop turns once per request at this load; a short timer batches on all three. Lines keep
 * their order, and what still waits when the process exits is written then; only a process
 * killed outright (SIGKILL) loses the last few milliseconds of lines.
 *
 * @returns The sink.
 */
export function stderrSink(): (text: string) => void {
  let pending: string[] = [];
  let size = 0;
  let timer: ReturnType<typeof setTimeout> | undefined;
  const flush = () => {
    if (timer !== undefined) clearTimeout(timer);
    timer = undefined;
    if (pending.length === 0) return;
    const text = pending.join("");
    pending = [];
    size = 0;
    process.stderr.write(text);
  };
  process.once("exit", flush);
  return (text) => {
    pending.push(text);
    size += text.length;
    if (size >= FLUSH_BYTES) flush();
    else if (timer === undefined) {
      timer = setTimeout(flush, FLUSH_MS);
      // Waiting lines must not keep the process alive; the exit hook writes them.
      timer.unref();
    }
  };
}

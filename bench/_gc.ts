/**
 * A forced garbage collection, for the memory figures of `p5_pool.ts` and `soak_broker.ts`.
 * Runs on Deno and Node with `--expose-gc` (`--v8-flags=--expose-gc`), and on Bun as is.
 *
 * @module
 */

/**
 * Collects garbage now, if the runtime lets a script ask.
 *
 * @returns How it was forced: `Bun.gc(true)`, `gc() (--expose-gc)`, or `none`.
 */
export function collectGarbage(): string {
  const bun = (globalThis as { Bun?: { gc(force: boolean): void } }).Bun;
  if (bun) {
    bun.gc(true);
    return "Bun.gc(true)";
  }
  const gc = (globalThis as { gc?: () => void }).gc;
  if (gc) {
    gc();
    return "gc() (--expose-gc)";
  }
  return "none";
}

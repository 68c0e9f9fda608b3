/**
 * Sizes of the broker's internal bookkeeping (pending calls, active turns, pool entries, …),
 * for the bench's leak checks (`bench/soak.ts`, `bench/p5.ts`). Not part of the API: a
 * {@linkcode Conn} or {@linkcode Pool} registers a function that counts, and only code
 * that imports this module can ask. Web-standard.
 *
 * @module
 */

import type { Conn } from "./conn.ts";
import type { Pool } from "./pool.ts";

/** Named counts, e.g. `{ pendingCalls: 0, activeTurns: 0 }`. */
export type InternalSizes = Record<string, number>;

// Weak: registering keeps nothing alive, and costs one entry per connection or pool.
const registry = new WeakMap<Conn | Pool, () => InternalSizes>();

/**
 * Registers the function that counts `owner`'s bookkeeping.
 *
 * @param owner A connection or pool.
 * @param sizes Counts, read when asked.
 */
export function registerSizes(owner: Conn | Pool, sizes: () => InternalSizes): void {
  registry.set(owner, sizes);
}

/**
 * Counts `owner`'s bookkeeping.
 *
 * @param owner A connection or pool.
 * @returns Its counts, or `undefined` if it registered none.
 */
export function internalSizes(owner: Conn | Pool): InternalSizes | undefined {
  return registry.get(owner)?.();
}

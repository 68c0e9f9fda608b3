/**
 * What the soak bench's client (`bench/soak.ts`) and its broker process
 * (`bench/soak_broker.ts`) share, kept apart so the client does not start a broker by
 * importing it.
 *
 * @module
 */

import type { InternalSizes } from "../src/_internals.ts";

/** The secret the soak's client sends. */
export const SOAK_SECRET = "soak-bench-secret-0123456789";

/** What `GET /soak/stats` answers. */
export interface SoakStats {
  rssMb: number;
  heapUsedMb: number;
  /** The pool's bookkeeping (`src/_internals.ts`). */
  pool: InternalSizes;
  /** Summed over the open connections. */
  conns: InternalSizes;
  /** Open connections counted in `conns`. */
  connCount: number;
  /** Open file descriptors (`/proc/self/fd`); NaN without `/proc`. */
  fds: number;
  /** `process.getActiveResourcesInfo()` by kind. */
  resources: Record<string, number>;
  /** How the collection was forced, or "none". */
  gc: string;
}

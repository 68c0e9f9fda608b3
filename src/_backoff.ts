/** Delays between retries of an overloaded (-32001) call. */
export interface BackoffOptions {
  /** Upper bound of the first delay. Defaults to 100 ms. */
  initialDelayMs?: number;
  /** Upper bound of any delay. Defaults to 2 s. */
  maxDelayMs?: number;
}

/**
 * Exponential backoff with full jitter: a uniform delay in [0, min(max, initial · 2^n)),
 * so a crowd of overloaded callers spreads out instead of retrying in lockstep.
 *
 * @param attempt 0 for the first retry.
 * @param options Bounds of the delay.
 * @param random Source of randomness in [0, 1).
 * @returns The delay in milliseconds.
 */
export function backoffDelay(
  attempt: number,
  options: BackoffOptions = {},
  random: () => number = Math.random,
): number {
  const initial = options.initialDelayMs ?? 100;
  const max = options.maxDelayMs ?? 2_000;
  const ceiling = Math.min(max, initial * 2 ** Math.min(attempt, 30));
  return Math.floor(random() * ceiling);
}

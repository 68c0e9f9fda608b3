/**
 * The longest delay `setTimeout` and `setInterval` honour. Node and Deno fire a longer one
 * after 1 ms (with a warning on Node), and Bun likewise misbehaves, so every timer whose
 * delay comes from configuration or a caller goes through {@linkcode timerDelay}.
 */
export const MAX_TIMER_DELAY_MS = 2 ** 31 - 1;

/**
 * Clamps a delay into what timers honour: 0 to {@linkcode MAX_TIMER_DELAY_MS}. A timer that
 * fires early because of the cap must check its real deadline and re-arm itself.
 *
 * @param ms The wanted delay in milliseconds.
 * @returns The delay to pass to `setTimeout`.
 */
export function timerDelay(ms: number): number {
  if (!(ms > 0)) return 0;
  return ms > MAX_TIMER_DELAY_MS ? MAX_TIMER_DELAY_MS : ms;
}

/**
 * Lets a timer not keep the process alive, on every runtime: Node, Bun and Deno 2's
 * timer objects have `unref()`; where a timer is a numeric id, Deno's `unrefTimer` does it,
 * and elsewhere nothing can.
 *
 * @param timer What `setTimeout` or `setInterval` returned.
 */
export function unrefTimer(timer: unknown): void {
  if (typeof timer === "object" && timer !== null && "unref" in timer) {
    (timer as { unref(): void }).unref();
    return;
  }
  const deno = (globalThis as { Deno?: { unrefTimer?(id: number): void } }).Deno;
  if (typeof timer === "number") deno?.unrefTimer?.(timer);
}

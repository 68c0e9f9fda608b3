/**
 * One abort signal per call for "the caller gave up, the deadline passed, or the connection
 * closed".
 *
 * AbortSignal.any + AbortSignal.timeout would do the same, but a 5-minute timeout timer per
 * turn would then outlive every turn that finishes early (thousands of them under load),
 * and dependent signals of a long-lived connection signal are only released by GC. Here the
 * timer is cleared and the listeners removed as soon as the call settles.
 */

/** A call's combined signal, and the cleanup that must run when the call settles. */
export interface Scope {
  /** Aborts on caller abort, deadline or close; its reason is the first cause. */
  readonly signal: AbortSignal;
  /** Epoch ms at which the deadline passes. */
  readonly deadline: number;
  /** True once the deadline, and not the caller or a close, aborted the scope. */
  readonly timedOut: boolean;
  /** Clears the timer and detaches from the parent signals. Idempotent. */
  dispose(): void;
}

/**
 * Creates a scope over the given parent signals with a deadline `timeoutMs` from now.
 *
 * @param parents Signals whose abort aborts the scope with the same reason.
 * @param timeoutMs Milliseconds until the scope aborts with a `TimeoutError` DOMException.
 * @returns The scope; call `dispose()` when the call settles.
 */
export function createScope(parents: (AbortSignal | undefined)[], timeoutMs: number): Scope {
  const controller = new AbortController();
  const detach: (() => void)[] = [];
  let timedOut = false;
  let timer: ReturnType<typeof setTimeout> | undefined;
  function dispose(): void {
    if (timer !== undefined) clearTimeout(timer);
    timer = undefined;
    for (const fn of detach.splice(0)) fn();
  }
  for (const parent of parents) {
    if (!parent) continue;
    if (parent.aborted) {
      controller.abort(parent.reason);
      break;
    }
    const onAbort = () => {
      controller.abort(parent.reason);
      dispose();
    };
    parent.addEventListener("abort", onAbort, { once: true });
    detach.push(() => parent.removeEventListener("abort", onAbort));
  }
  if (!controller.signal.aborted) {
    timer = setTimeout(() => {
      timedOut = true;
      controller.abort(new DOMException(`Timed out after ${timeoutMs} ms`, "TimeoutError"));
      dispose();
    }, timeoutMs);
  } else {
    dispose();
  }
  return {
    signal: controller.signal,
    deadline: Date.now() + timeoutMs,
    get timedOut() {
      return timedOut;
    },
    dispose,
  };
}

/**
 * Resolves with `promise`, or rejects with `signal.reason` as soon as `signal` aborts.
 *
 * @param promise The work to wait for.
 * @param signal Aborts the wait (the work itself is not cancelled).
 * @returns The work's result.
 */
export function abortable<T>(promise: Promise<T>, signal: AbortSignal): Promise<T> {
  if (signal.aborted) return Promise.reject(signal.reason);
  return new Promise<T>((resolve, reject) => {
    const onAbort = () => reject(signal.reason);
    signal.addEventListener("abort", onAbort, { once: true });
    promise.then(
      (value) => {
        signal.removeEventListener("abort", onAbort);
        resolve(value);
      },
      (error) => {
        signal.removeEventListener("abort", onAbort);
        reject(error);
      },
    );
  });
}

/**
 * Waits `ms` milliseconds unless `signal` aborts first (then rejects with its reason).
 *
 * @param ms Delay in milliseconds.
 * @param signal Cancels the wait.
 * @returns A promise that resolves after the delay.
 */
export function delay(ms: number, signal: AbortSignal): Promise<void> {
  if (signal.aborted) return Promise.reject(signal.reason);
  return new Promise<void>((resolve, reject) => {
    const onAbort = () => {
      clearTimeout(timer);
      reject(signal.reason);
    };
    const timer = setTimeout(() => {
      signal.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    signal.addEventListener("abort", onAbort, { once: true });
  });
}

/**
 * One abort signal per call for "the caller gave up, the deadline passed, or the connection
 * closed", made cheap enough for the per-turn hot path.
 *
 * AbortSignal.any + AbortSignal.timeout would express the same, but a 5-minute timer per
 * turn would outlive every turn that finishes early (thousands under load), and dependent
 * signals of a long-lived connection signal are only released by GC. A plain scope with a
 * cleared timer fixed that but still cost a timer and several event listeners per turn, the
 * largest share of the broker's CPU per turn over a minimal client (bench/). So a
 * connection keeps a {@linkcode DeadlineClock} that serves every call's deadline with one
 * timer per timeout value, and waits subscribe to a scope through a plain callback list.
 */

/** A call's combined signal, and the cleanup that must run when the call settles. */
export interface Scope {
  /** Aborts on caller abort, deadline or close; its reason is the first cause. */
  readonly signal: AbortSignal;
  /** `performance.now()` at which the deadline passes. */
  readonly deadline: number;
  /** True once the deadline, and not the caller or a close, aborted the scope. */
  readonly timedOut: boolean;
  /** Runs `fn(reason)` when the scope aborts; returns the function that unsubscribes. */
  onAbort(fn: (reason: unknown) => void): () => void;
  /** Clears the deadline and detaches from the parent signals. Idempotent. */
  dispose(): void;
}

class ScopeImpl implements Scope {
  readonly #controller = new AbortController();
  readonly deadline: number;
  readonly timeoutMs: number;
  timedOut = false;
  #hooks: ((reason: unknown) => void)[] = [];
  #detach: (() => void)[] = [];
  #timer: ReturnType<typeof setTimeout> | undefined;
  #clock: DeadlineClock | undefined;

  constructor(timeoutMs: number) {
    this.timeoutMs = timeoutMs;
    this.deadline = performance.now() + timeoutMs;
  }

  get signal(): AbortSignal {
    return this.#controller.signal;
  }

  start(parents: (AbortSignal | undefined)[], clock: DeadlineClock | undefined): void {
    for (const parent of parents) {
      if (!parent) continue;
      if (parent.aborted) {
        this.abort(parent.reason);
        return;
      }
      const onAbort = () => this.abort(parent.reason);
      parent.addEventListener("abort", onAbort, { once: true });
      this.#detach.push(() => parent.removeEventListener("abort", onAbort));
    }
    if (clock) {
      if (clock.closedReason !== undefined) {
        this.abort(clock.closedReason);
        return;
      }
      this.#clock = clock;
      clock.add(this);
    } else {
      this.#timer = setTimeout(() => this.expire(), this.timeoutMs);
    }
  }

  expire(): void {
    if (this.#controller.signal.aborted) return;
    this.timedOut = true;
    this.abort(new DOMException(`Timed out after ${this.timeoutMs} ms`, "TimeoutError"));
  }

  abort(reason: unknown): void {
    if (this.#controller.signal.aborted) return;
    this.#controller.abort(reason);
    const hooks = this.#hooks;
    this.#hooks = [];
    this.dispose();
    for (const fn of hooks) fn(reason);
  }

  onAbort(fn: (reason: unknown) => void): () => void {
    this.#hooks.push(fn);
    return () => {
      const index = this.#hooks.lastIndexOf(fn);
      if (index !== -1) this.#hooks.splice(index, 1);
    };
  }

  dispose(): void {
    if (this.#timer !== undefined) clearTimeout(this.#timer);
    this.#timer = undefined;
    this.#clock?.delete(this);
    this.#clock = undefined;
    if (this.#detach.length > 0) { for (const fn of this.#detach.splice(0)) fn(); }
  }
}

interface Queue {
  readonly scopes: Set<ScopeImpl>;
  timer: ReturnType<typeof setTimeout> | undefined;
}

/**
 * The deadlines of one connection's calls. Calls with the same timeout expire in the order
 * they started, so one FIFO and one timer per timeout value serve them all: adding and
 * removing a call is a Set operation instead of setTimeout + clearTimeout. A timer stays
 * armed for the oldest call of its queue (settled calls are skipped when it fires), and
 * {@linkcode DeadlineClock.close} clears them all.
 */
export class DeadlineClock {
  #queues = new Map<number, Queue>();
  /** Set by close(); scopes created afterwards abort at once with it. */
  closedReason: unknown = undefined;

  /** Starts tracking a scope's deadline. */
  add(scope: ScopeImpl): void {
    let queue = this.#queues.get(scope.timeoutMs);
    if (!queue) {
      queue = { scopes: new Set(), timer: undefined };
      this.#queues.set(scope.timeoutMs, queue);
    }
    queue.scopes.add(scope);
    if (queue.timer === undefined) this.#arm(scope.timeoutMs, queue, scope.deadline);
  }

  /** Stops tracking a settled scope. */
  delete(scope: ScopeImpl): void {
    this.#queues.get(scope.timeoutMs)?.scopes.delete(scope);
  }

  #arm(timeoutMs: number, queue: Queue, at: number): void {
    if (queue.timer !== undefined) clearTimeout(queue.timer);
    queue.timer = setTimeout(() => {
      queue.timer = undefined;
      const now = performance.now();
      for (const scope of queue.scopes) {
        if (scope.deadline > now) {
          this.#arm(timeoutMs, queue, scope.deadline);
          return;
        }
        queue.scopes.delete(scope);
        scope.expire();
      }
      if (queue.scopes.size === 0 && queue.timer === undefined) this.#queues.delete(timeoutMs);
    }, Math.max(0, at - performance.now()));
  }

  /**
   * Aborts every live scope with `reason` and clears the timers; scopes created later abort
   * at once.
   *
   * @param reason The abort reason, e.g. the connection's close error.
   */
  close(reason: unknown): void {
    this.closedReason = reason;
    const scopes: ScopeImpl[] = [];
    for (const queue of this.#queues.values()) {
      if (queue.timer !== undefined) clearTimeout(queue.timer);
      scopes.push(...queue.scopes);
    }
    this.#queues.clear();
    for (const scope of scopes) scope.abort(reason);
  }
}

/**
 * Creates a scope over the given parent signals with a deadline `timeoutMs` from now.
 *
 * @param parents Signals whose abort aborts the scope with the same reason.
 * @param timeoutMs Milliseconds until the scope aborts with a `TimeoutError` DOMException.
 * @param clock Serves the deadline without a timer of its own; without one, a timer does.
 * @returns The scope; call `dispose()` when the call settles.
 */
export function createScope(
  parents: (AbortSignal | undefined)[],
  timeoutMs: number,
  clock?: DeadlineClock,
): Scope {
  const scope = new ScopeImpl(timeoutMs);
  scope.start(parents, clock);
  return scope;
}

/**
 * Resolves with `promise`, or rejects with the abort reason as soon as `signal` aborts.
 *
 * @param promise The work to wait for.
 * @param signal An abort signal, or a scope (cheaper: no event listener).
 * @returns The work's result.
 */
export function abortable<T>(promise: Promise<T>, signal: AbortSignal | Scope): Promise<T> {
  if (!(signal instanceof AbortSignal)) {
    const scope = signal;
    if (scope.signal.aborted) return Promise.reject(scope.signal.reason);
    return new Promise<T>((resolve, reject) => {
      const off = scope.onAbort(reject);
      promise.then(
        (value) => {
          off();
          resolve(value);
        },
        (error) => {
          off();
          reject(error);
        },
      );
    });
  }
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

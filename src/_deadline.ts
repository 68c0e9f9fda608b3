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
 * timer, and waits subscribe to a scope through a plain callback list.
 */

import { MAX_TIMER_DELAY_MS, timerDelay } from "./_timer.ts";

/** A call's combined signal, and the cleanup that must run when the call settles. */
export interface Scope {
  /**
   * Aborts on caller abort, deadline or close; its reason is the first cause. Made on first
   * use: code of this package asks {@linkcode Scope.aborted} and {@linkcode Scope.onAbort}.
   */
  readonly signal: AbortSignal;
  /** Whether the scope has aborted. */
  readonly aborted: boolean;
  /** Why it aborted, once it has. */
  readonly reason: unknown;
  /** `performance.now()` at which the deadline passes. */
  readonly deadline: number;
  /** True once the deadline, and not the caller or a close, aborted the scope. */
  readonly timedOut: boolean;
  /** Runs `fn(reason)` when the scope aborts; returns the function that unsubscribes. */
  onAbort(fn: (reason: unknown) => void): () => void;
  /** Aborts the scope now with `reason`, unless it has aborted already. */
  abort(reason: unknown): void;
  /** Clears the deadline and detaches from the parent signals. Idempotent. */
  dispose(): void;
}

/** What a {@linkcode DeadlineClock} keeps in its heap: a scope, or an alarm. */
interface ClockEntry {
  readonly deadline: number;
  /** Position in its clock's heap; -1 while not in one. */
  heapIndex: number;
  /** The deadline passed. */
  expire(): void;
  /** The clock closed with `reason`. */
  abort(reason: unknown): void;
}

/** Callbacks run once, with the abort reason: a scope's and a hooked signal's listeners. */
class Hooks {
  #fns: ((reason: unknown) => void)[] = [];

  /** Adds `fn`; returns the function that removes it. */
  add(fn: (reason: unknown) => void): () => void {
    this.#fns.push(fn);
    return () => {
      const index = this.#fns.lastIndexOf(fn);
      if (index !== -1) this.#fns.splice(index, 1);
    };
  }

  /** Runs and forgets every callback; one added or removed meanwhile is not run. */
  run(reason: unknown): void {
    const fns = this.#fns;
    this.#fns = [];
    for (const fn of fns) fn(reason);
  }
}

// The HookedController of a signal one made, on the signal itself: a WeakMap entry per turn
// made the garbage collector's work grow on Node.
const HOOKED = Symbol("hookedController");

interface HookedSignal extends AbortSignal {
  [HOOKED]?: HookedController;
}

/**
 * An abort controller whose signal the scopes and waits of this module hear through a plain
 * callback list instead of an event listener: a turn's signal is heard by a scope per call
 * and by its waits, and adding and removing `EventTarget` listeners for them was 3–4% of
 * the broker's CPU per turn on Bun with an instant codex. Listeners added by anyone else
 * hear the abort event as usual, first.
 */
export class HookedController {
  readonly #controller = new AbortController();
  readonly #hooks = new Hooks();

  /** Makes a controller whose signal has not aborted. */
  constructor() {
    (this.#controller.signal as HookedSignal)[HOOKED] = this;
  }

  /** The signal. */
  get signal(): AbortSignal {
    return this.#controller.signal;
  }

  /**
   * Aborts the signal, then runs the hooks with its reason. Idempotent.
   *
   * @param reason The reason; without one, an `AbortError` DOMException, as for any signal.
   */
  abort(reason?: unknown): void {
    const signal = this.#controller.signal;
    if (signal.aborted) return;
    this.#controller.abort(reason);
    this.#hooks.run(signal.reason);
  }

  /**
   * Runs `fn(reason)` when the signal aborts (never if it has already).
   *
   * @param fn The hook.
   * @returns The function that removes it.
   */
  hook(fn: (reason: unknown) => void): () => void {
    return this.#hooks.add(fn);
  }
}

class ScopeImpl implements Scope, ClockEntry {
  // Made only when someone asks for the signal: a controller per call was 2% of the
  // broker's CPU per turn on Bun, and the calls of a turn never ask.
  #controller: AbortController | undefined;
  #aborted = false;
  #reason: unknown;
  readonly deadline: number;
  readonly timeoutMs: number;
  timedOut = false;
  /** Position in its clock's heap; -1 while not in one. */
  heapIndex = -1;
  readonly #hooks = new Hooks();
  #detach: (() => void)[] = [];
  #timer: ReturnType<typeof setTimeout> | undefined;
  #clock: DeadlineClock | undefined;

  constructor(timeoutMs: number) {
    this.timeoutMs = timeoutMs;
    this.deadline = performance.now() + timeoutMs;
  }

  get signal(): AbortSignal {
    if (this.#controller === undefined) {
      this.#controller = new AbortController();
      if (this.#aborted) this.#controller.abort(this.#reason);
    }
    return this.#controller.signal;
  }

  get aborted(): boolean {
    return this.#aborted;
  }

  get reason(): unknown {
    return this.#reason;
  }

  start(parents: (AbortSignal | undefined)[], clock: DeadlineClock | undefined): void {
    for (const parent of parents) {
      if (!parent) continue;
      if (parent.aborted) {
        this.abort(parent.reason);
        return;
      }
      this.#detach.push(onAbort(parent, (reason) => this.abort(reason)));
    }
    if (clock) {
      if (clock.closedReason !== undefined) {
        this.abort(clock.closedReason);
        return;
      }
      this.#clock = clock;
      clock.add(this);
    } else {
      this.#arm();
    }
  }

  #arm(): void {
    this.#timer = setTimeout(() => {
      this.#timer = undefined;
      // A delay past the timer cap fires early: wait on until the real deadline.
      if (this.deadline > performance.now()) this.#arm();
      else this.expire();
    }, timerDelay(this.deadline - performance.now()));
  }

  expire(): void {
    if (this.#aborted) return;
    this.timedOut = true;
    this.abort(new DOMException(`Timed out after ${this.timeoutMs} ms`, "TimeoutError"));
  }

  abort(reason: unknown): void {
    if (this.#aborted) return;
    this.#aborted = true;
    this.#reason = reason;
    this.#controller?.abort(reason);
    this.dispose();
    this.#hooks.run(reason);
  }

  onAbort(fn: (reason: unknown) => void): () => void {
    return this.#hooks.add(fn);
  }

  dispose(): void {
    if (this.#timer !== undefined) clearTimeout(this.#timer);
    this.#timer = undefined;
    this.#clock?.delete(this);
    this.#clock = undefined;
    if (this.#detach.length > 0) { for (const fn of this.#detach.splice(0)) fn(); }
  }
}

/** A callback at a time, served by a clock's timer; closing the clock drops it. */
class Alarm implements ClockEntry {
  readonly deadline: number;
  heapIndex = -1;
  #fn: (() => void) | undefined;

  constructor(deadline: number, fn: () => void) {
    this.deadline = deadline;
    this.#fn = fn;
  }

  expire(): void {
    const fn = this.#fn;
    this.#fn = undefined;
    fn?.();
  }

  abort(): void {
    this.#fn = undefined;
  }
}

/**
 * The deadlines of one connection's calls, in a min-heap by deadline, served by one timer.
 * Adding and removing a call costs a heap operation instead of setTimeout + clearTimeout.
 * The timer is armed no later than the earliest deadline: a call that settles early leaves
 * it armed (when it fires, it finds nothing due and re-arms for the new earliest), but once
 * no call is left the timer is cleared, so finished calls never leave a timer behind.
 * {@linkcode DeadlineClock.close} clears it too.
 */
export class DeadlineClock {
  #heap: ClockEntry[] = [];
  #timer: ReturnType<typeof setTimeout> | undefined;
  /** `performance.now()` the timer is armed for; Infinity while disarmed. */
  #armedAt = Infinity;
  /** Set by close(); scopes created afterwards abort at once with it. */
  closedReason: unknown = undefined;

  /** How many scopes are tracked. */
  get size(): number {
    return this.#heap.length;
  }

  /**
   * Calls `fn` once, `delayMs` from now, unless cancelled or the clock closes first. Costs a
   * heap entry rather than a timer of its own.
   *
   * @param delayMs Milliseconds from now.
   * @param fn The callback; it must not throw.
   * @returns Cancels the alarm. Idempotent.
   */
  alarm(delayMs: number, fn: () => void): () => void {
    if (this.closedReason !== undefined) return () => {};
    const alarm = new Alarm(performance.now() + delayMs, fn);
    this.add(alarm);
    return () => {
      alarm.abort();
      this.delete(alarm);
    };
  }

  /** Starts tracking a scope's deadline. */
  add(scope: ClockEntry): void {
    const heap = this.#heap;
    heap.push(scope);
    this.#siftUp(scope, heap.length - 1);
    if (scope.deadline < this.#armedAt) this.#arm(scope.deadline);
  }

  /** Stops tracking a settled scope; disarms the clock when it was the last one. */
  delete(scope: ClockEntry): void {
    const index = scope.heapIndex;
    if (index === -1) return;
    this.#removeAt(index);
    if (this.#heap.length === 0 && this.#timer !== undefined) {
      clearTimeout(this.#timer);
      this.#timer = undefined;
      this.#armedAt = Infinity;
    }
  }

  #arm(at: number): void {
    if (this.#timer !== undefined) clearTimeout(this.#timer);
    this.#armedAt = at;
    this.#timer = setTimeout(this.#fire, timerDelay(at - performance.now()));
  }

  #fire = (): void => {
    this.#timer = undefined;
    this.#armedAt = Infinity;
    const heap = this.#heap;
    const now = performance.now();
    const due: ClockEntry[] = [];
    while (heap.length > 0 && heap[0]!.deadline <= now) {
      const scope = heap[0]!;
      this.#removeAt(0);
      due.push(scope);
    }
    // Also re-arms after a capped delay fired before the real deadline.
    if (heap.length > 0) this.#arm(heap[0]!.deadline);
    for (const scope of due) scope.expire();
  };

  #removeAt(index: number): void {
    const heap = this.#heap;
    const removed = heap[index]!;
    removed.heapIndex = -1;
    const last = heap.pop()!;
    if (index === heap.length) return;
    this.#siftDown(last, index);
    if (last.heapIndex === index) this.#siftUp(last, index);
  }

  #siftUp(scope: ClockEntry, index: number): void {
    const heap = this.#heap;
    while (index > 0) {
      const parentIndex = (index - 1) >> 1;
      const parent = heap[parentIndex]!;
      if (parent.deadline <= scope.deadline) break;
      heap[index] = parent;
      parent.heapIndex = index;
      index = parentIndex;
    }
    heap[index] = scope;
    scope.heapIndex = index;
  }

  #siftDown(scope: ClockEntry, index: number): void {
    const heap = this.#heap;
    const length = heap.length;
    for (;;) {
      let child = 2 * index + 1;
      if (child >= length) break;
      const right = child + 1;
      if (right < length && heap[right]!.deadline < heap[child]!.deadline) child = right;
      const next = heap[child]!;
      if (next.deadline >= scope.deadline) break;
      heap[index] = next;
      next.heapIndex = index;
      index = child;
    }
    heap[index] = scope;
    scope.heapIndex = index;
  }

  /**
   * Aborts every live scope with `reason` and clears the timer; scopes created later abort
   * at once.
   *
   * @param reason The abort reason, e.g. the connection's close error.
   */
  close(reason: unknown): void {
    this.closedReason = reason;
    if (this.#timer !== undefined) clearTimeout(this.#timer);
    this.#timer = undefined;
    this.#armedAt = Infinity;
    const scopes = this.#heap;
    this.#heap = [];
    for (const scope of scopes) scope.heapIndex = -1;
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
  if (signal.aborted) return Promise.reject(signal.reason);
  return new Promise<T>((resolve, reject) => {
    const off = onAbort(signal, reject);
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

/**
 * Calls `fn(reason)` once `signal` aborts: a scope's own hook list, or an event listener.
 *
 * @param signal An abort signal, or a scope or the signal of a {@linkcode HookedController}
 * (cheaper: no event listener).
 * @param fn Called with the abort reason.
 * @returns The function that unsubscribes.
 */
export function onAbort(signal: AbortSignal | Scope, fn: (reason: unknown) => void): () => void {
  if (!(signal instanceof AbortSignal)) return signal.onAbort(fn);
  const hooked = (signal as HookedSignal)[HOOKED];
  if (hooked !== undefined) return hooked.hook(fn);
  const listener = () => fn(signal.reason);
  signal.addEventListener("abort", listener, { once: true });
  return () => signal.removeEventListener("abort", listener);
}

/**
 * Waits `ms` milliseconds unless `signal` aborts first (then rejects with its reason). A
 * delay past the timer cap waits in several timers.
 *
 * @param ms Delay in milliseconds.
 * @param signal Cancels the wait: an abort signal, or a scope (cheaper: no event listener).
 * @returns A promise that resolves after the delay.
 */
export function delay(ms: number, signal: AbortSignal | Scope): Promise<void> {
  if (signal.aborted) return Promise.reject(signal.reason);
  return new Promise<void>((resolve, reject) => {
    const end = performance.now() + ms;
    let timer: ReturnType<typeof setTimeout>;
    const arm = (wait: number) => {
      timer = setTimeout(() => {
        if (wait > MAX_TIMER_DELAY_MS) {
          arm(end - performance.now());
          return;
        }
        off();
        resolve();
      }, timerDelay(wait));
    };
    const off = onAbort(signal, (reason) => {
      clearTimeout(timer);
      reject(reason);
    });
    arm(ms);
  });
}

// Watches the timers code under test arms, by wrapping the global setTimeout and
// clearTimeout (looked up at call time, so every module sees the wrappers) until restore().
// Only timers armed while tracking are counted.

/** A timer armed while tracking. */
export interface TrackedTimer {
  /** The delay asked of setTimeout. */
  readonly delay: number;
  /** Runs the callback now, as if the timer had fired (early, e.g. because of a cap). */
  fire(): void;
}

export interface TimerTracker {
  /** Timers armed while tracking that have neither fired nor been cleared. */
  live(): TrackedTimer[];
  /** Every delay asked of setTimeout while tracking, in order. */
  readonly delays: number[];
  /** Puts the original functions back. */
  restore(): void;
}

type Handle = ReturnType<typeof setTimeout>;

export function trackTimers(): TimerTracker {
  const originalSet = globalThis.setTimeout;
  const originalClear = globalThis.clearTimeout;
  const live = new Map<Handle, TrackedTimer>();
  const delays: number[] = [];
  const wrappedSet = (fn: (...args: unknown[]) => void, delay?: number, ...args: unknown[]) => {
    delays.push(Number(delay ?? 0));
    const handle: Handle = originalSet(() => {
      live.delete(handle);
      fn(...args);
    }, delay);
    live.set(handle, {
      delay: Number(delay ?? 0),
      fire() {
        if (!live.delete(handle)) return;
        originalClear(handle);
        fn(...args);
      },
    });
    return handle;
  };
  const wrappedClear = (handle?: Handle) => {
    if (handle !== undefined) live.delete(handle);
    originalClear(handle);
  };
  globalThis.setTimeout = wrappedSet as typeof setTimeout;
  globalThis.clearTimeout = wrappedClear as typeof clearTimeout;
  return {
    live: () => [...live.values()],
    delays,
    restore() {
      globalThis.setTimeout = originalSet;
      globalThis.clearTimeout = originalClear;
    },
  };
}

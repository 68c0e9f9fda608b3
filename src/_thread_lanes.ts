import { onAbort, type Scope } from "./_deadline.ts";
import { KeyTable } from "./_key_table.ts";

interface Waiter {
  readonly grant: () => void;
}

interface Lane {
  readonly waiters: Waiter[];
}

/**
 * A FIFO mutex per thread id. codex merges a second turn/start into the thread's active
 * turn and returns an id that never completes, so turns on one thread wait in line here.
 * A lane exists only while held, so idle threads cost nothing.
 */
export class ThreadLanes {
  #lanes = new KeyTable<string, Lane>();

  /** Threads whose lane is held. */
  get size(): number {
    return this.#lanes.size;
  }

  /**
   * Waits for the thread's turn in line.
   *
   * @param threadId The thread.
   * @param signal Leaves the line; the promise then rejects with `signal.reason`.
   * @returns A function that releases the lane to the next waiter. Call it exactly once.
   */
  acquire(threadId: string, signal: AbortSignal | Scope): Promise<() => void> {
    if (signal.aborted) return Promise.reject(signal.reason);
    let released = false;
    const release = () => {
      if (released) return;
      released = true;
      this.#release(threadId);
    };
    const lane = this.#lanes.get(threadId);
    if (!lane) {
      this.#lanes.set(threadId, { waiters: [] });
      return Promise.resolve(release);
    }
    return new Promise<() => void>((resolve, reject) => {
      const waiter: Waiter = {
        grant: () => {
          off();
          resolve(release);
        },
      };
      const off = onAbort(signal, (reason) => {
        const index = lane.waiters.indexOf(waiter);
        if (index !== -1) lane.waiters.splice(index, 1);
        reject(reason);
      });
      lane.waiters.push(waiter);
    });
  }

  #release(threadId: string): void {
    const lane = this.#lanes.get(threadId);
    if (!lane) return;
    const next = lane.waiters.shift();
    if (next) next.grant();
    else this.#lanes.delete(threadId);
  }
}

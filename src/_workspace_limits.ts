/**
 * Per-workspace admission of turns: at most `maxRunning` at once per workspace, and at most
 * `maxWaiting` more in line; past that a turn is refused at once (the handler answers 429),
 * so one workspace cannot take all of a broker. Web-standard.
 *
 * @module
 */

import { onAbort } from "./_deadline.ts";
import { KeyTable } from "./_key_table.ts";

/** A turn's place: running, or in line for a slot. */
export interface Admission {
  /**
   * Resolves once the turn holds a running slot.
   *
   * @param signal Leaves the line; the promise then rejects with `signal.reason`.
   */
  ready(signal: AbortSignal): Promise<void>;
  /** Gives the slot (or the place in line) back. Idempotent. */
  release(): void;
}

interface Waiter {
  readonly grant: () => void;
}

interface Lane {
  running: number;
  readonly waiters: Waiter[];
}

/** The running and waiting turns of every workspace that has any. */
export class WorkspaceLimits {
  readonly maxRunning: number;
  readonly maxWaiting: number;
  #lanes = new KeyTable<string, Lane>();

  /**
   * Creates the limits.
   *
   * @param maxRunning Turns at once per workspace.
   * @param maxWaiting Turns in line per workspace.
   */
  constructor(maxRunning: number, maxWaiting: number) {
    this.maxRunning = maxRunning;
    this.maxWaiting = maxWaiting;
  }

  /**
   * Takes a running slot or a place in line for a turn of the workspace.
   *
   * @param workspaceId The workspace.
   * @returns The admission, or `undefined` when the workspace has `maxRunning` turns running
   * and `maxWaiting` waiting already.
   */
  admit(workspaceId: string): Admission | undefined {
    let lane = this.#lanes.get(workspaceId);
    if (!lane) {
      lane = { running: 0, waiters: [] };
      this.#lanes.set(workspaceId, lane);
    }
    const current = lane;
    let state: "running" | "waiting" | "released";
    let waiter: Waiter | undefined;
    let granted: (() => void) | undefined;
    if (current.running < this.maxRunning) {
      current.running++;
      state = "running";
    } else if (current.waiters.length < this.maxWaiting) {
      state = "waiting";
      waiter = {
        grant: () => {
          state = "running";
          granted?.();
        },
      };
      current.waiters.push(waiter);
    } else {
      return undefined;
    }
    const release = () => {
      if (state === "released") return;
      if (state === "running") {
        const next = current.waiters.shift();
        // The slot passes straight to the next in line.
        if (next) next.grant();
        else current.running--;
      } else {
        current.waiters.splice(current.waiters.indexOf(waiter!), 1);
      }
      state = "released";
      if (current.running === 0 && current.waiters.length === 0) {
        this.#lanes.delete(workspaceId);
      }
    };
    return {
      ready(signal) {
        if (state === "running") return Promise.resolve();
        if (state === "released") return Promise.reject(new Error("Admission was released"));
        if (signal.aborted) return Promise.reject(signal.reason);
        return new Promise<void>((resolve, reject) => {
          const off = onAbort(signal, (reason) => {
            granted = undefined;
            reject(reason);
          });
          granted = () => {
            off();
            resolve();
          };
        });
      },
      release,
    };
  }

  /**
   * How many turns of the workspace run and wait.
   *
   * @param workspaceId The workspace.
   * @returns The counts, zero for a workspace with none.
   */
  load(workspaceId: string): { running: number; waiting: number } {
    const lane = this.#lanes.get(workspaceId);
    return { running: lane?.running ?? 0, waiting: lane?.waiters.length ?? 0 };
  }
}

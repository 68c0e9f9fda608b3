/**
 * The turns a connection runs, one per thread, and the routing of each thread's
 * notifications to its running turn: its own notifications to the caller, its items
 * collected, its `turn/completed` resolving it. A turn waiting in line for its thread is
 * not registered here, so it holds nothing.
 *
 * @module
 */

import { TurnRpcError } from "./errors.ts";
import { KeyTable } from "./_key_table.ts";
import { ITEM_COMPLETED, type ThreadItem, type Turn, TURN_COMPLETED } from "./protocol.ts";
import { type DroppedFrames, isObject } from "./_rpc_session.ts";

/** Receives a turn's own notifications. */
export type TurnNotificationCallback = (method: string, params: Record<string, unknown>) => void;

/** A notification of the thread that arrived before the turn id was known. */
interface EarlyNotification {
  readonly method: string;
  readonly turnId: unknown;
  readonly params: Record<string, unknown>;
}

/** What the connection knows of the one turn it runs on a thread. */
export interface ActiveTurn {
  /** The thread the turn runs on. */
  readonly threadId: string;
  /** Set from the turn/start response. */
  turnId: string | null;
  /** Every item/completed of the turn, in order. */
  readonly items: ThreadItem[];
  /**
   * The thread's notifications that arrived before the turn/start response told us the
   * turn id (codex does not order the two).
   */
  early: EarlyNotification[];
  /** The caller's notification callback, until it gives up. */
  onNotification: TurnNotificationCallback | undefined;
  /** Settles with the turn of the matching turn/completed, or the close error. */
  readonly completed: PromiseWithResolvers<Turn>;
  /** True once turn/completed was applied. */
  done: boolean;
  /** `Date.now()` of the frame with the turn's last notification (or its acceptance). */
  lastFrameAt: number;
  /** Set once the caller gave up: runs when codex has stopped the turn (or gave up on it). */
  onFinished: (() => void) | undefined;
  /** The size of the frames in {@linkcode early}; -1 once they overflowed. */
  earlyBytes: number;
  /** Told once the early notifications grow past their limit, which drops them. */
  onOverflow: ((error: TurnRpcError) => void) | undefined;
}

/** The turn a notification names: `turnId`, or `turn.id` (turn/started, turn/completed). */
function turnIdOf(method: string, params: Record<string, unknown>): unknown {
  if (method !== TURN_COMPLETED && params.turnId !== undefined) return params.turnId;
  return isObject(params.turn) ? params.turn.id : undefined;
}

/** Whether turn/completed params name their turn: `turn.id`, a string. */
function hasTurnId(params: unknown): boolean {
  return isObject(params) && isObject(params.turn) && typeof params.turn.id === "string";
}

/** The running turns of one connection, by thread. */
export class ActiveTurns {
  #turns = new KeyTable<string, ActiveTurn>();
  readonly #dropped: DroppedFrames;
  readonly #frameTime: () => number;
  readonly #maxEarlyBytes: number;

  /**
   * Creates an empty registry.
   *
   * @param dropped Counters; `unknownTurn` counts turn notifications nobody waits for.
   * @param frameTime `Date.now()` of the frame being handled, which the read loop has taken
   * already, so the clock is not read again per notification. Defaults to `Date.now`.
   * @param maxEarlyBytes The most bytes of frames a turn's notifications may take while
   * its turn/start response has not come. Defaults to 16 MiB.
   */
  constructor(
    dropped: DroppedFrames,
    frameTime: () => number = Date.now,
    maxEarlyBytes: number = 16 * 1024 * 1024,
  ) {
    this.#dropped = dropped;
    this.#frameTime = frameTime;
    this.#maxEarlyBytes = maxEarlyBytes;
  }

  /** Running turns, including turns still being interrupted. */
  get size(): number {
    return this.#turns.size;
  }

  /** Notifications held for turns whose turn/start response has not come yet. */
  get buffered(): number {
    let count = 0;
    for (const active of this.#turns.values()) count += active.early.length;
    return count;
  }

  /**
   * Registers the turn about to start on a thread. The caller holds the thread's lane, so
   * no other turn runs there.
   *
   * @param threadId The thread.
   * @param onNotification Receives the turn's own notifications.
   * @returns The turn's record.
   */
  open(threadId: string, onNotification: TurnNotificationCallback | undefined): ActiveTurn {
    const active: ActiveTurn = {
      threadId,
      turnId: null,
      items: [],
      early: [],
      onNotification,
      completed: Promise.withResolvers<Turn>(),
      done: false,
      lastFrameAt: this.#frameTime(),
      onFinished: undefined,
      earlyBytes: 0,
      onOverflow: undefined,
    };
    // Swallow here: the caller may have given up, and the rejection is read there if not.
    active.completed.promise.catch(() => {});
    this.#turns.set(threadId, active);
    return active;
  }

  /**
   * Sets the turn id from the turn/start result and replays what arrived before it.
   *
   * @param active The turn.
   * @param result The turn/start result.
   * @returns The turn id.
   * @throws {TurnRpcError} If the result names no turn.
   */
  bind(active: ActiveTurn, result: unknown): string {
    const turn = isObject(result) ? result.turn : undefined;
    if (!isObject(turn) || typeof turn.id !== "string") {
      throw new TurnRpcError("turn/start", -32603, "Invalid turn/start result: no turn id", result);
    }
    const turnId = turn.id;
    active.turnId = turnId;
    active.lastFrameAt = this.#frameTime();
    const early = active.early;
    active.early = [];
    for (const entry of early) {
      if (active.done) {
        // What came after the turn's turn/completed is no longer the turn's, as if routed
        // live once the turn had left the thread.
        this.#dropIfTurnNotification(entry.method);
      } else {
        this.#routeTo(active, entry.method, entry.turnId, entry.params, 0);
      }
    }
    return turnId;
  }

  /**
   * Forgets a turn, if it is still the one registered for its thread.
   *
   * @param active The turn.
   */
  remove(active: ActiveTurn): void {
    if (this.#turns.get(active.threadId) === active) this.#turns.delete(active.threadId);
  }

  /**
   * Routes one notification to the turn running on its thread, if any. Called from the read
   * loop for every notification.
   *
   * @param method The notification's method.
   * @param params Its params.
   * @param size The size of its frame, counted against the turn's early notifications.
   */
  route(method: string, params: unknown, size = 0): void {
    if (method === TURN_COMPLETED && !hasTurnId(params)) {
      // No turn to complete: it cannot be told from a turn that ran before. Dropped rather
      // than guessed; a caller left waiting is found by the silence watchdog.
      this.#dropped.invalidMessage++;
      return;
    }
    let active: ActiveTurn | undefined;
    if (isObject(params) && typeof params.threadId === "string") {
      active = this.#turns.get(params.threadId);
      if (active) {
        this.#routeTo(active, method, turnIdOf(method, params), params, size);
        return;
      }
    }
    this.#dropIfTurnNotification(method);
  }

  #dropIfTurnNotification(method: string): void {
    if (method === TURN_COMPLETED || method === ITEM_COMPLETED) this.#dropped.unknownTurn++;
  }

  /**
   * Completes a turn from codex's own record of it (`thread/read`), as if its turn/completed
   * had come: with the record's items when they are complete (`itemsView` `"full"`, the
   * schema's default), else with the items collected so far.
   *
   * @param active The turn.
   * @param turn codex's record of the turn, ended.
   */
  settle(active: ActiveTurn, turn: Turn): void {
    if (active.done) return;
    const view = turn.itemsView ?? "full";
    if (view === "full" && Array.isArray(turn.items)) {
      this.#complete(active, { ...turn, itemsView: "full" }, true);
    } else {
      this.#complete(active, turn);
    }
  }

  /**
   * Fails a turn that codex will not complete, and forgets it.
   *
   * @param active The turn.
   * @param error What the caller gets.
   */
  fail(active: ActiveTurn, error: unknown): void {
    if (active.done) return;
    active.done = true;
    this.remove(active);
    active.completed.reject(error);
    active.onFinished?.();
  }

  /**
   * Rejects every running turn with `error` and runs what waits for their end.
   *
   * @param error The close error.
   */
  closeAll(error: unknown): void {
    const turns = this.#turns.values();
    this.#turns.clear();
    for (const active of turns) {
      active.completed.reject(error);
      active.onFinished?.();
    }
  }

  #routeTo(
    active: ActiveTurn,
    method: string,
    turnId: unknown,
    params: Record<string, unknown>,
    size: number,
  ): void {
    if (active.turnId === null) {
      // turn/completed (and the rest) can be processed before the turn/start response.
      if (active.earlyBytes === -1) return; // overflowed: the turn is being given up
      active.earlyBytes += size;
      if (active.earlyBytes > this.#maxEarlyBytes) {
        active.early = [];
        active.earlyBytes = -1;
        active.onOverflow?.(
          new TurnRpcError(
            "turn/start",
            -32603,
            `Cannot run turn: codex sent more than ${this.#maxEarlyBytes} bytes of ` +
              "notifications for it before answering turn/start",
          ),
        );
        return;
      }
      active.early.push({ method, turnId, params });
    } else if (turnId === active.turnId) {
      active.lastFrameAt = this.#frameTime();
      this.#deliver(active, method, params);
      if (method === ITEM_COMPLETED) {
        if (isObject(params.item)) active.items.push(params.item as ThreadItem);
      } else if (method === TURN_COMPLETED) {
        this.#complete(active, params.turn as Turn);
      }
    } else if (turnId === undefined && method !== TURN_COMPLETED && method !== ITEM_COMPLETED) {
      active.lastFrameAt = this.#frameTime();
      this.#deliver(active, method, params);
    } else {
      this.#dropIfTurnNotification(method);
    }
  }

  #deliver(active: ActiveTurn, method: string, params: Record<string, unknown>): void {
    const fn = active.onNotification;
    if (!fn) return;
    try {
      fn(method, params);
    } catch {
      // The read loop must go on whatever a callback does.
    }
  }

  #complete(active: ActiveTurn, turn: Turn, asIs = false): void {
    active.done = true;
    this.remove(active);
    active.completed.resolve(
      !asIs && active.items.length > 0 ? { ...turn, items: active.items, itemsView: "full" } : turn,
    );
    active.onFinished?.();
  }
}

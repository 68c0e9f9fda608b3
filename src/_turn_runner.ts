/**
 * Runs one turn of the REST handler through the pool and maps every outcome (codex's turn,
 * a transport failure, a cancel, a shutdown) to the answer, the log entry and the metrics.
 * Web-standard.
 *
 * @module
 */

import {
  ConnectionClosedError,
  DialError,
  PoolClosedError,
  PoolFullError,
  RpcError,
  TimeoutError,
  TurnLostError,
  WorkspaceUnavailableError,
} from "./errors.ts";
import type { CodexError, ErrorAnswer, TransportFailure, TurnAnswer } from "./handler.ts";
import type { Metrics } from "./metrics.ts";
import type { Turn } from "./protocol.ts";
import type { Pool, PoolTurnOptions } from "./pool.ts";
import { HookedController, onAbort } from "./_deadline.ts";
import { KeyTable } from "./_key_table.ts";
import { OVERLOADED_CODE } from "./protocol.ts";
import type { ValidTurnRequest } from "./_validate.ts";
import type { Admission } from "./_workspace_limits.ts";

const RETRY_AFTER_SECONDS = "1";
// nginx's convention for "the client closed the request": the answer is for logs only,
// since nobody is left to read it.
const CLIENT_CLOSED_STATUS = 499;

/**
 * The 503 `unavailable` answer of a turn cut off by a shutdown. It names the thread the turn
 * ran on (`null` if none was started yet), as a transport failure does: a thread created
 * for this turn exists in codex, and a client that retries elsewhere continues it there.
 */
export interface ShutdownAnswer extends ErrorAnswer {
  /** The thread the turn ran on, or `null` if the shutdown came before one was started. */
  threadId: string | null;
}

/** What one turn came to, whichever way it is answered. */
export interface TurnResult {
  status: number;
  headers: Record<string, string>;
  body: TurnAnswer | ErrorAnswer | ShutdownAnswer;
}

/** Why the handler gave up on a streamed turn: its client read too slowly. */
export class SlowReaderError extends Error {
  /**
   * Creates the error.
   *
   * @param maxBufferBytes The bound the client fell behind by.
   */
  constructor(maxBufferBytes: number) {
    super(
      `Cannot stream turn: the client fell ${maxBufferBytes} bytes behind, so the turn was ` +
        `interrupted`,
    );
    this.name = "SlowReaderError";
  }
}

/**
 * Something that aborts a turn: a signal, or a subscription to an event (on `node:http`,
 * the client's connection closing) that calls `abort` at most once and returns how to
 * unsubscribe. A subscription spares the request an `AbortSignal` of its own.
 */
export type TurnAbortSource =
  | AbortSignal
  | ((abort: (reason: unknown) => void) => () => void);

/** Options for one run of a turn. */
export interface RunTurnOptions {
  /** Whether the answer is an event stream (for the log). */
  stream: boolean;
  /** What aborts the turn: the client going away, and the handler's own signal for a stream. */
  signals: readonly TurnAbortSource[];
  /** Called with the thread id as soon as it is known. */
  onThread?: (threadId: string) => void;
  /** Called with each notification of the turn. */
  onNotification?: (method: string, params: Record<string, unknown>) => void;
  /** The broker that forwarded the request here, if one did (for the log). */
  forwardedBy?: string | null;
  /** Who asked for the turn: `operator`, or a token's subject (for the log). */
  principal?: string;
  /** The turn's place under the workspace's limits: waited for first, released at the end. */
  admission?: Admission;
}

/** What a turn runner needs besides the pool. */
export interface TurnRunnerOptions {
  metrics: Metrics;
  log: (entry: Record<string, unknown>) => void;
  shutdownSignal?: AbortSignal | undefined;
}

/**
 * The broker's stable `code` for codex's `codexErrorInfo`: `unauthorized` for codex's own
 * `unauthorized` and for any provider answer with HTTP status 401; else codex's string value,
 * or the name of its object variant (e.g. `httpConnectionFailed`); `other` when codex gave
 * none.
 *
 * @param info `codexErrorInfo` as codex sent it.
 * @returns The code.
 */
export function codexErrorCode(info: unknown): string {
  if (info === "unauthorized" || httpStatusOf(info) === 401) return "unauthorized";
  if (typeof info === "string" && info !== "") return info;
  if (info !== null && typeof info === "object") {
    const [variant] = Object.keys(info);
    if (variant !== undefined) return variant;
  }
  return "other";
}

function httpStatusOf(info: unknown): number | null {
  if (info === null || typeof info !== "object") return null;
  for (const value of Object.values(info)) {
    const status = (value as { httpStatusCode?: unknown } | null)?.httpStatusCode;
    if (typeof status === "number") return status;
  }
  return null;
}

/**
 * The summary of a codex `TurnError` (from an `error` notification or a failed turn).
 *
 * @param error codex's `TurnError`.
 * @param willRetry The notification's `willRetry`, when it came from one.
 * @returns The summary, or `undefined` if `error` is not an object with a message.
 */
export function summarizeCodexError(
  error: unknown,
  willRetry: boolean | null,
): CodexError | undefined {
  if (error === null || typeof error !== "object") return undefined;
  const { message, codexErrorInfo, additionalDetails } = error as Record<string, unknown>;
  if (typeof message !== "string") return undefined;
  return {
    code: codexErrorCode(codexErrorInfo),
    message,
    codexErrorInfo: codexErrorInfo ?? null,
    httpStatusCode: httpStatusOf(codexErrorInfo),
    additionalDetails: typeof additionalDetails === "string" ? additionalDetails : null,
    willRetry,
  };
}

/** Maps a failure of `pool.turn` to its transport code, by class; `undefined` if none fits. */
function transportFailure(error: unknown): TransportFailure | undefined {
  if (
    error instanceof TimeoutError ||
    // The deadline can pass before codex assigns a turn (dialing, starting the thread):
    // the pool then rejects with the deadline signal's reason, a DOMException.
    (error instanceof DOMException && error.name === "TimeoutError")
  ) {
    return { code: "brokerTimeout", message: error.message };
  }
  if (error instanceof RpcError) {
    const code = error.code === OVERLOADED_CODE ? "overloaded" : "rpcError";
    return { code, message: error.message, data: { code: error.code, data: error.data ?? null } };
  }
  if (error instanceof WorkspaceUnavailableError || error instanceof DialError) {
    return { code: "subprocessCrash", message: error.message };
  }
  if (error instanceof ConnectionClosedError) {
    return { code: "wsDisconnect", message: error.message };
  }
  if (error instanceof TurnLostError) {
    // Answered 200 like every transport failure: the thread exists and takes the next turn.
    return { code: "turnLost", message: error.message };
  }
  return undefined;
}

/**
 * One signal for the turn that aborts, with the first reason, when any of `parents` does.
 *
 * Not `AbortSignal.any`: on Node 22 every signal it makes from a long-lived one (the
 * server's shutdown signal) stays referenced by that one until it is collected, and each
 * makes the next `AbortSignal.any` slower: 63 µs per request after 5k requests, 545 µs
 * after 80k, and RSS growing by hundreds of MB. A controller of our own, with listeners
 * removed when the turn ends, leaves nothing behind on the long-lived signal.
 */
function linkSignals(parents: readonly TurnAbortSource[]): {
  controller: HookedController;
  dispose: () => void;
} {
  // Its scopes and waits hear it through hooks, not event listeners.
  const controller = new HookedController();
  const abort = (reason: unknown) => controller.abort(reason);
  const detach: (() => void)[] = [];
  for (const parent of parents) {
    if (controller.signal.aborted) break;
    if (typeof parent === "function") {
      detach.push(parent(abort));
    } else if (parent.aborted) {
      controller.abort(parent.reason);
    } else {
      detach.push(onAbort(parent, abort));
    }
  }
  return {
    controller,
    dispose: () => {
      for (const fn of detach.splice(0)) fn();
    },
  };
}

/**
 * The turns running now, aborted together when the server's shutdown signal aborts: one
 * listener on that signal for all of them, not one added and removed per turn (Node's
 * `EventTarget` made that 2% of the CPU per turn with an instant codex). Kept in a
 * {@linkcode KeyTable} under a number per turn, not in a `Set`, for the reason given there.
 */
function shutdownLink(signal: AbortSignal | undefined): {
  add(controller: HookedController): () => void;
} {
  const live = new KeyTable<number, HookedController>();
  let next = 0;
  signal?.addEventListener("abort", () => {
    for (const controller of live.values()) controller.abort(signal.reason);
  }, { once: true });
  return {
    add(controller) {
      if (signal?.aborted) controller.abort(signal.reason);
      if (signal === undefined || controller.signal.aborted) return () => {};
      const key = next++;
      live.set(key, controller);
      return () => live.delete(key);
    },
  };
}

/**
 * Makes the function that runs one turn, answers it, counts it in `metrics` and logs it.
 *
 * @param pool The pool the turns run through.
 * @param options Metrics, log sink and the server's shutdown signal.
 * @returns The runner; it never rejects.
 */
export function createTurnRunner(
  pool: Pool,
  options: TurnRunnerOptions,
): (turn: ValidTurnRequest, run: RunTurnOptions) => Promise<TurnResult> {
  const { metrics, log } = options;
  const shutdown = shutdownLink(options.shutdownSignal);
  return async function runTurn(turn, run) {
    const started = performance.now();
    // Until codex is reached, the thread is the one asked for (null for a new one).
    let threadId: string | null = turn.threadId ?? null;
    let result: TurnResult;
    let outcome: string;
    let turnStatus: string | null = null;
    let turnId: string | null = null;
    let failure: string | undefined;
    const { controller, dispose } = linkSignals(run.signals);
    const unlink = shutdown.add(controller);
    const signal = controller.signal;
    const turnOptions: PoolTurnOptions = {
      signal,
      timeoutMs: turn.timeoutMs,
      onThread: (id) => {
        threadId = id;
        run.onThread?.(id);
      },
    };
    if (turn.threadParams) turnOptions.threadParams = turn.threadParams;
    // The last `error` codex reported for this turn ("Reconnecting...", a provider's 401):
    // the JSON answer of a turn that times out or fails would hide it otherwise. One object,
    // whatever codex sends.
    let lastCodexError: CodexError | undefined;
    const forward = run.onNotification;
    turnOptions.onNotification = (method, params) => {
      if (method === "error") {
        const willRetry = typeof params.willRetry === "boolean" ? params.willRetry : null;
        lastCodexError = summarizeCodexError(params.error, willRetry) ?? lastCodexError;
      }
      forward?.(method, params);
    };
    try {
      // A turn in line for its workspace has reached nothing of codex yet.
      await run.admission?.ready(signal);
      const done = await pool.turn(turn.workspaceId, threadId, turn.params, turnOptions);
      threadId = done.threadId;
      turnId = done.turn.id;
      turnStatus = done.turn.status;
      outcome = String(done.turn.status);
      const body: { threadId: string; turn: Turn; codexError?: CodexError } = {
        threadId: done.threadId,
        turn: done.turn,
      };
      if (done.turn.status === "failed") {
        const codexError = summarizeCodexError(done.turn.error, null) ?? lastCodexError;
        if (codexError) body.codexError = codexError;
      }
      result = { status: 200, headers: {}, body };
    } catch (error) {
      failure = error instanceof Error ? error.message : String(error);
      if (error instanceof TimeoutError || error instanceof TurnLostError) turnId = error.turnId;
      let transport = transportFailure(error);
      if (transport?.code === "wsDisconnect" && await pool.crashed(turn.workspaceId)) {
        // The connection closed because the app-server died, not the other way round.
        transport = { code: "subprocessCrash", message: transport.message };
      }
      const codexError = lastCodexError;
      if (transport && codexError) {
        transport = {
          ...transport,
          message: `${transport.message}; codex last reported: ${codexError.message}`,
          codexError,
        };
      }
      const reason: unknown = signal.aborted ? signal.reason : undefined;
      if (reason instanceof SlowReaderError) {
        // The stream has ended already with its own last event; this is for the log.
        outcome = "slowReader";
        result = {
          status: 200,
          headers: {},
          body: { error: { code: "slowReader", message: reason.message } },
        };
      } else if (signal.aborted && !(reason instanceof PoolClosedError)) {
        outcome = "cancelled";
        result = {
          status: CLIENT_CLOSED_STATUS,
          headers: {},
          body: { error: { code: "cancelled", message: "Client closed the request" } },
        };
      } else if (transport) {
        outcome = transport.code;
        result = {
          status: 200,
          headers: transport.code === "overloaded" ? { "retry-after": RETRY_AFTER_SECONDS } : {},
          body: { threadId, transport },
        };
      } else if (error instanceof PoolFullError) {
        // Every codex this broker may run is busy: another broker, or a later try, can.
        outcome = "atCapacity";
        result = {
          status: 503,
          headers: { "retry-after": RETRY_AFTER_SECONDS },
          body: {
            error: {
              code: "atCapacity",
              message: `Cannot run turn: all ${error.maxConnections} workspaces are busy`,
            },
          },
        };
      } else if (error instanceof PoolClosedError) {
        // Also the shutdown signal's reason: the server's grace period ended. The thread
        // may have been created for this turn: without its id the client would lose it.
        outcome = "unavailable";
        result = {
          status: 503,
          headers: { "retry-after": RETRY_AFTER_SECONDS },
          body: {
            error: { code: "unavailable", message: "Cannot run turn: broker is shutting down" },
            threadId,
          } satisfies ShutdownAnswer,
        };
      } else {
        outcome = "internal";
        result = {
          status: 500,
          headers: {},
          body: { error: { code: "internal", message: "Cannot run turn: internal error" } },
        };
      }
    } finally {
      run.admission?.release();
      unlink();
      dispose();
    }
    const durationMs = Math.round(performance.now() - started);
    metrics.observeTurn(outcome, durationMs);
    const entry: Record<string, unknown> = {
      msg: "turn",
      workspaceId: turn.workspaceId,
      threadId,
      turnId,
      status: turnStatus,
      outcome,
      durationMs,
      stream: run.stream,
      ...(run.forwardedBy ? { forwardedBy: run.forwardedBy } : {}),
      ...(run.principal === undefined ? {} : { principal: run.principal }),
    };
    if (failure !== undefined) entry.error = failure;
    if (lastCodexError && (failure !== undefined || turnStatus === "failed")) {
      entry.codexError = lastCodexError.code;
    }
    log(entry);
    return result;
  };
}

/**
 * The JSON-RPC session under a {@linkcode Conn}: the socket, requests with ids and their
 * pending answers, deadlines, retries of overloaded calls, the read loop that tells
 * responses, server requests and notifications apart, the answers to server requests, and
 * the frame counters. It knows nothing of threads or turns: notifications go to a hook.
 *
 * @module
 */

import { answerServerRequest, type Approvals } from "./approvals.ts";
import { backoffDelay, type BackoffOptions } from "./_backoff.ts";
import { abortable, createScope, DeadlineClock, delay, type Scope } from "./_deadline.ts";
import { ConnectionClosedError, RpcError } from "./errors.ts";
import { KeyTable } from "./_key_table.ts";
import type { ServerRequestOutcome } from "./events.ts";
import {
  type JsonRpcErrorObject,
  OVERLOADED_CODE,
  type RequestId,
  type ServerRequest,
} from "./protocol.ts";

/** Frames the read loop dropped, by kind. */
export interface DroppedFrames {
  /** Binary frames: codex only sends text. */
  binary: number;
  /** Frames over `maxMessageBytes`. */
  oversized: number;
  /** Text that is not JSON. */
  invalidJson: number;
  /** JSON that is not a JSON-RPC message. */
  invalidMessage: number;
  /** Responses to ids with no pending call (late, duplicate or foreign). */
  unknownId: number;
  /** Turn notifications for turns no caller is waiting for. */
  unknownTurn: number;
}

/** Counters of a connection, for metrics. */
export interface ConnStats {
  /** Frames received. */
  framesIn: number;
  /** Frames sent. */
  framesOut: number;
  /** Frames dropped by the read loop, by kind. */
  dropped: DroppedFrames;
}

/** How a session answers server requests and reads frames. */
export interface SessionOptions {
  /** How approval and other server requests are answered. */
  readonly approvals: Approvals;
  /** Larger incoming frames are dropped and counted. */
  readonly maxMessageBytes: number;
  /** Backoff between retries of overloaded (-32001) calls. */
  readonly retry: BackoffOptions;
  /** A send that finds more than this many bytes still unsent closes the session as stalled. */
  readonly maxSendBufferBytes: number;
}

/** What a session reports to its owner. Each runs synchronously and must not throw. */
export interface SessionHooks {
  /** A notification arrived; called from the read loop. */
  notification(method: string, params: unknown, size: number): void;
  /** A server request was answered. */
  answered(request: ServerRequest, outcome: ServerRequestOutcome): void;
  /** The session closed; every pending call is rejected and every scope aborted by now. */
  closed(error: ConnectionClosedError): void;
}

/** A request on the wire whose answer outlives the caller's scope. */
export interface WireCall {
  /** The request id. */
  readonly id: RequestId;
  /** Settles with the answer, or when the session closes. */
  readonly promise: Promise<unknown>;
}

interface Pending {
  readonly method: string;
  readonly ErrorClass: typeof RpcError;
  readonly resolve: (result: unknown) => void;
  readonly reject: (error: unknown) => void;
}

// WebSocket.CLOSED, without touching the global: on Node its first use loads undici's
// WebSocket (35 ms), which a broker dialing with its own client never needs.
const CLOSED = 3;
const DRAINING_CODE = -32600;
const INTERNAL_ERROR_CODE = -32603;
/**
 * A retry is sent only while the deadline leaves room for the backoff plus this many times
 * the slowest overloaded answer so far: a retry that cannot be answered in time would turn
 * the overload into a timeout.
 */
const ANSWER_ROOM_FACTOR = 2;

/**
 * Whether a value is a plain JSON object (not null, not an array).
 *
 * @param value Any value.
 * @returns True for objects.
 */
export function isObject(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

function isOverloaded(error: unknown): error is RpcError {
  return error instanceof RpcError && error.code === OVERLOADED_CODE;
}

function utf8Length(text: string): number {
  let bytes = 0;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (c < 0x80) bytes += 1;
    else if (c < 0x800) bytes += 2;
    else if (c >= 0xd800 && c <= 0xdbff) {
      bytes += 4;
      i++;
    } else bytes += 3;
  }
  return bytes;
}

/** What a policy threw, as text, whatever it threw. */
function describe(error: unknown): string {
  try {
    return error instanceof Error ? String(error.message) : String(error);
  } catch {
    return "unprintable error";
  }
}

/** One JSON-RPC session over an open WebSocket. */
export class RpcSession {
  readonly #ws: WebSocket;
  readonly #url: string;
  readonly #hooks: SessionHooks;
  readonly #approvals: Approvals;
  readonly #maxMessageBytes: number;
  readonly #retry: BackoffOptions;
  readonly #maxSendBufferBytes: number;
  #nextId = 0;
  #pending = new KeyTable<number, Pending>();
  #clock = new DeadlineClock();
  #socketClosed = Promise.withResolvers<void>();
  #closeError: ConnectionClosedError | undefined;
  #lastActivity = Date.now();
  /** Live counters; the owner hands out copies. */
  readonly stats: ConnStats = {
    framesIn: 0,
    framesOut: 0,
    dropped: {
      binary: 0,
      oversized: 0,
      invalidJson: 0,
      invalidMessage: 0,
      unknownId: 0,
      unknownTurn: 0,
    },
  };

  /**
   * Takes over an open socket.
   *
   * @param ws An open WebSocket.
   * @param url The URL it is connected to.
   * @param options Approval policy, frame limit, retry backoff.
   * @param hooks Where notifications, answered server requests and the close go.
   */
  constructor(ws: WebSocket, url: string, options: SessionOptions, hooks: SessionHooks) {
    this.#ws = ws;
    this.#url = url;
    this.#hooks = hooks;
    this.#approvals = options.approvals;
    this.#maxMessageBytes = options.maxMessageBytes;
    this.#retry = options.retry;
    this.#maxSendBufferBytes = options.maxSendBufferBytes;
    ws.binaryType = "arraybuffer";
    ws.onmessage = (event) => this.#onFrame(event.data);
    ws.onclose = (event) => {
      this.#socketClosed.resolve();
      this.close(
        `Connection to ${url} closed (code ${event.code}${
          event.reason ? `: ${event.reason}` : ""
        })`,
      );
    };
    ws.onerror = (event) =>
      this.close(
        `Connection to ${url} failed: ${(event as ErrorEvent).message || "WebSocket error"}`,
      );
  }

  /** The URL the socket is connected to. */
  get url(): string {
    return this.#url;
  }

  /** Why the session closed, once it has. */
  get closeError(): ConnectionClosedError | undefined {
    return this.#closeError;
  }

  /** Resolves once the socket has finished closing. */
  get finished(): Promise<void> {
    return this.#socketClosed.promise;
  }

  /** Epoch ms of the last frame sent or received. */
  get lastActivity(): number {
    return this.#lastActivity;
  }

  /** Requests awaiting an answer, and call deadlines being tracked: for leak checks. */
  sizes(): { pendingRequests: number; deadlines: number } {
    return { pendingRequests: this.#pending.size, deadlines: this.#clock.size };
  }

  /**
   * A scope for one call: aborts on `signal`, at the deadline, or when the session closes.
   *
   * @param signal The caller's signal.
   * @param timeoutMs Milliseconds until the deadline.
   * @returns The scope; dispose it when the call settles.
   */
  scope(signal: AbortSignal | undefined, timeoutMs: number): Scope {
    return createScope([signal], timeoutMs, this.#clock);
  }

  /**
   * Calls `fn` once, `delayMs` from now, on the session's deadline clock (no timer of its
   * own), unless cancelled or the session closes first.
   *
   * @param delayMs Milliseconds from now.
   * @param fn The callback; it must not throw.
   * @returns Cancels the alarm.
   */
  alarm(delayMs: number, fn: () => void): () => void {
    return this.#clock.alarm(delayMs, fn);
  }

  /**
   * Sends a request and resolves with its result, retrying overloaded (-32001) answers with
   * backoff. This is the one place that chooses between an overload and a timeout: the
   * overload surfaces when the deadline leaves no room for another attempt or passes during
   * the backoff; an attempt that was sent and got no answer by the deadline rejects with
   * the scope's reason (a `TimeoutError` DOMException) like any call.
   *
   * @param method The JSON-RPC method.
   * @param params Its parameters, or undefined for none.
   * @param scope Deadline, caller abort and close.
   * @param ErrorClass The class of the errors answered.
   * @param onSent With it, each attempt's pending answer outlives an abort of the scope
   * (the owner takes it over, or {@linkcode RpcSession.forget}s it); it is called with
   * every attempt as it is sent. Without it, an abort drops the pending answer.
   * @returns The result.
   */
  async call(
    method: string,
    params: unknown,
    scope: Scope,
    ErrorClass: typeof RpcError = RpcError,
    onSent?: (wire: WireCall) => void,
  ): Promise<unknown> {
    let slowest = 0;
    for (let attempt = 0;; attempt++) {
      if (scope.aborted) throw scope.reason;
      const sentAt = performance.now();
      let overload: RpcError;
      try {
        return await (onSent
          ? this.#keptAttempt(method, params, scope, ErrorClass, onSent)
          : this.#attempt(method, params, scope, ErrorClass));
      } catch (error) {
        if (!isOverloaded(error)) throw error;
        overload = error;
      }
      const now = performance.now();
      slowest = Math.max(slowest, now - sentAt);
      const wait = backoffDelay(attempt, this.#retry);
      if (now + wait + ANSWER_ROOM_FACTOR * slowest >= scope.deadline) throw overload;
      try {
        await delay(wait, scope);
      } catch (reason) {
        // Overloaded until the deadline: an overload to the caller, who can back off; a
        // timeout would suggest a hung server.
        throw scope.timedOut ? overload : reason;
      }
    }
  }

  /** One attempt whose pending answer is dropped when the scope aborts. */
  #attempt(
    method: string,
    params: unknown,
    scope: Scope,
    ErrorClass: typeof RpcError,
  ): Promise<unknown> {
    return new Promise((resolve, reject) => {
      const id = this.#nextId++;
      if (this.#closeError) {
        reject(this.#closeError);
        return;
      }
      const off = scope.onAbort((reason) => {
        this.#pending.delete(id);
        reject(reason);
      });
      this.#pending.set(id, {
        method,
        ErrorClass,
        resolve: (result) => {
          off();
          resolve(result);
        },
        reject: (error) => {
          off();
          reject(error);
        },
      });
      try {
        this.#send(params === undefined ? { id, method } : { id, method, params });
      } catch (error) {
        this.#pending.delete(id);
        off();
        reject(error);
      }
    });
  }

  /** One attempt whose pending answer outlives an abort of the scope. */
  #keptAttempt(
    method: string,
    params: unknown,
    scope: Scope,
    ErrorClass: typeof RpcError,
    onSent: (wire: WireCall) => void,
  ): Promise<unknown> {
    const id = this.#nextId++;
    let promise: Promise<unknown>;
    if (this.#closeError) {
      promise = Promise.reject(this.#closeError);
    } else {
      const answer = Promise.withResolvers<unknown>();
      promise = answer.promise;
      this.#pending.set(id, { method, ErrorClass, resolve: answer.resolve, reject: answer.reject });
      try {
        this.#send(params === undefined ? { id, method } : { id, method, params });
      } catch (error) {
        this.#pending.delete(id);
        answer.reject(error);
      }
    }
    onSent({ id, promise });
    return abortable(promise, scope);
  }

  /**
   * Drops the pending answer of a request, so a late answer counts as an unknown id.
   *
   * @param id The request id.
   */
  forget(id: RequestId): void {
    if (typeof id === "number") this.#pending.delete(id);
  }

  /**
   * Sends a notification.
   *
   * @param method The notification's method.
   * @throws {ConnectionClosedError} If the session is closed.
   */
  notify(method: string): void {
    this.#send({ method });
  }

  #send(message: unknown): void {
    if (this.#closeError) throw this.#closeError;
    this.#assertDraining();
    this.#ws.send(JSON.stringify(message));
    this.stats.framesOut++;
    this.#lastActivity = Date.now();
  }

  /**
   * Closes the session when codex has stopped reading: the socket's backlog would otherwise
   * grow with every send. Closing rather than refusing this one send, because a peer that
   * reads nothing answers nothing: the calls already sent, and the turns waiting on answers
   * to codex's own requests, could only wait for their deadlines, and the connection would
   * keep taking new work. Closed, every caller settles now and a pool dials afresh.
   */
  #assertDraining(): void {
    const backlog = this.#ws.bufferedAmount;
    if (!(backlog > this.#maxSendBufferBytes)) return;
    this.close(
      `Connection to ${this.#url} closed: codex stopped reading (${backlog} bytes unsent, ` +
        `over maxSendBufferBytes ${this.#maxSendBufferBytes})`,
    );
    throw this.#closeError;
  }

  /**
   * Closes the socket, rejects every pending call and aborts every scope with a
   * {@linkcode ConnectionClosedError}, then calls the `closed` hook. Idempotent.
   *
   * @param message The error's message.
   * @param cause What made the session close, if anything.
   */
  close(message: string, cause?: unknown): void {
    if (this.#closeError) return;
    const error = new ConnectionClosedError(this.#url, message, cause ? { cause } : undefined);
    this.#closeError = error;
    const ws = this.#ws;
    try {
      ws.close();
    } catch {
      // Already closing.
    }
    ws.onmessage = null;
    ws.onerror = null;
    if (ws.readyState === CLOSED) this.#socketClosed.resolve();
    else ws.onclose = () => this.#socketClosed.resolve();
    const pending = this.#pending.values();
    this.#pending.clear();
    for (const entry of pending) entry.reject(error);
    this.#clock.close(error);
    this.#hooks.closed(error);
  }

  // The read loop. It never awaits: codex disconnects clients that read too slowly.
  #onFrame(data: unknown): void {
    this.#lastActivity = Date.now();
    const stats = this.stats;
    stats.framesIn++;
    const dropped = stats.dropped;
    if (typeof data !== "string") {
      dropped.binary++;
      return;
    }
    const max = this.#maxMessageBytes;
    if (data.length > max || (data.length * 3 > max && utf8Length(data) > max)) {
      dropped.oversized++;
      return;
    }
    let message: unknown;
    try {
      message = JSON.parse(data);
    } catch {
      dropped.invalidJson++;
      return;
    }
    if (!isObject(message)) {
      dropped.invalidMessage++;
      return;
    }
    const { method, id } = message;
    if (method !== undefined) {
      if (typeof method !== "string") {
        dropped.invalidMessage++;
      } else if (typeof id === "number" || typeof id === "string") {
        // Server request ids start at 0 like ours: only `method` tells them apart.
        this.#onServerRequest({ id, method, params: message.params });
      } else if (id === undefined || id === null) {
        this.#hooks.notification(method, message.params, data.length);
      } else {
        dropped.invalidMessage++;
      }
      return;
    }
    if (typeof id !== "number") {
      // Our ids are numbers: an answer that names a string answers none of our calls.
      if (typeof id === "string") dropped.unknownId++;
      else dropped.invalidMessage++;
      return;
    }
    const pending = this.#pending.get(id);
    if (pending === undefined) {
      dropped.unknownId++;
      return;
    }
    this.#pending.delete(id);
    const hasError = message.error !== undefined && message.error !== null;
    const hasResult = "result" in message;
    if (hasError && hasResult) {
      // JSON-RPC allows one or the other: neither can be trusted to be the answer.
      this.#reject(pending, "Invalid response: both result and error", message);
    } else if (isObject(message.error)) {
      this.#onErrorResponse(pending, message.error as unknown as JsonRpcErrorObject);
    } else if (hasResult) {
      pending.resolve(message.result);
    } else if (hasError) {
      this.#reject(pending, "Invalid response: error is not an object", message);
    } else {
      this.#reject(pending, "Invalid response: neither result nor error", message);
    }
  }

  #reject(pending: Pending, message: string, frame: unknown): void {
    pending.reject(new pending.ErrorClass(pending.method, INTERNAL_ERROR_CODE, message, frame));
  }

  #onErrorResponse(pending: Pending, error: JsonRpcErrorObject): void {
    const code = typeof error.code === "number" ? error.code : INTERNAL_ERROR_CODE;
    const message = typeof error.message === "string" ? error.message : "Unknown error";
    const rpcError = new pending.ErrorClass(pending.method, code, message, error.data);
    const data = error.data;
    if (code === DRAINING_CODE && isObject(data) && data.reason === "serverShuttingDown") {
      // A draining server will not take more work on this connection; closing lets a pool
      // redial (to a fresh process) instead of retrying into the drain.
      this.close(`Connection to ${this.#url} closed: server is draining`, rpcError);
      pending.reject(this.#closeError);
      return;
    }
    pending.reject(rpcError);
  }

  // Every path ends in exactly one answer, and none of them throws: codex waits for the
  // answer, and a throw in the promise callbacks below would be an unhandled rejection.
  #onServerRequest(request: ServerRequest): void {
    const policy = this.#approvals;
    if (typeof policy === "string") {
      const answer = answerServerRequest(request, policy);
      if ("error" in answer) this.#answerError(request, answer.error.code, answer.error.message);
      else this.#answerResult(request, answer.result, policy);
      return;
    }
    let outcome: unknown;
    try {
      outcome = policy(request);
    } catch (error) {
      this.#answerPolicyError(request, `Approval handler failed: ${describe(error)}`);
      return;
    }
    Promise.resolve(outcome).then(
      (result) => this.#answerResult(request, result, "custom"),
      (error) => this.#answerPolicyError(request, `Approval handler failed: ${describe(error)}`),
    );
  }

  #answerResult(request: ServerRequest, result: unknown, outcome: ServerRequestOutcome): void {
    if (result === undefined) {
      this.#answerPolicyError(request, "Approval handler returned no result");
      return;
    }
    let json: string | undefined;
    try {
      json = JSON.stringify(result);
    } catch (error) {
      this.#answerPolicyError(
        request,
        `Approval handler result cannot be sent as JSON: ${describe(error)}`,
      );
      return;
    }
    if (json === undefined) {
      this.#answerPolicyError(request, "Approval handler result cannot be sent as JSON");
      return;
    }
    this.#answerFrame(request, `{"id":${JSON.stringify(request.id)},"result":${json}}`, outcome);
  }

  #answerPolicyError(request: ServerRequest, message: string): void {
    this.#answerError(request, INTERNAL_ERROR_CODE, message);
  }

  #answerError(request: ServerRequest, code: number, message: string): void {
    this.#answerFrame(
      request,
      JSON.stringify({ id: request.id, error: { code, message } }),
      "error",
    );
  }

  #answerFrame(request: ServerRequest, frame: string, outcome: ServerRequestOutcome): void {
    if (this.#closeError) return;
    try {
      this.#assertDraining();
      this.#ws.send(frame);
    } catch {
      // The socket is going away; its close event settles everything else.
      return;
    }
    this.stats.framesOut++;
    this.#lastActivity = Date.now();
    this.#hooks.answered(request, outcome);
  }
}

/**
 * One WebSocket connection to a codex app-server, speaking JSON-RPC v2.
 *
 * @module
 */

import { answerServerRequest, type Approvals } from "./approvals.ts";
import { backoffDelay, type BackoffOptions } from "./_backoff.ts";
import { abortable, createScope, DeadlineClock, delay, type Scope } from "./_deadline.ts";
import { probeRefusal } from "./_dial_probe.ts";
import {
  ConnectionClosedError,
  DialError,
  RpcError,
  TimeoutError,
  TurnRpcError,
} from "./errors.ts";
import { ConnCloseEvent, NotificationEvent, ServerRequestEvent } from "./events.ts";
import { openWebSocket } from "./_websocket.ts";
import {
  type ClientInfo,
  ITEM_COMPLETED,
  type JsonRpcErrorObject,
  OVERLOADED_CODE,
  type RequestId,
  type ServerRequest,
  type ThreadItem,
  type ThreadStartParams,
  type Turn,
  TURN_COMPLETED,
  type TurnParams,
} from "./protocol.ts";
import { ThreadLanes } from "./_thread_lanes.ts";

/** Options for {@linkcode Conn.dial}. */
export interface DialOptions {
  /** Headers sent on the WebSocket upgrade, e.g. `Authorization: Bearer …`. */
  headers?: Record<string, string>;
  /** Abort the dial. */
  signal?: AbortSignal;
  /** Deadline for connecting and the initialize handshake. Defaults to 10 s. */
  handshakeTimeoutMs?: number;
  /** Sent in `initialize`. Defaults to `codex_broker`. */
  clientInfo?: ClientInfo;
  /** How approval and other server requests are answered. Defaults to `"decline"`. */
  approvals?: Approvals;
  /** Larger incoming frames are dropped and counted. Defaults to 64 MiB. */
  maxMessageBytes?: number;
  /** Deadline of {@linkcode Conn.request} calls without `timeoutMs`. Defaults to 60 s. */
  requestTimeoutMs?: number;
  /**
   * How long a turn that timed out or was aborted may take to stop after `turn/interrupt`
   * before its thread accepts the next turn anyway. Defaults to 10 s.
   */
  interruptTimeoutMs?: number;
  /** Backoff between retries of overloaded (-32001) calls. */
  retry?: BackoffOptions;
}

/** Options for {@linkcode Conn.request}, {@linkcode Conn.startThread} and {@linkcode Conn.interrupt}. */
export interface CallOptions {
  /** Abort the call; it rejects with `signal.reason`. */
  signal?: AbortSignal;
  /** Deadline for the call, retries included. Defaults to the connection's `requestTimeoutMs`. */
  timeoutMs?: number;
}

/** Options for {@linkcode Conn.turn}. */
export interface TurnOptions {
  /** Abort the turn; codex is asked to interrupt it. */
  signal?: AbortSignal;
  /** Deadline for the whole turn, waiting in line included. Defaults to 5 minutes. */
  timeoutMs?: number;
  /** Called with the turn id once codex has accepted the turn. */
  onStart?: (turnId: string) => void;
  /**
   * Receives this turn's own notifications, in the order codex sent them: those of its
   * thread that name this turn, and those of its thread that name no turn, from codex's
   * acceptance of the turn to its `turn/completed` (included). Notifications of a turn that
   * ran before it on the thread are never delivered, and none are held while the turn
   * waits in line. It is called from the read loop, so it must not block; what it throws
   * is ignored. Once the caller gave up (deadline, abort) it is called no more.
   */
  onNotification?: (method: string, params: Record<string, unknown>) => void;
}

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

const DEFAULT_CLIENT_INFO: ClientInfo = {
  name: "codex_broker",
  title: "codex-broker",
  version: "0.1.0",
};
const DEFAULT_TURN_TIMEOUT_MS = 5 * 60_000;
const DRAINING_CODE = -32600;

/** A request on the wire. */
interface WireCall {
  readonly id: RequestId;
  readonly promise: Promise<unknown>;
}

/** The last overloaded answer of a call that is being retried. */
interface RetryState {
  overload: RpcError | undefined;
}

function isOverloaded(error: unknown): error is RpcError {
  return error instanceof RpcError && error.code === OVERLOADED_CODE;
}

interface Pending {
  readonly method: string;
  readonly ErrorClass: typeof RpcError;
  readonly resolve: (result: unknown) => void;
  readonly reject: (error: unknown) => void;
}

/** What the connection knows of the one turn it runs on a thread. */
interface ActiveTurn {
  readonly threadId: string;
  turnId: string | null;
  readonly items: ThreadItem[];
  /**
   * The thread's notifications that arrived before the turn/start response told us the
   * turn id (codex does not order the two).
   */
  early: { method: string; turnId: unknown; params: Record<string, unknown> }[];
  /** The caller's {@linkcode TurnOptions.onNotification}, until it gives up. */
  onNotification: ((method: string, params: Record<string, unknown>) => void) | undefined;
  readonly completed: PromiseWithResolvers<Turn>;
  /** True once turn/completed was applied. */
  done: boolean;
  /** Set once the caller gave up: runs when codex has stopped the turn (or gave up on it). */
  onFinished: (() => void) | undefined;
}

function isObject(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

/** The turn a notification names: `turnId`, or `turn.id` (turn/started, turn/completed). */
function turnIdOf(method: string, params: Record<string, unknown>): unknown {
  if (method !== TURN_COMPLETED && params.turnId !== undefined) return params.turnId;
  return isObject(params.turn) ? params.turn.id : undefined;
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

function assertTimeout(name: string, value: number | undefined): void {
  if (value !== undefined && (!Number.isFinite(value) || value <= 0)) {
    throw new RangeError(
      `Invalid ${name}: expected a positive number of milliseconds, got ${value}`,
    );
  }
}

/**
 * One WebSocket connection to a codex app-server. Safe for concurrent use by many callers:
 * one read loop demultiplexes responses, server requests and notifications, turns on the
 * same thread wait in line, and every call settles exactly once.
 *
 * Events: `notification` ({@linkcode NotificationEvent}), `serverrequest`
 * ({@linkcode ServerRequestEvent}) and `close` ({@linkcode ConnCloseEvent}).
 *
 * @example Start a thread and run one turn
 * ```ts ignore
 * const conn = await Conn.dial("ws://127.0.0.1:4500", {
 *   headers: { Authorization: `Bearer ${token}` },
 * });
 * const threadId = await conn.startThread();
 * const turn = await conn.turn(threadId, {
 *   input: [{ type: "text", text: "hi", text_elements: [] }],
 * });
 * console.log(turn.status, turn.items);
 * conn.close();
 * ```
 */
export class Conn extends EventTarget {
  #ws: WebSocket;
  #url: string;
  #nextId = 0;
  #pending = new Map<RequestId, Pending>();
  #active = new Map<string, ActiveTurn>();
  #lanes = new ThreadLanes();
  #attached = new Set<string>();
  #calls = 0;
  #clock = new DeadlineClock();
  #socketClosed = Promise.withResolvers<void>();
  #closeError: ConnectionClosedError | undefined;
  #lastActivity = Date.now();
  #approvals: Approvals;
  #maxMessageBytes: number;
  #requestTimeoutMs: number;
  #interruptTimeoutMs: number;
  #retry: BackoffOptions;
  #stats: ConnStats = {
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
   * Wraps an open socket. Use {@linkcode Conn.dial}, which also performs the handshake.
   *
   * @param ws An open WebSocket.
   * @param url The URL it is connected to.
   * @param options The dial options.
   */
  private constructor(ws: WebSocket, url: string, options: DialOptions) {
    super();
    this.#ws = ws;
    this.#url = url;
    this.#approvals = options.approvals ?? "decline";
    this.#maxMessageBytes = options.maxMessageBytes ?? 64 * 1024 * 1024;
    this.#requestTimeoutMs = options.requestTimeoutMs ?? 60_000;
    this.#interruptTimeoutMs = options.interruptTimeoutMs ?? 10_000;
    this.#retry = options.retry ?? {};
    ws.binaryType = "arraybuffer";
    ws.onmessage = (event) => this.#onFrame(event.data);
    ws.onclose = (event) => {
      this.#socketClosed.resolve();
      this.#shutdown(
        `Connection to ${url} closed (code ${event.code}${
          event.reason ? `: ${event.reason}` : ""
        })`,
      );
    };
    ws.onerror = (event) =>
      this.#shutdown(
        `Connection to ${url} failed: ${(event as ErrorEvent).message || "WebSocket error"}`,
      );
  }

  /**
   * Opens a connection to a codex app-server and performs the initialize handshake
   * (`initialize`, then the `initialized` notification).
   *
   * @example Dial with a capability token
   * ```ts ignore
   * const conn = await Conn.dial("ws://127.0.0.1:4500", {
   *   headers: { Authorization: `Bearer ${token}` },
   *   approvals: "accept",
   * });
   * ```
   *
   * @param url The app-server's `ws://` or `wss://` URL.
   * @param options Headers, deadline, approval policy, limits.
   * @returns A connection ready for calls.
   * @throws {TypeError} If the URL is not a WebSocket URL.
   * @throws {DialError} If the connection is refused, the upgrade is rejected (e.g. HTTP
   * 401), `initialize` fails, the socket closes during the handshake or the deadline passes.
   * @throws {unknown} `options.signal.reason` if the signal aborts.
   */
  static async dial(url: string | URL, options: DialOptions = {}): Promise<Conn> {
    const target = new URL(url);
    if (target.protocol !== "ws:" && target.protocol !== "wss:") {
      throw new TypeError(`Cannot dial ${target.href}: expected a ws:// or wss:// URL`);
    }
    assertTimeout("handshakeTimeoutMs", options.handshakeTimeoutMs);
    assertTimeout("requestTimeoutMs", options.requestTimeoutMs);
    assertTimeout("interruptTimeoutMs", options.interruptTimeoutMs);
    const href = target.href;
    const timeoutMs = options.handshakeTimeoutMs ?? 10_000;
    const scope = createScope([options.signal], timeoutMs);
    const fail = (message: string, status?: number, cause?: unknown): DialError => {
      if (options.signal?.aborted) throw options.signal.reason;
      return new DialError(href, message, status, { cause });
    };
    try {
      let ws: WebSocket;
      try {
        ws = await openWebSocket(href, options.headers ?? {}, scope.signal);
      } catch (error) {
        if (scope.timedOut) {
          throw fail(
            `Cannot connect to ${href}: no answer within ${timeoutMs} ms`,
            undefined,
            error,
          );
        }
        if (options.signal?.aborted) throw options.signal.reason;
        const refusal = await probeRefusal(href, options.headers ?? {}, scope.signal);
        throw fail(`Cannot connect to ${href}: ${refusal.reason}`, refusal.status, error);
      }
      const conn = new Conn(ws, href, options);
      try {
        await conn.#call(
          "initialize",
          { clientInfo: options.clientInfo ?? DEFAULT_CLIENT_INFO, capabilities: null },
          scope.signal,
        );
        conn.#send({ method: "initialized" });
      } catch (error) {
        conn.close();
        if (scope.timedOut) {
          throw fail(
            `Cannot initialize ${href}: no answer within ${timeoutMs} ms`,
            undefined,
            error,
          );
        }
        if (error instanceof RpcError) {
          throw fail(`Cannot initialize ${href}: ${error.message}`, undefined, error);
        }
        throw fail(`Cannot initialize ${href}: ${(error as Error).message}`, undefined, error);
      }
      return conn;
    } finally {
      scope.dispose();
    }
  }

  /** True once the connection has closed; every call then rejects. */
  get closed(): boolean {
    return this.#closeError !== undefined;
  }

  /**
   * Resolves once the socket has finished closing, after {@linkcode Conn.close} or a close
   * by the peer. `close()` itself returns at once; await this to leave nothing behind.
   *
   * @example Close and wait for the socket
   * ```ts ignore
   * conn.close();
   * await conn.finished;
   * ```
   */
  get finished(): Promise<void> {
    return this.#socketClosed.promise;
  }

  /** Epoch ms of the last frame sent or received. */
  get lastActivity(): number {
    return this.#lastActivity;
  }

  /** Calls and turns in flight, including turns still being interrupted. */
  get inFlight(): number {
    return this.#calls + this.#active.size;
  }

  /** The URL this connection is to. */
  get url(): string {
    return this.#url;
  }

  /** Frame counters, including dropped frames by kind. A snapshot. */
  get stats(): ConnStats {
    return { ...this.#stats, dropped: { ...this.#stats.dropped } };
  }

  /**
   * Sends a request and resolves with its result. Overloaded (-32001) answers are retried
   * with backoff while the deadline allows.
   *
   * @example Read a thread
   * ```ts ignore
   * const { thread } = await conn.request<{ thread: { id: string } }>("thread/read", { threadId });
   * ```
   *
   * @param method The JSON-RPC method.
   * @param params Its parameters.
   * @param options Signal and deadline.
   * @returns The result.
   * @throws {RpcError} If the server answers an error (-32001 once the retries ran out).
   * @throws {ConnectionClosedError} If the connection is or becomes closed.
   * @throws {DOMException} A `TimeoutError` if the deadline passes.
   */
  async request<T = unknown>(
    method: string,
    params?: unknown,
    options: CallOptions = {},
  ): Promise<T> {
    if (typeof method !== "string" || method === "") {
      throw new TypeError("Cannot send request: method must be a non-empty string");
    }
    assertTimeout("timeoutMs", options.timeoutMs);
    this.#assertOpen(`send ${method}`);
    const scope = createScope(
      [options.signal],
      options.timeoutMs ?? this.#requestTimeoutMs,
      this.#clock,
    );
    const retry: RetryState = { overload: undefined };
    this.#calls++;
    try {
      return await this.#callWithRetry(method, params, scope, RpcError, retry) as T;
    } catch (error) {
      // A deadline that passes while overloaded calls are retried is an overload to the
      // caller, who can back off; a timeout would suggest a hung server.
      throw scope.timedOut && retry.overload ? retry.overload : error;
    } finally {
      this.#calls--;
      scope.dispose();
    }
  }

  /**
   * Starts a thread (`thread/start`) whose events go to this connection.
   *
   * @example Start a thread in a workspace directory
   * ```ts ignore
   * const threadId = await conn.startThread({ cwd: "/srv/ws-1", approvalPolicy: "never" });
   * ```
   *
   * @param params `thread/start` parameters; all optional.
   * @param options Signal and deadline.
   * @returns The new thread's id.
   * @throws {RpcError} If the server refuses.
   * @throws {ConnectionClosedError} If the connection is or becomes closed.
   */
  async startThread(params: ThreadStartParams = {}, options: CallOptions = {}): Promise<string> {
    if (!isObject(params)) throw new TypeError("Cannot start thread: params must be an object");
    const result = await this.request<unknown>("thread/start", params, options);
    const thread = isObject(result) ? result.thread : undefined;
    if (!isObject(thread) || typeof thread.id !== "string") {
      throw new RpcError(
        "thread/start",
        -32603,
        "Invalid thread/start result: no thread id",
        result,
      );
    }
    this.#attached.add(thread.id);
    return thread.id;
  }

  /**
   * Asks codex to interrupt a turn (`turn/interrupt`). codex then completes the turn with
   * status `"interrupted"`.
   *
   * @example Stop a turn
   * ```ts ignore
   * await conn.interrupt(threadId, turnId, { timeoutMs: 5_000 });
   * ```
   *
   * @param threadId The turn's thread.
   * @param turnId The turn.
   * @param options Signal and deadline; the deadline defaults to `interruptTimeoutMs`.
   * @throws {RpcError} If the server refuses.
   * @throws {ConnectionClosedError} If the connection is or becomes closed.
   */
  async interrupt(threadId: string, turnId: string, options: CallOptions = {}): Promise<void> {
    await this.request("turn/interrupt", { threadId, turnId }, {
      timeoutMs: this.#interruptTimeoutMs,
      ...options,
    });
  }

  /**
   * Runs one turn: sends `turn/start` and resolves with the `Turn` of its `turn/completed`,
   * with every `item/completed` of the turn collected into `items` (then `itemsView` is
   * `"full"`). Turns on one thread run one after another; the wait counts against the
   * deadline. On deadline or abort codex is asked to interrupt the turn.
   *
   * @example Run a turn with a deadline
   * ```ts ignore
   * const turn = await conn.turn(threadId, {
   *   input: [{ type: "text", text: "Summarize README.md", text_elements: [] }],
   * }, { timeoutMs: 60_000 });
   * ```
   *
   * @param threadId The thread to run on.
   * @param params `turn/start` parameters without `threadId`.
   * @param options Signal and deadline (5 minutes by default).
   * @returns codex's `Turn`, untouched but for the collected items.
   * @throws {TypeError} If `params` is not an object with an `input` array, or holds `threadId`.
   * @throws {TimeoutError} If the deadline passes.
   * @throws {TurnRpcError} If `turn/start` (or `thread/resume`) is answered with an error.
   * @throws {ConnectionClosedError} If the connection is or becomes closed.
   * @throws {unknown} `options.signal.reason` if the signal aborts.
   */
  async turn(threadId: string, params: TurnParams, options: TurnOptions = {}): Promise<Turn> {
    if (typeof threadId !== "string" || threadId === "") {
      throw new TypeError("Cannot start turn: threadId must be a non-empty string");
    }
    if (!isObject(params)) throw new TypeError("Cannot start turn: params must be an object");
    if ("threadId" in params) {
      throw new TypeError(
        "Cannot start turn: params must not contain threadId, pass it as the first argument",
      );
    }
    if (!Array.isArray(params.input)) {
      throw new TypeError("Cannot start turn: params.input must be an array");
    }
    assertTimeout("timeoutMs", options.timeoutMs);
    this.#assertOpen("start turn");
    const scope = createScope(
      [options.signal],
      options.timeoutMs ?? DEFAULT_TURN_TIMEOUT_MS,
      this.#clock,
    );
    let turnId: string | null = null;
    let release: (() => void) | undefined;
    let handedOver = false;
    const retry: RetryState = { overload: undefined };
    this.#calls++;
    try {
      release = await this.#lanes.acquire(threadId, scope.signal);
      if (!this.#attached.has(threadId)) {
        // Events of a thread started elsewhere (or on an earlier connection) go nowhere
        // until this connection resumes it.
        await this.#callWithRetry("thread/resume", { threadId }, scope, TurnRpcError, retry);
        this.#attached.add(threadId);
      }
      const active: ActiveTurn = {
        threadId,
        turnId: null,
        items: [],
        early: [],
        completed: Promise.withResolvers<Turn>(),
        done: false,
        onFinished: undefined,
        onNotification: options.onNotification,
      };
      // Swallow here: the caller may have given up, and the rejection is read below if not.
      active.completed.promise.catch(() => {});
      this.#active.set(threadId, active);
      let wire: WireCall | undefined;
      try {
        let result: unknown;
        for (let attempt = 0;; attempt++) {
          // The request outlives an abort on purpose: a late response still names the turn
          // that has to be interrupted.
          wire = this.#callRaw("turn/start", { ...params, threadId }, TurnRpcError);
          try {
            result = await abortable(wire.promise, scope);
            break;
          } catch (error) {
            if (scope.signal.aborted || !isOverloaded(error)) throw error;
            wire = undefined;
            await this.#backoff(attempt, scope, error, retry);
          }
        }
        turnId = this.#bindTurnId(active, result);
        options.onStart?.(turnId);
        return await abortable(active.completed.promise, scope);
      } catch (error) {
        if (scope.signal.aborted && !this.closed) {
          // The caller gave up but codex may still be working: interrupt it, and keep the
          // thread's lane until the turn has really stopped, since codex would merge the
          // next turn/start into this one.
          handedOver = true;
          this.#abandon(active, wire, release);
        } else if (this.#active.get(threadId) === active) {
          this.#active.delete(threadId);
        }
        throw error;
      }
    } catch (error) {
      if (scope.timedOut && retry.overload && turnId === null) throw retry.overload;
      throw this.#turnError(error, scope, options.signal, threadId, turnId);
    } finally {
      this.#calls--;
      scope.dispose();
      if (!handedOver) release?.();
    }
  }

  /**
   * Closes the connection. Every pending call and waiting turn rejects with
   * {@linkcode ConnectionClosedError} at once. Idempotent.
   *
   * @example Close when done
   * ```ts ignore
   * conn.close();
   * console.log(conn.closed); // true
   * ```
   */
  close(): void {
    this.#shutdown(`Connection to ${this.#url} was closed by the client`);
  }

  #turnError(
    error: unknown,
    scope: Scope,
    signal: AbortSignal | undefined,
    threadId: string,
    turnId: string | null,
  ): unknown {
    if (
      this.#closeError && (error === this.#closeError || scope.signal.reason === this.#closeError)
    ) {
      return this.#closeError;
    }
    if (signal?.aborted && scope.signal.reason === signal.reason) return signal.reason;
    if (scope.timedOut && !(error instanceof RpcError)) {
      return new TimeoutError(threadId, turnId, { cause: error });
    }
    return error;
  }

  #bindTurnId(active: ActiveTurn, result: unknown): string {
    const turn = isObject(result) ? result.turn : undefined;
    if (!isObject(turn) || typeof turn.id !== "string") {
      throw new TurnRpcError("turn/start", -32603, "Invalid turn/start result: no turn id", result);
    }
    const turnId = turn.id;
    active.turnId = turnId;
    const early = active.early;
    active.early = [];
    for (const entry of early) this.#routeToTurn(active, entry.method, entry.turnId, entry.params);
    return turnId;
  }

  #abandon(active: ActiveTurn, wire: WireCall | undefined, release: () => void): void {
    active.onNotification = undefined;
    if (active.done) {
      release();
      return;
    }
    let timer: ReturnType<typeof setTimeout> | undefined;
    let finished = false;
    const finish = () => {
      if (finished) return;
      finished = true;
      if (timer !== undefined) clearTimeout(timer);
      timer = undefined;
      active.onFinished = undefined;
      if (wire) this.#pending.delete(wire.id);
      if (this.#active.get(active.threadId) === active) this.#active.delete(active.threadId);
      release();
    };
    active.onFinished = finish;
    timer = setTimeout(finish, this.#interruptTimeoutMs);
    const interrupt = (turnId: string) => {
      this.interrupt(active.threadId, turnId).catch(() => {
        // Best effort: the deadline above frees the thread either way.
      });
    };
    if (active.turnId !== null) {
      interrupt(active.turnId);
    } else if (wire) {
      wire.promise.then(
        (result) => {
          if (finished) return;
          try {
            const turnId = this.#bindTurnId(active, result);
            if (!finished) interrupt(turnId);
          } catch {
            finish();
          }
        },
        () => finish(),
      );
    } else {
      finish();
    }
  }

  async #callWithRetry(
    method: string,
    params: unknown,
    scope: Scope,
    ErrorClass: typeof RpcError,
    retry: RetryState,
  ): Promise<unknown> {
    for (let attempt = 0;; attempt++) {
      try {
        return await this.#call(method, params, scope.signal, ErrorClass);
      } catch (error) {
        if (!isOverloaded(error)) throw error;
        await this.#backoff(attempt, scope, error, retry);
      }
    }
  }

  /** Waits before retrying an overloaded call, or rethrows when the deadline is too close. */
  async #backoff(attempt: number, scope: Scope, error: unknown, retry: RetryState): Promise<void> {
    retry.overload = error as RpcError;
    const wait = backoffDelay(attempt, this.#retry);
    if (performance.now() + wait >= scope.deadline) throw error;
    await delay(wait, scope.signal);
  }

  /** Sends one request; the pending entry lives until the response or a close. */
  #callRaw(method: string, params: unknown, ErrorClass: typeof RpcError = RpcError): WireCall {
    const id = this.#nextId++;
    if (this.#closeError) return { id, promise: Promise.reject(this.#closeError) };
    const { promise, resolve, reject } = Promise.withResolvers<unknown>();
    this.#pending.set(id, { method, ErrorClass, resolve, reject });
    try {
      this.#send(params === undefined ? { id, method } : { id, method, params });
    } catch (error) {
      this.#pending.delete(id);
      reject(error);
    }
    return { id, promise };
  }

  /** Sends one request whose pending entry is dropped when `signal` aborts. */
  #call(
    method: string,
    params: unknown,
    signal: AbortSignal,
    ErrorClass: typeof RpcError = RpcError,
  ): Promise<unknown> {
    if (signal.aborted) return Promise.reject(signal.reason);
    const wire = this.#callRaw(method, params, ErrorClass);
    const onAbort = () => {
      this.#pending.delete(wire.id);
    };
    signal.addEventListener("abort", onAbort, { once: true });
    return abortable(wire.promise, signal).finally(() =>
      signal.removeEventListener("abort", onAbort)
    );
  }

  #send(message: unknown): void {
    if (this.#closeError) throw this.#closeError;
    this.#ws.send(JSON.stringify(message));
    this.#stats.framesOut++;
    this.#lastActivity = Date.now();
  }

  #assertOpen(what: string): void {
    if (this.#closeError) {
      throw new ConnectionClosedError(
        this.#url,
        `Cannot ${what}: connection is closed`,
        { cause: this.#closeError },
      );
    }
  }

  // The read loop. It never awaits: codex disconnects clients that read too slowly.
  #onFrame(data: unknown): void {
    this.#lastActivity = Date.now();
    this.#stats.framesIn++;
    const dropped = this.#stats.dropped;
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
        this.#onNotification(method, message.params);
      } else {
        dropped.invalidMessage++;
      }
      return;
    }
    if (typeof id !== "number" && typeof id !== "string") {
      dropped.invalidMessage++;
      return;
    }
    const pending = this.#pending.get(id);
    if (!pending) {
      dropped.unknownId++;
      return;
    }
    this.#pending.delete(id);
    if (isObject(message.error)) {
      this.#onErrorResponse(pending, message.error as unknown as JsonRpcErrorObject);
    } else if ("result" in message) {
      pending.resolve(message.result);
    } else {
      pending.reject(
        new pending.ErrorClass(
          pending.method,
          -32603,
          "Invalid response: neither result nor error",
          message,
        ),
      );
    }
  }

  #onErrorResponse(pending: Pending, error: JsonRpcErrorObject): void {
    const code = typeof error.code === "number" ? error.code : -32603;
    const message = typeof error.message === "string" ? error.message : "Unknown error";
    const rpcError = new pending.ErrorClass(pending.method, code, message, error.data);
    const data = error.data;
    if (code === DRAINING_CODE && isObject(data) && data.reason === "serverShuttingDown") {
      // A draining server will not take more work on this connection; closing lets a pool
      // redial (to a fresh process) instead of retrying into the drain.
      this.#shutdown(`Connection to ${this.#url} closed: server is draining`, rpcError);
      pending.reject(this.#closeError);
      return;
    }
    pending.reject(rpcError);
  }

  #onNotification(method: string, params: unknown): void {
    const active = isObject(params) && typeof params.threadId === "string"
      ? this.#active.get(params.threadId)
      : undefined;
    if (active) {
      this.#routeToTurn(
        active,
        method,
        turnIdOf(method, params as Record<string, unknown>),
        params as Record<string, unknown>,
      );
    } else if (method === TURN_COMPLETED || method === ITEM_COMPLETED) {
      this.#stats.dropped.unknownTurn++;
    }
    this.dispatchEvent(new NotificationEvent(method, params));
  }

  /** Routes a notification of the thread an active turn runs on. */
  #routeToTurn(
    active: ActiveTurn,
    method: string,
    turnId: unknown,
    params: Record<string, unknown>,
  ): void {
    if (active.turnId === null) {
      // turn/completed (and the rest) can be processed before the turn/start response.
      active.early.push({ method, turnId, params });
    } else if (turnId === active.turnId) {
      this.#deliver(active, method, params);
      if (method === TURN_COMPLETED || method === ITEM_COMPLETED) {
        this.#applyToTurn(active, method, params);
      }
    } else if (turnId === undefined && method !== TURN_COMPLETED && method !== ITEM_COMPLETED) {
      this.#deliver(active, method, params);
    } else if (method === TURN_COMPLETED || method === ITEM_COMPLETED) {
      this.#stats.dropped.unknownTurn++;
    }
  }

  #deliver(active: ActiveTurn, method: string, params: Record<string, unknown>): void {
    const fn = active.onNotification;
    if (!fn) return;
    try {
      fn(method, params);
    } catch {
      // The read loop must go on whatever a listener does.
    }
  }

  #applyToTurn(active: ActiveTurn, method: string, params: Record<string, unknown>): void {
    if (method === ITEM_COMPLETED) {
      if (isObject(params.item)) active.items.push(params.item as ThreadItem);
      return;
    }
    const turn = params.turn as Turn;
    active.done = true;
    if (this.#active.get(active.threadId) === active) this.#active.delete(active.threadId);
    active.completed.resolve(
      active.items.length > 0 ? { ...turn, items: active.items, itemsView: "full" } : turn,
    );
    active.onFinished?.();
  }

  #onServerRequest(request: ServerRequest): void {
    const policy = this.#approvals;
    if (typeof policy === "string") {
      const answer = answerServerRequest(request, policy);
      this.#answer(request, answer, "error" in answer ? "error" : policy);
      return;
    }
    let outcome: unknown;
    try {
      outcome = policy(request);
    } catch (error) {
      this.#answerHandlerError(request, error);
      return;
    }
    Promise.resolve(outcome).then(
      (result) => {
        if (result === undefined) {
          this.#answerHandlerError(request, new Error("Approval handler returned no result"));
        } else {
          this.#answer(request, { result }, "custom");
        }
      },
      (error) => this.#answerHandlerError(request, error),
    );
  }

  #answerHandlerError(request: ServerRequest, error: unknown): void {
    const message = error instanceof Error ? error.message : String(error);
    this.#answer(
      request,
      { error: { code: -32603, message: `Approval handler failed: ${message}` } },
      "error",
    );
  }

  #answer(
    request: ServerRequest,
    answer: { result: unknown } | { error: { code: number; message: string } },
    outcome: "accept" | "decline" | "custom" | "error",
  ): void {
    if (this.#closeError) return;
    this.#send({ id: request.id, ...answer });
    this.dispatchEvent(new ServerRequestEvent(request, outcome));
  }

  #shutdown(message: string, cause?: unknown): void {
    if (this.#closeError) return;
    const error = new ConnectionClosedError(this.#url, message, cause ? { cause } : undefined);
    this.#closeError = error;
    try {
      this.#ws.close();
    } catch {
      // Already closing.
    }
    this.#ws.onmessage = null;
    this.#ws.onerror = null;
    if (this.#ws.readyState === WebSocket.CLOSED) this.#socketClosed.resolve();
    else this.#ws.onclose = () => this.#socketClosed.resolve();
    const pending = [...this.#pending.values()];
    this.#pending.clear();
    for (const entry of pending) entry.reject(error);
    const active = [...this.#active.values()];
    this.#active.clear();
    for (const turn of active) {
      turn.completed.reject(error);
      turn.onFinished?.();
    }
    this.#clock.close(error);
    this.dispatchEvent(new ConnCloseEvent(error));
  }
}

/**
 * One WebSocket connection to a codex app-server, speaking JSON-RPC v2.
 *
 * @module
 */

import type { Approvals } from "./approvals.ts";
import type { BackoffOptions } from "./_backoff.ts";
import { abortable, createScope, type Scope } from "./_deadline.ts";
import { probeRefusal } from "./_dial_probe.ts";
import {
  ConnectionClosedError,
  DialError,
  RpcError,
  TimeoutError,
  TurnLostError,
  TurnRpcError,
} from "./errors.ts";
import { ConnCloseEvent, NotificationEvent, ServerRequestEvent } from "./events.ts";
import { openWebSocket } from "./_websocket.ts";
import type { ClientInfo, ThreadStartParams, Turn, TurnParams } from "./protocol.ts";
import { type ActiveTurn, ActiveTurns } from "./_active_turns.ts";
import { LruSet } from "./_lru.ts";
import { type ConnStats, isObject, RpcSession, type WireCall } from "./_rpc_session.ts";
import { ThreadLanes } from "./_thread_lanes.ts";
import { registerSizes } from "./_internals.ts";

export type { ConnStats, DroppedFrames } from "./_rpc_session.ts";

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
  /**
   * How many threads the connection remembers having attached (started or resumed), so it
   * sends `thread/resume` only before the first turn on a thread. The least recently used
   * is forgotten first and simply resumed again before its next turn. Defaults to 10,000.
   */
  maxAttachedThreads?: number;
  /**
   * A running turn with no frame for this long (codex's `turn/completed` can go missing) is
   * looked up with `thread/read`: a turn codex ended is returned as if `turn/completed` had
   * come, a turn of a thread that is no longer active fails with {@linkcode TurnLostError},
   * and a turn still running is watched on. Defaults to 60 s.
   */
  turnSilenceMs?: number;
  /**
   * A send that finds more than this many bytes still queued on the socket (codex stopped
   * reading) closes the connection: every call on it rejects with
   * {@linkcode ConnectionClosedError}. Defaults to 64 MiB. Bun's client WebSocket reports
   * its queue only until the event loop turns, so there the bound catches a burst only.
   */
  maxSendBufferBytes?: number;
  /**
   * codex does not order a turn's notifications after its `turn/start` response, so those
   * that come first are held until it does. Past this many bytes of them (as frames), the
   * turn fails with {@linkcode TurnRpcError} and codex is asked to interrupt it, as for a
   * turn given up on. Defaults to 16 MiB.
   */
  maxEarlyNotificationBytes?: number;
  /**
   * Makes the WebSocket, given the URL and the upgrade headers. Defaults to the platform's
   * `WebSocket`. The broker's service (`./main`) passes its own client on `node:net`,
   * which writes the frames of one event-loop turn in one system call.
   */
  webSocket?: (url: string, headers: Record<string, string>) => WebSocket;
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

const DEFAULT_CLIENT_INFO: ClientInfo = {
  name: "codex_broker",
  title: "codex-broker",
  version: "0.1.0",
};
const DEFAULT_TURN_TIMEOUT_MS = 5 * 60_000;
const DEFAULT_MAX_ATTACHED_THREADS = 10_000;
const DEFAULT_TURN_SILENCE_MS = 60_000;
const DEFAULT_MAX_SEND_BUFFER_BYTES = 64 * 1024 * 1024;
const ENDED_STATUSES: ReadonlySet<unknown> = new Set(["completed", "failed", "interrupted"]);

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
  #session: RpcSession;
  #turns: ActiveTurns;
  #lanes = new ThreadLanes();
  #attached: LruSet<string>;
  #calls = 0;
  #requestTimeoutMs: number;
  #interruptTimeoutMs: number;
  #turnSilenceMs: number;
  // Whether a `notification` listener was ever added: the broker adds none, and an Event
  // made and dispatched per notification with nobody to hear it was 0.7% of its busy time
  // on Deno.
  #notificationListened = false;

  /**
   * Wraps an open socket. Use {@linkcode Conn.dial}, which also performs the handshake.
   *
   * @param ws An open WebSocket.
   * @param url The URL it is connected to.
   * @param options The dial options.
   */
  private constructor(ws: WebSocket, url: string, options: DialOptions) {
    super();
    this.#requestTimeoutMs = options.requestTimeoutMs ?? 60_000;
    this.#interruptTimeoutMs = options.interruptTimeoutMs ?? 10_000;
    this.#turnSilenceMs = options.turnSilenceMs ?? DEFAULT_TURN_SILENCE_MS;
    this.#attached = new LruSet(options.maxAttachedThreads ?? DEFAULT_MAX_ATTACHED_THREADS);
    this.#session = new RpcSession(ws, url, {
      approvals: options.approvals ?? "decline",
      maxMessageBytes: options.maxMessageBytes ?? 64 * 1024 * 1024,
      retry: options.retry ?? {},
      maxSendBufferBytes: options.maxSendBufferBytes ?? DEFAULT_MAX_SEND_BUFFER_BYTES,
    }, {
      notification: (method, params, size) => {
        this.#turns.route(method, params, size);
        if (this.#notificationListened) {
          this.dispatchEvent(new NotificationEvent(method, params));
        }
      },
      answered: (request, outcome) => {
        this.dispatchEvent(new ServerRequestEvent(request, outcome));
      },
      closed: (error) => {
        this.#turns.closeAll(error);
        this.dispatchEvent(new ConnCloseEvent(error));
      },
    });
    this.#turns = new ActiveTurns(
      this.#session.stats.dropped,
      () => this.#session.lastActivity,
      // Undefined takes the registry's default (16 MiB), the one the option documents.
      options.maxEarlyNotificationBytes,
    );
    registerSizes(this, () => ({
      ...this.#session.sizes(),
      calls: this.#calls,
      activeTurns: this.#turns.size,
      threadLanes: this.#lanes.size,
      attachedThreads: this.#attached.size,
    }));
  }

  /**
   * Adds an event listener, as `EventTarget` does.
   *
   * @example Log every notification
   * ```ts ignore
   * conn.addEventListener("notification", (event) => {
   *   console.log((event as NotificationEvent).method);
   * });
   * ```
   *
   * @param type The event type: `notification`, `serverrequest` or `close`.
   * @param listener The listener.
   * @param options `EventTarget` listener options.
   */
  override addEventListener(
    type: string,
    listener: EventListenerOrEventListenerObject | null,
    options?: boolean | AddEventListenerOptions,
  ): void {
    if (type === "notification") this.#notificationListened = true;
    super.addEventListener(type, listener, options);
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
   * @throws {RangeError} If a timeout, `maxAttachedThreads` or `maxSendBufferBytes` is not a
   * positive number.
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
    assertTimeout("turnSilenceMs", options.turnSilenceMs);
    const maxSend = options.maxSendBufferBytes;
    if (maxSend !== undefined && (!Number.isSafeInteger(maxSend) || maxSend <= 0)) {
      throw new RangeError(
        `Invalid maxSendBufferBytes: expected a positive integer, got ${maxSend}`,
      );
    }
    const maxAttached = options.maxAttachedThreads;
    if (maxAttached !== undefined && (!Number.isSafeInteger(maxAttached) || maxAttached <= 0)) {
      throw new RangeError(
        `Invalid maxAttachedThreads: expected a positive integer, got ${maxAttached}`,
      );
    }
    const maxEarly = options.maxEarlyNotificationBytes;
    if (maxEarly !== undefined && (!Number.isSafeInteger(maxEarly) || maxEarly <= 0)) {
      throw new RangeError(
        `Invalid maxEarlyNotificationBytes: expected a positive integer, got ${maxEarly}`,
      );
    }
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
        ws = await openWebSocket(href, options.headers ?? {}, scope.signal, options.webSocket);
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
        await conn.#session.call(
          "initialize",
          { clientInfo: options.clientInfo ?? DEFAULT_CLIENT_INFO, capabilities: null },
          scope,
        );
        conn.#session.notify("initialized");
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
    return this.#session.closeError !== undefined;
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
    return this.#session.finished;
  }

  /** Epoch ms of the last frame sent or received. */
  get lastActivity(): number {
    return this.#session.lastActivity;
  }

  /** Calls and turns in flight, including turns still being interrupted. */
  get inFlight(): number {
    return this.#calls + this.#turns.size;
  }

  /** The URL this connection is to. */
  get url(): string {
    return this.#session.url;
  }

  /** Frame counters, including dropped frames by kind. A snapshot. */
  get stats(): ConnStats {
    const stats = this.#session.stats;
    return { ...stats, dropped: { ...stats.dropped } };
  }

  /**
   * Sends a request and resolves with its result. Overloaded (-32001) answers are retried
   * with backoff while the deadline leaves room for another attempt; the overload surfaces
   * when it does not, or when the deadline passes during the backoff. An attempt that gets
   * no answer by the deadline is a timeout.
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
    const scope = this.#session.scope(options.signal, options.timeoutMs ?? this.#requestTimeoutMs);
    this.#calls++;
    try {
      return await this.#session.call(method, params, scope) as T;
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
   * @param options Signal, deadline (5 minutes by default), `onStart`, `onNotification`.
   * @returns codex's `Turn`, untouched but for the collected items.
   * @throws {TypeError} If `params` is not an object with an `input` array, or holds `threadId`.
   * @throws {TimeoutError} If the deadline passes.
   * @throws {TurnRpcError} If `turn/start` (or `thread/resume`) is answered with an error, or
   * codex sent more than `maxEarlyNotificationBytes` of the turn's notifications before it
   * answered `turn/start` (codex is then asked to interrupt the turn).
   * @throws {TurnLostError} If codex went silent on the turn for `turnSilenceMs` and
   * `thread/read` shows it will not complete it.
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
    const session = this.#session;
    const scope = session.scope(options.signal, options.timeoutMs ?? DEFAULT_TURN_TIMEOUT_MS);
    let turnId: string | null = null;
    let release: (() => void) | undefined;
    let handedOver = false;
    this.#calls++;
    try {
      release = await this.#lanes.acquire(threadId, scope);
      if (!this.#attached.touch(threadId)) {
        // Events of a thread started elsewhere (or on an earlier connection, or forgotten
        // by the LRU) go nowhere until this connection resumes it.
        await session.call("thread/resume", { threadId }, scope, TurnRpcError);
        this.#attached.add(threadId);
      }
      const active = this.#turns.open(threadId, options.onNotification);
      // Given up on as if by the caller, from the caller's turn rather than the read loop's:
      // codex is asked to interrupt the turn, and the thread waits until it has stopped.
      active.onOverflow = (error) => queueMicrotask(() => scope.abort(error));
      let wire: WireCall | undefined;
      try {
        // The request outlives an abort on purpose: a late response still names the turn
        // that has to be interrupted.
        const result = await session.call(
          "turn/start",
          { ...params, threadId },
          scope,
          TurnRpcError,
          (sent) => (wire = sent),
        );
        turnId = this.#turns.bind(active, result);
        options.onStart?.(turnId);
        const unwatch = this.#watchSilence(active);
        try {
          return await abortable(active.completed.promise, scope);
        } finally {
          unwatch();
        }
      } catch (error) {
        if (scope.aborted && !this.closed) {
          // The caller gave up but codex may still be working: interrupt it, and keep the
          // thread's lane until the turn has really stopped, since codex would merge the
          // next turn/start into this one.
          handedOver = true;
          this.#abandon(active, wire, release);
        } else {
          this.#turns.remove(active);
        }
        throw error;
      }
    } catch (error) {
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
    this.#session.close(`Connection to ${this.#session.url} was closed by the client`);
  }

  #turnError(
    error: unknown,
    scope: Scope,
    signal: AbortSignal | undefined,
    threadId: string,
    turnId: string | null,
  ): unknown {
    const closeError = this.#session.closeError;
    if (closeError && (error === closeError || scope.reason === closeError)) {
      return closeError;
    }
    if (signal?.aborted && scope.reason === signal.reason) return signal.reason;
    // An overload (RpcError) that outlasted the deadline was already chosen over a timeout
    // by the session's retry loop.
    if (scope.timedOut && !(error instanceof RpcError)) {
      return new TimeoutError(threadId, turnId, { cause: error });
    }
    return error;
  }

  /**
   * Watches a running turn for silence: once no frame of it came for `turnSilenceMs`, asks
   * codex for the thread (`thread/read` with its turns) and settles the turn from that, or
   * watches on. Served by the session's deadline clock, so a turn costs no timer.
   *
   * @returns Stops watching, and drops a `thread/read` still in flight.
   */
  #watchSilence(active: ActiveTurn): () => void {
    const silenceMs = this.#turnSilenceMs;
    const session = this.#session;
    let cancel: (() => void) | undefined;
    let reading: AbortController | undefined;
    let stopped = false;
    const arm = (delayMs: number) => {
      cancel = session.alarm(delayMs, check);
    };
    const check = () => {
      cancel = undefined;
      if (stopped || active.done) return;
      const quiet = Date.now() - active.lastFrameAt;
      if (quiet < silenceMs) {
        arm(silenceMs - quiet);
        return;
      }
      reading = new AbortController();
      const scope = session.scope(reading.signal, this.#requestTimeoutMs);
      session.call("thread/read", { threadId: active.threadId, includeTurns: true }, scope)
        .then(
          (result) => this.#judgeSilentTurn(active, result, silenceMs),
          // An error answer or a timeout proves nothing (nor does a malformed thread, above):
          // watch on, the turn's deadline still bounds the wait. A close, or the caller's
          // end (which drops the read), has settled the turn already.
          () => "running" as const,
        )
        .then((verdict) => {
          scope.dispose();
          reading = undefined;
          if (verdict === "running" && !stopped && !active.done && !this.closed) {
            active.lastFrameAt = Date.now();
            arm(silenceMs);
          }
        });
    };
    arm(silenceMs);
    return () => {
      stopped = true;
      cancel?.();
      reading?.abort();
    };
  }

  /**
   * Settles a silent turn from `thread/read`'s answer: with codex's record of the turn if
   * it ended, with {@linkcode TurnLostError} if the thread is not active and the turn did
   * not end.
   *
   * @returns `"running"` when the turn is to be watched on; `"settled"` otherwise.
   */
  #judgeSilentTurn(
    active: ActiveTurn,
    result: unknown,
    silenceMs: number,
  ): "running" | "settled" {
    if (active.done) return "settled";
    const thread = isObject(result) ? result.thread : undefined;
    if (!isObject(thread) || !isObject(thread.status)) return "running";
    const status = thread.status.type;
    if (typeof status !== "string") return "running";
    const turns = Array.isArray(thread.turns) ? thread.turns : [];
    const turn = turns.find((entry) => isObject(entry) && entry.id === active.turnId);
    if (isObject(turn) && ENDED_STATUSES.has(turn.status)) {
      this.#turns.settle(active, turn as unknown as Turn);
      return "settled";
    }
    if (status === "active") return "running";
    this.#turns.fail(
      active,
      new TurnLostError(active.threadId, active.turnId!, status, silenceMs),
    );
    return "settled";
  }

  /** Interrupts a turn the caller gave up on, and frees its thread once it has stopped. */
  #abandon(active: ActiveTurn, wire: WireCall | undefined, release: () => void): void {
    active.onNotification = undefined;
    if (active.done) {
      release();
      return;
    }
    const session = this.#session;
    const deadline = session.scope(undefined, this.#interruptTimeoutMs);
    let finished = false;
    const finish = () => {
      if (finished) return;
      finished = true;
      deadline.dispose();
      active.onFinished = undefined;
      if (wire) session.forget(wire.id);
      this.#turns.remove(active);
      release();
    };
    active.onFinished = finish;
    deadline.onAbort(finish);
    if (deadline.aborted) {
      finish();
      return;
    }
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
            const turnId = this.#turns.bind(active, result);
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

  #assertOpen(what: string): void {
    const closeError = this.#session.closeError;
    if (closeError) {
      throw new ConnectionClosedError(
        this.#session.url,
        `Cannot ${what}: connection is closed`,
        { cause: closeError },
      );
    }
  }
}

/**
 * The errors callers of {@linkcode Conn} and {@linkcode Pool} are expected to catch.
 *
 * @module
 */

/**
 * Thrown when a turn does not complete within its deadline. The turn was interrupted
 * best-effort.
 *
 * @example Tell a deadline from other failures
 * ```ts ignore
 * try {
 *   await conn.turn(threadId, params, { timeoutMs: 60_000 });
 * } catch (error) {
 *   if (error instanceof TimeoutError) console.log(error.threadId, error.turnId);
 * }
 * ```
 */
export class TimeoutError extends Error {
  /** Thread the turn ran on. */
  readonly threadId: string;
  /** Turn that timed out, or `null` when the deadline passed before codex assigned one. */
  readonly turnId: string | null;

  /**
   * Creates the error.
   *
   * @param threadId Thread the turn ran on.
   * @param turnId Turn that timed out, or `null` if it never started.
   * @param options Standard error options (`cause`).
   */
  constructor(threadId: string, turnId: string | null, options?: ErrorOptions) {
    super(
      turnId === null
        ? `Turn on thread ${threadId} did not start in time`
        : `Turn ${turnId} on thread ${threadId} did not complete in time`,
      options,
    );
    this.name = "TimeoutError";
    this.threadId = threadId;
    this.turnId = turnId;
  }
}

/**
 * Thrown when codex went silent on a running turn (no `turn/completed` and no other frame of
 * the turn for `turnSilenceMs`) and `thread/read` then showed the turn is not running: the
 * thread is idle (or not loaded, or failed) and holds no finished record of the turn. codex
 * will not complete it, so the thread accepts the next turn.
 *
 * @example Tell a lost turn from a timeout
 * ```ts ignore
 * try {
 *   await conn.turn(threadId, params);
 * } catch (error) {
 *   if (error instanceof TurnLostError) console.log(error.turnId, error.threadStatus);
 * }
 * ```
 */
export class TurnLostError extends Error {
  /** Thread the turn ran on. */
  readonly threadId: string;
  /** The lost turn. */
  readonly turnId: string;
  /** The thread's status `type` per `thread/read` (`idle`, `notLoaded`, `systemError`, …). */
  readonly threadStatus: string;

  /**
   * Creates the error.
   *
   * @param threadId Thread the turn ran on.
   * @param turnId The lost turn.
   * @param threadStatus The thread's status type per `thread/read`.
   * @param silenceMs How long codex had been silent on the turn.
   * @param options Standard error options (`cause`).
   */
  constructor(
    threadId: string,
    turnId: string,
    threadStatus: string,
    silenceMs: number,
    options?: ErrorOptions,
  ) {
    super(
      `Turn ${turnId} on thread ${threadId} was lost: no frame for ${silenceMs} ms, and ` +
        `thread/read reports the thread ${threadStatus} without the turn's end`,
      options,
    );
    this.name = "TurnLostError";
    this.threadId = threadId;
    this.turnId = turnId;
    this.threadStatus = threadStatus;
  }
}

/**
 * A JSON-RPC error answered by the app-server to one of our requests. The message is the
 * server's message.
 *
 * @example Inspect the code
 * ```ts ignore
 * try {
 *   await conn.request("thread/read", { threadId });
 * } catch (error) {
 *   if (error instanceof RpcError) console.log(error.method, error.code, error.data);
 * }
 * ```
 */
export class RpcError extends Error {
  /** The JSON-RPC error code, e.g. -32001 when the server is overloaded. */
  readonly code: number;
  /** The error's `data` member, `undefined` when absent. */
  readonly data: unknown;
  /** The method of the request that failed. */
  readonly method: string;

  /**
   * Creates the error.
   *
   * @param method The request's method.
   * @param code The JSON-RPC error code.
   * @param message The server's message.
   * @param data The error's `data` member.
   * @param options Standard error options (`cause`).
   */
  constructor(
    method: string,
    code: number,
    message: string,
    data?: unknown,
    options?: ErrorOptions,
  ) {
    super(message, options);
    this.name = "RpcError";
    this.method = method;
    this.code = code;
    this.data = data;
  }
}

/**
 * A JSON-RPC error answered to `turn/start`, or to a request a turn depends on
 * (`thread/resume`), including -32001 (overloaded) once the retries ran out.
 *
 * @example Retry later when the server is overloaded
 * ```ts ignore
 * try {
 *   await conn.turn(threadId, params);
 * } catch (error) {
 *   if (error instanceof TurnRpcError && error.code === -32001) scheduleRetry();
 * }
 * ```
 */
export class TurnRpcError extends RpcError {
  /**
   * Creates the error.
   *
   * @param method The request's method.
   * @param code The JSON-RPC error code.
   * @param message The server's message.
   * @param data The error's `data` member.
   * @param options Standard error options (`cause`).
   */
  constructor(
    method: string,
    code: number,
    message: string,
    data?: unknown,
    options?: ErrorOptions,
  ) {
    super(method, code, message, data, options);
    this.name = "TurnRpcError";
  }
}

/**
 * Thrown by every call pending on, or started on, a connection that has closed: the peer
 * crashed or is draining, the network failed, or `close()` was called.
 *
 * @example Redial after a crash
 * ```ts ignore
 * try {
 *   await conn.turn(threadId, params);
 * } catch (error) {
 *   if (error instanceof ConnectionClosedError) conn = await Conn.dial(url);
 * }
 * ```
 */
export class ConnectionClosedError extends Error {
  /** The URL of the app-server the connection was to. */
  readonly url: string;

  /**
   * Creates the error.
   *
   * @param url The app-server URL.
   * @param message What closed and why.
   * @param options Standard error options (`cause`).
   */
  constructor(url: string, message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = "ConnectionClosedError";
    this.url = url;
  }
}

/**
 * Thrown by {@linkcode Conn.dial} when the connection cannot be opened or the initialize
 * handshake fails.
 *
 * @example Report an authentication failure
 * ```ts ignore
 * try {
 *   await Conn.dial(url, { headers: { Authorization: `Bearer ${token}` } });
 * } catch (error) {
 *   if (error instanceof DialError && error.status === 401) console.error("Bad token");
 * }
 * ```
 */
export class DialError extends Error {
  /** The URL that was dialed. */
  readonly url: string;
  /** The HTTP status the upgrade was refused with, when one was seen. */
  readonly status: number | undefined;

  /**
   * Creates the error.
   *
   * @param url The URL that was dialed.
   * @param message What failed.
   * @param status The HTTP status of a refused upgrade, if known.
   * @param options Standard error options (`cause`).
   */
  constructor(url: string, message: string, status?: number, options?: ErrorOptions) {
    super(message, options);
    this.name = "DialError";
    this.url = url;
    this.status = status;
  }
}

/**
 * Thrown by {@linkcode Pool.get} when a workspace's app-server cannot be resolved or
 * dialed. Every caller waiting on that dial gets the same error; the next call tries again.
 *
 * @example Tell a failed spawn from other errors
 * ```ts ignore
 * try {
 *   await pool.get("ws-1");
 * } catch (error) {
 *   if (error instanceof WorkspaceUnavailableError) console.error(error.workspaceId, error.cause);
 * }
 * ```
 */
export class WorkspaceUnavailableError extends Error {
  /** The workspace whose app-server is unavailable. */
  readonly workspaceId: string;

  /**
   * Creates the error.
   *
   * @param workspaceId The workspace.
   * @param options Standard error options; `cause` is the resolver's or dial's error.
   */
  constructor(workspaceId: string, options?: ErrorOptions) {
    const cause = options?.cause;
    super(
      `Cannot connect to the app-server of workspace ${workspaceId}: ${
        cause instanceof Error ? cause.message : String(cause)
      }`,
      options,
    );
    this.name = "WorkspaceUnavailableError";
    this.workspaceId = workspaceId;
  }
}

/**
 * Thrown by {@linkcode Pool.get} for a new workspace when `maxConnections` connections are
 * open and none of them is idle, so none can be evicted.
 *
 * @example Answer 503 with Retry-After
 * ```ts ignore
 * try {
 *   await pool.get("ws-9");
 * } catch (error) {
 *   if (error instanceof PoolFullError) return new Response(null, { status: 503 });
 * }
 * ```
 */
export class PoolFullError extends Error {
  /** The workspace that could not get a connection. */
  readonly workspaceId: string;
  /** The pool's limit. */
  readonly maxConnections: number;

  /**
   * Creates the error.
   *
   * @param workspaceId The workspace that asked.
   * @param maxConnections The pool's limit.
   * @param options Standard error options.
   */
  constructor(workspaceId: string, maxConnections: number, options?: ErrorOptions) {
    super(
      `Cannot connect workspace ${workspaceId}: all ${maxConnections} connections are busy`,
      options,
    );
    this.name = "PoolFullError";
    this.workspaceId = workspaceId;
    this.maxConnections = maxConnections;
  }
}

/**
 * Thrown by {@linkcode Pool.get} and {@linkcode Pool.turn} once the pool is closed.
 *
 * @example Stop taking work during shutdown
 * ```ts ignore
 * await pool.close();
 * await pool.get("ws-1"); // throws PoolClosedError
 * ```
 */
export class PoolClosedError extends Error {
  /**
   * Creates the error.
   *
   * @param message What could not be done.
   * @param options Standard error options.
   */
  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = "PoolClosedError";
  }
}

/**
 * Thrown when a broker may not run a workspace because another broker holds its lease. The
 * pool reports it as the cause of a {@linkcode WorkspaceUnavailableError}.
 *
 * @example Find the owner
 * ```ts ignore
 * if (error.cause instanceof WorkspaceOwnedError) console.log(error.cause.owner, error.cause.url);
 * ```
 */
export class WorkspaceOwnedError extends Error {
  /** The workspace. */
  readonly workspaceId: string;
  /** The broker id of the owner. */
  readonly owner: string;
  /** Where the owner is reached. */
  readonly url: string;

  /**
   * Creates the error.
   *
   * @param workspaceId The workspace.
   * @param owner The owner's broker id.
   * @param url The owner's advertised URL.
   * @param options Standard error options.
   */
  constructor(workspaceId: string, owner: string, url: string, options?: ErrorOptions) {
    super(`Cannot run workspace ${workspaceId}: broker ${owner} owns it`, options);
    this.name = "WorkspaceOwnedError";
    this.workspaceId = workspaceId;
    this.owner = owner;
    this.url = url;
  }
}

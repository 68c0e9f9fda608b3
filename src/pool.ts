/**
 * Connections per workspace: dial once, share, reap idle ones.
 *
 * @module
 */

import { Conn, type DialOptions, type TurnOptions } from "./conn.ts";
import { abortable, createScope } from "./_deadline.ts";
import { timerDelay, unrefTimer } from "./_timer.ts";
import { PoolClosedError, PoolFullError, WorkspaceUnavailableError } from "./errors.ts";
import type { ThreadStartParams, Turn, TurnParams } from "./protocol.ts";
import type { Endpoint, Resolver, WsUrlResolver } from "./resolver.ts";
import { registerSizes } from "./_internals.ts";

/** Options for {@linkcode Pool}. */
export interface PoolOptions {
  /** A connection with no frame and no call for this long is closed. Defaults to 5 minutes. */
  idleTtlMs?: number;
  /**
   * How often idle connections are looked for. Defaults to `idleTtlMs / 4`. Timers cannot
   * wait longer than about 24.8 days, so a longer interval sweeps that often instead; the
   * reap itself always waits the full `idleTtlMs`.
   */
  sweepIntervalMs?: number;
  /** Options for every {@linkcode Conn.dial}; the resolver's headers are added to `headers`. */
  dial?: DialOptions;
  /** At most this many connections; the least recently used idle one makes room. */
  maxConnections?: number;
}

/** Options for {@linkcode Pool.get}. */
export interface GetOptions {
  /** Stop waiting; rejects with `signal.reason`. A shared dial goes on for other callers. */
  signal?: AbortSignal;
}

/** Options for {@linkcode Pool.release}. */
export interface ReleaseOptions {
  /** Only release when no call is in flight on the workspace's connection. */
  ifIdle?: boolean;
}

/** Options for {@linkcode Pool.turn}. */
export interface PoolTurnOptions extends TurnOptions {
  /** `thread/start` parameters, used when a new thread is started. */
  threadParams?: ThreadStartParams;
  /** Called with the thread id as soon as it is known (before the turn runs). */
  onThread?: (threadId: string, conn: Conn) => void;
}

/** The result of {@linkcode Pool.turn}. */
export interface PoolTurnResult {
  /** The thread the turn ran on (new when none was given). */
  threadId: string;
  /** codex's turn, with the collected items. */
  turn: Turn;
}

/** The kinds of {@linkcode PoolEvent}. */
export type PoolEventType = "dial" | "reap" | "evict" | "release" | "close";

/**
 * Dispatched by a {@linkcode Pool}: `dial` (a connection was opened), `reap` (an idle one
 * was closed), `evict` (an idle one made room under `maxConnections`), `release` (closed by
 * {@linkcode Pool.release}) and `close` (a pooled connection closed on its own: the peer
 * crashed, drained or the network failed). After each but `dial` the pool releases the
 * workspace through its resolver.
 *
 * @example Log the pool's life
 * ```ts ignore
 * for (const type of ["dial", "reap", "evict", "close"]) {
 *   pool.addEventListener(type, (event) => console.log(type, (event as PoolEvent).workspaceId));
 * }
 * ```
 */
export class PoolEvent extends Event {
  /** The workspace concerned. */
  readonly workspaceId: string;
  /** The connection concerned, e.g. to listen to its events after `dial`. */
  readonly conn: Conn | undefined;

  /**
   * Creates the event.
   *
   * @param type What happened.
   * @param workspaceId The workspace concerned.
   * @param conn The connection concerned.
   */
  constructor(type: PoolEventType, workspaceId: string, conn?: Conn) {
    super(type);
    this.workspaceId = workspaceId;
    this.conn = conn;
  }
}

interface Entry {
  conn: Conn | undefined;
  dialing: Promise<Conn> | undefined;
  lastUsed: number;
  /** The resolver handed out an endpoint for this entry, so one release is owed for it. */
  resolved: boolean;
  /** The pool no longer uses this entry; whoever retired it owns its release. */
  retired: boolean;
}

const DEFAULT_IDLE_TTL_MS = 5 * 60_000;
// Closing a connection writes its close frame: 50-100 µs each, more on a busy machine. A
// sweep that found 10,000 connections idle at once held the event loop for a second
// (bench/p5.ts); in batches of at most this many, or this long, requests are served
// between them.
const REAP_BATCH = 100;
const REAP_SLICE_MS = 5;
const DEFAULT_GET_TIMEOUT_MS = 60_000;
// A peer that never completes the closing handshake must not hold up close() for long.
const CLOSE_WAIT_MS = 2_000;

async function settleWithin(promises: (Promise<unknown> | undefined)[], ms: number): Promise<void> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const late = new Promise<void>((resolve) => (timer = setTimeout(resolve, ms)));
  try {
    await Promise.race([Promise.allSettled(promises), late]);
  } finally {
    clearTimeout(timer);
  }
}

function positive(name: string, value: number | undefined): void {
  if (value !== undefined && (!Number.isFinite(value) || value <= 0)) {
    throw new RangeError(`Invalid ${name}: expected a positive number, got ${value}`);
  }
}

/**
 * One {@linkcode Conn} per workspace. Concurrent `get` calls share one resolve and dial,
 * failures are not cached, a closed connection is never handed out, and connections with
 * no traffic and no call in flight for `idleTtlMs` are closed and released.
 *
 * Every successful resolve is paired with one call of the resolver's `release` as soon as
 * its connection is gone, whatever ended it: a reap, an eviction, the peer closing it, a
 * dial that failed after the resolve, or {@linkcode Pool.close}. A workspace is not
 * resolved again until its release has settled.
 *
 * @example Run turns in a workspace
 * ```ts ignore
 * const pool = new Pool(async (workspaceId) => `ws://127.0.0.1:4500/${workspaceId}`);
 * const { threadId, turn } = await pool.turn("ws-1", null, {
 *   input: [{ type: "text", text: "hi", text_elements: [] }],
 * });
 * await pool.turn("ws-1", threadId, { input: [{ type: "text", text: "more", text_elements: [] }] });
 * await pool.close();
 * ```
 */
export class Pool extends EventTarget {
  #resolve: WsUrlResolver;
  #release: ((workspaceId: string) => void | Promise<void>) | undefined;
  #crashed: ((workspaceId: string, withinMs: number) => Promise<boolean>) | undefined;
  #entries = new Map<string, Entry>();
  /** The entry last moved to the end of {@linkcode #entries}, if it is still there. */
  #newest: Entry | undefined;
  #idleTtlMs: number;
  #sweepIntervalMs: number;
  #dial: DialOptions;
  #maxConnections: number;
  #sweeper: ReturnType<typeof setInterval> | undefined;
  /** The rest of a sweep that found more than a batch to reap. */
  #reapRest: ReturnType<typeof setTimeout> | undefined;
  #closing = new AbortController();
  /** Releases and socket closes started before close(); close() waits for them. */
  #dropping = new Set<Promise<unknown>>();
  /** The release under way per workspace: the next resolve of it waits for it to settle. */
  #releasing = new Map<string, Promise<void>>();
  #closed: Promise<void> | undefined;

  /**
   * Creates a pool.
   *
   * @param resolver Finds each workspace's app-server: a function, or an object with
   * `resolve` and an optional `release` the pool calls when it drops a workspace.
   * @param options Idle TTL, sweep interval, dial options, connection limit.
   * @throws {RangeError} If a duration or the limit is not positive.
   */
  constructor(resolver: WsUrlResolver | Resolver, options: PoolOptions = {}) {
    super();
    positive("idleTtlMs", options.idleTtlMs);
    positive("sweepIntervalMs", options.sweepIntervalMs);
    positive("maxConnections", options.maxConnections);
    if (typeof resolver === "function") {
      this.#resolve = resolver;
      this.#release = undefined;
      this.#crashed = undefined;
    } else {
      this.#resolve = (id, signal) => resolver.resolve(id, signal);
      this.#release = resolver.release ? (id) => resolver.release!(id) : undefined;
      this.#crashed = resolver.crashed ? (id, ms) => resolver.crashed!(id, ms) : undefined;
    }
    this.#idleTtlMs = options.idleTtlMs ?? DEFAULT_IDLE_TTL_MS;
    this.#sweepIntervalMs = options.sweepIntervalMs ?? Math.max(1, this.#idleTtlMs / 4);
    this.#dial = options.dial ?? {};
    this.#maxConnections = options.maxConnections ?? Infinity;
    registerSizes(this, () => ({
      entries: this.#entries.size,
      releasing: this.#releasing.size,
      dropping: this.#dropping.size,
      sweeping: this.#sweeper === undefined ? 0 : 1,
      reaping: this.#reapRest === undefined ? 0 : 1,
    }));
  }

  /** True once {@linkcode Pool.close} was called. */
  get closed(): boolean {
    return this.#closed !== undefined;
  }

  /** Workspaces with an open or opening connection. */
  get size(): number {
    return this.#entries.size;
  }

  /**
   * Returns the workspace's connection, resolving and dialing it if needed.
   *
   * @example Get a connection
   * ```ts ignore
   * const conn = await pool.get("ws-1", { signal: AbortSignal.timeout(10_000) });
   * ```
   *
   * @param workspaceId The workspace.
   * @param options A signal to stop waiting.
   * @returns An open connection.
   * @throws {TypeError} If the workspace id is not a non-empty string.
   * @throws {WorkspaceUnavailableError} If the resolver or the dial failed.
   * @throws {PoolFullError} If `maxConnections` are open and none is idle.
   * @throws {PoolClosedError} If the pool is closed.
   */
  get(workspaceId: string, options: GetOptions = {}): Promise<Conn> {
    if (typeof workspaceId !== "string" || workspaceId === "") {
      return Promise.reject(
        new TypeError("Cannot get connection: workspaceId must be a non-empty string"),
      );
    }
    if (this.#closed) {
      return Promise.reject(
        new PoolClosedError(`Cannot get connection for workspace ${workspaceId}: pool is closed`),
      );
    }
    const signal = options.signal;
    if (signal?.aborted) return Promise.reject(signal.reason);
    let entry = this.#entries.get(workspaceId);
    if (entry?.conn?.closed) {
      // Closed, and its close event has not reached the pool yet.
      this.#retire(workspaceId, entry);
      entry = undefined;
    }
    if (entry) {
      this.#use(workspaceId, entry);
      if (entry.conn) return Promise.resolve(entry.conn);
      return signal ? abortable(entry.dialing!, signal) : entry.dialing!;
    }
    if (this.#entries.size >= this.#maxConnections && !this.#evictOne()) {
      return Promise.reject(new PoolFullError(workspaceId, this.#maxConnections));
    }
    const created: Entry = {
      conn: undefined,
      dialing: undefined,
      lastUsed: Date.now(),
      resolved: false,
      retired: false,
    };
    // In the map before the dial starts: a resolver that throws at once must find it there
    // to remove it, or the failure would be cached.
    this.#entries.set(workspaceId, created);
    this.#newest = created;
    this.#startSweeping();
    const dialing = this.#connect(workspaceId, created);
    // Waiters get the rejection through their own promise; this one only must not be unhandled.
    dialing.catch(() => {});
    if (this.#entries.get(workspaceId) === created) created.dialing = dialing;
    return signal ? abortable(dialing, signal) : dialing;
  }

  /**
   * Asks the resolver whether the workspace's app-server died on its own, e.g. after a
   * call failed with {@linkcode ConnectionClosedError}. False when the resolver cannot tell.
   *
   * @example Tell a crash from a lost connection
   * ```ts ignore
   * if (error instanceof ConnectionClosedError && await pool.crashed("ws-1")) {
   *   console.error("codex died in workspace ws-1");
   * }
   * ```
   *
   * @param workspaceId The workspace.
   * @param withinMs How long to wait for news of the process's death. Defaults to 250 ms.
   * @returns True if the app-server process died on its own.
   */
  async crashed(workspaceId: string, withinMs = 250): Promise<boolean> {
    try {
      return await (this.#crashed?.(workspaceId, withinMs) ?? false);
    } catch {
      return false;
    }
  }

  /**
   * Marks the workspace as used now, pushing back its idle deadline.
   *
   * @example Keep a workspace warm
   * ```ts ignore
   * pool.touch("ws-1");
   * ```
   *
   * @param workspaceId The workspace.
   */
  touch(workspaceId: string): void {
    const entry = this.#entries.get(workspaceId);
    if (entry) this.#use(workspaceId, entry);
  }

  /**
   * Runs one turn in a workspace: get the connection, start a thread when `threadId` is
   * `null`, run the turn, then touch the workspace. One deadline (`timeoutMs`, 5 minutes by
   * default) covers all of it.
   *
   * @example Start a conversation, then continue it
   * ```ts ignore
   * const first = await pool.turn("ws-1", null, { input }, { threadParams: { cwd: "/srv/ws-1" } });
   * const second = await pool.turn("ws-1", first.threadId, { input: more });
   * ```
   *
   * @param workspaceId The workspace.
   * @param threadId The thread to continue, or `null` to start one.
   * @param params `turn/start` parameters without `threadId`.
   * @param options Signal, deadline, thread parameters, a callback for the thread id.
   * @returns The thread id and codex's turn.
   * @throws {TimeoutError} If the turn does not complete in time.
   * @throws {TurnRpcError} If codex refuses the turn.
   * @throws {RpcError} If codex refuses to start the thread.
   * @throws {ConnectionClosedError} If the connection closes mid-call.
   * @throws {WorkspaceUnavailableError} If the app-server cannot be reached or started.
   * @throws {PoolFullError} If no connection can be made room for.
   * @throws {PoolClosedError} If the pool is closed.
   * @throws {DOMException} A `TimeoutError` if the deadline passes before the turn starts.
   */
  async turn(
    workspaceId: string,
    threadId: string | null,
    params: TurnParams,
    options: PoolTurnOptions = {},
  ): Promise<PoolTurnResult> {
    const timeoutMs = options.timeoutMs ?? 5 * 60_000;
    positive("timeoutMs", timeoutMs);
    const deadline = Date.now() + timeoutMs;
    const remaining = () => Math.max(1, deadline - Date.now());
    const live = this.#entries.get(workspaceId)?.conn;
    // A live connection is had at once: no deadline to keep meanwhile, and a scope (a
    // controller, a listener and a timer) per turn cost 3% of the broker's CPU on Deno.
    const scope = live && !live.closed ? undefined : createScope([options.signal], timeoutMs);
    try {
      const getSignal = scope ? scope.signal : options.signal;
      const conn = await this.get(workspaceId, getSignal ? { signal: getSignal } : {});
      const signal = options.signal;
      const call = signal ? { signal } : {};
      const { onStart, onNotification } = options;
      const id = threadId ??
        await conn.startThread(options.threadParams ?? {}, { ...call, timeoutMs: remaining() });
      options.onThread?.(id, conn);
      const turn = await conn.turn(id, params, {
        ...call,
        ...(onStart ? { onStart } : {}),
        ...(onNotification ? { onNotification } : {}),
        timeoutMs: remaining(),
      });
      return { threadId: id, turn };
    } finally {
      scope?.dispose();
      this.touch(workspaceId);
    }
  }

  /**
   * Closes the workspace's connection and releases the workspace, e.g. to hand it over to
   * another broker, or because this one may no longer run it. A later `get` connects anew
   * once the release has settled.
   *
   * @example Hand a workspace over between turns
   * ```ts ignore
   * if (await pool.release("ws-1", { ifIdle: true })) console.log("ws-1 handed over");
   * ```
   *
   * @param workspaceId The workspace.
   * @param options Whether to leave a busy workspace alone.
   * @returns `true` once the workspace is released, `false` if it was busy (with `ifIdle`),
   * still dialing, or not in the pool.
   */
  async release(workspaceId: string, options: ReleaseOptions = {}): Promise<boolean> {
    const entry = this.#entries.get(workspaceId);
    if (!entry?.conn) {
      await this.#releasing.get(workspaceId);
      return false;
    }
    if (options.ifIdle && entry.conn.inFlight > 0) return false;
    this.#drop(workspaceId, "release");
    await this.#releasing.get(workspaceId);
    return true;
  }

  /**
   * Closes every connection, releases every workspace and stops the sweep. Idempotent:
   * later calls return the same promise.
   *
   * @example Shut down
   * ```ts ignore
   * await pool.close();
   * ```
   *
   * @returns A promise that resolves once every release has finished.
   */
  close(): Promise<void> {
    this.#closed ??= (async () => {
      this.#stopSweeping();
      this.#closing.abort(new PoolClosedError("Cannot connect: pool is closed"));
      const entries = [...this.#entries];
      this.#entries.clear();
      this.#newest = undefined;
      // Released below, once their sockets have closed and their dials have settled: a dial
      // under way may still turn out to have resolved.
      for (const [, entry] of entries) entry.retired = true;
      for (const [, entry] of entries) entry.conn?.close();
      await Promise.allSettled(entries.map(([, entry]) => entry.dialing));
      await settleWithin(
        [...entries.map(([, entry]) => entry.conn?.finished), ...this.#dropping],
        CLOSE_WAIT_MS,
      );
      await Promise.allSettled(
        entries.filter(([, entry]) => entry.resolved).map(([id]) => this.#releaseWorkspace(id)),
      );
      await Promise.allSettled(this.#dropping);
    })();
    return this.#closed;
  }

  async #connect(workspaceId: string, entry: Entry): Promise<Conn> {
    const scope = createScope([this.#closing.signal], DEFAULT_GET_TIMEOUT_MS);
    let conn: Conn;
    try {
      // A release under way may be stopping the very app-server a resolve would hand out,
      // or a resolve would start a second one beside it.
      const releasing = this.#releasing.get(workspaceId);
      if (releasing) await abortable(releasing, scope.signal);
      const resolved: string | Endpoint = await this.#resolve(workspaceId, scope.signal);
      entry.resolved = true;
      const endpoint = typeof resolved === "string" ? { url: resolved } : resolved;
      conn = await Conn.dial(endpoint.url, {
        ...this.#dial,
        headers: { ...this.#dial.headers, ...endpoint.headers },
        signal: this.#dial.signal
          ? AbortSignal.any([this.#dial.signal, scope.signal])
          : scope.signal,
      });
    } catch (error) {
      // Releases the workspace if the resolve succeeded and the dial did not (HTTP 401, a
      // handshake timeout), unless close() retired the entry first and releases it itself.
      this.#retire(workspaceId, entry);
      if (this.#closing.signal.aborted) {
        throw new PoolClosedError(
          `Cannot connect workspace ${workspaceId}: pool is closed`,
          { cause: error },
        );
      }
      throw new WorkspaceUnavailableError(workspaceId, { cause: error });
    } finally {
      scope.dispose();
    }
    if (entry.retired) {
      // The pool closed while dialing; close() releases the workspace.
      conn.close();
      throw new PoolClosedError(`Cannot connect workspace ${workspaceId}: pool is closed`);
    }
    entry.conn = conn;
    entry.dialing = undefined;
    conn.addEventListener("close", () => {
      // A close the pool did not ask for: the peer crashed or drained, or the network failed.
      if (entry.retired) return;
      this.#retire(workspaceId, entry);
      this.dispatchEvent(new PoolEvent("close", workspaceId, conn));
    }, { once: true });
    this.dispatchEvent(new PoolEvent("dial", workspaceId, conn));
    return conn;
  }

  /**
   * Marks a use of the entry, and moves it to the end of the map: the map stays in order of
   * last use, so a sweep can stop at the first entry used after its cutoff.
   */
  #use(workspaceId: string, entry: Entry): void {
    entry.lastUsed = Date.now();
    // Already last: each delete and set leaves V8 a table to rehash (see KeyTable), twice
    // per turn on a busy workspace.
    if (this.#newest === entry) return;
    this.#entries.delete(workspaceId);
    this.#entries.set(workspaceId, entry);
    this.#newest = entry;
  }

  #idleSince(entry: Entry): number | undefined {
    const conn = entry.conn;
    if (!conn || conn.inFlight > 0) return undefined;
    return Math.max(entry.lastUsed, conn.lastActivity);
  }

  #evictOne(): boolean {
    let victim: string | undefined;
    let oldest = Infinity;
    for (const [id, entry] of this.#entries) {
      const since = this.#idleSince(entry);
      if (since !== undefined && since < oldest) {
        oldest = since;
        victim = id;
      }
    }
    if (victim === undefined) return false;
    this.#drop(victim, "evict");
    return true;
  }

  #sweep(): void {
    this.#stopReaping();
    const cutoff = Date.now() - this.#idleTtlMs;
    const began = performance.now();
    let reaped = 0;
    for (const [id, entry] of this.#entries) {
      // In order of last use: this one and every later one were used after the cutoff, so
      // none is idle long enough (idle time counts from the last use or frame, whichever is
      // later). A sweep of 10,000 idle connections took 5 ms on Node without this stop;
      // now it looks at the connections that may be due, and those in use, only.
      if (entry.lastUsed > cutoff) break;
      const since = this.#idleSince(entry);
      if (since === undefined || since > cutoff) continue;
      if (reaped === REAP_BATCH || (reaped > 0 && performance.now() - began >= REAP_SLICE_MS)) {
        // A new sweep reaps the rest: one in use again by then is idle no more.
        this.#reapRest = setTimeout(() => {
          this.#reapRest = undefined;
          this.#sweep();
        }, 0);
        unrefTimer(this.#reapRest);
        return;
      }
      this.#drop(id, "reap");
      reaped++;
    }
  }

  #stopReaping(): void {
    if (this.#reapRest !== undefined) clearTimeout(this.#reapRest);
    this.#reapRest = undefined;
  }

  #drop(workspaceId: string, reason: "reap" | "evict" | "release"): void {
    const entry = this.#entries.get(workspaceId);
    if (!entry) return;
    this.#retire(workspaceId, entry);
    this.dispatchEvent(new PoolEvent(reason, workspaceId, entry.conn));
  }

  /**
   * Takes an entry out of service, once: forgets it, closes its connection and, if its
   * resolve succeeded, releases the workspace. close() retires its entries on its own.
   */
  #retire(workspaceId: string, entry: Entry): void {
    if (entry.retired) return;
    entry.retired = true;
    if (this.#entries.get(workspaceId) === entry) this.#entries.delete(workspaceId);
    if (this.#newest === entry) this.#newest = undefined;
    this.#stopSweepingIfEmpty();
    entry.conn?.close();
    if (!entry.resolved) return;
    const previous = this.#releasing.get(workspaceId);
    // Called at once when nothing is pending, so the resolver learns of it before any
    // later resolve could reach it.
    const releasing: Promise<void> =
      (previous
        ? previous.then(() => this.#releaseWorkspace(workspaceId))
        : this.#releaseWorkspace(workspaceId))
        // The resolver owns its errors; a failed release must not break the pool.
        .catch(() => {})
        .finally(() => {
          if (this.#releasing.get(workspaceId) === releasing) this.#releasing.delete(workspaceId);
        });
    this.#releasing.set(workspaceId, releasing);
    const dropping = Promise.allSettled([entry.conn?.finished, releasing])
      .finally(() => this.#dropping.delete(dropping));
    this.#dropping.add(dropping);
  }

  async #releaseWorkspace(workspaceId: string): Promise<void> {
    await this.#release?.(workspaceId);
  }

  #startSweeping(): void {
    if (this.#sweeper !== undefined) return;
    // Capped: a longer delay fires after 1 ms. Sweeping early is harmless, since a reap
    // compares real idle time with idleTtlMs.
    this.#sweeper = setInterval(() => this.#sweep(), timerDelay(this.#sweepIntervalMs));
    unrefTimer(this.#sweeper);
  }

  #stopSweepingIfEmpty(): void {
    if (this.#entries.size === 0) this.#stopSweeping();
  }

  #stopSweeping(): void {
    if (this.#sweeper !== undefined) clearInterval(this.#sweeper);
    this.#sweeper = undefined;
    this.#stopReaping();
  }
}

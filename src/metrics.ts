/**
 * The broker's metrics, rendered in the Prometheus text exposition format 0.0.4: turns by
 * outcome, turn durations, open connections, dials, reaps, evictions, closes, server
 * requests by method and decision, bad requests by status, and event streams ended for a
 * slow reader. Web-standard.
 *
 * @module
 */

import type { Conn } from "./conn.ts";
import type { ServerRequestEvent } from "./events.ts";
import type { Pool, PoolEvent } from "./pool.ts";

/** The `Content-Type` of {@linkcode Metrics.render}'s output. */
export const METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8";

/**
 * Upper bounds, in seconds, of the turn-duration histogram's buckets (`+Inf` is implied).
 * Turns range from a fraction of a second (a short answer on a warm connection) to the
 * 30-minute deadline, hence the wide, roughly logarithmic spread.
 */
export const TURN_DURATION_BUCKETS: readonly number[] = Object.freeze([
  0.05,
  0.1,
  0.25,
  0.5,
  1,
  2.5,
  5,
  10,
  30,
  60,
  120,
  300,
  600,
  1800,
]);

// Exported at 0 from the start, so that rate() and alerts see a series before its first
// increment (Prometheus treats a missing series differently from a zero).
const KNOWN_OUTCOMES = [
  "completed",
  "interrupted",
  "failed",
  "brokerTimeout",
  "subprocessCrash",
  "wsDisconnect",
  "rpcError",
  "overloaded",
  "turnLost",
  "unavailable",
  "internal",
  "cancelled",
  "slowReader",
];

const PREFIX = "codex_broker_";

function escapeLabelValue(value: string): string {
  return value.replaceAll("\\", "\\\\").replaceAll('"', '\\"').replaceAll("\n", "\\n");
}

function formatNumber(value: number): string {
  if (value === Infinity) return "+Inf";
  if (value === -Infinity) return "-Inf";
  if (Number.isNaN(value)) return "NaN";
  return String(value);
}

function header(lines: string[], name: string, type: string, help: string): void {
  lines.push(`# HELP ${PREFIX}${name} ${help}`, `# TYPE ${PREFIX}${name} ${type}`);
}

function sample(
  lines: string[],
  name: string,
  labels: Record<string, string>,
  value: number,
): void {
  const pairs = Object.entries(labels).map(([key, raw]) => `${key}="${escapeLabelValue(raw)}"`);
  const set = pairs.length > 0 ? `{${pairs.join(",")}}` : "";
  lines.push(`${PREFIX}${name}${set} ${formatNumber(value)}`);
}

/** What {@linkcode Metrics.observePool} keeps per pool, to detach later. */
interface Observed {
  readonly conns: Map<Conn, () => void>;
  readonly dispose: () => void;
}

/**
 * A registry of the broker's metrics. The REST handler records turns, bad requests and slow
 * readers; a pool passed to {@linkcode Metrics.observePool} contributes its connections,
 * dials, reaps, evictions, closes and the server requests of its connections. One instance
 * can be shared by several handlers over the same pool.
 *
 * @example Serve metrics next to the handler
 * ```ts ignore
 * const metrics = new Metrics();
 * metrics.observePool(pool);
 * const handler = createTurnsHandler(pool, { secret, metrics });
 * // GET /metrics answers metrics.render()
 * ```
 */
export class Metrics {
  #turns = new Map<string, number>(KNOWN_OUTCOMES.map((outcome) => [outcome, 0]));
  #bucketCounts: number[] = TURN_DURATION_BUCKETS.map(() => 0);
  #durationSum = 0;
  #durationCount = 0;
  #dials = 0;
  #reaps = 0;
  #evictions = 0;
  #closes = 0;
  #serverRequests = new Map<string, { method: string; decision: string; count: number }>();
  #badRequests = new Map<number, number>();
  #slowReaders = 0;
  #pools = new Map<Pool, Observed>();

  /**
   * Counts one finished turn and records its duration.
   *
   * @example Record a completed turn
   * ```ts ignore
   * metrics.observeTurn("completed", 1_250);
   * ```
   *
   * @param outcome codex's turn status (`completed`, `interrupted`, `failed`) or what went
   * wrong instead (`brokerTimeout`, `subprocessCrash`, `wsDisconnect`, `rpcError`,
   * `overloaded`, `unavailable`, `internal`, `cancelled`, `slowReader`).
   * @param durationMs How long the turn took, from the request to the answer.
   * @throws {RangeError} If `durationMs` is negative or not finite.
   */
  observeTurn(outcome: string, durationMs: number): void {
    if (!Number.isFinite(durationMs) || durationMs < 0) {
      throw new RangeError(
        `Invalid turn duration: expected a non-negative number, got ${durationMs}`,
      );
    }
    this.#turns.set(outcome, (this.#turns.get(outcome) ?? 0) + 1);
    const seconds = durationMs / 1000;
    const index = TURN_DURATION_BUCKETS.findIndex((bound) => seconds <= bound);
    // Buckets are kept per interval and summed when rendered, so one observation touches
    // one slot; a duration above the last bound lands in +Inf only.
    if (index !== -1) this.#bucketCounts[index]!++;
    this.#durationSum += seconds;
    this.#durationCount++;
  }

  /**
   * Counts one request answered with a client error (400, 401, 404, 405, 413, 415).
   *
   * @example Record a missing secret
   * ```ts ignore
   * metrics.observeBadRequest(401);
   * ```
   *
   * @param status The HTTP status it was answered with.
   */
  observeBadRequest(status: number): void {
    this.#badRequests.set(status, (this.#badRequests.get(status) ?? 0) + 1);
  }

  /**
   * Counts one event stream ended because its client fell too far behind.
   *
   * @example Record a slow reader
   * ```ts ignore
   * metrics.observeSlowReader();
   * ```
   */
  observeSlowReader(): void {
    this.#slowReaders++;
  }

  /**
   * Follows a pool: counts its dials, reaps, evictions and closes, the server requests its
   * connections answer, and reports its size as the open-connections gauge. Connections
   * dialed before this call are not followed, so call it before the first turn. Observing
   * the same pool twice does not count twice.
   *
   * @example Share one registry between the handler and the server
   * ```ts ignore
   * const metrics = new Metrics();
   * const stop = metrics.observePool(pool);
   * // … later, to stop following it:
   * stop();
   * ```
   *
   * @param pool The pool to follow.
   * @returns A function that stops following the pool.
   */
  observePool(pool: Pool): () => void {
    const existing = this.#pools.get(pool);
    if (existing) return existing.dispose;
    const conns = new Map<Conn, () => void>();
    const onServerRequest = (event: Event) => {
      const { request, outcome } = event as ServerRequestEvent;
      const key = JSON.stringify([request.method, outcome]);
      const entry = this.#serverRequests.get(key);
      if (entry) entry.count++;
      else this.#serverRequests.set(key, { method: request.method, decision: outcome, count: 1 });
    };
    const onDial = (event: Event) => {
      this.#dials++;
      const conn = (event as PoolEvent).conn;
      if (!conn || conns.has(conn)) return;
      const detach = () => {
        conn.removeEventListener("serverrequest", onServerRequest);
        conn.removeEventListener("close", detach);
        conns.delete(conn);
      };
      conn.addEventListener("serverrequest", onServerRequest);
      // Every closed connection says so, whether the pool dropped it or it died: the
      // listeners go with it instead of piling up over the pool's life.
      conn.addEventListener("close", detach);
      conns.set(conn, detach);
    };
    const onReap = () => this.#reaps++;
    const onEvict = () => this.#evictions++;
    const onClose = () => this.#closes++;
    pool.addEventListener("dial", onDial);
    pool.addEventListener("reap", onReap);
    pool.addEventListener("evict", onEvict);
    pool.addEventListener("close", onClose);
    const dispose = () => {
      if (this.#pools.get(pool)?.dispose !== dispose) return;
      this.#pools.delete(pool);
      pool.removeEventListener("dial", onDial);
      pool.removeEventListener("reap", onReap);
      pool.removeEventListener("evict", onEvict);
      pool.removeEventListener("close", onClose);
      for (const detach of [...conns.values()]) detach();
    };
    this.#pools.set(pool, { conns, dispose });
    return dispose;
  }

  /**
   * Renders every metric in the Prometheus text format 0.0.4, with `# HELP` and `# TYPE`
   * lines; serve it with {@linkcode METRICS_CONTENT_TYPE}.
   *
   * @example Answer a scrape
   * ```ts ignore
   * return new Response(metrics.render(), { headers: { "content-type": METRICS_CONTENT_TYPE } });
   * ```
   *
   * @returns The exposition text, ending with a newline.
   */
  render(): string {
    const lines: string[] = [];
    header(lines, "turns_total", "counter", "Turns answered, by outcome.");
    for (const [outcome, count] of this.#turns) sample(lines, "turns_total", { outcome }, count);

    header(
      lines,
      "turn_duration_seconds",
      "histogram",
      "Time from a turn request to its answer, in seconds.",
    );
    let cumulative = 0;
    TURN_DURATION_BUCKETS.forEach((bound, index) => {
      cumulative += this.#bucketCounts[index]!;
      sample(lines, "turn_duration_seconds_bucket", { le: formatNumber(bound) }, cumulative);
    });
    sample(lines, "turn_duration_seconds_bucket", { le: "+Inf" }, this.#durationCount);
    sample(lines, "turn_duration_seconds_sum", {}, this.#durationSum);
    sample(lines, "turn_duration_seconds_count", {}, this.#durationCount);

    header(lines, "open_connections", "gauge", "Workspaces with an open or opening connection.");
    let open = 0;
    for (const pool of this.#pools.keys()) open += pool.size;
    sample(lines, "open_connections", {}, open);

    header(lines, "dials_total", "counter", "Connections dialed to codex app-servers.");
    sample(lines, "dials_total", {}, this.#dials);
    header(lines, "reaps_total", "counter", "Idle connections closed by the pool.");
    sample(lines, "reaps_total", {}, this.#reaps);
    header(
      lines,
      "evictions_total",
      "counter",
      "Idle connections closed to make room under the connection limit.",
    );
    sample(lines, "evictions_total", {}, this.#evictions);
    header(
      lines,
      "connection_closes_total",
      "counter",
      "Pooled connections that closed on their own (crash, drain, network).",
    );
    sample(lines, "connection_closes_total", {}, this.#closes);

    header(
      lines,
      "server_requests_total",
      "counter",
      "Requests from codex (approvals, user input) answered, by method and decision.",
    );
    for (const { method, decision, count } of this.#serverRequests.values()) {
      sample(lines, "server_requests_total", { method, decision }, count);
    }

    header(lines, "bad_requests_total", "counter", "Requests refused with a client error.");
    for (const [status, count] of [...this.#badRequests].sort(([a], [b]) => a - b)) {
      sample(lines, "bad_requests_total", { status: String(status) }, count);
    }

    header(
      lines,
      "slow_readers_total",
      "counter",
      "Event streams ended, and their turns interrupted, because the client read too slowly.",
    );
    sample(lines, "slow_readers_total", {}, this.#slowReaders);
    return lines.join("\n") + "\n";
  }
}

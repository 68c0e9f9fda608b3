/**
 * Percentiles, the per-cell result shape shared by `conn_bench.ts` and `main.ts`, and the
 * table both print.
 *
 * @module
 */

/** The goal for later (issue 2, section 5): the broker keeps this share of the floor. */
export const GOAL_RATIO = 0.8;

// Past this the single-threaded fake server, not the client, caps the turn rate.
const SERVER_BOUND_PCT = 90;

/** Printed before the JSON result line, so `main.ts` can find it among other output. */
export const RESULT_MARKER = "BENCH_RESULT ";

/** One client's numbers in one cell, rounds pooled. */
export interface ClientResult {
  /** Turns completed in the measured rounds. */
  turns: number;
  /** Turns per second of the median round. */
  turnsPerSec: number;
  /** Median turn latency, ms. */
  p50Ms: number;
  /** 99th percentile turn latency, ms. */
  p99Ms: number;
  /** Slowest turn, ms: shows a Nagle / delayed-ACK stall (~40 ms) if one slipped in. */
  maxMs: number;
  /** Turns/s of the slowest and fastest round, to show the noise. */
  roundTurnsPerSec: number[];
  /** Client process CPU (user + system) per turn, µs. */
  cpuUsPerTurn: number;
  /** Client process CPU over wall time, percent of one core. */
  clientCpuPct: number;
  /** Fake server process CPU over wall time, percent of one core; null when in-process. */
  serverCpuPct: number | null;
}

/** One concurrency level. */
export interface CellResult {
  concurrency: number;
  broker: ClientResult;
  minimal: ClientResult;
}

/** What one runtime's run of `conn_bench.ts` reports. */
export interface RuntimeResult {
  /** `navigator.userAgent`, e.g. `Deno/2.9.6`. */
  runtime: string;
  /** Where the fake server ran. */
  server: "process" | "inprocess";
  rounds: number;
  roundMs: number;
  warmupMs: number;
  cells: CellResult[];
  /** Wall time of the whole run, ms. */
  totalMs: number;
}

/**
 * Nearest-rank percentile.
 *
 * @param sorted Ascending samples.
 * @param p Percentile in [0, 100].
 * @returns The sample at that rank, or NaN without samples.
 */
export function percentile(sorted: Float64Array, p: number): number {
  if (sorted.length === 0) return NaN;
  const rank = Math.min(sorted.length, Math.max(1, Math.ceil((p / 100) * sorted.length)));
  return sorted[rank - 1] ?? NaN;
}

/** A growable sample buffer: pushes into a Float64Array so recording allocates (almost) nothing. */
export class Samples {
  #data = new Float64Array(1 << 16);
  #length = 0;

  get length(): number {
    return this.#length;
  }

  push(value: number): void {
    if (this.#length === this.#data.length) {
      const grown = new Float64Array(this.#data.length * 2);
      grown.set(this.#data);
      this.#data = grown;
    }
    this.#data[this.#length++] = value;
  }

  /** A sorted copy of the samples. */
  sorted(): Float64Array {
    return this.#data.slice(0, this.#length).sort();
  }

  clear(): void {
    this.#length = 0;
  }
}

function fmt(value: number, digits: number): string {
  return Number.isFinite(value) ? value.toFixed(digits) : "-";
}

/**
 * Formats milliseconds with three significant digits or so; "-" for a missing value.
 *
 * @param value Milliseconds.
 * @returns The text.
 */
export function ms(value: number): string {
  if (!Number.isFinite(value)) return "-";
  return value < 10 ? value.toFixed(2) : value < 100 ? value.toFixed(1) : value.toFixed(0);
}

function pct(value: number | null): string {
  return value === null ? "n/a" : `${value.toFixed(0)}%`;
}

/**
 * Lays out a plain-text table: the first column left-aligned, the others right-aligned.
 *
 * @param header Column titles.
 * @param rows The cells, row by row.
 * @returns The table's lines, joined.
 */
export function table(header: string[], rows: string[][]): string {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? "").length)));
  const line = (cells: string[]) =>
    cells.map((c, i) => (i === 0 ? c.padEnd(widths[i] ?? 0) : c.padStart(widths[i] ?? 0)))
      .join("  ");
  return [line(header), widths.map((w) => "-".repeat(w)).join("  "), ...rows.map(line)].join(
    "\n",
  );
}

/**
 * Formats one runtime's results: throughput and latency, then where the CPU went.
 *
 * @param result One runtime's run.
 * @returns The tables, as text.
 */
export function formatRuntime(result: RuntimeResult): string {
  const server = result.server === "process"
    ? "fake server in its own Node 22 process"
    : "fake server in the client's process";
  const title =
    `${result.runtime}: ${server}; per cell ${result.rounds} rounds x ${result.roundMs} ms ` +
    `per client, after ${result.warmupMs} ms warm-up each; run took ${
      (result.totalMs / 1000).toFixed(1)
    } s`;
  const main = table(
    [
      "conc",
      "broker t/s",
      "minimal t/s",
      "ratio",
      `goal >=${GOAL_RATIO.toFixed(2)}`,
      "broker p50/p99 ms",
      "minimal p50/p99 ms",
      "p50 ratio",
    ],
    result.cells.map(({ concurrency, broker, minimal }) => {
      const ratio = broker.turnsPerSec / minimal.turnsPerSec;
      return [
        String(concurrency),
        fmt(broker.turnsPerSec, 0),
        fmt(minimal.turnsPerSec, 0),
        fmt(ratio, 2),
        ratio >= GOAL_RATIO ? "met" : "not met",
        `${ms(broker.p50Ms)} / ${ms(broker.p99Ms)}`,
        `${ms(minimal.p50Ms)} / ${ms(minimal.p99Ms)}`,
        fmt(broker.p50Ms / minimal.p50Ms, 2),
      ];
    }),
  );
  const spread = (r: ClientResult) =>
    `${fmt(Math.min(...r.roundTurnsPerSec), 0)}-${fmt(Math.max(...r.roundTurnsPerSec), 0)}`;
  const cpu = table(
    [
      "conc",
      "CPU us/turn broker/minimal (ratio)",
      "client CPU broker/minimal",
      "server CPU broker/minimal",
      "max ms broker/minimal",
      "rounds t/s broker | minimal",
    ],
    result.cells.map(({ concurrency, broker, minimal }) => [
      String(concurrency),
      `${fmt(broker.cpuUsPerTurn, 0)} / ${fmt(minimal.cpuUsPerTurn, 0)} (${
        fmt(minimal.cpuUsPerTurn / broker.cpuUsPerTurn, 2)
      })`,
      `${pct(broker.clientCpuPct)} / ${pct(minimal.clientCpuPct)}`,
      `${pct(broker.serverCpuPct)} / ${pct(minimal.serverCpuPct)}`,
      `${ms(broker.maxMs)} / ${ms(minimal.maxMs)}`,
      `${spread(broker)} | ${spread(minimal)}`,
    ]),
  );
  const notes = [
    "CPU ratio = minimal/broker CPU per turn: the throughput ratio a client-bound run would show, " +
    "and less sensitive to other load on the machine than turns/s.",
  ];
  const serverBound = result.cells.filter((c) => (c.minimal.serverCpuPct ?? 0) >= SERVER_BOUND_PCT)
    .map((c) => c.concurrency);
  if (serverBound.length > 0) {
    notes.push(
      `concurrency ${serverBound.join(", ")}: the fake server used >=${SERVER_BOUND_PCT}% of a ` +
        "core under the minimal client, so the floor there is the server's, and the throughput " +
        "ratio flatters the broker; read the CPU ratio instead.",
    );
  }
  return `${title}\n\n${main}\n\n${cpu}\n${notes.join("\n")}\n`;
}

/** Percentiles and extremes of a sample; a percentile with no sample above it is NaN. */
export interface Stats {
  n: number;
  p50: number;
  p90: number;
  p99: number;
  min: number;
  max: number;
}

/** Summarizes `values` (non-finite ones left out). */
export function stats(values: number[]): Stats {
  const sorted = Float64Array.from(values.filter(Number.isFinite)).sort();
  const n = sorted.length;
  // A percentile is shown only when at least one sample lies above it.
  return {
    n,
    p50: percentile(sorted, 50),
    p90: n >= 10 ? percentile(sorted, 90) : NaN,
    p99: n >= 100 ? percentile(sorted, 99) : NaN,
    min: n > 0 ? sorted[0] ?? NaN : NaN,
    max: n > 0 ? sorted[n - 1] ?? NaN : NaN,
  };
}

/**
 * A 90% bootstrap interval of `p50(a) / p50(b)`, resampling each side on its own. Seeded,
 * so the same samples always print the same interval.
 */
export function ratioInterval(a: number[], b: number[], resamples = 2000): [number, number] {
  if (a.length === 0 || b.length === 0) return [NaN, NaN];
  let seed = 0x9e3779b9;
  const random = () => {
    // mulberry32
    seed = (seed + 0x6d2b79f5) | 0;
    let t = seed;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  const median = (values: number[]) => {
    const pick = Float64Array.from(values, () => values[Math.floor(random() * values.length)]!);
    return percentile(pick.sort(), 50);
  };
  const ratios = Float64Array.from({ length: resamples }, () => median(a) / median(b)).sort();
  return [percentile(ratios, 5), percentile(ratios, 95)];
}

/** An integer from the environment (`BENCH_*`), at least `min`; `fallback` when unset. */
export function envInt(name: string, fallback: number, min: number): number {
  const raw = Deno.env.get(name);
  if (raw === undefined || raw === "") return fallback;
  const value = Number(raw);
  if (!Number.isInteger(value) || value < min) {
    throw new TypeError(`${name} must be an integer >= ${min}, got "${raw}"`);
  }
  return value;
}

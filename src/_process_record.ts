/**
 * Process records: a small JSON file in each codex's run directory that says which
 * process it is, so a broker that starts after a crash can stop what its predecessor left
 * running, and never anything else. Linux tells a process apart from a later one with the
 * same pid by its start time (field 22 of `/proc/PID/stat`); elsewhere nothing is killed.
 *
 * @module
 */

import { readFileSync, readlinkSync } from "node:fs";
import { chmod, readdir, readFile, rename, rm, writeFile } from "node:fs/promises";
import { hostname } from "node:os";
import { join } from "node:path";
import process from "node:process";

/** File name of the record inside a run directory. */
export const RECORD_FILE = "codex.json";

/** Prefix of the per-process run directories the supervisor creates. */
export const RUN_DIR_PREFIX = "codex-broker-";

/**
 * What `<runDir>/codex-broker-XXXXXX/codex.json` holds about one codex app-server. It is
 * written before codex starts (with `pid` null) and again once it runs. A record names its
 * codex by the `--ws-token-sha256` digest on codex's command line; records of earlier
 * brokers, which wrote the token into a file, name it by `tokenFile` instead.
 *
 * @example A record
 * ```json
 * {
 *   "version": 1, "workspaceId": "ws-1", "pid": 4242, "pgid": 4242, "startTime": 912345,
 *   "bootId": "8da39624-…", "hostname": "broker-0", "pidNamespace": "pid:[4026531836]",
 *   "tokenSha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
 *   "brokerId": "broker-0:8787", "brokerPid": 4100, "brokerStartTime": 900001
 * }
 * ```
 */
export interface ProcessRecord {
  /** Format version: 1. */
  version: 1;
  /** The workspace the process serves. */
  workspaceId: string;
  /** The pid of codex (also its process group id), or null before it was spawned. */
  pid: number | null;
  /** The process group codex leads, or null before it was spawned. */
  pgid: number | null;
  /** Start time of the process in clock ticks since boot (Linux), else null. */
  startTime: number | null;
  /** `/proc/sys/kernel/random/boot_id` (Linux), else null. */
  bootId: string | null;
  /** The host name of the machine. */
  hostname: string;
  /** The pid namespace (`/proc/self/ns/pid`, Linux), so containers never judge each other's pids. */
  pidNamespace: string | null;
  /**
   * The `--ws-token-sha256` codex was started with (the digest of its capability token, on
   * its command line), which tells it apart from any other app-server.
   */
  tokenSha256?: string;
  /** The `--ws-token-file` codex was started with, in the records of older brokers. */
  tokenFile?: string;
  /** The owner tag of the broker that started it, if it gave one. */
  brokerId?: string;
  /** The pid of the broker process that started it. */
  brokerPid: number;
  /** The start time of that broker process (Linux), else null. */
  brokerStartTime: number | null;
}

/** What `/proc/PID/stat` and `/proc/PID/cmdline` say about a process. */
export interface ProcessInfo {
  /** Field 22: start time in clock ticks since boot. */
  startTime: number;
  /** Field 5: the process group. */
  pgid: number;
  /** Field 3: `R`, `S`, `D`, `Z` (zombie: exited, not yet reaped), … */
  state: string;
  /** The arguments, empty for a zombie. */
  cmdline: string[];
}

/**
 * Reads a process's identity from `/proc`.
 *
 * @param pid The process id.
 * @returns Its start time, group, state and arguments, or undefined if no such process
 * exists or the platform has no `/proc`.
 */
export function processInfo(pid: number): ProcessInfo | undefined {
  let stat: string;
  try {
    stat = readFileSync(`/proc/${pid}/stat`, "utf8");
  } catch {
    return undefined;
  }
  // The command name (field 2) is in parentheses and may hold spaces and parentheses.
  const fields = stat.slice(stat.lastIndexOf(")") + 2).trim().split(" ");
  const startTime = Number(fields[19]);
  const pgid = Number(fields[2]);
  if (!Number.isSafeInteger(startTime) || !Number.isSafeInteger(pgid)) return undefined;
  let cmdline: string[] = [];
  try {
    cmdline = readFileSync(`/proc/${pid}/cmdline`, "utf8").split("\0");
    if (cmdline.at(-1) === "") cmdline.pop();
  } catch {
    // Gone in between: a zombie has no command line either.
  }
  return { startTime, pgid, state: fields[0] ?? "?", cmdline };
}

/** Where this process runs: enough to tell whether a record's pids mean anything here. */
export interface HostIdentity {
  /** `os.hostname()`. */
  hostname: string;
  /** The boot id (Linux), else null. */
  bootId: string | null;
  /** The pid namespace (Linux), else null. */
  pidNamespace: string | null;
}

/**
 * Identifies the machine, boot and pid namespace this process runs in.
 *
 * @returns The identity.
 */
export function hostIdentity(): HostIdentity {
  let bootId: string | null = null;
  let pidNamespace: string | null = null;
  try {
    bootId = readFileSync("/proc/sys/kernel/random/boot_id", "utf8").trim() || null;
  } catch {
    // Not Linux.
  }
  try {
    pidNamespace = readlinkSync("/proc/self/ns/pid");
  } catch {
    // Not Linux, or no access.
  }
  return { hostname: hostname(), bootId, pidNamespace };
}

/**
 * Writes a record atomically (a temporary file renamed over it), readable by the owner only.
 *
 * @param dir The run directory.
 * @param record The record.
 * @returns Once the record is in place.
 */
export async function writeProcessRecord(dir: string, record: ProcessRecord): Promise<void> {
  const path = join(dir, RECORD_FILE);
  const temporary = `${path}.${randomSuffix()}.tmp`;
  try {
    await writeFile(temporary, `${JSON.stringify(record)}\n`, { mode: 0o600, flag: "wx" });
    await chmod(temporary, 0o600);
    await rename(temporary, path);
  } catch (error) {
    await rm(temporary, { force: true }).catch(() => {});
    throw error;
  }
}

/**
 * Reads the record of a run directory.
 *
 * @param dir The run directory.
 * @returns The record, or undefined if there is none.
 * @throws {Error} If the file exists but is not a record.
 */
export async function readProcessRecord(dir: string): Promise<ProcessRecord | undefined> {
  let text: string;
  try {
    text = await readFile(join(dir, RECORD_FILE), "utf8");
  } catch (error) {
    if (codeOf(error) === "ENOENT" || codeOf(error) === "ENOTDIR") return undefined;
    throw error;
  }
  const record = JSON.parse(text) as Partial<ProcessRecord> | null;
  if (
    record === null || typeof record !== "object" || record.version !== 1 ||
    typeof record.hostname !== "string" ||
    (typeof record.tokenSha256 !== "string" && typeof record.tokenFile !== "string") ||
    typeof record.brokerPid !== "number" || !nullableNumber(record.pid) ||
    !nullableNumber(record.pgid) || !nullableNumber(record.startTime) ||
    !nullableNumber(record.brokerStartTime)
  ) {
    throw new Error(`Cannot read the process record in ${dir}: unexpected content`);
  }
  return record as ProcessRecord;
}

/**
 * Options for {@linkcode cleanUpLeftovers}.
 *
 * @example Give a stubborn process one second to die
 * ```ts ignore
 * const options: CleanUpLeftoversOptions = { killTimeoutMs: 1_000 };
 * ```
 */
export interface CleanUpLeftoversOptions {
  /**
   * How long to wait for a killed process to disappear before the run directory is
   * removed anyway. Defaults to 2 seconds.
   */
  killTimeoutMs?: number;
}

/** Why {@linkcode cleanUpLeftovers} left a run directory alone. */
export type KeptReason =
  /** The record names another machine (a broker there owns it). */
  | "otherHost"
  /** The record is from an earlier boot with this host name (maybe another machine). */
  | "otherBoot"
  /** The record is from another pid namespace (another container on this machine). */
  | "otherPidNamespace"
  /** The broker that wrote the record is still running. */
  | "ownerAlive"
  /** No `/proc` to tell a live process from a reused pid, and the pid exists. */
  | "unverifiable"
  /** No readable record: nothing says whose it is. */
  | "noRecord";

/**
 * What {@linkcode cleanUpLeftovers} did.
 *
 * @example Log it
 * ```ts ignore
 * const report: CleanUpLeftoversReport = await cleanUpLeftovers(runDirs);
 * console.error(report.killed.length, report.removed.length, report.kept, report.errors);
 * ```
 */
export interface CleanUpLeftoversReport {
  /** The pids of codex processes whose process groups were killed. */
  killed: number[];
  /** Run directories removed, each with its record (and an older broker's token file). */
  removed: string[];
  /** Run directories left alone, and why. */
  kept: { path: string; reason: KeptReason }[];
  /** What could not be read, killed or removed. The clean-up goes on after each. */
  errors: Error[];
}

/**
 * Stops what a crashed broker on this machine left behind, and removes its run
 * directories. Call it when a broker starts, with the run directories of every workspace
 * (each holds one `codex-broker-XXXXXX` directory per codex, with a `codex.json`
 * {@linkcode ProcessRecord}; an earlier broker's also held a `token`).
 *
 * A directory is left alone when its record comes from another host, boot or pid
 * namespace, or from a broker that is still running, or when it has no record. Otherwise
 * the process it names gets SIGKILL, with its process group, but only if a process with
 * that pid exists, started at the recorded time, and runs `app-server` with the recorded
 * token digest (or token file): a pid the system gave to another process is never
 * signalled. Then the directory is removed.
 *
 * @example Clean up a workspaces directory laid out as `<dir>/<id>/run`
 * ```ts ignore
 * const ids = await readdir(workspacesDir).catch(() => []);
 * const report = await cleanUpLeftovers(ids.map((id) => join(workspacesDir, id, "run")));
 * ```
 *
 * @param runDirs Directories to scan; missing ones are skipped.
 * @param options How long a killed process may take to disappear.
 * @returns What was killed, removed and kept. Never rejects: failures are in `errors`.
 */
export async function cleanUpLeftovers(
  runDirs: readonly string[],
  options: CleanUpLeftoversOptions = {},
): Promise<CleanUpLeftoversReport> {
  const report: CleanUpLeftoversReport = { killed: [], removed: [], kept: [], errors: [] };
  const here = hostIdentity();
  const killTimeoutMs = options.killTimeoutMs ?? 2_000;
  for (const runDir of runDirs) {
    let names: string[];
    try {
      names = (await readdir(runDir, { withFileTypes: true }))
        .filter((entry) => entry.isDirectory() && entry.name.startsWith(RUN_DIR_PREFIX))
        .map((entry) => entry.name);
    } catch (error) {
      if (codeOf(error) !== "ENOENT" && codeOf(error) !== "ENOTDIR") {
        report.errors.push(wrap(`Cannot list the run directory ${runDir}`, error));
      }
      continue;
    }
    for (const name of names) {
      await cleanUpOne(join(runDir, name), here, killTimeoutMs, report);
    }
  }
  return report;
}

async function cleanUpOne(
  path: string,
  here: HostIdentity,
  killTimeoutMs: number,
  report: CleanUpLeftoversReport,
): Promise<void> {
  let record: ProcessRecord | undefined;
  try {
    record = await readProcessRecord(path);
  } catch (error) {
    report.errors.push(wrap(`Cannot read the process record in ${path}`, error));
  }
  const keep = (reason: KeptReason): void => {
    report.kept.push({ path, reason });
  };
  if (!record) return keep("noRecord");
  if (record.hostname !== here.hostname) return keep("otherHost");
  if (record.bootId !== here.bootId) return keep("otherBoot");
  if (record.pidNamespace !== here.pidNamespace) return keep("otherPidNamespace");

  const owner = identify(record.brokerPid, record.brokerStartTime, () => true);
  if (owner === "same") return keep("ownerAlive");
  if (owner === "unknown") return keep("unverifiable");

  if (record.pid !== null) {
    const [flag, value] = typeof record.tokenSha256 === "string"
      ? ["--ws-token-sha256", record.tokenSha256]
      : ["--ws-token-file", record.tokenFile];
    const codex = identify(record.pid, record.startTime, (cmdline) => {
      const at = cmdline.indexOf(flag);
      return cmdline.includes("app-server") && at >= 0 && cmdline[at + 1] === value;
    });
    if (codex === "unknown") return keep("unverifiable");
    if (codex === "same") {
      const info = processInfo(record.pid);
      // Its own group, as spawned; should it have left it, only the process itself.
      const target = info && info.pgid === record.pgid ? -info.pgid : record.pid;
      try {
        process.kill(target, "SIGKILL");
        report.killed.push(record.pid);
      } catch (error) {
        if (codeOf(error) !== "ESRCH") {
          report.errors.push(wrap(`Cannot kill codex process ${record.pid}`, error));
        }
      }
      await waitUntilGone(record.pid, record.startTime, killTimeoutMs);
    }
  }
  try {
    await rm(path, { recursive: true, force: true });
    report.removed.push(path);
  } catch (error) {
    report.errors.push(wrap(`Cannot remove the run directory ${path}`, error));
  }
}

/**
 * Whether the process with this pid is the one a record names: "same" (alive, started at
 * that time, and `matches` its command line), "other" (gone, a zombie, or a different
 * process with a reused pid), or "unknown" (it exists but nothing can tell).
 */
function identify(
  pid: number,
  startTime: number | null,
  matches: (cmdline: string[]) => boolean,
): "same" | "other" | "unknown" {
  const info = processInfo(pid);
  if (info) {
    if (info.state === "Z" || info.startTime !== startTime) return "other";
    return matches(info.cmdline) ? "same" : "other";
  }
  if (!exists(pid)) return "other";
  // A pid exists but there is no /proc to read it from.
  return "unknown";
}

async function waitUntilGone(
  pid: number,
  startTime: number | null,
  timeoutMs: number,
): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    const info = processInfo(pid);
    if (!info || info.state === "Z" || info.startTime !== startTime) return;
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
}

function exists(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (error) {
    return codeOf(error) !== "ESRCH";
  }
}

function nullableNumber(value: unknown): boolean {
  return value === null || typeof value === "number";
}

function codeOf(error: unknown): unknown {
  return (error as { code?: unknown } | null)?.code;
}

function wrap(message: string, cause: unknown): Error {
  return new Error(`${message}: ${cause instanceof Error ? cause.message : String(cause)}`, {
    cause,
  });
}

function randomSuffix(): string {
  const bytes = crypto.getRandomValues(new Uint8Array(6));
  return Array.from(bytes, (byte) => byte.toString(16).padStart(2, "0")).join("");
}

/**
 * Runs one `codex app-server` per workspace and hands out its loopback endpoint. This is the
 * runtime-specific half of the broker: it uses `node:child_process` and `node:fs`, which
 * Deno, Bun and Node all provide.
 *
 * @example Serve turns through a pool backed by the supervisor
 * ```ts ignore
 * import { Pool } from "@codex-broker/broker";
 * import { createCodexResolver } from "@codex-broker/broker/supervisor";
 *
 * const resolver = createCodexResolver({ cwd: (id) => `/srv/workspaces/${id}` });
 * const pool = new Pool(resolver);
 * // …
 * await pool.close();
 * await resolver.close();
 * ```
 *
 * @module
 */

import { type ChildProcess, spawn } from "node:child_process";
import { createHash } from "node:crypto";
import { existsSync, readFileSync, rmSync, statSync } from "node:fs";
import { chmod, lchown, lstat, mkdir, mkdtemp, readdir, rm, rmdir } from "node:fs/promises";
import { tmpdir } from "node:os";
import { basename, delimiter, dirname, join, resolve as resolvePath } from "node:path";
import process from "node:process";
import { fileURLToPath } from "node:url";
import { copyCodexHomeTemplate } from "./_codex_home.ts";
import { writeApiKeyLogin } from "./_credentials.ts";
import { abortable, delay } from "./_deadline.ts";
import {
  type HostIdentity,
  hostIdentity,
  processInfo,
  type ProcessRecord,
  RUN_DIR_PREFIX,
  writeProcessRecord,
} from "./_process_record.ts";
import { MAX_TIMER_DELAY_MS, timerDelay, unrefTimer } from "./_timer.ts";
import { canUseWatchdog, COMMAND_NOT_FOUND_PREFIX, watchdogSpawn } from "./_watchdog.ts";
import { assertWorkspaceId } from "./_workspace_id.ts";
import type { Endpoint, Resolver } from "./resolver.ts";

export { createFileLeaseStore } from "./file_lease.ts";
export type { FileLeaseStoreOptions } from "./file_lease.ts";
// Re-exported so this entry point documents every type its API mentions.
export type { Endpoint, Resolver, WsUrlResolver } from "./resolver.ts";
export {
  cleanUpLeftovers,
  type CleanUpLeftoversOptions,
  type CleanUpLeftoversReport,
  type KeptReason,
  type ProcessRecord,
} from "./_process_record.ts";

/**
 * Options for {@linkcode createCodexResolver}.
 *
 * @example One directory and one codex home per workspace
 * ```ts ignore
 * const options: CodexResolverOptions = {
 *   cwd: (id) => `/srv/workspaces/${id}`,
 *   codexHome: (id) => `/srv/codex-homes/${id}`,
 *   args: ["-c", 'model="gpt-5"'],
 *   readyTimeoutMs: 30_000,
 *   onError: (error) => console.error(`codex-broker: ${error.message}`),
 * };
 * ```
 */
export interface CodexResolverOptions {
  /**
   * The codex executable. Defaults to a `codex` next to the running executable when that is
   * a compiled broker (not `deno`, `bun` or `node`), then the native binary of
   * `@openai/codex` in the nearest `node_modules` above this module (not the current
   * directory), then `node_modules/.bin/codex` there, then `codex` on `PATH`.
   */
  command?: string;
  /** Extra arguments, appended after `app-server --listen … --ws-token-sha256 …`. */
  args?: readonly string[];
  /**
   * Environment variables laid over the inherited environment. `undefined` removes a
   * variable.
   */
  env?: Record<string, string | undefined>;
  /** `CODEX_HOME` for a workspace, created on demand. Defaults to the inherited one. */
  codexHome?: (workspaceId: string) => string;
  /**
   * The operator's codex home (e.g. `~/.codex`), copied into the workspace's
   * {@linkcode CodexResolverOptions.codexHome} before each spawn, which it requires.
   * Copied: `config.toml`, `auth.json`, `.credentials.json`, `AGENTS.md`,
   * `AGENTS.override.md`, `hooks.json`, and the directories `agents/`, `prompts/`, `rules/`
   * and `skills/` (hidden entries skipped); never threads, logs, history or databases. Per
   * file, the newer modification time wins, so a token codex refreshed inside a workspace
   * is kept, and a template updated later (`codex login` again) reaches the workspace at
   * its next start. Copies are written atomically and readable by the owner only.
   */
  codexHomeTemplate?: string;
  /**
   * The workspace directory codex runs in, created on demand. Defaults to
   * `./workspaces/<workspaceId>` under the current directory.
   */
  cwd?: (workspaceId: string) => string;
  /**
   * Where a workspace's codex keeps its process record: each spawn gets a private
   * `codex-broker-XXXXXX` directory (0700) in it, holding `codex.json` (0600, see
   * {@linkcode ProcessRecord}), removed when codex stops, or by its watchdog within
   * milliseconds if the broker dies. The directory itself is created (0700) on demand and
   * stays. Pass these directories to {@linkcode cleanUpLeftovers} when a broker starts.
   * Defaults to the system's temporary directory.
   *
   * The capability token itself is never written anywhere: codex gets its SHA-256 digest on
   * its command line (`--ws-token-sha256`), and only this process holds the token, so no
   * command of another workspace can read it from a file.
   */
  runDir?: (workspaceId: string) => string;
  /**
   * Run codex (and its watchdog, and every command its model runs) as this user instead of
   * the current one; this process must run as root. Before each start the workspace's
   * `cwd` (not what is inside it) and its whole `codexHome` are given to the user (0700);
   * the run directory stays this process's. A spawn whose process does not run as `uid`
   * fails with a {@linkcode SpawnError}.
   */
  user?: { uid: number; gid: number; name?: string };
  /** An owner tag (e.g. the broker's id) written into each process record as `brokerId`. */
  brokerId?: string;
  /** How long a spawn may take to answer `GET /readyz` with 200. Defaults to 15 seconds. */
  readyTimeoutMs?: number;
  /** How long a stopping process gets between SIGTERM and SIGKILL. Defaults to 3 seconds. */
  stopTimeoutMs?: number;
  /**
   * Called with a failure that happens in the background, where no caller can catch it: a
   * token directory that cannot be removed once its codex has exited. The resolver goes on
   * working. Defaults to `console.error`, which also gets the error if `onError` throws.
   */
  onError?: (error: Error) => void;
}

/**
 * A {@linkcode Resolver} that owns one `codex app-server` subprocess per workspace. Its
 * functions do not depend on `this`, so they can be passed around detached.
 *
 * @example Find the process behind a workspace
 * ```ts ignore
 * const resolver: CodexResolver = createCodexResolver();
 * await resolver.resolve("ws-1");
 * console.log(resolver.pid("ws-1"));
 * await resolver.release("ws-1");
 * await resolver.close();
 * ```
 */
export interface CodexResolver extends Resolver {
  /**
   * Returns the workspace's endpoint, spawning codex and waiting for readiness if needed.
   * Concurrent calls for one workspace share one spawn.
   *
   * @param workspaceId The workspace; used as a path segment, so it is validated first.
   * @param signal Gives up waiting; a spawn nobody waits for any more is stopped.
   * @returns A fresh `{ url, headers: { Authorization: "Bearer …" } }`.
   * @throws {TypeError} If the workspace id is invalid.
   * @throws {SpawnError} If codex cannot be started.
   * @throws {Error} If the resolver is closed, or `signal.reason` if `signal` aborts.
   */
  resolve(workspaceId: string, signal?: AbortSignal): Promise<Endpoint>;
  /**
   * Stops the workspace's codex (SIGTERM, then SIGKILL after `stopTimeoutMs`) and waits for
   * it to exit. A later resolve starts a new one.
   *
   * @param workspaceId The workspace.
   * @returns Once the process has exited and its run directory is gone.
   * @throws {TypeError} If the workspace id is invalid.
   */
  release(workspaceId: string): Promise<void>;
  /**
   * Stops every codex this resolver started and refuses new resolves. Idempotent.
   *
   * @returns Once every process has exited.
   */
  close(): Promise<void>;
  /**
   * Whether the workspace's codex died on its own (crashed, killed) since it was last
   * started, waiting up to `withinMs` for its exit to be reported.
   *
   * @param workspaceId The workspace.
   * @param withinMs How long to wait for a dying process's exit.
   * @returns True if the ready process exited without being stopped.
   */
  crashed(workspaceId: string, withinMs: number): Promise<boolean>;
  /**
   * The pid of the workspace's codex while it is starting or running, for tests and logs.
   *
   * @param workspaceId The workspace.
   * @returns The pid, or `undefined` if no process runs for the workspace.
   */
  pid(workspaceId: string): number | undefined;
}

/**
 * Exit status and stderr of a codex that could not be started.
 *
 * @example Describe an early exit
 * ```ts ignore
 * throw new SpawnError("ws-1", "exited with code 3 before listening", {
 *   exitCode: 3,
 *   stderrTail: "boom\n",
 * });
 * ```
 */
export interface SpawnErrorDetails {
  /** The exit code, if the process exited on its own. */
  exitCode?: number | null;
  /** The signal that ended the process, if one did. */
  signal?: string | null;
  /** The last bytes (at most 8 KiB) the process wrote to stderr. */
  stderrTail?: string;
}

/**
 * Thrown when codex cannot be started for a workspace: the binary is missing, it exited
 * before it was ready, or it did not become ready in time. The message ends with the last
 * lines of its stderr.
 *
 * @example Report why codex did not start
 * ```ts ignore
 * try {
 *   await resolver.resolve("ws-1");
 * } catch (error) {
 *   if (error instanceof SpawnError) console.error(error.exitCode, error.stderrTail);
 *   throw error;
 * }
 * ```
 */
export class SpawnError extends Error {
  /** The workspace whose codex failed to start. */
  readonly workspaceId: string;
  /** The exit code, or null if the process did not exit on its own (or never ran). */
  readonly exitCode: number | null;
  /** The signal that ended the process, or null. */
  readonly signal: string | null;
  /** The end of the process's stderr (at most 8 KiB), without terminal colour codes. */
  readonly stderrTail: string;

  /**
   * Creates the error.
   *
   * @param workspaceId The workspace whose codex failed to start.
   * @param reason What went wrong, e.g. "exited with code 3 before listening".
   * @param details Exit status and stderr tail.
   * @param options The underlying cause, if any.
   */
  constructor(
    workspaceId: string,
    reason: string,
    details: SpawnErrorDetails = {},
    options?: ErrorOptions,
  ) {
    const stderrTail = details.stderrTail ?? "";
    const lines = lastLines(stderrTail, 20);
    super(
      `Cannot start codex for workspace ${workspaceId}: ${reason}` +
        (lines ? `; last lines of stderr:\n${lines}` : ""),
      options,
    );
    this.name = "SpawnError";
    this.workspaceId = workspaceId;
    this.exitCode = details.exitCode ?? null;
    this.signal = details.signal ?? null;
    this.stderrTail = stderrTail;
  }
}

/**
 * Creates a resolver that runs one `codex app-server` per workspace on a random loopback
 * port, protected by a capability token, and returns `{ url, headers: { Authorization } }`.
 *
 * A process that exits (crash, kill -9) is forgotten, and the next resolve spawns a fresh
 * one. Before an already running process is handed out again, its `/readyz` is probed, so
 * a process that died a moment ago is never returned.
 *
 * No codex outlives the process that created the resolver. codex in WebSocket mode does not
 * notice that its parent died, so on every platform with a `/bin/sh` (all but Windows) it
 * runs under a tiny shell watchdog holding a pipe to this process: when this process ends,
 * even by SIGKILL or the OOM killer, the watchdog removes its run directory and kills codex's
 * process group within milliseconds. Whatever codex left in its group (the commands a model
 * ran) goes with it, on a stop or a crash too. For what survives anyway (the watchdog
 * itself was killed), each codex has a process record in its run directory; see
 * {@linkcode cleanUpLeftovers}.
 *
 * @example Resolve, use and stop a workspace's codex
 * ```ts ignore
 * const resolver = createCodexResolver({ cwd: (id) => `/srv/workspaces/${id}` });
 * const { url, headers } = await resolver.resolve("ws-1", AbortSignal.timeout(20_000));
 * const socket = new WebSocket(url, { headers }); // Deno, Bun and Node 22 accept headers
 * // …
 * await resolver.close();
 * ```
 *
 * @param options Command, arguments, environment, directories and timeouts.
 * @returns A resolver to hand to a `Pool`; call its `close()` when done.
 * @throws {RangeError} If `readyTimeoutMs` or `stopTimeoutMs` is not a positive number of
 * milliseconds a timer can wait (at most 2³¹ − 1, about 24.8 days).
 */
export function createCodexResolver(options: CodexResolverOptions = {}): CodexResolver {
  const supervisor = new Supervisor(options);
  return {
    resolve: (workspaceId, signal) => supervisor.resolve(workspaceId, signal),
    release: (workspaceId) => supervisor.release(workspaceId),
    close: () => supervisor.close(),
    pid: (workspaceId) => supervisor.pid(workspaceId),
    crashed: (workspaceId, withinMs) => supervisor.crashed(workspaceId, withinMs),
  };
}

const STDERR_TAIL_BYTES = 8 * 1024;
const DEFAULT_READY_TIMEOUT_MS = 15_000;
const DEFAULT_STOP_TIMEOUT_MS = 3_000;
// A healthy app-server answers /readyz in well under a millisecond on loopback; the cap
// only guards against a wedged process, and a high one avoids killing a merely busy one.
const VERIFY_TIMEOUT_MS = 5_000;
// Grandchildren that inherited our pipes can keep them open after codex itself exited;
// stop waiting for end-of-stream after this long and destroy the pipes.
const PIPE_CLOSE_GRACE_MS = 1_000;

interface ProcessSettings {
  readonly command: string;
  readonly args: readonly string[];
  readonly env: Record<string, string>;
  readonly cwd: string;
  readonly codexHome: string | undefined;
  readonly codexHomeTemplate: string | undefined;
  readonly runDir: string | undefined;
  readonly user: { uid: number; gid: number; name?: string } | undefined;
  /** Spawn through the watchdog of `_watchdog.ts` (every platform with a `/bin/sh`). */
  readonly watchdog: boolean;
  /** The fields of the process record that do not depend on the process. */
  readonly owner: OwnerIdentity;
  readonly readyTimeoutMs: number;
  readonly stopTimeoutMs: number;
  readonly report: (error: Error) => void;
}

/** Who spawns: the host and broker half of every process record. */
interface OwnerIdentity extends HostIdentity {
  readonly brokerId: string | undefined;
  readonly brokerPid: number;
  readonly brokerStartTime: number | null;
}

class Supervisor {
  #options: CodexResolverOptions;
  #readyTimeoutMs: number;
  #stopTimeoutMs: number;
  #watchdog = canUseWatchdog();
  #owner: OwnerIdentity | undefined;
  #defaultCommand: DefaultCommand | undefined;
  // The current process per workspace (starting or running).
  #current = new Map<string, CodexProcess>();
  // Processes being stopped, so a resolve for that workspace waits instead of running two
  // app-servers on the same directories, and crashed() can still tell how one ended.
  #stopping = new Map<string, { child: CodexProcess; stopped: Promise<void> }>();
  #all = new Set<CodexProcess>();
  // Workspaces whose ready app-server died without being stopped, until the next spawn.
  #crashed = new Set<string>();
  #closing: Promise<void> | undefined;
  #exitHook: (() => void) | undefined;

  constructor(options: CodexResolverOptions) {
    this.#options = options;
    this.#readyTimeoutMs = positive("readyTimeoutMs", options.readyTimeoutMs) ??
      DEFAULT_READY_TIMEOUT_MS;
    this.#stopTimeoutMs = positive("stopTimeoutMs", options.stopTimeoutMs) ??
      DEFAULT_STOP_TIMEOUT_MS;
    if (options.codexHomeTemplate !== undefined && options.codexHome === undefined) {
      throw new TypeError(
        "Invalid codexHomeTemplate: it is copied into each workspace's codexHome, so codexHome is required too",
      );
    }
  }

  async resolve(workspaceId: string, signal?: AbortSignal): Promise<Endpoint> {
    assertWorkspaceId(workspaceId);
    for (;;) {
      if (this.#closing) throw closedError(workspaceId);
      signal?.throwIfAborted();
      const stopped = this.#stopping.get(workspaceId)?.stopped;
      if (stopped) {
        await (signal ? abortable(stopped, signal) : stopped);
        continue;
      }
      const existing = this.#current.get(workspaceId);
      if (existing?.isReady) {
        // The 'exit' event can lag behind the death of the process (after SIGKILL the
        // socket closes first), so a running entry is only trusted once /readyz answers.
        if (existing.isRunning && await existing.probe(signal)) return existing.endpoint();
        await this.#discard(existing, "stopped");
        continue;
      }
      const child = existing ?? this.#spawn(workspaceId);
      try {
        return await child.join(signal);
      } catch (error) {
        if (signal?.aborted && error === signal.reason && child.isAbandoned) {
          // Nobody else waits for this spawn: do not leave a half-started codex behind.
          await this.#discard(child, "abandoned by every caller before it was ready");
        }
        throw error;
      }
    }
  }

  async release(workspaceId: string): Promise<void> {
    assertWorkspaceId(workspaceId);
    const child = this.#current.get(workspaceId);
    if (child) await this.#discard(child, "released before it was ready");
    else await this.#stopping.get(workspaceId)?.stopped;
  }

  close(): Promise<void> {
    this.#closing ??= this.#close();
    return this.#closing;
  }

  pid(workspaceId: string): number | undefined {
    return this.#current.get(workspaceId)?.pid;
  }

  async crashed(workspaceId: string, withinMs: number): Promise<boolean> {
    if (this.#crashed.has(workspaceId)) return true;
    // A process being stopped counts too: a pool releases a workspace as soon as its
    // connection drops, and a crash drops it, possibly before the exit is reported.
    const child = this.#current.get(workspaceId) ?? this.#stopping.get(workspaceId)?.child;
    if (!child?.isReady) return false;
    let timer: ReturnType<typeof setTimeout> | undefined;
    const late = new Promise<void>((resolve) => {
      timer = setTimeout(resolve, timerDelay(withinMs));
    });
    try {
      await Promise.race([child.gone, late]);
    } finally {
      clearTimeout(timer);
    }
    return this.#crashed.has(workspaceId);
  }

  async #close(): Promise<void> {
    const children = [...this.#all];
    this.#current.clear();
    await Promise.all(
      children.map((child) => child.stop("the resolver closed before it was ready")),
    );
    await Promise.all([...this.#stopping.values()].map((stopping) => stopping.stopped));
    if (this.#exitHook) process.off("exit", this.#exitHook);
    this.#exitHook = undefined;
  }

  #spawn(workspaceId: string): CodexProcess {
    const child = new CodexProcess(workspaceId, this.#settings(workspaceId), () => {
      this.#all.delete(child);
      if (child.diedOnItsOwn) this.#crashed.add(workspaceId);
      if (this.#current.get(workspaceId) === child) this.#current.delete(workspaceId);
    });
    this.#crashed.delete(workspaceId);
    this.#current.set(workspaceId, child);
    this.#all.add(child);
    this.#installExitHook();
    return child;
  }

  async #discard(child: CodexProcess, reason: string): Promise<void> {
    const id = child.workspaceId;
    if (this.#current.get(id) === child) this.#current.delete(id);
    const stopping = { child, stopped: child.stop(reason) };
    this.#stopping.set(id, stopping);
    try {
      await stopping.stopped;
    } finally {
      if (this.#stopping.get(id) === stopping) this.#stopping.delete(id);
    }
  }

  #settings(workspaceId: string): ProcessSettings {
    const options = this.#options;
    let command = options.command;
    const env: Record<string, string> = {};
    for (const [key, value] of Object.entries(process.env)) {
      if (value !== undefined) env[key] = value;
    }
    if (command === undefined) {
      this.#defaultCommand ??= findDefaultCommand();
      command = this.#defaultCommand.command;
      for (const [key, value] of Object.entries(this.#defaultCommand.env)) env[key] ??= value;
    }
    for (const [key, value] of Object.entries(options.env ?? {})) {
      if (value === undefined) delete env[key];
      else env[key] = value;
    }
    const codexHome = options.codexHome ? resolvePath(options.codexHome(workspaceId)) : undefined;
    if (codexHome !== undefined) env.CODEX_HOME = codexHome;
    const cwd = resolvePath(options.cwd?.(workspaceId) ?? join("workspaces", workspaceId));
    const user = options.user;
    if (user !== undefined) {
      // This process's home is not the user's to read or write; codex keeps what it keeps
      // under CODEX_HOME, and tools that want a home get the workspace's codex home.
      env.HOME = codexHome ?? cwd;
      if (user.name !== undefined) env.USER = env.LOGNAME = user.name;
    }
    this.#owner ??= {
      ...hostIdentity(),
      brokerId: options.brokerId,
      brokerPid: process.pid,
      brokerStartTime: processInfo(process.pid)?.startTime ?? null,
    };
    return {
      command,
      args: options.args ?? [],
      env,
      cwd,
      codexHome,
      codexHomeTemplate: options.codexHomeTemplate === undefined
        ? undefined
        : resolvePath(options.codexHomeTemplate),
      runDir: options.runDir ? resolvePath(options.runDir(workspaceId)) : undefined,
      user,
      watchdog: this.#watchdog,
      owner: this.#owner,
      readyTimeoutMs: this.#readyTimeoutMs,
      stopTimeoutMs: this.#stopTimeoutMs,
      report: (error) => this.#report(error),
    };
  }

  #report(error: Error): void {
    const onError = this.#options.onError;
    if (onError) {
      try {
        onError(error);
        return;
      } catch {
        // A throwing reporter must not crash the process either; stderr still gets it.
      }
    }
    console.error(error);
  }

  #installExitHook(): void {
    if (this.#exitHook) return;
    // Best effort for a host that exits without close(): an app-server on a ws:// listener
    // does not notice that its parent died and would run on forever.
    this.#exitHook = () => {
      for (const child of this.#all) child.killNow();
    };
    process.on("exit", this.#exitHook);
  }
}

/** One codex app-server, from spawn to exit. */
class CodexProcess {
  readonly workspaceId: string;
  #settings: ProcessSettings;
  #onGone: () => void;
  #ready: Promise<Endpoint>;
  #gone = Promise.withResolvers<void>();
  #child: ChildProcess | undefined;
  #tokenDir: string | undefined;
  #url: string | undefined;
  #authorization: string | undefined;
  #exit: { code: number | null; signal: string | null } | undefined;
  #isReady = false;
  #waiters = 0;
  // Signals sent to stop the process: an exit by any other signal was not ours.
  #signalled = new Set<string>();
  // Aborted to make a start in progress give up, with the error waiters should see.
  #startAbort = new AbortController();
  #stopping: Promise<void> | undefined;
  #stderr = new StderrTail();

  constructor(workspaceId: string, settings: ProcessSettings, onGone: () => void) {
    this.workspaceId = workspaceId;
    this.#settings = settings;
    this.#onGone = onGone;
    this.#ready = this.#start();
    // Every waiter may have given up; the outcome is still observed through join().
    this.#ready.catch(() => {});
  }

  get pid(): number | undefined {
    return this.#exit ? undefined : this.#child?.pid;
  }

  get isReady(): boolean {
    return this.#isReady;
  }

  /**
   * True once a ready process has exited without being asked to stop, or was ended by a
   * signal the stop did not send (it was killed just before, and its exit came late).
   */
  get diedOnItsOwn(): boolean {
    const exit = this.#exit;
    if (!this.#isReady || exit === undefined) return false;
    if (this.#stopping === undefined) return true;
    return exit.signal !== null && !this.#signalled.has(exit.signal);
  }

  /** Resolves once the process has exited and its run directory is gone. */
  get gone(): Promise<void> {
    return this.#gone.promise;
  }

  get isAbandoned(): boolean {
    return this.#waiters === 0 && !this.#isReady;
  }

  get isRunning(): boolean {
    const child = this.#child;
    return this.#exit === undefined && this.#stopping === undefined && child !== undefined &&
      child.exitCode === null && child.signalCode === null;
  }

  endpoint(): Endpoint {
    // A fresh object each time: callers may mutate what they get.
    return { url: this.#url!, headers: { Authorization: this.#authorization! } };
  }

  async join(signal?: AbortSignal): Promise<Endpoint> {
    this.#waiters++;
    try {
      await (signal ? abortable(this.#ready, signal) : this.#ready);
      return this.endpoint();
    } finally {
      this.#waiters--;
    }
  }

  async probe(signal?: AbortSignal): Promise<boolean> {
    return await probeReadyz(
      readyzUrl(this.#url!),
      Math.min(this.#settings.readyTimeoutMs, VERIFY_TIMEOUT_MS),
      signal,
    );
  }

  stop(reason: string): Promise<void> {
    this.#stopping ??= this.#stop(reason);
    return this.#stopping;
  }

  /** Synchronous last resort for a host that is exiting. */
  killNow(): void {
    if (this.#child && this.#exit === undefined) this.#signal(this.#child, "SIGTERM");
    try {
      if (this.#tokenDir) rmSync(this.#tokenDir, { recursive: true, force: true });
    } catch (error) {
      // Thrown here it would end the exit hook before the other processes are signalled.
      this.#settings.report(this.#cleanUpError(error));
    }
  }

  #signal(child: ChildProcess, name: "SIGTERM" | "SIGKILL"): void {
    this.#signalled.add(name);
    sendSignal(child, name);
  }

  async #stop(reason: string): Promise<void> {
    if (!this.#isReady) {
      this.#startAbort.abort(this.#error(reason));
    }
    const child = this.#child;
    if (child?.pid !== undefined && this.#exit === undefined) {
      const escalate = setTimeout(() => {
        if (this.#exit === undefined) this.#signal(child, "SIGKILL");
      }, timerDelay(this.#settings.stopTimeoutMs));
      unrefTimer(escalate);
      this.#signal(child, "SIGTERM");
      await this.#gone.promise;
      clearTimeout(escalate);
    }
    await this.#gone.promise;
  }

  async #start(): Promise<Endpoint> {
    const settings = this.#settings;
    const cancel = this.#startAbort.signal;
    try {
      await mkdir(settings.cwd, { recursive: true });
      if (settings.user !== undefined) {
        await prepareForUser(settings, settings.user);
      } else if (
        settings.codexHomeTemplate !== undefined && settings.codexHome !== undefined
      ) {
        await copyCodexHomeTemplate(settings.codexHomeTemplate, settings.codexHome);
      } else if (settings.codexHome !== undefined) {
        await mkdir(settings.codexHome, { recursive: true });
      }
      // codex 0.169 ignores OPENAI_API_KEY in its environment until `codex login
      // --with-api-key` stored it: store it as that would, unless the home has a login.
      const key = settings.env.OPENAI_API_KEY;
      if (settings.user === undefined && settings.codexHome !== undefined && key) {
        await writeApiKeyLogin(settings.codexHome, key);
      }
    } catch (error) {
      await this.#cleanUp();
      if (cancel.aborted) throw cancel.reason;
      throw this.#error(`could not prepare its directories: ${messageOf(error)}`, { cause: error });
    }
    let runDir: string;
    const token = randomToken();
    const tokenSha256 = createHash("sha256").update(token).digest("hex");
    try {
      cancel.throwIfAborted();
      let base = tmpdir();
      if (settings.runDir !== undefined) {
        await mkdir(settings.runDir, { recursive: true, mode: 0o700 });
        await chmod(settings.runDir, 0o700);
        base = settings.runDir;
      }
      // mkdtemp already creates the directory as 0700; the chmod guards against runtimes
      // whose emulation of it differs. With a user, the directory stays this process's:
      // that user's watchdog then cannot remove it, and a broker starting later does.
      runDir = this.#tokenDir = await mkdtemp(join(base, RUN_DIR_PREFIX));
      await chmod(runDir, 0o700);
      await writeProcessRecord(runDir, this.#record(tokenSha256, null));
      cancel.throwIfAborted();
    } catch (error) {
      await this.#cleanUp();
      if (cancel.aborted) throw cancel.reason;
      throw this.#error(`could not prepare its directories: ${messageOf(error)}`, { cause: error });
    }
    this.#authorization = `Bearer ${token}`;

    const appServerArgs = [
      "app-server",
      "--listen",
      "ws://127.0.0.1:0",
      "--ws-auth",
      "capability-token",
      // The digest, not a file: a token file would be readable by every command that runs
      // as codex's user, in any workspace; the digest on the command line gives nothing away.
      "--ws-token-sha256",
      tokenSha256,
      ...settings.args,
    ];
    const spawned = settings.watchdog
      ? watchdogSpawn(runDir, settings.command, appServerArgs)
      : { command: settings.command, args: appServerArgs };
    let child: ChildProcess;
    try {
      child = spawn(spawned.command, spawned.args, {
        cwd: settings.cwd,
        env: settings.env,
        // The watchdog's pipe: never written to, closed once codex has exited, and closed
        // by the kernel if this process dies, which makes the watchdog kill codex.
        stdio: [settings.watchdog ? "pipe" : "ignore", "pipe", "pipe"],
        // The watchdog too: it must not be a process of this user that codex's commands
        // could reach.
        ...(settings.user === undefined ? {} : { uid: settings.user.uid, gid: settings.user.gid }),
        // Its own process group: Ctrl+C in a terminal signals the broker's group, and codex
        // exits at once on SIGINT, which would cut short the grace period turns get on
        // shutdown. Stopping signals the whole group, so codex's helpers go with it.
        detached: true,
      });
    } catch (error) {
      await this.#cleanUp();
      throw this.#spawnFailure(error);
    }
    this.#child = child;

    const listening = Promise.withResolvers<string>();
    this.#watch(child, listening.resolve);
    const deadline = setTimeout(() => {
      const what = this.#url
        ? `${readyzUrl(this.#url)} did not answer 200`
        : "no listening line on stderr";
      this.#startAbort.abort(
        this.#error(`did not become ready within ${settings.readyTimeoutMs} ms (${what})`),
      );
    }, timerDelay(settings.readyTimeoutMs));
    unrefTimer(deadline);
    try {
      if (child.pid !== undefined) {
        if (settings.user !== undefined) this.#checkUser(child.pid, settings.user.uid);
        await this.#recordPid(runDir, tokenSha256, child.pid);
      }
      this.#url = await abortable(listening.promise, cancel);
      const readyz = readyzUrl(this.#url);
      let pause = 10;
      while (!await probeReadyz(readyz, settings.readyTimeoutMs, cancel)) {
        await delay(pause, cancel);
        pause = Math.min(pause * 2, 200);
      }
      this.#isReady = true;
      return this.endpoint();
    } catch (error) {
      await this.stop("stopped before it was ready");
      throw error;
    } finally {
      clearTimeout(deadline);
    }
  }

  /**
   * Refuses a codex that does not run as the user it was meant to: a runtime that ignored
   * `uid` would otherwise run the model's commands as root without a word.
   */
  #checkUser(pid: number, uid: number): void {
    let status: string;
    try {
      status = readFileSync(`/proc/${pid}/status`, "utf8");
    } catch {
      return; // No /proc (or it exited already): nothing to check it by.
    }
    const real = /^Uid:\s+(\d+)\s+(\d+)/m.exec(status);
    if (real && (Number(real[1]) !== uid || Number(real[2]) !== uid)) {
      throw this.#error(`runs as uid ${real[1]}, not as the user's uid ${uid}`);
    }
  }

  #record(tokenSha256: string, pid: number | null): ProcessRecord {
    const owner = this.#settings.owner;
    const record: ProcessRecord = {
      version: 1,
      workspaceId: this.workspaceId,
      pid,
      // Spawned detached: codex leads a process group of its own (none on Windows).
      pgid: pid !== null && process.platform !== "win32" ? pid : null,
      startTime: pid === null ? null : processInfo(pid)?.startTime ?? null,
      bootId: owner.bootId,
      hostname: owner.hostname,
      pidNamespace: owner.pidNamespace,
      tokenSha256,
      brokerPid: owner.brokerPid,
      brokerStartTime: owner.brokerStartTime,
    };
    if (owner.brokerId !== undefined) record.brokerId = owner.brokerId;
    return record;
  }

  /**
   * Completes the process record with the pid: what a broker starting after a crash of
   * this one needs to find and stop this process, and nothing else. Never rejects: the
   * watchdog already ties codex to this process, so a missing record is reported and the
   * start goes on.
   */
  async #recordPid(runDir: string, tokenSha256: string, pid: number): Promise<void> {
    try {
      await writeProcessRecord(runDir, this.#record(tokenSha256, pid));
    } catch (error) {
      // A process that already exited may have had its directory removed: not news.
      if (this.#exit !== undefined) return;
      this.#settings.report(
        new Error(
          `Cannot write the process record in ${runDir} of workspace ${this.workspaceId}: ${
            messageOf(error)
          }`,
          { cause: error },
        ),
      );
    }
  }

  #watch(child: ChildProcess, onListening: (url: string) => void): void {
    let pending = "";
    let listening = false;
    child.stdout?.resume();
    child.stderr?.setEncoding("utf8");
    child.stderr?.on("data", (chunk: string) => {
      this.#stderr.push(chunk);
      if (listening) return;
      pending += chunk;
      const lines = pending.split("\n");
      pending = (lines.pop() ?? "").slice(-STDERR_TAIL_BYTES);
      for (const line of lines) {
        const match = /listening on:\s*(wss?:\/\/\S+)/.exec(stripAnsi(line));
        if (match?.[1]) {
          listening = true;
          pending = "";
          onListening(match[1]);
          return;
        }
      }
    });

    child.on("error", (error) => {
      // After a successful spawn this only reports a failed kill(), which is not fatal.
      if (child.pid === undefined) this.#startAbort.abort(this.#spawnFailure(error));
    });
    let grace: ReturnType<typeof setTimeout> | undefined;
    let closed = false;
    // Nothing is ever written; a watchdog that died first must not make closing it throw.
    child.stdin?.on("error", () => {});
    child.once("exit", (code, signal) => {
      this.#exit = { code, signal };
      // Tells the watchdog that codex is gone: it removes what is left and exits, which
      // closes the pipes below.
      child.stdin?.destroy();
      if (closed) return;
      grace = setTimeout(() => {
        child.stdout?.destroy();
        child.stderr?.destroy();
      }, PIPE_CLOSE_GRACE_MS);
      unrefTimer(grace);
    });
    child.once("close", () => {
      closed = true;
      clearTimeout(grace);
      child.stdin?.destroy();
      const exit = this.#exit;
      if (exit && !this.#isReady) {
        // Reported on 'close' rather than 'exit': stderr may still be draining at 'exit',
        // and its last lines are what explains the failure.
        const when = this.#url ? "before it was ready" : "before listening";
        const how = exit.signal
          ? `was killed by signal ${exit.signal}`
          : `exited with code ${exit.code}`;
        const notFound = this.#settings.watchdog && exit.code === 127 &&
          this.#stderr.text.includes(`${COMMAND_NOT_FOUND_PREFIX}${this.#settings.command}\n`);
        this.#startAbort.abort(
          this.#error(
            notFound ? `command not found: ${this.#settings.command}` : `${how} ${when}`,
          ),
        );
      }
      void this.#cleanUp();
    });
  }

  /** Never rejects: it also runs on its own once the process has exited. */
  async #cleanUp(): Promise<void> {
    try {
      if (this.#tokenDir) await rm(this.#tokenDir, { recursive: true, force: true });
    } catch (error) {
      this.#settings.report(this.#cleanUpError(error));
    } finally {
      this.#tokenDir = undefined;
      this.#onGone();
      this.#gone.resolve();
    }
  }

  #cleanUpError(error: unknown): Error {
    return new Error(
      `Cannot remove the token directory ${this.#tokenDir} of workspace ${this.workspaceId}: ${
        messageOf(error)
      }`,
      { cause: error },
    );
  }

  #spawnFailure(error: unknown): SpawnError {
    const code = (error as { code?: unknown } | null)?.code;
    const reason = code === "ENOENT"
      ? `command not found: ${this.#settings.command}`
      : `could not run ${this.#settings.command}: ${messageOf(error)}`;
    return this.#error(reason, { cause: error });
  }

  #error(reason: string, options?: ErrorOptions): SpawnError {
    return new SpawnError(this.workspaceId, reason, {
      exitCode: this.#exit?.code ?? null,
      signal: this.#exit?.signal ?? null,
      stderrTail: this.#stderr.text,
    }, options);
  }
}

/** The last few KiB of a process's stderr. */
class StderrTail {
  #text = "";

  push(chunk: string): void {
    this.#text += chunk;
    if (this.#text.length > STDERR_TAIL_BYTES) this.#text = this.#text.slice(-STDERR_TAIL_BYTES);
  }

  get text(): string {
    return stripAnsi(this.#text);
  }
}

interface DefaultCommand {
  command: string;
  env: Record<string, string>;
}

/**
 * The codex executable the supervisor runs when given no `command`, and the environment it
 * needs (a native binary from `node_modules` wants its vendored `PATH`): next to a compiled
 * broker, then `@openai/codex` in `node_modules` above this module, then `PATH`.
 *
 * @example Run codex the way the supervisor would
 * ```ts ignore
 * const { command, env } = defaultCodexCommand();
 * spawn(command, ["--version"], { env: { ...process.env, ...env } });
 * ```
 *
 * @returns The command (the bare name `codex` when none was found) and its extra environment.
 */
export function defaultCodexCommand(): { command: string; env: Record<string, string> } {
  const found = findDefaultCommand();
  return { command: found.command, env: { ...found.env } };
}

// Which package of @openai/codex carries the native binary for this platform.
const NATIVE_TARGETS: Record<string, { pkg: string; triple: string }> = {
  "linux-x64": { pkg: "codex-linux-x64", triple: "x86_64-unknown-linux-musl" },
  "linux-arm64": { pkg: "codex-linux-arm64", triple: "aarch64-unknown-linux-musl" },
  "darwin-x64": { pkg: "codex-darwin-x64", triple: "x86_64-apple-darwin" },
  "darwin-arm64": { pkg: "codex-darwin-arm64", triple: "aarch64-apple-darwin" },
  "win32-x64": { pkg: "codex-win32-x64", triple: "x86_64-pc-windows-msvc" },
  "win32-arm64": { pkg: "codex-win32-arm64", triple: "aarch64-pc-windows-msvc" },
};

/**
 * Finds codex for a resolver given no `command`: a `codex` beside the running executable
 * when that is not a runtime (a binary built with `deno compile` or `bun build --compile`
 * ships with codex next to it), then the `node_modules` above this module (the package's
 * own, not the current directory's, so a broker started from anywhere finds it), then
 * `PATH`. In `node_modules` it prefers the native binary over the
 * `node_modules/.bin/codex` Node wrapper. The wrapper only replaces itself with the binary
 * (execve) on Node ≥ 22.15 run through `#!/usr/bin/env node`; elsewhere it stays as a
 * parent process that merely forwards SIGTERM. Our SIGKILL would then hit the wrapper and
 * orphan the real app-server, and `pid()` would name the wrong process.
 */
function findDefaultCommand(): DefaultCommand {
  const exe = process.platform === "win32" ? "codex.exe" : "codex";
  const runtime = /^(deno|bun|node)(\.exe)?$/i.test(basename(process.execPath));
  if (!runtime) {
    const beside = join(dirname(process.execPath), exe);
    if (isFile(beside)) return { command: beside, env: {} };
  }
  const here = moduleDirectory();
  const installed = here === undefined ? undefined : findInNodeModules(here, exe);
  if (installed) return installed;
  for (const dir of (process.env.PATH ?? "").split(delimiter)) {
    if (dir === "") continue;
    const candidate = join(dir, exe);
    if (isFile(candidate)) return { command: candidate, env: {} };
  }
  // Not found: spawning the bare name fails with `command not found: codex`.
  return { command: "codex", env: {} };
}

/** This module's directory, when it is a file on disk (not a JSR or compiled-in URL). */
function moduleDirectory(): string | undefined {
  const url = new URL(import.meta.url);
  if (url.protocol !== "file:") return undefined;
  const dir = dirname(fileURLToPath(url));
  return existsSync(dir) ? dir : undefined;
}

function isFile(path: string): boolean {
  try {
    return statSync(path).isFile();
  } catch {
    return false;
  }
}

function findInNodeModules(from: string, exe: string): DefaultCommand | undefined {
  const target = NATIVE_TARGETS[`${process.platform}-${process.arch}`];
  for (let dir = resolvePath(from);; dir = dirname(dir)) {
    const modules = join(dir, "node_modules");
    const packageRoot = join(modules, "@openai", "codex");
    if (target) {
      for (
        const base of [
          join(modules, "@openai", target.pkg),
          join(packageRoot, "node_modules", "@openai", target.pkg),
        ]
      ) {
        const binary = join(base, "vendor", target.triple, "bin", exe);
        if (existsSync(binary)) {
          // The wrapper sets these for the binary (update hints, install detection).
          return {
            command: binary,
            env: { CODEX_MANAGED_PACKAGE_ROOT: packageRoot, CODEX_MANAGED_BY_NPM: "1" },
          };
        }
      }
    }
    const wrapper = join(modules, ".bin", process.platform === "win32" ? "codex.cmd" : "codex");
    if (existsSync(wrapper)) return { command: wrapper, env: {} };
    if (dirname(dir) === dir) return undefined;
  }
}

function sendSignal(child: ChildProcess, name: "SIGTERM" | "SIGKILL"): void {
  if (child.pid === undefined) return;
  try {
    // Not child.kill(): Deno's ignores every call after the first, so the SIGKILL that
    // follows an ignored SIGTERM would never be sent. The pid (and the group id, the same
    // number) cannot have been reused yet: callers only signal a child whose exit has not
    // been reported.
    process.kill(-child.pid, name);
  } catch {
    try {
      process.kill(child.pid, name);
    } catch {
      // Already gone: the 'exit' event is on its way.
    }
  }
}

/**
 * Readies a workspace's directories for a codex that runs as `user`, without this process
 * (root) ever writing through a directory that user controls: every codex of the user, in
 * any workspace, could swap a path there for a symbolic link to `/etc` meanwhile. So:
 * what this process made is handed over bottom-up (a directory last, so the user enters
 * it only once all below is done), and the template's updates are staged in a directory of
 * this process, handed over, and copied into the home by the user itself.
 */
async function prepareForUser(
  settings: ProcessSettings,
  user: { uid: number; gid: number },
): Promise<void> {
  await handOver(settings.cwd, user);
  const home = settings.codexHome;
  if (home === undefined) return;
  await mkdir(home, { recursive: true, mode: 0o700 });
  await handOver(home, user);
  const key = settings.env.OPENAI_API_KEY;
  if (settings.codexHomeTemplate === undefined && !key) return;
  // Beside the home, in the workspace's directory, which the user cannot write to.
  const staging = await mkdtemp(join(dirname(home), ".codex-home-update-"));
  try {
    if (settings.codexHomeTemplate !== undefined) {
      await copyCodexHomeTemplate(settings.codexHomeTemplate, home, { into: staging });
    }
    // Only the existence of the home's login is read, never its content.
    if (key && !existsSync(join(home, "auth.json")) && !existsSync(join(staging, "auth.json"))) {
      await writeApiKeyLogin(staging, key);
    }
    if ((await readdir(staging)).length === 0) return;
    await handOver(staging, user);
    await runAs(user, 'cp -Rp "$1"/. "$2"/ && rm -rf "$1"/* "$1"/.[!.]* 2>/dev/null; :', [
      staging,
      home,
    ]);
  } finally {
    // Empty by now, or still this process's; a directory the user filled again stays.
    await rmdir(staging).catch(() => {});
  }
}

/**
 * Gives `path` and what this process owns below it to `user`, children first. It descends
 * only into directories this process owns and nobody else can write to, which the user
 * cannot change under it; links are given over themselves (`lchown`), never followed.
 */
async function handOver(path: string, user: { uid: number; gid: number }): Promise<void> {
  const self = process.getuid?.();
  const walk = async (at: string, depth: number): Promise<void> => {
    const stats = await lstat(at);
    if (stats.uid === user.uid && stats.gid === user.gid) return;
    if (
      stats.isDirectory() && stats.uid === self && (stats.mode & 0o022) === 0 && depth < 64
    ) {
      for (const name of await readdir(at)) await walk(join(at, name), depth + 1);
    }
    await lchown(at, user.uid, user.gid);
  };
  await walk(path, 0);
  const top = await lstat(path);
  if (!top.isSymbolicLink()) await chmod(path, 0o700);
}

/** Runs a shell script as `user` and waits for it; rejects with its stderr if it fails. */
function runAs(
  user: { uid: number; gid: number },
  script: string,
  args: readonly string[],
): Promise<void> {
  return new Promise((resolve, reject) => {
    const child = spawn("/bin/sh", ["-c", script, "sh", ...args], {
      // Not the broker's own cwd, which the user may not reach (Deno changes into it).
      cwd: "/",
      uid: user.uid,
      gid: user.gid,
      stdio: ["ignore", "ignore", "pipe"],
    });
    let stderr = "";
    child.stderr?.setEncoding("utf8");
    child.stderr?.on("data", (chunk: string) => stderr += chunk);
    child.once("error", reject);
    child.once("close", (code) => {
      if (code === 0) resolve();
      else reject(new Error(`sh as uid ${user.uid} exited with code ${code}: ${stderr.trim()}`));
    });
  });
}

function randomToken(): string {
  const bytes = crypto.getRandomValues(new Uint8Array(32));
  return Array.from(bytes, (byte) => byte.toString(16).padStart(2, "0")).join("");
}

function readyzUrl(wsUrl: string): string {
  const url = new URL(wsUrl);
  return `${url.protocol === "wss:" ? "https:" : "http:"}//${url.host}/readyz`;
}

/**
 * One `GET /readyz`. Network errors and non-200 answers count as "not ready"; only an
 * abort of `signal` throws.
 */
async function probeReadyz(
  url: string,
  timeoutMs: number,
  signal?: AbortSignal,
): Promise<boolean> {
  signal?.throwIfAborted();
  const attempt = new AbortController();
  const onAbort = () => attempt.abort(signal?.reason);
  signal?.addEventListener("abort", onAbort, { once: true });
  const timer = setTimeout(() => attempt.abort(), timerDelay(timeoutMs));
  unrefTimer(timer);
  try {
    const response = await fetch(url, { signal: attempt.signal });
    await response.body?.cancel();
    return response.status === 200;
  } catch (error) {
    if (signal?.aborted) throw signal.reason;
    void error;
    return false;
  } finally {
    clearTimeout(timer);
    signal?.removeEventListener("abort", onAbort);
  }
}

function positive(name: string, value: number | undefined): number | undefined {
  if (value === undefined) return undefined;
  // A timer cannot wait longer: Node and Deno would fire at once, so refuse rather than
  // time out early.
  if (!(value > 0) || !(value <= MAX_TIMER_DELAY_MS)) {
    throw new RangeError(
      `Invalid ${name}: expected a positive number of milliseconds up to ${MAX_TIMER_DELAY_MS} (about 24.8 days), got ${value}`,
    );
  }
  return value;
}

function closedError(workspaceId: string): Error {
  return new Error(`Cannot resolve workspace ${workspaceId}: the codex resolver is closed`);
}

function lastLines(text: string, count: number): string {
  return text.split("\n").map((line) => line.trimEnd()).filter((line) => line !== "")
    .slice(-count).join("\n");
}

function stripAnsi(text: string): string {
  // deno-lint-ignore no-control-regex
  return text.replace(/\x1b\[[0-9;?]*[A-Za-z]/g, "");
}

function messageOf(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

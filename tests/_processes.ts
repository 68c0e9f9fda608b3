// Process helpers for tests that start codex, watchdogs and brokers and must prove that
// nothing of theirs is left: zombies count as dead (in a container whose PID 1 does not reap,
// an orphan stays a zombie), and a process group is empty once no live member is left.
import { type ChildProcess, spawn } from "node:child_process";
import { existsSync, readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import process from "node:process";
import { fileURLToPath } from "node:url";
import { processInfo } from "../src/_process_record.ts";

/** The repository's root directory. */
export const ROOT: string = fileURLToPath(new URL("..", import.meta.url)).replace(/\/$/, "");

const deno = (globalThis as { Deno?: { execPath(): string } }).Deno;

/**
 * Whether a process has ended: gone, or a zombie nobody reaped yet.
 *
 * @param pid The process id.
 * @returns True if it no longer runs.
 */
export function isDead(pid: number): boolean {
  const info = processInfo(pid);
  if (info) return info.state === "Z";
  try {
    process.kill(pid, 0);
    return false;
  } catch {
    return true;
  }
}

/**
 * The live (non-zombie) members of a process group, from `/proc`.
 *
 * @param pgid The process group id.
 * @returns Their pids.
 */
export function liveGroupMembers(pgid: number): number[] {
  const members: number[] = [];
  for (const name of readdirSync("/proc")) {
    if (!/^\d+$/.test(name)) continue;
    const info = processInfo(Number(name));
    if (info && info.pgid === pgid && info.state !== "Z") members.push(Number(name));
  }
  return members;
}

/**
 * The command line of a process.
 *
 * @param pid The process id.
 * @returns Its arguments, empty once it has ended.
 */
export function commandLineOf(pid: number): string[] {
  return processInfo(pid)?.cmdline ?? [];
}

/**
 * The `--ws-token-sha256` argument of a codex app-server: its token's digest.
 *
 * @param pid The codex pid.
 * @returns The hex digest.
 */
export function tokenDigestOf(pid: number): string {
  const args = commandLineOf(pid);
  const at = args.indexOf("--ws-token-sha256");
  if (at < 0 || args[at + 1] === undefined) throw new Error(`No --ws-token-sha256 in ${args}`);
  return args[at + 1]!;
}

/**
 * The `codex-broker-XXXXXX` run directory under `base` whose process record names `pid`.
 *
 * @param pid The codex pid.
 * @param base Where the supervisor makes its run directories (its `runDir`, or the temp dir).
 * @returns The directory's path.
 */
export function runDirOf(pid: number, base: string): string {
  for (const name of readdirSync(base)) {
    if (!name.startsWith("codex-broker-")) continue;
    try {
      const record = JSON.parse(readFileSync(join(base, name, "codex.json"), "utf8"));
      if (record.pid === pid) return join(base, name);
    } catch {
      // Not a record (yet), or another process's directory that went away.
    }
  }
  throw new Error(`No run directory under ${base} names pid ${pid}`);
}

/**
 * SIGKILL to a process group, if it still exists: the last resort of a test's `finally`.
 *
 * @param pgid The process group id.
 */
export function killGroup(pgid: number): void {
  try {
    process.kill(-pgid, "SIGKILL");
  } catch {
    // Already gone.
  }
}

/**
 * The native codex binary of `@openai/codex` (Linux), as the supervisor runs it.
 *
 * @returns Its path.
 */
export function codexBinary(): string {
  const targets: Record<string, [string, string]> = {
    x64: ["codex-linux-x64", "x86_64-unknown-linux-musl"],
    arm64: ["codex-linux-arm64", "aarch64-unknown-linux-musl"],
  };
  const target = targets[process.arch];
  if (target) {
    const modules = join(ROOT, "node_modules", "@openai");
    for (
      const base of [
        join(modules, target[0]),
        join(modules, "codex", "node_modules", "@openai", target[0]),
      ]
    ) {
      const binary = join(base, "vendor", target[1], "bin", "codex");
      if (existsSync(binary)) return binary;
    }
  }
  throw new Error(`No native codex binary for linux-${process.arch} under ${ROOT}/node_modules`);
}

/**
 * The runtime running this test and the arguments that make it run a script: `deno run -A`
 * under Deno, the binary itself under Bun and Node (Node ≥ 22.18 strips types).
 *
 * @param script The script's path.
 * @returns The command and its arguments.
 */
export function runtimeCommand(script: string): [string, string[]] {
  return deno ? [deno.execPath(), ["run", "-A", script]] : [process.execPath, [script]];
}

/** A script run by this test's runtime, its stdout collected line by line. */
export interface ScriptProcess {
  readonly child: ChildProcess;
  /** The first line the script writes to stdout; rejects if it ends first. */
  readonly firstLine: Promise<string>;
  /** Resolves once the process has ended and its pipes are closed. */
  readonly closed: Promise<void>;
}

/**
 * Runs a script with this test's runtime, from the repository's root.
 *
 * @param script The script's path.
 * @param args Its arguments.
 * @returns The process.
 */
export function runScript(script: string, args: readonly string[]): ScriptProcess {
  const [command, prefix] = runtimeCommand(script);
  const child = spawn(command, [...prefix, ...args], {
    cwd: ROOT,
    stdio: ["ignore", "pipe", "pipe"],
  });
  let out = "";
  let err = "";
  const firstLine = Promise.withResolvers<string>();
  child.stdout!.setEncoding("utf8");
  child.stdout!.on("data", (text: string) => {
    out += text;
    const end = out.indexOf("\n");
    if (end >= 0) firstLine.resolve(out.slice(0, end));
  });
  child.stderr!.setEncoding("utf8");
  child.stderr!.on("data", (text: string) => err = (err + text).slice(-4096));
  const closed = new Promise<void>((resolve) => {
    child.once("close", (code, signal) => {
      firstLine.reject(new Error(`${script} ended (${signal ?? code}) first:\n${err}`));
      resolve();
    });
  });
  firstLine.promise.catch(() => {});
  return { child, firstLine: firstLine.promise, closed };
}

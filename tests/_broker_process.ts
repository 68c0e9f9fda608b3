// A broker (src/main.ts) as a subprocess of the runtime running the test, and what tests
// need to watch processes: shared by the server and scale-out tests.
import { spawn } from "node:child_process";
import { existsSync, readdirSync, readFileSync } from "node:fs";
import process from "node:process";
import { fileURLToPath } from "node:url";

const MAIN = fileURLToPath(new URL("../src/main.ts", import.meta.url));
const deno = (globalThis as { Deno?: typeof Deno }).Deno;

/** How a finished process ended. */
export interface Status {
  code: number | null;
  signal: string | null;
}

/** A broker process, its stderr split into lines as they come. */
export interface BrokerProcess {
  readonly pid: number;
  /** Every stderr line so far. */
  readonly lines: string[];
  /** Everything written to stdout, once the process has ended. */
  readonly stdout: Promise<string>;
  /** Resolves with the first line `match` accepts, or rejects when the process ends first. */
  waitForLine(match: (line: string) => boolean, what: string): Promise<string>;
  /** Resolves once the process has ended and its pipes are drained. */
  readonly status: Promise<Status>;
  kill(signal: "SIGTERM" | "SIGINT" | "SIGHUP" | "SIGKILL"): void;
}

/** Options for {@linkcode spawnBroker}. */
export interface SpawnBrokerOptions {
  /** The working directory. Defaults to the test's own. */
  cwd?: string;
  /**
   * What to run instead of `src/main.ts` under this test's runtime: the program, then the
   * arguments put before `args` (e.g. `["npm", "start", "--"]`, or a compiled broker).
   */
  command?: readonly [string, ...string[]];
}

/**
 * Spawns `src/main.ts` with the runtime running this test. Under Deno it uses
 * `Deno.Command`: Deno's `node:child_process` reports a child that handled SIGTERM and
 * exited 0 as killed by SIGTERM.
 */
export function spawnBroker(
  args: string[],
  env: Record<string, string>,
  options: SpawnBrokerOptions = {},
): BrokerProcess {
  const lines: string[] = [];
  const waiters = new Set<() => void>();
  let ended = false;
  let partial = "";
  const onText = (text: string) => {
    partial += text;
    const parts = partial.split("\n");
    partial = parts.pop() ?? "";
    if (parts.length === 0) return;
    lines.push(...parts);
    for (const wake of waiters) wake();
  };
  const onEnd = () => {
    if (partial !== "") lines.push(partial);
    partial = "";
    ended = true;
    for (const wake of waiters) wake();
  };

  let pid: number;
  let status: Promise<Status>;
  let stdout: Promise<string>;
  let kill: (signal: "SIGTERM" | "SIGINT" | "SIGHUP" | "SIGKILL") => void;
  if (deno) {
    const [program, ...before] = options.command ?? [deno.execPath(), "run", "-A", MAIN];
    const child = new deno.Command(program, {
      args: [...before, ...args],
      env,
      ...(options.cwd === undefined ? {} : { cwd: options.cwd }),
      clearEnv: true,
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    pid = child.pid;
    const stderrDone = (async () => {
      for await (const text of child.stderr.pipeThrough(new TextDecoderStream())) onText(text);
      onEnd();
    })();
    stdout = new Response(child.stdout).text();
    status = Promise.all([child.status, stderrDone, stdout]).then(([s]) => ({
      code: s.signal === null ? s.code : null,
      signal: s.signal,
    }));
    kill = (signal) => {
      try {
        child.kill(signal);
      } catch {
        // Deno throws for a child that has already exited.
      }
    };
  } else {
    // Bun and Node: process.execPath runs .ts files directly (Node ≥ 22.18 strips types).
    const [program, ...before] = options.command ?? [process.execPath, MAIN];
    const child = spawn(program, [...before, ...args], {
      env,
      ...(options.cwd === undefined ? {} : { cwd: options.cwd }),
      stdio: ["ignore", "pipe", "pipe"],
    });
    pid = child.pid!;
    child.stderr!.setEncoding("utf8");
    child.stderr!.on("data", onText);
    child.stdout!.setEncoding("utf8");
    let out = "";
    child.stdout!.on("data", (text: string) => out += text);
    const closed = new Promise<Status>((resolve) => {
      child.once("close", (code, signal) => {
        onEnd();
        resolve({ code, signal });
      });
    });
    status = closed;
    stdout = closed.then(() => out);
    kill = (signal) => child.kill(signal);
  }

  return {
    pid,
    lines,
    stdout,
    status,
    kill,
    waitForLine(match, what) {
      return new Promise((resolve, reject) => {
        let seen = 0;
        const check = () => {
          for (; seen < lines.length; seen++) {
            if (match(lines[seen]!)) {
              waiters.delete(check);
              resolve(lines[seen]!);
              return;
            }
          }
          if (ended) {
            waiters.delete(check);
            reject(new Error(`The broker ended before logging ${what}:\n${lines.join("\n")}`));
          }
        };
        waiters.add(check);
        check();
      });
    },
  };
}

/** The JSON log records among the lines (every line the broker writes is one). */
export function records(lines: readonly string[]): Record<string, unknown>[] {
  return lines.filter((line) => line.startsWith("{")).map((line) => JSON.parse(line));
}

export function childEnv(extra: Record<string, string> = {}): Record<string, string> {
  const env: Record<string, string> = {};
  for (const [key, value] of Object.entries(process.env)) {
    if (value !== undefined && key !== "BROKER_SECRET") env[key] = value;
  }
  return { ...env, ...extra };
}

/** Pids of every process below `root` (Linux /proc; empty elsewhere). */
export function descendants(root: number): number[] {
  if (!existsSync("/proc")) return [];
  const children = new Map<number, number[]>();
  for (const name of readdirSync("/proc")) {
    if (!/^\d+$/.test(name)) continue;
    try {
      const stat = readFileSync(`/proc/${name}/stat`, "utf8");
      // pid (comm) state ppid …; comm may hold spaces and parentheses.
      const ppid = Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[1]);
      children.set(ppid, [...children.get(ppid) ?? [], Number(name)]);
    } catch {
      // exited meanwhile
    }
  }
  const found: number[] = [];
  const queue = [root];
  while (queue.length > 0) {
    for (const child of children.get(queue.shift()!) ?? []) {
      found.push(child);
      queue.push(child);
    }
  }
  return found;
}

export function commandLine(pid: number): string {
  try {
    return readFileSync(`/proc/${pid}/cmdline`, "utf8").replaceAll("\0", " ");
  } catch {
    return "";
  }
}

/** Alive and not a zombie waiting to be reaped. */
export function isRunning(pid: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    return stat.slice(stat.lastIndexOf(")") + 2, stat.lastIndexOf(")") + 3) !== "Z";
  } catch {
    try {
      process.kill(pid, 0);
      return true;
    } catch {
      return false;
    }
  }
}

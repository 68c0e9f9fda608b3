/**
 * Subprocess helpers shared by the P4 and soak benches: start a server that announces its
 * URL on stderr (written to a file), read its CPU time and RSS from `/proc`, and stop it
 * with one SIGTERM (SIGKILL after a timeout), so nothing outlives the bench.
 *
 * @module
 */

import { readFileSync } from "node:fs";

export const ROOT = decodeURIComponent(new URL("..", import.meta.url).pathname).replace(
  /\/$/,
  "",
);
export const BIN = `${ROOT}/node_modules/.bin`;

/** The runtimes the benches start servers and clients on. */
export const BENCH_RUNTIMES = ["deno", "bun", "node"] as const;
/** One of {@linkcode BENCH_RUNTIMES}. */
export type BenchRuntime = typeof BENCH_RUNTIMES[number];

/**
 * The command that runs `script` with `args` on `runtime`.
 *
 * @param runtime Which runtime.
 * @param script The script, relative to the repository.
 * @param args Its arguments.
 * @param flags Runtime flags before the script (e.g. a profiler's).
 * @returns Binary and arguments.
 */
export function runtimeCommand(
  runtime: BenchRuntime,
  script: string,
  args: string[] = [],
  flags: string[] = [],
): [string, string[]] {
  switch (runtime) {
    case "node":
      // The global `node` is Node 20, which cannot run .ts files; this one is Node 22.
      return [`${BIN}/node`, [...flags, script, ...args]];
    case "deno":
      return [`${BIN}/deno`, ["run", "-A", ...flags, script, ...args]];
    case "bun":
      return [`${BIN}/bun`, [...flags, script, ...args]];
  }
}

/**
 * The runtime flags the service runs with on `runtime`: on Deno those of `npm start`
 * (`exec deno run -A <flags> src/main.ts` in `package.json`), so that a bench measures the
 * broker as it is started, V8 flags included; none on Bun and Node, whose command sets its
 * own tuning at start.
 *
 * @param runtime Which runtime.
 * @returns The flags, for {@linkcode runtimeCommand}.
 * @throws {Error} If the start script is not of that form.
 */
export function serviceFlags(runtime: BenchRuntime): string[] {
  if (runtime !== "deno") return [];
  const start: unknown = JSON.parse(readFileSync(`${ROOT}/package.json`, "utf8")).scripts?.start;
  const match = typeof start === "string"
    ? /^exec deno run -A((?: --?[\w-]+(?:=\S+)?)*) src\/main\.ts$/.exec(start)
    : null;
  if (match === null) {
    throw new Error(
      `Cannot read the service's Deno flags: package.json's start script is ${
        JSON.stringify(start)
      }, expected "exec deno run -A [flags] src/main.ts"`,
    );
  }
  return match[1]!.trim().split(" ").filter((flag) => flag !== "");
}

/** A running server process. */
export interface RunningServer {
  url: string;
  pid: number;
  /** One SIGTERM, SIGKILL after `timeoutMs`; resolves once it has exited. */
  stop(timeoutMs?: number): Promise<Deno.CommandStatus>;
}

/**
 * Starts a server and waits for the URL it announces on stderr: a JSON log line with
 * `"msg":"listening"` and `url` (the broker, hello srvx), or codex's `listening on: ws://…`.
 *
 * Its stderr goes to a temporary file, not a pipe: the broker logs a line per turn, and a
 * pipe read by this (busy) process would fill and block the server's writes, so the
 * reader's speed would show up in the server's throughput.
 *
 * @param binary The executable.
 * @param args Its arguments.
 * @param options Environment and start timeout.
 * @returns The running server.
 * @throws {Error} If it exits or stays silent before announcing a URL.
 */
export async function startServer(
  binary: string,
  args: string[],
  options: { env?: Record<string, string>; timeoutMs?: number } = {},
): Promise<RunningServer> {
  const logFile = await Deno.makeTempFile({ prefix: "codex-broker-bench-", suffix: ".log" });
  // `exec` keeps the pid: the shell becomes the server.
  const child = new Deno.Command("/bin/sh", {
    args: ["-c", 'exec "$@" 2>>"$BENCH_STDERR_FILE"', "sh", binary, ...args],
    cwd: ROOT,
    env: { ...options.env, BENCH_STDERR_FILE: logFile },
    stdin: "null",
    stdout: "null",
    stderr: "null",
  }).spawn();
  let exited = false;
  const status = child.status.finally(() => exited = true);
  let stopped: Promise<Deno.CommandStatus> | undefined;
  const stop = (timeoutMs = 5_000) =>
    stopped ??= (async () => {
      if (!exited) {
        try {
          child.kill("SIGTERM");
        } catch {
          // Gone already.
        }
      }
      const timer = setTimeout(() => {
        try {
          child.kill("SIGKILL");
        } catch {
          // Gone already.
        }
      }, timeoutMs);
      try {
        return await status;
      } finally {
        clearTimeout(timer);
        await Deno.remove(logFile).catch(() => {});
      }
    })();
  const deadline = performance.now() + (options.timeoutMs ?? 30_000);
  let text = "";
  try {
    while (true) {
      text = await Deno.readTextFile(logFile);
      const url = findUrl(text);
      if (url !== undefined) return { url: url.replace(/\/$/, ""), pid: child.pid, stop };
      if (exited) {
        throw new Error(
          `${binary} ${args.join(" ")} exited before listening:\n${text.slice(-2000)}`,
        );
      }
      if (performance.now() > deadline) {
        throw new Error(`${binary} did not announce a URL in time:\n${text.slice(-2000)}`);
      }
      await new Promise((resolve) => setTimeout(resolve, 25));
    }
  } catch (error) {
    await stop();
    throw error;
  }
}

function findUrl(text: string): string | undefined {
  for (const line of text.split("\n")) {
    const codex = /listening on:\s*(wss?:\/\/\S+)/.exec(line);
    if (codex) return codex[1]!;
    if (!line.includes('"listening"')) continue;
    try {
      const entry = JSON.parse(line) as { msg?: string; url?: string };
      if (entry.msg === "listening" && entry.url) return entry.url;
    } catch {
      // Not JSON (or not whole yet): keep looking.
    }
  }
  return undefined;
}

/**
 * CPU time (user + system) of a process and its waited-for children so far, µs; NaN
 * without `/proc`.
 *
 * @param pid The process.
 * @returns Microseconds.
 */
export function cpuUs(pid: number): number {
  try {
    const stat = Deno.readTextFileSync(`/proc/${pid}/stat`);
    // Fields after the command name, which may hold spaces: state is field 3.
    const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    const ticks = Number(fields[11]) + Number(fields[12]);
    return ticks * 10_000; // USER_HZ is 100 on Linux
  } catch {
    return NaN;
  }
}

/**
 * The RSS of a process, MB; NaN without `/proc`.
 *
 * @param pid The process.
 * @returns Megabytes.
 */
export function rssMb(pid: number): number {
  try {
    const status = Deno.readTextFileSync(`/proc/${pid}/status`);
    const kb = /VmRSS:\s+(\d+)/.exec(status)?.[1];
    return kb === undefined ? NaN : Number(kb) / 1024;
  } catch {
    return NaN;
  }
}

/**
 * The 1-minute load average, for the report: other load makes throughput figures noisy.
 *
 * @returns The load average and the number of cores, as text.
 */
export function loadText(): string {
  try {
    const load = Deno.readTextFileSync("/proc/loadavg").split(" ").slice(0, 3).join(" ");
    return `load average ${load} on ${navigator.hardwareConcurrency} cores`;
  } catch {
    return "load average unknown";
  }
}

/** A helper process that announced itself; {@linkcode AnnouncingProcess.stop} ends it. */
export interface AnnouncingProcess<T> {
  /** The JSON object it printed as its first line on stdout. */
  info: T;
  /** Closes its stdin, on which it exits; SIGKILL after `killAfterMs`. */
  stop(): Promise<void>;
}

/**
 * Starts `script` on Node 22 with its stdin piped, and waits for the JSON line it prints
 * first on stdout (the fake servers print their URLs so). It exits when its stdin closes.
 *
 * @param script The script, relative to the repository.
 * @param args Its arguments.
 * @param options `killAfterMs` (default 5 s): how long `stop()` waits before SIGKILL;
 * `timeoutMs`: SIGKILL if it has announced nothing by then.
 * @returns The process and what it announced.
 * @throws {Error} If it exits before printing a line.
 */
export async function startAnnouncing<T>(
  script: string,
  args: string[] = [],
  options: { killAfterMs?: number; timeoutMs?: number } = {},
): Promise<AnnouncingProcess<T>> {
  const child = new Deno.Command(`${BIN}/node`, {
    args: [script, ...args],
    cwd: ROOT,
    stdin: "piped",
    stdout: "piped",
    stderr: "inherit",
  }).spawn();
  const stop = async () => {
    await child.stdin.close().catch(() => {});
    const timer = setTimeout(() => child.kill("SIGKILL"), options.killAfterMs ?? 5_000);
    await child.status;
    clearTimeout(timer);
  };
  const reader = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
  const timer = options.timeoutMs === undefined
    ? undefined
    : setTimeout(() => child.kill("SIGKILL"), options.timeoutMs);
  try {
    let text = "";
    while (!text.includes("\n")) {
      const { value, done } = await reader.read();
      if (done) throw new Error(`${script} exited before announcing itself`);
      text += value;
    }
    return { info: JSON.parse(text.slice(0, text.indexOf("\n"))) as T, stop };
  } catch (error) {
    await stop();
    throw error;
  } finally {
    clearTimeout(timer);
    // It prints nothing more; releasing the pipe keeps it from holding the bench open.
    await reader.cancel().catch(() => {});
  }
}

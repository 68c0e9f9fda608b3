/**
 * The whole suite, as `npm test` runs it (`deno run -A tests/_run_all.ts`):
 *
 * 1. static checks: `deno fmt --check`, `deno lint`, `deno check` of every `.ts` file under
 *    `mod.ts`, `src/`, `tests/` and `bench/`, `deno doc --lint` of every entry point in
 *    `deno.json` `exports`, `deno publish --dry-run`, and the web-standard type-check of the
 *    runtime-neutral entry points against `tests/_webstd.jsonc` (DOM lib only);
 * 2. the same `tests/**\/*_test.ts` files on Deno (`deno test`, sanitizers on), Bun
 *    (`bun test`) and Node 22 (`node --test`), one runtime after the other.
 *
 * Every step streams its output live under a `=== …` header. The last line is
 * `total: N passed, M failed`: the test counts summed over the runtimes, plus one failure
 * per failed static check, per runner that crashed or timed out, and per runner that ran no
 * test. The exit code is non-zero if anything failed.
 *
 * Only the binaries in `node_modules/.bin` are used (`npm ci` installs them), so the global
 * `node` (Node 20 on these machines) is never involved; `node_modules/.bin` is also put first
 * on the children's `PATH` so tests that spawn `node` get Node 22, as under `npm run`.
 *
 * Arguments select test files: a path (`tests/conn_test.ts`) or a substring of one (`conn`),
 * e.g. `npm test -- conn pool`. Environment:
 * - `RUNTIMES=deno,node`: the runtimes to test on (default `deno,bun,node`);
 * - `SKIP_CHECKS=1`: skip the static checks;
 * - `RUNTIME_TIMEOUT_MS`: deadline for one runtime's whole test run (default 8 minutes);
 * - `TEST_TIMEOUT_MS`: default per-test timeout on Bun and Node (default 2 minutes; Bun's own
 *   default is 5 s). Deno has no per-test timeout flag, only the runtime deadline.
 *
 * @module
 */

import { countDifferences, type Runtime, type Verdicts, verdicts } from "./_run_summary.ts";

const ROOT = decodeURIComponent(new URL("..", import.meta.url).pathname).replace(/\/$/, "");
const BIN = `${ROOT}/node_modules/.bin`;
const RUNTIMES = ["deno", "bun", "node"] as const;

/**
 * Subpath exports that may use runtime APIs; every other export must be web-standard. Keep in
 * sync with `RUNTIME_SPECIFIC_EXPORTS` in tests/web_standard_test.ts.
 */
const RUNTIME_SPECIFIC_EXPORTS = new Set([
  "./supervisor",
  "./main",
  "./testing",
  "./net_websocket",
]);

const CHECK_TIMEOUT_MS = 5 * 60_000;
const RUNTIME_TIMEOUT_MS = envInt("RUNTIME_TIMEOUT_MS", 8 * 60_000);
const TEST_TIMEOUT_MS = envInt("TEST_TIMEOUT_MS", 2 * 60_000);
// After a step's main process exits or is killed, how long to wait for stragglers that still
// hold its stdout/stderr (a test that detached a child of its own) before moving on.
const PIPE_GRACE_MS = 5_000;

const encoder = new TextEncoder();

/** What one step produced. */
interface StepResult {
  code: number;
  output: string;
  timedOut: boolean;
  ms: number;
}

/** One line of the closing summary. */
interface Outcome {
  name: string;
  ok: boolean;
  detail: string;
}

function envInt(name: string, fallback: number): number {
  const raw = Deno.env.get(name);
  if (raw === undefined || raw === "") return fallback;
  const value = Number(raw);
  if (!Number.isInteger(value) || value <= 0) {
    throw new TypeError(`${name} must be a positive integer (milliseconds), got "${raw}"`);
  }
  return value;
}

/** Deno.stdout or Deno.stderr. */
interface Writer {
  write(bytes: Uint8Array): Promise<number>;
}

async function writeAll(to: Writer, bytes: Uint8Array): Promise<void> {
  for (let off = 0; off < bytes.length;) off += await to.write(bytes.subarray(off));
}

function print(text: string): Promise<void> {
  return writeAll(Deno.stdout, encoder.encode(text));
}

function binary(name: string): string {
  const path = `${BIN}/${name}`;
  try {
    Deno.statSync(path);
  } catch {
    throw new Error(`${path} is missing: run \`npm ci\` first`);
  }
  return path;
}

function childEnv(quietBacktrace: boolean): Record<string, string> {
  const env = Deno.env.toObject();
  env.PATH = `${BIN}:${env.PATH ?? ""}`;
  if (Deno.stdout.isTerminal()) {
    env.FORCE_COLOR ??= "1";
  } else {
    // CI logs: no escape codes (the counts are parsed from this output too).
    delete env.FORCE_COLOR;
    env.NO_COLOR = "1";
  }
  // With RUST_BACKTRACE=1 every failing deno command ends in a meaningless "Stack backtrace:
  // 0: <unknown>"; the test runs keep it, for the panics of codex (a Rust binary).
  if (quietBacktrace) delete env.RUST_BACKTRACE;
  return env;
}

let current: Deno.ChildProcess | undefined;

function killGroup(child: Deno.ChildProcess, signal: Deno.Signal): boolean {
  try {
    // The child leads its own process group (`detached`), so this reaches its children too
    // (node --test's per-file processes, codex processes spawned by tests).
    Deno.kill(-child.pid, signal);
    return true;
  } catch {
    return false; // ESRCH: nobody left in the group
  }
}

for (const signal of ["SIGINT", "SIGTERM"] as const) {
  Deno.addSignalListener(signal, () => {
    if (current) killGroup(current, "SIGKILL");
    Deno.exit(signal === "SIGINT" ? 130 : 143);
  });
}

/** Copies a child's stream to ours as it comes, keeping a copy of the text. */
function pump(stream: ReadableStream<Uint8Array>, to: Writer, sink: { text: string }) {
  const reader = stream.getReader();
  const decoder = new TextDecoder();
  const done = (async () => {
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        sink.text += decoder.decode(value, { stream: true });
        await writeAll(to, value);
      }
    } catch {
      // cancelled below
    }
  })();
  /** Waits for the end of the stream, or cancels it once the grace period is over. */
  return async (): Promise<void> => {
    let timer: ReturnType<typeof setTimeout> | undefined;
    const late = new Promise<boolean>((r) => timer = setTimeout(() => r(true), PIPE_GRACE_MS));
    const isLate = await Promise.race([done.then(() => false), late]);
    clearTimeout(timer);
    if (isLate) {
      await reader.cancel().catch(() => {});
      await done;
    }
  };
}

/** Runs one command from the repository root, streaming its output and capturing it. */
async function run(
  cmd: string[],
  timeoutMs: number,
  quietBacktrace: boolean,
): Promise<StepResult> {
  const started = performance.now();
  const [program, ...args] = cmd as [string, ...string[]];
  const child = new Deno.Command(program, {
    args,
    cwd: ROOT,
    env: childEnv(quietBacktrace),
    clearEnv: true,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
    detached: true,
  }).spawn();
  current = child;
  const sink = { text: "" };
  const drainOut = pump(child.stdout, Deno.stdout, sink);
  const drainErr = pump(child.stderr, Deno.stderr, sink);

  let timedOut = false;
  let killTimer: ReturnType<typeof setTimeout> | undefined;
  const deadline = setTimeout(() => {
    timedOut = true;
    killGroup(child, "SIGTERM");
    killTimer = setTimeout(() => killGroup(child, "SIGKILL"), 5_000);
  }, timeoutMs);
  const status = await child.status;
  clearTimeout(deadline);
  clearTimeout(killTimer);
  const leftovers = timedOut ? [] : groupMembers(child.pid);
  killGroup(child, "SIGKILL");
  current = undefined;
  await Promise.all([drainOut(), drainErr()]);
  if (leftovers.length > 0) {
    await print(
      `\n(note: killed processes that outlived \`${cmd.join(" ")}\`; a test did not stop them:` +
        `${leftovers.map((p) => `\n  ${p}`).join("")})\n`,
    );
  }
  if (timedOut) {
    await print(`\n(timed out after ${timeoutMs / 1000}s: \`${cmd.join(" ")}\` was killed)\n`);
  }
  return {
    code: status.code,
    output: stripAnsi(sink.text),
    timedOut,
    ms: performance.now() - started,
  };
}

/** "pid command line" of each live process in a process group (Linux /proc; else empty). */
function groupMembers(pgid: number): string[] {
  const members: string[] = [];
  try {
    for (const entry of Deno.readDirSync("/proc")) {
      if (!/^\d+$/.test(entry.name)) continue;
      try {
        const stat = Deno.readTextFileSync(`/proc/${entry.name}/stat`);
        // pid (comm) state ppid pgrp …; comm may contain spaces and parentheses.
        const [state, , pgrp] = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
        // Zombies are already dead; nobody reaps them where PID 1 is not an init.
        if (Number(pgrp) !== pgid || state === "Z") continue;
        const cmdline = Deno.readTextFileSync(`/proc/${entry.name}/cmdline`)
          .replaceAll("\0", " ").trim();
        members.push(`${entry.name} ${cmdline.slice(0, 200)}`);
      } catch {
        // exited meanwhile
      }
    }
  } catch {
    // no /proc
  }
  return members;
}

function stripAnsi(text: string): string {
  // deno-lint-ignore no-control-regex
  return text.replace(/\x1b\[[0-9;?]*[A-Za-z]/g, "");
}

function seconds(ms: number): string {
  return `${(ms / 1000).toFixed(1)}s`;
}

/** Every `.ts` file under `dir` (relative to the root), recursively, sorted. */
function walk(dir: string): string[] {
  const found: string[] = [];
  let entries: Deno.DirEntry[];
  try {
    entries = [...Deno.readDirSync(`${ROOT}/${dir}`)];
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return found;
    throw error;
  }
  for (const entry of entries) {
    if (entry.name.startsWith(".") || entry.name === "node_modules") continue;
    const path = `${dir}/${entry.name}`;
    if (entry.isDirectory) found.push(...walk(path));
    else if (entry.isFile && entry.name.endsWith(".ts")) found.push(path);
  }
  return found.sort();
}

function exists(path: string): boolean {
  try {
    Deno.statSync(`${ROOT}/${path}`);
    return true;
  } catch {
    return false;
  }
}

/** The `exports` of deno.json as `[subpath, file]` pairs. */
function denoExports(): [string, string][] {
  const config = JSON.parse(Deno.readTextFileSync(`${ROOT}/deno.json`));
  const exports: unknown = config.exports;
  if (typeof exports === "string") return [[".", exports]];
  if (exports && typeof exports === "object") {
    return Object.entries(exports as Record<string, string>);
  }
  return [];
}

function selectTests(filters: string[]): string[] {
  // tests/_test.ts is the registration helper, not a test file, though its name ends so.
  const all = walk("tests").filter((f) =>
    f.endsWith("_test.ts") && !(f.split("/").at(-1) ?? "").startsWith("_")
  );
  if (filters.length === 0) return all;
  const normalized = filters.map((f) => f.replace(/^\.\//, ""));
  return all.filter((file) => normalized.some((f) => file === f || file.includes(f)));
}

function selectRuntimes(): Runtime[] {
  const raw = Deno.env.get("RUNTIMES");
  if (!raw) return [...RUNTIMES];
  const wanted = raw.split(",").map((s) => s.trim()).filter(Boolean);
  for (const name of wanted) {
    if (!(RUNTIMES as readonly string[]).includes(name)) {
      throw new TypeError(`RUNTIMES: unknown runtime "${name}" (known: ${RUNTIMES.join(",")})`);
    }
  }
  return RUNTIMES.filter((r) => wanted.includes(r));
}

/**
 * Counts the per-test result lines of a run that ended without a summary (killed at its
 * deadline, or crashed), so the report still says how far it got. Top-level tests only.
 */
function partialCounts(runtime: Runtime, output: string): [number, number] {
  const count = (re: RegExp) => [...output.matchAll(re)].length;
  switch (runtime) {
    case "deno":
      // "name ... ok (3ms)", or " FAILED (5m0s)" after a "has been running for over" notice.
      return [
        count(/^(?:\S.* \.\.\.)? ok \(/gm),
        count(/^(?:\S.* \.\.\.)? FAILED \(/gm),
      ];
    case "bun":
      return [count(/^\(pass\) /gm), count(/^\(fail\) /gm)];
    case "node":
      return [count(/^✔ /gm), count(/^✖ (?!failing tests:)/gm)];
  }
}

/** Passed/failed counts from a runner's closing summary, or undefined if it printed none. */
function parseCounts(runtime: Runtime, output: string): [number, number] | undefined {
  const last = (re: RegExp): number | undefined => {
    const all = [...output.matchAll(re)];
    const match = all.at(-1);
    return match ? Number(match[1]) : undefined;
  };
  switch (runtime) {
    case "deno": {
      // "ok | 12 passed (3 steps) | 0 failed (40ms)" or "FAILED | 11 passed | 1 failed | …"
      const all = [
        ...output.matchAll(/^(?:ok|FAILED) \| (\d+) passed(?: \([^)]*\))? \| (\d+) failed/gm),
      ];
      const match = all.at(-1);
      return match ? [Number(match[1]), Number(match[2])] : undefined;
    }
    case "bun": {
      // " 12 pass", " 1 fail", and " 1 error" for errors outside any test.
      const pass = last(/^\s*(\d+) pass$/gm);
      const fail = last(/^\s*(\d+) fail$/gm);
      if (pass === undefined || fail === undefined) return undefined;
      return [pass, fail + (last(/^\s*(\d+) errors?$/gm) ?? 0)];
    }
    case "node": {
      // spec reporter: "ℹ pass 12"; tap: "# pass 12". A test over its timeout is "cancelled".
      const pass = last(/^(?:ℹ|#) pass (\d+)$/gm);
      const fail = last(/^(?:ℹ|#) fail (\d+)$/gm);
      if (pass === undefined || fail === undefined) return undefined;
      return [pass, fail + (last(/^(?:ℹ|#) cancelled (\d+)$/gm) ?? 0)];
    }
  }
}

function testCommand(runtime: Runtime, files: string[]): string[] {
  switch (runtime) {
    case "deno":
      // Deno 2.8 turned the op and resource sanitizers off by default; turn them back on.
      // They apply to Deno.test() only: Deno runs node:test tests unsanitized by design.
      return [binary("deno"), "test", "-A", "--sanitize-ops", "--sanitize-resources", ...files];
    case "bun":
      // Paths must start with "./": bun treats other arguments as name filters.
      return [binary("bun"), "test", `--timeout=${TEST_TIMEOUT_MS}`, ...files.map((f) => `./${f}`)];
    case "node":
      // Node 22.18+ strips TypeScript types by default: no flag needed for .ts files.
      return [
        binary("node"),
        "--test",
        "--test-reporter=spec",
        "--test-concurrency=1",
        `--test-timeout=${TEST_TIMEOUT_MS}`,
        ...files,
      ];
  }
}

async function main(): Promise<number> {
  const outcomes: Outcome[] = [];
  const ranTests = new Map<Runtime, Verdicts>();
  let passed = 0;
  let failed = 0;

  const tests = selectTests(Deno.args);
  if (tests.length === 0) {
    await print(`no test file matches ${Deno.args.join(" ") || "tests/**/*_test.ts"}\n`);
    await print("total: 0 passed, 1 failed\n");
    return 1;
  }
  const runtimes = selectRuntimes();
  const deno = binary("deno");

  if (Deno.env.get("SKIP_CHECKS") !== "1") {
    const entries = denoExports();
    const webStandard = entries.filter(([subpath]) => !RUNTIME_SPECIFIC_EXPORTS.has(subpath))
      .map(([, file]) => file);
    const sources = [...(exists("mod.ts") ? ["mod.ts"] : []), ...walk("src"), ...walk("tests")]
      .concat(walk("bench"));
    const checks: [string, string[]][] = [
      ["deno fmt --check", [deno, "fmt", "--check"]],
      ["deno lint", [deno, "lint"]],
      [`deno check (${sources.length} files)`, [deno, "check", ...sources]],
      [
        `deno doc --lint ${entries.map(([, f]) => f).join(" ")}`,
        [deno, "doc", "--lint", ...entries.map(([, f]) => f)],
      ],
      ["deno publish --dry-run", [deno, "publish", "--dry-run", "--allow-dirty"]],
      [
        `web-standard type-check of ${webStandard.join(" ")} (tests/_webstd.jsonc)`,
        [deno, "check", "--config", "tests/_webstd.jsonc", ...webStandard],
      ],
    ];
    for (const [name, cmd] of checks) {
      await print(`\n=== ${name}\n`);
      const result = await run(cmd, CHECK_TIMEOUT_MS, true);
      const ok = result.code === 0 && !result.timedOut;
      const detail = result.timedOut ? `timed out (${seconds(result.ms)})` : seconds(result.ms);
      outcomes.push({ name, ok, detail });
      if (!ok) failed++;
      await print(`--- ${name}: ${ok ? "ok" : "FAILED"} (${detail})\n`);
    }
  }

  for (const runtime of runtimes) {
    const cmd = testCommand(runtime, tests);
    const name = `${runtime} tests`;
    await print(`\n=== ${name}: ${cmd.slice(1).join(" ")}\n`);
    const result = await run(cmd, RUNTIME_TIMEOUT_MS, false);
    const counts = parseCounts(runtime, result.output);
    let [p, f] = counts ?? partialCounts(runtime, result.output);
    const notes: string[] = [];
    if (result.timedOut) {
      f++;
      notes.push(`timed out after ${seconds(RUNTIME_TIMEOUT_MS)}`);
    } else if (counts === undefined) {
      f++;
      notes.push(`no summary, exit code ${result.code}`);
    } else if (result.code !== 0 && f === 0) {
      f++;
      notes.push(`exit code ${result.code}`);
    } else if (p + f === 0) {
      f++;
      notes.push("ran no test");
    }
    passed += p;
    failed += f;
    const found = verdicts(runtime, result.output);
    ranTests.set(runtime, found);
    const skipped = [...found.values()].filter((v) => v === "skipped").length;
    const detail = [
      `${p} passed, ${f} failed${skipped > 0 ? `, ${skipped} skipped` : ""}`,
      ...notes,
      seconds(result.ms),
    ].join("; ");
    outcomes.push({ name, ok: f === 0, detail });
    await print(`--- ${name}: ${detail}\n`);
  }

  await print("\n=== summary\n");
  for (const { name, ok, detail } of outcomes) {
    await print(`${ok ? "ok    " : "FAILED"}  ${name}  (${detail})\n`);
  }
  const differences = ranTests.size > 1 ? countDifferences(ranTests) : [];
  if (differences.length > 0) {
    await print("the counts differ by runtime because of these tests:\n");
    for (const line of differences) await print(`  ${line}\n`);
  }
  await print(`total: ${passed} passed, ${failed} failed\n`);
  return failed === 0 ? 0 : 1;
}

Deno.exit(await main());

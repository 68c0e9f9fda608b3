/**
 * `npm run demo`: the broker end to end, offline and without credentials. It starts the
 * loopback model provider (`tests/_mock_model.ts`) and a throwaway `CODEX_HOME` pointing at
 * it, runs `src/main.ts` as a subprocess on a free port, sends one REST turn and one
 * streaming turn on the same thread with `fetch`, prints what comes back, then stops the
 * broker with SIGTERM and removes everything it made.
 *
 * Runs on Deno (`deno run -A bench/demo.ts`, what `npm run demo` does), Bun and Node 22;
 * the broker runs under the same runtime.
 *
 * @module
 */

import { spawn } from "node:child_process";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import process from "node:process";
import { fileURLToPath } from "node:url";
import { makeCodexHome } from "../tests/_codex_home.ts";
import { startMockModel } from "../tests/_mock_model.ts";

const ROOT = fileURLToPath(new URL("..", import.meta.url));
const MAIN = join(ROOT, "src", "main.ts");
const SECRET = "demo-secret-of-the-loopback-broker";
const WORKSPACE = "demo";

const SIGNALS = ["SIGINT", "SIGTERM", "SIGHUP"] as const;

const deno = (globalThis as { Deno?: typeof Deno }).Deno;
const color = process.stdout.isTTY && !process.env.NO_COLOR;
const dim = (text: string) => color ? `\x1b[2m${text}\x1b[0m` : text;
const bold = (text: string) => color ? `\x1b[1m${text}\x1b[0m` : text;

/** The broker subprocess: its stderr lines, its exit code, and a way to signal it. */
interface Broker {
  pid: number;
  /** Resolves with the `url` of the `"msg":"listening"` log line. */
  listening: Promise<string>;
  /** The exit code, or null if a signal ended it; once its stderr is drained. */
  exited: Promise<number | null>;
  kill(signal: "SIGTERM" | "SIGKILL"): void;
}

function startBroker(args: string[]): Broker {
  const listening = Promise.withResolvers<string>();
  let partial = "";
  const onText = (text: string) => {
    partial += text;
    const lines = partial.split("\n");
    partial = lines.pop() ?? "";
    for (const line of lines) onLine(line);
  };
  const onLine = (line: string) => {
    let entry: Record<string, unknown>;
    try {
      entry = JSON.parse(line);
    } catch {
      return; // not a log record
    }
    if (entry.msg === "listening") listening.resolve(String(entry.url));
    const { time: _time, level: _level, msg, ...fields } = entry;
    const details = Object.entries(fields).filter(([, value]) => value !== null)
      .map(([key, value]) => `${key}=${typeof value === "string" ? value : JSON.stringify(value)}`);
    console.log(dim(`  broker log: ${msg} ${details.join(" ")}`.slice(0, 160)));
  };
  const onEnd = () => listening.reject(new Error("The broker exited before it listened"));

  if (deno) {
    // Deno.Command, not node:child_process: Deno's reports a child that exited 0 after
    // SIGTERM as killed by the signal.
    const child = new deno.Command(deno.execPath(), {
      args: ["run", "-A", MAIN, ...args],
      cwd: ROOT,
      stdin: "null",
      stdout: "inherit",
      stderr: "piped",
    }).spawn();
    const drained = (async () => {
      for await (const text of child.stderr.pipeThrough(new TextDecoderStream())) onText(text);
      onEnd();
    })();
    return {
      pid: child.pid,
      listening: listening.promise,
      exited: Promise.all([child.status, drained]).then(([status]) =>
        status.signal ? null : status.code
      ),
      kill: (signal) => {
        try {
          child.kill(signal);
        } catch {
          // Already exited.
        }
      },
    };
  }
  const child = spawn(process.execPath, [MAIN, ...args], {
    cwd: ROOT,
    stdio: ["ignore", "inherit", "pipe"],
  });
  child.stderr!.setEncoding("utf8");
  child.stderr!.on("data", onText);
  return {
    pid: child.pid!,
    listening: listening.promise,
    exited: new Promise((resolve) =>
      child.once("close", (code) => {
        onEnd();
        resolve(code);
      })
    ),
    kill: (signal) => void child.kill(signal),
  };
}

/** The parts of codex's Turn the demo prints. */
interface TurnSummary {
  id: string;
  status: string;
  items?: { type: string; text?: string }[];
}

/** The text of the turn's agent messages. */
function agentText(turn: TurnSummary): string {
  return (turn.items ?? []).filter((item) => item.type === "agentMessage")
    .map((item) => item.text ?? "").join("\n");
}

function input(text: string) {
  return { input: [{ type: "text", text, text_elements: [] }] };
}

async function restTurn(url: string): Promise<string> {
  console.log(bold("\n1. REST turn: POST /api/turns"));
  const started = performance.now();
  const response = await fetch(`${url}/api/turns`, {
    method: "POST",
    headers: { "content-type": "application/json", "x-internal-secret": SECRET },
    body: JSON.stringify({ workspaceId: WORKSPACE, params: input("What does the broker do?") }),
  });
  const body = await response.json();
  const ms = Math.round(performance.now() - started);
  if (response.status !== 200 || !body.turn) {
    throw new Error(`REST turn failed: ${response.status} ${JSON.stringify(body)}`);
  }
  console.log(
    `   HTTP ${response.status} in ${ms} ms (the first turn of a workspace starts its codex)`,
  );
  console.log(`   thread: ${body.threadId}`);
  console.log(`   turn:   ${body.turn.id} ${body.turn.status}`);
  console.log(`   agent:  ${agentText(body.turn)}`);
  return body.threadId;
}

async function streamingTurn(url: string, threadId: string): Promise<void> {
  console.log(bold("\n2. Streaming turn on the same thread: Accept: text/event-stream"));
  const started = performance.now();
  const response = await fetch(`${url}/api/turns`, {
    method: "POST",
    headers: {
      "content-type": "application/json",
      "x-internal-secret": SECRET,
      accept: "text/event-stream",
    },
    body: JSON.stringify({ workspaceId: WORKSPACE, threadId, params: input("And in one line?") }),
  });
  if (response.status !== 200 || response.body === null) {
    throw new Error(`Streaming turn failed: ${response.status} ${await response.text()}`);
  }
  let result: { threadId?: string; turn?: TurnSummary } | undefined;
  let buffer = "";
  for await (const text of response.body.pipeThrough(new TextDecoderStream())) {
    buffer += text;
    let end: number;
    while ((end = buffer.indexOf("\n\n")) !== -1) {
      const frame = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      if (frame.startsWith(":")) continue; // a heartbeat comment
      let event = "message";
      let data = "";
      for (const line of frame.split("\n")) {
        if (line.startsWith("event: ")) event = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      const ms = Math.round(performance.now() - started);
      console.log(`   ${String(ms).padStart(4)} ms  event: ${event}`);
      if (event === "result") result = JSON.parse(data);
    }
  }
  if (!result?.turn) throw new Error(`Streaming turn failed: ${JSON.stringify(result)}`);
  console.log(`   thread: ${result.threadId}`);
  console.log(`   turn:   ${result.turn.id} ${result.turn.status}`);
  console.log(`   agent:  ${agentText(result.turn)}`);
}

async function demo(): Promise<number> {
  const started = performance.now();
  const model = await startMockModel({
    respond: (request) => ({
      type: "message",
      text: `(mock model) You asked: "${request.lastUserText ?? ""}". I answer from loopback, ` +
        `so this demo needs no network and no credentials.`,
    }),
  });
  const home = await makeCodexHome(model.baseUrl);
  const dir = await mkdtemp(join(tmpdir(), "codex-broker-demo-"));
  console.log(bold("codex-broker demo"));
  console.log(`   mock model:  ${model.baseUrl}`);
  console.log(`   CODEX_HOME:  ${home.path}`);
  console.log(`   workspaces:  ${join(dir, "workspaces")}`);
  const broker = startBroker([
    "--port",
    "0",
    "--secret",
    SECRET,
    "--workspaces-dir",
    join(dir, "workspaces"),
    "--codex-home",
    home.path,
  ]);
  let code = 1;
  // SIGTERM from a process manager (`npm run demo` passes it on), SIGINT from Ctrl+C: stop
  // the broker gracefully and clean up as after a finished demo, instead of dying and
  // leaving the broker and its codex running.
  let stoppedBy: string | undefined;
  const onSignal = (signal: string) => {
    stoppedBy ??= signal;
    broker.kill("SIGTERM");
  };
  for (const signal of SIGNALS) process.on(signal, onSignal);
  try {
    const url = await broker.listening;
    console.log(`   broker:      ${url} (pid ${broker.pid})`);
    const threadId = await restTurn(url);
    await streamingTurn(url, threadId);
    console.log(bold("\n3. SIGTERM: the broker stops every codex and exits"));
    broker.kill("SIGTERM");
    const exit = await broker.exited;
    console.log(`   broker exited with code ${exit}`);
    code = exit === 0 ? 0 : 1;
  } catch (error) {
    if (stoppedBy === undefined) {
      console.error(`demo failed: ${error instanceof Error ? error.message : error}`);
    }
    broker.kill("SIGTERM");
    const exit = await broker.exited;
    if (stoppedBy !== undefined) {
      console.log(`\nStopped by ${stoppedBy}: the broker exited with code ${exit}`);
      code = exit === 0 ? 0 : 1;
    }
  } finally {
    await model.close();
    await home.cleanup();
    await rm(dir, { recursive: true, force: true });
  }
  console.log(`\nDone in ${((performance.now() - started) / 1000).toFixed(1)} s`);
  return code;
}

process.exit(await demo());

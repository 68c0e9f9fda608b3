/**
 * Server tests: `src/main.ts` as a subprocess on port 0, with the real codex on the
 * loopback model. Each runner starts the broker under its own runtime (`deno run -A`,
 * `bun`, `node`), so `deno test`, `bun test` and `node --test` together cover all three
 * while each run pays for one runtime only.
 */

import { test } from "./_test.ts";
import assert from "node:assert/strict";
import { existsSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { chmod, mkdtemp, realpath, rm, writeFile } from "node:fs/promises";
import { type AddressInfo, createServer } from "node:net";
import { tmpdir } from "node:os";
import { basename, join } from "node:path";
import process from "node:process";
import { main, parseDuration, parseFlags, startBroker, USAGE, UsageError } from "../src/main.ts";
import {
  type BrokerProcess,
  childEnv,
  commandLine,
  descendants,
  isRunning,
  records,
  spawnBroker,
} from "./_broker_process.ts";
import { makeCodexHome, type TempCodexHome } from "./_codex_home.ts";
import { type MockModel, type MockResponder, reply, startMockModel } from "./_mock_model.ts";

const SECRET = "test-secret-9f2c";
// Bun's own default is 5 s per test; a broker test takes one or two.
const TIMEOUT = { timeout: 30_000 };

/** A mock model, a codex home pointing at it, a workspaces dir, and a broker over them. */
interface Fixture {
  model: MockModel;
  home: TempCodexHome;
  dir: string;
  broker: BrokerProcess;
  url: string;
  /** SIGTERMs the broker (if it still runs), then removes everything. */
  cleanup(): Promise<void>;
}

async function startFixture(
  options: { respond?: MockResponder; args?: string[]; env?: Record<string, string> } = {},
): Promise<Fixture> {
  const model = await startMockModel({ respond: options.respond ?? reply("hello from the mock") });
  const home = await makeCodexHome(model.baseUrl);
  const dir = await realpath(await mkdtemp(join(tmpdir(), "main-test-")));
  const broker = spawnBroker([
    "--port",
    "0",
    "--workspaces-dir",
    join(dir, "workspaces"),
    "--codex-home",
    home.path,
    ...(options.args ?? ["--secret", SECRET]),
  ], childEnv(options.env));
  const cleanup = async () => {
    // The model first: codex sometimes waits on a hung model stream after SIGTERM, until the
    // supervisor's SIGKILL 3 s later.
    await model.close();
    broker.kill("SIGTERM");
    await broker.status;
    await home.cleanup();
    await rm(dir, { recursive: true, force: true });
  };
  try {
    const line = await broker.waitForLine((l) => l.includes('"msg":"listening"'), "listening");
    const url = JSON.parse(line).url as string;
    return { model, home, dir, broker, url, cleanup };
  } catch (error) {
    await cleanup();
    throw error;
  }
}

function turnRequest(
  url: string,
  body: Record<string, unknown>,
  headers: Record<string, string> = { "x-internal-secret": SECRET },
  signal?: AbortSignal,
): Promise<Response> {
  return fetch(`${url}/api/turns`, {
    method: "POST",
    headers: { "content-type": "application/json", ...headers },
    body: JSON.stringify(body),
    ...(signal ? { signal } : {}),
  });
}

const HELLO = {
  workspaceId: "ws-1",
  params: { input: [{ type: "text", text: "hello", text_elements: [] }] },
};

function codexPids(broker: BrokerProcess): number[] {
  return records(broker.lines).filter((r) => r.msg === "dial").map((r) => r.pid as number);
}

for (const wsClient of ["net", "web"] as const) {
  test(
    `src/main.ts serves a complete turn over HTTP, run by codex in the workspace directory (--ws-client ${wsClient})`,
    TIMEOUT,
    async () => {
      const fx = await startFixture({
        args: ["--secret", SECRET, ...(wsClient === "web" ? ["--ws-client", "web"] : [])],
      });
      try {
        const start = records(fx.broker.lines).find((r) => r.msg === "start");
        assert.equal(start?.wsClient, wsClient);
        // The command turns V8's allocation-site pretenuring off, on Node.
        const onNode = process.versions.bun === undefined && !("Deno" in globalThis);
        assert.equal(start?.v8Pretenuring, onNode ? "off" : undefined);
        const response = await turnRequest(fx.url, HELLO);
        assert.equal(response.status, 200);
        const body = await response.json();
        assert.equal(typeof body.threadId, "string");
        assert.equal(body.turn.status, "completed");
        const agent = body.turn.items.find((item: { type: string }) =>
          item.type === "agentMessage"
        );
        assert.equal(agent?.text, "hello from the mock");
        // codex tells the model its working directory: the workspace's own work folder, with
        // its own codex home and lease beside it, not inside.
        const workspace = join(fx.dir, "workspaces", "ws-1");
        assert.ok(
          JSON.stringify(fx.model.requests[0]?.body).includes(`<cwd>${workspace}/work</cwd>`),
        );
        assert.ok(
          existsSync(join(workspace, "codex-home", "config.toml")),
          "the template was copied",
        );
        assert.ok(existsSync(join(workspace, "codex-home", "sessions")), "the thread lives there");
        assert.ok(existsSync(join(workspace, "lease")));
        const turn = await fx.broker.waitForLine((l) => l.includes('"msg":"turn"'), "the turn");
        // One JSON object per line, time, level and msg first.
        assert.match(turn, /^\{"time":"\d{4}-\d\d-\d\dT[\d:.]+Z","level":"info","msg":"turn",/);
        assert.deepEqual(
          { ...JSON.parse(turn), time: undefined, durationMs: undefined },
          {
            time: undefined,
            level: "info",
            msg: "turn",
            workspaceId: "ws-1",
            threadId: body.threadId,
            turnId: body.turn.id,
            status: "completed",
            outcome: "completed",
            durationMs: undefined,
            stream: false,
            principal: "operator",
          },
        );
        assert.equal(typeof JSON.parse(turn).durationMs, "number");
        assert.equal(fx.broker.lines.some((line) => line.includes(SECRET)), false);
      } finally {
        await fx.cleanup();
      }
    },
  );
}

test(
  "src/main.ts answers 401 to a request without the secret or with a wrong one",
  TIMEOUT,
  async () => {
    const fx = await startFixture();
    try {
      const missing = await turnRequest(fx.url, HELLO, {});
      assert.equal(missing.status, 401);
      assert.equal((await missing.json()).error.code, "unauthorized");
      const wrong = await turnRequest(fx.url, HELLO, { "x-internal-secret": "not-it" });
      assert.equal(wrong.status, 401);
      await wrong.body?.cancel();
      assert.equal(fx.model.requests.length, 0);
      assert.deepEqual(codexPids(fx.broker), []);
    } finally {
      await fx.cleanup();
    }
  },
);

test("src/main.ts exits 0 on SIGTERM and leaves no codex process behind", TIMEOUT, async () => {
  const fx = await startFixture();
  try {
    const response = await turnRequest(fx.url, HELLO);
    assert.equal((await response.json()).turn.status, "completed");
    const [codex] = codexPids(fx.broker);
    assert.ok(codex !== undefined && isRunning(codex));
    // codex processes only. codex also runs the user's login shell once (`bash -lc …`, to
    // snapshot its environment); that shell and the jobs of the user's profile (pyenv's
    // `rehash` here) can outlive codex by a moment, and end on their own.
    const children = descendants(fx.broker.pid).filter((pid) =>
      basename(commandLine(pid).split(" ")[0] ?? "") === "codex"
    );
    if (existsSync("/proc")) assert.ok(children.includes(codex));
    fx.broker.kill("SIGTERM");
    assert.deepEqual(await fx.broker.status, { code: 0, signal: null });
    const left = [codex, ...children].filter(isRunning);
    assert.deepEqual(left, [], left.map((pid) => `${pid}: ${commandLine(pid)}`).join("\n"));
    const log = records(fx.broker.lines).map((r) => r.msg);
    assert.deepEqual(log.slice(-2), ["shutdown", "stopped"]);
  } finally {
    await fx.cleanup();
  }
});

test("src/main.ts lets a turn in flight finish on SIGINT before it exits 0", TIMEOUT, async () => {
  const fx = await startFixture({
    respond: () => ({ type: "message", text: "worth the wait", delayMs: 400 }),
  });
  try {
    const pending = turnRequest(fx.url, HELLO);
    await fx.model.waitForRequests(1);
    fx.broker.kill("SIGINT");
    const response = await pending;
    assert.equal(response.status, 200);
    const body = await response.json();
    assert.equal(body.turn.status, "completed");
    assert.equal(body.turn.items.at(-1).text, "worth the wait");
    assert.deepEqual(await fx.broker.status, { code: 0, signal: null });
    await assert.rejects(fetch(`${fx.url}/healthz`));
  } finally {
    await fx.cleanup();
  }
});

test(
  "src/main.ts shuts down gracefully on SIGHUP (a closed terminal) and exits 0",
  TIMEOUT,
  async () => {
    const fx = await startFixture();
    try {
      const response = await turnRequest(fx.url, HELLO);
      assert.equal((await response.json()).turn.status, "completed");
      const [codex] = codexPids(fx.broker);
      fx.broker.kill("SIGHUP");
      assert.deepEqual(await fx.broker.status, { code: 0, signal: null });
      assert.ok(codex !== undefined && !isRunning(codex));
    } finally {
      await fx.cleanup();
    }
  },
);

test(
  "src/main.ts interrupts turns still running when the grace period ends, then exits 0",
  TIMEOUT,
  async () => {
    const fx = await startFixture({
      respond: () => ({ type: "hang" }),
      args: ["--secret", SECRET, "--grace", "200ms"],
    });
    try {
      const pending = turnRequest(fx.url, HELLO);
      await fx.model.waitForRequests(1);
      const [codex] = codexPids(fx.broker);
      fx.broker.kill("SIGTERM");
      const response = await pending;
      assert.equal(response.status, 503);
      assert.equal((await response.json()).error.code, "unavailable");
      // Ends the hung model stream, which codex may otherwise wait on after SIGTERM until the
      // supervisor's SIGKILL (3 s): this test is about the broker, not codex's exit.
      await fx.model.close();
      assert.deepEqual(await fx.broker.status, { code: 0, signal: null });
      assert.ok(codex !== undefined && !isRunning(codex));
      const log = records(fx.broker.lines).map((r) => r.msg);
      assert.ok(log.includes("interrupting turns"), log.join(", "));
    } finally {
      await fx.cleanup();
    }
  },
);

test(
  "src/main.ts cancels the turn of a client that goes away, streaming or not",
  TIMEOUT,
  async () => {
    // A Deno broker notices a Node client leaving an event stream only with deno.json's
    // "unstable": ["no-legacy-abort"]; this test's own fetch is noticed either way.
    const fx = await startFixture({ respond: () => ({ type: "hang" }) });
    try {
      const plain = new AbortController();
      const pending = turnRequest(fx.url, HELLO, { "x-internal-secret": SECRET }, plain.signal);
      await fx.model.waitForRequests(1);
      plain.abort();
      await assert.rejects(pending);

      const streaming = new AbortController();
      const response = await turnRequest(fx.url, HELLO, {
        "x-internal-secret": SECRET,
        accept: "text/event-stream",
      }, streaming.signal);
      const reader = response.body!.getReader();
      assert.match(new TextDecoder().decode((await reader.read()).value), /^event: thread\n/);
      await fx.model.waitForRequests(2);
      streaming.abort();
      await reader.closed.catch(() => {});

      const cancelled = (line: string) => line.includes('"outcome":"cancelled"');
      await fx.broker.waitForLine((l) => cancelled(l) && l.includes('"stream":false'), "a cancel");
      await fx.broker.waitForLine((l) => cancelled(l) && l.includes('"stream":true'), "a cancel");
    } finally {
      await fx.cleanup();
    }
  },
);

test(
  "src/main.ts generates a secret when none is given and logs it once, as a JSON warn line that says how to use it",
  TIMEOUT,
  async () => {
    const fx = await startFixture({ args: [] });
    try {
      const line = await fx.broker.waitForLine((l) => l.includes("generated secret"), "the secret");
      // Every stderr line stays JSON, this one included.
      const record = JSON.parse(line);
      assert.equal(record.level, "warn");
      assert.equal(record.msg, "generated secret");
      assert.match(record.hint, /X-Internal-Secret header/);
      assert.ok(record.hint.includes(fx.url), record.hint);
      const secret = record.secret as string;
      assert.match(secret, /^[A-Za-z0-9_-]{43}$/);
      assert.equal(fx.broker.lines.filter((l) => l.includes(secret)).length, 1);
      for (const l of fx.broker.lines) assert.doesNotThrow(() => JSON.parse(l), l);
      const start = records(fx.broker.lines).find((r) => r.msg === "start");
      assert.equal(start?.secretFrom, "generated");
      // Authenticated, so the body is looked at: 400, where a wrong secret would give 401.
      const response = await fetch(`${fx.url}/api/turns`, {
        method: "POST",
        headers: { "content-type": "application/json", "x-internal-secret": secret },
        body: "{",
      });
      assert.equal(response.status, 400);
      await response.body?.cancel();
    } finally {
      await fx.cleanup();
    }
  },
);

test(
  "src/main.ts takes the secret from BROKER_SECRET, never logs it and hides it from codex",
  TIMEOUT,
  async () => {
    const fx = await startFixture({ args: [], env: { BROKER_SECRET: SECRET } });
    try {
      const response = await turnRequest(fx.url, HELLO);
      assert.equal((await response.json()).turn.status, "completed");
      assert.equal(records(fx.broker.lines).find((r) => r.msg === "start")?.secretFrom, "env");
      assert.equal(fx.broker.lines.some((line) => line.includes(SECRET)), false);
      // codex runs commands the model chooses: they must not find the key to the broker.
      const [codex] = codexPids(fx.broker);
      if (codex !== undefined && existsSync(`/proc/${codex}/environ`)) {
        const environ = readFileSync(`/proc/${codex}/environ`, "utf8").split("\0");
        assert.ok(environ.some((entry) => entry.startsWith("CODEX_HOME=")));
        assert.equal(environ.some((entry) => entry.startsWith("BROKER_SECRET=")), false);
      }
    } finally {
      await fx.cleanup();
    }
  },
);

test("src/main.ts exits 2 with a message on stderr for a bad flag or value", TIMEOUT, async () => {
  const cases: [string[], RegExp][] = [
    [["--bogus"], /Unknown flag --bogus/],
    [["--port", "70000"], /Invalid --port "70000"/],
    [["--approvals", "maybe"], /Invalid --approvals "maybe": expected accept or decline/],
    [["--idle-ttl", "soon"], /Invalid --idle-ttl "soon"/],
    [["--idle-ttl", "3000h"], /Invalid --idle-ttl "3000h": at most 576h \(24 days\)/],
    [["--host"], /Missing value for --host/],
  ];
  await Promise.all(cases.map(async ([args, message]) => {
    const broker = spawnBroker(args, childEnv());
    assert.deepEqual(await broker.status, { code: 2, signal: null }, args.join(" "));
    assert.match(broker.lines.join("\n"), message);
    assert.equal(broker.lines.some((line) => line.includes('"msg":"listening"')), false);
  }));
});

test("src/main.ts --help prints the usage to stdout and exits 0", TIMEOUT, async () => {
  const broker = spawnBroker(["--help"], childEnv());
  assert.deepEqual(await broker.status, { code: 0, signal: null });
  const usage = await broker.stdout;
  for (const flag of ["--host", "--port", "--secret", "--idle-ttl", "--workspaces-dir"]) {
    assert.ok(usage.includes(flag), flag);
  }
  for (const flag of ["--codex-home", "--codex ", "--approvals", "--grace", "--help"]) {
    assert.ok(usage.includes(flag), flag);
  }
  assert.deepEqual(broker.lines, []);
});

test("parseFlags() reads durations with units, resolves paths and lets the last flag win", () => {
  const parsed = parseFlags([
    "--port=0",
    "--idle-ttl",
    "30s",
    "--grace",
    "1.5m",
    "--workspaces-dir",
    "ws",
    "--approvals",
    "decline",
    "--approvals=accept",
  ], { BROKER_SECRET: "from-env" });
  assert.ok(!parsed.help);
  assert.deepEqual(parsed.options, {
    secret: "from-env",
    port: 0,
    idleTtlMs: 30_000,
    graceMs: 90_000,
    workspacesDir: join(process.cwd(), "ws"),
    approvals: "accept",
  });
  assert.equal(parsed.secretSource, "env");
  assert.equal(parseFlags(["--secret", "flag"], { BROKER_SECRET: "env" }).help, false);
  assert.equal(parseDuration("250", "--grace"), 250);
  assert.equal(parseDuration("2h", "--idle-ttl"), 7_200_000);
  assert.throws(() => parseFlags(["--idle-ttl", "0"]), UsageError);
  assert.throws(() => parseFlags(["--grace", "-1s"]), UsageError);
  assert.throws(() => parseFlags(["8787"]), /Unexpected argument "8787"/);
  assert.deepEqual(parseFlags(["--port", "1", "-h"]), { help: true });
});

test("parseFlags() generates a different 32-byte base64url secret when none is given", () => {
  const a = parseFlags([], {});
  const b = parseFlags([], { BROKER_SECRET: undefined });
  assert.ok(!a.help && !b.help);
  assert.match(a.options.secret, /^[A-Za-z0-9_-]{43}$/);
  assert.notEqual(a.options.secret, b.options.secret);
  assert.equal(a.secretSource, "generated");
});

test("parseFlags() refuses an --idle-ttl or --grace past 24 days, which timers cannot wait", () => {
  for (
    const [flag, value] of [["--idle-ttl", "3000h"], ["--grace", "600h"], ["--grace", "2147483648"]]
  ) {
    assert.throws(
      () => parseFlags([flag!, value!]),
      (error: unknown) =>
        error instanceof UsageError &&
        error.message === `Invalid ${flag} ${JSON.stringify(value)}: at most 576h (24 days), ` +
            "the longest a timer can wait",
      `${flag} ${value}`,
    );
  }
  const longest = parseFlags(["--idle-ttl", "576h", "--grace=576h"], { BROKER_SECRET: "s" });
  assert.ok(!longest.help);
  assert.equal(longest.options.idleTtlMs, 24 * 24 * 3_600_000);
  assert.equal(longest.options.graceMs, 24 * 24 * 3_600_000);
  assert.equal(parseDuration("0", "--grace"), 0);
});

test("parseFlags() reads --ws-client net or web, --deno-server node or native and --v8-pretenuring off or on, and refuses anything else", () => {
  const cases = [
    ["ws-client", "wsClient", ["net", "web"], "ws", "net or web"],
    ["deno-server", "denoServer", ["node", "native"], "deno", "node or native"],
    ["v8-pretenuring", "v8Pretenuring", ["off", "on"], "auto", "off or on"],
  ] as const;
  for (const [flag, key, values, wrong, expected] of cases) {
    for (const value of values) {
      const parsed = parseFlags([`--${flag}`, value], {});
      assert.ok(!parsed.help);
      assert.equal(parsed.options[key], value);
    }
    assert.throws(
      () => parseFlags([`--${flag}`, wrong], {}),
      (error) =>
        error instanceof UsageError &&
        error.message === `Invalid --${flag} "${wrong}": expected ${expected}`,
    );
  }
});

test("parseFlags() reads --turn-silence as a positive duration", () => {
  const parsed = parseFlags(["--turn-silence", "90s"], { BROKER_SECRET: "s" });
  assert.ok(!parsed.help);
  assert.equal(parsed.options.turnSilenceMs, 90_000);
  assert.throws(
    () => parseFlags(["--turn-silence", "0"]),
    /Invalid --turn-silence "0": must be positive/,
  );
  assert.throws(() => parseFlags(["--turn-silence", "soon"]), /Invalid --turn-silence "soon"/);
});

test("USAGE lists every flag parseFlags() takes, and the duration limit", () => {
  for (const flag of USAGE.matchAll(/^ {2}(--[a-z0-9-]+)/gm)) {
    if (flag[1] === "--help") continue;
    // A flag parseFlags() did not know would be a UsageError "Unknown flag".
    assert.throws(() => parseFlags([flag[1]!]), /Missing value/, flag[1]);
  }
  assert.match(USAGE, /at most 24 days/);
});

test("parseFlags() reads the scale-out flags, BROKER_ID, and refuses bad values", () => {
  const parsed = parseFlags([
    "--broker-id",
    "b-1",
    "--advertise-url",
    "http://10.0.0.5:8787/",
    "--lease-ttl",
    "3s",
    "--max-workspaces",
    "40",
  ], { BROKER_SECRET: "s", BROKER_ID: "from-env" });
  assert.ok(!parsed.help);
  assert.equal(parsed.options.brokerId, "b-1", "the flag wins over BROKER_ID");
  assert.equal(parsed.options.advertiseUrl, "http://10.0.0.5:8787");
  assert.equal(parsed.options.leaseTtlMs, 3_000);
  assert.equal(parsed.options.maxWorkspaces, 40);
  const fromEnv = parseFlags([], { BROKER_SECRET: "s", BROKER_ID: "from-env" });
  assert.ok(!fromEnv.help);
  assert.equal(fromEnv.options.brokerId, "from-env");
  assert.throws(() => parseFlags(["--broker-id", "a b"]), /Invalid --broker-id "a b"/);
  assert.throws(() => parseFlags(["--advertise-url", "10.0.0.5:8787"]), /Invalid --advertise-url/);
  assert.throws(() => parseFlags(["--advertise-url", "ftp://x"]), /http:\/\/ or https:\/\//);
  assert.throws(() => parseFlags(["--lease-ttl", "100ms"]), /at least 300ms/);
  assert.throws(() => parseFlags(["--max-workspaces", "0"]), /positive integer/);
  assert.throws(() => parseFlags(["--max-workspaces", "1.5"]), /positive integer/);
});

const UNUSABLE_SECRETS: [string, RegExp][] = [
  ["", /expected a non-empty value/],
  [" ", /must not start or end with whitespace/],
  ["   \t", /must not start or end with whitespace/],
  [" s3cret-with-a-space-before", /must not start or end with whitespace/],
  ["s3cret-with-a-newline-after\n", /must not start or end with whitespace/],
  ["s3cret\u0000with-a-nul-inside", /printable ASCII/],
  ["s\u00e9cret-not-ascii-at-all", /printable ASCII/],
];

test("parseFlags() refuses a secret that could never match, from --secret and BROKER_SECRET alike", () => {
  for (const [secret, problem] of UNUSABLE_SECRETS) {
    const what = JSON.stringify(secret);
    assert.throws(
      () => parseFlags(["--secret", secret]),
      (error: unknown) =>
        error instanceof UsageError && /^Invalid --secret: /.test(error.message) &&
        problem.test(error.message),
      `--secret ${what}`,
    );
    assert.throws(
      () => parseFlags([], { BROKER_SECRET: secret }),
      (error: unknown) =>
        error instanceof UsageError && /^Invalid BROKER_SECRET: /.test(error.message) &&
        problem.test(error.message),
      `BROKER_SECRET=${what}`,
    );
  }
  assert.throws(() => parseFlags([], { BROKER_SECRET: "" }), /unset it to have one generated/);
  // Spaces inside are sent and compared as they are.
  const inner = parseFlags([], { BROKER_SECRET: "correct horse battery staple" });
  assert.ok(!inner.help);
  assert.equal(inner.options.secret, "correct horse battery staple");
  // The flag wins, and then the environment is not looked at.
  const flag = parseFlags(["--secret", "from-the-flag-0123"], { BROKER_SECRET: "" });
  assert.ok(!flag.help);
  assert.equal(flag.options.secret, "from-the-flag-0123");
});

test(
  "src/main.ts exits 2 for an empty or whitespace-only BROKER_SECRET or --secret",
  TIMEOUT,
  async () => {
    const cases: [string[], Record<string, string>, RegExp][] = [
      [[], { BROKER_SECRET: "" }, /Invalid BROKER_SECRET: expected a non-empty value/],
      [[], { BROKER_SECRET: "  " }, /Invalid BROKER_SECRET: must not start or end with whitespace/],
      [["--secret", ""], {}, /Invalid --secret: expected a non-empty value/],
      [["--secret", " "], {}, /Invalid --secret: must not start or end with whitespace/],
    ];
    await Promise.all(cases.map(async ([args, env, message]) => {
      const broker = spawnBroker(args, childEnv(env));
      const what = `${args.join(" ")} ${JSON.stringify(env)}`;
      assert.deepEqual(await broker.status, { code: 2, signal: null }, what);
      assert.match(broker.lines.join("\n"), message, what);
      assert.equal(broker.lines.some((line) => line.includes('"msg":"listening"')), false);
    }));
  },
);

/**
 * Runs main() in this process on a free port with no codex, until it listens, then stops it.
 *
 * @returns Its exit code and the JSON records it wrote to stderr.
 */
async function runMain(
  args: string[],
  env: Record<string, string | undefined>,
): Promise<{ code: number; records: Record<string, unknown>[] }> {
  const dir = await realpath(await mkdtemp(join(tmpdir(), "main-test-")));
  const lines: string[] = [];
  const stop = new AbortController();
  try {
    const code = await main(
      ["--port", "0", "--workspaces-dir", join(dir, "ws"), "--codex", "no-such-codex", ...args],
      {
        env,
        handleSignals: false,
        signal: stop.signal,
        stderr: (text) => {
          lines.push(...text.split("\n").filter((line) => line !== ""));
          if (text.includes('"msg":"listening"')) stop.abort();
        },
      },
    );
    for (const line of lines) assert.doesNotThrow(() => JSON.parse(line), line);
    return { code, records: lines.map((line) => JSON.parse(line)) };
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

test(
  "main() warns in a JSON line about a secret shorter than 16 bytes, and not about one of 16",
  TIMEOUT,
  async () => {
    const short = await runMain([], { BROKER_SECRET: "fifteen-bytes.." });
    assert.equal(short.code, 0);
    const warning = short.records.find((r) => r.msg === "short secret");
    assert.equal(warning?.level, "warn");
    assert.equal(warning?.bytes, 15);
    assert.ok(
      !JSON.stringify(short.records).includes("fifteen-bytes.."),
      "the secret is not logged",
    );
    const flag = await runMain(["--secret", "short"], {});
    assert.equal(flag.records.find((r) => r.msg === "short secret")?.bytes, 5);
    const enough = await runMain([], { BROKER_SECRET: "sixteen-bytes..." });
    assert.equal(enough.code, 0);
    assert.equal(enough.records.some((r) => r.msg === "short secret"), false);
    assert.ok(enough.records.some((r) => r.msg === "listening"));
  },
);

test("startBroker() refuses a secret that could never match with a TypeError, before it listens", async () => {
  for (const secret of ["", " ", "trailing-space "]) {
    await assert.rejects(
      startBroker({ secret, port: 0, workspacesDir: join(tmpdir(), "never-created") }),
      (error: unknown) => error instanceof TypeError && /Cannot start broker/.test(error.message),
      JSON.stringify(secret),
    );
  }
});

/**
 * Where root finds a directory that exists and refuses new entries: `/sys`, where sysfs
 * refuses to create files even for root (root ignores permission bits). `undefined` if
 * this machine has none; anyone else gets a temporary directory without write permission.
 */
const ROOT_UNWRITABLE_DIR: string | undefined = (() => {
  if (process.getuid?.() !== 0 || !existsSync("/sys")) return undefined;
  try {
    writeFileSync("/sys/.main-test-probe", "");
    rmSync("/sys/.main-test-probe", { force: true });
    return undefined;
  } catch {
    return "/sys";
  }
})();
const IS_ROOT = process.getuid?.() === 0;

test(
  "main() exits 1 when --workspaces-dir exists but is not writable, naming the path and the reason",
  { ...TIMEOUT, skip: IS_ROOT && ROOT_UNWRITABLE_DIR === undefined },
  async () => {
    const path = ROOT_UNWRITABLE_DIR ??
      await realpath(await mkdtemp(join(tmpdir(), "main-test-ro-")));
    if (path !== ROOT_UNWRITABLE_DIR) await chmod(path, 0o555);
    try {
      const { code, records } = await runMain(["--workspaces-dir", path], {
        BROKER_SECRET: SECRET,
      });
      assert.equal(code, 1);
      assert.equal(records.some((r) => r.msg === "listening"), false);
      const failure = records.find((r) => r.msg === "cannot start");
      assert.equal(failure?.level, "error");
      const message = String(failure?.error);
      assert.ok(message.includes(`the workspaces dir ${path} is not writable`), message);
      assert.match(message, /EACCES|EPERM|EROFS|permission denied|read-only/i);
    } finally {
      if (path !== ROOT_UNWRITABLE_DIR) await rm(path, { recursive: true, force: true });
    }
  },
);

test(
  "main() exits 1 when --workspaces-dir cannot be created, naming the path and the reason",
  TIMEOUT,
  async () => {
    const dir = await realpath(await mkdtemp(join(tmpdir(), "main-test-")));
    try {
      // A path under a regular file: ENOTDIR, for root too.
      await writeFile(join(dir, "file"), "");
      const path = join(dir, "file", "workspaces");
      const { code, records } = await runMain(["--workspaces-dir", path], {
        BROKER_SECRET: SECRET,
      });
      assert.equal(code, 1);
      const message = String(records.find((r) => r.msg === "cannot start")?.error);
      assert.ok(message.includes(`the workspaces dir ${path} cannot be created`), message);
      assert.match(message, /ENOTDIR|not a directory/i);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  },
);

test(
  "main() exits 1 when the port is in use, naming the address and the reason",
  TIMEOUT,
  async () => {
    const taken = createServer();
    await new Promise<void>((resolve) => taken.listen(0, "127.0.0.1", resolve));
    const { port } = taken.address() as AddressInfo;
    try {
      const { code, records } = await runMain(["--port", String(port)], { BROKER_SECRET: SECRET });
      assert.equal(code, 1);
      assert.equal(records.some((r) => r.msg === "listening"), false);
      const failure = records.find((r) => r.msg === "cannot start");
      assert.equal(failure?.level, "error");
      assert.equal(
        failure?.error,
        `Cannot start broker: cannot listen on 127.0.0.1:${port}: the address is already in use ` +
          "(EADDRINUSE): another process listens there; stop it or choose another --port",
      );
    } finally {
      await new Promise((resolve) => taken.close(resolve));
    }
  },
);

test(
  "codex knows the loopback model: a streamed turn carries no 'Model metadata … not found' warning",
  TIMEOUT,
  async () => {
    const fx = await startFixture();
    try {
      const response = await turnRequest(fx.url, HELLO, {
        "x-internal-secret": SECRET,
        accept: "text/event-stream",
      });
      const text = await response.text();
      assert.match(text, /event: result\ndata: \{"threadId"/);
      const warnings = text.split("\n\n").filter((frame) => frame.startsWith("event: warning"));
      assert.deepEqual(warnings.filter((w) => w.includes("Model metadata")), [], text);
    } finally {
      await fx.cleanup();
    }
  },
);

test(
  "src/main.ts takes a SIGINT that arrives twice at once (the terminal's and npm's copies) as one, and lets the turn finish",
  TIMEOUT,
  async () => {
    const fx = await startFixture({
      respond: () => ({ type: "message", text: "worth the wait", delayMs: 600 }),
    });
    try {
      const pending = turnRequest(fx.url, HELLO);
      await fx.model.waitForRequests(1);
      fx.broker.kill("SIGINT");
      // Apart enough that the kernel delivers two signals, not one pending one.
      await new Promise((resolve) => setTimeout(resolve, 50));
      fx.broker.kill("SIGINT");
      const response = await pending;
      assert.equal(response.status, 200);
      const body = await response.json();
      assert.equal(body.turn.status, "completed", "the grace period was not cut short");
      assert.deepEqual(await fx.broker.status, { code: 0, signal: null });
    } finally {
      await fx.cleanup();
    }
  },
);

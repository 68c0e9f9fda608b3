// The broker against the real codex when codex cannot work: the start-up credentials check,
// the last error codex reported for a turn, and the OPENAI_API_KEY route.
import { test } from "./_test.ts";
import assert from "node:assert/strict";
import { existsSync, readFileSync } from "node:fs";
import { mkdtemp, realpath, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import process from "node:process";
import { type Broker, type LogEntry, startBroker } from "../src/main.ts";
import { writeApiKeyLogin } from "../src/_credentials.ts";
import { childEnv, commandLine, descendants, records, spawnBroker } from "./_broker_process.ts";
import { type CodexHomeOptions, makeCodexHome, type TempCodexHome } from "./_codex_home.ts";
import { type MockModel, type MockModelOptions, reply, startMockModel } from "./_mock_model.ts";

const SECRET = "test-secret-5a1e-credentials";
const TIMEOUT = { timeout: 30_000 };
const HELLO = {
  workspaceId: "ws-1",
  params: { input: [{ type: "text", text: "hello", text_elements: [] }] },
};

function codexChildren(): number[] {
  return descendants(process.pid).filter((pid) => /codex/.test(commandLine(pid)));
}

interface Setup {
  dir: string;
  broker: Broker;
  logs: LogEntry[];
  cleanup(): Promise<void>;
}

/** A broker on `codexHome` (in process), logging into `logs`. */
async function brokerOn(
  codexHome: string,
  options: { checkCredentials?: boolean } = {},
): Promise<Setup> {
  const dir = await realpath(await mkdtemp(join(tmpdir(), "credentials-test-")));
  const logs: LogEntry[] = [];
  const broker = await startBroker({
    secret: SECRET,
    port: 0,
    workspacesDir: join(dir, "workspaces"),
    codexHome,
    log: (entry) => logs.push(entry),
    ...options,
  });
  return {
    dir,
    broker,
    logs,
    async cleanup() {
      await broker.close();
      await rm(dir, { recursive: true, force: true });
    },
  };
}

async function mockSetup(
  modelOptions: MockModelOptions,
  homeOptions: CodexHomeOptions = {},
): Promise<{ model: MockModel; home: TempCodexHome; close(): Promise<void> }> {
  const model = await startMockModel(modelOptions);
  const home = await makeCodexHome(model.baseUrl, homeOptions);
  return {
    model,
    home,
    async close() {
      await model.close();
      await home.cleanup();
    },
  };
}

function turn(url: string, body: Record<string, unknown>): Promise<Response> {
  return fetch(`${url}/api/turns`, {
    method: "POST",
    headers: { "content-type": "application/json", "x-internal-secret": SECRET },
    body: JSON.stringify(body),
  });
}

async function healthz(url: string): Promise<Record<string, unknown>> {
  const response = await fetch(`${url}/healthz`);
  return await response.json();
}

// --- the start-up check ------------------------------------------------------------------

test(
  "startBroker() warns once, with what to run, when codex has no credentials, and /healthz says missing",
  TIMEOUT,
  async () => {
    const empty = await realpath(await mkdtemp(join(tmpdir(), "empty-codex-home-")));
    const setup = await brokerOn(empty);
    try {
      assert.equal(await setup.broker.credentials, "missing");
      const warnings = setup.logs.filter((entry) => entry.msg === "codex has no credentials");
      assert.equal(warnings.length, 1, JSON.stringify(setup.logs));
      const [warning] = warnings;
      assert.equal(warning!.level, "warn");
      assert.equal(warning!.codexHome, empty);
      assert.match(String(warning!.hint), /npx codex login/);
      assert.match(
        String(warning!.hint),
        new RegExp(`CODEX_HOME=${empty} npx codex login --with-api-key`),
      );
      assert.match(String(warning!.hint), /OPENAI_API_KEY/);
      assert.deepEqual((await healthz(setup.broker.url)).codex, { credentials: "missing" });
      // The check used a copy: codex wrote nothing into the operator's home.
      assert.equal(existsSync(join(empty, "installation_id")), false);
    } finally {
      await setup.cleanup();
      await rm(empty, { recursive: true, force: true });
    }
    assert.deepEqual(codexChildren(), [], "the throwaway codex is gone");
  },
);

test(
  "startBroker() does not warn when codex's provider needs no login (the loopback model), and /healthz says ok",
  TIMEOUT,
  async () => {
    const mock = await mockSetup({ respond: reply("hi") });
    const setup = await brokerOn(mock.home.path);
    try {
      assert.equal(await setup.broker.credentials, "ok");
      assert.deepEqual(setup.logs.filter((entry) => entry.level !== "info"), []);
      assert.deepEqual((await healthz(setup.broker.url)).codex, { credentials: "ok" });
    } finally {
      await setup.cleanup();
      await mock.close();
    }
    assert.deepEqual(codexChildren(), []);
  },
);

test(
  "Broker.close() right after start stops the throwaway codex of the credentials check, and says unknown",
  TIMEOUT,
  async () => {
    const empty = await realpath(await mkdtemp(join(tmpdir(), "empty-codex-home-")));
    const setup = await brokerOn(empty);
    try {
      assert.deepEqual((await healthz(setup.broker.url)).codex, { credentials: "unknown" });
    } finally {
      await setup.cleanup();
      await rm(empty, { recursive: true, force: true });
    }
    assert.equal(await setup.broker.credentials, "unknown");
    assert.deepEqual(setup.logs.filter((entry) => entry.level !== "info"), []);
    assert.deepEqual(codexChildren(), [], "no codex left");
  },
);

// --- the last error codex reported ---------------------------------------------------------

test(
  "A turn the provider refuses with 401 fails with codexError.code unauthorized (real codex)",
  TIMEOUT,
  async () => {
    const mock = await mockSetup({ respond: () => ({ type: "error", status: 401 }) });
    const setup = await brokerOn(mock.home.path, { checkCredentials: false });
    try {
      const body = await (await turn(setup.broker.url, HELLO)).json();
      assert.equal(body.turn.status, "failed");
      assert.equal(body.codexError.code, "unauthorized");
      assert.equal(body.codexError.httpStatusCode, 401);
      assert.deepEqual(body.codexError.codexErrorInfo, body.turn.error.codexErrorInfo);
      assert.equal(body.codexError.message, body.turn.error.message);
    } finally {
      await setup.cleanup();
      await mock.close();
    }
  },
);

test(
  "A turn that times out while codex retries the provider carries codex's last 'Reconnecting' error (real codex)",
  TIMEOUT,
  async () => {
    const mock = await mockSetup(
      { respond: () => ({ type: "error", status: 500 }) },
      { streamMaxRetries: 10 },
    );
    const setup = await brokerOn(mock.home.path, { checkCredentials: false });
    try {
      const body = await (await turn(setup.broker.url, { ...HELLO, timeoutMs: 2_000 })).json();
      assert.equal(body.transport?.code, "brokerTimeout", JSON.stringify(body));
      const { codexError } = body.transport;
      assert.match(codexError.message, /^Reconnecting\.\.\. \d+\/10$/);
      assert.equal(codexError.willRetry, true);
      assert.equal(codexError.code, "responseStreamDisconnected");
      assert.match(
        body.transport.message,
        /did not complete in time; codex last reported: Reconnecting\.\.\. \d+\/10$/,
      );
    } finally {
      await setup.cleanup();
      await mock.close();
    }
  },
);

// --- OPENAI_API_KEY ----------------------------------------------------------------------

test(
  "OPENAI_API_KEY in the broker's environment reaches a provider that requires the bearer key",
  TIMEOUT,
  async () => {
    const key = "sk-test-broker-key-1234";
    const mock = await mockSetup({ respond: reply("hello with a key"), requireKey: key }, {
      requiresOpenaiAuth: true,
    });
    const dir = await realpath(await mkdtemp(join(tmpdir(), "credentials-test-")));
    const broker = spawnBroker([
      "--port",
      "0",
      "--workspaces-dir",
      join(dir, "workspaces"),
      "--codex-home",
      mock.home.path,
      "--secret",
      SECRET,
    ], childEnv({ OPENAI_API_KEY: key }));
    try {
      const line = await broker.waitForLine((l) => l.includes('"msg":"listening"'), "listening");
      const url = JSON.parse(line).url as string;
      const body = await (await turn(url, HELLO)).json();
      assert.equal(body.turn?.status, "completed", JSON.stringify(body));
      assert.equal(body.turn.items.at(-1).text, "hello with a key");
      assert.equal(mock.model.requests.length, 1);
      // Stored as `codex login --with-api-key` stores it, owner-only.
      const auth = join(dir, "workspaces", "ws-1", "codex-home", "auth.json");
      assert.deepEqual(JSON.parse(readFileSync(auth, "utf8")), {
        auth_mode: "apikey",
        OPENAI_API_KEY: key,
      });
      // The start-up check saw the key too.
      await waitForHealth(url);
      assert.deepEqual((await healthz(url)).codex, { credentials: "ok" });
      assert.equal(records(broker.lines).some((r) => r.msg === "codex has no credentials"), false);
    } finally {
      broker.kill("SIGTERM");
      await broker.status;
      await mock.close();
      await rm(dir, { recursive: true, force: true });
    }
  },
);

/** Waits (in short steps) until /healthz no longer says `unknown`. */
async function waitForHealth(url: string): Promise<void> {
  for (let i = 0; i < 100; i++) {
    const codex = (await healthz(url)).codex as { credentials: string };
    if (codex.credentials !== "unknown") return;
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  throw new Error("the credentials check did not answer within 5 s");
}

test("writeApiKeyLogin() keeps a login the codex home already has", async () => {
  const home = await mkdtemp(join(tmpdir(), "codex-home-login-"));
  try {
    assert.equal(await writeApiKeyLogin(home, "sk-first"), true);
    assert.equal(await writeApiKeyLogin(home, "sk-second"), false);
    const auth = JSON.parse(readFileSync(join(home, "auth.json"), "utf8"));
    assert.equal(auth.OPENAI_API_KEY, "sk-first");
  } finally {
    await rm(home, { recursive: true, force: true });
  }
});

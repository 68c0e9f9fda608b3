/**
 * Asks codex, once, whether the configuration the workspaces will get lets it reach its
 * model: a throwaway `codex app-server` over stdio, on a temporary copy of the template home,
 * answers `account/read`. Runtime-specific (`node:child_process`).
 *
 * @module
 */

import { spawn } from "node:child_process";
import { existsSync } from "node:fs";
import { chmod, mkdtemp, rename, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import process from "node:process";
import { copyCodexHomeTemplate } from "./_codex_home.ts";

/** What codex said about its credentials. */
export type CredentialsState = "ok" | "missing" | "unknown";

/** The outcome of {@linkcode checkCodexCredentials}. */
export interface CredentialsReport {
  /**
   * `ok`: codex has a login, or its model provider needs none. `missing`: its provider needs
   * an OpenAI login and there is none. `unknown`: codex could not be asked (see `error`).
   */
  state: CredentialsState;
  /** The kind of login codex has (`apiKey`, `chatgpt`, …), or `null`. */
  account: string | null;
  /** Whether codex's model provider needs an OpenAI login. */
  requiresOpenaiAuth: boolean | null;
  /** Why the state is `unknown`. */
  error?: string;
}

/** Options for {@linkcode checkCodexCredentials}. */
export interface CheckCredentialsOptions {
  /** The codex executable. */
  command: string;
  /** The environment codex runs with (`CODEX_HOME` is set by the check). */
  env: Record<string, string>;
  /** Gives up with `unknown` after this long. */
  timeoutMs: number;
  /** Aborting it stops the check (and its codex) at once, with `unknown`. */
  signal?: AbortSignal;
}

const READ_ID = 2;
const AUTH_FILE = "auth.json";
// After SIGTERM, how long the throwaway codex gets before SIGKILL.
const KILL_AFTER_MS = 1_000;

/**
 * Starts a throwaway codex on a copy of `template` (config and credentials only, plus the
 * API-key login the supervisor would write from `OPENAI_API_KEY`), asks `account/read`, and
 * stops it by pid. Never rejects.
 *
 * @param template The operator's codex home, or `undefined` if there is none.
 * @param options The command, its environment, the time bound and a stop signal.
 * @returns What codex answered, once its process has exited and its home is removed.
 */
export async function checkCodexCredentials(
  template: string | undefined,
  options: CheckCredentialsOptions,
): Promise<CredentialsReport> {
  const unknown = (error: string): CredentialsReport => ({
    state: "unknown",
    account: null,
    requiresOpenaiAuth: null,
    error,
  });
  let home: string | undefined;
  try {
    home = await mkdtemp(join(tmpdir(), "codex-broker-check-"));
    if (template !== undefined && existsSync(template)) {
      await copyCodexHomeTemplate(template, home);
    }
    const key = options.env.OPENAI_API_KEY;
    if (key) await writeApiKeyLogin(home, key);
    const answer = await askAccount(home, options);
    if (typeof answer === "string") return unknown(answer);
    const account = typeof answer.account?.type === "string" ? answer.account.type : null;
    const requires = answer.requiresOpenaiAuth === true;
    return {
      state: requires && account === null ? "missing" : "ok",
      account,
      requiresOpenaiAuth: requires,
    };
  } catch (error) {
    return unknown(error instanceof Error ? error.message : String(error));
  } finally {
    if (home !== undefined) await rm(home, { recursive: true, force: true }).catch(() => {});
  }
}

interface AccountAnswer {
  account?: { type?: unknown } | null;
  requiresOpenaiAuth?: unknown;
}

/** The `account/read` result, or why there is none. Resolves once codex has exited. */
function askAccount(
  home: string,
  options: CheckCredentialsOptions,
): Promise<AccountAnswer | string> {
  return new Promise((resolve) => {
    let result: AccountAnswer | string | undefined;
    let exited = false;
    let killTimer: ReturnType<typeof setTimeout> | undefined;
    const child = spawn(options.command, ["app-server"], {
      env: { ...options.env, CODEX_HOME: home },
      stdio: ["pipe", "pipe", "ignore"],
    });
    const finish = (value: AccountAnswer | string) => {
      if (result !== undefined) return;
      result = value;
      clearTimeout(deadline);
      options.signal?.removeEventListener("abort", onAbort);
      if (exited) {
        resolve(value);
        return;
      }
      // By pid, and SIGKILL if it lingers: nothing of the check may outlive it.
      child.stdin?.end();
      const pid = child.pid;
      if (pid !== undefined) {
        try {
          process.kill(pid, "SIGTERM");
        } catch {
          // Already gone.
        }
        killTimer = setTimeout(() => {
          try {
            process.kill(pid, "SIGKILL");
          } catch {
            // Already gone.
          }
        }, KILL_AFTER_MS);
      }
    };
    const onAbort = () => finish("the check was stopped");
    const deadline = setTimeout(
      () => finish(`codex did not answer account/read within ${options.timeoutMs} ms`),
      options.timeoutMs,
    );
    options.signal?.addEventListener("abort", onAbort, { once: true });
    if (options.signal?.aborted) onAbort();
    child.on("error", (error) => {
      exited = true;
      finish(`cannot run ${options.command}: ${error.message}`);
      resolve(result!);
    });
    child.on("exit", () => {
      exited = true;
      clearTimeout(killTimer);
      finish("codex exited before it answered account/read");
      resolve(result!);
    });
    child.stdin?.on("error", () => {});
    let buffered = "";
    child.stdout?.setEncoding("utf8");
    child.stdout?.on("data", (chunk: string) => {
      buffered += chunk;
      let newline: number;
      while ((newline = buffered.indexOf("\n")) >= 0) {
        const line = buffered.slice(0, newline);
        buffered = buffered.slice(newline + 1);
        let message: { id?: unknown; method?: unknown; result?: unknown; error?: unknown };
        try {
          message = JSON.parse(line);
        } catch {
          continue;
        }
        if (message.id !== READ_ID || "method" in message) continue;
        if (message.result && typeof message.result === "object") {
          finish(message.result as AccountAnswer);
        } else {
          finish(`account/read failed: ${JSON.stringify(message.error ?? null)}`);
        }
      }
    });
    const send = (message: unknown) => child.stdin?.write(`${JSON.stringify(message)}\n`);
    send({
      id: 1,
      method: "initialize",
      params: {
        clientInfo: { name: "codex-broker", title: "codex-broker", version: "0" },
        capabilities: null,
      },
    });
    send({ method: "initialized" });
    send({ id: READ_ID, method: "account/read", params: {} });
  });
}

/**
 * Writes into `home` the login `codex login --with-api-key` writes (checked with codex
 * 0.169: `{ "auth_mode": "apikey", "OPENAI_API_KEY": key }`, mode 0600), unless `home`
 * already has an `auth.json`: a login the operator made wins over the environment. codex
 * 0.169 does not read `OPENAI_API_KEY` from its environment for its OpenAI login.
 *
 * @param home A codex home.
 * @param key The API key.
 * @returns Whether it wrote the file.
 */
export async function writeApiKeyLogin(home: string, key: string): Promise<boolean> {
  const path = join(home, AUTH_FILE);
  if (existsSync(path)) return false;
  const temporary = `${path}.${process.pid}.${Date.now()}.tmp`;
  const body = `${JSON.stringify({ auth_mode: "apikey", OPENAI_API_KEY: key }, null, 2)}\n`;
  try {
    await writeFile(temporary, body, { mode: 0o600, flag: "wx" });
    await chmod(temporary, 0o600);
    await rename(temporary, path);
  } catch (error) {
    await rm(temporary, { force: true }).catch(() => {});
    throw error;
  }
  return true;
}

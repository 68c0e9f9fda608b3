/**
 * Seeds a workspace's own `CODEX_HOME` from the operator's (the template): configuration
 * and credentials only, never what codex keeps about its threads. Each workspace keeps its
 * threads, rollouts and SQLite files in a home of its own, so the workspace moves between
 * machines as one directory and concurrent codex starts never contend on one database.
 *
 * @module
 */

import type { Stats } from "node:fs";
import {
  chmod,
  mkdir,
  readdir,
  readFile,
  rename,
  rm,
  stat,
  utimes,
  writeFile,
} from "node:fs/promises";
import { join } from "node:path";

/**
 * What is copied from the template, by name at its top level. Directories are copied file
 * by file, skipping hidden entries (codex installs its own `skills/.system`). Anything
 * else (`sessions/`, `archived_sessions/`, `log/`, `history.jsonl`, `*.sqlite`,
 * `installation_id`, …) stays out of the workspace's home.
 */
export const TEMPLATE_ENTRIES: readonly string[] = [
  "config.toml",
  "auth.json",
  // Where codex keeps MCP OAuth tokens when they are stored in a file.
  ".credentials.json",
  "AGENTS.md",
  "AGENTS.override.md",
  "hooks.json",
  "agents",
  "prompts",
  "rules",
  "skills",
];

// Credentials: owner read/write only, whatever the template's mode.
const SECRET_FILES = new Set(["auth.json", ".credentials.json"]);
// Two modification times this close are the same (see copyEntry).
const MTIME_SLACK_MS = 1;
// Guards against a symbolic link loop inside a copied directory.
const MAX_DEPTH = 16;

/**
 * Copies the template's configuration into a workspace's codex home. For each file, the
 * copy with the newer modification time wins: the template's replaces the workspace's when
 * the template is newer (an edit, or `codex login` run again), and the workspace's is kept
 * when codex wrote it later (a refreshed login token, a rule codex added). A copy keeps the
 * template's modification time, so the next comparison is fair. Files the template does
 * not have are left in the workspace. Each file is written to a temporary name and renamed
 * into place, so codex never reads half a file; files are owner-only (credentials 0600),
 * directories 0700.
 *
 * @param template The operator's codex home.
 * @param home The workspace's codex home; created if missing.
 * @returns Once every entry is up to date.
 * @throws {Error} If the template cannot be read or a file cannot be written.
 */
export async function copyCodexHomeTemplate(template: string, home: string): Promise<void> {
  const templateStat = await stat(template);
  if (!templateStat.isDirectory()) {
    throw new Error(`Cannot copy the codex home template ${template}: not a directory`);
  }
  await mkdir(home, { recursive: true, mode: 0o700 });
  await chmod(home, 0o700);
  for (const name of TEMPLATE_ENTRIES) {
    await copyEntry(join(template, name), join(home, name), SECRET_FILES.has(name), 0);
  }
}

async function copyEntry(
  from: string,
  to: string,
  secret: boolean,
  depth: number,
): Promise<void> {
  let source: Stats;
  try {
    // Follows symbolic links: an operator may link config.toml from elsewhere.
    source = await stat(from);
  } catch (error) {
    if (codeOf(error) === "ENOENT") return;
    throw error;
  }
  if (source.isDirectory()) {
    if (depth >= MAX_DEPTH) return;
    await mkdir(to, { recursive: true, mode: 0o700 });
    for (const name of (await readdir(from)).sort()) {
      if (name.startsWith(".")) continue;
      await copyEntry(join(from, name), join(to, name), secret, depth + 1);
    }
    return;
  }
  if (!source.isFile()) return;
  const target = await stat(to).catch((error) => {
    if (codeOf(error) === "ENOENT") return undefined;
    throw error;
  });
  // A copy carries the template's time, but runtimes pass it to the kernel as floating
  // point seconds, which can lose up to a millisecond.
  if (target && target.mtimeMs + MTIME_SLACK_MS >= source.mtimeMs) return;
  const mode = secret ? 0o600 : source.mode & 0o700 | 0o600;
  const temporary = `${to}.${randomSuffix()}.tmp`;
  try {
    await writeFile(temporary, await readFile(from), { mode, flag: "wx" });
    await chmod(temporary, mode);
    await utimes(temporary, source.atime, source.mtime);
    await rename(temporary, to);
  } catch (error) {
    await rm(temporary, { force: true }).catch(() => {});
    throw error;
  }
}

function codeOf(error: unknown): unknown {
  return (error as { code?: unknown } | null)?.code;
}

function randomSuffix(): string {
  const bytes = crypto.getRandomValues(new Uint8Array(6));
  return Array.from(bytes, (byte) => byte.toString(16).padStart(2, "0")).join("");
}

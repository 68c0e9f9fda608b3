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
import { dirname, join } from "node:path";

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

/** Options for {@linkcode copyCodexHomeTemplate}. */
export interface CopyCodexHomeOptions {
  /**
   * Write the files that need updating here instead (an empty directory this process owns,
   * under the same relative paths), leaving `home` untouched, which is then only read
   * (`stat`). For a `home` owned by another user: the caller gives it the staged files and
   * lets that user copy them over (`cp -Rp`), so that this process never writes through
   * directories that user controls.
   */
  into?: string;
}

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
 * @example Refresh a workspace's home from the operator's
 * ```ts ignore
 * await copyCodexHomeTemplate("/etc/codex-broker/codex-home", "/srv/ws/ws-1/codex-home");
 * ```
 *
 * @param template The operator's codex home.
 * @param home The workspace's codex home; created if missing (unless `options.into`).
 * @param options Where to stage the updates instead of writing them into `home`.
 * @returns Once every entry is up to date (or staged).
 * @throws {Error} If the template cannot be read or a file cannot be written.
 */
export async function copyCodexHomeTemplate(
  template: string,
  home: string,
  options: CopyCodexHomeOptions = {},
): Promise<void> {
  const templateStat = await stat(template);
  if (!templateStat.isDirectory()) {
    throw new Error(`Cannot copy the codex home template ${template}: not a directory`);
  }
  if (options.into === undefined) {
    await mkdir(home, { recursive: true, mode: 0o700 });
    await chmod(home, 0o700);
  }
  for (const name of TEMPLATE_ENTRIES) {
    const to = join(home, name);
    const staged = options.into === undefined ? to : join(options.into, name);
    await copyEntry(join(template, name), { to, staged }, SECRET_FILES.has(name), 0);
  }
}

async function copyEntry(
  from: string,
  paths: { to: string; staged: string },
  secret: boolean,
  depth: number,
): Promise<void> {
  const { to, staged } = paths;
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
    if (staged === to) await mkdir(to, { recursive: true, mode: 0o700 });
    for (const name of (await readdir(from)).sort()) {
      if (name.startsWith(".")) continue;
      const next = { to: join(to, name), staged: join(staged, name) };
      await copyEntry(join(from, name), next, secret, depth + 1);
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
  // Staged directories are made only for a file that needs them.
  if (staged !== to) await mkdir(dirname(staged), { recursive: true, mode: 0o700 });
  const temporary = `${staged}.${randomSuffix()}.tmp`;
  try {
    await writeFile(temporary, await readFile(from), { mode, flag: "wx" });
    await chmod(temporary, mode);
    await utimes(temporary, source.atime, source.mtime);
    await rename(temporary, staged);
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

/**
 * A POSIX `sh` watchdog that ties a codex subprocess to the life of its parent. codex in
 * WebSocket mode neither exits when its stdin closes nor notices that its parent died, so a
 * broker killed with SIGKILL (or by the OOM killer) would leave every codex running, each
 * still listening (an earlier broker also left its capability token on disk). No signal can tell a child that its
 * parent died on every platform; an end-of-file on a pipe that only the parent holds can.
 *
 * The parent spawns `/bin/sh -c WATCHDOG_SCRIPT codex-broker-watchdog RUN_DIR COMMAND ARGS…`
 * with `detached: true` (a process group of its own) and a pipe on stdin that it never
 * writes to. The shell starts a background watcher on a copy of that pipe, then `exec`s
 * the command, which so keeps the shell's pid: the pid the parent sees is codex's, and it
 * is also the process group id. The watcher waits for end-of-file, which comes when the
 * parent closes the pipe or dies, removes `RUN_DIR` (the process record), and
 * sends SIGKILL to the whole group: codex, whatever codex started, and itself.
 *
 * - The watcher ignores SIGTERM, SIGINT and SIGHUP, so a graceful stop (SIGTERM to the
 *   group) reaches codex while the watcher waits. Once codex has exited the parent closes
 *   the pipe, and the watcher cleans up what is left of the group.
 * - The group id stays allocated while the watcher lives (it is a member), so its
 *   `kill -KILL -$$` can never hit a group that reused the number.
 * - SIGKILL to the group (the parent's escalation) kills the watcher too.
 * - The watcher keeps the child's stdout and stderr open until it is gone, so the parent's
 *   `close` event means "codex and its watcher have both exited": a respawn can never race a
 *   watcher that is still removing the previous run directory.
 * - With a `uid` (the broker's `--codex-user`) the watchdog runs as codex's user, so that
 *   no process of the broker's user is within reach of codex's commands; it then cannot
 *   remove the broker's `RUN_DIR` (the next broker's `cleanUpLeftovers` does), and still
 *   kills the group, which is its user's.
 * - Background jobs of a non-interactive `sh` get `/dev/null` as stdin, hence the copy of
 *   the pipe on fd 3, which codex itself does not inherit.
 *
 * @module
 */

import { existsSync } from "node:fs";
import process from "node:process";

/** The shell that runs {@linkcode WATCHDOG_SCRIPT}. */
export const WATCHDOG_SHELL = "/bin/sh";

/** `$0` of the watchdog shell, so it is recognisable in `ps`. */
export const WATCHDOG_NAME = "codex-broker-watchdog";

/**
 * The line the watchdog writes to stderr, before exiting with 127, when the command cannot
 * be found; a direct spawn would have failed with ENOENT instead.
 */
export const COMMAND_NOT_FOUND_PREFIX = `${WATCHDOG_NAME}: command not found: `;

/**
 * The watchdog. Arguments: the run directory to remove, then the command and its arguments.
 * Silent unless the command is missing: the parent keeps codex's stderr for error reports.
 */
export const WATCHDOG_SCRIPT: string = `run_dir=$1
shift
if ! command -v "$1" >/dev/null 2>&1; then
  echo "${COMMAND_NOT_FOUND_PREFIX}$1" >&2
  exit 127
fi
exec 3<&0
(
  trap '' TERM INT HUP
  cat <&3 >/dev/null 2>&1
  rm -rf "$run_dir" >/dev/null 2>&1
  kill -KILL -$$ >/dev/null 2>&1
) </dev/null &
exec "$@" </dev/null 3<&-
`;

/** What to pass to `spawn` to run a command under the watchdog. */
export interface WatchdogSpawn {
  /** The executable: {@linkcode WATCHDOG_SHELL}. */
  command: string;
  /** The shell's arguments, the wrapped command and its arguments included. */
  args: string[];
}

/**
 * Wraps a command in the watchdog. Spawn the result with `detached: true` and
 * `stdio: ["pipe", …]`, keep stdin open while the command runs, and close it once the
 * command has exited.
 *
 * @param runDir The directory the watchdog removes when the parent goes away.
 * @param command The command to run.
 * @param args Its arguments.
 * @returns The shell and its arguments.
 */
export function watchdogSpawn(
  runDir: string,
  command: string,
  args: readonly string[],
): WatchdogSpawn {
  return {
    command: WATCHDOG_SHELL,
    args: ["-c", WATCHDOG_SCRIPT, WATCHDOG_NAME, runDir, command, ...args],
  };
}

/**
 * Whether this platform can run the watchdog: any with a POSIX `/bin/sh` (not Windows,
 * where codex is spawned directly and only the exit hook stops it).
 *
 * @returns True if {@linkcode WATCHDOG_SHELL} exists.
 */
export function canUseWatchdog(): boolean {
  return process.platform !== "win32" && existsSync(WATCHDOG_SHELL);
}

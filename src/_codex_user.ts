/**
 * The Unix user codex runs as with `--codex-user`: looked up by name or uid through
 * `getent passwd` (which also asks NSS: LDAP, systemd's dynamic users), else in
 * `/etc/passwd`. Runtime-specific (`node:child_process`, `node:fs`).
 *
 * @module
 */

import { execFileSync } from "node:child_process";
import { readFileSync } from "node:fs";

/** A Unix user to run codex as: its name, uid and primary gid. */
export interface CodexUser {
  /** The login name. */
  name: string;
  /** The user id. */
  uid: number;
  /** The primary group id. */
  gid: number;
}

/**
 * Looks a user up by name or by numeric uid.
 *
 * @example Find the user codex runs as
 * ```ts ignore
 * lookUpUser("codex"); // { name: "codex", uid: 998, gid: 996 }
 * lookUpUser("no-such-user"); // undefined
 * ```
 *
 * @param nameOrUid A login name, or a uid in decimal.
 * @returns The user, or `undefined` if there is none.
 */
export function lookUpUser(nameOrUid: string): CodexUser | undefined {
  if (!/^[A-Za-z0-9_][A-Za-z0-9_.-]*\$?$/.test(nameOrUid)) return undefined;
  let lines: string[] = [];
  try {
    // Exit 2 means "no such entry"; either way, /etc/passwd gets the last word below.
    lines = execFileSync("getent", ["passwd", nameOrUid], {
      encoding: "utf8",
      stdio: ["ignore", "pipe", "ignore"],
      timeout: 5_000,
    }).split("\n");
  } catch {
    // No getent (macOS, a minimal image), or no such user.
  }
  const found = lines.map(parseLine).find((user) => matches(user, nameOrUid));
  if (found) return found;
  try {
    return readFileSync("/etc/passwd", "utf8").split("\n").map(parseLine)
      .find((user) => matches(user, nameOrUid));
  } catch {
    return undefined;
  }
}

function matches(user: CodexUser | undefined, nameOrUid: string): boolean {
  return user !== undefined &&
    (user.name === nameOrUid || (/^\d+$/.test(nameOrUid) && user.uid === Number(nameOrUid)));
}

/** `name:password:uid:gid:gecos:home:shell`. */
function parseLine(line: string): CodexUser | undefined {
  const [name, , uid, gid] = line.split(":");
  if (!name || !/^\d+$/.test(uid ?? "") || !/^\d+$/.test(gid ?? "")) return undefined;
  return { name, uid: Number(uid), gid: Number(gid) };
}

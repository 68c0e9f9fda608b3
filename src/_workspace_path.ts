/**
 * Where a path a caller gave really leads, for the policy's `cwd` and writable-root checks:
 * resolved the way the kernel would, one component at a time, following symlinks (and `..`
 * after them) on the file system. Runtime-specific (`node:fs`). POSIX paths only, as the
 * supervisor is.
 *
 * @module
 */

import { lstat, readlink } from "node:fs/promises";
import type { WorkspacePathResolver } from "./policy.ts";

// As Linux's MAXSYMLINKS: more hops than this is a loop.
const MAX_SYMLINK_HOPS = 40;

function parent(path: string): string {
  const cut = path.lastIndexOf("/");
  return cut <= 0 ? "/" : path.slice(0, cut);
}

function errorCode(error: unknown): unknown {
  return (error as { code?: unknown } | null)?.code;
}

/**
 * Resolves an absolute path physically: every existing symlink on the way is followed
 * (a `..` after a symlink goes to the parent of its target, as in the kernel), and what
 * does not exist yet is taken as written, since it cannot be a symlink. The result has no
 * `.`, `..` or symlink among its existing components.
 *
 * @param path An absolute path.
 * @returns The resolved path, or `undefined` for a symlink loop or a component that
 * cannot be inspected (permission denied).
 */
export async function resolvePhysically(path: string): Promise<string | undefined> {
  const pending = path.split("/");
  let current = "/";
  let hops = 0;
  // Once a component is missing, nothing below it exists: no more file system calls.
  let missing = false;
  while (pending.length > 0) {
    const part = pending.shift()!;
    if (part === "" || part === ".") continue;
    if (part === "..") {
      current = parent(current);
      continue;
    }
    const next = current === "/" ? `/${part}` : `${current}/${part}`;
    if (missing) {
      current = next;
      continue;
    }
    let isLink: boolean;
    try {
      isLink = (await lstat(next)).isSymbolicLink();
    } catch (error) {
      const code = errorCode(error);
      if (code !== "ENOENT" && code !== "ENOTDIR") return undefined;
      // A missing component can be followed only by more missing ones, unless a `..` climbs
      // back out of it.
      missing = !pending.includes("..");
      current = next;
      continue;
    }
    if (!isLink) {
      current = next;
      continue;
    }
    if (++hops > MAX_SYMLINK_HOPS) return undefined;
    let target: string;
    try {
      target = await readlink(next);
    } catch {
      return undefined;
    }
    // A relative target is read from the link's directory, an absolute one from the root.
    if (target.startsWith("/")) current = "/";
    pending.unshift(...target.split("/"));
  }
  return current;
}

/**
 * The broker's {@linkcode WorkspacePathResolver}: a path (absolute, or relative to the
 * workspace's directory) resolved with {@linkcode resolvePhysically}, accepted if it is the
 * workspace's directory (resolved the same way) or below it.
 *
 * @param workDir The directory of a workspace, e.g. `<workspaces-dir>/<id>/work`.
 * @returns The resolver.
 */
export function workspacePathResolver(
  workDir: (workspaceId: string) => string,
): WorkspacePathResolver {
  return async (path, workspaceId) => {
    const dir = workDir(workspaceId);
    const root = await resolvePhysically(dir);
    // Joined as text, not normalized: `link/..` must go where the file system takes it.
    const resolved = await resolvePhysically(path.startsWith("/") ? path : `${dir}/${path}`);
    if (root === undefined || resolved === undefined) return undefined;
    const inside = resolved === root || resolved.startsWith(root === "/" ? "/" : `${root}/`);
    return inside ? resolved : undefined;
  };
}

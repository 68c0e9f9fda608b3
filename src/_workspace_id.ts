/**
 * Workspace id validation, shared by the supervisor and the REST handler. Web-standard on
 * purpose: the handler must not pull in any runtime-specific module.
 *
 * @module
 */

// Ids become path segments (workspace directory, CODEX_HOME), so the alphabet excludes
// separators and the length is capped well below any file system's name limit.
const WORKSPACE_ID = /^[A-Za-z0-9._-]{1,128}$/;

/**
 * Tells whether a value is a usable workspace id: 1 to 128 characters from `A-Z`, `a-z`,
 * `0-9`, `.`, `_` and `-`, and neither `.` nor `..`.
 *
 * @example Check an id from a request
 * ```ts ignore
 * isValidWorkspaceId("ws-1"); // true
 * isValidWorkspaceId("../etc"); // false
 * ```
 *
 * @param id The value to check.
 * @returns `true` if `id` is a string that is safe to use as a single path segment.
 */
export function isValidWorkspaceId(id: unknown): id is string {
  return typeof id === "string" && WORKSPACE_ID.test(id) && id !== "." && id !== "..";
}

/**
 * Throws unless a value is a usable workspace id (see {@linkcode isValidWorkspaceId}).
 *
 * @example Reject an id before using it in a path
 * ```ts ignore
 * assertWorkspaceId("ws-1"); // passes
 * assertWorkspaceId("a/b"); // throws TypeError
 * ```
 *
 * @param id The value to check.
 * @returns Nothing; narrows `id` to `string` when it returns.
 * @throws {TypeError} If `id` is not a string, is empty, longer than 128 characters, holds a
 * character outside `[A-Za-z0-9._-]`, or is `.` or `..`.
 */
export function assertWorkspaceId(id: unknown): asserts id is string {
  if (isValidWorkspaceId(id)) return;
  if (typeof id !== "string") {
    throw new TypeError(`Invalid workspace id: expected a string, got ${describeType(id)}`);
  }
  // Quote a bounded prefix only: the id may be attacker-sized and ends up in logs.
  const shown = JSON.stringify(id.length > 64 ? `${id.slice(0, 64)}…` : id);
  throw new TypeError(
    `Invalid workspace id ${shown}: expected 1 to 128 characters from A-Z, a-z, 0-9, ".", "_" ` +
      `and "-", other than "." and ".."`,
  );
}

function describeType(value: unknown): string {
  if (value === null) return "null";
  if (Array.isArray(value)) return "an array";
  return typeof value;
}

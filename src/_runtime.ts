/**
 * Which runtime this is, for the few places that must differ. Web-standard: read from
 * `navigator.userAgent` (`Node.js/22…`, `Deno/2…`, `Bun/1…`), so the core can ask too.
 * Internal.
 *
 * @module
 */

/** Whether this runtime is Node (22 or later, which has `navigator`). */
export const IS_NODE: boolean =
  (globalThis as { navigator?: { userAgent?: string } }).navigator?.userAgent
    ?.startsWith("Node.js") ?? false;

/**
 * The service's V8 tuning, on Node. Runtime-specific (`node:` modules).
 *
 * @module
 */

import { setFlagsFromString } from "node:v8";
import { IS_NODE } from "./_runtime.ts";

/**
 * The V8 flag that turns allocation-site pretenuring on or off.
 *
 * @param mode `"on"` or `"off"`.
 * @returns The flag.
 */
export function pretenuringFlag(mode: "on" | "off"): string {
  return mode === "on" ? "--allocation-site-pretenuring" : "--no-allocation-site-pretenuring";
}

/**
 * Turns V8's allocation-site pretenuring on or off for the whole process, on Node; elsewhere
 * it does nothing: Node's V8 takes flags set after it started, Deno's does not (its
 * `setFlagsFromString` changes nothing that runs: `npm start` gives deno
 * `--v8-flags=--no-allocation-site-pretenuring` instead), and Bun runs JavaScriptCore.
 *
 * Why off for the broker: V8 decides per allocation site (an object literal in the code)
 * to allocate straight in the old generation once most of a site's objects outlive a
 * young-generation collection. Under load a few of the sites of a turn get that decision
 * (from a collection while many turns were in flight) and keep it; their objects then die
 * in the old generation, and until the next full collection they keep the young objects
 * they point to alive, which are promoted in turn: most of every turn's objects reached the
 * old generation, and the broker's CPU per turn with an instant codex varied from one start
 * to the next. Set before the server starts, V8 only reads it when it collects garbage.
 *
 * @param mode `"on"` or `"off"`.
 */
export function setV8Pretenuring(mode: "on" | "off"): void {
  if (IS_NODE) setFlagsFromString(pretenuringFlag(mode));
}

/**
 * The bench's side channel to the fake server, kept apart from `_fake_server.ts` so the
 * client process does not load the server's code (`ws`, `node:http`) when the server runs
 * in its own process.
 *
 * @module
 */

/** Method the bench's control connection calls to read the server process's CPU time. */
export const CPU_METHOD = "bench/cpu";

/** Result of {@linkcode CPU_METHOD}: the server process's CPU time so far, µs. */
export interface ServerCpu {
  user: number;
  system: number;
}

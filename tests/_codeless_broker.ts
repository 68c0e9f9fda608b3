// The options of a broker that never gets as far as codex: the tests that use it check what is
// refused or answered before a turn reaches the pool, so its codex is a path that does not exist.
import { join } from "node:path";
import type { BrokerOptions } from "../src/main.ts";

/** Options for `startBroker()` on a free port under `dir`, with no codex and no credentials check. */
export function codelessBroker(dir: string, secret: string): BrokerOptions {
  return {
    secret,
    port: 0,
    workspacesDir: join(dir, "workspaces"),
    codex: join(dir, "no-such-codex"),
    checkCredentials: false,
  };
}

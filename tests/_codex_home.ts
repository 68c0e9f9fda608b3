/**
 * A throwaway `CODEX_HOME` whose config.toml points codex at a loopback model provider
 * (see `_mock_model.ts`), so tests never touch the user's own codex configuration.
 *
 * @example Give every workspace of a resolver the same temporary home
 * ```ts ignore
 * const model = await startMockModel();
 * const home = await makeCodexHome(model.baseUrl);
 * const resolver = createCodexResolver({ codexHome: () => home.path });
 * // …
 * await resolver.close();
 * await home.cleanup();
 * await model.close();
 * ```
 *
 * @module
 */

import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";

/** A temporary codex home directory. */
export interface TempCodexHome {
  /** Absolute path of the directory; use it as `CODEX_HOME`. */
  readonly path: string;
  /** Removes the directory and everything codex wrote into it. */
  cleanup(): Promise<void>;
}

/** Options for {@linkcode makeCodexHome}. */
export interface CodexHomeOptions {
  /**
   * TOML appended after the `[model_providers.mock]` table, so start it with a table
   * header (e.g. `[features]`); top-level keys written here would land in that table.
   */
  extraToml?: string;
}

/**
 * Creates a temporary `CODEX_HOME` with model `mock-model` served by provider `mock` at
 * `baseUrl`, with retries turned off so a failing mock fails a turn at once.
 *
 * @example Set it for a single codex process
 * ```ts ignore
 * const home = await makeCodexHome(model.baseUrl);
 * const resolver = createCodexResolver({ env: { CODEX_HOME: home.path } });
 * ```
 *
 * @param baseUrl The provider's base URL, e.g. `MockModel.baseUrl`
 * (`http://127.0.0.1:PORT/v1`).
 * @param options Extra configuration.
 * @returns The directory and its cleanup function.
 */
export async function makeCodexHome(
  baseUrl: string,
  options: CodexHomeOptions = {},
): Promise<TempCodexHome> {
  const path = await mkdtemp(join(tmpdir(), "codex-home-"));
  const config = [
    `model = "mock-model"`,
    `model_provider = "mock"`,
    ``,
    `[model_providers.mock]`,
    `name = "mock"`,
    `base_url = ${JSON.stringify(baseUrl)}`,
    `wire_api = "responses"`,
    `request_max_retries = 0`,
    `stream_max_retries = 0`,
    ``,
    options.extraToml ?? "",
  ].join("\n");
  await writeFile(join(path, "config.toml"), config);
  return {
    path,
    cleanup: () => rm(path, { recursive: true, force: true }),
  };
}

/**
 * A throwaway `CODEX_HOME` whose config.toml points codex at a loopback model provider
 * (see `_testing_mock_model.ts`), so tests never touch the user's own codex configuration.
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
  /** `request_max_retries` of the mock provider. Defaults to 0: a failing mock fails at once. */
  requestMaxRetries?: number;
  /**
   * `stream_max_retries` of the mock provider. Defaults to 0. codex reports each of these
   * retries to the client as an `error` notification (`Reconnecting... n/m`, `willRetry`).
   */
  streamMaxRetries?: number;
  /**
   * Sets `requires_openai_auth = true` on the mock provider: codex then sends its OpenAI
   * login (an API key) as `Authorization: Bearer`, and reports a missing login.
   */
  requiresOpenaiAuth?: boolean;
}

const MODEL_CATALOG_FILE = "model-catalog.json";

/*
 * codex's catalog (`model_catalog_json`, the shape of its `/models` answer) with the mock
 * model alone: what codex 0.169 assumes for an unknown slug, stated, so it need not warn.
 */
const MOCK_MODEL_CATALOG: { models: Record<string, unknown>[] } = {
  models: [{
    slug: "mock-model",
    display_name: "mock-model",
    description: "The loopback model of the tests and the demo",
    default_reasoning_level: null,
    supported_reasoning_levels: [],
    shell_type: "default",
    visibility: "none",
    supported_in_api: true,
    priority: 99,
    additional_speed_tiers: [],
    service_tiers: [],
    default_service_tier: null,
    availability_nux: null,
    upgrade: null,
    // codex's own prompt would be sent otherwise; the mock reads none of it.
    base_instructions: "You are Codex, a coding agent. This model is a loopback mock.",
    model_messages: null,
    include_skills_usage_instructions: false,
    supports_reasoning_summaries: false,
    default_reasoning_summary: "auto",
    support_verbosity: false,
    default_verbosity: null,
    apply_patch_tool_type: null,
    web_search_tool_type: "text",
    truncation_policy: { mode: "bytes", limit: 10_000 },
    supports_parallel_tool_calls: false,
    supports_image_detail_original: false,
    context_window: 272_000,
    max_context_window: 272_000,
    auto_compact_token_limit: null,
    comp_hash: null,
    effective_context_window_percent: 95,
    experimental_supported_tools: [],
    input_modalities: ["text", "image"],
    supports_search_tool: false,
    use_responses_lite: false,
    auto_review_model_override: null,
    tool_mode: null,
    multi_agent_version: null,
  }],
};

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
  // codex looks a model's metadata (context window, tools, instructions) up in its catalog;
  // for a slug it does not know it warns "Model metadata for `mock-model` not found" at the
  // start of every thread. This catalog makes the mock a model codex knows.
  await writeFile(join(path, MODEL_CATALOG_FILE), JSON.stringify(MOCK_MODEL_CATALOG, null, 2));
  const config = [
    `model = "mock-model"`,
    `model_provider = "mock"`,
    `model_catalog_json = ${JSON.stringify(join(path, MODEL_CATALOG_FILE))}`,
    ``,
    `[model_providers.mock]`,
    `name = "mock"`,
    `base_url = ${JSON.stringify(baseUrl)}`,
    `wire_api = "responses"`,
    `request_max_retries = ${options.requestMaxRetries ?? 0}`,
    `stream_max_retries = ${options.streamMaxRetries ?? 0}`,
    ...(options.requiresOpenaiAuth ? [`requires_openai_auth = true`] : []),
    ``,
    options.extraToml ?? "",
  ].join("\n");
  await writeFile(join(path, "config.toml"), config);
  return {
    path,
    cleanup: () => rm(path, { recursive: true, force: true }),
  };
}

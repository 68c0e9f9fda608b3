// The throwaway CODEX_HOME of the tests is the one ./testing ships (src/_testing_codex_home.ts).
export { makeCodexHome } from "../src/_testing_codex_home.ts";
export type { CodexHomeOptions, TempCodexHome } from "../src/_testing_codex_home.ts";

// What the runner's summary says about the tests themselves: which ran and which were
// skipped on each runtime, read from the runners' own per-test lines. Kept apart from
// tests/_run_all.ts (a script) so that tests/run_summary_test.ts can check it.

/** A runtime the suite runs on. */
export type Runtime = "deno" | "bun" | "node";

/** How each top-level test of a run ended, by name. */
export type Verdicts = Map<string, "ran" | "skipped">;

/**
 * The top-level tests of a run, by name, and whether they ran (passed or failed) or were
 * skipped, read from the runner's per-test lines. The summary uses them to say why the
 * counts of the runtimes differ.
 */
export function verdicts(runtime: Runtime, output: string): Verdicts {
  const found: Verdicts = new Map();
  const add = (re: RegExp, verdict: (word: string) => "ran" | "skipped") => {
    for (const match of output.matchAll(re)) {
      // A test listed again among the failures keeps its first verdict.
      if (!found.has(match[2]!)) found.set(match[2]!, verdict(match[1]!));
    }
  };
  switch (runtime) {
    case "deno":
      add(/^()(\S.*?) \.\.\. (?:ok|FAILED) \(/gm, () => "ran");
      add(/^()(\S.*?) \.\.\. ignored \(/gm, () => "skipped");
      break;
    case "bun":
      add(
        /^\((pass|fail|skip|todo)\) (.*?)(?: \[[\d.]+m?s\])?$/gm,
        (word) => word === "pass" || word === "fail" ? "ran" : "skipped",
      );
      break;
    case "node":
      add(/^(﹣) (.*?) \([\d.]+m?s\) # SKIP$/gm, () => "skipped");
      add(/^(✔|✖) (.*?) \([\d.]+m?s\)$/gm, () => "ran");
      break;
  }
  return found;
}

/**
 * Why the runtimes ran different numbers of tests: for each runtime, the tests it skipped
 * and those it never registered that another runtime ran, by name. Empty if every runtime
 * ran the same tests.
 */
export function countDifferences(byRuntime: Map<Runtime, Verdicts>): string[] {
  const names = new Set<string>();
  for (const found of byRuntime.values()) for (const name of found.keys()) names.add(name);
  const lines: string[] = [];
  for (const [runtime, found] of byRuntime) {
    const skipped = [...names].filter((name) => found.get(name) === "skipped");
    const missing = [...names].filter((name) => !found.has(name));
    for (const name of skipped) lines.push(`${runtime}: skipped: ${name}`);
    for (const name of missing) lines.push(`${runtime}: not run (not registered): ${name}`);
  }
  return lines;
}

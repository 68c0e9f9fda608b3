import { test } from "./_test.ts";
import assert from "node:assert/strict";
import { countDifferences, verdicts } from "./_run_summary.ts";

// Excerpts of what each runner prints for the same three tests, the last skipped on Bun.
const DENO = `running 3 tests from ./tests/x_test.ts
a passes ... ok (3ms)
b fails ... FAILED (5ms)
c is Deno's and Node's ... ok (1ms)
 ERRORS 
b fails => ./tests/_test.ts:37:10
 FAILURES 
b fails => ./tests/_test.ts:37:10
FAILED | 2 passed | 1 failed (40ms)
`;
const BUN = `(pass) a passes [0.50ms]
(fail) b fails [1.20ms]
(skip) c is Deno's and Node's
 1 pass
 1 skip
 1 fail
`;
const NODE = `✔ a passes (1.2ms)
✖ b fails (0.8ms)
﹣ d is skipped on Node (0.1ms) # SKIP
✔ c is Deno's and Node's (0.3ms)
✖ failing tests:
✖ b fails (0.8ms)
ℹ pass 2
ℹ fail 1
ℹ skipped 1
`;

test("verdicts() reads which tests ran and which were skipped from each runner's output", () => {
  assert.deepEqual(
    [...verdicts("deno", DENO)],
    [["a passes", "ran"], ["b fails", "ran"], ["c is Deno's and Node's", "ran"]],
  );
  assert.deepEqual(
    [...verdicts("bun", BUN)],
    [["a passes", "ran"], ["b fails", "ran"], ["c is Deno's and Node's", "skipped"]],
  );
  assert.deepEqual(
    new Map(verdicts("node", NODE)),
    new Map([
      ["a passes", "ran"],
      ["b fails", "ran"],
      ["c is Deno's and Node's", "ran"],
      ["d is skipped on Node", "skipped"],
    ]),
  );
  assert.deepEqual(
    [...verdicts("deno", "slow ... ignored (0ms)\n")],
    [["slow", "skipped"]],
  );
});

test("countDifferences() names, per runtime, the tests it skipped or never registered", () => {
  const byRuntime = new Map([
    ["deno", verdicts("deno", DENO)] as const,
    ["bun", verdicts("bun", BUN)] as const,
    ["node", verdicts("node", NODE)] as const,
  ]);
  assert.deepEqual(countDifferences(byRuntime), [
    "deno: not run (not registered): d is skipped on Node",
    "bun: skipped: c is Deno's and Node's",
    "bun: not run (not registered): d is skipped on Node",
    "node: skipped: d is skipped on Node",
  ]);
  const same = new Map([
    ["deno", verdicts("deno", DENO)] as const,
    [
      "node",
      new Map(verdicts("deno", DENO)),
    ] as const,
  ]);
  assert.deepEqual(countDifferences(same), []);
});

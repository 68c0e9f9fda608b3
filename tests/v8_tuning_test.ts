import { test } from "./_test.ts";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import process from "node:process";
import { IS_NODE } from "../src/_runtime.ts";
import { pretenuringFlag } from "../src/_v8_tuning.ts";

const deno = (globalThis as { Deno?: unknown }).Deno;

test("pretenuringFlag() names V8's allocation-site pretenuring flag, on and off", () => {
  assert.equal(pretenuringFlag("on"), "--allocation-site-pretenuring");
  assert.equal(pretenuringFlag("off"), "--no-allocation-site-pretenuring");
  assert.equal(IS_NODE, process.versions.bun === undefined && deno === undefined);
});

// V8 takes an unknown flag with a warning and nothing else: a V8 that renamed this one would
// silently undo the tuning.
test("Node's V8 knows the pretenuring flag the command sets", { skip: !IS_NODE }, () => {
  const run = spawnSync(process.execPath, ["--v8-options"], { encoding: "utf8" });
  assert.equal(run.error, undefined);
  const help = `${run.stdout}${run.stderr}`;
  assert.match(help, /^\s*--allocation-site-pretenuring\b/m);
});

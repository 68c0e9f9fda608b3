import { test } from "./_test.ts";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import process from "node:process";
import { IS_V8, pretenuringFlag } from "../src/_v8_tuning.ts";

const deno = (globalThis as { Deno?: { execPath(): string } }).Deno;

test("pretenuringFlag() names V8's allocation-site pretenuring flag, on and off", () => {
  assert.equal(pretenuringFlag("on"), "--allocation-site-pretenuring");
  assert.equal(pretenuringFlag("off"), "--no-allocation-site-pretenuring");
  assert.equal(IS_V8, process.versions.bun === undefined);
});

// V8 takes an unknown flag with a warning and nothing else: a V8 that renamed this one would
// silently undo the tuning.
test("The V8 of this runtime knows the pretenuring flag the command sets", { skip: !IS_V8 }, () => {
  const [command, args] = deno
    ? [deno.execPath(), ["run", "--v8-flags=--help", "data:text/javascript,"]]
    : [process.execPath, ["--v8-options"]];
  const run = spawnSync(command, args, { encoding: "utf8" });
  assert.equal(run.error, undefined);
  const help = `${run.stdout}${run.stderr}`;
  assert.match(help, /^\s*--allocation-site-pretenuring\b/m);
});

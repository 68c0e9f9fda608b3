import assert from "node:assert/strict";
import { secretChecker } from "../src/_secret.ts";
import { test } from "./_test.ts";

test("secretChecker() accepts the secret itself", async () => {
  const check = secretChecker("s3cret-value");
  assert.equal(await check("s3cret-value"), true);
});

test("secretChecker() refuses a secret that differs in one byte", async () => {
  const check = secretChecker("s3cret-value");
  assert.equal(await check("s3cret-valuf"), false);
  assert.equal(await check("t3cret-value"), false);
});

test("secretChecker() refuses a prefix, an extension and a repetition of the secret", async () => {
  const check = secretChecker("s3cret");
  assert.equal(await check(""), false);
  assert.equal(await check("s3cre"), false);
  assert.equal(await check("s3cret!"), false);
  assert.equal(await check("s3crets3cret"), false);
});

test("secretChecker() compares bytes, not UTF-16 units", async () => {
  const check = secretChecker("é-secret");
  assert.equal(await check("é-secret"), true);
  assert.equal(await check("e-secret"), false);
});

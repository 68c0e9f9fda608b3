import { test } from "./_test.ts";
import assert from "node:assert/strict";
import { LruSet } from "../src/_lru.ts";

test("LruSet forgets the least recently used key beyond its capacity", () => {
  const set = new LruSet<string>(3);
  for (const key of ["a", "b", "c"]) set.add(key);
  assert.equal(set.touch("a"), true); // a is now the most recent: b goes first
  set.add("d");
  assert.equal(set.size, 3);
  assert.equal(set.has("b"), false);
  assert.deepEqual(["a", "c", "d"].map((key) => set.has(key)), [true, true, true]);
  set.add("c"); // re-adding counts as a use
  set.add("e");
  assert.equal(set.has("a"), false);
  assert.equal(set.touch("a"), false);
  assert.equal(set.has("a"), false, "touch does not add");
});

test("LruSet refuses a capacity that is not a positive integer", () => {
  for (const capacity of [0, -1, 1.5, Number.NaN, Infinity]) {
    assert.throws(() => new LruSet(capacity), RangeError);
  }
});

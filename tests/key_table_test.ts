import { test } from "./_test.ts";
import assert from "node:assert/strict";
import { KeyTable } from "../src/_key_table.ts";

test("KeyTable sets, gets, replaces and deletes values, and counts them", () => {
  const table = new KeyTable<string, number>();
  assert.equal(table.size, 0);
  assert.equal(table.get("a"), undefined);
  table.set("a", 1);
  table.set("b", 2);
  table.set("a", 3);
  assert.equal(table.size, 2);
  assert.equal(table.get("a"), 3);
  assert.ok(table.has("b"));
  assert.equal(table.delete("b"), true);
  assert.equal(table.delete("b"), false);
  assert.equal(table.has("b"), false);
  assert.equal(table.size, 1);
  assert.deepEqual(table.values(), [3]);
  table.clear();
  assert.equal(table.size, 0);
  assert.deepEqual(table.values(), []);
});

test("KeyTable keeps keys that name Object.prototype's members as plain keys", () => {
  const table = new KeyTable<string, string>();
  for (const key of ["__proto__", "constructor", "toString", "hasOwnProperty"]) {
    assert.equal(table.get(key), undefined, key);
    assert.equal(table.has(key), false, key);
    assert.equal(table.delete(key), false, key);
    table.set(key, `value of ${key}`);
  }
  assert.equal(table.size, 4);
  assert.equal(table.get("__proto__"), "value of __proto__");
  assert.deepEqual(table.values().sort(), [
    "value of __proto__",
    "value of constructor",
    "value of hasOwnProperty",
    "value of toString",
  ]);
});

test("KeyTable takes numeric keys that only grow, as call ids do, and a value of undefined", () => {
  const table = new KeyTable<number, unknown>();
  for (let id = 0; id < 10_000; id++) {
    table.set(id, { id });
    if (id >= 64) table.delete(id - 64);
  }
  assert.equal(table.size, 64);
  assert.deepEqual(table.get(9_999), { id: 9_999 });
  assert.equal(table.get(0), undefined);
  table.set(2 ** 40, undefined);
  assert.ok(table.has(2 ** 40));
  assert.equal(table.size, 65);
  assert.equal(table.delete(2 ** 40), true);
  assert.equal(table.size, 64);
});

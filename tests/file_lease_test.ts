import { test } from "./_test.ts";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { readdirSync } from "node:fs";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import process from "node:process";
import { fileURLToPath } from "node:url";
import { createFileLeaseStore } from "../src/file_lease.ts";
import { isLive, type LeaseStore } from "../src/lease.ts";

const RACER = fileURLToPath(new URL("./_lease_racer.ts", import.meta.url));
const deno = (globalThis as { Deno?: typeof Deno }).Deno;

async function withRoot(fn: (root: string) => Promise<void>): Promise<void> {
  const root = await mkdtemp(join(tmpdir(), "lease-test-"));
  try {
    await fn(root);
  } finally {
    await rm(root, { recursive: true, force: true });
  }
}

/** A clock the test moves by hand. */
function manualClock(start = 1_000_000): { now: () => number; advance(ms: number): void } {
  let time = start;
  return { now: () => time, advance: (ms) => void (time += ms) };
}

function stores(root: string, count: number, now?: () => number): LeaseStore[] {
  return Array.from({ length: count }, () =>
    createFileLeaseStore({
      dir: (id) => join(root, id, "lease"),
      ttlMs: 1_000,
      ...(now ? { now } : {}),
    }));
}

const holder = (id: string) => ({ id, url: `http://${id}.internal:8787` });

test("FileLeaseStore.acquire() gives a free lease to exactly one of four racing brokers, 200 times over", async () => {
  await withRoot(async (root) => {
    const racers = stores(root, 4);
    for (let round = 0; round < 200; round++) {
      const id = `ws-${round}`;
      const results = await Promise.all(racers.map((s, i) => s.acquire(id, holder(`b${i}`))));
      const winners = results.filter((r) => r.acquired);
      assert.equal(winners.length, 1, `round ${round}: ${winners.length} winners`);
      const winner = winners[0]!.acquired ? winners[0]!.lease : undefined;
      for (const result of results) {
        if (!result.acquired) assert.equal(result.current.owner, winner!.owner);
      }
    }
  });
});

test("FileLeaseStore.acquire() gives an expired lease to exactly one of four racing brokers, 100 times over", async () => {
  await withRoot(async (root) => {
    const clock = manualClock();
    const [dead, ...racers] = stores(root, 5, clock.now) as [LeaseStore, ...LeaseStore[]];
    for (let round = 0; round < 100; round++) {
      const id = `ws-${round}`;
      assert.ok((await dead.acquire(id, holder("dead"))).acquired);
      clock.advance(1_001);
      const results = await Promise.all(racers.map((s, i) => s.acquire(id, holder(`b${i}`))));
      assert.equal(results.filter((r) => r.acquired).length, 1, `round ${round}`);
      const current = await racers[0]!.read(id);
      assert.equal(current?.generation, 2);
      assert.notEqual(current?.owner, "dead");
    }
  });
});

test("FileLeaseStore.acquire() gives each lease to exactly one of three racing processes", async () => {
  await withRoot(async (root) => {
    const workspaces = Array.from({ length: 60 }, (_, i) => `ws-${i}`);
    const racers = ["p0", "p1", "p2"].map((id) => {
      const child = deno
        ? spawn(deno.execPath(), ["run", "-A", RACER, root, id, ...workspaces], {
          stdio: ["pipe", "pipe", "inherit"],
        })
        : spawn(process.execPath, [RACER, root, id, ...workspaces], {
          stdio: ["pipe", "pipe", "inherit"],
        });
      let out = "";
      child.stdout!.setEncoding("utf8");
      child.stdout!.on("data", (text: string) => out += text);
      const done = new Promise<string[]>((resolve, reject) => {
        child.once("close", (code) => {
          if (code === 0) resolve((JSON.parse(out) as { won: string[] }).won);
          else reject(new Error(`racer ${id} exited with ${code}`));
        });
      });
      return { child, done };
    });
    try {
      // Each process has loaded its modules once it has a pid and a moment; the go line
      // reaches all three within microseconds of each other.
      await new Promise((resolve) => setTimeout(resolve, 50));
      for (const { child } of racers) child.stdin!.end("go\n");
      const won = await Promise.all(racers.map((r) => r.done));
      const all = won.flat().sort();
      assert.deepEqual(all, [...workspaces].sort(), "every lease has exactly one winner");
    } finally {
      for (const { child } of racers) if (child.exitCode === null) child.kill("SIGKILL");
    }
  });
});

test("FileLeaseStore.renew() extends a held lease, and returns null once it expired or was taken over", async () => {
  await withRoot(async (root) => {
    const clock = manualClock();
    const [a, b] = stores(root, 2, clock.now) as [LeaseStore, LeaseStore];
    const first = await a.acquire("ws-1", holder("a"));
    assert.ok(first.acquired);
    clock.advance(600);
    const renewed = await a.renew(first.lease);
    assert.ok(renewed);
    assert.equal(renewed.expiresAt, clock.now() + 1_000);
    clock.advance(600); // past the first expiry, within the renewed one
    assert.equal((await b.acquire("ws-1", holder("b"))).acquired, false);
    clock.advance(500);
    assert.equal(await a.renew(renewed), null, "an expired lease cannot be renewed");
    assert.ok((await b.acquire("ws-1", holder("b"))).acquired);
    assert.equal(await a.renew({ ...renewed, expiresAt: clock.now() + 10 }), null, "taken over");
  });
});

test("FileLeaseStore.release() frees the lease at once for the next broker and history is deleted", async () => {
  await withRoot(async (root) => {
    const [a, b] = stores(root, 2) as [LeaseStore, LeaseStore];
    const first = await a.acquire("ws-1", holder("a"));
    assert.ok(first.acquired);
    const refused = await b.acquire("ws-1", holder("b"));
    assert.equal(refused.acquired, false);
    assert.equal(!refused.acquired && refused.current.url, "http://a.internal:8787");
    await a.release(first.lease);
    const released = await b.read("ws-1");
    assert.equal(released && isLive(released, Date.now()), false);
    const second = await b.acquire("ws-1", holder("b"));
    assert.ok(second.acquired);
    assert.equal(second.lease.generation, 2);
    assert.deepEqual(readdirSync(join(root, "ws-1", "lease")), ["0000000000000002.json"]);
    await a.release(first.lease); // lost already: must not touch b's lease
    assert.ok(isLive((await b.read("ws-1"))!, Date.now()));
  });
});

test("FileLeaseStore.acquire() by the same broker id in a new process takes over its crashed predecessor's live lease", async () => {
  await withRoot(async (root) => {
    const [before, after, other] = stores(root, 3) as [LeaseStore, LeaseStore, LeaseStore];
    assert.ok((await before.acquire("ws-1", holder("a"))).acquired);
    assert.equal((await other.acquire("ws-1", holder("b"))).acquired, false);
    const again = await after.acquire("ws-1", holder("a"));
    assert.ok(again.acquired);
    assert.equal(again.lease.generation, 2);
    assert.equal(await before.renew({ ...again.lease, instance: "x" }), null);
  });
});

test("FileLeaseStore.read() answers null for a workspace never leased, and createFileLeaseStore() refuses a bad TTL", async () => {
  await withRoot(async (root) => {
    const [store] = stores(root, 1) as [LeaseStore];
    assert.equal(await store.read("never"), null);
    assert.throws(() => createFileLeaseStore({ dir: () => root, ttlMs: 0 }), RangeError);
  });
});

import { test } from "./_test.ts";
import assert from "node:assert/strict";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createFileLeaseStore } from "../src/file_lease.ts";
import type { LeaseRecord, LeaseStore } from "../src/lease.ts";
import { Ownership } from "../src/ownership.ts";
import { waitFor } from "./_wait.ts";

async function withStore(
  ttlMs: number,
  fn: (store: () => LeaseStore) => Promise<void>,
): Promise<void> {
  const root = await mkdtemp(join(tmpdir(), "ownership-test-"));
  try {
    await fn(() => createFileLeaseStore({ dir: (id) => join(root, id, "lease"), ttlMs }));
  } finally {
    await rm(root, { recursive: true, force: true });
  }
}

const holder = (id: string) => ({ id, url: `http://${id}:8787` });

test("Ownership.claim() takes a free lease, and another broker is told who owns it", async () => {
  await withStore(5_000, async (store) => {
    const a = new Ownership({ store: store(), holder: holder("a") });
    const b = new Ownership({ store: store(), holder: holder("b") });
    try {
      assert.deepEqual(await a.claim("ws-1"), { local: true });
      assert.ok(a.owns("ws-1"));
      const claim = await b.claim("ws-1");
      assert.equal(claim.local, false);
      assert.equal(!claim.local && claim.owner.url, "http://a:8787");
      assert.equal(!claim.local && claim.owner.owner, "a");
    } finally {
      await a.close();
      await b.close();
    }
  });
});

test("Ownership.claim() shares one store acquire among concurrent claims of a workspace", async () => {
  await withStore(5_000, async (store) => {
    const inner = store();
    let acquires = 0;
    const counting: LeaseStore = {
      ttlMs: inner.ttlMs,
      acquire: (id, h) => (acquires++, inner.acquire(id, h)),
      renew: (lease) => inner.renew(lease),
      release: (lease) => inner.release(lease),
      read: (id) => inner.read(id),
    };
    const a = new Ownership({ store: counting, holder: holder("a") });
    try {
      const claims = await Promise.all(Array.from({ length: 20 }, () => a.claim("ws-1")));
      assert.ok(claims.every((c) => c.local));
      assert.equal(acquires, 1);
    } finally {
      await a.close();
    }
  });
});

test("Ownership renews held leases, so another broker cannot take them after the TTL", async () => {
  await withStore(150, async (store) => {
    const a = new Ownership({ store: store(), holder: holder("a") });
    const b = new Ownership({ store: store(), holder: holder("b") });
    try {
      await a.claim("ws-1");
      await new Promise((resolve) => setTimeout(resolve, 400));
      assert.equal((await b.claim("ws-1")).local, false);
    } finally {
      await a.close();
      await b.close();
    }
  });
});

test("Ownership calls onLost when a lease cannot be renewed, and forgets it", async () => {
  await withStore(150, async (store) => {
    const inner = store();
    const losing: LeaseStore = {
      ttlMs: inner.ttlMs,
      acquire: (id, h) => inner.acquire(id, h),
      renew: () => Promise.resolve(null),
      release: (lease) => inner.release(lease),
      read: (id) => inner.read(id),
    };
    const lost: string[] = [];
    const a = new Ownership({ store: losing, holder: holder("a"), onLost: (id) => lost.push(id) });
    try {
      await a.claim("ws-1");
      await waitFor("the lost lease", () => lost.length === 1, 2_000);
      assert.deepEqual(lost, ["ws-1"]);
      assert.equal(a.owns("ws-1"), false);
    } finally {
      await a.close();
    }
  });
});

test("Ownership.release() frees the lease for another broker at once, and a claim during it waits", async () => {
  await withStore(60_000, async (store) => {
    const a = new Ownership({ store: store(), holder: holder("a") });
    const b = new Ownership({ store: store(), holder: holder("b") });
    try {
      await a.claim("ws-1");
      const releasing = a.release("ws-1");
      const again = a.claim("ws-1"); // waits for the release, then takes it anew
      await releasing;
      assert.deepEqual(await again, { local: true });
      await a.release("ws-1");
      assert.deepEqual(await b.claim("ws-1"), { local: true });
      const record = await store().read("ws-1") as LeaseRecord;
      assert.equal(record.owner, "b");
      assert.equal(record.generation, 3);
    } finally {
      await a.close();
      await b.close();
    }
  });
});

test("Ownership.turnServed() asks for a hand-over after two forwarded turns in a row, and a direct turn resets the count", async () => {
  await withStore(60_000, async (store) => {
    const handOvers: string[] = [];
    const a = new Ownership({
      store: store(),
      holder: holder("a"),
      onHandOver: (id) => {
        handOvers.push(id);
        return Promise.resolve(false); // kept: the test goes on counting
      },
    });
    try {
      await a.claim("ws-1");
      a.turnServed("ws-1", true);
      a.turnServed("ws-1", false);
      a.turnServed("ws-1", true);
      assert.deepEqual(handOvers, []);
      a.turnServed("ws-1", true);
      assert.deepEqual(handOvers, ["ws-1"]);
      assert.equal(a.handingOver("ws-1"), true);
      await Promise.resolve();
      assert.equal(a.handingOver("ws-1"), false, "a hand-over the owner declined ends");
      a.turnServed("ws-2", true); // not held: nothing to hand over
      a.turnServed("ws-2", true);
      assert.deepEqual(handOvers, ["ws-1"]);
    } finally {
      await a.close();
    }
  });
});

test("Ownership.close() releases every lease and refuses later claims", async () => {
  await withStore(60_000, async (store) => {
    const a = new Ownership({ store: store(), holder: holder("a") });
    await a.claim("ws-1");
    await a.claim("ws-2");
    await a.close();
    assert.deepEqual(a.held, []);
    await assert.rejects(a.claim("ws-3"), /shutting down/);
    const b = new Ownership({ store: store(), holder: holder("b") });
    try {
      assert.deepEqual(await b.claim("ws-1"), { local: true });
    } finally {
      await b.close();
    }
  });
});

test("Ownership.drain() stops taking new workspaces but keeps those it holds", async () => {
  await withStore(60_000, async (store) => {
    const a = new Ownership({ store: store(), holder: holder("a") });
    try {
      await a.claim("ws-1");
      a.drain();
      assert.deepEqual(await a.claim("ws-1"), { local: true });
      await assert.rejects(a.claim("ws-2"), /draining/);
    } finally {
      await a.close();
    }
  });
});

test("Ownership.releaseUnused() gives up a held lease no codex is attached to, and keeps an attached one until detached", async () => {
  await withStore(60_000, async (store) => {
    const a = new Ownership({ store: store(), holder: holder("a") });
    try {
      await a.claim("ws-1");
      a.attach("ws-1");
      a.attach("ws-1"); // a second start before the first one stopped
      await a.releaseUnused("ws-1");
      assert.ok(a.owns("ws-1"), "a codex starts or runs under it");
      a.detach("ws-1");
      await a.releaseUnused("ws-1");
      assert.ok(a.owns("ws-1"), "one start is not stopped yet");
      a.detach("ws-1");
      await a.releaseUnused("ws-1");
      assert.equal(a.owns("ws-1"), false);
      assert.equal((await store().read("ws-1") as LeaseRecord).expiresAt, 0, "released");
      await a.releaseUnused("ws-2"); // not held: nothing to do
      assert.equal(await store().read("ws-2"), null);
    } finally {
      await a.close();
    }
  });
});

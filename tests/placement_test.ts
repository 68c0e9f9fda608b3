/**
 * Several brokers in one process, each its own pool (over its own fake codex, through the
 * leased resolver), its own Ownership over one shared lease directory, and its own handler
 * served over real HTTP by srvx, so that a forwarded turn really crosses sockets.
 */

import { test } from "./_test.ts";
import { readEvents } from "./_sse_events.ts";
import assert from "node:assert/strict";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { serve, type Server } from "srvx";
import { SignJWT } from "jose";
import { createTokenVerifier, Pool, type PoolOptions } from "../mod.ts";
import { createFileLeaseStore } from "../src/file_lease.ts";
import { createTurnsHandler, type TurnsHandlerOptions } from "../src/handler.ts";
import type { LeaseStore } from "../src/lease.ts";
import { Ownership } from "../src/ownership.ts";
import { leasedResolver } from "../src/_leased_resolver.ts";
import {
  agentMessage,
  codexLike,
  type FakeAppServer,
  type FakePeer,
  gatedCodex,
  type Message,
  startFakeAppServer,
  turnObject,
} from "./_fake_app_server.ts";
import { waitFor, within } from "./_wait.ts";

const SECRET = "placement-test-secret";
const FORWARDED = "x-codex-broker-forwarded";
const input = [{ type: "text", text: "hi", text_elements: [] }];
// Bun's own default is 5 s per test.
const TIMEOUT = { timeout: 30_000 };

interface BrokerSetup {
  /** The fake codex every workspace of this broker runs on. Defaults to `codexLike`. */
  codex?: (peer: FakePeer) => void | Promise<void>;
  pool?: PoolOptions;
  handler?: Partial<TurnsHandlerOptions>;
  /** Wraps this broker's lease store (a slow or failing shared volume). */
  store?: (store: LeaseStore) => LeaseStore;
  /** How long stopping a workspace's codex takes (the inner resolver's release). */
  releaseDelayMs?: number;
  /** Hands a workspace over between turns, as main.ts does. Default true. */
  handOver?: boolean;
  /** Sees each request as the server hands it to the handler. */
  onRequest?: (request: Request) => void;
}

interface Broker {
  readonly id: string;
  readonly url: string;
  readonly codex: FakeAppServer;
  readonly pool: Pool;
  readonly ownership: Ownership;
  /** Aborts every client request of the test, when it ends. */
  readonly clients: AbortSignal;
  /** The workspaces this broker started a codex for, in order. */
  readonly resolved: string[];
  /** Every message of `method` this broker's codex received, over all its connections. */
  received(method: string): Message[];
  /** Stops answering HTTP: the port refuses connections from now on. */
  stopServer(): Promise<void>;
  close(): Promise<void>;
}

interface Cluster {
  /** The shared lease store as a third party sees it. */
  readonly store: LeaseStore;
  start(id: string, setup?: BrokerSetup): Promise<Broker>;
}

/** Runs `fn` with brokers over one temporary lease directory, then stops them all. */
async function withCluster(
  ttlMs: number,
  fn: (cluster: Cluster) => Promise<void>,
): Promise<void> {
  const root = await mkdtemp(join(tmpdir(), "placement-test-"));
  const newStore = () => createFileLeaseStore({ dir: (id) => join(root, id, "lease"), ttlMs });
  const brokers: Broker[] = [];
  // A test that fails mid-stream leaves its client's request open, and Deno's server waits
  // for it on close: the clients go first.
  const clients = new AbortController();
  let closed: PromiseSettledResult<void>[];
  try {
    await fn({
      store: newStore(),
      async start(id, setup = {}) {
        const broker = await startBroker(id, setup, newStore(), clients.signal);
        brokers.push(broker);
        return broker;
      },
    });
  } finally {
    clients.abort();
    closed = await Promise.allSettled(brokers.map((broker) => broker.close()));
    await rm(root, { recursive: true, force: true });
  }
  for (const result of closed) if (result.status === "rejected") throw result.reason;
}

async function startBroker(
  id: string,
  setup: BrokerSetup,
  store: LeaseStore,
  clients: AbortSignal,
): Promise<Broker> {
  const codex = await startFakeAppServer(setup.codex ?? ((peer) => codexLike(peer)));
  // The handler and the pool come once the server listens: the lease records its URL.
  const server: Server = serve({
    hostname: "127.0.0.1",
    port: 0,
    silent: true,
    gracefulShutdown: false,
    fetch: (request: Request) => {
      setup.onRequest?.(request);
      return handler(request);
    },
  });
  await server.ready();
  const url = (server.url ?? "").replace(/\/$/, "");
  const resolved: string[] = [];
  const ownership: Ownership = new Ownership({
    store: setup.store ? setup.store(store) : store,
    holder: { id, url },
    ...(setup.handOver === false ? {} : {
      onHandOver: (workspaceId: string): Promise<boolean> =>
        pool.release(workspaceId, { ifIdle: true }),
    }),
  });
  const pool: Pool = new Pool(
    leasedResolver({
      resolve: (workspaceId) => {
        resolved.push(workspaceId);
        return Promise.resolve({ url: codex.url });
      },
      release: async () => {
        if (setup.releaseDelayMs) await sleep(setup.releaseDelayMs);
      },
    }, ownership),
    setup.pool,
  );
  const handler = createTurnsHandler(pool, {
    secret: SECRET,
    brokerId: id,
    ownership,
    ...setup.handler,
  });
  let serverClosed: Promise<void> | undefined;
  const stopServer = () => (serverClosed ??= server.close(true));
  let closed: Promise<void> | undefined;
  return {
    id,
    url,
    codex,
    pool,
    ownership,
    clients,
    resolved,
    received: (method) =>
      codex.peers.flatMap((peer) => peer.received.filter((m) => m.method === method)),
    stopServer,
    close() {
      closed ??= (async () => {
        await stopServer();
        await pool.close();
        await ownership.close();
        await codex.close();
      })();
      return closed;
    },
  };
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

interface TurnBody {
  threadId?: string | null;
  workspaceId?: string;
  params?: unknown;
}

/** Sends a turn of `workspaceId` to `broker` on the path route. */
function sendTurn(
  broker: Broker,
  workspaceId: string,
  body: TurnBody = {},
  init: { headers?: Record<string, string>; signal?: AbortSignal } = {},
): Promise<Response> {
  return fetch(`${broker.url}/api/workspaces/${workspaceId}/turns`, {
    method: "POST",
    headers: { "content-type": "application/json", "x-internal-secret": SECRET, ...init.headers },
    body: JSON.stringify({ params: { input }, ...body }),
    signal: init.signal ? AbortSignal.any([init.signal, broker.clients]) : broker.clients,
  });
}

/** Runs a turn at `broker` and checks it completed; returns who ran it and the thread. */
async function runTurn(
  broker: Broker,
  workspaceId: string,
  body: TurnBody = {},
): Promise<{ brokerId: string | null; threadId: string }> {
  const response = await sendTurn(broker, workspaceId, body);
  const answer = await response.json();
  assert.equal(response.status, 200, JSON.stringify(answer));
  assert.equal(answer.turn?.status, "completed", JSON.stringify(answer));
  return { brokerId: response.headers.get("x-broker-id"), threadId: answer.threadId };
}

/** A codex whose turns hang until interrupted, telling when a turn starts and is interrupted. */
function hangingCodex() {
  const started = Promise.withResolvers<void>();
  const interrupted = Promise.withResolvers<Message>();
  return {
    started: () => within(started.promise, 5_000, "turn/start"),
    interrupted: () => within(interrupted.promise, 5_000, "turn/interrupt"),
    script(peer: FakePeer) {
      peer.handle((m) => {
        if (m.method === "turn/start") started.resolve();
        if (m.method === "turn/interrupt") interrupted.resolve(m);
        return false;
      });
      codexLike(peer, { hang: true });
    },
  };
}

// --- forwarding ---------------------------------------------------------------------------

test(
  "a turn sent to a broker that does not own the workspace is run by the owner, answered with the owner's X-Broker-Id, and its thread goes on there",
  TIMEOUT,
  async () => {
    await withCluster(5_000, async (cluster) => {
      const a = await cluster.start("broker-a", { handOver: false });
      const b = await cluster.start("broker-b", { handOver: false });
      const first = await runTurn(a, "ws-1");
      assert.equal(first.brokerId, "broker-a");
      // On /api/turns, the workspace in the body: B forwards it to A's path route.
      const response = await fetch(`${b.url}/api/turns`, {
        method: "POST",
        signal: b.clients,
        headers: { "content-type": "application/json", "x-internal-secret": SECRET },
        body: JSON.stringify({ workspaceId: "ws-1", threadId: first.threadId, params: { input } }),
      });
      assert.equal(response.status, 200);
      assert.equal(response.headers.get("x-broker-id"), "broker-a");
      assert.equal(response.headers.get("content-type"), "application/json");
      const second = await response.json();
      assert.equal(second.threadId, first.threadId);
      assert.equal(second.turn.status, "completed");
      const third = await runTurn(b, "ws-1", { threadId: first.threadId });
      assert.deepEqual(third, { brokerId: "broker-a", threadId: first.threadId });

      const starts = a.received("turn/start");
      assert.equal(starts.length, 3);
      assert.ok(starts.every((m) => m.params.threadId === first.threadId));
      assert.equal(a.codex.peers.length, 1, "A ran every turn on its one codex connection");
      assert.equal(b.codex.peers.length, 0, "B never started a codex for the workspace");
      assert.deepEqual(b.ownership.held, []);
      assert.equal((await cluster.store.read("ws-1"))?.owner, "broker-a");
    });
  },
);

test(
  "an event stream sent to a broker that does not own the workspace is relayed from the owner as it comes, ending with result",
  TIMEOUT,
  async () => {
    const gate = Promise.withResolvers<void>();
    // The rest only once the client has seen turn/started through both brokers.
    const codex = gatedCodex(() => gate.promise, (peer, threadId) => {
      const item = agentMessage("msg-1", "hello");
      peer.notify("item/completed", { completedAtMs: 1, threadId, turnId: "turn-1", item });
      peer.notify("turn/completed", {
        threadId,
        turn: turnObject("turn-1", "completed", [item]),
      });
    });
    await withCluster(5_000, async (cluster) => {
      const a = await cluster.start("broker-a", { codex });
      const b = await cluster.start("broker-b", { codex });
      assert.ok((await a.ownership.claim("ws-1")).local, "A owns the workspace");
      const response = await sendTurn(b, "ws-1", {}, { headers: { accept: "text/event-stream" } });
      assert.equal(response.status, 200);
      assert.equal(response.headers.get("content-type"), "text/event-stream");
      assert.equal(response.headers.get("x-broker-id"), "broker-a");
      const events = await within(
        readEvents(response, (event) => {
          if (event.event === "turn/started") gate.resolve();
        }),
        5_000,
        "the relayed stream to end (it must relay turn/started before the turn completes)",
      );
      assert.deepEqual(events.map((e) => e.event), [
        "thread",
        "turn/started",
        "item/completed",
        "turn/completed",
        "result",
      ]);
      const result = events.at(-1)!.data as { threadId: string; turn: { status: string } };
      assert.equal(result.threadId, "thr-1");
      assert.equal(result.turn.status, "completed");
      assert.equal(a.received("turn/start").length, 1);
      assert.equal(b.codex.peers.length, 0);
    });
  },
);

test(
  "a client that disconnects from the forwarding broker mid-turn gets the owner's turn interrupted",
  TIMEOUT,
  async () => {
    const hanging = hangingCodex();
    await withCluster(5_000, async (cluster) => {
      const a = await cluster.start("broker-a", { codex: hanging.script });
      const b = await cluster.start("broker-b");
      assert.ok((await a.ownership.claim("ws-1")).local);
      const client = new AbortController();
      const answer = sendTurn(b, "ws-1", {}, { signal: client.signal });
      answer.catch(() => {});
      await hanging.started();
      client.abort();
      const interrupt = await hanging.interrupted();
      assert.deepEqual(interrupt.params, { threadId: "thr-1", turnId: "turn-1" });
      await assert.rejects(answer);
      assert.equal(b.codex.peers.length, 0);
    });
  },
);

test(
  "a client that cancels a relayed event stream gets the owner's turn interrupted",
  TIMEOUT,
  async () => {
    const hanging = hangingCodex();
    await withCluster(5_000, async (cluster) => {
      const a = await cluster.start("broker-a", { codex: hanging.script });
      const b = await cluster.start("broker-b");
      assert.ok((await a.ownership.claim("ws-1")).local);
      const response = await sendTurn(b, "ws-1", {}, { headers: { accept: "text/event-stream" } });
      assert.equal(response.headers.get("x-broker-id"), "broker-a");
      const reader = response.body!.getReader();
      const decoder = new TextDecoder();
      let seen = "";
      while (!seen.includes("event: turn/started\n")) {
        const { done, value } = await within(reader.read(), 5_000, "turn/started");
        assert.ok(!done, "the stream ended early");
        seen += decoder.decode(value, { stream: true });
      }
      await reader.cancel();
      const interrupt = await hanging.interrupted();
      assert.deepEqual(interrupt.params, { threadId: "thr-1", turnId: "turn-1" });
    });
  },
);

test(
  "a broker relaying an event stream reports the request's end only when the stream has ended",
  TIMEOUT,
  async () => {
    const gate = Promise.withResolvers<void>();
    const codex = gatedCodex(() => gate.promise, (peer, threadId) => {
      peer.notify("turn/completed", { threadId, turn: turnObject("turn-1", "completed") });
    });
    await withCluster(5_000, async (cluster) => {
      const ended: string[] = [];
      const a = await cluster.start("broker-a", { codex });
      const b = await cluster.start("broker-b", {
        handler: { onRequestEnd: (request) => ended.push(new URL(request.url).pathname) },
      });
      assert.ok((await a.ownership.claim("ws-1")).local);
      const response = await sendTurn(b, "ws-1", {}, { headers: { accept: "text/event-stream" } });
      assert.equal(response.headers.get("x-broker-id"), "broker-a");
      let endedMidStream: string[] | undefined;
      const events = await within(
        readEvents(response, (event) => {
          if (event.event !== "turn/started") return;
          endedMidStream = [...ended];
          gate.resolve();
        }),
        5_000,
        "the relayed stream to end",
      );
      assert.equal(events.at(-1)!.event, "result");
      // A server that counts requests in flight (a graceful shutdown) must still count it.
      assert.deepEqual(endedMidStream, [], "B reported the end while it still relayed it");
      await waitFor("B to report the request's end", () => ended.length === 1);
      assert.deepEqual(ended, ["/api/workspaces/ws-1/turns"]);
    });
  },
);

// --- an owner that cannot be reached --------------------------------------------------------

/** Wraps a store so that, once frozen, nothing this broker writes reaches the volume. */
function freezable(): { wrap: (store: LeaseStore) => LeaseStore; freeze(): void } {
  let frozen = false;
  const refuse = () => Promise.reject(new Error("Cannot write lease: the broker is gone"));
  return {
    freeze: () => (frozen = true),
    wrap: (store) => ({
      ttlMs: store.ttlMs,
      acquire: (id, holder) => frozen ? refuse() : store.acquire(id, holder),
      renew: (lease) => frozen ? refuse() : store.renew(lease),
      release: (lease) => frozen ? refuse() : store.release(lease),
      read: (id) => store.read(id),
    }),
  };
}

test(
  "an owner that cannot be reached makes the others answer 503 workspaceBusy with Retry-After and the owner while its lease lasts, and take the workspace over, thread and all, once it expired",
  TIMEOUT,
  async () => {
    const TTL_MS = 500;
    await withCluster(TTL_MS, async (cluster) => {
      const gone = freezable();
      const a = await cluster.start("broker-a", { store: gone.wrap });
      const b = await cluster.start("broker-b");
      const first = await runTurn(a, "ws-1");
      assert.equal(first.brokerId, "broker-a");
      // A dies: its port refuses connections and its lease is no longer renewed.
      await a.stopServer();
      gone.freeze();

      const busy = await sendTurn(b, "ws-1", { threadId: first.threadId });
      const body = await busy.json();
      assert.equal(busy.status, 503, JSON.stringify(body));
      assert.equal(busy.headers.get("x-broker-id"), "broker-b");
      assert.equal(busy.headers.get("retry-after"), "1");
      assert.equal(body.error.code, "workspaceBusy");
      assert.equal(body.error.owner, "broker-a");
      assert.match(body.error.message, /broker-a/);
      assert.deepEqual(b.ownership.held, [], "B did not take a live lease");

      await waitFor("A's lease to expire", async () => {
        const lease = await cluster.store.read("ws-1");
        return lease !== null && lease.expiresAt <= Date.now();
      }, 5_000);
      const taken = await runTurn(b, "ws-1", { threadId: first.threadId });
      assert.deepEqual(taken, { brokerId: "broker-b", threadId: first.threadId });
      assert.deepEqual(b.received("thread/resume").map((m) => m.params.threadId), [first.threadId]);
      assert.equal(b.received("turn/start").length, 1);
      assert.equal((await cluster.store.read("ws-1"))?.owner, "broker-b");
    });
  },
);

test(
  "a forwarded request to a broker that does not own the workspace is answered 421 notOwner, never forwarded again nor run there",
  TIMEOUT,
  async () => {
    await withCluster(5_000, async (cluster) => {
      const a = await cluster.start("broker-a");
      const c = await cluster.start("broker-c");
      assert.equal((await runTurn(c, "ws-owned")).brokerId, "broker-c");
      // Owned by a third broker: no chain of forwards.
      const owned = await sendTurn(a, "ws-owned", {}, { headers: { [FORWARDED]: "broker-b" } });
      assert.equal(owned.status, 421);
      assert.equal(owned.headers.get("x-broker-id"), "broker-a");
      assert.equal((await owned.json()).error.code, "notOwner");
      // Owned by nobody: the sender took A for the owner, which A is not; the sender asks the
      // lease store again rather than have A take the workspace.
      const free = await sendTurn(a, "ws-free", {}, { headers: { [FORWARDED]: "broker-b" } });
      assert.equal(free.status, 421);
      assert.equal((await free.json()).error.code, "notOwner");
      assert.equal(await cluster.store.read("ws-free"), null, "A did not take the free lease");
      assert.deepEqual(a.ownership.held, []);
      assert.equal(a.codex.peers.length, 0, "nothing reached A's codex");
      assert.equal(c.received("turn/start").length, 1);
    });
  },
);

// --- capacity ------------------------------------------------------------------------------

test(
  "a broker at capacity answers 503 atCapacity and lets go of the lease it took for the workspace, so another broker runs it",
  TIMEOUT,
  async () => {
    const hanging = hangingCodex();
    await withCluster(5_000, async (cluster) => {
      const a = await cluster.start("broker-a", {
        codex: hanging.script,
        pool: { maxConnections: 1 },
      });
      const b = await cluster.start("broker-b");
      const busy = new AbortController();
      const first = sendTurn(a, "ws-busy", {}, { signal: busy.signal });
      first.catch(() => {});
      await hanging.started();
      const full = await sendTurn(a, "ws-2");
      assert.equal(full.status, 503);
      assert.equal(full.headers.get("retry-after"), "1");
      assert.equal(full.headers.get("x-broker-id"), "broker-a");
      assert.equal((await full.json()).error.code, "atCapacity");
      assert.equal(a.ownership.owns("ws-2"), false, "A holds no lease for a codex it never ran");
      // The load balancer's next pick, or a retry through another broker, runs it there.
      assert.equal((await runTurn(b, "ws-2")).brokerId, "broker-b");
      assert.equal((await cluster.store.read("ws-2"))?.owner, "broker-b");
      assert.deepEqual(a.resolved, ["ws-busy"]);
      busy.abort();
      await assert.rejects(first);
    });
  },
);

test(
  "a client that leaves while its broker takes the workspace's lease leaves no lease behind",
  TIMEOUT,
  async () => {
    const acquiring = Promise.withResolvers<void>();
    const arrived = Promise.withResolvers<Request>();
    // The shared volume is slow: the client is gone before the lease is written.
    const slowAcquire = (store: LeaseStore): LeaseStore => ({
      ttlMs: store.ttlMs,
      acquire: async (id, holder) => {
        acquiring.resolve();
        const { signal } = await arrived.promise;
        await within(
          new Promise((resolve) => signal.addEventListener("abort", resolve, { once: true })),
          5_000,
          "the server to see the client leave",
        );
        return await store.acquire(id, holder);
      },
      renew: (lease) => store.renew(lease),
      release: (lease) => store.release(lease),
      read: (id) => store.read(id),
    });
    await withCluster(5_000, async (cluster) => {
      const a = await cluster.start("broker-a", {
        store: slowAcquire,
        onRequest: (request) => arrived.resolve(request),
      });
      const client = new AbortController();
      const answer = sendTurn(a, "ws-1", {}, { signal: client.signal });
      answer.catch(() => {});
      await within(acquiring.promise, 5_000, "the lease to be taken");
      client.abort();
      await assert.rejects(answer);
      await waitFor("A to let go of ws-1", async () => {
        const lease = await cluster.store.read("ws-1");
        return !a.ownership.owns("ws-1") && lease !== null && lease.expiresAt === 0;
      });
      assert.deepEqual(a.resolved, [], "no codex was started");
    });
  },
);

// --- ownership follows routing ------------------------------------------------------------

test(
  "an owner that gets a workspace's turns only through another broker hands it over between turns: the third turn sent there runs there, on the same thread",
  TIMEOUT,
  async () => {
    await withCluster(5_000, async (cluster) => {
      // Stopping codex and writing the release take a while, as on a real volume: turns sent
      // meanwhile must not win the workspace back for the broker that lets go of it.
      const slowRelease = (store: LeaseStore): LeaseStore => ({
        ...store,
        ttlMs: store.ttlMs,
        acquire: (id, holder) => store.acquire(id, holder),
        renew: (lease) => store.renew(lease),
        read: (id) => store.read(id),
        release: async (lease) => {
          await sleep(150);
          await store.release(lease);
        },
      });
      const a = await cluster.start("broker-a", { releaseDelayMs: 50, store: slowRelease });
      const b = await cluster.start("broker-b");
      const first = await runTurn(a, "ws-1");
      assert.equal(first.brokerId, "broker-a");
      // The load balancer now sends the workspace to B.
      const placed: (string | null)[] = [];
      for (let turn = 1; turn <= 3; turn++) {
        const { brokerId, threadId } = await runTurn(b, "ws-1", { threadId: first.threadId });
        assert.equal(threadId, first.threadId);
        placed.push(brokerId);
      }
      assert.deepEqual(placed, ["broker-a", "broker-a", "broker-b"]);
      assert.equal(a.received("turn/start").length, 3);
      assert.equal(b.received("turn/start").length, 1);
      assert.deepEqual(b.received("thread/resume").map((m) => m.params.threadId), [first.threadId]);
      assert.equal(a.pool.size, 0, "A stopped its codex for the workspace");
      assert.deepEqual(a.ownership.held, []);
      assert.equal((await cluster.store.read("ws-1"))?.owner, "broker-b");
      // And it stays there.
      assert.equal((await runTurn(b, "ws-1", { threadId: first.threadId })).brokerId, "broker-b");
    });
  },
);

// --- drain ---------------------------------------------------------------------------------

test(
  "a draining broker answers every new turn 503 unavailable with Connection: close, held workspace or not, and takes no lease",
  TIMEOUT,
  async () => {
    await withCluster(5_000, async (cluster) => {
      const a = await cluster.start("broker-a");
      const b = await cluster.start("broker-b");
      const held = await runTurn(a, "ws-held");
      a.ownership.drain();
      const refused = await sendTurn(a, "ws-new");
      assert.equal(refused.status, 503);
      assert.equal(refused.headers.get("retry-after"), "1");
      assert.equal(refused.headers.get("x-broker-id"), "broker-a");
      assert.equal((await refused.json()).error.code, "unavailable");
      assert.equal(refused.headers.get("connection"), "close");
      assert.equal(await cluster.store.read("ws-new"), null);
      // Its own workspaces too: it finishes the turns it runs and starts no new one, so it
      // can let go of them.
      const again = await sendTurn(a, "ws-held", { threadId: held.threadId });
      assert.equal(again.status, 503);
      assert.equal((await again.json()).error.code, "unavailable");
      // Another broker takes the new workspace.
      assert.equal((await runTurn(b, "ws-new")).brokerId, "broker-b");
    });
  },
);

// --- races ---------------------------------------------------------------------------------

test(
  "concurrent first turns of a new workspace spread over three brokers all run on one owner",
  TIMEOUT,
  async () => {
    await withCluster(5_000, async (cluster) => {
      const brokers = [
        await cluster.start("broker-a", { handOver: false }),
        await cluster.start("broker-b", { handOver: false }),
        await cluster.start("broker-c", { handOver: false }),
      ];
      const owners = new Map<string, string>();
      for (const workspaceId of ["ws-race-1", "ws-race-2", "ws-race-3"]) {
        const answers = await Promise.all(
          Array.from({ length: 10 }, (_, i) => runTurn(brokers[i % 3]!, workspaceId)),
        );
        const ids = new Set(answers.map((answer) => answer.brokerId));
        assert.equal(ids.size, 1, `one owner for ${workspaceId}, not ${[...ids].join(", ")}`);
        const [owner] = ids;
        assert.equal((await cluster.store.read(workspaceId))?.owner, owner);
        owners.set(workspaceId, owner!);
      }
      for (const broker of brokers) {
        const owned = [...owners].filter(([, owner]) => owner === broker.id).map(([id]) => id);
        assert.deepEqual(broker.resolved, owned, `the codex ${broker.id} started`);
        assert.equal(broker.received("turn/start").length, 10 * owned.length, broker.id);
        assert.deepEqual(broker.ownership.held.sort(), owned);
      }
    });
  },
);

// --- bearer tokens ------------------------------------------------------------------------

test(
  "a token caller's turn forwarded to the owner is authenticated there with the caller's own token, and the owner's log names its subject",
  TIMEOUT,
  async () => {
    const key = "placement-test-hs256-key-32-bytes!";
    const tokens = createTokenVerifier({ secret: key });
    const sign = (workspaces: string[]) =>
      new SignJWT({ sub: "alice", workspaces, scope: "turns:write" })
        .setProtectedHeader({ alg: "HS256" })
        .setExpirationTime("5m")
        .sign(new TextEncoder().encode(key));
    await withCluster(5_000, async (cluster) => {
      const logs: Record<string, unknown>[] = [];
      const a = await cluster.start("broker-a", {
        handOver: false,
        handler: { tokens, log: (entry) => logs.push(entry) },
      });
      const b = await cluster.start("broker-b", { handOver: false, handler: { tokens } });
      // The token is the only credential: no X-Internal-Secret goes along.
      const headers = { authorization: `Bearer ${await sign(["ws-1"])}` };
      const send = async (broker: Broker, token: Record<string, string>) => {
        const response = await fetch(`${broker.url}/api/workspaces/ws-1/turns`, {
          method: "POST",
          signal: broker.clients,
          headers: { "content-type": "application/json", authorization: token.authorization! },
          body: JSON.stringify({ params: { input } }),
        });
        return { response, body: await response.json() };
      };
      const first = await send(a, headers);
      assert.equal(first.response.status, 200, JSON.stringify(first.body));
      const relayed = await send(b, headers);
      assert.equal(relayed.response.status, 200, JSON.stringify(relayed.body));
      assert.equal(relayed.response.headers.get("x-broker-id"), "broker-a");
      const turns = logs.filter((entry) => entry.msg === "turn");
      assert.deepEqual(turns.map((entry) => [entry.principal, entry.forwardedBy ?? null]), [
        ["alice", null],
        ["alice", "broker-b"],
      ]);
      // A token for another workspace is refused by the broker it reaches, never forwarded.
      const other = await send(b, { authorization: `Bearer ${await sign(["ws-2"])}` });
      assert.equal(other.response.status, 403);
      assert.equal(other.body.error.code, "forbiddenWorkspace");
      assert.equal(a.received("turn/start").length, 2);
    });
  },
);

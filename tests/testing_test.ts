/**
 * The `./testing` entry point: the fake app-server (its own RFC 6455 server, checked against
 * the runtime's `WebSocket`, `Conn` and a hand-written raw client), the loopback model with
 * the throwaway `CODEX_HOME` driving the real codex, and the module's doc example.
 */

import { test } from "./_test.ts";
import { codexSchema } from "./_schema.ts";
import { isAlive } from "./_wait.ts";
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { createHash } from "node:crypto";
import { mkdtemp, realpath, rm } from "node:fs/promises";
import { connect, type Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import process from "node:process";
import { fileURLToPath } from "node:url";
import { Conn, DialError } from "../mod.ts";
import { createCodexResolver } from "../src/supervisor.ts";
import {
  agentMessage,
  codexLike,
  type FakeMessage,
  makeCodexHome,
  reply,
  startFakeAppServer,
  startMockModel,
  turnObject,
} from "../src/testing.ts";

const BIG = 200 * 1024;

function text(value: string) {
  return { input: [{ type: "text", text: value, text_elements: [] }] };
}

/** Opens the runtime's own WebSocket client and waits for the open event. */
function openWebSocket(url: string): Promise<WebSocket> {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url);
    ws.onopen = () => resolve(ws);
    ws.onerror = () => reject(new Error(`Cannot open ${url}`));
  });
}

function nextMessage(ws: WebSocket): Promise<string> {
  return new Promise((resolve) => {
    ws.onmessage = (event) => resolve(String(event.data));
  });
}

function closeEvent(ws: WebSocket): Promise<{ code: number; reason: string }> {
  return new Promise((resolve) => {
    ws.onclose = (event) => resolve({ code: event.code, reason: event.reason });
  });
}

test("Conn.turn() against startFakeAppServer() returns the turn when turn/completed comes before the turn/start response", async () => {
  const server = await startFakeAppServer({
    async script(peer) {
      const start = await peer.expect("thread/start");
      peer.reply(start, { thread: { id: "thr-1" }, model: "mock" });
      const turnStart = await peer.expect("turn/start");
      assert.equal(turnStart.params.threadId, "thr-1");
      const item = agentMessage("msg-1", "scripted answer");
      peer.notify("item/completed", { threadId: "thr-1", turnId: "turn-1", item });
      peer.notify("turn/completed", {
        threadId: "thr-1",
        turn: turnObject("turn-1", { items: [item] }),
      });
      peer.reply(turnStart, { turn: turnObject("turn-1", { status: "inProgress" }) });
    },
  });
  try {
    const conn = await Conn.dial(server.url);
    const threadId = await conn.startThread();
    const turn = await conn.turn(threadId, text("hi"));
    assert.equal(threadId, "thr-1");
    assert.equal(turn.id, "turn-1");
    assert.equal(turn.status, "completed");
    assert.deepEqual(turn.items.map((item) => item.text), ["scripted answer"]);
    await server.scriptsDone();
    conn.close();
    await conn.finished;
  } finally {
    await server.close();
  }
});

test("startFakeAppServer() with a token refuses an upgrade without it with 401 and accepts the bearer", async () => {
  const server = await startFakeAppServer({ token: "t0ken", script: (peer) => codexLike(peer) });
  try {
    await assert.rejects(Conn.dial(server.url), (error: unknown) => {
      assert.ok(error instanceof DialError);
      assert.equal(error.status, 401);
      return true;
    });
    await assert.rejects(Conn.dial(server.url, { headers: { Authorization: "Bearer wrong" } }));
    const conn = await Conn.dial(server.url, { headers: { Authorization: "Bearer t0ken" } });
    const peer = await server.nextPeer();
    assert.equal(peer.headers.authorization, "Bearer t0ken");
    const turn = await conn.turn(await conn.startThread(), text("hi"));
    assert.equal(turn.status, "completed");
    conn.close();
    await conn.finished;
  } finally {
    await server.close();
  }
});

test("startFakeAppServer() carries messages larger than 64 KiB both ways through Conn", async () => {
  const server = await startFakeAppServer({
    script: (peer) => codexLike(peer, { text: (input) => `${JSON.stringify(input)}`.repeat(2) }),
  });
  try {
    const conn = await Conn.dial(server.url);
    const prompt = "p".repeat(BIG);
    const turn = await conn.turn(await conn.startThread(), text(prompt));
    const answer = turn.items.find((item) => item.type === "agentMessage");
    assert.ok(typeof answer?.text === "string");
    assert.ok(answer.text.length > 2 * BIG);
    assert.ok(answer.text.includes(prompt));
    conn.close();
    await conn.finished;
  } finally {
    await server.close();
  }
});

test("FakePeer.sendRaw() fragments a message that the runtime's WebSocket reassembles", async () => {
  const server = await startFakeAppServer({ handshake: false });
  try {
    const ws = await openWebSocket(server.url);
    const peer = await server.nextPeer();
    const message = JSON.stringify({ method: "big", params: { s: "é".repeat(BIG) } });
    const received = nextMessage(ws);
    peer.sendRaw(message, { fragmentSize: 4096 });
    assert.equal(await received, message);
    const closed = closeEvent(ws);
    peer.close(4000, "bye");
    assert.deepEqual(await closed, { code: 4000, reason: "bye" });
    assert.equal((await peer.closed).code, 4000);
  } finally {
    await server.close();
  }
});

test("FakePeer receives a large message from the runtime's WebSocket and sees its close code", async () => {
  const server = await startFakeAppServer({ handshake: false });
  try {
    const ws = await openWebSocket(server.url);
    const peer = await server.nextPeer();
    const message = { method: "big", params: { s: "x".repeat(BIG) } };
    ws.send(JSON.stringify(message));
    assert.deepEqual(await peer.next(), message);
    const closed = closeEvent(ws);
    ws.close(4001, "done");
    assert.deepEqual(await peer.closed, { code: 4001, reason: "done" });
    await closed;
  } finally {
    await server.close();
  }
});

/** A masked client frame, as RFC 6455 §5.2 lays it out. */
function clientFrame(opcode: number, payload: Uint8Array, fin: boolean): Uint8Array {
  const length = payload.length;
  const header = length < 126 ? 2 : length <= 0xffff ? 4 : 10;
  const out = new Uint8Array(header + 4 + length);
  const view = new DataView(out.buffer);
  out[0] = (fin ? 0x80 : 0) | opcode;
  if (length < 126) out[1] = 0x80 | length;
  else if (length <= 0xffff) {
    out[1] = 0x80 | 126;
    view.setUint16(2, length);
  } else {
    out[1] = 0x80 | 127;
    view.setBigUint64(2, BigInt(length));
  }
  const mask = [0x12, 0x34, 0x56, 0x78];
  out.set(mask, header);
  for (let i = 0; i < length; i++) out[header + 4 + i] = payload[i]! ^ mask[i & 3]!;
  return out;
}

/** A raw TCP client: the upgrade, then whatever frames the test writes. */
async function rawClient(
  port: number,
): Promise<{ socket: Socket; bytes: (count: number) => Promise<Uint8Array> }> {
  const key = btoa("0123456789abcdef");
  const socket = connect(port, "127.0.0.1");
  let received = new Uint8Array(0);
  const waiters = new Set<() => void>();
  let upgradedYet = false;
  const upgraded = new Promise<void>((resolve, reject) => {
    socket.on("data", (chunk: Uint8Array) => {
      const merged = new Uint8Array(received.length + chunk.length);
      merged.set(received);
      merged.set(chunk, received.length);
      received = merged;
      for (const waiter of waiters) waiter();
      if (upgradedYet) return;
      const head = new TextDecoder().decode(received);
      const end = head.indexOf("\r\n\r\n");
      if (end === -1) return;
      const expected = createHash("sha1").update(key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11")
        .digest("base64");
      if (!head.startsWith("HTTP/1.1 101") || !head.includes(`Sec-WebSocket-Accept: ${expected}`)) {
        reject(new Error(`Unexpected upgrade answer: ${head.slice(0, end)}`));
      }
      received = received.subarray(end + 4);
      upgradedYet = true;
      resolve();
    });
    socket.once("error", reject);
  });
  socket.write(
    "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
      `Sec-WebSocket-Key: ${key}\r\nSec-WebSocket-Version: 13\r\n\r\n`,
  );
  await upgraded;
  // Resolves with the first `count` bytes after the upgrade, once that many arrived.
  function bytes(count: number): Promise<Uint8Array> {
    return new Promise((resolve, reject) => {
      // A missing frame fails the test with what did arrive, rather than hanging it.
      const timer = setTimeout(() => {
        waiters.delete(check);
        reject(new Error(`Got ${received.length} of ${count} bytes: ${[...received]}`));
      }, 5_000);
      const check = () => {
        if (received.length < count) return;
        clearTimeout(timer);
        waiters.delete(check);
        resolve(received.subarray(0, count));
      };
      waiters.add(check);
      check();
    });
  }
  return { socket, bytes };
}

test("FakePeer reassembles fragmented client frames with a ping between them and 64-bit lengths", async () => {
  const server = await startFakeAppServer({ handshake: false });
  try {
    const { socket, bytes: firstBytes } = await rawClient(server.port);
    const peer = await server.nextPeer();
    const bytes = new TextEncoder().encode(
      JSON.stringify({ method: "fragmented", params: { s: "y".repeat(BIG) } }),
    );
    const third = Math.floor(bytes.length / 3);
    socket.write(clientFrame(0x1, bytes.subarray(0, third), false));
    socket.write(clientFrame(0x9, new TextEncoder().encode("ping!"), true));
    socket.write(clientFrame(0x0, bytes.subarray(third, 2 * third), false));
    socket.write(clientFrame(0x0, bytes.subarray(2 * third), true));
    const message: FakeMessage = await peer.next();
    assert.equal(message.method, "fragmented");
    assert.equal(message.params.s.length, BIG);
    // The pong went out before the message completed: opcode 0xA, payload "ping!".
    assert.deepEqual([...await firstBytes(7)], [0x8a, 5, ...new TextEncoder().encode("ping!")]);
    const ended = new Promise<void>((resolve) => socket.once("close", () => resolve()));
    const closePayload = new Uint8Array([0x03, 0xe8]);
    socket.write(clientFrame(0x8, closePayload, true));
    assert.deepEqual(await peer.closed, { code: 1000, reason: "" });
    await ended;
    // The server answered the close with a close frame of its own.
    assert.deepEqual([...(await firstBytes(11)).subarray(7)], [0x88, 2, 0x03, 0xe8]);
  } finally {
    await server.close();
  }
});

test("FakePeer.sendRaw() with fragmentSize sends a text frame, then continuation frames", async () => {
  const server = await startFakeAppServer({ handshake: false });
  try {
    const { socket, bytes } = await rawClient(server.port);
    const ended = new Promise<void>((resolve) => socket.once("close", () => resolve()));
    const peer = await server.nextPeer();
    peer.sendRaw("abcdefghij", { fragmentSize: 4 });
    const ascii = (value: string) => [...new TextEncoder().encode(value)];
    assert.deepEqual([...await bytes(16)], [
      ...[0x01, 4, ...ascii("abcd")], // text, FIN clear
      ...[0x00, 4, ...ascii("efgh")], // continuation, FIN clear
      ...[0x80, 2, ...ascii("ij")], // continuation, FIN set
    ]);
    peer.terminate();
    await ended;
  } finally {
    await server.close();
  }
});

test("startMockModel() with requireKey answers 401 invalid_api_key without the bearer key", async () => {
  const model = await startMockModel({ requireKey: "sk-test", respond: reply("hi") });
  try {
    const post = (headers: Record<string, string>) =>
      fetch(`${model.baseUrl}/responses`, {
        method: "POST",
        headers: { "content-type": "application/json", ...headers },
        body: JSON.stringify({ model: "mock-model", input: [] }),
      });
    const refused = await post({ authorization: "Bearer wrong" });
    assert.equal(refused.status, 401);
    assert.equal((await refused.json()).error.code, "invalid_api_key");
    assert.equal(model.requests.length, 0);
    const accepted = await post({ authorization: "Bearer sk-test" });
    assert.equal(accepted.status, 200);
    assert.match(await accepted.text(), /event: response\.completed/);
    assert.equal(model.requests.length, 1);
  } finally {
    await model.close();
  }
});

test("The ./testing module example passes under deno test --doc", { timeout: 60_000 }, async () => {
  // The package imports itself by name (`@codex-broker/broker/testing`), which Deno resolves
  // from deno.json without JSR. The real-codex example is `ignore`d there: the next test runs it.
  const root = fileURLToPath(new URL("..", import.meta.url));
  const deno = join(root, "node_modules", ".bin", "deno");
  const { code, output } = await new Promise<{ code: number; output: string }>((resolve) => {
    const child = execFile(
      deno,
      ["test", "--doc", "-A", "src/testing.ts"],
      { cwd: root, env: { ...process.env, NO_COLOR: "1" } },
      (error, stdout, stderr) => resolve({ code: error ? 1 : 0, output: stdout + stderr }),
    );
    child.stdin?.end();
  });
  assert.equal(code, 0, output);
  assert.match(output, /ok \| 1 passed \| 0 failed/);
});

test("The ./testing module example runs a turn against the fake app-server", async () => {
  // The first @example of src/testing.ts, verbatim but for the imports, so that it runs on
  // each runtime of the suite, not only under Deno.
  const server = await startFakeAppServer({
    token: "test-token",
    script: (peer) => codexLike(peer, { text: () => "hello from the fake" }),
  });
  try {
    const conn = await Conn.dial(server.url, {
      headers: { Authorization: "Bearer test-token" },
    });
    const threadId = await conn.startThread();
    const turn = await conn.turn(threadId, {
      input: [{ type: "text", text: "hi", text_elements: [] }],
    });
    assert.equal(turn.status, "completed");
    assert.equal(turn.items.at(-1)?.text, "hello from the fake");
    conn.close();
    await conn.finished;
  } finally {
    await server.close();
  }
});

test("The real codex runs a turn against startMockModel() with a makeCodexHome() home", {
  timeout: 60_000,
}, async () => {
  // The second @example of src/testing.ts, with a workspace directory of its own.
  const dir = await realpath(await mkdtemp(join(tmpdir(), "testing-test-")));
  const model = await startMockModel({ respond: reply("hello from the mock") });
  const home = await makeCodexHome(model.baseUrl);
  const resolver = createCodexResolver({
    codexHome: () => home.path,
    cwd: (id) => join(dir, "workspaces", id),
  });
  let pid: number | undefined;
  try {
    const { url, headers = {} } = await resolver.resolve("ws-1");
    pid = resolver.pid("ws-1");
    const conn = await Conn.dial(url, { headers, handshakeTimeoutMs: 10_000 });
    const threadId = await conn.startThread();
    const turn = await conn.turn(threadId, {
      input: [{ type: "text", text: "hi", text_elements: [] }],
    });
    assert.equal(turn.status, "completed");
    assert.deepEqual(
      turn.items.filter((item) => item.type === "agentMessage").map((item) => item.text),
      ["hello from the mock"],
    );
    assert.equal(model.requests.length, 1);
    assert.equal(model.requests[0]?.lastUserText, "hi");
    assert.equal(model.requests[0]?.body.model, "mock-model");
    conn.close();
    await conn.finished;
  } finally {
    await resolver.close();
    await home.cleanup();
    await model.close();
    await rm(dir, { recursive: true, force: true });
  }
  assert.ok(pid !== undefined);
  assert.equal(isAlive(pid), false);
});

test("codexLike() of ./testing sends only frames codex's own schema accepts", async () => {
  const schema = codexSchema();
  const server = await startFakeAppServer({ script: (peer) => codexLike(peer) });
  const frames: unknown[] = [];
  const methods = new Map<unknown, string>();
  const ws = new WebSocket(server.url);
  try {
    await new Promise((resolve, reject) => {
      ws.onopen = resolve;
      ws.onerror = reject;
    });
    const waiters: {
      match: (frame: { id?: unknown; method?: unknown }) => boolean;
      resolve: () => void;
    }[] = [];
    ws.onmessage = (event) => {
      const frame = JSON.parse(String(event.data));
      frames.push(frame);
      for (const waiter of waiters.splice(0)) {
        if (waiter.match(frame)) waiter.resolve();
        else waiters.push(waiter);
      }
    };
    const until = (match: (frame: { id?: unknown; method?: unknown }) => boolean) => {
      let timer: ReturnType<typeof setTimeout> | undefined;
      return Promise.race([
        new Promise<void>((resolve) => waiters.push({ match, resolve })),
        new Promise<never>((_, reject) => {
          timer = setTimeout(
            () => reject(new Error(`Timed out; got ${frames.length} frames`)),
            5_000,
          );
        }),
      ]).finally(() => clearTimeout(timer));
    };
    const call = (id: number, method: string, params: unknown) => {
      methods.set(id, method);
      const answered = until((frame) => frame.id === id && frame.method === undefined);
      ws.send(JSON.stringify({ id, method, params }));
      return answered;
    };
    await call(0, "initialize", {
      clientInfo: { name: "t", title: "t", version: "0" },
      capabilities: null,
    });
    ws.send(JSON.stringify({ method: "initialized" }));
    await call(1, "thread/start", {});
    const completed = until((frame) => frame.method === "turn/completed");
    await call(2, "turn/start", {
      threadId: "thr-1",
      input: [{ type: "text", text: "hi", text_elements: [] }],
    });
    await completed;
    const violations = frames
      .map((frame) => schema.checkServerFrame(frame, (id) => methods.get(id)))
      .filter((violation) => violation !== undefined)
      .map((violation) => violation.message);
    assert.deepEqual(violations, []);
    assert.ok(frames.length >= 6, `only ${frames.length} frames`);
  } finally {
    ws.close();
    await server.close();
  }
});

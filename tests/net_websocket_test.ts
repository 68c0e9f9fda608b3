import { test } from "./_test.ts";
import { waitFor, within } from "./_wait.ts";
import { codexLike, startFakeAppServer } from "./_fake_app_server.ts";
import { sendUntilStalled } from "./_stall.ts";
import assert from "node:assert/strict";
import { Buffer } from "node:buffer";
import { createHash } from "node:crypto";
import { type AddressInfo, createServer, type Server, type Socket } from "node:net";
import { Conn, ConnectionClosedError } from "../mod.ts";
import { NetWebSocket, openNetWebSocket } from "../src/net_websocket.ts";
import { startWsServer, type WsConnection, type WsServer } from "../src/_testing_ws_server.ts";

const GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
const input = [{ type: "text", text: "hi", text_elements: [] }];

/** What a NetWebSocket reported, in order. */
interface Record {
  events: string[];
  messages: (string | ArrayBuffer)[];
  closed: Promise<CloseEvent>;
  opened: Promise<void>;
  error: string | undefined;
}

function watch(ws: NetWebSocket): Record {
  const record: Record = {
    events: [],
    messages: [],
    error: undefined,
    closed: undefined as unknown as Promise<CloseEvent>,
    opened: undefined as unknown as Promise<void>,
  };
  record.opened = new Promise((resolve) => {
    ws.onopen = () => {
      record.events.push("open");
      resolve();
    };
  });
  record.closed = new Promise((resolve) => {
    ws.onclose = (event) => {
      record.events.push(`close ${event.code}`);
      resolve(event);
    };
  });
  ws.onerror = (event) => {
    record.error = (event as ErrorEvent).message;
    record.events.push("error");
  };
  ws.onmessage = (event) => {
    record.messages.push(event.data);
  };
  return record;
}

/** A ws server on `src/_testing_ws_server.ts` that hands each connection to `onConnection`. */
async function wsServer(
  onConnection: (
    connection: WsConnection,
    headers: Readonly<globalThis.Record<string, unknown>>,
  ) => void,
): Promise<WsServer> {
  return await startWsServer({
    authorize: (request) => request.headers.authorization === "Bearer t0ken" ? true : 401,
    onConnection: (connection, request) => onConnection(connection, request.headers),
  });
}

/** Client frames as the server reads them: unmasked. */
function readClientFrames(bytes: Buffer): { opcode: number; payload: Buffer }[] {
  const frames: { opcode: number; payload: Buffer }[] = [];
  let at = 0;
  while (at + 2 <= bytes.length) {
    const opcode = bytes[at]! & 0x0f;
    let length = bytes[at + 1]! & 0x7f;
    let offset = at + 2;
    if (length === 126) {
      length = bytes.readUInt16BE(offset);
      offset += 2;
    } else if (length === 127) {
      length = Number(bytes.readBigUInt64BE(offset));
      offset += 8;
    }
    const mask = bytes.subarray(offset, offset + 4);
    offset += 4;
    if (offset + length > bytes.length) break;
    const payload = Buffer.from(bytes.subarray(offset, offset + length));
    for (let i = 0; i < payload.length; i++) payload[i]! ^= mask[i & 3]!;
    frames.push({ opcode, payload });
    at = offset + length;
  }
  return frames;
}

/** A server frame (unmasked unless `mask`). */
function serverFrame(
  opcode: number,
  payload: Buffer,
  options: { fin?: boolean; mask?: boolean } = {},
): Buffer {
  const head = Buffer.from([(options.fin === false ? 0 : 0x80) | opcode, payload.length]);
  if (!options.mask) return Buffer.concat([head, payload]);
  head[1]! |= 0x80;
  return Buffer.concat([head, Buffer.from([0, 0, 0, 0]), payload]);
}

/**
 * A TCP server that answers the upgrade with `answer(key)` and then runs `script` on the
 * socket, with what the client has sent so far.
 */
async function rawServer(
  answer: (key: string) => string,
  script: (socket: Socket, received: () => Buffer) => void = () => {},
): Promise<{ url: string; close(): Promise<void> }> {
  const sockets = new Set<Socket>();
  const server: Server = createServer((socket) => {
    sockets.add(socket);
    socket.on("close", () => sockets.delete(socket));
    socket.on("error", () => {});
    let buffer = Buffer.alloc(0);
    let upgraded = false;
    socket.on("data", (chunk: Buffer) => {
      buffer = Buffer.concat([buffer, chunk]);
      if (upgraded) return;
      const end = buffer.indexOf("\r\n\r\n");
      if (end === -1) return;
      upgraded = true;
      const key = /sec-websocket-key: (\S+)/i.exec(buffer.subarray(0, end).toString())![1]!;
      buffer = buffer.subarray(end + 4);
      socket.write(answer(key));
      script(socket, () => buffer);
    });
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address() as AddressInfo;
  return {
    url: `ws://127.0.0.1:${port}/`,
    async close() {
      for (const socket of sockets) socket.destroy();
      await new Promise((resolve) => server.close(resolve));
    },
  };
}

function accepted(key: string): string {
  const accept = createHash("sha1").update(key + GUID).digest("base64");
  return "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
    `Sec-WebSocket-Accept: ${accept}\r\n\r\n`;
}

test("NetWebSocket opens with the upgrade headers and carries text and binary messages of every length encoding both ways", async () => {
  const received: (string | Uint8Array)[] = [];
  let headers: Readonly<globalThis.Record<string, unknown>> = {};
  const server = await wsServer((connection, h) => {
    headers = h;
    connection.onmessage = (data) => {
      received.push(data);
      connection.send(data); // echo
    };
  });
  const ws = new NetWebSocket(`ws://127.0.0.1:${server.port}/path?x=1`, {
    authorization: "Bearer t0ken",
  });
  const record = watch(ws);
  try {
    await within(record.opened, 5_000, "the open");
    assert.equal(ws.readyState, 1);
    assert.equal(headers.authorization, "Bearer t0ken");
    const texts = ["short", "é".repeat(100), "x".repeat(70_000)];
    for (const text of texts) ws.send(text);
    const bytes = new Uint8Array([0, 1, 2, 255]);
    ws.send(bytes);
    await waitFor("the echoes", () => record.messages.length === 4);
    assert.deepEqual(record.messages.slice(0, 3), texts);
    assert.deepEqual(new Uint8Array(record.messages[3] as ArrayBuffer), bytes);
    assert.deepEqual(received.slice(0, 3), texts);
    ws.close(1000, "done");
    const closed = await within(record.closed, 5_000, "the close");
    assert.equal(closed.code, 1000);
    assert.equal(closed.wasClean, true);
    assert.equal(ws.readyState, 3);
    assert.equal(record.error, undefined);
  } finally {
    await server.close();
  }
});

test("NetWebSocket writes the frames sent in one event-loop turn together, in order, and counts them in bufferedAmount until then", async () => {
  let reads = 0;
  let client: Buffer = Buffer.alloc(0);
  const server = await rawServer(accepted, (socket, received) => {
    socket.on("data", () => {
      reads++;
      client = received();
    });
  });
  const ws = new NetWebSocket(server.url);
  const record = watch(ws);
  try {
    await within(record.opened, 5_000, "the open");
    for (let i = 0; i < 200; i++) ws.send(`message ${i}`);
    // 9 to 11 bytes of text each, with 2 of header and 4 of mask: all still queued.
    assert.equal(ws.bufferedAmount, 10 * 15 + 90 * 16 + 100 * 17);
    await waitFor("the messages", () => readClientFrames(client).length === 200);
    assert.deepEqual(
      readClientFrames(client).map((frame) => frame.payload.toString()),
      Array.from({ length: 200 }, (_, i) => `message ${i}`),
    );
    // One write: one read or two on the other side, where a write per frame makes dozens.
    assert.ok(reads <= 2, `the server read ${reads} times`);
    assert.equal(ws.bufferedAmount, 0);
  } finally {
    ws.close();
    await server.close();
    await within(record.closed, 5_000, "the close");
  }
});

test("NetWebSocket joins a fragmented message, answers a ping with its payload, and ignores a pong", async () => {
  let client: Buffer = Buffer.alloc(0);
  const server = await rawServer(accepted, (socket, received) => {
    socket.write(Buffer.concat([
      serverFrame(0x1, Buffer.from("hel"), { fin: false }),
      serverFrame(0x9, Buffer.from("ping!")),
      serverFrame(0xa, Buffer.from("pong")),
      serverFrame(0x0, Buffer.from("lo"), { fin: false }),
      serverFrame(0x0, Buffer.from(" world")),
    ]));
    socket.on("data", () => (client = received()));
  });
  const ws = new NetWebSocket(server.url);
  const record = watch(ws);
  try {
    await waitFor("the message", () => record.messages.length === 1);
    assert.deepEqual(record.messages, ["hello world"]);
    await waitFor("the pong", () => readClientFrames(client).length === 1);
    const [pong] = readClientFrames(client);
    assert.equal(pong!.opcode, 0xa);
    assert.equal(pong!.payload.toString(), "ping!");
  } finally {
    ws.close();
    await server.close();
    await within(record.closed, 5_000, "the close");
  }
});

test("NetWebSocket reads frames whose headers and payloads arrive split at every boundary, in pieces of 1 byte and up", async () => {
  // Unmasked server frames with 7-, 16- and 64-bit lengths, a fragmented message, a ping.
  const header = (first: number, length: number) => {
    if (length < 126) return Buffer.from([first, length]);
    if (length < 0x10000) {
      const head = Buffer.from([first, 126, 0, 0]);
      head.writeUInt16BE(length, 2);
      return head;
    }
    const head = Buffer.alloc(10);
    head[0] = first;
    head[1] = 127;
    head.writeBigUInt64BE(BigInt(length), 2);
    return head;
  };
  const texts = ["a", "é".repeat(150), "c".repeat(70_000)];
  const stream = Buffer.concat([
    ...texts.flatMap((text) => {
      const payload = Buffer.from(text);
      return [header(0x81, payload.length), payload];
    }),
    header(0x01, 3),
    Buffer.from("hel"),
    header(0x89, 5),
    Buffer.from("ping!"),
    header(0x80, 300),
    Buffer.from("l".repeat(300)),
  ]);
  let client: Buffer = Buffer.alloc(0);
  const server = await rawServer(accepted, (socket, received) => {
    socket.setNoDelay(true);
    socket.on("data", () => (client = received()));
    const sizes = [1, 2, 3, 5, 7, 11, 4096];
    void (async () => {
      for (let at = 0, i = 0; at < stream.length; i++) {
        const size = sizes[i % sizes.length]!;
        socket.write(stream.subarray(at, at + size));
        at += size;
        // Each piece its own read, as far as the kernel lets it.
        await new Promise((resolve) => setTimeout(resolve, 1));
      }
    })();
  });
  const ws = new NetWebSocket(server.url);
  const record = watch(ws);
  try {
    await waitFor("the messages", () => record.messages.length === 4, 10_000);
    assert.deepEqual(record.messages, [...texts, `hel${"l".repeat(300)}`]);
    await waitFor("the pong", () => readClientFrames(client).length === 1);
    assert.equal(readClientFrames(client)[0]!.payload.toString(), "ping!");
    assert.equal(record.error, undefined);
  } finally {
    ws.close();
    await server.close();
    await within(record.closed, 5_000, "the close");
  }
});

test("NetWebSocket reports the server's close code and reason as a clean close, with no error", async () => {
  const server = await wsServer((connection) => connection.close(4001, "bye now"));
  const ws = new NetWebSocket(`ws://127.0.0.1:${server.port}/`, { authorization: "Bearer t0ken" });
  const record = watch(ws);
  try {
    const closed = await within(record.closed, 5_000, "the close");
    assert.deepEqual([closed.code, closed.reason, closed.wasClean], [4001, "bye now", true]);
    assert.deepEqual(record.events, ["open", "close 4001"]);
  } finally {
    await server.close();
  }
});

test("NetWebSocket reports a connection that ends without a close frame as close 1006, not an error", async () => {
  const server = await rawServer(accepted, (socket) => setTimeout(() => socket.end(), 10));
  const ws = new NetWebSocket(server.url);
  const record = watch(ws);
  try {
    const closed = await within(record.closed, 5_000, "the close");
    assert.deepEqual([closed.code, closed.wasClean], [1006, false]);
    assert.deepEqual(record.events, ["open", "close 1006"]);
  } finally {
    await server.close();
  }
});

for (
  const { why, answer } of [
    {
      why: "a refused upgrade (401)",
      answer: () => "HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n",
    },
    {
      why: "a wrong Sec-WebSocket-Accept",
      answer: () => accepted("another key"),
    },
    {
      why: "an extension nobody asked for",
      answer: (key: string) =>
        accepted(key).replace(
          "\r\n\r\n",
          "\r\nSec-WebSocket-Extensions: permessage-deflate\r\n\r\n",
        ),
    },
  ]
) {
  test(`NetWebSocket fails the connection on ${why}: error, then close 1006, never open`, async () => {
    const server = await rawServer(answer);
    const ws = new NetWebSocket(server.url);
    const record = watch(ws);
    try {
      const closed = await within(record.closed, 5_000, "the close");
      assert.equal(closed.code, 1006);
      assert.deepEqual(record.events, ["error", "close 1006"]);
      assert.match(record.error!, /Unexpected server response/);
    } finally {
      await server.close();
    }
  });
}

test("NetWebSocket fails a connection refused at the TCP level with an error, then close 1006", async () => {
  const server = await rawServer(accepted);
  const url = server.url;
  await server.close();
  const ws = new NetWebSocket(url);
  const record = watch(ws);
  const closed = await within(record.closed, 5_000, "the close");
  assert.equal(closed.code, 1006);
  assert.deepEqual(record.events, ["error", "close 1006"]);
  assert.match(record.error!, /ECONNREFUSED|refused/i);
});

for (
  const { why, frame, code } of [
    {
      why: "a masked frame",
      frame: serverFrame(0x1, Buffer.from("x"), { mask: true }),
      code: 1002,
    },
    {
      why: "text that is not UTF-8",
      frame: serverFrame(0x1, Buffer.from([0xff, 0xfe])),
      code: 1007,
    },
    { why: "an unknown opcode", frame: serverFrame(0x3, Buffer.from("x")), code: 1002 },
    {
      why: "a continuation with no message",
      frame: serverFrame(0x0, Buffer.from("x")),
      code: 1002,
    },
  ]
) {
  test(`NetWebSocket fails the connection on ${why}, sending close ${code} first`, async () => {
    let client: Buffer = Buffer.alloc(0);
    const server = await rawServer(accepted, (socket, received) => {
      socket.write(frame);
      socket.on("data", () => (client = received()));
      socket.on("end", () => (client = received()));
    });
    const ws = new NetWebSocket(server.url);
    const record = watch(ws);
    try {
      const closed = await within(record.closed, 5_000, "the close");
      assert.equal(closed.code, 1006);
      assert.deepEqual(record.events, ["open", "error", "close 1006"]);
      assert.deepEqual(record.messages, []);
      await waitFor("the close frame", () => readClientFrames(client).length === 1);
      const [close] = readClientFrames(client);
      assert.equal(close!.opcode, 0x8);
      assert.equal(close!.payload.readUInt16BE(0), code);
    } finally {
      await server.close();
    }
  });
}

test("NetWebSocket refuses a URL other than ws: and a header that would break the request", () => {
  assert.throws(() => new NetWebSocket("wss://127.0.0.1:1/"), SyntaxError);
  assert.throws(() => new NetWebSocket("http://127.0.0.1:1/"), SyntaxError);
  assert.throws(
    () => new NetWebSocket("ws://127.0.0.1:1/", { authorization: "Bearer x\r\nX-Evil: 1" }),
    SyntaxError,
  );
  assert.throws(() => new NetWebSocket("ws://127.0.0.1:1/", { "bad name": "x" }), SyntaxError);
});

test("NetWebSocket.send() throws while connecting; close() then abandons the connection", async () => {
  const server = await rawServer(() => "");
  const ws = new NetWebSocket(server.url);
  const record = watch(ws);
  try {
    assert.throws(
      () => ws.send("x"),
      (error: unknown) => (error as DOMException).name === "InvalidStateError",
    );
    ws.close();
    const closed = await within(record.closed, 5_000, "the close");
    assert.equal(closed.code, 1006);
    assert.equal(record.events.includes("open"), false);
  } finally {
    await server.close();
  }
});

test("Conn over openNetWebSocket runs a turn with the token header, and a peer that goes away settles it with ConnectionClosedError", async () => {
  const server = await startFakeAppServer((peer) => codexLike(peer), { token: "t0ken" });
  const conn = await Conn.dial(server.url, {
    webSocket: openNetWebSocket,
    headers: { authorization: "Bearer t0ken" },
  });
  try {
    const threadId = await conn.startThread();
    const turn = await conn.turn(threadId, { input });
    assert.equal(turn.status, "completed");
    const peer = server.peers[0]!;
    const hanging = conn.request("thread/list", undefined, { timeoutMs: 5_000 });
    await waitFor("the call", () => peer.received.some((m) => m.method === "thread/list"));
    peer.ws.terminate();
    await assert.rejects(hanging, ConnectionClosedError);
    assert.equal(conn.closed, true);
  } finally {
    conn.close();
    await conn.finished;
    await server.close();
  }
});

test("Conn over openNetWebSocket closes as stalled once codex stops reading, on every runtime", async () => {
  let answered = false;
  const server = await rawServer(accepted, (socket, received) => {
    const answer = () => {
      if (answered) return;
      const init = readClientFrames(received()).find((frame) => frame.opcode === 0x1);
      if (!init) return;
      answered = true;
      const { id } = JSON.parse(init.payload.toString()) as { id: number };
      socket.write(serverFrame(0x1, Buffer.from(JSON.stringify({ id, result: {} }))));
      // From here on, codex reads nothing.
      socket.pause();
    };
    socket.on("data", answer);
    answer();
  });
  const conn = await Conn.dial(server.url, {
    webSocket: openNetWebSocket,
    maxSendBufferBytes: 1024 * 1024,
    requestTimeoutMs: 60_000,
  });
  try {
    const last = await sendUntilStalled(conn);
    assert.match(last.message, /codex stopped reading \(\d+ bytes unsent/);
  } finally {
    conn.close();
    await server.close();
    await within(conn.finished, 5_000, "the socket to close");
  }
});

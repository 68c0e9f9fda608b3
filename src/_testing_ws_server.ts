/**
 * A small RFC 6455 WebSocket server on `node:http` (Deno, Bun and Node all provide it), so the
 * `./testing` kit needs no npm package. It speaks what a test server needs: the handshake,
 * masked client frames, text, binary, close, ping and pong, fragmented messages in both
 * directions, and 16- and 64-bit payload lengths.
 *
 * @module
 */

import { createServer, type IncomingMessage, type Server } from "node:http";
import type { AddressInfo, Socket } from "node:net";
import type { Duplex } from "node:stream";
import {
  acceptKey,
  OP_BINARY,
  OP_CLOSE,
  OP_CONTINUATION,
  OP_PING,
  OP_PONG,
  OP_TEXT,
} from "./_ws_protocol.ts";

// How long close() waits for the client's close frame before it drops the socket.
const CLOSE_GRACE_MS = 1_000;

/** Upgrade request headers, as `node:http` gives them (lower-case names). */
export type WsHeaders = Readonly<Record<string, string | string[] | undefined>>;

/** How a connection ended. */
export interface WsCloseInfo {
  /** The close code the peer sent, or 1006 when the socket ended without a close frame. */
  readonly code: number;
  /** The close reason the peer sent. */
  readonly reason: string;
}

/** Options for {@linkcode WsConnection.send}. */
export interface WsSendOptions {
  /** Splits the message into frames of at most this many payload bytes. */
  fragmentSize?: number;
}

/** What the server hands over for each accepted connection. */
export interface WsServerOptions {
  /** Decides whether an upgrade is accepted; a refused one gets this HTTP status. */
  authorize(request: IncomingMessage): true | number;
  /** Called with each open connection. */
  onConnection(connection: WsConnection, request: IncomingMessage): void;
  /** HTTP status for a plain (non-upgrade) request that `authorize` accepts. */
  plainStatus?: number;
}

/** A running server. */
export interface WsServer {
  readonly port: number;
  /** Drops every connection and stops listening. */
  close(): Promise<void>;
}

/** One server-side WebSocket connection. */
export class WsConnection {
  /** Resolves once the socket has closed, with the close the peer sent. */
  readonly closed: Promise<WsCloseInfo>;
  /** Called with every complete text or binary message. */
  onmessage: (data: string | Uint8Array) => void = () => {};
  #socket: Duplex;
  #buffer: Uint8Array = new Uint8Array(0);
  #fragments: Uint8Array[] = [];
  #fragmentOpcode = 0;
  #closeSent = false;
  #closeInfo: WsCloseInfo | undefined;
  #closeTimer: ReturnType<typeof setTimeout> | undefined;
  #ended = false;

  constructor(socket: Duplex, head: Uint8Array) {
    this.#socket = socket;
    this.closed = new Promise((resolve) => {
      socket.once("close", () => {
        this.#ended = true;
        if (this.#closeTimer !== undefined) clearTimeout(this.#closeTimer);
        resolve(this.#closeInfo ?? { code: 1006, reason: "" });
      });
    });
    socket.on("error", () => socket.destroy());
    socket.on("data", (chunk: Uint8Array) => this.#receive(chunk));
    if (head.length > 0) queueMicrotask(() => this.#receive(head));
  }

  /** Whether the socket can still carry messages. */
  get open(): boolean {
    return !this.#ended && !this.#closeSent;
  }

  /** Sends a text (string) or binary message, optionally split into fragments. */
  send(data: string | Uint8Array, options: WsSendOptions = {}): void {
    if (!this.open) return;
    const payload = typeof data === "string" ? new TextEncoder().encode(data) : data;
    const opcode = typeof data === "string" ? OP_TEXT : OP_BINARY;
    const size = options.fragmentSize ?? payload.length;
    if (!(size > 0) || payload.length <= size) {
      this.#write(frame(opcode, payload, true));
      return;
    }
    for (let offset = 0; offset < payload.length; offset += size) {
      const last = offset + size >= payload.length;
      const op = offset === 0 ? opcode : OP_CONTINUATION;
      this.#write(frame(op, payload.subarray(offset, offset + size), last));
    }
  }

  /** Starts the closing handshake; the socket is dropped if the peer does not answer. */
  close(code = 1000, reason = ""): void {
    if (this.#ended || this.#closeSent) return;
    this.#sendClose(code, reason);
    this.#closeTimer = setTimeout(() => this.#socket.destroy(), CLOSE_GRACE_MS);
  }

  /** Drops the socket without a closing handshake. */
  terminate(): void {
    this.#socket.destroy();
  }

  #sendClose(code: number, reason: string): void {
    this.#closeSent = true;
    const text = new TextEncoder().encode(reason);
    const payload = new Uint8Array(2 + text.length);
    new DataView(payload.buffer).setUint16(0, code);
    payload.set(text, 2);
    this.#write(frame(OP_CLOSE, payload, true));
  }

  #write(bytes: Uint8Array): void {
    if (!this.#ended) this.#socket.write(bytes);
  }

  #receive(chunk: Uint8Array): void {
    this.#buffer = this.#buffer.length === 0 ? chunk : concat([this.#buffer, chunk]);
    while (!this.#ended) {
      const parsed = parseFrame(this.#buffer);
      if (parsed === undefined) return;
      if (parsed === "invalid") {
        this.#fail(1002);
        return;
      }
      this.#buffer = this.#buffer.subarray(parsed.length);
      this.#onFrame(parsed.fin, parsed.opcode, parsed.payload);
    }
  }

  #onFrame(fin: boolean, opcode: number, payload: Uint8Array): void {
    if (opcode === OP_CLOSE) {
      const view = new DataView(payload.buffer, payload.byteOffset, payload.byteLength);
      this.#closeInfo = {
        code: payload.length >= 2 ? view.getUint16(0) : 1005,
        reason: new TextDecoder().decode(payload.subarray(2)),
      };
      if (!this.#closeSent) {
        this.#sendClose(this.#closeInfo.code === 1005 ? 1000 : this.#closeInfo.code, "");
      }
      this.#socket.end();
      return;
    }
    if (opcode === OP_PING) {
      this.#write(frame(OP_PONG, payload, true));
      return;
    }
    if (opcode === OP_PONG) return;
    if (opcode === OP_CONTINUATION) {
      if (this.#fragmentOpcode === 0) return this.#fail(1002);
      this.#fragments.push(payload.slice());
      if (!fin) return;
      const whole = concat(this.#fragments);
      const type = this.#fragmentOpcode;
      this.#fragments = [];
      this.#fragmentOpcode = 0;
      this.#deliver(type, whole);
      return;
    }
    if (opcode !== OP_TEXT && opcode !== OP_BINARY) return this.#fail(1002);
    if (this.#fragmentOpcode !== 0) return this.#fail(1002);
    if (!fin) {
      this.#fragmentOpcode = opcode;
      this.#fragments = [payload.slice()];
      return;
    }
    this.#deliver(opcode, payload.slice());
  }

  #deliver(opcode: number, payload: Uint8Array): void {
    this.onmessage(opcode === OP_TEXT ? new TextDecoder().decode(payload) : payload);
  }

  #fail(code: number): void {
    if (!this.#closeSent) this.#sendClose(code, "");
    this.#socket.end();
  }
}

/** Starts a WebSocket server on 127.0.0.1 and a random port. */
export async function startWsServer(options: WsServerOptions): Promise<WsServer> {
  const sockets = new Set<Duplex>();
  const connections = new Set<WsConnection>();
  const http: Server = createServer((req, res) => {
    const verdict = options.authorize(req);
    res.statusCode = verdict === true ? options.plainStatus ?? 426 : verdict;
    res.end();
  });
  http.on("upgrade", (req: IncomingMessage, socket: Duplex, head: Uint8Array) => {
    sockets.add(socket);
    socket.once("close", () => sockets.delete(socket));
    socket.on("error", () => socket.destroy());
    const verdict = options.authorize(req);
    const key = req.headers["sec-websocket-key"];
    if (verdict !== true || typeof key !== "string" || !isWebSocketUpgrade(req)) {
      const status = verdict === true ? 400 : verdict;
      socket.end(`HTTP/1.1 ${status} Refused\r\nContent-Length: 0\r\nConnection: close\r\n\r\n`);
      return;
    }
    const accept = acceptKey(key);
    socket.write(
      "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
        `Sec-WebSocket-Accept: ${accept}\r\n\r\n`,
    );
    (socket as Socket).setNoDelay?.(true);
    const connection = new WsConnection(socket, head);
    connections.add(connection);
    connection.closed.then(() => connections.delete(connection));
    options.onConnection(connection, req);
  });
  await new Promise<void>((resolve, reject) => {
    http.once("error", reject);
    http.listen(0, "127.0.0.1", () => {
      http.off("error", reject);
      resolve();
    });
  });
  const { port } = http.address() as AddressInfo;
  return {
    port,
    async close() {
      const closing = [...connections].map((connection) => connection.closed);
      for (const socket of sockets) socket.destroy();
      await Promise.all(closing);
      const done = new Promise<void>((resolve) => http.close(() => resolve()));
      http.closeAllConnections();
      await done;
    },
  };
}

function isWebSocketUpgrade(req: IncomingMessage): boolean {
  return String(req.headers.upgrade ?? "").toLowerCase() === "websocket";
}

/** A server frame: never masked (RFC 6455 §5.1). */
function frame(opcode: number, payload: Uint8Array, fin: boolean): Uint8Array {
  const length = payload.length;
  const headerLength = length < 126 ? 2 : length <= 0xffff ? 4 : 10;
  const out = new Uint8Array(headerLength + length);
  const view = new DataView(out.buffer);
  out[0] = (fin ? 0x80 : 0) | opcode;
  if (length < 126) {
    out[1] = length;
  } else if (length <= 0xffff) {
    out[1] = 126;
    view.setUint16(2, length);
  } else {
    out[1] = 127;
    view.setBigUint64(2, BigInt(length));
  }
  out.set(payload, headerLength);
  return out;
}

interface ParsedFrame {
  fin: boolean;
  opcode: number;
  payload: Uint8Array;
  /** Bytes the frame took in the buffer. */
  length: number;
}

/** Parses one client frame from the start of `buffer`; undefined until it is complete. */
function parseFrame(buffer: Uint8Array): ParsedFrame | "invalid" | undefined {
  if (buffer.length < 2) return undefined;
  const view = new DataView(buffer.buffer, buffer.byteOffset, buffer.byteLength);
  const fin = (buffer[0]! & 0x80) !== 0;
  const opcode = buffer[0]! & 0x0f;
  const masked = (buffer[1]! & 0x80) !== 0;
  // Clients must mask every frame (RFC 6455 §5.1).
  if (!masked) return "invalid";
  let length = buffer[1]! & 0x7f;
  let offset = 2;
  if (length === 126) {
    if (buffer.length < 4) return undefined;
    length = view.getUint16(2);
    offset = 4;
  } else if (length === 127) {
    if (buffer.length < 10) return undefined;
    const big = view.getBigUint64(2);
    if (big > BigInt(Number.MAX_SAFE_INTEGER)) return "invalid";
    length = Number(big);
    offset = 10;
  }
  if (buffer.length < offset + 4 + length) return undefined;
  const mask = buffer.subarray(offset, offset + 4);
  const payload = new Uint8Array(length);
  const start = offset + 4;
  for (let i = 0; i < length; i++) payload[i] = buffer[start + i]! ^ mask[i & 3]!;
  return { fin, opcode, payload, length: start + length };
}

function concat(chunks: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(chunks.reduce((sum, chunk) => sum + chunk.length, 0));
  let offset = 0;
  for (const chunk of chunks) {
    out.set(chunk, offset);
    offset += chunk.length;
  }
  return out;
}

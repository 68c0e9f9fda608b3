/**
 * A WebSocket client (RFC 6455) over `node:net`, for the broker's connections to codex on
 * loopback. Runtime-specific (`node:` modules, which Deno, Bun and Node all provide); `Conn`
 * takes it through `DialOptions.webSocket` and stays web-standard.
 *
 * It gives `Conn` what the runtime's own `WebSocket` does (`onopen`, `onmessage`, `onerror`,
 * `onclose`, `send`, `close`, `readyState`, `bufferedAmount`), with two differences made for
 * a gateway that holds many connections and sends many small frames:
 *
 * - Frames sent in one turn of the event loop go to the socket in one write. A write to a
 *   loopback socket is a system call that also runs the receiving side of TCP: one per frame
 *   was the largest single cost of a turn (Node 16%, Bun 33% of the broker's CPU with an
 *   instant codex, most of it in the runtime's `WebSocket.send`).
 * - `bufferedAmount` counts every byte not yet taken by the kernel, on every runtime (Bun's
 *   own counts only until the event loop turns), so `maxSendBufferBytes` holds.
 *
 * It speaks only what codex's app-server needs: `ws:` URLs, no extensions or subprotocols,
 * extra upgrade headers (the capability token), text, binary, fragmented messages, ping,
 * pong and close. Messages are whole in memory, as with the runtime's `WebSocket`; `Conn`
 * drops the ones over its `maxMessageBytes`.
 *
 * With 10,000 idle pooled connections it took 9 KB each on Node (undici's `WebSocket`: 38 KB),
 * 15 KB on Deno (26 KB) and 11 KB on Bun (12 KB): `npm run bench -- p5`.
 *
 * @example A pool that dials with it
 * ```ts ignore
 * import { Pool } from "jsr:@codex-broker/broker";
 * import { createCodexResolver } from "jsr:@codex-broker/broker/supervisor";
 * import { openNetWebSocket } from "jsr:@codex-broker/broker/net_websocket";
 *
 * const pool = new Pool(createCodexResolver({ cwd: (id) => `/srv/workspaces/${id}` }), {
 *   dial: { webSocket: openNetWebSocket },
 * });
 * ```
 *
 * @module
 */

import { Buffer } from "node:buffer";
import { randomFillSync } from "node:crypto";
import { connect, type Socket } from "node:net";
import { clearTimeout, setImmediate, setTimeout } from "node:timers";
import {
  acceptKey,
  OP_BINARY,
  OP_CLOSE,
  OP_CONTINUATION,
  OP_PING,
  OP_PONG,
  OP_TEXT,
} from "./_ws_protocol.ts";

const CONNECTING = 0;
const OPEN = 1;
const CLOSING = 2;
const CLOSED = 3;
/** A handshake answer longer than this is refused. */
const MAX_HEAD_BYTES = 16 * 1024;
/** Payload lengths past 2^53 cannot be held; a peer that announces one is failed. */
const MAX_PAYLOAD_HIGH_WORD = 0x1fffff;
/** How long `close()` waits for the peer's close frame before it drops the socket. */
const CLOSE_GRACE_MS = 5_000;
// Masks come from the CSPRNG as RFC 6455 asks, a batch at a time: one call per frame cost
// more than the frame.
const MASK_POOL_BYTES = 4096;
const HEADER_TOKEN = /^[!#$%&'*+.^_`|~0-9A-Za-z-]+$/;
const HEADER_VALUE = /^[\t\x20-\x7e\x80-\xff]*$/;

const maskPool = Buffer.alloc(MASK_POOL_BYTES);
let maskOffset = MASK_POOL_BYTES;

function nextMask(): Buffer {
  if (maskOffset === MASK_POOL_BYTES) {
    randomFillSync(maskPool);
    maskOffset = 0;
  }
  const mask = maskPool.subarray(maskOffset, maskOffset + 4);
  maskOffset += 4;
  return mask;
}

/** The bytes of a client frame (header, mask and payload) for a payload of `length`. */
function frameBytes(length: number): number {
  return (length < 126 ? 2 : length < 0x10000 ? 4 : 10) + 4 + length;
}

/**
 * Writes one masked client frame into `out` at `at`: the payload is `payload`'s bytes, or a
 * string's UTF-8 (`length` bytes, encoded straight into `out`). Returns where it ends.
 */
function writeFrame(
  out: Buffer,
  at: number,
  opcode: number,
  payload: string | Uint8Array,
  length: number,
): number {
  out[at] = 0x80 | opcode;
  let start = at + 2;
  if (length < 126) {
    out[at + 1] = 0x80 | length;
  } else if (length < 0x10000) {
    out[at + 1] = 0x80 | 126;
    out.writeUInt16BE(length, at + 2);
    start += 2;
  } else {
    out[at + 1] = 0x80 | 127;
    out.writeUInt32BE(Math.floor(length / 0x100000000), at + 2);
    out.writeUInt32BE(length >>> 0, at + 6);
    start += 8;
  }
  const mask = nextMask();
  const m0 = mask[0]!, m1 = mask[1]!, m2 = mask[2]!, m3 = mask[3]!;
  out[start] = m0;
  out[start + 1] = m1;
  out[start + 2] = m2;
  out[start + 3] = m3;
  start += 4;
  if (typeof payload === "string") out.write(payload, start, length, "utf8");
  else out.set(payload, start);
  const end = start + length;
  let i = start;
  for (; i + 3 < end; i += 4) {
    out[i] = out[i]! ^ m0;
    out[i + 1] = out[i + 1]! ^ m1;
    out[i + 2] = out[i + 2]! ^ m2;
    out[i + 3] = out[i + 3]! ^ m3;
  }
  for (let k = 0; i < end; i++, k++) out[i] = out[i]! ^ mask[k]!;
  return end;
}

/** One client frame, masked, in a buffer of its own. */
function frame(opcode: number, payload: Uint8Array): Buffer {
  const out = Buffer.allocUnsafe(frameBytes(payload.byteLength));
  writeFrame(out, 0, opcode, payload, payload.byteLength);
  return out;
}

function closePayload(code: number | undefined, reason: string): Buffer {
  if (code === undefined) return Buffer.alloc(0);
  const text = Buffer.from(reason, "utf8");
  const payload = Buffer.allocUnsafe(2 + text.byteLength);
  payload.writeUInt16BE(code, 0);
  payload.set(text, 2);
  return payload;
}

/** Close codes a client may send (RFC 6455 §7.4, and the 3000–4999 range). */
function isSendableCode(code: number): boolean {
  return code === 1000 || (code >= 3000 && code <= 4999);
}

/** Close codes a peer may send in a close frame. */
function isValidReceivedCode(code: number): boolean {
  return (code >= 1000 && code <= 1003) || (code >= 1007 && code <= 1014) ||
    (code >= 3000 && code <= 4999);
}

/**
 * A client WebSocket on a `node:net` socket, used where the platform's `WebSocket` is:
 * {@linkcode openNetWebSocket} hands it to `Conn` typed as one.
 *
 * @example Exchange a message
 * ```ts ignore
 * const ws = new NetWebSocket("ws://127.0.0.1:4500/", { authorization: "Bearer t0ken" });
 * ws.onopen = () => ws.send(JSON.stringify({ id: 0, method: "initialize", params: {} }));
 * ws.onmessage = (event) => {
 *   console.log(event.data);
 *   ws.close(1000);
 * };
 * ```
 */
export class NetWebSocket {
  /** The URL it connects to. */
  readonly url: string;
  /** Ignored: binary messages always arrive as `ArrayBuffer`, which is what `Conn` asks for. */
  binaryType: BinaryType = "arraybuffer";
  /** Called once the handshake is done. */
  onopen: ((event: Event) => void) | null = null;
  /** Called with each whole message: a string for text, an `ArrayBuffer` for binary. */
  onmessage: ((event: MessageEvent) => void) | null = null;
  /** Called when the connection failed; `onclose` follows. */
  onerror: ((event: Event) => void) | null = null;
  /** Called once, when the socket has closed. */
  onclose: ((event: CloseEvent) => void) | null = null;

  #socket: Socket;
  #key: string;
  #state = CONNECTING;
  #head: Buffer | undefined = Buffer.alloc(0);
  // Input not yet parsed, as it came, so a large message is copied once, not per chunk.
  #chunks: Buffer[] = [];
  /** Where the unparsed input starts in the first chunk: frames are read in place. */
  #offset = 0;
  #inBytes = 0;
  #message: Buffer[] = [];
  #messageOpcode = -1;
  // Messages sent in this turn of the event loop, framed together when it ends: the
  // opcode, payload and payload length of each, side by side.
  #outOpcodes: number[] = [];
  #outPayloads: (string | Uint8Array)[] = [];
  #outLengths: number[] = [];
  /** Their bytes once framed. */
  #outBytes = 0;
  #flushing = false;
  #closeSent = false;
  #closeCode = 1006;
  #closeReason = "";
  #wasClean = false;
  #errored = false;
  #closeTimer: ReturnType<typeof setTimeout> | undefined;
  #decoder = new TextDecoder("utf-8", { fatal: true });

  /**
   * Starts connecting.
   *
   * @param url A `ws:` URL.
   * @param headers Extra upgrade request headers.
   * @throws {SyntaxError} If the URL is not a `ws:` URL, or a header cannot be sent.
   */
  constructor(url: string, headers: Record<string, string> = {}) {
    const target = new URL(url);
    if (target.protocol !== "ws:") {
      throw new SyntaxError(`Cannot open WebSocket: expected a ws: URL, got ${url}`);
    }
    const lines = [
      `GET ${target.pathname}${target.search} HTTP/1.1`,
      `Host: ${target.host}`,
      "Upgrade: websocket",
      "Connection: Upgrade",
      "", // the key, below
      "Sec-WebSocket-Version: 13",
    ];
    for (const [name, value] of Object.entries(headers)) {
      if (!HEADER_TOKEN.test(name) || !HEADER_VALUE.test(value)) {
        throw new SyntaxError(`Cannot open WebSocket: header ${JSON.stringify(name)} is invalid`);
      }
      lines.push(`${name}: ${value}`);
    }
    this.url = target.href;
    this.#key = randomKey();
    lines[4] = `Sec-WebSocket-Key: ${this.#key}`;
    const host = target.hostname.startsWith("[") ? target.hostname.slice(1, -1) : target.hostname;
    const socket = connect({ host, port: Number(target.port || 80) });
    this.#socket = socket;
    socket.setNoDelay(true);
    socket.once("connect", () => socket.write(`${lines.join("\r\n")}\r\n\r\n`));
    socket.on("data", (chunk: Buffer) => this.#onData(chunk));
    socket.on("end", () => {
      // The peer is done sending; a clean close already ended our side.
      if (!this.#socket.writableEnded) this.#socket.end();
    });
    socket.on("error", (error: Error) => this.#error(error.message));
    socket.on("close", () => this.#onSocketClose());
  }

  /** 0 connecting, 1 open, 2 closing, 3 closed. */
  get readyState(): number {
    return this.#state;
  }

  /** Bytes sent but not yet taken by the kernel. */
  get bufferedAmount(): number {
    return this.#outBytes + this.#socket.writableLength;
  }

  /**
   * Queues a message; it is written with the others sent in this turn of the event loop.
   *
   * @param data Text, or bytes for a binary message.
   * @throws {DOMException} `InvalidStateError` while connecting.
   */
  send(data: string | ArrayBuffer | ArrayBufferView): void {
    if (this.#state === CONNECTING) {
      throw new DOMException("Cannot send: the WebSocket is still connecting", "InvalidStateError");
    }
    // As the platform's WebSocket: after close, a send is dropped.
    if (this.#state !== OPEN) return;
    if (typeof data === "string") this.#queue(OP_TEXT, data, Buffer.byteLength(data, "utf8"));
    else if (data instanceof ArrayBuffer) {
      // A copy: the caller may change its buffer before the turn ends.
      this.#queue(OP_BINARY, new Uint8Array(data.slice(0)), data.byteLength);
    } else {
      const bytes = new Uint8Array(data.buffer, data.byteOffset, data.byteLength).slice();
      this.#queue(OP_BINARY, bytes, bytes.byteLength);
    }
  }

  /**
   * Starts the closing handshake (or abandons a connection not yet open). `onclose` follows
   * once the socket has closed: when the peer answered, or after 5 s without an answer.
   *
   * @param code 1000 or 3000–4999; without it the close frame carries no code.
   * @param reason At most 123 bytes of UTF-8.
   * @throws {DOMException} `InvalidAccessError` for another code, `SyntaxError` for a longer
   * reason.
   */
  close(code?: number, reason = ""): void {
    if (code !== undefined && !isSendableCode(code)) {
      throw new DOMException(`Cannot close WebSocket with code ${code}`, "InvalidAccessError");
    }
    if (Buffer.byteLength(reason) > 123) {
      throw new DOMException("Cannot close WebSocket: the reason is too long", "SyntaxError");
    }
    if (this.#state === CLOSING || this.#state === CLOSED) return;
    if (this.#state === CONNECTING) {
      this.#state = CLOSING;
      this.#error("WebSocket was closed before the connection was established");
      return;
    }
    this.#state = CLOSING;
    this.#sendClose(code, reason);
    this.#closeTimer = setTimeout(() => this.#socket.destroy(), CLOSE_GRACE_MS);
    // A peer that never answers must not keep the process alive.
    this.#closeTimer.unref();
  }

  #sendClose(code: number | undefined, reason: string): void {
    if (this.#closeSent) return;
    this.#closeSent = true;
    const payload = closePayload(code, reason);
    this.#queue(OP_CLOSE, payload, payload.byteLength);
  }

  #queue(opcode: number, payload: string | Uint8Array, length: number): void {
    this.#outOpcodes.push(opcode);
    this.#outPayloads.push(payload);
    this.#outLengths.push(length);
    this.#outBytes += frameBytes(length);
    if (this.#flushing) return;
    this.#flushing = true;
    setImmediate(() => this.#flush());
  }

  #flush(): void {
    this.#flushing = false;
    const opcodes = this.#outOpcodes;
    const payloads = this.#outPayloads;
    const lengths = this.#outLengths;
    const size = this.#outBytes;
    this.#clearOut();
    if (opcodes.length === 0) return;
    const socket = this.#socket;
    if (socket.destroyed || socket.writableEnded) return;
    // One buffer for the turn's frames, encoded and masked in place.
    const out = Buffer.allocUnsafe(size);
    let at = 0;
    for (let i = 0; i < opcodes.length; i++) {
      at = writeFrame(out, at, opcodes[i]!, payloads[i]!, lengths[i]!);
    }
    socket.write(out);
    // The close frame was the last thing to send; the peer closes TCP after answering it.
    if (this.#closeSent && this.#wasClean) socket.end();
  }

  #clearOut(): void {
    this.#outOpcodes = [];
    this.#outPayloads = [];
    this.#outLengths = [];
    this.#outBytes = 0;
  }

  #onData(chunk: Buffer): void {
    if (this.#head !== undefined) {
      const rest = this.#onHandshakeData(chunk);
      if (rest === undefined || rest.byteLength === 0) return;
      chunk = rest;
    }
    this.#chunks.push(chunk);
    this.#inBytes += chunk.byteLength;
    while (this.#state === OPEN || (this.#state === CLOSING && !this.#wasClean)) {
      if (!this.#parseFrame()) break;
    }
  }

  /** Reads the handshake answer; returns what came after it, or `undefined` for more. */
  #onHandshakeData(chunk: Buffer): Buffer | undefined {
    const head = Buffer.concat([this.#head!, chunk]);
    const end = head.indexOf("\r\n\r\n");
    if (end === -1) {
      if (head.byteLength > MAX_HEAD_BYTES) this.#fail("handshake answer is too large");
      else this.#head = head;
      return undefined;
    }
    this.#head = undefined;
    const problem = this.#checkHandshake(head.subarray(0, end).toString("latin1"));
    if (problem !== undefined) {
      this.#error(`Unexpected server response: ${problem}`);
      return undefined;
    }
    if (this.#state === CLOSING) return undefined; // close() came first
    this.#state = OPEN;
    this.onopen?.(new Event("open"));
    return this.#state === OPEN ? head.subarray(end + 4) : undefined;
  }

  #checkHandshake(head: string): string | undefined {
    const [status = "", ...lines] = head.split("\r\n");
    const code = /^HTTP\/1\.1 (\d{3})/.exec(status)?.[1];
    if (code !== "101") return code ?? status.slice(0, 80);
    const fields = new Map<string, string>();
    for (const line of lines) {
      const colon = line.indexOf(":");
      if (colon > 0) {
        fields.set(line.slice(0, colon).trim().toLowerCase(), line.slice(colon + 1).trim());
      }
    }
    if (fields.get("upgrade")?.toLowerCase() !== "websocket") {
      return "101 without Upgrade: websocket";
    }
    if (!fields.get("connection")?.toLowerCase().split(/\s*,\s*/).includes("upgrade")) {
      return "101 without Connection: upgrade";
    }
    const accept = acceptKey(this.#key);
    if (fields.get("sec-websocket-accept") !== accept) {
      return "101 with a wrong Sec-WebSocket-Accept";
    }
    if (fields.has("sec-websocket-extensions")) {
      return "101 with an extension that was not asked for";
    }
    if (fields.has("sec-websocket-protocol")) {
      return "101 with a subprotocol that was not asked for";
    }
    return undefined;
  }

  /**
   * The chunk holding the first `n` input bytes (n ≤ 14) from {@linkcode #offset}, without
   * consuming them.
   */
  #peek(n: number): Buffer {
    const first = this.#chunks[0]!;
    if (first.byteLength - this.#offset >= n) return first;
    const merged = Buffer.concat(this.#chunks).subarray(this.#offset);
    this.#chunks = [merged];
    this.#offset = 0;
    return merged;
  }

  /** Consumes `n` input bytes of the first chunk, which holds them. */
  #skip(n: number): void {
    this.#inBytes -= n;
    this.#offset += n;
    if (this.#offset === this.#chunks[0]!.byteLength) {
      this.#chunks.shift();
      this.#offset = 0;
    }
  }

  /** Consumes `n` input bytes and returns them: a view when one chunk holds them. */
  #take(n: number): Buffer {
    const first = this.#chunks[0]!;
    const at = this.#offset;
    if (first.byteLength - at >= n) {
      const bytes = first.subarray(at, at + n);
      this.#skip(n);
      return bytes;
    }
    this.#inBytes -= n;
    const out = Buffer.allocUnsafe(n);
    let filled = 0;
    while (filled < n) {
      const chunk = this.#chunks[0]!;
      const from = this.#offset;
      const part = Math.min(chunk.byteLength - from, n - filled);
      out.set(chunk.subarray(from, from + part), filled);
      filled += part;
      if (from + part === chunk.byteLength) {
        this.#chunks.shift();
        this.#offset = 0;
      } else {
        this.#offset = from + part;
      }
    }
    return out;
  }

  /** Parses one whole frame if it is in; returns whether it did. */
  #parseFrame(): boolean {
    if (this.#inBytes < 2) return false;
    let head = this.#peek(2);
    const at = this.#offset;
    const b0 = head[at]!, b1 = head[at + 1]!;
    const fin = (b0 & 0x80) !== 0;
    const opcode = b0 & 0x0f;
    if ((b0 & 0x70) !== 0) return this.#fail("reserved bits set", 1002);
    if ((b1 & 0x80) !== 0) return this.#fail("masked frame from the server", 1002);
    let length = b1 & 0x7f;
    let offset = 2;
    if (length === 126) {
      if (this.#inBytes < 4) return false;
      head = this.#peek(4);
      length = head.readUInt16BE(this.#offset + 2);
      offset = 4;
    } else if (length === 127) {
      if (this.#inBytes < 10) return false;
      head = this.#peek(10);
      const high = head.readUInt32BE(this.#offset + 2);
      if (high > MAX_PAYLOAD_HIGH_WORD) return this.#fail("frame too large", 1009);
      length = high * 0x100000000 + head.readUInt32BE(this.#offset + 6);
      offset = 10;
    }
    if (this.#inBytes < offset + length) return false;
    this.#skip(offset);
    const payload = length === 0 ? Buffer.alloc(0) : this.#take(length);
    if (opcode >= 0x8) {
      if (!fin || length > 125) return this.#fail("invalid control frame", 1002);
      return this.#onControl(opcode, payload);
    }
    if (opcode === OP_CONTINUATION) {
      if (this.#messageOpcode === -1) return this.#fail("continuation without a message", 1002);
    } else if (opcode === OP_TEXT || opcode === OP_BINARY) {
      if (this.#messageOpcode !== -1) return this.#fail("new message inside a message", 1002);
      this.#messageOpcode = opcode;
    } else {
      return this.#fail(`unknown opcode ${opcode}`, 1002);
    }
    this.#message.push(payload);
    if (!fin) return true;
    const parts = this.#message;
    const whole = parts.length === 1 ? parts[0]! : Buffer.concat(parts);
    const type = this.#messageOpcode;
    this.#message = [];
    this.#messageOpcode = -1;
    let data: string | ArrayBuffer;
    if (type === OP_TEXT) {
      try {
        data = this.#decoder.decode(whole);
      } catch {
        return this.#fail("text message is not UTF-8", 1007);
      }
    } else {
      data = whole.buffer.slice(
        whole.byteOffset,
        whole.byteOffset + whole.byteLength,
      ) as ArrayBuffer;
    }
    this.#dispatch(data);
    return true;
  }

  #dispatch(data: string | ArrayBuffer): void {
    const onmessage = this.onmessage;
    // As the platform's WebSocket: nothing is delivered once closing began.
    if (!onmessage || this.#state !== OPEN) return;
    try {
      // A plain object: Conn reads `data` only, and a MessageEvent per frame costs.
      onmessage({ data } as MessageEvent);
    } catch (error) {
      // As the platform reports a listener's error: elsewhere, never into the read loop.
      queueMicrotask(() => {
        throw error;
      });
    }
  }

  #onControl(opcode: number, payload: Buffer): boolean {
    if (opcode === OP_PING) {
      // A copy: the payload is a view of input that is parsed on meanwhile.
      if (this.#state === OPEN) this.#queue(OP_PONG, Buffer.from(payload), payload.byteLength);
      return true;
    }
    if (opcode === OP_PONG) return true;
    if (opcode !== OP_CLOSE) return this.#fail(`unknown control opcode ${opcode}`, 1002);
    let code = 1005;
    let reason = "";
    if (payload.byteLength === 1) return this.#fail("close frame of one byte", 1002);
    if (payload.byteLength >= 2) {
      code = payload.readUInt16BE(0);
      if (!isValidReceivedCode(code)) return this.#fail(`invalid close code ${code}`, 1002);
      try {
        reason = this.#decoder.decode(payload.subarray(2));
      } catch {
        return this.#fail("close reason is not UTF-8", 1007);
      }
    }
    this.#closeCode = code;
    this.#closeReason = reason;
    this.#wasClean = true;
    this.#state = CLOSING;
    // Echo the peer's code, then end our side once it is written.
    this.#sendClose(code === 1005 ? undefined : code, "");
    if (!this.#flushing) this.#socket.end();
    return false;
  }

  /** Fails the connection for a protocol error: a close frame if possible, then the end. */
  #fail(message: string, code?: number): false {
    if (code !== undefined && this.#state === OPEN && !this.#closeSent) {
      this.#closeSent = true;
      this.#socket.write(frame(OP_CLOSE, closePayload(code, "")));
    }
    this.#error(message);
    return false;
  }

  #error(message: string): void {
    if (this.#state === CLOSED) return;
    this.#state = CLOSING;
    if (!this.#errored && !this.#wasClean) {
      this.#errored = true;
      const event = new Event("error") as Event & { message: string };
      event.message = message;
      try {
        this.onerror?.(event);
      } catch (error) {
        queueMicrotask(() => {
          throw error;
        });
      }
    }
    this.#socket.destroy();
  }

  #onSocketClose(): void {
    if (this.#state === CLOSED) return;
    if (this.#head !== undefined && !this.#errored) {
      // Never opened: a refused connection, or one that ended before the handshake.
      this.#error("Connection closed before the WebSocket handshake");
    }
    // After the handshake, an end without a close frame is a close (1006), not an error.
    this.#state = CLOSED;
    if (this.#closeTimer !== undefined) clearTimeout(this.#closeTimer);
    this.#clearOut();
    const clean = this.#wasClean;
    const event = {
      code: clean ? this.#closeCode : 1006,
      reason: clean ? this.#closeReason : "",
      wasClean: clean,
    } as CloseEvent;
    this.onclose?.(event);
  }
}

function randomKey(): string {
  const key = Buffer.allocUnsafe(16);
  randomFillSync(key);
  return key.toString("base64");
}

/**
 * Opens a {@linkcode NetWebSocket}, typed as the platform's `WebSocket`: the shape of
 * `DialOptions.webSocket` (also `PoolOptions.dial.webSocket`).
 *
 * @example Dial codex with it
 * ```ts ignore
 * import { Conn } from "jsr:@codex-broker/broker";
 *
 * const conn = await Conn.dial("ws://127.0.0.1:4500", {
 *   headers: { authorization: "Bearer t0ken" },
 *   webSocket: openNetWebSocket,
 * });
 * ```
 *
 * @param url A `ws:` URL.
 * @param headers Extra upgrade request headers.
 * @returns The socket, connecting.
 * @throws {SyntaxError} If the URL is not a `ws:` URL, or a header cannot be sent.
 */
export function openNetWebSocket(url: string, headers: Record<string, string>): WebSocket {
  return new NetWebSocket(url, headers) as unknown as WebSocket;
}

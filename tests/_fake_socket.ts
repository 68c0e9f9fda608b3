// An in-process stand-in for the global WebSocket, so a test can drive a Conn frame by frame
// with no network and no event loop turns in between: `Conn.dial` (through
// src/_websocket.ts) and the session look `WebSocket` up at call time, so installing this
// class as the global for the duration of a test puts every connection dialled meanwhile
// on a FakeWebSocket that the test plays the server side of.

type MessageHandler = (event: { data: unknown }) => void;
type CloseHandler = (event: { code: number; reason: string }) => void;

/** A WebSocket whose peer is the test: frames go to `onClientFrame`, `deliver` answers. */
export class FakeWebSocket {
  static readonly CONNECTING = 0;
  static readonly OPEN = 1;
  static readonly CLOSING = 2;
  static readonly CLOSED = 3;

  readonly url: string;
  readyState = 0;
  binaryType = "blob";
  onopen: ((event: Event) => void) | null = null;
  onmessage: MessageHandler | null = null;
  onclose: CloseHandler | null = null;
  onerror: ((event: Event) => void) | null = null;
  /** What the test says is queued unsent; the client reads it before each send. */
  bufferedAmount = 0;
  /** Every text frame the client sent, in order. */
  readonly sent: string[] = [];
  /** Called synchronously with each frame the client sends. */
  onClientFrame: ((frame: string) => void) | null = null;

  constructor(url: string) {
    this.url = url;
    created?.(this);
    // Opens like a real socket: after the constructor returned and handlers were set.
    queueMicrotask(() => {
      if (this.readyState !== 0) return;
      this.readyState = 1;
      this.onopen?.(new Event("open"));
    });
  }

  send(data: string): void {
    if (this.readyState === 0) throw new DOMException("Still connecting", "InvalidStateError");
    // Like WHATWG: frames sent while closing or closed are discarded silently.
    if (this.readyState !== 1) return;
    this.sent.push(data);
    this.onClientFrame?.(data);
  }

  close(): void {
    if (this.readyState >= 2) return;
    this.readyState = 2;
    queueMicrotask(() => {
      this.readyState = 3;
      this.onclose?.({ code: 1005, reason: "" });
    });
  }

  /**
   * Delivers one frame from the server, at once.
   *
   * @returns False if the socket was no longer open, so nothing was delivered.
   */
  deliver(data: string | ArrayBuffer): boolean {
    if (this.readyState !== 1) return false;
    this.onmessage?.({ data });
    return true;
  }

  /** The server drops the connection (no close handshake). */
  drop(code = 1006): void {
    if (this.readyState === 3) return;
    this.readyState = 3;
    this.onclose?.({ code, reason: "" });
  }
}

let created: ((ws: FakeWebSocket) => void) | undefined;

/**
 * Makes FakeWebSocket the global WebSocket until the returned function is called.
 *
 * @param onCreate Receives every socket constructed meanwhile.
 * @returns Puts the original global back.
 */
export function installFakeWebSocket(onCreate: (ws: FakeWebSocket) => void): () => void {
  const original = Object.getOwnPropertyDescriptor(globalThis, "WebSocket");
  Object.defineProperty(globalThis, "WebSocket", {
    value: FakeWebSocket,
    writable: true,
    configurable: true,
  });
  created = onCreate;
  return () => {
    created = undefined;
    if (original) Object.defineProperty(globalThis, "WebSocket", original);
    else delete (globalThis as { WebSocket?: unknown }).WebSocket;
  };
}

// A raw HTTP/1.1 client over TCP, for tests where the connection itself is the subject:
// what the server answers, and whether and when it closes the socket.
import { connect, type Socket } from "node:net";

/** A raw client connection that collects what the server sends. */
export interface RawClient {
  readonly socket: Socket;
  /** Everything received so far, as latin1 text. */
  readonly received: string;
  /** Whether the socket has closed. */
  readonly closed: boolean;
  /** Resolves once `check` holds, checked on every arrival and on close; rejects after `ms`. */
  until(check: () => boolean, ms: number, what: string): Promise<void>;
  /** Destroys the socket and waits for its close. */
  destroy(): Promise<void>;
}

/**
 * Connects to 127.0.0.1.
 *
 * @param port The server's port.
 * @returns The connected client.
 */
export async function rawClient(port: number): Promise<RawClient> {
  const socket = connect(port, "127.0.0.1");
  await new Promise<void>((resolve, reject) => {
    socket.once("connect", resolve);
    socket.once("error", reject);
  });
  let received = "";
  let closed = false;
  const wakers = new Set<() => void>();
  const wake = () => {
    for (const fn of wakers) fn();
  };
  const decoder = new TextDecoder("latin1");
  socket.on("data", (data: Uint8Array) => {
    received += decoder.decode(data);
    wake();
  });
  // A reset after a Connection: close answer is a close like any other here.
  socket.on("error", () => {});
  const ended = new Promise<void>((resolve) =>
    socket.once("close", () => {
      closed = true;
      wake();
      resolve();
    })
  );
  return {
    socket,
    get received() {
      return received;
    },
    get closed() {
      return closed;
    },
    until(check, ms, what) {
      return new Promise((resolve, reject) => {
        const done = (error?: Error) => {
          clearTimeout(timer);
          wakers.delete(poll);
          if (error) reject(error);
          else resolve();
        };
        const poll = () => {
          if (check()) done();
        };
        const timer = setTimeout(
          () =>
            done(
              new Error(
                `Timed out after ${ms} ms waiting for ${what}; got:\n${received.slice(0, 2000)}`,
              ),
            ),
          ms,
        );
        wakers.add(poll);
        poll();
      });
    },
    async destroy() {
      socket.destroy();
      await ended;
    },
  };
}

/** One response parsed from the raw text. */
export interface RawResponse {
  status: number;
  /** Lower-cased names. */
  headers: Map<string, string>;
  /** The body, de-chunked; `undefined` while it has not arrived whole. */
  body: string | undefined;
}

/**
 * The head (status line and headers, lower-cased names) of each response in `text`.
 *
 * @param text What the server sent.
 * @returns The heads, in order.
 */
export function responseHeads(
  text: string,
): { status: number; headers: Map<string, string> }[] {
  return responses(text).map(({ status, headers }) => ({ status, headers }));
}

/**
 * The responses in `text`, with their bodies once complete (`Content-Length`, chunked, or,
 * with neither, what is there).
 *
 * @param text What the server sent.
 * @returns The responses, in order.
 */
export function responses(text: string): RawResponse[] {
  const found: RawResponse[] = [];
  const head = /HTTP\/1\.1 (\d{3})[^\r\n]*\r\n((?:[^\r\n]+\r\n)*)\r\n/y;
  let at = text.indexOf("HTTP/1.1 ");
  while (at !== -1) {
    head.lastIndex = at;
    const match = head.exec(text);
    if (!match) break;
    const headers = new Map<string, string>();
    for (const line of match[2]!.split("\r\n")) {
      const colon = line.indexOf(":");
      if (colon > 0) {
        headers.set(line.slice(0, colon).trim().toLowerCase(), line.slice(colon + 1).trim());
      }
    }
    const rest = text.slice(head.lastIndex);
    let body: string | undefined;
    let used = 0;
    const length = headers.get("content-length");
    if (length !== undefined) {
      if (rest.length >= Number(length)) body = rest.slice(0, Number(length));
      used = Number(length);
    } else if (headers.get("transfer-encoding")?.toLowerCase() === "chunked") {
      let decoded = "";
      for (;;) {
        const eol = rest.indexOf("\r\n", used);
        if (eol === -1) break;
        const size = parseInt(rest.slice(used, eol), 16);
        if (size === 0) {
          body = decoded;
          used = eol + 4;
          break;
        }
        if (rest.length < eol + 2 + size + 2) break;
        decoded += rest.slice(eol + 2, eol + 2 + size);
        used = eol + 2 + size + 2;
      }
    } else {
      body = rest;
      used = rest.length;
    }
    found.push({ status: Number(match[1]), headers, body });
    const next = text.indexOf("HTTP/1.1 ", head.lastIndex + used);
    at = body === undefined ? -1 : next;
  }
  return found;
}

/**
 * What both ends of RFC 6455 share: opcodes and the handshake's accept key. Used by the
 * broker's client (`net_websocket.ts`) and the `./testing` server (`_testing_ws_server.ts`).
 * Runtime-specific (`node:crypto`).
 *
 * @module
 */

import { createHash } from "node:crypto";

const GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/** Frame opcodes. */
export const OP_CONTINUATION = 0x0;
/** A text message, or its first frame. */
export const OP_TEXT = 0x1;
/** A binary message, or its first frame. */
export const OP_BINARY = 0x2;
/** The closing handshake. */
export const OP_CLOSE = 0x8;
/** A ping, answered with a pong of the same payload. */
export const OP_PING = 0x9;
/** A pong. */
export const OP_PONG = 0xa;

/**
 * The `Sec-WebSocket-Accept` a server answers to a client's `Sec-WebSocket-Key`.
 *
 * @param key The client's key.
 * @returns The accept value.
 */
export function acceptKey(key: string): string {
  return createHash("sha1").update(key + GUID).digest("base64");
}

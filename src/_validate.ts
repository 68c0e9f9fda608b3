/**
 * Request validation for the REST handler: content type, body size, JSON, and the fields of
 * a turn request. Everything here is decided before anything reaches codex. Web-standard.
 *
 * @module
 */

import type { ErrorCode, TurnRequest } from "./handler.ts";
import type { ThreadStartParams, TurnParams } from "./protocol.ts";
import { DeadlineClock } from "./_deadline.ts";
import { isValidWorkspaceId } from "./_workspace_id.ts";
import { IS_NODE } from "./_runtime.ts";

/** A request the handler refuses: the status and error it is answered with. */
export interface Refusal {
  ok: false;
  status: number;
  code: ErrorCode;
  message: string;
  /** Extra answer headers, e.g. `connection: close` after a body left unread. */
  headers?: Record<string, string>;
}

/** A turn request that passed validation, its deadline filled in. */
export type ValidTurnRequest = TurnRequest & { timeoutMs: number };

/** The limits a turn request is checked against. */
export interface TurnRequestLimits {
  /** Larger bodies are refused with 413. */
  maxBodyBytes: number;
  /** The deadline of a request without `timeoutMs`. */
  defaultTimeoutMs: number;
  /** The largest `timeoutMs` accepted. */
  maxTimeoutMs: number;
  /** A body not read to its end this long after the read began is refused with 408. */
  requestTimeoutMs: number;
}

/** Headers of an answer given while the client may still be sending its body. */
const CLOSE: Readonly<Record<string, string>> = Object.freeze({ connection: "close" });

// One for every request: a fatal decoder that is not streaming keeps no state between calls.
const UTF8 = new TextDecoder("utf-8", { fatal: true });

const INVALID_WORKSPACE_ID =
  'Invalid workspaceId: expected 1 to 128 characters from A-Z, a-z, 0-9, ".", "_" and "-", ' +
  'other than "." and ".."';

function isObject(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

function refusal(
  status: number,
  code: ErrorCode,
  message: string,
  headers?: Record<string, string>,
): Refusal {
  return headers
    ? { ok: false, status, code, message, headers }
    : { ok: false, status, code, message };
}

/**
 * Whether a `Content-Type` is JSON; parameters such as `; charset=utf-8` are fine.
 *
 * @param value The header's value.
 * @returns `true` for `application/json`.
 */
export function isJsonContentType(value: string | null): boolean {
  return value !== null && value.split(";")[0]!.trim().toLowerCase() === "application/json";
}

/**
 * Whether an `Accept` header asks for Server-Sent Events.
 *
 * @param value The header's value.
 * @returns `true` if one of its ranges is `text/event-stream`.
 */
export function acceptsEventStream(value: string | null): boolean {
  if (value === null) return false;
  return value.split(",").some((range) =>
    range.split(";")[0]!.trim().toLowerCase() === "text/event-stream"
  );
}

/**
 * About how many bytes the request's head took on the wire: the request line and every
 * header field. Runtimes that cap the head themselves (Node and Bun at 16 KiB) refuse a
 * larger one before the handler sees it; Deno passes heads of up to about 64 KiB.
 *
 * @param request The request.
 * @returns The head's size in bytes, counting each character as one.
 */
export function requestHeadBytes(request: Request): number {
  // "METHOD URL HTTP/1.1\r\n" and "name: value\r\n" per field; the URL is the absolute one,
  // which overcounts by its scheme and host: a few dozen bytes.
  let bytes = request.method.length + request.url.length + 11;
  for (const [name, value] of request.headers) bytes += name.length + value.length + 4;
  return bytes;
}

/**
 * Lets go of a body that was read in part, so the connection can end or go on.
 *
 * `Deno.serve` (the handler used on its own) leaves such a connection open, neither reading
 * the rest nor closing it, until the body is cancelled; cancelled, it drains the rest and
 * serves the next request. Deno's `node:http`, which the broker serves with, survives the
 * cancel and closes the connection after the answer's `Connection: close`. On Node the
 * body is `Readable.toWeb(req)` (srvx, like every Node adapter): cancelling it destroys the
 * socket before the answer is out, and data still arriving then throws an uncaught
 * ERR_INVALID_STATE that ends the process (nodejs/node#54205, #64529). There the answer's
 * `Connection: close` makes Node close the connection once the answer is sent, which is all
 * that is needed. Bun closes it in either case.
 */
function releaseBody(reader: ReadableStreamDefaultReader<Uint8Array>): void {
  if (IS_NODE) reader.releaseLock();
  else reader.cancel().catch(() => {});
}

/**
 * The body deadlines of all requests, on one timer: a timer per request (set, then cleared
 * once the body is in) cost 2% of the broker's CPU on Deno. Never closed: with no body
 * being read it holds no timer.
 */
const BODY_DEADLINES = new DeadlineClock();

/** A promise that resolves `"timeout"` after `timeoutMs`, and the way to disarm it. */
function bodyDeadline(timeoutMs: number): { expired: Promise<"timeout">; clear(): void } {
  let clear = () => {};
  const expired = new Promise<"timeout">((resolve) => {
    clear = BODY_DEADLINES.alarm(timeoutMs, () => resolve("timeout"));
  });
  return { expired, clear };
}

/** {@linkcode readBody} for a body of known length on Deno and Bun: one native read. */
async function readWhole(
  request: Request,
  max: number,
  timeoutMs: number,
): Promise<Uint8Array | "tooLarge" | "timeout"> {
  const whole = request.arrayBuffer();
  const deadline = bodyDeadline(timeoutMs);
  try {
    const result = await Promise.race([whole, deadline.expired]);
    if (result === "timeout") {
      // It rejects once the connection the 408 closes goes away; nobody waits for it.
      whole.catch(() => {});
      return "timeout";
    }
    // A Request built in-process may carry any header: its body is still held to the limit.
    return result.byteLength > max ? "tooLarge" : new Uint8Array(result);
  } finally {
    deadline.clear();
  }
}

/**
 * The parts of a Node `IncomingMessage` that {@linkcode readNodeBody} uses; typed here so
 * that this module needs no `node:` import.
 */
interface NodeBodySource {
  readonly readableFlowing: boolean | null;
  readonly complete?: boolean;
  on(event: string, listener: (value: never) => void): unknown;
  off(event: string, listener: (value: never) => void): unknown;
  pause(): unknown;
}

/**
 * The Node request under a request that srvx's `node:http` adapter made (Node, and Deno by
 * default), if nothing has read its body yet.
 */
function nodeBodySource(request: Request): NodeBodySource | undefined {
  const req = (request as { runtime?: { node?: { req?: Partial<NodeBodySource> } } }).runtime
    ?.node?.req;
  // Flowing or paused once anything read it, the web body stream among them.
  if (typeof req?.on !== "function" || req.readableFlowing !== null) return undefined;
  return req as NodeBodySource;
}

/**
 * {@linkcode readBody} straight from a Node request's events. srvx's `request.body` is that
 * request wrapped in a web stream (`Readable.toWeb`), which cost 7% of the broker's CPU
 * per turn on Node with an instant codex. A body refused part way is paused, not drained:
 * the answer's `Connection: close` ends the connection.
 */
function readNodeBody(
  req: NodeBodySource,
  max: number,
  timeoutMs: number,
): Promise<Uint8Array | "tooLarge" | "timeout"> {
  return new Promise((resolve, reject) => {
    const chunks: Uint8Array[] = [];
    let size = 0;
    const onData = (chunk: Uint8Array) => {
      size += chunk.byteLength;
      if (size > max) finish(() => resolve("tooLarge"));
      else chunks.push(chunk);
    };
    const onEnd = () => finish(() => resolve(concatenate(chunks, size)), false);
    const onError = (error: unknown) => finish(() => reject(error));
    const onClose = () => finish(() => reject(new Error("Request body ended early")));
    // A body already in whole (the head and body came in one read, as they usually do) has
    // nothing to wait for: no deadline, which cost 2–3% of the broker's CPU per request on
    // Deno, where the clock arms and clears its timer for each such body.
    const clear = req.complete === true
      ? () => {}
      : BODY_DEADLINES.alarm(timeoutMs, () => finish(() => resolve("timeout")));
    function finish(settle: () => void, unread = true): void {
      clear();
      req.off("data", onData);
      req.off("end", onEnd);
      req.off("error", onError);
      req.off("close", onClose);
      // Flowing with no listener would read the rest of a refused body only to drop it.
      if (unread) req.pause();
      settle();
    }
    req.on("data", onData);
    req.on("end", onEnd);
    req.on("error", onError);
    req.on("close", onClose);
  });
}

function concatenate(chunks: readonly Uint8Array[], size: number): Uint8Array {
  if (chunks.length === 1) return chunks[0]!;
  const bytes = new Uint8Array(size);
  let offset = 0;
  for (const chunk of chunks) {
    bytes.set(chunk, offset);
    offset += chunk.byteLength;
  }
  return bytes;
}

/**
 * Reads at most `max` bytes of the body within `timeoutMs`. Returns `"tooLarge"` as soon as
 * the body turns out larger, and `"timeout"` once the deadline passes, and reads no more of
 * it: an oversized body is never buffered whole, and a body that trickles in never holds
 * the handler longer than the deadline.
 *
 * @param declared The body's `Content-Length`, when the request has a valid one (at most
 * `max` by then). Deno and Bun then read the body natively in one piece: the server's
 * framing stops the body at that length, and a stream reader per request cost 9% of the
 * broker's CPU on Deno with an instant codex. A request from srvx's `node:http` adapter is
 * read from the Node request's events, whatever its length ({@linkcode readNodeBody}); one
 * built in-process takes the reader. A native read cannot be cancelled:
 * past the deadline it is left to end with the connection, which the 408 closes (holding
 * at most `max` bytes until then).
 */
async function readBody(
  request: Request,
  max: number,
  timeoutMs: number,
  declared: number | undefined,
): Promise<Uint8Array | "tooLarge" | "timeout"> {
  const node = nodeBodySource(request);
  if (node !== undefined) return await readNodeBody(node, max, timeoutMs);
  if (request.body === null) return new Uint8Array(0);
  if (declared !== undefined && !IS_NODE) return await readWhole(request, max, timeoutMs);
  const reader = request.body.getReader();
  const chunks: Uint8Array[] = [];
  let size = 0;
  const deadline = bodyDeadline(timeoutMs);
  try {
    for (;;) {
      let result: ReadableStreamReadResult<Uint8Array> | "timeout";
      try {
        result = await Promise.race([reader.read(), deadline.expired]);
      } catch (error) {
        reader.releaseLock();
        throw error;
      }
      if (result === "timeout") {
        // The chunks read so far go with this frame: nothing of the request is kept.
        releaseBody(reader);
        return "timeout";
      }
      if (result.done) break;
      size += result.value.byteLength;
      if (size > max) {
        releaseBody(reader);
        return "tooLarge";
      }
      chunks.push(result.value);
    }
  } finally {
    deadline.clear();
  }
  reader.releaseLock();
  return concatenate(chunks, size);
}

/**
 * Checks the fields of a parsed turn request.
 *
 * @param body The parsed JSON body.
 * @param limits `defaultTimeoutMs` and `maxTimeoutMs` for `timeoutMs`.
 * @returns The request, or why it is refused (400).
 */
export function validateTurnRequest(
  body: unknown,
  limits: Pick<TurnRequestLimits, "defaultTimeoutMs" | "maxTimeoutMs">,
): { ok: true; value: ValidTurnRequest } | Refusal {
  const fail = (code: ErrorCode, message: string) => refusal(400, code, message);
  if (!isObject(body)) return fail("invalidBody", "Invalid request body: expected a JSON object");
  const { workspaceId, threadId, params, timeoutMs, threadParams } = body;
  if (!isValidWorkspaceId(workspaceId)) {
    return fail(
      "invalidWorkspaceId",
      workspaceId === undefined ? "Missing workspaceId" : INVALID_WORKSPACE_ID,
    );
  }
  if (threadId !== undefined && threadId !== null && (typeof threadId !== "string" || !threadId)) {
    return fail("invalidThreadId", "Invalid threadId: expected null or a non-empty string");
  }
  if (!isObject(params)) {
    return fail("invalidParams", "Invalid params: expected an object of turn/start parameters");
  }
  if (!Array.isArray(params.input)) {
    return fail("invalidInput", "Invalid params.input: expected an array of user inputs");
  }
  if ("threadId" in params) {
    return fail(
      "threadIdInParams",
      "Invalid params: threadId must not be in params, pass it at the top level",
    );
  }
  if (
    timeoutMs !== undefined &&
    (!Number.isInteger(timeoutMs) || (timeoutMs as number) < 1 ||
      (timeoutMs as number) > limits.maxTimeoutMs)
  ) {
    return fail(
      "invalidTimeout",
      `Invalid timeoutMs: expected an integer from 1 to ${limits.maxTimeoutMs}`,
    );
  }
  if (threadParams !== undefined && !isObject(threadParams)) {
    return fail("invalidThreadParams", "Invalid threadParams: expected an object");
  }
  const value: ValidTurnRequest = {
    workspaceId,
    threadId: typeof threadId === "string" ? threadId : null,
    params: params as TurnParams,
    timeoutMs: (timeoutMs as number | undefined) ?? limits.defaultTimeoutMs,
  };
  if (threadParams !== undefined) value.threadParams = threadParams as ThreadStartParams;
  return { ok: true, value };
}

/**
 * Reads and checks the body of an authenticated `POST` turn request, in this order:
 * content type (415), size (413), deadline (408), JSON (400), fields (400). An answer given
 * before the body was read to its end (413, 408, or a body that failed mid-way) carries
 * `Connection: close`: the client may still be sending, and the connection cannot carry
 * another request until that body has passed.
 *
 * @param request The request.
 * @param limits Body size, the body's read deadline, and the turn deadline limits.
 * @param pathWorkspaceId The workspace named by the path (`/api/workspaces/{id}/turns`): it
 * must be a valid id, a body `workspaceId` must equal it, and an absent one is taken from it.
 * @returns The request and its body's bytes (to forward as they came), or why it is refused.
 */
export async function readTurnRequest(
  request: Request,
  limits: TurnRequestLimits,
  pathWorkspaceId?: string,
): Promise<{ ok: true; value: ValidTurnRequest; bytes: Uint8Array } | Refusal> {
  if (pathWorkspaceId !== undefined && !isValidWorkspaceId(pathWorkspaceId)) {
    return refusal(
      400,
      "invalidWorkspaceId",
      INVALID_WORKSPACE_ID.replace("Invalid workspaceId", "Invalid workspace id in the path"),
    );
  }
  if (!isJsonContentType(request.headers.get("content-type"))) {
    return refusal(
      415,
      "unsupportedMediaType",
      "Unsupported Content-Type: expected application/json",
    );
  }
  // Made only when refused: every turn request passes here.
  const tooLarge = () =>
    refusal(
      413,
      "bodyTooLarge",
      `Request body too large: the limit is ${limits.maxBodyBytes} bytes`,
      CLOSE,
    );
  const length = request.headers.get("content-length");
  const declared = length !== null && /^\d+$/.test(length.trim()) ? Number(length) : undefined;
  if (declared !== undefined && declared > limits.maxBodyBytes) return tooLarge();
  let bytes: Uint8Array | "tooLarge" | "timeout";
  try {
    bytes = await readBody(request, limits.maxBodyBytes, limits.requestTimeoutMs, declared);
  } catch {
    return refusal(400, "invalidBody", "Cannot read request body", CLOSE);
  }
  if (bytes === "tooLarge") return tooLarge();
  if (bytes === "timeout") {
    return refusal(
      408,
      "requestTimeout",
      `Request timeout: the body did not arrive within ${limits.requestTimeoutMs} ms`,
      CLOSE,
    );
  }
  let parsed: unknown;
  try {
    parsed = JSON.parse(UTF8.decode(bytes));
  } catch (error) {
    return refusal(400, "invalidJson", `Invalid JSON body: ${(error as Error).message}`);
  }
  if (pathWorkspaceId !== undefined && isObject(parsed)) {
    // The path is the routing key a load balancer saw; the body may repeat it, not contradict it.
    if (parsed.workspaceId === undefined) parsed = { ...parsed, workspaceId: pathWorkspaceId };
    else if (parsed.workspaceId !== pathWorkspaceId) {
      return refusal(
        400,
        "workspaceMismatch",
        `Invalid workspaceId: the body names ${
          JSON.stringify(parsed.workspaceId)
        } but the path names ${JSON.stringify(pathWorkspaceId)}`,
      );
    }
  }
  const validated = validateTurnRequest(parsed, limits);
  if (!validated.ok) return validated;
  const header = request.headers.get("x-workspace-id");
  if (header !== null && header !== validated.value.workspaceId) {
    // A load balancer routed by this header: running the body's workspace here would run
    // it on a broker that is not its owner's pick.
    return refusal(
      400,
      "workspaceMismatch",
      `Invalid X-Workspace-Id header: ${JSON.stringify(header)} differs from the workspaceId ${
        JSON.stringify(validated.value.workspaceId)
      }`,
    );
  }
  return { ok: true, value: validated.value, bytes };
}

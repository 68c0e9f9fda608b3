/**
 * The REST front of the broker as a web-standard fetch handler: `POST /api/turns` runs one
 * complete codex turn through a {@linkcode Pool} and answers it as JSON or as Server-Sent
 * Events; `GET /healthz` and `GET /metrics` serve operations. It uses only `Request`,
 * `Response`, `ReadableStream`, `TextEncoder`, `crypto.subtle` and timers, so any
 * fetch-handler server on Deno, Bun or Node can serve it.
 *
 * @example Serve it with Deno
 * ```ts ignore
 * import { Pool } from "jsr:@codex-broker/broker";
 * import { createTurnsHandler } from "jsr:@codex-broker/broker/handler";
 *
 * const pool = new Pool(resolver);
 * Deno.serve({ port: 8787 }, createTurnsHandler(pool, { secret: Deno.env.get("BROKER_SECRET")! }));
 * ```
 *
 * @module
 */

import {
  ConnectionClosedError,
  DialError,
  PoolClosedError,
  PoolFullError,
  RpcError,
  TimeoutError,
  WorkspaceUnavailableError,
} from "./errors.ts";
import { Metrics, METRICS_CONTENT_TYPE } from "./metrics.ts";
import type { Pool, PoolTurnOptions } from "./pool.ts";
import { OVERLOADED_CODE, type ThreadStartParams, type Turn, type TurnParams } from "./protocol.ts";
import { isValidWorkspaceId } from "./_workspace_id.ts";

export { Metrics, METRICS_CONTENT_TYPE, TURN_DURATION_BUCKETS } from "./metrics.ts";

/** The broker's version, answered by `GET /healthz` unless the options say otherwise. */
export const VERSION = "0.1.0"; // keep in sync with deno.json

/** Options for {@linkcode createTurnsHandler}. */
export interface TurnsHandlerOptions {
  /**
   * The shared secret every `POST /api/turns` must carry in `X-Internal-Secret`. Required
   * and non-empty: the broker runs codex on behalf of whoever can reach it.
   */
  secret: string;
  /** Larger request bodies are refused with 413. Defaults to 1 MiB. */
  maxBodyBytes?: number;
  /**
   * Deadline of a turn whose request has no `timeoutMs`. Defaults to 5 minutes, or to
   * `maxTimeoutMs` when that is lower.
   */
  defaultTimeoutMs?: number;
  /** The largest `timeoutMs` a request may ask for. Defaults to 30 minutes. */
  maxTimeoutMs?: number;
  /** Interval of the `: ping` comment lines of a streaming answer. Defaults to 15 s. */
  heartbeatMs?: number;
  /** Answered by `GET /healthz`. Defaults to {@linkcode VERSION}. */
  version?: string;
  /**
   * Receives one entry per turn (`msg: "turn"`), per refused request (`msg: "bad request"`)
   * and per unexpected failure (`msg: "internal error"`). Entries never hold the secret or
   * any header. A hook that throws is ignored.
   */
  log?: (entry: Record<string, unknown>) => void;
  /** The registry `GET /metrics` renders; pass one to share it with the server. */
  metrics?: Metrics;
}

/** The body of `POST /api/turns`, once validated. */
export interface TurnRequest {
  /** The workspace whose app-server runs the turn (the supervisor's id rule). */
  workspaceId: string;
  /** The thread to continue; `null` or absent starts a new thread. */
  threadId?: string | null;
  /** codex `turn/start` parameters without `threadId`; `input` is required. */
  params: TurnParams;
  /** Deadline of the whole turn in milliseconds, 1 to `maxTimeoutMs`. */
  timeoutMs?: number;
  /** `thread/start` parameters, used when a thread is started. */
  threadParams?: ThreadStartParams;
}

/** Why a turn did not produce a codex turn. */
export type TransportCode =
  | "brokerTimeout"
  | "subprocessCrash"
  | "wsDisconnect"
  | "rpcError"
  | "overloaded";

/** A failure between the broker and codex, answered with status 200. */
export interface TransportFailure {
  /** What failed. */
  code: TransportCode;
  /** The error's message. */
  message: string;
  /** For `rpcError` and an overloaded codex: `{ code, data }` of the JSON-RPC error. */
  data?: unknown;
}

/** The 200 answer of `POST /api/turns`: codex's turn, or the transport failure instead. */
export type TurnAnswer =
  | { threadId: string; turn: Turn }
  | { threadId: string | null; transport: TransportFailure };

/** The `code` of an {@linkcode ErrorAnswer}. */
export type ErrorCode =
  | "invalidJson"
  | "invalidBody"
  | "invalidWorkspaceId"
  | "invalidThreadId"
  | "invalidParams"
  | "invalidInput"
  | "threadIdInParams"
  | "invalidTimeout"
  | "invalidThreadParams"
  | "unauthorized"
  | "notFound"
  | "methodNotAllowed"
  | "bodyTooLarge"
  | "unsupportedMediaType"
  | "unavailable"
  | "internal"
  | "cancelled";

/** The answer to a refused or failed request (status 4xx or 5xx). */
export interface ErrorAnswer {
  /** What is wrong. */
  error: { code: ErrorCode; message: string };
}

/** A fetch handler: one `Request` in, one `Response` out. */
export type TurnsHandler = (request: Request) => Promise<Response>;

const MiB = 1024 * 1024;
const DEFAULT_MAX_BODY_BYTES = MiB;
const DEFAULT_TIMEOUT_MS = 5 * 60_000;
const DEFAULT_MAX_TIMEOUT_MS = 30 * 60_000;
const DEFAULT_HEARTBEAT_MS = 15_000;
const RETRY_AFTER_SECONDS = "1";
// nginx's convention for "the client closed the request": the answer is for logs only,
// since nobody is left to read it.
const CLIENT_CLOSED_STATUS = 499;

/** What one turn came to, whichever way it is answered. */
interface TurnResult {
  status: number;
  headers: Record<string, string>;
  body: TurnAnswer | ErrorAnswer;
}

type Validated =
  | { ok: true; value: TurnRequest & { timeoutMs: number } }
  | { ok: false; code: ErrorCode; message: string };

function isObject(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

function positiveInteger(name: string, value: number | undefined): void {
  if (value !== undefined && (!Number.isSafeInteger(value) || value <= 0)) {
    throw new RangeError(`Invalid ${name}: expected a positive integer, got ${value}`);
  }
}

function json(status: number, body: unknown, headers: Record<string, string> = {}): Response {
  return new Response(JSON.stringify(body), {
    status,
    headers: { "content-type": "application/json", ...headers },
  });
}

function isJsonContentType(value: string | null): boolean {
  // Parameters such as `; charset=utf-8` are fine: only the media type is compared.
  return value !== null && value.split(";")[0]!.trim().toLowerCase() === "application/json";
}

function acceptsEventStream(value: string | null): boolean {
  if (value === null) return false;
  return value.split(",").some((range) =>
    range.split(";")[0]!.trim().toLowerCase() === "text/event-stream"
  );
}

/**
 * Reads at most `max` bytes of the body. Returns `undefined` as soon as the body turns out
 * larger, and reads no more of it: an oversized body is never buffered whole.
 */
async function readBody(request: Request, max: number): Promise<Uint8Array | undefined> {
  if (request.body === null) return new Uint8Array(0);
  const reader = request.body.getReader();
  const chunks: Uint8Array[] = [];
  let size = 0;
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      size += value.byteLength;
      if (size > max) {
        // Not reader.cancel(): on Node, srvx's request.body is Readable.toWeb(req), and
        // cancelling it while the socket still delivers data throws an uncaught
        // ERR_INVALID_STATE that takes the whole process down (nodejs/node#54205). Reading
        // no further is enough; every runtime discards the rest once the answer is sent.
        return undefined;
      }
      chunks.push(value);
    }
  } finally {
    reader.releaseLock();
  }
  if (chunks.length === 1) return chunks[0]!;
  const bytes = new Uint8Array(size);
  let offset = 0;
  for (const chunk of chunks) {
    bytes.set(chunk, offset);
    offset += chunk.byteLength;
  }
  return bytes;
}

function validate(
  body: unknown,
  defaultTimeoutMs: number,
  maxTimeoutMs: number,
): Validated {
  const fail = (code: ErrorCode, message: string): Validated => ({ ok: false, code, message });
  if (!isObject(body)) return fail("invalidBody", "Invalid request body: expected a JSON object");
  const { workspaceId, threadId, params, timeoutMs, threadParams } = body;
  if (!isValidWorkspaceId(workspaceId)) {
    return fail(
      "invalidWorkspaceId",
      workspaceId === undefined
        ? "Missing workspaceId"
        : 'Invalid workspaceId: expected 1 to 128 characters from A-Z, a-z, 0-9, ".", "_" and ' +
          '"-", other than "." and ".."',
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
      (timeoutMs as number) > maxTimeoutMs)
  ) {
    return fail(
      "invalidTimeout",
      `Invalid timeoutMs: expected an integer from 1 to ${maxTimeoutMs}`,
    );
  }
  if (threadParams !== undefined && !isObject(threadParams)) {
    return fail("invalidThreadParams", "Invalid threadParams: expected an object");
  }
  const value: TurnRequest & { timeoutMs: number } = {
    workspaceId,
    threadId: typeof threadId === "string" ? threadId : null,
    params: params as TurnParams,
    timeoutMs: (timeoutMs as number | undefined) ?? defaultTimeoutMs,
  };
  if (threadParams !== undefined) value.threadParams = threadParams as ThreadStartParams;
  return { ok: true, value };
}

/** Maps a failure of `pool.turn` to its transport code, by class; `undefined` if none fits. */
function transportFailure(error: unknown): TransportFailure | undefined {
  if (
    error instanceof TimeoutError ||
    // The deadline can pass before codex assigns a turn (dialing, starting the thread):
    // the pool then rejects with the deadline signal's reason, a DOMException.
    (error instanceof DOMException && error.name === "TimeoutError")
  ) {
    return { code: "brokerTimeout", message: error.message };
  }
  if (error instanceof PoolFullError) return { code: "overloaded", message: error.message };
  if (error instanceof RpcError) {
    const code = error.code === OVERLOADED_CODE ? "overloaded" : "rpcError";
    return { code, message: error.message, data: { code: error.code, data: error.data ?? null } };
  }
  if (error instanceof WorkspaceUnavailableError || error instanceof DialError) {
    return { code: "subprocessCrash", message: error.message };
  }
  if (error instanceof ConnectionClosedError) {
    return { code: "wsDisconnect", message: error.message };
  }
  return undefined;
}

/** Compares secrets in constant time: HMACs under a random key, then an XOR fold. */
function secretChecker(secret: string): (given: string) => Promise<boolean> {
  const encoder = new TextEncoder();
  // A per-handler random key makes both digests unpredictable, so comparing them leaks
  // nothing about the secret, and their fixed length hides the secret's length.
  const key = crypto.subtle.generateKey({ name: "HMAC", hash: "SHA-256" }, false, ["sign"]);
  const sign = async (text: string) =>
    new Uint8Array(await crypto.subtle.sign("HMAC", await key as CryptoKey, encoder.encode(text)));
  const expected = sign(secret);
  // Read on every request; this only keeps a failure from being reported as unhandled.
  expected.catch(() => {});
  return async (given) => {
    const [a, b] = await Promise.all([expected, sign(given)]);
    let diff = a.length ^ b.length;
    for (let i = 0; i < a.length; i++) diff |= a[i]! ^ (b[i] ?? 0);
    return diff === 0;
  };
}

function sseEvent(event: string, data: unknown): string {
  // JSON.stringify escapes CR and LF inside strings, so data is one line; the event name
  // comes from codex and is stripped of line breaks to keep the framing intact.
  return `event: ${event.replace(/[\r\n]/g, "")}\ndata: ${JSON.stringify(data ?? null)}\n\n`;
}

/**
 * Creates the broker's fetch handler over a pool:
 *
 * - `POST /api/turns` (header `X-Internal-Secret`, body `application/json`
 *   `{ workspaceId, threadId?, params, timeoutMs?, threadParams? }`) runs one turn and
 *   answers 200 `{ threadId, turn }` or 200 `{ threadId, transport: { code, message, data? } }`
 *   with `code` one of `brokerTimeout`, `subprocessCrash`, `wsDisconnect`, `rpcError`,
 *   `overloaded` (with `Retry-After`). A request the handler refuses never reaches codex
 *   and is answered `{ error: { code, message } }` with 400, 401, 404, 405 (with `Allow`),
 *   413 or 415; a closed pool gives 503 with `Retry-After`, anything unexpected 500.
 * - With `Accept: text/event-stream` a valid request is answered with Server-Sent Events:
 *   `event: thread` as soon as the thread is known, one event per codex notification of
 *   the thread (event name = method, data = params), a `: ping` comment every
 *   `heartbeatMs`, and last `event: result` holding the body the JSON answer would have
 *   had. The headers are sent by then, so the status stays 200 and there is no
 *   `Retry-After`.
 * - `GET /healthz` answers `{ status: "ok", workspaces, version }`, or 503 with
 *   `status: "draining"` once the pool is closing.
 * - `GET /metrics` answers the Prometheus text format.
 *
 * When the client goes away (`request.signal` aborts, or it cancels the event stream), the
 * turn is interrupted so codex stops working for nobody.
 *
 * @example Run a turn over HTTP
 * ```ts ignore
 * const handler = createTurnsHandler(pool, { secret: "s3cret" });
 * const response = await handler(new Request("http://broker/api/turns", {
 *   method: "POST",
 *   headers: { "content-type": "application/json", "x-internal-secret": "s3cret" },
 *   body: JSON.stringify({
 *     workspaceId: "ws-1",
 *     params: { input: [{ type: "text", text: "hi", text_elements: [] }] },
 *   }),
 * }));
 * const { threadId, turn } = await response.json();
 * ```
 *
 * @param pool The pool the turns run through; the handler follows its events for metrics.
 * @param options The secret, limits, deadlines, heartbeat, version, log hook and metrics.
 * @returns The fetch handler. It never rejects: unexpected failures are answered with 500.
 * @throws {TypeError} If `options.secret` is not a non-empty string.
 * @throws {RangeError} If a limit, deadline or interval is not a positive integer, or
 * `defaultTimeoutMs` exceeds `maxTimeoutMs`.
 */
export function createTurnsHandler(pool: Pool, options: TurnsHandlerOptions): TurnsHandler {
  if (typeof options?.secret !== "string" || options.secret === "") {
    throw new TypeError("Cannot create turns handler: secret must be a non-empty string");
  }
  positiveInteger("maxBodyBytes", options.maxBodyBytes);
  positiveInteger("defaultTimeoutMs", options.defaultTimeoutMs);
  positiveInteger("maxTimeoutMs", options.maxTimeoutMs);
  positiveInteger("heartbeatMs", options.heartbeatMs);
  const maxBodyBytes = options.maxBodyBytes ?? DEFAULT_MAX_BODY_BYTES;
  const maxTimeoutMs = options.maxTimeoutMs ?? DEFAULT_MAX_TIMEOUT_MS;
  const defaultTimeoutMs = options.defaultTimeoutMs ?? Math.min(DEFAULT_TIMEOUT_MS, maxTimeoutMs);
  if (defaultTimeoutMs > maxTimeoutMs) {
    throw new RangeError(
      `Invalid defaultTimeoutMs: ${defaultTimeoutMs} exceeds maxTimeoutMs ${maxTimeoutMs}`,
    );
  }
  const heartbeatMs = options.heartbeatMs ?? DEFAULT_HEARTBEAT_MS;
  const version = options.version ?? VERSION;
  const metrics = options.metrics ?? new Metrics();
  metrics.observePool(pool);
  const checkSecret = secretChecker(options.secret);
  const hook = options.log;
  const log = (entry: Record<string, unknown>) => {
    try {
      hook?.(entry);
    } catch {
      // A broken log sink must not turn a finished turn into a failed request.
    }
  };

  function refuse(
    status: number,
    code: ErrorCode,
    message: string,
    headers: Record<string, string> = {},
  ): Response {
    metrics.observeBadRequest(status);
    log({ msg: "bad request", status, code });
    return json(status, { error: { code, message } } satisfies ErrorAnswer, headers);
  }

  /** Runs the turn and maps every outcome to an answer; never rejects. Logs and counts it. */
  async function runTurn(
    turn: TurnRequest & { timeoutMs: number },
    signal: AbortSignal,
    stream: boolean,
    onThread: (threadId: string) => void,
    onNotification?: (method: string, params: Record<string, unknown>) => void,
  ): Promise<TurnResult> {
    const started = performance.now();
    // Until codex is reached, the thread is the one asked for (null for a new one).
    let threadId: string | null = turn.threadId ?? null;
    let result: TurnResult;
    let outcome: string;
    let turnStatus: string | null = null;
    let turnId: string | null = null;
    let failure: string | undefined;
    const turnOptions: PoolTurnOptions = {
      signal,
      timeoutMs: turn.timeoutMs,
      onThread: (id) => {
        threadId = id;
        onThread(id);
      },
    };
    if (turn.threadParams) turnOptions.threadParams = turn.threadParams;
    if (onNotification) turnOptions.onNotification = onNotification;
    try {
      const done = await pool.turn(turn.workspaceId, threadId, turn.params, turnOptions);
      threadId = done.threadId;
      turnId = done.turn.id;
      turnStatus = done.turn.status;
      outcome = String(done.turn.status);
      result = { status: 200, headers: {}, body: { threadId: done.threadId, turn: done.turn } };
    } catch (error) {
      failure = error instanceof Error ? error.message : String(error);
      if (error instanceof TimeoutError) turnId = error.turnId;
      let transport = transportFailure(error);
      if (transport?.code === "wsDisconnect" && await pool.crashed(turn.workspaceId)) {
        // The connection closed because the app-server died, not the other way round.
        transport = { code: "subprocessCrash", message: transport.message };
      }
      // The server aborts turns with a PoolClosedError when its grace period ends: that is
      // a shutdown (503 below), not a client that left.
      if (signal.aborted && !(signal.reason instanceof PoolClosedError)) {
        outcome = "cancelled";
        result = {
          status: CLIENT_CLOSED_STATUS,
          headers: {},
          body: { error: { code: "cancelled", message: "Client closed the request" } },
        };
      } else if (transport) {
        outcome = transport.code;
        result = {
          status: 200,
          headers: transport.code === "overloaded" ? { "retry-after": RETRY_AFTER_SECONDS } : {},
          body: { threadId, transport },
        };
      } else if (error instanceof PoolClosedError) {
        outcome = "unavailable";
        result = {
          status: 503,
          headers: { "retry-after": RETRY_AFTER_SECONDS },
          body: {
            error: { code: "unavailable", message: "Cannot run turn: broker is shutting down" },
          },
        };
      } else {
        outcome = "internal";
        result = {
          status: 500,
          headers: {},
          body: { error: { code: "internal", message: "Cannot run turn: internal error" } },
        };
      }
    }
    const durationMs = Math.round(performance.now() - started);
    metrics.observeTurn(outcome, durationMs);
    const entry: Record<string, unknown> = {
      msg: "turn",
      workspaceId: turn.workspaceId,
      threadId,
      turnId,
      status: turnStatus,
      outcome,
      durationMs,
      stream,
    };
    if (failure !== undefined) entry.error = failure;
    log(entry);
    return result;
  }

  function answerJson(turn: TurnRequest & { timeoutMs: number }, request: Request) {
    // request.signal aborts when the client disconnects: the pool then interrupts the turn.
    return runTurn(turn, request.signal, false, () => {}).then((result) =>
      json(result.status, result.body, result.headers)
    );
  }

  function answerStream(turn: TurnRequest & { timeoutMs: number }, request: Request): Response {
    const encoder = new TextEncoder();
    const cancel = new AbortController();
    const onRequestAbort = () => cancel.abort(request.signal.reason);
    let finished = false;
    let heartbeat: ReturnType<typeof setInterval> | undefined;
    const cleanUp = () => {
      finished = true;
      if (heartbeat !== undefined) clearInterval(heartbeat);
      heartbeat = undefined;
      request.signal.removeEventListener("abort", onRequestAbort);
    };
    const body = new ReadableStream<Uint8Array>({
      start(controller) {
        const send = (text: string) => {
          if (finished) return;
          try {
            controller.enqueue(encoder.encode(text));
          } catch {
            // The stream was torn down under us; cancel() does the rest.
          }
        };
        let threadSent = false;
        const sendThread = (threadId: string) => {
          if (threadSent) return;
          threadSent = true;
          send(sseEvent("thread", { threadId }));
        };
        if (request.signal.aborted) cancel.abort(request.signal.reason);
        else request.signal.addEventListener("abort", onRequestAbort, { once: true });
        heartbeat = setInterval(() => send(": ping\n\n"), heartbeatMs);
        if (turn.threadId) sendThread(turn.threadId);
        // Conn hands this turn only its own notifications, none while it waits in line.
        runTurn(turn, cancel.signal, true, sendThread, (method, params) => {
          send(sseEvent(method, params));
        }).then((result) => {
          if (finished) return;
          send(sseEvent("result", result.body));
          cleanUp();
          controller.close();
        });
      },
      cancel(reason) {
        cleanUp();
        cancel.abort(reason ?? new DOMException("Client closed the stream", "AbortError"));
      },
    });
    return new Response(body, {
      status: 200,
      headers: {
        "content-type": "text/event-stream",
        "cache-control": "no-cache",
        // Tells nginx not to buffer the stream, so events and heartbeats pass at once.
        "x-accel-buffering": "no",
      },
    });
  }

  async function turns(request: Request): Promise<Response> {
    // Authentication comes before anything about the body, so an unauthenticated caller
    // learns nothing about the contract.
    const secret = request.headers.get("x-internal-secret");
    if (secret === null) return refuse(401, "unauthorized", "Missing X-Internal-Secret header");
    if (!(await checkSecret(secret))) {
      return refuse(401, "unauthorized", "Wrong X-Internal-Secret header");
    }
    if (!isJsonContentType(request.headers.get("content-type"))) {
      return refuse(
        415,
        "unsupportedMediaType",
        "Unsupported Content-Type: expected application/json",
      );
    }
    const tooLarge = () =>
      refuse(413, "bodyTooLarge", `Request body too large: the limit is ${maxBodyBytes} bytes`);
    const declared = request.headers.get("content-length");
    if (declared !== null && /^\d+$/.test(declared.trim()) && Number(declared) > maxBodyBytes) {
      return tooLarge();
    }
    let bytes: Uint8Array | undefined;
    try {
      bytes = await readBody(request, maxBodyBytes);
    } catch {
      return refuse(400, "invalidBody", "Cannot read request body");
    }
    if (bytes === undefined) return tooLarge();
    let parsed: unknown;
    try {
      parsed = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(bytes));
    } catch (error) {
      return refuse(400, "invalidJson", `Invalid JSON body: ${(error as Error).message}`);
    }
    const validated = validate(parsed, defaultTimeoutMs, maxTimeoutMs);
    if (!validated.ok) return refuse(400, validated.code, validated.message);
    return acceptsEventStream(request.headers.get("accept"))
      ? answerStream(validated.value, request)
      : await answerJson(validated.value, request);
  }

  function operations(request: Request, answer: () => Response): Response {
    if (request.method !== "GET" && request.method !== "HEAD") {
      return refuse(405, "methodNotAllowed", `Method ${request.method} is not allowed`, {
        allow: "GET, HEAD",
      });
    }
    const response = answer();
    return request.method === "HEAD"
      ? new Response(null, { status: response.status, headers: response.headers })
      : response;
  }

  return async function handleTurnsRequest(request: Request): Promise<Response> {
    try {
      const { pathname } = new URL(request.url);
      switch (pathname) {
        case "/api/turns":
          if (request.method !== "POST") {
            return refuse(405, "methodNotAllowed", `Method ${request.method} is not allowed`, {
              allow: "POST",
            });
          }
          return await turns(request);
        case "/healthz":
          // No secret: load balancers and orchestrators probe it, and it reveals nothing.
          // A draining broker answers 503, so a load balancer stops sending it work.
          return operations(
            request,
            () =>
              pool.closed
                ? json(503, { status: "draining", workspaces: pool.size, version })
                : json(200, { status: "ok", workspaces: pool.size, version }),
          );
        case "/metrics":
          // No secret either, as is usual for Prometheus scrapes: the broker listens on an
          // internal port, and the metrics hold counts only, never ids or content.
          return operations(
            request,
            () =>
              new Response(metrics.render(), { headers: { "content-type": METRICS_CONTENT_TYPE } }),
          );
        default:
          return refuse(404, "notFound", `Not found: ${request.method} ${pathname}`);
      }
    } catch (error) {
      log({
        msg: "internal error",
        error: error instanceof Error ? error.message : String(error),
      });
      return json(
        500,
        {
          error: { code: "internal", message: "Cannot answer request: internal error" },
        } satisfies ErrorAnswer,
      );
    }
  };
}

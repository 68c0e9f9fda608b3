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
  allowsWorkspace,
  hasScope,
  KeySourceError,
  OPERATOR,
  type Principal,
  SCOPE_TURNS_WRITE,
  TokenError,
  type TokenVerifier,
} from "./auth.ts";
import { Metrics, METRICS_CONTENT_TYPE } from "./metrics.ts";
import type { Ownership } from "./ownership.ts";
import type { Pool } from "./pool.ts";
import type { ParamsCheck } from "./policy.ts";
import type { ThreadStartParams, Turn, TurnParams } from "./protocol.ts";
import { FORWARDED_HEADER } from "./_forward.ts";
import { placeTurn } from "./_placement.ts";
import { createRouter, type Route } from "./_router.ts";
import { secretChecker } from "./_secret.ts";
import { openEventStream } from "./_sse.ts";
import { createTurnRunner, SlowReaderError, type TurnAbortSource } from "./_turn_runner.ts";
import {
  acceptsEventStream,
  readTurnRequest,
  requestHeadBytes,
  type ValidTurnRequest,
} from "./_validate.ts";
import { type Admission, WorkspaceLimits } from "./_workspace_limits.ts";

export { Metrics, METRICS_CONTENT_TYPE, TURN_DURATION_BUCKETS } from "./metrics.ts";
export { Ownership } from "./ownership.ts";
export type { Claim, OwnershipOptions } from "./ownership.ts";
export type { AcquireResult, LeaseHolder, LeaseRecord, LeaseStore } from "./lease.ts";
export type {
  CredentialKind,
  ParamsCheck,
  PolicyContext,
  PolicyVerdict,
  TurnParamsRequest,
} from "./policy.ts";
export type { Principal, TokenVerifier } from "./auth.ts";

/** The broker's version, answered by `GET /healthz` unless the options say otherwise. */
export const VERSION = "0.1.0"; // keep in sync with deno.json

/** What {@linkcode TurnsHandlerOptions.jsonResponse} is given besides the body. */
export interface JsonResponseInit {
  /** The status code. */
  status: number;
  /** The headers, `content-type` among them, names in lower case. */
  headers: Record<string, string>;
}

/** Options for {@linkcode createTurnsHandler}. */
export interface TurnsHandlerOptions {
  /**
   * The operator's shared secret: a `POST /api/turns` that carries it in `X-Internal-Secret`
   * may use every workspace. Required and non-empty: the broker runs codex on behalf of
   * whoever can reach it.
   */
  secret: string;
  /**
   * Checks `Authorization: Bearer <JWT>`, for callers limited to the workspaces and scopes
   * their token names (see `createTokenVerifier`). Without it, a bearer token is
   * refused with 401.
   */
  tokens?: TokenVerifier;
  /**
   * The most turns one workspace runs at once; more wait in line. Defaults to 16.
   */
  maxTurnsPerWorkspace?: number;
  /**
   * The most turns of one workspace waiting in line for `maxTurnsPerWorkspace`; past that,
   * a turn is answered 429 `tooManyTurns` with `Retry-After`. Defaults to 64.
   */
  maxWaitingTurnsPerWorkspace?: number;
  /** Larger request bodies are refused with 413. Defaults to 1 MiB. */
  maxBodyBytes?: number;
  /**
   * How long a request's body may take to arrive, from the moment the handler starts reading
   * it; a slower one is refused with 408 `requestTimeout` and `Connection: close`, and what
   * came of it is dropped. Defaults to 60 s.
   */
  requestTimeoutMs?: number;
  /**
   * Whether the handler measures each request's line and headers itself, answering 431
   * `headersTooLarge` over 16 KiB. Defaults to `true`. A server whose HTTP parser refuses
   * such heads before the handler sees them (`node:http` on Node and Deno, Bun: 16 KiB
   * each) may turn it off: the count walks every header of every request.
   */
  checkHeadSize?: boolean;
  /**
   * Deadline of a turn whose request has no `timeoutMs`. Defaults to 5 minutes, or to
   * `maxTimeoutMs` when that is lower.
   */
  defaultTimeoutMs?: number;
  /** The largest `timeoutMs` a request may ask for. Defaults to 30 minutes. */
  maxTimeoutMs?: number;
  /**
   * Interval of the `: ping` comment lines of a streaming answer, sent while nothing else
   * waits for the client. Defaults to 15 s.
   */
  heartbeatMs?: number;
  /**
   * The most bytes of events a streaming answer holds for a client that has not read them
   * yet. A client that falls that far behind gets a last `result` event with the error
   * `slowReader`, its turn is interrupted, and `codex_broker_slow_readers_total` counts it.
   * Defaults to 8 MiB. A client that stops reading costs the broker at most about twice this
   * (what waits, and the last chunk the server took), plus the socket's buffers: well under
   * 64 MB.
   */
  maxStreamBufferBytes?: number;
  /** Answered by `GET /healthz`. Defaults to {@linkcode VERSION}. */
  version?: string;
  /**
   * What `GET /healthz` reports about codex, as its `codex` field (left out without it).
   * The broker passes what codex said about its credentials at start.
   */
  codexHealth?: () => CodexHealth;
  /**
   * Receives one entry per turn (`msg: "turn"`), per refused request (`msg: "bad request"`)
   * and per unexpected failure (`msg: "internal error"`). Entries never hold the secret or
   * any header. A hook that throws is ignored.
   */
  log?: (entry: Record<string, unknown>) => void;
  /** The registry `GET /metrics` renders; pass one to share it with the server. */
  metrics?: Metrics;
  /**
   * Aborting it interrupts every turn in flight with its reason; a `PoolClosedError` reason
   * is answered 503 `unavailable` with `Retry-After`, as a server that stops does.
   * The handler listens to it only while a turn runs.
   */
  shutdownSignal?: AbortSignal;
  /**
   * Called once for every request the handler was given, when it is done with it: as it
   * returns the answer, or, for an event stream, when the stream has ended (its last event
   * is queued) or the client cancelled it. A server counts requests in flight with it for a
   * graceful shutdown. A hook that throws is ignored.
   */
  onRequestEnd?: (request: Request) => void;
  /**
   * Makes each JSON answer: every answer but event streams and answers relayed from an
   * owner. Defaults to `new Response(body, init)`. A server may take a class of its own:
   * srvx's `FastResponse` on `node:http` is written straight to the socket, where a web
   * `Response` is copied through a web stream first. `init.headers` already holds every
   * header of the answer, `X-Broker-Id` included.
   */
  jsonResponse?: (body: string, init: JsonResponseInit) => Response;
  /** This broker's id: every answer the handler gives carries it as `X-Broker-Id`. */
  brokerId?: string;
  /**
   * For several brokers on one shared workspaces volume: the workspace leases. A turn runs
   * here only while this broker holds (or can take) its workspace's lease; otherwise the
   * request is forwarded to the owner and its answer relayed, and if the owner cannot be
   * reached before its lease expires the answer is 503 `workspaceBusy` with `Retry-After`.
   * The pool must start codex through a resolver that calls {@linkcode Ownership.attach}
   * and {@linkcode Ownership.detach} around each codex's life (the broker's leased
   * resolver does): after a turn, a lease with no codex attached is released.
   */
  ownership?: Ownership;
  /**
   * What callers may ask codex for (see `createParamsCheck` in `policy.ts`): run on every
   * authenticated, valid turn request before anything else happens to it. A refusal is
   * answered 403 `forbiddenParam` with `error.field` naming the field, and nothing reaches
   * codex; otherwise the turn runs with the parameters it answers (paths resolved, defaults
   * filled in). Without it, parameters reach codex as they came.
   */
  checkParams?: ParamsCheck;
}

/** The `codex` field of `GET /healthz`. */
export interface CodexHealth {
  /**
   * Whether codex can reach its model: `ok` (a login, or a provider that needs none),
   * `missing` (run `codex login`, or set `OPENAI_API_KEY`), `unknown` (not asked yet, or
   * codex did not answer).
   */
  credentials: "ok" | "missing" | "unknown";
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
  | "overloaded"
  | "turnLost";

/**
 * An error codex reported for a turn: its last `error` notification, or a failed turn's
 * `error`, with a `code` a client can act on without reading the text.
 */
export interface CodexError {
  /**
   * Stable: `unauthorized` when codex says `unauthorized` or the model provider answered
   * HTTP 401 (log in: `codex login`, or set `OPENAI_API_KEY`); otherwise codex's
   * `codexErrorInfo` string (`usageLimitExceeded`, `serverOverloaded`, …) or the name of its
   * object variant (`httpConnectionFailed`, `responseStreamDisconnected`, …); `other` if
   * codex gave none.
   */
  code: string;
  /** codex's message, e.g. `Reconnecting... 2/5` or `unexpected status 401 Unauthorized…`. */
  message: string;
  /** `codexErrorInfo` exactly as codex sent it, or `null`. */
  codexErrorInfo: unknown;
  /** The provider's HTTP status, when codex reported one. */
  httpStatusCode: number | null;
  /** codex's `additionalDetails`, or `null`. */
  additionalDetails: string | null;
  /** From an `error` notification: whether codex was going to retry; else `null`. */
  willRetry: boolean | null;
}

/** A failure between the broker and codex, answered with status 200. */
export interface TransportFailure {
  /** What failed. */
  code: TransportCode;
  /**
   * The error's message; when codex reported an error for the turn, followed by
   * `; codex last reported: <its message>`.
   */
  message: string;
  /** For `rpcError` and an overloaded codex: `{ code, data }` of the JSON-RPC error. */
  data?: unknown;
  /** The last `error` notification codex sent for the turn, if any. */
  codexError?: CodexError;
}

/**
 * The 200 answer of `POST /api/turns`: codex's turn (with `codexError` when it failed), or
 * the transport failure instead.
 */
export type TurnAnswer =
  | { threadId: string; turn: Turn; codexError?: CodexError }
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
  | "forbiddenParam"
  | "unauthorized"
  | "forbiddenWorkspace"
  | "insufficientScope"
  | "tooManyTurns"
  | "notFound"
  | "methodNotAllowed"
  | "bodyTooLarge"
  | "requestTimeout"
  | "headersTooLarge"
  | "unsupportedMediaType"
  | "unavailable"
  | "internal"
  | "cancelled"
  | "slowReader"
  | "workspaceMismatch"
  | "workspaceBusy"
  | "atCapacity"
  | "notOwner";

/**
 * The answer to a refused or failed request (status 4xx or 5xx), and the last event of an
 * event stream that ended without its turn's answer (`slowReader`).
 */
export interface ErrorAnswer {
  /**
   * What is wrong; `owner` names the broker that owns the workspace (`workspaceBusy`),
   * `field` the parameter the policy refused (`forbiddenParam`, e.g. `threadParams.cwd`).
   */
  error: { code: ErrorCode; message: string; owner?: string; field?: string };
}

/** A fetch handler: one `Request` in, one `Response` out. */
export type TurnsHandler = (request: Request) => Promise<Response>;

/** What a refusal carries besides its status, code and message. */
interface Refusal {
  /** Headers of the answer (`Retry-After`, `WWW-Authenticate`, `Connection: close`, …). */
  headers?: Record<string, string> | undefined;
  /** The broker that owns the workspace, for `workspaceBusy`. */
  owner?: string | undefined;
  /** The parameter a `forbiddenParam` names. */
  field?: string;
  /** More for the log line only (the principal, why a token failed). */
  details?: Record<string, unknown>;
}

const MiB = 1024 * 1024;
const DEFAULT_MAX_BODY_BYTES = MiB;
const DEFAULT_REQUEST_TIMEOUT_MS = 60_000;
// What Node and Bun allow a request's head by default; Deno allows more, so the handler
// holds every runtime to the same bound.
const MAX_HEAD_BYTES = 16 * 1024;
const DEFAULT_TIMEOUT_MS = 5 * 60_000;
const DEFAULT_MAX_TIMEOUT_MS = 30 * 60_000;
const DEFAULT_HEARTBEAT_MS = 15_000;
const DEFAULT_MAX_STREAM_BUFFER_BYTES = 8 * MiB;
const DEFAULT_MAX_TURNS_PER_WORKSPACE = 16;
const DEFAULT_MAX_WAITING_TURNS_PER_WORKSPACE = 64;
// A client told to come back waits this long; a turn takes seconds, so a slot frees by then.
const TOO_MANY_TURNS_RETRY_AFTER = "1";
const KEY_SOURCE_RETRY_AFTER = "5";
// RFC 6750: the scheme a client should use, and why its token was not accepted.
const BEARER_CHALLENGE = 'Bearer realm="codex-broker"';
const INVALID_TOKEN_CHALLENGE = `${BEARER_CHALLENGE}, error="invalid_token"`;
const INSUFFICIENT_SCOPE_CHALLENGE =
  `${BEARER_CHALLENGE}, error="insufficient_scope", scope="${SCOPE_TURNS_WRITE}"`;
// Headers trim the value; one token, no second credential after a comma (two Authorization
// headers arrive joined by ", ").
const BEARER = /^Bearer +([^\s,]+)$/i;

/** Who runs a turn, and its place under the workspace's limits. */
interface RunAs {
  principal: string;
  admission: Admission;
}

/** What a route gets besides the request: the way to report the request's end itself. */
interface Exchange {
  /**
   * Takes over the report of the request's end, for an answer that goes on after the route
   * returns (an event stream).
   *
   * @returns The function to call once when the answer has ended.
   */
  takeEnd(): () => void;
}

function positiveInteger(name: string, value: number | undefined): void {
  if (value !== undefined && (!Number.isSafeInteger(value) || value <= 0)) {
    throw new RangeError(`Invalid ${name}: expected a positive integer, got ${value}`);
  }
}

function nonNegativeInteger(name: string, value: number | undefined): void {
  if (value !== undefined && (!Number.isSafeInteger(value) || value < 0)) {
    throw new RangeError(`Invalid ${name}: expected a non-negative integer, got ${value}`);
  }
}

/** The part of a Node `ServerResponse` that {@linkcode clientGone} uses. */
interface NodeResponseEvents {
  readonly writableEnded: boolean;
  readonly destroyed: boolean;
  once(event: "close", listener: () => void): unknown;
  off(event: "close", listener: () => void): unknown;
}

/**
 * The client going away before its answer was sent. On srvx's `node:http` adapter (Node,
 * and Deno by default) that is the Node response's `close` before its end, which is what
 * srvx's `request.signal` listens to, without the `AbortController` and listener it makes
 * per request (with the turn's own, 3% of the CPU per turn on Node with an instant codex).
 * Elsewhere it is `request.signal`.
 */
function clientGone(request: Request): TurnAbortSource {
  const res = (request as { runtime?: { node?: { res?: Partial<NodeResponseEvents> } } })
    .runtime?.node?.res;
  if (typeof res?.once !== "function" || typeof res.off !== "function") return request.signal;
  const response = res as NodeResponseEvents;
  return (abort) => {
    const onClose = () => {
      if (!response.writableEnded) {
        abort(new DOMException("Client closed the request", "AbortError"));
      }
    };
    response.once("close", onClose);
    if (response.destroyed) onClose();
    return () => response.off("close", onClose);
  };
}

function webJsonResponse(body: string, init: JsonResponseInit): Response {
  return new Response(body, init);
}

/**
 * `response` with `onEnd` called once its body has been read to its end, has failed, or was
 * cancelled by the client.
 */
function endWithBody(response: Response, onEnd: () => void): Response {
  const body = response.body;
  if (body === null) {
    onEnd();
    return response;
  }
  const reader = body.getReader();
  // No read-ahead (highWaterMark 0): the owner's stream is read as fast as the client takes it.
  const relayed = new ReadableStream<Uint8Array>({
    async pull(controller) {
      let result: ReadableStreamReadResult<Uint8Array>;
      try {
        result = await reader.read();
      } catch (error) {
        onEnd();
        controller.error(error);
        return;
      }
      if (result.done) {
        onEnd();
        controller.close();
      } else {
        controller.enqueue(result.value);
      }
    },
    cancel(reason) {
      onEnd();
      return reader.cancel(reason);
    },
  }, { highWaterMark: 0 });
  return new Response(relayed, { status: response.status, headers: response.headers });
}

/**
 * Creates the broker's fetch handler over a pool:
 *
 * - `POST /api/turns` (header `X-Internal-Secret`, or with `tokens` `Authorization: Bearer
 *   <JWT>`; body `application/json`
 *   `{ workspaceId, threadId?, params, timeoutMs?, threadParams? }`) runs one turn and
 *   answers 200 `{ threadId, turn }` or 200 `{ threadId, transport: { code, message, data? } }`
 *   with `code` one of `brokerTimeout`, `subprocessCrash`, `wsDisconnect`, `rpcError`,
 *   `overloaded` (with `Retry-After`). A request the handler refuses never reaches codex
 *   and is answered `{ error: { code, message } }` with 400, 401, 403 (`forbiddenParam`
 *   from `checkParams`, with `field`), 404, 405 (with `Allow`), 408 (a body slower than
 *   `requestTimeoutMs`), 413, 415 or 431 (a request line and headers over 16 KiB, on any
 *   route, unless `checkHeadSize` is off); a closed pool gives 503 `unavailable` and a pool
 *   whose every workspace is busy 503 `atCapacity`, both with `Retry-After`; anything
 *   unexpected 500. An answer given before the body was read to its end (408, 413, 431)
 *   carries `Connection: close`.
 * - Authentication: the right `X-Internal-Secret` opens every workspace (the log names the
 *   caller `operator`); a bearer token only the workspaces and scopes it names (the log
 *   names its `sub`, never the token). A missing, wrong, expired, not yet valid, badly
 *   signed or `alg: none` credential, or both headers at once, is 401 `unauthorized` (a
 *   token's with `WWW-Authenticate: Bearer … error="invalid_token"`); a token without
 *   `turns:write` is 403 `insufficientScope`, one for another workspace 403
 *   `forbiddenWorkspace`; keys that cannot be loaded give 503 `unavailable`.
 * - A workspace runs at most `maxTurnsPerWorkspace` turns at once, with at most
 *   `maxWaitingTurnsPerWorkspace` more waiting; past that a turn is answered 429
 *   `tooManyTurns` with `Retry-After`.
 * - With `Accept: text/event-stream` a valid request is answered with Server-Sent Events:
 *   `event: thread` as soon as the thread is known, one event per codex notification of
 *   the turn (event name = method, data = params), a `: ping` comment every `heartbeatMs`
 *   while nothing else waits for the client, and last `event: result` holding the body the
 *   JSON answer would have had. The headers are sent by then, so the status stays 200 and
 *   there is no `Retry-After`. A client that falls `maxStreamBufferBytes` behind gets a last
 *   `result` of `{ error: { code: "slowReader", message } }` instead, and its turn is
 *   interrupted.
 * - `POST /api/workspaces/{workspaceId}/turns` does the same with the workspace taken from
 *   the path, a routing key a load balancer can hash on; a body `workspaceId` that differs,
 *   or a bad id in the path, is a 400 (`workspaceMismatch`, `invalidWorkspaceId`). On either
 *   route an `X-Workspace-Id` header that differs from the workspace is a 400
 *   (`workspaceMismatch`).
 * - With `ownership`, a turn whose workspace another live broker holds is forwarded to it
 *   and its answer relayed; an owner that cannot be reached while its lease lasts gives 503
 *   `workspaceBusy` with `Retry-After` and `error.owner`. A forwarded request for a
 *   workspace this broker does not hold (or is handing over) is answered 421 `notOwner`.
 * - With `brokerId`, every answer carries `X-Broker-Id`: the broker that ran the turn (a
 *   relayed answer keeps the owner's).
 * - `GET /healthz` answers `{ status: "ok", workspaces, version }` (and `codex` with
 *   `codexHealth`), or 503 with `status: "draining"` once the pool is closing.
 * - `GET /metrics` answers the Prometheus text format.
 *
 * When the client goes away (`request.signal` aborts, or it cancels the event stream), the
 * turn is interrupted so codex stops working for nobody; so it is when `shutdownSignal`
 * aborts.
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
 * @param options The secret, token verifier, limits, deadlines, heartbeat, version, log
 * hook, metrics, shutdown signal and end-of-request hook.
 * @returns The fetch handler. It never rejects: unexpected failures are answered with 500.
 * @throws {TypeError} If `options.secret` is not a non-empty string.
 * @throws {RangeError} If a limit, deadline or interval is not a positive integer (the
 * waiting turns may be 0), or `defaultTimeoutMs` exceeds `maxTimeoutMs`.
 */
export function createTurnsHandler(pool: Pool, options: TurnsHandlerOptions): TurnsHandler {
  if (typeof options?.secret !== "string" || options.secret === "") {
    throw new TypeError("Cannot create turns handler: secret must be a non-empty string");
  }
  positiveInteger("maxBodyBytes", options.maxBodyBytes);
  positiveInteger("requestTimeoutMs", options.requestTimeoutMs);
  positiveInteger("defaultTimeoutMs", options.defaultTimeoutMs);
  positiveInteger("maxTimeoutMs", options.maxTimeoutMs);
  positiveInteger("heartbeatMs", options.heartbeatMs);
  positiveInteger("maxStreamBufferBytes", options.maxStreamBufferBytes);
  positiveInteger("maxTurnsPerWorkspace", options.maxTurnsPerWorkspace);
  nonNegativeInteger("maxWaitingTurnsPerWorkspace", options.maxWaitingTurnsPerWorkspace);
  const maxBodyBytes = options.maxBodyBytes ?? DEFAULT_MAX_BODY_BYTES;
  const maxTimeoutMs = options.maxTimeoutMs ?? DEFAULT_MAX_TIMEOUT_MS;
  const defaultTimeoutMs = options.defaultTimeoutMs ?? Math.min(DEFAULT_TIMEOUT_MS, maxTimeoutMs);
  if (defaultTimeoutMs > maxTimeoutMs) {
    throw new RangeError(
      `Invalid defaultTimeoutMs: ${defaultTimeoutMs} exceeds maxTimeoutMs ${maxTimeoutMs}`,
    );
  }
  const requestTimeoutMs = options.requestTimeoutMs ?? DEFAULT_REQUEST_TIMEOUT_MS;
  const bodyLimits = { maxBodyBytes, defaultTimeoutMs, maxTimeoutMs, requestTimeoutMs };
  const heartbeatMs = options.heartbeatMs ?? DEFAULT_HEARTBEAT_MS;
  const maxStreamBufferBytes = options.maxStreamBufferBytes ?? DEFAULT_MAX_STREAM_BUFFER_BYTES;
  const version = options.version ?? VERSION;
  const codexHealth = options.codexHealth;
  const metrics = options.metrics ?? new Metrics();
  metrics.observePool(pool);
  const checkSecret = secretChecker(options.secret);
  const verifyToken = options.tokens;
  const limits = new WorkspaceLimits(
    options.maxTurnsPerWorkspace ?? DEFAULT_MAX_TURNS_PER_WORKSPACE,
    options.maxWaitingTurnsPerWorkspace ?? DEFAULT_MAX_WAITING_TURNS_PER_WORKSPACE,
  );
  const { log: logHook, onRequestEnd } = options;
  const makeJson = options.jsonResponse ?? webJsonResponse;
  const checkHeadSize = options.checkHeadSize ?? true;
  // The JSON answers name this broker from the start: adding the header afterwards made
  // srvx's FastResponse build a web Headers for every answer on node:http.
  const ownHeaders: Record<string, string> = options.brokerId === undefined
    ? {}
    : { "x-broker-id": options.brokerId };
  const answered = new WeakSet<Response>();
  const json = (status: number, body: unknown, headers: Record<string, string> = {}) => {
    const response = makeJson(JSON.stringify(body), {
      status,
      headers: { "content-type": "application/json", ...ownHeaders, ...headers },
    });
    answered.add(response);
    return response;
  };
  const log = (entry: Record<string, unknown>) => {
    try {
      logHook?.(entry);
    } catch {
      // A broken log sink must not turn a finished turn into a failed request.
    }
  };
  const runTurn = createTurnRunner(pool, {
    metrics,
    log,
    shutdownSignal: options.shutdownSignal,
  });
  const { ownership, brokerId, checkParams } = options;

  function refuse(
    status: number,
    code: ErrorCode,
    message: string,
    extra: Refusal = {},
  ): Response {
    const { headers = {}, owner, field, details } = extra;
    metrics.observeBadRequest(status);
    log({
      msg: "bad request",
      status,
      code,
      ...details,
      ...(field === undefined ? {} : { field }),
    });
    const error: ErrorAnswer["error"] = { code, message };
    if (owner !== undefined) error.owner = owner;
    if (field !== undefined) error.field = field;
    return json(status, { error } satisfies ErrorAnswer, headers);
  }

  async function answerJson(
    turn: ValidTurnRequest,
    request: Request,
    served: () => void,
    run: RunAs,
  ): Promise<Response> {
    // When the client disconnects the pool interrupts the turn.
    const result = await runTurn(turn, {
      ...run,
      stream: false,
      signals: [clientGone(request)],
      forwardedBy: request.headers.get(FORWARDED_HEADER),
    });
    served();
    return json(result.status, result.body, result.headers);
  }

  function answerStream(
    turn: ValidTurnRequest,
    request: Request,
    onEnd: () => void,
    served: () => void,
    run: RunAs,
  ): Response {
    // Aborted when the handler gives up on the turn: the client cancelled the stream, or
    // fell too far behind.
    const giveUp = new AbortController();
    const stream = openEventStream({
      heartbeatMs,
      maxBufferBytes: maxStreamBufferBytes,
      onCancel: (reason) => {
        giveUp.abort(reason ?? new DOMException("Client closed the stream", "AbortError"));
      },
      onOverflow: () => {
        const error = new SlowReaderError(maxStreamBufferBytes);
        metrics.observeSlowReader();
        stream.end(
          "result",
          { error: { code: "slowReader", message: error.message } } satisfies ErrorAnswer,
        );
        // Not while Conn is still handing us the notification: it interrupts the turn on
        // abort, and should do so from its own turn, not from inside its dispatch.
        queueMicrotask(() => giveUp.abort(error));
      },
      onEnd,
    });
    let threadSent = false;
    const sendThread = (threadId: string) => {
      if (threadSent) return;
      threadSent = true;
      stream.send("thread", { threadId });
    };
    if (turn.threadId) sendThread(turn.threadId);
    // Conn hands this turn only its own notifications, none while it waits in line.
    void runTurn(turn, {
      ...run,
      stream: true,
      forwardedBy: request.headers.get(FORWARDED_HEADER),
      signals: [clientGone(request), giveUp.signal],
      onThread: sendThread,
      onNotification: (method, params) => stream.send(method, params),
    }).then((result) => {
      served();
      stream.end("result", result.body);
    });
    return stream.response;
  }

  async function postTurn(
    request: Request,
    exchange: Exchange,
    pathWorkspaceId?: string,
  ): Promise<Response> {
    // Authentication comes before anything about the body, so an unauthenticated caller
    // learns nothing about the contract. The body is not touched on the way: an answer that
    // leaves it unread leaves the connection to the server, which drains or closes it.
    const principal = await authenticate(request);
    if (principal instanceof Response) return principal;
    const who = { principal: principal.subject };
    if (!hasScope(principal, SCOPE_TURNS_WRITE)) {
      return refuse(
        403,
        "insufficientScope",
        `Cannot run turn: the token lacks the scope ${SCOPE_TURNS_WRITE}`,
        { headers: { "www-authenticate": INSUFFICIENT_SCOPE_CHALLENGE }, details: who },
      );
    }
    const read = await readTurnRequest(request, bodyLimits, pathWorkspaceId);
    if (!read.ok) return refuse(read.status, read.code, read.message, { headers: read.headers });
    let turn = read.value;
    if (!allowsWorkspace(principal, turn.workspaceId)) {
      return refuse(
        403,
        "forbiddenWorkspace",
        `Cannot run turn: the token is not for workspace ${turn.workspaceId}`,
        { details: who },
      );
    }
    if (checkParams) {
      const verdict = await checkParams(turn, {
        credential: principal.kind,
        workspaceId: turn.workspaceId,
      });
      if (!verdict.allowed) {
        return refuse(403, "forbiddenParam", verdict.message, {
          field: verdict.field,
          details: who,
        });
      }
      const { threadParams, params } = verdict;
      turn = { ...turn, params, ...(threadParams ? { threadParams } : {}) };
    }
    let served = () => {};
    if (ownership) {
      let placement;
      try {
        placement = await placeTurn(ownership, request, {
          workspaceId: turn.workspaceId,
          body: read.bytes,
        });
      } catch (error) {
        if (!request.signal.aborted) throw error;
        return json(
          499,
          {
            error: { code: "cancelled", message: "Client closed the request" },
          } satisfies ErrorAnswer,
        );
      }
      if (placement.kind === "relayed") {
        // The owner's answer goes on after the route returns (an event stream): the request
        // lasts until it has been relayed, as a stream of our own does.
        return endWithBody(placement.response, exchange.takeEnd());
      }
      if (placement.kind === "refused") {
        const { status, code, message, headers, owner } = placement.refusal;
        return refuse(status, code, message, { headers, owner });
      }
      const forwarded = placement.forwarded;
      served = () => {
        // The lease this request took stays only if a codex runs under it now; a full pool
        // or a client that left before the start must not bind the workspace to this broker.
        ownership.releaseUnused(turn.workspaceId).catch(() => {});
        ownership.turnServed(turn.workspaceId, forwarded);
      };
    }
    // After placement: a turn forwarded elsewhere counts against the owner's limits.
    const admission = limits.admit(turn.workspaceId);
    if (admission === undefined) {
      served();
      return refuse(
        429,
        "tooManyTurns",
        `Cannot run turn: workspace ${turn.workspaceId} has ${limits.maxRunning} turns ` +
          `running and ${limits.maxWaiting} waiting`,
        { headers: { "retry-after": TOO_MANY_TURNS_RETRY_AFTER }, details: who },
      );
    }
    const run = { principal: principal.subject, admission };
    try {
      return acceptsEventStream(request.headers.get("accept"))
        ? answerStream(turn, request, exchange.takeEnd(), served, run)
        : await answerJson(turn, request, served, run);
    } catch (error) {
      // The runner releases it when it ran; if it never got to, the slot must not leak.
      admission.release();
      throw error;
    }
  }

  /**
   * Who sent the request, or the 401 (503 when the token's keys cannot be had) to answer.
   * One credential per request: with both headers it is refused, so that a token's limits
   * are never silently dropped for a secret that came along (a header smuggled in by a
   * proxy, say), and a caller learns of its mistake.
   */
  async function authenticate(request: Request): Promise<Principal | Response> {
    const secret = request.headers.get("x-internal-secret");
    const authorization = request.headers.get("authorization");
    const challenge = verifyToken ? { "www-authenticate": BEARER_CHALLENGE } : {};
    if (secret !== null && authorization !== null) {
      return refuse(
        401,
        "unauthorized",
        "Send either X-Internal-Secret or Authorization, not both",
        { headers: challenge },
      );
    }
    if (secret !== null) {
      if (!(await checkSecret(secret))) {
        return refuse(401, "unauthorized", "Wrong X-Internal-Secret header");
      }
      return OPERATOR;
    }
    if (authorization === null) {
      return refuse(
        401,
        "unauthorized",
        verifyToken
          ? "Missing X-Internal-Secret or Authorization header"
          : "Missing X-Internal-Secret header",
        { headers: challenge },
      );
    }
    if (!verifyToken) {
      return refuse(
        401,
        "unauthorized",
        "Cannot authenticate: this broker takes no bearer tokens; send X-Internal-Secret",
      );
    }
    const invalid = (message: string, reason: string) => {
      const headers = { "www-authenticate": INVALID_TOKEN_CHALLENGE };
      // The reason (expired, badSignature, …) is for the operator's log, never the token.
      return refuse(401, "unauthorized", message, { headers, details: { reason } });
    };
    const match = BEARER.exec(authorization);
    if (!match) {
      return invalid("Malformed Authorization header: expected Bearer <token>", "malformed");
    }
    try {
      return await verifyToken(match[1]!);
    } catch (error) {
      if (error instanceof TokenError) return invalid(error.message, error.reason);
      if (error instanceof KeySourceError) {
        log({ msg: "token keys unavailable", error: error.message });
        return refuse(
          503,
          "unavailable",
          "Cannot check token: the keys to verify it are unavailable",
          { headers: { "retry-after": KEY_SOURCE_RETRY_AFTER } },
        );
      }
      throw error;
    }
  }

  // The routing table: a new route is a new row.
  const routes: Route<Exchange>[] = [
    {
      path: "/api/turns",
      methods: { POST: (request, _params, exchange) => postTurn(request, exchange) },
    },
    {
      // The workspace in the path is a routing key a load balancer can hash on.
      path: "/api/workspaces/{workspaceId}/turns",
      methods: {
        POST: (request, params, exchange) => postTurn(request, exchange, params.workspaceId),
      },
    },
    {
      path: "/healthz",
      methods: {
        // No secret: load balancers and orchestrators probe it, and it reveals nothing.
        // A draining broker answers 503, so a load balancer stops sending it work.
        GET: () => {
          const draining = pool.closed || (ownership?.draining ?? false);
          return json(draining ? 503 : 200, {
            status: draining ? "draining" : "ok",
            workspaces: pool.size,
            version,
            ...(codexHealth ? { codex: codexHealth() } : {}),
          });
        },
      },
    },
    {
      path: "/metrics",
      methods: {
        // No secret either, as is usual for Prometheus scrapes: the broker listens on an
        // internal port, and the metrics hold counts only, never ids or content.
        GET: () =>
          new Response(metrics.render(), { headers: { "content-type": METRICS_CONTENT_TYPE } }),
      },
    },
  ];
  const route = createRouter(routes, {
    notFound: (request, pathname) =>
      refuse(404, "notFound", `Not found: ${request.method} ${pathname}`),
    methodNotAllowed: (request, allow) =>
      refuse(405, "methodNotAllowed", `Method ${request.method} is not allowed`, {
        headers: { allow },
      }),
  });

  return async function handleTurnsRequest(request: Request): Promise<Response> {
    let ended = false;
    let deferred = false;
    const end = () => {
      if (ended) return;
      ended = true;
      try {
        onRequestEnd?.(request);
      } catch {
        // The server's bookkeeping must not fail the answer.
      }
    };
    try {
      const response = checkHeadSize && requestHeadBytes(request) > MAX_HEAD_BYTES
        ? refuse(
          431,
          "headersTooLarge",
          `Request header fields too large: the limit is ${MAX_HEAD_BYTES} bytes`,
          { headers: { connection: "close" } },
        )
        : await route(request, {
          takeEnd: () => {
            deferred = true;
            return end;
          },
        });
      // A relayed answer names the owner that ran the turn; event streams get this broker's.
      if (
        brokerId !== undefined && !answered.has(response) && !response.headers.has("x-broker-id")
      ) {
        response.headers.set("x-broker-id", brokerId);
      }
      return response;
    } catch (error) {
      // Whoever took the end over never got to answer.
      deferred = false;
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
    } finally {
      if (!deferred) end();
    }
  };
}

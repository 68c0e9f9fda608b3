/**
 * codex-broker: run codex turns over a loopback WebSocket to a codex `app-server`, using
 * its JSON-RPC v2 protocol. The core is web-standard (`WebSocket`, `AbortSignal`,
 * `EventTarget`, timers) and runs unchanged on Deno, Bun and Node 22+.
 *
 * - {@linkcode Conn}: one connection; `dial`, `startThread`, `turn`, `interrupt`, `request`.
 * - {@linkcode Pool}: one connection per workspace, dialed once and reaped when idle.
 * - {@linkcode parsePolicy}, {@linkcode createParamsCheck}: what callers may ask codex for.
 *
 * @example Run one turn
 * ```ts ignore
 * import { Conn } from "jsr:@codex-broker/broker";
 *
 * const conn = await Conn.dial("ws://127.0.0.1:4500", {
 *   headers: { Authorization: `Bearer ${token}` },
 * });
 * try {
 *   const threadId = await conn.startThread({ cwd: "/srv/ws-1" });
 *   const turn = await conn.turn(threadId, {
 *     input: [{ type: "text", text: "List the files here", text_elements: [] }],
 *   });
 *   console.log(turn.status, turn.items);
 * } finally {
 *   conn.close();
 * }
 * ```
 *
 * @module
 */

export { Conn } from "./src/conn.ts";
export type {
  CallOptions,
  ConnStats,
  DialOptions,
  DroppedFrames,
  TurnOptions,
} from "./src/conn.ts";
export { Pool, PoolEvent } from "./src/pool.ts";
export type {
  GetOptions,
  PoolEventType,
  PoolOptions,
  PoolTurnOptions,
  PoolTurnResult,
  ReleaseOptions,
} from "./src/pool.ts";
export {
  ConnectionClosedError,
  DialError,
  PoolClosedError,
  PoolFullError,
  RpcError,
  TimeoutError,
  TurnLostError,
  TurnRpcError,
  WorkspaceOwnedError,
  WorkspaceUnavailableError,
} from "./src/errors.ts";
export { ConnCloseEvent, NotificationEvent, ServerRequestEvent } from "./src/events.ts";
export type { ServerRequestOutcome } from "./src/events.ts";
export { answerServerRequest } from "./src/approvals.ts";
export type {
  ApprovalDecision,
  ApprovalHandler,
  Approvals,
  ServerRequestAnswer,
} from "./src/approvals.ts";
export {
  createParamsCheck,
  DEFAULT_POLICY,
  DEFAULT_RULES,
  parsePolicy,
  PolicyError,
} from "./src/policy.ts";
export type {
  ApprovalPolicyName,
  ApprovalsReviewerName,
  CredentialKind,
  CredentialRules,
  ExtraFields,
  ParamsCheck,
  ParamsCheckOptions,
  Policy,
  PolicyContext,
  PolicyDefaults,
  PolicyVerdict,
  SandboxMode,
  TurnParamsRequest,
  WorkspacePathResolver,
} from "./src/policy.ts";
export type { BackoffOptions } from "./src/_backoff.ts";
export type { Endpoint, Resolver, WsUrlResolver } from "./src/resolver.ts";
export { Ownership } from "./src/ownership.ts";
export type { Claim, OwnershipOptions } from "./src/ownership.ts";
export { isLive } from "./src/lease.ts";
export {
  allowsWorkspace,
  createTokenVerifier,
  hasScope,
  JWKS_ALGORITHMS,
  KeySourceError,
  OPERATOR,
  SCOPE_TURNS_READ,
  SCOPE_TURNS_WRITE,
  TokenError,
} from "./src/auth.ts";
export type {
  JsonWebKeySet,
  Principal,
  TokenErrorReason,
  TokenVerifier,
  TokenVerifierOptions,
} from "./src/auth.ts";
export type { AcquireResult, LeaseHolder, LeaseRecord, LeaseStore } from "./src/lease.ts";
export type {
  ClientInfo,
  JsonRpcErrorObject,
  JsonRpcNotification,
  JsonRpcRequest,
  JsonRpcResponse,
  RequestId,
  ServerRequest,
  ThreadItem,
  ThreadStartParams,
  Turn,
  TurnError,
  TurnParams,
  UserInput,
} from "./src/protocol.ts";

/**
 * JSON-RPC envelopes and the small subset of the codex app-server v2 protocol the broker
 * reads. Every object type is open: fields the broker does not know pass through untouched.
 *
 * @module
 */

/** A JSON-RPC request id. codex uses integers; strings are allowed by JSON-RPC. */
export type RequestId = number | string;

/** A request, in either direction. codex omits `"jsonrpc": "2.0"`. */
export interface JsonRpcRequest {
  /** Correlates the response. */
  id: RequestId;
  /** The method called. */
  method: string;
  /** The method's parameters. */
  params?: unknown;
}

/** A notification: a request without an id, never answered. */
export interface JsonRpcNotification {
  /** The event's method, e.g. `turn/completed`. */
  method: string;
  /** The event's parameters. */
  params?: unknown;
}

/** The error member of a failed response. */
export interface JsonRpcErrorObject {
  /** The JSON-RPC error code. */
  code: number;
  /** A human-readable message. */
  message: string;
  /** Extra data, e.g. `{ reason: "serverShuttingDown" }`. */
  data?: unknown;
}

/** A response to a request: `result` or `error`, never `method`. */
export interface JsonRpcResponse {
  /** The id of the request answered. */
  id: RequestId;
  /** The result, when the call succeeded. */
  result?: unknown;
  /** The error, when the call failed. */
  error?: JsonRpcErrorObject;
}

/** A user input element of `turn/start`, e.g. `{ type: "text", text, text_elements: [] }`. */
export interface UserInput {
  /** `text`, `image`, `localImage`, `skill`, … */
  type: string;
  /** Other fields of the input element. */
  [key: string]: unknown;
}

/** Parameters of `turn/start` without `threadId`, which the broker adds. */
export interface TurnParams {
  /** The user's input for this turn. */
  input: UserInput[];
  /** Overrides such as `model`, `cwd`, `approvalPolicy`, `sandboxPolicy`, `effort`. */
  [key: string]: unknown;
}

/** Parameters of `thread/start`. All are optional. */
export interface ThreadStartParams {
  /** Model to use, e.g. `gpt-5.1-codex`. */
  model?: string;
  /** Model provider id from the app-server's config. */
  modelProvider?: string;
  /** Working directory of the thread. */
  cwd?: string;
  /** `"untrusted" | "on-request" | "never"` or a granular policy object. */
  approvalPolicy?: unknown;
  /** `"read-only" | "workspace-write" | "danger-full-access"`. */
  sandbox?: string;
  /** Other fields (`config`, `baseInstructions`, `ephemeral`, …). */
  [key: string]: unknown;
}

/** An item of a turn: a user message, an agent message, a command run, a file change, … */
export interface ThreadItem {
  /** The item's kind, e.g. `agentMessage`, `userMessage`, `commandExecution`. */
  type: string;
  /** The item's id. */
  id: string;
  /** Other fields of the item. */
  [key: string]: unknown;
}

/** The error of a failed turn. */
export interface TurnError {
  /** What went wrong. */
  message: string;
  /** Other fields (`codexErrorInfo`, `additionalDetails`, …). */
  [key: string]: unknown;
}

/** A codex turn, as returned by `turn/completed`. */
export interface Turn {
  /** The turn's id. */
  id: string;
  /** The turn's items. The broker replaces them with every `item/completed` it saw. */
  items: ThreadItem[];
  /** `"full"` once the broker collected the items, codex sends `"summary"`. */
  itemsView?: string;
  /** `"completed" | "interrupted" | "failed" | "inProgress"`. */
  status: string;
  /** The error of a failed turn, or `null`. */
  error?: TurnError | null;
  /** Other fields (`rootTurnId`, `startedAt`, `completedAt`, `durationMs`, …). */
  [key: string]: unknown;
}

/** Identifies the client in `initialize`. */
export interface ClientInfo {
  /** A short machine name, e.g. `codex_broker`. */
  name: string;
  /** A display title. */
  title: string;
  /** The client's version. */
  version: string;
}

/** A request the app-server sends to the client, e.g. an approval request. */
export interface ServerRequest {
  /** The request id, chosen by the server (it may collide with ours). */
  id: RequestId;
  /** The method, e.g. `item/commandExecution/requestApproval`. */
  method: string;
  /** The method's parameters. */
  params: unknown;
}

/** The methods the app-server sends that carry a thread's turn lifecycle. */
export const TURN_COMPLETED = "turn/completed";
/** Sent once per finished item of a turn. */
export const ITEM_COMPLETED = "item/completed";
/** The JSON-RPC code codex answers when its request queue is full. */
export const OVERLOADED_CODE = -32001;

/**
 * How a connection answers the requests codex sends it (approvals, user input, …). codex
 * waits for the answer before the turn goes on, so every request gets one.
 *
 * @module
 */

import type { ServerRequest } from "./protocol.ts";

/** A fixed answer to every approval request. */
export type ApprovalDecision = "accept" | "decline";

/**
 * A custom policy: returns the `result` to answer with. Throwing (or rejecting) answers the
 * request with a JSON-RPC error, so the turn never hangs on it.
 */
export type ApprovalHandler = (request: ServerRequest) => unknown;

/** `"decline"` (the default), `"accept"`, or a function that answers each request. */
export type Approvals = ApprovalDecision | ApprovalHandler;

/** A JSON-RPC answer: a result or an error. */
export type ServerRequestAnswer =
  | { result: unknown }
  | { error: { code: number; message: string; data?: unknown } };

/** The JSON-RPC code for a method the client does not implement. */
const METHOD_NOT_FOUND = -32601;

const COMMAND_APPROVAL = "item/commandExecution/requestApproval";
const FILE_CHANGE_APPROVAL = "item/fileChange/requestApproval";
const PERMISSIONS_APPROVAL = "item/permissions/requestApproval";
const USER_INPUT = "item/tool/requestUserInput";
const ELICITATION = "mcpServer/elicitation/request";

function requestedPermissions(params: unknown): unknown {
  if (typeof params === "object" && params !== null && "permissions" in params) {
    return (params as { permissions: unknown }).permissions ?? {};
  }
  return {};
}

/**
 * The answer a fixed policy gives to a server request, in the shape codex expects for its
 * method. Methods the broker cannot serve (dynamic tool calls, auth refresh, attestation,
 * the legacy v1 approvals) and unknown methods get JSON-RPC error -32601.
 *
 * @example Accept commands, decline everything else
 * ```ts ignore
 * const conn = await Conn.dial(url, {
 *   approvals: (request) => {
 *     const decision = request.method === "item/commandExecution/requestApproval"
 *       ? "accept"
 *       : "decline";
 *     const answer = answerServerRequest(request, decision);
 *     if ("error" in answer) throw new Error(answer.error.message);
 *     return answer.result;
 *   },
 * });
 * ```
 *
 * @param request The request codex sent.
 * @param decision Whether to grant what is asked.
 * @returns The result or error to answer with.
 */
export function answerServerRequest(
  request: ServerRequest,
  decision: ApprovalDecision,
): ServerRequestAnswer {
  switch (request.method) {
    case COMMAND_APPROVAL:
    case FILE_CHANGE_APPROVAL:
      return { result: { decision } };
    case PERMISSIONS_APPROVAL:
      return {
        result: { permissions: decision === "accept" ? requestedPermissions(request.params) : {} },
      };
    case USER_INPUT:
      return { result: { answers: {} } };
    case ELICITATION:
      // No human is there to fill a form, so even "accept" cannot supply content.
      return { result: { action: "decline", content: null, _meta: null } };
    default:
      return {
        error: {
          code: METHOD_NOT_FOUND,
          message: `Method not supported by codex-broker: ${request.method}`,
        },
      };
  }
}

/**
 * Where a turn runs when several brokers share the workspaces: here, when this broker holds
 * (or can take) the workspace's lease, else at the owner, to which the request is forwarded
 * and whose answer is relayed. Web-standard.
 *
 * @module
 */

import { delay } from "./_deadline.ts";
import { FORWARDED_HEADER, forwardTurn } from "./_forward.ts";
import type { Ownership } from "./ownership.ts";

/** An answer the handler gives as it is: status, error code, message, headers, extras. */
export interface PlacementRefusal {
  status: number;
  code: "workspaceBusy" | "notOwner" | "unavailable";
  message: string;
  headers: Record<string, string>;
  owner?: string;
}

/** Where the turn goes. */
export type Placement =
  | { readonly kind: "local"; readonly forwarded: boolean }
  | { readonly kind: "relayed"; readonly response: Response }
  | { readonly kind: "refused"; readonly refusal: PlacementRefusal };

// An owner that is handing a workspace over answers forwarded requests "not the owner"
// until its release is through, which takes as long as codex needs to stop; retry for that
// long, with growing pauses, before giving up with workspaceBusy.
const NOT_OWNER_RETRY_MS = 15_000;
const MAX_PAUSE_MS = 500;

/**
 * Decides where a validated turn runs, forwarding it to the owner if that is elsewhere.
 *
 * @param ownership This broker's leases.
 * @param request The client's request (headers and signal).
 * @param parts The workspace and the body bytes.
 * @returns Local, the owner's relayed answer, or a refusal to answer with.
 */
export async function placeTurn(
  ownership: Ownership,
  request: Request,
  parts: { workspaceId: string; body: Uint8Array },
): Promise<Placement> {
  const { workspaceId } = parts;
  if (ownership.draining) {
    // A broker that is shutting down finishes the turns it runs and takes no new one: its
    // workspaces move once it has let go of them. Connection: close, so that nothing stays
    // connected to a broker about to stop listening.
    const refusal = refused(503, "unavailable", "Cannot run turn: broker is shutting down", 1);
    if (refusal.kind === "refused") refusal.refusal.headers.connection = "close";
    return refusal;
  }
  if (request.headers.has(FORWARDED_HEADER)) {
    // The sender found this broker's lease in the store; only a lease held now counts. Never
    // claim here: taking a free lease would win back a workspace just handed over to the
    // sender (whose retry is waiting for the release), and a lease held elsewhere would make
    // a chain of forwards. The sender asks the lease store again.
    if (!ownership.owns(workspaceId)) {
      return refused(
        421,
        "notOwner",
        `Cannot run turn: broker ${ownership.holder.id} does not own workspace ${workspaceId}`,
        0,
      );
    }
    if (ownership.handingOver(workspaceId)) {
      return refused(
        421,
        "notOwner",
        `Cannot run turn: workspace ${workspaceId} is being handed over`,
        0,
      );
    }
    return { kind: "local", forwarded: true };
  }
  const giveUpAt = Date.now() + NOT_OWNER_RETRY_MS;
  for (let attempt = 0;; attempt++) {
    let claim;
    try {
      claim = await ownership.claim(workspaceId);
    } catch (error) {
      // Draining or closed: this broker takes no new workspace, and another one will.
      return refused(503, "unavailable", `Cannot run turn: ${(error as Error).message}`, 1);
    }
    if (claim.local) return { kind: "local", forwarded: false };
    const owner = claim.owner;
    const result = await forwardTurn(owner.url, request, parts, {
      from: ownership.holder.id,
      signal: request.signal,
    });
    if (result.kind === "answered") return { kind: "relayed", response: result.response };
    if (result.kind === "notOwner") {
      if (Date.now() > giveUpAt) return busy(workspaceId, owner.owner, 1);
      await delay(Math.min(25 * 2 ** attempt, MAX_PAUSE_MS), request.signal);
      continue;
    }
    const left = owner.expiresAt - Date.now();
    if (left > 0) return busy(workspaceId, owner.owner, Math.ceil(left / 1000));
    // The owner is gone and so is its lease: the next claim takes the workspace over.
  }
}

function busy(workspaceId: string, owner: string, retryAfterSeconds: number): Placement {
  return refused(
    503,
    "workspaceBusy",
    `Cannot run turn: workspace ${workspaceId} is owned by broker ${owner}, which cannot be ` +
      `reached; its lease expires within ${retryAfterSeconds} s`,
    retryAfterSeconds,
    owner,
  );
}

function refused(
  status: number,
  code: PlacementRefusal["code"],
  message: string,
  retryAfterSeconds: number,
  owner?: string,
): Placement {
  const refusal: PlacementRefusal = {
    status,
    code,
    message,
    headers: retryAfterSeconds > 0 ? { "retry-after": String(retryAfterSeconds) } : {},
  };
  if (owner !== undefined) refusal.owner = owner;
  return { kind: "refused", refusal };
}

/**
 * Relaying a turn to the broker that owns its workspace. Web-standard (`fetch`): the
 * handler forwards the request it validated, and relays the owner's answer (JSON or an
 * event stream) as it comes; a client that leaves aborts the forwarded request, so the
 * owner interrupts the turn.
 *
 * @module
 */

import { createScope } from "./_deadline.ts";

/** The header that marks a request one broker forwarded to another; its value is the sender. */
export const FORWARDED_HEADER = "x-codex-broker-forwarded";

/** The status an owner answers a forwarded request with when it does not own the workspace. */
export const NOT_OWNER_STATUS = 421;

// Headers of the owner's answer that the client must see; hop-by-hop ones are the
// server's business, and the rest is meaningless for a relayed answer.
const RELAYED_HEADERS = [
  "content-type",
  "cache-control",
  "retry-after",
  "x-accel-buffering",
  "x-broker-id",
  "www-authenticate",
];

// Headers of the client's request that the owner needs: authentication (the caller's own:
// every broker has the same secret and token keys, so the owner checks it again), body
// type, and which form of answer the client asked for.
const FORWARDED_REQUEST_HEADERS = ["x-internal-secret", "content-type", "accept", "authorization"];

/** What {@linkcode forwardTurn} came to. */
export type ForwardResult =
  | { readonly kind: "answered"; readonly response: Response }
  | { readonly kind: "notOwner" }
  | { readonly kind: "unreachable"; readonly error: unknown };

/** Options for {@linkcode forwardTurn}. */
export interface ForwardOptions {
  /** This broker's id, sent in {@linkcode FORWARDED_HEADER}. */
  from: string;
  /** Aborts the forwarded request: the client left, or the broker is stopping. */
  signal: AbortSignal;
  /**
   * How long the owner may take to answer `GET /healthz` before it counts as unreachable.
   * Defaults to 2 s.
   */
  probeTimeoutMs?: number;
}

const PROBE_TIMEOUT_MS = 2_000;
// An owner that answered this recently is not probed again, so a busy workspace costs one
// extra round trip a second at most.
const PROBE_FRESH_MS = 1_000;
/** When each owner URL last answered; as many entries as there are brokers. */
const lastReached = new Map<string, number>();

/**
 * Whether the owner answers at all. A turn's answer comes only when the turn ends, so the
 * forwarded request itself cannot tell a busy owner from a dead machine whose packets are
 * dropped (the OS gives up connecting after about two minutes); a probe with a short
 * deadline can, so that the workspace is taken over once its lease expires.
 */
async function reachable(base: string, signal: AbortSignal, timeoutMs: number): Promise<boolean> {
  const at = lastReached.get(base);
  if (at !== undefined && Date.now() - at < PROBE_FRESH_MS) return true;
  const scope = createScope([signal], timeoutMs);
  try {
    const response = await fetch(`${base}/healthz`, { signal: scope.signal });
    await response.body?.cancel();
    lastReached.set(base, Date.now());
    return true;
  } catch {
    if (signal.aborted) throw signal.reason;
    lastReached.delete(base);
    return false;
  } finally {
    scope.dispose();
  }
}

/**
 * Sends a validated turn request to the owner's `POST /api/workspaces/{id}/turns` and
 * relays its answer.
 *
 * @param ownerUrl The owner's advertised base URL.
 * @param request The client's request (its headers are read, its body is not).
 * @param parts The workspace and the body bytes already read from the request.
 * @param options This broker's id and the signal.
 * @returns The relayed answer, `notOwner` if the owner no longer owns the workspace, or
 * `unreachable` if no answer came (connection refused, reset before the headers).
 * @throws {unknown} `options.signal.reason` once the signal aborted.
 */
export async function forwardTurn(
  ownerUrl: string,
  request: Request,
  parts: { workspaceId: string; body: Uint8Array },
  options: ForwardOptions,
): Promise<ForwardResult> {
  const headers = new Headers();
  for (const name of FORWARDED_REQUEST_HEADERS) {
    const value = request.headers.get(name);
    if (value !== null) headers.set(name, value);
  }
  headers.set(FORWARDED_HEADER, options.from);
  const base = ownerUrl.replace(/\/+$/, "");
  if (!await reachable(base, options.signal, options.probeTimeoutMs ?? PROBE_TIMEOUT_MS)) {
    return {
      kind: "unreachable",
      error: new Error(`Cannot forward turn: ${base} does not answer`),
    };
  }
  const url = `${base}/api/workspaces/${encodeURIComponent(parts.workspaceId)}/turns`;
  let response: Response;
  try {
    response = await fetch(url, {
      method: "POST",
      headers,
      body: parts.body as Uint8Array<ArrayBuffer>,
      signal: options.signal,
    });
  } catch (error) {
    if (options.signal.aborted) throw options.signal.reason;
    lastReached.delete(base);
    return { kind: "unreachable", error };
  }
  if (response.status === NOT_OWNER_STATUS) {
    await response.body?.cancel().catch(() => {});
    return { kind: "notOwner" };
  }
  const relayed = new Headers();
  for (const name of RELAYED_HEADERS) {
    const value = response.headers.get(name);
    if (value !== null) relayed.set(name, value);
  }
  return {
    kind: "answered",
    response: new Response(response.body, { status: response.status, headers: relayed }),
  };
}

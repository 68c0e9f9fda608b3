/**
 * Relaying a turn to the broker that owns its workspace. Web-standard (`fetch`): the
 * handler forwards the request it validated, and relays the owner's answer (JSON or an
 * event stream) as it comes; a client that leaves aborts the forwarded request, so the
 * owner interrupts the turn.
 *
 * @module
 */

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
];

// Headers of the client's request that the owner needs: authentication, body type, and
// which form of answer the client asked for.
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
  const url = `${ownerUrl.replace(/\/+$/, "")}/api/workspaces/${
    encodeURIComponent(parts.workspaceId)
  }/turns`;
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

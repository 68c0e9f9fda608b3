/** Why an upgrade failed, as far as a second request to the same URL can tell. */
export interface Refusal {
  /** A sentence-case reason, e.g. "upgrade refused with HTTP 401 (missing or wrong token)". */
  reason: string;
  /** The HTTP status when the server refused the request, e.g. 401. */
  status?: number;
}

function upgradeHeaders(): Record<string, string> {
  const key = new Uint8Array(16);
  crypto.getRandomValues(key);
  return {
    connection: "Upgrade",
    upgrade: "websocket",
    "sec-websocket-version": "13",
    "sec-websocket-key": btoa(String.fromCharCode(...key)),
  };
}

/**
 * Finds out why a WebSocket upgrade failed. The WHATWG WebSocket hides the HTTP status of
 * a refused upgrade, so the same upgrade request is sent once more with `fetch`, which
 * shows it: a bad token (401) is told from a refused connection. Node's fetch refuses
 * upgrade headers; there a plain request at least tells a refused connection from a server
 * that answers. It runs only after a failure, never on the happy path.
 *
 * @param wsUrl The ws:// URL that failed.
 * @param headers The upgrade headers that were sent.
 * @param signal The dial's deadline.
 * @returns The reason, with the status when the server refused with 401 or 403.
 */
export async function probeRefusal(
  wsUrl: string,
  headers: Record<string, string>,
  signal: AbortSignal,
): Promise<Refusal> {
  const url = wsUrl.replace(/^ws/, "http");
  let response: Response | undefined;
  try {
    response = await fetch(url, {
      headers: { ...headers, ...upgradeHeaders() },
      signal,
      redirect: "manual",
    });
  } catch {
    if (signal.aborted) throw signal.reason;
    // Refused upgrade headers (Node) or a refused connection: a plain request tells which.
  }
  try {
    response ??= await fetch(url, { headers, signal, redirect: "manual" });
  } catch (error) {
    if (signal.aborted) throw signal.reason;
    return { reason: `connection refused or unreachable (${(error as Error).message})` };
  }
  await response.body?.cancel();
  if (response.status === 401) {
    return { reason: "upgrade refused with HTTP 401 (missing or wrong token)", status: 401 };
  }
  if (response.status === 403) {
    return { reason: "upgrade refused with HTTP 403", status: 403 };
  }
  return { reason: `upgrade refused, the server answers HTTP ${response.status}` };
}

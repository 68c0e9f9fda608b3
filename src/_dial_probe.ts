/** Why an upgrade failed, as far as a plain HTTP request to the same URL can tell. */
export interface Refusal {
  /** A sentence-case reason, e.g. "upgrade refused with HTTP 401 (missing or wrong token)". */
  reason: string;
  /** The HTTP status when the server refused the request, e.g. 401. */
  status?: number;
}

/**
 * Finds out why a WebSocket upgrade failed. The WHATWG WebSocket hides the HTTP status of
 * a refused upgrade (Node's reports no detail at all), so one plain request to the same
 * URL with the same headers tells a bad token (401) from a refused connection. It runs
 * only after a failure, never on the happy path.
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
  try {
    const response = await fetch(url, { headers, signal, redirect: "manual" });
    await response.body?.cancel();
    if (response.status === 401) {
      return { reason: "upgrade refused with HTTP 401 (missing or wrong token)", status: 401 };
    }
    if (response.status === 403) {
      return { reason: "upgrade refused with HTTP 403", status: 403 };
    }
    return { reason: `upgrade failed, the server answers HTTP ${response.status}` };
  } catch (error) {
    if (signal.aborted) throw signal.reason;
    return {
      reason: `connection refused or unreachable (${(error as Error).message})`,
    };
  }
}

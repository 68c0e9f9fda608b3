// `new WebSocket(url, { headers })` is not WHATWG, but Deno, Bun and Node 22 (undici) all
// accept it, and the capability token can travel nowhere else: codex refuses tokens in the
// query string or subprotocol. The extension is typed here and nowhere else.
type WebSocketWithHeaders = new (
  url: string,
  init: { headers: Record<string, string> },
) => WebSocket;

/**
 * Opens a WebSocket and resolves once it is open.
 *
 * @param url The ws:// URL.
 * @param headers Upgrade request headers.
 * @param signal Abandons the attempt (the socket is closed) and rejects with its reason.
 * @param create Makes the socket; defaults to the platform's `WebSocket`.
 * @returns The open socket.
 */
export function openWebSocket(
  url: string,
  headers: Record<string, string>,
  signal: AbortSignal,
  create?: (url: string, headers: Record<string, string>) => WebSocket,
): Promise<WebSocket> {
  if (signal.aborted) return Promise.reject(signal.reason);
  return new Promise<WebSocket>((resolve, reject) => {
    let ws: WebSocket;
    try {
      ws = create
        ? create(url, headers)
        : Object.keys(headers).length > 0
        ? new (WebSocket as unknown as WebSocketWithHeaders)(url, { headers })
        : new WebSocket(url);
    } catch (error) {
      reject(error);
      return;
    }
    const settle = () => {
      ws.onopen = null;
      ws.onerror = null;
      ws.onclose = null;
      signal.removeEventListener("abort", onAbort);
    };
    const abandon = () => {
      try {
        ws.close();
      } catch {
        // Not open yet in some runtimes; nothing left to close.
      }
    };
    const onAbort = () => {
      settle();
      abandon();
      reject(signal.reason);
    };
    ws.onopen = () => {
      settle();
      resolve(ws);
    };
    // Node fires `error` without a `close` after a refused upgrade, so either one settles.
    ws.onerror = (event) => {
      settle();
      abandon();
      reject(new Error((event as ErrorEvent).message || "WebSocket error"));
    };
    ws.onclose = (event) => {
      settle();
      reject(new Error(`Socket closed with code ${event.code} before it opened`));
    };
    signal.addEventListener("abort", onAbort, { once: true });
  });
}

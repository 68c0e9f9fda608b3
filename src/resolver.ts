/**
 * The contract between a {@linkcode Pool} and whatever knows where each workspace's codex
 * app-server listens.
 *
 * @module
 */

/** Where a workspace's codex app-server accepts WebSocket connections. */
export interface Endpoint {
  /** The app-server's `ws://` or `wss://` URL. */
  url: string;
  /** Headers sent on the WebSocket upgrade, e.g. `Authorization: Bearer …`. */
  headers?: Record<string, string>;
}

/**
 * Finds (or starts) the app-server for a workspace. The signal aborts when the caller that
 * asked for the connection gives up.
 */
export type WsUrlResolver = (
  workspaceId: string,
  signal: AbortSignal,
) => Promise<string | Endpoint>;

/**
 * A resolver with an optional hook the pool calls when it drops a workspace (reaped,
 * evicted, closed by either side, or a dial that failed after the resolve), so the owner of
 * the subprocess can stop it.
 */
export interface Resolver {
  /** Resolves a workspace id to its app-server endpoint. */
  resolve: WsUrlResolver;
  /**
   * Called once for every successful `resolve`, as soon as the pool no longer holds the
   * connection it dialed with that endpoint: reaped, evicted, closed by the peer, never
   * opened (the dial failed), or the pool closed. The pool does not resolve the workspace
   * again until the returned promise settles; a rejection is ignored.
   */
  release?(workspaceId: string): void | Promise<void>;
  /**
   * Whether the workspace's app-server process died on its own (crashed, killed) since it
   * was last resolved, waiting up to `withinMs` for news of it: a socket can close a moment
   * before its process is reported gone. Lets callers tell a dead app-server from a lost
   * connection.
   */
  crashed?(workspaceId: string, withinMs: number): Promise<boolean>;
}

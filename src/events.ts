/**
 * Events a {@linkcode Conn} dispatches.
 *
 * @module
 */

import type { ConnectionClosedError } from "./errors.ts";
import type { ServerRequest } from "./protocol.ts";

/**
 * A notification from the app-server (`turn/started`, `item/completed`, …), dispatched as
 * the `notification` event. Listeners run synchronously in the read loop, so they must not
 * block; queue work instead.
 *
 * @example Stream a turn's events
 * ```ts ignore
 * conn.addEventListener("notification", (event) => {
 *   const { method, params } = event as NotificationEvent;
 *   console.log(method, params);
 * });
 * ```
 */
export class NotificationEvent extends Event {
  /** The notification's method. */
  readonly method: string;
  /** The notification's params, untouched. */
  readonly params: unknown;

  /**
   * Creates the event.
   *
   * @param method The notification's method.
   * @param params The notification's params.
   */
  constructor(method: string, params: unknown) {
    super("notification");
    this.method = method;
    this.params = params;
  }
}

/** How a server request was answered: by policy, or with an error. */
export type ServerRequestOutcome = "accept" | "decline" | "custom" | "error";

/**
 * Dispatched as the `serverrequest` event once a request from the app-server (an approval,
 * say) has been answered, for logs and metrics.
 *
 * @example Count approvals
 * ```ts ignore
 * conn.addEventListener("serverrequest", (event) => {
 *   const { request, outcome } = event as ServerRequestEvent;
 *   metrics.inc(request.method, outcome);
 * });
 * ```
 */
export class ServerRequestEvent extends Event {
  /** The request codex sent. */
  readonly request: ServerRequest;
  /** How it was answered. */
  readonly outcome: ServerRequestOutcome;

  /**
   * Creates the event.
   *
   * @param request The request codex sent.
   * @param outcome How it was answered.
   */
  constructor(request: ServerRequest, outcome: ServerRequestOutcome) {
    super("serverrequest");
    this.request = request;
    this.outcome = outcome;
  }
}

/**
 * Dispatched as the `close` event once, when the connection closes for any reason.
 *
 * @example Log why a connection went away
 * ```ts ignore
 * conn.addEventListener("close", (event) => console.log((event as ConnCloseEvent).error.message));
 * ```
 */
export class ConnCloseEvent extends Event {
  /** The error every pending call was rejected with. */
  readonly error: ConnectionClosedError;

  /**
   * Creates the event.
   *
   * @param error Why the connection closed.
   */
  constructor(error: ConnectionClosedError) {
    super("close");
    this.error = error;
  }
}

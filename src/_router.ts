/**
 * Routing for the REST handler: a table of paths, each with a handler per method. A path
 * is literal segments and `{name}` placeholders (`/api/workspaces/{id}/turns`), so adding a
 * route is adding a row. Web-standard.
 *
 * @module
 */

/**
 * Handles one method of one route; `params` holds the path's `{name}` segments, decoded, and
 * `context` is what the caller of the router passed along with the request.
 */
export type RouteHandler<C> = (
  request: Request,
  params: Record<string, string>,
  context: C,
) => Response | Promise<Response>;

/** One row of the routing table. */
export interface Route<C> {
  /** `/healthz`, or with placeholders: `/api/workspaces/{id}/turns`. */
  path: string;
  /** A handler per method (`GET` also answers `HEAD`, without the body). */
  methods: Readonly<Partial<Record<string, RouteHandler<C>>>>;
}

/** What the router answers when no route takes the request. */
export interface RouterFallbacks {
  /** No route matches the path. */
  notFound(request: Request, pathname: string): Response;
  /** A route matches the path but not the method; `allow` is the `Allow` header. */
  methodNotAllowed(request: Request, allow: string): Response;
}

interface CompiledRoute<C> {
  segments: readonly string[];
  /** For each segment, the placeholder's name, or `undefined` for a literal. */
  names: readonly (string | undefined)[];
  methods: Readonly<Partial<Record<string, RouteHandler<C>>>>;
  allow: string;
}

function compile<C>(route: Route<C>): CompiledRoute<C> {
  if (!route.path.startsWith("/")) {
    throw new TypeError(`Invalid route ${JSON.stringify(route.path)}: expected a leading "/"`);
  }
  const segments = route.path.split("/").slice(1);
  const names = segments.map((segment) => /^\{(\w+)\}$/.exec(segment)?.[1]);
  const methods = Object.keys(route.methods);
  if (methods.includes("GET") && !methods.includes("HEAD")) {
    methods.splice(methods.indexOf("GET") + 1, 0, "HEAD");
  }
  return { segments, names, methods: route.methods, allow: methods.join(", ") };
}

/** The placeholders of `route` if `parts` (a path split at "/") matches it. */
function match<C>(
  route: CompiledRoute<C>,
  parts: readonly string[],
): Record<string, string> | null {
  if (parts.length !== route.segments.length) return null;
  const params: Record<string, string> = {};
  for (let i = 0; i < parts.length; i++) {
    const name = route.names[i];
    const part = parts[i]!;
    if (name === undefined) {
      if (part !== route.segments[i]) return null;
      continue;
    }
    if (part === "") return null;
    try {
      params[name] = decodeURIComponent(part);
    } catch {
      return null; // malformed percent-encoding: no route has such a segment
    }
  }
  return params;
}

/**
 * Builds a fetch handler from a routing table: the first route whose path matches serves
 * the request if it has a handler for the method; `HEAD` is served by `GET` with the body
 * dropped.
 *
 * @param routes The table, tried in order.
 * @param fallbacks The answers for an unknown path and for a method a route lacks.
 * @returns The handler.
 * @throws {TypeError} If a path does not start with "/".
 */
export function createRouter<C>(
  routes: readonly Route<C>[],
  fallbacks: RouterFallbacks,
): (request: Request, context: C) => Promise<Response> {
  const compiled = routes.map(compile);
  return async (request, context) => {
    const { pathname } = new URL(request.url);
    const parts = pathname.split("/").slice(1);
    for (const route of compiled) {
      const params = match(route, parts);
      if (params === null) continue;
      const head = request.method === "HEAD" && !Object.hasOwn(route.methods, "HEAD");
      const method = head ? "GET" : request.method;
      // Own keys only: a method named "constructor" must not find Object.prototype's.
      const handler = Object.hasOwn(route.methods, method) ? route.methods[method] : undefined;
      if (!handler) return fallbacks.methodNotAllowed(request, route.allow);
      const response = await handler(request, params, context);
      if (!head) return response;
      await response.body?.cancel();
      return new Response(null, { status: response.status, headers: response.headers });
    }
    return fallbacks.notFound(request, pathname);
  };
}

import { test } from "./_test.ts";
import assert from "node:assert/strict";
import { createRouter, type Route } from "../src/_router.ts";

function router(routes: Route<string>[]) {
  return createRouter<string>(routes, {
    notFound: (_request, pathname) => new Response(`404 ${pathname}`, { status: 404 }),
    methodNotAllowed: (_request, allow) => new Response(null, { status: 405, headers: { allow } }),
  });
}

test("createRouter() hands a route its decoded {name} segments and the caller's context", async () => {
  const route = router([{
    path: "/api/workspaces/{id}/turns",
    methods: { POST: (_request, params, context) => Response.json({ params, context }) },
  }]);
  const response = await route(
    new Request("http://b.test/api/workspaces/ws%2D1/turns", { method: "POST" }),
    "ctx",
  );
  assert.deepEqual(await response.json(), { params: { id: "ws-1" }, context: "ctx" });
  for (const path of ["/api/workspaces//turns", "/api/workspaces/%E0/turns", "/api/workspaces/a"]) {
    const missed = await route(new Request(`http://b.test${path}`, { method: "POST" }), "ctx");
    assert.equal(missed.status, 404, path);
  }
});

test("createRouter() answers HEAD with GET's status and headers but no body, and 405 with Allow for other methods", async () => {
  const route = router([{ path: "/healthz", methods: { GET: () => Response.json({ ok: true }) } }]);
  const head = await route(new Request("http://b.test/healthz", { method: "HEAD" }), "");
  assert.equal(head.status, 200);
  assert.match(head.headers.get("content-type") ?? "", /^application\/json/);
  assert.equal(head.body, null);
  // "constructor" is a valid method token: it must not find Object.prototype's.
  for (const method of ["POST", "DELETE", "constructor"]) {
    const request = new Request("http://b.test/healthz", { method });
    // Bun makes a GET of a method it does not know.
    if (request.method !== method) continue;
    const refused = await route(request, "");
    assert.equal(refused.status, 405, method);
    assert.equal(refused.headers.get("allow"), "GET, HEAD");
  }
});

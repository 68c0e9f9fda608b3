/**
 * The attack corpus of the broker's front door, through the fetch handler over a fake
 * codex: every case is refused with its status and JSON error code, and nothing reaches
 * codex. The raw-socket cases (a header smuggled with a newline) are at the end, against the
 * real server.
 */

import { test } from "./_test.ts";
import assert from "node:assert/strict";
import { mkdtemp, realpath, rm } from "node:fs/promises";
import { connect } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { exportJWK, generateKeyPair, type JWK, SignJWT } from "jose";
import {
  createTokenVerifier,
  type JsonWebKeySet,
  Pool,
  type TokenVerifierOptions,
} from "../mod.ts";
import { createTurnsHandler, type TurnsHandlerOptions } from "../src/handler.ts";
import { type LogEntry, startBroker } from "../src/main.ts";
import { codexLike, type FakeAppServer, startFakeAppServer } from "./_fake_app_server.ts";
import { waitFor, within } from "./_wait.ts";
import { codelessBroker } from "./_codeless_broker.ts";

const SECRET = "attack-test-operator-secret";
const HS_KEY = "attack-test-hs256-key-of-32-bytes+";
const OTHER_HS_KEY = "not-the-broker-hs256-key-32-bytes+";
const input = [{ type: "text", text: "hi", text_elements: [] }];
const BODY_A = { workspaceId: "ws-a", params: { input } };
const seconds = (ms: number) => Math.floor(ms / 1000);

/** A clock the verifier reads, moved by the tests. */
const clock = { now: Date.now() };

interface Claims {
  [claim: string]: unknown;
}

function claimsOf(claims: Claims): Claims {
  return {
    sub: "alice",
    workspaces: ["ws-a"],
    scope: "turns:write",
    exp: seconds(clock.now) + 600,
    ...claims,
  };
}

function hs256(claims: Claims = {}, key = HS_KEY): Promise<string> {
  return new SignJWT(claimsOf(claims)).setProtectedHeader({ alg: "HS256" }).sign(
    new TextEncoder().encode(key),
  );
}

interface Signer {
  jwk: JWK;
  sign(claims?: Claims): Promise<string>;
}

async function signer(kid: string): Promise<Signer> {
  const { privateKey, publicKey } = await generateKeyPair("EdDSA", { extractable: true });
  return {
    jwk: { ...(await exportJWK(publicKey)), kid, alg: "EdDSA" },
    sign: (claims = {}) =>
      new SignJWT(claimsOf(claims)).setProtectedHeader({ alg: "EdDSA", kid }).sign(privateKey),
  };
}

function unsignedToken(claims: Claims = {}): string {
  const part = (value: unknown) =>
    btoa(JSON.stringify(value)).replaceAll("+", "-").replaceAll("/", "_").replace(/=+$/, "");
  return `${part({ alg: "none", typ: "JWT" })}.${part(claimsOf(claims))}.`;
}

interface Harness {
  server: FakeAppServer;
  pool: Pool;
  handler: (request: Request) => Promise<Response>;
  logs: Record<string, unknown>[];
  close(): Promise<void>;
}

async function harness(
  options: {
    verifier?: TokenVerifierOptions | false;
    handler?: Partial<TurnsHandlerOptions>;
    hang?: boolean;
  } = {},
): Promise<Harness> {
  const server = await startFakeAppServer((peer) =>
    codexLike(peer, { hang: options.hang ?? false })
  );
  const pool = new Pool(() => Promise.resolve(server.url));
  const logs: Record<string, unknown>[] = [];
  const verifier = options.verifier === false ? undefined : createTokenVerifier({
    secret: HS_KEY,
    audience: "codex-broker",
    now: () => clock.now,
    ...options.verifier,
  });
  const handler = createTurnsHandler(pool, {
    secret: SECRET,
    ...(verifier ? { tokens: verifier } : {}),
    log: (entry) => logs.push(entry),
    ...options.handler,
  });
  return {
    server,
    pool,
    handler,
    logs,
    async close() {
      await pool.close();
      await server.close();
    },
  };
}

function post(
  headers: Record<string, string>,
  body: unknown = BODY_A,
  path = "/api/turns",
  signal?: AbortSignal,
): Request {
  return new Request(`http://broker.test${path}`, {
    method: "POST",
    headers: { "content-type": "application/json", ...headers },
    body: JSON.stringify(body),
    ...(signal ? { signal } : {}),
  });
}

const bearer = (token: string) => ({ authorization: `Bearer ${token}` });

/** Asserts the answer is `status` with the JSON error `code`, and returns it. */
async function refused(response: Response, status: number, code: string): Promise<Response> {
  const body = await response.json();
  assert.equal(response.status, status, JSON.stringify(body));
  assert.equal(response.headers.get("content-type"), "application/json");
  assert.equal(body.error?.code, code, JSON.stringify(body));
  assert.equal(typeof body.error?.message, "string");
  return response;
}

function assertNothingReachedCodex(h: Harness): void {
  assert.equal(h.server.peers.length, 0, "a connection was made to the app-server");
  assert.equal(h.pool.size, 0);
}

/** Every turn/start the fake codex received. */
function turnStarts(h: Harness): number {
  return h.server.peers.flatMap((peer) => peer.received).filter((m) => m.method === "turn/start")
    .length;
}

// Each 401 case: the request carries the credential the builder makes.
const UNAUTHORIZED: [string, () => Promise<Record<string, string>>][] = [
  [
    "an expired token",
    async () => bearer(await hs256({ aud: "codex-broker", exp: seconds(clock.now) - 120 })),
  ],
  [
    "a token not valid yet",
    async () => bearer(await hs256({ aud: "codex-broker", nbf: seconds(clock.now) + 600 })),
  ],
  ["a token with alg none", () => Promise.resolve(bearer(unsignedToken({ aud: "codex-broker" })))],
  [
    "a token signed with a wrong key",
    async () => bearer(await hs256({ aud: "codex-broker" }, OTHER_HS_KEY)),
  ],
  ["a token for a wrong audience", async () => bearer(await hs256({ aud: "another-service" }))],
  ["a token without exp", async () => bearer(await hs256({ aud: "codex-broker", exp: undefined }))],
  [
    "a token without workspaces",
    async () => bearer(await hs256({ aud: "codex-broker", workspaces: undefined })),
  ],
  [
    "a token whose signature was cut off",
    async () => bearer((await hs256({ aud: "codex-broker" })).replace(/\.[^.]+$/, ".")),
  ],
  ["a token with a tampered payload", async () => {
    const [header, , signature] = (await hs256({ aud: "codex-broker" })).split(".");
    const payload = btoa(
      JSON.stringify(claimsOf({ aud: "codex-broker", workspaces: ["ws-a", "ws-b"] })),
    )
      .replaceAll("+", "-").replaceAll("/", "_").replace(/=+$/, "");
    return bearer(`${header}.${payload}.${signature}`);
  }],
  ["a Basic credential", () => Promise.resolve({ authorization: "Basic YWxpY2U6cGFzcw==" })],
  ["Bearer without a token", () => Promise.resolve({ authorization: "Bearer" })],
  ["two bearer tokens in one header", async () => {
    const token = await hs256({ aud: "codex-broker" });
    return { authorization: `Bearer ${token}, Bearer ${token}` };
  }],
  ["the secret and a token at once", async () => ({
    "x-internal-secret": SECRET,
    ...bearer(await hs256({ aud: "codex-broker" })),
  })],
];

for (const [name, credential] of UNAUTHORIZED) {
  test(`${name} is answered 401 unauthorized with a Bearer challenge, and nothing reaches codex`, async () => {
    const h = await harness();
    try {
      const response = await refused(
        await h.handler(post(await credential())),
        401,
        "unauthorized",
      );
      assert.match(response.headers.get("www-authenticate") ?? "", /^Bearer /);
      assertNothingReachedCodex(h);
    } finally {
      await h.close();
    }
  });
}

test("an invalid token's 401 says invalid_token in WWW-Authenticate, and the log says why", async () => {
  const h = await harness();
  try {
    const token = await hs256({ aud: "codex-broker", exp: seconds(clock.now) - 120 });
    const response = await refused(await h.handler(post(bearer(token))), 401, "unauthorized");
    assert.match(response.headers.get("www-authenticate")!, /error="invalid_token"/);
    const entry = h.logs.find((e) => e.msg === "bad request")!;
    assert.equal(entry.reason, "expired");
    assert.ok(!JSON.stringify(h.logs).includes(token), "the token was logged");
  } finally {
    await h.close();
  }
});

test("a token for workspace A used on workspace B is answered 403 forbiddenWorkspace, and nothing reaches codex", async () => {
  const h = await harness();
  try {
    const headers = bearer(await hs256({ aud: "codex-broker", workspaces: ["ws-a"] }));
    await refused(
      await h.handler(post(headers, { workspaceId: "ws-b", params: { input } })),
      403,
      "forbiddenWorkspace",
    );
    await refused(
      await h.handler(post(headers, { params: { input } }, "/api/workspaces/ws-b/turns")),
      403,
      "forbiddenWorkspace",
    );
    assertNothingReachedCodex(h);
  } finally {
    await h.close();
  }
});

test("a token without turns:write is answered 403 insufficientScope, and nothing reaches codex", async () => {
  const h = await harness();
  try {
    const headers = bearer(await hs256({ aud: "codex-broker", scope: "turns:read" }));
    const response = await refused(await h.handler(post(headers)), 403, "insufficientScope");
    assert.match(response.headers.get("www-authenticate")!, /error="insufficient_scope"/);
    assertNothingReachedCodex(h);
  } finally {
    await h.close();
  }
});

test("a bearer token sent to a broker that takes none is answered 401, and nothing reaches codex", async () => {
  const h = await harness({ verifier: false });
  try {
    await refused(
      await h.handler(post(bearer(await hs256({ aud: "codex-broker" })))),
      401,
      "unauthorized",
    );
    assertNothingReachedCodex(h);
  } finally {
    await h.close();
  }
});

test("a valid token runs its workspace's turn, and the turn's log line names its subject, never the token", async () => {
  const h = await harness();
  try {
    const token = await hs256({ aud: "codex-broker", sub: "svc-reports" });
    const response = await h.handler(post(bearer(token)));
    assert.equal(response.status, 200);
    assert.equal((await response.json()).turn.status, "completed");
    const entry = h.logs.find((e) => e.msg === "turn")!;
    assert.equal(entry.principal, "svc-reports");
    assert.ok(!JSON.stringify(h.logs).includes(token), "the token was logged");
  } finally {
    await h.close();
  }
});

test("the operator's secret opens every workspace and is logged as operator", async () => {
  const h = await harness();
  try {
    const response = await h.handler(
      post({ "x-internal-secret": SECRET }, { workspaceId: "ws-b", params: { input } }),
    );
    assert.equal(response.status, 200);
    assert.equal(h.logs.find((e) => e.msg === "turn")!.principal, "operator");
  } finally {
    await h.close();
  }
});

test("a JWKS rotation: the new key is accepted once published, the old one refused once removed", async () => {
  const oldKey = await signer("2025");
  const newKey = await signer("2026");
  let set: JsonWebKeySet = { keys: [oldKey.jwk] };
  const h = await harness({
    verifier: {
      jwks: () => Promise.resolve(structuredClone(set)),
      jwksMaxAgeMs: 60_000,
      jwksCooldownMs: 0,
    },
  });
  try {
    assert.equal(
      (await h.handler(post(bearer(await oldKey.sign({ aud: "codex-broker" }))))).status,
      200,
    );
    // Not published yet: refused, and the refusal reloads nothing into a hole.
    await refused(
      await h.handler(post(bearer(await newKey.sign({ aud: "codex-broker" })))),
      401,
      "unauthorized",
    );
    set = { keys: [oldKey.jwk, newKey.jwk] };
    assert.equal(
      (await h.handler(post(bearer(await newKey.sign({ aud: "codex-broker" }))))).status,
      200,
    );
    set = { keys: [newKey.jwk] };
    clock.now += 60_000;
    const starts = turnStarts(h);
    await refused(
      await h.handler(post(bearer(await oldKey.sign({ aud: "codex-broker" })))),
      401,
      "unauthorized",
    );
    assert.equal(turnStarts(h), starts, "a turn of the removed key reached codex");
    assert.equal(
      (await h.handler(post(bearer(await newKey.sign({ aud: "codex-broker" }))))).status,
      200,
    );
  } finally {
    await h.close();
  }
});

test("a JWKS that cannot be loaded is answered 503 unavailable with Retry-After, and nothing reaches codex", async () => {
  const key = await signer("k1");
  const h = await harness({
    verifier: { jwks: () => Promise.reject(new Error("ENOENT: no such file")) },
  });
  try {
    const response = await refused(
      await h.handler(post(bearer(await key.sign({ aud: "codex-broker" })))),
      503,
      "unavailable",
    );
    assert.ok(response.headers.has("retry-after"));
    assertNothingReachedCodex(h);
  } finally {
    await h.close();
  }
});

test("past the per-workspace limits a turn is answered 429 tooManyTurns with Retry-After before it reaches codex; other workspaces go on", async () => {
  const h = await harness({
    hang: true,
    handler: { maxTurnsPerWorkspace: 1, maxWaitingTurnsPerWorkspace: 1 },
  });
  const clients = [new AbortController(), new AbortController()];
  try {
    const headers = { "x-internal-secret": SECRET };
    const running = h.handler(post(headers, BODY_A, "/api/turns", clients[0]!.signal));
    await waitFor("the first turn to reach codex", () => turnStarts(h) === 1);
    const { refusal, waiting } = await twoMore(h, headers, clients[1]!);
    const response = await refused(refusal, 429, "tooManyTurns");
    assert.equal(response.headers.get("retry-after"), "1");
    assert.equal(turnStarts(h), 1, "the waiting or refused turn reached codex");
    // Another workspace has limits of its own.
    const other = new AbortController();
    const elsewhere = h.handler(
      post(headers, { workspaceId: "ws-b", params: { input } }, "/api/turns", other.signal),
    );
    await waitFor("the other workspace's turn to reach codex", () => turnStarts(h) === 2);
    other.abort();
    clients[0]!.abort();
    // The waiting turn gets the slot once the running one is done.
    await waitFor("the waiting turn to reach codex", () => turnStarts(h) === 3);
    clients[1]!.abort();
    for (const answer of await Promise.all([running, waiting, elsewhere])) {
      assert.equal(answer.status, 499);
      await answer.body?.cancel();
    }
  } finally {
    for (const client of clients) client.abort();
    await h.close();
  }
});

test("a turn waiting for its workspace's slot that is cancelled leaves the line, and the next one takes its place", async () => {
  const h = await harness({
    hang: true,
    handler: { maxTurnsPerWorkspace: 1, maxWaitingTurnsPerWorkspace: 1 },
  });
  const first = new AbortController();
  const second = new AbortController();
  try {
    const headers = { "x-internal-secret": SECRET };
    const running = h.handler(post(headers, BODY_A, "/api/turns", first.signal));
    await waitFor("the first turn to reach codex", () => turnStarts(h) === 1);
    const { refusal, waiting } = await twoMore(h, headers, second);
    await refused(refusal, 429, "tooManyTurns");
    second.abort();
    assert.equal((await waiting).status, 499);
    const third = new AbortController();
    const next = h.handler(post(headers, BODY_A, "/api/turns", third.signal));
    first.abort();
    await waitFor("the third turn to reach codex", () => turnStarts(h) === 2);
    third.abort();
    assert.equal((await running).status, 499);
    assert.equal((await next).status, 499);
  } finally {
    first.abort();
    second.abort();
    await h.close();
  }
});

/**
 * Sends two more turns to a workspace that runs its one allowed turn: one gets the place in
 * line, the other the refusal, in whichever order the handler takes them. The one in line
 * is cancelled by `client`.
 */
async function twoMore(
  h: Harness,
  headers: Record<string, string>,
  client: AbortController,
): Promise<{ refusal: Response; waiting: Promise<Response> }> {
  const other = new AbortController();
  const sent = [client, other].map((c, index) =>
    h.handler(post(headers, BODY_A, "/api/turns", c.signal)).then((response) => ({
      response,
      index,
    }))
  );
  try {
    const first = await within(Promise.race(sent), 5_000, "the refusal of one of two turns");
    if (first.index === 0) {
      // The handler took the other one first, so it waits in line: swap the roles.
      const waiting = sent[1]!.then((s) => s.response);
      client.signal.addEventListener("abort", () => other.abort(), { once: true });
      return { refusal: first.response, waiting };
    }
    return { refusal: first.response, waiting: sent[0]!.then((s) => s.response) };
  } catch (error) {
    client.abort();
    other.abort();
    throw error;
  }
}

// A header smuggled with a newline, over a raw socket against the real server on this
// runtime. Node and Bun refuse a bare LF or CR in a header line (400); Deno accepts a bare
// LF as the end of a line, as RFC 9112 §2.2 allows, so there the smuggled line becomes a
// header of its own, and the handler refuses the credentials it makes: two of them at once,
// or two tokens in one Authorization. Either way the request is refused and no turn runs.
const SMUGGLED: [string, (token: string) => string][] = [
  [
    "a token with a secret after a bare LF",
    (token) => `Authorization: Bearer ${token}\nX-Internal-Secret: ${SECRET}\r\n`,
  ],
  [
    "a token with a second Authorization after a bare LF",
    (token) => `Authorization: Bearer ${token}\nAuthorization: Bearer ${token}\r\n`,
  ],
  [
    "a token with a secret after a bare CR",
    (token) => `Authorization: Bearer ${token}\rX-Internal-Secret: ${SECRET}\r\n`,
  ],
  ["a token folded onto a continuation line", (token) => `Authorization: Bearer\r\n ${token}\r\n`],
  [
    "a token with a NUL and a secret",
    (token) => `Authorization: Bearer ${token}\0X-Internal-Secret: ${SECRET}\r\n`,
  ],
];

test(
  "a header smuggled with a newline is refused (400, 401 or closed) by the real server, and no turn runs",
  { timeout: 30_000 },
  async () => {
    const dir = await realpath(await mkdtemp(join(tmpdir(), "attack-test-")));
    const logs: LogEntry[] = [];
    const broker = await startBroker({
      ...codelessBroker(dir, SECRET),
      jwtSecret: HS_KEY,
      log: (entry) => logs.push(entry),
    });
    try {
      const port = Number(new URL(broker.url).port);
      // For workspace ws-b only: whatever the smuggling does, ws-a must stay out of reach.
      const token = await new SignJWT({
        sub: "mallory",
        workspaces: ["ws-b"],
        scope: "turns:write",
      })
        .setProtectedHeader({ alg: "HS256" })
        .setExpirationTime("10m")
        .sign(new TextEncoder().encode(HS_KEY));
      const body = JSON.stringify(BODY_A);
      for (const [name, header] of SMUGGLED) {
        const request =
          `POST /api/turns HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n` +
          `Content-Length: ${body.length}\r\nConnection: close\r\n${header(token)}\r\n${body}`;
        const answer = await rawExchange(port, request);
        const status = /^HTTP\/1\.1 (\d{3})/.exec(answer)?.[1];
        assert.ok(
          status === undefined || status === "400" || status === "401",
          `${name}: answered ${answer.split("\r\n")[0]}`,
        );
        if (status === "401") assert.match(answer, /"code":"unauthorized"/, name);
      }
      assert.deepEqual(logs.filter((e) => e.msg === "turn" || e.msg === "dial"), []);
      // The server still serves.
      const health = await fetch(`${broker.url}/healthz`);
      assert.equal(health.status, 200);
      await health.body?.cancel();
    } finally {
      await broker.close();
      await rm(dir, { recursive: true, force: true });
    }
  },
);

/** Sends `request` on a fresh connection; resolves with all that came back once it closed. */
async function rawExchange(port: number, request: string): Promise<string> {
  const socket = connect(port, "127.0.0.1");
  let received = "";
  const closed = new Promise<void>((resolve) => {
    socket.on("close", () => resolve());
    socket.on("error", () => {});
  });
  socket.on("data", (data: Uint8Array) => received += new TextDecoder("latin1").decode(data));
  await new Promise<void>((resolve, reject) => {
    socket.once("connect", resolve);
    socket.once("error", reject);
  });
  socket.write(request);
  try {
    await within(closed, 10_000, "the server to close the connection");
  } finally {
    socket.destroy();
  }
  return received;
}

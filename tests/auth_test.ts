import { test } from "./_test.ts";
import assert from "node:assert/strict";
import { createServer, type Server } from "node:http";
import type { AddressInfo } from "node:net";
import { exportJWK, generateKeyPair, type JWK, SignJWT } from "jose";
import {
  allowsWorkspace,
  createTokenVerifier,
  hasScope,
  type JsonWebKeySet,
  KeySourceError,
  OPERATOR,
  TokenError,
  type TokenErrorReason,
} from "../mod.ts";

const HS_KEY = "an-hs256-key-of-at-least-32-bytes!!";
const NOW = Date.parse("2026-01-01T00:00:00Z");
const now = () => NOW;
const seconds = (ms: number) => Math.floor(ms / 1000);

/** Claims to override; `undefined` leaves a claim out (JSON drops it). */
interface Claims {
  sub?: string | undefined;
  workspaces?: unknown;
  scope?: string | undefined;
  scp?: unknown;
  aud?: string | undefined;
  iss?: string | undefined;
  exp?: number | null | undefined;
  nbf?: number | undefined;
}

function claimsOf(claims: Claims): Record<string, unknown> {
  const body: Record<string, unknown> = {
    sub: "alice",
    workspaces: ["ws-a"],
    scope: "turns:write",
    exp: seconds(NOW) + 600,
    ...claims,
  };
  if (claims.exp === null) delete body.exp;
  return body;
}

function hs256(claims: Claims = {}, key = HS_KEY): Promise<string> {
  return new SignJWT(claimsOf(claims))
    .setProtectedHeader({ alg: "HS256" })
    .sign(new TextEncoder().encode(key));
}

interface Signer {
  jwk: JWK;
  sign(claims?: Claims): Promise<string>;
}

async function signer(alg: "EdDSA" | "ES256" | "RS256", kid: string): Promise<Signer> {
  const { privateKey, publicKey } = await generateKeyPair(alg, { extractable: true });
  const jwk = { ...(await exportJWK(publicKey)), kid, alg };
  return {
    jwk,
    sign: (claims = {}) =>
      new SignJWT(claimsOf(claims)).setProtectedHeader({ alg, kid }).sign(privateKey),
  };
}

function unsigned(claims: Claims = {}): string {
  const part = (value: unknown) =>
    btoa(JSON.stringify(value)).replaceAll("+", "-").replaceAll("/", "_").replace(/=+$/, "");
  return `${part({ alg: "none" })}.${part(claimsOf(claims))}.`;
}

async function refusedWith(
  promise: Promise<unknown>,
  reason: TokenErrorReason,
): Promise<void> {
  await assert.rejects(promise, (error: unknown) => {
    assert.ok(error instanceof TokenError, `expected a TokenError, got ${error}`);
    assert.equal(error.reason, reason, error.message);
    return true;
  });
}

test("createTokenVerifier() turns a valid HS256 token into a token principal", async () => {
  const verify = createTokenVerifier({ secret: HS_KEY, now });
  const principal = await verify(
    await hs256({ sub: "alice", workspaces: ["ws-a", "ws-b"], scope: "turns:write turns:read" }),
  );
  assert.deepEqual({ ...principal }, {
    kind: "token",
    subject: "alice",
    workspaces: ["ws-a", "ws-b"],
    scopes: ["turns:write", "turns:read"],
  });
  assert.ok(allowsWorkspace(principal, "ws-b"));
  assert.ok(!allowsWorkspace(principal, "ws-c"));
});

test("createTokenVerifier() reads scopes from scp as an array too", async () => {
  const verify = createTokenVerifier({ secret: HS_KEY, now });
  const principal = await verify(await hs256({ scope: undefined, scp: ["turns:read"] }));
  assert.deepEqual(principal.scopes, ["turns:read"]);
  assert.ok(!hasScope(principal, "turns:write"));
});

test("OPERATOR opens every workspace with every scope", () => {
  assert.equal(OPERATOR.kind, "secret");
  assert.ok(allowsWorkspace(OPERATOR, "anything"));
  assert.ok(hasScope(OPERATOR, "turns:write") && hasScope(OPERATOR, "turns:read"));
});

test("createTokenVerifier() refuses an expired token beyond the clock skew", async () => {
  const verify = createTokenVerifier({ secret: HS_KEY, now, clockSkewMs: 30_000 });
  await refusedWith(verify(await hs256({ exp: seconds(NOW) - 31 })), "expired");
});

test("createTokenVerifier() accepts a token expired within the clock skew", async () => {
  const verify = createTokenVerifier({ secret: HS_KEY, now, clockSkewMs: 30_000 });
  assert.equal((await verify(await hs256({ exp: seconds(NOW) - 20 }))).subject, "alice");
});

test("createTokenVerifier() refuses a token without exp", async () => {
  const verify = createTokenVerifier({ secret: HS_KEY, now });
  await refusedWith(verify(await hs256({ exp: null })), "invalidClaims");
});

test("createTokenVerifier() refuses a token that is not valid yet", async () => {
  const verify = createTokenVerifier({ secret: HS_KEY, now });
  await refusedWith(verify(await hs256({ nbf: seconds(NOW) + 120 })), "notYetValid");
});

test("createTokenVerifier() refuses alg none", async () => {
  const verify = createTokenVerifier({ secret: HS_KEY, now });
  await refusedWith(verify(unsigned()), "algorithmNotAllowed");
});

test("createTokenVerifier() refuses an HS256 token signed with another key", async () => {
  const verify = createTokenVerifier({ secret: HS_KEY, now });
  await refusedWith(
    verify(await hs256({}, "another-hs256-key-of-32-bytes-or-more")),
    "badSignature",
  );
});

test("createTokenVerifier() refuses a token with a wrong audience", async () => {
  const verify = createTokenVerifier({ secret: HS_KEY, now, audience: "codex-broker" });
  await refusedWith(verify(await hs256({ aud: "someone-else" })), "wrongAudience");
  assert.equal((await verify(await hs256({ aud: "codex-broker" }))).subject, "alice");
});

test("createTokenVerifier() refuses a token from another issuer", async () => {
  const verify = createTokenVerifier({ secret: HS_KEY, now, issuer: "https://auth.example" });
  await refusedWith(verify(await hs256({ iss: "https://evil.example" })), "wrongIssuer");
});

test("createTokenVerifier() refuses a token whose workspaces claim is missing or bad", async () => {
  const verify = createTokenVerifier({ secret: HS_KEY, now });
  await refusedWith(verify(await hs256({ workspaces: undefined })), "invalidClaims");
  await refusedWith(verify(await hs256({ workspaces: [] })), "invalidClaims");
  await refusedWith(verify(await hs256({ workspaces: ["../etc"] })), "invalidClaims");
  await refusedWith(verify(await hs256({ workspaces: "ws-a" })), "invalidClaims");
});

test("createTokenVerifier() refuses what is not a compact JWS", async () => {
  const verify = createTokenVerifier({ secret: HS_KEY, now });
  await refusedWith(verify("not-a-token"), "malformed");
  await refusedWith(verify("a.b.c"), "malformed");
  await refusedWith(verify(`${"a".repeat(9000)}.b.c`), "malformed");
});

test("createTokenVerifier() refuses an HS256 token when only a JWKS is configured", async () => {
  const key = await signer("ES256", "k1");
  const verify = createTokenVerifier({ jwks: () => Promise.resolve({ keys: [key.jwk] }), now });
  await refusedWith(verify(await hs256()), "algorithmNotAllowed");
});

test("createTokenVerifier() refuses an HS256 token forged with the JWKS public key", async () => {
  // The old algorithm confusion: a public key's bytes used as an HMAC secret.
  const key = await signer("RS256", "k1");
  const verify = createTokenVerifier({ jwks: () => Promise.resolve({ keys: [key.jwk] }), now });
  const forged = await new SignJWT(claimsOf({}))
    .setProtectedHeader({ alg: "HS256", kid: "k1" })
    .sign(new TextEncoder().encode(JSON.stringify(key.jwk)));
  await refusedWith(verify(forged), "algorithmNotAllowed");
});

for (const alg of ["EdDSA", "ES256", "RS256"] as const) {
  test(`createTokenVerifier() accepts an ${alg} token of a JWKS key`, async () => {
    const key = await signer(alg, `${alg}-1`);
    const verify = createTokenVerifier({ jwks: () => Promise.resolve({ keys: [key.jwk] }), now });
    assert.equal((await verify(await key.sign({ sub: "bob" }))).subject, "bob");
  });
}

test("createTokenVerifier() refuses a token signed by a key the JWKS lacks", async () => {
  const known = await signer("ES256", "k1");
  const stranger = await signer("ES256", "k1");
  const verify = createTokenVerifier({ jwks: () => Promise.resolve({ keys: [known.jwk] }), now });
  await refusedWith(verify(await stranger.sign()), "badSignature");
});

test("createTokenVerifier() takes a rotated JWKS: new key at once, old one refused after max age", async () => {
  const oldKey = await signer("EdDSA", "old");
  const newKey = await signer("EdDSA", "new");
  let clock = NOW;
  let set: JsonWebKeySet = { keys: [oldKey.jwk] };
  let loads = 0;
  const verify = createTokenVerifier({
    jwks: () => {
      loads++;
      return Promise.resolve(structuredClone(set));
    },
    jwksMaxAgeMs: 60_000,
    jwksCooldownMs: 1_000,
    now: () => clock,
  });
  assert.equal((await verify(await oldKey.sign())).subject, "alice");
  // The issuer publishes the new key next to the old one and starts signing with it.
  set = { keys: [oldKey.jwk, newKey.jwk] };
  assert.equal((await verify(await newKey.sign({ sub: "bob" }))).subject, "bob");
  assert.equal(loads, 2);
  // Then it removes the old key: refused once the loaded set is older than the max age.
  set = { keys: [newKey.jwk] };
  clock += 60_000;
  await refusedWith(verify(await oldKey.sign()), "unknownKey");
  assert.equal((await verify(await newKey.sign())).subject, "alice");
});

test("createTokenVerifier() reloads the JWKS for an unknown key at most once per cooldown", async () => {
  const known = await signer("ES256", "k1");
  const stranger = await signer("ES256", "k2");
  let loads = 0;
  const verify = createTokenVerifier({
    jwks: () => {
      loads++;
      return Promise.resolve({ keys: [known.jwk] });
    },
    jwksCooldownMs: 30_000,
    now,
  });
  await refusedWith(verify(await stranger.sign()), "unknownKey");
  await refusedWith(verify(await stranger.sign()), "unknownKey");
  assert.equal(loads, 2); // the first load, and one reload for the unknown kid
});

test("createTokenVerifier() fails with KeySourceError when the JWKS cannot be loaded", async () => {
  const key = await signer("ES256", "k1");
  const verify = createTokenVerifier({
    jwks: () => Promise.reject(new Error("ENOENT: no such file")),
    now,
  });
  await assert.rejects(verify(await key.sign()), KeySourceError);
  const garbage = createTokenVerifier({
    jwks: () => Promise.resolve({ nope: true } as unknown as JsonWebKeySet),
    now,
  });
  await assert.rejects(garbage(await key.sign()), KeySourceError);
});

test("createTokenVerifier() fetches a JWKS URL and follows its rotation", async () => {
  const first = await signer("ES256", "first");
  const second = await signer("ES256", "second");
  let set: JsonWebKeySet = { keys: [first.jwk] };
  const server: Server = createServer((_request, response) => {
    response.writeHead(200, { "content-type": "application/json", connection: "close" });
    response.end(JSON.stringify(set));
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  try {
    const { port } = server.address() as AddressInfo;
    const verify = createTokenVerifier({
      jwks: new URL(`http://127.0.0.1:${port}/jwks.json`),
      jwksCooldownMs: 0,
      now,
    });
    assert.equal((await verify(await first.sign())).subject, "alice");
    set = { keys: [second.jwk] };
    assert.equal((await verify(await second.sign({ sub: "bob" }))).subject, "bob");
  } finally {
    await new Promise<void>((resolve) => server.close(() => resolve()));
  }
});

test("createTokenVerifier() refuses a short HS256 key, no key source, and a JWKS over plain http", () => {
  assert.throws(() => createTokenVerifier({ secret: "short" }), RangeError);
  assert.throws(() => createTokenVerifier({}), TypeError);
  assert.throws(
    () => createTokenVerifier({ jwks: new URL("http://auth.example/jwks.json") }),
    /https/,
  );
});

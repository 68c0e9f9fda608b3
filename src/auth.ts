/**
 * Who is calling the broker: the operator with the shared secret, or a caller with a bearer
 * token (a JWT) scoped to workspaces. Tokens are verified with `jose`, which is
 * web-standard (`crypto.subtle`, `fetch`), so this module runs on Deno, Bun, Node and
 * anywhere else the handler does.
 *
 * A token the broker accepts:
 *
 * - is signed with HS256 under the shared key, or with EdDSA (Ed25519), ES256 or RS256
 *   under a key of the JSON Web Key Set (JWKS); any other algorithm, `none` among them, is
 *   refused;
 * - has `exp` (required) and, if present, `nbf` within the clock skew (default 30 s);
 * - has `sub`, the caller's name in the broker's log;
 * - has `workspaces`: the non-empty array of the workspace ids it is for;
 * - has its scopes in `scope` (space-separated, RFC 8693) or `scp` (an array or a
 *   space-separated string): `turns:write` runs turns, `turns:read` is for the read API to
 *   come;
 * - has `aud` and `iss` matching, when the verifier is configured with them.
 *
 * @example Verify a token
 * ```ts ignore
 * import { createTokenVerifier } from "jsr:@codex-broker/broker";
 *
 * const verify = createTokenVerifier({ jwks: new URL("https://auth.example/jwks.json") });
 * const principal = await verify(token); // throws TokenError if it is not valid
 * console.log(principal.subject, principal.workspaces, principal.scopes);
 * ```
 *
 * @module
 */

import {
  createLocalJWKSet,
  createRemoteJWKSet,
  errors,
  type JSONWebKeySet,
  type JWTHeaderParameters,
  jwtVerify,
  type JWTVerifyGetKey,
} from "jose";
import { isValidWorkspaceId } from "./_workspace_id.ts";

/** The scope that runs turns (`POST /api/turns`). */
export const SCOPE_TURNS_WRITE = "turns:write";
/** The scope for what the read API to come will read. */
export const SCOPE_TURNS_READ = "turns:read";

/**
 * Who made a request. `kind` is `"secret"` for the operator's `X-Internal-Secret`, which
 * opens every workspace with every scope, and `"token"` for a verified bearer token.
 */
export interface Principal {
  /** The credential the request carried. */
  readonly kind: "secret" | "token";
  /** `"operator"` for the secret; the token's `sub`. Named in the log, never the token. */
  readonly subject: string;
  /** The workspace ids the caller may use, or `"*"` for every one (the secret). */
  readonly workspaces: readonly string[] | "*";
  /** The caller's scopes, e.g. `turns:write`. */
  readonly scopes: readonly string[];
}

/** The principal of a request that carried the right `X-Internal-Secret`. */
export const OPERATOR: Principal = Object.freeze({
  kind: "secret",
  subject: "operator",
  workspaces: "*",
  scopes: Object.freeze([SCOPE_TURNS_READ, SCOPE_TURNS_WRITE]),
});

/**
 * Whether `principal` may use the workspace.
 *
 * @example Check a token's workspace
 * ```ts ignore
 * if (!allowsWorkspace(principal, "ws-1")) return new Response(null, { status: 403 });
 * ```
 *
 * @param principal The caller.
 * @param workspaceId The workspace asked for.
 * @returns `true` for the operator, or when the token names the workspace.
 */
export function allowsWorkspace(principal: Principal, workspaceId: string): boolean {
  return principal.workspaces === "*" || principal.workspaces.includes(workspaceId);
}

/**
 * Whether `principal` has `scope`.
 *
 * @example Check a scope
 * ```ts ignore
 * hasScope(OPERATOR, SCOPE_TURNS_WRITE); // true
 * ```
 *
 * @param principal The caller.
 * @param scope The scope needed, e.g. {@linkcode SCOPE_TURNS_WRITE}.
 * @returns Whether the caller has it.
 */
export function hasScope(principal: Principal, scope: string): boolean {
  return principal.scopes.includes(scope);
}

/** A JSON Web Key Set: `{ keys: [...] }`, each key a JWK object. */
export interface JsonWebKeySet {
  /** The keys; each needs `kty`, and `kid` to be told apart from the others. */
  keys: Record<string, unknown>[];
}

/** The algorithms a JWKS key may sign with. */
export const JWKS_ALGORITHMS: readonly string[] = Object.freeze([
  "EdDSA",
  "Ed25519",
  "ES256",
  "RS256",
]);

/** Options for {@linkcode createTokenVerifier}; at least one of `secret` and `jwks`. */
export interface TokenVerifierOptions {
  /** The HS256 shared key, at least 32 bytes (a string is taken as its UTF-8 bytes). */
  secret?: Uint8Array | string;
  /**
   * Public keys (EdDSA, ES256, RS256): a `URL` to fetch the JWKS from (`https:`, or `http:`
   * on a loopback host), or a
   * function that loads it (from a file, say). Either is loaded again once older than
   * `jwksMaxAgeMs`, and when a token names a key the set lacks, at most once per
   * `jwksCooldownMs`: a new key is taken at once, a removed one is refused within
   * `jwksMaxAgeMs`.
   */
  jwks?: URL | (() => Promise<JsonWebKeySet>);
  /** A token's `aud` must hold one of these. Not checked without it. */
  audience?: string | readonly string[];
  /** A token's `iss` must be one of these. Not checked without it. */
  issuer?: string | readonly string[];
  /** How far `exp` and `nbf` may be off the broker's clock. Defaults to 30 s. */
  clockSkewMs?: number;
  /** Reload the JWKS once it is older than this. Defaults to 5 minutes. */
  jwksMaxAgeMs?: number;
  /** Reload the JWKS for an unknown key at most this often. Defaults to 30 s. */
  jwksCooldownMs?: number;
  /** How long fetching a JWKS URL may take. Defaults to 5 s. */
  jwksTimeoutMs?: number;
  /** The clock, in milliseconds since the epoch. Defaults to `Date.now`; for tests. */
  now?: () => number;
}

/** Checks one bearer token; see {@linkcode createTokenVerifier}. */
export type TokenVerifier = (token: string) => Promise<Principal>;

/** Why a token was refused, in {@linkcode TokenError.reason}. */
export type TokenErrorReason =
  | "malformed"
  | "algorithmNotAllowed"
  | "unknownKey"
  | "badSignature"
  | "expired"
  | "notYetValid"
  | "wrongAudience"
  | "wrongIssuer"
  | "invalidClaims";

/**
 * A token that is not valid: the handler answers it 401 `unauthorized`.
 *
 * @example Tell an expired token
 * ```ts ignore
 * try {
 *   await verify(token);
 * } catch (error) {
 *   if (error instanceof TokenError && error.reason === "expired") console.log("refresh it");
 * }
 * ```
 */
export class TokenError extends Error {
  /** What is wrong with the token. */
  readonly reason: TokenErrorReason;

  /**
   * Creates the error.
   *
   * @param reason What is wrong with the token.
   * @param message The message.
   * @param options The underlying error, as `cause`.
   */
  constructor(reason: TokenErrorReason, message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = "TokenError";
    this.reason = reason;
  }
}

/**
 * The keys to check a token against could not be had (the JWKS URL does not answer, the
 * file is unreadable or not a key set): not the caller's fault, so the handler answers it
 * 503 `unavailable`.
 *
 * @example Tell a key-source failure
 * ```ts ignore
 * if (error instanceof KeySourceError) console.error("JWKS unavailable:", error.message);
 * ```
 */
export class KeySourceError extends Error {
  /**
   * Creates the error.
   *
   * @param message What failed.
   * @param options The underlying error, as `cause`.
   */
  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = "KeySourceError";
  }
}

const DEFAULT_CLOCK_SKEW_MS = 30_000;
const DEFAULT_JWKS_MAX_AGE_MS = 5 * 60_000;
const DEFAULT_JWKS_COOLDOWN_MS = 30_000;
const DEFAULT_JWKS_TIMEOUT_MS = 5_000;
// The broker takes headers of a few KiB; a longer token is garbage or an attack.
const MAX_TOKEN_LENGTH = 8 * 1024;
const MIN_HS256_KEY_BYTES = 32;
const TOKEN_PATTERN = /^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$/;

/**
 * Whether `url` is `http:` to a loopback host, the one place a JWKS may come unencrypted.
 *
 * @example Check a JWKS URL
 * ```ts ignore
 * isLoopbackHttp(new URL("http://127.0.0.1:8080/jwks.json")); // true
 * ```
 *
 * @param url The URL.
 * @returns `true` for `http://localhost`, `http://127.x.x.x` and `http://[::1]`.
 */
export function isLoopbackHttp(url: URL): boolean {
  return url.protocol === "http:" &&
    (url.hostname === "localhost" || url.hostname === "[::1]" ||
      /^127\.\d{1,3}\.\d{1,3}\.\d{1,3}$/.test(url.hostname));
}

function nonNegative(name: string, value: number | undefined): void {
  if (value !== undefined && !(Number.isFinite(value) && value >= 0)) {
    throw new RangeError(`Invalid ${name}: expected a non-negative number, got ${value}`);
  }
}

function list(value: string | readonly string[] | undefined): string[] | undefined {
  if (value === undefined) return undefined;
  return typeof value === "string" ? [value] : [...value];
}

/**
 * A key lookup over a JWKS that a function loads: loaded on first use, again once older
 * than `maxAgeMs`, and again for a key it lacks at most once per `cooldownMs`. A load that
 * fails is a {@linkcode KeySourceError}: the broker fails closed rather than keep keys the
 * operator may have removed.
 */
function loadedKeySet(
  load: () => Promise<JsonWebKeySet>,
  maxAgeMs: number,
  cooldownMs: number,
  now: () => number,
): JWTVerifyGetKey {
  let current: { getKey: JWTVerifyGetKey; loadedAt: number } | undefined;
  let loading: Promise<void> | undefined;
  let lastUnknownReload = -Infinity;
  const reload = () =>
    loading ??= (async () => {
      try {
        let set: unknown;
        try {
          set = await load();
        } catch (error) {
          throw new KeySourceError(
            `Cannot load JWKS: ${error instanceof Error ? error.message : String(error)}`,
            { cause: error },
          );
        }
        let getKey: JWTVerifyGetKey;
        try {
          getKey = createLocalJWKSet(set as JSONWebKeySet);
        } catch (error) {
          throw new KeySourceError("Cannot load JWKS: it is not a JSON Web Key Set", {
            cause: error,
          });
        }
        current = { getKey, loadedAt: now() };
      } catch (error) {
        current = undefined;
        throw error;
      } finally {
        loading = undefined;
      }
    })();
  return async (header, token) => {
    if (current === undefined || now() - current.loadedAt >= maxAgeMs) await reload();
    try {
      return await current!.getKey(header, token);
    } catch (error) {
      if (!(error instanceof errors.JWKSNoMatchingKey)) throw error;
      if (now() - lastUnknownReload < cooldownMs) throw error;
      lastUnknownReload = now();
      await reload();
      return await current!.getKey(header, token);
    }
  };
}

/** A failure of `jwtVerify` as the caller's fault (a token error) or the key source's. */
function refusal(error: unknown): TokenError | KeySourceError {
  if (error instanceof TokenError || error instanceof KeySourceError) return error;
  const fail = (reason: TokenErrorReason, message: string) =>
    new TokenError(reason, `Invalid token: ${message}`, { cause: error });
  if (error instanceof errors.JWTExpired) return fail("expired", "it has expired");
  if (error instanceof errors.JWTClaimValidationFailed) {
    switch (error.claim) {
      case "nbf":
        return fail("notYetValid", "it is not valid yet (nbf)");
      case "aud":
        return fail("wrongAudience", "its audience (aud) is not this broker's");
      case "iss":
        return fail("wrongIssuer", "its issuer (iss) is not accepted");
      default:
        return fail("invalidClaims", `claim ${error.claim}: ${error.message}`);
    }
  }
  if (error instanceof errors.JOSEAlgNotAllowed || error instanceof errors.JOSENotSupported) {
    return fail("algorithmNotAllowed", "its algorithm is not accepted");
  }
  if (error instanceof errors.JWSSignatureVerificationFailed) {
    return fail("badSignature", "its signature does not verify");
  }
  if (
    error instanceof errors.JWKSNoMatchingKey || error instanceof errors.JWKSMultipleMatchingKeys
  ) {
    return fail("unknownKey", "no key of the key set matches it");
  }
  if (error instanceof errors.JWSInvalid || error instanceof errors.JWTInvalid) {
    return fail("malformed", error.message);
  }
  if (error instanceof errors.JWKSTimeout || error instanceof errors.JWKSInvalid) {
    return new KeySourceError(`Cannot load JWKS: ${error.message}`, { cause: error });
  }
  if (error instanceof errors.JOSEError) return fail("malformed", error.message);
  // fetch failures of a remote JWKS (TypeError, AbortError) and anything else unforeseen.
  return new KeySourceError(
    `Cannot check token: ${error instanceof Error ? error.message : String(error)}`,
    { cause: error },
  );
}

function scopesOf(payload: Record<string, unknown>): string[] {
  const scopes = new Set<string>();
  for (const claim of [payload.scope, payload.scp]) {
    const values = typeof claim === "string" ? claim.split(" ") : Array.isArray(claim) ? claim : [];
    for (const value of values) {
      if (typeof value === "string" && value !== "") scopes.add(value);
    }
  }
  return [...scopes];
}

/**
 * Makes the verifier of bearer tokens (see the module documentation for the claims): it
 * checks the signature, the algorithm, `exp`, `nbf`, `aud` and `iss`, and turns the claims
 * into a {@linkcode Principal} of kind `"token"`. HS256 tokens are checked against
 * `secret`, all others against `jwks`.
 *
 * @example HS256 and a JWKS file together
 * ```ts ignore
 * const verify = createTokenVerifier({
 *   secret: hs256Key,
 *   jwks: async () => JSON.parse(await Deno.readTextFile("/etc/broker/jwks.json")),
 *   audience: "codex-broker",
 * });
 * const { subject, workspaces } = await verify(token);
 * ```
 *
 * @param options The keys, the expected audience and issuer, the clock skew and the JWKS
 * reload intervals.
 * @returns The verifier. It resolves with the principal, or rejects with a
 * {@linkcode TokenError} for a token that is not valid, or a {@linkcode KeySourceError}
 * when the keys could not be had.
 * @throws {TypeError} If neither `secret` nor `jwks` is given, or `jwks` is a URL that is
 * not `https:` (`http:` is taken for a loopback host only).
 * @throws {RangeError} If `secret` is shorter than 32 bytes, or a duration is negative.
 */
export function createTokenVerifier(options: TokenVerifierOptions): TokenVerifier {
  const { jwks } = options;
  const secret = typeof options.secret === "string"
    ? new TextEncoder().encode(options.secret)
    : options.secret;
  if (secret === undefined && jwks === undefined) {
    throw new TypeError("Cannot create token verifier: give secret, jwks or both");
  }
  if (secret !== undefined && secret.length < MIN_HS256_KEY_BYTES) {
    throw new RangeError(
      `Invalid secret: an HS256 key needs at least ${MIN_HS256_KEY_BYTES} bytes, got ` +
        `${secret.length}`,
    );
  }
  if (jwks instanceof URL && !(jwks.protocol === "https:" || isLoopbackHttp(jwks))) {
    // Whoever can change the keys in transit can sign tokens for every workspace.
    throw new TypeError(`Invalid jwks: expected an https: URL (http: on loopback only)`);
  }
  nonNegative("clockSkewMs", options.clockSkewMs);
  nonNegative("jwksMaxAgeMs", options.jwksMaxAgeMs);
  nonNegative("jwksCooldownMs", options.jwksCooldownMs);
  nonNegative("jwksTimeoutMs", options.jwksTimeoutMs);
  const now = options.now ?? Date.now;
  const maxAgeMs = options.jwksMaxAgeMs ?? DEFAULT_JWKS_MAX_AGE_MS;
  const cooldownMs = options.jwksCooldownMs ?? DEFAULT_JWKS_COOLDOWN_MS;
  const keySet: JWTVerifyGetKey | undefined = jwks === undefined
    ? undefined
    : jwks instanceof URL
    ? createRemoteJWKSet(jwks, {
      cacheMaxAge: maxAgeMs,
      cooldownDuration: cooldownMs,
      timeoutDuration: options.jwksTimeoutMs ?? DEFAULT_JWKS_TIMEOUT_MS,
    })
    : loadedKeySet(jwks, maxAgeMs, cooldownMs, now);
  const algorithms = [...(secret ? ["HS256"] : []), ...(keySet ? JWKS_ALGORITHMS : [])];
  const getKey = (header: JWTHeaderParameters, token: Parameters<JWTVerifyGetKey>[1]) => {
    // The algorithm picks the key: an HS256 token is never checked against a public key
    // (the old confusion of RS256 keys used as HMAC secrets), nor the other way round.
    if (header.alg === "HS256") {
      if (secret) return secret;
    } else if (keySet && JWKS_ALGORITHMS.includes(header.alg)) {
      return keySet(header, token);
    }
    throw new errors.JOSEAlgNotAllowed(`"alg" (Algorithm) Header Parameter value not allowed`);
  };
  const audience = list(options.audience);
  const issuer = list(options.issuer);
  const clockTolerance = Math.round((options.clockSkewMs ?? DEFAULT_CLOCK_SKEW_MS) / 1000);

  return async function verifyToken(token: string): Promise<Principal> {
    if (token.length > MAX_TOKEN_LENGTH || !TOKEN_PATTERN.test(token)) {
      throw new TokenError("malformed", "Invalid token: not a compact JWS");
    }
    let payload: Record<string, unknown>;
    try {
      ({ payload } = await jwtVerify(token, getKey, {
        algorithms,
        requiredClaims: ["exp", "sub"],
        clockTolerance,
        currentDate: new Date(now()),
        ...(audience ? { audience } : {}),
        ...(issuer ? { issuer } : {}),
      }));
    } catch (error) {
      throw refusal(error);
    }
    const { sub, workspaces } = payload;
    if (typeof sub !== "string" || sub === "") {
      throw new TokenError("invalidClaims", "Invalid token: sub must be a non-empty string");
    }
    if (
      !Array.isArray(workspaces) || workspaces.length === 0 ||
      !workspaces.every(isValidWorkspaceId)
    ) {
      throw new TokenError(
        "invalidClaims",
        "Invalid token: workspaces must be a non-empty array of workspace ids",
      );
    }
    return Object.freeze({
      kind: "token",
      subject: sub,
      workspaces: Object.freeze([...workspaces]),
      scopes: Object.freeze(scopesOf(payload)),
    });
  };
}

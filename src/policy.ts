/**
 * The operator's policy on what callers may ask of codex: which sandbox modes, approval
 * policies, models and working directories a `POST /api/turns` may set in `threadParams`
 * and `params`, per kind of credential. Web-standard: checking that a path stays inside the
 * workspace needs the file system, so that part is injected ({@linkcode WorkspacePathResolver};
 * the broker passes one that follows symlinks).
 *
 * The policy knows every field of codex's `thread/start` and `turn/start` (0.169) and sorts
 * them in three groups:
 *
 * - fields that can widen what codex may do (`sandbox`, `sandboxPolicy`, `approvalPolicy`,
 *   `approvalsReviewer`, `cwd`, `writableRoots`, `model`, `modelProvider`, `config`,
 *   `baseInstructions`, `developerInstructions`) are checked against the rules;
 * - plain fields (`input`, `effort`, `summary`, `outputSchema`, `personality`, …) pass;
 * - anything else is refused: codex ignores fields it does not know, but each new codex
 *   version adds fields, and several recent ones widen access (`runtimeWorkspaceRoots`,
 *   `permissions`, `environments`). A field the policy has not classified is one it cannot
 *   vouch for; `extraFields` lets an operator pass named ones through.
 *
 * @example Check a request against the default policy
 * ```ts
 * import { createParamsCheck, DEFAULT_POLICY } from "@codex-broker/broker";
 * import assert from "node:assert/strict";
 *
 * const check = createParamsCheck(DEFAULT_POLICY);
 * const verdict = await check(
 *   {
 *     threadId: null,
 *     threadParams: { sandbox: "danger-full-access" },
 *     params: { input: [{ type: "text", text: "hi", text_elements: [] }] },
 *   },
 *   { credential: "token", workspaceId: "ws-1" },
 * );
 * assert.equal(verdict.allowed, false);
 * if (!verdict.allowed) assert.equal(verdict.field, "threadParams.sandbox");
 * ```
 *
 * @module
 */

import type { ThreadStartParams, TurnParams } from "./protocol.ts";

/**
 * How a caller authenticated: `secret` is the operator's `X-Internal-Secret`, `token` a
 * workspace-scoped token.
 */
export type CredentialKind = "secret" | "token";

/**
 * A sandbox mode, as `thread/start` names it; `external-sandbox` is `turn/start`'s
 * `sandboxPolicy` of type `externalSandbox` (codex does not sandbox at all and trusts an
 * outer one).
 */
export type SandboxMode =
  | "read-only"
  | "workspace-write"
  | "danger-full-access"
  | "external-sandbox";

/**
 * An approval policy: codex's three named ones, and `granular` for its object form
 * `{ granular: { … } }`.
 */
export type ApprovalPolicyName = "untrusted" | "on-request" | "never" | "granular";

/** Where codex routes approval requests for review (`approvalsReviewer`). */
export type ApprovalsReviewerName = "user" | "auto_review" | "guardian_subagent";

/** What the broker sets on `thread/start` when the caller leaves a field unset. */
export interface PolicyDefaults {
  /**
   * The thread's `sandbox`, or `null` to leave it to the codex configuration (the
   * `sandbox_mode` of the codex home template).
   */
  readonly sandbox: Exclude<SandboxMode, "external-sandbox"> | null;
  /**
   * The thread's `approvalPolicy`, or `null` to leave it to the codex configuration (its
   * `approval_policy`).
   */
  readonly approvalPolicy: Exclude<ApprovalPolicyName, "granular"> | null;
}

/** Fields passed through unchecked, by where they appear. */
export interface ExtraFields {
  /** Top-level field names of `threadParams`. */
  readonly threadParams: readonly string[];
  /** Top-level field names of `params`. */
  readonly params: readonly string[];
}

/** What callers holding one kind of credential may set. */
export interface CredentialRules {
  /** Allowed `threadParams.sandbox` and `params.sandboxPolicy.type`. */
  readonly sandbox: readonly SandboxMode[];
  /** Allowed `approvalPolicy` values, in `threadParams` and `params`. */
  readonly approvalPolicy: readonly ApprovalPolicyName[];
  /** Allowed `approvalsReviewer` values, in `threadParams` and `params`. */
  readonly approvalsReviewer: readonly ApprovalsReviewerName[];
  /**
   * Whether a caller may turn network access on (`params.sandboxPolicy.networkAccess`, or
   * a sandbox that has it: `danger-full-access`).
   */
  readonly network: boolean;
  /**
   * Whether `approvalPolicy: "never"` (or `granular`) may come with network access. When
   * not, a request that sets one must show the other is off: on a continued thread the
   * broker does not know what earlier turns set, so `"never"` needs a `sandboxPolicy`
   * without network in the same `params`, and network access needs an `approvalPolicy`
   * other than `"never"` there.
   */
  readonly neverWithNetwork: boolean;
  /** Allowed `model` values, or `"*"` for any. */
  readonly models: "*" | readonly string[];
  /** Allowed `threadParams.modelProvider` values (providers of the codex configuration), or `"*"`. */
  readonly modelProviders: "*" | readonly string[];
  /**
   * Whether a caller may set `cwd`. When it may, the path (absolute, or relative to the
   * workspace's directory) must resolve inside the workspace's directory, symlinks
   * included, and codex is given the resolved path.
   */
  readonly cwd: boolean;
  /**
   * Whether a caller may set `params.sandboxPolicy.writableRoots`; each must resolve inside
   * the workspace's directory, as `cwd` does.
   */
  readonly writableRoots: boolean;
  /** Whether a caller may set `baseInstructions` and `developerInstructions`. */
  readonly instructions: boolean;
  /**
   * Allowed keys of `threadParams.config` (codex configuration overrides), or `"*"`. A key
   * is allowed when it, or a dotted prefix of it, is listed: `"tools"` allows
   * `"tools.web_search"`. A config key can set anything (`sandbox_mode`, `mcp_servers`,
   * `shell_environment_policy`, …): list only keys that give nothing away.
   */
  readonly config: "*" | readonly string[];
  /** Fields the policy does not know, passed to codex unchecked. */
  readonly extraFields: ExtraFields;
  /** What the broker sets on `thread/start` when the caller leaves it unset. */
  readonly defaults: PolicyDefaults;
}

/** A policy: the rules for each kind of credential. */
export interface Policy {
  /** Rules by credential kind. */
  readonly credentials: Readonly<Record<CredentialKind, CredentialRules>>;
}

/**
 * The rules of a credential kind the policy file does not mention, and of each key it
 * leaves out: no `danger-full-access` or external sandbox, no granular approvals, network
 * access but never with `approvalPolicy: "never"`, any model and provider, `cwd` and
 * writable roots inside the workspace only, instructions allowed, no `config` overrides, no
 * extra fields; a new thread gets `read-only` and `on-request` (codex's own defaults) unless
 * the caller asks for something else, whatever the codex home template says.
 */
export const DEFAULT_RULES: CredentialRules = Object.freeze({
  sandbox: Object.freeze(["read-only", "workspace-write"] as const),
  approvalPolicy: Object.freeze(["untrusted", "on-request", "never"] as const),
  approvalsReviewer: Object.freeze(["user"] as const),
  network: true,
  neverWithNetwork: false,
  models: "*",
  modelProviders: "*",
  cwd: true,
  writableRoots: true,
  instructions: true,
  config: Object.freeze([]),
  extraFields: Object.freeze({ threadParams: Object.freeze([]), params: Object.freeze([]) }),
  defaults: Object.freeze({ sandbox: "read-only", approvalPolicy: "on-request" } as const),
});

/** The policy of a broker started without `--policy`: {@linkcode DEFAULT_RULES} for every credential. */
export const DEFAULT_POLICY: Policy = Object.freeze({
  credentials: Object.freeze({ secret: DEFAULT_RULES, token: DEFAULT_RULES }),
});

/**
 * Thrown by {@linkcode parsePolicy} for a policy that is not valid JSON or breaks the
 * format: an unknown key, a wrong type, a value outside the allowed ones.
 *
 * @example Report where a policy file is wrong
 * ```ts
 * import { parsePolicy, PolicyError } from "@codex-broker/broker";
 * import assert from "node:assert/strict";
 *
 * assert.throws(
 *   () => parsePolicy('{ "credentials": { "token": { "sandbox": ["all"] } } }'),
 *   (error) => error instanceof PolicyError && error.path === "credentials.token.sandbox[0]",
 * );
 * ```
 */
export class PolicyError extends Error {
  /** Where in the file, e.g. `credentials.token.sandbox[1]`; empty for the whole file. */
  readonly path: string;
  /** What is wrong there. */
  readonly reason: string;

  /**
   * Creates the error.
   *
   * @param path Where in the policy the problem is.
   * @param reason What is wrong there.
   * @param options The cause, if any.
   */
  constructor(path: string, reason: string, options?: ErrorOptions) {
    super(`Invalid policy${path === "" ? "" : ` at ${path}`}: ${reason}`, options);
    this.name = "PolicyError";
    this.path = path;
    this.reason = reason;
  }
}

const CREDENTIAL_KINDS: readonly CredentialKind[] = ["secret", "token"];
const SANDBOX_MODES: readonly SandboxMode[] = [
  "read-only",
  "workspace-write",
  "danger-full-access",
  "external-sandbox",
];
// What thread/start's `sandbox` takes.
const THREAD_SANDBOX_MODES: readonly SandboxMode[] = [
  "read-only",
  "workspace-write",
  "danger-full-access",
];
const APPROVAL_POLICIES: readonly ApprovalPolicyName[] = [
  "untrusted",
  "on-request",
  "never",
  "granular",
];
const APPROVALS_REVIEWERS: readonly ApprovalsReviewerName[] = [
  "user",
  "auto_review",
  "guardian_subagent",
];

// Fields that cannot widen what codex may do: content, style and bookkeeping.
const PLAIN_THREAD_FIELDS = new Set([
  "ephemeral",
  "personality",
  "serviceName",
  "serviceTier",
  "sessionStartSource",
  "threadSource",
]);
const PLAIN_TURN_FIELDS = new Set([
  // Paths in input items (localImage, mention, …) let codex read a file, which the model
  // can already do with a command: the sandbox restricts writes and network, not reads.
  "input",
  "effort",
  "summary",
  "outputSchema",
  "personality",
  "serviceTier",
  "serviceTierForTurn",
  "clientUserMessageId",
  "parentTurnId",
  "rootTurnId",
  "turnTrigger",
  "toolOutput",
]);
const CHECKED_THREAD_FIELDS = new Set([
  "model",
  "modelProvider",
  "cwd",
  "sandbox",
  "approvalPolicy",
  "approvalsReviewer",
  "config",
  "baseInstructions",
  "developerInstructions",
]);
const CHECKED_TURN_FIELDS = new Set([
  "model",
  "cwd",
  "sandboxPolicy",
  "approvalPolicy",
  "approvalsReviewer",
  "threadId",
]);

/** The fields of thread/start or turn/start params: passed as they are, or checked. */
interface FieldSets {
  /** How a field is named in a refusal: `threadParams` or `params`. */
  readonly prefix: string;
  readonly plain: ReadonlySet<string>;
  readonly checked: ReadonlySet<string>;
}

const THREAD_FIELDS: FieldSets = {
  prefix: "threadParams",
  plain: PLAIN_THREAD_FIELDS,
  checked: CHECKED_THREAD_FIELDS,
};
const TURN_FIELDS: FieldSets = {
  prefix: "params",
  plain: PLAIN_TURN_FIELDS,
  checked: CHECKED_TURN_FIELDS,
};
// turn/start's sandboxPolicy, by type: the policy's name for it and the keys it may carry.
const SANDBOX_POLICY_TYPES: Readonly<Record<string, { mode: SandboxMode; keys: string[] }>> = {
  readOnly: { mode: "read-only", keys: ["type", "networkAccess"] },
  workspaceWrite: {
    mode: "workspace-write",
    keys: ["type", "networkAccess", "writableRoots", "excludeSlashTmp", "excludeTmpdirEnvVar"],
  },
  dangerFullAccess: { mode: "danger-full-access", keys: ["type"] },
  externalSandbox: { mode: "external-sandbox", keys: ["type", "networkAccess"] },
};
const RULE_KEYS: readonly (keyof CredentialRules)[] = [
  "sandbox",
  "approvalPolicy",
  "approvalsReviewer",
  "network",
  "neverWithNetwork",
  "models",
  "modelProviders",
  "cwd",
  "writableRoots",
  "instructions",
  "config",
  "extraFields",
  "defaults",
];

function isObject(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

function quoted(values: readonly string[]): string {
  return values.map((value) => JSON.stringify(value)).join(", ");
}

function describe(value: unknown): string {
  if (value === null) return "null";
  if (Array.isArray(value)) return "an array";
  if (typeof value === "object") return "an object";
  return typeof value === "string" ? JSON.stringify(value) : `${typeof value} ${String(value)}`;
}

function knownKeys(value: Record<string, unknown>, keys: readonly string[], path: string): void {
  for (const key of Object.keys(value)) {
    if (!keys.includes(key)) {
      throw new PolicyError(
        path === "" ? key : `${path}.${key}`,
        `unknown key; expected one of ${quoted(keys)}`,
      );
    }
  }
}

function oneOfList<T extends string>(value: unknown, allowed: readonly T[], path: string): T[] {
  if (!Array.isArray(value)) {
    throw new PolicyError(path, `expected an array of ${quoted(allowed)}, got ${describe(value)}`);
  }
  return value.map((item, i) => {
    if (!allowed.includes(item as T)) {
      throw new PolicyError(
        `${path}[${i}]`,
        `expected one of ${quoted(allowed)}, got ${describe(item)}`,
      );
    }
    return item as T;
  });
}

function stringList(value: unknown, path: string): string[] {
  if (!Array.isArray(value)) {
    throw new PolicyError(path, `expected an array of strings, got ${describe(value)}`);
  }
  return value.map((item, i) => {
    if (typeof item !== "string" || item === "") {
      throw new PolicyError(`${path}[${i}]`, `expected a non-empty string, got ${describe(item)}`);
    }
    return item;
  });
}

function anyOrList(value: unknown, path: string): "*" | string[] {
  if (value === "*") return "*";
  if (!Array.isArray(value)) {
    throw new PolicyError(path, `expected "*" or an array of strings, got ${describe(value)}`);
  }
  return stringList(value, path);
}

function boolean(value: unknown, path: string): boolean {
  if (typeof value !== "boolean") {
    throw new PolicyError(path, `expected true or false, got ${describe(value)}`);
  }
  return value;
}

function parseExtraFields(value: unknown, path: string): ExtraFields {
  if (!isObject(value)) {
    throw new PolicyError(path, `expected an object, got ${describe(value)}`);
  }
  knownKeys(value, ["threadParams", "params"], path);
  const list = (where: "threadParams" | "params", known: Set<string>[]) => {
    if (value[where] === undefined) return [];
    const names = stringList(value[where], `${path}.${where}`);
    names.forEach((name, i) => {
      if (known.some((set) => set.has(name))) {
        throw new PolicyError(
          `${path}.${where}[${i}]`,
          `${JSON.stringify(name)} is a field the policy knows; it cannot be passed unchecked`,
        );
      }
    });
    return names;
  };
  return {
    threadParams: list("threadParams", [PLAIN_THREAD_FIELDS, CHECKED_THREAD_FIELDS]),
    params: list("params", [PLAIN_TURN_FIELDS, CHECKED_TURN_FIELDS]),
  };
}

function parseDefaults(value: unknown, path: string): PolicyDefaults {
  if (!isObject(value)) {
    throw new PolicyError(path, `expected an object, got ${describe(value)}`);
  }
  knownKeys(value, ["sandbox", "approvalPolicy"], path);
  const pick = <T extends string>(key: string, allowed: readonly T[], fallback: T | null) => {
    const item = value[key];
    if (item === undefined) return fallback;
    if (item === null || allowed.includes(item as T)) return item as T | null;
    throw new PolicyError(
      `${path}.${key}`,
      `expected null or one of ${quoted(allowed)}, got ${describe(item)}`,
    );
  };
  return {
    sandbox: pick(
      "sandbox",
      ["read-only", "workspace-write", "danger-full-access"] as const,
      DEFAULT_RULES.defaults.sandbox,
    ),
    approvalPolicy: pick(
      "approvalPolicy",
      ["untrusted", "on-request", "never"] as const,
      DEFAULT_RULES.defaults.approvalPolicy,
    ),
  };
}

function parseRules(value: unknown, path: string): CredentialRules {
  if (!isObject(value)) throw new PolicyError(path, `expected an object, got ${describe(value)}`);
  knownKeys(value, RULE_KEYS, path);
  const at = (key: string) => `${path}.${key}`;
  const rules: { -readonly [K in keyof CredentialRules]: CredentialRules[K] } = {
    ...DEFAULT_RULES,
  };
  if (value.sandbox !== undefined) {
    rules.sandbox = oneOfList(value.sandbox, SANDBOX_MODES, at("sandbox"));
  }
  if (value.approvalPolicy !== undefined) {
    rules.approvalPolicy = oneOfList(value.approvalPolicy, APPROVAL_POLICIES, at("approvalPolicy"));
  }
  if (value.approvalsReviewer !== undefined) {
    rules.approvalsReviewer = oneOfList(
      value.approvalsReviewer,
      APPROVALS_REVIEWERS,
      at("approvalsReviewer"),
    );
  }
  for (
    const key of ["network", "neverWithNetwork", "cwd", "writableRoots", "instructions"] as const
  ) {
    if (value[key] !== undefined) rules[key] = boolean(value[key], at(key));
  }
  for (const key of ["models", "modelProviders", "config"] as const) {
    if (value[key] !== undefined) rules[key] = anyOrList(value[key], at(key));
  }
  if (value.extraFields !== undefined) {
    rules.extraFields = parseExtraFields(value.extraFields, at("extraFields"));
  }
  if (value.defaults !== undefined) rules.defaults = parseDefaults(value.defaults, at("defaults"));
  return rules;
}

/**
 * Parses and validates a policy file:
 *
 * ```json
 * { "credentials": { "secret": { …rules }, "token": { …rules } } }
 * ```
 *
 * Each kind's rules are {@linkcode CredentialRules}; a kind or a key left out keeps its
 * {@linkcode DEFAULT_RULES} value. Validation is strict: an unknown key, a wrong type or an
 * unknown value is an error naming where it is.
 *
 * @example Let the operator's secret use any sandbox, keep tokens to the defaults
 * ```ts
 * import { parsePolicy } from "@codex-broker/broker";
 * import assert from "node:assert/strict";
 *
 * const policy = parsePolicy(JSON.stringify({
 *   credentials: {
 *     secret: { sandbox: ["read-only", "workspace-write", "danger-full-access"] },
 *   },
 * }));
 * assert.deepEqual(policy.credentials.token.sandbox, ["read-only", "workspace-write"]);
 * ```
 *
 * @param text The policy file's contents (JSON).
 * @returns The policy, every rule filled in.
 * @throws {PolicyError} If `text` is not JSON or breaks the format; `path` names the key.
 */
export function parsePolicy(text: string): Policy {
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (error) {
    throw new PolicyError("", `not valid JSON: ${(error as Error).message}`, { cause: error });
  }
  if (!isObject(value)) throw new PolicyError("", `expected an object, got ${describe(value)}`);
  knownKeys(value, ["credentials"], "");
  const credentials = value.credentials ?? {};
  if (!isObject(credentials)) {
    throw new PolicyError("credentials", `expected an object, got ${describe(credentials)}`);
  }
  knownKeys(credentials, CREDENTIAL_KINDS, "credentials");
  const rules = (kind: CredentialKind) =>
    credentials[kind] === undefined
      ? DEFAULT_RULES
      : parseRules(credentials[kind], `credentials.${kind}`);
  return { credentials: { secret: rules("secret"), token: rules("token") } };
}

/**
 * Resolves a path a caller gave (absolute, or relative to the workspace's directory) the
 * way the file system would, symlinks and `..` included, and answers the resolved absolute
 * path if it is the workspace's directory or inside it, else `undefined`.
 */
export type WorkspacePathResolver = (
  path: string,
  workspaceId: string,
) => Promise<string | undefined>;

/** Options for {@linkcode createParamsCheck}. */
export interface ParamsCheckOptions {
  /**
   * Resolves `cwd` and writable roots inside a workspace. Without it, a request that sets
   * either is refused: a path cannot be checked without the file system.
   */
  resolvePath?: WorkspacePathResolver;
}

/** The parts of a turn request the policy checks. */
export interface TurnParamsRequest {
  /** The thread continued, or `null`/absent when the request starts one. */
  threadId?: string | null;
  /** `turn/start` parameters (without `threadId`). */
  params: TurnParams;
  /** `thread/start` parameters. */
  threadParams?: ThreadStartParams;
}

/** Who asks, and for which workspace. */
export interface PolicyContext {
  /** The kind of credential the request carried. */
  credential: CredentialKind;
  /** The workspace the turn runs in. */
  workspaceId: string;
}

/**
 * The policy's answer: the parameters to send codex (paths resolved, defaults filled in),
 * or the field that is not allowed and why.
 */
export type PolicyVerdict =
  | { allowed: true; params: TurnParams; threadParams?: ThreadStartParams }
  | { allowed: false; field: string; message: string };

/** Checks a turn request against a policy; see {@linkcode createParamsCheck}. */
export type ParamsCheck = (
  request: TurnParamsRequest,
  context: PolicyContext,
) => Promise<PolicyVerdict>;

/** Thrown inside a check to refuse; turned into a verdict at the top. */
class Refused {
  readonly field: string;
  readonly message: string;
  constructor(field: string, message: string) {
    this.field = field;
    this.message = message;
  }
}

function allowedValue(list: "*" | readonly string[], value: string): boolean {
  return list === "*" || list.includes(value);
}

function approvalName(value: unknown): ApprovalPolicyName | undefined {
  if (value === "untrusted" || value === "on-request" || value === "never") return value;
  if (isObject(value) && isObject(value.granular) && Object.keys(value).length === 1) {
    return "granular";
  }
  return undefined;
}

// "never", and granular (which answers some approval kinds itself), run commands without
// asking anyone.
function unattended(name: ApprovalPolicyName | undefined): boolean {
  return name === "never" || name === "granular";
}

function networkOf(policy: Record<string, unknown>): boolean {
  if (policy.type === "dangerFullAccess") return true;
  return policy.networkAccess === true || policy.networkAccess === "enabled";
}

/**
 * Creates the check the handler runs on every turn request before anything reaches codex
 * (`TurnsHandlerOptions.checkParams`). It refuses, naming the field (e.g.
 * `threadParams.sandbox`, `params.sandboxPolicy.writableRoots[0]`):
 *
 * - a sandbox mode, approval policy, approvals reviewer, model or provider outside the
 *   rules of the caller's credential kind, or a value the policy does not recognize;
 * - network access when the rules forbid it, and `approvalPolicy: "never"` with network
 *   access unless `neverWithNetwork` (see {@linkcode CredentialRules.neverWithNetwork});
 * - a `cwd` or writable root when not allowed, or one that does not resolve inside the
 *   workspace's directory (symlinks followed); an allowed one is replaced by its resolved
 *   path, so codex gets the path that was checked;
 * - `config` keys not listed, instructions when not allowed;
 * - a field the policy does not know, unless listed in `extraFields`.
 *
 * When the request starts a thread, the rules' `defaults` fill in `sandbox` and
 * `approvalPolicy` left unset.
 *
 * @example Refuse a cwd outside the workspace
 * ```ts
 * import { createParamsCheck, DEFAULT_POLICY } from "@codex-broker/broker";
 * import assert from "node:assert/strict";
 *
 * const root = "/srv/workspaces/ws-1/work";
 * const check = createParamsCheck(DEFAULT_POLICY, {
 *   // A stand-in: the broker's own resolver follows symlinks on the file system.
 *   resolvePath: (path) => {
 *     const resolved = new URL(path, `file://${root}/`).pathname.replace(/\/$/, "");
 *     return Promise.resolve(
 *       resolved === root || resolved.startsWith(`${root}/`) ? resolved : undefined,
 *     );
 *   },
 * });
 * const input = [{ type: "text", text: "hi", text_elements: [] }];
 * const inside = await check(
 *   { threadId: null, threadParams: { cwd: "src" }, params: { input } },
 *   { credential: "token", workspaceId: "ws-1" },
 * );
 * assert.ok(inside.allowed && inside.threadParams?.cwd === `${root}/src`);
 * const outside = await check(
 *   { threadId: "t-1", params: { input, cwd: "../../ws-2/work" } },
 *   { credential: "token", workspaceId: "ws-1" },
 * );
 * assert.ok(!outside.allowed && outside.field === "params.cwd");
 * ```
 *
 * @param policy The policy, e.g. from {@linkcode parsePolicy} or {@linkcode DEFAULT_POLICY}.
 * @param options The path resolver.
 * @returns The check. It never rejects unless `resolvePath` does.
 */
export function createParamsCheck(policy: Policy, options: ParamsCheckOptions = {}): ParamsCheck {
  const { resolvePath } = options;

  async function insideWorkspace(
    path: unknown,
    field: string,
    workspaceId: string,
  ): Promise<string> {
    if (typeof path !== "string" || path === "") {
      throw new Refused(field, `Forbidden ${field}: expected a non-empty path`);
    }
    if (path.includes("\0")) throw new Refused(field, `Forbidden ${field}: a path holds no NUL`);
    if (!resolvePath) {
      throw new Refused(field, `Forbidden ${field}: this broker cannot check paths`);
    }
    const resolved = await resolvePath(path, workspaceId);
    if (resolved === undefined) {
      throw new Refused(
        field,
        `Forbidden ${field}: ${JSON.stringify(path)} resolves outside the workspace's directory`,
      );
    }
    return resolved;
  }

  function oneOf(value: unknown, allowed: "*" | readonly string[], field: string): void {
    if (typeof value !== "string" || !allowedValue(allowed, value)) {
      throw new Refused(
        field,
        `Forbidden ${field}: ${describe(value)} is not allowed${
          allowed === "*" ? "" : `; allowed: ${allowed.length ? quoted(allowed) : "none"}`
        }`,
      );
    }
  }

  function checkApproval(value: unknown, rules: CredentialRules, field: string): void {
    const name = approvalName(value);
    if (name === undefined || !rules.approvalPolicy.includes(name)) {
      const shown = name === "granular" ? "a granular policy" : describe(value);
      throw new Refused(
        field,
        `Forbidden ${field}: ${shown} is not allowed; allowed: ${
          rules.approvalPolicy.length ? quoted(rules.approvalPolicy) : "none"
        }`,
      );
    }
  }

  function unknownField(field: string): never {
    throw new Refused(
      field,
      `Forbidden ${field}: not a field the policy knows; only known fields reach codex`,
    );
  }

  /**
   * The fields of `params` that need a check, as `[key, value, field]`: plain fields (and
   * the extra ones the rules allow) pass as they are, an unknown field is refused, and a
   * null or absent value is codex's "unset".
   */
  function* checkedFields(
    params: object,
    fields: FieldSets,
    extra: readonly string[],
  ): Generator<[string, unknown, string]> {
    for (const [key, value] of Object.entries(params)) {
      const field = `${fields.prefix}.${key}`;
      if (fields.plain.has(key) || extra.includes(key)) continue;
      if (!fields.checked.has(key)) unknownField(field);
      if (value === null || value === undefined) continue;
      yield [key, value, field];
    }
  }

  /**
   * Checks a field that `thread/start` and `turn/start` share; `cwd` is rewritten in `out`
   * to the path that passed (codex gets exactly what was checked).
   *
   * @returns Whether `key` was one of them.
   */
  async function checkSharedField(
    key: string,
    value: unknown,
    field: string,
    rules: CredentialRules,
    workspaceId: string,
    out: Record<string, unknown>,
  ): Promise<boolean> {
    switch (key) {
      case "model":
        oneOf(value, rules.models, field);
        return true;
      case "cwd":
        if (!rules.cwd) throw new Refused(field, `Forbidden ${field}: callers may not set cwd`);
        out.cwd = await insideWorkspace(value, field, workspaceId);
        return true;
      case "approvalPolicy":
        checkApproval(value, rules, field);
        return true;
      case "approvalsReviewer":
        oneOf(value, rules.approvalsReviewer, field);
        return true;
    }
    return false;
  }

  async function checkThread(
    threadParams: ThreadStartParams,
    rules: CredentialRules,
    workspaceId: string,
  ): Promise<ThreadStartParams> {
    const out: ThreadStartParams = { ...threadParams };
    const shared = out as Record<string, unknown>;
    const extra = rules.extraFields.threadParams;
    for (const [key, value, field] of checkedFields(threadParams, THREAD_FIELDS, extra)) {
      if (await checkSharedField(key, value, field, rules, workspaceId, shared)) continue;
      switch (key) {
        case "modelProvider":
          oneOf(value, rules.modelProviders, field);
          break;
        case "sandbox":
          if (!THREAD_SANDBOX_MODES.includes(value as SandboxMode)) {
            throw new Refused(
              field,
              `Forbidden ${field}: ${describe(value)} is not a sandbox mode; expected one of ${
                quoted(THREAD_SANDBOX_MODES)
              }`,
            );
          }
          oneOf(value, rules.sandbox, field);
          if (value === "danger-full-access" && !rules.network) {
            throw new Refused(
              field,
              `Forbidden ${field}: "danger-full-access" has network access, which callers ` +
                `may not turn on`,
            );
          }
          break;
        case "config":
          if (!isObject(value)) {
            throw new Refused(field, `Forbidden ${field}: expected an object`);
          }
          for (const name of Object.keys(value)) {
            const list = rules.config;
            const parts = name.split(".");
            const listed = list === "*" ||
              parts.some((_, i) => list.includes(parts.slice(0, i + 1).join(".")));
            if (!listed) {
              throw new Refused(
                `${field}.${name}`,
                `Forbidden ${field}.${name}: configuration key not allowed`,
              );
            }
          }
          break;
        case "baseInstructions":
        case "developerInstructions":
          if (!rules.instructions) {
            throw new Refused(field, `Forbidden ${field}: callers may not set instructions`);
          }
          break;
      }
    }
    return out;
  }

  async function checkSandboxPolicy(
    value: unknown,
    rules: CredentialRules,
    workspaceId: string,
  ): Promise<Record<string, unknown>> {
    const field = "params.sandboxPolicy";
    if (!isObject(value)) throw new Refused(field, `Forbidden ${field}: expected an object`);
    const kind = typeof value.type === "string"
      ? Object.hasOwn(SANDBOX_POLICY_TYPES, value.type)
        ? SANDBOX_POLICY_TYPES[value.type]
        : undefined
      : undefined;
    if (kind === undefined) {
      throw new Refused(
        `${field}.type`,
        `Forbidden ${field}.type: ${describe(value.type)} is not a sandbox policy type`,
      );
    }
    if (!rules.sandbox.includes(kind.mode)) {
      throw new Refused(
        `${field}.type`,
        `Forbidden ${field}.type: ${JSON.stringify(value.type)} (${kind.mode}) is not allowed; ` +
          `allowed: ${rules.sandbox.length ? quoted(rules.sandbox) : "none"}`,
      );
    }
    for (const key of Object.keys(value)) {
      if (!kind.keys.includes(key)) unknownField(`${field}.${key}`);
    }
    const network = value.networkAccess;
    if (network !== undefined && network !== null) {
      const valid = value.type === "externalSandbox"
        ? network === "restricted" || network === "enabled"
        : typeof network === "boolean";
      if (!valid) {
        throw new Refused(
          `${field}.networkAccess`,
          `Forbidden ${field}.networkAccess: ${describe(network)} is not a valid value`,
        );
      }
    }
    if (networkOf(value) && !rules.network) {
      const at = value.type === "dangerFullAccess" ? `${field}.type` : `${field}.networkAccess`;
      throw new Refused(at, `Forbidden ${at}: callers may not turn network access on`);
    }
    const out = { ...value };
    const roots = value.writableRoots;
    if (roots !== undefined && roots !== null) {
      const at = `${field}.writableRoots`;
      if (!Array.isArray(roots)) throw new Refused(at, `Forbidden ${at}: expected an array`);
      if (roots.length > 0 && !rules.writableRoots) {
        throw new Refused(at, `Forbidden ${at}: callers may not add writable roots`);
      }
      const resolved: string[] = [];
      for (const [i, root] of roots.entries()) {
        resolved.push(await insideWorkspace(root, `${at}[${i}]`, workspaceId));
      }
      out.writableRoots = resolved;
    }
    return out;
  }

  async function checkTurn(
    params: TurnParams,
    rules: CredentialRules,
    workspaceId: string,
  ): Promise<TurnParams> {
    const out: TurnParams = { ...params };
    const shared = out as Record<string, unknown>;
    const extra = rules.extraFields.params;
    for (const [key, value, field] of checkedFields(params, TURN_FIELDS, extra)) {
      if (await checkSharedField(key, value, field, rules, workspaceId, shared)) continue;
      switch (key) {
        case "sandboxPolicy":
          out.sandboxPolicy = await checkSandboxPolicy(value, rules, workspaceId);
          break;
        case "threadId":
          // The handler refuses it first; here for a check used on its own.
          throw new Refused(field, `Forbidden ${field}: the thread is chosen at the top level`);
      }
    }
    return out;
  }

  /**
   * `approvalPolicy: "never"` with network access. A thread keeps what earlier turns set,
   * which the broker does not know on a continued thread: a request that turns one on must
   * show, in itself, that the other is off.
   */
  function checkNeverWithNetwork(
    starting: boolean,
    threadParams: ThreadStartParams | undefined,
    params: TurnParams,
  ): void {
    const setByTurn = params.approvalPolicy ?? undefined;
    const setByThread = starting ? threadParams?.approvalPolicy ?? undefined : undefined;
    // What the thread's approval policy is once this turn starts, if known.
    const approval = setByTurn !== undefined
      ? approvalName(setByTurn)
      : setByThread !== undefined
      ? approvalName(setByThread)
      : undefined;
    const approvalKnown = setByTurn !== undefined || setByThread !== undefined;
    const sandboxPolicy = isObject(params.sandboxPolicy) ? params.sandboxPolicy : undefined;
    const threadNetwork = starting && threadParams?.sandbox === "danger-full-access";
    const network = sandboxPolicy !== undefined
      ? networkOf(sandboxPolicy)
      : starting
      ? threadNetwork
      : undefined;
    const advice = 'approvalPolicy "never" (or granular) may not come with network access';
    if (approvalKnown && unattended(approval) && network !== false) {
      const field = setByTurn !== undefined
        ? "params.approvalPolicy"
        : "threadParams.approvalPolicy";
      throw new Refused(
        field,
        `Forbidden ${field}: ${advice}` +
          (network === undefined
            ? "; on a continued thread, send a sandboxPolicy without network access in the same params"
            : ""),
      );
    }
    if (network === true && (!approvalKnown || unattended(approval))) {
      const field = sandboxPolicy === undefined
        ? "threadParams.sandbox"
        : sandboxPolicy.type === "dangerFullAccess"
        ? "params.sandboxPolicy.type"
        : "params.sandboxPolicy.networkAccess";
      throw new Refused(
        field,
        `Forbidden ${field}: ${advice}` +
          (approvalKnown ? "" : '; send an approvalPolicy other than "never" in the same params'),
      );
    }
  }

  return async function checkParams(request, context) {
    const rules = policy.credentials[context.credential];
    const starting = request.threadId === null || request.threadId === undefined;
    try {
      const threadParams = request.threadParams === undefined
        ? undefined
        : await checkThread(request.threadParams, rules, context.workspaceId);
      const params = await checkTurn(request.params, rules, context.workspaceId);
      let filled = threadParams;
      if (starting) {
        filled = { ...threadParams };
        const config = isObject(filled.config) ? filled.config : {};
        const { sandbox, approvalPolicy } = rules.defaults;
        // A caller allowed to set these through config keeps them.
        if ((filled.sandbox ?? null) === null && sandbox !== null && !("sandbox_mode" in config)) {
          filled.sandbox = sandbox;
        }
        if (
          (filled.approvalPolicy ?? null) === null && approvalPolicy !== null &&
          !("approval_policy" in config)
        ) {
          filled.approvalPolicy = approvalPolicy;
        }
      }
      if (!rules.neverWithNetwork) checkNeverWithNetwork(starting, filled, params);
      return filled === undefined ? { allowed: true, params } : {
        allowed: true,
        params,
        threadParams: filled,
      };
    } catch (error) {
      if (error instanceof Refused) {
        return { allowed: false, field: error.field, message: error.message };
      }
      throw error;
    }
  };
}

// The policy on what callers may ask of codex: parsing the policy file, each rule of the
// check, and resolving paths inside a workspace with real symlinks.
import { test } from "./_test.ts";
import assert from "node:assert/strict";
import { mkdir, mkdtemp, realpath, rm, symlink, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import {
  createParamsCheck,
  type CredentialKind,
  DEFAULT_POLICY,
  DEFAULT_RULES,
  type ParamsCheck,
  parsePolicy,
  type Policy,
  PolicyError,
  type PolicyVerdict,
  type TurnParamsRequest,
  type WorkspacePathResolver,
} from "../mod.ts";
import { parseFlags, UsageError } from "../src/main.ts";
import { resolvePhysically, workspacePathResolver } from "../src/_workspace_path.ts";
import { childEnv, spawnBroker } from "./_broker_process.ts";

const input = [{ type: "text", text: "hi", text_elements: [] }];
const ROOT = "/srv/ws/ws-1/work";

/** A lexical stand-in for the file system resolver: enough for the rules that are not paths. */
const lexical: WorkspacePathResolver = (path) => {
  const resolved = new URL(path, `file://${ROOT}/`).pathname.replace(/\/$/, "");
  return Promise.resolve(
    resolved === ROOT || resolved.startsWith(`${ROOT}/`) ? resolved : undefined,
  );
};

function checkWith(policy: Policy = DEFAULT_POLICY): ParamsCheck {
  return createParamsCheck(policy, { resolvePath: lexical });
}

function run(
  check: ParamsCheck,
  request: Partial<TurnParamsRequest>,
  credential: CredentialKind = "token",
): Promise<PolicyVerdict> {
  return check({ threadId: null, params: { input }, ...request }, {
    credential,
    workspaceId: "ws-1",
  });
}

function refusedAt(verdict: PolicyVerdict, field: string): void {
  assert.equal(verdict.allowed, false, `expected a refusal at ${field}`);
  if (!verdict.allowed) {
    assert.equal(verdict.field, field);
    assert.match(verdict.message, new RegExp(`^Forbidden ${field.replace(/[.[\]]/g, "\\$&")}: `));
  }
}

function allowed(verdict: PolicyVerdict): Extract<PolicyVerdict, { allowed: true }> {
  assert.ok(verdict.allowed, verdict.allowed ? "" : verdict.message);
  return verdict;
}

function policyOf(rules: Record<string, unknown>, kind: CredentialKind = "token"): Policy {
  return parsePolicy(JSON.stringify({ credentials: { [kind]: rules } }));
}

// --- parsing the policy file -----------------------------------------------------------

test("parsePolicy() fills every kind and key left out with the defaults", () => {
  assert.deepEqual(parsePolicy("{}"), DEFAULT_POLICY);
  const policy = parsePolicy(JSON.stringify({
    credentials: { secret: { sandbox: ["danger-full-access"], models: ["gpt-5"] } },
  }));
  assert.deepEqual(policy.credentials.secret, {
    ...DEFAULT_RULES,
    sandbox: ["danger-full-access"],
    models: ["gpt-5"],
  });
  assert.deepEqual(policy.credentials.token, DEFAULT_RULES);
});

test("parsePolicy() reads every key of the format", () => {
  const rules = {
    sandbox: ["read-only", "workspace-write", "danger-full-access", "external-sandbox"],
    approvalPolicy: ["untrusted", "on-request", "never", "granular"],
    approvalsReviewer: ["user", "auto_review"],
    network: false,
    neverWithNetwork: true,
    models: "*",
    modelProviders: ["openai"],
    cwd: false,
    writableRoots: false,
    instructions: false,
    config: ["model_reasoning_effort"],
    extraFields: { threadParams: ["historyMode"], params: ["additionalContext"] },
    defaults: { sandbox: "workspace-write", approvalPolicy: null },
  };
  assert.deepEqual(policyOf(rules, "secret").credentials.secret, rules);
});

test("parsePolicy() refuses a bad file with a PolicyError naming the path and the key", () => {
  const cases: [string, string, RegExp][] = [
    ["{", "", /not valid JSON/],
    ["[]", "", /expected an object, got an array/],
    ['{"credential":{}}', "credential", /unknown key; expected one of "credentials"/],
    ['{"credentials":[]}', "credentials", /expected an object/],
    ['{"credentials":{"user":{}}}', "credentials.user", /unknown key/],
    ['{"credentials":{"token":true}}', "credentials.token", /expected an object/],
    ['{"credentials":{"token":{"sandboxes":[]}}}', "credentials.token.sandboxes", /unknown key/],
    [
      '{"credentials":{"token":{"sandbox":["read-only","full"]}}}',
      "credentials.token.sandbox[1]",
      /expected one of "read-only", .*, got "full"/,
    ],
    ['{"credentials":{"token":{"sandbox":"read-only"}}}', "credentials.token.sandbox", /array/],
    [
      '{"credentials":{"secret":{"approvalPolicy":["always"]}}}',
      "credentials.secret.approvalPolicy[0]",
      /got "always"/,
    ],
    ['{"credentials":{"token":{"cwd":"yes"}}}', "credentials.token.cwd", /expected true or false/],
    ['{"credentials":{"token":{"network":1}}}', "credentials.token.network", /true or false/],
    ['{"credentials":{"token":{"models":"gpt-5"}}}', "credentials.token.models", /"\*" or/],
    ['{"credentials":{"token":{"models":[""]}}}', "credentials.token.models[0]", /non-empty/],
    ['{"credentials":{"token":{"config":[1]}}}', "credentials.token.config[0]", /non-empty/],
    [
      '{"credentials":{"token":{"extraFields":{"params":["sandboxPolicy"]}}}}',
      "credentials.token.extraFields.params[0]",
      /a field the policy knows/,
    ],
    [
      '{"credentials":{"token":{"extraFields":{"turn":[]}}}}',
      "credentials.token.extraFields.turn",
      /unknown key/,
    ],
    [
      '{"credentials":{"token":{"defaults":{"sandbox":"external-sandbox"}}}}',
      "credentials.token.defaults.sandbox",
      /expected null or one of/,
    ],
  ];
  for (const [text, path, reason] of cases) {
    assert.throws(
      () => parsePolicy(text),
      (error: unknown) => {
        assert.ok(error instanceof PolicyError, text);
        assert.equal(error.name, "PolicyError");
        assert.equal(error.path, path, text);
        assert.match(error.reason, reason, text);
        assert.match(error.message, /^Invalid policy/);
        return true;
      },
    );
  }
});

// --- the rules --------------------------------------------------------------------------

test("the default policy fills in read-only and on-request for a new thread, and nothing for a continued one", async () => {
  const check = checkWith();
  const started = allowed(await run(check, {}));
  assert.deepEqual(started.threadParams, { sandbox: "read-only", approvalPolicy: "on-request" });
  assert.deepEqual(started.params, { input });
  const chosen = allowed(
    await run(check, { threadParams: { sandbox: "workspace-write", approvalPolicy: "never" } }),
  );
  assert.deepEqual(chosen.threadParams, { sandbox: "workspace-write", approvalPolicy: "never" });
  const continued = allowed(await run(check, { threadId: "thr-1" }));
  assert.equal(continued.threadParams, undefined);
});

test("defaults of null leave sandbox and approvalPolicy to the codex configuration", async () => {
  const check = checkWith(policyOf({ defaults: { sandbox: null, approvalPolicy: null } }));
  assert.deepEqual(allowed(await run(check, {})).threadParams, {});
});

test("the default policy refuses danger-full-access, external sandboxes and granular approvals", async () => {
  const check = checkWith();
  refusedAt(
    await run(check, { threadParams: { sandbox: "danger-full-access" } }),
    "threadParams.sandbox",
  );
  refusedAt(
    await run(check, { threadParams: { sandbox: "external-sandbox" } }),
    "threadParams.sandbox",
  );
  refusedAt(
    await run(check, { params: { input, sandboxPolicy: { type: "dangerFullAccess" } } }),
    "params.sandboxPolicy.type",
  );
  refusedAt(
    await run(check, { params: { input, sandboxPolicy: { type: "externalSandbox" } } }),
    "params.sandboxPolicy.type",
  );
  refusedAt(
    await run(check, {
      params: {
        input,
        approvalPolicy: {
          granular: { mcp_elicitations: true, rules: true, sandbox_approval: false },
        },
      },
    }),
    "params.approvalPolicy",
  );
});

test("a policy can allow what the defaults refuse, per credential kind", async () => {
  const check = checkWith(
    policyOf({ sandbox: ["danger-full-access"], approvalPolicy: ["untrusted"] }, "secret"),
  );
  const body = { threadParams: { sandbox: "danger-full-access", approvalPolicy: "untrusted" } };
  allowed(await run(check, body, "secret"));
  refusedAt(await run(check, body, "token"), "threadParams.sandbox");
  refusedAt(
    await run(check, { threadParams: { approvalPolicy: "on-request" } }, "secret"),
    "threadParams.approvalPolicy",
  );
});

test("values the policy does not recognize are refused, null is unset", async () => {
  const check = checkWith();
  refusedAt(await run(check, { threadParams: { sandbox: "yolo" } }), "threadParams.sandbox");
  refusedAt(await run(check, { threadParams: { sandbox: 1 as never } }), "threadParams.sandbox");
  refusedAt(
    await run(check, { params: { input, approvalPolicy: "NEVER" } }),
    "params.approvalPolicy",
  );
  refusedAt(
    await run(check, { params: { input, sandboxPolicy: { type: "fullAccess" } } }),
    "params.sandboxPolicy.type",
  );
  refusedAt(
    await run(check, {
      params: { input, sandboxPolicy: { type: "workspaceWrite", networkAccess: "yes" } },
    }),
    "params.sandboxPolicy.networkAccess",
  );
  refusedAt(
    await run(check, { params: { input, sandboxPolicy: { type: "readOnly", access: "full" } } }),
    "params.sandboxPolicy.access",
  );
  const unset = allowed(
    await run(check, {
      threadParams: { sandbox: null as never, cwd: null as never, config: null },
      params: { input, sandboxPolicy: null, approvalPolicy: null, model: null },
    }),
  );
  assert.equal(unset.threadParams?.sandbox, "read-only");
});

test("models, providers and reviewers are checked against their lists", async () => {
  const check = checkWith(policyOf({
    models: ["gpt-5"],
    modelProviders: ["openai"],
    approvalsReviewer: ["user"],
  }));
  allowed(await run(check, { threadParams: { model: "gpt-5", modelProvider: "openai" } }));
  refusedAt(await run(check, { threadParams: { model: "o3" } }), "threadParams.model");
  refusedAt(await run(check, { params: { input, model: "o3" } }), "params.model");
  refusedAt(
    await run(check, { threadParams: { modelProvider: "ollama" } }),
    "threadParams.modelProvider",
  );
  refusedAt(
    await run(check, { params: { input, approvalsReviewer: "auto_review" } }),
    "params.approvalsReviewer",
  );
  allowed(await run(checkWith(), { threadParams: { model: "anything" } }));
});

test("config overrides are refused unless their key or a dotted prefix of it is listed", async () => {
  refusedAt(
    await run(checkWith(), { threadParams: { config: { sandbox_mode: "danger-full-access" } } }),
    "threadParams.config.sandbox_mode",
  );
  const check = checkWith(policyOf({ config: ["tools", "model_reasoning_effort"] }));
  allowed(
    await run(check, {
      threadParams: { config: { "tools.web_search": true, model_reasoning_effort: "high" } },
    }),
  );
  refusedAt(
    await run(check, { threadParams: { config: { "tool": 1 } } }),
    "threadParams.config.tool",
  );
  refusedAt(
    await run(check, {
      threadParams: { config: { "sandbox_workspace_write.writable_roots": ["/"] } },
    }),
    "threadParams.config.sandbox_workspace_write.writable_roots",
  );
  refusedAt(
    await run(check, { threadParams: { config: "sandbox_mode=danger-full-access" } }),
    "threadParams.config",
  );
});

test("a config that sets sandbox_mode or approval_policy keeps the default from being filled in", async () => {
  const check = checkWith(policyOf({ config: ["sandbox_mode", "approval_policy"] }));
  const verdict = allowed(
    await run(check, {
      threadParams: { config: { sandbox_mode: "workspace-write", approval_policy: "untrusted" } },
    }),
  );
  assert.equal(verdict.threadParams?.sandbox, undefined);
  assert.equal(verdict.threadParams?.approvalPolicy, undefined);
});

test("instructions are allowed by default and refused when the rules say so", async () => {
  const body = { threadParams: { baseInstructions: "x", developerInstructions: "y" } };
  allowed(await run(checkWith(), body));
  refusedAt(
    await run(checkWith(policyOf({ instructions: false })), body),
    "threadParams.baseInstructions",
  );
});

test("fields the policy does not know are refused unless listed in extraFields", async () => {
  const check = checkWith();
  refusedAt(
    await run(check, { threadParams: { runtimeWorkspaceRoots: ["/"] } }),
    "threadParams.runtimeWorkspaceRoots",
  );
  refusedAt(
    await run(check, { threadParams: { permissions: "full" } }),
    "threadParams.permissions",
  );
  refusedAt(
    await run(check, { params: { input, environments: [{ cwd: "/", environmentId: "e" }] } }),
    "params.environments",
  );
  refusedAt(
    await run(check, { params: { input, disabledPluginIds: [] } }),
    "params.disabledPluginIds",
  );
  const plain = allowed(
    await run(check, {
      threadParams: { ephemeral: true, personality: "none", serviceName: "svc" },
      params: { input, effort: "high", summary: "auto", outputSchema: { type: "object" } },
    }),
  );
  assert.equal(plain.params.effort, "high");
  const extra = checkWith(policyOf({ extraFields: { params: ["disabledPluginIds"] } }));
  allowed(await run(extra, { params: { input, disabledPluginIds: [] } }));
});

test("approvalPolicy never with network access is refused, also across turns of a thread", async () => {
  const check = checkWith();
  const network = { type: "workspaceWrite", networkAccess: true };
  // A new thread: both are known from the request.
  refusedAt(
    await run(check, {
      threadParams: { approvalPolicy: "never" },
      params: { input, sandboxPolicy: network },
    }),
    "threadParams.approvalPolicy",
  );
  refusedAt(
    await run(check, { params: { input, approvalPolicy: "never", sandboxPolicy: network } }),
    "params.approvalPolicy",
  );
  allowed(await run(check, { threadParams: { approvalPolicy: "never" } }));
  allowed(await run(check, { params: { input, sandboxPolicy: network } }));
  refusedAt(
    await run(check, {
      threadParams: { sandbox: "danger-full-access", approvalPolicy: "never" },
    }, "token"),
    "threadParams.sandbox",
  );
  // A continued thread: what earlier turns set is unknown, so the request must show it.
  refusedAt(
    await run(check, { threadId: "thr-1", params: { input, approvalPolicy: "never" } }),
    "params.approvalPolicy",
  );
  refusedAt(
    await run(check, { threadId: "thr-1", params: { input, sandboxPolicy: network } }),
    "params.sandboxPolicy.networkAccess",
  );
  allowed(
    await run(check, {
      threadId: "thr-1",
      params: { input, approvalPolicy: "never", sandboxPolicy: { type: "readOnly" } },
    }),
  );
  allowed(
    await run(check, {
      threadId: "thr-1",
      params: { input, approvalPolicy: "on-request", sandboxPolicy: network },
    }),
  );
  // With no default approval policy, a new thread's is unknown too.
  refusedAt(
    await run(checkWith(policyOf({ defaults: { approvalPolicy: null } })), {
      params: { input, sandboxPolicy: network },
    }),
    "params.sandboxPolicy.networkAccess",
  );
  allowed(
    await run(checkWith(policyOf({ neverWithNetwork: true })), {
      threadId: "thr-1",
      params: { input, approvalPolicy: "never", sandboxPolicy: network },
    }),
  );
});

test("network access is refused when the rules forbid it, danger-full-access included", async () => {
  const check = checkWith(
    policyOf({ network: false, sandbox: ["workspace-write", "danger-full-access"] }),
  );
  refusedAt(
    await run(check, {
      params: {
        input,
        approvalPolicy: "untrusted",
        sandboxPolicy: { type: "workspaceWrite", networkAccess: true },
      },
    }),
    "params.sandboxPolicy.networkAccess",
  );
  refusedAt(
    await run(check, { threadParams: { sandbox: "danger-full-access" } }),
    "threadParams.sandbox",
  );
  allowed(
    await run(check, {
      params: { input, sandboxPolicy: { type: "workspaceWrite", networkAccess: false } },
    }),
  );
});

test("cwd and writable roots are resolved inside the workspace, or refused", async () => {
  const check = checkWith();
  const verdict = allowed(
    await run(check, {
      threadParams: { cwd: "src" },
      params: {
        input,
        cwd: `${ROOT}/lib`,
        sandboxPolicy: { type: "workspaceWrite", writableRoots: ["out", ROOT] },
      },
    }),
  );
  assert.equal(verdict.threadParams?.cwd, `${ROOT}/src`);
  assert.equal(verdict.params.cwd, `${ROOT}/lib`);
  assert.deepEqual((verdict.params.sandboxPolicy as { writableRoots: string[] }).writableRoots, [
    `${ROOT}/out`,
    ROOT,
  ]);
  refusedAt(await run(check, { threadParams: { cwd: "/" } }), "threadParams.cwd");
  refusedAt(await run(check, { params: { input, cwd: "../x" } }), "params.cwd");
  refusedAt(await run(check, { params: { input, cwd: "" } }), "params.cwd");
  refusedAt(await run(check, { params: { input, cwd: 7 } }), "params.cwd");
  refusedAt(
    await run(check, {
      params: { input, sandboxPolicy: { type: "workspaceWrite", writableRoots: ["out", "/"] } },
    }),
    "params.sandboxPolicy.writableRoots[1]",
  );
  const closed = checkWith(policyOf({ cwd: false, writableRoots: false }));
  refusedAt(await run(closed, { threadParams: { cwd: "src" } }), "threadParams.cwd");
  refusedAt(
    await run(closed, {
      params: { input, sandboxPolicy: { type: "workspaceWrite", writableRoots: ["out"] } },
    }),
    "params.sandboxPolicy.writableRoots",
  );
  // Without a resolver a path cannot be checked.
  refusedAt(
    await run(createParamsCheck(DEFAULT_POLICY), { threadParams: { cwd: "src" } }),
    "threadParams.cwd",
  );
});

// --- resolving paths on the file system -------------------------------------------------

async function withTree(fn: (dir: string) => Promise<void>): Promise<void> {
  const dir = await realpath(await mkdtemp(join(tmpdir(), "policy-test-")));
  try {
    await mkdir(join(dir, "ws-1", "work", "sub"), { recursive: true });
    await mkdir(join(dir, "ws-2", "work"), { recursive: true });
    await symlink(join(dir, "ws-2", "work"), join(dir, "ws-1", "work", "escape"));
    await symlink("sub", join(dir, "ws-1", "work", "inner"));
    await symlink("loop", join(dir, "ws-1", "work", "loop"));
    await writeFile(join(dir, "ws-1", "work", "file"), "");
    await fn(dir);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

test("resolvePhysically() follows symlinks, then .., the way the kernel does", async () => {
  await withTree(async (dir) => {
    const work = join(dir, "ws-1", "work");
    assert.equal(await resolvePhysically(`${work}/inner`), `${work}/sub`);
    assert.equal(await resolvePhysically(`${work}/escape`), join(dir, "ws-2", "work"));
    // `escape/..` is the parent of escape's target, not the work directory.
    assert.equal(await resolvePhysically(`${work}/escape/..`), join(dir, "ws-2"));
    assert.equal(await resolvePhysically(`${work}/new/deeper`), `${work}/new/deeper`);
    assert.equal(await resolvePhysically(`${work}/new/../escape`), join(dir, "ws-2", "work"));
    assert.equal(await resolvePhysically(`${work}/file/x`), `${work}/file/x`);
    assert.equal(await resolvePhysically(`${work}/loop`), undefined);
    assert.equal(await resolvePhysically("/"), "/");
  });
});

test("workspacePathResolver() accepts paths inside the work directory only, however written", async () => {
  await withTree(async (dir) => {
    const resolve = workspacePathResolver((id) => join(dir, id, "work"));
    const work = join(dir, "ws-1", "work");
    const inside: [string, string][] = [
      [".", work],
      ["sub", `${work}/sub`],
      ["inner/x", `${work}/sub/x`],
      [`${work}/sub/../sub`, `${work}/sub`],
      ["new/dir", `${work}/new/dir`],
    ];
    for (const [path, expected] of inside) {
      assert.equal(await resolve(path, "ws-1"), expected, path);
    }
    await mkdir(join(dir, "ws-1", "work-evil"));
    for (
      const path of [
        "/",
        "..",
        "../../ws-2/work",
        `${work}/../../ws-2/work`,
        "escape",
        "escape/new",
        "sub/../escape/..",
        "new/../escape",
        "loop",
        `${work}-evil`,
        "../work-evil",
      ]
    ) {
      assert.equal(await resolve(path, "ws-1"), undefined, path);
    }
  });
});

test("workspacePathResolver() resolves a work directory that is itself behind a symlink, or not created yet", async () => {
  await withTree(async (dir) => {
    await symlink(join(dir, "ws-1"), join(dir, "alias"));
    const viaAlias = workspacePathResolver(() => join(dir, "alias", "work"));
    assert.equal(await viaAlias("sub", "ws-1"), join(dir, "ws-1", "work", "sub"));
    assert.equal(
      await viaAlias(join(dir, "ws-1", "work", "sub"), "ws-1"),
      join(dir, "ws-1", "work", "sub"),
    );
    const fresh = workspacePathResolver((id) => join(dir, id, "work"));
    assert.equal(await fresh("a", "ws-3"), join(dir, "ws-3", "work", "a"));
    assert.equal(await fresh("../../ws-1/work", "ws-3"), undefined);
  });
});

// --- the --policy flag ------------------------------------------------------------------

test("parseFlags() reads --policy into the broker's options", async () => {
  const dir = await mkdtemp(join(tmpdir(), "policy-flag-"));
  try {
    const file = join(dir, "policy.json");
    await writeFile(file, JSON.stringify({ credentials: { token: { cwd: false } } }));
    const parsed = parseFlags(["--policy", file], { BROKER_SECRET: "from-env" });
    assert.ok(!parsed.help);
    assert.equal(parsed.options.policy?.credentials.token.cwd, false);
    assert.deepEqual(parsed.options.policy?.credentials.secret, DEFAULT_RULES);
    assert.throws(
      () => parseFlags(["--policy", join(dir, "missing.json")], { BROKER_SECRET: "x" }),
      (error: unknown) =>
        error instanceof UsageError && /^Invalid --policy ".*missing\.json": cannot read it/.test(
          error.message,
        ),
    );
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test("src/main.ts exits 2 with a message naming the file and the key for a bad --policy", {
  timeout: 60_000,
}, async () => {
  const dir = await mkdtemp(join(tmpdir(), "policy-flag-"));
  try {
    const file = join(dir, "policy.json");
    await writeFile(file, JSON.stringify({ credentials: { token: { sandbox: ["all"] } } }));
    const broker = spawnBroker(["--port", "0", "--policy", file], childEnv());
    assert.deepEqual(await broker.status, { code: 2, signal: null });
    const output = broker.lines.join("\n");
    assert.ok(
      output.includes(
        `Invalid --policy ${JSON.stringify(file)}: credentials.token.sandbox[0]: expected one of`,
      ),
      output,
    );
    assert.equal(output.includes('"msg":"listening"'), false);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

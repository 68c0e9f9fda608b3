// The attack corpus of the policy, at the REST front: each request that tries to widen what
// codex may do (a cwd out of the workspace, symlinks included; sandbox and approval
// escalation; fields the policy does not know) is answered 403 forbiddenParam naming the
// field, and the app-server sees nothing. Paths are resolved on a real directory tree.
import { test } from "./_test.ts";
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { mkdir, mkdtemp, realpath, rm, symlink } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import {
  createParamsCheck,
  createTokenVerifier,
  DEFAULT_POLICY,
  parsePolicy,
  type Policy,
  Pool,
} from "../mod.ts";
import { SignJWT } from "jose";
import { createTurnsHandler } from "../src/handler.ts";
import { startBroker } from "../src/main.ts";
import { workspacePathResolver } from "../src/_workspace_path.ts";
import { codexLike, type FakeAppServer, startFakeAppServer } from "./_fake_app_server.ts";
import { codelessBroker } from "./_codeless_broker.ts";

const SECRET = "test-secret-0123456789";
const input = [{ type: "text", text: "hi", text_elements: [] }];

interface Setup {
  dir: string;
  work: string;
  server: FakeAppServer;
  pool: Pool;
  handler: (request: Request) => Promise<Response>;
  logs: Record<string, unknown>[];
}

/**
 * A handler with the policy over a fake app-server, and a workspaces tree:
 * `ws-1/work/{sub, escape -> ws-2/work, rel -> ../../ws-2/work, root -> /, inner -> sub,
 * loop -> loop}`, `ws-1/work-evil/`, `ws-2/work/`.
 */
async function withSetup(
  policy: Policy,
  fn: (setup: Setup) => Promise<void>,
  options: { jwtSecret?: string } = {},
): Promise<void> {
  const dir = await realpath(await mkdtemp(join(tmpdir(), "policy-attack-")));
  const work = join(dir, "ws-1", "work");
  await mkdir(join(work, "sub"), { recursive: true });
  await mkdir(join(dir, "ws-1", "work-evil"));
  await mkdir(join(dir, "ws-2", "work"), { recursive: true });
  await symlink(join(dir, "ws-2", "work"), join(work, "escape"));
  await symlink("../../ws-2/work", join(work, "rel"));
  await symlink("/", join(work, "root"));
  await symlink("sub", join(work, "inner"));
  await symlink("loop", join(work, "loop"));
  const server = await startFakeAppServer((peer) => codexLike(peer));
  const pool = new Pool(() => Promise.resolve(server.url));
  const logs: Record<string, unknown>[] = [];
  const handler = createTurnsHandler(pool, {
    secret: SECRET,
    log: (entry) => logs.push(entry),
    ...(options.jwtSecret === undefined
      ? {}
      : { tokens: createTokenVerifier({ secret: new TextEncoder().encode(options.jwtSecret) }) }),
    checkParams: createParamsCheck(policy, {
      resolvePath: workspacePathResolver((id) => join(dir, id, "work")),
    }),
  });
  try {
    await fn({ dir, work, server, pool, handler, logs });
  } finally {
    await pool.close();
    await server.close();
    await rm(dir, { recursive: true, force: true });
  }
}

function post(body: Record<string, unknown>, token?: string): Request {
  return new Request("http://broker.test/api/turns", {
    method: "POST",
    headers: {
      "content-type": "application/json",
      ...(token === undefined
        ? { "x-internal-secret": SECRET }
        : { authorization: `Bearer ${token}` }),
    },
    body: JSON.stringify({ workspaceId: "ws-1", params: { input }, ...body }),
  });
}

async function assertForbidden(
  setup: Setup,
  body: Record<string, unknown>,
  field: string,
): Promise<void> {
  const what = `${JSON.stringify(body)} → ${field}`;
  const response = await setup.handler(post(body));
  assert.equal(response.status, 403, what);
  assert.equal(response.headers.get("content-type"), "application/json");
  const { error } = await response.json();
  assert.equal(error.code, "forbiddenParam", what);
  assert.equal(error.field, field, what);
  assert.ok(error.message.startsWith(`Forbidden ${field}: `), error.message);
  assert.equal(setup.server.peers.length, 0, `${what}: the app-server saw a connection`);
  assert.equal(setup.pool.size, 0);
  const entry = setup.logs.at(-1);
  assert.deepEqual(entry, {
    msg: "bad request",
    status: 403,
    code: "forbiddenParam",
    principal: "operator",
    field,
  });
}

const continued = { threadId: "thr-1" };
const network = { type: "workspaceWrite", networkAccess: true };

test("cwd traversal through threadParams and params is refused with 403 forbiddenParam, symlinks included, and nothing reaches codex", async () => {
  await withSetup(DEFAULT_POLICY, async (setup) => {
    const { dir, work } = setup;
    const cwds: string[] = [
      "/",
      "/etc",
      "..",
      "../../ws-2/work",
      `${work}/../../ws-2/work`,
      join(dir, "ws-2", "work"),
      `${dir}/ws-1/work-evil`,
      "../work-evil",
      "escape",
      "escape/new-dir",
      "rel",
      "root/etc",
      "sub/../escape/..",
      "not-yet/../escape",
      "inner/../../..",
      "loop",
      "",
      "sub\0/../../..",
    ];
    for (const cwd of cwds) {
      await assertForbidden(setup, { threadParams: { cwd } }, "threadParams.cwd");
      await assertForbidden(setup, { ...continued, params: { input, cwd } }, "params.cwd");
    }
    await assertForbidden(
      setup,
      { params: { input, sandboxPolicy: { type: "workspaceWrite", writableRoots: ["sub", "/"] } } },
      "params.sandboxPolicy.writableRoots[1]",
    );
    await assertForbidden(
      setup,
      { params: { input, sandboxPolicy: { type: "workspaceWrite", writableRoots: ["escape"] } } },
      "params.sandboxPolicy.writableRoots[0]",
    );
    await assertForbidden(
      setup,
      { threadParams: { runtimeWorkspaceRoots: ["/"] } },
      "threadParams.runtimeWorkspaceRoots",
    );
    await assertForbidden(
      setup,
      { params: { input, runtimeWorkspaceRoots: ["/"] } },
      "params.runtimeWorkspaceRoots",
    );
    await assertForbidden(
      setup,
      { params: { input, environments: [{ environmentId: "local", cwd: "/" }] } },
      "params.environments",
    );
  });
});

test("sandbox and approval escalation is refused with 403 forbiddenParam, and nothing reaches codex", async () => {
  await withSetup(DEFAULT_POLICY, async (setup) => {
    const cases: [Record<string, unknown>, string][] = [
      [{ threadParams: { sandbox: "danger-full-access" } }, "threadParams.sandbox"],
      [{ threadParams: { sandbox: "yolo" } }, "threadParams.sandbox"],
      [
        { params: { input, sandboxPolicy: { type: "dangerFullAccess" } } },
        "params.sandboxPolicy.type",
      ],
      [
        { params: { input, sandboxPolicy: { type: "externalSandbox", networkAccess: "enabled" } } },
        "params.sandboxPolicy.type",
      ],
      [
        { params: { input, sandboxPolicy: { ...network, fullDiskWriteAccess: true } } },
        "params.sandboxPolicy.fullDiskWriteAccess",
      ],
      // The same escalation through codex's configuration overrides.
      [
        { threadParams: { config: { sandbox_mode: "danger-full-access" } } },
        "threadParams.config.sandbox_mode",
      ],
      [
        { threadParams: { config: { "sandbox_workspace_write.writable_roots": ["/"] } } },
        "threadParams.config.sandbox_workspace_write.writable_roots",
      ],
      [
        { threadParams: { config: { sandbox_workspace_write: { network_access: true } } } },
        "threadParams.config.sandbox_workspace_write",
      ],
      [
        { threadParams: { config: { approval_policy: "never" } } },
        "threadParams.config.approval_policy",
      ],
      [{ threadParams: { permissions: "full-access" } }, "threadParams.permissions"],
      [{ params: { input, permissions: "full-access" } }, "params.permissions"],
      // Approvals.
      [
        { threadParams: { approvalPolicy: "never" }, params: { input, sandboxPolicy: network } },
        "threadParams.approvalPolicy",
      ],
      [
        { params: { input, approvalPolicy: "never", sandboxPolicy: network } },
        "params.approvalPolicy",
      ],
      [{ ...continued, params: { input, approvalPolicy: "never" } }, "params.approvalPolicy"],
      [
        { ...continued, params: { input, sandboxPolicy: network } },
        "params.sandboxPolicy.networkAccess",
      ],
      [
        {
          params: {
            input,
            approvalPolicy: {
              granular: { mcp_elicitations: false, rules: false, sandbox_approval: false },
            },
          },
        },
        "params.approvalPolicy",
      ],
      [{ params: { input, approvalPolicy: "NEVER" } }, "params.approvalPolicy"],
      [{ threadParams: { approvalsReviewer: "auto_review" } }, "threadParams.approvalsReviewer"],
      [{ params: { input, approvalsReviewer: "guardian_subagent" } }, "params.approvalsReviewer"],
    ];
    for (const [body, field] of cases) await assertForbidden(setup, body, field);
  });
});

test("the policy's rules for the operator's secret apply to requests carrying X-Internal-Secret", async () => {
  const policy = parsePolicy(JSON.stringify({
    credentials: {
      secret: { models: ["mock-model"], cwd: false },
      token: { sandbox: ["read-only", "workspace-write", "danger-full-access"] },
    },
  }));
  await withSetup(policy, async (setup) => {
    await assertForbidden(setup, { threadParams: { model: "o3" } }, "threadParams.model");
    await assertForbidden(setup, { threadParams: { cwd: "sub" } }, "threadParams.cwd");
    // What only tokens may do is no more open to the secret.
    await assertForbidden(
      setup,
      { threadParams: { sandbox: "danger-full-access" } },
      "threadParams.sandbox",
    );
  });
});

test("the policy's rules for tokens apply to requests carrying a bearer token, and the secret's do not", async () => {
  const jwtSecret = "jwt-key-0123456789-0123456789-0123456789";
  const token = await new SignJWT({ workspaces: ["ws-1"], scope: "turns:write" })
    .setProtectedHeader({ alg: "HS256" })
    .setSubject("alice")
    .setExpirationTime("10m")
    .sign(new TextEncoder().encode(jwtSecret));
  const policy = parsePolicy(JSON.stringify({
    credentials: {
      secret: { sandbox: ["read-only", "workspace-write", "danger-full-access"] },
      token: { sandbox: ["read-only"], models: ["mock-model"] },
    },
  }));
  await withSetup(policy, async (setup) => {
    const refused = async (body: Record<string, unknown>, field: string) => {
      const response = await setup.handler(post({ ...body }, token));
      assert.equal(response.status, 403, JSON.stringify(body));
      const { error } = await response.json();
      assert.equal(error.code, "forbiddenParam");
      assert.equal(error.field, field);
    };
    await refused({ threadParams: { sandbox: "workspace-write" } }, "threadParams.sandbox");
    await refused({ threadParams: { model: "o3" } }, "threadParams.model");
    assert.equal(setup.server.peers.length, 0, "nothing reached codex");
    const entry = setup.logs.find((e) => e.code === "forbiddenParam");
    assert.equal(entry?.principal, "alice");
    // What the token may not ask for, the operator's secret may.
    const operator = await setup.handler(post({ threadParams: { sandbox: "danger-full-access" } }));
    assert.equal(operator.status, 200);
    await operator.body?.cancel();
    const allowed = await setup.handler(post({ threadParams: { model: "mock-model" } }, token));
    assert.equal(allowed.status, 200);
    assert.equal((await allowed.json()).turn.status, "completed");
  }, { jwtSecret });
});

test("an allowed request reaches codex with its paths resolved and the default sandbox and approval policy filled in", async () => {
  await withSetup(DEFAULT_POLICY, async (setup) => {
    const { work } = setup;
    const response = await setup.handler(post({
      threadParams: { cwd: "inner", model: "mock-model" },
      params: {
        input,
        cwd: "new-dir/x",
        approvalPolicy: "on-request",
        sandboxPolicy: { ...network, writableRoots: ["sub/../inner"] },
      },
    }));
    assert.equal(response.status, 200);
    const sent = setup.server.peers[0]!.received.filter((m) => m.id !== undefined);
    assert.deepEqual(sent.map((m) => m.method), ["initialize", "thread/start", "turn/start"]);
    assert.deepEqual(sent[1]!.params, {
      cwd: `${work}/sub`,
      model: "mock-model",
      sandbox: "read-only",
      approvalPolicy: "on-request",
    });
    assert.deepEqual(sent[2]!.params, {
      input,
      threadId: "thr-1",
      cwd: `${work}/new-dir/x`,
      approvalPolicy: "on-request",
      sandboxPolicy: { ...network, writableRoots: [`${work}/sub`] },
    });
    // A continued thread may go unattended when the same turn turns network off.
    const again = await setup.handler(post({
      threadId: "thr-1",
      params: { input, approvalPolicy: "never", sandboxPolicy: { type: "readOnly" } },
    }));
    assert.equal(again.status, 200);
  });
});

test("startBroker() applies the default policy: a cwd of / is refused with 403 before any codex starts", async () => {
  const dir = await realpath(await mkdtemp(join(tmpdir(), "policy-broker-")));
  const broker = await startBroker({
    ...codelessBroker(dir, SECRET),
  });
  try {
    const response = await fetch(`${broker.url}/api/turns`, {
      method: "POST",
      headers: { "content-type": "application/json", "x-internal-secret": SECRET },
      body: JSON.stringify({
        workspaceId: "ws-1",
        params: { input },
        threadParams: { cwd: "/", sandbox: "danger-full-access" },
      }),
    });
    assert.equal(response.status, 403);
    const { error } = await response.json();
    assert.equal(error.code, "forbiddenParam");
    assert.equal(error.field, "threadParams.cwd");
    // Refused before the workspace was claimed: not even its lease directory exists.
    assert.equal(existsSync(join(dir, "workspaces", "ws-1")), false);
  } finally {
    await broker.close();
    await rm(dir, { recursive: true, force: true });
  }
});

/**
 * The bearer-token and per-workspace-limit flags, and a broker started with a JWKS file.
 */

import { test } from "./_test.ts";
import assert from "node:assert/strict";
import { mkdtemp, realpath, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { exportJWK, generateKeyPair, SignJWT } from "jose";
import { parseFlags, startBroker, UsageError } from "../src/main.ts";
import { codelessBroker } from "./_codeless_broker.ts";

const SECRET = "auth-flags-test-operator-secret";

async function withDir(fn: (dir: string) => Promise<void>): Promise<void> {
  const dir = await realpath(await mkdtemp(join(tmpdir(), "auth-flags-test-")));
  try {
    await fn(dir);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

function optionsOf(args: string[]) {
  const parsed = parseFlags(args, { BROKER_SECRET: SECRET });
  assert.equal(parsed.help, false);
  return (parsed as Extract<typeof parsed, { help: false }>).options;
}

test("parseFlags() reads the HS256 key from --jwt-secret-file without its final newline", async () => {
  await withDir(async (dir) => {
    const file = join(dir, "jwt.key");
    await writeFile(file, "k".repeat(40) + "\n");
    assert.equal(optionsOf(["--jwt-secret-file", file]).jwtSecret, "k".repeat(40));
    await writeFile(file, "short\n");
    assert.throws(() => parseFlags(["--jwt-secret-file", file]), /at least 32 bytes/);
    assert.throws(() => parseFlags(["--jwt-secret-file", join(dir, "none")]), UsageError);
  });
});

test("parseFlags() takes --jwks as a URL or an existing file", async () => {
  await withDir(async (dir) => {
    assert.equal(
      optionsOf(["--jwks", "https://auth.example/jwks.json"]).jwks,
      "https://auth.example/jwks.json",
    );
    const file = join(dir, "jwks.json");
    await writeFile(file, '{"keys":[]}');
    assert.equal(optionsOf(["--jwks", file]).jwks, file);
    assert.throws(() => parseFlags(["--jwks", join(dir, "none.json")]), /no such file/);
    assert.throws(() => parseFlags(["--jwks", "http://auth.example/jwks.json"]), /https/);
    assert.equal(
      optionsOf(["--jwks", "http://127.0.0.1:8080/jwks.json"]).jwks,
      "http://127.0.0.1:8080/jwks.json",
    );
  });
});

test("parseFlags() reads the audience, the issuer and the per-workspace limits", () => {
  const options = optionsOf([
    "--jwt-audience",
    "codex-broker",
    "--jwt-issuer",
    "https://auth.example",
    "--max-workspace-turns",
    "2",
    "--max-workspace-queue",
    "0",
  ]);
  assert.equal(options.jwtAudience, "codex-broker");
  assert.equal(options.jwtIssuer, "https://auth.example");
  assert.equal(options.maxTurnsPerWorkspace, 2);
  assert.equal(options.maxWaitingTurnsPerWorkspace, 0);
  assert.throws(() => parseFlags(["--max-workspace-turns", "0"]), UsageError);
  assert.throws(() => parseFlags(["--max-workspace-queue", "-1"]), UsageError);
});

test("a broker started with a JWKS file takes a token of its key and refuses a stranger's", {
  timeout: 30_000,
}, async () => {
  await withDir(async (dir) => {
    const { privateKey, publicKey } = await generateKeyPair("ES256", { extractable: true });
    const stranger = await generateKeyPair("ES256");
    const jwks = join(dir, "jwks.json");
    await writeFile(
      jwks,
      JSON.stringify({ keys: [{ ...(await exportJWK(publicKey)), kid: "k1", alg: "ES256" }] }),
    );
    const broker = await startBroker({
      ...codelessBroker(dir, SECRET),
      jwks,
    });
    try {
      const sign = (key: CryptoKey) =>
        new SignJWT({ sub: "alice", workspaces: ["ws-a"], scope: "turns:write" })
          .setProtectedHeader({ alg: "ES256", kid: "k1" })
          .setExpirationTime("5m")
          .sign(key);
      const send = async (token: string) => {
        const response = await fetch(`${broker.url}/api/turns`, {
          method: "POST",
          headers: { "content-type": "application/json", authorization: `Bearer ${token}` },
          body: JSON.stringify({
            workspaceId: "ws-a",
            params: { input: [{ type: "text", text: "hi", text_elements: [] }] },
          }),
        });
        return { status: response.status, body: await response.json() };
      };
      // Past authentication, the turn fails for want of codex: a 200 transport failure.
      const accepted = await send(await sign(privateKey));
      assert.equal(accepted.status, 200);
      assert.equal(accepted.body.transport?.code, "subprocessCrash");
      const refused = await send(await sign(stranger.privateKey));
      assert.equal(refused.status, 401);
      assert.equal(refused.body.error.code, "unauthorized");
    } finally {
      await broker.close();
    }
  });
});

test("startBroker() refuses to start with a JWKS file that is not a key set", async () => {
  await withDir(async (dir) => {
    const jwks = join(dir, "jwks.json");
    await writeFile(jwks, '{"nope":1}');
    await assert.rejects(
      startBroker({
        secret: SECRET,
        port: 0,
        workspacesDir: join(dir, "workspaces"),
        checkCredentials: false,
        jwks,
      }),
      /JWKS .* has no "keys" array/,
    );
  });
});

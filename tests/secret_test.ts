/**
 * Where the broker takes its secret from and what it leaves of it: `--secret-file`,
 * `BROKER_SECRET` read once and removed, and the checks of `--codex-user`.
 */

import { test } from "./_test.ts";
import assert from "node:assert/strict";
import { execFileSync, spawn, spawnSync } from "node:child_process";
import { existsSync } from "node:fs";
import { chmod, mkdir, mkdtemp, realpath, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import process from "node:process";
import { fileURLToPath } from "node:url";
import { main, parseFlags, UsageError } from "../src/main.ts";
import { runtimeCommand } from "./_processes.ts";

const SECRET = "secret-test-0123456789abcdef";
const IS_ROOT = process.getuid?.() === 0;
const MAIN = fileURLToPath(new URL("../src/main.ts", import.meta.url));
const TIMEOUT = { timeout: 30_000 };

async function withDir(fn: (dir: string) => Promise<void>): Promise<void> {
  const dir = await realpath(await mkdtemp(join(tmpdir(), "secret-test-")));
  try {
    await fn(dir);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

test("parseFlags() reads --secret-file, dropping one trailing newline and nothing else", async () => {
  await withDir(async (dir) => {
    const file = join(dir, "secret");
    for (
      const [content, secret] of [[`${SECRET}\n`, SECRET], [`${SECRET}\r\n`, SECRET], [
        SECRET,
        SECRET,
      ]]
    ) {
      await writeFile(file, content!, { mode: 0o600 });
      const parsed = parseFlags(["--secret-file", file], { BROKER_SECRET: "loses-to-the-file" });
      assert.ok(!parsed.help);
      assert.equal(parsed.options.secret, secret);
      assert.equal(parsed.secretSource, "file");
      assert.deepEqual(parsed.secretFile, { path: file, mode: 0o600 });
    }
    // A second newline is part of the secret, which HTTP would strip: refused.
    await writeFile(file, `${SECRET}\n\n`);
    assert.throws(
      () => parseFlags(["--secret-file", file]),
      (error) =>
        error instanceof UsageError &&
        error.message === `Invalid --secret-file ${JSON.stringify(file)}: must not start or ` +
            `end with whitespace, which HTTP strips from header values`,
    );
  });
});

test("parseFlags() refuses a --secret-file that is missing, a directory or empty, naming the path", async () => {
  await withDir(async (dir) => {
    const missing = join(dir, "missing");
    assert.throws(
      () => parseFlags(["--secret-file", missing]),
      new UsageError(`Invalid --secret-file ${JSON.stringify(missing)}: no such file`),
    );
    assert.throws(
      () => parseFlags(["--secret-file", dir]),
      new UsageError(`Invalid --secret-file ${JSON.stringify(dir)}: it is a directory`),
    );
    const empty = join(dir, "empty");
    for (const content of ["", "\n"]) {
      await writeFile(empty, content);
      assert.throws(
        () => parseFlags(["--secret-file", empty]),
        new UsageError(`Invalid --secret-file ${JSON.stringify(empty)}: it is empty`),
      );
    }
    assert.throws(() => parseFlags(["--secret-file="]), /Invalid --secret-file: expected a path/);
  });
});

test("parseFlags() refuses --secret together with --secret-file", async () => {
  await withDir(async (dir) => {
    const file = join(dir, "secret");
    await writeFile(file, SECRET);
    assert.throws(
      () => parseFlags(["--secret", SECRET, "--secret-file", file]),
      new UsageError("Give the secret once: either --secret or --secret-file"),
    );
  });
});

/** Runs main() until it listens, then stops it; returns its exit code and log records. */
async function runMain(
  args: string[],
  env: Record<string, string | undefined>,
): Promise<{ code: number; records: Record<string, unknown>[] }> {
  const lines: string[] = [];
  const stop = new AbortController();
  let code = -1;
  await withDir(async (dir) => {
    code = await main(
      ["--port", "0", "--workspaces-dir", join(dir, "ws"), "--codex", "no-such-codex", ...args],
      {
        env,
        handleSignals: false,
        signal: stop.signal,
        stderr: (text) => {
          lines.push(...text.split("\n").filter((line) => line.startsWith("{")));
          if (text.includes('"msg":"listening"')) stop.abort();
        },
      },
    );
  });
  return { code, records: lines.map((line) => JSON.parse(line)) };
}

test("main() removes BROKER_SECRET from the environment it read it from", TIMEOUT, async () => {
  const env: Record<string, string | undefined> = { BROKER_SECRET: SECRET, OTHER: "stays" };
  const { code, records } = await runMain([], env);
  assert.equal(code, 0);
  assert.deepEqual(env, { OTHER: "stays" });
  assert.equal(records.find((r) => r.msg === "start")?.secretFrom, "env");
  // A bad flag removes it as well: the process may live on after main() returns.
  const bad: Record<string, string | undefined> = { BROKER_SECRET: SECRET };
  assert.equal(await main(["--port", "x"], { env: bad, stderr: () => {} }), 2);
  assert.deepEqual(bad, {});
});

test(
  "main() warns about a --secret file that others can read, and not about a 0600 one",
  TIMEOUT,
  async () => {
    await withDir(async (dir) => {
      const file = join(dir, "secret");
      await writeFile(file, SECRET, { mode: 0o644 });
      const open = await runMain(["--secret-file", file], {});
      assert.equal(open.code, 0);
      const warning = open.records.find((r) => r.msg === "secret file readable by others");
      assert.equal(warning?.level, "warn");
      assert.equal(warning?.path, file);
      assert.equal(warning?.mode, "0644");
      assert.ok(!JSON.stringify(open.records).includes(SECRET), "the secret is never logged");
      await rm(file);
      await writeFile(file, SECRET, { mode: 0o600 });
      const tight = await runMain(["--secret-file", file], {});
      assert.equal(tight.code, 0);
      assert.equal(tight.records.some((r) => r.msg === "secret file readable by others"), false);
      assert.equal(tight.records.find((r) => r.msg === "start")?.secretFrom, "file");
    });
  },
);

const HAS_PROC_MEM = existsSync("/proc/self/mem");

test(
  "scrubInitialEnvironment() erases a variable's value from /proc/self/environ, and nothing it does not find exactly" +
    (HAS_PROC_MEM ? "" : " (skipped: no /proc/self/mem)"),
  { ...TIMEOUT, skip: !HAS_PROC_MEM },
  async () => {
    await withDir(async (dir) => {
      const script = join(dir, "scrub.ts");
      const module = fileURLToPath(new URL("../src/_environ_scrub.ts", import.meta.url));
      await writeFile(
        script,
        `import { readFileSync } from "node:fs";
import { scrubInitialEnvironment } from ${JSON.stringify(module)};
const erased = scrubInitialEnvironment("SCRUB_TEST_SECRET", "s3cret-scrub-value");
const missed = scrubInitialEnvironment("SCRUB_TEST_OTHER", "not-its-value");
const environ = readFileSync("/proc/self/environ", "latin1").split("\\0");
console.log(JSON.stringify({ erased, missed, environ }));
`,
      );
      const [command, args] = runtimeCommand(script);
      const out = execFileSync(command, args, {
        encoding: "utf8",
        env: {
          PATH: process.env.PATH ?? "/usr/bin:/bin",
          ...(process.env.HOME === undefined ? {} : { HOME: process.env.HOME }),
          SCRUB_TEST_SECRET: "s3cret-scrub-value",
          SCRUB_TEST_OTHER: "its-value",
        },
      });
      const { erased, missed, environ } = JSON.parse(out) as {
        erased: boolean;
        missed: boolean;
        environ: string[];
      };
      assert.equal(erased, true);
      assert.equal(missed, false);
      assert.ok(environ.includes("SCRUB_TEST_SECRET="), environ.join(" "));
      assert.ok(!environ.some((entry) => entry.includes("s3cret-scrub-value")));
      assert.ok(environ.includes("SCRUB_TEST_OTHER=its-value"));
    });
  },
);

test(
  "parseFlags() refuses --codex-user for a user that does not exist, and for root" +
    (IS_ROOT ? "" : " (skipped: the lookup runs only for a broker running as root)"),
  { skip: !IS_ROOT },
  () => {
    assert.throws(
      () => parseFlags(["--codex-user", "no-such-user-c0dex"]),
      new UsageError('Invalid --codex-user "no-such-user-c0dex": no such user'),
    );
    for (const root of ["root", "0"]) {
      assert.throws(
        () => parseFlags(["--codex-user", root]),
        /it is root, which separates nothing/,
      );
    }
    const nobody = parseFlags(["--codex-user", "nobody"]);
    assert.ok(!nobody.help);
    assert.equal(nobody.options.codexUser?.name, "nobody");
    assert.equal(
      nobody.options.codexUser?.uid,
      Number(execFileSync("id", ["-u", "nobody"], { encoding: "utf8" })),
    );
  },
);

// Starting a broker as nobody needs root, and a checkout nobody can read (a fresh clone in a
// 0700 mktemp directory, say); the in-process test below covers the rule either way.
const NOBODY_READS_CHECKOUT = IS_ROOT &&
  spawnSync("test", ["-r", MAIN], {
      uid: Number(execFileSync("id", ["-u", "nobody"], { encoding: "utf8" })),
      gid: Number(execFileSync("id", ["-g", "nobody"], { encoding: "utf8" })),
    }).status === 0;

test("parseFlags() refuses --codex-user when the broker does not run as root, naming its uid", () => {
  const getuid = process.getuid;
  process.getuid = () => 1000;
  try {
    assert.throws(
      () => parseFlags(["--codex-user", "nobody"]),
      (error) =>
        error instanceof UsageError &&
        error.message === `Invalid --codex-user "nobody": only a broker running as root can ` +
            `run codex as another user (this one runs as uid 1000)`,
    );
  } finally {
    process.getuid = getuid!;
  }
});

test(
  "a broker not running as root exits 2 on --codex-user, saying that it needs root" +
    (!IS_ROOT
      ? " (skipped: it needs root to start a broker as another user)"
      : NOBODY_READS_CHECKOUT
      ? ""
      : " (skipped: user nobody cannot read this checkout)"),
  { ...TIMEOUT, skip: !NOBODY_READS_CHECKOUT },
  async () => {
    const uid = Number(execFileSync("id", ["-u", "nobody"], { encoding: "utf8" }));
    const gid = Number(execFileSync("id", ["-g", "nobody"], { encoding: "utf8" }));
    await withDir(async (dir) => {
      // Deno keeps its cache under HOME, which must be the user's to write.
      const home = join(dir, "home");
      await chmod(dir, 0o755);
      await mkdir(home);
      execFileSync("chown", [`${uid}:${gid}`, home]);
      const [command, args] = runtimeCommand(MAIN);
      const child = spawn(command, [...args, "--codex-user", "nobody"], {
        uid,
        gid,
        env: { PATH: process.env.PATH ?? "/usr/bin:/bin", HOME: home },
        stdio: ["ignore", "ignore", "pipe"],
      });
      let stderr = "";
      child.stderr!.setEncoding("utf8");
      child.stderr!.on("data", (text: string) => stderr += text);
      const code = await new Promise<number | null>((resolve) => child.once("close", resolve));
      assert.equal(code, 2, stderr);
      assert.match(
        stderr,
        new RegExp(
          `Invalid --codex-user "nobody": only a broker running as root can run codex as ` +
            `another user \\(this one runs as uid ${uid}\\)`,
        ),
      );
    });
  },
);

import { test } from "./_test.ts";
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import {
  chmod,
  mkdir,
  mkdtemp,
  open,
  readdir,
  readFile,
  realpath,
  rm,
  stat,
  utimes,
  writeFile,
} from "node:fs/promises";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { copyCodexHomeTemplate } from "../src/_codex_home.ts";

/** A template and a workspace home under one temporary directory. */
async function withHomes(fn: (template: string, home: string) => Promise<void>): Promise<void> {
  const dir = await realpath(await mkdtemp(join(tmpdir(), "codex-home-test-")));
  try {
    const template = join(dir, "template");
    await mkdir(template);
    await fn(template, join(dir, "workspace", "codex-home"));
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

async function put(path: string, text: string, mtime?: Date): Promise<void> {
  await mkdir(dirname(path), { recursive: true });
  await writeFile(path, text);
  if (mtime) await utimes(path, mtime, mtime);
}

/** Every file under `dir`, as sorted relative paths. */
async function files(dir: string): Promise<string[]> {
  const entries = await readdir(dir, { recursive: true, withFileTypes: true });
  return entries.filter((entry) => entry.isFile())
    .map((entry) => join(entry.parentPath, entry.name).slice(dir.length + 1)).sort();
}

const HOUR = 3_600_000;

test("copyCodexHomeTemplate() copies configuration and credentials, and nothing codex keeps about threads", async () => {
  await withHomes(async (template, home) => {
    for (
      const name of [
        "config.toml",
        "auth.json",
        ".credentials.json",
        "AGENTS.md",
        "AGENTS.override.md",
        "hooks.json",
        "agents/reviewer.toml",
        "prompts/fix.md",
        "rules/default.rules",
        "skills/lint/SKILL.md",
        "skills/lint/scripts/run.sh",
        // Not configuration: threads, logs, history, databases, codex's own state.
        "sessions/2026/01/01/rollout-1.jsonl",
        "archived_sessions/rollout-0.jsonl",
        "log/codex-tui.log",
        "history.jsonl",
        "state_5.sqlite",
        "state_5.sqlite-wal",
        "installation_id",
        "skills/.system/imagegen/SKILL.md",
      ]
    ) await put(join(template, name), name);
    await copyCodexHomeTemplate(template, home);
    assert.deepEqual(await files(home), [
      ".credentials.json",
      "AGENTS.md",
      "AGENTS.override.md",
      "agents/reviewer.toml",
      "auth.json",
      "config.toml",
      "hooks.json",
      "prompts/fix.md",
      "rules/default.rules",
      "skills/lint/SKILL.md",
      "skills/lint/scripts/run.sh",
    ]);
    assert.equal(await readFile(join(home, "rules/default.rules"), "utf8"), "rules/default.rules");
  });
});

test("copyCodexHomeTemplate() makes every copy owner-only: credentials 0600, directories 0700, executables kept executable", async () => {
  await withHomes(async (template, home) => {
    await put(join(template, "auth.json"), "{}");
    await chmod(join(template, "auth.json"), 0o644);
    await put(join(template, "config.toml"), "");
    await chmod(join(template, "config.toml"), 0o664);
    await put(join(template, "skills/lint/run.sh"), "#!/bin/sh\n");
    await chmod(join(template, "skills/lint/run.sh"), 0o755);
    await copyCodexHomeTemplate(template, home);
    const mode = async (path: string) => (await stat(join(home, path))).mode & 0o777;
    assert.equal(await mode(""), 0o700);
    assert.equal(await mode("auth.json"), 0o600);
    assert.equal(await mode("config.toml"), 0o600);
    assert.equal(await mode("skills"), 0o700);
    assert.equal(await mode("skills/lint"), 0o700);
    assert.equal(await mode("skills/lint/run.sh"), 0o700);
  });
});

test("copyCodexHomeTemplate() keeps a workspace's auth.json that codex refreshed after the template's", async () => {
  await withHomes(async (template, home) => {
    const now = Date.now();
    await put(join(template, "auth.json"), "template token", new Date(now - 2 * HOUR));
    await copyCodexHomeTemplate(template, home);
    assert.equal(await readFile(join(home, "auth.json"), "utf8"), "template token");
    // What codex does when it refreshes the login inside the workspace's home.
    await put(join(home, "auth.json"), "refreshed token", new Date(now - HOUR));
    await copyCodexHomeTemplate(template, home);
    assert.equal(await readFile(join(home, "auth.json"), "utf8"), "refreshed token");
  });
});

test("copyCodexHomeTemplate() replaces a workspace's auth.json with a newer template's", async () => {
  await withHomes(async (template, home) => {
    const now = Date.now();
    await put(join(template, "auth.json"), "first login", new Date(now - 3 * HOUR));
    await copyCodexHomeTemplate(template, home);
    await put(join(home, "auth.json"), "refreshed token", new Date(now - 2 * HOUR));
    // The operator logs in again.
    await put(join(template, "auth.json"), "second login", new Date(now - HOUR));
    await copyCodexHomeTemplate(template, home);
    assert.equal(await readFile(join(home, "auth.json"), "utf8"), "second login");
    // The copy carries the template's time, so an unchanged template copies nothing more.
    const copied = await stat(join(home, "auth.json"));
    assert.ok(Math.abs(copied.mtimeMs - (now - HOUR)) <= 1, `${copied.mtimeMs} vs ${now - HOUR}`);
    await put(join(home, "auth.json"), "refreshed again", new Date(now - HOUR + 1_000));
    await copyCodexHomeTemplate(template, home);
    assert.equal(await readFile(join(home, "auth.json"), "utf8"), "refreshed again");
  });
});

test("copyCodexHomeTemplate() replaces a file by renaming a complete copy over it", async () => {
  await withHomes(async (template, home) => {
    const now = Date.now();
    await put(join(template, "auth.json"), "old", new Date(now - 2 * HOUR));
    await copyCodexHomeTemplate(template, home);
    const reader = await open(join(home, "auth.json"));
    try {
      await put(join(template, "auth.json"), "new and longer", new Date(now - HOUR));
      await copyCodexHomeTemplate(template, home);
      // A reader of the old file still reads it whole: the new one is another file.
      assert.equal(await reader.readFile("utf8"), "old");
      assert.equal(await readFile(join(home, "auth.json"), "utf8"), "new and longer");
      assert.deepEqual(await readdir(home), ["auth.json"], "no temporary file is left");
    } finally {
      await reader.close();
    }
  });
});

test("copyCodexHomeTemplate() keeps files the template does not have", async () => {
  await withHomes(async (template, home) => {
    await put(join(template, "config.toml"), "model = 'a'");
    await put(join(home, "rules", "default.rules"), "prefix_rule(pattern = ['ls'])");
    await put(join(home, "sessions", "rollout.jsonl"), "{}");
    await copyCodexHomeTemplate(template, home);
    assert.deepEqual(await files(home), [
      "config.toml",
      "rules/default.rules",
      "sessions/rollout.jsonl",
    ]);
  });
});

test("copyCodexHomeTemplate() rejects a template that does not exist and creates nothing", async () => {
  await withHomes(async (template, home) => {
    await assert.rejects(copyCodexHomeTemplate(join(template, "missing"), home), /ENOENT/);
    assert.equal(existsSync(home), false);
  });
});

test("copyCodexHomeTemplate() with into stages only what the home lacks or has older, and leaves the home untouched", async () => {
  await withHomes(async (template, home) => {
    const now = Date.now();
    await put(join(template, "config.toml"), "model = 'new'", new Date(now - HOUR));
    await put(join(template, "auth.json"), "template token", new Date(now - 2 * HOUR));
    await put(join(template, "skills", "a", "SKILL.md"), "skill a", new Date(now - HOUR));
    await put(join(home, "config.toml"), "model = 'old'", new Date(now - 3 * HOUR));
    await put(join(home, "auth.json"), "refreshed token", new Date(now - HOUR));
    const staging = join(dirname(home), "staging");
    await mkdir(staging);
    await copyCodexHomeTemplate(template, home, { into: staging });
    assert.deepEqual(await files(staging), ["config.toml", "skills/a/SKILL.md"]);
    assert.equal(await readFile(join(staging, "config.toml"), "utf8"), "model = 'new'");
    // Carries the template's time, so a later comparison in the home is fair.
    // (to the millisecond: runtimes pass times as floating point seconds).
    const mtime = (await stat(join(staging, "config.toml"))).mtimeMs;
    assert.ok(Math.abs(mtime - (now - HOUR)) < 1, `${mtime}`);
    assert.deepEqual(await files(home), ["auth.json", "config.toml"]);
    assert.equal(await readFile(join(home, "config.toml"), "utf8"), "model = 'old'");
  });
});

// A real codex behind the supervisor, on the loopback model, shared by the tests of a file.
import { mkdtemp, realpath, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import {
  type CodexResolver,
  type CodexResolverOptions,
  createCodexResolver,
} from "../src/supervisor.ts";
import { makeCodexHome, type TempCodexHome } from "./_codex_home.ts";
import { after, before } from "./_test.ts";
import { echo, type MockModel, startMockModel } from "./_mock_model.ts";

/** The pieces a real-codex test file shares. */
export interface CodexFixture {
  readonly model: MockModel;
  readonly home: TempCodexHome;
  /** A temporary directory; workspaces live in `<dir>/workspaces/<id>`. */
  readonly dir: string;
  readonly resolver: CodexResolver;
  /** Stops every codex, the model, and removes the temporary directories. */
  close(): Promise<void>;
}

/**
 * Makes a resolver whose codex homes and workspace directories live in the fixture's.
 *
 * @param home The CODEX_HOME pointing at the mock model.
 * @param dir The fixture's directory.
 * @param extra More resolver options.
 * @returns The resolver.
 */
export function fixtureResolver(
  home: TempCodexHome,
  dir: string,
  extra: CodexResolverOptions = {},
): CodexResolver {
  return createCodexResolver({
    codexHome: () => home.path,
    cwd: (id) => join(dir, "workspaces", id),
    ...extra,
  });
}

/**
 * Starts the model, a CODEX_HOME and a resolver, and spawns the shared workspaces' codex.
 * Call it from `before` and `close()` from `after`: a child process must be started and
 * stopped by the same test, or outside of every test (Deno's sanitizers check).
 *
 * @param prefix Prefix of the temporary directory's name.
 * @param shared Workspaces whose codex runs from now until `close()`.
 * @returns The fixture.
 */
async function startCodexFixture(prefix: string, shared: string[]): Promise<CodexFixture> {
  const model = await startMockModel({ respond: echo() });
  const home = await makeCodexHome(model.baseUrl);
  const dir = await realpath(await mkdtemp(join(tmpdir(), prefix)));
  const resolver = fixtureResolver(home, dir);
  await Promise.all(shared.map((workspaceId) => resolver.resolve(workspaceId)));
  return {
    model,
    home,
    dir,
    resolver,
    async close() {
      await resolver.close();
      await model.close();
      await home.cleanup();
      await rm(dir, { recursive: true, force: true });
    },
  };
}

/**
 * Starts a fixture in `before` and closes it in `after`, for every test of the file.
 *
 * @param prefix Prefix of the temporary directory's name.
 * @param shared Workspaces whose codex runs for the whole file.
 * @returns An accessor for the fixture, to call inside tests.
 */
export function useCodexFixture(prefix: string, shared: string[]): () => CodexFixture {
  let fixture: CodexFixture | undefined;
  before(async () => {
    fixture = await startCodexFixture(prefix, shared);
  });
  after(async () => {
    const started = fixture;
    fixture = undefined;
    await started?.close();
  });
  return () => {
    if (!fixture) throw new Error("The codex fixture did not start");
    return fixture;
  };
}

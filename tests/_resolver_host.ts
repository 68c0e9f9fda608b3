// A broker stand-in for the "no orphans" tests of tests/supervisor_test.ts: creates a codex
// resolver, resolves the workspaces named in its JSON argument, prints one JSON line
// `{ "pids": { [workspaceId]: pid } }` and then waits to be killed.
//
// Argument: `{ "root": dir, "codexHome": dir, "workspaces": [id, …], "layout": "temp" |
// "workspace" }`. "temp": cwd `<root>/<id>`, tokens in the system's temp dir, one shared
// CODEX_HOME. "workspace": `<root>/<id>/work`, `<root>/<id>/codex-home` seeded from
// `codexHome` as a template, `<root>/<id>/run`.
import { join } from "node:path";
import process from "node:process";
import { createCodexResolver } from "../src/supervisor.ts";

interface HostOptions {
  root: string;
  codexHome: string;
  workspaces: string[];
  layout: "temp" | "workspace";
}

const options = JSON.parse(process.argv[2] ?? "{}") as HostOptions;
const resolver = options.layout === "workspace"
  ? createCodexResolver({
    cwd: (id) => join(options.root, id, "work"),
    codexHome: (id) => join(options.root, id, "codex-home"),
    codexHomeTemplate: options.codexHome,
    runDir: (id) => join(options.root, id, "run"),
    brokerId: "resolver-host",
  })
  : createCodexResolver({
    cwd: (id) => join(options.root, id),
    codexHome: () => options.codexHome,
  });
await Promise.all(options.workspaces.map((id) => resolver.resolve(id)));
const pids = Object.fromEntries(options.workspaces.map((id) => [id, resolver.pid(id)]));
process.stdout.write(`${JSON.stringify({ pids })}\n`);
// Stays up until the test kills it.
setInterval(() => {}, 60_000);

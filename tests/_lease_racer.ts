// A broker stand-in for the cross-process lease race in tests/file_lease_test.ts: waits for
// a line on stdin, then races for the lease of every workspace named in argv and prints
// one JSON line `{ "won": [...] }`.
import process from "node:process";
import { createFileLeaseStore } from "../src/file_lease.ts";

const [root, holderId, ...workspaces] = process.argv.slice(2) as [string, string, ...string[]];
const store = createFileLeaseStore({ dir: (id) => `${root}/${id}/lease`, ttlMs: 60_000 });
await new Promise<void>((resolve) => {
  process.stdin.once("data", () => resolve());
});
process.stdin.pause();
const results = await Promise.all(
  workspaces.map((id) => store.acquire(id, { id: holderId, url: `http://${holderId}` })),
);
const won = workspaces.filter((_, i) => results[i]!.acquired);
process.stdout.write(`${JSON.stringify({ won })}\n`);

// A turn that outlasts the server's keep-alive (idle) timeout is answered whole, as JSON and as
// an event stream quiet for longer than it: Bun's idle timeout also runs while a request is
// being answered, and cut such turns off (an empty reply; a stream ended early as if done).
// The keep-alive timeout is set to Bun's smallest, one second; the three cases run at once, so
// the test waits one long turn.
import { test } from "./_test.ts";
import assert from "node:assert/strict";
import { chmod, mkdtemp, realpath, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { type Broker, type LogEntry, startBroker } from "../src/main.ts";
import { ROOT } from "./_processes.ts";
import { rawClient } from "./_raw_http.ts";
import { readEvents } from "./_sse_events.ts";
import { waitFor } from "./_wait.ts";

const SECRET = "long-turn-test-secret-0123456789";
const TIMEOUT = { timeout: 30_000 };
/**
 * Longer than the keep-alive timeout as Bun applies it: it checks idle connections about
 * every 4 s, so one second of idle timeout cuts a request after about 4 s.
 */
const TURN_MS = 5_000;

async function withBroker(
  fn: (broker: Broker, logs: LogEntry[]) => Promise<void>,
): Promise<void> {
  const dir = await realpath(await mkdtemp(join(tmpdir(), "long-turn-test-")));
  // The bench's instant stand-in for codex, whose `delay:MS` turns take MS milliseconds.
  const codex = join(dir, "codex");
  await writeFile(
    codex,
    `#!/bin/sh\nexec "${ROOT}/node_modules/.bin/node" "${ROOT}/bench/_instant_codex.ts" "$@"\n`,
  );
  await chmod(codex, 0o755);
  const logs: LogEntry[] = [];
  const broker = await startBroker({
    secret: SECRET,
    port: 0,
    workspacesDir: join(dir, "workspaces"),
    codexHome: await mkdtemp(join(dir, "codex-home-")),
    codex,
    checkCredentials: false,
    keepAliveTimeoutMs: 1_000,
    log: (entry) => logs.push(entry),
  });
  try {
    await fn(broker, logs);
  } finally {
    await broker.close();
    await rm(dir, { recursive: true, force: true });
  }
}

function slowTurn(accept?: string, turnMs = TURN_MS): RequestInit {
  return {
    method: "POST",
    headers: {
      "content-type": "application/json",
      "x-internal-secret": SECRET,
      ...(accept ? { accept } : {}),
    },
    body: JSON.stringify({
      workspaceId: "ws-1",
      params: { input: [{ type: "text", text: `delay:${turnMs}`, text_elements: [] }] },
    }),
  };
}

test(
  "turns longer than the keep-alive timeout are answered whole, as JSON and as a quiet event stream, and the connection is closed once idle afterwards",
  TIMEOUT,
  async () => {
    await withBroker(async (broker) => {
      const json = (async () => {
        const response = await fetch(`${broker.url}/api/turns`, slowTurn());
        const body = await response.json();
        assert.equal(response.status, 200);
        assert.equal(body.turn?.status, "completed", JSON.stringify(body));
      })();
      const stream = (async () => {
        const response = await fetch(`${broker.url}/api/turns`, slowTurn("text/event-stream"));
        const events = await readEvents(response);
        const last = events.at(-1);
        assert.equal(last?.event, "result", JSON.stringify(events.map((e) => e.event)));
        assert.equal((last!.data as { turn?: { status?: string } }).turn?.status, "completed");
      })();
      const keepAlive = (async () => {
        const { host, port } = new URL(broker.url);
        const client = await rawClient(Number(port));
        try {
          const body = slowTurn().body as string;
          client.socket.write(
            `POST /api/turns HTTP/1.1\r\nHost: ${host}\r\nContent-Type: application/json\r\n` +
              `X-Internal-Secret: ${SECRET}\r\nContent-Length: ${body.length}\r\n\r\n${body}`,
          );
          await client.until(() => client.received.includes('"completed"'), 15_000, "the answer");
          assert.ok(!client.closed, "the connection outlived the turn");
          // Then the keep-alive timeout applies again (Bun's ticks are about 4 s).
          await client.until(() => client.closed, 8_000, "the idle connection to be closed");
        } finally {
          await client.destroy();
        }
      })();
      await Promise.all([json, stream, keepAlive]);
    });
  },
);

test(
  "a client that hangs up on a JSON turn or on its event stream has the turn interrupted at once and logged as cancelled",
  TIMEOUT,
  async () => {
    await withBroker(async (broker, logs) => {
      const { host, port } = new URL(broker.url);
      // A minute long: only the client leaving ends these turns within the test.
      for (const accept of ["application/json", "text/event-stream"]) {
        const body = slowTurn(accept, 60_000).body as string;
        const client = await rawClient(Number(port));
        try {
          client.socket.write(
            `POST /api/turns HTTP/1.1\r\nHost: ${host}\r\nContent-Type: application/json\r\n` +
              `Accept: ${accept}\r\nX-Internal-Secret: ${SECRET}\r\n` +
              `Content-Length: ${body.length}\r\n\r\n${body}`,
          );
          await waitFor("the turn to run", () => broker.inFlight === 1, 10_000);
          if (accept === "text/event-stream") {
            await client.until(() => client.received.includes("event: thread"), 10_000, "thread");
          }
        } finally {
          await client.destroy();
        }
        await waitFor(
          `the ${accept} turn to be cancelled`,
          () =>
            logs.some((entry) =>
              entry.msg === "turn" && entry.outcome === "cancelled" &&
              entry.stream === (accept === "text/event-stream")
            ),
          5_000,
        );
        await waitFor("the request to end", () => broker.inFlight === 0, 5_000);
      }
    });
  },
);

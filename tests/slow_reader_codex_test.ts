/**
 * The slow event-stream reader of the bad-client corpus (issue 10, §1) against the real
 * codex: a model that floods text deltas makes codex send a notification per delta, the
 * client reads none of its event stream, and the broker holds at most
 * `maxStreamBufferBytes` of it, ends the stream with `slowReader`, interrupts the turn
 * (codex stops reading the model), and serves the thread's next turn. The handler is
 * called in process, so no socket buffer sits between the stream and the client that does
 * not read.
 */

import { test as register } from "./_test.ts";
import { checkingSentFrames } from "./_schema.ts";
import assert from "node:assert/strict";
import { mkdtemp, realpath, rm } from "node:fs/promises";
import { createServer, type IncomingMessage, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Pool } from "../mod.ts";
import { createTurnsHandler } from "../src/handler.ts";
import { createCodexResolver } from "../src/supervisor.ts";
import { makeCodexHome } from "./_codex_home.ts";
import { readEvents } from "./_sse_events.ts";
import { isAlive, waitFor, within } from "./_wait.ts";

// Every frame the broker sends to the real codex must conform to codex's own schema.
const test = checkingSentFrames(register);

const SECRET = "slow-reader-codex-test";
// Far more than codex reads before the interrupt reaches it, even on a loaded machine: with
// 20,000 the whole flood once went through first.
const DELTAS = 200_000;
const DELTA_BYTES = 512;
const BUDGET = 64 * 1024;

/** A Responses-API model whose first answer floods deltas, and whose others are short. */
interface FloodModel {
  readonly baseUrl: string;
  /** Deltas the flood wrote before codex stopped reading it. */
  readonly sent: number;
  /** Resolves once codex closed the flooding response before its end. */
  readonly abandoned: Promise<void>;
  close(): Promise<void>;
}

async function startFloodModel(): Promise<FloodModel> {
  let requests = 0;
  let sent = 0;
  const abandoned = Promise.withResolvers<void>();
  const write = (res: ServerResponse, data: Record<string, unknown>): Promise<void> | void => {
    if (res.write(`event: ${data.type}\ndata: ${JSON.stringify(data)}\n\n`)) return;
    return new Promise((resolve) => {
      const done = () => {
        res.off("drain", done);
        res.off("close", done);
        resolve();
      };
      res.on("drain", done);
      res.on("close", done);
    });
  };
  const answer = async (req: IncomingMessage, res: ServerResponse) => {
    for await (const _ of req) {
      // The request body does not matter here.
    }
    const n = ++requests;
    const id = `resp_${n}`;
    const itemId = `msg_${n}`;
    res.writeHead(200, { "content-type": "text/event-stream" });
    await write(res, { type: "response.created", response: { id } });
    const item = (text: string) => ({
      type: "message",
      role: "assistant",
      id: itemId,
      content: [{ type: "output_text", text, annotations: [] }],
    });
    await write(res, { type: "response.output_item.added", output_index: 0, item: item("") });
    let text = "after the flood";
    if (n === 1) {
      const delta = "x".repeat(DELTA_BYTES);
      let closed = false;
      res.once("close", () => closed = true);
      for (; sent < DELTAS && !closed; sent++) {
        await write(res, {
          type: "response.output_text.delta",
          item_id: itemId,
          output_index: 0,
          content_index: 0,
          delta,
        });
      }
      if (closed) {
        abandoned.resolve();
        return;
      }
      text = delta.repeat(DELTAS);
    }
    await write(res, { type: "response.output_item.done", output_index: 0, item: item(text) });
    await write(res, {
      type: "response.completed",
      response: {
        id,
        usage: {
          input_tokens: 1,
          input_tokens_details: null,
          output_tokens: 1,
          output_tokens_details: null,
          total_tokens: 2,
        },
      },
    });
    res.end();
  };
  const server = createServer((req, res) => {
    answer(req, res).catch(() => res.destroy());
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address() as AddressInfo;
  return {
    baseUrl: `http://127.0.0.1:${port}/v1`,
    get sent() {
      return sent;
    },
    abandoned: abandoned.promise,
    async close() {
      const done = new Promise<void>((resolve) => server.close(() => resolve()));
      server.closeAllConnections();
      await done;
    },
  };
}

function post(body: unknown, accept?: string): Request {
  return new Request("http://broker.test/api/turns", {
    method: "POST",
    headers: {
      "content-type": "application/json",
      "x-internal-secret": SECRET,
      ...(accept ? { accept } : {}),
    },
    body: JSON.stringify(body),
  });
}

const input = [{ type: "text", text: "flood me", text_elements: [] }];

test(
  "a client that does not read its event stream while the real codex floods deltas is cut off at maxStreamBufferBytes with slowReader, codex stops the turn, and the thread serves its next turn",
  { timeout: 90_000 },
  async () => {
    const model = await startFloodModel();
    const home = await makeCodexHome(model.baseUrl);
    const dir = await realpath(await mkdtemp(join(tmpdir(), "slow-reader-codex-test-")));
    const resolver = createCodexResolver({
      codexHome: () => home.path,
      cwd: (id) => join(dir, "workspaces", id),
    });
    const pool = new Pool(resolver);
    const logs: Record<string, unknown>[] = [];
    const handler = createTurnsHandler(pool, {
      secret: SECRET,
      maxStreamBufferBytes: BUDGET,
      log: (entry) => logs.push(entry),
    });
    let pid: number | undefined;
    try {
      const response = await handler(
        post({ workspaceId: "ws-1", params: { input }, timeoutMs: 60_000 }, "text/event-stream"),
      );
      assert.equal(response.status, 200);
      pid = resolver.pid("ws-1");
      // Nobody reads the stream while codex floods it.
      await waitFor("the turn's log entry", () => logs.some((e) => e.msg === "turn"), 60_000);
      const entry = logs.find((e) => e.msg === "turn")!;
      assert.equal(entry.outcome, "slowReader", JSON.stringify(entry));
      // The interrupt reached codex, which stopped reading the model.
      await within(model.abandoned, 30_000, "codex to stop reading the model");
      assert.ok(model.sent < DELTAS, `the model sent all ${model.sent} deltas`);

      // Read afterwards: what was held, then why it ended.
      const bytes = new Uint8Array(await response.arrayBuffer());
      assert.ok(bytes.byteLength < BUDGET + 4096, `held ${bytes.byteLength} bytes`);
      const events = (await readEvents(new Response(bytes))).filter((e) => e.event !== ":");
      assert.equal(events[0]!.event, "thread");
      const threadId = (events[0]!.data as { threadId: string }).threadId;
      const deltas = events.filter((e) => e.event === "item/agentMessage/delta").length;
      assert.ok(deltas > 10, `${deltas} deltas were streamed`);
      const last = events.at(-1)!;
      assert.equal(last.event, "result");
      assert.equal((last.data as { error: { code: string } }).error.code, "slowReader");

      const metrics = await (await handler(new Request("http://broker.test/metrics"))).text();
      assert.match(metrics, /^codex_broker_slow_readers_total 1$/m);

      const next = await handler(
        post({ workspaceId: "ws-1", threadId, params: { input }, timeoutMs: 30_000 }),
      );
      const body = await next.json();
      assert.equal(body.turn?.status, "completed", JSON.stringify(body));
      assert.equal(body.turn.items.at(-1).text, "after the flood");
      const conn = await pool.get("ws-1");
      assert.equal(conn.inFlight, 0);
    } finally {
      await pool.close();
      await resolver.close();
      await model.close();
      await home.cleanup();
      await rm(dir, { recursive: true, force: true });
    }
    if (pid !== undefined) assert.ok(!isAlive(pid), `codex ${pid} is still running`);
  },
);

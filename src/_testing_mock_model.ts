/**
 * A Responses-API model provider on loopback that codex can be pointed at (see
 * `_testing_codex_home.ts`). Built on `node:http` so it runs on Deno, Bun and Node.
 *
 * @module
 */

import { createServer, type IncomingMessage, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";

/** One `POST /v1/responses` the mock received. */
export interface MockModelRequest {
  /** The parsed JSON body (`model`, `input`, `tools`, …). */
  readonly body: Record<string, unknown>;
  /** The body's `input` array. */
  readonly input: readonly Record<string, unknown>[];
  /** The text of the last user message in `input`, if any. */
  readonly lastUserText: string | undefined;
  /** The `output` of every `function_call_output` item in `input`, in order. */
  readonly toolOutputs: readonly string[];
}

/** How the mock answers one request. */
export type MockReply =
  /** An assistant message with this text. */
  | { type: "message"; text: string; delayMs?: number }
  /** A `function_call` to codex's `exec_command` tool with `{ cmd }`. */
  | { type: "exec"; cmd: string; delayMs?: number }
  /** Starts the stream (`response.created`) and never finishes it, until `close()`. */
  | { type: "hang" }
  /** Fails the request with this HTTP status (default 500) and an OpenAI-style error body. */
  | { type: "error"; status?: number; message?: string };

/** Chooses the reply for a request. */
export type MockResponder = (request: MockModelRequest) => MockReply;

/** A running mock model provider. */
export interface MockModel {
  /** The provider's `base_url`, e.g. `http://127.0.0.1:PORT/v1`. */
  readonly baseUrl: string;
  /** Every `POST /v1/responses` received so far, oldest first. */
  readonly requests: readonly MockModelRequest[];
  /** The current responder; assign to change behaviour between turns. */
  respond: MockResponder;
  /**
   * Resolves once `count` requests have been received (counting those already in).
   *
   * @throws {Error} After `timeoutMs` (default 10 s) or when the mock closes first.
   */
  waitForRequests(count: number, timeoutMs?: number): Promise<void>;
  /** Closes the server and every connection, hung streams and idle keep-alives included. */
  close(): Promise<void>;
}

/** Options for {@linkcode startMockModel}. */
export interface MockModelOptions {
  /** Initial responder. Defaults to {@linkcode echo}. */
  respond?: MockResponder;
  /**
   * When set, a request without `Authorization: Bearer <requireKey>` gets 401 with an
   * OpenAI-style `invalid_api_key` error, as a real provider answers, and is not recorded
   * in {@linkcode MockModel.requests}.
   */
  requireKey?: string;
}

/**
 * Answers with `${prefix}${last user text}`.
 *
 * @example Echo the prompt
 * ```ts ignore
 * const model = await startMockModel({ respond: echo("you said: ") });
 * ```
 *
 * @param prefix Text put before the echoed user text.
 * @returns A responder.
 */
export function echo(prefix = "echo: "): MockResponder {
  return (request) => ({ type: "message", text: `${prefix}${request.lastUserText ?? ""}` });
}

/**
 * Answers every request with the same assistant message.
 *
 * @example Switch the answer between turns
 * ```ts ignore
 * model.respond = reply("second answer");
 * ```
 *
 * @param text The message text.
 * @returns A responder.
 */
export function reply(text: string): MockResponder {
  return () => ({ type: "message", text });
}

/**
 * Answers the first request of a turn with an `exec_command` call, and the follow-up
 * (the request that carries the call's `function_call_output`) with a message.
 *
 * @example Make the model touch a file (pair with `approvalPolicy: "untrusted"`)
 * ```ts ignore
 * model.respond = execThenReply(`touch ${workspaceDir}/made-by-codex`, "all done");
 * // run a turn; afterwards model.requests[1].toolOutputs holds the command's output
 * ```
 *
 * @param cmd The shell command the model asks codex to run.
 * @param text The message sent once the tool output came back.
 * @returns A responder.
 */
export function execThenReply(cmd: string, text = "done"): MockResponder {
  return (request) =>
    lastItemIsToolOutput(request) ? { type: "message", text } : { type: "exec", cmd };
}

/**
 * Starts the mock on 127.0.0.1 and a random port.
 *
 * @example Answer every request with a fixed text
 * ```ts ignore
 * import { makeCodexHome, reply, startMockModel } from "@codex-broker/broker/testing";
 *
 * const model = await startMockModel({ respond: reply("hello from the mock") });
 * const home = await makeCodexHome(model.baseUrl);
 * // … run codex with CODEX_HOME=home.path …
 * await home.cleanup();
 * await model.close();
 * ```
 *
 * @example Hang a turn, then kill codex while it waits for the model
 * ```ts ignore
 * const model = await startMockModel({ respond: () => ({ type: "hang" }) });
 * // … start a turn through codex …
 * await model.waitForRequests(1); // the turn is now in flight
 * // … kill codex …
 * model.respond = reply("back again"); // for the turns that follow
 * // …
 * await model.close(); // also ends the hung stream
 * ```
 *
 * @param options The initial responder and the API key it requires, if any.
 * @returns The running mock; `close()` it when done.
 */
export async function startMockModel(options: MockModelOptions = {}): Promise<MockModel> {
  const requests: MockModelRequest[] = [];
  const waiters = new Set<{ count: number; settle: (error?: Error) => void }>();
  const timers = new Set<ReturnType<typeof setTimeout>>();
  let closed = false;
  let sequence = 0;

  const server = createServer((req, res) => {
    handle(req, res).catch((error) => {
      if (!res.headersSent) res.writeHead(500, { "content-type": "text/plain" });
      res.end(String(error));
    });
  });

  async function handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const raw = await readBody(req);
    if (req.method !== "POST" || !req.url?.startsWith("/v1/responses")) {
      res.writeHead(404, { "content-type": "text/plain" }).end("not found");
      return;
    }
    if (
      options.requireKey !== undefined &&
      req.headers.authorization !== `Bearer ${options.requireKey}`
    ) {
      res.writeHead(401, { "content-type": "application/json" }).end(JSON.stringify({
        error: {
          message: "Incorrect API key provided",
          type: "invalid_request_error",
          code: "invalid_api_key",
        },
      }));
      return;
    }
    const body = JSON.parse(raw) as Record<string, unknown>;
    const request = toRequest(body);
    requests.push(request);
    for (const waiter of waiters) if (requests.length >= waiter.count) waiter.settle();
    const answer = model.respond(request);

    if (answer.type === "error") {
      res.writeHead(answer.status ?? 500, { "content-type": "application/json" }).end(
        JSON.stringify({
          error: { message: answer.message ?? "mock failure", type: "server_error", code: null },
        }),
      );
      return;
    }
    const id = `resp_${++sequence}`;
    res.writeHead(200, { "content-type": "text/event-stream", "cache-control": "no-cache" });
    send(res, "response.created", { type: "response.created", response: { id } });
    if (answer.type === "hang") return;
    if (answer.delayMs) {
      await new Promise<void>((resolve) => {
        const timer = setTimeout(() => {
          timers.delete(timer);
          resolve();
        }, answer.delayMs);
        timers.add(timer);
      });
      if (closed) return;
    }
    const item = answer.type === "message"
      ? {
        type: "message",
        role: "assistant",
        id: `msg_${sequence}`,
        content: [{ type: "output_text", text: answer.text, annotations: [] }],
      }
      : {
        type: "function_call",
        id: `fc_${sequence}`,
        call_id: `call_${sequence}`,
        name: "exec_command",
        arguments: JSON.stringify({ cmd: answer.cmd }),
      };
    send(res, "response.output_item.done", { type: "response.output_item.done", item });
    send(res, "response.completed", {
      type: "response.completed",
      response: {
        id,
        usage: {
          input_tokens: 10,
          input_tokens_details: null,
          output_tokens: 5,
          output_tokens_details: null,
          total_tokens: 15,
        },
      },
    });
    res.end();
  }

  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      server.off("error", reject);
      resolve();
    });
  });
  const { port } = server.address() as AddressInfo;

  const model: MockModel = {
    baseUrl: `http://127.0.0.1:${port}/v1`,
    requests,
    respond: options.respond ?? echo(),
    waitForRequests(count, timeoutMs = 10_000) {
      if (requests.length >= count) return Promise.resolve();
      if (closed) return Promise.reject(new Error("The mock model is closed"));
      return new Promise<void>((resolve, reject) => {
        const waiter = {
          count,
          settle(error?: Error) {
            clearTimeout(timer);
            waiters.delete(waiter);
            if (error) reject(error);
            else resolve();
          },
        };
        const timer = setTimeout(
          () =>
            waiter.settle(
              new Error(`The mock model saw ${requests.length} of ${count} requests in time`),
            ),
          timeoutMs,
        );
        waiters.add(waiter);
      });
    },
    async close() {
      if (closed) return;
      closed = true;
      for (const timer of timers) clearTimeout(timer);
      timers.clear();
      for (const waiter of waiters) waiter.settle(new Error("The mock model closed"));
      const done = new Promise<void>((resolve) => server.close(() => resolve()));
      // Hung streams and idle keep-alive sockets would hold close() open forever.
      server.closeAllConnections();
      await done;
    },
  };
  return model;
}

function send(res: ServerResponse, event: string, data: unknown): void {
  res.write(`event: ${event}\ndata: ${JSON.stringify(data)}\n\n`);
}

function readBody(req: IncomingMessage): Promise<string> {
  return new Promise((resolve, reject) => {
    const chunks: Uint8Array[] = [];
    req.on("data", (chunk: Uint8Array) => chunks.push(chunk));
    req.on("end", () => resolve(new TextDecoder().decode(concat(chunks))));
    req.on("error", reject);
  });
}

function concat(chunks: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(chunks.reduce((sum, chunk) => sum + chunk.length, 0));
  let offset = 0;
  for (const chunk of chunks) {
    out.set(chunk, offset);
    offset += chunk.length;
  }
  return out;
}

function toRequest(body: Record<string, unknown>): MockModelRequest {
  const input = Array.isArray(body.input) ? body.input as Record<string, unknown>[] : [];
  let lastUserText: string | undefined;
  const toolOutputs: string[] = [];
  for (const item of input) {
    if (item.type === "message" && item.role === "user" && Array.isArray(item.content)) {
      for (const part of item.content as Record<string, unknown>[]) {
        if (part.type === "input_text" && typeof part.text === "string") lastUserText = part.text;
      }
    } else if (item.type === "function_call_output") {
      const output = item.output;
      toolOutputs.push(typeof output === "string" ? output : JSON.stringify(output));
    }
  }
  return { body, input, lastUserText, toolOutputs };
}

// A new user message after a tool output starts a new turn, so only a tool output that
// comes last means "this is the follow-up of my function_call".
function lastItemIsToolOutput(request: MockModelRequest): boolean {
  for (let i = request.input.length - 1; i >= 0; i--) {
    const type = request.input[i]?.type;
    if (type === "function_call_output") return true;
    if (type === "message" && request.input[i]?.role === "user") return false;
  }
  return false;
}

/**
 * A kit for testing code built on codex-broker, offline: the tools this project's own suite
 * uses, with stable APIs. It runs on Deno, Bun and Node and needs no npm package (it uses
 * `node:http`, `node:crypto` and `node:fs`, so it is not web-standard like `mod.ts`).
 *
 * - {@linkcode startFakeAppServer}: a scripted fake codex app-server (WebSocket JSON-RPC on
 *   127.0.0.1), for testing against codex's protocol without codex. {@linkcode codexLike}
 *   makes a connection answer threads and turns the way codex does.
 * - {@linkcode startMockModel}: a loopback model provider (the Responses API over SSE) that
 *   the real codex can talk to, with replies chosen per request ({@linkcode reply},
 *   {@linkcode echo}, {@linkcode execThenReply}, hang, error).
 * - {@linkcode makeCodexHome}: a throwaway `CODEX_HOME` pointing codex at that provider.
 *
 * Everything listens on 127.0.0.1 and a random port, and `close()`/`cleanup()` leave no
 * socket, timer or directory behind (Deno's test sanitizers stay quiet).
 *
 * @example Run a turn against the fake app-server
 * ```ts
 * import { Conn } from "@codex-broker/broker";
 * import { codexLike, startFakeAppServer } from "@codex-broker/broker/testing";
 * import assert from "node:assert/strict";
 *
 * const server = await startFakeAppServer({
 *   token: "test-token",
 *   script: (peer) => codexLike(peer, { text: () => "hello from the fake" }),
 * });
 * try {
 *   const conn = await Conn.dial(server.url, {
 *     headers: { Authorization: "Bearer test-token" },
 *   });
 *   const threadId = await conn.startThread();
 *   const turn = await conn.turn(threadId, {
 *     input: [{ type: "text", text: "hi", text_elements: [] }],
 *   });
 *   assert.equal(turn.status, "completed");
 *   assert.equal(turn.items.at(-1)?.text, "hello from the fake");
 *   conn.close();
 *   await conn.finished;
 * } finally {
 *   await server.close();
 * }
 * ```
 *
 * @example Run the real codex against the loopback model
 * ```ts ignore
 * import { Conn } from "@codex-broker/broker";
 * import { createCodexResolver } from "@codex-broker/broker/supervisor";
 * import { makeCodexHome, reply, startMockModel } from "@codex-broker/broker/testing";
 *
 * const model = await startMockModel({ respond: reply("hello from the mock") });
 * const home = await makeCodexHome(model.baseUrl);
 * const resolver = createCodexResolver({ codexHome: () => home.path });
 * try {
 *   const { url, headers = {} } = await resolver.resolve("ws-1");
 *   const conn = await Conn.dial(url, { headers });
 *   const threadId = await conn.startThread();
 *   const turn = await conn.turn(threadId, {
 *     input: [{ type: "text", text: "hi", text_elements: [] }],
 *   });
 *   console.log(turn.status, model.requests.length); // completed 1
 *   conn.close();
 *   await conn.finished;
 * } finally {
 *   await resolver.close();
 *   await home.cleanup();
 *   await model.close();
 * }
 * ```
 *
 * @module
 */

export {
  agentMessage,
  codexLike,
  type CodexLikeOptions,
  type FakeAgentMessage,
  type FakeAppServer,
  type FakeAppServerOptions,
  type FakeCloseInfo,
  type FakeHeaders,
  type FakeMessage,
  type FakeMessageHandler,
  type FakePeer,
  type FakeRequest,
  type FakeRequestOptions,
  type FakeSendOptions,
  type FakeTurn,
  startFakeAppServer,
  threadResult,
  turnObject,
  type TurnObjectOptions,
} from "./_testing_fake_app_server.ts";
export {
  echo,
  execThenReply,
  type MockModel,
  type MockModelOptions,
  type MockModelRequest,
  type MockReply,
  type MockResponder,
  reply,
  startMockModel,
} from "./_testing_mock_model.ts";
export { type CodexHomeOptions, makeCodexHome, type TempCodexHome } from "./_testing_codex_home.ts";

/**
 * A scripted fake codex app-server: a WebSocket JSON-RPC server on 127.0.0.1 whose
 * connections ("peers") the test drives by hand.
 *
 * @module
 */

import { startWsServer, type WsConnection } from "./_testing_ws_server.ts";

/** The upgrade request's headers, as `node:http` gives them (lower-case names). */
export type FakeHeaders = Readonly<Record<string, string | string[] | undefined>>;

/** How a peer's connection ended. */
export interface FakeCloseInfo {
  /** The close code the client sent, or 1006 when the socket ended without a close frame. */
  readonly code: number;
  /** The close reason the client sent. */
  readonly reason: string;
}

/** Any JSON-RPC message a client sent: a request, a notification or a response. */
export interface FakeMessage {
  /** The request id (requests and responses). */
  readonly id?: number | string;
  /** The method (requests and notifications). */
  readonly method?: string;
  /** The params, as sent. */
  // deno-lint-ignore no-explicit-any -- scripts read arbitrary JSON the client sent.
  readonly params?: any;
  /** The result of a response. */
  readonly result?: unknown;
  /** The error of a response. */
  readonly error?: { code: number; message: string; data?: unknown };
}

/** A client request: a message with an `id` and a `method`. */
export interface FakeRequest extends FakeMessage {
  /** The request id, to answer with {@linkcode FakePeer.reply}. */
  readonly id: number | string;
  /** The method, e.g. `"turn/start"`. */
  readonly method: string;
}

/**
 * Looks at each incoming message before it is queued for {@linkcode FakePeer.expect}; returns
 * true to consume it.
 */
export type FakeMessageHandler = (message: FakeMessage) => boolean;

/** Options for {@linkcode FakePeer.sendRaw}. */
export interface FakeSendOptions {
  /** Splits the message into WebSocket frames of at most this many payload bytes. */
  fragmentSize?: number;
}

/** Options for {@linkcode FakePeer.request}. */
export interface FakeRequestOptions {
  /** The request id. Defaults to a fresh `"fake-N"`. */
  id?: number | string;
}

/** One client connection of a {@linkcode FakeAppServer}, driven by the test. */
export interface FakePeer {
  /** Every message the client sent on this connection, oldest first. */
  readonly received: readonly FakeMessage[];
  /** The upgrade request's headers (lower-case names), e.g. `authorization`. */
  readonly headers: FakeHeaders;
  /** Resolves once the connection has closed, with the client's close code and reason. */
  readonly closed: Promise<FakeCloseInfo>;
  /** Installs a handler that sees (and may consume) messages before they are queued. */
  handle(handler: FakeMessageHandler): void;
  /** Resolves with the next queued or future message with this method. */
  expect(method: string): Promise<FakeRequest>;
  /** Resolves with the next queued or future message of any kind. */
  next(): Promise<FakeMessage>;
  /** Sends one JSON-RPC message (serialized as one text frame). */
  send(message: unknown): void;
  /** Sends text or binary data as is, optionally fragmented. */
  sendRaw(data: string | Uint8Array, options?: FakeSendOptions): void;
  /** Answers a request with a result. */
  reply(request: FakeRequest, result: unknown): void;
  /** Answers a request with a JSON-RPC error. */
  replyError(request: FakeRequest, error: { code: number; message: string; data?: unknown }): void;
  /** Sends a notification. */
  notify(method: string, params: unknown): void;
  /** Sends a server-to-client request and resolves with the client's response. */
  request(method: string, params: unknown, options?: FakeRequestOptions): Promise<FakeMessage>;
  /** Starts the WebSocket closing handshake. */
  close(code?: number, reason?: string): void;
  /** Drops the connection without a closing handshake. */
  terminate(): void;
}

/** Options for {@linkcode startFakeAppServer}. */
export interface FakeAppServerOptions {
  /** Runs for every connection, after the automatic handshake; its errors fail `close()`. */
  script?: (peer: FakePeer) => void | Promise<void>;
  /** When set, upgrades (and plain requests) without `Authorization: Bearer TOKEN` get 401. */
  token?: string;
  /** Answers `initialize` and awaits `initialized` before the script runs. Default true. */
  handshake?: boolean;
  /** Answers `thread/resume` with the thread it names. Default true. */
  autoResume?: boolean;
}

/** A running fake app-server. */
export interface FakeAppServer {
  /** The `ws://127.0.0.1:PORT` URL to dial. */
  readonly url: string;
  /** The port it listens on. */
  readonly port: number;
  /** Every peer so far, oldest first. */
  readonly peers: readonly FakePeer[];
  /** Resolves with the next peer that connects (after its handshake, if automatic). */
  nextPeer(): Promise<FakePeer>;
  /** Waits until every script started so far has returned; rejects with the first error. */
  scriptsDone(): Promise<void>;
  /** Drops every connection and stops listening; rejects with the first script error. */
  close(): Promise<void>;
}

class Peer implements FakePeer {
  readonly received: FakeMessage[] = [];
  readonly headers: FakeHeaders;
  readonly closed: Promise<FakeCloseInfo>;
  #ws: WsConnection;
  #queue: FakeMessage[] = [];
  #waiters: { match: (m: FakeMessage) => boolean; resolve: (m: FakeMessage) => void }[] = [];
  #handlers: FakeMessageHandler[] = [];
  #serverRequests = new Map<number | string, (m: FakeMessage) => void>();
  #nextId = 0;

  constructor(ws: WsConnection, headers: FakeHeaders) {
    this.#ws = ws;
    this.headers = headers;
    this.closed = ws.closed;
    ws.onmessage = (data) => {
      if (typeof data !== "string") return;
      let message: FakeMessage;
      try {
        message = JSON.parse(data);
      } catch {
        return;
      }
      if (message === null || typeof message !== "object") return;
      this.received.push(message);
      this.#dispatch(message);
    };
  }

  #dispatch(message: FakeMessage): void {
    if (message.method === undefined && message.id !== undefined) {
      const waiter = this.#serverRequests.get(message.id);
      if (waiter) {
        this.#serverRequests.delete(message.id);
        waiter(message);
        return;
      }
    }
    for (const handler of this.#handlers) if (handler(message)) return;
    const index = this.#waiters.findIndex((w) => w.match(message));
    if (index === -1) {
      this.#queue.push(message);
      return;
    }
    const [waiter] = this.#waiters.splice(index, 1);
    waiter!.resolve(message);
  }

  handle(handler: FakeMessageHandler): void {
    this.#handlers.push(handler);
    // Messages that came before the handler (same TCP chunk as the handshake) go to it too.
    this.#queue = this.#queue.filter((message) => !handler(message));
  }

  expect(method: string): Promise<FakeRequest> {
    return this.#take((m) => m.method === method) as Promise<FakeRequest>;
  }

  next(): Promise<FakeMessage> {
    return this.#take(() => true);
  }

  #take(match: (m: FakeMessage) => boolean): Promise<FakeMessage> {
    const index = this.#queue.findIndex(match);
    if (index !== -1) return Promise.resolve(this.#queue.splice(index, 1)[0]!);
    return new Promise((resolve) => this.#waiters.push({ match, resolve }));
  }

  send(message: unknown): void {
    this.#ws.send(JSON.stringify(message));
  }

  sendRaw(data: string | Uint8Array, options: FakeSendOptions = {}): void {
    this.#ws.send(data, options);
  }

  reply(request: FakeRequest, result: unknown): void {
    this.send({ id: request.id, result });
  }

  replyError(
    request: FakeRequest,
    error: { code: number; message: string; data?: unknown },
  ): void {
    this.send({ id: request.id, error });
  }

  notify(method: string, params: unknown): void {
    this.send({ method, params });
  }

  request(method: string, params: unknown, options: FakeRequestOptions = {}): Promise<FakeMessage> {
    const id = options.id ?? `fake-${++this.#nextId}`;
    const answer = new Promise<FakeMessage>((resolve) => this.#serverRequests.set(id, resolve));
    this.send({ id, method, params });
    return answer;
  }

  close(code = 1000, reason = ""): void {
    this.#ws.close(code, reason);
  }

  terminate(): void {
    this.#ws.terminate();
  }
}

/**
 * Starts a scripted fake codex app-server on 127.0.0.1 and a random port.
 *
 * @example Answer one turn the way codex does
 * ```ts ignore
 * import { Conn } from "@codex-broker/broker";
 * import { codexLike, startFakeAppServer } from "@codex-broker/broker/testing";
 *
 * const server = await startFakeAppServer({ script: (peer) => codexLike(peer) });
 * const conn = await Conn.dial(server.url);
 * const threadId = await conn.startThread();
 * const turn = await conn.turn(threadId, { input: [{ type: "text", text: "hi", text_elements: [] }] });
 * conn.close();
 * await conn.finished;
 * await server.close();
 * ```
 *
 * @param options The per-connection script, a bearer token, and the automatic answers.
 * @returns The running server; `close()` it when done.
 */
export async function startFakeAppServer(
  options: FakeAppServerOptions = {},
): Promise<FakeAppServer> {
  const script = options.script ?? (() => {});
  const peers: Peer[] = [];
  const errors: unknown[] = [];
  const scripts: Promise<void>[] = [];
  const peerWaiters: ((peer: FakePeer) => void)[] = [];
  const readyPeers: FakePeer[] = [];
  const ws = await startWsServer({
    authorize: (req) =>
      options.token === undefined || req.headers.authorization === `Bearer ${options.token}`
        ? true
        : 401,
    onConnection(connection, req) {
      const peer = new Peer(connection, req.headers);
      if (options.autoResume !== false) {
        peer.handle((m) => {
          if (m.method !== "thread/resume" || m.id === undefined) return false;
          peer.reply(m as FakeRequest, { thread: { id: m.params?.threadId } });
          return true;
        });
      }
      peers.push(peer);
      scripts.push((async () => {
        try {
          if (options.handshake !== false) {
            const init = await peer.expect("initialize");
            peer.reply(init, {
              userAgent: "fake/0.0.0",
              codexHome: "/tmp/fake",
              platformFamily: "unix",
              platformOs: "linux",
            });
            await peer.expect("initialized");
          }
          const waiter = peerWaiters.shift();
          if (waiter) waiter(peer);
          else readyPeers.push(peer);
          await script(peer);
        } catch (error) {
          errors.push(error);
        }
      })());
    },
  });
  return {
    url: `ws://127.0.0.1:${ws.port}`,
    port: ws.port,
    peers,
    nextPeer() {
      const ready = readyPeers.shift();
      if (ready) return Promise.resolve(ready);
      return new Promise((resolve) => peerWaiters.push(resolve));
    },
    async scriptsDone() {
      await Promise.all(scripts);
      if (errors.length > 0) throw errors[0];
    },
    async close() {
      await ws.close();
      if (errors.length > 0) throw errors[0];
    },
  };
}

/** Options for {@linkcode turnObject}. */
export interface TurnObjectOptions {
  /** The turn's status. Default `"completed"`. */
  status?: "completed" | "inProgress" | "interrupted" | "failed";
  /** The turn's items. */
  items?: unknown[];
}

/** A turn as codex reports it in `turn/start` results and `turn/*` notifications. */
export interface FakeTurn {
  /** The turn id. */
  id: string;
  /** The turn's items. */
  items: unknown[];
  /** The turn's status. */
  status: string;
  /** The turn's error, or null. */
  error: null;
  /** Other fields codex sends. */
  [key: string]: unknown;
}

/**
 * Builds a turn object the way codex sends it.
 *
 * @example A completed turn with one agent message
 * ```ts ignore
 * peer.notify("turn/completed", {
 *   threadId,
 *   turn: turnObject("turn-1", { items: [agentMessage("msg-1", "hello")] }),
 * });
 * ```
 *
 * @param id The turn id.
 * @param options The status and items.
 * @returns The turn object.
 */
export function turnObject(id: string, options: TurnObjectOptions = {}): FakeTurn {
  const status = options.status ?? "completed";
  return {
    id,
    rootTurnId: id,
    items: options.items ?? [],
    itemsView: "summary",
    status,
    error: null,
    startedAt: 1,
    completedAt: status === "inProgress" ? null : 2,
    durationMs: status === "inProgress" ? null : 1,
  };
}

/** An `agentMessage` item as codex sends it. */
export interface FakeAgentMessage {
  /** Always `"agentMessage"`. */
  type: "agentMessage";
  /** The item id. */
  id: string;
  /** The message text. */
  text: string;
  /** The message phase; codex sends null for plain answers. */
  phase: null;
}

/**
 * Builds an `agentMessage` item.
 *
 * @example The item of a turn's answer
 * ```ts ignore
 * const item = agentMessage("msg-1", "hello");
 * ```
 *
 * @param id The item id.
 * @param text The message text.
 * @returns The item.
 */
export function agentMessage(id: string, text: string): FakeAgentMessage {
  return { type: "agentMessage", id, text, phase: null };
}

/** Options for {@linkcode codexLike}. */
export interface CodexLikeOptions {
  /** The agent message text per turn, from the turn's `input`. Default `echo turn-N`. */
  text?: (input: unknown) => string;
  /** Sends `turn/completed` before the `turn/start` response, as codex sometimes does. */
  completeFirst?: boolean;
  /** Never completes turns until `turn/interrupt`. */
  hang?: boolean;
}

/**
 * The result of `thread/start` or `thread/resume` as codex 0.169 sends it: the whole thread
 * (no turns) and the settings it runs with.
 *
 * @example Answer thread/start by hand
 * ```ts ignore
 * const start = await peer.expect("thread/start");
 * peer.reply(start, threadResult("thr-1"));
 * ```
 *
 * @param threadId The thread's id.
 * @returns The result object.
 */
export function threadResult(threadId: string): Record<string, unknown> {
  return {
    thread: {
      id: threadId,
      sessionId: `session-${threadId}`,
      projectId: null,
      preview: "",
      ephemeral: false,
      modelProvider: "mock",
      createdAt: 1,
      updatedAt: 1,
      status: { type: "idle" },
      cwd: "/tmp/fake",
      cliVersion: "0.0.0",
      source: "appServer",
      turns: [],
    },
    model: "mock",
    modelProvider: "mock",
    cwd: "/tmp/fake",
    approvalPolicy: "never",
    approvalsReviewer: "user",
    sandbox: { type: "readOnly" },
  };
}

/**
 * Makes a peer answer `thread/start`, `thread/resume`, `turn/start` and `turn/interrupt` the
 * way codex does, with the full notification sequence of each turn and no delay.
 *
 * @example Echo every prompt
 * ```ts ignore
 * const server = await startFakeAppServer({
 *   script: (peer) => codexLike(peer, { text: (input) => JSON.stringify(input) }),
 * });
 * ```
 *
 * @param peer The peer to answer on.
 * @param options The answer text and the ordering.
 */
export function codexLike(peer: FakePeer, options: CodexLikeOptions = {}): void {
  let threads = 0;
  let turns = 0;
  const running = new Map<string, string>();
  peer.handle((m) => {
    if (m.id === undefined) return false;
    const request = m as FakeRequest;
    if (m.method === "thread/start") {
      peer.reply(request, threadResult(`thr-${++threads}`));
      return true;
    }
    if (m.method === "thread/resume") {
      peer.reply(request, threadResult(String(m.params?.threadId)));
      return true;
    }
    if (m.method === "turn/interrupt") {
      peer.reply(request, {});
      const turnId = running.get(m.params?.threadId);
      if (turnId !== undefined && turnId === m.params?.turnId) {
        running.delete(m.params.threadId);
        peer.notify("turn/completed", {
          threadId: m.params.threadId,
          turn: turnObject(turnId, { status: "interrupted" }),
        });
      }
      return true;
    }
    if (m.method !== "turn/start") return false;
    const threadId = String(m.params?.threadId);
    const turnId = `turn-${++turns}`;
    const text = options.text ? options.text(m.params?.input) : `echo ${turnId}`;
    const item = agentMessage(`msg-${turnId}`, text);
    const complete = () => {
      peer.notify("item/completed", {
        threadId,
        turnId,
        item: { type: "userMessage", id: `user-${turnId}`, content: m.params?.input },
        completedAtMs: Date.now(),
      });
      peer.notify("item/completed", { threadId, turnId, item, completedAtMs: Date.now() });
      peer.notify("turn/completed", { threadId, turn: turnObject(turnId, { items: [item] }) });
    };
    const respond = () =>
      peer.reply(request, { turn: turnObject(turnId, { status: "inProgress" }) });
    if (options.hang) {
      running.set(threadId, turnId);
      respond();
      peer.notify("turn/started", { threadId, turn: turnObject(turnId, { status: "inProgress" }) });
    } else if (options.completeFirst) {
      complete();
      respond();
    } else {
      respond();
      peer.notify("turn/started", { threadId, turn: turnObject(turnId, { status: "inProgress" }) });
      complete();
    }
    return true;
  });
}

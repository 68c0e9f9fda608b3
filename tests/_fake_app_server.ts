// deno-lint-ignore-file no-explicit-any -- the fake reads and writes arbitrary JSON-RPC; tests assert on shapes.
// A scripted fake codex app-server on 127.0.0.1, port 0. Tests drive each connection
// ("peer") by hand: wait for a request, answer it, reorder, delay, drop or inject frames.
//
// Every frame it sends through `send` (and `reply`, `replyError`, `notify`, `request`) is
// checked against the installed codex's own schema (tests/_schema.ts), so the fake cannot
// drift from the real codex: a violation is recorded and thrown by `scriptsDone()` and
// `close()`, which fails the test. A frame a test means to be malformed goes through
// `sendRaw` or `sendUnchecked`.
import { codexSchema, type SchemaViolationError } from "./_schema.ts";
import { createServer, type IncomingMessage, type Server } from "node:http";
import type { Duplex } from "node:stream";
import { type WebSocket, WebSocketServer } from "ws";

/** Any JSON-RPC message the client sent. */
export interface Message {
  id?: number | string;
  method?: string;
  params?: any;
  result?: any;
  error?: { code: number; message: string; data?: unknown };
}

/** A client request as received. */
export interface Req extends Message {
  id: number | string;
  method: string;
}

export interface FakeServerOptions {
  /** When set, upgrades (and plain GETs) without `Authorization: Bearer TOKEN` get 401. */
  token?: string;
  /** Answer initialize/initialized automatically before the script runs. Default true. */
  handshake?: boolean;
  /** Answer thread/resume automatically. Default true. */
  autoResume?: boolean;
  /**
   * Check every frame sent through `send` against codex's schema. Default true; off only for
   * a server that speaks methods of its own (the bench's control requests).
   */
  schema?: boolean;
}

type Handler = (message: Message) => boolean;

export class FakePeer {
  readonly received: Message[] = [];
  readonly ws: WebSocket;
  readonly closed: Promise<void>;
  /** Upgrade request headers. */
  readonly headers: IncomingMessage["headers"];
  #queue: Message[] = [];
  #waiters: { match: (m: Message) => boolean; resolve: (m: Message) => void }[] = [];
  #handlers: Handler[] = [];
  #serverRequests = new Map<number | string, (m: Message) => void>();
  #check: ((frame: Message) => void) | undefined;

  /**
   * @param ws The server side of the connection.
   * @param headers The upgrade request's headers.
   * @param violations Where frames that break codex's schema are recorded; unchecked if absent.
   */
  constructor(
    ws: WebSocket,
    headers: IncomingMessage["headers"],
    violations?: SchemaViolationError[],
  ) {
    this.ws = ws;
    this.headers = headers;
    if (violations) {
      const schema = codexSchema();
      this.#check = (frame) => {
        const violation = schema.checkServerFrame(frame, (id) => this.#requestMethod(id));
        if (violation) violations.push(violation);
      };
    }
    this.closed = new Promise((resolve) => ws.once("close", () => resolve()));
    ws.on("message", (data, isBinary) => {
      if (isBinary) return;
      let message: Message;
      try {
        message = JSON.parse(String(data));
      } catch {
        return;
      }
      this.received.push(message);
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
      if (index !== -1) {
        const [waiter] = this.#waiters.splice(index, 1);
        waiter!.resolve(message);
      } else {
        this.#queue.push(message);
      }
    });
  }

  /** Handle messages before they are queued; return true to consume. */
  handle(handler: Handler): void {
    this.#handlers.push(handler);
    // Messages that arrived before the handler was installed (same TCP chunk as the
    // handshake) are offered to it too.
    this.#queue = this.#queue.filter((message) => !handler(message));
  }

  /** The next (queued or future) message with this method. */
  expect(method: string): Promise<Req> {
    return this.#take((m) => m.method === method) as Promise<Req>;
  }

  /** The next message of any kind. */
  next(): Promise<Message> {
    return this.#take(() => true);
  }

  #take(match: (m: Message) => boolean): Promise<Message> {
    const index = this.#queue.findIndex(match);
    if (index !== -1) return Promise.resolve(this.#queue.splice(index, 1)[0]!);
    return new Promise((resolve) => this.#waiters.push({ match, resolve }));
  }

  /** Sends a frame that must conform to codex's schema (see `FakeServerOptions.schema`). */
  send(message: unknown): void {
    this.#check?.(message as Message);
    this.sendUnchecked(message);
  }

  /** Sends a frame as is, unchecked: for frames a test makes malformed on purpose. */
  sendUnchecked(message: unknown): void {
    if (this.ws.readyState === this.ws.OPEN) this.ws.send(JSON.stringify(message));
  }

  /** The method of the latest client request with this id. */
  #requestMethod(id: unknown): string | undefined {
    for (let i = this.received.length - 1; i >= 0; i--) {
      const message = this.received[i]!;
      if (message.id === id && message.method !== undefined) return message.method;
    }
    return undefined;
  }

  sendRaw(data: string | Uint8Array): void {
    if (this.ws.readyState === this.ws.OPEN) this.ws.send(data);
  }

  reply(request: Req, result: unknown): void {
    this.send({ id: request.id, result });
  }

  replyError(request: Req, code: number, message: string, data?: unknown): void {
    this.send({
      id: request.id,
      error: data === undefined ? { code, message } : { code, message, data },
    });
  }

  notify(method: string, params: unknown): void {
    this.send({ method, params });
  }

  /**
   * Sends a server→client request and resolves with the client's answer. `unchecked` skips
   * the schema check, for a request codex would never send (an unknown method).
   */
  request(
    method: string,
    params: unknown,
    id: number | string,
    options: { unchecked?: boolean } = {},
  ): Promise<Message> {
    const answer = new Promise<Message>((resolve) => this.#serverRequests.set(id, resolve));
    if (options.unchecked) this.sendUnchecked({ id, method, params });
    else this.send({ id, method, params });
    return answer;
  }

  close(code = 1000, reason = ""): void {
    this.ws.close(code, reason);
  }

  terminate(): void {
    this.ws.terminate();
  }
}

export interface FakeAppServer {
  readonly url: string;
  readonly port: number;
  readonly peers: FakePeer[];
  /** Resolves with the next peer that connects (after its handshake, if automatic). */
  nextPeer(): Promise<FakePeer>;
  /** Waits until every script started so far has returned; rethrows the first error. */
  scriptsDone(): Promise<void>;
  /** Closes everything; rethrows the first error a script threw. */
  close(): Promise<void>;
}

export async function startFakeAppServer(
  script: (peer: FakePeer) => void | Promise<void> = () => {},
  options: FakeServerOptions = {},
): Promise<FakeAppServer> {
  const peers: FakePeer[] = [];
  const errors: unknown[] = [];
  const violations: SchemaViolationError[] | undefined = options.schema === false ? undefined : [];
  // Generated before the first connection, so no test's first frame pays for it.
  if (violations) codexSchema();
  const failure = () => errors[0] ?? violations?.[0];
  const scripts: Promise<void>[] = [];
  const peerWaiters: ((peer: FakePeer) => void)[] = [];
  const readyPeers: FakePeer[] = [];
  const authorized = (req: IncomingMessage) =>
    options.token === undefined || req.headers.authorization === `Bearer ${options.token}`;
  const http: Server = createServer((req, res) => {
    res.statusCode = authorized(req) ? 426 : 401;
    res.end();
  });
  const wss = new WebSocketServer({ noServer: true });
  http.on("upgrade", (req: IncomingMessage, socket: Duplex, head: Buffer) => {
    if (!authorized(req)) {
      socket.end("HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
      return;
    }
    wss.handleUpgrade(req, socket, head, (ws) => {
      const peer = new FakePeer(ws, req.headers, violations);
      if (options.autoResume !== false) {
        peer.handle((m) => {
          if (m.method !== "thread/resume") return false;
          peer.send({ id: m.id, result: threadResult(m.params?.threadId) });
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
    });
  });
  await new Promise<void>((resolve) => http.listen(0, "127.0.0.1", resolve));
  const address = http.address();
  const port = typeof address === "object" && address ? address.port : 0;
  return {
    url: `ws://127.0.0.1:${port}`,
    port,
    peers,
    nextPeer() {
      const ready = readyPeers.shift();
      if (ready) return Promise.resolve(ready);
      return new Promise((resolve) => peerWaiters.push(resolve));
    },
    async scriptsDone() {
      await Promise.all(scripts);
      const error = failure();
      if (error !== undefined) throw error;
    },
    async close() {
      for (const peer of peers) peer.terminate();
      await Promise.all(peers.map((p) => p.closed));
      wss.close();
      http.closeAllConnections();
      await new Promise<void>((resolve) => http.close(() => resolve()));
      const error = failure();
      if (error !== undefined) throw error;
    },
  };
}

/** A turn as codex sends it. */
export function turnObject(id: string, status = "completed", items: unknown[] = []): any {
  return {
    id,
    rootTurnId: id,
    items,
    itemsView: "summary",
    status,
    error: null,
    startedAt: 1,
    completedAt: status === "inProgress" ? null : 2,
    durationMs: status === "inProgress" ? null : 1,
  };
}

export function agentMessage(id: string, text: string): any {
  return { type: "agentMessage", id, text, phase: null };
}

/**
 * A thread as codex sends it in thread/start, thread/resume and thread/read results.
 * `status` is codex's ThreadStatus, `{ type: "idle" }` by default.
 */
export function threadObject(
  id: string,
  turns: unknown[] = [],
  status: unknown = { type: "idle" },
): any {
  return {
    id,
    sessionId: `session-${id}`,
    projectId: null,
    preview: "",
    ephemeral: false,
    modelProvider: "mock",
    createdAt: 1,
    updatedAt: 1,
    status,
    cwd: "/tmp/fake",
    cliVersion: "0.0.0",
    source: "appServer",
    turns,
  };
}

/** The result of thread/start or thread/resume, as codex sends it. */
export function threadResult(id: string, turns: unknown[] = []): any {
  return {
    thread: threadObject(id, turns),
    model: "mock",
    modelProvider: "mock",
    cwd: "/tmp/fake",
    approvalPolicy: "never",
    approvalsReviewer: "user",
    sandbox: { type: "readOnly" },
  };
}

/**
 * The result of `thread/read` with `includeTurns: true`, as codex sends it.
 *
 * @param id The thread.
 * @param status Its status type: `"active"` (working, no flags), `"idle"`, `"notLoaded"`, ….
 * @param turns Its turns, e.g. from {@linkcode turnObject}.
 */
export function threadReadResult(id: string, status: string, turns: unknown[] = []): any {
  const threadStatus = status === "active" ? { type: "active", activeFlags: [] } : { type: status };
  return { thread: threadObject(id, turns, threadStatus) };
}

/**
 * Params codex could send with a server request, for tests that care only about the answer.
 *
 * @param method A server request method of codex's schema.
 * @returns Params that conform to the schema.
 */
export function serverRequestParams(method: string): any {
  const about = { threadId: "thr-0", turnId: "turn-0" };
  switch (method) {
    case "item/commandExecution/requestApproval":
    case "item/fileChange/requestApproval":
      return { ...about, itemId: "item-0", startedAtMs: 1 };
    case "item/permissions/requestApproval":
      return {
        ...about,
        itemId: "item-0",
        startedAtMs: 1,
        cwd: "/tmp/fake",
        permissions: { network: { enabled: true } },
      };
    case "item/tool/requestUserInput":
      return { ...about, itemId: "item-0", isBlocking: true, questions: [] };
    case "mcpServer/elicitation/request":
      return {
        ...about,
        serverName: "mock",
        mode: "form",
        message: "Your name?",
        requestedSchema: { type: "object", properties: {} },
      };
    case "item/tool/call":
      return { ...about, callId: "call-0", tool: "mock", arguments: {} };
    case "applyPatchApproval":
      return { conversationId: "thr-0", callId: "call-0", fileChanges: {} };
  }
  throw new TypeError(`No sample params for server request ${method}`);
}

/** The params of item/completed, as codex sends them. */
export function itemCompleted(threadId: string, turnId: string, item: unknown): any {
  return { threadId, turnId, item, completedAtMs: 1 };
}

/**
 * A codex that starts thread thr-1 and turn turn-1 (answering turn/start and sending
 * turn/started at once), and runs `rest` for the turn once `gate()` resolves: so two runs of
 * the same turn answer alike, and a test decides when the turn goes on.
 */
export function gatedCodex(
  gate: () => Promise<void>,
  rest: (peer: FakePeer, threadId: string) => void,
): (peer: FakePeer) => void {
  return (peer) => {
    peer.handle((m) => {
      if (m.method === "thread/start") {
        peer.reply(m as Req, threadResult("thr-1"));
        return true;
      }
      if (m.method !== "turn/start") return false;
      const threadId = m.params.threadId as string;
      peer.reply(m as Req, { turn: turnObject("turn-1", "inProgress") });
      peer.notify("turn/started", { threadId, turn: turnObject("turn-1", "inProgress") });
      void gate().then(() => rest(peer, threadId));
      return true;
    });
  };
}

export interface CodexLikeOptions {
  /** Text of the agent message per turn. */
  text?: (input: unknown) => string;
  /** Send turn/completed before the turn/start response. */
  completeFirst?: boolean;
  /** Never complete turns (until interrupted). */
  hang?: boolean;
}

/**
 * Makes a peer answer thread/start, thread/resume, turn/start and turn/interrupt the way
 * codex does, with a full notification sequence per turn, without delay.
 */
export function codexLike(peer: FakePeer, options: CodexLikeOptions = {}): void {
  let threads = 0;
  let turns = 0;
  const running = new Map<string, string>();
  peer.handle((m) => {
    if (m.method === "thread/start") {
      peer.send({ id: m.id, result: threadResult(`thr-${++threads}`) });
      return true;
    }
    if (m.method === "thread/resume") {
      peer.send({ id: m.id, result: threadResult(m.params.threadId) });
      return true;
    }
    if (m.method === "turn/interrupt") {
      peer.send({ id: m.id, result: {} });
      const turnId = running.get(m.params.threadId);
      if (turnId !== undefined && turnId === m.params.turnId) {
        running.delete(m.params.threadId);
        peer.notify("turn/completed", {
          threadId: m.params.threadId,
          turn: turnObject(turnId, "interrupted"),
        });
      }
      return true;
    }
    if (m.method !== "turn/start") return false;
    const threadId = m.params.threadId as string;
    const turnId = `turn-${++turns}`;
    const text = options.text ? options.text(m.params.input) : `echo ${turnId}`;
    const item = agentMessage(`msg-${turnId}`, text);
    const complete = () => {
      peer.notify(
        "item/completed",
        itemCompleted(threadId, turnId, {
          type: "userMessage",
          id: `user-${turnId}`,
          content: m.params.input,
        }),
      );
      peer.notify("item/completed", itemCompleted(threadId, turnId, item));
      peer.notify("turn/completed", { threadId, turn: turnObject(turnId, "completed", [item]) });
    };
    const respond = () =>
      peer.send({ id: m.id, result: { turn: turnObject(turnId, "inProgress") } });
    if (options.hang) {
      running.set(threadId, turnId);
      respond();
      peer.notify("turn/started", { threadId, turn: turnObject(turnId, "inProgress") });
    } else if (options.completeFirst) {
      complete();
      respond();
    } else {
      respond();
      peer.notify("turn/started", { threadId, turn: turnObject(turnId, "inProgress") });
      complete();
    }
    return true;
  });
}

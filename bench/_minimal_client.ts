/**
 * The floor the broker is measured against: a hand-written client doing the same exchange
 * with the least work that still is the exchange. One global `WebSocket`, `turn/start` with
 * an incrementing id, and the turn resolves on the `turn/completed` of its thread. No
 * deadlines, lanes, validation, item collection or events.
 *
 * @module
 */

// `new WebSocket(url, { headers })` is not WHATWG, but Deno, Bun and Node 22 accept it; a
// codex app-server behind a capability token needs the Authorization header.
type WebSocketWithHeaders = new (
  url: string,
  init: { headers: Record<string, string> },
) => WebSocket;

/** A minimal JSON-RPC client over one WebSocket. */
export class MinimalClient {
  #ws: WebSocket;
  #nextId = 0;
  // Setup calls only (initialize, thread/start, bench/cpu); turn/start responses are ignored.
  #calls = new Map<number, { resolve: (result: unknown) => void; reject: (e: Error) => void }>();
  #turns = new Map<string, { resolve: (turn: unknown) => void; reject: (e: Error) => void }>();

  private constructor(ws: WebSocket) {
    this.#ws = ws;
    ws.onmessage = (event) => {
      const message = JSON.parse(event.data as string);
      if (message.method === "turn/completed") {
        const threadId = message.params.threadId;
        const waiter = this.#turns.get(threadId);
        if (waiter) {
          this.#turns.delete(threadId);
          waiter.resolve(message.params.turn);
        }
      } else if (message.method === undefined) {
        const waiter = this.#calls.get(message.id);
        if (waiter) {
          this.#calls.delete(message.id);
          if (message.error) waiter.reject(new Error(message.error.message));
          else waiter.resolve(message.result);
        }
      }
    };
    // A bench must fail, not hang, when the server goes away.
    ws.onclose = () => {
      const error = new Error("MinimalClient: connection closed");
      for (const waiter of this.#calls.values()) waiter.reject(error);
      for (const waiter of this.#turns.values()) waiter.reject(error);
      this.#calls.clear();
      this.#turns.clear();
    };
  }

  /**
   * Connects and performs the initialize handshake.
   *
   * @param url The server's ws:// URL (the fake server, or a real codex app-server).
   * @param headers Upgrade request headers, e.g. codex's `Authorization: Bearer …`.
   * @returns A ready client.
   */
  static async connect(url: string, headers?: Record<string, string>): Promise<MinimalClient> {
    const ws = headers
      ? new (WebSocket as unknown as WebSocketWithHeaders)(url, { headers })
      : new WebSocket(url);
    await new Promise<void>((resolve, reject) => {
      ws.onopen = () => resolve();
      ws.onerror = () => reject(new Error(`MinimalClient: cannot connect to ${url}`));
    });
    ws.onerror = null;
    const client = new MinimalClient(ws);
    await client.call("initialize", {
      clientInfo: { name: "bench_minimal", title: "bench", version: "0.0.0" },
      capabilities: null,
    });
    ws.send(JSON.stringify({ method: "initialized" }));
    return client;
  }

  /**
   * Sends a request and resolves with its result.
   *
   * @param method The JSON-RPC method.
   * @param params Its parameters.
   * @returns The result.
   */
  call(method: string, params: unknown): Promise<unknown> {
    const id = this.#nextId++;
    return new Promise((resolve, reject) => {
      this.#calls.set(id, { resolve, reject });
      this.#ws.send(JSON.stringify({ id, method, params }));
    });
  }

  /**
   * Starts a thread.
   *
   * @returns Its id.
   */
  async startThread(): Promise<string> {
    const result = await this.call("thread/start", {}) as { thread: { id: string } };
    return result.thread.id;
  }

  /**
   * Runs one turn; one at a time per thread, which the bench's workers guarantee.
   *
   * @param threadId The thread.
   * @param params `turn/start` parameters without `threadId`.
   * @returns The turn of `turn/completed`.
   */
  turn(threadId: string, params: Record<string, unknown>): Promise<unknown> {
    return new Promise((resolve, reject) => {
      this.#turns.set(threadId, { resolve, reject });
      this.#ws.send(
        JSON.stringify({
          id: this.#nextId++,
          method: "turn/start",
          params: { ...params, threadId },
        }),
      );
    });
  }

  close(): void {
    this.#ws.close();
  }
}

/**
 * The Server-Sent Events writer of the REST handler: events, heartbeats, a bound on what a
 * slow client can make the broker hold, and one report when the stream ends. Web-standard.
 *
 * @module
 */

import { timerDelay } from "./_timer.ts";

/** Options for {@linkcode openEventStream}. */
export interface EventStreamOptions {
  /** Interval of the `: ping` comments, sent only while nothing waits for the client. */
  heartbeatMs: number;
  /**
   * The most bytes the stream holds that the client has not taken yet. An event that would
   * pass it ends the stream through {@linkcode EventStreamOptions.onOverflow}; one event
   * larger than the bound still goes out when nothing else waits.
   */
  maxBufferBytes: number;
  /** The client cancelled the stream: it went away. */
  onCancel(reason: unknown): void;
  /**
   * The client fell `maxBufferBytes` behind. The event that would have passed the bound is
   * dropped; call {@linkcode EventStream.end} here with the event that says why.
   */
  onOverflow(): void;
  /** Called once, when the stream has ended: by {@linkcode EventStream.end} or a cancel. */
  onEnd(): void;
}

/** An open event stream; serve {@linkcode EventStream.response}. */
export interface EventStream {
  /** The 200 answer whose body is the stream. */
  readonly response: Response;
  /** True once the stream has ended or was cancelled; later events are dropped. */
  readonly ended: boolean;
  /** Sends one event, within the bound. */
  send(event: string, data: unknown): void;
  /** Sends a last event, whatever the bound, and closes the stream. Idempotent. */
  end(event: string, data: unknown): void;
}

const encoder = new TextEncoder();
const PING = encoder.encode(": ping\n\n");

/**
 * Frames one event. JSON.stringify escapes CR and LF inside strings, so the data is one
 * line; the event name comes from codex and is stripped of line breaks to keep the framing.
 *
 * @param event The event name.
 * @param data The data, sent as JSON.
 * @returns The event's text, ending with the blank line.
 */
export function sseEvent(event: string, data: unknown): string {
  return `event: ${event.replace(/[\r\n]/g, "")}\ndata: ${JSON.stringify(data ?? null)}\n\n`;
}

/**
 * Opens an event stream. Events wait in the stream's own buffer until the server pulls, and
 * a pull takes all of them as one chunk: a burst of small notifications costs the server
 * one write, not one per event. What waits there is counted, so a client that stops
 * reading costs at most `maxBufferBytes` here, plus the last chunk the server took and the
 * socket's buffers.
 *
 * @param options Heartbeat, bound, and the hooks for cancel, overflow and end.
 * @returns The stream.
 */
export function openEventStream(options: EventStreamOptions): EventStream {
  const { maxBufferBytes } = options;
  let controller!: ReadableStreamDefaultController<Uint8Array>;
  let ended = false;
  let heartbeat: ReturnType<typeof setInterval> | undefined;
  /** Events the server has not pulled yet. */
  let pending: Uint8Array[] = [];
  let pendingBytes = 0;
  /** The server pulled while nothing was pending: the next event goes out at once. */
  let pulled = false;

  const finish = () => {
    if (ended) return false;
    ended = true;
    clearInterval(heartbeat);
    heartbeat = undefined;
    return true;
  };
  /** Hands everything pending to the server as one chunk. */
  const flush = () => {
    if (pendingBytes === 0) return;
    let chunk: Uint8Array;
    if (pending.length === 1) {
      chunk = pending[0]!;
    } else {
      chunk = new Uint8Array(pendingBytes);
      let offset = 0;
      for (const bytes of pending) {
        chunk.set(bytes, offset);
        offset += bytes.byteLength;
      }
    }
    pending = [];
    pendingBytes = 0;
    pulled = false;
    try {
      controller.enqueue(chunk);
    } catch {
      // The server tore the stream down (errored it): nobody reads it any more.
      if (finish()) options.onEnd();
    }
  };
  const push = (bytes: Uint8Array) => {
    pending.push(bytes);
    pendingBytes += bytes.byteLength;
    if (pulled) flush();
  };
  const close = () => {
    flush();
    if (!finish()) return;
    try {
      controller.close();
    } catch {
      // Already torn down.
    }
    options.onEnd();
  };

  const body = new ReadableStream<Uint8Array>({
    start(c) {
      controller = c;
      heartbeat = setInterval(() => {
        // A ping only keeps an idle connection open: with anything pending the connection is
        // not idle, and pings for a client that does not read would only pile up.
        if (!ended && pendingBytes === 0) push(PING);
      }, timerDelay(options.heartbeatMs));
    },
    pull() {
      if (pendingBytes > 0) flush();
      else pulled = true;
    },
    cancel(reason) {
      pending = [];
      pendingBytes = 0;
      if (!finish()) return;
      options.onCancel(reason);
      options.onEnd();
    },
    // Nothing is queued ahead of a pull: what waits, waits in `pending`, where it is counted.
  }, { highWaterMark: 0 });

  const stream: EventStream = {
    response: new Response(body, {
      status: 200,
      headers: {
        "content-type": "text/event-stream",
        "cache-control": "no-cache",
        // Tells nginx not to buffer the stream, so events and heartbeats pass at once.
        "x-accel-buffering": "no",
      },
    }),
    get ended() {
      return ended;
    },
    send(event, data) {
      if (ended) return;
      const bytes = encoder.encode(sseEvent(event, data));
      if (pendingBytes > 0 && pendingBytes + bytes.byteLength > maxBufferBytes) {
        options.onOverflow();
        // The hook is to end the stream; should it not, the stream still must not grow.
        close();
        return;
      }
      push(bytes);
    },
    end(event, data) {
      if (ended) return;
      pending.push(encoder.encode(sseEvent(event, data)));
      pendingBytes += pending.at(-1)!.byteLength;
      close();
    },
  };
  return stream;
}

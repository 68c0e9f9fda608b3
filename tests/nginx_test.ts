// deploy/nginx.conf, run by a real nginx in front of fake brokers: node:http servers that
// answer with their own id in X-Broker-Id, as brokers do. What these tests prove holds for
// the shipped file: the harness replaces only its server lines and its listen port.
import { test } from "./_test.ts";
import { waitFor, within } from "./_wait.ts";
import {
  type Directive,
  effectiveDirective,
  type Nginx,
  nginxAvailable,
  nginxSeconds,
  parseDump,
  renderConfig,
  SHIPPED_CONFIG,
  startNginx,
} from "./_nginx.ts";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { createServer, type IncomingMessage, type ServerResponse } from "node:http";

/** A request as a fake broker saw it. */
interface Seen {
  method: string;
  url: string;
  workspaceHeader: string | undefined;
  /** Body bytes received, once the body has been read. */
  bytes: number;
}

/** Answers a request whose body has been read (or leaves it open, or drops it). */
type Answer = (response: ServerResponse, seen: Seen, request: IncomingMessage) => void;

interface Broker {
  readonly id: string;
  /** "127.0.0.1:PORT", as the upstream block lists it. */
  readonly address: string;
  readonly seen: Seen[];
  /** Stops listening and drops every connection: connecting is refused from then on. */
  close(): Promise<void>;
}

const answerJson: Answer = (response, seen) => {
  response.writeHead(200, { "content-type": "application/json" });
  response.end(JSON.stringify({ url: seen.url, bytes: seen.bytes }));
};

async function startBroker(id: string, answer: Answer = answerJson, port = 0): Promise<Broker> {
  const seen: Seen[] = [];
  const server = createServer((request, response) => {
    const header = request.headers["x-workspace-id"];
    const entry: Seen = {
      method: request.method ?? "",
      url: request.url ?? "",
      workspaceHeader: Array.isArray(header) ? header.join(",") : header,
      bytes: 0,
    };
    seen.push(entry);
    response.setHeader("x-broker-id", id);
    request.on("data", (chunk: Uint8Array) => entry.bytes += chunk.byteLength);
    request.once("end", () => answer(response, entry, request));
  });
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(port, "127.0.0.1", () => resolve());
  });
  const bound = (server.address() as { port: number }).port;
  let closing: Promise<void> | undefined;
  return {
    id,
    address: `127.0.0.1:${bound}`,
    seen,
    close: () =>
      closing ??= new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
      }),
  };
}

function startBrokers(count: number, answer?: Answer): Promise<Broker[]> {
  return Promise.all(Array.from({ length: count }, (_, i) => startBroker(`b${i + 1}`, answer)));
}

/**
 * Runs `body` against nginx on the shipped config in front of `brokers`, then stops nginx
 * (which checks no nginx process is left) and the brokers, whatever happened.
 */
async function withNginx(
  brokers: Broker[],
  body: (nginx: Nginx) => void | Promise<void>,
  options: { failTimeout?: number } = {},
): Promise<void> {
  let nginx: Nginx | undefined;
  try {
    nginx = await startNginx({ upstreams: brokers.map((b) => b.address), ...options });
    await body(nginx);
  } finally {
    try {
      await nginx?.stop();
    } finally {
      await Promise.all(brokers.map((b) => b.close()));
    }
  }
}

interface Answered {
  status: number;
  /** X-Broker-Id: the broker that answered, `null` when nginx answered itself. */
  broker: string | null;
  contentType: string | null;
  text: string;
}

type Form = "path" | "header";
const FORMS: Form[] = ["path", "header"];

/** POST /api/workspaces/{id}/turns, or POST /api/turns with X-Workspace-Id: {id}. */
async function postTurn(
  nginx: Nginx,
  workspace: string,
  form: Form,
  init: { body?: string; accept?: string; signal?: AbortSignal } = {},
): Promise<Response> {
  const headers: Record<string, string> = { "content-type": "application/json" };
  if (form === "header") headers["x-workspace-id"] = workspace;
  if (init.accept) headers.accept = init.accept;
  const path = form === "path" ? `/api/workspaces/${workspace}/turns` : "/api/turns";
  return await fetch(nginx.url + path, {
    method: "POST",
    headers,
    body: init.body ?? JSON.stringify({ workspaceId: workspace, input: "hi" }),
    ...(init.signal ? { signal: init.signal } : {}),
  });
}

async function turn(
  nginx: Nginx,
  workspace: string,
  form: Form,
  body?: string,
): Promise<Answered> {
  const response = await postTurn(nginx, workspace, form, body === undefined ? {} : { body });
  return {
    status: response.status,
    broker: response.headers.get("x-broker-id"),
    contentType: response.headers.get("content-type"),
    text: await response.text(),
  };
}

/** The broker that serves a workspace, asserting the request succeeded. */
async function brokerOf(nginx: Nginx, workspace: string, form: Form): Promise<string> {
  const answer = await turn(nginx, workspace, form);
  assert.equal(answer.status, 200, `${form} request for ${workspace}: ${answer.text}`);
  assert.ok(answer.broker, `${form} request for ${workspace} has no X-Broker-Id`);
  return answer.broker;
}

/** Which broker serves each workspace (path form), for `workspaces`. */
async function routes(nginx: Nginx, workspaces: string[]): Promise<Map<string, string>> {
  const map = new Map<string, string>();
  for (const id of workspaces) map.set(id, await brokerOf(nginx, id, "path"));
  return map;
}

const WORKSPACES = Array.from({ length: 30 }, (_, i) => `ws-${String(i).padStart(2, "0")}`);

/** The broker that serves the most workspaces in `routing`, so that some have to move. */
function busiest(brokers: Broker[], routing: Map<string, string>): Broker {
  const count = (b: Broker) => [...routing.values()].filter((id) => id === b.id).length;
  return brokers.reduce((best, b) => count(b) > count(best) ? b : best);
}

/** The directives named `name` anywhere in a parsed config. */
function blocksNamed(config: Directive[], name: string): Directive[] {
  return config.flatMap((d) => [
    ...(d.name === name ? [d] : []),
    ...(d.children ? blocksNamed(d.children, name) : []),
  ]);
}

test("nginx is installed (Debian's nginx-light; .ci/run installs it)", () => {
  assert.ok(
    nginxAvailable(),
    "nginx is missing: `apt-get install -y nginx-light` (or set NGINX=/path/to/nginx)",
  );
});

test("the harness changes only the upstream servers and the listen port of the shipped config", () => {
  const shipped = readFileSync(SHIPPED_CONFIG, "utf8").split("\n");
  const rendered = renderConfig(shipped.join("\n"), {
    upstreams: ["127.0.0.1:1001", "127.0.0.1:1002"],
    port: 1234,
    failTimeout: 3,
  }).split("\n");
  const isServer = (line: string) => /^\s*server\s+\S+:\d+/.test(line);
  const isListen = (line: string) => /^\s*listen\s/.test(line);
  const rest = (lines: string[]) => lines.filter((line) => !isServer(line) && !isListen(line));
  assert.deepEqual(rest(rendered), rest(shipped));
  const params = shipped.find(isServer)!.trim().split(/\s+/).slice(2).join(" ")
    .replace(/fail_timeout=\S+?;?$/, "fail_timeout=3s;");
  assert.deepEqual(rendered.filter(isServer).map((line) => line.trim()), [
    `server 127.0.0.1:1001 ${params}`,
    `server 127.0.0.1:1002 ${params}`,
  ]);
  assert.deepEqual(rendered.filter(isListen).map((line) => line.trim()), [
    "listen 127.0.0.1:1234;",
  ]);
});

test("nginx sends every request of a workspace to one broker, by path or X-Workspace-Id", async () => {
  const brokers = await startBrokers(3);
  await withNginx(brokers, async (nginx) => {
    const servedBy = new Map<string, Set<string>>();
    for (const id of WORKSPACES) {
      const set = new Set<string>();
      for (const form of FORMS) {
        for (let i = 0; i < 2; i++) set.add(await brokerOf(nginx, id, form));
      }
      servedBy.set(id, set);
    }
    for (const [id, set] of servedBy) {
      assert.equal(set.size, 1, `${id} was served by ${[...set].join(" and ")}`);
    }
    const serving = new Set([...servedBy.values()].flatMap((set) => [...set]));
    assert.deepEqual([...serving].sort(), brokers.map((b) => b.id));
    // The brokers get the request as the client sent it: the path, and the header that
    // POST /api/turns checks against the body.
    const seen = brokers.flatMap((b) => b.seen);
    assert.equal(seen.length, WORKSPACES.length * 4);
    for (const id of WORKSPACES) {
      assert.equal(seen.filter((s) => s.url === `/api/workspaces/${id}/turns`).length, 2);
      assert.equal(
        seen.filter((s) => s.url === "/api/turns" && s.workspaceHeader === id).length,
        2,
      );
    }
  });
});

test("nginx sends a stopped broker's workspaces to another broker and keeps the others where they were", async () => {
  const brokers = await startBrokers(3);
  await withNginx(brokers, async (nginx) => {
    const before = await routes(nginx, WORKSPACES);
    const victim = busiest(brokers, before);
    await victim.close();
    const moved = new Map<string, string>();
    for (const id of WORKSPACES) {
      for (const form of FORMS) {
        for (let i = 0; i < 2; i++) {
          // brokerOf asserts a 200: a refused connection never reaches the client.
          const now = await brokerOf(nginx, id, form);
          if (before.get(id) === victim.id) {
            assert.notEqual(now, victim.id);
            assert.equal(moved.get(id) ?? now, now, `${id} moved to two brokers`);
            moved.set(id, now);
          } else {
            assert.equal(now, before.get(id), `${id} left its broker ${before.get(id)}`);
          }
        }
      }
    }
    assert.ok(moved.size > 0);
  });
});

test("nginx gives a broker that comes back its workspaces again once fail_timeout is over", async () => {
  const brokers = await startBrokers(3);
  const restarted: Broker[] = [];
  try {
    await withNginx(brokers, async (nginx) => {
      const before = await routes(nginx, WORKSPACES);
      const victim = busiest(brokers, before);
      const own = WORKSPACES.filter((id) => before.get(id) === victim.id);
      await victim.close();
      for (const id of own) assert.notEqual(await brokerOf(nginx, id, "path"), victim.id);
      const port = Number(victim.address.split(":").at(-1));
      restarted.push(await startBroker(victim.id, answerJson, port));
      // nginx leaves the broker out for fail_timeout (1 s here), then tries it again.
      await waitFor(
        `${victim.id} to serve its workspaces again`,
        async () => (await brokerOf(nginx, own[0]!, "path")) === victim.id,
      );
      for (const id of WORKSPACES) {
        assert.equal(await brokerOf(nginx, id, "path"), before.get(id), `${id} did not return`);
      }
    }, { failTimeout: 1 });
  } finally {
    await Promise.all(restarted.map((b) => b.close()));
  }
});

test("nginx moves only the workspaces a broker gains or loses when the upstream list changes", async () => {
  const brokers = await startBrokers(4);
  const [a, b, c, d] = brokers as [Broker, Broker, Broker, Broker];
  try {
    const three = new Map<string, string>();
    let nginx = await startNginx({ upstreams: [a, b, c].map((x) => x.address) });
    try {
      for (const [id, broker] of await routes(nginx, WORKSPACES)) three.set(id, broker);
    } finally {
      await nginx.stop();
    }

    nginx = await startNginx({ upstreams: [a, b, c, d].map((x) => x.address) });
    try {
      for (const [id, broker] of await routes(nginx, WORKSPACES)) {
        if (broker !== three.get(id)) {
          assert.equal(broker, d.id, `adding ${d.id} moved ${id} from ${three.get(id)}`);
        }
      }
    } finally {
      await nginx.stop();
    }

    nginx = await startNginx({ upstreams: [a, c].map((x) => x.address) });
    try {
      for (const [id, broker] of await routes(nginx, WORKSPACES)) {
        if (three.get(id) !== b.id) {
          assert.equal(broker, three.get(id), `removing ${b.id} moved ${id}`);
        }
      }
    } finally {
      await nginx.stop();
    }
  } finally {
    await Promise.all(brokers.map((x) => x.close()));
  }
});

test("nginx answers 502 and does not retry a turn whose broker fails after receiving it", async () => {
  // Every broker drops the connection of this workspace's turn once it has the request.
  const brokers = await startBrokers(3, (response, seen, request) => {
    if (seen.url.includes("/doomed/")) request.socket.destroy();
    else answerJson(response, seen, request);
  });
  await withNginx(brokers, async (nginx) => {
    const answer = await turn(nginx, "doomed", "path");
    assert.equal(answer.status, 502);
    assert.equal(answer.broker, null);
    const tried = brokers.filter((b) => b.seen.some((s) => s.url.includes("/doomed/")));
    assert.equal(tried.length, 1, `the turn reached ${tried.map((b) => b.id).join(", ")}`);
    assert.equal(tried[0]!.seen.length, 1);
  });
});

test("nginx passes each Server-Sent Event on as soon as the broker sends it", async () => {
  let clientHasFirst!: () => void;
  const firstArrived = new Promise<void>((resolve) => clientHasFirst = resolve);
  let secondSent = false;
  // 16 kB, like an event carrying command output: a buffering nginx passes the first few kB
  // and holds the rest back until the broker sends more.
  const first = `event: progress\ndata: ${"x".repeat(16_000)}\n\n`;
  const second = "event: result\ndata: {}\n\n";
  // No X-Accel-Buffering header here, unlike the real broker: the config alone must do it.
  const brokers = await startBrokers(1, (response) => {
    response.writeHead(200, { "content-type": "text/event-stream", "cache-control": "no-cache" });
    response.write(first);
    // When the first event is held back, send the second one after a while anyway, so that
    // the test fails on the assertion below instead of hanging.
    within(firstArrived, 3_000, "the first event").catch(() => {}).finally(() => {
      secondSent = true;
      response.end(second);
    });
  });
  await withNginx(brokers, async (nginx) => {
    const response = await postTurn(nginx, "ws-sse", "path", { accept: "text/event-stream" });
    assert.equal(response.status, 200);
    assert.match(response.headers.get("content-type") ?? "", /^text\/event-stream/);
    const reader = response.body!.pipeThrough(new TextDecoderStream()).getReader();
    let text = "";
    while (text.length < first.length) {
      const { value, done } = await reader.read();
      if (done) break;
      text += value;
    }
    const secondSentBeforeFirstArrived = secondSent;
    clientHasFirst();
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      text += value;
    }
    assert.equal(
      secondSentBeforeFirstArrived,
      false,
      "the first event reached the client only after the broker had sent the second",
    );
    assert.equal(text, first + second);
  });
});

test("nginx waits for the upstream answer longer than the longest turn (30 min)", async () => {
  const brokers = await startBrokers(1);
  await withNginx(brokers, (nginx) => {
    // Asked of nginx itself (`nginx -T`), as it applies to the proxied location: set there,
    // or inherited. Unset means nginx's default of 60 s, which cuts long JSON turns.
    const config = parseDump(nginx.dump());
    const value = effectiveDirective(config, "proxy_read_timeout", "/")?.join(" ") ?? "60s";
    // handler.ts's default maxTimeoutMs, plus a minute for the broker's own timeout answer.
    const longestTurn = 30 * 60;
    assert.ok(
      nginxSeconds(value) >= longestTurn + 60,
      `proxy_read_timeout is ${value}: a turn of 30 minutes would be cut with a 504`,
    );
  });
});

test("nginx relays a JSON answer that takes 1.5 s", async () => {
  const timers = new Set<ReturnType<typeof setTimeout>>();
  const brokers = await startBrokers(1, (response, seen, request) => {
    const timer = setTimeout(() => {
      timers.delete(timer);
      answerJson(response, seen, request);
    }, 1_500);
    timers.add(timer);
  });
  try {
    await withNginx(brokers, async (nginx) => {
      const started = Date.now();
      const answer = await turn(nginx, "ws-slow", "path");
      assert.equal(answer.status, 200, answer.text);
      assert.equal(answer.broker, "b1");
      assert.ok(Date.now() - started >= 1_400);
    });
  } finally {
    for (const timer of timers) clearTimeout(timer);
  }
});

/** A JSON body of exactly `size` bytes. */
function bodyOf(size: number): string {
  const frame = JSON.stringify({ workspaceId: "ws-big", input: "" });
  return JSON.stringify({ workspaceId: "ws-big", input: "x".repeat(size - frame.length) });
}

const MiB = 1024 * 1024;

test("nginx passes a 1 MiB request body to the broker whole", async () => {
  const brokers = await startBrokers(1);
  await withNginx(brokers, async (nginx) => {
    const answer = await turn(nginx, "ws-big", "path", bodyOf(MiB));
    assert.equal(answer.status, 200, answer.text);
    assert.deepEqual(brokers[0]!.seen.map((s) => s.bytes), [MiB]);
  });
});

test("nginx answers a body over 1 MiB itself with the broker's JSON 413, and no broker sees it", async () => {
  const brokers = await startBrokers(3);
  await withNginx(brokers, async (nginx) => {
    // One byte over the limit.
    const answer = await turn(nginx, "ws-big", "path", bodyOf(MiB + 1));
    assert.equal(answer.status, 413, answer.text);
    assert.match(answer.contentType ?? "", /^application\/json/);
    assert.deepEqual(JSON.parse(answer.text), {
      error: {
        code: "bodyTooLarge",
        message: "Request body too large: the limit is 1048576 bytes",
      },
    });
    // The broker would answer 413 before reading the body, and the unread rest breaks the
    // connection (a reset on Deno, a stalled keep-alive connection on Node).
    assert.deepEqual(brokers.flatMap((b) => b.seen), []);
  });
});

test("nginx closes the broker's request when the client goes away", async () => {
  let brokerSawClose!: () => void;
  const closed = new Promise<void>((resolve) => brokerSawClose = resolve);
  // The turn never ends on its own: only the client leaving can close it.
  const brokers = await startBrokers(1, (response) => {
    response.once("close", () => brokerSawClose());
  });
  await withNginx(brokers, async (nginx) => {
    const controller = new AbortController();
    const pending = postTurn(nginx, "ws-gone", "path", { signal: controller.signal });
    await waitFor("the broker to get the turn", () => brokers[0]!.seen.length === 1);
    controller.abort();
    await assert.rejects(pending);
    await within(closed, 5_000, "nginx to close the request to the broker");
  });
});

test("nginx opens a fresh connection to the broker for every request, so a broker closing idle connections never costs a turn", async () => {
  // A POST that nginx writes on a kept-alive connection the broker is just closing (its
  // keep-alive timeout, or a drain on SIGTERM) fails with a 502 and is not retried: turns
  // are not idempotent. This broker closes idle connections after 20 ms, and the requests
  // come at gaps around that, which with upstream keep-alive gives dozens of 502s.
  const server = createServer((request, response) => {
    request.resume();
    request.once("end", () => {
      response.writeHead(200, { "content-type": "application/json", "x-broker-id": "b1" });
      response.end("{}");
    });
  });
  server.keepAliveTimeout = 20;
  let connections = 0;
  server.on("connection", () => connections++);
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", () => resolve()));
  const broker: Broker = {
    id: "b1",
    address: `127.0.0.1:${(server.address() as { port: number }).port}`,
    seen: [],
    close: () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
      }),
  };
  await withNginx([broker], async (nginx) => {
    const statuses: number[] = [];
    for (let i = 0; i < 150; i++) {
      statuses.push((await turn(nginx, "ws-1", "path")).status);
      await new Promise((resolve) => setTimeout(resolve, 15 + (i % 11)));
    }
    assert.deepEqual(statuses.filter((status) => status !== 200), [], "no turn was lost");
    assert.equal(connections, 150, "one connection per request");
  });
});

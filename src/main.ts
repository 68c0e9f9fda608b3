/**
 * The broker server: `POST /api/turns`, `GET /healthz` and `GET /metrics` over HTTP, one
 * `codex app-server` per workspace behind it. Runtime-specific (`node:` modules, `process`):
 * it runs unchanged with `deno run -A src/main.ts`, `bun src/main.ts` and
 * `node src/main.ts` (Node ≥ 22.18), served by `srvx`.
 *
 * It writes JSON log lines (`{"time","level","msg",…}`) to stderr and never logs the
 * secret, but for one line: a secret it generated itself (no `--secret`, no
 * `BROKER_SECRET`) is logged once, as `{"level":"warn","msg":"generated secret","secret",…}`. Once it listens it logs exactly one line with `"msg":"listening"` and the `url`,
 * whose port is the real one when `--port 0` was given. SIGINT, SIGTERM or SIGHUP stops it
 * gracefully: it stops accepting, lets turns in flight finish for `--grace`, then
 * interrupts them, closes the pool, stops every codex and exits 0. A second signal cuts the
 * grace period short. Each codex runs in a process group of its own, so Ctrl+C in a
 * terminal reaches the broker alone and turns get their grace period.
 *
 * Under Deno, run it with `--unstable-no-legacy-abort` (this repository's deno.json sets
 * it): otherwise Deno prints a warning once, and misses some clients that leave an event
 * stream (a Node client, for one), so their turns run on until they end by themselves.
 *
 * @example Start it from a shell
 * ```sh
 * BROKER_SECRET=s3cret deno run -A src/main.ts --port 8787 --workspaces-dir /srv/workspaces
 * ```
 *
 * @example Embed it in a process of your own
 * ```ts ignore
 * import { startBroker } from "@codex-broker/broker/main";
 *
 * const broker = await startBroker({ secret: "s3cret", port: 0, log: (e) => console.error(e) });
 * console.log(broker.url);
 * // …
 * await broker.close();
 * ```
 *
 * @module
 */

import { spawnSync } from "node:child_process";
import { existsSync, realpathSync } from "node:fs";
import { mkdir, mkdtemp, readdir, readFile, rm, writeFile } from "node:fs/promises";
import type { IncomingMessage, ServerResponse } from "node:http";
import { homedir, hostname, totalmem } from "node:os";
import { join, resolve as resolvePath } from "node:path";
import process from "node:process";
import { fileURLToPath } from "node:url";
import { serve as serveNative, type Server, type ServerOptions } from "srvx";
import { FastResponse, serve as serveNode } from "srvx/node";
import { openNetWebSocket } from "./net_websocket.ts";
import { type CodexHealth, createTurnsHandler, VERSION } from "./handler.ts";
import { createTokenVerifier, type JsonWebKeySet, type TokenVerifier } from "./auth.ts";
import { Metrics } from "./metrics.ts";
import { Pool, type PoolEvent } from "./pool.ts";
import { PoolClosedError } from "./errors.ts";
import { cleanUpLeftovers, createCodexResolver, defaultCodexCommand } from "./supervisor.ts";
import { checkCodexCredentials, type CredentialsState } from "./_credentials.ts";
import { isValidWorkspaceId } from "./_workspace_id.ts";
import { createFileLeaseStore } from "./file_lease.ts";
import { Ownership } from "./ownership.ts";
import { leasedResolver } from "./_leased_resolver.ts";
import { createParamsCheck, DEFAULT_POLICY, type Policy } from "./policy.ts";
import { workspacePathResolver } from "./_workspace_path.ts";
import type { ApprovalDecision } from "./approvals.ts";
import type { CodexUser } from "./_codex_user.ts";
import {
  MIN_SECRET_BYTES,
  type ParsedFlags,
  parseFlags,
  secretProblem,
  USAGE,
  UsageError,
} from "./_flags.ts";
import { timerDelay } from "./_timer.ts";
import { scrubInitialEnvironment } from "./_environ_scrub.ts";
import { stderrSink } from "./_stderr_sink.ts";
import { IS_NODE } from "./_runtime.ts";
import { setV8Pretenuring } from "./_v8_tuning.ts";

// Re-exported so this entry point documents every type its API mentions.
export type { ApprovalDecision } from "./approvals.ts";
export type { CredentialsState } from "./_credentials.ts";
export type {
  ApprovalPolicyName,
  ApprovalsReviewerName,
  CredentialKind,
  CredentialRules,
  ExtraFields,
  Policy,
  PolicyDefaults,
  SandboxMode,
} from "./policy.ts";
export type { CodexUser } from "./_codex_user.ts";
// The command line lives in its own module; it stays part of this entry point's API.
export { parseDuration, parseFlags, USAGE, UsageError } from "./_flags.ts";
export type { ParsedFlags, SecretSource } from "./_flags.ts";

/** The broker's WebSocket client to codex: see {@linkcode BrokerOptions.wsClient}. */
export type WsClient = "net" | "web";

/** The HTTP server of a broker on Deno: see {@linkcode BrokerOptions.denoServer}. */
export type DenoServer = "node" | "native";

/** V8's allocation-site pretenuring: see {@linkcode BrokerOptions.v8Pretenuring}. */
export type V8Pretenuring = "on" | "off";

/** Severity of a {@linkcode LogEntry}. */
export type LogLevel = "info" | "warn" | "error";

/** One structured log record; {@linkcode main} adds `time` and writes it as a JSON line. */
export interface LogEntry {
  /** Severity. */
  level: LogLevel;
  /** What happened, e.g. `"listening"`, `"dial"`, `"turn"`, `"shutdown"`. */
  msg: string;
  /** Details: workspace, thread, turn, status, duration, pid, url, … Never a secret. */
  [field: string]: unknown;
}

/** Options for {@linkcode startBroker}. Durations are in milliseconds. */
export interface BrokerOptions {
  /**
   * The `X-Internal-Secret` every `POST /api/turns` must carry. Required: printable ASCII,
   * not starting or ending with a space (HTTP strips those from header values).
   */
  secret: string;
  /** Address to listen on. Defaults to `127.0.0.1`. */
  host?: string;
  /** Port to listen on; `0` picks a free one (see {@linkcode Broker.url}). Defaults to 8787. */
  port?: number;
  /** A workspace's connection and codex are stopped after this long idle. Defaults to 5 min. */
  idleTtlMs?: number;
  /**
   * A turn with no frame from codex for this long is looked up with `thread/read`: returned
   * if codex ended it, failed with transport code `turnLost` if its thread is idle. Defaults
   * to 60 s.
   */
  turnSilenceMs?: number;
  /**
   * Each workspace's state lives in `<workspacesDir>/<workspaceId>`, created on demand:
   * `work/` (codex's working directory), `codex-home/` (its own `CODEX_HOME`), `run/` (its
   * capability token) and `lease/`. Share it between brokers to scale out. Defaults to
   * `./workspaces`.
   */
  workspacesDir?: string;
  /**
   * The operator's codex configuration and credentials, copied into each workspace's own
   * `CODEX_HOME` before its codex starts (`config.toml`, `auth.json`, …; the newer file
   * wins). Defaults to `$CODEX_HOME`, else `~/.codex`.
   */
  codexHome?: string;
  /** The codex executable. Defaults to the one in `node_modules`, then `codex` on `PATH`. */
  codex?: string;
  /** How codex's approval requests are answered. Defaults to `"decline"`. */
  approvals?: ApprovalDecision;
  /** How long {@linkcode Broker.close} lets turns in flight finish. Defaults to 10 s. */
  graceMs?: number;
  /**
   * How long a client may take to send a request: its headers (on Node and Deno; Bun closes
   * a connection idle for 10 s) and then its body, each; a slower one
   * is answered 408 `requestTimeout` and its connection closed. Defaults to 60 s.
   */
  requestTimeoutMs?: number;
  /**
   * How long a keep-alive connection may stay idle between requests: Node's and Deno's
   * `keepAliveTimeout`, Bun's `idleTimeout` (whole seconds, at least 1). Defaults to each
   * server's own (5 s on `node:http`, 10 s on Bun). A turn in progress is never cut by it.
   */
  keepAliveTimeoutMs?: number;
  /**
   * Which HTTP server the broker uses on Deno (other runtimes ignore it): `"node"`, Deno's
   * `node:http`, which closes idle keep-alive connections and half-sent requests and honours
   * `Connection: close`; or `"native"`, `Deno.serve`, which never closes a slow or idle
   * client's connection, so it belongs behind a proxy that does (nginx), and takes no less
   * CPU per turn (`npm run bench -- p4`). Defaults to `"node"`.
   */
  denoServer?: DenoServer;
  /**
   * The WebSocket client of the connections to codex: `"net"`, the broker's own RFC 6455
   * client on `node:net`, which writes the frames sent in one turn of the event loop in one
   * system call and counts every unsent byte in `bufferedAmount` on every runtime; or
   * `"web"`, the runtime's `WebSocket`. With an instantly answering codex, `"net"` took
   * 10–18% less CPU per turn on each runtime (`npm run bench -- p4`). Defaults to `"net"`.
   */
  wsClient?: WsClient;
  /**
   * V8's allocation-site pretenuring, for the whole process, set when the broker starts:
   * `"off"` or `"on"`; unset, the runtime's own setting stays. Node only: Deno's V8 takes no
   * flags once started, so `npm start` runs
   * `deno run --v8-flags=--no-allocation-site-pretenuring` (about 8% less CPU per turn there),
   * and Bun runs JavaScriptCore. The command (`main`) turns it off: under load V8 sent a few
   * of a turn's sites, and through them most of every turn's objects, to the old generation
   * (with an instant codex, 0.65 MB promoted per young-generation collection, 0.01 MB with it
   * off; `npm run bench -- p4` shows both).
   */
  v8Pretenuring?: V8Pretenuring;
  /** Receives the log records: start, dial, reap, evict, close, turns, shutdown. */
  log?: (entry: LogEntry) => void;
  /**
   * This broker's id in workspace leases and in the `X-Broker-Id` header; unique among the
   * brokers that share a workspaces directory. Defaults to `<hostname>:<port>`.
   */
  brokerId?: string;
  /** Where the other brokers reach this one. Defaults to the URL it listens on. */
  advertiseUrl?: string;
  /**
   * A workspace whose broker died is taken over by another this long after its lease was
   * last renewed. Defaults to 15 s.
   */
  leaseTtlMs?: number;
  /**
   * At most this many codex processes at once. Defaults to what the machine's memory holds
   * at about 150 MB per idle codex, keeping a fifth of the memory free.
   */
  maxWorkspaces?: number;
  /**
   * Right after listening, ask a throwaway codex (on a copy of the codex home) whether it has
   * credentials, in the background and for at most a few seconds; log one warning with what
   * to run if it has none, and report it in `GET /healthz` as `codex.credentials`. Defaults
   * to `true`.
   */
  checkCredentials?: boolean;
  /**
   * What callers may set in `threadParams` and `params` (see `parsePolicy`); anything else
   * is refused with 403 `forbiddenParam`. A `cwd` or writable root must resolve inside the
   * workspace's `work/` directory, symlinks included. Defaults to `DEFAULT_POLICY`.
   */
  policy?: Policy;
  /**
   * Run every codex (and so every command its model runs) as this user, which then owns
   * each workspace's `work/` and `codex-home/` (0700), while `run/` and `lease/` stay the
   * broker's. The broker must run as root. Defaults to the broker's own user.
   */
  codexUser?: CodexUser;
  /**
   * Also accept `Authorization: Bearer <JWT>` signed HS256 with this key (at least 32
   * bytes); see `createTokenVerifier` for the claims.
   */
  jwtSecret?: string | Uint8Array;
  /**
   * Also accept bearer JWTs signed EdDSA, ES256 or RS256 by a key of this JSON Web Key Set:
   * an `https://` URL (fetched again every 5 minutes, and for a key it lacks at most every
   * 30 s), or a file path (read at start, where a bad file stops the start, then re-read
   * every 30 s and for a key it lacks at most every second).
   */
  jwks?: string;
  /** A bearer JWT's `aud` must hold this value. */
  jwtAudience?: string;
  /** A bearer JWT's `iss` must be this value. */
  jwtIssuer?: string;
  /** At most this many turns of one workspace at once. Defaults to 16. */
  maxTurnsPerWorkspace?: number;
  /**
   * At most this many more turns of one workspace wait; past that a turn is answered 429
   * `tooManyTurns`. Defaults to 64.
   */
  maxWaitingTurnsPerWorkspace?: number;
}

/** A running broker, from {@linkcode startBroker}. */
export interface Broker {
  /** Where it listens, e.g. `http://127.0.0.1:8787`, with the real port. */
  readonly url: string;
  /** Its id, as in `X-Broker-Id` and its leases. */
  readonly id: string;
  /** Requests being answered right now (a streaming answer counts until its end). */
  readonly inFlight: number;
  /**
   * Stops gracefully: stops accepting, lets requests in flight finish for `graceMs`, then
   * interrupts their turns, closes the pool and stops every codex. Idempotent.
   *
   * @returns Once every codex has exited.
   */
  close(): Promise<void>;
  /** Ends the grace period of a {@linkcode Broker.close} at once: turns are interrupted now. */
  hurry(): void;
  /**
   * Resolves with what codex said about its credentials at start (`unknown` when the check
   * is off, failed, or was stopped by {@linkcode Broker.close}).
   */
  readonly credentials: Promise<CredentialsState>;
}

/** Options for {@linkcode main}; the defaults are the real process's. */
export interface MainOptions {
  /**
   * Environment to read `BROKER_SECRET` from; the variable is deleted from it once read, so
   * no child inherits it. Defaults to `process.env`.
   */
  env?: Record<string, string | undefined>;
  /** Receives `--help`. Defaults to the process's stdout. */
  stdout?: (text: string) => void;
  /** Receives log lines and error messages. Defaults to the process's stderr. */
  stderr?: (text: string) => void;
  /** Aborting it shuts the broker down as SIGTERM would. */
  signal?: AbortSignal;
  /** Listen for SIGINT, SIGTERM and SIGHUP. Defaults to `true`. */
  handleSignals?: boolean;
}

const DEFAULT_HOST = "127.0.0.1";
const DEFAULT_PORT = 8787;
const DEFAULT_IDLE_TTL_MS = 5 * 60_000;
const DEFAULT_GRACE_MS = 10_000;
const DEFAULT_REQUEST_TIMEOUT_MS = 60_000;
const DEFAULT_WORKSPACES_DIR = "workspaces";
const DEFAULT_LEASE_TTL_MS = 15_000;
// What one idle codex app-server holds (measured: about 146 MB RSS), with some headroom.
const WORKSPACE_COST_BYTES = 160 * 1024 * 1024;

/**
 * How many codex processes fit the machine: four fifths of its memory at
 * {@linkcode WORKSPACE_COST_BYTES} each, and at least one.
 *
 * @returns The default of `--max-workspaces`.
 */
function defaultMaxWorkspaces(): number {
  return Math.max(1, Math.floor(totalmem() * 0.8 / WORKSPACE_COST_BYTES));
}
// After the grace period, how long interrupted turns get to be answered before the
// remaining connections are cut.
const INTERRUPT_WAIT_MS = 5_000;
// How long closing the listener may take once no request is in flight any more.
const LISTENER_CLOSE_MS = 2_000;
// How often Node's idle keep-alive connections are closed during a shutdown.
const SWEEP_MS = 50;
// SIGHUP too: codex runs in process groups of its own, so a closed terminal reaches only
// the broker, which then stops them.
const SIGNALS = ["SIGINT", "SIGTERM", "SIGHUP"] as const;
// Two deliveries of one signal closer than this are one keypress seen twice (see main()).
const DUPLICATE_SIGNAL_MS = 500;
const POOL_EVENTS = ["dial", "reap", "evict", "release", "close"] as const;
// How long the start-up credentials check may take before it reports `unknown`.
const CREDENTIALS_CHECK_MS = 5_000;

/**
 * Starts a broker: a codex supervisor, a pool over it, the REST handler, and an HTTP server
 * (srvx) in front. It does not install signal handlers; {@linkcode main} does.
 *
 * @example Start on a free port and stop
 * ```ts ignore
 * const broker = await startBroker({ secret: "s3cret", port: 0, workspacesDir: "/tmp/ws" });
 * const response = await fetch(`${broker.url}/healthz`);
 * await broker.close();
 * ```
 *
 * @param options Secret, address, directories, codex, approvals, durations, log sink.
 * @returns The running broker; `close()` it to stop every codex.
 * @throws {TypeError} If the secret is empty or could never match (see `BrokerOptions.secret`).
 * @throws {RangeError} If `graceMs` is negative or not a number.
 * @throws {Error} If the workspaces directory cannot be created or written to, the port
 * cannot be bound, or the JWKS file cannot be read or the bearer-token keys are bad; the
 * message names the path or the address, and the reason.
 */
export async function startBroker(options: BrokerOptions): Promise<Broker> {
  if (typeof options.secret !== "string") {
    throw new TypeError("Cannot start broker: secret must be a non-empty string");
  }
  const problem = secretProblem(options.secret);
  if (problem !== undefined) throw new TypeError(`Cannot start broker: invalid secret: ${problem}`);
  const log = options.log ?? (() => {});
  if (options.codexUser !== undefined && process.getuid?.() !== 0) {
    throw new TypeError(
      "Cannot start broker: codexUser needs a broker running as root, to switch user",
    );
  }
  // Before anything is allocated for requests: V8 makes its pretenuring decisions as it
  // collects garbage.
  if (options.v8Pretenuring !== undefined) setV8Pretenuring(options.v8Pretenuring);
  const graceMs = options.graceMs ?? DEFAULT_GRACE_MS;
  if (!(graceMs >= 0)) {
    throw new RangeError(`Invalid graceMs: expected a non-negative number, got ${graceMs}`);
  }
  const workspacesDir = resolvePath(options.workspacesDir ?? DEFAULT_WORKSPACES_DIR);
  const codexHome = options.codexHome === undefined ? undefined : resolvePath(options.codexHome);
  await checkWorkspacesDir(workspacesDir);
  if (options.codexUser !== undefined) checkReachable(workspacesDir, options.codexUser);
  const tokens = await tokenVerifier(options);

  // One directory per workspace holds everything codex keeps for it, so the workspace
  // moves as a unit to whichever broker serves it next (see the README's layout).
  const work = (workspaceId: string) => join(workspacesDir, workspaceId, "work");
  const run = (workspaceId: string) => join(workspacesDir, workspaceId, "run");
  // What a crashed broker on this machine left running (its watchdogs normally take care of
  // that) is stopped before any codex of ours starts.
  const ids = (await readdir(workspacesDir).catch(() => [] as string[])).filter(
    isValidWorkspaceId,
  );
  const leftovers = await cleanUpLeftovers(ids.map(run));
  if (leftovers.killed.length > 0 || leftovers.removed.length > 0 || leftovers.errors.length > 0) {
    log({
      level: leftovers.errors.length > 0 ? "warn" : "info",
      msg: "leftovers",
      killed: leftovers.killed,
      removed: leftovers.removed.length,
      errors: leftovers.errors.map((error) => error.message),
    });
  }
  if (codexHome !== undefined && !existsSync(codexHome)) {
    throw new Error(`Cannot start broker: the codex home ${codexHome} does not exist`);
  }
  const template = codexHome ?? process.env.CODEX_HOME ?? join(homedir(), ".codex");
  const supervisor = createCodexResolver({
    ...(options.codex === undefined ? {} : { command: options.codex }),
    // codex runs in the workspace's work directory, and so does every command it starts.
    cwd: work,
    codexHome: (workspaceId) => join(workspacesDir, workspaceId, "codex-home"),
    ...(existsSync(template) ? { codexHomeTemplate: template } : {}),
    runDir: run,
    ...(options.codexUser === undefined ? {} : { user: options.codexUser }),
    ...(options.brokerId === undefined ? {} : { brokerId: options.brokerId }),
    // codex runs model-chosen commands, which must not find the key to this broker.
    env: { BROKER_SECRET: undefined },
    onError: (error) => log({ level: "error", msg: "supervisor", error: error.message }),
  });
  // Filled in once the server listens: the default id and URL carry the real port. No
  // request can reach the handler (and so the leases) before.
  const holder = { id: "", url: "" };
  const leases = createFileLeaseStore({
    dir: (workspaceId) => join(workspacesDir, workspaceId, "lease"),
    ttlMs: options.leaseTtlMs ?? DEFAULT_LEASE_TTL_MS,
  });
  const ownership = new Ownership({
    store: leases,
    holder,
    onLost: (workspaceId) => {
      // Another broker may start this workspace now: stop it at once.
      log({ level: "warn", msg: "lease lost", workspaceId });
      void pool.release(workspaceId);
    },
    onHandOver: async (workspaceId) => {
      const released = await pool.release(workspaceId, { ifIdle: true });
      log({ level: "info", msg: released ? "handed over" : "hand-over declined", workspaceId });
      return released;
    },
  });
  const resolver = leasedResolver(supervisor, ownership);
  const pool: Pool = new Pool(resolver, {
    idleTtlMs: options.idleTtlMs ?? DEFAULT_IDLE_TTL_MS,
    maxConnections: options.maxWorkspaces ?? defaultMaxWorkspaces(),
    dial: {
      approvals: options.approvals ?? "decline",
      ...((options.wsClient ?? "net") === "net" ? { webSocket: openNetWebSocket } : {}),
      ...(options.turnSilenceMs === undefined ? {} : { turnSilenceMs: options.turnSilenceMs }),
    },
  });
  const onPoolEvent = (event: Event) => {
    const { type, workspaceId } = event as PoolEvent;
    if (type === "dial") {
      log({ level: "info", msg: "dial", workspaceId, pid: supervisor.pid(workspaceId) });
    } else if (type === "close") log({ level: "warn", msg: "close", workspaceId });
    else log({ level: "info", msg: type, workspaceId });
  };
  for (const type of POOL_EVENTS) pool.addEventListener(type, onPoolEvent);

  // Aborted once the grace period is over: the handler interrupts every turn in flight with
  // its reason, so Conn sends turn/interrupt and codex stops working for a broker that is
  // going away.
  const stopping = new AbortController();
  // A request counts from the moment the server hands it over until the handler is done
  // with it (an event stream until its end). What is left to send after that is the
  // listener's close() to wait for, on every runtime alike.
  const inFlight = new InFlight();
  const metrics = new Metrics();
  // Set once the server listens (see holder); the server answers 503 until then.
  const serving: { handler?: (request: Request) => Promise<Response> } = {};

  let server: Server | undefined;
  let url: string;
  const host = options.host ?? DEFAULT_HOST;
  const port = options.port ?? DEFAULT_PORT;
  const bunIdleSeconds = options.keepAliveTimeoutMs === undefined
    ? BUN_IDLE_TIMEOUT_S
    : Math.min(255, Math.max(1, Math.ceil(options.keepAliveTimeoutMs / 1000)));
  try {
    // Bun throws here when the port is taken, node:http (Node and Deno) from ready().
    server = serve(options.denoServer ?? "node", {
      hostname: host,
      port,
      // main() owns the signals and the log; srvx would print to stdout and exit on its own.
      silent: true,
      gracefulShutdown: false,
      node: {
        ...nodeTimeouts(options.requestTimeoutMs ?? DEFAULT_REQUEST_TIMEOUT_MS),
        ...(options.keepAliveTimeoutMs === undefined
          ? {}
          : { keepAliveTimeout: timerDelay(options.keepAliveTimeoutMs) }),
      },
      bun: { idleTimeout: bunIdleSeconds },
      fetch: (request: Request) => {
        const handler = serving.handler;
        if (!handler) return new Response(null, { status: 503, headers: { "retry-after": "1" } });
        inFlight.enter();
        const bun = bunServerOf(request);
        if (bun === undefined) return handler(request);
        // Bun's idle timeout also runs while the handler waits for codex and while an event
        // stream is quiet, and would cut a turn longer than it (silently, for a stream):
        // it is off for the request, and back for the idle time after a whole answer.
        bun.timeout(request, 0);
        return handler(request).then((response) => {
          if (!isEventStream(response)) bun.timeout(request, bunIdleSeconds);
          return response;
        });
      },
    });
    await server.ready();
    url = (server.url ?? "").replace(/\/$/, "");
    if (url === "") throw new Error("srvx did not report the address it listens on");
  } catch (error) {
    await Promise.allSettled([server?.close(true), pool.close()]);
    await supervisor.close();
    await ownership.close();
    throw new Error(
      `Cannot start broker: cannot listen on ${hostPort(host, port)}: ${listenFailure(error)}`,
      { cause: error },
    );
  }
  // In the background: listening is not delayed, and close() stops the throwaway codex.
  const health: CodexHealth = { credentials: "unknown" };
  const checkStop = new AbortController();
  const credentials = options.checkCredentials === false
    ? Promise.resolve<CredentialsState>("unknown")
    : checkCredentials(template, options.codex, checkStop.signal, log).then((state) => {
      health.credentials = state;
      return state;
    });
  holder.id = options.brokerId ?? `${hostname()}:${new URL(url).port}`;
  holder.url = options.advertiseUrl ?? url;
  serving.handler = createTurnsHandler(pool, {
    secret: options.secret,
    // node:http (Node, and Deno by default): srvx writes its own answers straight to the
    // socket, where a web Response's body goes through a web stream (7% of the CPU per turn
    // on Node with an instant codex).
    ...(server.node === undefined
      ? {}
      : { jsonResponse: (body, init) => new FastResponse(body, init) as Response }),
    // node:http and Bun refuse a head over 16 KiB before the handler (tests/bad_clients_test.ts);
    // Deno.serve lets up to about 64 KiB through.
    checkHeadSize: options.denoServer === "native" && "Deno" in globalThis,
    ...(tokens ? { tokens } : {}),
    ...(options.maxTurnsPerWorkspace === undefined
      ? {}
      : { maxTurnsPerWorkspace: options.maxTurnsPerWorkspace }),
    ...(options.maxWaitingTurnsPerWorkspace === undefined
      ? {}
      : { maxWaitingTurnsPerWorkspace: options.maxWaitingTurnsPerWorkspace }),
    ...(options.requestTimeoutMs === undefined
      ? {}
      : { requestTimeoutMs: options.requestTimeoutMs }),
    version: VERSION,
    metrics,
    brokerId: holder.id,
    ownership,
    checkParams: createParamsCheck(options.policy ?? DEFAULT_POLICY, {
      resolvePath: workspacePathResolver(work),
    }),
    shutdownSignal: stopping.signal,
    codexHealth: () => ({ ...health }),
    onRequestEnd: () => inFlight.leave(),
    log: (entry) => {
      const level: LogLevel = entry.msg === "internal error"
        ? "error"
        : entry.msg === "bad request" || entry.msg === "token keys unavailable"
        ? "warn"
        : "info";
      // level and msg first, as in every log line; msg is a string whatever the entry says.
      const line: LogEntry = { level, msg: "", ...entry };
      line.msg = String(entry.msg);
      log(line);
    },
  });
  const listener = server;

  const nodeServer = listener.node?.server as { closeIdleConnections?(): void } | undefined;
  let closing: Promise<void> | undefined;
  const hurry = new AbortController();
  return {
    url,
    id: holder.id,
    get inFlight() {
      return inFlight.count;
    },
    hurry: () => hurry.abort(),
    credentials,
    close() {
      closing ??= (async () => {
        const started = performance.now();
        checkStop.abort();
        // From now on every new turn is answered 503 with Retry-After (and Connection:
        // close); the turns in flight finish. The listener stays open meanwhile: closing it
        // resets connections a proxy has just opened and sent a turn on, which the proxy
        // may not retry (a turn is not idempotent), so it closes once this broker has let go
        // of its workspaces and the others can take them.
        ownership.drain();
        if (!await inFlight.idle(graceMs, hurry.signal)) {
          log({ level: "warn", msg: "interrupting turns", inFlight: inFlight.count, graceMs });
          stopping.abort(new PoolClosedError("Cannot run turn: broker is shutting down"));
          await inFlight.idle(INTERRUPT_WAIT_MS);
        }
        await pool.close();
        await supervisor.close();
        await credentials;
        // After every codex stopped: only then may another broker start its workspaces.
        await ownership.close();
        const closed = listener.close();
        closed.catch(() => {});
        // node:http (Node, Deno) keeps a connection open after its last answer, and its
        // server.close() waits for every connection; closing the idle ones lets it end. Bun
        // closes them on its own.
        const sweep = setInterval(
          () => nodeServer?.closeIdleConnections?.(),
          timerDelay(SWEEP_MS),
        );
        await timeout(closed, LISTENER_CLOSE_MS);
        clearInterval(sweep);
        // Whatever is still open now (a client that does not read, or ignored the interrupt)
        // is cut.
        await timeout(listener.close(true).catch(() => {}), LISTENER_CLOSE_MS);
        for (const type of POOL_EVENTS) pool.removeEventListener(type, onPoolEvent);
        log({
          level: "info",
          msg: "stopped",
          durationMs: Math.round(performance.now() - started),
        });
      })();
      return closing;
    },
  };
}

/**
 * Runs the broker as a command: parses `args`, starts it, logs JSON lines to stderr, and
 * waits for SIGINT, SIGTERM or `options.signal` to shut it down gracefully.
 *
 * @example The entry point
 * ```ts ignore
 * process.exit(await main(process.argv.slice(2)));
 * ```
 *
 * @param args The arguments after the script.
 * @param options Environment, output sinks, a stop signal, whether to handle OS signals.
 * @returns The exit code: 0 after `--help` or a clean shutdown, 1 if the server could not
 * start, 2 for a bad flag.
 */
export async function main(args: readonly string[], options: MainOptions = {}): Promise<number> {
  const stdout = options.stdout ?? ((text: string) => void process.stdout.write(text));
  const stderr = options.stderr ?? stderrSink();
  const log = (entry: LogEntry) => stderr(logLine(entry));

  let parsed: ParsedFlags;
  const env = options.env ?? process.env;
  const envSecret = env.BROKER_SECRET;
  try {
    parsed = parseFlags(args, env);
  } catch (error) {
    if (!(error instanceof UsageError)) throw error;
    stderr(`codex-broker: ${error.message}\nRun with --help for usage\n`);
    return 2;
  } finally {
    // Read once: no child inherits it from here on, whatever spawns it.
    delete env.BROKER_SECRET;
  }
  // The kernel still shows it in /proc/<pid>/environ, the environment this process started
  // with, to every process of its user: erase it there too, where that can be done.
  const scrubbed = envSecret === undefined || env !== process.env ||
    scrubInitialEnvironment("BROKER_SECRET", envSecret);
  if (parsed.help) {
    stdout(USAGE);
    return 0;
  }
  const brokerOptions: BrokerOptions = { v8Pretenuring: "off", ...parsed.options, log };

  // Signals are taken from the start, so one that arrives while starting still shuts down
  // cleanly instead of killing the process with codex children around.
  const stop = Promise.withResolvers<string>();
  let stopCount = 0;
  let broker: Broker | undefined;
  const onStop = (reason: string) => {
    stopCount++;
    if (stopCount === 1) stop.resolve(reason);
    else broker?.hurry();
  };
  // Ctrl+C under `npm start` arrives twice at once: the terminal signals the whole
  // foreground group, and npm passes its own copy on. A second signal means "hurry", so a
  // repeat of the first one within a moment is the same keypress, not a second request.
  let first: { signal: string; at: number } | undefined;
  const onSignal = (signal: string) => {
    const now = performance.now();
    if (first?.signal === signal && now - first.at < DUPLICATE_SIGNAL_MS) return;
    first ??= { signal, at: now };
    onStop(signal);
  };
  const onAbort = () => onStop("abort");
  const handleSignals = options.handleSignals ?? true;
  if (handleSignals) {
    for (const signal of SIGNALS) {
      try {
        process.on(signal, onSignal);
      } catch {
        // Deno on Windows listens for SIGINT (and SIGBREAK) only.
      }
    }
  }
  if (options.signal?.aborted) onAbort();
  else options.signal?.addEventListener("abort", onAbort, { once: true });

  try {
    log({
      level: "info",
      msg: "start",
      version: VERSION,
      runtime: runtime(),
      pid: process.pid,
      host: brokerOptions.host ?? DEFAULT_HOST,
      port: brokerOptions.port ?? DEFAULT_PORT,
      workspacesDir: resolvePath(brokerOptions.workspacesDir ?? DEFAULT_WORKSPACES_DIR),
      codexHome: brokerOptions.codexHome ?? null,
      codex: brokerOptions.codex ?? null,
      approvals: brokerOptions.approvals ?? "decline",
      idleTtlMs: brokerOptions.idleTtlMs ?? DEFAULT_IDLE_TTL_MS,
      graceMs: brokerOptions.graceMs ?? DEFAULT_GRACE_MS,
      requestTimeoutMs: brokerOptions.requestTimeoutMs ?? DEFAULT_REQUEST_TIMEOUT_MS,
      ...("Deno" in globalThis ? { denoServer: brokerOptions.denoServer ?? "node" } : {}),
      wsClient: brokerOptions.wsClient ?? "net",
      ...(IS_NODE ? { v8Pretenuring: brokerOptions.v8Pretenuring } : {}),
      secretFrom: parsed.secretSource,
      codexUser: brokerOptions.codexUser?.name ?? null,
      bearerTokens: [
        ...(brokerOptions.jwtSecret === undefined ? [] : ["HS256"]),
        ...(brokerOptions.jwks === undefined ? [] : [brokerOptions.jwks]),
      ],
    });
    if (!scrubbed) {
      log({
        level: "warn",
        msg: "BROKER_SECRET stays readable",
        hint: `This platform keeps BROKER_SECRET in the environment this process started ` +
          `with, where processes of the same user can read it (/proc/${process.pid}/environ, ` +
          `ps e): use --secret-file instead`,
      });
    }
    if (parsed.secretFile !== undefined && (parsed.secretFile.mode & 0o077) !== 0) {
      log({
        level: "warn",
        msg: "secret file readable by others",
        path: parsed.secretFile.path,
        mode: `0${parsed.secretFile.mode.toString(8)}`,
        hint: `Other users (and codex, with --codex-user) may read it: chmod 600 ` +
          parsed.secretFile.path,
      });
    }
    // Bytes, as the header carries them; the secret is ASCII (see secretProblem).
    if (parsed.secretSource !== "generated" && brokerOptions.secret.length < MIN_SECRET_BYTES) {
      log({
        level: "warn",
        msg: "short secret",
        bytes: brokerOptions.secret.length,
        hint: `A secret shorter than ${MIN_SECRET_BYTES} bytes can be guessed: use a long ` +
          `random one, e.g. openssl rand -base64 32`,
      });
    }
    try {
      broker = await startBroker(brokerOptions);
    } catch (error) {
      log({ level: "error", msg: "cannot start", error: messageOf(error) });
      return 1;
    }
    log({ level: "info", msg: "listening", url: broker.url, brokerId: broker.id });
    if (parsed.secretSource === "generated") {
      // The one record that holds the secret: still a JSON line, so log pipelines keep
      // parsing; its hint says what to do with it for whoever reads it in a terminal.
      log({
        level: "warn",
        msg: "generated secret",
        secret: brokerOptions.secret,
        hint: `No --secret or BROKER_SECRET given: send this secret to ${broker.url} as the ` +
          `X-Internal-Secret header (export BROKER_SECRET=<secret> before the next start ` +
          `to keep it)`,
      });
    }
    if (stopCount > 1) broker.hurry();
    const reason = await stop.promise;
    log({ level: "info", msg: "shutdown", signal: reason, inFlight: broker.inFlight });
    await broker.close();
    return 0;
  } finally {
    if (handleSignals) {
      // Deno keeps running while a signal listener is registered.
      for (const signal of SIGNALS) process.off(signal, onSignal);
    }
    options.signal?.removeEventListener("abort", onAbort);
  }
}

// A JWKS file is cheap to read: a key removed from it stops working within this.
const JWKS_FILE_MAX_AGE_MS = 30_000;
const JWKS_FILE_COOLDOWN_MS = 1_000;

/**
 * The bearer-token verifier the options ask for, or `undefined` for secret-only. A JWKS file
 * is read once here, so that a missing or broken one stops the start instead of refusing
 * every token later.
 *
 * @throws {Error} If the JWKS file cannot be read or is not a key set, or a key is bad.
 */
async function tokenVerifier(options: BrokerOptions): Promise<TokenVerifier | undefined> {
  const { jwtSecret, jwks } = options;
  if (jwtSecret === undefined && jwks === undefined) return undefined;
  const isUrl = jwks !== undefined && /^https?:\/\//i.test(jwks);
  const load = async (): Promise<JsonWebKeySet> => JSON.parse(await readFile(jwks!, "utf8"));
  if (jwks !== undefined && !isUrl) {
    let set: unknown;
    try {
      set = await load();
    } catch (error) {
      throw new Error(`Cannot start broker: cannot read the JWKS ${jwks}: ${messageOf(error)}`, {
        cause: error,
      });
    }
    if (!Array.isArray((set as { keys?: unknown } | null)?.keys)) {
      throw new Error(`Cannot start broker: the JWKS ${jwks} has no "keys" array`);
    }
  }
  try {
    return createTokenVerifier({
      ...(jwtSecret === undefined ? {} : { secret: jwtSecret }),
      ...(jwks === undefined ? {} : isUrl ? { jwks: new URL(jwks) } : {
        jwks: load,
        jwksMaxAgeMs: JWKS_FILE_MAX_AGE_MS,
        jwksCooldownMs: JWKS_FILE_COOLDOWN_MS,
      }),
      ...(options.jwtAudience === undefined ? {} : { audience: options.jwtAudience }),
      ...(options.jwtIssuer === undefined ? {} : { issuer: options.jwtIssuer }),
    });
  } catch (error) {
    throw new Error(`Cannot start broker: ${messageOf(error)}`, { cause: error });
  }
}

/**
 * Creates the workspaces directory if need be, then proves it writable the way codex will
 * use it: a directory made in it, a file written in that, both removed. Without this check a
 * directory that exists but refuses writes (permissions, a read-only mount) starts a broker
 * whose every turn then fails as `subprocessCrash`. Root passes permission checks, so only
 * a real write tells.
 *
 * @throws {Error} Naming the path and the reason (the system's error code and message).
 */
async function checkWorkspacesDir(dir: string): Promise<void> {
  const fail = (what: string, error: unknown): never => {
    throw new Error(`Cannot start broker: the workspaces dir ${dir} ${what}: ${messageOf(error)}`, {
      cause: error,
    });
  };
  try {
    await mkdir(dir, { recursive: true });
  } catch (error) {
    fail("cannot be created", error);
  }
  let probe: string | undefined;
  try {
    // Gone again at once; a broker that lists the directory meanwhile finds no run/ in it.
    probe = await mkdtemp(join(dir, ".write-probe-"));
    await writeFile(join(probe, "probe"), "");
  } catch (error) {
    fail("is not writable", error);
  } finally {
    if (probe !== undefined) await rm(probe, { recursive: true, force: true }).catch(() => {});
  }
}

/**
 * Proves that the codex user can enter the workspaces directory (every directory above it
 * must let it pass, `o+x`): otherwise every codex start fails on its working directory.
 *
 * @throws {Error} Naming the directory, the user and what the shell said.
 */
function checkReachable(dir: string, user: CodexUser): void {
  const result = spawnSync("/bin/sh", ["-c", 'cd "$1"', "sh", dir], {
    // Not the broker's own cwd, which the user may not reach (Deno changes into it).
    cwd: "/",
    uid: user.uid,
    gid: user.gid,
    encoding: "utf8",
    stdio: ["ignore", "ignore", "pipe"],
    timeout: 5_000,
  });
  if (result.status !== 0) {
    const why = (result.stderr ?? "").trim() || messageOf(result.error ?? "unknown failure");
    throw new Error(
      `Cannot start broker: the codex user ${user.name} cannot reach the workspaces dir ` +
        `${dir}: ${why}; let it pass every directory on the way (chmod o+x)`,
    );
  }
}

/**
 * Asks codex whether it has credentials (see `_credentials.ts`) and logs one warning, with
 * what to run, when it has none.
 */
async function checkCredentials(
  template: string,
  codex: string | undefined,
  signal: AbortSignal,
  log: (entry: LogEntry) => void,
): Promise<CredentialsState> {
  const env: Record<string, string> = {};
  for (const [key, value] of Object.entries(process.env)) {
    if (value !== undefined && key !== "BROKER_SECRET") env[key] = value;
  }
  let command = codex;
  if (command === undefined) {
    const found = defaultCodexCommand();
    command = found.command;
    for (const [key, value] of Object.entries(found.env)) env[key] ??= value;
  }
  const report = await checkCodexCredentials(existsSync(template) ? template : undefined, {
    command,
    env,
    timeoutMs: CREDENTIALS_CHECK_MS,
    signal,
  });
  if (report.state === "missing") {
    log({
      level: "warn",
      msg: "codex has no credentials",
      codexHome: template,
      hint: `Every turn will fail until codex can log in to its model provider. Run ` +
        `CODEX_HOME=${template} npx codex login (ChatGPT), or ` +
        `printenv OPENAI_API_KEY | CODEX_HOME=${template} npx codex login --with-api-key, ` +
        `or set OPENAI_API_KEY in the broker's environment, or configure a model provider ` +
        `in ${join(template, "config.toml")}; then restart the broker`,
    });
  } else if (report.state === "unknown" && !signal.aborted) {
    log({ level: "warn", msg: "cannot check codex credentials", error: report.error });
  }
  return report.state;
}

/** Counts requests in flight and tells when there are none. */
class InFlight {
  count = 0;
  #waiters = new Set<() => void>();

  enter(): void {
    this.count++;
  }

  leave(): void {
    this.count--;
    if (this.count === 0) {
      for (const wake of this.#waiters) wake();
    }
  }

  /** Resolves `true` once nothing is in flight, or `false` after `ms` or an abort. */
  idle(ms: number, signal?: AbortSignal): Promise<boolean> {
    if (this.count === 0) return Promise.resolve(true);
    if (signal?.aborted) return Promise.resolve(false);
    return new Promise<boolean>((resolve) => {
      const settle = (idle: boolean) => {
        timer.cancel();
        this.#waiters.delete(wake);
        signal?.removeEventListener("abort", onAbort);
        resolve(idle);
      };
      const wake = () => settle(true);
      const onAbort = () => settle(false);
      const timer = after(ms, () => settle(false));
      this.#waiters.add(wake);
      signal?.addEventListener("abort", onAbort, { once: true });
    });
  }
}

/**
 * Calls `fn` once `ms` have passed, however long that is: a delay past what timers honour
 * (24.8 days, see timerDelay) is waited in steps instead of firing after 1 ms.
 */
function after(ms: number, fn: () => void): { cancel(): void } {
  const deadline = performance.now() + ms;
  let timer: ReturnType<typeof setTimeout>;
  const arm = () => {
    const left = deadline - performance.now();
    if (left <= 0) fn();
    else timer = setTimeout(arm, timerDelay(left));
  };
  timer = setTimeout(arm, timerDelay(ms));
  return { cancel: () => clearTimeout(timer) };
}

async function timeout(promise: Promise<unknown>, ms: number): Promise<void> {
  let timer: { cancel(): void } | undefined;
  await Promise.race([promise, new Promise<void>((resolve) => timer = after(ms, resolve))]);
  timer?.cancel();
}

/**
 * Node's own deadlines for a request that has not reached the handler yet. Its headers get
 * `requestTimeoutMs` (answered with Node's bare 408), checked every tenth of it (Node's
 * default checks every 30 s); the body's deadline is the handler's, so Node's deadline for
 * the whole request is twice that, a backstop the handler's JSON 408 comes before. Deno's
 * `node:http` honours them too; Bun ignores them.
 */
function nodeTimeouts(requestTimeoutMs: number): Record<string, number> {
  const headersTimeout = timerDelay(requestTimeoutMs);
  return {
    headersTimeout,
    requestTimeout: timerDelay(2 * requestTimeoutMs + 1_000),
    connectionsCheckingInterval: Math.min(5_000, Math.max(10, Math.ceil(headersTimeout / 10))),
  };
}

/** `host:port`, with an IPv6 address in brackets, as a URL writes it. */
function hostPort(host: string, port: number): string {
  return `${host.includes(":") ? `[${host}]` : host}:${port}`;
}

/**
 * Why listening failed, in the same words on every runtime. Each phrases it its own way
 * (Node names the address, Bun asks "Is port … in use?", Deno names neither), but all three
 * set the system's error code.
 */
function listenFailure(error: unknown): string {
  const code = (error as { code?: unknown } | null)?.code;
  switch (code) {
    case "EADDRINUSE":
      return "the address is already in use (EADDRINUSE): another process listens there; " +
        "stop it or choose another --port";
    case "EADDRNOTAVAIL":
      return "the address is not one of this machine's (EADDRNOTAVAIL): check --host";
    case "EACCES":
      return "permission denied (EACCES): a port below 1024 needs privileges";
    default:
      return messageOf(error);
  }
}

/** Bun's own default idle timeout, in seconds (its largest is 255). */
const BUN_IDLE_TIMEOUT_S = 10;

/** The Bun server a request came through (srvx's `request.runtime.bun.server`), if any. */
function bunServerOf(
  request: Request,
): { timeout(request: Request, seconds: number): void } | undefined {
  const runtime = (request as { runtime?: { bun?: { server?: unknown } } }).runtime;
  const server = runtime?.bun?.server as
    | { timeout?(request: Request, seconds: number): void }
    | undefined;
  return typeof server?.timeout === "function"
    ? server as { timeout(request: Request, seconds: number): void }
    : undefined;
}

let clockMs = -1;
let clockIso = "";

/** The time as ISO 8601, made once per millisecond: several log lines share one at load. */
function isoNow(): string {
  const now = Date.now();
  if (now !== clockMs) {
    clockMs = now;
    clockIso = new Date(now).toISOString();
  }
  return clockIso;
}

/**
 * One JSON log line: `time`, `level`, `msg`, then the fields, in the entry's order (its
 * `level` and `msg` come first). Built from one `JSON.stringify` of the entry: a copy of
 * each entry to put `time` first was 1–2% of the broker's CPU per turn.
 */
function logLine(entry: LogEntry): string {
  if ("time" in entry) {
    const { level, msg, ...fields } = entry;
    return `${JSON.stringify({ time: isoNow(), level, msg, ...fields })}\n`;
  }
  return `{"time":"${isoNow()}",${JSON.stringify(entry).slice(1)}\n`;
}

function isEventStream(response: Response): boolean {
  return response.headers.get("content-type")?.startsWith("text/event-stream") ?? false;
}

/**
 * Deno serves with `node:http` too, unless told `native`: `Deno.serve` has no deadlines, so
 * it keeps idle keep-alive connections and half-sent headers open forever and ignores
 * `Connection: close` (denoland/deno#9411); Deno's `node:http` closes them as Node does.
 * Bun keeps `Bun.serve`.
 */
function serve(denoServer: DenoServer, options: ServerOptions): Server {
  if (!("Deno" in globalThis) || denoServer === "native") return serveNative(options);
  const server = serveNode(options);
  server.node?.server?.on("request", discardUnreadBody);
  return server;
}

/**
 * Once the answer is sent, reads and drops what is left of a body the handler did not read,
 * as Node's server does: Deno's `node:http` (2.9.6) does not, so a client that sent more
 * than its buffers hold before an early answer (401, 404, 415) waits on a connection that
 * serves nothing more.
 */
function discardUnreadBody(req: IncomingMessage, res: ServerResponse): void {
  res.once("finish", () => {
    if (req.complete || req.destroyed) return;
    req.removeAllListeners("data");
    req.resume();
  });
}

function runtime(): string {
  if ("Deno" in globalThis) return "deno";
  if (process.versions.bun) return "bun";
  return "node";
}

function messageOf(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

/** Whether this module is the program being run, not a module imported by another. */
function isEntryPoint(): boolean {
  // Deno, Bun and recent Node set import.meta.main; where it is missing, compare argv[1].
  const meta = import.meta as ImportMeta & { main?: boolean };
  if (typeof meta.main === "boolean") return meta.main;
  const script = process.argv[1];
  if (script === undefined) return false;
  try {
    return realpathSync(script) === realpathSync(fileURLToPath(import.meta.url));
  } catch {
    return false;
  }
}

if (isEntryPoint()) {
  const code = await main(process.argv.slice(2));
  // Waits for the output to be taken, then exits even if a library left a handle open.
  await Promise.all(
    [process.stdout, process.stderr].map((stream) =>
      new Promise<void>((resolve) => stream.write("", () => resolve()))
    ),
  );
  process.exit(code);
}

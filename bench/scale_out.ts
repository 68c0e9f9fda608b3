/**
 * Scale-out (issue 8, section 7): three brokers (`src/main.ts` under Deno, as `npm start`
 * runs it) on one shared temp workspaces directory, the real nginx with the shipped
 * `deploy/nginx.conf` in front (`tests/_nginx.ts` renders it, replacing only the server
 * lines and the listen port), the real codex on the loopback mock model. Two figures:
 *
 * 1. **Turn p50 through nginx vs straight to a broker** (goal <= {@linkcode PROXY_GOAL}x).
 *    One workspace per broker is warmed up (its first turn through nginx is the cold start
 *    of a new workspace, printed for reference); then, on one thread of one of them,
 *    `BENCH_SCALEOUT_WARMUP` unmeasured pairs and `BENCH_SCALEOUT_TURNS` measured pairs of
 *    one turn through nginx (`POST /api/workspaces/{id}/turns`) and one straight to the
 *    owner (the broker that `X-Broker-Id` names), the order swapped every pair so drift and
 *    other load hit both alike. Each pair ends with a `GET /healthz` each way: the proxy
 *    hop alone, without codex. Every answer must come from the owner; a `GET /healthz`
 *    through nginx with the workspace's `X-Workspace-Id` (answered by the broker nginx
 *    picks, never forwarded) checks before and after that nginx sends the workspace to the
 *    owner directly, not through a forwarding hop.
 * 2. **Failover time** (goal <= lease TTL + {@linkcode FAILOVER_MARGIN_MS} ms). Per kill
 *    (`BENCH_SCALEOUT_KILLS`, the victim rotating over the brokers): a new workspace that
 *    nginx routes to the victim gets {@linkcode HISTORY_TURNS} turns through nginx, then the
 *    victim gets `kill -9`, and once its process is gone (a request that reaches a dying
 *    broker is one in flight at the crash: nginx answers 502 and does not retry a POST) the
 *    client sends the workspace's next turn through nginx, again 50 ms after every 503
 *    (what `workspaceBusy` answers until the lease expires; any other answer fails the
 *    bench). The time from the kill to that turn's answer is split into the lease wait
 *    (until the `expiresAt` of the dead broker's lease, read from the shared volume), the
 *    retry gap (until the request that succeeded was sent), the codex start on the new
 *    broker (until its `dial` log record: spawn, readiness, connect, initialize) and the
 *    rest (thread resume, the turn, the answer).
 *    The thread must continue: same thread id, and the model request of that turn carries
 *    every earlier user message. Then the victim comes back on its port under its id, and
 *    the next kill waits until nginx sends it requests again (the shipped `fail_timeout`,
 *    10 s).
 *
 * Everything is bounded (turns 30 s, broker start 30 s, a failover the TTL plus 30 s,
 * nginx re-admitting a broker 40 s) and stopped also on failure: nginx through its harness,
 * the brokers with SIGTERM (each must exit 0; SIGKILL after 20 s) by pid, the mock model;
 * then no codex may be left under the workspaces dir (any is killed by pid and reported),
 * and the temp dirs are removed.
 *
 * ```sh
 * node_modules/.bin/deno run -A bench/scale_out.ts   # or: npm run bench -- scaleout
 * BENCH_SCALEOUT_TURNS=20 BENCH_SCALEOUT_KILLS=1 npm run bench -- scaleout
 * ```
 *
 * Environment: `BENCH_SCALEOUT_TURNS` (100 measured pairs), `BENCH_SCALEOUT_WARMUP` (3
 * pairs), `BENCH_SCALEOUT_KILLS` (3), `BENCH_SCALEOUT_LEASE_TTL` (`3s`, passed to
 * `--lease-ttl`, so any of its duration forms). About a minute and a half here, most of it
 * waiting for nginx to take a restarted broker back.
 *
 * @module
 */

import { readdirSync, readFileSync, readlinkSync } from "node:fs";
import { mkdtemp, realpath, rm } from "node:fs/promises";
import { cpus, loadavg, tmpdir } from "node:os";
import { join, sep } from "node:path";
import { parseDuration } from "../src/_flags.ts";
import { createFileLeaseStore } from "../src/file_lease.ts";
import type { LeaseRecord } from "../src/lease.ts";
import { type BrokerProcess, childEnv, isRunning, spawnBroker } from "../tests/_broker_process.ts";
import { ROOT, serviceFlags } from "./_procs.ts";
import { makeCodexHome } from "../tests/_codex_home.ts";
import { type MockModelRequest, reply, startMockModel } from "../tests/_mock_model.ts";
import { type Nginx, startNginx } from "../tests/_nginx.ts";
import { envInt, ms, ratioInterval, stats, table } from "./_stats.ts";

/** The p50 through nginx may be at most this multiple of the p50 straight to the broker. */
export const PROXY_GOAL = 1.05;
/** A failover may take at most the lease TTL plus this long. */
export const FAILOVER_MARGIN_MS = 2_000;
/** Turns a failover workspace gets before its owner is killed: the history to keep. */
export const HISTORY_TURNS = 3;

const BROKER_IDS = ["b0", "b1", "b2"] as const;
const SECRET = "bench-scale-out-secret";
const ANSWER = "ok";
/** The pause after a 503 before the next try. */
const RETRY_PAUSE_MS = 50;
const TURN_TIMEOUT_MS = 30_000;
const BROKER_START_TIMEOUT_MS = 30_000;
const BROKER_STOP_TIMEOUT_MS = 20_000;
/** Past the lease TTL, how long a failover may take before the bench gives up. */
const FAILOVER_LIMIT_MS = 30_000;
/** How long nginx may take to send requests to a restarted broker again (fail_timeout 10 s). */
const READMIT_TIMEOUT_MS = 40_000;
/** How many workspace ids to try when looking for one that nginx routes to a broker. */
const ROUTE_PROBES = 300;
const CODEX_EXIT_TIMEOUT_MS = 10_000;

/** How much to run; see the module doc for the variables. */
export interface ScaleOutConfig {
  /** Measured pairs of turns (one through nginx, one direct). */
  turns: number;
  /** Unmeasured pairs first. */
  warmup: number;
  /** How many times an owner is killed. */
  kills: number;
  /** `--lease-ttl` as given to the brokers. */
  leaseTtl: string;
  /** The same, in milliseconds. */
  leaseTtlMs: number;
}

/** One failover, times in ms from the `kill -9`. */
export interface FailoverResult {
  victim: string;
  workspaceId: string;
  /** The broker that ran the first successful turn after the kill. */
  newOwner: string;
  /** Until the answer of the first successful turn. */
  totalMs: number;
  /** Until the victim's process was seen gone, when the client starts sending. */
  goneMs: number;
  /** Until the dead broker's lease expired (its `expiresAt`). */
  leaseWaitMs: number;
  /** Until the request that succeeded was sent. */
  requestSentMs: number;
  /** Until the new broker's `dial` log record for the workspace; NaN if none was found. */
  dialMs: number;
  /** 503 answers before the success, by error code. */
  refusals: Record<string, number>;
  /** Same thread id, and the model saw every earlier user message of the thread. */
  threadKept: boolean;
  /** The earlier user messages the model saw, of {@linkcode HISTORY_TURNS}. */
  historySeen: number;
  /** From the restart of the victim until nginx sent it requests again. */
  readmitMs: number;
}

/** Everything one run measured, in milliseconds. */
export interface ScaleOutResult {
  config: ScaleOutConfig;
  /** The broker that owns the measured workspace. */
  owner: string;
  /** Wall time of each measured turn through nginx, and straight to the owner. */
  viaNginx: number[];
  direct: number[];
  /** Per pair, nginx / direct: turns taken moments apart. */
  pairedRatios: number[];
  /** `GET /healthz` round trips, through nginx and direct, one each per pair. */
  healthzViaNginx: number[];
  healthzDirect: number[];
  /** The first turn of each warm-up workspace through nginx (spawn, thread/start, turn). */
  cold: number[];
  failovers: FailoverResult[];
  /** 1-minute load average at the start and the end; the machine's core count. */
  load: { start: number; end: number; cores: number };
  /** Setup, the proxy comparison, the failovers, teardown, whole run. */
  phasesMs: { setup: number; proxy: number; failover: number; teardown: number; total: number };
}

/**
 * Reads the configuration from the environment.
 *
 * @returns The counts and the lease TTL; defaults 100 pairs, 3 warm-up pairs, 3 kills, 3 s.
 * @throws {TypeError} If a variable is not valid.
 */
export function scaleOutConfig(): ScaleOutConfig {
  const leaseTtl = Deno.env.get("BENCH_SCALEOUT_LEASE_TTL") || "3s";
  let leaseTtlMs: number;
  try {
    leaseTtlMs = parseDuration(leaseTtl, "--lease-ttl");
  } catch (error) {
    throw new TypeError(
      `BENCH_SCALEOUT_LEASE_TTL must be a duration such as 3s or 3000ms, got "${leaseTtl}"`,
      { cause: error },
    );
  }
  // The broker's own lower bound.
  if (leaseTtlMs < 300) {
    throw new TypeError(`BENCH_SCALEOUT_LEASE_TTL must be at least 300ms, got "${leaseTtl}"`);
  }
  return {
    turns: envInt("BENCH_SCALEOUT_TURNS", 100, 1),
    warmup: envInt("BENCH_SCALEOUT_WARMUP", 3, 0),
    kills: envInt("BENCH_SCALEOUT_KILLS", 3, 0),
    leaseTtl,
    leaseTtlMs,
  };
}

/** A workspace as the bench drives it: its thread and the user texts of its turns. */
interface Workspace {
  id: string;
  threadId: string | null;
  texts: string[];
}

/** What one turn request came to. */
interface Answer {
  status: number;
  brokerId: string | null;
  /** Wall time, from just before `fetch` until the body was read. */
  ms: number;
  /** When it was sent, `performance.now()`. */
  sentAt: number;
  body: {
    threadId?: string;
    turn?: { status?: string; items?: { type: string; text?: string }[] };
    error?: { code?: string };
    raw?: string;
  };
}

function newWorkspace(id: string): Workspace {
  return { id, threadId: null, texts: [] };
}

function completed(answer: Answer): boolean {
  const text = answer.body.turn?.items?.find((item) => item.type === "agentMessage")?.text;
  return answer.status === 200 && answer.body.turn?.status === "completed" && text === ANSWER &&
    typeof answer.body.threadId === "string";
}

function describe(answer: Answer): string {
  return `HTTP ${answer.status} from ${answer.brokerId ?? "no broker"}: ${
    JSON.stringify(answer.body).slice(0, 500)
  }`;
}

/**
 * Sends the workspace's next turn to `base` (nginx or a broker); a completed one is added to
 * the workspace's thread.
 */
async function sendTurn(base: string, ws: Workspace): Promise<Answer> {
  const text = `t:${ws.id}:${ws.texts.length + 1}`;
  const sentAt = performance.now();
  const response = await fetch(`${base}/api/workspaces/${ws.id}/turns`, {
    method: "POST",
    headers: { "content-type": "application/json", "x-internal-secret": SECRET },
    body: JSON.stringify({
      threadId: ws.threadId,
      params: { input: [{ type: "text", text, text_elements: [] }] },
    }),
    signal: AbortSignal.timeout(TURN_TIMEOUT_MS),
  });
  const raw = await response.text();
  const answer: Answer = {
    status: response.status,
    brokerId: response.headers.get("x-broker-id"),
    ms: performance.now() - sentAt,
    sentAt,
    body: {},
  };
  try {
    answer.body = JSON.parse(raw);
  } catch {
    answer.body = { raw };
  }
  if (completed(answer)) {
    ws.threadId = answer.body.threadId!;
    ws.texts.push(text);
  }
  return answer;
}

/** A turn that must complete on `broker`. */
async function turnOn(base: string, ws: Workspace, broker: string): Promise<Answer> {
  const answer = await sendTurn(base, ws);
  if (!completed(answer) || answer.brokerId !== broker) {
    throw new Error(`Turn of ${ws.id} via ${base} expected on ${broker}: ${describe(answer)}`);
  }
  return answer;
}

/** `GET /healthz`; with a workspace, the broker nginx routes it to answers. */
async function healthz(
  base: string,
  workspaceId?: string,
): Promise<{ brokerId: string | null; ms: number }> {
  const t0 = performance.now();
  const response = await fetch(`${base}/healthz`, {
    headers: workspaceId === undefined ? {} : { "x-workspace-id": workspaceId },
    signal: AbortSignal.timeout(TURN_TIMEOUT_MS),
  });
  await response.arrayBuffer();
  const elapsed = performance.now() - t0;
  if (response.status !== 200) throw new Error(`GET ${base}/healthz: HTTP ${response.status}`);
  return { brokerId: response.headers.get("x-broker-id"), ms: elapsed };
}

/** A workspace id (`prefix-N`) that nginx routes to `broker` now. */
async function idRoutedTo(nginx: string, broker: string, prefix: string): Promise<string> {
  for (let i = 0; i < ROUTE_PROBES; i++) {
    const id = `${prefix}-${i}`;
    if ((await healthz(nginx, id)).brokerId === broker) return id;
  }
  throw new Error(`nginx routed none of ${ROUTE_PROBES} workspace ids to ${broker}`);
}

/** The user texts of the bench's turns in a model request, oldest first. */
function history(request: MockModelRequest): string[] {
  const texts: string[] = [];
  for (const item of request.input) {
    if (item.role !== "user" || !Array.isArray(item.content)) continue;
    for (const part of item.content as { text?: unknown }[]) {
      if (typeof part.text === "string" && part.text.startsWith("t:")) texts.push(part.text);
    }
  }
  return texts;
}

/** Rejects after `ms` (clearing its timer once `promise` settles). */
async function within<T>(promise: Promise<T>, timeoutMs: number, what: string): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  try {
    return await Promise.race([
      promise,
      new Promise<never>((_, reject) => {
        timer = setTimeout(
          () => reject(new Error(`Timed out after ${timeoutMs} ms waiting for ${what}`)),
          timeoutMs,
        );
      }),
    ]);
  } finally {
    clearTimeout(timer);
  }
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/**
 * codex app-servers whose working directory is under `dir` (not the children codex forks,
 * which share its command line until they exec).
 */
function codexUnder(dir: string): number[] {
  const found = new Map<number, number>();
  for (const name of readdirSync("/proc")) {
    if (!/^\d+$/.test(name)) continue;
    const pid = Number(name);
    try {
      if (!readFileSync(`/proc/${pid}/cmdline`, "utf8").includes("app-server")) continue;
      if (!readlinkSync(`/proc/${pid}/cwd`).startsWith(dir + sep) || !isRunning(pid)) continue;
      const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
      found.set(pid, Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[1]));
    } catch {
      // gone meanwhile
    }
  }
  return [...found].filter(([, ppid]) => !found.has(ppid)).map(([pid]) => pid);
}

/** A broker as the bench runs it. */
interface RunningBroker {
  id: string;
  process: BrokerProcess;
  url: string;
  port: string;
}

/**
 * Runs both measurements and cleans up after itself, also when a step fails.
 *
 * @param config What to run.
 * @param progress Receives a line now and then (default: stderr).
 * @returns The samples.
 * @throws {Error} If a turn fails, a failover takes too long, a broker does not exit 0 on
 * SIGTERM, or a codex is left behind.
 */
export async function runScaleOut(
  config: ScaleOutConfig,
  progress: (line: string) => void = (line) => console.error(line),
): Promise<ScaleOutResult> {
  const began = performance.now();
  const load = { start: loadavg()[0] ?? NaN, end: NaN, cores: cpus().length };
  const phases = { setup: 0, proxy: 0, failover: 0, teardown: 0, total: 0 };
  const viaNginx: number[] = [];
  const direct: number[] = [];
  const pairedRatios: number[] = [];
  const healthzViaNginx: number[] = [];
  const healthzDirect: number[] = [];
  const cold: number[] = [];
  const failovers: FailoverResult[] = [];
  let owner = "";

  const model = await startMockModel({ respond: reply(ANSWER) });
  const home = await makeCodexHome(model.baseUrl);
  const dir = await realpath(await mkdtemp(join(tmpdir(), "codex-broker-scale-out-")));
  const leases = createFileLeaseStore({
    dir: (workspaceId) => join(dir, workspaceId, "lease"),
    ttlMs: config.leaseTtlMs,
  });
  const brokers = new Map<string, RunningBroker>();
  // Every broker process ever started, to stop each and check how it ended.
  const processes: BrokerProcess[] = [];
  const killed = new Set<BrokerProcess>();
  let nginx: Nginx | undefined;
  const runId = crypto.randomUUID().slice(0, 6);

  const start = async (id: string, port = "0"): Promise<RunningBroker> => {
    const process = spawnBroker(
      [
        "--port",
        port,
        "--workspaces-dir",
        dir,
        "--codex-home",
        home.path,
        "--broker-id",
        id,
        "--lease-ttl",
        config.leaseTtl,
        "--secret",
        SECRET,
      ],
      childEnv(),
      {
        // As npm start runs it, V8 flags included.
        command: [Deno.execPath(), "run", "-A", ...serviceFlags("deno"), `${ROOT}/src/main.ts`],
      },
    );
    processes.push(process);
    const line = await within(
      process.waitForLine((l) => l.includes('"msg":"listening"'), "listening"),
      BROKER_START_TIMEOUT_MS,
      `broker ${id} to listen`,
    );
    const url = JSON.parse(line).url as string;
    const broker = { id, process, url, port: new URL(url).port };
    brokers.set(id, broker);
    return broker;
  };

  let failure: unknown;
  const teardownErrors: string[] = [];
  try {
    await Promise.all(BROKER_IDS.map((id) => start(id)));
    nginx = await startNginx({
      upstreams: BROKER_IDS.map((id) => `127.0.0.1:${brokers.get(id)!.port}`),
    });
    const base = nginx.url;
    phases.setup = performance.now() - began;
    progress(`scale-out: nginx at ${base} in front of ${BROKER_IDS.join(", ")}`);

    // --- 1. turn p50 through nginx vs straight to the owner.
    const proxyStarted = performance.now();
    const warm: Workspace[] = [];
    for (const id of BROKER_IDS) {
      const ws = newWorkspace(await idRoutedTo(base, id, `warm-${runId}`));
      cold.push((await turnOn(base, ws, id)).ms);
      warm.push(ws);
    }
    const measured = warm[0]!;
    owner = BROKER_IDS[0];
    const ownerUrl = brokers.get(owner)!.url;
    const checkRoute = async (when: string) => {
      const routed = (await healthz(base, measured.id)).brokerId;
      if (routed !== owner) {
        throw new Error(`nginx routed ${measured.id} to ${routed}, not to ${owner}, ${when}`);
      }
    };
    await checkRoute("before the measurement");
    for (let i = 0; i < config.warmup; i++) {
      await turnOn(base, measured, owner);
      await turnOn(ownerUrl, measured, owner);
    }
    progress(`scale-out: measuring ${config.turns} pairs of turns on ${measured.id} (${owner})`);
    for (let pair = 0; pair < config.turns; pair++) {
      let viaMs = NaN;
      let directMs = NaN;
      const steps = [
        async () => viaMs = (await turnOn(base, measured, owner)).ms,
        async () => directMs = (await turnOn(ownerUrl, measured, owner)).ms,
      ];
      for (const step of pair % 2 === 0 ? steps : steps.reverse()) await step();
      viaNginx.push(viaMs);
      direct.push(directMs);
      pairedRatios.push(viaMs / directMs);
      const probes = [
        async () => healthzViaNginx.push((await healthz(base, measured.id)).ms),
        async () => healthzDirect.push((await healthz(ownerUrl)).ms),
      ];
      for (const probe of pair % 2 === 0 ? probes : probes.reverse()) await probe();
    }
    await checkRoute("after the measurement");
    phases.proxy = performance.now() - proxyStarted;

    // --- 2. failover after kill -9 of a workspace's owner.
    const failoverStarted = performance.now();
    for (let k = 0; k < config.kills; k++) {
      const victim = brokers.get(BROKER_IDS[k % BROKER_IDS.length]!)!;
      const ws = newWorkspace(await idRoutedTo(base, victim.id, `failover-${runId}-${k}`));
      for (let i = 0; i < HISTORY_TURNS; i++) await turnOn(base, ws, victim.id);
      const earlier = [...ws.texts];
      const threadId = ws.threadId;
      progress(`scale-out: kill -9 of ${victim.id}, owner of ${ws.id}`);

      const killedAt = performance.now();
      const killedEpoch = Date.now();
      victim.process.kill("SIGKILL");
      killed.add(victim.process);
      // Only once it is gone: a request that reaches a broker while it dies (its listening
      // socket still accepts, then resets) is one in flight at the crash, a 502 that nginx
      // does not retry (a POST), not a part of the failover.
      await within(victim.process.status, BROKER_STOP_TIMEOUT_MS, `${victim.id} to die`);
      const goneMs = performance.now() - killedAt;
      // The dead broker renews nothing any more: its lease record is final.
      const lease: LeaseRecord | null = await leases.read(ws.id);
      const refusals: Record<string, number> = {};
      let answer: Answer;
      for (;;) {
        answer = await sendTurn(base, ws);
        if (completed(answer)) break;
        if (answer.status !== 503) {
          throw new Error(
            `Failover of ${ws.id}: expected 503 or success, ${describe(answer)}\nnginx: ${
              nginx.log().split("\n").slice(-6).join("\n")
            }`,
          );
        }
        const code = answer.body.error?.code ?? "unknown";
        refusals[code] = (refusals[code] ?? 0) + 1;
        if (performance.now() - killedAt > config.leaseTtlMs + FAILOVER_LIMIT_MS) {
          throw new Error(
            `Failover of ${ws.id}: still refused after ${
              Math.round(performance.now() - killedAt)
            } ms: ${describe(answer)}`,
          );
        }
        await sleep(RETRY_PAUSE_MS);
      }
      const totalMs = performance.now() - killedAt;
      if (lease?.owner !== victim.id) {
        throw new Error(
          `The lease of ${ws.id} read after the kill is not ${victim.id}'s: ${
            JSON.stringify(lease)
          }`,
        );
      }
      const newOwner = answer.brokerId ?? "";
      if (newOwner === victim.id || !brokers.has(newOwner)) {
        throw new Error(`Failover of ${ws.id} answered by ${newOwner}`);
      }
      const dial = brokers.get(newOwner)!.process.lines.filter((line) => line.startsWith("{"))
        .map((line) => JSON.parse(line) as { msg?: string; workspaceId?: string; time?: string })
        .find((record) => record.msg === "dial" && record.workspaceId === ws.id);
      const lastText = ws.texts.at(-1);
      const request = model.requests.findLast((r) => history(r).at(-1) === lastText);
      const seen = request ? history(request) : [];
      const historySeen = earlier.filter((text) => seen.includes(text)).length;
      const result: FailoverResult = {
        victim: victim.id,
        workspaceId: ws.id,
        newOwner,
        totalMs,
        goneMs,
        leaseWaitMs: lease.expiresAt - killedEpoch,
        requestSentMs: answer.sentAt - killedAt,
        dialMs: dial?.time === undefined ? NaN : Date.parse(dial.time) - killedEpoch,
        refusals,
        threadKept: ws.threadId === threadId && historySeen === earlier.length,
        historySeen,
        readmitMs: NaN,
      };
      failovers.push(result);
      progress(
        `scale-out: ${ws.id} answered by ${newOwner} ${Math.round(totalMs)} ms after the kill`,
      );

      // The victim comes back under its id on its port; the next kill waits until nginx
      // sends it requests again, so each one starts from three brokers in the ring.
      const restarted = await start(victim.id, victim.port);
      const restartedAt = performance.now();
      const deadline = restartedAt + READMIT_TIMEOUT_MS;
      while ((await healthz(base, ws.id)).brokerId !== restarted.id) {
        if (performance.now() > deadline) {
          throw new Error(`nginx did not send ${ws.id} to the restarted ${victim.id} in time`);
        }
        await sleep(200);
      }
      result.readmitMs = performance.now() - restartedAt;
    }
    phases.failover = performance.now() - failoverStarted;
  } catch (error) {
    failure = error;
  } finally {
    const teardownStarted = performance.now();
    try {
      await nginx?.stop();
    } catch (error) {
      teardownErrors.push(String(error));
    }
    const live = processes.filter((p) => !killed.has(p));
    for (const process of live) process.kill("SIGTERM");
    await Promise.all(live.map(async (process) => {
      const status = await within(process.status, BROKER_STOP_TIMEOUT_MS, "a broker to stop")
        .catch(async (error) => {
          teardownErrors.push(String(error));
          process.kill("SIGKILL");
          return await process.status;
        });
      if (status.code !== 0) {
        teardownErrors.push(
          `broker pid ${process.pid} ended with ${status.code ?? status.signal} on SIGTERM:\n${
            process.lines.slice(-10).join("\n")
          }`,
        );
      }
    }));
    await Promise.all(processes.map((process) => process.status));
    await model.close();
    // The brokers stop their codex processes; those of a killed broker die with it (its
    // watchdogs). Whatever is still there after a while is ours (its cwd is in our temp dir).
    const deadline = performance.now() + CODEX_EXIT_TIMEOUT_MS;
    while (codexUnder(dir).length > 0 && performance.now() < deadline) await sleep(50);
    const left = codexUnder(dir);
    if (left.length > 0) {
      teardownErrors.push(`codex processes left behind: ${left.join(", ")} (killed)`);
      for (const pid of left) {
        try {
          Deno.kill(pid, "SIGKILL");
        } catch {
          // gone meanwhile
        }
      }
    }
    await home.cleanup();
    await rm(dir, { recursive: true, force: true });
    phases.teardown = performance.now() - teardownStarted;
  }
  if (failure !== undefined) {
    if (teardownErrors.length > 0) progress(`scale-out teardown: ${teardownErrors.join("\n")}`);
    throw failure;
  }
  if (teardownErrors.length > 0) throw new Error(teardownErrors.join("\n"));
  load.end = loadavg()[0] ?? NaN;
  phases.total = performance.now() - began;
  return {
    config,
    owner,
    viaNginx,
    direct,
    pairedRatios,
    healthzViaNginx,
    healthzDirect,
    cold,
    failovers,
    load,
    phasesMs: phases,
  };
}

function verdict(ok: boolean): string {
  return ok ? "goal met" : "goal not met";
}

function seconds(value: number): string {
  return (value / 1000).toFixed(1);
}

/**
 * Formats a run: the proxy comparison and the failovers, each against its goal.
 *
 * @param result One run.
 * @returns The report, as text.
 */
export function formatScaleOut(result: ScaleOutResult): string {
  const { config, phasesMs, load } = result;
  const title = `scale-out: 3 Deno brokers (src/main.ts) on one shared workspaces dir behind ` +
    `nginx (deploy/nginx.conf), the real codex on the loopback model; lease TTL ` +
    `${config.leaseTtl}; run took ${seconds(phasesMs.total)} s; load average ${
      load.start.toFixed(1)
    } at the start, ${load.end.toFixed(1)} at the end (${load.cores} cores)`;

  const rows: [string, number[]][] = [
    ["turn through nginx", result.viaNginx],
    [`turn straight to the owner (${result.owner})`, result.direct],
    ["GET /healthz through nginx", result.healthzViaNginx],
    ["GET /healthz straight to the owner", result.healthzDirect],
    ["cold first turn of a new workspace (nginx)", result.cold],
  ];
  const latency = table(
    ["request", "n", "p50 ms", "p90 ms", "min ms", "max ms"],
    rows.map(([label, values]) => {
      const s = stats(values);
      return [label, String(s.n), ms(s.p50), ms(s.p90), ms(s.min), ms(s.max)];
    }),
  );
  const via = stats(result.viaNginx);
  const direct = stats(result.direct);
  const ratio = via.p50 / direct.p50;
  const [low, high] = ratioInterval(result.viaNginx, result.direct);
  const paired = stats(result.pairedRatios);
  const differences = stats(result.viaNginx.map((v, i) => v - (result.direct[i] ?? NaN)));
  const proxyLine =
    `nginx p50 / direct p50 = ${ratio.toFixed(3)} (goal <= ${PROXY_GOAL.toFixed(2)}): ${
      verdict(ratio <= PROXY_GOAL)
    }; nginx - direct p50 = ${ms(via.p50 - direct.p50)} ms (median of per-pair differences ${
      ms(differences.p50)
    } ms); noise: 90% bootstrap ` +
    `interval ${low.toFixed(3)}-${high.toFixed(3)}, median of per-pair ratios ${
      paired.p50.toFixed(3)
    }`;
  const proxyTitle = `turn latency through nginx vs straight to the broker: one thread, ` +
    `${config.warmup} warm-up pairs, then ${config.turns} pairs of one turn each way, order ` +
    `swapped every pair`;

  const lines = [title, "", proxyTitle, "", latency, "", proxyLine];
  if (result.failovers.length > 0) {
    const goalMs = config.leaseTtlMs + FAILOVER_MARGIN_MS;
    const failoverTable = table(
      [
        "kill",
        "victim",
        "new owner",
        "failover ms",
        "dead",
        "lease wait",
        "after expiry",
        "retry gap",
        "codex start",
        "resume+turn",
        "503s",
        "thread kept",
        "readmit s",
      ],
      result.failovers.map((f, i) => {
        const afterExpiry = f.totalMs - f.leaseWaitMs;
        return [
          String(i + 1),
          f.victim,
          f.newOwner,
          ms(f.totalMs),
          ms(f.goneMs),
          ms(f.leaseWaitMs),
          ms(afterExpiry),
          ms(f.requestSentMs - f.leaseWaitMs),
          ms(f.dialMs - f.requestSentMs),
          ms(f.totalMs - f.dialMs),
          Object.entries(f.refusals).map(([code, n]) => `${n} ${code}`).join(", ") || "0",
          f.threadKept ? "yes" : `no (${f.historySeen}/${HISTORY_TURNS} seen)`,
          seconds(f.readmitMs),
        ];
      }),
    );
    const max = Math.max(...result.failovers.map((f) => f.totalMs));
    const kept = result.failovers.every((f) => f.threadKept);
    const afterExpiry = stats(result.failovers.map((f) => f.totalMs - f.leaseWaitMs));
    lines.push(
      "",
      `failover: kill -9 of a workspace's owner, then its next turn through nginx, again ` +
        `${RETRY_PAUSE_MS} ms after each 503; ${HISTORY_TURNS} turns of history before each kill`,
      "",
      failoverTable,
      "",
      `max failover ${
        ms(max)
      } ms (goal <= lease TTL ${config.leaseTtlMs} ms + ${FAILOVER_MARGIN_MS} ms = ${goalMs} ms): ${
        verdict(max <= goalMs && kept)
      }${
        kept ? "; every thread continued with its history" : "; a thread lost its history"
      }; after the lease expired, ${ms(afterExpiry.p50)} ms at the median (warm turn p50 ${
        ms(direct.p50)
      } ms, cold first turn p50 ${ms(stats(result.cold).p50)} ms)`,
      "dead: kill until the victim is gone, when the client starts sending; " +
        "lease wait: kill until the dead broker's lease expires (renewed every TTL/3, so 2/3 of " +
        "the TTL to the TTL); retry gap: from the expiry until the request that succeeded was " +
        "sent (below 0 when one sent just before the expiry was handled after it); codex " +
        "start: until the new broker's dial (spawn, readiness, connect, initialize); " +
        "resume+turn: the rest (thread/resume, the turn, the answer). readmit: restart of " +
        "the victim until nginx sends it requests again (shipped fail_timeout 10 s).",
    );
  }
  lines.push(
    `setup ${seconds(phasesMs.setup)} s, proxy comparison ${seconds(phasesMs.proxy)} s, failovers ${
      seconds(phasesMs.failover)
    } s, teardown ${seconds(phasesMs.teardown)} s`,
  );
  return `${lines.join("\n")}\n`;
}

if (import.meta.main) {
  const result = await runScaleOut(scaleOutConfig());
  console.log(formatScaleOut(result));
}

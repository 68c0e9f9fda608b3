// Runs the shipped deploy/nginx.conf in a real nginx, in front of the upstreams a test gives.
// Only the server lines of its upstream block and its listen port are replaced, so what the
// tests prove holds for the file operators deploy. Linux only (nginx, /proc).
import { execFileSync, spawn, spawnSync } from "node:child_process";
import { accessSync, constants, readdirSync, readFileSync, rmSync } from "node:fs";
import { chmod, mkdir, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { createConnection, createServer } from "node:net";
import { tmpdir } from "node:os";
import { delimiter, join } from "node:path";
import process from "node:process";
import { fileURLToPath } from "node:url";

/** The nginx config this repository ships. */
export const SHIPPED_CONFIG: string = fileURLToPath(
  new URL("../deploy/nginx.conf", import.meta.url),
);

/** Options for {@linkcode startNginx}. */
export interface StartNginxOptions {
  /** The brokers, as `"127.0.0.1:PORT"`; they replace the shipped ones. */
  upstreams: string[];
  /** Replaces the servers' `fail_timeout` (whole seconds); the shipped value otherwise. */
  failTimeout?: number;
  /** How long nginx may take to accept connections. Defaults to 10 s. */
  startTimeoutMs?: number;
}

/** A running nginx. */
export interface Nginx {
  /** `http://127.0.0.1:PORT`, no trailing slash. */
  readonly url: string;
  /** The master process. */
  readonly pid: number;
  /** The rendered copy of the shipped config (what `include` loads inside `http {}`). */
  readonly renderedPath: string;
  /** nginx's error log so far (level notice; it goes to the master's stderr). */
  log(): string;
  /** The configuration nginx loads, as `nginx -T` prints it (tested, includes expanded). */
  dump(): string;
  /** Stops nginx and its workers, checks none is left, removes the temp prefix. */
  stop(): Promise<void>;
}

/** Options for {@linkcode renderConfig}. */
export interface RenderOptions {
  /** The brokers, as `"host:port"`. */
  upstreams: string[];
  /** The port to listen on (loopback only). */
  port: number;
  /** Replaces the servers' `fail_timeout` (whole seconds). */
  failTimeout?: number;
}

const START_ATTEMPTS = 5;
const STOP_GRACE_MS = 5_000;
const KILL_GRACE_MS = 2_000;

/**
 * The nginx binary: `$NGINX`, else the usual sbin directories, else `PATH`.
 *
 * @returns Its path, or `undefined` when there is none.
 */
export function nginxBinary(): string | undefined {
  const candidates = [
    process.env.NGINX,
    "/usr/sbin/nginx",
    "/usr/local/sbin/nginx",
    "/usr/local/nginx/sbin/nginx",
    ...(process.env.PATH ?? "").split(delimiter).filter(Boolean).map((dir) => join(dir, "nginx")),
  ];
  for (const path of candidates) {
    if (!path) continue;
    try {
      accessSync(path, constants.X_OK);
      return path;
    } catch {
      // not there
    }
  }
  return undefined;
}

let availability: boolean | undefined;

/**
 * Whether nginx is installed and runs (`nginx -v`).
 *
 * @returns `true` if {@linkcode startNginx} can work.
 */
export function nginxAvailable(): boolean {
  if (availability !== undefined) return availability;
  const bin = nginxBinary();
  try {
    if (bin !== undefined) execFileSync(bin, ["-v"], { stdio: "ignore" });
    availability = bin !== undefined;
  } catch {
    availability = false;
  }
  return availability;
}

function requireNginx(): string {
  const bin = nginxBinary();
  if (bin === undefined || !nginxAvailable()) {
    throw new Error(
      "Cannot start nginx: it is not installed (looked at $NGINX, /usr/sbin/nginx and PATH); " +
        "install Debian's nginx-light (`apt-get install -y nginx-light`, as .ci/run does)",
    );
  }
  return bin;
}

/**
 * Renders a config in the shape of deploy/nginx.conf: the server lines of its upstream block
 * become one line per upstream (with the first line's parameters), its one `listen` address
 * becomes `127.0.0.1:port`. Nothing else changes.
 *
 * @param source The config text.
 * @param options The upstreams, the port, and an optional `fail_timeout`.
 * @returns The rendered text.
 * @throws {Error} If the config no longer has that shape.
 */
export function renderConfig(source: string, options: RenderOptions): string {
  if (options.upstreams.length === 0) {
    throw new TypeError("Cannot render nginx config: no upstream given");
  }
  const lines = source.split("\n");
  const start = lines.findIndex((line) => /^\s*upstream\s+\S+\s*\{\s*(#.*)?$/.test(line));
  if (start < 0) throw new Error("Cannot render nginx config: no upstream block");
  const end = lines.findIndex((line, i) => i > start && /^\s*\}\s*(#.*)?$/.test(line));
  if (end < 0) throw new Error("Cannot render nginx config: the upstream block does not end");
  const server = /^(\s*)server\s+([^\s;]+)([^;]*);\s*(#.*)?$/;
  const servers = lines.map((line, i) => ({ i, match: server.exec(line) }))
    .filter(({ i, match }) => i > start && i < end && match !== null);
  const first = servers[0]?.match;
  if (!first) throw new Error("Cannot render nginx config: the upstream block has no server");
  if (servers.some(({ match }) => match![3]!.trim() !== first[3]!.trim())) {
    throw new Error("Cannot render nginx config: the server lines have different parameters");
  }
  let params = first[3]!.trim();
  if (options.failTimeout !== undefined) {
    if (!Number.isInteger(options.failTimeout) || options.failTimeout < 1) {
      throw new TypeError(
        `Invalid failTimeout: expected whole seconds, got ${options.failTimeout}`,
      );
    }
    const value = `fail_timeout=${options.failTimeout}s`;
    params = /\bfail_timeout=\S+/.test(params)
      ? params.replace(/\bfail_timeout=\S+/, value)
      : `${params} ${value}`.trim();
  }
  const replacement = options.upstreams.map((address) => {
    if (!/^[^\s;{}#]+$/.test(address)) throw new TypeError(`Invalid upstream "${address}"`);
    return `${first[1]}server ${address}${params ? ` ${params}` : ""};`;
  });
  const drop = new Set(servers.map(({ i }) => i));
  const out: string[] = [];
  lines.forEach((line, i) => {
    if (i === servers[0]!.i) out.push(...replacement);
    else if (!drop.has(i)) out.push(line);
  });

  const listen = /^(\s*listen\s+)([^\s;]+)(.*)$/;
  const listens = out.map((line, i) => ({ i, match: listen.exec(line) }))
    .filter(({ match }) => match !== null);
  if (listens.length !== 1) {
    throw new Error(
      `Cannot render nginx config: expected one listen line, found ${listens.length}`,
    );
  }
  const { i, match } = listens[0]!;
  out[i] = `${match![1]}127.0.0.1:${options.port}${match![3]}`;
  return out.join("\n");
}

/** A process as identified at one moment: its pid and its start time, against pid reuse. */
interface ProcessIdentity {
  pid: number;
  startTime: string | undefined;
}

/** Fields of /proc/<pid>/stat after the command name: state is [0], ppid [1], starttime [19]. */
function statFields(pid: number): string[] | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    // comm may contain spaces and parentheses: it ends at the last ")".
    return stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  } catch {
    return undefined;
  }
}

function identify(pid: number): ProcessIdentity {
  return { pid, startTime: statFields(pid)?.[19] };
}

/** Whether a process still runs: a zombie or a reused pid counts as gone. */
function isRunning(process_: ProcessIdentity): boolean {
  const fields = statFields(process_.pid);
  if (fields === undefined) {
    if (hasProc()) return false;
    try {
      process.kill(process_.pid, 0);
      return true;
    } catch {
      return false;
    }
  }
  if (fields[0] === "Z") return false;
  return process_.startTime === undefined || fields[19] === process_.startTime;
}

function hasProc(): boolean {
  try {
    accessSync("/proc/self/stat");
    return true;
  } catch {
    return false;
  }
}

/** Live children of a process (nginx's workers, whatever the log said). */
function childrenOf(parent: number): ProcessIdentity[] {
  const found: ProcessIdentity[] = [];
  let entries: string[];
  try {
    entries = readdirSync("/proc");
  } catch {
    return found;
  }
  for (const name of entries) {
    if (!/^\d+$/.test(name)) continue;
    const fields = statFields(Number(name));
    if (fields && Number(fields[1]) === parent && fields[0] !== "Z") {
      found.push({ pid: Number(name), startTime: fields[19] });
    }
  }
  return found;
}

function signal(target: ProcessIdentity, name: "SIGTERM" | "SIGKILL"): void {
  if (!isRunning(target)) return;
  try {
    process.kill(target.pid, name);
  } catch {
    // exited meanwhile
  }
}

async function until(check: () => boolean, timeoutMs: number): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  while (!check()) {
    if (Date.now() > deadline) return false;
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
  return true;
}

/** A free loopback port: bound to port 0, then closed. nginx's bind may still lose a race. */
function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address() as { port: number };
      server.close(() => resolve(port));
    });
  });
}

function canConnect(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = createConnection({ host: "127.0.0.1", port });
    socket.once("connect", () => {
      socket.destroy();
      resolve(true);
    });
    socket.once("error", () => {
      socket.destroy();
      resolve(false);
    });
  });
}

// Killed with SIGKILL when the test process exits without stop() (an uncaught error): nginx
// must not outlive the test run.
const unstopped = new Set<() => void>();
let exitHookInstalled = false;

function installExitHook(): void {
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  process.once("exit", () => {
    for (const kill of unstopped) kill();
  });
}

/** The temp paths nginx was built with, each set under the prefix (never /var/lib/nginx). */
function tempPaths(bin: string, prefix: string): string[] {
  // nginx -V prints its configure arguments on stderr.
  const configure = spawnSync(bin, ["-V"], { encoding: "utf8" }).stderr ?? "";
  const paths = [["client_body_temp_path", "client_body"], ["proxy_temp_path", "proxy"]];
  for (const module of ["fastcgi", "uwsgi", "scgi"]) {
    // A module built out has no temp path, and its directive would be unknown.
    if (!configure.includes(`--without-http_${module}_module`)) {
      paths.push([`${module}_temp_path`, module]);
    }
  }
  return paths.map(([directive, dir]) => `    ${directive} ${join(prefix, "temp", dir!)};`);
}

interface Launch {
  master: ProcessIdentity;
  workers: ProcessIdentity[];
  log: () => string;
  closed: Promise<void>;
}

class AddressInUse extends Error {
  constructor(port: number) {
    super(`Cannot start nginx: port ${port} is taken`);
    this.name = "AddressInUse";
  }
}

/** Starts nginx and resolves once its master has bound the port and started a worker. */
async function launch(bin: string, args: string[], port: number, timeoutMs: number) {
  const child = spawn(bin, args, { stdio: ["ignore", "ignore", "pipe"] });
  const master = identify(child.pid ?? -1);
  const workers: ProcessIdentity[] = [];
  let text = "";
  // "error" without "close" means it never ran (we never use child.kill(), its other cause).
  const closed = new Promise<void>((resolve) => {
    child.once("close", () => resolve());
    child.once("error", () => resolve());
  });
  const launched: Launch = { master, workers, log: () => text, closed };
  const kill = () => {
    for (const p of [master, ...workers, ...childrenOf(master.pid)]) signal(p, "SIGKILL");
  };
  unstopped.add(kill);

  let timer: ReturnType<typeof setTimeout> | undefined;
  try {
    await new Promise<void>((resolve, reject) => {
      child.once("error", reject);
      child.stderr!.setEncoding("utf8");
      child.stderr!.on("data", (chunk: string) => {
        text += chunk;
        for (const [, pid] of chunk.matchAll(/start worker process (\d+)/g)) {
          workers.push(identify(Number(pid)));
        }
        // nginx logs "start worker process" only once its listening socket is bound.
        if (workers.length > 0) resolve();
        if (/bind\(\) to \S+ failed \(98:/.test(text)) reject(new AddressInUse(port));
      });
      closed.then(() => reject(new Error(`Cannot start nginx: it exited\n${text}`)));
      timer = setTimeout(
        () => reject(new Error(`Cannot start nginx: not ready after ${timeoutMs} ms\n${text}`)),
        timeoutMs,
      );
    });
    if (!(await canConnect(port))) {
      throw new Error(`Cannot start nginx: it does not accept connections on ${port}\n${text}`);
    }
  } catch (error) {
    clearTimeout(timer);
    kill();
    await closed;
    unstopped.delete(kill);
    throw error;
  } finally {
    clearTimeout(timer);
  }
  return { launched, kill };
}

/**
 * Starts a real nginx on the shipped config (see {@linkcode renderConfig}), in the
 * foreground, in a temp prefix of its own, on a free loopback port. The caller must call
 * `stop()` (in a `finally`); if the process exits first, nginx is killed.
 *
 * @example Route two requests through nginx
 * ```ts ignore
 * const nginx = await startNginx({ upstreams: ["127.0.0.1:8781", "127.0.0.1:8782"] });
 * try {
 *   await fetch(`${nginx.url}/api/workspaces/ws-1/turns`, { method: "POST", body: "{}" });
 * } finally {
 *   await nginx.stop();
 * }
 * ```
 *
 * @param options The upstreams and `fail_timeout`.
 * @returns The running nginx.
 * @throws {Error} If nginx is missing, the config cannot be rendered, or nginx does not start.
 */
export async function startNginx(options: StartNginxOptions): Promise<Nginx> {
  const bin = requireNginx();
  const source = await readFile(SHIPPED_CONFIG, "utf8");
  const prefix = await mkdtemp(join(tmpdir(), "nginx-test-"));
  // Workers run as nobody when nginx starts as root (CI): they must reach the temp dirs
  // under the prefix, which the master creates and hands to them.
  await chmod(prefix, 0o755);
  await mkdir(join(prefix, "temp"));
  await mkdir(join(prefix, "logs"));
  const renderedPath = join(prefix, "codex-broker.conf");
  const mainPath = join(prefix, "nginx.conf");
  const removePrefix = () => rmSync(prefix, { recursive: true, force: true });
  installExitHook();
  unstopped.add(removePrefix);

  const args = ["-e", "stderr", "-p", `${prefix}/`, "-c", mainPath];
  let started: Awaited<ReturnType<typeof launch>> | undefined;
  let port = 0;
  try {
    for (let attempt = 1; started === undefined; attempt++) {
      port = await freePort();
      await writeFile(renderedPath, renderConfig(source, { ...options, port }));
      await writeFile(
        mainPath,
        [
          "daemon off;",
          "master_process on;",
          "worker_processes 1;",
          `pid ${join(prefix, "nginx.pid")};`,
          "error_log stderr notice;",
          "events {}",
          "http {",
          "    access_log off;",
          ...tempPaths(bin, prefix),
          `    include ${renderedPath};`,
          "}",
          "",
        ].join("\n"),
      );
      try {
        started = await launch(bin, args, port, options.startTimeoutMs ?? 10_000);
      } catch (error) {
        if (!(error instanceof AddressInUse) || attempt >= START_ATTEMPTS) throw error;
      }
    }
  } catch (error) {
    unstopped.delete(removePrefix);
    await rm(prefix, { recursive: true, force: true });
    throw error;
  }

  const { launched, kill } = started;
  const { master } = launched;
  let stopping: Promise<void> | undefined;

  async function stop(): Promise<void> {
    const everyone = () => {
      const known = [master, ...launched.workers, ...childrenOf(master.pid)];
      return known.filter((p, i) => known.findIndex((q) => q.pid === p.pid) === i);
    };
    const targets = everyone();
    // SIGTERM is nginx's fast shutdown: workers drop their connections at once. (SIGQUIT
    // would wait for open requests, such as a stream a test left open.)
    signal(master, "SIGTERM");
    let gone = await until(() => targets.every((p) => !isRunning(p)), STOP_GRACE_MS);
    if (!gone) {
      for (const p of everyone().concat(targets)) signal(p, "SIGKILL");
      gone = await until(() => targets.every((p) => !isRunning(p)), KILL_GRACE_MS);
    }
    unstopped.delete(kill);
    if (gone) await launched.closed;
    await rm(prefix, { recursive: true, force: true });
    unstopped.delete(removePrefix);
    const left = targets.filter(isRunning);
    if (left.length > 0) {
      throw new Error(`nginx left processes behind: ${left.map((p) => p.pid).join(", ")}`);
    }
  }

  return {
    url: `http://127.0.0.1:${port}`,
    pid: master.pid,
    renderedPath,
    log: launched.log,
    dump: () =>
      execFileSync(bin, ["-T", "-q", ...args], {
        encoding: "utf8",
        stdio: ["ignore", "pipe", "pipe"],
      }),
    stop: () => stopping ??= stop(),
  };
}

/** One directive of a parsed nginx config; a block has `children`. */
export interface Directive {
  name: string;
  args: string[];
  children?: Directive[];
}

function tokenize(text: string): string[] {
  const tokens: string[] = [];
  let i = 0;
  while (i < text.length) {
    const c = text[i]!;
    if (/\s/.test(c)) {
      i++;
    } else if (c === "#") {
      while (i < text.length && text[i] !== "\n") i++;
    } else if (c === "{" || c === "}" || c === ";") {
      tokens.push(c);
      i++;
    } else if (c === '"' || c === "'") {
      let word = "";
      for (i++; i < text.length && text[i] !== c; i++) {
        if (text[i] === "\\" && i + 1 < text.length) i++;
        word += text[i];
      }
      i++;
      tokens.push(word);
    } else {
      let word = "";
      while (i < text.length && !/[\s{};]/.test(text[i]!)) word += text[i++];
      tokens.push(word);
    }
  }
  return tokens;
}

function parseBlock(tokens: string[], at: { i: number }): Directive[] {
  const out: Directive[] = [];
  while (at.i < tokens.length) {
    const token = tokens[at.i++]!;
    if (token === "}") return out;
    const args: string[] = [];
    while (at.i < tokens.length && !["{", ";", "}"].includes(tokens[at.i]!)) {
      args.push(tokens[at.i++]!);
    }
    const end = tokens[at.i++];
    out.push(
      end === "{" ? { name: token, args, children: parseBlock(tokens, at) } : {
        name: token,
        args,
      },
    );
  }
  return out;
}

/**
 * Parses the output of `nginx -T` into one tree, with each `include` replaced by the file
 * it names (exact paths; that is all the harness uses).
 *
 * @param dump What `nginx -T` printed.
 * @returns The directives of the main config file.
 */
export function parseDump(dump: string): Directive[] {
  const files = new Map<string, string>();
  const parts = dump.split(/^# configuration file (.+):$/m);
  for (let i = 1; i + 1 < parts.length; i += 2) files.set(parts[i]!, parts[i + 1]!);
  const [main] = files.keys();
  if (main === undefined) throw new Error("Cannot parse nginx -T output: no file in it");
  const expand = (directives: Directive[], depth: number): Directive[] =>
    directives.flatMap((d) => {
      if (d.name === "include" && depth < 10) {
        const text = files.get(d.args[0] ?? "");
        if (text === undefined) throw new Error(`Cannot parse nginx -T output: no ${d.args[0]}`);
        return expand(parseBlock(tokenize(text), { i: 0 }), depth + 1);
      }
      return d.children ? [{ ...d, children: expand(d.children, depth) }] : [d];
    });
  return expand(parseBlock(tokenize(files.get(main)!), { i: 0 }), 0);
}

/**
 * The value of a directive where it applies to a location: set in that `location` block,
 * else inherited from its `server`, else from `http` (nginx's inheritance for proxy_*).
 *
 * @param config The parsed config ({@linkcode parseDump}).
 * @param name The directive, e.g. `proxy_read_timeout`.
 * @param location The location's argument, e.g. `/`.
 * @returns The directive's arguments, or `undefined` if it is not set (nginx's default holds).
 * @throws {Error} If there is no such location.
 */
export function effectiveDirective(
  config: Directive[],
  name: string,
  location: string,
): string[] | undefined {
  const find = (block: Directive[], chain: Directive[][]): Directive[][] | undefined => {
    for (const d of block) {
      if (!d.children) continue;
      const inner = [...chain, d.children];
      if (d.name === "location" && d.args.join(" ") === location) return inner;
      const found = find(d.children, inner);
      if (found) return found;
    }
    return undefined;
  };
  const chain = find(config, [config]);
  if (!chain) throw new Error(`No location ${location} in the nginx config`);
  for (const block of chain.reverse()) {
    const hit = block.find((d) => d.name === name);
    if (hit) return hit.args;
  }
  return undefined;
}

/**
 * Converts an nginx time ("1900s", "30m", "1h 5m", "500ms", bare seconds) to seconds.
 *
 * @param value The time as nginx reads it.
 * @returns Seconds.
 * @throws {Error} If `value` is not an nginx time.
 */
export function nginxSeconds(value: string): number {
  const units: Record<string, number> = {
    ms: 0.001,
    s: 1,
    m: 60,
    h: 3600,
    d: 86_400,
    w: 604_800,
    M: 2_592_000,
    y: 31_536_000,
  };
  const text = value.trim();
  if (!/^(\d+(ms|s|m|h|d|w|M|y)?\s*)+$/.test(text)) {
    throw new Error(`Not an nginx time: "${value}"`);
  }
  const parts = [...text.matchAll(/(\d+)(ms|s|m|h|d|w|M|y)?/g)];
  return parts.reduce((sum, p) => sum + Number(p[1]) * units[p[2] ?? "s"]!, 0);
}

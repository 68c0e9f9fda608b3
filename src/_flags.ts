/**
 * The command line of the broker: its flags, their parsing and the usage text. Every flag is
 * one row of {@linkcode FLAGS}, which the parser and the usage text both read, so adding a
 * flag is adding a row. Runtime-specific (`node:fs`, `node:path`); re-exported by
 * `src/main.ts`.
 *
 * @module
 */

import { existsSync, readFileSync, statSync } from "node:fs";
import { resolve as resolvePath } from "node:path";
import process from "node:process";
import { lookUpUser } from "./_codex_user.ts";
import { isLoopbackHttp } from "./auth.ts";
import type { BrokerOptions } from "./main.ts";
import { parsePolicy, PolicyError } from "./policy.ts";

/** Where the secret came from: `--secret`, `--secret-file`, `BROKER_SECRET`, or made up. */
export type SecretSource = "flag" | "file" | "env" | "generated";

/** What {@linkcode parseFlags} found: a request for help, or the options to start with. */
export type ParsedFlags =
  | { help: true }
  | {
    help: false;
    options: BrokerOptions;
    secretSource: SecretSource;
    /**
     * With `--secret-file`: its path, and its permission bits (e.g. `0o640`), so a file
     * other users can read can be warned about.
     */
    secretFile?: { path: string; mode: number };
  };

/**
 * Thrown by {@linkcode parseFlags} for an unknown flag, a missing value or a bad value.
 *
 * @example Tell a usage error from a crash
 * ```ts ignore
 * try {
 *   parseFlags(["--port", "http"]);
 * } catch (error) {
 *   if (error instanceof UsageError) console.error(error.message); // exit 2
 * }
 * ```
 */
export class UsageError extends Error {
  /**
   * Creates the error.
   *
   * @param message What is wrong with the command line.
   */
  constructor(message: string) {
    super(message);
    this.name = "UsageError";
  }
}

/**
 * The longest duration a flag takes: 24 days. Timers cannot wait longer than 2³¹-1 ms
 * (24.8 days; Node and Deno fire a longer one after 1 ms), and no duration of the broker is
 * meaningful beyond it, so a longer one is refused rather than silently cut: the pool's
 * sweep runs every idle TTL / 4, the grace period is one timer.
 */
const MAX_DURATION_MS = 24 * 24 * 3_600_000;

/** One flag: the parser checks and stores its value, the usage text prints its help. */
interface Flag {
  /** The name without the leading `--`. */
  name: string;
  /** Placeholder of the value in the usage text, e.g. `<duration>`. */
  value: string;
  /** Help lines; the first follows the flag, the others are indented under it. */
  help: readonly string[];
  /** Checks `value` and sets it on `options`; throws a {@linkcode UsageError} if bad. */
  apply(value: string, options: BrokerOptions): void;
}

function directory(flag: string, key: "workspacesDir" | "codexHome"): Flag["apply"] {
  return (dir, options) => {
    if (dir === "") throw new UsageError(`Invalid --${flag}: expected a directory`);
    options[key] = resolvePath(dir);
  };
}

function count(
  flag: string,
  min: number,
  key: "maxTurnsPerWorkspace" | "maxWaitingTurnsPerWorkspace",
): Flag["apply"] {
  return (text, options) => {
    if (!/^\d{1,7}$/.test(text) || Number(text) < min) {
      throw new UsageError(
        `Invalid --${flag} ${JSON.stringify(text)}: expected an integer of at least ${min}`,
      );
    }
    options[key] = Number(text);
  };
}

function choice<K extends "denoServer" | "wsClient" | "v8Pretenuring">(
  flag: string,
  key: K,
  values: readonly NonNullable<BrokerOptions[K]>[],
): Flag["apply"] {
  return (text, options) => {
    const value = values.find((v) => v === text);
    if (value === undefined) {
      throw new UsageError(
        `Invalid --${flag} ${JSON.stringify(text)}: expected ${values.join(" or ")}`,
      );
    }
    options[key] = value;
  };
}

function nonEmpty(flag: string, key: "jwtAudience" | "jwtIssuer"): Flag["apply"] {
  return (text, options) => {
    if (text === "") throw new UsageError(`Invalid --${flag}: expected a non-empty value`);
    options[key] = text;
  };
}

const FLAGS: readonly Flag[] = [
  {
    name: "host",
    value: "<address>",
    help: ["Address to listen on (default 127.0.0.1)"],
    apply(host, options) {
      if (host.trim() === "") throw new UsageError("Invalid --host: expected an address");
      options.host = host;
    },
  },
  {
    name: "port",
    value: "<port>",
    help: ["Port to listen on, 0 for any free one (default 8787)"],
    apply(port, options) {
      if (!/^\d{1,5}$/.test(port) || Number(port) > 65535) {
        throw new UsageError(
          `Invalid --port ${JSON.stringify(port)}: expected an integer from 0 to 65535`,
        );
      }
      options.port = Number(port);
    },
  },
  {
    name: "secret",
    value: "<secret>",
    help: [
      "X-Internal-Secret that POST /api/turns must carry; ps shows it",
      "to every user: prefer --secret-file. Printable ASCII, no leading",
      "or trailing space; an empty one is refused, one under 16 bytes is",
      "warned about. With no secret given, one is generated and logged",
      "once to stderr",
    ],
    apply(secret, options) {
      const problem = secretProblem(secret);
      if (problem !== undefined) throw new UsageError(`Invalid --secret: ${problem}`);
      options.secret = secret;
    },
  },
  {
    name: "secret-file",
    value: "<path>",
    help: [
      "Read the secret from this file (one trailing newline is dropped),",
      "so that neither the command line nor the environment holds it;",
      "make it readable by the broker's user only (0600)",
    ],
    apply(path, options) {
      if (path === "") throw new UsageError("Invalid --secret-file: expected a path");
      options.secret = readSecretFile(resolvePath(path));
    },
  },
  {
    name: "idle-ttl",
    value: "<duration>",
    help: ["Stop a workspace's codex after this long idle (default 5m)"],
    apply(text, options) {
      const ms = parseDuration(text, "--idle-ttl");
      if (ms <= 0) {
        throw new UsageError(`Invalid --idle-ttl ${JSON.stringify(text)}: must be positive`);
      }
      options.idleTtlMs = ms;
    },
  },
  {
    name: "turn-silence",
    value: "<duration>",
    help: [
      "A turn with no frame from codex for this long is looked up with",
      "thread/read: returned if it ended, failed with turnLost if its",
      "thread is idle (default 60s)",
    ],
    apply(text, options) {
      const ms = parseDuration(text, "--turn-silence");
      if (ms <= 0) {
        throw new UsageError(`Invalid --turn-silence ${JSON.stringify(text)}: must be positive`);
      }
      options.turnSilenceMs = ms;
    },
  },
  {
    name: "workspaces-dir",
    value: "<dir>",
    help: [
      "Each workspace's state lives in <dir>/<workspaceId> (work/, its",
      "own codex-home/, run/, lease/), created on demand; share it",
      "between brokers to scale out (default ./workspaces)",
    ],
    apply: directory("workspaces-dir", "workspacesDir"),
  },
  {
    name: "codex-home",
    value: "<dir>",
    help: [
      "Template copied into each workspace's own CODEX_HOME: config.toml,",
      "auth.json, … (default: $CODEX_HOME, else ~/.codex)",
    ],
    apply: directory("codex-home", "codexHome"),
  },
  {
    name: "codex",
    value: "<path>",
    help: [
      "The codex binary (default: beside a compiled broker, then the",
      "package's node_modules, then codex on PATH)",
    ],
    apply(codex, options) {
      if (codex === "") throw new UsageError("Invalid --codex: expected the path of the binary");
      // codex is spawned in the workspace directory: a relative path must not be read there.
      options.codex = codex.includes("/") ? resolvePath(codex) : codex;
      if (codex.includes("/") && !existsSync(options.codex)) {
        throw new UsageError(`Invalid --codex ${JSON.stringify(codex)}: no such file`);
      }
    },
  },
  {
    name: "approvals",
    value: "<decision>",
    help: ["Answer codex's approval requests with accept or decline", "(default decline)"],
    apply(approvals, options) {
      if (approvals !== "accept" && approvals !== "decline") {
        throw new UsageError(
          `Invalid --approvals ${JSON.stringify(approvals)}: expected accept or decline`,
        );
      }
      options.approvals = approvals;
    },
  },
  {
    name: "deno-server",
    value: "<server>",
    help: [
      "On Deno: node (node:http, default), which closes idle and slow",
      "clients' connections, or native (Deno.serve), which does not:",
      "behind nginx only",
    ],
    apply: choice("deno-server", "denoServer", ["node", "native"]),
  },
  {
    name: "ws-client",
    value: "<client>",
    help: [
      "The WebSocket client to codex: net (default), the broker's own on",
      "node:net, which writes the frames of one event-loop turn together,",
      "or web, the runtime's WebSocket",
    ],
    apply: choice("ws-client", "wsClient", ["net", "web"]),
  },
  {
    name: "v8-pretenuring",
    value: "<mode>",
    help: [
      "On Node: V8's allocation-site pretenuring, on or off (default",
      "off: under load it sent most of every turn's objects to the old",
      "generation). Deno takes it only as its own flag:",
      "deno run --v8-flags=--no-allocation-site-pretenuring (npm start does)",
    ],
    apply: choice("v8-pretenuring", "v8Pretenuring", ["off", "on"]),
  },
  {
    name: "grace",
    value: "<duration>",
    help: [
      "On SIGINT, SIGTERM or SIGHUP, let turns in flight finish this",
      "long before interrupting them (default 10s); a second signal",
      "cuts it short",
    ],
    apply(text, options) {
      options.graceMs = parseDuration(text, "--grace");
    },
  },
  {
    name: "request-timeout",
    value: "<duration>",
    help: [
      "Answer 408 to a client whose request takes longer to send",
      "(default 60s)",
    ],
    apply(text, options) {
      const ms = parseDuration(text, "--request-timeout");
      if (ms <= 0) {
        throw new UsageError(`Invalid --request-timeout ${JSON.stringify(text)}: must be positive`);
      }
      options.requestTimeoutMs = ms;
    },
  },
  {
    name: "broker-id",
    value: "<id>",
    help: [
      "This broker's id in leases and in the X-Broker-Id header; unique",
      "among brokers (default BROKER_ID, else <hostname>:<port>)",
    ],
    apply(id, options) {
      if (!/^[\x21-\x7e]{1,128}$/.test(id)) {
        throw new UsageError(
          `Invalid --broker-id ${JSON.stringify(id)}: expected 1 to 128 visible ASCII characters`,
        );
      }
      options.brokerId = id;
    },
  },
  {
    name: "advertise-url",
    value: "<url>",
    help: [
      "Where the other brokers reach this one, written into its leases",
      "(default: the URL it listens on)",
    ],
    apply(text, options) {
      let url: URL;
      try {
        url = new URL(text);
      } catch {
        throw new UsageError(`Invalid --advertise-url ${JSON.stringify(text)}: expected a URL`);
      }
      if (url.protocol !== "http:" && url.protocol !== "https:") {
        throw new UsageError(
          `Invalid --advertise-url ${JSON.stringify(text)}: expected an http:// or https:// URL`,
        );
      }
      options.advertiseUrl = url.href.replace(/\/+$/, "");
    },
  },
  {
    name: "lease-ttl",
    value: "<duration>",
    help: [
      "A workspace whose broker died is taken over this long after its",
      "last lease renewal (default 15s)",
    ],
    apply(text, options) {
      const ms = parseDuration(text, "--lease-ttl");
      if (ms < 300) {
        throw new UsageError(`Invalid --lease-ttl ${JSON.stringify(text)}: at least 300ms`);
      }
      options.leaseTtlMs = ms;
    },
  },
  {
    name: "max-workspaces",
    value: "<n>",
    help: [
      "At most this many codex processes at once; a new workspace",
      "evicts the least recently used idle one, and when all are busy",
      "turns get 503 atCapacity (default: what memory holds, ~150 MB each)",
    ],
    apply(text, options) {
      if (!/^\d{1,7}$/.test(text) || Number(text) < 1) {
        throw new UsageError(
          `Invalid --max-workspaces ${JSON.stringify(text)}: expected a positive integer`,
        );
      }
      options.maxWorkspaces = Number(text);
    },
  },
  {
    name: "policy",
    value: "<file>",
    help: [
      "JSON policy on what callers may set in threadParams and params",
      "(sandbox, approvals, models, cwd, …) per credential kind; see the",
      "README. Default: no danger-full-access, cwd inside the workspace",
    ],
    apply(file, options) {
      const where = `Invalid --policy ${JSON.stringify(file)}`;
      let text: string;
      try {
        text = readFileSync(file, "utf8");
      } catch (error) {
        throw new UsageError(`${where}: cannot read it: ${(error as Error).message}`);
      }
      try {
        options.policy = parsePolicy(text);
      } catch (error) {
        if (!(error instanceof PolicyError)) throw error;
        throw new UsageError(
          `${where}: ${error.path === "" ? "" : `${error.path}: `}${error.reason}`,
        );
      }
    },
  },
  {
    name: "codex-user",
    value: "<user>",
    help: [
      "Run every codex, and so every command the model runs, as this",
      "user (a name or uid), kept out of the broker's own files (0600)",
      "and processes; needs a broker running as root. Each workspace's",
      "work/ and codex-home/ become the user's",
    ],
    apply(name, options) {
      const uid = process.getuid?.();
      if (uid !== 0) {
        throw new UsageError(
          `Invalid --codex-user ${JSON.stringify(name)}: only a broker running as root can ` +
            `run codex as another user (this one runs as uid ${uid ?? "unknown"})`,
        );
      }
      const user = lookUpUser(name);
      if (user === undefined) {
        throw new UsageError(`Invalid --codex-user ${JSON.stringify(name)}: no such user`);
      }
      if (user.uid === 0) {
        throw new UsageError(
          `Invalid --codex-user ${JSON.stringify(name)}: it is root, which separates nothing`,
        );
      }
      options.codexUser = user;
    },
  },
  {
    name: "jwt-secret-file",
    value: "<file>",
    help: [
      "Also accept Authorization: Bearer <JWT> signed HS256 with the key",
      "in this file (at least 32 bytes; one final newline is ignored)",
    ],
    apply(file, options) {
      let key: string;
      try {
        key = readFileSync(resolvePath(file), "utf8").replace(/\r?\n$/, "");
      } catch (error) {
        throw new UsageError(
          `Invalid --jwt-secret-file ${JSON.stringify(file)}: ${(error as Error).message}`,
        );
      }
      if (new TextEncoder().encode(key).length < 32) {
        throw new UsageError(
          `Invalid --jwt-secret-file ${JSON.stringify(file)}: the key needs at least 32 bytes`,
        );
      }
      options.jwtSecret = key;
    },
  },
  {
    name: "jwks",
    value: "<file|url>",
    help: [
      "Also accept bearer JWTs signed EdDSA, ES256 or RS256 by a key of",
      "this JSON Web Key Set: an https:// URL, or a file re-read every",
      "30s and whenever a token names a key it lacks",
    ],
    apply(source, options) {
      if (/^https?:\/\//i.test(source)) {
        let url: URL;
        try {
          url = new URL(source);
        } catch {
          throw new UsageError(`Invalid --jwks ${JSON.stringify(source)}: expected a URL`);
        }
        if (url.protocol !== "https:" && !isLoopbackHttp(url)) {
          const problem = "expected https:// (http:// on loopback only)";
          throw new UsageError(`Invalid --jwks ${JSON.stringify(source)}: ${problem}`);
        }
        options.jwks = url.href;
        return;
      }
      if (source === "" || !existsSync(resolvePath(source))) {
        throw new UsageError(`Invalid --jwks ${JSON.stringify(source)}: no such file`);
      }
      options.jwks = resolvePath(source);
    },
  },
  {
    name: "jwt-audience",
    value: "<aud>",
    help: ["A bearer JWT's aud must hold this value"],
    apply: nonEmpty("jwt-audience", "jwtAudience"),
  },
  {
    name: "jwt-issuer",
    value: "<iss>",
    help: ["A bearer JWT's iss must be this value"],
    apply: nonEmpty("jwt-issuer", "jwtIssuer"),
  },
  {
    name: "max-workspace-turns",
    value: "<n>",
    help: ["At most this many turns of one workspace at once (default 16)"],
    apply: count("max-workspace-turns", 1, "maxTurnsPerWorkspace"),
  },
  {
    name: "max-workspace-queue",
    value: "<n>",
    help: [
      "At most this many more turns of one workspace wait in line;",
      "past that, 429 tooManyTurns with Retry-After (default 64)",
    ],
    apply: count("max-workspace-queue", 0, "maxWaitingTurnsPerWorkspace"),
  },
];

const FLAG_COLUMN = 28;

function usageLines(): string {
  const lines: string[] = [];
  for (const flag of FLAGS) {
    const [first = "", ...rest] = flag.help;
    lines.push(`  --${flag.name} ${flag.value}`.padEnd(FLAG_COLUMN) + first);
    for (const line of rest) lines.push(" ".repeat(FLAG_COLUMN) + line);
  }
  lines.push("  -h, --help".padEnd(FLAG_COLUMN) + "Print this help and exit");
  return lines.join("\n");
}

/** The text `--help` prints. */
export const USAGE: string = `Usage: codex-broker [flags]

Runs codex turns over REST: POST /api/turns, GET /healthz, GET /metrics.
Start it with: deno run -A src/main.ts | bun src/main.ts | node src/main.ts

Flags (a value may follow a space or "="; the last of a repeated flag wins):
${usageLines()}

Durations are milliseconds ("1500") or a number with a unit: ms, s, m, h ("30s", "5m"),
at most 24 days (576h).
Environment: BROKER_SECRET (see --secret; read once, removed from the environment and,
on Linux, erased from /proc/<pid>/environ), BROKER_ID (see --broker-id). codex itself
uses the user's login or OPENAI_API_KEY. Logs are JSON lines on stderr. Exit codes: 0
after a clean shutdown, 1 if the server cannot start, 2 for a bad flag.
`;

/** A secret shorter than this many bytes is accepted with a warning: it can be guessed. */
export const MIN_SECRET_BYTES = 16;

/**
 * Why `secret` cannot work as an `X-Internal-Secret`, or `undefined` if it can. HTTP strips
 * the spaces around a header value, so a secret that starts or ends with one (a
 * whitespace-only one among them) could never match; a header cannot carry control
 * characters; and clients send header values as bytes that servers read as Latin-1, so
 * anything outside ASCII would not compare equal either.
 *
 * @example Check a secret
 * ```ts ignore
 * secretProblem("s3cret"); // undefined
 * secretProblem(" "); // "must not start or end with whitespace, which HTTP strips …"
 * ```
 *
 * @param secret The secret to check.
 * @returns What is wrong with it, in words that follow `Invalid --secret: `.
 */
export function secretProblem(secret: string): string | undefined {
  if (secret === "") return "expected a non-empty value";
  if (secret.trim() !== secret) {
    return "must not start or end with whitespace, which HTTP strips from header values";
  }
  if (!/^[\x20-\x7e]+$/.test(secret)) {
    return "expected printable ASCII characters only, which any HTTP client can send as a header";
  }
  return undefined;
}

/**
 * Parses a duration: milliseconds (`"1500"`) or a number with a unit `ms`, `s`, `m` or `h`
 * (`"30s"`, `"1.5m"`), at most 24 days. Longer ones are refused: timers cannot wait past
 * 2³¹-1 ms (24.8 days), and no duration of the broker is meaningful beyond a few days.
 *
 * @example Durations
 * ```ts ignore
 * parseDuration("5m", "--idle-ttl"); // 300000
 * parseDuration("250", "--grace"); // 250
 * parseDuration("3000h", "--idle-ttl"); // throws UsageError: at most 576h (24 days)
 * ```
 *
 * @param text The value.
 * @param flag The flag it came with, for the error message.
 * @returns Whole milliseconds, from 0 to 24 days.
 * @throws {UsageError} If `text` is not a duration, or is longer than 24 days.
 */
export function parseDuration(text: string, flag: string): number {
  const match = /^(\d+(?:\.\d+)?)(ms|s|m|h)?$/.exec(text.trim());
  const unit = { ms: 1, s: 1_000, m: 60_000, h: 3_600_000 }[match?.[2] ?? "ms"] ?? 1;
  const ms = match ? Math.round(Number(match[1]) * unit) : NaN;
  if (!Number.isSafeInteger(ms)) {
    throw new UsageError(
      `Invalid ${flag} ${JSON.stringify(text)}: expected milliseconds or a number with a ` +
        `unit (ms, s, m, h), e.g. 30s or 5m`,
    );
  }
  if (ms > MAX_DURATION_MS) {
    throw new UsageError(
      `Invalid ${flag} ${JSON.stringify(text)}: at most 576h (24 days), the longest a timer ` +
        `can wait`,
    );
  }
  return ms;
}

/**
 * Parses the command line (see {@linkcode USAGE}). `--secret` or `--secret-file` (not both)
 * wins over `BROKER_SECRET`; with none, a secret of 32 random bytes (base64url) is generated. A secret that cannot
 * work (see {@linkcode secretProblem}) is refused, from the flag and from the environment
 * alike: a `BROKER_SECRET` that is set but empty is an error, not a request for a new one.
 *
 * @example Parse flags
 * ```ts ignore
 * const parsed = parseFlags(["--port", "0", "--idle-ttl", "30s"], { BROKER_SECRET: "s3cret" });
 * if (!parsed.help) console.log(parsed.options.port, parsed.options.idleTtlMs); // 0 30000
 * ```
 *
 * @param args The arguments after the script, e.g. `process.argv.slice(2)`.
 * @param env The environment to read `BROKER_SECRET` from.
 * @returns `{ help: true }` for `--help`, else the options and where the secret came from.
 * @throws {UsageError} If a flag is unknown, lacks its value, or has a bad value (a
 * `--secret-file` that is missing, unreadable, empty or holds a secret that cannot work; a
 * `--codex-user` that does not exist, or given to a broker not running as root), or if
 * `BROKER_SECRET` is set to a secret that cannot work.
 */
export function parseFlags(
  args: readonly string[],
  env: Record<string, string | undefined> = {},
): ParsedFlags {
  const values = new Map<Flag, string>();
  for (let i = 0; i < args.length; i++) {
    const arg = args[i]!;
    if (arg === "--help" || arg === "-h") return { help: true };
    if (!arg.startsWith("--")) {
      throw new UsageError(
        arg.startsWith("-")
          ? `Unknown flag ${arg}`
          : `Unexpected argument ${JSON.stringify(arg)}: every value follows its flag`,
      );
    }
    const eq = arg.indexOf("=");
    const name = arg.slice(2, eq === -1 ? undefined : eq);
    const flag = FLAGS.find((f) => f.name === name);
    if (!flag) throw new UsageError(`Unknown flag --${name}`);
    let value: string | undefined;
    if (eq !== -1) {
      value = arg.slice(eq + 1);
    } else {
      value = args[++i];
      if (value === undefined || value.startsWith("--")) {
        throw new UsageError(`Missing value for --${name}`);
      }
    }
    values.set(flag, value);
  }

  if (values.has(FLAGS.find((f) => f.name === "secret")!) && values.has(SECRET_FILE_FLAG)) {
    throw new UsageError("Give the secret once: either --secret or --secret-file");
  }
  const options: BrokerOptions = { secret: "" };
  // In the table's order, so that errors come in the order of the usage text.
  for (const flag of FLAGS) {
    const value = values.get(flag);
    if (value !== undefined) flag.apply(value, options);
  }
  let secretSource: SecretSource;
  let secretFile: { path: string; mode: number } | undefined;
  const secretFilePath = values.get(SECRET_FILE_FLAG);
  if (secretFilePath !== undefined) {
    secretSource = "file";
    const path = resolvePath(secretFilePath);
    secretFile = { path, mode: statSync(path).mode & 0o777 };
  } else if (options.secret !== "") {
    secretSource = "flag";
  } else if (env.BROKER_SECRET !== undefined) {
    // Set but unusable (empty, say) is a mistake to report, not a reason to make one up.
    const problem = secretProblem(env.BROKER_SECRET);
    if (problem !== undefined) {
      throw new UsageError(
        `Invalid BROKER_SECRET: ${problem}${
          env.BROKER_SECRET === "" ? " (unset it to have one generated)" : ""
        }`,
      );
    }
    options.secret = env.BROKER_SECRET;
    secretSource = "env";
  } else {
    options.secret = generateSecret();
    secretSource = "generated";
  }
  if (options.brokerId === undefined && env.BROKER_ID) {
    FLAGS.find((f) => f.name === "broker-id")!.apply(env.BROKER_ID, options);
  }
  return {
    help: false,
    options,
    secretSource,
    ...(secretFile === undefined ? {} : { secretFile }),
  };
}

const SECRET_FILE_FLAG = FLAGS.find((f) => f.name === "secret-file")!;

/**
 * Reads a secret from a file: its whole content, less one trailing newline (`echo` and
 * editors add one; anything else is part of the secret, and checked as one).
 */
function readSecretFile(path: string): string {
  let text: string;
  try {
    text = readFileSync(path, "utf8");
  } catch (error) {
    const code = (error as { code?: unknown } | null)?.code;
    const why = code === "ENOENT"
      ? "no such file"
      : code === "EISDIR"
      ? "it is a directory"
      : `cannot be read (${error instanceof Error ? error.message : String(error)})`;
    throw new UsageError(`Invalid --secret-file ${JSON.stringify(path)}: ${why}`);
  }
  const secret = text.replace(/\r?\n$/, "");
  if (secret === "") {
    throw new UsageError(`Invalid --secret-file ${JSON.stringify(path)}: it is empty`);
  }
  const problem = secretProblem(secret);
  if (problem !== undefined) {
    throw new UsageError(`Invalid --secret-file ${JSON.stringify(path)}: ${problem}`);
  }
  return secret;
}

function generateSecret(): string {
  const bytes = crypto.getRandomValues(new Uint8Array(32));
  return btoa(String.fromCharCode(...bytes)).replaceAll("+", "-").replaceAll("/", "_")
    .replace(/=+$/, "");
}

// deno-lint-ignore-file no-explicit-any -- frames are arbitrary JSON until the schema has checked them.
/**
 * The installed codex's own protocol schema, as validators for single JSON-RPC frames.
 *
 * The schema is generated once per test process with `codex app-server generate-json-schema`
 * into a temporary directory that is removed right after it has been read (0.5 to 1 s per
 * process here, with compiling the common validators). A codex upgrade that changes the
 * protocol then fails the tests that exchange the changed message, and names it. Nothing
 * generated is committed.
 *
 * Frames are checked by direction and kind: a client request against the `ClientRequest`
 * union's entry for its method, a client notification against `ClientNotification`, a
 * response against `<Name>Response` where the request's params are `<Name>Params`, a server
 * request or notification against `ServerRequest` / `ServerNotification`, an error answer
 * against `JSONRPCErrorError`. A method the union does not list is a violation too.
 *
 * @module
 */

import { Ajv, type ErrorObject, type ValidateFunction } from "ajv";
import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import type { TestOptions } from "./_test.ts";

const ROOT = fileURLToPath(new URL("..", import.meta.url));
const CODEX = join(ROOT, "node_modules", ".bin", "codex");
const BUNDLE = "codex_app_server_protocol.schemas.json";
const SCHEMA_ID = "codex";

const WARM_CLIENT_REQUESTS = [
  "initialize",
  "thread/start",
  "thread/resume",
  "turn/start",
  "turn/interrupt",
];
const WARM_SERVER_NOTIFICATIONS = [
  "error",
  "thread/status/changed",
  "turn/started",
  "turn/completed",
  "item/started",
  "item/completed",
  "item/agentMessage/delta",
];

/** Who sent a frame: the broker (client) or codex (server). */
export type Sender = "client" | "server";

/** A frame that codex's schema rejects. */
export class SchemaViolationError extends Error {
  /** The method the frame is (or answers), or `undefined` if it names none. */
  readonly method: string | undefined;
  /** The offending frame. */
  readonly frame: unknown;

  /**
   * @param message What is wrong, with the method named.
   * @param method The method the frame is or answers.
   * @param frame The frame.
   */
  constructor(message: string, method: string | undefined, frame: unknown) {
    super(message);
    this.name = "SchemaViolationError";
    this.method = method;
    this.frame = frame;
  }
}

interface Union {
  /** method → JSON pointer of the union entry, e.g. `#/definitions/ClientRequest/oneOf/3`. */
  entries: Map<string, string>;
  /** method → definition pointer of its response, when the params name one. */
  responses: Map<string, string>;
}

/** The protocol schema of the installed codex, compiled on demand. */
export class CodexSchema {
  /** The `@openai/codex` version the schema came from. */
  readonly version: string;
  #ajv: Ajv;
  #validators = new Map<string, ValidateFunction>();
  #clientRequests: Union;
  #serverRequests: Union;
  #clientNotifications: Union;
  #serverNotifications: Union;

  /**
   * @param bundle The parsed `codex_app_server_protocol.schemas.json`.
   * @param version The codex version, for messages.
   */
  constructor(bundle: any, version: string) {
    this.version = version;
    this.#ajv = new Ajv({ allErrors: true, strict: false });
    const integer = (min: number, max: number) => ({
      type: "number" as const,
      validate: (n: number) => Number.isInteger(n) && n >= min && n <= max,
    });
    this.#ajv.addFormat("int32", integer(-(2 ** 31), 2 ** 31 - 1));
    this.#ajv.addFormat("int64", integer(-Number.MAX_SAFE_INTEGER, Number.MAX_SAFE_INTEGER));
    this.#ajv.addFormat("uint", integer(0, Number.MAX_SAFE_INTEGER));
    this.#ajv.addFormat("uint16", integer(0, 2 ** 16 - 1));
    this.#ajv.addFormat("uint32", integer(0, 2 ** 32 - 1));
    this.#ajv.addFormat("uint64", integer(0, Number.MAX_SAFE_INTEGER));
    this.#ajv.addFormat("double", { type: "number", validate: Number.isFinite });
    this.#ajv.addSchema({ ...bundle, $id: SCHEMA_ID });
    const definitions = bundle.definitions;
    this.#clientRequests = union(definitions, "ClientRequest");
    this.#serverRequests = union(definitions, "ServerRequest");
    this.#clientNotifications = union(definitions, "ClientNotification");
    this.#serverNotifications = union(definitions, "ServerNotification");
    // Compiling a validator takes milliseconds; done lazily inside a frame's send, that would
    // delay the fake's answers in timing-sensitive tests. So the messages the broker and the
    // fake exchange are compiled now, the rest on first use.
    for (const method of WARM_CLIENT_REQUESTS) {
      this.#compile(this.#clientRequests.entries.get(method));
      this.#compile(this.#clientRequests.responses.get(method));
    }
    for (const pointer of this.#clientNotifications.entries.values()) this.#compile(pointer);
    for (const [method, pointer] of this.#serverRequests.entries) {
      this.#compile(pointer);
      this.#compile(this.#serverRequests.responses.get(method));
    }
    for (const method of WARM_SERVER_NOTIFICATIONS) {
      this.#compile(this.#serverNotifications.entries.get(method));
    }
    this.#compile("#/definitions/JSONRPCErrorError");
  }

  /**
   * Checks a frame the broker sends to codex.
   *
   * @param frame The parsed frame.
   * @param serverRequestMethod The method of the server request with this id, for answers.
   * @returns The violation, or `undefined` if the frame conforms.
   */
  checkClientFrame(
    frame: unknown,
    serverRequestMethod: (id: unknown) => string | undefined,
  ): SchemaViolationError | undefined {
    return this.#check(
      frame,
      "client",
      this.#clientRequests,
      this.#clientNotifications,
      this.#serverRequests,
      serverRequestMethod,
    );
  }

  /**
   * Checks a frame codex (or the fake) sends to the broker.
   *
   * @param frame The parsed frame.
   * @param clientRequestMethod The method of the client request with this id, for responses.
   * @returns The violation, or `undefined` if the frame conforms.
   */
  checkServerFrame(
    frame: unknown,
    clientRequestMethod: (id: unknown) => string | undefined,
  ): SchemaViolationError | undefined {
    return this.#check(
      frame,
      "server",
      this.#serverRequests,
      this.#serverNotifications,
      this.#clientRequests,
      clientRequestMethod,
    );
  }

  #check(
    frame: unknown,
    sender: Sender,
    requests: Union,
    notifications: Union,
    answered: Union,
    requestMethod: (id: unknown) => string | undefined,
  ): SchemaViolationError | undefined {
    const violation = (message: string, method?: string) =>
      new SchemaViolationError(
        `${sender} frame breaks codex ${this.version}'s schema: ${message}`,
        method,
        frame,
      );
    if (typeof frame !== "object" || frame === null || Array.isArray(frame)) {
      return violation("not a JSON object");
    }
    const message = frame as Record<string, unknown>;
    if (typeof message.method === "string") {
      const method = message.method;
      const isRequest = "id" in message;
      const kind = isRequest ? "request" : "notification";
      const pointer = (isRequest ? requests : notifications).entries.get(method);
      if (pointer === undefined) {
        return violation(`${method} ${kind}: unknown ${sender} ${kind} method`, method);
      }
      const errors = this.#validate(pointer, frame, "");
      return errors === undefined ? undefined : violation(`${method} ${kind}: ${errors}`, method);
    }
    if (!("id" in message)) return violation("neither a request, a notification nor a response");
    const method = requestMethod(message.id);
    if (method === undefined) {
      return violation(`response to id ${JSON.stringify(message.id)}: no request with this id`);
    }
    if ("error" in message) {
      const errors = this.#validate("#/definitions/JSONRPCErrorError", message.error, "error");
      return errors === undefined
        ? undefined
        : violation(`${method} error response: ${errors}`, method);
    }
    if (!("result" in message)) return violation(`${method} response: no result or error`, method);
    const pointer = answered.responses.get(method);
    if (pointer === undefined) return violation(`${method} response: no response schema`, method);
    const errors = this.#validate(pointer, message.result, "result");
    return errors === undefined ? undefined : violation(`${method} response: ${errors}`, method);
  }

  #compile(pointer: string | undefined): ValidateFunction | undefined {
    if (pointer === undefined) return undefined;
    let validate = this.#validators.get(pointer);
    if (!validate) {
      validate = this.#ajv.compile({ $ref: `${SCHEMA_ID}${pointer}` });
      this.#validators.set(pointer, validate);
    }
    return validate;
  }

  /** The errors of `value` against the schema at `pointer`, or `undefined`. */
  #validate(pointer: string, value: unknown, root: string): string | undefined {
    const validate = this.#compile(pointer)!;
    if (validate(value)) return undefined;
    return formatErrors(validate.errors ?? [], root);
  }
}

function union(definitions: any, name: string): Union {
  const entries = new Map<string, string>();
  const responses = new Map<string, string>();
  (definitions[name].oneOf as any[]).forEach((entry, index) => {
    const method = entry.properties.method.enum[0] as string;
    entries.set(method, `#/definitions/${name}/oneOf/${index}`);
    const ref: unknown = entry.properties.params?.$ref;
    if (typeof ref !== "string") return;
    const response = ref.replace(/Params$/, "Response");
    const path = response.replace(/^#\/definitions\//, "").split("/");
    let node = definitions;
    for (const part of path) node = node?.[part];
    if (node !== undefined) responses.set(method, response);
  });
  return { entries, responses };
}

/** `/params must have required property 'input'; …`, one line per place and problem. */
function formatErrors(errors: ErrorObject[], root: string): string {
  // A union (anyOf/oneOf) reports each branch's mismatch, then its own failure: the branches
  // say what is wrong, so the union's own line goes, and enum branches merge into one line.
  const allowed = new Map<string, unknown[]>();
  const lines = new Set<string>();
  for (const error of errors) {
    if (["oneOf", "anyOf", "allOf", "if"].includes(error.keyword)) continue;
    const path = root + error.instancePath || "frame";
    if (error.keyword === "enum" || error.keyword === "const") {
      const values = error.keyword === "enum"
        ? error.params.allowedValues as unknown[]
        : [error.params.allowedValue];
      allowed.set(path, [...allowed.get(path) ?? [], ...values]);
      continue;
    }
    lines.add(`${path} ${error.message ?? "is invalid"}`);
  }
  const merged = [...allowed].map(([path, values]) =>
    `${path} must be one of ${values.map((v) => JSON.stringify(v)).join(", ")}`
  );
  return [...merged, ...lines].slice(0, 6).join("; ");
}

let cached: CodexSchema | undefined;

/**
 * The installed codex's schema, generated on first use and kept for the process.
 *
 * @returns The schema.
 * @throws {Error} If codex cannot generate it.
 */
export function codexSchema(): CodexSchema {
  if (cached) return cached;
  const dir = mkdtempSync(join(tmpdir(), "codex-schema-"));
  try {
    execFileSync(CODEX, ["app-server", "generate-json-schema", "--out", dir], {
      stdio: ["ignore", "ignore", "pipe"],
      timeout: 30_000,
    });
    const bundle = JSON.parse(readFileSync(join(dir, BUNDLE), "utf8"));
    const pkg = join(ROOT, "node_modules", "@openai", "codex", "package.json");
    const version = JSON.parse(readFileSync(pkg, "utf8")).version as string;
    cached = new CodexSchema(bundle, version);
    return cached;
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

type Fn = () => void | Promise<void>;
type Register = (name: string, options: TestOptions | Fn, fn?: Fn) => void;

/** What the broker's WebSockets sent while a {@linkcode SentFrameTap} was installed. */
export interface SentFrameTap {
  /** Every frame sent, parsed (a frame that is not JSON as its text). */
  readonly frames: unknown[];
  /** The frames that break codex's schema. */
  readonly violations: SchemaViolationError[];
  /** Puts `WebSocket.prototype` back as it was. */
  restore(): void;
}

/**
 * Wraps the global `WebSocket.prototype` so every text frame any socket of this process sends
 * is recorded and checked against codex's schema. Server requests are seen through the
 * `onmessage` handlers set while installed, so an answer is checked against its request's
 * method; the broker sets `onmessage` right after the socket opens, so dial after installing.
 *
 * @returns The tap; call `restore()` when done.
 */
export function tapSentFrames(): SentFrameTap {
  const schema = codexSchema();
  const proto = globalThis.WebSocket.prototype;
  const send = proto.send;
  const onmessage = Object.getOwnPropertyDescriptor(proto, "onmessage");
  if (!onmessage?.set || !onmessage.get) throw new Error("WebSocket.prototype has no onmessage");
  const { get, set } = onmessage;
  const serverRequests = new WeakMap<WebSocket, Map<unknown, string>>();
  const requestsOf = (ws: WebSocket) => {
    let requests = serverRequests.get(ws);
    if (!requests) serverRequests.set(ws, requests = new Map());
    return requests;
  };
  const frames: unknown[] = [];
  const violations: SchemaViolationError[] = [];
  proto.send = function (this: WebSocket, data: Parameters<WebSocket["send"]>[0]) {
    let frame: unknown = data;
    if (typeof data !== "string") {
      violations.push(new SchemaViolationError("client sent a binary frame", undefined, data));
    } else {
      try {
        frame = JSON.parse(data);
      } catch {
        violations.push(
          new SchemaViolationError("client sent a frame that is not JSON", undefined, data),
        );
      }
      if (frame !== data) {
        const violation = schema.checkClientFrame(frame, (id) => requestsOf(this).get(id));
        if (violation) violations.push(violation);
      }
    }
    frames.push(frame);
    return send.call(this, data);
  };
  Object.defineProperty(proto, "onmessage", {
    ...onmessage,
    set(this: WebSocket, handler: ((event: MessageEvent) => unknown) | null) {
      if (handler === null) return set.call(this, null);
      set.call(this, (event: MessageEvent) => {
        if (typeof event.data === "string") {
          try {
            const message = JSON.parse(event.data);
            if (typeof message?.method === "string" && "id" in message) {
              requestsOf(this).set(message.id, message.method);
            }
          } catch {
            // Not JSON: the broker drops it, and it asks for no answer.
          }
        }
        return handler.call(this, event);
      });
    },
    get(this: WebSocket) {
      return get.call(this);
    },
  });
  return {
    frames,
    violations,
    restore() {
      proto.send = send;
      Object.defineProperty(proto, "onmessage", onmessage);
    },
  };
}

/**
 * Wraps a test registration so each test runs with a {@linkcode tapSentFrames} tap and fails
 * if a frame the broker sent during it breaks codex's schema.
 *
 * @param register `test` from tests/_test.ts.
 * @returns A registration with the same signature.
 */
export function checkingSentFrames(register: Register): Register {
  return (name, options, fn) => {
    const body = typeof options === "function" ? options : fn!;
    const checked: Fn = async () => {
      const tap = tapSentFrames();
      try {
        await body();
      } finally {
        tap.restore();
      }
      if (tap.violations.length > 0) {
        const [first] = tap.violations;
        throw new SchemaViolationError(
          tap.violations.map((v) => v.message).join("\n"),
          first!.method,
          first!.frame,
        );
      }
    };
    if (typeof options === "function") register(name, checked);
    else register(name, options, checked);
  };
}

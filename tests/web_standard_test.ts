/**
 * Proves the core is web-standard: nothing reachable from `mod.ts` (or from the other
 * runtime-neutral entry points in deno.json `exports`) imports a `node:`, `npm:`, `jsr:`, bare
 * or remote module, or references `Deno`, `Bun`, `process`, `Buffer` or `require`. The
 * type-check against tests/_webstd.jsonc (DOM lib only) proves the same from the other side;
 * this test also keeps that file's list of Node builtins complete.
 *
 * @module
 */

import { test } from "./_test.ts";
import assert from "node:assert/strict";
import { existsSync, readFileSync } from "node:fs";
import { builtinModules } from "node:module";
import { dirname, extname, join, relative, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "..");

/**
 * Subpath exports that may use runtime APIs. Keep in sync with `RUNTIME_SPECIFIC_EXPORTS` in
 * tests/_run_all.ts.
 */
const RUNTIME_SPECIFIC_EXPORTS = new Set([
  "./supervisor",
  "./main",
  "./testing",
  "./net_websocket",
]);

/**
 * npm packages the core may import by their bare name, being web-standard themselves: each
 * must be mapped in deno.json `imports` to `npm:<name>@…` (how JSR consumers get it), and
 * the files of its default entry point in node_modules are checked like the core's own.
 */
const WEB_STANDARD_PACKAGES = new Set(["jose"]);

/** Globals that exist only on some runtimes. */
const FORBIDDEN_GLOBALS = new Set([
  "Deno",
  "Bun",
  "process",
  "Buffer",
  "require",
  "__dirname",
  "__filename",
]);

/** Objects through which a global can be reached as a property (`globalThis.process`). */
const GLOBAL_OBJECTS = new Set(["globalThis", "self", "window", "global"]);

/** Keywords after which a `/` starts a regular expression rather than a division. */
const KEYWORDS_BEFORE_EXPRESSION = new Set([
  "return",
  "typeof",
  "instanceof",
  "in",
  "of",
  "new",
  "delete",
  "void",
  "throw",
  "case",
  "do",
  "else",
  "yield",
  "await",
]);

/** A source with comments and literal text blanked out, positions preserved. */
interface Masked {
  /** The source with comments, string/template text and regex bodies replaced by spaces. */
  code: string;
  /** Text of each string literal (and substitution-free template), by its quote's index. */
  strings: Map<number, string>;
  /** Template literals with substitutions, by their backtick's index. */
  dynamicTemplates: Set<number>;
  /** Every comment, with the index it starts at. */
  comments: { index: number; text: string }[];
}

/**
 * Blanks comments, strings, template text and regex literals out of TypeScript source, so
 * that what is left is code: identifiers in JSDoc examples or strings are not references.
 */
function mask(src: string): Masked {
  const out = src.split("");
  const strings = new Map<number, string>();
  const dynamicTemplates = new Set<number>();
  const comments: { index: number; text: string }[] = [];
  const blank = (from: number, to: number) => {
    for (let k = from; k < to; k++) if (out[k] !== "\n") out[k] = " ";
  };
  // Brace depth at each open `${`, innermost last: the `}` at that depth resumes the template.
  const templates: { depth: number; start: number }[] = [];
  let depth = 0;
  let prev = ""; // last significant token: a punctuation character or a word
  let i = 0;

  /** Scans template text from `from` to the closing backtick or the next `${`. */
  const templateText = (from: number, start: number): number => {
    let k = from;
    while (k < src.length) {
      const c = src[k];
      if (c === "\\") k += 2;
      else if (c === "`") {
        blank(from, k);
        if (!dynamicTemplates.has(start)) strings.set(start, src.slice(start + 1, k));
        prev = "literal";
        return k + 1;
      } else if (c === "$" && src[k + 1] === "{") {
        blank(from, k);
        dynamicTemplates.add(start);
        templates.push({ depth, start });
        prev = "(";
        return k + 2;
      } else k++;
    }
    blank(from, src.length);
    return src.length;
  };

  while (i < src.length) {
    const c = src[i]!;
    const next = src[i + 1];
    if (c === "/" && next === "/") {
      const end = src.indexOf("\n", i);
      const e = end === -1 ? src.length : end;
      comments.push({ index: i, text: src.slice(i, e) });
      blank(i, e);
      i = e;
    } else if (c === "/" && next === "*") {
      const end = src.indexOf("*/", i + 2);
      const e = end === -1 ? src.length : end + 2;
      comments.push({ index: i, text: src.slice(i, e) });
      blank(i, e);
      i = e;
    } else if (c === '"' || c === "'") {
      let k = i + 1;
      while (k < src.length && src[k] !== c && src[k] !== "\n") k += src[k] === "\\" ? 2 : 1;
      strings.set(i, src.slice(i + 1, k));
      blank(i + 1, k);
      i = k + 1;
      prev = "literal";
    } else if (c === "`") {
      i = templateText(i + 1, i);
    } else if (c === "}" && templates.at(-1)?.depth === depth) {
      const { start } = templates.pop()!;
      i = templateText(i + 1, start);
    } else if (c === "/") {
      const regexAllowed = prev === "" || KEYWORDS_BEFORE_EXPRESSION.has(prev) ||
        (prev.length === 1 && "(,=:[!&|?{};+-*%<>~^}".includes(prev));
      const end = regexAllowed ? regexEnd(src, i) : -1;
      if (end === -1) {
        prev = "/";
        i++;
      } else {
        blank(i + 1, end - 1);
        prev = "literal";
        i = end;
      }
    } else if (/\s/.test(c)) {
      i++;
    } else if (/[\w$]/.test(c)) {
      let k = i + 1;
      while (k < src.length && /[\w$]/.test(src[k]!)) k++;
      prev = src.slice(i, k);
      i = k;
    } else {
      if (c === "{") depth++;
      else if (c === "}") depth--;
      prev = c;
      i++;
    }
  }
  return { code: out.join(""), strings, dynamicTemplates, comments };
}

/** Index just past the closing `/` of a regex literal at `start`, or -1 if there is none. */
function regexEnd(src: string, start: number): number {
  let inClass = false;
  for (let k = start + 1; k < src.length; k++) {
    const c = src[k];
    if (c === "\n") return -1;
    if (c === "\\") k++;
    else if (c === "[") inClass = true;
    else if (c === "]") inClass = false;
    else if (c === "/" && !inClass) return k + 1;
  }
  return -1;
}

/** One problem found in one file. */
interface Violation {
  file: string;
  line: number;
  column: number;
  message: string;
}

/** What one file imports and what is wrong with it. */
interface FileReport {
  /** Relative specifiers, to follow. */
  relativeImports: string[];
  /** Bare imports of {@linkcode WEB_STANDARD_PACKAGES}, to follow into node_modules. */
  packages: string[];
  violations: Violation[];
}

function classify(specifier: string): string | undefined {
  if (specifier.startsWith("./") || specifier.startsWith("../")) return undefined;
  if (specifier.startsWith("node:")) return `imports the Node builtin "${specifier}"`;
  if (specifier.startsWith("npm:")) return `imports the npm package "${specifier}"`;
  if (specifier.startsWith("jsr:")) return `imports the JSR package "${specifier}"`;
  if (specifier === "bun" || specifier.startsWith("bun:")) {
    return `imports the Bun module "${specifier}"`;
  }
  if (/^[a-z][a-z0-9+.-]*:/i.test(specifier) || specifier.startsWith("/")) {
    return `imports the non-relative module "${specifier}"`;
  }
  return `imports the bare specifier "${specifier}" (a package or a runtime builtin)`;
}

/**
 * Checks one source file: every import must be relative, and no runtime-specific global may
 * be referenced in code. Comments, strings and JSDoc examples are ignored.
 */
function checkSource(file: string, src: string): FileReport {
  const { code, strings, dynamicTemplates, comments } = mask(src);
  const violations: Violation[] = [];
  const relativeImports: string[] = [];
  const packages: string[] = [];
  const at = (index: number, message: string) => {
    const before = src.slice(0, index).split("\n");
    violations.push({
      file,
      line: before.length,
      column: before.at(-1)!.length + 1,
      message,
    });
  };
  const specifier = (index: number, spec: string) => {
    if (WEB_STANDARD_PACKAGES.has(spec)) {
      packages.push(spec);
      return;
    }
    const problem = classify(spec);
    if (problem) at(index, problem);
    else relativeImports.push(spec);
  };

  // `from "x"` (import and export), `import "x"`, `import("x")`.
  for (const match of code.matchAll(/(?<![\w$.])(?:from|import)\s*(["'])/g)) {
    const quote = match.index + match[0].length - 1;
    specifier(quote, strings.get(quote) ?? "");
  }
  for (const match of code.matchAll(/(?<![\w$.])import\s*\(\s*/g)) {
    const arg = match.index + match[0].length;
    const literal = strings.get(arg);
    if (literal !== undefined && !dynamicTemplates.has(arg)) specifier(arg, literal);
    else at(match.index, "dynamic import() of a computed specifier cannot be checked");
  }
  // Type-only pulls of runtime types: `/// <reference types="node" />`, `@ts-types="npm:…"`.
  for (const { index, text } of comments) {
    const reference = /^\/\/\/\s*<reference\s+(types|lib|path)\s*=\s*["']([^"']*)["']/.exec(text);
    if (reference) {
      const [, kind, value] = reference as unknown as [string, string, string];
      if (kind === "path") specifier(index, value);
      else at(index, `references ${kind} "${value}"`);
    }
    const pragma = /@(?:deno|ts)-types\s*=\s*["']([^"']*)["']/.exec(text);
    if (pragma) specifier(index, pragma[1]!);
  }

  for (const match of code.matchAll(/(?<![\w$])[A-Za-z_$][\w$]*/g)) {
    const name = match[0];
    if (!FORBIDDEN_GLOBALS.has(name)) continue;
    const before = code.slice(0, match.index);
    const after = code.slice(match.index + name.length);
    // `options.process` is a property; `globalThis.process` is the global.
    const owner = /([\w$]+)\s*\??\.\s*$/.exec(before);
    if (owner && !GLOBAL_OBJECTS.has(owner[1]!)) continue;
    if (/\.\s*$/.test(before) && !owner) continue; // `).process`, `].process`
    // `{ process: 1 }`, `interface X { process?: string }` name a key, not the global.
    if (/^\s*\??:(?!:)/.test(after) && /(?:^|[{,;])\s*$/.test(before)) continue;
    at(match.index, `references \`${name}\`, which is not a web-standard global`);
  }
  // `globalThis["process"]`
  for (const [index, value] of strings) {
    if (FORBIDDEN_GLOBALS.has(value) && /\[\s*$/.test(code.slice(0, index))) {
      at(index, `references \`${value}\`, which is not a web-standard global`);
    }
  }
  violations.sort((a, b) => a.line - b.line || a.column - b.column);
  return { relativeImports, packages, violations };
}

/** Parses deno.json or a JSONC config file (comments allowed). */
function readJsonc(path: string): unknown {
  const src = readFileSync(path, "utf8");
  const chars = src.split("");
  for (const { index, text } of mask(src).comments) {
    for (let k = index; k < index + text.length; k++) chars[k] = " ";
  }
  return JSON.parse(chars.join(""));
}

/** The runtime-neutral entry points: deno.json `exports` minus the runtime-specific ones. */
function webStandardEntryPoints(): string[] {
  const config = readJsonc(join(ROOT, "deno.json")) as {
    exports?: string | Record<string, string>;
  };
  const exports = typeof config.exports === "string"
    ? { ".": config.exports }
    : config.exports ?? {};
  const entries = Object.entries(exports)
    .filter(([subpath]) => !RUNTIME_SPECIFIC_EXPORTS.has(subpath))
    .map(([, file]) => file);
  return [...new Set(["./mod.ts", ...entries.map((f) => `./${f.replace(/^\.\//, "")}`)])];
}

/**
 * The file a web-standard package's bare import loads (its `exports["."]` default), or a
 * violation if deno.json does not map it to that npm package.
 */
function packageEntry(name: string, from: string): { path: string } | Violation {
  const config = readJsonc(join(ROOT, "deno.json")) as { imports?: Record<string, string> };
  const mapped = config.imports?.[name];
  if (mapped === undefined || !mapped.startsWith(`npm:${name}@`)) {
    return {
      file: from,
      line: 0,
      column: 0,
      message: `imports "${name}", which deno.json imports does not map to npm:${name}@…`,
    };
  }
  const dir = join(ROOT, "node_modules", name);
  const manifest = JSON.parse(readFileSync(join(dir, "package.json"), "utf8")) as {
    exports?: Record<string, string | { default?: string }>;
  };
  const root = manifest.exports?.["."];
  const entry = typeof root === "string" ? root : root?.default;
  if (entry === undefined) {
    return { file: from, line: 0, column: 0, message: `${name} has no default export` };
  }
  return { path: resolve(dir, entry) };
}

/** Walks the relative-import graph from the entry points and checks every file on it. */
function checkGraph(entryPoints: string[]): { files: string[]; violations: Violation[] } {
  const seen = new Set<string>();
  const violations: Violation[] = [];
  const queue = entryPoints.map((entry) => ({ path: resolve(ROOT, entry), from: "deno.json" }));
  while (queue.length > 0) {
    const { path, from } = queue.shift()!;
    if (seen.has(path)) continue;
    seen.add(path);
    const file = relative(ROOT, path);
    if (!existsSync(path)) {
      violations.push({ file: from, line: 0, column: 0, message: `${file} does not exist` });
      continue;
    }
    // JSON modules and the like are data, not code.
    if (![".ts", ".mts", ".js", ".mjs", ".tsx", ".jsx"].includes(extname(path))) continue;
    const report = checkSource(file, readFileSync(path, "utf8"));
    violations.push(...report.violations);
    for (const spec of report.relativeImports) {
      queue.push({ path: resolve(dirname(path), spec), from: file });
    }
    for (const name of report.packages) {
      const entry = packageEntry(name, file);
      if ("path" in entry) queue.push({ path: entry.path, from: file });
      else violations.push(entry);
    }
  }
  return { files: [...seen].map((p) => relative(ROOT, p)).sort(), violations };
}

function format(violations: Violation[]): string {
  return violations.map((v) => `${v.file}:${v.line}:${v.column}: ${v.message}`).join("\n");
}

test("nothing reachable from the web-standard entry points uses a runtime-specific API", () => {
  const { files, violations } = checkGraph(webStandardEntryPoints());
  assert.ok(files.includes("mod.ts"), "mod.ts was not checked");
  // jose is followed into node_modules: its web API build, not the core's word for it.
  assert.ok(files.some((f) => /node_modules\/jose\/dist\/webapi\//.test(f)), "jose not checked");
  assert.equal(violations.length, 0, `\n${format(violations)}`);
});

test("the checker flags node:, npm:, jsr:, bare and computed imports", () => {
  const src = [
    'import { readFile } from "node:fs";',
    "import type { Server } from 'npm:ws';",
    'export * from "jsr:@std/async";',
    'import "ws";',
    'import { serve } from "bun";',
    'import x from "https://example.com/x.ts";',
    'const m = await import("node:child_process");',
    "const n = await import(`./${name}.ts`);",
    '/// <reference types="node" />',
    'import { ok } from "./ok.ts";',
    'export { fine } from "../fine.ts";',
  ].join("\n");
  const { violations, relativeImports } = checkSource("in-memory.ts", src);
  assert.deepEqual(violations.map((v) => v.line), [1, 2, 3, 4, 5, 6, 7, 8, 9]);
  assert.match(violations[0]!.message, /Node builtin "node:fs"/);
  assert.deepEqual(relativeImports, ["./ok.ts", "../fine.ts"]);
});

test("the checker flags Deno, Bun, process and Buffer in code", () => {
  const src = [
    "const a = Deno.env.get('X');",
    "const b = typeof Bun;",
    "const c = `${process.env.HOME}`;",
    "const d = Buffer.from('x');",
    "const e = globalThis.process;",
    'const f = globalThis["Deno"];',
    String.raw`const re = /["'\/]/g; const g = Deno.pid;`,
    "function h(x = require('y')) {}",
  ].join("\n");
  const { violations } = checkSource("in-memory.ts", src);
  assert.deepEqual(violations.map((v) => `${v.line}:${v.column}`), [
    "1:11",
    "2:18",
    "3:14",
    "4:11",
    "5:22",
    "6:22",
    "7:33",
    "8:16",
  ]);
});

test("the checker ignores those names in comments, JSDoc examples, strings and property keys", () => {
  const src = [
    "/**",
    " * Works on Deno, Bun and Node (process-wide).",
    " * @example",
    " * ```ts",
    " * const conn = await Conn.dial(Deno.env.get('URL')!);",
    " * ```",
    " */",
    "// Buffer is not used here",
    "const s = 'Deno' + \"process\" + `Bun ${1 + 2} Buffer`;",
    "const re = /process|Deno/g;",
    "const ratio = total / count / 2; // Deno",
    "interface Options { process?: string; Buffer: number }",
    "const o = { process: 1, Deno: 2 };",
    "const p = options.process ?? event?.Buffer;",
    "const url = import.meta.url;",
  ].join("\n");
  assert.deepEqual(checkSource("in-memory.ts", src).violations, []);
});

test(
  "tests/_webstd.jsonc maps every Node builtin to a missing module",
  // Bun's builtin list also names its own modules and polyfills ("bun:ffi", "ws", "undici").
  { skip: "Bun" in globalThis },
  () => {
    const config = readJsonc(join(ROOT, "tests", "_webstd.jsonc")) as {
      compilerOptions: { lib: string[]; types: string[] };
      imports: Record<string, string>;
    };
    assert.deepEqual(config.compilerOptions.lib.map((l) => l.toLowerCase()), ["esnext", "dom"]);
    assert.deepEqual(config.compilerOptions.types, []);
    const missing = builtinModules
      .map((name) => name.startsWith("node:") ? name : `node:${name}`)
      .filter((name) => !(name in config.imports));
    assert.deepEqual(missing, []);
    for (const target of Object.values(config.imports)) {
      assert.ok(!existsSync(resolve(ROOT, "tests", target)), `${target} exists`);
    }
  },
);

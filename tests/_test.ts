// One test API on three runtimes. Bun and Node run `node:test` as is. Deno runs `node:test`
// too, but never applies its sanitizers to those tests, so on Deno the same tests are
// registered with Deno.test and the op, resource and exit sanitizers on: a leaked timer,
// socket or server fails the test there.
import * as nodeTest from "node:test";

type Fn = () => void | Promise<void>;

/** Options shared by both registrations. */
export interface TestOptions {
  /** Skip the test. */
  skip?: boolean;
  /** Fail the test after this many ms (Bun and Node; Deno has no per-test timeout). */
  timeout?: number;
}

interface DenoTestApi {
  test:
    & ((definition: {
      name: string;
      fn: Fn;
      ignore?: boolean;
      sanitizeOps: boolean;
      sanitizeResources: boolean;
      sanitizeExit: boolean;
    }) => void)
    & { beforeAll?: (fn: Fn) => void; afterAll?: (fn: Fn) => void };
}

const deno = (globalThis as { Deno?: DenoTestApi }).Deno;

/** Registers a test. */
export function test(name: string, options: TestOptions | Fn, fn?: Fn): void {
  const body = typeof options === "function" ? options : fn!;
  const opts = typeof options === "function" ? {} : options;
  if (deno) {
    deno.test({
      name,
      fn: body,
      ignore: opts.skip ?? false,
      sanitizeOps: true,
      sanitizeResources: true,
      sanitizeExit: true,
    });
  } else {
    nodeTest.test(name, opts, body);
  }
}

/** Runs once before the file's tests. */
export function before(fn: Fn): void {
  if (deno?.test.beforeAll) deno.test.beforeAll(fn);
  else nodeTest.before(fn);
}

/** Runs once after the file's tests. */
export function after(fn: Fn): void {
  if (deno?.test.afterAll) deno.test.afterAll(fn);
  else nodeTest.after(fn);
}

// Records unhandled promise rejections instead of letting them crash the runner, so a test
// can assert there were none: `unhandledrejection` on Deno, `unhandledRejection` on Bun and
// Node.
import process from "node:process";

export interface RejectionWatch {
  /** The reasons of the rejections no handler took. */
  readonly reasons: unknown[];
  /** Stops watching. */
  restore(): void;
}

export function watchUnhandledRejections(): RejectionWatch {
  const reasons: unknown[] = [];
  const deno = (globalThis as { Deno?: unknown }).Deno !== undefined;
  if (deno) {
    const onEvent = (event: Event) => {
      event.preventDefault();
      reasons.push((event as PromiseRejectionEvent).reason);
    };
    globalThis.addEventListener("unhandledrejection", onEvent);
    return {
      reasons,
      restore: () => globalThis.removeEventListener("unhandledrejection", onEvent),
    };
  }
  const onRejection = (reason: unknown) => reasons.push(reason);
  process.on("unhandledRejection", onRejection);
  return { reasons, restore: () => process.off("unhandledRejection", onRejection) };
}

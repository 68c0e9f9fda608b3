// Waiting helpers shared by the tests: poll for the condition you mean instead of sleeping.
import process from "node:process";

/**
 * Polls `check` every few ms until it holds.
 *
 * @param what What is awaited, for the error message.
 * @param check The condition; may be async.
 * @param timeoutMs How long to wait before failing.
 */
export async function waitFor(
  what: string,
  check: () => boolean | Promise<boolean>,
  timeoutMs = 5_000,
  intervalMs = 3,
): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`Timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, intervalMs));
  }
}

/**
 * Resolves with `promise`, or fails after `ms` naming what did not happen.
 *
 * @param promise What is awaited.
 * @param ms How long to wait.
 * @param what What is awaited, for the error message.
 */
export async function within<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  try {
    return await Promise.race([
      promise,
      new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new Error(`Timed out waiting for ${what}`)), ms);
      }),
    ]);
  } finally {
    clearTimeout(timer);
  }
}

/**
 * Whether a process with this pid exists (a zombie counts until it is reaped).
 *
 * @param pid The process id.
 * @returns False once the process is gone.
 */
export function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (error) {
    if ((error as { code?: string }).code === "ESRCH") return false;
    throw error;
  }
}

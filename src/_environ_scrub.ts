/**
 * Erases a variable's value from the environment this process was started with, where
 * Linux keeps showing it in `/proc/<pid>/environ` (and `ps e`) to every process of the same
 * user, however often it is unset: unsetting only drops the pointer to it from `environ`,
 * while the kernel reads the block the process started with, at the addresses fields 50 and
 * 51 of `/proc/self/stat` name (`env_start`, `env_end`). This process may write its own
 * memory through `/proc/self/mem`, so the value's bytes there are overwritten with NULs,
 * once they are found exactly where expected. Linux only; runtime-specific (`node:fs`).
 *
 * @module
 */

import { closeSync, openSync, readFileSync, readSync, writeSync } from "node:fs";

/**
 * Overwrites `NAME=value` in the process's initial environment block with `NAME=` and NULs.
 * Call it after the runtime read the variable (and after deleting it from `process.env`, so
 * that no child inherits it): the bytes are gone for good.
 *
 * @example Remove the secret from /proc/self/environ
 * ```ts ignore
 * const secret = process.env.BROKER_SECRET!;
 * delete process.env.BROKER_SECRET;
 * scrubInitialEnvironment("BROKER_SECRET", secret); // true on Linux
 * ```
 *
 * @param name The variable's name.
 * @param value Its value, as the process started with it.
 * @returns True if the value was found and erased; false where it cannot be (not Linux, no
 * access to `/proc/self/mem`, or the block does not hold exactly `name=value`).
 */
export function scrubInitialEnvironment(name: string, value: string): boolean {
  if (value === "") return true;
  let fd: number | undefined;
  try {
    const stat = readFileSync("/proc/self/stat", "utf8");
    // After the command name (in parentheses, may hold anything) field 3 is at index 0.
    const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    const start = Number(fields[47]);
    const end = Number(fields[48]);
    if (!Number.isSafeInteger(start) || !Number.isSafeInteger(end) || end <= start) return false;
    if (end - start > 16 * 1024 * 1024) return false;
    fd = openSync("/proc/self/mem", "r+");
    const block = new Uint8Array(end - start);
    if (readSync(fd, block, 0, block.length, start) !== block.length) return false;
    const entry = new TextEncoder().encode(`${name}=${value}`);
    const at = findEntry(block, entry);
    if (at === -1) return false;
    const offset = at + name.length + 1;
    const zeros = new Uint8Array(entry.length - name.length - 1);
    if (writeSync(fd, zeros, 0, zeros.length, start + offset) !== zeros.length) return false;
    // Read back: a kernel that ignored the write must not be reported as a success.
    const check = new Uint8Array(zeros.length);
    readSync(fd, check, 0, check.length, start + offset);
    return check.every((byte) => byte === 0);
  } catch {
    return false;
  } finally {
    if (fd !== undefined) closeSync(fd);
  }
}

/** Where `entry` sits in `block` as a whole NUL-terminated entry, or -1. */
function findEntry(block: Uint8Array, entry: Uint8Array): number {
  outer: for (let i = 0; i + entry.length <= block.length; i++) {
    if (i > 0 && block[i - 1] !== 0) continue;
    for (let j = 0; j < entry.length; j++) {
      if (block[i + j] !== entry[j]) continue outer;
    }
    const after = i + entry.length;
    if (after === block.length || block[after] === 0) return i;
  }
  return -1;
}

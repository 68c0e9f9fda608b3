/**
 * Workspace leases as files on a shared volume (NFS, EFS, a Kubernetes RWX volume, or a
 * local directory when every broker runs on one machine). Runtime-specific: it uses
 * `node:fs`, which Deno, Bun and Node all provide.
 *
 * Each workspace's lease directory holds one file per generation, `<generation>.json`
 * (16 digits). The newest generation is the lease; older ones are history and are deleted
 * by the broker that wrote a newer one. The only operations relied on for exclusion are
 * `link()` of a fully written temporary file to a name that must not exist yet (exactly one
 * of any number of racing brokers succeeds; the rest get `EEXIST`) and `rename()` over an
 * existing file (readers see the old or the new record, never a torn one). Both are atomic
 * on local file systems and on NFSv3/v4 servers (the classic NFS lock-file technique), and
 * so on EFS and on the usual RWX volumes. Expiry compares epoch milliseconds, so the
 * brokers' clocks must agree to well within the TTL (NTP does).
 *
 * @example Take, renew and release a lease
 * ```ts ignore
 * const store = createFileLeaseStore({ dir: (id) => `/srv/workspaces/${id}/lease` });
 * const holder = { id: "broker-a", url: "http://10.0.0.5:8787" };
 * const result = await store.acquire("ws-1", holder);
 * if (result.acquired) {
 *   const renewed = await store.renew(result.lease);
 *   if (renewed) await store.release(renewed);
 * }
 * ```
 *
 * @module
 */

import { link, mkdir, readdir, readFile, rename, unlink, writeFile } from "node:fs/promises";
import { join } from "node:path";
import type { AcquireResult, LeaseHolder, LeaseRecord, LeaseStore } from "./lease.ts";

export type { AcquireResult, LeaseHolder, LeaseRecord, LeaseStore } from "./lease.ts";

/** Options for {@linkcode createFileLeaseStore}. */
export interface FileLeaseStoreOptions {
  /** The directory of a workspace's lease files, created on demand. */
  dir: (workspaceId: string) => string;
  /** How long a lease lasts after it was taken or renewed. Defaults to 15 s. */
  ttlMs?: number;
  /** The clock, epoch ms. Defaults to `Date.now`. */
  now?: () => number;
}

/** A file name of one generation: fixed width, so names sort like numbers. */
const GENERATION_FILE = /^(\d{16})\.json$/;
const DEFAULT_TTL_MS = 15_000;
// Contention only makes a broker lose a race; after this many lost races in one call the
// lease is reported as held by whoever won the last one.
const MAX_ATTEMPTS = 16;

/**
 * Creates a {@linkcode LeaseStore} over lease files (see the module doc for the layout and
 * the file systems it is safe on). A lease held by the same broker id but another process
 * (a broker that crashed and came back under the same id) counts as free for that id.
 *
 * @example One lease directory inside each workspace
 * ```ts ignore
 * const store = createFileLeaseStore({ dir: (id) => `/srv/workspaces/${id}/lease`, ttlMs: 15_000 });
 * ```
 *
 * @param options Where each workspace's lease files live, the TTL and the clock.
 * @returns The store.
 * @throws {RangeError} If `ttlMs` is not a positive number.
 */
export function createFileLeaseStore(options: FileLeaseStoreOptions): LeaseStore {
  const ttlMs = options.ttlMs ?? DEFAULT_TTL_MS;
  if (!(ttlMs > 0) || !Number.isFinite(ttlMs)) {
    throw new RangeError(`Invalid ttlMs: expected a positive number of milliseconds, got ${ttlMs}`);
  }
  return new FileLeaseStore(options.dir, ttlMs, options.now ?? Date.now);
}

class FileLeaseStore implements LeaseStore {
  readonly ttlMs: number;
  #dir: (workspaceId: string) => string;
  #now: () => number;
  #instance = crypto.randomUUID();

  constructor(dir: (workspaceId: string) => string, ttlMs: number, now: () => number) {
    this.#dir = dir;
    this.ttlMs = ttlMs;
    this.#now = now;
  }

  async acquire(workspaceId: string, holder: LeaseHolder): Promise<AcquireResult> {
    const dir = this.#dir(workspaceId);
    await mkdir(dir, { recursive: true });
    let current: LeaseRecord | null = null;
    for (let attempt = 0; attempt < MAX_ATTEMPTS; attempt++) {
      const top = await newestGeneration(dir);
      current = top === null ? null : await readRecord(dir, top);
      if (top !== null && current === null) continue; // replaced under us: look again
      if (current && current.expiresAt > this.#now()) {
        if (current.instance === this.#instance) {
          const renewed = await this.renew(current);
          if (renewed) return { acquired: true, lease: renewed };
          continue;
        }
        if (current.owner !== holder.id) return { acquired: false, current };
        // Our own id from another process: a predecessor that crashed. Take it over.
      }
      const lease: LeaseRecord = {
        workspaceId,
        owner: holder.id,
        url: holder.url,
        instance: this.#instance,
        generation: (top ?? 0) + 1,
        expiresAt: this.#now() + this.ttlMs,
      };
      if (!await this.#create(dir, lease)) continue;
      await deleteOlder(dir, lease.generation);
      return { acquired: true, lease };
    }
    if (current) return { acquired: false, current };
    throw new Error(`Cannot acquire lease of workspace ${workspaceId}: too much contention`);
  }

  async renew(lease: LeaseRecord): Promise<LeaseRecord | null> {
    if (lease.instance !== this.#instance || lease.expiresAt <= this.#now()) return null;
    const dir = this.#dir(lease.workspaceId);
    if (await newestGeneration(dir) !== lease.generation) return null;
    const stored = await readRecord(dir, lease.generation);
    if (!stored || stored.instance !== this.#instance || stored.expiresAt === 0) return null;
    const renewed: LeaseRecord = { ...stored, expiresAt: this.#now() + this.ttlMs };
    await this.#replace(dir, renewed);
    // A broker that read the old record as expired just before the rename may have taken
    // the next generation: then the lease is lost after all.
    if (await newestGeneration(dir) !== lease.generation) return null;
    return renewed;
  }

  async release(lease: LeaseRecord): Promise<void> {
    if (lease.instance !== this.#instance) return;
    const dir = this.#dir(lease.workspaceId);
    if (await newestGeneration(dir) !== lease.generation) return;
    const stored = await readRecord(dir, lease.generation);
    if (!stored || stored.instance !== this.#instance) return;
    await this.#replace(dir, { ...stored, expiresAt: 0 });
  }

  async read(workspaceId: string): Promise<LeaseRecord | null> {
    const dir = this.#dir(workspaceId);
    for (let attempt = 0; attempt < MAX_ATTEMPTS; attempt++) {
      const top = await newestGeneration(dir);
      if (top === null) return null;
      const record = await readRecord(dir, top);
      if (record) return record;
    }
    return null;
  }

  /** Writes the record under its generation's name unless that name exists. */
  async #create(dir: string, lease: LeaseRecord): Promise<boolean> {
    const temp = await this.#writeTemp(dir, lease);
    try {
      await link(temp, join(dir, fileName(lease.generation)));
      return true;
    } catch (error) {
      if ((error as { code?: string }).code === "EEXIST") return false;
      throw error;
    } finally {
      await unlink(temp).catch(() => {});
    }
  }

  /** Replaces the record of a generation this store holds, atomically for readers. */
  async #replace(dir: string, lease: LeaseRecord): Promise<void> {
    const temp = await this.#writeTemp(dir, lease);
    try {
      await rename(temp, join(dir, fileName(lease.generation)));
    } catch (error) {
      await unlink(temp).catch(() => {});
      throw error;
    }
  }

  async #writeTemp(dir: string, lease: LeaseRecord): Promise<string> {
    const temp = join(dir, `.tmp-${this.#instance}-${crypto.randomUUID()}`);
    await writeFile(temp, JSON.stringify(lease), { flag: "wx" });
    return temp;
  }
}

function fileName(generation: number): string {
  return `${String(generation).padStart(16, "0")}.json`;
}

async function newestGeneration(dir: string): Promise<number | null> {
  let names: string[];
  try {
    names = await readdir(dir);
  } catch (error) {
    if ((error as { code?: string }).code === "ENOENT") return null;
    throw error;
  }
  let newest: number | null = null;
  for (const name of names) {
    const match = GENERATION_FILE.exec(name);
    if (!match) continue;
    const generation = Number(match[1]);
    if (newest === null || generation > newest) newest = generation;
  }
  return newest;
}

/** Reads one generation; `null` if it is gone (a newer holder deleted it). */
async function readRecord(dir: string, generation: number): Promise<LeaseRecord | null> {
  let text: string;
  try {
    text = await readFile(join(dir, fileName(generation)), "utf8");
  } catch (error) {
    if ((error as { code?: string }).code === "ENOENT") return null;
    throw error;
  }
  const record = JSON.parse(text) as Partial<LeaseRecord>;
  if (
    typeof record.owner !== "string" || typeof record.url !== "string" ||
    typeof record.instance !== "string" || typeof record.expiresAt !== "number" ||
    typeof record.workspaceId !== "string" || record.generation !== generation
  ) {
    throw new Error(`Cannot read lease ${join(dir, fileName(generation))}: not a lease record`);
  }
  return record as LeaseRecord;
}

async function deleteOlder(dir: string, generation: number): Promise<void> {
  const names = await readdir(dir).catch(() => [] as string[]);
  await Promise.all(names.map((name) => {
    const match = GENERATION_FILE.exec(name);
    if (!match || Number(match[1]) >= generation) return undefined;
    // Best effort: history only; a broker that still reads it sees a newer one next time.
    return unlink(join(dir, name)).catch(() => {});
  }));
}

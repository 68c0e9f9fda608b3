/**
 * The contract for one owner per workspace: a broker holds a workspace's lease for as long
 * as it runs that workspace's codex, renews it, and releases it when it lets go. A lease
 * whose owner died expires, and the next broker takes it over. Web-standard: it is types
 * only, so the REST layer can route by owner without touching a file system.
 *
 * @module
 */

/** Who holds, or wants, a lease. */
export interface LeaseHolder {
  /** The broker's id (`--broker-id`), shown to clients as `X-Broker-Id`. */
  readonly id: string;
  /** Where the other brokers reach this one (`--advertise-url`), e.g. `http://10.0.0.5:8787`. */
  readonly url: string;
}

/** A workspace's lease as stored: who holds it and until when. */
export interface LeaseRecord {
  /** The workspace. */
  readonly workspaceId: string;
  /** The holder's broker id. */
  readonly owner: string;
  /** The holder's advertised URL. */
  readonly url: string;
  /**
   * Tells one process of the holder from another with the same broker id (a restart): a
   * random value per lease store.
   */
  readonly instance: string;
  /** Grows by one with every new holder; a record with a lower one is history. */
  readonly generation: number;
  /** Epoch ms after which the lease is free to take; 0 once released. */
  readonly expiresAt: number;
}

/** The outcome of {@linkcode LeaseStore.acquire}. */
export type AcquireResult =
  | { readonly acquired: true; readonly lease: LeaseRecord }
  | { readonly acquired: false; readonly current: LeaseRecord };

/**
 * Stores workspace leases where every broker sees them (a shared volume, a database). An
 * implementation must make {@linkcode LeaseStore.acquire} atomic: of any number of
 * brokers racing for a free or expired lease, exactly one wins.
 */
export interface LeaseStore {
  /** How long a lease lasts after it was taken or last renewed, in ms. */
  readonly ttlMs: number;
  /**
   * Takes the workspace's lease for `holder` when it is free, released or expired. A lease
   * this store (the same process) already holds is renewed and returned.
   *
   * @param workspaceId The workspace.
   * @param holder Who takes it.
   * @returns `{ acquired: true, lease }`, or `{ acquired: false, current }` with the live
   * lease of another holder.
   */
  acquire(workspaceId: string, holder: LeaseHolder): Promise<AcquireResult>;
  /**
   * Extends a lease this store holds by `ttlMs` from now.
   *
   * @param lease The lease, as last returned by `acquire` or `renew`.
   * @returns The renewed lease, or `null` if it was lost (expired before the renewal, or
   * taken over): the holder must stop using the workspace at once.
   */
  renew(lease: LeaseRecord): Promise<LeaseRecord | null>;
  /**
   * Gives a lease up, so the next broker can take it at once. Does nothing if it was lost.
   *
   * @param lease The lease.
   */
  release(lease: LeaseRecord): Promise<void>;
  /**
   * Reads the workspace's current lease, live or not.
   *
   * @param workspaceId The workspace.
   * @returns The newest record, or `null` if the workspace never had one.
   */
  read(workspaceId: string): Promise<LeaseRecord | null>;
}

/**
 * Tells whether a lease is still held at `now`.
 *
 * @example Route by a lease
 * ```ts ignore
 * const current = await store.read("ws-1");
 * if (current && isLive(current, Date.now())) console.log("owned by", current.owner);
 * ```
 *
 * @param lease The record.
 * @param now Epoch ms.
 * @returns `true` while the lease has not expired or been released.
 */
export function isLive(lease: LeaseRecord, now: number): boolean {
  return lease.expiresAt > now;
}

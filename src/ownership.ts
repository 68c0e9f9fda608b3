/**
 * One owner per workspace across brokers: {@linkcode Ownership} takes a workspace's lease
 * before this broker runs its codex, renews every lease it holds, lets go of them, and
 * says who owns a workspace it does not. Web-standard: it needs only a
 * {@linkcode LeaseStore} and timers.
 *
 * @module
 */

import type { LeaseHolder, LeaseRecord, LeaseStore } from "./lease.ts";
import { timerDelay } from "./_timer.ts";

export type { LeaseHolder, LeaseRecord, LeaseStore } from "./lease.ts";

/** Options for {@linkcode Ownership}. */
export interface OwnershipOptions {
  /** Where the leases live. */
  store: LeaseStore;
  /** This broker. */
  holder: LeaseHolder;
  /**
   * Called when a lease is lost (it could not be renewed before it expired, or another
   * broker took it): the workspace must be stopped at once, since another broker may start
   * it. Not called for a lease given up with {@linkcode Ownership.release}.
   */
  onLost?: (workspaceId: string) => void;
  /** How often held leases are renewed. Defaults to a third of the store's TTL. */
  renewIntervalMs?: number;
  /**
   * After this many turns in a row that reached this broker only through another one (the
   * load balancer routes the workspace elsewhere now), the workspace is handed over between
   * turns. Defaults to 2.
   */
  handOverAfter?: number;
  /**
   * Called when a workspace should be handed over: the caller stops it if it is idle (its
   * release ends with {@linkcode Ownership.release}) and resolves `true`, or resolves
   * `false` to keep it. Meanwhile {@linkcode Ownership.handingOver} is true for it.
   */
  onHandOver?: (workspaceId: string) => Promise<boolean>;
}

/** The answer of {@linkcode Ownership.claim}. */
export type Claim =
  | { readonly local: true }
  | { readonly local: false; readonly owner: LeaseRecord };

/**
 * The leases this broker holds. `claim` takes a free or expired lease (concurrent claims
 * of one workspace share one attempt), a timer renews every held lease, and `release`
 * gives one up once the workspace's codex has stopped.
 *
 * @example Claim before starting a workspace
 * ```ts ignore
 * const ownership = new Ownership({ store, holder: { id: "b1", url: "http://10.0.0.5:8787" } });
 * const claim = await ownership.claim("ws-1");
 * if (claim.local) {
 *   // start codex for ws-1 …
 * } else {
 *   console.log("forward to", claim.owner.url);
 * }
 * await ownership.close();
 * ```
 */
export class Ownership {
  #store: LeaseStore;
  #holder: LeaseHolder;
  #onLost: ((workspaceId: string) => void) | undefined;
  #onHandOver: ((workspaceId: string) => Promise<boolean>) | undefined;
  #handingOver = new Set<string>();
  #renewIntervalMs: number;
  #handOverAfter: number;
  #held = new Map<string, LeaseRecord>();
  #claiming = new Map<string, Promise<Claim>>();
  #releasing = new Map<string, Promise<void>>();
  #forwardedInARow = new Map<string, number>();
  /** Workspaces whose codex is starting or running here: how many starts are not stopped. */
  #attached = new Map<string, number>();
  #timer: ReturnType<typeof setInterval> | undefined;
  #renewing: Promise<void> | undefined;
  #closed = false;
  #draining = false;

  /**
   * Creates the registry; nothing is read or written until the first claim.
   *
   * @param options The store, this broker, the lost-lease hook, intervals.
   * @throws {RangeError} If an interval or `handOverAfter` is not positive.
   */
  constructor(options: OwnershipOptions) {
    this.#store = options.store;
    this.#holder = options.holder;
    this.#onLost = options.onLost;
    this.#onHandOver = options.onHandOver;
    this.#renewIntervalMs = options.renewIntervalMs ?? options.store.ttlMs / 3;
    this.#handOverAfter = options.handOverAfter ?? 2;
    if (!(this.#renewIntervalMs > 0) || this.#renewIntervalMs >= options.store.ttlMs) {
      throw new RangeError(
        `Invalid renewIntervalMs: expected a positive number below the TTL ${options.store.ttlMs}`,
      );
    }
    if (!Number.isInteger(this.#handOverAfter) || this.#handOverAfter < 1) {
      throw new RangeError(`Invalid handOverAfter: expected a positive integer`);
    }
  }

  /** This broker, as written into its leases. */
  get holder(): LeaseHolder {
    return this.#holder;
  }

  /** The workspaces whose lease this broker holds. */
  get held(): string[] {
    return [...this.#held.keys()];
  }

  /**
   * Tells whether this broker holds the workspace's lease now.
   *
   * @param workspaceId The workspace.
   * @returns `true` while the lease is held.
   */
  owns(workspaceId: string): boolean {
    return this.#held.has(workspaceId);
  }

  /**
   * Makes sure this broker holds the workspace's lease, taking it when it is free, released
   * or expired; waits for a release of it under way first.
   *
   * @example Route a request
   * ```ts ignore
   * const claim = await ownership.claim("ws-1");
   * const where = claim.local ? "here" : claim.owner.url;
   * ```
   *
   * @param workspaceId The workspace.
   * @returns `{ local: true }`, or the live lease of the broker that owns it.
   * @throws {Error} If the ownership registry is closed, or the store fails.
   */
  async claim(workspaceId: string): Promise<Claim> {
    for (;;) {
      if (this.#closed) {
        throw new Error(`Cannot claim workspace ${workspaceId}: the broker is shutting down`);
      }
      if (this.#held.has(workspaceId)) return { local: true };
      if (this.#draining) {
        throw new Error(`Cannot claim workspace ${workspaceId}: the broker is draining`);
      }
      const releasing = this.#releasing.get(workspaceId);
      if (releasing) {
        await releasing.catch(() => {});
        continue;
      }
      let claiming = this.#claiming.get(workspaceId);
      if (!claiming) {
        claiming = this.#acquire(workspaceId).finally(() => this.#claiming.delete(workspaceId));
        this.#claiming.set(workspaceId, claiming);
      }
      return await claiming;
    }
  }

  /**
   * Gives the workspace's lease up, after its codex has stopped. Idempotent.
   *
   * @example Let go of a reaped workspace
   * ```ts ignore
   * await resolver.release("ws-1");
   * await ownership.release("ws-1");
   * ```
   *
   * @param workspaceId The workspace.
   * @returns Once the lease is released.
   */
  async release(workspaceId: string): Promise<void> {
    const claiming = this.#claiming.get(workspaceId);
    if (claiming) await claiming.catch(() => {});
    const lease = this.#held.get(workspaceId);
    this.#forwardedInARow.delete(workspaceId);
    this.#handingOver.delete(workspaceId);
    if (!lease) {
      await this.#releasing.get(workspaceId);
      return;
    }
    this.#held.delete(workspaceId);
    this.#stopIfIdle();
    const releasing = this.#store.release(lease).finally(() => {
      if (this.#releasing.get(workspaceId) === releasing) this.#releasing.delete(workspaceId);
    });
    this.#releasing.set(workspaceId, releasing);
    await releasing;
  }

  /**
   * Records that a codex is being started, or runs, for the workspace here, until
   * {@linkcode Ownership.detach}: {@linkcode Ownership.releaseUnused} leaves its lease alone.
   * The resolver that starts codex under the lease calls it before it claims.
   *
   * @example Around a codex's life
   * ```ts ignore
   * ownership.attach("ws-1");
   * await ownership.claim("ws-1"); // then start codex …
   * // … and once it stopped:
   * ownership.detach("ws-1");
   * await ownership.release("ws-1");
   * ```
   *
   * @param workspaceId The workspace.
   */
  attach(workspaceId: string): void {
    this.#attached.set(workspaceId, (this.#attached.get(workspaceId) ?? 0) + 1);
  }

  /**
   * Undoes one {@linkcode Ownership.attach}: that codex did not start, or has stopped.
   *
   * @example After codex stopped
   * ```ts ignore
   * ownership.detach("ws-1");
   * ```
   *
   * @param workspaceId The workspace.
   */
  detach(workspaceId: string): void {
    const count = (this.#attached.get(workspaceId) ?? 0) - 1;
    if (count > 0) this.#attached.set(workspaceId, count);
    else this.#attached.delete(workspaceId);
  }

  /**
   * Gives the workspace's lease up if this broker holds it while no codex is starting or
   * running for it: a request took the lease, and its codex never started (the pool was full,
   * the client left first). Kept, such a lease would be renewed for ever and bind the
   * workspace to this broker, with nothing to reap it.
   *
   * @example After a turn that ran here
   * ```ts ignore
   * await ownership.releaseUnused("ws-1");
   * ```
   *
   * @param workspaceId The workspace.
   * @returns Once the lease is released, or at once if it is kept.
   */
  async releaseUnused(workspaceId: string): Promise<void> {
    if (!this.#held.has(workspaceId) || this.#attached.has(workspaceId)) return;
    await this.release(workspaceId);
  }

  /**
   * Records that this broker ran a turn of the workspace, and whether it came through
   * another broker. After `handOverAfter` forwarded turns in a row, `onHandOver` is called.
   *
   * @example After a turn
   * ```ts ignore
   * ownership.turnServed("ws-1", request.headers.has("x-codex-broker-forwarded"));
   * ```
   *
   * @param workspaceId The workspace.
   * @param forwarded Whether the turn was forwarded by another broker.
   */
  turnServed(workspaceId: string, forwarded: boolean): void {
    if (!this.#held.has(workspaceId)) return;
    if (!forwarded) {
      this.#forwardedInARow.delete(workspaceId);
      return;
    }
    const count = (this.#forwardedInARow.get(workspaceId) ?? 0) + 1;
    if (count < this.#handOverAfter) {
      this.#forwardedInARow.set(workspaceId, count);
      return;
    }
    this.#forwardedInARow.delete(workspaceId);
    const handOver = this.#onHandOver;
    if (!handOver || this.#handingOver.has(workspaceId)) return;
    this.#handingOver.add(workspaceId);
    const done = (released: boolean) => {
      if (!released) this.#handingOver.delete(workspaceId);
    };
    handOver(workspaceId).then(done, () => done(false));
  }

  /**
   * Tells whether the workspace is being handed over: a request forwarded by another broker
   * should then go back to it, which takes the workspace once it is released.
   *
   * @param workspaceId The workspace.
   * @returns `true` from the hand-over's start until its lease is released or it is kept.
   */
  handingOver(workspaceId: string): boolean {
    return this.#handingOver.has(workspaceId);
  }

  /**
   * Stops taking workspaces this broker does not hold yet (a broker that is shutting down
   * must not start new ones); held leases are kept and renewed until released.
   *
   * @example Start a graceful shutdown
   * ```ts ignore
   * ownership.drain();
   * ```
   */
  drain(): void {
    this.#draining = true;
  }

  /** True once {@linkcode Ownership.drain} was called. */
  get draining(): boolean {
    return this.#draining;
  }

  /**
   * Releases every held lease and stops renewing. Later claims throw.
   *
   * @example Shut down
   * ```ts ignore
   * await pool.close(); // stops every codex first
   * await ownership.close();
   * ```
   *
   * @returns Once every lease is released.
   */
  async close(): Promise<void> {
    this.#closed = true;
    await Promise.allSettled(this.#claiming.values());
    await this.#renewing;
    await Promise.allSettled([...this.#held.keys()].map((id) => this.release(id)));
    await Promise.allSettled(this.#releasing.values());
    this.#stop();
  }

  async #acquire(workspaceId: string): Promise<Claim> {
    const result = await this.#store.acquire(workspaceId, this.#holder);
    if (!result.acquired) return { local: false, owner: result.current };
    if (this.#closed) {
      await this.#store.release(result.lease);
      throw new Error(`Cannot claim workspace ${workspaceId}: the broker is shutting down`);
    }
    this.#held.set(workspaceId, result.lease);
    this.#start();
    return { local: true };
  }

  #start(): void {
    if (this.#timer !== undefined) return;
    this.#timer = setInterval(() => {
      this.#renewing ??= this.#renewAll().finally(() => (this.#renewing = undefined));
    }, timerDelay(this.#renewIntervalMs));
  }

  #stopIfIdle(): void {
    if (this.#held.size === 0 && this.#claiming.size === 0) this.#stop();
  }

  #stop(): void {
    if (this.#timer !== undefined) clearInterval(this.#timer);
    this.#timer = undefined;
  }

  async #renewAll(): Promise<void> {
    await Promise.all([...this.#held].map(async ([workspaceId, lease]) => {
      let renewed: LeaseRecord | null;
      try {
        renewed = await this.#store.renew(lease);
      } catch {
        // A passing I/O error: the next tick tries again while the lease lasts.
        if (lease.expiresAt > Date.now()) return;
        renewed = null;
      }
      if (this.#held.get(workspaceId) !== lease) return; // released meanwhile
      if (renewed) {
        this.#held.set(workspaceId, renewed);
        return;
      }
      this.#held.delete(workspaceId);
      this.#forwardedInARow.delete(workspaceId);
      this.#handingOver.delete(workspaceId);
      this.#stopIfIdle();
      this.#onLost?.(workspaceId);
    }));
  }
}

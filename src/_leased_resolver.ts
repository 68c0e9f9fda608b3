/**
 * A resolver that runs a workspace only under its lease: it claims the lease before the
 * inner resolver starts the workspace's codex, and gives it up after that codex stopped.
 * Web-standard.
 *
 * @module
 */

import { WorkspaceOwnedError } from "./errors.ts";
import type { Ownership } from "./ownership.ts";
import type { Endpoint, Resolver } from "./resolver.ts";

/**
 * Wraps `inner` so that no codex runs without the workspace's lease.
 *
 * @param inner The resolver that starts and stops codex (the supervisor).
 * @param ownership This broker's leases.
 * @returns The resolver to give the pool.
 */
export function leasedResolver(
  inner: Resolver & { resolve(workspaceId: string, signal: AbortSignal): Promise<Endpoint> },
  ownership: Ownership,
): Resolver {
  return {
    async resolve(workspaceId, signal) {
      // Before the claim: a request that ends meanwhile must not give up the lease (its
      // releaseUnused) while this codex starts under it.
      ownership.attach(workspaceId);
      try {
        const claim = await ownership.claim(workspaceId);
        if (!claim.local) {
          throw new WorkspaceOwnedError(workspaceId, claim.owner.owner, claim.owner.url);
        }
      } catch (error) {
        ownership.detach(workspaceId);
        throw error;
      }
      try {
        return await inner.resolve(workspaceId, signal);
      } catch (error) {
        // No codex runs, so the pool will not release: give the lease up here.
        ownership.detach(workspaceId);
        await ownership.release(workspaceId);
        throw error;
      }
    },
    async release(workspaceId) {
      try {
        await inner.release?.(workspaceId);
      } finally {
        ownership.detach(workspaceId);
        await ownership.release(workspaceId);
      }
    },
    crashed: (workspaceId, withinMs) =>
      inner.crashed?.(workspaceId, withinMs) ?? Promise.resolve(false),
  };
}

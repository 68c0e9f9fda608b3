/**
 * A set that keeps at most `capacity` keys and forgets the least recently used one first.
 * A `Set` iterates in insertion order, so re-inserting a key on use keeps the oldest first.
 */
export class LruSet<K> {
  #keys = new Set<K>();
  readonly capacity: number;

  /**
   * Creates an empty set.
   *
   * @param capacity The most keys kept: a positive integer.
   * @throws {RangeError} If `capacity` is not a positive integer.
   */
  constructor(capacity: number) {
    if (!Number.isSafeInteger(capacity) || capacity <= 0) {
      throw new RangeError(`Invalid capacity: expected a positive integer, got ${capacity}`);
    }
    this.capacity = capacity;
  }

  /** How many keys are kept. */
  get size(): number {
    return this.#keys.size;
  }

  /**
   * Whether the key is kept, without counting as a use.
   *
   * @param key The key.
   * @returns True if kept.
   */
  has(key: K): boolean {
    return this.#keys.has(key);
  }

  /**
   * Marks a kept key as just used.
   *
   * @param key The key.
   * @returns True if the key was kept; false (and nothing changes) otherwise.
   */
  touch(key: K): boolean {
    if (!this.#keys.delete(key)) return false;
    this.#keys.add(key);
    return true;
  }

  /**
   * Adds a key as the most recently used one, forgetting the least recently used key if
   * the set is full.
   *
   * @param key The key.
   */
  add(key: K): void {
    const keys = this.#keys;
    keys.delete(key);
    keys.add(key);
    if (keys.size > this.capacity) keys.delete(keys.values().next().value as K);
  }

  /**
   * Forgets a key.
   *
   * @param key The key.
   * @returns True if the key was kept.
   */
  delete(key: K): boolean {
    return this.#keys.delete(key);
  }
}

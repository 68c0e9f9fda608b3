/**
 * A map for keys that come and go by the thousand per second: the calls waiting for an
 * answer, the running turns, the threads in use. Internal.
 *
 * @module
 */

/**
 * A map from string or number keys, kept in a null-prototype object rather than a `Map`.
 *
 * Why not a `Map`: V8 grows and compacts a `Map` by copying it into a new table, and leaves
 * the old table, entries and all, pointing to the new one (for iterators still on it). Once
 * one of those tables has been promoted to the old generation, every young-generation
 * collection keeps the next table alive through it, and with it the values that table holds,
 * and so on down the chain until a full collection. With a call table that churns once per
 * call, that promoted most of every turn's objects (about 5 KB per turn with an instant
 * codex) and almost tripled each young-generation collection on Node (3.6 ms, 1.3 ms
 * after). An object in dictionary mode reallocates its table without leaving such a chain.
 *
 * Keys are compared as property keys: the number 5 and the string "5" are the same key, so a
 * table holds keys of one type, and a caller that may be handed the other type checks it.
 */
export class KeyTable<K extends string | number, V> {
  #entries: Record<string | number, V> = Object.create(null);
  #size = 0;

  /** How many entries there are. */
  get size(): number {
    return this.#size;
  }

  /**
   * The value under a key.
   *
   * @param key The key.
   * @returns The value, or `undefined` if there is none.
   */
  get(key: K): V | undefined {
    return this.#entries[key];
  }

  /**
   * Whether a key has a value.
   *
   * @param key The key.
   * @returns True if it has.
   */
  has(key: K): boolean {
    return key in this.#entries;
  }

  /**
   * Sets the value under a key.
   *
   * @param key The key.
   * @param value The value.
   */
  set(key: K, value: V): void {
    if (!(key in this.#entries)) this.#size++;
    this.#entries[key] = value;
  }

  /**
   * Removes a key.
   *
   * @param key The key.
   * @returns True if it had a value.
   */
  delete(key: K): boolean {
    if (!(key in this.#entries)) return false;
    delete this.#entries[key];
    this.#size--;
    return true;
  }

  /**
   * The values, in no promised order.
   *
   * @returns A new array of them.
   */
  values(): V[] {
    return Object.values(this.#entries);
  }

  /** Removes every entry. */
  clear(): void {
    this.#entries = Object.create(null);
    this.#size = 0;
  }
}

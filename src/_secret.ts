/**
 * The shared-secret check of the REST handler, in constant time. Web-standard
 * (`crypto.subtle`).
 *
 * @module
 */

/**
 * Makes a checker that compares a given secret with `secret` in constant time: HMACs under a
 * random key, then an XOR fold.
 *
 * @param secret The expected secret.
 * @returns A function that resolves `true` when `given` equals `secret`.
 */
export function secretChecker(secret: string): (given: string) => Promise<boolean> {
  const encoder = new TextEncoder();
  // A per-handler random key makes both digests unpredictable, so comparing them leaks
  // nothing about the secret, and their fixed length hides the secret's length.
  const key = crypto.subtle.generateKey({ name: "HMAC", hash: "SHA-256" }, false, ["sign"]);
  const sign = async (text: string) =>
    new Uint8Array(await crypto.subtle.sign("HMAC", await key as CryptoKey, encoder.encode(text)));
  const expected = sign(secret);
  // Read on every request; this only keeps a failure from being reported as unhandled.
  expected.catch(() => {});
  return async (given) => {
    const [a, b] = await Promise.all([expected, sign(given)]);
    let diff = a.length ^ b.length;
    for (let i = 0; i < a.length; i++) diff |= a[i]! ^ (b[i] ?? 0);
    return diff === 0;
  };
}

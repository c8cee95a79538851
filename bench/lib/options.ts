/** Command-line helpers shared by the benchmarks. */

/** A comma-separated list, every item one of `allowed` (else an error naming `what`). */
export function list<T extends string>(v: string, allowed: readonly T[], what: string): T[] {
  const xs = v.split(',').map((s) => s.trim()).filter(Boolean);
  for (const x of xs) if (!allowed.includes(x as T)) throw new Error(`unknown ${what} '${x}' (one of ${allowed.join(', ')})`);
  return xs as T[];
}

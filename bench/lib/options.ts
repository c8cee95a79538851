/** Command-line helpers shared by the benchmarks. */
import { existsSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import { PACKAGE_ROOT } from '../../src/harness/workload.js';

/** A comma-separated list, every item one of `allowed` (else an error naming `what`). */
export function list<T extends string>(v: string, allowed: readonly T[], what: string): T[] {
  const xs = v.split(',').map((s) => s.trim()).filter(Boolean);
  for (const x of xs) if (!allowed.includes(x as T)) throw new Error(`unknown ${what} '${x}' (one of ${allowed.join(', ')})`);
  return xs as T[];
}

/** The options every benchmark takes (see the USAGE texts). */
export interface CommonOptions {
  quick: boolean;
  /** Undefined: the benchmark's own default. */
  reps?: number;
  sizes: number[];
  out: string;
  dir: string;
  keep: boolean;
  logLevel: number;
  timeoutS?: number;
}

/**
 * Parses the common options plus `lists` (string options the caller interprets, e.g.
 * workloads, variants, links). `--help` prints `usage` and exits. `prefix` names the default
 * JSON file (bench/results/<prefix>-<time>.json).
 */
export function parseBenchArgs<L extends string>(
  argv: string[],
  usage: string,
  prefix: string,
  lists: readonly L[],
): CommonOptions & { lists: Partial<Record<L, string>> } {
  const str = { type: 'string' } as const;
  const { values: v } = parseArgs({
    args: argv,
    options: {
      quick: { type: 'boolean', default: false },
      reps: str,
      sizes: str,
      out: str,
      dir: str,
      keep: { type: 'boolean', default: false },
      'verbose-logs': { type: 'boolean', default: false },
      timeout: str,
      help: { type: 'boolean', short: 'h', default: false },
      ...Object.fromEntries(lists.map((l) => [l, str])),
    },
    strict: true,
  });
  if (v.help) {
    console.log(usage);
    process.exit(0);
  }
  const s = (k: string) => (v as Record<string, string | boolean | undefined>)[k] as string | undefined;
  const quick = !!v.quick;
  const reps = s('reps') ? Number(s('reps')) : quick ? 2 : undefined;
  if (reps !== undefined && (!Number.isInteger(reps) || reps < 1)) throw new Error(`--reps ${s('reps')}: not a positive integer`);
  const sizes = (s('sizes') ?? (quick ? '256' : '256,2048')).split(',').map(Number);
  if (sizes.some((x) => !Number.isInteger(x) || x < 2)) throw new Error(`--sizes ${s('sizes')}: MiB, integers >= 2`);
  const timeoutS = s('timeout') ? Number(s('timeout')) : undefined;
  if (timeoutS !== undefined && !(timeoutS > 0)) throw new Error(`--timeout ${s('timeout')}: seconds`);
  const stamp = new Date().toISOString().replace(/[:.]/g, '-');
  return {
    quick,
    reps,
    sizes,
    out: resolve(s('out') ?? join(PACKAGE_ROOT, 'bench', 'results', `${prefix}-${stamp}.json`)),
    dir: resolve(s('dir') ?? (existsSync('/dev/shm') ? '/dev/shm' : '/tmp')),
    keep: !!v.keep,
    logLevel: v['verbose-logs'] ? 4 : 2,
    timeoutS,
    lists: Object.fromEntries(lists.map((l) => [l, s(l)])) as Partial<Record<L, string>>,
  };
}

/**
 * The serve issue's test 1, timed: one process with 256 MiB of patterned memory plus zero
 * holes, dumped once, restored lazily again and again from the same images — alternately by
 * `criu lazy-pages` and by `lazy-restore serve` — until every byte is verified.
 *
 *   npx tsx bench/test1.ts [--mb 256] [--reps 5]
 *
 * Prints median [min-max] restore->done per daemon and the ratio (one run, side by side).
 */
import { rmSync } from 'node:fs';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { requireCriu } from '../src/harness/criu.js';
import { buildWorkloads } from '../src/harness/workload.js';
import { dumpWorkload, restoreLazily, startCriuDaemon, startOurDaemon } from '../__test__/helpers/lazy.js';
import { scratch } from '../__test__/helpers/scratch.js';

const { values } = parseArgs({ options: { mb: { type: 'string', default: '256' }, reps: { type: 'string', default: '5' } } });
const mb = Number(values.mb);
const reps = Number(values.reps);

await requireCriu();
await buildWorkloads();
const s = scratch('bench-test1');
const d = await dumpWorkload({ mb, holes: true, dir: s.dir });
const times: Record<'criu lazy-pages' | 'lazy-restore', number[]> = { 'criu lazy-pages': [], 'lazy-restore': [] };
try {
  for (let i = 0; i < reps; i++) {
    for (const name of Object.keys(times) as (keyof typeof times)[]) {
      rmSync(d.w.resultFile, { force: true });
      const work = join(s.dir, `work-${i}-${name.replace(/\W/g, '')}`);
      const daemon = name === 'lazy-restore' ? await startOurDaemon(d.imgs, work) : await startCriuDaemon(d.imgs, work, 2);
      const r = await restoreLazily(d, daemon, work);
      if (r.results.length !== 1 || !r.results[0]!.ok) throw new Error(`${name}: restore did not verify: ${JSON.stringify(r.results)}`);
      times[name].push(r.restoreToDoneMs);
    }
  }
} finally {
  s.cleanup();
}
const med = (a: number[]) => [...a].sort((x, y) => x - y)[Math.floor(a.length / 2)]!;
console.log(`test 1 (${mb} MiB + zero holes, verify every word), ${reps} reps each, interleaved:`);
for (const [name, a] of Object.entries(times)) {
  console.log(`  ${name.padEnd(16)} restore->done median ${med(a).toFixed(0)} ms [${Math.min(...a).toFixed(0)}-${Math.max(...a).toFixed(0)}]`);
}
console.log(`  ratio lazy-restore / criu lazy-pages: ${(med(times['lazy-restore']) / med(times['criu lazy-pages'])).toFixed(2)}`);

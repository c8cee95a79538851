/** The README's library example is a real file, quoted verbatim, and it works. */
import test from 'ava';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { requireCriu } from '../src/harness/criu.js';
import { buildWorkloads, PACKAGE_ROOT, readResults } from '../src/harness/workload.js';
import { run } from '../src/harness/process.js';
import { dumpWorkload } from './helpers/lazy.js';
import { scratch } from './helpers/scratch.js';

const EXAMPLE = join(PACKAGE_ROOT, 'examples', 'serve-and-restore.mjs');

test('README quotes examples/serve-and-restore.mjs verbatim', (t) => {
  const readme = readFileSync(join(PACKAGE_ROOT, 'README.md'), 'utf8');
  t.true(readme.includes('```js\n' + readFileSync(EXAMPLE, 'utf8') + '```'));
});

test('the README example serves a real lazy restore', async (t) => {
  await requireCriu();
  await buildWorkloads();
  const s = scratch('readme');
  try {
    const d = await dumpWorkload({ mb: 32, holes: true, dir: s.dir });
    writeFileSync(d.w.triggerFile, '');
    const r = await run(process.execPath, [EXAMPLE, d.imgs], { timeoutMs: 90_000, cwd: PACKAGE_ROOT });
    t.is(r.code, 0, r.stderr);
    t.regex(r.stdout, new RegExp(`pid ${d.w.pid}: \\d+ lazy pages`));
    t.regex(r.stdout, /pages by fault, fault p99 \d+ µs/);
    const results = readResults(d.w.resultFile);
    t.is(results.length, 1);
    t.true(results[0]!.ok);
  } finally {
    s.cleanup();
  }
});

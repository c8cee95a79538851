/**
 * The `lazy-restore` command as a user runs it (node bin/lazy-restore.js, the built package):
 * help, usage errors, inspect --json against crit on a real 3-process dump, bad images.
 */
import test from 'ava';
import { execFileSync } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { run } from '../src/harness/process.js';
import { requireCriu } from '../src/harness/criu.js';
import { buildWorkloads } from '../src/harness/workload.js';
import { CLI, dumpWorkload } from './helpers/lazy.js';
import { scratch } from './helpers/scratch.js';

const cli = (args: string[]) => run(process.execPath, [CLI, ...args], { timeoutMs: 60_000 });

test('--help names every command; serve --help explains the drop-in use, policies and exit status', async (t) => {
  const top = await cli(['--help']);
  t.is(top.code, 0);
  for (const c of ['inspect', 'serve', 'demo', 'probe']) t.regex(top.stdout, new RegExp(`\\b${c}\\b`));
  t.regex(top.stdout, /Exit status/);
  const serve = await cli(['serve', '--help']);
  t.is(serve.code, 0);
  t.regex(serve.stdout, /criu restore -D imgs --lazy-pages/);
  t.regex(serve.stdout, /--status-fd/);
  t.regex(serve.stdout, /Policies:\n\s+default .*\n\s+criu /);
});

test('usage errors exit 2 with a message; an unknown policy is a usage error', async (t) => {
  const r = await cli(['serve', '--bogus']);
  t.is(r.code, 2);
  t.regex(r.stderr, /unknown option '--bogus'/);
  const pol = await cli(['serve', '-D', '/nonexistent', '--policy', 'fastest']);
  t.is(pol.code, 2);
  t.regex(pol.stderr, /fastest.*Allowed choices are default, criu/s);
  const i = await cli(['inspect']);
  t.is(i.code, 2);
  t.regex(i.stderr, /--images-dir/);
});

test('inspect on a missing or corrupt images dir: exit 1, the file and offset in one line', async (t) => {
  const s = scratch('cli-bad');
  try {
    const r = await cli(['inspect', '-D', join(s.dir, 'nope')]);
    t.is(r.code, 1);
    t.regex(r.stderr, /^lazy-restore: bad images: .*inventory\.img/m);
    t.notRegex(r.stderr, /\n\s+at /, 'no stack trace');
    writeFileSync(join(s.dir, 'inventory.img'), Buffer.from([0x16, 0x31, 0x31, 0x58, 0xff, 0, 0, 0]));
    const c = await cli(['inspect', '-D', s.dir]);
    t.is(c.code, 1);
    t.regex(c.stderr, /inventory\.img @ 0x4/);
  } finally {
    s.cleanup();
  }
});

test('inspect --json on a real 3-process tree: per pid, VMA lists and lazy page counts equal crit decode', async (t) => {
  await requireCriu();
  await buildWorkloads();
  const s = scratch('cli-tree');
  try {
    const d = await dumpWorkload({ mb: 16, holes: true, threads: 1, children: 2, dir: s.dir });
    const r = await cli(['inspect', '-D', d.imgs, '--json']);
    t.is(r.code, 0, r.stderr);
    const doc = JSON.parse(r.stdout);
    t.is(doc.schema, 'lazy-restore/inspect@1');
    t.is(doc.processes.length, 3);
    const crit = (f: string) => JSON.parse(execFileSync('crit', ['decode', '-i', join(d.imgs, f)], { maxBuffer: 64 << 20 }).toString());
    for (const p of doc.processes) {
      const mm = crit(`mm-${p.pid}.img`).entries[0];
      t.deepEqual(
        p.vmas.map((v: any) => [BigInt(v.start), BigInt(v.end)]),
        mm.vmas.map((v: any) => [BigInt(v.start), BigInt(v.end)]),
        `pid ${p.pid} VMAs`,
      );
      const lazy = crit(`pagemap-${p.pid}.img`)
        .entries.slice(1)
        .filter((e: any) => (e.flags & 2) !== 0)
        .reduce((n: number, e: any) => n + e.nr_pages, 0);
      t.is(p.totals.lazy.pages, lazy, `pid ${p.pid} lazy pages`);
      t.true(lazy > 0);
    }
    const text = await cli(['inspect', '-D', d.imgs]);
    t.is(text.code, 0);
    for (const p of doc.processes) t.regex(text.stdout, new RegExp(`\\b${p.pid}\\b`));
  } finally {
    s.cleanup();
  }
});

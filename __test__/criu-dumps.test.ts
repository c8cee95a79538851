/**
 * The image reader against real CRIU dumps of the bundled workload: one process, threads, a
 * 3-process tree; plain, lazy (--lazy-pages) and pre-dump + incremental dumps. Bytes read
 * through the reader are compared with the bytes the live process had (/proc/PID/mem), and
 * VMA lists / lazy page counts with what `crit decode` reports for the same images.
 */
import test from 'ava';
import { execFileSync, spawn } from 'node:child_process';
import { readdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { readImages, readPages, pageRuns } from '../src/criu/index.js';
import { PE_LAZY, PE_PARENT, PE_PRESENT, type ImageSet } from '../src/criu/types.js';
import { dump, requireCriu } from '../src/harness/criu.js';
import { buildWorkloads, startWorkload, waitGone, type RunningWorkload } from '../src/harness/workload.js';
import { scratch } from './helpers/scratch.js';
import { bytesAt, snapshotAnonMemory, type MappedRange } from './helpers/procmem.js';

const PAGE = 4096;

test.before(async () => {
  await requireCriu();
  await buildWorkloads();
});

function killTree(w: RunningWorkload): void {
  try {
    process.kill(-w.reaper.pid!, 'SIGKILL');
  } catch {
    /* already gone */
  }
}

function crit(file: string): any {
  return JSON.parse(execFileSync('crit', ['decode', '-i', file], { maxBuffer: 256 << 20 }).toString());
}

/** Snapshots of every process of the tree, keyed by pid. */
function treePids(rootPid: number): number[] {
  const pids = [rootPid];
  for (let i = 0; i < pids.length; i++) {
    for (const t of readdirSync(`/proc/${pids[i]}/task`)) {
      const kids = execFileSync('cat', [`/proc/${pids[i]}/task/${t}/children`]).toString().trim();
      if (kids) pids.push(...kids.split(/\s+/).map(Number));
    }
  }
  return pids;
}

/** Every present/parent page run of every process reads back exactly the live bytes. */
function compareBytes(t: any, set: ImageSet, snaps: Map<number, MappedRange[]>): number {
  let compared = 0;
  for (const proc of set.processes) {
    const snap = snaps.get(proc.pid);
    t.truthy(snap, `no snapshot for pid ${proc.pid}`);
    for (const run of pageRuns(proc)) {
      if (run.location.kind !== 'file') continue;
      const live = bytesAt(snap!, run.start, run.nrPages * PAGE);
      if (!live) continue; // stack/heap/file-private pages: not in our snapshot
      const got = readPages(set, proc.pid, run.start, run.nrPages);
      if (!got.equals(live)) {
        t.fail(`pid ${proc.pid} run 0x${run.start.toString(16)}+${run.nrPages} (flags ${run.flags}) differs from the live process`);
        return compared;
      }
      compared += run.nrPages;
    }
  }
  return compared;
}

/** VMA lists and lazy page counts equal crit's decoding of the same files. */
function compareWithCrit(t: any, set: ImageSet): void {
  const pstree = crit(join(set.dir, 'pstree.img')).entries.map((e: any) => e.pid);
  t.deepEqual(set.processes.map((p) => p.pid), pstree);
  for (const proc of set.processes) {
    const mm = crit(join(set.dir, `mm-${proc.pid}.img`)).entries[0];
    t.deepEqual(
      proc.vmas.map((v) => [v.start, v.end]),
      mm.vmas.map((v: any) => [BigInt(v.start), BigInt(v.end)]),
      `pid ${proc.pid}: VMA list`,
    );
    const pm = crit(join(set.dir, `pagemap-${proc.pid}.img`)).entries.slice(1);
    const lazy = pm.filter((e: any) => String(e.flags ?? '').includes('PE_LAZY')).reduce((n: number, e: any) => n + e.nr_pages, 0);
    t.is(proc.totals.lazyPages, lazy, `pid ${proc.pid}: lazy pages`);
    t.is(proc.pagemap.length, pm.length, `pid ${proc.pid}: pagemap entries`);
  }
}

test('one process with zero holes: bytes, offsets and counts match the live process and crit', async (t) => {
  const s = scratch('one-proc');
  const w = await startWorkload({ mb: 32, holes: true, dir: s.dir });
  try {
    const snaps = new Map([[w.pid, snapshotAnonMemory(w.pid)]]);
    await dump({ pid: w.pid, dir: join(s.dir, 'img') });
    await waitGone(w);
    const set = readImages(join(s.dir, 'img'));
    t.is(set.processes.length, 1);
    const p = set.processes[0]!;
    t.true(p.pagemap.some((e) => e.flags === (PE_PRESENT | PE_LAZY)));
    t.true(p.lazyRanges.length > 0 && p.lazyRanges.every((r) => r.location.kind === 'file'));
    // 1/32 of the 32 MiB region are holes (never touched or read-only zero page).
    t.true(p.totals.zeroPages >= (32 * 256) / 32, `zero pages ${p.totals.zeroPages}`);
    const n = compareBytes(t, set, snaps);
    t.true(n >= 32 * 256 * 0.9, `compared ${n} pages`);
    compareWithCrit(t, set);
  } finally {
    killTree(w);
    s.cleanup();
  }
});

test('a 3-process tree with threads: per-pid VMAs and lazy counts equal crit, bytes equal the live tree', async (t) => {
  const s = scratch('tree');
  const w = await startWorkload({ mb: 16, holes: true, threads: 2, children: 2, dir: s.dir });
  try {
    const pids = treePids(w.pid);
    t.is(pids.length, 3);
    const snaps = new Map(pids.map((p) => [p, snapshotAnonMemory(p)]));
    await dump({ pid: w.pid, dir: join(s.dir, 'img') });
    await waitGone(w);
    const set = readImages(join(s.dir, 'img'));
    t.deepEqual(new Set(set.processes.map((p) => p.pid)), new Set(pids));
    const root = set.processes.find((p) => p.pid === w.pid)!;
    t.is(root.threads.length, 3, 'root has main + 2 threads');
    t.true(set.processes.filter((p) => p.ppid === w.pid).length === 2);
    t.is(new Set(set.processes.map((p) => p.pagesId)).size, 3, 'one pages file per process');
    compareWithCrit(t, set);
    t.true(compareBytes(t, set, snaps) > 16 * 256);
  } finally {
    killTree(w);
    s.cleanup();
  }
});

test('criu dump --lazy-pages: lazy ranges are remote-only, counts equal crit', async (t) => {
  const s = scratch('lazy-dump');
  const w = await startWorkload({ mb: 16, dir: s.dir });
  // The dump-side page server needs bigger pipes than root may make without CAP_SYS_RESOURCE.
  writeFileSync('/proc/sys/fs/pipe-max-size', '4194304');
  const port = 20000 + (process.pid % 20000);
  const img = join(s.dir, 'img');
  const criuDump = spawn(
    'criu',
    ['dump', '-t', String(w.pid), '-D', img, '-o', 'dump.log', '-v4', '--lazy-pages', '--address', '127.0.0.1', '--port', String(port), '--status-fd', '3'],
    { stdio: ['ignore', 'ignore', 'ignore', 'pipe'] },
  );
  try {
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error('lazy dump never listened')), 60_000);
      (criuDump.stdio[3] as NodeJS.ReadableStream).once('data', () => (clearTimeout(timer), resolve()));
      criuDump.once('exit', (c) => (clearTimeout(timer), reject(new Error(`criu dump --lazy-pages exited ${c}`))));
    });
    const set = readImages(img);
    const p = set.processes[0]!;
    t.true(p.lazyRanges.length > 0);
    t.true(p.lazyRanges.every((r) => r.location.kind === 'remote'));
    t.true(p.pagemap.some((e) => e.flags === PE_LAZY));
    t.is(p.totals.lazyRemotePages, p.totals.lazyPages);
    t.true(p.totals.lazyPages >= 16 * 256);
    t.throws(() => readPages(set, p.pid, p.lazyRanges[0]!.start, 1), { message: /remote/i });
    compareWithCrit(t, set);
  } finally {
    criuDump.kill('SIGKILL');
    killTree(w);
    s.cleanup();
  }
});

test('pre-dump + dump --track-mem: PE_PARENT pages resolve through the parent link to the right bytes', async (t) => {
  const s = scratch('predump');
  const w = await startWorkload({ mb: 16, dir: s.dir });
  try {
    await dump({ pid: w.pid, dir: join(s.dir, 'pre'), preDump: true, trackMem: true });
    // Rewrite every 4th page with the same values: soft-dirty, so the final dump writes those
    // pages anew and refers the rest to the pre-dump.
    process.kill(w.pid, 'SIGUSR2');
    const { readFileSync } = await import('node:fs');
    const deadline = Date.now() + 10_000;
    while (!readFileSync(w.logFile, 'utf8').includes('dirtied') && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
    const snaps = new Map([[w.pid, snapshotAnonMemory(w.pid)]]);
    await dump({ pid: w.pid, dir: join(s.dir, 'final'), trackMem: true, prevImagesDir: '../pre' });
    await waitGone(w);
    const set = readImages(join(s.dir, 'final'));
    t.deepEqual(set.parents, [join(s.dir, 'pre')]);
    const p = set.processes[0]!;
    t.true(p.totals.parentPages > 0, 'some pages are in the parent');
    t.true(p.pagemap.some((e) => e.flags & PE_PARENT));
    const runs = pageRuns(p);
    t.true(runs.some((r) => r.flags & PE_PARENT && r.location.kind === 'file' && r.location.dir === join(s.dir, 'pre')));
    t.true(compareBytes(t, set, snaps) >= 16 * 256 * 0.9);
    compareWithCrit(t, set);
  } finally {
    killTree(w);
    s.cleanup();
  }
});

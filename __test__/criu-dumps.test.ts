/**
 * The image reader against real CRIU dumps of the bundled workload: one process, threads, a
 * 3-process tree; plain, lazy (--lazy-pages) and pre-dump + incremental dumps. Bytes read
 * through the reader are compared with the bytes the live process had (/proc/PID/mem), and
 * VMA lists / lazy page counts with what `crit decode` reports for the same images.
 */
import test from 'ava';
import { execFileSync, spawn } from 'node:child_process';
import { mkdirSync, readdirSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { readImages, readPages, pageRuns } from '../src/criu/index.js';
import { PE_LAZY, PE_PARENT, PE_PRESENT, type ImageSet } from '../src/criu/types.js';
import { dump, requireCriu } from '../src/harness/criu.js';
import { buildWorkloads, killWorkload, startWorkload, waitGone, workloadRegions, type RunningWorkload } from '../src/harness/workload.js';
import { scratch } from './helpers/scratch.js';
import { COMMON_MAGIC, MAGIC, encode, entryMessage, frame } from './helpers/image-writer.js';
import { bytesAt, snapshotRanges, type MappedRange } from './helpers/procmem.js';

const PAGE = 4096;

test.before(async () => {
  await requireCriu();
  await buildWorkloads();
});


function crit(file: string): any {
  return JSON.parse(execFileSync('crit', ['decode', '-i', file], { maxBuffer: 256 << 20 }).toString());
}

/**
 * The workload's own regions, read live just before the dump. (Not all anonymous memory: a
 * thread's TLS block changes while it sleeps, so only memory the workload holds still counts.)
 */
function snapshotWorkload(w: RunningWorkload): Map<number, MappedRange[]> {
  return new Map([...workloadRegions(w)].map(([pid, regions]) => [pid, snapshotRanges(pid, regions)]));
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

/**
 * Every page of every present/parent run that lies in the workload's own memory reads back
 * exactly the live bytes. Compared page by page: a run may span two of the workload's
 * regions (adjacent mappings merge into one VMA), so whole-run lookups would skip it.
 */
function compareBytes(t: any, set: ImageSet, snaps: Map<number, MappedRange[]>): number {
  let compared = 0;
  for (const proc of set.processes) {
    const snap = snaps.get(proc.pid);
    t.truthy(snap, `no snapshot for pid ${proc.pid}`);
    for (const run of pageRuns(proc)) {
      if (run.location.kind !== 'file') continue;
      const got = readPages(set, proc.pid, run.start, run.nrPages);
      for (let i = 0; i < run.nrPages; i++) {
        const addr = run.start + BigInt(i * PAGE);
        const live = bytesAt(snap!, addr, PAGE);
        if (!live) continue; // stack/heap/libc pages: not the workload's own memory
        if (!got.subarray(i * PAGE, (i + 1) * PAGE).equals(live)) {
          t.fail(`pid ${proc.pid} page 0x${addr.toString(16)} (run flags ${run.flags}) differs from the live process`);
          return compared;
        }
        compared++;
      }
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
    const isLazy = (f: unknown) => (typeof f === 'number' ? (f & PE_LAZY) !== 0 : String(f ?? '').includes('PE_LAZY'));
    const lazy = pm.filter((e: any) => isLazy(e.flags)).reduce((n: number, e: any) => n + e.nr_pages, 0);
    t.is(proc.totals.lazyPages, lazy, `pid ${proc.pid}: lazy pages`);
    t.is(proc.pagemap.length, pm.length, `pid ${proc.pid}: pagemap entries`);
  }
}

test('one process with zero holes: bytes, offsets and counts match the live process and crit', async (t) => {
  const s = scratch('one-proc');
  const w = await startWorkload({ mb: 32, holes: true, dir: s.dir });
  try {
    const snaps = snapshotWorkload(w);
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
    killWorkload(w);
    s.cleanup();
  }
});

test('a 3-process tree with threads: per-pid VMAs and lazy counts equal crit, bytes equal the live tree', async (t) => {
  const s = scratch('tree');
  const w = await startWorkload({ mb: 16, holes: true, threads: 2, children: 2, dir: s.dir });
  try {
    const pids = treePids(w.pid);
    t.is(pids.length, 3);
    const snaps = snapshotWorkload(w);
    t.is(snaps.size, 3);
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
    killWorkload(w);
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
  mkdirSync(img, { recursive: true });
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
    killWorkload(w);
    s.cleanup();
  }
});

/**
 * Incremental dumps. On this kernel CRIU cannot make PE_PARENT entries: `criu pre-dump` and
 * `--track-mem` need soft-dirty tracking (CONFIG_MEM_SOFT_DIRTY), which it lacks ("Dirty
 * tracking is OFF"; pre-dump aborts with "BUG at criu/mem.c:45"). So the chain is made of two
 * real dumps of the same live process (the first with --leave-running), joined by the
 * `parent -> ../pre` link that --prev-images-dir writes (that option itself fails here without
 * --track-mem: "Can't dump page with parasite"), and the second's pagemap is then
 * rewritten the way `--track-mem` would have written it for unchanged pages: every other
 * PRESENT|LAZY entry becomes PE_PARENT and its bytes leave the pages file. The reader must
 * find those bytes in the parent dump, and crit must agree with the rewritten files.
 */
test('incremental dump: PE_PARENT pages resolve through the real parent link to the bytes the process had', async (t) => {
  const s = scratch('predump');
  const w = await startWorkload({ mb: 16, dir: s.dir });
  try {
    const snaps = snapshotWorkload(w);
    await dump({ pid: w.pid, dir: join(s.dir, 'pre'), leaveRunning: true });
    await dump({ pid: w.pid, dir: join(s.dir, 'final') });
    await waitGone(w);
    const final = join(s.dir, 'final');
    symlinkSync('../pre', join(final, 'parent')); // what --prev-images-dir creates
    const before = readImages(final);
    const p0 = before.processes[0]!;
    // Rewrite final's pagemap + pages file as an incremental dump would be.
    const entries: Buffer[] = [];
    const pages: Buffer[] = [];
    let flipped = 0;
    p0.pagemap.forEach((e, i) => {
      const toParent = e.flags === (PE_PRESENT | PE_LAZY) && i % 2 === 0;
      if (toParent) flipped += e.nrPages;
      else if (e.flags & PE_PRESENT) pages.push(readPages(before, p0.pid, e.vaddr, e.nrPages));
      entries.push(entryMessage({ vaddr: e.vaddr, nrPages: e.nrPages, flags: toParent ? PE_PARENT : e.flags }));
    });
    t.true(flipped > 0);
    const head = encode([{ no: 1, varint: p0.pagesId }]);
    writeFileSync(join(final, `pagemap-${p0.pid}.img`), frame([COMMON_MAGIC, MAGIC.pagemap], [head, ...entries]).buf);
    writeFileSync(join(final, `pages-${p0.pagesId}.img`), Buffer.concat(pages));

    const set = readImages(final);
    t.deepEqual(set.parents, [join(s.dir, 'pre')]);
    const p = set.processes[0]!;
    t.is(p.totals.parentPages, flipped);
    const runs = pageRuns(p);
    t.true(runs.some((r) => r.flags & PE_PARENT && r.location.kind === 'file' && r.location.dir === join(s.dir, 'pre')));
    const n = compareBytes(t, set, snaps);
    t.true(n >= 16 * 256 * 0.9, `compared ${n} pages`);
    compareWithCrit(t, set);
  } finally {
    killWorkload(w);
    s.cleanup();
  }
});

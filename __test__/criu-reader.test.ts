/**
 * The image reader on synthetic image dirs built by helpers/image-writer.ts: offsets by the
 * PE_PRESENT-only rule, page bytes, compat rules (CRIU 4.2 nr_pages, legacy in_parent), packed
 * and unpacked repeated fields, parent chains, lazy ranges at VMA bounds and totals.
 */
import test from 'ava';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { PageReadError, pageRuns, readImages, readPages, vmaCanBeLazy } from '../src/criu/index.js';
import {
  ANON_PRIVATE,
  MAP_ANONYMOUS,
  MAP_GROWSDOWN,
  MAP_HUGETLB,
  MAP_LOCKED,
  MAP_PRIVATE,
  MAP_SHARED,
  PAGE,
  PE_LAZY,
  PE_PARENT,
  PE_PRESENT,
  VMA_AREA_HEAP,
  VMA_AREA_REGULAR,
  VMA_AREA_STACK,
  VMA_AREA_VDSO,
  VMA_AREA_VSYSCALL,
  VMA_AREA_VVAR,
  VMA_ANON_PRIVATE,
  VMA_FILE_PRIVATE,
  pagesBytes,
  writeImageDir,
  type DirSpec,
} from './helpers/image-writer.js';

const P = BigInt(PAGE);
const pg = (n: number): bigint => BigInt(n) * P;

function tempDir(t: { teardown: (fn: () => void) => void }): string {
  const dir = mkdtempSync(join(tmpdir(), 'lr-reader-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

const ANON = 0x10000000n;
const FILE_VMA = { start: 0x400000n, end: 0x402000n, flags: MAP_PRIVATE, status: VMA_AREA_REGULAR | VMA_FILE_PRIVATE, prot: 5, shmid: 1n };

/** One process, a file mapping and a 64-page anon mapping with four kinds of entries. */
function mixedSpec(): DirSpec {
  return {
    processes: [
      {
        pid: 42,
        vmas: [FILE_VMA, { start: ANON, end: ANON + pg(64) }],
        entries: [
          { vaddr: 0x401000n, nrPages: 1, flags: PE_PRESENT }, // file-private page: eager
          { vaddr: ANON, nrPages: 2, flags: PE_PRESENT }, // e.g. the stack-pointer page: eager in a lazy VMA
          { vaddr: ANON + pg(4), nrPages: 3, flags: PE_PRESENT | PE_LAZY },
          { vaddr: ANON + pg(8), nrPages: 4, flags: PE_LAZY }, // remote only
          { vaddr: ANON + pg(16), nrPages: 1, flags: PE_PRESENT | PE_LAZY },
        ],
      },
    ],
  };
}

test('mixed PRESENT, PRESENT|LAZY and LAZY entries: offsets count only PE_PRESENT pages', (t) => {
  const dir = tempDir(t);
  writeImageDir(dir, mixedSpec());
  const set = readImages(dir);
  t.is(set.dir, dir);
  t.deepEqual(set.inventory, { imgVersion: 2, fdinfoPerId: true, dumpCriuRunId: 'test-run-id' });
  t.deepEqual(set.parents, []);
  const p = set.processes[0]!;
  t.is(p.pid, 42);
  t.is(p.pagesId, 1);
  t.deepEqual(
    p.pagemap.map((e) => [e.vaddr, e.nrPages, e.flags, e.fileOffset]),
    [
      [0x401000n, 1, PE_PRESENT, 0n],
      [ANON, 2, PE_PRESENT, 4096n],
      [ANON + pg(4), 3, PE_PRESENT | PE_LAZY, 12288n],
      [ANON + pg(8), 4, PE_LAZY, undefined],
      [ANON + pg(16), 1, PE_PRESENT | PE_LAZY, 24576n], // 1+2+3 pages before it; the LAZY entry adds nothing
    ],
  );
  const pagesFile = join(dir, 'pages-1.img');
  t.deepEqual(
    p.lazyRanges.map((r) => [r.start, r.nrPages, r.vmaIndex, r.location]),
    [
      [ANON + pg(4), 3, 1, { kind: 'file', file: pagesFile, offset: 12288n, dir }],
      [ANON + pg(8), 4, 1, { kind: 'remote' }],
      [ANON + pg(16), 1, 1, { kind: 'file', file: pagesFile, offset: 24576n, dir }],
    ],
  );
  t.deepEqual(p.totals, {
    vmaBytes: pg(2 + 64),
    lazyVmaBytes: pg(64),
    lazyPages: 8,
    lazyLocalPages: 4,
    lazyRemotePages: 4,
    eagerPages: 3,
    parentPages: 0,
    zeroPages: 64 - (2 + 3 + 4 + 1),
  });
});

test('readPages returns the written bytes, zeros for holes, and refuses remote or unmapped pages', (t) => {
  const dir = tempDir(t);
  const w = writeImageDir(dir, mixedSpec());
  const set = readImages(dir);
  const tag = w.tags[42]!;
  t.true(readPages(set, 42, ANON + pg(4), 3).equals(pagesBytes(tag, ANON + pg(4), 3)));
  t.true(readPages(set, 42, ANON + pg(16), 1).equals(pagesBytes(tag, ANON + pg(16), 1)));
  t.true(readPages(set, 42, 0x401000n, 1).equals(pagesBytes(tag, 0x401000n, 1)));
  // Across an eager entry, a hole, a lazy entry, and a hole.
  const span = readPages(set, 42, ANON, 8);
  t.true(
    span.equals(
      Buffer.concat([pagesBytes(tag, ANON, 2), Buffer.alloc(2 * PAGE), pagesBytes(tag, ANON + pg(4), 3), Buffer.alloc(PAGE)]),
    ),
  );
  // Part of an entry only.
  t.true(readPages(set, 42, ANON + pg(5), 1).equals(pagesBytes(tag, ANON + pg(5), 1)));
  // A hole inside a VMA, even in the file mapping, is zero.
  t.true(readPages(set, 42, 0x400000n, 1).equals(Buffer.alloc(PAGE)));
  t.is(readPages(set, 42, ANON, 0).length, 0);

  const remote = t.throws(() => readPages(set, 42, ANON + pg(7), 2), { instanceOf: PageReadError });
  t.is(remote?.code, 'REMOTE_ONLY');
  t.is(remote?.vaddr, ANON + pg(8));
  t.regex(remote!.message, /remote/);
  const unmapped = t.throws(() => readPages(set, 42, ANON + pg(63), 2), { instanceOf: PageReadError });
  t.is(unmapped?.code, 'NOT_MAPPED');
  t.is(unmapped?.vaddr, ANON + pg(64));
  t.is(t.throws(() => readPages(set, 42, ANON + 1n, 1), { instanceOf: PageReadError })?.code, 'BAD_ARGUMENT');
  t.is(t.throws(() => readPages(set, 7, ANON, 1), { instanceOf: PageReadError })?.code, 'UNKNOWN_PID');
});

test('pageRuns: every entry resolved to its location, in address order', (t) => {
  const dir = tempDir(t);
  writeImageDir(dir, mixedSpec());
  const p = readImages(dir).processes[0]!;
  const file = join(dir, 'pages-1.img');
  t.deepEqual(pageRuns(p), [
    { start: 0x401000n, nrPages: 1, flags: PE_PRESENT, location: { kind: 'file', file, offset: 0n, dir } },
    { start: ANON, nrPages: 2, flags: PE_PRESENT, location: { kind: 'file', file, offset: 4096n, dir } },
    { start: ANON + pg(4), nrPages: 3, flags: PE_PRESENT | PE_LAZY, location: { kind: 'file', file, offset: 12288n, dir } },
    { start: ANON + pg(8), nrPages: 4, flags: PE_LAZY, location: { kind: 'remote' } },
    { start: ANON + pg(16), nrPages: 1, flags: PE_PRESENT | PE_LAZY, location: { kind: 'file', file, offset: 24576n, dir } },
  ]);
});

test('CRIU 4.2 entries: nr_pages from field 5 (uint64) when present, field 2 otherwise', (t) => {
  const dir = tempDir(t);
  const w = writeImageDir(dir, {
    processes: [
      {
        pid: 7,
        vmas: [{ start: ANON, end: ANON + pg(400) }],
        entries: [
          { vaddr: ANON, nrPages: 300, flags: PE_PRESENT | PE_LAZY, v42: true }, // field 2 = 0, field 5 = 300
          // Field 2 says 9, field 5 says 2: field 5 wins.
          { vaddr: ANON + pg(300), nrPages: 2, flags: PE_PRESENT | PE_LAZY, v42: true, field2: 9 },
          { vaddr: ANON + pg(310), nrPages: 5, flags: PE_PRESENT | PE_LAZY }, // 4.1 style
        ],
      },
    ],
  });
  const set = readImages(dir);
  const p = set.processes[0]!;
  t.deepEqual(
    p.pagemap.map((e) => [e.nrPages, e.fileOffset]),
    [
      [300, 0n],
      [2, pg(300)],
      [5, pg(302)],
    ],
  );
  t.is(p.totals.lazyPages, 307);
  const tag = w.tags[7]!;
  t.true(
    readPages(set, 7, ANON + pg(299), 16).equals(
      Buffer.concat([pagesBytes(tag, ANON + pg(299), 3), Buffer.alloc(8 * PAGE), pagesBytes(tag, ANON + pg(310), 5)]),
    ),
  );
});

test('legacy entries without flags: in_parent means PE_PARENT, otherwise PE_PRESENT', (t) => {
  const root = tempDir(t);
  const parentTag = 'legacy-parent';
  writeImageDir(join(root, 'pre'), {
    processes: [{ pid: 5, tag: parentTag, vmas: [{ start: ANON, end: ANON + pg(8) }], entries: [{ vaddr: ANON, nrPages: 8, flags: PE_PRESENT }] }],
  });
  const w = writeImageDir(join(root, 'final'), {
    parent: '../pre',
    processes: [
      {
        pid: 5,
        vmas: [{ start: ANON, end: ANON + pg(8) }],
        entries: [
          { vaddr: ANON, nrPages: 2 }, // no flags, no in_parent
          { vaddr: ANON + pg(2), nrPages: 3, inParent: true },
          { vaddr: ANON + pg(5), nrPages: 3, inParent: false },
        ],
      },
    ],
  });
  const set = readImages(join(root, 'final'));
  const p = set.processes[0]!;
  t.deepEqual(
    p.pagemap.map((e) => [e.flags, e.fileOffset]),
    [
      [PE_PRESENT, 0n],
      [PE_PARENT, undefined],
      [PE_PRESENT, pg(2)],
    ],
  );
  t.is(p.totals.parentPages, 3);
  t.is(p.totals.eagerPages, 8);
  t.deepEqual(p.lazyRanges, []);
  const tag = w.tags[5]!;
  t.true(
    readPages(set, 5, ANON, 8).equals(
      Buffer.concat([pagesBytes(tag, ANON, 2), pagesBytes(parentTag, ANON + pg(2), 3), pagesBytes(tag, ANON + pg(5), 3)]),
    ),
  );
});

test('packed and unpacked repeated fields decode the same', (t) => {
  const root = tempDir(t);
  const proc = (packed: boolean) => ({
    pid: 11,
    threads: [11, 12, 300000],
    packedThreads: packed,
    packedAuxv: packed,
    vmas: [{ start: ANON, end: ANON + pg(4) }],
    entries: [{ vaddr: ANON, nrPages: 4, flags: PE_PRESENT | PE_LAZY }],
  });
  writeImageDir(join(root, 'unpacked'), { processes: [proc(false)] });
  writeImageDir(join(root, 'packed'), { processes: [proc(true)] });
  const a = readImages(join(root, 'unpacked')).processes[0]!;
  const b = readImages(join(root, 'packed')).processes[0]!;
  t.deepEqual(a.threads, [11, 12, 300000]);
  t.deepEqual(b.threads, [11, 12, 300000]);
  t.deepEqual(b.vmas, a.vmas);
  t.deepEqual(b.totals, a.totals);
});

test('a two-level parent chain: PE_PARENT runs split across parent entries and resolved recursively', (t) => {
  const root = tempDir(t);
  // Level 2 (oldest): one page elsewhere first, then 6 pages from ANON+1.
  writeImageDir(join(root, 'l2'), {
    processes: [
      {
        pid: 3,
        tag: 'L2',
        vmas: [{ start: 0x20000000n, end: 0x20001000n }, { start: ANON, end: ANON + pg(16) }],
        entries: [
          { vaddr: 0x20000000n, nrPages: 1, flags: PE_PRESENT },
          { vaddr: ANON + pg(1), nrPages: 6, flags: PE_PRESENT | PE_LAZY },
        ],
      },
    ],
  });
  // Level 1: 2 pages here, 3 pages in its parent, then a longer entry than the child needs.
  writeImageDir(join(root, 'l1'), {
    parent: '../l2',
    processes: [
      {
        pid: 3,
        tag: 'L1',
        pagesId: 5,
        vmas: [{ start: ANON, end: ANON + pg(16) }],
        entries: [
          { vaddr: ANON, nrPages: 2, flags: PE_PRESENT | PE_LAZY },
          { vaddr: ANON + pg(2), nrPages: 3, flags: PE_PARENT },
          { vaddr: ANON + pg(5), nrPages: 5, flags: PE_PRESENT },
        ],
      },
    ],
  });
  // Top: 8 pages in the parent chain, then 2 of its own.
  writeImageDir(join(root, 'top'), {
    parent: '../l1',
    processes: [
      {
        pid: 3,
        tag: 'TOP',
        vmas: [{ start: ANON, end: ANON + pg(16) }],
        entries: [
          { vaddr: ANON, nrPages: 8, flags: PE_PARENT },
          { vaddr: ANON + pg(8), nrPages: 2, flags: PE_PRESENT | PE_LAZY },
        ],
      },
    ],
  });
  const set = readImages(join(root, 'top'));
  const l1 = join(root, 'l1');
  const l2 = join(root, 'l2');
  t.deepEqual(set.parents, [l1, l2]);
  const p = set.processes[0]!;
  t.deepEqual(pageRuns(p), [
    { start: ANON, nrPages: 2, flags: PE_PARENT, location: { kind: 'file', file: join(l1, 'pages-5.img'), offset: 0n, dir: l1 } },
    // L2's entry starts one page earlier and follows a 1-page entry: 4096 + 4096.
    { start: ANON + pg(2), nrPages: 3, flags: PE_PARENT, location: { kind: 'file', file: join(l2, 'pages-1.img'), offset: 8192n, dir: l2 } },
    // L1's third entry follows its 2-page first entry (the PE_PARENT one takes no space).
    { start: ANON + pg(5), nrPages: 3, flags: PE_PARENT, location: { kind: 'file', file: join(l1, 'pages-5.img'), offset: 8192n, dir: l1 } },
    { start: ANON + pg(8), nrPages: 2, flags: PE_PRESENT | PE_LAZY, location: { kind: 'file', file: join(set.dir, 'pages-1.img'), offset: 0n, dir: set.dir } },
  ]);
  t.is(p.totals.parentPages, 8);
  t.is(p.totals.eagerPages, 8);
  t.is(p.totals.lazyPages, 2);
  t.true(
    readPages(set, 3, ANON, 10).equals(
      Buffer.concat([pagesBytes('L1', ANON, 2), pagesBytes('L2', ANON + pg(2), 3), pagesBytes('L1', ANON + pg(5), 3), pagesBytes('TOP', ANON + pg(8), 2)]),
    ),
  );
});

test('lazy ranges are cut at VMA bounds and only cover VMAs that can be lazy', (t) => {
  const dir = tempDir(t);
  const A = 0x30000000n;
  writeImageDir(dir, {
    processes: [
      {
        pid: 9,
        vmas: [
          { start: A, end: A + pg(4), status: VMA_AREA_REGULAR | VMA_ANON_PRIVATE | VMA_AREA_HEAP },
          { start: A + pg(4), end: A + pg(8) },
          { start: A + pg(8), end: A + pg(10), flags: MAP_PRIVATE, status: VMA_AREA_REGULAR | VMA_FILE_PRIVATE, shmid: 2n },
          { start: A + pg(10), end: A + pg(14) },
        ],
        entries: [
          { vaddr: A + pg(2), nrPages: 6, flags: PE_PRESENT | PE_LAZY }, // across two lazy VMAs
          { vaddr: A + pg(8), nrPages: 1, flags: PE_PRESENT }, // file VMA, eager
          { vaddr: A + pg(12), nrPages: 2, flags: PE_LAZY }, // remote
        ],
      },
    ],
  });
  const p = readImages(dir).processes[0]!;
  const file = join(dir, 'pages-1.img');
  t.deepEqual(p.lazyRanges, [
    { start: A + pg(2), nrPages: 2, vmaIndex: 0, location: { kind: 'file', file, offset: 0n, dir } },
    { start: A + pg(4), nrPages: 4, vmaIndex: 1, location: { kind: 'file', file, offset: pg(2), dir } },
    { start: A + pg(12), nrPages: 2, vmaIndex: 3, location: { kind: 'remote' } },
  ]);
  // Lazy VMAs: 4 + 4 + 4 pages; dumped in them: 6 + 2.
  t.is(p.totals.zeroPages, 12 - 8);
  t.is(p.totals.lazyVmaBytes, pg(12));
  t.is(p.totals.vmaBytes, pg(14));
});

test('the lazy predicate follows vma_entry_can_be_lazy', (t) => {
  const dir = tempDir(t);
  const B = 0x40000000n;
  const vma = (i: number, flags: number, status: number) => ({ start: B + pg(2 * i), end: B + pg(2 * i + 1), flags, status });
  const cases: Array<[number, number, boolean, string]> = [
    [ANON_PRIVATE, VMA_AREA_REGULAR | VMA_ANON_PRIVATE, true, 'anon private'],
    [ANON_PRIVATE | MAP_GROWSDOWN, VMA_AREA_REGULAR | VMA_ANON_PRIVATE | VMA_AREA_STACK, true, 'stack'],
    [ANON_PRIVATE | MAP_LOCKED, VMA_AREA_REGULAR | VMA_ANON_PRIVATE, false, 'mlocked'],
    [ANON_PRIVATE | MAP_HUGETLB, VMA_AREA_REGULAR | VMA_ANON_PRIVATE, false, 'hugetlb'],
    [MAP_SHARED | MAP_ANONYMOUS, VMA_AREA_REGULAR | (1 << 8), false, 'anon shared'],
    [MAP_PRIVATE, VMA_AREA_REGULAR | VMA_FILE_PRIVATE, false, 'file private'],
    [ANON_PRIVATE, VMA_AREA_REGULAR | VMA_AREA_VDSO, false, 'vdso'],
    [ANON_PRIVATE, VMA_AREA_REGULAR | VMA_AREA_VVAR, false, 'vvar'],
    [ANON_PRIVATE, VMA_AREA_REGULAR | VMA_AREA_VSYSCALL, false, 'vsyscall'],
    // Run-time bits 27-31 are masked off and do not change anything.
    [ANON_PRIVATE, VMA_AREA_REGULAR | VMA_ANON_PRIVATE | (1 << 30), true, 'run-time bit'],
  ];
  writeImageDir(dir, { processes: [{ pid: 1, vmas: cases.map(([f, s], i) => vma(i, f, s)), entries: [] }] });
  const p = readImages(dir).processes[0]!;
  cases.forEach(([flags, status, lazy, name], i) => {
    t.is(p.vmas[i]!.lazy, lazy, name);
    t.is(vmaCanBeLazy(flags, status), lazy, name);
  });
  t.is(p.vmas[9]!.status, VMA_AREA_REGULAR | VMA_ANON_PRIVATE, 'run-time bits masked');
  t.is(p.totals.zeroPages, 3, 'one page in each of the three lazy VMAs, none dumped');
});

test('zero pages: lazy VMA pages in no pagemap entry, in every lazy VMA, none from other VMAs', (t) => {
  const dir = tempDir(t);
  const C = 0x50000000n;
  writeImageDir(dir, {
    processes: [
      {
        pid: 2,
        vmas: [
          { start: C, end: C + pg(10) },
          { start: C + pg(10), end: C + pg(30), flags: MAP_PRIVATE, status: VMA_AREA_REGULAR | VMA_FILE_PRIVATE },
          { start: C + pg(40), end: C + pg(41) },
          { start: C + pg(50), end: C + pg(150) },
        ],
        entries: [
          { vaddr: C + pg(1), nrPages: 3, flags: PE_PRESENT | PE_LAZY },
          { vaddr: C + pg(9), nrPages: 2, flags: PE_PRESENT }, // last anon page + first file page
          { vaddr: C + pg(50), nrPages: 40, flags: PE_LAZY },
          { vaddr: C + pg(149), nrPages: 1, flags: PE_PRESENT | PE_LAZY },
        ],
      },
    ],
  });
  const p = readImages(dir).processes[0]!;
  // Lazy VMAs: 10 + 1 + 100 pages; covered: 3 + 1 (of the 2-page entry) + 40 + 1.
  t.is(p.totals.zeroPages, 111 - 45);
  t.is(p.totals.lazyPages, 44);
  t.is(p.totals.eagerPages, 2);
});

test('a process tree with a zombie: pstree order, per-process pages ids, no memory for the zombie', (t) => {
  const dir = tempDir(t);
  const w = writeImageDir(dir, {
    processes: [
      { pid: 100, threads: [100, 101], vmas: [{ start: ANON, end: ANON + pg(2) }], entries: [{ vaddr: ANON, nrPages: 2, flags: 6 }] },
      { pid: 102, ppid: 100, zombie: true },
      { pid: 103, ppid: 100, pagesId: 9, vmas: [{ start: ANON, end: ANON + pg(2) }], entries: [{ vaddr: ANON, nrPages: 1, flags: 6 }] },
    ],
  });
  const set = readImages(dir);
  t.deepEqual(
    set.processes.map((p) => [p.pid, p.ppid, p.threads, p.zombie === true, p.pagesId]),
    [
      [100, 0, [100, 101], false, 1],
      [102, 100, [102], true, 0],
      [103, 100, [103], false, 9],
    ],
  );
  t.deepEqual(set.processes[1]!.vmas, []);
  t.true(readPages(set, 103, ANON, 2).equals(Buffer.concat([pagesBytes(w.tags[103]!, ANON, 1), Buffer.alloc(PAGE)])));
  t.is(t.throws(() => readPages(set, 102, ANON, 1), { instanceOf: PageReadError })?.code, 'NOT_MAPPED');
});

test('64-bit values: vsyscall above 2^63, madv bitmap, fd as sint64', (t) => {
  const dir = tempDir(t);
  writeImageDir(dir, {
    processes: [
      {
        pid: 1,
        vmas: [
          { start: ANON, end: ANON + pg(1), fd: -1n, madv: 1n << 16n },
          { start: 0xffffffffff600000n, end: 0xffffffffff601000n, prot: 4, status: VMA_AREA_REGULAR | VMA_AREA_VSYSCALL, fd: 12345n },
        ],
        entries: [],
      },
    ],
  });
  const [a, b] = readImages(dir).processes[0]!.vmas;
  t.is(a!.fd, -1n);
  t.is(a!.madv, 65536n);
  t.is(b!.start, 0xffffffffff600000n);
  t.is(b!.fd, 12345n);
  t.false(b!.lazy);
});

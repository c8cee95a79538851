/**
 * The inspect report (JSON schema lazy-restore/inspect@1 and the text summary) on a synthetic
 * images dir with a process tree, a zombie, a parent image set and remote-only lazy pages.
 */
import test, { type ExecutionContext } from 'ava';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { readImages } from '../src/criu/index.js';
import { humanBytes, inspectJson, inspectText, type InspectJson } from '../src/report/inspect.js';
import {
  MAP_PRIVATE,
  PAGE,
  PE_LAZY,
  PE_PARENT,
  PE_PRESENT,
  VMA_AREA_REGULAR,
  VMA_AREA_VSYSCALL,
  VMA_FILE_PRIVATE,
  writeImageDir,
} from './helpers/image-writer.js';

const P = BigInt(PAGE);
const pg = (n: number): bigint => BigInt(n) * P;
const ANON = 0x7f0000000000n;
const TEXT = 0x555555554000n;

/** root 10 → child 11 → grandchild 12, and zombie 13 under root; 11 has a parent image set. */
function build(t: ExecutionContext): { top: string; pre: string } {
  const root = mkdtempSync(join(tmpdir(), 'lr-inspect-'));
  t.teardown(() => rmSync(root, { recursive: true, force: true }));
  const top = join(root, 'final');
  const pre = join(root, 'pre');
  const fileVma = { start: TEXT, end: TEXT + pg(2), prot: 5, flags: MAP_PRIVATE, status: VMA_AREA_REGULAR | VMA_FILE_PRIVATE, shmid: 1n };
  const vsyscall = { start: 0xffffffffff600000n, end: 0xffffffffff601000n, prot: 4, status: VMA_AREA_REGULAR | VMA_AREA_VSYSCALL };
  writeImageDir(pre, {
    processes: [{ pid: 11, ppid: 10, vmas: [{ start: ANON, end: ANON + pg(16) }], entries: [{ vaddr: ANON, nrPages: 16, flags: PE_PRESENT | PE_LAZY }] }],
  });
  writeImageDir(top, {
    parent: '../pre',
    processes: [
      {
        pid: 10,
        threads: [10, 14, 15],
        vmas: [fileVma, { start: ANON, end: ANON + pg(16) }, vsyscall],
        entries: [
          { vaddr: TEXT + P, nrPages: 1, flags: PE_PRESENT },
          { vaddr: ANON, nrPages: 4, flags: PE_PRESENT | PE_LAZY },
          { vaddr: ANON + pg(8), nrPages: 2, flags: PE_LAZY },
        ],
      },
      {
        pid: 11,
        ppid: 10,
        vmas: [{ start: ANON, end: ANON + pg(16) }],
        entries: [
          { vaddr: ANON, nrPages: 6, flags: PE_PARENT },
          { vaddr: ANON + pg(6), nrPages: 2, flags: PE_PRESENT | PE_LAZY },
        ],
      },
      { pid: 12, ppid: 11, vmas: [{ start: ANON, end: ANON + pg(16) }], entries: [{ vaddr: ANON, nrPages: 16, flags: PE_LAZY }] },
      { pid: 13, ppid: 10, zombie: true },
    ],
  });
  return { top, pre };
}

test('inspectJson: schema, hex addresses, VMA descriptions, per-location counts, totals', (t) => {
  const { top, pre } = build(t);
  const set = readImages(top);
  const j = inspectJson(set);
  t.is(j.schema, 'lazy-restore/inspect@1');
  t.is(j.dir, top);
  t.deepEqual(j.parents, [pre]);
  t.is(j.pageSize, 4096);
  t.deepEqual(j.inventory, { imgVersion: 2, fdinfoPerId: true, preDumpMode: null, dumpCriuRunId: 'test-run-id' });
  t.deepEqual(
    j.processes.map((p) => [p.pid, p.ppid, p.threads, p.zombie, p.pagesId, p.pagemapEntries]),
    [
      [10, 0, [10, 14, 15], false, 1, 3],
      [11, 10, [11], false, 2, 2],
      [12, 11, [12], false, 3, 1],
      [13, 10, [13], true, null, 0],
    ],
  );

  const root = j.processes[0]!;
  t.deepEqual(root.vmas[0], {
    index: 0,
    start: '0x555555554000',
    end: '0x555555556000',
    bytes: 8192,
    pages: 2,
    prot: 'r-x',
    flags: '0x2',
    flagNames: ['MAP_PRIVATE'],
    statusHex: '0x41',
    status: ['VMA_AREA_REGULAR', 'VMA_FILE_PRIVATE'],
    lazy: false,
    dumpedPages: 1,
    lazyPages: 0,
  });
  t.like(root.vmas[1], {
    start: '0x7f0000000000',
    end: '0x7f0000010000',
    prot: 'rw-',
    flags: '0x22',
    flagNames: ['MAP_PRIVATE', 'MAP_ANONYMOUS'],
    status: ['VMA_AREA_REGULAR', 'VMA_ANON_PRIVATE'],
    lazy: true,
    dumpedPages: 6,
    lazyPages: 6,
  });
  t.like(root.vmas[2], { start: '0xffffffffff600000', end: '0xffffffffff601000', prot: '--x', lazy: false });

  t.deepEqual(root.lazyByLocation, {
    local: { pages: 4, bytes: 4 * PAGE },
    parent: { pages: 0, bytes: 0 },
    remote: { pages: 2, bytes: 2 * PAGE },
  });
  t.deepEqual(root.lazyRanges, [
    { start: '0x7f0000000000', end: '0x7f0000004000', pages: 4, vma: 1, location: 'local', file: join(top, 'pages-1.img'), offset: 4096 },
    { start: '0x7f0000008000', end: '0x7f000000a000', pages: 2, vma: 1, location: 'remote', file: null, offset: null },
  ]);
  t.deepEqual(root.totals, {
    vma: { pages: 2 + 16 + 1, bytes: 19 * PAGE },
    lazyVma: { pages: 16, bytes: 16 * PAGE },
    lazy: { pages: 6, bytes: 6 * PAGE },
    lazyLocal: { pages: 4, bytes: 4 * PAGE },
    lazyRemote: { pages: 2, bytes: 2 * PAGE },
    eager: { pages: 1, bytes: PAGE },
    parent: { pages: 0, bytes: 0 },
    zero: { pages: 10, bytes: 10 * PAGE },
  });

  // Process 11: 6 pages eagerly from the parent set (not lazy), 2 lazy pages in its own file.
  const child = j.processes[1]!;
  t.is(child.totals.parent.pages, 6);
  t.is(child.totals.eager.pages, 6);
  t.deepEqual(child.lazyByLocation.local, { pages: 2, bytes: 2 * PAGE });
  t.is(child.lazyRanges[0]!.file, join(top, 'pages-2.img'));

  t.deepEqual(j.processes[2]!.lazyByLocation.remote, { pages: 16, bytes: 16 * PAGE });
  t.deepEqual(j.processes[3]!.vmas, []);

  // Set-wide sums.
  t.deepEqual(j.totals.lazy, { pages: 6 + 2 + 16, bytes: 24 * PAGE });
  t.deepEqual(j.lazyByLocation, {
    local: { pages: 6, bytes: 6 * PAGE },
    parent: { pages: 0, bytes: 0 },
    remote: { pages: 18, bytes: 18 * PAGE },
  });
});

test('inspectJson is plain JSON: it survives a stringify/parse round trip unchanged', (t) => {
  const { top } = build(t);
  const j = inspectJson(readImages(top));
  const text = JSON.stringify(j);
  t.deepEqual(JSON.parse(text) as InspectJson, j);
  t.notRegex(text, /undefined/);
});

test('lazy ranges whose bytes are in a parent set are counted as "parent"', (t) => {
  const root = mkdtempSync(join(tmpdir(), 'lr-inspect-'));
  t.teardown(() => rmSync(root, { recursive: true, force: true }));
  // A hand-made set where a lazy range points into the parent dir (location.dir differs).
  writeImageDir(join(root, 'd'), { processes: [{ pid: 1, vmas: [{ start: ANON, end: ANON + pg(4) }], entries: [{ vaddr: ANON, nrPages: 4, flags: 6 }] }] });
  const set = readImages(join(root, 'd'));
  const proc = set.processes[0]!;
  proc.lazyRanges = [{ ...proc.lazyRanges[0]!, location: { kind: 'file', file: '/elsewhere/pages-1.img', offset: 0n, dir: '/elsewhere' } }];
  const j = inspectJson(set);
  t.is(j.processes[0]!.lazyRanges[0]!.location, 'parent');
  t.deepEqual(j.processes[0]!.lazyByLocation.parent, { pages: 4, bytes: 4 * PAGE });
  t.regex(inspectText(set), /parent 16\.0 KiB \(\/elsewhere\/pages-1\.img\)/);
});

test('inspectText: an indented process tree, a VMA table per process, where lazy pages live', (t) => {
  const { top, pre } = build(t);
  const text = inspectText(readImages(top));
  const lines = text.split('\n');
  t.true(lines[0]!.includes(top));
  t.true(text.includes(`parent chain: ${pre}`));

  // The tree: children one level deeper than their parent, the zombie under the root.
  const indent = (pid: number): number => {
    const i = lines.indexOf('Process tree');
    const line = lines.slice(i + 1).find((l) => l.trimStart().startsWith(`${pid}  `));
    t.truthy(line, `tree line for ${pid}`);
    return line!.length - line!.trimStart().length;
  };
  t.is(indent(11), indent(10) + 2);
  t.is(indent(12), indent(11) + 2);
  t.is(indent(13), indent(10) + 2);
  t.regex(text, /\n {4}13 {2}zombie\n/);
  t.regex(text, /\n {2}10 {2}3 threads, lazy 24\.0 KiB\n/);

  // Per process: header, table rows with human sizes.
  t.regex(text, /pid 10 \(ppid 0, 3 threads, pages-1\.img, 3 pagemap entries\)/);
  t.regex(text, /0x555555554000 +0x555555556000 +8\.0 KiB +r-x +file private +no +4\.0 KiB +-/);
  t.regex(text, /0x7f0000000000 +0x7f0000010000 +64\.0 KiB +rw- +anon private +yes +24\.0 KiB +24\.0 KiB/);
  t.regex(text, /0xffffffffff600000 +0xffffffffff601000 +4\.0 KiB +--x +\[vsyscall\] +no/);
  t.regex(text, /lazy +24\.0 KiB \(6 pages\): served by the lazy-pages daemon/);
  t.regex(text, /eager +4\.0 KiB \(1 page\): restored by criu restore\n/);
  t.regex(text, /zero +40\.0 KiB \(10 pages\)/);
  t.regex(text, /lazy pages live in: local file 16\.0 KiB \(pages-1\.img\), parent 0 B, remote 8\.0 KiB/);
  t.regex(text, /eager +24\.0 KiB \(6 pages\): restored by criu restore, 24\.0 KiB \(6 pages\) of it from parent images/);
  t.regex(text, /pid 13 \(ppid 10, zombie\)\n {2}no memory \(zombie at dump time\)/);
  t.regex(text, /lazy pages live in: local file 0 B, parent 0 B, remote 64\.0 KiB/);
});

test('humanBytes', (t) => {
  t.is(humanBytes(0), '0 B');
  t.is(humanBytes(1023), '1023 B');
  t.is(humanBytes(1024), '1.0 KiB');
  t.is(humanBytes(1536), '1.5 KiB');
  t.is(humanBytes(64 * 1024 * 1024), '64.0 MiB');
  t.is(humanBytes(3n * 1024n ** 3n / 2n), '1.5 GiB');
  t.is(humanBytes(2n ** 50n), '1.0 PiB');
});

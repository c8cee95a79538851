/**
 * The `inspect` report of a CRIU images directory: a JSON document for tools (schema
 * `lazy-restore/inspect@1`, documented in docs/inspect-json.md) and a text summary for people.
 *
 * Both are computed from an {@link ImageSet} alone; nothing here reads files.
 */

import { bytes } from './format.js';
import { basename } from 'node:path';
import { VMA_STATUS_BITS } from '../criu/messages.js';
import type { ImageSet, LazyRange, PageLocation, ProcessImage, ProcessTotals, Vma } from '../criu/types.js';

export const INSPECT_SCHEMA = 'lazy-restore/inspect@1';
const PAGE_SIZE = 4096;
const PAGE = BigInt(PAGE_SIZE);

/** A quantity of memory, in whole pages and in bytes. */
export interface Amount {
  pages: number;
  bytes: number;
}

/** Where the bytes of lazy pages live. */
export type LocationName = 'local' | 'parent' | 'remote';

export interface InspectVma {
  /** Index in the process's VMA list (LazyRange.vma refers to it). */
  index: number;
  /** "0x7f0ae029c000" */
  start: string;
  /** One past the last byte. */
  end: string;
  bytes: number;
  pages: number;
  /** "rwx" style, "-" for a missing permission. */
  prot: string;
  /** mmap flags as hex, e.g. "0x22". */
  flags: string;
  /** Names of the known mmap flag bits, e.g. ["MAP_PRIVATE", "MAP_ANONYMOUS"]. */
  flagNames: string[];
  /** CRIU status bits as hex, e.g. "0x201". */
  statusHex: string;
  /** Names of the status bits, e.g. ["VMA_AREA_REGULAR", "VMA_ANON_PRIVATE"]. */
  status: string[];
  /** Whether CRIU can restore this VMA lazily (private anonymous, not locked/hugetlb/vdso/vvar/vsyscall). */
  lazy: boolean;
  /** Pages of this VMA listed in the pagemap (any flags). */
  dumpedPages: number;
  /** Pages of this VMA in lazy ranges. */
  lazyPages: number;
}

export interface InspectLazyRange {
  start: string;
  end: string;
  pages: number;
  /** Index into `vmas`. */
  vma: number;
  location: LocationName;
  /** Pages file holding the bytes (absolute path), null for remote. */
  file: string | null;
  /** Byte offset in `file`, null for remote. */
  offset: number | null;
}

export interface InspectTotals {
  /** All VMAs (v4.2 guard pseudo-VMAs excluded). */
  vma: Amount;
  /** VMAs that can be lazy. */
  lazyVma: Amount;
  /** Pages in PE_LAZY pagemap entries (what crit counts as lazy). */
  lazy: Amount;
  /** Of those, with bytes on local disk (this set or a parent). */
  lazyLocal: Amount;
  /** Of those, with bytes only on the dump-side page server. */
  lazyRemote: Amount;
  /** Restored eagerly by `criu restore` (PE_PRESENT without PE_LAZY, and PE_PARENT). */
  eager: Amount;
  /** In PE_PARENT entries (bytes in a parent image set). */
  parent: Amount;
  /** Pages of lazy VMAs in no pagemap entry: they read as zero. */
  zero: Amount;
}

export interface InspectProcess {
  pid: number;
  ppid: number;
  pgid: number;
  sid: number;
  threads: number[];
  /** Dead at dump time: no memory images. */
  zombie: boolean;
  /** pages-<id>.img of this process, null for a zombie. */
  pagesId: number | null;
  /** Pagemap entries (any flags). */
  pagemapEntries: number;
  vmas: InspectVma[];
  /** Pages of `lazyRanges` (what a lazy-pages daemon serves) by where their bytes are. */
  lazyByLocation: Record<LocationName, Amount>;
  totals: InspectTotals;
  lazyRanges: InspectLazyRange[];
}

export interface InspectJson {
  schema: typeof INSPECT_SCHEMA;
  /** Absolute path of the images dir. */
  dir: string;
  /** Parent image dirs, nearest first (real paths). */
  parents: string[];
  pageSize: number;
  inventory: {
    imgVersion: number;
    fdinfoPerId: boolean;
    preDumpMode: number | null;
    dumpCriuRunId: string | null;
  };
  /** In pstree.img order. */
  processes: InspectProcess[];
  /** Sums over all processes. */
  totals: InspectTotals;
  lazyByLocation: Record<LocationName, Amount>;
}

const MAP_FLAG_NAMES: ReadonlyArray<readonly [number, string]> = [
  [0x1, 'MAP_SHARED'],
  [0x2, 'MAP_PRIVATE'],
  [0x20, 'MAP_ANONYMOUS'],
  [0x100, 'MAP_GROWSDOWN'],
  [0x2000, 'MAP_LOCKED'],
  [0x4000, 'MAP_NORESERVE'],
  [0x40000, 'MAP_HUGETLB'],
];

const hex = (n: bigint | number): string => `0x${n.toString(16)}`;

function amount(pages: number): Amount {
  return { pages, bytes: pages * PAGE_SIZE };
}

function amountOfBytes(bytes: bigint): Amount {
  return { pages: Number(bytes / PAGE), bytes: Number(bytes) };
}

function protString(prot: number): string {
  return `${prot & 1 ? 'r' : '-'}${prot & 2 ? 'w' : '-'}${prot & 4 ? 'x' : '-'}`;
}

function names(bits: number, table: ReadonlyArray<readonly [number, string]>): string[] {
  return table.filter(([bit]) => (bits & bit) !== 0).map(([, name]) => name);
}

function locationName(set: ImageSet, location: PageLocation): LocationName {
  if (location.kind === 'remote') return 'remote';
  return location.dir === set.dir ? 'local' : 'parent';
}

/** Pages of [aStart, aEnd) ∩ [bStart, bEnd). */
function overlapPages(aStart: bigint, aEnd: bigint, bStart: bigint, bEnd: bigint): number {
  const s = aStart > bStart ? aStart : bStart;
  const e = aEnd < bEnd ? aEnd : bEnd;
  return e > s ? Number((e - s) / PAGE) : 0;
}

/** Per VMA: pages listed in the pagemap, and pages in lazy ranges. */
function pagesPerVma(proc: ProcessImage): { dumped: number[]; lazy: number[] } {
  const dumped = proc.vmas.map(() => 0);
  const lazy = proc.vmas.map(() => 0);
  const entries = proc.pagemap
    .map((e) => ({ start: e.vaddr, end: e.vaddr + BigInt(e.nrPages) * PAGE }))
    .sort((a, b) => (a.start < b.start ? -1 : a.start > b.start ? 1 : 0));
  proc.vmas.forEach((vma, i) => {
    // First entry that ends after the VMA starts (entries do not overlap, so ends are sorted too).
    let lo = 0;
    let hi = entries.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (entries[mid]!.end <= vma.start) lo = mid + 1;
      else hi = mid;
    }
    for (let j = lo; j < entries.length && entries[j]!.start < vma.end; j++) {
      dumped[i]! += overlapPages(vma.start, vma.end, entries[j]!.start, entries[j]!.end);
    }
  });
  for (const r of proc.lazyRanges) if (r.vmaIndex < lazy.length) lazy[r.vmaIndex]! += r.nrPages;
  return { dumped, lazy };
}

function vmaJson(vma: Vma, index: number, dumpedPages: number, lazyPages: number): InspectVma {
  return {
    index,
    start: hex(vma.start),
    end: hex(vma.end),
    bytes: Number(vma.end - vma.start),
    pages: Number((vma.end - vma.start) / PAGE),
    prot: protString(vma.prot),
    flags: hex(vma.flags),
    flagNames: names(vma.flags, MAP_FLAG_NAMES),
    statusHex: hex(vma.status),
    status: names(vma.status, VMA_STATUS_BITS),
    lazy: vma.lazy,
    dumpedPages,
    lazyPages,
  };
}

function totalsJson(t: ProcessTotals): InspectTotals {
  return {
    vma: amountOfBytes(t.vmaBytes),
    lazyVma: amountOfBytes(t.lazyVmaBytes),
    lazy: amount(t.lazyPages),
    lazyLocal: amount(t.lazyLocalPages),
    lazyRemote: amount(t.lazyRemotePages),
    eager: amount(t.eagerPages),
    parent: amount(t.parentPages),
    zero: amount(t.zeroPages),
  };
}

function byLocation(set: ImageSet, ranges: readonly LazyRange[]): Record<LocationName, Amount> {
  const pages: Record<LocationName, number> = { local: 0, parent: 0, remote: 0 };
  for (const r of ranges) pages[locationName(set, r.location)] += r.nrPages;
  return { local: amount(pages.local), parent: amount(pages.parent), remote: amount(pages.remote) };
}

function sumAmounts(a: Amount, b: Amount): Amount {
  return { pages: a.pages + b.pages, bytes: a.bytes + b.bytes };
}

function sumTotals(all: InspectTotals[]): InspectTotals {
  const zero = amount(0);
  const out: InspectTotals = {
    vma: zero,
    lazyVma: zero,
    lazy: zero,
    lazyLocal: zero,
    lazyRemote: zero,
    eager: zero,
    parent: zero,
    zero: zero,
  };
  for (const t of all) {
    for (const key of Object.keys(out) as Array<keyof InspectTotals>) out[key] = sumAmounts(out[key], t[key]);
  }
  return out;
}

function processJson(set: ImageSet, proc: ProcessImage): InspectProcess {
  const perVma = pagesPerVma(proc);
  return {
    pid: proc.pid,
    ppid: proc.ppid,
    pgid: proc.pgid,
    sid: proc.sid,
    threads: [...proc.threads],
    zombie: proc.zombie === true,
    pagesId: proc.zombie ? null : proc.pagesId,
    pagemapEntries: proc.pagemap.length,
    vmas: proc.vmas.map((vma, i) => vmaJson(vma, i, perVma.dumped[i]!, perVma.lazy[i]!)),
    lazyByLocation: byLocation(set, proc.lazyRanges),
    totals: totalsJson(proc.totals),
    lazyRanges: proc.lazyRanges.map((r) => ({
      start: hex(r.start),
      end: hex(r.start + BigInt(r.nrPages) * PAGE),
      pages: r.nrPages,
      vma: r.vmaIndex,
      location: locationName(set, r.location),
      file: r.location.kind === 'file' ? r.location.file : null,
      offset: r.location.kind === 'file' ? Number(r.location.offset) : null,
    })),
  };
}

/** The JSON report (schema lazy-restore/inspect@1). Safe for JSON.stringify: no bigint. */
export function inspectJson(set: ImageSet): InspectJson {
  const processes: InspectProcess[] = set.processes.map((proc) => processJson(set, proc));
  return {
    schema: INSPECT_SCHEMA,
    dir: set.dir,
    parents: [...set.parents],
    pageSize: PAGE_SIZE,
    inventory: {
      imgVersion: set.inventory.imgVersion,
      fdinfoPerId: set.inventory.fdinfoPerId,
      preDumpMode: set.inventory.preDumpMode ?? null,
      dumpCriuRunId: set.inventory.dumpCriuRunId ?? null,
    },
    processes,
    totals: sumTotals(processes.map((p) => p.totals)),
    lazyByLocation: byLocation(
      set,
      set.processes.flatMap((p) => p.lazyRanges),
    ),
  };
}

// ---------------------------------------------------------------------------------------------
// Text

/** 67108864 → "64.0 MiB", 512 → "512 B" (shared with the transfer report). */
export const humanBytes = bytes;

function pagesText(a: Amount): string {
  return `${humanBytes(a.bytes)} (${a.pages} page${a.pages === 1 ? '' : 's'})`;
}

/** What a VMA is, in a few words. */
function vmaKind(v: InspectVma): string {
  const s = new Set(v.status);
  if (s.has('VMA_AREA_GUARD')) return 'guard (v4.2)';
  if (s.has('VMA_AREA_VDSO')) return '[vdso]';
  if (s.has('VMA_AREA_VVAR')) return '[vvar]';
  if (s.has('VMA_AREA_VSYSCALL')) return '[vsyscall]';
  if (s.has('VMA_AREA_HEAP')) return '[heap]';
  if (s.has('VMA_AREA_STACK') || v.flagNames.includes('MAP_GROWSDOWN')) return '[stack]';
  if (s.has('VMA_AREA_SHSTK')) return 'shadow stack';
  if (s.has('VMA_AREA_AIORING')) return 'aio ring';
  if (s.has('VMA_AREA_SYSVIPC')) return 'sysv shm';
  if (s.has('VMA_AREA_MEMFD')) return 'memfd';
  if (s.has('VMA_AREA_SOCKET')) return 'socket';
  if (s.has('VMA_FILE_PRIVATE')) return 'file private';
  if (s.has('VMA_FILE_SHARED')) return 'file shared';
  if (s.has('VMA_ANON_SHARED')) return 'anon shared';
  if (s.has('VMA_ANON_PRIVATE')) return 'anon private';
  return v.status.length > 0 ? v.status.join('|') : `status ${v.statusHex}`;
}

function table(rows: string[][], rightAligned: ReadonlySet<number>): string[] {
  const widths: number[] = [];
  for (const row of rows) row.forEach((cell, i) => (widths[i] = Math.max(widths[i] ?? 0, cell.length)));
  return rows.map((row) =>
    row
      .map((cell, i) => (rightAligned.has(i) ? cell.padStart(widths[i]!) : cell.padEnd(widths[i]!)))
      .join('  ')
      .trimEnd(),
  );
}

/** Processes in tree order with their depth; parents before children, pstree order among siblings. */
function treeOrder(processes: readonly InspectProcess[]): Array<{ proc: InspectProcess; depth: number }> {
  const pids = new Set(processes.map((p) => p.pid));
  const children = new Map<number, InspectProcess[]>();
  for (const p of processes) {
    const list = children.get(p.ppid) ?? [];
    list.push(p);
    children.set(p.ppid, list);
  }
  const out: Array<{ proc: InspectProcess; depth: number }> = [];
  const visited = new Set<number>();
  const visit = (p: InspectProcess, depth: number): void => {
    if (visited.has(p.pid)) return;
    visited.add(p.pid);
    out.push({ proc: p, depth });
    for (const c of children.get(p.pid) ?? []) visit(c, depth + 1);
  };
  for (const p of processes) if (!pids.has(p.ppid) || p.ppid === p.pid) visit(p, 0);
  // A ppid cycle (corrupt pstree) has no root: show what is left at the top level.
  for (const p of processes) visit(p, 0);
  return out;
}

function threadsText(p: InspectProcess): string {
  return p.zombie ? 'zombie' : `${p.threads.length} thread${p.threads.length === 1 ? '' : 's'}`;
}

/** Lazy pages by location: file names for local and parent, "remote" for page-server-only pages. */
function whereText(proc: InspectProcess): string {
  const files: Record<'local' | 'parent', Set<string>> = { local: new Set(), parent: new Set() };
  for (const r of proc.lazyRanges) {
    if (r.location !== 'remote' && r.file !== null) files[r.location].add(r.location === 'local' ? basename(r.file) : r.file);
  }
  const list = (s: Set<string>): string => (s.size > 0 ? ` (${[...s].join(', ')})` : '');
  return (
    `local file ${humanBytes(proc.lazyByLocation.local.bytes)}${list(files.local)}, ` +
    `parent ${humanBytes(proc.lazyByLocation.parent.bytes)}${list(files.parent)}, ` +
    `remote ${humanBytes(proc.lazyByLocation.remote.bytes)}`
  );
}

/** A person-readable summary: process tree, per process a VMA table and where its pages live. */
export function inspectText(set: ImageSet): string {
  const report = inspectJson(set);
  const lines: string[] = [];
  const n = report.processes.length;
  lines.push(`Images ${report.dir}`);
  lines.push(
    `  CRIU image version ${report.inventory.imgVersion}, ${n} process${n === 1 ? '' : 'es'}, ` +
      (report.parents.length === 0 ? 'no parent images' : `parent chain: ${report.parents.join(' -> ')}`),
  );
  const t = report.totals;
  lines.push(
    `  lazy ${humanBytes(t.lazy.bytes)} (local ${humanBytes(t.lazyLocal.bytes)}, remote ${humanBytes(t.lazyRemote.bytes)}), ` +
      `eager ${humanBytes(t.eager.bytes)}, zero ${humanBytes(t.zero.bytes)}`,
  );
  lines.push('');
  lines.push('Process tree');
  const order = treeOrder(report.processes);
  for (const { proc, depth } of order) {
    const lazy = proc.zombie ? '' : `, lazy ${humanBytes(proc.totals.lazy.bytes)}`;
    lines.push(`${'  '.repeat(depth + 1)}${proc.pid}  ${threadsText(proc)}${lazy}`);
  }

  for (const { proc } of order) {
    lines.push('');
    lines.push(
      `pid ${proc.pid} (ppid ${proc.ppid}, ${threadsText(proc)}` +
        (proc.pagesId === null
          ? ')'
          : `, pages-${proc.pagesId}.img, ${proc.pagemapEntries} pagemap ${proc.pagemapEntries === 1 ? 'entry' : 'entries'})`),
    );
    if (proc.zombie) {
      lines.push('  no memory (zombie at dump time)');
      continue;
    }
    const rows: string[][] = [['START', 'END', 'SIZE', 'PROT', 'KIND', 'LAZY', 'DUMPED', 'LAZY PAGES']];
    for (const v of proc.vmas) {
      rows.push([
        v.start,
        v.end,
        humanBytes(v.bytes),
        v.prot,
        vmaKind(v),
        v.lazy ? 'yes' : 'no',
        humanBytes(v.dumpedPages * PAGE_SIZE),
        v.lazyPages > 0 ? humanBytes(v.lazyPages * PAGE_SIZE) : '-',
      ]);
    }
    for (const row of table(rows, new Set([2, 6, 7]))) lines.push(`  ${row}`);
    const pt = proc.totals;
    const vmaCount = proc.vmas.length;
    lines.push(
      `  memory  ${humanBytes(pt.vma.bytes)} in ${vmaCount} VMA${vmaCount === 1 ? '' : 's'}, ${humanBytes(pt.lazyVma.bytes)} of it can be lazy`,
    );
    lines.push(`  lazy    ${pagesText(pt.lazy)}: served by the lazy-pages daemon`);
    lines.push(`  eager   ${pagesText(pt.eager)}: restored by criu restore` + (pt.parent.pages > 0 ? `, ${pagesText(pt.parent)} of it from parent images` : ''));
    lines.push(`  zero    ${pagesText(pt.zero)}: in lazy VMAs but not dumped, read as zero`);
    lines.push(`  lazy pages live in: ${whereText(proc)}`);
  }
  return lines.join('\n') + '\n';
}

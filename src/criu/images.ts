/**
 * Reads a CRIU images directory into an {@link ImageSet}: the process tree, each process's VMAs
 * and pagemap with exact pages-file offsets, PE_PARENT runs resolved through the `parent` chain,
 * the lazy ranges a daemon serves, and per-process totals. Also reads page bytes back.
 *
 * Rules (docs/criu-lazy-pages.md §1): the pages file of a pagemap is the concatenation of the
 * pages of its PE_PRESENT entries in entry order (other entries consume nothing); PE_PARENT bytes
 * are found by looking up the same address in the parent set's pagemap of the same pid, piece
 * by piece; lazy ranges are PE_LAZY entries cut at the bounds of VMAs that can be lazy.
 */

import { closeSync, lstatSync, openSync, readSync, realpathSync, statSync } from 'node:fs';
import { constants } from 'node:buffer';
import { join, resolve } from 'node:path';
import { ImageError, PageReadError } from './errors.js';
import { CORE_IMAGE, ImageFile, INVENTORY_IMAGE, MM_IMAGE, PAGEMAP_IMAGE, PSTREE_IMAGE } from './image-file.js';
import {
  decodeCoreTaskState,
  decodeInventory,
  decodeMm,
  decodePagemapEntry,
  decodePagemapHead,
  decodePstreeEntry,
  PAGE_SIZE,
  VMA_AREA_GUARD,
  type LocatedEntry,
  type LocatedVma,
} from './messages.js';
import {
  PE_LAZY,
  PE_PARENT,
  PE_PRESENT,
  type ImageSet,
  type Inventory,
  type LazyRange,
  type PageLocation,
  type PageRun,
  type PagemapEntry,
  type ProcessImage,
  type ProcessTotals,
  type PstreeEntry,
  type Vma,
} from './types.js';

const PAGE = BigInt(PAGE_SIZE);
const TASK_DEAD = 2;

const hex = (n: bigint): string => `0x${n.toString(16)}`;
const endOf = (e: { vaddr: bigint; nrPages: number }): bigint => e.vaddr + BigInt(e.nrPages) * PAGE;

/** A pagemap-<pid>.img, checked against its pages file. */
interface LoadedPagemap {
  /** Images dir it belongs to. */
  dir: string;
  path: string;
  pagesId: number;
  pagesPath: string;
  /** File order. */
  entries: LocatedEntry[];
  /** Address order (entries never overlap). */
  sorted: LocatedEntry[];
}

function isMissing(err: unknown): boolean {
  const code = (err as NodeJS.ErrnoException).code;
  return code === 'ENOENT' || code === 'ENOTDIR';
}

/**
 * Reads and checks one pagemap: framing, entries, no overlaps, offsets by the offset rule, every
 * PE_PRESENT run inside the pages file.
 */
function loadPagemap(dir: string, pid: number, needed?: string): LoadedPagemap {
  const path = join(dir, `pagemap-${pid}.img`);
  const img = ImageFile.open(path, PAGEMAP_IMAGE, needed);
  let pagesId: number | undefined;
  const entries: LocatedEntry[] = [];
  for (const { reader } of img.entries()) {
    if (pagesId === undefined) pagesId = decodePagemapHead(reader);
    else entries.push(decodePagemapEntry(reader));
  }
  if (pagesId === undefined) {
    throw img.error('TRUNCATED', img.dataStart, 'file ends before the pagemap_head', 'a pagemap_head entry');
  }
  const pagesPath = join(dir, `pages-${pagesId}.img`);

  let offset = 0n;
  for (const { entry } of entries) {
    if (entry.flags & PE_PRESENT) {
      entry.fileOffset = offset;
      offset += BigInt(entry.nrPages) * PAGE;
    }
  }
  if (offset > 0n) {
    let size: bigint;
    try {
      size = BigInt(statSync(pagesPath).size);
    } catch (err) {
      if (!isMissing(err)) throw err;
      throw new ImageError({
        code: 'MISSING_FILE',
        file: pagesPath,
        offset: 0,
        detail: 'no such file',
        expected: `the pages file named by ${path}'s pagemap_head (pages_id ${pagesId})`,
        cause: err,
      });
    }
    for (const { entry, offset: at } of entries) {
      if (entry.fileOffset === undefined) continue;
      const runEnd = entry.fileOffset + BigInt(entry.nrPages) * PAGE;
      if (runEnd > size) {
        throw new ImageError({
          code: 'PAGES_PAST_EOF',
          file: pagesPath,
          offset: Number(entry.fileOffset),
          detail:
            `${entry.nrPages} page(s) of the pagemap entry at ${hex(entry.vaddr)} (${path} @ 0x${at.toString(16)}) ` +
            `end at 0x${runEnd.toString(16)}, past end of file (size 0x${size.toString(16)})`,
          expected: 'the bytes of every PE_PRESENT entry inside the pages file',
        });
      }
    }
  }

  const sorted = [...entries].sort((a, b) => (a.entry.vaddr < b.entry.vaddr ? -1 : a.entry.vaddr > b.entry.vaddr ? 1 : 0));
  for (let i = 1; i < sorted.length; i++) {
    const prev = sorted[i - 1]!;
    const cur = sorted[i]!;
    if (cur.entry.vaddr < endOf(prev.entry)) {
      throw img.error(
        'BAD_VALUE',
        cur.offset,
        `entry ${hex(cur.entry.vaddr)}+${cur.entry.nrPages} pages overlaps the entry ${hex(prev.entry.vaddr)}+${prev.entry.nrPages} pages (@ 0x${prev.offset.toString(16)})`,
        'pagemap entries that do not overlap',
      );
    }
  }
  return { dir, path, pagesId, pagesPath, entries, sorted };
}

/** Last index i with key(items[i]) <= x, or -1. */
function lastAtOrBelow<T>(items: readonly T[], x: bigint, key: (t: T) => bigint): number {
  let lo = 0;
  let hi = items.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (key(items[mid]!) <= x) lo = mid + 1;
    else hi = mid;
  }
  return lo - 1;
}

/** The `parent` chain of a dir, and parent pagemaps loaded on demand. */
class ParentChain {
  /** Real paths, nearest first. */
  readonly dirs: string[] = [];
  /** The `parent` link that dangles or is not a directory, ending the chain early. */
  private brokenLink?: string;
  private readonly pagemaps = new Map<string, LoadedPagemap>();

  constructor(private readonly top: string) {
    const seen = new Set<string>([realpathSync(top)]);
    let cur = top;
    for (;;) {
      const link = join(cur, 'parent');
      try {
        lstatSync(link);
      } catch (err) {
        if (isMissing(err)) break;
        throw err;
      }
      let real: string;
      try {
        real = realpathSync(link);
      } catch (err) {
        const code = (err as NodeJS.ErrnoException).code;
        if (code === 'ELOOP') {
          throw new ImageError({
            code: 'PARENT_LOOP',
            file: link,
            offset: 0,
            detail: 'symlink loop',
            expected: 'a parent chain that ends',
            cause: err,
          });
        }
        if (!isMissing(err)) throw err;
        this.brokenLink = link;
        break;
      }
      if (seen.has(real)) {
        throw new ImageError({
          code: 'PARENT_LOOP',
          file: link,
          offset: 0,
          detail: `leads to ${real}, which is already in the parent chain`,
          expected: 'a parent chain that ends',
        });
      }
      if (!statSync(real).isDirectory()) {
        this.brokenLink = link;
        break;
      }
      seen.add(real);
      this.dirs.push(real);
      cur = real;
    }
  }

  /** Pagemap of `pid` in parent level `level` (0 = nearest parent). */
  pagemap(level: number, pid: number, neededBy: string): LoadedPagemap {
    const dir = this.dirs[level];
    if (dir === undefined) {
      const link = this.brokenLink ?? join(level === 0 ? this.top : this.dirs[level - 1]!, 'parent');
      throw new ImageError({
        code: 'MISSING_FILE',
        file: link,
        offset: 0,
        detail: this.brokenLink !== undefined ? 'parent link does not lead to a directory' : 'no parent images directory',
        expected: `a parent images directory, needed by ${neededBy}`,
      });
    }
    const key = `${level}:${pid}`;
    let pm = this.pagemaps.get(key);
    if (pm === undefined) {
      pm = loadPagemap(dir, pid, `the parent's pagemap, needed by ${neededBy}`);
      this.pagemaps.set(key, pm);
    }
    return pm;
  }

  /**
   * Locations of pages [vaddr, vaddr + nrPages) of `pid`, looked up in parent `level` and
   * further up where that parent says PE_PARENT again.
   */
  resolve(level: number, pid: number, vaddr: bigint, nrPages: number, neededBy: { file: string; offset: number }): Array<{
    start: bigint;
    nrPages: number;
    location: PageLocation;
  }> {
    const who = `the PE_PARENT entry ${neededBy.file} @ 0x${neededBy.offset.toString(16)}`;
    const pm = this.pagemap(level, pid, who);
    const out: Array<{ start: bigint; nrPages: number; location: PageLocation }> = [];
    const end = vaddr + BigInt(nrPages) * PAGE;
    let cur = vaddr;
    let i = lastAtOrBelow(pm.sorted, cur, (e) => e.entry.vaddr);
    while (cur < end) {
      const found = pm.sorted[i];
      if (found === undefined || endOf(found.entry) <= cur) {
        throw new ImageError({
          code: 'BAD_VALUE',
          file: neededBy.file,
          offset: neededBy.offset,
          detail: `page ${hex(cur)} is PE_PARENT but not in the parent pagemap ${pm.path}`,
          expected: 'every PE_PARENT page present in the parent image set',
        });
      }
      const { entry, offset: entryAt } = found;
      const pieceEnd = endOf(entry) < end ? endOf(entry) : end;
      const n = Number((pieceEnd - cur) / PAGE);
      if (entry.flags & PE_PRESENT) {
        out.push({
          start: cur,
          nrPages: n,
          location: { kind: 'file', file: pm.pagesPath, offset: entry.fileOffset! + (cur - entry.vaddr), dir: pm.dir },
        });
      } else if (entry.flags & PE_PARENT) {
        out.push(...this.resolve(level + 1, pid, cur, n, { file: pm.path, offset: entryAt }));
      } else {
        throw new ImageError({
          code: 'BAD_VALUE',
          file: pm.path,
          offset: entryAt,
          detail: `entry ${hex(entry.vaddr)} of a parent image set is PE_LAZY without PE_PRESENT (its bytes are not on disk)`,
          expected: 'parent image sets with their bytes on disk (PE_PRESENT or PE_PARENT)',
        });
      }
      cur = pieceEnd;
      i++;
    }
    return mergeRuns(out);
  }
}

/** Joins neighbours whose bytes are contiguous in the same file (or both remote). */
function mergeRuns<T extends { start: bigint; nrPages: number; location: PageLocation }>(runs: T[]): T[] {
  const out: T[] = [];
  for (const run of runs) {
    const last = out[out.length - 1];
    if (last !== undefined && last.start + BigInt(last.nrPages) * PAGE === run.start) {
      const a = last.location;
      const b = run.location;
      const contiguous =
        a.kind === 'file' && b.kind === 'file'
          ? a.file === b.file && a.offset + BigInt(last.nrPages) * PAGE === b.offset
          : a.kind === 'remote' && b.kind === 'remote';
      if (contiguous) {
        out[out.length - 1] = { ...last, nrPages: last.nrPages + run.nrPages };
        continue;
      }
    }
    out.push(run);
  }
  return out;
}

function readInventory(dir: string): Inventory {
  const img = ImageFile.open(join(dir, 'inventory.img'), INVENTORY_IMAGE);
  return decodeInventory(img.single('inventory_entry').reader);
}

function readPstree(dir: string): PstreeEntry[] {
  const img = ImageFile.open(join(dir, 'pstree.img'), PSTREE_IMAGE);
  const tasks: PstreeEntry[] = [];
  const seen = new Set<number>();
  for (const { reader } of img.entries()) {
    const task = decodePstreeEntry(reader);
    if (seen.has(task.pid)) {
      throw img.error('BAD_VALUE', reader.start, `pid ${task.pid} appears twice`, 'one pstree_entry per task');
    }
    seen.add(task.pid);
    tasks.push(task);
  }
  if (tasks.length === 0) {
    throw img.error('TRUNCATED', img.dataStart, 'file ends before the first pstree_entry', 'at least one pstree_entry');
  }
  return tasks;
}

/** True if the task was dead (a zombie) at dump time, per core-<pid>.img; false if unknown. */
function isZombie(dir: string, pid: number): boolean {
  const path = join(dir, `core-${pid}.img`);
  try {
    statSync(path);
  } catch (err) {
    if (isMissing(err)) return false;
    throw err;
  }
  return decodeCoreTaskState(ImageFile.open(path, CORE_IMAGE).single('core_entry').reader) === TASK_DEAD;
}

function emptyTotals(): ProcessTotals {
  return {
    vmaBytes: 0n,
    lazyVmaBytes: 0n,
    lazyPages: 0,
    lazyLocalPages: 0,
    lazyRemotePages: 0,
    eagerPages: 0,
    parentPages: 0,
    zeroPages: 0,
  };
}

/** Real VMAs (not v4.2 guard pseudo-VMAs) with their index in the full list, in address order. */
function realVmas(vmas: readonly Vma[]): Array<{ vma: Vma; index: number }> {
  return vmas.map((vma, index) => ({ vma, index })).filter(({ vma }) => (vma.status & VMA_AREA_GUARD) === 0);
}

/** Throws BAD_VALUE unless every page of `entry` lies inside some VMA. */
function checkInsideVmas(pm: LoadedPagemap, located: LocatedEntry, real: ReadonlyArray<{ vma: Vma }>): void {
  const { entry, offset } = located;
  const end = endOf(entry);
  let cur = entry.vaddr;
  let i = lastAtOrBelow(real, cur, (v) => v.vma.start);
  while (cur < end) {
    const v = real[i];
    if (v === undefined || v.vma.end <= cur || v.vma.start > cur) {
      throw new ImageError({
        code: 'BAD_VALUE',
        file: pm.path,
        offset,
        detail: `entry ${hex(entry.vaddr)}+${entry.nrPages} pages: page ${hex(cur)} is not inside any VMA`,
        expected: 'pagemap entries inside the VMAs of mm image',
      });
    }
    cur = v.vma.end;
    i++;
  }
}

/** Pieces of `runs` that fall inside lazy VMAs. */
function lazyPieces(runs: readonly PageRun[], real: ReadonlyArray<{ vma: Vma; index: number }>): LazyRange[] {
  const out: LazyRange[] = [];
  for (const run of runs) {
    const runEnd = run.start + BigInt(run.nrPages) * PAGE;
    let i = Math.max(0, lastAtOrBelow(real, run.start, (v) => v.vma.start));
    for (; i < real.length; i++) {
      const { vma, index } = real[i]!;
      if (vma.start >= runEnd) break;
      if (!vma.lazy || vma.end <= run.start) continue;
      const start = vma.start > run.start ? vma.start : run.start;
      const end = vma.end < runEnd ? vma.end : runEnd;
      const location: PageLocation =
        run.location.kind === 'file' ? { ...run.location, offset: run.location.offset + (start - run.start) } : { kind: 'remote' };
      out.push({ start, nrPages: Number((end - start) / PAGE), vmaIndex: index, location });
    }
  }
  return out;
}

function readProcess(dir: string, task: PstreeEntry, chain: ParentChain): ProcessImage {
  const base = { pid: task.pid, ppid: task.ppid, pgid: task.pgid, sid: task.sid, threads: task.threads };
  const mmPath = join(dir, `mm-${task.pid}.img`);
  let mmImg: ImageFile;
  try {
    mmImg = ImageFile.open(mmPath, MM_IMAGE, `the mm image of pid ${task.pid} (or a core image marking it dead)`);
  } catch (err) {
    if (err instanceof ImageError && err.code === 'MISSING_FILE' && isZombie(dir, task.pid)) {
      return { ...base, zombie: true, vmas: [], pagesId: 0, pagemap: [], lazyRanges: [], totals: emptyTotals() };
    }
    throw err;
  }
  const located: LocatedVma[] = decodeMm(mmImg.single('mm_entry').reader);
  const vmas = located.map((l) => l.vma);
  const real = realVmas(vmas);

  const pm = loadPagemap(dir, task.pid, `the pagemap image of pid ${task.pid}`);
  for (const le of pm.entries) checkInsideVmas(pm, le, real);

  const totals = emptyTotals();
  for (const { vma } of real) {
    totals.vmaBytes += vma.end - vma.start;
    if (vma.lazy) totals.lazyVmaBytes += vma.end - vma.start;
  }

  for (const { entry, offset } of pm.entries) {
    const { flags, nrPages } = entry;
    if (flags & PE_PRESENT) {
      const location: PageLocation = { kind: 'file', file: pm.pagesPath, offset: entry.fileOffset!, dir };
      entry.runs = [{ start: entry.vaddr, nrPages, flags, location }];
    } else if (flags & PE_PARENT) {
      entry.runs = chain
        .resolve(0, task.pid, entry.vaddr, nrPages, { file: pm.path, offset })
        .map((p) => ({ ...p, flags }));
    } else {
      entry.runs = [{ start: entry.vaddr, nrPages, flags, location: { kind: 'remote' } }];
    }

    if (flags & PE_LAZY) {
      totals.lazyPages += nrPages;
      if (flags & (PE_PRESENT | PE_PARENT)) totals.lazyLocalPages += nrPages;
      else totals.lazyRemotePages += nrPages;
    } else {
      totals.eagerPages += nrPages;
    }
    if (flags & PE_PARENT) totals.parentPages += nrPages;
  }

  const lazyRanges: LazyRange[] = [];
  for (const { entry } of pm.sorted) {
    if (entry.flags & PE_LAZY) lazyRanges.push(...lazyPieces(entry.runs!, real));
  }

  // Pages of lazy VMAs that no entry covers read as zero.
  let covered = 0n;
  for (const { entry } of pm.sorted) {
    for (const piece of lazyPieces([{ start: entry.vaddr, nrPages: entry.nrPages, flags: 0, location: { kind: 'remote' } }], real)) {
      covered += BigInt(piece.nrPages);
    }
  }
  totals.zeroPages = Number(totals.lazyVmaBytes / PAGE - covered);

  return {
    ...base,
    vmas,
    pagesId: pm.pagesId,
    pagemap: pm.entries.map((l) => l.entry),
    lazyRanges,
    totals,
  };
}

/**
 * Reads the images directory `dir` (synchronously) and checks it thoroughly. Throws
 * {@link ImageError} for anything malformed or inconsistent.
 */
export function readImages(dir: string): ImageSet {
  const abs = resolve(dir);
  const inventory = readInventory(abs);
  const tasks = readPstree(abs);
  const chain = new ParentChain(abs);
  const processes = tasks.map((task) => readProcess(abs, task, chain));
  return { dir: abs, inventory, parents: chain.dirs, processes };
}

/** Per-process lookup tables for pageRuns/readPages, rebuilt if the process's arrays are replaced. */
interface ProcIndex {
  pagemap: readonly PagemapEntry[];
  vmas: readonly Vma[];
  runs: PageRun[];
  real: Array<{ vma: Vma; index: number }>;
}
const indexes = new WeakMap<ProcessImage, ProcIndex>();

function procIndex(proc: ProcessImage): ProcIndex {
  const cached = indexes.get(proc);
  if (cached !== undefined && cached.pagemap === proc.pagemap && cached.vmas === proc.vmas) return cached;
  const entries = [...proc.pagemap].sort((a, b) => (a.vaddr < b.vaddr ? -1 : a.vaddr > b.vaddr ? 1 : 0));
  const runs: PageRun[] = [];
  for (const entry of entries) {
    if (entry.runs === undefined) {
      throw new Error(`pageRuns: pagemap entry ${hex(entry.vaddr)} of pid ${proc.pid} was not resolved by readImages`);
    }
    runs.push(...entry.runs);
  }
  const index = { pagemap: proc.pagemap, vmas: proc.vmas, runs, real: realVmas(proc.vmas) };
  indexes.set(proc, index);
  return index;
}

/** Every pagemap entry of `proc` resolved to where its bytes are, in address order. */
export function pageRuns(proc: ProcessImage): PageRun[] {
  return [...procIndex(proc).runs];
}

/**
 * The dumped bytes of pages [vaddr, vaddr + nrPages × 4096) of `pid`: read from this set's or a
 * parent's pages file, zero for pages inside a VMA that the pagemap does not list. Throws
 * {@link PageReadError} if part of the range is outside every VMA or only on a remote page server.
 */
export function readPages(set: ImageSet, pid: number, vaddr: bigint, nrPages: number): Buffer {
  const proc = set.processes.find((p) => p.pid === pid);
  if (proc === undefined) throw new PageReadError('UNKNOWN_PID', pid, vaddr, `no process with pid ${pid} in ${set.dir}`);
  if (vaddr < 0n || vaddr % PAGE !== 0n || !Number.isSafeInteger(nrPages) || nrPages < 0 || nrPages * PAGE_SIZE > constants.MAX_LENGTH) {
    throw new PageReadError(
      'BAD_ARGUMENT',
      pid,
      vaddr,
      `readPages(${pid}, ${hex(vaddr)}, ${nrPages}): vaddr must be page aligned and nrPages a non-negative integer ` +
        `no larger than one Buffer can hold (${constants.MAX_LENGTH} bytes)`,
    );
  }
  const end = vaddr + BigInt(nrPages) * PAGE;
  const { real, runs } = procIndex(proc);
  let cur = vaddr;
  let vi = lastAtOrBelow(real, cur, (v) => v.vma.start);
  while (cur < end) {
    const v = real[vi];
    if (v === undefined || v.vma.start > cur || v.vma.end <= cur) {
      throw new PageReadError('NOT_MAPPED', pid, cur, `pid ${pid}: page ${hex(cur)} is not inside any VMA`);
    }
    cur = v.vma.end;
    vi++;
  }

  const out = Buffer.alloc(nrPages * PAGE_SIZE);
  const pieces: Array<{ file: string; offset: bigint; at: number; length: number }> = [];
  for (let i = Math.max(0, lastAtOrBelow(runs, vaddr, (r) => r.start)); i < runs.length; i++) {
    const run = runs[i]!;
    if (run.start >= end) break;
    const runEnd = run.start + BigInt(run.nrPages) * PAGE;
    if (runEnd <= vaddr) continue;
    const from = run.start > vaddr ? run.start : vaddr;
    const to = runEnd < end ? runEnd : end;
    if (run.location.kind === 'remote') {
      throw new PageReadError(
        'REMOTE_ONLY',
        pid,
        from,
        `pid ${pid}: pages ${hex(from)}-${hex(to)} are remote-only (PE_LAZY without PE_PRESENT): their bytes are on the dump-side page server, not on disk`,
      );
    }
    pieces.push({
      file: run.location.file,
      offset: run.location.offset + (from - run.start),
      at: Number(from - vaddr),
      length: Number(to - from),
    });
  }

  const fds = new Map<string, number>();
  try {
    for (const piece of pieces) {
      let fd = fds.get(piece.file);
      if (fd === undefined) {
        try {
          fd = openSync(piece.file, 'r');
        } catch (err) {
          if (!isMissing(err)) throw err;
          throw new ImageError({ code: 'MISSING_FILE', file: piece.file, offset: 0, detail: 'no such file', expected: 'the pages file', cause: err });
        }
        fds.set(piece.file, fd);
      }
      let done = 0;
      while (done < piece.length) {
        const n = readSync(fd, out, piece.at + done, piece.length - done, piece.offset + BigInt(done));
        if (n === 0) {
          throw new ImageError({
            code: 'PAGES_PAST_EOF',
            file: piece.file,
            offset: Number(piece.offset) + done,
            detail: 'file ends inside pages it held when the images were read',
            expected: `${piece.length - done} more bytes`,
          });
        }
        done += n;
      }
    }
  } finally {
    for (const fd of fds.values()) closeSync(fd);
  }
  return out;
}

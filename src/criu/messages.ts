/**
 * Decoders for the CRIU messages lazy-restore reads (field numbers: docs/criu-lazy-pages.md §1.4).
 *
 * Each decoder takes a {@link ProtoReader} over one message, skips fields it does not know, and
 * checks what can be checked inside the message itself: required fields, value ranges, page
 * alignment, valid PE_* combinations. Checks that need other messages or files (VMA coverage,
 * pages files, parents) live in images.ts.
 *
 * Offsets in errors: a problem with one field points at that field's tag; a missing field or a
 * problem with the message as a whole points at the message's first byte.
 */

import { ImageError } from './errors.js';
import type { ProtoReader } from './protobuf.js';
import { PE_LAZY, PE_PARENT, PE_PRESENT, type Inventory, type PagemapEntry, type PstreeEntry, type Vma } from './types.js';

export const PAGE_SIZE = 4096;
const PAGE = BigInt(PAGE_SIZE);
const ADDRESS_LIMIT = 1n << 64n;

/** x86_64 mmap flags used by the lazy predicate (§1.4, §1.6). */
export const MAP_SHARED = 0x1;
export const MAP_PRIVATE = 0x2;
export const MAP_ANONYMOUS = 0x20;
export const MAP_GROWSDOWN = 0x100;
export const MAP_LOCKED = 0x2000;
export const MAP_NORESERVE = 0x4000;
export const MAP_HUGETLB = 0x40000;

/** CRIU VMA_* status bits (§1.4). */
export const VMA_STATUS_BITS: ReadonlyArray<readonly [number, string]> = [
  [1 << 0, 'VMA_AREA_REGULAR'],
  [1 << 1, 'VMA_AREA_STACK'],
  [1 << 2, 'VMA_AREA_VSYSCALL'],
  [1 << 3, 'VMA_AREA_VDSO'],
  [1 << 5, 'VMA_AREA_HEAP'],
  [1 << 6, 'VMA_FILE_PRIVATE'],
  [1 << 7, 'VMA_FILE_SHARED'],
  [1 << 8, 'VMA_ANON_SHARED'],
  [1 << 9, 'VMA_ANON_PRIVATE'],
  [1 << 10, 'VMA_AREA_SYSVIPC'],
  [1 << 11, 'VMA_AREA_SOCKET'],
  [1 << 12, 'VMA_AREA_VVAR'],
  [1 << 13, 'VMA_AREA_AIORING'],
  [1 << 14, 'VMA_AREA_MEMFD'],
  [1 << 15, 'VMA_AREA_SHSTK'],
  [1 << 16, 'VMA_AREA_GUARD'],
  [1 << 17, 'VMA_AREA_UPROBES'],
];
export const VMA_AREA_VSYSCALL = 1 << 2;
export const VMA_AREA_VDSO = 1 << 3;
export const VMA_AREA_VVAR = 1 << 12;
/** CRIU 4.2: a fake VMA describing MADV_GUARD ranges, listed after the real ones. */
export const VMA_AREA_GUARD = 1 << 16;
/** Bits 27-31 are CRIU run-time flags, never meaningful in an image. */
const VMA_RUNTIME_BITS = 0xf8000000;

/** The PE_* combinations CRIU writes (§1.5). */
const VALID_PE_FLAGS = new Set([PE_PARENT, PE_LAZY, PE_PRESENT, PE_PRESENT | PE_LAZY]);

function missing(r: ProtoReader, what: string, fields: string[]): ImageError {
  return r.error(
    'MISSING_REQUIRED_FIELD',
    r.start,
    `${what} lacks ${fields.join(', ')}`,
    `a ${what} with required field${fields.length > 1 ? 's' : ''} ${fields.join(', ')}`,
  );
}

function requireFields(r: ProtoReader, what: string, present: Record<string, boolean>): void {
  const absent = Object.entries(present)
    .filter(([, has]) => !has)
    .map(([name]) => name);
  if (absent.length > 0) throw missing(r, what, absent);
}

/** inventory_entry; img_version must be 1 or 2 and fdinfo_per_id true (CRIU's own check). */
export function decodeInventory(r: ProtoReader): Inventory {
  let imgVersion: number | undefined;
  let versionAt = r.start;
  let fdinfoPerId: boolean | undefined;
  let fdinfoAt = r.start;
  const inv: Partial<Inventory> = {};
  while (r.next()) {
    switch (r.field) {
      case 1:
        versionAt = r.tagOffset;
        imgVersion = r.uint32();
        break;
      case 2:
        fdinfoAt = r.tagOffset;
        fdinfoPerId = r.bool();
        break;
      case 9:
        inv.preDumpMode = r.uint32();
        break;
      case 13:
        inv.dumpCriuRunId = r.string();
        break;
    }
  }
  if (imgVersion === undefined) throw missing(r, 'inventory_entry', ['img_version (1)']);
  if (imgVersion !== 1 && imgVersion !== 2) {
    throw r.error('BAD_VALUE', versionAt, `img_version is ${imgVersion}`, 'img_version 1 or 2');
  }
  if (fdinfoPerId !== true) {
    throw r.error(
      'BAD_VALUE',
      fdinfoAt,
      fdinfoPerId === undefined ? 'fdinfo_per_id is absent (image too old)' : 'fdinfo_per_id is false (image too old)',
      'fdinfo_per_id = true',
    );
  }
  return { imgVersion, fdinfoPerId, ...inv };
}

/** pstree_entry; pid, ppid, pgid, sid are required, threads packed or unpacked. */
export function decodePstreeEntry(r: ProtoReader): PstreeEntry {
  let pid: number | undefined;
  let ppid: number | undefined;
  let pgid: number | undefined;
  let sid: number | undefined;
  let pidAt = r.start;
  const threads: number[] = [];
  while (r.next()) {
    switch (r.field) {
      case 1:
        pidAt = r.tagOffset;
        pid = r.uint32();
        break;
      case 2:
        ppid = r.uint32();
        break;
      case 3:
        pgid = r.uint32();
        break;
      case 4:
        sid = r.uint32();
        break;
      case 5:
        r.repeatedUint32(threads);
        break;
    }
  }
  requireFields(r, 'pstree_entry', {
    'pid (1)': pid !== undefined,
    'ppid (2)': ppid !== undefined,
    'pgid (3)': pgid !== undefined,
    'sid (4)': sid !== undefined,
  });
  if (pid === 0 || pid! > 0x7fffffff) throw r.error('BAD_VALUE', pidAt, `pid is ${pid}`, 'a pid from 1 to 2^31-1');
  return { pid: pid!, ppid: ppid!, pgid: pgid!, sid: sid!, threads };
}

/** CRIU's vma_entry_can_be_lazy() (§1.6). */
export function vmaCanBeLazy(flags: number, status: number): boolean {
  return (
    (flags & MAP_ANONYMOUS) !== 0 &&
    (flags & MAP_PRIVATE) !== 0 &&
    (flags & MAP_LOCKED) === 0 &&
    (flags & MAP_HUGETLB) === 0 &&
    (status & (VMA_AREA_VDSO | VMA_AREA_VVAR | VMA_AREA_VSYSCALL | VMA_AREA_GUARD)) === 0
  );
}

/** A VMA with the offset of its vma_entry message in mm-<pid>.img. */
export interface LocatedVma {
  vma: Vma;
  offset: number;
}

/** vma_entry; all of fields 1-8 are required; start/end page aligned, start < end. */
export function decodeVma(r: ProtoReader): LocatedVma {
  let start: bigint | undefined;
  let end: bigint | undefined;
  let pgoff: bigint | undefined;
  let shmid: bigint | undefined;
  let prot: number | undefined;
  let flags: number | undefined;
  let status: number | undefined;
  let fd: bigint | undefined;
  let startAt = r.start;
  let endAt = r.start;
  const extra: Pick<Vma, 'madv' | 'fdflags'> = {};
  while (r.next()) {
    switch (r.field) {
      case 1:
        startAt = r.tagOffset;
        start = r.uint64();
        break;
      case 2:
        endAt = r.tagOffset;
        end = r.uint64();
        break;
      case 3:
        pgoff = r.uint64();
        break;
      case 4:
        shmid = r.uint64();
        break;
      case 5:
        prot = r.uint32();
        break;
      case 6:
        flags = r.uint32();
        break;
      case 7:
        status = r.uint32();
        break;
      case 8:
        fd = r.sint64();
        break;
      case 9:
        extra.madv = r.uint64();
        break;
      case 10:
        extra.fdflags = r.uint32();
        break;
    }
  }
  requireFields(r, 'vma_entry', {
    'start (1)': start !== undefined,
    'end (2)': end !== undefined,
    'pgoff (3)': pgoff !== undefined,
    'shmid (4)': shmid !== undefined,
    'prot (5)': prot !== undefined,
    'flags (6)': flags !== undefined,
    'status (7)': status !== undefined,
    'fd (8)': fd !== undefined,
  });
  if (start! % PAGE !== 0n) {
    throw r.error('BAD_VALUE', startAt, `vma start 0x${start!.toString(16)} is not page aligned`, 'a multiple of 4096');
  }
  if (end! % PAGE !== 0n || end! <= start!) {
    throw r.error(
      'BAD_VALUE',
      endAt,
      `vma end 0x${end!.toString(16)} (start 0x${start!.toString(16)})`,
      'a page-aligned end above start',
    );
  }
  const maskedStatus = (status! & ~VMA_RUNTIME_BITS) >>> 0;
  const vma: Vma = {
    start: start!,
    end: end!,
    pgoff: pgoff!,
    shmid: shmid!,
    prot: prot!,
    flags: flags!,
    status: maskedStatus,
    ...extra,
    fd: fd!,
    lazy: vmaCanBeLazy(flags!, maskedStatus),
  };
  return { vma, offset: r.start };
}

/**
 * mm_entry: fields 1-12 are required; returns the VMAs (field 14), which must be sorted by start
 * and must not overlap (the v4.2 guard pseudo-VMAs, listed last, are exempt).
 */
export function decodeMm(r: ProtoReader): LocatedVma[] {
  const seen = new Set<number>();
  const vmas: LocatedVma[] = [];
  while (r.next()) {
    if (r.field === 14) {
      vmas.push(decodeVma(r.message()));
    } else if (r.field >= 1 && r.field <= 11) {
      seen.add(r.field);
      r.uint64();
    } else if (r.field === 12) {
      seen.add(12);
      r.uint32();
    }
  }
  const absent: string[] = [];
  for (let f = 1; f <= 12; f++) if (!seen.has(f)) absent.push(`field ${f}`);
  if (absent.length > 0) throw missing(r, 'mm_entry', absent);
  let prev: LocatedVma | undefined;
  for (const lv of vmas) {
    if ((lv.vma.status & VMA_AREA_GUARD) !== 0) continue;
    if (prev !== undefined && lv.vma.start < prev.vma.end) {
      throw r.error(
        'BAD_VALUE',
        lv.offset,
        `vma 0x${lv.vma.start.toString(16)}-0x${lv.vma.end.toString(16)} starts before the previous one ends (0x${prev.vma.end.toString(16)})`,
        'vmas sorted by start and not overlapping',
      );
    }
    prev = lv;
  }
  return vmas;
}

/** pagemap_head: pages_id. */
export function decodePagemapHead(r: ProtoReader): number {
  let pagesId: number | undefined;
  while (r.next()) {
    if (r.field === 1) pagesId = r.uint32();
  }
  if (pagesId === undefined) throw missing(r, 'pagemap_head', ['pages_id (1)']);
  return pagesId;
}

/** A pagemap entry with the offset of its message in pagemap-<pid>.img. */
export interface LocatedEntry {
  entry: PagemapEntry;
  offset: number;
}

/**
 * pagemap_entry with CRIU's compat rules: the page count is field 5 (uint64, CRIU 4.2) if
 * present, else field 2; without field 4, flags are PE_PARENT if in_parent else PE_PRESENT.
 */
export function decodePagemapEntry(r: ProtoReader): LocatedEntry {
  let vaddr: bigint | undefined;
  let vaddrAt = r.start;
  let nr32: number | undefined;
  let nr32At = r.start;
  let nr64: bigint | undefined;
  let nr64At = r.start;
  let inParent = false;
  let flags: number | undefined;
  let flagsAt = r.start;
  while (r.next()) {
    switch (r.field) {
      case 1:
        vaddrAt = r.tagOffset;
        vaddr = r.uint64();
        break;
      case 2:
        nr32At = r.tagOffset;
        nr32 = r.uint32();
        break;
      case 3:
        inParent = r.bool();
        break;
      case 4:
        flagsAt = r.tagOffset;
        flags = r.uint32();
        break;
      case 5:
        nr64At = r.tagOffset;
        nr64 = r.uint64();
        break;
    }
  }
  if (vaddr === undefined) throw missing(r, 'pagemap_entry', ['vaddr (1)']);
  if (nr32 === undefined && nr64 === undefined) {
    throw missing(r, 'pagemap_entry', ['nr_pages (2, or 5 in CRIU 4.2 images)']);
  }
  if (vaddr % PAGE !== 0n) {
    throw r.error('BAD_VALUE', vaddrAt, `vaddr 0x${vaddr.toString(16)} is not page aligned`, 'a multiple of 4096');
  }
  const nr = nr64 ?? BigInt(nr32!);
  const nrAt = nr64 !== undefined ? nr64At : nr32At;
  if (nr === 0n || vaddr + nr * PAGE > ADDRESS_LIMIT) {
    throw r.error(
      'BAD_VALUE',
      nrAt,
      `nr_pages ${nr} at vaddr 0x${vaddr.toString(16)}`,
      'at least one page, ending inside the 64-bit address space',
    );
  }
  if (flags === undefined) {
    flags = inParent ? PE_PARENT : PE_PRESENT;
  } else if (!VALID_PE_FLAGS.has(flags)) {
    throw r.error(
      'BAD_VALUE',
      flagsAt,
      `flags 0x${flags.toString(16)}`,
      'PE_PARENT (1), PE_LAZY (2), PE_PRESENT (4) or PE_PRESENT|PE_LAZY (6)',
    );
  }
  return { entry: { vaddr, nrPages: Number(nr), flags }, offset: r.start };
}

/** core_entry → tc (3) → task_state (1); undefined when tc is absent. 1 alive, 2 dead, 3 stopped. */
export function decodeCoreTaskState(r: ProtoReader): number | undefined {
  let state: number | undefined;
  while (r.next()) {
    if (r.field !== 3) continue;
    const tc = r.message();
    let found: number | undefined;
    while (tc.next()) {
      if (tc.field === 1) found = tc.uint32();
    }
    if (found === undefined) throw missing(tc, 'task_core_entry', ['task_state (1)']);
    state = found;
  }
  return state;
}

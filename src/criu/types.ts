/**
 * The shape of a CRIU images directory as lazy-restore sees it. Addresses, offsets and byte
 * counts are `bigint` (user-space addresses do not fit a JS number exactly); page counts are
 * `number` (2^53 pages is far beyond any real dump).
 */

/** Pagemap entry flag bits (criu/include/pagemap.h). */
export const PE_PARENT = 0x1;
export const PE_LAZY = 0x2;
export const PE_PRESENT = 0x4;

/** inventory.img, the fields the daemon checks. */
export interface Inventory {
  imgVersion: number;
  fdinfoPerId: boolean;
  /** Raw field 9 when present (pre-dump mode). */
  preDumpMode?: number;
  dumpCriuRunId?: string;
}

/** One entry of pstree.img. */
export interface PstreeEntry {
  pid: number;
  ppid: number;
  pgid: number;
  sid: number;
  threads: number[];
}

/** One vma_entry of mm-<pid>.img. */
export interface Vma {
  start: bigint;
  end: bigint;
  pgoff: bigint;
  shmid: bigint;
  prot: number;
  /** mmap flags of the dumping arch (x86_64 values). */
  flags: number;
  /** CRIU VMA_* status bits, run-time bits 27-31 masked off. */
  status: number;
  madv?: bigint;
  fdflags?: number;
  /** Field 8, unused by CRIU (always -1); kept for completeness. */
  fd?: bigint;
  /** CRIU's vma_entry_can_be_lazy(): private anonymous, not locked/hugetlb/vdso/vvar/vsyscall. */
  lazy: boolean;
}

/** One pagemap_entry, after the compat rules (v4.2 field 5, legacy in_parent). */
export interface PagemapEntry {
  vaddr: bigint;
  nrPages: number;
  /** PE_* bits, legacy in_parent folded in. */
  flags: number;
  /** Byte offset of this entry's first page in this image set's pages-<id>.img (PE_PRESENT only). */
  fileOffset?: bigint;
  /**
   * Where this entry's bytes live, filled by readImages: one run for PE_PRESENT (this set's pages
   * file) or PE_LAZY alone (remote); for PE_PARENT one run per piece of the parent chain that
   * holds it, in address order.
   */
  runs?: PageRun[];
}

/** Where the bytes of a range live. */
export type PageLocation =
  /** In a local pages file, `file` absolute, `offset` exact. */
  | { kind: 'file'; file: string; offset: bigint; /** the images dir holding it (a parent for PE_PARENT) */ dir: string }
  /** Only on the dump-side page server (PE_LAZY without PE_PRESENT). */
  | { kind: 'remote' };

/** A run of pages the daemon serves lazily, inside exactly one VMA. */
export interface LazyRange {
  /** Image (dump-time) address of the first page. */
  start: bigint;
  nrPages: number;
  /** Index into ProcessImage.vmas. */
  vmaIndex: number;
  location: PageLocation;
}

/** A run of pages whose bytes are known (any flags), resolved through parent links. */
export interface PageRun {
  start: bigint;
  nrPages: number;
  flags: number;
  location: PageLocation;
}

export interface ProcessTotals {
  /** Bytes of all VMAs. */
  vmaBytes: bigint;
  /** Bytes of VMAs that can be lazy. */
  lazyVmaBytes: bigint;
  /** Pages in pagemap entries with PE_LAZY (what crit shows as lazy). */
  lazyPages: number;
  /** Lazy pages whose bytes are on local disk / only remote. */
  lazyLocalPages: number;
  lazyRemotePages: number;
  /** Pages restored eagerly by `criu restore` (PE_PRESENT without PE_LAZY, and PE_PARENT). */
  eagerPages: number;
  /** Pages in PE_PARENT entries. */
  parentPages: number;
  /** Pages of lazy VMAs not in the pagemap at all: they read as zero. */
  zeroPages: number;
}

export interface ProcessImage {
  pid: number;
  ppid: number;
  pgid: number;
  sid: number;
  threads: number[];
  /** True for a task that was a zombie at dump time: no mm/pagemap images, no memory, pagesId 0. */
  zombie?: boolean;
  vmas: Vma[];
  pagesId: number;
  pagemap: PagemapEntry[];
  /** PE_LAZY runs split at VMA bounds, sorted by address. */
  lazyRanges: LazyRange[];
  totals: ProcessTotals;
}

export interface ImageSet {
  /** Absolute path of the images dir. */
  dir: string;
  inventory: Inventory;
  /** Absolute paths of the parent chain, nearest first (empty without `parent`). */
  parents: string[];
  /** In pstree.img order. */
  processes: ProcessImage[];
}

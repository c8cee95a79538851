/**
 * Turns an image set into what the engine executes: per task (pstree pid) the lazy ranges
 * with the file and exact offset their bytes come from. The engine knows nothing of CRIU
 * images; everything CRIU-specific is decided here.
 */
import type { ImageSet } from '../criu/types.js';

export interface PlannedRange {
  /** Image (dump-time) address of the first page. */
  start: bigint;
  pages: number;
  /** Index into TransferPlan.files. */
  file: number;
  offset: bigint;
}

export interface PlannedTask {
  pid: number;
  ranges: PlannedRange[];
  /** Pages the daemon is responsible for (sum of ranges). */
  pages: number;
}

export interface TransferPlan {
  files: string[];
  tasks: PlannedTask[];
  /** Total lazy pages over all tasks. */
  pages: number;
}

export class PlanError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'PlanError';
  }
}

/**
 * Builds the plan. Lazy pages that exist only on a remote page server (a `criu dump
 * --lazy-pages` image set) cannot be served from local files: that is an error here, with
 * the fix in the message.
 */
export function planFromImages(set: ImageSet): TransferPlan {
  const files: string[] = [];
  const fileIndex = new Map<string, number>();
  const tasks: PlannedTask[] = [];
  let total = 0;
  for (const proc of set.processes) {
    const ranges: PlannedRange[] = [];
    let pages = 0;
    for (let i = 0; i < proc.lazyRanges.length; i++) {
      const r = proc.lazyRanges[i]!;
      if (r.location.kind !== 'file') {
        throw new PlanError(
          `pid ${proc.pid}: lazy pages at 0x${r.start.toString(16)} (${r.nrPages} pages) are not in ${set.dir}: ` +
            'this image set was dumped with --lazy-pages and its memory is still on the source host; ' +
            'serve it from that page server (lazy-restore serve --page-server --address HOST --port N) or dump without --lazy-pages',
        );
      }
      let idx = fileIndex.get(r.location.file);
      if (idx === undefined) {
        idx = files.length;
        files.push(r.location.file);
        fileIndex.set(r.location.file, idx);
      }
      // Adjacent runs from the same file and contiguous offsets become one range, but never
      // across a VMA boundary (the reader already split there and UFFDIO_COPY cannot span).
      const last = ranges[ranges.length - 1];
      const prevVma = proc.lazyRanges[i - 1]?.vmaIndex;
      if (
        last &&
        prevVma === r.vmaIndex &&
        last.file === idx &&
        last.start + BigInt(last.pages) * 4096n === r.start &&
        last.offset + BigInt(last.pages) * 4096n === r.location.offset
      ) {
        last.pages += r.nrPages;
      } else {
        ranges.push({ start: r.start, pages: r.nrPages, file: idx, offset: r.location.offset });
      }
      pages += r.nrPages;
    }
    tasks.push({ pid: proc.pid, ranges, pages });
    total += pages;
  }
  return { files, tasks, pages: total };
}

/**
 * Plans for remote sources. The engine reads a source by (file index, offset); a remote source
 * is keyed by (pstree pid, image address), so a remote plan names file = the task's index and
 * offset = the image address, and the client source (`remote::client::LazySource`,
 * `remote::criu::CriuSource`) turns that back into (pid, address).
 */
import type { ImageSet } from '../criu/types.js';
import { PlanError, type PlannedRange, type TransferPlan } from '../serve/plan.js';

export interface RemotePlan extends TransferPlan {
  /** Pid of each task index (what a plan range's `file` means). */
  pids: number[];
  /**
   * For CRIU's page server: per task, the only pages it may be asked for (PE_LAZY without
   * PE_PRESENT, i.e. held in the dump side's page pipes), as [start, pages].
   */
  lazy: { pid: number; ranges: [bigint, number][] }[];
}

/**
 * `criu`: a `criu dump --lazy-pages` image set; every lazy range must be remote (its bytes are
 * only on the dump side). `lazy`: our page server; every lazy range is fetched from it, wherever
 * the destination's copy of the images says the bytes were.
 */
export function remotePlanFromImages(set: ImageSet, server: 'criu' | 'lazy'): RemotePlan {
  const tasks: TransferPlan['tasks'] = [];
  const lazy: RemotePlan['lazy'] = [];
  const pids: number[] = [];
  let total = 0;
  for (const proc of set.processes) {
    const index = pids.length;
    pids.push(proc.pid);
    const ranges: PlannedRange[] = [];
    const held: [bigint, number][] = [];
    let pages = 0;
    for (let i = 0; i < proc.lazyRanges.length; i++) {
      const r = proc.lazyRanges[i]!;
      if (server === 'criu' && r.location.kind !== 'remote') {
        throw new PlanError(
          `pid ${proc.pid}: lazy pages at 0x${r.start.toString(16)} (${r.nrPages} pages) are in ${set.dir}, not on the ` +
            "source's page server: CRIU's page server only holds the lazy pages of a `criu dump --lazy-pages`; " +
            'serve this image set locally (lazy-restore serve -D) or from `lazy-restore page-server`',
        );
      }
      const last = ranges[ranges.length - 1];
      const prevVma = proc.lazyRanges[i - 1]?.vmaIndex;
      // Merge adjacent runs of one VMA (UFFDIO_COPY cannot span VMAs), as planFromImages does.
      if (last && prevVma === r.vmaIndex && last.start + BigInt(last.pages) * 4096n === r.start) {
        last.pages += r.nrPages;
      } else {
        ranges.push({ start: r.start, pages: r.nrPages, file: index, offset: r.start });
      }
      // CRIU's server clamps a GET at the end of one of its page-pipe segments, which can be
      // shorter than our merged range: the client continues, so merged is fine here too.
      const h = held[held.length - 1];
      if (h && h[0] + BigInt(h[1]) * 4096n === r.start) h[1] += r.nrPages;
      else held.push([r.start, r.nrPages]);
      pages += r.nrPages;
    }
    tasks.push({ pid: proc.pid, ranges, pages });
    lazy.push({ pid: proc.pid, ranges: held });
    total += pages;
  }
  return { files: pids.map((p) => `remote:${p}`), tasks, pages: total, pids, lazy };
}

/**
 * Working-set profiles: record, per process, the order in which pages were first needed in
 * one restore, and replay it in the next — prefetch those pages first, in that order, while
 * faults keep first call (the REAP/FaaSnap idea).
 *
 * A profile is tied to one image set by a fingerprint of its pagemaps and VMA lists: a profile
 * recorded on other images is detected and ignored with a warning, never trusted blindly.
 */
import { createHash } from 'node:crypto';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { ImageSet, ProcessImage } from '../criu/types.js';

export const PROFILE_SCHEMA = 'lazy-restore/profile@1';
const PAGE = 4096n;

/** A run of consecutive pages, in the order they were first needed. */
export type ProfileRun = [start: string, pages: number];

export interface ProfileTask {
  pid: number;
  /** Pages in the profile. */
  pages: number;
  /** First-need order, consecutive pages merged: [hex image address, pages]. */
  runs: ProfileRun[];
  /** µs from the engine's start to the first and last recorded fault. */
  firstUs?: number;
  lastUs?: number;
}

export interface Profile {
  schema: typeof PROFILE_SCHEMA;
  fingerprint: string;
  imagesDir: string;
  recordedAt: string;
  tasks: ProfileTask[];
}

/** The image set's identity: pids, pages ids, pagemaps and VMA lists (not page contents). */
export function fingerprint(set: ImageSet): string {
  const h = createHash('sha256');
  for (const p of [...set.processes].sort((a, b) => a.pid - b.pid)) {
    h.update(`pid ${p.pid} pages ${p.pagesId}\n`);
    for (const name of [`pagemap-${p.pid}.img`, `mm-${p.pid}.img`]) {
      const f = join(set.dir, name);
      if (existsSync(f)) h.update(readFileSync(f));
    }
  }
  return h.digest('hex');
}

/** One fault of the engine's trace (image address of the faulting page). */
export interface TraceEntry {
  addr: bigint;
  atUs: number;
}

/** Builds a profile from the engine's per-task fault traces (first need, in order). */
export function profileFromTraces(set: ImageSet, traces: { pid: number; trace: TraceEntry[] }[]): Profile {
  const tasks: ProfileTask[] = [];
  for (const { pid, trace } of traces) {
    const seen = new Set<bigint>();
    const runs: ProfileRun[] = [];
    let runStart = -1n;
    let runPages = 0;
    for (const { addr } of trace) {
      const page = addr & ~(PAGE - 1n);
      if (seen.has(page)) continue;
      seen.add(page);
      if (runPages && page === runStart + BigInt(runPages) * PAGE) {
        runPages++;
        continue;
      }
      if (runPages) runs.push([`0x${runStart.toString(16)}`, runPages]);
      runStart = page;
      runPages = 1;
    }
    if (runPages) runs.push([`0x${runStart.toString(16)}`, runPages]);
    tasks.push({ pid, pages: seen.size, runs, firstUs: trace[0]?.atUs, lastUs: trace[trace.length - 1]?.atUs });
  }
  return { schema: PROFILE_SCHEMA, fingerprint: fingerprint(set), imagesDir: set.dir, recordedAt: new Date().toISOString(), tasks };
}

export function writeProfile(file: string, p: Profile): void {
  writeFileSync(file, JSON.stringify(p, null, 1) + '\n');
}

export class ProfileError extends Error {
  constructor(readonly file: string, message: string) {
    super(`profile ${file}: ${message}`);
    this.name = 'ProfileError';
  }
}

/** Reads and checks a profile file's shape (not whether it fits an image set). */
export function readProfile(file: string): Profile {
  let raw: unknown;
  try {
    raw = JSON.parse(readFileSync(file, 'utf8'));
  } catch (e) {
    throw new ProfileError(file, (e as Error).message);
  }
  const p = raw as Profile;
  if (!p || p.schema !== PROFILE_SCHEMA) throw new ProfileError(file, `not a ${PROFILE_SCHEMA} file`);
  if (typeof p.fingerprint !== 'string' || !Array.isArray(p.tasks)) throw new ProfileError(file, 'fingerprint or tasks missing');
  for (const t of p.tasks) {
    if (!Number.isInteger(t.pid) || !Array.isArray(t.runs)) throw new ProfileError(file, `task entry ${JSON.stringify(t).slice(0, 80)} is malformed`);
    for (const r of t.runs) {
      if (!Array.isArray(r) || typeof r[0] !== 'string' || !/^0x[0-9a-f]+$/.test(r[0]) || !Number.isInteger(r[1]) || r[1] < 1) {
        throw new ProfileError(file, `pid ${t.pid}: run ${JSON.stringify(r)} is malformed`);
      }
    }
  }
  return p;
}

export interface PrefetchPlan {
  tasks: { pid: number; ranges: { start: bigint; pages: number }[] }[];
  pages: number;
  /** Profile pages that are not lazy pages of this image set (dropped). */
  dropped: number;
}

/** Lazy pages of a process as a sorted list of [start, end) for membership tests. */
function lazySpans(p: ProcessImage): [bigint, bigint][] {
  return p.lazyRanges.map((r) => [r.start, r.start + BigInt(r.nrPages) * PAGE] as [bigint, bigint]);
}

function clip(spans: [bigint, bigint][], start: bigint, pages: number): { start: bigint; pages: number }[] {
  const end = start + BigInt(pages) * PAGE;
  const out: { start: bigint; pages: number }[] = [];
  // binary search the first span that ends after start
  let lo = 0;
  let hi = spans.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (spans[mid]![1] <= start) lo = mid + 1;
    else hi = mid;
  }
  for (let i = lo; i < spans.length && spans[i]![0] < end; i++) {
    const s = spans[i]![0] > start ? spans[i]![0] : start;
    const e = spans[i]![1] < end ? spans[i]![1] : end;
    if (e > s) out.push({ start: s, pages: Number((e - s) / PAGE) });
  }
  return out;
}

/**
 * Checks a profile against an image set and turns it into prefetch ranges. Returns the plan
 * and a warning; a profile of another image set gives an empty plan and says so.
 */
export function prefetchFromProfile(set: ImageSet, p: Profile): { plan: PrefetchPlan; warning?: string } {
  const empty = { tasks: [], pages: 0, dropped: 0 };
  const fp = fingerprint(set);
  if (p.fingerprint !== fp) {
    return {
      plan: empty,
      warning: `profile was recorded on other images (${p.imagesDir}; fingerprint ${p.fingerprint.slice(0, 12)} != ${fp.slice(0, 12)}): ignored`,
    };
  }
  const byPid = new Map(set.processes.map((x) => [x.pid, x]));
  const plan: PrefetchPlan = { tasks: [], pages: 0, dropped: 0 };
  for (const t of p.tasks) {
    const proc = byPid.get(t.pid);
    if (!proc) {
      plan.dropped += t.pages;
      continue;
    }
    const spans = lazySpans(proc);
    const ranges: { start: bigint; pages: number }[] = [];
    for (const [hex, pages] of t.runs) {
      const kept = clip(spans, BigInt(hex), pages);
      const keptPages = kept.reduce((n, r) => n + r.pages, 0);
      plan.dropped += pages - keptPages;
      ranges.push(...kept);
      plan.pages += keptPages;
    }
    if (ranges.length) plan.tasks.push({ pid: t.pid, ranges });
  }
  const warning = plan.dropped ? `profile: ${plan.dropped} pages are not lazy pages of these images (dropped)` : undefined;
  return { plan, warning };
}

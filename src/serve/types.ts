/** What the engine reports, as the TypeScript side sees it (mirrors the core's telemetry). */

export type Phase = 'handoff' | 'faults-only' | 'background' | 'done';

/** Page and copy counters, kept per task and summed into the totals. */
export interface PageCounters {
  pagesPlanned: number;
  pagesFault: number;
  pagesBackground: number;
  pagesZero: number;
  /** Pages found already present (EEXIST). */
  pagesPresent: number;
  /** Pages the task unmapped or dropped (MADV_DONTNEED) before they were copied. */
  pagesDropped: number;
  /** Pages left when the task exited. */
  pagesOrphaned: number;
  pagesPending: number;
  bytesCopied: number;
  faults: number;
  eagainRetries: number;
  /** Pages installed around faults (readahead) and from a profile (prefetch). */
  pagesReadahead?: number;
  pagesPrefetch?: number;
}

export interface TaskStats extends PageCounters {
  /** pid in pstree.img (forked children keep their parent's). */
  imagePid: number;
  /** 0 for the restored task, 1.. for children it forked after restore. */
  childIndex: number;
  hostPid?: number;
  zombie: boolean;
  exited: boolean;
  firstFaultUs?: number;
  doneUs?: number;
  /** This process's fault service latency (the report's `faultLatency` covers all of them). */
  faultLatency: LatencySummary;
  /** First-need order of faults (only when recording a profile). */
  faultTrace?: { addr: bigint | number | string; atUs: number }[];
}

export interface Totals extends PageCounters {
  tasks: number;
  tasksDone: number;
  tasksExited: number;
}

export interface LatencySummary {
  count: number;
  p50Us: number;
  p90Us: number;
  p99Us: number;
  maxUs: number;
  meanUs: number;
  /** Power-of-two µs buckets: bucket i counts latencies in [2^(i-1), 2^i) µs (bucket 0: < 1 µs). */
  buckets: number[];
}

/** What a remote page source did (`--source`, `--page-server`). */
export interface SourceStats {
  /** e.g. "lazy-restore page-server 10.0.0.1:7070", "CRIU page server 10.0.0.1:27". */
  name: string;
  /** Requests for faults and their readahead windows. */
  urgentRequests: number;
  /** Background requests (bulk streams, or CRIU GETs). */
  bulkRequests: number;
  /** Page bytes received. */
  pageBytes: number;
  /** What they took on the wire (less with lz4; CRIU: with headers). */
  wireBytes: number;
  reconnects: number;
}

export interface Snapshot {
  phase: Phase;
  elapsedUs: number;
  totals: Totals;
  tasks: TaskStats[];
  timeline: { connectUs?: number; allUffdsUs?: number; finishedUs?: number; doneUs?: number; finishFastUs?: number; prefetchDoneUs?: number };
  /** Cumulative bytes copied over time (about every 10 ms). */
  series?: { atUs: number; bytes: number }[];
  faultLatency: LatencySummary;
  /** A remote page source's account (absent for local page files). */
  source?: SourceStats;
  /** Faults served per CPU index (the serving thread's CPU). */
  faultsPerCpu: number[];
  cpuTime: { userUs: number; sysUs: number };
  peer?: { pid: number; uid: number; gid: number };
}

export interface ServeReport extends Snapshot {
  imagesDir: string;
  socketPath: string;
  plannedPages: number;
  policy?: string;
  profile?: { used?: string; recorded?: string; pages: number; dropped: number };
}

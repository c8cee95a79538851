/**
 * One timed restore of a dumped lr-bench tree with one variant: start the lazy-pages daemon
 * (if any), run `criu restore` in the foreground under lr-reaper, wait for the restored tree
 * to verify its memory and exit, and collect what the workload and the daemon report.
 *
 * Everything started here runs in a process group of its own and is registered, so a timeout
 * or Ctrl-C kills it all, and lr-reaper above criu restore reaps whatever is left (PID 1 here
 * does not).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { alive, cmdline, descendants, killGroup, killPids, track } from '../../src/harness/procs.js';
export { killAll } from '../../src/harness/procs.js';
import { join } from 'node:path';
import { exited, tail } from '../../src/harness/process.js';
import { PACKAGE_ROOT, REAPER_BIN } from '../../src/harness/workload.js';
import { readBenchResults, type BenchResult, type BenchWorkload } from './workload.js';

export const CLI = join(PACKAGE_ROOT, 'bin', 'lazy-restore.js');
export const CLI_BUILT = join(PACKAGE_ROOT, 'dist', 'cli.js');

export const VARIANTS = ['criu-daemon', 'ours-criu-policy', 'ours', 'ours-profile', 'plain'] as const;
export type VariantName = (typeof VARIANTS)[number];

export interface VariantDef {
  name: VariantName;
  /** Which lazy-pages daemon serves the restore; none = eager `criu restore`. */
  daemon: 'criu' | 'ours' | 'none';
  /** Extra `lazy-restore serve` flags of the timed runs (profile: the recorded file). */
  serveArgs: (profile: string) => string[];
  /** Flags of the one untimed recording run before the timed ones. */
  recordArgs?: (profile: string) => string[];
  /** serve flags this variant needs (checked against `serve --help`). */
  needsFlags: string[];
}

export const VARIANT_DEFS: Record<VariantName, VariantDef> = {
  'criu-daemon': { name: 'criu-daemon', daemon: 'criu', serveArgs: () => [], needsFlags: [] },
  'ours-criu-policy': { name: 'ours-criu-policy', daemon: 'ours', serveArgs: () => ['--policy', 'criu'], needsFlags: ['--policy'] },
  ours: { name: 'ours', daemon: 'ours', serveArgs: () => [], needsFlags: [] },
  'ours-profile': {
    name: 'ours-profile',
    daemon: 'ours',
    serveArgs: (p) => ['--profile', p],
    recordArgs: (p) => ['--record-profile', p],
    needsFlags: ['--profile', '--record-profile'],
  },
  plain: { name: 'plain', daemon: 'none', serveArgs: () => [], needsFlags: [] },
};

/** The variant cannot run with this build (flag rejected, CLI missing): shown as n/a. */
export class NotAvailable extends Error {
  constructor(reason: string) {
    super(reason);
    this.name = 'NotAvailable';
  }
}

// ---- process bookkeeping -------------------------------------------------------------

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

function withTimeout<T>(p: Promise<T>, ms: number): Promise<T | 'timeout'> {
  let t: NodeJS.Timeout | undefined;
  return Promise.race([p, new Promise<'timeout'>((r) => (t = setTimeout(() => r('timeout'), ms)))]).finally(() => clearTimeout(t));
}

/**
 * Before a restore, the previous incarnation of the tree must be gone (same pids). Waits a
 * little, then kills leftovers that are lr-bench; throws if a pid stays taken.
 */
export async function ensureTreeGone(pids: number[], timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (pids.some(alive) && Date.now() < deadline) await sleep(10);
  const left = pids.filter(alive);
  if (!left.length) return;
  killPids(left.filter((p) => cmdline(p).includes('lr-bench')));
  const d2 = Date.now() + 5_000;
  while (left.some(alive) && Date.now() < d2) await sleep(10);
  const still = left.filter(alive);
  if (still.length) throw new Error(`pids ${still.join(' ')} of the dumped tree are still taken (${still.map(cmdline).join(' | ')}); cannot restore`);
}

// ---- daemons -------------------------------------------------------------------------

export interface Daemon {
  child: ChildProcess;
  exit: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  stderr: () => string;
  logFile: string;
  reportFile?: string;
}

/** Spawns a daemon that writes a byte to fd 3 once listening; resolves then. */
async function startListening(cmd: string, args: string[], what: string, logFile: string, reportFile?: string): Promise<Daemon> {
  const child = track(spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe', 'pipe'], detached: true }));
  let err = '';
  child.stderr!.on('data', (d: Buffer) => (err += d.toString()));
  child.stdout!.resume();
  const exit = exited(child);
  const spawnError = new Promise<never>((_, reject) => child.once('error', reject));
  const status = child.stdio[3] as NodeJS.ReadableStream;
  const ready = new Promise<'ready'>((r) => status.once('data', () => r('ready')));
  const r = await Promise.race([ready, exit, spawnError, sleep(30_000).then(() => 'timeout' as const)]);
  if (r === 'ready') return { child, exit, stderr: () => err, logFile, reportFile };
  killGroup(child);
  const detail = [err.trim(), tail(logFile)].filter(Boolean).join('\n');
  if (r === 'timeout') throw new Error(`${what} not listening after 30 s: ${detail}`);
  // A usage error from `lazy-restore serve` (an option or value this build does not know yet):
  // commander's "error: unknown option '--x'" / "error: option '--x <v>' argument 'y' is
  // invalid". Matched on the message, since the exit status of a subcommand's usage error is
  // not reliably 2.
  const usage = err.split('\n').find((l) => /^error: (unknown option|option .* argument .* is invalid|too many arguments|missing required argument)/.test(l.trim()));
  if (cmd === process.execPath && (usage || r.code === 2)) {
    const line = usage ?? err.trim().split('\n')[0] ?? '';
    throw new NotAvailable(`serve rejected ${args.slice(args.indexOf('report.json') + 1).join(' ')}: ${line.trim()}`);
  }
  throw new Error(`${what} exited (${r.code ?? r.signal}) before listening: ${detail}`);
}

export function startCriuDaemon(imgs: string, work: string, logLevel: number): Promise<Daemon> {
  const args = ['lazy-pages', '-D', imgs, '-W', work, '-o', 'lazy-pages.log', `-v${logLevel}`, '--status-fd', '3'];
  return startListening('criu', args, 'criu lazy-pages', join(work, 'lazy-pages.log'));
}

export function startOurDaemon(imgs: string, work: string, logLevel: number, extra: string[]): Promise<Daemon> {
  if (!existsSync(CLI_BUILT)) throw new NotAvailable('lazy-restore is not built (no dist/cli.js): npm run build');
  const args = [CLI, 'serve', '-D', imgs, '-W', work, '-o', 'serve.log', `-v${logLevel}`, '--status-fd', '3', '--report', 'report.json', ...extra];
  return startListening(process.execPath, args, 'lazy-restore serve', join(work, 'serve.log'), join(work, 'report.json'));
}

// ---- one run -------------------------------------------------------------------------

/** What our daemon's --report says, reduced to what the benchmark shows. */
export interface DaemonStats {
  bytesCopied: number;
  pagesFault?: number;
  pagesBackground?: number;
  faults?: number;
  connectUs?: number;
  finishedUs?: number;
  doneUs?: number;
  faultP50Us?: number;
  faultP99Us?: number;
  faultCount?: number;
  faultsPerCpu?: number[];
  /** bytesCopied / (doneUs - finishedUs), GB/s (10^9). */
  transferGBps?: number;
}

export interface RunRecord {
  variant: VariantName;
  rep: number;
  /** 'record' for the untimed profile-recording run. */
  kind: 'timed' | 'record';
  ok: boolean;
  failures: string[];
  /** criu restore start -> criu restore exit (every process verified and exited), ms. */
  restoreMs?: number;
  /** Time to working set (max over processes that own memory), ms, from the result file:
   * from the moment each process ran again (saw the trigger). */
  wsMs?: number;
  /** criu restore start -> working set done (same clock as the workload's), ms: what a user
   * waits for, eager restore included. */
  restoreToWsMs?: number;
  /** Trigger -> all memory verified, max over processes, ms. */
  workloadMs?: number;
  /** hotset: ops in the first 100 ms after the trigger, % of the steady rate. */
  hotFirst100Pct?: number;
  /** hotset: ops in the first second, % of the steady rate. */
  hotFirst1sPct?: number;
  restoreExit?: { code: number | null; signal: NodeJS.Signals | null };
  daemonExit?: { code: number | null; signal: NodeJS.Signals | null };
  results: BenchResult[];
  daemon?: DaemonStats;
  /** Log tails, kept for failed runs only. */
  logs?: Record<string, string>;
}

export interface RunContext {
  imgs: string;
  w: BenchWorkload;
  /** Where this run's work dir goes (socket, logs, report). */
  workRoot: string;
  logLevel: number;
  timeoutMs: number;
  /** Keep work dirs of successful runs too. */
  keep: boolean;
}

/** Our daemon's `--report`, reduced to what the benchmarks show. */
export function daemonStats(report: any): DaemonStats | undefined {
  if (!report || typeof report !== 'object') return undefined;
  const t = report.totals ?? {};
  const tl = report.timeline ?? {};
  const fl = report.faultLatency ?? {};
  const s: DaemonStats = {
    bytesCopied: Number(t.bytesCopied ?? 0),
    pagesFault: t.pagesFault,
    pagesBackground: t.pagesBackground,
    faults: t.faults,
    connectUs: tl.connectUs,
    finishedUs: tl.finishedUs,
    doneUs: tl.doneUs,
    faultP50Us: fl.count ? fl.p50Us : undefined,
    faultP99Us: fl.count ? fl.p99Us : undefined,
    faultCount: fl.count,
    faultsPerCpu: report.faultsPerCpu,
  };
  if (s.doneUs !== undefined && s.finishedUs !== undefined && s.doneUs > s.finishedUs && s.bytesCopied > 0) {
    s.transferGBps = s.bytesCopied / ((s.doneUs - s.finishedUs) / 1e6) / 1e9;
  }
  return s;
}

/**
 * One restore of the dumped tree with `variant`. Never throws for a failed restore (that is
 * a FAILED record); throws NotAvailable when the variant cannot run with this build, and
 * Error when the machine state prevents any restore (pids of the tree still taken).
 */
export async function runOnce(ctx: RunContext, variant: VariantDef, rep: number, kind: 'timed' | 'record', serveArgs: string[]): Promise<RunRecord> {
  const { w, imgs } = ctx;
  await ensureTreeGone(w.pids);
  const work = join(ctx.workRoot, `${variant.name}-${kind}-${rep}`);
  rmSync(work, { recursive: true, force: true });
  mkdirSync(work, { recursive: true });
  rmSync(w.resultFile, { force: true });
  rmSync(w.triggerFile, { force: true });
  writeFileSync(w.triggerFile, ''); // the restored tree runs its benchmark at once

  const rec: RunRecord = { variant: variant.name, rep, kind, ok: false, failures: [], results: [] };
  let daemon: Daemon | undefined;
  try {
    if (variant.daemon === 'criu') daemon = await startCriuDaemon(imgs, work, ctx.logLevel);
    else if (variant.daemon === 'ours') daemon = await startOurDaemon(imgs, work, ctx.logLevel, serveArgs);
  } catch (e) {
    if (e instanceof NotAvailable) throw e;
    rec.failures.push(`daemon did not start: ${(e as Error).message}`);
    rec.logs = { daemon: (e as Error).message };
    return rec;
  }

  const restoreLog = join(work, 'restore.log');
  const args = ['criu', 'restore', '-D', imgs, '-W', work, '-o', 'restore.log', `-v${ctx.logLevel}`];
  if (variant.daemon !== 'none') args.push('--lazy-pages');
  const t0 = performance.now();
  const t0RtMs = performance.timeOrigin + t0; // wall clock (µs precision), as the workload's t0_rt_ns
  const restore = track(spawn(REAPER_BIN, args, { stdio: ['ignore', 'ignore', 'pipe'], detached: true }));
  let restoreErr = '';
  restore.stderr!.on('data', (d: Buffer) => (restoreErr += d.toString()));
  const restoreDone = exited(restore);
  const r = await withTimeout(restoreDone, ctx.timeoutMs);
  if (r === 'timeout') {
    rec.failures.push(`TIMEOUT: criu restore not done after ${(ctx.timeoutMs / 1000).toFixed(0)} s; killed everything`);
    // The restored tree has its own sessions: kill it by ancestry (lr-reaper -> criu restore ->
    // tree, plus orphans lr-reaper adopted), and lr-reaper then reaps it all and exits.
    if (restore.pid) killPids(descendants(restore.pid));
    killPids(w.pids.filter((p) => cmdline(p).includes('lr-bench')));
    killGroup(daemon?.child);
    if ((await withTimeout(restoreDone, 10_000)) === 'timeout') killGroup(restore);
  } else {
    rec.restoreMs = performance.now() - t0;
    rec.restoreExit = r;
    if (r.code !== 0) rec.failures.push(`criu restore exited ${r.code ?? r.signal}`);
  }

  if (daemon) {
    let d = await withTimeout(daemon.exit, 30_000);
    if (d === 'timeout') {
      rec.failures.push('daemon still running 30 s after the restored tree exited; killed');
      killGroup(daemon.child);
      d = await withTimeout(daemon.exit, 5_000);
    }
    if (d !== 'timeout') {
      rec.daemonExit = d;
      if (d.code !== 0) rec.failures.push(`daemon exited ${d.code ?? d.signal}`);
    }
    if (daemon.reportFile && existsSync(daemon.reportFile)) {
      try {
        rec.daemon = daemonStats(JSON.parse(readFileSync(daemon.reportFile, 'utf8')));
      } catch (e) {
        rec.failures.push(`unreadable report: ${(e as Error).message}`);
      }
    }
  }

  judge(rec, w, t0RtMs);

  rec.ok = rec.failures.length === 0;
  if (!rec.ok) {
    rec.logs = {
      restore: tail(restoreLog, 20) || restoreErr.slice(-2000),
      ...(daemon ? { daemon: tail(daemon.logFile, 20) + (daemon.stderr() ? `\n[stderr]\n${daemon.stderr().slice(-2000)}` : '') } : {}),
      work,
    };
  } else if (!ctx.keep) {
    rmSync(work, { recursive: true, force: true });
  }
  return rec;
}

/** What `judge` fills in. */
export interface Judged {
  results: BenchResult[];
  failures: string[];
  wsMs?: number;
  restoreToWsMs?: number;
  workloadMs?: number;
  hotFirst100Pct?: number;
  hotFirst1sPct?: number;
}

/**
 * The workload is the judge: one ok=1 line per process, or the run failed. Reads the result
 * file and derives the times (`t0RtMs`: wall-clock ms when criu restore started).
 */
export function judge(rec: Judged, w: BenchWorkload, t0RtMs: number): void {
  rec.results = readBenchResults(w.resultFile);
  if (rec.results.length !== w.nprocs) rec.failures.push(`${rec.results.length} of ${w.nprocs} result lines`);
  for (const x of rec.results) {
    if (!x.ok) rec.failures.push(`${x.role} ${x.pid}: NOT VERIFIED (bad pages ${x.bad}, bad in working set ${x.wsBad})`);
  }
  const owners = rec.results.filter((x) => x.role !== 'parent');
  if (owners.length) {
    rec.wsMs = Math.max(...owners.map((x) => x.wsMs));
    if (owners.every((x) => x.t0RtNs > 0n)) {
      rec.restoreToWsMs = Math.max(...owners.map((x) => Number(x.t0RtNs / 1000n) / 1e3 - t0RtMs + x.wsMs));
    }
    rec.workloadMs = Math.max(...rec.results.map((x) => x.totalMs));
  }
  const hot = rec.results.find((x) => x.mode === 'hotset' && x.ops100.length);
  if (hot && hot.steadyOps > 0) {
    rec.hotFirst100Pct = (hot.ops100[0]! / (hot.steadyOps * 0.1)) * 100;
    rec.hotFirst1sPct = (hot.ops100.slice(0, 10).reduce((a, b) => a + b, 0) / hot.steadyOps) * 100;
  }
}

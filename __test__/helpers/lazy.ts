/**
 * End-to-end runs: dump the workload, serve it with `lazy-restore serve` (the CLI, as a user
 * would run it) or with `criu lazy-pages`, restore it with `criu restore --lazy-pages` in the
 * foreground, and collect what every restored process found when it verified its memory.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { dump, startCriuLazyPages, startRestore } from '../../src/harness/criu.js';
import { exited, tail } from '../../src/harness/process.js';
import { descendants, killPids } from '../../src/harness/procs.js';
import { killWorkload, PACKAGE_ROOT, readResults, startWorkload, waitGone, type RunningWorkload, type WorkloadOptions, type WorkloadResult } from '../../src/harness/workload.js';

export const CLI = join(PACKAGE_ROOT, 'bin', 'lazy-restore.js');

export interface Dumped {
  w: RunningWorkload;
  imgs: string;
}

/** Starts the workload, dumps it (plain dump: pages on disk) and waits for the tree to go. */
export async function dumpWorkload(opts: WorkloadOptions): Promise<Dumped> {
  const w = await startWorkload(opts);
  const imgs = join(opts.dir, 'images');
  try {
    await dump({ pid: w.pid, dir: imgs });
  } catch (e) {
    killWorkload(w);
    throw e;
  }
  await waitGone(w);
  return { w, imgs };
}

export function killGroup(child: ChildProcess): void {
  try {
    if (child.pid) process.kill(-child.pid, 'SIGKILL');
  } catch {
    /* gone */
  }
}

export interface Daemon {
  child: ChildProcess;
  logFile: string;
  reportFile: string;
  exit: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  stderr: () => string;
}

/** `lazy-restore serve` as a subprocess; resolves once its socket listens (--status-fd). */
export async function startOurDaemon(imgs: string, workDir: string, extra: string[] = []): Promise<Daemon> {
  mkdirSync(workDir, { recursive: true });
  const logFile = join(workDir, 'serve.log');
  const reportFile = join(workDir, 'report.json');
  const child = spawn(
    process.execPath,
    [CLI, 'serve', '-D', imgs, '-W', workDir, '-o', 'serve.log', '-v4', '--status-fd', '3', '--report', 'report.json', ...extra],
    { stdio: ['ignore', 'pipe', 'pipe', 'pipe'] },
  );
  let err = '';
  child.stderr!.on('data', (d: Buffer) => (err += d.toString()));
  child.stdout!.resume();
  const exit = exited(child);
  await new Promise<void>((resolve, reject) => {
    const t = setTimeout(() => reject(new Error(`lazy-restore serve not listening after 30 s: ${err}`)), 30_000);
    (child.stdio[3] as NodeJS.ReadableStream).once('data', () => (clearTimeout(t), resolve()));
    void exit.then((x) => (clearTimeout(t), reject(new Error(`lazy-restore serve exited (${x.code ?? x.signal}) before listening: ${err}${tail(logFile)}`))));
  });
  return { child, logFile, reportFile, exit, stderr: () => err };
}

export interface RestoreOutcome {
  results: WorkloadResult[];
  restoreExit: { code: number | null; signal: NodeJS.Signals | null; logTail: string };
  daemonExit: { code: number | null; signal: NodeJS.Signals | null };
  /** ms from starting criu restore to criu restore's exit (root verified and exited). */
  restoreToDoneMs: number;
  report?: any;
}

/** Within `timeoutMs` or everything is killed and the promise rejects (tests never hang). */
export async function restoreLazily(
  d: Dumped,
  daemon: { child: ChildProcess; exit: Promise<{ code: number | null; signal: NodeJS.Signals | null }>; reportFile?: string },
  workDir: string,
  timeoutMs = 120_000,
  opts: { pidNamespace?: boolean; trigger?: boolean } = {},
): Promise<RestoreOutcome> {
  if (opts.trigger !== false) writeFileSync(d.w.triggerFile, '');
  const t0 = performance.now();
  const restore = startRestore({ dir: d.imgs, workDir, pidNamespace: opts.pidNamespace });
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => {
      // The restored tree lives in sessions of its own: kill it by ancestry, then criu.
      if (restore.child.pid) killPids(descendants(restore.child.pid));
      restore.child.kill('SIGKILL');
      daemon.child.kill('SIGKILL');
      reject(new Error(`restore did not finish in ${timeoutMs} ms; restore log:\n${tail(restore.logFile)}`));
    }, timeoutMs);
  });
  try {
    const restoreExit = await Promise.race([restore.done, timeout]);
    const restoreToDoneMs = performance.now() - t0;
    const daemonExit = await Promise.race([daemon.exit, timeout]);
    const report = daemon.reportFile && existsSync(daemon.reportFile) ? JSON.parse(readFileSync(daemon.reportFile, 'utf8')) : undefined;
    return { results: readResults(d.w.resultFile), restoreExit, daemonExit, restoreToDoneMs, report };
  } finally {
    clearTimeout(timer);
  }
}

/** CRIU's own daemon on the same images, for comparison runs. */
export async function startCriuDaemon(imgs: string, workDir: string, verbosity = 4): Promise<Daemon> {
  mkdirSync(workDir, { recursive: true });
  const { child, logFile } = await startCriuLazyPages({ dir: imgs, workDir, verbosity });
  return { child, logFile, reportFile: '', exit: exited(child), stderr: () => '' };
}

/**
 * Driving the `criu` binary: checks that it is there and usable, dumps (plain, lazy,
 * pre-dump + incremental), and starts foreground restores and CRIU's own lazy-pages daemon
 * (for side-by-side comparisons).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { run, runChecked, tail } from './process.js';

export class CriuUnavailableError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'CriuUnavailableError';
  }
}

const INSTALL_HINT = 'install it with: sudo bash scripts/install-deps.sh (CRIU 4.1 from Debian trixie)';

/** The installed CRIU version ("4.1.1"), or a CriuUnavailableError saying how to fix it. */
export async function criuVersion(): Promise<string> {
  let r;
  try {
    r = await run('criu', ['--version'], { timeoutMs: 10_000 });
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') throw new CriuUnavailableError(`criu is not installed; ${INSTALL_HINT}`);
    throw e;
  }
  const m = /Version:\s*(\S+)/.exec(r.stdout);
  if (r.code !== 0 || !m?.[1]) throw new CriuUnavailableError(`'criu --version' failed: ${r.stderr || r.stdout}`);
  const major = Number(m[1].split('.')[0]);
  if (major < 4) throw new CriuUnavailableError(`criu ${m[1]} is too old (needs 4.x); ${INSTALL_HINT}`);
  return m[1];
}

/** Throws unless we are root and criu 4.x is installed. */
export async function requireCriu(): Promise<string> {
  if (process.getuid?.() !== 0) throw new CriuUnavailableError('checkpoint/restore needs root (criu dump/restore, userfaultfd)');
  return criuVersion();
}

export interface DumpOptions {
  pid: number;
  dir: string;
  /** `criu dump --lazy-pages`: lazy pages stay in the source (needs a page server). */
  lazy?: { address: string; port: number };
  /** `--track-mem` (soft-dirty tracking for pre-dump chains). */
  trackMem?: boolean;
  /** `--prev-images-dir` (relative to dir, as criu wants it). */
  prevImagesDir?: string;
  /** `criu pre-dump` instead of dump: the task keeps running (needs soft-dirty tracking). */
  preDump?: boolean;
  /** `--leave-running`: dump, then let the task go on. */
  leaveRunning?: boolean;
  timeoutMs?: number;
}

/** Runs criu dump / pre-dump; the log is `<dir>/dump.log` (or pre-dump.log). */
export async function dump(o: DumpOptions): Promise<void> {
  mkdirSync(o.dir, { recursive: true });
  const log = o.preDump ? 'pre-dump.log' : 'dump.log';
  const args = [o.preDump ? 'pre-dump' : 'dump', '-t', String(o.pid), '-D', o.dir, '-o', log, '-v4'];
  if (o.trackMem) args.push('--track-mem');
  if (o.leaveRunning) args.push('--leave-running');
  if (o.prevImagesDir) args.push('--prev-images-dir', o.prevImagesDir);
  if (o.lazy) args.push('--lazy-pages', '--address', o.lazy.address, '--port', String(o.lazy.port));
  await runChecked('criu', args, { timeoutMs: o.timeoutMs ?? 120_000, logFile: join(o.dir, log) });
}

export interface RestoreProcess {
  child: ChildProcess;
  logFile: string;
  /** Resolves with criu restore's exit once the restored tree's root has exited. */
  done: Promise<{ code: number | null; signal: NodeJS.Signals | null; logTail: string }>;
}

/**
 * `criu restore --lazy-pages` in the foreground: criu stays the restored root's parent and
 * exits after it, so whoever starts it reaps the tree (PID 1 here does not).
 */
export function startRestore(o: {
  dir: string;
  workDir?: string;
  lazy?: boolean;
  logName?: string;
  /**
   * Restore as the init of a new pid namespace (`unshare --pid --fork --mount-proc`): needed
   * when the dumped pids are still taken (a lazy dump keeps its task as a zombie) and for
   * several restores of one image set at once.
   */
  pidNamespace?: boolean;
}): RestoreProcess {
  const logName = o.logName ?? 'restore.log';
  const args = ['restore', '-D', o.dir, '-o', logName, '-v4'];
  if (o.workDir) args.push('-W', o.workDir);
  if (o.lazy !== false) args.push('--lazy-pages');
  const child = o.pidNamespace
    ? spawn('unshare', ['--pid', '--fork', '--mount-proc', 'criu', ...args], { stdio: ['ignore', 'ignore', 'pipe'] })
    : spawn('criu', args, { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr?.on('data', (d: Buffer) => (stderr += d.toString()));
  const logFile = join(o.workDir ?? o.dir, logName);
  const done = new Promise<{ code: number | null; signal: NodeJS.Signals | null; logTail: string }>((resolve) => {
    child.once('error', (e) => resolve({ code: null, signal: null, logTail: String(e) }));
    child.once('exit', (code, signal) => resolve({ code, signal, logTail: tail(logFile) || stderr }));
  });
  return { child, logFile, done };
}

/** CRIU's own daemon, for comparisons. Resolves once its socket is listening (status-fd). */
export async function startCriuLazyPages(o: {
  dir: string;
  workDir?: string;
  /** criu -v level; at 4 it logs a line per fault, which slows it down: use 2 when timing. */
  verbosity?: number;
}): Promise<{ child: ChildProcess; logFile: string }> {
  const args = ['lazy-pages', '-D', o.dir, '-o', 'lazy-pages.log', `-v${o.verbosity ?? 4}`, '--status-fd', '3'];
  if (o.workDir) args.push('-W', o.workDir);
  const child = spawn('criu', args, { stdio: ['ignore', 'ignore', 'pipe', 'pipe'] });
  const status = child.stdio[3] as NodeJS.ReadableStream;
  await new Promise<void>((resolve, reject) => {
    const t = setTimeout(() => reject(new Error('criu lazy-pages did not report ready in 30 s')), 30_000);
    status.once('data', () => (clearTimeout(t), resolve()));
    child.once('exit', (c) => (clearTimeout(t), reject(new Error(`criu lazy-pages exited (${c}) before it listened`))));
  });
  return { child, logFile: join(o.workDir ?? o.dir, 'lazy-pages.log') };
}

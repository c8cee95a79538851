/**
 * The bundled workload (workloads/lr-workload.c): build it, start it under lr-reaper, wait
 * until its memory is filled, trigger its post-restore check and read what it found.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { closeSync, existsSync, mkdirSync, openSync, readFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { exited, runChecked } from './process.js';

/** The package root (this file is src/harness/*.ts or dist/harness/*.js). */
export const PACKAGE_ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');
export const WORKLOAD_DIR = join(PACKAGE_ROOT, 'workloads');
export const WORKLOAD_BIN = join(WORKLOAD_DIR, 'bin', 'lr-workload');
export const REAPER_BIN = join(WORKLOAD_DIR, 'bin', 'lr-reaper');

/** Builds the workload binaries with make when they are missing or older than the source. */
export async function buildWorkloads(): Promise<void> {
  await runChecked('make', ['-s', '-C', WORKLOAD_DIR], { timeoutMs: 120_000 });
  for (const bin of [WORKLOAD_BIN, REAPER_BIN]) {
    if (!existsSync(bin)) throw new Error(`building the workloads did not produce ${bin}`);
  }
}

export interface WorkloadOptions {
  /** Private anonymous memory of the root, MiB (children get half each). */
  mb: number;
  holes?: boolean;
  threads?: number;
  children?: number;
  /** After the trigger: fork, mremap, munmap, MADV_DONTNEED, then verify. */
  postOps?: boolean;
  /** Scratch dir for the log, trigger and result files. */
  dir: string;
}

export interface RunningWorkload {
  /** Pid of the workload's root process (the one to dump). */
  pid: number;
  /** Number of processes in the tree. */
  nprocs: number;
  /** The reaper above the tree; exits when the whole tree has. */
  reaper: ChildProcess;
  /** Creating this file makes every process of the (restored) tree verify its memory. */
  triggerFile: string;
  resultFile: string;
  logFile: string;
  opts: WorkloadOptions;
}

/** Starts the workload in its own session under lr-reaper and waits for "ready". */
export async function startWorkload(opts: WorkloadOptions, timeoutMs = 60_000): Promise<RunningWorkload> {
  mkdirSync(opts.dir, { recursive: true });
  const logFile = join(opts.dir, 'workload.log');
  const triggerFile = join(opts.dir, 'trigger');
  const resultFile = join(opts.dir, 'result');
  const args = [WORKLOAD_BIN, '--mb', String(opts.mb), '--trigger', triggerFile, '--result', resultFile];
  if (opts.holes) args.push('--holes');
  if (opts.threads) args.push('--threads', String(opts.threads));
  if (opts.children) args.push('--children', String(opts.children));
  if (opts.postOps) args.push('--post-ops');
  const out = openSync(logFile, 'a');
  // detached: a session of its own, so criu dumps exactly this tree and no terminal.
  const reaper = spawn(REAPER_BIN, args, { stdio: ['ignore', out, out], detached: true });
  closeSync(out);
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const text = existsSync(logFile) ? readFileSync(logFile, 'utf8') : '';
    const m = /^ready (\d+) (\d+)$/m.exec(text);
    if (m) {
      return { pid: Number(m[1]), nprocs: Number(m[2]), reaper, triggerFile, resultFile, logFile, opts };
    }
    if (reaper.exitCode !== null || reaper.signalCode !== null) {
      throw new Error(`workload exited before it was ready (${reaper.exitCode ?? reaper.signalCode}):\n${text}`);
    }
    if (Date.now() > deadline) {
      reaper.kill('SIGKILL');
      throw new Error(`workload not ready after ${timeoutMs} ms:\n${text}`);
    }
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** Waits for the reaper (and so the whole original tree) to exit, e.g. after criu dump killed it. */
export async function waitGone(w: RunningWorkload, timeoutMs = 30_000): Promise<void> {
  let timer: NodeJS.Timeout | undefined;
  await Promise.race([
    exited(w.reaper),
    new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`workload ${w.pid} still running ${timeoutMs} ms after dump`)), timeoutMs);
    }),
  ]).finally(() => clearTimeout(timer));
}

/** One line of the workload's result file. */
export interface WorkloadResult {
  role: 'root' | 'child' | 'forked';
  index: number;
  pid: number;
  pages: number;
  bad: number;
  zeroBad: number;
  ms: number;
  ok: boolean;
}

export function readResults(file: string): WorkloadResult[] {
  if (!existsSync(file)) return [];
  return readFileSync(file, 'utf8')
    .split('\n')
    .filter((l) => l.trim())
    .map((line) => {
      const kv = Object.fromEntries(line.split(' ').map((p) => p.split('=') as [string, string]));
      return {
        role: kv.role as WorkloadResult['role'],
        index: Number(kv.index),
        pid: Number(kv.pid),
        pages: Number(kv.pages),
        bad: Number(kv.bad),
        zeroBad: Number(kv.zero_bad),
        ms: Number(kv.ms),
        ok: kv.ok === '1',
      };
    });
}

/** The memory regions each process of the workload filled (from its "region" lines). */
export function workloadRegions(w: RunningWorkload): Map<number, { start: bigint; pages: number }[]> {
  const out = new Map<number, { start: bigint; pages: number }[]>();
  for (const m of readFileSync(w.logFile, 'utf8').matchAll(/^region (\d+) \d+ 0x([0-9a-f]+) (\d+)$/gm)) {
    const pid = Number(m[1]);
    if (!out.has(pid)) out.set(pid, []);
    out.get(pid)!.push({ start: BigInt(`0x${m[2]}`), pages: Number(m[3]) });
  }
  return out;
}

/** Kills the workload tree (its own session/process group) and the reaper above it. */
export function killWorkload(w: RunningWorkload): void {
  for (const target of [-w.pid, w.reaper.pid]) {
    try {
      if (target) process.kill(target, 'SIGKILL');
    } catch {
      /* already gone */
    }
  }
}

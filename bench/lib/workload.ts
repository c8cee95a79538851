/**
 * The benchmark workload (workloads/lr-bench.c): start it under lr-reaper, dump it once, and
 * read the lines each restored process appends to its result file.
 */
import { spawn } from 'node:child_process';
import { closeSync, existsSync, mkdirSync, openSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { dump } from '../../src/harness/criu.js';
import { killTree, track } from '../../src/harness/procs.js';
import { REAPER_BIN, WORKLOAD_DIR, waitGone, type RunningWorkload } from '../../src/harness/workload.js';

export const BENCH_BIN = join(WORKLOAD_DIR, 'bin', 'lr-bench');

export const WORKLOADS = ['seq', 'random', 'hotset', 'tree'] as const;
export type WorkloadName = (typeof WORKLOADS)[number];

export interface BenchWorkload extends RunningWorkload {
  mode: WorkloadName;
  /** Every pid of the tree (root first): a restore brings the same pids back. */
  pids: number[];
}

/** `cmd args` inside network namespace `net` (only the network namespace: `ip netns exec`
 * would also unshare the mount namespace, and criu would then dump a foreign one). */
export function inNet(net: string | undefined, cmd: string, args: string[]): [string, string[]] {
  return net ? ['nsenter', [`--net=/run/netns/${net}`, '--', cmd, ...args]] : [cmd, args];
}

/**
 * Starts lr-bench in its own session under lr-reaper; resolves once it printed "ready". With
 * `net`, in that network namespace (criu dump must run in the task's network namespace, and a
 * dump's page server must listen on an address that exists only there).
 */
export async function startBench(
  o: { mb: number; mode: WorkloadName; percent?: number; seed?: number; dir: string; net?: string },
  timeoutMs = 120_000,
): Promise<BenchWorkload> {
  mkdirSync(o.dir, { recursive: true });
  const logFile = join(o.dir, 'workload.log');
  const triggerFile = join(o.dir, 'trigger');
  const resultFile = join(o.dir, 'result');
  const args = [BENCH_BIN, '--mb', String(o.mb), '--mode', o.mode, '--trigger', triggerFile, '--result', resultFile];
  if (o.percent !== undefined) args.push('--percent', String(o.percent));
  if (o.seed !== undefined) args.push('--seed', String(o.seed));
  const [cmd, argv] = inNet(o.net, REAPER_BIN, args);
  const out = openSync(logFile, 'a');
  // detached: a session of its own, so criu dumps exactly this tree and no terminal (nsenter
  // execs lr-reaper, so the child is the reaper either way).
  const reaper = track(spawn(cmd, argv, { stdio: ['ignore', out, out], detached: true }));
  closeSync(out);
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const text = existsSync(logFile) ? readFileSync(logFile, 'utf8') : '';
    const ready = /^ready (\d+) (\d+)$/m.exec(text);
    const pids = /^pids ([\d ]+)$/m.exec(text);
    if (ready && pids) {
      return {
        pid: Number(ready[1]),
        nprocs: Number(ready[2]),
        pids: pids[1]!.trim().split(/\s+/).map(Number),
        mode: o.mode,
        reaper,
        triggerFile,
        resultFile,
        logFile,
        opts: { mb: o.mb, dir: o.dir },
      };
    }
    if (reaper.exitCode !== null || reaper.signalCode !== null) {
      throw new Error(`lr-bench${o.net ? ` (in netns ${o.net})` : ''} exited before it was ready (${reaper.exitCode ?? reaper.signalCode}):\n${text}`);
    }
    if (Date.now() > deadline) {
      killTree(reaper);
      throw new Error(`lr-bench${o.net ? ` (in netns ${o.net})` : ''} not ready after ${timeoutMs} ms:\n${text}`);
    }
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** Starts the workload, dumps it once (plain dump: pages on disk), waits for the tree to go. */
export async function dumpBench(o: { mb: number; mode: WorkloadName; dir: string }): Promise<{ w: BenchWorkload; imgs: string; dumpMs: number }> {
  const w = await startBench(o);
  const imgs = join(o.dir, 'images');
  const t0 = performance.now();
  try {
    await dump({ pid: w.pid, dir: imgs, timeoutMs: 600_000 });
  } catch (e) {
    killTree(w.reaper); // lr-bench leads a session of its own: kill by ancestry
    throw e;
  }
  const dumpMs = performance.now() - t0;
  await waitGone(w);
  return { w, imgs, dumpMs };
}

/** One line of lr-bench's result file. */
export interface BenchResult {
  mode: string;
  role: 'root' | 'parent' | 'child';
  pid: number;
  pages: number;
  bad: number;
  wsBad: number;
  wsMs: number;
  totalMs: number;
  steadyOps: number;
  ops100: number[];
  /** CLOCK_REALTIME ns when the process saw the trigger (origin of wsMs and totalMs). Not
   * monotonic: criu restores the tree into a time namespace whose monotonic clock continues
   * from the dump. */
  t0RtNs: bigint;
  ok: boolean;
}

export function readBenchResults(file: string): BenchResult[] {
  if (!existsSync(file)) return [];
  return readFileSync(file, 'utf8')
    .split('\n')
    .filter((l) => l.trim())
    .map((line) => {
      const kv = Object.fromEntries(line.trim().split(' ').map((p) => p.split('=') as [string, string]));
      return {
        mode: String(kv.mode),
        role: kv.role as BenchResult['role'],
        pid: Number(kv.pid),
        pages: Number(kv.pages),
        bad: Number(kv.bad),
        wsBad: Number(kv.ws_bad),
        wsMs: Number(kv.ws_ms),
        totalMs: Number(kv.total_ms),
        steadyOps: Number(kv.steady_ops),
        ops100: !kv.ops100 || kv.ops100 === '-' ? [] : kv.ops100.split(',').map(Number),
        t0RtNs: /^\d+$/.test(kv.t0_rt_ns ?? '') ? BigInt(kv.t0_rt_ns!) : 0n,
        ok: kv.ok === '1',
      };
    });
}

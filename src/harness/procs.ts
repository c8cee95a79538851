/** Finding and killing processes the benchmark started, including the restored trees, which
 * live in sessions of their own (so killing a process group does not reach them). */
import type { ChildProcess } from 'node:child_process';
import { existsSync, readFileSync, readdirSync } from 'node:fs';

/** SIGKILL to the child's process group (everything here is spawned detached). */
export function killGroup(child: ChildProcess | undefined): void {
  if (!child?.pid) return;
  try {
    process.kill(-child.pid, 'SIGKILL');
  } catch {
    /* gone */
  }
}

/** Every live descendant of `root` (by parent pid, from /proc). */
export function descendants(root: number): number[] {
  const parent = new Map<number, number>();
  for (const e of readdirSync('/proc')) {
    if (!/^\d+$/.test(e)) continue;
    try {
      const stat = readFileSync(`/proc/${e}/stat`, 'utf8');
      // pid (comm) state ppid ...: comm may contain spaces and parentheses
      const ppid = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
      parent.set(Number(e), ppid);
    } catch {
      /* gone meanwhile */
    }
  }
  const out: number[] = [];
  const walk = (p: number) => {
    for (const [c, pp] of parent) if (pp === p) (out.push(c), walk(c));
  };
  walk(root);
  return out;
}

export function killPids(pids: number[]): void {
  for (const p of pids) {
    try {
      process.kill(p, 'SIGKILL');
    } catch {
      /* gone */
    }
  }
}

export function alive(pid: number): boolean {
  // A zombie still holds its pid: a restore of the same tree would fail on it.
  return existsSync(`/proc/${pid}`);
}

export function cmdline(pid: number): string {
  try {
    return readFileSync(`/proc/${pid}/cmdline`, 'utf8').replace(/\0/g, ' ');
  } catch {
    return '';
  }
}

/** Kills `root`'s descendants, then `root`'s process group. */
export function killTree(child: ChildProcess | undefined): void {
  if (!child?.pid) return;
  killPids(descendants(child.pid));
  killGroup(child);
}

// ---- everything started, for timeouts, Ctrl-C and exit ----

const live = new Set<ChildProcess>();

export function track(child: ChildProcess): ChildProcess {
  live.add(child);
  child.once('exit', () => live.delete(child));
  return child;
}

/** Kills everything still running that this module started (timeouts, Ctrl-C, exit). */
export function killAll(extraPids: number[] = []): void {
  killPids(extraPids.filter((p) => cmdline(p).includes('lr-bench')));
  for (const c of live) killTree(c); // the restored tree lives in sessions of its own
}


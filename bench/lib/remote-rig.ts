/**
 * The emulated link (scripts/netns-link.sh): bring it up if it is not, take it down at the end
 * only if we brought it up, and measure what the link does (bench/lib/remote-probe.ts) before
 * the runs, so the table's numbers can be read against the link's RTT and raw rate.
 */
import { execFileSync, spawn } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { exited } from '../../src/harness/process.js';
import { killGroup, track } from '../../src/harness/procs.js';
import { PACKAGE_ROOT } from '../../src/harness/workload.js';
import { freePort } from '../../__test__/helpers/remote.js';
import { inNet, type Link } from './remote.js';

const SCRIPT = join(PACKAGE_ROOT, 'scripts', 'netns-link.sh');
const PROBE = join(PACKAGE_ROOT, 'bench', 'lib', 'remote-probe.ts');

/** The rig is up: both namespaces, the delay proxy alive, the band-0 qdisc in place. */
export function rigIsUp(): boolean {
  if (!existsSync('/run/netns/lr-src') || !existsSync('/run/netns/lr-dst')) return false;
  try {
    const pid = Number(readFileSync('/run/lr-netns-proxy.pid', 'utf8'));
    process.kill(pid, 0);
    const st = readFileSync(`/proc/${pid}/stat`, 'utf8');
    if (st.slice(st.lastIndexOf(')') + 2).startsWith('Z')) return false;
  } catch {
    return false;
  }
  return rigQdisc() !== '';
}

/** One line: what sits under the tbf of the source's egress. */
export function rigQdisc(): string {
  try {
    const out = execFileSync('tc', ['-n', 'lr-src', 'qdisc', 'show', 'dev', 'lr-veth-s'], { encoding: 'utf8' });
    return out
      .trim()
      .split('\n')
      .map((l) => l.replace(/\s+refcnt \d+/, '').trim())
      .join('; ');
  } catch {
    return '';
  }
}

/** Brings the rig up unless it is; returns whether we did (then we take it down). */
export function rigUp(): boolean {
  if (rigIsUp()) return false;
  execFileSync('bash', [SCRIPT, 'up'], { stdio: ['ignore', 'inherit', 'inherit'], timeout: 300_000 });
  if (!rigIsUp()) throw new Error(`scripts/netns-link.sh up did not bring the rig up (see ${SCRIPT} status)`);
  return true;
}

export function rigDown(): void {
  try {
    execFileSync('bash', [SCRIPT, 'down'], { stdio: ['ignore', 'ignore', 'inherit'], timeout: 60_000 });
  } catch {
    /* reported by the script */
  }
}

export interface LinkProbe {
  link: string;
  path: string;
  rttP50Us: number;
  rttP99Us: number;
  rttMinUs: number;
  bulkMiB: number;
  bulkMs: number;
  bulkMBps: number;
  loadedRttP50Us: number;
  loadedRttP99Us: number;
  error?: string;
}

/**
 * Ping-pong and bulk rate from the destination side to the source side's listen address,
 * through the path the runs use (the delay proxy on the emulated link).
 */
export async function probeLink(link: Link, bulkMiB = 64): Promise<LinkProbe> {
  const port = link.listenPort || (await freePort());
  const node = (args: string[]) => [process.execPath, ['--import', 'tsx', PROBE, ...args]] as const;
  const [sc, sa] = node(['server', link.listenAddr, String(port)]);
  const [c1, a1] = inNet(link.srcNet, sc, [...sa]);
  const srv = track(spawn(c1, a1, { cwd: PACKAGE_ROOT, stdio: ['ignore', 'ignore', 'pipe'], detached: true }));
  let srvErr = '';
  srv.stderr!.on('data', (d: Buffer) => (srvErr += d.toString()));
  const path = `${link.connectAddr}:${link.connectPort || port}${link.srcNet ? ` (delay proxy -> ${link.listenAddr}:${port})` : ''}`;
  try {
    const deadline = Date.now() + 30_000;
    while (!srvErr.includes('listening')) {
      if (srv.exitCode !== null || Date.now() > deadline) throw new Error(`probe server did not listen: ${srvErr}`);
      await new Promise((r) => setTimeout(r, 20));
    }
    const [cc, ca] = node(['client', link.connectAddr, String(link.connectPort || port), '50', String(bulkMiB)]);
    const [c2, a2] = inNet(link.dstNet, cc, [...ca]);
    const cli = track(spawn(c2, a2, { cwd: PACKAGE_ROOT, stdio: ['ignore', 'pipe', 'pipe'], detached: true }));
    let out = '';
    let err = '';
    cli.stdout!.on('data', (d: Buffer) => (out += d.toString()));
    cli.stderr!.on('data', (d: Buffer) => (err += d.toString()));
    const t = setTimeout(() => killGroup(cli), 60_000);
    const x = await exited(cli);
    clearTimeout(t);
    if (x.code !== 0) throw new Error(`probe client exited ${x.code ?? x.signal}: ${err.trim()}`);
    return { link: link.name, path, ...JSON.parse(out) };
  } catch (e) {
    return { link: link.name, path, error: (e as Error).message } as LinkProbe;
  } finally {
    killGroup(srv);
  }
}

export function probeLine(p: LinkProbe): string {
  if (p.error) return `${p.link} ${p.path}: probe failed: ${p.error}`;
  return (
    `${p.link} ${p.path}: RTT p50 ${p.rttP50Us.toFixed(0)} µs, p99 ${p.rttP99Us.toFixed(0)} µs; ` +
    `bulk ${p.bulkMiB} MiB at ${p.bulkMBps.toFixed(0)} MiB/s (${((p.bulkMBps * 8 * 2 ** 20) / 1e9).toFixed(2)} Gbit/s); ` +
    `RTT during bulk (unmarked) p50 ${p.loadedRttP50Us.toFixed(0)} µs, p99 ${p.loadedRttP99Us.toFixed(0)} µs`
  );
}

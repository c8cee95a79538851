/**
 * One remote restore of an lr-bench tree: the pages come over TCP from a page server on the
 * "source" side, the daemon and `criu restore` run on the "destination" side.
 *
 *   criu-ps/criu-daemon  criu dump --lazy-pages (its page server)  ->  criu lazy-pages --page-server
 *   criu-ps/ours         criu dump --lazy-pages (its page server)  ->  lazy-restore serve --page-server
 *   lazy-ps/ours         lazy-restore page-server (plain dump)     ->  lazy-restore serve --source lazy://
 *
 * A lazy dump serves its pages once and keeps the dumped tree as zombies holding their pids,
 * so every criu-ps run starts a fresh workload and dumps it, and every restore (all variants
 * alike) runs as the init of a new pid namespace (`unshare --pid --fork --mount-proc criu
 * restore`), in the foreground under lr-reaper (PID 1 here reaps nothing).
 *
 * Links: `loopback` (everything in this network namespace, 127.0.0.1), or `emulated`, the
 * rig of scripts/netns-link.sh: the source side (workload, criu dump, our page server) runs
 * in netns lr-src listening on 10.200.0.1:7070, the destination side (daemon, criu restore)
 * in lr-dst and connects to the delay proxy on 127.0.0.1:7071. Processes enter a namespace
 * with `nsenter --net` only: `ip netns exec` would also give them a mount namespace of their
 * own, and criu would then try to dump a foreign mount namespace.
 *
 * Everything started here is detached (a process group of its own) and registered with
 * src/harness/procs.ts, so a timeout or Ctrl-C (killAll) kills it all.
 */
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { exited, tail } from '../../src/harness/process.js';
import { descendants, killGroup, killPids, killTree, track } from '../../src/harness/procs.js';
import { REAPER_BIN } from '../../src/harness/workload.js';
import { freePort, raisePipeMax } from '../../__test__/helpers/remote.js';
import { CLI, daemonStats, judge, type DaemonStats } from './runner.js';
import { inNet, startBench, type BenchResult, type BenchWorkload, type WorkloadName } from './workload.js';
export { inNet } from './workload.js';

export const REMOTE_VARIANTS = ['criu-ps/criu-daemon', 'criu-ps/ours', 'lazy-ps/ours'] as const;
export type RemoteVariant = (typeof REMOTE_VARIANTS)[number];
export const BASELINE: RemoteVariant = 'criu-ps/criu-daemon';

export const LINKS = ['loopback', 'emulated'] as const;
export type LinkName = (typeof LINKS)[number];

export interface Link {
  name: LinkName;
  /** Network namespaces of the source and destination sides (undefined: this one). */
  srcNet?: string;
  dstNet?: string;
  /** Where the page server listens (source side); port 0: a free one per run. */
  listenAddr: string;
  listenPort: number;
  /** Where the destination connects (the delay proxy on the emulated link). */
  connectAddr: string;
  connectPort: number;
  /** Link rate, bit/s, for the utilisation column (undefined: loopback, no such thing). */
  rateBps?: number;
}

export const LINK_DEFS: Record<LinkName, Link> = {
  loopback: { name: 'loopback', listenAddr: '127.0.0.1', listenPort: 0, connectAddr: '127.0.0.1', connectPort: 0 },
  emulated: {
    name: 'emulated',
    srcNet: 'lr-src',
    dstNet: 'lr-dst',
    listenAddr: '10.200.0.1',
    listenPort: 7070,
    connectAddr: '127.0.0.1',
    connectPort: 7071,
    rateBps: 1e9,
  },
};

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

function withTimeout<T>(p: Promise<T>, ms: number): Promise<T | 'timeout'> {
  let t: NodeJS.Timeout | undefined;
  return Promise.race([p, new Promise<'timeout'>((r) => (t = setTimeout(() => r('timeout'), ms)))]).finally(() => clearTimeout(t));
}

type Exit = { code: number | null; signal: NodeJS.Signals | null };

// ---- the source side ------------------------------------------------------------------

export interface Proc {
  child: ChildProcess;
  exit: Promise<Exit>;
  stderr: () => string;
  logFile?: string;
}

/** Spawns detached and tracked; fd 3 is a pipe for --status-fd. */
function spawnProc(net: string | undefined, cmd: string, args: string[], logFile?: string): Proc {
  const [c, a] = inNet(net, cmd, args);
  const child = track(spawn(c, a, { stdio: ['ignore', 'pipe', 'pipe', 'pipe'], detached: true }));
  let err = '';
  child.stderr!.on('data', (d: Buffer) => (err += d.toString()));
  child.stdout!.resume();
  child.once('error', (e) => (err += `spawn ${c}: ${e.message}\n`));
  return { child, exit: exited(child), stderr: () => err, logFile };
}

/** Resolves once `p` wrote its status byte on fd 3 (never probe a CRIU page server's port:
 * it accepts exactly one client). */
async function statusByte(p: Proc, what: string, timeoutMs: number): Promise<void> {
  const status = p.child.stdio[3] as NodeJS.ReadableStream;
  const ready = new Promise<'ready'>((r) => status.once('data', () => r('ready')));
  const r = await Promise.race([ready, p.exit, sleep(timeoutMs).then(() => 'timeout' as const)]);
  if (r === 'ready') return;
  killGroup(p.child);
  const detail = [p.stderr().trim(), p.logFile ? tail(p.logFile) : ''].filter(Boolean).join('\n');
  if (r === 'timeout') throw new Error(`${what}: not ready after ${timeoutMs / 1000} s\n${detail}`);
  throw new Error(`${what} exited (${r.code ?? r.signal}) before it was ready\n${detail}`);
}

export interface LazyDumped {
  w: BenchWorkload;
  imgs: string;
  /** criu dump, now CRIU's page server: exits 0 after the daemon fetched every page (CLOSE). */
  dumper: Proc;
  dumpMs: number;
  addr: string;
  port: number;
}

/**
 * A fresh lr-bench and `criu dump --lazy-pages --address A --port P`: resolves once its page
 * server listens (the images are written then). The tree stays as zombies until the dump ends.
 */
export async function lazyDumpBench(
  link: Link,
  o: { mb: number; mode: WorkloadName; dir: string; logLevel: number },
): Promise<LazyDumped> {
  raisePipeMax(); // CRIU's page server splices through 4 MiB pipes
  const w = await startBench({ ...o, net: link.srcNet }, 180_000);
  const imgs = join(o.dir, 'images');
  mkdirSync(imgs, { recursive: true });
  const port = link.listenPort || (await freePort());
  const logFile = join(imgs, 'dump.log');
  const args = ['dump', '-t', String(w.pid), '-D', imgs, '-o', 'dump.log', `-v${o.logLevel}`, '--lazy-pages', '--address', link.listenAddr, '--port', String(port), '--status-fd', '3'];
  const t0 = performance.now();
  const dumper = spawnProc(link.srcNet, 'criu', args, logFile);
  try {
    await statusByte(dumper, 'criu dump --lazy-pages', 120_000 + o.mb * 60);
  } catch (e) {
    killGroup(dumper.child);
    killTree(w.reaper);
    throw e;
  }
  return { w, imgs, dumper, dumpMs: performance.now() - t0, addr: link.connectAddr, port: link.connectPort || port };
}

export interface OurPageServer extends Proc {
  port: number;
}

/** `lazy-restore page-server -D imgs --address A --port P`; resolves once it listens. */
export async function startOurPageServer(link: Link, imgs: string): Promise<OurPageServer> {
  const port = link.listenPort || (await freePort());
  const p = spawnProc(link.srcNet, process.execPath, [CLI, 'page-server', '-D', imgs, '--address', link.listenAddr, '--port', String(port)]);
  const deadline = Date.now() + 60_000;
  for (;;) {
    const m = /listening on [^ ]+:(\d+):/.exec(p.stderr());
    if (m) return { ...p, port: Number(m[1]) };
    if (p.child.exitCode !== null || p.child.signalCode !== null) throw new Error(`lazy-restore page-server exited (${p.child.exitCode ?? p.child.signalCode}) before listening: ${p.stderr()}`);
    if (Date.now() > deadline) {
      killGroup(p.child);
      throw new Error(`lazy-restore page-server not listening after 60 s: ${p.stderr()}`);
    }
    await sleep(10);
  }
}

export interface PageServerStats {
  connections: number;
  pagesOnDemand: number;
  pagesStreamed: number;
  bytesSent: number;
}

/** SIGTERM, then its closing line: "closed after N connections (...): X pages on demand, Y streamed, Z bytes sent". */
export async function stopOurPageServer(ps: OurPageServer): Promise<PageServerStats | undefined> {
  try {
    process.kill(ps.child.pid!, 'SIGTERM');
  } catch {
    /* gone */
  }
  if ((await withTimeout(ps.exit, 10_000)) === 'timeout') killGroup(ps.child);
  const m = /closed after (\d+) connections[^:]*: (\d+) pages on demand, (\d+) streamed, (\d+) bytes sent/.exec(ps.stderr());
  if (!m) return undefined;
  return { connections: Number(m[1]), pagesOnDemand: Number(m[2]), pagesStreamed: Number(m[3]), bytesSent: Number(m[4]) };
}

// ---- the destination side -------------------------------------------------------------

export interface Daemon extends Proc {
  reportFile?: string;
}

/** `criu lazy-pages --page-server` or `lazy-restore serve` with a remote source; resolves once its socket listens. */
async function startDaemon(
  variant: RemoteVariant,
  link: Link,
  imgs: string,
  work: string,
  logLevel: number,
  addr: string,
  port: number,
): Promise<Daemon> {
  if (variant === 'criu-ps/criu-daemon') {
    const args = ['lazy-pages', '--page-server', '--address', addr, '--port', String(port), '-D', imgs, '-W', work, '-o', 'lazy-pages.log', `-v${logLevel}`, '--status-fd', '3'];
    const d = spawnProc(link.dstNet, 'criu', args, join(work, 'lazy-pages.log'));
    await statusByte(d, 'criu lazy-pages --page-server', 30_000);
    return d;
  }
  const source = variant === 'criu-ps/ours' ? ['--page-server', '--address', addr, '--port', String(port)] : ['--source', `lazy://${addr}:${port}`];
  const args = [CLI, 'serve', '-D', imgs, '-W', work, '-o', 'serve.log', `-v${logLevel}`, '--status-fd', '3', '--report', 'report.json', ...source];
  const d: Daemon = { ...spawnProc(link.dstNet, process.execPath, args, join(work, 'serve.log')), reportFile: join(work, 'report.json') };
  await statusByte(d, `lazy-restore serve ${source[0]}`, 30_000);
  return d;
}

// ---- tc counters of the emulated link -------------------------------------------------

export interface BandCounters {
  /** Band 0 (qdisc 11: under class 10:1, SO_PRIORITY 6/7) and band 1 (12:), source egress. */
  urgentPkts: number;
  urgentBytes: number;
  bulkPkts: number;
  bulkBytes: number;
}

/** Band counters of the source's egress (lr-veth-s), or undefined when the rig has no bands. */
export function readBands(link: Link): BandCounters | undefined {
  if (!link.srcNet) return undefined;
  try {
    const out = execFileSync('tc', ['-j', '-s', '-n', link.srcNet, 'qdisc', 'show', 'dev', 'lr-veth-s'], { encoding: 'utf8' });
    const qs = JSON.parse(out) as { handle: string; bytes: number; packets: number }[];
    const q11 = qs.find((q) => q.handle === '11:');
    const q12 = qs.find((q) => q.handle === '12:');
    if (!q11 || !q12) return undefined;
    return { urgentPkts: q11.packets, urgentBytes: q11.bytes, bulkPkts: q12.packets, bulkBytes: q12.bytes };
  } catch {
    return undefined;
  }
}

function bandsDelta(a: BandCounters | undefined, b: BandCounters | undefined): BandCounters | undefined {
  if (!a || !b) return undefined;
  return { urgentPkts: b.urgentPkts - a.urgentPkts, urgentBytes: b.urgentBytes - a.urgentBytes, bulkPkts: b.bulkPkts - a.bulkPkts, bulkBytes: b.bulkBytes - a.bulkBytes };
}

// ---- one run --------------------------------------------------------------------------

export interface RemoteRun {
  variant: RemoteVariant;
  link: LinkName;
  rep: number;
  ok: boolean;
  failures: string[];
  /** criu dump --lazy-pages until its page server listened (criu-ps), ms. Not in any total. */
  dumpMs?: number;
  /** criu restore start -> its exit (every process verified all its memory and exited), ms. */
  restoreMs?: number;
  /** criu restore start -> the slowest process has its working set (wall clock), ms. */
  restoreToWsMs?: number;
  /** Time to working set as the workload measured it (from the moment it ran again), ms. */
  wsMs?: number;
  workloadMs?: number;
  hotFirst100Pct?: number;
  /** criu restore start -> the daemon exited (every page in), ms: the one full-transfer time
   * CRIU's daemon has too. */
  allInMs?: number;
  /** Our daemon's full transfer, report timeline.doneUs - finishedUs, ms. */
  transferMs?: number;
  daemon?: DaemonStats;
  /** Lazy pages the daemon had to bring in (report plannedPages). */
  plannedPages?: number;
  /** bytesCopied / transfer time / link rate (emulated link only). */
  linkUtil?: number;
  pageServer?: PageServerStats;
  /** Source egress qdisc counters during the run (emulated link). */
  bands?: BandCounters;
  restoreExit?: Exit;
  daemonExit?: Exit;
  dumpExit?: Exit;
  results: BenchResult[];
  logs?: Record<string, string>;
}

export interface RemoteContext {
  link: Link;
  mb: number;
  mode: WorkloadName;
  /** Where this run's files go (workload, images, work dir). */
  dir: string;
  logLevel: number;
  timeoutMs: number;
  keep: boolean;
  /** lazy-ps: the plain dump served by our page server. */
  plain?: { w: BenchWorkload; imgs: string };
}


/**
 * One restore with `variant` over `link`. Never throws for a failed restore (that is a FAILED
 * record, with log tails); throws only when the source side cannot be set up at all.
 */
export async function runRemote(ctx: RemoteContext, variant: RemoteVariant, rep: number): Promise<RemoteRun> {
  const { link } = ctx;
  const rec: RemoteRun = { variant, link: link.name, rep, ok: false, failures: [], results: [] };
  rmSync(ctx.dir, { recursive: true, force: true });
  mkdirSync(ctx.dir, { recursive: true });
  const work = join(ctx.dir, 'work');
  mkdirSync(work, { recursive: true });

  // The source side.
  let w: BenchWorkload;
  let imgs: string;
  let addr: string;
  let port: number;
  let dumped: LazyDumped | undefined;
  let ps: OurPageServer | undefined;
  if (variant.startsWith('criu-ps/')) {
    dumped = await lazyDumpBench(link, { mb: ctx.mb, mode: ctx.mode, dir: join(ctx.dir, 'src'), logLevel: ctx.logLevel });
    ({ w, imgs, addr, port } = dumped);
    rec.dumpMs = dumped.dumpMs;
  } else {
    if (!ctx.plain) throw new Error('lazy-ps needs the plain dump');
    ({ w, imgs } = ctx.plain);
    ps = await startOurPageServer(link, imgs);
    addr = link.connectAddr;
    port = link.connectPort || ps.port;
  }
  rmSync(w.resultFile, { force: true });
  rmSync(w.triggerFile, { force: true });

  const cleanupSource = async () => {
    if (dumped) {
      // After the daemon has every page it CLOSEs the session and criu dump exits 0; the
      // zombies go with it and lr-reaper above them exits.
      const d = await withTimeout(dumped.dumper.exit, 30_000);
      if (d === 'timeout') {
        rec.failures.push('criu dump (the page server) still running 30 s after the restore; killed');
        killGroup(dumped.dumper.child);
      } else {
        rec.dumpExit = d;
        if (d.code !== 0) rec.failures.push(`criu dump (the page server) exited ${d.code ?? d.signal}`);
      }
      if ((await withTimeout(exited(dumped.w.reaper), 10_000)) === 'timeout') killTree(dumped.w.reaper);
    }
    if (ps) rec.pageServer = await stopOurPageServer(ps);
  };

  let daemon: Daemon | undefined;
  try {
    daemon = await startDaemon(variant, link, imgs, work, ctx.logLevel, addr, port);
  } catch (e) {
    rec.failures.push(`daemon did not start: ${(e as Error).message.split('\n')[0]}`);
    rec.logs = { daemon: (e as Error).message, ...(dumped ? { dump: tail(dumped.dumper.logFile!, 20) } : {}) };
    if (dumped) {
      killGroup(dumped.dumper.child);
      killTree(dumped.w.reaper);
    }
    if (ps) rec.pageServer = await stopOurPageServer(ps);
    return rec;
  }

  writeFileSync(w.triggerFile, ''); // the restored tree runs its benchmark at once
  const bands0 = readBands(link);
  const restoreLog = join(work, 'restore.log');
  const criuArgs = ['criu', 'restore', '-D', imgs, '-W', work, '-o', 'restore.log', `-v${ctx.logLevel}`, '--lazy-pages'];
  // lr-reaper -> [nsenter --net=lr-dst ->] unshare -> criu restore (init of the new pid namespace)
  const [c, a] = inNet(link.dstNet, 'unshare', ['--pid', '--fork', '--mount-proc', ...criuArgs]);
  const t0 = performance.now();
  const t0RtMs = performance.timeOrigin + t0;
  const restore = track(spawn(REAPER_BIN, [c, ...a], { stdio: ['ignore', 'ignore', 'pipe'], detached: true }));
  let restoreErr = '';
  restore.stderr!.on('data', (d: Buffer) => (restoreErr += d.toString()));
  const restoreDone = exited(restore);
  let daemonAt: number | undefined;
  void daemon.exit.then(() => (daemonAt = performance.now()));
  const r = await withTimeout(restoreDone, ctx.timeoutMs);
  if (r === 'timeout') {
    rec.failures.push(`TIMEOUT: criu restore not done after ${(ctx.timeoutMs / 1000).toFixed(0)} s; killed everything`);
    // The restored tree lives in a pid namespace whose init is criu restore: kill by ancestry.
    if (restore.pid) killPids(descendants(restore.pid));
    killGroup(daemon.child);
    if (dumped) {
      killGroup(dumped.dumper.child);
      killTree(dumped.w.reaper);
    }
    if ((await withTimeout(restoreDone, 10_000)) === 'timeout') killGroup(restore);
  } else {
    rec.restoreMs = performance.now() - t0;
    rec.restoreExit = r;
    if (r.code !== 0) rec.failures.push(`criu restore exited ${r.code ?? r.signal}`);
  }

  let d = await withTimeout(daemon.exit, 60_000);
  if (d === 'timeout') {
    rec.failures.push('daemon still running 60 s after the restored tree exited; killed');
    killGroup(daemon.child);
    d = await withTimeout(daemon.exit, 5_000);
  }
  if (d !== 'timeout') {
    rec.daemonExit = d;
    if (d.code !== 0) rec.failures.push(`daemon exited ${d.code ?? d.signal}`);
    if (daemonAt !== undefined && r !== 'timeout') rec.allInMs = daemonAt - t0;
  }
  await cleanupSource();
  rec.bands = bandsDelta(bands0, readBands(link));

  if (daemon.reportFile && existsSync(daemon.reportFile)) {
    try {
      const report = JSON.parse(readFileSync(daemon.reportFile, 'utf8'));
      rec.daemon = daemonStats(report);
      rec.plannedPages = report.plannedPages ?? report.totals?.pagesPlanned;
    } catch (e) {
      rec.failures.push(`unreadable report: ${(e as Error).message}`);
    }
  }
  if (rec.daemon?.doneUs !== undefined && rec.daemon.finishedUs !== undefined) {
    rec.transferMs = (rec.daemon.doneUs - rec.daemon.finishedUs) / 1e3;
    if (link.rateBps && rec.daemon.transferGBps !== undefined) rec.linkUtil = (rec.daemon.transferGBps * 8e9) / link.rateBps;
  }

  judge(rec, w, t0RtMs);

  rec.ok = rec.failures.length === 0;
  if (!rec.ok) {
    rec.logs = {
      restore: tail(restoreLog, 20) || restoreErr.slice(-2000),
      daemon: (daemon.logFile ? tail(daemon.logFile, 20) : '') + (daemon.stderr() ? `\n[stderr]\n${daemon.stderr().slice(-2000)}` : ''),
      ...(dumped ? { dump: tail(dumped.dumper.logFile!, 20) } : {}),
      ...(ps ? { pageServer: ps.stderr().slice(-2000) } : {}),
      dir: ctx.dir,
    };
  } else if (!ctx.keep) {
    rmSync(ctx.dir, { recursive: true, force: true });
  }
  return rec;
}

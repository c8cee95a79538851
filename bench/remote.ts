/**
 * Remote rows of the end-to-end benchmark: the same workload restored with its lazy pages
 * coming over TCP, three ways side by side in one run, interleaved per repetition (machines
 * here are shared and noisy: only ratios within one run mean anything).
 *
 *   npm run bench:remote -- [--quick] [--reps N] [--sizes 256,2048] [--workloads random,hotset,tree]
 *                           [--links loopback,emulated] [--variants criu-ps/criu-daemon,...]
 *                           [--out FILE] [--dir DIR] [--keep] [--verbose-logs] [--timeout S]
 *
 *   criu-ps/criu-daemon  criu dump --lazy-pages (CRIU's page server) + criu lazy-pages --page-server
 *   criu-ps/ours         criu dump --lazy-pages (CRIU's page server) + lazy-restore serve --page-server
 *   lazy-ps/ours         plain criu dump once + lazy-restore page-server + lazy-restore serve --source lazy://
 *
 * A lazy dump serves its pages once, so each criu-ps run dumps a fresh lr-bench; lazy-ps
 * restores one plain dump per workload x size. Every restore runs `criu restore --lazy-pages`
 * in the foreground as the init of a new pid namespace. The restored processes time
 * themselves and verify every word; a run whose processes did not all report ok=1 is FAILED
 * and shown as such, never as a time. See bench/README.md ("Remote rows") for the columns.
 */
import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { cpus, loadavg, release, totalmem } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { requireCriu } from '../src/harness/criu.js';
import { run } from '../src/harness/process.js';
import { killAll } from '../src/harness/procs.js';
import { PACKAGE_ROOT, buildWorkloads } from '../src/harness/workload.js';
import { CLI, CLI_BUILT } from './lib/runner.js';
import { LINKS, LINK_DEFS, REMOTE_VARIANTS, runRemote, type LinkName, type RemoteRun, type RemoteVariant } from './lib/remote.js';
import { probeLine, probeLink, rigDown, rigQdisc, rigUp, type LinkProbe } from './lib/remote-rig.js';
import { remoteTable, summarizeRemote, type RemoteSummary } from './lib/remote-summary.js';
import { BENCH_BIN, WORKLOADS, dumpBench, type BenchWorkload, type WorkloadName } from './lib/workload.js';
import { list, parseBenchArgs } from './lib/options.js';

const USAGE = `usage: npm run bench:remote -- [options]
  --quick             256 MiB only, 2 reps, random+hotset+tree
  --reps N            repetitions per variant (default 3; 1 for >= 1024 MiB on the emulated
                      link, where one criu-daemon restore of 2 GiB takes minutes; quick 2)
  --sizes LIST        MiB of the workload, comma separated (default 256,2048)
  --workloads LIST    of ${WORKLOADS.join(',')} (default random,hotset,tree)
  --links LIST        of ${LINKS.join(',')} (default both): loopback = 127.0.0.1 in this
                      netns; emulated = scripts/netns-link.sh (1 Gbit/s, ~1.1 ms RTT), brought
                      up if it is not (and down again at the end)
  --variants LIST     of ${REMOTE_VARIANTS.join(',')} (default all)
  --out FILE          JSON with every run and the medians (default bench/results/remote-<time>.json)
  --dir DIR           scratch root for images and logs (default /dev/shm: tmpfs)
  --keep              keep images and logs of every run
  --verbose-logs      criu and daemons at -v4 (slower: criu logs every fault)
  --timeout S         per restore (default loopback 60 + 0.12 per MiB, emulated 120 + 0.4 per MiB)`;

interface Options {
  quick: boolean;
  reps?: number;
  sizes: number[];
  workloads: WorkloadName[];
  links: LinkName[];
  variants: RemoteVariant[];
  out: string;
  dir: string;
  keep: boolean;
  logLevel: number;
  timeoutS?: number;
}

function parseOptions(argv: string[]): Options {
  const c = parseBenchArgs(argv, USAGE, 'remote', ['workloads', 'links', 'variants'] as const);
  return {
    ...c,
    workloads: list(c.lists.workloads ?? 'random,hotset,tree', WORKLOADS, 'workload'),
    links: list(c.lists.links ?? LINKS.join(','), LINKS, 'link'),
    variants: list(c.lists.variants ?? REMOTE_VARIANTS.join(','), REMOTE_VARIANTS, 'variant'),
  };
}

const log = (s: string) => process.stderr.write(`bench:remote: ${s}\n`);

function repsFor(o: Options, link: LinkName, mb: number): number {
  if (o.reps !== undefined) return o.reps;
  return link === 'emulated' && mb >= 1024 ? 1 : 3;
}

function timeoutMsFor(o: Options, link: LinkName, mb: number): number {
  if (o.timeoutS !== undefined) return o.timeoutS * 1000;
  return (link === 'emulated' ? 120 + 0.4 * mb : 60 + 0.12 * mb) * 1000;
}

/** Our CLI can run the remote variants: built, and serve/page-server know the flags. */
async function checkOurCli(): Promise<string | undefined> {
  if (!existsSync(CLI_BUILT)) return 'lazy-restore is not built (no dist/cli.js): npm run build';
  const serve = await run(process.execPath, [CLI, 'serve', '--help'], { timeoutMs: 60_000 });
  for (const f of ['--page-server', '--source', '--report', '--status-fd']) {
    if (!new RegExp(`${f}\\b`).test(serve.stdout)) return `lazy-restore serve has no ${f}`;
  }
  const ps = await run(process.execPath, [CLI, 'page-server', '--help'], { timeoutMs: 60_000 });
  if (ps.code !== 0) return `lazy-restore page-server --help failed: ${(ps.stderr || ps.stdout).trim().split('\n')[0]}`;
  return undefined;
}

function dirBytes(dir: string): number {
  let n = 0;
  for (const f of readdirSync(dir)) n += statSync(join(dir, f)).size;
  return n;
}

function sh(cmd: string, args: string[]): string {
  try {
    return execFileSync(cmd, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }).trim();
  } catch {
    return '';
  }
}

function runLine(r: RemoteRun): string {
  if (!r.ok) return `FAILED: ${r.failures.join('; ')}`;
  const d = r.daemon;
  const parts = [
    `${r.restoreMs!.toFixed(0)} ms`,
    r.restoreToWsMs !== undefined ? `restore→ws ${r.restoreToWsMs.toFixed(0)} ms` : '',
    d?.faultP50Us !== undefined ? `fault p50/p99 ${d.faultP50Us.toFixed(0)}/${d.faultP99Us?.toFixed(0)} µs` : '',
    r.transferMs !== undefined ? `xfer ${r.transferMs.toFixed(0)} ms` : '',
    r.linkUtil !== undefined ? `util ${(r.linkUtil * 100).toFixed(0)} %` : '',
    r.allInMs !== undefined ? `all in ${r.allInMs.toFixed(0)} ms` : '',
    r.pageServer ? `ps ${r.pageServer.pagesOnDemand} on demand / ${r.pageServer.pagesStreamed} streamed${r.plannedPages ? ` of ${r.plannedPages} needed` : ''}` : '',
    r.bands ? `wire ${((r.bands.urgentBytes + r.bands.bulkBytes) / 2 ** 20).toFixed(0)} MiB, band0 ${r.bands.urgentPkts} pkts, band1 ${r.bands.bulkPkts}` : '',
  ];
  return parts.filter(Boolean).join(', ');
}

interface Group {
  link: LinkName;
  workload: WorkloadName;
  mb: number;
  reps: number;
  timeoutMs: number;
  plainImagesBytes?: number;
  plainDumpMs?: number;
  error?: string;
  summaries: RemoteSummary[];
  runs: RemoteRun[];
}

async function main(): Promise<number> {
  let o: Options;
  try {
    o = parseOptions(process.argv.slice(2));
  } catch (e) {
    console.error(`bench:remote: ${(e as Error).message}\n${USAGE}`);
    return 2;
  }
  const criu = await requireCriu();
  await buildWorkloads();
  if (!existsSync(BENCH_BIN)) throw new Error(`building the workloads did not produce ${BENCH_BIN}`);
  const why = await checkOurCli();
  if (why) throw new Error(why);

  const started = new Date();
  const doc = {
    schema: 'lazy-restore/bench-remote@1',
    startedAt: started.toISOString(),
    finishedAt: undefined as string | undefined,
    host: {
      kernel: release(),
      cpus: cpus().length,
      cpuModel: cpus()[0]?.model,
      memBytes: totalmem(),
      criu,
      node: process.version,
      commit: sh('git', ['-C', PACKAGE_ROOT, 'rev-parse', '--short', 'HEAD']),
      dirty: sh('git', ['-C', PACKAGE_ROOT, 'status', '--porcelain', '--untracked-files=no']) !== '',
      loadavgStart: loadavg(),
      loadavgEnd: undefined as number[] | undefined,
    },
    options: { ...o },
    rig: undefined as { qdisc: string; broughtUp: boolean } | undefined,
    probes: [] as LinkProbe[],
    groups: [] as Group[],
  };
  const save = () => {
    mkdirSync(dirname(o.out), { recursive: true });
    writeFileSync(o.out, JSON.stringify(doc, (_k, v) => (typeof v === 'bigint' ? v.toString() : v), 2) + '\n');
  };

  mkdirSync(o.dir, { recursive: true });
  const root = mkdtempSync(join(o.dir, 'lr-bench-remote-'));
  let broughtUp = false;
  const cleanup = () => {
    killAll();
    if (!o.keep) rmSync(root, { recursive: true, force: true });
    if (broughtUp) rigDown();
  };
  const onSignal = (sig: NodeJS.Signals) => {
    log(`${sig}: killing everything started, partial results in ${o.out}`);
    save();
    cleanup();
    process.exit(130);
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  log(`criu ${criu}, kernel ${release()}, ${cpus().length} cpus; scratch ${root}; links ${o.links.join(', ')}; variants ${o.variants.join(', ')}`);

  try {
    if (o.links.includes('emulated')) {
      broughtUp = rigUp();
      doc.rig = { qdisc: rigQdisc(), broughtUp };
      log(`emulated link: ${broughtUp ? 'brought up' : 'already up'}; lr-src egress: ${doc.rig.qdisc}`);
    }
    for (const link of o.links) {
      // What the link itself does, once, before its rows.
      const p = await probeLink(LINK_DEFS[link]);
      doc.probes.push(p);
      const line = probeLine(p);
      log(`link ${line}`);
      console.log(`link ${line}`);
    }

    for (const link of o.links) {
      for (const mb of o.sizes) {
        for (const workload of o.workloads) {
          const reps = repsFor(o, link, mb);
          const timeoutMs = timeoutMsFor(o, link, mb);
          const group: Group = { link, workload, mb, reps, timeoutMs, summaries: [], runs: [] };
          doc.groups.push(group);
          const gdir = join(root, `${link}-${workload}-${mb}`);
          let plain: { w: BenchWorkload; imgs: string } | undefined;
          try {
            if (o.variants.includes('lazy-ps/ours')) {
              log(`${link} ${workload} ${mb} MiB: plain dump for lazy-ps`);
              const d = await dumpBench({ mb, mode: workload, dir: join(gdir, 'plain') });
              plain = { w: d.w, imgs: d.imgs };
              group.plainDumpMs = d.dumpMs;
              group.plainImagesBytes = dirBytes(d.imgs);
            }
            for (let rep = 0; rep < reps; rep++) {
              const vs = o.variants;
              const order = vs.map((_, i) => vs[(i + rep) % vs.length]!); // rotate: no variant always first
              for (const v of order) {
                const ctx = { link: LINK_DEFS[link], mb, mode: workload, dir: join(gdir, `${v.replace('/', '-')}-${rep}`), logLevel: o.logLevel, timeoutMs, keep: o.keep, plain };
                let r: RemoteRun;
                try {
                  r = await runRemote(ctx, v, rep);
                } catch (e) {
                  // The source side could not be set up (workload, lazy dump, page server).
                  r = { variant: v, link, rep, ok: false, failures: [`source side: ${(e as Error).message.split('\n')[0]}`], results: [], logs: { source: (e as Error).message } };
                  killAll();
                }
                group.runs.push(r);
                log(`  ${link} ${workload} ${mb} MiB rep ${rep + 1}/${reps} ${v}: ${runLine(r)}`);
                save();
              }
            }
          } catch (e) {
            group.error = (e as Error).message;
            log(`!! ${link} ${workload} ${mb} MiB aborted: ${group.error}`);
            killAll();
          }
          group.summaries = summarizeRemote(o.variants, group.runs);
          const title =
            `== ${link}, ${workload}, ${mb} MiB, ${reps} rep${reps > 1 ? 's' : ''} interleaved` +
            (group.plainImagesBytes !== undefined ? ` (plain images ${(group.plainImagesBytes / 2 ** 20).toFixed(0)} MiB on ${o.dir})` : '') +
            ' ==';
          console.log(`\n${title}`);
          if (group.error) console.log(`!! ABORTED: ${group.error}`);
          console.log(remoteTable(group.summaries, { link, hotset: workload === 'hotset' }));
          save();
          if (!o.keep) rmSync(gdir, { recursive: true, force: true });
        }
      }
    }
  } finally {
    cleanup();
  }

  doc.finishedAt = new Date().toISOString();
  doc.host.loadavgEnd = loadavg();
  save();
  const elapsed = (Date.now() - started.getTime()) / 1000;
  console.log(`\nall runs and medians: ${o.out} (${elapsed.toFixed(0)} s; load ${doc.host.loadavgStart.map((x) => x.toFixed(1)).join('/')} at start)`);
  const failed = doc.groups.some((g) => g.error || g.summaries.some((s) => s.status === 'failed'));
  if (failed) console.log('!! some runs FAILED (see above): their times are not in the medians');
  return failed ? 1 : 0;
}

process.on('exit', () => killAll());
main().then(
  (code) => process.exit(code),
  (e) => {
    console.error(`bench:remote: ${(e as Error).stack ?? e}`);
    killAll();
    process.exit(1);
  },
);

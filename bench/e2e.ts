/**
 * End-to-end benchmark: the same CRIU images restored by several variants side by side, in
 * one run, interleaved per repetition (machines here are shared and noisy: only ratios
 * within one run mean anything).
 *
 *   npm run bench -- [--quick] [--reps N] [--sizes 256,2048] [--workloads random,hotset,...]
 *                    [--variants criu-daemon,ours,...] [--out FILE] [--dir DIR] [--keep]
 *                    [--verbose-logs] [--timeout S]
 *
 * For each workload x size: start lr-bench under lr-reaper, `criu dump` it once (plain dump,
 * pages on tmpfs), then for each repetition restore it once per variant (order rotated per
 * repetition). The restored processes time themselves and verify every word; a run whose
 * processes did not all report ok=1 is FAILED and shown as such, never as a time.
 * See bench/README.md for the columns.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { cpus, loadavg, release, totalmem } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { requireCriu } from '../src/harness/criu.js';
import { run } from '../src/harness/process.js';
import { PACKAGE_ROOT, buildWorkloads } from '../src/harness/workload.js';
import {
  CLI,
  CLI_BUILT,
  NotAvailable,
  VARIANTS,
  VARIANT_DEFS,
  killAll,
  runOnce,
  type RunRecord,
  type VariantName,
} from './lib/runner.js';
import { summarize, table, type VariantSummary } from './lib/summary.js';
import { BENCH_BIN, WORKLOADS, dumpBench, type BenchWorkload, type WorkloadName } from './lib/workload.js';
import { list, parseBenchArgs } from './lib/options.js';

const USAGE = `usage: npm run bench -- [options]
  --remote            the remote rows instead (pages over TCP; same as npm run bench:remote,
                      which takes the options below plus --links: see its --help)
  --quick             256 MiB only, 2 reps, random+hotset+tree (a few minutes at most)
  --reps N            repetitions per variant (default 5; quick 2)
  --sizes LIST        MiB of the workload, comma separated (default 256,2048)
  --workloads LIST    of ${WORKLOADS.join(',')} (default all)
  --variants LIST     of ${VARIANTS.join(',')} (default all)
  --out FILE          JSON with every run and the medians (default bench/results/e2e-<time>.json)
  --dir DIR           scratch root for images and logs (default /dev/shm: tmpfs)
  --keep              keep images and logs of every run
  --verbose-logs      criu and daemons at -v4 (slower: criu logs every fault)
  --timeout S         per restore (default 60 + 0.12 per MiB)`;

interface Options {
  quick: boolean;
  reps: number;
  sizes: number[];
  workloads: WorkloadName[];
  variants: VariantName[];
  out: string;
  dir: string;
  keep: boolean;
  logLevel: number;
  timeoutS?: number;
}

function parseOptions(argv: string[]): Options {
  const c = parseBenchArgs(argv, USAGE, 'e2e', ['workloads', 'variants'] as const);
  return {
    ...c,
    reps: c.reps ?? 5,
    workloads: list(c.lists.workloads ?? (c.quick ? 'random,hotset,tree' : WORKLOADS.join(',')), WORKLOADS, 'workload'),
    variants: list(c.lists.variants ?? VARIANTS.join(','), VARIANTS, 'variant'),
  };
}

const log = (s: string) => process.stderr.write(`bench: ${s}\n`);

/** Which `lazy-restore serve` variants this build can run, and why not the others. */
async function checkOurCli(variants: VariantName[]): Promise<Map<VariantName, string>> {
  const na = new Map<VariantName, string>();
  const ours = variants.filter((v) => VARIANT_DEFS[v].daemon === 'ours');
  if (!ours.length) return na;
  let reason: string | undefined;
  let help = '';
  if (!existsSync(CLI_BUILT)) reason = 'lazy-restore is not built (no dist/cli.js): npm run build';
  else {
    const r = await run(process.execPath, [CLI, 'serve', '--help'], { timeoutMs: 60_000 }).catch((e: Error) => ({ code: -1, stdout: '', stderr: e.message }));
    if (r.code !== 0) reason = `lazy-restore serve --help failed: ${(r.stderr || r.stdout).trim().split('\n')[0]}`;
    help = r.stdout;
  }
  for (const v of ours) {
    if (reason) na.set(v, reason);
    else {
      const missing = VARIANT_DEFS[v].needsFlags.filter((f) => !new RegExp(`${f}\\b`).test(help));
      if (missing.length) na.set(v, `lazy-restore serve has no ${missing.join(', ')} yet`);
    }
  }
  return na;
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

interface Group {
  workload: WorkloadName;
  mb: number;
  imagesBytes?: number;
  dumpMs?: number;
  error?: string;
  summaries: VariantSummary[];
  runs: RunRecord[];
}

async function main(): Promise<number> {
  const argv = process.argv.slice(2);
  if (argv.includes('--remote')) {
    // The remote rows live in bench/remote.ts (npm run bench:remote); run it in our place.
    const rest = argv.filter((a) => a !== '--remote');
    const r = spawnSync(process.execPath, [...process.execArgv, join(dirname(new URL(import.meta.url).pathname), 'remote.ts'), ...rest], { stdio: 'inherit' });
    return r.status ?? 1;
  }
  let o: Options;
  try {
    o = parseOptions(process.argv.slice(2));
  } catch (e) {
    console.error(`bench: ${(e as Error).message}\n${USAGE}`);
    return 2;
  }
  const criu = await requireCriu();
  await buildWorkloads();
  if (!existsSync(BENCH_BIN)) throw new Error(`building the workloads did not produce ${BENCH_BIN}`);
  const notAvailable = await checkOurCli(o.variants);
  for (const [v, why] of notAvailable) log(`${v}: n/a (${why})`);

  const started = new Date();
  const doc = {
    schema: 'lazy-restore/bench-e2e@1',
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
    notAvailable: Object.fromEntries(notAvailable),
    groups: [] as Group[],
  };
  const save = () => {
    mkdirSync(dirname(o.out), { recursive: true });
    writeFileSync(o.out, JSON.stringify(doc, (_k, v) => (typeof v === "bigint" ? v.toString() : v), 2) + "\n");
  };

  mkdirSync(o.dir, { recursive: true });
  const root = mkdtempSync(join(o.dir, 'lr-bench-'));
  let current: BenchWorkload | undefined;
  const onSignal = (sig: NodeJS.Signals) => {
    log(`${sig}: killing everything started, partial results in ${o.out}`);
    killAll(current?.pids ?? []);
    save();
    if (!o.keep) rmSync(root, { recursive: true, force: true });
    process.exit(130);
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  log(`criu ${criu}, kernel ${release()}, ${cpus().length} cpus; scratch ${root}; variants ${o.variants.join(', ')}; ${o.reps} reps`);

  try {
    for (const mb of o.sizes) {
      for (const workload of o.workloads) {
        const group: Group = { workload, mb, summaries: [], runs: [] };
        doc.groups.push(group);
        const gdir = join(root, `${workload}-${mb}`);
        const failedSetup = new Map<VariantName, string>();
        const timeoutMs = (o.timeoutS ?? 60 + 0.12 * mb) * 1000;
        try {
          log(`${workload} ${mb} MiB: starting lr-bench and dumping it`);
          const d = await dumpBench({ mb, mode: workload, dir: gdir });
          current = d.w;
          group.imagesBytes = dirBytes(d.imgs);
          group.dumpMs = d.dumpMs;
          log(`${workload} ${mb} MiB: ${d.w.nprocs} process(es), images ${(group.imagesBytes / 2 ** 20).toFixed(0)} MiB, dump ${d.dumpMs.toFixed(0)} ms`);
          const ctx = { imgs: d.imgs, w: d.w, workRoot: join(gdir, 'runs'), logLevel: o.logLevel, timeoutMs, keep: o.keep };
          const profile = join(gdir, 'profile');
          const active = () => o.variants.filter((v) => !notAvailable.has(v) && !failedSetup.has(v));

          // Untimed recording runs (ours-profile) before the timed ones.
          for (const v of active()) {
            const def = VARIANT_DEFS[v];
            if (!def.recordArgs) continue;
            try {
              const r = await runOnce(ctx, def, 0, 'record', def.recordArgs(profile));
              group.runs.push(r);
              if (!r.ok) failedSetup.set(v, `recording run FAILED: ${r.failures.join('; ')}`);
              else if (!existsSync(profile)) failedSetup.set(v, `recording run wrote no profile (${profile})`);
              log(`  record ${v}: ${r.ok ? `${r.restoreMs?.toFixed(0)} ms` : `FAILED: ${r.failures.join('; ')}`}`);
            } catch (e) {
              if (!(e instanceof NotAvailable)) throw e;
              notAvailable.set(v, e.message);
              log(`  ${v}: n/a (${e.message})`);
            }
          }

          for (let rep = 0; rep < o.reps; rep++) {
            const vs = active();
            const order = vs.map((_, i) => vs[(i + rep) % vs.length]!); // rotate: no variant always first
            for (const v of order) {
              if (notAvailable.has(v)) continue;
              const def = VARIANT_DEFS[v];
              try {
                const r = await runOnce(ctx, def, rep, 'timed', def.serveArgs(profile));
                group.runs.push(r);
                const extra = [
                  r.wsMs !== undefined ? `ws ${r.wsMs.toFixed(0)} ms` : '',
                  r.hotFirst100Pct !== undefined ? `hot 1st 100ms ${r.hotFirst100Pct.toFixed(0)}%` : '',
                ].filter(Boolean);
                log(`  rep ${rep + 1}/${o.reps} ${v}: ${r.ok ? `${r.restoreMs!.toFixed(0)} ms, ${extra.join(', ')}` : `FAILED: ${r.failures.join('; ')}`}`);
              } catch (e) {
                if (!(e instanceof NotAvailable)) throw e;
                notAvailable.set(v, e.message);
                log(`  ${v}: n/a (${e.message})`);
              }
            }
          }
        } catch (e) {
          group.error = (e as Error).message;
          log(`!! ${workload} ${mb} MiB aborted: ${group.error}`);
          killAll(current?.pids ?? []);
        }
        const naHere = new Map(notAvailable);
        group.summaries = summarize(o.variants, group.runs, naHere, failedSetup);
        const title = `== ${workload}, ${mb} MiB` +
          (group.imagesBytes !== undefined ? ` (images ${(group.imagesBytes / 2 ** 20).toFixed(0)} MiB on ${o.dir}, ${o.reps} reps interleaved)` : '') +
          ' ==';
        console.log(`\n${title}`);
        if (group.error) console.log(`!! ABORTED: ${group.error}`);
        console.log(table(group.summaries, { hotset: workload === 'hotset' }));
        save();
        current = undefined;
        if (!o.keep) rmSync(gdir, { recursive: true, force: true });
      }
    }
  } finally {
    killAll(current?.pids ?? []);
    if (!o.keep) rmSync(root, { recursive: true, force: true });
  }

  doc.finishedAt = new Date().toISOString();
  doc.host.loadavgEnd = loadavg();
  doc.notAvailable = Object.fromEntries(notAvailable);
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
    console.error(`bench: ${(e as Error).stack ?? e}`);
    killAll();
    process.exit(1);
  },
);

/**
 * `lazy-restore serve` against real `criu restore --lazy-pages` runs. Every restored process
 * checks every word of its memory and writes one result line; a restore is correct only when
 * every process of the tree reported ok.
 */
import test from 'ava';
import { connect } from 'node:net';
import { existsSync, mkdirSync, readFileSync, rmSync, statSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { requireCriu, startRestore } from '../src/harness/criu.js';
import { serve, type ServeError } from '../src/serve/serve.js';
import { buildWorkloads, killWorkload, readResults } from '../src/harness/workload.js';
import { tail } from '../src/harness/process.js';
import { dumpWorkload, restoreLazily, startOurDaemon } from './helpers/lazy.js';
import { scratch } from './helpers/scratch.js';

test.before(async () => {
  await requireCriu();
  await buildWorkloads();
});

test.serial('one process, 256 MiB with zero holes: every byte verified, report accounts for every page', async (t) => {
  const s = scratch('e2e-one');
  try {
    const d = await dumpWorkload({ mb: 256, holes: true, dir: s.dir });
    const work = join(s.dir, 'work');
    const daemon = await startOurDaemon(d.imgs, work);
    const r = await restoreLazily(d, daemon, work);
    t.is(r.daemonExit.code, 0, `daemon failed: ${daemon.stderr()}\n${tail(daemon.logFile)}`);
    t.is(r.results.length, 1, `results: ${JSON.stringify(r.results)}\nrestore: ${r.restoreExit.logTail}`);
    t.true(r.results[0]!.ok, `bad pages: ${r.results[0]!.bad}`);
    t.true(r.results[0]!.pages >= 256 * 256);
    const tot = r.report.totals;
    t.is(tot.pagesPending, 0);
    const accounted =
      tot.pagesFault + (tot.pagesReadahead ?? 0) + (tot.pagesPrefetch ?? 0) + tot.pagesBackground + tot.pagesPresent + tot.pagesDropped + tot.pagesOrphaned;
    t.is(accounted, tot.pagesPlanned, JSON.stringify(tot));
    t.true(tot.pagesFault > 0, 'the process faulted on some pages');
    t.true(r.report.faultLatency.count > 0);
    // Per process too: the per-task histograms add up to the overall one.
    t.is(r.report.tasks.reduce((n: number, x: any) => n + x.faultLatency.count, 0), r.report.faultLatency.count);
    t.true(r.report.tasks[0].faultLatency.p50Us > 0 && r.report.tasks[0].faultLatency.p50Us <= r.report.tasks[0].faultLatency.p99Us);
    t.log(`restore->done ${r.restoreToDoneMs.toFixed(0)} ms; fault p50 ${r.report.faultLatency.p50Us} µs, p99 ${r.report.faultLatency.p99Us} µs`);
  } finally {
    s.cleanup();
  }
});

test.serial('a tree: parent + 2 forked children + threads, each verifies its own memory', async (t) => {
  const s = scratch('e2e-tree');
  try {
    const d = await dumpWorkload({ mb: 64, holes: true, threads: 2, children: 2, dir: s.dir });
    const work = join(s.dir, 'work');
    const daemon = await startOurDaemon(d.imgs, work);
    const r = await restoreLazily(d, daemon, work);
    t.is(r.daemonExit.code, 0, tail(daemon.logFile));
    t.is(r.results.length, 3, JSON.stringify(r.results));
    t.deepEqual(r.results.map((x) => x.role).sort(), ['child', 'child', 'root']);
    t.true(r.results.every((x) => x.ok), JSON.stringify(r.results));
    t.is(r.report.tasks.filter((x: any) => x.childIndex === 0).length, 3);
  } finally {
    s.cleanup();
  }
});

test.serial('after restore: fork, mremap, munmap and MADV_DONTNEED while pages are missing', async (t) => {
  const s = scratch('e2e-ops');
  try {
    const d = await dumpWorkload({ mb: 128, holes: true, postOps: true, dir: s.dir });
    const work = join(s.dir, 'work');
    const daemon = await startOurDaemon(d.imgs, work);
    const r = await restoreLazily(d, daemon, work);
    t.is(r.daemonExit.code, 0, tail(daemon.logFile));
    t.deepEqual(r.results.map((x) => x.role).sort(), ['forked', 'root'], JSON.stringify(r.results));
    t.true(r.results.every((x) => x.ok), JSON.stringify(r.results));
    t.true(r.report.tasks.some((x: any) => x.childIndex > 0), 'the fork was served as a child task');
  } finally {
    s.cleanup();
  }
});

test.serial('two restores at once from two image dirs with two daemons', async (t) => {
  const a = scratch('e2e-two-a');
  const b = scratch('e2e-two-b');
  try {
    const [da, db] = await Promise.all([
      dumpWorkload({ mb: 64, holes: true, dir: a.dir }),
      dumpWorkload({ mb: 64, holes: true, threads: 1, dir: b.dir }),
    ]);
    const [wa, wb] = [join(a.dir, 'work'), join(b.dir, 'work')];
    const [xa, xb] = await Promise.all([startOurDaemon(da.imgs, wa), startOurDaemon(db.imgs, wb)]);
    const [ra, rb] = await Promise.all([restoreLazily(da, xa, wa), restoreLazily(db, xb, wb)]);
    for (const r of [ra, rb]) {
      t.is(r.daemonExit.code, 0);
      t.is(r.results.length, 1);
      t.true(r.results[0]!.ok);
    }
  } finally {
    a.cleanup();
    b.cleanup();
  }
});

test.serial('bad input: junk bytes on the socket -> clear error, non-zero exit, no hang', async (t) => {
  const s = scratch('e2e-junk');
  try {
    const d = await dumpWorkload({ mb: 8, dir: s.dir });
    const work = join(s.dir, 'work');
    const daemon = await startOurDaemon(d.imgs, work);
    const sock = connect(join(work, 'lazy-pages.socket'));
    sock.on('error', () => undefined); // the daemon may reset the connection when it gives up
    await new Promise((r) => sock.once('connect', r));
    sock.end(Buffer.from('this is not a pid message'));
    const exit = await Promise.race([daemon.exit, new Promise<never>((_, j) => setTimeout(() => j(new Error('daemon hung')), 20_000))]);
    t.not(exit.code, 0);
    t.regex(daemon.stderr() + tail(daemon.logFile), /HANDOFF_/);
    killWorkload(d.w);
  } finally {
    s.cleanup();
  }
});

test.serial('bad input: a pid that is not in pstree.img -> clear error, non-zero exit', async (t) => {
  const s = scratch('e2e-badpid');
  try {
    const d = await dumpWorkload({ mb: 8, dir: s.dir });
    const work = join(s.dir, 'work');
    const daemon = await startOurDaemon(d.imgs, work);
    const sock = connect(join(work, 'lazy-pages.socket'));
    sock.on('error', () => undefined);
    await new Promise((r) => sock.once('connect', r));
    const msg = Buffer.alloc(4);
    msg.writeInt32LE(-999999); // a zombie pid nobody dumped: nothing follows it
    sock.write(msg);
    const exit = await Promise.race([daemon.exit, new Promise<never>((_, j) => setTimeout(() => j(new Error('daemon hung')), 20_000))]);
    sock.destroy();
    t.not(exit.code, 0);
    t.regex(daemon.stderr(), /HANDOFF_UNKNOWN_PID/);
    t.regex(daemon.stderr(), /999999/);
  } finally {
    s.cleanup();
  }
});

test.serial('bad input: pages file truncated while serving -> error names file+offset, tree killed, no hang', async (t) => {
  const s = scratch('e2e-trunc');
  try {
    const d = await dumpWorkload({ mb: 512, dir: s.dir });
    const work = join(s.dir, 'work');
    mkdirSync(work, { recursive: true });
    const pages = join(d.imgs, 'pages-1.img');
    // Library API, so the cut lands right after criu's "restore finished" word: criu restore
    // itself reads the eager pages from the same file before that, and must not see the cut.
    const daemon = serve({ imagesDir: d.imgs, workDir: work });
    daemon.on('phase', (p) => {
      if (p === 'background') truncateSync(pages, Math.floor(statSync(pages).size / 4));
    });
    writeFileSync(d.w.triggerFile, '');
    const restore = startRestore({ dir: d.imgs, workDir: work });
    const bounded = <T>(p: Promise<T>) =>
      Promise.race([p, new Promise<never>((_, j) => setTimeout(() => j(new Error('hung')), 60_000))]);
    const err = (await bounded(daemon.done.then(() => undefined, (e: unknown) => e))) as ServeError | undefined;
    t.truthy(err, 'serving must fail');
    t.is(err!.code, 'SOURCE_SHORT_READ', err!.message);
    t.regex(err!.message, /pages-1\.img/);
    t.regex(err!.message, /offset|0x/);
    t.true(err!.killed.includes(d.w.pid), `killed ${err!.killed}`);
    await bounded(restore.done);
    t.false(existsSync(`/proc/${d.w.pid}/status`) && !readFileSync(`/proc/${d.w.pid}/status`, 'utf8').includes('zombie'));
    const results = readResults(d.w.resultFile);
    t.false(results.some((x) => x.ok), 'no process may report success on memory that was not restored');
    t.false(results.some((x) => x.bad > 0), 'the process was killed before it could run on zero pages');
    await daemon.close();
  } finally {
    s.cleanup();
  }
});

test.serial('policies and profiles end to end: criu policy, record a working set, replay it, stale profile ignored', async (t) => {
  const s = scratch('e2e-policy');
  try {
    const d = await dumpWorkload({ mb: 64, holes: true, dir: s.dir });
    const profile = join(s.dir, 'ws.json');
    const runWith = async (name: string, extra: string[]) => {
      rmSync(d.w.resultFile, { force: true });
      const work = join(s.dir, `work-${name}`);
      const daemon = await startOurDaemon(d.imgs, work, extra);
      const r = await restoreLazily(d, daemon, work);
      t.is(r.daemonExit.code, 0, `${name}: ${tail(daemon.logFile)}`);
      t.true(r.results.length === 1 && r.results[0]!.ok, `${name}: ${JSON.stringify(r.results)}`);
      return { r, log: readFileSync(daemon.logFile, 'utf8') };
    };
    const criu = await runWith('criu', ['--policy', 'criu']);
    t.is(criu.r.report.policy, 'criu');
    t.is(criu.r.report.totals.pagesReadahead ?? 0, 0, 'criu policy: one page per fault');

    const rec = await runWith('record', ['--record-profile', profile]);
    t.true(rec.r.report.profile.pages > 0, 'recorded a working set');
    const recorded = JSON.parse(readFileSync(profile, 'utf8'));
    t.is(recorded.tasks[0].pid, d.w.pid);

    const replay = await runWith('replay', ['--profile', profile]);
    t.is(replay.r.report.profile.used, profile);
    // Every recorded page is a lazy page of these images, so the whole profile was planned.
    // (Whether a page then arrives by prefetch or by the process's own fault is a race: both
    // start at criu's finished word, so pagesPrefetch may be 0 on a fast machine.)
    t.is(replay.r.report.profile.pages, rec.r.report.profile.pages);
    t.is(replay.r.report.profile.dropped, 0);

    // the same profile against other images: ignored, with a warning, and the restore still works
    const other = await dumpWorkload({ mb: 8, dir: join(s.dir, 'other') });
    const work = join(s.dir, 'work-stale');
    const daemon = await startOurDaemon(other.imgs, work, ['--profile', profile]);
    const r = await restoreLazily(other, daemon, work);
    t.is(r.daemonExit.code, 0);
    t.true(r.results[0]?.ok);
    t.regex(readFileSync(daemon.logFile, 'utf8'), /recorded on other images/);
  } finally {
    s.cleanup();
  }
});

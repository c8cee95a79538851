/**
 * Remote pages end to end: `lazy-restore serve` fetching from `lazy-restore page-server`
 * (--source lazy://) and from CRIU's own page server (--page-server), with real `criu restore
 * --lazy-pages` runs in which every restored process verifies all of its memory; and what
 * happens when the page server goes away.
 */
import test from 'ava';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { requireCriu } from '../src/harness/criu.js';
import { buildWorkloads, readResults } from '../src/harness/workload.js';
import { run, tail } from '../src/harness/process.js';
import { CLI, dumpWorkload, restoreLazily, startOurDaemon, type Daemon } from './helpers/lazy.js';
import { freePort, lazyDump, startOurPageServer } from './helpers/remote.js';
import { scratch } from './helpers/scratch.js';

test.before(async () => {
  await requireCriu();
  await buildWorkloads();
});

function daemonLog(d: Daemon): string {
  return `${d.stderr()}\n${tail(d.logFile)}`;
}

test.serial('--source lazy://: a tree restored from our page server verifies all its memory; faults went over the urgent connection', async (t) => {
  const s = scratch('remote-lazy');
  try {
    const d = await dumpWorkload({ mb: 96, holes: true, threads: 1, children: 2, dir: s.dir });
    const ps = await startOurPageServer(d.imgs);
    let planned = 0;
    try {
      const work = join(s.dir, 'work');
      const daemon = await startOurDaemon(d.imgs, work, ['--source', `lazy://127.0.0.1:${ps.port}`]);
      const r = await restoreLazily(d, daemon, work);
      planned = r.report.totals.pagesPlanned;
      // The report's account of the source agrees with what was installed.
      const src = r.report.source;
      t.regex(src.name, new RegExp(`^lazy-restore page-server 127\\.0\\.0\\.1:${ps.port}$`));
      t.true(src.urgentRequests > 0 && src.bulkRequests > 0, JSON.stringify(src));
      t.true(src.pageBytes >= planned * 4096 && src.pageBytes <= planned * 4096 * 1.5, JSON.stringify(src));
      t.is(src.reconnects, 0);
      t.is(r.daemonExit.code, 0, daemonLog(daemon));
      t.is(r.results.length, 3, JSON.stringify(r.results) + r.restoreExit.logTail);
      t.true(r.results.every((x) => x.ok), JSON.stringify(r.results));
      t.is(r.report.totals.pagesPending, 0);
      t.true(r.report.totals.pagesFault > 0);
      t.regex(readFileSync(daemon.logFile, 'utf8'), new RegExp(`from lazy-restore page-server 127\\.0\\.0\\.1:${ps.port}`));
    } finally {
      ps.child.kill('SIGTERM');
      await ps.exit;
    }
    // The server's own account: pages went both ways (faults on demand, the rest streamed).
    const m = /: (\d+) pages on demand, (\d+) streamed/.exec(ps.stderr());
    t.truthy(m, ps.stderr());
    t.true(Number(m![1]) > 0, ps.stderr());
    t.true(Number(m![2]) > 0, ps.stderr());
    // Each page crosses the wire about once: a fault may fetch a page the stream also
    // brings, but whole jobs must never be fetched twice (they were, 4x, before the stash
    // kept chunks for re-reads).
    const sent = Number(m![1]) + Number(m![2]);
    t.true(sent <= 1.5 * planned, `sent ${sent} pages for ${planned} planned`);
    t.log(`page server sent ${sent} pages for ${planned} planned (${(sent / planned).toFixed(2)}x)`);
  } finally {
    s.cleanup();
  }
});

test.serial("--page-server: a process restored from CRIU's page server (criu dump --lazy-pages) verifies all its memory; pages it dropped are still fetched so the session CLOSEs", async (t) => {
  const s = scratch('remote-criu');
  try {
    const port = await freePort();
    // --post-ops: after the restore it forks, mremaps, munmaps and MADV_DONTNEEDs memory that
    // was never fetched; CRIU's server must still be asked for every lazy page before CLOSE.
    const d = await lazyDump({ mb: 64, holes: true, threads: 1, postOps: true, dir: s.dir }, port);
    const work = join(s.dir, 'work');
    let daemon: Daemon | undefined;
    try {
      daemon = await startOurDaemon(d.imgs, work, ['--page-server', '--address', '127.0.0.1', '--port', String(port)]);
      const r = await restoreLazily({ w: d.w, imgs: d.imgs }, daemon, work, 120_000, { pidNamespace: true });
      t.is(r.daemonExit.code, 0, daemonLog(daemon));
      t.deepEqual(r.results.map((x) => x.role).sort(), ['forked', 'root'], JSON.stringify(r.results) + r.restoreExit.logTail);
      t.true(r.results.every((x) => x.ok), JSON.stringify(r.results));
      t.is(r.report.totals.pagesPending, 0);
      t.true(r.report.totals.pagesDropped > 0, 'the process dropped pages that were never fetched');
      t.regex(r.report.source.name, /^CRIU page server 127\.0\.0\.1:\d+$/);
      // Every lazy page was fetched at least once (the ones nobody needed just before CLOSE).
      t.true(r.report.source.pageBytes >= r.report.plannedPages * 4096, `${r.report.plannedPages} pages planned: ${JSON.stringify(r.report.source)}`);
      // Every lazy page fetched, then CLOSE: the dump side ends cleanly.
      const dx = await Promise.race([d.dumpExit, new Promise<null>((res) => setTimeout(() => res(null), 30_000))]);
      t.not(dx, null, 'criu dump (the page server) did not end after the transfer');
      t.is(dx?.code, 0, tail(d.logFile));
    } finally {
      d.dumper.kill('SIGKILL');
      daemon?.child.kill('SIGKILL');
    }
  } finally {
    s.cleanup();
  }
});

test.serial('the page server is gone for longer than --grace: the restored tree is killed and the daemon says why', async (t) => {
  const s = scratch('remote-gone');
  try {
    const d = await dumpWorkload({ mb: 64, holes: true, dir: s.dir });
    const ps = await startOurPageServer(d.imgs);
    const work = join(s.dir, 'work');
    const daemon = await startOurDaemon(d.imgs, work, ['--source', `lazy://127.0.0.1:${ps.port}`, '--grace', '1']);
    // Connected; now the source goes away before a single page moved.
    ps.child.kill('SIGKILL');
    await ps.exit;
    const r = await restoreLazily(d, daemon, work, 60_000);
    t.is(r.daemonExit.code, 1, daemonLog(daemon));
    t.regex(daemonLog(daemon), /unreachable for 1\.0s \(grace period over\)/);
    t.regex(daemonLog(daemon), /killed the restored tree/);
    t.false(r.results.some((x) => x.ok), `a process ran on after its page source was lost: ${JSON.stringify(r.results)}`);
    t.not(r.restoreExit.code, 0);
  } finally {
    s.cleanup();
  }
});

test.serial('the page server restarts within the grace period: the restore resumes and verifies', async (t) => {
  const s = scratch('remote-resume');
  try {
    const d = await dumpWorkload({ mb: 64, holes: true, dir: s.dir });
    const ps = await startOurPageServer(d.imgs);
    const work = join(s.dir, 'work');
    const daemon = await startOurDaemon(d.imgs, work, ['--source', `lazy://127.0.0.1:${ps.port}`, '--grace', '20']);
    ps.child.kill('SIGKILL');
    await ps.exit;
    const restarted = new Promise<Awaited<ReturnType<typeof startOurPageServer>>>((res, rej) =>
      setTimeout(() => startOurPageServer(d.imgs, ps.port).then(res, rej), 700),
    );
    const r = await restoreLazily(d, daemon, work, 60_000);
    const ps2 = await restarted;
    ps2.child.kill('SIGTERM');
    await ps2.exit;
    t.is(r.daemonExit.code, 0, daemonLog(daemon));
    t.is(r.results.length, 1);
    t.true(r.results[0]!.ok, JSON.stringify(r.results));
  } finally {
    s.cleanup();
  }
});

test.serial('the page server is killed at a random point mid-transfer: either every page verified, or the tree was killed with a reason', async (t) => {
  const s = scratch('remote-cut');
  try {
    const outcomes: string[] = [];
    for (let i = 0; i < 3; i++) {
      const dir = join(s.dir, `run${i}`);
      const d = await dumpWorkload({ mb: 192, holes: true, threads: 1, dir });
      const ps = await startOurPageServer(d.imgs);
      const work = join(dir, 'work');
      const daemon = await startOurDaemon(d.imgs, work, ['--source', `lazy://127.0.0.1:${ps.port}`, '--grace', '0.5']);
      // Early, middle and late cuts (restore + transfer take about a second here).
      const delay = [0, 150, 1200][i]! + Math.floor(Math.random() * [150, 600, 1500][i]!);
      const cut = setTimeout(() => ps.child.kill('SIGKILL'), delay);
      const r = await restoreLazily(d, daemon, work, 60_000);
      clearTimeout(cut);
      ps.child.kill('SIGKILL');
      await ps.exit;
      const log = daemonLog(daemon);
      if (r.daemonExit.code === 0) {
        t.true(r.results.length === 1 && r.results[0]!.ok, `daemon said done but: ${JSON.stringify(r.results)}`);
        outcomes.push(`cut at ${delay} ms: verified`);
      } else {
        t.is(r.daemonExit.code, 1, log);
        t.regex(log, /unreachable .*grace period over/);
        t.false(r.results.some((x) => x.ok), 'killed, yet a process verified');
        t.false(r.results.some((x) => !x.ok), `a process ran on missing pages: ${JSON.stringify(r.results)}`);
        outcomes.push(`cut at ${delay} ms: killed`);
      }
    }
    t.log(outcomes.join('; '));
  } finally {
    s.cleanup();
  }
});

test.serial('four restores at once from one page server, each in its own pid namespace: all verify', async (t) => {
  const s = scratch('remote-four');
  try {
    const d = await dumpWorkload({ mb: 64, holes: true, children: 1, dir: s.dir });
    const ps = await startOurPageServer(d.imgs);
    try {
      const runs = await Promise.all(
        [0, 1, 2, 3].map(async (i) => {
          const work = join(s.dir, `work${i}`);
          const daemon = await startOurDaemon(d.imgs, work, ['--source', `lazy://127.0.0.1:${ps.port}`]);
          return { daemon, work };
        }),
      );
      const outs = await Promise.all(runs.map((x, i) => restoreLazily(d, x.daemon, x.work, 120_000, { pidNamespace: true, trigger: i === 0 })));
      for (const [i, r] of outs.entries()) {
        t.is(r.daemonExit.code, 0, daemonLog(runs[i]!.daemon));
        t.is(r.restoreExit.code, 0, r.restoreExit.logTail);
        t.is(r.report.totals.pagesPending, 0);
      }
      // Every restored process of the four trees appended its line to the one result file.
      const results = readResults(d.w.resultFile);
      t.is(results.length, 8, JSON.stringify(results));
      t.true(results.every((x) => x.ok), JSON.stringify(results));
      t.log(`restore->done per restore: ${outs.map((r) => r.restoreToDoneMs.toFixed(0)).join(', ')} ms`);
    } finally {
      ps.child.kill('SIGTERM');
      await ps.exit;
    }
    t.regex(ps.stderr(), /closed after (\d+) connections/);
    t.true(Number(/closed after (\d+) connections/.exec(ps.stderr())![1]) >= 8);
  } finally {
    s.cleanup();
  }
});

test.serial('serve refuses to start on a wrong token or an unreachable page server, saying which (exit 1, nothing left listening)', async (t) => {
  const s = scratch('remote-refuse');
  try {
    const d = await dumpWorkload({ mb: 16, dir: s.dir });
    const good = join(s.dir, 'token');
    const bad = join(s.dir, 'wrong-token');
    writeFileSync(good, 'sesame\n');
    writeFileSync(bad, 'open up\n');
    const ps = await startOurPageServer(d.imgs, 0, ['--token-file', good]);
    try {
      const r = await run(process.execPath, [CLI, 'serve', '-D', d.imgs, '-W', join(s.dir, 'w1'), '--source', `lazy://127.0.0.1:${ps.port}`, '--token-file', bad], { timeoutMs: 30_000 });
      t.is(r.code, 1, r.stderr);
      t.regex(r.stderr, /REMOTE_REFUSED.*wrong token/);
    } finally {
      ps.child.kill('SIGTERM');
      await ps.exit;
    }
    const port = await freePort();
    const t0 = Date.now();
    const r = await run(process.execPath, [CLI, 'serve', '-D', d.imgs, '-W', join(s.dir, 'w2'), '--source', `lazy://127.0.0.1:${port}`, '--grace', '0.5'], { timeoutMs: 30_000 });
    t.is(r.code, 1, r.stderr);
    t.regex(r.stderr, /REMOTE_UNAVAILABLE.*unreachable for 0\.5s/);
    t.true(Date.now() - t0 < 20_000, 'gave up within its grace period (plus start-up)');
  } finally {
    s.cleanup();
  }
});

/**
 * `lazy-restore demo`: the whole story on one machine. Start the bundled workload, checkpoint
 * it with `criu dump`, serve its memory with lazy-restore while `criu restore --lazy-pages`
 * brings it back, let the restored processes verify every word of their memory, and print
 * what happened.
 */
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { readImages } from './criu/images.js';
import { dump, requireCriu, startRestore } from './harness/criu.js';
import { buildWorkloads, readResults, startWorkload, waitGone } from './harness/workload.js';
import { serve, type ServeReport } from './serve/serve.js';
import { bytes, micros } from './report/format.js';
import { summaryText, reportJson } from './report/transfer.js';
import { native } from './native.js';

export interface DemoOptions {
  mb: number;
  children: number;
  threads: number;
  /** Keep the scratch dir (images, logs). */
  keep: boolean;
  json: boolean;
  timeoutMs: number;
  log: (line: string) => void;
  out: (text: string) => void;
}

export interface DemoResult {
  ok: boolean;
  restoreToDoneMs: number;
  report?: ServeReport;
  dir: string;
}

export async function runDemo(o: DemoOptions): Promise<DemoResult> {
  const criu = await requireCriu();
  native(); // fail early, with build instructions, if the engine is not built
  await buildWorkloads();
  const dir = mkdtempSync(join(tmpdir(), 'lazy-restore-demo-'));
  const imgs = join(dir, 'images');
  o.log(`criu ${criu}; scratch dir ${dir}`);
  let ok = false;
  try {
    const w = await startWorkload({ mb: o.mb, holes: true, children: o.children, threads: o.threads, dir });
    o.log(`workload pid ${w.pid}: ${w.nprocs} processes filled ${o.mb} MiB (+${o.mb / 2} MiB per child) with a pattern`);
    await dump({ pid: w.pid, dir: imgs });
    await waitGone(w);
    const images = readImages(imgs);
    const lazy = images.processes.reduce((n, p) => n + p.totals.lazyPages, 0);
    o.log(`checkpointed with criu dump: ${images.processes.length} processes, ${bytes(lazy * 4096)} of lazy memory in ${imgs}`);

    const daemon = serve({ imagesDir: imgs, images });
    daemon.on('warning', (m) => o.log(`warning: ${m}`));
    o.log(`lazy-restore serving on ${daemon.socketPath}; starting criu restore --lazy-pages`);
    writeFileSync(w.triggerFile, ''); // the restored processes verify as soon as they run
    const t0 = performance.now();
    const restore = startRestore({ dir: imgs });
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => {
        daemon.abort('demo timed out');
        restore.child.kill('SIGKILL');
        reject(new Error(`demo: no result after ${o.timeoutMs} ms`));
      }, o.timeoutMs);
    });
    let report: ServeReport | undefined;
    let daemonError: Error | undefined;
    try {
      const [r, rs] = await Promise.race([
        Promise.all([daemon.done.catch((e: Error) => ((daemonError = e), undefined)), restore.done]),
        timeout,
      ]);
      report = r;
      const restoreToDoneMs = performance.now() - t0;
      const results = readResults(w.resultFile);
      const expected = w.nprocs;
      ok = !daemonError && results.length === expected && results.every((x) => x.ok);
      o.log(`criu restore exited ${rs.code ?? rs.signal} after ${restoreToDoneMs.toFixed(0)} ms (restore -> every process verified)`);
      for (const x of results) {
        o.log(`  ${x.role} pid ${x.pid}: ${x.pages} pages checked word by word in ${x.ms} ms: ${x.ok ? 'all correct' : `${x.bad} BAD pages`}`);
      }
      if (results.length !== expected) o.log(`  expected ${expected} result lines, got ${results.length}`);
      if (daemonError) o.log(`lazy-restore failed: ${daemonError.message}`);
      if (report) o.out(o.json ? JSON.stringify(reportJson(report), null, 2) + '\n' : `\n${summaryText(report)}`);
      o.log(ok ? `demo OK: restored and verified in ${micros(restoreToDoneMs * 1000)}` : 'demo FAILED');
      return { ok, restoreToDoneMs, report, dir };
    } finally {
      clearTimeout(timer);
      await daemon.close();
    }
  } finally {
    if (!o.keep && ok) rmSync(dir, { recursive: true, force: true });
    else o.log(`images and logs kept in ${dir}`);
  }
}

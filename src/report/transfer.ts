/**
 * The serve report: one line per task and a few overall lines for a person, and a JSON
 * document (schema `lazy-restore/serve-report@1`) for tools.
 */
import type { ServeReport, TaskStats } from '../serve/types.js';
import { bytes, micros, rate } from './format.js';

const PAGE = 4096;

function taskName(t: TaskStats): string {
  return t.childIndex ? `pid ${t.imagePid} (fork #${t.childIndex})` : `pid ${t.imagePid}`;
}

/** One line per task: pages by cause, bytes, when it was complete. */
export function taskLine(t: TaskStats): string {
  const state = t.zombie ? 'zombie' : t.exited ? 'exited' : 'done';
  const extra = [
    t.pagesDropped ? `dropped ${t.pagesDropped}` : '',
    t.pagesOrphaned ? `left at exit ${t.pagesOrphaned}` : '',
    t.pagesPresent ? `already present ${t.pagesPresent}` : '',
  ].filter(Boolean);
  return (
    `${taskName(t)}: ${state} at ${micros(t.doneUs)}; ${t.pagesPlanned} lazy pages (${bytes(t.pagesPlanned * PAGE)}): ` +
    `fault ${t.pagesFault}, ` +
    (t.pagesReadahead ? `readahead ${t.pagesReadahead}, ` : '') +
    (t.pagesPrefetch ? `profile ${t.pagesPrefetch}, ` : '') +
    `background ${t.pagesBackground}, zero ${t.pagesZero}` +
    (extra.length ? `, ${extra.join(', ')}` : '') +
    `; copied ${bytes(t.bytesCopied)} in ${t.faults} faults` +
    (t.faultLatency?.count ? ` (p50 ${micros(t.faultLatency.p50Us)}, p99 ${micros(t.faultLatency.p99Us)})` : '')
  );
}

const BARS = ' ▁▂▃▄▅▆▇█';

/** Fault service latency as one bar per power-of-two bucket that has any faults. */
export function histogramText(l: ServeReport['faultLatency'], width = 40): string[] {
  const max = Math.max(...l.buckets, 1);
  const lines: string[] = [];
  l.buckets.forEach((n, i) => {
    if (!n) return;
    const lo = i === 0 ? 0 : 2 ** (i - 1);
    const label = `${lo < 1000 ? `${lo} µs` : `${lo / 1000} ms`}`.padStart(8);
    const bar = '█'.repeat(Math.max(1, Math.round((n / max) * width)));
    lines.push(`  ${label} ${bar} ${n}`);
  });
  return lines;
}

/** Cumulative bytes over time as a one-line sparkline of per-slot throughput. */
export function seriesText(series: { atUs: number; bytes: number }[] | undefined, slots = 60): string | undefined {
  if (!series || series.length < 2) return undefined;
  const t0 = series[0]!.atUs;
  const t1 = series[series.length - 1]!.atUs;
  if (t1 <= t0) return undefined;
  const per = new Array<number>(slots).fill(0);
  for (let i = 1; i < series.length; i++) {
    const slot = Math.min(slots - 1, Math.floor(((series[i]!.atUs - t0) / (t1 - t0)) * slots));
    per[slot]! += series[i]!.bytes - series[i - 1]!.bytes;
  }
  const max = Math.max(...per, 1);
  const line = per.map((b) => BARS[Math.round((b / max) * (BARS.length - 1))]).join('');
  return `  ${micros(t0)} |${line}| ${micros(t1)}  (peak ${rate(max, (t1 - t0) / slots)})`;
}

/** The whole summary a person reads after a run. */
export function summaryText(r: ServeReport): string {
  const lines = r.tasks.map(taskLine);
  const tl = r.timeline;
  const t = r.totals;
  const span = (tl.doneUs ?? r.elapsedUs) - (tl.connectUs ?? 0);
  if (r.policy) lines.push(`policy: ${r.policy}`);
  lines.push(
    `total: ${t.tasks} tasks, ${bytes(t.bytesCopied)} copied (${t.pagesFault} pages by fault, ${t.pagesBackground} in background, ` +
      `${t.pagesZero} zero) at ${rate(t.bytesCopied, span)} from connect to done`,
  );
  lines.push(
    `timeline: connect ${micros(tl.connectUs)}, all uffds ${micros(tl.allUffdsUs)}, restore finished ${micros(tl.finishedUs)}, ` +
      `all pages in ${micros(tl.doneUs)}`,
  );
  const l = r.faultLatency;
  if (l.count) {
    lines.push(`fault service: ${l.count} faults, p50 ${micros(l.p50Us)}, p90 ${micros(l.p90Us)}, p99 ${micros(l.p99Us)}, max ${micros(l.maxUs)}`);
    const cpus = r.faultsPerCpu.map((n, i) => (n ? `cpu${i} ${n}` : '')).filter(Boolean);
    if (cpus.length) lines.push(`faults served on: ${cpus.join(', ')}`);
    lines.push('fault service latency (µs buckets):', ...histogramText(l));
  }
  const spark = seriesText(r.series);
  if (spark) lines.push('bytes copied over time:', spark);
  if (r.timeline.prefetchDoneUs !== undefined) lines.push(`profile prefetch complete at ${micros(r.timeline.prefetchDoneUs)}`);
  if (r.profile?.recorded) lines.push(`profile recorded: ${r.profile.pages} pages -> ${r.profile.recorded}`);
  if (r.profile?.used) lines.push(`profile used: ${r.profile.pages} pages prefetched from ${r.profile.used}${r.profile.dropped ? ` (${r.profile.dropped} dropped)` : ''}`);
  const src = r.source;
  if (src) {
    const wire = src.wireBytes !== src.pageBytes ? ` (${bytes(src.wireBytes)} on the wire)` : '';
    lines.push(
      `source: ${src.name}: ${bytes(src.pageBytes)} of pages received${wire}, ${src.urgentRequests} fault requests, ` +
        `${src.bulkRequests} background requests, ${src.reconnects} reconnects`,
    );
  }
  lines.push(`daemon cpu: user ${micros(r.cpuTime.userUs)}, sys ${micros(r.cpuTime.sysUs)}`);
  return lines.join('\n') + '\n';
}

/** The JSON report; stable field names, µs for times, bytes and pages as numbers. */
export function reportJson(r: ServeReport): Record<string, unknown> {
  return { schema: 'lazy-restore/serve-report@1', ...r };
}

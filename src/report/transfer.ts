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
    `fault ${t.pagesFault}, background ${t.pagesBackground}, zero ${t.pagesZero}` +
    (extra.length ? `, ${extra.join(', ')}` : '') +
    `; copied ${bytes(t.bytesCopied)} in ${t.faults} faults`
  );
}

/** The whole summary a person reads after a run. */
export function summaryText(r: ServeReport): string {
  const lines = r.tasks.map(taskLine);
  const tl = r.timeline;
  const t = r.totals;
  const span = (tl.doneUs ?? r.elapsedUs) - (tl.connectUs ?? 0);
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
  }
  lines.push(`daemon cpu: user ${micros(r.cpuTime.userUs)}, sys ${micros(r.cpuTime.sysUs)}`);
  return lines.join('\n') + '\n';
}

/** The JSON report; stable field names, µs for times, bytes and pages as numbers. */
export function reportJson(r: ServeReport): Record<string, unknown> {
  return { schema: 'lazy-restore/serve-report@1', ...r };
}

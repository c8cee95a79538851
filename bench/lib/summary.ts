/**
 * Medians and the comparison table. Only runs that verified count towards a number; failed
 * runs are counted and their reasons printed, never averaged in.
 */
import type { RunRecord, VariantName } from './runner.js';

export interface Dist {
  median: number;
  min: number;
  max: number;
  n: number;
}

export function dist(xs: (number | undefined)[]): Dist | undefined {
  const v = xs.filter((x): x is number => typeof x === 'number' && Number.isFinite(x)).sort((a, b) => a - b);
  if (!v.length) return undefined;
  const mid = v.length >> 1;
  const median = v.length % 2 ? v[mid]! : (v[mid - 1]! + v[mid]!) / 2;
  return { median, min: v[0]!, max: v[v.length - 1]!, n: v.length };
}

export interface VariantSummary {
  variant: VariantName;
  /** ok: every timed run verified; failed: some did not; n/a: could not run with this build. */
  status: 'ok' | 'failed' | 'n/a';
  reason?: string;
  runs: number;
  okRuns: number;
  failedRuns: number;
  restoreMs?: Dist;
  wsMs?: Dist;
  restoreToWsMs?: Dist;
  workloadMs?: Dist;
  hotFirst100Pct?: Dist;
  hotFirst1sPct?: Dist;
  faultP50Us?: Dist;
  faultP99Us?: Dist;
  transferGBps?: Dist;
  /** median restore->done / criu-daemon's median restore->done (same run, same images). */
  ratioToCriu?: number;
  /** Median over repetitions of (this variant / criu-daemon) within the same repetition. */
  pairedRatioToCriu?: Dist;
  ratioToPlain?: number;
}

export function summarize(
  variants: VariantName[],
  runs: RunRecord[],
  notAvailable: Map<VariantName, string>,
  /** Variants that could not be set up for this group (e.g. their recording run failed). */
  failedSetup: Map<VariantName, string> = new Map(),
): VariantSummary[] {
  const timed = runs.filter((r) => r.kind === 'timed');
  const out: VariantSummary[] = variants.map((v) => {
    const mine = timed.filter((r) => r.variant === v);
    const ok = mine.filter((r) => r.ok);
    const na = notAvailable.get(v);
    const failedRuns = mine.length - ok.length;
    const reasons = [failedSetup.get(v), ...new Set(mine.filter((r) => !r.ok).flatMap((r) => r.failures))].filter(Boolean);
    return {
      variant: v,
      status: na !== undefined && !mine.length ? 'n/a' : failedRuns || !mine.length ? 'failed' : 'ok',
      reason: na !== undefined && !mine.length ? na : reasons.length ? reasons.join('; ') : undefined,
      runs: mine.length,
      okRuns: ok.length,
      failedRuns,
      restoreMs: dist(ok.map((r) => r.restoreMs)),
      wsMs: dist(ok.map((r) => r.wsMs)),
      restoreToWsMs: dist(ok.map((r) => r.restoreToWsMs)),
      workloadMs: dist(ok.map((r) => r.workloadMs)),
      hotFirst100Pct: dist(ok.map((r) => r.hotFirst100Pct)),
      hotFirst1sPct: dist(ok.map((r) => r.hotFirst1sPct)),
      faultP50Us: dist(ok.map((r) => r.daemon?.faultP50Us)),
      faultP99Us: dist(ok.map((r) => r.daemon?.faultP99Us)),
      transferGBps: dist(ok.map((r) => r.daemon?.transferGBps)),
    };
  });
  const criu = out.find((s) => s.variant === 'criu-daemon');
  const plain = out.find((s) => s.variant === 'plain');
  for (const s of out) {
    if (!s.restoreMs) continue;
    if (criu?.restoreMs) {
      s.ratioToCriu = s.restoreMs.median / criu.restoreMs.median;
      const paired = timed
        .filter((r) => r.variant === s.variant && r.ok)
        .map((r) => {
          const c = timed.find((x) => x.variant === 'criu-daemon' && x.rep === r.rep && x.ok);
          return c?.restoreMs && r.restoreMs ? r.restoreMs / c.restoreMs : undefined;
        });
      s.pairedRatioToCriu = dist(paired);
    }
    if (plain?.restoreMs) s.ratioToPlain = s.restoreMs.median / plain.restoreMs.median;
  }
  return out;
}

// ---- table ---------------------------------------------------------------------------

export function num(x: number, digits?: number): string {
  if (digits !== undefined) return x.toFixed(digits);
  if (x >= 100) return x.toFixed(0);
  if (x >= 10) return x.toFixed(1);
  return x.toFixed(2);
}

/** `median [min–max]`, or the value alone for one run (or when all runs agree). */
export function range(d: Dist | undefined, digits?: number): string {
  if (!d) return '-';
  if (d.n === 1 || d.min === d.max) return num(d.median, digits);
  return `${num(d.median, digits)} [${num(d.min, digits)}–${num(d.max, digits)}]`;
}

function pad(s: string, n: number): string {
  // padEnd counts UTF-16 units; every character used here is one unit wide.
  return s.length >= n ? s + ' ' : s.padEnd(n);
}

export function table(summaries: VariantSummary[], o: { hotset: boolean }): string {
  const head = ['variant', 'restore→done ms', '×criu', 'restore→ws ms', 'ws ms', ...(o.hotset ? ['hot 1st 100ms'] : []), 'fault p50/p99 µs', 'xfer GB/s', 'runs'];
  const rows: string[][] = [];
  const notes: string[] = [];
  for (const s of summaries) {
    if (s.status === 'n/a') {
      rows.push([s.variant, `n/a: ${s.reason ?? ''}`]);
      continue;
    }
    if (!s.okRuns) {
      rows.push([s.variant, `FAILED ${s.failedRuns}/${s.runs}: ${s.reason ?? 'no run completed'}`]);
      continue;
    }
    const p50 = s.faultP50Us?.median;
    const p99 = s.faultP99Us?.median;
    rows.push([
      s.variant,
      range(s.restoreMs),
      s.ratioToCriu !== undefined ? s.ratioToCriu.toFixed(2) : '-',
      range(s.restoreToWsMs),
      range(s.wsMs),
      ...(o.hotset ? [s.hotFirst100Pct ? `${range(s.hotFirst100Pct, 0)} %` : '-'] : []),
      p50 !== undefined && p99 !== undefined ? `${num(p50, 0)}/${num(p99, 0)}` : '-',
      s.transferGBps ? num(s.transferGBps.median) : '-',
      s.failedRuns ? `${s.okRuns}/${s.runs} !! FAILED ${s.failedRuns}` : `${s.okRuns}/${s.runs}`,
    ]);
    if (s.failedRuns) notes.push(`!! ${s.variant}: ${s.failedRuns} of ${s.runs} runs FAILED: ${s.reason}`);
  }
  return layout(head, rows, notes);
}

/**
 * Aligned columns: the header, the rows (a row of two cells is a variant and a message that
 * spans the rest), then the notes.
 */
export function layout(head: string[], rows: string[][], notes: string[]): string {
  const widths = head.map((h, i) => Math.max(h.length, ...rows.filter((r) => i === 0 || r.length > 2).map((r) => (r[i] ?? '').length)) + 2);
  const line = (cells: string[]) =>
    cells.length === 2 && cells.length < head.length
      ? pad(cells[0]!, widths[0]!) + cells[1]
      : cells.map((c, i) => (i === cells.length - 1 ? c : pad(c, widths[i]!))).join('');
  return [line(head), ...rows.map(line), ...notes].join('\n');
}

/**
 * Medians and the comparison table of the remote rows. As in bench/lib/summary.ts: only runs
 * that verified count towards a number; failed runs are counted and their reasons printed,
 * never shown as a time.
 */
import { BASELINE, type LinkName, type RemoteRun, type RemoteVariant } from './remote.js';
import { dist, layout, num, range, type Dist } from './summary.js';

export interface RemoteSummary {
  variant: RemoteVariant;
  status: 'ok' | 'failed';
  reason?: string;
  runs: number;
  okRuns: number;
  failedRuns: number;
  restoreMs?: Dist;
  restoreToWsMs?: Dist;
  wsMs?: Dist;
  hotFirst100Pct?: Dist;
  faultP50Us?: Dist;
  faultP99Us?: Dist;
  transferMs?: Dist;
  transferGBps?: Dist;
  linkUtil?: Dist;
  allInMs?: Dist;
  dumpMs?: Dist;
  psOnDemand?: Dist;
  psStreamed?: Dist;
  /** Pages our page server sent / pages the daemon needed (1 = each page once). */
  psSentPerNeeded?: Dist;
  /** Bytes on the source's egress during the run (both bands), MiB. */
  wireMiB?: Dist;
  urgentPkts?: Dist;
  bulkPkts?: Dist;
  /** median restore->done / the baseline's median restore->done (same run). */
  ratioToCriu?: number;
  /** median over repetitions of (this / baseline) within the same repetition. */
  pairedRatioToCriu?: Dist;
  /** median restore->ws / the baseline's. */
  wsRatioToCriu?: number;
}

export function summarizeRemote(variants: RemoteVariant[], runs: RemoteRun[], setupFailed: Map<RemoteVariant, string> = new Map()): RemoteSummary[] {
  const out: RemoteSummary[] = variants.map((v) => {
    const mine = runs.filter((r) => r.variant === v);
    const ok = mine.filter((r) => r.ok);
    const reasons = [setupFailed.get(v), ...new Set(mine.filter((r) => !r.ok).flatMap((r) => r.failures))].filter(Boolean);
    return {
      variant: v,
      status: mine.length && ok.length === mine.length ? 'ok' : 'failed',
      reason: reasons.length ? reasons.join('; ') : undefined,
      runs: mine.length,
      okRuns: ok.length,
      failedRuns: mine.length - ok.length,
      restoreMs: dist(ok.map((r) => r.restoreMs)),
      restoreToWsMs: dist(ok.map((r) => r.restoreToWsMs)),
      wsMs: dist(ok.map((r) => r.wsMs)),
      hotFirst100Pct: dist(ok.map((r) => r.hotFirst100Pct)),
      faultP50Us: dist(ok.map((r) => r.daemon?.faultP50Us)),
      faultP99Us: dist(ok.map((r) => r.daemon?.faultP99Us)),
      transferMs: dist(ok.map((r) => r.transferMs)),
      transferGBps: dist(ok.map((r) => r.daemon?.transferGBps)),
      linkUtil: dist(ok.map((r) => r.linkUtil)),
      allInMs: dist(ok.map((r) => r.allInMs)),
      dumpMs: dist(ok.map((r) => r.dumpMs)),
      psOnDemand: dist(ok.map((r) => r.pageServer?.pagesOnDemand)),
      psStreamed: dist(ok.map((r) => r.pageServer?.pagesStreamed)),
      psSentPerNeeded: dist(
        ok.map((r) => (r.pageServer && r.plannedPages ? (r.pageServer.pagesOnDemand + r.pageServer.pagesStreamed) / r.plannedPages : undefined)),
      ),
      wireMiB: dist(ok.map((r) => (r.bands ? (r.bands.urgentBytes + r.bands.bulkBytes) / 2 ** 20 : undefined))),
      urgentPkts: dist(ok.map((r) => r.bands?.urgentPkts)),
      bulkPkts: dist(ok.map((r) => r.bands?.bulkPkts)),
    };
  });
  const base = out.find((s) => s.variant === BASELINE);
  for (const s of out) {
    if (!s.restoreMs || !base?.restoreMs) continue;
    s.ratioToCriu = s.restoreMs.median / base.restoreMs.median;
    if (s.restoreToWsMs && base.restoreToWsMs) s.wsRatioToCriu = s.restoreToWsMs.median / base.restoreToWsMs.median;
    s.pairedRatioToCriu = dist(
      runs
        .filter((r) => r.variant === s.variant && r.ok)
        .map((r) => {
          const b = runs.find((x) => x.variant === BASELINE && x.rep === r.rep && x.ok);
          return b?.restoreMs && r.restoreMs ? r.restoreMs / b.restoreMs : undefined;
        }),
    );
  }
  return out;
}

// ---- table ---------------------------------------------------------------------------

function kilo(x: number | undefined): string {
  if (x === undefined) return '-';
  return x >= 1e6 ? `${(x / 1e6).toFixed(2)}M` : x >= 1e4 ? `${(x / 1e3).toFixed(0)}k` : x.toFixed(0);
}

export function remoteTable(summaries: RemoteSummary[], o: { link: LinkName; hotset: boolean }): string {
  const emulated = o.link === 'emulated';
  const head = [
    'variant',
    'restore→done ms',
    '×criu',
    'restore→ws ms',
    '×criu',
    'ws ms',
    ...(o.hotset ? ['hot 1st 100ms'] : []),
    'fault p50/p99 µs',
    'xfer ms',
    'GB/s',
    ...(emulated ? ['link util'] : []),
    'all in ms',
    'ps demand/streamed',
    ...(emulated ? ['wire MiB', 'band0/1 pkts'] : []),
    'runs',
  ];
  const rows: string[][] = [];
  const notes: string[] = [];
  for (const s of summaries) {
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
      s.wsRatioToCriu !== undefined ? s.wsRatioToCriu.toFixed(2) : '-',
      range(s.wsMs),
      ...(o.hotset ? [s.hotFirst100Pct ? `${range(s.hotFirst100Pct, 0)} %` : '-'] : []),
      p50 !== undefined && p99 !== undefined ? `${num(p50, 0)}/${num(p99, 0)}` : 'n/a',
      s.transferMs ? range(s.transferMs) : 'n/a',
      s.transferGBps ? num(s.transferGBps.median) : 'n/a',
      ...(emulated ? [s.linkUtil ? `${(s.linkUtil.median * 100).toFixed(0)} %` : 'n/a'] : []),
      range(s.allInMs),
      s.psOnDemand || s.psStreamed
        ? `${kilo(s.psOnDemand?.median)}/${kilo(s.psStreamed?.median)}` + (s.psSentPerNeeded ? ` (${s.psSentPerNeeded.median.toFixed(1)}×)` : '')
        : '-',
      ...(emulated
        ? [s.wireMiB ? num(s.wireMiB.median, 0) : '-', s.urgentPkts ? `${kilo(s.urgentPkts.median)}/${kilo(s.bulkPkts?.median)}` : '-']
        : []),
      s.failedRuns ? `${s.okRuns}/${s.runs} !! FAILED ${s.failedRuns}` : `${s.okRuns}/${s.runs}`,
    ]);
    if (s.failedRuns) notes.push(`!! ${s.variant}: ${s.failedRuns} of ${s.runs} runs FAILED: ${s.reason}`);
  }
  return layout(head, rows, notes);
}

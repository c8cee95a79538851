/** Small formatting helpers shared by the reports. */

const UNITS = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];

/** 67108864 -> "64.0 MiB". */
export function bytes(n: number | bigint): string {
  let v = Number(n);
  let u = 0;
  while (Math.abs(v) >= 1024 && u < UNITS.length - 1) {
    v /= 1024;
    u++;
  }
  return u === 0 ? `${v} B` : `${v.toFixed(1)} ${UNITS[u]}`;
}

/** µs -> "850 µs" / "12.3 ms" / "1.52 s". */
export function micros(us: number | undefined): string {
  if (us === undefined || us === null) return '-';
  if (us < 1000) return `${Math.round(us)} µs`;
  if (us < 1_000_000) return `${(us / 1000).toFixed(1)} ms`;
  return `${(us / 1_000_000).toFixed(2)} s`;
}

/** Bytes over µs -> "3.41 GB/s" (10^9, as hardware rates are quoted). */
export function rate(bytesCopied: number, us: number): string {
  if (!us) return '-';
  const bps = (bytesCopied / us) * 1e6;
  if (bps >= 1e9) return `${(bps / 1e9).toFixed(2)} GB/s`;
  return `${(bps / 1e6).toFixed(1)} MB/s`;
}

/**
 * Reads a live process's private anonymous memory through /proc/PID/mem, so tests can
 * compare what the image reader returns with the bytes the process really had.
 */
import { closeSync, openSync, readFileSync, readSync } from 'node:fs';

export interface MappedRange {
  start: bigint;
  end: bigint;
  bytes: Buffer;
}

/** Every private anonymous rw mapping (no file, or [heap]/[stack]) with its contents. */
export function snapshotAnonMemory(pid: number): MappedRange[] {
  const maps = readFileSync(`/proc/${pid}/maps`, 'utf8').trim().split('\n');
  const fd = openSync(`/proc/${pid}/mem`, 'r');
  try {
    const out: MappedRange[] = [];
    for (const line of maps) {
      const [range, perms, , , inode, path = ''] = line.trim().split(/\s+/);
      if (!range || !perms || perms[0] !== 'r' || perms[3] !== 'p' || inode !== '0') continue;
      if (path && path !== '[heap]' && path !== '[stack]') continue;
      const [s, e] = range.split('-').map((x) => BigInt(`0x${x}`));
      const bytes = Buffer.alloc(Number(e! - s!));
      let off = 0;
      while (off < bytes.length) {
        const n = readSync(fd, bytes, off, bytes.length - off, s! + BigInt(off));
        if (n <= 0) break;
        off += n;
      }
      out.push({ start: s!, end: e!, bytes: bytes.subarray(0, off) });
    }
    return out;
  } finally {
    closeSync(fd);
  }
}

/** Contents of the given ranges of a live process. */
export function snapshotRanges(pid: number, ranges: { start: bigint; pages: number }[]): MappedRange[] {
  const fd = openSync(`/proc/${pid}/mem`, 'r');
  try {
    return ranges.map(({ start, pages }) => {
      const bytes = Buffer.alloc(pages * 4096);
      let off = 0;
      while (off < bytes.length) {
        const n = readSync(fd, bytes, off, bytes.length - off, start + BigInt(off));
        if (n <= 0) throw new Error(`pid ${pid}: /proc/PID/mem read at 0x${(start + BigInt(off)).toString(16)} returned ${n}`);
        off += n;
      }
      return { start, end: start + BigInt(bytes.length), bytes };
    });
  } finally {
    closeSync(fd);
  }
}

/** The snapshot's bytes for [vaddr, vaddr+len), or undefined if not inside one mapping. */
export function bytesAt(snap: MappedRange[], vaddr: bigint, len: number): Buffer | undefined {
  for (const r of snap) {
    if (vaddr >= r.start && vaddr + BigInt(len) <= r.end) {
      const off = Number(vaddr - r.start);
      if (off + len > r.bytes.length) return undefined;
      return r.bytes.subarray(off, off + len);
    }
  }
  return undefined;
}

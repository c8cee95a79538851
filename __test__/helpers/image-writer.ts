/**
 * Test-only writer of CRIU image directories from a JS description, so reader tests can build
 * exact cases (and exact corruptions) without running criu.
 *
 * It encodes protobuf independently of the reader: its own varints, tags and framing, written
 * from docs/criu-lazy-pages.md §1. Page bytes are a deterministic function of (tag, address)
 * ({@link pageBytes}), so a test can say which bytes must come back for any page.
 */

import { mkdirSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';

export const PAGE = 4096;
export const COMMON_MAGIC = 0x54564319;
export const MAGIC = {
  inventory: 0x58313116,
  pstree: 0x50273030,
  core: 0x55053847,
  mm: 0x57492820,
  pagemap: 0x56084025,
} as const;

export const MAP_PRIVATE = 0x2;
export const MAP_SHARED = 0x1;
export const MAP_ANONYMOUS = 0x20;
export const MAP_GROWSDOWN = 0x100;
export const MAP_LOCKED = 0x2000;
export const MAP_HUGETLB = 0x40000;
export const ANON_PRIVATE = MAP_PRIVATE | MAP_ANONYMOUS;

export const VMA_AREA_REGULAR = 1 << 0;
export const VMA_AREA_STACK = 1 << 1;
export const VMA_AREA_VSYSCALL = 1 << 2;
export const VMA_AREA_VDSO = 1 << 3;
export const VMA_AREA_HEAP = 1 << 5;
export const VMA_FILE_PRIVATE = 1 << 6;
export const VMA_ANON_PRIVATE = 1 << 9;
export const VMA_AREA_VVAR = 1 << 12;

export const PE_PARENT = 1;
export const PE_LAZY = 2;
export const PE_PRESENT = 4;

// ---------------------------------------------------------------------------------------------
// Wire encoding

/** One protobuf field, or raw bytes spliced into a message as they are. */
export type Field =
  | { no: number; varint: bigint | number }
  | { no: number; sint: bigint | number }
  | { no: number; fixed32: number }
  | { no: number; fixed64: bigint }
  | { no: number; bytes: Buffer | string }
  | { no: number; message: Field[] }
  | { no: number; packed: Array<bigint | number> }
  | { raw: Buffer };

export function varint(value: bigint | number): Buffer {
  let v = BigInt.asUintN(64, BigInt(value));
  const out: number[] = [];
  do {
    let b = Number(v & 0x7fn);
    v >>= 7n;
    if (v !== 0n) b |= 0x80;
    out.push(b);
  } while (v !== 0n);
  return Buffer.from(out);
}

export function tag(no: number, wireType: number): Buffer {
  return varint((BigInt(no) << 3n) | BigInt(wireType));
}

export function encode(fields: Field[]): Buffer {
  const parts: Buffer[] = [];
  for (const f of fields) {
    if ('raw' in f) {
      parts.push(f.raw);
    } else if ('varint' in f) {
      parts.push(tag(f.no, 0), varint(f.varint));
    } else if ('sint' in f) {
      const v = BigInt(f.sint);
      parts.push(tag(f.no, 0), varint(v >= 0n ? v << 1n : ((-v) << 1n) - 1n));
    } else if ('fixed32' in f) {
      const b = Buffer.alloc(4);
      b.writeUInt32LE(f.fixed32 >>> 0);
      parts.push(tag(f.no, 5), b);
    } else if ('fixed64' in f) {
      const b = Buffer.alloc(8);
      b.writeBigUInt64LE(BigInt.asUintN(64, f.fixed64));
      parts.push(tag(f.no, 1), b);
    } else if ('bytes' in f) {
      const b = typeof f.bytes === 'string' ? Buffer.from(f.bytes) : f.bytes;
      parts.push(tag(f.no, 2), varint(b.length), b);
    } else if ('message' in f) {
      const b = encode(f.message);
      parts.push(tag(f.no, 2), varint(b.length), b);
    } else {
      const b = Buffer.concat(f.packed.map((v) => varint(v)));
      parts.push(tag(f.no, 2), varint(b.length), b);
    }
  }
  return Buffer.concat(parts);
}

function u32(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32LE(n >>> 0);
  return b;
}

/** Where the writer put things in one image file. */
export interface FileLayout {
  path: string;
  /** Offset of each entry's u32 length prefix. */
  entryOffsets: number[];
  /** Offset of each entry's payload (= entryOffsets[i] + 4). */
  payloadOffsets: number[];
  size: number;
}

/** magic(s) + framed entries. */
export function frame(magics: number[], payloads: Buffer[]): { buf: Buffer; entryOffsets: number[]; payloadOffsets: number[] } {
  const parts = magics.map(u32);
  let pos = magics.length * 4;
  const entryOffsets: number[] = [];
  const payloadOffsets: number[] = [];
  for (const p of payloads) {
    entryOffsets.push(pos);
    payloadOffsets.push(pos + 4);
    parts.push(u32(p.length), p);
    pos += 4 + p.length;
  }
  return { buf: Buffer.concat(parts), entryOffsets, payloadOffsets };
}

// ---------------------------------------------------------------------------------------------
// Page contents

/**
 * The 4096 bytes the writer stores for the page at `vaddr` of pages written under `tag`
 * (distinct per image dir and process, so a read from the wrong file or offset is detected).
 */
export function pageBytes(tag: string, vaddr: bigint): Buffer {
  let seed = 0x811c9dc5n;
  for (const ch of Buffer.from(tag)) seed = ((seed ^ BigInt(ch)) * 0x100000001b3n) & 0xffffffffffffffffn;
  const b = Buffer.alloc(PAGE);
  const page = vaddr / BigInt(PAGE);
  for (let w = 0; w < PAGE / 8; w++) {
    b.writeBigUInt64LE((seed + page * 0x9e3779b97f4a7c15n + BigInt(w) * 0xc2b2ae3d27d4eb4fn) & 0xffffffffffffffffn, w * 8);
  }
  return b;
}

/** Bytes of `nrPages` pages from `vaddr` under `tag`. */
export function pagesBytes(tag: string, vaddr: bigint, nrPages: number): Buffer {
  return Buffer.concat(Array.from({ length: nrPages }, (_, i) => pageBytes(tag, vaddr + BigInt(i * PAGE))));
}

// ---------------------------------------------------------------------------------------------
// Messages

export interface InventorySpec {
  imgVersion?: number;
  /** null = leave the field out. */
  fdinfoPerId?: boolean | null;
  extra?: Field[];
}

export interface VmaSpec {
  start: bigint;
  end: bigint;
  prot?: number;
  /** Default MAP_PRIVATE | MAP_ANONYMOUS. */
  flags?: number;
  /** Default VMA_AREA_REGULAR | VMA_ANON_PRIVATE. */
  status?: number;
  pgoff?: bigint;
  shmid?: bigint;
  fd?: bigint;
  madv?: bigint;
  /** Required fields to leave out (by number). */
  omit?: number[];
  extra?: Field[];
}

export interface EntrySpec {
  vaddr: bigint;
  nrPages: number;
  /** Omitted: a legacy entry without field 4 (then `inParent` decides). */
  flags?: number;
  inParent?: boolean;
  /** CRIU 4.2 style: the count in field 5, field 2 = `field2` (default 0, as 4.2 writes). */
  v42?: boolean;
  field2?: number;
  extra?: Field[];
}

export interface ProcSpec {
  pid: number;
  ppid?: number;
  pgid?: number;
  sid?: number;
  threads?: number[];
  packedThreads?: boolean;
  /** A zombie: no mm/pagemap, a core image with task_state 2 (unless `noCore`). */
  zombie?: boolean;
  noCore?: boolean;
  vmas?: VmaSpec[];
  packedAuxv?: boolean;
  pagesId?: number;
  entries?: EntrySpec[];
  /** Tag for pageBytes; default `${dir}:${pid}`. */
  tag?: string;
  pstreeExtra?: Field[];
  mmExtra?: Field[];
  headExtra?: Field[];
}

export interface DirSpec {
  inventory?: InventorySpec;
  processes: ProcSpec[];
  /** Target of the `parent` symlink (as CRIU writes it, usually relative like `../pre`). */
  parent?: string;
}

export function inventoryMessage(spec: InventorySpec = {}): Buffer {
  const fields: Field[] = [{ no: 1, varint: spec.imgVersion ?? 2 }];
  if (spec.fdinfoPerId !== null) fields.push({ no: 2, varint: spec.fdinfoPerId === false ? 0 : 1 });
  fields.push(
    { no: 3, message: [{ no: 1, varint: 1 }, { no: 2, varint: 1 }, { no: 12, varint: 8 }] },
    { no: 4, varint: 1 },
    { no: 5, varint: 1 },
    { no: 6, varint: 0 },
    { no: 13, bytes: 'test-run-id' },
    ...(spec.extra ?? []),
  );
  return encode(fields);
}

export function pstreeMessage(p: ProcSpec): Buffer {
  const threads = p.threads ?? [p.pid];
  const fields: Field[] = [
    { no: 1, varint: p.pid },
    { no: 2, varint: p.ppid ?? 0 },
    { no: 3, varint: p.pgid ?? p.pid },
    { no: 4, varint: p.sid ?? p.pid },
  ];
  if (p.packedThreads) fields.push({ no: 5, packed: threads });
  else for (const t of threads) fields.push({ no: 5, varint: t });
  return encode([...fields, ...(p.pstreeExtra ?? [])]);
}

export function vmaMessage(v: VmaSpec): Buffer {
  const fields: Field[] = [
    { no: 1, varint: v.start },
    { no: 2, varint: v.end },
    { no: 3, varint: v.pgoff ?? 0n },
    { no: 4, varint: v.shmid ?? 0n },
    { no: 5, varint: v.prot ?? 3 },
    { no: 6, varint: v.flags ?? ANON_PRIVATE },
    { no: 7, varint: v.status ?? VMA_AREA_REGULAR | VMA_ANON_PRIVATE },
    { no: 8, sint: v.fd ?? -1n },
  ];
  if (v.madv !== undefined) fields.push({ no: 9, varint: v.madv });
  const omit = new Set(v.omit ?? []);
  return encode([...fields.filter((f) => !('no' in f) || !omit.has(f.no)), ...(v.extra ?? [])]);
}

export function mmMessage(p: ProcSpec): Buffer {
  const fields: Field[] = [];
  for (let no = 1; no <= 11; no++) fields.push({ no, varint: 0x400000n + BigInt(no) * 0x1000n });
  fields.push({ no: 12, varint: 1 });
  const auxv = [33, 0x7fff0000, 6, 4096, 0, 0];
  if (p.packedAuxv) fields.push({ no: 13, packed: auxv });
  else for (const a of auxv) fields.push({ no: 13, varint: a });
  for (const v of p.vmas ?? []) fields.push({ no: 14, bytes: vmaMessage(v) });
  fields.push({ no: 15, varint: 1 });
  return encode([...fields, ...(p.mmExtra ?? [])]);
}

export function entryMessage(e: EntrySpec): Buffer {
  const fields: Field[] = [{ no: 1, varint: e.vaddr }];
  fields.push({ no: 2, varint: e.v42 ? (e.field2 ?? 0) : e.nrPages });
  if (e.inParent !== undefined) fields.push({ no: 3, varint: e.inParent ? 1 : 0 });
  if (e.flags !== undefined) fields.push({ no: 4, varint: e.flags });
  if (e.v42) fields.push({ no: 5, varint: e.nrPages });
  return encode([...fields, ...(e.extra ?? [])]);
}

/** Flags an entry ends up with after the compat rule. */
export function effectiveFlags(e: EntrySpec): number {
  return e.flags ?? (e.inParent ? PE_PARENT : PE_PRESENT);
}

// ---------------------------------------------------------------------------------------------
// Directories

export interface WrittenDir {
  dir: string;
  /** Layout per file name (e.g. `pagemap-1.img`). */
  files: Record<string, FileLayout>;
  /** Page tag per pid (for pageBytes). */
  tags: Record<number, string>;
}

function writeImage(dir: string, name: string, magics: number[], payloads: Buffer[], files: Record<string, FileLayout>): void {
  const { buf, entryOffsets, payloadOffsets } = frame(magics, payloads);
  const path = join(dir, name);
  writeFileSync(path, buf);
  files[name] = { path, entryOffsets, payloadOffsets, size: buf.length };
}

/** Writes `spec` into `dir` (created if needed) as CRIU would lay it out. */
export function writeImageDir(dir: string, spec: DirSpec): WrittenDir {
  mkdirSync(dir, { recursive: true });
  const files: Record<string, FileLayout> = {};
  const tags: Record<number, string> = {};
  writeImage(dir, 'inventory.img', [MAGIC.inventory], [inventoryMessage(spec.inventory)], files);
  writeImage(dir, 'pstree.img', [COMMON_MAGIC, MAGIC.pstree], spec.processes.map(pstreeMessage), files);
  spec.processes.forEach((p, i) => {
    if (p.zombie) {
      if (!p.noCore) {
        const core = encode([
          { no: 1, varint: 1 },
          {
            no: 3,
            message: [
              { no: 1, varint: 2 }, // task_state: dead
              { no: 2, varint: 0 },
              { no: 3, varint: 0 },
              { no: 4, varint: 0 },
              { no: 5, varint: 0 },
              { no: 6, bytes: 'zombie' },
            ],
          },
        ]);
        writeImage(dir, `core-${p.pid}.img`, [COMMON_MAGIC, MAGIC.core], [core], files);
      }
      return;
    }
    const tagName = p.tag ?? `${dir}:${p.pid}`;
    tags[p.pid] = tagName;
    const pagesId = p.pagesId ?? i + 1;
    writeImage(dir, `mm-${p.pid}.img`, [COMMON_MAGIC, MAGIC.mm], [mmMessage(p)], files);
    const entries = p.entries ?? [];
    const head = encode([{ no: 1, varint: pagesId }, ...(p.headExtra ?? [])]);
    writeImage(dir, `pagemap-${p.pid}.img`, [COMMON_MAGIC, MAGIC.pagemap], [head, ...entries.map(entryMessage)], files);
    const pages = entries
      .filter((e) => effectiveFlags(e) & PE_PRESENT)
      .map((e) => pagesBytes(tagName, e.vaddr, e.nrPages));
    writeFileSync(join(dir, `pages-${pagesId}.img`), Buffer.concat(pages));
  });
  if (spec.parent !== undefined) symlinkSync(spec.parent, join(dir, 'parent'));
  return { dir, files, tags };
}

/**
 * The image reader on broken image dirs: every ImageError code with its file and exact offset,
 * framing edge cases, unknown fields, and a byte-flip/truncation sweep over a small valid dir
 * that must only ever produce ImageError.
 */
import test, { type ExecutionContext } from 'ava';
import { cpSync, mkdtempSync, readFileSync, rmSync, truncateSync, unlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { basename, join } from 'node:path';
import { ImageError, PageReadError, readImages, readPages, type ImageErrorCode, type ImageSet } from '../src/criu/index.js';
import {
  COMMON_MAGIC,
  MAGIC,
  PAGE,
  PE_LAZY,
  PE_PARENT,
  PE_PRESENT,
  encode,
  entryMessage,
  frame,
  vmaMessage,
  writeImageDir,
  type DirSpec,
  type Field,
  type ProcSpec,
} from './helpers/image-writer.js';

const P = BigInt(PAGE);
const pg = (n: number): bigint => BigInt(n) * P;
const ANON = 0x10000000n;

function tempDir(t: ExecutionContext): string {
  const dir = mkdtempSync(join(tmpdir(), 'lr-corrupt-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

function baseProc(extra: Partial<ProcSpec> = {}): ProcSpec {
  return {
    pid: 42,
    vmas: [
      { start: 0x400000n, end: 0x402000n, flags: 0x2, status: 0x41, prot: 5, shmid: 1n },
      { start: ANON, end: ANON + pg(16) },
    ],
    entries: [
      { vaddr: 0x401000n, nrPages: 1, flags: PE_PRESENT },
      { vaddr: ANON, nrPages: 3, flags: PE_PRESENT | PE_LAZY },
      { vaddr: ANON + pg(4), nrPages: 2, flags: PE_LAZY },
      { vaddr: ANON + pg(8), nrPages: 2, flags: PE_PRESENT | PE_LAZY },
    ],
    ...extra,
  };
}

function base(t: ExecutionContext, spec: Partial<DirSpec> = {}, proc: Partial<ProcSpec> = {}) {
  const dir = tempDir(t);
  const w = writeImageDir(dir, { processes: [baseProc(proc)], ...spec });
  return { dir, w };
}

/** Replaces `name` in `dir` with magic(s) + these payloads; returns the layout. */
function rewrite(dir: string, name: string, magics: number[], payloads: Buffer[]) {
  const f = frame(magics, payloads);
  writeFileSync(join(dir, name), f.buf);
  return f;
}

function pagemapWith(dir: string, entries: Buffer[], pagesId = 1) {
  return rewrite(dir, 'pagemap-42.img', [COMMON_MAGIC, MAGIC.pagemap], [encode([{ no: 1, varint: pagesId }]), ...entries]);
}

function expectError(t: ExecutionContext, dir: string, code: ImageErrorCode, file: string, offset: number): ImageError {
  const err = t.throws(() => readImages(dir), { instanceOf: ImageError })!;
  t.is(err.code, code, err.message);
  t.is(basename(err.file), file, err.message);
  t.is(err.offset, offset, err.message);
  t.true(err.message.startsWith(`${file} @ 0x${offset.toString(16)}: `), err.message);
  t.regex(err.message, /: expected .+/);
  t.is(typeof err.expected, 'string');
  return err;
}

// ---------------------------------------------------------------------------------------------
// MISSING_FILE

test('MISSING_FILE: inventory, pagemap, mm (not a zombie), pages file', (t) => {
  const a = base(t);
  unlinkSync(join(a.dir, 'inventory.img'));
  expectError(t, a.dir, 'MISSING_FILE', 'inventory.img', 0);

  const b = base(t);
  unlinkSync(join(b.dir, 'pagemap-42.img'));
  expectError(t, b.dir, 'MISSING_FILE', 'pagemap-42.img', 0);

  const c = base(t);
  unlinkSync(join(c.dir, 'mm-42.img'));
  expectError(t, c.dir, 'MISSING_FILE', 'mm-42.img', 0);

  const d = base(t);
  unlinkSync(join(d.dir, 'pages-1.img'));
  expectError(t, d.dir, 'MISSING_FILE', 'pages-1.img', 0);

  // A zombie without a core image cannot be told from a task whose mm image is lost.
  const e = tempDir(t);
  writeImageDir(e, { processes: [baseProc(), { pid: 43, ppid: 42, zombie: true, noCore: true }] });
  expectError(t, e, 'MISSING_FILE', 'mm-43.img', 0);
});

test('MISSING_FILE: a PE_PARENT entry without a parent dir, or without the pagemap in it', (t) => {
  const proc = { entries: [{ vaddr: ANON, nrPages: 2, flags: PE_PARENT }] };
  const a = base(t, {}, proc);
  expectError(t, a.dir, 'MISSING_FILE', 'parent', 0);

  // Dangling symlink.
  const b = base(t, { parent: '../does-not-exist' }, proc);
  expectError(t, b.dir, 'MISSING_FILE', 'parent', 0);

  // The parent dir has no pagemap for this pid.
  const root = tempDir(t);
  writeImageDir(join(root, 'pre'), { processes: [{ ...baseProc(), pid: 41 }] });
  writeImageDir(join(root, 'final'), { parent: '../pre', processes: [baseProc(proc)] });
  const err = expectError(t, join(root, 'final'), 'MISSING_FILE', 'pagemap-42.img', 0);
  t.is(err.file, join(root, 'pre', 'pagemap-42.img'));

  // Without PE_PARENT entries a dangling parent link does not matter.
  const c = base(t, { parent: '../does-not-exist' });
  t.notThrows(() => readImages(c.dir));
});

// ---------------------------------------------------------------------------------------------
// BAD_MAGIC, TRUNCATED, LENGTH_PAST_EOF (framing)

test('BAD_MAGIC: common magic, per-image magic, inventory magic', (t) => {
  const a = base(t);
  const pm = readFileSync(join(a.dir, 'pagemap-42.img'));
  pm.writeUInt32LE(0x12345678, 0);
  writeFileSync(join(a.dir, 'pagemap-42.img'), pm);
  expectError(t, a.dir, 'BAD_MAGIC', 'pagemap-42.img', 0);

  // An mm image where the pagemap should be: common magic right, per-image magic wrong.
  const b = base(t);
  writeFileSync(join(b.dir, 'pagemap-42.img'), readFileSync(join(b.dir, 'mm-42.img')));
  const err = expectError(t, b.dir, 'BAD_MAGIC', 'pagemap-42.img', 4);
  t.regex(err.message, /0x57492820.*expected pagemap magic 0x56084025/);

  // inventory.img has only its own magic: a common magic first is wrong at offset 0.
  const c = base(t);
  rewrite(c.dir, 'inventory.img', [COMMON_MAGIC, MAGIC.inventory], [encode([{ no: 1, varint: 2 }, { no: 2, varint: 1 }])]);
  expectError(t, c.dir, 'BAD_MAGIC', 'inventory.img', 0);
});

test('TRUNCATED: inside a magic, inside a length prefix, inside a varint, no entries at all', (t) => {
  const a = base(t);
  truncateSync(join(a.dir, 'pagemap-42.img'), 6);
  expectError(t, a.dir, 'TRUNCATED', 'pagemap-42.img', 4);

  const b = base(t);
  truncateSync(join(b.dir, 'inventory.img'), 0);
  expectError(t, b.dir, 'TRUNCATED', 'inventory.img', 0);

  // Cut two bytes into the length prefix of the third pagemap entry.
  const c = base(t);
  const layout = c.w.files['pagemap-42.img']!;
  truncateSync(layout.path, layout.entryOffsets[2]! + 2);
  expectError(t, c.dir, 'TRUNCATED', 'pagemap-42.img', layout.entryOffsets[2]!);

  // A message that ends in the middle of a varint: tag 0x08 (vaddr) then 0x80 0x80.
  const d = base(t);
  const f = pagemapWith(d.dir, [Buffer.from([0x08, 0x80, 0x80])]);
  expectError(t, d.dir, 'TRUNCATED', 'pagemap-42.img', f.payloadOffsets[1]! + 1);

  // A length-delimited field longer than its message: vma (field 14) claiming 200 bytes.
  const e = base(t);
  const mmBody: Field[] = [];
  for (let no = 1; no <= 11; no++) mmBody.push({ no, varint: 0 });
  mmBody.push({ no: 12, varint: 1 });
  const head = encode(mmBody);
  const g = rewrite(e.dir, 'mm-42.img', [COMMON_MAGIC, MAGIC.mm], [Buffer.concat([head, Buffer.from([0x72, 200, 1]), Buffer.alloc(5)])]);
  expectError(t, e.dir, 'TRUNCATED', 'mm-42.img', g.payloadOffsets[0]! + head.length + 1);

  // pstree.img with magics only.
  const h = base(t);
  rewrite(h.dir, 'pstree.img', [COMMON_MAGIC, MAGIC.pstree], []);
  expectError(t, h.dir, 'TRUNCATED', 'pstree.img', 8);
});

test('LENGTH_PAST_EOF: a length running past the end, and 0xFFFFFFFF without allocating or hanging', (t) => {
  const a = base(t);
  const layout = a.w.files['pagemap-42.img']!;
  const last = layout.entryOffsets.at(-1)!;
  const buf = readFileSync(layout.path);
  buf.writeUInt32LE(4096, last);
  writeFileSync(layout.path, buf);
  const err = expectError(t, a.dir, 'LENGTH_PAST_EOF', 'pagemap-42.img', last);
  t.is(
    err.message,
    `pagemap-42.img @ 0x${last.toString(16)}: length 4096 runs past end of file (size ${buf.length}): expected a complete entry`,
  );

  buf.writeUInt32LE(0xffffffff, last);
  writeFileSync(layout.path, buf);
  const heapBefore = process.memoryUsage().arrayBuffers;
  const t0 = performance.now();
  expectError(t, a.dir, 'LENGTH_PAST_EOF', 'pagemap-42.img', last);
  t.true(performance.now() - t0 < 1000, 'fails fast');
  t.true(process.memoryUsage().arrayBuffers - heapBefore < 64 << 20, 'no 4 GiB allocation');
});

// ---------------------------------------------------------------------------------------------
// MISSING_REQUIRED_FIELD, BAD_WIRE_TYPE

test('MISSING_REQUIRED_FIELD: pagemap entry without vaddr or nr_pages, head without pages_id, pstree without pid, vma without status', (t) => {
  const a = base(t);
  let f = pagemapWith(a.dir, [encode([{ no: 2, varint: 1 }, { no: 4, varint: PE_PRESENT }])]);
  expectError(t, a.dir, 'MISSING_REQUIRED_FIELD', 'pagemap-42.img', f.payloadOffsets[1]!);

  const b = base(t);
  f = pagemapWith(b.dir, [entryMessage({ vaddr: ANON, nrPages: 1, flags: 6 }), encode([{ no: 1, varint: ANON + P }, { no: 4, varint: 6 }])]);
  const err = expectError(t, b.dir, 'MISSING_REQUIRED_FIELD', 'pagemap-42.img', f.payloadOffsets[2]!);
  t.regex(err.message, /nr_pages/);

  // An empty pagemap_head (a zero-length entry).
  const c = base(t);
  f = rewrite(c.dir, 'pagemap-42.img', [COMMON_MAGIC, MAGIC.pagemap], [Buffer.alloc(0)]);
  expectError(t, c.dir, 'MISSING_REQUIRED_FIELD', 'pagemap-42.img', 12);

  const d = base(t);
  f = rewrite(d.dir, 'pstree.img', [COMMON_MAGIC, MAGIC.pstree], [encode([{ no: 2, varint: 0 }, { no: 3, varint: 42 }, { no: 4, varint: 42 }])]);
  expectError(t, d.dir, 'MISSING_REQUIRED_FIELD', 'pstree.img', 12);

  // A vma_entry nested in mm_entry: the offset is the nested message's first byte.
  const noStatus = { start: ANON, end: ANON + pg(16), omit: [7] };
  const e = base(t, {}, { vmas: [baseProc().vmas![0]!, noStatus] });
  const mm = readFileSync(join(e.dir, 'mm-42.img'));
  const at = mm.indexOf(vmaMessage(noStatus));
  t.true(at > 0);
  const err2 = expectError(t, e.dir, 'MISSING_REQUIRED_FIELD', 'mm-42.img', at);
  t.regex(err2.message, /status/);
});

test('BAD_WIRE_TYPE: a known field with the wrong wire type, groups, wire type 7', (t) => {
  // vaddr (field 1) as length-delimited.
  const a = base(t);
  let f = pagemapWith(a.dir, [encode([{ no: 1, bytes: Buffer.from([1, 2]) }, { no: 2, varint: 1 }])]);
  expectError(t, a.dir, 'BAD_WIRE_TYPE', 'pagemap-42.img', f.payloadOffsets[1]!);

  // flags (field 4) as fixed32, after vaddr and nr_pages.
  const b = base(t);
  const prefix = encode([{ no: 1, varint: ANON }, { no: 2, varint: 1 }]);
  f = pagemapWith(b.dir, [Buffer.concat([prefix, encode([{ no: 4, fixed32: 6 }])])]);
  expectError(t, b.dir, 'BAD_WIRE_TYPE', 'pagemap-42.img', f.payloadOffsets[1]! + prefix.length);

  // An unknown field 9 with wire type 3 (start group), and one with wire type 7.
  for (const wt of [3, 4, 6, 7]) {
    const c = base(t);
    f = pagemapWith(c.dir, [Buffer.concat([prefix, Buffer.from([(9 << 3) | wt, 0])])]);
    expectError(t, c.dir, 'BAD_WIRE_TYPE', 'pagemap-42.img', f.payloadOffsets[1]! + prefix.length);
  }

  // pstree threads as fixed64.
  const d = base(t);
  const pst = encode([{ no: 1, varint: 42 }, { no: 2, varint: 0 }, { no: 3, varint: 42 }, { no: 4, varint: 42 }]);
  f = rewrite(d.dir, 'pstree.img', [COMMON_MAGIC, MAGIC.pstree], [Buffer.concat([pst, encode([{ no: 5, fixed64: 42n }])])]);
  expectError(t, d.dir, 'BAD_WIRE_TYPE', 'pstree.img', 12 + pst.length);
});

// ---------------------------------------------------------------------------------------------
// BAD_VALUE

test('BAD_VALUE: inventory img_version and fdinfo_per_id', (t) => {
  const a = base(t, { inventory: { imgVersion: 3 } });
  expectError(t, a.dir, 'BAD_VALUE', 'inventory.img', 8); // magic 4 + length 4: the img_version tag

  const b = base(t, { inventory: { fdinfoPerId: false } });
  expectError(t, b.dir, 'BAD_VALUE', 'inventory.img', 10); // after img_version's 2 bytes

  const c = base(t, { inventory: { fdinfoPerId: null } });
  expectError(t, c.dir, 'BAD_VALUE', 'inventory.img', 8); // absent: the message start

  // Version 1 is accepted (CRIU accepts it too).
  t.notThrows(() => readImages(base(t, { inventory: { imgVersion: 1 } }).dir));
});

test('BAD_VALUE: unaligned vaddr, nr_pages 0, invalid flags, varint longer than 10 bytes', (t) => {
  const a = base(t);
  let f = pagemapWith(a.dir, [entryMessage({ vaddr: ANON + 1n, nrPages: 1, flags: 6 })]);
  expectError(t, a.dir, 'BAD_VALUE', 'pagemap-42.img', f.payloadOffsets[1]!);

  const b = base(t);
  const prefix = encode([{ no: 1, varint: ANON }]);
  f = pagemapWith(b.dir, [entryMessage({ vaddr: ANON, nrPages: 0, flags: 6 })]);
  expectError(t, b.dir, 'BAD_VALUE', 'pagemap-42.img', f.payloadOffsets[1]! + prefix.length);

  for (const flags of [0, 0x8, PE_PARENT | PE_PRESENT, PE_PARENT | PE_LAZY, 0x7]) {
    const c = base(t);
    const before = encode([{ no: 1, varint: ANON }, { no: 2, varint: 1 }]);
    f = pagemapWith(c.dir, [entryMessage({ vaddr: ANON, nrPages: 1, flags })]);
    expectError(t, c.dir, 'BAD_VALUE', 'pagemap-42.img', f.payloadOffsets[1]! + before.length);
  }

  // vaddr as an 11-byte varint.
  const d = base(t);
  f = pagemapWith(d.dir, [Buffer.concat([Buffer.from([0x08]), Buffer.alloc(10, 0x80), Buffer.from([0x00, 0x10, 0x01])])]);
  const err = expectError(t, d.dir, 'BAD_VALUE', 'pagemap-42.img', f.payloadOffsets[1]! + 1);
  t.regex(err.message, /longer than 10 bytes/);

  // A 10-byte varint with more than 64 bits.
  const e = base(t);
  f = pagemapWith(e.dir, [Buffer.concat([Buffer.from([0x08]), Buffer.alloc(9, 0xff), Buffer.from([0x7f, 0x10, 0x01])])]);
  expectError(t, e.dir, 'BAD_VALUE', 'pagemap-42.img', f.payloadOffsets[1]! + 1);

  // A uint32 field holding more than 32 bits (pages_id).
  const g = base(t);
  f = rewrite(g.dir, 'pagemap-42.img', [COMMON_MAGIC, MAGIC.pagemap], [encode([{ no: 1, varint: 1n << 32n }])]);
  expectError(t, g.dir, 'BAD_VALUE', 'pagemap-42.img', 13);
});

test('BAD_VALUE: entries outside every VMA, partly outside, overlapping; overlapping VMAs; duplicate pids', (t) => {
  const a = base(t);
  let f = pagemapWith(a.dir, [entryMessage({ vaddr: 0x20000000n, nrPages: 1, flags: 6 })]);
  expectError(t, a.dir, 'BAD_VALUE', 'pagemap-42.img', f.payloadOffsets[1]!);

  // Starts in the anon VMA, runs 1 page past its end.
  const b = base(t);
  f = pagemapWith(b.dir, [entryMessage({ vaddr: ANON + pg(14), nrPages: 3, flags: 6 })]);
  const err = expectError(t, b.dir, 'BAD_VALUE', 'pagemap-42.img', f.payloadOffsets[1]!);
  t.regex(err.message, /0x10010000 is not inside any VMA/);

  // Across two adjacent VMAs is fine (CRIU writes such entries).
  const ok = base(t, {}, { vmas: [{ start: ANON, end: ANON + pg(2) }, { start: ANON + pg(2), end: ANON + pg(4) }], entries: [{ vaddr: ANON + P, nrPages: 2, flags: 6 }] });
  t.notThrows(() => readImages(ok.dir));

  const c = base(t);
  f = pagemapWith(c.dir, [entryMessage({ vaddr: ANON, nrPages: 4, flags: 6 }), entryMessage({ vaddr: ANON + pg(3), nrPages: 1, flags: 6 })]);
  expectError(t, c.dir, 'BAD_VALUE', 'pagemap-42.img', f.payloadOffsets[2]!);

  const vmas = [{ start: ANON, end: ANON + pg(4) }, { start: ANON + pg(2), end: ANON + pg(8) }];
  const d = base(t, {}, { vmas, entries: [] });
  const mm = readFileSync(join(d.dir, 'mm-42.img'));
  expectError(t, d.dir, 'BAD_VALUE', 'mm-42.img', mm.indexOf(vmaMessage(vmas[1]!)));

  const e = tempDir(t);
  const w = writeImageDir(e, { processes: [baseProc(), { ...baseProc(), ppid: 42 }] });
  expectError(t, e, 'BAD_VALUE', 'pstree.img', w.files['pstree.img']!.payloadOffsets[1]!);
});

test('BAD_VALUE: a PE_PARENT page the parent does not have, and a parent entry without bytes', (t) => {
  const root = tempDir(t);
  writeImageDir(join(root, 'pre'), { processes: [baseProc({ entries: [{ vaddr: ANON, nrPages: 2, flags: 6 }, { vaddr: ANON + pg(2), nrPages: 1, flags: PE_LAZY }] })] });
  const final = join(root, 'final');
  let w = writeImageDir(final, { parent: '../pre', processes: [baseProc({ entries: [{ vaddr: ANON, nrPages: 4, flags: PE_PARENT }] })] });
  // Pages 0-1 are in the parent, page 2 is remote-only there: the parent entry is at fault.
  const preLayout = readFileSync(join(root, 'pre', 'pagemap-42.img'));
  const parentEntryAt = preLayout.indexOf(entryMessage({ vaddr: ANON + pg(2), nrPages: 1, flags: PE_LAZY }));
  const err = expectError(t, final, 'BAD_VALUE', 'pagemap-42.img', parentEntryAt);
  t.is(err.file, join(root, 'pre', 'pagemap-42.img'));

  // Page 3 is not in the parent at all: the child's entry is at fault.
  rmSync(final, { recursive: true });
  writeImageDir(join(root, 'pre2'), { processes: [baseProc({ entries: [{ vaddr: ANON, nrPages: 2, flags: 6 }] })] });
  w = writeImageDir(final, { parent: '../pre2', processes: [baseProc({ entries: [{ vaddr: ANON, nrPages: 3, flags: PE_PARENT }] })] });
  const err2 = expectError(t, final, 'BAD_VALUE', 'pagemap-42.img', w.files['pagemap-42.img']!.payloadOffsets[1]!);
  t.is(err2.file, join(final, 'pagemap-42.img'));
  t.regex(err2.message, /0x10002000/);
});

// ---------------------------------------------------------------------------------------------
// PAGES_PAST_EOF, PARENT_LOOP

test('PAGES_PAST_EOF: a pages file one byte short names the pages file and the run offset', (t) => {
  const a = base(t);
  const pages = join(a.dir, 'pages-1.img');
  const size = readFileSync(pages).length;
  t.is(size, (1 + 3 + 2) * PAGE); // the remote-only entry has no bytes
  truncateSync(pages, size - 1);
  const err = expectError(t, a.dir, 'PAGES_PAST_EOF', 'pages-1.img', (1 + 3) * PAGE);
  t.regex(err.message, /pagemap-42\.img/);

  // A pages file for a parent is checked as well.
  const root = tempDir(t);
  writeImageDir(join(root, 'pre'), { processes: [baseProc({ pagesId: 7, entries: [{ vaddr: ANON, nrPages: 5, flags: 6 }] })] });
  writeImageDir(join(root, 'final'), { parent: '../pre', processes: [baseProc({ entries: [{ vaddr: ANON, nrPages: 2, flags: PE_PARENT }] })] });
  truncateSync(join(root, 'pre', 'pages-7.img'), 4 * PAGE);
  const err2 = expectError(t, join(root, 'final'), 'PAGES_PAST_EOF', 'pages-7.img', 0);
  t.is(err2.file, join(root, 'pre', 'pages-7.img'));
});

test('PARENT_LOOP: parent pointing at itself, a two-dir cycle, a symlink loop', (t) => {
  const a = base(t, { parent: '.' });
  expectError(t, a.dir, 'PARENT_LOOP', 'parent', 0);

  const root = tempDir(t);
  writeImageDir(join(root, 'a'), { parent: '../b', processes: [baseProc()] });
  writeImageDir(join(root, 'b'), { parent: '../a', processes: [baseProc()] });
  const err = expectError(t, join(root, 'a'), 'PARENT_LOOP', 'parent', 0);
  t.is(err.file, join(root, 'b', 'parent'));

  const c = base(t, { parent: 'parent' }); // parent -> parent: ELOOP
  expectError(t, c.dir, 'PARENT_LOOP', 'parent', 0);
});

// ---------------------------------------------------------------------------------------------
// Unknown fields

/** What a reader result says, without paths. */
function essence(set: ImageSet) {
  return {
    inventory: set.inventory,
    processes: set.processes.map((p) => ({
      pid: p.pid,
      ppid: p.ppid,
      threads: p.threads,
      vmas: p.vmas,
      pagesId: p.pagesId,
      pagemap: p.pagemap.map((e) => [e.vaddr, e.nrPages, e.flags, e.fileOffset]),
      lazyRanges: p.lazyRanges.map((r) => [r.start, r.nrPages, r.vmaIndex, r.location.kind === 'file' ? r.location.offset : null]),
      totals: p.totals,
    })),
  };
}

test('unknown fields of every wire type are skipped, in every message', (t) => {
  const unknown: Field[] = [
    { no: 99, varint: 0xffffffffffffffffn },
    { no: 100, fixed64: 0x1122334455667788n },
    { no: 101, bytes: Buffer.from([0x08, 0x01, 0x10]) }, // looks like fields, must not be parsed
    { no: 102, fixed32: 0xdeadbeef },
    { no: 536870911, message: [{ no: 1, varint: 5 }] }, // highest field number
  ];
  const root = tempDir(t);
  const plain = writeImageDir(join(root, 'plain'), { processes: [baseProc({ tag: 'same' })] });
  const vmas = baseProc().vmas!.map((v) => ({ ...v, extra: unknown }));
  writeImageDir(join(root, 'noisy'), {
    inventory: { extra: unknown },
    processes: [
      baseProc({
        tag: 'same',
        vmas,
        pstreeExtra: unknown,
        mmExtra: unknown,
        headExtra: unknown,
        entries: baseProc().entries!.map((e) => ({ ...e, extra: unknown })),
      }),
    ],
  });
  // Also put an unknown field *first* in a pagemap entry.
  const noisyPm = join(root, 'noisy', 'pagemap-42.img');
  const entries = baseProc().entries!.map((e) => Buffer.concat([encode(unknown), entryMessage(e)]));
  pagemapWith(join(root, 'noisy'), entries);
  t.true(readFileSync(noisyPm).length > readFileSync(plain.files['pagemap-42.img']!.path).length);
  const a = readImages(join(root, 'plain'));
  const b = readImages(join(root, 'noisy'));
  t.deepEqual(essence(b), essence(a));
  t.true(readPages(b, 42, ANON, 3).equals(readPages(a, 42, ANON, 3)));
});

// ---------------------------------------------------------------------------------------------
// Sweep

const CODES = new Set<ImageErrorCode>([
  'MISSING_FILE',
  'BAD_MAGIC',
  'TRUNCATED',
  'LENGTH_PAST_EOF',
  'MISSING_REQUIRED_FIELD',
  'BAD_WIRE_TYPE',
  'BAD_VALUE',
  'PAGES_PAST_EOF',
  'PARENT_LOOP',
]);

test('flipping or truncating any byte of any image yields a result or an ImageError, never anything else', (t) => {
  const root = tempDir(t);
  const good = join(root, 'good');
  writeImageDir(good, {
    processes: [
      baseProc({ threads: [42, 44] }),
      { pid: 43, ppid: 42, vmas: [{ start: ANON, end: ANON + pg(4) }], entries: [{ vaddr: ANON + P, nrPages: 2, flags: 6 }] },
      { pid: 45, ppid: 42, zombie: true },
    ],
  });
  t.notThrows(() => readImages(good));
  const work = join(root, 'work');
  const names = ['inventory.img', 'pstree.img', 'mm-42.img', 'pagemap-42.img', 'mm-43.img', 'pagemap-43.img', 'core-45.img'];
  const counts: Record<string, number> = { ok: 0 };
  let runs = 0;
  let slowest = 0;

  const attempt = (label: string): void => {
    runs++;
    const t0 = performance.now();
    try {
      const set = readImages(work);
      counts.ok!++;
      // Whatever was accepted must also be readable page by page (small VMAs only).
      for (const p of set.processes) {
        for (const v of p.vmas) {
          if (v.end - v.start > pg(64)) continue;
          try {
            readPages(set, p.pid, v.start, Number((v.end - v.start) / P));
          } catch (e) {
            if (!(e instanceof PageReadError) && !(e instanceof ImageError)) {
              t.fail(`${label}: readPages threw ${(e as Error).stack}`);
            }
          }
        }
      }
    } catch (e) {
      if (!(e instanceof ImageError)) {
        t.fail(`${label}: threw ${(e as Error)?.stack ?? e}`);
        return;
      }
      if (!CODES.has(e.code) || typeof e.file !== 'string' || !Number.isInteger(e.offset) || e.offset < 0) {
        t.fail(`${label}: malformed ImageError ${e.code} ${e.file} ${e.offset}`);
      }
      counts[e.code] = (counts[e.code] ?? 0) + 1;
    }
    slowest = Math.max(slowest, performance.now() - t0);
  };

  for (const name of names) {
    const original = readFileSync(join(good, name));
    for (let pos = 0; pos <= original.length; pos++) {
      const variants: Array<[string, Buffer]> = [[`${name} cut at ${pos}`, original.subarray(0, pos)]];
      if (pos < original.length) {
        for (const value of [original[pos]! ^ 0xff, original[pos]! ^ 0x01, 0x80, 0x00, 0xff]) {
          if (value === original[pos]) continue;
          const copy = Buffer.from(original);
          copy[pos] = value;
          variants.push([`${name}[${pos}] = 0x${value.toString(16)}`, copy]);
        }
      }
      for (const [label, bytes] of variants) {
        rmSync(work, { recursive: true, force: true });
        cpSync(good, work, { recursive: true });
        writeFileSync(join(work, name), bytes);
        attempt(label);
      }
    }
  }
  // The pages files, cut at every 512 bytes.
  for (const name of ['pages-1.img', 'pages-2.img']) {
    const size = readFileSync(join(good, name)).length;
    for (let cut = 0; cut < size; cut += 512) {
      rmSync(work, { recursive: true, force: true });
      cpSync(good, work, { recursive: true });
      truncateSync(join(work, name), cut);
      attempt(`${name} cut at ${cut}`);
    }
  }
  t.log(`${runs} variants, slowest ${slowest.toFixed(1)} ms`, counts);
  t.true(runs > 1000);
  t.true(slowest < 2000, 'no variant takes long');
  // The sweep reached most error kinds (the others need more than one byte changed).
  for (const code of ['BAD_MAGIC', 'TRUNCATED', 'LENGTH_PAST_EOF', 'BAD_WIRE_TYPE', 'BAD_VALUE', 'PAGES_PAST_EOF', 'MISSING_FILE']) {
    t.true((counts[code] ?? 0) > 0, `sweep produced ${code}`);
  }
});

/**
 * One protobuf image file: magic header(s), then entries framed as `u32 length + payload`.
 *
 * Layout (docs/criu-lazy-pages.md §1.2, §1.3): every image starts with the common magic
 * 0x54564319 followed by its own magic, except `inventory.img`, which has only its own. Then
 * come entries, each a host-order u32 length and that many bytes of a proto2 message. End of file
 * exactly at an entry boundary ends the file; anywhere else it is an error.
 */

import { readFileSync } from 'node:fs';
import { endianness } from 'node:os';
import { ImageError } from './errors.js';
import { ProtoReader } from './protobuf.js';

export const IMG_COMMON_MAGIC = 0x54564319;
export const INVENTORY_MAGIC = 0x58313116;
export const PSTREE_MAGIC = 0x50273030;
export const CORE_MAGIC = 0x55053847;
export const MM_MAGIC = 0x57492820;
export const PAGEMAP_MAGIC = 0x56084025;

/** Which magic(s) an image starts with. */
export interface ImageKind {
  /** For messages, e.g. `pagemap`. */
  name: string;
  magic: number;
  /** Whether the common magic precedes `magic`. */
  common: boolean;
}

export const INVENTORY_IMAGE: ImageKind = { name: 'inventory', magic: INVENTORY_MAGIC, common: false };
export const PSTREE_IMAGE: ImageKind = { name: 'pstree', magic: PSTREE_MAGIC, common: true };
export const CORE_IMAGE: ImageKind = { name: 'core', magic: CORE_MAGIC, common: true };
export const MM_IMAGE: ImageKind = { name: 'mm', magic: MM_MAGIC, common: true };
export const PAGEMAP_IMAGE: ImageKind = { name: 'pagemap', magic: PAGEMAP_MAGIC, common: true };

/** CRIU writes raw host-order integers; the restoring host has the dumping host's byte order. */
const LITTLE_ENDIAN = endianness() === 'LE';

export function readU32(buf: Buffer, offset: number): number {
  return LITTLE_ENDIAN ? buf.readUInt32LE(offset) : buf.readUInt32BE(offset);
}

const hex = (n: number): string => `0x${n.toString(16).padStart(8, '0')}`;

/** One framed entry. */
export interface ImageEntry {
  /** Offset of the entry's u32 length prefix. */
  offset: number;
  /** Decoder positioned on the payload (its `start` is the payload offset). */
  reader: ProtoReader;
}

export class ImageFile {
  private constructor(
    readonly path: string,
    readonly kind: ImageKind,
    /** The whole file. */
    readonly buf: Buffer,
    /** Offset of the first entry (after the magics). */
    readonly dataStart: number,
  ) {}

  /**
   * Reads `path` and checks its magic(s). A missing file is MISSING_FILE; `needed` says why it
   * was needed (used in that error's "expected" text).
   */
  static open(path: string, kind: ImageKind, needed?: string): ImageFile {
    let buf: Buffer;
    try {
      buf = readFileSync(path);
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === 'ENOENT' || code === 'ENOTDIR') {
        throw new ImageError({
          code: 'MISSING_FILE',
          file: path,
          offset: 0,
          detail: 'no such file',
          expected: needed ?? `the ${kind.name} image`,
          cause: err,
        });
      }
      throw err;
    }
    const magics = kind.common ? [IMG_COMMON_MAGIC, kind.magic] : [kind.magic];
    let pos = 0;
    for (const magic of magics) {
      const which = magic === IMG_COMMON_MAGIC ? 'common magic' : `${kind.name} magic`;
      if (buf.length - pos < 4) {
        throw new ImageError({
          code: 'TRUNCATED',
          file: path,
          offset: pos,
          detail: `file ends ${buf.length - pos} byte(s) into the ${which}`,
          expected: `${which} ${hex(magic)}`,
        });
      }
      const found = readU32(buf, pos);
      if (found !== magic) {
        throw new ImageError({
          code: 'BAD_MAGIC',
          file: path,
          offset: pos,
          detail: `magic is ${hex(found)}`,
          expected: `${which} ${hex(magic)}`,
        });
      }
      pos += 4;
    }
    return new ImageFile(path, kind, buf, pos);
  }

  /** The framed entries, in file order. Framing errors are thrown when reached. */
  *entries(): Generator<ImageEntry> {
    const buf = this.buf;
    let pos = this.dataStart;
    while (pos < buf.length) {
      const left = buf.length - pos;
      if (left < 4) {
        throw this.error(
          'TRUNCATED',
          pos,
          `file ends ${left} byte(s) into an entry's u32 length`,
          'a complete u32 length or the end of the file',
        );
      }
      const length = readU32(buf, pos);
      if (length > left - 4) {
        throw this.error(
          'LENGTH_PAST_EOF',
          pos,
          `length ${length} runs past end of file (size ${buf.length})`,
          'a complete entry',
        );
      }
      const start = pos + 4;
      yield { offset: pos, reader: new ProtoReader(this.path, buf, start, start + length) };
      pos = start + length;
    }
  }

  /** The only entry of a single-entry image (inventory, mm, core). */
  single(what: string): ImageEntry {
    let first: ImageEntry | undefined;
    for (const entry of this.entries()) {
      if (first !== undefined) {
        throw this.error('BAD_VALUE', entry.offset, `a second entry follows the ${what}`, `exactly one ${what}`);
      }
      first = entry;
    }
    if (first === undefined) {
      throw this.error('TRUNCATED', this.dataStart, `file ends before the ${what}`, `one ${what}`);
    }
    return first;
  }

  error(code: ImageError['code'], offset: number, detail: string, expected: string): ImageError {
    return new ImageError({ code, file: this.path, offset, detail, expected });
  }
}

/**
 * Errors raised while reading a CRIU images directory.
 *
 * Every problem with the *content* of the images is an {@link ImageError}: it names the file, the
 * exact byte offset in that file, and what was expected there, so a user can look at the bytes
 * with `xxd -s OFFSET FILE`. Problems with a *request* made against well-formed images (asking
 * `readPages` for memory that is not mapped, or whose bytes only exist on a remote page server)
 * are a {@link PageReadError}.
 */

import { basename } from 'node:path';

export type ImageErrorCode =
  /** A file the images need does not exist (offset 0). */
  | 'MISSING_FILE'
  /** The common or per-image magic is wrong (offset of the wrong u32). */
  | 'BAD_MAGIC'
  /** The file or a message ends inside an item (offset of the incomplete item). */
  | 'TRUNCATED'
  /** An entry's u32 length runs past the end of the file (offset of the length prefix). */
  | 'LENGTH_PAST_EOF'
  /** A required protobuf field is absent (offset of the message's first byte). */
  | 'MISSING_REQUIRED_FIELD'
  /** A field has a wire type that is invalid or not the one its type uses (offset of the tag). */
  | 'BAD_WIRE_TYPE'
  /** A value is out of range or inconsistent with the rest of the images (offset of the item). */
  | 'BAD_VALUE'
  /** A PE_PRESENT run does not lie inside its pages file (file = the pages file, offset = run start). */
  | 'PAGES_PAST_EOF'
  /** The `parent` links lead back to a directory already in the chain (offset 0). */
  | 'PARENT_LOOP';

export interface ImageErrorInit {
  code: ImageErrorCode;
  /** Path of the file the problem is in. */
  file: string;
  /** Byte offset in `file`. */
  offset: number;
  /** What was found, e.g. `length 4096 runs past end of file (size 100)`. */
  detail: string;
  /** What should have been there, e.g. `a complete entry`. */
  expected: string;
  cause?: unknown;
}

/**
 * A malformed or inconsistent image. The message reads
 * `pagemap-42.img @ 0x1c: length 4096 runs past end of file (size 100): expected a complete entry`.
 */
export class ImageError extends Error {
  override readonly name = 'ImageError';
  readonly code: ImageErrorCode;
  /** Path of the offending file (as opened; basename it for display). */
  readonly file: string;
  /** Byte offset in `file` of the offending item. */
  readonly offset: number;
  /** What should have been at `offset`. */
  readonly expected: string;

  constructor(init: ImageErrorInit) {
    super(
      `${basename(init.file)} @ 0x${init.offset.toString(16)}: ${init.detail}: expected ${init.expected}`,
      init.cause === undefined ? undefined : { cause: init.cause },
    );
    this.code = init.code;
    this.file = init.file;
    this.offset = init.offset;
    this.expected = init.expected;
  }
}

export type PageReadErrorCode =
  /** No process with that pid in the image set. */
  | 'UNKNOWN_PID'
  /** Bad arguments: vaddr not page aligned, negative or non-integer page count. */
  | 'BAD_ARGUMENT'
  /** Part of the range lies outside every VMA of the process. */
  | 'NOT_MAPPED'
  /** Part of the range is PE_LAZY without PE_PRESENT: its bytes are only on the dump-side page server. */
  | 'REMOTE_ONLY';

/** A `readPages` request that well-formed images cannot answer. */
export class PageReadError extends Error {
  override readonly name = 'PageReadError';
  readonly code: PageReadErrorCode;
  readonly pid: number;
  /** First page of the request that could not be served. */
  readonly vaddr: bigint;

  constructor(code: PageReadErrorCode, pid: number, vaddr: bigint, message: string) {
    super(message);
    this.code = code;
    this.pid = pid;
    this.vaddr = vaddr;
  }
}

/**
 * A small protobuf (proto2) wire-format reader, just enough for CRIU images.
 *
 * Wire types 0 (varint), 1 (64-bit), 2 (length-delimited) and 5 (32-bit) are understood; groups
 * (3, 4) and the undefined types 6 and 7 are rejected. Unknown fields are skipped. Repeated
 * scalars are accepted both unpacked (one tag per element, what protobuf-c writes) and packed.
 *
 * Every read is bounds-checked against the end of the current message; every failure is an
 * {@link ImageError} carrying the file and the absolute byte offset of the offending item. A
 * reader works on the whole file's buffer, so its indices *are* file offsets.
 */

import { ImageError } from './errors.js';

export const WIRE_VARINT = 0;
export const WIRE_FIXED64 = 1;
export const WIRE_LEN = 2;
export const WIRE_FIXED32 = 5;

const WIRE_NAMES: Record<number, string> = {
  [WIRE_VARINT]: 'varint',
  [WIRE_FIXED64]: '64-bit',
  [WIRE_LEN]: 'length-delimited',
  [WIRE_FIXED32]: '32-bit',
};

const MAX_FIELD_NUMBER = 0x1fffffff;
const UINT32_MAX = 0xffffffffn;

/** Decodes the fields of one message lying in `buf[start, end)`. */
export class ProtoReader {
  /** Field number of the current field (valid after `next()` returned true). */
  field = 0;
  /** Wire type of the current field. */
  wireType = 0;
  /** Offset of the current field's tag. */
  tagOffset = 0;

  private pos: number;
  /** Whether the current field's value has been read (else `next()` skips it). */
  private consumed = true;

  constructor(
    /** Path of the file `buf` holds, for errors. */
    readonly file: string,
    /** The whole file. */
    readonly buf: Buffer,
    /** Offset of the message's first byte. */
    readonly start: number,
    /** Offset one past the message's last byte. */
    readonly end: number,
  ) {
    if (start < 0 || end > buf.length || start > end) {
      throw new RangeError(`message bounds [${start}, ${end}) outside buffer of ${buf.length} bytes`);
    }
    this.pos = start;
  }

  /** Advances to the next field; false at the end of the message. */
  next(): boolean {
    if (!this.consumed) this.skip();
    if (this.pos >= this.end) return false;
    const tagOffset = this.pos;
    const tag = this.readVarint();
    const wireType = Number(tag & 7n);
    const field = tag >> 3n;
    if (field === 0n || field > BigInt(MAX_FIELD_NUMBER)) {
      throw this.error('BAD_VALUE', tagOffset, `tag 0x${tag.toString(16)} has field number ${field}`, 'a field number from 1 to 2^29-1');
    }
    if (!(wireType in WIRE_NAMES)) {
      throw this.error(
        'BAD_WIRE_TYPE',
        tagOffset,
        `field ${field} has wire type ${wireType}`,
        'wire type 0, 1, 2 or 5 (groups and types 6, 7 are not used by CRIU images)',
      );
    }
    this.tagOffset = tagOffset;
    this.field = Number(field);
    this.wireType = wireType;
    this.consumed = false;
    return true;
  }

  /** Skips the current field's value. */
  skip(): void {
    this.consumed = true;
    switch (this.wireType) {
      case WIRE_VARINT:
        this.readVarint();
        return;
      case WIRE_FIXED64:
        this.advance(8, '64-bit value');
        return;
      case WIRE_FIXED32:
        this.advance(4, '32-bit value');
        return;
      case WIRE_LEN: {
        this.pos = this.readLengthDelimited()[1];
        return;
      }
    }
  }

  /** Current field as uint64. */
  uint64(): bigint {
    this.expectWire(WIRE_VARINT);
    this.consumed = true;
    return this.readVarint();
  }

  /** Current field as uint32 (a varint above 2^32-1 is BAD_VALUE). */
  uint32(): number {
    this.expectWire(WIRE_VARINT);
    this.consumed = true;
    return this.readUint32Varint();
  }

  /** Current field as int32 (ten-byte varints of negative values accepted). */
  int32(): number {
    this.expectWire(WIRE_VARINT);
    this.consumed = true;
    return Number(BigInt.asIntN(32, this.readVarint()));
  }

  /** Current field as sint64 (zigzag). */
  sint64(): bigint {
    this.expectWire(WIRE_VARINT);
    this.consumed = true;
    const v = this.readVarint();
    return (v >> 1n) ^ -(v & 1n);
  }

  /** Current field as bool (any non-zero varint is true). */
  bool(): boolean {
    this.expectWire(WIRE_VARINT);
    this.consumed = true;
    return this.readVarint() !== 0n;
  }

  /** Current field as a UTF-8 string. */
  string(): string {
    this.expectWire(WIRE_LEN);
    this.consumed = true;
    const [start, end] = this.readLengthDelimited();
    this.pos = end;
    return this.buf.toString('utf8', start, end);
  }

  /** Current field as an embedded message. */
  message(): ProtoReader {
    this.expectWire(WIRE_LEN);
    this.consumed = true;
    const [start, end] = this.readLengthDelimited();
    this.pos = end;
    return new ProtoReader(this.file, this.buf, start, end);
  }

  /** Appends the current field's element(s) of a repeated uint32, packed or not. */
  repeatedUint32(out: number[]): void {
    if (this.wireType === WIRE_LEN) {
      this.consumed = true;
      const [start, end] = this.readLengthDelimited();
      const inner = new ProtoReader(this.file, this.buf, start, end);
      while (inner.pos < end) out.push(inner.readUint32Varint());
      this.pos = end;
      return;
    }
    out.push(this.uint32());
  }

  /** Appends the current field's element(s) of a repeated uint64, packed or not. */
  repeatedUint64(out: bigint[]): void {
    if (this.wireType === WIRE_LEN) {
      this.consumed = true;
      const [start, end] = this.readLengthDelimited();
      const inner = new ProtoReader(this.file, this.buf, start, end);
      while (inner.pos < end) out.push(inner.readVarint());
      this.pos = end;
      return;
    }
    out.push(this.uint64());
  }

  /** An ImageError about this message's file. */
  error(code: ImageError['code'], offset: number, detail: string, expected: string): ImageError {
    return new ImageError({ code, file: this.file, offset, detail, expected });
  }

  private expectWire(wireType: number): void {
    if (this.consumed) throw new Error('ProtoReader: value read twice or before next()');
    if (this.wireType !== wireType) {
      throw this.error(
        'BAD_WIRE_TYPE',
        this.tagOffset,
        `field ${this.field} has wire type ${this.wireType} (${WIRE_NAMES[this.wireType]})`,
        `wire type ${wireType} (${WIRE_NAMES[wireType]})`,
      );
    }
  }

  private advance(n: number, what: string): void {
    if (this.end - this.pos < n) {
      throw this.error(
        'TRUNCATED',
        this.pos,
        `${what} of field ${this.field} needs ${n} bytes, message ends after ${this.end - this.pos}`,
        `a complete ${what}`,
      );
    }
    this.pos += n;
  }

  /** Reads a length varint and returns the bounds of the bytes it announces. */
  private readLengthDelimited(): [number, number] {
    const lengthOffset = this.pos;
    const length = this.readVarint();
    const available = this.end - this.pos;
    if (length > BigInt(available)) {
      throw this.error(
        'TRUNCATED',
        lengthOffset,
        `field ${this.field} length ${length} runs past end of message (${available} bytes left)`,
        'a length that fits in the enclosing message',
      );
    }
    const start = this.pos;
    return [start, start + Number(length)];
  }

  private readUint32Varint(): number {
    const offset = this.pos;
    const v = this.readVarint();
    if (v > UINT32_MAX) {
      throw this.error('BAD_VALUE', offset, `field ${this.field} value ${v} does not fit uint32`, 'a uint32');
    }
    return Number(v);
  }

  /** Reads one varint of at most 10 bytes / 64 bits at `pos`. */
  private readVarint(): bigint {
    const start = this.pos;
    // Up to 7 bytes (49 bits) stay exact in a double; switch to bigint beyond.
    let value = 0;
    let mul = 1;
    let i = 0;
    for (; i < 7; i++) {
      const b = this.varintByte(start, i);
      value += (b & 0x7f) * mul;
      if (b < 0x80) {
        this.pos = start + i + 1;
        return BigInt(value);
      }
      mul *= 128;
    }
    let big = BigInt(value);
    for (; i < 10; i++) {
      const b = this.varintByte(start, i);
      if (i === 9 && b >= 0x80) {
        throw this.error('BAD_VALUE', start, 'varint is longer than 10 bytes', 'a varint of at most 10 bytes');
      }
      if (i === 9 && b > 1) {
        throw this.error('BAD_VALUE', start, 'varint does not fit 64 bits', 'a varint of at most 64 bits');
      }
      big |= BigInt(b & 0x7f) << BigInt(7 * i);
      if (b < 0x80) {
        this.pos = start + i + 1;
        return big;
      }
    }
    throw new Error('unreachable: the loop returns or throws by its tenth byte');
  }

  private varintByte(start: number, i: number): number {
    const at = start + i;
    if (at >= this.end) {
      throw this.error(
        'TRUNCATED',
        start,
        `varint cut off after ${i} byte${i === 1 ? '' : 's'} by the end of the message`,
        'a complete varint',
      );
    }
    return this.buf[at]!;
  }
}

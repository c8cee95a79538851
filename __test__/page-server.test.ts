/**
 * `startPageServer` (src/remote/page-server.ts) on a synthetic image dir, spoken to by a tiny
 * client written here from docs/page-server-protocol.md: handshake, token refusal, GET, MISSING,
 * a malformed frame. Skipped while the binding does not export the page server yet.
 */
import test from 'ava';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { connect, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { native } from '../src/native.js';
import { startPageServer } from '../src/remote/page-server.js';
import { PAGE, PE_LAZY, PE_PRESENT, pagesBytes, writeImageDir } from './helpers/image-writer.js';

const A = 0x10000000n;
const pg = (n: number): bigint => BigInt(n) * BigInt(PAGE);

let hasServer = false;
try {
  hasServer = typeof (native() as unknown as { startPageServer?: unknown }).startPageServer === 'function';
} catch {
  hasServer = false;
}
const maybe = hasServer ? test : test.skip;

/** Reads frames off a socket: [kind, body]. */
function frames(sock: Socket): () => Promise<[number, Buffer]> {
  let buf = Buffer.alloc(0);
  const waiting: (() => void)[] = [];
  sock.on('data', (d) => {
    buf = Buffer.concat([buf, d]);
    waiting.splice(0).forEach((w) => w());
  });
  sock.on('close', () => waiting.splice(0).forEach((w) => w()));
  return async () => {
    for (;;) {
      if (buf.length >= 4) {
        const len = buf.readUInt32LE(0);
        if (buf.length >= 4 + len) {
          const f: [number, Buffer] = [buf[4]!, buf.subarray(5, 4 + len)];
          buf = buf.subarray(4 + len);
          return f;
        }
      }
      if (sock.destroyed || sock.readableEnded) return [-1, Buffer.alloc(0)];
      await new Promise<void>((r) => waiting.push(r));
    }
  };
}

function frame(kind: number, body: Buffer): Buffer {
  const h = Buffer.alloc(5);
  h.writeUInt32LE(body.length + 1, 0);
  h[4] = kind;
  return Buffer.concat([h, body]);
}

function hello(token: string): Buffer {
  const t = Buffer.from(token);
  const b = Buffer.alloc(10);
  b.write('LZPS', 0);
  b.writeUInt16LE(1, 4);
  b[6] = 1; // urgent
  b[7] = 0;
  b.writeUInt16LE(t.length, 8);
  return frame(0x01, Buffer.concat([b, t]));
}

function get(id: number, pid: number, addr: bigint, pages: number): Buffer {
  const b = Buffer.alloc(20);
  b.writeUInt32LE(id, 0);
  b.writeInt32LE(pid, 4);
  b.writeBigUInt64LE(addr, 8);
  b.writeUInt32LE(pages, 16);
  return frame(0x10, b);
}

async function open(port: number): Promise<{ sock: Socket; next: () => Promise<[number, Buffer]> }> {
  const sock = connect(port, '127.0.0.1');
  await new Promise<void>((r, j) => sock.once('connect', r).once('error', j));
  return { sock, next: frames(sock) };
}

maybe('serves lazy pages by (pid, address), refuses a wrong token, closes on a malformed frame', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'lr-page-server-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const imgs = join(dir, 'img');
  writeImageDir(imgs, {
    processes: [
      {
        pid: 42,
        tag: 't42',
        vmas: [{ start: A, end: A + pg(16) }],
        entries: [
          { vaddr: A, nrPages: 1, flags: PE_PRESENT },
          { vaddr: A + pg(2), nrPages: 5, flags: PE_PRESENT | PE_LAZY },
        ],
      },
    ],
  });
  writeFileSync(join(dir, 'tok'), 'sesame\n');
  const logs: string[] = [];
  const server = startPageServer({ imagesDir: imgs, port: 0, tokenFile: join(dir, 'tok'), onLog: (l) => logs.push(l) });
  t.teardown(() => server.close());
  t.is(server.address, '127.0.0.1');
  t.is(server.plan.pages, 5);

  const bad = await open(server.port);
  bad.sock.write(hello('nope'));
  const [k, reason] = await bad.next();
  t.is(k, 0x03);
  t.is(reason.toString(), 'wrong token');
  bad.sock.destroy();

  const c = await open(server.port);
  c.sock.write(hello('sesame'));
  t.is((await c.next())[0], 0x02);
  c.sock.write(get(1, 42, A + pg(3), 2));
  const [pk, body] = await c.next();
  t.is(pk, 0x11);
  t.is(body.readUInt32LE(0), 1);
  t.deepEqual(body.subarray(20), pagesBytes('t42', A + pg(3), 2));
  // The eager page is not held: MISSING, and the connection goes on.
  c.sock.write(get(2, 42, A, 1));
  const [mk, mbody] = await c.next();
  t.is(mk, 0x12);
  t.is(mbody.readUInt16LE(4), 2);
  // A frame longer than the protocol allows: closed, with a reason in the log.
  const huge = Buffer.alloc(4);
  huge.writeUInt32LE(0xffffffff, 0);
  c.sock.write(huge);
  t.is((await c.next())[0], -1);
  await new Promise((r) => setTimeout(r, 100));
  t.true(logs.some((l) => /malformed frame: frame length 4294967295/.test(l)), logs.join('\n'));
  t.like(server.stats(), { refused: 1, badFrames: 1, pagesUrgent: 2 });
});

/**
 * What the link itself does, measured once before the remote rows: a TCP ping-pong (1 byte
 * each way: the round-trip time), one bulk download (the raw rate), and the ping-pong again
 * while a second bulk download runs (what a reply queued behind bulk bytes waits, when nothing
 * gives it priority: these sockets are not marked SO_PRIORITY 6).
 *
 *   node --import tsx bench/lib/remote-probe.ts server ADDR PORT      # prints "listening" on stderr
 *   node --import tsx bench/lib/remote-probe.ts client ADDR PORT [PINGS] [BULK_MIB]   # JSON on stdout
 *
 * Run as separate processes because the two ends live in different network namespaces
 * (bench/lib/remote-rig.ts starts them with nsenter). Protocol: the first byte of a connection
 * says what it is: 'p' then every byte is echoed; 'b' then a u32 (MiB) and the server sends
 * that much and closes.
 */
import { createConnection, createServer, type Socket } from 'node:net';

const CHUNK = Buffer.alloc(1 << 20, 0x5a);

function server(addr: string, port: number): void {
  const srv = createServer((s) => {
    s.setNoDelay(true);
    let mode: 'p' | 'b' | undefined;
    let head = Buffer.alloc(0);
    s.on('data', (d: Buffer) => {
      if (mode === 'p') return void s.write(d);
      head = Buffer.concat([head, d]);
      if (!mode && head.length >= 1) mode = head[0] === 0x62 ? 'b' : 'p';
      if (mode === 'p') {
        if (head.length > 1) s.write(head.subarray(1));
        return;
      }
      if (head.length < 5) return;
      let left = head.readUInt32LE(1);
      const pump = () => {
        while (left > 0) {
          left--;
          if (!s.write(CHUNK)) return void s.once('drain', pump);
        }
        s.end();
      };
      pump();
    });
    s.on('error', () => undefined);
  });
  srv.listen(port, addr, () => process.stderr.write(`probe: listening on ${addr}:${port}\n`));
  const stop = () => srv.close(() => process.exit(0));
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}

function connect(addr: string, port: number): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const s = createConnection({ host: addr, port }, () => resolve(s));
    s.setNoDelay(true);
    s.once('error', reject);
  });
}

function pct(xs: number[], p: number): number {
  const v = [...xs].sort((a, b) => a - b);
  return v[Math.min(v.length - 1, Math.floor((p / 100) * v.length))]!;
}

async function pings(addr: string, port: number, n: number, minMs = 0): Promise<number[]> {
  const s = await connect(addr, port);
  s.write('p');
  const rtts: number[] = [];
  const t0 = performance.now();
  for (let i = 0; i < n + 3 || performance.now() - t0 < minMs; i++) {
    const t = performance.now();
    await new Promise<void>((r) => {
      s.once('data', () => r());
      s.write('x');
    });
    if (i >= 3) rtts.push((performance.now() - t) * 1000); // µs; the first 3 warm up
  }
  s.destroy();
  return rtts;
}

async function bulk(addr: string, port: number, mib: number): Promise<{ bytes: number; ms: number }> {
  const s = await connect(addr, port);
  const req = Buffer.alloc(5);
  req[0] = 0x62;
  req.writeUInt32LE(mib, 1);
  const t = performance.now();
  let bytes = 0;
  s.on('data', (d: Buffer) => (bytes += d.length));
  s.write(req);
  await new Promise<void>((r) => s.once('close', () => r()));
  return { bytes, ms: performance.now() - t };
}

async function client(addr: string, port: number, n: number, mib: number): Promise<void> {
  const idle = await pings(addr, port, n);
  const b = await bulk(addr, port, mib);
  // RTT while a bulk stream fills the queue (pinging for most of the stream's time).
  const loadedBulk = bulk(addr, port, mib);
  await new Promise((r) => setTimeout(r, 50));
  const loaded = await pings(addr, port, Math.max(10, n >> 1), Math.max(100, b.ms * 0.6));
  await loadedBulk;
  const out = {
    rttP50Us: pct(idle, 50),
    rttP99Us: pct(idle, 99),
    rttMinUs: Math.min(...idle),
    pings: idle.length,
    bulkMiB: mib,
    bulkMs: b.ms,
    bulkMBps: b.bytes / 2 ** 20 / (b.ms / 1000),
    loadedRttP50Us: pct(loaded, 50),
    loadedRttP99Us: pct(loaded, 99),
    loadedPings: loaded.length,
  };
  process.stdout.write(JSON.stringify(out) + '\n');
}

const [mode, addr, port, a, b] = process.argv.slice(2);
if (mode === 'server' && addr && port) server(addr, Number(port));
else if (mode === 'client' && addr && port) {
  client(addr, Number(port), Number(a ?? 50), Number(b ?? 64)).then(
    () => process.exit(0),
    (e) => {
      process.stderr.write(`probe: ${(e as Error).message}\n`);
      process.exit(1);
    },
  );
} else {
  process.stderr.write('usage: remote-probe.ts server ADDR PORT | client ADDR PORT [PINGS] [BULK_MIB]\n');
  process.exit(2);
}

/**
 * Remote-pages runs: `lazy-restore page-server` as a subprocess, and CRIU's own page server
 * (`criu dump --lazy-pages`) in the background.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { join } from 'node:path';
import { exited, tail } from '../../src/harness/process.js';
import { startWorkload, killWorkload, type RunningWorkload, type WorkloadOptions } from '../../src/harness/workload.js';
import { CLI } from './lazy.js';

export interface PageServerProc {
  child: ChildProcess;
  port: number;
  exit: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  stderr: () => string;
}

/** `lazy-restore page-server -D imgs --port PORT` (0: any); resolves once it listens. */
export async function startOurPageServer(imgs: string, port = 0, extra: string[] = []): Promise<PageServerProc> {
  const child = spawn(process.execPath, [CLI, 'page-server', '-D', imgs, '--port', String(port), ...extra], {
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  let err = '';
  const exit = exited(child);
  const listening = new Promise<number>((resolve, reject) => {
    const t = setTimeout(() => reject(new Error(`page-server not listening after 30 s: ${err}`)), 30_000);
    child.stderr!.on('data', (d: Buffer) => {
      err += d.toString();
      const m = /listening on [^ ]+:(\d+):/.exec(err);
      if (m) {
        clearTimeout(t);
        resolve(Number(m[1]));
      }
    });
    void exit.then((x) => (clearTimeout(t), reject(new Error(`page-server exited (${x.code ?? x.signal}) before listening: ${err}`))));
  });
  return { child, port: await listening, exit, stderr: () => err };
}

/** A TCP port nobody listens on right now. */
export async function freePort(): Promise<number> {
  const srv = createServer();
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
  const port = (srv.address() as { port: number }).port;
  await new Promise<void>((r) => srv.close(() => r()));
  return port;
}

/** CRIU's page server needs pipes of 4 MiB, more than root gets here without CAP_SYS_RESOURCE. */
export function raisePipeMax(): void {
  const f = '/proc/sys/fs/pipe-max-size';
  if (Number(readFileSync(f, 'utf8')) < 4194304) writeFileSync(f, '4194304');
}

export interface LazyDump {
  w: RunningWorkload;
  imgs: string;
  port: number;
  /** criu dump: it serves the lazy pages until the restore has them all, then exits. */
  dumper: ChildProcess;
  dumpExit: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  logFile: string;
}

/**
 * `criu dump --lazy-pages --port N`: resolves once the page server listens (the images are
 * written then); the dumped task stays a zombie holding its pid, so restore in a pid namespace.
 */
export async function lazyDump(opts: WorkloadOptions, port: number): Promise<LazyDump> {
  raisePipeMax();
  const w = await startWorkload(opts);
  const imgs = join(opts.dir, 'images');
  const logFile = join(imgs, 'dump.log');
  mkdirSync(imgs, { recursive: true });
  const args = ['dump', '-t', String(w.pid), '-D', imgs, '-o', 'dump.log', '-v2', '--lazy-pages'];
  args.push('--address', '127.0.0.1', '--port', String(port), '--status-fd', '3');
  const dumper = spawn('criu', args, { stdio: ['ignore', 'ignore', 'pipe', 'pipe'] });
  let err = '';
  dumper.stderr!.on('data', (d: Buffer) => (err += d.toString()));
  const dumpExit = exited(dumper);
  try {
    // One 0x00 byte on the status fd once the page server listens (images written by then).
    await new Promise<void>((resolve, reject) => {
      const t = setTimeout(() => reject(new Error(`criu dump --lazy-pages: no page server after 60 s\n${tail(logFile)}`)), 60_000);
      (dumper.stdio[3] as NodeJS.ReadableStream).once('data', () => (clearTimeout(t), resolve()));
      void dumpExit.then((x) => (clearTimeout(t), reject(new Error(`criu dump --lazy-pages exited (${x.code ?? x.signal}): ${err}\n${tail(logFile)}`))));
    });
  } catch (e) {
    dumper.kill('SIGKILL');
    killWorkload(w);
    throw e;
  }
  return { w, imgs, port, dumper, dumpExit, logFile };
}

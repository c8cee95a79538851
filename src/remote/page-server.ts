/**
 * `lazy-restore page-server`: serves the lazy pages of a local CRIU image set (a plain
 * `criu dump`) to remote lazy-restore daemons over our own protocol
 * (docs/page-server-protocol.md). The images are read here, with the same plan `serve` uses;
 * the server itself is native (crates/lazy-restore-core/src/remote/server.rs).
 */
import { readFileSync } from 'node:fs';
import { readImages } from '../criu/index.js';
import { planFromImages, type TransferPlan } from '../serve/plan.js';
import { native, NativeBindingError } from '../native.js';

export interface PageServerOptions {
  imagesDir: string;
  /** Numeric address to bind; default 127.0.0.1 (never all interfaces unless asked). */
  address?: string;
  /** 0 = kernel-chosen. */
  port: number;
  /** File holding the shared token clients must present (trailing newline ignored). */
  tokenFile?: string;
  /** Offer lz4 for bulk chunks; default true (clients choose; pays below ~3 Gbit/s). */
  lz4?: boolean;
  /** Server log lines (refused clients, malformed frames, dropped connections). */
  onLog?: (line: string) => void;
}

export interface PageServerStats {
  connections: number;
  refused: number;
  badFrames: number;
  pagesUrgent: number;
  pagesBulk: number;
  bytesSent: number;
}

export interface PageServerHandle {
  address: string;
  port: number;
  plan: TransferPlan;
  stats(): PageServerStats;
  close(): void;
}

export class PageServerError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'PageServerError';
  }
}

/** What this module needs of the binding (crates/lazy-restore-napi/src/remote.rs). */
interface RemoteBinding {
  startPageServer(
    config: {
      address?: string;
      port: number;
      token?: string;
      lz4?: boolean;
      tasks: { pid: number; ranges: { start: bigint; pages: number; file: number; offset: bigint }[] }[];
      files: string[];
    },
    onLog?: (err: Error | null, line: string) => void,
  ): { address: string; port: number; stats(): PageServerStats; close(): void };
}

function remoteBinding(): RemoteBinding {
  const b = native() as unknown as Partial<RemoteBinding>;
  if (typeof b.startPageServer !== 'function') {
    throw new NativeBindingError(
      "this build of lazy-restore's native engine has no page server; rebuild it with `npm run build:native`",
    );
  }
  return b as RemoteBinding;
}

/** Reads a token file: at most 256 bytes, not empty, one trailing newline dropped. */
export function readToken(file: string): string {
  let t: string;
  try {
    t = readFileSync(file, 'utf8');
  } catch (e) {
    throw new PageServerError(`--token-file ${file}: ${(e as Error).message}`);
  }
  t = t.replace(/\r?\n$/, '');
  if (!t) throw new PageServerError(`--token-file ${file} is empty`);
  if (Buffer.byteLength(t) > 256) throw new PageServerError(`--token-file ${file}: the token is longer than 256 bytes`);
  return t;
}

/** Reads the images, builds the plan and starts the native server (listening when this returns). */
export function startPageServer(opts: PageServerOptions): PageServerHandle {
  if (!Number.isInteger(opts.port) || opts.port < 0 || opts.port > 65535) {
    throw new PageServerError(`port ${opts.port} is not 0..65535`);
  }
  const token = opts.tokenFile ? readToken(opts.tokenFile) : undefined;
  const images = readImages(opts.imagesDir);
  const plan = planFromImages(images);
  const onLog = opts.onLog;
  const server = remoteBinding().startPageServer(
    {
      address: opts.address ?? '127.0.0.1',
      port: opts.port,
      token,
      lz4: opts.lz4 ?? true,
      tasks: plan.tasks.map((t) => ({ pid: t.pid, ranges: t.ranges.map((r) => ({ ...r })) })),
      files: plan.files,
    },
    onLog ? (err, line) => onLog(err ? `log error: ${err.message}` : line) : undefined,
  );
  return {
    address: server.address,
    port: server.port,
    plan,
    stats: () => server.stats(),
    close: () => server.close(),
  };
}

/**
 * `serve()`: the lazy-pages daemon as a library. Reads the images, builds the transfer plan,
 * starts the native engine (which binds `lazy-pages.socket` before this returns), and gives
 * back a handle with typed events, live stats, a promise for the end, and close().
 *
 *     import { serve } from 'lazy-restore';
 *     const daemon = serve({ imagesDir: '/tmp/imgs' });
 *     daemon.on('progress', (p) => console.log(p.totals.pagesPending, 'pages to go'));
 *     // ... run `criu restore -D /tmp/imgs --lazy-pages` ...
 *     const report = await daemon.done;
 */
import { EventEmitter } from 'node:events';
import { resolve, join } from 'node:path';
import { readImages } from '../criu/images.js';
import type { ImageSet } from '../criu/types.js';
import { guardianPath, native } from '../native.js';
import { planFromImages, type TransferPlan } from './plan.js';
import { remotePlanFromImages, type RemotePlan } from '../remote/plan.js';
import { policyByName } from '../policy/builtin.js';
import type { Policy } from '../policy/types.js';
import { prefetchFromProfile, profileFromTraces, readProfile, writeProfile, type PrefetchPlan } from '../policy/profile.js';
import type { ServeReport, Snapshot, TaskStats, Phase, Totals } from './types.js';

export type { ServeReport, Snapshot, TaskStats, Phase, Totals } from './types.js';

export interface ServeOptions {
  /** CRIU images dir (`-D`). */
  imagesDir: string;
  /** Where `lazy-pages.socket` is created (`-W`); default: the images dir, as CRIU does. */
  workDir?: string;
  /** Images already read (skips reading them again). */
  images?: ImageSet;
  /** Background chunk size in bytes (default 256 KiB). */
  chunkBytes?: number;
  /** uids allowed to connect (SO_PEERCRED); default [0] (root, like criu restore). */
  allowedUids?: number[];
  /** Kill the restored tree on a fatal error (default true: never run on missing memory). */
  killOnFatal?: boolean;
  /** How often progress events arrive, ms (default 100). */
  progressIntervalMs?: number;
  /** A policy name (`default`, `criu`) or object; default: `default`. */
  policy?: string | Policy;
  /** Prefetch the working set recorded in this profile file first, in its order. */
  profile?: string;
  /**
   * Record the order in which pages are first needed and write it here at the end. The run
   * serves faults without readahead, and holds the background for `recordWindowMs`, so that
   * every first touch in that window is seen (a page the background installed before the
   * process touched it would never fault, and be missing from the profile).
   */
  recordProfile?: string;
  /** With recordProfile: how long the background waits after the restore finished (default 2000 ms). */
  recordWindowMs?: number;
  /**
   * Start `lazy-restore-guardian` with the engine (default true). It holds every userfaultfd
   * too: if this process dies or is killed mid-transfer, the guardian kills the restored tree
   * instead of letting it run on zero pages. `false` runs without it (tests of exactly that).
   * No guardian runs when killOnFatal is false: killing is all it does.
   */
  guardian?: boolean;
  /**
   * Fetch the lazy pages from a page server instead of the images dir's page files: `lazy` is
   * `lazy-restore page-server` (urgent + bulk connections), `criu` is CRIU's own page server
   * (`criu dump --lazy-pages --port N`, one stream).
   */
  source?: RemoteSourceOptions;
}

export type RemoteSourceOptions =
  | {
      kind: 'lazy';
      host: string;
      port: number;
      /** Shared token the server was started with (`--token-file`). */
      token?: string;
      /** Ask for lz4-compressed bulk chunks (pays on slow links only; see docs/page-server-protocol.md). */
      lz4?: boolean;
      /** How long one outage may last (reconnecting) before the restore fails; default 10 000. */
      graceMs?: number;
    }
  | {
      kind: 'criu';
      host: string;
      port: number;
      /** CRIU 4.2's 32-byte request header instead of 4.1's 24 bytes. */
      criu42?: boolean;
      /** Background GET size in pages (default 32: about one bandwidth-delay product at 1 Gbit/s, 1 ms). */
      piecePages?: number;
    };

/** `host:port`, with brackets for an IPv6 host. */
export function hostPort(host: string, port: number): string {
  return host.includes(':') && !host.startsWith('[') ? `[${host}]:${port}` : `${host}:${port}`;
}

/** Failure of a serve run. `code` is stable (e.g. HANDOFF_UNKNOWN_PID, SOURCE_SHORT_READ). */
export class ServeError extends Error {
  constructor(
    message: string,
    readonly code: string,
    /** Host pids the engine killed so they would not run on unrestored memory. */
    readonly killed: number[] = [],
    options?: { cause?: unknown },
  ) {
    super(message, options);
    this.name = 'ServeError';
  }
}

export interface ServeEvents {
  connected: [peer: { pid: number; uid: number; gid: number }];
  task: [info: { pid: number; zombie: boolean }];
  fork: [info: { imagePid: number; parentIndex: number; childIndex: number }];
  phase: [phase: Phase];
  progress: [p: { atUs: number; phase: Phase; totals: Totals; tasks: TaskStats[] }];
  'task-done': [task: TaskStats];
  warning: [message: string];
}

export interface ServeHandle extends EventEmitter<ServeEvents> {
  /** Absolute path of the socket criu restore connects to. */
  readonly socketPath: string;
  readonly plan: TransferPlan;
  readonly images: ImageSet;
  readonly policy: Policy;
  /** What the profile contributed (when `profile` was given and fits these images). */
  readonly prefetch?: PrefetchPlan;
  /** Problems found before the engine started (also emitted as 'warning' events). */
  readonly warnings: string[];
  /** Settles when every page is in (or its task exited); rejects with ServeError. */
  readonly done: Promise<ServeReport>;
  /** Live counters, cheap to call. */
  stats(): Snapshot;
  /** Copy everything that remains at full speed, then end (first SIGINT/SIGTERM). */
  finishFast(): void;
  /** Stop now; if pages are still missing the restored tree is killed. */
  abort(reason: string): void;
  /** Abort if still running and wait for the engine's threads to end. */
  close(): Promise<void>;
}

const SOCKET_NAME = 'lazy-pages.socket';

/**
 * Background hold of a recording run. The lr-bench hot set (26k random pages of 2 GiB) is all
 * touched within ~0.6 s when served by faults alone; with the background running from the
 * start, 20k of them were recorded and the replay's process then faulted on the other 6k.
 */
export const DEFAULT_RECORD_WINDOW_MS = 2000;

/**
 * Starts serving. Throws (synchronously) on bad images, when the socket cannot be bound, and
 * (NativeBindingError) when the binding or the guardian is not built.
 */
export function serve(options: ServeOptions): ServeHandle {
  const images = options.images ?? readImages(options.imagesDir);
  const remotePlan = options.source ? remotePlanFromImages(images, options.source.kind) : undefined;
  const plan: TransferPlan = remotePlan ?? planFromImages(images);
  const basePolicy = typeof options.policy === 'object' ? options.policy : policyByName(options.policy ?? 'default');
  // Recording needs every first touch to fault: readahead would hide the pages it installs.
  let policy: Policy = options.recordProfile
    ? {
        ...basePolicy,
        readahead: { ...basePolicy.readahead, mode: 'off', minPages: 1, maxPages: 1 },
        background: { ...basePolicy.background, startDelayMs: options.recordWindowMs ?? DEFAULT_RECORD_WINDOW_MS },
      }
    : basePolicy;
  if (options.chunkBytes) {
    const c = options.chunkBytes;
    policy = { ...policy, background: { ...policy.background, startChunkBytes: c, maxChunkBytes: c, growBytes: 0 } };
  }
  const warnings: string[] = [];
  let prefetch: PrefetchPlan | undefined;
  if (options.profile) {
    const r = prefetchFromProfile(images, readProfile(options.profile));
    prefetch = r.plan;
    if (r.warning) warnings.push(r.warning);
  }
  const socketPath = join(resolve(options.workDir ?? options.imagesDir), SOCKET_NAME);
  const emitter = new EventEmitter<ServeEvents>();
  const binding = native();
  const killOnFatal = options.killOnFatal ?? true;
  const guardian = options.guardian !== false && killOnFatal ? guardianPath() : undefined;
  type NativeConfig = Parameters<typeof binding.NativeEngine.start>[0];
  let engine: InstanceType<typeof binding.NativeEngine>;
  try {
    const config = {
        socketPath,
        files: plan.files,
        tasks: plan.tasks.map((t) => ({
          pid: t.pid,
          ranges: t.ranges.map((r) => ({ start: r.start, pages: r.pages, file: r.file, offset: r.offset })),
        })),
        chunkBytes: options.chunkBytes,
        allowedUids: options.allowedUids,
        killOnFatal,
        progressIntervalMs: options.progressIntervalMs,
        guardianPath: guardian,
        policy: {
          name: policy.name,
          readahead: policy.readahead,
          background: policy.background,
          prefetch: prefetch?.tasks,
          recordFaults: !!options.recordProfile,
        },
        remote: remotePlan && options.source ? nativeRemote(options.source, remotePlan) : undefined,
      };
    engine = binding.NativeEngine.start(
      config as NativeConfig,
      (err, ev) => {
        if (err || !ev) return;
        dispatch(emitter, ev);
      },
    );
  } catch (e) {
    throw toServeError(e);
  }
  const done = engine.wait().then(
    (native) => {
      const report = { ...(native as unknown as Snapshot), imagesDir: images.dir, socketPath, plannedPages: plan.pages } as ServeReport;
      report.policy = policy.name;
      if (prefetch) report.profile = { used: options.profile!, pages: prefetch.pages, dropped: prefetch.dropped };
      if (options.recordProfile) {
        const traces = report.tasks
          .filter((t) => t.childIndex === 0)
          .map((t) => ({ pid: t.imagePid, trace: (t.faultTrace ?? []).map((f) => ({ addr: BigInt(f.addr), atUs: f.atUs })) }));
        const profile = profileFromTraces(images, traces);
        writeProfile(options.recordProfile, profile);
        report.profile = { recorded: options.recordProfile, pages: profile.tasks.reduce((n, t) => n + t.pages, 0), dropped: 0 };
      }
      // fault traces are for the profile file, not for every report reader
      for (const t of report.tasks) delete t.faultTrace;
      return report;
    },
    (e: unknown) => {
      throw toServeError(e);
    },
  );
  // A rejection nobody awaited yet must not crash the process before the caller attaches.
  done.catch(() => undefined);
  if (warnings.length) setImmediate(() => warnings.forEach((w) => emitter.emit('warning', w)));
  return Object.assign(emitter, {
    socketPath,
    plan,
    images,
    policy,
    prefetch,
    warnings,
    done,
    stats: () => engine.stats() as unknown as Snapshot,
    finishFast: () => engine.finishFast(),
    abort: (reason: string) => engine.abort(reason),
    close: async () => {
      await engine.close();
      await done.catch(() => undefined);
    },
  }) as ServeHandle;
}

function nativeRemote(src: RemoteSourceOptions, plan: RemotePlan) {
  const address = hostPort(src.host, src.port);
  if (src.kind === 'lazy') {
    return { kind: src.kind, address, token: src.token, lz4: src.lz4, graceMs: src.graceMs, pids: plan.pids };
  }
  return {
    kind: src.kind,
    address,
    criu42: src.criu42,
    piecePages: src.piecePages,
    pids: plan.pids,
    lazy: plan.lazy.map((t) => ({ pid: t.pid, starts: t.ranges.map((r) => r[0]), pages: t.ranges.map((r) => r[1]) })),
  };
}

function toServeError(e: unknown): ServeError {
  if (e instanceof ServeError) return e;
  const err = e as Error & { code?: string; killed?: number[] };
  return new ServeError(err.message ?? String(e), err.code ?? 'ENGINE', err.killed ?? [], { cause: e });
}

/** Native events arrive as `{ kind, ... }` objects; re-emit them as typed events. */
function dispatch(emitter: EventEmitter<ServeEvents>, ev: any): void {
  switch (ev.kind) {
    case 'connected':
      emitter.emit('connected', ev.peer);
      break;
    case 'task-received':
      emitter.emit('task', { pid: ev.pid, zombie: ev.zombie });
      break;
    case 'task-forked':
      emitter.emit('fork', { imagePid: ev.imagePid, parentIndex: ev.parentIndex, childIndex: ev.childIndex });
      break;
    case 'phase':
      emitter.emit('phase', ev.phase);
      break;
    case 'progress':
      emitter.emit('progress', { atUs: ev.atUs, phase: ev.phase, totals: ev.totals, tasks: ev.tasks });
      break;
    case 'task-done':
      emitter.emit('task-done', ev.task);
      break;
    case 'warning':
      emitter.emit('warning', ev.message);
      break;
    default:
      break;
  }
}

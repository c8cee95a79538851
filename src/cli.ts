/**
 * The `lazy-restore` command line. Each subcommand parses its flags, calls the library, and
 * turns typed errors into one clear line on stderr and a non-zero exit status.
 */
import { Command, CommanderError, InvalidArgumentError, Option } from 'commander';
import { readImages } from './criu/index.js';
import { ImageError } from './criu/errors.js';
import { inspectJson, inspectText } from './report/inspect.js';
import { native, NativeBindingError } from './native.js';
import { hostPort, serve, ServeError, type RemoteSourceOptions, type ServeHandle } from './serve/serve.js';
import { PlanError } from './serve/plan.js';
import { POLICIES, UnknownPolicyError } from './policy/builtin.js';
import { ProfileError } from './policy/profile.js';
import { summaryText, reportJson } from './report/transfer.js';
import { runDemo } from './demo.js';
import { PageServerError, startPageServer } from './remote/page-server.js';
import { CriuUnavailableError } from './harness/criu.js';
import { appendFileSync, closeSync, readFileSync, writeFileSync, writeSync } from 'node:fs';
import { resolve } from 'node:path';

const VERSION = '0.1.0';

/** Exit statuses, documented in --help. */
export const EXIT = { ok: 0, failure: 1, usage: 2 } as const;

class ReportedError extends Error {
  constructor(readonly exitCode: number, message: string) {
    super(message);
  }
}

function fail(e: unknown): never {
  if (e instanceof ImageError) throw new ReportedError(EXIT.failure, `bad images: ${e.message}`);
  if (e instanceof NativeBindingError) throw new ReportedError(EXIT.failure, e.message);
  if (e instanceof PlanError) throw new ReportedError(EXIT.failure, e.message);
  if (e instanceof UnknownPolicyError) throw new ReportedError(EXIT.usage, e.message);
  if (e instanceof ProfileError) throw new ReportedError(EXIT.failure, e.message);
  if (e instanceof CriuUnavailableError) throw new ReportedError(EXIT.failure, e.message);
  if (e instanceof PageServerError) throw new ReportedError(EXIT.failure, e.message);
  if (e instanceof ServeError) {
    const killed = e.killed.length ? ` (killed the restored tree: pids ${e.killed.join(' ')})` : '';
    throw new ReportedError(EXIT.failure, `serve failed [${e.code}]: ${e.message}${killed}`);
  }
  throw e;
}

export function buildProgram(out: (s: string) => void = (s) => process.stdout.write(s)): Command {
  const program = new Command('lazy-restore')
    .description(
      'Restore a checkpointed process before its memory has arrived: a drop-in replacement for ' +
        "CRIU's `criu lazy-pages` daemon, with a report of what happened.",
    )
    .version(VERSION)
    .showHelpAfterError('(run with --help for usage)')
    .addHelpText(
      'after',
      '\nExit status: 0 success, 1 failure (bad images, restore error), 2 bad usage.\n' +
        'Images are read from a CRIU images dir (criu dump -D DIR); see `lazy-restore inspect --help`.',
    );
  // Set before the subcommands are added so that they inherit it: usage errors anywhere
  // become a CommanderError (exit 2) instead of process.exit(1).
  program.exitOverride();

  program
    .command('inspect')
    .description('Summarise a CRIU images dir: process tree, VMAs, lazy vs eager memory, where pages live')
    .requiredOption('-D, --images-dir <dir>', 'CRIU images directory (as given to criu dump -D)')
    .option('--json', 'print JSON (schema lazy-restore/inspect@1, see docs/inspect-json.md)')
    .addHelpText(
      'after',
      '\nExamples:\n  lazy-restore inspect -D /tmp/imgs\n  lazy-restore inspect -D /tmp/imgs --json | jq .processes[0].totals',
    )
    .action((opts: { imagesDir: string; json?: boolean }) => {
      let set;
      try {
        set = readImages(opts.imagesDir);
      } catch (e) {
        fail(e);
      }
      out(opts.json ? JSON.stringify(inspectJson(set), null, 2) + '\n' : inspectText(set));
    });

  program
    .command('probe')
    .description("Report this kernel's userfaultfd features and whether CRIU's lazy restore can work here")
    .option('--json', 'print JSON')
    .action((opts: { json?: boolean }) => {
      let caps;
      try {
        caps = native().probeUffd();
      } catch (e) {
        if (e instanceof NativeBindingError) fail(e);
        throw new ReportedError(EXIT.failure, `userfaultfd is not usable here: ${(e as Error).message}`);
      }
      if (opts.json) {
        out(JSON.stringify({ coreVersion: native().coreVersion(), ...caps }, null, 2) + '\n');
        return;
      }
      out(
        `userfaultfd features ${caps.featuresHex}: ${caps.features.join(' ')}\n` +
          `API ioctls ${caps.ioctlsHex}: ${caps.ioctls.join(' ')}\n` +
          `fork/remap/remove/unmap events (needed by criu restore --lazy-pages): ${caps.criuNoncoop ? 'yes' : 'NO'}\n`,
      );
    });

  program
    .command('serve')
    .description("Serve a lazy restore: the drop-in replacement for `criu lazy-pages`")
    .option('-D, --images-dir <dir>', 'CRIU images directory', '.')
    .option('-W, --work-dir <dir>', 'where lazy-pages.socket (and a relative log file) go; default: the images dir, as criu does')
    .option('-o, --log-file <file>', 'log here (relative to the work dir) instead of stderr')
    .option('-v, --verbosity [level]', 'log level 0-4 (criu style: -v4, or -vvvv); default 2', parseVerbosity, 2)
    .option('--status-fd <fd>', 'write one 0x00 byte to this fd once the socket is listening, then close it', parseIntArg)
    .option('--pidfile <file>', 'write the daemon pid here (relative to the work dir)')
    .option('--report <file>', 'write the JSON report (schema lazy-restore/serve-report@1) here at the end')
    .option('--json', 'print the JSON report on stdout instead of the summary')
    .option('--chunk <KiB>', 'background chunk size in KiB (overrides the policy)', parseIntArg)
    .addOption(
      new Option('--policy <name>', 'transfer policy (see below)').choices(POLICIES.map((p) => p.name)).default('default'),
    )
    .option('--record-profile <file>', 'record the order pages were first needed (per process) into FILE; this run serves without readahead and holds the background for --record-window')
    .option('--record-window <ms>', 'with --record-profile: background copying starts this long after the restore finished', parseIntArg, 2000)
    .option('--profile <file>', 'prefetch the working set recorded in FILE first, in its order (ignored with a warning if recorded on other images)')
    .option('--page-server', "fetch lazy pages from CRIU's page server (criu dump --lazy-pages --port N), as criu lazy-pages does")
    .option('--address <host>', 'page server host (with --page-server)', '127.0.0.1')
    .option('--port <n>', 'page server port (with --page-server)', parseIntArg)
    .option('--criu-42', "speak CRIU 4.2's page-server header (32 bytes) instead of 4.1's (with --page-server)")
    .option('--source <url>', 'fetch lazy pages from a lazy-restore page-server: lazy://HOST:PORT')
    .option('--token-file <file>', 'the shared token of the lazy-restore page-server (with --source)')
    .option('--lz4', 'ask the lazy-restore page-server for lz4-compressed bulk chunks (slow links)')
    .option('--grace <seconds>', 'with --source: how long the page server may be unreachable (reconnecting) before the restored tree is killed', parseSeconds, 10)
    // Hidden: only for tests that show what happens without the guardian (zero pages).
    .addOption(new Option('--no-guardian', 'run without lazy-restore-guardian (unsafe: see below)').hideHelp())
    .addHelpText(
      'after',
      '\nPolicies:\n' + POLICIES.map((p) => `  ${p.name.padEnd(8)} ${p.summary}`).join('\n') + '\n',
    )
    .addHelpText(
      'after',
      '\nUse it exactly like criu lazy-pages, before criu restore:\n' +
        '  lazy-restore serve -D imgs &\n  criu restore -D imgs --lazy-pages\n\n' +
        'It serves faults first and copies the rest in the background after criu says the restore\n' +
        'finished, then exits 0 once every page is in (or its process exited). On a fatal error\n' +
        '(unreadable images, a failed copy) it kills the restored tree before exiting 1, so no\n' +
        'process runs on memory that was not restored. If this daemon itself dies or is killed\n' +
        'mid-transfer, its guardian process (lazy-restore-guardian, which holds the userfaultfds\n' +
        'too) kills the restored tree instead of letting it run on zero pages. SIGINT/SIGTERM:\n' +
        'finish the transfer at full speed and exit 0; a second signal kills the restored tree and\n' +
        'exits 1.\n\n' +
        'Remote pages (the images dir on this host then only needs the images, not pages-*.img):\n' +
        '  criu dump --lazy-pages --port 27 ...            (source host)\n' +
        '  lazy-restore serve -D imgs --page-server --address SRC --port 27\n' +
        '  lazy-restore page-server -D imgs --port 7070    (source host: one snapshot, many restores)\n' +
        '  lazy-restore serve -D imgs --source lazy://SRC:7070\n' +
        'Faults go first: over their own connection with lazy-restore page-server, and ahead of\n' +
        "capped background requests on CRIU's single stream. If the source stays unreachable, the\n" +
        'restored tree is killed (never left hung, never run on zero pages).',
    )
    .action(async (opts: ServeCliOptions) => {
      await serveCommand(opts, out);
    });

  program
    .command('demo')
    .description('Checkpoint the bundled workload, restore it lazily through lazy-restore, verify every page, print the report')
    .option('--mb <n>', 'memory of the root process in MiB (children get half)', parseIntArg, 256)
    .option('--children <n>', 'forked children', parseIntArg, 2)
    .option('--threads <n>', 'extra threads per process', parseIntArg, 2)
    .option('--keep', 'keep the images and logs')
    .option('--json', 'print the JSON report instead of the summary')
    .option('--timeout <s>', 'give up after this many seconds', parseIntArg, 300)
    .action(async (opts: { mb: number; children: number; threads: number; keep?: boolean; json?: boolean; timeout: number }) => {
      let result;
      try {
        result = await runDemo({
          mb: opts.mb,
          children: opts.children,
          threads: opts.threads,
          keep: !!opts.keep,
          json: !!opts.json,
          timeoutMs: opts.timeout * 1000,
          log: (l) => out(`demo: ${l}\n`),
          out,
        });
      } catch (e) {
        fail(e);
      }
      if (!result.ok) throw new ReportedError(EXIT.failure, 'demo failed: the restored workload did not verify (see above)');
    });

  program
    .command('page-server')
    .description('Serve the lazy pages of a local CRIU image set to remote lazy-restore daemons (docs/page-server-protocol.md)')
    .requiredOption('-D, --images-dir <dir>', 'CRIU images directory (a plain criu dump: pages on disk)')
    .requiredOption('--port <n>', 'TCP port (0: let the kernel choose; the chosen one is printed)', parseIntArg)
    .option('--address <addr>', 'numeric address to bind', '127.0.0.1')
    .option('--token-file <file>', 'clients must present the token in this file')
    .option('--no-lz4', 'never compress bulk chunks (by default clients may ask for lz4)')
    .action(async (opts: { imagesDir: string; port: number; address: string; tokenFile?: string; lz4: boolean }) => {
      await pageServerCommand(opts);
    });

  return program;
}

interface ServeCliOptions {
  imagesDir: string;
  workDir?: string;
  logFile?: string;
  verbosity: number;
  statusFd?: number;
  pidfile?: string;
  report?: string;
  json?: boolean;
  chunk?: number;
  policy: string;
  profile?: string;
  recordProfile?: string;
  recordWindow: number;
  /** false with the hidden --no-guardian. */
  guardian: boolean;
  pageServer?: boolean;
  address: string;
  port?: number;
  criu42?: boolean;
  source?: string;
  tokenFile?: string;
  lz4?: boolean;
  grace: number;
}

function parseSeconds(v: string): number {
  const n = Number(v);
  if (!Number.isFinite(n) || n < 0) throw new InvalidArgumentError(`'${v}' is not a number of seconds`);
  return n;
}

/** The remote source the serve flags ask for, or undefined (local page files). */
function remoteSource(opts: ServeCliOptions): RemoteSourceOptions | undefined {
  const usage = (m: string) => new ReportedError(EXIT.usage, m);
  if (opts.pageServer && opts.source) throw usage('--page-server and --source are two different sources: give one');
  if (opts.pageServer) {
    if (opts.port === undefined) throw usage('--page-server needs --port (the port given to criu dump --lazy-pages)');
    if (opts.port < 1 || opts.port > 65535) throw usage(`--port ${opts.port} is not a TCP port`);
    return { kind: 'criu', host: opts.address, port: opts.port, criu42: !!opts.criu42 };
  }
  if (opts.source) {
    const m = /^lazy:\/\/(\[[^\]]+\]|[^:/]+):(\d+)\/?$/.exec(opts.source);
    if (!m) throw usage(`--source '${opts.source}': expected lazy://HOST:PORT`);
    const port = Number(m[2]);
    if (port < 1 || port > 65535) throw usage(`--source '${opts.source}': ${port} is not a TCP port`);
    let token: string | undefined;
    if (opts.tokenFile) {
      try {
        token = readFileSync(opts.tokenFile, 'utf8').trim();
      } catch (e) {
        throw usage(`--token-file ${opts.tokenFile}: ${(e as Error).message}`);
      }
    }
    return { kind: 'lazy', host: m[1]!.replace(/^\[|\]$/g, ''), port, token, lz4: !!opts.lz4, graceMs: Math.round(opts.grace * 1000) };
  }
  if (opts.port !== undefined || opts.criu42) throw usage('--port and --criu-42 go with --page-server');
  if (opts.tokenFile || opts.lz4) throw usage('--token-file and --lz4 go with --source lazy://HOST:PORT');
  return undefined;
}

function parseIntArg(v: string): number {
  const n = Number(v);
  if (!Number.isInteger(n) || n < 0) throw new InvalidArgumentError(`'${v}' is not a non-negative integer`);
  return n;
}

/** criu accepts -v4 and -vvvv; commander hands us '4' or 'vvv' (or true for a bare -v). */
function parseVerbosity(v: string | boolean): number {
  if (v === true || v === undefined) return 3;
  if (/^v+$/.test(String(v))) return Math.min(4, String(v).length + 1);
  const n = Number(v);
  if (!Number.isInteger(n) || n < 0 || n > 4) throw new InvalidArgumentError(`verbosity '${v}' is not 0-4`);
  return n;
}

async function serveCommand(opts: ServeCliOptions, out: (s: string) => void): Promise<void> {
  const workDir = resolve(opts.workDir ?? opts.imagesDir);
  const logPath = opts.logFile ? resolve(workDir, opts.logFile) : undefined;
  const level = typeof opts.verbosity === 'number' ? opts.verbosity : 2;
  const log = (lvl: number, msg: string) => {
    if (lvl > level) return;
    const line = `lazy-restore: ${msg}\n`;
    if (logPath) appendFileSync(logPath, `(${(performance.now() / 1000).toFixed(6)}) ${line}`);
    else process.stderr.write(line);
  };
  const source = remoteSource(opts);
  let daemon: ServeHandle;
  try {
    daemon = serve({
      source,
      imagesDir: opts.imagesDir,
      workDir,
      chunkBytes: opts.chunk === undefined ? undefined : opts.chunk * 1024,
      policy: opts.policy,
      profile: opts.profile,
      recordProfile: opts.recordProfile,
      recordWindowMs: opts.recordWindow,
      guardian: opts.guardian,
    });
  } catch (e) {
    fail(e);
  }
  if (!opts.guardian) log(1, 'warning: running without a guardian: if this daemon dies mid-transfer, the restored processes read zero pages');
  if (opts.pidfile) writeFileSync(resolve(workDir, opts.pidfile), `${process.pid}\n`);
  const from = source ? `${source.kind === 'criu' ? 'CRIU page server' : 'lazy-restore page-server'} ${hostPort(source.host, source.port)}` : daemon.images.dir;
  log(2, `listening on ${daemon.socketPath}: ${daemon.plan.tasks.length} tasks, ${daemon.plan.pages} lazy pages from ${from}, policy ${daemon.policy.name}`);
  if (daemon.prefetch?.pages) log(2, `profile ${opts.profile}: prefetching ${daemon.prefetch.pages} pages first`);
  if (opts.statusFd !== undefined) {
    try {
      writeSync(opts.statusFd, Buffer.from([0]));
      closeSync(opts.statusFd);
    } catch (e) {
      await daemon.close();
      throw new ReportedError(EXIT.usage, `--status-fd ${opts.statusFd}: ${(e as Error).message}`);
    }
  }
  daemon.on('connected', (p) => log(3, `criu restore connected (pid ${p.pid}, uid ${p.uid})`));
  daemon.on('task', (t) => log(3, t.zombie ? `task ${t.pid}: zombie` : `task ${t.pid}: userfaultfd received`));
  daemon.on('fork', (f) => log(3, `task ${f.imagePid} forked: serving child #${f.childIndex}`));
  daemon.on('phase', (p) => log(3, `phase: ${p}`));
  daemon.on('warning', (m) => log(1, `warning: ${m}`));
  daemon.on('progress', (p) => log(4, `progress: ${p.totals.pagesPending} pages pending, ${p.totals.bytesCopied} bytes copied`));

  let signals = 0;
  const onSignal = (sig: NodeJS.Signals) => {
    signals++;
    if (signals === 1) {
      log(1, `${sig}: finishing the transfer at full speed (${daemon.stats().totals.pagesPending} pages left); signal again to kill the restored tree`);
      daemon.finishFast();
    } else {
      log(0, `${sig} again: killing the restored tree`);
      daemon.abort(`second ${sig}`);
    }
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  try {
    const report = await daemon.done;
    if (opts.report) writeFileSync(resolve(workDir, opts.report), JSON.stringify(reportJson(report), null, 2) + '\n');
    if (opts.json) out(JSON.stringify(reportJson(report), null, 2) + '\n');
    else if (level >= 2) process.stderr.write(summaryText(report));
  } catch (e) {
    fail(e);
  } finally {
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
    await daemon.close();
  }
}

async function pageServerCommand(opts: { imagesDir: string; port: number; address: string; tokenFile?: string; lz4: boolean }): Promise<void> {
  let server;
  try {
    server = startPageServer({ ...opts, onLog: (l) => process.stderr.write(`lazy-restore page-server: ${l}\n`) });
  } catch (e) {
    fail(e);
  }
  process.stderr.write(
    `lazy-restore page-server: listening on ${server.address}:${server.port}: ${server.plan.tasks.length} tasks, ` +
      `${server.plan.pages} lazy pages from ${resolve(opts.imagesDir)}${opts.tokenFile ? ', token required' : ''}\n`,
  );
  await new Promise<void>((done) => {
    const stop = () => {
      process.off('SIGINT', stop);
      process.off('SIGTERM', stop);
      done();
    };
    process.on('SIGINT', stop);
    process.on('SIGTERM', stop);
  });
  const s = server.stats();
  server.close();
  process.stderr.write(
    `lazy-restore page-server: closed after ${s.connections} connections (${s.refused} refused, ${s.badFrames} malformed): ` +
      `${s.pagesUrgent} pages on demand, ${s.pagesBulk} streamed, ${s.bytesSent} bytes sent\n`,
  );
}

/** Runs the CLI; returns the exit status (never calls process.exit, so tests can drive it). */
export async function main(argv: string[]): Promise<number> {
  const program = buildProgram();
  program.configureOutput({ writeErr: (s) => process.stderr.write(s) });
  try {
    await program.parseAsync(argv);
    return EXIT.ok;
  } catch (e) {
    if (e instanceof CommanderError) {
      return e.code === 'commander.helpDisplayed' || e.code === 'commander.version' || e.exitCode === 0 ? EXIT.ok : EXIT.usage;
    }
    if (e instanceof ReportedError) {
      process.stderr.write(`lazy-restore: ${e.message}\n`);
      return e.exitCode;
    }
    process.stderr.write(`lazy-restore: internal error: ${(e as Error).stack ?? e}\n`);
    return EXIT.failure;
  }
}


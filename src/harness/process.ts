/**
 * Small helpers for running the external programs lazy-restore drives (criu, make, the
 * workload): every run is bounded in time and every failure says which command, its exit
 * status and the tail of its log, because "criu failed" alone helps nobody.
 */
import { spawn, type ChildProcess, type SpawnOptions } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';

export class CommandError extends Error {
  constructor(
    message: string,
    readonly command: string,
    readonly exitCode: number | null,
    readonly signal: NodeJS.Signals | null,
    readonly logTail: string,
  ) {
    super(message);
    this.name = 'CommandError';
  }
}

/** The last `lines` lines of a log file, or '' when it does not exist. */
export function tail(file: string, lines = 15): string {
  if (!existsSync(file)) return '';
  const text = readFileSync(file, 'utf8').trimEnd().split('\n');
  return text.slice(-lines).join('\n');
}

export interface RunResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

/** Resolves when `child` exits (also if it already has). */
export function exited(child: ChildProcess): Promise<{ code: number | null; signal: NodeJS.Signals | null }> {
  if (child.exitCode !== null || child.signalCode !== null) {
    return Promise.resolve({ code: child.exitCode, signal: child.signalCode as NodeJS.Signals | null });
  }
  return new Promise((resolve) => child.once('exit', (code, signal) => resolve({ code, signal })));
}

/**
 * Runs a command to completion with a time limit; on timeout it is killed (SIGKILL) and the
 * promise rejects. Output is collected (keep it small).
 */
export async function run(
  cmd: string,
  args: string[],
  opts: SpawnOptions & { timeoutMs?: number; logFile?: string } = {},
): Promise<RunResult> {
  const { timeoutMs = 120_000, logFile, ...spawnOpts } = opts;
  const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], ...spawnOpts });
  let stdout = '';
  let stderr = '';
  child.stdout?.on('data', (d: Buffer) => (stdout += d.toString()));
  child.stderr?.on('data', (d: Buffer) => (stderr += d.toString()));
  const spawnError = new Promise<never>((_, reject) => child.once('error', reject));
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(
        new CommandError(
          `${cmd} ${args.join(' ')}: no answer after ${timeoutMs} ms, killed`,
          cmd,
          null,
          'SIGKILL',
          logFile ? tail(logFile) : stderr.slice(-2000),
        ),
      );
    }, timeoutMs);
  });
  try {
    const { code, signal } = await Promise.race([exited(child), spawnError, timeout]);
    return { code, signal, stdout, stderr };
  } finally {
    clearTimeout(timer);
  }
}

/** Like `run`, but a non-zero exit rejects with the log tail in the message. */
export async function runChecked(
  cmd: string,
  args: string[],
  opts: SpawnOptions & { timeoutMs?: number; logFile?: string } = {},
): Promise<RunResult> {
  const r = await run(cmd, args, opts);
  if (r.code !== 0) {
    const logTail = opts.logFile ? tail(opts.logFile) : (r.stderr || r.stdout).slice(-2000);
    throw new CommandError(
      `${cmd} ${args.join(' ')} failed (${r.signal ? `signal ${r.signal}` : `exit ${r.code}`})` +
        (logTail ? `\n--- ${opts.logFile ?? 'output'} (tail) ---\n${logTail}` : ''),
      cmd,
      r.code,
      r.signal,
      logTail,
    );
  }
  return r;
}

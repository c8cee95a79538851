/**
 * Remote plans (src/remote/plan.ts) on synthetic image dirs: (pid, address) addressing, and
 * which image sets CRIU's page server can serve.
 */
import test from 'ava';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { readImages } from '../src/criu/index.js';
import { remotePlanFromImages } from '../src/remote/plan.js';
import { PlanError } from '../src/serve/plan.js';
import { PAGE, PE_LAZY, PE_PRESENT, writeImageDir, type DirSpec } from './helpers/image-writer.js';

const pg = (n: number): bigint => BigInt(n) * BigInt(PAGE);
const A = 0x10000000n;

function dir(t: { teardown: (fn: () => void) => void }, spec: DirSpec): string {
  const d = mkdtempSync(join(tmpdir(), 'lr-remote-plan-'));
  t.teardown(() => rmSync(d, { recursive: true, force: true }));
  writeImageDir(d, spec);
  return d;
}

const remoteDump: DirSpec = {
  processes: [
    {
      pid: 42,
      vmas: [{ start: A, end: A + pg(64) }],
      entries: [
        { vaddr: A, nrPages: 1, flags: PE_PRESENT }, // eager
        { vaddr: A + pg(4), nrPages: 4, flags: PE_LAZY },
        { vaddr: A + pg(8), nrPages: 2, flags: PE_LAZY }, // adjacent: one range
        { vaddr: A + pg(20), nrPages: 3, flags: PE_LAZY },
      ],
    },
    { pid: 43, vmas: [{ start: A, end: A + pg(8) }], entries: [{ vaddr: A + pg(1), nrPages: 2, flags: PE_LAZY }] },
  ],
};

test('a --lazy-pages dump: ranges addressed by (task index, image address), lazy list for CRIU', (t) => {
  const plan = remotePlanFromImages(readImages(dir(t, remoteDump)), 'criu');
  t.deepEqual(plan.pids, [42, 43]);
  t.is(plan.pages, 11);
  t.deepEqual(plan.tasks[0]!.ranges, [
    { start: A + pg(4), pages: 6, file: 0, offset: A + pg(4) },
    { start: A + pg(20), pages: 3, file: 0, offset: A + pg(20) },
  ]);
  t.deepEqual(plan.tasks[1]!.ranges, [{ start: A + pg(1), pages: 2, file: 1, offset: A + pg(1) }]);
  t.deepEqual(plan.lazy[0]!.ranges, [
    [A + pg(4), 6],
    [A + pg(20), 3],
  ]);
});

test("CRIU's page server cannot serve pages that are on disk; ours can", (t) => {
  const spec: DirSpec = {
    processes: [
      { pid: 7, vmas: [{ start: A, end: A + pg(8) }], entries: [{ vaddr: A, nrPages: 3, flags: PE_PRESENT | PE_LAZY }] },
    ],
  };
  const set = readImages(dir(t, spec));
  const e = t.throws(() => remotePlanFromImages(set, 'criu'), { instanceOf: PlanError });
  t.regex(e!.message, /pid 7: lazy pages at 0x10000000 \(3 pages\).*--lazy-pages/);
  const plan = remotePlanFromImages(set, 'lazy');
  t.deepEqual(plan.tasks[0]!.ranges, [{ start: A, pages: 3, file: 0, offset: A }]);
});

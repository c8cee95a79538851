/**
 * Policies and working-set profiles, without a restore: profile building from fault traces,
 * the fingerprint that ties a profile to its images, clipping to lazy pages, bad files.
 */
import test from 'ava';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { readImages } from '../src/criu/index.js';
import { POLICIES, policyByName, UnknownPolicyError } from '../src/policy/builtin.js';
import { fingerprint, prefetchFromProfile, profileFromTraces, readProfile, ProfileError, writeProfile } from '../src/policy/profile.js';
import { PAGE, PE_LAZY, PE_PRESENT, writeImageDir, type DirSpec } from './helpers/image-writer.js';

const P = BigInt(PAGE);
const base = 0x7f0000000000n;
const pg = (n: number) => base + BigInt(n) * P;

function dirWith(t: { teardown: (fn: () => void) => void }, spec: DirSpec): string {
  const dir = mkdtempSync(join(tmpdir(), 'lr-profile-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  writeImageDir(dir, spec);
  return dir;
}

const oneProc = (entries: { vaddr: bigint; nrPages: number; flags: number }[]): DirSpec => ({
  processes: [{ pid: 7, vmas: [{ start: base, end: pg(64) }], pagesId: 1, entries }],
});

test('built-in policies are named, documented, and the criu one matches CRIU 4.1.1', (t) => {
  t.deepEqual(POLICIES.map((p) => p.name).sort(), ['criu', 'default']);
  for (const p of POLICIES) t.true(p.summary.length > 20);
  const c = policyByName('criu');
  t.is(c.readahead.mode, 'off');
  t.deepEqual([c.background.startChunkBytes, c.background.growBytes, c.background.maxChunkBytes], [65536, 65536, 4 << 20]);
  t.true(c.background.resetOnFault);
  t.is(c.background.tasks, 'one-after-another');
  t.throws(() => policyByName('fastest'), { instanceOf: UnknownPolicyError, message: /known: default, criu/ });
});

test('a profile keeps first-need order, merges consecutive pages, drops repeats', (t) => {
  const dir = dirWith(t, oneProc([{ vaddr: base, nrPages: 64, flags: PE_PRESENT | PE_LAZY }]));
  const set = readImages(dir);
  const trace = [10, 11, 12, 3, 11, 4, 40].map((n, i) => ({ addr: pg(n) + 123n, atUs: 100 + i }));
  const p = profileFromTraces(set, [{ pid: 7, trace }]);
  t.is(p.tasks[0]!.pages, 6);
  t.deepEqual(p.tasks[0]!.runs, [
    [`0x${pg(10).toString(16)}`, 3],
    [`0x${pg(3).toString(16)}`, 2],
    [`0x${pg(40).toString(16)}`, 1],
  ]);
  t.is(p.tasks[0]!.firstUs, 100);
  t.is(p.fingerprint, fingerprint(set));
  const { plan, warning } = prefetchFromProfile(set, p);
  t.is(warning, undefined);
  t.is(plan.pages, 6);
  t.deepEqual(plan.tasks[0]!.ranges, [
    { start: pg(10), pages: 3 },
    { start: pg(3), pages: 2 },
    { start: pg(40), pages: 1 },
  ]);
});

test('profile pages that are not lazy pages of these images are clipped away and counted', (t) => {
  // lazy: pages 0..15 and 32..47; 16..31 are eager (PRESENT only), 48.. are holes
  const dir = dirWith(
    t,
    oneProc([
      { vaddr: base, nrPages: 16, flags: PE_PRESENT | PE_LAZY },
      { vaddr: pg(16), nrPages: 16, flags: PE_PRESENT },
      { vaddr: pg(32), nrPages: 16, flags: PE_PRESENT | PE_LAZY },
    ]),
  );
  const set = readImages(dir);
  const p = profileFromTraces(set, [{ pid: 7, trace: [] }]);
  p.tasks = [{ pid: 7, pages: 40, runs: [[`0x${pg(10).toString(16)}`, 30], [`0x${pg(50).toString(16)}`, 10]] }, { pid: 99, pages: 5, runs: [] }];
  const { plan, warning } = prefetchFromProfile(set, p);
  t.deepEqual(plan.tasks[0]!.ranges, [
    { start: pg(10), pages: 6 },
    { start: pg(32), pages: 8 },
  ]);
  t.is(plan.pages, 14);
  t.is(plan.dropped, 40 - 14 + 5);
  t.regex(warning!, /31 pages are not lazy/);
});

test('a profile recorded on other images is ignored with a warning', (t) => {
  const a = readImages(dirWith(t, oneProc([{ vaddr: base, nrPages: 16, flags: PE_PRESENT | PE_LAZY }])));
  const b = readImages(dirWith(t, oneProc([{ vaddr: base, nrPages: 17, flags: PE_PRESENT | PE_LAZY }])));
  t.not(fingerprint(a), fingerprint(b));
  const p = profileFromTraces(a, [{ pid: 7, trace: [{ addr: base, atUs: 1 }] }]);
  const { plan, warning } = prefetchFromProfile(b, p);
  t.is(plan.pages, 0);
  t.deepEqual(plan.tasks, []);
  t.regex(warning!, /recorded on other images.*ignored/);
});

test('profile files round-trip; malformed ones give a ProfileError naming the file', (t) => {
  const dir = dirWith(t, oneProc([{ vaddr: base, nrPages: 16, flags: PE_PRESENT | PE_LAZY }]));
  const set = readImages(dir);
  const file = join(dir, 'p.json');
  const p = profileFromTraces(set, [{ pid: 7, trace: [{ addr: pg(2), atUs: 5 }] }]);
  writeProfile(file, p);
  t.deepEqual(readProfile(file), p);
  for (const [content, why] of [
    ['{', /JSON|Expected|Unexpected/],
    ['{"schema":"other"}', /not a lazy-restore\/profile@1 file/],
    [JSON.stringify({ ...p, tasks: [{ pid: 7, runs: [['zz', 1]] }] }), /malformed/],
    [JSON.stringify({ ...p, tasks: [{ pid: 7, runs: [['0x1000', 0]] }] }), /malformed/],
  ] as const) {
    writeFileSync(file, content);
    const e = t.throws(() => readProfile(file), { instanceOf: ProfileError });
    t.regex(e!.message, /p\.json/);
    t.regex(e!.message, why);
  }
});

/** Per-test scratch directories under one root, removed unless KEEP_SCRATCH is set. */
import { mkdtempSync, rmSync, mkdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const ROOT = process.env.LR_SCRATCH ?? join(tmpdir(), 'lazy-restore-tests');

export function scratch(name: string): { dir: string; cleanup: () => void } {
  mkdirSync(ROOT, { recursive: true });
  const dir = mkdtempSync(join(ROOT, `${name.replace(/[^a-z0-9-]+/gi, '-')}-`));
  return {
    dir,
    cleanup: () => {
      if (!process.env.KEEP_SCRATCH) rmSync(dir, { recursive: true, force: true });
    },
  };
}

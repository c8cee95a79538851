#!/usr/bin/env node
// The CLI lives in dist/ (compiled TypeScript); say how to build it rather than crash.
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

const cli = new URL('../dist/cli.js', import.meta.url);
if (!existsSync(fileURLToPath(cli))) {
  console.error('lazy-restore: not built yet (no dist/cli.js); run `npm run build` in the package directory');
  process.exit(2);
}
const { main } = await import(cli.href);
process.exitCode = await main(process.argv);

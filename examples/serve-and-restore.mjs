import { serve, readImages } from 'lazy-restore';
import { spawn } from 'node:child_process';

const dir = process.argv[2]; // a CRIU images dir (criu dump -D DIR)
const images = readImages(dir); // throws ImageError (file, offset, what was expected)
for (const p of images.processes) console.log(`pid ${p.pid}: ${p.totals.lazyPages} lazy pages`);

const daemon = serve({ imagesDir: dir, images }); // lazy-pages.socket listens once this returns
daemon.on('progress', (p) => console.log(`${p.totals.pagesPending} pages to go`));

const restore = spawn('criu', ['restore', '-D', dir, '--lazy-pages'], { stdio: 'inherit' });
const restored = new Promise((resolve) => restore.once('exit', resolve)); // criu exits after the tree
const report = await daemon.done; // rejects with ServeError (.code, .killed)
await restored;
console.log(`${report.totals.pagesFault} pages by fault, fault p99 ${report.faultLatency.p99Us} µs`);

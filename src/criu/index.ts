/**
 * The CRIU image reader: `readImages(dir)` turns a CRIU 4.x images directory into an
 * {@link ImageSet}; `pageRuns` and `readPages` say where page bytes live and read them.
 */

export { readImages, pageRuns, readPages } from './images.js';
export { ImageError, PageReadError, type ImageErrorCode, type PageReadErrorCode } from './errors.js';
export { PAGE_SIZE, VMA_STATUS_BITS, vmaCanBeLazy } from './messages.js';
export * from './types.js';

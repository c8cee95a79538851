/**
 * lazy-restore as a library: read CRIU images, serve a lazy restore, render reports.
 *
 *     import { serve, readImages } from 'lazy-restore';
 */
export { readImages, readPages, pageRuns } from './criu/index.js';
export { ImageError } from './criu/errors.js';
export type * from './criu/types.js';
export { PE_LAZY, PE_PARENT, PE_PRESENT } from './criu/types.js';
export { serve, ServeError } from './serve/serve.js';
export type { RemoteSourceOptions, ServeOptions, ServeHandle, ServeEvents, ServeReport, Snapshot, TaskStats, Totals, Phase } from './serve/serve.js';
export { planFromImages, PlanError, type TransferPlan, type PlannedTask, type PlannedRange } from './serve/plan.js';
export { summaryText, reportJson } from './report/transfer.js';
export { inspectJson, inspectText } from './report/inspect.js';
export { NativeBindingError } from './native.js';

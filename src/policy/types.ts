/**
 * A transfer policy: how the engine orders and sizes its work. Policies are plain data (a
 * small, named, documented object); the Rust engine executes them and never calls back into
 * JavaScript per fault. Adding a policy means adding an object here, not touching the loop.
 */

export interface ReadaheadRule {
  /** off: one page per fault; fixed: always maxPages; adaptive: grows on sequential faults, shrinks on random ones. */
  mode: 'off' | 'fixed' | 'adaptive';
  minPages: number;
  maxPages: number;
  /** Align the window to its size (a 16-page window starts at a 64 KiB boundary). */
  align: boolean;
}

export interface BackgroundRule {
  startChunkBytes: number;
  growBytes: number;
  maxChunkBytes: number;
  /** Drop back to startChunkBytes after every fault (CRIU does). */
  resetOnFault: boolean;
  order: 'lowest-address' | 'round-robin' | 'near-faults';
  tasks: 'one-after-another' | 'interleaved';
  /** loop: copy between polls on the fault thread; copier: a thread of its own. */
  thread: 'loop' | 'copier';
  /** Handle every ready event before each chunk (CRIU does). */
  drainBeforeChunk: boolean;
  /**
   * Background chunks (not prefetch) start this many ms after the restore-finished word
   * (default 0). Recording runs hold the background so the profile sees every first touch.
   */
  startDelayMs?: number;
}

export interface Policy {
  name: string;
  /** One line for --help and the README. */
  summary: string;
  readahead: ReadaheadRule;
  background: BackgroundRule;
}

//! Which pages of one task are still to be filled, and where their bytes are.
//!
//! A [`RangeMap`] holds the task's lazy ranges keyed by their **run-time** start address (so a
//! faulting address is found with one ordered lookup, never a scan), each with its **image**
//! address and file position (so data is always read from where the dump put it, even after
//! the task `mremap`ed the range) and a bitmap of the pages still pending. Bits are only ever
//! cleared; a range with no pending page left is removed.

use crate::uffd::PAGE_SIZE;
use std::collections::BTreeMap;

/// A fixed-size set of page indices with a running count and a "nothing set below" hint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bitmap {
    words: Vec<u64>,
    len: u64,
    count: u64,
    /// Every word before this index is zero.
    hint: usize,
}

impl Bitmap {
    /// A bitmap of `len` bits, all set.
    pub fn full(len: u64) -> Self {
        let mut words = vec![u64::MAX; len.div_ceil(64) as usize];
        if len % 64 != 0 {
            if let Some(last) = words.last_mut() {
                *last = (1u64 << (len % 64)) - 1;
            }
        }
        Self {
            words,
            len,
            count: len,
            hint: 0,
        }
    }

    /// Number of bits.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Number of set bits.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// True when no bit is set.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Whether bit `i` is set.
    pub fn get(&self, i: u64) -> bool {
        i < self.len && self.words[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    /// Clears bits `[from, to)` (clamped to the length); returns how many were set.
    pub fn clear_range(&mut self, from: u64, to: u64) -> u64 {
        let to = to.min(self.len);
        if from >= to {
            return 0;
        }
        let mut cleared = 0;
        let mut i = from;
        while i < to {
            let w = (i / 64) as usize;
            let lo = i % 64;
            let hi = (to - (w as u64) * 64).min(64);
            let mask = if hi - lo == 64 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo)) - 1) << lo
            };
            cleared += u64::from((self.words[w] & mask).count_ones());
            self.words[w] &= !mask;
            i = (w as u64 + 1) * 64;
        }
        self.count -= cleared;
        cleared
    }

    /// Sets bits `[from, to)` (clamped to the length); returns how many were clear.
    pub fn set_range(&mut self, from: u64, to: u64) -> u64 {
        let to = to.min(self.len);
        let mut set = 0;
        for i in from..to {
            let (w, b) = ((i / 64) as usize, i % 64);
            if self.words[w] & (1 << b) == 0 {
                self.words[w] |= 1 << b;
                set += 1;
                self.hint = self.hint.min(w);
            }
        }
        self.count += set;
        set
    }

    /// The lowest set bit, if any.
    pub fn first_set(&mut self) -> Option<u64> {
        while self.hint < self.words.len() {
            let w = self.words[self.hint];
            if w != 0 {
                return Some(self.hint as u64 * 64 + u64::from(w.trailing_zeros()));
            }
            self.hint += 1;
        }
        None
    }

    /// The lowest set bit at or after `from`, if any.
    pub fn next_set_from(&self, from: u64) -> Option<u64> {
        if from >= self.len {
            return None;
        }
        let mut w = ((from / 64) as usize).max(self.hint);
        if w > (from / 64) as usize {
            // Everything before the hint is clear.
            return self.scan_words(w);
        }
        let first = self.words[w] & (u64::MAX << (from % 64));
        if first != 0 {
            return Some(w as u64 * 64 + u64::from(first.trailing_zeros()));
        }
        w += 1;
        self.scan_words(w)
    }

    fn scan_words(&self, from_word: usize) -> Option<u64> {
        self.words[from_word.min(self.words.len())..]
            .iter()
            .position(|&x| x != 0)
            .map(|i| {
                let w = from_word + i;
                w as u64 * 64 + u64::from(self.words[w].trailing_zeros())
            })
    }

    /// How many consecutive bits are set starting at `from`, counting at most `max`.
    pub fn run_from(&self, from: u64, max: u64) -> u64 {
        let end = from.saturating_add(max).min(self.len);
        let mut i = from;
        while i < end {
            let avail = 64 - i % 64;
            // Shifting brings zeros in at the top, so the count never exceeds `avail`.
            let ones = u64::from((self.words[(i / 64) as usize] >> (i % 64)).trailing_ones());
            i += ones;
            if ones < avail {
                break;
            }
        }
        i.min(end) - from
    }

    /// Splits off bits `[at, len)` into a new bitmap; `self` keeps `[0, at)`.
    pub fn split_off(&mut self, at: u64) -> Bitmap {
        let at = at.min(self.len);
        let tail_len = self.len - at;
        let mut tail = Bitmap {
            words: vec![0; tail_len.div_ceil(64) as usize],
            len: tail_len,
            count: 0,
            hint: 0,
        };
        for j in 0..tail_len {
            if self.get(at + j) {
                tail.words[(j / 64) as usize] |= 1 << (j % 64);
                tail.count += 1;
            }
        }
        self.clear_range(at, self.len);
        self.len = at;
        self.words.truncate(at.div_ceil(64) as usize);
        self.hint = self.hint.min(self.words.len());
        tail
    }
}

/// One lazy range of a task: a run of pages with one image address and one file position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LazyRange {
    /// Where the range lives in the task now (changes on REMAP).
    pub runtime_start: u64,
    /// Where it lived at dump time (what the page source is asked for).
    pub image_start: u64,
    /// Index into the engine's file list.
    pub file: u32,
    /// File offset of the range's first page.
    pub offset: u64,
    /// Pages still to be filled, by index from `runtime_start`.
    pub pending: Bitmap,
}

impl LazyRange {
    fn end(&self) -> u64 {
        self.runtime_start + self.pending.len() * PAGE_SIZE
    }

    fn span(&self, first: u64, pages: u64) -> PageSpan {
        PageSpan {
            runtime: self.runtime_start + first * PAGE_SIZE,
            image: self.image_start + first * PAGE_SIZE,
            file: self.file,
            offset: self.offset + first * PAGE_SIZE,
            pages,
        }
    }
}

/// A run of pending pages inside one range: where they go, where they came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageSpan {
    /// Run-time address of the first page (the UFFDIO_COPY destination).
    pub runtime: u64,
    /// Image (dump-time) address of the first page.
    pub image: u64,
    /// File index.
    pub file: u32,
    /// File offset of the first page.
    pub offset: u64,
    /// Number of pages.
    pub pages: u64,
}

impl PageSpan {
    /// Length in bytes.
    pub fn bytes(&self) -> u64 {
        self.pages * PAGE_SIZE
    }
}

/// A plan range for [`RangeMap::new`]: image start, pages, file index, file offset.
#[derive(Debug, Clone, Copy)]
pub struct RangeSeed {
    pub start: u64,
    pub pages: u64,
    pub file: u32,
    pub offset: u64,
}

/// The pending lazy ranges of one task, keyed by run-time start address.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeMap {
    ranges: BTreeMap<u64, LazyRange>,
    pending: u64,
}

impl RangeMap {
    /// All pages of all seeds pending, run-time address = image address. Seeds must not
    /// overlap (the engine validates the plan first).
    pub fn new(seeds: impl IntoIterator<Item = RangeSeed>) -> Self {
        let mut map = Self::default();
        for s in seeds {
            if s.pages == 0 {
                continue;
            }
            map.pending += s.pages;
            map.ranges.insert(
                s.start,
                LazyRange {
                    runtime_start: s.start,
                    image_start: s.start,
                    file: s.file,
                    offset: s.offset,
                    pending: Bitmap::full(s.pages),
                },
            );
        }
        map
    }

    /// Pages still pending across all ranges.
    pub fn pending_pages(&self) -> u64 {
        self.pending
    }

    /// Number of ranges with something pending.
    pub fn range_count(&self) -> usize {
        self.ranges.len()
    }

    /// The ranges, lowest run-time address first.
    pub fn iter(&self) -> impl Iterator<Item = &LazyRange> {
        self.ranges.values()
    }

    fn containing(&self, addr: u64) -> Option<&LazyRange> {
        self.ranges
            .range(..=addr)
            .next_back()
            .map(|(_, r)| r)
            .filter(|r| addr < r.end())
    }

    /// If the page holding run-time address `addr` is pending, where it is (one page).
    pub fn pending_page(&self, addr: u64) -> Option<PageSpan> {
        let page = addr & !(PAGE_SIZE - 1);
        let r = self.containing(page)?;
        let idx = (page - r.runtime_start) / PAGE_SIZE;
        r.pending.get(idx).then(|| r.span(idx, 1))
    }

    /// Clears every pending page in run-time `[start, end)`; returns how many were pending.
    /// Used both for "filled" and for "dropped" (unmapped, removed).
    pub fn clear(&mut self, start: u64, end: u64) -> u64 {
        let start = start & !(PAGE_SIZE - 1);
        if start >= end {
            return 0;
        }
        let mut keys: Vec<u64> = Vec::new();
        if let Some((&k, r)) = self.ranges.range(..start).next_back() {
            if r.end() > start {
                keys.push(k);
            }
        }
        keys.extend(self.ranges.range(start..end).map(|(&k, _)| k));
        let mut cleared = 0;
        for k in keys {
            let Some(r) = self.ranges.get_mut(&k) else {
                continue;
            };
            let from = start.saturating_sub(r.runtime_start) / PAGE_SIZE;
            let to = (end - r.runtime_start).div_ceil(PAGE_SIZE);
            cleared += r.pending.clear_range(from, to);
            if r.pending.is_empty() {
                self.ranges.remove(&k);
            }
        }
        self.pending -= cleared;
        cleared
    }

    /// Makes the pages of `span` (run-time address, image address, file position) pending
    /// again — pages handed to the copier that a fork or an mremap means must be copied
    /// (again). Pages inside an existing range set its bits (its layout is the same, since
    /// ranges move whole); the others form a new range. Returns how many became pending.
    pub fn insert_pending(&mut self, span: PageSpan) -> u64 {
        let mut added = 0;
        let mut i = 0;
        while i < span.pages {
            let at = span.runtime + i * PAGE_SIZE;
            if let Some((&k, _)) = self
                .ranges
                .range(..=at)
                .next_back()
                .filter(|(_, r)| at < r.end())
            {
                let r = self.ranges.get_mut(&k).expect("range just found");
                let idx = (at - r.runtime_start) / PAGE_SIZE;
                let n = (span.pages - i).min(r.pending.len() - idx);
                added += r.pending.set_range(idx, idx + n);
                i += n;
                continue;
            }
            // Uncovered: up to the next range's start.
            let next = self.ranges.range(at..).next().map_or(u64::MAX, |(&k, _)| k);
            let n = (span.pages - i).min((next - at) / PAGE_SIZE);
            self.ranges.insert(
                at,
                LazyRange {
                    runtime_start: at,
                    image_start: span.image + i * PAGE_SIZE,
                    file: span.file,
                    offset: span.offset + i * PAGE_SIZE,
                    pending: Bitmap::full(n),
                },
            );
            added += n;
            i += n;
        }
        self.pending += added;
        added
    }

    /// Drops everything (the task exited); returns how many pages were pending.
    pub fn clear_all(&mut self) -> u64 {
        let n = self.pending;
        self.ranges.clear();
        self.pending = 0;
        n
    }

    /// Splits the range containing `addr` (strictly inside it) in two at `addr`.
    fn split_at(&mut self, addr: u64) {
        let Some((&k, r)) = self.ranges.range(..addr).next_back() else {
            return;
        };
        if addr >= r.end() {
            return;
        }
        let Some(r) = self.ranges.get_mut(&k) else {
            return;
        };
        let at = (addr - r.runtime_start) / PAGE_SIZE;
        let tail_bits = r.pending.split_off(at);
        let tail = LazyRange {
            runtime_start: addr,
            image_start: r.image_start + at * PAGE_SIZE,
            file: r.file,
            offset: r.offset + at * PAGE_SIZE,
            pending: tail_bits,
        };
        if r.pending.is_empty() {
            self.ranges.remove(&k);
        }
        if !tail.pending.is_empty() {
            self.ranges.insert(addr, tail);
        }
    }

    /// `mremap` moved run-time `[from, from+len)` to `to`: pending pages there now live at
    /// `to + (addr - from)`; their image address and file position do not change. Whatever
    /// was pending at the destination was replaced by the move and is dropped (returned).
    pub fn remap(&mut self, from: u64, to: u64, len: u64) -> u64 {
        if len == 0 || from == to {
            return 0;
        }
        let from_end = from.saturating_add(len);
        self.split_at(from);
        self.split_at(from_end);
        let keys: Vec<u64> = self.ranges.range(from..from_end).map(|(&k, _)| k).collect();
        let moved: Vec<LazyRange> = keys
            .into_iter()
            .filter_map(|k| self.ranges.remove(&k))
            .collect();
        let moved_pages: u64 = moved.iter().map(|r| r.pending.count()).sum();
        self.pending -= moved_pages;
        let dropped = self.clear(to, to.saturating_add(len));
        for mut r in moved {
            r.runtime_start = to + (r.runtime_start - from);
            self.pending += r.pending.count();
            self.ranges.insert(r.runtime_start, r);
        }
        dropped
    }

    /// The lowest-addressed run of pending pages, at most `max_pages` long, inside one range.
    pub fn next_chunk(&mut self, max_pages: u64) -> Option<PageSpan> {
        let r = self.ranges.values_mut().next()?;
        let first = r.pending.first_set()?;
        let run = r.pending.run_from(first, max_pages.max(1));
        Some(r.span(first, run))
    }

    /// The first run of pending pages at or after run-time address `addr` (wrapping around to
    /// the lowest address), at most `max_pages` long, inside one range.
    pub fn next_chunk_from(&mut self, addr: u64, max_pages: u64) -> Option<PageSpan> {
        let addr = addr & !(PAGE_SIZE - 1);
        let start_key = self
            .ranges
            .range(..=addr)
            .next_back()
            .filter(|(_, r)| addr < r.end())
            .map_or(addr, |(&k, _)| k);
        for (_, r) in self.ranges.range(start_key..) {
            let from = addr.saturating_sub(r.runtime_start) / PAGE_SIZE;
            if let Some(first) = r.pending.next_set_from(from) {
                let run = r.pending.run_from(first, max_pages.max(1));
                return Some(r.span(first, run));
            }
        }
        self.next_chunk(max_pages)
    }

    /// The start of the range after the one holding (or following) run-time `addr`, wrapping
    /// to the lowest range: where a round-robin over ranges goes next.
    pub fn next_range_start(&self, addr: u64) -> Option<u64> {
        self.ranges
            .range(addr.saturating_add(1)..)
            .next()
            .or_else(|| self.ranges.iter().next())
            .map(|(&k, _)| k)
    }

    /// The pending runs inside `[start, end)` (run-time addresses) of the one range holding
    /// run-time address `at`, lowest first. Used to clip a readahead window: it never leaves
    /// the range of the faulting page (a range never spans two VMAs).
    pub fn pending_runs_in(&self, at: u64, start: u64, end: u64, out: &mut Vec<PageSpan>) {
        out.clear();
        let Some(r) = self.containing(at & !(PAGE_SIZE - 1)) else {
            return;
        };
        let lo = start.max(r.runtime_start);
        let hi = end.min(r.end());
        if lo >= hi {
            return;
        }
        let mut i = (lo - r.runtime_start) / PAGE_SIZE;
        let last = (hi - r.runtime_start).div_ceil(PAGE_SIZE);
        while i < last {
            let Some(first) = r.pending.next_set_from(i).filter(|&f| f < last) else {
                break;
            };
            let run = r.pending.run_from(first, last - first);
            out.push(r.span(first, run));
            i = first + run;
        }
    }

    /// Where image address `image` lives now (run-time address), with its range's file
    /// position, if it is inside a range (pending or not). Linear in the number of ranges.
    pub fn image_span(&self, image: u64) -> Option<PageSpan> {
        let page = image & !(PAGE_SIZE - 1);
        self.ranges
            .values()
            .find(|r| page >= r.image_start && page < r.image_start + r.pending.len() * PAGE_SIZE)
            .map(|r| r.span((page - r.image_start) / PAGE_SIZE, 1))
    }

    /// The pieces of image `[image, image + pages*4K)` that lie in ranges (pending or not),
    /// as run-time spans, in image order. Linear in the number of ranges.
    pub fn image_runs(&self, image: u64, pages: u64, out: &mut Vec<PageSpan>) {
        out.clear();
        let start = image & !(PAGE_SIZE - 1);
        let end = start.saturating_add(pages.saturating_mul(PAGE_SIZE));
        for r in self.ranges.values() {
            let r_end = r.image_start + r.pending.len() * PAGE_SIZE;
            let (lo, hi) = (start.max(r.image_start), end.min(r_end));
            if lo < hi {
                out.push(r.span((lo - r.image_start) / PAGE_SIZE, (hi - lo) / PAGE_SIZE));
            }
        }
        out.sort_by_key(|s| s.image);
    }

    /// The range containing run-time `addr`: its run-time start and end.
    pub fn range_bounds(&self, addr: u64) -> Option<(u64, u64)> {
        self.containing(addr & !(PAGE_SIZE - 1))
            .map(|r| (r.runtime_start, r.end()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = PAGE_SIZE;

    fn map() -> RangeMap {
        RangeMap::new([
            RangeSeed {
                start: 0x10000,
                pages: 4,
                file: 0,
                offset: 0,
            },
            RangeSeed {
                start: 0x20000,
                pages: 100,
                file: 1,
                offset: 8 * P,
            },
        ])
    }

    #[test]
    fn bitmap_runs_clears_and_splits() {
        let mut b = Bitmap::full(130);
        assert_eq!(b.count(), 130);
        assert_eq!(b.run_from(0, 1000), 130);
        assert_eq!(b.run_from(60, 10), 10);
        assert_eq!(b.clear_range(62, 66), 4);
        assert_eq!(b.run_from(0, 1000), 62);
        assert_eq!(b.run_from(66, 1000), 64);
        assert_eq!(b.clear_range(0, 62), 62);
        assert_eq!(b.first_set(), Some(66));
        let tail = b.split_off(100);
        assert_eq!((b.len(), b.count()), (100, 34));
        assert_eq!((tail.len(), tail.count()), (30, 30));
        assert_eq!(b.clear_range(0, 1000), 34);
        assert!(b.is_empty());
    }

    #[test]
    fn lookup_finds_pending_pages_only() {
        let mut m = map();
        assert_eq!(m.pending_pages(), 104);
        let s = m.pending_page(0x10000 + 2 * P + 17).unwrap();
        assert_eq!(
            (s.runtime, s.image, s.file, s.offset, s.pages),
            (0x10000 + 2 * P, 0x10000 + 2 * P, 0, 2 * P, 1)
        );
        assert!(
            m.pending_page(0x10000 + 4 * P).is_none(),
            "hole between ranges"
        );
        assert!(m.pending_page(0xffff).is_none());
        let s = m.pending_page(0x20000 + 99 * P).unwrap();
        assert_eq!(s.offset, 8 * P + 99 * P);
        assert_eq!(m.clear(0x20000 + 99 * P, 0x20000 + 100 * P), 1);
        assert!(m.pending_page(0x20000 + 99 * P).is_none());
        assert_eq!(m.pending_pages(), 103);
    }

    #[test]
    fn drop_spans_ranges_and_removes_empty_ones() {
        let mut m = map();
        assert_eq!(m.clear(0x10000 + P, 0x20000 + 2 * P), 3 + 2);
        assert_eq!(m.range_count(), 2);
        assert_eq!(m.clear(0x10000, 0x10000 + P), 1);
        assert_eq!(m.range_count(), 1);
        assert_eq!(m.pending_pages(), 98);
        assert_eq!(m.clear_all(), 98);
        assert!(m.next_chunk(8).is_none());
    }

    #[test]
    fn remap_splits_and_keeps_image_addresses() {
        let mut m = map();
        // Move pages 10..20 of the second range to 0x900000.
        let from = 0x20000 + 10 * P;
        assert_eq!(m.remap(from, 0x90_0000, 10 * P), 0);
        assert_eq!(m.pending_pages(), 104);
        assert_eq!(m.range_count(), 4);
        assert!(m.pending_page(from).is_none(), "old place is empty");
        let s = m.pending_page(0x90_0000 + 3 * P).unwrap();
        assert_eq!(s.image, 0x20000 + 13 * P);
        assert_eq!(s.offset, 8 * P + 13 * P);
        let s = m.pending_page(0x20000 + 20 * P).unwrap();
        assert_eq!((s.image, s.offset), (0x20000 + 20 * P, 8 * P + 20 * P));
        // Chunks never cross a range: the first range's 4 pages come first.
        let c = m.next_chunk(1000).unwrap();
        assert_eq!((c.runtime, c.pages), (0x10000, 4));
        // A remap onto pending pages replaces them.
        assert_eq!(m.remap(0x90_0000, 0x10000, 2 * P), 2);
        assert_eq!(m.pending_page(0x10000).unwrap().image, 0x20000 + 10 * P);
        assert_eq!(m.pending_pages(), 102);
    }

    #[test]
    fn next_set_from_and_chunks_from_an_address() {
        let mut b = Bitmap::full(200);
        b.clear_range(0, 70);
        b.clear_range(130, 140);
        assert_eq!(b.next_set_from(0), Some(70));
        assert_eq!(b.next_set_from(129), Some(129));
        assert_eq!(b.next_set_from(130), Some(140));
        assert_eq!(b.next_set_from(200), None);
        b.clear_range(140, 200);
        assert_eq!(b.next_set_from(131), None);

        let mut m = map();
        // From inside the second range.
        let c = m.next_chunk_from(0x20000 + 7 * P, 4).unwrap();
        assert_eq!((c.runtime, c.pages), (0x20000 + 7 * P, 4));
        // From a hole: the next range.
        let c = m.next_chunk_from(0x15000, 4).unwrap();
        assert_eq!(c.runtime, 0x20000);
        // Past everything: wraps to the lowest.
        let c = m.next_chunk_from(0x90_0000, 4).unwrap();
        assert_eq!(c.runtime, 0x10000);
        // Nothing pending after the address in its range: the next range.
        m.clear(0x10000 + 2 * P, 0x10000 + 4 * P);
        let c = m.next_chunk_from(0x10000 + 3 * P, 4).unwrap();
        assert_eq!(c.runtime, 0x20000);
        assert_eq!(m.next_range_start(0x10000), Some(0x20000));
        assert_eq!(m.next_range_start(0x20000), Some(0x10000));
    }

    #[test]
    fn pending_runs_are_clipped_to_the_window_and_the_range() {
        let mut m = map();
        m.clear(0x20000 + 3 * P, 0x20000 + 5 * P);
        let mut out = Vec::new();
        // Window 0x20000-16 pages.. covering pages 0..8 of the second range.
        m.pending_runs_in(0x20000 + P, 0x20000 - 8 * P, 0x20000 + 8 * P, &mut out);
        let runs: Vec<(u64, u64)> = out.iter().map(|s| (s.runtime, s.pages)).collect();
        assert_eq!(runs, [(0x20000, 3), (0x20000 + 5 * P, 3)]);
        assert_eq!(out[1].offset, 8 * P + 5 * P);
        // Clipped at the range end (the first range has 4 pages).
        m.pending_runs_in(0x10000, 0x10000, 0x10000 + 64 * P, &mut out);
        assert_eq!((out.len(), out[0].pages), (1, 4));
        // Outside any range: nothing.
        m.pending_runs_in(0x15000, 0x15000, 0x16000, &mut out);
        assert!(out.is_empty());
        assert_eq!(m.image_span(0x20000 + 9 * P).unwrap().offset, 8 * P + 9 * P);
        assert!(m.image_span(0x15000).is_none());
        assert_eq!(
            m.range_bounds(0x10000 + 5),
            Some((0x10000, 0x10000 + 4 * P))
        );
        let mut runs = Vec::new();
        m.image_runs(0x10000 + 2 * P, 0x20, &mut runs);
        let got: Vec<(u64, u64, u64)> = runs
            .iter()
            .map(|s| (s.runtime, s.pages, s.offset))
            .collect();
        assert_eq!(got, [(0x10000 + 2 * P, 2, 2 * P), (0x20000, 18, 8 * P)]);
    }

    #[test]
    fn insert_pending_sets_bits_or_makes_ranges() {
        let mut m = map();
        let c = m.next_chunk(8).unwrap();
        m.clear(c.runtime, c.runtime + c.bytes());
        assert_eq!(m.pending_pages(), 100);
        // The first range is gone (empty); putting its pages back recreates it.
        assert_eq!(m.insert_pending(c), 4);
        assert_eq!(m.pending_page(0x10000 + 3 * P).unwrap().offset, 3 * P);
        // Inside the second range: bits only; already pending pages do not count twice.
        m.clear(0x20000, 0x20000 + 10 * P);
        let back = PageSpan {
            runtime: 0x20000 + 5 * P,
            image: 0x20000 + 5 * P,
            file: 1,
            offset: 13 * P,
            pages: 10,
        };
        assert_eq!(m.insert_pending(back), 5);
        assert_eq!(m.pending_pages(), 99);
        assert_eq!(m.range_count(), 2);
        assert_eq!(
            m.next_chunk_from(0x20000, 100).unwrap().runtime,
            0x20000 + 5 * P
        );
    }

    #[test]
    fn next_chunk_takes_contiguous_pending_runs() {
        let mut m = map();
        m.clear(0x10000, 0x10000 + 4 * P);
        m.clear(0x20000 + 5 * P, 0x20000 + 6 * P);
        let c = m.next_chunk(64).unwrap();
        assert_eq!((c.runtime, c.pages, c.offset), (0x20000, 5, 8 * P));
        m.clear(c.runtime, c.runtime + c.bytes());
        let c = m.next_chunk(64).unwrap();
        assert_eq!((c.runtime, c.pages), (0x20000 + 6 * P, 64));
    }
}

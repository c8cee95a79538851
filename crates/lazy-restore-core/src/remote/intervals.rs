//! Sets of byte intervals per pid: what a client already has (so a resumed stream skips it),
//! what a server was told to skip.

use std::collections::{BTreeMap, HashMap};

/// Disjoint, merged half-open intervals `[start, end)` per pid.
#[derive(Debug, Default, Clone)]
pub struct IntervalSet {
    by_pid: HashMap<i32, BTreeMap<u64, u64>>,
}

impl IntervalSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `[a, b)`.
    pub fn insert(&mut self, pid: i32, a: u64, b: u64) {
        if a >= b {
            return;
        }
        let m = self.by_pid.entry(pid).or_default();
        let (mut start, mut end) = (a, b);
        // Merge with a predecessor that touches or overlaps.
        if let Some((&s, &e)) = m.range(..=a).next_back() {
            if e >= a {
                start = s;
                end = end.max(e);
                m.remove(&s);
            }
        }
        // Merge with successors that start inside.
        let next: Vec<(u64, u64)> = m.range(start..=end).map(|(&s, &e)| (s, e)).collect();
        for (s, e) in next {
            end = end.max(e);
            m.remove(&s);
        }
        m.insert(start, end);
    }

    /// The first part of `[a, b)` not in the set, if any.
    pub fn first_gap(&self, pid: i32, a: u64, b: u64) -> Option<(u64, u64)> {
        let Some(m) = self.by_pid.get(&pid) else {
            return (a < b).then_some((a, b));
        };
        let mut x = a;
        if let Some((_, &e)) = m.range(..=x).next_back() {
            x = x.max(e);
        }
        if x >= b {
            return None;
        }
        let y = m.range(x..b).next().map_or(b, |(&s, _)| s);
        Some((x, y.min(b)))
    }

    /// True when all of `[a, b)` is in the set.
    pub fn covers(&self, pid: i32, a: u64, b: u64) -> bool {
        self.first_gap(pid, a, b).is_none()
    }

    /// Every interval, for re-sending.
    pub fn iter(&self) -> impl Iterator<Item = (i32, u64, u64)> + '_ {
        self.by_pid
            .iter()
            .flat_map(|(&p, m)| m.iter().map(move |(&s, &e)| (p, s, e)))
    }

    /// Total bytes covered.
    pub fn bytes(&self) -> u64 {
        self.iter().map(|(_, s, e)| e - s).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_and_finds_gaps() {
        let mut s = IntervalSet::new();
        s.insert(1, 10, 20);
        s.insert(1, 30, 40);
        assert_eq!(s.first_gap(1, 0, 50), Some((0, 10)));
        assert_eq!(s.first_gap(1, 10, 50), Some((20, 30)));
        assert_eq!(s.first_gap(1, 12, 18), None);
        assert_eq!(s.first_gap(2, 12, 18), Some((12, 18)));
        s.insert(1, 20, 30);
        assert!(s.covers(1, 10, 40));
        assert_eq!(s.iter().count(), 1);
        s.insert(1, 5, 45);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![(1, 5, 45)]);
        assert_eq!(s.bytes(), 40);
        assert_eq!(s.first_gap(1, 40, 60), Some((45, 60)));
    }
}

/// Copies into `buf` (the pages of `pid` from image address `addr`) whatever part of `chunks`
/// ((image address, bytes) of that pid, in any order) overlaps it, and notes what was copied
/// in `got`: how the remote sources serve a read from replies that arrived earlier.
pub(crate) fn copy_overlaps<'a>(
    pid: i32,
    addr: u64,
    buf: &mut [u8],
    got: &mut IntervalSet,
    chunks: impl Iterator<Item = (u64, &'a [u8])>,
) {
    let end = addr + buf.len() as u64;
    for (a, data) in chunks {
        let lo = a.max(addr);
        let hi = (a + data.len() as u64).min(end);
        if lo < hi {
            buf[(lo - addr) as usize..(hi - addr) as usize]
                .copy_from_slice(&data[(lo - a) as usize..(hi - a) as usize]);
            got.insert(pid, lo, hi);
        }
    }
}

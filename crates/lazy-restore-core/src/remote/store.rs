//! What a page server holds: per pstree pid, the lazy ranges of a local image set and where
//! their bytes are in the page files. Built from the same [`TaskPlan`]s the engine executes.

use crate::plan::{RangePlan, TaskPlan};
use crate::remote::protocol::{MissingCode, PageRun, PAGE};
use crate::source::{FileSource, PageSource, SourceError};
use std::collections::HashMap;
use std::path::PathBuf;

/// Lazy pages of an image set, readable by (pid, image address).
#[derive(Debug)]
pub struct PageStore {
    /// Task order of the plan (the order of an "all" stream).
    order: Vec<i32>,
    tasks: HashMap<i32, Vec<RangePlan>>,
    files: FileSource,
}

/// Why a store could not be built.
#[derive(Debug)]
pub enum StoreError {
    /// Task {pid}: ranges are not sorted and disjoint (at {start:#x})
    Unsorted { pid: i32, start: u64 },
    /// Task {pid}: range at {start:#x} names file #{file} of {files}
    BadFile { pid: i32, start: u64, file: u32, files: usize },
    /// Task {pid} appears twice
    DuplicatePid { pid: i32 },
    /// Page files: {0}
    Source(SourceError),
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unsorted { pid, start } => {
                write!(f, "task {pid}: ranges are not sorted and disjoint (at {start:#x})")
            }
            Self::BadFile { pid, start, file, files } => {
                write!(f, "task {pid}: range at {start:#x} names pages file #{file}, but only {files} are given")
            }
            Self::DuplicatePid { pid } => write!(f, "task {pid} appears twice"),
            Self::Source(e) => write!(f, "page files: {e}"),
        }
    }
}

impl std::error::Error for StoreError {}

impl PageStore {
    /// Opens the page files and indexes the ranges; checks every file is long enough.
    pub fn open(tasks: Vec<TaskPlan>, files: &[PathBuf]) -> Result<Self, StoreError> {
        let source = FileSource::open(files).map_err(StoreError::Source)?;
        let mut needed = vec![0u64; files.len()];
        let mut order = Vec::new();
        let mut map = HashMap::new();
        for t in tasks {
            let mut prev_end = 0u64;
            for r in &t.ranges {
                let end = r.start.saturating_add(r.pages.saturating_mul(PAGE as u64));
                if r.start < prev_end || r.start % PAGE as u64 != 0 || r.offset % PAGE as u64 != 0 {
                    return Err(StoreError::Unsorted { pid: t.pid, start: r.start });
                }
                let slot = needed.get_mut(r.file as usize).ok_or(StoreError::BadFile {
                    pid: t.pid,
                    start: r.start,
                    file: r.file,
                    files: files.len(),
                })?;
                *slot = (*slot).max(r.offset + r.pages * PAGE as u64);
                prev_end = end;
            }
            order.push(t.pid);
            if map.insert(t.pid, t.ranges).is_some() {
                return Err(StoreError::DuplicatePid { pid: t.pid });
            }
        }
        for (i, n) in needed.iter().enumerate() {
            source.check_len(i as u32, *n).map_err(StoreError::Source)?;
        }
        Ok(Self {
            order,
            tasks: map,
            files: source,
        })
    }

    /// Pids in plan order.
    pub fn pids(&self) -> &[i32] {
        &self.order
    }

    /// Lazy ranges of one task.
    pub fn ranges(&self, pid: i32) -> Option<&[RangePlan]> {
        self.tasks.get(&pid).map(Vec::as_slice)
    }

    /// Total lazy pages held.
    pub fn total_pages(&self) -> u64 {
        self.tasks.values().flatten().map(|r| r.pages).sum()
    }

    /// Every lazy page, as runs of at most `max_pages` that never span two ranges: task by
    /// task in plan order, lowest address first.
    pub fn all_runs(&self, max_pages: u32) -> Vec<PageRun> {
        let mut out = Vec::new();
        for &pid in &self.order {
            for r in &self.tasks[&pid] {
                split_run(
                    PageRun { pid, addr: r.start, pages: r.pages.min(u64::from(u32::MAX)) as u32 },
                    max_pages,
                    &mut out,
                );
            }
        }
        out
    }

    /// Reads `run` into `buf` (exactly `run.pages` pages); every page must be a lazy page of
    /// the task on this server.
    pub fn read(&self, run: PageRun, buf: &mut [u8]) -> Result<(), (MissingCode, String)> {
        let ranges = self.tasks.get(&run.pid).ok_or_else(|| {
            (MissingCode::UnknownPid, format!("no task with pid {} here", run.pid))
        })?;
        let page = PAGE as u64;
        let mut addr = run.addr;
        let mut done = 0usize;
        let want = buf.len();
        while done < want {
            let i = ranges.partition_point(|r| r.start + r.pages * page <= addr);
            let r = ranges.get(i).filter(|r| r.start <= addr).ok_or_else(|| {
                (
                    MissingCode::NotHeld,
                    format!("task {}: page {addr:#x} is not a lazy page held here", run.pid),
                )
            })?;
            let in_range = (r.start + r.pages * page - addr) as usize;
            let n = in_range.min(want - done);
            self.files
                .read(r.file, r.offset + (addr - r.start), &mut buf[done..done + n])
                .map_err(|e| (MissingCode::ReadFailed, e.to_string()))?;
            done += n;
            addr += n as u64;
        }
        Ok(())
    }
}

/// Appends `run` cut into pieces of at most `max_pages`.
pub fn split_run(run: PageRun, max_pages: u32, out: &mut Vec<PageRun>) {
    let max = max_pages.max(1);
    let mut left = run.pages;
    let mut addr = run.addr;
    while left > 0 {
        let n = left.min(max);
        out.push(PageRun { pid: run.pid, addr, pages: n });
        addr += u64::from(n) * PAGE as u64;
        left -= n;
    }
}

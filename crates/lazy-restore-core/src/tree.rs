//! The restored process tree as seen from `/proc`: finding the host pid of a task that
//! announced its image pid, and killing a tree (each served task and all its descendants)
//! without ever hitting an unrelated process that reused a pid.
//!
//! Identity is (pid, starttime from `/proc/<pid>/stat`): recorded when the task is found and
//! compared again right before each signal.

use crate::sys;
use std::collections::HashSet;
use std::fs;

/// A process identified robustly against pid reuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HostProc {
    /// Pid in our pid namespace.
    pub pid: i32,
    /// Start time in clock ticks since boot (`/proc/<pid>/stat` field 22).
    pub starttime: u64,
}

impl HostProc {
    /// Reads the identity of `pid`, if it exists.
    pub fn of(pid: i32) -> Option<Self> {
        starttime(pid).map(|starttime| Self { pid, starttime })
    }

    /// True when `pid` still names the same process.
    pub fn is_same(&self) -> bool {
        starttime(self.pid) == Some(self.starttime)
    }
}

fn starttime(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm may contain spaces and parentheses: fields resume after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    // Field 3 (state) is the first after ')'; starttime is field 22.
    rest.split_whitespace().nth(22 - 3)?.parse().ok()
}

/// The pid of `pid` in its innermost pid namespace (last value of `NSpid`).
fn innermost_pid(pid: i32) -> Option<i32> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("NSpid:"))?;
    line.split_whitespace().last()?.parse().ok()
}

/// Direct children of every thread of `pid` (`/proc/<pid>/task/*/children`).
pub fn children(pid: i32) -> Vec<i32> {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for t in tasks.flatten() {
        if let Ok(s) = fs::read_to_string(t.path().join("children")) {
            out.extend(s.split_whitespace().filter_map(|p| p.parse::<i32>().ok()));
        }
    }
    out
}

/// Finds the host process of a task that announced image pid `vpid`: a descendant of the
/// connecting `criu restore` (`peer`) whose innermost pid is `vpid` (restores into a new pid
/// namespace), else `/proc/<vpid>` itself when it is in our namespace.
pub fn resolve(peer: Option<i32>, vpid: i32) -> Option<HostProc> {
    if let Some(peer) = peer.filter(|&p| p > 0) {
        let mut stack = children(peer);
        let mut seen = HashSet::new();
        while let Some(p) = stack.pop() {
            if !seen.insert(p) || seen.len() > 100_000 {
                continue;
            }
            if innermost_pid(p) == Some(vpid) {
                return HostProc::of(p);
            }
            stack.extend(children(p));
        }
    }
    if innermost_pid(vpid) == Some(vpid) {
        return HostProc::of(vpid);
    }
    None
}

/// Every live descendant of `root` (not `root` itself), each with its identity, if `root` is
/// still the same process. The guardian snapshots these while the daemon lives, so a child
/// that is later reparented away from the tree is still known when the tree must be killed.
pub fn descendants(root: &HostProc) -> Vec<HostProc> {
    let mut out = Vec::new();
    if !root.is_same() {
        return out;
    }
    let mut seen = HashSet::from([root.pid]);
    let mut stack = children(root.pid);
    while let Some(pid) = stack.pop() {
        if !seen.insert(pid) || seen.len() > 100_000 {
            continue;
        }
        if let Some(p) = HostProc::of(pid) {
            out.push(p);
            stack.extend(children(pid));
        }
    }
    out
}

/// SIGKILLs every root and all its descendants. Roots are checked against pid reuse; the tree
/// is first frozen top-down with SIGSTOP (a stopped task cannot fork behind our back), then
/// killed. Never signals this process. Returns the pids killed.
pub fn kill_tree(roots: &[HostProc]) -> Vec<i32> {
    let me = sys::getpid();
    let mut found: Vec<HostProc> = Vec::new();
    let mut seen = HashSet::new();
    let mut stack: Vec<HostProc> = roots.iter().copied().filter(|r| r.is_same()).collect();
    while let Some(p) = stack.pop() {
        if p.pid <= 1 || p.pid == me || !seen.insert(p.pid) || !p.is_same() {
            continue;
        }
        // Best effort: a task that just exited cannot be stopped, and that is fine.
        let _ = sys::kill(p.pid, libc::SIGSTOP);
        found.push(p);
        stack.extend(children(p.pid).into_iter().filter_map(HostProc::of));
    }
    found
        .into_iter()
        .filter(|p| p.is_same() && sys::kill(p.pid, libc::SIGKILL).is_ok())
        .map(|p| p.pid)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_identity_is_stable_and_resolvable() {
        let me = HostProc::of(sys::getpid()).unwrap();
        assert!(me.is_same());
        assert!(me.starttime > 0);
        assert_eq!(resolve(None, me.pid), Some(me));
        assert!(!HostProc {
            pid: me.pid,
            starttime: me.starttime + 1
        }
        .is_same());
    }

    #[test]
    fn kills_a_child_tree_but_never_itself() {
        let mut child = std::process::Command::new("sh")
            .args(["-c", "sleep 30 & sleep 30; wait"])
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        // Wait for the grandchild to appear.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while children(pid).len() < 2 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let kids = children(pid);
        assert_eq!(kids.len(), 2, "sh should have two sleeps");
        let me = HostProc::of(sys::getpid()).unwrap();
        let killed = kill_tree(&[HostProc::of(pid).unwrap(), me]);
        assert!(
            killed.contains(&pid) && kids.iter().all(|k| killed.contains(k)),
            "{killed:?}"
        );
        assert!(!killed.contains(&me.pid));
        let status = child.wait().unwrap();
        assert!(!status.success());
    }
}

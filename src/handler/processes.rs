//! Every process a task started, found and ended with the task: escaped
//! sessions (`setsid`) and daemons included, with no privilege and no cgroup.
//!
//! The worker makes itself a child subreaper (`PR_SET_CHILD_SUBREAPER`) before
//! its first handler starts: a process whose parent dies is then re-parented
//! to the worker, not to init, so whatever a handler starts stays a
//! descendant of the worker. A task's processes are the descendants of its
//! leader, and of the worker's other children (orphans) that carry the task's
//! mark in their environment (`LEASEHOLD_TASK_DIR=<its own directory>`) or
//! were seen in the task's tree before, so an orphan that cleared its
//! environment is still known if a scan saw it first (one runs every second).
//!
//! Reaping: orphans become the worker's children, and their exit statuses
//! must be collected, but `waitpid(-1)` would steal the statuses tokio waits
//! for (other tasks' leaders). Only these are reaped, each by its pid: a
//! zombie known to be one of this task's processes; a zombie child in
//! another session (the worker starts nothing with `setsid`, so it can only
//! be an escaped task process); a zombie in this task's process group other
//! than its leader (tokio reaps the leader).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, waitpid};
use nix::unistd::Pid;

/// How long ending a task's processes may take before the rest is given up.
pub const END_LIMIT: Duration = Duration::from_secs(3);

/// One line of `/proc/PID/stat`, the fields that matter here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcInfo {
    /// Process id.
    pub pid: i32,
    /// Parent's id.
    pub ppid: i32,
    /// Process group.
    pub pgrp: i32,
    /// Session.
    pub session: i32,
    /// Start time since boot, in clock ticks: with `pid`, an identity that
    /// a reused pid does not share.
    pub start: u64,
    /// Exited, not reaped yet.
    pub zombie: bool,
}

/// Parses `/proc/PID/stat` (the name in parentheses may hold anything,
/// parentheses and spaces included: the fields follow its last `)`).
pub fn parse_stat(text: &str) -> Option<ProcInfo> {
    let (head, rest) = text.rsplit_once(')')?;
    let pid = head.split_once(" (")?.0.trim().parse().ok()?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(ProcInfo {
        pid,
        zombie: *fields.first()? == "Z",
        ppid: fields.get(1)?.parse().ok()?,
        pgrp: fields.get(2)?.parse().ok()?,
        session: fields.get(3)?.parse().ok()?,
        start: fields.get(19)?.parse().ok()?,
    })
}

/// How old a `/proc` snapshot the once-a-second scans of running tasks may
/// share: with many slots, one read of `/proc` serves every task's scan.
const SHARED_SCAN_AGE: Duration = Duration::from_millis(500);

/// A snapshot of `/proc` at most [`SHARED_SCAN_AGE`] old, shared by the
/// scans of all running tasks (std `Instant`: this runs on a blocking thread,
/// outside tokio's clock).
#[allow(clippy::disallowed_types)]
fn shared_table() -> std::sync::Arc<Vec<ProcInfo>> {
    use std::sync::{Arc, Mutex};
    use std::time::Instant;
    static LAST: Mutex<Option<(Instant, Arc<Vec<ProcInfo>>)>> = Mutex::new(None);
    let mut last = LAST
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((at, table)) = &*last
        && at.elapsed() < SHARED_SCAN_AGE
    {
        return table.clone();
    }
    let table = Arc::new(read_table());
    *last = Some((Instant::now(), table.clone()));
    table
}

/// Every process this machine's `/proc` shows.
fn read_table() -> Vec<ProcInfo> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        })
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter_map(|s| parse_stat(&s))
        .collect()
}

/// Whether `pid`'s environment holds `mark` (a whole `NAME=value` entry).
fn environ_has(pid: i32, mark: &[u8]) -> bool {
    std::fs::read(format!("/proc/{pid}/environ"))
        .is_ok_and(|env| env.split(|b| *b == 0).any(|entry| entry == mark))
}

/// Makes the worker a child subreaper, once; says so if it cannot.
pub fn become_subreaper() {
    static DONE: std::sync::Once = std::sync::Once::new();
    DONE.call_once(|| {
        if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
            tracing::warn!(error = %e,
                "cannot become a child subreaper: processes that leave a task's tree may outlive the task");
        }
    });
}

/// The processes of one running task.
#[derive(Debug)]
pub struct TaskProcesses {
    /// The worker's pid and session.
    worker: i32,
    worker_session: i32,
    /// The handler's first process (its process group's id), and its start.
    leader: i32,
    leader_start: Option<u64>,
    /// `LEASEHOLD_TASK_DIR=...`: in the environment of every process of the
    /// task that did not clear it.
    mark: Vec<u8>,
    /// Every (pid, start) seen as one of the task's processes.
    known: HashSet<(i32, u64)>,
}

/// What a scan found to do.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Sweep {
    /// The task's live processes.
    pub alive: Vec<i32>,
    /// Zombies to reap by pid.
    pub reap: Vec<i32>,
}

impl TaskProcesses {
    /// The task whose leader is `leader`, its processes marked with `mark`.
    pub fn new(leader: i32, mark: Vec<u8>) -> TaskProcesses {
        let leader_start = std::fs::read_to_string(format!("/proc/{leader}/stat"))
            .ok()
            .and_then(|s| parse_stat(&s))
            .map(|p| p.start);
        TaskProcesses {
            worker: i32::try_from(std::process::id()).unwrap_or(i32::MAX),
            worker_session: nix::unistd::getsid(None).map_or(-1, Pid::as_raw),
            leader,
            leader_start,
            mark,
            known: HashSet::new(),
        }
    }

    /// Which processes of `table` are the task's (recording them) and which
    /// zombies may be reaped. `marked(pid)` reads a process's environment.
    pub fn sweep(&mut self, table: &[ProcInfo], marked: &dyn Fn(i32) -> bool) -> Sweep {
        let mut children: HashMap<i32, Vec<&ProcInfo>> = HashMap::new();
        for p in table {
            children.entry(p.ppid).or_default().push(p);
        }
        let is_leader = |p: &ProcInfo| p.pid == self.leader && Some(p.start) == self.leader_start;
        let mut roots: Vec<&ProcInfo> = table.iter().filter(|p| is_leader(p)).collect();
        for p in children.get(&self.worker).into_iter().flatten() {
            if p.pid != self.leader
                && (self.known.contains(&(p.pid, p.start)) || (!p.zombie && marked(p.pid)))
            {
                roots.push(p);
            }
        }
        let mut members = Vec::new();
        let mut seen = HashSet::new();
        while let Some(p) = roots.pop() {
            if seen.insert(p.pid) {
                members.push(*p);
                roots.extend(children.get(&p.pid).into_iter().flatten());
            }
        }
        let mut sweep = Sweep::default();
        for p in &members {
            self.known.insert((p.pid, p.start));
            if !p.zombie {
                sweep.alive.push(p.pid);
            } else if p.ppid == self.worker && p.pid != self.leader {
                sweep.reap.push(p.pid);
            }
        }
        // Zombies never seen alive: escaped sessions, and the leader's group.
        for p in children.get(&self.worker).into_iter().flatten() {
            let stray =
                p.session != self.worker_session || (p.pgrp == self.leader && p.pid != self.leader);
            if p.zombie && stray && !sweep.reap.contains(&p.pid) {
                sweep.reap.push(p.pid);
            }
        }
        sweep
    }

    /// One look at `/proc` (blocking): records the task's processes and
    /// reaps its zombies; returns the live ones. `fresh` reads `/proc` now
    /// (ending a task); otherwise a snapshot shared with the other tasks'
    /// scans will do (watching one).
    fn scan(&mut self, fresh: bool) -> Vec<i32> {
        let mark = self.mark.clone();
        let table = if fresh {
            std::sync::Arc::new(read_table())
        } else {
            shared_table()
        };
        let sweep = self.sweep(&table, &|pid| environ_has(pid, &mark));
        for pid in sweep.reap {
            let _ = waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG));
        }
        sweep.alive
    }

    /// A scan while the task runs, off the runtime's threads.
    pub async fn watch(mut self) -> TaskProcesses {
        tokio::task::spawn_blocking(move || {
            self.scan(false);
            self
        })
        .await
        .expect("a /proc scan does not panic")
    }

    /// Kills every process of the task (SIGKILL: the task is over) and reaps
    /// them, until none is left or [`END_LIMIT`] passed.
    pub async fn end(self) {
        let mut me = self;
        let started = tokio::time::Instant::now();
        loop {
            let (back, alive) = tokio::task::spawn_blocking(move || {
                let alive = me.scan(true);
                for pid in &alive {
                    let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
                }
                (me, alive)
            })
            .await
            .expect("a /proc scan does not panic");
            me = back;
            if alive.is_empty() {
                return;
            }
            if started.elapsed() > END_LIMIT {
                tracing::warn!(pids = ?alive,
                    "processes of the task are still alive after SIGKILL; they are left behind");
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[cfg(test)]
mod tests;

//! Progress and liveness: each line a handler appends to
//! `LEASEHOLD_PROGRESS_FILE` is a report, free text or a JSON object such as
//! `{"fraction": 0.4, "message": "frame 12/30"}`, and a heartbeat.
//!
//! The file is polled every [`POLL`]: its size, modification time and inode
//! are one `stat`, work on any filesystem (the scratch volume may be
//! anything), and need no watcher to set up or leak. A poll reads at most
//! [`MAX_READ_BYTES`] (the end of what was appended, when more was) and
//! keeps only the latest report, at most [`MAX_REPORT_BYTES`]: a handler
//! writing megabytes of progress costs the worker nothing more.
//!
//! A report moves the slot's `leasehold_task_progress_ratio` gauge at once
//! (when it has a `fraction`), and is published as a `progress` result event
//! at most once per `progress_interval`, the latest report winning. With a
//! `stall_timeout`, a task whose file did not change for that long has
//! stalled, and is killed and retried.

use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde_json::Value;
use tokio::time::Instant;

/// How often the progress file is looked at.
pub const POLL: Duration = Duration::from_secs(1);
/// Bytes read from the progress file per poll, at most.
pub const MAX_READ_BYTES: u64 = 64 * 1024;
/// Longest report kept; a longer line is cut.
pub const MAX_REPORT_BYTES: usize = 4096;
/// `handlers.KIND.progress_interval` when not set.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);

/// One progress report: the handler's JSON object, or `{"message": TEXT}`.
#[derive(Debug, Clone, PartialEq)]
pub struct Report(pub Value);

impl Report {
    /// The report of one line; `None` for a blank one.
    pub fn parse(line: &[u8]) -> Option<Report> {
        let line = &line[..line.len().min(MAX_REPORT_BYTES)];
        let text = String::from_utf8_lossy(line);
        let text = text.trim();
        if text.is_empty() {
            return None;
        }
        match serde_json::from_str::<Value>(text) {
            Ok(value @ Value::Object(_)) => Some(Report(value)),
            _ => Some(Report(serde_json::json!({ "message": text }))),
        }
    }

    /// `fraction`, when it is a number, clamped to 0..1.
    pub fn fraction(&self) -> Option<f64> {
        let f = self.0.get("fraction")?.as_f64()?;
        f.is_finite().then(|| f.clamp(0.0, 1.0))
    }
}

/// What one poll saw.
#[derive(Debug, Default, PartialEq)]
pub struct Poll {
    /// The file changed: the handler is alive.
    pub heartbeat: bool,
    /// The latest complete line, if any arrived.
    pub latest: Option<Report>,
}

/// The progress file, read a bounded amount at a time (blocking I/O).
#[derive(Debug)]
pub struct ProgressFile {
    path: PathBuf,
    /// Bytes consumed so far.
    offset: u64,
    /// What the file looked like at the last poll.
    stamp: Option<Stamp>,
    /// A line whose `\n` has not arrived (at most [`MAX_REPORT_BYTES`]).
    partial: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Stamp {
    len: u64,
    modified: Option<SystemTime>,
    inode: u64,
}

impl ProgressFile {
    /// The file at `path`, as it is now (its contents so far are not reports).
    pub fn new(path: PathBuf) -> ProgressFile {
        let mut file = ProgressFile {
            path,
            offset: 0,
            stamp: None,
            partial: Vec::new(),
        };
        file.stamp = file.stamp();
        file.offset = file.stamp.map_or(0, |s| s.len);
        file
    }

    fn stamp(&self) -> Option<Stamp> {
        let meta = std::fs::metadata(&self.path).ok()?;
        Some(Stamp {
            len: meta.len(),
            modified: meta.modified().ok(),
            inode: meta.ino(),
        })
    }

    /// What changed since the last poll.
    pub fn poll(&mut self) -> Poll {
        let Some(stamp) = self.stamp() else {
            return Poll::default();
        };
        let Some(old) = self.stamp.replace(stamp) else {
            return self.read_from(0, stamp.len);
        };
        if old == stamp {
            return Poll::default();
        }
        // Replaced, truncated, or rewritten in place: read it afresh.
        let rewritten = old.inode != stamp.inode
            || stamp.len < self.offset
            || (stamp.len == self.offset && old.modified != stamp.modified);
        let from = if rewritten {
            self.partial.clear();
            0
        } else {
            self.offset
        };
        self.read_from(from, stamp.len)
    }

    fn read_from(&mut self, offset: u64, len: u64) -> Poll {
        let from = offset.max(len.saturating_sub(MAX_READ_BYTES));
        let mut bytes = Vec::new();
        let read = std::fs::File::open(&self.path).and_then(|mut f| {
            f.seek(SeekFrom::Start(from))?;
            f.take(len - from).read_to_end(&mut bytes)
        });
        if read.is_err() {
            return Poll {
                heartbeat: true,
                latest: None,
            };
        }
        self.offset = from + bytes.len() as u64;
        let mut data = std::mem::take(&mut self.partial);
        if from > offset {
            // Skipped ahead: what precedes the first line end is the middle of a line.
            data.clear();
            let start = bytes
                .iter()
                .position(|b| *b == b'\n')
                .map_or(bytes.len(), |i| i + 1);
            bytes.drain(..start);
        }
        data.extend_from_slice(&bytes);
        let mut lines: Vec<&[u8]> = data.split(|b| *b == b'\n').collect();
        let rest = lines.pop().unwrap_or_default();
        let latest = lines.iter().rev().find_map(|l| Report::parse(l));
        self.partial = rest[..rest.len().min(MAX_REPORT_BYTES)].to_vec();
        Poll {
            heartbeat: true,
            latest,
        }
    }
}

/// At most one published report per interval; the latest one wins.
#[derive(Debug)]
pub struct Throttle {
    interval: Duration,
    last: Option<Instant>,
    pending: Option<Report>,
}

impl Throttle {
    /// A throttle of one report per `interval`.
    pub fn new(interval: Duration) -> Throttle {
        Throttle {
            interval,
            last: None,
            pending: None,
        }
    }

    /// A new report, replacing any not yet published.
    pub fn offer(&mut self, report: Report) {
        self.pending = Some(report);
    }

    /// The report to publish now, if one waits and the interval has passed.
    pub fn due(&mut self, now: Instant) -> Option<Report> {
        if self
            .last
            .is_some_and(|l| now.duration_since(l) < self.interval)
        {
            return None;
        }
        let report = self.pending.take()?;
        self.last = Some(now);
        Some(report)
    }
}

/// Where a running task's reports go: its slot's gauge (reset to 0 when the
/// last clone is dropped, at the task's end), result events, and the latest
/// report for the task's final event. The default goes nowhere.
#[derive(Clone, Default)]
pub struct ProgressSink(Option<Arc<SinkInner>>);

struct SinkInner {
    gauge: prometheus::Gauge,
    publish: Box<dyn Fn(&Value) + Send + Sync>,
    latest: Mutex<Option<Value>>,
}

impl Drop for SinkInner {
    fn drop(&mut self) {
        self.gauge.set(0.0);
    }
}

impl std::fmt::Debug for ProgressSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProgressSink")
            .field("connected", &self.0.is_some())
            .finish()
    }
}

impl ProgressSink {
    /// Reports move `gauge` and are published through `publish`.
    pub fn new(
        gauge: prometheus::Gauge,
        publish: impl Fn(&Value) + Send + Sync + 'static,
    ) -> ProgressSink {
        gauge.set(0.0);
        ProgressSink(Some(Arc::new(SinkInner {
            gauge,
            publish: Box::new(publish),
            latest: Mutex::new(None),
        })))
    }

    /// Every report: the gauge and the latest report.
    pub fn observe(&self, report: &Report) {
        let Some(inner) = &self.0 else { return };
        if let Some(f) = report.fraction() {
            inner.gauge.set(f);
        }
        *inner.latest.lock().expect("progress lock") = Some(report.0.clone());
    }

    /// A report that passed the throttle: a `progress` event.
    pub fn publish(&self, report: &Report) {
        if let Some(inner) = &self.0 {
            (inner.publish)(&report.0);
        }
    }

    /// The latest report, for the task's final result event.
    pub fn latest(&self) -> Option<Value> {
        self.0
            .as_ref()
            .and_then(|inner| inner.latest.lock().expect("progress lock").clone())
    }
}

/// A running task's progress: its file, throttle, heartbeat and sink.
#[derive(Debug)]
pub struct ProgressWatch {
    /// Moved onto a blocking thread for each poll.
    file: Option<ProgressFile>,
    throttle: Throttle,
    stall_timeout: Option<Duration>,
    last_heartbeat: Instant,
    sink: ProgressSink,
}

impl ProgressWatch {
    /// Watches `path` from now: the handler has `stall_timeout` (if any)
    /// from its start to its first report.
    pub fn new(
        path: PathBuf,
        interval: Duration,
        stall_timeout: Option<Duration>,
        sink: ProgressSink,
    ) -> ProgressWatch {
        ProgressWatch {
            file: Some(ProgressFile::new(path)),
            throttle: Throttle::new(interval),
            stall_timeout,
            last_heartbeat: Instant::now(),
            sink,
        }
    }

    async fn poll(&mut self) -> Poll {
        let Some(mut file) = self.file.take() else {
            return Poll::default();
        };
        let (file, poll) = tokio::task::spawn_blocking(move || {
            let poll = file.poll();
            (file, poll)
        })
        .await
        .expect("a progress poll does not panic");
        self.file = Some(file);
        poll
    }

    /// One poll: reports go to the sink. Returns true when the task stalled.
    pub async fn tick(&mut self) -> bool {
        let poll = self.poll().await;
        let now = Instant::now();
        if poll.heartbeat {
            self.last_heartbeat = now;
        }
        if let Some(report) = poll.latest {
            self.sink.observe(&report);
            self.throttle.offer(report);
        }
        if let Some(report) = self.throttle.due(now) {
            self.sink.publish(&report);
        }
        self.stall_timeout
            .is_some_and(|stall| now.duration_since(self.last_heartbeat) >= stall)
    }

    /// The last look, once the handler ended: its final report is kept for
    /// the task's result event, not published as progress.
    pub async fn finish(&mut self) {
        if let Some(report) = self.poll().await.latest {
            self.sink.observe(&report);
        }
    }
}

#[cfg(test)]
mod tests;

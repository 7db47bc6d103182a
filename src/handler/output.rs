//! A handler's stdout and stderr: every byte is read as soon as it is
//! written, cut into lines for the worker's log, and nothing the handler
//! writes can block it, kill it, or grow the worker's memory.
//!
//! - A line ends at `\n`, `\r` or `\r\n`, so a progress bar's `\r` updates
//!   are lines too.
//! - A line longer than [`MAX_LINE_BYTES`] is logged cut, with a marker; the
//!   rest of it is skipped up to its end. Bytes that are not UTF-8 are
//!   replaced with U+FFFD, never an error.
//! - The reader never stops before the end of the stream: closing the pipe
//!   early would kill the handler with SIGPIPE.
//! - Logging is done by one dedicated thread ([`logger`]), fed through a
//!   queue bounded in lines and bytes. The loggers of the worker write
//!   synchronously (to stderr, read by the container runtime), so a line
//!   logged on the runtime's threads would make an output flood delay the
//!   lease loop; the thread takes that wait instead. A stream's reader does
//!   a bounded amount of work per read (a split, a few queue offers) and
//!   never waits on the log: when the queue is full, or a stream passes
//!   [`LINES_PER_SECOND`] (after a burst of [`BURST_LINES`]), lines are
//!   dropped and counted, and the log says how many before the next line
//!   it prints. This also keeps a chatty handler from flooding Cloud
//!   Logging.
//! - Memory is bounded: a read buffer and a line buffer per stream, the last
//!   4 KiB of stderr, and the queue's byte budget shared by every task.

mod logger;
mod splitter;

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::task::JoinHandle;
use tokio::time::Instant;

pub use splitter::{LineSplitter, Tail};

/// Longest line logged whole; longer ones are cut, with a marker.
pub const MAX_LINE_BYTES: usize = 64 * 1024;
/// Bytes read from a pipe at once.
const READ_BYTES: usize = 64 * 1024;
/// Lines per second a stream may log once its burst is spent.
pub const LINES_PER_SECOND: u32 = 1_000;
/// Lines a stream may log at once before the rate applies.
pub const BURST_LINES: u32 = 10_000;

/// Reads `stream` to its end in a task of its own, logging its lines as the
/// handler's `name` stream in the current span; returns the last
/// `tail_bytes` bytes as text (the stderr tail of a failure's result event).
pub fn forward(
    stream: impl AsyncRead + Unpin + Send + 'static,
    name: &'static str,
    tail_bytes: usize,
) -> JoinHandle<String> {
    let log = Arc::new(logger::StreamLog::current(name));
    tokio::spawn(drain(stream, log, tail_bytes))
}

async fn drain(
    mut stream: impl AsyncRead + Unpin,
    log: Arc<logger::StreamLog>,
    tail_bytes: usize,
) -> String {
    let mut buf = vec![0u8; READ_BYTES];
    let mut splitter = LineSplitter::new(MAX_LINE_BYTES);
    let mut sink = LineSink::new(log.clone());
    let mut tail = Tail::new(tail_bytes);
    loop {
        let n = match stream.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // Never seen on a pipe; the stream cannot be read any further.
                log.warn(&format!("reading the handler's output failed: {e}"));
                break;
            }
        };
        let bytes = &buf[..n];
        tail.push(bytes);
        sink.refill(Instant::now());
        splitter.push(bytes, &mut |line, cut| sink.offer(line, cut));
    }
    splitter.finish(&mut |line, cut| sink.offer(line, cut));
    sink.finish();
    tail.text()
}

/// Lines a stream may log: a token bucket of [`BURST_LINES`], refilled at
/// [`LINES_PER_SECOND`].
#[derive(Debug)]
struct LineBudget {
    tokens: f64,
    refilled: Instant,
}

impl LineBudget {
    fn new(now: Instant) -> LineBudget {
        LineBudget {
            tokens: f64::from(BURST_LINES),
            refilled: now,
        }
    }

    /// Adds the lines earned since the last refill (once per read, not per
    /// line: a flood of tiny lines costs a decrement each).
    fn refill(&mut self, now: Instant) {
        let earned = now.duration_since(self.refilled).as_secs_f64() * f64::from(LINES_PER_SECOND);
        self.tokens = (self.tokens + earned).min(f64::from(BURST_LINES));
        self.refilled = now;
    }

    /// Takes one line, if there is one left.
    fn take(&mut self) -> bool {
        let ok = self.tokens >= 1.0;
        if ok {
            self.tokens -= 1.0;
        }
        ok
    }
}

/// One stream's way into the log: its budget and its count of dropped lines.
struct LineSink {
    log: Arc<logger::StreamLog>,
    budget: LineBudget,
    /// Lines dropped since the last one logged.
    dropped: u64,
}

impl LineSink {
    fn new(log: Arc<logger::StreamLog>) -> LineSink {
        LineSink {
            log,
            budget: LineBudget::new(Instant::now()),
            dropped: 0,
        }
    }

    fn refill(&mut self, now: Instant) {
        self.budget.refill(now);
    }

    /// Logs `line` (cut: it was longer than the bound) or counts it dropped.
    /// Blank lines are not logged.
    fn offer(&mut self, line: &[u8], cut: bool) {
        if line.is_empty() {
            return;
        }
        if !self.budget.take() {
            self.dropped += 1;
            return;
        }
        match logger::send(&self.log, line, cut, self.dropped) {
            Ok(()) => self.dropped = 0,
            Err(()) => self.dropped += 1,
        }
    }

    /// Says how many lines were dropped at the end, if any were.
    fn finish(&mut self) {
        if self.dropped > 0 {
            self.log.dropped(self.dropped);
        }
    }
}

/// How long a task's end waits for its pipes to reach their end once every
/// process of the task was killed; past it, their readers are given up.
pub const PIPE_GRACE: Duration = Duration::from_secs(2);

/// The reader's result, or "" when it was still going after [`PIPE_GRACE`]
/// (a process the task could not kill holds the pipe open).
pub async fn finish(reader: Option<JoinHandle<String>>, name: &str) -> String {
    let Some(mut reader) = reader else {
        return String::new();
    };
    if let Ok(joined) = tokio::time::timeout(PIPE_GRACE, &mut reader).await {
        joined.unwrap_or_default()
    } else {
        reader.abort();
        tracing::warn!(
            stream = name,
            "the handler's {name} was still open {} after its processes were killed; no longer read",
            humantime::format_duration(PIPE_GRACE)
        );
        String::new()
    }
}

#[cfg(test)]
mod tests;

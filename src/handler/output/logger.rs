//! The thread that writes handlers' lines to the log, and its bounded queue.
//!
//! One thread for the whole worker, started at the first line: writing a
//! log line may wait (on stderr, or on a slow log collector), and that wait
//! is this thread's, never the runtime's. The queue holds at most
//! [`QUEUE_LINES`] lines and [`QUEUE_BYTES`] bytes, and one stream at most a
//! quarter of each, so one task's flood cannot crowd out another task's lines;
//! a line that does not fit is refused at once and counted dropped by its
//! stream.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, OnceLock};

use tracing::Dispatch;

/// Lines waiting for the logger thread, at most.
pub const QUEUE_LINES: usize = 4096;
/// Bytes of lines waiting for the logger thread, at most.
pub const QUEUE_BYTES: usize = 1024 * 1024;
/// What a queued line costs besides its text (its struct and allocation).
const LINE_OVERHEAD: usize = 64;
/// The share of the queue one stream may hold (lines and bytes), so that one
/// task's flood cannot crowd out every other task's lines.
const STREAM_SHARE: usize = 4;

/// Where one stream's lines go: the task's span, in the subscriber that was
/// current where the handler started (a test's, or the global one).
#[derive(Debug)]
pub struct StreamLog {
    dispatch: Dispatch,
    span: tracing::Span,
    name: &'static str,
    /// This stream's lines and bytes in the queue now.
    queued_lines: AtomicUsize,
    queued_bytes: AtomicUsize,
}

impl StreamLog {
    /// The stream `name` of the task whose span is current.
    pub fn current(name: &'static str) -> StreamLog {
        StreamLog {
            dispatch: tracing::dispatcher::get_default(Dispatch::clone),
            span: tracing::Span::current(),
            name,
            queued_lines: AtomicUsize::new(0),
            queued_bytes: AtomicUsize::new(0),
        }
    }

    /// A line of `cost` bytes left the queue.
    fn release(&self, cost: usize) {
        self.queued_lines.fetch_sub(1, Ordering::AcqRel);
        self.queued_bytes.fetch_sub(cost, Ordering::AcqRel);
    }

    fn in_scope(&self, f: impl FnOnce(&'static str)) {
        tracing::dispatcher::with_default(&self.dispatch, || self.span.in_scope(|| f(self.name)));
    }

    /// Logs a warning about this stream at once (rare: not through the queue).
    pub fn warn(&self, message: &str) {
        self.in_scope(|stream| tracing::warn!(stream, "{message}"));
    }

    /// Says that the stream's last `n` lines were not logged.
    pub fn dropped(&self, n: u64) {
        self.in_scope(|stream| {
            tracing::warn!(
                stream,
                dropped_lines = n,
                "{n} lines of the handler's {stream} were not logged (more than {} lines a second, or the log could not keep up)",
                super::LINES_PER_SECOND
            );
        });
    }
}

/// A line on its way to the log.
struct Line {
    log: Arc<StreamLog>,
    text: String,
    /// The line was longer than the bound and was cut.
    cut: bool,
    /// Lines of the stream dropped just before this one.
    dropped: u64,
    /// Bytes it holds of the queue's budget.
    cost: usize,
}

struct Queue {
    sender: SyncSender<Line>,
    /// Bytes of the lines in the queue.
    bytes: Arc<AtomicUsize>,
}

fn queue() -> &'static Queue {
    static QUEUE: OnceLock<Queue> = OnceLock::new();
    QUEUE.get_or_init(|| {
        let (sender, receiver) = std::sync::mpsc::sync_channel(QUEUE_LINES);
        let bytes = Arc::new(AtomicUsize::new(0));
        let spawned = std::thread::Builder::new()
            .name("handler-output".into())
            .spawn({
                let bytes = bytes.clone();
                move || write_lines(&receiver, &bytes)
            });
        if let Err(e) = spawned {
            // The receiver is gone with the closure: every line is dropped and counted.
            tracing::error!(error = %e, "could not start the handler-output thread; handler output will not be logged");
        }
        Queue { sender, bytes }
    })
}

/// Adds `n` to `counter` if that keeps it within `limit`.
fn reserve(counter: &AtomicUsize, n: usize, limit: usize) -> bool {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
            (v + n <= limit).then_some(v + n)
        })
        .is_ok()
}

/// Queues a line of `log`'s stream (`dropped` lines were dropped just
/// before it), or refuses it at once when the queue, or this stream's share
/// of it, is full.
pub fn send(log: &Arc<StreamLog>, line: &[u8], cut: bool, dropped: u64) -> Result<(), ()> {
    let queue = queue();
    let cost = line.len() + LINE_OVERHEAD;
    if !reserve(&log.queued_lines, 1, QUEUE_LINES / STREAM_SHARE) {
        return Err(());
    }
    if !reserve(&log.queued_bytes, cost, QUEUE_BYTES / STREAM_SHARE) {
        log.queued_lines.fetch_sub(1, Ordering::AcqRel);
        return Err(());
    }
    if !reserve(&queue.bytes, cost, QUEUE_BYTES) {
        log.release(cost);
        return Err(());
    }
    let line = Line {
        log: log.clone(),
        text: String::from_utf8_lossy(line).into_owned(),
        cut,
        dropped,
        cost,
    };
    match queue.sender.try_send(line) {
        Ok(()) => Ok(()),
        Err(TrySendError::Full(line) | TrySendError::Disconnected(line)) => {
            queue.bytes.fetch_sub(line.cost, Ordering::AcqRel);
            line.log.release(line.cost);
            Err(())
        }
    }
}

/// The logger thread: writes each queued line in its task's span.
fn write_lines(receiver: &Receiver<Line>, bytes: &AtomicUsize) {
    while let Ok(line) = receiver.recv() {
        if line.dropped > 0 {
            line.log.dropped(line.dropped);
        }
        let text = &line.text;
        line.log.in_scope(|stream| {
            if line.cut {
                tracing::info!(
                    stream,
                    cut = true,
                    "{text} [… cut: the line is longer than {} KiB]",
                    super::MAX_LINE_BYTES / 1024
                );
            } else {
                tracing::info!(stream, "{text}");
            }
        });
        bytes.fetch_sub(line.cost, Ordering::AcqRel);
        line.log.release(line.cost);
    }
}

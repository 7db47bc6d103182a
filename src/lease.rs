//! Leases: keeping every held message's ack deadline ahead of the clock for
//! as long as its task runs, past Pub/Sub's 10-minute cap, and ending each
//! exactly once.
//!
//! - [`Lease`] (here): one held message, as a value the task must end.
//! - [`book`]: the pure, synchronous record of leases (no I/O, no clock of its
//!   own: every method takes `now`).
//! - [`lease_loop`]: the loop around it that owns the timers, extends, and
//!   tells a task when its lease is lost or past `max_lease`; [`handle`]:
//!   its settings and how the puller and tasks talk to it.
//! - [`sender`]: the batched, deadline-bound RPCs the loop sends.
//! - [`batch`]: cutting ack ids into requests Pub/Sub accepts.

pub mod batch;
pub mod book;
pub mod handle;
pub mod lease_loop;
mod sender;

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use book::{LeaseBook, Round};
pub use handle::{LeaseHandle, LeaseLoopOptions};
pub use lease_loop::LeaseLoop;

use handle::Command;

/// Why a task must stop before its handler ends: its lease says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interruption {
    /// The deadline passed unextended, or Pub/Sub refused the ack id: the
    /// worker can no longer be sure it owns the message.
    Lost,
    /// The lease reached `lease.max_lease`.
    PastMaxLease,
}

/// What a lease's task and its lease loop share.
#[derive(Debug)]
pub(crate) struct Watch {
    /// Cancelled when the task must stop; the reason is in `why`.
    stop: CancellationToken,
    why: OnceLock<Interruption>,
    /// The deadline Pub/Sub has, as the loop last learned it. A std Mutex:
    /// held only to read or write one value.
    expires: Mutex<Instant>,
}

impl Watch {
    pub(crate) fn new(expires: Instant) -> Arc<Watch> {
        Arc::new(Watch {
            stop: CancellationToken::new(),
            why: OnceLock::new(),
            expires: Mutex::new(expires),
        })
    }

    /// Tells the task to stop, once; the first reason stands.
    pub(crate) fn interrupt(&self, why: Interruption) {
        let _ = self.why.set(why);
        self.stop.cancel();
    }

    pub(crate) fn set_expires(&self, expires: Instant) {
        *self.expires.lock().expect("lease watch lock") = expires;
    }
}

/// One held message. Ending it is the only way to change its fate, and each
/// ending takes `self`, so a message is acked, retried, released or
/// abandoned exactly once. Dropped without an ending (a panic, a forgotten
/// branch), it is released at once and the bug is logged, like
/// google-cloud-rust's handler that nacks on drop.
#[derive(Debug)]
pub struct Lease {
    ack_id: String,
    /// The task's id, for the log line of a lease dropped unended.
    task_id: Option<String>,
    loop_: LeaseHandle,
    watch: Arc<Watch>,
    ended: bool,
}

impl Lease {
    fn new(ack_id: String, loop_: LeaseHandle, watch: Arc<Watch>) -> Lease {
        Lease {
            ack_id,
            task_id: None,
            loop_,
            watch,
            ended: false,
        }
    }

    /// The message's ack id.
    pub fn ack_id(&self) -> &str {
        &self.ack_id
    }

    /// Names the task held, for logs about this lease.
    pub fn set_task_id(&mut self, task_id: &str) {
        self.task_id = Some(task_id.to_string());
    }

    /// Cancelled when the lease loop says the task must stop (see
    /// [`interruption`](Self::interruption) for why).
    pub fn stop_signal(&self) -> CancellationToken {
        self.watch.stop.clone()
    }

    /// Why the task must stop, if it must: what the loop said, or `Lost` when
    /// the deadline has passed even if the loop has not said so yet (a worker
    /// that was frozen wakes up with both due at once).
    pub fn interruption(&self) -> Option<Interruption> {
        if let Some(why) = self.watch.why.get() {
            return Some(*why);
        }
        let expires = *self.watch.expires.lock().expect("lease watch lock");
        (Instant::now() >= expires).then_some(Interruption::Lost)
    }

    /// Done for good (succeeded, or dead-lettered): acknowledge.
    pub fn ack(mut self) {
        self.end(Command::Ack(self.ack_id.clone()));
    }

    /// Stop leasing; the message comes back after `delay` (a retry's backoff,
    /// at most Pub/Sub's 600 s).
    pub fn retry_after(mut self, delay: Duration) {
        let secs = u32::try_from(delay.as_secs().min(600)).unwrap_or(600);
        self.end(Command::Modify(self.ack_id.clone(), secs));
    }

    /// Hand the message back now, for any worker to take.
    pub fn release(mut self) {
        self.end(Command::Modify(self.ack_id.clone(), 0));
    }

    /// The lease is lost: stop tracking it and send nothing (Pub/Sub has
    /// already given the message, or will give it, to another worker).
    pub fn abandon(mut self) {
        self.end(Command::Forget(self.ack_id.clone()));
    }

    fn end(&mut self, command: Command) {
        self.ended = true;
        self.loop_.send(command);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if !self.ended {
            tracing::error!(task_id = self.task_id.as_deref().unwrap_or("(not decoded)"),
                ack_id = %self.ack_id,
                "bug: a lease was dropped without being ended; releasing the message for redelivery");
            self.loop_.send(Command::Modify(self.ack_id.clone(), 0));
        }
    }
}

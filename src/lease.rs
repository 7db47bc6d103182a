//! Leases: keeping every held message's ack deadline ahead of the clock for
//! as long as its task runs, past Pub/Sub's 10-minute cap, and ending each
//! exactly once.
//!
//! - [`Lease`] (here): one held message, as a value the task must end.
//! - [`book`]: the pure, synchronous record of leases (no I/O, no clock of its
//!   own: every method takes `now`).
//! - [`lease_loop`]: the loop around it that owns the timers and sends
//!   batched `ModifyAckDeadline` and Acknowledge calls through
//!   [`crate::pubsub::DataPlane`].

pub mod book;
pub mod lease_loop;

use std::time::Duration;

pub use book::{LeaseBook, Round};
pub use lease_loop::{LeaseHandle, LeaseLoop, LeaseLoopOptions};

use lease_loop::Command;

/// One held message. Ending it is the only way to change its fate, and each
/// ending takes `self`, so a message is acked, retried or released exactly
/// once. Dropped without an ending (a panic, a forgotten branch), it is
/// released at once and the bug is logged, like google-cloud-rust's handler
/// that nacks on drop.
#[derive(Debug)]
pub struct Lease {
    ack_id: String,
    /// The task's id, for the log line of a lease dropped unended.
    task_id: Option<String>,
    loop_: LeaseHandle,
    ended: bool,
}

impl Lease {
    fn new(ack_id: String, loop_: LeaseHandle) -> Lease {
        Lease {
            ack_id,
            task_id: None,
            loop_,
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

    /// Done for good (succeeded, or dead-lettered): acknowledge.
    pub fn ack(mut self) {
        self.end(Command::Ack(self.ack_id.clone()));
    }

    /// Stop leasing; the message comes back after `delay` (a retry's backoff,
    /// at most Pub/Sub's 600 s).
    pub fn retry_after(mut self, delay: Duration) {
        let secs = delay.as_secs().min(600) as u32;
        self.end(Command::Modify(self.ack_id.clone(), secs));
    }

    /// Hand the message back now, for any worker to take.
    pub fn release(mut self) {
        self.end(Command::Modify(self.ack_id.clone(), 0));
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

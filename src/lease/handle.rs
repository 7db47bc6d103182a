//! How the rest of the worker talks to a subscription's lease loop: the
//! loop's settings, the commands it takes, and the handle the puller turns
//! pulled messages into [`Lease`]s with.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::lease::{Lease, Watch};

/// Settings of one lease loop.
#[derive(Debug, Clone)]
pub struct LeaseLoopOptions {
    /// Full subscription path for RPCs.
    pub subscription: String,
    /// Subscription id for metric labels and logs.
    pub label: String,
    /// The deadline assumed for a freshly pulled message (see `worker`).
    pub first_deadline: Duration,
    /// What each extension asks for.
    pub extension: Duration,
    /// A task whose lease reaches this age is told to stop.
    pub max_lease: Duration,
    /// How long acks wait to be batched with others.
    pub ack_flush: Duration,
    /// How long an ack or deadline change is retried before giving up (the
    /// message is then redelivered: at-least-once).
    pub give_up_after: Duration,
}

impl Default for LeaseLoopOptions {
    fn default() -> Self {
        LeaseLoopOptions {
            subscription: String::new(),
            label: String::new(),
            first_deadline: Duration::from_secs(10),
            extension: Duration::from_secs(60),
            max_lease: Duration::from_secs(24 * 3600),
            ack_flush: Duration::from_millis(20),
            give_up_after: Duration::from_secs(60),
        }
    }
}

/// What leases and the puller tell the loop.
#[derive(Debug)]
pub(super) enum Command {
    /// Start leasing these freshly pulled messages.
    Hold(Vec<(String, Arc<Watch>)>),
    /// The task succeeded (or was dead-lettered): acknowledge.
    Ack(String),
    /// Stop leasing and set this deadline: a retry's backoff, or 0 to release.
    Modify(String, u32),
    /// Stop leasing a lost lease; send nothing.
    Forget(String),
}

/// The sender side of one subscription's lease loop: the puller's, to turn
/// pulled messages into [`Lease`]s.
#[derive(Clone, Debug)]
pub struct LeaseHandle {
    tx: mpsc::UnboundedSender<Command>,
    first_deadline: Duration,
}

impl LeaseHandle {
    /// The handle of a loop reading commands from `tx`'s channel.
    pub(super) fn new(tx: mpsc::UnboundedSender<Command>, first_deadline: Duration) -> LeaseHandle {
        LeaseHandle { tx, first_deadline }
    }

    /// Starts leasing freshly pulled messages, by ack id; call as soon as
    /// Pull returns them. Each returned lease must be ended by its task.
    pub fn hold(&self, ack_ids: Vec<String>) -> Vec<Lease> {
        let expires = Instant::now() + self.first_deadline;
        let held: Vec<(String, Arc<Watch>)> = ack_ids
            .into_iter()
            .map(|id| (id, Watch::new(expires)))
            .collect();
        let leases = held
            .iter()
            .map(|(id, watch)| Lease::new(id.clone(), self.clone(), watch.clone()))
            .collect();
        self.send(Command::Hold(held));
        leases
    }

    pub(super) fn send(&self, command: Command) {
        // A closed loop means the worker is gone; nothing can be done then.
        let _ = self.tx.send(command);
    }
}

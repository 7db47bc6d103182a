//! The lease loop of one subscription: owns the timers around the pure
//! [`LeaseBook`], and sends everything that changes a held message's
//! deadline through the [`DataPlane`]: extension rounds, acks, retries'
//! backoffs and releases, batched.
//!
//! The puller holds a [`LeaseHandle`] and turns each pulled message into a
//! [`Lease`]; the task ends its lease, which sends the command here. When
//! every handle and lease is gone the loop flushes what is pending, waits for
//! its RPCs, and ends: shutdown by dropping senders, as in mini-redis.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::{Instant, sleep, sleep_until};

use crate::lease::{Lease, LeaseBook};
use crate::metrics::Metrics;
use crate::pubsub::{DataPlane, RpcError};

/// Most ack ids sent in one Acknowledge or `ModifyAckDeadline`.
pub const MAX_ACK_IDS_PER_RPC: usize = 2_500;

/// Settings of one lease loop.
#[derive(Debug, Clone)]
pub struct LeaseLoopOptions {
    /// Full subscription path for RPCs.
    pub subscription: String,
    /// Subscription id for metric labels and logs.
    pub label: String,
    /// The deadline assumed for a freshly pulled message. Kept at or below
    /// Pub/Sub's 10 s minimum so a subscription created with a shorter
    /// deadline than configured still never lets a running task's message lapse.
    pub first_deadline: Duration,
    /// What each extension asks for.
    pub extension: Duration,
    /// Leases are not extended past this age.
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
    Hold(Vec<String>),
    /// The task succeeded (or was dead-lettered): acknowledge.
    Ack(String),
    /// Stop leasing and set this deadline: a retry's backoff, or 0 to release.
    Modify(String, u32),
}

/// The sender side of one subscription's lease loop: the puller's, to turn
/// pulled messages into [`Lease`]s.
#[derive(Clone, Debug)]
pub struct LeaseHandle {
    tx: mpsc::UnboundedSender<Command>,
}

impl LeaseHandle {
    /// Starts leasing freshly pulled messages, by ack id; call as soon as
    /// Pull returns them. Each returned lease must be ended by its task.
    pub fn hold(&self, ack_ids: Vec<String>) -> Vec<Lease> {
        let leases = ack_ids
            .iter()
            .map(|id| Lease::new(id.clone(), self.clone()))
            .collect();
        self.send(Command::Hold(ack_ids));
        leases
    }

    pub(super) fn send(&self, command: Command) {
        // A closed loop means the worker is gone; nothing can be done then.
        let _ = self.tx.send(command);
    }
}

/// What a finished RPC reports back to the loop.
enum Done {
    Extended {
        ids: Vec<String>,
        sent_at: Instant,
        result: Result<(), RpcError>,
    },
    Other,
}

/// The loop; see the module docs.
pub struct LeaseLoop {
    data_plane: Arc<dyn DataPlane>,
    options: LeaseLoopOptions,
    metrics: Metrics,
    book: LeaseBook,
    rx: mpsc::UnboundedReceiver<Command>,
    pending_acks: Vec<String>,
    /// Deadline changes, batched by their value in seconds.
    pending_modifies: BTreeMap<u32, Vec<String>>,
    /// When pending acks and changes must be sent at the latest.
    flush_at: Option<Instant>,
    rpcs: JoinSet<Done>,
}

impl LeaseLoop {
    /// Starts the loop; it ends after every handle is dropped and all is flushed.
    pub fn spawn(
        data_plane: Arc<dyn DataPlane>,
        options: LeaseLoopOptions,
        metrics: Metrics,
    ) -> (LeaseHandle, JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let book = LeaseBook::new(options.extension, options.max_lease);
        let lease_loop = LeaseLoop {
            data_plane,
            options,
            metrics,
            book,
            rx,
            pending_acks: Vec::new(),
            pending_modifies: BTreeMap::new(),
            flush_at: None,
            rpcs: JoinSet::new(),
        };
        (LeaseHandle { tx }, tokio::spawn(lease_loop.run()))
    }

    async fn run(mut self) {
        loop {
            let round_at = self.book.next_round();
            let lost_at = self.book.next_expiry();
            let flush_at = self.flush_at;
            tokio::select! {
                // Order matters: finished RPCs move deadlines forward, and
                // commands remove acked leases, before a round is decided, so
                // a round never extends what was just acked.
                biased;
                Some(done) = self.rpcs.join_next(), if !self.rpcs.is_empty() => {
                    if let Ok(done) = done {
                        self.finished(done);
                    }
                }
                command = self.rx.recv() => match command {
                    Some(command) => self.apply(command),
                    None => break,
                },
                () = sleep_until(flush_at.unwrap_or_else(Instant::now)), if flush_at.is_some() => {
                    self.flush();
                }
                () = sleep_until(round_at.unwrap_or_else(Instant::now)), if round_at.is_some() => {
                    self.start_round();
                }
                () = sleep_until(lost_at.unwrap_or_else(Instant::now)), if lost_at.is_some() => {
                    self.count_lost();
                }
            }
        }
        // Every handle is gone: send what is pending and wait for all RPCs.
        self.flush();
        while let Some(done) = self.rpcs.join_next().await {
            if let Ok(done) = done {
                self.finished(done);
            }
        }
        self.metrics
            .leases_held
            .with_label_values(&[&self.options.label])
            .set(0);
    }

    fn apply(&mut self, command: Command) {
        let now = Instant::now();
        match command {
            Command::Hold(ids) => {
                for id in ids {
                    self.book.add(id, now, self.options.first_deadline);
                }
            }
            Command::Ack(id) => {
                self.book.remove(&id);
                self.pending_acks.push(id);
                self.schedule_flush(now);
            }
            Command::Modify(id, secs) => {
                self.book.remove(&id);
                self.pending_modifies.entry(secs).or_default().push(id);
                self.schedule_flush(now);
            }
        }
        self.update_held();
    }

    fn schedule_flush(&mut self, now: Instant) {
        let full = self.pending_acks.len() >= MAX_ACK_IDS_PER_RPC
            || self
                .pending_modifies
                .values()
                .any(|v| v.len() >= MAX_ACK_IDS_PER_RPC);
        if full {
            self.flush();
        } else if self.flush_at.is_none() {
            self.flush_at = Some(now + self.options.ack_flush);
        }
    }

    fn update_held(&self) {
        self.metrics
            .leases_held
            .with_label_values(&[&self.options.label])
            .set(i64::try_from(self.book.len()).unwrap_or(i64::MAX));
    }

    /// Sends pending acks and deadline changes, each retried in the background.
    fn flush(&mut self) {
        self.flush_at = None;
        let sub = self.options.subscription.clone();
        let give_up = self.options.give_up_after;
        for chunk in std::mem::take(&mut self.pending_acks).chunks(MAX_ACK_IDS_PER_RPC) {
            let (dp, sub, ids) = (self.data_plane.clone(), sub.clone(), chunk.to_vec());
            self.rpcs.spawn(async move {
                let n = ids.len();
                let result = retrying(give_up, || dp.acknowledge(&sub, ids.clone())).await;
                if let Err(e) = result {
                    tracing::error!(subscription = %sub, messages = n, error = %e,
                        "could not acknowledge; the messages will be redelivered and their tasks may run again");
                }
                Done::Other
            });
        }
        for (secs, ids) in std::mem::take(&mut self.pending_modifies) {
            for chunk in ids.chunks(MAX_ACK_IDS_PER_RPC) {
                let (dp, sub, ids) = (self.data_plane.clone(), sub.clone(), chunk.to_vec());
                self.rpcs.spawn(async move {
                    let n = ids.len();
                    let result = retrying(give_up, || {
                        dp.modify_ack_deadline(&sub, ids.clone(), i32::try_from(secs).unwrap_or(600))
                    })
                    .await;
                    if let Err(e) = result {
                        tracing::warn!(subscription = %sub, messages = n, seconds = secs, error = %e,
                            "could not set the messages' deadline; they come back when their current deadline passes");
                    }
                    Done::Other
                });
            }
        }
    }

    fn start_round(&mut self) {
        let now = Instant::now();
        let round = self.book.round(now);
        for id in &round.expired {
            tracing::warn!(subscription = %self.options.label, ack_id = %id,
                max_lease = %humantime::format_duration(self.options.max_lease),
                "lease reached lease.max_lease and is no longer extended; the message will be redelivered");
        }
        if !round.expired.is_empty() {
            self.update_held();
        }
        let secs = i32::try_from(self.options.extension.as_secs()).unwrap_or(600);
        for ids in round
            .due
            .chunks(MAX_ACK_IDS_PER_RPC)
            .map(<[String]>::to_vec)
        {
            let (dp, sub) = (self.data_plane.clone(), self.options.subscription.clone());
            self.rpcs.spawn(async move {
                let result = dp.modify_ack_deadline(&sub, ids.clone(), secs).await;
                Done::Extended {
                    ids,
                    sent_at: now,
                    result,
                }
            });
        }
    }

    fn finished(&mut self, done: Done) {
        let Done::Extended {
            ids,
            sent_at,
            result,
        } = done
        else {
            return;
        };
        let label = self.options.label.as_str();
        let result_label = if result.is_ok() { "success" } else { "failure" };
        self.metrics
            .lease_extension_rpcs
            .with_label_values(&[label, result_label])
            .inc();
        self.metrics
            .lease_extensions
            .with_label_values(&[label, result_label])
            .inc_by(ids.len() as u64);
        match result {
            Ok(()) => self.book.extended(&ids, sent_at),
            Err(e) => {
                tracing::warn!(subscription = %label, messages = ids.len(), error = %e,
                    "lease extension failed; retrying before the deadline passes");
                self.book.failed(&ids, Instant::now());
            }
        }
    }

    fn count_lost(&mut self) {
        let lost = self.book.take_lost(Instant::now());
        if lost.is_empty() {
            return;
        }
        self.metrics
            .leases_lost
            .with_label_values(&[&self.options.label])
            .inc_by(lost.len() as u64);
        tracing::error!(subscription = %self.options.label, messages = lost.len(),
            "leases lost: their deadline passed before an extension succeeded; Pub/Sub may redeliver them to another worker");
    }
}

/// Retries `call` with exponential backoff (100 ms doubling to 5 s) until it
/// succeeds, fails with a code that will not get better, or `give_up` passes.
async fn retrying<F, Fut>(give_up: Duration, mut call: F) -> Result<(), RpcError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), RpcError>>,
{
    let start = Instant::now();
    let mut delay = Duration::from_millis(100);
    loop {
        match call().await {
            Ok(()) => return Ok(()),
            Err(e) if !is_transient(e.code) || start.elapsed() + delay > give_up => return Err(e),
            Err(_) => {
                sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Codes worth retrying: the service or the network is having a moment.
pub fn is_transient(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Unavailable
            | tonic::Code::DeadlineExceeded
            | tonic::Code::ResourceExhausted
            | tonic::Code::Aborted
            | tonic::Code::Internal
            | tonic::Code::Unknown
            | tonic::Code::Cancelled
    )
}

#[cfg(test)]
mod tests;

//! The puller: unary `Pull(max_messages = free slots)`, never more, so a pod
//! whose slots are busy holds no message it cannot start (RabbitMQ's
//! prefetch-1, on Pub/Sub).
//!
//! Several pull loops run per executor when it has several slots: a slot
//! freed while one long poll is outstanding starts a Pull of its own, and no
//! loop ever asks for more than the permits it holds.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::dispatch::Dispatcher;
use crate::executor::Executor;
use crate::metrics::Metrics;
use crate::pubsub::DataPlane;

/// Pub/Sub returns at most 1,000 messages per Pull.
pub const MAX_PULL: usize = 1_000;

/// Shared state of an executor's pull loops.
pub struct Puller {
    /// Slots (and devices) of the executor.
    pub executor: Arc<dyn Executor>,
    /// Pull RPCs.
    pub data_plane: Arc<dyn DataPlane>,
    /// Full subscription path.
    pub subscription_path: String,
    /// Runs what was pulled.
    pub dispatcher: Dispatcher,
    /// Where task futures are spawned, so shutdown can wait for them.
    pub tracker: TaskTracker,
    /// Counters.
    pub metrics: Metrics,
    /// Cancelled at shutdown: finish the current Pull, release what it brings, stop.
    pub stop: CancellationToken,
    /// Liveness of this executor's pulls: readiness and Job mode read it.
    pub activity: Arc<Activity>,
    /// Most messages one loop asks for.
    pub max_per_pull: usize,
}

/// What the pull loops tell the rest of the worker.
#[derive(Debug)]
pub struct Activity {
    /// The last Pull succeeded (readiness).
    pub pull_ok: AtomicBool,
    /// When a Pull last returned a message (Job mode's idle clock).
    pub last_message: std::sync::Mutex<Instant>,
}

impl Activity {
    /// Fresh state: not ready, idle clock starting now.
    pub fn new() -> Self {
        Activity {
            pull_ok: AtomicBool::new(false),
            last_message: std::sync::Mutex::new(Instant::now()),
        }
    }

    /// How long since a message was last pulled.
    pub fn idle_for(&self) -> Duration {
        self.last_message.lock().expect("activity lock").elapsed()
    }
}

impl Default for Activity {
    fn default() -> Self {
        Self::new()
    }
}

/// How many loops an executor of `slots` slots runs.
pub fn pull_loops(slots: usize) -> usize {
    slots.clamp(1, 8)
}

impl Puller {
    /// One pull loop; returns after `stop` once its last Pull answered.
    pub async fn run(self: Arc<Self>) {
        let label = self.executor.subscription().to_string();
        let mut backoff = Duration::from_millis(100);
        loop {
            let first = tokio::select! {
                biased;
                _ = self.stop.cancelled() => return,
                permit = self.executor.acquire() => permit,
            };
            let mut permits = vec![first];
            while permits.len() < self.max_per_pull {
                match self.executor.try_acquire() {
                    Some(p) => permits.push(p),
                    None => break,
                }
            }
            // Not raced with `stop`: dropping a Pull in flight could strand
            // the messages it was about to return until their deadline.
            let pulled = self
                .data_plane
                .pull(&self.subscription_path, permits.len() as i32)
                .await;
            match pulled {
                Ok(messages) => {
                    backoff = Duration::from_millis(100);
                    self.activity.pull_ok.store(true, Ordering::Relaxed);
                    if messages.is_empty() {
                        continue;
                    }
                    *self.activity.last_message.lock().expect("activity lock") = Instant::now();
                    self.metrics
                        .messages_pulled
                        .with_label_values(&[&label])
                        .inc_by(messages.len() as u64);
                    let lease = &self.dispatcher.lease;
                    if self.stop.is_cancelled() {
                        tracing::info!(subscription = %label, messages = messages.len(),
                            "shutting down: releasing messages pulled after the stop");
                        for m in messages {
                            lease.release_after(m.ack_id, Duration::ZERO);
                        }
                        return;
                    }
                    lease.hold(messages.iter().map(|m| m.ack_id.clone()).collect());
                    for (message, permit) in messages.into_iter().zip(permits.drain(..)) {
                        let slot = self.executor.slot(permit);
                        let dispatcher = self.dispatcher.clone();
                        self.tracker
                            .spawn(async move { dispatcher.dispatch(message, slot).await });
                    }
                    // Permits left in `permits` are dropped: those slots are free again.
                }
                Err(e) => {
                    self.activity.pull_ok.store(false, Ordering::Relaxed);
                    self.metrics
                        .pull_errors
                        .with_label_values(&[&label, e.code_label()])
                        .inc();
                    tracing::warn!(subscription = %label, error = %e,
                        retry_in = ?backoff, "pull failed; retrying");
                    drop(permits);
                    tokio::select! {
                        _ = self.stop.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }
}

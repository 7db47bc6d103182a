//! The puller: unary `Pull(max_messages = free slots)`, never more, so a pod
//! whose slots are busy holds no message it cannot start (`RabbitMQ`'s
//! prefetch-1, on Pub/Sub).
//!
//! Several pull loops run per executor when it has several slots: a slot
//! freed while one long poll is outstanding starts a Pull of its own, and no
//! loop ever asks for more than the permits it holds.
//!
//! A Pull is never dropped in flight: the server may already have assigned
//! messages to it, and those would stay invisible until their ack deadline
//! (measured on the emulator, BENCHMARKS.md). Shutdown therefore waits for
//! the outstanding Pulls to answer, and Job mode keeps them short near the
//! moment the worker could decide it is idle ([`Puller::long_poll`]).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::dispatch::Dispatcher;
use crate::executor::Executor;
use crate::hand_back::HandBack;
use crate::health::{Activity, Health};
use crate::lease::{Lease, LeaseHandle};
use crate::metrics::Metrics;
use crate::pubsub::{DataPlane, ReceivedMessage};

/// Pub/Sub returns at most 1,000 messages per Pull.
pub const MAX_PULL: usize = 1_000;

/// Job mode: no Pull outlives the moment the worker decides it is idle by
/// more than this, so it exits within this of the decision.
pub const JOB_EXIT_BOUND: Duration = Duration::from_secs(1);

/// How often Job mode looks at the running tasks (`worker::wait_idle`): a
/// task running now delays the idle decision by at least the idle period
/// less this.
pub const IDLE_TICK: Duration = Duration::from_millis(250);

/// Shared state of one executor's pull loops.
pub struct Puller {
    /// Slots (and devices) of the executor.
    pub executor: Arc<Executor>,
    /// Pull RPCs.
    pub data_plane: Arc<dyn DataPlane>,
    /// Full subscription path.
    pub subscription_path: String,
    /// The subscription's lease loop: pulled messages become leases here.
    pub lease: LeaseHandle,
    /// Runs what was pulled.
    pub dispatcher: Arc<Dispatcher>,
    /// Gives back what was pulled but cannot start here.
    pub hand_back: HandBack,
    /// Where task futures are spawned, so shutdown can wait for them.
    pub tracker: TaskTracker,
    /// Counters.
    pub metrics: Metrics,
    /// Cancelled at shutdown: finish the current Pull, release what it brings, stop.
    pub stop: CancellationToken,
    /// Liveness of this executor's pulls: readiness and Job mode read it.
    pub activity: Arc<Activity>,
    /// Every executor's activity: Job mode's idle clock.
    pub health: Arc<Health>,
    /// Most messages one loop asks for.
    pub max_per_pull: usize,
    /// How long a Pull may wait for messages.
    pub long_poll: Duration,
    /// Job mode's idle period (`run --exit-when-idle`).
    pub exit_when_idle: Option<Duration>,
}

impl Puller {
    /// Hands messages back unstarted (in the background, on the tracker, so
    /// shutdown waits for it): they keep their retry budget.
    fn give_back(&self, messages: Vec<ReceivedMessage>, leases: Vec<Lease>) {
        for (message, lease) in messages.into_iter().zip(leases) {
            let hand_back = self.hand_back.clone();
            self.tracker
                .spawn(async move { hand_back.unstarted(&message, lease).await });
        }
    }
}

/// How many loops an executor of `slots` slots runs.
pub fn pull_loops(slots: usize) -> usize {
    slots.clamp(1, 8)
}

impl Puller {
    /// How long the next Pull may wait for messages: `long_poll`, except in
    /// Job mode, where it ends at most [`JOB_EXIT_BOUND`] after the earliest
    /// moment the worker could decide it is idle. That decision needs the
    /// idle period with nothing pulled by any executor and no task seen
    /// running ([`Health::idle_for`]); it cannot come sooner than the period
    /// after that clock's start, nor, while a task runs, sooner than the
    /// period less one [`IDLE_TICK`] (the clock is sampled every tick).
    /// So Pulls stay long while the decision is far, and the exit after it
    /// waits for no long poll (nor drops one).
    pub fn long_poll(&self) -> Duration {
        let Some(idle) = self.exit_when_idle else {
            return self.long_poll;
        };
        let earliest = if self.tracker.is_empty() {
            idle.saturating_sub(self.health.idle_for())
        } else {
            idle.saturating_sub(IDLE_TICK)
        };
        (earliest + JOB_EXIT_BOUND).min(self.long_poll)
    }

    /// One pull loop; returns after `stop` once its last Pull answered.
    pub async fn run(self: Arc<Self>) {
        let label = self.executor.subscription().to_string();
        let mut backoff = Duration::from_millis(100);
        loop {
            let first = tokio::select! {
                biased;
                () = self.stop.cancelled() => return,
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
                .pull_within(
                    &self.subscription_path,
                    i32::try_from(permits.len()).unwrap_or(i32::MAX),
                    self.long_poll(),
                )
                .await;
            let messages = match pulled {
                Ok(messages) => {
                    backoff = Duration::from_millis(100);
                    self.activity.pulled(true);
                    messages
                }
                Err(e) => {
                    self.activity.pulled(false);
                    if e.credentials_lost {
                        tracing::error!(subscription = %label, error = %e,
                            "the credentials refused for good to make an access token; failing liveness so the pod is restarted with fresh ones");
                        self.activity.lost_credentials();
                    }
                    self.metrics
                        .pull_errors
                        .with_label_values(&[&label, e.code_label()])
                        .inc();
                    tracing::warn!(subscription = %label, error = %e,
                        retry_in = ?backoff, "pull failed; retrying");
                    drop(permits);
                    tokio::select! {
                        () = self.stop.cancelled() => return,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    continue;
                }
            };
            if messages.is_empty() {
                continue;
            }
            self.activity.received();
            self.metrics
                .messages_pulled
                .with_label_values(&[&label])
                .inc_by(messages.len() as u64);
            let mut leases = self
                .lease
                .hold(messages.iter().map(|m| m.ack_id.clone()).collect());
            if self.stop.is_cancelled() {
                tracing::info!(subscription = %label, messages = messages.len(),
                    "shutting down: handing back messages pulled after the stop");
                self.give_back(messages, leases);
                return;
            }
            let mut messages = messages;
            if leases.len() > permits.len() {
                // Pub/Sub gave more than asked for: never hold what cannot start.
                let extra = leases.split_off(permits.len());
                tracing::warn!(subscription = %label, asked = permits.len(), extra = extra.len(),
                    "Pull returned more messages than asked for; handing the extra ones back at once");
                self.give_back(messages.split_off(permits.len()), extra);
            }
            for ((message, lease), permit) in
                messages.into_iter().zip(leases).zip(permits.drain(..))
            {
                let slot = self.executor.slot(permit);
                let dispatcher = self.dispatcher.clone();
                self.tracker
                    .spawn(async move { dispatcher.dispatch(message, lease, slot).await });
            }
            // Permits left in `permits` are dropped: those slots are free again.
        }
    }
}

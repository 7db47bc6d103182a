//! The running loops of a worker: per executor a lease loop, a dispatcher
//! and its pull loops; waiting for the stop; and the shutdown sequence of
//! the module docs of [`crate::worker`], steps 1 to 4.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Clients, FIRST_DEADLINE, PULL_TIMEOUT};
use crate::config::Config;
use crate::dead_letter::DeadLetters;
use crate::dispatch::{Dispatcher, DispatcherParts};
use crate::executor::Executor;
use crate::hand_back::HandBack;
use crate::handler::HandlerRegistry;
use crate::health::Health;
use crate::lease::{LeaseLoop, LeaseLoopOptions};
use crate::metrics::Metrics;
use crate::pod::WorkInProgress;
use crate::puller::{IDLE_TICK, MAX_PULL, Puller, pull_loops};
use crate::results::Results;

/// What every executor's loops share.
pub(super) struct Shared<'a> {
    pub config: &'a Config,
    pub clients: &'a Clients,
    pub registry: &'a Arc<HandlerRegistry>,
    pub results: &'a Results,
    pub metrics: &'a Metrics,
    pub health: &'a Arc<Health>,
    /// Job mode's idle period: the pull loops keep their long polls short
    /// near it.
    pub exit_when_idle: Option<Duration>,
    /// What runs now, for the pod's annotations.
    pub work: &'a Arc<WorkInProgress>,
}

/// The running loops of the worker and the tokens that stop them.
#[derive(Default)]
pub(super) struct Running {
    pullers: JoinSet<()>,
    lease_loops: JoinSet<Result<(), tokio::task::JoinError>>,
    /// Every task (and result publish) in flight.
    pub tracker: TaskTracker,
    /// Cancelled first at shutdown: no new Pulls.
    stop_pulling: CancellationToken,
    /// Cancelled at the end of the grace period: handlers are stopped.
    stop_handlers: CancellationToken,
}

impl Running {
    /// Starts one executor: its lease loop, its dispatcher and its pull loops.
    pub fn start(&mut self, executor: Arc<Executor>, shared: &Shared<'_>) {
        let Shared {
            config,
            clients,
            metrics,
            ..
        } = shared;
        let subscription = executor.subscription().to_string();
        let subscription_path = format!(
            "projects/{}/subscriptions/{subscription}",
            config.pubsub.project
        );
        metrics
            .executor_slots
            .with_label_values(&[executor.name()])
            .set(i64::try_from(executor.slots()).unwrap_or(i64::MAX));
        metrics
            .tasks_in_progress
            .with_label_values(&[executor.name()])
            .set(0);
        let (lease, lease_task) = LeaseLoop::spawn(
            clients.data_plane.clone(),
            LeaseLoopOptions {
                subscription: subscription_path.clone(),
                label: subscription.clone(),
                first_deadline: FIRST_DEADLINE,
                extension: config.lease.extension,
                max_lease: config.lease.max_lease,
                ..LeaseLoopOptions::default()
            },
            (*metrics).clone(),
        );
        self.lease_loops.spawn(lease_task);
        let topic = &config.executors[executor.name()].topic;
        let hand_back = HandBack::new(clients.publisher.clone(), topic);
        let dispatcher = Dispatcher::new(
            executor.clone(),
            DispatcherParts {
                registry: shared.registry.clone(),
                dead_letters: DeadLetters::new(
                    clients.publisher.clone(),
                    &config.pubsub.dead_letter_topic,
                    &subscription,
                ),
                hand_back: hand_back.clone(),
                results: shared.results.clone(),
                retry: config.retry.clone(),
                stop: self.stop_handlers.clone(),
                kill_grace: config.shutdown.kill_grace,
                max_lease: config.lease.max_lease,
                metrics: (*metrics).clone(),
                work: shared.work.clone(),
            },
        );
        let loops = pull_loops(executor.slots());
        tracing::info!(executor = %executor.name(), %subscription,
            slots = executor.slots(), devices = ?executor.devices(), "executor started");
        let puller = Arc::new(Puller {
            max_per_pull: executor.slots().div_ceil(loops).clamp(1, MAX_PULL),
            executor,
            data_plane: clients.data_plane.clone(),
            subscription_path,
            lease,
            dispatcher,
            hand_back,
            tracker: self.tracker.clone(),
            metrics: (*metrics).clone(),
            stop: self.stop_pulling.clone(),
            activity: shared.health.watch(),
            health: shared.health.clone(),
            long_poll: PULL_TIMEOUT,
            exit_when_idle: shared.exit_when_idle,
        });
        for _ in 0..loops {
            self.pullers.spawn(puller.clone().run());
        }
    }

    /// Runs until `shutdown` completes or Job mode finds the worker idle.
    pub async fn run_until(
        &mut self,
        shutdown: impl Future<Output = ()>,
        exit_when_idle: Option<Duration>,
        health: &Health,
    ) {
        let idle = wait_idle(exit_when_idle, &self.tracker, health);
        tokio::pin!(idle, shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => {
                    tracing::info!("shutdown requested; no new tasks will be pulled");
                    return;
                }
                () = &mut idle => {
                    tracing::info!("idle for the --exit-when-idle period; stopping");
                    return;
                }
                // Pull loops and lease loops run until shutdown; one ending
                // now is a bug: say so, and fail liveness so the pod restarts.
                Some(_) = self.pullers.join_next() => {
                    tracing::error!("a pull loop ended unexpectedly");
                    health.set_broken();
                }
                Some(_) = self.lease_loops.join_next() => {
                    tracing::error!("a lease loop ended unexpectedly");
                    health.set_broken();
                }
            }
        }
    }

    /// The shutdown sequence of the module docs, steps 1 to 4.
    pub async fn shut_down(mut self, grace: Duration) {
        // 1. Stop pulling; 2. let tasks finish within the grace period.
        let grace_ends = tokio::time::Instant::now() + grace;
        self.stop_pulling.cancel();
        // Our own Pulls end first (within PULL_TIMEOUT), so a message released
        // below goes to another pod instead of into one of our outstanding Pulls.
        while self.pullers.join_next().await.is_some() {}
        self.tracker.close();
        if tokio::time::timeout_at(grace_ends, self.tracker.wait())
            .await
            .is_err()
        {
            // 3. Stop the handlers; their tasks release their messages.
            tracing::warn!(running = self.tracker.len(),
                grace = %humantime::format_duration(grace),
                "grace period over; stopping the running handlers and releasing their messages");
            self.stop_handlers.cancel();
            self.tracker.wait().await;
        }
        // 4. The last lease handles are gone with the pullers and tasks: the
        // loops now flush and end.
        while self.lease_loops.join_next().await.is_some() {}
    }
}

/// Completes once nothing ran and nothing was pulled for `idle`; never
/// when `idle` is `None`.
async fn wait_idle(idle: Option<Duration>, tracker: &TaskTracker, health: &Health) {
    let Some(idle) = idle else {
        return std::future::pending().await;
    };
    let mut tick = tokio::time::interval(IDLE_TICK);
    loop {
        tick.tick().await;
        if !tracker.is_empty() {
            health.busy();
            continue;
        }
        if health.idle_for() >= idle {
            return;
        }
    }
}

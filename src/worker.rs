//! The worker: executors, their pull loops and lease loops, and the shutdown
//! sequence, as one function that any future can stop.
//!
//! Shutdown, in order:
//! 1. stop pulling: each pull loop lets its outstanding Pull answer (at most
//!    5 s; in Job mode at most 1 s after the idle decision, see
//!    `Puller::long_poll`) and releases (deadline 0) whatever that brings;
//! 2. running tasks may finish within `shutdown.grace`, their leases still
//!    extended;
//! 3. then (and not before our own Pulls ended, so a release is not pulled
//!    straight back by this pod) the handlers' process groups get SIGTERM,
//!    SIGKILL after `shutdown.kill_grace`, and their messages are released
//!    at once so another pod starts them now, not after the ack deadline;
//! 4. the lease loops flush pending acks and releases, and the worker returns.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, ConfigError, Environment};
use crate::dead_letter::DeadLetters;
use crate::dispatch::{Dispatcher, DispatcherParts};
use crate::executor::{Executor, ExecutorError};
use crate::handler::HandlerRegistry;
use crate::health::Health;
use crate::lease::{LeaseLoop, LeaseLoopOptions};
use crate::metrics::Metrics;
use crate::pubsub::{Connection, ConnectionError, DataPlane, GooglePublisher, Publisher};
use crate::puller::{IDLE_TICK, MAX_PULL, Puller, pull_loops};
use crate::results::Results;

/// How long one Pull long-polls; shutdown waits at most this for it.
const PULL_TIMEOUT: Duration = Duration::from_secs(5);

/// The deadline assumed for a freshly pulled message: Pub/Sub's minimum
/// ack deadline, whatever `pubsub.ack_deadline` says, so a subscription made
/// by other tooling with a shorter deadline still never lets a running
/// task's message lapse.
const FIRST_DEADLINE: Duration = Duration::from_secs(10);

/// Options of one run that are not configuration.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Job mode: stop once nothing was pulled and nothing ran for this long.
    pub exit_when_idle: Option<Duration>,
    /// Use this registry instead of a fresh one (tests and the HTTP server read it).
    pub metrics: Option<Metrics>,
}

/// The worker's outbound edges: every call it makes to Pub/Sub goes through
/// these two traits, so a whole message life runs on fakes in unit tests.
#[derive(Clone)]
pub struct Clients {
    /// Pull, Acknowledge, `ModifyAckDeadline`.
    pub data_plane: Arc<dyn DataPlane>,
    /// Dead letters and result events.
    pub publisher: Arc<dyn Publisher>,
}

/// Why the worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// Pub/Sub clients could not be built.
    #[error(transparent)]
    Connection(#[from] ConnectionError),
    /// A handler or executor configuration that cannot run.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// An executor could not be built (e.g. no GPU found).
    #[error(transparent)]
    Executor(#[from] ExecutorError),
    /// `http.listen` could not be bound.
    #[error("cannot listen on http.listen {addr}: {source}")]
    Listen {
        /// The configured address.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// Runs the worker against Pub/Sub until `shutdown` completes (or Job mode
/// finds it idle), then performs the shutdown sequence.
pub async fn run(
    config: Config,
    env: Environment,
    options: RunOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), WorkerError> {
    let conn = Connection::new(&config.pubsub, &env)?;
    // One TLS handshake now: a wrong CA is a start-up error (exit 69), not a
    // worker that stays unready.
    conn.check_tls().await?;
    let publisher = GooglePublisher::new(conn.clone());
    // Built now, so a bad endpoint is a start-up error, not a lost dead letter.
    publisher.prepare(&config.pubsub.dead_letter_topic).await?;
    if !config.pubsub.results_topic.is_empty() {
        publisher.prepare(&config.pubsub.results_topic).await?;
    }
    let clients = Clients {
        data_plane: Arc::new(conn.data_plane().with_pull_timeout(PULL_TIMEOUT)),
        publisher: Arc::new(publisher),
    };
    run_with(config, env, options, clients, shutdown).await
}

/// [`run`] over given clients (fakes in unit tests, a recording data plane
/// in the benchmark). Returns once everything is flushed.
pub async fn run_with(
    config: Config,
    env: Environment,
    options: RunOptions,
    clients: Clients,
    shutdown: impl Future<Output = ()>,
) -> Result<(), WorkerError> {
    let metrics = options.metrics.clone().unwrap_or_default();
    let registry = Arc::new(HandlerRegistry::from_config(&config)?);
    let mut executors = Vec::new();
    for (name, executor) in config.enabled_executors() {
        executors.push(Arc::new(Executor::build(name, executor, &env)?));
    }
    let health = Arc::new(Health::default());
    let stop_http = CancellationToken::new();
    let addr = crate::http::serve(
        config.http.listen,
        metrics.clone(),
        health.clone(),
        stop_http.clone(),
    )
    .await
    .map_err(|source| WorkerError::Listen {
        addr: config.http.listen,
        source,
    })?;
    tracing::info!(%addr, "serving /metrics, /healthz and /readyz");

    let mut running = Running::default();
    let results = Results::new(
        clients.publisher.clone(),
        &config.pubsub.results_topic,
        worker_name(&env),
        running.tracker.clone(),
    );
    let shared = Shared {
        config: &config,
        clients: &clients,
        registry: &registry,
        results: &results,
        metrics: &metrics,
        health: &health,
        exit_when_idle: options.exit_when_idle,
    };
    metrics.init_known_series(
        &executors
            .iter()
            .map(|e| (e.name(), e.subscription()))
            .collect::<Vec<_>>(),
        &config
            .handlers
            .iter()
            .map(|(kind, h)| (kind.as_str(), h.executor.as_str()))
            .collect::<Vec<_>>(),
    );
    for executor in executors {
        running.start(executor, &shared);
    }
    running
        .run_until(shutdown, options.exit_when_idle, &health)
        .await;
    health.set_stopping();
    running.shut_down(config.shutdown.grace).await;
    stop_http.cancel();
    tracing::info!("worker stopped");
    Ok(())
}

/// What every executor's loops share.
struct Shared<'a> {
    config: &'a Config,
    clients: &'a Clients,
    registry: &'a Arc<HandlerRegistry>,
    results: &'a Results,
    metrics: &'a Metrics,
    health: &'a Arc<Health>,
    /// Job mode's idle period: the pull loops keep their long polls short
    /// near it.
    exit_when_idle: Option<Duration>,
}

/// The running loops of the worker and the tokens that stop them.
#[derive(Default)]
struct Running {
    pullers: JoinSet<()>,
    lease_loops: JoinSet<Result<(), tokio::task::JoinError>>,
    /// Every task (and result publish) in flight.
    tracker: TaskTracker,
    /// Cancelled first at shutdown: no new Pulls.
    stop_pulling: CancellationToken,
    /// Cancelled at the end of the grace period: handlers are stopped.
    stop_handlers: CancellationToken,
}

impl Running {
    /// Starts one executor: its lease loop, its dispatcher and its pull loops.
    fn start(&mut self, executor: Arc<Executor>, shared: &Shared<'_>) {
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
        let dispatcher = Dispatcher::new(
            executor.clone(),
            DispatcherParts {
                registry: shared.registry.clone(),
                dead_letters: DeadLetters::new(
                    clients.publisher.clone(),
                    &config.pubsub.dead_letter_topic,
                    &subscription,
                ),
                results: shared.results.clone(),
                retry: config.retry.clone(),
                stop: self.stop_handlers.clone(),
                kill_grace: config.shutdown.kill_grace,
                max_lease: config.lease.max_lease,
                metrics: (*metrics).clone(),
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
    async fn run_until(
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
    async fn shut_down(mut self, grace: Duration) {
        // 1. Stop pulling; 2. let tasks finish within the grace period.
        let grace_ends = tokio::time::Instant::now() + grace;
        self.stop_pulling.cancel();
        // Our own Pulls end first (within PULL_TIMEOUT; in Job mode within
        // JOB_EXIT_BOUND of the idle decision), so a message released below
        // goes to another pod instead of into one of our outstanding Pulls.
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

/// The pod name (HOSTNAME on Kubernetes), else the host name.
fn worker_name(env: &Environment) -> String {
    env.get("HOSTNAME")
        .map(str::to_string)
        .or_else(|| {
            nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
        })
        .unwrap_or_else(|| "leasehold".to_string())
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

#[cfg(test)]
mod tests;

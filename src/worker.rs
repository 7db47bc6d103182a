//! The worker: executors, their pullers and lease loops, and the shutdown
//! sequence, as one function that any future can stop.
//!
//! Shutdown, in order:
//! 1. stop pulling: each pull loop lets its outstanding Pull answer (at most
//!    5 s) and releases (deadline 0) whatever that brings;
//! 2. running tasks may finish within `shutdown.grace`, their leases still
//!    extended;
//! 3. then (and not before our own Pulls ended, so a release is not pulled
//!    straight back by this pod) the handlers' process groups get SIGTERM, SIGKILL after
//!    `shutdown.kill_grace`, and their messages are released at once so
//!    another pod starts them now, not after the ack deadline;
//! 4. the lease loops flush pending acks and releases, and the worker returns.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, Environment};
use crate::dispatch::{DeadLetters, Dispatcher};
use crate::executor::ExecutorError;
use crate::handler::HandlerRegistry;
use crate::http::Health;
use crate::lease::{LeaseLoop, LeaseLoopOptions};
use crate::metrics::Metrics;
use crate::pubsub::{Connection, ConnectionError, DataPlane};
use crate::puller::{Activity, MAX_PULL, Puller, pull_loops};
use crate::results::Results;

/// How long one Pull long-polls; shutdown waits at most this for it.
const PULL_TIMEOUT: Duration = Duration::from_secs(5);

/// Options of one run that are not configuration.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Job mode: stop once nothing was pulled and nothing ran for this long.
    pub exit_when_idle: Option<Duration>,
    /// Use this registry instead of a fresh one (tests and the HTTP server read it).
    pub metrics: Option<Metrics>,
}

/// Why the worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// Pub/Sub clients could not be built.
    #[error(transparent)]
    Connection(#[from] ConnectionError),
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

/// Runs the worker until `shutdown` completes (or Job mode finds it idle),
/// then performs the shutdown sequence. Returns once everything is flushed.
pub async fn run(
    config: Config,
    env: Environment,
    options: RunOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), WorkerError> {
    let conn = Connection::new(&config.pubsub, &env)?;
    conn.check_tls().await?;
    let data_plane: Arc<dyn DataPlane> =
        Arc::new(conn.data_plane().with_pull_timeout(PULL_TIMEOUT));
    run_with(config, env, options, conn, data_plane, shutdown).await
}

/// [`run`] over a given data plane.
pub async fn run_with(
    config: Config,
    env: Environment,
    options: RunOptions,
    conn: Connection,
    data_plane: Arc<dyn DataPlane>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), WorkerError> {
    let metrics = options.metrics.clone().unwrap_or_default();
    let registry = Arc::new(HandlerRegistry::from_config(&config));
    let dead_letters = DeadLetters {
        publisher: conn.publisher(&config.pubsub.dead_letter_topic).await?,
    };
    let results = Results {
        publisher: match config.pubsub.results_topic.as_str() {
            "" => None,
            topic => Some(conn.publisher(topic).await?),
        },
    };
    let worker_name = worker_name(&env);
    let stop_pulling = CancellationToken::new();
    let stop_handlers = CancellationToken::new();
    let tracker = TaskTracker::new();
    let mut executors = Vec::new();
    for class in config.enabled_classes() {
        executors.push(crate::executor::build(class, &config, &env)?);
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

    let mut pullers = JoinSet::new();
    let mut lease_loops = JoinSet::new();
    for executor in executors {
        let class = executor.class();
        let subscription_path = conn.subscription_path(executor.subscription());
        metrics
            .executor_slots
            .with_label_values(&[class.as_str()])
            .set(executor.slots() as i64);
        metrics
            .tasks_in_progress
            .with_label_values(&[class.as_str()])
            .set(0);
        let (lease, lease_task) = LeaseLoop::spawn(
            data_plane.clone(),
            LeaseLoopOptions {
                subscription: subscription_path.clone(),
                label: executor.subscription().to_string(),
                first_deadline: config.pubsub.ack_deadline.min(Duration::from_secs(10)),
                extension: config.lease.extension,
                max_lease: config.lease.max_lease,
                ..LeaseLoopOptions::default()
            },
            metrics.clone(),
        );
        lease_loops.spawn(async move {
            let _ = lease_task.await;
        });
        let loops = pull_loops(executor.slots());
        let activity = Arc::new(Activity::new());
        health
            .activities
            .lock()
            .expect("health lock")
            .push(activity.clone());
        let puller = Arc::new(Puller {
            max_per_pull: executor.slots().div_ceil(loops).clamp(1, MAX_PULL),
            executor: executor.clone(),
            data_plane: data_plane.clone(),
            subscription_path,
            dispatcher: Dispatcher {
                class,
                subscription: executor.subscription().to_string(),
                registry: registry.clone(),
                lease,
                dead_letters: dead_letters.clone(),
                retry: config.retry.clone(),
                metrics: metrics.clone(),
                stop: stop_handlers.clone(),
                kill_grace: config.shutdown.kill_grace,
                results: results.clone(),
                worker: worker_name.clone(),
                background: tracker.clone(),
            },
            tracker: tracker.clone(),
            metrics: metrics.clone(),
            stop: stop_pulling.clone(),
            activity,
        });
        tracing::info!(executor = %class, subscription = %executor.subscription(),
            slots = executor.slots(), devices = ?executor.devices(), "executor started");
        for _ in 0..loops {
            pullers.spawn(puller.clone().run());
        }
    }

    let idle = wait_idle(options.exit_when_idle, &tracker, &health);
    tokio::pin!(idle, shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => {
                tracing::info!("shutdown requested; no new tasks will be pulled");
                break;
            }
            _ = &mut idle => {
                tracing::info!("idle for the --exit-when-idle period; stopping");
                break;
            }
            // Pull loops and lease loops run until shutdown; one ending
            // now is a bug: say so, and fail liveness so the pod restarts.
            Some(_) = pullers.join_next() => {
                tracing::error!("a pull loop ended unexpectedly");
                health.broken.store(true, Ordering::Relaxed);
            }
            Some(_) = lease_loops.join_next() => {
                tracing::error!("a lease loop ended unexpectedly");
                health.broken.store(true, Ordering::Relaxed);
            }
        }
    }
    health.stopping.store(true, Ordering::Relaxed);

    // 1. Stop pulling; 2. let tasks finish within the grace period.
    let grace_ends = tokio::time::Instant::now() + config.shutdown.grace;
    stop_pulling.cancel();
    // Our own Pulls end first (within PULL_TIMEOUT), so a message released
    // below goes to another pod instead of into one of our outstanding Pulls.
    while pullers.join_next().await.is_some() {}
    tracker.close();
    if tokio::time::timeout_at(grace_ends, tracker.wait())
        .await
        .is_err()
    {
        // 3. Stop the handlers; their tasks release their messages.
        tracing::warn!(running = tracker.len(),
            grace = %humantime::format_duration(config.shutdown.grace),
            "grace period over; stopping the running handlers and releasing their messages");
        stop_handlers.cancel();
        tracker.wait().await;
    }
    // 4. The pullers and tasks held the last lease handles: the loops now
    // flush and end.
    while lease_loops.join_next().await.is_some() {}
    stop_http.cancel();
    tracing::info!("worker stopped");
    Ok(())
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
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut last_busy = tokio::time::Instant::now();
    loop {
        tick.tick().await;
        if !tracker.is_empty() {
            last_busy = tokio::time::Instant::now();
            continue;
        }
        let quiet = health
            .activities
            .lock()
            .expect("health lock")
            .iter()
            .all(|a| a.idle_for() >= idle);
        if quiet && last_busy.elapsed() >= idle {
            return;
        }
    }
}

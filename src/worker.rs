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

use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConfigError, Environment};
use crate::executor::{Executor, ExecutorError};
use crate::handler::HandlerRegistry;
use crate::health::Health;
use crate::metrics::Metrics;
use crate::pod::WorkInProgress;
use crate::pubsub::admin::ContractError;
use crate::pubsub::{Connection, ConnectionError, DataPlane, GooglePublisher, Publisher};
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
    /// A task subscription is missing or breaks the contract.
    #[error(transparent)]
    Subscription(#[from] ContractError),
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
    // What the configuration alone decides fails first, before anything connects.
    let prepared = Prepared::new(&config, &env)?;
    let conn = Connection::new(&config.pubsub, &env)?;
    // One TLS handshake now: a wrong CA is a start-up error (exit 69), not a
    // worker that stays unready.
    conn.check_tls().await?;
    // The subscriptions keep the contract retries and dead letters rely on.
    crate::pubsub::admin::check(&conn, &config).await?;
    let publisher = GooglePublisher::new(conn.clone());
    // Built now, so a bad endpoint is a start-up error, not a lost dead letter,
    // and a hand-back at shutdown (a few seconds of notice on Spot) does not
    // first have to build its task topic's publisher.
    publisher.prepare(&config.pubsub.dead_letter_topic).await?;
    if !config.pubsub.results_topic.is_empty() {
        publisher.prepare(&config.pubsub.results_topic).await?;
    }
    for (_, executor) in config.enabled_executors() {
        publisher.prepare(&executor.topic).await?;
    }
    let clients = Clients {
        data_plane: Arc::new(conn.data_plane().with_pull_timeout(PULL_TIMEOUT)),
        publisher: Arc::new(publisher),
    };
    run_prepared(config, env, options, prepared, clients, shutdown).await
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
    let prepared = Prepared::new(&config, &env)?;
    run_prepared(config, env, options, prepared, clients, shutdown).await
}

/// What the worker builds from its configuration alone (handlers, executors,
/// GPU discovery), so a bad one is refused before anything connects.
struct Prepared {
    registry: Arc<HandlerRegistry>,
    executors: Vec<Arc<Executor>>,
}

impl Prepared {
    fn new(config: &Config, env: &Environment) -> Result<Prepared, WorkerError> {
        let registry = Arc::new(HandlerRegistry::from_config(config)?);
        let mut executors = Vec::new();
        for (name, executor) in config.enabled_executors() {
            executors.push(Arc::new(Executor::build(name, executor, env)?));
        }
        Ok(Prepared {
            registry,
            executors,
        })
    }
}

async fn run_prepared(
    config: Config,
    env: Environment,
    options: RunOptions,
    prepared: Prepared,
    clients: Clients,
    shutdown: impl Future<Output = ()>,
) -> Result<(), WorkerError> {
    let Prepared {
        registry,
        executors,
    } = prepared;
    let metrics = options.metrics.clone().unwrap_or_default();
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
    // Busy pods are the last to go: when in a pod, its annotations follow `work`.
    let work = WorkInProgress::new();
    let stop_annotating = CancellationToken::new();
    let annotating = crate::pod::annotate(&env, &work, stop_annotating.clone()).await;

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
        work: &work,
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
    stop_annotating.cancel();
    if let Some(annotating) = annotating {
        let _ = annotating.await;
    }
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

mod running;

use running::{Running, Shared};

#[cfg(test)]
mod tests;

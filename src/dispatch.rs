//! The dispatcher: one pulled message, from decoding to its ending, read top
//! to bottom in [`Dispatcher::dispatch`]: decode the task, route it to its
//! kind's handler, run it in its slot, decide its disposition, end its lease
//! accordingly, count it and report it.
//!
//! Routing is data plus a pure function ([`route`]), table-tested. Messages
//! that cannot be routed (no `kind`, an unknown kind, a kind of another
//! executor class) are dead-lettered at once with the reason: never a loop,
//! never a silent drop.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::RetryConfig;
use crate::dead_letter::DeadLetters;
use crate::disposition::{Disposition, backoff, decide};
use crate::executor::{Executor, Slot};
use crate::hand_back::HandBack;
use crate::handler::{
    Failure, Handler, HandlerRegistry, Outcome, ProgressSink, Ran, Registered, RunContext,
};
use crate::lease::{Interruption, Lease};
use crate::metrics::Metrics;
use crate::pubsub::ReceivedMessage;
use crate::results::{Place, Results, RunningTask};
use crate::task::Task;

/// Why a task cannot run here.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// No `[handlers.KIND]` in this worker's configuration.
    #[error("no handler for kind {0:?} is configured on this worker")]
    UnknownKind(String),
    /// The kind belongs to another executor class: it was published to the wrong topic.
    #[error(
        "kind {kind:?} runs on the {wanted} executor, but arrived on the {got} executor's subscription (published to the wrong topic?)"
    )]
    WrongExecutor {
        /// The task's kind.
        kind: String,
        /// The class its handler names.
        wanted: String,
        /// The class whose subscription delivered it.
        got: String,
    },
}

/// Finds the handler of `kind` for a message that arrived on `executor`'s subscription.
pub fn route<'r>(
    registry: &'r HandlerRegistry,
    kind: &str,
    executor: &str,
) -> Result<&'r Registered, RouteError> {
    let registered = registry
        .get(kind)
        .ok_or_else(|| RouteError::UnknownKind(kind.to_string()))?;
    if registered.executor != executor {
        return Err(RouteError::WrongExecutor {
            kind: kind.to_string(),
            wanted: registered.executor.clone(),
            got: executor.to_string(),
        });
    }
    Ok(registered)
}

/// What a dispatcher needs besides its executor.
pub struct DispatcherParts {
    /// Kinds to handlers.
    pub registry: Arc<HandlerRegistry>,
    /// Where tasks that will never succeed go.
    pub dead_letters: DeadLetters,
    /// Where unfinished tasks go back to at shutdown.
    pub hand_back: HandBack,
    /// Result events.
    pub results: Results,
    /// Attempts and backoff.
    pub retry: RetryConfig,
    /// Cancelled when running handlers must stop (end of the shutdown grace).
    pub stop: CancellationToken,
    /// SIGTERM-to-SIGKILL time for handlers.
    pub kill_grace: Duration,
    /// `lease.max_lease`, for the reason of a task stopped by it.
    pub max_lease: Duration,
    /// Counters and histograms.
    pub metrics: Metrics,
    /// What runs now, for the pod's annotations (busy pods are the last to go).
    pub work: Arc<crate::pod::WorkInProgress>,
}

/// Runs the messages of one executor; shared by its pull loops as an `Arc`.
pub struct Dispatcher {
    executor: Arc<Executor>,
    parts: DispatcherParts,
}

impl Dispatcher {
    /// The dispatcher of `executor`'s messages.
    pub fn new(executor: Arc<Executor>, parts: DispatcherParts) -> Arc<Dispatcher> {
        parts
            .metrics
            .init_slot_series(executor.name(), executor.slots());
        Arc::new(Dispatcher { executor, parts })
    }

    /// The whole life of one pulled message. `slot` is held until its lease
    /// is ended; then the slot (and its device) is free for the next Pull.
    pub async fn dispatch(&self, received: ReceivedMessage, mut lease: Lease, slot: Slot) {
        let task = match Task::from_received(&received) {
            Ok(task) => task,
            Err(e) => return self.refuse(&received, lease, &e.to_string()).await,
        };
        lease.set_task_id(&task.task_id);
        let span = tracing::info_span!("task", task_id = %task.task_id, kind = %task.kind,
            executor = %self.executor.name(), attempt = task.attempt);
        // A producer's trace (W3C trace context) continues into the task's log lines.
        crate::telemetry::continue_trace(
            &span,
            task.attributes
                .get(crate::telemetry::TRACEPARENT_ATTRIBUTE)
                .map(String::as_str),
        );
        async {
            let handler = match route(&self.parts.registry, &task.kind, self.executor.name()) {
                Ok(registered) => &registered.handler,
                Err(e) => return self.refuse(&received, lease, &e.to_string()).await,
            };
            let ran = self.run(&task, handler, &slot, &lease).await;
            let disposition = decide(&ran.outcome, (&task).into(), &self.parts.retry);
            self.end(&received, &task, lease, &disposition, &ran.outcome)
                .await;
            self.parts
                .metrics
                .tasks_finished
                .with_label_values(&[&task.kind, self.executor.name(), disposition.label()])
                .inc();
            let place = Place {
                executor: self.executor.name(),
                device: slot.device(),
            };
            self.parts.results.ran(&task, place, &ran, &disposition);
        }
        .instrument(span)
        .await;
    }

    /// Runs the handler in the slot, with the task's metrics. The handler is
    /// stopped at shutdown (after the grace period) and when the lease says
    /// so; a panic is a failure with its message, never a leak.
    async fn run(&self, task: &Task, handler: &Handler, slot: &Slot, lease: &Lease) -> Ran {
        let metrics = &self.parts.metrics;
        let labels = [task.kind.as_str(), self.executor.name()];
        metrics.tasks_started.with_label_values(&labels).inc();
        if let Some(published) = task.publish_time {
            let wait = (time::OffsetDateTime::now_utc() - published).as_seconds_f64();
            metrics
                .task_queue_wait
                .with_label_values(&labels)
                .observe(wait.max(0.0));
        }
        let _in_progress = InProgress::new(metrics, self.executor.name());
        let _working = self.parts.work.start();
        tracing::info!(device = slot.device(), "task started");
        let start = Instant::now();
        let started_at = time::OffsetDateTime::now_utc();
        let stop = self.parts.stop.child_token();
        let ctx = RunContext {
            env: slot.env(),
            stop: stop.clone(),
            kill_grace: self.parts.kill_grace,
            progress: self.progress_sink(task, slot),
        };
        let lease_says_stop = lease.stop_signal();
        let run = AssertUnwindSafe(handler.run(task, &ctx)).catch_unwind();
        tokio::pin!(run);
        let result = tokio::select! {
            biased;
            result = &mut run => result,
            () = lease_says_stop.cancelled() => {
                stop.cancel();
                run.await
            }
        };
        let outcome = match result {
            Ok(outcome) => outcome,
            Err(panic) => Outcome::Failed {
                failure: Failure::Panicked(panic_message(panic.as_ref())),
                stderr_tail: String::new(),
            },
        };
        let outcome = self.judged_by_lease(outcome, lease);
        let duration = start.elapsed();
        let result = match &outcome {
            Outcome::Succeeded { .. } => "succeeded",
            Outcome::Failed { .. } => "failed",
        };
        metrics
            .task_duration
            .with_label_values(&[&task.kind, self.executor.name(), result])
            .observe(duration.as_secs_f64());
        Ran {
            outcome,
            started_at,
            duration,
            progress: ctx.progress.latest(),
        }
    }

    /// The task's progress: its slot's gauge (back to 0 when the task
    /// ends) and `progress` result events.
    fn progress_sink(&self, task: &Task, slot: &Slot) -> ProgressSink {
        let gauge = self
            .parts
            .metrics
            .task_progress
            .with_label_values(&[self.executor.name(), &slot.index().to_string()]);
        let place = Place {
            executor: self.executor.name(),
            device: slot.device(),
        };
        let running = RunningTask::new(task, place);
        let results = self.parts.results.clone();
        ProgressSink::new(gauge, move |report| results.progress(&running, report))
    }

    /// What the run counts as, given its lease: stopped by the lease, it ran
    /// past `max_lease` or lost its lease; a lost lease is never acked, even
    /// for a run that succeeded, since another worker may be running it too.
    fn judged_by_lease(&self, outcome: Outcome, lease: &Lease) -> Outcome {
        let interrupted = matches!(
            &outcome,
            Outcome::Failed {
                failure: Failure::Interrupted,
                ..
            }
        );
        let failure = match lease.interruption() {
            Some(Interruption::Lost) => Failure::LeaseLost,
            Some(Interruption::PastMaxLease) if interrupted => {
                Failure::PastMaxLease(self.parts.max_lease)
            }
            _ => return outcome,
        };
        let stderr_tail = match outcome {
            Outcome::Failed { stderr_tail, .. } => stderr_tail,
            Outcome::Succeeded { .. } => String::new(),
        };
        Outcome::Failed {
            failure,
            stderr_tail,
        }
    }

    /// Ends the lease as `disposition` says.
    async fn end(
        &self,
        received: &ReceivedMessage,
        task: &Task,
        lease: Lease,
        disposition: &Disposition,
        outcome: &Outcome,
    ) {
        match disposition {
            Disposition::Ack => {
                tracing::info!("task succeeded");
                lease.ack();
            }
            Disposition::Retry { after } => {
                let error = match outcome {
                    Outcome::Failed { failure, .. } => failure.to_string(),
                    Outcome::Succeeded { .. } => String::new(),
                };
                tracing::warn!(%error, retry_in = %humantime::format_duration(*after),
                    "task failed; it will be retried");
                lease.retry_after(*after);
            }
            Disposition::Release => {
                let how = self.parts.hand_back.send(task, lease).await;
                tracing::warn!(handed_back = ?how, interruptions = task.interruptions + 1,
                    "task interrupted by shutdown; handed back for another worker, its retry budget kept");
            }
            Disposition::LeaseLost => {
                tracing::error!(
                    "the lease was lost; the run was stopped and not acked (another worker may run the task)"
                );
                lease.abandon();
            }
            Disposition::DeadLetter { reason } => {
                tracing::error!(%reason, "task failed for good; dead-lettering it");
                let retry_in = backoff(task.attempt, &self.parts.retry);
                self.parts
                    .dead_letters
                    .send(received, lease, reason, task.attempt, retry_in)
                    .await;
            }
        }
    }

    /// Dead-letters a message that cannot run here, with the reason.
    async fn refuse(&self, received: &ReceivedMessage, lease: Lease, reason: &str) {
        tracing::error!(executor = %self.executor.name(), %reason,
            "the message cannot run here; dead-lettering it");
        let attempt = received.delivery_attempt.max(1).unsigned_abs();
        let retry_in = backoff(attempt, &self.parts.retry);
        self.parts
            .dead_letters
            .send(received, lease, reason, attempt, retry_in)
            .await;
        self.parts
            .results
            .refused(received, self.executor.name(), reason);
    }
}

/// `tasks_in_progress` up while alive, down when dropped, so the gauge
/// comes back whatever ends the run (a panic unwinding included).
struct InProgress(prometheus::IntGauge);

impl InProgress {
    fn new(metrics: &Metrics, executor: &str) -> InProgress {
        let gauge = metrics.tasks_in_progress.with_label_values(&[executor]);
        gauge.inc();
        InProgress(gauge)
    }
}

impl Drop for InProgress {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The text of a panic's payload.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Environment};

    fn registry() -> HandlerRegistry {
        let config = Config::load(&[], &Environment::default()).unwrap();
        let mut config = config;
        let gpu: crate::config::HandlerConfig =
            toml::from_str("executor = 'gpu'\ncommand = ['r']").unwrap();
        config.handlers.insert("render".into(), gpu);
        HandlerRegistry::from_config(&config).unwrap()
    }

    #[test]
    fn routing_table() {
        let r = registry();
        let wrong = |kind: &str, wanted: &str, got: &str| {
            Err(RouteError::WrongExecutor {
                kind: kind.into(),
                wanted: wanted.into(),
                got: got.into(),
            })
        };
        let cases: Vec<(&str, &str, Result<&str, RouteError>)> = vec![
            ("noop", "cpu", Ok("cpu")),
            ("sleep", "cpu", Ok("cpu")),
            ("render", "gpu", Ok("gpu")),
            ("render", "cpu", wrong("render", "gpu", "cpu")),
            ("noop", "gpu", wrong("noop", "cpu", "gpu")),
            (
                "reduce",
                "cpu",
                Err(RouteError::UnknownKind("reduce".into())),
            ),
            ("", "gpu", Err(RouteError::UnknownKind(String::new()))),
        ];
        for (kind, executor, want) in cases {
            let got = route(&r, kind, executor).map(|reg| reg.executor.as_str());
            assert_eq!(got, want, "kind {kind:?} on {executor}");
        }
    }
}

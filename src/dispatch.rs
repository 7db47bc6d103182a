//! The dispatcher: a pulled message becomes a task, goes to its kind's
//! handler, and its outcome becomes a disposition.
//!
//! Routing is data plus a pure function ([`route`]), table-tested. Messages
//! that cannot be routed (no `kind`, an unknown kind, a kind of another
//! executor class) are dead-lettered at once with the reason: never a loop,
//! never a silent drop.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use google_cloud_pubsub::client::Publisher;
use google_cloud_pubsub::model::Message;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::{ExecutorClass, RetryConfig};
use crate::disposition::{Disposition, backoff, decide};
use crate::executor::Slot;
use crate::handler::Failure;
use crate::handler::{HandlerRegistry, Outcome, Registered, RunContext};
use crate::lease::LeaseHandle;
use crate::metrics::Metrics;
use crate::pubsub::ReceivedMessage;
use crate::results::{ResultEvent, Results, now_rfc3339, rfc3339};
use crate::task::{KIND_ATTRIBUTE, TASK_ID_ATTRIBUTE, Task};

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
        wanted: ExecutorClass,
        /// The class whose subscription delivered it.
        got: ExecutorClass,
    },
}

/// Finds the handler of `kind` for a message that arrived on `class`'s subscription.
pub fn route<'r>(
    registry: &'r HandlerRegistry,
    kind: &str,
    class: ExecutorClass,
) -> Result<&'r Registered, RouteError> {
    let registered = registry
        .get(kind)
        .ok_or_else(|| RouteError::UnknownKind(kind.to_string()))?;
    if registered.executor != class {
        return Err(RouteError::WrongExecutor {
            kind: kind.to_string(),
            wanted: registered.executor,
            got: class,
        });
    }
    Ok(registered)
}

/// Publishes dead letters: the original data and attributes plus the reason.
#[derive(Clone, Debug)]
pub struct DeadLetters {
    /// The official publisher of the dead-letter topic.
    pub publisher: Publisher,
}

impl DeadLetters {
    /// Publishes one dead letter; the caller acks only after this succeeds.
    pub async fn publish(
        &self,
        original: &ReceivedMessage,
        reason: &str,
        attempts: u32,
        source_subscription: &str,
    ) -> Result<(), String> {
        let (data, mut attributes) = match &original.message {
            Some(m) => (
                m.data.clone(),
                m.attributes.clone().into_iter().collect::<BTreeMap<_, _>>(),
            ),
            None => (Vec::new(), BTreeMap::new()),
        };
        attributes.insert("leasehold_error".into(), reason.to_string());
        attributes.insert("leasehold_attempts".into(), attempts.to_string());
        attributes.insert(
            "leasehold_source_subscription".into(),
            source_subscription.to_string(),
        );
        self.publisher
            .publish(Message::new().set_data(data).set_attributes(attributes))
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

/// Everything needed to run the tasks of one executor.
#[derive(Clone)]
pub struct Dispatcher {
    /// The executor class whose subscription delivers these messages.
    pub class: ExecutorClass,
    /// That subscription's id (metrics, dead-letter attributes).
    pub subscription: String,
    /// Kinds to handlers.
    pub registry: Arc<HandlerRegistry>,
    /// The subscription's lease loop.
    pub lease: LeaseHandle,
    /// Where tasks that will never succeed go.
    pub dead_letters: DeadLetters,
    /// Attempts and backoff.
    pub retry: RetryConfig,
    /// Counters and histograms.
    pub metrics: Metrics,
    /// Cancelled when running handlers must stop (end of shutdown grace).
    pub stop: CancellationToken,
    /// SIGTERM-to-SIGKILL time for handlers.
    pub kill_grace: Duration,
    /// Result events.
    pub results: Results,
    /// This worker's name in result events (the pod name).
    pub worker: String,
    /// Where result publishes run, so shutdown waits for them.
    pub background: tokio_util::task::TaskTracker,
}

/// What a handler run produced, for the result event.
struct Ran {
    outcome: Outcome,
    started_at: time::OffsetDateTime,
    duration: Duration,
}

impl Dispatcher {
    /// Runs one received message to its disposition. `slot` is held until
    /// the message's fate is sent to the lease loop.
    pub async fn dispatch(&self, received: ReceivedMessage, slot: Slot) {
        let task = match decode(&received) {
            Ok(task) => task,
            Err(reason) => {
                tracing::error!(executor = %self.class, %reason, "undecodable message; dead-lettering it");
                let attempt = received.delivery_attempt.max(1) as u32;
                self.dead_letter(&received, &reason, attempt).await;
                self.emit(|| self.unrun_event(&received, attempt, reason));
                return;
            }
        };
        let span = tracing::info_span!("task", task_id = %task.task_id, kind = %task.kind,
            executor = %self.class, attempt = task.attempt);
        self.dispatch_task(&received, task, &slot)
            .instrument(span)
            .await;
        drop(slot);
    }

    async fn dispatch_task(&self, received: &ReceivedMessage, task: Task, slot: &Slot) {
        let ack_id = received.ack_id.clone();
        let registered = match route(&self.registry, &task.kind, self.class) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(reason = %e, "task cannot run here; dead-lettering it");
                self.dead_letter(received, &e.to_string(), task.attempt)
                    .await;
                self.emit(|| self.unrun_event(received, task.attempt, e.to_string()));
                return;
            }
        };
        let ran = self.run(&task, registered, slot).await;
        let disposition = decide(&ran.outcome, task.attempt, &self.retry);
        let label = outcome_label(&disposition);
        self.metrics
            .tasks_finished
            .with_label_values(&[&task.kind, self.class.as_str(), label])
            .inc();
        let mut error = match &ran.outcome {
            Outcome::Succeeded { .. } => None,
            Outcome::Failed { failure, .. } => Some(failure.to_string()),
        };
        match &disposition {
            Disposition::Ack => {
                tracing::info!("task succeeded");
                self.lease.ack(ack_id);
            }
            Disposition::Retry { after } => {
                tracing::warn!(error = error.as_deref().unwrap_or_default(),
                    retry_in = %humantime::format_duration(*after), "task failed; it will be retried");
                self.lease.release_after(ack_id, *after);
            }
            Disposition::Release => {
                tracing::warn!("task interrupted by shutdown; releasing it for another worker");
                self.lease.release_after(ack_id, Duration::ZERO);
            }
            Disposition::DeadLetter { reason } => {
                tracing::error!(%reason, "task failed for good; dead-lettering it");
                self.dead_letter(received, reason, task.attempt).await;
                error = Some(reason.clone());
            }
        }
        let (result, stderr, exit_code) = match ran.outcome {
            Outcome::Succeeded { result } => (result, None, Some(0)),
            Outcome::Failed {
                failure,
                stderr_tail,
            } => {
                let code = match failure {
                    Failure::Exit { code, .. } => Some(code),
                    _ => None,
                };
                (None, Some(stderr_tail).filter(|s| !s.is_empty()), code)
            }
        };
        self.emit(|| ResultEvent {
            task_id: task.task_id.clone(),
            message_id: task.message_id.clone(),
            kind: task.kind.clone(),
            executor: self.class.to_string(),
            device: slot.device().map(str::to_string),
            outcome: label.to_string(),
            attempt: task.attempt,
            exit_code,
            error,
            stderr,
            started_at: Some(rfc3339(ran.started_at)),
            finished_at: now_rfc3339(),
            duration_seconds: ran.duration.as_secs_f64(),
            worker: self.worker.clone(),
            result,
        });
    }

    /// The result event of a message that was dead-lettered without running.
    fn unrun_event(&self, received: &ReceivedMessage, attempt: u32, reason: String) -> ResultEvent {
        let message = received.message.clone().unwrap_or_default();
        ResultEvent {
            task_id: message
                .attributes
                .get(TASK_ID_ATTRIBUTE)
                .cloned()
                .unwrap_or_else(|| message.message_id.clone()),
            message_id: message.message_id.clone(),
            kind: message
                .attributes
                .get(KIND_ATTRIBUTE)
                .cloned()
                .unwrap_or_default(),
            executor: self.class.to_string(),
            device: None,
            outcome: "dead_lettered".into(),
            attempt,
            exit_code: None,
            error: Some(reason),
            stderr: None,
            started_at: None,
            finished_at: now_rfc3339(),
            duration_seconds: 0.0,
            worker: self.worker.clone(),
            result: None,
        }
    }

    /// Publishes a result event in the background; the event is only built
    /// when result events are enabled (it is on every task's path).
    fn emit(&self, event: impl FnOnce() -> ResultEvent) {
        if !self.results.enabled() {
            return;
        }
        let event = event();
        let results = self.results.clone();
        self.background.spawn(async move {
            if let Err(e) = results.publish(&event).await {
                tracing::warn!(task_id = %event.task_id, outcome = %event.outcome, error = %e,
                    "could not publish the result event; the task's own outcome is unaffected");
            }
        });
    }

    async fn run(&self, task: &Task, registered: &Registered, slot: &Slot) -> Ran {
        let labels = [task.kind.as_str(), self.class.as_str()];
        self.metrics.tasks_started.with_label_values(&labels).inc();
        if let Some(published) = task.publish_time {
            let wait = (time::OffsetDateTime::now_utc() - published).as_seconds_f64();
            self.metrics
                .task_queue_wait
                .with_label_values(&labels)
                .observe(wait.max(0.0));
        }
        let in_progress = self
            .metrics
            .tasks_in_progress
            .with_label_values(&[self.class.as_str()]);
        in_progress.inc();
        tracing::info!(device = slot.device(), "task started");
        let start = Instant::now();
        let started_at = time::OffsetDateTime::now_utc();
        let ctx = RunContext {
            env: slot.env(),
            stop: self.stop.clone(),
            kill_grace: self.kill_grace,
        };
        let outcome = registered.handler.run(task, &ctx).await;
        in_progress.dec();
        let result = match &outcome {
            Outcome::Succeeded { .. } => "succeeded",
            Outcome::Failed { .. } => "failed",
        };
        self.metrics
            .task_duration
            .with_label_values(&[task.kind.as_str(), self.class.as_str(), result])
            .observe(start.elapsed().as_secs_f64());
        Ran {
            outcome,
            started_at,
            duration: start.elapsed(),
        }
    }

    /// Dead-letters a message, acking it only once the dead letter is
    /// published. If publishing fails the message comes back after a backoff
    /// and is dead-lettered again then: it is never lost.
    async fn dead_letter(&self, received: &ReceivedMessage, reason: &str, attempts: u32) {
        match self
            .dead_letters
            .publish(received, reason, attempts, &self.subscription)
            .await
        {
            Ok(()) => self.lease.ack(received.ack_id.clone()),
            Err(e) => {
                let after = backoff(attempts, &self.retry);
                tracing::error!(error = %e, retry_in = %humantime::format_duration(after),
                    "could not publish the dead letter; the message will come back and be dead-lettered again");
                self.lease.release_after(received.ack_id.clone(), after);
            }
        }
    }
}

fn outcome_label(d: &Disposition) -> &'static str {
    match d {
        Disposition::Ack => "succeeded",
        Disposition::Retry { .. } => "retrying",
        Disposition::DeadLetter { .. } => "dead_lettered",
        Disposition::Release => "released",
    }
}

/// The task of a received message, or why there is none.
pub fn decode(received: &ReceivedMessage) -> Result<Task, String> {
    let message = received
        .message
        .as_ref()
        .ok_or_else(|| "the received message has no body".to_string())?;
    let publish_time = message.publish_time.as_ref().and_then(|t| {
        time::OffsetDateTime::from_unix_timestamp_nanos(
            t.seconds as i128 * 1_000_000_000 + t.nanos as i128,
        )
        .ok()
    });
    Task::decode(
        message.message_id.clone(),
        message.attributes.clone().into_iter().collect(),
        message.data.clone(),
        received.delivery_attempt,
        publish_time,
    )
    .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Environment};

    fn registry() -> HandlerRegistry {
        let mut config = Config::load(&[], &Environment::default()).unwrap();
        let gpu: crate::config::HandlerConfig = toml_handler("executor = 'gpu'\ncommand = ['r']");
        config.handlers.insert("render".into(), gpu);
        HandlerRegistry::from_config(&config)
    }

    fn toml_handler(s: &str) -> crate::config::HandlerConfig {
        config::Config::builder()
            .add_source(config::File::from_str(s, config::FileFormat::Toml))
            .build()
            .unwrap()
            .try_deserialize()
            .unwrap()
    }

    #[test]
    fn routing_table() {
        use ExecutorClass::*;
        let r = registry();
        let cases: Vec<(&str, ExecutorClass, Result<ExecutorClass, RouteError>)> = vec![
            ("noop", Cpu, Ok(Cpu)),
            ("sleep", Cpu, Ok(Cpu)),
            ("render", Gpu, Ok(Gpu)),
            (
                "render",
                Cpu,
                Err(RouteError::WrongExecutor {
                    kind: "render".into(),
                    wanted: Gpu,
                    got: Cpu,
                }),
            ),
            (
                "noop",
                Gpu,
                Err(RouteError::WrongExecutor {
                    kind: "noop".into(),
                    wanted: Cpu,
                    got: Gpu,
                }),
            ),
            ("reduce", Cpu, Err(RouteError::UnknownKind("reduce".into()))),
            ("", Gpu, Err(RouteError::UnknownKind("".into()))),
        ];
        for (kind, class, want) in cases {
            let got = route(&r, kind, class).map(|reg| reg.executor);
            assert_eq!(got, want, "kind {kind:?} on {class}");
        }
    }
}

//! Result events: one per ending of a task (`succeeded`, `retrying`,
//! `dead_lettered`, `released`, `lease_lost`) on the results topic, for producers and
//! dashboards to follow their tasks, and `progress` events while it runs
//! (the handler's latest report, at most once per `progress_interval`). Built here, in one place, and published
//! in the background: a slow or failing results topic never delays or
//! changes a task's own disposition.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;
use tokio_util::task::TaskTracker;

use crate::disposition::Disposition;
use crate::handler::{Failure, Outcome, Ran};
use crate::pubsub::{Outgoing, Publisher, ReceivedMessage};
use crate::task::{INTERRUPTIONS_ATTRIBUTE, KIND_ATTRIBUTE, TASK_ID_ATTRIBUTE, Task};

/// The JSON body of a result event (DESIGN.md, "Result event").
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ResultEvent {
    /// The producer's task id (or the message id).
    pub task_id: String,
    /// Pub/Sub's message id.
    pub message_id: String,
    /// The task kind ("" when the message had none).
    pub kind: String,
    /// The executor class whose subscription delivered it.
    pub executor: String,
    /// The GPU device it ran on, if any.
    pub device: Option<String>,
    /// `succeeded`, `retrying`, `dead_lettered`, `released`, `lease_lost`,
    /// or `progress` (the task is still running).
    pub outcome: String,
    /// Failed attempts before this one + 1 (interruptions do not count).
    pub attempt: u32,
    /// Times the task had been handed back unfinished before this run.
    pub interruptions: u32,
    /// The handler's exit code, when it exited.
    pub exit_code: Option<i32>,
    /// Why it failed.
    pub error: Option<String>,
    /// The last 4 KiB of the handler's stderr, on failure.
    pub stderr: Option<String>,
    /// RFC 3339 start of the handler, if it started.
    pub started_at: Option<String>,
    /// RFC 3339 end; `None` in a `progress` event.
    pub finished_at: Option<String>,
    /// Handler run time (so far, in a `progress` event).
    pub duration_seconds: f64,
    /// The worker (pod) name.
    pub worker: String,
    /// What the handler wrote to `LEASEHOLD_RESULT_FILE`.
    pub result: Option<serde_json::Value>,
    /// The handler's latest progress report (a JSON object).
    pub progress: Option<serde_json::Value>,
}

/// A task while it runs: what its `progress` events say besides the report.
#[derive(Debug, Clone)]
pub struct RunningTask {
    task_id: String,
    message_id: String,
    kind: String,
    executor: String,
    device: Option<String>,
    attempt: u32,
    interruptions: u32,
    started_at: time::OffsetDateTime,
    start: tokio::time::Instant,
}

impl RunningTask {
    /// `task`, started now in `place`.
    pub fn new(task: &Task, place: Place<'_>) -> RunningTask {
        RunningTask {
            task_id: task.task_id.clone(),
            message_id: task.message_id.clone(),
            kind: task.kind.clone(),
            executor: place.executor.to_string(),
            device: place.device.map(str::to_string),
            attempt: task.attempt,
            interruptions: task.interruptions,
            started_at: time::OffsetDateTime::now_utc(),
            start: tokio::time::Instant::now(),
        }
    }
}

/// Where a task ran, for its events.
#[derive(Debug, Clone, Copy)]
pub struct Place<'a> {
    /// The executor class.
    pub executor: &'a str,
    /// The device it held, if any.
    pub device: Option<&'a str>,
}

/// Publishes result events, or nothing when `pubsub.results_topic` is empty.
#[derive(Clone)]
pub struct Results {
    /// The publisher and the results topic; `None` disables events.
    sink: Option<(Arc<dyn Publisher>, String)>,
    /// This worker's name in events (the pod name).
    worker: String,
    /// Where publishes run, so shutdown waits for them.
    background: TaskTracker,
}

impl Results {
    /// Events to `topic` ("" disables them), published on `background`.
    pub fn new(
        publisher: Arc<dyn Publisher>,
        topic: &str,
        worker: String,
        background: TaskTracker,
    ) -> Results {
        Results {
            sink: (!topic.is_empty()).then(|| (publisher, topic.to_string())),
            worker,
            background,
        }
    }

    /// The event of a task that ran and ended as `disposition`.
    pub fn ran(&self, task: &Task, place: Place<'_>, ran: &Ran, disposition: &Disposition) {
        self.emit(|| {
            let (result, stderr, exit_code, failure) = match &ran.outcome {
                Outcome::Succeeded { result } => (result.clone(), None, Some(0), None),
                Outcome::Failed {
                    failure,
                    stderr_tail,
                } => {
                    let code = match failure {
                        Failure::Exit { code, .. } => Some(*code),
                        _ => None,
                    };
                    let stderr = Some(stderr_tail.clone()).filter(|s| !s.is_empty());
                    (None, stderr, code, Some(failure.to_string()))
                }
            };
            let error = match disposition {
                Disposition::DeadLetter { reason } => Some(reason.clone()),
                _ => failure,
            };
            ResultEvent {
                task_id: task.task_id.clone(),
                message_id: task.message_id.clone(),
                kind: task.kind.clone(),
                executor: place.executor.to_string(),
                device: place.device.map(str::to_string),
                outcome: disposition.label().to_string(),
                attempt: task.attempt,
                interruptions: task.interruptions,
                exit_code,
                error,
                stderr,
                started_at: Some(rfc3339(ran.started_at)),
                finished_at: Some(now_rfc3339()),
                duration_seconds: ran.duration.as_secs_f64(),
                worker: self.worker.clone(),
                result,
                progress: ran.progress.clone(),
            }
        });
    }

    /// The event of a message dead-lettered without running (undecodable,
    /// unroutable), described from its raw attributes.
    pub fn refused(&self, received: &ReceivedMessage, executor: &str, reason: &str) {
        self.emit(|| {
            let message = received.message.clone().unwrap_or_default();
            let attribute = |name: &str| message.attributes.get(name).cloned();
            ResultEvent {
                task_id: attribute(TASK_ID_ATTRIBUTE).unwrap_or_else(|| message.message_id.clone()),
                message_id: message.message_id.clone(),
                kind: attribute(KIND_ATTRIBUTE).unwrap_or_default(),
                executor: executor.to_string(),
                device: None,
                outcome: "dead_lettered".into(),
                attempt: received.delivery_attempt.max(1).unsigned_abs(),
                interruptions: attribute(INTERRUPTIONS_ATTRIBUTE)
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0),
                exit_code: None,
                error: Some(reason.to_string()),
                stderr: None,
                started_at: None,
                finished_at: Some(now_rfc3339()),
                duration_seconds: 0.0,
                worker: self.worker.clone(),
                result: None,
                progress: None,
            }
        });
    }

    /// A `progress` event: `running`'s latest report.
    pub fn progress(&self, running: &RunningTask, report: &serde_json::Value) {
        self.emit(|| ResultEvent {
            task_id: running.task_id.clone(),
            message_id: running.message_id.clone(),
            kind: running.kind.clone(),
            executor: running.executor.clone(),
            device: running.device.clone(),
            outcome: "progress".into(),
            attempt: running.attempt,
            interruptions: running.interruptions,
            exit_code: None,
            error: None,
            stderr: None,
            started_at: Some(rfc3339(running.started_at)),
            finished_at: None,
            duration_seconds: running.start.elapsed().as_secs_f64(),
            worker: self.worker.clone(),
            result: None,
            progress: Some(report.clone()),
        });
    }

    /// Publishes an event in the background. The event is built only when
    /// events are enabled: this is on every task's path.
    fn emit(&self, event: impl FnOnce() -> ResultEvent) {
        let Some((publisher, topic)) = &self.sink else {
            return;
        };
        let event = event();
        let (publisher, topic) = (publisher.clone(), topic.clone());
        self.background.spawn(async move {
            let data = serde_json::to_vec(&event).expect("a result event serialises");
            let attributes = BTreeMap::from([
                ("task_id".to_string(), event.task_id.clone()),
                ("kind".to_string(), event.kind.clone()),
                ("outcome".to_string(), event.outcome.clone()),
            ]);
            if let Err(e) = publisher
                .publish(&topic, Outgoing { data, attributes })
                .await
            {
                tracing::warn!(task_id = %event.task_id, outcome = %event.outcome, error = %e,
                    "could not publish the result event; the task's own outcome is unaffected");
            }
        });
    }
}

/// Now, as RFC 3339.
pub fn now_rfc3339() -> String {
    rfc3339(time::OffsetDateTime::now_utc())
}

/// A time as RFC 3339.
pub fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

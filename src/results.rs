//! Result events: one per outcome (`succeeded`, `retrying`, `dead_lettered`,
//! `released`) on the results topic, for producers and dashboards to follow
//! their tasks. Published in the background: a slow or failing results topic
//! never delays or changes a task's own disposition.

use google_cloud_pubsub::client::Publisher;
use google_cloud_pubsub::model::Message;
use serde::Serialize;

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
    /// `succeeded`, `retrying`, `dead_lettered` or `released`.
    pub outcome: String,
    /// 1-based delivery attempt.
    pub attempt: u32,
    /// The handler's exit code, when it exited.
    pub exit_code: Option<i32>,
    /// Why it failed.
    pub error: Option<String>,
    /// The last 4 KiB of the handler's stderr, on failure.
    pub stderr: Option<String>,
    /// RFC 3339 start of the handler, if it started.
    pub started_at: Option<String>,
    /// RFC 3339 end.
    pub finished_at: String,
    /// Handler run time.
    pub duration_seconds: f64,
    /// The worker (pod) name.
    pub worker: String,
    /// What the handler wrote to `LEASEHOLD_RESULT_FILE`.
    pub result: Option<serde_json::Value>,
}

/// Publishes result events, or nothing when `pubsub.results_topic` is empty.
#[derive(Clone, Debug)]
pub struct Results {
    /// The results topic's publisher; `None` disables events.
    pub publisher: Option<Publisher>,
}

impl Results {
    /// Whether events are published at all (`pubsub.results_topic` not empty).
    pub fn enabled(&self) -> bool {
        self.publisher.is_some()
    }

    /// Publishes one event; the official publisher retries transient errors.
    /// Returns the error text if it still failed (the caller only logs it).
    pub async fn publish(&self, event: &ResultEvent) -> Result<(), String> {
        let Some(publisher) = &self.publisher else {
            return Ok(());
        };
        let data = serde_json::to_vec(event).map_err(|e| e.to_string())?;
        let attributes = [
            ("task_id", event.task_id.as_str()),
            ("kind", event.kind.as_str()),
            ("outcome", event.outcome.as_str()),
        ];
        publisher
            .publish(Message::new().set_data(data).set_attributes(attributes))
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
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

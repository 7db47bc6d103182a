//! Producing tasks: what `leasehold publish` and `leasehold dev` do, and
//! what a producer does in its own language (a message with a `kind`
//! attribute on the topic of that kind's executor class).

use std::collections::BTreeMap;

use google_cloud_pubsub::model::Message;

use crate::config::Config;
use crate::pubsub::{Connection, ConnectionError};
use crate::task::{KIND_ATTRIBUTE, TASK_ID_ATTRIBUTE};

/// A task to publish.
#[derive(Debug, Clone, Default)]
pub struct NewTask {
    /// The handler name; decides the topic.
    pub kind: String,
    /// Optional producer id (becomes the `task_id` attribute).
    pub task_id: Option<String>,
    /// Extra attributes for the handler.
    pub attributes: BTreeMap<String, String>,
    /// The payload.
    pub data: Vec<u8>,
}

/// Publishing failed before or at Pub/Sub.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The configuration has no handler for the kind, so no topic is known.
    #[error(
        "no handler for kind {0:?} in the configuration, so its topic is unknown; add [handlers.{0}]"
    )]
    UnknownKind(String),
    /// `kind` and `task_id` are set through their own options.
    #[error("attribute {0:?} is reserved; use --kind / --task-id")]
    ReservedAttribute(String),
    /// The publisher could not be built.
    #[error(transparent)]
    Connection(#[from] ConnectionError),
    /// Pub/Sub refused or could not be reached.
    #[error("publishing to {topic} failed: {reason}")]
    Publish {
        /// The topic id.
        topic: String,
        /// The client's error.
        reason: String,
    },
}

/// The topic id that tasks of `kind` go to under `config`.
pub fn topic_for_kind<'c>(config: &'c Config, kind: &str) -> Result<&'c str, PublishError> {
    config
        .handlers
        .get(kind)
        .and_then(|h| config.executors.get(&h.executor))
        .map(|e| e.topic.as_str())
        .ok_or_else(|| PublishError::UnknownKind(kind.to_string()))
}

/// Builds the Pub/Sub message of a task.
pub fn task_message(task: &NewTask) -> Result<Message, PublishError> {
    if let Some(reserved) = task
        .attributes
        .keys()
        .find(|k| *k == KIND_ATTRIBUTE || *k == TASK_ID_ATTRIBUTE)
    {
        return Err(PublishError::ReservedAttribute(reserved.clone()));
    }
    let mut attributes = task.attributes.clone();
    attributes.insert(KIND_ATTRIBUTE.to_string(), task.kind.clone());
    if let Some(id) = &task.task_id {
        attributes.insert(TASK_ID_ATTRIBUTE.to_string(), id.clone());
    }
    Ok(Message::new()
        .set_data(task.data.clone())
        .set_attributes(attributes))
}

/// Publishes tasks (all to their kinds' topics); returns the message ids in order.
pub async fn publish_tasks(
    conn: &Connection,
    config: &Config,
    tasks: &[NewTask],
) -> Result<Vec<String>, PublishError> {
    let mut publishers = BTreeMap::new();
    let mut pending = Vec::with_capacity(tasks.len());
    for task in tasks {
        let topic = topic_for_kind(config, &task.kind)?;
        if !publishers.contains_key(topic) {
            publishers.insert(topic.to_string(), conn.publisher(topic).await?);
        }
        let message = task_message(task)?;
        pending.push((topic.to_string(), publishers[topic].publish(message)));
    }
    let mut ids = Vec::with_capacity(pending.len());
    for (topic, future) in pending {
        let id = future.await.map_err(|e| PublishError::Publish {
            topic,
            reason: e.to_string(),
        })?;
        ids.push(id);
    }
    Ok(ids)
}

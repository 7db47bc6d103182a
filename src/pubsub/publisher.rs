//! What the worker publishes (dead letters, result events, hand-back
//! copies), behind one narrow trait so the dispatcher and the whole worker
//! run on a fake in unit tests. [`GooglePublisher`] is the real one: the
//! official batching publisher, one per topic, made on first use.

use std::collections::{BTreeMap, HashMap};

use google_cloud_pubsub::model::Message;
use tokio::sync::Mutex;

use crate::pubsub::{Connection, ConnectionError};

/// A message to publish.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outgoing {
    /// The payload.
    pub data: Vec<u8>,
    /// Its attributes.
    pub attributes: BTreeMap<String, String>,
}

/// A publish that did not happen; the caller decides what that means for
/// its message (a dead letter is then not acked, a result event is only logged).
#[derive(Debug, Clone, thiserror::Error)]
#[error("publishing to topic {topic} failed: {reason}")]
pub struct PublishFailed {
    /// The topic id.
    pub topic: String,
    /// What the client said.
    pub reason: String,
}

/// Publishes to topics by id.
#[async_trait::async_trait]
pub trait Publisher: Send + Sync + 'static {
    /// Publishes `message` to topic `topic` (an id, not a path); returns the
    /// message id once Pub/Sub has it.
    async fn publish(&self, topic: &str, message: Outgoing) -> Result<String, PublishFailed>;
}

/// The official publisher, one per topic.
#[derive(Debug)]
pub struct GooglePublisher {
    connection: Connection,
    by_topic: Mutex<HashMap<String, google_cloud_pubsub::client::Publisher>>,
}

impl GooglePublisher {
    /// Publishers over `connection`, built when a topic is first used.
    pub fn new(connection: Connection) -> GooglePublisher {
        GooglePublisher {
            connection,
            by_topic: Mutex::new(HashMap::new()),
        }
    }

    /// Builds the publisher of `topic` now, so a bad endpoint is a start-up
    /// error rather than a failed dead letter later.
    pub async fn prepare(&self, topic: &str) -> Result<(), ConnectionError> {
        self.get(topic).await.map(|_| ())
    }

    async fn get(
        &self,
        topic: &str,
    ) -> Result<google_cloud_pubsub::client::Publisher, ConnectionError> {
        let mut by_topic = self.by_topic.lock().await;
        if let Some(p) = by_topic.get(topic) {
            return Ok(p.clone());
        }
        let p = self.connection.publisher(topic).await?;
        by_topic.insert(topic.to_string(), p.clone());
        Ok(p)
    }
}

#[async_trait::async_trait]
impl Publisher for GooglePublisher {
    async fn publish(&self, topic: &str, message: Outgoing) -> Result<String, PublishFailed> {
        let failed = |reason: String| PublishFailed {
            topic: topic.to_string(),
            reason,
        };
        let publisher = self.get(topic).await.map_err(|e| failed(e.to_string()))?;
        publisher
            .publish(
                Message::new()
                    .set_data(message.data)
                    .set_attributes(message.attributes),
            )
            .await
            .map_err(|e| failed(e.to_string()))
    }
}

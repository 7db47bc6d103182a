//! Dead letters: a task that will not succeed goes to the dead-letter topic
//! with its original data and attributes plus why, and only then is its
//! message acked. If the publish fails the message comes back after a
//! backoff and is dead-lettered again then: it is never lost.

use std::sync::Arc;
use std::time::Duration;

use crate::lease::Lease;
use crate::pubsub::{Outgoing, Publisher, ReceivedMessage};

/// Attribute with the reason a task was dead-lettered.
pub const ERROR_ATTRIBUTE: &str = "leasehold_error";
/// Attribute with the attempts it had.
pub const ATTEMPTS_ATTRIBUTE: &str = "leasehold_attempts";
/// Attribute with the subscription it came from.
pub const SOURCE_ATTRIBUTE: &str = "leasehold_source_subscription";

/// Publishes dead letters of one subscription's messages.
#[derive(Clone)]
pub struct DeadLetters {
    publisher: Arc<dyn Publisher>,
    /// The dead-letter topic id.
    topic: String,
    /// The subscription the messages come from (an attribute of each dead letter).
    source: String,
}

impl DeadLetters {
    /// Dead letters of `source`'s messages, to `topic`.
    pub fn new(publisher: Arc<dyn Publisher>, topic: &str, source: &str) -> DeadLetters {
        DeadLetters {
            publisher,
            topic: topic.to_string(),
            source: source.to_string(),
        }
    }

    /// Publishes the dead letter of `original`, then acks its lease; if the
    /// publish fails, the lease is retried after `retry_in` instead.
    pub async fn send(
        &self,
        original: &ReceivedMessage,
        lease: Lease,
        reason: &str,
        attempts: u32,
        retry_in: Duration,
    ) {
        let (data, mut attributes) = match &original.message {
            Some(m) => (m.data.clone(), m.attributes.clone().into_iter().collect()),
            None => (Vec::new(), std::collections::BTreeMap::new()),
        };
        attributes.insert(ERROR_ATTRIBUTE.into(), reason.to_string());
        attributes.insert(ATTEMPTS_ATTRIBUTE.into(), attempts.to_string());
        attributes.insert(SOURCE_ATTRIBUTE.into(), self.source.clone());
        match self
            .publisher
            .publish(&self.topic, Outgoing { data, attributes })
            .await
        {
            Ok(_) => lease.ack(),
            Err(e) => {
                tracing::error!(error = %e, retry_in = %humantime::format_duration(retry_in),
                    "could not publish the dead letter; the message will come back and be dead-lettered again");
                lease.retry_after(retry_in);
            }
        }
    }
}

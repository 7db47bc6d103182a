//! Handing a task back unfinished (shutdown, preemption): an interruption,
//! not a failure.
//!
//! A release (a nack) would spend one of the message's delivery attempts,
//! and Pub/Sub's dead-letter policy counts those: a long task interrupted
//! often enough would be dead-lettered without ever failing. So a hand-back
//! publishes a *copy* of the task to its own topic, with the same `task_id`,
//! carrying its failed attempts, its interruptions + 1 and the original
//! publish time as attributes, and only then acks the original. The copy
//! starts a fresh delivery count; `Task::decode` adds the count it carries.
//!
//! Failure cases: if the copy cannot be published, the original is released
//! instead (that one hand-back then costs a delivery attempt, which the
//! dead-letter policy's two spare deliveries absorb). If the ack of the
//! original is lost after the copy was published, both exist and the task
//! may run twice (at least once, never lost); the shared `task_id` makes it
//! visible. Other subscriptions on the task topic see the copy too.

use std::sync::Arc;

use crate::lease::Lease;
use crate::pubsub::{Outgoing, Publisher, ReceivedMessage};
use crate::results::rfc3339;
use crate::task::{
    FAILURES_ATTRIBUTE, INTERRUPTIONS_ATTRIBUTE, KIND_ATTRIBUTE, PUBLISHED_ATTRIBUTE,
    TASK_ID_ATTRIBUTE, Task,
};

/// How a hand-back went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandedBack {
    /// The copy is on the topic and the original acked.
    Copied,
    /// The copy could not be published (or the message not decoded): the
    /// original was released, spending a delivery attempt.
    Released,
}

/// Hands tasks of one executor back to their topic.
#[derive(Clone)]
pub struct HandBack {
    publisher: Arc<dyn Publisher>,
    /// The executor's task topic id.
    topic: String,
}

impl HandBack {
    /// Hand-backs to `topic` through `publisher`.
    pub fn new(publisher: Arc<dyn Publisher>, topic: &str) -> HandBack {
        HandBack {
            publisher,
            topic: topic.to_string(),
        }
    }

    /// Hands back a message that was pulled but not started.
    pub async fn unstarted(&self, received: &ReceivedMessage, lease: Lease) -> HandedBack {
        if let Ok(task) = Task::from_received(received) {
            self.send(&task, lease).await
        } else {
            // Undecodable: the next worker dead-letters it with the reason.
            lease.release();
            HandedBack::Released
        }
    }

    /// Publishes the copy of `task`, then acks the original's lease; if the
    /// copy cannot be published, releases it instead.
    pub async fn send(&self, task: &Task, lease: Lease) -> HandedBack {
        match self.publisher.publish(&self.topic, copy_of(task)).await {
            Ok(_) => {
                lease.ack();
                HandedBack::Copied
            }
            Err(e) => {
                tracing::warn!(task_id = %task.task_id, error = %e,
                    "could not publish the hand-back copy; releasing the message instead (this costs it a delivery attempt)");
                lease.release();
                HandedBack::Released
            }
        }
    }
}

/// The message that carries `task` on after an interruption.
pub fn copy_of(task: &Task) -> Outgoing {
    let mut attributes = task.attributes.clone();
    attributes.insert(KIND_ATTRIBUTE.into(), task.kind.clone());
    attributes.insert(TASK_ID_ATTRIBUTE.into(), task.task_id.clone());
    attributes.insert(
        FAILURES_ATTRIBUTE.into(),
        task.attempt.saturating_sub(1).to_string(),
    );
    attributes.insert(
        INTERRUPTIONS_ATTRIBUTE.into(),
        task.interruptions.saturating_add(1).to_string(),
    );
    if let Some(published) = task.publish_time {
        attributes.insert(PUBLISHED_ATTRIBUTE.into(), rfc3339(published));
    }
    Outgoing {
        data: task.data.clone(),
        attributes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_decodes_to_the_same_task_one_interruption_later() {
        let published = time::OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap();
        let original = Task::decode(
            "m-1".into(),
            [
                ("kind".to_string(), "render".to_string()),
                ("scene".to_string(), "castle".to_string()),
            ]
            .into(),
            b"payload".to_vec(),
            3,
            Some(published),
        )
        .unwrap();
        let copy = copy_of(&original);
        // Pub/Sub gives the copy a new message id and a first delivery.
        let again = Task::decode("m-2".into(), copy.attributes, copy.data, 1, None).unwrap();
        assert_eq!(again.task_id, "m-1", "the task keeps its id");
        assert_eq!(again.kind, "render");
        assert_eq!(again.attempt, 3, "two failures so far: still attempt 3");
        assert_eq!(again.interruptions, 1);
        assert_eq!(again.publish_time, Some(published));
        assert_eq!(again.data, b"payload");
        assert_eq!(again.attributes, original.attributes);
        let twice = copy_of(&again);
        assert_eq!(twice.attributes[INTERRUPTIONS_ATTRIBUTE], "2");
    }
}

//! A task: what a producer published, decoded from one received message.

use std::collections::BTreeMap;

use time::OffsetDateTime;

use crate::pubsub::ReceivedMessage;

/// Attribute that names the handler.
pub const KIND_ATTRIBUTE: &str = "kind";
/// Attribute with the producer's task id (defaults to the message id).
pub const TASK_ID_ATTRIBUTE: &str = "task_id";
/// On a copy handed back unfinished: the failed attempts of the original.
pub const FAILURES_ATTRIBUTE: &str = "leasehold_failures";
/// On a copy handed back unfinished: how often the task was handed back.
pub const INTERRUPTIONS_ATTRIBUTE: &str = "leasehold_interruptions";
/// On a copy handed back unfinished: the original's publish time (RFC 3339).
pub const PUBLISHED_ATTRIBUTE: &str = "leasehold_published";

/// One unit of work, as the dispatcher and handlers see it.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    /// The handler name (`kind` attribute).
    pub kind: String,
    /// The producer's id for logs and results; the message id if none was given.
    pub task_id: String,
    /// Pub/Sub's id of the message.
    pub message_id: String,
    /// Every attribute but `kind` and `task_id`, passed to the handler.
    pub attributes: BTreeMap<String, String>,
    /// The payload, given to the handler on stdin.
    pub data: Vec<u8>,
    /// Failed attempts so far + 1: the failures a handed-back copy carries
    /// plus this message's own delivery attempt. Interruptions do not count.
    pub attempt: u32,
    /// Whether Pub/Sub counted this message's deliveries. It does only on a
    /// subscription with a dead-letter policy; without the count a failure
    /// could be retried forever, so it is not retried at all.
    pub attempts_known: bool,
    /// Times the task was handed back unfinished (shutdown, preemption).
    pub interruptions: u32,
    /// When the producer published it (the original's time for a handed-back
    /// copy): queue-wait metrics and handlers.
    pub publish_time: Option<OffsetDateTime>,
}

/// Why a message could not be turned into a task. The message is
/// dead-lettered with this reason; it is never retried.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Producers must say which handler runs the task.
    #[error("the message has no `kind` attribute; a task must name its handler")]
    MissingKind,
    /// An empty `kind` is as good as none.
    #[error("the message's `kind` attribute is empty")]
    EmptyKind,
    /// Pub/Sub delivered an ack id without a message.
    #[error("the received message has no body")]
    NoBody,
    /// A `leasehold_*` attribute that leasehold sets itself has a bad value.
    #[error("the message's `{0}` attribute is not what leasehold writes there: {1:?}")]
    BadReserved(&'static str, String),
}

impl Task {
    /// The task of a message as Pull delivered it.
    pub fn from_received(received: &ReceivedMessage) -> Result<Task, DecodeError> {
        let message = received.message.as_ref().ok_or(DecodeError::NoBody)?;
        let publish_time = message.publish_time.as_ref().and_then(|t| {
            OffsetDateTime::from_unix_timestamp_nanos(
                i128::from(t.seconds) * 1_000_000_000 + i128::from(t.nanos),
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
    }

    /// Decodes a message's parts.
    pub fn decode(
        message_id: String,
        mut attributes: BTreeMap<String, String>,
        data: Vec<u8>,
        delivery_attempt: i32,
        publish_time: Option<OffsetDateTime>,
    ) -> Result<Task, DecodeError> {
        let kind = attributes
            .remove(KIND_ATTRIBUTE)
            .ok_or(DecodeError::MissingKind)?;
        if kind.trim().is_empty() {
            return Err(DecodeError::EmptyKind);
        }
        let task_id = attributes
            .remove(TASK_ID_ATTRIBUTE)
            .filter(|t| !t.is_empty())
            .unwrap_or_else(|| message_id.clone());
        let count = |attributes: &mut BTreeMap<String, String>, name: &'static str| {
            attributes.remove(name).map_or(Ok(0), |v| {
                v.parse::<u32>()
                    .map_err(|_| DecodeError::BadReserved(name, v))
            })
        };
        let failures = count(&mut attributes, FAILURES_ATTRIBUTE)?;
        let interruptions = count(&mut attributes, INTERRUPTIONS_ATTRIBUTE)?;
        let publish_time = match attributes.remove(PUBLISHED_ATTRIBUTE) {
            Some(t) => Some(
                OffsetDateTime::parse(&t, &time::format_description::well_known::Rfc3339)
                    .map_err(|_| DecodeError::BadReserved(PUBLISHED_ATTRIBUTE, t))?,
            ),
            None => publish_time,
        };
        Ok(Task {
            kind,
            task_id,
            message_id,
            attributes,
            data,
            attempt: failures.saturating_add(delivery_attempt.max(1).unsigned_abs()),
            attempts_known: delivery_attempt > 0,
            interruptions,
            publish_time,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn decodes_kind_task_id_and_other_attributes() {
        let t = Task::decode(
            "m1".into(),
            attrs(&[("kind", "render"), ("task_id", "t-7"), ("scene", "a")]),
            b"{}".to_vec(),
            3,
            None,
        )
        .unwrap();
        assert_eq!(t.kind, "render");
        assert_eq!(t.task_id, "t-7");
        assert_eq!(t.attempt, 3);
        assert_eq!(t.attributes, attrs(&[("scene", "a")]));
    }

    #[test]
    fn task_id_defaults_to_message_id_and_attempt_to_one() {
        let t = Task::decode("m1".into(), attrs(&[("kind", "k")]), vec![], 0, None).unwrap();
        assert_eq!(t.task_id, "m1");
        assert_eq!(t.attempt, 1);
    }

    #[test]
    fn a_received_message_decodes_with_its_publish_time_and_attempt() {
        let received = ReceivedMessage {
            ack_id: "a".into(),
            delivery_attempt: 2,
            message: Some(crate::pubsub::PubsubMessage {
                message_id: "m9".into(),
                attributes: [("kind".to_string(), "k".to_string())].into(),
                data: b"x".to_vec(),
                publish_time: Some(prost_types::Timestamp {
                    seconds: 1_700_000_000,
                    nanos: 5,
                }),
                ..Default::default()
            }),
        };
        let t = Task::from_received(&received).unwrap();
        assert_eq!((t.task_id.as_str(), t.attempt), ("m9", 2));
        assert_eq!(
            t.publish_time.unwrap().unix_timestamp_nanos(),
            1_700_000_000_000_000_005
        );
        let empty = ReceivedMessage {
            message: None,
            ..received
        };
        assert_eq!(Task::from_received(&empty), Err(DecodeError::NoBody));
    }

    #[test]
    fn a_handed_back_copy_keeps_its_failures_interruptions_and_publish_time() {
        let t = Task::decode(
            "copy".into(),
            attrs(&[
                ("kind", "k"),
                ("task_id", "t-1"),
                ("leasehold_failures", "2"),
                ("leasehold_interruptions", "11"),
                ("leasehold_published", "2026-01-02T03:04:05Z"),
                ("scene", "a"),
            ]),
            vec![],
            1,
            None,
        )
        .unwrap();
        assert_eq!((t.attempt, t.interruptions), (3, 11));
        assert_eq!(t.publish_time.unwrap().unix_timestamp(), 1_767_323_045);
        assert_eq!(t.attributes, attrs(&[("scene", "a")]), "not passed on");
        // A retried copy: Pub/Sub's count adds to what it carries.
        let t = Task::decode(
            "copy".into(),
            attrs(&[("kind", "k"), ("leasehold_failures", "2")]),
            vec![],
            3,
            None,
        )
        .unwrap();
        assert_eq!(t.attempt, 5);
        assert!(t.attempts_known);
        let unknown = Task::decode("m".into(), attrs(&[("kind", "k")]), vec![], 0, None).unwrap();
        assert!(!unknown.attempts_known);
        assert_eq!(
            Task::decode(
                "m".into(),
                attrs(&[("kind", "k"), ("leasehold_failures", "many")]),
                vec![],
                1,
                None
            ),
            Err(DecodeError::BadReserved(
                "leasehold_failures",
                "many".into()
            ))
        );
    }

    #[test]
    fn missing_or_empty_kind_is_refused() {
        assert_eq!(
            Task::decode("m".into(), attrs(&[]), vec![], 1, None),
            Err(DecodeError::MissingKind)
        );
        assert_eq!(
            Task::decode("m".into(), attrs(&[("kind", " ")]), vec![], 1, None),
            Err(DecodeError::EmptyKind)
        );
    }
}

//! Per-id failures of Acknowledge and ModifyAckDeadline on subscriptions
//! with exactly-once delivery.
//!
//! There Pub/Sub answers a batch that partly failed with an error whose
//! `google.rpc.Status` details carry a `google.rpc.ErrorInfo`: its metadata
//! maps each failed ack id to `PERMANENT_FAILURE_…` or `TRANSIENT_FAILURE_…`;
//! ids not listed succeeded. The official clients read it the same way
//! (python-pubsub's `_get_ack_errors`: a `TRANSIENT_` prefix is retried,
//! anything else is final). The three messages are decoded with prost here,
//! from their field numbers in google/rpc/status.proto and
//! `error_details.proto`, rather than pulling in a crate for them.

use std::collections::BTreeMap;

use prost::Message;

use crate::pubsub::data_plane::FailedIds;

/// `google.rpc.Status`
#[derive(Clone, PartialEq, Message)]
struct Status {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
    #[prost(message, repeated, tag = "3")]
    details: Vec<Any>,
}

/// `google.protobuf.Any`
#[derive(Clone, PartialEq, Message)]
struct Any {
    #[prost(string, tag = "1")]
    type_url: String,
    #[prost(bytes = "vec", tag = "2")]
    value: Vec<u8>,
}

/// `google.rpc.ErrorInfo`
#[derive(Clone, PartialEq, Message)]
struct ErrorInfo {
    #[prost(string, tag = "1")]
    reason: String,
    #[prost(string, tag = "2")]
    domain: String,
    #[prost(btree_map = "string, string", tag = "3")]
    metadata: BTreeMap<String, String>,
}

const ERROR_INFO: &str = "type.googleapis.com/google.rpc.ErrorInfo";

/// The ids that failed on their own, when `status` names them.
pub fn failed_ids(status: &tonic::Status) -> Option<FailedIds> {
    let details = Status::decode(status.details()).ok()?;
    let info = details
        .details
        .iter()
        .filter(|any| any.type_url == ERROR_INFO)
        .find_map(|any| ErrorInfo::decode(any.value.as_slice()).ok())?;
    let mut failed = FailedIds::default();
    for (ack_id, why) in info.metadata {
        if why.starts_with("TRANSIENT_") {
            failed.transient.push(ack_id);
        } else {
            failed.permanent.push(ack_id);
        }
    }
    Some(failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A status as Pub/Sub sends it for a batch where two ids failed.
    fn partial(metadata: &[(&str, &str)]) -> tonic::Status {
        let info = ErrorInfo {
            reason: "EXACTLY_ONCE_ACKID_FAILURE".into(),
            domain: "pubsub.googleapis.com".into(),
            metadata: metadata
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        let details = Status {
            code: tonic::Code::InvalidArgument as i32,
            message: "Some acknowledgement ids in the request were invalid.".into(),
            details: vec![Any {
                type_url: ERROR_INFO.into(),
                value: info.encode_to_vec(),
            }],
        };
        tonic::Status::with_details(
            tonic::Code::InvalidArgument,
            details.message.clone(),
            details.encode_to_vec().into(),
        )
    }

    #[test]
    fn transient_and_permanent_ids_are_told_apart() {
        let status = partial(&[
            ("a", "PERMANENT_FAILURE_INVALID_ACK_ID"),
            ("b", "TRANSIENT_FAILURE_UNORDERED_ACK_ID"),
            ("c", "PERMANENT_FAILURE_OTHER"),
        ]);
        assert_eq!(
            failed_ids(&status),
            Some(FailedIds {
                transient: vec!["b".into()],
                permanent: vec!["a".into(), "c".into()],
            })
        );
    }

    #[test]
    fn a_status_without_error_info_failed_as_a_whole() {
        assert_eq!(failed_ids(&tonic::Status::unavailable("down")), None);
        let other = Status {
            code: 3,
            message: String::new(),
            details: vec![Any {
                type_url: "type.googleapis.com/google.rpc.RetryInfo".into(),
                value: vec![],
            }],
        };
        let status = tonic::Status::with_details(
            tonic::Code::InvalidArgument,
            "x",
            other.encode_to_vec().into(),
        );
        assert_eq!(failed_ids(&status), None);
    }
}

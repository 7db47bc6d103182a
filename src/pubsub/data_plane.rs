//! The data plane: Pull, Acknowledge and `ModifyAckDeadline`, as generated
//! tonic stubs behind one narrow trait.
//!
//! The official `Subscriber` hides ack ids and deadlines; leasehold owns its
//! leases, so it speaks these three RPCs itself. The lease loop and the whole
//! worker are unit-tested on a fake of [`DataPlane`] (`crate::testing`); this
//! file is exercised against the real emulator by the black-box tests.

use std::future::Future;
use std::time::Duration;

use google_cloud_auth::credentials::{CacheableResource, Credentials};
use googleapis_tonic_google_pubsub_v1::google::pubsub::v1::{
    AcknowledgeRequest, ModifyAckDeadlineRequest, PullRequest, ReceivedMessage,
    subscriber_client::SubscriberClient,
};
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::transport::Channel;

/// Pull responses can carry up to 1,000 messages of up to 10 MB each in
/// principle; tonic's default 4 MiB decode cap would fail big batches.
const MAX_DECODE_BYTES: usize = 256 * 1024 * 1024;

/// A failed data-plane call.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{rpc} failed with {code:?}: {message}")]
pub struct RpcError {
    /// Which RPC.
    pub rpc: &'static str,
    /// The gRPC status code (Unavailable when the emulator is down).
    pub code: tonic::Code,
    /// The server's or transport's message.
    pub message: String,
    /// On an exactly-once subscription, the ack ids that failed when the
    /// rest of the batch succeeded; `None` when the whole call failed.
    pub failed_ids: Option<FailedIds>,
    /// The credentials refused for good to make a token: this process will
    /// never call Pub/Sub again (the worker fails liveness to be restarted).
    pub credentials_lost: bool,
}

/// The ack ids of a batch that failed on their own.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FailedIds {
    /// Worth retrying (e.g. `TRANSIENT_FAILURE_*`).
    pub transient: Vec<String>,
    /// Never going to succeed (e.g. `PERMANENT_FAILURE_INVALID_ACK_ID`: the
    /// lease is gone).
    pub permanent: Vec<String>,
}

impl RpcError {
    /// A whole call that failed.
    pub fn new(rpc: &'static str, code: tonic::Code, message: impl Into<String>) -> RpcError {
        RpcError {
            rpc,
            code,
            message: message.into(),
            failed_ids: None,
            credentials_lost: false,
        }
    }

    /// A short stable name for metric labels (`unavailable`, `not_found`, ...).
    pub fn code_label(&self) -> &'static str {
        code_label(self.code)
    }
}

/// gRPC codes in snake case, for bounded metric labels.
pub fn code_label(code: tonic::Code) -> &'static str {
    use tonic::Code::{
        Aborted, AlreadyExists, Cancelled, DataLoss, DeadlineExceeded, FailedPrecondition,
        Internal, InvalidArgument, NotFound, Ok, OutOfRange, PermissionDenied, ResourceExhausted,
        Unauthenticated, Unavailable, Unimplemented, Unknown,
    };
    match code {
        Ok => "ok",
        Cancelled => "cancelled",
        Unknown => "unknown",
        InvalidArgument => "invalid_argument",
        DeadlineExceeded => "deadline_exceeded",
        NotFound => "not_found",
        AlreadyExists => "already_exists",
        PermissionDenied => "permission_denied",
        ResourceExhausted => "resource_exhausted",
        FailedPrecondition => "failed_precondition",
        Aborted => "aborted",
        OutOfRange => "out_of_range",
        Unimplemented => "unimplemented",
        Internal => "internal",
        Unavailable => "unavailable",
        DataLoss => "data_loss",
        Unauthenticated => "unauthenticated",
    }
}

/// The three data-plane RPCs, per subscription (full resource path).
#[async_trait::async_trait]
pub trait DataPlane: Send + Sync + 'static {
    /// Long-polling unary Pull of at most `max_messages`, answered within
    /// `long_poll` or the data plane's own bound, whichever is shorter.
    async fn pull_within(
        &self,
        subscription: &str,
        max_messages: i32,
        long_poll: Duration,
    ) -> Result<Vec<ReceivedMessage>, RpcError>;

    /// [`pull_within`](Self::pull_within) the data plane's own bound.
    async fn pull(
        &self,
        subscription: &str,
        max_messages: i32,
    ) -> Result<Vec<ReceivedMessage>, RpcError> {
        self.pull_within(subscription, max_messages, Duration::MAX)
            .await
    }

    /// Acknowledge a batch of ack ids (the caller keeps batches within
    /// Pub/Sub's request limits), giving up after `timeout`.
    async fn acknowledge(
        &self,
        subscription: &str,
        ack_ids: Vec<String>,
        timeout: Duration,
    ) -> Result<(), RpcError>;

    /// Set the deadline of a batch of ack ids (0 releases them now), giving
    /// up after `timeout`.
    async fn modify_ack_deadline(
        &self,
        subscription: &str,
        ack_ids: Vec<String>,
        seconds: i32,
        timeout: Duration,
    ) -> Result<(), RpcError>;
}

/// [`DataPlane`] over tonic, with credentials on every request.
#[derive(Clone, Debug)]
pub struct GrpcDataPlane {
    client: SubscriberClient<Channel>,
    credentials: Credentials,
    /// How long a Pull may wait for messages before answering empty. Bounded
    /// so a worker notices shutdown and a dead connection within this time.
    pull_timeout: Duration,
}

impl GrpcDataPlane {
    /// A stub over a (lazily connected) channel.
    pub fn new(channel: Channel, credentials: Credentials) -> Self {
        GrpcDataPlane {
            client: SubscriberClient::new(channel).max_decoding_message_size(MAX_DECODE_BYTES),
            credentials,
            pull_timeout: Duration::from_secs(30),
        }
    }

    /// Overrides the long-poll bound.
    pub fn with_pull_timeout(mut self, timeout: Duration) -> Self {
        self.pull_timeout = timeout;
        self
    }

    /// One Acknowledge or ModifyAckDeadline: credentials and the routing
    /// header on it, `timeout` sent as `grpc-timeout` and enforced here.
    async fn unary<T, F, Fut>(
        &self,
        rpc: &'static str,
        subscription: &str,
        body: T,
        timeout: Duration,
        send: F,
    ) -> Result<(), RpcError>
    where
        F: FnOnce(SubscriberClient<Channel>, tonic::Request<T>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<()>, tonic::Status>>,
    {
        with_deadline(rpc, timeout, async {
            let mut request = self.request(rpc, subscription, body).await?;
            request.set_timeout(timeout);
            send(self.client.clone(), request)
                .await
                .map(|_| ())
                .map_err(|s| rpc_error(rpc, &s))
        })
        .await
    }

    async fn request<T>(
        &self,
        rpc: &'static str,
        subscription: &str,
        body: T,
    ) -> Result<tonic::Request<T>, RpcError> {
        let headers = match self.credentials.headers(http::Extensions::new()).await {
            Ok(CacheableResource::New { data, .. }) => data,
            Ok(CacheableResource::NotModified) => http::HeaderMap::new(),
            // The token endpoint (metadata server) down is transient, like
            // Pub/Sub down: callers retry it. Only a refusal is Unauthenticated.
            Err(e) => {
                return Err(RpcError {
                    // google-cloud-auth gives up for good on a permanent
                    // refusal (e.g. invalid_grant): only a new process gets a
                    // new credential.
                    credentials_lost: !e.is_transient(),
                    ..RpcError::new(
                        rpc,
                        if e.is_transient() {
                            tonic::Code::Unavailable
                        } else {
                            tonic::Code::Unauthenticated
                        },
                        format!("cannot get an access token: {e}"),
                    )
                });
            }
        };
        let mut request = tonic::Request::new(body);
        *request.metadata_mut() = MetadataMap::from_headers(headers);
        // Routing header Pub/Sub expects on subscription-scoped calls.
        if let Ok(v) = MetadataValue::try_from(format!("subscription={subscription}")) {
            request.metadata_mut().insert("x-goog-request-params", v);
        }
        Ok(request)
    }
}

fn rpc_error(rpc: &'static str, status: &tonic::Status) -> RpcError {
    // tonic enforces the request's timeout itself and reports it as
    // Cancelled; it is the deadline that passed.
    let code = match (status.code(), status.message()) {
        (tonic::Code::Cancelled, "Timeout expired") => tonic::Code::DeadlineExceeded,
        (code, _) => code,
    };
    RpcError {
        failed_ids: super::ack_errors::failed_ids(status),
        ..RpcError::new(rpc, code, status.message())
    }
}

/// Runs `call` with a deadline: sent to the server as `grpc-timeout`, and
/// enforced here too, so a stalled connection cannot hold the caller past it.
async fn with_deadline<T>(
    rpc: &'static str,
    timeout: Duration,
    call: impl Future<Output = Result<T, RpcError>>,
) -> Result<T, RpcError> {
    match tokio::time::timeout(timeout, call).await {
        Ok(result) => result,
        Err(_) => Err(RpcError::new(
            rpc,
            tonic::Code::DeadlineExceeded,
            format!("no answer within {timeout:?}"),
        )),
    }
}

#[async_trait::async_trait]
impl DataPlane for GrpcDataPlane {
    async fn pull_within(
        &self,
        subscription: &str,
        max_messages: i32,
        long_poll: Duration,
    ) -> Result<Vec<ReceivedMessage>, RpcError> {
        #[allow(deprecated)] // return_immediately is deprecated; false is the long poll we want
        let body = PullRequest {
            subscription: subscription.to_string(),
            return_immediately: false,
            max_messages,
        };
        let mut request = self.request("Pull", subscription, body).await?;
        request.set_timeout(long_poll.min(self.pull_timeout));
        match self.client.clone().pull(request).await {
            Ok(response) => Ok(response.into_inner().received_messages),
            Err(s) => match rpc_error("Pull", &s) {
                // A long poll that found nothing in time is an empty answer,
                // whether the server said so or tonic's own timer did first.
                e if e.code == tonic::Code::DeadlineExceeded => Ok(Vec::new()),
                e => Err(e),
            },
        }
    }

    async fn acknowledge(
        &self,
        subscription: &str,
        ack_ids: Vec<String>,
        timeout: Duration,
    ) -> Result<(), RpcError> {
        let body = AcknowledgeRequest {
            subscription: subscription.to_string(),
            ack_ids,
        };
        self.unary(
            "Acknowledge",
            subscription,
            body,
            timeout,
            |mut c, r| async move { c.acknowledge(r).await },
        )
        .await
    }

    async fn modify_ack_deadline(
        &self,
        subscription: &str,
        ack_ids: Vec<String>,
        seconds: i32,
        timeout: Duration,
    ) -> Result<(), RpcError> {
        let body = ModifyAckDeadlineRequest {
            subscription: subscription.to_string(),
            ack_ids,
            ack_deadline_seconds: seconds,
        };
        self.unary(
            "ModifyAckDeadline",
            subscription,
            body,
            timeout,
            |mut c, r| async move { c.modify_ack_deadline(r).await },
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tonics_own_timeout_is_the_deadline_passing() {
        // tonic's timer firing before the server's answer (under load): a
        // long poll that found nothing, not a failed Pull.
        let e = rpc_error("Pull", &tonic::Status::cancelled("Timeout expired"));
        assert_eq!(e.code, tonic::Code::DeadlineExceeded);
        let e = rpc_error("Pull", &tonic::Status::cancelled("the client went away"));
        assert_eq!(e.code, tonic::Code::Cancelled);
    }
}

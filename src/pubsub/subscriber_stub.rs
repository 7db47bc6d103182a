//! The data plane: Pull, Acknowledge and ModifyAckDeadline, as generated
//! tonic stubs behind one narrow trait.
//!
//! The official `Subscriber` hides ack ids and deadlines; leasehold owns its
//! leases, so it speaks these three RPCs itself. Everything above this trait
//! (puller, lease loop) is tested against small fakes; this file is tested
//! against the real emulator.

use std::time::Duration;

use google_cloud_auth::credentials::{CacheableResource, Credentials};
use googleapis_tonic_google_pubsub_v1::google::pubsub::v1::{
    AcknowledgeRequest, ModifyAckDeadlineRequest, PullRequest, ReceivedMessage,
    subscriber_client::SubscriberClient,
};
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::transport::Channel;

/// Most ack ids Pub/Sub takes in one Acknowledge or ModifyAckDeadline
/// (keeps requests under the 512 KiB request cap with real ack ids).
pub const MAX_ACK_IDS_PER_RPC: usize = 2_500;

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
}

impl RpcError {
    /// A short stable name for metric labels (`unavailable`, `not_found`, ...).
    pub fn code_label(&self) -> &'static str {
        code_label(self.code)
    }
}

/// gRPC codes in snake case, for bounded metric labels.
pub fn code_label(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
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
    /// Long-polling unary Pull of at most `max_messages`.
    async fn pull(
        &self,
        subscription: &str,
        max_messages: i32,
    ) -> Result<Vec<ReceivedMessage>, RpcError>;

    /// Acknowledge at most [`MAX_ACK_IDS_PER_RPC`] ack ids.
    async fn acknowledge(&self, subscription: &str, ack_ids: Vec<String>) -> Result<(), RpcError>;

    /// Set the deadline of at most [`MAX_ACK_IDS_PER_RPC`] ack ids; 0 releases them now.
    async fn modify_ack_deadline(
        &self,
        subscription: &str,
        ack_ids: Vec<String>,
        seconds: i32,
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
                    rpc,
                    code: if e.is_transient() {
                        tonic::Code::Unavailable
                    } else {
                        tonic::Code::Unauthenticated
                    },
                    message: format!("cannot get an access token: {e}"),
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

fn rpc_error(rpc: &'static str, status: tonic::Status) -> RpcError {
    RpcError {
        rpc,
        code: status.code(),
        message: status.message().to_string(),
    }
}

#[async_trait::async_trait]
impl DataPlane for GrpcDataPlane {
    async fn pull(
        &self,
        subscription: &str,
        max_messages: i32,
    ) -> Result<Vec<ReceivedMessage>, RpcError> {
        #[allow(deprecated)] // return_immediately is deprecated; false is the long poll we want
        let body = PullRequest {
            subscription: subscription.to_string(),
            return_immediately: false,
            max_messages,
        };
        let mut request = self.request("Pull", subscription, body).await?;
        request.set_timeout(self.pull_timeout);
        match self.client.clone().pull(request).await {
            Ok(response) => Ok(response.into_inner().received_messages),
            // A long poll that found nothing in time is an empty answer.
            Err(s) if s.code() == tonic::Code::DeadlineExceeded => Ok(Vec::new()),
            Err(s) => Err(rpc_error("Pull", s)),
        }
    }

    async fn acknowledge(&self, subscription: &str, ack_ids: Vec<String>) -> Result<(), RpcError> {
        let body = AcknowledgeRequest {
            subscription: subscription.to_string(),
            ack_ids,
        };
        let request = self.request("Acknowledge", subscription, body).await?;
        self.client
            .clone()
            .acknowledge(request)
            .await
            .map(|_| ())
            .map_err(|s| rpc_error("Acknowledge", s))
    }

    async fn modify_ack_deadline(
        &self,
        subscription: &str,
        ack_ids: Vec<String>,
        seconds: i32,
    ) -> Result<(), RpcError> {
        let body = ModifyAckDeadlineRequest {
            subscription: subscription.to_string(),
            ack_ids,
            ack_deadline_seconds: seconds,
        };
        let request = self
            .request("ModifyAckDeadline", subscription, body)
            .await?;
        self.client
            .clone()
            .modify_ack_deadline(request)
            .await
            .map(|_| ())
            .map_err(|s| rpc_error("ModifyAckDeadline", s))
    }
}

//! The RPCs of a lease loop: each bound by a deadline derived from the time
//! its leases have left, retried while that is worth it, and aware of the
//! per-id failures of exactly-once subscriptions (only the failed ids are
//! retried or given up; a batch is never failed as a whole for a few ids).

use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Instant, sleep};

use crate::pubsub::{DataPlane, RpcError};

/// The longest one data-plane RPC may take.
pub const MAX_RPC_TIMEOUT: Duration = Duration::from_secs(10);
/// The shortest deadline worth sending.
pub const MIN_RPC_TIMEOUT: Duration = Duration::from_millis(250);

/// The deadline of an RPC about leases that expire at `expires`: half the
/// time they have left, so a timed-out call still leaves time to retry, and at
/// most 10 s. Leases already past their deadline get the full 10 s: nothing
/// is lost by waiting on those.
pub fn rpc_timeout(expires: Instant, now: Instant) -> Duration {
    if expires <= now {
        return MAX_RPC_TIMEOUT;
    }
    ((expires - now) / 2).clamp(MIN_RPC_TIMEOUT, MAX_RPC_TIMEOUT)
}

/// Codes worth retrying: the service or the network is having a moment.
pub fn is_transient(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Unavailable
            | tonic::Code::DeadlineExceeded
            | tonic::Code::ResourceExhausted
            | tonic::Code::Aborted
            | tonic::Code::Internal
            | tonic::Code::Unknown
            | tonic::Code::Cancelled
    )
}

/// What a (retried) ack or deadline change came to.
#[derive(Debug, Default)]
pub struct Sent {
    /// Ids whose change did not happen, and the last error about them.
    pub failed: Vec<String>,
    /// The last error, when some ids failed.
    pub error: Option<RpcError>,
}

/// Sends one subscription's acks and deadline changes.
#[derive(Clone)]
pub struct Sender {
    pub data_plane: Arc<dyn DataPlane>,
    /// Full subscription path.
    pub subscription: String,
    /// How long an ack or deadline change is retried before giving up.
    pub give_up_after: Duration,
}

impl Sender {
    /// Acknowledges `ids` (whose leases expire at `expires`), retrying
    /// transient failures of the call or of single ids.
    pub async fn acknowledge(&self, ids: Vec<String>, expires: Instant) -> Sent {
        self.retrying(ids, expires, |ids, timeout| {
            let (dp, sub) = (self.data_plane.clone(), self.subscription.clone());
            async move { dp.acknowledge(&sub, ids, timeout).await }
        })
        .await
    }

    /// Sets the deadline of `ids` to `seconds` (0 releases), retrying like
    /// [`acknowledge`](Self::acknowledge).
    pub async fn modify(&self, ids: Vec<String>, seconds: i32, expires: Instant) -> Sent {
        self.retrying(ids, expires, |ids, timeout| {
            let (dp, sub) = (self.data_plane.clone(), self.subscription.clone());
            async move { dp.modify_ack_deadline(&sub, ids, seconds, timeout).await }
        })
        .await
    }

    /// One extension of `ids` to `seconds`, bound by their deadline; the
    /// lease loop decides what a failure means.
    pub async fn extend(
        &self,
        ids: Vec<String>,
        seconds: i32,
        expires: Instant,
    ) -> Result<(), RpcError> {
        let timeout = rpc_timeout(expires, Instant::now());
        bounded(
            "ModifyAckDeadline",
            timeout,
            self.data_plane
                .modify_ack_deadline(&self.subscription, ids, seconds, timeout),
        )
        .await
    }

    /// Calls `call` until every id succeeded, failed for good, or retrying
    /// stops being worth it (a code that will not get better, or
    /// `give_up_after`). Backoff: 100 ms doubling to 5 s.
    async fn retrying<F, Fut>(&self, mut ids: Vec<String>, expires: Instant, call: F) -> Sent
    where
        F: Fn(Vec<String>, Duration) -> Fut,
        Fut: Future<Output = Result<(), RpcError>>,
    {
        let start = Instant::now();
        let mut delay = Duration::from_millis(100);
        let mut sent = Sent::default();
        loop {
            let timeout = rpc_timeout(expires, Instant::now());
            let e = match bounded("a lease RPC", timeout, call(ids.clone(), timeout)).await {
                Ok(()) => return sent,
                Err(e) => e,
            };
            if let Some(failed) = &e.failed_ids {
                // The rest of the batch succeeded: only these ids are left.
                sent.failed.extend(failed.permanent.iter().cloned());
                ids.clone_from(&failed.transient);
            }
            let give_up = !is_transient(e.code) && e.failed_ids.is_none()
                || start.elapsed() + delay > self.give_up_after;
            if ids.is_empty() || give_up {
                sent.failed.extend(ids);
                sent.error = Some(e);
                return sent;
            }
            sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }
}

/// `call`, or `DeadlineExceeded` once `timeout` has passed: whatever the
/// transport does, a lease RPC never holds the loop past its deadline.
async fn bounded(
    rpc: &'static str,
    timeout: Duration,
    call: impl Future<Output = Result<(), RpcError>>,
) -> Result<(), RpcError> {
    tokio::time::timeout(timeout, call)
        .await
        .unwrap_or_else(|_| {
            Err(RpcError::new(
                rpc,
                tonic::Code::DeadlineExceeded,
                format!("no answer within {timeout:?}"),
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_are_half_the_time_left_within_bounds() {
        let now = Instant::now();
        let s = Duration::from_secs;
        assert_eq!(rpc_timeout(now + s(6), now), s(3));
        assert_eq!(rpc_timeout(now + s(60), now), s(10));
        assert_eq!(
            rpc_timeout(now + Duration::from_millis(100), now),
            MIN_RPC_TIMEOUT
        );
        assert_eq!(rpc_timeout(now, now), MAX_RPC_TIMEOUT, "already lapsed");
    }
}

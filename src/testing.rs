//! Hand-written fakes shared by the unit tests.

use std::sync::Mutex;

use tokio::time::Instant;

use crate::pubsub::{DataPlane, ReceivedMessage, RpcError};

/// One recorded data-plane call.
#[derive(Debug, Clone, PartialEq)]
pub enum Call {
    Pull { max_messages: i32 },
    Ack { ids: Vec<String> },
    Modify { ids: Vec<String>, seconds: i32 },
}

/// A data plane that records calls and can be told to fail.
#[derive(Debug, Default)]
pub struct FakeDataPlane {
    pub calls: Mutex<Vec<(Instant, Call)>>,
    /// While true, ModifyAckDeadline and Acknowledge fail with Unavailable.
    pub failing: Mutex<bool>,
    /// Messages the next Pull returns.
    pub to_pull: Mutex<Vec<ReceivedMessage>>,
}

impl FakeDataPlane {
    pub fn calls(&self) -> Vec<(Instant, Call)> {
        self.calls.lock().unwrap().clone()
    }

    pub fn set_failing(&self, failing: bool) {
        *self.failing.lock().unwrap() = failing;
    }

    fn record(&self, call: Call) -> Result<(), RpcError> {
        self.calls.lock().unwrap().push((Instant::now(), call));
        if *self.failing.lock().unwrap() {
            return Err(RpcError {
                rpc: "fake",
                code: tonic::Code::Unavailable,
                message: "fake outage".into(),
            });
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl DataPlane for FakeDataPlane {
    async fn pull(&self, _: &str, max_messages: i32) -> Result<Vec<ReceivedMessage>, RpcError> {
        self.record(Call::Pull { max_messages })?;
        let mut queue = self.to_pull.lock().unwrap();
        let n = (max_messages as usize).min(queue.len());
        Ok(queue.drain(..n).collect())
    }

    async fn acknowledge(&self, _: &str, ids: Vec<String>) -> Result<(), RpcError> {
        self.record(Call::Ack { ids })
    }

    async fn modify_ack_deadline(
        &self,
        _: &str,
        ids: Vec<String>,
        seconds: i32,
    ) -> Result<(), RpcError> {
        self.record(Call::Modify { ids, seconds })
    }
}

//! Hand-written fakes shared by the unit tests: a data plane that behaves
//! like one in-memory subscription (and misbehaves when told), here; the
//! recording publisher, Kubernetes API and log writer in [`recorders`].

mod recorders;

pub use recorders::{FakePodPatcher, FakePublisher, LogBuffer};

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::pubsub::{DataPlane, FailedIds, PubsubMessage, ReceivedMessage, RpcError};

/// One recorded data-plane call.
#[derive(Debug, Clone, PartialEq)]
pub enum Call {
    /// `long_poll`: how long this Pull could wait for a message.
    Pull {
        max_messages: i32,
        long_poll: Duration,
    },
    Ack {
        ids: Vec<String>,
    },
    Modify {
        ids: Vec<String>,
        seconds: i32,
    },
}

/// How long the fake's Pull waits for a message before answering empty.
const LONG_POLL: Duration = Duration::from_secs(5);
/// The ack deadline a pulled message starts with.
const ACK_DEADLINE: Duration = Duration::from_secs(10);

/// How the fake misbehaves, when told to.
#[derive(Debug, Default, Clone)]
pub struct Misbehaviour {
    /// `ModifyAckDeadline` and Acknowledge fail with Unavailable.
    pub failing: bool,
    /// Pull fails with this code.
    pub pull_failing: Option<tonic::Code>,
    /// `ModifyAckDeadline` and Acknowledge never answer.
    pub hang: bool,
    /// Extensions (a `ModifyAckDeadline` of more than 0 s) take effect this late.
    pub slow_extensions: Option<Duration>,
    /// Ack ids refused for good, as an exactly-once subscription does.
    pub refused: HashSet<String>,
    /// Ack ids refused once, transiently.
    pub refused_once: HashSet<String>,
    /// Pull returns this many messages more than asked for.
    pub extra_on_pull: usize,
}

/// A message someone pulled and has not acked.
#[derive(Debug)]
struct Outstanding {
    message: ReceivedMessage,
    deadline: Instant,
}

/// A data plane that records every call and behaves like one subscription:
/// pulled messages come back (with `delivery_attempt + 1` and a new ack id)
/// when their deadline passes, a `ModifyAckDeadline` moves the deadline, an
/// Acknowledge removes them. Acks and deadline changes are recorded when they
/// take effect, so the record is the order the server saw them in.
#[derive(Debug, Default)]
pub struct FakeDataPlane {
    calls: Mutex<Vec<(Instant, Call)>>,
    misbehaviour: Mutex<Misbehaviour>,
    queue: Mutex<VecDeque<ReceivedMessage>>,
    outstanding: Mutex<HashMap<String, Outstanding>>,
    arrived: Notify,
}

/// A received message of `kind` (None: no `kind` attribute) with `data`, as
/// Pull would return it for the first time.
pub fn message(id: &str, kind: Option<&str>, data: &str) -> ReceivedMessage {
    let mut attributes = BTreeMap::new();
    if let Some(kind) = kind {
        attributes.insert("kind".to_string(), kind.to_string());
    }
    attributes.insert("task_id".to_string(), id.to_string());
    ReceivedMessage {
        ack_id: format!("{id}#1"),
        delivery_attempt: 1,
        message: Some(PubsubMessage {
            message_id: format!("m-{id}"),
            attributes: attributes.into_iter().collect(),
            data: data.as_bytes().to_vec(),
            ..Default::default()
        }),
    }
}

impl FakeDataPlane {
    pub fn calls(&self) -> Vec<(Instant, Call)> {
        self.calls.lock().unwrap().clone()
    }

    pub fn set_failing(&self, failing: bool) {
        self.misbehave(|m| m.failing = failing);
    }

    pub fn set_pull_failing(&self, code: Option<tonic::Code>) {
        self.misbehave(|m| m.pull_failing = code);
    }

    /// Changes how the fake misbehaves from now on.
    pub fn misbehave(&self, change: impl FnOnce(&mut Misbehaviour)) {
        change(&mut self.misbehaviour.lock().unwrap());
    }

    fn misbehaviour(&self) -> Misbehaviour {
        self.misbehaviour.lock().unwrap().clone()
    }

    /// Publishes a message to the fake subscription.
    pub fn push(&self, message: ReceivedMessage) {
        self.queue.lock().unwrap().push_back(message);
        self.arrived.notify_waiters();
    }

    /// Messages pulled and neither acked nor back in the queue.
    pub fn outstanding(&self) -> usize {
        self.outstanding.lock().unwrap().len()
    }

    /// Messages waiting to be pulled (released ones and lapsed leases included).
    pub fn queued(&self) -> usize {
        self.redeliver_expired();
        self.queue.lock().unwrap().len()
    }

    /// Moves messages whose deadline passed back to the queue, as Pub/Sub
    /// redelivers them; returns when the next one will pass.
    fn redeliver_expired(&self) -> Option<Instant> {
        let now = Instant::now();
        let mut outstanding = self.outstanding.lock().unwrap();
        let expired: Vec<String> = outstanding
            .iter()
            .filter(|(_, o)| o.deadline <= now)
            .map(|(id, _)| id.clone())
            .collect();
        let mut queue = self.queue.lock().unwrap();
        for id in expired {
            let mut m = outstanding.remove(&id).unwrap().message;
            m.delivery_attempt += 1;
            let base = m.ack_id.split('#').next().unwrap_or_default().to_string();
            m.ack_id = format!("{base}#{}", m.delivery_attempt);
            queue.push_back(m);
        }
        outstanding.values().map(|o| o.deadline).min()
    }

    /// Records an ack or deadline change as it takes effect, misbehaving as
    /// told, and applies it to the ids that were not refused.
    async fn take_effect(&self, call: Call) -> Result<(), RpcError> {
        let m = self.misbehaviour();
        if m.hang {
            std::future::pending::<()>().await;
        }
        if let (Some(late), Call::Modify { seconds, .. }) = (m.slow_extensions, &call)
            && *seconds > 0
        {
            tokio::time::sleep(late).await;
        }
        self.calls
            .lock()
            .unwrap()
            .push((Instant::now(), call.clone()));
        if m.failing {
            return Err(RpcError::new(
                "fake",
                tonic::Code::Unavailable,
                "fake outage",
            ));
        }
        let (ids, seconds) = match &call {
            Call::Ack { ids } => (ids, None),
            Call::Modify { ids, seconds } => (ids, Some(*seconds)),
            Call::Pull { .. } => unreachable!("pulls are not acks"),
        };
        let mut failed = FailedIds::default();
        for id in ids {
            if m.refused.contains(id) {
                failed.permanent.push(id.clone());
            } else if m.refused_once.contains(id) {
                failed.transient.push(id.clone());
                self.misbehave(|m| {
                    m.refused_once.remove(id);
                });
            }
        }
        {
            let mut outstanding = self.outstanding.lock().unwrap();
            let deadline = seconds
                .map(|s| Instant::now() + Duration::from_secs(u64::try_from(s).unwrap_or(0)));
            for id in ids {
                if failed.permanent.contains(id) || failed.transient.contains(id) {
                    continue;
                }
                match deadline {
                    None => {
                        outstanding.remove(id);
                    }
                    Some(deadline) => {
                        if let Some(o) = outstanding.get_mut(id) {
                            o.deadline = deadline;
                        }
                    }
                }
            }
        }
        // A release (0 s) makes the message pullable now.
        self.arrived.notify_waiters();
        if failed == FailedIds::default() {
            return Ok(());
        }
        // As an exactly-once subscription answers: the rest took effect.
        Err(RpcError {
            failed_ids: Some(failed),
            ..RpcError::new(
                "fake",
                tonic::Code::InvalidArgument,
                "some ack ids were refused",
            )
        })
    }
}

#[async_trait::async_trait]
impl DataPlane for FakeDataPlane {
    async fn pull_within(
        &self,
        _: &str,
        max_messages: i32,
        long_poll: Duration,
    ) -> Result<Vec<ReceivedMessage>, RpcError> {
        let long_poll = long_poll.min(LONG_POLL);
        self.calls.lock().unwrap().push((
            Instant::now(),
            Call::Pull {
                max_messages,
                long_poll,
            },
        ));
        let m = self.misbehaviour();
        if let Some(code) = m.pull_failing {
            return Err(RpcError::new("Pull", code, "fake pull failure"));
        }
        let n = usize::try_from(max_messages).unwrap_or(0) + m.extra_on_pull;
        let give_up = Instant::now() + long_poll;
        loop {
            let notified = self.arrived.notified();
            tokio::pin!(notified);
            // Registered before looking, so a push in between is not missed.
            notified.as_mut().enable();
            let next_expiry = self.redeliver_expired();
            let taken: Vec<ReceivedMessage> = {
                let mut queue = self.queue.lock().unwrap();
                let n = n.min(queue.len());
                queue.drain(..n).collect()
            };
            if !taken.is_empty() {
                let mut outstanding = self.outstanding.lock().unwrap();
                for m in &taken {
                    let deadline = Instant::now() + ACK_DEADLINE;
                    outstanding.insert(
                        m.ack_id.clone(),
                        Outstanding {
                            message: m.clone(),
                            deadline,
                        },
                    );
                }
                return Ok(taken);
            }
            let wake = next_expiry.map_or(give_up, |e| e.min(give_up));
            if Instant::now() >= give_up {
                return Ok(Vec::new());
            }
            tokio::select! {
                () = notified => {}
                () = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    async fn acknowledge(&self, _: &str, ids: Vec<String>, _: Duration) -> Result<(), RpcError> {
        self.take_effect(Call::Ack { ids }).await
    }

    async fn modify_ack_deadline(
        &self,
        _: &str,
        ids: Vec<String>,
        seconds: i32,
        _: Duration,
    ) -> Result<(), RpcError> {
        self.take_effect(Call::Modify { ids, seconds }).await
    }
}

//! Fakes that record what the worker sends them: published messages, pod
//! patches and log lines.

use std::collections::BTreeMap;
use std::sync::Mutex;

use tokio::time::Instant;

use crate::pod::{PatchError, PodPatcher, PodState};
use crate::pubsub::{Outgoing, PublishFailed, Publisher};

/// A publisher that records what it publishes, and can be told to fail.
#[derive(Debug, Default)]
pub struct FakePublisher {
    published: Mutex<Vec<(String, Outgoing)>>,
    failing: Mutex<bool>,
}

impl FakePublisher {
    /// Everything published so far, as (topic, message).
    pub fn published(&self) -> Vec<(String, Outgoing)> {
        self.published.lock().unwrap().clone()
    }

    /// What was published to `topic`.
    pub fn on(&self, topic: &str) -> Vec<Outgoing> {
        self.published()
            .into_iter()
            .filter(|(t, _)| t == topic)
            .map(|(_, m)| m)
            .collect()
    }

    pub fn set_failing(&self, failing: bool) {
        *self.failing.lock().unwrap() = failing;
    }
}

#[async_trait::async_trait]
impl Publisher for FakePublisher {
    async fn publish(&self, topic: &str, message: Outgoing) -> Result<String, PublishFailed> {
        if *self.failing.lock().unwrap() {
            return Err(PublishFailed {
                topic: topic.to_string(),
                reason: "fake publish failure".into(),
            });
        }
        let mut published = self.published.lock().unwrap();
        published.push((topic.to_string(), message));
        Ok(format!("published-{}", published.len()))
    }
}

/// A Kubernetes API that records each pod patch (when it was asked for, and
/// the state its annotations say), and refuses when told.
#[derive(Debug, Default)]
pub struct FakePodPatcher {
    patches: Mutex<Vec<(Instant, PodState)>>,
    refusal: Mutex<Option<PatchError>>,
}

impl FakePodPatcher {
    /// Every patch asked for, refused ones included.
    pub fn patches(&self) -> Vec<(Instant, PodState)> {
        self.patches.lock().unwrap().clone()
    }

    /// The states patched, in order.
    pub fn states(&self) -> Vec<PodState> {
        self.patches().into_iter().map(|(_, s)| s).collect()
    }

    /// From now on, every patch fails with `refusal` (`None`: accepted).
    pub fn set_refusal(&self, refusal: Option<PatchError>) {
        *self.refusal.lock().unwrap() = refusal;
    }
}

#[async_trait::async_trait]
impl PodPatcher for FakePodPatcher {
    async fn patch_annotations(
        &self,
        annotations: &BTreeMap<String, String>,
    ) -> Result<(), PatchError> {
        assert_eq!(annotations.len(), 2, "{annotations:?}");
        let cost = annotations[crate::pod::DELETION_COST].parse().unwrap();
        let busy = match annotations[crate::pod::SAFE_TO_EVICT].as_str() {
            "false" => true,
            "true" => false,
            other => panic!("safe-to-evict {other:?}"),
        };
        self.patches
            .lock()
            .unwrap()
            .push((Instant::now(), PodState { busy, cost }));
        match self.refusal.lock().unwrap().clone() {
            Some(refusal) => Err(refusal),
            None => Ok(()),
        }
    }
}

/// Captured log output: a `tracing_subscriber` writer into a shared buffer.
#[derive(Clone, Default)]
pub struct LogBuffer(std::sync::Arc<Mutex<Vec<u8>>>);

impl LogBuffer {
    /// Everything written so far.
    pub fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }

    /// The lines that contain `needle`.
    pub fn lines_with(&self, needle: &str) -> Vec<String> {
        self.text()
            .lines()
            .filter(|l| l.contains(needle))
            .map(str::to_string)
            .collect()
    }
}

impl std::io::Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogBuffer {
    type Writer = LogBuffer;
    fn make_writer(&'a self) -> LogBuffer {
        self.clone()
    }
}

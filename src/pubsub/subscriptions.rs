//! The subscription contract: what every subscription a configuration names
//! must look like, in one place. `setup` creates it or brings drift back in
//! line; `run` reads each task subscription at start and refuses the drift
//! that would break the worker's promises.
//!
//! - task subscriptions: the dead-letter policy to the configured topic
//!   (`max_attempts + 2` deliveries: Pub/Sub's own safety net, and the only
//!   source of the delivery count that retries are counted by), no retry
//!   policy (the worker's backoff is the one delay), never expiring (`run`
//!   refuses the first two drifts and warns about the third);
//! - the dead-letter and results subscriptions: never expiring, and the
//!   dead letters kept for the 7-day maximum.

use std::time::Duration;

use google_cloud_pubsub::model::{DeadLetterPolicy, ExpirationPolicy, Subscription};

use crate::config::Config;
use crate::pubsub::Connection;

/// How long the dead-letter subscription keeps messages: Pub/Sub's maximum.
pub const DEAD_LETTER_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// One subscription as the configuration wants it.
#[derive(Debug, Clone, PartialEq)]
pub struct Wanted {
    /// Full path.
    pub name: String,
    /// Its topic's full path.
    pub topic: String,
    /// `pubsub.ack_deadline`.
    pub ack_deadline_seconds: i32,
    /// Task subscriptions only.
    pub dead_letter_policy: Option<DeadLetterPolicy>,
    /// Set on the dead-letter subscription; the default elsewhere.
    pub retention: Option<Duration>,
}

/// A setting that differs from the contract.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drift {
    /// The field, as the update mask names it.
    pub field: &'static str,
    /// What the contract wants, in words.
    pub expected: String,
    /// What the subscription has.
    pub actual: String,
    /// Whether `run` refuses to start with it (the rest `setup` fixes, but
    /// the worker is safe with them).
    pub blocks_run: bool,
}

impl std::fmt::Display for Drift {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} is {}, expected {}",
            self.field, self.actual, self.expected
        )
    }
}

/// Every topic id and subscription the configuration names: the enabled
/// executors' task topics and subscriptions, and the dead-letter and results
/// topics with a subscription of the same name each (so they can be read,
/// and are not discarded for lack of a subscriber).
pub fn wanted(conn: &Connection, config: &Config) -> (Vec<String>, Vec<Wanted>) {
    let ack_deadline_seconds = i32::try_from(config.pubsub.ack_deadline.as_secs()).unwrap_or(600);
    let dead_letter_topic = conn.topic_path(&config.pubsub.dead_letter_topic);
    let mut topics = Vec::new();
    let mut subscriptions = Vec::new();
    for (_, executor) in config.enabled_executors() {
        topics.push(executor.topic.clone());
        subscriptions.push(Wanted {
            name: conn.subscription_path(&executor.subscription),
            topic: conn.topic_path(&executor.topic),
            ack_deadline_seconds,
            dead_letter_policy: Some(
                DeadLetterPolicy::new()
                    .set_dead_letter_topic(&dead_letter_topic)
                    .set_max_delivery_attempts(config.max_delivery_attempts()),
            ),
            retention: None,
        });
    }
    let mut kept = vec![(
        &config.pubsub.dead_letter_topic,
        Some(DEAD_LETTER_RETENTION),
    )];
    if !config.pubsub.results_topic.is_empty() {
        kept.push((&config.pubsub.results_topic, None));
    }
    for (topic, retention) in kept {
        topics.push(topic.clone());
        subscriptions.push(Wanted {
            name: conn.subscription_path(topic),
            topic: conn.topic_path(topic),
            ack_deadline_seconds,
            dead_letter_policy: None,
            retention,
        });
    }
    (topics, subscriptions)
}

impl Wanted {
    /// The subscription with every setting of the contract.
    pub fn subscription(&self) -> Subscription {
        Subscription::new()
            .set_name(&self.name)
            .set_topic(&self.topic)
            .set_ack_deadline_seconds(self.ack_deadline_seconds)
            .set_or_clear_dead_letter_policy(self.dead_letter_policy.clone())
            // No ttl: never expires (Pub/Sub's default deletes a subscription
            // after 31 idle days, and with it every message sent to its topic).
            .set_expiration_policy(ExpirationPolicy::new())
            .set_or_clear_message_retention_duration(self.retention.map(wkt_duration))
    }

    /// How `current` differs from the contract.
    pub fn drift(&self, current: &Subscription) -> Vec<Drift> {
        let mut drift = Vec::new();
        if current.ack_deadline_seconds != self.ack_deadline_seconds {
            drift.push(Drift {
                field: "ack_deadline_seconds",
                expected: self.ack_deadline_seconds.to_string(),
                actual: current.ack_deadline_seconds.to_string(),
                blocks_run: false,
            });
        }
        let describe = |p: &Option<DeadLetterPolicy>| match p {
            None => "none".to_string(),
            Some(p) => format!(
                "topic {} after {} deliveries",
                p.dead_letter_topic, p.max_delivery_attempts
            ),
        };
        let (want, have) = (&self.dead_letter_policy, &current.dead_letter_policy);
        let topic_differs = match (want, have) {
            (None, None) => false,
            (Some(a), Some(b)) => a.dead_letter_topic != b.dead_letter_topic,
            _ => true,
        };
        let attempts_differ = matches!((want, have),
            (Some(a), Some(b)) if a.max_delivery_attempts != b.max_delivery_attempts);
        if topic_differs || attempts_differ {
            drift.push(Drift {
                field: "dead_letter_policy",
                expected: describe(want),
                actual: describe(have),
                // Without a policy there is no delivery count to count
                // retries by; another topic would lose the dead letters.
                blocks_run: want.is_some() && topic_differs,
            });
        }
        if let Some(r) = &current.retry_policy {
            drift.push(Drift {
                field: "retry_policy",
                expected: "none (the worker's backoff is the one delay)".into(),
                actual: format!("{r:?}"),
                blocks_run: self.dead_letter_policy.is_some(),
            });
        }
        let never = current
            .expiration_policy
            .as_ref()
            .is_some_and(|e| e.ttl.is_none());
        if !never {
            drift.push(Drift {
                field: "expiration_policy",
                expected: "never expires (an empty ttl)".into(),
                actual: current.expiration_policy.as_ref().map_or_else(
                    || "Pub/Sub's default: deleted after 31 days without activity".into(),
                    |e| format!("deleted after {:?} without activity", e.ttl),
                ),
                // Warned about at start, not refused: it endangers the
                // subscription only after a month idle, and the emulator
                // cannot update it (setup leaves it there).
                blocks_run: false,
            });
        }
        if let Some(retention) = self.retention {
            let have = current
                .message_retention_duration
                .as_ref()
                .map(google_cloud_wkt::Duration::seconds);
            let want = i64::try_from(retention.as_secs()).unwrap_or(i64::MAX);
            if have != Some(want) {
                drift.push(Drift {
                    field: "message_retention_duration",
                    expected: humantime::format_duration(retention).to_string(),
                    actual: have.map_or_else(|| "unset".into(), |s| format!("{s}s")),
                    blocks_run: false,
                });
            }
        }
        drift
    }
}

fn wkt_duration(d: Duration) -> google_cloud_wkt::Duration {
    google_cloud_wkt::Duration::clamp(i64::try_from(d.as_secs()).unwrap_or(i64::MAX), 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Environment;

    fn contract() -> (Vec<String>, Vec<Wanted>) {
        let config = Config::load(&[], &Environment::default()).unwrap();
        let conn = Connection::new(
            &config.pubsub,
            &Environment::from_pairs([("PUBSUB_EMULATOR_HOST", "127.0.0.1:1")]),
        )
        .unwrap();
        wanted(&conn, &config)
    }

    // Connection::new connects lazily, inside a runtime.
    #[tokio::test]
    async fn the_contract_is_what_setup_creates() {
        let (topics, subs) = contract();
        assert_eq!(
            topics,
            [
                "leasehold-tasks-cpu",
                "leasehold-dead-letter",
                "leasehold-results"
            ]
        );
        for w in &subs {
            assert!(w.drift(&w.subscription()).is_empty(), "{w:?}");
        }
        let dead = &subs[1];
        assert_eq!(dead.retention, Some(DEAD_LETTER_RETENTION));
    }

    #[tokio::test]
    async fn drift_that_breaks_the_worker_blocks_run() {
        let (_, subs) = contract();
        let task = &subs[0];
        let bare = Subscription::new()
            .set_name(&task.name)
            .set_topic(&task.topic)
            .set_ack_deadline_seconds(10);
        let drift = task.drift(&bare);
        let blocking: Vec<&str> = drift
            .iter()
            .filter(|d| d.blocks_run)
            .map(|d| d.field)
            .collect();
        assert_eq!(blocking, ["dead_letter_policy"]);
        assert!(
            drift
                .iter()
                .any(|d| d.field == "expiration_policy" && !d.blocks_run)
        );
        assert!(
            drift
                .iter()
                .any(|d| d.field == "ack_deadline_seconds" && !d.blocks_run)
        );
        let other_topic = task.subscription().set_dead_letter_policy(
            DeadLetterPolicy::new()
                .set_dead_letter_topic("projects/local-project/topics/elsewhere")
                .set_max_delivery_attempts(8),
        );
        assert!(task.drift(&other_topic)[0].blocks_run);
        let more_attempts = task.subscription().set_dead_letter_policy(
            task.dead_letter_policy
                .clone()
                .unwrap()
                .set_max_delivery_attempts(20),
        );
        let d = task.drift(&more_attempts);
        assert_eq!(d.len(), 1);
        assert!(!d[0].blocks_run, "setup fixes it; the worker is safe");
        let retried = task
            .subscription()
            .set_retry_policy(google_cloud_pubsub::model::RetryPolicy::new());
        assert!(task.drift(&retried)[0].blocks_run);
    }
}

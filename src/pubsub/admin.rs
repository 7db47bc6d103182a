//! `leasehold setup`: the topics and subscriptions a configuration names,
//! created when missing and brought in line when they drift. Running it
//! twice changes nothing the second time.

use google_cloud_gax::error::rpc::Code;
use google_cloud_pubsub::model::{DeadLetterPolicy, Subscription};
use google_cloud_wkt::FieldMask;

use crate::config::Config;
use crate::pubsub::{Connection, ConnectionError};

/// What setup did to one resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// It did not exist.
    Created,
    /// It existed with other settings, now fixed.
    Updated,
    /// It existed as configured.
    Unchanged,
}

/// One line of the setup report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Full resource path.
    pub resource: String,
    /// What happened to it.
    pub action: Action,
}

/// Setup failed; nothing about tasks is at stake.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// Clients could not be built.
    #[error(transparent)]
    Connection(#[from] ConnectionError),
    /// An admin RPC failed.
    #[error("{what} failed: {source}")]
    Rpc {
        /// The call and resource.
        what: String,
        /// The official client's error.
        source: google_cloud_pubsub::Error,
    },
    /// A subscription exists on another topic; Pub/Sub cannot move it.
    #[error(
        "subscription {subscription} is attached to {actual}, not {expected}; delete it or pick another name"
    )]
    WrongTopic {
        /// The subscription.
        subscription: String,
        /// Its topic.
        actual: String,
        /// The configured topic.
        expected: String,
    },
}

fn rpc(what: String) -> impl FnOnce(google_cloud_pubsub::Error) -> SetupError {
    move |source| SetupError::Rpc { what, source }
}

fn has_code(e: &google_cloud_pubsub::Error, code: Code) -> bool {
    e.status().is_some_and(|s| s.code == code)
}

/// The subscription a configuration wants, with its full settings.
struct Wanted {
    name: String,
    topic: String,
    ack_deadline_seconds: i32,
    dead_letter_policy: Option<DeadLetterPolicy>,
}

/// Creates or fixes every resource `config` names; returns one line per resource.
pub async fn setup(conn: &Connection, config: &Config) -> Result<Vec<Change>, SetupError> {
    let topics = conn.topic_admin().await?;
    let subs = conn.subscription_admin().await?;
    let mut changes = Vec::new();
    let ack_deadline_seconds = i32::try_from(config.pubsub.ack_deadline.as_secs()).unwrap_or(600);

    // Dead letters and results are kept in a subscription of the same name,
    // so they can be read (and are not discarded for lack of a subscriber).
    let mut kept: Vec<&str> = vec![&config.pubsub.dead_letter_topic];
    if !config.pubsub.results_topic.is_empty() {
        kept.push(&config.pubsub.results_topic);
    }
    let mut topic_ids = kept.clone();
    let mut wanted = Vec::new();
    for (_, executor) in config.enabled_executors() {
        topic_ids.push(&executor.topic);
        wanted.push(Wanted {
            name: conn.subscription_path(&executor.subscription),
            topic: conn.topic_path(&executor.topic),
            ack_deadline_seconds,
            // The safety net for messages that crash or hang every worker:
            // Pub/Sub itself moves them to the dead-letter topic.
            dead_letter_policy: Some(
                DeadLetterPolicy::new()
                    .set_dead_letter_topic(conn.topic_path(&config.pubsub.dead_letter_topic))
                    .set_max_delivery_attempts(config.max_delivery_attempts()),
            ),
        });
    }
    for topic in kept {
        wanted.push(Wanted {
            name: conn.subscription_path(topic),
            topic: conn.topic_path(topic),
            ack_deadline_seconds,
            dead_letter_policy: None,
        });
    }

    for id in topic_ids {
        let name = conn.topic_path(id);
        let action = match topics.create_topic().set_name(&name).send().await {
            Ok(_) => Action::Created,
            Err(e) if has_code(&e, Code::AlreadyExists) => Action::Unchanged,
            Err(e) => return Err(rpc(format!("creating topic {name}"))(e)),
        };
        changes.push(Change {
            resource: name,
            action,
        });
    }

    for w in wanted {
        let created = subs
            .create_subscription()
            .set_name(&w.name)
            .set_topic(&w.topic)
            .set_ack_deadline_seconds(w.ack_deadline_seconds)
            .set_or_clear_dead_letter_policy(w.dead_letter_policy.clone())
            .send()
            .await;
        let action = match created {
            Ok(_) => Action::Created,
            Err(e) if has_code(&e, Code::AlreadyExists) => reconcile(&subs, &w).await?,
            Err(e) => return Err(rpc(format!("creating subscription {}", w.name))(e)),
        };
        changes.push(Change {
            resource: w.name,
            action,
        });
    }
    Ok(changes)
}

/// Brings an existing subscription in line with `w`.
async fn reconcile(
    subs: &google_cloud_pubsub::client::SubscriptionAdmin,
    w: &Wanted,
) -> Result<Action, SetupError> {
    let current: Subscription = subs
        .get_subscription()
        .set_subscription(&w.name)
        .send()
        .await
        .map_err(rpc(format!("reading subscription {}", w.name)))?;
    if current.topic != w.topic {
        return Err(SetupError::WrongTopic {
            subscription: w.name.clone(),
            actual: current.topic,
            expected: w.topic.clone(),
        });
    }
    let mut mask = Vec::new();
    if current.ack_deadline_seconds != w.ack_deadline_seconds {
        mask.push("ack_deadline_seconds");
    }
    let policy_differs = match (&current.dead_letter_policy, &w.dead_letter_policy) {
        (None, None) => false,
        (Some(a), Some(b)) => {
            a.dead_letter_topic != b.dead_letter_topic
                || a.max_delivery_attempts != b.max_delivery_attempts
        }
        _ => true,
    };
    if policy_differs {
        mask.push("dead_letter_policy");
    }
    if current.retry_policy.is_some() {
        // The worker's backoff is the one delay; a server-side one would add up.
        mask.push("retry_policy");
    }
    if mask.is_empty() {
        return Ok(Action::Unchanged);
    }
    let updated = Subscription::new()
        .set_name(&w.name)
        .set_topic(&w.topic)
        .set_ack_deadline_seconds(w.ack_deadline_seconds)
        .set_or_clear_dead_letter_policy(w.dead_letter_policy.clone());
    subs.update_subscription()
        .set_subscription(updated)
        .set_update_mask(FieldMask::default().set_paths(mask))
        .send()
        .await
        .map_err(rpc(format!("updating subscription {}", w.name)))?;
    Ok(Action::Updated)
}

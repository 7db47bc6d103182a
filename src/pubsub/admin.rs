//! `leasehold setup`: the topics and subscriptions a configuration names,
//! created when missing and brought in line when they drift (the contract is
//! in [`subscriptions`]). Running it twice changes nothing the second time.
//! And `run`'s [`check`] of that contract at start.

use google_cloud_gax::error::rpc::Code;
use google_cloud_pubsub::model::Subscription;
use google_cloud_wkt::FieldMask;

use crate::config::Config;
use crate::pubsub::subscriptions::{self, Drift, Wanted};
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

/// Creates or fixes every resource `config` names; returns one line per resource.
pub async fn setup(conn: &Connection, config: &Config) -> Result<Vec<Change>, SetupError> {
    let topics = conn.topic_admin().await?;
    let subs = conn.subscription_admin().await?;
    let mut changes = Vec::new();
    let (topic_ids, wanted) = subscriptions::wanted(conn, config);
    for id in topic_ids {
        let name = conn.topic_path(&id);
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
            .with_request(w.subscription())
            .send()
            .await;
        let action = match created {
            Ok(_) => Action::Created,
            Err(e) if has_code(&e, Code::AlreadyExists) => {
                reconcile(&subs, &w, conn.endpoint().emulator).await?
            }
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
    emulator: bool,
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
    let mut mask: Vec<&str> = w.drift(&current).iter().map(|d| d.field).collect();
    if emulator && mask.contains(&"expiration_policy") {
        // "Updating the expiration_policy field is currently unsupported in
        // the Pub/Sub Emulator." (which never expires anything anyway)
        tracing::warn!(subscription = %w.name,
            "the emulator cannot update an expiration policy; leaving it (on Pub/Sub, setup sets it to never expire)");
        mask.retain(|f| *f != "expiration_policy");
    }
    if mask.is_empty() {
        return Ok(Action::Unchanged);
    }
    subs.update_subscription()
        .set_subscription(w.subscription())
        .set_update_mask(FieldMask::default().set_paths(mask))
        .send()
        .await
        .map_err(rpc(format!("updating subscription {}", w.name)))?;
    Ok(Action::Updated)
}

/// A task subscription `run` will not work with.
#[derive(Debug, thiserror::Error)]
pub enum ContractError {
    /// Clients could not be built.
    #[error(transparent)]
    Connection(#[from] ConnectionError),
    /// It does not exist.
    #[error("subscription {0} does not exist; run `leasehold setup` with this configuration")]
    Missing(String),
    /// It drifted in a way that breaks retries or dead letters.
    #[error("subscription {name}: {}; run `leasehold setup` with this configuration to fix it", .drift.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Drifted {
        /// Full path.
        name: String,
        /// What differs.
        drift: Vec<Drift>,
    },
}

/// How long the check at start waits for one subscription before going on
/// without it: Pub/Sub or the token endpoint being down at start is retried
/// by the worker, not fatal.
const CHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// `run`'s check at start: each enabled executor's subscription keeps the
/// contract. A worker that cannot read a subscription (no
/// `pubsub.subscriptions.get`, or Pub/Sub or the token endpoint unreachable
/// for now) is warned about once and goes on: a message that then arrives
/// without a delivery count is dead-lettered on its first failure, never
/// retried forever.
pub async fn check(conn: &Connection, config: &Config) -> Result<(), ContractError> {
    let subs = conn.subscription_admin().await?;
    let (_, wanted) = subscriptions::wanted(conn, config);
    for w in wanted.iter().filter(|w| w.dead_letter_policy.is_some()) {
        let read = subs.get_subscription().set_subscription(&w.name).send();
        let current = match tokio::time::timeout(CHECK_TIMEOUT, read).await {
            Ok(Ok(current)) => current,
            Ok(Err(e)) if has_code(&e, Code::NotFound) => {
                return Err(ContractError::Missing(w.name.clone()));
            }
            Ok(Err(e)) if has_code(&e, Code::PermissionDenied) => {
                tracing::warn!(subscription = %w.name, error = %e,
                    "may not read the subscription (pubsub.subscriptions.get, e.g. roles/pubsub.viewer): its dead-letter policy is not checked; a failure of a message without a delivery count is dead-lettered at once instead of retried");
                continue;
            }
            unread => {
                let error = match unread {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!("no answer within {CHECK_TIMEOUT:?}"),
                };
                tracing::warn!(subscription = %w.name, %error,
                    "cannot read the subscription now; starting without checking it (a failure of a message without a delivery count is dead-lettered at once)");
                continue;
            }
        };
        let drift: Vec<Drift> = w.drift(&current).into_iter().collect();
        if drift.iter().any(|d| d.blocks_run) {
            return Err(ContractError::Drifted {
                name: w.name.clone(),
                drift: drift.into_iter().filter(|d| d.blocks_run).collect(),
            });
        }
        for d in drift {
            tracing::warn!(subscription = %w.name, %d, "the subscription differs from the configuration; `leasehold setup` fixes it");
        }
    }
    Ok(())
}

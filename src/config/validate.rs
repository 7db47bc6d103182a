//! What a loaded configuration must satisfy before anything connects. Each
//! failure names its dotted key.

use std::collections::BTreeSet;
use std::time::Duration;

use super::{Config, ConfigError, Devices, ExecutorConfig};
use crate::handler::HandlerRegistry;

/// Pub/Sub's bounds for a subscription's ack deadline and for `ModifyAckDeadline`.
pub(crate) const ACK_DEADLINE_RANGE: (Duration, Duration) =
    (Duration::from_secs(10), Duration::from_secs(600));

use ConfigError as E;

/// Checks every value of `config`.
pub(super) fn validate(config: &Config) -> Result<(), ConfigError> {
    validate_pubsub(config)?;
    validate_lease_and_retry(config)?;
    validate_executors(config)?;
    for (kind, h) in &config.handlers {
        if !config.executors.contains_key(&h.executor) {
            let known: Vec<&str> = config.executors.keys().map(String::as_str).collect();
            return Err(E::invalid(
                format!("handlers.{kind}.executor"),
                format!(
                    "no executor class {:?}; configured: {}",
                    h.executor,
                    known.join(", ")
                ),
            ));
        }
    }
    // Building the handlers is their validation: a spec that cannot run is
    // refused here, never at run time.
    HandlerRegistry::from_config(config)?;
    if config.shutdown.kill_grace.is_zero() {
        return Err(E::invalid("shutdown.kill_grace", "must be more than 0s"));
    }
    Ok(())
}

fn validate_pubsub(config: &Config) -> Result<(), ConfigError> {
    let p = &config.pubsub;
    if !is_project_id(&p.project) {
        return Err(E::invalid(
            "pubsub.project",
            format!("{:?} is not a Google Cloud project id", p.project),
        ));
    }
    let url_like = p.endpoint.starts_with("http://") || p.endpoint.starts_with("https://");
    if !(p.endpoint.is_empty() || url_like) {
        return Err(E::invalid(
            "pubsub.endpoint",
            "must be empty or an http:// or https:// URL",
        ));
    }
    if !p.results_topic.is_empty() {
        check_resource_name("pubsub.results_topic", &p.results_topic)?;
    }
    check_resource_name("pubsub.dead_letter_topic", &p.dead_letter_topic)?;
    check_range("pubsub.ack_deadline", p.ack_deadline, ACK_DEADLINE_RANGE)
}

fn validate_lease_and_retry(config: &Config) -> Result<(), ConfigError> {
    check_range(
        "lease.extension",
        config.lease.extension,
        ACK_DEADLINE_RANGE,
    )?;
    if config.lease.max_lease < config.lease.extension {
        return Err(E::invalid(
            "lease.max_lease",
            "must be at least lease.extension",
        ));
    }
    let r = &config.retry;
    if !(1..=100).contains(&r.max_attempts) {
        return Err(E::invalid(
            "retry.max_attempts",
            "must be between 1 and 100",
        ));
    }
    if r.min_backoff.is_zero() {
        return Err(E::invalid("retry.min_backoff", "must be more than 0s"));
    }
    if r.max_backoff < r.min_backoff {
        return Err(E::invalid(
            "retry.max_backoff",
            "must be at least retry.min_backoff",
        ));
    }
    if r.max_backoff > ACK_DEADLINE_RANGE.1 {
        return Err(E::invalid(
            "retry.max_backoff",
            "must be at most 10m (the longest ack deadline Pub/Sub accepts)",
        ));
    }
    Ok(())
}

fn validate_executors(config: &Config) -> Result<(), ConfigError> {
    let mut topics = BTreeSet::new();
    let mut subscriptions = BTreeSet::new();
    for (name, e) in &config.executors {
        let key = |k: &str| format!("executors.{name}.{k}");
        if !is_simple_name(name) {
            return Err(E::invalid(
                format!("executors.{name}"),
                "an executor class name may use only letters, digits, '-' and '_'",
            ));
        }
        check_resource_name(&key("topic"), &e.topic)?;
        check_resource_name(&key("subscription"), &e.subscription)?;
        validate_slots(name, e)?;
        if !e.enabled {
            continue;
        }
        if !topics.insert(e.topic.as_str()) {
            // Two subscriptions on one topic would each get every task.
            return Err(E::invalid(
                key("topic"),
                "is the topic of another enabled executor (each subscription would get every task)",
            ));
        }
        if !subscriptions.insert(e.subscription.as_str()) {
            return Err(E::invalid(
                key("subscription"),
                "is the subscription of another enabled executor",
            ));
        }
    }
    if config.enabled_executors().next().is_none() {
        return Err(E::invalid(
            "executors",
            "no executor is enabled; enable executors.cpu or executors.gpu",
        ));
    }
    Ok(())
}

fn validate_slots(name: &str, e: &ExecutorConfig) -> Result<(), ConfigError> {
    let key = |k: &str| format!("executors.{name}.{k}");
    if e.slots > 10_000 {
        return Err(E::invalid(key("slots"), "must be at most 10000"));
    }
    let Some(Devices::List(list)) = &e.devices else {
        return Ok(());
    };
    if e.slots != 0 {
        return Err(E::invalid(
            key("slots"),
            "must be 0 (or unset) when devices are listed: one slot per device",
        ));
    }
    if e.enabled && list.is_empty() {
        return Err(E::invalid(
            key("devices"),
            format!("is empty while executors.{name} is enabled"),
        ));
    }
    let mut seen = BTreeSet::new();
    for d in list {
        if d.is_empty() || !d.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(E::invalid(
                key("devices"),
                format!("{d:?} is not a device index or UUID"),
            ));
        }
        if !seen.insert(d) {
            return Err(E::invalid(
                key("devices"),
                format!("device {d:?} is listed twice"),
            ));
        }
    }
    Ok(())
}

/// Checks that `d` lies within `lo..=hi`, naming `key` if not.
pub(crate) fn check_range(
    key: &str,
    d: Duration,
    (lo, hi): (Duration, Duration),
) -> Result<(), ConfigError> {
    if d < lo || d > hi {
        return Err(E::invalid(
            key,
            format!(
                "{} is outside {}..{}",
                humantime::format_duration(d),
                humantime::format_duration(lo),
                humantime::format_duration(hi)
            ),
        ));
    }
    Ok(())
}

/// Pub/Sub topic and subscription ids: 3..255 characters, starting with a
/// letter, of letters, digits and `-_.~+%`, not starting with `goog`.
pub fn check_resource_name(key: &str, name: &str) -> Result<(), ConfigError> {
    let ok = (3..=255).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_alphabetic())
        && !name.starts_with("goog")
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.~+%".contains(c));
    if ok {
        Ok(())
    } else {
        Err(E::invalid(
            key,
            format!(
                "{name:?} is not a Pub/Sub resource id (3-255 letters, digits, -_.~+%, starting with a letter)"
            ),
        ))
    }
}

/// Letters, digits, `-` and `_`: safe in metric labels, topic names and logs.
pub(crate) fn is_simple_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

fn is_project_id(p: &str) -> bool {
    (1..=100).contains(&p.len())
        && p.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == ':' || c == '.')
}

//! Configuration: built-in defaults, then `--config` files in order, then
//! `LEASEHOLD__SECTION__KEY` environment variables.
//!
//! Every key is typed and validated ([`validate`]) before anything connects;
//! a bad configuration is one [`ConfigError`] that names the key, and the
//! binary exits with code 64 (`EX_USAGE`). The environment is passed in as
//! data ([`Environment`]) so tests never mutate the process environment.
//!
//! Executor classes are data: `[executors.NAME]` tables (the defaults have
//! `cpu` and `gpu`); a handler names its class by that name.

mod environment;
mod validate;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use environment::Environment;

use crate::handler::Builtin;

/// The defaults, compiled into the binary so `leasehold` runs with no file.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// Exit code for a bad configuration or command line (`EX_USAGE` of sysexits.h).
pub const EXIT_CONFIG: u8 = 64;

/// The whole effective configuration of one worker.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where tasks, results and dead letters live.
    pub pubsub: PubsubConfig,
    /// How held messages are kept leased while their task runs.
    pub lease: LeaseConfig,
    /// Backoff and attempt limits for failed tasks.
    pub retry: RetryConfig,
    /// The executor classes, by name (`cpu`, `gpu`, or any other).
    pub executors: BTreeMap<String, ExecutorConfig>,
    /// Task kinds and how to run them.
    #[serde(default)]
    pub handlers: BTreeMap<String, HandlerConfig>,
    /// The operations endpoint (/metrics, /healthz, /readyz).
    pub http: HttpConfig,
    /// What happens after SIGTERM.
    pub shutdown: ShutdownConfig,
}

/// `[pubsub]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PubsubConfig {
    /// The Google Cloud project that owns topics and subscriptions.
    pub project: String,
    /// gRPC endpoint; empty means Google's. `PUBSUB_EMULATOR_HOST` overrides it.
    pub endpoint: String,
    /// Topic for result events; empty disables them.
    pub results_topic: String,
    /// Topic that receives tasks which will not succeed.
    pub dead_letter_topic: String,
    /// The subscriptions' ack deadline, set by `setup`: how long a message
    /// pulled by a worker that died stays invisible to others.
    #[serde(with = "humantime_serde")]
    pub ack_deadline: Duration,
}

/// `[lease]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LeaseConfig {
    /// The deadline each `ModifyAckDeadline` asks for.
    #[serde(with = "humantime_serde")]
    pub extension: Duration,
    /// The longest a lease is kept: past it, extension stops and the message
    /// is redelivered.
    #[serde(with = "humantime_serde")]
    pub max_lease: Duration,
}

/// `[retry]`, with the defaults of a Kubernetes Job.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Attempts (deliveries) before a task is dead-lettered.
    pub max_attempts: u32,
    /// Delay before the second attempt; doubles each attempt.
    #[serde(with = "humantime_serde")]
    pub min_backoff: Duration,
    /// Upper bound of the delay.
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
}

/// `[executors.NAME]`: one executor class. Each has its own topic,
/// subscription, slots and pull loops, so a busy class never holds up another.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ExecutorConfig {
    /// Whether this worker pulls this class's tasks. Required, so a misspelt
    /// table name is an error rather than a new class.
    pub enabled: bool,
    /// Topic producers publish this class's tasks to; empty means
    /// `leasehold-tasks-NAME`.
    #[serde(default)]
    pub topic: String,
    /// Subscription this worker pulls from, shared by every pod of the pool;
    /// empty means `leasehold-tasks-NAME`.
    #[serde(default)]
    pub subscription: String,
    /// Concurrent tasks; 0 means one per device when `devices` is set, else
    /// the available CPU parallelism.
    #[serde(default)]
    pub slots: usize,
    /// GPUs to pin tasks to, one task per device. Absent: no pinning.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devices: Option<Devices>,
}

/// `devices = "auto"` or an explicit list such as `["0", "1"]` or UUIDs.
///
/// A comma-separated string (`"0,1"`) is accepted too, so the list can be
/// given through one environment variable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Devices {
    /// `NVIDIA_VISIBLE_DEVICES` and `nvidia-smi -L` (see `executor::discovery`).
    Auto,
    /// These devices, in order: indices as this container sees them, or UUIDs.
    List(Vec<String>),
}

impl<'de> Deserialize<'de> for Devices {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            One(String),
            Many(Vec<String>),
        }
        Ok(match Raw::deserialize(d)? {
            Raw::One(s) if s.trim() == "auto" => Devices::Auto,
            Raw::One(s) => Devices::List(
                s.split(',')
                    .map(|d| d.trim().to_string())
                    .filter(|d| !d.is_empty())
                    .collect(),
            ),
            Raw::Many(list) => Devices::List(list),
        })
    }
}

impl Serialize for Devices {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Devices::Auto => s.serialize_str("auto"),
            Devices::List(list) => list.serialize(s),
        }
    }
}

/// `[handlers.KIND]`: how tasks of one kind run. Exactly one of `command`
/// and `builtin` is set; [`crate::handler::HandlerRegistry::from_config`]
/// turns the table into a typed handler or names what is wrong.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HandlerConfig {
    /// The executor class (an `[executors.NAME]` table) that runs this kind.
    pub executor: String,
    /// argv of an exec handler; the payload is never interpolated into it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// A builtin handler, instead of a command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub builtin: Option<Builtin>,
    /// Kill the handler and retry after this long.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub timeout: Option<Duration>,
    /// Exit codes that mean "this will never succeed": dead-letter at once.
    #[serde(default)]
    pub permanent_exit_codes: Vec<i32>,
    /// Extra environment for the command (merged over the worker's).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Kill and retry a command whose progress file did not change for this
    /// long (a hung handler gives its slot back); off when absent.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub stall_timeout: Option<Duration>,
    /// At most one `progress` result event per this; 10 s when absent.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub progress_interval: Option<Duration>,
}

/// `[http]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Address of /metrics, /healthz and /readyz; port 0 picks a free one.
    pub listen: SocketAddr,
}

/// `[shutdown]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ShutdownConfig {
    /// After SIGTERM, running tasks may finish within this long.
    #[serde(with = "humantime_serde")]
    pub grace: Duration,
    /// Then handlers get SIGTERM, and SIGKILL after this long.
    #[serde(with = "humantime_serde")]
    pub kill_grace: Duration,
}

/// A configuration that cannot be used, naming the key at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A file, a syntax or a type error reported while reading the layers.
    #[error("invalid configuration: {0}")]
    Read(String),
    /// A value that parses but is not allowed.
    #[error("invalid configuration: `{key}`: {message}")]
    Invalid {
        /// Dotted path of the key, e.g. `executors.cpu.slots`.
        key: String,
        /// What is wrong and what is allowed.
        message: String,
    },
}

impl ConfigError {
    /// A value at `key` that is not allowed, and why.
    pub fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// Turns the config crate's message into one that leads with the full key:
/// "unknown field `slot`, expected ... for key `executors.cpu`" becomes
/// "`executors.cpu.slot`: unknown key (expected ...)".
fn read_error(message: &str) -> ConfigError {
    let (body, parent) = match message.rsplit_once(" for key `") {
        Some((body, rest)) => {
            let key = rest.split('`').next().unwrap_or_default();
            let origin = rest.split_once("` in ").map(|(_, o)| o);
            let body = match origin {
                Some(o) => format!("{body} (in {o})"),
                None => body.to_string(),
            };
            (body, Some(key.to_string()))
        }
        None => (message.to_string(), None),
    };
    if let Some(rest) = body.strip_prefix("unknown field `")
        && let Some((field, expected)) = rest.split_once('`')
    {
        let key = match &parent {
            Some(p) => format!("{p}.{field}"),
            None => field.to_string(),
        };
        let expected = expected.trim_start_matches(", ");
        return ConfigError::invalid(key, format!("unknown key ({expected})"));
    }
    match parent {
        Some(key) => ConfigError::invalid(key, body),
        None => ConfigError::Read(body),
    }
}

impl Config {
    /// Loads the layers, fills in derived defaults and validates the result.
    pub fn load(files: &[PathBuf], env: &Environment) -> Result<Config, ConfigError> {
        use config::{File, FileFormat};
        let mut builder =
            config::Config::builder().add_source(File::from_str(DEFAULT_TOML, FileFormat::Toml));
        // GOOGLE_CLOUD_PROJECT sits just above the defaults: files and
        // LEASEHOLD__PUBSUB__PROJECT still win over it.
        if let Some(project) = env.get("GOOGLE_CLOUD_PROJECT") {
            let layer = format!(
                "[pubsub]\nproject = {}",
                serde_json::to_string(project).unwrap_or_default()
            );
            builder = builder.add_source(File::from_str(&layer, FileFormat::Toml));
        }
        for file in files {
            if !file.is_file() {
                return Err(ConfigError::Read(format!(
                    "config file {} does not exist or is not a file",
                    file.display()
                )));
            }
            builder = builder.add_source(File::from(file.as_path()).format(FileFormat::Toml));
        }
        // Only LEASEHOLD__* variables: the config crate would otherwise see
        // every variable of the process.
        let layered: config::Map<String, String> = env
            .with_prefix("LEASEHOLD__")
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        builder = builder.add_source(
            config::Environment::with_prefix("LEASEHOLD")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                .source(Some(layered)),
        );
        let raw = builder.build().map_err(|e| read_error(&e.to_string()))?;
        let mut config: Config = raw
            .try_deserialize()
            .map_err(|e| read_error(&e.to_string()))?;
        config.fill_defaults();
        config.validate()?;
        Ok(config)
    }

    /// Names derived from others: an executor's topic and subscription
    /// default to `leasehold-tasks-NAME`.
    fn fill_defaults(&mut self) {
        for (name, e) in &mut self.executors {
            for field in [&mut e.topic, &mut e.subscription] {
                if field.is_empty() {
                    *field = format!("leasehold-tasks-{name}");
                }
            }
        }
    }

    /// Checks every value against what Pub/Sub and the worker accept.
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate::validate(self)
    }

    /// The enabled executor classes, by name, in a fixed (sorted) order.
    pub fn enabled_executors(&self) -> impl Iterator<Item = (&str, &ExecutorConfig)> {
        self.executors
            .iter()
            .filter(|(_, e)| e.enabled)
            .map(|(name, e)| (name.as_str(), e))
    }

    /// The subscription's dead-letter policy bound: a safety net above the
    /// worker's own `max_attempts`, within Pub/Sub's 5..=100.
    pub fn max_delivery_attempts(&self) -> i32 {
        // Two spare deliveries: a lost lease, or a hand-back whose copy could
        // not be published (then a plain release), also counts as a delivery,
        // and must not dead-letter a task early.
        i32::try_from(self.retry.max_attempts.saturating_add(2)).map_or(100, |n| n.clamp(5, 100))
    }
}

#[cfg(test)]
mod tests;

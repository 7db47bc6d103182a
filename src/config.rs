//! Configuration: built-in defaults, then `--config` files in order, then
//! `LEASEHOLD__SECTION__KEY` environment variables.
//!
//! Every key is typed and validated before anything connects; a bad
//! configuration is one [`ConfigError`] that names the key, and the binary
//! exits with code 64 (`EX_USAGE`). The environment is passed in as data
//! (see [`Environment`]) so tests never mutate the process environment.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The defaults, compiled into the binary so `leasehold` runs with no file.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// Exit code for a bad configuration or command line (`EX_USAGE` of sysexits.h).
pub const EXIT_CONFIG: i32 = 64;

/// Pub/Sub's bounds for a subscription's ack deadline and for ModifyAckDeadline.
const ACK_DEADLINE_RANGE: (Duration, Duration) =
    (Duration::from_secs(10), Duration::from_secs(600));

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
    /// The executor classes this worker may run.
    pub executors: ExecutorsConfig,
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
    /// The deadline each ModifyAckDeadline asks for.
    #[serde(with = "humantime_serde")]
    pub extension: Duration,
    /// Leases are not extended past this age; the message is then redelivered.
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

/// `[executors]`: one table per executor class.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ExecutorsConfig {
    /// CPU tasks: N slots.
    pub cpu: CpuExecutorConfig,
    /// GPU tasks: one slot per device.
    pub gpu: GpuExecutorConfig,
}

/// `[executors.cpu]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CpuExecutorConfig {
    /// Whether this worker pulls CPU tasks.
    pub enabled: bool,
    /// Topic producers publish CPU tasks to (used by `setup` and `publish`).
    pub topic: String,
    /// Subscription this worker pulls from, shared by every pod of the pool.
    pub subscription: String,
    /// Concurrent tasks; 0 means the available CPU parallelism.
    pub slots: usize,
}

/// `[executors.gpu]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GpuExecutorConfig {
    /// Whether this worker pulls GPU tasks.
    pub enabled: bool,
    /// Topic producers publish GPU tasks to.
    pub topic: String,
    /// Subscription this worker pulls from.
    pub subscription: String,
    /// Which devices to use: one task per device at a time.
    pub devices: Devices,
}

/// `devices = "auto"` or an explicit list such as `["0", "1"]`.
///
/// A comma-separated string (`"0,1"`) is accepted too, so the list can be
/// given through one environment variable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Devices {
    /// `NVIDIA_VISIBLE_DEVICES` when set, else `nvidia-smi -L`.
    Auto,
    /// These device ids, in order.
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

/// The executor classes. A task kind names one; each has its own topic,
/// subscription, slots and puller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ExecutorClass {
    /// Runs on the CPU pool.
    Cpu,
    /// Runs with one GPU pinned.
    Gpu,
}

impl ExecutorClass {
    /// Both classes, in a fixed order.
    pub const ALL: [ExecutorClass; 2] = [ExecutorClass::Cpu, ExecutorClass::Gpu];

    /// The name used in configuration, logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            ExecutorClass::Cpu => "cpu",
            ExecutorClass::Gpu => "gpu",
        }
    }
}

impl std::fmt::Display for ExecutorClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `[handlers.KIND]`: how tasks of one kind run.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HandlerConfig {
    /// The executor class that runs this kind.
    pub executor: ExecutorClass,
    /// argv of an exec handler; the payload is never interpolated into it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// Name of a builtin handler (`noop`, `sleep`), instead of a command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub builtin: Option<String>,
    /// Kill the handler and retry after this long; none means no limit but `lease.max_lease`.
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
}

/// The builtin handler names.
pub const BUILTINS: [&str; 2] = ["noop", "sleep"];

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
        return invalid(key, format!("unknown key ({expected})"));
    }
    match parent {
        Some(key) => invalid(key, body),
        None => ConfigError::Read(body),
    }
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// The process environment as data, so loading can be tested without
/// `std::env::set_var`.
#[derive(Debug, Clone, Default)]
pub struct Environment {
    vars: BTreeMap<String, String>,
}

impl Environment {
    /// The current process environment.
    pub fn from_process() -> Self {
        Self {
            vars: std::env::vars().collect(),
        }
    }

    /// A given set of variables (tests).
    pub fn from_pairs<K: Into<String>, V: Into<String>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        Self {
            vars: pairs
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        }
    }

    /// The same environment with one variable set (e.g. the emulator's host).
    pub fn with(mut self, key: &str, value: &str) -> Self {
        self.vars.insert(key.to_string(), value.to_string());
        self
    }

    /// One variable, treating an empty value as unset.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.vars
            .get(key)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }
}

impl Config {
    /// Loads the layers and validates the result.
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
            .vars
            .iter()
            .filter(|(k, _)| k.starts_with("LEASEHOLD__"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        builder = builder.add_source(
            config::Environment::with_prefix("LEASEHOLD")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                .source(Some(layered)),
        );
        let raw = builder.build().map_err(|e| read_error(&e.to_string()))?;
        let config: Config = raw
            .try_deserialize()
            .map_err(|e| read_error(&e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every value against what Pub/Sub and the worker accept.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let p = &self.pubsub;
        if !is_project_id(&p.project) {
            return Err(invalid(
                "pubsub.project",
                format!("{:?} is not a Google Cloud project id", p.project),
            ));
        }
        let url_like = p.endpoint.starts_with("http://") || p.endpoint.starts_with("https://");
        if !(p.endpoint.is_empty() || url_like) {
            return Err(invalid(
                "pubsub.endpoint",
                "must be empty or an http:// or https:// URL",
            ));
        }
        if !p.results_topic.is_empty() {
            check_resource_name("pubsub.results_topic", &p.results_topic)?;
        }
        check_resource_name("pubsub.dead_letter_topic", &p.dead_letter_topic)?;
        check_range("pubsub.ack_deadline", p.ack_deadline, ACK_DEADLINE_RANGE)?;
        check_range("lease.extension", self.lease.extension, ACK_DEADLINE_RANGE)?;
        if self.lease.max_lease < self.lease.extension {
            return Err(invalid(
                "lease.max_lease",
                "must be at least lease.extension",
            ));
        }
        let r = &self.retry;
        if !(1..=100).contains(&r.max_attempts) {
            return Err(invalid("retry.max_attempts", "must be between 1 and 100"));
        }
        if r.min_backoff.is_zero() {
            return Err(invalid("retry.min_backoff", "must be more than 0s"));
        }
        if r.max_backoff < r.min_backoff {
            return Err(invalid(
                "retry.max_backoff",
                "must be at least retry.min_backoff",
            ));
        }
        if r.max_backoff > ACK_DEADLINE_RANGE.1 {
            return Err(invalid(
                "retry.max_backoff",
                "must be at most 10m (the longest ack deadline Pub/Sub accepts)",
            ));
        }
        let e = &self.executors;
        for class in ExecutorClass::ALL {
            let (topic, sub) = self.topic_and_subscription(class);
            check_resource_name(&format!("executors.{class}.topic"), topic)?;
            check_resource_name(&format!("executors.{class}.subscription"), sub)?;
        }
        if e.cpu.enabled && e.gpu.enabled && e.cpu.subscription == e.gpu.subscription {
            return Err(invalid(
                "executors.gpu.subscription",
                "must differ from executors.cpu.subscription",
            ));
        }
        if e.cpu.enabled && e.gpu.enabled && e.cpu.topic == e.gpu.topic {
            // Two subscriptions on one topic would each get every task.
            return Err(invalid(
                "executors.gpu.topic",
                "must differ from executors.cpu.topic (each subscription would get every task)",
            ));
        }
        if e.cpu.slots > 10_000 {
            return Err(invalid("executors.cpu.slots", "must be at most 10000"));
        }
        if let Devices::List(list) = &e.gpu.devices {
            if e.gpu.enabled && list.is_empty() {
                return Err(invalid(
                    "executors.gpu.devices",
                    "is empty while the GPU executor is enabled",
                ));
            }
            let mut seen = std::collections::BTreeSet::new();
            for d in list {
                if d.is_empty() || !d.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
                    return Err(invalid(
                        "executors.gpu.devices",
                        format!("{d:?} is not a device index or UUID"),
                    ));
                }
                if !seen.insert(d) {
                    return Err(invalid(
                        "executors.gpu.devices",
                        format!("device {d:?} is listed twice"),
                    ));
                }
            }
        }
        if !e.cpu.enabled && !e.gpu.enabled {
            return Err(invalid(
                "executors",
                "no executor is enabled; enable executors.cpu or executors.gpu",
            ));
        }
        for (kind, h) in &self.handlers {
            validate_handler(kind, h)?;
        }
        if self.shutdown.kill_grace.is_zero() {
            return Err(invalid("shutdown.kill_grace", "must be more than 0s"));
        }
        Ok(())
    }

    /// The topic and subscription of one executor class.
    pub fn topic_and_subscription(&self, class: ExecutorClass) -> (&str, &str) {
        match class {
            ExecutorClass::Cpu => (&self.executors.cpu.topic, &self.executors.cpu.subscription),
            ExecutorClass::Gpu => (&self.executors.gpu.topic, &self.executors.gpu.subscription),
        }
    }

    /// Whether this worker runs the class.
    pub fn is_enabled(&self, class: ExecutorClass) -> bool {
        match class {
            ExecutorClass::Cpu => self.executors.cpu.enabled,
            ExecutorClass::Gpu => self.executors.gpu.enabled,
        }
    }

    /// The enabled classes, in a fixed order.
    pub fn enabled_classes(&self) -> impl Iterator<Item = ExecutorClass> + '_ {
        ExecutorClass::ALL
            .into_iter()
            .filter(|c| self.is_enabled(*c))
    }

    /// The subscription's dead-letter policy bound: a safety net above the
    /// worker's own `max_attempts`, within Pub/Sub's 5..=100.
    pub fn max_delivery_attempts(&self) -> i32 {
        // Two spare deliveries: a release at shutdown or a lost lease also
        // counts as a delivery, and must not dead-letter a task early.
        (self.retry.max_attempts as i32 + 2).clamp(5, 100)
    }
}

fn validate_handler(kind: &str, h: &HandlerConfig) -> Result<(), ConfigError> {
    let key = |k: &str| format!("handlers.{kind}.{k}");
    if !kind
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
    {
        return Err(invalid(
            format!("handlers.{kind}"),
            "a kind may use only letters, digits, '-', '_' and '.'",
        ));
    }
    match (&h.command, &h.builtin) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                format!("handlers.{kind}"),
                "set either command or builtin, not both",
            ));
        }
        (None, None) => {
            return Err(invalid(
                format!("handlers.{kind}"),
                "set command (an argv list) or builtin",
            ));
        }
        (Some(argv), None) if argv.is_empty() || argv[0].is_empty() => {
            return Err(invalid(key("command"), "must name a program"));
        }
        (None, Some(b)) if !BUILTINS.contains(&b.as_str()) => {
            return Err(invalid(
                key("builtin"),
                format!("unknown builtin {b:?}; known: {}", BUILTINS.join(", ")),
            ));
        }
        _ => {}
    }
    if h.timeout.is_some_and(|t| t.is_zero()) {
        return Err(invalid(key("timeout"), "must be more than 0s"));
    }
    if let Some(code) = h
        .permanent_exit_codes
        .iter()
        .find(|c| !(1..=255).contains(*c))
    {
        return Err(invalid(
            key("permanent_exit_codes"),
            format!("{code} is not an exit code between 1 and 255"),
        ));
    }
    Ok(())
}

fn check_range(key: &str, d: Duration, (lo, hi): (Duration, Duration)) -> Result<(), ConfigError> {
    if d < lo || d > hi {
        return Err(invalid(
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
        Err(invalid(
            key,
            format!(
                "{name:?} is not a Pub/Sub resource id (3-255 letters, digits, -_.~+%, starting with a letter)"
            ),
        ))
    }
}

fn is_project_id(p: &str) -> bool {
    (1..=100).contains(&p.len())
        && p.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == ':' || c == '.')
}

#[cfg(test)]
mod tests;

//! Handlers: what runs a task of a given kind.
//!
//! A [`Handler`] is built from `[handlers.KIND]`: an exec handler (a command,
//! payload on stdin) or a builtin. The [`HandlerRegistry`] maps kinds to
//! handlers and their executor class. A new builtin is one variant of
//! [`Builtin`] and its arm in `Builtin::run`; a new kind of handler is a
//! variant here and its module beside this file.

pub mod builtin;
pub mod environment;
pub mod exec;
pub mod output;
pub mod processes;
pub mod progress;
pub mod scratch;

use std::collections::BTreeMap;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConfigError, HandlerConfig};
use crate::task::Task;

pub use builtin::Builtin;
pub use exec::ExecHandler;
pub use progress::ProgressSink;

/// How one kind runs.
#[derive(Debug, Clone)]
pub enum Handler {
    /// A command run in its own process group.
    Exec(ExecHandler),
    /// Code inside the worker.
    Builtin(Builtin),
}

/// A registered handler and the executor class that runs it.
#[derive(Debug, Clone)]
pub struct Registered {
    /// The executor class named by `handlers.KIND.executor`.
    pub executor: String,
    /// How to run it.
    pub handler: Handler,
}

/// Everything a handler needs besides the task.
#[derive(Debug, Clone, Default)]
pub struct RunContext {
    /// Extra environment, e.g. the GPU pin (`CUDA_VISIBLE_DEVICES`).
    pub env: Vec<(String, String)>,
    /// Cancelled at shutdown once the grace period is over: stop now.
    pub stop: CancellationToken,
    /// After `stop`, how long a process gets between SIGTERM and SIGKILL.
    pub kill_grace: Duration,
    /// Where the task's progress reports go (its slot's gauge, result events).
    pub progress: ProgressSink,
}

/// How a handler run ended. Typed, so the disposition is decided by a
/// method, never by matching strings.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Exit 0 (or a builtin that succeeded), with the optional result JSON.
    Succeeded {
        /// What the handler wrote to `LEASEHOLD_RESULT_FILE`.
        result: Option<serde_json::Value>,
    },
    /// Anything else.
    Failed {
        /// Why.
        failure: Failure,
        /// The last 4 KiB of stderr, for the result event.
        stderr_tail: String,
    },
}

/// A finished run: how it ended and when it ran (for metrics and result events).
#[derive(Debug, Clone)]
pub struct Ran {
    /// How it ended.
    pub outcome: Outcome,
    /// Wall-clock start, for the result event.
    pub started_at: time::OffsetDateTime,
    /// How long it ran.
    pub duration: Duration,
    /// The handler's latest progress report, if it wrote one.
    pub progress: Option<serde_json::Value>,
}

/// The ways a run fails.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Failure {
    /// Non-zero exit; `permanent` when listed in `permanent_exit_codes`.
    #[error("the handler exited with code {code}{}", if *permanent { " (a permanent failure)" } else { "" })]
    Exit {
        /// The exit code.
        code: i32,
        /// Listed in `permanent_exit_codes`.
        permanent: bool,
    },
    /// Killed by a signal it did not expect.
    #[error("the handler was killed by signal {0}")]
    Signal(i32),
    /// Ran past `timeout`; its process group was killed.
    #[error("the handler ran past its timeout of {} and was killed", humantime::format_duration(*.0))]
    Timeout(Duration),
    /// The command could not be started.
    #[error("the handler could not start: {0}")]
    Spawn(String),
    /// The worker is shutting down and stopped it; the task is released.
    #[error("the worker shut down before the handler finished")]
    Interrupted,
    /// The payload is not what the handler accepts; retrying cannot help.
    #[error("bad task input: {0}")]
    BadInput(String),
    /// The task ran past `lease.max_lease`; it was stopped and is retried.
    #[error("the task ran past lease.max_lease ({}) and was stopped", humantime::format_duration(*.0))]
    PastMaxLease(Duration),
    /// The lease was lost: another worker may run the task now, so this run
    /// was stopped and its outcome does not count.
    #[error(
        "the lease was lost (its deadline passed unextended, or Pub/Sub refused its ack id); the run was stopped"
    )]
    LeaseLost,
    /// The handler panicked (a bug in the worker); retried like a crash.
    #[error("the handler panicked: {0}")]
    Panicked(String),
    /// No progress report for `stall_timeout`: the handler was killed and
    /// the task is retried (a hung renderer gives its GPU back).
    #[error("the handler stalled: no progress report for {} (handlers.KIND.stall_timeout); it was killed", humantime::format_duration(*.0))]
    Stalled(Duration),
    /// The task's attributes cannot be given to a command (a NUL byte, two
    /// names for one variable); retrying cannot help.
    #[error("the task's attributes cannot be passed to the handler: {0}")]
    BadAttributes(String),
}

impl Failure {
    /// A permanent failure is dead-lettered at once; others are retried.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            Failure::Exit {
                permanent: true,
                ..
            } | Failure::BadInput(_)
                | Failure::BadAttributes(_)
        )
    }
}

impl Handler {
    /// Builds the handler of one `[handlers.KIND]` table, or names the key
    /// that keeps it from running. Used by validation and by the worker
    /// alike, so an invalid spec never reaches run time.
    pub fn from_config(
        kind: &str,
        h: &HandlerConfig,
        max_lease: Duration,
    ) -> Result<Handler, ConfigError> {
        let key = |k: &str| format!("handlers.{kind}.{k}");
        if kind.is_empty()
            || !kind
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        {
            return Err(ConfigError::invalid(
                format!("handlers.{kind}"),
                "a kind may use only letters, digits, '-', '_' and '.'",
            ));
        }
        if h.timeout.is_some_and(|t| t.is_zero()) {
            return Err(ConfigError::invalid(key("timeout"), "must be more than 0s"));
        }
        if let Some(timeout) = h.timeout
            && timeout > max_lease
        {
            return Err(ConfigError::invalid(
                key("timeout"),
                format!(
                    "{} is longer than lease.max_lease ({}), which stops every task first",
                    humantime::format_duration(timeout),
                    humantime::format_duration(max_lease)
                ),
            ));
        }
        if let Some(code) = h
            .permanent_exit_codes
            .iter()
            .find(|c| !(1..=255).contains(*c))
        {
            return Err(ConfigError::invalid(
                key("permanent_exit_codes"),
                format!("{code} is not an exit code between 1 and 255"),
            ));
        }
        if h.stall_timeout.is_some_and(|t| t < progress::POLL) {
            return Err(ConfigError::invalid(
                key("stall_timeout"),
                "must be at least 1s (the progress file is read once a second)",
            ));
        }
        if let Some((name, _)) = h
            .env
            .iter()
            .find(|(k, v)| k.is_empty() || k.contains(['=', '\0']) || v.contains('\0'))
        {
            return Err(ConfigError::invalid(
                key("env"),
                format!(
                    "{name:?} cannot be an environment variable (an empty name, '=' in the name, or a NUL byte)"
                ),
            ));
        }
        if h.builtin.is_some() {
            for (set, name) in [
                (h.stall_timeout.is_some(), "stall_timeout"),
                (h.progress_interval.is_some(), "progress_interval"),
            ] {
                if set {
                    return Err(ConfigError::invalid(
                        key(name),
                        "applies to command handlers only (builtins write no progress file)",
                    ));
                }
            }
        }
        match (&h.command, h.builtin) {
            (Some(_), Some(_)) => Err(ConfigError::invalid(
                format!("handlers.{kind}"),
                "set either command or builtin, not both",
            )),
            (None, None) => Err(ConfigError::invalid(
                format!("handlers.{kind}"),
                "set command (an argv list) or builtin",
            )),
            (Some(argv), None) => match argv.split_first() {
                Some((program, args)) if !program.is_empty() => Ok(Handler::Exec(ExecHandler {
                    program: program.clone(),
                    args: args.to_vec(),
                    timeout: h.timeout,
                    permanent_exit_codes: h.permanent_exit_codes.clone(),
                    env: h.env.clone().into_iter().collect(),
                    stall_timeout: h.stall_timeout,
                    progress_interval: h.progress_interval.unwrap_or(progress::DEFAULT_INTERVAL),
                })),
                _ => Err(ConfigError::invalid(key("command"), "must name a program")),
            },
            (None, Some(builtin)) => Ok(Handler::Builtin(builtin)),
        }
    }

    /// Runs the task to its outcome.
    pub async fn run(&self, task: &Task, ctx: &RunContext) -> Outcome {
        match self {
            Handler::Exec(h) => h.run(task, ctx).await,
            Handler::Builtin(b) => b.run(task, ctx).await,
        }
    }
}

/// Kinds to handlers, built once from the configuration.
#[derive(Debug, Clone, Default)]
pub struct HandlerRegistry {
    handlers: BTreeMap<String, Registered>,
}

impl HandlerRegistry {
    /// One handler per `[handlers.KIND]`, or the first table that cannot run.
    pub fn from_config(config: &Config) -> Result<Self, ConfigError> {
        let mut handlers = BTreeMap::new();
        for (kind, h) in &config.handlers {
            let registered = Registered {
                executor: h.executor.clone(),
                handler: Handler::from_config(kind, h, config.lease.max_lease)?,
            };
            handlers.insert(kind.clone(), registered);
        }
        Ok(HandlerRegistry { handlers })
    }

    /// The handler of `kind`, if any.
    pub fn get(&self, kind: &str) -> Option<&Registered> {
        self.handlers.get(kind)
    }

    /// Kinds served by the executor class `executor`.
    pub fn kinds_of<'a>(&'a self, executor: &'a str) -> impl Iterator<Item = &'a str> {
        self.handlers
            .iter()
            .filter(move |(_, r)| r.executor == executor)
            .map(|(k, _)| k.as_str())
    }
}

//! Handlers: what runs a task of a given kind.
//!
//! A [`Handler`] is built from `[handlers.KIND]`: an exec handler (a command,
//! payload on stdin) or a builtin. The [`HandlerRegistry`] maps kinds to
//! handlers and their executor class; adding a new kind of handler means a
//! new variant here and its module beside this file.

pub mod builtin;
pub mod exec;

use std::collections::BTreeMap;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::{Config, ExecutorClass, HandlerConfig};
use crate::task::Task;

pub use builtin::Builtin;
pub use exec::ExecHandler;

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
    pub executor: ExecutorClass,
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
        )
    }
}

impl Handler {
    /// Builds the handler of one `[handlers.KIND]` table (already validated).
    pub fn from_config(h: &HandlerConfig) -> Handler {
        match (&h.command, &h.builtin) {
            (Some(argv), _) => Handler::Exec(ExecHandler {
                argv: argv.clone(),
                timeout: h.timeout,
                permanent_exit_codes: h.permanent_exit_codes.clone(),
                env: h.env.clone().into_iter().collect(),
            }),
            (None, Some(name)) => Handler::Builtin(
                Builtin::from_name(name).expect("builtin names are validated with the config"),
            ),
            (None, None) => unreachable!("validated: command or builtin is set"),
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
    /// One handler per `[handlers.KIND]`.
    pub fn from_config(config: &Config) -> Self {
        HandlerRegistry {
            handlers: config
                .handlers
                .iter()
                .map(|(kind, h)| {
                    (
                        kind.clone(),
                        Registered {
                            executor: h.executor,
                            handler: Handler::from_config(h),
                        },
                    )
                })
                .collect(),
        }
    }

    /// The handler of `kind`, if any.
    pub fn get(&self, kind: &str) -> Option<&Registered> {
        self.handlers.get(kind)
    }

    /// Kinds served by `class`.
    pub fn kinds_of(&self, class: ExecutorClass) -> impl Iterator<Item = &str> {
        self.handlers
            .iter()
            .filter(move |(_, r)| r.executor == class)
            .map(|(k, _)| k.as_str())
    }
}

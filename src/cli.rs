//! The command line (DESIGN.md's table), and the exit codes:
//! 0 clean stop, 64 bad command line or configuration, 69 Pub/Sub
//! unreachable or refusing, 70 an internal error.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{IsTerminal, Read};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::config::{Config, EXIT_CONFIG, Environment};
use crate::pubsub::Connection;
use crate::pubsub::admin::{Action, ContractError, setup};
use crate::pubsub::producer::{NewTask, PublishError, publish_tasks};
use crate::worker::{RunOptions, WorkerError};

/// Exit code when Pub/Sub cannot be reached or refuses (`EX_UNAVAILABLE`).
pub const EXIT_UNAVAILABLE: u8 = 69;
/// Exit code for an internal error (`EX_SOFTWARE`).
pub const EXIT_SOFTWARE: u8 = 70;

/// leasehold: run long GPU and CPU batch tasks from Cloud Pub/Sub.
#[derive(Debug, Parser)]
#[command(name = "leasehold", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the worker until SIGTERM/SIGINT (or, with --exit-when-idle, until idle).
    Run {
        /// Configuration files.
        #[command(flatten)]
        config: ConfigArgs,
        /// Job mode: exit 0 once nothing was pulled and nothing ran for this long ("30s").
        #[arg(long, value_parser = humantime::parse_duration)]
        exit_when_idle: Option<Duration>,
    },
    /// Create the topics and subscriptions the configuration names (idempotent).
    Setup {
        /// Configuration files.
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Publish one task to the topic of its kind's executor; prints the message id.
    Publish(PublishArgs),
    /// Local demo on the Pub/Sub emulator: setup, worker, sample tasks, live progress.
    Dev {
        /// Configuration files (default: config/dev.toml).
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Validate and print the effective configuration.
    CheckConfig {
        /// Configuration files.
        #[command(flatten)]
        config: ConfigArgs,
    },
}

/// `--config FILE`, repeatable: layered in order over the defaults.
#[derive(Debug, Args, Clone, Default)]
pub struct ConfigArgs {
    /// A TOML configuration file; repeat to layer several.
    #[arg(long = "config", short = 'c', value_name = "FILE")]
    pub files: Vec<PathBuf>,
}

/// `leasehold publish`
#[derive(Debug, Args)]
pub struct PublishArgs {
    /// Configuration files.
    #[command(flatten)]
    pub config: ConfigArgs,
    /// The task kind (handler name).
    #[arg(long)]
    pub kind: String,
    /// The payload, inline.
    #[arg(long, conflicts_with = "data_file")]
    pub data: Option<String>,
    /// The payload, from a file.
    #[arg(long, value_name = "PATH")]
    pub data_file: Option<PathBuf>,
    /// An attribute for the handler; repeatable.
    #[arg(long = "attr", value_name = "K=V", value_parser = parse_attr)]
    pub attrs: Vec<(String, String)>,
    /// The task id (default: the message id).
    #[arg(long)]
    pub task_id: Option<String>,
}

fn parse_attr(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not K=V")),
    }
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EXIT_CONFIG)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let env = Environment::from_process();
    crate::telemetry::init(env.get("LEASEHOLD_LOG_FORMAT") == Some("json"));
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("leasehold: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_SOFTWARE);
        }
    };
    runtime.block_on(execute(cli.command, env))
}

/// A configuration for a command, or the exit code of refusing it. Its
/// project completes the JSON log lines' trace field from here on.
fn load(args: &ConfigArgs, env: &Environment) -> Result<Config, ExitCode> {
    let config = Config::load(&args.files, env).map_err(|e| {
        eprintln!("leasehold: {e}");
        ExitCode::from(EXIT_CONFIG)
    })?;
    crate::telemetry::set_project(&config.pubsub.project);
    Ok(config)
}

fn unavailable(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("leasehold: {e}");
    ExitCode::from(EXIT_UNAVAILABLE)
}

/// Runs one command to its exit code.
pub async fn execute(command: Command, env: Environment) -> ExitCode {
    match run_command(command, env).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(code) => code,
    }
}

async fn run_command(command: Command, env: Environment) -> Result<(), ExitCode> {
    match command {
        Command::CheckConfig { config } => {
            let config = load(&config, &env)?;
            print!(
                "{}",
                describe(&config, &env).map_err(|e| {
                    eprintln!("leasehold: {e}");
                    ExitCode::from(EXIT_CONFIG)
                })?
            );
            Ok(())
        }
        Command::Setup { config } => {
            let config = load(&config, &env)?;
            let conn = Connection::new(&config.pubsub, &env).map_err(unavailable)?;
            conn.check_tls().await.map_err(unavailable)?;
            let changes = setup(&conn, &config).await.map_err(unavailable)?;
            for c in changes {
                let what = match c.action {
                    Action::Created => "created",
                    Action::Updated => "updated",
                    Action::Unchanged => "unchanged",
                };
                println!("{what:9} {}", c.resource);
            }
            Ok(())
        }
        Command::Publish(args) => {
            let config = load(&args.config, &env)?;
            let data = read_payload(&args).map_err(|e| {
                eprintln!("leasehold: {e}");
                ExitCode::from(EXIT_CONFIG)
            })?;
            let conn = Connection::new(&config.pubsub, &env).map_err(unavailable)?;
            conn.check_tls().await.map_err(unavailable)?;
            let task = NewTask {
                kind: args.kind,
                task_id: args.task_id,
                attributes: args.attrs.into_iter().collect::<BTreeMap<_, _>>(),
                data,
            };
            match publish_tasks(&conn, &config, &[task]).await {
                Ok(ids) => {
                    println!("{}", ids[0]);
                    Ok(())
                }
                Err(e @ (PublishError::UnknownKind(_) | PublishError::ReservedAttribute(_))) => {
                    eprintln!("leasehold: {e}");
                    Err(ExitCode::from(EXIT_CONFIG))
                }
                Err(e) => Err(unavailable(e)),
            }
        }
        Command::Run {
            config,
            exit_when_idle,
        } => {
            let config = load(&config, &env)?;
            let options = RunOptions {
                exit_when_idle,
                ..RunOptions::default()
            };
            crate::worker::run(config, env, options, shutdown_signal())
                .await
                .map_err(|e| match e {
                    e @ (WorkerError::Executor(_)
                    | WorkerError::Listen { .. }
                    | WorkerError::Config(_)
                    | WorkerError::Subscription(
                        ContractError::Missing(_) | ContractError::Drifted { .. },
                    )) => {
                        eprintln!("leasehold: {e}");
                        ExitCode::from(EXIT_CONFIG)
                    }
                    e @ WorkerError::Subscription(ContractError::Connection(_)) => unavailable(e),
                    WorkerError::Connection(e) => unavailable(e),
                })
        }
        Command::Dev { config } => crate::dev::run(config.files, env).await.map_err(|e| {
            eprintln!("leasehold dev: {e:#}");
            ExitCode::from(EXIT_SOFTWARE)
        }),
    }
}

fn read_payload(args: &PublishArgs) -> Result<Vec<u8>, String> {
    if let Some(d) = &args.data {
        return Ok(d.clone().into_bytes());
    }
    if let Some(path) = &args.data_file {
        return std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()));
    }
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        return Ok(Vec::new());
    }
    let mut data = Vec::new();
    stdin
        .lock()
        .read_to_end(&mut data)
        .map_err(|e| format!("cannot read stdin: {e}"))?;
    Ok(data)
}

/// The effective configuration as TOML, plus each executor's resolved
/// capacity (GPU devices discovered now).
pub fn describe(config: &Config, env: &Environment) -> Result<String, String> {
    let mut out = String::from("# effective configuration\n");
    out.push_str(&toml::to_string_pretty(config).map_err(|e| e.to_string())?);
    out.push_str("\n# resolved executors\n");
    let registry =
        crate::handler::HandlerRegistry::from_config(config).map_err(|e| e.to_string())?;
    for (name, executor) in &config.executors {
        if !executor.enabled {
            let _ = writeln!(out, "# {name}: disabled");
            continue;
        }
        let ex =
            crate::executor::Executor::build(name, executor, env).map_err(|e| e.to_string())?;
        let kinds: Vec<&str> = registry.kinds_of(name).collect();
        let _ = writeln!(
            out,
            "# {name}: subscription {}, slots {}{}, kinds [{}]",
            ex.subscription(),
            ex.slots(),
            ex.devices()
                .map(|d| format!(", devices [{}]", d.join(", ")))
                .unwrap_or_default(),
            kinds.join(", ")
        );
    }
    let endpoint = crate::pubsub::Endpoint::resolve(&config.pubsub, env);
    let _ = writeln!(
        out,
        "# pubsub endpoint: {}{}",
        endpoint.url,
        if endpoint.emulator { " (emulator)" } else { "" }
    );
    Ok(out)
}

/// Completes on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}

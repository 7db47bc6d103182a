//! The exec handler: a command in its own process group, the payload on
//! stdin, the task described in `LEASEHOLD_*` variables, in a scratch
//! directory of its own.
//!
//! A timeout, a stall or a shutdown signals the whole group (SIGTERM, then
//! SIGKILL after `kill_grace`). When the handler's first process has exited,
//! whatever is left of the task is killed: its group, and every process it
//! started elsewhere (`processes`: escaped sessions, daemons), so nothing
//! outlives its task or keeps a GPU busy. Then its output is read to the end
//! (`output`, for a bounded time), and its directory removed (`scratch`).

use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::AsyncWriteExt;
use tokio::process::{Child, Command};

use crate::handler::environment::task_environment;
use crate::handler::output;
use crate::handler::processes::{self, TaskProcesses};
use crate::handler::progress::{self, ProgressWatch};
use crate::handler::scratch::TaskDir;
use crate::handler::{Failure, Outcome, RunContext};
use crate::task::Task;

/// Bytes of stderr kept for the result event of a failure.
pub const STDERR_TAIL_BYTES: usize = 4096;
/// Largest result file read back.
pub const MAX_RESULT_BYTES: u64 = 1024 * 1024;

/// `[handlers.KIND]` with a `command`.
#[derive(Debug, Clone)]
pub struct ExecHandler {
    /// The program (argv\[0\]); the payload is never interpolated into argv.
    pub program: String,
    /// Its arguments.
    pub args: Vec<String>,
    /// Kill and retry after this long.
    pub timeout: Option<Duration>,
    /// Exit codes that are permanent failures.
    pub permanent_exit_codes: Vec<i32>,
    /// Extra environment from the configuration.
    pub env: Vec<(String, String)>,
    /// Kill and retry a task whose progress file did not change for this long.
    pub stall_timeout: Option<Duration>,
    /// At most one `progress` result event per this.
    pub progress_interval: Duration,
}

impl ExecHandler {
    /// A handler running `program` with `args`, and every other setting at
    /// its default.
    pub fn new(program: &str, args: &[&str]) -> ExecHandler {
        ExecHandler {
            program: program.to_string(),
            args: args.iter().map(ToString::to_string).collect(),
            timeout: None,
            permanent_exit_codes: Vec::new(),
            env: Vec::new(),
            stall_timeout: None,
            progress_interval: progress::DEFAULT_INTERVAL,
        }
    }

    /// Runs the command to its outcome.
    pub async fn run(&self, task: &Task, ctx: &RunContext) -> Outcome {
        let task_env = match task_environment(task) {
            Ok(env) => env,
            Err(failure) => return failed(failure, String::new()),
        };
        let dir = match TaskDir::create() {
            Ok(dir) => dir,
            Err(e) => {
                let failure = Failure::Spawn(format!("could not create the task directory: {e}"));
                return failed(failure, String::new());
            }
        };
        let outcome = self.run_in(task, ctx, &dir, task_env).await;
        dir.remove().await;
        outcome
    }

    async fn run_in(
        &self,
        task: &Task,
        ctx: &RunContext,
        dir: &TaskDir,
        task_env: Vec<(String, String)>,
    ) -> Outcome {
        processes::become_subreaper();
        let mut command = Command::new(&self.program);
        command
            .args(&self.args)
            .process_group(0)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .envs(self.env.iter().cloned())
            .envs(task_env)
            .envs(dir.environment())
            .envs(ctx.env.iter().cloned());
        let mut watch = ProgressWatch::new(
            dir.progress_file(),
            self.progress_interval,
            self.stall_timeout,
            ctx.progress.clone(),
        );
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(e) => {
                let failure = Failure::Spawn(format!("{}: {e}", self.program));
                return failed(failure, String::new());
            }
        };
        let leader = child.id().and_then(|id| i32::try_from(id).ok());
        let mark = format!("LEASEHOLD_TASK_DIR={}", dir.path().display());
        let mut tree = leader.map(|pid| TaskProcesses::new(pid, mark.into_bytes()));

        // Feed stdin from a task: a handler that does not read it must not block us.
        if let Some(mut stdin) = child.stdin.take() {
            let data = task.data.clone();
            tokio::spawn(async move {
                let _ = stdin.write_all(&data).await;
                // Dropping stdin closes it: the handler sees end of input.
            });
        }
        let stdout = child.stdout.take().map(|s| output::forward(s, "stdout", 0));
        let stderr = child
            .stderr
            .take()
            .map(|s| output::forward(s, "stderr", STDERR_TAIL_BYTES));

        let timeout = self.timeout.unwrap_or(Duration::MAX);
        let (ended, exited) = wait(&mut child, timeout, ctx, &mut watch, &mut tree).await;
        let pgid = leader.map(Pid::from_raw);
        let status = match exited {
            Some(status) => status,
            None => stop_group(&mut child, pgid, ctx.kill_grace).await,
        };
        // Whatever the leader did, nothing the task started may outlive it.
        if let Some(pgid) = pgid {
            let _ = killpg(pgid, Signal::SIGKILL);
        }
        if let Some(tree) = tree {
            tree.end().await;
        }
        watch.finish().await;
        let (_, stderr_tail) = tokio::join!(
            output::finish(stdout, "stdout"),
            output::finish(stderr, "stderr")
        );

        let failure = match (ended, status) {
            (Ended::TimedOut, _) => Failure::Timeout(timeout),
            (Ended::Stalled, _) => Failure::Stalled(self.stall_timeout.unwrap_or_default()),
            (Ended::Stopped, _) => Failure::Interrupted,
            (Ended::Exited, Err(e)) => Failure::Spawn(format!("waiting for the handler: {e}")),
            (Ended::Exited, Ok(status)) if status.success() => {
                return Outcome::Succeeded {
                    result: read_result(&dir.result_file(), &task.task_id),
                };
            }
            (Ended::Exited, Ok(status)) => classify(status, &self.permanent_exit_codes),
        };
        failed(failure, stderr_tail)
    }
}

fn failed(failure: Failure, stderr_tail: String) -> Outcome {
    Outcome::Failed {
        failure,
        stderr_tail,
    }
}

/// How the wait for the child ended.
#[derive(Clone, Copy)]
enum Ended {
    Exited,
    TimedOut,
    Stalled,
    Stopped,
}

/// Waits for the leader's exit, the timeout, a stall or a stop; meanwhile
/// reads progress and records the task's processes every second.
async fn wait(
    child: &mut Child,
    timeout: Duration,
    ctx: &RunContext,
    watch: &mut ProgressWatch,
    tree: &mut Option<TaskProcesses>,
) -> (Ended, Option<std::io::Result<ExitStatus>>) {
    let deadline = sleep_for(timeout);
    tokio::pin!(deadline);
    let mut tick = tokio::time::interval(progress::POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            status = child.wait() => return (Ended::Exited, Some(status)),
            () = &mut deadline => return (Ended::TimedOut, None),
            () = ctx.stop.cancelled() => return (Ended::Stopped, None),
            _ = tick.tick() => {
                if watch.tick().await {
                    return (Ended::Stalled, None);
                }
                if let Some(t) = tree.take() {
                    *tree = Some(t.watch().await);
                }
            }
        }
    }
}

async fn sleep_for(d: Duration) {
    match tokio::time::Instant::now().checked_add(d) {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// SIGTERM to the group, SIGKILL after `grace`; returns the leader's status.
async fn stop_group(
    child: &mut Child,
    pgid: Option<Pid>,
    grace: Duration,
) -> std::io::Result<ExitStatus> {
    if let Some(pgid) = pgid {
        let _ = killpg(pgid, Signal::SIGTERM);
    }
    if let Ok(status) = tokio::time::timeout(grace, child.wait()).await {
        status
    } else {
        if let Some(pgid) = pgid {
            let _ = killpg(pgid, Signal::SIGKILL);
        }
        child.wait().await
    }
}

fn classify(status: ExitStatus, permanent: &[i32]) -> Failure {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => Failure::Exit {
            code,
            permanent: permanent.contains(&code),
        },
        (None, Some(signal)) => Failure::Signal(signal),
        (None, None) => Failure::Spawn("the handler ended with an unknown status".into()),
    }
}

/// The handler's result JSON, if it wrote a valid one of at most 1 MiB.
fn read_result(path: &Path, task_id: &str) -> Option<serde_json::Value> {
    let meta = std::fs::metadata(path).ok()?;
    if meta.len() > MAX_RESULT_BYTES {
        tracing::warn!(
            task_id,
            bytes = meta.len(),
            "result file is over 1 MiB and is ignored"
        );
        return None;
    }
    let bytes = std::fs::read(path).ok()?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return None;
    }
    match serde_json::from_slice(&bytes) {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::warn!(task_id, error = %e, "result file is not JSON and is ignored");
            None
        }
    }
}

#[cfg(test)]
mod tests;

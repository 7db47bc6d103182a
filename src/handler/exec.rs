//! The exec handler: a command in its own process group, the payload on
//! stdin, the task described in `LEASEHOLD_*` variables.
//!
//! A timeout or a shutdown signals the whole group (SIGTERM, then SIGKILL
//! after `kill_grace`), so grandchildren (a renderer started by a shell
//! script) never outlive their task or keep a GPU busy.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tracing::Instrument;

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
}

/// The `LEASEHOLD_ATTR_` name of an attribute: upper-cased,
/// non-alphanumerics replaced by `_`.
pub fn attribute_variable(key: &str) -> String {
    let mut name = String::from("LEASEHOLD_ATTR_");
    name.extend(key.chars().map(|c| {
        if c.is_ascii_alphanumeric() {
            c.to_ascii_uppercase()
        } else {
            '_'
        }
    }));
    name
}

/// The task's environment, as the handler contract lists it.
pub fn task_environment(task: &Task, result_file: &std::path::Path) -> Vec<(String, String)> {
    let mut env = vec![
        ("LEASEHOLD_TASK_ID".to_string(), task.task_id.clone()),
        ("LEASEHOLD_KIND".to_string(), task.kind.clone()),
        ("LEASEHOLD_MESSAGE_ID".to_string(), task.message_id.clone()),
        ("LEASEHOLD_ATTEMPT".to_string(), task.attempt.to_string()),
        (
            "LEASEHOLD_INTERRUPTIONS".to_string(),
            task.interruptions.to_string(),
        ),
        (
            "LEASEHOLD_RESULT_FILE".to_string(),
            result_file.display().to_string(),
        ),
    ];
    if let Some(t) = task.publish_time
        && let Ok(s) = t.format(&time::format_description::well_known::Rfc3339)
    {
        env.push(("LEASEHOLD_PUBLISH_TIME".to_string(), s));
    }
    for (k, v) in &task.attributes {
        env.push((attribute_variable(k), v.clone()));
    }
    env
}

/// A result file path unique within this machine.
fn result_file_path() -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("leasehold-result-{}-{n}.json", std::process::id()))
}

impl ExecHandler {
    /// Runs the command to its outcome.
    pub async fn run(&self, task: &Task, ctx: &RunContext) -> Outcome {
        let result_file = result_file_path();
        let outcome = self.run_with(task, ctx, &result_file).await;
        let _ = std::fs::remove_file(&result_file);
        outcome
    }

    async fn run_with(&self, task: &Task, ctx: &RunContext, result_file: &PathBuf) -> Outcome {
        let mut command = Command::new(&self.program);
        command
            .args(&self.args)
            .process_group(0)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .envs(self.env.iter().cloned())
            .envs(task_environment(task, result_file))
            .envs(ctx.env.iter().cloned());
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(e) => {
                return Outcome::Failed {
                    failure: Failure::Spawn(format!("{}: {e}", self.program)),
                    stderr_tail: String::new(),
                };
            }
        };
        let pgid = child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .map(Pid::from_raw);

        // Feed stdin from a task: a handler that does not read it must not block us.
        if let Some(mut stdin) = child.stdin.take() {
            let data = task.data.clone();
            tokio::spawn(async move {
                let _ = stdin.write_all(&data).await;
                // Dropping stdin closes it: the handler sees end of input.
            });
        }
        // In the task's span, so each forwarded line carries the task's fields.
        let span = tracing::Span::current();
        let stdout = child.stdout.take().map(|s| {
            let id = task.task_id.clone();
            tokio::spawn(forward_lines(s, id, "stdout", 0).instrument(span.clone()))
        });
        let stderr = child.stderr.take().map(|s| {
            let id = task.task_id.clone();
            tokio::spawn(forward_lines(s, id, "stderr", STDERR_TAIL_BYTES).instrument(span.clone()))
        });

        let timeout = self.timeout.unwrap_or(Duration::MAX);
        let (ended, exited) = tokio::select! {
            status = child.wait() => (Ended::Exited, Some(status)),
            () = sleep_for(timeout) => (Ended::TimedOut, None),
            () = ctx.stop.cancelled() => (Ended::Stopped, None),
        };
        let status = match exited {
            Some(status) => status,
            None => stop_group(&mut child, pgid, ctx.kill_grace).await,
        };
        // Whatever the leader did, nothing of the group may outlive the task.
        if let Some(pgid) = pgid {
            let _ = killpg(pgid, Signal::SIGKILL);
        }
        if let Some(h) = stdout {
            let _ = h.await;
        }
        let stderr_tail = match stderr {
            Some(h) => h.await.unwrap_or_default(),
            None => String::new(),
        };

        let failure = match (ended, status) {
            (Ended::TimedOut, _) => Failure::Timeout(timeout),
            (Ended::Stopped, _) => Failure::Interrupted,
            (Ended::Exited, Err(e)) => Failure::Spawn(format!("waiting for the handler: {e}")),
            (Ended::Exited, Ok(status)) if status.success() => {
                return Outcome::Succeeded {
                    result: read_result(result_file, &task.task_id),
                };
            }
            (Ended::Exited, Ok(status)) => classify(status, &self.permanent_exit_codes),
        };
        Outcome::Failed {
            failure,
            stderr_tail,
        }
    }
}

/// How the wait for the child ended.
#[derive(Clone, Copy)]
enum Ended {
    Exited,
    TimedOut,
    Stopped,
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

/// Logs each line with the task id; returns the last `keep` bytes.
async fn forward_lines(
    stream: impl AsyncRead + Unpin,
    task_id: String,
    name: &'static str,
    keep: usize,
) -> String {
    let mut lines = BufReader::new(stream).lines();
    let mut tail: VecDeque<String> = VecDeque::new();
    let mut tail_len = 0;
    // Non-UTF-8 output or a closed pipe ends forwarding, not the task.
    while let Ok(Some(line)) = lines.next_line().await {
        tracing::info!(task_id = %task_id, stream = name, "{line}");
        if keep > 0 {
            tail_len += line.len() + 1;
            tail.push_back(line);
            while tail_len > keep && tail.len() > 1 {
                tail_len -= tail.pop_front().map_or(0, |l| l.len() + 1);
            }
        }
    }
    let mut text = tail.into_iter().collect::<Vec<_>>().join("\n");
    if text.len() > keep {
        let mut cut = text.len() - keep;
        while !text.is_char_boundary(cut) {
            cut += 1;
        }
        text = text[cut..].to_string();
    }
    text
}

/// The handler's result JSON, if it wrote a valid one of at most 1 MiB.
fn read_result(path: &PathBuf, task_id: &str) -> Option<serde_json::Value> {
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

//! Builtin handlers: `noop` succeeds at once; `sleep` sleeps
//! `{"seconds": N}` (for demos, tests and benchmarks).

use std::time::Duration;

use crate::handler::{Failure, Outcome, RunContext};
use crate::task::Task;

/// The builtins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Builtin {
    /// Succeeds at once.
    Noop,
    /// Sleeps `{"seconds": N}`; stops early (interrupted) at shutdown.
    Sleep,
}

#[derive(serde::Deserialize)]
struct SleepInput {
    seconds: f64,
}

impl Builtin {
    /// The builtin called `name`.
    pub fn from_name(name: &str) -> Option<Builtin> {
        match name {
            "noop" => Some(Builtin::Noop),
            "sleep" => Some(Builtin::Sleep),
            _ => None,
        }
    }

    /// Runs the task.
    pub async fn run(&self, task: &Task, ctx: &RunContext) -> Outcome {
        match self {
            Builtin::Noop => Outcome::Succeeded { result: None },
            Builtin::Sleep => {
                let seconds = match serde_json::from_slice::<SleepInput>(&task.data) {
                    Ok(input) if input.seconds.is_finite() && input.seconds >= 0.0 => input.seconds,
                    Ok(_) => return bad_input("seconds must be a finite number >= 0".into()),
                    Err(e) => {
                        return bad_input(format!("sleep expects JSON {{\"seconds\": N}}: {e}"));
                    }
                };
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs_f64(seconds)) => Outcome::Succeeded {
                        result: Some(serde_json::json!({ "slept_seconds": seconds })),
                    },
                    _ = ctx.stop.cancelled() => Outcome::Failed {
                        failure: Failure::Interrupted,
                        stderr_tail: String::new(),
                    },
                }
            }
        }
    }
}

fn bad_input(message: String) -> Outcome {
    Outcome::Failed {
        failure: Failure::BadInput(message),
        stderr_tail: String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::Task;

    fn task(data: &str) -> Task {
        Task::decode(
            "m".into(),
            [("kind".to_string(), "sleep".to_string())].into(),
            data.as_bytes().to_vec(),
            1,
            None,
        )
        .unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn sleep_sleeps_the_given_seconds() {
        let start = tokio::time::Instant::now();
        let out = Builtin::Sleep
            .run(&task(r#"{"seconds": 90}"#), &RunContext::default())
            .await;
        assert!(matches!(out, Outcome::Succeeded { .. }));
        assert_eq!(start.elapsed(), Duration::from_secs(90));
    }

    #[tokio::test(start_paused = true)]
    async fn sleep_is_interrupted_by_stop() {
        let ctx = RunContext::default();
        ctx.stop.cancel();
        let out = Builtin::Sleep.run(&task(r#"{"seconds": 90}"#), &ctx).await;
        assert!(matches!(
            out,
            Outcome::Failed {
                failure: Failure::Interrupted,
                ..
            }
        ));
    }

    #[tokio::test]
    async fn bad_sleep_input_is_a_permanent_failure() {
        for data in ["", "{}", r#"{"seconds": -1}"#, r#""ten""#] {
            let out = Builtin::Sleep
                .run(&task(data), &RunContext::default())
                .await;
            match out {
                Outcome::Failed { failure, .. } => assert!(failure.is_permanent(), "{data}"),
                other => panic!("{data}: {other:?}"),
            }
        }
    }
}

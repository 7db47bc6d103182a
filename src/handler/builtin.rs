//! Builtin handlers, for demos, tests, benchmarks and for checking a
//! deployment end to end: `noop` succeeds at once; `sleep` sleeps
//! `{"seconds": N}`; `fail` always fails (retryably, or for good with
//! `{"permanent": true}`), to exercise retries, dead letters and alerts.
//!
//! A new builtin is one variant here and its arm in [`Builtin::run`]: the
//! configuration names it (`builtin = "NAME"`) through serde.

use std::time::Duration;

use crate::handler::{Failure, Outcome, RunContext};
use crate::task::Task;

/// The builtins, as `handlers.KIND.builtin` names them.
// `unsafe_derive_deserialize` sees the unsafe inside `tokio::select!` in
// `run`; deserialising a fieldless enum cannot break an invariant.
#[allow(clippy::unsafe_derive_deserialize)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Builtin {
    /// Succeeds at once.
    Noop,
    /// Sleeps `{"seconds": N}`; stops early (interrupted) at shutdown.
    Sleep,
    /// Fails: retryably, or for good when the data is `{"permanent": true}`.
    Fail,
    /// Panics: a stand-in for a bug, so tests can show a panic is contained.
    #[cfg(test)]
    Panic,
}

#[derive(serde::Deserialize)]
struct SleepInput {
    seconds: f64,
}

#[derive(serde::Deserialize, Default)]
struct FailInput {
    #[serde(default)]
    permanent: bool,
}

impl Builtin {
    /// Runs the task.
    pub async fn run(&self, task: &Task, ctx: &RunContext) -> Outcome {
        match self {
            Builtin::Noop => Outcome::Succeeded { result: None },
            Builtin::Sleep => {
                let seconds = match serde_json::from_slice::<SleepInput>(&task.data) {
                    Ok(input) => input.seconds,
                    Err(e) => {
                        return bad_input(format!("sleep expects JSON {{\"seconds\": N}}: {e}"));
                    }
                };
                // NaN, negative, infinite, or more seconds than a Duration holds.
                let Ok(duration) = Duration::try_from_secs_f64(seconds) else {
                    return bad_input(format!(
                        "seconds must be a number from 0 to about 1.8e19, not {seconds}"
                    ));
                };
                tokio::select! {
                    () = tokio::time::sleep(duration) => Outcome::Succeeded {
                        result: Some(serde_json::json!({ "slept_seconds": seconds })),
                    },
                    () = ctx.stop.cancelled() => Outcome::Failed {
                        failure: Failure::Interrupted,
                        stderr_tail: String::new(),
                    },
                }
            }
            Builtin::Fail => {
                let input: FailInput = serde_json::from_slice(&task.data).unwrap_or_default();
                let failure = if input.permanent {
                    Failure::BadInput("the fail builtin was asked to fail for good".into())
                } else {
                    Failure::Exit {
                        code: 1,
                        permanent: false,
                    }
                };
                Outcome::Failed {
                    failure,
                    stderr_tail: "the fail builtin always fails".into(),
                }
            }
            #[cfg(test)]
            Builtin::Panic => panic!("the panic builtin panics"),
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
    async fn fail_fails_retryably_unless_asked_to_fail_for_good() {
        for (data, permanent) in [("", false), ("{}", false), (r#"{"permanent": true}"#, true)] {
            match Builtin::Fail.run(&task(data), &RunContext::default()).await {
                Outcome::Failed { failure, .. } => {
                    assert_eq!(failure.is_permanent(), permanent, "{data}");
                }
                other @ Outcome::Succeeded { .. } => panic!("{data}: {other:?}"),
            }
        }
    }

    #[test]
    fn builtins_are_named_in_lowercase_by_the_configuration() {
        #[derive(serde::Deserialize)]
        struct T {
            builtin: Builtin,
        }
        let t: T = toml::from_str("builtin = \"sleep\"").unwrap();
        assert_eq!(t.builtin, Builtin::Sleep);
        let err = toml::from_str::<T>("builtin = \"dance\"").err().unwrap();
        assert!(err.to_string().contains("noop"), "{err}");
    }

    #[tokio::test]
    async fn bad_sleep_input_is_a_permanent_failure() {
        for data in [
            "",
            "{}",
            r#"{"seconds": -1}"#,
            r#""ten""#,
            r#"{"seconds": 1e20}"#,
            r#"{"seconds": "5"}"#,
        ] {
            let out = Builtin::Sleep
                .run(&task(data), &RunContext::default())
                .await;
            match out {
                Outcome::Failed { failure, .. } => assert!(failure.is_permanent(), "{data}"),
                other @ Outcome::Succeeded { .. } => panic!("{data}: {other:?}"),
            }
        }
    }
}

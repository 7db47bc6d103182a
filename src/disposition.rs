//! What happens to a message once its task ended: a typed decision.

use std::time::Duration;

use crate::config::RetryConfig;
use crate::handler::{Failure, Outcome};
use crate::task::Task;

/// The fate of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    /// Done: acknowledge.
    Ack,
    /// Retry: the message comes back after `after` (`ModifyAckDeadline`), like
    /// a Kubernetes Job restarting a failed pod with backoff.
    Retry {
        /// The backoff of this attempt.
        after: Duration,
    },
    /// Give up: publish to the dead-letter topic with `reason`, then ack.
    DeadLetter {
        /// Why, for `leasehold_error`.
        reason: String,
    },
    /// Not this worker's to finish (shutdown): hand it back now.
    Release,
    /// The lease was lost: send nothing; another worker has the message.
    LeaseLost,
}

impl Disposition {
    /// The outcome name of result events and of
    /// `leasehold_tasks_finished_total{outcome}`.
    pub fn label(&self) -> &'static str {
        match self {
            Disposition::Ack => "succeeded",
            Disposition::Retry { .. } => "retrying",
            Disposition::DeadLetter { .. } => "dead_lettered",
            Disposition::Release => "released",
            Disposition::LeaseLost => "lease_lost",
        }
    }
}

/// The backoff before attempt `attempt + 1`:
/// `min(min_backoff × 2^(attempt-1), max_backoff)`.
pub fn backoff(attempt: u32, retry: &RetryConfig) -> Duration {
    let exp = attempt.saturating_sub(1).min(31);
    retry
        .min_backoff
        .checked_mul(1u32 << exp)
        .unwrap_or(retry.max_backoff)
        .min(retry.max_backoff)
}

/// Which attempt of a task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempt {
    /// Failed attempts before this one + 1.
    pub number: u32,
    /// Whether Pub/Sub counts deliveries (a dead-letter policy is set). If it
    /// does not, retries cannot be counted, so a failure is not retried.
    pub counted: bool,
}

impl From<&Task> for Attempt {
    fn from(task: &Task) -> Attempt {
        Attempt {
            number: task.attempt,
            counted: task.attempts_known,
        }
    }
}

/// Decides the disposition of `attempt` that ended with `outcome`.
pub fn decide(outcome: &Outcome, attempt: Attempt, retry: &RetryConfig) -> Disposition {
    let Attempt {
        number: attempt,
        counted,
    } = attempt;
    match outcome {
        Outcome::Succeeded { .. } => Disposition::Ack,
        Outcome::Failed {
            failure: Failure::Interrupted,
            ..
        } => Disposition::Release,
        Outcome::Failed {
            failure: Failure::LeaseLost,
            ..
        } => Disposition::LeaseLost,
        Outcome::Failed { failure, .. } if failure.is_permanent() => Disposition::DeadLetter {
            reason: failure.to_string(),
        },
        Outcome::Failed { failure, .. } if attempt >= retry.max_attempts => {
            Disposition::DeadLetter {
                reason: format!("{failure}; gave up after {attempt} attempts"),
            }
        }
        Outcome::Failed { failure, .. } if !counted => Disposition::DeadLetter {
            reason: format!(
                "{failure}; not retried: the message carries no delivery attempt (its \
                 subscription has no dead-letter policy; run `leasehold setup`), so retries \
                 could not be counted and would never end"
            ),
        },
        Outcome::Failed { .. } => Disposition::Retry {
            after: backoff(attempt, retry),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn retry() -> RetryConfig {
        RetryConfig {
            max_attempts: 6,
            min_backoff: Duration::from_secs(10),
            max_backoff: Duration::from_secs(360),
        }
    }

    fn counted(number: u32) -> Attempt {
        Attempt {
            number,
            counted: true,
        }
    }

    #[test]
    fn without_a_delivery_count_a_failure_is_dead_lettered_at_once_with_why() {
        let uncounted = Attempt {
            number: 1,
            counted: false,
        };
        let exit = failed(Failure::Exit {
            code: 3,
            permanent: false,
        });
        assert!(matches!(
            decide(&exit, uncounted, &retry()),
            Disposition::DeadLetter { reason } if reason.contains("no delivery attempt")
        ));
        // Success and interruption do not depend on the count.
        assert_eq!(
            decide(&Outcome::Succeeded { result: None }, uncounted, &retry()),
            Disposition::Ack
        );
        assert_eq!(
            decide(&failed(Failure::Interrupted), uncounted, &retry()),
            Disposition::Release
        );
    }

    fn failed(failure: Failure) -> Outcome {
        Outcome::Failed {
            failure,
            stderr_tail: String::new(),
        }
    }

    #[test]
    fn backoff_doubles_like_a_kubernetes_job_and_is_capped() {
        let got: Vec<u64> = (1..=8).map(|a| backoff(a, &retry()).as_secs()).collect();
        assert_eq!(got, vec![10, 20, 40, 80, 160, 320, 360, 360]);
        assert_eq!(backoff(1000, &retry()).as_secs(), 360);
    }

    #[test]
    fn decisions_table() {
        let exit = |code, permanent| failed(Failure::Exit { code, permanent });
        let cases: Vec<(Outcome, u32, Disposition)> = vec![
            (Outcome::Succeeded { result: None }, 1, Disposition::Ack),
            (Outcome::Succeeded { result: None }, 9, Disposition::Ack),
            (
                exit(1, false),
                1,
                Disposition::Retry {
                    after: Duration::from_secs(10),
                },
            ),
            (
                exit(1, false),
                3,
                Disposition::Retry {
                    after: Duration::from_secs(40),
                },
            ),
            (
                failed(Failure::Signal(9)),
                2,
                Disposition::Retry {
                    after: Duration::from_secs(20),
                },
            ),
            (
                failed(Failure::Timeout(Duration::from_secs(5))),
                1,
                Disposition::Retry {
                    after: Duration::from_secs(10),
                },
            ),
            (
                failed(Failure::Spawn("x".into())),
                1,
                Disposition::Retry {
                    after: Duration::from_secs(10),
                },
            ),
            (failed(Failure::Interrupted), 6, Disposition::Release),
            (failed(Failure::LeaseLost), 6, Disposition::LeaseLost),
            (
                failed(Failure::PastMaxLease(Duration::from_secs(60))),
                2,
                Disposition::Retry {
                    after: Duration::from_secs(20),
                },
            ),
            (
                failed(Failure::Panicked("x".into())),
                1,
                Disposition::Retry {
                    after: Duration::from_secs(10),
                },
            ),
        ];
        for (outcome, attempt, want) in cases {
            assert_eq!(
                decide(&outcome, counted(attempt), &retry()),
                want,
                "{outcome:?} at {attempt}"
            );
        }
        assert!(matches!(
            decide(&exit(65, true), counted(1), &retry()),
            Disposition::DeadLetter { reason } if reason.contains("65") && reason.contains("permanent")
        ));
        assert!(matches!(
            decide(&exit(1, false), counted(6), &retry()),
            Disposition::DeadLetter { reason } if reason.contains("after 6 attempts")
        ));
        assert!(matches!(
            decide(
                &failed(Failure::BadInput("no".into())),
                counted(1),
                &retry()
            ),
            Disposition::DeadLetter { .. }
        ));
    }
}

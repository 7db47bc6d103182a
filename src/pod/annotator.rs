//! The annotator: watches the work in progress and patches the pod's
//! annotations on each busy/idle change, and while busy at most once a
//! minute (the cost grows with the task time). A failed patch is warned once
//! per run of failures and tried again on the next change or a minute
//! later; tasks never wait for it.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::PodState;
use super::patcher::{PatchError, PodPatcher};
use super::work::WorkInProgress;

/// At most one patch this often, however fast tasks start and end: a flood
/// of short tasks must not flood the API server. A change waits at most this.
const MIN_GAP: Duration = Duration::from_secs(1);
/// While busy, the growing cost is patched this often; a failed patch is
/// retried this often.
const REFRESH: Duration = Duration::from_secs(60);
/// One patch may take this long; then it counts as failed.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Keeps the pod's annotations in step with the work in progress.
pub struct Annotator {
    patcher: Arc<dyn PodPatcher>,
    work: Arc<WorkInProgress>,
    /// `namespace/name`, for the log.
    pod: String,
}

/// The last patch tried.
#[derive(Debug, Clone, Copy)]
struct Sent {
    state: PodState,
    at: Instant,
    ok: bool,
}

impl Annotator {
    /// The annotator of `pod` through `patcher`, for `work`.
    pub fn new(patcher: Arc<dyn PodPatcher>, work: Arc<WorkInProgress>, pod: String) -> Annotator {
        Annotator { patcher, work, pod }
    }

    /// Patches at once (the pod starts idle), then as [`next_patch`] says,
    /// until `stop` is cancelled.
    pub async fn run(self, stop: CancellationToken) {
        let mut changes = self.work.subscribe();
        let mut last: Option<Sent> = None;
        let mut failing = false;
        loop {
            // Read the state only after marking it seen, so that a change
            // made while we patch wakes the next wait.
            changes.mark_unchanged();
            let state = self.work.state();
            let now = Instant::now();
            let due = next_patch(last.as_ref(), state, now);
            if due.is_some_and(|at| at <= now) {
                let Some(ok) = self.patch(state, &stop, &mut failing).await else {
                    return;
                };
                last = Some(Sent { state, at: now, ok });
                continue;
            }
            let wait = async {
                match due {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                () = stop.cancelled() => return,
                // The sender lives in `work`, which we hold: never an error.
                Ok(()) = changes.changed() => {}
                () = wait => {}
            }
        }
    }

    /// One patch; whether it took, or `None` when stopped meanwhile. The
    /// first failure of a run of them is warned, with what it costs.
    async fn patch(
        &self,
        state: PodState,
        stop: &CancellationToken,
        failing: &mut bool,
    ) -> Option<bool> {
        let annotations = state.annotations();
        let call = tokio::time::timeout(CALL_TIMEOUT, self.patcher.patch_annotations(&annotations));
        let result = tokio::select! {
            biased;
            () = stop.cancelled() => return None,
            result = call => result.unwrap_or_else(|_| Err(PatchError::Unavailable(format!(
                "no answer in {}", humantime::format_duration(CALL_TIMEOUT))))),
        };
        let pod = &self.pod;
        match result {
            Ok(()) => {
                if std::mem::take(failing) {
                    tracing::info!(%pod, "the pod's annotations are accepted again");
                }
                tracing::debug!(%pod, busy = state.busy, deletion_cost = state.cost, "pod annotated");
                Some(true)
            }
            Err(error) if *failing => {
                tracing::debug!(%pod, %error, "the pod's annotations are still refused");
                Some(false)
            }
            Err(error) => {
                *failing = true;
                match &error {
                    PatchError::Refused { .. } => tracing::warn!(%pod, %error,
                        "cannot annotate this pod: scale-in and the cluster autoscaler may pick it \
                         while it runs a task (the worker needs patch on pods, as \
                         manifests/base/rbac.yaml grants); tasks are not affected, and the \
                         worker keeps trying quietly"),
                    PatchError::Unavailable(_) => tracing::warn!(%pod, %error,
                        "cannot annotate this pod for now: scale-in may pick it while it runs \
                         a task; tasks are not affected, and the worker keeps trying quietly"),
                }
                Some(false)
            }
        }
    }
}

/// When the next patch is due, given the last one tried and the state now;
/// `None`: not until the state changes.
///
/// - never patched: now;
/// - busy became idle or idle busy: now, but not within [`MIN_GAP`] of the last;
/// - the last one failed: [`REFRESH`] after it;
/// - busy: [`REFRESH`] after the last (the cost grows with the task time).
fn next_patch(last: Option<&Sent>, state: PodState, now: Instant) -> Option<Instant> {
    let Some(last) = last else {
        return Some(now);
    };
    if state.busy != last.state.busy {
        return Some((last.at + MIN_GAP).max(now));
    }
    if !last.ok || state.busy {
        return Some(last.at + REFRESH);
    }
    None
}

#[cfg(test)]
mod tests;

//! Busy pods are the last to go: the worker keeps two annotations on its own
//! pod, so that scale-in (the `ReplicaSet` controller) and the cluster
//! autoscaler choose idle pods first.
//!
//! - `controller.kubernetes.io/pod-deletion-cost`: `0` when idle (the value
//!   of a pod without the annotation), and when busy the seconds of task
//!   time running now, summed over the pod's tasks (at least 1): a pod
//!   three hours into a render is dearer than one a minute into it.
//! - `cluster-autoscaler.kubernetes.io/safe-to-evict`: `"false"` while a
//!   task runs, `"true"` when idle.
//!
//! Layout: [`WorkInProgress`] (`pod/work.rs`) is what the dispatcher says is
//! running; the [`Annotator`] (`pod/annotator.rs`) turns it into patches on
//! its own clock; the Kubernetes API sits behind the narrow [`PodPatcher`]
//! trait (`pod/patcher.rs`), with the `kube` client in `pod/cluster.rs`.
//! All of it is best effort: without a cluster, or when the API refuses, the
//! worker warns once and runs its tasks as before.

mod annotator;
mod cluster;
mod patcher;
mod work;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::Environment;

pub use annotator::Annotator;
pub use cluster::{KubePatcher, PodRef, from_environment};
pub use patcher::{PatchError, PodPatcher};
pub use work::{WorkInProgress, Working};

/// Starts annotating this worker's own pod until `stop`, when it runs in one
/// whose API it can reach (see [`from_environment`]); `None` otherwise.
pub async fn annotate(
    env: &Environment,
    work: &Arc<WorkInProgress>,
    stop: CancellationToken,
) -> Option<JoinHandle<()>> {
    let (pod, patcher) = from_environment(env).await?;
    tracing::info!(%pod, "annotating this pod busy or idle ({DELETION_COST}, {SAFE_TO_EVICT})");
    let annotator = Annotator::new(Arc::new(patcher), work.clone(), pod.to_string());
    Some(tokio::spawn(annotator.run(stop)))
}

/// The annotation `ReplicaSet` scale-in reads: lower costs are deleted first.
pub const DELETION_COST: &str = "controller.kubernetes.io/pod-deletion-cost";
/// The annotation the cluster autoscaler reads before draining a node.
pub const SAFE_TO_EVICT: &str = "cluster-autoscaler.kubernetes.io/safe-to-evict";

/// The deletion cost of an idle pod: Kubernetes' default, so an idle pod
/// weighs what a pod without the annotation does.
pub const IDLE_COST: i32 = 0;

/// What the pod's annotations say: whether a task runs, and what deleting
/// the pod would cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodState {
    /// At least one task runs.
    pub busy: bool,
    /// The `pod-deletion-cost`.
    pub cost: i32,
}

impl PodState {
    /// The state of a pod running `tasks` tasks that have run `task_time`
    /// in all. A busy pod costs at least 1, more than any idle pod; the cost
    /// is whole seconds, clamped to the annotation's int32.
    pub fn of(tasks: usize, task_time: Duration) -> PodState {
        if tasks == 0 {
            return PodState {
                busy: false,
                cost: IDLE_COST,
            };
        }
        let seconds = i32::try_from(task_time.as_secs()).unwrap_or(i32::MAX);
        PodState {
            busy: true,
            cost: seconds.max(IDLE_COST + 1),
        }
    }

    /// The two annotations, as the patch sends them.
    pub fn annotations(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (DELETION_COST.to_string(), self.cost.to_string()),
            (SAFE_TO_EVICT.to_string(), (!self.busy).to_string()),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_is_cheaper_than_any_busy_pod_and_busy_grows_with_task_time() {
        let idle = PodState::of(0, Duration::ZERO);
        let cases = [
            (0, Duration::from_secs(500), false, 0),
            (1, Duration::ZERO, true, 1),
            (1, Duration::from_millis(999), true, 1),
            (1, Duration::from_secs(90), true, 90),
            (3, Duration::from_secs(3 * 3600), true, 10_800),
            (2, Duration::from_secs(u64::MAX / 2), true, i32::MAX),
        ];
        for (tasks, time, busy, cost) in cases {
            let state = PodState::of(tasks, time);
            assert_eq!(state, PodState { busy, cost }, "{tasks} tasks, {time:?}");
            if busy {
                assert!(state.cost > idle.cost);
            }
        }
    }

    #[test]
    fn annotations_are_strings() {
        let busy = PodState::of(1, Duration::from_secs(42)).annotations();
        assert_eq!(busy[DELETION_COST], "42");
        assert_eq!(busy[SAFE_TO_EVICT], "false");
        assert_eq!(busy.len(), 2);
        let idle = PodState::of(0, Duration::ZERO).annotations();
        assert_eq!(idle[DELETION_COST], "0");
        assert_eq!(idle[SAFE_TO_EVICT], "true");
    }
}

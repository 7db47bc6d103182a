//! What runs now, as the pod annotations see it: the dispatcher holds a
//! [`Working`] guard for each task's run, the annotator watches the tally.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::PodState;

/// The tasks running in this worker, shared by the dispatchers (which start
/// and end them) and the annotator (which watches).
#[derive(Debug)]
pub struct WorkInProgress {
    /// Start times are kept as offsets from here, so the tally is two numbers.
    origin: Instant,
    /// Every start and end is a change the annotator wakes up for.
    tally: watch::Sender<Tally>,
}

/// Running tasks and the sum of their start offsets: their task time at
/// `now` is `tasks × (now − origin) − started`, whatever their number.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Tally {
    tasks: u32,
    started: Duration,
}

impl WorkInProgress {
    /// Nothing running yet.
    pub fn new() -> Arc<WorkInProgress> {
        Arc::new(WorkInProgress {
            origin: Instant::now(),
            tally: watch::Sender::new(Tally::default()),
        })
    }

    /// A task starts; it counts as running until the guard is dropped,
    /// however its run ends (a panic unwinding included).
    pub fn start(self: &Arc<Self>) -> Working {
        let offset = self.origin.elapsed();
        self.tally.send_modify(|t| {
            t.tasks += 1;
            t.started += offset;
        });
        Working {
            work: self.clone(),
            offset,
        }
    }

    /// The pod's state now.
    pub fn state(&self) -> PodState {
        let now = self.origin.elapsed();
        let tally = *self.tally.borrow();
        let total = now
            .checked_mul(tally.tasks)
            .unwrap_or(Duration::MAX)
            .saturating_sub(tally.started);
        PodState::of(tally.tasks as usize, total)
    }

    /// A receiver that sees every start and end.
    pub(super) fn subscribe(&self) -> watch::Receiver<Tally> {
        self.tally.subscribe()
    }
}

/// One running task, counted while this lives.
#[derive(Debug)]
pub struct Working {
    work: Arc<WorkInProgress>,
    /// When it started, from the origin.
    offset: Duration,
}

impl Drop for Working {
    fn drop(&mut self) {
        self.work.tally.send_modify(|t| {
            t.tasks -= 1;
            t.started -= self.offset;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn task_time_is_summed_over_running_tasks() {
        let work = WorkInProgress::new();
        assert_eq!(work.state(), PodState::of(0, Duration::ZERO));
        tokio::time::advance(Duration::from_secs(100)).await;
        let first = work.start();
        tokio::time::advance(Duration::from_secs(30)).await;
        let second = work.start();
        tokio::time::advance(Duration::from_secs(10)).await;
        // 40 s + 10 s.
        assert_eq!(
            work.state(),
            PodState {
                busy: true,
                cost: 50
            }
        );
        drop(first);
        assert_eq!(
            work.state(),
            PodState {
                busy: true,
                cost: 10
            }
        );
        drop(second);
        assert_eq!(work.state(), PodState::of(0, Duration::ZERO));
    }

    #[tokio::test(start_paused = true)]
    async fn a_panicking_run_is_not_counted_after_it_unwinds() {
        let work = WorkInProgress::new();
        let w = work.clone();
        let run = tokio::spawn(async move {
            let _working = w.start();
            panic!("the handler panicked");
        });
        assert!(run.await.is_err());
        assert!(!work.state().busy);
    }
}

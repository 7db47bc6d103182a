//! The worker's health, as the probes and Job mode read it: whether each
//! executor's pulls succeed (readiness), when a message last arrived (Job
//! mode's idle clock), and whether the worker is stopping or broken.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

/// What one executor's pull loops report.
#[derive(Debug)]
pub struct Activity {
    /// The last Pull succeeded (readiness).
    pull_ok: AtomicBool,
    /// The credentials gave up for good: only a restart helps (liveness).
    credentials_lost: AtomicBool,
    /// When a Pull last returned a message (Job mode's idle clock). A std
    /// Mutex: held for a load or a store, never across an await.
    last_message: Mutex<Instant>,
}

impl Activity {
    /// Fresh state: not ready, idle clock starting now.
    pub fn new() -> Self {
        Activity {
            pull_ok: AtomicBool::new(false),
            credentials_lost: AtomicBool::new(false),
            last_message: Mutex::new(Instant::now()),
        }
    }

    /// Records how the last Pull went.
    pub fn pulled(&self, ok: bool) {
        self.pull_ok.store(ok, Ordering::Relaxed);
    }

    /// Records that the credentials refused for good (see `RpcError`).
    pub fn lost_credentials(&self) {
        self.credentials_lost.store(true, Ordering::Relaxed);
    }

    /// Records that a Pull brought messages now.
    pub fn received(&self) {
        *self.last_message.lock().expect("activity lock") = Instant::now();
    }

    /// Whether the last Pull succeeded.
    pub fn pull_ok(&self) -> bool {
        self.pull_ok.load(Ordering::Relaxed)
    }

    /// How long since a message was last pulled.
    pub fn idle_for(&self) -> Duration {
        self.last_message.lock().expect("activity lock").elapsed()
    }
}

impl Default for Activity {
    fn default() -> Self {
        Self::new()
    }
}

/// What the probes read.
#[derive(Debug, Default)]
pub struct Health {
    /// One per executor.
    activities: Mutex<Vec<Arc<Activity>>>,
    /// Set at SIGTERM: not ready any more, so no new traffic is expected.
    stopping: AtomicBool,
    /// Set when a loop that must run until shutdown ended: restart me.
    broken: AtomicBool,
    /// When Job mode last saw a task running (`worker::wait_idle` marks it).
    last_busy: Mutex<Option<Instant>>,
}

impl Health {
    /// A new executor's activity, watched from now on.
    pub fn watch(&self) -> Arc<Activity> {
        let activity = Arc::new(Activity::new());
        self.activities
            .lock()
            .expect("health lock")
            .push(activity.clone());
        activity
    }

    /// Readiness, with the reason when not ready.
    pub fn ready(&self) -> Result<(), &'static str> {
        if self.stopping.load(Ordering::Relaxed) {
            return Err("shutting down");
        }
        let activities = self.activities.lock().expect("health lock");
        if activities.is_empty() {
            return Err("starting");
        }
        if activities.iter().all(|a| a.pull_ok()) {
            Ok(())
        } else {
            Err("Pub/Sub is not answering Pull (or has not yet)")
        }
    }

    /// Liveness: false once a loop that must run until shutdown has ended,
    /// or the credentials gave up for good.
    pub fn alive(&self) -> bool {
        !self.broken.load(Ordering::Relaxed)
            && !self
                .activities
                .lock()
                .expect("health lock")
                .iter()
                .any(|a| a.credentials_lost.load(Ordering::Relaxed))
    }

    /// The worker is stopping: readiness goes off for good.
    pub fn set_stopping(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    /// A loop ended that should not have: liveness goes off for good.
    pub fn set_broken(&self) {
        self.broken.store(true, Ordering::Relaxed);
    }

    /// A task is running now: Job mode's idle clock starts again.
    pub fn busy(&self) {
        *self.last_busy.lock().expect("health lock") = Some(Instant::now());
    }

    /// Job mode's idle clock: how long since any executor last pulled a
    /// message and since a task was last seen running.
    pub fn idle_for(&self) -> Duration {
        let pulled = self
            .activities
            .lock()
            .expect("health lock")
            .iter()
            .map(|a| a.idle_for())
            .min()
            .unwrap_or_default();
        match *self.last_busy.lock().expect("health lock") {
            Some(busy) => pulled.min(busy.elapsed()),
            None => pulled,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_once_every_executor_pulled_and_until_stopping() {
        let h = Health::default();
        assert_eq!(h.ready(), Err("starting"));
        let (a, b) = (h.watch(), h.watch());
        a.pulled(true);
        assert!(h.ready().is_err(), "one executor has not pulled yet");
        b.pulled(true);
        assert_eq!(h.ready(), Ok(()));
        b.pulled(false);
        assert!(h.ready().is_err());
        b.pulled(true);
        h.set_stopping();
        assert_eq!(h.ready(), Err("shutting down"));
        assert!(h.alive());
        h.set_broken();
        assert!(!h.alive());
        let h = Health::default();
        h.watch().lost_credentials();
        assert!(!h.alive(), "fresh credentials need a restart");
    }

    #[tokio::test(start_paused = true)]
    async fn the_idle_clock_restarts_on_a_message_and_on_a_running_task() {
        let h = Health::default();
        let a = h.watch();
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(h.idle_for(), Duration::from_secs(10));
        h.busy();
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(h.idle_for(), Duration::from_secs(3), "a task ran 3 s ago");
        a.received();
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(
            h.idle_for(),
            Duration::from_secs(1),
            "a message came 1 s ago"
        );
    }
}

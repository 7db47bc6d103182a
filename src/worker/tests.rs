//! Whole message lives through the real Puller → Dispatcher → `LeaseLoop`, on
//! a fake data plane and a fake publisher, in paused time: hours of task
//! time run in milliseconds. The black-box tests in `tests/` prove the wire.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::dead_letter::ERROR_ATTRIBUTE;
use crate::puller::IDLE_TICK;
use crate::testing::{Call, FakeDataPlane, FakePublisher, message};

const SEC: Duration = Duration::from_secs(1);

/// A running worker on fakes.
struct Worker {
    dp: Arc<FakeDataPlane>,
    publisher: Arc<FakePublisher>,
    metrics: Metrics,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), WorkerError>>,
    started: Instant,
}

const BASE: &str = r#"
[pubsub]
project = "p"
results_topic = "results"
dead_letter_topic = "dead"
ack_deadline = "10s"
[lease]
extension = "60s"
[retry]
max_attempts = 3
min_backoff = "10s"
max_backoff = "1m"
[executors.cpu]
slots = 2
[handlers.fail]
executor = "cpu"
builtin = "fail"
[http]
listen = "127.0.0.1:0"
[shutdown]
grace = "5s"
kill_grace = "1s"
"#;

fn start(extra: &str) -> Worker {
    start_with(extra, None)
}

/// [`start`], in Job mode when `exit_when_idle` is given.
fn start_with(extra: &str, exit_when_idle: Option<Duration>) -> Worker {
    let dir = tempfile::tempdir().unwrap();
    let (base, layer) = (dir.path().join("base.toml"), dir.path().join("test.toml"));
    std::fs::write(&base, BASE).unwrap();
    std::fs::write(&layer, extra).unwrap();
    let config = Config::load(&[base, layer], &Environment::default()).unwrap();
    let dp = Arc::new(FakeDataPlane::default());
    let publisher = Arc::new(FakePublisher::default());
    let metrics = Metrics::new();
    let stop = CancellationToken::new();
    let clients = Clients {
        data_plane: dp.clone(),
        publisher: publisher.clone(),
    };
    let options = RunOptions {
        metrics: Some(metrics.clone()),
        exit_when_idle,
    };
    let worker = tokio::spawn(run_with(
        config,
        Environment::from_pairs([("HOSTNAME", "pod-1")]),
        options,
        clients,
        stop.clone().cancelled_owned(),
    ));
    Worker {
        dp,
        publisher,
        metrics,
        stop,
        task: worker,
        started: Instant::now(),
    }
}

impl Worker {
    /// Waits (in paused time) until `done`, at most an hour of virtual time.
    async fn until(&self, what: &str, done: impl Fn(&Worker) -> bool) {
        let give_up = Instant::now() + 3600 * SEC;
        while !done(self) {
            assert!(Instant::now() < give_up, "never happened: {what}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Every call but Pulls, with its time since start.
    fn rpcs(&self) -> Vec<(u64, Call)> {
        self.dp
            .calls()
            .into_iter()
            .filter(|(_, c)| !matches!(c, Call::Pull { .. }))
            .map(|(t, c)| ((t - self.started).as_secs(), c))
            .collect()
    }

    fn acked(&self, ack_id: &str) -> bool {
        self.rpcs()
            .iter()
            .any(|(_, c)| matches!(c, Call::Ack { ids } if ids.iter().any(|i| i == ack_id)))
    }

    fn outcomes(&self) -> Vec<String> {
        self.publisher
            .on("results")
            .iter()
            .map(|m| m.attributes["outcome"].clone())
            .collect()
    }

    async fn stop(mut self) -> Self {
        self.stop.cancel();
        (&mut self.task).await.unwrap().unwrap();
        self
    }

    fn gauge(&self, name: &str) -> i64 {
        match name {
            "in_progress" => self
                .metrics
                .tasks_in_progress
                .with_label_values(&["cpu"])
                .get(),
            "leases" => self
                .metrics
                .leases_held
                .with_label_values(&["leasehold-tasks-cpu"])
                .get(),
            _ => unreachable!(),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_long_task_is_pulled_extended_and_acked_once() {
    let w = start("");
    w.dp.push(message("t1", Some("sleep"), r#"{"seconds": 100}"#));
    w.until("the ack", |w| w.acked("t1#1")).await;
    let rpcs = w.rpcs();
    let extensions: Vec<u64> = rpcs
        .iter()
        .filter_map(|(t, c)| matches!(c, Call::Modify { seconds: 60, .. }).then_some(*t))
        .collect();
    // First two thirds into the 10 s first deadline, then every 40 s.
    assert_eq!(extensions, vec![6, 46, 86], "{rpcs:?}");
    assert_eq!(w.dp.outstanding(), 0);
    assert_eq!(w.outcomes(), vec!["succeeded"]);
    assert_eq!(w.gauge("in_progress"), 0);
    let w = w.stop().await;
    assert_eq!(w.gauge("leases"), 0);
    assert_eq!(
        w.rpcs()
            .iter()
            .filter(|(_, c)| matches!(c, Call::Ack { .. }))
            .count(),
        1,
        "acked exactly once"
    );
}

#[tokio::test(start_paused = true)]
async fn a_failing_task_is_retried_with_backoff_then_dead_lettered() {
    let w = start("");
    w.dp.push(message("t2", Some("fail"), ""));
    w.until("the third attempt's ack", |w| w.acked("t2#3"))
        .await;
    let backoffs: Vec<i32> = w
        .rpcs()
        .iter()
        .filter_map(|(_, c)| match c {
            Call::Modify { seconds, .. } if *seconds != 60 => Some(*seconds),
            _ => None,
        })
        .collect();
    assert_eq!(
        backoffs,
        vec![10, 20],
        "Kubernetes-Job backoff between attempts"
    );
    let dead = w.publisher.on("dead");
    assert_eq!(dead.len(), 1, "dead-lettered once");
    assert!(
        dead[0].attributes[ERROR_ATTRIBUTE].contains("gave up after 3 attempts"),
        "{dead:?}"
    );
    assert_eq!(dead[0].attributes["leasehold_attempts"], "3");
    assert_eq!(w.outcomes(), vec!["retrying", "retrying", "dead_lettered"]);
    w.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_dead_letter_that_cannot_be_published_is_not_acked() {
    let w = start("");
    w.publisher.set_failing(true);
    w.dp.push(message("t3", None, "no kind"));
    w.until("the message comes back", |w| {
        w.rpcs()
            .iter()
            .any(|(_, c)| matches!(c, Call::Modify { ids, seconds: 10 } if ids[0] == "t3#1"))
    })
    .await;
    assert!(!w.acked("t3#1"), "never acked unpublished");
    w.publisher.set_failing(false);
    w.until("the second delivery is dead-lettered and acked", |w| {
        w.acked("t3#2")
    })
    .await;
    let dead = w.publisher.on("dead");
    assert_eq!(dead.len(), 1);
    assert!(dead[0].attributes[ERROR_ATTRIBUTE].contains("no `kind` attribute"));
    w.stop().await;
}

#[tokio::test(start_paused = true)]
async fn pull_errors_back_off_and_the_worker_recovers() {
    let w = start("");
    w.dp.set_pull_failing(Some(tonic::Code::Unavailable));
    tokio::time::sleep(30 * SEC).await;
    let errors = w
        .metrics
        .pull_errors
        .with_label_values(&["leasehold-tasks-cpu", "unavailable"])
        .get();
    // Two loops, backing off 0.1 s doubling to 10 s: a handful each, not hundreds.
    assert!((4..=20).contains(&errors), "{errors} pull errors in 30 s");
    w.dp.set_pull_failing(None);
    w.dp.push(message("t5", Some("noop"), ""));
    w.until("the task after the outage", |w| w.acked("t5#1"))
        .await;
    w.stop().await;
}

/// The long polls of every Pull so far.
fn long_polls(w: &Worker) -> Vec<Duration> {
    w.dp.calls()
        .into_iter()
        .filter_map(|(_, c)| match c {
            Call::Pull { long_poll, .. } => Some(long_poll),
            _ => None,
        })
        .collect()
}

#[tokio::test(start_paused = true)]
async fn outside_job_mode_every_pull_long_polls_five_seconds() {
    let w = start("");
    tokio::time::sleep(12 * SEC).await;
    let polls = long_polls(&w);
    assert!(polls.len() >= 4, "{polls:?}");
    assert!(polls.iter().all(|p| *p == 5 * SEC), "{polls:?}");
    w.stop().await;
}

/// Job mode with a 1 s idle period: the task ends at 3 s, so the idle
/// decision comes at 4 s (4.25 s at the latest, its tick), and no Pull may
/// outlive it by more than a second. With 5 s long polls the worker would
/// wait until 8 s for the Pull its freed slot started at 3 s.
#[tokio::test(start_paused = true)]
async fn job_mode_exits_within_a_second_of_its_idle_decision() {
    let mut w = start_with("", Some(SEC));
    w.dp.push(message("t1", Some("sleep"), r#"{"seconds": 3}"#));
    (&mut w.task).await.unwrap().unwrap();
    let exited = w.started.elapsed();
    assert!(w.acked("t1#1"), "{:?}", w.rpcs());
    assert!(
        exited >= 4 * SEC && exited <= 4 * SEC + IDLE_TICK + crate::puller::JOB_EXIT_BOUND,
        "exited after {exited:?}"
    );
    let polls = long_polls(&w);
    assert!(
        polls.iter().all(|p| *p <= 2 * SEC),
        "short long polls near the decision: {polls:?}"
    );
}

/// Job mode after a long task: the idle clock starts at the task's end, not
/// at its message's receipt an age ago, so the free loops keep their 5 s long
/// polls until the last seconds of the idle period.
#[tokio::test(start_paused = true)]
async fn job_mode_keeps_long_polls_until_the_idle_decision_nears() {
    let mut w = start_with("", Some(60 * SEC));
    w.dp.push(message("t1", Some("sleep"), r#"{"seconds": 300}"#));
    (&mut w.task).await.unwrap().unwrap();
    let exited = w.started.elapsed();
    assert!(
        exited >= 360 * SEC && exited <= 360 * SEC + IDLE_TICK + crate::puller::JOB_EXIT_BOUND,
        "exited after {exited:?}"
    );
    let short = long_polls(&w).iter().filter(|p| **p < 5 * SEC).count();
    // Two loops, each with a few Pulls shortened near the decision.
    assert!(short <= 8, "{short} short long polls: {:?}", long_polls(&w));
}

mod edges;

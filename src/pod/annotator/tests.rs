//! The annotator on a fake API, in paused time.

use tokio::task::JoinHandle;

use super::*;
use crate::testing::{FakePodPatcher, LogBuffer};

const IDLE: PodState = PodState {
    busy: false,
    cost: 0,
};

fn busy(cost: i32) -> PodState {
    PodState { busy: true, cost }
}

/// An annotator running on a fake API.
struct Running {
    api: Arc<FakePodPatcher>,
    work: Arc<WorkInProgress>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

fn start() -> Running {
    let api = Arc::new(FakePodPatcher::default());
    let work = WorkInProgress::new();
    let stop = CancellationToken::new();
    let annotator = Annotator::new(api.clone(), work.clone(), "work/worker-1".into());
    let task = tokio::spawn(annotator.run(stop.clone()));
    Running {
        api,
        work,
        stop,
        task,
    }
}

/// Lets paused time run on by `secs`.
async fn after(secs: f64) {
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
}

#[tokio::test(start_paused = true)]
async fn idle_busy_idle_gives_the_annotations_of_each() {
    let r = start();
    after(5.0).await;
    assert_eq!(r.api.states(), [IDLE], "patched at once, idle");
    let working = r.work.start();
    after(0.1).await;
    assert_eq!(r.api.states(), [IDLE, busy(1)], "busy at once, costing 1");
    after(30.0).await;
    drop(working);
    after(0.1).await;
    assert_eq!(r.api.states(), [IDLE, busy(1), IDLE]);
    // Idle, nothing changes: nothing more to say, however long.
    after(3600.0).await;
    assert_eq!(r.api.states().len(), 3);
    r.stop.cancel();
    r.task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn while_busy_the_cost_grows_at_most_once_a_minute() {
    let r = start();
    after(1.0).await;
    let first = r.work.start();
    after(100.0).await;
    // A second task starting is no busy/idle change: no patch of its own.
    let second = r.work.start();
    after(100.0).await;
    drop(first);
    drop(second);
    after(0.1).await;
    let patches = r.api.patches();
    let states: Vec<PodState> = patches.iter().map(|(_, s)| *s).collect();
    // Idle; busy at 1 s; refreshed at 61 s (60 s of one task), 121 s
    // (120 s + 20 s of the second) and 181 s (180 + 80); idle at 201 s.
    assert_eq!(
        states,
        [IDLE, busy(1), busy(60), busy(140), busy(260), IDLE],
        "{patches:?}"
    );
    for pair in patches[1..5].windows(2) {
        assert!(pair[1].0 - pair[0].0 >= REFRESH, "{patches:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_flood_of_short_tasks_is_at_most_one_patch_a_second() {
    let r = start();
    after(1.0).await;
    // 500 tasks of 10 ms, 10 ms apart: 1,000 busy/idle changes in 10 s.
    for _ in 0..500 {
        let working = r.work.start();
        after(0.01).await;
        drop(working);
        after(0.01).await;
    }
    after(2.0).await;
    let patches = r.api.patches();
    assert!(
        patches.len() <= 13,
        "{} patches: {patches:?}",
        patches.len()
    );
    for pair in patches.windows(2) {
        assert!(pair[1].0 - pair[0].0 >= MIN_GAP, "{patches:?}");
    }
    assert_eq!(patches.last().unwrap().1, IDLE, "ends idle: {patches:?}");
}

#[tokio::test(start_paused = true)]
async fn a_refusal_is_warned_once_and_stops_nothing() {
    let logs = LogBuffer::default();
    let _guard = tracing::subscriber::set_default(
        tracing_subscriber::fmt()
            .with_writer(logs.clone())
            .with_max_level(tracing::Level::INFO)
            .finish(),
    );
    let r = start();
    r.api.set_refusal(Some(PatchError::Refused {
        code: 403,
        reason: "Forbidden".into(),
        message: "pods \"worker-1\" is forbidden".into(),
    }));
    after(5.0).await;
    let working = r.work.start();
    after(150.0).await;
    drop(working);
    after(0.1).await;
    // Idle, busy, the retries of a failed busy patch a minute apart, idle.
    assert_eq!(
        r.api.states(),
        [IDLE, busy(1), busy(60), busy(120), IDLE],
        "still trying"
    );
    let warnings = logs.lines_with("cannot annotate");
    assert_eq!(warnings.len(), 1, "{:?}", logs.text());
    assert!(warnings[0].contains("WARN") && warnings[0].contains("403 Forbidden"));
    assert!(warnings[0].contains("work/worker-1"), "{}", warnings[0]);
    assert!(!r.task.is_finished(), "the annotator goes on");

    // RBAC fixed: the next change (a second after the last patch) is
    // accepted, and said so once.
    r.api.set_refusal(None);
    let _working = r.work.start();
    after(1.0).await;
    assert_eq!(r.api.states().last(), Some(&busy(1)));
    assert_eq!(
        logs.lines_with("accepted again").len(),
        1,
        "{}",
        logs.text()
    );
}

#[tokio::test(start_paused = true)]
async fn an_api_that_never_answers_times_out_and_is_retried() {
    struct Hanging;
    #[async_trait::async_trait]
    impl PodPatcher for Hanging {
        async fn patch_annotations(
            &self,
            _: &std::collections::BTreeMap<String, String>,
        ) -> Result<(), PatchError> {
            std::future::pending().await
        }
    }
    let work = WorkInProgress::new();
    let stop = CancellationToken::new();
    let task =
        tokio::spawn(Annotator::new(Arc::new(Hanging), work.clone(), "p".into()).run(stop.clone()));
    // Calls at 0, 60, 120, 180 and 240 s, each given up after 10 s.
    after(245.0).await;
    assert!(
        !task.is_finished(),
        "a hung call does not end the annotator"
    );
    // Stopping interrupts the call in flight.
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(1), task)
        .await
        .expect("stops at once")
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn the_schedule_table() {
    let t0 = Instant::now();
    let sent = |state, ok| Sent { state, at: t0, ok };
    let at = |secs: f64| t0 + Duration::from_secs_f64(secs);
    let cases = [
        (None, IDLE, 0.0, Some(at(0.0))),
        (Some(sent(IDLE, true)), IDLE, 500.0, None),
        (Some(sent(IDLE, true)), busy(1), 0.2, Some(at(1.0))),
        (Some(sent(IDLE, true)), busy(1), 5.0, Some(at(5.0))),
        (Some(sent(busy(1), true)), IDLE, 5.0, Some(at(5.0))),
        (Some(sent(busy(1), true)), busy(1), 0.5, Some(at(60.0))),
        (Some(sent(busy(1), true)), busy(30), 30.0, Some(at(60.0))),
        (Some(sent(IDLE, false)), IDLE, 5.0, Some(at(60.0))),
        (Some(sent(busy(5), false)), IDLE, 5.0, Some(at(5.0))),
    ];
    for (last, state, now, want) in cases {
        assert_eq!(
            next_patch(last.as_ref(), state, at(now)),
            want,
            "{last:?} then {state:?} at {now}"
        );
    }
}

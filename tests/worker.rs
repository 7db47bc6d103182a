//! The core worker against the real emulator: leases that outlive the ack
//! deadline, slot-sized pulls, and a clean SIGTERM.

mod support;

use std::time::Duration;

use leasehold::pubsub::DataPlane;
use nix::sys::signal::Signal;
use support::*;

/// A task 3.5x longer than its subscription's 10 s ack deadline runs once and
/// is acked: nothing is redelivered during or after it.
#[tokio::test(flavor = "multi_thread")]
async fn a_task_longer_than_the_ack_deadline_runs_exactly_once() {
    let runs = tempfile::NamedTempFile::new().unwrap();
    let extra = format!(
        "[executors.cpu]\nslots = 1\n{}",
        recording_handler("long", runs.path(), "cpu")
    );
    let world = World::new("long", &extra).await;
    let mut worker = world.spawn_worker("w1", &[]);
    world
        .publish(&[task("long", "long-1", r#"{"seconds": 35}"#)])
        .await;

    eventually(Duration::from_secs(70), "the 35 s task to end", || {
        events(runs.path()).iter().any(|e| e.what == "end")
    })
    .await;
    // The ack is sent; a copy redelivered while the task ran would now be
    // pulled at once by the idle worker (its slot is free again) and start.
    eventually(Duration::from_secs(10), "the ack", || {
        worker.log().contains("task succeeded")
    })
    .await;
    let ev = events(runs.path());
    let starts: Vec<_> = ev.iter().filter(|e| e.what == "start").collect();
    assert_eq!(starts.len(), 1, "ran once: {ev:?}\n{}", worker.log());
    assert_eq!(starts[0].attempt, 1);
    let took = ev[1].at_ms - ev[0].at_ms;
    assert!(took >= 35_000, "the task really ran 35 s: {took} ms");

    worker.signal(Signal::SIGTERM);
    let status = worker.wait_timeout(Duration::from_secs(20)).expect("exits");
    assert!(status.success(), "{status:?}\n{}", worker.log());
    // Acked: the subscription is empty for a rival consumer.
    let left = world
        .pull_for(&world.cpu_subscription(), Duration::from_secs(3))
        .await;
    assert!(left.is_empty(), "redelivered after ack: {left:?}");
    assert!(worker.log().contains("task succeeded"), "{}", worker.log());
}

/// A worker with one busy slot leaves the second message in the subscription,
/// where another consumer can take it.
#[tokio::test(flavor = "multi_thread")]
async fn a_busy_worker_leaves_the_next_message_for_others() {
    let runs = tempfile::NamedTempFile::new().unwrap();
    let extra = format!(
        "[executors.cpu]\nslots = 1\n{}",
        recording_handler("job", runs.path(), "cpu")
    );
    let world = World::new("busy", &extra).await;
    let worker = world.spawn_worker("w1", &[]);
    world
        .publish(&[task("job", "first", r#"{"seconds": 15}"#)])
        .await;
    eventually(Duration::from_secs(20), "the first task to start", || {
        events(runs.path()).iter().any(|e| e.what == "start")
    })
    .await;
    world
        .publish(&[task("job", "second", r#"{"seconds": 1}"#)])
        .await;

    // We, a rival consumer, get the second message: the worker did not take it.
    let sub = world.cpu_subscription();
    let got = world.pull_for(&sub, Duration::from_secs(4)).await;
    let ids: Vec<String> = got
        .iter()
        .map(|m| m.message.as_ref().unwrap().attributes["task_id"].clone())
        .collect();
    assert_eq!(ids, vec!["second".to_string()], "{}", worker.log());
    assert_eq!(
        events(runs.path()).len(),
        1,
        "second not started while busy"
    );
    // Give it back; the worker runs it once its slot is free.
    world
        .data_plane()
        .modify_ack_deadline(
            &sub,
            vec![got[0].ack_id.clone()],
            0,
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    eventually(Duration::from_secs(40), "both tasks to end", || {
        events(runs.path())
            .iter()
            .filter(|e| e.what == "end")
            .count()
            == 2
    })
    .await;
    let ev = events(runs.path());
    let first_end = ev
        .iter()
        .find(|e| e.what == "end" && e.task == "first")
        .unwrap();
    let second_start = ev
        .iter()
        .find(|e| e.what == "start" && e.task == "second")
        .unwrap();
    assert!(second_start.at_ms >= first_end.at_ms, "one slot: {ev:?}");
    drop(worker);
}

/// Two workers with one slot each run two long tasks at the same time.
#[tokio::test(flavor = "multi_thread")]
async fn two_one_slot_workers_share_the_work() {
    let runs = tempfile::NamedTempFile::new().unwrap();
    let extra = format!(
        "[executors.cpu]\nslots = 1\n{}",
        recording_handler("job", runs.path(), "cpu")
    );
    let world = World::new("pair", &extra).await;
    let _a = world.spawn_worker("wa", &[]);
    let _b = world.spawn_worker("wb", &[]);
    world
        .publish(&[
            task("job", "t1", r#"{"seconds": 8}"#),
            task("job", "t2", r#"{"seconds": 8}"#),
        ])
        .await;
    eventually(Duration::from_secs(40), "both tasks to end", || {
        events(runs.path())
            .iter()
            .filter(|e| e.what == "end")
            .count()
            == 2
    })
    .await;
    let ev = events(runs.path());
    let starts: Vec<_> = ev.iter().filter(|e| e.what == "start").collect();
    assert_eq!(starts.len(), 2, "{ev:?}");
    assert_ne!(
        starts[0].worker, starts[1].worker,
        "one task per worker: {ev:?}"
    );
    let first_end = ev
        .iter()
        .filter(|e| e.what == "end")
        .map(|e| e.at_ms)
        .min()
        .unwrap();
    assert!(
        starts.iter().all(|s| s.at_ms < first_end),
        "they overlapped: {ev:?}"
    );
}

/// SIGTERM: stop pulling, let the running task finish, exit 0.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_the_running_task_finish_then_exits_zero() {
    let runs = tempfile::NamedTempFile::new().unwrap();
    let extra = format!(
        "[executors.cpu]\nslots = 2\n[shutdown]\ngrace = \"30s\"\nkill_grace = \"2s\"\n{}",
        recording_handler("job", runs.path(), "cpu")
    );
    let world = World::new("term", &extra).await;
    let mut worker = world.spawn_worker("w1", &[]);
    world
        .publish(&[task("job", "t1", r#"{"seconds": 4}"#)])
        .await;
    eventually(Duration::from_secs(20), "the task to start", || {
        !events(runs.path()).is_empty()
    })
    .await;
    worker.signal(Signal::SIGTERM);
    // Published after SIGTERM: must not be started by this worker.
    world
        .publish(&[task("job", "late", r#"{"seconds": 1}"#)])
        .await;
    let status = worker
        .wait_timeout(Duration::from_secs(30))
        .expect("the worker exits");
    assert!(status.success(), "{status:?}\n{}", worker.log());
    let ev = events(runs.path());
    assert!(
        ev.iter().any(|e| e.what == "end" && e.task == "t1"),
        "the running task finished: {ev:?}\n{}",
        worker.log()
    );
    assert!(!ev.iter().any(|e| e.task == "late"), "{ev:?}");
    // t1 was acked; "late" is still there for the next worker.
    let left = world
        .pull_for(&world.cpu_subscription(), Duration::from_secs(4))
        .await;
    let ids: Vec<String> = left
        .iter()
        .map(|m| m.message.as_ref().unwrap().attributes["task_id"].clone())
        .collect();
    assert_eq!(ids, vec!["late".to_string()]);
}

/// Pull never returns more than asked for (the basis of slot-sized pulls).
#[tokio::test(flavor = "multi_thread")]
async fn pull_returns_at_most_max_messages() {
    let world = World::new("max", "").await;
    let tasks: Vec<_> = (0..5).map(|i| task("noop", &format!("n{i}"), "")).collect();
    world.publish(&tasks).await;
    let dp = world.data_plane();
    let sub = world.cpu_subscription();
    let mut got = Vec::new();
    for _ in 0..10 {
        let batch = dp.pull(&sub, 2).await.unwrap();
        assert!(batch.len() <= 2, "asked for 2, got {}", batch.len());
        got.extend(batch);
        if got.len() == 5 {
            break;
        }
    }
    assert_eq!(got.len(), 5);
}

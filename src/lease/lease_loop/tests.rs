use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Instant, advance};

use super::*;
use crate::lease::Lease;
use crate::testing::{Call, FakeDataPlane};

const SEC: Duration = Duration::from_secs(1);

fn start(fake: &Arc<FakeDataPlane>) -> (LeaseHandle, JoinHandle<()>, Metrics) {
    start_with_max_lease(fake, 3600 * SEC)
}

/// A loop on `fake` with a 10 s first deadline, 60 s extensions and `max_lease`.
fn start_with_max_lease(
    fake: &Arc<FakeDataPlane>,
    max_lease: Duration,
) -> (LeaseHandle, JoinHandle<()>, Metrics) {
    let metrics = Metrics::new();
    let (handle, task) = LeaseLoop::spawn(
        fake.clone(),
        LeaseLoopOptions {
            subscription: "projects/p/subscriptions/s".into(),
            label: "s".into(),
            first_deadline: 10 * SEC,
            extension: 60 * SEC,
            max_lease,
            ..LeaseLoopOptions::default()
        },
        metrics.clone(),
    );
    (handle, task, metrics)
}

fn ids(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("ack-{i:05}")).collect()
}

fn modifies(fake: &FakeDataPlane) -> Vec<(Instant, Vec<String>, i32)> {
    fake.calls()
        .into_iter()
        .filter_map(|(t, c)| match c {
            Call::Modify { ids, seconds } => Some((t, ids, seconds)),
            _ => None,
        })
        .collect()
}

/// Lets spawned tasks run without moving the paused clock.
async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

/// Moves the paused clock on by `d` in steps of 100 ms, letting every timer
/// and the tasks it wakes run in turn (one big `advance` would fire only the
/// timers that exist before it).
async fn run_for(d: Duration) {
    let step = Duration::from_millis(100);
    let mut left = d;
    while !left.is_zero() {
        let next = left.min(step);
        advance(next).await;
        settle().await;
        left -= next;
    }
}

#[tokio::test(start_paused = true)]
async fn thousands_of_held_messages_are_extended_in_batches_of_1000() {
    let fake = Arc::new(FakeDataPlane::default());
    let (lease, _task, metrics) = start(&fake);
    let _a = lease.hold(ids(700));
    let _b = lease.hold(ids(6000).split_off(700));
    settle().await;
    assert!(modifies(&fake).is_empty(), "nothing is due at once");
    advance(7 * SEC).await;
    settle().await;
    let rounds = modifies(&fake);
    let sizes: Vec<usize> = rounds.iter().map(|(_, ids, _)| ids.len()).collect();
    assert_eq!(sizes, vec![1000; 6], "6,000 leases in 6 RPCs");
    assert!(rounds.iter().all(|(_, _, s)| *s == 60));
    assert_eq!(metrics.leases_held.with_label_values(&["s"]).get(), 6000);
    assert_eq!(
        metrics
            .lease_extension_rpcs
            .with_label_values(&["s", "success"])
            .get(),
        6
    );
}

#[tokio::test(start_paused = true)]
async fn real_sized_ack_ids_are_cut_by_count_and_bytes() {
    let fake = Arc::new(FakeDataPlane::default());
    let (lease, _task, _) = start(&fake);
    // Ack ids as long as the real service's (hundreds of bytes).
    let long =
        |n: usize, len: usize| -> Vec<String> { (0..n).map(|i| format!("{i:0len$}")).collect() };
    let _held = lease.hold(long(2_500, 300));
    settle().await;
    advance(7 * SEC).await;
    settle().await;
    let sizes: Vec<usize> = modifies(&fake)
        .iter()
        .map(|(_, ids, _)| ids.len())
        .collect();
    assert_eq!(sizes, vec![1000, 1000, 500]);
    for (_, ids, _) in modifies(&fake) {
        let bytes: usize = ids.iter().map(String::len).sum();
        assert!(bytes <= batch::MAX_BYTES, "{bytes} bytes in one request");
    }
}

#[tokio::test(start_paused = true)]
async fn a_task_three_times_the_deadline_is_extended_until_acked_and_never_lost() {
    let fake = Arc::new(FakeDataPlane::default());
    let (lease, _task, metrics) = start(&fake);
    let t0 = Instant::now();
    let a = lease.hold(vec!["a".into()]);
    settle().await;
    // Run a "task" of 200 s, far past the 10 s first deadline.
    for _ in 0..200 {
        advance(SEC).await;
        settle().await;
    }
    a.into_iter().for_each(Lease::ack);
    settle().await;
    advance(SEC).await;
    settle().await;
    let rounds = modifies(&fake);
    let times: Vec<u64> = rounds.iter().map(|(t, _, _)| (*t - t0).as_secs()).collect();
    // First at 2/3 of 10 s, then every 2/3 of 60 s.
    assert_eq!(times, vec![7, 47, 87, 127, 167]);
    assert_eq!(metrics.leases_lost.with_label_values(&["s"]).get(), 0);
    let acks: Vec<Call> = fake
        .calls()
        .into_iter()
        .map(|(_, c)| c)
        .filter(|c| matches!(c, Call::Ack { .. }))
        .collect();
    assert_eq!(
        acks,
        vec![Call::Ack {
            ids: vec!["a".into()]
        }]
    );
    assert_eq!(metrics.leases_held.with_label_values(&["s"]).get(), 0);
    // Acked: no further extension.
    advance(300 * SEC).await;
    settle().await;
    assert_eq!(modifies(&fake).len(), rounds.len());
}

#[tokio::test(start_paused = true)]
async fn acks_are_batched() {
    let fake = Arc::new(FakeDataPlane::default());
    let (lease, _task, _) = start(&fake);
    for held in lease.hold(ids(300)) {
        held.ack();
    }
    settle().await;
    advance(Duration::from_millis(50)).await;
    settle().await;
    let acks: Vec<usize> = fake
        .calls()
        .into_iter()
        .filter_map(|(_, c)| match c {
            Call::Ack { ids } => Some(ids.len()),
            _ => None,
        })
        .collect();
    assert_eq!(acks, vec![300]);
}

#[tokio::test(start_paused = true)]
async fn failed_extensions_are_retried_then_the_lease_is_lost_and_its_task_told() {
    let fake = Arc::new(FakeDataPlane::default());
    let (lease, _task, metrics) = start(&fake);
    let held = lease.hold(vec!["a".into()]);
    settle().await;
    let stop = held[0].stop_signal();
    fake.set_failing(true);
    for _ in 0..12 {
        advance(SEC).await;
        settle().await;
    }
    // Tried at 6.7 s, then again after each failure, before the deadline.
    let tries = modifies(&fake).len();
    assert!(tries >= 3, "retried: {tries}");
    assert_eq!(metrics.leases_lost.with_label_values(&["s"]).get(), 1);
    assert!(stop.is_cancelled(), "the task is told to stop");
    assert_eq!(held[0].interruption(), Some(Interruption::Lost));
    // Pub/Sub is back, but a lost lease is never extended again.
    fake.set_failing(false);
    advance(60 * SEC).await;
    settle().await;
    assert_eq!(modifies(&fake).len(), tries);
    assert_eq!(metrics.leases_lost.with_label_values(&["s"]).get(), 1);
    // Its task ends it without a word to Pub/Sub.
    held.into_iter().for_each(Lease::abandon);
    settle().await;
    assert_eq!(metrics.leases_held.with_label_values(&["s"]).get(), 0);
    assert_eq!(modifies(&fake).len(), tries);
}

#[tokio::test(start_paused = true)]
async fn a_hung_extension_times_out_and_is_retried_before_the_deadline() {
    let fake = Arc::new(FakeDataPlane::default());
    let (lease, _task, metrics) = start(&fake);
    let held = lease.hold(vec!["a".into()]);
    settle().await;
    fake.misbehave(|m| m.hang = true);
    // The round at 6.7 s hangs; its deadline is half the 3.3 s left.
    advance(Duration::from_millis(6_700)).await;
    settle().await;
    advance(Duration::from_millis(1_700)).await;
    settle().await;
    assert_eq!(
        metrics
            .lease_extension_rpcs
            .with_label_values(&["s", "failure"])
            .get(),
        1,
        "the hung call was given up on"
    );
    // The connection recovers; the retry comes before the 10 s deadline.
    fake.misbehave(|m| m.hang = false);
    advance(Duration::from_millis(1_000)).await;
    settle().await;
    let done: Vec<u128> = modifies(&fake)
        .iter()
        .map(|(t, _, _)| t.duration_since(modifies(&fake)[0].0).as_millis())
        .collect();
    assert_eq!(done.len(), 1, "{done:?}");
    assert_eq!(
        metrics
            .lease_extension_rpcs
            .with_label_values(&["s", "success"])
            .get(),
        1
    );
    advance(30 * SEC).await;
    settle().await;
    assert_eq!(metrics.leases_lost.with_label_values(&["s"]).get(), 0);
    assert_eq!(held[0].interruption(), None);
}

#[tokio::test(start_paused = true)]
async fn a_release_is_never_overtaken_by_an_extension_still_in_flight() {
    let fake = Arc::new(FakeDataPlane::default());
    let (lease, _task, _) = start(&fake);
    let [a]: [Lease; 1] = lease.hold(vec!["a".into()]).try_into().unwrap();
    settle().await;
    // The extension sent at 6.7 s takes 1 s to take effect (within its
    // 1.67 s deadline)...
    fake.misbehave(|m| m.slow_extensions = Some(SEC));
    advance(Duration::from_millis(6_800)).await;
    settle().await;
    // ...and the task is released while it is in flight.
    a.release();
    run_for(5 * SEC).await;
    let seconds: Vec<i32> = modifies(&fake).iter().map(|(_, _, s)| *s).collect();
    assert_eq!(seconds, vec![60, 0], "the release takes effect last");
}

#[tokio::test(start_paused = true)]
async fn refused_ids_are_lost_alone_and_the_rest_of_the_batch_extended() {
    let fake = Arc::new(FakeDataPlane::default());
    let (lease, _task, metrics) = start(&fake);
    let held = lease.hold(vec!["a".into(), "b".into(), "c".into()]);
    settle().await;
    fake.misbehave(|m| {
        m.refused.insert("b".into());
        m.refused_once.insert("c".into());
    });
    advance(7 * SEC).await;
    settle().await;
    // b is lost; a is extended; c was refused once and is retried soon.
    assert_eq!(held[1].interruption(), Some(Interruption::Lost));
    assert_eq!(metrics.leases_lost.with_label_values(&["s"]).get(), 1);
    assert_eq!(held[0].interruption(), None);
    advance(2 * SEC).await;
    settle().await;
    let rounds = modifies(&fake);
    assert_eq!(rounds[0].1, vec!["a", "b", "c"]);
    assert!(
        rounds[1..]
            .iter()
            .any(|(_, ids, _)| ids.contains(&"c".to_string())),
        "c retried: {rounds:?}"
    );
    assert!(
        rounds[1..]
            .iter()
            .all(|(_, ids, _)| !ids.contains(&"b".to_string())),
        "b never again: {rounds:?}"
    );
    run_for(120 * SEC).await;
    assert_eq!(held[2].interruption(), None, "c lives on");
    assert_eq!(metrics.leases_lost.with_label_values(&["s"]).get(), 1);
    assert_eq!(
        metrics
            .lease_extensions
            .with_label_values(&["s", "failure"])
            .get(),
        2,
        "b and c once each"
    );
}

#[tokio::test(start_paused = true)]
async fn a_lease_past_max_lease_tells_its_task_and_stays_extended() {
    let fake = Arc::new(FakeDataPlane::default());
    let (lease, _task, metrics) = start_with_max_lease(&fake, 100 * SEC);
    let held = lease.hold(vec!["a".into()]);
    settle().await;
    run_for(120 * SEC).await;
    assert_eq!(
        held[0].interruption(),
        None,
        "not yet: rounds at 6.7, 46.7, 86.7 s"
    );
    run_for(10 * SEC).await;
    assert_eq!(held[0].interruption(), Some(Interruption::PastMaxLease));
    // Still extended while its task stops, so it never lapses under it.
    let before = modifies(&fake).len();
    run_for(60 * SEC).await;
    assert!(modifies(&fake).len() > before);
    assert_eq!(metrics.leases_lost.with_label_values(&["s"]).get(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_lease_dropped_without_an_ending_is_released() {
    let fake = Arc::new(FakeDataPlane::default());
    let (lease, _task, metrics) = start(&fake);
    let held = lease.hold(vec!["a".into()]);
    // A task that panics drops its lease while unwinding.
    let task = tokio::spawn(async move {
        let _lease = held;
        panic!("a bug in a task");
    });
    assert!(task.await.unwrap_err().is_panic());
    settle().await;
    advance(SEC).await;
    settle().await;
    assert_eq!(
        modifies(&fake),
        vec![(modifies(&fake)[0].0, vec!["a".to_string()], 0)]
    );
    assert_eq!(metrics.leases_held.with_label_values(&["s"]).get(), 0);
}

#[tokio::test(start_paused = true)]
async fn releases_are_sent_and_the_loop_flushes_when_handles_drop() {
    let fake = Arc::new(FakeDataPlane::default());
    let (lease, task, _) = start(&fake);
    let [a, b, c]: [Lease; 3] = lease
        .hold(vec!["a".into(), "b".into(), "c".into()])
        .try_into()
        .unwrap();
    a.release();
    b.retry_after(20 * SEC);
    c.ack();
    drop(lease);
    task.await.unwrap();
    let mut calls: Vec<Call> = fake.calls().into_iter().map(|(_, c)| c).collect();
    calls.sort_by_key(|c| format!("{c:?}"));
    assert_eq!(
        calls,
        vec![
            Call::Ack {
                ids: vec!["c".into()]
            },
            Call::Modify {
                ids: vec!["a".into()],
                seconds: 0
            },
            Call::Modify {
                ids: vec!["b".into()],
                seconds: 20
            },
        ]
    );
}

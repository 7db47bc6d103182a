use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Instant, advance};

use super::*;
use crate::lease::Lease;
use crate::testing::{Call, FakeDataPlane};

const SEC: Duration = Duration::from_secs(1);

fn start(fake: &Arc<FakeDataPlane>) -> (LeaseHandle, JoinHandle<()>, Metrics) {
    let metrics = Metrics::new();
    let (handle, task) = LeaseLoop::spawn(
        fake.clone(),
        LeaseLoopOptions {
            subscription: "projects/p/subscriptions/s".into(),
            label: "s".into(),
            first_deadline: 10 * SEC,
            extension: 60 * SEC,
            max_lease: 3600 * SEC,
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

#[tokio::test(start_paused = true)]
async fn hundreds_of_held_messages_are_extended_in_one_rpc_per_2500() {
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
    assert_eq!(sizes.iter().sum::<usize>(), 6000);
    assert_eq!(sizes.len(), 3, "6,000 leases in 3 RPCs: {sizes:?}");
    assert!(rounds.iter().all(|(_, _, s)| *s == 60));
    assert_eq!(metrics.leases_held.with_label_values(&["s"]).get(), 6000);
    assert_eq!(
        metrics
            .lease_extension_rpcs
            .with_label_values(&["s", "success"])
            .get(),
        3
    );
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
async fn failed_extensions_are_retried_and_counted_as_lost_past_the_deadline() {
    let fake = Arc::new(FakeDataPlane::default());
    let (lease, _task, metrics) = start(&fake);
    let _a = lease.hold(vec!["a".into()]);
    fake.set_failing(true);
    for _ in 0..12 {
        advance(SEC).await;
        settle().await;
    }
    // Tried at 7 s, then every second after each failure.
    let tries = modifies(&fake).len();
    assert!(tries >= 4, "retried: {tries}");
    assert_eq!(metrics.leases_lost.with_label_values(&["s"]).get(), 1);
    assert!(
        metrics
            .lease_extension_rpcs
            .with_label_values(&["s", "failure"])
            .get()
            >= 4
    );
    // Pub/Sub is back: the lease is extended again (within the backoff,
    // at most 16 s), and lost only once.
    fake.set_failing(false);
    for _ in 0..17 {
        advance(SEC).await;
        settle().await;
    }
    assert!(
        metrics
            .lease_extension_rpcs
            .with_label_values(&["s", "success"])
            .get()
            >= 1
    );
    advance(30 * SEC).await;
    settle().await;
    assert_eq!(metrics.leases_lost.with_label_values(&["s"]).get(), 1);
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

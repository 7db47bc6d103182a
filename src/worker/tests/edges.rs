//! The edges of a message's life on the same fakes: hand-backs, panics, bad
//! input, lost leases, `max_lease`, and messages beyond the free slots.

use super::*;

#[tokio::test(start_paused = true)]
async fn shutdown_past_grace_hands_the_running_task_back_with_its_budget() {
    let w = start("");
    w.dp.push(message("t4", Some("sleep"), r#"{"seconds": 3600}"#));
    w.until("the task runs", |w| w.gauge("in_progress") == 1)
        .await;
    let stopped_at = Instant::now();
    let w = w.stop().await;
    assert!(
        Instant::now() - stopped_at <= 5 * SEC + 6 * SEC,
        "grace plus one long poll"
    );
    assert_eq!(w.outcomes(), vec!["released"]);
    // A copy on the task's own topic carries the task on; the original is
    // acked, so its delivery count (the dead-letter policy's) is not spent.
    let copies = w.publisher.on("leasehold-tasks-cpu");
    assert_eq!(copies.len(), 1, "{:?}", w.publisher.published());
    let a = &copies[0].attributes;
    assert_eq!(a["task_id"], "t4");
    assert_eq!(a["kind"], "sleep");
    assert_eq!(a["leasehold_interruptions"], "1");
    assert_eq!(a["leasehold_failures"], "0");
    assert_eq!(copies[0].data, br#"{"seconds": 3600}"#);
    assert!(w.acked("t4#1"), "{:?}", w.rpcs());
}

#[tokio::test(start_paused = true)]
async fn a_hand_back_that_cannot_be_published_releases_the_message_instead() {
    let w = start("");
    w.dp.push(message("t6", Some("sleep"), r#"{"seconds": 3600}"#));
    w.until("the task runs", |w| w.gauge("in_progress") == 1)
        .await;
    w.publisher.set_failing(true);
    let w = w.stop().await;
    assert!(!w.acked("t6#1"));
    assert!(
        w.rpcs()
            .iter()
            .any(|(_, c)| matches!(c, Call::Modify { ids, seconds: 0 } if ids[0] == "t6#1")),
        "released: {:?}",
        w.rpcs()
    );
    assert_eq!(w.dp.queued(), 1, "back in the subscription, never lost");
}

#[tokio::test(start_paused = true)]
async fn a_panicking_handler_is_a_failure_with_a_reason_and_nothing_leaks() {
    let w = start("[handlers.panic]\nexecutor = \"cpu\"\nbuiltin = \"panic\"\n");
    w.dp.push(message("p1", Some("panic"), ""));
    w.until("the third attempt's ack", |w| w.acked("p1#3"))
        .await;
    let dead = w.publisher.on("dead");
    assert_eq!(dead.len(), 1);
    assert!(
        dead[0].attributes[ERROR_ATTRIBUTE]
            .contains("the handler panicked: the panic builtin panics"),
        "{dead:?}"
    );
    assert_eq!(w.outcomes(), vec!["retrying", "retrying", "dead_lettered"]);
    assert_eq!(w.gauge("in_progress"), 0);
    let w = w.stop().await;
    assert_eq!(w.gauge("leases"), 0);
}

#[tokio::test(start_paused = true)]
async fn bad_builtin_input_is_dead_lettered_at_once_with_the_reason() {
    let w = start("");
    w.dp.push(message("big", Some("sleep"), r#"{"seconds": 1e20}"#));
    w.until("the ack", |w| w.acked("big#1")).await;
    assert!(w.started.elapsed() < 2 * SEC, "at once");
    let dead = w.publisher.on("dead");
    assert!(
        dead[0].attributes[ERROR_ATTRIBUTE].contains("bad task input"),
        "{dead:?}"
    );
    assert_eq!(w.outcomes(), vec!["dead_lettered"]);
    assert_eq!(w.gauge("in_progress"), 0);
    let w = w.stop().await;
    assert_eq!(w.gauge("leases"), 0);
}

#[tokio::test(start_paused = true)]
async fn a_lost_lease_stops_the_run_and_is_never_acked() {
    let w = start("");
    w.dp.push(message("l1", Some("sleep"), r#"{"seconds": 3600}"#));
    w.until("the task runs", |w| w.gauge("in_progress") == 1)
        .await;
    // Extensions fail until the deadline passes.
    w.dp.set_failing(true);
    w.until("the run is reported lost", |w| !w.outcomes().is_empty())
        .await;
    assert!(
        w.started.elapsed() < 15 * SEC,
        "stopped soon after the 10 s deadline"
    );
    w.dp.set_failing(false);
    assert_eq!(w.outcomes(), vec!["lease_lost"]);
    assert_eq!(
        w.metrics
            .leases_lost
            .with_label_values(&["leasehold-tasks-cpu"])
            .get(),
        1
    );
    // Pub/Sub redelivers the lapsed message; this worker's free slot may
    // take it like any other's, as a new delivery.
    w.until("the redelivery runs", |w| w.gauge("in_progress") == 1)
        .await;
    let w = w.stop().await;
    assert!(!w.acked("l1#1"), "a lost lease is never acked");
    assert_eq!(w.outcomes(), vec!["lease_lost", "released"]);
    assert_eq!(w.gauge("leases"), 0);
    assert_eq!(w.gauge("in_progress"), 0);
}

#[tokio::test(start_paused = true)]
async fn max_lease_stops_the_task_and_retries_it_with_the_reason() {
    let w = start("[lease]\nextension = \"60s\"\nmax_lease = \"100s\"\n");
    w.dp.push(message("m1", Some("sleep"), r#"{"seconds": 3600}"#));
    w.until("the retry", |w| w.outcomes() == ["retrying"]).await;
    let stopped_after = w.started.elapsed();
    assert!(
        (100 * SEC..=130 * SEC).contains(&stopped_after),
        "stopped at max_lease: {stopped_after:?}"
    );
    let event: serde_json::Value =
        serde_json::from_slice(&w.publisher.on("results")[0].data).unwrap();
    assert!(
        event["error"]
            .as_str()
            .unwrap()
            .contains("ran past lease.max_lease"),
        "{event}"
    );
    // Never lost: the lease was extended while the task stopped.
    assert_eq!(
        w.metrics
            .leases_lost
            .with_label_values(&["leasehold-tasks-cpu"])
            .get(),
        0
    );
    w.stop().await;
}

#[tokio::test(start_paused = true)]
async fn messages_beyond_the_slots_asked_for_are_handed_back_at_once() {
    let w = start("[executors.cpu]\nslots = 1\n");
    w.dp.misbehave(|m| m.extra_on_pull = 2);
    for i in 0..3 {
        w.dp.push(message(
            &format!("x{i}"),
            Some("sleep"),
            r#"{"seconds": 60}"#,
        ));
    }
    w.until("two hand-backs", |w| {
        w.publisher.on("leasehold-tasks-cpu").len() == 2 && w.acked("x1#1") && w.acked("x2#1")
    })
    .await;
    assert!(w.started.elapsed() < SEC, "at once");
    assert_eq!(w.gauge("in_progress"), 1, "one slot, one task");
    w.stop().await;
}

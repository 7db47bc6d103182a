//! A lease ends exactly once, on time, and takes its task with it: on the
//! real emulator, with real handler processes, frozen workers and a stalled
//! network.

// Wall-clock waits on real processes: std::time::Instant is right here.
#![allow(clippy::disallowed_types)]

#[path = "support/stall_proxy.rs"]
mod stall_proxy;
mod support;

use std::time::{Duration, Instant};

use leasehold::pubsub::{DataPlane, ReceivedMessage};
use nix::sys::signal::Signal;
use stall_proxy::StallProxy;
use support::*;

/// A handler that records `start`, `stopped` (on SIGTERM) and `end` lines
/// in `log`, each with the worker's name and the time, and sleeps
/// `{"seconds": N}` in between.
fn stoppable_handler(kind: &str, log: &std::path::Path) -> String {
    let script = format!(
        r#"now() {{ date +%s%3N; }}
line() {{ echo "$1 $LEASEHOLD_TASK_ID ${{WORKER_NAME:-?}} $LEASEHOLD_ATTEMPT $(now)" >> {log}; }}
line start
trap 'line stopped; exit 143' TERM
secs=$(sed -n 's/.*"seconds"[^0-9]*\([0-9][0-9]*\).*/\1/p')
sleep "${{secs:-0}}" &
wait
line end
"#,
        log = log.display()
    );
    format!(
        "[handlers.{kind}]\nexecutor = \"cpu\"\ncommand = [\"/bin/sh\", \"-c\", {}]\n",
        toml_string(&script)
    )
}

/// Pulls (and acks) from `subscription` until `n` messages came or `secs` passed.
async fn collect(world: &World, subscription: &str, n: usize, secs: u64) -> Vec<ReceivedMessage> {
    pull_until(world, subscription, Duration::from_secs(secs), |got| {
        got.len() >= n
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sleep_of_1e20_seconds_is_dead_lettered_at_once_and_the_gauges_return_to_zero() {
    let world = World::new("huge-sleep", "[executors.cpu]\nslots = 1\n").await;
    let worker = world.spawn_worker("w1", &[]);
    let http = worker.http_addr().await;
    let published = Instant::now();
    world
        .publish(&[task("sleep", "huge", r#"{"seconds": 1e20}"#)])
        .await;
    let dead_sub = world.subscription(&world.config.pubsub.dead_letter_topic);
    let dead = collect(&world, &dead_sub, 1, 20).await;
    assert_eq!(dead.len(), 1, "{}", worker.log());
    assert!(
        published.elapsed() < Duration::from_secs(10),
        "within seconds"
    );
    let reason = &message_attributes(&dead[0])["leasehold_error"];
    assert!(reason.contains("bad task input"), "{reason}");
    assert!(reason.contains("seconds must be a number"), "{reason}");
    let sub = &world.config.executors["cpu"].subscription;
    eventually(Duration::from_secs(10), "the gauges back at 0", || {
        let body = http_get(&http, "/metrics").unwrap().1;
        sample(&body, "leasehold_tasks_in_progress{executor=\"cpu\"}") == Some(0.0)
            && sample(
                &body,
                &format!("leasehold_leases_held{{subscription=\"{sub}\"}}"),
            ) == Some(0.0)
    })
    .await;
    assert!(!worker.log().contains("panicked"), "{}", worker.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn max_lease_stops_the_task_retries_it_and_never_runs_it_twice_at_once() {
    let runs = tempfile::NamedTempFile::new().unwrap();
    let extra = format!(
        "[lease]\nextension = \"10s\"\nmax_lease = \"12s\"\n\
         [retry]\nmax_attempts = 2\nmin_backoff = \"1s\"\nmax_backoff = \"2s\"\n\
         [shutdown]\nkill_grace = \"2s\"\n{}",
        stoppable_handler("long", runs.path())
    );
    let world = World::new("max-lease", &extra).await;
    let worker = world.spawn_worker("w1", &[]);
    world
        .publish(&[task("long", "ml-1", r#"{"seconds": 45}"#)])
        .await;
    let dead_sub = world.subscription(&world.config.pubsub.dead_letter_topic);
    let dead = collect(&world, &dead_sub, 1, 70).await;
    assert_eq!(dead.len(), 1, "{}", worker.log());
    let reason = &message_attributes(&dead[0])["leasehold_error"];
    assert!(reason.contains("ran past lease.max_lease"), "{reason}");
    assert!(reason.contains("gave up after 2 attempts"), "{reason}");

    let ev = events(runs.path());
    let what: Vec<&str> = ev.iter().map(|e| e.what.as_str()).collect();
    assert_eq!(what, ["start", "stopped", "start", "stopped"], "{ev:?}");
    for run in ev.chunks(2) {
        let ran = run[1].at_ms - run[0].at_ms;
        // Stopped at the first extension round past 12 s (rounds every 6.7 s).
        assert!((12_000..22_000).contains(&ran), "ran {ran} ms: {ev:?}");
    }
    assert!(ev[2].at_ms >= ev[1].at_ms, "never two runs at once: {ev:?}");
    assert!(
        worker.log().contains("lease reached lease.max_lease"),
        "{}",
        worker.log()
    );
}

/// A worker frozen past its deadline loses the message to another; when it
/// wakes it stops its own run, reports `lease_lost` and never `succeeded`.
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_frozen_past_its_deadline_stops_its_run_when_it_wakes() {
    let runs = tempfile::NamedTempFile::new().unwrap();
    let extra = format!(
        "[executors.cpu]\nslots = 1\n[shutdown]\nkill_grace = \"2s\"\n{}",
        stoppable_handler("long", runs.path())
    );
    let world = World::new("frozen", &extra).await;
    // HOSTNAME names the worker in result events, as a pod's name does.
    let mut a = world.spawn_worker_env("a", &[], &[("HOSTNAME", "a")]);
    world
        .publish(&[task("long", "fz-1", r#"{"seconds": 30}"#)])
        .await;
    wait_for_event(runs.path(), 20, "a starts the task", |e| {
        e.what == "start" && e.worker == "a"
    })
    .await;
    // Frozen before its first extension (6.7 s after the pull): the 10 s
    // deadline passes and Pub/Sub redelivers the message to b.
    a.signal(Signal::SIGSTOP);
    let mut b = world.spawn_worker_env("b", &[], &[("HOSTNAME", "b")]);
    wait_for_event(runs.path(), 40, "b starts the redelivered task", |e| {
        e.what == "start" && e.worker == "b"
    })
    .await;
    a.signal(Signal::SIGCONT);
    wait_for_event(runs.path(), 20, "a stops its own run", |e| {
        e.what == "stopped" && e.worker == "a"
    })
    .await;
    wait_for_event(runs.path(), 60, "b finishes", |e| {
        e.what == "end" && e.worker == "b"
    })
    .await;

    let results_sub = world.subscription(&world.config.pubsub.results_topic);
    let events_out = collect(&world, &results_sub, 2, 20).await;
    let outcomes: Vec<(String, String)> = events_out
        .iter()
        .map(|m| {
            let body: serde_json::Value =
                serde_json::from_slice(&m.message.as_ref().unwrap().data).unwrap();
            (
                body["worker"].as_str().unwrap_or_default().to_string(),
                message_attributes(m)["outcome"].clone(),
            )
        })
        .collect();
    assert!(
        outcomes.contains(&("a".into(), "lease_lost".into())),
        "{outcomes:?}\n{}",
        a.log()
    );
    let succeeded: Vec<_> = outcomes.iter().filter(|(_, o)| o == "succeeded").collect();
    assert_eq!(
        succeeded,
        [&("b".to_string(), "succeeded".to_string())],
        "{outcomes:?}"
    );
    assert!(
        !events(runs.path())
            .iter()
            .any(|e| e.what == "end" && e.worker == "a"),
        "a's run never finished"
    );
    assert!(a.log().contains("lease lost"), "{}", a.log());
    for w in [&mut a, &mut b] {
        w.signal(Signal::SIGTERM);
        assert!(w.wait_timeout(Duration::from_secs(20)).is_some());
    }
}

/// A stalled connection: the extension hangs, is timed out and retried, and
/// the lease survives a stall shorter than the time it has left.
#[tokio::test(flavor = "multi_thread")]
async fn a_hung_extension_is_timed_out_and_retried_and_the_lease_survives() {
    let runs = tempfile::NamedTempFile::new().unwrap();
    let extra = format!(
        "[executors.cpu]\nslots = 1\n{}",
        stoppable_handler("long", runs.path())
    );
    let world = World::new("stall", &extra).await;
    let proxy = StallProxy::start(&world.host).await;
    let worker = world.spawn_worker_env("w1", &[], &[("PUBSUB_EMULATOR_HOST", &proxy.addr)]);
    let http = worker.http_addr().await;
    world
        .publish(&[task("long", "st-1", r#"{"seconds": 20}"#)])
        .await;
    wait_for_event(runs.path(), 20, "the task starts", |e| e.what == "start").await;
    let started = Instant::now();
    // The first extension is due 6.7 s after the pull: stall from just
    // before it for 2.5 s. It times out (half the 3.3 s left), and the retry
    // after the stall lands before the 10 s deadline.
    tokio::time::sleep(Duration::from_millis(6_300).saturating_sub(started.elapsed())).await;
    proxy.stall();
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    proxy.resume();
    wait_for_event(runs.path(), 40, "the task ends", |e| e.what == "end").await;
    let sub = &world.config.executors["cpu"].subscription;
    let mut body = String::new();
    eventually(Duration::from_secs(10), "the ack", || {
        body = http_get(&http, "/metrics").unwrap().1;
        sample(
            &body,
            "leasehold_tasks_finished_total{executor=\"cpu\",kind=\"long\",outcome=\"succeeded\"}",
        ) == Some(1.0)
    })
    .await;
    let failed = sample(
        &body,
        &format!(
            "leasehold_lease_extension_rpcs_total{{result=\"failure\",subscription=\"{sub}\"}}"
        ),
    );
    assert!(failed >= Some(1.0), "the hung extension failed: {body}");
    assert_eq!(
        sample(
            &body,
            &format!("leasehold_leases_lost_total{{subscription=\"{sub}\"}}")
        ),
        Some(0.0),
        "{}",
        worker.log()
    );
    let starts = events(runs.path())
        .iter()
        .filter(|e| e.what == "start")
        .count();
    assert_eq!(starts, 1, "ran once");
    assert!(
        worker.log().contains("DeadlineExceeded"),
        "timed out, not refused: {}",
        worker.log()
    );
}

/// On an exactly-once subscription the emulator, like Pub/Sub, refuses stale
/// ack ids one by one: the data plane reads which (from the error's
/// details, even hundreds of them) and the rest of the batch is acked.
#[tokio::test(flavor = "multi_thread")]
async fn exactly_once_refusals_are_read_per_id_and_the_rest_is_acked() {
    let world = World::new("eod", "").await;
    let sub = world.subscription(&leasehold_sub_name(&world));
    world
        .conn
        .subscription_admin()
        .await
        .unwrap()
        .create_subscription()
        .set_name(&sub)
        .set_topic(world.conn.topic_path(&world.config.executors["cpu"].topic))
        .set_ack_deadline_seconds(10)
        .set_enable_exactly_once_delivery(true)
        .send()
        .await
        .unwrap();
    let n = 201;
    let tasks: Vec<_> = (0..n).map(|i| task("noop", &format!("e{i}"), "")).collect();
    world.publish(&tasks).await;
    let dp = world.data_plane();
    let mut first = Vec::new();
    while first.len() < n {
        first.extend(dp.pull(&sub, 100).await.unwrap());
    }
    // Past the 10 s deadline every message is redelivered with a new ack id.
    tokio::time::sleep(Duration::from_secs(11)).await;
    let mut second = Vec::new();
    while second.is_empty() {
        second = dp.pull(&sub, 1).await.unwrap();
    }
    let fresh = second[0].ack_id.clone();
    let stale: Vec<String> = first
        .iter()
        .map(|m| m.ack_id.clone())
        .filter(|id| *id != fresh)
        .collect();
    let mut batch = stale.clone();
    batch.push(fresh.clone());
    let err = dp
        .acknowledge(&sub, batch, Duration::from_secs(10))
        .await
        .expect_err("stale ids are refused");
    let failed = err
        .failed_ids
        .clone()
        .unwrap_or_else(|| panic!("no per-id answer: {err}"));
    let mut refused = failed.permanent.clone();
    refused.sort();
    let mut want = stale.clone();
    want.sort();
    assert_eq!(refused, want, "every stale id, and only those");
    assert!(failed.transient.is_empty());
    // The fresh id was acked with them: acking it again is refused too.
    let again = dp
        .acknowledge(&sub, vec![fresh.clone()], Duration::from_secs(10))
        .await
        .expect_err("already acked");
    assert_eq!(again.failed_ids.unwrap().permanent, vec![fresh]);
}

fn leasehold_sub_name(world: &World) -> String {
    format!("{}-eod", world.config.executors["cpu"].subscription)
}

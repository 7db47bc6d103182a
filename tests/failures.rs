//! No task is ever lost: retries with backoff, dead letters, timeouts,
//! results, shutdown and crashes, on the real emulator with real processes.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use leasehold::pubsub::ReceivedMessage;
use nix::sys::signal::Signal;
use support::*;

/// Fast retries for tests: 1 s, 2 s, 4 s ...
const FAST_RETRY: &str = "[retry]\nmax_attempts = 3\nmin_backoff = \"1s\"\nmax_backoff = \"10s\"\n";

/// A handler script as a TOML table.
fn handler(kind: &str, script: &str, extra: &str) -> String {
    format!(
        "[handlers.{kind}]\nexecutor = \"cpu\"\ncommand = [\"/bin/sh\", \"-c\", {}]\n{extra}\n",
        toml_string(script)
    )
}

/// Collects messages from a subscription until `n` arrived (or 30 s passed), acking them.
async fn collect(world: &World, subscription: &str, n: usize) -> Vec<ReceivedMessage> {
    pull_until(world, subscription, Duration::from_secs(30), |got| {
        got.len() >= n
    })
    .await
}

fn attrs(m: &ReceivedMessage) -> BTreeMap<String, String> {
    message_attributes(m)
}

fn json(m: &ReceivedMessage) -> serde_json::Value {
    message_json(m)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_always_failing_task_runs_max_attempts_with_growing_gaps_then_dead_letters() {
    let runs = tempfile::NamedTempFile::new().unwrap();
    let script = format!(
        "echo \"$LEASEHOLD_ATTEMPT $(date +%s%3N)\" >> {}; echo 'it broke' >&2; exit 3",
        runs.path().display()
    );
    let extra = format!("{FAST_RETRY}{}", handler("flaky", &script, ""));
    let world = World::new("retry", &extra).await;
    let mut worker = world.spawn_worker("w1", &[]);
    world.publish(&[task("flaky", "f1", "{}")]).await;
    let dead = world.subscription(&world.config.pubsub.dead_letter_topic);
    let got = collect(&world, &dead, 1).await;
    assert_eq!(got.len(), 1, "{}", worker.log());
    let a = attrs(&got[0]);
    assert_eq!(a["task_id"], "f1");
    assert_eq!(a["leasehold_attempts"], "3");
    assert!(a["leasehold_error"].contains("exited with code 3"), "{a:?}");
    assert!(
        a["leasehold_error"].contains("gave up after 3 attempts"),
        "{a:?}"
    );
    let lines = lines(runs.path());
    let attempts: Vec<(u32, u64)> = lines
        .iter()
        .map(|l| {
            let (a, t) = l.split_once(' ').unwrap();
            (a.parse().unwrap(), t.parse().unwrap())
        })
        .collect();
    assert_eq!(
        attempts.iter().map(|a| a.0).collect::<Vec<_>>(),
        vec![1, 2, 3],
        "exactly max_attempts runs"
    );
    let gap1 = attempts[1].1 - attempts[0].1;
    let gap2 = attempts[2].1 - attempts[1].1;
    assert!(gap1 >= 1_000, "first backoff 1 s: {gap1} ms");
    assert!(gap2 >= 2_000, "second backoff 2 s: {gap2} ms");
    // No fourth run, and no second dead letter.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(super_lines(runs.path()), 3);
    assert!(collect_quick(&world, &dead).await.is_empty());
    // The retrying and dead-lettered results carry the stderr tail.
    let results = world.subscription(&world.config.pubsub.results_topic);
    let events = collect(&world, &results, 3).await;
    let outcomes: Vec<String> = events.iter().map(|m| attrs(m)["outcome"].clone()).collect();
    assert_eq!(
        outcomes.iter().filter(|o| *o == "retrying").count(),
        2,
        "{outcomes:?}"
    );
    assert_eq!(
        outcomes.iter().filter(|o| *o == "dead_lettered").count(),
        1,
        "{outcomes:?}"
    );
    for e in &events {
        let body = json(e);
        assert_eq!(body["stderr"], "it broke");
        assert_eq!(body["exit_code"], 3);
    }
    assert!(
        worker.wait_timeout(Duration::from_millis(100)).is_none(),
        "still running"
    );
}

fn super_lines(path: &std::path::Path) -> usize {
    lines(path).len()
}

async fn collect_quick(world: &World, subscription: &str) -> Vec<ReceivedMessage> {
    world.pull_for(subscription, Duration::from_secs(2)).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_permanent_exit_code_runs_once_and_is_dead_lettered() {
    let runs = tempfile::NamedTempFile::new().unwrap();
    let script = format!("echo run >> {}; exit 65", runs.path().display());
    let extra = format!(
        "{FAST_RETRY}{}",
        handler("strict", &script, "permanent_exit_codes = [65]")
    );
    let world = World::new("perm", &extra).await;
    let _worker = world.spawn_worker("w1", &[]);
    world.publish(&[task("strict", "p1", "{}")]).await;
    let dead = world.subscription(&world.config.pubsub.dead_letter_topic);
    let got = collect(&world, &dead, 1).await;
    assert_eq!(got.len(), 1);
    let a = attrs(&got[0]);
    assert_eq!(a["leasehold_attempts"], "1");
    assert!(a["leasehold_error"].contains("permanent"), "{a:?}");
    // Nothing more may happen: a fixed wait, as "no second run" has no event to wait for.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(lines(runs.path()).len(), 1, "ran once");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_handler_past_its_timeout_is_killed_with_its_group_and_retried() {
    let runs = tempfile::NamedTempFile::new().unwrap();
    let pids = tempfile::NamedTempFile::new().unwrap();
    // Attempt 1 hangs (with a grandchild); attempt 2 succeeds.
    let script = format!(
        "echo \"$LEASEHOLD_ATTEMPT\" >> {runs}; if [ \"$LEASEHOLD_ATTEMPT\" = 1 ]; then sleep 600 & echo $! >> {pids}; wait; fi",
        runs = runs.path().display(),
        pids = pids.path().display()
    );
    let extra = format!(
        "{FAST_RETRY}{}",
        handler("slow", &script, "timeout = \"2s\"")
    );
    let world = World::new("timeout", &extra).await;
    let worker = world.spawn_worker("w1", &[]);
    world.publish(&[task("slow", "s1", "{}")]).await;
    eventually(Duration::from_secs(30), "attempt 2", || {
        lines(runs.path()).len() == 2
    })
    .await;
    assert_eq!(lines(runs.path()), vec!["1", "2"], "{}", worker.log());
    let grandchild: i32 = lines(pids.path())[0].parse().unwrap();
    let stat = std::fs::read_to_string(format!("/proc/{grandchild}/stat")).unwrap_or_default();
    assert!(
        stat.is_empty() || stat.contains(") Z "),
        "the grandchild was killed: {stat}"
    );
    assert!(
        worker.log().contains("ran past its timeout of 2s"),
        "{}",
        worker.log()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_succeeding_handlers_result_json_arrives_in_its_succeeded_event() {
    let script = "printf '{\"triangles\": 42, \"id\": \"%s\"}' \"$LEASEHOLD_TASK_ID\" > \"$LEASEHOLD_RESULT_FILE\"";
    let extra = handler("mesh", script, "");
    let world = World::new("result", &extra).await;
    let _worker = world.spawn_worker("w1", &[]);
    world.publish(&[task("mesh", "m1", "{}")]).await;
    let results = world.subscription(&world.config.pubsub.results_topic);
    let got = collect(&world, &results, 1).await;
    assert_eq!(got.len(), 1);
    let a = attrs(&got[0]);
    assert_eq!(a["outcome"], "succeeded");
    assert_eq!(a["task_id"], "m1");
    assert_eq!(a["kind"], "mesh");
    let body = json(&got[0]);
    assert_eq!(
        body["result"],
        serde_json::json!({"triangles": 42, "id": "m1"})
    );
    assert_eq!(body["outcome"], "succeeded");
    assert_eq!(body["executor"], "cpu");
    assert_eq!(body["attempt"], 1);
    assert_eq!(body["exit_code"], 0);
    assert!(
        body["worker"].as_str().is_some_and(|w| !w.is_empty()),
        "the worker name"
    );
}

/// SIGTERM during a long task with a short grace: the worker exits 0 within
/// grace + `kill_grace` + a few seconds, and a second worker finishes the task
/// within seconds (attempt 2), not after the ack deadline.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_past_grace_hands_the_task_to_another_worker_at_once() {
    let runs = tempfile::NamedTempFile::new().unwrap();
    let extra = format!(
        "[pubsub]\nack_deadline = \"60s\"\n[shutdown]\ngrace = \"2s\"\nkill_grace = \"1s\"\n{FAST_RETRY}{}",
        recording_handler("long", runs.path(), "cpu")
    );
    let world = World::new("release", &extra).await;
    let mut first = world.spawn_worker("first", &[]);
    world
        .publish(&[task("long", "L", r#"{"seconds": 8}"#)])
        .await;
    eventually(Duration::from_secs(20), "the task to start", || {
        !events(runs.path()).is_empty()
    })
    .await;
    let t0 = tokio::time::Instant::now();
    first.signal(Signal::SIGTERM);
    let status = first
        .wait_timeout(Duration::from_secs(15))
        .expect("the first worker exits");
    assert!(status.success(), "{status:?}\n{}", first.log());
    assert!(
        t0.elapsed() < Duration::from_secs(2 + 1 + 6),
        "{:?}",
        t0.elapsed()
    );
    assert!(first.log().contains("handed back"), "{}", first.log());

    let _second = world.spawn_worker("second", &[]);
    let restart = second_worker_finishes(runs.path(), 30).await;
    let ev = events(runs.path());
    // An interruption is not a failure: still the first attempt.
    assert_eq!(restart.attempt, 1, "{ev:?}");
    // Within seconds of the release, far less than the 60 s ack deadline.
    let released_at = ev[0].at_ms + 2_000;
    assert!(
        restart.at_ms < released_at + 20_000,
        "picked up at once, not after the ack deadline: {ev:?}"
    );
}

/// Waits for the worker named "second" to finish the task; returns its start.
async fn second_worker_finishes(runs: &std::path::Path, secs: u64) -> Event {
    wait_for_event(runs, secs, "the second worker to finish it", |e| {
        e.what == "end" && e.worker == "second"
    })
    .await;
    first_event(runs, |e| e.what == "start" && e.worker == "second")
}

/// kill -9 mid-task: nothing is released, so another worker gets the task
/// only after the ack deadline.
#[tokio::test(flavor = "multi_thread")]
async fn a_killed_workers_task_comes_back_after_the_ack_deadline() {
    let runs = tempfile::NamedTempFile::new().unwrap();
    let extra = format!(
        "{FAST_RETRY}{}",
        recording_handler("long", runs.path(), "cpu")
    );
    // ack_deadline is 10 s in the test worlds.
    let world = World::new("kill9", &extra).await;
    let first = world.spawn_worker("first", &[]);
    world
        .publish(&[task("long", "K", r#"{"seconds": 3}"#)])
        .await;
    eventually(Duration::from_secs(20), "the task to start", || {
        !events(runs.path()).is_empty()
    })
    .await;
    first.signal(Signal::SIGKILL);
    let killed_at = events(runs.path())[0].at_ms;
    let _second = world.spawn_worker("second", &[]);
    let restart = second_worker_finishes(runs.path(), 40).await;
    let ev = events(runs.path());
    assert_eq!(restart.attempt, 2, "{ev:?}");
    assert!(
        restart.at_ms >= killed_at + 5_000,
        "not before the lease lapsed: {ev:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn job_mode_exits_zero_once_idle() {
    let runs = tempfile::NamedTempFile::new().unwrap();
    let extra = recording_handler("job", runs.path(), "cpu");
    let world = World::new("job", &extra).await;
    world
        .publish(&[
            task("job", "j1", r#"{"seconds": 3}"#),
            task("job", "j2", r#"{"seconds": 1}"#),
        ])
        .await;
    let mut worker = world.spawn_worker("w1", &["--exit-when-idle", "2s"]);
    let status = worker
        .wait_timeout(Duration::from_secs(30))
        .expect("exits when idle");
    assert!(status.success(), "{}", worker.log());
    let ends = events(runs.path())
        .iter()
        .filter(|e| e.what == "end")
        .count();
    assert_eq!(ends, 2, "both ran before the exit");
}

/// Losing Pub/Sub (the emulator stopped and started again) never kills the
/// worker: pulls retry with backoff and it goes on pulling afterwards.
#[tokio::test(flavor = "multi_thread")]
async fn the_worker_survives_an_emulator_restart() {
    use leasehold::emulator::{Emulator, free_port};
    let port = free_port().unwrap();
    let emulator = tokio::task::spawn_blocking(move || Emulator::start_on(port, None))
        .await
        .unwrap()
        .expect("a private emulator");
    let host = emulator.host().to_string();
    let runs = tempfile::NamedTempFile::new().unwrap();
    let extra = recording_handler("job", runs.path(), "cpu");
    let world = World::new_on(&host, "restart", &extra).await;
    let mut worker = world.spawn_worker("w1", &[]);
    world
        .publish(&[task("job", "before", r#"{"seconds": 4}"#)])
        .await;
    eventually(Duration::from_secs(20), "the first task to start", || {
        !events(runs.path()).is_empty()
    })
    .await;

    let http = worker.http_addr().await;
    let ready = |want: u16| {
        let http = http.clone();
        move || http_get(&http, "/readyz").map_or(0, |(s, _)| s) == want
    };
    eventually(
        Duration::from_secs(10),
        "ready while Pub/Sub answers",
        ready(200),
    )
    .await;

    tokio::task::spawn_blocking(move || drop(emulator))
        .await
        .unwrap();
    eventually(
        Duration::from_secs(20),
        "not ready without Pub/Sub",
        ready(503),
    )
    .await;
    assert!(
        worker.wait_timeout(Duration::from_millis(10)).is_none(),
        "alive without Pub/Sub"
    );
    assert_eq!(
        http_get(&http, "/healthz").unwrap().0,
        200,
        "alive, just not ready"
    );
    let emulator = tokio::task::spawn_blocking(move || Emulator::start_on(port, None))
        .await
        .unwrap()
        .expect("the emulator again, on the same port");
    // A fresh emulator is empty: recreate the resources, then publish.
    world.setup().await;
    world
        .publish(&[task("job", "after", r#"{"seconds": 0}"#)])
        .await;
    eventually(Duration::from_secs(40), "a task after the restart", || {
        events(runs.path())
            .iter()
            .any(|e| e.what == "end" && e.task == "after")
    })
    .await;
    eventually(Duration::from_secs(20), "ready again", ready(200)).await;
    // The task held through the outage runs to its end.
    eventually(Duration::from_secs(20), "the held task to end", || {
        events(runs.path())
            .iter()
            .any(|e| e.what == "end" && e.task == "before")
    })
    .await;
    let log = worker.log();
    assert!(log.contains("pull failed; retrying"), "{log}");
    assert!(
        worker.wait_timeout(Duration::from_millis(10)).is_none(),
        "still running"
    );
    worker.signal(Signal::SIGTERM);
    let status = worker.wait_timeout(Duration::from_secs(20)).expect("exits");
    assert!(status.success(), "{}", worker.log());
    tokio::task::spawn_blocking(move || drop(emulator))
        .await
        .unwrap();
}

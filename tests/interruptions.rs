//! The cluster moves, the task survives: a task handed back unfinished
//! keeps its retry budget however often it is interrupted, and the
//! subscription contract is checked at start. On the real emulator.

// Wall-clock waits on real processes: std::time::Instant is right here.
#![allow(clippy::disallowed_types)]

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use support::*;

/// One line a handler wrote: what, `LEASEHOLD_ATTEMPT`, `LEASEHOLD_INTERRUPTIONS`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Run {
    what: String,
    attempt: u32,
    interruptions: u32,
}

fn runs(path: &Path) -> Vec<Run> {
    lines(path)
        .iter()
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            Run {
                what: f[0].into(),
                attempt: f[1].parse().unwrap(),
                interruptions: f[2].parse().unwrap(),
            }
        })
        .collect()
}

/// A handler that records `start`, then sleeps `secs` (stopped by SIGTERM),
/// then records `end` and exits with `exit`.
fn handler(log: &Path, secs: u32, exit: i32) -> String {
    let script = format!(
        r#"line() {{ echo "$1 $LEASEHOLD_ATTEMPT $LEASEHOLD_INTERRUPTIONS" >> {log}; }}
line start
trap 'exit 143' TERM
sleep {secs} &
wait
line end
exit {exit}
"#,
        log = log.display()
    );
    format!(
        "[handlers.long]\nexecutor = \"cpu\"\ncommand = [\"/bin/sh\", \"-c\", {}]\n\
         [executors.cpu]\nslots = 1\n\
         [retry]\nmax_attempts = 3\nmin_backoff = \"1s\"\nmax_backoff = \"2s\"\n\
         [shutdown]\ngrace = \"0s\"\nkill_grace = \"2s\"\n",
        toml_string(&script)
    )
}

async fn wait_for_runs(log: &Path, secs: u64, what: &str, check: impl Fn(&[Run]) -> bool) {
    eventually(Duration::from_secs(secs), what, || check(&runs(log))).await;
}

/// SIGTERM, and the worker exits cleanly within 20 s.
fn interrupt(mut worker: WorkerProcess) {
    worker.signal(Signal::SIGTERM);
    let status = worker
        .wait_timeout(Duration::from_secs(20))
        .unwrap_or_else(|| panic!("no exit after SIGTERM\n{}", worker.log()));
    assert!(status.success(), "{status:?}\n{}", worker.log());
}

async fn nothing_dead_lettered(world: &World) {
    let dead = world.subscription(&world.config.pubsub.dead_letter_topic);
    let got = world.pull_for(&dead, Duration::from_secs(2)).await;
    assert!(got.is_empty(), "dead-lettered: {got:?}");
}

/// Ten SIGTERMs in a row, each during the task, then one run to its end:
/// the task succeeds as attempt 1 with ten interruptions, and Pub/Sub's
/// dead-letter policy (5 deliveries here) never forwards it.
#[tokio::test(flavor = "multi_thread")]
async fn ten_interruptions_spend_no_retry_budget() {
    let log = tempfile::NamedTempFile::new().unwrap();
    let world = World::new("interrupted", &handler(log.path(), 4, 0)).await;
    assert_eq!(world.config.max_delivery_attempts(), 5);
    world.publish(&[task("long", "i-1", "{}")]).await;
    for i in 0..10 {
        let worker = world.spawn_worker(&format!("w{i}"), &[]);
        wait_for_runs(log.path(), 30, "the task starts", |r| {
            r.iter().filter(|r| r.what == "start").count() == i + 1
        })
        .await;
        interrupt(worker);
    }
    let worker = world.spawn_worker("last", &[]);
    wait_for_runs(log.path(), 30, "the task ends", |r| {
        r.iter().any(|r| r.what == "end")
    })
    .await;
    let all = runs(log.path());
    let starts: Vec<&Run> = all.iter().filter(|r| r.what == "start").collect();
    assert_eq!(starts.len(), 11, "{all:?}\n{}", worker.log());
    for (i, run) in starts.iter().enumerate() {
        assert_eq!(run.attempt, 1, "an interruption is not a failure: {all:?}");
        assert_eq!(run.interruptions, u32::try_from(i).unwrap(), "{all:?}");
    }
    nothing_dead_lettered(&world).await;
}

/// A task that always fails, interrupted twice along the way, still runs
/// exactly `max_attempts` failing times before it is dead-lettered.
#[tokio::test(flavor = "multi_thread")]
async fn an_always_failing_task_interrupted_twice_fails_exactly_max_attempts_times() {
    let log = tempfile::NamedTempFile::new().unwrap();
    let world = World::new("failing", &handler(log.path(), 2, 3)).await;
    world.publish(&[task("long", "f-1", "{}")]).await;
    let ends = |r: &[Run]| r.iter().filter(|r| r.what == "end").count();
    let starts = |r: &[Run]| r.iter().filter(|r| r.what == "start").count();

    // Interrupted during attempt 1.
    let w1 = world.spawn_worker("w1", &[]);
    wait_for_runs(log.path(), 30, "attempt 1 starts", |r| starts(r) == 1).await;
    interrupt(w1);
    // Attempt 1 fails; attempt 2 is interrupted.
    let w2 = world.spawn_worker("w2", &[]);
    wait_for_runs(log.path(), 30, "attempt 2 starts", |r| {
        ends(r) == 1 && starts(r) == 3
    })
    .await;
    interrupt(w2);
    // Attempts 2 and 3 fail; then the dead letter.
    let w3 = world.spawn_worker("w3", &[]);
    let dead = world.subscription(&world.config.pubsub.dead_letter_topic);
    let got = pull_until(&world, &dead, Duration::from_secs(40), |g| !g.is_empty()).await;
    assert_eq!(got.len(), 1, "{}", w3.log());
    let reason = &got[0].message.as_ref().unwrap().attributes["leasehold_error"];
    assert!(reason.contains("gave up after 3 attempts"), "{reason}");

    let all = runs(log.path());
    let failing: Vec<(u32, u32)> = all
        .iter()
        .filter(|r| r.what == "end")
        .map(|r| (r.attempt, r.interruptions))
        .collect();
    assert_eq!(failing, [(1, 1), (2, 2), (3, 2)], "{all:?}");
    assert_eq!(starts(&all), 5, "3 failing runs and 2 interrupted: {all:?}");
}

/// A subscription made by other tooling, without the dead-letter policy
/// retries are counted by, is refused at start with what is wrong and how
/// to fix it.
#[tokio::test(flavor = "multi_thread")]
async fn a_bare_subscription_is_refused_at_start() {
    let world = World::without_setup(&emulator_host(), "bare", "");
    let topic = world.conn.topic_path(&world.config.executors["cpu"].topic);
    world
        .conn
        .topic_admin()
        .await
        .unwrap()
        .create_topic()
        .set_name(&topic)
        .send()
        .await
        .unwrap();
    world
        .conn
        .subscription_admin()
        .await
        .unwrap()
        .create_subscription()
        .set_name(world.cpu_subscription())
        .set_topic(&topic)
        .send()
        .await
        .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_leasehold"))
        .arg("run")
        .args(world.config_args())
        .env("PUBSUB_EMULATOR_HOST", &world.host)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains(&world.cpu_subscription()), "{err}");
    assert!(err.contains("dead_letter_policy is none"), "{err}");
    assert!(err.contains("run `leasehold setup`"), "{err}");
    // And once set up, the same worker starts.
    world.setup().await;
    let mut worker = world.spawn_worker("w1", &[]);
    worker.http_addr().await;
    worker.signal(Signal::SIGTERM);
    assert!(worker.wait_timeout(Duration::from_secs(20)).is_some());
    assert!(
        !worker.log().contains("dead_letter_policy"),
        "{}",
        worker.log()
    );
}

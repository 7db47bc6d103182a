//! Reconciliation soak on the real emulator: a few thousand tasks, a tenth
//! failing permanently and a tenth failing once, two workers, one restarted
//! midway. Every task id must end exactly once, as succeeded or
//! dead-lettered: none lost, none run to success twice.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tokio::time::Instant;

use leasehold::pubsub::DataPlane;
use nix::sys::signal::Signal;
use support::*;

const TASKS: usize = 3_000;

/// The fate each task is told to meet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Ok,
    Permanent,
    FailOnce,
}

/// A deterministic pseudo-random mix (an LCG), so a failure is reproducible.
fn modes() -> Vec<Mode> {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    (0..TASKS)
        .map(|_| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            match (x >> 33) % 10 {
                0 => Mode::Permanent,
                1 => Mode::FailOnce,
                _ => Mode::Ok,
            }
        })
        .collect()
}

// One scenario, read top to bottom: publish, restart midway, account for every task.
#[allow(clippy::too_many_lines)]
#[tokio::test(flavor = "multi_thread")]
async fn every_task_ends_exactly_once_through_a_worker_restart() {
    let script = r#"read -r mode
case "$mode" in
  perm) exit 65 ;;
  once) [ "$LEASEHOLD_ATTEMPT" -gt 1 ] || exit 1 ;;
esac
exit 0"#;
    let extra = format!(
        "[executors.cpu]\nslots = 8\n[retry]\nmax_attempts = 5\nmin_backoff = \"1s\"\nmax_backoff = \"4s\"\n\
         [shutdown]\ngrace = \"10s\"\nkill_grace = \"2s\"\n\
         [handlers.soak]\nexecutor = \"cpu\"\ncommand = [\"/bin/sh\", \"-c\", {}]\npermanent_exit_codes = [65]\n",
        toml_string(script)
    );
    let world = World::new("soak", &extra).await;
    let modes = modes();
    let tasks: Vec<_> = modes
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let data = match m {
                Mode::Ok => "ok",
                Mode::Permanent => "perm",
                Mode::FailOnce => "once",
            };
            task("soak", &format!("t{i:05}"), data)
        })
        .collect();
    for chunk in tasks.chunks(500) {
        world.publish(chunk).await;
    }
    let mut a = world.spawn_worker("a", &[]);
    let b = world.spawn_worker("b", &[]);

    let results = world.subscription(&world.config.pubsub.results_topic);
    let dp = world.data_plane();
    let mut finals: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut restarted = false;
    let mut a2 = None;
    let start = Instant::now();
    while finals.len() < TASKS && start.elapsed() < Duration::from_secs(240) {
        let batch = dp.pull(&results, 1000).await.unwrap();
        if batch.is_empty() {
            continue;
        }
        dp.acknowledge(
            &results,
            batch.iter().map(|m| m.ack_id.clone()).collect(),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        for m in batch {
            let attrs = &m.message.as_ref().unwrap().attributes;
            let outcome = attrs["outcome"].clone();
            if outcome == "succeeded" || outcome == "dead_lettered" {
                finals
                    .entry(attrs["task_id"].clone())
                    .or_default()
                    .push(outcome);
            }
        }
        if !restarted && finals.len() >= TASKS / 3 {
            restarted = true;
            a.signal(Signal::SIGTERM);
            let status = a.wait_timeout(Duration::from_secs(30)).expect("a stops");
            assert!(status.success(), "{}", a.log());
            a2 = Some(world.spawn_worker("a2", &[]));
        }
    }
    assert!(restarted);
    let missing: Vec<usize> = (0..TASKS)
        .filter(|i| !finals.contains_key(&format!("t{i:05}")))
        .collect();
    assert!(
        missing.is_empty(),
        "{} tasks never ended (lost?): {:?}\n{}",
        missing.len(),
        &missing[..missing.len().min(20)],
        b.log()
            .lines()
            .rev()
            .take(30)
            .collect::<Vec<_>>()
            .join("\n")
    );
    let twice: Vec<_> = finals.iter().filter(|(_, o)| o.len() > 1).collect();
    assert!(twice.is_empty(), "tasks that ended twice: {twice:?}");
    for (i, mode) in modes.iter().enumerate() {
        let outcome = &finals[&format!("t{i:05}")][0];
        let want = if *mode == Mode::Permanent {
            "dead_lettered"
        } else {
            "succeeded"
        };
        assert_eq!(outcome, want, "t{i:05} ({mode:?})");
    }
    // The dead-letter topic holds exactly the permanent failures.
    let dead = world.subscription(&world.config.pubsub.dead_letter_topic);
    let mut dead_ids = BTreeSet::new();
    let start = Instant::now();
    let permanent = modes.iter().filter(|m| **m == Mode::Permanent).count();
    while dead_ids.len() < permanent && start.elapsed() < Duration::from_secs(30) {
        let batch = dp.pull(&dead, 1000).await.unwrap();
        if !batch.is_empty() {
            dp.acknowledge(
                &dead,
                batch.iter().map(|m| m.ack_id.clone()).collect(),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
        }
        for m in batch {
            assert!(
                dead_ids.insert(m.message.unwrap().attributes["task_id"].clone()),
                "dead-lettered twice"
            );
        }
    }
    assert_eq!(dead_ids.len(), permanent);
    drop(a2);
}

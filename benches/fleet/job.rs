//! Job mode on the emulator: how soon `run --exit-when-idle 1s` exits after
//! it decides it is idle, how soon after its start it first pulls, and that a
//! message published at the moment of exit is not stranded. And the probe
//! behind the design: a Pull its client cancels strands what the server had
//! already assigned to it, until the ack deadline.

use std::sync::Arc;
use std::time::Duration;

use leasehold::pubsub::DataPlane as _;

use crate::processes::{World, logged_at, now_us, spawn_worker};
use crate::schedule::What;

/// The log line of the idle decision (`worker.rs`).
const DECISION: &str = "idle for the --exit-when-idle period";

/// One Job-mode life: a 20 ms task waiting, then idle. Milliseconds.
#[derive(Debug, Clone)]
#[allow(clippy::struct_field_names)]
pub struct Exit {
    /// Spawn → "executor started" (configuration, clients, HTTP server).
    pub spawn_to_executor_ms: f64,
    /// Spawn → "task started": start-up and the first Pull's answer.
    pub spawn_to_first_pull_ms: f64,
    /// The idle decision → the process has exited.
    pub decision_to_exit_ms: f64,
    /// The task's end → the process has exited (`--exit-when-idle 1s` of it is the idle period).
    pub end_to_exit_ms: f64,
}

pub async fn exit_times(host: &str) -> Exit {
    let world = World::new(host, "job", 2, 60).await;
    world.publish(&[("j1".to_string(), 20)]).await;
    let mut worker = spawn_worker(&world, "job", &["--exit-when-idle", "1s"]);
    let (exited, status) = worker
        .exit(Duration::from_secs(60))
        .await
        .unwrap_or_else(|| panic!("Job mode did not exit: {}", worker.dump()));
    assert!(status.success(), "{status}: {}", worker.dump());
    let at = |what| {
        logged_at(&worker, what).unwrap_or_else(|| panic!("no {what:?} line: {}", worker.dump()))
    };
    let end = world
        .read_records()
        .iter()
        .find(|r| r.what == What::End)
        .map(|r| r.us)
        .expect("the task ran");
    let ms = |from: i64, to: i64| (to - from) as f64 / 1e3;
    Exit {
        spawn_to_executor_ms: ms(worker.spawned_us, at("executor started")),
        spawn_to_first_pull_ms: ms(worker.spawned_us, at("task started")),
        decision_to_exit_ms: ms(at(DECISION), exited),
        end_to_exit_ms: ms(end, exited),
    }
}

/// A message published the moment the worker decided to exit.
#[derive(Debug, Clone)]
pub struct Race {
    /// One of the worker's Pulls brought it after the stop, and it was released.
    pub released_by_worker: bool,
    /// The worker ran it before stopping (not stranded either).
    pub ran_by_worker: bool,
    /// The worker's exit → another consumer received it.
    pub exit_to_received_ms: f64,
}

pub async fn exit_race(host: &str) -> Race {
    let world = World::new(host, "race", 2, 60).await;
    world.publish(&[("j1".to_string(), 20)]).await;
    let mut worker = spawn_worker(&world, "race", &["--exit-when-idle", "1s"]);
    worker
        .wait_for(DECISION, Duration::from_secs(60))
        .await
        .unwrap_or_else(|| panic!("no idle decision: {}", worker.dump()));
    world.publish(&[("late".to_string(), 20)]).await;
    let (exited, status) = worker
        .exit(Duration::from_secs(60))
        .await
        .unwrap_or_else(|| panic!("Job mode did not exit: {}", worker.dump()));
    assert!(status.success(), "{status}: {}", worker.dump());
    let released_by_worker = worker
        .lines()
        .iter()
        .any(|(_, l)| l.contains("releasing messages pulled after the stop"));
    let ran_by_worker = world.read_records().iter().any(|r| r.task == "late");
    let exit_to_received_ms = if ran_by_worker {
        0.0
    } else {
        let got = receive(&world, "late", Duration::from_secs(90))
            .await
            .expect("the late message reached another consumer within 90 s");
        (got - exited) as f64 / 1e3
    };
    Race {
        released_by_worker,
        ran_by_worker,
        exit_to_received_ms,
    }
}

/// Pulls (as another consumer) until the message of `task` arrives; acks
/// what it gets. Returns when it arrived.
async fn receive(world: &World, task: &str, timeout: Duration) -> Option<i64> {
    let dp = world
        .conn
        .data_plane()
        .with_pull_timeout(Duration::from_secs(2));
    let sub = world.conn.subscription_path(world.subscription());
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        let got = dp.pull(&sub, 10).await.unwrap_or_default();
        let at = now_us();
        let found = got.iter().any(|m| {
            m.message.as_ref().and_then(|m| m.attributes.get("task_id")) == Some(&task.to_string())
        });
        let ids: Vec<String> = got.into_iter().map(|m| m.ack_id).collect();
        if !ids.is_empty() {
            let _ = dp.acknowledge(&sub, ids, Duration::from_secs(10)).await;
        }
        if found {
            return Some(at);
        }
    }
    None
}

/// Cancelled Pulls: what became of the message published just before each cancel.
#[derive(Debug, Clone, Default)]
pub struct Probe {
    pub trials: usize,
    /// The Pull answered with the message before the cancel took effect.
    pub answered: usize,
    /// Cancelled; another consumer got the message within 2 s.
    pub prompt: usize,
    /// Cancelled; the message came back only after 2 s or more (its ack
    /// deadline is 10 s).
    pub stranded: usize,
    /// The longest time another consumer waited for a stranded message.
    pub longest_stranded_s: f64,
}

/// Issues a Pull, publishes one message while it waits, cancels the Pull
/// 0–4 ms after the publish answered, then pulls as another consumer.
pub async fn cancel_probe(host: &str, trials: usize) -> Probe {
    let world = World::new(host, "cancel", 1, 10).await;
    let a = Arc::new(
        world
            .conn
            .data_plane()
            .with_pull_timeout(Duration::from_secs(30)),
    );
    let sub = world.conn.subscription_path(world.subscription());
    let mut probe = Probe {
        trials,
        ..Probe::default()
    };
    for i in 0..trials {
        let (a2, sub2) = (a.clone(), sub.clone());
        let pull = tokio::spawn(async move { a2.pull(&sub2, 1).await });
        tokio::time::sleep(Duration::from_millis(200)).await;
        let task = format!("c{i}");
        world.publish(&[(task.clone(), 0)]).await;
        tokio::time::sleep(Duration::from_micros(1000 * (i as u64 % 5))).await;
        pull.abort();
        let cancelled_at = now_us();
        if let Ok(Ok(got)) = pull.await {
            probe.answered += 1;
            let ids: Vec<String> = got.into_iter().map(|m| m.ack_id).collect();
            let _ = a.acknowledge(&sub, ids, Duration::from_secs(10)).await;
            continue;
        }
        let got = receive(&world, &task, Duration::from_secs(40))
            .await
            .expect("a cancelled Pull's message comes back by its deadline");
        let waited = (got - cancelled_at) as f64 / 1e6;
        if waited < 2.0 {
            probe.prompt += 1;
        } else {
            probe.stranded += 1;
            probe.longest_stranded_s = probe.longest_stranded_s.max(waited);
        }
    }
    probe
}

//! Busy pods are the last to go, end to end: the real binary runs a task from
//! the emulator with `POD_NAME` / `POD_NAMESPACE` set and a kubeconfig (for
//! the worker process only) pointing at a fake Kubernetes API
//! ([`FakeKube`]), which records what the worker's `kube` client sends.

// Wall-clock waits on a real process.
#![allow(clippy::disallowed_types)]

#[path = "support/fake_kube.rs"]
mod fake_kube;
mod support;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use fake_kube::{Answer, FakeKube, TOKEN};
use nix::sys::signal::Signal;
use support::*;

const NAMESPACE: &str = "work";
const POD: &str = "leasehold-cpu-7d9f-x2x4k";
const COST: &str = "controller.kubernetes.io/pod-deletion-cost";
const EVICT: &str = "cluster-autoscaler.kubernetes.io/safe-to-evict";
/// An annotation someone else set: a merge patch leaves it alone.
const OTHER: (&str, &str) = ("example.com/owner", "render-team");

/// A world with a 4 s `sleep` task, and a worker that knows its pod and
/// reaches the fake API through `KUBECONFIG`.
async fn run_one_task(name: &str, kube: &FakeKube) -> (World, WorkerProcess) {
    let world = World::new(name, "[executors.cpu]\nslots = 1\n").await;
    let kubeconfig = kube.write_kubeconfig(&world.path("kubeconfig"));
    let kubeconfig = kubeconfig.display().to_string();
    let worker = spawn_in_pod(
        &world,
        name,
        &[
            ("POD_NAME", POD),
            ("POD_NAMESPACE", NAMESPACE),
            ("KUBECONFIG", &kubeconfig),
        ],
    );
    eventually(Duration::from_secs(20), "the first patch (idle)", || {
        !kube.requests().is_empty()
    })
    .await;
    // Past the worker's one-patch-a-second gap, so busy is patched as the
    // task starts.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    world
        .publish(&[task("sleep", "slept", r#"{"seconds": 4}"#)])
        .await;
    eventually(Duration::from_secs(30), "the task to succeed", || {
        worker.log().contains("task succeeded")
    })
    .await;
    eventually(Duration::from_secs(10), "idle, busy, idle", || {
        kube.requests().len() >= 3
    })
    .await;
    // Nothing more follows (a 4 s task gets no minute refresh).
    tokio::time::sleep(Duration::from_secs(2)).await;
    (world, worker)
}

/// `leasehold run` with `envs`, and no Kubernetes API but the one `envs`
/// names (the tests may themselves run in a pod, or with a KUBECONFIG).
fn spawn_in_pod(world: &World, name: &str, envs: &[(&str, &str)]) -> WorkerProcess {
    let mut command = Command::new(env!("CARGO_BIN_EXE_leasehold"));
    command
        .arg("run")
        .args(world.config_args())
        .env("PUBSUB_EMULATOR_HOST", &world.host)
        .env("RUST_LOG", "info")
        .env_remove("LEASEHOLD_LOG_FORMAT")
        .env_remove("KUBECONFIG")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .envs(envs.iter().copied());
    WorkerProcess::spawn(command, world.path(&format!("{name}.log")))
}

/// SIGTERM: the worker stops cleanly, as it does without a cluster.
fn stop(mut worker: WorkerProcess) -> String {
    worker.signal(Signal::SIGTERM);
    let status = worker.wait_timeout(Duration::from_secs(20)).expect("exits");
    assert!(status.success(), "{status:?}\n{}", worker.log());
    worker.log()
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_busy_idle_reach_the_pod_as_merge_patches() {
    let kube = FakeKube::start(Answer::Accept, NAMESPACE, POD, &[OTHER]).await;
    let (_world, worker) = run_one_task("pods-accept", &kube).await;
    let requests = kube.requests();
    assert_eq!(requests.len(), 3, "{requests:#?}\n{}", worker.log());
    for r in &requests {
        assert_eq!(r.method, "PATCH");
        assert_eq!(r.path, format!("/api/v1/namespaces/{NAMESPACE}/pods/{POD}"));
        // kube writes `?&fieldManager=...`; the API server, like this, reads
        // the non-empty pairs.
        let params: Vec<&str> = r.query.split('&').filter(|p| !p.is_empty()).collect();
        assert_eq!(params, ["fieldManager=leasehold"], "{}", r.query);
        assert_eq!(r.content_type, "application/merge-patch+json");
        assert!(
            r.accept.contains("as=PartialObjectMetadata"),
            "{}",
            r.accept
        );
        assert_eq!(r.authorization, format!("Bearer {TOKEN}"));
        // The body is the two annotations and nothing else.
        let keys: Vec<&String> = r.body["metadata"].as_object().unwrap().keys().collect();
        assert_eq!(keys, ["annotations"], "{}", r.body);
        assert_eq!(r.body.as_object().unwrap().len(), 1, "{}", r.body);
    }
    let want = |cost: &str, evict: &str| {
        BTreeMap::from([
            (COST.to_string(), cost.to_string()),
            (EVICT.to_string(), evict.to_string()),
        ])
    };
    assert_eq!(
        requests[0].annotations(),
        want("0", "true"),
        "idle at start"
    );
    // Busy as the task starts: one second of work at most so far.
    assert_eq!(requests[1].annotations(), want("1", "false"), "busy");
    assert_eq!(requests[2].annotations(), want("0", "true"), "idle again");
    let busy_for = requests[2].at - requests[1].at;
    assert!(
        busy_for >= Duration::from_millis(3500),
        "busy for the 4 s task: {busy_for:?}"
    );
    // Merged, not replaced: the other annotation is still there.
    let on_pod = kube.annotations();
    assert_eq!(on_pod.get(OTHER.0).map(String::as_str), Some(OTHER.1));
    assert_eq!(on_pod[COST], "0");
    assert_eq!(on_pod[EVICT], "true");

    let log = stop(worker);
    assert!(
        log.contains(&format!("pod={NAMESPACE}/{POD}")) && log.contains("annotating this pod"),
        "{log}"
    );
    assert!(!log.contains("WARN"), "no warning: {log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refusal_is_logged_once_and_the_task_still_succeeds() {
    let kube = FakeKube::start(Answer::Forbid, NAMESPACE, POD, &[OTHER]).await;
    let (world, worker) = run_one_task("pods-forbid", &kube).await;
    // Three refusals (idle, busy, idle), all three asked for.
    let requests = kube.requests();
    assert_eq!(requests.len(), 3, "{requests:#?}\n{}", worker.log());
    assert_eq!(requests[1].annotations()[EVICT], "false");
    assert_eq!(kube.annotations().len(), 1, "nothing changed on the pod");

    let log = worker.log();
    let refusals: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("cannot annotate this pod"))
        .collect();
    assert_eq!(refusals.len(), 1, "logged once: {log}");
    assert!(refusals[0].contains("WARN"), "{}", refusals[0]);
    assert!(refusals[0].contains("403 Forbidden"), "{}", refusals[0]);
    assert!(
        refusals[0].contains("cannot patch resource"),
        "{}",
        refusals[0]
    );
    // Nothing else changed: the worker is ready, the task was acked once.
    let (code, _) = http_get(&worker.http_addr().await, "/readyz").unwrap();
    assert_eq!(code, 200);
    assert_eq!(log.matches("task succeeded").count(), 1, "{log}");
    let left = world
        .pull_for(&world.cpu_subscription(), Duration::from_secs(2))
        .await;
    assert!(left.is_empty(), "acked: {left:?}");
    stop(worker);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pod_name_without_an_api_is_warned_once_and_nothing_else() {
    let world = World::new("pods-noapi", "").await;
    let worker = spawn_in_pod(
        &world,
        "pods-noapi",
        &[("POD_NAME", POD), ("POD_NAMESPACE", NAMESPACE)],
    );
    world
        .publish(&[task("sleep", "short", r#"{"seconds": 1}"#)])
        .await;
    eventually(Duration::from_secs(30), "the task to succeed", || {
        worker.log().contains("task succeeded")
    })
    .await;
    let log = stop(worker);
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains("WARN")).collect();
    assert_eq!(warnings.len(), 1, "{log}");
    assert!(
        warnings[0].contains("no Kubernetes API is configured"),
        "{}",
        warnings[0]
    );
}

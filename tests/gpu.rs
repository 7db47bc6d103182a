//! The GPU executor against the real emulator: one task per device, pinning,
//! no head-of-line blocking between classes, and device discovery.

mod support;

use std::process::Command;
use std::time::Duration;

use support::*;

fn gpu_world_extra(runs: &std::path::Path) -> String {
    format!(
        "[executors.cpu]\nslots = 2\n[executors.gpu]\nenabled = true\ndevices = [\"0\", \"1\"]\n{}{}",
        recording_handler("render", runs, "gpu"),
        recording_handler("reduce", runs, "cpu"),
    )
}

/// Four 3-second GPU tasks on two devices: at most two at once, never two on
/// one device, each task saw exactly one device.
#[tokio::test(flavor = "multi_thread")]
async fn gpu_tasks_get_one_device_each_and_never_share_it() {
    let runs = tempfile::NamedTempFile::new().unwrap();
    let world = World::new("gpu4", &gpu_world_extra(runs.path())).await;
    let worker = world.spawn_worker("w1", &[]);
    let tasks: Vec<_> = (1..=4)
        .map(|i| task("render", &format!("r{i}"), r#"{"seconds": 3}"#))
        .collect();
    world.publish(&tasks).await;
    eventually(Duration::from_secs(60), "four renders to end", || {
        events(runs.path())
            .iter()
            .filter(|e| e.what == "end")
            .count()
            == 4
    })
    .await;
    let ev = events(runs.path());
    // Intervals per task, with the device each saw.
    let mut spans = Vec::new();
    for t in ["r1", "r2", "r3", "r4"] {
        let s = ev
            .iter()
            .find(|e| e.what == "start" && e.task == t)
            .unwrap();
        let e = ev.iter().find(|e| e.what == "end" && e.task == t).unwrap();
        assert!(
            s.device == "0" || s.device == "1",
            "{t} saw one device: {ev:?}"
        );
        assert_eq!(s.device, e.device);
        spans.push((s.at_ms, e.at_ms, s.device.clone(), t));
    }
    // At most two at once: the most tasks running at any instant (an end
    // and a start at the same millisecond count as a hand-over).
    let mut edges: Vec<(u64, i32)> = spans.iter().flat_map(|s| [(s.0, 1), (s.1, -1)]).collect();
    edges.sort_unstable();
    let mut running = 0;
    for (_, step) in edges {
        running += step;
        assert!(running <= 2, "at most two at once: {spans:?}");
    }
    for (i, a) in spans.iter().enumerate() {
        for b in spans.iter().skip(i + 1) {
            if b.0 < a.1 && a.0 < b.1 {
                assert_ne!(a.2, b.2, "{} and {} shared a device: {spans:?}", a.3, b.3);
            }
        }
    }
    // Two devices, four 3 s tasks: two waves.
    let first_start = spans.iter().map(|s| s.0).min().unwrap();
    let last_end = spans.iter().map(|s| s.1).max().unwrap();
    assert!(last_end - first_start >= 6_000, "two waves: {spans:?}");
    assert!(
        worker.log().contains("devices=Some([\"0\", \"1\"])"),
        "{}",
        worker.log()
    );
}

/// A CPU task starts and finishes while both GPU slots are busy.
#[tokio::test(flavor = "multi_thread")]
async fn cpu_work_is_not_blocked_by_busy_gpus() {
    let runs = tempfile::NamedTempFile::new().unwrap();
    let world = World::new("hol", &gpu_world_extra(runs.path())).await;
    let _worker = world.spawn_worker("w1", &[]);
    let renders: Vec<_> = (1..=3)
        .map(|i| task("render", &format!("r{i}"), r#"{"seconds": 10}"#))
        .collect();
    world.publish(&renders).await;
    eventually(Duration::from_secs(20), "both GPUs to be busy", || {
        events(runs.path())
            .iter()
            .filter(|e| e.what == "start")
            .count()
            == 2
    })
    .await;
    world
        .publish(&[task("reduce", "c1", r#"{"seconds": 1}"#)])
        .await;
    eventually(Duration::from_secs(60), "everything to end", || {
        events(runs.path())
            .iter()
            .filter(|e| e.what == "end")
            .count()
            == 4
    })
    .await;
    let ev = events(runs.path());
    let cpu_end = ev
        .iter()
        .find(|e| e.what == "end" && e.task == "c1")
        .unwrap()
        .at_ms;
    let gpu_first_end = ev
        .iter()
        .filter(|e| e.what == "end" && e.task.starts_with('r'))
        .map(|e| e.at_ms)
        .min()
        .unwrap();
    assert!(
        cpu_end < gpu_first_end,
        "the CPU task finished while GPUs were busy: {ev:?}"
    );
    let cpu_start = ev
        .iter()
        .find(|e| e.what == "start" && e.task == "c1")
        .unwrap();
    assert_eq!(cpu_start.device, "", "a CPU task sees no GPU pin");
}

fn check_config(
    world_args: &[String],
    path_env: &str,
    visible: Option<&str>,
) -> std::process::Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_leasehold"));
    c.arg("check-config").args(world_args).env("PATH", path_env);
    match visible {
        Some(v) => c.env("NVIDIA_VISIBLE_DEVICES", v),
        None => c.env_remove("NVIDIA_VISIBLE_DEVICES"),
    };
    c.output().unwrap()
}

/// `devices = "auto"`: a fake nvidia-smi on PATH listing three GPUs gives
/// three slots pinned by UUID; `NVIDIA_VISIBLE_DEVICES` narrows them (indices
/// mapped to UUIDs, UUIDs as given, `none` = no GPU); neither is a clear error.
#[test]
fn auto_discovery_uses_visible_devices_then_nvidia_smi() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let smi = bin.join("nvidia-smi");
    std::fs::write(
        &smi,
        "#!/bin/sh\n[ \"$1\" = \"-L\" ] || exit 2\n\
         echo 'GPU 0: NVIDIA H200 (UUID: GPU-0000)'\n\
         echo 'GPU 1: NVIDIA H200 (UUID: GPU-1111)'\n\
         echo 'GPU 2: NVIDIA H200 (UUID: GPU-2222)'\n",
    )
    .unwrap();
    std::fs::set_permissions(&smi, std::fs::Permissions::from_mode(0o755)).unwrap();
    let config = dir.path().join("gpu.toml");
    std::fs::write(
        &config,
        "[executors.gpu]\nenabled = true\ndevices = \"auto\"\n",
    )
    .unwrap();
    let args = vec!["--config".to_string(), config.display().to_string()];
    let system_path = std::env::var("PATH").unwrap_or_default();
    let with_fake = format!("{}:{system_path}", bin.display());

    let out = check_config(&args, &with_fake, None);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains(
            "# gpu: subscription leasehold-tasks-gpu, slots 3, devices [GPU-0000, GPU-1111, GPU-2222]"
        ),
        "{text}"
    );

    // An empty NVIDIA_VISIBLE_DEVICES counts as unset: nvidia-smi decides.
    let out = check_config(&args, &with_fake, Some(""));
    assert!(String::from_utf8_lossy(&out.stdout).contains("slots 3"));

    // Indices are pinned by the UUIDs the driver gives them, never copied.
    let out = check_config(&args, &with_fake, Some("0,2"));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("slots 2, devices [GPU-0000, GPU-2222]"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // UUIDs from the device plugin are used as they are; "none" is no GPU.
    let out = check_config(&args, &with_fake, Some("GPU-1111"));
    assert!(String::from_utf8_lossy(&out.stdout).contains("slots 1, devices [GPU-1111]"));
    let out = check_config(&args, &with_fake, Some("none"));
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no GPU"));

    // No NVIDIA_VISIBLE_DEVICES and no nvidia-smi: a clear error, for
    // check-config and for run alike.
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let no_smi = empty.display().to_string();
    for visible in [None, Some("")] {
        let out = check_config(&args, &no_smi, visible);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{err}");
        assert!(err.contains("no GPU was found"), "{err}");
        assert!(err.contains("NVIDIA_VISIBLE_DEVICES"), "{err}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_leasehold"))
        .arg("run")
        .args(&args)
        .env("PATH", &no_smi)
        .env_remove("NVIDIA_VISIBLE_DEVICES")
        .env("PUBSUB_EMULATOR_HOST", "127.0.0.1:9")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("no GPU was found"), "{err}");
}

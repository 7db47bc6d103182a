//! The command line: configuration errors, check-config, setup, publish.

mod support;

use std::process::Command;

use leasehold::pubsub::DataPlane;
use support::*;

fn leasehold() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_leasehold"));
    c.env_remove("LEASEHOLD_LOG_FORMAT");
    c
}

#[test]
fn bad_configuration_exits_64_with_one_line_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("[executors.cpu]\nslots = -1", "executors.cpu.slots"),
        ("[lease]\nextension = \"1s\"", "lease.extension"),
        ("[executors.cpu]\nslotz = 1", "executors.cpu.slotz"),
        ("[handlers.x]\nexecutor = \"cpu\"", "handlers.x"),
    ];
    for (toml, key) in cases {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, toml).unwrap();
        for command in ["run", "check-config", "setup"] {
            let out = leasehold()
                .args([command, "--config"])
                .arg(&path)
                // Would be used if the config were good: it must not get that far.
                .env("PUBSUB_EMULATOR_HOST", "127.0.0.1:9")
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(64), "{command} {toml:?}: {stderr}");
            assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
            assert!(stderr.contains(&format!("`{key}`")), "{toml:?}: {stderr}");
        }
    }
    let out = leasehold()
        .args(["check-config"])
        .env("LEASEHOLD__RETRY__MAX_ATTEMPTS", "zero")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("`retry.max_attempts`"));
    let out = leasehold().args(["run", "--bogus"]).output().unwrap();
    assert_eq!(out.status.code(), Some(64), "usage errors are 64 too");
}

#[test]
fn check_config_prints_the_effective_configuration_and_slots() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(
        &path,
        "[executors.cpu]\nslots = 3\n[executors.gpu]\nenabled = true\ndevices = [\"0\", \"1\"]\n",
    )
    .unwrap();
    let out = leasehold()
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("slots = 3"), "{text}");
    assert!(
        text.contains("# cpu: subscription leasehold-tasks-cpu, slots 3"),
        "{text}"
    );
    assert!(
        text.contains("# gpu: subscription leasehold-tasks-gpu, slots 2, devices [0, 1]"),
        "{text}"
    );
    // The printed configuration is itself a valid configuration.
    let printed = dir.path().join("printed.toml");
    std::fs::write(&printed, text.as_bytes()).unwrap();
    let again = leasehold()
        .args(["check-config", "--config"])
        .arg(&printed)
        .output()
        .unwrap();
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn setup_is_idempotent_and_sets_the_dead_letter_policy() {
    let world = World::new(
        "setup",
        "[executors.gpu]\nenabled = true\ndevices = [\"0\"]\n",
    )
    .await;
    // World::new ran setup once; run it again through the binary.
    let out = leasehold()
        .arg("setup")
        .args(world.config_args())
        .env("PUBSUB_EMULATOR_HOST", emulator_host())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    // 4 topics (cpu, gpu, dead-letter, results) and 4 subscriptions.
    assert_eq!(lines.len(), 8, "{text}");
    assert!(lines.iter().all(|l| l.starts_with("unchanged")), "{text}");

    let subs = world.conn.subscription_admin().await.unwrap();
    let cpu = subs
        .get_subscription()
        .set_subscription(world.cpu_subscription())
        .send()
        .await
        .unwrap();
    assert_eq!(cpu.ack_deadline_seconds, 10);
    let policy = cpu.dead_letter_policy.expect("dead-letter policy");
    assert_eq!(
        policy.dead_letter_topic,
        world
            .conn
            .topic_path(&world.config.pubsub.dead_letter_topic)
    );
    assert_eq!(policy.max_delivery_attempts, 8);
    assert!(
        cpu.retry_policy.is_none(),
        "the worker's backoff is the only delay"
    );
    // Nothing expires: every subscription has an expiration policy without
    // a ttl (the emulator reports it as `{}`), and dead letters are kept 7 days.
    let config = &world.config;
    let mut names: Vec<String> = ["cpu", "gpu"]
        .iter()
        .map(|e| world.subscription(&config.executors[*e].subscription))
        .collect();
    names.push(world.subscription(&config.pubsub.results_topic));
    let dead = world.subscription(&config.pubsub.dead_letter_topic);
    names.push(dead.clone());
    for name in &names {
        let s = subs
            .get_subscription()
            .set_subscription(name)
            .send()
            .await
            .unwrap();
        let never = s
            .expiration_policy
            .as_ref()
            .is_some_and(|e| e.ttl.is_none());
        assert!(never, "{name}: {:?}", s.expiration_policy);
        if *name == dead {
            assert_eq!(
                s.message_retention_duration.map(|d| d.seconds()),
                Some(7 * 24 * 3600),
                "{name}"
            );
        }
    }

    // Drift is corrected: change the ack deadline in the config and set up again.
    let changed = world.path("changed.toml");
    std::fs::write(&changed, "[pubsub]\nack_deadline = \"20s\"\n").unwrap();
    let out = leasehold()
        .arg("setup")
        .args(world.config_args())
        .arg("--config")
        .arg(&changed)
        .env("PUBSUB_EMULATOR_HOST", emulator_host())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        text.lines().filter(|l| l.starts_with("updated")).count(),
        4,
        "{text}"
    );
    let cpu = subs
        .get_subscription()
        .set_subscription(world.cpu_subscription())
        .send()
        .await
        .unwrap();
    assert_eq!(cpu.ack_deadline_seconds, 20);
}

#[tokio::test(flavor = "multi_thread")]
async fn publish_sends_kind_task_id_attributes_and_data_to_the_kinds_topic() {
    let world = World::new(
        "publish",
        "[executors.gpu]\nenabled = true\ndevices = [\"0\"]\n[handlers.render]\nexecutor = \"gpu\"\ncommand = [\"true\"]\n",
    )
    .await;
    let out = leasehold()
        .arg("publish")
        .args(world.config_args())
        .args([
            "--kind",
            "render",
            "--task-id",
            "r-1",
            "--attr",
            "scene=castle",
            "--data",
            "{\"seconds\": 1}",
        ])
        .env("PUBSUB_EMULATOR_HOST", emulator_host())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let message_id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(!message_id.is_empty());
    let gpu = world.subscription(&world.config.executors["gpu"].subscription);
    let got = world
        .pull_for(&gpu, std::time::Duration::from_secs(3))
        .await;
    assert_eq!(got.len(), 1);
    let m = got[0].message.as_ref().unwrap();
    assert_eq!(m.message_id, message_id);
    assert_eq!(m.attributes["kind"], "render");
    assert_eq!(m.attributes["task_id"], "r-1");
    assert_eq!(m.attributes["scene"], "castle");
    assert_eq!(m.data, b"{\"seconds\": 1}");
    world
        .data_plane()
        .acknowledge(
            &gpu,
            vec![got[0].ack_id.clone()],
            std::time::Duration::from_secs(10),
        )
        .await
        .unwrap();

    let out = leasehold()
        .arg("publish")
        .args(world.config_args())
        .args(["--kind", "nothing-handles-this"])
        .env("PUBSUB_EMULATOR_HOST", emulator_host())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing-handles-this"));
}

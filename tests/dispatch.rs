//! Routing on the real emulator: messages that cannot run here are
//! dead-lettered with the reason, and the worker keeps running.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use leasehold::pubsub::DataPlane;
use leasehold::pubsub::producer::NewTask;
use support::*;

/// Publishes a raw message (any attributes) straight to a topic.
async fn publish_raw(world: &World, topic: &str, attributes: &[(&str, &str)], data: &str) {
    let publisher = world.conn.publisher(topic).await.unwrap();
    let attributes: BTreeMap<String, String> = attributes
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    publisher
        .publish(
            google_cloud_pubsub::model::Message::new()
                .set_data(data.as_bytes().to_vec())
                .set_attributes(attributes),
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn unroutable_messages_are_dead_lettered_with_the_reason() {
    let runs = tempfile::NamedTempFile::new().unwrap();
    let extra = format!(
        "[executors.gpu]\nenabled = true\ndevices = [\"0\"]\n{}{}",
        recording_handler("render", runs.path(), "gpu"),
        recording_handler("reduce", runs.path(), "cpu"),
    );
    let world = World::new("route", &extra).await;
    let mut worker = world.spawn_worker("w1", &[]);
    let cpu_topic = world.config.executors["cpu"].topic.clone();
    // No kind; an unknown kind; a GPU kind published to the CPU topic.
    publish_raw(&world, &cpu_topic, &[("task_id", "no-kind")], "a").await;
    publish_raw(
        &world,
        &cpu_topic,
        &[("kind", "paint"), ("task_id", "unknown")],
        "b",
    )
    .await;
    publish_raw(
        &world,
        &cpu_topic,
        &[
            ("kind", "render"),
            ("task_id", "wrong-topic"),
            ("scene", "s"),
        ],
        "c",
    )
    .await;

    let dead = world.subscription(&world.config.pubsub.dead_letter_topic);
    let mut got = Vec::new();
    for _ in 0..10 {
        got.extend(world.pull_for(&dead, Duration::from_secs(2)).await);
        if got.len() >= 3 {
            break;
        }
    }
    assert_eq!(got.len(), 3, "{}", worker.log());
    let mut by_id: BTreeMap<String, (BTreeMap<String, String>, Vec<u8>)> = BTreeMap::new();
    for m in &got {
        let m = m.message.as_ref().unwrap();
        by_id.insert(
            m.attributes["task_id"].clone(),
            (m.attributes.clone().into_iter().collect(), m.data.clone()),
        );
    }
    let (a, data) = &by_id["no-kind"];
    assert!(
        a["leasehold_error"].contains("no `kind` attribute"),
        "{a:?}"
    );
    assert_eq!(data, b"a");
    let (a, _) = &by_id["unknown"];
    assert!(
        a["leasehold_error"].contains("no handler for kind \"paint\""),
        "{a:?}"
    );
    let (a, data) = &by_id["wrong-topic"];
    assert!(
        a["leasehold_error"].contains("runs on the gpu executor"),
        "{a:?}"
    );
    assert_eq!(a["scene"], "s", "original attributes are kept");
    assert_eq!(a["kind"], "render");
    assert_eq!(data, b"c");
    for (a, _) in by_id.values() {
        assert_eq!(a["leasehold_attempts"], "1");
        assert_eq!(
            a["leasehold_source_subscription"],
            world.config.executors["cpu"].subscription
        );
    }
    world
        .data_plane()
        .acknowledge(
            &dead,
            got.iter().map(|m| m.ack_id.clone()).collect(),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    // Nothing ran, nothing is left or looping in the task subscription.
    assert!(events(runs.path()).is_empty());
    // The worker is still running and still works.
    assert!(worker.wait_timeout(Duration::from_millis(100)).is_none());
    world
        .publish(&[NewTask {
            kind: "reduce".into(),
            task_id: Some("after".into()),
            attributes: Default::default(),
            data: br#"{"seconds": 0}"#.to_vec(),
        }])
        .await;
    eventually(
        Duration::from_secs(20),
        "a good task after the bad ones",
        || {
            events(runs.path())
                .iter()
                .any(|e| e.what == "end" && e.task == "after")
        },
    )
    .await;
}

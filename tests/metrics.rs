//! /metrics, /healthz and /readyz of a worker that ran real tasks.

mod support;

use std::time::Duration;

use support::*;

// One scenario, read top to bottom: zeros at start, then every counter moving.
#[allow(clippy::too_many_lines)]
#[tokio::test(flavor = "multi_thread")]
async fn counters_move_as_tasks_run_and_leases_return_to_zero() {
    let runs = tempfile::NamedTempFile::new().unwrap();
    let extra = format!(
        "[executors.cpu]\nslots = 3\n{}[handlers.broken]\nexecutor = \"cpu\"\ncommand = [\"/bin/sh\", \"-c\", \"exit 65\"]\npermanent_exit_codes = [65]\n",
        recording_handler("job", runs.path(), "cpu")
    );
    let world = World::new("metrics", &extra).await;
    let worker = world.spawn_worker("w1", &[]);
    let http = worker.http_addr().await;
    // The executors are set up just after the server starts listening.
    eventually(Duration::from_secs(10), "the executor", || {
        worker.log().contains("executor started")
    })
    .await;
    let (status, body) = http_get(&http, "/metrics").unwrap();
    assert_eq!(status, 200);
    // Before any task, every series with known labels is there at 0.
    let sub = &world.config.executors["cpu"].subscription;
    for series in [
        format!("leasehold_lease_extensions_total{{result=\"success\",subscription=\"{sub}\"}}"),
        format!(
            "leasehold_lease_extension_rpcs_total{{result=\"failure\",subscription=\"{sub}\"}}"
        ),
        format!("leasehold_leases_lost_total{{subscription=\"{sub}\"}}"),
        format!("leasehold_messages_pulled_total{{subscription=\"{sub}\"}}"),
        "leasehold_tasks_started_total{executor=\"cpu\",kind=\"job\"}".to_string(),
    ] {
        assert_eq!(sample(&body, &series), Some(0.0), "{series}\n{body}");
    }
    for outcome in [
        "succeeded",
        "retrying",
        "dead_lettered",
        "released",
        "lease_lost",
    ] {
        let series = format!(
            "leasehold_tasks_finished_total{{executor=\"cpu\",kind=\"job\",outcome=\"{outcome}\"}}"
        );
        assert_eq!(sample(&body, &series), Some(0.0), "{series}\n{body}");
    }
    assert_eq!(
        sample(&body, "leasehold_executor_slots{executor=\"cpu\"}"),
        Some(3.0)
    );
    assert_eq!(
        sample(&body, "leasehold_tasks_in_progress{executor=\"cpu\"}"),
        Some(0.0)
    );
    assert!(body.contains("leasehold_build_info{version=\""), "{body}");

    world
        .publish(&[
            task("job", "a", r#"{"seconds": 1}"#),
            task("job", "b", r#"{"seconds": 1}"#),
            task("broken", "c", "{}"),
        ])
        .await;
    eventually(Duration::from_secs(30), "two ends", || {
        events(runs.path())
            .iter()
            .filter(|e| e.what == "end")
            .count()
            == 2
    })
    .await;
    let mut body = String::new();
    eventually(Duration::from_secs(10), "the counters", || {
        body = http_get(&http, "/metrics").unwrap().1;
        sample(&body, "leasehold_tasks_finished_total{executor=\"cpu\",kind=\"broken\",outcome=\"dead_lettered\"}")
            == Some(1.0)
            && sample(&body, "leasehold_tasks_finished_total{executor=\"cpu\",kind=\"job\",outcome=\"succeeded\"}")
                == Some(2.0)
            && sample(&body, &format!("leasehold_leases_held{{subscription=\"{sub}\"}}")) == Some(0.0)
    })
    .await;
    assert_eq!(
        sample(
            &body,
            &format!("leasehold_messages_pulled_total{{subscription=\"{sub}\"}}")
        ),
        Some(3.0)
    );
    assert_eq!(
        sample(
            &body,
            "leasehold_tasks_started_total{executor=\"cpu\",kind=\"job\"}"
        ),
        Some(2.0)
    );
    assert_eq!(
        sample(
            &body,
            "leasehold_task_duration_seconds_count{executor=\"cpu\",kind=\"job\",outcome=\"succeeded\"}"
        ),
        Some(2.0)
    );
    let sum = sample(
        &body,
        "leasehold_task_duration_seconds_sum{executor=\"cpu\",kind=\"job\",outcome=\"succeeded\"}",
    )
    .unwrap();
    assert!(sum >= 2.0, "two 1 s tasks: {sum}");
    assert!(
        body.contains("leasehold_task_duration_seconds_bucket{executor=\"cpu\",kind=\"job\",outcome=\"succeeded\",le=\"86400\"} 2"),
        "buckets reach 24 h"
    );
    assert_eq!(
        sample(
            &body,
            "leasehold_task_queue_wait_seconds_count{executor=\"cpu\",kind=\"job\"}"
        ),
        Some(2.0)
    );
    assert_eq!(
        sample(&body, "leasehold_tasks_in_progress{executor=\"cpu\"}"),
        Some(0.0)
    );
    assert_eq!(http_get(&http, "/healthz").unwrap().0, 200);
    assert_eq!(http_get(&http, "/readyz").unwrap().0, 200);
    assert!(!body.contains("task_id"), "no unbounded labels");
}

/// `LEASEHOLD_LOG_FORMAT=json`: one JSON object per line in Cloud Logging's
/// structured format (`severity`, `message`, `time`, the source location),
/// the task's fields under `span` on every line about it, the handler's own
/// output included, and all of a task's lines on one trace of the
/// configured project.
#[tokio::test(flavor = "multi_thread")]
async fn json_logs_carry_severity_message_and_task_fields() {
    let extra = "[handlers.talk]\nexecutor = \"cpu\"\ncommand = [\"/bin/sh\", \"-c\", \"echo hello from the handler; echo oops >&2; exit 1\"]\n\
                 [retry]\nmax_attempts = 1\nmin_backoff = \"1s\"\nmax_backoff = \"1s\"\n";
    let world = World::new("jsonlog", extra).await;
    let worker = world.spawn_worker_env("w1", &[], &[("LEASEHOLD_LOG_FORMAT", "json")]);
    // A producer's W3C trace context, as the official clients publish it.
    let mut traced = task("talk", "j-2", "{}");
    traced.attributes.insert(
        "googclient_traceparent".into(),
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
    );
    world.publish(&[task("talk", "j-1", "{}"), traced]).await;
    eventually(
        Duration::from_secs(20),
        "both tasks' dead-letter lines",
        || worker.log().matches("dead-lettering").count() >= 2,
    )
    .await;
    let lines: Vec<serde_json::Value> = worker
        .log()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(lines.iter().all(|l| l["severity"].is_string()
        && l["message"].is_string()
        && l["time"].is_string()
        && l["logging.googleapis.com/sourceLocation"]["file"].is_string()));
    let about_task: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["span"]["task_id"] == "j-1")
        .collect();
    assert!(about_task.len() >= 4, "{lines:?}");
    let trace_prefix = format!("projects/{}/traces/", world.config.pubsub.project);
    let trace = about_task[0]["logging.googleapis.com/trace"]
        .as_str()
        .unwrap_or_else(|| panic!("no trace: {}", about_task[0]));
    assert!(trace.starts_with(&trace_prefix), "{trace}");
    for l in &about_task {
        assert_eq!(l["span"]["kind"], "talk", "{l}");
        assert_eq!(l["span"]["executor"], "cpu", "{l}");
        assert_eq!(l["span"]["attempt"], 1, "{l}");
        assert_eq!(l["logging.googleapis.com/trace"], trace, "one trace: {l}");
        assert!(l["logging.googleapis.com/spanId"].is_string(), "{l}");
    }
    // The traced task's lines continue the producer's trace.
    let producers = format!("{trace_prefix}4bf92f3577b34da6a3ce929d0e0e4736");
    let traced: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["span"]["task_id"] == "j-2")
        .collect();
    assert!(traced.len() >= 4, "{lines:?}");
    assert_ne!(trace, producers, "j-1 has a trace of its own");
    for l in &traced {
        assert_eq!(l["logging.googleapis.com/trace"], producers.as_str(), "{l}");
    }
    let said = about_task
        .iter()
        .find(|l| l["message"] == "hello from the handler")
        .expect("the handler's stdout line");
    assert_eq!(said["stream"], "stdout");
    assert_eq!(said["severity"], "INFO");
    let failed = about_task
        .iter()
        .find(|l| l["message"].as_str().unwrap().contains("dead-lettering"))
        .unwrap();
    assert_eq!(failed["severity"], "ERROR");
}

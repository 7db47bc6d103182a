//! Handlers are someone else's programs: on the emulator, with real handler
//! processes, the worker survives any output, leaves no process behind,
//! refuses attributes a command cannot take, and shows progress.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use leasehold::pubsub::ReceivedMessage;
use leasehold::pubsub::producer::NewTask;
use support::*;

/// One attempt, then the dead-letter topic: a failure shows at once.
const ONE_ATTEMPT: &str = "[retry]\nmax_attempts = 1\nmin_backoff = \"1s\"\nmax_backoff = \"1s\"\n";

/// Result events with `outcome`.
fn with_outcome<'a>(events: &'a [ReceivedMessage], outcome: &str) -> Vec<&'a ReceivedMessage> {
    events
        .iter()
        .filter(|m| message_attributes(m)["outcome"] == outcome)
        .collect()
}

fn results(world: &World) -> String {
    world.subscription(&world.config.pubsub.results_topic)
}

/// A `/proc/PID/status` field in kB.
fn status_kb(pid: i32, field: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
        .trim()
        .trim_end_matches(" kB")
        .parse()
        .ok()
}

/// Live processes whose environment holds `mark`, and zombie children of `parent`.
fn leftovers(mark: &str, parent: i32) -> (Vec<String>, Vec<String>) {
    let mut marked = Vec::new();
    let mut zombies = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let path = entry.path();
        let environ = std::fs::read(path.join("environ")).unwrap_or_default();
        if environ.split(|b| *b == 0).any(|e| e == mark.as_bytes()) {
            marked.push(std::fs::read_to_string(path.join("stat")).unwrap_or_default());
        }
        let stat = std::fs::read_to_string(path.join("stat")).unwrap_or_default();
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, r)| r.split_whitespace().collect())
            .unwrap_or_default();
        if fields.first() == Some(&"Z") && fields.get(1) == Some(&parent.to_string().as_str()) {
            zombies.push(stat);
        }
    }
    (marked, zombies)
}

#[tokio::test(flavor = "multi_thread")]
async fn latin1_output_succeeds_in_one_run() {
    let runs = tempfile::NamedTempFile::new().unwrap();
    let script = format!(
        r"echo run >> {}; printf 'caf\351\n'; printf 'caf\351 on stderr\n' >&2
        i=0; while [ $i -lt 200 ]; do echo more; i=$((i+1)); done",
        runs.path().display()
    );
    let world = World::new(
        "latin1",
        &format!("{ONE_ATTEMPT}{}", shell_handler("latin", &script, "")),
    )
    .await;
    let worker = world.spawn_worker("w1", &[]);
    world.publish(&[task("latin", "l1", "")]).await;
    let events = pull_until(&world, &results(&world), Duration::from_secs(30), |got| {
        !got.is_empty()
    })
    .await;
    assert_eq!(events.len(), 1, "{}", worker.log());
    assert_eq!(
        message_attributes(&events[0])["outcome"],
        "succeeded",
        "{}",
        message_json(&events[0])
    );
    assert_eq!(message_json(&events[0])["attempt"], 1);
    assert_eq!(lines(runs.path()).len(), 1, "one run");
    let log = worker.log();
    assert!(log.contains("caf\u{fffd}"), "{log}");
    assert!(log.contains("caf\u{fffd} on stderr"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_200_mb_line_and_a_1_gb_carriage_return_stream_leave_the_worker_small() {
    let long_line = "head -c 200000000 /dev/zero | tr '\\0' 'a'; echo; echo after the long line";
    let progress_bar =
        "yes '[=====>     ] frame 1234/99999 eta 00:12' | tr '\\n' '\\r' | head -c 1000000000";
    let extra = format!(
        "{ONE_ATTEMPT}[executors.cpu]\nslots = 2\n{}{}",
        shell_handler("long", long_line, ""),
        shell_handler("bar", progress_bar, "")
    );
    let world = World::new("flood", &extra).await;
    let worker = world.spawn_worker("w1", &[]);
    let pid = worker.pid();
    // Sample the worker's memory while it runs.
    let stop = Arc::new(AtomicBool::new(false));
    let max_rss = Arc::new(AtomicU64::new(0));
    let sampler = std::thread::spawn({
        let (stop, max_rss) = (stop.clone(), max_rss.clone());
        move || {
            while !stop.load(Ordering::Relaxed) {
                if let Some(kb) = status_kb(pid, "VmRSS") {
                    max_rss.fetch_max(kb, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    });
    let start = std::time::SystemTime::now();
    world
        .publish(&[task("long", "long-1", ""), task("bar", "bar-1", "")])
        .await;
    let events = pull_until(&world, &results(&world), Duration::from_secs(50), |got| {
        got.len() >= 2
    })
    .await;
    let took = start.elapsed().unwrap();
    let hwm = status_kb(pid, "VmHWM").expect("the worker runs");
    stop.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    let log = worker.log();
    assert_eq!(
        events.len(),
        2,
        "{}",
        &log[log.len().saturating_sub(3000)..]
    );
    for e in &events {
        assert_eq!(
            message_attributes(e)["outcome"],
            "succeeded",
            "{}",
            message_json(e)
        );
    }
    eprintln!(
        "1.2 GB of output in {took:?}: worker peak RSS {hwm} kB (sampled max {} kB), log {} bytes",
        max_rss.load(Ordering::Relaxed),
        log.len()
    );
    assert!(hwm < 100 * 1024, "worker peak RSS {hwm} kB");
    assert!(
        log.contains("[… cut: the line is longer than 64 KiB]"),
        "the long line was logged cut"
    );
    assert!(
        log.contains("after the long line"),
        "lines after it are logged"
    );
    assert!(log.contains("frame 1234/99999"), "\\r ends lines");
    assert!(
        log.contains("were not logged"),
        "the flood was dropped and counted"
    );
    assert!(
        log.len() < 64 << 20,
        "the log stays bounded: {} bytes",
        log.len()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_escaped_session_ends_with_its_task_on_success_and_on_timeout() {
    let mark = format!("LEASEHOLD_TEST_MARK={}", unique("escape"));
    let env = format!(
        "env = {{ LEASEHOLD_TEST_MARK = {} }}",
        toml_string(mark.split_once('=').unwrap().1)
    );
    let extra = format!(
        "{ONE_ATTEMPT}{}{}",
        shell_handler("leave", "setsid sleep 300 & echo left a sleep", &env),
        shell_handler(
            "hang",
            "setsid sleep 300 & sleep 300",
            &format!("timeout = \"2s\"\n{env}")
        ),
    );
    let world = World::new("escape", &extra).await;
    let worker = world.spawn_worker("w1", &[]);
    let pid = worker.pid();
    let results = results(&world);
    for (kind, outcome) in [("leave", "succeeded"), ("hang", "dead_lettered")] {
        world.publish(&[task(kind, kind, "")]).await;
        let events = pull_until(&world, &results, Duration::from_secs(30), |got| {
            !got.is_empty()
        })
        .await;
        assert_eq!(events.len(), 1, "{}", worker.log());
        assert_eq!(
            message_attributes(&events[0])["outcome"],
            outcome,
            "{}",
            message_json(&events[0])
        );
        if kind == "hang" {
            let error = message_json(&events[0])["error"]
                .as_str()
                .unwrap()
                .to_string();
            assert!(error.contains("timeout"), "{error}");
        }
        // The task has ended: no process with its mark, no zombie of the worker.
        let (marked, zombies) = leftovers(&mark, pid);
        assert!(marked.is_empty(), "{kind}: still running: {marked:?}");
        assert!(zombies.is_empty(), "{kind}: not reaped: {zombies:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn nul_and_colliding_attributes_are_dead_lettered_once_with_the_reason() {
    let runs = tempfile::NamedTempFile::new().unwrap();
    let script = format!("echo run >> {}", runs.path().display());
    let extra = format!(
        "[retry]\nmax_attempts = 3\nmin_backoff = \"1s\"\nmax_backoff = \"1s\"\n{}",
        shell_handler("attrs", &script, "")
    );
    let world = World::new("attrs", &extra).await;
    let worker = world.spawn_worker("w1", &[]);
    let with = |id: &str, pairs: &[(&str, &str)]| NewTask {
        kind: "attrs".into(),
        task_id: Some(id.into()),
        attributes: pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        data: Vec::new(),
    };
    world
        .publish(&[
            with("nul", &[("scene", "a\0b")]),
            with("collide", &[("out.path", "1"), ("out_path", "2")]),
        ])
        .await;
    let dead = world.subscription(&world.config.pubsub.dead_letter_topic);
    // Wait past two backoffs: a retried task would be dead-lettered again.
    let got = pull_until(&world, &dead, Duration::from_secs(8), |_| false).await;
    assert_eq!(got.len(), 2, "{}", worker.log());
    let by_id: BTreeMap<String, BTreeMap<String, String>> = got
        .iter()
        .map(|m| {
            (
                message_attributes(m)["task_id"].clone(),
                message_attributes(m),
            )
        })
        .collect();
    let nul = &by_id["nul"];
    assert_eq!(nul["scene"], "a\0b", "the original attributes");
    assert!(
        nul["leasehold_error"].contains(r#"attribute "scene" has a NUL byte in its value"#),
        "{nul:?}"
    );
    assert_eq!(nul["leasehold_attempts"], "1");
    let collide = &by_id["collide"];
    assert!(
        collide["leasehold_error"].contains(
            r#"attributes "out.path" and "out_path" both map to the variable LEASEHOLD_ATTR_OUT_PATH"#
        ),
        "{collide:?}"
    );
    assert_eq!(collide["leasehold_attempts"], "1");
    assert!(lines(runs.path()).is_empty(), "the handler never ran");
}

/// The progress gauge of the worker's one CPU slot, from /metrics.
fn slot_progress(addr: &str) -> Option<f64> {
    let (_, scrape) = http_get(addr, "/metrics").ok()?;
    sample(
        &scrape,
        r#"leasehold_task_progress_ratio{executor="cpu",slot="0"}"#,
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn progress_arrives_as_rate_limited_events_and_moves_the_gauge() {
    // 25 reports over 5 s; at most one event per 1.5 s.
    let script = r#"i=1; while [ $i -le 25 ]; do
        printf '{"fraction": %s, "message": "frame %s/25"}\n' "$(awk "BEGIN{print $i/25}")" "$i" >> "$LEASEHOLD_PROGRESS_FILE"
        sleep 0.2; i=$((i+1)); done"#;
    let extra = format!(
        "{ONE_ATTEMPT}[executors.cpu]\nslots = 1\n{}",
        shell_handler("render", script, "progress_interval = \"1500ms\"")
    );
    let world = World::new("progress", &extra).await;
    let worker = world.spawn_worker("w1", &[]);
    let addr = worker.http_addr().await;
    assert_eq!(
        slot_progress(&addr),
        Some(0.0),
        "the series is there from the start"
    );
    world.publish(&[task("render", "r1", "")]).await;
    let mut seen = Vec::new();
    eventually(Duration::from_secs(20), "the gauge to move", || {
        seen.extend(slot_progress(&addr));
        seen.iter().any(|v| *v > 0.0 && *v < 1.0)
    })
    .await;
    let results = results(&world);
    let events = pull_until(&world, &results, Duration::from_secs(30), |got| {
        !with_outcome(got, "succeeded").is_empty()
    })
    .await;
    let progress = with_outcome(&events, "progress");
    let times: Vec<f64> = progress
        .iter()
        .map(|e| message_json(e)["duration_seconds"].as_f64().unwrap())
        .collect();
    // 5 s of reports: the first at once, then one per 1.5 s at most.
    assert!((2..=5).contains(&progress.len()), "{times:?}");
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    for pair in sorted.windows(2) {
        assert!(pair[1] - pair[0] >= 1.4, "events too close: {times:?}");
    }
    for e in &progress {
        let b = message_json(e);
        assert_eq!(message_attributes(e)["task_id"], "r1");
        assert!(b["progress"]["fraction"].as_f64().unwrap() > 0.0, "{b}");
        assert!(
            b["progress"]["message"]
                .as_str()
                .unwrap()
                .starts_with("frame "),
            "{b}"
        );
        assert!(b["finished_at"].is_null(), "{b}");
    }
    let done = with_outcome(&events, "succeeded");
    assert_eq!(
        message_json(done[0])["progress"],
        serde_json::json!({"fraction": 1, "message": "frame 25/25"}),
        "the final event carries the last report"
    );
    eventually(Duration::from_secs(5), "the gauge back to 0", || {
        slot_progress(&addr) == Some(0.0)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_silent_handler_is_killed_as_stalled_and_a_reporting_one_runs_on() {
    let silent = r#"echo started >> "$LEASEHOLD_PROGRESS_FILE"; sleep 300"#;
    let reporting = r#"i=0; while [ $i -lt 10 ]; do echo "step $i" >> "$LEASEHOLD_PROGRESS_FILE"; sleep 0.5; i=$((i+1)); done"#;
    let extra = format!(
        "[retry]\nmax_attempts = 2\nmin_backoff = \"1s\"\nmax_backoff = \"1s\"\n[executors.cpu]\nslots = 2\n{}{}",
        shell_handler("silent", silent, "stall_timeout = \"2s\""),
        shell_handler("reporting", reporting, "stall_timeout = \"2s\""),
    );
    let world = World::new("stall", &extra).await;
    let worker = world.spawn_worker("w1", &[]);
    world
        .publish(&[task("silent", "s1", ""), task("reporting", "r1", "")])
        .await;
    let events = pull_until(&world, &results(&world), Duration::from_secs(40), |got| {
        let has = |id: &str, outcome: &str| {
            got.iter().any(|m| {
                message_attributes(m)["task_id"] == id
                    && message_attributes(m)["outcome"] == outcome
            })
        };
        has("r1", "succeeded") && has("s1", "retrying")
    })
    .await;
    let retrying = with_outcome(&events, "retrying");
    assert_eq!(retrying.len(), 1, "{}", worker.log());
    let b = message_json(retrying[0]);
    assert_eq!(b["task_id"], "s1");
    assert!(b["error"].as_str().unwrap().contains("stalled"), "{b}");
    let ran = b["duration_seconds"].as_f64().unwrap();
    assert!(
        (2.0..5.0).contains(&ran),
        "killed after the stall timeout, not before: {ran}"
    );
    let r1: Vec<_> = events
        .iter()
        .filter(|m| {
            message_attributes(m)["task_id"] == "r1"
                && message_attributes(m)["outcome"] != "progress"
        })
        .collect();
    assert_eq!(r1.len(), 1);
    let b = message_json(r1[0]);
    assert_eq!(b["outcome"], "succeeded", "{b}");
    assert_eq!(b["attempt"], 1);
    assert!(
        b["duration_seconds"].as_f64().unwrap() > 4.0,
        "ran past stall_timeout: {b}"
    );
}

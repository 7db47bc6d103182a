use std::collections::BTreeMap;
use std::time::Duration;

use super::*;
use crate::handler::RunContext;

fn task(data: &str, attrs: &[(&str, &str)]) -> Task {
    let mut a: BTreeMap<String, String> = attrs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    a.insert("kind".into(), "k".into());
    a.insert("task_id".into(), "t-1".into());
    Task::decode(
        "m-1".into(),
        a,
        data.as_bytes().to_vec(),
        2,
        Some(time::OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap()),
    )
    .unwrap()
}

fn sh(script: &str) -> ExecHandler {
    ExecHandler {
        permanent_exit_codes: vec![65],
        ..ExecHandler::new("/bin/sh", &["-c", script])
    }
}

fn ctx() -> RunContext {
    RunContext {
        kill_grace: Duration::from_millis(500),
        ..RunContext::default()
    }
}

/// How `h` failed (panics if it succeeded): the failure and the stderr tail.
async fn failure(h: &ExecHandler, c: &RunContext) -> (Failure, String) {
    match h.run(&task("", &[]), c).await {
        Outcome::Failed {
            failure,
            stderr_tail,
        } => (failure, stderr_tail),
        other @ Outcome::Succeeded { .. } => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn payload_on_stdin_environment_and_result_file() {
    let h = sh(
        r#"read -r line; printf '{"echo": "%s", "id": "%s", "kind": "%s", "msg": "%s", "attempt": %s, "scene": "%s", "published": "%s", "extra": "%s", "gpu": "%s"}' \
        "$line" "$LEASEHOLD_TASK_ID" "$LEASEHOLD_KIND" "$LEASEHOLD_MESSAGE_ID" "$LEASEHOLD_ATTEMPT" \
        "$LEASEHOLD_ATTR_SCENE" "$LEASEHOLD_PUBLISH_TIME" "$EXTRA" "$CUDA_VISIBLE_DEVICES" > "$LEASEHOLD_RESULT_FILE""#,
    );
    let mut h = h;
    h.env = vec![("EXTRA".into(), "x".into())];
    let mut c = ctx();
    c.env = vec![("CUDA_VISIBLE_DEVICES".into(), "1".into())];
    let out = h.run(&task("hello", &[("scene", "s1")]), &c).await;
    let Outcome::Succeeded { result: Some(v) } = out else {
        panic!("{out:?}")
    };
    assert_eq!(v["echo"], "hello");
    assert_eq!(v["id"], "t-1");
    assert_eq!(v["kind"], "k");
    assert_eq!(v["msg"], "m-1");
    assert_eq!(v["attempt"], 2);
    assert_eq!(v["scene"], "s1");
    assert_eq!(v["published"], "2023-11-14T22:13:20Z");
    assert_eq!(v["extra"], "x");
    assert_eq!(v["gpu"], "1");
}

#[tokio::test]
async fn exit_codes_are_classified_and_stderr_tail_kept() {
    let exit = |code, permanent| Failure::Exit { code, permanent };
    let got = failure(&sh("echo first >&2; echo boom >&2; exit 3"), &ctx()).await;
    assert_eq!(got, (exit(3, false), "first\nboom".into()));
    assert_eq!(failure(&sh("exit 65"), &ctx()).await.0, exit(65, true));
    let got = failure(&sh("kill -KILL $$"), &ctx()).await.0;
    assert_eq!(got, Failure::Signal(9));
}

#[tokio::test]
async fn stderr_tail_is_at_most_4_kib() {
    let script = "i=0; while [ $i -lt 2000 ]; do echo line-$i >&2; i=$((i+1)); done; exit 1";
    let (_, stderr_tail) = failure(&sh(script), &ctx()).await;
    assert!(
        stderr_tail.len() <= STDERR_TAIL_BYTES,
        "{}",
        stderr_tail.len()
    );
    assert!(stderr_tail.ends_with("line-1999"));
}

#[tokio::test]
async fn a_missing_program_is_a_spawn_failure() {
    let h = ExecHandler::new("/nonexistent/leasehold-handler", &[]);
    let got = failure(&h, &ctx()).await.0;
    assert!(matches!(got, Failure::Spawn(_)), "{got:?}");
}

/// The pid a handler wrote to `file`.
fn read_pid(file: &std::path::Path) -> i32 {
    std::fs::read_to_string(file)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Whether `pid` is still in /proc at all (running, or a zombie nobody reaped).
fn in_proc(pid: i32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

#[tokio::test]
async fn a_timeout_kills_the_group_and_the_sessions_that_left_it() {
    let dir = tempfile::tempdir().unwrap();
    let (in_group, escaped) = (dir.path().join("group.pid"), dir.path().join("escaped.pid"));
    let mut h = sh(&format!(
        "sleep 300 & echo $! > {}; setsid sh -c 'sleep 300 & wait' & echo $! > {}; wait",
        in_group.display(),
        escaped.display()
    ));
    h.timeout = Some(Duration::from_millis(1500));
    let got = failure(&h, &ctx()).await.0;
    assert_eq!(got, Failure::Timeout(Duration::from_millis(1500)));
    for pid in [read_pid(&in_group), read_pid(&escaped)] {
        assert!(!in_proc(pid), "{pid} outlived its task (or was not reaped)");
    }
    // The escaped shell's own child too: no sleep of ours is left.
    let me = std::process::id().to_string();
    let left: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter(|s| s.contains("(sleep)") && s.split(' ').nth(3) == Some(me.as_str()))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test]
async fn stop_sends_sigterm_then_sigkill_after_kill_grace() {
    // Ignores SIGTERM: only SIGKILL ends it.
    let h = sh("trap '' TERM; sleep 300 & wait; sleep 300");
    let c = ctx();
    let stop = c.stop.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop.cancel();
    });
    let start = std::time::SystemTime::now();
    assert_eq!(failure(&h, &c).await.0, Failure::Interrupted);
    let took = start.elapsed().unwrap();
    assert!(
        took >= Duration::from_millis(700),
        "waited kill_grace: {took:?}"
    );
    assert!(took < Duration::from_secs(10), "{took:?}");
}

#[tokio::test]
async fn output_that_is_not_utf8_never_stops_the_handler() {
    // Before: the forwarder stopped at the first non-UTF-8 line and closed
    // the pipe, and the next write killed the handler with SIGPIPE.
    let h = sh(r"printf 'caf\351\n'; printf 'caf\351\n' >&2; i=0
        while [ $i -lt 2000 ]; do echo more; echo more >&2; i=$((i+1)); done; printf 'end\r' >&2; exit 9");
    let (failure, stderr_tail) = failure(&h, &ctx()).await;
    let exit = Failure::Exit {
        code: 9,
        permanent: false,
    };
    assert_eq!(failure, exit, "its own exit, not SIGPIPE");
    assert!(stderr_tail.ends_with("more\nend"), "{stderr_tail}");
    let out = sh(r"printf 'caf\351\n'; echo after")
        .run(&task("", &[]), &ctx())
        .await;
    assert_eq!(out, Outcome::Succeeded { result: None });
}

#[tokio::test]
async fn escaped_sessions_end_with_the_task_and_do_not_hold_it_open() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("pid");
    // The daemon keeps the handler's stdout and stderr open.
    let h = sh(&format!(
        "setsid sleep 300 & echo $! > {}; echo started",
        pidfile.display()
    ));
    let start = std::time::SystemTime::now();
    let out = h.run(&task("", &[]), &ctx()).await;
    assert_eq!(out, Outcome::Succeeded { result: None });
    assert!(
        start.elapsed().unwrap() < Duration::from_secs(5),
        "not held by the pipe"
    );
    let pid = read_pid(&pidfile);
    assert!(
        !in_proc(pid),
        "the escaped sleep {pid} outlived its task (or was not reaped)"
    );
}

#[tokio::test]
async fn each_task_has_a_private_directory_removed_at_its_end() {
    let h = sh(r#"test "$TMPDIR" = "$LEASEHOLD_TASK_DIR" || exit 3
        test "$(dirname "$LEASEHOLD_RESULT_FILE")" = "$LEASEHOLD_TASK_DIR" || exit 4
        test "$(dirname "$LEASEHOLD_PROGRESS_FILE")" = "$LEASEHOLD_TASK_DIR" || exit 5
        test -f "$LEASEHOLD_PROGRESS_FILE" || exit 6
        mkdir -p "$TMPDIR/deep/er" && echo x > "$TMPDIR/deep/er/file"
        printf '{"dir": "%s"}' "$LEASEHOLD_TASK_DIR" > "$LEASEHOLD_RESULT_FILE""#);
    let out = h.run(&task("", &[]), &ctx()).await;
    let Outcome::Succeeded { result: Some(v) } = out else {
        panic!("{out:?}")
    };
    let first = v["dir"].as_str().unwrap().to_string();
    assert!(
        first.starts_with(&std::env::temp_dir().display().to_string()),
        "{first}"
    );
    assert!(
        !std::path::Path::new(&first).exists(),
        "{first} was not removed"
    );
    let Outcome::Succeeded { result: Some(v) } = h.run(&task("", &[]), &ctx()).await else {
        panic!()
    };
    assert_ne!(
        v["dir"].as_str().unwrap(),
        first,
        "a new directory per task"
    );
}

#[tokio::test]
async fn attributes_a_command_cannot_take_fail_for_good_before_it_starts() {
    let dir = tempfile::tempdir().unwrap();
    let ran = dir.path().join("ran");
    let h = sh(&format!("touch {}", ran.display()));
    for attrs in [&[("scene", "a\0b")][..], &[("a.b", "1"), ("a_b", "2")][..]] {
        let out = h.run(&task("", attrs), &ctx()).await;
        let Outcome::Failed {
            failure: failure @ Failure::BadAttributes(_),
            ..
        } = out
        else {
            panic!("{out:?}")
        };
        assert!(failure.is_permanent());
    }
    assert!(!ran.exists(), "the handler never ran");
}

/// A context whose progress is recorded: (context, gauge, published reports).
fn recorded() -> (
    RunContext,
    prometheus::Gauge,
    std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
) {
    let gauge = prometheus::Gauge::new("g", "g").unwrap();
    let published = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = crate::handler::ProgressSink::new(gauge.clone(), {
        let published = published.clone();
        move |v: &serde_json::Value| published.lock().unwrap().push(v.clone())
    });
    let c = RunContext {
        progress: sink,
        ..ctx()
    };
    (c, gauge, published)
}

#[tokio::test]
async fn a_handler_that_stops_reporting_is_killed_as_stalled() {
    let mut h = sh(r#"echo '{"fraction": 0.3}' >> "$LEASEHOLD_PROGRESS_FILE"; sleep 300"#);
    h.stall_timeout = Some(Duration::from_secs(1));
    let (c, gauge, _) = recorded();
    let start = std::time::SystemTime::now();
    let failure = failure(&h, &c).await.0;
    let took = start.elapsed().unwrap();
    assert_eq!(failure, Failure::Stalled(Duration::from_secs(1)));
    assert!(!failure.is_permanent());
    assert!(failure.to_string().contains("stalled"), "{failure}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert!(
        (gauge.get() - 0.3).abs() < 1e-9,
        "the report reached the gauge"
    );
    assert_eq!(
        c.progress.latest(),
        Some(serde_json::json!({"fraction": 0.3}))
    );
}

#[tokio::test]
async fn a_handler_that_keeps_reporting_runs_past_the_stall_timeout_with_rate_limited_events() {
    let mut h = sh(r#"i=0; while [ $i -lt 14 ]; do
        echo "{\"fraction\": 0.$i, \"message\": \"step $i\"}" >> "$LEASEHOLD_PROGRESS_FILE"; sleep 0.25; i=$((i+1)); done"#);
    h.stall_timeout = Some(Duration::from_secs(1));
    h.progress_interval = Duration::from_secs(2);
    let (c, _, published) = recorded();
    let out = h.run(&task("", &[]), &c).await;
    assert_eq!(out, Outcome::Succeeded { result: None });
    let published = published.lock().unwrap().clone();
    // 3.5 s of reports, at most one event per 2 s: the first, and one more.
    assert!(
        (1..=2).contains(&published.len()),
        "{} events: {published:?}",
        published.len()
    );
    assert_eq!(
        c.progress.latest(),
        Some(serde_json::json!({"fraction": 0.13, "message": "step 13"}))
    );
}

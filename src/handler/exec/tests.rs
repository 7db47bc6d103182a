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
        program: "/bin/sh".into(),
        args: vec!["-c".into(), script.into()],
        timeout: None,
        permanent_exit_codes: vec![65],
        env: vec![],
    }
}

fn ctx() -> RunContext {
    RunContext {
        kill_grace: Duration::from_millis(500),
        ..RunContext::default()
    }
}

#[test]
fn attribute_variables_are_upper_cased_and_sanitized() {
    assert_eq!(attribute_variable("scene"), "LEASEHOLD_ATTR_SCENE");
    assert_eq!(
        attribute_variable("out.path-2"),
        "LEASEHOLD_ATTR_OUT_PATH_2"
    );
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
    let out = sh("echo first >&2; echo boom >&2; exit 3")
        .run(&task("", &[]), &ctx())
        .await;
    assert_eq!(
        out,
        Outcome::Failed {
            failure: Failure::Exit {
                code: 3,
                permanent: false
            },
            stderr_tail: "first\nboom".into()
        }
    );
    let out = sh("exit 65").run(&task("", &[]), &ctx()).await;
    assert!(matches!(
        out,
        Outcome::Failed {
            failure: Failure::Exit {
                code: 65,
                permanent: true
            },
            ..
        }
    ));
    let out = sh("kill -KILL $$").run(&task("", &[]), &ctx()).await;
    assert!(
        matches!(
            out,
            Outcome::Failed {
                failure: Failure::Signal(9),
                ..
            }
        ),
        "{out:?}"
    );
}

#[tokio::test]
async fn stderr_tail_is_at_most_4_kib() {
    let out = sh("i=0; while [ $i -lt 2000 ]; do echo line-$i >&2; i=$((i+1)); done; exit 1")
        .run(&task("", &[]), &ctx())
        .await;
    let Outcome::Failed { stderr_tail, .. } = out else {
        panic!()
    };
    assert!(
        stderr_tail.len() <= STDERR_TAIL_BYTES,
        "{}",
        stderr_tail.len()
    );
    assert!(stderr_tail.ends_with("line-1999"));
}

#[tokio::test]
async fn a_missing_program_is_a_spawn_failure() {
    let h = ExecHandler {
        program: "/nonexistent/leasehold-handler".into(),
        args: vec![],
        timeout: None,
        permanent_exit_codes: vec![],
        env: vec![],
    };
    let out = h.run(&task("", &[]), &ctx()).await;
    assert!(
        matches!(
            out,
            Outcome::Failed {
                failure: Failure::Spawn(_),
                ..
            }
        ),
        "{out:?}"
    );
}

/// Whether a process is alive (signal 0).
fn alive(pid: i32) -> bool {
    nix::sys::signal::kill(Pid::from_raw(pid), None).is_ok()
}

#[tokio::test]
async fn a_timeout_kills_the_whole_process_group() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("grandchild.pid");
    let mut h = sh(&format!(
        "sleep 300 & echo $! > {}; wait",
        pidfile.display()
    ));
    h.timeout = Some(Duration::from_millis(700));
    let out = h.run(&task("", &[]), &ctx()).await;
    assert!(
        matches!(
            out,
            Outcome::Failed {
                failure: Failure::Timeout(_),
                ..
            }
        ),
        "{out:?}"
    );
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // The grandchild was in the group: it must be gone (or a zombie about to be reaped by init).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    assert!(
        !alive(pid) || state.contains(") Z "),
        "grandchild {pid} still running: {state}"
    );
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
    let out = h.run(&task("", &[]), &c).await;
    let took = start.elapsed().unwrap();
    assert!(
        matches!(
            out,
            Outcome::Failed {
                failure: Failure::Interrupted,
                ..
            }
        ),
        "{out:?}"
    );
    assert!(
        took >= Duration::from_millis(700),
        "waited kill_grace: {took:?}"
    );
    assert!(took < Duration::from_secs(10), "{took:?}");
}

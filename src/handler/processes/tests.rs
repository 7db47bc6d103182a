use super::*;

const WORKER: i32 = 100;
const SESSION: i32 = 50;

fn proc(pid: i32, ppid: i32, pgrp: i32, session: i32, zombie: bool) -> ProcInfo {
    ProcInfo {
        pid,
        ppid,
        pgrp,
        session,
        start: 1_000 + u64::try_from(pid).unwrap(),
        zombie,
    }
}

fn task(leader: i32) -> TaskProcesses {
    TaskProcesses {
        worker: WORKER,
        worker_session: SESSION,
        leader,
        leader_start: Some(1_000 + u64::try_from(leader).unwrap()),
        mark: b"LEASEHOLD_TASK_DIR=/tmp/a".to_vec(),
        known: HashSet::new(),
    }
}

fn sorted(mut v: Vec<i32>) -> Vec<i32> {
    v.sort_unstable();
    v
}

#[test]
fn stat_lines_parse_whatever_the_name_holds() {
    let line = "4242 (my (odd) name) S 4000 4100 4200 0 -1 4194304 98 0 0 0 0 0 0 0 20 0 1 0 389103 3133440 357";
    assert_eq!(
        parse_stat(line),
        Some(ProcInfo {
            pid: 4242,
            ppid: 4000,
            pgrp: 4100,
            session: 4200,
            start: 389_103,
            zombie: false
        })
    );
    let zombie = "7 (sleep) Z 1 7 7 0 -1 4194316 0 0 0 0 0 0 0 0 20 0 1 0 55";
    assert!(parse_stat(zombie).unwrap().zombie);
    assert_eq!(parse_stat("garbage"), None);
    assert_eq!(parse_stat("1 (x) S 0"), None);
}

#[test]
fn the_leaders_tree_and_marked_orphans_are_the_task() {
    let table = [
        proc(WORKER, 1, WORKER, SESSION, false),
        // Task A: leader 200 and its child; 300 escaped with setsid and was
        // re-parented to the worker, and has a child of its own.
        proc(200, WORKER, 200, SESSION, false),
        proc(201, 200, 200, SESSION, false),
        proc(300, WORKER, 300, 300, false),
        proc(301, 300, 300, 300, false),
        // Task B's leader and an orphan of B.
        proc(400, WORKER, 400, SESSION, false),
        proc(500, WORKER, 500, 500, false),
        // Not the worker's at all.
        proc(900, 1, 900, 900, false),
    ];
    let mut a = task(200);
    let sweep = a.sweep(&table, &|pid| pid == 300);
    assert_eq!(sorted(sweep.alive), vec![200, 201, 300, 301]);
    assert!(sweep.reap.is_empty());
    // Task B sees only its own.
    let mut b = task(400);
    let sweep = b.sweep(&table, &|pid| pid == 500);
    assert_eq!(sorted(sweep.alive), vec![400, 500]);
}

#[test]
fn an_orphan_seen_in_the_tree_stays_the_tasks_after_clearing_its_environment() {
    let mut a = task(200);
    let before = [
        proc(200, WORKER, 200, SESSION, false),
        proc(210, 200, 200, SESSION, false),
        proc(211, 210, 211, 211, false),
    ];
    a.sweep(&before, &|_| false);
    // 210 exited; 211 (a daemon with `env -i`) is now the worker's child.
    let after = [
        proc(200, WORKER, 200, SESSION, false),
        proc(211, WORKER, 211, 211, false),
    ];
    assert_eq!(sorted(a.sweep(&after, &|_| false).alive), vec![200, 211]);
}

#[test]
fn zombies_are_reaped_by_pid_but_never_the_leader_nor_others_children() {
    let mut a = task(200);
    let alive = [
        proc(200, WORKER, 200, SESSION, false),
        proc(220, 200, 200, SESSION, false),
    ];
    a.sweep(&alive, &|_| false);
    let table = [
        // The leader exited: tokio reaps it.
        proc(200, WORKER, 200, SESSION, true),
        // Known, re-parented, exited.
        proc(220, WORKER, 200, SESSION, true),
        // Never seen alive: in the leader's group, or in another session.
        proc(230, WORKER, 200, SESSION, true),
        proc(240, WORKER, 240, 240, true),
        // Another task's leader, exited: tokio's to reap.
        proc(400, WORKER, 400, SESSION, true),
        // A zombie of the worker in its own group and session (a process
        // the worker itself started and waits for).
        proc(450, WORKER, 450, SESSION, true),
        proc(460, WORKER, WORKER, SESSION, true),
    ];
    let sweep = a.sweep(&table, &|_| panic!("zombies have no environment to read"));
    assert!(sweep.alive.is_empty());
    assert_eq!(sorted(sweep.reap), vec![220, 230, 240]);
}

#[test]
fn a_reused_leader_pid_is_not_the_leader() {
    let mut a = task(200);
    let mut reused = proc(200, WORKER, 200, SESSION, false);
    reused.start = 9_999;
    let table = [reused, proc(201, 200, 200, SESSION, false)];
    assert!(a.sweep(&table, &|_| false).alive.is_empty());
}

#[tokio::test]
async fn an_escaped_session_is_found_by_its_mark_and_killed() {
    become_subreaper();
    let dir = tempfile::tempdir().unwrap();
    let mark = format!("LEASEHOLD_TASK_DIR={}", dir.path().display());
    let pidfile = dir.path().join("pid");
    // The leader starts a new session and exits: the sleep is re-parented to us.
    let mut child = tokio::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(format!(
            "setsid sleep 300 & echo $! > {}",
            pidfile.display()
        ))
        .env("LEASEHOLD_TASK_DIR", dir.path())
        .process_group(0)
        .spawn()
        .unwrap();
    let leader = i32::try_from(child.id().unwrap()).unwrap();
    let processes = TaskProcesses::new(leader, mark.into_bytes());
    assert!(child.wait().await.unwrap().success());
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let stat = || std::fs::read_to_string(format!("/proc/{pid}/stat")).ok();
    // setsid(2) may run a moment after the leader's exit.
    let mut escaped = parse_stat(&stat().expect("the escaped sleep runs")).unwrap();
    for _ in 0..100 {
        if escaped.session == pid {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        escaped = parse_stat(&stat().unwrap()).unwrap();
    }
    assert_eq!(escaped.session, pid, "it has a session of its own");
    assert_eq!(escaped.ppid, i32::try_from(std::process::id()).unwrap());
    processes.end().await;
    // Killed and reaped: no /proc entry at all, not even a zombie.
    assert_eq!(stat(), None, "pid {pid} is still there");
}

//! `cargo bench --bench fleet`: a fleet of real `leasehold run` processes on
//! one subscription of the emulator, against the same fleet of the official
//! Python client (`FlowControl(max_messages = slots)`), on a mixed backlog:
//! mostly 20 ms tasks and a few of 2–5 s, in a seeded random order. Then Job
//! mode's exit, and the lease arithmetic of a 1,000-pod fleet.
//!
//! Per fleet run (see `schedule.rs`): makespan against the ideal schedule,
//! waits behind a busy worker, idle slot-seconds while a backlog existed,
//! slot-free → next-start gaps, duplicates. See BENCHMARKS.md.
//!
//! Environment: `BENCH_RUNS` (3), `BENCH_FLEET_SHORT` (600 tasks of 20 ms),
//! `BENCH_FLEET_LONG` (12 tasks of 2–5 s), `BENCH_SEED` (15),
//! `BENCH_SKIP_PYTHON=1`, `BENCH_PYTHON` (see `support/python.rs`),
//! `BENCH_CANCEL_TRIALS` (20), `BENCH_ONLY=fleet|job|paper`,
//! `BENCH_KEEP_RECORDS=1` (keep each world's config and records in the
//! temporary directory). Under `cargo test` a smoke run: a small
//! fleet, one Job-mode exit and one exit race, with their goals asserted.
//!
//! The binary is also the task program: `fleet fleet-task` (see
//! `processes::run_task`), so tasks start as fast as a small Rust program.

// Measurement arithmetic on small counts and on times in microseconds.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap,
    clippy::too_many_lines
)]

mod job;
mod paper;
mod processes;
#[path = "../support/python.rs"]
mod python;
mod schedule;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use leasehold::emulator::Emulator;
use nix::sys::signal::Signal;

use processes::{Process, World, now_us, receipts, spawn_peer, spawn_worker};
use schedule::Report;

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `/proc/loadavg`'s first three fields: the machine is shared.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// The backlog: `short` tasks of 20 ms and `long` of 2–5 s, shuffled with a
/// seeded xorshift so every run and both systems get the same order. Task
/// ids `t00000`… sort in publish order.
fn backlog(short: usize, long: usize, seed: u64) -> Vec<(String, u64)> {
    let mut state = seed.max(1);
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut lengths: Vec<u64> = std::iter::repeat_n(20, short)
        .chain((0..long).map(|_| 2000 + next() % 3001))
        .collect();
    for i in (1..lengths.len()).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        lengths.swap(i, j);
    }
    lengths
        .into_iter()
        .enumerate()
        .map(|(i, ms)| (format!("t{i:05}"), ms))
        .collect()
}

/// A fleet's shape.
#[derive(Debug, Clone, Copy)]
struct Shape {
    workers: usize,
    slots: usize,
}

impl Shape {
    fn label(self) -> String {
        format!(
            "{} x {} slot{}",
            self.workers,
            self.slots,
            if self.slots > 1 { "s" } else { "" }
        )
    }
    fn names(self) -> BTreeMap<String, usize> {
        (0..self.workers)
            .map(|i| (format!("w{i}"), self.slots))
            .collect()
    }
}

/// Publishes the backlog to a waiting fleet, waits for every task to end,
/// stops the fleet, and returns the records (receipts included) and when
/// publishing began.
async fn drive(
    world: &World,
    fleet: &mut [Process],
    backlog: &[(String, u64)],
    receipts_from_logs: bool,
) -> (Vec<schedule::Record>, i64) {
    let t0 = now_us();
    world.publish(backlog).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    loop {
        let ended: std::collections::BTreeSet<String> = world
            .read_records()
            .into_iter()
            .filter(|r| r.what == schedule::What::End)
            .map(|r| r.task)
            .collect();
        if ended.len() >= backlog.len() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of {} tasks ended in 600 s",
            ended.len(),
            backlog.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Late duplicates would show here: let the fleet run a moment longer.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for p in fleet.iter() {
        p.signal(Signal::SIGTERM);
    }
    for p in fleet.iter_mut() {
        if p.exit(Duration::from_secs(30)).await.is_none() {
            eprintln!("  {} did not stop within 30 s of SIGTERM; killed", p.name);
        }
    }
    let mut records = world.read_records();
    if receipts_from_logs {
        for p in fleet.iter() {
            records.extend(receipts(p));
        }
    }
    (records, t0)
}

async fn leasehold_fleet(host: &str, shape: Shape, backlog: &[(String, u64)]) -> Report {
    let started = Started {
        line: "executor started",
        limit: Duration::from_secs(30),
        settle: Duration::from_millis(500), // their first Pulls are outstanding
    };
    run_fleet(host, "lh", shape, backlog, started, true, |world, name| {
        spawn_worker(world, name, &[])
    })
    .await
}

async fn python_fleet(
    host: &str,
    python: &Path,
    shape: Shape,
    backlog: &[(String, u64)],
) -> Report {
    let started = Started {
        line: "ready",
        limit: Duration::from_secs(60),
        settle: Duration::from_secs(2), // their streams are open
    };
    run_fleet(host, "py", shape, backlog, started, false, |world, name| {
        spawn_peer(world, python, name, shape.slots)
    })
    .await
}

/// How a fleet's processes show they are up, and how long to let them settle
/// before the backlog arrives.
struct Started {
    line: &'static str,
    limit: Duration,
    settle: Duration,
}

/// Starts one process per worker name of `shape`, waits for each to say it
/// started, publishes the backlog and analyses the records.
async fn run_fleet(
    host: &str,
    prefix: &str,
    shape: Shape,
    backlog: &[(String, u64)],
    started: Started,
    receipts_from_logs: bool,
    spawn: impl Fn(&World, &str) -> Process,
) -> Report {
    let world = World::new(
        host,
        &format!("{prefix}{}x{}", shape.workers, shape.slots),
        shape.slots,
        60,
    )
    .await;
    let mut fleet: Vec<Process> = shape
        .names()
        .keys()
        .map(|name| spawn(&world, name))
        .collect();
    for p in &fleet {
        p.wait_for(started.line, started.limit)
            .await
            .unwrap_or_else(|| panic!("{} did not start: {}", p.name, p.dump()));
    }
    tokio::time::sleep(started.settle).await;
    let (records, t0) = drive(&world, &mut fleet, backlog, receipts_from_logs).await;
    schedule::analyse(&records, &shape.names(), t0)
}

/// Adds one run's value of a measure.
fn record(table: &mut BTreeMap<String, Vec<f64>>, measure: &str, value: f64) {
    table.entry(measure.to_string()).or_default().push(value);
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn report_rows(table: &mut BTreeMap<String, Vec<f64>>, key: &str, r: &Report) {
    for (what, value) in [
        ("makespan s", r.makespan_s),
        ("makespan / lower bound", r.makespan_s / r.lower_bound_s),
        ("lower bound s", r.lower_bound_s),
        ("LPT schedule s", r.lpt_s),
        ("publish-order schedule s", r.in_order_s),
        ("delivery-order schedule s", r.in_delivery_order_s),
        (
            "makespan / delivery-order schedule",
            r.makespan_s / r.in_delivery_order_s,
        ),
        ("wait behind busy s", r.wait_behind_busy_s),
        ("tasks that waited behind busy", r.tasks_waited as f64),
        ("received while worker full", r.received_while_full as f64),
        ("max receipt to start ms", r.max_hold_ms),
        ("idle slot-s under backlog", r.idle_slot_s),
        ("gap p50 ms", r.gap_p50_ms),
        ("gap p99 ms", r.gap_p99_ms),
        ("gap max ms", r.gap_max_ms),
        ("gap part free to receipt p50 ms", r.free_to_receipt_p50_ms),
        ("gap part free to receipt p99 ms", r.free_to_receipt_p99_ms),
        ("duplicates", r.duplicates as f64),
    ] {
        record(table, &format!("{key}: {what}"), value);
    }
}

fn print_table(table: &BTreeMap<String, Vec<f64>>) {
    println!("| measure | median | runs |");
    println!("|---|---|---|");
    for (k, v) in table {
        let shown: Vec<String> = v.iter().map(|x| format!("{x:.3}")).collect();
        println!("| {k} | {:.3} | {} |", median(v.clone()), shown.join(", "));
    }
}

fn main() {
    if std::env::args().nth(1).as_deref() == Some("fleet-task") {
        processes::run_task();
        return;
    }
    let started = std::time::SystemTime::now();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let full = std::env::args().any(|a| a == "--bench");
    if full {
        runtime.block_on(bench());
    } else {
        runtime.block_on(smoke());
        // Under `cargo test` the smoke run is one check; reported the way
        // libtest does (a failure panics above).
        println!(
            "test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in {:.2}s",
            started.elapsed().unwrap_or_default().as_secs_f64()
        );
    }
}

/// An emulator for the run: `PUBSUB_EMULATOR_HOST`, else one started here.
async fn emulator() -> (String, Option<Emulator>) {
    match std::env::var("PUBSUB_EMULATOR_HOST") {
        Ok(h) if !h.is_empty() => (h, None),
        _ => {
            let e = tokio::task::spawn_blocking(|| Emulator::start(None))
                .await
                .unwrap()
                .expect("emulator");
            (e.host().to_string(), Some(e))
        }
    }
}

/// `cargo test`: a small leasehold fleet (2 workers x 2 slots, 40 tasks) with
/// its goals asserted, one Job-mode exit and one exit race; no Python.
async fn smoke() {
    schedule::self_check();
    // Log times (checked against Python's datetime).
    assert_eq!(
        processes::rfc3339_us("2026-11-28T23:58:07.49591297Z"),
        Some(1_795_910_287_495_912)
    );
    assert_eq!(
        processes::rfc3339_us("2024-02-29T12:00:00.000001Z"),
        Some(1_709_208_000_000_001)
    );
    let (host, _emulator) = emulator().await;
    let shape = Shape {
        workers: 2,
        slots: 2,
    };
    let mut tasks = backlog(36, 0, 15);
    tasks.extend((0..4).map(|i| (format!("t9{i:04}"), 300)));
    let r = leasehold_fleet(&host, shape, &tasks).await;
    eprintln!("smoke fleet: {r:?}");
    assert_eq!((r.tasks, r.duplicates, r.unfinished), (40, 0, 0), "{r:?}");
    assert_eq!(
        r.missing_receipts, 0,
        "every task's receipt is in its worker's log: {r:?}"
    );
    assert_eq!(
        r.received_while_full, 0,
        "a worker never holds what it cannot start: {r:?}"
    );
    assert!(r.wait_behind_busy_s == 0.0, "{r:?}");
    let exit = job::exit_times(&host).await;
    eprintln!("smoke job exit: {exit:?}");
    // The goal is 1 s; a debug build on a shared machine gets a margin, and
    // the old behaviour (waiting out 5 s long polls, 2.8–4 s) still fails.
    assert!(exit.decision_to_exit_ms < 2000.0, "{exit:?}");
    let race = job::exit_race(&host).await;
    eprintln!("smoke exit race: {race:?}");
    assert!(
        race.exit_to_received_ms < 5000.0,
        "a message published at the exit is not stranded: {race:?}"
    );
}

async fn bench() {
    let runs = env_num("BENCH_RUNS", 3) as usize;
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let want = |what: &str| only.is_empty() || only == what;
    let (host, _emulator) = emulator().await;
    eprintln!("emulator at {host}; {runs} runs; load {}", loadavg());
    let mut table: BTreeMap<String, Vec<f64>> = BTreeMap::new();

    if want("fleet") {
        let tasks = backlog(
            env_num("BENCH_FLEET_SHORT", 600) as usize,
            env_num("BENCH_FLEET_LONG", 12) as usize,
            env_num("BENCH_SEED", 15),
        );
        let python = if std::env::var("BENCH_SKIP_PYTHON").is_ok() {
            None
        } else {
            python::interpreter()
                .inspect_err(|e| eprintln!("no Python peer: {e}"))
                .ok()
        };
        for run in 1..=runs {
            for shape in [
                Shape {
                    workers: 8,
                    slots: 1,
                },
                Shape {
                    workers: 4,
                    slots: 4,
                },
            ] {
                let before = loadavg();
                let r = leasehold_fleet(&host, shape, &tasks).await;
                eprintln!(
                    "run {run} leasehold {}: load {before} -> {}\n  {r:?}",
                    shape.label(),
                    loadavg()
                );
                report_rows(
                    &mut table,
                    &format!("fleet {} leasehold", shape.label()),
                    &r,
                );
                if let Some(python) = &python {
                    let before = loadavg();
                    let r = python_fleet(&host, python, shape, &tasks).await;
                    eprintln!(
                        "run {run} python {}: load {before} -> {}\n  {r:?}",
                        shape.label(),
                        loadavg()
                    );
                    report_rows(&mut table, &format!("fleet {} python", shape.label()), &r);
                }
            }
        }
    }
    if want("job") {
        for run in 1..=runs.max(5) {
            let before = loadavg();
            let e = job::exit_times(&host).await;
            let race = job::exit_race(&host).await;
            eprintln!(
                "job {run}: load {before} -> {}\n  {e:?}\n  {race:?}",
                loadavg()
            );
            for (what, v) in [
                ("spawn to executor started ms", e.spawn_to_executor_ms),
                ("spawn to first Pull answered ms", e.spawn_to_first_pull_ms),
                ("idle decision to exit ms", e.decision_to_exit_ms),
                (
                    "task end to exit ms (1 s idle period included)",
                    e.end_to_exit_ms,
                ),
                (
                    "late message: exit to received by another consumer ms",
                    race.exit_to_received_ms,
                ),
                (
                    "late message released by the worker (1 = yes)",
                    f64::from(u8::from(race.released_by_worker)),
                ),
                (
                    "late message run by the worker (1 = yes)",
                    f64::from(u8::from(race.ran_by_worker)),
                ),
            ] {
                record(&mut table, &format!("job: {what}"), v);
            }
        }
        let trials = env_num("BENCH_CANCEL_TRIALS", 20) as usize;
        let probe = job::cancel_probe(&host, trials).await;
        println!(
            "cancelled Pulls: {} trials; answered before the cancel {}; cancelled and the message available at once {}; \
             cancelled and the message invisible for 2 s or more (10 s ack deadline) {} (longest wait {:.1} s)\n",
            probe.trials, probe.answered, probe.prompt, probe.stranded, probe.longest_stranded_s
        );
    }
    if !table.is_empty() {
        print_table(&table);
    }
    if want("paper") {
        println!(
            "\n| lease.extension | ModifyAckDeadline/s | request bytes/s | quota kB/s | Pull/s busy | Pull/s idle | Acknowledge/s | kill -9 invisible (min / mean / max s) |"
        );
        println!("|---|---|---|---|---|---|---|---|");
        for extension in [60, 600] {
            let c = paper::fleet_cost(
                1000,
                4,
                Duration::from_secs(3600),
                Duration::from_secs(extension),
                200,
                4,
            );
            println!(
                "| {} s | {:.1} | {:.0} | {:.1} | {:.2} | {:.0} | {:.2} | {:.0} / {:.0} / {:.0} |",
                c.extension_s,
                c.modack_per_s,
                c.modack_bytes_per_s,
                c.modack_quota_kb_per_s,
                c.pull_busy_per_s,
                c.pull_idle_per_s,
                c.ack_per_s,
                c.kill9_min_s,
                c.kill9_mean_s,
                c.kill9_max_s
            );
            eprintln!(
                "  {c:?}\n  one Pull request {} B, one Acknowledge request {} B",
                c.pull_request_bytes, c.ack_request_bytes
            );
        }
    }
}

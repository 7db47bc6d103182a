//! `cargo bench --bench pubsub`: leasehold against the official Python
//! client and the emulator's own ceiling, in one run on one emulator.
//!
//! Measures (see BENCHMARKS.md for method and results):
//! 1. throughput of no-op tasks (10,000 tasks, 256 slots), first message
//!    received to last Acknowledge answered;
//! 2. one-slot turnaround (300 no-op tasks, slots = 1), tasks per second;
//! 3. lease cost with 1,000 and 10,000 held messages: extension RPCs and
//!    bytes per minute, RPCs and time per round, CPU and resident memory;
//! 4. idle cost: CPU and memory of an idle worker;
//! 5. the Python client's streaming pull (default flow control, and
//!    `FlowControl(max_messages=1)`), and the emulator's ceiling with batched
//!    unary Pull + Acknowledge.
//!
//! Environment: `BENCH_RUNS` (default 3), `BENCH_TASKS` (10000), `BENCH_ONE_SLOT`
//! (300), `BENCH_LEASE_WINDOW_S` (60), `BENCH_IDLE_S` (20), `BENCH_SKIP_PYTHON=1`.
//! The worker runs in this process (the numbers for CPU and memory are for the
//! whole process, an upper bound for the worker).

// Wall-clock measurement of real processes: std's Instant is right here.
#![allow(clippy::disallowed_types)]
// Measurement arithmetic on small counts and on figures compared for
// exactly zero; the main is one long, ordered script of runs.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::float_cmp,
    clippy::too_many_lines,
    clippy::many_single_char_names
)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use leasehold::config::{Config, Environment};
use leasehold::emulator::Emulator;
use leasehold::metrics::Metrics;
use leasehold::pubsub::producer::{NewTask, publish_tasks};
use leasehold::pubsub::{Connection, DataPlane, GrpcDataPlane, ReceivedMessage, RpcError};
use leasehold::worker::RunOptions;
use prost::Message as _;
use tokio_util::sync::CancellationToken;

#[path = "support/python.rs"]
mod python;

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One recorded RPC.
#[derive(Debug, Clone)]
struct Rpc {
    name: &'static str,
    start: Instant,
    end: Instant,
    ids: usize,
    bytes: usize,
    seconds: i32,
    messages: usize,
}

/// A `DataPlane` that records every call: when, how many ids, request bytes.
struct Recording {
    inner: GrpcDataPlane,
    rpcs: Mutex<Vec<Rpc>>,
}

impl Recording {
    fn take(&self) -> Vec<Rpc> {
        std::mem::take(&mut self.rpcs.lock().unwrap())
    }
    fn record(&self, rpc: Rpc) {
        self.rpcs.lock().unwrap().push(rpc);
    }
}

#[async_trait::async_trait]
impl DataPlane for Recording {
    async fn pull_within(
        &self,
        sub: &str,
        max: i32,
        long_poll: Duration,
    ) -> Result<Vec<ReceivedMessage>, RpcError> {
        let start = Instant::now();
        let r = self.inner.pull_within(sub, max, long_poll).await;
        let messages = r.as_ref().map_or(0, Vec::len);
        self.record(Rpc {
            name: "pull",
            start,
            end: Instant::now(),
            ids: 0,
            bytes: 0,
            seconds: 0,
            messages,
        });
        r
    }
    async fn acknowledge(
        &self,
        sub: &str,
        ids: Vec<String>,
        timeout: Duration,
    ) -> Result<(), RpcError> {
        let bytes = googleapis_tonic_google_pubsub_v1::google::pubsub::v1::AcknowledgeRequest {
            subscription: sub.to_string(),
            ack_ids: ids.clone(),
        }
        .encoded_len();
        let n = ids.len();
        let start = Instant::now();
        let r = self.inner.acknowledge(sub, ids, timeout).await;
        self.record(Rpc {
            name: "ack",
            start,
            end: Instant::now(),
            ids: n,
            bytes,
            seconds: 0,
            messages: 0,
        });
        r
    }
    async fn modify_ack_deadline(
        &self,
        sub: &str,
        ids: Vec<String>,
        seconds: i32,
        timeout: Duration,
    ) -> Result<(), RpcError> {
        let bytes =
            googleapis_tonic_google_pubsub_v1::google::pubsub::v1::ModifyAckDeadlineRequest {
                subscription: sub.to_string(),
                ack_ids: ids.clone(),
                ack_deadline_seconds: seconds,
            }
            .encoded_len();
        let n = ids.len();
        let start = Instant::now();
        let r = self
            .inner
            .modify_ack_deadline(sub, ids, seconds, timeout)
            .await;
        self.record(Rpc {
            name: "modack",
            start,
            end: Instant::now(),
            ids: n,
            bytes,
            seconds,
            messages: 0,
        });
        r
    }
}

/// A scenario's world: config with unique names on the emulator, set up.
struct World {
    config: Config,
    env: Environment,
    conn: Connection,
}

async fn world(host: &str, name: &str, slots: usize, toml_extra: &str) -> World {
    let id = format!("bench-{name}-{}", std::process::id());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let id = format!("{id}-{nanos}");
    let dir = std::env::temp_dir().join(&id);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bench.toml");
    std::fs::write(
        &path,
        format!(
            "[pubsub]\nproject = \"leasehold-bench\"\nresults_topic = \"\"\ndead_letter_topic = \"{id}-dead\"\nack_deadline = \"60s\"\n\
             [executors.cpu]\ntopic = \"{id}\"\nsubscription = \"{id}\"\nslots = {slots}\n[http]\nlisten = \"127.0.0.1:0\"\n{toml_extra}"
        ),
    )
    .unwrap();
    let env = Environment::from_pairs([("PUBSUB_EMULATOR_HOST", host)]);
    let config = Config::load(&[path], &env).unwrap();
    let conn = Connection::new(&config.pubsub, &env).unwrap();
    leasehold::pubsub::admin::setup(&conn, &config)
        .await
        .unwrap();
    World { config, env, conn }
}

async fn publish(w: &World, kind: &str, data: &str, n: usize) {
    let tasks: Vec<NewTask> = (0..n)
        .map(|i| NewTask {
            kind: kind.into(),
            task_id: Some(format!("t{i}")),
            attributes: Default::default(),
            data: data.as_bytes().to_vec(),
        })
        .collect();
    for chunk in tasks.chunks(1000) {
        publish_tasks(&w.conn, &w.config, chunk).await.unwrap();
    }
}

/// A running in-process worker.
struct Running {
    stop: CancellationToken,
    handle: tokio::task::JoinHandle<()>,
    metrics: Metrics,
    recording: Arc<Recording>,
}

fn start_worker(w: &World) -> Running {
    let recording = Arc::new(Recording {
        inner: w
            .conn
            .data_plane()
            .with_pull_timeout(Duration::from_secs(5)),
        rpcs: Mutex::new(Vec::new()),
    });
    let metrics = Metrics::new();
    let stop = CancellationToken::new();
    let (config, env, conn, dp, m, s) = (
        w.config.clone(),
        w.env.clone(),
        w.conn.clone(),
        recording.clone() as Arc<dyn DataPlane>,
        metrics.clone(),
        stop.clone(),
    );
    let handle = tokio::spawn(async move {
        let options = RunOptions {
            metrics: Some(m),
            ..RunOptions::default()
        };
        let clients = leasehold::worker::Clients {
            data_plane: dp,
            publisher: Arc::new(leasehold::pubsub::GooglePublisher::new(conn)),
        };
        leasehold::worker::run_with(config, env, options, clients, s.cancelled_owned())
            .await
            .unwrap();
    });
    Running {
        stop,
        handle,
        metrics,
        recording,
    }
}

impl Running {
    async fn stop(self) {
        self.stop.cancel();
        let _ = self.handle.await;
    }
}

/// Seconds from the first non-empty Pull answer to the end of the last Acknowledge.
fn first_message_to_last_ack(rpcs: &[Rpc]) -> f64 {
    let first = rpcs
        .iter()
        .filter(|r| r.name == "pull" && r.messages > 0)
        .map(|r| r.end)
        .min()
        .unwrap();
    let last = rpcs
        .iter()
        .filter(|r| r.name == "ack")
        .map(|r| r.end)
        .max()
        .unwrap();
    (last - first).as_secs_f64()
}

fn acked(rpcs: &[Rpc]) -> usize {
    rpcs.iter().filter(|r| r.name == "ack").map(|r| r.ids).sum()
}

/// leasehold: N no-op tasks at `slots`; returns tasks/s (and logs the
/// process CPU it took per 1,000 tasks).
async fn leasehold_noop(host: &str, n: usize, slots: usize) -> f64 {
    let w = world(host, &format!("lh{slots}"), slots, "").await;
    publish(&w, "noop", "", n).await;
    let cpu0 = cpu_seconds();
    let run = start_worker(&w);
    let start = Instant::now();
    while acked(&run.recording.rpcs.lock().unwrap()) < n {
        assert!(
            start.elapsed() < Duration::from_secs(600),
            "leasehold did not finish"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let cpu = cpu_seconds() - cpu0;
    let rpcs = run.recording.take();
    run.stop().await;
    let rate = n as f64 / first_message_to_last_ack(&rpcs);
    eprintln!(
        "  leasehold {slots} slots: {rate:.0} tasks/s, {:.1} ms of CPU per 1,000 tasks ({:.0}% of a core while draining)",
        cpu * 1000.0 / (n as f64 / 1000.0),
        cpu / (n as f64 / rate) * 100.0
    );
    rate
}

/// The emulator's ceiling: 8 loops of Pull(`per_pull`) + Acknowledge(all).
/// With 1000 it is the emulator's own ceiling; with 32 (8 x 32 = 256
/// outstanding) it is the ceiling under leasehold's prefetch bound of 256 slots.
async fn ceiling(host: &str, n: usize, per_pull: i32) -> f64 {
    let w = world(host, "ceiling", 1, "").await;
    publish(&w, "noop", "", n).await;
    let dp = Arc::new(
        w.conn
            .data_plane()
            .with_pull_timeout(Duration::from_secs(5)),
    );
    let sub = w
        .conn
        .subscription_path(&w.config.executors["cpu"].subscription);
    let got = Arc::new(Mutex::new((0usize, None::<Instant>, None::<Instant>)));
    let mut loops = Vec::new();
    for _ in 0..8 {
        let (dp, sub, got) = (dp.clone(), sub.clone(), got.clone());
        loops.push(tokio::spawn(async move {
            loop {
                if got.lock().unwrap().0 >= n {
                    return;
                }
                let batch = dp.pull(&sub, per_pull).await.unwrap();
                if batch.is_empty() {
                    continue;
                }
                let now = Instant::now();
                got.lock().unwrap().1.get_or_insert(now);
                let ids: Vec<String> = batch.into_iter().map(|m| m.ack_id).collect();
                let k = ids.len();
                dp.acknowledge(&sub, ids, Duration::from_secs(10))
                    .await
                    .unwrap();
                let mut g = got.lock().unwrap();
                g.0 += k;
                g.2 = Some(Instant::now());
            }
        }));
    }
    for l in loops {
        l.await.unwrap();
    }
    let g = got.lock().unwrap();
    g.0 as f64 / (g.2.unwrap() - g.1.unwrap()).as_secs_f64()
}

/// The Python client on a fresh subscription with N no-op messages.
async fn python(host: &str, n: usize, max_messages: usize, skip: bool) -> Option<f64> {
    if skip {
        return None;
    }
    let w = world(host, &format!("py{max_messages}"), 1, "").await;
    publish(&w, "noop", "", n).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/python_peer.py");
    let interpreter = match python::interpreter() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("no Python peer: {e}");
            return None;
        }
    };
    let out = tokio::process::Command::new(interpreter)
        .arg(script)
        .args([
            "--project",
            &w.config.pubsub.project,
            "--subscription",
            &w.config.executors["cpu"].subscription,
        ])
        .args([
            "--n",
            &n.to_string(),
            "--max-messages",
            &max_messages.to_string(),
        ])
        .env("PUBSUB_EMULATOR_HOST", host)
        .output()
        .await
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = if let Ok(v) = serde_json::from_str(text.trim()) {
        v
    } else {
        eprintln!(
            "python peer failed: {}{}",
            text,
            String::from_utf8_lossy(&out.stderr)
        );
        return None;
    };
    let got = v["n"].as_u64()? as f64;
    Some(got / v["seconds"].as_f64()?)
}

/// CPU seconds (user + system) of this process so far.
fn cpu_seconds() -> f64 {
    proc_usage(std::process::id()).0
}

/// Resident memory of this process, MiB.
fn rss_mib() -> f64 {
    proc_usage(std::process::id()).1
}

#[derive(Debug, Default, Clone)]
struct LeaseCost {
    rpcs_per_round: f64,
    round_ms: f64,
    rpcs_per_min: f64,
    kib_per_min: f64,
    cpu_pct: f64,
    rss_mib: f64,
}

/// Holds `k` messages (tasks sleeping an hour) and measures extension cost over `window`.
async fn lease_cost(host: &str, k: usize, window: Duration) -> LeaseCost {
    let w = world(
        host,
        &format!("lease{k}"),
        k,
        "[shutdown]\ngrace = \"1s\"\nkill_grace = \"1s\"\n",
    )
    .await;
    publish(&w, "sleep", r#"{"seconds": 3600}"#, k).await;
    let run = start_worker(&w);
    let sub = w.config.executors["cpu"].subscription.clone();
    let held = run.metrics.leases_held.with_label_values(&[&sub]);
    let start = Instant::now();
    while (held.get() as usize) < k {
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "only {} of {k} held",
            held.get()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    run.recording.take();
    let cpu0 = cpu_seconds();
    let t0 = Instant::now();
    tokio::time::sleep(window).await;
    let cpu = cpu_seconds() - cpu0;
    let elapsed = t0.elapsed().as_secs_f64();
    let rss = rss_mib();
    let rpcs: Vec<Rpc> = run
        .recording
        .take()
        .into_iter()
        .filter(|r| r.name == "modack" && r.seconds > 0)
        .collect();
    run.stop().await;
    // Rounds: extension calls that started within 50 ms of each other.
    let mut rounds: Vec<Vec<&Rpc>> = Vec::new();
    let mut sorted: Vec<&Rpc> = rpcs.iter().collect();
    sorted.sort_by_key(|r| r.start);
    for r in sorted {
        match rounds.last_mut() {
            Some(round) if r.start - round[0].start < Duration::from_millis(50) => round.push(r),
            _ => rounds.push(vec![r]),
        }
    }
    let full: Vec<&Vec<&Rpc>> = rounds
        .iter()
        .filter(|r| r.iter().map(|x| x.ids).sum::<usize>() >= k)
        .collect();
    let per_round = full.iter().map(|r| r.len() as f64).sum::<f64>() / full.len().max(1) as f64;
    let round_ms = full
        .iter()
        .map(|r| (r.iter().map(|x| x.end).max().unwrap() - r[0].start).as_secs_f64() * 1000.0)
        .fold(0.0, f64::max);
    let minutes = elapsed / 60.0;
    LeaseCost {
        rpcs_per_round: per_round,
        round_ms,
        rpcs_per_min: rpcs.len() as f64 / minutes,
        kib_per_min: rpcs.iter().map(|r| r.bytes).sum::<usize>() as f64 / 1024.0 / minutes,
        cpu_pct: cpu / elapsed * 100.0,
        rss_mib: rss,
    }
}

/// CPU seconds (user + system; `USER_HZ` is 100 on Linux) and RSS (MiB) of a process.
fn proc_usage(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let f: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    let cpu = (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / 100.0;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    (cpu, kb / 1024.0)
}

/// An idle `leasehold run` process (the real binary, 4 slots, nothing to
/// do): its CPU and memory over `window`.
async fn idle_cost(host: &str, window: Duration) -> (f64, f64) {
    let w = world(host, "idle", 4, "").await;
    let dir = std::env::temp_dir().join(format!("bench-idle-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("idle.toml");
    std::fs::write(&path, toml::to_string(&w.config).unwrap()).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_leasehold"))
        .args(["run", "--config"])
        .arg(&path)
        .env("PUBSUB_EMULATOR_HOST", host)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (cpu0, _) = proc_usage(child.id());
    let t0 = Instant::now();
    tokio::time::sleep(window).await;
    let (cpu1, rss) = proc_usage(child.id());
    let pct = (cpu1 - cpu0) / t0.elapsed().as_secs_f64() * 100.0;
    let _ = child.kill();
    let _ = child.wait();
    (pct, rss)
}

/// Adds one run's value of a measure to the table.
fn record(table: &mut BTreeMap<String, Vec<f64>>, measure: &str, value: f64) {
    table.entry(measure.to_string()).or_default().push(value);
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

fn main() {
    let start = Instant::now();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(bench());
    if !std::env::args().any(|a| a == "--bench") {
        // Under `cargo test` the smoke run is one check; report it the way
        // libtest does, so the run's summary counts it (a failure panics above).
        println!(
            "test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in {:.2}s",
            start.elapsed().as_secs_f64()
        );
    }
}

async fn bench() {
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this
    // binary without it: then a small smoke run checks the harness works
    // (no Python, tiny sizes) instead of the full benchmark.
    let full = std::env::args().any(|a| a == "--bench");
    let smoke = |big: u64, small: u64| if full { big } else { small };
    let runs = env_num("BENCH_RUNS", smoke(3, 1)) as usize;
    let n = env_num("BENCH_TASKS", smoke(10_000, 300)) as usize;
    let one = env_num("BENCH_ONE_SLOT", smoke(300, 30)) as usize;
    let window = Duration::from_secs(env_num("BENCH_LEASE_WINDOW_S", smoke(60, 9)));
    let idle_window = Duration::from_secs(env_num("BENCH_IDLE_S", smoke(20, 1)));
    let lease_sizes: Vec<usize> = if full { vec![1_000, 10_000] } else { vec![100] };
    if !full {
        eprintln!("smoke run (use `cargo bench --bench pubsub` for the benchmark)");
    }
    let skip_python = !full || std::env::var("BENCH_SKIP_PYTHON").is_ok();
    let _emulator;
    let host = match std::env::var("PUBSUB_EMULATOR_HOST") {
        Ok(h) if !h.is_empty() => h,
        _ => {
            let e = tokio::task::spawn_blocking(|| Emulator::start(None))
                .await
                .unwrap()
                .expect("emulator");
            let h = e.host().to_string();
            _emulator = e;
            h
        }
    };
    eprintln!("emulator at {host}; {runs} runs");
    let mut table: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    // BENCH_ONLY=throughput runs only the 256-slot and ceiling scenario (for profiling).
    let only_throughput = std::env::var("BENCH_ONLY").is_ok_and(|v| v == "throughput");
    if std::env::var("BENCH_ONLY").is_ok_and(|v| v == "idle") {
        let (cpu, rss) = idle_cost(&host, idle_window).await;
        eprintln!("  idle: {cpu:.3}% of a core, {rss:.1} MiB");
        return;
    }
    if only_throughput {
        for _ in 0..runs {
            let c = ceiling(&host, n, 1000).await;
            let b = ceiling(&host, n, 32).await;
            let t = leasehold_noop(&host, n, 256).await;
            eprintln!("  throughput {t:.0}/s (ceiling {c:.0}/s, bounded ceiling {b:.0}/s)");
        }
        return;
    }
    for run in 1..=runs {
        eprintln!("run {run}/{runs}");
        let c = ceiling(&host, n, 1000).await;
        record(
            &mut table,
            "1 ceiling: unary Pull(1000)+Ack x 8 loops, msgs/s",
            c,
        );
        let b = ceiling(&host, n, 32).await;
        record(
            &mut table,
            "1 bounded ceiling: Pull(32)+Ack x 8 loops (256 outstanding), msgs/s",
            b,
        );
        let t = leasehold_noop(&host, n, 256).await;
        record(&mut table, "1 leasehold: 256 slots, tasks/s", t);
        if let Some(p) = python(&host, n, 0, skip_python).await {
            record(
                &mut table,
                "1 python streaming pull, default flow control, msgs/s",
                p,
            );
            record(&mut table, "1 ratio leasehold / python", t / p);
        }
        record(&mut table, "1 ratio leasehold / ceiling", t / c);
        record(&mut table, "1 ratio leasehold / bounded ceiling", t / b);
        let o = leasehold_noop(&host, one, 1).await;
        record(&mut table, "2 leasehold: 1 slot, tasks/s", o);
        if let Some(p) = python(&host, one, 1, skip_python).await {
            record(&mut table, "2 python max_messages=1, msgs/s", p);
            record(&mut table, "2 ratio leasehold / python (1 slot)", o / p);
        }
        eprintln!("  throughput {t:.0}/s (ceiling {c:.0}/s), one slot {o:.1}/s");
    }
    for k in lease_sizes {
        let l = lease_cost(&host, k, window).await;
        eprintln!("  lease {k}: {l:?}");
        assert_eq!(
            l.rpcs_per_round,
            k.div_ceil(2500) as f64,
            "a round is ceil(held / 2500) RPCs"
        );
        for (what, value) in [
            ("RPCs per round", l.rpcs_per_round),
            ("round ms", l.round_ms),
            ("extension RPCs/min", l.rpcs_per_min),
            ("extension KiB/min", l.kib_per_min),
            ("CPU % of a core", l.cpu_pct),
            ("RSS MiB", l.rss_mib),
        ] {
            record(&mut table, &format!("3 lease {k}: {what}"), value);
        }
    }
    let (cpu, rss) = idle_cost(&host, idle_window).await;
    record(&mut table, "4 idle: CPU % of a core", cpu);
    record(&mut table, "4 idle: RSS MiB", rss);

    println!("| measure | median | runs |");
    println!("|---|---|---|");
    for (k, v) in &table {
        let shown: Vec<String> = v.iter().map(|x| format!("{x:.2}")).collect();
        println!(
            "| {} | {:.2} | {} |",
            &k[2..],
            median(v.clone()),
            shown.join(", ")
        );
    }
}

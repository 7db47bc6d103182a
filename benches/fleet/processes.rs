//! The fleet's processes on the emulator: a world (topic, subscription and a
//! configuration file for `leasehold run`), the real `leasehold` binary as
//! workers, the official client's peers, their output lines, and the task
//! program both run.

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use leasehold::config::{Config, Environment};
use leasehold::pubsub::Connection;
use leasehold::pubsub::producer::{NewTask, publish_tasks};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::schedule::{Record, What};

/// Microseconds since the Unix epoch: the one clock every process's records
/// share (workers, tasks and peers are separate processes).
pub fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// The task program: `BENCH_EXE fleet-task`, the payload `{"ms": N}` on
/// stdin. Appends `start` at its first instruction and `end` at its last to
/// `$FLEET_LOG`, tagged with `$LEASEHOLD_TASK_ID`, `$FLEET_WORKER` and the
/// slot (`$FLEET_SLOT`, else the device leasehold pinned it to). The
/// process start-up before the first line is not part of its `ms`: it shows
/// in the gap between tasks, where it belongs to the dispatcher's cost.
pub fn run_task() {
    let start = now_us();
    let env = |k: &str| std::env::var(k).unwrap_or_else(|_| "-".to_string());
    let mut input = String::new();
    let _ = std::io::stdin().read_to_string(&mut input);
    let ms: u64 = serde_json::from_str::<serde_json::Value>(&input)
        .ok()
        .and_then(|v| v["ms"].as_u64())
        .expect("payload {\"ms\": N}");
    let slot = std::env::var("FLEET_SLOT").unwrap_or_else(|_| env("CUDA_VISIBLE_DEVICES"));
    let (task, worker) = (env("LEASEHOLD_TASK_ID"), env("FLEET_WORKER"));
    let log = std::env::var("FLEET_LOG").expect("FLEET_LOG");
    let append = |what, us| {
        let line = Record {
            what,
            task: task.clone(),
            worker: worker.clone(),
            slot: slot.clone(),
            us,
        }
        .line();
        // One write of a short line with O_APPEND: lines from concurrent
        // tasks never interleave.
        std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&log)
            .and_then(|mut f| f.write_all(line.as_bytes()))
            .expect("append to FLEET_LOG");
    };
    append(What::Start, start);
    let until = start + i64::try_from(ms * 1000).unwrap_or(i64::MAX);
    let left = until - now_us();
    if left > 0 {
        std::thread::sleep(Duration::from_micros(left.unsigned_abs()));
    }
    append(What::End, now_us());
}

/// A topic and subscription of their own, and a `leasehold run` config for
/// them. Its directory (config, records) is removed on drop unless
/// `BENCH_KEEP_RECORDS` is set.
pub struct World {
    pub config: Config,
    pub conn: Connection,
    dir: PathBuf,
    /// The config file the workers read.
    pub path: PathBuf,
    /// Where the tasks append their records.
    pub records: PathBuf,
    pub host: String,
}

impl World {
    /// Sets up a topic and subscription named after `name`, for workers of
    /// `slots` slots (pinned to devices `s0`… so each task knows its slot).
    pub async fn new(host: &str, name: &str, slots: usize, ack_deadline_s: u64) -> World {
        let id = format!(
            "fleet-{name}-{}-{}",
            std::process::id(),
            now_us() % 1_000_000_000
        );
        let dir = std::env::temp_dir().join(&id);
        std::fs::create_dir_all(&dir).unwrap();
        let devices: Vec<String> = (0..slots).map(|i| format!("\"s{i}\"")).collect();
        let exe = std::env::current_exe().unwrap();
        let path = dir.join("fleet.toml");
        std::fs::write(
            &path,
            format!(
                "[pubsub]\nproject = \"leasehold-bench\"\nresults_topic = \"\"\ndead_letter_topic = \"{id}-dead\"\nack_deadline = \"{ack_deadline_s}s\"\n\
                 [executors.cpu]\ntopic = \"{id}\"\nsubscription = \"{id}\"\ndevices = [{}]\n\
                 [handlers.fleet]\nexecutor = \"cpu\"\ncommand = [{}, \"fleet-task\"]\n\
                 [http]\nlisten = \"127.0.0.1:0\"\n[shutdown]\ngrace = \"10s\"\nkill_grace = \"1s\"\n",
                devices.join(", "),
                toml::Value::String(exe.display().to_string()),
            ),
        )
        .unwrap();
        let env = Environment::from_pairs([("PUBSUB_EMULATOR_HOST", host)]);
        let config = Config::load(std::slice::from_ref(&path), &env).unwrap();
        let conn = Connection::new(&config.pubsub, &env).unwrap();
        leasehold::pubsub::admin::setup(&conn, &config)
            .await
            .unwrap();
        World {
            config,
            conn,
            dir: dir.clone(),
            path,
            records: dir.join("records"),
            host: host.to_string(),
        }
    }

    pub fn subscription(&self) -> &str {
        &self.config.executors["cpu"].subscription
    }

    /// Publishes tasks of kind `fleet`, `(task id, ms)` each, in order.
    pub async fn publish(&self, tasks: &[(String, u64)]) {
        let tasks: Vec<NewTask> = tasks
            .iter()
            .map(|(id, ms)| NewTask {
                kind: "fleet".into(),
                task_id: Some(id.clone()),
                attributes: BTreeMap::new(),
                data: format!("{{\"ms\": {ms}}}").into_bytes(),
            })
            .collect();
        for chunk in tasks.chunks(1000) {
            publish_tasks(&self.conn, &self.config, chunk)
                .await
                .unwrap();
        }
    }

    pub fn read_records(&self) -> Vec<Record> {
        crate::schedule::parse(&std::fs::read_to_string(&self.records).unwrap_or_default())
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if std::env::var_os("BENCH_KEEP_RECORDS").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("  records kept in {}", self.dir.display());
        }
    }
}

/// A child process and its output lines, each with the time it was read.
pub struct Process {
    pub name: String,
    child: tokio::process::Child,
    /// When it was spawned.
    pub spawned_us: i64,
    lines: Arc<Mutex<Vec<(i64, String)>>>,
    seen: Arc<tokio::sync::Notify>,
}

impl Process {
    fn spawn(name: &str, mut command: tokio::process::Command) -> Process {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let spawned_us = now_us();
        let mut child = command.spawn().expect("spawn");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::new(tokio::sync::Notify::new());
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        for stream in [
            Box::new(out) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
            Box::new(err),
        ] {
            let (lines, seen) = (lines.clone(), seen.clone());
            tokio::spawn(async move {
                let mut reader = BufReader::new(stream).lines();
                while let Ok(Some(line)) = reader.next_line().await {
                    lines.lock().unwrap().push((now_us(), line));
                    seen.notify_waiters();
                }
            });
        }
        Process {
            name: name.to_string(),
            child,
            spawned_us,
            lines,
            seen,
        }
    }

    /// Everything it printed so far.
    pub fn lines(&self) -> Vec<(i64, String)> {
        self.lines.lock().unwrap().clone()
    }

    /// Waits for a line containing `needle`; returns when it was read.
    pub async fn wait_for(&self, needle: &str, timeout: Duration) -> Option<(i64, String)> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.seen.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(found) = self.lines().into_iter().find(|(_, l)| l.contains(needle)) {
                return Some(found);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
    }

    pub fn signal(&self, signal: Signal) {
        if let Some(pid) = self.child.id().and_then(|p| i32::try_from(p).ok()) {
            let _ = kill(Pid::from_raw(pid), signal);
        }
    }

    /// Waits for it to exit; returns when it did, or kills it after `timeout`.
    pub async fn exit(&mut self, timeout: Duration) -> Option<(i64, std::process::ExitStatus)> {
        if let Ok(Ok(status)) = tokio::time::timeout(timeout, self.child.wait()).await {
            return Some((now_us(), status));
        }
        let _ = self.child.kill().await;
        None
    }

    /// The output, for a failure message.
    pub fn dump(&self) -> String {
        self.lines()
            .into_iter()
            .map(|(_, l)| l)
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// A `leasehold run` process (the binary cargo built) on `world`, logging JSON.
pub fn spawn_worker(world: &World, name: &str, args: &[&str]) -> Process {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_leasehold"));
    command
        .args(["run", "--config"])
        .arg(&world.path)
        .args(args)
        .env("PUBSUB_EMULATOR_HOST", &world.host)
        .env("LEASEHOLD_LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .env("FLEET_WORKER", name)
        .env("FLEET_LOG", &world.records);
    Process::spawn(name, command)
}

/// The official client's peer (`benches/python_peer.py --fleet-worker`):
/// streaming pull with `FlowControl(max_messages = slots)`, each message run
/// by the same task program, its receipt recorded by the client's stream
/// callback.
pub fn spawn_peer(world: &World, python: &Path, name: &str, slots: usize) -> Process {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/python_peer.py");
    let mut command = tokio::process::Command::new(python);
    command
        .arg(script)
        .args(["--project", &world.config.pubsub.project])
        .args(["--subscription", world.subscription()])
        .args(["--max-messages", &slots.to_string()])
        .args(["--fleet-worker", name])
        .arg("--records")
        .arg(&world.records)
        .arg("--task-program")
        .arg(std::env::current_exe().unwrap())
        .env("PUBSUB_EMULATOR_HOST", &world.host);
    Process::spawn(name, command)
}

/// The JSON log line's `time`, in Unix microseconds.
pub fn log_time(line: &serde_json::Value) -> Option<i64> {
    rfc3339_us(line["time"].as_str()?)
}

/// The time of the first JSON log line whose message contains `message`.
pub fn logged_at(process: &Process, message: &str) -> Option<i64> {
    process.lines().iter().find_map(|(_, l)| {
        let v: serde_json::Value = serde_json::from_str(l).ok()?;
        if v["message"].as_str()?.contains(message) {
            log_time(&v)
        } else {
            None
        }
    })
}

/// leasehold's receipts: its "task started" lines, logged by the dispatcher
/// the moment the Pull that brought the message answered.
pub fn receipts(process: &Process) -> Vec<Record> {
    process
        .lines()
        .iter()
        .filter_map(|(_, l)| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            if v["message"] != "task started" {
                return None;
            }
            Some(Record {
                what: What::Recv,
                task: v["span"]["task_id"].as_str()?.to_string(),
                worker: process.name.clone(),
                slot: v["device"].as_str().unwrap_or("-").to_string(),
                us: log_time(&v)?,
            })
        })
        .collect()
}

/// `2026-11-28T23:58:07.49591297Z` (UTC, as tracing-stackdriver writes it)
/// in Unix microseconds.
#[allow(clippy::many_single_char_names)] // the calendar's own names
pub fn rfc3339_us(s: &str) -> Option<i64> {
    let (date, rest) = s.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let rest = rest.strip_suffix('Z')?;
    let (hms, frac) = rest.split_once('.').unwrap_or((rest, "0"));
    let mut t = hms.split(':').map(|x| x.parse::<i64>().ok());
    let (h, min, sec) = (t.next()??, t.next()??, t.next()??);
    let micros: i64 = format!("{frac:0<6}")[..6].parse().ok()?;
    // Days from 1970-01-01 (the civil-from-days inverse, proleptic Gregorian).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 86_400 + h * 3600 + min * 60 + sec) * 1_000_000) + micros)
}

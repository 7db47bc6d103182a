//! Shared helpers of the black-box tests: every test runs against the real
//! Pub/Sub emulator (started once by `scripts/test`, found through
//! `PUBSUB_EMULATOR_HOST`) with its own topics and subscriptions.

#![allow(dead_code)]
// Wall-clock waits on real processes: std::time::Instant is right here.
#![allow(clippy::disallowed_types)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use leasehold::config::{Config, Environment};
use leasehold::pubsub::producer::{NewTask, publish_tasks};
use leasehold::pubsub::{Connection, DataPlane, GrpcDataPlane, ReceivedMessage};

/// The emulator's `HOST:PORT`.
pub fn emulator_host() -> String {
    match std::env::var("PUBSUB_EMULATOR_HOST") {
        Ok(h) if !h.is_empty() => h,
        _ => panic!(
            "these tests need the Pub/Sub emulator: run them with ./scripts/test, which starts one \
             (or set PUBSUB_EMULATOR_HOST to a running emulator)"
        ),
    }
}

/// A name no other test (or earlier run on the same emulator) uses.
pub fn unique(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{prefix}-{}-{}-{nanos}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// One test's world: a directory, a config file with unique resource names,
/// and the resources created by `setup`.
pub struct World {
    pub dir: tempfile::TempDir,
    /// The base file (unique names) and the test's own layer over it.
    pub config_paths: Vec<PathBuf>,
    pub config: Config,
    pub env: Environment,
    pub conn: Connection,
    /// The emulator this world lives on.
    pub host: String,
}

impl World {
    /// Writes a config of unique names plus `extra` TOML, and runs setup.
    pub async fn new(name: &str, extra: &str) -> World {
        World::new_on(&emulator_host(), name, extra).await
    }

    /// [`World::new`] on a given emulator.
    pub async fn new_on(host: &str, name: &str, extra: &str) -> World {
        let world = World::without_setup(host, name, extra);
        world.setup().await;
        world
    }

    /// A world whose resources do not exist yet (a test runs `setup` itself).
    pub fn without_setup(host: &str, name: &str, extra: &str) -> World {
        let dir = tempfile::tempdir().unwrap();
        let id = unique(name);
        let toml = format!(
            r#"
[pubsub]
project = "leasehold-test"
results_topic = "{id}-results"
dead_letter_topic = "{id}-dead"
ack_deadline = "10s"

[lease]
extension = "10s"

[executors.cpu]
topic = "{id}-cpu"
subscription = "{id}-cpu"

[executors.gpu]
topic = "{id}-gpu"
subscription = "{id}-gpu"

[http]
listen = "127.0.0.1:0"
"#
        );
        let base = dir.path().join("base.toml");
        std::fs::write(&base, toml).unwrap();
        let layer = dir.path().join("test.toml");
        std::fs::write(&layer, extra).unwrap();
        let config_paths = vec![base, layer];
        let env = Environment::from_pairs([("PUBSUB_EMULATOR_HOST", host)]);
        let config =
            Config::load(&config_paths, &env).unwrap_or_else(|e| panic!("test config: {e}"));
        let conn = Connection::new(&config.pubsub, &env).unwrap();
        World {
            dir,
            config_paths,
            config,
            env,
            conn,
            host: host.to_string(),
        }
    }

    /// Runs setup (again).
    pub async fn setup(&self) {
        leasehold::pubsub::admin::setup(&self.conn, &self.config)
            .await
            .expect("setup on the emulator");
    }

    /// `--config FILE` for each layer, for the binary.
    pub fn config_args(&self) -> Vec<String> {
        self.config_paths
            .iter()
            .flat_map(|p| ["--config".to_string(), p.display().to_string()])
            .collect()
    }

    /// A path inside the test directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Publishes tasks; returns their message ids.
    pub async fn publish(&self, tasks: &[NewTask]) -> Vec<String> {
        publish_tasks(&self.conn, &self.config, tasks)
            .await
            .unwrap()
    }

    /// The full path of a subscription id.
    pub fn subscription(&self, id: &str) -> String {
        self.conn.subscription_path(id)
    }

    /// The CPU subscription's full path.
    pub fn cpu_subscription(&self) -> String {
        self.subscription(&self.config.executors["cpu"].subscription)
    }

    /// A data plane of our own, to look into subscriptions as a rival consumer.
    pub fn data_plane(&self) -> GrpcDataPlane {
        self.conn
            .data_plane()
            .with_pull_timeout(Duration::from_secs(3))
    }

    /// Pulls from `subscription` for about `wait`, collecting what arrives.
    pub async fn pull_for(&self, subscription: &str, wait: Duration) -> Vec<ReceivedMessage> {
        let dp = self.data_plane();
        let start = Instant::now();
        let mut got = Vec::new();
        while start.elapsed() < wait {
            got.extend(dp.pull(subscription, 100).await.unwrap());
        }
        got
    }

    /// Starts `leasehold run` with this world's config.
    pub fn spawn_worker(&self, name: &str, extra_args: &[&str]) -> WorkerProcess {
        self.spawn_worker_env(name, extra_args, &[])
    }

    /// [`World::spawn_worker`] with extra environment variables.
    pub fn spawn_worker_env(
        &self,
        name: &str,
        extra_args: &[&str],
        envs: &[(&str, &str)],
    ) -> WorkerProcess {
        let mut command = Command::new(env!("CARGO_BIN_EXE_leasehold"));
        command
            .arg("run")
            .args(self.config_args())
            .args(extra_args)
            .env("PUBSUB_EMULATOR_HOST", &self.host)
            .env("WORKER_NAME", name)
            .env("RUST_LOG", "info")
            .env_remove("LEASEHOLD_LOG_FORMAT")
            .envs(envs.iter().copied());
        WorkerProcess::spawn(command, self.path(&format!("{name}.log")))
    }
}

/// A `leasehold run` child process; killed on drop.
pub struct WorkerProcess {
    child: Option<Child>,
    pub log: PathBuf,
}

impl WorkerProcess {
    /// Starts `command` with stdout and stderr to `log`.
    pub fn spawn(mut command: Command, log: PathBuf) -> WorkerProcess {
        let file = std::fs::File::create(&log).unwrap();
        let child = command
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        WorkerProcess {
            child: Some(child),
            log,
        }
    }

    /// The process id.
    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id().cast_signed()
    }

    /// Sends a signal.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), signal).unwrap();
    }

    /// Waits for the exit, at most `limit`.
    pub fn wait_timeout(&mut self, limit: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// The log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A task of `kind` with a task id and JSON data.
pub fn task(kind: &str, id: &str, data: &str) -> NewTask {
    NewTask {
        kind: kind.into(),
        task_id: Some(id.into()),
        attributes: Default::default(),
        data: data.as_bytes().to_vec(),
    }
}

/// Lines of a file (empty if it does not exist).
pub fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// Polls `check` every 100 ms until it is true or `limit` passes.
pub async fn eventually(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(
            start.elapsed() <= limit,
            "timed out after {limit:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A shell handler that records "start <task> <worker> <attempt> <epoch-ms>" and
/// "end ..." lines in `log` and sleeps `{"seconds": N}`.
pub fn recording_handler(kind: &str, log: &Path, executor: &str) -> String {
    let script = format!(
        r#"set -eu
now() {{ date +%s%3N; }}
echo "start $LEASEHOLD_TASK_ID ${{WORKER_NAME:-?}} $LEASEHOLD_ATTEMPT $(now) ${{CUDA_VISIBLE_DEVICES:-}}" >> {log}
secs=$(sed -n 's/.*"seconds"[^0-9]*\([0-9][0-9]*\).*/\1/p')
sleep "${{secs:-0}}"
echo "end $LEASEHOLD_TASK_ID ${{WORKER_NAME:-?}} $LEASEHOLD_ATTEMPT $(now) ${{CUDA_VISIBLE_DEVICES:-}}" >> {log}
"#,
        log = log.display()
    );
    format!(
        "[handlers.{kind}]\nexecutor = \"{executor}\"\ncommand = [\"/bin/sh\", \"-c\", {}]\n",
        toml_string(&script)
    )
}

/// A TOML basic string.
pub fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// One parsed line of a recording handler's log.
#[derive(Debug, Clone)]
pub struct Event {
    pub what: String,
    pub task: String,
    pub worker: String,
    pub attempt: u32,
    pub at_ms: u64,
    pub device: String,
}

/// Parses a recording handler's log.
pub fn events(log: &Path) -> Vec<Event> {
    lines(log)
        .iter()
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            Event {
                what: f[0].into(),
                task: f[1].into(),
                worker: f[2].into(),
                attempt: f[3].parse().unwrap(),
                at_ms: f[4].parse().unwrap(),
                device: f.get(5).unwrap_or(&"").to_string(),
            }
        })
        .collect()
}

impl WorkerProcess {
    /// The address of /metrics, /healthz and /readyz, read from the log.
    pub async fn http_addr(&self) -> String {
        let mut found = String::new();
        eventually(
            Duration::from_secs(20),
            "the HTTP address in the log",
            || {
                let log = self.log();
                match log
                    .lines()
                    .find(|l| l.contains("serving /metrics"))
                    .and_then(|l| l.split("addr=").nth(1))
                {
                    Some(a) => {
                        found = a.trim().to_string();
                        true
                    }
                    None => false,
                }
            },
        )
        .await;
        found
    }
}

/// A plain HTTP GET: (status code, body).
pub fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    // HTTP/1.0: the answer is never chunked, so the body is plain.
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// The value of one sample in a Prometheus text scrape (labels as written, sorted by name).
pub fn sample(scrape: &str, series: &str) -> Option<f64> {
    scrape
        .lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Waits until the recording handler's log has an event matching `pred`.
pub async fn wait_for_event(log: &Path, secs: u64, what: &str, pred: impl Fn(&Event) -> bool) {
    eventually(Duration::from_secs(secs), what, || {
        events(log).iter().any(&pred)
    })
    .await;
}

/// The first event matching `pred` (panics with the whole log if none).
pub fn first_event(log: &Path, pred: impl Fn(&Event) -> bool) -> Event {
    let ev = events(log);
    ev.iter()
        .find(|e| pred(e))
        .cloned()
        .unwrap_or_else(|| panic!("no such event in {ev:?}"))
}

/// A `/bin/sh -c SCRIPT` handler of the CPU executor as a TOML table, with
/// `extra` keys.
pub fn shell_handler(kind: &str, script: &str, extra: &str) -> String {
    format!(
        "[handlers.{kind}]\nexecutor = \"cpu\"\ncommand = [\"/bin/sh\", \"-c\", {}]\n{extra}\n",
        toml_string(script)
    )
}

/// Pulls (and acks) from `subscription` until `done(got)` or `limit` passed.
pub async fn pull_until(
    world: &World,
    subscription: &str,
    limit: Duration,
    done: impl Fn(&[ReceivedMessage]) -> bool,
) -> Vec<ReceivedMessage> {
    let dp = world.data_plane();
    let mut got = Vec::new();
    let start = Instant::now();
    while !done(&got) && start.elapsed() < limit {
        let batch = dp.pull(subscription, 100).await.unwrap();
        if !batch.is_empty() {
            let ids = batch.iter().map(|m| m.ack_id.clone()).collect();
            dp.acknowledge(subscription, ids, Duration::from_secs(10))
                .await
                .unwrap();
        }
        got.extend(batch);
    }
    got
}

/// A received message's attributes.
pub fn message_attributes(m: &ReceivedMessage) -> std::collections::BTreeMap<String, String> {
    let message = m.message.as_ref().expect("a message body");
    message.attributes.clone().into_iter().collect()
}

/// A received message's data as JSON.
pub fn message_json(m: &ReceivedMessage) -> serde_json::Value {
    serde_json::from_slice(&m.message.as_ref().expect("a message body").data).unwrap()
}

//! The Google Pub/Sub emulator as a child process, for `leasehold dev`.
//!
//! It runs in its own process group: the `gcloud` wrapper starts a Java
//! process that outlives it, so stopping means signalling the whole group.

// Plain threads, no tokio runtime here: std::time::Instant is right.
#![allow(clippy::disallowed_types)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

/// A running emulator; dropping it stops the whole process group.
#[derive(Debug)]
pub struct Emulator {
    child: Child,
    host: String,
}

/// The emulator could not be started.
#[derive(Debug, thiserror::Error)]
pub enum EmulatorError {
    /// Neither the launcher nor gcloud could be run.
    #[error(
        "cannot start the Pub/Sub emulator ({0}); install google-cloud-cli-pubsub-emulator or set PUBSUB_EMULATOR_HOST"
    )]
    Spawn(String),
    /// It did not listen in time.
    #[error("the Pub/Sub emulator did not listen on {0} within 60s")]
    NotReady(String),
}

/// The emulator's own launcher inside the Cloud SDK, if gcloud can tell where that is.
fn launcher() -> Option<PathBuf> {
    let out = Command::new("gcloud")
        .args(["info", "--format=value(installation.sdk_root)"])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let root = String::from_utf8(out.stdout).ok()?;
    let path =
        PathBuf::from(root.trim()).join("platform/pubsub-emulator/bin/cloud-pubsub-emulator");
    path.is_file().then_some(path)
}

/// A free TCP port on the loopback interface.
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Emulator {
    /// Starts an emulator on a free loopback port and waits until it listens.
    /// Its output goes to `log` (or is discarded).
    pub fn start(log: Option<&Path>) -> Result<Emulator, EmulatorError> {
        let port = free_port().map_err(|e| EmulatorError::Spawn(e.to_string()))?;
        Emulator::start_on(port, log)
    }

    /// Starts an emulator on a given loopback port (e.g. to restart one).
    pub fn start_on(port: u16, log: Option<&Path>) -> Result<Emulator, EmulatorError> {
        let host = format!("127.0.0.1:{port}");
        let mut command = if let Some(path) = launcher() {
            let mut c = Command::new(path);
            c.args(["--host=127.0.0.1", &format!("--port={port}")]);
            c
        } else {
            let mut c = Command::new("gcloud");
            c.args([
                "beta",
                "emulators",
                "pubsub",
                "start",
                &format!("--host-port={host}"),
            ]);
            c
        };
        let (out, err) = match log.and_then(|p| std::fs::File::create(p).ok()) {
            Some(f) => (
                Stdio::from(
                    f.try_clone()
                        .map_err(|e| EmulatorError::Spawn(e.to_string()))?,
                ),
                Stdio::from(f),
            ),
            None => (Stdio::null(), Stdio::null()),
        };
        let child = command
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| EmulatorError::Spawn(e.to_string()))?;
        let mut emulator = Emulator { child, host };
        emulator.wait_ready(Duration::from_secs(60))?;
        Ok(emulator)
    }

    fn wait_ready(&mut self, limit: Duration) -> Result<(), EmulatorError> {
        let addr: SocketAddr = self.host.parse().expect("loopback address");
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(EmulatorError::Spawn(format!("it exited with {status}")));
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Err(EmulatorError::NotReady(self.host.clone()))
    }

    /// `HOST:PORT`, the value for `PUBSUB_EMULATOR_HOST`.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Stops the whole process group (SIGTERM, then SIGKILL).
    pub fn stop(&mut self) {
        let pgid = Pid::from_raw(i32::try_from(self.child.id()).expect("a Linux pid fits in i32"));
        let _ = killpg(pgid, Signal::SIGTERM);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // The Java process may outlive the wrapper: kill what is left.
        let _ = killpg(pgid, Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.stop();
    }
}

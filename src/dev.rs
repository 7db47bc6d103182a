//! `leasehold dev`: the one-command local demo. Starts the emulator (unless
//! `PUBSUB_EMULATOR_HOST` is set), runs setup with `config/dev.toml`, starts
//! the worker, publishes sample tasks of each class, shows progress live, and
//! stops everything cleanly on Ctrl-C.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Environment};
use crate::emulator::Emulator;
use crate::metrics::Metrics;
use crate::pubsub::Connection;
use crate::pubsub::admin::setup;
use crate::pubsub::producer::{NewTask, publish_tasks};
use crate::worker::RunOptions;

/// The demo configuration, used when no `--config` is given.
pub const DEV_CONFIG: &str = "config/dev.toml";

/// The sample tasks: GPU renders and CPU reductions, one of which fails for good.
pub fn sample_tasks() -> Vec<NewTask> {
    let mut tasks = Vec::new();
    for (i, seconds) in [4, 6, 3].into_iter().enumerate() {
        tasks.push(NewTask {
            kind: "render".into(),
            task_id: Some(format!("render-{}", i + 1)),
            attributes: [("scene".to_string(), format!("scene-{}", i + 1))].into(),
            data: format!(r#"{{"seconds": {seconds}}}"#).into_bytes(),
        });
    }
    for (i, polygons) in [120_000, 50_000].into_iter().enumerate() {
        tasks.push(NewTask {
            kind: "reduce".into(),
            task_id: Some(format!("reduce-{}", i + 1)),
            attributes: Default::default(),
            data: format!(r#"{{"polygons": {polygons}}}"#).into_bytes(),
        });
    }
    tasks.push(NewTask {
        kind: "reduce".into(),
        task_id: Some("reduce-bad-payload".into()),
        attributes: Default::default(),
        data: br#"{"mesh": "no polygon count"}"#.to_vec(),
    });
    tasks
}

/// Runs the demo until Ctrl-C.
pub async fn run(files: Vec<PathBuf>, env: Environment) -> anyhow::Result<()> {
    let files = if files.is_empty() {
        vec![PathBuf::from(DEV_CONFIG)]
    } else {
        files
    };
    let mut emulator = None;
    let env = if let Some(host) = env.get("PUBSUB_EMULATOR_HOST") {
        println!("using the Pub/Sub emulator at {host} (PUBSUB_EMULATOR_HOST)");
        env
    } else {
        println!("starting the Pub/Sub emulator ...");
        let e = tokio::task::spawn_blocking(|| Emulator::start(None))
            .await
            .context("emulator start")??;
        println!("Pub/Sub emulator listening on {}", e.host());
        let env = env.with("PUBSUB_EMULATOR_HOST", e.host());
        emulator = Some(e);
        env
    };
    let config = Config::load(&files, &env).context("loading the dev configuration")?;
    let conn = Connection::new(&config.pubsub, &env)?;
    for change in setup(&conn, &config).await? {
        println!("setup: {:?} {}", change.action, change.resource);
    }

    let metrics = Metrics::new();
    let stop = CancellationToken::new();
    let worker = tokio::spawn({
        let (config, env, stop) = (config.clone(), env.clone(), stop.clone());
        let options = RunOptions {
            metrics: Some(metrics.clone()),
            ..RunOptions::default()
        };
        async move { crate::worker::run(config, env, options, stop.cancelled_owned()).await }
    });

    let tasks = sample_tasks();
    let ids = publish_tasks(&conn, &config, &tasks).await?;
    println!(
        "published {} sample tasks ({} messages); Ctrl-C stops the worker and the emulator",
        tasks.len(),
        ids.len()
    );

    let mut tick = tokio::time::interval(Duration::from_secs(2));
    let mut all_done_reported = false;
    let mut last_line = String::new();
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = tick.tick() => {
                let p = Progress::read(&metrics);
                let line = format!("progress: {p}");
                if line != last_line {
                    println!("{line}");
                    last_line = line;
                }
                if !all_done_reported && p.finished() >= tasks.len() as u64 {
                    all_done_reported = true;
                    println!("all sample tasks ended; publish more with `leasehold publish --config {DEV_CONFIG} --kind reduce --data '{{\"polygons\": 9000}}'` (PUBSUB_EMULATOR_HOST={}) or press Ctrl-C",
                        env.get("PUBSUB_EMULATOR_HOST").unwrap_or_default());
                }
            }
        }
    }
    println!("stopping the worker ...");
    stop.cancel();
    worker.await.context("worker task")??;
    if let Some(mut e) = emulator {
        println!("stopping the emulator ...");
        tokio::task::spawn_blocking(move || e.stop()).await?;
    }
    println!("stopped");
    Ok(())
}

/// Task counters summed over kinds, and each busy slot's progress, for the
/// progress line.
#[derive(Debug, Default)]
struct Progress {
    running: i64,
    /// (executor/slot, fraction) of the slots whose task reported progress.
    slots: Vec<(String, f64)>,
    succeeded: u64,
    retrying: u64,
    dead_lettered: u64,
    leases: i64,
}

impl Progress {
    // Gauges and counters are whole numbers stored as f64.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    fn read(m: &Metrics) -> Progress {
        let mut p = Progress::default();
        for family in m.registry.gather() {
            for metric in family.get_metric() {
                let label = |name: &str| {
                    metric
                        .get_label()
                        .iter()
                        .find(|l| l.name() == name)
                        .map(|l| l.value().to_string())
                        .unwrap_or_default()
                };
                match family.name() {
                    "leasehold_tasks_in_progress" => {
                        p.running += metric.get_gauge().get_value() as i64;
                    }
                    "leasehold_leases_held" => p.leases += metric.get_gauge().get_value() as i64,
                    "leasehold_task_progress_ratio" => {
                        let fraction = metric.get_gauge().get_value();
                        if fraction > 0.0 {
                            let slot = format!("{}/{}", label("executor"), label("slot"));
                            p.slots.push((slot, fraction));
                        }
                    }
                    "leasehold_tasks_finished_total" => {
                        let v = metric.get_counter().get_value() as u64;
                        match label("outcome").as_str() {
                            "succeeded" => p.succeeded += v,
                            "retrying" => p.retrying += v,
                            "dead_lettered" => p.dead_lettered += v,
                            _ => {}
                        }
                    }
                    _ => {}
                }
            }
        }
        p.slots.sort_by(|a, b| a.0.cmp(&b.0));
        p
    }

    fn finished(&self) -> u64 {
        self.succeeded + self.dead_lettered
    }
}

impl std::fmt::Display for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "running {}", self.running)?;
        if !self.slots.is_empty() {
            let slots: Vec<String> = self
                .slots
                .iter()
                .map(|(slot, fraction)| format!("{slot} {:.0}%", fraction * 100.0))
                .collect();
            write!(f, " ({})", slots.join(", "))?;
        }
        write!(
            f,
            ", leases held {}, succeeded {}, retried {}, dead-lettered {}",
            self.leases, self.succeeded, self.retrying, self.dead_lettered
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_progress_line_shows_each_busy_slots_progress() {
        let m = Metrics::new();
        m.init_slot_series("gpu", 2);
        m.init_slot_series("cpu", 1);
        m.tasks_in_progress.with_label_values(&["gpu"]).set(2);
        m.task_progress.with_label_values(&["gpu", "1"]).set(0.4);
        m.task_progress.with_label_values(&["cpu", "0"]).set(0.05);
        m.tasks_finished
            .with_label_values(&["render", "gpu", "succeeded"])
            .inc();
        assert_eq!(
            Progress::read(&m).to_string(),
            "running 2 (cpu/0 5%, gpu/1 40%), leases held 0, succeeded 1, retried 0, dead-lettered 0"
        );
        m.task_progress.with_label_values(&["gpu", "1"]).set(0.0);
        m.task_progress.with_label_values(&["cpu", "0"]).set(0.0);
        assert!(
            Progress::read(&m)
                .to_string()
                .starts_with("running 2, leases")
        );
    }
}

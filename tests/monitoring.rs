//! The monitoring surface, checked with the real Prometheus tools: promtool on
//! a real scrape and on the rules, and a real Prometheus scraping a worker
//! that runs tasks, evaluating every query of the Grafana dashboard.
//!
//! Needs Debian's `prometheus` package (promtool, prometheus);
//! `./scripts/test` installs it.

mod support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use support::*;

fn monitoring_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("manifests/monitoring")
}

fn tool(name: &str) -> Command {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "{name} is not on PATH: run the tests with ./scripts/test, which installs \
         Debian's prometheus package (./scripts/test --test monitoring runs only this file)"
    );
    Command::new(name)
}

fn run_ok(mut c: Command) -> String {
    let out = c.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{c:?} failed:\n{text}");
    text
}

#[test]
fn rules_are_valid_and_their_unit_tests_pass() {
    let dir = monitoring_dir();
    let mut check = tool("promtool");
    check.args(["check", "rules"]).arg(dir.join("rules.yml"));
    let text = run_ok(check);
    let expected = format!("SUCCESS: {} rules found", rule_count());
    assert!(text.contains(&expected), "{text}");
    let mut test = tool("promtool");
    test.current_dir(&dir)
        .args(["test", "rules", "rules_test.yml"]);
    assert!(run_ok(test).contains("SUCCESS"));
}

/// How many rules manifests/monitoring/rules.yml holds.
fn rule_count() -> usize {
    let rules: serde_json::Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(monitoring_dir().join("rules.yml")).unwrap(),
    )
    .unwrap();
    rules["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["rules"].as_array().unwrap().len())
        .sum()
}

/// Percent-encodes a query for a URL.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A Prometheus server in its own process group; killed on drop.
struct Prometheus {
    child: std::process::Child,
    addr: String,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_prometheus(dir: &Path, target: &str) -> Prometheus {
    let port = leasehold::emulator::free_port().unwrap();
    let addr = format!("127.0.0.1:{port}");
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {}\n\
             scrape_configs:\n  - job_name: leasehold-cpu\n    static_configs:\n      - targets: [\"{target}\"]\n",
            monitoring_dir().join("rules.yml").display()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
    let child = tool("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("tsdb").display()
        ))
        .arg(format!("--web.listen-address={addr}"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    Prometheus { child, addr }
}

fn query(prom: &str, q: &str) -> serde_json::Value {
    let (status, body) = http_get(prom, &format!("/api/v1/query?query={}", encode(q))).unwrap();
    let v: serde_json::Value = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("{q}: HTTP {status}, not JSON ({e}): {body}"));
    assert_eq!(v["status"], "success", "{q}: {v}");
    v
}

/// Panels whose queries must return data once the worker has run tasks.
const CORE_PANELS: &[&str] = &[
    "Throughput by outcome (tasks/s)",
    "Tasks started by kind (tasks/s)",
    "In progress vs slots",
    "Queue wait (publish to start)",
    "Task duration quantiles",
    "Leases held",
    "Lease extensions (messages/s) and RPCs",
    "Leases lost (last hour)",
    "Messages pulled (per second)",
    "Per pod: tasks finished (per second)",
    "Per pod: in progress / slots",
    "Workers up",
    "Versions",
];

// One scenario, read top to bottom: worker, load, scrape, Prometheus, queries.
#[allow(clippy::too_many_lines)]
#[tokio::test(flavor = "multi_thread")]
async fn a_real_prometheus_scrapes_a_worker_and_every_dashboard_query_evaluates() {
    let extra = "[executors.cpu]\nslots = 4\n\
                 [handlers.broken]\nexecutor = \"cpu\"\ncommand = [\"/bin/sh\", \"-c\", \"exit 65\"]\npermanent_exit_codes = [65]\n";
    let world = World::new("monitoring", extra).await;
    let worker = world.spawn_worker("w1", &[]);
    let http = worker.http_addr().await;
    let prom = start_prometheus(world.dir.path(), &http);

    // Work for the dashboard: long tasks (their leases get extended), short
    // ones, and one that dead-letters.
    world
        .publish(&[
            task("sleep", "long-1", r#"{"seconds": 12}"#),
            task("sleep", "long-2", r#"{"seconds": 12}"#),
            task("broken", "bad-1", "{}"),
        ])
        .await;
    for round in 0..16 {
        world
            .publish(&[
                task("noop", &format!("n{round}"), ""),
                task("sleep", &format!("s{round}"), r#"{"seconds": 0.5}"#),
            ])
            .await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    // promtool lints a real scrape.
    let (status, scrape) = http_get(&http, "/metrics").unwrap();
    assert_eq!(status, 200);
    let mut lint = tool("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    lint.stdin
        .take()
        .unwrap()
        .write_all(scrape.as_bytes())
        .unwrap();
    let out = lint.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Prometheus is up and has scraped the worker for a while.
    eventually(
        Duration::from_secs(30),
        "Prometheus to scrape the worker",
        || {
            http_get(&prom.addr, "/-/ready").is_ok_and(|(s, _)| s == 200)
                && query(&prom.addr, "up{job=\"leasehold-cpu\"} == 1")["data"]["result"]
                    .as_array()
                    .is_some_and(|r| !r.is_empty())
        },
    )
    .await;
    eventually(
        Duration::from_secs(30),
        "extension rounds to be scraped",
        || {
            query(&prom.addr, "sum(leasehold_lease_extension_rpcs_total)")["data"]["result"]
                .as_array()
                .is_some_and(|r| !r.is_empty())
        },
    )
    .await;

    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(monitoring_dir().join("dashboard.json")).unwrap(),
    )
    .unwrap();
    let panels = dashboard["panels"].as_array().unwrap();
    let mut empty = Vec::new();
    for panel in panels {
        let title = panel["title"].as_str().unwrap();
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            // Every query must evaluate without error (query() asserts it).
            let result = query(&prom.addr, expr);
            let has_data = result["data"]["result"]
                .as_array()
                .is_some_and(|r| !r.is_empty());
            if CORE_PANELS.contains(&title) && !has_data {
                empty.push(format!("{title}: {expr}"));
            }
        }
    }
    for core in CORE_PANELS {
        assert!(
            panels.iter().any(|p| p["title"] == *core),
            "core panel {core:?} is missing from the dashboard"
        );
    }
    assert!(empty.is_empty(), "core panels without data: {empty:#?}");

    // Prometheus loaded the alert rules and evaluates them without error.
    let (_, rules) = http_get(&prom.addr, "/api/v1/rules").unwrap();
    let rules: serde_json::Value = serde_json::from_str(&rules).unwrap();
    let all: Vec<&serde_json::Value> = rules["data"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .collect();
    assert_eq!(all.len(), rule_count());
    for r in all {
        assert_eq!(r["health"], "ok", "{r}");
    }
    // For the README's picture: LEASEHOLD_DASHBOARD_DATA=FILE saves every
    // panel's series over the run (scripts/render-dashboard draws them).
    if let Ok(path) = std::env::var("LEASEHOLD_DASHBOARD_DATA") {
        let end = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let mut saved = Vec::new();
        for panel in panels {
            let mut targets = Vec::new();
            for target in panel["targets"].as_array().unwrap() {
                let expr = target["expr"].as_str().unwrap();
                let url = format!(
                    "/api/v1/query_range?query={}&start={}&end={end}&step=1",
                    encode(expr),
                    end - 60
                );
                let (_, body) = http_get(&prom.addr, &url).unwrap();
                let v: serde_json::Value = serde_json::from_str(&body).unwrap();
                targets.push(serde_json::json!({
                    "expr": expr,
                    "legend": target["legendFormat"],
                    "result": v["data"]["result"],
                }));
            }
            saved.push(serde_json::json!({
                "title": panel["title"],
                "unit": panel["fieldConfig"]["defaults"]["unit"],
                "targets": targets,
            }));
        }
        std::fs::write(&path, serde_json::to_string(&saved).unwrap()).unwrap();
    }
    // The dead letter shows in the data the alert reads.
    let dead = query(
        &prom.addr,
        "sum(leasehold_tasks_finished_total{outcome=\"dead_lettered\"})",
    );
    assert_eq!(dead["data"]["result"][0]["value"][1], "1");
}

//! Shared helpers of the manifest tests: render kustomizations with
//! `kubectl kustomize` (as shipped, or with other values in
//! manifests/project/project.env), pick objects out of the result, and find
//! the external tools the tests need.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use serde_json::Value;

/// Every kustomization a user applies to a cluster (README).
pub const APPLIED: &[&str] = &[
    "overlays/cpu",
    "overlays/cpu-keda",
    "overlays/gpu",
    "overlays/gpu-job",
    "overlays/cpu-prometheus-operator",
    "gcp",
    "monitoring/gmp",
    "monitoring/prometheus-operator",
    "monitoring/alertmanager",
];

/// The overlays: one pool of workers each.
pub const OVERLAYS: &[&str] = &[
    "overlays/cpu",
    "overlays/cpu-keda",
    "overlays/gpu",
    "overlays/gpu-job",
    "overlays/cpu-prometheus-operator",
];

/// API versions of Kubernetes' own kinds (validated by kubernetes-validate).
pub const BUILTIN: &[&str] = &[
    "v1",
    "apps/v1",
    "batch/v1",
    "policy/v1",
    "autoscaling/v2",
    "rbac.authorization.k8s.io/v1",
];

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Fails with how to install `tool` unless it is on PATH.
pub fn need(tool: &str, install: &str) {
    let ok = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "{tool} is not on PATH: run the tests with ./scripts/test, which installs it ({install})"
    );
}

/// Fails with how to install them unless `python3` imports `modules`.
pub fn need_python(modules: &str) {
    need("python3", "install Python 3");
    let out = Command::new("python3")
        .args(["-c", &format!("import {modules}")])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python3 cannot import {modules}: run the tests with ./scripts/test, which installs \
         scripts/test-requirements.txt into a venv under target/\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The values of an env file (KEY=VALUE lines; # comments).
pub fn read_env(path: &Path) -> BTreeMap<String, String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l
                .split_once('=')
                .unwrap_or_else(|| panic!("{}: not KEY=VALUE: {l}", path.display()));
            (k.to_string(), v.to_string())
        })
        .collect()
}

/// The shipped settings of manifests/project/project.env.
pub fn shipped_settings() -> BTreeMap<String, String> {
    read_env(&root().join("manifests/project/project.env"))
}

/// `kubectl kustomize manifests/DIR` as parsed documents.
pub fn render(dir: &str) -> Vec<Value> {
    render_in(&root().join("manifests"), dir)
}

/// Renders `dir` of a copy of manifests/ whose project.env has `settings`
/// instead (every key must already be there). Keep the copy alive while
/// rendering: returns it with the renderer.
pub struct Rendered {
    copy: tempfile::TempDir,
}

impl Rendered {
    pub fn with(settings: &[(&str, &str)]) -> Rendered {
        let copy = tempfile::tempdir().unwrap();
        copy_dir(&root().join("manifests"), copy.path());
        let env = copy.path().join("project/project.env");
        let mut text = std::fs::read_to_string(&env).unwrap();
        for (key, value) in settings {
            let old = read_env(&env);
            let line = format!(
                "{key}={}",
                old.get(*key).unwrap_or_else(|| panic!("{key}?"))
            );
            assert!(text.contains(&line), "{line}");
            text = text.replace(&line, &format!("{key}={value}"));
        }
        std::fs::write(&env, text).unwrap();
        Rendered { copy }
    }

    pub fn render(&self, dir: &str) -> Vec<Value> {
        render_in(self.copy.path(), dir)
    }

    /// The raw YAML text of the rendering.
    pub fn text(&self, dir: &str) -> String {
        kustomize(self.copy.path(), dir)
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

fn kustomize(manifests: &Path, dir: &str) -> String {
    need("kubectl", "install kubectl");
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(manifests.join(dir))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kubectl kustomize {dir}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn render_in(manifests: &Path, dir: &str) -> Vec<Value> {
    parse_yaml(&kustomize(manifests, dir))
}

/// Every document of a YAML stream.
pub fn parse_yaml(text: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

/// Writes documents as one YAML stream.
pub fn write_yaml(path: &Path, docs: &[&Value]) {
    let text: Vec<String> = docs
        .iter()
        .map(|d| serde_yaml_ng::to_string(d).unwrap())
        .collect();
    std::fs::write(path, text.join("---\n")).unwrap();
}

pub fn kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

pub fn one<'a>(docs: &'a [Value], k: &str) -> &'a Value {
    let found = kind(docs, k);
    assert_eq!(found.len(), 1, "exactly one {k}");
    found[0]
}

pub fn name(doc: &Value) -> &str {
    doc["metadata"]["name"].as_str().unwrap()
}

pub fn is_builtin(doc: &Value) -> bool {
    BUILTIN.contains(&doc["apiVersion"].as_str().unwrap())
}

/// The pod template of a pool's workload: a Deployment's, or a `ScaledJob`'s.
pub fn pod_template(docs: &[Value]) -> &Value {
    let deployments = kind(docs, "Deployment");
    let jobs = kind(docs, "ScaledJob");
    assert_eq!(
        deployments.len() + jobs.len(),
        1,
        "one workload: a Deployment or a ScaledJob"
    );
    match deployments.first() {
        Some(d) => &d["spec"]["template"],
        None => &jobs[0]["spec"]["jobTargetRef"]["template"],
    }
}

/// The worker container of a pod template.
pub fn worker(template: &Value) -> &Value {
    template["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "leasehold")
        .expect("a container named leasehold")
}

/// A Kubernetes quantity in base units (cores, bytes).
pub fn quantity(v: &Value) -> f64 {
    let s = match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        _ => panic!("not a quantity: {v}"),
    };
    let suffixes: &[(&str, f64)] = &[
        ("Ki", 1024.0),
        ("Mi", 1024.0 * 1024.0),
        ("Gi", 1024.0 * 1024.0 * 1024.0),
        ("Ti", 1024.0_f64.powi(4)),
        ("m", 0.001),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
    ];
    for (suffix, factor) in suffixes {
        if let Some(n) = s.strip_suffix(suffix) {
            return n.parse::<f64>().unwrap_or_else(|_| panic!("{s}")) * factor;
        }
    }
    s.parse().unwrap_or_else(|_| panic!("not a quantity: {s}"))
}

//! Every custom resource in the manifests (KEDA, Google Managed Prometheus,
//! Config Connector, Prometheus Operator) validates strictly against the
//! `OpenAPI` schema of its CRD from a pinned upstream release (tests/crds,
//! sources in its README), and a misspelt field in any of them fails.
//! The validator: scripts/validate-crs (Python, jsonschema).

mod kustomize;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use kustomize::*;
use serde_json::Value;

/// Where, in each kind we use, a misspelt field must be refused: objects
/// whose fields the CRD lists (not free-form maps such as labels or a KEDA
/// trigger's metadata). A kind missing here fails the test.
const TYPO_SITES: &[(&str, &[&str])] = &[
    (
        "ScaledObject",
        &[
            "/spec",
            "/spec/triggers/0/authenticationRef",
            "/spec/advanced/horizontalPodAutoscalerConfig/behavior/scaleDown",
        ],
    ),
    (
        "ScaledJob",
        &[
            "/spec",
            "/spec/jobTargetRef",
            "/spec/jobTargetRef/template/spec/containers/0",
            "/spec/jobTargetRef/template/spec/containers/0/resources",
            "/spec/triggers/0/authenticationRef",
        ],
    ),
    ("TriggerAuthentication", &["/spec", "/spec/podIdentity"]),
    ("PodMonitoring", &["/spec", "/spec/endpoints/0"]),
    ("ServiceMonitor", &["/spec", "/spec/endpoints/0"]),
    (
        "Rules",
        &["/spec", "/spec/groups/0", "/spec/groups/0/rules/0"],
    ),
    (
        "GlobalRules",
        &["/spec", "/spec/groups/0", "/spec/groups/0/rules/0"],
    ),
    (
        "PrometheusRule",
        &["/spec", "/spec/groups/0", "/spec/groups/0/rules/0"],
    ),
    ("PubSubTopic", &["/spec"]),
    ("PubSubSubscription", &["/spec", "/spec/expirationPolicy"]),
    ("IAMPolicyMember", &["/spec", "/spec/resourceRef"]),
];

/// Every custom resource of every applied kustomization, by where it came from.
fn custom_resources() -> Vec<(String, Value)> {
    APPLIED
        .iter()
        .flat_map(|dir| {
            render(dir)
                .into_iter()
                .filter(|d| !is_builtin(d))
                .map(|d| (dir.to_string(), d))
        })
        .collect()
}

/// Runs scripts/validate-crs on documents: (success, one line per verdict).
fn validate(docs: &[&Value]) -> (bool, Vec<String>) {
    need_python("jsonschema, yaml");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("resources.yaml");
    write_yaml(&file, docs);
    let out = Command::new("python3")
        .arg(root().join("scripts/validate-crs"))
        .arg(root().join("tests/crds"))
        .arg(&file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.trim().is_empty(), "validate-crs: {stderr}");
    let lines = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    (out.status.success(), lines)
}

#[test]
fn every_custom_resource_passes_its_pinned_crd_schema() {
    let resources = custom_resources();
    let kinds: BTreeSet<&str> = resources
        .iter()
        .map(|(_, d)| d["kind"].as_str().unwrap())
        .collect();
    // Every kind the README of tests/crds promises is really used, and the
    // other way round (a kind without a CRD is refused by the validator).
    assert_eq!(
        kinds,
        TYPO_SITES.iter().map(|(k, _)| *k).collect(),
        "the kinds in manifests/ and the kinds this test covers"
    );
    let readme = std::fs::read_to_string(root().join("tests/crds/README.md")).unwrap();
    for k in &kinds {
        assert!(
            readme.contains(&format!("| {k} |")),
            "tests/crds/README.md has no row for {k}"
        );
    }
    let docs: Vec<&Value> = resources.iter().map(|(_, d)| d).collect();
    let (ok, lines) = validate(&docs);
    assert!(ok, "{lines:#?}");
    for (dir, d) in &resources {
        let line = format!("ok {}/{}", d["kind"].as_str().unwrap(), name(d));
        assert!(lines.contains(&line), "{dir}: {line} missing in {lines:#?}");
    }
    assert_eq!(lines.len(), resources.len(), "{lines:#?}");
}

/// `field` less its last letter: "name" → "nam"; an empty object gets a
/// plausible stranger.
fn misspelt(object: &serde_json::Map<String, Value>) -> String {
    match object.keys().next() {
        Some(k) => k[..k.len() - 1].to_string(),
        None => "messageRetentionDuraton".to_string(),
    }
}

#[test]
fn a_misspelt_field_in_any_custom_resource_fails() {
    let sites: BTreeMap<&str, &[&str]> = TYPO_SITES.iter().copied().collect();
    let mut broken = Vec::new();
    let mut expected = Vec::new();
    let mut seen_kinds = BTreeSet::new();
    for (dir, doc) in custom_resources() {
        let k = doc["kind"].as_str().unwrap().to_string();
        // One of each kind is enough per source kustomization.
        if !seen_kinds.insert((dir.clone(), k.clone())) {
            continue;
        }
        let paths = sites
            .get(k.as_str())
            .unwrap_or_else(|| panic!("{dir}: no typo sites for {k}"));
        for path in *paths {
            let mut copy = doc.clone();
            let label = format!("{}-typo-{}", name(&doc), broken.len());
            copy["metadata"]["name"] = Value::String(label.clone());
            let target = copy
                .pointer_mut(path)
                .and_then(Value::as_object_mut)
                .unwrap_or_else(|| panic!("{dir}: {k} has no object at {path}"));
            let field = misspelt(target);
            target.insert(field.clone(), Value::String("x".into()));
            let shown = path.trim_start_matches('/').replace('/', ".");
            expected.push(format!(
                "invalid {k}/{label}: {shown}: Additional properties are not allowed ('{field}' was unexpected)"
            ));
            broken.push(copy);
        }
    }
    assert!(broken.len() >= 30, "{}", broken.len());
    let docs: Vec<&Value> = broken.iter().collect();
    let (ok, lines) = validate(&docs);
    assert!(!ok, "misspelt fields must fail: {lines:#?}");
    for line in &expected {
        assert!(lines.contains(line), "{line} missing in {lines:#?}");
    }
    assert!(
        !lines.iter().any(|l| l.starts_with("ok ")),
        "a misspelling passed: {lines:#?}"
    );
}

#[test]
fn a_custom_resource_of_a_kind_without_a_crd_fails() {
    let stranger: Value = serde_json::json!({
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ClusterTriggerAuthentication",
        "metadata": {"name": "nobody"},
        "spec": {"podIdentity": {"provider": "gcp"}},
    });
    let (ok, lines) = validate(&[&stranger]);
    assert!(!ok);
    assert_eq!(
        lines,
        [
            "invalid ClusterTriggerAuthentication/nobody: no CRD here defines keda.sh/v1alpha1 ClusterTriggerAuthentication"
        ]
    );
}

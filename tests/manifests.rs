//! The GKE manifests: every overlay renders with `kubectl kustomize`, the
//! built-in kinds pass strict schema validation (`kubernetes-validate`),
//! custom resources carry the fields we rely on, and the pieces agree with
//! each other (ports, probes, config, grace periods, subscriptions).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use leasehold::config::{Config, Devices, Environment};
use serde::Deserialize;
use serde_json::Value;

const OVERLAYS: &[&str] = &[
    "cpu",
    "gpu",
    "cpu-keda",
    "gpu-keda",
    "cpu-prometheus-operator",
];
const BUILTIN: &[&str] = &["v1", "apps/v1", "policy/v1", "autoscaling/v2"];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn need(tool: &str, install: &str) {
    let ok = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(ok, "{tool} is not installed: {install} (.ci/run does this)");
}

/// `kubectl kustomize DIR` as parsed documents.
fn render(dir: &str) -> Vec<Value> {
    need("kubectl", "install kubectl");
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(root().join("manifests").join(dir))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kubectl kustomize {dir}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

fn kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn one<'a>(docs: &'a [Value], k: &str) -> &'a Value {
    let found = kind(docs, k);
    assert_eq!(found.len(), 1, "exactly one {k}");
    found[0]
}

/// Runs kubernetes-validate --strict on documents; returns its output.
fn validate(docs: &[&Value], dir: &Path, name: &str) -> (bool, String) {
    need("kubernetes-validate", "pip install kubernetes-validate");
    let path = dir.join(format!("{name}.yaml"));
    let text: Vec<String> = docs
        .iter()
        .map(|d| serde_yaml_ng::to_string(d).unwrap())
        .collect();
    std::fs::write(&path, text.join("---\n")).unwrap();
    let out = Command::new("kubernetes-validate")
        .args(["--strict", "-k", "1.30.0"])
        .arg(&path)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn every_overlay_renders_and_built_in_kinds_pass_strict_validation() {
    let dir = tempfile::tempdir().unwrap();
    for overlay in OVERLAYS {
        let docs = render(&format!("overlays/{overlay}"));
        let builtin: Vec<&Value> = docs
            .iter()
            .filter(|d| BUILTIN.contains(&d["apiVersion"].as_str().unwrap()))
            .collect();
        assert!(builtin.len() >= 5, "{overlay}: {builtin:?}");
        let (ok, text) = validate(&builtin, dir.path(), overlay);
        assert!(ok, "{overlay}:\n{text}");
        for d in &builtin {
            let line = format!(
                "passed for resource {}/{}",
                d["kind"].as_str().unwrap().to_lowercase(),
                d["metadata"]["name"].as_str().unwrap()
            );
            assert!(text.contains(&line), "{overlay}: {line} missing in\n{text}");
        }
        // Everything else is a custom resource we know.
        for d in docs
            .iter()
            .filter(|d| !BUILTIN.contains(&d["apiVersion"].as_str().unwrap()))
        {
            let api = d["apiVersion"].as_str().unwrap();
            assert!(
                [
                    "monitoring.googleapis.com/v1",
                    "monitoring.coreos.com/v1",
                    "keda.sh/v1alpha1"
                ]
                .contains(&api),
                "{overlay}: unexpected {api} {}",
                d["kind"]
            );
        }
    }
}

#[test]
fn the_validator_rejects_what_it_should() {
    let dir = tempfile::tempdir().unwrap();
    let mut docs = render("overlays/cpu");
    let deployment = docs.iter_mut().find(|d| d["kind"] == "Deployment").unwrap();
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] =
        Value::String("Always".into());
    let (ok, text) = validate(&[&*deployment], dir.path(), "broken");
    assert!(!ok, "a misspelt field must fail strict validation:\n{text}");
}

/// The worker configuration the pods of an overlay load: base then pool file.
fn pod_config(docs: &[Value]) -> (Config, Vec<PathBuf>, tempfile::TempDir) {
    let deployment = one(docs, "Deployment");
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let volumes = deployment["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap();
    let mounts = container["volumeMounts"].as_array().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    for arg in container["args"].as_array().unwrap() {
        let Some(path) = arg.as_str().unwrap().strip_prefix("--config=") else {
            continue;
        };
        let mount = mounts
            .iter()
            .find(|m| path.starts_with(m["mountPath"].as_str().unwrap()))
            .unwrap_or_else(|| panic!("{path} is not mounted"));
        let volume = volumes.iter().find(|v| v["name"] == mount["name"]).unwrap();
        let cm_name = volume["configMap"]["name"].as_str().unwrap();
        let cm = kind(docs, "ConfigMap")
            .into_iter()
            .find(|c| c["metadata"]["name"] == cm_name)
            .unwrap_or_else(|| panic!("ConfigMap {cm_name} is not rendered"));
        let file = Path::new(path).file_name().unwrap().to_str().unwrap();
        let text = cm["data"][file]
            .as_str()
            .unwrap_or_else(|| panic!("{file} in {cm_name}"));
        let local = dir.path().join(format!("{}-{file}", files.len()));
        std::fs::write(&local, text).unwrap();
        files.push(local);
    }
    assert_eq!(files.len(), 2, "base and pool config");
    let config = Config::load(&files, &Environment::default()).unwrap();
    (config, files, dir)
}

fn secs(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

#[test]
fn overlays_agree_with_their_config() {
    for overlay in OVERLAYS {
        let docs = render(&format!("overlays/{overlay}"));
        let (config, files, _dir) = pod_config(&docs);

        // The ConfigMap's config passes `leasehold check-config` (with the
        // GPU the device plugin would give the pod).
        let out = Command::new(env!("CARGO_BIN_EXE_leasehold"))
            .arg("check-config")
            .args(
                files
                    .iter()
                    .flat_map(|f| ["--config".into(), f.display().to_string()]),
            )
            .env("NVIDIA_VISIBLE_DEVICES", "0")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{overlay}: check-config: {}",
            String::from_utf8_lossy(&out.stderr)
        );

        let deployment = one(&docs, "Deployment");
        let pod = &deployment["spec"]["template"]["spec"];
        let container = &pod["containers"][0];
        // Port and probes.
        let port = &container["ports"][0];
        assert_eq!(
            secs(&port["containerPort"]),
            config.http.listen.port() as u64,
            "{overlay}"
        );
        let port_name = port["name"].as_str().unwrap();
        assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
        assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
        assert_eq!(container["livenessProbe"]["httpGet"]["port"], port_name);
        assert_eq!(container["readinessProbe"]["httpGet"]["port"], port_name);
        // The grace period covers the whole shutdown sequence with margin:
        // grace + kill_grace + the last Pull (5 s) + 5 s to flush.
        let needed = config.shutdown.grace + config.shutdown.kill_grace + Duration::from_secs(10);
        assert!(
            secs(&pod["terminationGracePeriodSeconds"]) >= needed.as_secs(),
            "{overlay}: terminationGracePeriodSeconds below {needed:?}"
        );
        // Non-root, read-only root filesystem, no added capabilities, scratch space.
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
        let sc = &container["securityContext"];
        assert_eq!(sc["readOnlyRootFilesystem"], true);
        assert_eq!(sc["allowPrivilegeEscalation"], false);
        assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
        assert!(sc["capabilities"]["add"].is_null());
        assert!(
            pod["volumes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|v| !v["emptyDir"].is_null())
        );
        assert!(!container["resources"]["requests"]["cpu"].is_null());
        assert_eq!(
            pod["serviceAccountName"],
            one(&docs, "ServiceAccount")["metadata"]["name"]
        );

        // The autoscaler watches this pool's subscription, and one pod's worth is its slots.
        let enabled: Vec<_> = config.enabled_classes().collect();
        assert_eq!(enabled.len(), 1, "{overlay}: one executor class per pool");
        let class = enabled[0];
        let subscription = config.topic_and_subscription(class).1;
        let per_pod = match class {
            leasehold::config::ExecutorClass::Cpu => config.executors.cpu.slots as u64,
            leasehold::config::ExecutorClass::Gpu => {
                let gpus = container["resources"]["limits"]["nvidia.com/gpu"]
                    .as_u64()
                    .unwrap();
                if let Devices::List(list) = &config.executors.gpu.devices {
                    assert_eq!(list.len() as u64, gpus, "{overlay}: devices vs GPU limit");
                }
                assert_eq!(
                    config.executors.gpu.devices,
                    Devices::Auto,
                    "{overlay}: GKE uses auto"
                );
                let tol = pod["tolerations"].as_array().unwrap();
                assert!(
                    tol.iter()
                        .any(|t| t["key"] == "nvidia.com/gpu" && t["effect"] == "NoSchedule")
                );
                assert!(!pod["nodeSelector"]["cloud.google.com/gke-accelerator"].is_null());
                gpus
            }
        };
        let hpas = kind(&docs, "HorizontalPodAutoscaler");
        let scaled = kind(&docs, "ScaledObject");
        assert_eq!(
            hpas.len() + scaled.len(),
            1,
            "{overlay}: exactly one autoscaler"
        );
        if let Some(hpa) = hpas.first() {
            let ext = &hpa["spec"]["metrics"][0]["external"];
            assert_eq!(
                ext["metric"]["name"],
                "pubsub.googleapis.com|subscription|num_undelivered_messages"
            );
            assert_eq!(
                ext["metric"]["selector"]["matchLabels"]["resource.labels.subscription_id"],
                subscription,
                "{overlay}"
            );
            assert_eq!(
                ext["target"]["averageValue"],
                per_pod.to_string(),
                "{overlay}"
            );
            assert_eq!(
                hpa["spec"]["scaleTargetRef"]["name"],
                deployment["metadata"]["name"]
            );
            assert!(
                secs(&hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"]) >= 300
            );
        }
        if let Some(so) = scaled.first() {
            let trigger = &so["spec"]["triggers"][0];
            assert_eq!(trigger["type"], "gcp-pubsub");
            assert_eq!(
                trigger["metadata"]["subscriptionName"], subscription,
                "{overlay}"
            );
            assert_eq!(trigger["metadata"]["value"], per_pod.to_string());
            assert_eq!(
                so["spec"]["scaleTargetRef"]["name"],
                deployment["metadata"]["name"]
            );
            let auth = trigger["authenticationRef"]["name"].as_str().unwrap();
            assert!(
                kind(&docs, "TriggerAuthentication")
                    .iter()
                    .any(|t| t["metadata"]["name"] == auth)
            );
        }
        // Monitoring scrapes the metrics port of exactly these pods.
        let labels = &pod_labels(deployment);
        if let Some(pm) = kind(&docs, "PodMonitoring").first() {
            assert_eq!(pm["spec"]["endpoints"][0]["port"], port_name);
            assert_eq!(pm["spec"]["endpoints"][0]["path"], "/metrics");
            assert_selects(&pm["spec"]["selector"]["matchLabels"], labels, overlay);
        }
        if let Some(svc) = kind(&docs, "Service").first() {
            assert_selects(&svc["spec"]["selector"], labels, overlay);
            let sm = one(&docs, "ServiceMonitor");
            assert_eq!(
                sm["spec"]["endpoints"][0]["port"],
                svc["spec"]["ports"][0]["name"]
            );
            assert_selects(
                &sm["spec"]["selector"]["matchLabels"],
                &svc["metadata"]["labels"].as_object().unwrap().clone(),
                overlay,
            );
        }
        assert_selects(
            &one(&docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
            labels,
            overlay,
        );
    }
}

fn pod_labels(deployment: &Value) -> serde_json::Map<String, Value> {
    deployment["spec"]["template"]["metadata"]["labels"]
        .as_object()
        .unwrap()
        .clone()
}

fn assert_selects(selector: &Value, labels: &serde_json::Map<String, Value>, overlay: &str) {
    let selector = selector.as_object().unwrap();
    assert!(!selector.is_empty());
    for (k, v) in selector {
        assert_eq!(
            labels.get(k),
            Some(v),
            "{overlay}: selector {k}={v} does not match {labels:?}"
        );
    }
    assert!(
        selector.contains_key("app.kubernetes.io/instance"),
        "{overlay}: selector is per pool"
    );
}

#[test]
fn the_rules_in_the_cluster_are_the_tested_rules() {
    #[derive(Deserialize)]
    struct File {
        groups: Value,
    }
    let tested: File = serde_yaml_ng::from_str(
        &std::fs::read_to_string(root().join("manifests/monitoring/rules.yml")).unwrap(),
    )
    .unwrap();
    for overlay in ["cpu", "cpu-prometheus-operator"] {
        let docs = render(&format!("overlays/{overlay}"));
        let rules = docs
            .iter()
            .find(|d| d["kind"] == "Rules" || d["kind"] == "PrometheusRule")
            .unwrap();
        assert_eq!(rules["spec"]["groups"], tested.groups, "{overlay}");
    }
}

/// Config Connector's Pub/Sub resources match what `leasehold setup` makes
/// for the overlays' configuration.
#[test]
fn config_connector_resources_match_setup() {
    let docs = render("pubsub");
    let mut configs = Vec::new();
    for overlay in ["cpu", "gpu"] {
        configs.push(pod_config(&render(&format!("overlays/{overlay}"))));
    }
    let topics: Vec<&str> = kind(&docs, "PubSubTopic")
        .iter()
        .map(|t| t["metadata"]["name"].as_str().unwrap())
        .collect();
    let subs: BTreeMap<&str, &Value> = kind(&docs, "PubSubSubscription")
        .into_iter()
        .map(|s| (s["metadata"]["name"].as_str().unwrap(), s))
        .collect();
    let members = kind(&docs, "IAMPolicyMember");
    let sa_annotation = one(&render("overlays/cpu"), "ServiceAccount")["metadata"]["annotations"]
        ["iam.gke.io/gcp-service-account"]
        .as_str()
        .unwrap()
        .to_string();
    let worker = format!("serviceAccount:{sa_annotation}");
    let granted = |role: &str, kind: &str, name: &str| {
        members.iter().any(|m| {
            m["spec"]["member"] == worker.as_str()
                && m["spec"]["role"] == role
                && m["spec"]["resourceRef"]["kind"] == kind
                && m["spec"]["resourceRef"]["name"] == name
        })
    };
    for (config, _, _) in &configs {
        let p = &config.pubsub;
        for t in [&p.dead_letter_topic, &p.results_topic] {
            assert!(topics.contains(&t.as_str()), "topic {t}");
            assert!(subs.contains_key(t.as_str()), "kept in subscription {t}");
            assert!(
                granted("roles/pubsub.publisher", "PubSubTopic", t),
                "publisher on {t}"
            );
        }
        for class in config.enabled_classes() {
            let (topic, sub) = config.topic_and_subscription(class);
            assert!(topics.contains(&topic), "topic {topic}");
            let s = subs[sub];
            assert_eq!(s["spec"]["topicRef"]["name"], topic);
            assert_eq!(
                secs(&s["spec"]["ackDeadlineSeconds"]),
                p.ack_deadline.as_secs()
            );
            let dl = &s["spec"]["deadLetterPolicy"];
            assert_eq!(
                dl["deadLetterTopicRef"]["name"],
                p.dead_letter_topic.as_str()
            );
            assert_eq!(
                secs(&dl["maxDeliveryAttempts"]) as i32,
                config.max_delivery_attempts()
            );
            assert!(
                s["spec"]["retryPolicy"].is_null(),
                "the worker's backoff is the only delay"
            );
            assert!(
                granted("roles/pubsub.subscriber", "PubSubSubscription", sub),
                "subscriber on {sub}"
            );
            // The check at start reads the subscription; a hand-back
            // publishes a copy of the task to its own topic.
            assert!(
                granted("roles/pubsub.viewer", "PubSubSubscription", sub),
                "viewer on {sub}"
            );
            assert!(
                granted("roles/pubsub.publisher", "PubSubTopic", topic),
                "publisher on {topic}"
            );
        }
    }
    // Workload Identity for both pools' Kubernetes service accounts.
    for pool in ["cpu", "gpu"] {
        let ksa = one(&render(&format!("overlays/{pool}")), "ServiceAccount")["metadata"]["name"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(
            members
                .iter()
                .any(|m| m["spec"]["role"] == "roles/iam.workloadIdentityUser"
                    && m["spec"]["member"]
                        .as_str()
                        .unwrap()
                        .ends_with(&format!("[leasehold/{ksa}]"))),
            "Workload Identity for {ksa}"
        );
    }
}

//! The GKE manifests: every kustomization a user applies renders with
//! `kubectl kustomize`, the built-in kinds pass strict schema validation
//! (`kubernetes-validate`), and the pieces agree with each other and with the
//! worker's configuration (ports, probes, config, grace periods,
//! subscriptions, autoscalers, Config Connector's Pub/Sub resources).
//! Custom resources: `tests/manifest_crds.rs`; cross-cutting facts:
//! `tests/manifest_facts.rs` and `tests/manifest_sizing.rs`.

mod kustomize;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use kustomize::*;
use leasehold::config::{Config, Devices, Environment};
use serde::Deserialize;
use serde_json::{Value, json};

/// Runs kubernetes-validate --strict on documents; returns its output.
fn validate(docs: &[&Value], dir: &Path, file: &str) -> (bool, String) {
    need(
        "kubernetes-validate",
        "pip install -r scripts/test-requirements.txt",
    );
    let path = dir.join(format!("{file}.yaml"));
    write_yaml(&path, docs);
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

/// A `ScaledJob`'s Job, as KEDA will create it: validated as a batch/v1 Job.
fn job_of(scaled_job: &Value) -> Value {
    json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name(scaled_job), "namespace": scaled_job["metadata"]["namespace"]},
        "spec": scaled_job["spec"]["jobTargetRef"],
    })
}

#[test]
fn every_kustomization_renders_and_built_in_kinds_pass_strict_validation() {
    let dir = tempfile::tempdir().unwrap();
    for applied in APPLIED {
        let docs = render(applied);
        assert!(!docs.is_empty(), "{applied} renders nothing");
        let jobs: Vec<Value> = kind(&docs, "ScaledJob").into_iter().map(job_of).collect();
        let builtin: Vec<&Value> = docs.iter().filter(|d| is_builtin(d)).chain(&jobs).collect();
        if builtin.is_empty() {
            continue;
        }
        let (ok, text) = validate(&builtin, dir.path(), &applied.replace('/', "-"));
        assert!(ok, "{applied}:\n{text}");
        for d in &builtin {
            let line = format!(
                "passed for resource {}/{}",
                d["kind"].as_str().unwrap().to_lowercase(),
                name(d)
            );
            assert!(text.contains(&line), "{applied}: {line} missing in\n{text}");
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
    // And in the Job a ScaledJob makes.
    let mut job = job_of(one(&render("overlays/gpu-job"), "ScaledJob"));
    job["spec"]["template"]["spec"]["restartPolicyy"] = Value::String("Never".into());
    let (ok, text) = validate(&[&job], dir.path(), "broken-job");
    assert!(!ok, "a misspelt field must fail strict validation:\n{text}");
}

/// The worker configuration a pool's pods load: base then pool file, with
/// the pod's `GOOGLE_CLOUD_PROJECT`.
fn pod_config(docs: &[Value]) -> (Config, Vec<PathBuf>, tempfile::TempDir) {
    let template = pod_template(docs);
    let container = worker(template);
    let volumes = template["spec"]["volumes"].as_array().unwrap();
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
            .find(|c| name(c) == cm_name)
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
    let project = env_value(container, "GOOGLE_CLOUD_PROJECT");
    let env = Environment::from_pairs([("GOOGLE_CLOUD_PROJECT", project)]);
    let config = Config::load(&files, &env).unwrap();
    (config, files, dir)
}

/// A plain `value` of the container's environment.
fn env_value(container: &Value, key: &str) -> String {
    container["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == key)
        .and_then(|e| e["value"].as_str())
        .unwrap_or_else(|| panic!("{key} is not set"))
        .to_string()
}

fn secs(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

#[test]
fn overlays_agree_with_their_config() {
    let settings = shipped_settings();
    for overlay in OVERLAYS {
        let docs = render(overlay);
        let (config, files, _dir) = pod_config(&docs);
        assert_eq!(config.pubsub.project, settings["PROJECT_ID"], "{overlay}");

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
            .env("GOOGLE_CLOUD_PROJECT", &config.pubsub.project)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{overlay}: check-config: {}",
            String::from_utf8_lossy(&out.stderr)
        );

        let template = pod_template(&docs);
        let pod = &template["spec"];
        let container = worker(template);
        // Port and probes.
        let port = &container["ports"][0];
        assert_eq!(
            secs(&port["containerPort"]),
            u64::from(config.http.listen.port()),
            "{overlay}"
        );
        let port_name = port["name"].as_str().unwrap();
        assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
        assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
        assert_eq!(container["livenessProbe"]["httpGet"]["port"], port_name);
        assert_eq!(container["readinessProbe"]["httpGet"]["port"], port_name);
        // The grace period covers the whole shutdown sequence with margin:
        // grace + kill_grace + the last Pull (5 s) + 5 s to flush, and stays
        // within the 10 minutes GKE's cluster autoscaler waits.
        let needed = config.shutdown.grace + config.shutdown.kill_grace + Duration::from_secs(10);
        let grace = secs(&pod["terminationGracePeriodSeconds"]);
        assert!(
            grace >= needed.as_secs() && grace <= 600,
            "{overlay}: terminationGracePeriodSeconds {grace} not in {needed:?}..600 s"
        );
        // Non-root, read-only root filesystem, no added capabilities.
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
        let sc = &container["securityContext"];
        assert_eq!(sc["readOnlyRootFilesystem"], true);
        assert_eq!(sc["allowPrivilegeEscalation"], false);
        assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
        assert!(sc["capabilities"]["add"].is_null());
        assert_eq!(
            pod["serviceAccountName"].as_str().unwrap(),
            name(one(&docs, "ServiceAccount"))
        );

        // The autoscaler watches this pool's subscription, and one pod's worth is its slots.
        let enabled: Vec<_> = config.enabled_executors().collect();
        assert_eq!(enabled.len(), 1, "{overlay}: one executor class per pool");
        let (_, executor) = enabled[0];
        let subscription = executor.subscription.as_str();
        let per_pod = match &executor.devices {
            None => executor.slots as u64,
            Some(devices) => {
                let gpus = container["resources"]["limits"]["nvidia.com/gpu"]
                    .as_u64()
                    .unwrap();
                assert_eq!(devices, &Devices::Auto, "{overlay}: GKE uses auto");
                let tol = pod["tolerations"].as_array().unwrap();
                assert!(
                    tol.iter()
                        .any(|t| t["key"] == "nvidia.com/gpu" && t["effect"] == "NoSchedule")
                );
                assert!(!pod["nodeSelector"]["cloud.google.com/gke-accelerator"].is_null());
                gpus
            }
        };
        assert!(per_pod > 0, "{overlay}: slots must be explicit");
        check_autoscaler(overlay, &docs, subscription, per_pod, &settings);

        // Monitoring scrapes the metrics port of exactly these pods.
        let labels = template["metadata"]["labels"].as_object().unwrap();
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
                svc["metadata"]["labels"].as_object().unwrap(),
                overlay,
            );
        }
        if let Some(pdb) = kind(&docs, "PodDisruptionBudget").first() {
            assert_selects(&pdb["spec"]["selector"]["matchLabels"], labels, overlay);
        }
    }
}

/// Exactly one autoscaler, on this pool's subscription, `per_pod` messages a pod.
fn check_autoscaler(
    overlay: &str,
    docs: &[Value],
    subscription: &str,
    per_pod: u64,
    settings: &BTreeMap<String, String>,
) {
    let hpas = kind(docs, "HorizontalPodAutoscaler");
    let keda: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == "ScaledObject" || d["kind"] == "ScaledJob")
        .collect();
    assert_eq!(
        hpas.len() + keda.len(),
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
        assert_eq!(ext["target"]["averageValue"], per_pod.to_string());
        assert_eq!(
            hpa["spec"]["scaleTargetRef"]["name"],
            name(one(docs, "Deployment"))
        );
        assert!(secs(&hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"]) >= 300);
    }
    if let Some(scaler) = keda.first() {
        if scaler["kind"] == "ScaledObject" {
            assert_eq!(
                scaler["spec"]["scaleTargetRef"]["name"],
                name(one(docs, "Deployment"))
            );
        }
        let triggers = scaler["spec"]["triggers"].as_array().unwrap();
        assert_eq!(triggers.len(), 1, "{overlay}");
        let trigger = &triggers[0];
        // KEDA's gcp-pubsub scaler is deprecated: the prometheus scaler on
        // Cloud Monitoring's PromQL endpoint replaces it.
        assert_eq!(trigger["type"], "prometheus", "{overlay}");
        let meta = &trigger["metadata"];
        assert_eq!(
            meta["serverAddress"],
            format!(
                "https://monitoring.googleapis.com/v1/projects/{}/location/global/prometheus",
                settings["PROJECT_ID"]
            )
        );
        let query = meta["query"].as_str().unwrap();
        for part in [
            "pubsub_googleapis_com:subscription_num_undelivered_messages{",
            &format!("subscription_id=\"{subscription}\""),
        ] {
            assert!(query.contains(part), "{overlay}: {query} lacks {part}");
        }
        assert_eq!(meta["threshold"], per_pod.to_string(), "{overlay}");
        let auth = trigger["authenticationRef"]["name"].as_str().unwrap();
        let ta = kind(docs, "TriggerAuthentication")
            .into_iter()
            .find(|t| name(t) == auth)
            .unwrap_or_else(|| panic!("{overlay}: TriggerAuthentication {auth}"));
        assert_eq!(ta["spec"]["podIdentity"]["provider"], "gcp");
    }
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
        groups: Vec<Value>,
    }
    let tested: File = serde_yaml_ng::from_str(
        &std::fs::read_to_string(root().join("manifests/monitoring/rules.yml")).unwrap(),
    )
    .unwrap();
    let group = |n: &str| {
        tested
            .groups
            .iter()
            .find(|g| g["name"] == n)
            .unwrap_or_else(|| panic!("group {n} in rules.yml"))
            .clone()
    };
    let gmp = render("monitoring/gmp");
    assert_eq!(
        one(&gmp, "Rules")["spec"]["groups"],
        json!([group("leasehold")])
    );
    assert_eq!(
        one(&gmp, "GlobalRules")["spec"]["groups"],
        json!([group("leasehold-cloud")])
    );
    assert_eq!(gmp.len(), 2, "monitoring/gmp: {gmp:#?}");
    let operator = render("monitoring/prometheus-operator");
    assert_eq!(
        one(&operator, "PrometheusRule")["spec"]["groups"],
        json!([group("leasehold")])
    );
    assert_eq!(
        tested.groups.len(),
        2,
        "every group of rules.yml ships somewhere"
    );
}

/// Config Connector's Pub/Sub resources match what `leasehold setup` makes
/// for the overlays' configuration, and the workers may use them.
#[test]
fn config_connector_resources_match_setup() {
    let docs = render("gcp");
    let topics: Vec<&str> = kind(&docs, "PubSubTopic").into_iter().map(name).collect();
    let subs: BTreeMap<&str, &Value> = kind(&docs, "PubSubSubscription")
        .into_iter()
        .map(|s| (name(s), s))
        .collect();
    let members = kind(&docs, "IAMPolicyMember");
    for pool in ["overlays/cpu", "overlays/gpu"] {
        let pool_docs = render(pool);
        let (config, _, _dir) = pod_config(&pool_docs);
        let sa = one(&pool_docs, "ServiceAccount");
        let principal = format!(
            "principal://iam.googleapis.com/projects/{}/locations/global/workloadIdentityPools/{}.svc.id.goog/subject/ns/{}/sa/{}",
            shipped_settings()["PROJECT_NUMBER"],
            config.pubsub.project,
            sa["metadata"]["namespace"].as_str().unwrap(),
            name(sa)
        );
        let granted = |role: &str, kind: &str, target: &str| {
            members.iter().any(|m| {
                m["spec"]["member"] == principal.as_str()
                    && m["spec"]["role"] == role
                    && m["spec"]["resourceRef"]["kind"] == kind
                    && m["spec"]["resourceRef"]["name"] == target
            })
        };
        let p = &config.pubsub;
        for t in [&p.dead_letter_topic, &p.results_topic] {
            assert!(topics.contains(&t.as_str()), "topic {t}");
            assert!(subs.contains_key(t.as_str()), "kept in subscription {t}");
            assert!(
                granted("roles/pubsub.publisher", "PubSubTopic", t),
                "{principal}: publisher on {t}"
            );
        }
        for (_, executor) in config.enabled_executors() {
            let (topic, sub) = (executor.topic.as_str(), executor.subscription.as_str());
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
                i32::try_from(secs(&dl["maxDeliveryAttempts"])).unwrap(),
                config.max_delivery_attempts()
            );
            assert!(
                s["spec"]["retryPolicy"].is_null(),
                "the worker's backoff is the only delay"
            );
            for role in ["roles/pubsub.subscriber", "roles/pubsub.viewer"] {
                assert!(
                    granted(role, "PubSubSubscription", sub),
                    "{principal}: {role} on {sub}"
                );
            }
            // A hand-back publishes a copy of the task to its own topic.
            assert!(
                granted("roles/pubsub.publisher", "PubSubTopic", topic),
                "{principal}: publisher on {topic}"
            );
        }
    }
}

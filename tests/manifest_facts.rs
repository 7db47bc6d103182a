//! The facts the README's GKE walk-through depends on, checked on the
//! rendered manifests (and on the README itself where it is the manifest):
//! project.env is the one place for the project, its number and the
//! namespace; subscriptions never expire and dead-letter; the autoscalers'
//! and Pub/Sub's identities have their grants; the GPU path reaches zero;
//! pods have scratch, HOME
//! and the right to annotate themselves; alerts match the scrape jobs, link
//! their runbooks and go somewhere. (Requests against the README's node
//! pools: `tests/manifest_sizing.rs`.)

mod kustomize;

use std::collections::BTreeSet;

use kustomize::*;
use serde_json::Value;

/// Values unlike any shipped ones, to see where project.env's values land.
const TEST_SETTINGS: &[(&str, &str)] = &[
    ("PROJECT_ID", "acme-render-7"),
    ("PROJECT_NUMBER", "987654321098"),
    ("NAMESPACE", "batch-jobs"),
    ("RUNBOOK_URL", "https://docs.acme.test/ops/leasehold.md"),
    ("PROMETHEUS_RELEASE", "monitoring"),
];

fn setting(key: &str) -> &'static str {
    TEST_SETTINGS.iter().find(|(k, _)| *k == key).unwrap().1
}

/// The principal of a Kubernetes service account under Workload Identity.
fn principal(number: &str, project: &str, namespace: &str, sa: &str) -> String {
    format!(
        "principal://iam.googleapis.com/projects/{number}/locations/global/workloadIdentityPools/{project}.svc.id.goog/subject/ns/{namespace}/sa/{sa}"
    )
}

#[test]
fn no_placeholder_survives_once_project_env_is_set() {
    let shipped = shipped_settings();
    let rendered = Rendered::with(TEST_SETTINGS);
    let mut tokens = vec![
        "PROJECT_ID".to_string(),
        "PROJECT_NUMBER".to_string(),
        "PUBSUB_AGENT".to_string(),
        "YOUR_ORG".to_string(),
    ];
    for key in ["PROJECT_ID", "PROJECT_NUMBER", "RUNBOOK_URL"] {
        tokens.push(shipped[key].clone());
    }
    for dir in APPLIED {
        let text = rendered.text(dir);
        for token in &tokens {
            assert!(
                !text.contains(token.as_str()),
                "{dir}: {token} survives:\n{text}"
            );
        }
        // NAMESPACE, but not POD_NAMESPACE (an environment variable's name).
        for (at, _) in text.match_indices("NAMESPACE") {
            assert!(
                text[..at].ends_with("POD_"),
                "{dir}: NAMESPACE survives near {}",
                &text[at.saturating_sub(60)..at + 9]
            );
        }
        for doc in rendered.render(dir) {
            let k = doc["kind"].as_str().unwrap();
            let ns = doc["metadata"]["namespace"].as_str();
            match k {
                "GlobalRules" => assert_eq!(ns, None, "{dir}: cluster-scoped"),
                "Secret" => assert_eq!(ns, Some("gmp-public"), "{dir}: GMP reads it there"),
                _ => assert_eq!(ns, Some(setting("NAMESPACE")), "{dir}: {k} {}", name(&doc)),
            }
            check_settings_landed(dir, &doc);
        }
    }
    // As shipped, too, no template token survives.
    for dir in APPLIED {
        let text = std::process::Command::new("kubectl")
            .arg("kustomize")
            .arg(root().join("manifests").join(dir))
            .output()
            .unwrap()
            .stdout;
        let text = String::from_utf8(text).unwrap();
        for token in ["PROJECT_ID", "PROJECT_NUMBER", "PUBSUB_AGENT"] {
            assert!(!text.contains(token), "{dir} as shipped: {token} survives");
        }
    }
}

/// Where each setting must be, in one rendered object.
fn check_settings_landed(dir: &str, doc: &Value) {
    let (project, number, ns) = (
        setting("PROJECT_ID"),
        setting("PROJECT_NUMBER"),
        setting("NAMESPACE"),
    );
    match doc["kind"].as_str().unwrap() {
        "Deployment" | "ScaledJob" => {
            let docs = [doc.clone()];
            let c = worker(pod_template(&docs));
            let env = c["env"].as_array().unwrap();
            let project_env = env.iter().find(|e| e["name"] == "GOOGLE_CLOUD_PROJECT");
            assert_eq!(project_env.unwrap()["value"], project, "{dir}");
            let image = c["image"].as_str().unwrap();
            assert!(
                image.starts_with(&format!("us-docker.pkg.dev/{project}/leasehold/")),
                "{dir}: {image}"
            );
        }
        "RoleBinding" => assert_eq!(doc["subjects"][0]["namespace"], ns, "{dir}"),
        "PubSubTopic" | "PubSubSubscription" => assert_eq!(
            doc["metadata"]["annotations"]["cnrm.cloud.google.com/project-id"], project,
            "{dir}"
        ),
        "IAMPolicyMember" => {
            let member = doc["spec"]["member"].as_str().unwrap();
            let pubsub_agent =
                format!("serviceAccount:service-{number}@gcp-sa-pubsub.iam.gserviceaccount.com");
            let pool = format!("{project}.svc.id.goog");
            assert!(
                member == pubsub_agent
                    || (member.contains(&format!("/projects/{number}/"))
                        && member.contains(&format!("/workloadIdentityPools/{pool}/"))),
                "{dir}: {member}"
            );
            if name(doc).starts_with("leasehold-") {
                assert!(
                    member.contains(&format!("/subject/ns/{ns}/sa/")),
                    "{member}"
                );
            }
        }
        "ScaledObject" => assert!(
            doc["spec"]["triggers"][0]["metadata"]["serverAddress"]
                .as_str()
                .unwrap()
                .contains(&format!("/projects/{project}/")),
            "{dir}"
        ),
        "Rules" | "GlobalRules" | "PrometheusRule" => {
            for group in doc["spec"]["groups"].as_array().unwrap() {
                for rule in group["rules"].as_array().unwrap() {
                    let url = rule["annotations"]["runbook_url"].as_str().unwrap();
                    assert!(
                        url.starts_with(&format!("{}#runbook-", setting("RUNBOOK_URL"))),
                        "{dir}: {url}"
                    );
                }
            }
        }
        _ => {}
    }
    if ["ServiceMonitor", "PrometheusRule"].contains(&doc["kind"].as_str().unwrap()) {
        assert_eq!(
            doc["metadata"]["labels"]["release"],
            setting("PROMETHEUS_RELEASE")
        );
    }
}

#[test]
fn every_subscription_never_expires_and_task_subscriptions_dead_letter() {
    let docs = render("gcp");
    let subs = kind(&docs, "PubSubSubscription");
    assert!(subs.len() >= 4);
    for s in &subs {
        assert_eq!(
            s["spec"]["expirationPolicy"]["ttl"],
            "",
            "{}: never expires",
            name(s)
        );
        assert_eq!(
            s["spec"]["messageRetentionDuration"],
            "604800s",
            "{}",
            name(s)
        );
    }
    for pool in ["cpu", "gpu"] {
        let sub = subs
            .iter()
            .find(|s| name(s) == format!("leasehold-tasks-{pool}"))
            .unwrap();
        assert_eq!(
            sub["spec"]["deadLetterPolicy"]["deadLetterTopicRef"]["name"],
            "leasehold-dead-letter"
        );
    }
    let dead = subs
        .iter()
        .find(|s| name(s) == "leasehold-dead-letter")
        .unwrap();
    assert!(dead["spec"]["deadLetterPolicy"].is_null(), "no loop");
}

/// (role, member, resource kind, resource name or external) of every grant.
fn grants(docs: &[Value]) -> BTreeSet<(String, String, String, String)> {
    kind(docs, "IAMPolicyMember")
        .iter()
        .map(|m| {
            let r = &m["spec"]["resourceRef"];
            let target = r["name"].as_str().or(r["external"].as_str()).unwrap();
            (
                m["spec"]["role"].as_str().unwrap().to_string(),
                m["spec"]["member"].as_str().unwrap().to_string(),
                r["kind"].as_str().unwrap().to_string(),
                target.to_string(),
            )
        })
        .collect()
}

#[test]
fn the_adapter_keda_and_pubsub_agent_identities_have_their_grants() {
    let rendered = Rendered::with(TEST_SETTINGS);
    let (project, number) = (setting("PROJECT_ID"), setting("PROJECT_NUMBER"));
    let granted = grants(&rendered.render("gcp"));
    let has = |role: &str, member: &str, kind: &str, target: &str| {
        granted.contains(&(role.into(), member.into(), kind.into(), target.into()))
    };
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let mut needed = BTreeSet::new();
    for overlay in OVERLAYS {
        let docs = rendered.render(overlay);
        if !kind(&docs, "HorizontalPodAutoscaler").is_empty() {
            needed.insert(("custom-metrics", "custom-metrics-stackdriver-adapter"));
        }
        for ta in kind(&docs, "TriggerAuthentication") {
            assert_eq!(ta["spec"]["podIdentity"]["provider"], "gcp");
            // podIdentity gcp authenticates as the keda-operator itself.
            needed.insert(("keda", "keda-operator"));
        }
    }
    assert_eq!(needed.len(), 2, "the overlays use both autoscalers");
    for (ns, sa) in needed {
        let who = principal(number, project, ns, sa);
        assert!(
            has(
                "roles/monitoring.viewer",
                &who,
                "Project",
                &format!("projects/{project}")
            ),
            "manifests/gcp: {who} needs roles/monitoring.viewer on the project"
        );
        assert!(
            readme.contains(&format!("{ns}/sa/{sa}")),
            "README grants nothing to {ns}/{sa}"
        );
    }
    assert!(readme.contains(
        "gcloud projects add-iam-policy-binding $PROJECT_ID --role roles/monitoring.viewer --member $WI/ns/$sa"
    ));
    // Pub/Sub's service agent, for the subscriptions' dead-letter policy.
    let agent = format!("serviceAccount:service-{number}@gcp-sa-pubsub.iam.gserviceaccount.com");
    assert!(has(
        "roles/pubsub.publisher",
        &agent,
        "PubSubTopic",
        "leasehold-dead-letter"
    ));
    for pool in ["cpu", "gpu"] {
        let sub = format!("leasehold-tasks-{pool}");
        assert!(has(
            "roles/pubsub.subscriber",
            &agent,
            "PubSubSubscription",
            &sub
        ));
    }
    for line in [
        "AGENT=serviceAccount:service-$PROJECT_NUMBER@gcp-sa-pubsub.iam.gserviceaccount.com",
        "gcloud pubsub topics add-iam-policy-binding leasehold-dead-letter --member $AGENT --role roles/pubsub.publisher",
        "gcloud pubsub subscriptions add-iam-policy-binding leasehold-tasks-$pool --member $AGENT --role roles/pubsub.subscriber",
    ] {
        assert!(readme.contains(line), "README lacks: {line}");
    }
}

#[test]
fn the_gpu_path_can_reach_zero_replicas() {
    let mut gpu_overlays = 0;
    for overlay in OVERLAYS {
        let docs = render(overlay);
        let template = pod_template(&docs);
        let gpu = !worker(template)["resources"]["limits"]["nvidia.com/gpu"].is_null();
        // KEDA scales every pool it manages to zero.
        for so in kind(&docs, "ScaledObject") {
            assert_eq!(so["spec"]["minReplicaCount"], 0, "{overlay}");
        }
        for sj in kind(&docs, "ScaledJob") {
            let min = &sj["spec"]["minReplicaCount"];
            assert!(min.is_null() || *min == 0, "{overlay}");
            // Each Job's worker ends when idle, and is not restarted.
            let pod = &sj["spec"]["jobTargetRef"]["template"];
            assert_eq!(pod["spec"]["restartPolicy"], "Never");
            let args = worker(pod)["args"].as_array().unwrap();
            assert!(
                args.iter()
                    .any(|a| a.as_str().unwrap().starts_with("--exit-when-idle=")),
                "{overlay}: {args:?}"
            );
            assert!(kind(&docs, "PodDisruptionBudget").is_empty(), "{overlay}");
        }
        if gpu {
            gpu_overlays += 1;
            assert!(
                kind(&docs, "HorizontalPodAutoscaler").is_empty(),
                "{overlay}: an HPA keeps at least one GPU pod"
            );
            assert_eq!(
                kind(&docs, "ScaledObject").len() + kind(&docs, "ScaledJob").len(),
                1,
                "{overlay}"
            );
        }
    }
    assert_eq!(gpu_overlays, 2, "overlays/gpu and overlays/gpu-job");
}

#[test]
fn pods_have_scratch_home_and_may_annotate_themselves() {
    for overlay in OVERLAYS {
        let docs = render(overlay);
        let template = pod_template(&docs);
        let c = worker(template);
        let scratch_mount = c["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == "scratch")
            .unwrap()["mountPath"]
            .as_str()
            .unwrap();
        let env = c["env"].as_array().unwrap();
        let value = |k: &str| {
            env.iter()
                .find(|e| e["name"] == k)
                .map(|e| e["value"].clone())
        };
        for var in ["TMPDIR", "HOME", "XDG_CACHE_HOME", "CUDA_CACHE_PATH"] {
            let v = value(var).unwrap_or_else(|| panic!("{overlay}: {var} unset"));
            assert!(
                v.as_str().unwrap().starts_with(scratch_mount),
                "{overlay}: {var}={v} is not on scratch"
            );
        }
        for var in ["PATH", "LD_LIBRARY_PATH"] {
            assert!(
                value(var).is_none(),
                "{overlay}: {var} overrides the image's"
            );
        }
        let volume = template["spec"]["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == "scratch")
            .unwrap();
        let size = quantity(&volume["emptyDir"]["sizeLimit"]);
        let request = quantity(&c["resources"]["requests"]["ephemeral-storage"]);
        assert!(
            request >= size,
            "{overlay}: scratch {size} > request {request}"
        );
        // The downward API names the pod, and RBAC lets its service account
        // get and patch pods in its namespace, nothing more.
        for (var, field) in [
            ("POD_NAME", "metadata.name"),
            ("POD_NAMESPACE", "metadata.namespace"),
        ] {
            let e = env.iter().find(|e| e["name"] == var).unwrap();
            assert_eq!(e["valueFrom"]["fieldRef"]["fieldPath"], field, "{overlay}");
        }
        let role = one(&docs, "Role");
        assert_eq!(
            role["rules"],
            serde_json::json!([{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "patch"]}])
        );
        let binding = one(&docs, "RoleBinding");
        assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
        assert_eq!(binding["subjects"][0]["kind"], "ServiceAccount");
        assert_eq!(
            binding["subjects"][0]["name"],
            template["spec"]["serviceAccountName"]
        );
        assert_eq!(
            binding["subjects"][0]["namespace"],
            one(&docs, "ServiceAccount")["metadata"]["namespace"]
        );
    }
}

#[test]
fn alerts_match_the_scrape_jobs_link_their_runbooks_and_go_somewhere() {
    // The job label is the PodMonitoring's (or ServiceMonitor's job label's) name.
    let mut jobs = BTreeSet::new();
    for overlay in OVERLAYS {
        let docs = render(overlay);
        for pm in kind(&docs, "PodMonitoring") {
            jobs.insert(name(pm).to_string());
        }
        for sm in kind(&docs, "ServiceMonitor") {
            let label = sm["spec"]["jobLabel"].as_str().unwrap();
            let svc = one(&docs, "Service");
            jobs.insert(
                svc["metadata"]["labels"][label]
                    .as_str()
                    .unwrap()
                    .to_string(),
            );
        }
        for k in ["Rules", "GlobalRules", "PrometheusRule"] {
            assert!(
                kind(&docs, k).is_empty(),
                "{overlay}: rules ship once, not per pool"
            );
        }
    }
    assert_eq!(
        jobs,
        BTreeSet::from(["leasehold-cpu".into(), "leasehold-gpu".into()])
    );
    // promtool's tests feed the WorkerDown rule `up` series of exactly these
    // jobs (and a stranger's), so the rule's job matcher is tested on them.
    let tests =
        std::fs::read_to_string(root().join("manifests/monitoring/rules_test.yml")).unwrap();
    for job in &jobs {
        assert!(
            tests.contains(&format!("up{{job=\"{job}\"")),
            "rules_test.yml: up of {job}"
        );
    }
    let rules: Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(root().join("manifests/monitoring/rules.yml")).unwrap(),
    )
    .unwrap();
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let base = &shipped_settings()["RUNBOOK_URL"];
    let mut severities = BTreeSet::new();
    for group in rules["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            let alert = rule["alert"].as_str().unwrap();
            let url = rule["annotations"]["runbook_url"].as_str().unwrap();
            assert_eq!(url, format!("{base}#runbook-{}", alert.to_lowercase()));
            assert!(url.starts_with("https://"), "{alert}: absolute runbook_url");
            assert!(
                readme.contains(&format!("\n### Runbook: {alert}\n")),
                "README has no runbook for {alert}"
            );
            severities.insert(rule["labels"]["severity"].as_str().unwrap().to_string());
        }
    }
    assert_eq!(
        severities,
        BTreeSet::from(["critical".into(), "warning".into()])
    );
    // The managed Alertmanager routes everything to receivers it has.
    let alertmanager = render("monitoring/alertmanager");
    let am = one(&alertmanager, "Secret");
    let config: Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(
            root().join("manifests/monitoring/alertmanager/alertmanager.yaml"),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(name(am), "alertmanager");
    assert!(am["data"]["alertmanager.yaml"].is_string());
    let receivers: BTreeSet<&str> = config["receivers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    let route = &config["route"];
    assert!(receivers.contains(route["receiver"].as_str().unwrap()));
    for sub in route["routes"].as_array().unwrap() {
        assert!(receivers.contains(sub["receiver"].as_str().unwrap()));
    }
}

#[test]
fn images_are_tagged_with_the_crate_version_everywhere() {
    let version = env!("CARGO_PKG_VERSION");
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    for overlay in OVERLAYS {
        let docs = render(overlay);
        let image = worker(pod_template(&docs))["image"]
            .as_str()
            .unwrap()
            .to_string();
        let (repo, tag) = image.rsplit_once(':').unwrap();
        assert_eq!(tag, version, "{overlay}");
        let pushed = repo.replace(&shipped_settings()["PROJECT_ID"], "$PROJECT_ID");
        assert!(
            readme.contains(&format!("docker push {pushed}:{version}")),
            "README never pushes {pushed}:{version}"
        );
    }
}

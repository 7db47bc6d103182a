//! The node pools the README's walk-through creates start empty, grow to a
//! total (not per-zone) maximum, put GPUs only where the accelerator exists,
//! and the pools' pod requests fit their machine types: several CPU pods a
//! node, one GPU pod per GPU, computed with GKE's documented reservations;
//! the autoscalers' maximum fits the pools' maximum.

mod kustomize;

use kustomize::*;
use serde_json::Value;

/// A node pool as the README creates it.
#[derive(Debug)]
struct NodePool {
    name: String,
    flags: Vec<(String, String)>,
}

impl NodePool {
    fn flag(&self, f: &str) -> Option<&str> {
        self.flags
            .iter()
            .find(|(k, _)| k == f)
            .map(|(_, v)| v.as_str())
    }
}

/// Every `gcloud container node-pools create` of the README.
fn readme_node_pools() -> Vec<NodePool> {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let joined = readme.replace("\\\n", " ");
    joined
        .lines()
        .filter_map(|l| l.trim().strip_prefix("gcloud container node-pools create "))
        .map(|rest| {
            let mut words = rest.split_whitespace();
            let name = words.next().unwrap().to_string();
            let words: Vec<&str> = words.collect();
            let mut flags = Vec::new();
            let mut i = 0;
            while i < words.len() {
                let w = words[i];
                if let Some((k, v)) = w.split_once('=') {
                    flags.push((k.to_string(), v.to_string()));
                } else if words.get(i + 1).is_some_and(|n| !n.starts_with("--")) {
                    flags.push((w.to_string(), words[i + 1].to_string()));
                    i += 1;
                } else {
                    flags.push((w.to_string(), String::new()));
                }
                i += 1;
            }
            NodePool { name, flags }
        })
        .collect()
}

/// (vCPUs, GiB of memory, GPUs) of the machine types we document.
fn machine(kind: &str) -> (f64, f64, u64) {
    match kind {
        "e2-standard-4" => (4.0, 16.0, 0),
        "e2-standard-8" => (8.0, 32.0, 0),
        "e2-standard-16" => (16.0, 64.0, 0),
        "g2-standard-4" => (4.0, 16.0, 1),
        "g2-standard-8" => (8.0, 32.0, 1),
        "g2-standard-12" => (12.0, 48.0, 1),
        "g2-standard-16" => (16.0, 64.0, 1),
        _ => panic!("machine type {kind}: add its shape to tests/manifest_facts.rs"),
    }
}

/// What GKE leaves to pods of a node (its documented reservations), less a
/// margin for its own `DaemonSets` (kube-proxy, logging and metrics agents,
/// the CSI driver, GMP's collector, NVIDIA's device plugin and DCGM exporter).
fn allocatable(machine_type: &str, disk_gib: f64) -> (f64, f64, f64, u64) {
    const GIB: f64 = 1024.0 * 1024.0 * 1024.0;
    let (cores, mem, gpus) = machine(machine_type);
    let cpu_reserved = 0.06
        + 0.01 * (cores.min(2.0) - 1.0)
        + 0.005 * (cores.min(4.0) - 2.0).max(0.0)
        + 0.0025 * (cores - 4.0).max(0.0);
    let tiers = [(4.0, 0.25), (4.0, 0.20), (8.0, 0.10), (112.0, 0.06)];
    let (mut left, mut mem_reserved) = (mem, 0.0);
    for (size, share) in tiers {
        let part = left.min(size);
        mem_reserved += part * share;
        left -= part;
    }
    mem_reserved += left * 0.02 + 100.0 / 1024.0; // and the eviction threshold
    let disk_reserved = disk_gib * 0.10 + (disk_gib * 0.5).min(6.0 + disk_gib * 0.35).min(100.0);
    let (daemon_cpu, daemon_mem, daemon_disk) = (1.0, 2.0, 2.0);
    (
        cores - cpu_reserved - daemon_cpu,
        (mem - mem_reserved - daemon_mem) * GIB,
        (disk_gib - disk_reserved - daemon_disk) * GIB,
        gpus,
    )
}

// Pods per node is a small non-negative whole number of a float division.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
#[test]
fn node_pools_start_empty_and_requests_fit_their_machines() {
    let pools = readme_node_pools();
    assert_eq!(pools.len(), 2, "{pools:#?}");
    for pool in &pools {
        assert_eq!(pool.flag("--num-nodes"), Some("0"), "{}", pool.name);
        assert!(pool.flag("--total-max-nodes").is_some(), "{}", pool.name);
        for per_zone in ["--max-nodes", "--min-nodes"] {
            assert!(
                pool.flag(per_zone).is_none(),
                "{}: {per_zone} is per zone",
                pool.name
            );
        }
        if pool.flag("--accelerator").is_some() {
            assert!(
                pool.flag("--node-locations").is_some(),
                "{}: only zones that have the accelerator",
                pool.name
            );
        }
    }
    let mut checked = 0;
    for overlay in OVERLAYS {
        let docs = render(overlay);
        let template = pod_template(&docs);
        let node_pool = template["spec"]["nodeSelector"]["cloud.google.com/gke-nodepool"]
            .as_str()
            .unwrap();
        let pool = pools
            .iter()
            .find(|p| p.name == node_pool)
            .unwrap_or_else(|| panic!("{overlay}: the README creates no {node_pool}"));
        let machine_type = pool.flag("--machine-type").unwrap();
        let disk: f64 = pool.flag("--disk-size").unwrap().parse().unwrap();
        let (cpu, mem, eph, gpus) = allocatable(machine_type, disk);
        let resources = &worker(template)["resources"];
        let req = &resources["requests"];
        let pod_gpus = resources["limits"]["nvidia.com/gpu"].as_u64().unwrap_or(0);
        let mut fits = [
            cpu / quantity(&req["cpu"]),
            mem / quantity(&req["memory"]),
            eph / quantity(&req["ephemeral-storage"]),
        ]
        .into_iter()
        .fold(f64::INFINITY, f64::min)
        .floor() as u64;
        if let Some(accel) = pool.flag("--accelerator") {
            let count: u64 = accel
                .split(',')
                .find_map(|p| p.strip_prefix("count="))
                .unwrap()
                .parse()
                .unwrap();
            assert_eq!(count, gpus, "{machine_type} has {gpus} GPUs");
            let per_node = count
                .checked_div(pod_gpus)
                .unwrap_or_else(|| panic!("{overlay}: pods on {node_pool} must ask for a GPU"));
            fits = fits.min(per_node);
            assert!(
                fits >= 1,
                "{overlay}: a GPU pod does not fit {machine_type}"
            );
        } else {
            assert_eq!(pod_gpus, 0, "{overlay}: {node_pool} has no GPU");
            assert!(
                fits >= 2,
                "{overlay}: {fits} pod(s) per {machine_type}; size the requests for several"
            );
        }
        // The limit is no lower than the request.
        if let Some(limit) = resources["limits"]["memory"].as_str() {
            assert!(quantity(&Value::from(limit)) >= quantity(&req["memory"]));
        }
        // The autoscaler never asks for more pods than the pool's nodes hold.
        let max_nodes: u64 = pool.flag("--total-max-nodes").unwrap().parse().unwrap();
        let max_pods = docs
            .iter()
            .find_map(|d| match d["kind"].as_str().unwrap() {
                "HorizontalPodAutoscaler" => d["spec"]["maxReplicas"].as_u64(),
                "ScaledObject" | "ScaledJob" => d["spec"]["maxReplicaCount"].as_u64(),
                _ => None,
            })
            .unwrap_or_else(|| panic!("{overlay}: no autoscaler maximum"));
        assert!(
            max_pods <= fits * max_nodes,
            "{overlay}: up to {max_pods} pods, but {node_pool} holds {fits} x {max_nodes}"
        );
        checked += 1;
    }
    assert_eq!(checked, OVERLAYS.len());
}

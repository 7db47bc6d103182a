//! GPU discovery for `devices = "auto"`, and what a task is pinned to.
//!
//! Tasks are pinned by UUID (`GPU-…`, or `MIG-…` for a MIG instance): inside a
//! container CUDA numbers its GPUs 0..n-1 whatever the host calls them, so a
//! host index copied from `NVIDIA_VISIBLE_DEVICES` (`3,5`) would pin the wrong
//! GPU or none. A UUID means the same device everywhere.
//!
//! `NVIDIA_VISIBLE_DEVICES` (set by the NVIDIA container runtime and device
//! plugin) decides what this container has:
//! - `none` or `void`: no GPU;
//! - UUIDs: exactly those;
//! - `all`, indices, or unset: the UUIDs `nvidia-smi -L` lists (it only sees
//!   this container's GPUs); indices without a working `nvidia-smi` become the
//!   container's own numbering `0..n-1`.

use crate::config::{Devices, Environment};

/// No usable GPU for an executor that pins devices.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DiscoveryError {
    /// The container runtime says this container has no GPU.
    #[error("NVIDIA_VISIBLE_DEVICES is {0:?}: the container runtime gave this container no GPU")]
    NoneVisible(String),
    /// `nvidia-smi` could not name a device.
    #[error("no GPU was found: {0}")]
    NotFound(String),
}

/// The ids tasks are pinned to, one slot each.
pub fn resolve(devices: &Devices, env: &Environment) -> Result<Vec<String>, DiscoveryError> {
    if let Devices::List(list) = devices {
        return Ok(list.clone());
    }
    let visible = env.get("NVIDIA_VISIBLE_DEVICES").map(str::trim);
    let list = match visible {
        Some(v @ ("none" | "void")) => return Err(DiscoveryError::NoneVisible(v.to_string())),
        None | Some("all") => {
            return nvidia_smi(env).map_err(|e| match visible {
                None => e.context("NVIDIA_VISIBLE_DEVICES is unset or empty"),
                Some(_) => e.context("NVIDIA_VISIBLE_DEVICES is \"all\""),
            });
        }
        Some(v) => parse_list(v),
    };
    if list.iter().all(|d| is_uuid(d)) {
        return Ok(list);
    }
    // Indices. In a container the runtime exposes just those GPUs, which
    // CUDA numbers 0..n-1 and nvidia-smi lists; outside one they are the
    // driver's own numbering. Either way the driver's UUIDs pin them.
    let indices: Option<Vec<usize>> = list.iter().map(|d| d.parse().ok()).collect();
    match (nvidia_smi(env), indices) {
        (Ok(uuids), _) if uuids.len() == list.len() => Ok(uuids),
        (Ok(uuids), Some(indices)) if indices.iter().all(|i| *i < uuids.len()) => {
            Ok(indices.into_iter().map(|i| uuids[i].clone()).collect())
        }
        (found, _) => {
            let why = match found {
                Ok(uuids) => format!("`nvidia-smi -L` lists {} GPUs", uuids.len()),
                Err(e) => e.to_string(),
            };
            tracing::warn!(nvidia_visible_devices = list.join(","), %why,
                "cannot map NVIDIA_VISIBLE_DEVICES to GPU UUIDs; pinning by the container's own numbering 0..n-1");
            Ok((0..list.len()).map(|i| i.to_string()).collect())
        }
    }
}

impl DiscoveryError {
    fn context(self, what: &str) -> DiscoveryError {
        match self {
            DiscoveryError::NotFound(why) => DiscoveryError::NotFound(format!("{what} and {why}")),
            none @ DiscoveryError::NoneVisible(_) => none,
        }
    }
}

/// `GPU-…` or `MIG-…`: the identifiers CUDA and the container runtime accept.
pub fn is_uuid(id: &str) -> bool {
    id.starts_with("GPU-") || id.starts_with("MIG-")
}

fn parse_list(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .map(str::to_string)
        .collect()
}

/// The UUIDs of `nvidia-smi -L` output. A GPU split into MIG instances is
/// replaced by its instances: CUDA work runs on an instance, not its parent.
///
/// ```text
/// GPU 0: NVIDIA H200 (UUID: GPU-aaaa)
/// GPU 1: NVIDIA A100 (UUID: GPU-bbbb)
///   MIG 1g.10gb     Device  0: (UUID: MIG-cccc)
/// ```
pub fn parse_nvidia_smi(output: &str) -> Vec<String> {
    // (gpu uuid, its MIG uuids)
    let mut gpus: Vec<(String, Vec<String>)> = Vec::new();
    for line in output.lines() {
        let Some(uuid) = line
            .split("(UUID: ")
            .nth(1)
            .and_then(|rest| rest.split(')').next())
            .map(str::trim)
        else {
            continue;
        };
        if line.starts_with("GPU ") && uuid.starts_with("GPU-") {
            gpus.push((uuid.to_string(), Vec::new()));
        } else if line.trim_start().starts_with("MIG ")
            && uuid.starts_with("MIG-")
            && let Some((_, migs)) = gpus.last_mut()
        {
            migs.push(uuid.to_string());
        }
    }
    gpus.into_iter()
        .flat_map(|(gpu, migs)| if migs.is_empty() { vec![gpu] } else { migs })
        .collect()
}

fn nvidia_smi(env: &Environment) -> Result<Vec<String>, DiscoveryError> {
    let mut command = std::process::Command::new("nvidia-smi");
    command.arg("-L");
    // The PATH given to us (a test's fake nvidia-smi) decides which program runs.
    if let Some(path) = env.get("PATH") {
        command.env("PATH", path);
    }
    match command.output() {
        Ok(out) if out.status.success() => {
            let list = parse_nvidia_smi(&String::from_utf8_lossy(&out.stdout));
            if list.is_empty() {
                Err(DiscoveryError::NotFound(
                    "`nvidia-smi -L` listed no GPU".into(),
                ))
            } else {
                Ok(list)
            }
        }
        Ok(out) => Err(DiscoveryError::NotFound(format!(
            "`nvidia-smi -L` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))),
        Err(e) => Err(DiscoveryError::NotFound(format!(
            "`nvidia-smi` could not be run ({e})"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LISTING: &str =
        "GPU 0: NVIDIA H200 (UUID: GPU-aaaa)\nGPU 1: NVIDIA H200 (UUID: GPU-bbbb)\n";

    /// A PATH whose `nvidia-smi -L` prints `listing`.
    fn fake_nvidia_smi(listing: &str) -> (tempfile::TempDir, String) {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nvidia-smi");
        std::fs::write(&path, format!("#!/bin/sh\nprintf '%s' '{listing}'\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        let p = dir.path().display().to_string();
        (dir, p)
    }

    fn env(visible: Option<&str>, path: &str) -> Environment {
        let mut pairs = vec![("PATH", path)];
        if let Some(v) = visible {
            pairs.push(("NVIDIA_VISIBLE_DEVICES", v));
        }
        Environment::from_pairs(pairs)
    }

    #[test]
    fn parses_uuids_and_replaces_a_mig_gpu_by_its_instances() {
        let out = "GPU 0: NVIDIA H200 (UUID: GPU-aaaa)\nGPU 1: NVIDIA A100 (UUID: GPU-bbbb)\n\
                   \x20 MIG 1g.10gb     Device  0: (UUID: MIG-cccc)\n\
                   \x20 MIG 1g.10gb     Device  1: (UUID: MIG-dddd)\nGPU 12: Tesla T4 (UUID: GPU-eeee)\n";
        assert_eq!(
            parse_nvidia_smi(out),
            vec!["GPU-aaaa", "MIG-cccc", "MIG-dddd", "GPU-eeee"]
        );
        assert!(parse_nvidia_smi("No devices were found\n").is_empty());
    }

    #[test]
    fn visible_devices_table() {
        type Resolved = Result<Vec<String>, DiscoveryError>;
        let (_dir, path) = fake_nvidia_smi(LISTING);
        let both = vec!["GPU-aaaa".to_string(), "GPU-bbbb".to_string()];
        let cases: &[(Option<&str>, Resolved)] = &[
            // Indices: never copied; the driver's UUIDs instead (a
            // container's own listing, or the driver's numbering outside one).
            (Some("3,5"), Ok(both.clone())),
            (Some("1"), Ok(vec!["GPU-bbbb".into()])),
            (
                Some("GPU-x, GPU-y"),
                Ok(vec!["GPU-x".into(), "GPU-y".into()]),
            ),
            (Some("MIG-m"), Ok(vec!["MIG-m".into()])),
            (Some("all"), Ok(both.clone())),
            (None, Ok(both.clone())),
            (Some(""), Ok(both.clone())),
            (
                Some("none"),
                Err(DiscoveryError::NoneVisible("none".into())),
            ),
            (
                Some("void"),
                Err(DiscoveryError::NoneVisible("void".into())),
            ),
        ];
        for (visible, want) in cases {
            assert_eq!(
                &resolve(&Devices::Auto, &env(*visible, &path)),
                want,
                "NVIDIA_VISIBLE_DEVICES={visible:?}"
            );
        }
    }

    #[test]
    fn indices_without_nvidia_smi_are_the_containers_own_numbering() {
        let e = env(Some("3,5"), "/nonexistent-leasehold-path");
        assert_eq!(resolve(&Devices::Auto, &e).unwrap(), vec!["0", "1"]);
    }

    #[test]
    fn an_explicit_list_is_used_as_given() {
        let e = env(Some("3,5"), "/nonexistent-leasehold-path");
        let list = Devices::List(vec!["1".into(), "GPU-z".into()]);
        assert_eq!(resolve(&list, &e).unwrap(), vec!["1", "GPU-z"]);
    }

    #[test]
    fn nothing_found_is_a_clear_error() {
        let e = env(None, "/nonexistent-leasehold-path");
        let text = resolve(&Devices::Auto, &e).unwrap_err().to_string();
        assert!(text.contains("no GPU was found"), "{text}");
        assert!(text.contains("NVIDIA_VISIBLE_DEVICES is unset"), "{text}");
        assert!(text.contains("nvidia-smi"), "{text}");
    }
}

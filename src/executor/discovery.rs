//! GPU discovery for the GPU executor: `devices = "auto"` reads `NVIDIA_VISIBLE_DEVICES` (what the
//! NVIDIA device plugin sets in a GKE pod), else asks `nvidia-smi -L`.

use crate::config::{Devices, Environment};

/// No usable GPU while the GPU executor is enabled.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DiscoveryError {
    /// Neither source named a device.
    #[error(
        "the GPU executor is enabled but no GPU was found: NVIDIA_VISIBLE_DEVICES is unset or empty and {0}; set executors.gpu.devices or disable executors.gpu"
    )]
    NoDevices(String),
}

/// The device ids the GPU executor will use.
pub fn resolve(devices: &Devices, env: &Environment) -> Result<Vec<String>, DiscoveryError> {
    match devices {
        Devices::List(list) => Ok(list.clone()),
        Devices::Auto => {
            if let Some(visible) = env.get("NVIDIA_VISIBLE_DEVICES") {
                let visible = visible.trim();
                // "all" is the container runtime's wildcard: ask the driver.
                if visible != "all" && visible != "none" && visible != "void" {
                    let list = parse_list(visible);
                    if !list.is_empty() {
                        return Ok(list);
                    }
                }
            }
            nvidia_smi(env)
        }
    }
}

fn parse_list(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .map(str::to_string)
        .collect()
}

/// Indices from `nvidia-smi -L` ("GPU 0: NVIDIA H200 (UUID: GPU-...)").
pub fn parse_nvidia_smi(output: &str) -> Vec<String> {
    output
        .lines()
        .filter_map(|line| line.strip_prefix("GPU "))
        .filter_map(|rest| rest.split(':').next())
        .map(|index| index.trim().to_string())
        .filter(|index| !index.is_empty() && index.chars().all(|c| c.is_ascii_digit()))
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
                Err(DiscoveryError::NoDevices(
                    "`nvidia-smi -L` listed no GPU".into(),
                ))
            } else {
                Ok(list)
            }
        }
        Ok(out) => Err(DiscoveryError::NoDevices(format!(
            "`nvidia-smi -L` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))),
        Err(e) => Err(DiscoveryError::NoDevices(format!(
            "`nvidia-smi` could not be run ({e})"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_nvidia_smi_listing() {
        let out = "GPU 0: NVIDIA H200 (UUID: GPU-aaaa)\nGPU 1: NVIDIA H200 (UUID: GPU-bbbb)\n\
                   \x20 MIG 1g.18gb Device 0: (UUID: MIG-cccc)\nGPU 12: Tesla T4 (UUID: GPU-d)\n";
        assert_eq!(parse_nvidia_smi(out), vec!["0", "1", "12"]);
        assert!(parse_nvidia_smi("No devices were found\n").is_empty());
    }

    #[test]
    fn explicit_list_wins_and_visible_devices_come_next() {
        let env = Environment::from_pairs([("NVIDIA_VISIBLE_DEVICES", "2,3")]);
        assert_eq!(
            resolve(&Devices::List(vec!["0".into()]), &env).unwrap(),
            vec!["0"]
        );
        assert_eq!(resolve(&Devices::Auto, &env).unwrap(), vec!["2", "3"]);
        let uuids = Environment::from_pairs([("NVIDIA_VISIBLE_DEVICES", "GPU-a, GPU-b")]);
        assert_eq!(
            resolve(&Devices::Auto, &uuids).unwrap(),
            vec!["GPU-a", "GPU-b"]
        );
    }

    #[test]
    fn nothing_found_is_a_clear_error() {
        let env = Environment::from_pairs([("PATH", "/nonexistent-leasehold-path")]);
        let err = resolve(&Devices::Auto, &env).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("no GPU was found"), "{text}");
        assert!(text.contains("nvidia-smi"), "{text}");
    }
}

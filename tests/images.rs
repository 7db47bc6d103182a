//! The Dockerfiles, read as text (there is no Docker engine in the test
//! environment): every stage of an image builds on the same distribution
//! release (the binary links against the glibc it runs with), the GPU image
//! is a CUDA -base- image, the default command's configuration is in the
//! image and enables the image's own executor class, dependencies are
//! cached, and the build checks the binary's glibc needs.

use std::collections::BTreeMap;
use std::path::PathBuf;

use leasehold::config::{Config, Environment};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// One instruction: the keyword and its arguments (continuation lines joined).
fn instructions(dockerfile: &str) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(root().join(dockerfile)).unwrap();
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || (line.is_empty() && current.is_empty()) {
            continue;
        }
        if let Some(part) = line.strip_suffix('\\') {
            current.push_str(part);
        } else {
            current.push_str(line);
            let (keyword, args) = current.split_once(' ').unwrap_or((&current, ""));
            out.push((keyword.to_uppercase(), args.trim().to_string()));
            current.clear();
        }
    }
    out
}

/// A build stage: its base image (ARGs and earlier stages resolved) and
/// its instructions.
struct Stage {
    image: String,
    steps: Vec<(String, String)>,
}

fn stages(dockerfile: &str) -> Vec<Stage> {
    let mut args = BTreeMap::new();
    let mut aliases: BTreeMap<String, String> = BTreeMap::new();
    let mut stages: Vec<Stage> = Vec::new();
    for (keyword, rest) in instructions(dockerfile) {
        match keyword.as_str() {
            "ARG" if stages.is_empty() => {
                let (k, v) = rest.split_once('=').unwrap_or((&rest, ""));
                args.insert(k.to_string(), v.to_string());
            }
            "FROM" => {
                let mut words = rest.split_whitespace().filter(|w| !w.starts_with("--"));
                let mut image = words.next().unwrap().to_string();
                for (k, v) in &args {
                    image = image.replace(&format!("${{{k}}}"), v);
                    image = image.replace(&format!("${k}"), v);
                }
                assert!(!image.contains('$'), "{dockerfile}: unresolved {image}");
                let image = aliases.get(&image).cloned().unwrap_or(image);
                if let (Some(as_), Some(alias)) = (words.next(), words.next()) {
                    assert!(as_.eq_ignore_ascii_case("as"));
                    aliases.insert(alias.to_string(), image.clone());
                }
                stages.push(Stage {
                    image,
                    steps: Vec::new(),
                });
            }
            _ => stages
                .last_mut()
                .unwrap_or_else(|| panic!("{dockerfile}: {keyword} before FROM"))
                .steps
                .push((keyword, rest)),
        }
    }
    stages
}

/// The distribution release an image is built on, from its name.
fn distribution(image: &str) -> (&'static str, &'static str) {
    let (repo, tag) = image.rsplit_once(':').unwrap_or((image, "latest"));
    let debian = [("bookworm", "12"), ("bullseye", "11"), ("trixie", "13")];
    for (codename, release) in debian {
        if (repo == "rust" || repo == "debian") && tag.split('-').any(|t| t == codename) {
            return ("debian", release);
        }
    }
    let ubuntu = [("22.04", "22.04"), ("24.04", "24.04"), ("20.04", "20.04")];
    for (version, release) in ubuntu {
        if (repo == "ubuntu" && tag == version)
            || (repo == "nvidia/cuda" && tag.ends_with(&format!("-ubuntu{version}")))
        {
            return ("ubuntu", release);
        }
    }
    panic!("unknown base image {image}: teach tests/images.rs its distribution");
}

#[test]
fn every_stage_of_an_image_builds_on_the_same_distribution_release() {
    for dockerfile in ["Dockerfile", "Dockerfile.gpu"] {
        let stages = stages(dockerfile);
        assert!(
            stages.len() >= 2,
            "{dockerfile}: a build and a runtime stage"
        );
        let runtime = distribution(&stages.last().unwrap().image);
        for stage in &stages {
            assert_eq!(
                distribution(&stage.image),
                runtime,
                "{dockerfile}: {} builds on another distribution than the runtime {}",
                stage.image,
                stages.last().unwrap().image
            );
        }
    }
    // The rule has teeth: the old pair (bookworm build, jammy runtime) differs.
    assert_ne!(
        distribution("rust:1.91-bookworm"),
        distribution("nvidia/cuda:12.4.1-runtime-ubuntu22.04")
    );
}

#[test]
fn the_gpu_image_is_a_cuda_base_image_that_keeps_its_paths() {
    let gpu = stages("Dockerfile.gpu");
    let runtime = gpu.last().unwrap();
    assert!(
        runtime.image.starts_with("nvidia/cuda:") && runtime.image.contains("-base-"),
        "{}: handlers that need CUDA libraries bring them",
        runtime.image
    );
    // The CUDA image's PATH and LD_LIBRARY_PATH name /usr/local/nvidia,
    // where GKE mounts the driver: never replaced, at most extended.
    for dockerfile in ["Dockerfile", "Dockerfile.gpu"] {
        for stage in stages(dockerfile) {
            for (keyword, args) in &stage.steps {
                for var in ["PATH", "LD_LIBRARY_PATH"] {
                    let set = args
                        .split_whitespace()
                        .find(|w| w.starts_with(&format!("{var}=")));
                    if let (true, Some(set)) = (keyword == "ENV", set) {
                        assert!(
                            set.contains(&format!("${var}"))
                                || set.contains(&format!("${{{var}}}")),
                            "{dockerfile}: {set} drops the image's own {var}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn the_default_command_names_configuration_that_is_in_the_image() {
    for (dockerfile, class) in [("Dockerfile", "cpu"), ("Dockerfile.gpu", "gpu")] {
        let stages = stages(dockerfile);
        let runtime = stages.last().unwrap();
        let copies: BTreeMap<&str, &str> = runtime
            .steps
            .iter()
            .filter(|(k, args)| k == "COPY" && !args.starts_with("--from"))
            .map(|(_, args)| {
                let words: Vec<&str> = args.split_whitespace().collect();
                (words[words.len() - 1], words[0])
            })
            .collect();
        let cmd = runtime
            .steps
            .iter()
            .rev()
            .find(|(k, _)| k == "CMD")
            .map_or_else(
                || panic!("{dockerfile}: no CMD"),
                |(_, args)| serde_json::from_str::<Vec<String>>(args).unwrap(),
            );
        let mut files = Vec::new();
        for arg in &cmd {
            let Some(path) = arg.strip_prefix("--config=") else {
                continue;
            };
            let source = copies.get(path).unwrap_or_else(|| {
                panic!("{dockerfile}: CMD names {path}, which no COPY puts there")
            });
            let local = root().join(source);
            assert!(local.is_file(), "{dockerfile}: {source} does not exist");
            files.push(local);
        }
        assert!(!files.is_empty(), "{dockerfile}: CMD names no --config");
        let env = Environment::from_pairs([("NVIDIA_VISIBLE_DEVICES", "0")]);
        let config = Config::load(&files, &env)
            .unwrap_or_else(|e| panic!("{dockerfile}: the default configuration: {e}"));
        let enabled: Vec<&str> = config.enabled_executors().map(|(name, _)| name).collect();
        assert_eq!(enabled, [class], "{dockerfile}");
    }
}

#[test]
fn dependencies_are_cached_and_the_glibc_the_binary_needs_is_checked() {
    for dockerfile in ["Dockerfile", "Dockerfile.gpu"] {
        let stages = stages(dockerfile);
        let runs = |s: &Stage| -> Vec<String> {
            s.steps
                .iter()
                .filter(|(k, _)| k == "RUN")
                .map(|(_, a)| a.clone())
                .collect()
        };
        let build: Vec<String> = stages.iter().flat_map(runs).collect();
        let cargo: Vec<&String> = build.iter().filter(|r| r.contains("cargo build")).collect();
        assert!(!cargo.is_empty(), "{dockerfile}: no cargo build");
        for run in cargo {
            assert!(
                run.contains("--mount=type=cache,target=/usr/local/cargo/registry")
                    && run.contains("--mount=type=cache,target=/src/target"),
                "{dockerfile}: cargo build without cache mounts: {run}"
            );
        }
        assert!(
            build
                .iter()
                .any(|r| r.contains("objdump -T") && r.contains("GLIBC_")),
            "{dockerfile}: the build records the glibc the binary needs"
        );
        let runtime = runs(stages.last().unwrap());
        assert!(
            runtime
                .iter()
                .any(|r| r.contains("ldd --version") && r.contains("leasehold --version")),
            "{dockerfile}: the runtime stage compares glibc versions and starts the binary"
        );
    }
    let ignored = std::fs::read_to_string(root().join(".dockerignore")).unwrap();
    for needed in ["src", "config", "benches", "manifests", "examples"] {
        assert!(
            !ignored.lines().any(|l| l.trim_end_matches('/') == needed),
            ".dockerignore hides {needed}/, which the images copy"
        );
    }
}

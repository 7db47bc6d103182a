//! The Python interpreter the benchmarks run the official client's peer
//! (`benches/python_peer.py`) with: `BENCH_PYTHON` when set, else the
//! virtual environment `target/bench-venv`, made on first use from the
//! pinned `benches/python-requirements.txt` (this needs the Python package index).

use std::path::PathBuf;
use std::process::Command;

/// The interpreter, or why there is none (the caller skips the peer then).
pub fn interpreter() -> Result<PathBuf, String> {
    if let Ok(p) = std::env::var("BENCH_PYTHON")
        && !p.is_empty()
    {
        return Ok(PathBuf::from(p));
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let venv = root.join("target").join("bench-venv");
    let python = venv.join("bin").join("python");
    let has_client = |python: &PathBuf| {
        Command::new(python)
            .args(["-c", "import google.cloud.pubsub_v1"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if has_client(&python) {
        return Ok(python);
    }
    let requirements = root.join("benches").join("python-requirements.txt");
    eprintln!(
        "making {} from {} (once)",
        venv.display(),
        requirements.display()
    );
    let made = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .status()
        .map_err(|e| format!("python3 -m venv: {e}"))?;
    if !made.success() {
        return Err(format!("python3 -m venv {} failed", venv.display()));
    }
    let pip = Command::new(venv.join("bin").join("pip"))
        .args(["install", "--quiet", "-r"])
        .arg(&requirements)
        .status()
        .map_err(|e| format!("pip: {e}"))?;
    if !pip.success() || !has_client(&python) {
        return Err(format!(
            "pip install -r {} failed; set BENCH_PYTHON to a Python with google-cloud-pubsub",
            requirements.display()
        ));
    }
    Ok(python)
}

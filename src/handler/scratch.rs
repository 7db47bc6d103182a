//! A task's private scratch directory: `LEASEHOLD_TASK_DIR`, also the
//! handler's `TMPDIR`, holding its result and progress files.
//!
//! Created under the worker's own temporary directory (`TMPDIR`, on GKE the
//! pod's scratch volume) with a name no other task on any container sharing
//! that volume can hold (`mkdir` fails on a name that exists, and a new one
//! is tried), mode 0700; removed with whatever it contains when the task
//! ends, after every process of the task is gone.

use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Where the handler may write a JSON result.
pub const RESULT_FILE: &str = "result.json";
/// Where the handler appends progress reports.
pub const PROGRESS_FILE: &str = "progress";

/// The directory of one running task; removed by [`TaskDir::remove`], or on
/// drop if the task's end never came (a panic).
#[derive(Debug)]
pub struct TaskDir {
    path: Option<PathBuf>,
}

impl TaskDir {
    /// A new, empty directory under the process's temporary directory, with
    /// an empty progress file.
    pub fn create() -> io::Result<TaskDir> {
        TaskDir::create_in(&std::env::temp_dir())
    }

    /// [`TaskDir::create`] under `parent`.
    pub fn create_in(parent: &Path) -> io::Result<TaskDir> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let mut last = None;
        for _ in 0..100 {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .subsec_nanos();
            let name = format!(
                "leasehold-task-{}-{}-{nanos:08x}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            );
            let path = parent.join(name);
            match std::fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => {
                    let dir = TaskDir { path: Some(path) };
                    std::fs::File::create(dir.progress_file())?;
                    return Ok(dir);
                }
                // Another container sharing the volume, with our pid: try another name.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("{}: {e}", parent.display()),
                    ));
                }
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("no free name")))
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        self.path
            .as_deref()
            .expect("a task directory is removed only once")
    }

    /// `LEASEHOLD_RESULT_FILE`.
    pub fn result_file(&self) -> PathBuf {
        self.path().join(RESULT_FILE)
    }

    /// `LEASEHOLD_PROGRESS_FILE`.
    pub fn progress_file(&self) -> PathBuf {
        self.path().join(PROGRESS_FILE)
    }

    /// The handler's variables for it: the directory (also `TMPDIR`), the
    /// result file and the progress file.
    pub fn environment(&self) -> Vec<(String, String)> {
        let dir = self.path().display().to_string();
        vec![
            ("LEASEHOLD_TASK_DIR".into(), dir.clone()),
            ("TMPDIR".into(), dir),
            (
                "LEASEHOLD_RESULT_FILE".into(),
                self.result_file().display().to_string(),
            ),
            (
                "LEASEHOLD_PROGRESS_FILE".into(),
                self.progress_file().display().to_string(),
            ),
        ]
    }

    /// Removes the directory and everything in it, off the runtime's
    /// threads (a render may leave gigabytes).
    pub async fn remove(mut self) {
        if let Some(path) = self.path.take() {
            let _ = tokio::task::spawn_blocking(move || remove_logged(&path)).await;
        }
    }
}

impl Drop for TaskDir {
    fn drop(&mut self) {
        if let Some(path) = self.path.take() {
            remove_logged(&path);
        }
    }
}

fn remove_logged(path: &Path) {
    if let Err(e) = remove_all(path) {
        tracing::warn!(dir = %path.display(), error = %e, "could not remove the task directory");
    }
}

/// Removes `path` whatever it holds: a directory the handler made read-only
/// is made writable again first.
pub fn remove_all(path: &Path) -> io::Result<()> {
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            make_writable(path);
            std::fs::remove_dir_all(path)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// `u+rwx` on every directory under `path` (symlinks are not followed).
fn make_writable(path: &Path) {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return;
    };
    if !meta.is_dir() {
        return;
    }
    let mode = meta.permissions().mode() | 0o700;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode));
    if let Ok(entries) = std::fs::read_dir(path) {
        for entry in entries.flatten() {
            make_writable(&entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_task_gets_its_own_directory_with_an_empty_progress_file() {
        let parent = tempfile::tempdir().unwrap();
        let a = TaskDir::create_in(parent.path()).unwrap();
        let b = TaskDir::create_in(parent.path()).unwrap();
        assert_ne!(a.path(), b.path());
        assert!(a.path().starts_with(parent.path()));
        let mode = std::fs::metadata(a.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        assert_eq!(std::fs::read(a.progress_file()).unwrap(), b"");
        assert!(!a.result_file().exists());
        let env: std::collections::BTreeMap<_, _> = a.environment().into_iter().collect();
        assert_eq!(env["TMPDIR"], env["LEASEHOLD_TASK_DIR"]);
        assert_eq!(
            env["LEASEHOLD_RESULT_FILE"],
            a.path().join("result.json").display().to_string()
        );
    }

    #[tokio::test]
    async fn removed_whatever_it_contains() {
        let parent = tempfile::tempdir().unwrap();
        let dir = TaskDir::create_in(parent.path()).unwrap();
        let path = dir.path().to_path_buf();
        let locked = path.join("a/b");
        std::fs::create_dir_all(&locked).unwrap();
        std::fs::write(locked.join("f"), "x").unwrap();
        std::os::unix::fs::symlink("/", path.join("root")).unwrap();
        std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o500)).unwrap();
        std::fs::set_permissions(path.join("a"), std::fs::Permissions::from_mode(0o500)).unwrap();
        dir.remove().await;
        assert!(!path.exists(), "{path:?} is still there");
        assert!(Path::new("/").exists(), "a symlink is not followed");
    }

    #[test]
    fn dropped_without_an_end_it_is_removed_too() {
        let parent = tempfile::tempdir().unwrap();
        let dir = TaskDir::create_in(parent.path()).unwrap();
        let path = dir.path().to_path_buf();
        drop(dir);
        assert!(!path.exists());
    }
}

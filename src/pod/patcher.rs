//! The one Kubernetes API call the worker makes, behind a narrow trait so the
//! annotator runs on a fake in paused time.

use std::collections::BTreeMap;

/// Why a patch did not take.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatchError {
    /// The API answered no: RBAC forbids it (403), the credentials are bad
    /// (401), or the pod is not there (404). Asking again will not help
    /// until someone changes the cluster.
    #[error("the Kubernetes API refused ({code} {reason}): {message}")]
    Refused {
        /// The HTTP status.
        code: u16,
        /// Kubernetes' reason, e.g. `Forbidden`.
        reason: String,
        /// The API's own message.
        message: String,
    },
    /// The API could not be reached, timed out, or failed on its side.
    #[error("the Kubernetes API is unavailable: {0}")]
    Unavailable(String),
}

/// Sets annotations on the worker's own pod.
#[async_trait::async_trait]
pub trait PodPatcher: Send + Sync {
    /// Merges `annotations` into the pod's `metadata.annotations` (a JSON
    /// merge patch: other annotations are left alone).
    async fn patch_annotations(
        &self,
        annotations: &BTreeMap<String, String>,
    ) -> Result<(), PatchError>;
}

//! The Kubernetes API, through the `kube` client: which pod this worker is
//! (`POD_NAME` / `POD_NAMESPACE` from the downward API), where its API is
//! (in-cluster, else `KUBECONFIG`), and the patch itself.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};

use super::patcher::{PatchError, PodPatcher};
use crate::config::Environment;

/// The field manager the API server records for our annotations
/// (`kubectl get pod -o yaml --show-managed-fields`).
const FIELD_MANAGER: &str = "leasehold";

/// The worker's own pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRef {
    /// `POD_NAMESPACE`; without it, the namespace of the API configuration
    /// (the service account's, in a cluster).
    pub namespace: Option<String>,
    /// `POD_NAME`.
    pub name: String,
}

impl fmt::Display for PodRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(namespace) => write!(f, "{namespace}/{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// Where the Kubernetes API is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ApiSource {
    /// `KUBERNETES_SERVICE_HOST` and `_PORT` plus the service account's
    /// token and CA, as every Kubernetes client reads them.
    InCluster,
    /// The files `KUBECONFIG` lists (`:`-separated), merged in order.
    Kubeconfig(Vec<PathBuf>),
}

/// Why there is nothing to annotate.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Absent {
    /// Not on Kubernetes at all (a laptop, the tests): nothing to say.
    NotKubernetes,
    /// In a cluster, but the pod does not know its name.
    NoPodName,
    /// A pod name, but no API to reach.
    NoApi(PodRef),
}

/// Which pod, and where its API is, from the environment alone.
fn locate(env: &Environment) -> Result<(PodRef, ApiSource), Absent> {
    let in_cluster = env.get("KUBERNETES_SERVICE_HOST").is_some()
        && env.get("KUBERNETES_SERVICE_PORT").is_some();
    let Some(name) = env.get("POD_NAME") else {
        return Err(if in_cluster {
            Absent::NoPodName
        } else {
            Absent::NotKubernetes
        });
    };
    let pod = PodRef {
        namespace: env.get("POD_NAMESPACE").map(str::to_string),
        name: name.to_string(),
    };
    if in_cluster {
        return Ok((pod, ApiSource::InCluster));
    }
    match env.get("KUBECONFIG") {
        Some(list) => Ok((
            pod,
            ApiSource::Kubeconfig(
                list.split(':')
                    .filter(|p| !p.is_empty())
                    .map(PathBuf::from)
                    .collect(),
            ),
        )),
        None => Err(Absent::NoApi(pod)),
    }
}

/// The patcher of this worker's own pod, when it runs in one whose API it
/// can reach; otherwise `None`, after saying why (a warning when a pod goes
/// unannotated, so that scale-in may pick it while busy).
pub async fn from_environment(env: &Environment) -> Option<(PodRef, KubePatcher)> {
    let (pod, source) = match locate(env) {
        Ok(found) => found,
        Err(Absent::NotKubernetes) => {
            tracing::debug!("not in a Kubernetes pod (no POD_NAME); pod annotations off");
            return None;
        }
        Err(Absent::NoPodName) => {
            tracing::warn!(
                "in a Kubernetes cluster, but POD_NAME is not set: this pod is not annotated, so \
                 scale-in may pick it while it runs a task (set POD_NAME and POD_NAMESPACE from \
                 the downward API, as manifests/base/deployment.yaml does)"
            );
            return None;
        }
        Err(Absent::NoApi(pod)) => {
            tracing::warn!(%pod,
                "POD_NAME is set but no Kubernetes API is configured (not in a cluster, no \
                 KUBECONFIG): this pod is not annotated, so scale-in may pick it while it runs a task");
            return None;
        }
    };
    match KubePatcher::connect(&pod, &source).await {
        Ok(patcher) => Some((pod, patcher)),
        Err(e) => {
            tracing::warn!(%pod, error = %e,
                "cannot build a Kubernetes client: this pod is not annotated, so scale-in may \
                 pick it while it runs a task");
            None
        }
    }
}

/// Why no Kubernetes client could be built.
#[derive(Debug, thiserror::Error)]
enum ClusterError {
    #[error("in-cluster configuration: {0}")]
    InCluster(#[from] kube::config::InClusterError),
    #[error("KUBECONFIG: {0}")]
    Kubeconfig(#[from] kube::config::KubeconfigError),
    #[error("KUBECONFIG is set but names no file")]
    EmptyKubeconfig,
    #[error(transparent)]
    Client(#[from] kube::Error),
}

/// [`PodPatcher`] through the Kubernetes API: a JSON merge patch on the
/// pod's `metadata.annotations`, which RBAC allows as `patch` on `pods`.
#[derive(Clone)]
pub struct KubePatcher {
    api: Api<Pod>,
    name: String,
}

impl KubePatcher {
    /// A client for `pod` on the API `source` names.
    async fn connect(pod: &PodRef, source: &ApiSource) -> Result<KubePatcher, ClusterError> {
        let config = match source {
            // kube reads KUBERNETES_SERVICE_HOST / _PORT from the process
            // itself: the very variables `locate` found in the environment.
            ApiSource::InCluster => kube::Config::incluster()?,
            ApiSource::Kubeconfig(paths) => {
                let mut merged: Option<Kubeconfig> = None;
                for path in paths {
                    let next = Kubeconfig::read_from(path)?;
                    merged = Some(match merged {
                        Some(m) => m.merge(next)?,
                        None => next,
                    });
                }
                let kubeconfig = merged.ok_or(ClusterError::EmptyKubeconfig)?;
                kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                    .await?
            }
        };
        let client = kube::Client::try_from(config)?;
        let api = match &pod.namespace {
            Some(namespace) => Api::namespaced(client, namespace),
            None => Api::default_namespaced(client),
        };
        Ok(KubePatcher {
            api,
            name: pod.name.clone(),
        })
    }
}

#[async_trait::async_trait]
impl PodPatcher for KubePatcher {
    async fn patch_annotations(
        &self,
        annotations: &BTreeMap<String, String>,
    ) -> Result<(), PatchError> {
        let patch = serde_json::json!({ "metadata": { "annotations": annotations } });
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.to_string()),
            ..PatchParams::default()
        };
        // Only the metadata comes back, not the whole pod.
        self.api
            .patch_metadata(&self.name, &params, &Patch::Merge(&patch))
            .await
            .map(drop)
            .map_err(patch_error)
    }
}

/// A refusal (the pod, the credentials or RBAC are wrong) or not.
fn patch_error(error: kube::Error) -> PatchError {
    match error {
        kube::Error::Api(status)
            if (400..500).contains(&status.code) && ![408, 429].contains(&status.code) =>
        {
            PatchError::Refused {
                code: status.code,
                reason: status.reason,
                message: status.message,
            }
        }
        other => PatchError::Unavailable(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Environment {
        Environment::from_pairs(pairs.iter().copied())
    }

    fn pod(namespace: Option<&str>) -> PodRef {
        PodRef {
            namespace: namespace.map(str::to_string),
            name: "worker-1".into(),
        }
    }

    /// Variables, and what `locate` finds in them.
    type Case<'a> = (Vec<(&'a str, &'a str)>, Result<(PodRef, ApiSource), Absent>);

    #[test]
    fn the_pod_and_its_api_come_from_the_environment() {
        let cluster = [
            ("KUBERNETES_SERVICE_HOST", "10.0.0.1"),
            ("KUBERNETES_SERVICE_PORT", "443"),
        ];
        let named = [("POD_NAME", "worker-1"), ("POD_NAMESPACE", "work")];
        let cases: Vec<Case> = vec![
            (vec![], Err(Absent::NotKubernetes)),
            // A developer's KUBECONFIG alone is not a pod.
            (vec![("KUBECONFIG", "/k")], Err(Absent::NotKubernetes)),
            (cluster.to_vec(), Err(Absent::NoPodName)),
            (
                vec![("POD_NAME", "worker-1"), ("POD_NAMESPACE", "")],
                Err(Absent::NoApi(pod(None))),
            ),
            (
                [&cluster[..], &named[..]].concat(),
                Ok((pod(Some("work")), ApiSource::InCluster)),
            ),
            // In-cluster wins over a KUBECONFIG.
            (
                [&cluster[..], &named[..], &[("KUBECONFIG", "/k")]].concat(),
                Ok((pod(Some("work")), ApiSource::InCluster)),
            ),
            (
                [&named[..], &[("KUBECONFIG", "/a::/b")]].concat(),
                Ok((
                    pod(Some("work")),
                    ApiSource::Kubeconfig(vec!["/a".into(), "/b".into()]),
                )),
            ),
        ];
        for (vars, want) in cases {
            assert_eq!(locate(&env(&vars)), want, "{vars:?}");
        }
    }

    #[test]
    fn refusals_are_told_from_outages() {
        let api = |code: u16, reason: &str| {
            kube::Error::Api(
                kube::core::Status::failure(&format!("{code} says no"), reason)
                    .with_code(code)
                    .boxed(),
            )
        };
        assert_eq!(
            patch_error(api(403, "Forbidden")),
            PatchError::Refused {
                code: 403,
                reason: "Forbidden".into(),
                message: "403 says no".into()
            }
        );
        for code in [404, 401, 422] {
            assert!(matches!(
                patch_error(api(code, "X")),
                PatchError::Refused { .. }
            ));
        }
        for code in [408, 429, 500, 503] {
            assert!(matches!(
                patch_error(api(code, "X")),
                PatchError::Unavailable(_)
            ));
        }
    }

    /// kube's rustls needs a crypto provider: ours is aws-lc-rs (no ring in
    /// the tree), and an API over TLS with its own CA gets a client.
    #[tokio::test]
    async fn an_api_over_tls_gets_a_client() {
        let ca = rcgen::generate_simple_self_signed(vec!["kubernetes.default.svc".into()]).unwrap();
        let mut config = kube::Config::new("https://kubernetes.default.svc".parse().unwrap());
        config.root_cert = Some(vec![ca.cert.der().to_vec()]);
        kube::Client::try_from(config).expect("a TLS client");
    }

    #[tokio::test]
    async fn a_missing_kubeconfig_is_an_error_naming_it() {
        let source = ApiSource::Kubeconfig(vec!["/nonexistent/kubeconfig".into()]);
        let error = KubePatcher::connect(&pod(Some("work")), &source)
            .await
            .err()
            .expect("no such file");
        assert!(
            error.to_string().contains("/nonexistent/kubeconfig"),
            "{error}"
        );
    }
}

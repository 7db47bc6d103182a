//! A stand-in for the Kubernetes API server, for the pod annotations: plain
//! HTTP on 127.0.0.1, one pod, and a record of every request. A PATCH is
//! applied as a JSON merge patch on the pod's annotations and answered with
//! the pod's metadata, as the API server does for
//! `Accept: application/json;as=PartialObjectMetadata`; or, when told,
//! refused with the 403 `Status` RBAC gives.

#![allow(dead_code)]
// Arrival times of requests from a real process: wall clock.
#![allow(clippy::disallowed_types)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// The bearer token the kubeconfig carries and the fake expects.
pub const TOKEN: &str = "fake-kube-token";

/// How the fake answers a PATCH.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// Apply it and answer 200.
    Accept,
    /// 403 Forbidden, as RBAC without `patch` on `pods` answers.
    Forbid,
}

/// One request, as it arrived.
#[derive(Debug, Clone)]
pub struct Request {
    pub at: Instant,
    pub method: String,
    /// Path only.
    pub path: String,
    /// The query string, without `?`.
    pub query: String,
    pub content_type: String,
    pub accept: String,
    pub authorization: String,
    pub body: Value,
}

impl Request {
    /// The annotations a merge patch sets.
    pub fn annotations(&self) -> BTreeMap<String, String> {
        serde_json::from_value(self.body["metadata"]["annotations"].clone())
            .unwrap_or_else(|e| panic!("no annotations in {}: {e}", self.body))
    }
}

struct Inner {
    answer: Answer,
    namespace: String,
    name: String,
    requests: Vec<Request>,
    /// The pod's annotations as the fake API holds them.
    annotations: BTreeMap<String, String>,
}

/// The fake API server; it runs until the test's runtime ends.
#[derive(Clone)]
pub struct FakeKube {
    addr: std::net::SocketAddr,
    inner: Arc<Mutex<Inner>>,
}

impl FakeKube {
    /// Serves the pod `namespace/name`, which starts with `annotations`.
    pub async fn start(
        answer: Answer,
        namespace: &str,
        name: &str,
        annotations: &[(&str, &str)],
    ) -> FakeKube {
        let inner = Arc::new(Mutex::new(Inner {
            answer,
            namespace: namespace.to_string(),
            name: name.to_string(),
            requests: Vec::new(),
            annotations: annotations
                .iter()
                .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
                .collect(),
        }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(inner.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        FakeKube { addr, inner }
    }

    /// Writes a kubeconfig for this server (a bearer token, plain HTTP) to
    /// `path`, and returns the path.
    pub fn write_kubeconfig(&self, path: &Path) -> PathBuf {
        let text = format!(
            "apiVersion: v1
kind: Config
clusters:
  - name: fake
    cluster:
      server: http://{addr}
users:
  - name: fake
    user:
      token: {TOKEN}
contexts:
  - name: fake
    context:
      cluster: fake
      user: fake
      namespace: elsewhere
current-context: fake
",
            addr = self.addr
        );
        std::fs::write(path, text).unwrap();
        path.to_path_buf()
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Request> {
        self.inner.lock().unwrap().requests.clone()
    }

    /// The pod's annotations now.
    pub fn annotations(&self) -> BTreeMap<String, String> {
        self.inner.lock().unwrap().annotations.clone()
    }
}

async fn handle(
    State(inner): State<Arc<Mutex<Inner>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let text = |name: header::HeaderName| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let request = Request {
        at: Instant::now(),
        method: method.to_string(),
        path: uri.path().to_string(),
        query: uri.query().unwrap_or_default().to_string(),
        content_type: text(header::CONTENT_TYPE),
        accept: text(header::ACCEPT),
        authorization: text(header::AUTHORIZATION),
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
    };
    let mut inner = inner.lock().unwrap();
    inner.requests.push(request.clone());
    let pod_path = format!("/api/v1/namespaces/{}/pods/{}", inner.namespace, inner.name);
    if request.authorization != format!("Bearer {TOKEN}") {
        return status(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized");
    }
    if request.method != "PATCH" || request.path != pod_path {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("the fake serves PATCH {pod_path} only"),
        );
    }
    if inner.answer == Answer::Forbid {
        let message = format!(
            "pods \"{}\" is forbidden: User \"system:serviceaccount:{}:default\" cannot patch \
             resource \"pods\" in API group \"\" in the namespace \"{}\"",
            inner.name, inner.namespace, inner.namespace
        );
        return status(StatusCode::FORBIDDEN, "Forbidden", &message);
    }
    if request.content_type != "application/merge-patch+json" {
        return status(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaType",
            &format!(
                "the fake applies merge patches only, not {}",
                request.content_type
            ),
        );
    }
    // A JSON merge patch: set each key, remove those set to null.
    if let Some(patch) = request.body["metadata"]["annotations"].as_object() {
        for (key, value) in patch {
            match value {
                Value::String(s) => {
                    inner.annotations.insert(key.clone(), s.clone());
                }
                Value::Null => {
                    inner.annotations.remove(key);
                }
                other => {
                    return status(
                        StatusCode::BAD_REQUEST,
                        "BadRequest",
                        &format!("annotation {key} is not a string: {other}"),
                    );
                }
            }
        }
    }
    let metadata = json!({
        "apiVersion": "meta.k8s.io/v1",
        "kind": "PartialObjectMetadata",
        "metadata": {
            "name": inner.name,
            "namespace": inner.namespace,
            "annotations": inner.annotations,
        },
    });
    (
        [(header::CONTENT_TYPE, "application/json")],
        metadata.to_string(),
    )
        .into_response()
}

/// A `Status` answer, as the API server gives for errors.
fn status(code: StatusCode, reason: &str, message: &str) -> Response {
    let body = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code.as_u16(),
    });
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

//! A stand-in for Google in front of the Pub/Sub emulator: what the
//! production path meets, on this machine.
//!
//! - A TLS front (a CA made here, trusted only by processes given
//!   [`GoogleFront::ca_file`] as `SSL_CERT_FILE`) that forwards gRPC and
//!   HTTP/JSON calls to the emulator (`PUBSUB_EMULATOR_HOST`).
//! - On every RPC it checks, as Pub/Sub would, the `authorization: Bearer`
//!   token (issued here, not expired) and, on gRPC, `x-goog-request-params`
//!   (it must name the topic or subscription the request body is about), and
//!   refuses a call without them with a trailers-only UNAUTHENTICATED or
//!   `PERMISSION_DENIED` answer. The official admin clients speak HTTP/JSON
//!   (REST), where the URL names the resource: those calls are checked for
//!   the token and refused with HTTP 401/403 and a JSON error. Every call is
//!   recorded, refused or not.
//! - An OAuth token endpoint (`/token` on the same port) for an
//!   `authorized_user` credentials file, [`GoogleFront::adc_file`], whose
//!   `token_uri` points here; it issues short-lived tokens. (google-cloud-auth
//!   signs its own JWTs for service-account keys and never calls a token
//!   endpoint, so a service-account file could not be pointed here.) The
//!   same endpoint is also served on a plain-HTTP port, as GKE's metadata
//!   server serves Workload Identity tokens:
//!   [`GoogleFront::adc_file_plain_token`] points there, so a test can break
//!   the trust in the Pub/Sub endpoint alone.
//!
//! The front runs on its own runtime thread, so a test may block its own
//! thread (waiting on a child process) without stalling the front.

#![allow(dead_code)]
// Token expiry is wall-clock time shared with a child process.
#![allow(clippy::disallowed_types)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};

#[path = "google_front/checks.rs"]
mod checks;
#[path = "google_front/pki.rs"]
mod pki;
#[path = "google_front/token.rs"]
mod token;
#[path = "google_front/wire.rs"]
mod wire;

use checks::{check_grpc, check_rest};
use pki::Pki;
pub use pki::write_unrelated_ca;
use wire::{bearer, header, percent_encode};

/// The refresh token in the credentials file; anything else is refused.
const REFRESH_TOKEN: &str = "leasehold-test-refresh-token";
const CLIENT_ID: &str = "leasehold-test-client";

/// gRPC status codes the front answers with.
pub const UNAUTHENTICATED: u16 = 16;
pub const PERMISSION_DENIED: u16 = 7;
const UNIMPLEMENTED: u16 = 12;

/// What the front does with calls that carry valid credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Policy {
    /// Forward to the emulator.
    Accept,
    /// Refuse every call with this gRPC code (a revoked token: 16; a
    /// removed IAM binding: 7).
    Refuse(u16),
    /// Refuse the calls of one method (`Subscriber/GetSubscription`) with
    /// this code: a role that lacks one permission.
    RefuseMethod(String, u16),
}

/// One RPC as the front saw it.
#[derive(Debug, Clone)]
pub struct Call {
    /// `Service/Method`, e.g. `Subscriber/Pull` (REST calls are named by
    /// the RPC they stand for).
    pub method: String,
    /// An HTTP/JSON call rather than gRPC.
    pub rest: bool,
    /// The bearer token, if any.
    pub token: Option<String>,
    /// `x-goog-request-params` as sent.
    pub request_params: Option<String>,
    /// The resource the request body names.
    pub resource: Option<String>,
    /// The gRPC code it was refused with; `None` when forwarded.
    pub refused: Option<u16>,
    /// Why it was refused.
    pub reason: String,
    /// When it arrived.
    pub at: Instant,
}

struct State {
    emulator: String,
    token_lifetime: Duration,
    /// Issued tokens and when each expires.
    tokens: Mutex<HashMap<String, Instant>>,
    token_requests: AtomicU64,
    /// False while the token endpoint answers 503.
    token_endpoint_up: std::sync::atomic::AtomicBool,
    policy: Mutex<Policy>,
    calls: Mutex<Vec<Call>>,
    grpc_client: Client<HttpConnector, Full<Bytes>>,
    rest_client: Client<HttpConnector, Full<Bytes>>,
}

/// The running front; stops when dropped.
pub struct GoogleFront {
    addr: SocketAddr,
    state: Arc<State>,
    ca_file: PathBuf,
    adc_file: PathBuf,
    adc_file_plain_token: PathBuf,
    runtime: Option<tokio::runtime::Runtime>,
}

impl GoogleFront {
    /// Starts a front for the emulator at `emulator` (`HOST:PORT`), issuing
    /// tokens valid for `token_lifetime`; writes `ca.pem` and `adc.json`
    /// into `dir`.
    pub fn start(emulator: &str, dir: &Path, token_lifetime: Duration) -> GoogleFront {
        // Built on a thread of its own: a runtime cannot be started (nor
        // blocked on) from inside the test's runtime.
        let (emulator, dir) = (emulator.to_string(), dir.to_path_buf());
        std::thread::spawn(move || GoogleFront::start_here(&emulator, &dir, token_lifetime))
            .join()
            .expect("the front starts")
    }

    fn start_here(emulator: &str, dir: &Path, token_lifetime: Duration) -> GoogleFront {
        let pki = Pki::generate("leasehold test CA");
        let ca_file = dir.join("ca.pem");
        std::fs::write(&ca_file, &pki.ca_pem).unwrap();

        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let plain = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let plain_port = plain.local_addr().unwrap().port();

        let adc = |token_uri: String| {
            serde_json::json!({
                "type": "authorized_user",
                "client_id": CLIENT_ID,
                "client_secret": "leasehold-test-secret",
                "refresh_token": REFRESH_TOKEN,
                "token_uri": token_uri,
            })
            .to_string()
        };
        let adc_file = dir.join("adc.json");
        std::fs::write(
            &adc_file,
            adc(format!("https://127.0.0.1:{}/token", addr.port())),
        )
        .unwrap();
        let adc_file_plain_token = dir.join("adc-plain-token.json");
        std::fs::write(
            &adc_file_plain_token,
            adc(format!("http://127.0.0.1:{plain_port}/token")),
        )
        .unwrap();

        let (grpc_client, rest_client) = runtime.block_on(async {
            (
                Client::builder(TokioExecutor::new())
                    .http2_only(true)
                    .build_http(),
                Client::builder(TokioExecutor::new()).build_http(),
            )
        });
        let state = Arc::new(State {
            emulator: emulator.to_string(),
            token_lifetime,
            tokens: Mutex::new(HashMap::new()),
            token_requests: AtomicU64::new(0),
            token_endpoint_up: std::sync::atomic::AtomicBool::new(true),
            policy: Mutex::new(Policy::Accept),
            calls: Mutex::new(Vec::new()),
            grpc_client,
            rest_client,
        });
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(pki.server_config()));
        runtime.spawn(serve(listener, Some(acceptor), state.clone()));
        runtime.spawn(serve(plain, None, state.clone()));
        GoogleFront {
            addr,
            state,
            ca_file,
            adc_file,
            adc_file_plain_token,
            runtime: Some(runtime),
        }
    }

    /// `https://127.0.0.1:PORT`, for `pubsub.endpoint`.
    pub fn endpoint(&self) -> String {
        format!("https://127.0.0.1:{}", self.addr.port())
    }

    /// The test CA's certificate (PEM), for `SSL_CERT_FILE`.
    pub fn ca_file(&self) -> &Path {
        &self.ca_file
    }

    /// The `authorized_user` file, for `GOOGLE_APPLICATION_CREDENTIALS`.
    pub fn adc_file(&self) -> &Path {
        &self.adc_file
    }

    /// An `authorized_user` file whose token endpoint is plain HTTP, so
    /// only the Pub/Sub endpoint depends on `SSL_CERT_FILE`.
    pub fn adc_file_plain_token(&self) -> &Path {
        &self.adc_file_plain_token
    }

    /// A valid token, as the token endpoint would issue it.
    pub fn issue_token(&self) -> String {
        token::issue(&self.state)
    }

    /// Takes the token endpoint down (503) or brings it back.
    pub fn set_token_endpoint_up(&self, up: bool) {
        self.state.token_endpoint_up.store(up, Ordering::Relaxed);
    }

    /// Accepts or refuses calls from now on.
    pub fn set_policy(&self, policy: Policy) {
        *self.state.policy.lock().unwrap() = policy;
    }

    /// Every call so far, in arrival order.
    pub fn calls(&self) -> Vec<Call> {
        self.state.calls.lock().unwrap().clone()
    }

    /// How many times the token endpoint issued a token.
    pub fn tokens_issued(&self) -> u64 {
        self.state.token_requests.load(Ordering::Relaxed)
    }
}

impl Drop for GoogleFront {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

type Body = BoxBody<Bytes, hyper::Error>;

/// Serves TLS connections (the front and the token endpoint), or plain
/// ones (the token endpoint only) without an acceptor.
async fn serve(
    listener: tokio::net::TcpListener,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    state: Arc<State>,
) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let (acceptor, state) = (acceptor.clone(), state.clone());
        tokio::spawn(async move {
            let tls = acceptor.is_some();
            let service = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(state, req, tls).await) }
            });
            let server = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let _ = match acceptor {
                // A client that does not trust the CA ends in accept: nothing to serve.
                Some(acceptor) => match acceptor.accept(tcp).await {
                    Ok(stream) => server.serve_connection(TokioIo::new(stream), service).await,
                    Err(_) => return,
                },
                None => server.serve_connection(TokioIo::new(tcp), service).await,
            };
        });
    }
}

async fn handle(state: Arc<State>, req: Request<Incoming>, tls: bool) -> Response<Body> {
    if req.uri().path() == "/token" {
        return token::token(&state, req).await;
    }
    if !tls {
        return json(
            StatusCode::NOT_FOUND,
            &serde_json::json!({"error": "TLS only"}),
        );
    }
    let grpc =
        header(req.headers(), "content-type").is_some_and(|t| t.starts_with("application/grpc"));
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return refusal(grpc, UNIMPLEMENTED, &format!("unreadable request: {e}")),
    };
    let mut call = Call {
        method: String::new(),
        rest: !grpc,
        token: bearer(&parts.headers),
        request_params: header(&parts.headers, "x-goog-request-params"),
        resource: None,
        refused: None,
        reason: String::new(),
        at: Instant::now(),
    };
    let checked = if grpc {
        check_grpc(&state, &mut call, parts.uri.path(), &body)
    } else {
        check_rest(&state, &mut call, &parts)
    };
    if let Err((code, reason)) = checked {
        call.refused = Some(code);
        call.reason.clone_from(&reason);
        state.calls.lock().unwrap().push(call);
        return refusal(grpc, code, &reason);
    }
    state.calls.lock().unwrap().push(call);
    forward(&state, parts, body, grpc).await
}

/// Sends an accepted call on to the emulator: gRPC over HTTP/2, REST over
/// HTTP/1.1 (how the emulator serves each).
async fn forward(
    state: &State,
    parts: http::request::Parts,
    body: Bytes,
    grpc: bool,
) -> Response<Body> {
    let uri = format!(
        "http://{}{}",
        state.emulator,
        parts
            .uri
            .path_and_query()
            .map_or("/", http::uri::PathAndQuery::as_str)
    );
    let mut req = Request::builder()
        .method(parts.method)
        .uri(uri)
        .body(Full::new(body))
        .unwrap();
    *req.headers_mut() = parts.headers;
    req.headers_mut().remove(http::header::HOST);
    let answer = if grpc {
        *req.version_mut() = http::Version::HTTP_2;
        state.grpc_client.request(req).await
    } else {
        state.rest_client.request(req).await
    };
    match answer {
        Ok(response) => response.map(http_body_util::BodyExt::boxed),
        Err(e) => refusal(grpc, 14, &format!("the emulator behind the front: {e}")),
    }
}

/// Pub/Sub's refusal: a trailers-only gRPC answer (HTTP 200 whose headers
/// carry the status), or a JSON error with the matching HTTP status.
fn refusal(grpc: bool, code: u16, message: &str) -> Response<Body> {
    if grpc {
        return Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "application/grpc")
            .header("grpc-status", code.to_string())
            .header("grpc-message", percent_encode(message))
            .body(empty())
            .unwrap();
    }
    let (status, name) = match code {
        UNAUTHENTICATED => (StatusCode::UNAUTHORIZED, "UNAUTHENTICATED"),
        PERMISSION_DENIED => (StatusCode::FORBIDDEN, "PERMISSION_DENIED"),
        UNIMPLEMENTED => (StatusCode::NOT_IMPLEMENTED, "UNIMPLEMENTED"),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE"),
    };
    json(
        status,
        &serde_json::json!({"error": {"code": status.as_u16(), "message": message, "status": name}}),
    )
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(
            Full::new(Bytes::from(value.to_string()))
                .map_err(|never| match never {})
                .boxed(),
        )
        .unwrap()
}

fn empty() -> Body {
    Full::new(Bytes::new())
        .map_err(|never| match never {})
        .boxed()
}

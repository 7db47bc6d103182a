//! Where Pub/Sub is and who we are to it.
//!
//! The official crate does not read `PUBSUB_EMULATOR_HOST`; this module does,
//! for the admin and publisher clients and for our data-plane stub alike: the
//! emulator is a plain `http://` endpoint with anonymous credentials, Google is
//! `https://pubsub.googleapis.com` with Application Default Credentials
//! (Workload Identity on GKE).

use std::time::Duration;

use google_cloud_auth::credentials::{self, Credentials};
use google_cloud_pubsub::client::{Publisher, SubscriptionAdmin, TopicAdmin};

use crate::config::{Environment, PubsubConfig};
use crate::pubsub::GrpcDataPlane;

/// The largest response header block we accept: room for the per-id
/// failures of a 1,000-id batch (about 90 KB on the emulator).
const MAX_RESPONSE_HEADERS: u32 = 4 << 20;

/// Google's Pub/Sub endpoint.
pub const GOOGLE_ENDPOINT: &str = "https://pubsub.googleapis.com";

/// The resolved endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `http://host:port` for the emulator, an `https://` URL otherwise.
    pub url: String,
    /// True when `PUBSUB_EMULATOR_HOST` chose it: plain HTTP, no credentials.
    pub emulator: bool,
}

impl Endpoint {
    /// `PUBSUB_EMULATOR_HOST` wins, then `pubsub.endpoint`, then Google.
    pub fn resolve(config: &PubsubConfig, env: &Environment) -> Endpoint {
        if let Some(host) = env.get("PUBSUB_EMULATOR_HOST") {
            let url = if host.starts_with("http://") {
                host.to_string()
            } else {
                format!("http://{host}")
            };
            return Endpoint {
                url,
                emulator: true,
            };
        }
        let url = if config.endpoint.is_empty() {
            GOOGLE_ENDPOINT.to_string()
        } else {
            config.endpoint.clone()
        };
        Endpoint {
            url,
            emulator: false,
        }
    }
}

/// Failures while setting up clients; none of them concern a message.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    /// ADC could not be found or loaded.
    #[error("cannot load Google credentials (Application Default Credentials): {0}")]
    Credentials(String),
    /// The endpoint URL or TLS setup is unusable.
    #[error("cannot use Pub/Sub endpoint {endpoint}: {reason}")]
    Endpoint {
        /// The URL at fault.
        endpoint: String,
        /// What tonic or the official crate said.
        reason: String,
    },
}

/// A project, an endpoint and credentials: the factory of every client.
#[derive(Clone, Debug)]
pub struct Connection {
    project: String,
    endpoint: Endpoint,
    credentials: Credentials,
    /// How the channel reaches the endpoint (TLS included), for [`Connection::check_tls`].
    transport: tonic::transport::Endpoint,
    /// One HTTP/2 channel shared by every data-plane call (tonic multiplexes).
    channel: tonic::transport::Channel,
}

impl Connection {
    /// Resolves the endpoint and credentials. Connects lazily: a Pub/Sub that
    /// is down now is retried by the callers, not fatal here.
    pub fn new(config: &PubsubConfig, env: &Environment) -> Result<Connection, ConnectionError> {
        let endpoint = Endpoint::resolve(config, env);
        let credentials = if endpoint.emulator {
            credentials::anonymous::Builder::new().build()
        } else {
            credentials::Builder::default()
                .build()
                .map_err(|e| ConnectionError::Credentials(e.to_string()))?
        };
        let bad = |reason: String| ConnectionError::Endpoint {
            endpoint: endpoint.url.clone(),
            reason,
        };
        let mut builder = tonic::transport::Endpoint::from_shared(endpoint.url.clone())
            .map_err(|e| bad(e.to_string()))?
            .connect_timeout(Duration::from_secs(10))
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(20))
            .keep_alive_while_idle(true)
            // An exactly-once subscription names every refused ack id in the
            // error's trailer; past hyper's default 16 KiB (about 150 ids)
            // the server resets the stream and the per-id answer is lost,
            // although the other ids of the batch were acked.
            .http2_max_header_list_size(MAX_RESPONSE_HEADERS);
        if endpoint.url.starts_with("https://") {
            builder = builder
                .tls_config(tonic::transport::ClientTlsConfig::new().with_native_roots())
                .map_err(|e| bad(e.to_string()))?;
        }
        let channel = builder.connect_lazy();
        Ok(Connection {
            project: config.project.clone(),
            endpoint,
            credentials,
            transport: builder,
            channel,
        })
    }

    /// One TLS handshake with the endpoint, at start: a certificate the trust
    /// store refuses (wrong CA, wrong host name, plain HTTP behind an
    /// `https://` URL) is an error naming the endpoint now, instead of a
    /// worker that stays unready retrying it. An endpoint that does not
    /// answer is not an error here; the callers retry it as ever.
    pub async fn check_tls(&self) -> Result<(), ConnectionError> {
        if !self.endpoint.url.starts_with("https://") {
            return Ok(());
        }
        match self.transport.connect().await {
            Ok(_) => Ok(()),
            Err(e) => {
                if let Some(tls) = tls_failure(&e) {
                    Err(ConnectionError::Endpoint {
                        endpoint: self.endpoint.url.clone(),
                        reason: format!("the TLS handshake failed: {tls}"),
                    })
                } else {
                    tracing::warn!(endpoint = %self.endpoint.url, error = %e,
                    "Pub/Sub is not reachable yet; retrying in the background");
                    Ok(())
                }
            }
        }
    }

    /// The resolved endpoint.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The project id.
    pub fn project(&self) -> &str {
        &self.project
    }

    /// `projects/P/topics/ID`
    pub fn topic_path(&self, id: &str) -> String {
        format!("projects/{}/topics/{id}", self.project)
    }

    /// `projects/P/subscriptions/ID`
    pub fn subscription_path(&self, id: &str) -> String {
        format!("projects/{}/subscriptions/{id}", self.project)
    }

    /// The data-plane stub (Pull, Acknowledge, `ModifyAckDeadline`).
    pub fn data_plane(&self) -> GrpcDataPlane {
        GrpcDataPlane::new(self.channel.clone(), self.credentials.clone())
    }

    /// The official topic admin client.
    pub async fn topic_admin(&self) -> Result<TopicAdmin, ConnectionError> {
        TopicAdmin::builder()
            .with_endpoint(self.endpoint.url.clone())
            .with_credentials(self.credentials.clone())
            .build()
            .await
            .map_err(|e| self.endpoint_error(e))
    }

    /// The official subscription admin client.
    pub async fn subscription_admin(&self) -> Result<SubscriptionAdmin, ConnectionError> {
        SubscriptionAdmin::builder()
            .with_endpoint(self.endpoint.url.clone())
            .with_credentials(self.credentials.clone())
            .build()
            .await
            .map_err(|e| self.endpoint_error(e))
    }

    /// The official batching publisher for one topic id.
    pub async fn publisher(&self, topic_id: &str) -> Result<Publisher, ConnectionError> {
        Publisher::builder(self.topic_path(topic_id))
            .with_endpoint(self.endpoint.url.clone())
            .with_credentials(self.credentials.clone())
            // Tasks are published one at a time by producers and by us; do
            // not hold them back waiting for a batch to fill.
            .set_delay_threshold(Duration::from_millis(1))
            .build()
            .await
            .map_err(|e| self.endpoint_error(e))
    }

    fn endpoint_error(&self, e: impl std::fmt::Display) -> ConnectionError {
        ConnectionError::Endpoint {
            endpoint: self.endpoint.url.clone(),
            reason: e.to_string(),
        }
    }
}

/// The TLS error somewhere in a connection error's chain, if any. (An
/// `io::Error` hides the error it wraps from `source()`, so look inside.)
fn tls_failure<'e>(e: &'e (dyn std::error::Error + 'static)) -> Option<&'e rustls::Error> {
    let mut next = Some(e);
    while let Some(err) = next {
        if let Some(tls) = err.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        let inner = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>());
        if inner.is_some() {
            return inner;
        }
        next = err.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Environment};

    fn pubsub(endpoint: &str) -> PubsubConfig {
        let mut c = Config::load(&[], &Environment::default()).unwrap().pubsub;
        c.endpoint = endpoint.to_string();
        c
    }

    #[test]
    fn a_tls_error_is_found_inside_io_errors_and_nothing_else_is() {
        let tls = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let wrapped = std::io::Error::new(std::io::ErrorKind::InvalidData, tls.clone());
        assert_eq!(tls_failure(&wrapped), Some(&tls));
        assert_eq!(tls_failure(&tls), Some(&tls));
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(tls_failure(&refused), None);
    }

    #[test]
    fn endpoint_resolution_table() {
        let cases = [
            ("", None, GOOGLE_ENDPOINT, false),
            (
                "https://eu-pubsub.example:443",
                None,
                "https://eu-pubsub.example:443",
                false,
            ),
            ("", Some("localhost:8085"), "http://localhost:8085", true),
            (
                "https://x.example",
                Some("127.0.0.1:1"),
                "http://127.0.0.1:1",
                true,
            ),
            ("", Some("http://h:2"), "http://h:2", true),
            ("", Some(""), GOOGLE_ENDPOINT, false),
        ];
        for (configured, emulator, url, is_emulator) in cases {
            let env = match emulator {
                Some(h) => Environment::from_pairs([("PUBSUB_EMULATOR_HOST", h)]),
                None => Environment::default(),
            };
            let got = Endpoint::resolve(&pubsub(configured), &env);
            assert_eq!(
                got,
                Endpoint {
                    url: url.to_string(),
                    emulator: is_emulator
                },
                "configured {configured:?}, emulator {emulator:?}"
            );
        }
    }
}

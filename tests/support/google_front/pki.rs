//! The test's certificates: a CA and a server certificate signed by it.

use std::path::Path;
use std::sync::Arc;

/// Writes a CA certificate that signed nothing the front serves: trusting
/// only it, a client must refuse the front.
pub fn write_unrelated_ca(path: &Path) {
    std::fs::write(path, Pki::generate("an unrelated CA").ca_pem).unwrap();
}

/// A CA and a server certificate for 127.0.0.1 and localhost, signed by it.
pub(super) struct Pki {
    pub(super) ca_pem: String,
    pub(super) server_der: rustls::pki_types::CertificateDer<'static>,
    pub(super) server_key_der: Vec<u8>,
}

impl Pki {
    pub(super) fn generate(ca_name: &str) -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, ca_name);
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);

        let server_key = KeyPair::generate().unwrap();
        let server_params =
            CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
        let server_cert = server_params.signed_by(&server_key, &issuer).unwrap();
        Pki {
            ca_pem: ca_cert.pem(),
            server_der: server_cert.der().clone(),
            server_key_der: server_key.serialize_der(),
        }
    }

    pub(super) fn server_config(&self) -> rustls::ServerConfig {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(self.server_key_der.clone().into());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![self.server_der.clone()], key)
            .unwrap();
        // gRPC needs h2; the token endpoint client may speak either.
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        config
    }
}

//! Client-side TLS: trust the cluster CA (`ca.pem` from `rampart certs init`), optionally
//! present a client certificate, and turn handshake failures into errors that say what to
//! fix instead of retrying them until the deadline.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

use crate::ClientError;

/// Where the client finds its TLS material.
#[derive(Debug, Clone, Default)]
pub struct TlsOptions {
    /// The cluster CA to verify nodes against.
    pub ca: PathBuf,
    /// A client certificate and key (optional: tokens authenticate API calls).
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

fn read(what: &str, path: &PathBuf) -> Result<Vec<u8>, ClientError> {
    std::fs::read(path).map_err(|e| ClientError::Settings(format!("cannot read {what} {}: {e}", path.display())))
}

impl TlsOptions {
    pub(crate) fn client_config(&self) -> Result<ClientConfig, ClientError> {
        let settings = |m: String| ClientError::Settings(m);
        let mut roots = RootCertStore::empty();
        let ca = read("--cacert", &self.ca)?;
        for cert in CertificateDer::pem_slice_iter(&ca) {
            let cert = cert.map_err(|e| settings(format!("--cacert {}: {e}", self.ca.display())))?;
            roots
                .add(cert)
                .map_err(|e| settings(format!("--cacert {}: {e}", self.ca.display())))?;
        }
        if roots.is_empty() {
            return Err(settings(format!(
                "--cacert {} holds no PEM certificate",
                self.ca.display()
            )));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| settings(e.to_string()))?
            .with_root_certificates(roots);
        let mut config = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                let chain = CertificateDer::pem_slice_iter(&read("--cert", cert)?)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| settings(format!("--cert {}: {e}", cert.display())))?;
                // The key's bytes never appear in an error.
                let key_der = PrivateKeyDer::from_pem_slice(&read("--key", key)?)
                    .map_err(|_| settings(format!("--key {} holds no PEM private key", key.display())))?;
                builder
                    .with_client_auth_cert(chain, key_der)
                    .map_err(|e| settings(format!("--cert and --key do not match: {e}")))?
            }
            (None, None) => builder.with_no_client_auth(),
            _ => return Err(settings("--cert and --key go together".into())),
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }
}

/// An error with its causes, `: `-separated (reqwest's own Display stops at the top).
pub(crate) fn describe(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// What to do about a handshake failure that no retry can fix, if this is one.
pub(crate) fn handshake_hint(described: &str) -> Option<&'static str> {
    if described.contains("invalid peer certificate") {
        Some(
            "the node's certificate is not signed by --cacert or not valid for this address: \
             pass the cluster's ca.pem from `rampart certs init`, and dial an address the node \
             certificate names",
        )
    } else if described.contains("corrupt message") || described.contains("InvalidContentType") {
        Some("the node does not speak TLS: drop --cacert, or start the node with --tls-cert/--tls-key/--tls-ca")
    } else if described.contains("invalid HTTP version parsed") {
        Some("the node speaks TLS: pass --cacert with the cluster's ca.pem (and a token)")
    } else {
        None
    }
}

//! TLS for the node's one port and for its outgoing links, on rustls with the ring provider.
//!
//! Every connection to a TLS node is TLS. The server asks every client for a certificate but
//! does not require one: API clients prove themselves with tokens, while a connection that
//! negotiates the [`PEER_ALPN`] protocol (Raft and pre-vote traffic) or the
//! [`REGION_ALPN`] one (links between regions) is served only if it presented a *node*
//! certificate of the cluster CA — one valid for the name
//! [`NODE_NAME`], which `rampart certs init` puts in node certificates and not in client
//! ones. Nodes verify each other by that name rather than by address, so relays, NAT and
//! readdressed nodes keep working; API clients verify a node by the address they dialled.

use std::io;
use std::path::Path;
use std::sync::Arc;

use rampart_core::config::TlsFiles;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// The name every node certificate is valid for, and what peers check.
pub const NODE_NAME: &str = "rampart-node";
/// ALPN protocol of peer (Raft) connections.
pub const PEER_ALPN: &[u8] = b"rampart-peer";
/// ALPN protocol of region links (a standby's leader reading the primary's log, and
/// every node's region health checks): HTTP/1.1 inside, served only to a node certificate.
pub const REGION_ALPN: &[u8] = b"rampart-region";
const HTTP_ALPN: &[u8] = b"http/1.1";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {setting} {path}: {source}")]
    Read {
        setting: &'static str,
        path: String,
        source: io::Error,
    },
    #[error("{setting} {path} holds no {what} in PEM form")]
    Empty {
        setting: &'static str,
        path: String,
        what: &'static str,
    },
    #[error("unusable TLS material: {0}")]
    Rustls(String),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_pem(setting: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        setting,
        path: path.display().to_string(),
        source,
    })
}

/// Reads every certificate of a PEM file.
pub fn read_certs(setting: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    use rustls::pki_types::pem::PemObject;
    let shown = path.display().to_string();
    let bytes = read_pem(setting, path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Rustls(format!("{setting} {shown}: {e}")))?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            setting,
            path: shown,
            what: "certificate",
        });
    }
    Ok(certs)
}

/// Reads a private key; errors name the file, never its contents.
pub fn read_key(setting: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    use rustls::pki_types::pem::PemObject;
    PrivateKeyDer::from_pem_slice(&read_pem(setting, path)?).map_err(|_| TlsError::Empty {
        setting,
        path: path.display().to_string(),
        what: "private key",
    })
}

pub fn roots(setting: &'static str, ca: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(setting, ca)? {
        roots
            .add(cert)
            .map_err(|e| TlsError::Rustls(format!("{setting} {}: {e}", ca.display())))?;
    }
    Ok(roots)
}

/// Everything a TLS node needs: its acceptor and its two kinds of outgoing connection.
#[derive(Clone)]
pub struct NodeTls {
    pub acceptor: tokio_rustls::TlsAcceptor,
    /// For peer links: presents this node's certificate, expects a node certificate.
    pub peer_connector: tokio_rustls::TlsConnector,
    /// For forwarding API calls to the leader over HTTPS, with this node's certificate.
    pub forward_config: ClientConfig,
    /// For region links and region health checks, with this node's certificate.
    pub region_config: ClientConfig,
}

impl NodeTls {
    pub fn load(files: &TlsFiles) -> Result<NodeTls, TlsError> {
        let certs = read_certs("--tls-cert", &files.cert)?;
        let key = read_key("--tls-key", &files.key)?;
        let roots = Arc::new(roots("--tls-ca", &files.ca)?);
        let rustls_error = |e: rustls::Error| TlsError::Rustls(e.to_string());

        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .allow_unauthenticated()
            .build()
            .map_err(|e| TlsError::Rustls(e.to_string()))?;
        let mut server = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(rustls_error)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs.clone(), key.clone_key())
            .map_err(|e| TlsError::Rustls(format!("--tls-cert and --tls-key do not match: {e}")))?;
        server.alpn_protocols = vec![PEER_ALPN.to_vec(), REGION_ALPN.to_vec(), HTTP_ALPN.to_vec()];

        let client = |alpn: &[u8]| -> Result<ClientConfig, TlsError> {
            let mut config = ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .map_err(rustls_error)?
                .with_root_certificates(roots.clone())
                .with_client_auth_cert(certs.clone(), key.clone_key())
                .map_err(rustls_error)?;
            config.alpn_protocols = vec![alpn.to_vec()];
            Ok(config)
        };
        Ok(NodeTls {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
            peer_connector: tokio_rustls::TlsConnector::from(Arc::new(client(PEER_ALPN)?)),
            forward_config: client(HTTP_ALPN)?,
            region_config: client(REGION_ALPN)?,
        })
    }
}

/// The name peers are verified against.
pub fn node_server_name() -> ServerName<'static> {
    ServerName::try_from(NODE_NAME).expect("a valid DNS name")
}

/// True when `chain` (already verified against the cluster CA by the handshake) starts with
/// a node certificate rather than a client one.
pub fn is_node_certificate(chain: Option<&[CertificateDer<'_>]>) -> bool {
    let Some(leaf) = chain.and_then(|c| c.first()) else {
        return false;
    };
    let Ok(cert) = webpki::EndEntityCert::try_from(leaf) else {
        return false;
    };
    cert.verify_is_valid_for_subject_name(&node_server_name()).is_ok()
}

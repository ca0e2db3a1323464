//! `rampart certs init`: a cluster CA, node certificates and a client certificate, with
//! rcgen. Node certificates carry the name [`crate::tls::NODE_NAME`] (what peers check) and
//! the nodes' addresses (what API clients check); the client certificate carries neither,
//! so it can call the API but can never pose as a peer.
//!
//! Run again on a directory that already holds a CA, it keeps the CA and issues fresh node
//! and client certificates: that is certificate rotation, node by node, with no downtime.

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};

use crate::tls::NODE_NAME;

/// Lifetimes: a CA outlives many rotations; leaf certificates are rotated yearly at most.
const CA_DAYS: i64 = 3650;
const LEAF_DAYS: i64 = 365;

#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    #[error("cannot write {path}: {source}")]
    Write { path: String, source: std::io::Error },
    #[error("cannot read the existing CA in {path}: {message}")]
    ExistingCa { path: String, message: String },
    #[error("invalid --nodes entry {entry:?}: expected ID or ID=HOST[,...], e.g. 1,2,3 or 1=10.0.0.5")]
    BadNode { entry: String },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
}

/// One node to issue a certificate for: its id and the names and addresses it is reached by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSpec {
    pub id: u64,
    pub hosts: Vec<String>,
}

/// Parses `--nodes 1,2,3` or `1=10.0.0.5,2=db2.example`.
pub fn parse_nodes(text: &str) -> Result<Vec<NodeSpec>, CertsError> {
    text.split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(|entry| {
            let bad = || CertsError::BadNode {
                entry: entry.to_string(),
            };
            let (id, host) = match entry.split_once('=') {
                Some((id, host)) => (id, Some(host.trim())),
                None => (entry, None),
            };
            let id: u64 = id.trim().parse().ok().filter(|id| *id > 0).ok_or_else(bad)?;
            // A HOST:PORT is accepted for convenience; the port is not part of a certificate.
            let host = host.map(|h| match h.rsplit_once(':') {
                Some((name, port)) if port.parse::<u16>().is_ok() && !name.contains(':') => name.to_string(),
                _ => h.to_string(),
            });
            if host.as_deref() == Some("") {
                return Err(bad());
            }
            Ok(NodeSpec {
                id,
                hosts: host.into_iter().collect(),
            })
        })
        .collect()
}

/// What `init` wrote.
#[derive(Debug)]
pub struct Issued {
    pub dir: PathBuf,
    pub reused_ca: bool,
    pub files: Vec<PathBuf>,
}

/// Creates (or reuses) the CA in `dir` and issues a certificate for every node, valid for
/// its hosts plus `extra_hosts` and loopback, and one client certificate.
pub fn init(dir: &Path, nodes: &[NodeSpec], extra_hosts: &[String]) -> Result<Issued, CertsError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| write_error(dir, source))?;
    let ca_key_path = dir.join("ca-key.pem");
    let ca_path = dir.join("ca.pem");
    let reused_ca = ca_key_path.exists();
    let ca_key = if reused_ca {
        let text = fs::read_to_string(&ca_key_path).map_err(|e| CertsError::ExistingCa {
            path: ca_key_path.display().to_string(),
            message: e.to_string(),
        })?;
        KeyPair::from_pem(&text).map_err(|e| CertsError::ExistingCa {
            path: ca_key_path.display().to_string(),
            message: e.to_string(),
        })?
    } else {
        KeyPair::generate()?
    };
    // The same subject and key give the same issuer: certificates signed by a rebuilt CA
    // chain to the original ca.pem, which stays untouched on reuse.
    let ca = ca_params().self_signed(&ca_key)?;
    let mut files = Vec::new();
    if !reused_ca {
        write_file(&ca_key_path, ca_key.serialize_pem().as_bytes(), true)?;
        write_file(&ca_path, ca.pem().as_bytes(), false)?;
        files.extend([ca_path, ca_key_path]);
    }

    for node in nodes {
        let mut hosts = vec![
            NODE_NAME.to_string(),
            "localhost".to_string(),
            "127.0.0.1".to_string(),
            "::1".to_string(),
        ];
        for host in node.hosts.iter().chain(extra_hosts) {
            if !hosts.contains(host) {
                hosts.push(host.clone());
            }
        }
        let params = leaf_params(&format!("rampart node {}", node.id), &hosts, true)?;
        files.extend(issue(dir, &format!("node-{}", node.id), params, &ca, &ca_key)?);
    }
    let client = leaf_params("rampart client", &["rampart-client".to_string()], false)?;
    files.extend(issue(dir, "client", client, &ca, &ca_key)?);
    Ok(Issued {
        dir: dir.to_path_buf(),
        reused_ca,
        files,
    })
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, "rampart cluster CA");
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(&mut params, CA_DAYS);
    params
}

fn leaf_params(common_name: &str, hosts: &[String], server: bool) -> Result<CertificateParams, CertsError> {
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, common_name);
    params.distinguished_name = name;
    params.subject_alt_names = hosts
        .iter()
        .map(|h| match h.parse::<IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => Ok(SanType::DnsName(h.clone().try_into()?)),
        })
        .collect::<Result<_, rcgen::Error>>()?;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = if server {
        vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth]
    } else {
        vec![ExtendedKeyUsagePurpose::ClientAuth]
    };
    set_validity(&mut params, LEAF_DAYS);
    Ok(params)
}

fn issue(
    dir: &Path,
    stem: &str,
    params: CertificateParams,
    ca: &Certificate,
    ca_key: &KeyPair,
) -> Result<Vec<PathBuf>, CertsError> {
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, ca, ca_key)?;
    let cert_path = dir.join(format!("{stem}.pem"));
    let key_path = dir.join(format!("{stem}-key.pem"));
    write_file(&key_path, key.serialize_pem().as_bytes(), true)?;
    write_file(&cert_path, cert.pem().as_bytes(), false)?;
    Ok(vec![cert_path, key_path])
}

/// Valid from a day ago (clock skew between machines) to `days` from now.
fn set_validity(params: &mut CertificateParams, days: i64) {
    let today = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 86_400) as i64;
    params.not_before = date(today - 1);
    params.not_after = date(today + days);
}

/// The civil date `days_since_epoch` days after 1970-01-01, as rcgen wants it.
fn date(days_since_epoch: i64) -> time::OffsetDateTime {
    // Civil date from a day count (Howard Hinnant's algorithm).
    let z = days_since_epoch + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let year = (yoe + era * 400 + i64::from(month <= 2)) as i32;
    rcgen::date_time_ymd(year, month, day)
}

fn write_error(path: &Path, source: std::io::Error) -> CertsError {
    CertsError::Write {
        path: path.display().to_string(),
        source,
    }
}

/// Writes a file; secrets are created owner-only (0600) before any byte lands in them.
pub fn write_file(path: &Path, bytes: &[u8], secret: bool) -> Result<(), CertsError> {
    let mode = if secret { 0o600 } else { 0o644 };
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(|source| write_error(path, source))?;
    // An existing file keeps its old mode on open: set it explicitly.
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(|source| write_error(path, source))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|source| write_error(path, source))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_parse_with_or_without_hosts() {
        assert_eq!(
            parse_nodes("1,2=10.0.0.2:7002,3=db3.example").unwrap(),
            vec![
                NodeSpec { id: 1, hosts: vec![] },
                NodeSpec {
                    id: 2,
                    hosts: vec!["10.0.0.2".into()]
                },
                NodeSpec {
                    id: 3,
                    hosts: vec!["db3.example".into()]
                },
            ]
        );
        assert!(parse_nodes("0").is_err());
        assert!(parse_nodes("x=1").is_err());
    }

    #[test]
    fn civil_dates_are_right() {
        assert_eq!(date(0), rcgen::date_time_ymd(1970, 1, 1));
        assert_eq!(date(20_779), rcgen::date_time_ymd(2026, 11, 22));
    }

    #[test]
    fn init_writes_owner_only_keys_and_reuses_the_ca() {
        let dir = tempfile::tempdir().unwrap();
        let nodes = parse_nodes("1,2").unwrap();
        let first = init(dir.path(), &nodes, &[]).unwrap();
        assert!(!first.reused_ca);
        for file in &first.files {
            let mode = fs::metadata(file).unwrap().permissions().mode() & 0o777;
            let is_key = file.to_string_lossy().ends_with("-key.pem");
            assert_eq!(mode, if is_key { 0o600 } else { 0o644 }, "{}", file.display());
        }
        let ca = fs::read(dir.path().join("ca.pem")).unwrap();
        let again = init(dir.path(), &nodes, &[]).unwrap();
        assert!(again.reused_ca);
        assert_eq!(
            fs::read(dir.path().join("ca.pem")).unwrap(),
            ca,
            "rotation keeps the CA"
        );
    }
}

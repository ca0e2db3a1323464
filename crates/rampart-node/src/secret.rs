//! Secrets and digests in the forms the node stores and shows: fresh random secrets (API
//! tokens, backup keys), the SHA-256 that stands for a token's secret in the replicated
//! state, and lowercase hex.

use sha2::{Digest, Sha256};

/// SHA-256 of a token's secret: what the replicated state keeps.
pub fn hash_secret(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// A fresh secret: 256 random bits, hex.
pub fn new_secret() -> String {
    let bytes: [u8; 32] = rand::random();
    hex(&bytes)
}

/// Bytes as lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

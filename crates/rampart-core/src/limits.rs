//! Size limits on everything a client can send (TIGER_STYLE: put a limit on everything).
//! The node enforces them before anything reaches the Raft log, so an oversized request is
//! refused with a clear error and never half-applied.

use serde::{Deserialize, Serialize};

/// The largest `--value-bytes-max` a node accepts: no stored value is ever longer (a state
/// is decoded as it streams with a buffer of this size).
pub const VALUE_BYTES_CEILING: usize = 64 << 20;

/// Request limits a node enforces; all configurable, with etcd-like defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    pub key_bytes_max: usize,
    pub value_bytes_max: usize,
    pub request_body_bytes_max: usize,
    pub watchers_max: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            key_bytes_max: 1024,
            value_bytes_max: 1024 * 1024,
            request_body_bytes_max: 2 * 1024 * 1024,
            watchers_max: 1024,
        }
    }
}

/// A request that breaks a [`Limits`] bound; maps to HTTP 400 or 413.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    #[error("key is empty: keys must have at least one byte")]
    EmptyKey,
    #[error("key is {len} bytes, over the {max}-byte limit (--key-bytes-max)")]
    KeyTooLong { len: usize, max: usize },
    #[error("value is {len} bytes, over the {max}-byte limit (--value-bytes-max)")]
    ValueTooLong { len: usize, max: usize },
}

impl Limits {
    pub fn check_key(&self, key: &str) -> Result<(), LimitError> {
        if key.is_empty() {
            return Err(LimitError::EmptyKey);
        }
        if key.len() > self.key_bytes_max {
            return Err(LimitError::KeyTooLong {
                len: key.len(),
                max: self.key_bytes_max,
            });
        }
        Ok(())
    }

    pub fn check_value(&self, value: &str) -> Result<(), LimitError> {
        if value.len() > self.value_bytes_max {
            return Err(LimitError::ValueTooLong {
                len: value.len(),
                max: self.value_bytes_max,
            });
        }
        Ok(())
    }
}

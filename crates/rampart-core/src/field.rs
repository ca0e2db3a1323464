//! A setting that cannot be used, named by its path (`checks[0].interval`,
//! `postgres.bin_dir`), and the checks every schema shares: bounded numbers and durations.

use crate::duration::parse_duration;

/// A field that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field} {value:?}: {allowed}")]
pub struct FieldError {
    /// Path of the field, e.g. `checks[0].interval`.
    pub field: String,
    pub value: String,
    pub allowed: String,
}

pub(crate) fn field_error(
    field: impl Into<String>,
    value: impl Into<String>,
    allowed: impl Into<String>,
) -> FieldError {
    FieldError {
        field: field.into(),
        value: value.into(),
        allowed: allowed.into(),
    }
}

/// A whole-number setting within `allowed`, refused as "LOW to HIGH".
pub(crate) fn number_in<T>(field: &str, value: T, allowed: std::ops::RangeInclusive<T>) -> Result<T, FieldError>
where
    T: PartialOrd + std::fmt::Display,
{
    if allowed.contains(&value) {
        Ok(value)
    } else {
        Err(field_error(
            field,
            value.to_string(),
            format!("{} to {}", allowed.start(), allowed.end()),
        ))
    }
}

/// A duration setting in ms: `default_ms` when absent, else within `min_ms..=max_ms`.
pub(crate) fn duration_ms(
    field: &str,
    text: Option<&str>,
    default_ms: u64,
    min_ms: u64,
    max_ms: u64,
) -> Result<u64, FieldError> {
    let Some(text) = text else { return Ok(default_ms) };
    let allowed = || format!("a duration from {min_ms}ms to {max_ms}ms, written like 500ms, 5s or 1m");
    let ms = parse_duration(text)
        .map_err(|_| field_error(field, text, allowed()))?
        .as_millis() as u64;
    if (min_ms..=max_ms).contains(&ms) {
        Ok(ms)
    } else {
        Err(field_error(field, text, allowed()))
    }
}

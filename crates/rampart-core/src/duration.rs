//! Human durations as DESIGN.md writes them: `100ms`, `5s`, `1m`, `2h` (and `7d` for retention).
//!
//! Config files, flags and environment variables all go through [`parse_duration`], so a
//! typo is reported the same way wherever it was written.

use std::time::Duration;

/// Why a duration string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration {input:?}: expected a whole number followed by ms, s, m, h or d (e.g. 250ms, 5s, 1m)")]
pub struct DurationError {
    pub input: String,
}

/// Parses `250ms`, `5s`, `1m`, `2h` or `7d`. A bare number is refused: the unit is never guessed.
pub fn parse_duration(input: &str) -> Result<Duration, DurationError> {
    let err = || DurationError {
        input: input.to_string(),
    };
    let text = input.trim();
    let digits_end = text.find(|c: char| !c.is_ascii_digit()).ok_or_else(err)?;
    if digits_end == 0 {
        return Err(err());
    }
    let amount: u64 = text[..digits_end].parse().map_err(|_| err())?;
    let millis_per_unit = match &text[digits_end..] {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(err()),
    };
    let millis = amount.checked_mul(millis_per_unit).ok_or_else(err)?;
    Ok(Duration::from_millis(millis))
}

/// Writes a duration back in the shortest exact unit, so `parse_duration(format_duration(d)) == d`
/// for whole milliseconds.
pub fn format_duration(duration: Duration) -> String {
    let millis = duration.as_millis();
    if millis == 0 {
        return "0ms".to_string();
    }
    for (unit, size) in [("h", 3_600_000u128), ("m", 60_000), ("s", 1_000)] {
        if millis.is_multiple_of(size) {
            return format!("{}{unit}", millis / size);
        }
    }
    format!("{millis}ms")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_unit() {
        assert_eq!(parse_duration("100ms").unwrap(), Duration::from_millis(100));
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("1m").unwrap(), Duration::from_secs(60));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
    }

    #[test]
    fn refuses_missing_or_unknown_units() {
        for bad in ["100", "ms", "", "1.5s", "10 parsecs", "-1s", "5S"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn format_round_trips() {
        for millis in [0u64, 1, 250, 1000, 1500, 60_000, 90_000, 3_600_000] {
            let d = Duration::from_millis(millis);
            assert_eq!(parse_duration(&format_duration(d)).unwrap(), d);
        }
    }
}

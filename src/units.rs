//! Durations as people write them in settings (`250ms`, `30s`, `5m`, `2h`, `7d`): shared by the
//! configuration and the Gold window spec, so neither depends on the other.

use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("expected a duration like 30s, got {0:?}")]
    NotANumber(String),
    #[error("unknown duration unit {0:?} (use ms, s, m, h or d)")]
    UnknownUnit(String),
    #[error("duration {0:?} is too large")]
    TooLarge(String),
}

impl From<DurationError> for String {
    fn from(e: DurationError) -> Self {
        e.to_string()
    }
}

/// Parses `250ms`, `30s`, `5m`, `2h`, `7d` (a bare number means seconds).
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| DurationError::NotANumber(text.to_string()))?;
    let millis = match unit.trim() {
        "ms" => Some(number),
        "" | "s" => number.checked_mul(1_000),
        "m" => number.checked_mul(60_000),
        "h" => number.checked_mul(3_600_000),
        "d" => number.checked_mul(86_400_000),
        other => return Err(DurationError::UnknownUnit(other.to_string())),
    };
    millis
        .map(Duration::from_millis)
        .ok_or_else(|| DurationError::TooLarge(text.to_string()))
}

//! Gold settings (present when `STRATA_GOLD_KEY` is set).

use std::time::Duration;

use super::{invalid, parse_duration, Config, ConfigError};

/// Gold settings (present when `STRATA_GOLD_KEY` is set).
#[derive(Debug, Clone)]
pub struct GoldConfig {
    pub keys: Vec<String>,
    pub window: crate::gold::core::window::WindowSpec,
    pub aggregates: Vec<crate::gold::core::aggregate::Aggregate>,
    /// The Silver table it reads (`None`: the first).
    pub table: Option<String>,
    pub name: Option<String>,
    pub partials_topic: String,
    pub partitions: i32,
    /// Replication factor of a partials topic Strata creates (`None`: the cluster's default).
    pub partials_replication: Option<i32>,
    /// `retention.ms` of a partials topic Strata creates.
    pub partials_retention: Duration,
    pub watermark_delay: Duration,
    /// How far ahead of its Kafka record's timestamp an event may move the watermark.
    pub max_event_time_skew: Duration,
    pub allowed_lateness: Duration,
    pub idle_timeout: Duration,
    pub salting: Option<crate::gold::core::epoch::Salting>,
    /// Bytes of state stage 2 may hold on a replica before it stops taking partials.
    pub state_max_bytes: usize,
}

impl Config {
    pub(super) fn gold(
        get: &dyn Fn(&'static str) -> String,
    ) -> Result<Option<GoldConfig>, ConfigError> {
        let key_text = get("STRATA_GOLD_KEY");
        if key_text.is_empty() {
            return Ok(None);
        }
        let keys: Vec<String> = key_text
            .split(',')
            .map(|k| k.trim().to_string())
            .filter(|k| !k.is_empty())
            .collect();
        if keys.is_empty() {
            return Err(invalid("STRATA_GOLD_KEY", &key_text, "no field named"));
        }
        let text = |var: &'static str| (var, get(var));
        let (var, value) = text("STRATA_GOLD_WINDOW");
        let window = value
            .parse()
            .map_err(|e: crate::gold::core::window::WindowError| invalid(var, &value, e))?;
        let (var, value) = text("STRATA_GOLD_AGGREGATES");
        let aggregates = crate::gold::core::aggregate::parse_aggregates(&value)
            .map_err(|e| invalid(var, &value, e))?;
        let span = |var: &'static str, zero_ok: bool| -> Result<Duration, ConfigError> {
            let value = get(var);
            match parse_duration(&value) {
                Ok(d) if zero_ok || !d.is_zero() => Ok(d),
                Ok(_) => Err(invalid(var, &value, "must be greater than zero")),
                Err(reason) => Err(invalid(var, &value, reason)),
            }
        };
        let number = |var: &'static str| -> Result<u64, ConfigError> {
            let value = get(var);
            value
                .parse::<u64>()
                .map_err(|_| invalid(var, &value, "expected a whole number"))
        };
        let (var, value) = text("STRATA_HOT_KEY_SHARE");
        let share: f64 = match value.parse::<f64>() {
            Ok(s) if s > 0.0 && s <= 1.0 => s,
            _ => {
                return Err(invalid(
                    var,
                    &value,
                    "expected a share above 0 and at most 1",
                ))
            }
        };
        let salts = number("STRATA_HOT_KEY_SALTS")?;
        let partitions = number("STRATA_GOLD_PARTITIONS")?;
        if !(1..=1024).contains(&partitions) {
            return Err(invalid(
                "STRATA_GOLD_PARTITIONS",
                &partitions.to_string(),
                "expected 1 to 1024",
            ));
        }
        if salts > 1 && salts >= partitions {
            return Err(invalid(
                "STRATA_HOT_KEY_SALTS",
                &salts.to_string(),
                format!("must be below STRATA_GOLD_PARTITIONS ({partitions}): each sub-key needs a partition other than the key's own"),
            ));
        }
        let salting = (salts > 1).then(|| crate::gold::core::epoch::Salting {
            share,
            min_events: 0,
            salts: salts.min(u64::from(u16::MAX)) as u16,
        });
        let salting = match salting {
            Some(mut s) => {
                s.min_events = number("STRATA_HOT_KEY_MIN_EVENTS")?;
                Some(s)
            }
            None => None,
        };
        let state_max_bytes = match number("STRATA_GOLD_STATE_MAX_BYTES")? {
            0 => {
                return Err(invalid(
                    "STRATA_GOLD_STATE_MAX_BYTES",
                    "0",
                    "must be greater than zero",
                ))
            }
            n => usize::try_from(n).unwrap_or(usize::MAX),
        };
        let optional = |var: &'static str| Some(get(var)).filter(|v| !v.is_empty());
        let partials_topic = optional("STRATA_GOLD_PARTIALS_TOPIC")
            .unwrap_or_else(|| format!("{}.partials", get("STRATA_GROUP_ID")));
        let (var, value) = text("STRATA_GOLD_PARTIALS_REPLICATION");
        let partials_replication = if value.eq_ignore_ascii_case("cluster") {
            None
        } else {
            match value.parse::<i32>() {
                Ok(n) if n > 0 => Some(n),
                _ => {
                    return Err(invalid(
                        var,
                        &value,
                        "expected `cluster` or a positive integer",
                    ))
                }
            }
        };
        Ok(Some(GoldConfig {
            keys,
            window,
            aggregates,
            table: optional("STRATA_GOLD_TABLE"),
            name: optional("STRATA_GOLD_NAME"),
            partials_topic,
            partitions: partitions as i32,
            partials_replication,
            partials_retention: span("STRATA_GOLD_PARTIALS_RETENTION", false)?,
            watermark_delay: span("STRATA_WATERMARK_DELAY", true)?,
            max_event_time_skew: span("STRATA_MAX_EVENT_TIME_SKEW", true)?,
            allowed_lateness: span("STRATA_ALLOWED_LATENESS", true)?,
            idle_timeout: span("STRATA_IDLE_TIMEOUT", false)?,
            salting,
            state_max_bytes,
        }))
    }
}

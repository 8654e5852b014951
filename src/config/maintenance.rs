//! Table maintenance settings: checkpoints, log retention, vacuum, and how often they run.

use std::collections::HashMap;
use std::time::Duration;

use super::{invalid, parse_duration, value_of, Compression, ConfigError};
use crate::lake::compaction::CompactionSettings;
use crate::lake::maintenance::{retention_floor, Retention};

#[derive(Debug, Clone)]
pub struct MaintenanceConfig {
    /// `None`: each table's `delta.checkpointInterval`.
    pub checkpoint_interval: Option<u64>,
    pub interval: Duration,
    pub retention: Retention,
}

impl MaintenanceConfig {
    pub(super) fn from_vars(
        vars: &HashMap<String, String>,
        flush_interval: Duration,
        commit_retries: usize,
        compression: Compression,
    ) -> Result<Self, ConfigError> {
        let duration = |var: &'static str| -> Result<Option<Duration>, ConfigError> {
            let value = value_of(vars, var);
            if value.is_empty() {
                return Ok(None);
            }
            match parse_duration(&value) {
                Ok(d) if !d.is_zero() => Ok(Some(d)),
                Ok(_) => Err(invalid(var, &value, "must be greater than zero")),
                Err(reason) => Err(invalid(var, &value, reason)),
            }
        };
        let checkpoint_text = value_of(vars, "STRATA_CHECKPOINT_INTERVAL");
        let checkpoint_interval = if checkpoint_text.is_empty() {
            None
        } else {
            match checkpoint_text.parse::<u64>() {
                Ok(n) if n > 0 => Some(n),
                _ => {
                    return Err(invalid(
                        "STRATA_CHECKPOINT_INTERVAL",
                        &checkpoint_text,
                        "expected a positive number of commits",
                    ))
                }
            }
        };
        let target_text = value_of(vars, "STRATA_COMPACT_TARGET_BYTES");
        let target_bytes = match target_text.parse::<u64>() {
            Ok(n) if n >= 1024 => n,
            _ => {
                return Err(invalid(
                    "STRATA_COMPACT_TARGET_BYTES",
                    &target_text,
                    "expected a number of bytes of at least 1024",
                ))
            }
        };
        let files = duration("STRATA_VACUUM_RETENTION")?.unwrap_or(Duration::from_secs(7 * 86_400));
        let floor = retention_floor(flush_interval, commit_retries);
        if files < floor {
            return Err(invalid(
                "STRATA_VACUUM_RETENTION",
                &value_of(vars, "STRATA_VACUUM_RETENTION"),
                format!(
                    "an upload may wait up to {floor:?} for its commit (STRATA_FLUSH_INTERVAL + 4 s per STRATA_COMMIT_RETRIES + 30 s): a shorter retention could delete the files of a commit still to come"
                ),
            ));
        }
        Ok(Self {
            checkpoint_interval,
            interval: duration("STRATA_MAINTENANCE_INTERVAL")?.unwrap_or(Duration::from_secs(300)),
            retention: Retention {
                gold_app_prefix: Some(format!("strata/{}-gold", value_of(vars, "STRATA_GROUP_ID"))),
                log: duration("STRATA_LOG_RETENTION")?,
                files,
                compaction: CompactionSettings {
                    target_bytes,
                    quiet_for: duration("STRATA_COMPACT_QUIET_FOR")?
                        .unwrap_or(Duration::from_secs(3_600)),
                    compression,
                },
            },
        })
    }
}

//! Table maintenance settings: checkpoints, log retention, vacuum, compaction, and how often they
//! run. The types live here, so `lake` reads its settings from `config` and never the reverse.

use std::collections::HashMap;
use std::time::Duration;

use super::{invalid, parse_duration, value_of, Compression, ConfigError};

#[derive(Debug, Clone)]
pub struct MaintenanceConfig {
    /// `None`: each table's `delta.checkpointInterval` (`STRATA_CHECKPOINT_INTERVAL` sets one by
    /// default).
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
        delta_encoding: bool,
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
                    delta_encoding,
                },
            },
        })
    }
}

/// What table maintenance keeps, and for how long.
#[derive(Debug, Clone)]
pub struct Retention {
    /// `strata/<group>-gold`: the `txn` prefix of Gold stage 2, to find the state it committed.
    pub gold_app_prefix: Option<String>,
    /// `None`: the table's `delta.logRetentionDuration`.
    pub log: Option<Duration>,
    pub files: Duration,
    /// Compaction of quiet partitions, run before vacuum.
    pub compaction: CompactionSettings,
}

/// Which partitions compaction packs, and how.
#[derive(Debug, Clone)]
pub struct CompactionSettings {
    /// Files are packed up to about this many bytes.
    pub target_bytes: u64,
    /// A partition is compacted once its newest file is this old.
    pub quiet_for: Duration,
    pub compression: Compression,
    /// `STRATA_PARQUET_DELTA_ENCODING`, as for the files a flush writes.
    pub delta_encoding: bool,
}

/// The shortest vacuum retention that is safe: files are uploaded before their commit, and a
/// commit may lose `commit_retries` races (each waits up to 4 s with jitter) after a flush that
/// started up to one flush interval after the first row; 30 s cover the write itself.
pub fn retention_floor(flush_interval: Duration, commit_retries: usize) -> Duration {
    flush_interval + Duration::from_secs(4 * commit_retries as u64) + Duration::from_secs(30)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_floor_follows_the_flush_interval_and_the_commit_retries() {
        // A 300 ms flush with 5 commit retries can use a retention of a minute.
        let floor = retention_floor(Duration::from_millis(300), 5);
        assert!(floor < Duration::from_secs(60), "{floor:?}");
        // The defaults (30 s, 50 retries) need a few minutes: the default of 7 days is far above.
        let floor = retention_floor(Duration::from_secs(30), 50);
        assert!(
            floor > Duration::from_secs(200) && floor < Duration::from_secs(300),
            "{floor:?}"
        );
    }
}

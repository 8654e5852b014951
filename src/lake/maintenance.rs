//! Keeping a table healthy for months. Checkpoints are written by the committer itself (every
//! `STRATA_CHECKPOINT_INTERVAL` commits); this module is the rest, run on a timer by one replica
//! (and by `strata maintain`):
//!
//! - **compaction** of quiet hour partitions (see `compaction`);
//! - **log cleanup**: commit files and checkpoints older than the log retention (the table's
//!   `delta.logRetentionDuration`, 30 days unless set, or `STRATA_LOG_RETENTION`), up to the newest
//!   checkpoint old enough, never after every commit (it lists the whole `_delta_log`);
//! - **vacuum**: data files no version within `STRATA_VACUUM_RETENTION` references (uploads of
//!   refused, fenced or crashed commits, files replaced by later ones);
//! - **Gold state files** under `_strata_state/`: per partition, the files older than the
//!   retention whose offset is below the one stage 2 committed (a restart needs that one).
//!
//! `txn` actions never expire here: a table that sets `delta.setTransactionRetentionDuration`
//! would make a quiet partition replay from its start, so Strata refuses to run on one.

use std::collections::BTreeMap;
use std::time::Duration;

use deltalake::operations::vacuum::VacuumMode;
use deltalake::table::config::TablePropertiesExt;
use deltalake::{DeltaTable, DeltaTableError, ObjectStore, Path};
use futures::TryStreamExt;
use object_store::ObjectStoreExt;
use url::Url;

use crate::config::Retention;

/// The table property that would let `txn` actions expire.
pub const TXN_RETENTION_PROPERTY: &str = "delta.setTransactionRetentionDuration";

/// Where Gold stage 2 keeps its merge state beside the Gold table.
pub const STATE_PREFIX: &str = "_strata_state";

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    pub version: i64,
    /// Files the latest version references.
    pub active_files: usize,
    /// Commits since the newest checkpoint (all of them when there is none).
    pub since_checkpoint: i64,
    pub compacted: super::compaction::Compacted,
    pub log_files_removed: usize,
    pub files_vacuumed: usize,
    pub state_files_removed: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum MaintenanceError {
    #[error("delta table: {0}")]
    Delta(#[from] DeltaTableError),
    #[error("object store: {0}")]
    Store(#[from] deltalake::ObjectStoreError),
    #[error(
        "the table sets {TXN_RETENTION_PROPERTY}: Strata's progress (txn actions) of quiet partitions would expire and replay from their start; unset it"
    )]
    TxnRetention,
}

/// Refuses a table whose `txn` actions may expire.
pub fn check_txn_retention(table: &DeltaTable) -> Result<(), MaintenanceError> {
    let snapshot = table.snapshot()?;
    if snapshot
        .metadata()
        .configuration()
        .contains_key(TXN_RETENTION_PROPERTY)
    {
        return Err(MaintenanceError::TxnRetention);
    }
    Ok(())
}

/// One maintenance pass over the table at `url`.
pub async fn maintain(url: Url, retention: &Retention) -> Result<Report, MaintenanceError> {
    let mut table = DeltaTable::try_from_url(url).await?;
    check_txn_retention(&table)?;
    let compacted = super::compaction::compact(&table, &retention.compaction).await?;
    if compacted.files_removed > 0 {
        table.update_incremental(None).await?;
    }
    let snapshot = table.snapshot()?;
    let version = snapshot.version();
    let log_retention = retention
        .log
        .unwrap_or_else(|| snapshot.table_config().log_retention_duration());
    let cutoff = chrono::Utc::now().timestamp_millis()
        - i64::try_from(log_retention.as_millis()).unwrap_or(i64::MAX);
    let log_files_removed = deltalake::checkpoints::cleanup_expired_logs_for(
        version,
        table.log_store().as_ref(),
        cutoff,
        None,
    )
    .await?;
    let store = table.object_store();
    let active_files = snapshot.log_data().into_iter().count();
    let checkpoint = last_checkpoint(store.as_ref()).await;
    let since_checkpoint = i64::try_from(version).unwrap_or(i64::MAX) - checkpoint.unwrap_or(-1);
    let files = chrono::Duration::from_std(retention.files).unwrap_or(chrono::Duration::MAX);
    // Vacuum judges files against the snapshot it is given: it must be the newest, or a file
    // committed while this pass compacted or cleaned up would look unreferenced.
    table.update_incremental(None).await?;
    let state_progress = state_progress(&table, retention.gold_app_prefix.as_deref()).await?;
    let (_, vacuumed) = table
        .vacuum()
        .with_retention_period(files)
        .with_enforce_retention_duration(false)
        .with_mode(VacuumMode::Full)
        .await?;
    let state_files_removed = sweep_state(store.as_ref(), retention.files, &state_progress).await?;
    Ok(Report {
        version: i64::try_from(version).unwrap_or(i64::MAX),
        active_files,
        since_checkpoint,
        compacted,
        log_files_removed,
        files_vacuumed: vacuumed.files_deleted.len(),
        state_files_removed,
    })
}

/// The version in `_delta_log/_last_checkpoint`, if there is one.
async fn last_checkpoint(store: &dyn ObjectStore) -> Option<i64> {
    let bytes = store
        .get(&Path::from("_delta_log/_last_checkpoint"))
        .await
        .ok()?
        .bytes()
        .await
        .ok()?;
    serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()?
        .get("version")?
        .as_i64()
}

/// Per state folder (`_strata_state/<topic>/<partition>`), the offset Gold stage 2 committed for
/// it (its `txn`), read from the table; `None` when unknown (then nothing there is deleted).
async fn state_progress(
    table: &DeltaTable,
    gold_app_prefix: Option<&str>,
) -> Result<BTreeMap<String, Option<i64>>, MaintenanceError> {
    let store = table.object_store();
    let files: Vec<_> = store
        .list(Some(&Path::from(STATE_PREFIX)))
        .try_collect()
        .await?;
    let mut out = BTreeMap::new();
    let snapshot = table.snapshot()?;
    for file in files {
        let name = file.location.to_string();
        let Some((folder, _)) = name.rsplit_once('/') else {
            continue;
        };
        if out.contains_key(folder) {
            continue;
        }
        // `_strata_state/<topic>/<partition>` → `<prefix>/<topic>/<partition>`.
        let committed = match (gold_app_prefix, folder.strip_prefix(STATE_PREFIX)) {
            (Some(prefix), Some(rest)) => {
                snapshot
                    .transaction_version(table.log_store().as_ref(), format!("{prefix}{rest}"))
                    .await?
            }
            _ => None,
        };
        out.insert(folder.to_string(), committed);
    }
    Ok(out)
}

/// Deletes Gold state files older than `retention` whose offset is below the state stage 2
/// committed for their partition: the committed one (and any newer, not committed yet) stays,
/// and a partition whose progress is unknown keeps everything.
async fn sweep_state(
    store: &dyn ObjectStore,
    retention: Duration,
    progress: &BTreeMap<String, Option<i64>>,
) -> Result<usize, MaintenanceError> {
    let prefix = Path::from(STATE_PREFIX);
    let files: Vec<_> = store.list(Some(&prefix)).try_collect().await?;
    let cutoff =
        chrono::Utc::now() - chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::MAX);
    let mut removed = 0;
    for file in files {
        let name = file.location.to_string();
        let Some((folder, base)) = name.rsplit_once('/') else {
            continue;
        };
        // Names are the zero-padded offset the state was stored at.
        let offset = base
            .strip_suffix(".bin")
            .and_then(|o| o.parse::<i64>().ok());
        let superseded = match (progress.get(folder).copied().flatten(), offset) {
            (Some(committed), Some(offset)) => offset < committed,
            _ => false,
        };
        if superseded && file.last_modified < cutoff {
            match store.delete(&file.location).await {
                Ok(()) | Err(deltalake::ObjectStoreError::NotFound { .. }) => removed += 1,
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(removed)
}

/// The tables under a lake: every folder of `<lake>/silver/` and `<lake>/gold/` holding a log.
pub async fn tables(lake_url: &str) -> Result<Vec<(String, Url)>, MaintenanceError> {
    let mut out = Vec::new();
    for layer in ["silver", "gold"] {
        let root = super::table_url(lake_url, layer, "")?;
        let store = deltalake::DeltaTableBuilder::from_url(root.clone())?
            .build_storage()?
            .object_store(None);
        let listed = match store.list_with_delimiter(None).await {
            Ok(listed) => listed,
            Err(deltalake::ObjectStoreError::NotFound { .. }) => continue,
            Err(e) => return Err(e.into()),
        };
        for folder in listed.common_prefixes {
            let Some(name) = folder.filename().map(str::to_string) else {
                continue;
            };
            let log = folder.clone().join("_delta_log");
            let has_log = store
                .list(Some(&log))
                .try_next()
                .await
                .ok()
                .flatten()
                .is_some();
            if has_log {
                out.push((
                    format!("{layer}/{name}"),
                    super::table_url(lake_url, layer, &name)?,
                ));
            }
        }
    }
    Ok(out)
}

//! Compaction that keeps exactly-once: hour partitions that received no new file for a while and
//! hold several small files are bin-packed into files of about the target size.
//!
//! A compaction is committed as `remove` + `add` actions, all with `dataChange = false`, and no
//! `txn`: the rows, their values and every partition's progress stay exactly as they were, and
//! streaming readers see no new data. It lands only if the table still holds every file it
//! removes as planned (same path, size and time, no deletion vector): when another commit came
//! first, Strata reads it and tries again, or gives way when that commit removed or changed one of
//! the files or changed the table's metadata or protocol (the loser's new files stay unreferenced
//! until vacuum). So two compactions of the same files never both land: delta-rs 1.1's own
//! conflict checker lets a second `remove` without data change through, and both compactions'
//! rows would be in the table. Writers never lose anything to a compaction: their commits are
//! blind appends. Files with deletion vectors are left alone.
//! Row order within an hour is not kept.

use std::collections::{BTreeMap, HashMap};

use deltalake::arrow::array::RecordBatch;
use deltalake::arrow::compute::concat_batches;
use deltalake::arrow::datatypes::{Field, Schema, SchemaRef};
use deltalake::kernel::engine::arrow_conversion::TryIntoArrow;
use deltalake::kernel::transaction::CommitBuilder;
use deltalake::kernel::Action;
use deltalake::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use deltalake::protocol::DeltaOperation;
use deltalake::DeltaTable;
use object_store::ObjectStoreExt;

use super::PARTITION_COLUMNS;
use crate::config::CompactionSettings;

/// Commits a compaction tries before it gives way to a table that keeps moving.
const COMMIT_ATTEMPTS: usize = 15;

/// What a compaction that gave way did: nothing.
const GAVE_WAY: Compacted = Compacted {
    partitions: 0,
    files_removed: 0,
    files_added: 0,
    bytes_removed: 0,
    gave_way: 1,
};

/// What one compaction did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Compacted {
    pub partitions: usize,
    pub files_removed: usize,
    pub files_added: usize,
    pub bytes_removed: u64,
    /// 1 when a compaction was planned and gave way (another commit removed one of its files,
    /// changed the metadata, or kept coming first), or its commit failed: its file waits for
    /// vacuum. 0 otherwise.
    pub gave_way: usize,
}

/// A partition's values (`event_date`, `event_hour`), sorted.
type PartitionKey = Vec<(String, Option<String>)>;

/// A file of the snapshot, as far as compaction is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Candidate {
    path: String,
    size: i64,
    modified: i64,
}

fn candidate(file: &deltalake::kernel::LogicalFileView) -> Candidate {
    Candidate {
        path: file.path().to_string(),
        size: file.size(),
        modified: file.modification_time(),
    }
}

/// The active files of `snapshot` without a deletion vector, by path.
fn candidates(snapshot: &deltalake::table::state::DeltaTableState) -> HashMap<String, Candidate> {
    snapshot
        .log_data()
        .into_iter()
        .filter(|f| f.deletion_vector_descriptor().is_none())
        .map(|f| (f.path().to_string(), candidate(&f)))
        .collect()
}

/// The first of the files a compaction removes that is no longer in the table as it was planned:
/// gone (another compaction removed it), or changed (the same path with a deletion vector, or
/// other size or time). The Delta log tells files apart by path and deletion vector, so a
/// compaction committed over a changed file would leave the changed one active beside its own.
fn first_changed<'a>(
    planned: &'a [Candidate],
    active: &HashMap<String, Candidate>,
) -> Option<&'a Candidate> {
    planned
        .iter()
        .find(|file| active.get(&file.path) != Some(*file))
}

/// Groups of files to rewrite as one: small files of quiet partitions, packed up to the target.
fn plan(
    files: &BTreeMap<PartitionKey, Vec<Candidate>>,
    settings: &CompactionSettings,
    now_ms: i64,
) -> Vec<(PartitionKey, Vec<Candidate>)> {
    let quiet_ms = i64::try_from(settings.quiet_for.as_millis()).unwrap_or(i64::MAX);
    let target = i64::try_from(settings.target_bytes).unwrap_or(i64::MAX);
    let mut out = Vec::new();
    for (partition, files) in files {
        let newest = files.iter().map(|f| f.modified).max().unwrap_or(now_ms);
        if now_ms.saturating_sub(newest) < quiet_ms {
            continue; // still receiving files
        }
        let mut small: Vec<&Candidate> = files.iter().filter(|f| f.size < target / 2).collect();
        if small.len() < 2 {
            continue;
        }
        small.sort_by_key(|f| (f.size, f.path.clone()));
        let mut bin: Vec<Candidate> = Vec::new();
        let mut bytes = 0;
        for file in small {
            if !bin.is_empty() && bytes + file.size > target {
                if bin.len() > 1 {
                    out.push((partition.clone(), std::mem::take(&mut bin)));
                }
                bin.clear();
                bytes = 0;
            }
            bytes += file.size;
            bin.push(file.clone());
        }
        if bin.len() > 1 {
            out.push((partition.clone(), bin));
        }
    }
    out
}

/// Compacts the quiet partitions of `table`. Returns what it did; a lost race is no error.
pub async fn compact(
    table: &DeltaTable,
    settings: &CompactionSettings,
) -> Result<Compacted, deltalake::DeltaTableError> {
    let snapshot = table.snapshot()?;
    let mut files: BTreeMap<PartitionKey, Vec<Candidate>> = BTreeMap::new();
    for file in snapshot.log_data() {
        // Rows another engine deleted through a deletion vector are still in the Parquet file:
        // such files are left alone.
        if file.deletion_vector_descriptor().is_some() {
            continue;
        }
        let mut partition: PartitionKey = file.partition_values_map().into_iter().collect();
        partition.sort();
        files.entry(partition).or_default().push(candidate(&file));
    }
    let bins = plan(&files, settings, chrono::Utc::now().timestamp_millis());
    if bins.is_empty() {
        return Ok(Compacted::default());
    }
    // Every file in the table's current shape (files from before an evolution lack columns).
    let table_schema: Schema = snapshot
        .schema()
        .as_ref()
        .try_into_arrow()
        .map_err(deltalake::DeltaTableError::from)?;
    let data_fields: Vec<Field> = table_schema
        .fields()
        .iter()
        .filter(|f| !PARTITION_COLUMNS.contains(&f.name().as_str()))
        .map(|f| f.as_ref().clone())
        .collect();
    let schema: SchemaRef = std::sync::Arc::new(Schema::new(data_fields));
    let store = table.object_store();
    let removes: HashMap<String, _> = snapshot
        .log_data()
        .into_iter()
        .map(|f| (f.path().to_string(), f.remove_action(false)))
        .collect();
    let mut actions = Vec::new();
    let mut done = Compacted::default();
    for (partition, bin) in &bins {
        let mut batches: Vec<RecordBatch> = Vec::new();
        for file in bin {
            let bytes = store
                .get(&deltalake::Path::from(file.path.as_str()))
                .await?
                .bytes()
                .await?;
            let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)
                .and_then(|b| b.build())
                .map_err(|e| deltalake::DeltaTableError::Generic(format!("{}: {e}", file.path)))?;
            for batch in reader {
                let batch = batch.map_err(deltalake::DeltaTableError::from)?;
                batches.push(
                    super::evolution::conform(&batch, &schema)
                        .map_err(deltalake::DeltaTableError::from)?,
                );
            }
        }
        let all = concat_batches(&schema, &batches).map_err(deltalake::DeltaTableError::from)?;
        let values: HashMap<String, Option<String>> = partition.iter().cloned().collect();
        let add = super::files::put_file(
            store.as_ref(),
            all,
            &values,
            settings.compression,
            settings.delta_encoding,
            false,
        )
        .await
        .map_err(|e| deltalake::DeltaTableError::Generic(e.to_string()))?;
        crate::failpoint!("after_compaction_upload");
        actions.push(Action::Add(add));
        for file in bin {
            if let Some(remove) = removes.get(&file.path) {
                actions.push(Action::Remove(remove.clone()));
            }
            done.bytes_removed += u64::try_from(file.size).unwrap_or(0);
        }
        done.partitions += 1;
        done.files_removed += bin.len();
        done.files_added += 1;
    }
    let operation = DeltaOperation::Optimize {
        predicate: None,
        target_size: i64::try_from(settings.target_bytes).unwrap_or(i64::MAX),
    };
    let removed: Vec<Candidate> = bins.iter().flat_map(|(_, bin)| bin.clone()).collect();
    let mut current = table.clone();
    for _ in 0..COMMIT_ATTEMPTS {
        // No retries inside delta-rs: its conflict checker does not refuse a commit whose files
        // another commit removed without data change (another compaction's), so two compactions
        // of the same files both landed. The check is made here instead.
        let committed = CommitBuilder::default()
            .with_actions(actions.clone())
            .with_max_retries(0)
            .build(
                Some(current.snapshot()?),
                current.log_store(),
                operation.clone(),
            )
            .await;
        match committed {
            Ok(_) => return Ok(done),
            Err(e) if super::commit::is_lost_race(&e) => {
                let (metadata, protocol) = {
                    let read = current.snapshot()?;
                    (read.metadata().clone(), read.protocol().clone())
                };
                current.update_incremental(None).await?;
                let now = current.snapshot()?;
                if let Some(changed) = first_changed(&removed, &candidates(now)) {
                    // Another compaction (or this one, whose answer was lost) removed it, or
                    // another engine deleted rows of it through a deletion vector.
                    tracing::info!(
                        file = %changed.path,
                        "compaction gave way: another commit removed or changed one of its files"
                    );
                    return Ok(GAVE_WAY);
                }
                if *now.metadata() != metadata || *now.protocol() != protocol {
                    tracing::info!("compaction gave way: the table's metadata or protocol changed");
                    return Ok(GAVE_WAY);
                }
            }
            Err(e) => {
                // The files written here stay unreferenced until vacuum.
                tracing::info!(error = %e, "compaction gave way: its commit failed");
                return Ok(GAVE_WAY);
            }
        }
    }
    tracing::info!(
        attempts = COMMIT_ATTEMPTS,
        "compaction gave way: other commits kept coming first"
    );
    Ok(GAVE_WAY)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Compression;
    use std::time::Duration;

    fn file(path: &str, size: i64, modified: i64) -> Candidate {
        Candidate {
            path: path.into(),
            size,
            modified,
        }
    }

    /// A local table of one `x: Int64` column with `files` files of `rows` rows each, all in one
    /// hour partition, appended one commit each.
    async fn table_of_small_files(dir: &std::path::Path, files: i64, rows: i64) -> url::Url {
        crate::lake::register_object_stores();
        let url = url::Url::from_directory_path(dir).expect("url");
        crate::lake::open_or_create(url.clone(), &x_schema(), "t")
            .await
            .expect("table");
        for file in 0..files {
            append_file(&url, file * rows, rows).await;
        }
        url
    }

    fn x_schema() -> Schema {
        Schema::new(vec![Field::new(
            "x",
            deltalake::arrow::datatypes::DataType::Int64,
            true,
        )])
    }

    /// Appends one file of `x` = `first`..`first + rows` to the table's one hour partition.
    async fn append_file(url: &url::Url, first: i64, rows: i64) {
        let table = DeltaTable::try_from_url(url.clone()).await.expect("open");
        let partition: HashMap<String, Option<String>> = [
            ("event_date".to_string(), Some("2026-12-02".to_string())),
            ("event_hour".to_string(), Some("7".to_string())),
        ]
        .into();
        let values = deltalake::arrow::array::Int64Array::from_iter_values(first..first + rows);
        let batch = RecordBatch::try_new(
            std::sync::Arc::new(x_schema()),
            vec![std::sync::Arc::new(values)],
        )
        .expect("batch");
        let add = crate::lake::files::put_file(
            table.object_store().as_ref(),
            batch,
            &partition,
            Compression::Zstd,
            true,
            true,
        )
        .await
        .expect("upload");
        CommitBuilder::default()
            .with_actions(vec![Action::Add(add)])
            .build(
                Some(table.snapshot().expect("snapshot")),
                table.log_store(),
                DeltaOperation::Write {
                    mode: deltalake::protocol::SaveMode::Append,
                    partition_by: None,
                    predicate: None,
                },
            )
            .await
            .expect("append");
    }

    /// The values of `x` in the table at `url`, sorted, and its number of files.
    async fn xs(url: url::Url) -> (Vec<i64>, usize) {
        let contents = crate::lake::verify::read_table(url).await.expect("read");
        let mut xs: Vec<i64> = contents
            .batches
            .iter()
            .flat_map(|b| {
                b.column_by_name("x")
                    .and_then(|c| {
                        c.as_any()
                            .downcast_ref::<deltalake::arrow::array::Int64Array>()
                    })
                    .map(|a| a.values().to_vec())
                    .unwrap_or_default()
            })
            .collect();
        xs.sort_unstable();
        (xs, contents.files)
    }

    fn settings() -> CompactionSettings {
        CompactionSettings {
            target_bytes: 1 << 20,
            quiet_for: Duration::ZERO,
            compression: Compression::Zstd,
            delta_encoding: true,
        }
    }

    /// Two replicas compact the same files from the same snapshot (the maintainer changes with a
    /// rebalance while a pass is under way): one lands, the other gives way, and every row is in
    /// the table once. delta-rs 1.1's conflict checker refuses a second `remove` only when it
    /// changes data: left to it, both landed and the table held each row twice.
    #[tokio::test]
    async fn two_compactions_of_the_same_files_land_once() {
        let dir = tempfile::tempdir().expect("dir");
        let url = table_of_small_files(dir.path(), 4, 10).await;
        // Both read the table before either commits.
        let first = DeltaTable::try_from_url(url.clone()).await.expect("open");
        let second = DeltaTable::try_from_url(url.clone()).await.expect("open");
        let done = compact(&first, &settings())
            .await
            .expect("first compaction");
        assert_eq!(
            done.files_removed, 4,
            "the first compaction packs the 4 files"
        );
        let gave_way = compact(&second, &settings())
            .await
            .expect("second compaction");
        assert_eq!(
            gave_way, GAVE_WAY,
            "the second compaction of the same files gives way"
        );
        let (xs, files) = xs(url).await;
        assert_eq!(xs, (0..40).collect::<Vec<i64>>(), "every row once");
        assert_eq!(files, 1, "one file after the compaction");
    }

    /// A compaction that read the table before a writer appended still lands: the append is
    /// read and the commit tried again. The appended file stays, and every row is there once.
    #[tokio::test]
    async fn a_compaction_lands_through_a_concurrent_append() {
        let dir = tempfile::tempdir().expect("dir");
        let url = table_of_small_files(dir.path(), 3, 10).await;
        let stale = DeltaTable::try_from_url(url.clone()).await.expect("open");
        // One more file of rows 30..40, appended after the compaction read the table.
        append_file(&url, 30, 10).await;
        let done = compact(&stale, &settings()).await.expect("compaction");
        assert_eq!(done.files_removed, 3, "the 3 files it read are packed");
        let (xs, files) = xs(url).await;
        assert_eq!(xs, (0..40).collect::<Vec<i64>>(), "every row once");
        assert_eq!(files, 2, "the packed file and the appended one");
    }

    /// A compaction goes on only over files that are in the table exactly as it planned them.
    #[test]
    fn a_file_gone_or_changed_since_the_plan_stops_the_compaction() {
        let planned = vec![file("a", 10, 1), file("b", 20, 2)];
        let mut active: HashMap<String, Candidate> = planned
            .iter()
            .map(|f| (f.path.clone(), f.clone()))
            .collect();
        active.insert("c".into(), file("c", 5, 3)); // an append: no matter
        assert_eq!(first_changed(&planned, &active), None);
        // Rewritten under the same path (another size): changed.
        active.insert("b".into(), file("b", 21, 2));
        assert_eq!(first_changed(&planned, &active), Some(&planned[1]));
        // Gone, or given a deletion vector (`candidates` leaves those out): changed.
        active.insert("b".into(), file("b", 20, 2));
        active.remove("a");
        assert_eq!(first_changed(&planned, &active), Some(&planned[0]));
    }

    #[test]
    fn only_quiet_partitions_with_several_small_files_are_packed() {
        let settings = CompactionSettings {
            target_bytes: 100,
            quiet_for: Duration::from_secs(60),
            compression: Compression::Zstd,
            delta_encoding: true,
        };
        let now = 1_000_000;
        let hour = |h: &str| vec![("event_hour".to_string(), Some(h.to_string()))];
        let mut files = BTreeMap::new();
        // Quiet, five small files of 30 bytes: bins of at most 100 bytes (3 + 2 files).
        files.insert(
            hour("1"),
            (0..5)
                .map(|i| file(&format!("a{i}"), 30, now - 120_000))
                .collect(),
        );
        // Still receiving files.
        files.insert(
            hour("2"),
            vec![file("b0", 10, now - 1_000), file("b1", 10, now - 120_000)],
        );
        // One small file and a big one: nothing to pack.
        files.insert(
            hour("3"),
            vec![file("c0", 10, now - 120_000), file("c1", 90, now - 120_000)],
        );
        let bins = plan(&files, &settings, now);
        let sizes: Vec<usize> = bins.iter().map(|(_, b)| b.len()).collect();
        assert_eq!(sizes, vec![3, 2]);
        assert!(bins.iter().all(|(p, _)| *p == hour("1")));
        assert!(bins
            .iter()
            .all(|(_, b)| b.iter().map(|f| f.size).sum::<i64>() <= 100));
    }
}

//! Reads a table back the way a user would (the active files of the latest version) and checks the
//! exactly-once invariant: every expected source offset exactly once, nothing else.

use std::collections::{BTreeMap, BTreeSet};

use deltalake::arrow::array::{Array, AsArray, RecordBatch};
use deltalake::arrow::datatypes::{Int32Type, Int64Type};
use deltalake::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use deltalake::{DeltaTable, DeltaTableError};
use object_store::ObjectStoreExt;
use url::Url;

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("delta table: {0}")]
    Delta(#[from] DeltaTableError),
    #[error("object store: {0}")]
    Store(#[from] deltalake::ObjectStoreError),
    #[error("parquet: {0}")]
    Parquet(#[from] deltalake::parquet::errors::ParquetError),
    #[error("arrow: {0}")]
    Arrow(#[from] deltalake::arrow::error::ArrowError),
    #[error("column {0} missing or of the wrong type")]
    Column(&'static str),
}

/// The rows of a table's latest version.
pub struct TableContents {
    pub version: i64,
    pub files: usize,
    pub batches: Vec<RecordBatch>,
}

impl TableContents {
    pub fn num_rows(&self) -> usize {
        self.batches.iter().map(RecordBatch::num_rows).sum()
    }
}

/// Parquet files under the table that its latest version does not reference (uploads of refused
/// or crashed commits, files replaced since): what vacuum removes once they are old enough.
pub async fn unreferenced_files(url: Url) -> Result<Vec<String>, VerifyError> {
    use futures::TryStreamExt;
    crate::lake::register_object_stores();
    let table = DeltaTable::try_from_url(url).await?;
    let referenced: std::collections::HashSet<String> = match table.version() {
        Some(_) => table
            .snapshot()?
            .log_data()
            .into_iter()
            .map(|f| f.object_store_path().to_string())
            .collect(),
        None => Default::default(),
    };
    let all: Vec<_> = table.object_store().list(None).try_collect().await?;
    Ok(all
        .into_iter()
        .map(|m| m.location.to_string())
        .filter(|p| p.ends_with(".parquet") && !p.starts_with("_delta_log"))
        .filter(|p| !referenced.contains(p))
        .collect())
}

/// Active files per partition folder (`event_date=…/event_hour=…`) of the latest version.
/// Files and bytes of each partition folder the table's latest version references.
pub async fn files_per_partition(
    url: Url,
) -> Result<std::collections::BTreeMap<String, PartitionFiles>, VerifyError> {
    crate::lake::register_object_stores();
    let table = DeltaTable::try_from_url(url).await?;
    let mut out = std::collections::BTreeMap::new();
    if table.version().is_none() {
        return Ok(out);
    }
    for file in table.snapshot()?.log_data() {
        let path = file.path().to_string();
        let folder = path.rsplit_once('/').map_or("", |(dir, _)| dir).to_string();
        let entry: &mut PartitionFiles = out.entry(folder).or_default();
        entry.files += 1;
        entry.bytes += u64::try_from(file.size()).unwrap_or(0);
    }
    Ok(out)
}

/// What one partition folder holds.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PartitionFiles {
    pub files: usize,
    pub bytes: u64,
}

/// The version of the table's newest checkpoint, from `_delta_log/_last_checkpoint`.
pub async fn last_checkpoint(url: Url) -> Result<Option<i64>, VerifyError> {
    use object_store::ObjectStoreExt;
    crate::lake::register_object_stores();
    let table = DeltaTable::try_from_url(url).await?;
    let path = deltalake::Path::from("_delta_log/_last_checkpoint");
    let bytes = match table.object_store().get(&path).await {
        Ok(got) => got.bytes().await?,
        Err(deltalake::ObjectStoreError::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let hint: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
    Ok(hint.get("version").and_then(serde_json::Value::as_i64))
}

/// Loads the latest version of the table at `url` and reads all its active files.
pub async fn read_table(url: Url) -> Result<TableContents, VerifyError> {
    crate::lake::register_object_stores();
    let table = DeltaTable::try_from_url(url).await?;
    let Some(version) = table.version() else {
        return Ok(TableContents {
            version: -1,
            files: 0,
            batches: Vec::new(),
        });
    };
    let store = table.object_store();
    let paths: Vec<_> = table
        .snapshot()?
        .log_data()
        .into_iter()
        .map(|f| f.object_store_path())
        .collect();
    let mut batches = Vec::new();
    for path in &paths {
        let bytes = store.get(path).await?.bytes().await?;
        for batch in ParquetRecordBatchReaderBuilder::try_new(bytes)?.build()? {
            batches.push(batch?);
        }
    }
    Ok(TableContents {
        version: version as i64,
        files: paths.len(),
        batches,
    })
}

/// `(topic, partition, offset)` of every row, from the lineage columns.
pub fn lineage(batches: &[RecordBatch]) -> Result<Vec<(String, i32, i64)>, VerifyError> {
    let mut out = Vec::new();
    for batch in batches {
        let topics = batch
            .column_by_name("_topic")
            .ok_or(VerifyError::Column("_topic"))?;
        let topics =
            deltalake::arrow::compute::cast(topics, &deltalake::arrow::datatypes::DataType::Utf8)?;
        let topics = topics
            .as_string_opt::<i32>()
            .ok_or(VerifyError::Column("_topic"))?;
        let partitions = batch
            .column_by_name("_partition")
            .and_then(|c| c.as_primitive_opt::<Int32Type>())
            .ok_or(VerifyError::Column("_partition"))?;
        let offsets = batch
            .column_by_name("_offset")
            .and_then(|c| c.as_primitive_opt::<Int64Type>())
            .ok_or(VerifyError::Column("_offset"))?;
        for row in 0..batch.num_rows() {
            if topics.is_null(row) {
                return Err(VerifyError::Column("_topic"));
            }
            out.push((
                topics.value(row).to_string(),
                partitions.value(row),
                offsets.value(row),
            ));
        }
    }
    Ok(out)
}

/// How the rows of a table compare with the offsets that should be in it.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ExactlyOnce {
    pub expected: usize,
    pub found: usize,
    /// Expected offsets with no row.
    pub missing: Vec<(String, i32, i64)>,
    /// Offsets with more than one row, and how many.
    pub duplicated: Vec<((String, i32, i64), usize)>,
    /// Rows whose offset was not expected at all.
    pub unexpected: Vec<(String, i32, i64)>,
}

impl ExactlyOnce {
    pub fn is_exact(&self) -> bool {
        self.missing.is_empty() && self.duplicated.is_empty() && self.unexpected.is_empty()
    }
}

impl std::fmt::Display for ExactlyOnce {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "expected {} rows, found {}: {} missing (first {:?}), {} duplicated (first {:?}), {} unexpected (first {:?})",
            self.expected,
            self.found,
            self.missing.len(),
            self.missing.first(),
            self.duplicated.len(),
            self.duplicated.first(),
            self.unexpected.len(),
            self.unexpected.first()
        )
    }
}

/// Compares found row offsets with the expected ones, record by record.
pub fn exactly_once(
    found: impl IntoIterator<Item = (String, i32, i64)>,
    expected: impl IntoIterator<Item = (String, i32, i64)>,
) -> ExactlyOnce {
    let expected: BTreeSet<_> = expected.into_iter().collect();
    let mut counts: BTreeMap<(String, i32, i64), usize> = BTreeMap::new();
    let mut found_rows = 0;
    for key in found {
        found_rows += 1;
        *counts.entry(key).or_default() += 1;
    }
    let missing = expected
        .iter()
        .filter(|k| !counts.contains_key(*k))
        .cloned()
        .collect();
    let duplicated = counts
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(k, n)| (k.clone(), *n))
        .collect();
    let unexpected = counts
        .keys()
        .filter(|k| !expected.contains(*k))
        .cloned()
        .collect();
    ExactlyOnce {
        expected: expected.len(),
        found: found_rows,
        missing,
        duplicated,
        unexpected,
    }
}

/// One Gold table row, read back: (window start µs, key fields as text) and the aggregate columns
/// in order (integers as f64; `None` for null).
pub type GoldKey = (i64, Vec<String>);

/// Gold rows by (window, key), each with its aggregate values.
pub type GoldRows = BTreeMap<GoldKey, Vec<Option<f64>>>;

/// Reads Gold rows: `key_fields` and `columns` (aggregate column names) of every row. Returns the
/// rows by (window start, key) and the (window, key) pairs found more than once.
pub fn gold_rows(
    batches: &[RecordBatch],
    key_fields: &[String],
    columns: &[String],
) -> Result<(GoldRows, Vec<GoldKey>), VerifyError> {
    use deltalake::arrow::datatypes::{DataType, Float64Type, TimestampMicrosecondType};
    let mut rows = BTreeMap::new();
    let mut twice = Vec::new();
    for batch in batches {
        let starts = batch
            .column_by_name("window_start")
            .and_then(|c| c.as_primitive_opt::<TimestampMicrosecondType>())
            .ok_or(VerifyError::Column("window_start"))?;
        for row in 0..batch.num_rows() {
            let mut key = Vec::with_capacity(key_fields.len());
            for field in key_fields {
                let column = batch
                    .column_by_name(field)
                    .ok_or(VerifyError::Column("gold key"))?;
                key.push(if column.is_null(row) {
                    "null".to_string()
                } else {
                    match column.data_type() {
                        DataType::Utf8 => column.as_string::<i32>().value(row).to_string(),
                        DataType::Int64 => {
                            column.as_primitive::<Int64Type>().value(row).to_string()
                        }
                        _ => return Err(VerifyError::Column("gold key")),
                    }
                });
            }
            let mut values = Vec::with_capacity(columns.len());
            for name in columns {
                let column = batch
                    .column_by_name(name)
                    .ok_or(VerifyError::Column("gold aggregate"))?;
                values.push(if column.is_null(row) {
                    None
                } else {
                    match column.data_type() {
                        DataType::Int64 => {
                            Some(column.as_primitive::<Int64Type>().value(row) as f64)
                        }
                        DataType::Float64 => Some(column.as_primitive::<Float64Type>().value(row)),
                        _ => return Err(VerifyError::Column("gold aggregate")),
                    }
                });
            }
            let slot = (starts.value(row), key);
            if rows.insert(slot.clone(), values).is_some() {
                twice.push(slot);
            }
        }
    }
    Ok((rows, twice))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(offset: i64) -> (String, i32, i64) {
        ("t".to_string(), 0, offset)
    }

    #[test]
    fn finds_missing_duplicate_and_unexpected_rows() {
        let report = exactly_once([k(0), k(1), k(1), k(9)], [k(0), k(1), k(2)]);
        assert_eq!(report.missing, vec![k(2)]);
        assert_eq!(report.duplicated, vec![(k(1), 2)]);
        assert_eq!(report.unexpected, vec![k(9)]);
        assert!(!report.is_exact());
        assert!(exactly_once([k(0), k(1)], [k(1), k(0)]).is_exact());
    }
}

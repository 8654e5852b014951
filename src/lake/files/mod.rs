//! Silver files: accepted rows grouped by event date and hour, encoded as Parquet and uploaded under
//! the table. This module only writes files and describes them as `add` actions; it never commits
//! (an uploaded file is invisible until `commit` puts it in the log).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use deltalake::arrow::array::{Array, AsArray, RecordBatch, UInt32Array};
use deltalake::arrow::compute::take_record_batch;
use deltalake::arrow::datatypes::{SchemaRef, TimestampMicrosecondType};
use deltalake::kernel::Add;
use deltalake::parquet;
use deltalake::parquet::arrow::async_writer::AsyncFileWriter;
use deltalake::parquet::arrow::{ArrowWriter, AsyncArrowWriter};
use deltalake::parquet::basic::{Compression as ParquetCompression, ZstdLevel};
use deltalake::parquet::file::properties::WriterProperties;
use deltalake::{ObjectStore, Path};
use futures::future::BoxFuture;
use object_store::ObjectStoreExt;

use crate::config::Compression;
use crate::lake::PARTITION_COLUMNS;

#[derive(Debug, thiserror::Error)]
pub enum SilverError {
    #[error("arrow: {0}")]
    Arrow(#[from] deltalake::arrow::error::ArrowError),
    #[error("parquet: {0}")]
    Parquet(#[from] deltalake::parquet::errors::ParquetError),
    #[error("object store: {0}")]
    Store(#[from] deltalake::ObjectStoreError),
    #[error("encoding task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
    #[error("finishing an upload: {0}")]
    Io(#[from] std::io::Error),
}

/// File-rolling policy and encoding settings.
#[derive(Debug, Clone)]
pub struct FilePolicy {
    pub max_rows: usize,
    pub max_bytes: usize,
    pub compression: Compression,
    /// Integer-like columns without a dictionary are written as deltas (`DELTA_BINARY_PACKED`).
    pub delta_encoding: bool,
}

impl FilePolicy {
    /// The policy `STRATA_FILE_MAX_ROWS`, `STRATA_FILE_MAX_BYTES`, `STRATA_PARQUET_COMPRESSION`
    /// and `STRATA_PARQUET_DELTA_ENCODING` set.
    pub fn from_config(config: &crate::config::Config) -> Self {
        Self {
            max_rows: config.file_max_rows,
            max_bytes: config.file_max_bytes,
            compression: config.compression,
            delta_encoding: config.parquet_delta_encoding,
        }
    }
}

/// What a write has uploaded so far: its files, and their places (event date, hour, number).
#[derive(Debug, Default, Clone)]
pub struct WriteProgress {
    pub files: Vec<Add>,
    done: BTreeSet<(i32, i32, usize)>,
}

/// Writes Silver files for one table.
#[derive(Clone)]
pub struct SilverWriter {
    /// The files' schema: the table's columns as this replica writes them (see `lake::evolution::plan_evolution`).
    schema: SchemaRef,
    event_time_field: String,
    policy: FilePolicy,
    store: Arc<dyn ObjectStore>,
}

/// `(days since 1970-01-01, hour of day)` in UTC.
pub fn date_hour(micros: i64) -> (i32, i32) {
    let seconds = micros.div_euclid(1_000_000);
    let days = seconds.div_euclid(86_400);
    let hour = seconds.rem_euclid(86_400) / 3_600;
    (
        days.clamp(i32::MIN as i64, i32::MAX as i64) as i32,
        hour as i32,
    )
}

fn date_string(days: i32) -> String {
    chrono::NaiveDate::from_ymd_opt(1970, 1, 1)
        .and_then(|epoch| epoch.checked_add_signed(chrono::Duration::days(days as i64)))
        .map(|d| d.format("%Y-%m-%d").to_string())
        .unwrap_or_else(|| "0000-01-01".to_string())
}

impl SilverWriter {
    /// `store` must be rooted at the table (paths are relative to it).
    pub fn new(
        schema: SchemaRef,
        event_time_field: &str,
        policy: FilePolicy,
        store: Arc<dyn ObjectStore>,
    ) -> Self {
        Self {
            schema,
            event_time_field: event_time_field.to_string(),
            policy,
            store,
        }
    }

    /// Changes the files' schema (the table evolved). Batches already buffered in the old shape
    /// are widened when written, so they share files with the new rows.
    pub fn set_schema(&mut self, schema: SchemaRef) {
        self.schema = schema;
    }

    /// Writes `batches` as Parquet files, one or more per (event_date, event_hour), and returns their
    /// `add` actions. Files are rolled at `max_rows` rows and roughly `max_bytes` of Arrow memory.
    /// Batches may have any earlier shape of the table: they are conformed to the current one.
    pub async fn write(&self, batches: &[RecordBatch]) -> Result<Vec<Add>, SilverError> {
        let mut progress = WriteProgress::default();
        self.write_resuming(batches, &mut progress).await?;
        Ok(progress.files)
    }

    /// Like [`SilverWriter::write`], but a write that failed part-way keeps in `progress` the
    /// files that were uploaded, and a later call with the same `batches` uploads only the rest.
    /// The files a write makes depend only on the batches and the schema, so each is known by
    /// its place: (event date, hour, number within the hour).
    pub async fn write_resuming(
        &self,
        batches: &[RecordBatch],
        progress: &mut WriteProgress,
    ) -> Result<(), SilverError> {
        let conformed = batches
            .iter()
            .map(|b| crate::lake::evolution::conform(b, &self.schema))
            .collect::<Result<Vec<_>, _>>()?;
        let total_rows: usize = conformed.iter().map(RecordBatch::num_rows).sum();
        if total_rows == 0 {
            return Ok(());
        }
        // Rows per (event date, hour), as (batch, rows of it) in batch order. No copy of the
        // buffer is made: each file takes its rows from the batches piece by piece.
        let mut groups: BTreeMap<(i32, i32), HourRows> = BTreeMap::new();
        for (index, batch) in conformed.iter().enumerate() {
            for (hour, rows) in self.hour_rows(batch)? {
                groups.entry(hour).or_default().push((index, rows));
            }
        }
        let (bytes_per_row, rows_per_file) = self.sizing(&conformed);

        for ((days, hour), pieces) in groups {
            for (number, file) in split_rows(&pieces, rows_per_file).into_iter().enumerate() {
                if !progress.done.insert((days, hour, number)) {
                    continue;
                }
                match self
                    .stream_file(&conformed, &file, days, hour, bytes_per_row)
                    .await
                {
                    Ok(add) => {
                        crate::failpoint!("after_upload");
                        progress.files.push(add);
                    }
                    Err(e) => {
                        progress.done.remove(&(days, hour, number));
                        return Err(e);
                    }
                }
            }
        }
        Ok(())
    }

    /// The rows of `batch` per (event date, hour), in order.
    fn hour_rows(
        &self,
        batch: &RecordBatch,
    ) -> Result<BTreeMap<(i32, i32), Vec<u32>>, SilverError> {
        let times = batch
            .column_by_name(&self.event_time_field)
            .and_then(|c| c.as_primitive_opt::<TimestampMicrosecondType>())
            .ok_or_else(|| {
                deltalake::arrow::error::ArrowError::SchemaError(format!(
                    "event time column {} missing or not a timestamp",
                    self.event_time_field
                ))
            })?;
        let mut of_batch: BTreeMap<(i32, i32), Vec<u32>> = BTreeMap::new();
        // Consecutive rows mostly share their hour: a run of them is added at once.
        let mut run: Option<((i32, i32), u32)> = None;
        for row in 0..batch.num_rows() {
            // Rows without event time were rejected by the decoder; a null counts as epoch.
            let micros = if times.is_null(row) {
                0
            } else {
                times.value(row)
            };
            let hour = date_hour(micros);
            match run {
                Some((current, _)) if current == hour => {}
                _ => {
                    if let Some((previous, from)) = run {
                        of_batch
                            .entry(previous)
                            .or_default()
                            .extend(from..row as u32);
                    }
                    run = Some((hour, row as u32));
                }
            }
        }
        if let Some((previous, from)) = run {
            of_batch
                .entry(previous)
                .or_default()
                .extend(from..batch.num_rows() as u32);
        }
        Ok(of_batch)
    }

    /// Arrow bytes per row of `batches`, and the rows a file takes (`max_rows`, or fewer so
    /// that it holds about `max_bytes` of Arrow memory).
    fn sizing(&self, batches: &[RecordBatch]) -> (usize, usize) {
        let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
        let memory: usize = batches.iter().map(RecordBatch::get_array_memory_size).sum();
        self.sizing_for(memory, rows)
    }

    /// [`SilverWriter::sizing`] of `rows` rows taking `memory` bytes of Arrow memory.
    fn sizing_for(&self, memory: usize, rows: usize) -> (usize, usize) {
        let bytes_per_row = (memory / rows.max(1)).max(1);
        let rows_per_file = self
            .policy
            .max_rows
            .min((self.policy.max_bytes / bytes_per_row).max(1));
        (bytes_per_row, rows_per_file)
    }

    /// Opens the file of one (event date, hour) for streaming: its rows are encoded as they are
    /// written, a row group at a time, and uploaded as they grow.
    /// `sample` is a batch of rows like the file's (its first, if any), and `file_rows` about the
    /// rows the file will hold: together they decide which columns get a dictionary
    /// ([`repeats_enough`]).
    fn open_file(
        &self,
        days: i32,
        hour: i32,
        bytes_per_row: usize,
        sample: Option<&RecordBatch>,
        file_rows: usize,
    ) -> Result<OpenFile, SilverError> {
        let partition: HashMap<String, Option<String>> = [
            (PARTITION_COLUMNS[0].to_string(), Some(date_string(days))),
            (PARTITION_COLUMNS[1].to_string(), Some(hour.to_string())),
        ]
        .into_iter()
        .collect();
        let relative = file_path(&partition, self.policy.compression);
        let upload = Upload {
            writer: object_store::buffered::BufWriter::new(
                self.store.clone(),
                Path::from(relative.as_str()),
            ),
            shut_down: false,
        };
        // Row groups of about ROW_GROUP_BYTES of Arrow memory bound what the encoder holds.
        let row_group_rows = (ROW_GROUP_BYTES / bytes_per_row).max(1024);
        let properties = writer_properties(
            self.policy.compression,
            self.policy.delta_encoding,
            &self.schema,
            sample,
            file_rows,
        )
        .set_max_row_group_row_count(Some(row_group_rows))
        .build();
        let writer = AsyncArrowWriter::try_new(upload, self.schema.clone(), Some(properties))?;
        Ok(OpenFile {
            writer,
            relative,
            partition,
            rows: 0,
        })
    }

    /// Encodes one file's rows piece by piece and streams it to the store: small files in one PUT,
    /// large ones as a multipart upload, so a flush holds about one row group and one upload part
    /// besides the buffer, never a copy of the buffer or a whole file.
    async fn stream_file(
        &self,
        batches: &[RecordBatch],
        pieces: &[(usize, &[u32])],
        days: i32,
        hour: i32,
        bytes_per_row: usize,
    ) -> Result<Add, SilverError> {
        let sample = pieces.first().and_then(|(index, _)| batches.get(*index));
        let rows = pieces.iter().map(|(_, indices)| indices.len()).sum();
        let mut file = self.open_file(days, hour, bytes_per_row, sample, rows)?;
        let written = async {
            for (index, indices) in pieces {
                let Some(batch) = batches.get(*index) else {
                    continue;
                };
                // Encoding runs here, a piece (at most one source chunk) at a time; yielding
                // between pieces keeps a long file from holding an async worker for its whole
                // encoding (`spawn_blocking` per piece measured 27 MiB more peak RSS in one run,
                // likely encoder buffers freed on other threads' malloc arenas).
                file.write(&rows_of(batch, indices)?).await?;
                tokio::task::yield_now().await;
            }
            Ok::<(), SilverError>(())
        }
        .await;
        match written {
            Ok(()) => file.finish().await,
            Err(e) => {
                file.abort().await;
                Err(e)
            }
        }
    }
}

/// The rows `indices` of `batch`; all of them (one event hour in the chunk) need no copy.
fn rows_of(batch: &RecordBatch, indices: &[u32]) -> Result<RecordBatch, SilverError> {
    if indices.len() == batch.num_rows() {
        Ok(batch.clone())
    } else {
        Ok(take_record_batch(
            batch,
            &UInt32Array::from(indices.to_vec()),
        )?)
    }
}

/// A Parquet file being encoded and streamed to the store.
struct OpenFile {
    writer: AsyncArrowWriter<Upload>,
    relative: String,
    partition: HashMap<String, Option<String>>,
    rows: usize,
}

impl OpenFile {
    async fn write(&mut self, rows: &RecordBatch) -> Result<(), SilverError> {
        self.rows += rows.num_rows();
        self.writer.write(rows).await?;
        Ok(())
    }

    /// Writes the last row group and the footer, ends the upload, and describes the file.
    async fn finish(mut self) -> Result<Add, SilverError> {
        if let Err(e) = self.writer.finish().await {
            self.abort().await;
            return Err(e.into());
        }
        let size = self.writer.bytes_written() as i64;
        Ok(add_action(
            self.relative,
            self.partition,
            size,
            self.rows,
            true,
        ))
    }

    /// Ends a file that will not be finished. A multipart upload left open would hold its parts
    /// until the bucket's lifecycle rule removes them: it is aborted now, unless its shutdown
    /// (the last PUT, or completing the multipart upload) is what failed; it cannot be aborted
    /// after that.
    async fn abort(self) {
        let mut upload = self.writer.into_inner();
        if !upload.shut_down {
            let _ = upload.writer.abort().await;
        }
    }
}

/// Where a streamed file goes: object_store's `BufWriter` (one PUT for a small file, a multipart
/// upload for a large one), and whether its shutdown began. `BufWriter::abort` panics once the
/// writer is shut down, so a file whose last PUT was refused (an S3 `SlowDown`) must not be
/// aborted.
struct Upload {
    writer: object_store::buffered::BufWriter,
    shut_down: bool,
}

impl AsyncFileWriter for Upload {
    fn write(&mut self, bytes: bytes::Bytes) -> BoxFuture<'_, parquet::errors::Result<()>> {
        Box::pin(async move {
            self.writer
                .put(bytes)
                .await
                .map_err(|e| parquet::errors::ParquetError::External(Box::new(e)))
        })
    }

    fn complete(&mut self) -> BoxFuture<'_, parquet::errors::Result<()>> {
        self.shut_down = true;
        Box::pin(async move {
            tokio::io::AsyncWriteExt::shutdown(&mut self.writer)
                .await
                .map_err(|e| parquet::errors::ParquetError::External(Box::new(e)))
        })
    }
}

/// Arrow memory per row group of a streamed file (see `SilverWriter::stream_file`).
const ROW_GROUP_BYTES: usize = 32 * 1024 * 1024;

/// An hour's rows: (batch, rows of it), in batch order.
type HourRows = Vec<(usize, Vec<u32>)>;

/// The hour's rows, in order, cut into files of at most `per_file` rows: each file is a list of
/// (batch, rows of it).
fn split_rows(pieces: &HourRows, per_file: usize) -> Vec<Vec<(usize, &[u32])>> {
    let mut files = Vec::new();
    let mut current: Vec<(usize, &[u32])> = Vec::new();
    let mut in_current = 0;
    for (index, rows) in pieces {
        let mut rest: &[u32] = rows;
        while !rest.is_empty() {
            let take = (per_file - in_current).min(rest.len());
            current.push((*index, &rest[..take]));
            in_current += take;
            rest = &rest[take..];
            if in_current == per_file {
                files.push(std::mem::take(&mut current));
                in_current = 0;
            }
        }
    }
    if !current.is_empty() {
        files.push(current);
    }
    files
}

/// `event_date=…/event_hour=…/part-<uuid>.<codec>.parquet`.
fn file_path(partition: &HashMap<String, Option<String>>, compression: Compression) -> String {
    let extension = match compression {
        Compression::Zstd => "zstd.parquet",
        Compression::Snappy => "snappy.parquet",
        Compression::None => "parquet",
    };
    let value = |column: &str| {
        partition
            .get(column)
            .cloned()
            .flatten()
            .unwrap_or_else(|| "__HIVE_DEFAULT_PARTITION__".to_string())
    };
    format!(
        "{}={}/{}={}/part-{}.{extension}",
        PARTITION_COLUMNS[0],
        value(PARTITION_COLUMNS[0]),
        PARTITION_COLUMNS[1],
        value(PARTITION_COLUMNS[1]),
        uuid::Uuid::new_v4()
    )
}

/// The `add` action of a file just written.
fn add_action(
    path: String,
    partition: HashMap<String, Option<String>>,
    size: i64,
    rows: usize,
    data_change: bool,
) -> Add {
    Add {
        path,
        partition_values: partition,
        size,
        modification_time: chrono::Utc::now().timestamp_millis(),
        data_change,
        stats: Some(serde_json::json!({ "numRecords": rows }).to_string()),
        tags: None,
        deletion_vector: None,
        base_row_id: None,
        default_row_commit_version: None,
        clustering_provider: None,
    }
}

/// Writes `batch` as one Parquet file in the partition folder of `partition` (event date and
/// hour) and describes it as an `add` action; `data_change` is false for a file that only
/// rearranges rows already in the table (compaction).
pub async fn put_file(
    store: &dyn ObjectStore,
    batch: RecordBatch,
    partition: &HashMap<String, Option<String>>,
    compression: Compression,
    delta_encoding: bool,
    data_change: bool,
) -> Result<Add, SilverError> {
    let rows = batch.num_rows();
    // Parquet encoding is CPU work: keep it off the async workers.
    let bytes =
        tokio::task::spawn_blocking(move || encode_parquet(&batch, compression, delta_encoding))
            .await??;
    let relative = file_path(partition, compression);
    let size = bytes.len() as i64;
    store
        .put(&Path::from(relative.as_str()), bytes.into())
        .await?;
    Ok(add_action(
        relative,
        partition.clone(),
        size,
        rows,
        data_change,
    ))
}

/// The writer's settings for a file of `schema` holding about `file_rows` rows like those of
/// `sample`. A column gets no dictionary when its type does not suit one
/// ([`dictionary_pays_off`]) or its sampled values rarely repeat ([`repeats_enough`]); then, with
/// `delta_encoding`, an integer-like one is written as deltas ([`integer_like`]).
fn writer_properties(
    compression: Compression,
    delta_encoding: bool,
    schema: &deltalake::arrow::datatypes::Schema,
    sample: Option<&RecordBatch>,
    file_rows: usize,
) -> deltalake::parquet::file::properties::WriterPropertiesBuilder {
    let codec = match compression {
        Compression::Zstd => ParquetCompression::ZSTD(ZstdLevel::default()),
        Compression::Snappy => ParquetCompression::SNAPPY,
        Compression::None => ParquetCompression::UNCOMPRESSED,
    };
    let mut builder = WriterProperties::builder().set_compression(codec);
    for field in schema.fields() {
        // The sample's column of the same name and type; otherwise the type alone decides.
        let column = sample
            .and_then(|s| s.column_by_name(field.name()))
            .filter(|c| c.data_type() == field.data_type());
        let repeats = column.is_none_or(|c| repeats_enough(c, file_rows));
        if dictionary_pays_off(field) && repeats {
            continue;
        }
        let path = deltalake::parquet::schema::types::ColumnPath::from(field.name().as_str());
        builder = builder.set_column_dictionary_enabled(path.clone(), false);
        if delta_encoding && integer_like(field.data_type()) {
            builder = builder.set_column_encoding(
                path,
                deltalake::parquet::basic::Encoding::DELTA_BINARY_PACKED,
            );
        }
    }
    builder
}

/// Whether a column's type suits a dictionary. Offsets and Kafka timestamps are unique per row,
/// and floating-point values and timestamps nearly so: the writer would build a dictionary until
/// it outgrows its page (1 MiB) and then fall back, and interning those values was the largest
/// single cost of a flush in the profile. Measured (`make bench`, the pipeline from memory, 1M
/// orders): 1.64 M → 1.72 M events per CPU-second, and 11.1 → 10.6 MiB of Parquet. Strings and
/// integers are judged by their values ([`repeats_enough`]).
fn dictionary_pays_off(field: &deltalake::arrow::datatypes::Field) -> bool {
    use deltalake::arrow::datatypes::DataType;
    let unique = [
        crate::silver::decode::LINEAGE_COLUMNS[2],
        crate::silver::decode::KAFKA_TIMESTAMP,
    ];
    if unique.contains(&field.name().as_str()) {
        return false;
    }
    !matches!(
        field.data_type(),
        DataType::Float16 | DataType::Float32 | DataType::Float64 | DataType::Timestamp(_, _)
    )
}

/// Integers, dates and timestamps: without a dictionary they are written as deltas
/// (`DELTA_BINARY_PACKED`), which shrinks ids, offsets and times that rise row by row to a few
/// bits each and leaves zstd far less to compress than plain 8-byte values.
fn integer_like(data_type: &deltalake::arrow::datatypes::DataType) -> bool {
    use deltalake::arrow::datatypes::DataType;
    matches!(
        data_type,
        DataType::Int8
            | DataType::Int16
            | DataType::Int32
            | DataType::Int64
            | DataType::UInt8
            | DataType::UInt16
            | DataType::UInt32
            | DataType::UInt64
            | DataType::Date32
            | DataType::Date64
            | DataType::Timestamp(_, _)
    )
}

/// Values sampled from a column to judge its dictionary.
const DICTIONARY_SAMPLE: usize = 1024;

/// Whether the values of `column` (rows like a file's) repeat often enough in a file of
/// `file_rows` rows for a dictionary: about twice each or more, that is at most `file_rows / 2`
/// distinct values. Judged from up to [`DICTIONARY_SAMPLE`] values spread evenly over `column`:
/// `s` values drawn from `d` distinct ones repeat about `s² / 2d` times (the birthday estimate),
/// so the dictionary is kept when the sample holds at least `s² / n` repeats, `n` being the
/// file's non-null values (its rows scaled by the sample's share of non-nulls). A key such as an
/// order id or an event id never repeats and loses its dictionary; a customer id, a product or a
/// status code keeps it. Types other than integers, dates, times and strings keep it, and so do a
/// sample too small to judge and a small file.
///
/// The sample comes from one batch (a source chunk), not the whole file: values that are unique
/// within a chunk but recur across the file (a device id from more devices than a chunk holds)
/// lose their dictionary too. That costs file size (zstd still finds the repeats), not
/// correctness; the opposite error only keeps a dictionary, which the writer drops by itself
/// once it outgrows its page (1 MiB).
///
/// Measured on the bench's orders (`order_id` unique, 20,000 customers): Parquet 10.6 → 9.6 MiB
/// per million orders, and less CPU per event (the numbers are in ARCHITECTURE.md).
fn repeats_enough(column: &dyn Array, file_rows: usize) -> bool {
    use deltalake::arrow::compute::{cast, take};
    use deltalake::arrow::datatypes::{DataType, Int64Type, UInt64Type};
    let step = column.len().div_ceil(DICTIONARY_SAMPLE).max(1);
    let indices: UInt32Array = (0..column.len())
        .step_by(step)
        .filter_map(|i| u32::try_from(i).ok())
        .collect();
    let sampled_rows = indices.len();
    let counted = |values: Result<std::sync::Arc<dyn Array>, _>| -> Option<(usize, usize)> {
        let values = values.ok()?;
        let (count, repeats) = match values.data_type() {
            DataType::Int64 => count_repeats(values.as_primitive::<Int64Type>().iter().flatten()),
            DataType::UInt64 => count_repeats(values.as_primitive::<UInt64Type>().iter().flatten()),
            DataType::LargeBinary => count_repeats(values.as_binary::<i64>().iter().flatten()),
            _ => return None,
        };
        Some((count, repeats))
    };
    let sample = || take(column, &indices, None);
    let judged = match column.data_type() {
        DataType::UInt64 => counted(sample()),
        other if integer_like(other) => counted(sample().and_then(|s| cast(&s, &DataType::Int64))),
        DataType::Utf8
        | DataType::LargeUtf8
        | DataType::Utf8View
        | DataType::Binary
        | DataType::LargeBinary
        | DataType::BinaryView => counted(sample().and_then(|s| cast(&s, &DataType::LargeBinary))),
        _ => None,
    };
    let Some((values, repeats)) = judged else {
        return true;
    };
    // The file's non-null values, at the sample's share of non-nulls.
    let file_values = (file_rows as u128 * values as u128 / sampled_rows.max(1) as u128) as usize;
    // Too few values to judge, or a small file (a quarter of it sampled), where a dictionary
    // costs little either way.
    if values < 64 || values.saturating_mul(4) > file_values {
        return true;
    }
    repeats as u128 * file_values as u128 >= values as u128 * values as u128
}

/// How many `values` there are, and how many of them equal another before them.
fn count_repeats<T: Ord>(values: impl Iterator<Item = T>) -> (usize, usize) {
    let mut values: Vec<T> = values.collect();
    values.sort_unstable();
    let repeats = values.windows(2).filter(|w| w[0] == w[1]).count();
    (values.len(), repeats)
}

fn encode_parquet(
    batch: &RecordBatch,
    compression: Compression,
    delta_encoding: bool,
) -> Result<Vec<u8>, SilverError> {
    let properties = writer_properties(
        compression,
        delta_encoding,
        batch.schema_ref(),
        Some(batch),
        batch.num_rows(),
    )
    .build();
    let mut buffer = Vec::with_capacity(batch.get_array_memory_size() / 4);
    let mut writer = ArrowWriter::try_new(&mut buffer, batch.schema(), Some(properties))?;
    writer.write(batch)?;
    writer.close()?;
    Ok(buffer)
}

// The fixtures (generated orders) come with the `demo` feature, which `make test` turns on.
#[cfg(all(test, feature = "demo"))]
mod tests;

pub mod rolling;

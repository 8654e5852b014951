//! The Silver tables of one replica: one per Avro record name, each with its reader schema,
//! decoder, file writer, committer and per-partition buffers.
//!
//! A table's reader schema can change while it runs (`STRATA_READER_SCHEMA=latest`): the table
//! gains the new columns in one metadata commit first, and rows already buffered in the old shape
//! are widened when written, so a schema change never starts extra files.

use std::collections::{BTreeMap, HashMap, HashSet};

use tokio_util::sync::CancellationToken;

use deltalake::arrow::array::RecordBatch;
use deltalake::kernel::Add;

use crate::config::{Config, ReaderSchemas, SubjectStrategy};
use crate::lake;
use crate::lake::commit::{CommitError, TableCommitter};
use crate::lake::files::rolling::RollingFiles;
use crate::lake::files::{FilePolicy, SilverError, SilverWriter, WriteProgress};
use crate::models::TopicPartition;
use crate::ops::{Metrics, NotReady};
use crate::retry::{Pace, Retry};
use crate::schema::lookup::{ask_registry, Answer, Ask};
use crate::schema::reader::{readers_from_version, ReaderSchema};
use crate::schema::registry::SchemaRegistry;
use crate::silver::decode::BatchDecoder;

/// Buffered work of one source partition for one table.
#[derive(Default)]
pub struct TablePart {
    /// The last offset this table holds for the partition (its stored `txn`): records at or
    /// below it are already in the table and are skipped.
    pub committed: Option<i64>,
    pub batches: Vec<RecordBatch>,
    pub rows: usize,
    pub bytes: usize,
}

pub use crate::lake::OpenError;

/// Files uploaded for buffered rows and not committed yet. A flush that failed keeps them, so its
/// retry uploads only what is missing. A commit, a fence, a schema change or dropping any of the
/// rows they hold ends them (files never committed are left to vacuum).
#[derive(Default)]
pub struct Uploads {
    /// Files of batches written in full.
    files: Vec<Add>,
    /// Per partition, how many of its buffered batches `files` hold (its first ones).
    covered: HashMap<TopicPartition, usize>,
    /// A write that failed part-way: per partition the batches it covers (up to), and the files
    /// of it that landed.
    writing: Option<(BTreeMap<TopicPartition, usize>, WriteProgress)>,
    /// Files being written in the background as rows are buffered, and per partition how many of
    /// its buffered batches they take (its first ones, counted like `covered`). Dropping them
    /// (any reset of the uploads) abandons those files.
    rolling: Option<(RollingFiles, HashMap<TopicPartition, usize>)>,
}

impl Uploads {
    fn holds(&self, tp: &TopicPartition) -> bool {
        self.covered.contains_key(tp)
            || self
                .rolling
                .as_ref()
                .is_some_and(|(_, sent)| sent.contains_key(tp))
            || self
                .writing
                .as_ref()
                .is_some_and(|(until, _)| until.contains_key(tp))
    }

    /// The sizes of the files written in full (those a commit takes).
    pub fn sizes(&self) -> Vec<i64> {
        self.files.iter().map(|f| f.size).collect()
    }

    /// Files uploaded so far (written in full or part of an unfinished write).
    pub fn file_count(&self) -> usize {
        self.files.len()
            + self
                .writing
                .as_ref()
                .map_or(0, |(_, progress)| progress.files.len())
    }
}

/// Why a reader schema could not be adopted.
#[derive(Debug, thiserror::Error)]
pub enum EvolveError {
    /// The new version cannot become the table's schema (named columns); the old one stays.
    #[error("{0}")]
    Refused(String),
    /// The lake could not be read or written: try again.
    #[error(transparent)]
    Storage(#[from] CommitError),
}

pub struct SilverTable {
    pub name: String,
    pub reader: ReaderSchema,
    pub decoder: BatchDecoder,
    pub writer: SilverWriter,
    pub committer: TableCommitter,
    pub parts: HashMap<TopicPartition, TablePart>,
    /// Newest event time committed per partition (microseconds): the table's watermark is their
    /// minimum over the owned partitions.
    pub event_high: HashMap<TopicPartition, i64>,
    /// Files uploaded for the buffered rows and not committed yet.
    pub uploads: Uploads,
    /// Kept uploads older than this are written again: vacuum may delete files no version
    /// references once they are older than `STRATA_VACUUM_RETENTION` (half of it, here).
    uploads_max_age: std::time::Duration,
    /// Registry versions this table refused to evolve to (asked once each).
    refused_versions: HashSet<u32>,
}

impl SilverTable {
    /// Opens (or creates) the table of `reader` and makes it able to hold the reader's rows.
    pub async fn open(config: &Config, reader: ReaderSchema) -> Result<Self, OpenError> {
        let name = reader.table_name();
        let decoder = BatchDecoder::new(&reader.json, &config.event_time_field, 8192)
            .map_err(|e| OpenError::Schema(format!("table {name}: {e}")))?
            .with_compatibility(config.compatibility)
            .with_max_value_bytes(config.max_value_bytes)
            .with_reader_id(reader.id);
        let url = lake::table_url(&config.lake_url, "silver", &name)
            .map_err(|e| OpenError::Schema(format!("table {name}: {e}")))?;
        let table = lake::open_or_create(url, &decoder.output_schema(), &name)
            .await
            .map_err(|e| OpenError::Storage(format!("table {name}: {e}")))?;
        // Strata's progress must never expire: an operator has to unset the property.
        lake::maintenance::check_txn_retention(&table)
            .map_err(|e| OpenError::Schema(format!("table {name}: {e}")))?;
        let store = table.object_store();
        let mut committer = TableCommitter::new(table, &config.group_id, config.commit_retries)
            .with_checkpoint_interval(config.maintenance.checkpoint_interval);
        let evolution = committer
            .evolve(&decoder.output_schema())
            .await
            .map_err(|e| match e {
                CommitError::Schema(why) => OpenError::Schema(format!("table {name}: {why}")),
                other => OpenError::Storage(format!("table {name}: {other}")),
            })?;
        let writer = SilverWriter::new(
            evolution.file_schema,
            &config.event_time_field,
            FilePolicy::from_config(config),
            store,
        );
        tracing::info!(table = %name, record = %reader.record, subject = ?reader.subject, schema_id = ?reader.id, "table open");
        Ok(Self {
            name,
            reader,
            decoder,
            writer,
            committer,
            parts: HashMap::new(),
            event_high: HashMap::new(),
            uploads: Uploads::default(),
            uploads_max_age: config.maintenance.retention.files / 2,
            refused_versions: HashSet::new(),
        })
    }

    /// Whether `id` is a registry version this table should try to adopt.
    pub fn wants_version(&self, id: u32) -> bool {
        self.reader.id != Some(id) && !self.refused_versions.contains(&id)
    }

    /// Adopts a newer reader schema: the table gains its new columns (nullable) in one metadata
    /// commit, every writer schema met is judged again, and buffered rows keep their files.
    pub async fn evolve(&mut self, next: ReaderSchema) -> Result<(), EvolveError> {
        let refuse = |this: &mut Self, why: String| {
            if let Some(id) = next.id {
                this.refused_versions.insert(id);
            }
            Err(EvolveError::Refused(why))
        };
        if next.record != self.reader.record {
            let why = format!(
                "version {:?} of {:?} is record {}, the table holds {}",
                next.id, next.subject, next.record, self.reader.record
            );
            return refuse(self, why);
        }
        let decoder = match self.decoder.with_reader(&next.json, next.id) {
            Ok(decoder) => decoder,
            Err(e) => return refuse(self, e.to_string()),
        };
        let evolution = match self.committer.evolve(&decoder.output_schema()).await {
            Ok(evolution) => evolution,
            Err(CommitError::Schema(why)) => return refuse(self, why),
            Err(e) => return Err(e.into()),
        };
        let added: Vec<&str> = evolution.added.iter().map(|f| f.name().as_str()).collect();
        tracing::info!(table = %self.name, from = ?self.reader.id, to = ?next.id, ?added, "reader schema evolved");
        self.decoder = decoder;
        // Files already uploaded have the old shape: rows are written again in the new one.
        self.uploads = Uploads::default();
        self.writer.set_schema(evolution.file_schema);
        self.reader = next;
        Ok(())
    }

    /// Buffered rows and bytes of all partitions.
    pub fn buffered(&self) -> (usize, usize) {
        self.parts
            .values()
            .fold((0, 0), |(r, b), p| (r + p.rows, b + p.bytes))
    }

    /// Buffers `batch`, rows of `tp`. While every batch buffered before it is in a file or on its
    /// way into one, it goes to the rolling files too, which encode it beside decoding; otherwise
    /// (after a failed flush, or when the rolling files failed) the flush writes it.
    pub fn buffer(&mut self, tp: &TopicPartition, batch: RecordBatch) {
        if self.uploads.rolling.is_none() && self.uploads.writing.is_none() {
            let covered = &self.uploads.covered;
            let all_covered = self
                .parts
                .iter()
                .all(|(tp, p)| p.batches.len() == covered.get(tp).copied().unwrap_or(0));
            if all_covered {
                let files = RollingFiles::start(self.writer.clone());
                self.uploads.rolling = Some((files, covered.clone()));
            }
        }
        let part = self.parts.entry(tp.clone()).or_default();
        part.rows += batch.num_rows();
        part.bytes += batch.get_array_memory_size();
        part.batches.push(batch.clone());
        let count = part.batches.len();
        if let Some((files, sent)) = &mut self.uploads.rolling {
            let in_step = sent.get(tp).copied().unwrap_or(0) + 1 == count;
            if in_step && files.push(batch) {
                sent.insert(tp.clone(), count);
            } else {
                // The task failed: what it wrote is not taken, and the flush writes these rows.
                self.uploads.rolling = None;
            }
        }
    }

    /// Uploads the buffered batches of `partitions` that no file holds yet, and returns every
    /// uploaded, uncommitted file of them. On an error the files that landed are kept, so the
    /// next call uploads only the rest.
    pub async fn upload(&mut self, partitions: &[TopicPartition]) -> Result<Vec<Add>, SilverError> {
        if let Some((files, sent)) = self.uploads.rolling.take() {
            // Most of the encoding is done by now: only the open files' last row groups remain.
            match files.finish().await {
                Ok(added) => {
                    self.uploads.files.extend(added);
                    self.uploads.covered.extend(sent);
                }
                Err(e) => {
                    tracing::warn!(table = %self.name, error = %e,
                        "rolling files failed; writing their rows from the buffer");
                }
            }
        }
        if self
            .uploads
            .covered
            .keys()
            .any(|tp| !partitions.contains(tp))
        {
            // Files holding rows of a partition not committed now cannot be committed with them.
            self.uploads = Uploads::default();
        }
        let oldest = self
            .uploads
            .files
            .iter()
            .chain(
                self.uploads
                    .writing
                    .iter()
                    .flat_map(|(_, p)| p.files.iter()),
            )
            .map(|f| f.modification_time)
            .min();
        let max_age = i64::try_from(self.uploads_max_age.as_millis()).unwrap_or(i64::MAX);
        if oldest.is_some_and(|t| chrono::Utc::now().timestamp_millis() - t > max_age) {
            // Vacuum may already have removed them (nothing references them yet): write again.
            tracing::warn!(table = %self.name, "kept uploads are too old to trust; writing them again");
            self.uploads = Uploads::default();
        }
        loop {
            let (until, mut progress) = match self.uploads.writing.take() {
                Some(writing) => writing,
                None => {
                    let until: BTreeMap<TopicPartition, usize> = partitions
                        .iter()
                        .filter_map(|tp| {
                            let buffered = self.parts.get(tp)?.batches.len();
                            let covered = self.uploads.covered.get(tp).copied().unwrap_or(0);
                            (buffered > covered).then(|| (tp.clone(), buffered))
                        })
                        .collect();
                    if until.is_empty() {
                        return Ok(self.uploads.files.clone());
                    }
                    (until, WriteProgress::default())
                }
            };
            let batches: Vec<RecordBatch> = until
                .iter()
                .flat_map(|(tp, until)| {
                    let from = self.uploads.covered.get(tp).copied().unwrap_or(0);
                    // `covered` and `until` count batches that are still buffered: every reset
                    // of the buffer resets the uploads too.
                    self.parts
                        .get(tp)
                        .and_then(|p| p.batches.get(from..*until))
                        .unwrap_or_default()
                        .iter()
                        .cloned()
                })
                .collect();
            if let Err(e) = self.writer.write_resuming(&batches, &mut progress).await {
                self.uploads.writing = Some((until, progress));
                return Err(e);
            }
            self.uploads.files.extend(progress.files);
            self.uploads.covered.extend(until);
        }
    }

    /// Drops the buffered work of `tp`; returns the rows dropped.
    pub fn drop_work(&mut self, tp: &TopicPartition) -> usize {
        if self.uploads.holds(tp) {
            // Those files hold rows being dropped: none of them may be committed.
            self.uploads = Uploads::default();
        }
        let Some(part) = self.parts.get_mut(tp) else {
            return 0;
        };
        let rows = part.rows;
        part.batches.clear();
        part.rows = 0;
        part.bytes = 0;
        rows
    }
}

/// The table set shared by the pipeline: lookup by record name.
#[derive(Default)]
pub struct Tables {
    pub list: Vec<SilverTable>,
}

impl Tables {
    pub fn by_record(&self, record: &str) -> Option<usize> {
        self.list.iter().position(|t| t.reader.record == record)
    }

    pub fn names(&self) -> Vec<String> {
        self.list.iter().map(|t| t.name.clone()).collect()
    }

    /// Where a partition resumes: after the smallest offset all tables hold (`None` when any table
    /// holds nothing of it: the group's offset or `auto.offset.reset` decides).
    pub fn resume_after(&self, tp: &TopicPartition) -> Option<i64> {
        let mut lowest: Option<i64> = None;
        for table in &self.list {
            let committed = table.parts.get(tp).and_then(|p| p.committed)?;
            lowest = Some(lowest.map_or(committed, |l| l.min(committed)));
        }
        lowest
    }

    pub fn buffered(&self) -> (usize, usize) {
        self.list.iter().fold((0, 0), |(r, b), t| {
            let (tr, tb) = t.buffered();
            (r + tr, b + tb)
        })
    }
}

/// Why the tables could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum TablesError {
    /// A reader schema or subject cannot make a table: the configuration must change.
    #[error("{0}")]
    Refused(String),
    /// Shutdown came while the registry or the lake was waited for.
    #[error("shut down while opening the tables")]
    Interrupted,
    /// A reader schema that cannot make a table.
    #[error(transparent)]
    Reader(#[from] crate::schema::reader::ReaderError),
}

/// The tables known at start-up: one per reader schema file, or under `latest` one per subject of
/// the configured topics (more may open later, as record types are met).
pub async fn open_tables(
    config: &Config,
    registry: &SchemaRegistry,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) -> Result<Tables, TablesError> {
    let mut readers: Vec<ReaderSchema> = Vec::new();
    match &config.reader_schemas {
        ReaderSchemas::Files(paths) => {
            for path in paths {
                readers.extend(ReaderSchema::read(path)?);
            }
        }
        ReaderSchemas::Latest => {
            let subjects: Vec<String> = match config.subject_strategy {
                SubjectStrategy::Topic => config
                    .topics
                    .iter()
                    .map(|t| config.subject_strategy.subject(t, ""))
                    .collect(),
                SubjectStrategy::TopicRecord => {
                    match ask_registry(registry, metrics, shutdown, Ask::Subjects).await {
                        Answer::Subjects(all) => all
                            .into_iter()
                            .filter(|s| {
                                config.topics.iter().any(|t| {
                                    s.strip_prefix(t.as_str()).is_some_and(|rest| {
                                        rest.starts_with('-') && rest != "-value" && rest != "-key"
                                    })
                                })
                            })
                            .collect(),
                        Answer::Refused(e) => return Err(TablesError::Refused(e.to_string())),
                        _ => return Err(TablesError::Interrupted),
                    }
                }
                // Subjects are record names: tables open as their records are met.
                SubjectStrategy::Record => Vec::new(),
            };
            for subject in subjects {
                match ask_registry(registry, metrics, shutdown, Ask::Latest(&subject)).await {
                    Answer::Version(version) => readers.extend(readers_from_version(&version)?),
                    Answer::Refused(e) => {
                        return Err(TablesError::Refused(format!(
                            "STRATA_READER_SCHEMA=latest: {e}"
                        )))
                    }
                    _ => return Err(TablesError::Interrupted),
                }
            }
        }
    }
    let mut tables = Tables::default();
    for reader in readers {
        if tables.by_record(&reader.record).is_some() {
            continue; // two topics' subjects with one record type feed one table
        }
        if let Some(other) = tables.list.iter().find(|t| t.name == reader.table_name()) {
            return Err(TablesError::Refused(format!(
                "records {} and {} would share the table {}",
                other.reader.record,
                reader.record,
                reader.table_name()
            )));
        }
        let table = open_table(config, reader, metrics, shutdown)
            .await?
            .map_err(|e| TablesError::Refused(e.to_string()))?;
        tables.list.push(table);
    }
    Ok(tables)
}

/// Opens a table, waiting out an unreachable lake (not ready meanwhile). The inner error is a
/// schema that cannot make the table; the outer one a shutdown during the wait.
pub async fn open_table(
    config: &Config,
    reader: ReaderSchema,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) -> Result<Result<SilverTable, OpenError>, TablesError> {
    let mut retry = Retry::new(Pace::Outage, shutdown);
    loop {
        // One attempt can take minutes against an unreachable store (the client's own retries):
        // a signal must not wait for it.
        let attempt = tokio::select! {
            attempt = SilverTable::open(config, reader.clone()) => attempt,
            _ = shutdown.cancelled() => return Err(TablesError::Interrupted),
        };
        match attempt {
            Ok(table) => {
                metrics.not_ready(NotReady::Lake, false);
                return Ok(Ok(table));
            }
            Err(refused @ OpenError::Schema(_)) => return Ok(Err(refused)),
            Err(OpenError::Storage(why)) => {
                metrics.not_ready(NotReady::Lake, true);
                tracing::warn!(error = %why, "opening the table failed; retrying");
                if !retry.wait().await {
                    return Err(TablesError::Interrupted);
                }
            }
        }
    }
}

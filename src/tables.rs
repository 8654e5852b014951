//! The Silver tables of one replica: one per Avro record name, each with its reader schema,
//! decoder, file writer, committer and per-partition buffers.
//!
//! A table's reader schema can change while it runs (`STRATA_READER_SCHEMA=latest`): the table
//! gains the new columns in one metadata commit first, and rows already buffered in the old shape
//! are widened when written, so a schema change never starts extra files.

use std::collections::{HashMap, HashSet};

use deltalake::arrow::array::RecordBatch;

use crate::commit::{CommitError, TableCommitter};
use crate::config::Config;
use crate::decode::BatchDecoder;
use crate::lake;
use crate::models::TopicPartition;
use crate::silver::{FilePolicy, SilverWriter};

/// A reader schema and where it came from.
#[derive(Debug, Clone)]
pub struct ReaderSchema {
    pub json: String,
    /// The record's full name (`shop.Order`): the routing key of its table.
    pub record: String,
    /// Under `latest`: the registry subject followed, and the schema id of this version.
    pub subject: Option<String>,
    pub id: Option<u32>,
}

impl ReaderSchema {
    /// Parses `json`, which must be a record. `origin` names where it came from, for errors.
    pub fn parse(json: &str, origin: &str) -> Result<Self, String> {
        match apache_avro::Schema::parse_str(json) {
            Ok(apache_avro::Schema::Record(record)) => Ok(Self {
                json: json.to_string(),
                record: record.name.fullname(None),
                subject: None,
                id: None,
            }),
            Ok(other) => Err(format!(
                "{origin}: top-level type must be a record, not {:?}",
                apache_avro::schema::SchemaKind::from(&other)
            )),
            Err(e) => Err(format!("{origin}: not a valid Avro schema: {e}")),
        }
    }

    /// The record types of `json`: the record itself, or each record branch of a top-level union
    /// (one topic, several record types: each gets its own table).
    pub fn parse_all(json: &str, origin: &str) -> Result<Vec<Self>, String> {
        let Ok(apache_avro::Schema::Union(union)) = apache_avro::Schema::parse_str(json) else {
            return Self::parse(json, origin).map(|one| vec![one]);
        };
        let mut out = Vec::new();
        for (index, variant) in union.variants().iter().enumerate() {
            if let Some(branch) = branch_json(variant) {
                out.push(Self::parse(
                    &branch,
                    &format!("{origin}, union branch {index}"),
                )?);
            }
        }
        if out.is_empty() {
            return Err(format!(
                "{origin}: a top-level union without a record branch"
            ));
        }
        Ok(out)
    }

    /// Reads a reader schema file (a record, or a union of records).
    pub fn read(path: &std::path::Path) -> Result<Vec<Self>, String> {
        let origin = format!("STRATA_READER_SCHEMA={}", path.display());
        let json = std::fs::read_to_string(path).map_err(|e| format!("{origin}: {e}"))?;
        Self::parse_all(&json, &origin)
    }

    /// The table name: the record's short name in snake_case.
    pub fn table_name(&self) -> String {
        lake::snake_case(&self.record)
    }
}

/// A union branch as a standalone record schema, if it is a record that does not depend on types
/// defined in other branches.
pub fn branch_json(variant: &apache_avro::Schema) -> Option<String> {
    if !matches!(variant, apache_avro::Schema::Record(_)) {
        return None;
    }
    let json = serde_json::to_string(variant).ok()?;
    apache_avro::Schema::parse_str(&json).ok().map(|_| json)
}

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

/// Why a table could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The reader schema cannot make this table (no event time field, a column of another type in
    /// the existing table, …): retrying cannot help.
    #[error("{0}")]
    Schema(String),
    /// The lake could not be reached: try again.
    #[error("{0}")]
    Storage(String),
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
        let store = table.object_store();
        let mut committer = TableCommitter::new(table, &config.group_id, config.commit_retries);
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

    /// Drops the buffered work of `tp`; returns the rows dropped.
    pub fn drop_work(&mut self, tp: &TopicPartition) -> usize {
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

    /// The largest offset any table holds: a record routed to no table was dead-lettered already
    /// if some table committed past it (dead letters are acknowledged before any commit).
    pub fn highest_committed(&self, tp: &TopicPartition) -> Option<i64> {
        self.list
            .iter()
            .filter_map(|t| t.parts.get(tp).and_then(|p| p.committed))
            .max()
    }

    pub fn buffered(&self) -> (usize, usize) {
        self.list.iter().fold((0, 0), |(r, b), t| {
            let (tr, tb) = t.buffered();
            (r + tr, b + tb)
        })
    }
}

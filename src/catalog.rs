//! The schema side of a replica: registry questions, retried through outages and never blamed on
//! a record; reader schemas from files or registry subjects; and opening the Silver tables they
//! define, waiting out an unreachable lake. The pipeline decides when to ask; this module only
//! knows how.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::config::{Config, ReaderSchemas, SubjectStrategy};
use crate::metrics::{Metrics, NotReady};
use crate::models::{ErrorKind, Rejection};
use crate::pipeline::PipelineError;
use crate::registry::{RegistryError, SchemaRegistry, SubjectVersion};
use crate::tables::{OpenError, ReaderSchema, SilverTable, Tables};
use crate::wire;

/// The rejection of a value whose Confluent framing is broken.
pub fn frame_rejection(error: &wire::WireError) -> Rejection {
    let kind = match error {
        wire::WireError::Empty => ErrorKind::EmptyValue,
        _ => ErrorKind::BadMagic,
    };
    Rejection::new(kind, error.to_string())
}

/// A registry question.
pub enum Ask<'a> {
    Id(u32),
    Latest(&'a str),
    Subjects,
}

/// Its answer: what was asked for, a refusal that is a fact (not found, not Avro), or nothing
/// because the replica is shutting down during an outage.
pub enum Answer {
    Schema(Arc<str>),
    Version(SubjectVersion),
    Subjects(Vec<String>),
    Refused(RegistryError),
    ShuttingDown,
}

pub async fn ask_registry(
    registry: &SchemaRegistry,
    metrics: &Metrics,
    shutdown: &CancellationToken,
    question: Ask<'_>,
) -> Answer {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
    loop {
        let (answer, what) = match &question {
            Ask::Id(id) => (
                registry.schema_by_id(*id).await.map(Answer::Schema),
                format!("schema id {id}"),
            ),
            Ask::Latest(subject) => (
                registry.latest(subject).await.map(Answer::Version),
                format!("subject {subject}"),
            ),
            Ask::Subjects => (
                registry.subjects().await.map(Answer::Subjects),
                "subjects".to_string(),
            ),
        };
        match answer {
            Ok(answer) => {
                metrics.not_ready(NotReady::Registry, false);
                return answer;
            }
            Err(e) => {
                metrics.registry_error(e.kind(), &what, &e.to_string());
                if !e.is_retryable() {
                    metrics.not_ready(NotReady::Registry, false);
                    return Answer::Refused(e);
                }
                metrics.not_ready(NotReady::Registry, true);
                if !backoff.wait_unless(shutdown).await {
                    return Answer::ShuttingDown;
                }
            }
        }
    }
}

/// The reader schemas of a subject version (several when it is a union of records), each
/// remembering the subject and id it came from.
pub fn readers_from_version(version: &SubjectVersion) -> Result<Vec<ReaderSchema>, String> {
    let mut readers = ReaderSchema::parse_all(
        &version.schema,
        &format!("subject {} version {}", version.subject, version.version),
    )?;
    for reader in &mut readers {
        reader.subject = Some(version.subject.clone());
        reader.id = Some(version.id);
    }
    Ok(readers)
}

/// The reader schema of record `record` in a subject version.
pub fn reader_from_version(version: &SubjectVersion, record: &str) -> Result<ReaderSchema, String> {
    readers_from_version(version)?
        .into_iter()
        .find(|r| r.record == record)
        .ok_or_else(|| {
            format!(
                "subject {} version {} has no record {record}",
                version.subject, version.version
            )
        })
}

/// The tables known at start-up: one per reader schema file, or under `latest` one per subject of
/// the configured topics (more may open later, as record types are met).
pub async fn open_tables(
    config: &Config,
    registry: &SchemaRegistry,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) -> Result<Tables, PipelineError> {
    let mut readers: Vec<ReaderSchema> = Vec::new();
    match &config.reader_schemas {
        ReaderSchemas::Files(paths) => {
            for path in paths {
                readers.extend(ReaderSchema::read(path).map_err(PipelineError::Config)?);
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
                        Answer::Refused(e) => return Err(PipelineError::Config(e.to_string())),
                        _ => return Err(PipelineError::Interrupted),
                    }
                }
                // Subjects are record names: tables open as their records are met.
                SubjectStrategy::Record => Vec::new(),
            };
            for subject in subjects {
                match ask_registry(registry, metrics, shutdown, Ask::Latest(&subject)).await {
                    Answer::Version(version) => readers
                        .extend(readers_from_version(&version).map_err(PipelineError::Config)?),
                    Answer::Refused(e) => {
                        return Err(PipelineError::Config(format!(
                            "STRATA_READER_SCHEMA=latest: {e}"
                        )))
                    }
                    _ => return Err(PipelineError::Interrupted),
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
            return Err(PipelineError::Config(format!(
                "records {} and {} would share the table {}",
                other.reader.record,
                reader.record,
                reader.table_name()
            )));
        }
        let table = open_table(config, reader, metrics, shutdown)
            .await?
            .map_err(PipelineError::Config)?;
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
) -> Result<Result<SilverTable, String>, PipelineError> {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
    loop {
        // One attempt can take minutes against an unreachable store (the client's own retries):
        // a signal must not wait for it.
        let attempt = tokio::select! {
            attempt = SilverTable::open(config, reader.clone()) => attempt,
            _ = shutdown.cancelled() => return Err(PipelineError::Interrupted),
        };
        match attempt {
            Ok(table) => {
                metrics.not_ready(NotReady::Lake, false);
                return Ok(Ok(table));
            }
            Err(OpenError::Schema(why)) => return Ok(Err(why)),
            Err(OpenError::Storage(why)) => {
                metrics.not_ready(NotReady::Lake, true);
                tracing::warn!(error = %why, "opening the table failed; retrying");
                if !backoff.wait_unless(shutdown).await {
                    return Err(PipelineError::Interrupted);
                }
            }
        }
    }
}

//! The topology of one replica, and the only module that knows it:
//! source → decode (+ dead letters) → per-partition buffers → Silver files → commit → group offsets.
//!
//! Buffers are kept per source partition so that work of a fenced or lost partition can be dropped
//! without touching the others. A flush writes one set of files for all owned partitions and makes
//! one Delta commit (see `commit` for the rule that makes it exactly once).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use deltalake::arrow::array::RecordBatch;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::commit::{CommitError, CommitOutcome, Fenced, TableCommitter};
use crate::config::Config;
use crate::decode::BatchDecoder;
use crate::dlq::DeadLetters;
use crate::lake;
use crate::metrics::{Metrics, NotReady};
use crate::models::{Rejection, SourceRecord, TopicPartition};
use crate::registry::{RegistryError, SchemaRegistry};
use crate::silver::{FilePolicy, SilverError, SilverWriter};
use crate::source::{Source, SourceCommand, SourceEvent, SourceSettings};
use crate::wire;

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("configuration: {0}")]
    Config(String),
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("delta table: {0}")]
    Delta(#[from] deltalake::DeltaTableError),
    #[error("commit: {0}")]
    Commit(#[from] CommitError),
    #[error("writing files: {0}")]
    Silver(#[from] SilverError),
    #[error("metrics endpoint: {0}")]
    Io(#[from] std::io::Error),
    #[error("shutdown did not finish within the grace period of {0:?}")]
    GraceExceeded(Duration),
}

/// What a replica did, for the demo's summary and for tests.
#[derive(Debug, Default, Clone)]
pub struct RunSummary {
    pub records_consumed: u64,
    pub rows_committed: u64,
    pub dead_lettered: u64,
    pub duplicates_skipped: u64,
    pub files: u64,
    pub commits: u64,
    pub fenced_partitions: u64,
}

/// Per owned partition: what is buffered and where consumption stands.
#[derive(Default)]
struct PartitionState {
    /// Records below this offset are already in the table or the buffer (a replay): skipped.
    next_offset: Option<i64>,
    batches: Vec<RecordBatch>,
    rows: usize,
    bytes: usize,
    /// Last offset handled (a buffered row or an acknowledged dead letter) and not yet committed.
    pending_last: Option<i64>,
    /// After fencing, records are ignored until the source confirms the seek back.
    awaiting_reseek: bool,
}

/// Reads the reader schema and returns its JSON and the table name (its record name, snake_case).
pub fn reader_schema(path: &std::path::Path) -> Result<(String, String), PipelineError> {
    let json = std::fs::read_to_string(path).map_err(|e| {
        PipelineError::Config(format!("STRATA_READER_SCHEMA={}: {e}", path.display()))
    })?;
    let schema = apache_avro::Schema::parse_str(&json).map_err(|e| {
        PipelineError::Config(format!(
            "STRATA_READER_SCHEMA={}: not a valid Avro schema: {e}",
            path.display()
        ))
    })?;
    match schema {
        apache_avro::Schema::Record(record) => Ok((json, lake::snake_case(record.name.name()))),
        _ => Err(PipelineError::Config(format!(
            "STRATA_READER_SCHEMA={}: top-level type must be a record",
            path.display()
        ))),
    }
}

struct Replica {
    config: Config,
    metrics: Arc<Metrics>,
    table_name: String,
    registry: SchemaRegistry,
    decoder: BatchDecoder,
    writer: SilverWriter,
    committer: TableCommitter,
    dead_letters: DeadLetters,
    source: Source,
    parts: HashMap<TopicPartition, PartitionState>,
    buffered_rows: usize,
    buffered_bytes: usize,
    oldest: Option<Instant>,
    summary: RunSummary,
    shutdown: CancellationToken,
}

/// Runs one replica until `shutdown` is cancelled, then flushes, commits, leaves the group and
/// returns what it did.
pub async fn run(
    config: Config,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Result<RunSummary, PipelineError> {
    lake::register_object_stores();
    let (reader_json, table_name) = reader_schema(&config.reader_schema_path)?;
    let decoder = BatchDecoder::new(&reader_json, &config.event_time_field, 8192)
        .map_err(|e| PipelineError::Config(e.to_string()))?
        .with_compatibility(config.compatibility);
    let registry = SchemaRegistry::from_config(&config.registry)
        .map_err(|e| PipelineError::Config(e.to_string()))?;
    let url = lake::table_url(&config.lake_url, "silver", &table_name)?;
    let table = lake::open_or_create(url, &decoder.output_schema(), &table_name).await?;
    let writer = SilverWriter::new(
        decoder.output_schema(),
        decoder.event_time_index(),
        FilePolicy {
            max_rows: config.file_max_rows,
            max_bytes: config.file_max_bytes,
            compression: config.compression,
        },
        table.object_store(),
    );
    let committer = TableCommitter::new(table, &config.group_id, config.commit_retries);
    let dead_letters = DeadLetters::new(
        &config.brokers,
        &config.kafka_properties,
        &config.dlq_suffix,
    )?;
    metrics
        .buffered_bytes_limit
        .set(config.file_max_bytes as i64);

    let (listener, bound) = crate::metrics::bind(config.metrics_addr).await?;
    tracing::info!(addr = %bound, table = %table_name, "serving /metrics, /healthz and /readyz");
    let server_stop = CancellationToken::new();
    let server = tokio::spawn(crate::metrics::serve(
        listener,
        metrics.clone(),
        server_stop.clone(),
    ));

    let (events_tx, mut events) = mpsc::channel(16);
    let source = Source::start(
        SourceSettings {
            brokers: config.brokers.clone(),
            group_id: config.group_id.clone(),
            topics: config.topics.clone(),
            properties: config.kafka_properties.clone(),
        },
        metrics.clone(),
        events_tx,
    )?;
    metrics.not_ready(NotReady::Starting, false);

    let mut replica = Replica {
        config,
        metrics: metrics.clone(),
        table_name,
        registry,
        decoder,
        writer,
        committer,
        dead_letters,
        source,
        parts: HashMap::new(),
        buffered_rows: 0,
        buffered_bytes: 0,
        oldest: None,
        summary: RunSummary::default(),
        shutdown: shutdown.clone(),
    };
    let result = replica.consume(&mut events).await;
    metrics.not_ready(NotReady::ShuttingDown, true);
    let grace = replica.config.shutdown_grace;
    let deadline = tokio::time::Instant::now() + grace;
    let drained = match result {
        Ok(()) => tokio::time::timeout_at(deadline, replica.drain(&mut events))
            .await
            .map_err(|_| PipelineError::GraceExceeded(grace))
            .and_then(|drain| drain),
        Err(e) => Err(e),
    };
    replica.source.stop();
    // Answer the final revocation so the source can leave the group, then wait for its thread.
    let closing = async {
        while let Some(event) = events.recv().await {
            replica.answer_while_closing(event);
        }
    };
    let leave_by = deadline.max(tokio::time::Instant::now() + Duration::from_secs(2));
    let _ = tokio::time::timeout_at(leave_by, closing).await;
    // Closing the channel unblocks the source thread if it still waits to hand something over.
    drop(events);
    let Replica {
        source, summary, ..
    } = replica;
    let _ = tokio::task::spawn_blocking(move || source.join()).await;
    server_stop.cancel();
    let _ = server.await;
    drained.map(|()| summary)
}

impl Replica {
    async fn consume(
        &mut self,
        events: &mut mpsc::Receiver<SourceEvent>,
    ) -> Result<(), PipelineError> {
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return Ok(()),
                event = events.recv() => match event {
                    Some(event) => self.handle(event).await?,
                    None => return Ok(()),
                },
                _ = tick.tick() => {
                    if self.oldest.is_some_and(|t| t.elapsed() >= self.config.flush_interval) {
                        self.flush().await?;
                    }
                }
            }
        }
    }

    /// After shutdown: commit everything complete.
    async fn drain(
        &mut self,
        events: &mut mpsc::Receiver<SourceEvent>,
    ) -> Result<(), PipelineError> {
        // Records already handed over are processed, so their offsets can commit with the rest.
        while let Ok(event) = events.try_recv() {
            self.handle(event).await?;
        }
        self.flush().await
    }

    fn answer_while_closing(&mut self, event: SourceEvent) {
        match event {
            SourceEvent::Revoked {
                partitions, done, ..
            } => {
                // Everything complete was committed by `drain`; what is left is dropped, not lost:
                // the next owner resumes from the table.
                self.forget(&partitions);
                let _ = done.send(());
            }
            SourceEvent::Assigned { reply, .. } => drop(reply),
            SourceEvent::Records(_) | SourceEvent::Reseeked(_) => {}
        }
    }

    async fn handle(&mut self, event: SourceEvent) -> Result<(), PipelineError> {
        match event {
            SourceEvent::Records(records) => self.on_records(records).await,
            SourceEvent::Assigned { partitions, reply } => {
                let claimed = self.claim_with_retry(&partitions).await?;
                for (tp, stored) in &claimed {
                    self.parts.insert(
                        tp.clone(),
                        PartitionState {
                            next_offset: stored.map(|v| v + 1),
                            ..Default::default()
                        },
                    );
                    if let Some(version) = stored {
                        self.metrics.progress(tp, *version);
                    }
                }
                let _ = reply.send(claimed.into_iter().collect());
                Ok(())
            }
            SourceEvent::Revoked {
                partitions,
                lost,
                done,
            } => {
                // A lost assignment may already be someone else's: its work is only dropped.
                if !lost {
                    self.flush().await?;
                }
                self.forget(&partitions);
                let _ = done.send(());
                Ok(())
            }
            SourceEvent::Reseeked(tp) => {
                if let Some(state) = self.parts.get_mut(&tp) {
                    state.awaiting_reseek = false;
                }
                Ok(())
            }
        }
    }

    async fn claim_with_retry(
        &mut self,
        partitions: &[TopicPartition],
    ) -> Result<Vec<(TopicPartition, Option<i64>)>, PipelineError> {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        loop {
            match self.committer.claim(partitions).await {
                Ok(claimed) => return Ok(claimed),
                Err(e) if !self.shutdown.is_cancelled() => {
                    tracing::warn!(error = %e, "reading table progress failed; retrying");
                    backoff.wait().await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    async fn on_records(&mut self, records: Vec<SourceRecord>) -> Result<(), PipelineError> {
        let Some(first) = records.first() else {
            return Ok(());
        };
        let tp = TopicPartition::new(first.topic.clone(), first.partition);
        let Some(state) = self.parts.get(&tp) else {
            return Ok(()); // not ours (any more): the owner reads these from the table's progress
        };
        if state.awaiting_reseek {
            return Ok(());
        }
        let next = state.next_offset;
        let before = records.len();
        let records: Vec<SourceRecord> = records
            .into_iter()
            .filter(|r| next.is_none_or(|n| r.offset >= n))
            .collect();
        let skipped = (before - records.len()) as u64;
        if skipped > 0 {
            self.summary.duplicates_skipped += skipped;
            self.metrics
                .records_skipped_duplicate
                .with_label_values(&[tp.topic.as_ref()])
                .inc_by(skipped);
        }
        let Some(last) = records.last().map(|r| r.offset) else {
            return Ok(());
        };
        self.summary.records_consumed += records.len() as u64;

        self.resolve_schemas(&records).await;
        let decoded = self.decoder.decode(&records);
        if !decoded.rejected.is_empty() {
            let letters: Vec<(&SourceRecord, &Rejection)> = decoded
                .rejected
                .iter()
                .map(|(i, r)| (&records[*i], r))
                .collect();
            self.dead_letters.publish(&letters).await;
            self.metrics.dead_lettered(&tp, &letters);
            self.summary.dead_lettered += letters.len() as u64;
        }
        let state = self.parts.entry(tp).or_default();
        if let Some(batch) = decoded.batch {
            let bytes = batch.get_array_memory_size();
            state.rows += batch.num_rows();
            state.bytes += bytes;
            self.buffered_rows += batch.num_rows();
            self.buffered_bytes += bytes;
            state.batches.push(batch);
        }
        state.pending_last = Some(last);
        state.next_offset = Some(last + 1);
        self.oldest.get_or_insert_with(Instant::now);
        self.metrics.buffered_bytes.set(self.buffered_bytes as i64);
        if self.buffered_rows >= self.config.file_max_rows
            || self.buffered_bytes >= self.config.file_max_bytes
        {
            self.flush().await?;
        }
        Ok(())
    }

    /// Fetches every writer schema of `records` that the decoder has no verdict on. A registry
    /// outage is waited out (with backoff, not ready meanwhile): it is never the record's fault.
    async fn resolve_schemas(&mut self, records: &[SourceRecord]) {
        let mut ids: Vec<u32> = records
            .iter()
            .filter_map(|r| {
                r.value
                    .as_deref()
                    .and_then(|v| wire::parse(v).ok())
                    .map(|f| f.schema_id)
            })
            .filter(|id| !self.decoder.knows(*id))
            .collect();
        ids.sort_unstable();
        ids.dedup();
        for id in ids {
            let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
            loop {
                let answer = self.registry.schema_by_id(id).await;
                if let Err(e) = &answer {
                    self.metrics
                        .registry_error(registry_error_kind(e), id, &e.to_string());
                }
                match answer {
                    Ok(text) => {
                        self.decoder.register(id, Ok(&text));
                        self.metrics.schema_ids_seen.inc();
                        break;
                    }
                    Err(e) if !e.is_retryable() => {
                        self.decoder.register(id, Err(&e));
                        break;
                    }
                    // Leave the id unknown: a shutdown must not wait for the registry.
                    Err(_) if self.shutdown.is_cancelled() => return,
                    Err(_) => {
                        self.metrics.not_ready(NotReady::Registry, true);
                        backoff.wait().await;
                    }
                }
            }
        }
        self.metrics.not_ready(NotReady::Registry, false);
    }

    /// Drops buffered, uncommitted work of these partitions (the table does not have it, so the
    /// next owner reads it again).
    fn drop_work(&mut self, partitions: &[TopicPartition]) -> usize {
        let mut dropped = 0;
        for tp in partitions {
            if let Some(state) = self.parts.get_mut(tp) {
                dropped += state.rows;
                self.buffered_rows -= state.rows;
                self.buffered_bytes -= state.bytes;
                state.batches.clear();
                state.rows = 0;
                state.bytes = 0;
                state.pending_last = None;
            }
        }
        self.metrics.buffered_bytes.set(self.buffered_bytes as i64);
        dropped
    }

    fn forget(&mut self, partitions: &[TopicPartition]) {
        self.drop_work(partitions);
        for tp in partitions {
            self.parts.remove(tp);
        }
        self.committer.release(partitions);
    }

    /// Fenced partitions lose their buffered work, then resume from the table's progress (if the
    /// source still owns them; otherwise their revocation follows).
    async fn on_fenced(&mut self, fenced: Vec<Fenced>) -> Result<(), PipelineError> {
        for f in fenced {
            let dropped = self.drop_work(std::slice::from_ref(&f.partition));
            self.metrics.fenced(
                &self.table_name,
                &f.partition,
                f.expected,
                f.stored,
                dropped,
            );
            self.summary.fenced_partitions += 1;
            let claimed = self
                .committer
                .claim(std::slice::from_ref(&f.partition))
                .await?;
            let stored = claimed.first().and_then(|(_, v)| *v);
            if let Some(state) = self.parts.get_mut(&f.partition) {
                state.next_offset = stored.map(|v| v + 1);
                state.awaiting_reseek = true;
            }
            self.source.command(SourceCommand::Seek(
                f.partition.clone(),
                stored.map_or(0, |v| v + 1),
            ));
        }
        Ok(())
    }

    /// Writes and commits everything buffered. Retries storage errors with backoff until it
    /// succeeds or shutdown is requested (then the work is left uncommitted, which loses nothing).
    async fn flush(&mut self) -> Result<(), PipelineError> {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        loop {
            match self.try_flush().await {
                Ok(()) => {
                    self.metrics.not_ready(NotReady::Lake, false);
                    return Ok(());
                }
                Err(e) if self.shutdown.is_cancelled() => return Err(e),
                Err(e) => {
                    // Not ready while the lake refuses writes; nothing is lost, the work stays buffered.
                    self.metrics.not_ready(NotReady::Lake, true);
                    tracing::warn!(error = %e, "flush failed; retrying");
                    backoff.wait().await;
                }
            }
        }
    }

    async fn try_flush(&mut self) -> Result<(), PipelineError> {
        let started = Instant::now();
        loop {
            let partitions: Vec<TopicPartition> = self
                .parts
                .iter()
                .filter(|(_, s)| s.pending_last.is_some())
                .map(|(tp, _)| tp.clone())
                .collect();
            if partitions.is_empty() {
                self.oldest = None;
                return Ok(());
            }
            // Check ownership before writing, so fenced work costs no upload.
            let fenced = self.committer.check(&partitions).await?;
            if !fenced.is_empty() {
                self.on_fenced(fenced).await?;
                continue;
            }
            let mut batches = Vec::new();
            let mut last_offsets = BTreeMap::new();
            let mut rows = 0u64;
            for tp in &partitions {
                if let Some(state) = self.parts.get(tp) {
                    batches.extend(state.batches.iter().cloned());
                    rows += state.rows as u64;
                    if let Some(last) = state.pending_last {
                        last_offsets.insert(tp.clone(), last);
                    }
                }
            }
            let files = self.writer.write(&batches).await?;
            let sizes: Vec<i64> = files.iter().map(|f| f.size).collect();
            crate::failpoint!("before_commit");
            match self.committer.commit(files, &last_offsets).await? {
                CommitOutcome::Fenced(fenced) => {
                    // Lost a race for ownership after the upload: those files stay unreferenced
                    // (vacuum removes them); rewrite without the fenced partitions.
                    self.on_fenced(fenced).await?;
                }
                CommitOutcome::Committed { version, attempts } => {
                    crate::failpoint!("after_delta_commit");
                    self.metrics.committed(
                        &self.table_name,
                        version,
                        rows,
                        &sizes,
                        started.elapsed(),
                        attempts,
                    );
                    self.metrics
                        .flush_duration
                        .observe(started.elapsed().as_secs_f64());
                    self.summary.commits += 1;
                    self.summary.rows_committed += rows;
                    self.summary.files += sizes.len() as u64;
                    for (tp, last) in &last_offsets {
                        self.metrics.progress(tp, *last);
                    }
                    let committed: Vec<TopicPartition> = last_offsets.keys().cloned().collect();
                    self.drop_work(&committed);
                    // Advisory group commit, so standard tools see the lag.
                    self.source.command(SourceCommand::CommitOffsets(
                        last_offsets
                            .into_iter()
                            .map(|(tp, last)| (tp, last + 1))
                            .collect(),
                    ));
                    self.oldest = None;
                    return Ok(());
                }
            }
        }
    }
}

fn registry_error_kind(error: &RegistryError) -> &'static str {
    match error {
        RegistryError::NotFound { .. } => "not_found",
        RegistryError::NotAvro { .. } => "not_avro",
        RegistryError::Unavailable(_) => "unavailable",
        RegistryError::Unexpected { .. } => "unexpected",
    }
}

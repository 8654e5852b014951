//! The topology of one replica, and the only module that knows it:
//! source → route to a table (+ dead letters) → decode → per-table, per-partition buffers →
//! Silver files → commit → group offsets.
//!
//! Buffers are kept per table and source partition, so that work of a fenced or lost partition can
//! be dropped without touching the others. A flush writes, per table, one set of files for all
//! owned partitions and makes one Delta commit (see `commit` for the rule that makes it exactly
//! once, and ARCHITECTURE.md for how several tables fed by one partition stay consistent).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::catalog::{
    ask_registry, frame_rejection, open_table, open_tables, reader_from_version, Answer, Ask,
};
use crate::commit::{CommitError, CommitOutcome, Fenced};
use crate::config::{Config, ReaderSchemas, SubjectStrategy};
use crate::dlq::DeadLetters;
use crate::gold::emitter::Emitter;
use crate::lake;
use crate::metrics::{Metrics, NotReady};
use crate::models::{ErrorKind, Rejection, SourceRecord, TopicPartition};
use crate::registry::{RegistryError, SchemaRegistry};
use crate::silver::SilverError;
use crate::source::{Source, SourceCommand, SourceEvent, SourceSettings};
use crate::tables::{EvolveError, OpenError, Tables};
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
    #[error("shut down before start-up finished")]
    Interrupted,
    #[error("gold: {0}")]
    Gold(String),
}

/// Opens Gold stage 1 on its source table.
async fn open_gold(
    config: &Config,
    settings: &crate::config::GoldConfig,
    tables: &Tables,
    metrics: &Arc<Metrics>,
    shutdown: &CancellationToken,
) -> Result<Emitter, PipelineError> {
    let index = match &settings.table {
        Some(name) => tables
            .list
            .iter()
            .position(|t| &t.name == name)
            .ok_or_else(|| {
                PipelineError::Config(format!(
                    "STRATA_GOLD_TABLE={name} is not one of the tables ({})",
                    tables.names().join(", ")
                ))
            })?,
        None if tables.list.is_empty() => {
            return Err(PipelineError::Config(
                "Gold needs a Silver table at start-up (STRATA_GOLD_TABLE)".into(),
            ))
        }
        None => 0,
    };
    let table = &tables.list[index];
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    loop {
        let opened = Emitter::open(
            config,
            settings,
            index,
            &table.name,
            &table.decoder.output_schema(),
            metrics.clone(),
        )
        .await;
        match opened {
            Ok(emitter) => {
                metrics.not_ready(NotReady::Lake, false);
                return Ok(emitter);
            }
            Err(OpenError::Schema(why)) => return Err(PipelineError::Config(why)),
            // An unreachable broker or lake is waited out, not ready meanwhile, as for Silver.
            Err(OpenError::Storage(why)) => {
                metrics.not_ready(NotReady::Lake, true);
                tracing::warn!(error = %why, "opening Gold failed; retrying");
                if !backoff.wait_unless(shutdown).await {
                    return Err(PipelineError::Interrupted);
                }
            }
        }
    }
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
    /// What Gold stage 2 committed (when Gold is on).
    pub gold: Option<crate::gold::job::GoldSummary>,
}

/// Per owned partition: where consumption stands (the rows themselves are buffered per table).
#[derive(Default)]
struct PartitionState {
    /// Records below this offset were handled in this run already (a replay after a seek): skipped.
    position: Option<i64>,
    /// First and last offset handled (a buffered row or an acknowledged dead letter) and not yet
    /// committed: every table's uncommitted work of this partition lies in between.
    pending_first: Option<i64>,
    pending_last: Option<i64>,
    /// After fencing, records are ignored until the source confirms the seek back.
    awaiting_reseek: bool,
    /// Shutdown interrupted a dead letter of this partition: nothing after it may be buffered.
    stopped: bool,
}

/// Where the records of one writer schema id go.
#[derive(Debug, Clone)]
enum Route {
    Table(usize),
    /// A top-level union: per branch, the table whose decoder knows the branch (under the union's
    /// id), or why no table takes it.
    Union(Vec<Result<usize, Rejection>>),
    Refused(Rejection),
}

/// Where one record goes.
enum Destination {
    /// A table; `Some(i)`: decode `reframed[i]` (a union value without its branch index).
    Table(usize, Option<usize>),
    Letter(Rejection),
}

struct Replica {
    config: Config,
    metrics: Arc<Metrics>,
    registry: SchemaRegistry,
    tables: Tables,
    routes: HashMap<u32, Route>,
    dead_letters: DeadLetters,
    source: Source,
    parts: HashMap<TopicPartition, PartitionState>,
    oldest: Option<Instant>,
    summary: RunSummary,
    shutdown: CancellationToken,
    /// Gold stage 1 (when Gold is on).
    gold: Option<Emitter>,
}

/// Runs one replica until `shutdown` is cancelled, then flushes, commits, leaves the group and
/// returns what it did.
pub async fn run(
    config: Config,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Result<RunSummary, PipelineError> {
    lake::register_object_stores();
    let registry = SchemaRegistry::from_config(&config.registry)
        .map_err(|e| PipelineError::Config(e.to_string()))?;
    let dead_letters = DeadLetters::new(
        &config.brokers,
        &config.kafka_properties,
        &config.dead_letters,
        metrics.clone(),
        shutdown.clone(),
    )?;
    metrics
        .buffered_bytes_limit
        .set(config.file_max_bytes as i64);

    let (listener, bound) = crate::metrics::bind(config.metrics_addr).await?;
    tracing::info!(addr = %bound, "serving /metrics, /healthz and /readyz");
    let server_stop = CancellationToken::new();
    let server = tokio::spawn(crate::metrics::serve(
        listener,
        metrics.clone(),
        server_stop.clone(),
    ));
    // Dead-letter topics exist before the first dead letter is due (or the replica says why not).
    tokio::select! {
        () = dead_letters.prepare(&config.topics) => {}
        () = shutdown.cancelled() => {
            server_stop.cancel();
            let _ = server.await;
            tracing::info!("shut down before start-up finished");
            return Ok(RunSummary::default());
        }
    }
    let tables = match open_tables(&config, &registry, &metrics, &shutdown).await {
        Ok(tables) => tables,
        Err(e) => {
            server_stop.cancel();
            let _ = server.await;
            // A signal while start-up waited for the registry or the lake: nothing was consumed,
            // so there is nothing to drain; that is a clean stop.
            if matches!(e, PipelineError::Interrupted) {
                tracing::info!("shut down before start-up finished");
                return Ok(RunSummary::default());
            }
            return Err(e);
        }
    };

    let gold = match &config.gold {
        Some(settings) => match open_gold(&config, settings, &tables, &metrics, &shutdown).await {
            Ok(emitter) => Some(emitter),
            Err(e) => {
                server_stop.cancel();
                let _ = server.await;
                if matches!(e, PipelineError::Interrupted) {
                    tracing::info!("shut down before start-up finished");
                    return Ok(RunSummary::default());
                }
                return Err(e);
            }
        },
        None => None,
    };
    // Gold stage 2 runs beside the pipeline until the pipeline has drained (so the last epochs'
    // markers can still be merged), then commits and stops. If it fails, the replica stops.
    let gold_stop = CancellationToken::new();
    let stage2 = match (&config.gold, &gold) {
        (Some(settings), Some(emitter)) => {
            let table = &tables.list[emitter.table];
            let task = crate::gold::job::run(
                config.clone(),
                settings.clone(),
                table.name.clone(),
                table.decoder.output_schema(),
                metrics.clone(),
                gold_stop.clone(),
            );
            let stop_all = shutdown.clone();
            Some(tokio::spawn(async move {
                let result = task.await;
                if let Err(e) = &result {
                    tracing::error!(error = %e, "Gold stage 2 failed; stopping the replica");
                    stop_all.cancel();
                }
                result
            }))
        }
        _ => None,
    };
    let (events_tx, mut events) = mpsc::channel(16);
    let source = Source::start(
        SourceSettings {
            brokers: config.brokers.clone(),
            group_id: config.group_id.clone(),
            topics: config.topics.clone(),
            properties: config.kafka_properties.clone(),
            counts_assignments: true,
        },
        metrics.clone(),
        events_tx,
    )?;
    metrics.initialize(&config.topics, &tables.names());

    let mut replica = Replica {
        config,
        metrics: metrics.clone(),
        registry,
        tables,
        routes: HashMap::new(),
        dead_letters,
        source,
        parts: HashMap::new(),
        oldest: None,
        summary: RunSummary::default(),
        shutdown: shutdown.clone(),
        gold,
    };
    let result = match replica.consume(&mut events).await {
        // A signal while a table opening mid-run waited for the lake: drain what is complete.
        Err(PipelineError::Interrupted) => Ok(()),
        other => other,
    };
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
        source,
        mut summary,
        ..
    } = replica;
    let _ = tokio::task::spawn_blocking(move || source.join()).await;
    gold_stop.cancel();
    let mut gold_failed = None;
    if let Some(stage2) = stage2 {
        match tokio::time::timeout(grace, stage2).await {
            Ok(Ok(Ok(gold))) => summary.gold = Some(gold),
            Ok(Ok(Err(e))) => gold_failed = Some(PipelineError::Gold(e)),
            Ok(Err(e)) => gold_failed = Some(PipelineError::Gold(e.to_string())),
            Err(_) => gold_failed = Some(PipelineError::GraceExceeded(grace)),
        }
    }
    server_stop.cancel();
    let _ = server.await;
    drained?;
    match gold_failed {
        Some(e) => Err(e),
        None => Ok(summary),
    }
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
                    self.gold_idle().await?;
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
                self.forget(&partitions, "shutdown");
                let _ = done.send(());
            }
            SourceEvent::Assigned { reply, .. } => drop(reply),
            SourceEvent::Records(records) => {
                if let Some(first) = records.first() {
                    let tp = TopicPartition::new(first.topic.clone(), first.partition);
                    let bytes = records
                        .iter()
                        .map(|r| r.value.as_ref().map_or(0, Vec::len))
                        .sum();
                    self.metrics.consumed(&tp, records.len(), bytes);
                    self.metrics.dropped(&tp, "shutdown", records.len());
                }
            }
            SourceEvent::Reseeked(_) => {}
        }
    }

    async fn handle(&mut self, event: SourceEvent) -> Result<(), PipelineError> {
        match event {
            SourceEvent::Records(records) => self.on_records(records).await,
            SourceEvent::Assigned { partitions, reply } => {
                self.claim_with_retry(&partitions).await?;
                self.claim_gold(&partitions).await?;
                // Ready once the group has given this replica its share (possibly none).
                self.metrics.not_ready(NotReady::Starting, false);
                let mut resume = HashMap::new();
                for tp in partitions {
                    let after = self.resume_after(&tp);
                    if let Some(version) = after {
                        self.metrics.progress(&tp, version);
                    }
                    self.parts.insert(
                        tp.clone(),
                        PartitionState {
                            position: after.map(|v| v + 1),
                            ..Default::default()
                        },
                    );
                    resume.insert(tp, after);
                }
                let _ = reply.send(resume);
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
                self.forget(&partitions, if lost { "lost" } else { "revoked" });
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

    /// Reads every table's progress for `partitions` and makes it the fencing baseline.
    async fn claim_with_retry(
        &mut self,
        partitions: &[TopicPartition],
    ) -> Result<(), PipelineError> {
        for index in 0..self.tables.list.len() {
            self.claim_table(index, partitions).await?;
        }
        Ok(())
    }

    async fn claim_table(
        &mut self,
        index: usize,
        partitions: &[TopicPartition],
    ) -> Result<(), PipelineError> {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        let table = &mut self.tables.list[index];
        loop {
            match table.committer.claim(partitions).await {
                Ok(claimed) => {
                    for (tp, stored) in claimed {
                        table.parts.entry(tp).or_default().committed = stored;
                    }
                    return Ok(());
                }
                Err(e) if !self.shutdown.is_cancelled() => {
                    tracing::warn!(table = %table.name, error = %e, "reading table progress failed; retrying");
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
        let bytes: usize = records
            .iter()
            .map(|r| r.value.as_ref().map_or(0, Vec::len))
            .sum();
        self.metrics.consumed(&tp, records.len(), bytes);
        let Some(state) = self.parts.get(&tp) else {
            // Not ours (any more): the owner reads these from the table's progress.
            self.metrics.dropped(&tp, "not_owned", records.len());
            return Ok(());
        };
        if state.awaiting_reseek {
            self.metrics.dropped(&tp, "reseek", records.len());
            return Ok(());
        }
        if state.stopped {
            self.metrics.dropped(&tp, "shutdown", records.len());
            return Ok(());
        }
        let position = state.position;
        let (replayed, records): (Vec<SourceRecord>, Vec<SourceRecord>) = records
            .into_iter()
            .partition(|r| position.is_some_and(|p| r.offset < p));
        self.skipped(&tp, replayed.len());
        let (Some(first_offset), Some(last)) = (
            records.first().map(|r| r.offset),
            records.last().map(|r| r.offset),
        ) else {
            return Ok(());
        };
        self.summary.records_consumed += records.len() as u64;

        self.resolve_schemas(&records).await?;
        if self.parts.get(&tp).is_some_and(|s| s.awaiting_reseek) {
            // A table opened on the way needs older offsets of this partition: they come again.
            self.metrics.dropped(&tp, "reseek", records.len());
            return Ok(());
        }
        // Route each record to its table, or straight to the dead letters. Union values lose
        // their branch index here (`reframed`), so the branch's table decodes a plain record.
        let mut reframed: Vec<SourceRecord> = Vec::new();
        let destinations: Vec<Destination> = records
            .iter()
            .map(|record| self.destination(record, &mut reframed))
            .collect();
        let mut per_table: Vec<Vec<(&SourceRecord, &SourceRecord)>> =
            vec![Vec::new(); self.tables.list.len()];
        // Records Silver holds whose Gold epoch was not sent: decoded again for Gold only.
        let mut gold_replay: Vec<&SourceRecord> = Vec::new();
        let gold_table = self.gold.as_ref().map(|g| g.table);
        if let Some(gold) = &mut self.gold {
            gold.active(&tp);
        }
        let mut letters: Vec<(&SourceRecord, Rejection)> = Vec::new();
        let mut skipped = 0;
        let highest = self.tables.highest_committed(&tp);
        for (record, destination) in records.iter().zip(destinations) {
            match destination {
                Destination::Table(index, body) => {
                    let held = self.tables.list[index]
                        .parts
                        .get(&tp)
                        .and_then(|p| p.committed);
                    if held.is_some_and(|h| record.offset <= h) {
                        skipped += 1;
                        if gold_table == Some(index)
                            && self
                                .gold
                                .as_ref()
                                .is_some_and(|g| g.wants_replay(&tp, record.offset))
                        {
                            gold_replay.push(body.and_then(|i| reframed.get(i)).unwrap_or(record));
                        }
                    } else {
                        let decoded = body.and_then(|i| reframed.get(i)).unwrap_or(record);
                        per_table[index].push((decoded, record));
                    }
                }
                Destination::Letter(rejection) => {
                    if highest.is_some_and(|h| record.offset <= h) {
                        skipped += 1;
                    } else {
                        letters.push((record, rejection));
                    }
                }
            }
        }
        let mut replayed_letters = 0;
        let mut batches = Vec::new();
        for (index, group) in per_table.iter().enumerate() {
            if group.is_empty() {
                continue;
            }
            let table = &mut self.tables.list[index];
            let inputs: Vec<&SourceRecord> = group.iter().map(|(decoded, _)| *decoded).collect();
            let decoded = table.decoder.decode_refs(&inputs);
            // Dead letters carry the record as it was consumed. A rejection at or below an offset
            // some table holds was dead-lettered (and acknowledged) before that table's commit: a
            // replay for a table that is behind must not send it twice.
            for (i, rejection) in decoded.rejected {
                let record = group[i].1;
                if highest.is_some_and(|h| record.offset <= h) {
                    replayed_letters += 1;
                } else {
                    letters.push((record, rejection));
                }
            }
            if let Some(batch) = decoded.batch {
                batches.push((index, batch));
            }
        }
        // Rejections were dead-lettered when Silver took these offsets.
        let replay = match (gold_table, gold_replay.is_empty()) {
            (Some(index), false) => {
                self.tables.list[index]
                    .decoder
                    .decode_refs(&gold_replay)
                    .batch
            }
            _ => None,
        };
        if !letters.is_empty() {
            letters.sort_by_key(|(r, _)| r.offset);
            let refs: Vec<(&SourceRecord, &Rejection)> =
                letters.iter().map(|(r, why)| (*r, why)).collect();
            // Returns only once the dead-letter topic acknowledged every one of them. Nothing of
            // this chunk is buffered before that, so nothing commits past an unwritten letter.
            if self.dead_letters.publish(&refs).await.is_err() {
                // Shutdown while a letter waited: this chunk and the rest of the partition are
                // left to the next owner.
                self.metrics.dropped(&tp, "shutdown", records.len());
                if let Some(state) = self.parts.get_mut(&tp) {
                    state.stopped = true;
                }
                return Ok(());
            }
            self.metrics.dead_lettered(&tp, &refs);
            self.summary.dead_lettered += refs.len() as u64;
        }
        for (index, batch) in batches {
            let table = &mut self.tables.list[index];
            let part = table.parts.entry(tp.clone()).or_default();
            part.rows += batch.num_rows();
            part.bytes += batch.get_array_memory_size();
            self.metrics
                .buffered(&tp, &table.name, batch.num_rows() as i64);
            part.batches.push(batch);
        }
        if let Some(gold) = &mut self.gold {
            if let Some(batch) = replay {
                gold.push_replay(&tp, batch);
            }
            gold.replay_read(&tp, last + 1);
        }
        self.skipped(&tp, skipped + replayed_letters);
        let state = self.parts.entry(tp).or_default();
        state.pending_first.get_or_insert(first_offset);
        state.pending_last = Some(last);
        state.position = Some(last + 1);
        self.oldest.get_or_insert_with(Instant::now);
        let (rows, bytes) = self.tables.buffered();
        self.metrics.buffered_bytes.set(bytes as i64);
        if rows >= self.config.file_max_rows || bytes >= self.config.file_max_bytes {
            self.flush().await?;
        }
        Ok(())
    }

    /// Where one record goes, by its writer schema id's route.
    fn destination(&self, record: &SourceRecord, reframed: &mut Vec<SourceRecord>) -> Destination {
        let frame = match record.value.as_deref().map(wire::parse) {
            Some(Ok(frame)) => frame,
            Some(Err(e)) => return Destination::Letter(frame_rejection(&e)),
            None => return Destination::Letter(frame_rejection(&wire::WireError::Empty)),
        };
        match self.routes.get(&frame.schema_id) {
            Some(Route::Table(index)) => Destination::Table(*index, None),
            Some(Route::Refused(rejection)) => Destination::Letter(rejection.clone()),
            Some(Route::Union(branches)) => {
                let Some((branch, used)) = wire::read_long(frame.body) else {
                    return Destination::Letter(Rejection::new(
                        ErrorKind::DecodeError,
                        "union branch index truncated or overlong".to_string(),
                    ));
                };
                match usize::try_from(branch).ok().and_then(|b| branches.get(b)) {
                    Some(Ok(index)) => {
                        let mut body = record.clone();
                        body.value = Some(wire::frame(
                            frame.schema_id,
                            frame.body.get(used..).unwrap_or_default(),
                        ));
                        reframed.push(body);
                        Destination::Table(*index, Some(reframed.len() - 1))
                    }
                    Some(Err(rejection)) => Destination::Letter(rejection.clone()),
                    None => Destination::Letter(Rejection::new(
                        ErrorKind::DecodeError,
                        format!(
                            "union branch {branch} does not exist in writer schema {} ({} branches)",
                            frame.schema_id,
                            branches.len()
                        ),
                    )),
                }
            }
            None => Destination::Letter(Rejection::new(
                ErrorKind::UnknownSchema,
                format!("schema id {} was not resolved", frame.schema_id),
            )),
        }
    }

    fn skipped(&mut self, tp: &TopicPartition, count: usize) {
        if count > 0 {
            self.summary.duplicates_skipped += count as u64;
            self.metrics
                .records_skipped_duplicate
                .with_label_values(&[tp.topic.as_ref()])
                .inc_by(count as u64);
        }
    }

    /// Routes every writer schema id of `records` not routed yet: fetches the schema, finds (or,
    /// under `latest`, opens) its table, follows the table's subject to its newest version, and has
    /// the table's decoder judge it. A registry outage is waited out (not ready meanwhile): it is
    /// never the record's fault. A table opened on the way may make a partition seek back
    /// (`reseek_behind`); the caller checks.
    async fn resolve_schemas(&mut self, records: &[SourceRecord]) -> Result<(), PipelineError> {
        let mut ids: Vec<(u32, &SourceRecord)> = Vec::new();
        for record in records {
            if let Some(frame) = record.value.as_deref().and_then(|v| wire::parse(v).ok()) {
                if !self.routes.contains_key(&frame.schema_id)
                    && !ids.iter().any(|(id, _)| *id == frame.schema_id)
                {
                    ids.push((frame.schema_id, record));
                }
            }
        }
        for (id, record) in ids {
            let writer = match self.ask(Ask::Id(id)).await {
                Answer::Schema(text) => text,
                Answer::Refused(e) => {
                    let kind = match e {
                        RegistryError::NotAvro { .. } => ErrorKind::UnsupportedSchemaType,
                        _ => ErrorKind::UnknownSchema,
                    };
                    self.routes
                        .insert(id, Route::Refused(Rejection::new(kind, e.to_string())));
                    continue;
                }
                // Leave the id unrouted: a shutdown must not wait for the registry.
                _ => return Ok(()),
            };
            self.metrics.schema_ids_seen.inc();
            let tp = TopicPartition::new(record.topic.clone(), record.partition);
            let variants = match apache_avro::Schema::parse_str(&writer) {
                Ok(apache_avro::Schema::Union(union)) => Some(union.variants().to_vec()),
                _ => None,
            };
            let route = match variants {
                None => match self.route_record(id, &tp, &writer).await? {
                    Ok(index) => Route::Table(index),
                    Err(rejection) => Route::Refused(rejection),
                },
                Some(variants) => {
                    let mut branches: Vec<Result<usize, Rejection>> = Vec::new();
                    for (branch, variant) in variants.iter().enumerate() {
                        let Some(json) = crate::tables::branch_json(variant) else {
                            branches.push(Err(Rejection::new(
                                ErrorKind::UnknownRecordType,
                                format!("writer schema {id}: union branch {branch} is not a standalone record"),
                            )));
                            continue;
                        };
                        let routed = self.route_record(id, &tp, &json).await?;
                        // One branch per table: a table's decoder knows one schema per id.
                        let taken = routed
                            .as_ref()
                            .is_ok_and(|t| branches.iter().any(|b| b.as_ref() == Ok(t)));
                        branches.push(if taken {
                            Err(Rejection::new(
                                ErrorKind::UnknownRecordType,
                                format!("writer schema {id}: union branch {branch} has no table of its own"),
                            ))
                        } else {
                            routed
                        });
                    }
                    Route::Union(branches)
                }
            };
            self.routes.insert(id, route);
        }
        Ok(())
    }

    /// Routes one record schema (a writer, or a union branch registered under the union's id):
    /// its table, after following the table's subject and judging the schema there.
    async fn route_record(
        &mut self,
        id: u32,
        tp: &TopicPartition,
        json: &str,
    ) -> Result<Result<usize, Rejection>, PipelineError> {
        let index = match self.route(id, tp, json).await? {
            Route::Table(index) => index,
            Route::Refused(rejection) => return Ok(Err(rejection)),
            Route::Union(_) => {
                return Ok(Err(Rejection::new(
                    ErrorKind::UnknownRecordType,
                    format!("writer schema {id}: nested unions are not routed"),
                )))
            }
        };
        self.follow_latest(index, tp).await?;
        let decoder = &mut self.tables.list[index].decoder;
        decoder.register(id, Ok(json));
        Ok(match decoder.verdict(id) {
            Some(Some(refused)) => Err(refused.clone()),
            _ => Ok(index),
        })
    }

    /// The table of a writer schema: by its record name; under `latest` with a record-based
    /// subject strategy, a record name met for the first time opens its table.
    async fn route(
        &mut self,
        id: u32,
        tp: &TopicPartition,
        writer_json: &str,
    ) -> Result<Route, PipelineError> {
        let record = match apache_avro::Schema::parse_str(writer_json) {
            Ok(apache_avro::Schema::Record(r)) => Some(r.name.fullname(None)),
            _ => None,
        };
        if let Some(name) = &record {
            if let Some(index) = self.tables.by_record(name) {
                return Ok(Route::Table(index));
            }
            if self.config.reader_schemas == ReaderSchemas::Latest
                && self.config.subject_strategy != SubjectStrategy::Topic
            {
                let subject = self.config.subject_strategy.subject(&tp.topic, name);
                match self.ask(Ask::Latest(&subject)).await {
                    Answer::Version(version) => {
                        // A record type no table can be made for is dead-lettered; the replica
                        // goes on with the others.
                        let opened = match reader_from_version(&version, name) {
                            Ok(reader) => {
                                open_table(&self.config, reader, &self.metrics, &self.shutdown)
                                    .await?
                            }
                            Err(why) => Err(why),
                        };
                        let table = match opened {
                            Ok(table) => table,
                            Err(why) => {
                                tracing::error!(schema_id = id, %subject, reason = %why, "no table for this record type");
                                return Ok(Route::Refused(Rejection::new(
                                    ErrorKind::IncompatibleSchema,
                                    format!("writer schema {id}: no table can be made for record {name}: {why}"),
                                )));
                            }
                        };
                        self.metrics
                            .initialize(&self.config.topics, std::slice::from_ref(&table.name));
                        self.tables.list.push(table);
                        let index = self.tables.list.len() - 1;
                        let owned: Vec<TopicPartition> = self.parts.keys().cloned().collect();
                        self.claim_table(index, &owned).await?;
                        self.reseek_behind(index);
                        return Ok(Route::Table(index));
                    }
                    Answer::Refused(e) => {
                        tracing::warn!(schema_id = id, %subject, error = %e, "no subject for record type")
                    }
                    _ => {}
                }
            }
        }
        if self.tables.list.len() == 1 {
            // One table per topic (TopicNameStrategy): the compatibility check decides.
            return Ok(Route::Table(0));
        }
        Ok(Route::Refused(Rejection::new(
            ErrorKind::UnknownRecordType,
            format!(
                "writer schema {id} is {}; no Silver table is fed by it (tables: {})",
                record.map_or("not a record".to_string(), |r| format!("record {r}")),
                self.tables.names().join(", ")
            ),
        )))
    }

    /// A table opened mid-run may hold less of an owned partition than has been handled: that
    /// partition seeks back, and the other tables skip what they already hold.
    fn reseek_behind(&mut self, index: usize) {
        let behind: Vec<(TopicPartition, i64)> = self
            .parts
            .iter()
            .filter_map(|(tp, state)| {
                let held = self.tables.list[index].parts.get(tp)?.committed?;
                let position = state.position?;
                // Back to the new table's progress, or further to the first uncommitted offset:
                // the buffered work of every table is dropped and read again.
                let from = state.pending_first.map_or(held + 1, |f| f.min(held + 1));
                (held + 1 < position).then_some((tp.clone(), from))
            })
            .collect();
        for (tp, from) in behind {
            tracing::warn!(table = %self.tables.list[index].name, partition = %tp, from, "new table is behind: seeking back");
            self.drop_work(std::slice::from_ref(&tp), "reseek");
            if let Some(state) = self.parts.get_mut(&tp) {
                state.position = Some(from);
                state.awaiting_reseek = true;
            }
            self.source.command(SourceCommand::Seek(tp, from));
        }
    }

    /// Under `latest`: moves the table to its subject's newest version if that is new.
    async fn follow_latest(
        &mut self,
        index: usize,
        tp: &TopicPartition,
    ) -> Result<(), PipelineError> {
        if self.config.reader_schemas != ReaderSchemas::Latest {
            return Ok(());
        }
        let record = self.tables.list[index].reader.record.clone();
        let subject = self.tables.list[index]
            .reader
            .subject
            .clone()
            .unwrap_or_else(|| self.config.subject_strategy.subject(&tp.topic, &record));
        let version = match self.ask(Ask::Latest(&subject)).await {
            Answer::Version(version) => version,
            _ => return Ok(()),
        };
        if !self.tables.list[index].wants_version(version.id) {
            return Ok(());
        }
        let next = reader_from_version(&version, &record).map_err(PipelineError::Config);
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        loop {
            let table = &mut self.tables.list[index];
            let result = match &next {
                Ok(next) => table.evolve(next.clone()).await,
                Err(e) => Err(EvolveError::Refused(e.to_string())),
            };
            match result {
                Ok(()) => {
                    self.metrics.schema_evolved(&table.name, "evolved");
                    return Ok(());
                }
                Err(EvolveError::Refused(why)) => {
                    self.metrics.schema_evolved(&table.name, "refused");
                    tracing::error!(table = %table.name, subject = %subject, schema_id = version.id, reason = %why,
                        "newest reader schema refused; the table keeps its schema");
                    return Ok(());
                }
                Err(EvolveError::Storage(e)) if !self.shutdown.is_cancelled() => {
                    self.metrics.not_ready(NotReady::Lake, true);
                    tracing::warn!(table = %table.name, error = %e, "evolving the table failed; retrying");
                    backoff.wait().await;
                }
                Err(EvolveError::Storage(e)) => return Err(e.into()),
            }
        }
    }

    /// One registry question, retried while the registry is unavailable (not ready meanwhile).
    async fn ask(&self, question: Ask<'_>) -> Answer {
        ask_registry(&self.registry, &self.metrics, &self.shutdown, question).await
    }

    /// Drops buffered, uncommitted work of these partitions (the tables do not have it, so the
    /// next owner reads it again).
    fn drop_work(&mut self, partitions: &[TopicPartition], reason: &'static str) -> usize {
        let mut dropped = 0;
        for tp in partitions {
            // Counted per partition: the metric is per topic, and each partition's rows once.
            let mut of_partition = 0;
            for table in &mut self.tables.list {
                let rows = table.drop_work(tp);
                self.metrics.buffered(tp, &table.name, -(rows as i64));
                of_partition += rows;
            }
            if let Some(state) = self.parts.get_mut(tp) {
                state.pending_first = None;
                state.pending_last = None;
            }
            self.metrics.dropped(tp, reason, of_partition);
            dropped += of_partition;
        }
        let (_, bytes) = self.tables.buffered();
        self.metrics.buffered_bytes.set(bytes as i64);
        dropped
    }

    fn forget(&mut self, partitions: &[TopicPartition], reason: &'static str) {
        self.drop_work(partitions, reason);
        for tp in partitions {
            self.parts.remove(tp);
            if let Some(gold) = &mut self.gold {
                gold.release(tp);
            }
            for table in &mut self.tables.list {
                table.parts.remove(tp);
                table.committer.release(std::slice::from_ref(tp));
            }
        }
    }

    /// Fenced partitions lose their buffered work in every table, then resume from the tables'
    /// progress (if the source still owns them; otherwise their revocation follows).
    async fn on_fenced(&mut self, table: usize, fenced: Vec<Fenced>) -> Result<(), PipelineError> {
        for f in fenced {
            let tp = f.partition.clone();
            let dropped = self.drop_work(std::slice::from_ref(&tp), "fenced");
            self.metrics.fenced(
                &self.tables.list[table].name,
                &tp,
                f.expected,
                f.stored,
                dropped,
            );
            self.summary.fenced_partitions += 1;
            self.reclaim(tp).await?;
        }
        Ok(())
    }

    /// After a fence: reads every table's (and Gold's) progress of `tp` again and seeks there;
    /// records until the seek is confirmed are ignored.
    async fn reclaim(&mut self, tp: TopicPartition) -> Result<(), PipelineError> {
        self.claim_with_retry(std::slice::from_ref(&tp)).await?;
        if let Some(gold) = &mut self.gold {
            gold.release(&tp);
        }
        self.claim_gold(std::slice::from_ref(&tp)).await?;
        let after = self.resume_after(&tp);
        if let Some(state) = self.parts.get_mut(&tp) {
            state.position = after.map(|v| v + 1);
            state.awaiting_reseek = true;
        }
        self.source
            .command(SourceCommand::Seek(tp, after.map_or(0, |v| v + 1)));
        Ok(())
    }

    /// Where a partition resumes: after what every table holds and what Gold has sent.
    fn resume_after(&self, tp: &TopicPartition) -> Option<i64> {
        let tables = self.tables.resume_after(tp)?;
        match self.gold.as_ref().and_then(|g| g.resume_after(tp)) {
            Some(sent) => Some(tables.min(sent)),
            None => Some(tables),
        }
    }

    /// Gold stage 1 takes over `partitions` (reads what was sent), retrying storage errors.
    async fn claim_gold(&mut self, partitions: &[TopicPartition]) -> Result<(), PipelineError> {
        let Some(gold) = &mut self.gold else {
            return Ok(());
        };
        let table = &self.tables.list[gold.table];
        let silver: HashMap<TopicPartition, Option<i64>> = partitions
            .iter()
            .map(|tp| (tp.clone(), table.parts.get(tp).and_then(|p| p.committed)))
            .collect();
        let held = |tp: &TopicPartition| silver.get(tp).copied().flatten();
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        loop {
            match gold.claim(partitions, &held).await {
                Ok(()) => return Ok(()),
                Err(e) if !self.shutdown.is_cancelled() => {
                    tracing::warn!(error = %e, "reading Gold progress failed; retrying");
                    backoff.wait().await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Sends Gold's queued epochs (after their Silver commit). A fence on the late table drops the
    /// partition's work and reads it again, like a fence on a Silver table.
    async fn send_gold(&mut self) -> Result<(), PipelineError> {
        let Some(gold) = &mut self.gold else {
            return Ok(());
        };
        let fenced = gold
            .send()
            .await
            .map_err(|e| PipelineError::Gold(e.to_string()))?;
        self.on_gold_fenced(fenced).await
    }

    async fn on_gold_fenced(
        &mut self,
        fenced: Vec<crate::commit::Fenced>,
    ) -> Result<(), PipelineError> {
        for f in fenced {
            let tp = f.partition.clone();
            tracing::warn!(partition = %tp, expected = ?f.expected, stored = ?f.stored, "Gold progress moved: another replica owns the partition");
            let dropped = self.drop_work(std::slice::from_ref(&tp), "fenced");
            self.metrics
                .fenced("gold_late", &tp, f.expected, f.stored, dropped);
            self.summary.fenced_partitions += 1;
            self.reclaim(tp).await?;
        }
        Ok(())
    }

    /// Idle source partitions move Gold's watermark with the clock (see `gold::emitter`).
    async fn gold_idle(&mut self) -> Result<(), PipelineError> {
        let Some(gold) = &mut self.gold else {
            return Ok(());
        };
        // The next offset of each partition with nothing buffered or being re-read.
        let next: HashMap<TopicPartition, Option<i64>> = self
            .parts
            .iter()
            .filter(|(_, s)| s.pending_last.is_none() && !s.awaiting_reseek)
            .map(|(tp, s)| (tp.clone(), s.position))
            .collect();
        let fenced = match gold.idle(&next).await {
            Ok(fenced) => fenced,
            Err(e) => {
                tracing::warn!(error = %e, "moving an idle partition's Gold watermark failed; retrying later");
                return Ok(());
            }
        };
        self.on_gold_fenced(fenced).await
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

    /// One flush: per table, check ownership, write its files and commit them with the `txn` of
    /// every partition it has not recorded yet. A table whose commit landed is not redone when a
    /// later table's commit is fenced (its progress moved, so the retry finds nothing to do there).
    async fn try_flush(&mut self) -> Result<(), PipelineError> {
        let started = Instant::now();
        // An epoch Silver holds but Gold has not sent goes first: epochs are sent in order.
        self.send_gold().await?;
        'again: loop {
            let pending: BTreeMap<TopicPartition, i64> = self
                .parts
                .iter()
                .filter_map(|(tp, s)| s.pending_last.map(|last| (tp.clone(), last)))
                .collect();
            if pending.is_empty() {
                self.oldest = None;
                return Ok(());
            }
            for index in 0..self.tables.list.len() {
                let table = &mut self.tables.list[index];
                let mut last_offsets = BTreeMap::new();
                let mut batches = Vec::new();
                let mut rows = 0u64;
                for (tp, last) in &pending {
                    let part = table.parts.entry(tp.clone()).or_default();
                    if part.committed.is_none_or(|held| held < *last) {
                        last_offsets.insert(tp.clone(), *last);
                        batches.extend(part.batches.iter().cloned());
                        rows += part.rows as u64;
                    }
                }
                if last_offsets.is_empty() {
                    continue;
                }
                let partitions: Vec<TopicPartition> = last_offsets.keys().cloned().collect();
                // Check ownership before writing, so fenced work costs no upload.
                let fenced = table.committer.check(&partitions).await?;
                if !fenced.is_empty() {
                    self.on_fenced(index, fenced).await?;
                    continue 'again;
                }
                let files = table.writer.write(&batches).await?;
                let sizes: Vec<i64> = files.iter().map(|f| f.size).collect();
                crate::failpoint!("before_commit");
                match table.committer.commit(files, &last_offsets).await? {
                    CommitOutcome::Fenced(fenced) => {
                        // Lost a race for ownership after the upload: those files stay unreferenced
                        // (vacuum removes them); the rest is written again.
                        self.on_fenced(index, fenced).await?;
                        continue 'again;
                    }
                    CommitOutcome::Committed { version, attempts } => {
                        crate::failpoint!("after_delta_commit");
                        // Late: behind the watermark every owned partition had already passed.
                        let watermark_before = self
                            .parts
                            .keys()
                            .map(|tp| table.event_high.get(tp).copied())
                            .collect::<Option<Vec<i64>>>()
                            .and_then(|highs| highs.into_iter().min());
                        self.metrics.visible(
                            &table.name,
                            &batches,
                            &self.config.event_time_field,
                            watermark_before,
                        );
                        let mut by_topic: BTreeMap<&str, u64> = BTreeMap::new();
                        for (tp, last) in &last_offsets {
                            if let Some(part) = table.parts.get_mut(tp) {
                                if let Some(gold) = self.gold.as_mut().filter(|g| g.table == index)
                                {
                                    gold.committed(tp, *last, part.batches.clone());
                                }
                                if let Some(newest) =
                                    newest_event_time(&part.batches, &self.config.event_time_field)
                                {
                                    let high = table.event_high.entry(tp.clone()).or_insert(newest);
                                    *high = (*high).max(newest);
                                }
                                *by_topic.entry(tp.topic.as_ref()).or_default() += part.rows as u64;
                                self.metrics.buffered(tp, &table.name, -(part.rows as i64));
                                part.committed = Some(*last);
                                part.batches.clear();
                                part.rows = 0;
                                part.bytes = 0;
                            }
                        }
                        if let Some(watermark) = self
                            .parts
                            .keys()
                            .map(|tp| table.event_high.get(tp).copied())
                            .collect::<Option<Vec<i64>>>()
                            .and_then(|highs| highs.into_iter().min())
                        {
                            self.metrics.watermark(&table.name, watermark);
                        }
                        self.metrics.committed(
                            &table.name,
                            &by_topic,
                            version,
                            &sizes,
                            started.elapsed(),
                            attempts,
                        );
                        self.summary.commits += 1;
                        self.summary.rows_committed += rows;
                        self.summary.files += sizes.len() as u64;
                    }
                }
            }
            self.metrics
                .flush_duration
                .observe(started.elapsed().as_secs_f64());
            for (tp, last) in &pending {
                self.metrics.progress(tp, *last);
                if let Some(state) = self.parts.get_mut(tp) {
                    state.pending_first = None;
                    state.pending_last = None;
                }
            }
            let (_, bytes) = self.tables.buffered();
            self.metrics.buffered_bytes.set(bytes as i64);
            self.oldest = None;
            self.send_gold().await?;
            // Advisory group commit, so standard tools see the lag.
            self.source.command(SourceCommand::CommitOffsets(
                pending
                    .into_iter()
                    .filter(|(tp, _)| self.parts.contains_key(tp))
                    .map(|(tp, last)| (tp, last + 1))
                    .collect(),
            ));
            return Ok(());
        }
    }
}

/// The newest event time (microseconds) among `batches`.
fn newest_event_time(batches: &[deltalake::arrow::array::RecordBatch], field: &str) -> Option<i64> {
    use deltalake::arrow::array::AsArray;
    use deltalake::arrow::datatypes::TimestampMicrosecondType;
    batches
        .iter()
        .filter_map(|b| {
            b.column_by_name(field)
                .and_then(|c| c.as_primitive_opt::<TimestampMicrosecondType>())
                .and_then(deltalake::arrow::compute::max)
        })
        .max()
}

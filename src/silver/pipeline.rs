//! The Silver event loop of one replica: records, rebalances, ticks and shutdown, one at a time.
//! A chunk of records is routed (`router`), decoded per table (`decode`), its rejections
//! dead-lettered and acknowledged, and only then buffered per table and source partition; ticks
//! and size limits start a flush (`flush`); rebalances claim and drop partitions (`ownership`).
//!
//! Buffers are kept per table and source partition, so that work of a fenced or lost partition can
//! be dropped without touching the others.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::gold::stage1::Emitter;
use crate::kafka::consumer::{Commands, SourceCommand, SourceEvent};
use crate::kafka::event_loop::{GraceExceeded, Stage};
use crate::lake::commit::CommitError;
use crate::lake::files::SilverError;
use crate::models::{Rejection, SourceRecord, TopicPartition};
use crate::ops::Metrics;
use crate::schema::registry::SchemaRegistry;
use crate::silver::dead_letters::DeadLetters;
use crate::silver::tables::Tables;

use super::flush::Epochs;
use super::routes::{Destination, Route};

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
    #[error("gold stage 1: {0}")]
    Gold(#[from] crate::gold::stage1::EmitError),
    #[error("gold stage 2: {0}")]
    Stage2(#[from] Box<crate::gold::stage2::Stage2Error>),
    #[error("gold stage 2 task: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// A reader schema or subject cannot make a table.
    #[error("schema: {0}")]
    Schema(String),
}

impl From<crate::silver::tables::TablesError> for PipelineError {
    fn from(e: crate::silver::tables::TablesError) -> Self {
        match e {
            crate::silver::tables::TablesError::Refused(why) => PipelineError::Schema(why),
            crate::silver::tables::TablesError::Reader(why) => {
                PipelineError::Schema(why.to_string())
            }
            crate::silver::tables::TablesError::Interrupted => PipelineError::Interrupted,
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
    pub gold: Option<crate::gold::stage2::GoldSummary>,
}

/// Per owned partition: where consumption stands (the rows themselves are buffered per table).
#[derive(Default)]
pub(super) struct PartitionState {
    /// Records below this offset were handled in this run already (a replay after a seek): skipped.
    pub(super) position: Option<i64>,
    /// First and last offset handled (a buffered row or an acknowledged dead letter) and not yet
    /// committed: every table's uncommitted work of this partition lies in between.
    pub(super) pending_first: Option<i64>,
    pub(super) pending_last: Option<i64>,
    /// After fencing, records are ignored until the source confirms the seek back.
    pub(super) awaiting_reseek: bool,
    /// After fencing, while the partition's progress is read again (no seek sent yet): a
    /// confirmation of an earlier seek does not end `awaiting_reseek`.
    pub(super) reclaiming: bool,
    /// Shutdown interrupted a dead letter of this partition: nothing after it may be buffered.
    pub(super) stopped: bool,
}

pub struct Replica {
    pub(super) config: Config,
    pub(super) metrics: Arc<Metrics>,
    pub(super) registry: SchemaRegistry,
    pub(super) tables: Tables,
    pub(super) routes: rustc_hash::FxHashMap<u32, Route>,
    pub(super) dead_letters: DeadLetters,
    pub(super) commands: Commands,
    /// Set while this replica owns the partition that makes it the one to maintain the tables.
    pub(super) maintainer: Arc<std::sync::atomic::AtomicBool>,
    pub(super) parts: HashMap<TopicPartition, PartitionState>,
    pub(super) oldest: Option<Instant>,
    pub(super) summary: RunSummary,
    pub(super) shutdown: CancellationToken,
    /// Gold stage 1 (when Gold is on).
    pub(super) gold: Option<Emitter>,
    /// Set while a failed flush waits for its retry (see `flush`).
    pub(super) stalled: Option<crate::retry::Stall>,
    /// Assignments whose claim waits for the object store (see `settle_claims`).
    pub(super) claims: crate::kafka::claims::Claims,
    /// The consumed positions last committed to the group (advisory), and when.
    pub(super) advised: (HashMap<TopicPartition, i64>, Instant),
    /// The clock of the flush under way, kept across its retries (see `flush`).
    pub(super) flush_clock: Option<i64>,
    /// When the last flush that committed rows ended (at first: when the replica started).
    pub(super) flushed_at: Instant,
}

/// How often consumed positions are committed to the group.
const ADVISE_EVERY: Duration = Duration::from_secs(1);

impl Replica {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        config: Config,
        metrics: Arc<Metrics>,
        registry: SchemaRegistry,
        tables: Tables,
        dead_letters: DeadLetters,
        commands: Commands,
        maintainer: Arc<std::sync::atomic::AtomicBool>,
        shutdown: CancellationToken,
        gold: Option<Emitter>,
    ) -> Self {
        Self {
            config,
            metrics,
            registry,
            tables,
            routes: Default::default(),
            dead_letters,
            commands,
            maintainer,
            parts: HashMap::new(),
            oldest: None,
            summary: RunSummary::default(),
            shutdown,
            gold,
            stalled: None,
            claims: Default::default(),
            advised: (HashMap::new(), Instant::now()),
            flush_clock: None,
            flushed_at: Instant::now(),
        }
    }

    /// Commits the consumed position of every owned partition to the consumer group, at most
    /// every [`ADVISE_EVERY`]. Advisory: the table's `txn` says where a partition resumes, never
    /// the group. The group's lag is then what this replica has not read yet, which is the load
    /// an autoscaler should see; what is read and not yet in the table is `strata_durable_lag`.
    fn advise_positions(&mut self) {
        if self.advised.1.elapsed() < ADVISE_EVERY {
            return;
        }
        self.advised.1 = Instant::now();
        let moved: std::collections::BTreeMap<TopicPartition, i64> = self
            .parts
            .iter()
            .filter(|(_, state)| !state.awaiting_reseek && !state.stopped)
            .filter_map(|(tp, state)| state.position.map(|next| (tp, next)))
            .filter(|(tp, next)| self.advised.0.get(*tp) != Some(next))
            .map(|(tp, next)| (tp.clone(), next))
            .collect();
        if moved.is_empty() {
            return;
        }
        self.advised.0.extend(moved.clone());
        self.commands.send(SourceCommand::CommitOffsets(moved));
    }

    /// What this replica did.
    pub(crate) fn finish(self) -> RunSummary {
        self.summary
    }

    fn closing(&mut self, event: SourceEvent) {
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
                        .map(|r| r.value.as_ref().map_or(0, |v| v.len()))
                        .sum();
                    self.metrics.consumed(&tp, records.len(), bytes);
                    self.metrics.dropped(&tp, "shutdown", records.len());
                }
            }
            SourceEvent::Reseeked(..)
            | SourceEvent::OutOfRange { .. }
            | SourceEvent::InRange(_)
            | SourceEvent::CaughtUp => {}
        }
    }

    async fn handle(&mut self, event: SourceEvent) -> Result<(), PipelineError> {
        match event {
            SourceEvent::Records(records) => self.on_records(records).await,
            SourceEvent::Assigned { partitions, reply } => {
                self.claims.push(partitions, reply);
                self.settle_claims().await;
                Ok(())
            }
            SourceEvent::Revoked {
                partitions,
                lost,
                done,
            } => {
                // A lost assignment may already be someone else's: its work is only dropped. While
                // the store refuses writes the rebalance does not wait for it either: the work is
                // dropped, and the next owner reads it again.
                self.claims.revoke(&partitions);
                if !lost && self.stalled.is_none() {
                    // The epochs are recorded before the partitions go: a send still in flight
                    // would race the next owner's replay of them.
                    self.flush(Epochs::Sent).await?;
                }
                self.forget(&partitions, if lost { "lost" } else { "revoked" });
                let _ = done.send(());
                Ok(())
            }
            SourceEvent::Reseeked(tp, offset) => {
                // Only the seek this partition waits for: a confirmation of an earlier one (a
                // seek back, then a fence's) would end the wait with the wrong records coming.
                if let Some(state) = self
                    .parts
                    .get_mut(&tp)
                    .filter(|s| !s.reclaiming && s.position.unwrap_or(0) == offset)
                {
                    state.awaiting_reseek = false;
                }
                Ok(())
            }
            // Bronze is consumed from the earliest record when an offset is out of range.
            SourceEvent::OutOfRange { .. } | SourceEvent::InRange(_) => Ok(()),
            // Nothing more to read now. Once an interval has passed since the last flush, the rows
            // waiting need not wait out an interval of their own: a burst, or a backlog's tail, is
            // committed as soon as it is read. A flush still comes at most about once per
            // interval, so a steady trickle makes no more commits (or files) than before.
            SourceEvent::CaughtUp => {
                let (rows, _) = self.tables.buffered();
                let due = self.flushed_at.elapsed() >= self.config.flush_interval;
                if rows > 0 && due && self.stalled.is_none() {
                    self.metrics.caught_up_flush();
                    self.flush(Epochs::InBackground).await?;
                }
                Ok(())
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
            .map(|r| r.value.as_ref().map_or(0, |v| v.len()))
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
        // Records below the position were handled already (a replay after a seek); a chunk
        // without any is kept as it is.
        let records = if records
            .iter()
            .any(|r| position.is_some_and(|p| r.offset < p))
        {
            let (replayed, records): (Vec<SourceRecord>, Vec<SourceRecord>) = records
                .into_iter()
                .partition(|r| position.is_some_and(|p| r.offset < p));
            self.skipped(&tp, replayed.len());
            records
        } else {
            records
        };
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
        // What each table holds of this partition: looked up once per chunk, not per record.
        let held: Vec<Option<i64>> = self
            .tables
            .list
            .iter()
            .map(|table| table.parts.get(&tp).and_then(|p| p.committed))
            .collect();
        // The most any table holds: a record routed to no table was dead-lettered already if some
        // table committed past it (dead letters are acknowledged before any commit).
        let highest = held.iter().flatten().max().copied();
        for (record, destination) in records.iter().zip(destinations) {
            match destination {
                Destination::Table(index, body) => {
                    let held = held.get(index).copied().flatten();
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
            self.metrics
                .buffered(&tp, &table.name, batch.num_rows() as i64);
            table.buffer(&tp, batch);
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
        self.metrics.buffered_bytes(bytes);
        // While stalled, the retry waits for its tick; fetching is paused, so little comes in.
        if (rows >= self.config.file_max_rows || bytes >= self.config.file_max_bytes)
            && self.stalled.is_none()
        {
            self.flush(Epochs::InBackground).await?;
        }
        Ok(())
    }

    pub(super) fn skipped(&mut self, tp: &TopicPartition, count: usize) {
        if count > 0 {
            self.summary.duplicates_skipped += count as u64;
            self.metrics.skipped_duplicates(tp, count);
        }
    }
}

impl Stage for Replica {
    type Error = PipelineError;

    async fn on_event(&mut self, event: SourceEvent) -> Result<(), PipelineError> {
        self.handle(event).await
    }

    async fn on_tick(&mut self) -> Result<(), PipelineError> {
        if !self.claims.is_empty() {
            self.settle_claims().await;
        }
        if self.stalled.is_some() {
            self.retry_stalled().await?;
        } else if self
            .oldest
            .is_some_and(|t| t.elapsed() >= self.config.flush_interval)
        {
            self.flush(Epochs::InBackground).await?;
        }
        self.advise_positions();
        self.gold_idle().await
    }

    async fn commit_all(&mut self) -> Result<(), PipelineError> {
        self.flush_to_the_end().await
    }

    fn answer_while_closing(&mut self, event: SourceEvent) {
        self.closing(event);
    }

    /// A signal while a table opening mid-run waited for the lake: drain what is complete.
    fn drains_after(error: &PipelineError) -> bool {
        matches!(error, PipelineError::Interrupted)
    }
}

impl From<GraceExceeded> for PipelineError {
    fn from(e: GraceExceeded) -> Self {
        PipelineError::GraceExceeded(e.0)
    }
}

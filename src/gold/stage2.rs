//! Stage 2 of Gold as it runs in a replica: a second consumer group (`<group>-gold`) on the
//! partials topic. Each owned partials partition has a [`PartitionMerge`]; its sub-results and
//! closed announcements are sent (and acknowledged) after every chunk. Final rows are committed to
//! `<lake>/gold/<name>` with a `txn` per partials partition = the last offset handled, and the
//! partition's whole merge state is stored beside the table first, under
//! `_strata_state/<topic>/<partition>/<offset>.bin`. A new owner restores the state of the committed
//! offset and reads on from there, so every row is committed once, by the same rule as Silver.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use deltalake::{ObjectStore, Path};
use object_store::ObjectStoreExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::core::aggregate::Output;
use super::core::closing::{Closed, Source as SourcePartition};
use super::core::merge::PartitionMerge;
use super::core::output::{gold_rows, gold_schema, KeyType};
use super::core::partial::{spec_fingerprint, KeyValue, Message};
use super::stage1::{gold_name, partials_producer, send_in_order};
use crate::config::{Config, GoldConfig};
use crate::kafka::admin::Admin;
use crate::kafka::consumer::{Commands, Source, SourceCommand, SourceEvent, SourceSettings};
use crate::kafka::event_loop::{self, GraceExceeded, Stage};
use crate::lake;
use crate::lake::commit::{Checked, CommitError, CommitOutcome, Fenced, TableCommitter};
use crate::lake::files::{FilePolicy, SilverWriter};
use crate::models::TopicPartition;
use crate::ops::Metrics;
use crate::retry::{Pace, Retry, Stall};

/// Gold rows kept in memory for the summary (the demo prints the top keys per window).
/// Why Gold stage 2 stopped. Outages are retried before they get here; these stop the replica.
#[derive(Debug, thiserror::Error)]
pub enum Stage2Error {
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error(transparent)]
    Grace(#[from] GraceExceeded),
    #[error("Gold table: {0}")]
    Maintenance(#[from] crate::lake::maintenance::MaintenanceError),
    #[error("{0}")]
    Topic(#[from] crate::kafka::admin::TopicError),
    #[error("Bronze topic {0} does not exist")]
    NoSourceTopic(String),
    #[error("Gold table: {0}")]
    Table(#[from] deltalake::DeltaTableError),
    #[error("Gold commit: {0}")]
    Commit(#[from] CommitError),
    #[error("Gold files: {0}")]
    Files(#[from] crate::lake::files::SilverError),
    #[error("Gold rows: {0}")]
    Rows(#[from] deltalake::arrow::error::ArrowError),
    #[error("Gold state {path}: {source}")]
    State {
        path: String,
        source: object_store::Error,
    },
    #[error("the Gold state of {partition} at offset {offset} ({path}) cannot be read: {source}")]
    Unreadable {
        partition: TopicPartition,
        offset: i64,
        path: String,
        source: object_store::Error,
    },
    #[error("Gold state: {0}")]
    Format(#[from] crate::gold::core::partial::FormatError),
    /// Restoring a claim's state would take the replica over `STRATA_GOLD_STATE_MAX_BYTES`: the
    /// claim waits (never final).
    #[error("Gold state holds {state} bytes, at STRATA_GOLD_STATE_MAX_BYTES ({budget})")]
    AtBudget { state: usize, budget: usize },
    #[error("sending to {topic}: {source}")]
    Send {
        topic: String,
        source: rdkafka::error::KafkaError,
    },
}

impl Stage2Error {
    /// Whether a claim that failed this way, after `failed` earlier failures, is given up: a
    /// state file that does not decode, or one still missing after a few reads of the progress
    /// (a missing one may be another replica's cleanup in between). Store refusals (an outage)
    /// are retried for as long as they last.
    fn is_final(&self, failed: u32) -> bool {
        match self {
            Stage2Error::Format(_) => true,
            Stage2Error::Unreadable {
                source: object_store::Error::NotFound { .. },
                ..
            } => failed >= 4,
            _ => false,
        }
    }
}

const SUMMARY_ROWS: usize = 100_000;

/// A committed Gold row, for summaries.
#[derive(Debug, Clone)]
pub struct GoldRow {
    pub window_start: i64,
    pub window_end: i64,
    pub key: Vec<KeyValue>,
    pub values: Vec<Output>,
}

/// What stage 2 did in this run.
#[derive(Debug, Default, Clone)]
pub struct GoldSummary {
    pub rows: Vec<GoldRow>,
    pub rows_committed: u64,
    pub commits: u64,
    pub duplicates: u64,
    pub forwarded: u64,
}

struct Part {
    merge: PartitionMerge,
    /// Records below this offset were handled already.
    next: Option<i64>,
    /// Last offset handled and not committed.
    pending: Option<i64>,
    rows: Vec<Closed>,
    /// What `rows` hold, estimated ([`Closed::bytes`] summed): they count against the budget
    /// until their commit.
    rows_bytes: usize,
    /// The snapshot file of the committed state (deleted when a newer one commits).
    committed_state: Option<Path>,
    awaiting_reseek: bool,
    /// Set while the replica's Gold state is at its budget: nothing from this offset on was
    /// taken, and fetching is held until the stage seeks back here.
    paused_at: Option<i64>,
}

struct Job {
    topic: String,
    partitions: i32,
    fingerprint: u64,
    settings: GoldConfig,
    sources: Vec<SourcePartition>,
    keys: Vec<(String, KeyType)>,
    schema: deltalake::arrow::datatypes::SchemaRef,
    producer: crate::kafka::producer::Producer,
    committer: TableCommitter,
    writer: SilverWriter,
    store: Arc<dyn ObjectStore>,
    parts: HashMap<i32, Part>,
    commands: Commands,
    metrics: Arc<Metrics>,
    summary: GoldSummary,
    commit_every: Duration,
    last_commit: Instant,
    /// Set while a failed commit waits for its retry (see `commit_or_stall`).
    stalled: Option<Stall>,
    /// Assignments whose claim waits for the object store (see `settle_claims`).
    claims: crate::kafka::claims::Claims,
    shutdown: CancellationToken,
}

/// Runs stage 2 until `shutdown`; commits what is complete before it returns.
pub async fn run(
    config: Config,
    settings: GoldConfig,
    source_table: String,
    silver: deltalake::arrow::datatypes::SchemaRef,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Result<GoldSummary, Stage2Error> {
    let producer = partials_producer(&config)?;
    let topic = settings.partials_topic.clone();
    let admin = Admin::new(&config.brokers, &config.kafka_properties)?;
    let mut retry = Retry::new(Pace::Outage, &shutdown);
    // Stage 1 creates the partials topic; wait for it.
    let partitions = loop {
        match admin.partitions(&topic).await {
            Ok(Some(n)) => break n,
            Ok(None) | Err(_) => {
                if !retry.wait().await {
                    return Ok(GoldSummary::default());
                }
            }
        }
    };
    let mut sources = Vec::new();
    for bronze in &config.topics {
        let n = admin
            .partitions(bronze)
            .await?
            .ok_or_else(|| Stage2Error::NoSourceTopic(bronze.clone()))?;
        sources.extend((0..n).map(|p| (bronze.clone(), p)));
    }
    let keys: Vec<(String, KeyType)> = settings
        .keys
        .iter()
        .map(|k| {
            let kind = match silver.field_with_name(k).map(|f| f.data_type().clone()) {
                Ok(deltalake::arrow::datatypes::DataType::Utf8) => KeyType::Str,
                _ => KeyType::Int,
            };
            (k.clone(), kind)
        })
        .collect();
    let schema = gold_schema(&keys, &settings.aggregates);
    let name = gold_name(&settings, &source_table);
    let url = lake::table_url(&config.lake_url, "gold", &name)?;
    let table = lake::open_or_create(url, &schema, &name).await?;
    lake::maintenance::check_txn_retention(&table)?;
    let store = table.object_store();
    let group = format!("{}-gold", config.group_id);
    let committer = TableCommitter::new(table, &group, config.commit_retries)
        .with_checkpoint_interval(config.maintenance.checkpoint_interval);
    let writer = SilverWriter::new(
        schema.clone(),
        "window_start",
        FilePolicy::from_config(&config),
        store.clone(),
    );
    let (events_tx, events) = mpsc::channel(16);
    let source = Source::start(
        SourceSettings {
            brokers: config.brokers.clone(),
            group_id: group,
            topics: vec![topic.clone()],
            properties: config.kafka_properties.clone(),
            counts_assignments: false,
            strict_offsets: true,
            reports_caught_up: false,
            thread_name: "strata-partials",
        },
        metrics.clone(),
        events_tx,
    )?;
    tracing::info!(table = %name, %topic, partitions, sources = sources.len(), "Gold stage 2 running");
    let mut job = Job {
        fingerprint: spec_fingerprint(&settings.aggregates, &settings.keys),
        topic,
        partitions,
        settings,
        sources,
        keys,
        schema,
        producer,
        committer,
        writer,
        store,
        parts: HashMap::new(),
        commands: source.commands(),
        metrics,
        summary: GoldSummary::default(),
        commit_every: config.flush_interval.min(Duration::from_secs(5)),
        last_commit: Instant::now(),
        stalled: None,
        claims: Default::default(),
        shutdown: shutdown.clone(),
    };
    let grace = config.shutdown_grace;
    event_loop::run(&mut job, source, events, &shutdown, grace, || {}).await?;
    Ok(job.summary)
}

impl Stage for Job {
    type Error = Stage2Error;

    async fn on_event(&mut self, event: SourceEvent) -> Result<(), Stage2Error> {
        self.handle(event).await
    }

    async fn on_tick(&mut self) -> Result<(), Stage2Error> {
        if !self.claims.is_empty() {
            self.settle_claims().await?;
        }
        self.release_below_budget();
        // State also changes with no record: a commit clears closed rows, a claim restores
        // partitions, a fence drops them; a held replica reads no records to report it.
        self.report();
        if let Some(stall) = &self.stalled {
            if stall.due() {
                self.commit_or_stall().await;
            }
            return Ok(());
        }
        // Rows commit at the flush interval; progress alone (markers) less often, since a
        // restart merely reads those markers again.
        let rows = self.parts.values().any(|p| !p.rows.is_empty());
        let every = if rows {
            self.commit_every
        } else {
            self.commit_every * 10
        };
        if self.last_commit.elapsed() >= every {
            self.commit_or_stall().await;
        }
        Ok(())
    }

    async fn commit_all(&mut self) -> Result<(), Stage2Error> {
        self.commit_retrying().await
    }

    fn answer_while_closing(&mut self, event: SourceEvent) {
        match event {
            SourceEvent::Revoked { done, .. } => {
                let _ = done.send(());
            }
            SourceEvent::Assigned { reply, .. } => drop(reply),
            _ => {}
        }
    }
}

impl Job {
    fn new_merge(&self, partition: i32) -> PartitionMerge {
        PartitionMerge::new(
            partition,
            self.partitions,
            self.settings.window,
            i64::try_from(self.settings.allowed_lateness.as_micros()).unwrap_or(i64::MAX),
            self.settings.aggregates.clone(),
            self.sources.clone(),
        )
    }

    fn state_path(&self, partition: i32, offset: i64) -> Path {
        Path::from(format!(
            "_strata_state/{}/{partition}/{offset:020}.bin",
            self.topic
        ))
    }

    /// Takes over partials partitions, once: their committed offset and the state stored with
    /// it. A state file missing right after the offset was read
    /// means another replica committed (and cleaned up) in between: the next attempt reads the
    /// offset again.
    async fn claim_once(&mut self, partitions: &[TopicPartition]) -> Result<(), Stage2Error> {
        let budget = self.settings.state_max_bytes;
        // Each partition's state is restored only while the replica's state is below the budget:
        // a claim goes over it by at most the last partition restored (whose previous owner held
        // it within its own budget: replicas of a group are meant to share one). Otherwise the
        // whole claim waits.
        let mut state = self.state_bytes();
        if state >= budget {
            return Err(Stage2Error::AtBudget { state, budget });
        }
        let claimed = self.committer.claim(partitions).await?;
        let mut restored = Vec::with_capacity(claimed.len());
        for (tp, stored) in claimed {
            if state >= budget {
                self.committer.release(partitions);
                return Err(Stage2Error::AtBudget { state, budget });
            }
            let mut merge = self.new_merge(tp.partition);
            let mut committed_state = None;
            if let Some(offset) = stored {
                let path = self.state_path(tp.partition, offset);
                let bytes = match self.store.get(&path).await {
                    Ok(got) => got.bytes().await,
                    Err(e) => Err(e),
                };
                match bytes {
                    Ok(bytes) => merge.restore(&bytes)?,
                    Err(source) => {
                        return Err(Stage2Error::Unreadable {
                            partition: tp,
                            offset,
                            path: path.to_string(),
                            source,
                        })
                    }
                }
                committed_state = Some(path);
            }
            state += merge.state_bytes();
            restored.push((tp, stored, merge, committed_state));
        }
        for (tp, stored, merge, committed_state) in restored {
            self.parts.insert(
                tp.partition,
                Part {
                    merge,
                    next: stored.map(|o| o.saturating_add(1)),
                    pending: None,
                    rows: Vec::new(),
                    rows_bytes: 0,
                    committed_state,
                    awaiting_reseek: false,
                    paused_at: None,
                },
            );
        }
        Ok(())
    }

    /// Settles the claims that are due, once each: answers the assignment, or seeks the fenced
    /// partition to its restored state. One that fails waits for its next attempt
    /// (`kafka::claims`), while the loop goes on.
    async fn settle_claims(&mut self) -> Result<(), Stage2Error> {
        for claim in self.claims.take_due() {
            match self.claim_once(&claim.partitions).await {
                Err(Stage2Error::AtBudget { state, budget }) => {
                    // Restoring these partitions' state would go over the budget: the claim waits
                    // (an assignment stays paused, a fenced partition ignored), not counted as a
                    // failed attempt, until the state is below it.
                    let delay = self.claims.defer(claim);
                    tracing::warn!(retry_in = ?delay, state, budget,
                        "Gold state at its budget (STRATA_GOLD_STATE_MAX_BYTES): claiming partials partitions waits");
                }
                Ok(()) if claim.is_reclaim() => {
                    for tp in &claim.partitions {
                        let Some(part) = self.parts.get_mut(&tp.partition) else {
                            continue;
                        };
                        part.awaiting_reseek = true;
                        let next = part.next.unwrap_or(0);
                        self.commands.send(SourceCommand::Seek(tp.clone(), next));
                    }
                }
                Ok(()) => {
                    let resume = claim
                        .partitions
                        .iter()
                        .map(|tp| {
                            let after = self
                                .parts
                                .get(&tp.partition)
                                .and_then(|p| p.next)
                                .map(|n| n - 1);
                            (tp.clone(), after)
                        })
                        .collect();
                    claim.answer(resume);
                }
                Err(e) if e.is_final(claim.failed_attempts()) => return Err(e),
                Err(e) => {
                    let delay = self.claims.retry_later(claim);
                    tracing::warn!(error = %e, retry_in = ?delay,
                        "reading Gold progress failed; the partitions wait for it (an assignment paused, a fenced partition with its records ignored)");
                }
            }
        }
        Ok(())
    }

    async fn handle(&mut self, event: SourceEvent) -> Result<(), Stage2Error> {
        match event {
            SourceEvent::Records(records) => {
                let Some(first) = records.first() else {
                    return Ok(());
                };
                let partition = first.partition;
                // Kept up to date message by message: the budget is checked before each one.
                let mut state = self.state_bytes();
                let budget = self.settings.state_max_bytes;
                let Some(part) = self.parts.get_mut(&partition) else {
                    return Ok(());
                };
                if part.awaiting_reseek || part.paused_at.is_some() {
                    return Ok(());
                }
                let mut send: Vec<(i32, Option<Vec<u8>>, Vec<u8>)> = Vec::new();
                let gold = self.metrics.gold();
                for record in records {
                    if part.next.is_some_and(|n| record.offset < n) {
                        continue;
                    }
                    let message = match record
                        .value
                        .as_deref()
                        .map(|v| Message::decode(v, &self.settings.aggregates, self.fingerprint))
                    {
                        Some(Ok(message)) => Some(message),
                        Some(Err(e)) => {
                            gold.partial_refused("malformed", 1);
                            tracing::error!(partition, offset = record.offset, error = %e, "partials message refused");
                            None
                        }
                        None => {
                            gold.partial_refused("malformed", 1);
                            None
                        }
                    };
                    if state >= budget && message.as_ref().is_some_and(Message::opens_groups) {
                        // At the budget: nothing more of this partition is taken from here on
                        // (in log order, so no later marker closes a window without this
                        // partial). Markers, closed announcements and sub-results before it
                        // still pass: they close windows and let their rows be written.
                        part.paused_at = Some(record.offset);
                        part.next = Some(record.offset);
                        let tp = TopicPartition::new(self.topic.as_str(), partition);
                        self.commands.send(SourceCommand::Hold(tp.clone()));
                        self.metrics
                            .gold_state_budget_reached(&tp, record.offset, state, budget);
                        break;
                    }
                    part.next = Some(record.offset + 1);
                    part.pending = Some(record.offset);
                    let Some(message) = message else {
                        continue;
                    };
                    let before = part.merge.state_bytes();
                    let effects = part.merge.handle(message);
                    state = (state + part.merge.state_bytes()).saturating_sub(before);
                    gold.merged(effects.duplicates, effects.forwarded);
                    self.summary.duplicates += effects.duplicates;
                    self.summary.forwarded += effects.forwarded;
                    if effects.too_late > 0 {
                        gold.partial_refused("window_closed", effects.too_late);
                        tracing::error!(
                            partition,
                            offset = record.offset,
                            "partial for a window already closed"
                        );
                    }
                    let rows_bytes: usize = effects.rows.iter().map(Closed::bytes).sum();
                    part.rows_bytes += rows_bytes;
                    state += rows_bytes;
                    part.rows.extend(effects.rows);
                    for (to, message) in effects.send {
                        send.push((to, None, message.encode(self.fingerprint)));
                    }
                }
                self.report();
                if !send.is_empty() {
                    send_in_order(&self.producer, &self.topic, send)
                        .await
                        .map_err(|source| Stage2Error::Send {
                            topic: self.topic.clone(),
                            source,
                        })?;
                }
                Ok(())
            }
            SourceEvent::Assigned { partitions, reply } => {
                self.claims.push(partitions, reply);
                self.settle_claims().await
            }
            SourceEvent::Revoked {
                partitions,
                lost,
                done,
            } => {
                self.claims.revoke(&partitions);
                // While the store refuses writes the rebalance does not wait for it: the work
                // is dropped, and the next owner reads it again from the committed offset.
                if !lost && self.stalled.is_none() {
                    self.commit_or_stall().await;
                }
                // A re-claim the commit's fence queued for these partitions ends too.
                self.claims.revoke(&partitions);
                for tp in &partitions {
                    self.parts.remove(&tp.partition);
                    // A stopped or held partition is another owner's problem now.
                    self.metrics.gold_partials_resumed(tp);
                    self.metrics.gold_state_budget_released(tp);
                }
                // The state left with them: reported before the rebalance completes, not at the
                // next tick (a held replica reads no records to report it).
                self.report();
                self.committer.release(&partitions);
                let _ = done.send(());
                Ok(())
            }
            SourceEvent::Reseeked(tp, offset) => {
                // Only the seek this partition waits for (see Silver's pipeline).
                if let Some(part) = self
                    .parts
                    .get_mut(&tp.partition)
                    .filter(|p| p.next.unwrap_or(0) == offset)
                {
                    part.awaiting_reseek = false;
                }
                Ok(())
            }
            SourceEvent::OutOfRange {
                partition,
                next,
                earliest,
                end,
            } => {
                // Partials were lost (retention, a recreated topic): skipping them would make
                // Gold silently inexact, so the partition stops and an operator decides.
                self.metrics
                    .gold_partials_lost(&partition, next, earliest, end);
                Ok(())
            }
            SourceEvent::InRange(partition) => {
                self.metrics.gold_partials_resumed(&partition);
                Ok(())
            }
            // Stage 2 commits on its own clock (the commit interval), not on its source's pace;
            // its source does not send this (`reports_caught_up: false`).
            SourceEvent::CaughtUp => Ok(()),
        }
    }

    fn report(&mut self) {
        let open: usize = self
            .parts
            .values()
            .map(|p| p.merge.open().0 + p.merge.open().1)
            .sum();
        let watermark = self
            .parts
            .values()
            .filter_map(|p| p.merge.watermark())
            .min();
        self.metrics.gold().stage2_state(open, watermark);
        self.metrics.gold().state_bytes(self.state_bytes());
    }

    /// Bytes of Gold state this replica holds, over its partitions: open groups, results held
    /// for the merge, and closed rows waiting for their commit (kept, not counted again).
    fn state_bytes(&self) -> usize {
        self.parts
            .values()
            .map(|p| p.merge.state_bytes() + p.rows_bytes)
            .sum()
    }

    /// Partitions held at the budget take messages again once the state is below 90 % of it
    /// (closed rows were committed, or a partition left): each seeks back to where it stopped.
    fn release_below_budget(&mut self) {
        if !self.parts.values().any(|p| p.paused_at.is_some()) {
            return;
        }
        let state = self.state_bytes();
        if state > self.settings.state_max_bytes / 10 * 9 {
            return;
        }
        for (partition, part) in &mut self.parts {
            if let Some(at) = part.paused_at.take() {
                let tp = TopicPartition::new(self.topic.as_str(), *partition);
                part.awaiting_reseek = true;
                self.commands.send(SourceCommand::Seek(tp.clone(), at));
                self.metrics.gold_state_budget_released(&tp);
                tracing::info!(partition = %tp, offset = at, state, "Gold state below its budget again: taking partials");
            }
        }
    }

    /// Commits once. When that fails stage 2 stalls instead of waiting in here: fetching partials
    /// pauses (the consumer keeps polling, so a long store outage never costs the group
    /// membership), rebalances are answered at once, and a tick makes the next attempt with
    /// backoff. Nothing is lost: the merge state and the closed rows stay as they are.
    async fn commit_or_stall(&mut self) {
        match self.commit().await {
            Ok(()) => {
                self.last_commit = Instant::now();
                if self.commands.unstall(&mut self.stalled) {
                    tracing::info!("Gold commits again; fetching partials resumes");
                }
            }
            Err(e) => {
                let delay = self.commands.stall(&mut self.stalled);
                tracing::warn!(error = %e, retry_in = ?delay,
                    "Gold commit failed; fetching partials paused, state kept");
            }
        }
    }

    /// The final commit after shutdown: retried until it succeeds or the stop ends the wait.
    async fn commit_retrying(&mut self) -> Result<(), Stage2Error> {
        let mut retry = Retry::new(Pace::Outage, &self.shutdown);
        loop {
            match self.commit().await {
                Ok(()) => {
                    self.last_commit = Instant::now();
                    return Ok(());
                }
                Err(e) => {
                    tracing::warn!(error = %e, "Gold commit failed; retrying");
                    if !retry.wait().await {
                        return Err(e);
                    }
                }
            }
        }
    }

    /// Stores the state of every partition with new progress, writes the final rows and commits
    /// them with the partitions' offsets.
    async fn commit(&mut self) -> Result<(), Stage2Error> {
        let mut last: BTreeMap<TopicPartition, i64> = BTreeMap::new();
        for (partition, part) in &self.parts {
            if let Some(offset) = part.pending {
                last.insert(TopicPartition::new(self.topic.as_str(), *partition), offset);
            }
        }
        if last.is_empty() {
            return Ok(());
        }
        // A commit whose answer was lost is settled from the log first: when it landed, its
        // state files and rows are in place and only the bookkeeping below is left.
        let landed = match self.committer.check(&last).await? {
            Checked::Fenced(fenced) => return self.on_fenced(fenced).await,
            Checked::Landed(version) => Some(version),
            Checked::Owned => None,
        };
        let mut states = Vec::new();
        for (tp, offset) in &last {
            let Some(part) = self.parts.get(&tp.partition) else {
                continue;
            };
            let path = self.state_path(tp.partition, *offset);
            if landed.is_none() {
                self.store
                    .put(&path, part.merge.snapshot().into())
                    .await
                    .map_err(|source| Stage2Error::State {
                        path: path.to_string(),
                        source,
                    })?;
            }
            states.push((tp.partition, path));
        }
        // The closed results are read where they are held (a million of them can be hundreds of
        // MiB): no copy besides the Arrow rows.
        let closed: Vec<&Closed> = last
            .keys()
            .filter_map(|tp| self.parts.get(&tp.partition))
            .flat_map(|p| p.rows.iter())
            .collect();
        let count = closed.len();
        let outcome = match landed {
            Some(version) => CommitOutcome::Committed {
                version,
                attempts: 1,
                checkpoint: None,
            },
            None => {
                let files = if closed.is_empty() {
                    Vec::new()
                } else {
                    let batch =
                        gold_rows(&self.schema, &self.keys, &self.settings.aggregates, &closed)?;
                    drop(closed);
                    self.writer.write(&[batch]).await?
                };
                crate::failpoint!("before_gold_commit");
                self.committer.commit(files, &last).await?
            }
        };
        match outcome {
            CommitOutcome::Fenced(fenced) => self.on_fenced(fenced).await,
            CommitOutcome::Committed { .. } => {
                self.metrics.gold().gold_committed(count);
                self.summary.commits += 1;
                self.summary.rows_committed += count as u64;
                for (partition, path) in states {
                    if let Some(part) = self.parts.get_mut(&partition) {
                        // Taken once the rows are committed: a commit retried through an outage
                        // builds no summary rows in vain.
                        let room = SUMMARY_ROWS.saturating_sub(self.summary.rows.len());
                        self.summary
                            .rows
                            .extend(part.rows.iter().take(room).map(|c| GoldRow {
                                window_start: c.window_start,
                                window_end: c.window_end,
                                key: c.key.clone(),
                                values: c.accumulator.finish(),
                            }));
                        part.pending = None;
                        part.rows.clear();
                        part.rows_bytes = 0;
                        if let Some(old) = part.committed_state.replace(path) {
                            // Best effort: a leftover file is only clutter.
                            let _ = self.store.delete(&old).await;
                        }
                    }
                }
                Ok(())
            }
        }
    }

    /// Partitions someone else committed: their state is dropped and restored from the table.
    async fn on_fenced(&mut self, fenced: Vec<Fenced>) -> Result<(), Stage2Error> {
        for f in fenced {
            if f.own_commit {
                tracing::info!(partition = %f.partition, stored = ?f.stored, "this replica's own Gold commit, whose answer was lost, is in the table: restoring from it");
            } else {
                tracing::warn!(partition = %f.partition, expected = ?f.expected, stored = ?f.stored, "Gold partition fenced: restoring from the table");
            }
            self.parts.remove(&f.partition.partition);
            // Its re-claim seeks it, which ends a hold at the budget.
            self.metrics.gold_state_budget_released(&f.partition);
            self.committer.release(std::slice::from_ref(&f.partition));
            self.claims.push_reclaim(vec![f.partition]);
        }
        // Claimed from the next tick (again later while the store refuses), where a state file
        // that cannot be read stops stage 2; the partition's records are ignored meanwhile (it
        // has no state here).
        Ok(())
    }
}

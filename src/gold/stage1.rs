//! Stage 1 of Gold as it runs in a replica: after the Gold source table commits a partition's
//! offsets (prev, last], exactly those rows are one **epoch**. Stage 1 decides, row by row, which
//! windows each row is late for (against that source partition's own watermark, carried from
//! epoch to epoch), pre-aggregates the rest, sends the partials and a marker to every partials
//! partition (idempotent producer, awaited), then commits the late rows to the late-events table
//! with `txn` = `last` and the watermark after the epoch. That `txn` marks the epoch as sent.
//! All of that runs in a task of its own while the replica consumes on; the next flush waits for
//! it before Silver commits more (see [`Emitter`]).
//!
//! After a crash between the Silver commit (S) and the late commit (G < S), the next owner reads
//! the epoch (G, S] again from Kafka (the pipeline routes those rows here, not to Silver, which
//! holds them), starting from the watermark stored at G: the same rows, the same watermark, so the
//! same partials with the same sequence numbers, which stage 2 recognises as replays.
//!
//! A caught-up source partition without records for the idle timeout moves its watermark with the
//! clock (now minus the delay, in closing steps: once per slide while the partition stays quiet),
//! commits it, and then marks every partials partition, so windows close when a partition goes
//! quiet. Events it receives later behind that watermark are late.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use deltalake::arrow::array::{
    Array, ArrayRef, AsArray, Float64Array, RecordBatch, TimestampMicrosecondArray, UInt32Array,
};
use deltalake::arrow::compute::take_record_batch;
use deltalake::arrow::datatypes::{
    DataType, Field, Schema, SchemaRef, TimeUnit, TimestampMicrosecondType,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::FutureRecord;

use crate::kafka::producer::Producer;

use super::core::epoch::{epoch_partials, preaggregate};
use super::core::partial::{spec_fingerprint, BatchWriter, Message};
use super::core::preaggregate::{GoldSpec, RowsError};
use super::core::watermark::{before_each, bounded, closing_step, is_final};
use crate::config::{Config, GoldConfig};
use crate::kafka::admin::{Admin, Ensured, TopicError, TopicSpec};
use crate::lake;
use crate::lake::commit::{CommitError, CommitOutcome, Fenced, TableCommitter};
use crate::lake::files::{FilePolicy, SilverError, SilverWriter};
use crate::lake::OpenError;
use crate::models::TopicPartition;
use crate::ops::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum EmitError {
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("late-events table: {0}")]
    Commit(#[from] CommitError),
    #[error("late-events files: {0}")]
    Files(#[from] SilverError),
    #[error("{0}")]
    Rows(#[from] RowsError),
}

/// A partials message holds partials up to about this many bytes (Kafka's default
/// `message.max.bytes` is 1 MiB; compression applies per producer batch).
const PARTIALS_MESSAGE_BYTES: usize = 256 * 1024;

/// What Gold's table names are.
pub fn gold_name(gold: &GoldConfig, source_table: &str) -> String {
    gold.name
        .clone()
        .unwrap_or_else(|| format!("{source_table}_by_{}", gold.keys.join("_")))
}

/// A producer for the partials topic: idempotent and gapless, so a partition's messages arrive
/// once each and in order (stage 2's replay detection relies on the order).
pub fn partials_producer(config: &Config) -> Result<Producer, KafkaError> {
    Producer::create(
        crate::kafka::producer_config(
            &config.brokers,
            &config.kafka_properties,
            config.producer_compression,
        )
        .set("enable.gapless.guarantee", "true")
        .set("message.timeout.ms", "300000"),
    )
}

/// The partials topic's partition count, creating the topic when it is missing.
pub async fn ensure_partials_topic(config: &Config, gold: &GoldConfig) -> Result<i32, TopicError> {
    let admin = Admin::new(&config.brokers, &config.kafka_properties).map_err(|source| {
        TopicError::Unavailable {
            topic: gold.partials_topic.clone(),
            source,
        }
    })?;
    // Replicated as the cluster's topics are (one broker down must not stall every replica's
    // flush, which waits for the partials' acknowledgements), with an explicit retention: stage 2
    // must read every partial before it expires.
    let spec = TopicSpec {
        name: gold.partials_topic.clone(),
        partitions: gold.partitions,
        replication: gold.partials_replication,
        config: vec![(
            "retention.ms".to_string(),
            gold.partials_retention.as_millis().to_string(),
        )],
    };
    let ensured = admin.ensure(&spec).await?;
    if let Ensured::Created { partitions } = ensured {
        tracing::info!(topic = %spec.name, partitions, "partials topic created");
    }
    Ok(ensured.partitions())
}

/// Sends `messages` in order (a queue-full is waited out, never reordered) and waits for every
/// acknowledgement.
pub async fn send_in_order(
    producer: &Producer,
    topic: &str,
    messages: Vec<(i32, Option<Vec<u8>>, Vec<u8>)>,
) -> Result<(), KafkaError> {
    let mut deliveries = Vec::with_capacity(messages.len());
    for (partition, key, value) in &messages {
        loop {
            let mut record: FutureRecord<'_, [u8], [u8]> =
                FutureRecord::to(topic).partition(*partition).payload(value);
            if let Some(key) = key {
                record = record.key(key);
            }
            match producer.send_result(record) {
                Ok(delivery) => {
                    deliveries.push(delivery);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) => return Err(e),
            }
        }
    }
    for delivery in deliveries {
        delivery.await.map_err(|(e, _)| e)?;
    }
    Ok(())
}

/// The late-events table's extra columns.
pub fn late_schema(silver: &Schema) -> SchemaRef {
    let ts = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
    let mut fields: Vec<Field> = silver.fields().iter().map(|f| f.as_ref().clone()).collect();
    fields.push(Field::new("window_start", ts.clone(), false));
    fields.push(Field::new("window_end", ts.clone(), false));
    fields.push(Field::new("watermark", ts, false));
    fields.push(Field::new("lateness_seconds", DataType::Float64, false));
    Arc::new(Schema::new(fields))
}

#[derive(Debug, Clone)]
struct SourceState {
    /// Last offset whose epoch was sent (the late table's `txn`).
    emitted: i64,
    /// Watermark after `emitted` (microseconds; `None`: no event yet).
    watermark: Option<i64>,
    /// Silver holds up to here and the epoch (emitted, this] was not sent: it is read again.
    replay_through: Option<i64>,
    /// The replica's clock recorded with the Silver commit of that epoch (see `Epoch::clock`).
    replay_clock: Option<i64>,
    replay: Vec<RecordBatch>,
    last_activity: Instant,
    /// When the broker was last asked whether the partition is caught up.
    last_check: Instant,
    hot: usize,
}

/// Where Silver stands for a partition Gold claims: its committed offset and the clock recorded
/// with that commit.
#[derive(Debug, Default, Clone, Copy)]
pub struct SilverProgress {
    pub committed: Option<i64>,
    pub clock: Option<i64>,
}

struct Epoch {
    tp: TopicPartition,
    end: i64,
    batches: Vec<RecordBatch>,
    /// The replica's clock (microseconds) recorded with the Silver commit of these rows: no row
    /// moves the watermark more than `STRATA_MAX_EVENT_TIME_SKEW` past it (`watermark::bounded`).
    /// `None` for a commit made before it was recorded.
    clock: Option<i64>,
}

/// One epoch's computed output.
struct Computed {
    messages: Vec<(i32, Option<Vec<u8>>, Vec<u8>)>,
    late: Option<RecordBatch>,
    watermark: Option<i64>,
    events: u64,
    hot: usize,
    load: BTreeMap<i32, (u64, u64)>,
    salted: u64,
}

/// What an epoch that was sent and recorded leaves behind.
struct Recorded {
    tp: TopicPartition,
    end: i64,
    watermark: Option<i64>,
    events: u64,
    hot: usize,
    load: BTreeMap<i32, (u64, u64)>,
    salted: u64,
    late_rows: u64,
}

/// How an epoch is computed: the spec and the settings. Shared with the task that sends.
struct Rules {
    spec: GoldSpec,
    salting: Option<super::core::epoch::Salting>,
    delay: i64,
    /// `STRATA_MAX_EVENT_TIME_SKEW` in microseconds (see `watermark::bounded`).
    max_skew: i64,
    lateness: i64,
    fingerprint: u64,
    partitions: i32,
    late_schema: SchemaRef,
}

/// What sends epochs and records them: the partials producer and the late-events table. It goes
/// with a flush's epochs to the task that sends them, and comes back with the outcome.
struct Outbox {
    producer: Producer,
    topic: String,
    late: TableCommitter,
    late_writer: SilverWriter,
}

/// A send's outcome, back from its task, with the outbox and the epochs it was given.
struct Sent {
    outbox: Outbox,
    epochs: Vec<Epoch>,
    result: Result<Delivered, EmitError>,
}

enum Delivered {
    /// Every epoch's partials acknowledged and the late-table commit landed.
    Recorded(Vec<Recorded>),
    /// The late-table commit was refused: another replica moved these partitions' progress.
    Fenced(Vec<Fenced>),
}

/// Stage 1 of one replica. A flush's epochs are sent by a task of their own
/// ([`Emitter::start`]), so that consuming goes on while their partials are computed, sent and
/// acknowledged and the late table commits; the next flush waits for that task before Silver
/// commits more ([`Emitter::send`]), so an epoch is always recorded before the partition's next
/// Silver commit (what makes a replay cut the same epochs, see the module's text).
pub struct Emitter {
    rules: Arc<Rules>,
    idle_timeout: Duration,
    /// `None` while a send is in flight (`in_flight` holds it then).
    outbox: Option<Outbox>,
    in_flight: Option<tokio::task::JoinHandle<Sent>>,
    /// Partitions released while a send was in flight: the late table forgets them when the
    /// outbox comes back.
    released: Vec<TopicPartition>,
    /// Fences found by a send that finished while nobody was waiting for it (a claim took its
    /// outcome in), for the next [`Emitter::poll`] or [`Emitter::send`].
    fenced: Vec<Fenced>,
    /// The failure of such a send (its epochs are queued again).
    failed: Option<EmitError>,
    sources: HashMap<TopicPartition, SourceState>,
    pending: Vec<Epoch>,
    metrics: Arc<Metrics>,
    /// Index of the Silver table Gold reads.
    pub table: usize,
}

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

impl Emitter {
    /// Opens the late-events table and the partials topic. `silver` is the Gold source table's
    /// row schema; an unusable spec (a key or aggregate field it lacks, too many salts) is a
    /// `Schema` error naming it, an unreachable broker or lake a `Storage` one (worth retrying).
    pub async fn open(
        config: &Config,
        gold: &GoldConfig,
        table: usize,
        table_name: &str,
        silver: &Schema,
        metrics: Arc<Metrics>,
    ) -> Result<Self, OpenError> {
        let spec = GoldSpec {
            key_fields: gold.keys.clone(),
            window: gold.window,
            aggregates: gold.aggregates.clone(),
            event_time_field: config.event_time_field.clone(),
        };
        spec.check(silver).map_err(|e| {
            OpenError::Schema(format!(
                "STRATA_GOLD_KEY/STRATA_GOLD_AGGREGATES on table {table_name}: {e}"
            ))
        })?;
        let producer = partials_producer(config)
            .map_err(|e| OpenError::Schema(format!("partials producer: {e}")))?;
        let partitions = ensure_partials_topic(config, gold).await.map_err(|e| {
            OpenError::Storage(format!("partials topic {}: {e}", gold.partials_topic))
        })?;
        if let Some(s) = gold.salting {
            if i32::from(s.salts) >= partitions {
                return Err(OpenError::Schema(format!(
                    "STRATA_HOT_KEY_SALTS={} must be below the partition count of {} ({partitions})",
                    s.salts, gold.partials_topic
                )));
            }
        }
        metrics.gold().initialize(partitions);
        let name = format!("{}_late", gold_name(gold, table_name));
        let schema = late_schema(silver);
        let url = lake::table_url(&config.lake_url, "gold", &name)
            .map_err(|e| OpenError::Schema(e.to_string()))?;
        let delta = lake::open_or_create(url, &schema, &name)
            .await
            .map_err(|e| OpenError::Storage(format!("late-events table {name}: {e}")))?;
        lake::maintenance::check_txn_retention(&delta)
            .map_err(|e| OpenError::Schema(format!("late-events table {name}: {e}")))?;
        let store = delta.object_store();
        let late = TableCommitter::new(
            delta,
            &format!("{}-gold", config.group_id),
            config.commit_retries,
        )
        .with_checkpoint_interval(config.maintenance.checkpoint_interval);
        let late_writer = SilverWriter::new(
            schema.clone(),
            &config.event_time_field,
            FilePolicy::from_config(config),
            store,
        );
        Ok(Self {
            rules: Arc::new(Rules {
                fingerprint: spec_fingerprint(&spec.aggregates, &spec.key_fields),
                spec,
                salting: gold.salting,
                delay: micros(gold.watermark_delay),
                max_skew: micros(gold.max_event_time_skew),
                lateness: micros(gold.allowed_lateness),
                partitions,
                late_schema: schema,
            }),
            idle_timeout: gold.idle_timeout,
            outbox: Some(Outbox {
                producer,
                topic: gold.partials_topic.clone(),
                late,
                late_writer,
            }),
            in_flight: None,
            released: Vec::new(),
            fenced: Vec::new(),
            failed: None,
            sources: HashMap::new(),
            pending: Vec::new(),
            metrics,
            table,
        })
    }

    /// Takes over `partitions`: reads what was sent (the late table's `txn`) and the watermark
    /// stored with it. A partition Gold never saw starts where Silver stands (`silver`: its
    /// committed offset and the clock recorded with that commit): Gold of a pipeline that ran
    /// without it begins now, not with a replay of the whole history.
    pub async fn claim(
        &mut self,
        partitions: &[TopicPartition],
        silver: &(dyn Fn(&TopicPartition) -> SilverProgress + Sync),
    ) -> Result<(), CommitError> {
        // The late table's progress is read once no send is in flight (its outcome, a fence
        // or a failure, waits for the next `poll` or `send`).
        self.settle().await;
        let Some(outbox) = self.outbox.as_mut() else {
            unreachable!("no send is in flight after `settle`, so the outbox is back");
        };
        let late = &mut outbox.late;
        for _ in 0..10 {
            let claimed = late.claim(partitions).await?;
            let mut fresh = BTreeMap::new();
            for (tp, stored) in &claimed {
                if stored.is_none() {
                    fresh.insert(tp.clone(), silver(tp).committed.unwrap_or(-1));
                }
            }
            if !fresh.is_empty() {
                match late.commit(Vec::new(), &fresh).await? {
                    CommitOutcome::Committed { .. } => {}
                    // Another replica started the same partition first: read again.
                    CommitOutcome::Fenced(_) => continue,
                }
            }
            for (tp, stored) in claimed {
                let emitted = stored.or_else(|| fresh.get(&tp).copied()).unwrap_or(-1);
                let app = late.side_app_id("watermark", &tp);
                let watermark = late.stored(&app).await?;
                let SilverProgress { committed, clock } = silver(&tp);
                let through = committed.filter(|s| *s > emitted);
                if let Some(s) = through {
                    tracing::info!(partition = %tp, from = emitted + 1, through = s, "Gold epoch committed to Silver but not sent: reading it again");
                }
                self.sources.insert(
                    tp,
                    SourceState {
                        emitted,
                        watermark,
                        replay_through: through,
                        // The unsent epoch is Silver's latest commit of the partition (a flush
                        // sends what Silver holds before it commits more): its clock.
                        replay_clock: clock,
                        replay: Vec::new(),
                        last_activity: Instant::now(),
                        last_check: Instant::now(),
                        hot: 0,
                    },
                );
            }
            return Ok(());
        }
        Err(CommitError::TooManyConflicts(10))
    }

    /// The last offset whose epoch was sent: the partition must be read from after it.
    pub fn resume_after(&self, tp: &TopicPartition) -> Option<i64> {
        self.sources.get(tp).map(|s| s.emitted)
    }

    /// Whether the Silver-held record at `offset` belongs to an epoch that must be sent again.
    pub fn wants_replay(&self, tp: &TopicPartition, offset: i64) -> bool {
        self.sources
            .get(tp)
            .is_some_and(|s| offset > s.emitted && s.replay_through.is_some_and(|t| offset <= t))
    }

    pub fn push_replay(&mut self, tp: &TopicPartition, batch: RecordBatch) {
        if let Some(s) = self.sources.get_mut(tp) {
            s.replay.push(batch);
        }
    }

    /// After a chunk: once the partition is read past the unsent epoch, it is queued to send.
    /// Returns whether something was queued.
    pub fn replay_read(&mut self, tp: &TopicPartition, position: i64) -> bool {
        let Some(s) = self.sources.get_mut(tp) else {
            return false;
        };
        match s.replay_through {
            Some(through) if position > through => {
                let batches = std::mem::take(&mut s.replay);
                s.replay_through = None;
                self.pending.push(Epoch {
                    tp: tp.clone(),
                    end: through,
                    batches,
                    clock: s.replay_clock,
                });
                true
            }
            _ => false,
        }
    }

    /// Records arrived for `tp` (it is not idle).
    pub fn active(&mut self, tp: &TopicPartition) {
        if let Some(s) = self.sources.get_mut(tp) {
            s.last_activity = Instant::now();
        }
    }

    /// The Gold source table committed (prev, `end`] of `tp` holding `batches`, with `clock`
    /// recorded in that commit: an epoch to send.
    pub fn committed(
        &mut self,
        tp: &TopicPartition,
        end: i64,
        batches: Vec<RecordBatch>,
        clock: Option<i64>,
    ) {
        if self.sources.get(tp).is_some_and(|s| end > s.emitted) {
            self.pending.push(Epoch {
                tp: tp.clone(),
                end,
                batches,
                clock,
            });
        }
    }

    /// Forgets a partition (revoked, lost, fenced): its unsent epochs are dropped (the next owner
    /// reads them again from the tables' progress).
    pub fn release(&mut self, tp: &TopicPartition) {
        self.sources.remove(tp);
        self.pending.retain(|e| &e.tp != tp);
        match self.outbox.as_mut() {
            Some(outbox) => outbox.late.release(std::slice::from_ref(tp)),
            None => self.released.push(tp.clone()),
        }
    }

    /// Sends every queued epoch and waits until each is recorded: a send in flight first, then
    /// the epochs queued since (replays, or a failed send's). A flush calls it before Silver
    /// commits more. On a fence, those partitions' epochs are dropped and returned (the caller
    /// reads them again from the tables' progress).
    pub async fn send(&mut self) -> Result<Vec<Fenced>, EmitError> {
        self.settle().await;
        // A failed send's epochs are queued again, and sent now: that is its retry.
        if let Some(e) = self.failed.take() {
            tracing::warn!(error = %e, epochs = self.pending.len(), "sending Gold's epochs failed; sending them again");
        }
        self.start();
        self.settle().await;
        self.outcome()
    }

    /// Starts sending the queued epochs in a task of their own and returns at once; the next
    /// `send`, `claim`, `idle` or `poll` takes its outcome in.
    pub fn start(&mut self) {
        if self.in_flight.is_some() || self.pending.is_empty() {
            return;
        }
        let Some(mut outbox) = self.outbox.take() else {
            return;
        };
        let epochs = std::mem::take(&mut self.pending);
        // Each partition's epochs in order, the first from the watermark the last sent one left.
        let starts: HashMap<TopicPartition, Option<i64>> = epochs
            .iter()
            .map(|e| {
                let watermark = self.sources.get(&e.tp).and_then(|s| s.watermark);
                (e.tp.clone(), watermark)
            })
            .collect();
        let rules = self.rules.clone();
        self.in_flight = Some(tokio::spawn(async move {
            let result = outbox.deliver(&rules, &epochs, starts).await;
            Sent {
                outbox,
                epochs,
                result,
            }
        }));
    }

    /// Takes in a send that has finished, without waiting for one that has not: the fences and
    /// the failure found since the last call. A failed send's epochs are queued again.
    pub async fn poll(&mut self) -> Result<Vec<Fenced>, EmitError> {
        if self.in_flight.as_ref().is_some_and(|t| t.is_finished()) {
            self.settle().await;
        }
        self.outcome()
    }

    /// Whether epochs are queued or being sent.
    pub fn busy(&self) -> bool {
        self.in_flight.is_some() || !self.pending.is_empty()
    }

    /// Waits for the send in flight, if any, and takes its outcome in. Cancel-safe: a wait cut
    /// short (the shutdown's grace ending) leaves the task in flight.
    async fn settle(&mut self) {
        let Some(task) = self.in_flight.as_mut() else {
            return;
        };
        let joined = task.await;
        self.in_flight = None;
        let sent = match joined {
            Ok(sent) => sent,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => unreachable!("the send task is never aborted"),
        };
        let Sent {
            mut outbox,
            epochs,
            result,
        } = sent;
        for tp in self.released.drain(..) {
            outbox.late.release(std::slice::from_ref(&tp));
        }
        self.outbox = Some(outbox);
        match result {
            Ok(Delivered::Recorded(recorded)) => self.recorded(recorded),
            Ok(Delivered::Fenced(fenced)) => {
                self.requeue(epochs);
                // A partition released while the send was in flight (revoked, lost) is not
                // this replica's to read again.
                let fenced: Vec<Fenced> = fenced
                    .into_iter()
                    .filter(|f| self.sources.contains_key(&f.partition))
                    .collect();
                for f in &fenced {
                    self.release(&f.partition);
                }
                self.fenced.extend(fenced);
            }
            Err(e) => {
                self.requeue(epochs);
                self.failed = Some(e);
            }
        }
    }

    /// Epochs whose send did not land go back to the front of the queue, in order, unless their
    /// partition was released meanwhile.
    fn requeue(&mut self, epochs: Vec<Epoch>) {
        let mut again: Vec<Epoch> = epochs
            .into_iter()
            .filter(|e| self.sources.contains_key(&e.tp))
            .collect();
        again.append(&mut self.pending);
        self.pending = again;
    }

    fn outcome(&mut self) -> Result<Vec<Fenced>, EmitError> {
        match self.failed.take() {
            Some(e) => Err(e),
            None => Ok(std::mem::take(&mut self.fenced)),
        }
    }

    /// Sent and recorded: each partition's progress moves on.
    fn recorded(&mut self, recorded: Vec<Recorded>) {
        let gold = self.metrics.gold();
        for r in recorded {
            gold.epoch_sent(r.events, r.salted, r.late_rows, r.load);
            if let Some(s) = self.sources.get_mut(&r.tp) {
                s.emitted = r.end;
                s.watermark = r.watermark;
                s.hot = r.hot;
            }
        }
        gold.hot_keys(self.sources.values().map(|s| s.hot).sum());
        self.report_watermark();
    }

    fn report_watermark(&self) {
        let lowest = self.sources.values().filter_map(|s| s.watermark).min();
        if let Some(w) = lowest {
            self.metrics.gold().source_watermark(w);
        }
    }

    /// Moves the watermark of caught-up partitions that had no records for the idle timeout to
    /// the clock (now minus the delay), commits it, then marks every partials partition.
    /// `next` holds the next offset of each partition with nothing buffered; a partition is caught
    /// up when the broker's high watermark (asked on the producer's connection, only for
    /// candidates, at most once per idle timeout) is not beyond it.
    pub async fn idle(
        &mut self,
        next: &HashMap<TopicPartition, Option<i64>>,
    ) -> Result<Vec<Fenced>, EmitError> {
        // Not while epochs wait to be sent: a marker announces the watermark stored before it.
        if self.busy() {
            return Ok(Vec::new());
        }
        let rules = self.rules.clone();
        // In closing steps (the last multiple of the slide plus the lateness): the same windows
        // become final as with the clock's own watermark, at the same moment, and a quiet
        // partition commits once per slide rather than at every idle check. The watermark a
        // marker announces is always the one stored before it.
        let now = closing_step(
            rules.spec.window.slide,
            rules.lateness,
            chrono::Utc::now()
                .timestamp_micros()
                .saturating_sub(rules.delay),
        );
        let candidates: Vec<(TopicPartition, Option<i64>)> = self
            .sources
            .iter()
            .filter(|(_, s)| {
                s.replay_through.is_none()
                    && s.last_activity.elapsed() >= self.idle_timeout
                    && s.last_check.elapsed() >= self.idle_timeout
                    && s.watermark.is_none_or(|w| w < now)
            })
            .filter_map(|(tp, _)| next.get(tp).map(|n| (tp.clone(), *n)))
            .collect();
        let Some(outbox) = self.outbox.as_mut() else {
            return Ok(Vec::new());
        };
        let mut idle = Vec::new();
        for (tp, next) in candidates {
            if let Some(s) = self.sources.get_mut(&tp) {
                s.last_check = Instant::now();
            }
            let producer = outbox.producer.clone();
            let (topic, partition) = (tp.topic.to_string(), tp.partition);
            let marks = tokio::task::spawn_blocking(move || {
                producer
                    .client()
                    .fetch_watermarks(&topic, partition, Duration::from_secs(5))
            })
            .await;
            if let Ok(Ok((low, high))) = marks {
                if next.is_some_and(|n| n >= high) || low == high {
                    idle.push(tp);
                }
            }
        }
        if idle.is_empty() {
            return Ok(Vec::new());
        }
        let mut last = BTreeMap::new();
        let mut extra = Vec::new();
        for tp in &idle {
            if let Some(s) = self.sources.get(tp) {
                last.insert(tp.clone(), s.emitted);
                extra.push((outbox.late.side_app_id("watermark", tp), now));
            }
        }
        if let CommitOutcome::Fenced(fenced) =
            outbox.late.commit_with(Vec::new(), &last, &extra).await?
        {
            for f in &fenced {
                self.release(&f.partition);
            }
            return Ok(fenced);
        }
        let mut messages = Vec::new();
        for tp in &idle {
            let Some(s) = self.sources.get_mut(tp) else {
                continue;
            };
            s.watermark = Some(now);
            s.last_activity = Instant::now();
            s.hot = 0;
            tracing::debug!(partition = %tp, watermark = now, "idle source partition: watermark follows the clock");
            let marker = Message::Marker {
                source_topic: tp.topic.to_string(),
                source_partition: tp.partition,
                epoch_end: s.emitted,
                watermark: now,
            }
            .encode(rules.fingerprint);
            for partition in 0..rules.partitions {
                messages.push((partition, None, marker.clone()));
            }
        }
        send_in_order(&outbox.producer, &outbox.topic, messages).await?;
        self.report_watermark();
        Ok(Vec::new())
    }
}

impl Outbox {
    /// Computes `epochs` (each partition's first from its watermark in `watermarks`), sends
    /// their partials and markers in order, waits for every acknowledgement, then commits the
    /// late rows with each partition's last offset and watermark.
    async fn deliver(
        &mut self,
        rules: &Rules,
        epochs: &[Epoch],
        mut watermarks: HashMap<TopicPartition, Option<i64>>,
    ) -> Result<Delivered, EmitError> {
        let mut messages = Vec::new();
        let mut late = Vec::new();
        let mut recorded = Vec::with_capacity(epochs.len());
        for epoch in epochs {
            let start = watermarks.get(&epoch.tp).copied().flatten();
            let mut computed = rules.compute(epoch, start)?;
            watermarks.insert(epoch.tp.clone(), computed.watermark);
            messages.append(&mut computed.messages);
            let late_rows = computed.late.as_ref().map_or(0, |r| r.num_rows() as u64);
            late.extend(computed.late);
            recorded.push(Recorded {
                tp: epoch.tp.clone(),
                end: epoch.end,
                watermark: computed.watermark,
                events: computed.events,
                hot: computed.hot,
                load: computed.load,
                salted: computed.salted,
                late_rows,
            });
            // An epoch's computing is a few milliseconds of CPU: the runtime's other tasks
            // (decoding the next chunks) get their turn between epochs.
            tokio::task::yield_now().await;
        }
        #[cfg(feature = "failpoints")]
        if crate::failpoints::fires("partials_send_refused") {
            // As a broker refuses a producer without the topic's write ACL.
            return Err(
                KafkaError::MessageProduction(RDKafkaErrorCode::TopicAuthorizationFailed).into(),
            );
        }
        send_in_order(&self.producer, &self.topic, messages).await?;
        crate::failpoint!("after_gold_send");
        let files = self.late_writer.write(&late).await?;
        let last: BTreeMap<TopicPartition, i64> =
            epochs.iter().map(|e| (e.tp.clone(), e.end)).collect();
        let extra: Vec<(String, i64)> = watermarks
            .iter()
            .filter_map(|(tp, w)| w.map(|w| (self.late.side_app_id("watermark", tp), w)))
            .collect();
        match self.late.commit_with(files, &last, &extra).await? {
            CommitOutcome::Fenced(fenced) => Ok(Delivered::Fenced(fenced)),
            CommitOutcome::Committed { .. } => Ok(Delivered::Recorded(recorded)),
        }
    }
}

impl Rules {
    /// Computes one epoch from the watermark `start`.
    fn compute(&self, epoch: &Epoch, start: Option<i64>) -> Result<Computed, RowsError> {
        let window = self.spec.window;
        // The watermark each row meets: the one after the rows before it (in offset order).
        let mut watermark = start;
        let mut before: Vec<Vec<Option<i64>>> = Vec::with_capacity(epoch.batches.len());
        for batch in &epoch.batches {
            let times = batch
                .column_by_name(&self.spec.event_time_field)
                .and_then(|c| c.as_primitive_opt::<TimestampMicrosecondType>())
                .ok_or(RowsError::EventTime)?;
            let logged = batch
                .column_by_name(crate::silver::decode::KAFKA_TIMESTAMP)
                .and_then(|c| c.as_primitive_opt::<TimestampMicrosecondType>());
            let rows = (0..batch.num_rows()).map(|row| {
                let event = (!times.is_null(row)).then(|| times.value(row));
                let logged = logged.and_then(|k| (!k.is_null(row)).then(|| k.value(row)));
                bounded(event, logged, epoch.clock, self.max_skew)
            });
            let (rows, after) = before_each(watermark, rows, self.delay);
            before.push(rows);
            watermark = after;
        }
        let mut late: Vec<Vec<(u32, i64)>> = vec![Vec::new(); epoch.batches.len()];
        let (pre, hot) = preaggregate(
            &self.spec,
            &epoch.batches,
            &epoch.tp,
            epoch.end,
            self.salting,
            |batch, row, _, start| {
                let open = !is_final(window.end(start), self.lateness, before[batch][row]);
                if !open {
                    late[batch].push((row as u32, start));
                }
                open
            },
        )?;
        let mut late_parts: Vec<RecordBatch> = Vec::new();
        for (index, pairs) in late.iter().enumerate() {
            if !pairs.is_empty() {
                late_parts.push(
                    self.late_rows(&epoch.batches[index], pairs, &before[index])
                        .map_err(|e| RowsError::Arrow(e.to_string()))?,
                );
            }
        }
        let events = pre.events();
        let partials = epoch_partials(pre, &epoch.tp, epoch.end, self.partitions);
        let mut load: BTreeMap<i32, (u64, u64)> = BTreeMap::new();
        let mut salted = 0;
        // Several partials to a message: one Kafka message per (window, key) made an epoch of a
        // window with a million keys a million messages.
        let mut batches = BatchWriter::new(self.fingerprint, PARTIALS_MESSAGE_BYTES);
        for (partition, partial) in &partials {
            let entry = load.entry(*partition).or_default();
            entry.0 += 1;
            entry.1 += partial.accumulator.events();
            if partial.salt != 0 {
                salted += 1;
            }
            batches.push(*partition, partial);
        }
        drop(partials);
        let mut messages: Vec<(i32, Option<Vec<u8>>, Vec<u8>)> = batches
            .finish()
            .into_iter()
            .map(|(partition, bytes)| (partition, None, bytes))
            .collect();
        let marker = Message::Marker {
            source_topic: epoch.tp.topic.to_string(),
            source_partition: epoch.tp.partition,
            epoch_end: epoch.end,
            watermark: watermark.unwrap_or(i64::MIN),
        }
        .encode(self.fingerprint);
        for partition in 0..self.partitions {
            messages.push((partition, None, marker.clone()));
        }
        let late = if late_parts.is_empty() {
            None
        } else {
            Some(
                deltalake::arrow::compute::concat_batches(&late_parts[0].schema(), &late_parts)
                    .map_err(|e| RowsError::Arrow(e.to_string()))?,
            )
        };
        Ok(Computed {
            messages,
            late,
            watermark,
            events,
            hot,
            load,
            salted,
        })
    }

    /// The late rows of `batch`: the row, the window it missed, the watermark it met and by how
    /// much the window was already final.
    fn late_rows(
        &self,
        batch: &RecordBatch,
        late: &[(u32, i64)],
        before: &[Option<i64>],
    ) -> Result<RecordBatch, deltalake::arrow::error::ArrowError> {
        let indices = UInt32Array::from_iter_values(late.iter().map(|(row, _)| *row));
        let rows = take_record_batch(batch, &indices)?;
        let window = self.spec.window;
        let watermarks: Vec<i64> = late
            .iter()
            .map(|(row, _)| before[*row as usize].unwrap_or(i64::MIN))
            .collect();
        let mut fields: Vec<Field> = rows
            .schema()
            .fields()
            .iter()
            .map(|f| f.as_ref().clone())
            .collect();
        let mut columns: Vec<ArrayRef> = rows.columns().to_vec();
        let ts = |values: Vec<i64>| -> ArrayRef {
            Arc::new(TimestampMicrosecondArray::from(values).with_timezone("UTC"))
        };
        let extra = self.late_schema.fields();
        let n = extra.len();
        for field in extra.iter().skip(n - 4) {
            fields.push(field.as_ref().clone());
        }
        columns.push(ts(late.iter().map(|(_, s)| *s).collect()));
        columns.push(ts(late.iter().map(|(_, s)| window.end(*s)).collect()));
        columns.push(ts(watermarks.clone()));
        columns.push(Arc::new(Float64Array::from_iter_values(
            late.iter().zip(&watermarks).map(|((_, s), w)| {
                w.saturating_sub(window.end(*s).saturating_add(self.lateness)) as f64 / 1e6
            }),
        )));
        RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
    }
}

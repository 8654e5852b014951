//! The Kafka source: one OS thread owns the librdkafka consumer, so no blocking librdkafka call ever
//! runs on an async worker. It hands the pipeline chunks of records of one partition, and turns each
//! rebalance into a message with an acknowledgement:
//!
//! - on assignment it asks the pipeline where each partition resumes (the table's `txn` version + 1),
//!   assigns the partitions paused and goes on polling; the answer seeks each one there and starts
//!   it (see `kafka::claims`: a claim may wait out an object store outage);
//! - on revocation it waits until the pipeline has committed or dropped that partition's work, and
//!   only then lets the rebalance complete.
//!
//! It never decides what is durable: group offsets are committed only when the pipeline says so.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{Headers, Message};
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::ClientContext;
use tokio::sync::{mpsc, oneshot};

use super::claims::Resume;
use super::commits::Commits;
use super::fetch::{FetchQueue, Fetched};
use super::queue::{self, ConsumerQueue, Wake};
use crate::models::{SourceRecord, TopicPartition};
use crate::ops::Metrics;
use crate::retry::{Pace, Stall};

/// Records per chunk handed to the pipeline.
const CHUNK_RECORDS: usize = 2_000;
/// Bytes per chunk handed to the pipeline.
const CHUNK_BYTES: usize = 4 * 1024 * 1024;

/// What the source tells the pipeline, in consumption order.
pub enum SourceEvent {
    /// Consecutive records of one partition.
    Records(Vec<SourceRecord>),
    /// New partitions: the pipeline answers with the last offset already in the table (or `None`).
    Assigned {
        partitions: Vec<TopicPartition>,
        reply: oneshot::Sender<Resume>,
    },
    /// Partitions taken away; the rebalance waits for `done`. `lost` means another member may
    /// already own them, so their work must not be committed blindly.
    Revoked {
        partitions: Vec<TopicPartition>,
        lost: bool,
        done: oneshot::Sender<()>,
    },
    /// A seek the pipeline asked for (to this offset) has happened: records of this partition from
    /// now on follow it.
    Reseeked(TopicPartition, i64),
    /// (Strict sources only.) The partition's next offset is outside what the topic holds (its
    /// records were deleted by retention, or the topic was recreated): the partition is paused
    /// for good instead of jumping to another offset.
    OutOfRange {
        partition: TopicPartition,
        next: i64,
        earliest: i64,
        end: i64,
    },
    /// (Strict sources only.) A partition stopped out of range was sought back into range.
    InRange(TopicPartition),
    /// Every assigned partition has been read to its end (as of the broker's last fetch answer),
    /// after records were handed over: nothing more is waiting to be read right now.
    CaughtUp,
}

/// What the pipeline asks of the source.
pub enum SourceCommand {
    /// Resume this partition at this offset (after fencing dropped buffered work).
    Seek(TopicPartition, i64),
    /// Commit these next-offsets to the consumer group (advisory, asynchronous).
    CommitOffsets(BTreeMap<TopicPartition, i64>),
    /// Stop fetching every assigned partition (and any assigned later) until `Resume`, while
    /// still polling: the sink is stalled, and a blocked `poll` would cost the group membership.
    Pause,
    /// Fetch again, from the record after the last one handed over.
    Resume,
    /// Stop fetching this partition until a `Seek` of it: the stage took none of its records
    /// from the offset it will seek back to (Gold stage 2 at its memory budget).
    Hold(TopicPartition),
}

struct SourceContext {
    events: mpsc::Sender<SourceEvent>,
    metrics: Arc<Metrics>,
    /// Whether this consumer's rebalances are the replica's (`strata_assigned_partitions`,
    /// `strata_rebalances_total`); Gold's partials consumer only logs its own.
    counts_assignments: bool,
    /// The client's `STRATA_KAFKA_*` properties, to name the mechanism a refusal concerns.
    properties: BTreeMap<String, String>,
    /// Fetching is paused (the pipeline asked, or it is not taking chunks): partitions assigned
    /// meanwhile start paused too.
    paused: Paused,
    /// Whether an offset out of range stops the partition (see [`SourceSettings::strict_offsets`]).
    strict: bool,
    /// See [`SourceSettings::reports_caught_up`].
    reports_caught_up: bool,
    /// Partitions stopped for an offset out of range: they stay paused.
    out_of_range: Mutex<std::collections::HashSet<TopicPartition>>,
    /// Partitions the stage holds (`SourceCommand::Hold`) until it seeks them: they stay paused.
    holding: Mutex<std::collections::HashSet<TopicPartition>>,
    /// The chunk being gathered and the events the pipeline had no room for yet, in order.
    /// Fetching is paused while any wait, so this holds at most what was fetched before the pause
    /// took effect. A rebalance closes the chunk and hands everything over first, so the pipeline
    /// sees every record fetched before the rebalance, before it.
    outbox: Mutex<Outbox>,
    /// (Strict sources.) Where each assigned partition's fetching starts (its assigned or sought
    /// offset), for a partition that erred before any record was polled.
    starts: Mutex<HashMap<TopicPartition, i64>>,
    /// Assignments the stage has not answered yet: their partitions stay paused.
    claiming: Mutex<Vec<Unanswered>>,
    /// Answered partitions not started yet: the offset to seek to (`None`: no answer came, so
    /// the partition stays paused until it is revoked).
    seeking: Mutex<HashMap<TopicPartition, Option<Offset>>>,
    /// Where each partition was last sought to (its start, or a seek back): a partition that
    /// gave no record since stands there (see `caught_up`).
    sought: Mutex<HashMap<TopicPartition, Offset>>,
    /// Partitions whose position was put back after a consumer error (`put_back`): paused
    /// until then, as librdkafka's fetcher backs off after an error.
    backoff: Mutex<HashMap<TopicPartition, Instant>>,
    /// The offset after the last record of each partition read since its last seek.
    read_to: Mutex<HashMap<TopicPartition, i64>>,
    /// The assignment as the last rebalance left it (see [`SourceContext::note_assignment`]);
    /// `None` when librdkafka did not say.
    assigned: Mutex<Option<TopicPartitionList>>,
}

/// An assignment waiting for the stage to say where its partitions resume.
struct Unanswered {
    partitions: Vec<TopicPartition>,
    answer: oneshot::Receiver<Resume>,
}

/// See [`SourceContext::outbox`].
#[derive(Default)]
struct Outbox {
    queue: VecDeque<SourceEvent>,
    /// Copies the records of the chunk being gathered; sealed with each chunk (see `Copier`).
    copier: Copier,
    chunk: Vec<SourceRecord>,
    chunk_bytes: usize,
    /// Records a new chunk makes room for at once: about what the current batch holds, so a
    /// busy partition's chunk is not grown (and copied) step by step.
    room: usize,
}

impl Outbox {
    /// Whether a record of `topic`/`partition` belongs to the chunk being gathered.
    fn continues(&self, topic: &Arc<str>, partition: i32) -> bool {
        self.chunk.last().is_none_or(|last| {
            // The source shares one name per topic: a pointer compare, not the names'.
            last.partition == partition && (Arc::ptr_eq(&last.topic, topic) || last.topic == *topic)
        })
    }

    /// Copies a record from the fetch queue in, for [`Outbox::push`]. A record of another
    /// partition closes the chunk first, so that its bytes go to the next chunk's blocks.
    fn copy_fetched(&mut self, message: &Fetched<'_>) -> SourceRecord {
        let mut topic = self.copier.topic(message.topic());
        if !self.continues(&topic, message.partition()) {
            self.close();
            // The closed chunk's name stays with it: the new chunk takes one of its own.
            topic = self.copier.topic(message.topic());
        }
        self.copier.fetched(message, topic)
    }

    /// Copies a record `poll` returned in, as [`Outbox::copy_fetched`].
    fn copy_polled(&mut self, message: &rdkafka::message::BorrowedMessage<'_>) -> SourceRecord {
        let mut topic = self.copier.topic(message.topic().as_bytes());
        if !self.continues(&topic, message.partition()) {
            self.close();
            // The closed chunk's name stays with it: the new chunk takes one of its own.
            topic = self.copier.topic(message.topic().as_bytes());
        }
        self.copier.polled(message, topic)
    }

    /// Adds a polled record to the chunk; a chunk holds one partition and is closed when full.
    fn push(&mut self, record: SourceRecord) {
        if !self.continues(&record.topic, record.partition) {
            self.close();
        }
        if self.chunk.capacity() == 0 {
            self.chunk.reserve(self.room);
        }
        self.chunk_bytes += record.size();
        self.chunk.push(record);
        if self.chunk.len() >= CHUNK_RECORDS || self.chunk_bytes >= CHUNK_BYTES {
            self.close();
        }
    }

    /// Moves the records gathered so far to the queue as one chunk.
    fn close(&mut self) {
        self.chunk_bytes = 0;
        self.copier.seal();
        if !self.chunk.is_empty() {
            self.queue
                .push_back(SourceEvent::Records(std::mem::take(&mut self.chunk)));
        }
    }
}

impl SourceContext {
    /// Whether `next` lies outside what partition `tp` holds (from its earliest offset to its
    /// end); if so, the partition is reported once and marked to stay paused. Returns whether it
    /// is out of range.
    fn stop_if_out_of_range(
        &self,
        consumer: &BaseConsumer<Self>,
        tp: &TopicPartition,
        next: i64,
    ) -> bool {
        let Ok((earliest, end)) =
            consumer.fetch_watermarks(&tp.topic, tp.partition, Duration::from_secs(10))
        else {
            // Unknown now: when librdkafka refuses the offset, its error brings it back here
            // (`stop_out_of_range`, which knows where the partition started).
            return false;
        };
        if (earliest..=end).contains(&next) {
            return false;
        }
        let first = self.stopped().insert(tp.clone());
        if first {
            self.outbox().queue.push_back(SourceEvent::OutOfRange {
                partition: tp.clone(),
                next,
                earliest,
                end,
            });
        }
        true
    }

    fn stopped(&self) -> MutexGuard<'_, std::collections::HashSet<TopicPartition>> {
        self.out_of_range
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn holding(&self) -> MutexGuard<'_, std::collections::HashSet<TopicPartition>> {
        self.holding.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn starts(&self) -> MutexGuard<'_, HashMap<TopicPartition, i64>> {
        self.starts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn claiming(&self) -> MutexGuard<'_, Vec<Unanswered>> {
        self.claiming.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn read_to(&self) -> MutexGuard<'_, HashMap<TopicPartition, i64>> {
        self.read_to.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn backoff(&self) -> MutexGuard<'_, HashMap<TopicPartition, Instant>> {
        self.backoff.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn seeking(&self) -> MutexGuard<'_, HashMap<TopicPartition, Option<Offset>>> {
        self.seeking.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn sought(&self) -> MutexGuard<'_, HashMap<TopicPartition, Offset>> {
        self.sought.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Partitions that stay paused whatever else happens: stopped out of range, held by the
    /// stage, or not started yet after their assignment.
    fn held(&self) -> std::collections::HashSet<TopicPartition> {
        let mut held = self.stopped().clone();
        held.extend(self.holding().iter().cloned());
        for waiting in self.claiming().iter() {
            held.extend(waiting.partitions.iter().cloned());
        }
        held.extend(self.seeking().keys().cloned());
        held.extend(self.backoff().keys().cloned());
        held
    }

    fn outbox(&self) -> MutexGuard<'_, Outbox> {
        self.outbox.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether something is due that comes without a wake: a claim's answer from the stage (a
    /// oneshot), a seek to try again, a backoff to end.
    fn due(&self) -> bool {
        !self.claiming().is_empty()
            || self.seeking().values().any(Option::is_some)
            || !self.backoff().is_empty()
    }

    /// Keeps the consumer's assignment after a rebalance changed it, and returns its size. Asking
    /// librdkafka for it is a round trip to its main thread, which `caught_up` would otherwise
    /// make on every ask.
    fn note_assignment(&self, consumer: &BaseConsumer<SourceContext>) -> usize {
        let assigned = consumer.assignment().ok();
        let count = assigned.as_ref().map_or(0, TopicPartitionList::count);
        *self.assigned.lock().unwrap_or_else(PoisonError::into_inner) = assigned;
        count
    }

    /// Before a rebalance event: closes the chunk and hands over everything waiting, waiting for
    /// room. This runs inside `poll`; while the pipeline makes room, librdkafka counts the time
    /// against `max.poll.interval.ms` only for a non-blocking poll.
    fn hand_over_all(&self) {
        let waiting: Vec<SourceEvent> = {
            let mut outbox = self.outbox();
            outbox.close();
            outbox.queue.drain(..).collect()
        };
        for event in waiting {
            if self.events.blocking_send(event).is_err() {
                return;
            }
        }
    }
}

/// Why fetching is paused: the pipeline asked (its sink is stalled), or the event channel is full
/// (the pipeline is behind). Fetching resumes when neither holds.
#[derive(Default)]
struct Paused {
    asked: AtomicBool,
    full: AtomicBool,
}

impl Paused {
    fn any(&self) -> bool {
        self.asked.load(Ordering::Relaxed) || self.full.load(Ordering::Relaxed)
    }
}

impl ClientContext for SourceContext {
    fn stats(&self, statistics: Statistics) {
        // UP means connected and authenticated.
        if statistics.brokers.values().any(|b| b.state == "UP") {
            self.metrics.kafka_reachable();
        }
        for (topic, t) in &statistics.topics {
            for (partition, p) in &t.partitions {
                if *partition >= 0 && p.consumer_lag >= 0 {
                    self.metrics.consumer_lag(topic, *partition, p.consumer_lag);
                    // read_committed consumers see up to the last stable offset.
                    let end = if p.ls_offset >= 0 {
                        p.ls_offset
                    } else {
                        p.hi_offset
                    };
                    if self.counts_assignments && end >= 0 {
                        self.metrics.partition_end(topic, *partition, end);
                    }
                }
            }
        }
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        self.metrics.kafka_error(&error, reason);
        if let Some(problem) = super::connection_problem(&error, reason, &self.properties) {
            self.metrics
                .kafka_refused(&problem.reason, problem.specific);
        }
    }
}

fn partitions_of(tpl: &TopicPartitionList) -> Vec<TopicPartition> {
    tpl.elements()
        .iter()
        .map(|e| TopicPartition::new(e.topic(), e.partition()))
        .collect()
}

impl ConsumerContext for SourceContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let partitions = partitions_of(tpl);
                {
                    // A hold is for the assignment it was asked in: a partition that comes back
                    // starts where its new claim says.
                    let mut holding = self.holding();
                    for tp in &partitions {
                        holding.remove(tp);
                    }
                }
                self.hand_over_all();
                let (reply, answer) = oneshot::channel();
                if self
                    .events
                    .blocking_send(SourceEvent::Assigned {
                        partitions: partitions.clone(),
                        reply,
                    })
                    .is_err()
                {
                    // The pipeline is gone (shutting down): take nothing, so nothing is read unowned.
                    tracing::warn!("assignment while the pipeline is stopping; not consuming it");
                    return;
                }
                // Assigned paused, at a placeholder: the stage's answer (where each partition
                // resumes, read from the tables) seeks each one and starts it (`start_claimed`).
                // The answer is not awaited here, so a claim that waits for the object store
                // never holds up `poll` (heartbeats, revocations, `max.poll.interval.ms`).
                for tp in &partitions {
                    if let Err(e) =
                        tpl.set_partition_offset(&tp.topic, tp.partition, Offset::Beginning)
                    {
                        tracing::error!(partition = %tp, error = %e, "setting the placeholder offset");
                    }
                }
                let result = if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                };
                if let Err(e) = result {
                    tracing::error!(error = %e, "assigning partitions");
                }
                if let Err(e) = consumer.pause(tpl) {
                    tracing::warn!(error = %e, "pausing newly assigned partitions");
                }
                self.claiming().push(Unanswered {
                    partitions: partitions.clone(),
                    answer,
                });
                self.metrics.rebalanced(
                    "assign",
                    &partitions,
                    self.note_assignment(consumer),
                    self.counts_assignments,
                );
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                let partitions = partitions_of(tpl);
                let lost = consumer.assignment_lost();
                self.hand_over_all();
                let (done, finished) = oneshot::channel();
                if self
                    .events
                    .blocking_send(SourceEvent::Revoked {
                        partitions: partitions.clone(),
                        lost,
                        done,
                    })
                    .is_ok()
                {
                    // The rebalance completes only after the pipeline finished or dropped the work.
                    let _ = finished.blocking_recv();
                }
                for waiting in self.claiming().iter_mut() {
                    waiting.partitions.retain(|tp| !partitions.contains(tp));
                }
                {
                    let mut seeking = self.seeking();
                    let mut holding = self.holding();
                    // A partition that comes back is sought again when it starts.
                    let mut sought = self.sought();
                    let mut backoff = self.backoff();
                    let mut read_to = self.read_to();
                    for tp in &partitions {
                        seeking.remove(tp);
                        holding.remove(tp);
                        sought.remove(tp);
                        backoff.remove(tp);
                        read_to.remove(tp);
                    }
                }
                if self.strict {
                    let mut stopped = self.stopped();
                    let mut starts = self.starts();
                    for tp in &partitions {
                        stopped.remove(tp);
                        starts.remove(tp);
                    }
                }
                let result = if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                };
                if let Err(e) = result {
                    tracing::error!(error = %e, "unassigning partitions");
                }
                self.metrics.rebalanced(
                    if lost { "lost" } else { "revoke" },
                    &partitions,
                    self.note_assignment(consumer),
                    self.counts_assignments,
                );
            }
            other => {
                tracing::error!(error = ?other, "rebalance error");
                let _ = consumer.unassign();
                self.note_assignment(consumer);
            }
        }
    }
}

/// Settings the source needs.
pub struct SourceSettings {
    pub brokers: String,
    pub group_id: String,
    pub topics: Vec<String>,
    pub properties: BTreeMap<String, String>,
    /// Whether this consumer's assignments count as the replica's in the metrics.
    pub counts_assignments: bool,
    /// Never skip records: a next offset outside the partition (`auto.offset.reset=error`)
    /// stops the partition with [`SourceEvent::OutOfRange`] instead of jumping to the earliest
    /// record. Gold's partials need this; Bronze records lost to retention are gone anyway.
    pub strict_offsets: bool,
    /// Send [`SourceEvent::CaughtUp`] when every assigned partition has been read to its end
    /// (Silver flushes on it). Gold's stage 2 commits on its own interval, so its source skips
    /// the check.
    pub reports_caught_up: bool,
    /// The consumer thread's name (at most 15 bytes on Linux), as profiles and the bench's CPU by
    /// thread show it.
    pub thread_name: &'static str,
}

/// Sends commands to the source thread; held by the stage, while the event loop owns the thread.
#[derive(Clone)]
pub struct Commands {
    sender: std_mpsc::Sender<SourceCommand>,
    wake: Wake,
}

impl Commands {
    /// Queues `command` and wakes the thread if it waits for records.
    pub fn send(&self, command: SourceCommand) {
        let _ = self.sender.send(command);
        self.wake.wake();
    }

    /// A stage's write failed: fetching pauses (at the first failure) and `stalled` schedules the
    /// next attempt after one more backoff delay, which is returned.
    pub fn stall(&self, stalled: &mut Option<Stall>) -> Duration {
        stalled
            .get_or_insert_with(|| {
                self.send(SourceCommand::Pause);
                Stall::new(Pace::Outage)
            })
            .again()
    }

    /// A stage's write succeeded: fetching resumes if it was stalled. Returns whether it was.
    pub fn unstall(&self, stalled: &mut Option<Stall>) -> bool {
        let was = stalled.take().is_some();
        if was {
            self.send(SourceCommand::Resume);
        }
        was
    }
}

/// Handle of the running source thread.
pub struct Source {
    commands: std_mpsc::Sender<SourceCommand>,
    stop: Arc<AtomicBool>,
    wake: Wake,
    thread: Option<JoinHandle<()>>,
}

/// How long librdkafka waits before it asks again to fetch a partition whose local queue already
/// holds `queued.min.messages` (100,000): its default, 1 s, left the fetcher idle for most of each
/// second once a fetch answer had filled the queue. The source drains a full queue in a fraction
/// of that (small records of six partitions make 100,000 out of one answer of 1 MiB each), and
/// the pipeline's own channel bounds what waits beyond librdkafka. Measured on tansu
/// (`STRATA_BENCH_LOG=1 STRATA_BENCH_KAFKA=debug=fetch`): with 1 s, the fetcher stood idle for a
/// second after two of a phase's five answers. `STRATA_KAFKA_FETCH_QUEUE_BACKOFF_MS` overrides it.
pub const FETCH_QUEUE_BACKOFF_MS: &str = "20";

impl Source {
    /// Creates the consumer, subscribes and starts the polling thread.
    pub fn start(
        settings: SourceSettings,
        metrics: Arc<Metrics>,
        events: mpsc::Sender<SourceEvent>,
    ) -> KafkaResult<Self> {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &settings.brokers)
            .set("group.id", &settings.group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set(
                "auto.offset.reset",
                if settings.strict_offsets {
                    "error"
                } else {
                    "earliest"
                },
            )
            .set("partition.assignment.strategy", "cooperative-sticky")
            .set("statistics.interval.ms", "5000")
            .set("session.timeout.ms", "45000")
            .set("heartbeat.interval.ms", "3000")
            .set("fetch.queue.backoff.ms", FETCH_QUEUE_BACKOFF_MS);
        for (key, value) in &settings.properties {
            config.set(key, value);
        }
        // Each end-of-partition message would move a position past the record not read yet
        // (see `kafka::fetch`), so Strata never asks for them, whatever the properties say.
        config.set("enable.partition.eof", "false");
        let context = SourceContext {
            events: events.clone(),
            metrics: metrics.clone(),
            counts_assignments: settings.counts_assignments,
            properties: settings.properties.clone(),
            paused: Paused::default(),
            strict: settings.strict_offsets,
            reports_caught_up: settings.reports_caught_up,
            out_of_range: Mutex::default(),
            holding: Mutex::default(),
            outbox: Mutex::default(),
            starts: Mutex::default(),
            claiming: Mutex::default(),
            seeking: Mutex::default(),
            backoff: Mutex::default(),
            read_to: Mutex::default(),
            sought: Mutex::default(),
            assigned: Mutex::default(),
        };
        let consumer: BaseConsumer<SourceContext> = config.create_with_context(context)?;
        let topics: Vec<&str> = settings.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics)?;

        let (commands, command_rx) = std_mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let stop_flag = stop.clone();
        let wake = Wake::default();
        let woken = wake.clone();
        let thread = std::thread::Builder::new()
            .name(settings.thread_name.into())
            .spawn(move || poll_loop(consumer, events, command_rx, stop_flag, woken, metrics))
            .map_err(|e| rdkafka::error::KafkaError::ClientCreation(e.to_string()))?;
        Ok(Self {
            commands,
            stop,
            wake,
            thread: Some(thread),
        })
    }

    /// A handle that sends commands to the thread (seek, commit offsets).
    pub fn commands(&self) -> Commands {
        Commands {
            sender: self.commands.clone(),
            wake: self.wake.clone(),
        }
    }

    /// Asks the thread to leave the group and stop. The pipeline must keep answering events
    /// (the final revocation) until the event channel closes.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        self.wake.wake();
    }

    /// Waits for the thread (call after the event channel closed).
    pub fn join(mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Copies consumed records out of librdkafka's buffers. Keys and values go into shared blocks (a
/// record's bytes are a slice of one), so a record costs no allocation of its own; a block is
/// freed when the last record in it is dropped. The topic name is shared too.
///
/// **A block per chunk.** Each slice counts itself in its block's reference count, an atomic
/// that the source thread counts up and the pipeline's threads count down as they drop the
/// records they are done with. With blocks shared across chunks, both sides hit the same count
/// at once and its cache line moved between cores for every record: 6 % of the process's samples
/// in the bench's Silver phase, on the `lock` of the increment alone. So each chunk gets blocks of
/// its own ([`Copier::seal`] when a chunk is closed): the pipeline counts down blocks the source
/// no longer touches. A block is sized after the last chunk's bytes, so little of it goes unused.
#[derive(Default)]
struct Copier {
    arena: bytes::BytesMut,
    /// Bytes copied since the last seal.
    used: usize,
    /// The size of the next block: the last sealed chunk's bytes and a quarter, within
    /// [`MIN_BLOCK`]..=[`ARENA_BLOCK`] (0 until a chunk was sealed: [`ARENA_BLOCK`]).
    next_block: usize,
    topic: Option<Arc<str>>,
}

/// Bytes per arena block at most. A value larger than a block gets a block of its own size.
const ARENA_BLOCK: usize = 1 << 20;
/// Bytes per arena block at least.
const MIN_BLOCK: usize = 4 << 10;

impl Copier {
    fn bytes(&mut self, data: &[u8]) -> bytes::Bytes {
        // An empty slice of a block would keep the whole block alive.
        if data.is_empty() {
            return bytes::Bytes::new();
        }
        if self.arena.capacity() - self.arena.len() < data.len() {
            // A fresh block: the old one lives on in the records that point into it.
            if self.used > 0 {
                // The chunk outgrew the block sized after the last one: the next is twice the
                // size, so a large chunk after a small one takes few blocks.
                self.next_block = (self.next_block * 2).min(ARENA_BLOCK);
            }
            let block = match self.next_block {
                0 => ARENA_BLOCK,
                size => size,
            };
            self.arena = bytes::BytesMut::with_capacity(block.max(data.len()));
        }
        self.used += data.len();
        self.arena.extend_from_slice(data);
        self.arena.split().freeze()
    }

    /// Ends the current chunk's blocks: the next record is copied into a new one.
    fn seal(&mut self) {
        // The next chunk's records share a name of their own too: the source thread counts the
        // shared name up per record while the workers count the last chunk's down, and one
        // count on two cores cost a cache miss per record each side.
        self.topic = None;
        if self.used == 0 {
            return;
        }
        self.next_block = (self.used + self.used / 4).clamp(MIN_BLOCK, ARENA_BLOCK);
        self.used = 0;
        self.arena = bytes::BytesMut::new();
    }

    fn topic(&mut self, name: &[u8]) -> Arc<str> {
        match &self.topic {
            Some(topic) if topic.as_bytes() == name => topic.clone(),
            _ => {
                let topic: Arc<str> = String::from_utf8_lossy(name).into();
                self.topic = Some(topic.clone());
                topic
            }
        }
    }

    /// A record from the fetch queue (see `kafka::fetch`), of `topic` (from [`Copier::topic`]).
    fn fetched(&mut self, message: &Fetched<'_>, topic: Arc<str>) -> SourceRecord {
        SourceRecord {
            topic,
            partition: message.partition(),
            offset: message.offset(),
            timestamp_ms: message.timestamp_ms(),
            key: message.key().map(|k| self.bytes(k)),
            value: message.payload().map(|v| self.bytes(v)),
            headers: message.headers(),
        }
    }

    /// A record `poll` returned from the consumer queue: one fetched before its partition was
    /// routed to the fetch queue.
    fn polled(
        &mut self,
        message: &rdkafka::message::BorrowedMessage<'_>,
        topic: Arc<str>,
    ) -> SourceRecord {
        let headers = message
            .headers()
            .map(|h| {
                h.iter()
                    .map(|header| (header.key.to_string(), header.value.map(<[u8]>::to_vec)))
                    .collect()
            })
            .unwrap_or_default();
        SourceRecord {
            topic,
            partition: message.partition(),
            offset: message.offset(),
            timestamp_ms: message.timestamp().to_millis(),
            key: message.key().map(|k| self.bytes(k)),
            value: message.payload().map(|v| self.bytes(v)),
            headers,
        }
    }
}

/// How long the fetch queue is waited on when it is empty and nothing is due. Records, commands,
/// a stop and events on the consumer queue (rebalances wait there: see `kafka::fetch`) end the
/// wait at once ([`Wake`]), so this only bounds what nothing wakes the thread for. Each wake-up
/// costs tens of µs of CPU on a VM: a 20 ms wait took about 100 ns per event of the source's
/// CPU in the bench, with a broker that answers in bursts.
const IDLE_WAIT: Duration = Duration::from_millis(250);

/// The wait while something is due that comes with no wake: a claim's answer from the stage, a
/// seek to try again, a backoff to end, a commit's answer, room in the pipeline.
const POLL_WAIT: Duration = Duration::from_millis(20);

fn poll_loop(
    mut consumer: BaseConsumer<SourceContext>,
    events: mpsc::Sender<SourceEvent>,
    commands: std_mpsc::Receiver<SourceCommand>,
    stop: Arc<AtomicBool>,
    wake: Wake,
    metrics: Arc<Metrics>,
) {
    // An event on the consumer queue (a rebalance, an error, statistics) ends the wait on the
    // fetch queue: the handler runs at once. librdkafka calls this when the queue stops being
    // empty, from its own threads.
    let woken = wake.clone();
    consumer.set_nonempty_callback(move || woken.wake());
    let context = consumer.context().clone();
    let Some(mut fetch) = FetchQueue::new(&consumer) else {
        tracing::error!("librdkafka gave no queue to fetch into; the source stops");
        return;
    };
    fetch.wake_by(&wake);
    let Some(consumer_queue) = ConsumerQueue::new(&consumer) else {
        tracing::error!("librdkafka gave no consumer queue; the source stops");
        return;
    };
    let Some(mut commits) = Commits::new(&consumer) else {
        tracing::error!("librdkafka gave no queue for offset commits; the source stops");
        return;
    };
    // Since when the pipeline has had no room for what the source holds (see `wait_for_room`).
    let mut waiting_since: Option<Instant> = None;
    // Records were handed over since the last `CaughtUp`.
    let mut handed = false;
    // How many messages the last read handed over: about how many a new chunk makes room for.
    let mut read_last = 0;
    // When `caught_up` last asked librdkafka (see `CAUGHT_UP_EVERY`).
    let mut asked_caught_up: Option<Instant> = None;
    // Something may have moved a position since `caught_up` last asked: records came, or the
    // source waited (a transaction's marker moves the position without a record and ends no
    // wait; whatever ended it, the ask is cheap and `CAUGHT_UP_EVERY` bounds it).
    let mut unasked = false;
    // The consumer errors of the current read.
    let mut errors: Vec<FetchError> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        // Before the stage's commands: a stage sends a partition's `Seek` only after answering
        // its assignment, so the answer's seek must not come after it.
        start_claimed(&consumer, &fetch);
        resume_backed_off(&consumer);
        commits.answers(Duration::ZERO, commit_answered);
        while let Ok(command) = commands.try_recv() {
            match command {
                SourceCommand::Seek(tp, offset) => {
                    let was_held = context.holding().remove(&tp);
                    // Not started yet (its first seek failed, or it waits after an error): it
                    // starts here instead, at once.
                    if let Some(pending) = context.seeking().get_mut(&tp) {
                        context.backoff().remove(&tp);
                        *pending = Some(Offset::Offset(offset));
                        let mut outbox = context.outbox();
                        outbox.close();
                        outbox.queue.push_back(SourceEvent::Reseeked(tp, offset));
                        continue;
                    }
                    // Only seek what we still own; otherwise the new owner resumes from the table.
                    let owned = consumer
                        .assignment()
                        .map(|a| {
                            a.elements().iter().any(|e| {
                                e.topic() == tp.topic.as_ref() && e.partition() == tp.partition
                            })
                        })
                        .unwrap_or(false);
                    if owned {
                        route(&fetch, &tp);
                        if let Err(e) = consumer.seek(
                            &tp.topic,
                            tp.partition,
                            Offset::Offset(offset),
                            Duration::from_secs(10),
                        ) {
                            // Paused until the seek is made (`start_claimed` tries it again): no
                            // record from the old position reaches the stage after the answer.
                            tracing::warn!(partition = %tp, offset, error = %e, "seek failed; trying again");
                            context
                                .seeking()
                                .insert(tp.clone(), Some(Offset::Offset(offset)));
                            let _ = consumer.pause(&partition_list(&tp));
                            let mut outbox = context.outbox();
                            outbox.close();
                            outbox.queue.push_back(SourceEvent::Reseeked(tp, offset));
                            continue;
                        }
                        // And after it: see `start_claimed`.
                        route(&fetch, &tp);
                        context.sought().insert(tp.clone(), Offset::Offset(offset));
                        context.read_to().remove(&tp);
                        if context.strict {
                            recheck_after_seek(&consumer, &tp, offset);
                        }
                        if was_held && !context.paused.any() && !context.held().contains(&tp) {
                            if let Err(e) = consumer.resume(&partition_list(&tp)) {
                                tracing::warn!(partition = %tp, error = %e, "resuming a held partition");
                            }
                        }
                        // After the records fetched before the seek, which the pipeline ignores.
                        let mut outbox = context.outbox();
                        outbox.close();
                        outbox.queue.push_back(SourceEvent::Reseeked(tp, offset));
                    }
                }
                SourceCommand::CommitOffsets(offsets) => commit_offsets(&mut commits, &offsets),
                SourceCommand::Pause => set_paused(&consumer, |p| &p.asked, true),
                SourceCommand::Resume => set_paused(&consumer, |p| &p.asked, false),
                SourceCommand::Hold(tp) => {
                    // Asked about records handed over before a revocation: not ours any more.
                    let owned = consumer
                        .assignment()
                        .is_ok_and(|a| partitions_of(&a).contains(&tp));
                    if owned {
                        context.holding().insert(tp.clone());
                        if let Err(e) = consumer.pause(&partition_list(&tp)) {
                            tracing::warn!(partition = %tp, error = %e, "holding a partition");
                        }
                    }
                }
            }
        }
        // Backpressure without blocking `poll`: while the pipeline has no room, fetching is
        // paused and polling goes on (heartbeats, rebalances, `max.poll.interval.ms`).
        let waiting = wait_for_room(&events, &context, &mut waiting_since);
        set_paused(&consumer, |p| &p.full, waiting);
        let deadline = Instant::now() + Duration::from_millis(50);
        // Only the first read of a pass waits.
        let mut first = true;
        let mut idle = false;
        loop {
            // Rebalances (the handler runs inside), errors and statistics, and any record that
            // reached the consumer queue before its partition was routed to the fetch queue.
            let mut polled = false;
            let failed = match consumer.poll(Duration::ZERO) {
                Some(Ok(message)) => {
                    let mut outbox = context.outbox();
                    let record = outbox.copy_polled(&message);
                    drop(outbox);
                    drop(message);
                    context.read_to().insert(
                        TopicPartition {
                            topic: record.topic.clone(),
                            partition: record.partition,
                        },
                        record.offset.saturating_add(1),
                    );
                    polled = true;
                    handed = true;
                    unasked = true;
                    let mut outbox = context.outbox();
                    outbox.push(record);
                    hand_over(&events, &mut outbox.queue);
                    None
                }
                Some(Err(e)) => Some(e),
                None => None,
            };
            // The records waiting on the fetch queue, up to a batch, in one call; none when `poll`
            // returned an error, which is handled first.
            let mut seen = 0;
            if failed.is_none() {
                // Taken with the first record, not while the read waits for one.
                let mut outbox: Option<MutexGuard<'_, Outbox>> = None;
                // The partition of the last record read, and the offset after it.
                let mut run: Option<(TopicPartition, i64)> = None;
                let wait = if polled || !first {
                    Duration::ZERO
                } else if consumer_queue.waiting() > 0 {
                    // `poll` serves one event a call, and librdkafka wakes the source only when
                    // the consumer queue stops being empty: the next pass serves the next one.
                    Duration::ZERO
                } else {
                    // After `poll`: an assignment it handled makes a claim due.
                    let mut wait = if waiting || commits.in_flight() > 0 || context.due() {
                        POLL_WAIT
                    } else {
                        IDLE_WAIT
                    };
                    if context.reports_caught_up && handed && unasked {
                        // An ask held back: until it is due (see `CAUGHT_UP_EVERY`).
                        let since = asked_caught_up.map_or(CAUGHT_UP_EVERY, |at| at.elapsed());
                        wait = wait.min(
                            CAUGHT_UP_EVERY
                                .saturating_sub(since)
                                .max(Duration::from_millis(1)),
                        );
                    }
                    wait
                };
                first = false;
                let waited = wait > Duration::ZERO;
                seen = fetch.read(wait, |message| {
                    let Some(code) = message.error() else {
                        if !errors.is_empty() {
                            followed_by(&mut errors, &message);
                        }
                        let outbox = outbox.get_or_insert_with(|| {
                            let mut outbox = context.outbox();
                            outbox.room = read_last.clamp(1, CHUNK_RECORDS);
                            outbox
                        });
                        let record = outbox.copy_fetched(&message);
                        match &mut run {
                            Some((tp, next))
                                if tp.partition == record.partition
                                    && Arc::ptr_eq(&tp.topic, &record.topic) =>
                            {
                                *next = record.offset.saturating_add(1);
                            }
                            _ => {
                                if let Some((tp, next)) = run.take() {
                                    context.read_to().insert(tp, next);
                                }
                                run = Some((
                                    TopicPartition {
                                        topic: record.topic.clone(),
                                        partition: record.partition,
                                    },
                                    record.offset.saturating_add(1),
                                ));
                            }
                        }
                        outbox.push(record);
                        return;
                    };
                    errors.push(FetchError {
                        partition: TopicPartition::new(
                            String::from_utf8_lossy(message.topic()),
                            message.partition(),
                        ),
                        offset: message.offset(),
                        code,
                        followed: false,
                    });
                });
                if let Some((tp, next)) = run {
                    context.read_to().insert(tp, next);
                }
                if let Some(mut outbox) = outbox {
                    hand_over(&events, &mut outbox.queue);
                    handed = true;
                    unasked = true;
                }
                if seen == 0 && waited {
                    unasked = true;
                }
                read_last = seen;
            }
            if !errors.is_empty() {
                // After the records before them, which are handed over already.
                for error in errors.drain(..) {
                    metrics
                        .kafka_error(&KafkaError::MessageConsumption(error.code), "consume error");
                    if !error.followed {
                        put_back(&consumer, &fetch, &error);
                    }
                }
                break;
            }
            if seen == 0 && failed.is_none() && !polled {
                idle = true;
                break;
            }
            if let Some(e) = failed {
                metrics.kafka_error(&e, "consume error");
                if context.strict
                    && matches!(
                        e,
                        KafkaError::MessageConsumption(RDKafkaErrorCode::AutoOffsetReset)
                    )
                {
                    stop_out_of_range(&consumer);
                }
                break;
            }
            if Instant::now() >= deadline {
                break;
            }
        }
        {
            let mut outbox = context.outbox();
            outbox.close();
            // Only when the queue ran dry, so the check costs nothing while records flow, at
            // most every `CAUGHT_UP_EVERY`, and not again until something may have moved.
            if context.reports_caught_up
                && idle
                && handed
                && unasked
                && asked_caught_up.is_none_or(|at| at.elapsed() >= CAUGHT_UP_EVERY)
            {
                asked_caught_up = Some(Instant::now());
                unasked = false;
                if caught_up(&consumer) {
                    handed = false;
                    outbox.queue.push_back(SourceEvent::CaughtUp);
                }
            }
        }
        let waiting = wait_for_room(&events, &context, &mut waiting_since);
        set_paused(&consumer, |p| &p.full, waiting);
    }
    // Records still routed there are dropped, as records `poll` would return below are.
    drop(fetch);
    drop(consumer_queue);
    // The drain's last commit may still wait among the commands.
    for command in commands.try_iter() {
        if let SourceCommand::CommitOffsets(offsets) = command {
            commit_offsets(&mut commits, &offsets);
        }
    }
    leave_group(&consumer, &mut commits);
    drop(commits);
    drop(consumer);
}

/// Sends a group offset commit of `offsets` (the offset to read next per partition).
fn commit_offsets(commits: &mut Commits<'_>, offsets: &BTreeMap<TopicPartition, i64>) {
    let mut tpl = TopicPartitionList::new();
    for (tp, next) in offsets {
        let _ = tpl.add_partition_offset(&tp.topic, tp.partition, Offset::Offset(*next));
    }
    if let Err(code) = commits.send(&tpl) {
        tracing::warn!(error = %code, "group offset commit not sent");
    }
}

/// Logs a group offset commit that failed, as librdkafka does when nobody takes the answer.
/// Advisory only: the table holds the truth, so a failed group commit loses nothing.
fn commit_answered(error: Option<RDKafkaErrorCode>) {
    match error {
        None | Some(RDKafkaErrorCode::NoOffset) => {}
        Some(code) => tracing::warn!(error = %code, "group offset commit failed"),
    }
}

/// How long a stopping source waits for its offset commits in flight before it leaves the group:
/// as long as librdkafka gives the LeaveGroup that follows.
pub(crate) const COMMITS_BEFORE_LEAVING: Duration = Duration::from_secs(5);

/// Leaves the consumer group before the consumer is closed. The final revocation goes through the
/// rebalance callback as usual, and hands over what still waits first.
///
/// The offset commits in flight are waited for first. A cooperative unsubscribe completes only
/// when they are answered, and the LeaveGroup goes out after it; a close that comes meanwhile ends
/// the group membership without any LeaveGroup (librdkafka 2.12.1). The group would then keep the
/// stopped replica as a member until its session expires (`session.timeout.ms`, 45 s by default),
/// its partitions unread, and a broker that does not rebalance on expiry would keep them from the
/// next replica for good. So after unsubscribing it polls until librdkafka has left (see below).
fn leave_group(consumer: &BaseConsumer<SourceContext>, commits: &mut Commits<'_>) {
    let until = Instant::now() + COMMITS_BEFORE_LEAVING;
    while commits.in_flight() > 0 && Instant::now() < until {
        let _ = consumer.poll(Duration::ZERO);
        commits.answers(Duration::from_millis(100), commit_answered);
    }
    if commits.in_flight() > 0 {
        tracing::warn!(
            unanswered = commits.in_flight(),
            "group offset commits still unanswered after {COMMITS_BEFORE_LEAVING:?}: leaving \
             the group waits for them"
        );
    }
    consumer.unsubscribe();
    // librdkafka sends the LeaveGroup once the revocation's unassign is done, which waits for
    // every commit in flight and for the partitions' fetchers to stop, after the handler's
    // `incremental_unassign` already emptied `assignment()`. A close that comes before then ends
    // the membership without one (a lifecycle test saw it, in `wait-incr-unassign-to-complete`).
    // So the source polls until librdkafka left: it clears the member id as it sends the request.
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let _ = consumer.poll(Duration::from_millis(50));
        commits.answers(Duration::ZERO, commit_answered);
        if commits.in_flight() == 0 && !queue::in_group(consumer) {
            break;
        }
        if Instant::now() >= until {
            tracing::warn!(
                "the consumer group was not left within 10 s of unsubscribing: the replica may \
                 stay a member until its session expires"
            );
            break;
        }
    }
}

/// How often the source asks at most whether it has caught up. Each ask is a round trip to
/// librdkafka's main thread (`position` reads the assignment through it): with a broker that
/// answers in bursts the queue ran dry about 50 times a second, and asking only every 100 ms took
/// that thread from about 40 to about 15 ns per event. A flush on catching up comes up to this
/// much later: an ask held back by it ends the next wait when it is due.
const CAUGHT_UP_EVERY: Duration = Duration::from_millis(100);

/// Whether every assigned partition stands at its end, as the broker's last fetch answer gave it
/// (the cached high watermark: no request is made). A partition no fetch has answered for yet
/// (paused, not started, or its first fetch under way) is not. One that gave no record yet stands
/// where it was sought to. Called only when the queue ran dry, so no fetched record still waits.
fn caught_up(consumer: &BaseConsumer<SourceContext>) -> bool {
    let Some(positions) = positions(consumer) else {
        return false;
    };
    let sought = consumer.context().sought();
    positions.elements().iter().all(|e| {
        let Some((low, high)) = cached_watermarks(consumer, e.topic(), e.partition()) else {
            return false;
        };
        let next = match e.offset() {
            Offset::Offset(next) => Some(next),
            _ => match sought.get(&TopicPartition::new(e.topic(), e.partition())) {
                // Below the earliest offset (retention deleted it), it resumed from the earliest.
                Some(Offset::Offset(next)) => Some((*next).max(low)),
                Some(Offset::Beginning) => Some(low.max(0)),
                _ => None,
            },
        };
        next.is_some_and(|next| next >= high)
    })
}

/// The positions of the assigned partitions (the offset after the last message the source took
/// from each, control records included), or `None` if librdkafka cannot say. The same as
/// rust-rdkafka's `position`, with the assignment the source keeps instead of asking librdkafka's
/// main thread for it each time: that round trip was two of every five wake-ups of the source
/// thread in the bench.
#[allow(unsafe_code)]
fn positions(consumer: &BaseConsumer<SourceContext>) -> Option<TopicPartitionList> {
    let kept = consumer
        .context()
        .assigned
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    // librdkafka did not give the assignment at the last rebalance: ask it (a round trip), and
    // keep it (only this thread writes it; rebalances run inside its `poll`).
    let Some(positions) = kept else {
        let positions = consumer.position().ok()?;
        *consumer
            .context()
            .assigned
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(positions.clone());
        return Some(positions);
    };
    // SAFETY: the client pointer is valid while `consumer` is borrowed and the list is ours;
    // librdkafka only writes each element's offset and error, reading each partition's position
    // under that partition's lock.
    let err = unsafe {
        rdkafka::bindings::rd_kafka_position(consumer.client().native_ptr(), positions.ptr())
    };
    (err == rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR).then_some(positions)
}

/// The low and high watermarks of an assigned `topic`/`partition` from the consumer's last fetch
/// answer (`rd_kafka_get_watermark_offsets`, which rust-rdkafka does not wrap; it reads
/// librdkafka's cache and never asks the broker). `None` until a fetch answered.
#[allow(unsafe_code)]
fn cached_watermarks(
    consumer: &BaseConsumer<SourceContext>,
    topic: &str,
    partition: i32,
) -> Option<(i64, i64)> {
    let topic = std::ffi::CString::new(topic).ok()?;
    let (mut low, mut high) = (-1i64, -1i64);
    // SAFETY: the client pointer is valid while `consumer` is borrowed, `topic` is a NUL-terminated
    // string that outlives the call, and the out-parameters are two live `i64`s. librdkafka takes
    // its own locks; for a partition not known yet it would create it (and mark it desired), which
    // is why this is only asked about assigned partitions.
    let err = unsafe {
        rdkafka::bindings::rd_kafka_get_watermark_offsets(
            consumer.client().native_ptr(),
            topic.as_ptr(),
            partition,
            &mut low,
            &mut high,
        )
    };
    (err == rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0)
        .then_some((low, high))
}

/// Starts the partitions whose assignment the stage answered: each seeks to where it resumes
/// (after the last offset the tables hold, or the beginning) and fetches, unless fetching is
/// paused or it is out of range (strict sources: it stays stopped, reported). A seek librdkafka
/// refuses (its fetcher has not started yet) is tried again on the next pass, the partition still
/// paused. A partition revoked before its answer came is skipped; one the stage did not answer
/// (it is stopping) stays paused until it is revoked.
fn start_claimed(consumer: &BaseConsumer<SourceContext>, fetch: &FetchQueue<'_>) {
    let context = consumer.context();
    let mut answered = Vec::new();
    context.claiming().retain_mut(|waiting| {
        use tokio::sync::oneshot::error::TryRecvError;
        match waiting.answer.try_recv() {
            Ok(resume) => {
                answered.push((std::mem::take(&mut waiting.partitions), Some(resume)));
                false
            }
            Err(TryRecvError::Empty) => !waiting.partitions.is_empty(),
            Err(TryRecvError::Closed) => {
                answered.push((std::mem::take(&mut waiting.partitions), None));
                false
            }
        }
    });
    let pending: Vec<(TopicPartition, Offset)> = {
        let mut seeking = context.seeking();
        for (partitions, resume) in answered {
            for tp in partitions {
                let offset = resume
                    .as_ref()
                    .and_then(|r| r.get(&tp).copied())
                    .and_then(|after| match after {
                        Some(last) => last.checked_add(1).map(Offset::Offset),
                        None => Some(Offset::Beginning),
                    });
                seeking.insert(tp, offset);
            }
        }
        let now = Instant::now();
        let backoff = context.backoff();
        seeking
            .iter()
            .filter(|(tp, _)| backoff.get(*tp).is_none_or(|until| now >= *until))
            .filter_map(|(tp, offset)| offset.map(|o| (tp.clone(), o)))
            .collect()
    };
    if pending.is_empty() {
        return;
    }
    let assigned: std::collections::HashSet<TopicPartition> = consumer
        .assignment()
        .map(|a| partitions_of(&a).into_iter().collect())
        .unwrap_or_default();
    let mut started = TopicPartitionList::new();
    let mut done = Vec::new();
    for (tp, offset) in pending {
        if !assigned.contains(&tp) {
            done.push(tp);
            continue;
        }
        // Before the seek, which outdates whatever was fetched before it (see `kafka::fetch`).
        route(fetch, &tp);
        if let (true, Offset::Offset(next)) = (context.strict, offset) {
            context.starts().insert(tp.clone(), next);
            if context.stop_if_out_of_range(consumer, &tp, next) {
                done.push(tp);
                continue;
            }
        }
        match consumer.seek(&tp.topic, tp.partition, offset, Duration::from_secs(10)) {
            Ok(()) => {
                // Again after it: a revocation's fetch stop clears the routing when librdkafka
                // handles it, which may come after the routing above; the seek waited for
                // whatever librdkafka had to do for the partition before it. Ops already on
                // the partition's queue (outdated or not) move over in order.
                route(fetch, &tp);
                context.sought().insert(tp.clone(), offset);
                context.read_to().remove(&tp);
                let _ = started.add_partition(&tp.topic, tp.partition);
                done.push(tp);
            }
            Err(e) => {
                tracing::debug!(partition = %tp, error = %e, "seeking to the resume offset; trying again");
            }
        }
    }
    {
        let mut seeking = context.seeking();
        let mut backoff = context.backoff();
        for tp in &done {
            seeking.remove(tp);
            backoff.remove(tp);
        }
    }
    if started.count() > 0 && !context.paused.any() {
        if let Err(e) = consumer.resume(&started) {
            tracing::warn!(error = %e, "starting claimed partitions");
        }
    }
}

/// Routes `tp`'s records to the fetch queue (before each seek of it: see `kafka::fetch`).
fn route(fetch: &FetchQueue<'_>, tp: &TopicPartition) {
    if !fetch.route(&tp.topic, tp.partition) {
        tracing::warn!(partition = %tp, "librdkafka did not route the partition to the fetch queue");
    }
}

/// How long a partition waits after a consumer error before its position is put back and it
/// fetches again: librdkafka's own `fetch.error.backoff.ms` (its default), which the seek that
/// puts the position back would otherwise cut short.
const ERROR_BACKOFF: Duration = Duration::from_millis(500);

/// A consumer error the fetch queue handed over, at the offset it carries.
struct FetchError {
    partition: TopicPartition,
    offset: i64,
    code: RDKafkaErrorCode,
    /// A record of the partition at or past the offset came after it in the same read: the
    /// position is right again (librdkafka keeps the largest).
    followed: bool,
}

/// Marks the errors that `record` follows in its read (see [`FetchError::followed`]).
fn followed_by(errors: &mut [FetchError], record: &Fetched<'_>) {
    for error in errors.iter_mut() {
        if error.partition.partition == record.partition()
            && error.offset <= record.offset()
            && error.partition.topic.as_bytes() == record.topic()
        {
            error.followed = true;
        }
    }
}

/// A read may have moved `error`'s partition's position one past the error's offset with no
/// record after it (see `kafka::fetch`): puts it back before any pause (Strata's, or librdkafka's
/// own around a rebalance) can restart fetching there and skip a record.
///
/// Where the partition really stands: a fetch error's offset is the record the fetcher would
/// fetch next, every record before it queued (and read) before the error. An error at or before
/// the last record handed over since the last seek did not move the position (librdkafka keeps
/// the largest); nor did one without an offset once a record came. Otherwise the partition is
/// paused and sought back at once (to the error's offset, or to the last seek when no record came
/// since it), and resumes after [`ERROR_BACKOFF`] (`resume_backed_off`). A strict source's offset
/// out of range is not sought: librdkafka stopped fetching the partition, and it is checked
/// against the partition's range at the error's offset, as `stop_out_of_range` does for one
/// `poll` returns.
fn put_back(consumer: &BaseConsumer<SourceContext>, fetch: &FetchQueue<'_>, error: &FetchError) {
    let context = consumer.context();
    let tp = &error.partition;
    let owned = consumer
        .assignment()
        .is_ok_and(|a| partitions_of(&a).contains(tp));
    // A partition held (not started, waiting for a seek, held by the stage, stopped out of
    // range, or backing off) is sought before it fetches again anyway.
    if !owned || context.held().contains(tp) {
        return;
    }
    if context.strict && error.code == RDKafkaErrorCode::AutoOffsetReset {
        if error.offset >= 0 && context.stop_if_out_of_range(consumer, tp, error.offset) {
            let _ = consumer.pause(&partition_list(tp));
        } else {
            // librdkafka stopped fetching it all the same; only a new assignment restarts it.
            tracing::warn!(partition = %tp, offset = error.offset, "librdkafka refused an offset the partition's range does not rule out; the partition waits for a new assignment");
        }
        return;
    }
    let read_to = context.read_to().get(tp).copied();
    let sought = context.sought().get(tp).copied();
    let Some(target) = put_back_to(error.offset, read_to, sought) else {
        if error.offset < 0 && read_to.is_none() && sought.is_none() {
            tracing::warn!(partition = %tp, "a consumer error moved the position of a partition never sought");
        }
        return;
    };
    let list = partition_list(tp);
    if let Err(e) = consumer.pause(&list) {
        tracing::warn!(partition = %tp, error = %e, "pausing a partition after a consumer error");
    }
    route(fetch, tp);
    match consumer.seek(&tp.topic, tp.partition, target, Duration::from_secs(10)) {
        Ok(()) => {
            route(fetch, tp);
            context.sought().insert(tp.clone(), target);
            context.read_to().remove(tp);
            if let (true, Offset::Offset(next)) = (context.strict, target) {
                context.starts().insert(tp.clone(), next);
            }
        }
        // Paused until `start_claimed` makes the seek.
        Err(e) => {
            tracing::warn!(partition = %tp, error = %e, "seeking back after a consumer error failed; trying again");
            context.seeking().insert(tp.clone(), Some(target));
        }
    }
    context
        .backoff()
        .insert(tp.clone(), Instant::now() + ERROR_BACKOFF);
    tracing::debug!(partition = %tp, ?target, "position put back after a consumer error");
}

/// Where a partition must restart after a consumer error at `offset` (see `put_back`), or `None`
/// when the error did not move its position: `read_to` is the offset after the last record read
/// since the partition's last seek (to `sought`).
fn put_back_to(offset: i64, read_to: Option<i64>, sought: Option<Offset>) -> Option<Offset> {
    match (offset >= 0, read_to) {
        // librdkafka keeps the largest position: an error at or before what was read moved none.
        (true, Some(next)) if offset < next => None,
        (true, Some(_)) => Some(Offset::Offset(offset)),
        (true, None) => match sought {
            // An error from before the seek (librdkafka gives some no fetch version).
            Some(Offset::Offset(start)) if offset < start => Some(Offset::Offset(start)),
            _ => Some(Offset::Offset(offset)),
        },
        // A position at a record stays above an error without an offset.
        (false, Some(_)) => None,
        // No record since the seek: the position was unset and the error set it; seek again.
        (false, None) => sought,
    }
}

/// Resumes the partitions whose wait after a consumer error (`put_back`) is over, unless
/// fetching is paused or they are held for another reason. One whose seek is still to be made
/// waits for `start_claimed`, which resumes it.
fn resume_backed_off(consumer: &BaseConsumer<SourceContext>) {
    let context = consumer.context();
    let due: Vec<TopicPartition> = {
        let mut backoff = context.backoff();
        if backoff.is_empty() {
            return;
        }
        let now = Instant::now();
        let seeking = context.seeking();
        let due: Vec<TopicPartition> = backoff
            .iter()
            .filter(|(tp, until)| now >= **until && !seeking.contains_key(*tp))
            .map(|(tp, _)| tp.clone())
            .collect();
        for tp in &due {
            backoff.remove(tp);
        }
        due
    };
    // While fetching is paused, the resume that ends the pause takes them along.
    if due.is_empty() || context.paused.any() {
        return;
    }
    let held = context.held();
    let mut list = TopicPartitionList::new();
    for tp in due.iter().filter(|tp| !held.contains(*tp)) {
        let _ = list.add_partition(&tp.topic, tp.partition);
    }
    if list.count() > 0 {
        if let Err(e) = consumer.resume(&list) {
            tracing::warn!(error = %e, "resuming partitions after a consumer error");
        }
    }
}

/// After librdkafka refused to reset an offset (`auto.offset.reset=error`): finds which
/// assigned partitions' positions lie outside the partition, reports and pauses them.
fn stop_out_of_range(consumer: &BaseConsumer<SourceContext>) {
    let Ok(positions) = consumer.position() else {
        return;
    };
    let mut stopped = TopicPartitionList::new();
    for element in positions.elements() {
        let tp = TopicPartition::new(element.topic(), element.partition());
        // No record polled since the assignment or a seek: it starts where it was put.
        let next = match element.offset() {
            Offset::Offset(next) => next,
            _ => match consumer.context().starts().get(&tp) {
                Some(start) => *start,
                None => continue,
            },
        };
        if consumer.context().stop_if_out_of_range(consumer, &tp, next) {
            let _ = stopped.add_partition(element.topic(), element.partition());
        }
    }
    if stopped.count() > 0 {
        if let Err(e) = consumer.pause(&stopped) {
            tracing::warn!(error = %e, "pausing partitions out of range");
        }
    }
}

/// A list of one partition.
fn partition_list(tp: &TopicPartition) -> TopicPartitionList {
    let mut list = TopicPartitionList::new();
    let _ = list.add_partition(&tp.topic, tp.partition);
    list
}

/// After a seek of a strict source: where the partition now starts, and whether that is in
/// range. A stopped partition sought back into range fetches again (and says so); one sought out
/// of range stops.
fn recheck_after_seek(consumer: &BaseConsumer<SourceContext>, tp: &TopicPartition, next: i64) {
    let context = consumer.context();
    context.starts().insert(tp.clone(), next);
    let was_stopped = context.stopped().remove(tp);
    let list = partition_list(tp);
    if context.stop_if_out_of_range(consumer, tp, next) {
        let _ = consumer.pause(&list);
    } else if was_stopped {
        context
            .outbox()
            .queue
            .push_back(SourceEvent::InRange(tp.clone()));
        if !context.paused.any() {
            let _ = consumer.resume(&list);
        }
    }
}

/// How long the source waits for the pipeline to make room before it pauses fetching. A busy
/// pipeline makes room within milliseconds; pausing at once would throw away librdkafka's
/// prefetched records at every full channel and fetch them again (not measured). Well under any
/// `max.poll.interval.ms`.
const FULL_WAIT: Duration = Duration::from_secs(1);

/// Hands over what the outbox holds, waiting up to [`FULL_WAIT`] for room; returns whether
/// anything still waits (then fetching pauses until it is handed over).
fn wait_for_room(
    events: &mpsc::Sender<SourceEvent>,
    context: &SourceContext,
    waiting_since: &mut Option<Instant>,
) -> bool {
    let until = Instant::now() + FULL_WAIT;
    loop {
        if !hand_over(events, &mut context.outbox().queue) {
            // The wait (over every poll while paused) ends: it is counted once, whole.
            if let Some(since) = waiting_since.take() {
                if context.counts_assignments {
                    context.metrics.source_waited(since.elapsed());
                }
            }
            return false;
        }
        waiting_since.get_or_insert_with(Instant::now);
        if Instant::now() >= until {
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Hands over what the outbox holds, in order, as far as the pipeline has room; never blocks.
/// Returns whether anything still waits. Records are counted as consumed by the pipeline when it
/// takes them (one place keeps the accounting).
fn hand_over(events: &mpsc::Sender<SourceEvent>, outbox: &mut VecDeque<SourceEvent>) -> bool {
    while let Some(event) = outbox.pop_front() {
        match events.try_send(event) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(event)) => {
                outbox.push_front(event);
                return true;
            }
            // The pipeline is gone (shutting down): nothing of it will be committed.
            Err(mpsc::error::TrySendError::Closed(_)) => {
                outbox.clear();
                return false;
            }
        }
    }
    false
}

/// Sets one reason to pause and pauses or resumes the whole assignment when that changes whether
/// any reason holds. On resume librdkafka fetches from the record after the last one polled.
fn set_paused(
    consumer: &BaseConsumer<SourceContext>,
    reason: impl Fn(&Paused) -> &AtomicBool,
    value: bool,
) {
    let paused = &consumer.context().paused;
    let before = paused.any();
    reason(paused).store(value, Ordering::Relaxed);
    let after = paused.any();
    if before == after {
        return;
    }
    let Ok(assignment) = consumer.assignment() else {
        return;
    };
    let result = if after {
        consumer.pause(&assignment)
    } else {
        // Partitions stopped for an offset out of range, or not yet claimed, stay paused.
        let held = consumer.context().held();
        let mut resumed = TopicPartitionList::new();
        for e in assignment.elements() {
            if !held.contains(&TopicPartition::new(e.topic(), e.partition())) {
                let _ = resumed.add_partition(e.topic(), e.partition());
            }
        }
        consumer.resume(&resumed)
    };
    match result {
        Ok(()) => tracing::debug!(paused = after, "fetching paused or resumed"),
        Err(e) => tracing::warn!(error = %e, paused = after, "pausing or resuming fetches"),
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    use rdkafka::types::RDKafkaApiKey;

    use super::super::fetch::tests::{produce, producer};
    use super::*;

    /// A record as the test expects it back: partition, offset order, key, value, timestamp and
    /// headers.
    type Expected = (
        i32,
        Option<Vec<u8>>,
        Option<Vec<u8>>,
        i64,
        Vec<(String, Option<Vec<u8>>)>,
    );

    /// Records read through the fetch queue in batches arrive whole (key, value or its absence,
    /// timestamp, headers with a null value among them) and in offset order per partition, across
    /// more than one batch.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn batched_records_arrive_whole_and_in_order() {
        let cluster = MockCluster::new(1).expect("mock cluster");
        cluster.create_topic("bronze", 2, 1).expect("topic");
        let brokers = cluster.bootstrap_servers();
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .create()
            .expect("producer");
        let base = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let mut expected: Vec<Expected> = Vec::new();
        let records = 3 * crate::kafka::fetch::BATCH + 17;
        for i in 0..records {
            let partition = (i % 2) as i32;
            let key = (i % 3 != 0).then(|| format!("key-{i}").into_bytes());
            let value = (i % 5 != 0).then(|| vec![(i % 251) as u8; i % 40]);
            let headers: Vec<(String, Option<Vec<u8>>)> = match i % 4 {
                0 => Vec::new(),
                1 => vec![("trace".into(), Some(format!("t-{i}").into_bytes()))],
                _ => vec![
                    ("trace".into(), Some(format!("t-{i}").into_bytes())),
                    ("null".into(), None),
                    ("empty".into(), Some(Vec::new())),
                ],
            };
            let timestamp = base + i as i64;
            let mut owned = OwnedHeaders::new();
            for (name, value) in &headers {
                owned = owned.insert(Header {
                    key: name,
                    value: value.as_deref(),
                });
            }
            let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to("bronze")
                .partition(partition)
                .timestamp(timestamp)
                .headers(owned);
            if let Some(key) = &key {
                record = record.key(key.as_slice());
            }
            if let Some(value) = &value {
                record = record.payload(value.as_slice());
            }
            producer.send(record).map_err(|(e, _)| e).expect("send");
            producer.poll(Duration::ZERO);
            expected.push((partition, key, value, timestamp, headers));
        }
        producer.flush(Duration::from_secs(10)).expect("flush");

        let (events, mut received) = mpsc::channel(64);
        let source = Source::start(
            SourceSettings {
                brokers,
                group_id: "batched".into(),
                topics: vec!["bronze".into()],
                properties: BTreeMap::new(),
                counts_assignments: false,
                strict_offsets: false,
                reports_caught_up: true,
                thread_name: "strata-source",
            },
            Arc::new(Metrics::new()),
            events,
        )
        .expect("source");
        let mut got: Vec<SourceRecord> = Vec::new();
        // Where the bytes copied last for the chunk before end.
        let mut copied_to: Option<usize> = None;
        let mut switches = 0;
        let until = Instant::now() + Duration::from_secs(60);
        while got.len() < records && Instant::now() < until {
            match tokio::time::timeout(Duration::from_secs(1), received.recv()).await {
                Ok(Some(SourceEvent::Assigned { partitions, reply })) => {
                    let _ = reply.send(partitions.into_iter().map(|tp| (tp, None)).collect());
                }
                Ok(Some(SourceEvent::Records(chunk))) => {
                    let partition = chunk.first().map(|r| r.partition);
                    assert!(
                        chunk.iter().all(|r| Some(r.partition) == partition),
                        "a chunk holds one partition"
                    );
                    if got.last().map(|r| r.partition) != partition && !got.is_empty() {
                        switches += 1;
                    }
                    // Each chunk copies into blocks of its own (`Copier::seal`): its first bytes
                    // never follow the last bytes of the chunk before in one block.
                    let pieces: Vec<(usize, usize)> = chunk
                        .iter()
                        .flat_map(|r| [r.key.as_ref(), r.value.as_ref()])
                        .flatten()
                        .filter(|b| !b.is_empty())
                        .map(|b| (b.as_ptr() as usize, b.len()))
                        .collect();
                    if let (Some(end), Some((first, _))) = (copied_to, pieces.first()) {
                        assert_ne!(
                            *first, end,
                            "a chunk's first record was copied into the block of the chunk before"
                        );
                    }
                    if let Some((last, len)) = pieces.last() {
                        copied_to = Some(last + len);
                    }
                    got.extend(chunk);
                }
                Ok(Some(SourceEvent::Revoked { done, .. })) => {
                    let _ = done.send(());
                }
                Ok(Some(_)) | Err(_) => {}
                Ok(None) => break,
            }
        }
        stop_and_join(source, &mut received).await;

        assert_eq!(got.len(), records, "every record once");
        assert!(switches > 0, "no chunk of one partition followed another's");
        for partition in 0..2 {
            let want: Vec<&Expected> = expected.iter().filter(|e| e.0 == partition).collect();
            let have: Vec<&SourceRecord> =
                got.iter().filter(|r| r.partition == partition).collect();
            assert_eq!(have.len(), want.len(), "partition {partition}");
            for (offset, (record, want)) in have.iter().zip(&want).enumerate() {
                assert_eq!(record.offset, offset as i64, "offset order");
                assert_eq!(record.topic.as_ref(), "bronze");
                assert_eq!(record.key.as_deref(), want.1.as_deref(), "key at {offset}");
                assert_eq!(
                    record.value.as_deref(),
                    want.2.as_deref(),
                    "value at {offset}"
                );
                assert_eq!(record.timestamp_ms, Some(want.3), "timestamp at {offset}");
                assert_eq!(record.headers, want.4, "headers at {offset}");
            }
        }
    }

    /// The records `received` brings until `want` came (or 30 s passed), answering assignments
    /// (from the beginning) and revocations on the way.
    async fn collect(received: &mut mpsc::Receiver<SourceEvent>, want: usize) -> Vec<i64> {
        let mut offsets = Vec::new();
        let until = Instant::now() + Duration::from_secs(30);
        while offsets.len() < want && Instant::now() < until {
            match tokio::time::timeout(Duration::from_millis(200), received.recv()).await {
                Ok(Some(SourceEvent::Assigned { partitions, reply })) => {
                    let _ = reply.send(partitions.into_iter().map(|tp| (tp, None)).collect());
                }
                Ok(Some(SourceEvent::Records(chunk))) => {
                    offsets.extend(chunk.iter().map(|r| r.offset));
                }
                Ok(Some(SourceEvent::Revoked { done, .. })) => {
                    let _ = done.send(());
                }
                Ok(Some(_)) | Err(_) => {}
                Ok(None) => break,
            }
        }
        offsets
    }

    /// A fetch error moves the partition's position past the record not read yet (see
    /// `kafka::fetch`); the source puts it back, so pausing and resuming right after the error
    /// loses no record.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_pause_right_after_a_fetch_error_loses_no_record() {
        let cluster = MockCluster::new(1).expect("mock cluster");
        cluster.create_topic("faulty", 1, 1).expect("topic");
        let brokers = cluster.bootstrap_servers();
        let producer = producer(&brokers);
        produce(&producer, "faulty", 0, 50);

        let metrics = Arc::new(Metrics::new());
        let (events, mut received) = mpsc::channel(64);
        let source = Source::start(
            SourceSettings {
                brokers,
                group_id: "faulty".into(),
                topics: vec!["faulty".into()],
                properties: BTreeMap::new(),
                counts_assignments: false,
                strict_offsets: false,
                reports_caught_up: false,
                thread_name: "strata-source",
            },
            metrics.clone(),
            events,
        )
        .expect("source");
        let mut offsets = collect(&mut received, 50).await;
        assert_eq!(offsets, (0..50).collect::<Vec<_>>());

        // Past the fetcher's first empty fetch at the end: librdkafka reports a fetch that fails
        // there for the first time as reaching the end, not as the failure.
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        let errors = || {
            metrics
                .render()
                .lines()
                .find_map(|l| l.strip_prefix("strata_kafka_errors_total "))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        cluster.request_errors(
            RDKafkaApiKey::Fetch,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_INVALID_MSG],
        );
        let until = Instant::now() + Duration::from_secs(30);
        while errors() < 1.0 && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(errors() >= 1.0, "the fetch error was read");
        // Paused and resumed before any record came after the error.
        let commands = source.commands();
        commands.send(SourceCommand::Pause);
        tokio::time::sleep(Duration::from_millis(200)).await;
        commands.send(SourceCommand::Resume);

        produce(&producer, "faulty", 50, 100);
        offsets.extend(collect(&mut received, 50).await);
        stop_and_join(source, &mut received).await;
        assert_eq!(
            offsets,
            (0..100).collect::<Vec<_>>(),
            "every record once, in order"
        );
    }

    /// librdkafka's log lines, which rust-rdkafka passes to the `log` crate: kept for the tests
    /// that check what the client did.
    static LIBRDKAFKA_LOG: Mutex<Vec<String>> = Mutex::new(Vec::new());

    struct CaptureLog;

    impl log::Log for CaptureLog {
        fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
            metadata.target() == "librdkafka"
        }

        fn log(&self, record: &log::Record<'_>) {
            if self.enabled(record.metadata()) {
                LIBRDKAFKA_LOG
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(record.args().to_string());
            }
        }

        fn flush(&self) {}
    }

    /// A source that stops while its group offset commit is still unanswered leaves its group all
    /// the same, once the commit is answered. Closed at once instead, librdkafka would end the
    /// membership without a LeaveGroup, and the group would keep the stopped member until its
    /// session expired.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_source_stopping_with_a_commit_in_flight_leaves_its_group() {
        stop_with_a_commit_answered_after("leaving", Duration::from_secs(2)).await;
    }

    /// The same with a commit answered only after `COMMITS_BEFORE_LEAVING`: the source
    /// unsubscribes with the commit in flight, so the revocation's unassign completes only when
    /// it is answered, and the source must not close before librdkafka left.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_source_whose_commit_outlasts_its_wait_still_leaves_its_group() {
        stop_with_a_commit_answered_after(
            "leaving-late",
            COMMITS_BEFORE_LEAVING + Duration::from_secs(1),
        )
        .await;
    }

    /// Stops a source of group `group` while its commit waits `answered_after` for the broker's
    /// answer, and asserts that librdkafka sent a LeaveGroup.
    async fn stop_with_a_commit_answered_after(group: &str, answered_after: Duration) {
        capture_librdkafka_log();
        let cluster = MockCluster::new(1).expect("mock cluster");
        cluster.create_topic(group, 1, 1).expect("topic");
        let brokers = cluster.bootstrap_servers();
        produce(&producer(&brokers), group, 0, 10);
        let (events, mut received) = mpsc::channel(64);
        let properties = BTreeMap::from([("debug".into(), "cgrp".into())]);
        let source = test_source(brokers, group, group, properties, events);
        assert_eq!(collect(&mut received, 10).await.len(), 10);

        // The source stops while its commit waits for the answer.
        cluster
            .broker_round_trip_time(1, answered_after)
            .expect("round trip time");
        source
            .commands()
            .send(SourceCommand::CommitOffsets(BTreeMap::from([(
                TopicPartition::new(group, 0),
                10,
            )])));
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop_and_join(source, &mut received).await;

        let log = LIBRDKAFKA_LOG
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let quoted = format!("\"{group}\"");
        let group: Vec<&String> = log.iter().filter(|line| line.contains(&quoted)).collect();
        assert!(
            group
                .iter()
                .any(|line| line.contains("leave (in state up)")),
            "no LeaveGroup was sent; the group's log:\n{}",
            group
                .iter()
                .map(|l| l.as_str())
                .collect::<Vec<_>>()
                .join("\n")
        );
    }

    /// Stops `source`, answers the revocation its stop makes, and waits for its thread.
    async fn stop_and_join(source: Source, received: &mut mpsc::Receiver<SourceEvent>) {
        source.stop();
        while let Some(event) = received.recv().await {
            if let SourceEvent::Revoked { done, .. } = event {
                let _ = done.send(());
            }
        }
        tokio::task::spawn_blocking(move || source.join())
            .await
            .expect("join");
    }

    /// A source of group `group` on `topic`, reading from the start, that does not count
    /// assignments or report catching up, with librdkafka `properties`.
    fn test_source(
        brokers: String,
        group: &str,
        topic: &str,
        properties: BTreeMap<String, String>,
        events: mpsc::Sender<SourceEvent>,
    ) -> Source {
        Source::start(
            SourceSettings {
                brokers,
                group_id: group.into(),
                topics: vec![topic.into()],
                properties,
                counts_assignments: false,
                strict_offsets: false,
                reports_caught_up: false,
                thread_name: "strata-source",
            },
            Arc::new(Metrics::new()),
            events,
        )
        .expect("source")
    }

    /// Installs [`CaptureLog`] for this test binary and lets librdkafka's debug lines through.
    fn capture_librdkafka_log() {
        // Before the client is configured: rust-rdkafka sets librdkafka's log level from it. The
        // first test to get here installs it for the binary.
        static CAPTURE: std::sync::Once = std::sync::Once::new();
        CAPTURE.call_once(|| {
            log::set_logger(&CaptureLog).expect("no other logger in this test binary");
        });
        log::set_max_level(log::LevelFilter::Debug);
    }

    /// The fetch backoffs librdkafka logged for `topic` because the local queue was full.
    fn queue_full_backoffs(topic: &str) -> Vec<String> {
        let needle = format!("{topic} [0]: Fetch backoff for ");
        LIBRDKAFKA_LOG
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|line| line.contains(&needle) && line.ends_with("Local: Queue full"))
            .cloned()
            .collect()
    }

    /// Reads `records` records of a fresh one-partition topic with librdkafka's queue threshold
    /// at one message, so that fetch answers fill the queue, and returns the backoffs logged.
    async fn read_past_a_full_queue(topic: &str, properties: &[(&str, &str)]) -> Vec<String> {
        capture_librdkafka_log();
        let cluster = MockCluster::new(1).expect("mock cluster");
        cluster.create_topic(topic, 1, 1).expect("topic");
        let brokers = cluster.bootstrap_servers();
        // Twenty message sets, one per fetch answer.
        let records = 2_000;
        let producer = producer(&brokers);
        for from in (0..records).step_by(100) {
            produce(&producer, topic, from, from + 100);
        }
        let mut all = BTreeMap::from([
            ("debug".to_string(), "fetch".to_string()),
            ("queued.min.messages".to_string(), "1".to_string()),
            ("max.partition.fetch.bytes".to_string(), "100".to_string()),
        ]);
        all.extend(
            properties
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string())),
        );
        let (events, mut received) = mpsc::channel(64);
        let source = test_source(brokers, topic, topic, all, events);
        let offsets = collect(&mut received, records).await;
        stop_and_join(source, &mut received).await;
        assert_eq!(
            offsets,
            (0..records as i64).collect::<Vec<_>>(),
            "every record once, in order"
        );
        queue_full_backoffs(topic)
    }

    /// A fetch answer that fills librdkafka's queue holds the partition's next fetch back for
    /// `FETCH_QUEUE_BACKOFF_MS`, not librdkafka's default second.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_fetch_queue_holds_fetching_back_briefly() {
        let backoffs = read_past_a_full_queue("queue-backoff", &[]).await;
        assert!(
            !backoffs.is_empty(),
            "no answer filled the queue, so the test showed nothing"
        );
        let wanted = format!("Fetch backoff for {FETCH_QUEUE_BACKOFF_MS}ms");
        assert!(
            backoffs.iter().all(|line| line.contains(&wanted)),
            "expected every backoff at {FETCH_QUEUE_BACKOFF_MS} ms:\n{}",
            backoffs.join("\n")
        );
    }

    /// A `fetch.queue.backoff.ms` among the properties (from `STRATA_KAFKA_FETCH_QUEUE_BACKOFF_MS`)
    /// still sets it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_fetch_queue_backoff_the_user_sets_is_kept() {
        let backoffs =
            read_past_a_full_queue("queue-backoff-set", &[("fetch.queue.backoff.ms", "7")]).await;
        assert!(!backoffs.is_empty(), "no answer filled the queue");
        assert!(
            backoffs
                .iter()
                .all(|line| line.contains("Fetch backoff for 7ms")),
            "expected every backoff at 7 ms:\n{}",
            backoffs.join("\n")
        );
    }

    /// Where a partition restarts after a consumer error: at the error's offset when it moved the
    /// position, never behind a record already read, and at the last seek when no record came.
    #[test]
    fn a_consumer_error_puts_the_position_back_only_where_it_moved_it() {
        // A fetch error at the next record, after records 0..50: back to 50.
        assert_eq!(put_back_to(50, Some(50), None), Some(Offset::Offset(50)));
        // One at or before what was read (a corrupt batch's base offset): nothing moved.
        assert_eq!(put_back_to(40, Some(50), Some(Offset::Offset(0))), None);
        assert_eq!(put_back_to(49, Some(50), None), None);
        // No record since the seek to 30: at the error, unless it predates the seek.
        assert_eq!(
            put_back_to(30, None, Some(Offset::Offset(30))),
            Some(Offset::Offset(30))
        );
        assert_eq!(
            put_back_to(12, None, Some(Offset::Offset(30))),
            Some(Offset::Offset(30))
        );
        assert_eq!(
            put_back_to(7, None, Some(Offset::Beginning)),
            Some(Offset::Offset(7))
        );
        // Without an offset: only an unset position moved, and the last seek is made again.
        assert_eq!(put_back_to(-1001, Some(50), None), None);
        assert_eq!(
            put_back_to(-1001, None, Some(Offset::Beginning)),
            Some(Offset::Beginning)
        );
        assert_eq!(put_back_to(-2, None, None), None);
    }

    /// The pipeline drops a chunk's records while the source copies the next: they must not
    /// share a block, whose reference count both sides would then hit per record.
    #[test]
    fn each_chunk_copies_into_blocks_of_its_own() {
        let mut outbox = Outbox::default();
        let first = outbox.copier.bytes(b"first");
        let second = outbox.copier.bytes(b"second");
        // While a chunk is gathered, its records share a block: the second follows the first.
        assert_eq!(second.as_ptr(), first.as_ptr().wrapping_add(first.len()));
        assert!(outbox.copier.bytes(b"").is_empty());
        outbox.close();
        outbox.close();
        let third = outbox.copier.bytes(b"third");
        // A new block, not the rest of the first one (still alive, held by `first`, `second`).
        assert_ne!(
            third.as_ptr(),
            second.as_ptr().wrapping_add(second.len()),
            "the next chunk was copied into the closed chunk's block"
        );
        assert_eq!(&third[..], b"third");
        assert_eq!((&first[..], &second[..]), (&b"first"[..], &b"second"[..]));
        // Sized after the closed chunk (11 bytes): the smallest block.
        assert_eq!(outbox.copier.arena.capacity(), MIN_BLOCK - 5);
        // A chunk that outgrows its block gets one twice the size.
        let rest = vec![1u8; MIN_BLOCK - 5];
        outbox.copier.bytes(&rest);
        outbox.copier.bytes(b"more");
        assert_eq!(outbox.copier.arena.capacity(), 2 * MIN_BLOCK - 4);
        // A value larger than the block gets a block of its own size.
        let large = vec![7u8; 2 * ARENA_BLOCK];
        assert_eq!(&outbox.copier.bytes(&large)[..], &large[..]);
        outbox.copier.seal();
        assert_eq!(outbox.copier.next_block, ARENA_BLOCK);
    }
}

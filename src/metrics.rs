//! Prometheus metrics and the HTTP endpoint that serves them with `/healthz` and `/readyz`.
//!
//! Every observable event is a method here that counts and logs in the same call, so logs and
//! metrics never drift apart. Labels are bounded: topic, partition, table, reason; never a key.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deltalake::arrow::array::{Array, AsArray, RecordBatch};
use deltalake::arrow::datatypes::TimestampMicrosecondType;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use std::collections::BTreeMap;

use crate::models::{Rejection, SourceRecord, TopicPartition};

pub struct Metrics {
    pub registry: Registry,
    pub records_consumed: IntCounterVec,
    pub bytes_consumed: IntCounterVec,
    pub records_written: IntCounterVec,
    pub records_dead_lettered: IntCounterVec,
    pub records_skipped_duplicate: IntCounterVec,
    pub records_dropped: IntCounterVec,
    pub bytes_written: IntCounterVec,
    pub records_late: IntCounterVec,
    pub end_to_end_latency: HistogramVec,
    pub watermark_lag: GaugeVec,
    pub last_commit: GaugeVec,
    pub ready: IntGauge,
    pub records_buffered: IntGaugeVec,
    pub schema_evolutions: IntCounterVec,
    pub commits: IntCounterVec,
    pub commit_duration: HistogramVec,
    pub commit_conflicts: IntCounterVec,
    pub commits_fenced: IntCounterVec,
    pub files_written: IntCounterVec,
    pub file_bytes: HistogramVec,
    pub consumer_lag: IntGaugeVec,
    pub committed_offset: IntGaugeVec,
    pub assigned_partitions: IntGauge,
    pub rebalances: IntCounterVec,
    pub buffered_bytes: IntGauge,
    pub buffered_bytes_limit: IntGauge,
    pub registry_errors: IntCounterVec,
    pub schema_ids_seen: IntGauge,
    pub flush_duration: Histogram,
    pub kafka_errors: IntCounter,
    dead_letter_write_failures: IntCounterVec,
    dead_letter_blocked: IntGaugeVec,
    pub gold: GoldMetrics,
    /// Bits of [`NotReady`] that currently hold; ready when none does.
    not_ready: AtomicU8,
    /// Dead-letter topics that cannot be written now, with why: each makes the replica not ready.
    blocked_dead_letters: Mutex<BTreeMap<String, String>>,
}

/// Why a replica is not ready. Several can hold at once and each clears on its own, so one
/// recovering dependency cannot report ready while another is still down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotReady {
    Starting = 1,
    Registry = 2,
    Lake = 4,
    ShuttingDown = 8,
}

impl NotReady {
    const ALL: [NotReady; 4] = [
        NotReady::Starting,
        NotReady::Registry,
        NotReady::Lake,
        NotReady::ShuttingDown,
    ];

    fn as_str(self) -> &'static str {
        match self {
            NotReady::Starting => "starting (no assignment from the consumer group yet)",
            NotReady::Registry => "schema registry unreachable",
            NotReady::Lake => "object store refuses writes",
            NotReady::ShuttingDown => "shutting down",
        }
    }
}

/// Gold's metrics (stage 1 and stage 2); all zero when Gold is off.
pub struct GoldMetrics {
    pub events: IntCounter,
    pub partials: IntCounterVec,
    pub partial_events: IntCounterVec,
    pub hot_keys: IntGauge,
    pub salted_partials: IntCounter,
    pub late_events: IntCounter,
    pub source_watermark_lag: Gauge,
    pub windows_emitted: IntCounter,
    pub watermark_lag: Gauge,
    pub open_windows: IntGauge,
    pub duplicates: IntCounter,
    pub refused: IntCounterVec,
    pub forwarded: IntCounter,
    pub commits: IntCounter,
}

impl GoldMetrics {
    fn new(registry: &Registry) -> Self {
        let one = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("static metric definition");
            registry
                .register(Box::new(c.clone()))
                .expect("metric registered once");
            c
        };
        let level = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("static metric definition");
            registry
                .register(Box::new(g.clone()))
                .expect("metric registered once");
            g
        };
        let seconds = |name: &str, help: &str| {
            let g = Gauge::new(name, help).expect("static metric definition");
            registry
                .register(Box::new(g.clone()))
                .expect("metric registered once");
            g
        };
        Self {
            events: one("strata_gold_events_total", "Events stage 1 pre-aggregated into partials (late events excluded)."),
            partials: counter(registry, "strata_gold_partials_total", "Partial aggregates sent, per partials-topic partition (pre-aggregation ratio: events / partials).", &["partition"]),
            partial_events: counter(registry, "strata_gold_partial_events_total", "Events carried by the partials sent, per partials-topic partition (the load salting evens out).", &["partition"]),
            hot_keys: level("strata_gold_hot_keys", "Keys salted in the latest epoch of the source partitions this replica owns."),
            salted_partials: one("strata_gold_salted_partials_total", "Partials of salted sub-keys sent."),
            late_events: one("strata_gold_late_events_total", "Events written to the late-events table (one per window missed)."),
            source_watermark_lag: seconds("strata_gold_source_watermark_lag_seconds", "Now minus the lowest watermark among the source partitions this replica owns."),
            windows_emitted: one("strata_gold_windows_emitted_total", "Gold rows committed (one per closed window and key)."),
            watermark_lag: seconds("strata_gold_watermark_lag_seconds", "Now minus the lowest operator watermark among the partials partitions this replica merges."),
            open_windows: level("strata_gold_open_windows", "(window, key, salt) groups open in stage 2 on this replica."),
            duplicates: one("strata_gold_partials_duplicates_total", "Partials and sub-results stage 2 dropped as replays."),
            refused: counter(registry, "strata_gold_partials_refused_total", "Partials-topic messages stage 2 could not use, by reason.", &["reason"]),
            forwarded: one("strata_gold_subresults_forwarded_total", "Closed salted sub-results sent to their key's own partition."),
            commits: one("strata_gold_commits_total", "Commits of the Gold table."),
        }
    }

    /// Creates the per-partition series at zero.
    pub fn initialize(&self, partitions: i32) {
        for p in 0..partitions {
            let p = p.to_string();
            self.partials.with_label_values(&[p.as_str()]);
            self.partial_events.with_label_values(&[p.as_str()]);
        }
        for reason in ["malformed", "window_closed"] {
            self.refused.with_label_values(&[reason]);
        }
    }
}

/// Why records are let go uncommitted (`strata_records_dropped_total{reason}`).
pub const DROP_REASONS: [&str; 6] = [
    "fenced",
    "revoked",
    "lost",
    "not_owned",
    "reseek",
    "shutdown",
];

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let metric =
        IntCounterVec::new(Opts::new(name, help), labels).expect("static metric definition");
    registry
        .register(Box::new(metric.clone()))
        .expect("metric registered once");
    metric
}

fn gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let metric = IntGaugeVec::new(Opts::new(name, help), labels).expect("static metric definition");
    registry
        .register(Box::new(metric.clone()))
        .expect("metric registered once");
    metric
}

fn float_gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    let metric = GaugeVec::new(Opts::new(name, help), labels).expect("static metric definition");
    registry
        .register(Box::new(metric.clone()))
        .expect("metric registered once");
    metric
}

fn histogram(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: Vec<f64>,
) -> HistogramVec {
    let metric = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
        .expect("static metric definition");
    registry
        .register(Box::new(metric.clone()))
        .expect("metric registered once");
    metric
}

impl Metrics {
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        let registry = Registry::new();
        let seconds = vec![
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        ];
        let sizes = prometheus::exponential_buckets(64.0 * 1024.0, 4.0, 8).expect("static buckets");
        let build = IntGaugeVec::new(
            Opts::new("strata_build_info", "Build of this replica (always 1)."),
            &["version", "git_sha"],
        )
        .expect("static metric definition");
        registry
            .register(Box::new(build.clone()))
            .expect("metric registered once");
        build
            .with_label_values(&[
                env!("CARGO_PKG_VERSION"),
                option_env!("STRATA_GIT_SHA").unwrap_or("unknown"),
            ])
            .set(1);
        let single_gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("static metric definition");
            registry
                .register(Box::new(g.clone()))
                .expect("metric registered once");
            g
        };
        let kafka_errors = IntCounter::new(
            "strata_kafka_errors_total",
            "Errors reported by the Kafka client.",
        )
        .expect("static");
        registry
            .register(Box::new(kafka_errors.clone()))
            .expect("metric registered once");
        let flush_duration = Histogram::with_opts(
            HistogramOpts::new(
                "strata_flush_duration_seconds",
                "Time from starting a flush to its Delta commit.",
            )
            .buckets(seconds.clone()),
        )
        .expect("static");
        registry
            .register(Box::new(flush_duration.clone()))
            .expect("metric registered once");
        Self {
            records_consumed: counter(
                &registry,
                "strata_records_consumed_total",
                "Bronze records read from Kafka.",
                &["topic"],
            ),
            bytes_consumed: counter(
                &registry,
                "strata_bytes_consumed_total",
                "Bytes of Bronze record values read.",
                &["topic"],
            ),
            records_written: counter(
                &registry,
                "strata_records_written_total",
                "Rows committed to a table.",
                &["table", "topic"],
            ),
            records_dropped: counter(
                &registry,
                "strata_records_dropped_total",
                "Records read but let go uncommitted, to be read again by their owner (fenced, revoked, lost, not owned, seek back, shutdown).",
                &["topic", "reason"],
            ),
            bytes_written: counter(
                &registry,
                "strata_bytes_written_total",
                "Bytes of Parquet files committed.",
                &["table"],
            ),
            records_late: counter(
                &registry,
                "strata_records_late_total",
                "Rows committed with an event time older than the table's watermark (every owned partition had already committed newer events): they change event hours readers may have taken as complete.",
                &["table"],
            ),
            end_to_end_latency: histogram(
                &registry,
                "strata_end_to_end_latency_seconds",
                "From a record's Kafka timestamp (from=kafka_timestamp) or event time (from=event_time) to the commit that made it visible in the table.",
                &["table", "from"],
                vec![
                    0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
                    7200.0, 21600.0, 86400.0,
                ],
            ),
            watermark_lag: float_gauge(
                &registry,
                "strata_watermark_lag_seconds",
                "Now minus the table's watermark: the lowest, over owned partitions, of the newest event time committed.",
                &["table"],
            ),
            last_commit: float_gauge(
                &registry,
                "strata_last_commit_timestamp_seconds",
                "Unix time of the table's last commit by this replica.",
                &["table"],
            ),
            ready: single_gauge(
                "strata_ready",
                "1 when /readyz answers 200 (assigned, registry and object store reachable, not shutting down).",
            ),
            records_buffered: gauge(
                &registry,
                "strata_records_buffered",
                "Decoded rows waiting for their commit. At any quiet moment, per topic: consumed = written + dead_lettered + skipped_duplicate + dropped + buffered.",
                &["topic", "table"],
            ),
            schema_evolutions: counter(
                &registry,
                "strata_schema_evolutions_total",
                "Newer reader schema versions met under STRATA_READER_SCHEMA=latest, by result (evolved, refused).",
                &["table", "result"],
            ),
            records_dead_lettered: counter(
                &registry,
                "strata_records_dead_lettered_total",
                "Records written to the dead-letter topic, by reason.",
                &["topic", "reason"],
            ),
            records_skipped_duplicate: counter(
                &registry,
                "strata_records_skipped_duplicate_total",
                "Records skipped because the table already holds their offset (replays).",
                &["topic"],
            ),
            commits: counter(
                &registry,
                "strata_commits_total",
                "Delta commits made.",
                &["table"],
            ),
            commit_duration: histogram(
                &registry,
                "strata_commit_duration_seconds",
                "Duration of a Delta commit including the ownership check.",
                &["table"],
                seconds,
            ),
            commit_conflicts: counter(
                &registry,
                "strata_commit_conflicts_total",
                "Delta commits that lost a race and were retried.",
                &["table"],
            ),
            commits_fenced: counter(
                &registry,
                "strata_commits_fenced_total",
                "Partitions whose buffered work was refused because another replica owns them.",
                &["table", "topic"],
            ),
            files_written: counter(
                &registry,
                "strata_files_written_total",
                "Parquet files committed.",
                &["table"],
            ),
            file_bytes: histogram(
                &registry,
                "strata_file_size_bytes",
                "Size of committed Parquet files.",
                &["table"],
                sizes,
            ),
            consumer_lag: gauge(
                &registry,
                "strata_consumer_lag",
                "Records between the high watermark and the committed offset.",
                &["topic", "partition"],
            ),
            committed_offset: gauge(
                &registry,
                "strata_committed_offset",
                "Last offset committed to the table, per partition.",
                &["topic", "partition"],
            ),
            assigned_partitions: single_gauge(
                "strata_assigned_partitions",
                "Partitions assigned to this replica.",
            ),
            rebalances: counter(
                &registry,
                "strata_rebalances_total",
                "Partition assignments and revocations.",
                &["kind"],
            ),
            buffered_bytes: single_gauge(
                "strata_buffered_bytes",
                "Bytes of decoded rows waiting for the next commit.",
            ),
            buffered_bytes_limit: single_gauge(
                "strata_buffered_bytes_limit",
                "Memory budget of the buffer (STRATA_FILE_MAX_BYTES).",
            ),
            registry_errors: counter(
                &registry,
                "strata_schema_registry_errors_total",
                "Failed schema registry requests.",
                &["kind"],
            ),
            schema_ids_seen: single_gauge(
                "strata_schema_ids_seen",
                "Distinct writer schema ids met.",
            ),
            flush_duration,
            kafka_errors,
            dead_letter_write_failures: counter(
                &registry,
                "strata_dead_letter_write_failures_total",
                "Failed attempts to write a dead letter (each is retried; the partition waits meanwhile).",
                &["topic"],
            ),
            dead_letter_blocked: gauge(
                &registry,
                "strata_dead_letter_topic_blocked",
                "1 while a dead-letter topic cannot be created or written: records of its Bronze topic that need it wait, and nothing commits past them.",
                &["topic"],
            ),
            gold: GoldMetrics::new(&registry),
            registry,
            not_ready: AtomicU8::new(NotReady::Starting as u8),
            blocked_dead_letters: Mutex::new(BTreeMap::new()),
        }
    }

    /// Marks `reason` as holding (`true`) or cleared (`false`).
    pub fn not_ready(&self, reason: NotReady, holds: bool) {
        if holds {
            self.not_ready.fetch_or(reason as u8, Ordering::Relaxed);
        } else {
            self.not_ready.fetch_and(!(reason as u8), Ordering::Relaxed);
        }
    }

    pub fn is_ready(&self) -> bool {
        self.not_ready.load(Ordering::Relaxed) == 0 && self.blocked_dead_letters().is_empty()
    }

    fn blocked_dead_letters(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, String>> {
        // The map stays consistent whatever a panicking holder did: every update is one call.
        self.blocked_dead_letters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The reasons that currently hold, for `/readyz`.
    pub fn not_ready_reasons(&self) -> Vec<String> {
        let bits = self.not_ready.load(Ordering::Relaxed);
        let mut reasons: Vec<String> = NotReady::ALL
            .iter()
            .filter(|r| bits & (**r as u8) != 0)
            .map(|r| r.as_str().to_string())
            .collect();
        reasons.extend(
            self.blocked_dead_letters()
                .iter()
                .map(|(topic, why)| format!("dead-letter topic {topic} cannot be written ({why})")),
        );
        reasons
    }

    pub fn render(&self) -> String {
        self.ready.set(i64::from(self.is_ready()));
        let mut buffer = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buffer) {
            tracing::warn!(error = %e, "encoding metrics");
        }
        String::from_utf8(buffer).unwrap_or_default()
    }

    // ---- Observable events: each logs and counts in one call. ----

    /// Exports a dead-letter topic's series at zero, so alerts and dashboards see them from the start.
    pub fn dead_letter_topic(&self, topic: &str) {
        self.dead_letter_write_failures.with_label_values(&[topic]);
        self.dead_letter_blocked.with_label_values(&[topic]);
    }

    /// A dead-letter topic Strata created because it was missing.
    pub fn dead_letter_topic_created(&self, topic: &str, partitions: i32, replication: &str) {
        tracing::info!(topic, partitions, replication, "dead-letter topic created");
    }

    /// A dead-letter topic cannot be used: creating it was refused, or writes to it fail or hang.
    /// The replica is not ready, naming the topic, until [`Self::dead_letter_writable`].
    pub fn dead_letter_blocked(&self, topic: &str, why: &str) {
        self.dead_letter_blocked.with_label_values(&[topic]).set(1);
        let previous = self
            .blocked_dead_letters()
            .insert(topic.to_string(), why.to_string());
        if previous.as_deref() != Some(why) {
            tracing::error!(
                topic,
                reason = why,
                "dead-letter topic cannot be written: records that need it wait, nothing commits past them, not ready"
            );
        }
    }

    /// One failed attempt to write a dead letter (it is retried).
    pub fn dead_letter_write_failed(&self, topic: &str, error: &str) {
        self.dead_letter_write_failures
            .with_label_values(&[topic])
            .inc();
        tracing::warn!(topic, error, "dead-letter write failed; retrying");
        self.dead_letter_blocked(topic, error);
    }

    /// A dead-letter topic exists and takes writes (again).
    pub fn dead_letter_writable(&self, topic: &str) {
        self.dead_letter_blocked.with_label_values(&[topic]).set(0);
        if self.blocked_dead_letters().remove(topic).is_some() {
            tracing::info!(topic, "dead-letter topic writable again");
        }
    }

    /// Rejected records of one chunk, acknowledged by the dead-letter topic: the counter moves by
    /// one per record and reason; one log line per chunk keeps a burst of bad input readable.
    pub fn dead_lettered(&self, tp: &TopicPartition, letters: &[(&SourceRecord, &Rejection)]) {
        let Some((first, why)) = letters.first() else {
            return;
        };
        let mut by_reason: BTreeMap<&'static str, u64> = BTreeMap::new();
        for (_, rejection) in letters {
            *by_reason.entry(rejection.kind.as_str()).or_default() += 1;
        }
        for (reason, count) in &by_reason {
            self.records_dead_lettered
                .with_label_values(&[tp.topic.as_ref(), reason])
                .inc_by(*count);
        }
        tracing::warn!(
            topic = %tp.topic,
            partition = tp.partition,
            count = letters.len(),
            reasons = ?by_reason,
            first_offset = first.offset,
            first_reason = why.kind.as_str(),
            first_message = %why.message,
            "records dead-lettered"
        );
    }

    /// A chunk of records read from Kafka.
    pub fn consumed(&self, tp: &TopicPartition, records: usize, bytes: usize) {
        self.records_consumed
            .with_label_values(&[tp.topic.as_ref()])
            .inc_by(records as u64);
        self.bytes_consumed
            .with_label_values(&[tp.topic.as_ref()])
            .inc_by(bytes as u64);
    }

    /// Creates every bounded label set a pipeline can use, at zero, so rates and alerts see the
    /// series before the first event (a counter that appears at 1 hides its first increase).
    pub fn initialize(&self, topics: &[String], tables: &[String]) {
        for topic in topics {
            let topic = topic.as_str();
            self.records_consumed.with_label_values(&[topic]);
            self.bytes_consumed.with_label_values(&[topic]);
            self.records_skipped_duplicate.with_label_values(&[topic]);
            for kind in crate::models::ErrorKind::ALL {
                self.records_dead_lettered
                    .with_label_values(&[topic, kind.as_str()]);
            }
            for reason in DROP_REASONS {
                self.records_dropped.with_label_values(&[topic, reason]);
            }
            for table in tables {
                self.records_written.with_label_values(&[table, topic]);
                self.commits_fenced.with_label_values(&[table, topic]);
            }
        }
        for table in tables {
            let table = table.as_str();
            self.commits.with_label_values(&[table]);
            self.commit_conflicts.with_label_values(&[table]);
            self.files_written.with_label_values(&[table]);
            self.bytes_written.with_label_values(&[table]);
            self.records_late.with_label_values(&[table]);
            for result in ["evolved", "refused"] {
                self.schema_evolutions.with_label_values(&[table, result]);
            }
        }
        for kind in ["assign", "revoke", "lost"] {
            self.rebalances.with_label_values(&[kind]);
        }
        for kind in crate::registry::RegistryError::KINDS {
            self.registry_errors.with_label_values(&[kind]);
        }
    }

    /// How long the rows of `batches` took to become visible (they were just committed), and how
    /// many of them are late: older than `watermark` (microseconds), which every owned partition
    /// had already passed, so they change hours readers may have taken as complete.
    pub fn visible(
        &self,
        table: &str,
        batches: &[RecordBatch],
        event_time_field: &str,
        watermark: Option<i64>,
    ) {
        let now = chrono::Utc::now().timestamp_micros();
        if let Some(watermark) = watermark {
            let late: usize = batches
                .iter()
                .filter_map(|b| {
                    b.column_by_name(event_time_field)
                        .and_then(|c| c.as_primitive_opt::<TimestampMicrosecondType>())
                })
                .map(|times| times.iter().flatten().filter(|t| *t < watermark).count())
                .sum();
            if late > 0 {
                self.records_late
                    .with_label_values(&[table])
                    .inc_by(late as u64);
                tracing::info!(
                    table,
                    late,
                    watermark,
                    "late rows committed behind the watermark"
                );
            }
        }
        for (from, column) in [
            ("kafka_timestamp", "_kafka_timestamp"),
            ("event_time", event_time_field),
        ] {
            let histogram = self.end_to_end_latency.with_label_values(&[table, from]);
            for batch in batches {
                let Some(times) = batch
                    .column_by_name(column)
                    .and_then(|c| c.as_primitive_opt::<TimestampMicrosecondType>())
                else {
                    continue;
                };
                for row in 0..times.len() {
                    if times.is_valid(row) {
                        let seconds = (now - times.value(row)) as f64 / 1e6;
                        histogram.observe(seconds.max(0.0));
                    }
                }
            }
        }
    }

    /// The table's watermark (the lowest newest-event-time over its owned partitions, in
    /// microseconds since the epoch).
    pub fn watermark(&self, table: &str, watermark_micros: i64) {
        let now = chrono::Utc::now().timestamp_micros();
        self.watermark_lag
            .with_label_values(&[table])
            .set((now - watermark_micros) as f64 / 1e6);
    }

    /// Records let go without a commit; their owner reads them again.
    pub fn dropped(&self, tp: &TopicPartition, reason: &'static str, records: usize) {
        if records == 0 {
            return;
        }
        self.records_dropped
            .with_label_values(&[tp.topic.as_ref(), reason])
            .inc_by(records as u64);
        tracing::info!(topic = %tp.topic, partition = tp.partition, reason, records, "uncommitted records let go; they are read again");
    }

    /// Rows buffered (`rows > 0`) or leaving the buffer (`rows < 0`).
    pub fn buffered(&self, tp: &TopicPartition, table: &str, rows: i64) {
        self.records_buffered
            .with_label_values(&[tp.topic.as_ref(), table])
            .add(rows);
    }

    pub fn schema_evolved(&self, table: &str, result: &'static str) {
        self.schema_evolutions
            .with_label_values(&[table, result])
            .inc();
    }

    pub fn committed(
        &self,
        table: &str,
        rows_by_topic: &BTreeMap<&str, u64>,
        version: i64,
        files: &[i64],
        elapsed: Duration,
        attempts: usize,
    ) {
        self.commits.with_label_values(&[table]).inc();
        for (topic, rows) in rows_by_topic {
            self.records_written
                .with_label_values(&[table, topic])
                .inc_by(*rows);
        }
        let rows: u64 = rows_by_topic.values().sum();
        self.bytes_written
            .with_label_values(&[table])
            .inc_by(files.iter().map(|s| (*s).max(0) as u64).sum());
        self.last_commit
            .with_label_values(&[table])
            .set(chrono::Utc::now().timestamp_millis() as f64 / 1000.0);
        self.files_written
            .with_label_values(&[table])
            .inc_by(files.len() as u64);
        for size in files {
            self.file_bytes
                .with_label_values(&[table])
                .observe(*size as f64);
        }
        self.commit_duration
            .with_label_values(&[table])
            .observe(elapsed.as_secs_f64());
        if attempts > 1 {
            self.commit_conflicts
                .with_label_values(&[table])
                .inc_by(attempts as u64 - 1);
        }
        tracing::info!(
            table,
            version,
            rows,
            files = files.len(),
            attempts,
            elapsed_ms = elapsed.as_millis() as u64,
            "delta commit"
        );
    }

    pub fn fenced(
        &self,
        table: &str,
        tp: &TopicPartition,
        expected: Option<i64>,
        stored: Option<i64>,
        dropped_rows: usize,
    ) {
        self.commits_fenced
            .with_label_values(&[table, tp.topic.as_ref()])
            .inc();
        tracing::warn!(
            table,
            topic = %tp.topic,
            partition = tp.partition,
            expected = ?expected,
            stored = ?stored,
            dropped_rows,
            "commit refused: partition fenced, another replica owns it; buffered work dropped"
        );
    }

    pub fn rebalanced(
        &self,
        kind: &'static str,
        partitions: &[TopicPartition],
        assigned_now: usize,
        counted: bool,
    ) {
        if counted {
            self.rebalances.with_label_values(&[kind]).inc();
            self.assigned_partitions.set(assigned_now as i64);
        }
        let list: Vec<String> = partitions.iter().map(ToString::to_string).collect();
        tracing::info!(kind, partitions = ?list, assigned_now, "rebalance");
    }

    /// The last offset held by the table for a partition (read on assignment, or just committed).
    pub fn progress(&self, tp: &TopicPartition, last_offset: i64) {
        self.committed_offset
            .with_label_values(&[tp.topic.as_ref(), &tp.partition.to_string()])
            .set(last_offset);
    }

    pub fn registry_error(&self, kind: &'static str, asked: &str, error: &str) {
        self.registry_errors.with_label_values(&[kind]).inc();
        tracing::warn!(asked, kind, error, "schema registry request failed");
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` until `shutdown` is cancelled.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, shutdown: CancellationToken) {
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics listener accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                    let metrics = metrics.clone();
                    async move {
                        Ok::<_, std::convert::Infallible>(route(&metrics, request.uri().path()))
                    }
                });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await
            {
                tracing::debug!(error = %e, "metrics connection ended");
            }
        });
    }
}

fn route(metrics: &Metrics, path: &str) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match path {
        "/metrics" => (
            StatusCode::OK,
            "text/plain; version=0.0.4",
            metrics.render(),
        ),
        // Alive as long as this endpoint answers.
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_string()),
        "/readyz" if metrics.is_ready() => (StatusCode::OK, "text/plain", "ready\n".to_string()),
        "/readyz" => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            format!("not ready: {}\n", metrics.not_ready_reasons().join(", ")),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_string(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = hyper::header::HeaderValue::from_str(content_type) {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

/// Binds the metrics endpoint (port 0 picks a free port; the bound address is returned).
pub async fn bind(addr: SocketAddr) -> std::io::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_record_latency_and_late_rows() {
        use deltalake::arrow::array::TimestampMicrosecondArray;
        use deltalake::arrow::datatypes::{DataType, Field, Schema, TimeUnit};
        let metrics = Metrics::new();
        metrics.initialize(&["orders".to_string()], &["order".to_string()]);
        let now = chrono::Utc::now().timestamp_micros();
        let ts = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
        let schema = Arc::new(Schema::new(vec![
            Field::new("event_time", ts.clone(), false),
            Field::new("_kafka_timestamp", ts, true),
        ]));
        let column = |values: Vec<i64>| {
            Arc::new(TimestampMicrosecondArray::from(values).with_timezone("UTC"))
                as deltalake::arrow::array::ArrayRef
        };
        let batch = RecordBatch::try_new(
            schema,
            vec![
                column(vec![now - 7_200_000_000, now - 60_000_000, now - 1_000_000]),
                column(vec![now - 2_000_000, now - 2_000_000, now - 2_000_000]),
            ],
        )
        .expect("batch");
        // One row (two hours old) is older than a watermark of ten minutes ago.
        metrics.visible("order", &[batch], "event_time", Some(now - 600_000_000));
        let text = metrics.render();
        assert!(
            text.contains("strata_records_late_total{table=\"order\"} 1"),
            "{text}"
        );
        let kafka = metrics
            .end_to_end_latency
            .with_label_values(&["order", "kafka_timestamp"]);
        assert_eq!(kafka.get_sample_count(), 3);
        assert!((kafka.get_sample_sum() - 6.0).abs() < 1.0);
        let event = metrics
            .end_to_end_latency
            .with_label_values(&["order", "event_time"]);
        assert!(event.get_sample_sum() > 7_200.0);
        // Initialized series exist at zero before anything happens.
        assert!(text.contains(
            "strata_records_dead_lettered_total{reason=\"incompatible_schema\",topic=\"orders\"} 0"
        ));
    }

    #[test]
    fn readiness_needs_every_reason_cleared() {
        let metrics = Metrics::new();
        assert!(!metrics.is_ready(), "not ready before start-up finished");
        metrics.not_ready(NotReady::Starting, false);
        assert!(metrics.is_ready());
        metrics.not_ready(NotReady::Registry, true);
        metrics.not_ready(NotReady::Lake, true);
        // The registry recovering does not make a replica ready whose lake is still down.
        metrics.not_ready(NotReady::Registry, false);
        assert!(!metrics.is_ready());
        assert_eq!(
            metrics.not_ready_reasons(),
            vec!["object store refuses writes"]
        );
        metrics.not_ready(NotReady::Lake, false);
        assert!(metrics.is_ready());
        assert_eq!(route(&metrics, "/readyz").status(), StatusCode::OK);
        metrics.not_ready(NotReady::ShuttingDown, true);
        assert_eq!(
            route(&metrics, "/readyz").status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(route(&metrics, "/healthz").status(), StatusCode::OK);
    }
}

//! The Prometheus registry of a replica and every series in it. Fields are private to `ops`:
//! the rest of the code reports events through the methods in [`super::events`], which count and
//! log in one call, and readiness through [`super::readiness`].

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use super::gold::GoldMetrics;
use super::readiness::Readiness;
use super::series::{counter, float_gauge, gauge, histogram};

pub struct Metrics {
    pub(super) registry: Registry,
    pub(super) records_consumed: IntCounterVec,
    pub(super) bytes_consumed: IntCounterVec,
    pub(super) records_written: IntCounterVec,
    pub(super) records_dead_lettered: IntCounterVec,
    pub(super) records_skipped_duplicate: IntCounterVec,
    pub(super) records_dropped: IntCounterVec,
    pub(super) bytes_written: IntCounterVec,
    pub(super) records_late: IntCounterVec,
    pub(super) end_to_end_latency: HistogramVec,
    pub(super) watermark_lag: GaugeVec,
    pub(super) last_commit: GaugeVec,
    pub(super) ready: IntGauge,
    pub(super) records_buffered: IntGaugeVec,
    pub(super) schema_evolutions: IntCounterVec,
    pub(super) commits: IntCounterVec,
    pub(super) commit_duration: HistogramVec,
    pub(super) commit_conflicts: IntCounterVec,
    pub(super) commits_fenced: IntCounterVec,
    pub(super) files_written: IntCounterVec,
    pub(super) file_bytes: HistogramVec,
    pub(super) consumer_lag: IntGaugeVec,
    pub(super) committed_offset: IntGaugeVec,
    pub(super) durable_lag: IntGaugeVec,
    /// The last offset in the table per partition, as `progress` reported it (for the durable lag).
    pub(super) progress_seen: std::sync::Mutex<std::collections::HashMap<(String, i32), i64>>,
    pub(super) assigned_partitions: IntGauge,
    pub(super) rebalances: IntCounterVec,
    pub(super) buffered_bytes: IntGauge,
    pub(super) buffered_bytes_limit: IntGauge,
    pub(super) registry_errors: IntCounterVec,
    pub(super) schema_ids_seen: IntGauge,
    pub(super) flush_duration: Histogram,
    pub(super) source_waiting: prometheus::Counter,
    pub(super) caught_up_flushes: prometheus::IntCounter,
    pub(super) kafka_errors: IntCounter,
    pub(super) checkpoint_version: IntGaugeVec,
    pub(super) maintenance: IntCounterVec,
    pub(super) table_files: IntGaugeVec,
    pub(super) dead_letter_write_failures: IntCounterVec,
    pub(super) dead_letter_blocked: IntGaugeVec,
    pub(super) gold: GoldMetrics,
    pub(super) readiness: Readiness,
}

/// Why records are let go uncommitted (`strata_records_dropped_total{reason}`).
pub const DROP_REASONS: [&str; 7] = [
    "fenced",
    "landed_in_doubt",
    "revoked",
    "lost",
    "not_owned",
    "reseek",
    "shutdown",
];

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
        let source_waiting = prometheus::Counter::new(
            "strata_source_waiting_seconds_total",
            "Seconds the Bronze source held fetched records the pipeline had no room for (it \
             waits up to 1 s, then pauses fetching): time consumption stood behind the pipeline.",
        )
        .expect("static");
        registry
            .register(Box::new(source_waiting.clone()))
            .expect("metric registered once");
        let caught_up_flushes = prometheus::IntCounter::new(
            "strata_flushes_caught_up_total",
            "Flushes started as soon as the replica had read every assigned partition to its \
             end, STRATA_FLUSH_INTERVAL after the last flush (not after the oldest row).",
        )
        .expect("static");
        registry
            .register(Box::new(caught_up_flushes.clone()))
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
                "Records read but let go uncommitted, to be read again by their owner (fenced, revoked, lost, not owned, seek back, shutdown), or held by this replica's own commit whose answer was lost (landed_in_doubt).",
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
                "Records between the end of the partition and the consumed position committed to \
                 the group (advisory, every second).",
                &["topic", "partition"],
            ),
            committed_offset: gauge(
                &registry,
                "strata_committed_offset",
                "Last offset committed to the table, per partition.",
                &["topic", "partition"],
            ),
            durable_lag: gauge(
                &registry,
                "strata_durable_lag",
                "Records between the end of the partition and the last offset in the table (owned \
                 partitions): what a crash would make this replica read again. The group's lag \
                 (strata_consumer_lag, and what KEDA reads) counts only what is not consumed yet.",
                &["topic", "partition"],
            ),
            progress_seen: Default::default(),
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
            source_waiting,
            caught_up_flushes,
            kafka_errors,
            checkpoint_version: gauge(
                &registry,
                "strata_checkpoint_version",
                "Version of the newest checkpoint this replica wrote, per table (start-up and txn lookups read from it).",
                &["table"],
            ),
            maintenance: counter(
                &registry,
                "strata_maintenance_total",
                "What table maintenance did, per table and action (passes, failures, log_files_removed, files_vacuumed, state_files_removed, files_compacted, bytes_compacted, compactions_given_way: a planned compaction that did not land, because another commit removed or changed its files or the table's metadata, kept coming first, or its commit failed).",
                &["table", "action"],
            ),
            table_files: gauge(
                &registry,
                "strata_table_state",
                "What the last maintenance pass saw per table: active_files (files the latest version references) and commits_since_checkpoint.",
                &["table", "what"],
            ),
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
            readiness: Readiness::default(),
        }
    }

    pub fn render(&self) -> String {
        self.ready.set(i64::from(self.is_ready()));
        let mut buffer = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buffer) {
            tracing::warn!(error = %e, "encoding metrics");
        }
        String::from_utf8(buffer).unwrap_or_default()
    }
}

//! Observable events: each is one call that counts and logs, so logs and metrics never drift
//! apart. Labels are bounded: topic, partition, table, reason; never a key.

use std::collections::BTreeMap;
use std::time::Duration;

use deltalake::arrow::array::{Array, AsArray, RecordBatch};
use deltalake::arrow::datatypes::TimestampMicrosecondType;

use crate::models::{Rejection, SourceRecord, TopicPartition};

use super::metrics::{Metrics, DROP_REASONS};

/// What `strata_maintenance_total` counts, per table.
const MAINTENANCE_ACTIONS: [&str; 8] = [
    "passes",
    "failures",
    "log_files_removed",
    "files_vacuumed",
    "state_files_removed",
    "files_compacted",
    "bytes_compacted",
    "compactions_given_way",
];

impl Metrics {
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
        if self.readiness.block_dead_letters(topic, why) {
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
        if self.readiness.unblock_dead_letters(topic) {
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
            self.checkpoint_version.with_label_values(&[table]);
            let maintained = format!("silver/{table}");
            for action in MAINTENANCE_ACTIONS {
                self.maintenance.with_label_values(&[&maintained, action]);
            }
        }
        for kind in ["assign", "revoke", "lost"] {
            self.rebalances.with_label_values(&[kind]);
        }
        for kind in crate::schema::registry::RegistryError::KINDS {
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
            // Observed per row into a local histogram, flushed once: no atomics per row.
            let histogram = self
                .end_to_end_latency
                .with_label_values(&[table, from])
                .local();
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
            histogram.flush();
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
        self.progress_seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert((tp.topic.to_string(), tp.partition), last_offset);
    }

    /// The end of an owned partition (from the client's statistics): its durable lag is what lies
    /// between that end and the table's last offset.
    pub fn partition_end(&self, topic: &str, partition: i32, end: i64) {
        let last = self
            .progress_seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&(topic.to_string(), partition))
            .copied();
        if let Some(last) = last {
            self.durable_lag
                .with_label_values(&[topic, &partition.to_string()])
                .set((end - last - 1).max(0));
        }
    }

    pub fn registry_error(&self, kind: &'static str, asked: &str, error: &str) {
        self.registry_errors.with_label_values(&[kind]).inc();
        tracing::warn!(asked, kind, error, "schema registry request failed");
    }

    /// A librdkafka error the client reported (it retries by itself).
    pub fn kafka_error(&self, error: &dyn std::fmt::Display, reason: &str) {
        self.kafka_errors.inc();
        tracing::warn!(error = %error, reason, "kafka client error");
    }

    /// The cluster refuses this client or cannot be reached (`why` names authentication, TLS
    /// trust, the mechanism, or that no broker answers): not ready until [`Self::kafka_reachable`].
    /// librdkafka keeps reconnecting with its backoff meanwhile. A `specific` cause
    /// (authentication, TLS) is not replaced by the "no broker reachable" that follows it.
    pub fn kafka_refused(&self, why: &str, specific: bool) {
        if self.readiness.set_kafka_problem(Some((why, specific))) {
            tracing::error!(
                reason = why,
                "kafka cluster refuses this replica or cannot be reached: not ready, retrying"
            );
        }
    }

    /// A broker connection is up (authenticated): clears [`Self::kafka_refused`] once no refusal
    /// was reported for two statistics intervals.
    pub fn kafka_reachable(&self) {
        if self
            .readiness
            .clear_kafka_problem_after(Duration::from_secs(10))
        {
            tracing::info!("kafka cluster reachable again");
        }
    }

    /// The consumer lag librdkafka's statistics report for one partition.
    pub fn consumer_lag(&self, topic: &str, partition: i32, lag: i64) {
        self.consumer_lag
            .with_label_values(&[topic, &partition.to_string()])
            .set(lag);
    }

    /// A writer schema id met for the first time.
    pub fn schema_id_seen(&self) {
        self.schema_ids_seen.inc();
    }

    /// Bytes buffered in all tables, against the budget.
    pub fn buffered_bytes(&self, bytes: usize) {
        self.buffered_bytes.set(bytes as i64);
    }

    /// The buffer's byte budget (`STRATA_FILE_MAX_BYTES`).
    pub fn buffered_bytes_limit(&self, bytes: usize) {
        self.buffered_bytes_limit.set(bytes as i64);
    }

    /// Gold's series.
    pub fn gold(&self) -> &super::gold::GoldMetrics {
        &self.gold
    }

    /// A flush finished (files written and committed) after `took`.
    pub fn flushed(&self, took: Duration) {
        self.flush_duration.observe(took.as_secs_f64());
    }

    /// A flush started early: the replica caught up with enough rows waiting.
    pub fn caught_up_flush(&self) {
        self.caught_up_flushes.inc();
    }

    /// Flushes started early because the replica caught up, so far.
    pub fn caught_up_flushes(&self) -> u64 {
        self.caught_up_flushes.get()
    }

    /// Records skipped because a table already holds their offsets (replays).
    pub fn skipped_duplicates(&self, tp: &TopicPartition, records: usize) {
        self.records_skipped_duplicate
            .with_label_values(&[tp.topic.as_ref()])
            .inc_by(records as u64);
    }

    /// The Bronze source waited this long for room in the pipeline.
    pub fn source_waited(&self, waited: Duration) {
        self.source_waiting.inc_by(waited.as_secs_f64());
    }

    /// Seconds the Bronze source waited for room in the pipeline so far.
    pub fn source_waiting_seconds(&self) -> f64 {
        self.source_waiting.get()
    }

    /// Flushes so far, and the seconds they took in all.
    pub fn flush_seconds(&self) -> (u64, f64) {
        (
            self.flush_duration.get_sample_count(),
            self.flush_duration.get_sample_sum(),
        )
    }

    /// Records read from Kafka so far, over every topic (`strata_records_consumed_total`).
    pub fn records_consumed(&self) -> u64 {
        use prometheus::core::Collector;
        self.records_consumed
            .collect()
            .iter()
            .flat_map(|family| family.get_metric())
            .map(|m| m.get_counter().get_value() as u64)
            .sum()
    }

    /// The group offset last committed for a partition (the next offset), if any.
    pub fn committed_offset(&self, topic: &str, partition: i32) -> Option<i64> {
        let gauge = self
            .committed_offset
            .get_metric_with_label_values(&[topic, &partition.to_string()])
            .ok()?;
        Some(gauge.get())
    }

    /// Marks `reason` as holding (`true`) or cleared (`false`).
    pub fn not_ready(&self, reason: super::NotReady, holds: bool) {
        self.readiness.set(reason, holds);
    }

    /// Stage 2 stopped a partials partition: its next offset is outside what the topic holds.
    pub fn gold_partials_lost(&self, tp: &TopicPartition, next: i64, earliest: i64, end: i64) {
        let why = format!(
            "gold partials partition {tp} stopped: its next offset {next} is not in the topic \
             (which holds {earliest}..{end}); partials were deleted (retention) or the topic was \
             recreated, so Gold cannot be exact from here"
        );
        tracing::error!(partition = %tp, next, earliest, end, "{why}");
        if self
            .readiness
            .set_problem(&format!("partials {tp}"), Some(&why))
        {
            self.gold.partials_lost.inc();
        }
    }

    /// A stopped partials partition is no longer stopped here (revoked, or sought into range).
    pub fn gold_partials_resumed(&self, tp: &TopicPartition) {
        if self.readiness.set_problem(&format!("partials {tp}"), None) {
            self.gold.partials_lost.dec();
            tracing::info!(partition = %tp, "gold partials partition no longer stopped here");
        }
    }

    /// Stage 2 stopped taking a partials partition at `offset`: the replica's Gold state holds
    /// `state` bytes, at its budget.
    pub fn gold_state_budget_reached(
        &self,
        tp: &TopicPartition,
        offset: i64,
        state: usize,
        budget: usize,
    ) {
        let why = format!(
            "gold partials partition {tp} held at offset {offset}: Gold state holds {state} bytes \
             and STRATA_GOLD_STATE_MAX_BYTES is {budget}; it takes partials again below 90 % of \
             it (closed rows committed, partitions leaving this replica), which a window that \
             needs more than the budget never reaches by itself: raise \
             STRATA_GOLD_STATE_MAX_BYTES and the pod's memory with it, or add replicas"
        );
        tracing::warn!(partition = %tp, offset, state, budget, "{why}");
        if self
            .readiness
            .set_problem(&format!("gold state {tp}"), Some(&why))
        {
            self.gold.partitions_held.inc();
        }
    }

    /// A partials partition held at the budget takes messages again here (or left).
    pub fn gold_state_budget_released(&self, tp: &TopicPartition) {
        if self
            .readiness
            .set_problem(&format!("gold state {tp}"), None)
        {
            self.gold.partitions_held.dec();
        }
    }

    /// The flush's store refuses writes (`Some`: which and why, for `/readyz`) or takes them again.
    pub fn lake_refuses(&self, why: Option<&str>) {
        self.readiness.set_lake_problem(why);
    }

    /// Gold's partials topic refuses an epoch's messages (`Some`: which and why, for `/readyz`),
    /// or took a flush's again.
    pub fn partials_refused(&self, why: Option<&str>) {
        let why = why.map(|why| format!("gold partials topic refuses sends: {why}"));
        self.readiness
            .set_problem("gold partials topic", why.as_deref());
    }

    pub fn is_ready(&self) -> bool {
        self.readiness.is_ready()
    }

    /// The reasons that currently hold, for `/readyz`.
    pub fn not_ready_reasons(&self) -> Vec<String> {
        self.readiness.reasons()
    }

    /// A checkpoint was written after commit `version` of `table`.
    pub fn checkpointed(&self, table: &str, version: i64) {
        self.checkpoint_version
            .with_label_values(&[table])
            .set(version);
    }

    /// One maintenance pass over a table: what it removed, or that it failed.
    pub fn maintained(
        &self,
        table: &str,
        outcome: Result<&crate::lake::maintenance::Report, &str>,
    ) {
        let count = |action: &'static str, n: usize| {
            self.maintenance
                .with_label_values(&[table, action])
                .inc_by(n as u64);
        };
        match outcome {
            Ok(report) => {
                count("passes", 1);
                count("log_files_removed", report.log_files_removed);
                count("files_vacuumed", report.files_vacuumed);
                count("state_files_removed", report.state_files_removed);
                count("files_compacted", report.compacted.files_removed);
                count("compactions_given_way", report.compacted.gave_way);
                let state = |what: &str, n: i64| {
                    self.table_files.with_label_values(&[table, what]).set(n);
                };
                state(
                    "active_files",
                    i64::try_from(report.active_files).unwrap_or(i64::MAX),
                );
                state("commits_since_checkpoint", report.since_checkpoint);
                count(
                    "bytes_compacted",
                    usize::try_from(report.compacted.bytes_removed).unwrap_or(usize::MAX),
                );
                tracing::info!(
                    table,
                    version = report.version,
                    log_files_removed = report.log_files_removed,
                    files_vacuumed = report.files_vacuumed,
                    state_files_removed = report.state_files_removed,
                    files_compacted = report.compacted.files_removed,
                    active_files = report.active_files,
                    commits_since_checkpoint = report.since_checkpoint,
                    files_written = report.compacted.files_added,
                    compactions_given_way = report.compacted.gave_way,
                    "table maintained"
                );
            }
            Err(error) => {
                count("failures", 1);
                tracing::warn!(
                    table,
                    error,
                    "table maintenance failed; tried again next pass"
                );
            }
        }
    }
}

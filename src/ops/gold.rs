//! Gold's metrics (stage 1 and stage 2); all zero when Gold is off.

use prometheus::{Gauge, IntCounter, IntCounterVec, IntGauge, Registry};

use super::series::counter;

/// Gold's metrics (stage 1 and stage 2); all zero when Gold is off.
pub struct GoldMetrics {
    pub(super) events: IntCounter,
    pub(super) partials: IntCounterVec,
    pub(super) partial_events: IntCounterVec,
    pub(super) hot_keys: IntGauge,
    pub(super) salted_partials: IntCounter,
    pub(super) late_events: IntCounter,
    pub(super) source_watermark_lag: Gauge,
    pub(super) windows_emitted: IntCounter,
    pub(super) watermark_lag: Gauge,
    pub(super) open_windows: IntGauge,
    pub(super) duplicates: IntCounter,
    pub(super) refused: IntCounterVec,
    pub(super) forwarded: IntCounter,
    pub(super) commits: IntCounter,
    pub(super) partials_lost: IntGauge,
    pub(super) state_bytes: IntGauge,
    pub(super) partitions_held: IntGauge,
}

impl GoldMetrics {
    pub(super) fn new(registry: &Registry) -> Self {
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
            state_bytes: level("strata_gold_state_bytes", "Bytes of Gold state stage 2 holds on this replica (open groups, results held for the merge, closed rows waiting for their commit), estimated from their keys and accumulators; HyperLogLogs are sparse while small."),
            partitions_held: level("strata_gold_partials_partitions_held", "Partials partitions stage 2 stopped taking because this replica's Gold state reached STRATA_GOLD_STATE_MAX_BYTES; they resume below 90 % of it."),
            partials_lost: level("strata_gold_partials_partitions_stopped", "Partials partitions stage 2 stopped because their next offset is no longer in the topic (retention, a recreated topic): Gold for their keys waits for an operator."),
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

    /// Stage 1 sent one epoch of a source partition: its events, salted partials, late rows and
    /// the load per partials partition (partials, events).
    pub fn epoch_sent(
        &self,
        events: u64,
        salted: u64,
        late: u64,
        load: impl IntoIterator<Item = (i32, (u64, u64))>,
    ) {
        self.events.inc_by(events);
        self.salted_partials.inc_by(salted);
        self.late_events.inc_by(late);
        for (partition, (count, events)) in load {
            let p = partition.to_string();
            self.partials.with_label_values(&[p.as_str()]).inc_by(count);
            self.partial_events
                .with_label_values(&[p.as_str()])
                .inc_by(events);
        }
    }

    /// Keys salted in the latest epochs of the owned source partitions.
    pub fn hot_keys(&self, keys: usize) {
        self.hot_keys.set(keys as i64);
    }

    /// The lowest watermark among the owned source partitions (stage 1).
    pub fn source_watermark(&self, watermark_micros: i64) {
        let now = chrono::Utc::now().timestamp_micros();
        self.source_watermark_lag
            .set(now.saturating_sub(watermark_micros) as f64 / 1e6);
    }

    /// A partials-topic message stage 2 could not use (`malformed`, `window_closed`).
    pub fn partial_refused(&self, reason: &'static str, count: u64) {
        self.refused.with_label_values(&[reason]).inc_by(count);
    }

    /// What merging a message did: replays dropped, salted sub-results forwarded.
    pub fn merged(&self, duplicates: u64, forwarded: u64) {
        self.duplicates.inc_by(duplicates);
        self.forwarded.inc_by(forwarded);
    }

    /// Stage 2's state: open groups, and the lowest operator watermark if any.
    pub fn stage2_state(&self, open: usize, watermark_micros: Option<i64>) {
        self.open_windows.set(open as i64);
        if let Some(w) = watermark_micros {
            let now = chrono::Utc::now().timestamp_micros();
            self.watermark_lag.set(now.saturating_sub(w) as f64 / 1e6);
        }
    }

    /// Stage 2's state, measured.
    pub fn state_bytes(&self, bytes: usize) {
        self.state_bytes.set(bytes as i64);
    }

    /// A Gold commit with `windows` rows.
    pub fn gold_committed(&self, windows: usize) {
        self.commits.inc();
        self.windows_emitted.inc_by(windows as u64);
    }

    /// A reading of Gold's counters, for the demo's summary.
    pub fn snapshot(&self, partitions: i32) -> GoldSnapshot {
        let per_partition = |vec: &IntCounterVec| -> Vec<u64> {
            (0..partitions)
                .map(|p| vec.with_label_values(&[p.to_string().as_str()]).get())
                .collect()
        };
        GoldSnapshot {
            events: self.events.get(),
            salted_partials: self.salted_partials.get(),
            partials: per_partition(&self.partials),
            partial_events: per_partition(&self.partial_events),
            open_windows: self.open_windows.get(),
            windows_emitted: self.windows_emitted.get(),
            watermark_lag_seconds: self.watermark_lag.get(),
            commits: self.commits.get(),
        }
    }
}

/// Gold's counters at one moment.
#[derive(Debug, Clone, Default)]
pub struct GoldSnapshot {
    pub events: u64,
    pub salted_partials: u64,
    /// Per partials partition.
    pub partials: Vec<u64>,
    pub partial_events: Vec<u64>,
    pub open_windows: i64,
    pub windows_emitted: u64,
    pub watermark_lag_seconds: f64,
    pub commits: u64,
}

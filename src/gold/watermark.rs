//! Watermarks in event time. Each source partition's watermark is the largest event time it has
//! delivered minus the allowed out-of-orderness (`STRATA_WATERMARK_DELAY`); the operator's is the
//! minimum over partitions that are not idle. A partition that delivered nothing for the idle
//! timeout stops holding the others back, and counts again with its next record.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::models::TopicPartition;

#[derive(Debug)]
pub struct Watermarks {
    delay: i64,
    idle_after: Duration,
    partitions: HashMap<TopicPartition, (i64, Instant)>,
    /// Never moves back, even when a partition joins with older data.
    emitted: Option<i64>,
}

impl Watermarks {
    pub fn new(delay: Duration, idle_after: Duration) -> Self {
        Self {
            delay: i64::try_from(delay.as_micros()).unwrap_or(i64::MAX),
            idle_after,
            partitions: HashMap::new(),
            emitted: None,
        }
    }

    /// A partition delivered events up to `max_event_time` (microseconds) at `now`.
    pub fn observe(&mut self, tp: &TopicPartition, max_event_time: i64, now: Instant) {
        let entry = self
            .partitions
            .entry(tp.clone())
            .or_insert((max_event_time, now));
        entry.0 = entry.0.max(max_event_time);
        entry.1 = now;
    }

    /// A partition was revoked: it no longer holds the watermark back.
    pub fn forget(&mut self, tp: &TopicPartition) {
        self.partitions.remove(tp);
    }

    /// The operator's watermark at `now`: events at or before it are complete, except for
    /// allowed lateness. `None` until some partition delivered something.
    pub fn current(&mut self, now: Instant) -> Option<i64> {
        let active = self
            .partitions
            .values()
            .filter(|(_, seen)| now.duration_since(*seen) < self.idle_after)
            .map(|(max, _)| max.saturating_sub(self.delay))
            .min();
        // All idle: the newest of them stands (time does not run ahead of the data).
        let candidate = active.or_else(|| {
            self.partitions
                .values()
                .map(|(max, _)| max.saturating_sub(self.delay))
                .max()
        })?;
        let next = self.emitted.map_or(candidate, |e| e.max(candidate));
        self.emitted = Some(next);
        Some(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tp(p: i32) -> TopicPartition {
        TopicPartition::new("t", p)
    }

    #[test]
    fn the_slowest_active_partition_decides_and_idle_ones_do_not_stall() {
        let start = Instant::now();
        let mut w = Watermarks::new(Duration::from_secs(5), Duration::from_secs(30));
        assert_eq!(w.current(start), None);
        w.observe(&tp(0), 100_000_000, start);
        w.observe(&tp(1), 60_000_000, start);
        assert_eq!(w.current(start), Some(55_000_000));
        // Partition 1 goes quiet; after the idle timeout partition 0 alone decides.
        w.observe(&tp(0), 200_000_000, start + Duration::from_secs(31));
        assert_eq!(
            w.current(start + Duration::from_secs(31)),
            Some(195_000_000)
        );
        // Partition 1 wakes up with old data: the watermark never moves back.
        w.observe(&tp(1), 70_000_000, start + Duration::from_secs(32));
        assert_eq!(
            w.current(start + Duration::from_secs(32)),
            Some(195_000_000)
        );
    }

    proptest! {
        /// The watermark never decreases and never passes the slowest active partition's
        /// events minus the delay (unless it was already there).
        #[test]
        fn progress_is_monotonic(steps in prop::collection::vec((0i32..4, 0i64..1_000_000_000, 0u64..40), 1..200)) {
            let start = Instant::now();
            let mut w = Watermarks::new(Duration::from_secs(1), Duration::from_secs(20));
            let mut last: Option<i64> = None;
            let mut clock = 0u64;
            for (p, t, dt) in steps {
                clock += dt;
                let now = start + Duration::from_secs(clock);
                w.observe(&tp(p), t, now);
                let current = w.current(now);
                prop_assert!(current.is_some());
                if let (Some(a), Some(b)) = (last, current) {
                    prop_assert!(b >= a, "watermark moved back from {} to {}", a, b);
                }
                last = current;
            }
        }
    }
}

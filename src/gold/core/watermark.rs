//! Watermarks in event time, as stage 1 keeps them per source partition: the newest event time
//! seen minus the allowed out-of-orderness (`STRATA_WATERMARK_DELAY`), never moving back. Each row
//! meets the watermark left by the rows before it in offset order, so whether a row is late is a
//! function of the partition's log alone (and a replay decides the same). The operator watermark,
//! the minimum over every source partition, is stage 2's (`stage2::Merger::watermark`).

/// The watermark each of `times` (event times in offset order, microseconds; `None` for a row
/// without one) meets, starting from `start`, and the watermark after the last of them.
pub fn before_each(
    start: Option<i64>,
    times: impl IntoIterator<Item = Option<i64>>,
    delay: i64,
) -> (Vec<Option<i64>>, Option<i64>) {
    let mut watermark = start;
    let mut before = Vec::new();
    for t in times {
        before.push(watermark);
        if let Some(t) = t {
            let w = t.saturating_sub(delay);
            watermark = Some(watermark.map_or(w, |m| m.max(w)));
        }
    }
    (before, watermark)
}

/// The time a row moves its partition's watermark with: its event time, but never more than
/// `max_skew` ahead of the timestamp its Kafka record carries (`logged`, the producer's or the
/// broker's clock when the record was written), nor ahead of `clock`, the replica's clock when the
/// Silver commit holding the row was made (recorded in that commit, so a replay reads the same
/// value back). An event dated a day ahead still counts in its own window; it just does not drag
/// the watermark a day ahead and make every event after it late, whether the event's field or
/// its producer's clock (and so its record's timestamp) is wrong. Every input comes from the log,
/// so a replay decides exactly the same.
pub fn bounded(
    event: Option<i64>,
    logged: Option<i64>,
    clock: Option<i64>,
    max_skew: i64,
) -> Option<i64> {
    let limit = |t: i64, bound: Option<i64>| bound.map_or(t, |b| t.min(b.saturating_add(max_skew)));
    event.map(|t| limit(limit(t, logged), clock))
}

/// Low bits of a recorded clock that carry the offset of the commit recording it (about a
/// second of clock precision: `STRATA_MAX_EVENT_TIME_SKEW` is seconds).
const CLOCK_OFFSET_BITS: u32 = 20;
const CLOCK_OFFSET_MASK: i64 = (1 << CLOCK_OFFSET_BITS) - 1;

/// The clock a commit of a partition's offsets up to `last` records (the `txn` version of
/// Gold's clock): `clock` (microseconds) rounded down to about a second, its low bits the low
/// bits of `last`. [`recorded_clock`] only accepts it back for that offset, so a commit that
/// recorded no clock (a replica of an older version) cannot lend an earlier commit's clock to a
/// replay of its epoch.
pub fn clock_version(clock: i64, last: i64) -> i64 {
    (clock & !CLOCK_OFFSET_MASK) | (last & CLOCK_OFFSET_MASK)
}

/// The clock in `version` when it was recorded by the commit of offsets up to `last`; the same
/// value [`clock_version`] bounds the first run with.
pub fn recorded_clock(version: i64, last: i64) -> Option<i64> {
    (version & CLOCK_OFFSET_MASK == last & CLOCK_OFFSET_MASK)
        .then_some(version & !CLOCK_OFFSET_MASK)
}

/// Whether a window ending at `window_end` is final for a row that meets `watermark`: the
/// watermark has reached its end plus the allowed lateness.
pub fn is_final(window_end: i64, lateness: i64, watermark: Option<i64>) -> bool {
    watermark.is_some_and(|w| window_end.saturating_add(lateness) <= w)
}

/// The smallest watermark that makes final every window `t` makes final: window ends are
/// multiples of the slide, so only the last multiple of the slide plus the lateness at or before
/// `t` matters. An idle source partition moves its watermark in these steps, so it commits once
/// per slide rather than at every idle check, and closes the same windows at the same moment.
pub fn closing_step(slide: i64, lateness: i64, t: i64) -> i64 {
    t.saturating_sub(lateness).div_euclid(slide.max(1)) * slide.max(1) + lateness
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// A watermark at the closing step finalises exactly the windows `t` finalises.
        #[test]
        fn the_closing_step_finalises_the_same_windows(
            slide in 1i64..10_000_000,
            lateness in 0i64..100_000_000,
            t in -1_000_000_000i64..1_000_000_000_000,
            k in -1_000i64..1_000_000,
        ) {
            let step = closing_step(slide, lateness, t);
            prop_assert!(step <= t);
            let end = k * slide;
            prop_assert_eq!(is_final(end, lateness, Some(t)), is_final(end, lateness, Some(step)));
        }
    }

    #[test]
    fn a_future_dated_event_moves_the_watermark_only_to_its_log_time_plus_the_skew() {
        const DAY: i64 = 86_400_000_000;
        let now = 1_700_000_000_000_000;
        let skew = 10_000_000;
        assert_eq!(
            bounded(Some(now + DAY), Some(now), None, skew),
            Some(now + skew)
        );
        assert_eq!(bounded(Some(now - 5), Some(now), None, skew), Some(now - 5));
        assert_eq!(bounded(Some(now + DAY), None, None, skew), Some(now + DAY));
        assert_eq!(bounded(None, Some(now), Some(now), skew), None);
        // A producer whose clock runs a day ahead stamps its records a day ahead too: the
        // replica's clock at the commit bounds it.
        assert_eq!(
            bounded(Some(now + DAY), Some(now + DAY), Some(now), skew),
            Some(now + skew)
        );
        assert_eq!(
            bounded(Some(now + DAY), None, Some(now), skew),
            Some(now + skew)
        );
        assert_eq!(
            bounded(Some(now - 5), Some(now + DAY), Some(now), skew),
            Some(now - 5)
        );
        let clock = Some(now);
        // Thirty events a day ahead, then ordinary ones: those meet a watermark behind them.
        let delay = 5_000_000;
        let times = (0..30)
            .map(|i| bounded(Some(now + DAY + i), Some(now + i), clock, skew))
            .chain(
                (0..100)
                    .map(|i| bounded(Some(now + 1_000 * i), Some(now + 1_000 * i), clock, skew)),
            );
        let (before, _) = before_each(None, times, delay);
        for (i, w) in before.iter().enumerate().skip(30) {
            // Never past the newest log time plus the skew, minus the delay.
            assert!(
                w.is_some_and(|w| w <= now + 29 + skew - delay),
                "{i}: {w:?}"
            );
            // So the one-minute window holding each ordinary event (now is 20 s into a minute)
            // is still open for it.
            let event = now + 1_000 * (i as i64 - 30);
            let end = (event.div_euclid(60_000_000) + 1) * 60_000_000;
            assert!(!is_final(end, 0, *w), "{i}: {w:?}");
        }
    }

    #[test]
    fn a_recorded_clock_is_read_back_only_for_its_own_commit() {
        let clock = 1_700_000_000_123_456;
        for last in [0, 7, 1 << 20, (1 << 40) + 12_345, i64::MAX - 1] {
            let version = clock_version(clock, last);
            let back = recorded_clock(version, last).expect("its own commit");
            assert!(
                back <= clock && clock - back < 1_100_000,
                "{back} for {clock}"
            );
            assert_eq!(recorded_clock(version, last + 1), None);
            assert_eq!(recorded_clock(version, last - 1), None);
        }
    }

    #[test]
    fn rows_meet_the_watermark_of_the_rows_before_them() {
        let (before, after) = before_each(None, [Some(100), Some(50), None, Some(300)], 10);
        assert_eq!(before, [None, Some(90), Some(90), Some(90)]);
        assert_eq!(after, Some(290));
        assert!(!is_final(100, 0, None));
        assert!(is_final(90, 0, Some(90)));
        assert!(!is_final(90, 1, Some(90)));
    }

    proptest! {
        /// The watermark never moves back, is exactly the newest event so far minus the delay
        /// (or the start), and splitting the rows into epochs (each starting from the previous
        /// one's end) changes nothing.
        #[test]
        fn progress_is_monotonic_and_epochs_do_not_matter(
            times in prop::collection::vec(prop::option::weighted(0.9, -1_000_000i64..1_000_000_000), 0..300),
            start in prop::option::of(-1_000_000i64..1_000_000_000),
            delay in 0i64..10_000_000,
            cut in any::<prop::sample::Index>(),
        ) {
            let (before, after) = before_each(start, times.iter().copied(), delay);
            let mut newest: Option<i64> = None;
            let mut last = start;
            for (t, w) in times.iter().zip(&before) {
                let expected = match (start, newest) {
                    (Some(s), Some(n)) => Some(s.max(n - delay)),
                    (s, None) => s,
                    (None, Some(n)) => Some(n - delay),
                };
                prop_assert_eq!(*w, expected);
                prop_assert!(w.is_none() || last.is_none() || *w >= last);
                last = *w;
                if let Some(t) = t {
                    newest = Some(newest.map_or(*t, |n| n.max(*t)));
                }
            }
            prop_assert!(after >= last);
            let at = if times.is_empty() { 0 } else { cut.index(times.len()) };
            let (first, middle) = before_each(start, times[..at].iter().copied(), delay);
            let (second, end) = before_each(middle, times[at..].iter().copied(), delay);
            prop_assert_eq!([first, second].concat(), before);
            prop_assert_eq!(end, after);
        }
    }
}

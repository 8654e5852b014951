//! Stage 2 of Gold for one partials partition: merges partials per (window, key, salt), drops what
//! a replay of stage 1 sends again (per source partition, partials arrive in order, so a high-water
//! mark of (epoch end, sequence) recognises them), follows each source partition's watermark from
//! the markers stage 1 sends after every epoch, and closes a window once the watermark passes its
//! end plus the allowed lateness. Pure: the caller consumes, commits and writes.

use std::collections::{BTreeMap, HashMap};

use super::aggregate::{Accumulator, Aggregate};
use super::partial::{BatchItem, KeyValue, Partial};
use super::window::WindowSpec;

/// A source partition (topic, partition).
pub type Source = (String, i32);

/// What became of an offered partial.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offered {
    Merged,
    /// Already merged (a replay of stage 1): dropped.
    Duplicate,
    /// Its window is closed already: the caller routes it to the late table.
    WindowClosed,
}

/// A closed window's result for one key (and salt; 0 when not salted).
#[derive(Debug, Clone)]
pub struct Closed {
    pub window_start: i64,
    pub window_end: i64,
    pub key: Vec<KeyValue>,
    pub salt: u16,
    pub accumulator: Accumulator,
}

impl Closed {
    /// What it holds while it waits for its commit, estimated: itself, its key and accumulator.
    pub fn bytes(&self) -> usize {
        std::mem::size_of::<Closed>()
            + KeyValue::heap_bytes(&self.key)
            + self.accumulator.heap_bytes()
    }
}

type Slot = (i64, Vec<KeyValue>, u16);

/// Takes the entries of `map` before the first one `ready` refuses, leaving the rest: for maps
/// ordered so that the ready entries come first (by window start). Nothing is copied.
pub(super) fn split_prefix<K: Ord + Clone, V>(
    map: &mut BTreeMap<K, V>,
    ready: impl Fn(&K) -> bool,
) -> BTreeMap<K, V> {
    match map.keys().find(|k| !ready(k)).cloned() {
        Some(first_waiting) => {
            let waiting = map.split_off(&first_waiting);
            std::mem::replace(map, waiting)
        }
        None => std::mem::take(map),
    }
}

fn closed_of(window: WindowSpec) -> impl Fn((Slot, Accumulator)) -> Closed {
    move |((start, key, salt), accumulator)| Closed {
        window_start: start,
        window_end: window.end(start),
        key,
        salt,
        accumulator,
    }
}

#[derive(Debug, Clone, Copy)]
struct Mark {
    watermark: i64,
    idle: bool,
}

/// What one entry of an ordered map of groups takes besides its key's and accumulator's heap:
/// the key and value inline, plus the tree's share (about a third of a node per entry).
pub const ENTRY_BYTES: usize =
    std::mem::size_of::<(i64, Vec<KeyValue>, u16)>() + std::mem::size_of::<Accumulator>() + 16;

/// What one open group costs, estimated: its entry, its key's heap and its accumulator's heap.
fn group_bytes(key: &[KeyValue], accumulator: &Accumulator) -> usize {
    ENTRY_BYTES + KeyValue::heap_bytes(key) + accumulator.heap_bytes()
}

#[derive(Debug)]
pub struct Merger {
    window: WindowSpec,
    lateness: i64,
    aggregates: Vec<Aggregate>,
    open: BTreeMap<Slot, Accumulator>,
    /// What `open` holds, estimated ([`group_bytes`] summed), kept as groups come and go: stage 2
    /// checks it against its budget before every message.
    bytes: usize,
    seen: HashMap<Source, (i64, u32)>,
    marks: HashMap<Source, Mark>,
    /// Windows whose end + lateness is at or below this are closed.
    closed_through: Option<i64>,
    /// Source partitions that must have marked before any window closes (all partitions of the
    /// Bronze topics): a source not heard from yet could still send partials for any window.
    expected: Vec<Source>,
}

impl Merger {
    pub fn new(window: WindowSpec, allowed_lateness: i64, aggregates: Vec<Aggregate>) -> Self {
        Self {
            window,
            lateness: allowed_lateness.max(0),
            aggregates,
            open: BTreeMap::new(),
            bytes: 0,
            seen: HashMap::new(),
            marks: HashMap::new(),
            closed_through: None,
            expected: Vec::new(),
        }
    }

    /// Sets the source partitions every one of which must have marked before windows close.
    pub fn expect(&mut self, sources: Vec<Source>) {
        self.expected = sources;
    }

    pub fn closed_through(&self) -> Option<i64> {
        self.closed_through
    }

    pub fn window(&self) -> WindowSpec {
        self.window
    }

    pub fn lateness(&self) -> i64 {
        self.lateness
    }

    /// Restores what a committed state says is closed (after a restart).
    pub fn with_closed_through(mut self, watermark: Option<i64>) -> Self {
        self.closed_through = watermark;
        self
    }

    fn is_closed(&self, window_start: i64) -> bool {
        self.closed_through
            .is_some_and(|w| self.window.end(window_start).saturating_add(self.lateness) <= w)
    }

    pub fn offer(&mut self, partial: Partial) -> Offered {
        let source = (partial.source_topic, partial.source_partition);
        self.offer_item(
            &source,
            (partial.epoch_end, partial.seq),
            BatchItem {
                window_start: partial.window_start,
                key: partial.key,
                salt: partial.salt,
                accumulator: partial.accumulator,
            },
        )
    }

    /// [`Merger::offer`] of a partial from `source` at `position` (epoch end, sequence number).
    pub fn offer_item(
        &mut self,
        source: &Source,
        position: (i64, u32),
        item: BatchItem,
    ) -> Offered {
        match self.seen.get_mut(source) {
            Some(seen) if position <= *seen => return Offered::Duplicate,
            Some(seen) => *seen = position,
            None => {
                self.seen.insert(source.clone(), position);
            }
        }
        if self.is_closed(item.window_start) {
            return Offered::WindowClosed;
        }
        let slot = (item.window_start, item.key, item.salt);
        match self.open.get_mut(&slot) {
            Some(acc) => {
                // A sketch can grow as it merges (sparse registers, or sparse to dense).
                let before = acc.heap_bytes();
                acc.merge(&item.accumulator);
                self.bytes = (self.bytes + acc.heap_bytes()).saturating_sub(before);
            }
            None => {
                self.bytes += group_bytes(&slot.1, &item.accumulator);
                self.open.insert(slot, item.accumulator);
            }
        }
        Offered::Merged
    }

    /// A marker: `source` finished the epoch ending at `epoch_end` with `watermark` (idle: it had
    /// nothing new for the idle timeout and must not hold the others back).
    pub fn mark(&mut self, source: Source, watermark: i64, idle: bool) {
        let entry = self.marks.entry(source).or_insert(Mark { watermark, idle });
        entry.watermark = entry.watermark.max(watermark);
        entry.idle = idle;
    }

    /// The operator watermark: the minimum over active sources (all idle: the largest).
    pub fn watermark(&self) -> Option<i64> {
        if self.expected.iter().any(|s| !self.marks.contains_key(s)) {
            return None;
        }
        let active = self
            .marks
            .values()
            .filter(|m| !m.idle)
            .map(|m| m.watermark)
            .min();
        active.or_else(|| self.marks.values().map(|m| m.watermark).max())
    }

    /// Closes every open window the watermark has passed by its end plus the allowed lateness, in
    /// window order. A window never closes twice. The closed groups come out one by one, each
    /// freed from the open state as it is taken: a caller that moves them elsewhere never holds
    /// two copies of a large window.
    pub fn close(&mut self) -> impl Iterator<Item = Closed> + use<> {
        let window = self.window;
        let Some(watermark) = self.watermark() else {
            return BTreeMap::new().into_iter().map(closed_of(window));
        };
        let through = self.closed_through.map_or(watermark, |c| c.max(watermark));
        self.closed_through = Some(through);
        // Windows close in start order, so the closing ones are the map's first entries: they
        // are split off whole, and no key is copied (a million open keys are hundreds of MiB).
        let lateness = self.lateness;
        let closing = split_prefix(&mut self.open, |(start, _, _)| {
            window.end(*start).saturating_add(lateness) <= through
        });
        let freed: usize = closing
            .iter()
            .map(|((_, key, _), accumulator)| group_bytes(key, accumulator))
            .sum();
        self.bytes = self.bytes.saturating_sub(freed);
        closing.into_iter().map(closed_of(window))
    }

    /// Appends the merger's whole state (open windows, per-source high-water marks and
    /// watermarks, what is closed) to `out`: stage 2 stores it with each commit.
    pub fn snapshot(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&(self.open.len() as u64).to_le_bytes());
        for ((start, key, salt), acc) in &self.open {
            out.extend_from_slice(&start.to_le_bytes());
            super::partial::encode_key(key, out);
            out.extend_from_slice(&salt.to_le_bytes());
            acc.encode(out);
        }
        let mut sources: Vec<&Source> = self.seen.keys().chain(self.marks.keys()).collect();
        sources.sort();
        sources.dedup();
        out.extend_from_slice(&(sources.len() as u64).to_le_bytes());
        for source in sources {
            out.extend_from_slice(&(source.0.len() as u16).to_le_bytes());
            out.extend_from_slice(source.0.as_bytes());
            out.extend_from_slice(&source.1.to_le_bytes());
            match self.seen.get(source) {
                Some((epoch, seq)) => {
                    out.push(1);
                    out.extend_from_slice(&epoch.to_le_bytes());
                    out.extend_from_slice(&seq.to_le_bytes());
                }
                None => out.push(0),
            }
            match self.marks.get(source) {
                Some(mark) => {
                    out.push(1 | if mark.idle { 2 } else { 0 });
                    out.extend_from_slice(&mark.watermark.to_le_bytes());
                }
                None => out.push(0),
            }
        }
        match self.closed_through {
            Some(w) => {
                out.push(1);
                out.extend_from_slice(&w.to_le_bytes());
            }
            None => out.push(0),
        }
    }

    /// Restores a [`Merger::snapshot`]; `None` when the bytes are malformed.
    pub(crate) fn restore(&mut self, c: &mut super::aggregate::Cursor<'_>) -> Option<()> {
        let open = c.u64()?;
        for _ in 0..open {
            let start = c.i64()?;
            let key = super::partial::decode_key(c).ok()?;
            let salt = c.u16()?;
            let (acc, used) = Accumulator::decode(&self.aggregates, c.rest())?;
            c.at += used;
            self.open.insert((start, key, salt), acc);
        }
        let sources = c.u64()?;
        for _ in 0..sources {
            let len = c.u16()? as usize;
            let topic = String::from_utf8(c.take(len)?.to_vec()).ok()?;
            let source = (topic, c.i32()?);
            if c.u8()? == 1 {
                let position = (c.i64()?, c.u32()?);
                self.seen.insert(source.clone(), position);
            }
            let flags = c.u8()?;
            if flags & 1 == 1 {
                let watermark = c.i64()?;
                let idle = flags & 2 == 2;
                self.marks.insert(source, Mark { watermark, idle });
            }
        }
        self.closed_through = match c.u8()? {
            1 => Some(c.i64()?),
            _ => None,
        };
        self.bytes = self.recount_bytes();
        Some(())
    }

    pub fn open_windows(&self) -> usize {
        self.open.len()
    }

    /// Bytes the open groups hold, estimated: each entry, its key and its accumulator. Kept up
    /// to date as groups merge and close, so reading it costs nothing.
    pub fn state_bytes(&self) -> usize {
        self.bytes
    }

    /// [`Merger::state_bytes`] counted again from every open group.
    pub(super) fn recount_bytes(&self) -> usize {
        self.open
            .iter()
            .map(|((_, key, _), accumulator)| group_bytes(key, accumulator))
            .sum()
    }

    pub fn aggregates(&self) -> &[Aggregate] {
        &self.aggregates
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gold::core::aggregate::{parse_aggregates, Input, Output};
    use proptest::prelude::*;

    const MINUTE: i64 = 60_000_000;

    fn partial(
        source: i32,
        epoch_end: i64,
        seq: u32,
        start: i64,
        key: &str,
        amounts: &[f64],
    ) -> Partial {
        let aggregates = parse_aggregates("count, sum(amount)").expect("aggregates");
        let mut accumulator = Accumulator::new(&aggregates);
        for a in amounts {
            accumulator.add(&[Input::Null, Input::Number(*a)]);
        }
        Partial {
            source_topic: "orders".into(),
            source_partition: source,
            epoch_end,
            seq,
            window_start: start,
            key: vec![KeyValue::Str(key.into())],
            salt: 0,
            accumulator,
        }
    }

    fn merger() -> Merger {
        Merger::new(
            "1m".parse().expect("window"),
            30_000_000,
            parse_aggregates("count, sum(amount)").expect("aggregates"),
        )
    }

    #[test]
    fn duplicates_are_dropped_and_windows_close_after_lateness() {
        let mut m = merger();
        assert_eq!(
            m.offer(partial(0, 10, 0, 0, "a", &[1.0, 2.0])),
            Offered::Merged
        );
        assert_eq!(m.offer(partial(1, 7, 0, 0, "a", &[4.0])), Offered::Merged);
        // A replay of source 0's epoch: dropped.
        assert_eq!(
            m.offer(partial(0, 10, 0, 0, "a", &[1.0, 2.0])),
            Offered::Duplicate
        );
        m.mark(("orders".into(), 0), MINUTE + 29_000_000, false);
        m.mark(("orders".into(), 1), 5 * MINUTE, false);
        assert!(
            m.close().next().is_none(),
            "end + lateness not yet passed by source 0"
        );
        m.mark(("orders".into(), 0), MINUTE + 30_000_000, false);
        let closed: Vec<Closed> = m.close().collect();
        assert_eq!(closed.len(), 1);
        assert_eq!(
            closed[0].accumulator.finish(),
            [Output::Int(3), Output::Float(Some(7.0))]
        );
        // Too late now.
        assert_eq!(
            m.offer(partial(1, 9, 0, 0, "a", &[1.0])),
            Offered::WindowClosed
        );
    }

    #[test]
    fn nothing_closes_before_every_expected_source_marked() {
        let mut m = merger();
        m.expect(vec![("orders".into(), 0), ("orders".into(), 1)]);
        assert_eq!(m.offer(partial(0, 10, 0, 0, "a", &[1.0])), Offered::Merged);
        m.mark(("orders".into(), 0), 10 * MINUTE, false);
        assert_eq!(m.watermark(), None, "source 1 has not spoken");
        assert!(m.close().next().is_none());
        m.mark(("orders".into(), 1), 10 * MINUTE, false);
        assert_eq!(m.watermark(), Some(10 * MINUTE));
        assert_eq!(m.close().count(), 1);
    }

    #[test]
    fn idle_sources_do_not_hold_the_watermark() {
        let mut m = merger();
        m.mark(("orders".into(), 0), 10 * MINUTE, false);
        m.mark(("orders".into(), 1), MINUTE, false);
        assert_eq!(m.watermark(), Some(MINUTE));
        m.mark(("orders".into(), 1), MINUTE, true);
        assert_eq!(m.watermark(), Some(10 * MINUTE));
    }

    proptest! {
        /// Events split over sources and epochs, partials replayed at random points: every window
        /// closes once, with exactly the aggregate of its events.
        #[test]
        fn replays_never_change_the_result(
            events in prop::collection::vec((0i32..3, 0u8..4, 0i64..5 * MINUTE, -100.0f64..100.0), 1..200),
            epoch_size in 1usize..20,
            replay_every in 1usize..7,
        ) {
            let aggregates = parse_aggregates("count, sum(amount)").expect("aggregates");
            let window: WindowSpec = "1m".parse().expect("window");
            let mut m = Merger::new(window, 0, aggregates.clone());
            // Per source: epochs of `epoch_size` events, pre-aggregated per (window, key).
            let mut sent: Vec<Partial> = Vec::new();
            for source in 0..3 {
                let mine: Vec<&(i32, u8, i64, f64)> = events.iter().filter(|e| e.0 == source).collect();
                for (epoch, chunk) in mine.chunks(epoch_size).enumerate() {
                    let mut groups: BTreeMap<(i64, u8), Vec<f64>> = BTreeMap::new();
                    for (_, key, t, amount) in chunk {
                        groups.entry((window.starts(*t).next().expect("one"), *key)).or_default().push(*amount);
                    }
                    for (seq, ((start, key), amounts)) in groups.into_iter().enumerate() {
                        sent.push(partial(source, epoch as i64, seq as u32, start, &key.to_string(), &amounts));
                    }
                }
            }
            // Deliver in per-source order, re-sending a prefix of the same source now and then.
            let mut delivered = 0usize;
            for (i, p) in sent.iter().enumerate() {
                prop_assert_ne!(m.offer(p.clone()), Offered::WindowClosed);
                if i % replay_every == 0 {
                    for earlier in sent[..=i].iter().filter(|e| e.source_partition == p.source_partition) {
                        prop_assert_eq!(m.offer(earlier.clone()), Offered::Duplicate);
                    }
                }
                delivered += 1;
            }
            prop_assert_eq!(delivered, sent.len());
            for source in 0..3 {
                m.mark(("orders".into(), source), 10 * MINUTE, false);
            }
            let closed: Vec<Closed> = m.close().collect();
            let mut expected: BTreeMap<(i64, String), (i64, crate::gold::core::aggregate::ExactSum)> = BTreeMap::new();
            for (_, key, t, amount) in &events {
                let e = expected.entry((window.starts(*t).next().expect("one"), key.to_string())).or_default();
                e.0 += 1;
                e.1.add(*amount);
            }
            prop_assert_eq!(closed.len(), expected.len());
            for c in closed {
                let KeyValue::Str(key) = &c.key[0] else { panic!("string key") };
                let (count, sum) = &expected[&(c.window_start, key.clone())];
                prop_assert_eq!(c.accumulator.finish(), vec![Output::Int(*count), Output::Float(Some(sum.value()))]);
            }
            prop_assert!(m.close().next().is_none(), "a window closes once");
        }
    }
}

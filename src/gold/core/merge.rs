//! Stage 2 of Gold for one partials partition, including the merge hop of salted keys. Pure: it
//! takes the partition's messages in log order and says what to send and which Gold rows are final.
//!
//! - Stage-1 partials merge per (window, key, salt) in a [`Merger`]; stage-1 markers move its
//!   watermark, and windows close after each marker (so the outcome is a function of the log).
//! - A closed result of salt 0 is held here (the key's own partition); a closed salted sub-result
//!   is forwarded to the key's own partition as a [`Message::SubResult`].
//! - Whenever the set of closed windows grows, this partition tells every other one how far it has
//!   closed ([`Message::Closed`]); the key's own partition writes the Gold row of (window, key) once
//!   every partition has closed that window, merging the salt-0 result with every sub-result.
//! - Replays are recognised: stage-1 partials by the merger's per-source high-water marks,
//!   sub-results because their sender already announced the window closed. Held sub-results are
//!   kept per salt, so one sent twice before the announcement replaces itself.
//!
//! The whole state round-trips through [`PartitionMerge::snapshot`]; stage 2 stores it with each
//! Gold commit, so a restart resumes exactly where the committed offset says.

use std::collections::BTreeMap;

use super::aggregate::{Accumulator, Aggregate, Cursor};
use super::closing::{split_prefix, Closed, Merger, Offered, Source};
use super::epoch::partition_of;
use super::partial::{decode_key, encode_key, FormatError, KeyValue, Message};
use super::window::WindowSpec;

const SNAPSHOT_MAGIC: &[u8; 4] = b"SMS1";

/// What handling one message asks the caller to do.
#[derive(Debug, Default)]
pub struct Effects {
    /// Messages for partials partitions (sub-results and closed announcements).
    pub send: Vec<(i32, Message)>,
    /// Final Gold rows (salt 0, every sub-key merged).
    pub rows: Vec<Closed>,
    /// Stage-1 partials dropped as replays.
    pub duplicates: u64,
    /// Partials for windows already closed (cannot happen while stage 1 keeps its watermark rule;
    /// counted so that it would show).
    pub too_late: u64,
    /// Sub-results closed here for another partition.
    pub forwarded: u64,
}

/// A held result's accumulators by salt, in salt order. Almost every key has salt 0 alone: a
/// vector of one costs one small allocation, where a map per key took a whole tree node (about
/// 300 bytes per key at a window's close, measured with heaptrack).
#[derive(Debug, Default)]
struct Salts(Vec<(u16, Accumulator)>);

impl Salts {
    /// Sets `salt`'s accumulator (a salt closes once per window, so it is new; a sub-result
    /// sent twice replaces itself). Returns the bytes it adds, less those of one it replaces.
    fn insert(&mut self, salt: u16, accumulator: Accumulator) -> isize {
        let added = salt_bytes(&accumulator) as isize;
        match self.0.binary_search_by_key(&salt, |(s, _)| *s) {
            Ok(at) => {
                let replaced = std::mem::replace(&mut self.0[at].1, accumulator);
                added - salt_bytes(&replaced) as isize
            }
            Err(at) => {
                self.0.insert(at, (salt, accumulator));
                added
            }
        }
    }
}

/// What one salt's accumulator of a held result costs, estimated.
fn salt_bytes(accumulator: &Accumulator) -> usize {
    std::mem::size_of::<(u16, Accumulator)>() + accumulator.heap_bytes()
}

/// What one held result costs, estimated: its entry, its key and its salts.
fn held_bytes(key: &[KeyValue], salts: &Salts) -> usize {
    super::closing::ENTRY_BYTES
        + KeyValue::heap_bytes(key)
        + salts.0.iter().map(|(_, a)| salt_bytes(a)).sum::<usize>()
}

impl Effects {
    fn offered(&mut self, offered: Offered) {
        match offered {
            Offered::Merged => {}
            Offered::Duplicate => self.duplicates += 1,
            Offered::WindowClosed => self.too_late += 1,
        }
    }
}

/// Stage 2 of one partials partition.
#[derive(Debug)]
pub struct PartitionMerge {
    me: i32,
    partitions: i32,
    merger: Merger,
    /// Closed results of keys whose own partition this is, per (window start, key), per salt:
    /// waiting until every partition closed the window.
    held: BTreeMap<(i64, Vec<KeyValue>), Salts>,
    /// What `held` holds, estimated ([`held_bytes`] summed), kept as results come and go.
    held_bytes: usize,
    /// How far each other partition has closed.
    peers: BTreeMap<i32, i64>,
    /// The closed-window boundary last announced (see [`PartitionMerge::boundary`]).
    announced: Option<i64>,
}

impl PartitionMerge {
    pub fn new(
        me: i32,
        partitions: i32,
        window: WindowSpec,
        lateness: i64,
        aggregates: Vec<Aggregate>,
        sources: Vec<Source>,
    ) -> Self {
        let mut merger = Merger::new(window, lateness, aggregates);
        merger.expect(sources);
        Self {
            me,
            partitions: partitions.max(1),
            merger,
            held: BTreeMap::new(),
            held_bytes: 0,
            peers: BTreeMap::new(),
            announced: None,
        }
    }

    fn close_point(&self, window_start: i64) -> i64 {
        self.merger
            .window()
            .end(window_start)
            .saturating_add(self.merger.lateness())
    }

    /// Which windows a closed-through watermark closes, as one number: it changes exactly when
    /// another window start becomes closed.
    fn boundary(&self, through: i64) -> i64 {
        let w = self.merger.window();
        through
            .saturating_sub(w.size)
            .saturating_sub(self.merger.lateness())
            .div_euclid(w.slide)
    }

    /// The operator watermark as this partition sees it (`None` before every source marked).
    pub fn watermark(&self) -> Option<i64> {
        self.merger.watermark()
    }

    /// Bytes of state this partition holds (open groups and held results), estimated. Kept up
    /// to date message by message, so reading it costs nothing (stage 2 checks its budget with
    /// it before every message).
    pub fn state_bytes(&self) -> usize {
        self.merger.state_bytes() + self.held_bytes
    }

    /// [`PartitionMerge::state_bytes`] counted again from every group and held result.
    pub fn recount_bytes(&self) -> usize {
        let held: usize = self
            .held
            .iter()
            .map(|((_, key), salts)| held_bytes(key, salts))
            .sum();
        self.merger.recount_bytes() + held
    }

    /// Holds `salt`'s closed result of (window, key) until every partition closed the window.
    fn hold(&mut self, window_start: i64, key: Vec<KeyValue>, salt: u16, accumulator: Accumulator) {
        match self.held.entry((window_start, key)) {
            std::collections::btree_map::Entry::Occupied(mut held) => {
                let added = held.get_mut().insert(salt, accumulator);
                self.held_bytes = self.held_bytes.saturating_add_signed(added);
            }
            std::collections::btree_map::Entry::Vacant(slot) => {
                let mut salts = Salts::default();
                salts.insert(salt, accumulator);
                self.held_bytes += held_bytes(&slot.key().1, &salts);
                slot.insert(salts);
            }
        }
    }

    /// Windows open here plus (window, key) results held for the merge.
    pub fn open(&self) -> (usize, usize) {
        (self.merger.open_windows(), self.held.len())
    }

    pub fn handle(&mut self, message: Message) -> Effects {
        let mut effects = Effects::default();
        match message {
            Message::Partial(partial) => effects.offered(self.merger.offer(partial)),
            Message::Partials(batch) => {
                let source = (batch.source_topic, batch.source_partition);
                for (i, item) in batch.items.into_iter().enumerate() {
                    // Decoding refused batches whose sequence numbers overflow.
                    let seq = batch.first_seq.wrapping_add(i as u32);
                    let offered = self
                        .merger
                        .offer_item(&source, (batch.epoch_end, seq), item);
                    effects.offered(offered);
                }
            }
            Message::Marker {
                source_topic,
                source_partition,
                watermark,
                ..
            } => {
                self.merger
                    .mark((source_topic, source_partition), watermark, false);
                self.close(&mut effects);
            }
            Message::SubResult {
                from,
                window_start,
                key,
                salt,
                accumulator,
            } => {
                let announced = self.peers.get(&from).copied();
                if announced.is_some_and(|t| self.close_point(window_start) <= t) {
                    effects.duplicates += 1;
                } else {
                    self.hold(window_start, key, salt, accumulator);
                }
            }
            Message::Closed { from, through } => {
                let entry = self.peers.entry(from).or_insert(through);
                *entry = (*entry).max(through);
                self.finalize(&mut effects);
            }
        }
        effects
    }

    fn close(&mut self, effects: &mut Effects) {
        for closed in self.merger.close() {
            let own = partition_of(&closed.key, 0, self.partitions);
            if closed.salt == 0 || own == self.me {
                self.hold(
                    closed.window_start,
                    closed.key,
                    closed.salt,
                    closed.accumulator,
                );
            } else {
                effects.forwarded += 1;
                effects.send.push((
                    own,
                    Message::SubResult {
                        from: self.me,
                        window_start: closed.window_start,
                        key: closed.key,
                        salt: closed.salt,
                        accumulator: closed.accumulator,
                    },
                ));
            }
        }
        if let Some(through) = self.merger.closed_through() {
            let boundary = self.boundary(through);
            if self.announced.is_none_or(|a| boundary > a) {
                self.announced = Some(boundary);
                for to in (0..self.partitions).filter(|p| *p != self.me) {
                    effects.send.push((
                        to,
                        Message::Closed {
                            from: self.me,
                            through,
                        },
                    ));
                }
            }
        }
        self.finalize(effects);
    }

    /// Writes the Gold row of every held (window, key) that every partition has closed.
    fn finalize(&mut self, effects: &mut Effects) {
        let Some(mut through) = self.merger.closed_through() else {
            return;
        };
        for peer in (0..self.partitions).filter(|p| *p != self.me) {
            match self.peers.get(&peer) {
                Some(t) => through = through.min(*t),
                None => return,
            }
        }
        // Held results are ordered by window start, so the ready ones are the map's first
        // entries: split off whole, no key copied.
        let (window, lateness) = (self.merger.window(), self.merger.lateness());
        let ready = split_prefix(&mut self.held, |(start, _)| {
            window.end(*start).saturating_add(lateness) <= through
        });
        for (slot, salts) in ready {
            self.held_bytes = self.held_bytes.saturating_sub(held_bytes(&slot.1, &salts));
            let Salts(salts) = salts;
            // Merged into the first salt's accumulator: merging is exact in any order.
            let mut subs = salts.into_iter().map(|(_, a)| a);
            let mut accumulator = subs
                .next()
                .unwrap_or_else(|| Accumulator::new(self.merger.aggregates()));
            for sub in subs {
                accumulator.merge(&sub);
            }
            effects.rows.push(Closed {
                window_start: slot.0,
                window_end: self.merger.window().end(slot.0),
                key: slot.1,
                salt: 0,
                accumulator,
            });
        }
    }

    /// The whole state, for storing with a commit.
    pub fn snapshot(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(SNAPSHOT_MAGIC);
        out.extend_from_slice(&self.me.to_le_bytes());
        out.extend_from_slice(&self.partitions.to_le_bytes());
        self.merger.snapshot(&mut out);
        out.extend_from_slice(&(self.held.len() as u64).to_le_bytes());
        for ((start, key), salts) in &self.held {
            out.extend_from_slice(&start.to_le_bytes());
            encode_key(key, &mut out);
            out.extend_from_slice(&(salts.0.len() as u16).to_le_bytes());
            for (salt, acc) in &salts.0 {
                out.extend_from_slice(&salt.to_le_bytes());
                acc.encode(&mut out);
            }
        }
        out.extend_from_slice(&(self.peers.len() as u32).to_le_bytes());
        for (peer, through) in &self.peers {
            out.extend_from_slice(&peer.to_le_bytes());
            out.extend_from_slice(&through.to_le_bytes());
        }
        match self.announced {
            Some(a) => {
                out.push(1);
                out.extend_from_slice(&a.to_le_bytes());
            }
            None => out.push(0),
        }
        out
    }

    /// Restores a snapshot into a fresh state of the same configuration. Errors when the bytes
    /// are malformed or belong to another partition or partition count.
    pub fn restore(&mut self, bytes: &[u8]) -> Result<(), FormatError> {
        let mut c = Cursor::new(bytes);
        let malformed = || FormatError::Malformed("malformed Gold state snapshot");
        if c.take(4) != Some(SNAPSHOT_MAGIC.as_slice()) {
            return Err(malformed());
        }
        let (me, partitions) = (
            c.i32().ok_or_else(malformed)?,
            c.i32().ok_or_else(malformed)?,
        );
        if (me, partitions) != (self.me, self.partitions) {
            return Err(FormatError::OtherPartition {
                found: me,
                found_of: partitions,
                expected: self.me,
                expected_of: self.partitions,
            });
        }
        self.merger.restore(&mut c).ok_or_else(malformed)?;
        let held = c.u64().ok_or_else(malformed)?;
        for _ in 0..held {
            let start = c.i64().ok_or_else(malformed)?;
            let key = decode_key(&mut c)?;
            let count = c.u16().ok_or_else(malformed)?;
            let mut salts = Salts::default();
            for _ in 0..count {
                let salt = c.u16().ok_or_else(malformed)?;
                let (acc, used) = Accumulator::decode(self.merger.aggregates(), c.rest())
                    .ok_or_else(malformed)?;
                c.at += used;
                salts.insert(salt, acc);
            }
            self.held.insert((start, key), salts);
        }
        self.held_bytes = self
            .held
            .iter()
            .map(|((_, key), salts)| held_bytes(key, salts))
            .sum();
        let peers = c.u32().ok_or_else(malformed)?;
        for _ in 0..peers {
            let peer = c.i32().ok_or_else(malformed)?;
            self.peers.insert(peer, c.i64().ok_or_else(malformed)?);
        }
        self.announced = match c.u8().ok_or_else(malformed)? {
            1 => Some(c.i64().ok_or_else(malformed)?),
            _ => None,
        };
        if c.at != bytes.len() {
            return Err(malformed());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gold::core::aggregate::{parse_aggregates, Input, Output};
    use crate::gold::core::partial::Partial;
    use proptest::prelude::*;
    use std::collections::VecDeque;

    const MINUTE: i64 = 60_000_000;

    /// (source partition, event time, key, salt, amount).
    type Event = (i32, i64, u8, u16, f64);

    fn aggregates() -> Vec<Aggregate> {
        // With a sketch, whose growth as it merges the state's byte count must follow.
        parse_aggregates("count, sum(amount), min(amount), approx_distinct(order_id)")
            .expect("aggregates")
    }

    /// One partial per event, as stage 1 would send it (epochs of one event).
    fn event(source: i32, offset: i64, t: i64, key: u8, salt: u16, amount: f64) -> Partial {
        let mut accumulator = Accumulator::new(&aggregates());
        accumulator.add(&[
            Input::Null,
            Input::Number(amount),
            Input::Number(amount),
            Input::Int(offset),
        ]);
        let window_start = t.div_euclid(MINUTE) * MINUTE;
        Partial {
            source_topic: "orders".into(),
            source_partition: source,
            epoch_end: offset,
            seq: 0,
            window_start,
            key: vec![KeyValue::Int(i64::from(key))],
            salt,
            accumulator,
        }
    }

    fn sources() -> Vec<Source> {
        (0..2).map(|p| ("orders".to_string(), p)).collect()
    }

    /// A little cluster of `partitions` merges with one log each; messages are delivered in log
    /// order, a partition may crash (state back to its last snapshot, log replayed from there).
    struct Cluster {
        logs: Vec<Vec<Message>>,
        merges: Vec<PartitionMerge>,
        read: Vec<usize>,
        snapshots: Vec<(usize, Vec<u8>)>,
        /// Rows written by each partition and not committed yet.
        rows: Vec<Vec<Closed>>,
    }

    impl Cluster {
        fn new(partitions: i32) -> Self {
            let fresh = |p| {
                PartitionMerge::new(
                    p,
                    partitions,
                    "1m".parse().expect("window"),
                    0,
                    aggregates(),
                    sources(),
                )
            };
            Self {
                logs: vec![Vec::new(); partitions as usize],
                merges: (0..partitions).map(fresh).collect(),
                read: vec![0; partitions as usize],
                snapshots: (0..partitions).map(|p| (0, fresh(p).snapshot())).collect(),
                rows: vec![Vec::new(); partitions as usize],
            }
        }

        /// Delivers the next message of partition `p`, if any.
        fn step(&mut self, p: usize) -> bool {
            let Some(message) = self.logs[p].get(self.read[p]).cloned() else {
                return false;
            };
            self.read[p] += 1;
            let effects = self.merges[p].handle(message);
            let merge = &self.merges[p];
            assert_eq!(
                merge.state_bytes(),
                merge.recount_bytes(),
                "the kept count drifted"
            );
            for (to, m) in effects.send {
                self.logs[to as usize].push(m);
            }
            self.rows[p].extend(effects.rows);
            true
        }

        /// Commits partition `p`: its rows so far count, its state and offset are stored.
        fn commit(&mut self, p: usize, committed_rows: &mut Vec<Closed>) {
            committed_rows.append(&mut self.rows[p]);
            self.snapshots[p] = (self.read[p], self.merges[p].snapshot());
        }

        fn crash(&mut self, p: usize, partitions: i32) {
            let mut fresh = PartitionMerge::new(
                p as i32,
                partitions,
                "1m".parse().expect("window"),
                0,
                aggregates(),
                sources(),
            );
            fresh.restore(&self.snapshots[p].1).expect("restores");
            assert_eq!(fresh.state_bytes(), fresh.recount_bytes());
            self.merges[p] = fresh;
            self.read[p] = self.snapshots[p].0;
            self.rows[p].clear();
        }
    }

    proptest! {
        /// Salted and plain partials of two sources over 4 partials partitions, delivered in a
        /// random interleaving, with partitions crashing back to their last snapshot (and their
        /// uncommitted rows lost): every (window, key) is written exactly once, with exactly the
        /// aggregate of its events.
        #[test]
        fn salted_keys_merge_back_once_through_crashes(
            events in prop::collection::vec((0i32..2, 0i64..6 * MINUTE, 0u8..5, 0u16..4, -50.0f64..50.0), 1..120),
            schedule in prop::collection::vec((0usize..4, 0u8..10), 1..400),
        ) {
            let partitions = 4;
            let mut cluster = Cluster::new(partitions);
            // Stage 1: one epoch per event; each source marks every partition after each epoch.
            let mut per_source: Vec<VecDeque<(i64, &Event)>> = vec![VecDeque::new(), VecDeque::new()];
            for (i, e) in events.iter().enumerate() {
                per_source[e.0 as usize].push_back((i as i64, e));
            }
            for (source, queue) in per_source.iter().enumerate() {
                let mut watermark = i64::MIN;
                for (offset, (s, t, key, salt, amount)) in queue {
                    // Late events (behind this source's watermark) would go to the late table.
                    if window_close(*t) <= watermark {
                        continue;
                    }
                    let p = event(*s, *offset, *t, *key, *salt, *amount);
                    let to = partition_of(&p.key, p.salt, partitions);
                    cluster.logs[to as usize].push(Message::Partial(p));
                    watermark = watermark.max(*t);
                    for q in 0..partitions as usize {
                        cluster.logs[q].push(Message::Marker { source_topic: "orders".into(), source_partition: source as i32, epoch_end: *offset, watermark });
                    }
                }
                for q in 0..partitions as usize {
                    cluster.logs[q].push(Message::Marker { source_topic: "orders".into(), source_partition: source as i32, epoch_end: i64::MAX, watermark: 100 * MINUTE });
                }
            }
            let mut committed = Vec::new();
            for (p, action) in schedule {
                match action {
                    0 => cluster.commit(p, &mut committed),
                    1 => cluster.crash(p, partitions),
                    _ => { cluster.step(p); }
                }
            }
            // Then run to the end.
            loop {
                let mut moved = false;
                for p in 0..4 { while cluster.step(p) { moved = true; } }
                if !moved { break; }
            }
            for p in 0..4 { cluster.commit(p, &mut committed); }

            let mut expected: BTreeMap<(i64, i64), (i64, f64, f64)> = BTreeMap::new();
            let mut late_free: Vec<&(i32, i64, u8, u16, f64)> = Vec::new();
            for queue in &per_source {
                let mut watermark = i64::MIN;
                for (_, e) in queue {
                    if window_close(e.1) <= watermark { continue; }
                    watermark = watermark.max(e.1);
                    late_free.push(e);
                }
            }
            let mut sums: BTreeMap<(i64, i64), crate::gold::core::aggregate::ExactSum> = BTreeMap::new();
            for (_, t, key, _, amount) in late_free {
                let start = t.div_euclid(MINUTE) * MINUTE;
                let e = expected.entry((start, i64::from(*key))).or_insert((0, 0.0, f64::INFINITY));
                e.0 += 1;
                e.2 = e.2.min(*amount);
                sums.entry((start, i64::from(*key))).or_default().add(*amount);
            }
            let mut got: BTreeMap<(i64, i64), Vec<Output>> = BTreeMap::new();
            for row in &committed {
                let KeyValue::Int(k) = row.key[0] else { panic!("int key") };
                prop_assert!(got.insert((row.window_start, k), row.accumulator.finish()).is_none(), "row written twice");
            }
            prop_assert_eq!(got.len(), expected.len());
            for (slot, (count, _, min)) in expected {
                let sum = sums[&slot].value();
                prop_assert_eq!(&got[&slot][..3], &[Output::Int(count), Output::Float(Some(sum)), Output::Float(Some(min))]);
            }
        }
    }

    fn window_close(t: i64) -> i64 {
        t.div_euclid(MINUTE) * MINUTE + MINUTE
    }

    /// A batch of partials merges exactly as the same partials sent one by one, and a replay of
    /// it (or of part of it, one by one) is dropped partial by partial.
    #[test]
    fn a_batch_merges_as_its_partials_one_by_one() {
        use crate::gold::core::partial::{BatchItem, PartialBatch};
        let partials: Vec<Partial> = (0..40u32)
            .map(|i| Partial {
                seq: i,
                ..event(
                    1,
                    500,
                    i64::from(i) * 7_000_000,
                    (i % 6) as u8,
                    0,
                    f64::from(i),
                )
            })
            .collect();
        let new_merge = || {
            PartitionMerge::new(
                0,
                1,
                "1m".parse().expect("window"),
                0,
                aggregates(),
                sources(),
            )
        };
        let mut singles = new_merge();
        for p in &partials {
            singles.handle(Message::Partial(p.clone()));
        }
        let mut batched = new_merge();
        let batch = |from: usize, to: usize| {
            Message::Partials(PartialBatch {
                source_topic: "orders".into(),
                source_partition: 1,
                epoch_end: 500,
                first_seq: from as u32,
                items: partials[from..to]
                    .iter()
                    .map(|p| BatchItem {
                        window_start: p.window_start,
                        key: p.key.clone(),
                        salt: p.salt,
                        accumulator: p.accumulator.clone(),
                    })
                    .collect(),
            })
        };
        assert_eq!(batched.handle(batch(0, 25)).duplicates, 0);
        // Replayed: the first 25 again (one batch), then partials 20..40 (5 of them seen).
        assert_eq!(batched.handle(batch(0, 25)).duplicates, 25);
        assert_eq!(batched.handle(batch(20, 40)).duplicates, 5);
        assert_eq!(singles.snapshot(), batched.snapshot());
    }
}

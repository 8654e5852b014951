//! A partial aggregate between the stages: which source partition and epoch it comes from (for
//! stage 2's deduplication), its window, key and salt, and the accumulators. Binary, versioned,
//! and decoded defensively: a malformed message is an error, never a panic or a large allocation.

use super::aggregate::{Accumulator, Aggregate, Cursor};

const MAGIC: [u8; 2] = *b"SP";
const VERSION: u8 = 2;

/// A value of a grouping field.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KeyValue {
    Null,
    Int(i64),
    Str(String),
}

impl KeyValue {
    /// Bytes a key of these values holds on the heap, its vector included.
    pub fn heap_bytes(key: &[KeyValue]) -> usize {
        std::mem::size_of_val(key)
            + key
                .iter()
                .map(|v| match v {
                    KeyValue::Str(s) => s.capacity(),
                    _ => 0,
                })
                .sum::<usize>()
    }

    /// Appends the value's bytes (tag, then payload); also what partitioning hashes.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            KeyValue::Null => out.push(0),
            KeyValue::Int(v) => {
                out.push(1);
                out.extend_from_slice(&v.to_le_bytes());
            }
            KeyValue::Str(s) => {
                out.push(2);
                out.extend_from_slice(&(s.len() as u32).to_le_bytes());
                out.extend_from_slice(s.as_bytes());
            }
        }
    }
}

/// One partial aggregate message.
#[derive(Debug, Clone)]
pub struct Partial {
    pub source_topic: String,
    pub source_partition: i32,
    /// Last source offset of the epoch this partial belongs to.
    pub epoch_end: i64,
    /// Position among the epoch's partials sent to the same partials partition.
    pub seq: u32,
    pub window_start: i64,
    pub key: Vec<KeyValue>,
    /// 0 for keys that are not salted.
    pub salt: u16,
    pub accumulator: Accumulator,
}

/// A fingerprint of the aggregate list: partials of another configuration are refused.
pub fn spec_fingerprint(aggregates: &[Aggregate], key_fields: &[String]) -> u64 {
    let text = format!(
        "{}|{}",
        aggregates
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(","),
        key_fields.join(",")
    );
    super::hll::hash64(text.as_bytes())
}

const PARTIAL: u8 = 1;
const MARKER: u8 = 2;
const SUB_RESULT: u8 = 3;
const CLOSED: u8 = 4;
const PARTIALS: u8 = 5;

/// One (window, key, salt) accumulator of a [`PartialBatch`].
#[derive(Debug, Clone)]
pub struct BatchItem {
    pub window_start: i64,
    pub key: Vec<KeyValue>,
    pub salt: u16,
    pub accumulator: Accumulator,
}

/// Consecutive partials of one epoch of one source partition for one partials partition, in one
/// message: the `i`-th item has sequence number `first_seq + i`. One message per partial cost a
/// Kafka message, its copies and its acknowledgement per (window, key): an epoch of a window with
/// a million keys made a million messages.
#[derive(Debug, Clone)]
pub struct PartialBatch {
    pub source_topic: String,
    pub source_partition: i32,
    pub epoch_end: i64,
    pub first_seq: u32,
    pub items: Vec<BatchItem>,
}

/// Bytes an encoded batch item takes at least (window start, salt, an empty key, an empty
/// accumulator list): bounds what a hostile item count may reserve.
const MIN_ITEM_BYTES: usize = 8 + 2 + 1;

fn batch_head(out: &mut Vec<u8>, topic: &str, partition: i32, epoch_end: i64, first_seq: u32) {
    out.extend_from_slice(&(topic.len() as u16).to_le_bytes());
    out.extend_from_slice(topic.as_bytes());
    out.extend_from_slice(&partition.to_le_bytes());
    out.extend_from_slice(&epoch_end.to_le_bytes());
    out.extend_from_slice(&first_seq.to_le_bytes());
}

fn batch_item(
    out: &mut Vec<u8>,
    window_start: i64,
    salt: u16,
    key: &[KeyValue],
    accumulator: &Accumulator,
) {
    out.extend_from_slice(&window_start.to_le_bytes());
    out.extend_from_slice(&salt.to_le_bytes());
    encode_key(key, out);
    accumulator.encode(out);
}

/// Packs an epoch's partials into [`PartialBatch`] messages of about `max_bytes` each, per
/// partials partition, keeping each partition's partials in sequence order.
pub struct BatchWriter {
    fingerprint: u64,
    max_bytes: usize,
    open: std::collections::BTreeMap<i32, OpenBatch>,
    done: Vec<(i32, Vec<u8>)>,
}

struct OpenBatch {
    out: Vec<u8>,
    /// Where the item count is written when the batch closes.
    count_at: usize,
    count: u32,
    source: (String, i32),
    epoch_end: i64,
    next_seq: u32,
}

impl BatchWriter {
    pub fn new(fingerprint: u64, max_bytes: usize) -> Self {
        Self {
            fingerprint,
            max_bytes: max_bytes.max(1),
            open: std::collections::BTreeMap::new(),
            done: Vec::new(),
        }
    }

    /// Adds `partial` for partials partition `partition`. It joins the partition's open batch
    /// when it continues it (same source partition and epoch, the next sequence number).
    pub fn push(&mut self, partition: i32, partial: &Partial) {
        let continues = self.open.get(&partition).is_some_and(|b| {
            b.source.1 == partial.source_partition
                && b.source.0 == partial.source_topic
                && b.epoch_end == partial.epoch_end
                && b.next_seq == partial.seq
        });
        if !continues {
            self.close(partition);
            let mut out = header(PARTIALS, self.fingerprint);
            batch_head(
                &mut out,
                &partial.source_topic,
                partial.source_partition,
                partial.epoch_end,
                partial.seq,
            );
            let count_at = out.len();
            out.extend_from_slice(&0u32.to_le_bytes());
            self.open.insert(
                partition,
                OpenBatch {
                    out,
                    count_at,
                    count: 0,
                    source: (partial.source_topic.clone(), partial.source_partition),
                    epoch_end: partial.epoch_end,
                    next_seq: partial.seq,
                },
            );
        }
        let Some(batch) = self.open.get_mut(&partition) else {
            return;
        };
        batch_item(
            &mut batch.out,
            partial.window_start,
            partial.salt,
            &partial.key,
            &partial.accumulator,
        );
        batch.count += 1;
        batch.next_seq = partial.seq.wrapping_add(1);
        if batch.out.len() >= self.max_bytes || batch.next_seq == 0 {
            self.close(partition);
        }
    }

    fn close(&mut self, partition: i32) {
        if let Some(mut batch) = self.open.remove(&partition) {
            batch.out[batch.count_at..batch.count_at + 4]
                .copy_from_slice(&batch.count.to_le_bytes());
            self.done.push((partition, batch.out));
        }
    }

    /// Every message, each partition's in sequence order.
    pub fn finish(mut self) -> Vec<(i32, Vec<u8>)> {
        let open: Vec<i32> = self.open.keys().copied().collect();
        for partition in open {
            self.close(partition);
        }
        self.done
    }
}

/// Everything that travels on the partials topic.
#[derive(Debug, Clone)]
pub enum Message {
    /// Stage 1: one (window, key, salt) accumulator of an epoch.
    Partial(Partial),
    /// Stage 1: consecutive accumulators of an epoch for one partials partition.
    Partials(PartialBatch),
    /// Stage 1 finished the epoch of a source partition ending at `epoch_end`; every partial of
    /// that epoch for this partials partition came before it. `watermark` is the source
    /// partition's watermark after the epoch (microseconds).
    Marker {
        source_topic: String,
        source_partition: i32,
        epoch_end: i64,
        watermark: i64,
    },
    /// Stage 2 on partials partition `from` closed a salted sub-key's window: the key's own
    /// partition merges it with the other sub-keys.
    SubResult {
        from: i32,
        window_start: i64,
        key: Vec<KeyValue>,
        salt: u16,
        accumulator: Accumulator,
    },
    /// Stage 2 on partials partition `from` closed, and forwarded, every window whose end plus the
    /// allowed lateness is at or below `through`.
    Closed { from: i32, through: i64 },
}

impl Message {
    /// Whether it opens groups in stage 2 (stage 1's partials): what a stage at its memory budget
    /// stops taking. Markers and closed announcements close windows and release state, and a
    /// sub-result (one per salted key and salt) is what lets a closed window's row be written.
    pub fn opens_groups(&self) -> bool {
        matches!(self, Message::Partial(_) | Message::Partials(_))
    }
}

fn header(kind: u8, fingerprint: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(kind);
    out.extend_from_slice(&fingerprint.to_le_bytes());
    out
}

pub(crate) fn encode_key(key: &[KeyValue], out: &mut Vec<u8>) {
    out.push(key.len() as u8);
    for value in key {
        value.encode(out);
    }
}

/// Why bytes from the partials topic or a Gold state file cannot be read. Such bytes are refused
/// (counted and logged), never trusted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("truncated ({0} bytes)")]
    Truncated(usize),
    #[error("not a Strata partials message (bad magic)")]
    BadMagic,
    #[error("format version {found}, expected {expected}")]
    Version { found: u8, expected: u8 },
    #[error("partial of another STRATA_GOLD_KEY/STRATA_GOLD_AGGREGATES")]
    OtherSpec,
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    #[error("unknown key tag {0}")]
    UnknownKeyTag(u8),
    #[error("{0}")]
    Malformed(&'static str),
    #[error("{0} trailing bytes")]
    Trailing(usize),
    #[error("not a partial")]
    NotAPartial,
    #[error("Gold state of partition {found} of {found_of}, expected {expected} of {expected_of} (the partials topic changed)")]
    OtherPartition {
        found: i32,
        found_of: i32,
        expected: i32,
        expected_of: i32,
    },
}

pub(crate) fn decode_key(cursor: &mut Cursor<'_>) -> Result<Vec<KeyValue>, FormatError> {
    let truncated = FormatError::Malformed("truncated key");
    let fields = cursor.u8().ok_or(truncated.clone())? as usize;
    let mut key = Vec::with_capacity(fields);
    for _ in 0..fields {
        key.push(match cursor.u8().ok_or(truncated.clone())? {
            0 => KeyValue::Null,
            1 => KeyValue::Int(cursor.i64().ok_or(truncated.clone())?),
            2 => {
                let len = cursor.u32().ok_or(truncated.clone())? as usize;
                let bytes = cursor.take(len).ok_or(truncated.clone())?;
                KeyValue::Str(
                    String::from_utf8(bytes.to_vec())
                        .map_err(|_| FormatError::Malformed("key is not UTF-8"))?,
                )
            }
            tag => return Err(FormatError::UnknownKeyTag(tag)),
        });
    }
    Ok(key)
}

fn decode_accumulator(
    cursor: &mut Cursor<'_>,
    aggregates: &[Aggregate],
) -> Result<Accumulator, FormatError> {
    let (accumulator, used) = Accumulator::decode(aggregates, cursor.rest())
        .ok_or(FormatError::Malformed("malformed accumulators"))?;
    cursor.at += used;
    Ok(accumulator)
}

impl Message {
    pub fn encode(&self, fingerprint: u64) -> Vec<u8> {
        match self {
            Message::Partial(p) => p.encode(fingerprint),
            Message::Partials(batch) => {
                let mut out = header(PARTIALS, fingerprint);
                batch_head(
                    &mut out,
                    &batch.source_topic,
                    batch.source_partition,
                    batch.epoch_end,
                    batch.first_seq,
                );
                out.extend_from_slice(&(batch.items.len() as u32).to_le_bytes());
                for item in &batch.items {
                    batch_item(
                        &mut out,
                        item.window_start,
                        item.salt,
                        &item.key,
                        &item.accumulator,
                    );
                }
                out
            }
            Message::Marker {
                source_topic,
                source_partition,
                epoch_end,
                watermark,
            } => {
                let mut out = header(MARKER, fingerprint);
                out.extend_from_slice(&(source_topic.len() as u16).to_le_bytes());
                out.extend_from_slice(source_topic.as_bytes());
                out.extend_from_slice(&source_partition.to_le_bytes());
                out.extend_from_slice(&epoch_end.to_le_bytes());
                out.extend_from_slice(&watermark.to_le_bytes());
                out
            }
            Message::SubResult {
                from,
                window_start,
                key,
                salt,
                accumulator,
            } => {
                let mut out = header(SUB_RESULT, fingerprint);
                out.extend_from_slice(&from.to_le_bytes());
                out.extend_from_slice(&window_start.to_le_bytes());
                out.extend_from_slice(&salt.to_le_bytes());
                encode_key(key, &mut out);
                accumulator.encode(&mut out);
                out
            }
            Message::Closed { from, through } => {
                let mut out = header(CLOSED, fingerprint);
                out.extend_from_slice(&from.to_le_bytes());
                out.extend_from_slice(&through.to_le_bytes());
                out
            }
        }
    }

    /// Decodes a message of this configuration. A malformed message is an error, never a panic
    /// or an allocation beyond its own length.
    pub fn decode(
        bytes: &[u8],
        aggregates: &[Aggregate],
        fingerprint: u64,
    ) -> Result<Self, FormatError> {
        let mut c = Cursor::new(bytes);
        let truncated = || FormatError::Truncated(bytes.len());
        if c.take(2).ok_or_else(truncated)? != MAGIC {
            return Err(FormatError::BadMagic);
        }
        let version = c.u8().ok_or_else(truncated)?;
        if version != VERSION {
            return Err(FormatError::Version {
                found: version,
                expected: VERSION,
            });
        }
        let kind = c.u8().ok_or_else(truncated)?;
        if c.u64().ok_or_else(truncated)? != fingerprint {
            return Err(FormatError::OtherSpec);
        }
        let topic = |c: &mut Cursor<'_>| -> Result<String, FormatError> {
            let len = c.u16().ok_or_else(truncated)? as usize;
            String::from_utf8(c.take(len).ok_or_else(truncated)?.to_vec())
                .map_err(|_| FormatError::Malformed("source topic is not UTF-8"))
        };
        let message = match kind {
            PARTIAL => {
                let source_topic = topic(&mut c)?;
                let source_partition = c.i32().ok_or_else(truncated)?;
                let epoch_end = c.i64().ok_or_else(truncated)?;
                let seq = c.u32().ok_or_else(truncated)?;
                let window_start = c.i64().ok_or_else(truncated)?;
                let salt = c.u16().ok_or_else(truncated)?;
                let key = decode_key(&mut c)?;
                let accumulator = decode_accumulator(&mut c, aggregates)?;
                Message::Partial(Partial {
                    source_topic,
                    source_partition,
                    epoch_end,
                    seq,
                    window_start,
                    key,
                    salt,
                    accumulator,
                })
            }
            PARTIALS => {
                let source_topic = topic(&mut c)?;
                let source_partition = c.i32().ok_or_else(truncated)?;
                let epoch_end = c.i64().ok_or_else(truncated)?;
                let first_seq = c.u32().ok_or_else(truncated)?;
                let count = c.u32().ok_or_else(truncated)?;
                if first_seq.checked_add(count.saturating_sub(1)).is_none() {
                    return Err(FormatError::Malformed("sequence numbers overflow"));
                }
                let room = c.rest().len() / MIN_ITEM_BYTES;
                let mut items = Vec::with_capacity((count as usize).min(room));
                for _ in 0..count {
                    let window_start = c.i64().ok_or_else(truncated)?;
                    let salt = c.u16().ok_or_else(truncated)?;
                    let key = decode_key(&mut c)?;
                    let accumulator = decode_accumulator(&mut c, aggregates)?;
                    items.push(BatchItem {
                        window_start,
                        key,
                        salt,
                        accumulator,
                    });
                }
                Message::Partials(PartialBatch {
                    source_topic,
                    source_partition,
                    epoch_end,
                    first_seq,
                    items,
                })
            }
            MARKER => Message::Marker {
                source_topic: topic(&mut c)?,
                source_partition: c.i32().ok_or_else(truncated)?,
                epoch_end: c.i64().ok_or_else(truncated)?,
                watermark: c.i64().ok_or_else(truncated)?,
            },
            SUB_RESULT => {
                let from = c.i32().ok_or_else(truncated)?;
                let window_start = c.i64().ok_or_else(truncated)?;
                let salt = c.u16().ok_or_else(truncated)?;
                let key = decode_key(&mut c)?;
                let accumulator = decode_accumulator(&mut c, aggregates)?;
                Message::SubResult {
                    from,
                    window_start,
                    key,
                    salt,
                    accumulator,
                }
            }
            CLOSED => Message::Closed {
                from: c.i32().ok_or_else(truncated)?,
                through: c.i64().ok_or_else(truncated)?,
            },
            other => return Err(FormatError::UnknownKind(other)),
        };
        if c.at != bytes.len() {
            return Err(FormatError::Trailing(bytes.len() - c.at));
        }
        Ok(message)
    }
}

impl Partial {
    pub fn encode(&self, fingerprint: u64) -> Vec<u8> {
        let mut out = header(PARTIAL, fingerprint);
        out.extend_from_slice(&(self.source_topic.len() as u16).to_le_bytes());
        out.extend_from_slice(self.source_topic.as_bytes());
        out.extend_from_slice(&self.source_partition.to_le_bytes());
        out.extend_from_slice(&self.epoch_end.to_le_bytes());
        out.extend_from_slice(&self.seq.to_le_bytes());
        out.extend_from_slice(&self.window_start.to_le_bytes());
        out.extend_from_slice(&self.salt.to_le_bytes());
        encode_key(&self.key, &mut out);
        self.accumulator.encode(&mut out);
        out
    }

    pub fn decode(
        bytes: &[u8],
        aggregates: &[Aggregate],
        fingerprint: u64,
    ) -> Result<Self, FormatError> {
        match Message::decode(bytes, aggregates, fingerprint)? {
            Message::Partial(p) => Ok(p),
            _ => Err(FormatError::NotAPartial),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::aggregate::{parse_aggregates, Input};
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trips_and_refuses_garbage(
            amounts in prop::collection::vec(-1e6f64..1e6, 0..50),
            key in "[a-z0-9]{0,12}",
            n in any::<i64>(),
            junk in prop::collection::vec(any::<u8>(), 0..120),
            cut in any::<prop::sample::Index>(),
        ) {
            let aggregates = parse_aggregates("count, sum(amount), max(amount), approx_distinct(user)").expect("aggs");
            let mut accumulator = Accumulator::new(&aggregates);
            for a in &amounts {
                accumulator.add(&[Input::Null, Input::Number(*a), Input::Number(*a), Input::Bytes(key.as_bytes())]);
            }
            let partial = Partial {
                source_topic: "orders".into(),
                source_partition: 3,
                epoch_end: n,
                seq: 7,
                window_start: -60_000_000,
                key: vec![KeyValue::Str(key.clone()), KeyValue::Int(n), KeyValue::Null],
                salt: 5,
                accumulator,
            };
            let fp = spec_fingerprint(&aggregates, &["customer".into()]);
            let bytes = partial.encode(fp);
            let back = Partial::decode(&bytes, &aggregates, fp).expect("decodes");
            prop_assert_eq!(&back.key, &partial.key);
            prop_assert_eq!((back.epoch_end, back.seq, back.salt, back.window_start), (n, 7, 5, -60_000_000));
            prop_assert_eq!(back.accumulator.finish(), partial.accumulator.finish());
            prop_assert!(Partial::decode(&bytes, &aggregates, fp ^ 1).is_err(), "other configuration");
            let truncated = &bytes[..cut.index(bytes.len())];
            prop_assert!(Partial::decode(truncated, &aggregates, fp).is_err());
            let _ = Partial::decode(&junk, &aggregates, fp);
        }
    }

    fn sample_partials(n: u32, aggregates: &[Aggregate]) -> Vec<Partial> {
        (0..n)
            .map(|i| {
                let mut accumulator = Accumulator::new(aggregates);
                accumulator.add(&[
                    Input::Null,
                    Input::Number(f64::from(i)),
                    Input::Number(1.5),
                    Input::Bytes(&i.to_le_bytes()),
                ]);
                Partial {
                    source_topic: "orders".into(),
                    source_partition: 2,
                    epoch_end: 99,
                    seq: i,
                    window_start: 60_000_000 * i64::from(i % 3),
                    key: vec![
                        KeyValue::Str(format!("customer-{i}")),
                        KeyValue::Int(i.into()),
                    ],
                    salt: (i % 2) as u16,
                    accumulator,
                }
            })
            .collect()
    }

    /// A batch carries its partials with their sequence numbers, splits at the size asked,
    /// keeps each partials partition's partials in order, and decodes to what a single partial
    /// message would have said.
    #[test]
    fn partials_batch_round_trips_and_splits_in_order() {
        let aggregates = parse_aggregates("count, sum(amount), max(amount), approx_distinct(user)")
            .expect("aggs");
        let fp = spec_fingerprint(&aggregates, &["customer".into()]);
        let partials = sample_partials(300, &aggregates);
        let mut writer = BatchWriter::new(fp, 2_000);
        for p in &partials {
            writer.push(i32::from(p.seq % 2 == 0), p);
        }
        let messages = writer.finish();
        assert!(
            messages.len() > 2,
            "split at the size asked: {}",
            messages.len()
        );
        let mut seen: Vec<(i32, u32)> = Vec::new();
        for (partition, bytes) in &messages {
            assert!(bytes.len() < 2_000 + 200, "a message far over its size");
            let Message::Partials(batch) =
                Message::decode(bytes, &aggregates, fp).expect("decodes")
            else {
                panic!("not a batch");
            };
            assert_eq!(
                hex(&Message::Partials(batch.clone()).encode(fp)),
                hex(bytes)
            );
            for (i, item) in batch.items.iter().enumerate() {
                let seq = batch.first_seq + i as u32;
                let single = &partials[seq as usize];
                assert_eq!((batch.source_partition, batch.epoch_end), (2, 99));
                assert_eq!(
                    (item.window_start, item.salt),
                    (single.window_start, single.salt)
                );
                assert_eq!(item.key, single.key);
                assert_eq!(item.accumulator.finish(), single.accumulator.finish());
                seen.push((*partition, seq));
            }
        }
        // Every partial once; per partition in sequence order.
        assert_eq!(seen.len(), partials.len());
        for partition in [0, 1] {
            let seqs: Vec<u32> = seen
                .iter()
                .filter(|(p, _)| *p == partition)
                .map(|(_, s)| *s)
                .collect();
            assert!(
                seqs.windows(2).all(|w| w[0] < w[1]),
                "partition {partition} out of order"
            );
        }
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    proptest! {
        /// Cut, corrupted or lying batches (a count of 2^32-1 items in a few bytes) are refused
        /// without a panic or a large allocation.
        #[test]
        fn a_hostile_batch_is_refused(
            cut in any::<prop::sample::Index>(),
            flip in any::<prop::sample::Index>(),
            count in any::<u32>(),
        ) {
            let aggregates = parse_aggregates("count, sum(amount), max(amount), approx_distinct(user)").expect("aggs");
            let fp = spec_fingerprint(&aggregates, &["customer".into()]);
            let mut writer = BatchWriter::new(fp, usize::MAX);
            for p in &sample_partials(5, &aggregates) {
                writer.push(0, p);
            }
            let (_, bytes) = writer.finish().pop().expect("one message");
            prop_assert!(Message::decode(&bytes[..cut.index(bytes.len())], &aggregates, fp).is_err());
            let mut flipped = bytes.clone();
            let at = flip.index(flipped.len());
            flipped[at] ^= 0xff;
            let _ = Message::decode(&flipped, &aggregates, fp);
            // The item count sits after the header (12), topic (2 + 6), partition, epoch and first sequence.
            let mut lying = bytes.clone();
            lying[36..40].copy_from_slice(&count.to_le_bytes());
            if count != 5 {
                prop_assert!(Message::decode(&lying, &aggregates, fp).is_err());
            }
        }
    }
}

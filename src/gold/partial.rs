//! A partial aggregate between the stages: which source partition and epoch it comes from (for
//! stage 2's deduplication), its window, key and salt, and the accumulators. Binary, versioned,
//! and decoded defensively: a malformed message is an error, never a panic or a large allocation.

use super::aggregate::{Accumulator, Aggregate};

const MAGIC: [u8; 2] = *b"SP";
const VERSION: u8 = 1;

/// A value of a grouping field.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KeyValue {
    Null,
    Int(i64),
    Str(String),
}

impl KeyValue {
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

impl Partial {
    pub fn encode(&self, fingerprint: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&fingerprint.to_le_bytes());
        out.extend_from_slice(&(self.source_topic.len() as u16).to_le_bytes());
        out.extend_from_slice(self.source_topic.as_bytes());
        out.extend_from_slice(&self.source_partition.to_le_bytes());
        out.extend_from_slice(&self.epoch_end.to_le_bytes());
        out.extend_from_slice(&self.seq.to_le_bytes());
        out.extend_from_slice(&self.window_start.to_le_bytes());
        out.extend_from_slice(&self.salt.to_le_bytes());
        out.push(self.key.len() as u8);
        for value in &self.key {
            value.encode(&mut out);
        }
        self.accumulator.encode(&mut out);
        out
    }

    pub fn decode(
        bytes: &[u8],
        aggregates: &[Aggregate],
        fingerprint: u64,
    ) -> Result<Self, String> {
        let mut at = 0usize;
        let mut take = |n: usize| -> Result<&[u8], String> {
            let end = at.checked_add(n).ok_or("length overflow")?;
            let slice = bytes
                .get(at..end)
                .ok_or_else(|| format!("truncated at byte {at} (needed {n})"))?;
            at = end;
            Ok(slice)
        };
        let array = |b: &[u8]| -> [u8; 8] {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[..8]);
            a
        };
        if take(2)? != MAGIC {
            return Err("not a Strata partial (bad magic)".into());
        }
        let version = take(1)?[0];
        if version != VERSION {
            return Err(format!(
                "partial format version {version}, expected {VERSION}"
            ));
        }
        let found = u64::from_le_bytes(array(take(8)?));
        if found != fingerprint {
            return Err("partial of another STRATA_GOLD_KEY/STRATA_GOLD_AGGREGATES".into());
        }
        let topic_len = u16::from_le_bytes([take(1)?[0], take(1)?[0]]) as usize;
        let source_topic = String::from_utf8(take(topic_len)?.to_vec())
            .map_err(|_| "source topic is not UTF-8".to_string())?;
        let source_partition = i32::from_le_bytes(take(4)?.try_into().map_err(|_| "i32")?);
        let epoch_end = i64::from_le_bytes(array(take(8)?));
        let seq = u32::from_le_bytes(take(4)?.try_into().map_err(|_| "u32")?);
        let window_start = i64::from_le_bytes(array(take(8)?));
        let salt = u16::from_le_bytes([take(1)?[0], take(1)?[0]]);
        let fields = take(1)?[0] as usize;
        let mut key = Vec::with_capacity(fields);
        for _ in 0..fields {
            key.push(match take(1)?[0] {
                0 => KeyValue::Null,
                1 => KeyValue::Int(i64::from_le_bytes(array(take(8)?))),
                2 => {
                    let len = u32::from_le_bytes(take(4)?.try_into().map_err(|_| "u32")?) as usize;
                    KeyValue::Str(
                        String::from_utf8(take(len)?.to_vec())
                            .map_err(|_| "key is not UTF-8".to_string())?,
                    )
                }
                tag => return Err(format!("unknown key tag {tag}")),
            });
        }
        let rest = bytes.get(at..).unwrap_or_default();
        let (accumulator, used) = Accumulator::decode(aggregates, rest)
            .ok_or_else(|| "malformed accumulators".to_string())?;
        if at + used != bytes.len() {
            return Err(format!("{} trailing bytes", bytes.len() - at - used));
        }
        Ok(Self {
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
}

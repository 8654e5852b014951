//! Hostile bytes through the wire-format parser and the Avro decoder: crafted length prefixes and
//! block counts, truncations and random mutations. Nothing panics, every record is a row or a
//! rejection, and a counting allocator proves that no record makes the decoder claim more than a
//! fixed amount of memory, whatever its length prefixes say. Pure: no services needed.

use std::sync::Mutex;

use apache_avro::types::Value;
use peak_alloc::PeakAlloc;
use proptest::prelude::*;
use strata::demo::{ORDER_V1, ORDER_V2};
use strata::models::SourceRecord;
use strata::silver::decode::BatchDecoder;

/// Counts live heap bytes and their high-water mark.
#[global_allocator]
static ALLOCATOR: PeakAlloc = PeakAlloc;

/// Memory one chunk of hostile records may claim beyond what was live before it.
const BUDGET: usize = 32 * 1024 * 1024;

/// Tests share the allocator's counters: one measurement at a time.
static MEASURE: Mutex<()> = Mutex::new(());

/// A writer version with fields the reader skips: an array, bytes and a map, each with a default,
/// so it passes BACKWARD and its hostile counts reach arrow-avro's skipping code.
const WIDE: &str = r#"{"type":"record","name":"Order","namespace":"shop","fields":[
  {"name":"order_id","type":"long"},
  {"name":"customer_id","type":"string"},
  {"name":"product","type":"string"},
  {"name":"amount","type":"double"},
  {"name":"event_time","type":{"type":"long","logicalType":"timestamp-millis"}},
  {"name":"tags","type":{"type":"array","items":"long"},"default":[]},
  {"name":"blob","type":"bytes","default":""},
  {"name":"attrs","type":{"type":"map","values":"string"},"default":{}}]}"#;

fn decoder() -> BatchDecoder {
    let mut decoder = BatchDecoder::new(include_str!("../schemas/order.avsc"), "event_time", 1024)
        .expect("decoder")
        .with_max_value_bytes(64 * 1024);
    decoder.register(1, Ok(ORDER_V1));
    decoder.register(2, Ok(ORDER_V2));
    decoder.register(5, Ok(WIDE));
    assert_eq!(decoder.verdict(5), Some(None), "WIDE passes BACKWARD");
    decoder
}

fn zigzag(n: i64) -> Vec<u8> {
    let mut z = ((n << 1) ^ (n >> 63)) as u64;
    let mut out = Vec::new();
    loop {
        let byte = (z & 0x7f) as u8;
        z >>= 7;
        if z == 0 {
            out.push(byte);
            return out;
        }
        out.push(byte | 0x80);
    }
}

fn string(text: &str) -> Vec<u8> {
    let mut out = zigzag(text.len() as i64);
    out.extend_from_slice(text.as_bytes());
    out
}

/// A WIDE record up to and including `event_time`, with a chosen customer_id encoding.
fn wide_head(customer: Vec<u8>) -> Vec<u8> {
    let mut v = strata::schema::wire::frame(5, &[]);
    v.extend(zigzag(42));
    v.extend(customer);
    v.extend(string("dock"));
    v.extend_from_slice(&1.5f64.to_le_bytes());
    v.extend(zigzag(1_764_100_800_000));
    v
}

fn valid_order(n: i64) -> Vec<u8> {
    let schema = apache_avro::Schema::parse_str(ORDER_V2).expect("schema");
    let body = strata::demo::avro_body(
        &schema,
        Value::Record(vec![
            ("order_id".into(), Value::Long(n)),
            ("customer_id".into(), Value::String(format!("c{n}"))),
            ("product".into(), Value::String("mouse".into())),
            ("amount".into(), Value::Double(2.0)),
            (
                "event_time".into(),
                Value::TimestampMillis(1_764_100_800_000),
            ),
            ("coupon".into(), Value::Union(0, Box::new(Value::Null))),
            ("quantity".into(), Value::Int(1)),
        ]),
    )
    .expect("encode");
    strata::schema::wire::frame(2, &body)
}

fn record(offset: i64, value: Vec<u8>) -> SourceRecord {
    SourceRecord {
        topic: "orders".into(),
        partition: 0,
        offset,
        timestamp_ms: None,
        key: None,
        value: Some(value.into()),
        headers: Vec::new(),
    }
}

/// Decodes `values` (each between two valid records) and returns the rejected input indices with
/// their reasons and the memory the decode claimed beyond the baseline.
fn decode_measured(values: &[Vec<u8>]) -> (Vec<(usize, String)>, usize, usize) {
    let _one = MEASURE.lock().unwrap_or_else(|e| e.into_inner());
    let mut decoder = decoder();
    let mut records = Vec::new();
    for (i, value) in values.iter().enumerate() {
        records.push(record(3 * i as i64, valid_order(i as i64)));
        records.push(record(3 * i as i64 + 1, value.clone()));
        records.push(record(3 * i as i64 + 2, valid_order(i as i64 + 1)));
    }
    let baseline = ALLOCATOR.current_usage();
    ALLOCATOR.reset_peak_usage();
    let decoded = decoder.decode(&records);
    let claimed = ALLOCATOR.peak_usage().saturating_sub(baseline);
    let rows = decoded.batch.as_ref().map_or(0, |b| b.num_rows());
    assert_eq!(
        rows + decoded.rejected.len(),
        records.len(),
        "every record is a row or a rejection"
    );
    for (index, why) in &decoded.rejected {
        assert_eq!(
            index % 3,
            1,
            "a valid neighbour was rejected: {index} ({why:?}); all: {:?}",
            decoded.rejected
        );
    }
    let rejected = decoded
        .rejected
        .iter()
        .map(|(i, r)| (i / 3, r.kind.as_str().to_string()))
        .collect();
    (rejected, rows, claimed)
}

#[test]
fn crafted_lengths_and_counts_are_rejected_within_a_fixed_memory_budget() {
    let huge = 1i64 << 62;
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("string length 2^62", wide_head(zigzag(huge))),
        ("negative string length", wide_head(zigzag(-5))),
        ("string length past the end", wide_head(zigzag(1_000))),
    ];
    let tail = |tags: Vec<u8>, blob: Vec<u8>, attrs: Vec<u8>| {
        let mut v = wide_head(string("c1"));
        v.extend(tags);
        v.extend(blob);
        v.extend(attrs);
        v
    };
    let empty = || zigzag(0);
    cases.push((
        "array block count 2^40",
        tail(zigzag(1 << 40), empty(), empty()),
    ));
    cases.push((
        "array block count 2^28, no items",
        tail(zigzag(1 << 28), empty(), empty()),
    ));
    cases.push((
        "negative array block count with a huge byte size",
        tail(
            [zigzag(-(1 << 40)), zigzag(huge)].concat(),
            empty(),
            empty(),
        ),
    ));
    cases.push(("bytes length 2^62", tail(empty(), zigzag(huge), empty())));
    cases.push(("map count 2^40", tail(empty(), empty(), zigzag(1 << 40))));
    cases.push(("varint of 11 bytes", {
        let mut v = strata::schema::wire::frame(2, &[]);
        v.extend_from_slice(&[0xff; 11]);
        v
    }));
    cases.push(("value over STRATA_MAX_VALUE_BYTES", {
        let mut v = wide_head(string(&"x".repeat(100_000)));
        v.extend([empty(), empty(), empty()].concat());
        v
    }));
    let values: Vec<Vec<u8>> = cases.iter().map(|(_, v)| v.clone()).collect();
    let (rejected, rows, claimed) = decode_measured(&values);
    let rejected_cases: Vec<usize> = rejected.iter().map(|(i, _)| *i).collect();
    assert_eq!(
        rejected_cases,
        (0..cases.len()).collect::<Vec<_>>(),
        "every crafted value is rejected: {rejected:?}"
    );
    assert_eq!(rows, 2 * cases.len(), "every valid neighbour is a row");
    assert_eq!(
        rejected.last().map(|(_, k)| k.as_str()),
        Some("value_too_large")
    );
    assert!(
        claimed < BUDGET,
        "decoding {} crafted records claimed {claimed} bytes",
        cases.len()
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    /// Random mutations of valid records (overwritten bytes, truncation, inserted varints): no
    /// panic, neighbours intact, memory within the budget.
    #[test]
    fn mutated_records_never_panic_and_stay_within_the_budget(
        edits in prop::collection::vec((any::<u16>(), any::<u8>(), 0u8..4), 1..6),
        inserted in any::<i64>(),
    ) {
        let mut value = valid_order(7);
        for (at, byte, how) in edits {
            let at = 5 + at as usize % (value.len() - 5).max(1);
            match how {
                0 => {
                    let at = at.min(value.len() - 1);
                    value[at] = byte;
                }
                1 => value.truncate(at.max(5)),
                2 => {
                    let at = at.min(value.len());
                    value.splice(at..at, zigzag(inserted));
                }
                _ => value.push(byte),
            }
        }
        let (_, rows, claimed) = decode_measured(&[value]);
        prop_assert!(rows >= 2);
        prop_assert!(claimed < BUDGET, "claimed {} bytes", claimed);
    }

    /// Arbitrary bytes behind a valid header of each known schema.
    #[test]
    fn arbitrary_bodies_never_panic(id in prop::sample::select(vec![1u32, 2, 5, 9]), body in prop::collection::vec(any::<u8>(), 0..300)) {
        let (_, rows, claimed) = decode_measured(&[strata::schema::wire::frame(id, &body)]);
        prop_assert!(rows >= 2);
        prop_assert!(claimed < BUDGET, "claimed {} bytes", claimed);
    }
}

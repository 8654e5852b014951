//! Golden values. Replays rely on the hash, the partials encoding and the state-file encoding
//! staying the same byte for byte across runs and versions: stage 2 recognises a replayed partial
//! by its bytes' position, salts and partitions come from the hash, and a new version must read
//! the state files an old one stored. A change that breaks one of these needs a new format
//! version (and a migration), never a new golden value.

use super::aggregate::{parse_aggregates, Accumulator, Input};
use super::hll::hash64;
use super::merge::PartitionMerge;
use super::partial::{spec_fingerprint, BatchWriter, KeyValue, Message, Partial};

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).expect("hex"))
        .collect()
}

/// The fixed partial the encodings below are pinned on.
fn partial() -> (Partial, u64) {
    let aggregates = parse_aggregates("count, sum(amount), min(amount), max(amount), avg(amount)")
        .expect("aggregates");
    let mut accumulator = Accumulator::new(&aggregates);
    for amount in [12.5, -3.25, 1e9] {
        let x = Input::Number(amount);
        accumulator.add(&[Input::Null, x, x, x, x]);
    }
    let fingerprint = spec_fingerprint(&aggregates, &["customer".to_string()]);
    let partial = Partial {
        source_topic: "orders".into(),
        source_partition: 3,
        epoch_end: 1_234,
        seq: 7,
        window_start: 1_700_000_040_000_000,
        key: vec![
            KeyValue::Str("customer-1".into()),
            KeyValue::Int(-5),
            KeyValue::Null,
        ],
        salt: 2,
        accumulator,
    };
    (partial, fingerprint)
}

#[test]
fn the_hash_is_pinned() {
    assert_eq!(hash64(b""), GOLDEN_HASH_EMPTY);
    assert_eq!(hash64(b"customer-1"), GOLDEN_HASH_CUSTOMER);
    let all: Vec<u8> = (0..=255).collect();
    assert_eq!(hash64(&all), GOLDEN_HASH_ALL_BYTES);
}

#[test]
fn the_spec_fingerprint_is_pinned() {
    let (_, fingerprint) = partial();
    assert_eq!(fingerprint, GOLDEN_FINGERPRINT);
}

#[test]
fn a_partial_encodes_to_pinned_bytes() {
    let (partial, fingerprint) = partial();
    assert_eq!(hex(&partial.encode(fingerprint)), GOLDEN_PARTIAL);
    // And partials an older replica sent still decode.
    let aggregates = parse_aggregates("count, sum(amount), min(amount), max(amount), avg(amount)")
        .expect("aggregates");
    let back = Partial::decode(&unhex(GOLDEN_PARTIAL), &aggregates, fingerprint).expect("decodes");
    assert_eq!(back.key, partial.key);
    assert_eq!(back.accumulator.finish(), partial.accumulator.finish());
}

#[test]
fn a_partials_batch_encodes_to_pinned_bytes() {
    let (partial, fingerprint) = partial();
    let next = Partial {
        seq: partial.seq + 1,
        salt: 0,
        ..partial.clone()
    };
    let mut writer = BatchWriter::new(fingerprint, usize::MAX);
    writer.push(1, &partial);
    writer.push(1, &next);
    let messages = writer.finish();
    assert_eq!(messages.len(), 1);
    assert_eq!(hex(&messages[0].1), GOLDEN_PARTIALS);
    let aggregates = parse_aggregates("count, sum(amount), min(amount), max(amount), avg(amount)")
        .expect("aggregates");
    let Ok(Message::Partials(back)) =
        Message::decode(&unhex(GOLDEN_PARTIALS), &aggregates, fingerprint)
    else {
        panic!("the pinned batch does not decode");
    };
    assert_eq!((back.first_seq, back.items.len()), (7, 2));
}

#[test]
fn a_marker_encodes_to_pinned_bytes() {
    let (_, fingerprint) = partial();
    let marker = Message::Marker {
        source_topic: "orders".into(),
        source_partition: 3,
        epoch_end: 1_234,
        watermark: 1_700_000_100_000_000,
    };
    assert_eq!(hex(&marker.encode(fingerprint)), GOLDEN_MARKER);
}

#[test]
fn a_state_file_encodes_to_pinned_bytes() {
    let (partial, _) = partial();
    let aggregates = parse_aggregates("count, sum(amount), min(amount), max(amount), avg(amount)")
        .expect("aggregates");
    let mut merge = PartitionMerge::new(
        1,
        4,
        "1m".parse().expect("window"),
        0,
        aggregates,
        vec![("orders".to_string(), 3)],
    );
    merge.handle(Message::Partial(partial));
    assert_eq!(hex(&merge.snapshot()), GOLDEN_STATE);
    // A state file an older replica stored restores to the same state.
    let mut fresh = PartitionMerge::new(
        1,
        4,
        "1m".parse().expect("window"),
        0,
        parse_aggregates("count, sum(amount), min(amount), max(amount), avg(amount)")
            .expect("aggregates"),
        vec![("orders".to_string(), 3)],
    );
    fresh.restore(&unhex(GOLDEN_STATE)).expect("restores");
    assert_eq!(hex(&fresh.snapshot()), GOLDEN_STATE);
}

const GOLDEN_HASH_EMPTY: u64 = 17_280_346_270_528_514_342;
const GOLDEN_HASH_CUSTOMER: u64 = 12_536_098_675_308_940_762;
const GOLDEN_HASH_ALL_BYTES: u64 = 2_335_076_196_188_879_366;
const GOLDEN_FINGERPRINT: u64 = 1_801_836_251_797_816_330;
const GOLDEN_PARTIAL: &str = "535002010a84d4438668011906006f726465727303000000d20400000000000007000000009a801a240a0600020003020a000000637573746f6d65722d3101fbffffffffffffff000300000000000000010000a00465cdcd410000000000000000010000000000000ac0010000000065cdcd41010000a00465cdcd4100000000000000000300000000000000";
const GOLDEN_PARTIALS: &str = "535002050a84d4438668011906006f726465727303000000d2040000000000000700000002000000009a801a240a0600020003020a000000637573746f6d65722d3101fbffffffffffffff000300000000000000010000a00465cdcd410000000000000000010000000000000ac0010000000065cdcd41010000a00465cdcd4100000000000000000300000000000000009a801a240a0600000003020a000000637573746f6d65722d3101fbffffffffffffff000300000000000000010000a00465cdcd410000000000000000010000000000000ac0010000000065cdcd41010000a00465cdcd4100000000000000000300000000000000";
const GOLDEN_MARKER: &str =
    "535002020a84d4438668011906006f726465727303000000d2040000000000000021141e240a0600";
const GOLDEN_STATE: &str = "534d533101000000040000000100000000000000009a801a240a060003020a000000637573746f6d65722d3101fbffffffffffffff0002000300000000000000010000a00465cdcd410000000000000000010000000000000ac0010000000065cdcd41010000a00465cdcd4100000000000000000300000000000000010000000000000006006f72646572730300000001d20400000000000007000000000000000000000000000000000000";

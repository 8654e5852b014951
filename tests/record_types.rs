//! One topic carrying several record types (Confluent's TopicRecordNameStrategy) on a real broker
//! (tansu) and S3 API (moto): each record type reaches its own Silver table, exactly once across a
//! restart, and corrupt, truncated and hostile values each reach the dead-letter topic with their
//! reason.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use apache_avro::types::Value;
use common::{framed, produce_raw, FakeRegistry, Setup};
use deltalake::arrow::array::AsArray;
use deltalake::arrow::datatypes::Int64Type;
use strata::demo::{ORDER_V1, ORDER_V2};

const PAYMENT: &str = r#"{"type":"record","name":"Payment","namespace":"shop","fields":[
  {"name":"payment_id","type":"long"},
  {"name":"method","type":"string"},
  {"name":"event_time","type":{"type":"long","logicalType":"timestamp-millis"}}]}"#;

/// A record type with no subject: no table may take it.
const REFUND: &str = r#"{"type":"record","name":"Refund","namespace":"shop","fields":[
  {"name":"refund_id","type":"long"},
  {"name":"event_time","type":{"type":"long","logicalType":"timestamp-millis"}}]}"#;

const T0: i64 = 1_764_100_800_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Order,
    Payment,
    Dead(&'static str),
}

/// Order `n` as written by v2 (the v1 writer lacks the last two fields).
fn order_fields(n: i64, v1: bool) -> Value {
    let mut fields = vec![
        ("order_id".to_string(), Value::Long(n)),
        ("customer_id".to_string(), Value::String("c".into())),
        ("product".to_string(), Value::String("cable".into())),
        ("amount".to_string(), Value::Double(1.5)),
        ("event_time".to_string(), Value::TimestampMillis(T0 + n)),
    ];
    if !v1 {
        fields.push(("coupon".to_string(), Value::Union(0, Box::new(Value::Null))));
        fields.push(("quantity".to_string(), Value::Int(2)));
    }
    Value::Record(fields)
}

fn payment_fields(n: i64) -> Value {
    Value::Record(vec![
        ("payment_id".to_string(), Value::Long(n)),
        ("method".to_string(), Value::String("card".into())),
        ("event_time".to_string(), Value::TimestampMillis(T0 + n)),
    ])
}

fn order(n: i64, v1: bool) -> Vec<u8> {
    if v1 {
        framed(1, ORDER_V1, order_fields(n, true))
    } else {
        framed(2, ORDER_V2, order_fields(n, false))
    }
}

fn payment(n: i64) -> Vec<u8> {
    framed(10, PAYMENT, payment_fields(n))
}

/// A registry as TopicRecordNameStrategy producers leave it: subjects for orders and payments,
/// plus ids without a subject of their own (an older order writer, and a refund). Returns it and
/// its URL.
async fn topic_record_registry(setup: &Setup) -> (Arc<FakeRegistry>, String) {
    let registry = Arc::new(FakeRegistry::default());
    registry.register(&format!("{}-shop.Order", setup.topic), 2, ORDER_V2);
    registry.register(&format!("{}-shop.Payment", setup.topic), 10, PAYMENT);
    registry.ids.lock().expect("ids").insert(1, ORDER_V1.into());
    registry.ids.lock().expect("ids").insert(20, REFUND.into());
    let url = registry.serve().await;
    (registry, url)
}

/// The n-th record of a deterministic mix: orders (two writer versions), payments, and one in
/// ten something no table may take.
fn record(n: i64) -> (Kind, Vec<u8>) {
    match n % 20 {
        3 => (Kind::Dead("bad_magic"), {
            let mut v = payment(n);
            v[0] = 7;
            v
        }),
        7 => (Kind::Dead("empty_value"), Vec::new()),
        9 => (Kind::Dead("decode_error"), {
            let v = order(n, false);
            v[..v.len() / 2].to_vec() // truncated
        }),
        11 => (Kind::Dead("unknown_schema"), {
            let mut v = order(n, false);
            v[1..5].copy_from_slice(&999u32.to_be_bytes());
            v
        }),
        13 => (Kind::Dead("decode_error"), {
            // A payment whose string length prefix claims 2^62 bytes.
            let mut v = strata::schema::wire::frame(10, &[]);
            v.push(2); // payment_id = 1
            v.extend_from_slice(&[0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01]);
            v.extend_from_slice(b"card");
            v
        }),
        15 => (Kind::Dead("unknown_record_type"), {
            framed(
                20,
                REFUND,
                Value::Record(vec![
                    ("refund_id".to_string(), Value::Long(n)),
                    ("event_time".to_string(), Value::TimestampMillis(T0 + n)),
                ]),
            )
        }),
        17 => (Kind::Dead("decode_error"), {
            let mut v = order(n, true);
            v.extend_from_slice(&[1, 2, 3]); // trailing bytes
            v
        }),
        m if m % 2 == 0 => (Kind::Order, order(n, m % 4 == 0)),
        _ => (Kind::Payment, payment(n)),
    }
}

/// Produces records `range` of the mix; returns each offset's kind and the id it carries.
async fn produce_mix(topic: &str, range: std::ops::Range<i64>) -> BTreeMap<i64, (Kind, i64)> {
    let records: Vec<(Kind, Vec<u8>)> = range.clone().map(record).collect();
    let offsets = produce_raw(
        topic,
        records.iter().map(|(_, v)| (None, v.clone())).collect(),
    )
    .await;
    offsets
        .into_iter()
        .zip(range.zip(records))
        .map(|(offset, (n, (kind, _)))| (offset, (kind, n)))
        .collect()
}

/// Offsets and ids of the rows of table `name`, read back from the lake.
async fn rows(setup: &Setup, name: &str, id_column: &str) -> Vec<(i64, i64)> {
    let contents = strata::lake::verify::read_table(setup.table_url_of(name))
        .await
        .expect("read");
    let mut out = Vec::new();
    for batch in &contents.batches {
        let offsets = batch
            .column_by_name("_offset")
            .expect("_offset")
            .as_primitive::<Int64Type>();
        let ids = batch
            .column_by_name(id_column)
            .expect("id column")
            .as_primitive::<Int64Type>();
        out.extend((0..batch.num_rows()).map(|r| (offsets.value(r), ids.value(r))));
    }
    out.sort_unstable();
    out
}

/// Asserts, record by record, that the order and payment tables hold exactly the offsets (and ids)
/// produced as such, and that the dead-letter topic holds every other offset once with its reason.
async fn assert_tables_and_dead_letters(
    setup: &Setup,
    produced: &BTreeMap<i64, (Kind, i64)>,
) -> Vec<common::DeadLetter> {
    let expect = |kind: Kind| -> Vec<(i64, i64)> {
        produced
            .iter()
            .filter(|(_, (k, _))| *k == kind)
            .map(|(o, (_, n))| (*o, *n))
            .collect()
    };
    assert_eq!(rows(setup, "order", "order_id").await, expect(Kind::Order));
    assert_eq!(
        rows(setup, "payment", "payment_id").await,
        expect(Kind::Payment)
    );
    let dead: BTreeMap<i64, String> = produced
        .iter()
        .filter_map(|(o, (k, _))| match k {
            Kind::Dead(reason) => Some((*o, reason.to_string())),
            _ => None,
        })
        .collect();
    let letters = common::dead_letters(
        &format!("{}.dlq", setup.topic),
        dead.len() + 1, // one more than expected: a duplicate would show
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(letters.len(), dead.len(), "each dead letter once");
    let got: BTreeMap<i64, String> = letters
        .iter()
        .map(|l| (l.source.2, l.kind.clone()))
        .collect();
    assert_eq!(got, dead);
    letters
}

async fn wait_both(setup: &Setup, last: i64, replica: &common::Replica) {
    let deadline = Instant::now() + common::CATCH_UP;
    while Instant::now() < deadline {
        let order = setup.progress_of("order").await.get(&0).copied();
        let payment = setup.progress_of("payment").await.get(&0).copied();
        if order >= Some(last) && payment >= Some(last) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("tables did not reach offset {last}:\n{}", replica.tail(40));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_types_of_one_topic_reach_their_own_tables_and_hostile_values_the_dead_letters() {
    let setup = Setup::new("types", 1).await;
    let (_registry, url) = topic_record_registry(&setup).await;
    let env = [
        ("STRATA_SCHEMA_REGISTRY_URL", url.as_str()),
        ("STRATA_READER_SCHEMA", "latest"),
        ("STRATA_SUBJECT_NAME_STRATEGY", "topic_record"),
    ];

    let mut produced = produce_mix(&setup.topic, 0..1_000).await;
    let replica = setup.spawn(&env);
    wait_both(&setup, 999, &replica).await;
    replica.stop(Duration::from_secs(30));

    // A restart resumes where both tables are, and the new records go where they belong.
    produced.extend(produce_mix(&setup.topic, 1_000..2_000).await);
    let replica = setup.spawn(&env);
    wait_both(&setup, 1_999, &replica).await;
    assert_eq!(
        replica
            .metric("strata_records_skipped_duplicate_total")
            .await
            .unwrap_or(0.0),
        0.0,
        "resumed exactly after the committed offsets"
    );
    common::assert_accounting(&replica).await;

    let letters = assert_tables_and_dead_letters(&setup, &produced).await;
    let reasons: BTreeSet<&str> = letters.iter().map(|l| l.kind.as_str()).collect();
    assert_eq!(reasons.len(), 5, "every kind of bad input is covered");
    assert_eq!(replica.http_status("/healthz").await, 200);
    replica.stop(Duration::from_secs(30));
}

/// The order and payment records as branches of one union (TopicNameStrategy with a union).
fn union_of(first: &str, second: &str) -> String {
    format!(r#"["null", {first}, {second}]"#)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_union_of_record_types_fills_one_table_per_branch() {
    let setup = Setup::new("union", 1).await;
    let registry = Arc::new(FakeRegistry::default());
    // The subject's union, and another producer's union with the branches the other way round.
    let ours = union_of(ORDER_V2, PAYMENT);
    let theirs = union_of(PAYMENT, ORDER_V2);
    registry.register(&format!("{}-value", setup.topic), 30, &ours);
    registry.ids.lock().expect("ids").insert(31, theirs.clone());
    let url = registry.serve().await;

    let mut expected: BTreeMap<i64, (Kind, i64)> = BTreeMap::new();
    let mut values = Vec::new();
    for n in 0..1_200i64 {
        let (kind, value) = match n % 10 {
            0..=2 => (
                Kind::Order,
                framed(30, &ours, Value::Union(1, Box::new(order_fields(n, false)))),
            ),
            3..=4 => (
                Kind::Payment,
                framed(30, &ours, Value::Union(2, Box::new(payment_fields(n)))),
            ),
            5 => (
                Kind::Payment,
                framed(31, &theirs, Value::Union(1, Box::new(payment_fields(n)))),
            ),
            6 => (
                Kind::Order,
                framed(
                    31,
                    &theirs,
                    Value::Union(2, Box::new(order_fields(n, false))),
                ),
            ),
            7 => (
                Kind::Dead("unknown_record_type"),
                framed(30, &ours, Value::Union(0, Box::new(Value::Null))),
            ),
            8 => (Kind::Dead("decode_error"), {
                let mut v = strata::schema::wire::frame(30, &[14]); // branch 7 of 3
                v.extend_from_slice(&[0; 8]);
                v
            }),
            _ => (
                Kind::Dead("decode_error"),
                strata::schema::wire::frame(30, &[0x80]),
            ), // truncated index
        };
        values.push((kind, n, value));
    }
    let offsets = produce_raw(
        &setup.topic,
        values.iter().map(|(_, _, v)| (None, v.clone())).collect(),
    )
    .await;
    for (offset, (kind, n, _)) in offsets.iter().zip(&values) {
        expected.insert(*offset, (*kind, *n));
    }

    let replica = setup.spawn(&[
        ("STRATA_SCHEMA_REGISTRY_URL", url.as_str()),
        ("STRATA_READER_SCHEMA", "latest"),
    ]);
    wait_both(&setup, 1_199, &replica).await;
    common::assert_accounting(&replica).await;

    let letters = assert_tables_and_dead_letters(&setup, &expected).await;
    for letter in &letters {
        let produced = &values[letter.source.2 as usize].2;
        assert_eq!(
            letter.value.as_ref(),
            Some(produced),
            "dead letters keep the consumed bytes"
        );
    }
    replica.stop(Duration::from_secs(30));
}

/// SIGKILL after the first table's commit and before the second's: the next replica resumes at the
/// table that is behind, the other table skips what it holds, and nothing is dead-lettered twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_two_table_commits_loses_and_duplicates_nothing() {
    let setup = Setup::new("between", 1).await;
    let (_registry, url) = topic_record_registry(&setup).await;
    let env = [
        ("STRATA_SCHEMA_REGISTRY_URL", url.as_str()),
        ("STRATA_READER_SCHEMA", "latest"),
        ("STRATA_SUBJECT_NAME_STRATEGY", "topic_record"),
    ];
    let produced = produce_mix(&setup.topic, 0..1_000).await;

    // The tables commit in order (order, then payment): the first commit's failpoint freezes the
    // replica with the order table ahead.
    let mut crashing = env.to_vec();
    crashing.push(("STRATA_FAILPOINT", "after_delta_commit:1"));
    let doomed = setup.spawn(&crashing);
    assert!(
        doomed
            .wait_log(
                "STRATA_FAILPOINT_REACHED after_delta_commit",
                Duration::from_secs(120)
            )
            .await,
        "failpoint not reached:\n{}",
        doomed.tail(30)
    );
    let order_ahead = setup.progress_of("order").await.get(&0).copied();
    let payment_behind = setup.progress_of("payment").await.get(&0).copied();
    assert!(
        order_ahead.is_some() && payment_behind.is_none(),
        "{order_ahead:?} {payment_behind:?}"
    );
    doomed.sigkill();
    common::outlive_dead_member().await;

    let replica = setup.spawn(&env);
    wait_both(&setup, 999, &replica).await;
    let skipped = replica
        .metric("strata_records_skipped_duplicate_total")
        .await
        .unwrap_or(0.0);
    assert!(skipped > 0.0, "the order table skipped what it held");
    common::assert_accounting(&replica).await;
    assert_tables_and_dead_letters(&setup, &produced).await;
    replica.stop(Duration::from_secs(30));
}

/// A table that opens mid-run behind the others: a crash left the payment table behind the order
/// table, and the next replica starts while the payment subject is missing, so it resumes where the
/// order table is. When the subject is back, the payment table opens holding less than was read:
/// the partition seeks back to its progress, the order table skips what it holds, buffered rows are
/// dropped and read again, and the payments the crash left uncommitted still land, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_that_opens_mid_run_behind_the_others_loses_and_duplicates_nothing() {
    let setup = Setup::new("late-table", 1).await;
    let (registry, url) = topic_record_registry(&setup).await;
    let env = [
        ("STRATA_SCHEMA_REGISTRY_URL", url.as_str()),
        ("STRATA_READER_SCHEMA", "latest"),
        ("STRATA_SUBJECT_NAME_STRATEGY", "topic_record"),
    ];
    let mut produced = produce_mix(&setup.topic, 0..1_000).await;
    let replica = setup.spawn(&env);
    wait_both(&setup, 999, &replica).await;
    replica.stop(Duration::from_secs(30));

    // A crash after the order table's commit: the payment table stays at 999.
    produced.extend(produce_mix(&setup.topic, 1_000..2_000).await);
    let mut crashing = env.to_vec();
    crashing.push(("STRATA_FAILPOINT", "after_delta_commit:1"));
    let doomed = setup.spawn(&crashing);
    assert!(
        doomed
            .wait_log(
                "STRATA_FAILPOINT_REACHED after_delta_commit",
                Duration::from_secs(120)
            )
            .await,
        "failpoint not reached:\n{}",
        doomed.tail(30)
    );
    doomed.sigkill();
    let order_at = setup.progress_of("order").await.get(&0).copied();
    assert_eq!(order_at, Some(1_999), "the order table committed the epoch");
    assert_eq!(
        setup.progress_of("payment").await.get(&0).copied(),
        Some(999)
    );
    common::outlive_dead_member().await;

    // The payment subject is missing when the next replica starts: it knows only the order table
    // and resumes after 1999. Orders only arrive for a while.
    let payment_subject = format!("{}-shop.Payment", setup.topic);
    let versions = registry
        .subjects
        .lock()
        .expect("subjects")
        .remove(&payment_subject)
        .expect("payment subject");
    let orders_only: Vec<(Option<Vec<u8>>, Vec<u8>)> =
        (2_000..2_500).map(|n| (None, order(n, false))).collect();
    for (offset, n) in produce_raw(&setup.topic, orders_only)
        .await
        .into_iter()
        .zip(2_000..2_500)
    {
        produced.insert(offset, (Kind::Order, n));
    }
    // A flush interval long enough that the seek back replays rows still buffered.
    let mut slow = env.to_vec();
    slow.push(("STRATA_FLUSH_INTERVAL", "6s"));
    let replica = setup.spawn(&slow);
    let deadline = Instant::now() + common::CATCH_UP;
    while setup.progress_of("order").await.get(&0).copied() < Some(2_499) {
        assert!(Instant::now() < deadline, "{}", replica.tail(30));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // The subject is back and payments flow again.
    registry
        .subjects
        .lock()
        .expect("subjects")
        .insert(payment_subject, versions);
    produced.extend(produce_mix(&setup.topic, 2_500..3_000).await);
    wait_both(&setup, 2_999, &replica).await;
    assert!(
        replica.log_contains("new table is behind: seeking back"),
        "the scenario seeks back:\n{}",
        replica.tail(30)
    );
    assert_tables_and_dead_letters(&setup, &produced).await;
    replica.stop(Duration::from_secs(30));
}

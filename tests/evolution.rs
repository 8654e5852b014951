//! Schema evolution on a real broker (tansu) and S3 API (moto) with `STRATA_READER_SCHEMA=latest`:
//! a compatible v2 mid-stream evolves the table once and shares the open file with v1's rows; an
//! incompatible v3 is dead-lettered with the offending field named while the replica keeps going.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use apache_avro::types::Value;
use common::{framed, produce_raw, FakeRegistry, Setup};
use deltalake::arrow::array::{Array, AsArray};
use deltalake::arrow::datatypes::{Int32Type, Int64Type};
use futures::StreamExt;
use strata::demo::{ORDER_V1, ORDER_V2};

/// v3 turns `amount` from a double into a string: no Avro promotion allows that.
const ORDER_V3: &str = r#"{"type":"record","name":"Order","namespace":"shop","fields":[
  {"name":"order_id","type":"long"},
  {"name":"customer_id","type":"string"},
  {"name":"product","type":"string"},
  {"name":"amount","type":"string"},
  {"name":"event_time","type":{"type":"long","logicalType":"timestamp-millis"}},
  {"name":"coupon","type":["null","string"],"default":null},
  {"name":"quantity","type":"int","default":1}]}"#;

/// One event hour for every record, so the file count depends on the roll policy only.
const HOUR_START_MS: i64 = 1_764_100_800_000; // 2025-11-25T20:00:00Z

fn order(version: u8, n: i64) -> Vec<u8> {
    let mut fields = vec![
        ("order_id".to_string(), Value::Long(n)),
        (
            "customer_id".to_string(),
            Value::String(format!("c{}", n % 7)),
        ),
        ("product".to_string(), Value::String("dock".to_string())),
    ];
    if version == 3 {
        fields.push(("amount".to_string(), Value::String(format!("{n}.50"))));
    } else {
        fields.push(("amount".to_string(), Value::Double(n as f64 + 0.5)));
    }
    fields.push((
        "event_time".to_string(),
        Value::TimestampMillis(HOUR_START_MS + n * 1_000),
    ));
    if version >= 2 {
        fields.push((
            "coupon".to_string(),
            Value::Union(1, Box::new(Value::String(format!("SAVE{n}")))),
        ));
        fields.push(("quantity".to_string(), Value::Int(5)));
    }
    let (id, schema) = match version {
        1 => (1, ORDER_V1),
        2 => (2, ORDER_V2),
        _ => (3, ORDER_V3),
    };
    framed(id, schema, Value::Record(fields))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_evolves_the_table_once_without_extra_files_and_refuses_an_incompatible_version() {
    let setup = Setup::new("evolve", 1).await;
    let subject = format!("{}-value", setup.topic);
    let registry = Arc::new(FakeRegistry::default());
    registry.register(&subject, 1, ORDER_V1);
    let url = registry.serve().await;

    // Files roll (and flushes start) at 600 rows; the age limit is far away.
    let replica = setup.spawn(&[
        ("STRATA_SCHEMA_REGISTRY_URL", &url),
        ("STRATA_READER_SCHEMA", "latest"),
        ("STRATA_FILE_MAX_ROWS", "600"),
        ("STRATA_FLUSH_INTERVAL", "10m"),
    ]);

    // 300 v1 rows are buffered under the v1 table...
    let v1 = produce_raw(
        &setup.topic,
        (0..300).map(|n| (None, order(1, n))).collect(),
    )
    .await;
    replica
        .wait_metric("strata_records_buffered", 300.0, "v1 rows buffered")
        .await;
    assert!(setup.progress().await.is_empty(), "nothing committed yet");

    // ...then the producers move to v2 (coupon and quantity added, with defaults).
    registry.register(&subject, 2, ORDER_V2);
    let v2 = produce_raw(
        &setup.topic,
        (300..600).map(|n| (None, order(2, n))).collect(),
    )
    .await;
    let first_flush = common::Produced {
        good: v1
            .iter()
            .chain(&v2)
            .map(|o| (setup.topic.clone(), 0, *o))
            .collect(),
        ..Default::default()
    };
    setup.catch_up(&first_flush, &[&replica]).await;

    let contents = strata::lake::verify::read_table(setup.table_url())
        .await
        .expect("read");
    assert_eq!(
        contents.files, 1,
        "600 rows of one event hour at 600 rows per file: one file, schema change or not"
    );
    let batch = &contents.batches[0];
    let offsets = batch
        .column_by_name("_offset")
        .expect("_offset")
        .as_primitive::<Int64Type>();
    let coupons = batch
        .column_by_name("coupon")
        .expect("the table gained coupon")
        .as_string::<i32>();
    let quantities = batch
        .column_by_name("quantity")
        .expect("the table gained quantity")
        .as_primitive::<Int32Type>();
    let ids = batch
        .column_by_name("order_id")
        .expect("order_id")
        .as_primitive::<Int64Type>();
    let mut seen = BTreeSet::new();
    for row in 0..batch.num_rows() {
        let n = ids.value(row);
        assert_eq!(n, offsets.value(row), "order n was produced at offset n");
        assert!(seen.insert(n), "offset {n} twice");
        if n < 300 {
            assert!(coupons.is_null(row), "v1 row {n} reads coupon as null");
            assert!(quantities.is_null(row), "v1 row {n} reads quantity as null");
        } else {
            assert_eq!(coupons.value(row), format!("SAVE{n}"));
            assert_eq!(quantities.value(row), 5);
        }
    }
    assert_eq!(seen.len(), 600, "every offset exactly once");

    // One metadata commit added both columns.
    let table = deltalake::DeltaTable::try_from_url(setup.table_url())
        .await
        .expect("table");
    let operations: Vec<String> = table
        .history(None)
        .filter_map(|c| async move { c.ok().and_then(|c| c.operation) })
        .collect()
        .await;
    assert_eq!(
        operations.iter().filter(|o| *o == "ADD COLUMN").count(),
        1,
        "{operations:?}"
    );
    assert_eq!(
        replica
            .metric_where("strata_schema_evolutions_total", "result=\"evolved\"")
            .await,
        Some(1.0)
    );

    // v3 is incompatible: its records are dead-lettered, v2 records around them still land.
    registry.register(&subject, 3, ORDER_V3);
    let mut values = Vec::new();
    for n in 600..1_300 {
        values.push((
            Some(n.to_string().into_bytes()),
            order(if n % 7 == 0 { 3 } else { 2 }, n),
        ));
    }
    let offsets = produce_raw(&setup.topic, values).await;
    let (bad, good): (Vec<i64>, Vec<i64>) = offsets.iter().partition(|o| *o % 7 == 0);
    assert_eq!(good.len(), 600, "600 good rows fill exactly one more file");
    let second = common::Produced {
        good: good.iter().map(|o| (setup.topic.clone(), 0, *o)).collect(),
        ..Default::default()
    };
    setup.catch_up(&second, &[&replica]).await;
    let letters = common::dead_letters(
        &format!("{}.dlq", setup.topic),
        bad.len(),
        Duration::from_secs(60),
    )
    .await;
    let dead: BTreeMap<i64, &common::DeadLetter> =
        letters.iter().map(|l| (l.source.2, l)).collect();
    assert_eq!(
        dead.keys().copied().collect::<Vec<_>>(),
        bad,
        "exactly the v3 records are dead-lettered"
    );
    for letter in dead.values() {
        assert_eq!(letter.kind, "incompatible_schema");
        assert!(
            letter.message.contains("amount"),
            "the reason names the field: {}",
            letter.message
        );
        assert_eq!(
            letter.key.as_deref(),
            Some(letter.source.2.to_string().as_bytes())
        );
    }
    assert_eq!(
        replica
            .metric_where("strata_schema_evolutions_total", "result=\"refused\"")
            .await,
        Some(1.0),
        "v3 cannot become the table's schema"
    );
    let contents = strata::lake::verify::read_table(setup.table_url())
        .await
        .expect("read");
    assert_eq!(contents.files, 2, "one file per 600 rows");
    let lineage = strata::lake::verify::lineage(&contents.batches).expect("lineage");
    let committed: Vec<(String, i32, i64)> = v1
        .iter()
        .chain(&v2)
        .chain(&good)
        .map(|o| (setup.topic.clone(), 0, *o))
        .collect();
    let report = strata::lake::verify::exactly_once(lineage, committed.into_iter());
    assert!(report.is_exact(), "{report}");
    assert!(
        replica.http_status("/healthz").await == 200,
        "still running"
    );
    common::assert_accounting(&replica).await;
    replica.stop(Duration::from_secs(30));
}

//! The decoder's behaviour: writer versions into the reader shape, bad records alone, modes.

use super::*;
use apache_avro::types::Value;
use proptest::prelude::*;

pub const V1: &str = r#"{"type":"record","name":"Order","namespace":"shop","fields":[
    {"name":"id","type":"long"},
    {"name":"customer","type":"string"},
    {"name":"amount","type":"double"},
    {"name":"event_time","type":{"type":"long","logicalType":"timestamp-millis"}}]}"#;
pub const V2: &str = r#"{"type":"record","name":"Order","namespace":"shop","fields":[
    {"name":"id","type":"long"},
    {"name":"customer","type":"string"},
    {"name":"amount","type":"double"},
    {"name":"event_time","type":{"type":"long","logicalType":"timestamp-millis"}},
    {"name":"coupon","type":["null","string"],"default":null}]}"#;

fn encode(schema_json: &str, id: u32, n: i64, coupon: Option<&str>) -> Vec<u8> {
    let schema = apache_avro::Schema::parse_str(schema_json).expect("schema");
    let mut fields = vec![
        ("id".to_string(), Value::Long(n)),
        ("customer".to_string(), Value::String(format!("c{n}"))),
        ("amount".to_string(), Value::Double(n as f64 / 2.0)),
        (
            "event_time".to_string(),
            Value::TimestampMillis(1_700_000_000_000 + n),
        ),
    ];
    if schema_json.contains("coupon") {
        let value = match coupon {
            Some(c) => Value::Union(1, Box::new(Value::String(c.to_string()))),
            None => Value::Union(0, Box::new(Value::Null)),
        };
        fields.push(("coupon".to_string(), value));
    }
    wire::frame(
        id,
        &crate::demo::avro_body(&schema, Value::Record(fields)).expect("encode"),
    )
}

fn record(offset: i64, value: Vec<u8>) -> SourceRecord {
    SourceRecord {
        topic: "orders".into(),
        partition: 3,
        offset,
        timestamp_ms: Some(1_700_000_000_000),
        key: None,
        value: Some(value.into()),
        headers: Vec::new(),
    }
}

fn decoder(reader: &str) -> BatchDecoder {
    let mut d = BatchDecoder::new(reader, "event_time", 4).expect("decoder");
    d.register(1, Ok(V1));
    d.register(2, Ok(V2));
    d
}

fn offsets(batch: &RecordBatch) -> Vec<i64> {
    let column = batch.column_by_name("_offset").expect("_offset");
    column
        .as_any()
        .downcast_ref::<Int64Array>()
        .expect("i64")
        .values()
        .to_vec()
}

#[test]
fn decodes_two_writer_versions_into_the_reader_shape() {
    let mut d = decoder(V2);
    let records: Vec<_> = (0..10)
        .map(|n| {
            if n % 3 == 0 {
                record(n, encode(V1, 1, n, None))
            } else {
                record(n, encode(V2, 2, n, Some("X")))
            }
        })
        .collect();
    let out = d.decode(&records);
    assert!(out.rejected.is_empty(), "{:?}", out.rejected);
    let batch = out.batch.expect("rows");
    assert_eq!(offsets(&batch), (0..10).collect::<Vec<_>>());
    let ids = batch
        .column_by_name("id")
        .expect("id")
        .as_any()
        .downcast_ref::<Int64Array>()
        .expect("i64")
        .clone();
    assert_eq!(ids.values().to_vec(), (0..10).collect::<Vec<_>>());
    let coupon = batch.column_by_name("coupon").expect("coupon");
    assert!(coupon.is_null(0) && coupon.is_null(3) && !coupon.is_null(1));
    let schema_ids = batch
        .column_by_name("_schema_id")
        .expect("id")
        .as_any()
        .downcast_ref::<Int64Array>()
        .expect("i64")
        .clone();
    assert_eq!(schema_ids.value(0), 1);
    assert_eq!(schema_ids.value(1), 2);
    assert_eq!(
        batch
            .schema()
            .field_with_name("event_time")
            .expect("f")
            .data_type(),
        &DataType::Timestamp(TimeUnit::Microsecond, Some(UTC.into()))
    );
}

#[test]
fn bad_records_are_rejected_without_harming_neighbours() {
    let mut d = decoder(V1);
    let good = |n| record(n, encode(V1, 1, n, None));
    let mut truncated = encode(V1, 1, 2, None);
    truncated.truncate(truncated.len() - 3);
    let mut trailing = encode(V1, 1, 5, None);
    trailing.extend_from_slice(&[0, 0, 0, 0, 1]);
    let records = vec![
        good(0),
        good(1),
        record(2, truncated),
        record(3, b"{\"json\": true}".to_vec()),
        record(4, wire::frame(99, b"\x02")),
        record(5, trailing),
        good(6),
        record(7, Vec::new()),
        good(8),
    ];
    d.register(
        99,
        Err(&RegistryError::NotFound {
            id: 99,
            message: "Schema not found".into(),
        }),
    );
    let out = d.decode(&records);
    let kinds: Vec<_> = out.rejected.iter().map(|(i, r)| (*i, r.kind)).collect();
    assert_eq!(
        kinds,
        vec![
            (2, ErrorKind::DecodeError),
            (3, ErrorKind::BadMagic),
            (4, ErrorKind::UnknownSchema),
            (5, ErrorKind::DecodeError),
            (7, ErrorKind::EmptyValue)
        ]
    );
    assert_eq!(offsets(&out.batch.expect("rows")), vec![0, 1, 6, 8]);
}

#[test]
fn invalid_utf8_is_rejected_alone() {
    let mut d = decoder(V1);
    let good = |n| record(n, encode(V1, 1, n, None));
    // A V1 record whose customer string holds the bytes ff fe: valid Avro, invalid UTF-8,
    // which arrow only notices when it builds the string array at flush.
    let mut body = vec![0x02, 0x04, 0xff, 0xfe, 0x00];
    body.extend_from_slice(&1.5f64.to_le_bytes());
    body.push(0x02);
    let records = vec![good(0), record(1, wire::frame(1, &body)), good(2), good(3)];
    let out = d.decode(&records);
    assert_eq!(out.rejected.len(), 1, "{:?}", out.rejected);
    assert_eq!(out.rejected[0].0, 1);
    assert_eq!(offsets(&out.batch.expect("rows")), vec![0, 2, 3]);
    // The decoder is healthy afterwards.
    let again = d.decode(&[good(4), good(5)]);
    assert_eq!(offsets(&again.batch.expect("rows")), vec![4, 5]);
}

#[test]
fn incompatible_writer_is_refused() {
    let mut d = decoder(V1);
    let incompatible = r#"{"type":"record","name":"Order","namespace":"shop","fields":[{"name":"id","type":"string"}]}"#;
    d.register(7, Ok(incompatible));
    let out = d.decode(&[record(0, wire::frame(7, b"\x02a"))]);
    assert_eq!(out.rejected[0].1.kind, ErrorKind::IncompatibleSchema);
    assert!(out.batch.is_none());
}

#[test]
fn compatibility_mode_decides_with_confluent_meaning() {
    // A writer that adds a required field. The reader ignores the field, so arrow-avro could
    // decode it; whether the mode allows it depends on which of the two is newer.
    let adds_required = V1.replace(
        r#"{"name":"amount","type":"double"},"#,
        r#"{"name":"amount","type":"double"},{"name":"channel","type":"string"},"#,
    );
    let schema = apache_avro::Schema::parse_str(&adds_required).expect("schema");
    let body = crate::demo::avro_body(
        &schema,
        Value::Record(vec![
            ("id".into(), Value::Long(7)),
            ("customer".into(), Value::String("c".into())),
            ("amount".into(), Value::Double(1.0)),
            ("channel".into(), Value::String("web".into())),
            ("event_time".into(), Value::TimestampMillis(5)),
        ]),
    )
    .expect("encode");
    let judged = |mode: Compatibility, reader_id: Option<u32>| {
        let mut d = BatchDecoder::new(V1, "event_time", 8)
            .expect("decoder")
            .with_compatibility(mode)
            .with_reader_id(reader_id);
        d.register(5, Ok(&adds_required));
        d.decode(&[record(0, wire::frame(5, &body))])
    };
    // The writer is newer (id 5 after the reader's 3): BACKWARD asks the writer to read the
    // reader's data, which lacks `channel`: refused, naming the field. FORWARD asks the reader to
    // read the writer's data: accepted.
    let out = judged(Compatibility::Backward, Some(3));
    assert_eq!(out.rejected[0].1.kind, ErrorKind::IncompatibleSchema);
    let message = &out.rejected[0].1.message;
    assert!(
        message.contains("channel") && message.contains("BACKWARD"),
        "{message}"
    );
    let out = judged(Compatibility::Forward, Some(3));
    assert!(out.rejected.is_empty(), "{:?}", out.rejected);
    assert_eq!(offsets(&out.batch.expect("rows")), vec![0]);
    // The reader is newer (a file, or a later id): the other way round.
    for reader_id in [None, Some(9)] {
        assert!(judged(Compatibility::Backward, reader_id)
            .rejected
            .is_empty());
        assert_eq!(judged(Compatibility::Forward, reader_id).rejected.len(), 1);
        assert_eq!(judged(Compatibility::Full, reader_id).rejected.len(), 1);
    }
}

#[test]
fn null_event_time_is_rejected() {
    let reader = r#"{"type":"record","name":"E","fields":[{"name":"event_time","type":["null",{"type":"long","logicalType":"timestamp-micros"}]}]}"#;
    let mut d = BatchDecoder::new(reader, "event_time", 8).expect("decoder");
    d.register(1, Ok(reader));
    let schema = apache_avro::Schema::parse_str(reader).expect("schema");
    let body = |v: Value| {
        crate::demo::avro_body(&schema, Value::Record(vec![("event_time".into(), v)])).expect("enc")
    };
    let records = vec![
        record(
            0,
            wire::frame(
                1,
                &body(Value::Union(1, Box::new(Value::TimestampMicros(5)))),
            ),
        ),
        record(
            1,
            wire::frame(1, &body(Value::Union(0, Box::new(Value::Null)))),
        ),
    ];
    let out = d.decode(&records);
    assert_eq!(out.rejected.len(), 1);
    assert_eq!(out.rejected[0].1.kind, ErrorKind::MissingEventTime);
    assert_eq!(offsets(&out.batch.expect("rows")), vec![0]);
}

#[test]
fn a_new_reader_judges_every_writer_again() {
    const V3: &str = r#"{"type":"record","name":"Order","namespace":"shop","fields":[
        {"name":"id","type":"long"},
        {"name":"customer","type":"string"},
        {"name":"amount","type":"string"},
        {"name":"event_time","type":{"type":"long","logicalType":"timestamp-millis"}}]}"#;
    let mut d = BatchDecoder::new(V1, "event_time", 4).expect("decoder");
    d.register(1, Ok(V1));
    d.register(2, Ok(V2));
    d.register(3, Ok(V3));
    d.register(
        4,
        Err(&RegistryError::NotFound {
            id: 4,
            message: "gone".into(),
        }),
    );
    assert_eq!(d.verdict(2), Some(None));
    assert!(
        d.verdict(3).is_some_and(|r| r.is_some()),
        "amount changed type"
    );
    assert!(d.output_schema().field_with_name("coupon").is_err());

    let mut next = d.with_reader(V2, None).expect("v2 reader");
    assert_eq!(next.verdict(1), Some(None));
    assert_eq!(next.verdict(2), Some(None));
    assert_eq!(
        next.verdict(3).flatten().map(|r| r.kind),
        Some(ErrorKind::IncompatibleSchema)
    );
    assert_eq!(
        next.verdict(4).flatten().map(|r| r.kind),
        Some(ErrorKind::UnknownSchema)
    );
    let out = next.decode(&[
        record(0, encode(V1, 1, 0, None)),
        record(1, encode(V2, 2, 1, Some("SAVE"))),
    ]);
    assert!(out.rejected.is_empty(), "{:?}", out.rejected);
    let batch = out.batch.expect("rows");
    let coupons = batch.column_by_name("coupon").expect("coupon");
    assert!(coupons.is_null(0), "v1 rows read the default (null)");
    assert!(!coupons.is_null(1));
}

/// Avro's promotions: int → long, float → double, string ↔ bytes; and what they do not allow.
#[test]
fn promotions_follow_avro_rules() {
    let schema = |amount: &str, name: &str| {
        format!(
            r#"{{"type":"record","name":"P","fields":[
            {{"name":"n","type":"{amount}"}},
            {{"name":"x","type":"{name}"}},
            {{"name":"event_time","type":{{"type":"long","logicalType":"timestamp-millis"}}}}]}}"#
        )
    };
    let reader = schema("long", "bytes");
    let mut d = BatchDecoder::new(&reader, "event_time", 8).expect("decoder");
    let narrow = schema("int", "string");
    d.register(1, Ok(&narrow));
    assert_eq!(
        d.verdict(1),
        Some(None),
        "int → long and string → bytes promote"
    );
    let body = crate::demo::avro_body(
        &apache_avro::Schema::parse_str(&narrow).expect("schema"),
        Value::Record(vec![
            ("n".into(), Value::Int(-7)),
            ("x".into(), Value::String("hé".into())),
            ("event_time".into(), Value::TimestampMillis(1)),
        ]),
    )
    .expect("encode");
    let out = d.decode(&[record(0, wire::frame(1, &body))]);
    let batch = out.batch.expect("row");
    let n = batch.column_by_name("n").expect("n");
    assert_eq!(
        n.as_any()
            .downcast_ref::<Int64Array>()
            .expect("long")
            .value(0),
        -7
    );
    let x = batch.column_by_name("x").expect("x");
    assert_eq!(x.data_type(), &DataType::Binary);

    let doubles = schema("double", "string");
    let mut d = BatchDecoder::new(&doubles, "event_time", 8).expect("decoder");
    d.register(2, Ok(&schema("float", "bytes")));
    assert_eq!(
        d.verdict(2),
        Some(None),
        "float → double and bytes → string promote"
    );
    // No demotion: a long cannot be read as an int.
    let mut d = BatchDecoder::new(&schema("int", "string"), "event_time", 8).expect("decoder");
    d.register(3, Ok(&schema("long", "string")));
    assert_eq!(
        d.verdict(3).flatten().map(|r| r.kind),
        Some(ErrorKind::IncompatibleSchema)
    );
}

#[test]
fn an_event_time_beyond_the_table_range_is_rejected_alone() {
    let mut d = decoder(V2);
    let schema = apache_avro::Schema::parse_str(V2).expect("schema");
    let far = crate::demo::avro_body(
        &schema,
        Value::Record(vec![
            ("id".into(), Value::Long(1)),
            ("customer".into(), Value::String("c".into())),
            ("amount".into(), Value::Double(1.0)),
            // Milliseconds whose microseconds overflow an i64.
            ("event_time".into(), Value::TimestampMillis(i64::MAX / 999)),
            ("coupon".into(), Value::Union(0, Box::new(Value::Null))),
        ]),
    )
    .expect("encode");
    let out = d.decode(&[
        record(0, encode(V2, 2, 0, None)),
        record(1, wire::frame(2, &far)),
        record(2, encode(V2, 2, 2, None)),
    ]);
    assert_eq!(out.rejected.len(), 1, "{:?}", out.rejected);
    assert_eq!(out.rejected[0].0, 1);
    assert!(out.rejected[0].1.message.contains("out of range"));
    assert_eq!(offsets(&out.batch.expect("rows")), vec![0, 2]);
}

#[test]
fn event_time_field_is_checked_at_setup() {
    assert!(matches!(
        BatchDecoder::new(V1, "nope", 8),
        Err(DecoderSetupError::EventTime { .. })
    ));
    assert!(matches!(
        BatchDecoder::new(V1, "amount", 8),
        Err(DecoderSetupError::EventTime { .. })
    ));
}

proptest! {
    // 512 cases in `make test`; PROPTEST_CASES=100000 for a long hunt.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(512),
        ..ProptestConfig::default()
    })]
    /// Hostile bodies: never a panic, and every input is accounted for exactly once.
    #[test]
    fn every_record_is_a_row_or_a_rejection(bodies in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 1..12), good_every in 1usize..4) {
        let mut d = decoder(V2);
        let records: Vec<_> = bodies.into_iter().enumerate().map(|(i, body)| {
            if i % good_every == 0 { record(i as i64, encode(V2, 2, i as i64, None)) } else { record(i as i64, wire::frame(1 + (i % 2) as u32, &body)) }
        }).collect();
        let out = d.decode(&records);
        let rows = out.batch.as_ref().map(offsets).unwrap_or_default();
        let mut seen: Vec<i64> = rows.clone();
        seen.extend(out.rejected.iter().map(|(i, _)| *i as i64));
        seen.sort_unstable();
        prop_assert_eq!(seen, (0..records.len() as i64).collect::<Vec<_>>());
        for (i, r) in records.iter().enumerate() {
            if i % good_every == 0 { prop_assert!(rows.contains(&r.offset)); }
        }
    }
}

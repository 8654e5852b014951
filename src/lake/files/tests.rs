//! Files roll on rows and bytes, one event hour per file, and Parquet round-trips.

use super::*;
use proptest::prelude::*;

fn decoded_orders(n: usize) -> (crate::silver::decode::BatchDecoder, RecordBatch) {
    let mut decoder = crate::demo::order_decoder(4096).expect("decoder");
    let records = crate::demo::generated_records(n, 3, 1).expect("records");
    let batch = decoder.decode(&records).batch.expect("rows");
    (decoder, batch)
}

#[tokio::test]
async fn files_roll_on_rows_and_bytes_and_split_by_hour() {
    let (decoder, batch) = decoded_orders(3_000);
    let store = Arc::new(object_store::memory::InMemory::new());
    let writer = |max_rows, max_bytes| {
        SilverWriter::new(
            decoder.output_schema(),
            "event_time",
            FilePolicy {
                max_rows,
                max_bytes,
                compression: Compression::Snappy,
                delta_encoding: true,
            },
            store.clone(),
        )
    };
    let times = batch
        .column(decoder.event_time_index())
        .as_primitive::<TimestampMicrosecondType>();
    let mut hours: BTreeMap<(i32, i32), usize> = BTreeMap::new();
    for row in 0..batch.num_rows() {
        *hours.entry(date_hour(times.value(row))).or_default() += 1;
    }
    let files_for = |per_file: usize| hours.values().map(|n| n.div_ceil(per_file)).sum::<usize>();

    let unlimited = writer(usize::MAX, usize::MAX)
        .write(std::slice::from_ref(&batch))
        .await
        .expect("write");
    assert_eq!(unlimited.len(), hours.len(), "one file per event hour");
    let by_rows = writer(500, usize::MAX)
        .write(std::slice::from_ref(&batch))
        .await
        .expect("write");
    assert_eq!(by_rows.len(), files_for(500));
    let bytes_per_row = batch.get_array_memory_size() / batch.num_rows();
    let by_bytes = writer(usize::MAX, bytes_per_row * 250)
        .write(std::slice::from_ref(&batch))
        .await
        .expect("write");
    assert_eq!(by_bytes.len(), files_for(250));

    let rows: i64 = by_rows
        .iter()
        .map(|add| {
            let stats: serde_json::Value =
                serde_json::from_str(add.stats.as_deref().expect("stats")).expect("json");
            stats["numRecords"].as_i64().expect("numRecords")
        })
        .sum();
    assert_eq!(rows, 3_000);
    for add in &by_rows {
        let (date, hour) = (
            &add.partition_values["event_date"],
            &add.partition_values["event_hour"],
        );
        assert!(add.path.starts_with(&format!(
            "event_date={}/event_hour={}/",
            date.as_deref().expect("date"),
            hour.as_deref().expect("hour")
        )));
        let stored = store
            .head(&Path::from(add.path.as_str()))
            .await
            .expect("uploaded");
        assert_eq!(stored.size as i64, add.size);
    }
}

#[test]
fn dictionaries_only_where_values_repeat() {
    let (_, batch) = decoded_orders(20_000);
    let bytes = encode_parquet(&batch, Compression::Zstd, true).expect("encoded");
    let reader = deltalake::parquet::file::serialized_reader::SerializedFileReader::new(
        bytes::Bytes::from(bytes),
    )
    .expect("parquet");
    use deltalake::parquet::file::reader::FileReader;
    let row_group = reader.metadata().row_group(0);
    let columns: Vec<String> = (0..row_group.num_columns())
        .map(|i| row_group.column(i).column_path().string())
        .collect();
    let with_dictionary: Vec<String> = (0..row_group.num_columns())
        .map(|i| row_group.column(i))
        .filter(|c| c.dictionary_page_offset().is_some())
        .map(|c| c.column_path().string())
        .collect();
    for repeated in ["customer_id", "product", "_topic", "_partition"] {
        assert!(
            with_dictionary.iter().any(|c| c == repeated),
            "{repeated}: {with_dictionary:?}"
        );
    }
    for unique in [
        "order_id",
        "amount",
        "event_time",
        "_offset",
        "_kafka_timestamp",
        "_ingested_at",
    ] {
        assert!(columns.iter().any(|c| c == unique), "{unique}: {columns:?}");
        assert!(
            !with_dictionary.iter().any(|c| c == unique),
            "{unique}: {with_dictionary:?}"
        );
    }
    // Integers and times without a dictionary are written as deltas; doubles stay plain.
    let encodings = |name: &str| {
        (0..row_group.num_columns())
            .map(|i| row_group.column(i))
            .find(|c| c.column_path().string() == name)
            .map(|c| c.encodings().collect::<Vec<_>>())
            .unwrap_or_default()
    };
    use deltalake::parquet::basic::Encoding;
    for delta in [
        "order_id",
        "event_time",
        "_offset",
        "_kafka_timestamp",
        "_ingested_at",
    ] {
        assert!(
            encodings(delta).contains(&Encoding::DELTA_BINARY_PACKED),
            "{delta}: {:?}",
            encodings(delta)
        );
    }
    assert!(encodings("amount").contains(&Encoding::PLAIN));
    assert!(!encodings("amount").contains(&Encoding::DELTA_BINARY_PACKED));
    // And the file reads back whole.
    let read: Vec<_> = reader
        .get_row_iter(None)
        .expect("rows")
        .collect::<Result<_, _>>()
        .expect("every row reads");
    assert_eq!(read.len(), batch.num_rows());

    // With STRATA_PARQUET_DELTA_ENCODING=false the same columns are plain.
    let bytes = encode_parquet(&batch, Compression::Zstd, false).expect("encoded");
    let reader = deltalake::parquet::file::serialized_reader::SerializedFileReader::new(
        bytes::Bytes::from(bytes),
    )
    .expect("parquet");
    let row_group = reader.metadata().row_group(0);
    for i in 0..row_group.num_columns() {
        let column = row_group.column(i);
        assert!(
            !column
                .encodings()
                .any(|e| e == Encoding::DELTA_BINARY_PACKED),
            "{}",
            column.column_path().string()
        );
    }
    let order_id = (0..row_group.num_columns())
        .map(|i| row_group.column(i))
        .find(|c| c.column_path().string() == "order_id")
        .expect("order_id");
    assert!(order_id.encodings().any(|e| e == Encoding::PLAIN));
    assert!(order_id.dictionary_page_offset().is_none());
}

/// The sample's verdict on columns of known cardinality: a key that never repeats loses its
/// dictionary, while values repeating a few times per file keep it, whatever the type.
#[test]
fn a_dictionary_is_kept_where_sampled_values_repeat() {
    use deltalake::arrow::array::{Int32Array, Int64Array, StringArray, UInt64Array};
    let file_rows = 100_000;
    // Each row's value drawn at random from `distinct` ones (SplitMix64 of the row).
    let ints = |distinct: i64| -> Int64Array {
        (0..file_rows as u64)
            .map(|i| {
                let mut z = i.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                ((z ^ (z >> 31)) % distinct as u64) as i64
            })
            .collect()
    };
    let strings = |distinct: i64| -> StringArray {
        ints(distinct)
            .iter()
            .map(|v| v.map(|v| format!("customer-{v}")))
            .collect()
    };
    // Unique (drawn from 2^40), and nearly so (drawn from 300,000: 85 % of the rows hold a value
    // no other row holds): no dictionary.
    for distinct in [1 << 40, 300_000] {
        assert!(!repeats_enough(&ints(distinct), file_rows), "{distinct}");
        assert!(!repeats_enough(&strings(distinct), file_rows), "{distinct}");
    }
    // A customer id (20,000), a product (12), a status: a dictionary.
    for distinct in [20_000, 12, 3] {
        assert!(repeats_enough(&ints(distinct), file_rows), "{distinct}");
        assert!(repeats_enough(&strings(distinct), file_rows), "{distinct}");
    }
    // Narrower integers are judged alike, and unsigned ones past i64::MAX too.
    let narrow: Int32Array = (0..file_rows as i32).collect();
    assert!(!repeats_enough(&narrow, file_rows));
    let high: UInt64Array = (0..file_rows as u64).map(|i| u64::MAX - i).collect();
    assert!(!repeats_enough(&high, file_rows));
    let high_repeating: UInt64Array = (0..file_rows as u64).map(|i| u64::MAX - i % 7).collect();
    assert!(repeats_enough(&high_repeating, file_rows));
    // A small file, or a sample of nulls, keeps the default.
    assert!(repeats_enough(&ints(file_rows as i64), 2_000));
    let nulls = Int64Array::from(vec![None; file_rows]);
    assert!(repeats_enough(&nulls, file_rows));
}

#[test]
fn dates_and_hours() {
    // 2023-11-14T22:13:20Z
    assert_eq!(date_hour(1_700_000_000_000_000), (19_675, 22));
    assert_eq!(date_string(19_675), "2023-11-14");
    assert_eq!(date_hour(-1), (-1, 23));
    assert_eq!(date_string(-1), "1969-12-31");
}

proptest! {
    #[test]
    fn date_hour_agrees_with_chrono(micros in -10_000_000_000_000_000i64..10_000_000_000_000_000i64) {
        let (days, hour) = date_hour(micros);
        let expected = chrono::DateTime::from_timestamp_micros(micros).expect("in range");
        prop_assert_eq!(date_string(days), expected.format("%Y-%m-%d").to_string());
        prop_assert_eq!(hour, expected.format("%H").to_string().parse::<i32>().expect("hour"));
    }
}

proptest! {
    /// Files cut an hour's rows in order, none lost or repeated, none over the limit, all but
    /// the last full.
    #[test]
    fn split_rows_cuts_in_order_into_full_files(
        sizes in prop::collection::vec(0usize..50, 0..10),
        per_file in 1usize..40,
    ) {
        let pieces: HourRows = sizes
            .iter()
            .enumerate()
            .map(|(i, n)| (i, (0..*n as u32).collect()))
            .collect();
        let files = split_rows(&pieces, per_file);
        let flat: Vec<(usize, u32)> = files
            .iter()
            .flat_map(|f| f.iter().flat_map(|(b, rows)| rows.iter().map(move |r| (*b, *r))))
            .collect();
        let expected: Vec<(usize, u32)> = pieces
            .iter()
            .flat_map(|(b, rows)| rows.iter().map(move |r| (*b, *r)))
            .collect();
        prop_assert_eq!(flat, expected);
        for (i, file) in files.iter().enumerate() {
            let n: usize = file.iter().map(|(_, r)| r.len()).sum();
            prop_assert!(n <= per_file);
            prop_assert!(n == per_file || i + 1 == files.len());
        }
    }
}

/// A file whose last PUT is refused (an S3 `SlowDown` on a small file) fails the write with an
/// error, which the flush retries; it must not panic (object_store's `BufWriter` panics when
/// aborted after its shutdown began).
#[tokio::test]
async fn a_refused_put_is_an_error_not_a_panic() {
    let (decoder, batch) = decoded_orders(500);
    let dir = tempfile::tempdir().expect("dir");
    // Each partition directory's name is taken by a file, so no file can be created under it.
    let times = batch
        .column(decoder.event_time_index())
        .as_primitive::<TimestampMicrosecondType>();
    for row in 0..batch.num_rows() {
        let (days, _) = date_hour(times.value(row));
        let taken = dir.path().join(format!("event_date={}", date_string(days)));
        std::fs::write(taken, b"").expect("write");
    }
    let store = object_store::local::LocalFileSystem::new_with_prefix(dir.path()).expect("store");
    let writer = SilverWriter::new(
        decoder.output_schema(),
        "event_time",
        FilePolicy {
            max_rows: usize::MAX,
            max_bytes: usize::MAX,
            compression: Compression::Snappy,
            delta_encoding: true,
        },
        Arc::new(store),
    );
    let written = writer.write(std::slice::from_ref(&batch)).await;
    assert!(written.is_err(), "the refused PUT went unnoticed");
}

/// Rolling files take the rows of the chunks handed to them, each exactly once: one event hour
/// per file, rolled at `max_rows`, with more hours than files may be open at once; every file is
/// in the store as its `add` describes it.
#[tokio::test]
async fn rolling_files_hold_every_row_once_in_its_hour() {
    use deltalake::arrow::datatypes::Int64Type;
    use deltalake::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    let (decoder, batch) = decoded_orders(3_000);
    let store = Arc::new(object_store::memory::InMemory::new());
    let writer = SilverWriter::new(
        decoder.output_schema(),
        "event_time",
        FilePolicy {
            max_rows: 400,
            max_bytes: usize::MAX,
            compression: Compression::Snappy,
            delta_encoding: true,
        },
        store.clone(),
    );
    // Chunk i's rows alternate between hours i and i + 1 (from an hour of the data), so each
    // chunk reaches a new hour and leaves one behind: more hours than files may be open at once.
    let at = decoder.event_time_index();
    const HOUR: i64 = 3_600_000_000;
    let base = {
        let times = batch.column(at).as_primitive::<TimestampMicrosecondType>();
        times.value(0).div_euclid(HOUR) * HOUR
    };
    let chunks: Vec<RecordBatch> = (0..batch.num_rows())
        .step_by(250)
        .enumerate()
        .map(|(i, from)| {
            let chunk = batch.slice(from, 250.min(batch.num_rows() - from));
            let times = chunk.column(at).as_primitive::<TimestampMicrosecondType>();
            let moved = deltalake::arrow::array::TimestampMicrosecondArray::from_iter_values(
                (0..chunk.num_rows()).map(|row| base + (i + row % 2) as i64 * HOUR + 1),
            )
            .with_data_type(times.data_type().clone());
            let mut columns = chunk.columns().to_vec();
            columns[at] = Arc::new(moved);
            RecordBatch::try_new(chunk.schema(), columns).expect("chunk")
        })
        .collect();
    let hours: BTreeSet<(i32, i32)> = chunks
        .iter()
        .flat_map(|c| {
            let times = c.column(at).as_primitive::<TimestampMicrosecondType>();
            (0..c.num_rows())
                .map(|row| date_hour(times.value(row)))
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(
        hours.len() > 4,
        "more hours than open files: {}",
        hours.len()
    );

    let files = rolling::RollingFiles::start(writer);
    for chunk in &chunks {
        assert!(files.push(chunk.clone()));
    }
    let adds = files.finish().await.expect("finish");
    // One file per hour, rolled at 400 rows: none cut short by a chunk of other hours.
    let mut per_hour: BTreeMap<(i32, i32), usize> = BTreeMap::new();
    for chunk in &chunks {
        let times = chunk.column(at).as_primitive::<TimestampMicrosecondType>();
        for row in 0..chunk.num_rows() {
            *per_hour.entry(date_hour(times.value(row))).or_default() += 1;
        }
    }
    let expected_files: usize = per_hour.values().map(|n| n.div_ceil(400)).sum();
    assert_eq!(
        adds.len(),
        expected_files,
        "files: one per hour, rolled at 400 rows"
    );

    let mut ids = Vec::new();
    for add in &adds {
        let bytes = store
            .get(&Path::from(add.path.as_str()))
            .await
            .expect("uploaded")
            .bytes()
            .await
            .expect("bytes");
        assert_eq!(bytes.len() as i64, add.size);
        let hour = (
            add.partition_values["event_date"].clone().expect("date"),
            add.partition_values["event_hour"].clone().expect("hour"),
        );
        let mut rows = 0;
        for read in ParquetRecordBatchReaderBuilder::try_new(bytes)
            .expect("parquet")
            .build()
            .expect("reader")
        {
            let read = read.expect("batch");
            rows += read.num_rows();
            let times = read
                .column_by_name("event_time")
                .expect("event_time")
                .as_primitive::<TimestampMicrosecondType>();
            for row in 0..read.num_rows() {
                let (days, h) = date_hour(times.value(row));
                assert_eq!(
                    (date_string(days), h.to_string()),
                    hour,
                    "a row in its own hour's file"
                );
            }
            let id = read
                .column_by_name("order_id")
                .expect("order_id")
                .as_primitive::<Int64Type>();
            ids.extend(id.values().iter().copied());
        }
        assert!(rows <= 400, "rolled at max_rows: {rows}");
        let stats: serde_json::Value =
            serde_json::from_str(add.stats.as_deref().expect("stats")).expect("json");
        assert_eq!(stats["numRecords"].as_i64(), Some(rows as i64));
    }
    let mut expected: Vec<i64> = batch
        .column_by_name("order_id")
        .expect("order_id")
        .as_primitive::<Int64Type>()
        .values()
        .to_vec();
    expected.sort_unstable();
    ids.sort_unstable();
    assert_eq!(ids, expected, "every row once");
}

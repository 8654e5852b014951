//! Allocations on Gold's hot path, counted by an instrumented global allocator (`stats_alloc`):
//! stage 1's pre-aggregation copies a row's key only the first time an epoch meets that key, so
//! ten times the rows over the same keys allocate about the same, not ten times as much.

use std::sync::Arc;

use deltalake::arrow::array::TimestampMicrosecondArray;
use deltalake::arrow::array::{Float64Array, Int64Array, RecordBatch, StringArray};
use deltalake::arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};
use strata::gold::core::aggregate::parse_aggregates;
use strata::gold::core::preaggregate::{GoldSpec, PreAggregator};

#[global_allocator]
static GLOBAL: &StatsAlloc<std::alloc::System> = &INSTRUMENTED_SYSTEM;

/// `rows` orders of `keys` customers in turn, all within one minute.
fn orders(rows: usize, keys: usize) -> RecordBatch {
    let schema = Arc::new(Schema::new(vec![
        Field::new("order_id", DataType::Int64, false),
        Field::new("customer_id", DataType::Utf8, false),
        Field::new("amount", DataType::Float64, false),
        Field::new(
            "event_time",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            false,
        ),
    ]));
    let minute = 1_700_000_040_000_000i64;
    RecordBatch::try_new(
        schema,
        vec![
            Arc::new(Int64Array::from_iter_values(0..rows as i64)),
            Arc::new(StringArray::from_iter_values(
                (0..rows).map(|i| format!("customer-{:05}", i % keys)),
            )),
            Arc::new(Float64Array::from_iter_values(
                (0..rows).map(|i| 1.0 + (i % 100) as f64),
            )),
            Arc::new(
                TimestampMicrosecondArray::from_iter_values(
                    (0..rows).map(|i| minute + (i as i64 % 60_000) * 1_000),
                )
                .with_timezone("UTC"),
            ),
        ],
    )
    .expect("batch")
}

/// Allocations made while folding `batch` into a fresh pre-aggregator.
fn allocations_folding(spec: &GoldSpec, batch: &RecordBatch) -> (usize, usize) {
    let region = Region::new(GLOBAL);
    let mut pre = PreAggregator::new();
    let folded = pre.add_batch(spec, batch, |_, _, _| true).expect("fold");
    let allocations = region.change().allocations;
    assert_eq!(folded, batch.num_rows());
    drop(pre);
    (allocations, folded)
}

#[test]
fn preaggregation_allocates_per_key_not_per_row() {
    const KEYS: usize = 200;
    let spec = GoldSpec {
        key_fields: vec!["customer_id".into()],
        window: "1m".parse().expect("window"),
        aggregates: parse_aggregates("count, sum(amount), min(amount), approx_distinct(order_id)")
            .expect("aggregates"),
        event_time_field: "event_time".into(),
    };
    let small = orders(2_000, KEYS);
    let large = orders(20_000, KEYS);
    spec.check(&small.schema()).expect("spec fits the rows");
    let (few, _) = allocations_folding(&spec, &small);
    let (many, _) = allocations_folding(&spec, &large);
    eprintln!("{KEYS} keys: {few} allocations for 2,000 rows, {many} for 20,000 rows");
    // 18,000 more rows over the same groups: a key copied (or any allocation made) per row
    // would add at least 18,000. Sketches and exact sums grow by doubling, a few per group.
    assert!(
        many < few + 2_000,
        "{many} allocations for 20,000 rows against {few} for 2,000: about one per row"
    );
}

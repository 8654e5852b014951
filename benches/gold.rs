//! Gold stage 1: window assignment + local pre-aggregation of decoded order rows, per core.
//! `make bench` runs it; the figures go into the closing notes.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use strata::gold::core::aggregate::parse_aggregates;
use strata::gold::core::epoch::{self, Salting};
use strata::gold::core::heavy::SpaceSaving;
use strata::gold::core::preaggregate::{GoldSpec, PreAggregator};

fn rows(n: usize) -> deltalake::arrow::array::RecordBatch {
    let records = strata::demo::generated_records(n, 7, 1).expect("records");
    let mut decoder = strata::demo::order_decoder(8192).expect("decoder");
    decoder.decode(&records).batch.expect("rows")
}

fn preaggregate(c: &mut Criterion) {
    let batch = rows(20_000);
    let mut group = c.benchmark_group("gold_stage1");
    group.throughput(Throughput::Elements(batch.num_rows() as u64));
    for (name, window, aggregates) in [
        ("tumbling_1m_count_sum", "1m", "count, sum(amount)"),
        (
            "tumbling_1m_all_six",
            "1m",
            "count, sum(amount), min(amount), max(amount), avg(amount), approx_distinct(product)",
        ),
        (
            "hopping_5m_every_1m_all_six",
            "5m every 1m",
            "count, sum(amount), min(amount), max(amount), avg(amount), approx_distinct(product)",
        ),
    ] {
        let spec = GoldSpec {
            key_fields: vec!["customer_id".into()],
            window: window.parse().expect("window"),
            aggregates: parse_aggregates(aggregates).expect("aggregates"),
            event_time_field: "event_time".into(),
        };
        spec.check(&batch.schema()).expect("spec fits the rows");
        group.bench_with_input(BenchmarkId::from_parameter(name), &spec, |b, spec| {
            b.iter(|| {
                let mut pre = PreAggregator::new();
                pre.add_batch(spec, &batch, |_, _, _| true).expect("fold");
                pre.into_groups().len()
            })
        });
    }
    // An epoch as stage 1 runs it with salting on: the hot-key pass, then folding with salts,
    // then the partials (encoded for the topic).
    let spec = GoldSpec {
        key_fields: vec!["customer_id".into()],
        window: "1m".parse().expect("window"),
        aggregates: parse_aggregates("count, sum(amount)").expect("aggregates"),
        event_time_field: "event_time".into(),
    };
    let source = strata::models::TopicPartition::new("orders", 0);
    let salting = Some(Salting {
        share: 0.1,
        min_events: 100,
        salts: 4,
    });
    let batches = vec![batch.clone()];
    group.bench_function("epoch_1m_count_sum_salted_and_encoded", |b| {
        b.iter(|| {
            let (pre, _) =
                epoch::preaggregate(&spec, &batches, &source, 19_999, salting, |_, _, _, _| true)
                    .expect("fold");
            epoch::epoch_partials(pre, &source, 19_999, 8)
                .into_iter()
                .map(|(_, p)| p.encode(1).len())
                .sum::<usize>()
        })
    });
    group.finish();
}

/// The hot-key sketch when nearly every record brings a key it does not track: 20,000 keys, each
/// seen once, over the 256 counters stage 1 keeps per epoch.
fn hot_keys(c: &mut Criterion) {
    let keys: Vec<[u8; 4]> = (0..20_000u32).map(u32::to_le_bytes).collect();
    let mut group = c.benchmark_group("gold_hot_keys");
    group.throughput(Throughput::Elements(keys.len() as u64));
    group.bench_function("space_saving_20k_distinct_keys_256_counters", |b| {
        b.iter(|| {
            let mut sketch = SpaceSaving::new(epoch::HEAVY_CAPACITY);
            for key in &keys {
                sketch.add(key, 1);
            }
            sketch.hot(0.1).len()
        })
    });
    group.finish();
}

criterion_group!(benches, preaggregate, hot_keys);
criterion_main!(benches);

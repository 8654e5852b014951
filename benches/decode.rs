//! Criterion benches of the pure decoding core: Confluent framing and Avro → Arrow with writer →
//! reader resolution, per record (`cargo bench --bench decode`).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use strata::decode::BatchDecoder;
use strata::demo::{OrderGenerator, ORDER_V1, ORDER_V2};
use strata::models::SourceRecord;

const READER: &str = include_str!("../schemas/order.avsc");

fn records(n: usize, bad_every: u64) -> Vec<SourceRecord> {
    let mut generator = OrderGenerator::new(1, bad_every).expect("generator");
    (0..n)
        .map(|i| SourceRecord {
            topic: "orders".into(),
            partition: 0,
            offset: i as i64,
            timestamp_ms: Some(1_700_000_000_000),
            key: None,
            value: Some(generator.next_record().expect("record").value),
            headers: Vec::new(),
        })
        .collect()
}

fn decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode");
    for (name, bad_every) in [("clean", 1), ("one_bad_in_200", 200)] {
        let input = records(2_000, bad_every);
        let mut decoder = BatchDecoder::new(READER, "event_time", 8192).expect("decoder");
        decoder.register(1, Ok(ORDER_V1));
        decoder.register(2, Ok(ORDER_V2));
        group.throughput(Throughput::Elements(input.len() as u64));
        group.bench_with_input(
            BenchmarkId::new("chunk_of_2000", name),
            &input,
            |b, input| b.iter(|| decoder.decode(input)),
        );
    }
    group.finish();
}

fn wire(c: &mut Criterion) {
    let input = records(2_000, 1);
    let mut group = c.benchmark_group("wire");
    group.throughput(Throughput::Elements(input.len() as u64));
    group.bench_function("parse_2000", |b| {
        b.iter(|| {
            input
                .iter()
                .filter_map(|r| r.value.as_deref())
                .filter(|v| strata::wire::parse(v).is_ok())
                .count()
        })
    });
    group.finish();
}

criterion_group!(benches, decode, wire);
criterion_main!(benches);

//! Criterion benches of the pure decoding core: Confluent framing and Avro → Arrow with writer →
//! reader resolution, per record (`cargo bench --bench decode`).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use strata::demo::{generated_records, order_decoder};

fn decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode");
    for (name, bad_every) in [("clean", 1), ("one_bad_in_200", 200)] {
        let input = generated_records(2_000, 1, bad_every).expect("records");
        let mut decoder = order_decoder(8192).expect("decoder");
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
    let input = generated_records(2_000, 1, 1).expect("records");
    let mut group = c.benchmark_group("wire");
    group.throughput(Throughput::Elements(input.len() as u64));
    group.bench_function("parse_2000", |b| {
        b.iter(|| {
            input
                .iter()
                .filter_map(|r| r.value.as_deref())
                .filter(|v| strata::schema::wire::parse(v).is_ok())
                .count()
        })
    });
    group.finish();
}

criterion_group!(benches, decode, wire);
criterion_main!(benches);

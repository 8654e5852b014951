//! End-to-end benchmark (not a test): fills a topic on the test broker, then measures in the same
//! run a bare rdkafka consumer reading it and a Strata replica turning it into a committed Silver
//! table on the test S3, and prints both rates and their ratio. Run by `make bench`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message};
use strata::config::Config;
use strata::demo::{OrderGenerator, ORDER_V1, ORDER_V2};
use strata::metrics::Metrics;
use tokio_util::sync::CancellationToken;

fn env(name: &str) -> anyhow::Result<String> {
    std::env::var(name).with_context(|| format!("{name} is not set: run `make bench`"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let brokers = env("STRATA_TEST_BROKERS")?;
    let bucket = env("STRATA_TEST_S3_BUCKET")?;
    let events: u64 = std::env::var("STRATA_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300_000);
    let partitions = 6;
    let topic = format!("bench-{}", std::process::id());

    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()?;
    for (name, parts) in [(topic.clone(), partitions), (format!("{topic}.dlq"), 1)] {
        for result in admin
            .create_topics(
                &[NewTopic::new(&name, parts, TopicReplication::Fixed(1))],
                &AdminOptions::new(),
            )
            .await?
        {
            result.map_err(|(t, e)| anyhow::anyhow!("creating {t}: {e}"))?;
        }
    }

    // Fill.
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("linger.ms", "20")
        .set("queue.buffering.max.messages", "1000000")
        .create()?;
    let mut generator = OrderGenerator::new(7, 1)?;
    let mut last: BTreeMap<i32, i64> = BTreeMap::new();
    let mut bytes = 0usize;
    let fill = Instant::now();
    let mut remaining = events;
    while remaining > 0 {
        let n = remaining.min(20_000);
        remaining -= n;
        let batch: Vec<_> = (0..n)
            .map(|_| generator.next_record())
            .collect::<anyhow::Result<_>>()?;
        bytes += batch.iter().map(|r| r.value.len()).sum::<usize>();
        let sends = batch.iter().map(|r| {
            producer.send(
                FutureRecord::to(&topic).key(&r.key).payload(&r.value),
                Duration::from_secs(60),
            )
        });
        for result in futures::future::join_all(sends).await {
            let d = result.map_err(|(e, _)| e)?;
            let slot = last.entry(d.partition).or_insert(-1);
            *slot = (*slot).max(d.offset);
        }
    }
    println!(
        "filled {topic}: {events} events, {:.1} MiB of Avro in {:.1}s",
        bytes as f64 / 1048576.0,
        fill.elapsed().as_secs_f64()
    );

    // Bare consumer: join a fresh group and read every record (touching each payload).
    let raw_brokers = brokers.clone();
    let raw_topic = topic.clone();
    let raw_secs = tokio::task::spawn_blocking(move || -> anyhow::Result<f64> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &raw_brokers)
            .set("group.id", format!("raw-{raw_topic}"))
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .create()?;
        consumer.subscribe(&[&raw_topic])?;
        let started = Instant::now();
        let mut seen = 0u64;
        let mut checksum = 0u64;
        while seen < events {
            if let Some(message) = consumer.poll(Duration::from_millis(500)) {
                checksum = checksum.wrapping_add(message?.payload().map_or(0, |p| p.len() as u64));
                seen += 1;
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(600),
                "raw consumer stalled at {seen}"
            );
        }
        std::hint::black_box(checksum);
        Ok(started.elapsed().as_secs_f64())
    })
    .await??;

    // Strata: a replica from subscription until every partition's progress is committed.
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("1.avsc"), ORDER_V1)?;
    std::fs::write(dir.path().join("2.avsc"), ORDER_V2)?;
    let vars: HashMap<String, String> = [
        ("STRATA_KAFKA_BROKERS", brokers.clone()),
        ("STRATA_GROUP_ID", format!("strata-{topic}")),
        ("STRATA_TOPICS", topic.clone()),
        (
            "STRATA_SCHEMA_REGISTRY_URL",
            format!("file://{}", dir.path().display()),
        ),
        (
            "STRATA_READER_SCHEMA",
            concat!(env!("CARGO_MANIFEST_DIR"), "/schemas/order.avsc").to_string(),
        ),
        ("STRATA_EVENT_TIME_FIELD", "event_time".to_string()),
        ("STRATA_LAKE_URL", format!("s3://{bucket}/{topic}")),
        ("STRATA_FLUSH_INTERVAL", "5s".to_string()),
        ("STRATA_FILE_MAX_ROWS", "500000".to_string()),
        ("STRATA_METRICS_ADDR", "127.0.0.1:0".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let metrics = Arc::new(Metrics::new());
    let shutdown = CancellationToken::new();
    let started = Instant::now();
    let replica = tokio::spawn(strata::pipeline::run(
        Config::from_vars(vars)?,
        metrics.clone(),
        shutdown.clone(),
    ));
    loop {
        let done = last.iter().all(|(p, l)| {
            metrics
                .committed_offset
                .with_label_values(&[&topic, &p.to_string()])
                .get()
                == *l
        });
        if done {
            break;
        }
        anyhow::ensure!(!replica.is_finished(), "replica stopped early");
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(900),
            "strata stalled"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let strata_secs = started.elapsed().as_secs_f64();
    shutdown.cancel();
    let summary = replica.await??;

    let raw_rate = events as f64 / raw_secs;
    let strata_rate = events as f64 / strata_secs;
    println!(
        "bare rdkafka consumer : {raw_rate:>10.0} events/s ({raw_secs:.1}s, group join included)"
    );
    println!("strata -> Silver (S3) : {strata_rate:>10.0} events/s ({strata_secs:.1}s, group join and final commit included; {} commits, {} files)", summary.commits, summary.files);
    println!("ratio strata / raw    : {:>10.2}", strata_rate / raw_rate);
    Ok(())
}

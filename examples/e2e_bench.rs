//! End-to-end benchmark (not a test): fills a topic on the test broker, then measures in the same
//! run a bare rdkafka consumer reading it and a Strata replica turning it into a committed Silver
//! table on the test S3, and prints both rates and their ratio. Run by `make bench`.

use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message};
use strata::config::Config;
use strata::demo::{ORDER_V1, ORDER_V2};

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
    let fill = Instant::now();
    // Event times advance 1 ms per order, each up to 20 s early: in bounds for Gold's windows.
    let generator = strata::demo::OrderGenerator::new(7, 1)?.ordered(1, 20_000);
    let produced = strata::demo::produce_generated(&brokers, &topic, events, generator).await?;
    let bytes: usize = produced.records.iter().map(|r| r.value.len()).sum();
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

    // Strata: a replica from subscription until every partition's progress is committed; then
    // the same with Gold on (a fresh group and lake).
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("1.avsc"), ORDER_V1)?;
    std::fs::write(dir.path().join("2.avsc"), ORDER_V2)?;
    let reader = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/schemas/order.avsc"));
    let vars = |group: &str, lake: &str, gold: bool| {
        let mut extra = vec![
            ("STRATA_FLUSH_INTERVAL", "1s"),
            ("STRATA_FILE_MAX_ROWS", "500000"),
        ];
        if gold {
            extra.extend([
                ("STRATA_GOLD_KEY", "customer_id"),
                ("STRATA_GOLD_WINDOW", "1m"),
                (
                    "STRATA_GOLD_AGGREGATES",
                    "count, sum(amount), min(amount), max(amount), avg(amount), approx_distinct(product)",
                ),
                ("STRATA_WATERMARK_DELAY", "30s"),
                ("STRATA_IDLE_TIMEOUT", "5s"),
                ("STRATA_HOT_KEY_SHARE", "0.1"),
                ("STRATA_HOT_KEY_SALTS", "6"),
            ]);
        }
        strata::demo::replica_vars(
            &brokers,
            group,
            &topic,
            dir.path(),
            reader,
            &format!("s3://{bucket}/{lake}"),
            &extra,
        )
    };
    let run = strata::demo::run_until_caught_up(
        Config::from_vars(vars(&format!("strata-{topic}"), &topic, false))?,
        &topic,
        &produced.last_offsets(),
        Duration::from_secs(900),
    )
    .await?;
    anyhow::ensure!(run.caught_up, "strata did not catch up");
    let strata_secs = run.elapsed.as_secs_f64();
    let summary = run.summary;

    let gold_run = strata::demo::run_until_caught_up(
        Config::from_vars(vars(
            &format!("gold-{topic}"),
            &format!("{topic}-gold"),
            true,
        ))?,
        &topic,
        &produced.last_offsets(),
        Duration::from_secs(900),
    )
    .await?;
    anyhow::ensure!(gold_run.caught_up, "strata with Gold did not catch up");
    let gold_secs = gold_run.elapsed.as_secs_f64();
    let gold_final = gold_run.gold_elapsed.map_or(f64::NAN, |d| d.as_secs_f64());
    let g = gold_run.metrics.gold().snapshot(8);
    let partials: u64 = g.partials.iter().sum();

    let raw_rate = events as f64 / raw_secs;
    let strata_rate = events as f64 / strata_secs;
    println!(
        "bare rdkafka consumer : {raw_rate:>10.0} events/s ({raw_secs:.1}s, group join included)"
    );
    println!("strata -> Silver (S3) : {strata_rate:>10.0} events/s ({strata_secs:.1}s, group join and final commit included; {} commits, {} files)", summary.commits, summary.files);
    println!("ratio strata / raw    : {:>10.2}", strata_rate / raw_rate);
    let gold_rate = events as f64 / gold_secs;
    println!("strata + Gold         : {gold_rate:>10.0} events/s (Silver committed and every epoch pre-aggregated and sent: {gold_secs:.1}s; {} events into {partials} partials)", g.events);
    println!("ratio strata+Gold/raw : {:>10.2}", gold_rate / raw_rate);
    println!("Gold final            : {gold_final:>10.1}s after start (every window closed and committed: {} rows; includes the 5 s idle timeout that closes the last windows)", g.windows_emitted);
    Ok(())
}

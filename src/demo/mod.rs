//! `strata demo`: the whole pipeline with no external service. An in-process Kafka (librdkafka's
//! MockCluster), a generator of skewed order events in two schema versions plus some undecodable
//! records, the file-backed schema source and a local lake folder. It runs the real replica, then
//! reads the Silver table and the dead-letter topic back and checks every produced offset.
//!
//! The MockCluster has no real transactions or durability: the demo shows the pipeline, the
//! integration tests (tansu + moto) prove the guarantees.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::ClientConfig;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::lake::verify;
use crate::ops::Metrics;

mod generator;
pub use generator::*;

/// The environment of a replica reading `topic` with a file-backed schema source.
pub fn replica_vars(
    brokers: &str,
    group: &str,
    topic: &str,
    schemas: &std::path::Path,
    reader: &std::path::Path,
    lake_url: &str,
    extra: &[(&str, &str)],
) -> HashMap<String, String> {
    let mut vars: HashMap<String, String> = [
        ("STRATA_KAFKA_BROKERS", brokers.to_string()),
        ("STRATA_GROUP_ID", group.to_string()),
        ("STRATA_TOPICS", topic.to_string()),
        (
            "STRATA_SCHEMA_REGISTRY_URL",
            format!("file://{}", schemas.display()),
        ),
        ("STRATA_READER_SCHEMA", reader.display().to_string()),
        ("STRATA_EVENT_TIME_FIELD", "event_time".to_string()),
        ("STRATA_LAKE_URL", lake_url.to_string()),
        ("STRATA_METRICS_ADDR", "127.0.0.1:0".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    vars.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    vars
}

/// A replica run in-process by [`run_until_caught_up`].
pub struct CaughtUp {
    pub summary: crate::silver::pipeline::RunSummary,
    pub metrics: Arc<Metrics>,
    /// Whether every partition's committed progress reached its target before the deadline.
    pub caught_up: bool,
    /// From start to the last needed commit (or the deadline).
    pub elapsed: Duration,
    /// From start until the replica had taken its first records (within 50 ms).
    pub first_record: Option<Duration>,
    /// This process's CPU time (user + system, seconds) when the replica had taken its first
    /// records (within 50 ms).
    pub cpu_at_first_record: Option<f64>,
    /// This process's CPU time (user + system, seconds) when the replica had caught up.
    pub cpu_at_caught_up: Option<f64>,
    /// CPU seconds by thread name ([`ThreadCpu`]) from the first record until caught up (empty:
    /// not measured).
    pub threads_first_to_last: BTreeMap<String, f64>,
    /// With Gold: from start until the last Gold commit with rows, once every window had closed
    /// (`None`: not reached before the deadline).
    pub gold_elapsed: Option<Duration>,
    /// Records the replica had taken [`FIRST_ANSWER`] after its first (within 50 ms): what the
    /// broker's first answers held.
    pub first_answer: Option<u64>,
}

/// How long after a consumer's first record the bench counts records as the broker's first
/// answer: a broker that answers in bursts (tansu: one answer of up to about 5 MiB every 1-4 s)
/// hands a consumer a varying share of the run at once, which then counts as read in no time.
pub const FIRST_ANSWER: Duration = Duration::from_millis(500);

/// Runs one replica in-process until its committed progress on `topic` reaches `last_offsets`
/// (or `deadline` passes), then shuts it down gracefully.
pub async fn run_until_caught_up(
    config: Config,
    topic: &str,
    last_offsets: &BTreeMap<i32, i64>,
    deadline: Duration,
) -> anyhow::Result<CaughtUp> {
    let metrics = Arc::new(Metrics::new());
    let shutdown = CancellationToken::new();
    let started = Instant::now();
    let gold = config.gold.clone();
    let replica = tokio::spawn(crate::app::run(config, metrics.clone(), shutdown.clone()));
    let mut first_record = None;
    let mut cpu_at_first_record = None;
    let mut threads_at_first_record = ThreadCpu::default();
    let trace = std::env::var_os("STRATA_BENCH_TRACE").is_some();
    let mut traced = Instant::now();
    let mut first_answer = None;
    let caught_up = loop {
        if trace && traced.elapsed() >= Duration::from_millis(250) {
            traced = Instant::now();
            let committed: i64 = last_offsets
                .keys()
                .filter_map(|p| metrics.committed_offset(topic, *p))
                .map(|o| o + 1)
                .sum();
            eprintln!(
                "{:>7.2}s consumed {:>8} committed {committed:>8}",
                started.elapsed().as_secs_f64(),
                metrics.records_consumed()
            );
        }
        if first_record.is_none() && metrics.records_consumed() > 0 {
            first_record = Some(started.elapsed());
            cpu_at_first_record = process_cpu_seconds();
            threads_at_first_record = ThreadCpu::now();
        }
        if first_answer.is_none()
            && first_record.is_some_and(|f| started.elapsed() >= f + FIRST_ANSWER)
        {
            first_answer = Some(metrics.records_consumed());
        }
        let done = last_offsets
            .iter()
            .all(|(p, last)| metrics.committed_offset(topic, *p) == Some(*last));
        if done || replica.is_finished() || started.elapsed() > deadline {
            break done;
        }
        // This loop's reads count in the process's CPU, which the bench reports as Strata's:
        // every 20 ms they were 2 % of the Silver phase's samples.
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let elapsed = started.elapsed();
    let cpu_at_caught_up = process_cpu_seconds();
    let threads_first_to_last = threads_at_first_record.since();
    let mut gold_elapsed = None;
    if let (true, Some(gold)) = (caught_up, &gold) {
        // Gold is complete once every source partition went idle (its watermark follows the
        // clock), no window is open any more, and no Gold row was committed for three commit
        // intervals (stage 2 commits at least every 5 s while it has rows to commit; an idle one
        // commits rarely, so waiting for further commits would measure idleness). Gold's time is
        // that of its last commit with rows.
        let delay = gold.watermark_delay.as_secs_f64();
        let settle = Duration::from_secs(15);
        let (mut emitted, mut emitted_at) = (0u64, started.elapsed());
        while !replica.is_finished() && started.elapsed() < deadline {
            let g = metrics.gold().snapshot(GOLD_PARTITIONS);
            if trace && traced.elapsed() >= Duration::from_secs(2) {
                traced = Instant::now();
                eprintln!(
                    "{:>7.2}s gold: {} partials merged, {} windows open, {} rows committed, watermark {:.0}s behind, {} commits",
                    started.elapsed().as_secs_f64(),
                    g.partials.iter().sum::<u64>(),
                    g.open_windows,
                    g.windows_emitted,
                    g.watermark_lag_seconds,
                    g.commits
                );
            }
            if g.windows_emitted != emitted {
                (emitted, emitted_at) = (g.windows_emitted, started.elapsed());
            }
            let quiet = g.open_windows == 0
                && g.windows_emitted > 0
                && g.watermark_lag_seconds > 0.0
                && g.watermark_lag_seconds < delay + 30.0;
            if quiet && started.elapsed() >= emitted_at + settle {
                gold_elapsed = Some(emitted_at);
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    shutdown.cancel();
    let summary = replica.await.context("replica task")??;
    Ok(CaughtUp {
        summary,
        metrics,
        caught_up,
        elapsed,
        first_record,
        cpu_at_first_record,
        cpu_at_caught_up,
        threads_first_to_last,
        gold_elapsed,
        first_answer,
    })
}

/// Clock ticks per second of `/proc/self/stat` (`USER_HZ`, 100 on Linux).
const USER_HZ: f64 = 100.0;

/// This process's CPU time so far (user + system, every thread), in seconds, from
/// `/proc/self/stat` (Linux only: `None` elsewhere).
pub fn process_cpu_seconds() -> Option<f64> {
    cpu_seconds_of("self")
}

/// CPU seconds each of this process's live threads has run, by thread id, with its name, from
/// `/proc/self/task/<tid>/schedstat` (nanoseconds; Linux only: empty elsewhere). librdkafka's
/// broker threads (`rdk:broker<id>`) go by one name, `rdk:broker`.
#[derive(Debug, Clone, Default)]
pub struct ThreadCpu(BTreeMap<u64, (String, f64)>);

impl ThreadCpu {
    /// The threads as they stand now.
    pub fn now() -> Self {
        let threads = std::fs::read_dir("/proc/self/task")
            .map(|tasks| {
                tasks
                    .flatten()
                    .filter_map(|task| Self::task(&task))
                    .collect()
            })
            .unwrap_or_default();
        Self(threads)
    }

    /// One thread's id, name and CPU seconds (`None`: it ended while being read).
    fn task(task: &std::fs::DirEntry) -> Option<(u64, (String, f64))> {
        let tid = task.file_name().to_str()?.parse::<u64>().ok()?;
        let name = std::fs::read_to_string(task.path().join("comm")).ok()?;
        let stat = std::fs::read_to_string(task.path().join("schedstat")).ok()?;
        let ns = stat.split_whitespace().next()?.parse::<f64>().ok()?;
        let name = name.trim();
        let name = if name.starts_with("rdk:broker") {
            "rdk:broker"
        } else {
            name
        };
        Some((tid, (name.to_string(), ns / 1e9)))
    }

    /// CPU seconds by thread name since `self` was taken: each live thread's own difference (all
    /// of it for a thread started since). Threads that ended meanwhile are not counted.
    pub fn since(&self) -> BTreeMap<String, f64> {
        let mut by_name = BTreeMap::new();
        for (tid, (name, seconds)) in Self::now().0 {
            let before = self.0.get(&tid).map_or(0.0, |(_, s)| *s);
            *by_name.entry(name).or_insert(0.0) += seconds - before;
        }
        by_name.retain(|_, seconds| *seconds >= 0.0005);
        by_name
    }
}

/// CPU time (user + system, seconds) of process `pid` (`self` for this one), all its threads.
pub fn cpu_seconds_of(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name (which may hold spaces) start with field 3, the state;
    // utime and stime are fields 14 and 15.
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |field: usize| fields.get(field - 3)?.parse::<f64>().ok();
    Some((ticks(14)? + ticks(15)?) / USER_HZ)
}

const GOLD_PARTIALS: &str = "strata-demo.partials";
const GOLD_PARTITIONS: i32 = 8;
const GOLD_AGGREGATES: &str =
    "count, sum(amount), min(amount), max(amount), avg(amount), approx_distinct(product)";

/// Demo settings (environment: `STRATA_DEMO_EVENTS`, `STRATA_DEMO_DIR`).
pub struct DemoOptions {
    pub events: u64,
    pub dir: PathBuf,
    pub partitions: i32,
    pub deadline: Duration,
}

impl DemoOptions {
    pub fn from_env() -> Self {
        Self {
            events: std::env::var("STRATA_DEMO_EVENTS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(200_000),
            dir: std::env::var("STRATA_DEMO_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|_| PathBuf::from("target/strata-demo")),
            partitions: 6,
            deadline: Duration::from_secs(100),
        }
    }
}

/// What the demo saw.
pub struct DemoReport {
    pub exact: bool,
}

pub async fn run(options: DemoOptions) -> anyhow::Result<DemoReport> {
    let started = Instant::now();
    let topic = "orders";
    if options.dir.exists() {
        std::fs::remove_dir_all(&options.dir)
            .with_context(|| format!("clearing {}", options.dir.display()))?;
    }
    let schemas = options.dir.join("schemas");
    let lake = std::fs::canonicalize(
        std::fs::create_dir_all(options.dir.join("lake")).map(|_| options.dir.join("lake"))?,
    )?;
    std::fs::create_dir_all(&schemas)?;
    std::fs::write(schemas.join("1.avsc"), ORDER_V1)?;
    std::fs::write(schemas.join("2.avsc"), ORDER_V2)?;
    let reader = options.dir.join("order.avsc");
    std::fs::write(&reader, ORDER_READER)?;

    println!(
        "strata demo: embedded Kafka (3 mock brokers), {} events, lake at {}",
        options.events,
        lake.display()
    );
    let cluster = MockCluster::new(3).context("starting the embedded Kafka")?;
    cluster.create_topic(topic, options.partitions, 1)?;
    // The mock cluster has no CreateTopics handler, so the topics Strata would create on a real
    // cluster (dead letters, partials) are made here; Strata finds them and goes on.
    cluster.create_topic(&format!("{topic}.dlq"), 1, 1)?;
    let brokers = cluster.bootstrap_servers();

    let produce_started = Instant::now();
    cluster.create_topic(GOLD_PARTIALS, GOLD_PARTITIONS, 1)?;
    // Event times advance 10 ms per order, each up to 20 s early: a stream for 5-minute windows.
    let generator = OrderGenerator::new(42, 200)?.ordered(10, 20_000);
    let produced = produce_generated(&brokers, topic, options.events, generator).await?;
    let bad = produced.bad().count() as u64;
    println!(
        "produced {} events ({} undecodable) in {:.1}s",
        options.events,
        bad,
        produce_started.elapsed().as_secs_f64()
    );

    let vars = replica_vars(
        &brokers,
        "strata-demo",
        topic,
        &schemas,
        &reader,
        &format!("file://{}", lake.display()),
        &[
            ("STRATA_FLUSH_INTERVAL", "2s"),
            ("STRATA_FILE_MAX_ROWS", "100000"),
            ("STRATA_GOLD_KEY", "customer_id"),
            ("STRATA_GOLD_WINDOW", "5m"),
            ("STRATA_GOLD_AGGREGATES", GOLD_AGGREGATES),
            ("STRATA_GOLD_PARTIALS_TOPIC", GOLD_PARTIALS),
            ("STRATA_WATERMARK_DELAY", "30s"),
            ("STRATA_IDLE_TIMEOUT", "3s"),
            ("STRATA_HOT_KEY_SHARE", "0.2"),
            ("STRATA_HOT_KEY_SALTS", "6"),
        ],
    );
    let remaining = options.deadline.saturating_sub(started.elapsed());
    let run = run_until_caught_up(
        Config::from_vars(vars)?,
        topic,
        &produced.last_offsets(),
        remaining,
    )
    .await?;
    let summary = run.summary.clone();
    let caught_up = run.caught_up;
    let consume_secs = run.elapsed.as_secs_f64();
    if !caught_up {
        println!("the replica did not catch up within {:?}", options.deadline);
    }
    let expected: Vec<_> = produced.good().map(|r| r.position()).collect();

    // Check.
    let table_url =
        crate::lake::table_url(&format!("file://{}", lake.display()), "silver", "order")?;
    let contents = verify::read_table(table_url).await?;
    let report = verify::exactly_once(
        verify::lineage(&contents.batches)?,
        expected.iter().cloned(),
    );
    let dlq_topic = format!("{topic}.dlq");
    let dead_letters =
        tokio::task::spawn_blocking(move || count_messages(&brokers, &dlq_topic)).await??;

    println!();
    println!("  events produced        {:>10}", options.events);
    println!(
        "  silver rows            {:>10}   (expected {})",
        report.found, report.expected
    );
    println!(
        "  dead-lettered          {:>10}   (expected {bad}, found {dead_letters} in {topic}.dlq)",
        summary.dead_lettered
    );
    println!("  parquet files          {:>10}", contents.files);
    println!(
        "  delta commits          {:>10}   (table version {})",
        summary.commits, contents.version
    );
    println!(
        "  throughput             {:>10.0} events/s from first poll to last commit ({consume_secs:.1}s, incl. group join)",
        options.events as f64 / consume_secs.max(0.001)
    );
    let gold_exact = print_gold(&lake, &contents.batches, &summary, &run.metrics).await?;
    let exact = report.is_exact()
        && caught_up
        && dead_letters == bad
        && summary.dead_lettered == bad
        && gold_exact;
    if exact {
        println!("\nexactly once: every produced offset is in Silver once or in the dead-letter topic once, and Gold equals the aggregates of Silver. OK");
    } else {
        println!("\nNOT EXACT: {report}; dead letters {dead_letters} of {bad}");
    }
    println!(
        "(total {:.1}s; inspect the table at {})",
        started.elapsed().as_secs_f64(),
        lake.join("silver/order").display()
    );
    if !exact && report.found == 0 {
        bail!("Silver table is empty");
    }
    Ok(DemoReport { exact })
}

/// Checks Gold against aggregates computed from the Silver rows, and prints the top customers
/// of the first windows and what pre-aggregation and salting did. Returns whether Gold is exact.
async fn print_gold(
    lake: &std::path::Path,
    silver: &[deltalake::arrow::array::RecordBatch],
    summary: &crate::silver::pipeline::RunSummary,
    metrics: &Metrics,
) -> anyhow::Result<bool> {
    use deltalake::arrow::array::AsArray;
    use deltalake::arrow::datatypes::{Float64Type, TimestampMicrosecondType};
    let lake_url = format!("file://{}", lake.display());
    let gold_url = crate::lake::table_url(&lake_url, "gold", "order_by_customer_id")?;
    let late_url = crate::lake::table_url(&lake_url, "gold", "order_by_customer_id_late")?;
    let gold = verify::read_table(gold_url).await?;
    let late = verify::read_table(late_url).await?;
    let columns: Vec<String> = crate::gold::core::aggregate::parse_aggregates(GOLD_AGGREGATES)
        .map_err(anyhow::Error::msg)?
        .iter()
        .map(|a| a.column())
        .collect();
    let (rows, twice) = verify::gold_rows(&gold.batches, &["customer_id".to_string()], &columns)?;

    // Expected, from Silver: count, sum, min, max per (5-minute window, customer).
    const WINDOW: i64 = 300_000_000;
    let mut expected: BTreeMap<verify::GoldKey, (f64, f64, f64, f64)> = BTreeMap::new();
    for batch in silver {
        let (Some(customers), Some(amounts), Some(times)) = (
            batch
                .column_by_name("customer_id")
                .and_then(|c| c.as_string_opt::<i32>()),
            batch
                .column_by_name("amount")
                .and_then(|c| c.as_primitive_opt::<Float64Type>()),
            batch
                .column_by_name("event_time")
                .and_then(|c| c.as_primitive_opt::<TimestampMicrosecondType>()),
        ) else {
            bail!("Silver rows lack customer_id, amount or event_time");
        };
        for row in 0..batch.num_rows() {
            let start = times.value(row).div_euclid(WINDOW) * WINDOW;
            let amount = amounts.value(row);
            let e = expected
                .entry((start, vec![customers.value(row).to_string()]))
                .or_insert((0.0, 0.0, f64::INFINITY, f64::NEG_INFINITY));
            e.0 += 1.0;
            e.1 += amount;
            e.2 = e.2.min(amount);
            e.3 = e.3.max(amount);
        }
    }
    let mut wrong = 0usize;
    for (slot, (count, sum, min, max)) in &expected {
        let ok = rows.get(slot).is_some_and(|v| {
            v[0] == Some(*count)
                && v[1].is_some_and(|s| (s - sum).abs() <= 1e-9 * sum.abs().max(1.0))
                && v[2] == Some(*min)
                && v[3] == Some(*max)
        });
        if !ok {
            wrong += 1;
        }
    }
    let exact =
        wrong == 0 && twice.is_empty() && rows.len() == expected.len() && late.num_rows() == 0;
    let g = metrics.gold().snapshot(GOLD_PARTITIONS);
    let load = &g.partial_events;
    let mean = load.iter().sum::<u64>() as f64 / load.len() as f64;
    let busiest = load.iter().copied().max().unwrap_or(0) as f64;
    let partials: u64 = g.partials.iter().sum();
    println!();
    println!(
        "  gold rows              {:>10}   (expected {} from Silver; {} wrong, {} twice)",
        rows.len(),
        expected.len(),
        wrong,
        twice.len()
    );
    println!("  late events            {:>10}", late.num_rows());
    println!(
        "  pre-aggregation        {:>10.0}x   ({} events into {} partials)",
        g.events as f64 / partials.max(1) as f64,
        g.events,
        partials
    );
    println!(
        "  salting                {:>10}   salted partials; busiest partials partition carries {:.2}x the mean ({} partitions)",
        g.salted_partials,
        busiest / mean.max(1.0),
        GOLD_PARTITIONS
    );
    if let Some(stage2) = &summary.gold {
        println!(
            "  gold commits           {:>10}   ({} replays dropped, {} salted sub-results merged back)",
            stage2.commits, stage2.duplicates, stage2.forwarded
        );
    }
    // Top customers of the first three windows.
    type Top<'a> = Vec<(&'a Vec<String>, f64, f64)>;
    let mut windows: BTreeMap<i64, Top<'_>> = BTreeMap::new();
    for ((start, key), values) in &rows {
        windows.entry(*start).or_default().push((
            key,
            values[0].unwrap_or(0.0),
            values[1].unwrap_or(0.0),
        ));
    }
    for (start, mut keys) in windows.into_iter().take(3) {
        keys.sort_by(|a, b| b.1.total_cmp(&a.1));
        let top: Vec<String> = keys
            .iter()
            .take(3)
            .map(|(k, count, sum)| format!("{} {count:.0} orders {sum:.2}", k.join("/")))
            .collect();
        let when = chrono::DateTime::from_timestamp_micros(start)
            .map(|t| t.format("%H:%M").to_string())
            .unwrap_or_default();
        println!("  window {when} top        {}", top.join(" | "));
    }
    Ok(exact)
}

/// Counts the messages of a single-partition topic from the beginning to its end.
fn count_messages(brokers: &str, topic: &str) -> anyhow::Result<u64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "strata-demo-check")
        .set("enable.auto.commit", "false")
        .create()?;
    let (low, high) = consumer.fetch_watermarks(topic, 0, Duration::from_secs(10))?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)?;
    consumer.assign(&tpl)?;
    let mut count = 0u64;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut position = low;
    while position < high && Instant::now() < deadline {
        if let Some(Ok(message)) = consumer.poll(Duration::from_millis(200)) {
            use rdkafka::Message;
            count += 1;
            position = message.offset() + 1;
        }
    }
    Ok(count)
}

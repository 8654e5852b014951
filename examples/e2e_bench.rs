//! End-to-end benchmark (not a test), run by `make bench`. In one run, on the test broker and S3:
//!
//! - a bare librdkafka consumer reads a filled topic;
//! - a Strata replica turns the same topic into a committed Silver table (zstd Parquet on S3);
//! - the same with Gold on (tumbling 1 m windows, `count, sum(amount)`);
//! - the pipeline without the broker: records from memory through decode, buffers, Parquet and
//!   commits to a local lake (the pipeline's own ceiling).
//!
//! Each consumer is timed from its first record to its last (Strata: to the last row committed),
//! so group joins do not count. CPU time is the process's user + system time over the phase, from
//! `/proc/self/stat`, so it includes librdkafka's threads; peak RSS is `VmHWM`, reset before each
//! phase through `/proc/self/clear_refs`. `STRATA_BENCH_TRACE=1` prints, every 250 ms of a Strata
//! phase, the records consumed and committed so far (how the broker's bursts and the flushes line up),
//! and the bare consumer's records every 250 ms. `STRATA_BENCH_KAFKA=property=value,...` sets
//! librdkafka properties on both consumers alike (Strata's through `STRATA_KAFKA_*`); the bare
//! consumer already takes the fetch queue backoff Strata's source sets.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message};
use strata::config::Config;
use strata::demo::{FIRST_ANSWER, ORDER_V1, ORDER_V2};
use strata::models::{SourceRecord, TopicPartition};

/// The librdkafka properties `STRATA_BENCH_KAFKA` sets on both consumers.
fn shared_properties() -> anyhow::Result<Vec<(String, String)>> {
    let Ok(list) = std::env::var("STRATA_BENCH_KAFKA") else {
        return Ok(Vec::new());
    };
    list.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|pair| {
            let (key, value) = pair
                .split_once('=')
                .with_context(|| format!("STRATA_BENCH_KAFKA: {pair:?} is not property=value"))?;
            Ok((key.trim().to_string(), value.trim().to_string()))
        })
        .collect()
}

/// librdkafka's log lines (`debug=...` in `STRATA_BENCH_KAFKA`) on stderr, with the seconds since
/// the bench started, when `STRATA_BENCH_LOG` is set.
struct StderrLog(Instant);

impl log::Log for StderrLog {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        // Only librdkafka's: deltalake's and the AWS SDK's tracing events reach `log` too.
        metadata.target() == "librdkafka"
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        eprintln!("{:>9.3}s {}", self.0.elapsed().as_secs_f64(), record.args());
    }

    fn flush(&self) {}
}

fn env(name: &str) -> anyhow::Result<String> {
    std::env::var(name).with_context(|| format!("{name} is not set: run `make bench`"))
}

/// This process's CPU time so far, in seconds.
fn cpu_seconds() -> anyhow::Result<f64> {
    strata::demo::process_cpu_seconds().context("reading /proc/self/stat")
}

/// A `/proc/self/status` field in MiB (`VmRSS`, `VmHWM`).
fn status_mib(field: &str) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .context("no such field in /proc/self/status")?
        .parse()?;
    Ok(kib / 1024.0)
}

/// What one phase cost.
struct Phase {
    events: u64,
    /// First record to last (consumed, or committed).
    secs: f64,
    cpu_secs: f64,
    /// CPU seconds from the first record to the last (`None`: not measured), without the
    /// start-up, group join and shutdown that `cpu_secs` includes.
    active_cpu_secs: Option<f64>,
    /// What `cpu_secs` holds beyond `active_cpu_secs`.
    rest: &'static str,
    /// The CPU seconds from the first record to the last, by thread name.
    threads: BTreeMap<String, f64>,
    rss_start_mib: f64,
    peak_rss_mib: f64,
    /// CPU seconds the broker and the object store (tansu, moto) spent during the phase, when
    /// `scripts/services.sh` started them: they share this machine's cores with the consumer.
    services_cpu: Option<(f64, f64)>,
    /// Records in hand `FIRST_ANSWER` after the first.
    first_answer: Option<u64>,
}

/// CPU seconds so far of the services `scripts/services.sh` started (tansu, moto), from the pid
/// files it keeps.
fn services_cpu() -> Option<(f64, f64)> {
    let cache = std::env::var("STRATA_CACHE").ok().or_else(|| {
        std::env::var("HOME")
            .ok()
            .map(|h| format!("{h}/.cache/strata"))
    })?;
    let of = |name: &str| {
        let pid = std::fs::read_to_string(format!("{cache}/services/{name}.pid")).ok()?;
        strata::demo::cpu_seconds_of(pid.trim())
    };
    Some((of("tansu")?, of("moto")?))
}

impl Phase {
    fn rate(&self) -> f64 {
        self.events as f64 / self.secs
    }
    /// Events per second after the broker's first answer: the records that came later, over the
    /// time from `FIRST_ANSWER` after the first record to the last.
    fn rate_after_first_answer(&self) -> Option<f64> {
        let first = self.first_answer?;
        let secs = self.secs - FIRST_ANSWER.as_secs_f64();
        (secs > 0.0).then(|| self.events.saturating_sub(first) as f64 / secs)
    }
    fn per_cpu_second(&self) -> f64 {
        self.events as f64 / self.cpu_secs
    }
    fn line(&self, name: &str, note: &str) -> String {
        let mut line = format!(
            "{name:<26}{:>10.0} events/s  {:>10.0} events/CPU-s  peak RSS {:>6.0} MiB (+{:.0} over its start)  {note}",
            self.rate(),
            self.per_cpu_second(),
            self.peak_rss_mib,
            self.peak_rss_mib - self.rss_start_mib
        );
        if let (Some(first), Some(rate)) = (self.first_answer, self.rate_after_first_answer()) {
            line.push_str(&format!(
                "\n  after the first answer  {rate:>10.0} events/s ({first} records were in hand {} ms after the first)",
                FIRST_ANSWER.as_millis()
            ));
        }
        if let Some(active) = self.active_cpu_secs {
            line.push_str(&format!(
                "\n  first record to last    {:>10.0} events/CPU-s ({active:.2} of the phase's {:.2} CPU-s; the rest is {})",
                self.events as f64 / active,
                self.cpu_secs,
                self.rest
            ));
        }
        if !self.threads.is_empty() {
            let threads: Vec<String> = self
                .threads
                .iter()
                .map(|(name, seconds)| {
                    format!("{name} {:.0} ns", seconds * 1e9 / self.events as f64)
                })
                .collect();
            line.push_str(&format!(
                "\n  per event, by thread     {} (first record to last)",
                threads.join(", ")
            ));
        }
        if let Some((broker, store)) = self.services_cpu {
            line.push_str(&format!(
                "\n  beside it               tansu {broker:.1} CPU-s, moto {store:.1} CPU-s on the same cores"
            ));
        }
        line
    }
}

/// What a phase's run measured from its first record to its last.
#[derive(Default)]
struct Span {
    secs: f64,
    /// CPU seconds over the span (`None`: not measured).
    cpu_secs: Option<f64>,
    /// CPU seconds over the span by thread name (empty: not measured).
    threads: BTreeMap<String, f64>,
    /// Records in hand `FIRST_ANSWER` after the first (`None`: not measured).
    first_answer: Option<u64>,
}

/// Measures CPU and peak RSS around `run`, which returns its [`Span`]. With
/// `STRATA_BENCH_PROFILE=<phase>`, `perf record` samples this process during that phase (`bare`,
/// `strata`, `gold` or `memory`) into `perf-<phase>.data`, at `STRATA_BENCH_PROFILE_HZ` samples
/// per second (997 when unset), with `STRATA_BENCH_PROFILE_CALL_GRAPH` as `perf record
/// --call-graph` (`fp` when unset; `dwarf` follows Rust frames without frame pointers).
async fn measure<F>(phase: &str, events: u64, run: F) -> anyhow::Result<Phase>
where
    F: std::future::Future<Output = anyhow::Result<Span>>,
{
    let profiler = match std::env::var("STRATA_BENCH_PROFILE") {
        Ok(wanted) if wanted == phase => {
            let frequency =
                std::env::var("STRATA_BENCH_PROFILE_HZ").unwrap_or_else(|_| "997".to_string());
            let call_graph = std::env::var("STRATA_BENCH_PROFILE_CALL_GRAPH")
                .unwrap_or_else(|_| "fp".to_string());
            let child = std::process::Command::new("perf")
                .args([
                    "record",
                    "-F",
                    &frequency,
                    "--call-graph",
                    &call_graph,
                    "-o",
                ])
                .arg(format!("perf-{phase}.data"))
                .args(["-p", &std::process::id().to_string()])
                .spawn()
                .context("starting perf record")?;
            // perf needs a moment to attach.
            tokio::time::sleep(Duration::from_millis(500)).await;
            Some(child)
        }
        _ => None,
    };
    // Resets VmHWM to the current RSS (Linux 4.0+). Without it the peak would be the process's
    // (an earlier phase's): then none is printed.
    let reset = std::fs::write("/proc/self/clear_refs", "5").is_ok()
        && status_mib("VmHWM")? <= status_mib("VmRSS")? + 1.0;
    let rss_start_mib = status_mib("VmRSS")?;
    let cpu = cpu_seconds()?;
    let services_start = services_cpu();
    let Span {
        secs,
        cpu_secs: active_cpu_secs,
        threads,
        first_answer,
    } = run.await?;
    let services_cpu = services_start
        .zip(services_cpu())
        .map(|((broker, store), (broker_end, store_end))| (broker_end - broker, store_end - store));
    if let Some(mut child) = profiler {
        std::process::Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status()?;
        child.wait()?;
    }
    Ok(Phase {
        events,
        secs,
        cpu_secs: cpu_seconds()? - cpu,
        active_cpu_secs,
        rest: "start-up, group join and shutdown",
        threads,
        rss_start_mib,
        services_cpu,
        first_answer,
        peak_rss_mib: if reset {
            status_mib("VmHWM")?
        } else {
            f64::NAN
        },
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if std::env::var_os("STRATA_BENCH_LOG").is_some() {
        log::set_boxed_logger(Box::new(StderrLog(Instant::now())))
            .map_err(|e| anyhow::anyhow!("logger: {e}"))?;
        log::set_max_level(log::LevelFilter::Debug);
    }
    let events: u64 = std::env::var("STRATA_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500_000);
    let phases = std::env::var("STRATA_BENCH_PHASES")
        .unwrap_or_else(|_| "bare,strata,gold,memory".to_string());
    let wanted = |phase: &str| phases.split(',').any(|p| p.trim() == phase);
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("1.avsc"), ORDER_V1)?;
    std::fs::write(dir.path().join("2.avsc"), ORDER_V2)?;
    let reader = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/schemas/order.avsc"));
    let shared = shared_properties()?;
    let shared_vars: Vec<(String, String)> = shared
        .iter()
        .map(|(k, v)| {
            let var = format!("STRATA_KAFKA_{}", k.to_ascii_uppercase().replace('.', "_"));
            (var, v.clone())
        })
        .collect();
    let vars = |brokers: &str, topic: &str, group: &str, lake: &str, gold: bool| {
        let mut extra = vec![
            ("STRATA_FLUSH_INTERVAL", "1s"),
            ("STRATA_FILE_MAX_ROWS", "500000"),
        ];
        extra.extend(shared_vars.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        if gold {
            extra.extend([
                ("STRATA_GOLD_KEY", "customer_id"),
                ("STRATA_GOLD_WINDOW", "1m"),
                ("STRATA_GOLD_AGGREGATES", "count, sum(amount)"),
                ("STRATA_WATERMARK_DELAY", "30s"),
                ("STRATA_IDLE_TIMEOUT", "5s"),
            ]);
        }
        strata::demo::replica_vars(brokers, group, topic, dir.path(), reader, lake, &extra)
    };

    let mut lines = Vec::new();
    let mut raw = None;
    let mut ratios = Vec::new();
    if ["bare", "strata", "gold"].into_iter().any(wanted) {
        let brokers = env("STRATA_TEST_BROKERS")?;
        let bucket = env("STRATA_TEST_S3_BUCKET")?;
        let topic = format!("bench-{}", std::process::id());
        let last_offsets = fill(&brokers, &topic, events).await?;

        if wanted("bare") {
            // A fresh group reads every record (touching each payload).
            let (brokers, topic) = (brokers.clone(), topic.clone());
            let phase = measure("bare", events, async move {
                {
                    let shared = shared.clone();
                    tokio::task::spawn_blocking(move || {
                        bare_consumer(&brokers, &topic, events, &shared)
                    })
                    .await?
                }
            })
            .await?;
            lines.push(phase.line("bare rdkafka consumer", ""));
            raw = Some((phase.rate(), phase.rate_after_first_answer()));
        }
        // Strata: a replica from its first record until every partition's progress is committed
        // (each run with a fresh group and lake).
        for gold in [false, true] {
            let name = if gold { "gold" } else { "strata" };
            if !wanted(name) {
                continue;
            }
            let config = Config::from_vars(vars(
                &brokers,
                &topic,
                &format!("{name}-{topic}"),
                &format!("s3://{bucket}/{topic}-{name}"),
                gold,
            ))?;
            let mut finished = None;
            let gold_cpu_start = strata::demo::process_cpu_seconds();
            let phase = measure(name, events, async {
                let run = strata::demo::run_until_caught_up(
                    config,
                    &topic,
                    &last_offsets,
                    Duration::from_secs(900),
                )
                .await?;
                anyhow::ensure!(run.caught_up, "{name} did not catch up");
                let first = run.first_record.context("no first record")?;
                let secs = run.elapsed.saturating_sub(first).as_secs_f64();
                let span = Span {
                    secs,
                    cpu_secs: run
                        .cpu_at_first_record
                        .zip(run.cpu_at_caught_up)
                        .map(|(a, b)| b - a),
                    threads: run.threads_first_to_last.clone(),
                    first_answer: run.first_answer,
                };
                finished = Some(run);
                Ok(span)
            })
            .await?;
            let mut phase = phase;
            if gold {
                // Measured until Silver caught up: Gold's windows close after that.
                phase.rest =
                    "start-up, group join, Gold's wait for its windows to close, and shutdown";
            }
            let run = finished.context("no run")?;
            if gold {
                lines.push(phase.line("strata + Gold (1m count,sum)", ""));
                if let (Some(at), Some(cpu)) = (run.cpu_at_caught_up, gold_cpu_start) {
                    lines.push(format!(
                        "{:<26}{:>10.0} events/CPU-s until Silver was caught up (every epoch pre-aggregated and sent); the rest waited for the watermark to close the windows",
                        "  gold CPU",
                        events as f64 / (at - cpu)
                    ));
                }
                let g = run.metrics.gold().snapshot(8);
                let partials: u64 = g.partials.iter().sum();
                lines.push(format!(
                    "{:<26}{} events into {partials} partials; the last window's row committed {:.1}s after the start ({} rows; includes the 5 s idle timeout; the phase's CPU above counts until 15 s after it, idle time included)",
                    "  gold",
                    g.events,
                    run.gold_elapsed.map_or(f64::NAN, |d| d.as_secs_f64()),
                    g.windows_emitted
                ));
            } else {
                lines.push(phase.line(
                    "strata -> Silver (S3)",
                    &format!(
                        "({} commits, {} files)",
                        run.summary.commits, run.summary.files
                    ),
                ));
            }
            let (flushes, flush_secs) = run.metrics.flush_seconds();
            let waited = run.metrics.source_waiting_seconds();
            let early = run.metrics.caught_up_flushes();
            lines.push(format!(
                "{:<26}{flushes} flushes ({early} on catching up) took {flush_secs:.1}s in all ({:.0}% of the run); the source waited {waited:.1}s for room in the pipeline, so fetching went on during at least {:.0}% of the flush time",
                "  flush overlap",
                100.0 * flush_secs / phase.secs,
                100.0 * (1.0 - (waited / flush_secs.max(f64::MIN_POSITIVE)).min(1.0))
            ));
            if let Some(raw) = raw {
                ratios.push(format!(
                    "ratio {:<20}{:>10.2}   (first record to last, same broker, same run)",
                    format!("{name} / bare"),
                    phase.rate() / raw.0
                ));
                if let (Some(after), Some(raw_after)) = (phase.rate_after_first_answer(), raw.1) {
                    ratios.push(format!(
                        "ratio {:<20}{:>10.2}   (after the first answer: the records that came later)",
                        format!("{name} / bare"),
                        after / raw_after
                    ));
                }
            }
        }
    }

    if wanted("memory") {
        // The pipeline's own ceiling: no broker, a local lake.
        let ceiling_events = events.min(1_000_000);
        let records = memory_records(ceiling_events)?;
        // Twice: with files encoded at the flush, as before rolling files, and with rolling
        // files (encoded beside decoding, as a replica does).
        for rolling in [false, true] {
            let lake = tempfile::tempdir()?;
            let config = Config::from_vars(vars(
                "127.0.0.1:9",
                "orders",
                "ceiling",
                &format!("file://{}", lake.path().display()),
                false,
            ))?;
            let mut paused = 0.0;
            let phase = measure("memory", ceiling_events, async {
                let secs = pipeline_ceiling(&config, &records, rolling, &mut paused).await?;
                Ok(Span {
                    secs,
                    ..Span::default()
                })
            })
            .await?;
            let name = if rolling {
                "pipeline from memory"
            } else {
                "  encoded at the flush"
            };
            lines.push(phase.line(
                name,
                &format!(
                    "(decode -> buffers -> zstd Parquet -> local lake, no broker; {:.1} MiB of Parquet)",
                    parquet_bytes(lake.path()) as f64 / 1048576.0
                ),
            ));
            lines.push(format!(
                "{:<26}decoding waited {paused:.2}s for flushes ({:.0}% of the run)",
                "  flush pauses",
                100.0 * paused / phase.secs
            ));
        }
    }

    println!();
    for line in lines.iter().chain(&ratios) {
        println!("{line}");
    }
    Ok(())
}

/// Creates `topic` and fills it with `events` generated orders; returns the last offset of each
/// partition. Event times advance 1 ms per order, each up to 20 s early: in bounds for Gold.
async fn fill(brokers: &str, topic: &str, events: u64) -> anyhow::Result<BTreeMap<i32, i64>> {
    let partitions = 6;
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    for result in admin
        .create_topics(
            &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await?
    {
        result.map_err(|(t, e)| anyhow::anyhow!("creating {t}: {e}"))?;
    }
    let started = Instant::now();
    let generator = strata::demo::OrderGenerator::new(7, 1)?.ordered(1, 20_000);
    let produced = strata::demo::produce_generated(brokers, topic, events, generator).await?;
    let bytes: usize = produced.records.iter().map(|r| r.value.len()).sum();
    println!(
        "filled {topic}: {events} events over {partitions} partitions, {:.1} MiB of Avro in {:.1}s",
        bytes as f64 / 1048576.0,
        started.elapsed().as_secs_f64()
    );
    Ok(produced.last_offsets())
}

/// Reads `events` records of `topic` with a bare consumer; returns the seconds from the first to
/// the last.
fn bare_consumer(
    brokers: &str,
    topic: &str,
    events: u64,
    shared: &[(String, String)],
) -> anyhow::Result<Span> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("raw-{topic}"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        // As Strata's source sets it: the bench compares the pipeline, not this default.
        .set(
            "fetch.queue.backoff.ms",
            strata::kafka::consumer::FETCH_QUEUE_BACKOFF_MS,
        );
    for (key, value) in shared {
        config.set(key, value);
    }
    let consumer: BaseConsumer = config.create()?;
    consumer.subscribe(&[topic])?;
    let started = Instant::now();
    let mut first = None;
    let mut cpu_at_first = None;
    let mut threads_at_first = strata::demo::ThreadCpu::default();
    let mut seen = 0u64;
    let mut first_answer = None;
    let mut checksum = 0u64;
    let trace = std::env::var_os("STRATA_BENCH_TRACE").is_some();
    let mut traced = Instant::now();
    while seen < events {
        if trace && traced.elapsed() >= Duration::from_millis(250) {
            traced = Instant::now();
            eprintln!(
                "{:>7.2}s bare consumer: consumed {seen:>8}",
                started.elapsed().as_secs_f64()
            );
        }
        let message = consumer.poll(Duration::from_millis(500));
        // Reads the clock per record only until then.
        if first_answer.is_none() && first.is_some_and(|f: Instant| f.elapsed() >= FIRST_ANSWER) {
            first_answer = Some(seen);
        }
        if let Some(message) = message {
            if first.is_none() {
                first = Some(Instant::now());
                cpu_at_first = strata::demo::process_cpu_seconds();
                threads_at_first = strata::demo::ThreadCpu::now();
            }
            checksum = checksum.wrapping_add(message?.payload().map_or(0, |p| p.len() as u64));
            seen += 1;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "raw consumer stalled at {seen}"
        );
    }
    std::hint::black_box(checksum);
    Ok(Span {
        secs: first.map_or(0.0, |f| f.elapsed().as_secs_f64()),
        cpu_secs: cpu_at_first
            .zip(strata::demo::process_cpu_seconds())
            .map(|(a, b)| b - a),
        threads: threads_at_first.since(),
        first_answer,
    })
}

/// Bytes of the Parquet files under `dir`.
fn parquet_bytes(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| {
            let path = entry.path();
            if path.is_dir() {
                parquet_bytes(&path)
            } else if path.extension().is_some_and(|e| e == "parquet") {
                entry.metadata().map_or(0, |m| m.len())
            } else {
                0
            }
        })
        .sum()
}

/// `events` generated orders as consumed records of one partition.
fn memory_records(events: u64) -> anyhow::Result<Vec<SourceRecord>> {
    let mut generator = strata::demo::OrderGenerator::new(7, 1)?.ordered(1, 20_000);
    (0..events)
        .map(|offset| {
            Ok(SourceRecord {
                topic: "orders".into(),
                partition: 0,
                offset: offset as i64,
                timestamp_ms: Some(chrono::Utc::now().timestamp_millis()),
                key: None,
                value: Some(generator.next_record()?.value.into()),
                headers: Vec::new(),
            })
        })
        .collect()
}

/// Decodes `records` in chunks of 2,000 (as the source hands them over), buffers the batches and
/// flushes every `STRATA_FILE_MAX_ROWS` rows: zstd Parquet files committed to the lake with the
/// partition's progress. Returns the seconds it took.
/// With `rolling`, batches are buffered as a replica buffers them (`SilverTable::buffer`: rolling
/// files encode them in the background); without, they are only buffered and the flush encodes
/// them. `paused` gets the seconds decoding waited for flushes.
async fn pipeline_ceiling(
    config: &Config,
    records: &[SourceRecord],
    rolling: bool,
    paused: &mut f64,
) -> anyhow::Result<f64> {
    let reader = strata::schema::reader::ReaderSchema::parse(strata::demo::ORDER_READER, "order")?;
    let mut table = strata::silver::tables::SilverTable::open(config, reader).await?;
    table.decoder.register(1, Ok(ORDER_V1));
    table.decoder.register(2, Ok(ORDER_V2));
    let tp = TopicPartition::new("orders", 0);
    table.committer.claim(std::slice::from_ref(&tp)).await?;
    let started = Instant::now();
    let mut committed = 0usize;
    let chunks: Vec<&[SourceRecord]> = records.chunks(2_000).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        let decoded = table.decoder.decode(chunk);
        anyhow::ensure!(decoded.rejected.is_empty(), "rejected rows");
        if let Some(batch) = decoded.batch {
            if rolling {
                table.buffer(&tp, batch);
            } else {
                let part = table.parts.entry(tp.clone()).or_default();
                part.rows += batch.num_rows();
                part.batches.push(batch);
            }
        }
        let rows = table.parts.get(&tp).map_or(0, |p| p.rows);
        if rows >= config.file_max_rows || i + 1 == chunks.len() {
            let flush = Instant::now();
            let last = chunk.last().map_or(0, |r| r.offset);
            let files = table.upload(std::slice::from_ref(&tp)).await?;
            let outcome = table
                .committer
                .commit(files, &BTreeMap::from([(tp.clone(), last)]))
                .await?;
            anyhow::ensure!(
                matches!(
                    outcome,
                    strata::lake::commit::CommitOutcome::Committed { .. }
                ),
                "commit fenced"
            );
            table.uploads = Default::default();
            let part = table.parts.entry(tp.clone()).or_default();
            part.batches.clear();
            part.rows = 0;
            committed += rows;
            *paused += flush.elapsed().as_secs_f64();
        }
    }
    anyhow::ensure!(
        committed == records.len(),
        "committed {committed} of {} rows",
        records.len()
    );
    Ok(started.elapsed().as_secs_f64())
}

//! Shared helpers of the integration tests. They run against the real services that
//! `scripts/services.sh` starts for `make test`: tansu (Kafka protocol) and moto (S3).
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::ClientConfig;
use strata::demo::{ORDER_V1, ORDER_V2};

pub mod acl_proxy;
pub mod broker;
pub mod s3_faults;
pub mod secured;

/// A chaos run's settings: how many restarts (`STRATA_CHAOS_RESTARTS`, 4 unless set) and the
/// seed of its random choices (`STRATA_CHAOS_SEED`, from the clock unless set), printed so that
/// a failing run can be replayed.
pub fn chaos_run(what: &str) -> (u64, u64) {
    let setting = |name: &str| std::env::var(name).ok().and_then(|v| v.parse().ok());
    let restarts = setting("STRATA_CHAOS_RESTARTS").unwrap_or(4);
    let seed = setting("STRATA_CHAOS_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(7)
            | 1
    });
    eprintln!("{what}: {restarts} restarts, STRATA_CHAOS_SEED={seed}");
    (restarts, seed)
}

/// One round of a chaos run: the replica at `victim` goes, by SIGKILL (`kill`) or SIGTERM, and
/// a new one (`spawn`) takes its place.
pub fn restart_one(
    replicas: &mut Vec<Replica>,
    victim: usize,
    kill: bool,
    round: u64,
    spawn: impl FnOnce() -> Replica,
) {
    let replica = replicas.swap_remove(victim);
    if kill {
        eprintln!("round {round}: SIGKILL pid {}", replica.pid());
        replica.sigkill();
    } else {
        eprintln!("round {round}: SIGTERM pid {}", replica.pid());
        replica.stop(Duration::from_secs(45));
    }
    replicas.push(spawn());
}

pub fn brokers() -> String {
    std::env::var("STRATA_TEST_BROKERS")
        .expect("STRATA_TEST_BROKERS is not set: run the integration tests with `make test`")
}

pub fn bucket() -> String {
    std::env::var("STRATA_TEST_S3_BUCKET")
        .expect("STRATA_TEST_S3_BUCKET is not set: run with `make test`")
}

/// A name unique to this test run, for topics, groups and table prefixes.
pub fn unique(name: &str) -> String {
    format!(
        "{name}-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple().to_string().split_at(8).0
    )
}

pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

pub async fn create_topic(topic: &str, partitions: i32) {
    create_topic_on(&brokers(), topic, partitions).await
}

pub async fn create_topic_on(brokers: &str, topic: &str, partitions: i32) {
    create_topic_with(brokers, &[], topic, partitions).await
}

/// A client configuration: the brokers and more properties (security settings of a secured broker).
pub fn client_config(brokers: &str, properties: &[(String, String)]) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", brokers);
    for (key, value) in properties {
        config.set(key, value);
    }
    config
}

pub async fn create_topic_with(
    brokers: &str,
    properties: &[(String, String)],
    topic: &str,
    partitions: i32,
) {
    let admin: AdminClient<DefaultClientContext> = client_config(brokers, properties)
        .create()
        .expect("admin client");
    let results = admin
        .create_topics(
            &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await
        .expect("create topics");
    for result in results {
        result.expect("topic created");
    }
}

/// Source offsets a test expects in the table, and those it expects in the dead-letter topic.
#[derive(Default, Clone)]
pub struct Produced {
    pub good: Vec<(String, i32, i64)>,
    pub bad: Vec<(String, i32, i64)>,
    /// (partition, offset) → original value of every undecodable record.
    pub bad_values: HashMap<(i32, i64), Vec<u8>>,
    /// (partition, offset) → (order_id, amount) of every good record, to check values survived intact.
    pub values: HashMap<(i32, i64), (i64, f64)>,
}

impl Produced {
    pub fn extend(&mut self, other: Produced) {
        self.good.extend(other.good);
        self.bad.extend(other.bad);
        self.bad_values.extend(other.bad_values);
        self.values.extend(other.values);
    }

    /// Last offset per partition (good or bad), i.e. where the table's progress must end.
    pub fn last_offsets(&self) -> BTreeMap<i32, i64> {
        let mut out = BTreeMap::new();
        for (_, p, o) in self.good.iter().chain(&self.bad) {
            let slot = out.entry(*p).or_insert(-1);
            *slot = (*slot).max(*o);
        }
        out
    }
}

/// Produces `count` generated order events (one in `bad_every` undecodable) and records where
/// each landed, with the values of the good ones decoded independently (apache-avro).
pub async fn produce(topic: &str, count: u64, bad_every: u64, seed: u64) -> Produced {
    produce_on(&brokers(), topic, count, bad_every, seed).await
}

pub async fn produce_on(
    brokers: &str,
    topic: &str,
    count: u64,
    bad_every: u64,
    seed: u64,
) -> Produced {
    produce_with(brokers, &[], topic, count, bad_every, seed).await
}

/// [`produce_on`] with more producer properties (security settings, `compression.type`).
pub async fn produce_with(
    brokers: &str,
    properties: &[(String, String)],
    topic: &str,
    count: u64,
    bad_every: u64,
    seed: u64,
) -> Produced {
    let generator = strata::demo::OrderGenerator::new(seed, bad_every).expect("generator");
    let orders = strata::demo::produce_generated_with(brokers, properties, topic, count, generator)
        .await
        .expect("produce");
    let mut produced = Produced::default();
    for record in orders.records {
        if record.decodable {
            let fields = order_fields(&record.value).expect("generated records decode");
            produced
                .values
                .insert((record.partition, record.offset), fields);
            produced.good.push(record.position());
        } else {
            produced.bad.push(record.position());
            produced
                .bad_values
                .insert((record.partition, record.offset), record.value);
        }
    }
    produced
}

/// `(order_id, amount)` of a generated value, decoded independently with apache-avro.
fn order_fields(value: &[u8]) -> Option<(i64, f64)> {
    let framed = strata::schema::wire::parse(value).ok()?;
    let schema = apache_avro::Schema::parse_str(if framed.schema_id == 1 {
        ORDER_V1
    } else {
        ORDER_V2
    })
    .ok()?;
    let mut body = framed.body;
    let decoded = apache_avro::reader::datum::GenericDatumReader::builder(&schema)
        .build()
        .ok()?
        .read_value(&mut body)
        .ok()?;
    let apache_avro::types::Value::Record(fields) = decoded else {
        return None;
    };
    let mut order_id = None;
    let mut amount = None;
    for (name, value) in fields {
        match (name.as_str(), value) {
            ("order_id", apache_avro::types::Value::Long(v)) => order_id = Some(v),
            ("amount", apache_avro::types::Value::Double(v)) => amount = Some(v),
            _ => {}
        }
    }
    Some((order_id?, amount?))
}

/// Answers of a tiny HTTP/1.1 server: `(path, whole request head) -> (status, body)`.
pub type Handler = Arc<dyn Fn(&str, &str) -> (u16, String) + Send + Sync>;

/// Serves HTTP on `listener` with `handler` (one request per connection) until the runtime ends;
/// returns the count of connections served. Used to replay recorded Schema Registry answers.
pub fn serve_http(
    listener: tokio::net::TcpListener,
    handler: Handler,
) -> Arc<std::sync::atomic::AtomicUsize> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = hits.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let handler = handler.clone();
            tokio::spawn(async move {
                let mut buffer = vec![0u8; 8192];
                let mut read = 0;
                while !buffer[..read].windows(4).any(|w| w == b"\r\n\r\n") && read < buffer.len() {
                    match stream.read(&mut buffer[read..]).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => read += n,
                    }
                }
                let request = String::from_utf8_lossy(&buffer[..read]).into_owned();
                let path = request.split_whitespace().nth(1).unwrap_or("/").to_string();
                let (status, body) = handler(&path, &request);
                let reply = format!(
                    "HTTP/1.1 {status} X\r\nContent-Type: application/vnd.schemaregistry.v1+json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(reply.as_bytes()).await;
            });
        }
    });
    hits
}

/// How long a test waits for a replica to commit everything produced.
pub const CATCH_UP: Duration = Duration::from_secs(240);

/// Session timeout the test replicas use (`STRATA_KAFKA_SESSION_TIMEOUT_MS`).
pub const SESSION_TIMEOUT: Duration = Duration::from_secs(15);

/// Waits until the session of a member that died without leaving the group (SIGKILL, SIGSTOP) has
/// expired. tansu, the test broker, does not start a new rebalance when a member of a stable group
/// expires: a replica that joins while a dead member still counts can be handed an empty
/// assignment and wait forever. Apache Kafka rebalances on expiry, so this is a test-broker
/// workaround, not something production replicas need.
///
/// tansu stamps a member's last contact when it handles the heartbeat, not when the heartbeat was
/// sent: on a loaded machine a heartbeat sent just before the kill can be handled seconds later.
/// With 2 s of margin, CI once saw the dead member still counted (`exactly_once`, the final
/// replica assigned nothing for 240 s); the margin is 6 s.
pub async fn outlive_dead_member() {
    tokio::time::sleep(SESSION_TIMEOUT + Duration::from_secs(6)).await;
}

/// Extra environment that makes a replica log its consumer group's protocol (librdkafka's `cgrp`
/// debug), so that [`assert_left_group`] can tell whether it sent its LeaveGroup and whether the
/// broker answered it.
pub const GROUP_DEBUG: [(&str, &str); 2] = [
    ("STRATA_KAFKA_DEBUG", "cgrp"),
    ("STRATA_LOG", "info,strata=debug,librdkafka=debug"),
];

/// After a replica of group `group` started with [`GROUP_DEBUG`] stopped: asserts that it left
/// its group after its log held `from` lines (when it was told to stop: a replica that misses
/// `max.poll.interval.ms` leaves too), and if no LeaveGroup reached the broker (its coordinator
/// connection was down, so none was sent) or the broker did not answer it, waits as for a dead
/// member ([`outlive_dead_member`]). librdkafka sends LeaveGroup once, best effort, with a 5 s
/// timeout; tansu, slow with a large database, sometimes answers later, keeps the member, and
/// hands the next replica that joins alone an empty assignment for good. A Kafka broker expires
/// the member and rebalances instead.
pub async fn assert_left_group(log: &Mutex<Vec<String>>, from: usize, group: &str) {
    let (leave, answered, group_log) = {
        let log = log.lock().expect("log");
        let stopping = log.get(from..).unwrap_or_default();
        let leave = stopping
            .iter()
            .find(|line| line.contains(group) && line.contains(": leave (in state "))
            .cloned();
        let answered = stopping
            .iter()
            .any(|line| line.contains("LeaveGroup response received"));
        let mut group_log: Vec<String> = stopping
            .iter()
            .filter(|line| line.contains("CGRP") || line.contains(group))
            .cloned()
            .collect();
        group_log.drain(..group_log.len().saturating_sub(40));
        (leave, answered, group_log)
    };
    let Some(leave) = leave else {
        panic!(
            "the replica stopped without leaving its group; its group log since it was told to stop:\n{}",
            group_log.join("\n")
        );
    };
    // librdkafka sends the LeaveGroup only while its coordinator connection is up; otherwise it
    // leaves locally, and the broker expires the member after its session.
    if !leave.contains("(in state up)") || !answered {
        eprintln!(
            "the broker did not get or did not answer the replica's LeaveGroup ({leave}): waiting out its session"
        );
        outlive_dead_member().await;
    }
}

/// A record read back from a dead-letter topic.
#[derive(Debug)]
pub struct DeadLetter {
    pub source: (String, i32, i64),
    pub kind: String,
    pub message: String,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
}

/// Asserts that the dead-letter topic `topic` on `brokers` holds exactly the bad records of
/// `produced` (as a set: a kill between a letter's acknowledgement and the commit of its offset
/// sends it again); returns how many letters it holds.
pub async fn assert_dead_letters_are(brokers: &str, topic: &str, produced: &Produced) -> usize {
    let letters =
        dead_letters_on(brokers, topic, produced.bad.len(), Duration::from_secs(60)).await;
    let sources: std::collections::BTreeSet<_> = letters.iter().map(|l| l.source.clone()).collect();
    let expected: std::collections::BTreeSet<_> = produced.bad.iter().cloned().collect();
    assert_eq!(
        sources, expected,
        "the dead-letter topic holds exactly the bad records"
    );
    letters.len()
}

/// Reads every record of the dead-letter topic `topic` (all partitions, to the end), once it
/// holds at least `count` or `timeout` has passed. Duplicates are kept, so a test sees them.
pub async fn dead_letters(topic: &str, count: usize, timeout: Duration) -> Vec<DeadLetter> {
    dead_letters_on(&brokers(), topic, count, timeout).await
}

pub async fn dead_letters_on(
    brokers: &str,
    topic: &str,
    count: usize,
    timeout: Duration,
) -> Vec<DeadLetter> {
    dead_letters_with(brokers, &[], topic, count, timeout).await
}

pub async fn dead_letters_with(
    brokers: &str,
    properties: &[(String, String)],
    topic: &str,
    count: usize,
    timeout: Duration,
) -> Vec<DeadLetter> {
    let topic = topic.to_string();
    let config = client_config(brokers, properties);
    tokio::task::spawn_blocking(move || {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        use rdkafka::message::{Headers, Message};
        use rdkafka::{Offset, TopicPartitionList};
        let consumer: BaseConsumer = config
            .clone()
            .set("group.id", unique("dlq-reader"))
            .set("enable.auto.commit", "false")
            .set("fetch.message.max.bytes", "16777216")
            .create()
            .expect("consumer");
        let deadline = Instant::now() + timeout;
        // The ends of every partition, once they add up to `count` (or the time is up).
        let ends: BTreeMap<i32, (i64, i64)> = loop {
            let partitions = consumer
                .fetch_metadata(Some(&topic), Duration::from_secs(5))
                .ok()
                .and_then(|m| {
                    m.topics()
                        .iter()
                        .find(|t| t.name() == topic && t.error().is_none())
                        .map(|t| t.partitions().len() as i32)
                })
                .unwrap_or(0);
            let ends: BTreeMap<i32, (i64, i64)> = (0..partitions)
                .filter_map(|p| {
                    consumer
                        .fetch_watermarks(&topic, p, Duration::from_secs(5))
                        .ok()
                        .map(|w| (p, w))
                })
                .collect();
            let held: i64 = ends.values().map(|(low, high)| high - low).sum();
            if held as usize >= count || Instant::now() >= deadline {
                break ends;
            }
            std::thread::sleep(Duration::from_millis(300));
        };
        let mut assignment = TopicPartitionList::new();
        for p in ends.keys() {
            assignment
                .add_partition_offset(&topic, *p, Offset::Beginning)
                .expect("assignment");
        }
        consumer.assign(&assignment).expect("assign");
        let header = |m: &rdkafka::message::BorrowedMessage<'_>, name: &str| -> String {
            m.headers()
                .and_then(|h| h.iter().find(|x| x.key == name).and_then(|x| x.value))
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default()
        };
        let mut next: BTreeMap<i32, i64> = ends.iter().map(|(p, (low, _))| (*p, *low)).collect();
        let mut out = Vec::new();
        let read_by = Instant::now().max(deadline) + Duration::from_secs(30);
        while ends.iter().any(|(p, (_, high))| next[p] < *high) && Instant::now() < read_by {
            let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) else {
                continue;
            };
            next.insert(m.partition(), m.offset() + 1);
            out.push(DeadLetter {
                source: (
                    header(&m, "strata.source.topic"),
                    header(&m, "strata.source.partition").parse().unwrap_or(-1),
                    header(&m, "strata.source.offset").parse().unwrap_or(-1),
                ),
                kind: header(&m, "strata.error.kind"),
                message: header(&m, "strata.error.message"),
                key: m.key().map(<[u8]>::to_vec),
                value: m.payload().map(<[u8]>::to_vec),
            });
        }
        out
    })
    .await
    .expect("dead-letter reader")
}

/// Partition count of `topic` as the broker reports it (`None`: it does not exist).
pub fn partition_count(topic: &str) -> Option<usize> {
    partition_count_on(&brokers(), topic)
}

pub fn partition_count_on(brokers: &str, topic: &str) -> Option<usize> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("consumer");
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(5))
        .ok()?;
    metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none())
        .map(|t| t.partitions().len())
        .filter(|n| *n > 0)
}

/// A pipeline under test: its topic, group, lake and schema folder.
pub struct Setup {
    pub brokers: String,
    pub topic: String,
    pub group: String,
    pub lake: String,
    pub schemas: PathBuf,
    pub reader: PathBuf,
    _dir: tempfile::TempDir,
}

impl Setup {
    pub async fn new(name: &str, partitions: i32) -> Self {
        Self::on(&brokers(), name, partitions).await
    }

    /// A setup on another broker than the shared one.
    pub async fn on(brokers: &str, name: &str, partitions: i32) -> Self {
        Self::on_with(brokers, &[], name, partitions).await
    }

    /// A setup on a broker that needs client properties (TLS, SASL) to be reached.
    pub async fn on_with(
        brokers: &str,
        properties: &[(String, String)],
        name: &str,
        partitions: i32,
    ) -> Self {
        let topic = unique(name);
        // Only the Bronze topic, as a user's platform has it: Strata creates its dead-letter topic.
        create_topic_with(brokers, properties, &topic, partitions).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let schemas = dir.path().join("schemas");
        std::fs::create_dir_all(&schemas).expect("mkdir");
        std::fs::write(schemas.join("1.avsc"), ORDER_V1).expect("write");
        std::fs::write(schemas.join("2.avsc"), ORDER_V2).expect("write");
        let reader = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("schemas/order.avsc");
        Self {
            brokers: brokers.to_string(),
            group: format!("strata-{topic}"),
            lake: format!("s3://{}/{topic}", bucket()),
            topic,
            schemas,
            reader,
            _dir: dir,
        }
    }

    pub fn table_url(&self) -> url::Url {
        self.table_url_of("order")
    }

    pub fn table_url_of(&self, table: &str) -> url::Url {
        strata::lake::register_object_stores();
        strata::lake::table_url(&self.lake, "silver", table).expect("table url")
    }

    /// Environment of a `strata` process for this setup.
    pub fn env(&self, metrics_port: u16) -> Vec<(String, String)> {
        [
            ("STRATA_KAFKA_BROKERS", self.brokers.clone()),
            ("STRATA_GROUP_ID", self.group.clone()),
            ("STRATA_TOPICS", self.topic.clone()),
            (
                "STRATA_SCHEMA_REGISTRY_URL",
                format!("file://{}", self.schemas.display()),
            ),
            ("STRATA_READER_SCHEMA", self.reader.display().to_string()),
            ("STRATA_EVENT_TIME_FIELD", "event_time".to_string()),
            ("STRATA_LAKE_URL", self.lake.clone()),
            ("STRATA_FLUSH_INTERVAL", "1s".to_string()),
            ("STRATA_METRICS_ADDR", format!("127.0.0.1:{metrics_port}")),
            (
                "STRATA_KAFKA_SESSION_TIMEOUT_MS",
                SESSION_TIMEOUT.as_millis().to_string(),
            ),
            ("STRATA_KAFKA_HEARTBEAT_INTERVAL_MS", "1000".to_string()),
            // tansu waits up to the rebalance timeout for members that died without leaving.
            ("STRATA_KAFKA_MAX_POLL_INTERVAL_MS", "15000".to_string()),
            ("STRATA_LOG", "info,strata=debug".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// Starts a `strata` replica process (see [`strata_binary`]).
    pub fn spawn(&self, extra: &[(&str, &str)]) -> Replica {
        self.spawn_command("run", extra)
    }

    /// Starts `strata <subcommand>` (`run`, `maintain`) with this setup's environment.
    pub fn spawn_command(&self, subcommand: &str, extra: &[(&str, &str)]) -> Replica {
        let port = free_port();
        let mut command = Command::new(strata_binary());
        command
            .arg(subcommand)
            .envs(self.env(port))
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in extra {
            command.env(k, v);
        }
        let mut child = command.spawn().expect("spawn strata");
        let log = Arc::new(Mutex::new(Vec::<String>::new()));
        let stderr = child.stderr.take().expect("stderr");
        let sink = log.clone();
        // With STRATA_TEST_LOG_DIR set, each replica's whole log is also kept in a file.
        let mut file = std::env::var("STRATA_TEST_LOG_DIR").ok().and_then(|dir| {
            std::fs::create_dir_all(&dir).ok()?;
            std::fs::File::create(format!("{dir}/{}-{}.log", self.topic, child.id())).ok()
        });
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(f) = file.as_mut() {
                    use std::io::Write;
                    let _ = writeln!(f, "{line}");
                }
                sink.lock().expect("log").push(line);
            }
        });
        Replica {
            child,
            log,
            metrics_port: port,
        }
    }

    /// Stored `txn` versions of the table per partition of this topic.
    pub async fn progress(&self) -> BTreeMap<i32, i64> {
        self.progress_of("order").await
    }

    /// Stored `txn` versions of table `table` per partition of this topic.
    pub async fn progress_of(&self, table: &str) -> BTreeMap<i32, i64> {
        let prefix = format!("strata/{}", self.group);
        self.progress_at(self.table_url_of(table), &prefix).await
    }

    /// Stored `txn` versions of the table at `url` per partition of this topic, for the app ids
    /// `<prefix>/<topic>/<partition>`.
    pub async fn progress_at(&self, url: url::Url, prefix: &str) -> BTreeMap<i32, i64> {
        let mut out = BTreeMap::new();
        let Ok(table) = deltalake::DeltaTable::try_from_url(url).await else {
            return out;
        };
        let Ok(snapshot) = table.snapshot() else {
            return out;
        };
        for partition in 0..64 {
            let app_id = format!("{prefix}/{}/{partition}", self.topic);
            if let Ok(Some(version)) = snapshot
                .transaction_version(table.log_store().as_ref(), app_id)
                .await
            {
                out.insert(partition, version);
            }
        }
        out
    }

    /// Waits until the table's progress covers `produced`.
    pub async fn wait_for(&self, produced: &Produced, timeout: Duration) -> bool {
        let target = produced.last_offsets();
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            let progress = self.progress().await;
            if target
                .iter()
                .all(|(p, last)| progress.get(p).is_some_and(|v| v >= last))
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        false
    }

    /// Asserts that the table's progress covers `produced` within [`CATCH_UP`], showing the
    /// replicas' logs otherwise.
    pub async fn catch_up(&self, produced: &Produced, replicas: &[&Replica]) {
        if !self.wait_for(produced, CATCH_UP).await {
            let logs: Vec<String> = replicas.iter().map(|r| r.tail(30)).collect();
            panic!(
                "did not catch up within {CATCH_UP:?}; logs:\n{}",
                logs.join("\n---\n")
            );
        }
    }

    /// Reads the table and asserts the exactly-once invariant and intact values.
    pub async fn assert_exact(&self, produced: &Produced) -> strata::lake::verify::TableContents {
        let contents = strata::lake::verify::read_table(self.table_url())
            .await
            .expect("read table");
        let lineage = strata::lake::verify::lineage(&contents.batches).expect("lineage");
        let report = strata::lake::verify::exactly_once(lineage, produced.good.iter().cloned());
        assert!(report.is_exact(), "{report}");
        // Values intact: each order_id carries the amount that was produced.
        let mut checked = 0;
        for batch in &contents.batches {
            use deltalake::arrow::array::AsArray;
            use deltalake::arrow::datatypes::Int32Type;
            use deltalake::arrow::datatypes::{Float64Type, Int64Type};
            let ids = batch
                .column_by_name("order_id")
                .expect("order_id")
                .as_primitive::<Int64Type>();
            let amounts = batch
                .column_by_name("amount")
                .expect("amount")
                .as_primitive::<Float64Type>();
            let partitions = batch
                .column_by_name("_partition")
                .expect("_partition")
                .as_primitive::<Int32Type>();
            let offsets = batch
                .column_by_name("_offset")
                .expect("_offset")
                .as_primitive::<Int64Type>();
            for row in 0..batch.num_rows() {
                let at = (partitions.value(row), offsets.value(row));
                let expected = produced.values.get(&at).expect("produced offset");
                assert_eq!(
                    (ids.value(row), amounts.value(row)),
                    *expected,
                    "values of the record at {at:?}"
                );
                checked += 1;
            }
        }
        assert_eq!(checked, produced.good.len());
        contents
    }
}

/// A running `strata` process and its captured log.
pub struct Replica {
    pub child: Child,
    pub log: Arc<Mutex<Vec<String>>>,
    pub metrics_port: u16,
}

impl Replica {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{signal} failed");
    }

    pub fn sigkill(mut self) {
        self.signal("KILL");
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits for a clean exit (status 0).
    pub fn stop(mut self, within: Duration) {
        self.signal("TERM");
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                assert!(
                    status.success(),
                    "strata exited with {status}; log tail:\n{}",
                    self.tail(30)
                );
                return;
            }
            assert!(
                Instant::now() < deadline,
                "strata did not stop within {within:?}; log tail:\n{}",
                self.tail(30)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for the process to exit by itself; its status, or `None` after `within`.
    pub async fn exited(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    }

    pub fn log_contains(&self, needle: &str) -> bool {
        self.log
            .lock()
            .expect("log")
            .iter()
            .any(|l| l.contains(needle))
    }

    /// Waits until `/readyz` answers 200; panics with `what` and the log tail after `timeout`.
    pub async fn wait_ready(&self, timeout: Duration, what: &str) {
        let deadline = Instant::now() + timeout;
        loop {
            let answer = self.http_get("/readyz").await;
            if answer.as_ref().map(|(status, _)| *status) == Some(200) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what} (last /readyz: {answer:?}):\n{}",
                self.tail(30)
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Waits until `/readyz` answers 503 with `needle` among its reasons and returns the answer;
    /// panics with the log tail after `timeout`.
    pub async fn wait_not_ready(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((503, body)) = self.http_get("/readyz").await {
                if body.contains(needle) {
                    return body;
                }
            }
            assert!(
                Instant::now() < deadline,
                "/readyz never named {needle:?}:\n{}",
                self.tail(30)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.log_contains(needle) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }

    pub fn tail(&self, n: usize) -> String {
        let log = self.log.lock().expect("log");
        log[log.len().saturating_sub(n)..].join("\n")
    }

    /// Status of a GET on the replica's metrics endpoint.
    pub async fn http_status(&self, path: &str) -> u16 {
        reqwest::get(format!("http://127.0.0.1:{}{path}", self.metrics_port))
            .await
            .expect("metrics endpoint answers")
            .status()
            .as_u16()
    }

    /// Status and body of a GET on the replica's metrics endpoint (`None` while it does not answer).
    pub async fn http_get(&self, path: &str) -> Option<(u16, String)> {
        let response = reqwest::get(format!("http://127.0.0.1:{}{path}", self.metrics_port))
            .await
            .ok()?;
        let status = response.status().as_u16();
        Some((status, response.text().await.ok()?))
    }

    /// Every line the replica logged so far.
    pub fn log_lines(&self) -> Vec<String> {
        self.log.lock().expect("log").clone()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The value of an unlabelled-or-summed metric from `/metrics`.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        self.metric_where(name, "").await
    }

    /// Waits (polling every 50 ms, up to a minute) until metric `name` reaches `at_least`; panics
    /// with `what` and the log tail otherwise.
    pub async fn wait_metric(&self, name: &str, at_least: f64, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut value = 0.0;
        while Instant::now() < deadline {
            value = self.metric(name).await.unwrap_or(0.0);
            if value >= at_least {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "{what}: {name} is {value}, never reached {at_least}; log:\n{}",
            self.tail(40)
        );
    }

    /// The sum of the series of metric `name` whose label text contains `labels`.
    pub async fn metric_where(&self, name: &str, labels: &str) -> Option<f64> {
        let body = reqwest::get(format!("http://127.0.0.1:{}/metrics", self.metrics_port))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        let mut total = None;
        for line in body.lines() {
            if line.starts_with('#') {
                continue;
            }
            let (series, value) = line.rsplit_once(' ')?;
            let metric_name = series.split('{').next()?;
            if metric_name == name && series.contains(labels) {
                *total.get_or_insert(0.0) += value.parse::<f64>().ok()?;
            }
        }
        total
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Schema Registry stand-in that answers the Confluent REST calls Strata makes, with the
/// documented bodies and error codes, from state the test can change while a replica runs.
#[derive(Default)]
pub struct FakeRegistry {
    /// Schema id → schema JSON.
    pub ids: Mutex<BTreeMap<u32, String>>,
    /// Subject → schema ids of its versions (version n is element n-1).
    pub subjects: Mutex<BTreeMap<String, Vec<u32>>>,
    /// Schema id → its `references` (`{"name", "subject", "version"}`), as Confluent answers them.
    pub references: Mutex<BTreeMap<u32, serde_json::Value>>,
    /// When set, every request must carry this `Authorization` header, or gets 401.
    pub authorization: Mutex<Option<String>>,
}

impl FakeRegistry {
    /// Registers `schema` under `id` as the next version of `subject`.
    pub fn register(&self, subject: &str, id: u32, schema: &str) {
        self.ids.lock().expect("ids").insert(id, schema.to_string());
        self.subjects
            .lock()
            .expect("subjects")
            .entry(subject.to_string())
            .or_default()
            .push(id);
    }

    /// Registers `schema` under `id` as the next version of `subject`, naming types of other
    /// subjects: `references` holds (full name, subject, version).
    pub fn register_with_references(
        &self,
        subject: &str,
        id: u32,
        schema: &str,
        references: &[(&str, &str, u32)],
    ) {
        self.register(subject, id, schema);
        let references: Vec<serde_json::Value> = references
            .iter()
            .map(|(name, subject, version)| {
                serde_json::json!({ "name": name, "subject": subject, "version": version })
            })
            .collect();
        self.references
            .lock()
            .expect("references")
            .insert(id, serde_json::Value::Array(references));
    }

    /// Requires HTTP basic auth with `user:password` from now on.
    pub fn require_basic_auth(&self, user_info: &str) {
        *self.authorization.lock().expect("auth") =
            Some(format!("Basic {}", base64(user_info.as_bytes())));
    }

    /// Serves the registry on a loopback port; returns its URL.
    pub async fn serve(self: &Arc<Self>) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let this = self.clone();
        serve_http(
            listener,
            Arc::new(move |path: &str, request: &str| this.answer_authorized(path, request)),
        );
        url
    }

    fn answer_authorized(&self, path: &str, request: &str) -> (u16, String) {
        if let Some(expected) = self.authorization.lock().expect("auth").as_deref() {
            let sent = request.lines().find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.eq_ignore_ascii_case("authorization")
                    .then(|| value.trim().to_string())
            });
            if sent.as_deref() != Some(expected) {
                return (
                    401,
                    r#"{"error_code": 40101, "message": "Unauthorized"}"#.to_string(),
                );
            }
        }
        let (status, body) = self.answer(path);
        (status, body)
    }

    fn answer(&self, path: &str) -> (u16, String) {
        let not_found = |code: u32, what: &str| {
            (
                404,
                serde_json::json!({ "error_code": code, "message": format!("{what} not found") })
                    .to_string(),
            )
        };
        let segments: Vec<String> = path
            .trim_start_matches('/')
            .split('/')
            .map(|s| {
                url::form_urlencoded::parse(format!("x={s}").as_bytes())
                    .next()
                    .map(|(_, v)| v.into_owned())
                    .unwrap_or_default()
            })
            .collect();
        let ids = self.ids.lock().expect("ids");
        let subjects = self.subjects.lock().expect("subjects");
        let references = self.references.lock().expect("references");
        let references_of = |id: &u32| {
            references
                .get(id)
                .cloned()
                .unwrap_or_else(|| serde_json::json!([]))
        };
        match segments
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .as_slice()
        {
            ["schemas", "ids", id] => match id.parse().ok().and_then(|id: u32| ids.get(&id)) {
                Some(schema) => {
                    let id: u32 = id.parse().unwrap_or_default();
                    let mut body = serde_json::json!({ "schema": schema });
                    // Confluent leaves `references` out when there are none.
                    if references.contains_key(&id) {
                        body["references"] = references_of(&id);
                    }
                    (200, body.to_string())
                }
                None => not_found(40403, "Schema"),
            },
            ["subjects"] => (
                200,
                serde_json::json!(subjects.keys().collect::<Vec<_>>()).to_string(),
            ),
            ["subjects", subject, "versions"] => match subjects.get(*subject) {
                Some(versions) => (
                    200,
                    serde_json::json!((1..=versions.len()).collect::<Vec<_>>()).to_string(),
                ),
                None => not_found(40401, "Subject"),
            },
            ["subjects", subject, "versions", version] => {
                let Some(versions) = subjects.get(*subject) else {
                    return not_found(40401, "Subject");
                };
                let index = if *version == "latest" {
                    versions.len()
                } else {
                    version.parse().unwrap_or(0)
                };
                match index.checked_sub(1).and_then(|i| versions.get(i)) {
                    Some(id) => (
                        200,
                        serde_json::json!({
                            "subject": subject,
                            "version": index,
                            "id": id,
                            "schema": ids.get(id).cloned().unwrap_or_default(),
                            "references": references_of(id),
                        })
                        .to_string(),
                    ),
                    None => not_found(40402, "Version"),
                }
            }
            _ => (
                404,
                r#"{"error_code": 404, "message": "HTTP 404 Not Found"}"#.to_string(),
            ),
        }
    }
}

/// Produces `values` (key, value) to partition 0 of `topic`, in order; returns their offsets.
pub async fn produce_raw(topic: &str, values: Vec<(Option<Vec<u8>>, Vec<u8>)>) -> Vec<i64> {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("enable.idempotence", "true")
        .set("message.max.bytes", "16777216")
        .create()
        .expect("producer");
    let mut offsets = Vec::with_capacity(values.len());
    for (key, value) in values {
        let mut record: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(topic).partition(0).payload(&value);
        if let Some(key) = key.as_deref() {
            record = record.key(key);
        }
        let delivered = producer
            .send(record, Duration::from_secs(30))
            .await
            .map_err(|(e, _)| e)
            .expect("delivered");
        offsets.push(delivered.offset);
    }
    offsets
}

/// A Confluent-framed Avro value of `schema` (registered as `id`).
pub fn framed(id: u32, schema: &str, value: apache_avro::types::Value) -> Vec<u8> {
    let schema = apache_avro::Schema::parse_str(schema).expect("schema");
    strata::schema::wire::frame(
        id,
        &strata::demo::avro_body(&schema, value).expect("encodes"),
    )
}

/// The accounting identity a quiet replica must show, per its `/metrics`: every record read is
/// written, dead-lettered, skipped as already held, let go to be read again, or still buffered.
pub async fn assert_accounting(replica: &Replica) {
    let value = |name: &'static str| async move { replica.metric(name).await.unwrap_or(0.0) };
    let consumed = value("strata_records_consumed_total").await;
    let accounted = value("strata_records_written_total").await
        + value("strata_records_dead_lettered_total").await
        + value("strata_records_skipped_duplicate_total").await
        + value("strata_records_dropped_total").await
        + value("strata_records_buffered").await;
    assert!(consumed > 0.0, "nothing consumed");
    assert_eq!(
        consumed, accounted,
        "consumed = written + dead-lettered + skipped + dropped + buffered"
    );
}

/// What Python's `deltalake` package (its own engine, as a user would read the table) sees:
/// (rows, distinct (partition, offset) pairs, active files).
pub fn read_with_python(url: &url::Url) -> (u64, u64, u64) {
    let python = std::env::var("STRATA_TEST_DELTA_PYTHON")
        .expect("STRATA_TEST_DELTA_PYTHON is not set: run with `make test`");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/read-table.py");
    let output = Command::new(python)
        .arg(script)
        .arg(url.as_str())
        .output()
        .expect("python");
    assert!(
        output.status.success(),
        "deltalake (Python) could not read {url}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let seen: serde_json::Value = serde_json::from_slice(&output.stdout).expect("json");
    let number = |key: &str| seen[key].as_u64().unwrap_or(u64::MAX);
    (number("rows"), number("distinct_offsets"), number("files"))
}

/// Standard base64 with padding (HTTP basic auth).
pub fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The `strata` binary the suites start: this build's, or `STRATA_TEST_BINARY` (to measure the
/// release build with a test, say).
pub fn strata_binary() -> String {
    std::env::var("STRATA_TEST_BINARY").unwrap_or_else(|_| env!("CARGO_BIN_EXE_strata").to_string())
}

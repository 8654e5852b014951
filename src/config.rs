//! The one typed configuration of a replica, read from environment variables only.
//!
//! Every setting is declared once in [`SETTINGS`] with its default and a line of help, so `strata --help`
//! and the parser can never disagree. A bad value fails start-up with an error naming the variable.
//! This module must never print a secret: values of variables that look like credentials are redacted.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::Duration;

/// A setting: its variable, default (empty means "required" or "unset") and help line.
pub struct Setting {
    pub var: &'static str,
    pub default: &'static str,
    pub help: &'static str,
}

pub const SETTINGS: &[Setting] = &[
    Setting { var: "STRATA_KAFKA_BROKERS", default: "localhost:9092", help: "Bootstrap servers of the Kafka cluster (host:port,...)." },
    Setting { var: "STRATA_GROUP_ID", default: "strata", help: "Consumer group shared by all replicas of one pipeline." },
    Setting { var: "STRATA_TOPICS", default: "", help: "Comma-separated Bronze topics to consume (required)." },
    Setting { var: "STRATA_KAFKA_<PROPERTY>", default: "", help: "Any librdkafka property, e.g. STRATA_KAFKA_SECURITY_PROTOCOL=SSL sets security.protocol." },
    Setting { var: "STRATA_SCHEMA_REGISTRY_URL", default: "", help: "http(s)://host:port of a Confluent Schema Registry, or file://DIR holding <id>.avsc files (required)." },
    Setting { var: "STRATA_SCHEMA_REGISTRY_USER_INFO", default: "", help: "user:password for registry basic auth (secret, never logged)." },
    Setting { var: "STRATA_READER_SCHEMA", default: "", help: "Reader schema(s): an .avsc file, a comma-separated list of files, a folder of .avsc files, or `latest` (the newest version of each subject in the registry, followed as it evolves). One Silver table per record name, named in snake_case (required)." },
    Setting { var: "STRATA_SUBJECT_NAME_STRATEGY", default: "topic", help: "How subjects are named, as Confluent's serializers do: topic (<topic>-value), topic_record (<topic>-<record full name>) or record (<record full name>). Used by `latest` and `strata schemas check`." },
    Setting { var: "STRATA_SCHEMA_COMPATIBILITY", default: "BACKWARD", help: "Check of each writer schema against the reader schema (and, transitive, earlier writers), with Confluent's meaning: BACKWARD, BACKWARD_TRANSITIVE, FORWARD, FORWARD_TRANSITIVE, FULL, FULL_TRANSITIVE or NONE." },
    Setting { var: "STRATA_EVENT_TIME_FIELD", default: "", help: "Reader-schema field holding event time (timestamp-millis or timestamp-micros) (required)." },
    Setting { var: "STRATA_LAKE_URL", default: "", help: "file:///path or s3://bucket/prefix; Silver tables live at <lake>/silver/<table> (required). S3 uses the AWS_* variables." },
    Setting { var: "STRATA_DLQ_TOPIC", default: "{topic}.dlq", help: "Name of a Bronze topic's dead-letter topic; {topic} stands for the Bronze topic (one shared topic when left out). Strata creates it at start-up when missing (the principal needs CREATE)." },
    Setting { var: "STRATA_DLQ_SUFFIX", default: "", help: "Older form of STRATA_DLQ_TOPIC: the Bronze topic followed by this suffix. Used only when STRATA_DLQ_TOPIC is unset." },
    Setting { var: "STRATA_DLQ_PARTITIONS", default: "source", help: "Partitions of a dead-letter topic Strata creates: `source` (as many as its Bronze topic, so a whole writer version refused can flow there as fast as it arrives) or a number." },
    Setting { var: "STRATA_DLQ_REPLICATION", default: "cluster", help: "Replication factor of a dead-letter topic Strata creates: `cluster` (the broker's default.replication.factor) or a number." },
    Setting { var: "STRATA_FLUSH_INTERVAL", default: "30s", help: "Longest time a record waits in memory before its file is committed (ms, s, m, h)." },
    Setting { var: "STRATA_FILE_MAX_ROWS", default: "1000000", help: "A flush starts, and a file rolls, at this many buffered rows." },
    Setting { var: "STRATA_FILE_MAX_BYTES", default: "134217728", help: "A flush starts, and a file rolls, at this many buffered bytes (the memory budget of the Silver buffer)." },
    Setting { var: "STRATA_PARQUET_COMPRESSION", default: "zstd", help: "Parquet compression: zstd, snappy or none." },
    Setting { var: "STRATA_METRICS_ADDR", default: "0.0.0.0:9898", help: "Address of the /metrics, /healthz and /readyz endpoint." },
    Setting { var: "STRATA_MAX_VALUE_BYTES", default: "8388608", help: "Record values longer than this are dead-lettered as value_too_large before decoding (bounds the memory one record can claim)." },
    Setting { var: "STRATA_COMMIT_RETRIES", default: "50", help: "How often a Delta commit that lost a race is retried before the replica gives up." },
    Setting { var: "STRATA_SHUTDOWN_GRACE", default: "30s", help: "After SIGTERM, how long the replica may take to flush and commit before it aborts." },
    Setting { var: "STRATA_GOLD_KEY", default: "", help: "Gold: comma-separated grouping field(s) of the Gold source table (string or integer). Unset: no Gold." },
    Setting { var: "STRATA_GOLD_WINDOW", default: "1m", help: "Gold: event-time window, tumbling (`1m`) or hopping (`5m every 1m`; the slide divides the size)." },
    Setting { var: "STRATA_GOLD_AGGREGATES", default: "count", help: "Gold: comma-separated aggregates: count, sum(f), min(f), max(f), avg(f), approx_distinct(f) (HyperLogLog, about 1.6 % standard error)." },
    Setting { var: "STRATA_GOLD_TABLE", default: "", help: "Gold: the Silver table it reads (a table name); default: the only table, or the first reader schema's." },
    Setting { var: "STRATA_GOLD_NAME", default: "", help: "Gold: table name, at <lake>/gold/<name>, late events at <lake>/gold/<name>_late; default <table>_by_<keys>." },
    Setting { var: "STRATA_GOLD_PARTIALS_TOPIC", default: "", help: "Gold: topic of the partial aggregates between the stages; default <group>.partials (created when missing)." },
    Setting { var: "STRATA_GOLD_PARTITIONS", default: "8", help: "Gold: partitions of the partials topic when Strata creates it (the existing count is used otherwise)." },
    Setting { var: "STRATA_WATERMARK_DELAY", default: "10s", help: "Gold: bounded out-of-orderness: a source partition's watermark is its newest event time minus this." },
    Setting { var: "STRATA_ALLOWED_LATENESS", default: "0s", help: "Gold: a window is final when the watermark passes its end plus this; later events go to the late-events table." },
    Setting { var: "STRATA_IDLE_TIMEOUT", default: "30s", help: "Gold: a caught-up source partition without records for this long moves its watermark with the clock (now minus the delay), so it does not hold windows open." },
    Setting { var: "STRATA_HOT_KEY_SHARE", default: "0.1", help: "Gold: a key holding at least this share of an epoch's events (0 < share ≤ 1) is hot and salted." },
    Setting { var: "STRATA_HOT_KEY_MIN_EVENTS", default: "100", help: "Gold: … and at least this many events of the epoch." },
    Setting { var: "STRATA_HOT_KEY_SALTS", default: "4", help: "Gold: sub-keys a hot key is spread over (0 or 1: salting off); below the partials topic's partition count." },
    Setting { var: "STRATA_LOG", default: "info", help: "Log filter (tracing EnvFilter syntax); RUST_LOG is used when unset." },
    Setting { var: "STRATA_LOG_FORMAT", default: "json", help: "Log format: json or text." },
];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{var} is required: {help}")]
    Missing {
        var: &'static str,
        help: &'static str,
    },
    #[error("{var}={value:?} is invalid: {reason}")]
    Invalid {
        var: String,
        value: String,
        reason: String,
    },
}

fn invalid(var: &str, value: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        var: var.to_string(),
        value: redact(var, value),
        reason: reason.into(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Zstd,
    Snappy,
    None,
}

/// Where reader schemas come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReaderSchemas {
    /// Fixed `.avsc` files, one table per record name.
    Files(Vec<PathBuf>),
    /// The newest version of each subject in the registry, followed as it evolves.
    Latest,
}

/// Confluent's subject name strategies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubjectStrategy {
    /// `<topic>-value`: one record type per topic.
    Topic,
    /// `<topic>-<record full name>`: several record types per topic.
    TopicRecord,
    /// `<record full name>`: a record type shared by topics.
    Record,
}

impl SubjectStrategy {
    /// The subject of a topic's values of record `record` (a full name).
    pub fn subject(self, topic: &str, record: &str) -> String {
        match self {
            SubjectStrategy::Topic => format!("{topic}-value"),
            SubjectStrategy::TopicRecord => format!("{topic}-{record}"),
            SubjectStrategy::Record => record.to_string(),
        }
    }
}

/// `.avsc` files named by `STRATA_READER_SCHEMA`-style text: files, comma lists and folders.
pub fn schema_files(text: &str) -> Result<Vec<PathBuf>, String> {
    let mut files = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let path = PathBuf::from(part);
        if path.is_dir() {
            let entries = std::fs::read_dir(&path).map_err(|e| format!("{part}: {e}"))?;
            let mut found: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "avsc"))
                .collect();
            if found.is_empty() {
                return Err(format!("{part}: no .avsc files in this folder"));
            }
            found.sort();
            files.extend(found);
        } else {
            files.push(path);
        }
    }
    if files.is_empty() {
        return Err("no schema file given".to_string());
    }
    Ok(files)
}

/// Where writer schemas come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistrySource {
    /// A Confluent-compatible Schema Registry (base URL without trailing slash).
    Confluent {
        url: String,
        user_info: Option<String>,
    },
    /// A folder of `<id>.avsc` files: the demo and air-gapped deployments.
    Directory(PathBuf),
}

#[derive(Clone)]
pub struct Config {
    pub brokers: String,
    pub group_id: String,
    pub topics: Vec<String>,
    /// librdkafka properties passed through from `STRATA_KAFKA_<PROPERTY>`.
    pub kafka_properties: BTreeMap<String, String>,
    pub registry: RegistrySource,
    pub reader_schemas: ReaderSchemas,
    pub subject_strategy: SubjectStrategy,
    pub compatibility: crate::compat::Compatibility,
    pub event_time_field: String,
    pub lake_url: String,
    pub dead_letters: DeadLetterConfig,
    pub flush_interval: Duration,
    pub file_max_rows: usize,
    pub file_max_bytes: usize,
    pub compression: Compression,
    pub metrics_addr: std::net::SocketAddr,
    pub commit_retries: usize,
    pub max_value_bytes: usize,
    pub shutdown_grace: Duration,
    pub gold: Option<GoldConfig>,
}

/// Where rejected records go, and how Strata creates those topics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterConfig {
    /// The topic name, `{topic}` standing for the Bronze topic.
    pub template: String,
    /// `None`: as many partitions as the Bronze topic.
    pub partitions: Option<i32>,
    /// `None`: the cluster's default replication factor.
    pub replication: Option<i32>,
}

impl DeadLetterConfig {
    pub fn topic_for(&self, source_topic: &str) -> String {
        self.template.replace("{topic}", source_topic)
    }

    fn from_vars(
        get: &dyn Fn(&'static str) -> String,
        vars: &HashMap<String, String>,
    ) -> Result<Self, ConfigError> {
        let set = |var: &str| vars.get(var).is_some_and(|v| !v.trim().is_empty());
        let (var, template) = if !set("STRATA_DLQ_TOPIC") && set("STRATA_DLQ_SUFFIX") {
            (
                "STRATA_DLQ_SUFFIX",
                format!("{{topic}}{}", get("STRATA_DLQ_SUFFIX")),
            )
        } else {
            ("STRATA_DLQ_TOPIC", get("STRATA_DLQ_TOPIC"))
        };
        // Kafka's rule for topic names, checked here so a typo fails at start-up, not at the
        // first bad record.
        let fixed = template.replace("{topic}", "");
        if let Some(c) = fixed
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(invalid(
                var,
                &template,
                format!("{c:?} cannot be part of a Kafka topic name (letters, digits, '.', '_' and '-' only)"),
            ));
        }
        if fixed.is_empty() {
            return Err(invalid(
                var,
                &template,
                "dead letters need a topic of their own, not the Bronze topic (e.g. {topic}.dlq)",
            ));
        }
        let count = |var: &'static str, auto: &str| -> Result<Option<i32>, ConfigError> {
            let value = get(var);
            if value.eq_ignore_ascii_case(auto) {
                return Ok(None);
            }
            match value.parse::<i32>() {
                Ok(n) if n > 0 => Ok(Some(n)),
                _ => Err(invalid(
                    var,
                    &value,
                    format!("expected `{auto}` or a positive integer"),
                )),
            }
        };
        Ok(Self {
            template,
            partitions: count("STRATA_DLQ_PARTITIONS", "source")?,
            replication: count("STRATA_DLQ_REPLICATION", "cluster")?,
        })
    }
}

/// Gold settings (present when `STRATA_GOLD_KEY` is set).
#[derive(Debug, Clone)]
pub struct GoldConfig {
    pub keys: Vec<String>,
    pub window: crate::gold::window::WindowSpec,
    pub aggregates: Vec<crate::gold::aggregate::Aggregate>,
    /// The Silver table it reads (`None`: the first).
    pub table: Option<String>,
    pub name: Option<String>,
    pub partials_topic: String,
    pub partitions: i32,
    pub watermark_delay: Duration,
    pub allowed_lateness: Duration,
    pub idle_timeout: Duration,
    pub salting: Option<crate::gold::epoch::Salting>,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let props: BTreeMap<_, _> = self
            .kafka_properties
            .iter()
            .map(|(k, v)| (k.clone(), redact(k, v)))
            .collect();
        let registry = match &self.registry {
            RegistrySource::Confluent { url, user_info } => format!(
                "Confluent({url}, auth: {})",
                if user_info.is_some() {
                    "<redacted>"
                } else {
                    "none"
                }
            ),
            RegistrySource::Directory(dir) => format!("Directory({})", dir.display()),
        };
        f.debug_struct("Config")
            .field("brokers", &self.brokers)
            .field("group_id", &self.group_id)
            .field("topics", &self.topics)
            .field("kafka_properties", &props)
            .field("registry", &registry)
            .field("reader_schemas", &self.reader_schemas)
            .field("subject_strategy", &self.subject_strategy)
            .field("event_time_field", &self.event_time_field)
            .field("lake_url", &self.lake_url)
            .field("flush_interval", &self.flush_interval)
            .field("file_max_rows", &self.file_max_rows)
            .field("file_max_bytes", &self.file_max_bytes)
            .field("compression", &self.compression)
            .field("metrics_addr", &self.metrics_addr)
            .finish_non_exhaustive()
    }
}

/// Hides values of settings whose name suggests a credential.
pub fn redact(name: &str, value: &str) -> String {
    let lower = name.to_ascii_lowercase();
    let secret = [
        "password",
        "secret",
        "user_info",
        "user.info",
        "token",
        "key",
        "credential",
        "jaas",
    ]
    .iter()
    .any(|word| lower.contains(word));
    if secret {
        "<redacted>".to_string()
    } else {
        value.to_string()
    }
}

/// Parses `250ms`, `30s`, `5m`, `2h` (a bare number means seconds).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("expected a duration like 30s, got {text:?}"))?;
    let millis = match unit.trim() {
        "ms" => Some(number),
        "" | "s" => number.checked_mul(1_000),
        "m" => number.checked_mul(60_000),
        "h" => number.checked_mul(3_600_000),
        other => {
            return Err(format!(
                "unknown duration unit {other:?} (use ms, s, m or h)"
            ))
        }
    };
    millis
        .map(Duration::from_millis)
        .ok_or_else(|| format!("duration {text:?} is too large"))
}

/// The help text that `strata --help` prints.
pub fn help_text() -> String {
    let mut out = String::from(
        "strata: Bronze Kafka topics (Confluent Avro) into exactly-once Delta Lake tables\n\n\
         USAGE:\n  strata [run]    start a replica (configured by the environment variables below)\n  \
         strata demo     run the whole pipeline on an embedded Kafka and a local lake, then verify it\n  \
         strata schemas check [FILE|DIR ...]\n                  compare .avsc files (default: schemas/) with the registry's subjects under\n                  STRATA_SCHEMA_COMPATIBILITY; exit 1 on an incompatible change, 2 if it cannot check\n  \
         strata --help   this text\n\nENVIRONMENT:\n",
    );
    for s in SETTINGS {
        let default = if s.default.is_empty() {
            String::new()
        } else {
            format!(" [default: {}]", s.default)
        };
        out.push_str(&format!("  {}{}\n      {}\n", s.var, default, s.help));
    }
    out
}

fn default_of(var: &str) -> &'static str {
    SETTINGS
        .iter()
        .find(|s| s.var == var)
        .map(|s| s.default)
        .unwrap_or("")
}

fn help_of(var: &'static str) -> &'static str {
    SETTINGS
        .iter()
        .find(|s| s.var == var)
        .map(|s| s.help)
        .unwrap_or("")
}

/// Variables that look like `STRATA_KAFKA_*` but are Strata's own settings, not librdkafka properties.
const OWN_KAFKA_VARS: &[&str] = &["STRATA_KAFKA_BROKERS"];

impl Config {
    /// Reads the configuration from the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_vars(std::env::vars().collect())
    }

    /// Reads the configuration from a map of variables (the environment, or a test's own map).
    pub fn from_vars(vars: HashMap<String, String>) -> Result<Self, ConfigError> {
        let get = |var: &'static str| -> String {
            vars.get(var)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| default_of(var).to_string())
        };
        let required = |var: &'static str| -> Result<String, ConfigError> {
            let value = get(var);
            if value.is_empty() {
                Err(ConfigError::Missing {
                    var,
                    help: help_of(var),
                })
            } else {
                Ok(value)
            }
        };
        let parse_usize = |var: &'static str| -> Result<usize, ConfigError> {
            let value = get(var);
            match value.parse::<usize>() {
                Ok(n) if n > 0 => Ok(n),
                _ => Err(invalid(var, &value, "expected a positive integer")),
            }
        };
        let duration = |var: &'static str| -> Result<Duration, ConfigError> {
            let value = get(var);
            match parse_duration(&value) {
                Ok(d) if !d.is_zero() => Ok(d),
                Ok(_) => Err(invalid(var, &value, "must be greater than zero")),
                Err(reason) => Err(invalid(var, &value, reason)),
            }
        };

        let topics: Vec<String> = required("STRATA_TOPICS")?
            .split(',')
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .collect();
        if topics.is_empty() {
            return Err(invalid(
                "STRATA_TOPICS",
                &get("STRATA_TOPICS"),
                "no topic named",
            ));
        }
        if let Some(bad) = topics.iter().find(|t| {
            !t.chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        }) {
            return Err(invalid(
                "STRATA_TOPICS",
                &get("STRATA_TOPICS"),
                format!("{bad:?} is not a legal topic name"),
            ));
        }

        let mut kafka_properties = BTreeMap::new();
        for (key, value) in &vars {
            if let Some(rest) = key.strip_prefix("STRATA_KAFKA_") {
                if OWN_KAFKA_VARS.contains(&key.as_str()) || rest.is_empty() {
                    continue;
                }
                kafka_properties.insert(rest.to_ascii_lowercase().replace('_', "."), value.clone());
            }
        }

        let registry_url = required("STRATA_SCHEMA_REGISTRY_URL")?;
        let registry = if let Some(dir) = registry_url.strip_prefix("file://") {
            RegistrySource::Directory(PathBuf::from(dir))
        } else if registry_url.starts_with("http://") || registry_url.starts_with("https://") {
            let user_info = Some(get("STRATA_SCHEMA_REGISTRY_USER_INFO")).filter(|u| !u.is_empty());
            RegistrySource::Confluent {
                url: registry_url.trim_end_matches('/').to_string(),
                user_info,
            }
        } else {
            return Err(invalid(
                "STRATA_SCHEMA_REGISTRY_URL",
                &registry_url,
                "expected http://, https:// or file://",
            ));
        };

        let lake_url = required("STRATA_LAKE_URL")?;
        if !(lake_url.starts_with("file:///") || lake_url.starts_with("s3://")) {
            return Err(invalid(
                "STRATA_LAKE_URL",
                &lake_url,
                "expected file:///path or s3://bucket/prefix",
            ));
        }
        if url::Url::parse(&lake_url).is_err() {
            return Err(invalid("STRATA_LAKE_URL", &lake_url, "not a valid URL"));
        }

        let reader_text = required("STRATA_READER_SCHEMA")?;
        let reader_schemas = if reader_text.trim().eq_ignore_ascii_case("latest") {
            if matches!(registry, RegistrySource::Directory(_)) {
                return Err(invalid(
                    "STRATA_READER_SCHEMA",
                    &reader_text,
                    "`latest` reads subjects, which needs STRATA_SCHEMA_REGISTRY_URL=http(s)://…",
                ));
            }
            ReaderSchemas::Latest
        } else {
            ReaderSchemas::Files(
                schema_files(&reader_text)
                    .map_err(|reason| invalid("STRATA_READER_SCHEMA", &reader_text, reason))?,
            )
        };
        let strategy_text = get("STRATA_SUBJECT_NAME_STRATEGY");
        let subject_strategy = match strategy_text
            .to_ascii_lowercase()
            .replace('-', "_")
            .as_str()
        {
            "topic" | "topic_name" | "topicnamestrategy" => SubjectStrategy::Topic,
            "topic_record" | "topic_record_name" | "topicrecordnamestrategy" => {
                SubjectStrategy::TopicRecord
            }
            "record" | "record_name" | "recordnamestrategy" => SubjectStrategy::Record,
            _ => {
                return Err(invalid(
                    "STRATA_SUBJECT_NAME_STRATEGY",
                    &strategy_text,
                    "expected topic, topic_record or record",
                ))
            }
        };

        let compatibility_text = get("STRATA_SCHEMA_COMPATIBILITY");
        let compatibility = compatibility_text.parse().map_err(|reason: String| {
            invalid("STRATA_SCHEMA_COMPATIBILITY", &compatibility_text, reason)
        })?;
        let compression = match get("STRATA_PARQUET_COMPRESSION")
            .to_ascii_lowercase()
            .as_str()
        {
            "zstd" => Compression::Zstd,
            "snappy" => Compression::Snappy,
            "none" | "uncompressed" => Compression::None,
            other => {
                return Err(invalid(
                    "STRATA_PARQUET_COMPRESSION",
                    other,
                    "expected zstd, snappy or none",
                ))
            }
        };
        let metrics_addr_text = get("STRATA_METRICS_ADDR");
        let metrics_addr = metrics_addr_text.parse().map_err(|_| {
            invalid(
                "STRATA_METRICS_ADDR",
                &metrics_addr_text,
                "expected host:port, e.g. 0.0.0.0:9898",
            )
        })?;

        let gold = Self::gold(&get)?;
        Ok(Config {
            gold,
            brokers: required("STRATA_KAFKA_BROKERS")?,
            group_id: required("STRATA_GROUP_ID")?,
            topics,
            kafka_properties,
            registry,
            reader_schemas,
            subject_strategy,
            compatibility,
            event_time_field: required("STRATA_EVENT_TIME_FIELD")?,
            lake_url: lake_url.trim_end_matches('/').to_string(),
            dead_letters: DeadLetterConfig::from_vars(&get, &vars)?,
            flush_interval: duration("STRATA_FLUSH_INTERVAL")?,
            file_max_rows: parse_usize("STRATA_FILE_MAX_ROWS")?,
            file_max_bytes: parse_usize("STRATA_FILE_MAX_BYTES")?,
            compression,
            metrics_addr,
            commit_retries: parse_usize("STRATA_COMMIT_RETRIES")?,
            max_value_bytes: parse_usize("STRATA_MAX_VALUE_BYTES")?,
            shutdown_grace: duration("STRATA_SHUTDOWN_GRACE")?,
        })
    }

    fn gold(get: &dyn Fn(&'static str) -> String) -> Result<Option<GoldConfig>, ConfigError> {
        let key_text = get("STRATA_GOLD_KEY");
        if key_text.is_empty() {
            return Ok(None);
        }
        let keys: Vec<String> = key_text
            .split(',')
            .map(|k| k.trim().to_string())
            .filter(|k| !k.is_empty())
            .collect();
        if keys.is_empty() {
            return Err(invalid("STRATA_GOLD_KEY", &key_text, "no field named"));
        }
        let text = |var: &'static str| (var, get(var));
        let (var, value) = text("STRATA_GOLD_WINDOW");
        let window = value.parse().map_err(|e: String| invalid(var, &value, e))?;
        let (var, value) = text("STRATA_GOLD_AGGREGATES");
        let aggregates = crate::gold::aggregate::parse_aggregates(&value)
            .map_err(|e| invalid(var, &value, e))?;
        let span = |var: &'static str, zero_ok: bool| -> Result<Duration, ConfigError> {
            let value = get(var);
            match parse_duration(&value) {
                Ok(d) if zero_ok || !d.is_zero() => Ok(d),
                Ok(_) => Err(invalid(var, &value, "must be greater than zero")),
                Err(reason) => Err(invalid(var, &value, reason)),
            }
        };
        let number = |var: &'static str| -> Result<u64, ConfigError> {
            let value = get(var);
            value
                .parse::<u64>()
                .map_err(|_| invalid(var, &value, "expected a whole number"))
        };
        let (var, value) = text("STRATA_HOT_KEY_SHARE");
        let share: f64 = match value.parse::<f64>() {
            Ok(s) if s > 0.0 && s <= 1.0 => s,
            _ => {
                return Err(invalid(
                    var,
                    &value,
                    "expected a share above 0 and at most 1",
                ))
            }
        };
        let salts = number("STRATA_HOT_KEY_SALTS")?;
        let partitions = number("STRATA_GOLD_PARTITIONS")?;
        if !(1..=1024).contains(&partitions) {
            return Err(invalid(
                "STRATA_GOLD_PARTITIONS",
                &partitions.to_string(),
                "expected 1 to 1024",
            ));
        }
        if salts > 1 && salts >= partitions {
            return Err(invalid(
                "STRATA_HOT_KEY_SALTS",
                &salts.to_string(),
                format!("must be below STRATA_GOLD_PARTITIONS ({partitions}): each sub-key needs a partition other than the key's own"),
            ));
        }
        let salting = (salts > 1).then(|| crate::gold::epoch::Salting {
            share,
            min_events: 0,
            salts: salts.min(u64::from(u16::MAX)) as u16,
        });
        let salting = match salting {
            Some(mut s) => {
                s.min_events = number("STRATA_HOT_KEY_MIN_EVENTS")?;
                Some(s)
            }
            None => None,
        };
        let optional = |var: &'static str| Some(get(var)).filter(|v| !v.is_empty());
        let partials_topic = optional("STRATA_GOLD_PARTIALS_TOPIC")
            .unwrap_or_else(|| format!("{}.partials", get("STRATA_GROUP_ID")));
        Ok(Some(GoldConfig {
            keys,
            window,
            aggregates,
            table: optional("STRATA_GOLD_TABLE"),
            name: optional("STRATA_GOLD_NAME"),
            partials_topic,
            partitions: partitions as i32,
            watermark_delay: span("STRATA_WATERMARK_DELAY", true)?,
            allowed_lateness: span("STRATA_ALLOWED_LATENESS", true)?,
            idle_timeout: span("STRATA_IDLE_TIMEOUT", false)?,
            salting,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> HashMap<String, String> {
        [
            ("STRATA_TOPICS", "orders"),
            ("STRATA_SCHEMA_REGISTRY_URL", "http://registry:8081/"),
            ("STRATA_READER_SCHEMA", "schemas/order.avsc"),
            ("STRATA_EVENT_TIME_FIELD", "event_time"),
            ("STRATA_LAKE_URL", "s3://lake/prefix/"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    #[test]
    fn defaults_and_pass_through() {
        let mut vars = base();
        vars.insert("STRATA_KAFKA_SECURITY_PROTOCOL".into(), "SASL_SSL".into());
        vars.insert("STRATA_KAFKA_SASL_PASSWORD".into(), "hunter2".into());
        let config = Config::from_vars(vars).expect("valid config");
        assert_eq!(config.topics, vec!["orders"]);
        assert_eq!(config.flush_interval, Duration::from_secs(30));
        assert_eq!(config.compression, Compression::Zstd);
        assert_eq!(config.lake_url, "s3://lake/prefix");
        assert_eq!(
            config
                .kafka_properties
                .get("security.protocol")
                .map(String::as_str),
            Some("SASL_SSL")
        );
        assert!(!config.kafka_properties.contains_key("brokers"));
        let shown = format!("{config:?}");
        assert!(!shown.contains("hunter2"), "secret leaked: {shown}");
        assert!(
            matches!(config.registry, RegistrySource::Confluent { ref url, .. } if url == "http://registry:8081")
        );
    }

    #[test]
    fn bad_values_name_the_variable() {
        for (var, value) in [
            ("STRATA_FLUSH_INTERVAL", "soon"),
            ("STRATA_FILE_MAX_ROWS", "0"),
            ("STRATA_PARQUET_COMPRESSION", "lz5"),
            ("STRATA_LAKE_URL", "/tmp/lake"),
            ("STRATA_SCHEMA_REGISTRY_URL", "registry:8081"),
            ("STRATA_METRICS_ADDR", "nine"),
            ("STRATA_SCHEMA_COMPATIBILITY", "SIDEWAYS"),
            ("STRATA_TOPICS", "a b"),
            ("STRATA_DLQ_TOPIC", "{topic} dead"),
            ("STRATA_DLQ_TOPIC", "{topic}"),
            ("STRATA_DLQ_PARTITIONS", "0"),
            ("STRATA_DLQ_REPLICATION", "two"),
        ] {
            let mut vars = base();
            vars.insert(var.into(), value.into());
            let err = Config::from_vars(vars).expect_err(var).to_string();
            assert!(err.contains(var), "{err} does not name {var}");
        }
        let mut vars = base();
        vars.remove("STRATA_TOPICS");
        assert!(Config::from_vars(vars)
            .expect_err("missing")
            .to_string()
            .contains("STRATA_TOPICS"));
    }

    #[test]
    fn dead_letter_topics() {
        let config = Config::from_vars(base()).expect("valid config");
        assert_eq!(config.dead_letters.topic_for("orders"), "orders.dlq");
        assert_eq!(config.dead_letters.partitions, None, "as the Bronze topic");
        assert_eq!(
            config.dead_letters.replication, None,
            "the cluster's default"
        );

        let mut vars = base();
        vars.insert("STRATA_DLQ_TOPIC".into(), "dlq.strata.{topic}".into());
        vars.insert("STRATA_DLQ_PARTITIONS".into(), "3".into());
        vars.insert("STRATA_DLQ_REPLICATION".into(), "3".into());
        let config = Config::from_vars(vars).expect("valid config");
        assert_eq!(config.dead_letters.topic_for("orders"), "dlq.strata.orders");
        assert_eq!(config.dead_letters.partitions, Some(3));
        assert_eq!(config.dead_letters.replication, Some(3));

        // The older suffix form still works when the template is not set.
        let mut vars = base();
        vars.insert("STRATA_DLQ_SUFFIX".into(), "-errors".into());
        let config = Config::from_vars(vars).expect("valid config");
        assert_eq!(config.dead_letters.topic_for("orders"), "orders-errors");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("5d").is_err());
        assert!(parse_duration("99999999999999999999h").is_err());
    }

    #[test]
    fn reader_schemas_files_folders_and_latest() {
        let mut vars = base();
        vars.insert("STRATA_READER_SCHEMA".into(), "latest".into());
        let config = Config::from_vars(vars.clone()).expect("latest with a registry");
        assert_eq!(config.reader_schemas, ReaderSchemas::Latest);
        assert_eq!(config.subject_strategy, SubjectStrategy::Topic);

        vars.insert(
            "STRATA_SCHEMA_REGISTRY_URL".into(),
            "file:///schemas".into(),
        );
        let error = Config::from_vars(vars.clone()).expect_err("latest needs subjects");
        assert!(
            error.to_string().contains("STRATA_READER_SCHEMA"),
            "{error}"
        );

        let dir = tempfile::tempdir().expect("dir");
        std::fs::write(dir.path().join("b.avsc"), "{}").expect("write");
        std::fs::write(dir.path().join("a.avsc"), "{}").expect("write");
        std::fs::write(dir.path().join("notes.txt"), "").expect("write");
        let files = schema_files(&format!("{}, x.avsc", dir.path().display())).expect("files");
        assert_eq!(
            files,
            vec![
                dir.path().join("a.avsc"),
                dir.path().join("b.avsc"),
                "x.avsc".into()
            ]
        );
        let empty = tempfile::tempdir().expect("dir");
        assert!(schema_files(&empty.path().display().to_string()).is_err());

        let mut vars = base();
        vars.insert(
            "STRATA_SUBJECT_NAME_STRATEGY".into(),
            "TopicRecordNameStrategy".into(),
        );
        let config = Config::from_vars(vars.clone()).expect("strategy");
        assert_eq!(config.subject_strategy, SubjectStrategy::TopicRecord);
        assert_eq!(
            config.subject_strategy.subject("orders", "shop.Order"),
            "orders-shop.Order"
        );
        assert_eq!(
            SubjectStrategy::Topic.subject("orders", "shop.Order"),
            "orders-value"
        );
        assert_eq!(
            SubjectStrategy::Record.subject("orders", "shop.Order"),
            "shop.Order"
        );
        vars.insert("STRATA_SUBJECT_NAME_STRATEGY".into(), "by_color".into());
        let error = Config::from_vars(vars).expect_err("unknown strategy");
        assert!(
            error.to_string().contains("STRATA_SUBJECT_NAME_STRATEGY"),
            "{error}"
        );
    }

    #[test]
    fn gold_settings_parse_and_bad_ones_name_the_variable() {
        let mut vars = base();
        assert!(Config::from_vars(vars.clone())
            .expect("valid")
            .gold
            .is_none());
        vars.insert("STRATA_GOLD_KEY".into(), "customer_id".into());
        vars.insert("STRATA_GOLD_WINDOW".into(), "5m every 1m".into());
        vars.insert(
            "STRATA_GOLD_AGGREGATES".into(),
            "count, sum(amount), approx_distinct(user_id)".into(),
        );
        let gold = Config::from_vars(vars.clone())
            .expect("valid")
            .gold
            .expect("gold on");
        assert_eq!(
            (gold.window.size, gold.window.slide),
            (300_000_000, 60_000_000)
        );
        assert_eq!(gold.aggregates.len(), 3);
        assert_eq!(gold.partials_topic, "strata.partials");
        assert_eq!(gold.salting.map(|s| s.salts), Some(4));
        for (var, value, needle) in [
            ("STRATA_GOLD_WINDOW", "5m every 2m", "STRATA_GOLD_WINDOW"),
            (
                "STRATA_GOLD_AGGREGATES",
                "median(amount)",
                "STRATA_GOLD_AGGREGATES",
            ),
            ("STRATA_WATERMARK_DELAY", "soon", "STRATA_WATERMARK_DELAY"),
            ("STRATA_IDLE_TIMEOUT", "0s", "STRATA_IDLE_TIMEOUT"),
            ("STRATA_HOT_KEY_SHARE", "1.5", "STRATA_HOT_KEY_SHARE"),
            ("STRATA_HOT_KEY_SALTS", "8", "STRATA_HOT_KEY_SALTS"),
            ("STRATA_GOLD_PARTITIONS", "0", "STRATA_GOLD_PARTITIONS"),
        ] {
            let mut bad = vars.clone();
            bad.insert(var.into(), value.into());
            let error = Config::from_vars(bad).expect_err(var).to_string();
            assert!(error.contains(needle), "{var}={value}: {error}");
        }
        vars.insert("STRATA_HOT_KEY_SALTS".into(), "0".into());
        assert!(Config::from_vars(vars)
            .expect("valid")
            .gold
            .expect("gold")
            .salting
            .is_none());
    }

    #[test]
    fn help_lists_every_variable() {
        let help = help_text();
        for s in SETTINGS {
            assert!(help.contains(s.var));
        }
    }
}

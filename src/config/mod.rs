//! The one typed configuration of a replica, read from environment variables only.
//!
//! Every setting is declared once in [`SETTINGS`] with its default and a line of help, so `strata --help`
//! and the parser can never disagree. A bad value fails start-up with an error naming the variable.
//! This module must never print a secret: values of variables that look like credentials are redacted.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::Duration;

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

fn invalid(var: &str, value: &str, reason: impl std::fmt::Display) -> ConfigError {
    ConfigError::Invalid {
        var: var.to_string(),
        value: redact(var, value),
        reason: reason.to_string(),
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

/// Why schema files could not be listed.
#[derive(Debug, thiserror::Error)]
pub enum SchemaFilesError {
    #[error("{path}: {source}")]
    Folder {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}: no .avsc files in this folder")]
    EmptyFolder(String),
    #[error("no schema file given")]
    None,
}

/// `.avsc` files named by `STRATA_READER_SCHEMA`-style text: files, comma lists and folders.
pub fn schema_files(text: &str) -> Result<Vec<PathBuf>, SchemaFilesError> {
    let mut files = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let path = PathBuf::from(part);
        if path.is_dir() {
            let entries = std::fs::read_dir(&path).map_err(|source| SchemaFilesError::Folder {
                path: part.to_string(),
                source,
            })?;
            let mut found: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "avsc"))
                .collect();
            if found.is_empty() {
                return Err(SchemaFilesError::EmptyFolder(part.to_string()));
            }
            found.sort();
            files.extend(found);
        } else {
            files.push(path);
        }
    }
    if files.is_empty() {
        return Err(SchemaFilesError::None);
    }
    Ok(files)
}

/// Where writer schemas come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistrySource {
    /// A Confluent-compatible Schema Registry (base URL without trailing slash).
    Confluent { url: String, access: RegistryAccess },
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
    pub compatibility: crate::schema::compat::Compatibility,
    pub event_time_field: String,
    pub lake_url: String,
    pub dead_letters: DeadLetterConfig,
    pub flush_interval: Duration,
    pub file_max_rows: usize,
    pub file_max_bytes: usize,
    pub compression: Compression,
    /// `STRATA_PARQUET_DELTA_ENCODING`: integer-like columns without a dictionary written as deltas.
    pub parquet_delta_encoding: bool,
    /// `compression.type` of the dead-letter and partials producers.
    pub producer_compression: &'static str,
    pub metrics_addr: std::net::SocketAddr,
    /// `AWS_CA_BUNDLE`: a PEM file of CA certificates the S3 endpoint is checked against too.
    pub s3_ca_bundle: Option<PathBuf>,
    pub commit_retries: usize,
    pub max_value_bytes: usize,
    pub shutdown_grace: Duration,
    pub maintenance: MaintenanceConfig,
    pub gold: Option<GoldConfig>,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let props: BTreeMap<_, _> = self
            .kafka_properties
            .iter()
            .map(|(k, v)| (k.clone(), redact(k, v)))
            .collect();
        let registry = match &self.registry {
            RegistrySource::Confluent { url, access } => format!("Confluent({url}, {access})"),
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
            .field("parquet_delta_encoding", &self.parquet_delta_encoding)
            .field("producer_compression", &self.producer_compression)
            .field("metrics_addr", &self.metrics_addr)
            .finish_non_exhaustive()
    }
}

/// Variables that look like `STRATA_KAFKA_*` but are Strata's own settings, not librdkafka properties.
const OWN_KAFKA_VARS: &[&str] = &["STRATA_KAFKA_BROKERS"];

/// The `STRATA_KAFKA_*` variable of a librdkafka property.
fn kafka_var(property: &str) -> String {
    format!(
        "STRATA_KAFKA_{}",
        property.to_ascii_uppercase().replace('.', "_")
    )
}

/// Every passed-through property is one librdkafka knows, with a value it takes (an unknown
/// mechanism, a misspelt name, a protocol this build lacks), and OAUTHBEARER has a way to get a
/// token: checked at start-up, naming the variable, rather than failing in the consumer later.
fn check_kafka_properties(properties: &BTreeMap<String, String>) -> Result<(), ConfigError> {
    for (key, value) in properties {
        let mut single = rdkafka::ClientConfig::new();
        single.set(key, value);
        if let Err(e) = single.create_native_config() {
            let reason = e.to_string();
            // librdkafka's message may quote the value: never show a secret's.
            let reason = if settings::is_secret(key) {
                reason.replace(value.as_str(), "<redacted>")
            } else {
                reason
            };
            return Err(invalid(&kafka_var(key), value, reason));
        }
    }
    // librdkafka checks the mechanism only when a client starts.
    const MECHANISMS: [&str; 5] = [
        "GSSAPI",
        "PLAIN",
        "SCRAM-SHA-256",
        "SCRAM-SHA-512",
        "OAUTHBEARER",
    ];
    let mechanism = properties
        .get("sasl.mechanism")
        .or_else(|| properties.get("sasl.mechanisms"));
    if let Some(unknown) =
        mechanism.filter(|m| !MECHANISMS.contains(&m.to_ascii_uppercase().as_str()))
    {
        let key = if properties.contains_key("sasl.mechanism") {
            "sasl.mechanism"
        } else {
            "sasl.mechanisms"
        };
        return Err(invalid(
            &kafka_var(key),
            unknown,
            format!("expected one of {}", MECHANISMS.join(", ")),
        ));
    }
    if mechanism.is_some_and(|m| m.eq_ignore_ascii_case("OAUTHBEARER")) {
        let method = properties
            .get("sasl.oauthbearer.method")
            .map(|m| m.to_ascii_lowercase())
            .unwrap_or_else(|| "default".into());
        let unsecured = properties
            .get("enable.sasl.oauthbearer.unsecure.jwt")
            .is_some_and(|v| v == "true");
        if method != "oidc" && !unsecured {
            return Err(invalid(
                "STRATA_KAFKA_SASL_OAUTHBEARER_METHOD",
                &method,
                "SASL OAUTHBEARER needs a token source: set it to oidc, with \
                 STRATA_KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL, \
                 STRATA_KAFKA_SASL_OAUTHBEARER_CLIENT_ID and \
                 STRATA_KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET",
            ));
        }
    }
    Ok(())
}

/// A variable's value, or its default.
fn value_of(vars: &HashMap<String, String>, var: &'static str) -> String {
    vars.get(var)
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default_of(var).to_string())
}

/// A variable that must have a value.
fn required_of(vars: &HashMap<String, String>, var: &'static str) -> Result<String, ConfigError> {
    let value = value_of(vars, var);
    if value.is_empty() {
        Err(ConfigError::Missing {
            var,
            help: help_of(var),
        })
    } else {
        Ok(value)
    }
}

impl Config {
    /// Reads the configuration from the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_vars(std::env::vars().collect())
    }

    /// Reads the configuration from a map of variables (the environment, or a test's own map).
    pub fn from_vars(vars: HashMap<String, String>) -> Result<Self, ConfigError> {
        let get = |var: &'static str| value_of(&vars, var);
        let required = |var: &'static str| required_of(&vars, var);
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

        check_kafka_properties(&kafka_properties)?;

        let SchemaSettings {
            registry,
            strategy: subject_strategy,
            compatibility,
        } = SchemaSettings::from_vars(&vars)?;

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
        let parquet_delta_encoding = match get("STRATA_PARQUET_DELTA_ENCODING")
            .to_ascii_lowercase()
            .as_str()
        {
            "true" => true,
            "false" => false,
            other => {
                return Err(invalid(
                    "STRATA_PARQUET_DELTA_ENCODING",
                    other,
                    "expected true or false",
                ))
            }
        };
        let producer_compression = match get("STRATA_PRODUCER_COMPRESSION")
            .to_ascii_lowercase()
            .as_str()
        {
            "none" => "none",
            "gzip" => "gzip",
            "snappy" => "snappy",
            "lz4" => "lz4",
            "zstd" => "zstd",
            other => {
                return Err(invalid(
                    "STRATA_PRODUCER_COMPRESSION",
                    other,
                    "expected none, gzip, snappy, lz4 or zstd",
                ))
            }
        };
        let s3_ca_bundle = match vars.get("AWS_CA_BUNDLE").map(|v| v.trim()) {
            None | Some("") => None,
            Some(path) => match std::fs::metadata(path) {
                Ok(meta) if meta.is_file() => Some(PathBuf::from(path)),
                Ok(_) => return Err(invalid("AWS_CA_BUNDLE", path, "not a file")),
                Err(e) => {
                    return Err(invalid(
                        "AWS_CA_BUNDLE",
                        path,
                        format!("cannot read it: {e}"),
                    ))
                }
            },
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
        let flush_interval = duration("STRATA_FLUSH_INTERVAL")?;
        let commit_retries = parse_usize("STRATA_COMMIT_RETRIES")?;
        let maintenance = MaintenanceConfig::from_vars(
            &vars,
            flush_interval,
            commit_retries,
            compression,
            parquet_delta_encoding,
        )?;
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
            flush_interval,
            file_max_rows: parse_usize("STRATA_FILE_MAX_ROWS")?,
            file_max_bytes: parse_usize("STRATA_FILE_MAX_BYTES")?,
            compression,
            parquet_delta_encoding,
            producer_compression,
            metrics_addr,
            s3_ca_bundle,
            commit_retries,
            max_value_bytes: parse_usize("STRATA_MAX_VALUE_BYTES")?,
            shutdown_grace: duration("STRATA_SHUTDOWN_GRACE")?,
            maintenance,
        })
    }
}

pub use crate::units::parse_duration;
pub use dead_letters::DeadLetterConfig;
pub use gold::GoldConfig;
pub use maintenance::{retention_floor, CompactionSettings, MaintenanceConfig, Retention};
pub use schema::{RegistryAccess, RegistryAuth, SchemaSettings};
pub use secret::Secret;
use settings::{default_of, help_of};
pub use settings::{help_text, redact, Setting, SETTINGS};

mod dead_letters;
mod gold;
mod maintenance;
mod schema;
mod secret;
mod settings;

#[cfg(test)]
mod tests;

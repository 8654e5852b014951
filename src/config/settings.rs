//! Every setting, declared once with its default and a line of help, so `strata --help` and the
//! parser can never disagree; and the redaction of secret values.

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
    Setting { var: "STRATA_SCHEMA_REGISTRY_BEARER_TOKEN", default: "", help: "Bearer token for the registry (secret, never logged); instead of STRATA_SCHEMA_REGISTRY_USER_INFO." },
    Setting { var: "STRATA_SCHEMA_REGISTRY_SSL_CA_LOCATION", default: "", help: "PEM file of the CA(s) the registry's https:// certificate is checked against, besides the system's trust store." },
    Setting { var: "STRATA_SCHEMA_REGISTRY_SSL_CERTIFICATE_LOCATION", default: "", help: "Mutual TLS to the registry: PEM file of the client certificate (with its chain)." },
    Setting { var: "STRATA_SCHEMA_REGISTRY_SSL_KEY_LOCATION", default: "", help: "Mutual TLS to the registry: PEM file of the client's private key (unencrypted PKCS#8, RSA or EC)." },
    Setting { var: "STRATA_READER_SCHEMA", default: "", help: "Reader schema(s): an .avsc file, a comma-separated list of files, a folder of .avsc files, or `latest` (the newest version of each subject in the registry, followed as it evolves). One Silver table per record name, named in snake_case (required)." },
    Setting { var: "STRATA_SUBJECT_NAME_STRATEGY", default: "topic", help: "How subjects are named, as Confluent's serializers do: topic (<topic>-value), topic_record (<topic>-<record full name>) or record (<record full name>). Used by `latest` and `strata schemas check`." },
    Setting { var: "STRATA_SCHEMA_COMPATIBILITY", default: "BACKWARD", help: "Check of each writer schema against the reader schema (and, transitive, earlier writers), with Confluent's meaning: BACKWARD, BACKWARD_TRANSITIVE, FORWARD, FORWARD_TRANSITIVE, FULL, FULL_TRANSITIVE or NONE." },
    Setting { var: "STRATA_EVENT_TIME_FIELD", default: "", help: "Reader-schema field holding event time (timestamp-millis or timestamp-micros) (required)." },
    Setting { var: "STRATA_LAKE_URL", default: "", help: "file:///path or s3://bucket/prefix; Silver tables live at <lake>/silver/<table> (required). S3 uses the AWS_* variables (AWS_ENDPOINT_URL, AWS_REGION, credentials); AWS_CA_BUNDLE names a PEM file of a private CA to trust for the endpoint." },
    Setting { var: "STRATA_DLQ_TOPIC", default: "{topic}.dlq", help: "Name of a Bronze topic's dead-letter topic; {topic} stands for the Bronze topic (one shared topic when left out). Strata creates it at start-up when missing (the principal needs CREATE)." },
    Setting { var: "STRATA_PRODUCER_COMPRESSION", default: "lz4", help: "Compression of what Strata produces (dead letters, Gold partials): none, gzip, snappy, lz4 or zstd. STRATA_KAFKA_COMPRESSION_TYPE, when set, wins." },
    Setting { var: "STRATA_DLQ_SUFFIX", default: "", help: "Older form of STRATA_DLQ_TOPIC: the Bronze topic followed by this suffix. Used only when STRATA_DLQ_TOPIC is unset." },
    Setting { var: "STRATA_DLQ_PARTITIONS", default: "source", help: "Partitions of a dead-letter topic Strata creates: `source` (as many as its Bronze topic, so a whole writer version refused can flow there as fast as it arrives) or a number." },
    Setting { var: "STRATA_DLQ_REPLICATION", default: "cluster", help: "Replication factor of a dead-letter topic Strata creates: `cluster` (the broker's default.replication.factor) or a number." },
    Setting { var: "STRATA_FLUSH_INTERVAL", default: "30s", help: "Longest time a record waits in memory before its file is committed (ms, s, m, h). A replica that has read every partition to its end commits at once when this long has passed since its last commit, so a burst or a backlog's tail does not wait out a fresh interval; a flush still comes at most about once per interval." },
    Setting { var: "STRATA_FILE_MAX_ROWS", default: "1000000", help: "A flush starts, and a file rolls, at this many buffered rows." },
    Setting { var: "STRATA_FILE_MAX_BYTES", default: "134217728", help: "A flush starts, and a file rolls, at this many buffered bytes (the memory budget of the Silver buffer)." },
    Setting { var: "STRATA_PARQUET_COMPRESSION", default: "zstd", help: "Parquet compression: zstd, snappy or none." },
    Setting { var: "STRATA_PARQUET_DELTA_ENCODING", default: "true", help: "true: integer, date and timestamp columns without a dictionary (ids, offsets, times) are written DELTA_BINARY_PACKED, much smaller than plain; false: plain, for readers that lack it (Spark before 3.3)." },
    Setting { var: "STRATA_METRICS_ADDR", default: "0.0.0.0:9898", help: "Address of the /metrics, /healthz and /readyz endpoint." },
    Setting { var: "STRATA_MAX_VALUE_BYTES", default: "8388608", help: "Record values longer than this are dead-lettered as value_too_large before decoding (bounds the memory one record can claim)." },
    Setting { var: "STRATA_COMMIT_RETRIES", default: "50", help: "How often a Delta commit that lost a race is retried before the replica gives up." },
    Setting { var: "STRATA_CHECKPOINT_INTERVAL", default: "10", help: "A Delta checkpoint every this many commits of each table, written by the committer of that version (Delta Lake's own default; delta-rs's 100 lets a snapshot load or checkpoint read up to 100 commit files at once, about 2.4 MiB of JSON decoder each)." },
    Setting { var: "STRATA_MAINTENANCE_INTERVAL", default: "5m", help: "How often one replica (the owner of the first Bronze topic's partition 0) cleans up expired log files, vacuums and sweeps Gold state files of every table. `strata maintain` runs one pass." },
    Setting { var: "STRATA_COMPACT_QUIET_FOR", default: "1h", help: "An hour partition that received no new file for this long and holds several small files is compacted (remove + add with dataChange=false: rows and progress unchanged)." },
    Setting { var: "STRATA_COMPACT_TARGET_BYTES", default: "268435456", help: "Compaction packs small files into files of about this many bytes." },
    Setting { var: "STRATA_LOG_RETENTION", default: "", help: "How long _delta_log entries are kept; unset: the table's delta.logRetentionDuration (30 days unless set)." },
    Setting { var: "STRATA_VACUUM_RETENTION", default: "7d", help: "Data files no version within this age references are deleted (refused, crashed or replaced uploads). Must exceed the time an upload can wait for its commit: the flush interval + 4 s per STRATA_COMMIT_RETRIES + 30 s." },
    Setting { var: "STRATA_SHUTDOWN_GRACE", default: "30s", help: "After SIGTERM, how long the replica may take to flush and commit before it aborts." },
    Setting { var: "STRATA_GOLD_KEY", default: "", help: "Gold: comma-separated grouping field(s) of the Gold source table (string or integer). Unset: no Gold." },
    Setting { var: "STRATA_GOLD_WINDOW", default: "1m", help: "Gold: event-time window, tumbling (`1m`) or hopping (`5m every 1m`; the slide divides the size)." },
    Setting { var: "STRATA_GOLD_AGGREGATES", default: "count", help: "Gold: comma-separated aggregates: count, sum(f), min(f), max(f), avg(f), approx_distinct(f) (HyperLogLog, about 1.6 % standard error)." },
    Setting { var: "STRATA_GOLD_TABLE", default: "", help: "Gold: the Silver table it reads (a table name); default: the only table, or the first reader schema's." },
    Setting { var: "STRATA_GOLD_NAME", default: "", help: "Gold: table name, at <lake>/gold/<name>, late events at <lake>/gold/<name>_late; default <table>_by_<keys>." },
    Setting { var: "STRATA_GOLD_PARTIALS_TOPIC", default: "", help: "Gold: topic of the partial aggregates between the stages; default <group>.partials (created when missing)." },
    Setting { var: "STRATA_GOLD_PARTIALS_REPLICATION", default: "cluster", help: "Gold: replication factor of the partials topic when Strata creates it: `cluster` (the broker's default.replication.factor) or a number." },
    Setting { var: "STRATA_GOLD_PARTIALS_RETENTION", default: "7d", help: "Gold: retention.ms of the partials topic when Strata creates it; stage 2 must read partials before they expire." },
    Setting { var: "STRATA_GOLD_PARTITIONS", default: "8", help: "Gold: partitions of the partials topic when Strata creates it (the existing count is used otherwise)." },
    Setting { var: "STRATA_WATERMARK_DELAY", default: "10s", help: "Gold: bounded out-of-orderness: a source partition's watermark is its newest event time minus this." },
    Setting { var: "STRATA_MAX_EVENT_TIME_SKEW", default: "10s", help: "Gold: an event moves its partition's watermark at most this far past its Kafka record's timestamp and past the replica's clock at the Silver commit holding it, so an event field or a producer clock ahead cannot make later events late (the event still counts in its own window)." },
    Setting { var: "STRATA_ALLOWED_LATENESS", default: "0s", help: "Gold: a window is final when the watermark passes its end plus this; later events go to the late-events table." },
    Setting { var: "STRATA_IDLE_TIMEOUT", default: "30s", help: "Gold: a caught-up source partition without records for this long moves its watermark with the clock (now minus the delay), so it does not hold windows open." },
    Setting { var: "STRATA_GOLD_STATE_MAX_BYTES", default: "536870912", help: "Gold: bytes of state (open groups, results waiting for the merge and closed rows waiting for their commit, as strata_gold_state_bytes counts them) stage 2 may hold on a replica. At the budget it stops taking stage 1's partials, partition by partition, and claims no more partitions; it resumes below 90 % of it; the process takes about three times this at a window's close. Pairs with the deploy kit's 2 GiB pod." },
    Setting { var: "STRATA_HOT_KEY_SHARE", default: "0.1", help: "Gold: a key holding at least this share of an epoch's events (0 < share ≤ 1) is hot and salted." },
    Setting { var: "STRATA_HOT_KEY_MIN_EVENTS", default: "100", help: "Gold: … and at least this many events of the epoch." },
    Setting { var: "STRATA_HOT_KEY_SALTS", default: "4", help: "Gold: sub-keys a hot key is spread over (0 or 1: salting off); below the partials topic's partition count." },
    Setting { var: "STRATA_LOG", default: "info", help: "Log filter (tracing EnvFilter syntax); RUST_LOG is used when unset." },
    Setting { var: "STRATA_LOG_FORMAT", default: "json", help: "Log format: json or text." },
];

/// Whether a setting's name suggests a credential (a password, token, key or JAAS line). File
/// locations are not secrets: `ssl.key.location` names a path.
pub fn is_secret(name: &str) -> bool {
    let lower = name.to_ascii_lowercase().replace('_', ".");
    if lower.ends_with("location") || lower.ends_with(".file") {
        return false;
    }
    [
        "password",
        "secret",
        "user.info",
        "token",
        "key",
        "credential",
        "jaas",
        "oauthbearer.config",
    ]
    .iter()
    .any(|word| lower.contains(word))
}

/// Hides values of settings whose name suggests a credential: what remains says only that it is set.
pub fn redact(name: &str, value: &str) -> String {
    if is_secret(name) {
        if value.is_empty() {
            "<unset>"
        } else {
            "<redacted>"
        }
        .to_string()
    } else {
        value.to_string()
    }
}

/// The help text that `strata --help` prints.
pub fn help_text() -> String {
    let mut out = String::from(
        "strata: Bronze Kafka topics (Confluent Avro) into exactly-once Delta Lake tables\n\n\
         USAGE:\n  strata [run]    start a replica (configured by the environment variables below)\n  \
         strata demo     run the whole pipeline on an embedded Kafka and a local lake, then verify it\n  \
         strata maintain one maintenance pass over every table of the lake (log cleanup, vacuum), then exit\n  \
         strata schemas check [FILE|DIR ...]\n                  compare .avsc files (default: schemas/) with the registry's subjects under\n                  STRATA_SCHEMA_COMPATIBILITY; exit 1 on an incompatible change, 2 if it cannot check\n  \
         strata --version the version, and the librdkafka it links with its builtin.features\n  \
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

pub(super) fn default_of(var: &str) -> &'static str {
    SETTINGS
        .iter()
        .find(|s| s.var == var)
        .map(|s| s.default)
        .unwrap_or("")
}

pub(super) fn help_of(var: &'static str) -> &'static str {
    SETTINGS
        .iter()
        .find(|s| s.var == var)
        .map(|s| s.help)
        .unwrap_or("")
}

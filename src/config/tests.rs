//! Configuration from variables: defaults, pass-through, and errors that name the variable.

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
    assert!(config.parquet_delta_encoding);
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
        ("STRATA_PARQUET_DELTA_ENCODING", "yes"),
        ("STRATA_LAKE_URL", "/tmp/lake"),
        ("STRATA_SCHEMA_REGISTRY_URL", "registry:8081"),
        ("STRATA_METRICS_ADDR", "nine"),
        ("STRATA_SCHEMA_COMPATIBILITY", "SIDEWAYS"),
        ("STRATA_TOPICS", "a b"),
        ("STRATA_DLQ_TOPIC", "{topic} dead"),
        ("STRATA_DLQ_TOPIC", "{topic}"),
        ("STRATA_DLQ_PARTITIONS", "0"),
        ("STRATA_DLQ_REPLICATION", "two"),
        ("STRATA_PRODUCER_COMPRESSION", "lz5"),
        ("STRATA_KAFKA_SASL_MECHANISM", "SCRAM-SHA-3"),
        ("STRATA_KAFKA_SECURITY_PROTOCOL", "TLS"),
        ("STRATA_KAFKA_NO_SUCH_PROPERTY", "1"),
        ("AWS_CA_BUNDLE", "/nonexistent/ca.pem"),
        (
            "STRATA_SCHEMA_REGISTRY_SSL_CA_LOCATION",
            "/nonexistent/ca.pem",
        ),
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
fn secrets_never_appear_in_errors_or_the_debug_form() {
    let mut vars = base();
    vars.insert("STRATA_KAFKA_SASL_PASSWORD".into(), "pw-1234-secret".into());
    vars.insert("STRATA_KAFKA_SSL_KEY_PASSWORD".into(), "key-pw-5678".into());
    vars.insert(
        "STRATA_SCHEMA_REGISTRY_URL".into(),
        "https://registry:8081".into(),
    );
    vars.insert(
        "STRATA_SCHEMA_REGISTRY_USER_INFO".into(),
        "u:reg-pw-9999".into(),
    );
    let config = Config::from_vars(vars.clone()).expect("valid");
    let shown = format!("{config:?}");
    for secret in ["pw-1234-secret", "key-pw-5678", "reg-pw-9999"] {
        assert!(!shown.contains(secret), "{shown}");
    }
    assert!(shown.contains("basic auth (set)"), "{shown}");
    // An invalid secret value is named by its variable, never shown.
    vars.insert(
        "STRATA_SCHEMA_REGISTRY_BEARER_TOKEN".into(),
        "tok-4242".into(),
    );
    let err = Config::from_vars(vars.clone())
        .expect_err("both")
        .to_string();
    assert!(
        !err.contains("tok-4242") && !err.contains("reg-pw-9999"),
        "{err}"
    );
    vars.remove("STRATA_SCHEMA_REGISTRY_BEARER_TOKEN");
    vars.insert(
        "STRATA_SCHEMA_REGISTRY_URL".into(),
        "https://u:url-pw-31@registry:8081".into(),
    );
    let err = Config::from_vars(vars)
        .expect_err("credentials in the URL")
        .to_string();
    assert!(
        err.contains("STRATA_SCHEMA_REGISTRY_USER_INFO") && !err.contains("url-pw-31"),
        "{err}"
    );
}

#[test]
fn oauthbearer_needs_a_token_source() {
    let mut vars = base();
    vars.insert("STRATA_KAFKA_SECURITY_PROTOCOL".into(), "SASL_SSL".into());
    vars.insert("STRATA_KAFKA_SASL_MECHANISM".into(), "OAUTHBEARER".into());
    let err = Config::from_vars(vars.clone())
        .expect_err("no token source")
        .to_string();
    assert!(
        err.contains("STRATA_KAFKA_SASL_OAUTHBEARER_METHOD"),
        "{err}"
    );
    vars.insert("STRATA_KAFKA_SASL_OAUTHBEARER_METHOD".into(), "oidc".into());
    vars.insert(
        "STRATA_KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL".into(),
        "https://idp.example/oauth2/token".into(),
    );
    vars.insert(
        "STRATA_KAFKA_SASL_OAUTHBEARER_CLIENT_ID".into(),
        "strata".into(),
    );
    vars.insert(
        "STRATA_KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET".into(),
        "s".into(),
    );
    Config::from_vars(vars).expect("OIDC is a token source");
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
    assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
    assert!(parse_duration("5w").is_err());
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
    assert_eq!(gold.state_max_bytes, 512 << 20);
    // The partials topic takes the cluster's replication factor unless one is set.
    assert_eq!(gold.partials_replication, None);
    assert_eq!(
        gold.partials_retention,
        std::time::Duration::from_secs(7 * 86_400)
    );
    let mut replicated = vars.clone();
    replicated.insert("STRATA_GOLD_PARTIALS_REPLICATION".into(), "3".into());
    let replicated = Config::from_vars(replicated)
        .expect("valid")
        .gold
        .expect("gold");
    assert_eq!(replicated.partials_replication, Some(3));
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
        (
            "STRATA_GOLD_STATE_MAX_BYTES",
            "0",
            "STRATA_GOLD_STATE_MAX_BYTES",
        ),
        (
            "STRATA_GOLD_STATE_MAX_BYTES",
            "1GiB",
            "STRATA_GOLD_STATE_MAX_BYTES",
        ),
        (
            "STRATA_GOLD_PARTIALS_REPLICATION",
            "0",
            "STRATA_GOLD_PARTIALS_REPLICATION",
        ),
        (
            "STRATA_GOLD_PARTIALS_REPLICATION",
            "all",
            "STRATA_GOLD_PARTIALS_REPLICATION",
        ),
        (
            "STRATA_GOLD_PARTIALS_RETENTION",
            "0s",
            "STRATA_GOLD_PARTIALS_RETENTION",
        ),
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

//! Secured clusters, registries and stores, on real parts (`tests/common/secured.rs`): tansu with
//! SASL/SCRAM behind stunnel's TLS, stunnel requiring client certificates (mutual TLS), the
//! registry stand-in and moto behind TLS, with certificates made by `openssl` for each test.
//!
//! - SASL_SSL + SCRAM-SHA-512, records produced with each of gzip, lz4 and zstd, a writer
//!   schema whose named types live in other subjects (references of references), the registry
//!   over HTTPS with basic auth and the test CA, S3 over HTTPS through `AWS_CA_BUNDLE`: every
//!   record lands exactly once, dead letters included, and no secret appears in a log line,
//!   `/metrics`, `/readyz`, `--help` or a configuration error.
//! - A wrong password, an untrusted CA and a mechanism the brokers cannot authenticate: the replica stays
//!   up, not ready, with the reason named, commits nothing; with the credentials fixed, exact.
//! - Mutual TLS to the brokers and to the registry.
//!
//! snappy is read in `tests/codecs.rs` (MockCluster): tansu 0.6.0 stores snappy batches but
//! cannot serve them (`UnexpectedType("Snappy")` on fetch).
//! - `STRATA_READER_SCHEMA=latest` whose newest version names a type of another subject, with a
//!   bearer token.

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use apache_avro::types::Value;
use common::secured::{self, Auth, Pki, SecuredBroker, Tunnel};
use common::{FakeRegistry, Produced, Replica, Setup};
use rdkafka::producer::{FutureProducer, FutureRecord};
use strata::demo::{ORDER_V1, ORDER_V2};

const REGISTRY_USER_INFO: &str = "registry-svc:reg-pw-5d2b8e31";
const REGISTRY_PASSWORD: &str = "reg-pw-5d2b8e31";
const REGISTRY_TOKEN: &str = "bearer-tok-a41f9c07";
const AWS_SECRET: &str = "aws-secret-7be3f02d";

/// Types registered under subjects of their own, referenced by the order schema below.
const COUNTRY: &str =
    r#"{"type":"enum","name":"Country","namespace":"shop.common","symbols":["DE","FR","US"]}"#;
/// References Country by its relative name, in its own namespace.
const ADDRESS: &str = r#"{"type":"record","name":"Address","namespace":"shop.common","fields":[
  {"name":"city","type":"string"},{"name":"country","type":"Country"}]}"#;
/// An order writer that names `shop.common.Address` (and through it Country) without defining it.
const ORDER_V3: &str = r#"{"type":"record","name":"Order","namespace":"shop","fields":[
  {"name":"order_id","type":"long"},
  {"name":"customer_id","type":"string"},
  {"name":"product","type":"string"},
  {"name":"amount","type":"double"},
  {"name":"event_time","type":{"type":"long","logicalType":"timestamp-millis"}},
  {"name":"ship_to","type":"shop.common.Address"}]}"#;
/// The same writer as its producer holds it, every type written out (to encode the records).
const ORDER_V3_FULL: &str = r#"{"type":"record","name":"Order","namespace":"shop","fields":[
  {"name":"order_id","type":"long"},
  {"name":"customer_id","type":"string"},
  {"name":"product","type":"string"},
  {"name":"amount","type":"double"},
  {"name":"event_time","type":{"type":"long","logicalType":"timestamp-millis"}},
  {"name":"ship_to","type":{"type":"record","name":"Address","namespace":"shop.common","fields":[
    {"name":"city","type":"string"},
    {"name":"country","type":{"type":"enum","name":"Country","symbols":["DE","FR","US"]}}]}}]}"#;

const CHANNEL: &str =
    r#"{"type":"enum","name":"Channel","namespace":"shop.common","symbols":["WEB","STORE","APP"]}"#;
/// The newest reader version of the `latest` test: the order fields plus a referenced enum.
const ORDER_LATEST: &str = r#"{"type":"record","name":"Order","namespace":"shop","fields":[
  {"name":"order_id","type":"long"},
  {"name":"customer_id","type":"string"},
  {"name":"product","type":"string"},
  {"name":"amount","type":"double"},
  {"name":"event_time","type":{"type":"long","logicalType":"timestamp-millis"}},
  {"name":"coupon","type":["null","string"],"default":null},
  {"name":"quantity","type":"int","default":1},
  {"name":"channel","type":"shop.common.Channel","default":"WEB"}]}"#;
const ORDER_LATEST_FULL: &str = r#"{"type":"record","name":"Order","namespace":"shop","fields":[
  {"name":"order_id","type":"long"},
  {"name":"customer_id","type":"string"},
  {"name":"product","type":"string"},
  {"name":"amount","type":"double"},
  {"name":"event_time","type":{"type":"long","logicalType":"timestamp-millis"}},
  {"name":"coupon","type":["null","string"],"default":null},
  {"name":"quantity","type":"int","default":1},
  {"name":"channel","type":{"type":"enum","name":"Channel","namespace":"shop.common","symbols":["WEB","STORE","APP"]},"default":"WEB"}]}"#;

/// The S3 port moto listens on (from the services' `AWS_ENDPOINT_URL`).
fn moto_port() -> u16 {
    let endpoint =
        std::env::var("AWS_ENDPOINT_URL").expect("AWS_ENDPOINT_URL: run with `make test`");
    endpoint
        .rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse().ok())
        .expect("a port in AWS_ENDPOINT_URL")
}

/// A registry stand-in with the order writers (ids 1, 2) under the topic's subject, behind TLS.
async fn registry_behind_tls(
    registry: &Arc<FakeRegistry>,
    pki: &Pki,
    require_client_certificate: bool,
) -> (Tunnel, String) {
    let plain = registry.serve().await;
    let port: u16 = plain
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port");
    let tunnel = Tunnel::start(pki, port, require_client_certificate).await;
    let url = format!("https://127.0.0.1:{}", tunnel.port);
    (tunnel, url)
}

/// Produces `count` records of `schema` (registered as `id`) to `topic` round-robin over
/// `partitions`, and adds them to `produced` with their values.
#[allow(clippy::too_many_arguments)]
async fn produce_framed(
    brokers: &str,
    properties: &[(String, String)],
    topic: &str,
    partitions: i32,
    id: u32,
    schema: &str,
    count: i64,
    value: impl Fn(i64) -> Value,
    produced: &mut Produced,
) {
    let producer: FutureProducer = common::client_config(brokers, properties)
        .set("enable.idempotence", "true")
        .create()
        .expect("producer");
    for n in 0..count {
        let order_id = 900_000 + i64::from(id) * 10_000 + n;
        let amount = n as f64 * 0.25;
        let bytes = common::framed(id, schema, value(n));
        let partition = (n % i64::from(partitions)) as i32;
        let delivered = producer
            .send(
                FutureRecord::to(topic)
                    .partition(partition)
                    .key(&order_id.to_string())
                    .payload(&bytes),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(e, _)| e)
            .expect("delivered");
        produced
            .good
            .push((topic.to_string(), delivered.partition, delivered.offset));
        produced
            .values
            .insert((delivered.partition, delivered.offset), (order_id, amount));
    }
}

fn order_fields(id: u32, n: i64) -> Vec<(String, Value)> {
    vec![
        (
            "order_id".into(),
            Value::Long(900_000 + i64::from(id) * 10_000 + n),
        ),
        ("customer_id".into(), Value::String(format!("c{}", n % 7))),
        ("product".into(), Value::String("tea".into())),
        ("amount".into(), Value::Double(n as f64 * 0.25)),
        (
            "event_time".into(),
            Value::TimestampMillis(1_764_100_800_000 + n * 1_000),
        ),
    ]
}

/// Every record of the setup's dead-letter topic, read through the secured broker.
async fn read_dead_letters(
    broker: &SecuredBroker,
    client: &[(String, String)],
    setup: &Setup,
    produced: &Produced,
) -> Vec<common::DeadLetter> {
    common::dead_letters_with(
        &broker.brokers,
        client,
        &format!("{}.dlq", setup.topic),
        produced.bad.len(),
        Duration::from_secs(60),
    )
    .await
}

/// Starts a replica of `setup` with more variables (owned pairs, as `secured::strata_env` makes).
fn spawn_with(setup: &Setup, env: &[(String, String)]) -> Replica {
    let extra: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    setup.spawn(&extra)
}

/// Waits until `/readyz` answers 503 with `needle` in its body; returns the body.
async fn wait_not_ready_with(replica: &Replica, needle: &str, within: Duration) -> String {
    let deadline = Instant::now() + within;
    let mut last = String::new();
    while Instant::now() < deadline {
        if let Some((status, body)) = replica.http_get("/readyz").await {
            if status == 503 && body.contains(needle) {
                return body;
            }
            last = format!("{status} {body}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!(
        "/readyz never said 503 with {needle:?} (last: {last}); log:\n{}",
        replica.tail(40)
    );
}

/// Asserts that none of `secrets` appears in `text`.
fn assert_no_secret(what: &str, text: &str, secrets: &[&str]) {
    for secret in secrets {
        assert!(
            !text.contains(secret),
            "{what} shows a secret ({secret:?}):\n{}",
            text.lines()
                .filter(|l| l.contains(secret))
                .take(5)
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_over_tls_with_gzip_lz4_zstd_and_references_lands_exactly_once_without_leaking_secrets(
) {
    let pki = Pki::new();
    let broker = SecuredBroker::start(&pki, Auth::Scram).await;
    let client = broker.client(&pki);
    let setup = Setup::on_with(&broker.brokers, &client, "secured", 4).await;

    let registry = Arc::new(FakeRegistry::default());
    let subject = format!("{}-value", setup.topic);
    registry.register(&subject, 1, ORDER_V1);
    registry.register(&subject, 2, ORDER_V2);
    registry.register("shop.common.Country", 10, COUNTRY);
    registry.register_with_references(
        "shop.common.Address",
        11,
        ADDRESS,
        &[("shop.common.Country", "shop.common.Country", 1)],
    );
    registry.register_with_references(
        &subject,
        3,
        ORDER_V3,
        &[("shop.common.Address", "shop.common.Address", 1)],
    );
    registry.require_basic_auth(REGISTRY_USER_INFO);
    let (_registry_tls, registry_url) = registry_behind_tls(&registry, &pki, false).await;
    let s3_tls = Tunnel::start(&pki, moto_port(), false).await;

    // Each codec a producer may choose, 1 record in 40 undecodable (dead letters go back out
    // through the same SASL_SSL connection, compressed).
    let mut produced = Produced::default();
    for (seed, codec) in ["gzip", "lz4", "zstd"].into_iter().enumerate() {
        let mut properties = client.clone();
        properties.push(("compression.type".into(), codec.into()));
        properties.push(("linger.ms".into(), "50".into()));
        produced.extend(
            common::produce_with(
                &broker.brokers,
                &properties,
                &setup.topic,
                400,
                40,
                seed as u64,
            )
            .await,
        );
    }
    produce_framed(
        &broker.brokers,
        &client,
        &setup.topic,
        4,
        3,
        ORDER_V3_FULL,
        60,
        |n| {
            let mut fields = order_fields(3, n);
            fields.push((
                "ship_to".into(),
                Value::Record(vec![
                    ("city".into(), Value::String("Lyon".into())),
                    (
                        "country".into(),
                        Value::Enum((n % 3) as u32, ["DE", "FR", "US"][(n % 3) as usize].into()),
                    ),
                ]),
            ));
            Value::Record(fields)
        },
        &mut produced,
    )
    .await;
    assert!(!produced.bad.is_empty());

    let mut env = secured::strata_env(&client);
    env.extend(
        [
            ("STRATA_SCHEMA_REGISTRY_URL", registry_url.clone()),
            (
                "STRATA_SCHEMA_REGISTRY_USER_INFO",
                REGISTRY_USER_INFO.to_string(),
            ),
            (
                "STRATA_SCHEMA_REGISTRY_SSL_CA_LOCATION",
                pki.ca.display().to_string(),
            ),
            (
                "AWS_ENDPOINT_URL",
                format!("https://127.0.0.1:{}", s3_tls.port),
            ),
            ("AWS_CA_BUNDLE", pki.ca.display().to_string()),
            ("AWS_ALLOW_HTTP", "false".to_string()),
            ("AWS_SECRET_ACCESS_KEY", AWS_SECRET.to_string()),
        ]
        .map(|(k, v)| (k.to_string(), v)),
    );
    let replica = spawn_with(&setup, &env);
    setup.catch_up(&produced, &[&replica]).await;
    setup.assert_exact(&produced).await;

    let dead_letters = read_dead_letters(&broker, &client, &setup, &produced).await;
    let mut lettered: Vec<_> = dead_letters.iter().map(|d| d.source.clone()).collect();
    let mut bad = produced.bad.clone();
    lettered.sort();
    bad.sort();
    assert_eq!(
        lettered, bad,
        "every bad record in the dead-letter topic, once"
    );
    for letter in &dead_letters {
        let (_, partition, offset) = &letter.source;
        assert_eq!(
            letter.value.as_ref(),
            produced.bad_values.get(&(*partition, *offset))
        );
    }

    let (status, ready) = replica.http_get("/readyz").await.expect("readyz");
    assert_eq!(status, 200, "{ready}");
    let (_, metrics) = replica.http_get("/metrics").await.expect("metrics");

    // No secret anywhere a person or a scraper looks.
    let secrets = [secured::PASSWORD, REGISTRY_PASSWORD, AWS_SECRET];
    let log = replica.log_lines().join("\n");
    assert!(
        log.contains("builtin_features"),
        "the start-up log names librdkafka's features"
    );
    assert_no_secret("the log", &log, &secrets);
    assert_no_secret("/metrics", &metrics, &secrets);
    assert_no_secret("/readyz", &ready, &secrets);
    let run = |args: &[&str], more: &[(&str, &str)]| {
        let output = Command::new(env!("CARGO_BIN_EXE_strata"))
            .args(args)
            .envs(setup.env(common::free_port()))
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .envs(more.iter().copied())
            .output()
            .expect("run strata");
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    };
    assert_no_secret("--help", &run(&["--help"], &[]), &secrets);
    let refused = run(&["run"], &[("STRATA_FLUSH_INTERVAL", "soon")]);
    assert!(refused.contains("STRATA_FLUSH_INTERVAL"), "{refused}");
    assert_no_secret("a configuration error", &refused, &secrets);
    let both = run(
        &["run"],
        &[("STRATA_SCHEMA_REGISTRY_BEARER_TOKEN", REGISTRY_TOKEN)],
    );
    assert!(
        both.contains("STRATA_SCHEMA_REGISTRY_BEARER_TOKEN"),
        "{both}"
    );
    assert_no_secret(
        "a configuration error",
        &both,
        &[REGISTRY_PASSWORD, REGISTRY_TOKEN],
    );
    replica.stop(Duration::from_secs(30));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_credentials_keep_the_replica_up_not_ready_and_commit_nothing_until_fixed() {
    let pki = Pki::new();
    let broker = SecuredBroker::start(&pki, Auth::Scram).await;
    let client = broker.client(&pki);
    let setup = Setup::on_with(&broker.brokers, &client, "refused", 2).await;
    let produced = common::produce_with(&broker.brokers, &client, &setup.topic, 600, 0, 7).await;

    // (what, the replica's client properties, what /readyz must name)
    type Refusal = (&'static str, Vec<(String, String)>, &'static str);
    let refusals: [Refusal; 3] = [
        (
            "a wrong password",
            broker.client_with(&pki, &pki.ca, "not-the-password"),
            "authentication failed for SASL mechanism SCRAM-SHA-512",
        ),
        (
            "an untrusted CA",
            broker.client_with(&pki, &pki.rogue_ca, secured::PASSWORD),
            "certificate is not trusted",
        ),
        (
            "a mechanism the brokers cannot authenticate",
            {
                let mut properties = broker.client(&pki);
                properties.retain(|(k, _)| !k.starts_with("sasl."));
                properties.push(("sasl.mechanism".into(), "OAUTHBEARER".into()));
                properties.push((
                    "sasl.oauthbearer.config".into(),
                    "principal=strata-svc".into(),
                ));
                properties.push(("enable.sasl.oauthbearer.unsecure.jwt".into(), "true".into()));
                properties
            },
            // tansu takes OAUTHBEARER's handshake and refuses the token. (A mechanism refused at
            // the handshake, "the brokers do not support SASL mechanism X", is classified by the
            // unit test of `kafka::connection_problem`.)
            "authentication failed for SASL mechanism OAUTHBEARER",
        ),
    ];
    for (what, properties, reason) in refusals {
        let env = secured::strata_env(&properties);
        let mut replica = spawn_with(&setup, &env);
        let body = wait_not_ready_with(&replica, reason, Duration::from_secs(60)).await;
        assert!(!body.contains("not-the-password"), "{body}");
        // It keeps retrying, alive and not ready, and commits nothing.
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(
            replica.is_running(),
            "{what}: the replica exited:\n{}",
            replica.tail(30)
        );
        let (status, _) = replica.http_get("/readyz").await.expect("readyz");
        assert_eq!(status, 503, "{what}");
        assert!(
            setup.progress().await.is_empty(),
            "{what}: something was committed"
        );
        let stopped = Instant::now();
        replica.stop(Duration::from_secs(30));
        assert!(
            stopped.elapsed() < Duration::from_secs(15),
            "{what}: slow to stop"
        );
    }

    // The credentials fixed (a restart, as an operator does): every record, once.
    let env = secured::strata_env(&client);
    let replica = spawn_with(&setup, &env);
    setup.catch_up(&produced, &[&replica]).await;
    setup.assert_exact(&produced).await;
    common::assert_accounting(&replica).await;
    replica.stop(Duration::from_secs(30));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_to_the_brokers_and_the_registry() {
    let pki = Pki::new();
    let broker = SecuredBroker::start(&pki, Auth::MutualTls).await;
    let client = broker.client(&pki);
    let setup = Setup::on_with(&broker.brokers, &client, "mtls", 2).await;
    let produced = common::produce_with(&broker.brokers, &client, &setup.topic, 500, 50, 3).await;
    let registry = Arc::new(FakeRegistry::default());
    let subject = format!("{}-value", setup.topic);
    registry.register(&subject, 1, ORDER_V1);
    registry.register(&subject, 2, ORDER_V2);
    let (_registry_tls, registry_url) = registry_behind_tls(&registry, &pki, true).await;
    let registry_env = [
        ("STRATA_SCHEMA_REGISTRY_URL", registry_url.clone()),
        (
            "STRATA_SCHEMA_REGISTRY_SSL_CA_LOCATION",
            pki.ca.display().to_string(),
        ),
        (
            "STRATA_SCHEMA_REGISTRY_SSL_CERTIFICATE_LOCATION",
            pki.client_cert.display().to_string(),
        ),
        (
            "STRATA_SCHEMA_REGISTRY_SSL_KEY_LOCATION",
            pki.client_key.display().to_string(),
        ),
    ];

    // Without its certificate the brokers' TLS endpoint refuses the replica.
    let mut anonymous = client.clone();
    anonymous.retain(|(k, _)| !k.starts_with("ssl.certificate") && !k.starts_with("ssl.key"));
    let mut env = secured::strata_env(&anonymous);
    env.extend(registry_env.iter().map(|(k, v)| (k.to_string(), v.clone())));
    let mut refused = spawn_with(&setup, &env);
    let body = wait_not_ready_with(&refused, "kafka:", Duration::from_secs(60)).await;
    assert!(body.contains("SSL"), "the TLS connection is named: {body}");
    assert!(refused.is_running());
    assert!(setup.progress().await.is_empty());
    refused.stop(Duration::from_secs(30));

    let mut env = secured::strata_env(&client);
    env.extend(registry_env.iter().map(|(k, v)| (k.to_string(), v.clone())));
    let replica = spawn_with(&setup, &env);
    setup.catch_up(&produced, &[&replica]).await;
    setup.assert_exact(&produced).await;
    let dead_letters = read_dead_letters(&broker, &client, &setup, &produced).await;
    assert_eq!(dead_letters.len(), produced.bad.len());
    replica.stop(Duration::from_secs(30));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_reader_naming_a_type_of_another_subject_over_https_with_a_bearer_token() {
    let pki = Pki::new();
    let setup = Setup::new("latest-refs", 2).await;
    let registry = Arc::new(FakeRegistry::default());
    let subject = format!("{}-value", setup.topic);
    registry.register(&subject, 1, ORDER_V1);
    registry.register(&subject, 2, ORDER_V2);
    registry.register("shop.common.Channel", 20, CHANNEL);
    registry.register_with_references(
        &subject,
        21,
        ORDER_LATEST,
        &[("shop.common.Channel", "shop.common.Channel", 1)],
    );
    *registry.authorization.lock().expect("auth") = Some(format!("Bearer {REGISTRY_TOKEN}"));
    let (_registry_tls, registry_url) = registry_behind_tls(&registry, &pki, false).await;

    let mut produced = common::produce(&setup.topic, 300, 0, 11).await;
    produce_framed(
        &setup.brokers,
        &[],
        &setup.topic,
        2,
        21,
        ORDER_LATEST_FULL,
        90,
        |n| {
            let mut fields = order_fields(21, n);
            fields.push(("coupon".into(), Value::Union(0, Box::new(Value::Null))));
            fields.push(("quantity".into(), Value::Int(2)));
            fields.push((
                "channel".into(),
                Value::Enum(
                    (n % 3) as u32,
                    ["WEB", "STORE", "APP"][(n % 3) as usize].into(),
                ),
            ));
            Value::Record(fields)
        },
        &mut produced,
    )
    .await;

    let replica = setup.spawn(&[
        ("STRATA_SCHEMA_REGISTRY_URL", &registry_url),
        ("STRATA_SCHEMA_REGISTRY_BEARER_TOKEN", REGISTRY_TOKEN),
        (
            "STRATA_SCHEMA_REGISTRY_SSL_CA_LOCATION",
            &pki.ca.display().to_string(),
        ),
        ("STRATA_READER_SCHEMA", "latest"),
    ]);
    setup.catch_up(&produced, &[&replica]).await;
    let contents = setup.assert_exact(&produced).await;
    // The referenced enum is a column: older writers get its default, the newest their own.
    let mut channels: BTreeMap<String, usize> = BTreeMap::new();
    for batch in &contents.batches {
        use deltalake::arrow::array::AsArray;
        let column = batch.column_by_name("channel").expect("a channel column");
        let text =
            deltalake::arrow::compute::cast(column, &deltalake::arrow::datatypes::DataType::Utf8)
                .expect("cast");
        for value in text.as_string::<i32>().iter() {
            *channels
                .entry(value.unwrap_or("null").to_string())
                .or_default() += 1;
        }
    }
    assert_eq!(
        channels,
        BTreeMap::from([
            ("APP".into(), 30),
            ("STORE".into(), 30),
            ("WEB".into(), 300 + 30)
        ])
    );
    assert_no_secret(
        "the log",
        &replica.log_lines().join("\n"),
        &[REGISTRY_TOKEN],
    );
    replica.stop(Duration::from_secs(30));
}

//! Kafka clients: the consumer thread with its rebalance handshake ([`consumer`]), the shared
//! client settings and the idempotent producer's settings (here), and the admin side ([`admin`]:
//! finding and creating the topics Strata produces to).
//!
//! Nothing here decides what a record means or when an offset may move: that stays with the
//! pipeline and the commit protocol.

pub mod admin;
pub mod consumer;
pub mod event_loop;

use std::collections::BTreeMap;

use rdkafka::config::ClientConfig;

/// Properties only a consumer understands: a producer or admin client would warn about them.
const CONSUMER_ONLY: [&str; 6] = [
    "group.",
    "partition.assignment",
    "auto.",
    "session.timeout",
    "heartbeat.interval",
    "max.poll.interval",
];

/// A client's settings: the brokers and every `STRATA_KAFKA_*` property (security, SASL, TLS,
/// timeouts...) except those only a consumer understands.
pub fn client_config(brokers: &str, properties: &BTreeMap<String, String>) -> ClientConfig {
    let mut config = ClientConfig::new();
    pass_through(&mut config, brokers, properties);
    config
}

/// An idempotent producer's settings: acks from all replicas, in order, no duplicates from
/// internal retries, batches compressed with `compression` (`STRATA_PRODUCER_COMPRESSION`).
pub fn producer_config(
    brokers: &str,
    properties: &BTreeMap<String, String>,
    compression: &str,
) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("compression.type", compression);
    // The user's properties come last, so they can override the defaults above.
    pass_through(&mut config, brokers, properties);
    config
}

fn pass_through(config: &mut ClientConfig, brokers: &str, properties: &BTreeMap<String, String>) {
    config.set("bootstrap.servers", brokers);
    for (key, value) in properties {
        if !CONSUMER_ONLY.iter().any(|prefix| key.starts_with(prefix)) {
            config.set(key, value);
        }
    }
}

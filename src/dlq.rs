//! The dead-letter topic: a rejected record is republished to `<topic><suffix>` byte for byte (key,
//! value, headers) with headers saying why and where it came from. The pipeline treats a source
//! offset as handled only after this write is acknowledged by the broker.

use std::time::Duration;

use futures::future::join_all;
use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::backoff::Backoff;
use crate::models::{Rejection, SourceRecord};
use crate::wire;

pub const HEADER_KIND: &str = "strata.error.kind";
pub const HEADER_MESSAGE: &str = "strata.error.message";
pub const HEADER_TOPIC: &str = "strata.source.topic";
pub const HEADER_PARTITION: &str = "strata.source.partition";
pub const HEADER_OFFSET: &str = "strata.source.offset";
pub const HEADER_SCHEMA_ID: &str = "strata.source.schema_id";

/// An idempotent producer's settings: acks from all replicas, the user's librdkafka properties
/// except those only a consumer understands (they would be warned about or refused).
pub fn producer_config(
    brokers: &str,
    properties: &std::collections::BTreeMap<String, String>,
) -> ClientConfig {
    const CONSUMER_ONLY: [&str; 6] = [
        "group.",
        "partition.assignment",
        "auto.",
        "session.timeout",
        "heartbeat.interval",
        "max.poll.interval",
    ];
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5");
    for (key, value) in properties {
        if !CONSUMER_ONLY.iter().any(|prefix| key.starts_with(prefix)) {
            config.set(key, value);
        }
    }
    config
}

pub struct DeadLetters {
    producer: FutureProducer,
    suffix: String,
}

impl DeadLetters {
    pub fn new(
        brokers: &str,
        properties: &std::collections::BTreeMap<String, String>,
        suffix: &str,
    ) -> Result<Self, KafkaError> {
        let mut config = producer_config(brokers, properties);
        config.set("message.timeout.ms", "60000");
        Ok(Self {
            producer: config.create()?,
            suffix: suffix.to_string(),
        })
    }

    pub fn topic_for(&self, source_topic: &str) -> String {
        format!("{source_topic}{}", self.suffix)
    }

    /// Publishes all rejections and waits until every one is acknowledged. Retries a failed send
    /// until it succeeds: a dead letter is never dropped, and the offset never moves past it.
    pub async fn publish(&self, rejected: &[(&SourceRecord, &Rejection)]) {
        let sends = rejected
            .iter()
            .map(|(record, rejection)| self.publish_one(record, rejection));
        join_all(sends).await;
    }

    async fn publish_one(&self, record: &SourceRecord, rejection: &Rejection) {
        let topic = self.topic_for(&record.topic);
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        loop {
            let mut headers = OwnedHeaders::new_with_capacity(record.headers.len() + 6);
            for (key, value) in &record.headers {
                headers = headers.insert(Header {
                    key,
                    value: value.as_deref(),
                });
            }
            let partition = record.partition.to_string();
            let offset = record.offset.to_string();
            let schema_id = record
                .value
                .as_deref()
                .and_then(|v| wire::parse(v).ok())
                .map(|f| f.schema_id.to_string());
            headers = headers
                .insert(Header {
                    key: HEADER_KIND,
                    value: Some(rejection.kind.as_str()),
                })
                .insert(Header {
                    key: HEADER_MESSAGE,
                    value: Some(rejection.message.as_str()),
                })
                .insert(Header {
                    key: HEADER_TOPIC,
                    value: Some(record.topic.as_ref()),
                })
                .insert(Header {
                    key: HEADER_PARTITION,
                    value: Some(partition.as_str()),
                })
                .insert(Header {
                    key: HEADER_OFFSET,
                    value: Some(offset.as_str()),
                });
            if let Some(id) = &schema_id {
                headers = headers.insert(Header {
                    key: HEADER_SCHEMA_ID,
                    value: Some(id.as_str()),
                });
            }
            let mut out: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&topic).headers(headers);
            if let Some(key) = record.key.as_deref() {
                out = out.key(key);
            }
            if let Some(value) = record.value.as_deref() {
                out = out.payload(value);
            }
            if let Some(ts) = record.timestamp_ms {
                out = out.timestamp(ts);
            }
            match self.producer.send(out, Duration::from_secs(30)).await {
                Ok(_) => return,
                Err((e, _)) => {
                    tracing::warn!(topic, error = %e, "dead-letter write failed; retrying");
                    backoff.wait().await;
                }
            }
        }
    }
}

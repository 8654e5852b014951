//! The dead-letter topics: a rejected record is republished to its Bronze topic's dead-letter topic
//! (`STRATA_DLQ_TOPIC`, `{topic}.dlq` by default) byte for byte (key, value, headers) with headers
//! saying why and where it came from. The pipeline treats a source offset as handled only after
//! this write is acknowledged by the broker.
//!
//! Strata creates the dead-letter topics itself at start-up: production clusters do not create
//! topics on first use. A topic that cannot be created or written is never skipped: the records
//! that need it wait (nothing commits past them), the replica reports not ready naming the topic,
//! and a counter feeds an alert. Shutdown ends the wait at once.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;

use crate::kafka::producer::Producer;
use tokio_util::sync::CancellationToken;

use crate::config::DeadLetterConfig;
use crate::kafka::admin::{Admin, Ensured, TopicError, TopicSpec};
use crate::kafka::producer_config;
use crate::models::{Rejection, SourceRecord};
use crate::ops::Metrics;
use crate::retry::{Pace, Retry};
use crate::schema::wire;

pub const HEADER_KIND: &str = "strata.error.kind";
pub const HEADER_MESSAGE: &str = "strata.error.message";
pub const HEADER_TOPIC: &str = "strata.source.topic";
pub const HEADER_PARTITION: &str = "strata.source.partition";
pub const HEADER_OFFSET: &str = "strata.source.offset";
pub const HEADER_SCHEMA_ID: &str = "strata.source.schema_id";

/// Creates the dead-letter topics and names them.
#[derive(Clone)]
struct Topics {
    admin: Admin,
    settings: DeadLetterConfig,
    metrics: Arc<Metrics>,
}

impl Topics {
    fn name(&self, source_topic: &str) -> String {
        self.settings.topic_for(source_topic)
    }

    /// Makes sure the dead-letter topic of `source_topic` exists; the partition count follows the
    /// Bronze topic unless it is set.
    async fn ensure(&self, source_topic: &str) -> Result<Ensured, TopicError> {
        let name = self.name(source_topic);
        // One client for every step.
        let admin = self.admin.session(&name)?;
        let partitions =
            match self.settings.partitions {
                Some(n) => n,
                // Its partition count follows the Bronze topic's, which does not exist (yet).
                None => admin.partitions(source_topic).await?.ok_or_else(|| {
                    TopicError::Unavailable {
                        topic: source_topic.to_string(),
                        source: KafkaError::MetadataFetch(
                            RDKafkaErrorCode::UnknownTopicOrPartition,
                        ),
                    }
                })?,
            };
        // A dead letter is its Bronze record plus Strata's headers: the topic must take records
        // as large as the Bronze topic does, or a large bad record would never pass.
        let config = match admin.topic_config(source_topic, MAX_MESSAGE_BYTES).await {
            Some(limit) => match limit.parse::<u64>() {
                Ok(limit) => vec![(
                    MAX_MESSAGE_BYTES.to_string(),
                    (limit + HEADER_ROOM).to_string(),
                )],
                Err(_) => Vec::new(),
            },
            None => Vec::new(),
        };
        let spec = TopicSpec {
            name,
            partitions,
            replication: self.settings.replication,
            config,
        };
        let ensured = admin.ensure(&spec).await?;
        if let Ensured::Created { partitions } = ensured {
            self.metrics.dead_letter_topic_created(
                &spec.name,
                partitions,
                &spec.replication_text(),
            );
        }
        Ok(ensured)
    }

    /// Retries the topics that could not be made at start-up until they exist or `stop`: an
    /// operator may grant the permission, or the cluster come back, at any time.
    async fn create_until_done(self, mut missing: Vec<String>, stop: CancellationToken) {
        let mut retry = Retry::new(Pace::Operator, &stop);
        while !missing.is_empty() {
            if !retry.wait().await {
                return;
            }
            let mut still = Vec::new();
            for source in missing {
                match self.ensure(&source).await {
                    Ok(_) => self.metrics.dead_letter_writable(&self.name(&source)),
                    Err(e) => {
                        self.metrics
                            .dead_letter_blocked(&self.name(&source), &e.to_string());
                        still.push(source);
                    }
                }
            }
            missing = still;
        }
    }
}

/// The topic setting that bounds a record's size.
const MAX_MESSAGE_BYTES: &str = "max.message.bytes";

/// Room for the headers Strata adds to a dead letter (reason, source topic, partition, offset,
/// schema id) beyond the Bronze record's own size.
const HEADER_ROOM: u64 = 64 * 1024;

/// A send not acknowledged after this long makes the topic count as blocked (readiness, alert),
/// although librdkafka keeps trying it.
const SLOW_ACK: Duration = Duration::from_secs(10);

/// Shutdown came while a dead letter still waited for its acknowledgement: the records from it on
/// must not be committed, and are read again by the next owner.
#[derive(Debug, thiserror::Error)]
#[error("shut down while a dead letter waited to be written")]
pub struct Interrupted;

pub struct DeadLetters {
    producer: Producer,
    topics: Topics,
    shutdown: CancellationToken,
}

impl DeadLetters {
    pub fn new(
        brokers: &str,
        properties: &BTreeMap<String, String>,
        settings: &DeadLetterConfig,
        compression: &str,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Result<Self, KafkaError> {
        let mut config = producer_config(brokers, properties, compression);
        config.set("message.timeout.ms", "60000");
        // A dead letter may be as large as any Bronze record (plus headers); the broker's topic
        // limit decides, not librdkafka's 1 MB default. The user's setting wins.
        if !properties.contains_key("message.max.bytes") {
            config.set("message.max.bytes", "104857600");
        }
        Ok(Self {
            producer: Producer::create(&config)?,
            topics: Topics {
                admin: Admin::new(brokers, properties)?,
                settings: settings.clone(),
                metrics,
            },
            shutdown,
        })
    }

    fn topic_for(&self, source_topic: &str) -> String {
        self.topics.name(source_topic)
    }

    /// Start-up: creates the dead-letter topic of every Bronze topic that lacks one, before any
    /// dead letter is due. A topic that cannot be made (no permission, a refusal, an outage)
    /// keeps the replica not ready, naming it, and is tried again in the background; records
    /// that need it wait for it.
    pub async fn prepare(&self, sources: &[String]) {
        let mut missing = Vec::new();
        for source in sources {
            self.topics
                .metrics
                .dead_letter_topic(&self.topic_for(source));
            if let Err(e) = self.topics.ensure(source).await {
                self.topics
                    .metrics
                    .dead_letter_blocked(&self.topic_for(source), &e.to_string());
                missing.push(source.clone());
            }
        }
        if !missing.is_empty() {
            let topics = self.topics.clone();
            tokio::spawn(topics.create_until_done(missing, self.shutdown.clone()));
        }
    }

    /// Publishes all rejections and waits until every one is acknowledged. A failed send is
    /// retried until it succeeds: a dead letter is never dropped, and the offset never moves
    /// past it. Only shutdown ends the wait, with [`Interrupted`].
    pub async fn publish(
        &self,
        rejected: &[(&SourceRecord, &Rejection)],
    ) -> Result<(), Interrupted> {
        let sends = rejected
            .iter()
            .map(|(record, rejection)| self.publish_one(record, rejection));
        join_all(sends).await.into_iter().collect()
    }

    async fn publish_one(
        &self,
        record: &SourceRecord,
        rejection: &Rejection,
    ) -> Result<(), Interrupted> {
        let metrics = &self.topics.metrics;
        let topic = self.topic_for(&record.topic);
        let mut retry = Retry::new(Pace::Outage, &self.shutdown);
        let mut blocked = false;
        loop {
            let send = self
                .producer
                .send(letter(&topic, record, rejection), Duration::from_secs(30));
            tokio::pin!(send);
            let slow = tokio::time::sleep(SLOW_ACK);
            tokio::pin!(slow);
            let result = loop {
                tokio::select! {
                    result = &mut send => break result,
                    () = &mut slow, if !blocked => {
                        blocked = true;
                        metrics.dead_letter_blocked(&topic, "no acknowledgement within 10 s");
                    }
                    () = self.shutdown.cancelled() => return Err(Interrupted),
                }
            };
            match result {
                Ok(_) => {
                    // Also clears a refusal seen at start-up: the topic takes writes now.
                    metrics.dead_letter_writable(&topic);
                    return Ok(());
                }
                Err((e, _)) => {
                    blocked = true;
                    metrics.dead_letter_write_failed(&topic, &e.to_string());
                    if matches!(
                        e.rdkafka_error_code(),
                        Some(
                            RDKafkaErrorCode::UnknownTopicOrPartition
                                | RDKafkaErrorCode::UnknownTopic
                        )
                    ) {
                        // Deleted since start-up, or not made yet: make it (again). Asking the
                        // cluster can take seconds; shutdown does not wait for it.
                        tokio::select! {
                            ensured = self.topics.ensure(&record.topic) => {
                                if let Err(why) = ensured {
                                    metrics.dead_letter_blocked(&topic, &why.to_string());
                                }
                            }
                            () = self.shutdown.cancelled() => return Err(Interrupted),
                        }
                    }
                    if !retry.wait().await {
                        return Err(Interrupted);
                    }
                }
            }
        }
    }
}

/// The dead letter of `record`: its key, value, timestamp and headers as consumed, plus headers
/// saying why and where it came from.
fn letter<'a>(
    topic: &'a str,
    record: &'a SourceRecord,
    rejection: &Rejection,
) -> FutureRecord<'a, [u8], [u8]> {
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
    let mut out: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).headers(headers);
    if let Some(key) = record.key.as_deref() {
        out = out.key(key);
    }
    if let Some(value) = record.value.as_deref() {
        out = out.payload(value);
    }
    if let Some(ts) = record.timestamp_ms {
        out = out.timestamp(ts);
    }
    out
}

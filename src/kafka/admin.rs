//! Finding and creating the topics Strata produces to (dead-letter topics, the partials topic).
//!
//! Production clusters turn automatic topic creation off, so Strata creates what it writes to,
//! with the Admin API, and tells a refusal (no ACL, a name or setting the broker rejects) apart
//! from an outage: a refusal needs an operator, an outage is waited out.
//!
//! Metadata requests block in librdkafka: they run on the blocking pool, never on an async worker.
//!
//! A client lives for one piece of work ([`Session`]), not for the replica's life: rust-rdkafka's
//! admin client keeps a thread that wakes ten times a second for as long as it lives, and a replica
//! asks the cluster about topics a few times a run (at start-up, and when a dead-letter topic goes
//! missing). In the bench, the one kept for the whole run took 5 to 35 ns of CPU per record.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

/// What a topic Strata creates looks like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSpec {
    pub name: String,
    pub partitions: i32,
    /// `None`: the cluster's `default.replication.factor`.
    pub replication: Option<i32>,
    /// Topic configuration (`retention.ms`, ...), set at creation only.
    pub config: Vec<(String, String)>,
}

impl TopicSpec {
    pub fn replication_text(&self) -> String {
        self.replication
            .map_or_else(|| "cluster default".to_string(), |r| r.to_string())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TopicError {
    /// The principal may not do this: an operator has to grant the permission.
    #[error("not allowed to {operation} topic {topic}: grant the principal {permission} ({code})")]
    Denied {
        topic: String,
        operation: &'static str,
        permission: &'static str,
        code: RDKafkaErrorCode,
    },
    /// The broker refused the topic as asked (its name, partitions or replication).
    #[error("the broker refused to create topic {topic}: {code}")]
    Refused {
        topic: String,
        code: RDKafkaErrorCode,
    },
    /// The cluster could not be asked (unreachable, timed out): worth retrying.
    #[error("asking the cluster about topic {topic}: {source}")]
    Unavailable { topic: String, source: KafkaError },
}

impl TopicError {
    /// A refusal stays a refusal until an operator acts; an outage may pass by itself.
    pub fn needs_operator(&self) -> bool {
        !matches!(self, TopicError::Unavailable { .. })
    }
}

/// What [`Admin::ensure`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ensured {
    Existed { partitions: i32 },
    Created { partitions: i32 },
}

impl Ensured {
    pub fn partitions(self) -> i32 {
        match self {
            Ensured::Existed { partitions } | Ensured::Created { partitions } => partitions,
        }
    }
}

/// The user's connection settings (security included) for admin clients.
#[derive(Clone)]
pub struct Admin {
    config: Arc<ClientConfig>,
}

/// An admin client for one piece of work (a topic looked up, or made). It is destroyed on the
/// blocking pool when dropped: destroying it waits for its polling thread (up to 100 ms) and for
/// librdkafka's threads.
pub struct Session {
    /// `None` only while dropping.
    client: Option<Arc<AdminClient<DefaultClientContext>>>,
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => drop(runtime.spawn_blocking(move || drop(client))),
                Err(_) => drop(client),
            }
        }
    }
}

impl Admin {
    /// Checks the settings (a property librdkafka does not know fails here, at start-up); no
    /// client is made until one is needed.
    pub fn new(brokers: &str, properties: &BTreeMap<String, String>) -> Result<Self, KafkaError> {
        let mut config = super::client_config(brokers, properties);
        // Asking about a missing topic must never create it with the broker's defaults.
        config.set("allow.auto.create.topics", "false");
        config.create_native_config()?;
        Ok(Self {
            config: Arc::new(config),
        })
    }

    /// A new client, for the work on `topic` (named if it cannot be made).
    pub fn session(&self, topic: &str) -> Result<Session, TopicError> {
        let client = self
            .config
            .create()
            .map_err(|source| TopicError::Unavailable {
                topic: topic.to_string(),
                source,
            })?;
        Ok(Session {
            client: Some(Arc::new(client)),
        })
    }

    /// The partition count of `topic`, `None` when it does not exist.
    pub async fn partitions(&self, topic: &str) -> Result<Option<i32>, TopicError> {
        self.session(topic)?.partitions(topic).await
    }

    /// [`Session::topic_config`] with a client of its own.
    pub async fn topic_config(&self, topic: &str, name: &str) -> Option<String> {
        self.session(topic).ok()?.topic_config(topic, name).await
    }

    /// [`Session::ensure`] with a client of its own.
    pub async fn ensure(&self, spec: &TopicSpec) -> Result<Ensured, TopicError> {
        self.session(&spec.name)?.ensure(spec).await
    }
}

impl Session {
    fn client(&self, topic: &str) -> Result<&Arc<AdminClient<DefaultClientContext>>, TopicError> {
        self.client.as_ref().ok_or_else(|| TopicError::Unavailable {
            topic: topic.to_string(),
            source: KafkaError::AdminOpCreation("the admin client is gone".to_string()),
        })
    }

    /// One configuration value of `topic` (`None` when the cluster does not say: an old broker,
    /// no DESCRIBE_CONFIGS permission, or no such topic).
    pub async fn topic_config(&self, topic: &str, name: &str) -> Option<String> {
        let client = self.client(topic).ok()?;
        let resource = ResourceSpecifier::Topic(topic);
        let options = AdminOptions::new().request_timeout(Some(METADATA_TIMEOUT));
        let answer = client.describe_configs([&resource], &options).await;
        match answer {
            Ok(results) => results
                .into_iter()
                .filter_map(Result::ok)
                .find_map(|config| config.get(name).and_then(|e| e.value.clone())),
            Err(e) => {
                tracing::debug!(topic, name, error = %e, "describing the topic's configuration failed");
                None
            }
        }
    }

    /// Makes sure `spec.name` exists, creating it as `spec` says when it does not. Another
    /// replica creating it at the same moment is fine.
    pub async fn ensure(&self, spec: &TopicSpec) -> Result<Ensured, TopicError> {
        if let Some(partitions) = self.partitions(&spec.name).await? {
            return Ok(Ensured::Existed { partitions });
        }
        let replication = TopicReplication::Fixed(spec.replication.unwrap_or(-1));
        let mut topic = NewTopic::new(&spec.name, spec.partitions, replication);
        for (key, value) in &spec.config {
            topic = topic.set(key, value);
        }
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        let results = self
            .client(&spec.name)?
            .create_topics([&topic], &options)
            .await
            .map_err(|source| TopicError::Unavailable {
                topic: spec.name.clone(),
                source,
            })?;
        let mut created = false;
        for result in results {
            match result {
                Ok(_) => created = true,
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => return Err(classify_create_error(topic, code)),
            }
        }
        // Metadata may lag the creation a little (and on a cluster, its propagation).
        let mut wait = Duration::from_millis(100);
        for _ in 0..20 {
            // A leader still being elected reads as an error for a moment: keep waiting.
            if let Ok(Some(partitions)) = self.partitions(&spec.name).await {
                return Ok(if created {
                    Ensured::Created { partitions }
                } else {
                    Ensured::Existed { partitions }
                });
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(1));
        }
        Err(TopicError::Unavailable {
            topic: spec.name.clone(),
            source: KafkaError::MetadataFetch(RDKafkaErrorCode::UnknownTopicOrPartition),
        })
    }

    /// The partition count of `topic`, `None` when it does not exist.
    pub async fn partitions(&self, topic: &str) -> Result<Option<i32>, TopicError> {
        let client = self.client(topic)?.clone();
        let name = topic.to_string();
        let answer = tokio::task::spawn_blocking(move || {
            client
                .inner()
                .fetch_metadata(Some(&name), METADATA_TIMEOUT)
                .map(|metadata| {
                    metadata
                        .topics()
                        .iter()
                        .find(|t| t.name() == name)
                        .map(|t| (t.error(), t.partitions().len() as i32))
                })
        })
        .await
        .map_err(|e| TopicError::Unavailable {
            topic: topic.to_string(),
            source: KafkaError::AdminOpCreation(e.to_string()),
        })?;
        let unavailable = |source| TopicError::Unavailable {
            topic: topic.to_string(),
            source,
        };
        match answer.map_err(unavailable)? {
            None => Ok(None),
            Some((None, 0)) => Ok(None),
            Some((None, n)) => Ok(Some(n)),
            Some((Some(error), n)) => {
                let code = RDKafkaErrorCode::from(error);
                match code {
                    RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic => {
                        Ok(None)
                    }
                    RDKafkaErrorCode::TopicAuthorizationFailed => Err(TopicError::Denied {
                        topic: topic.to_string(),
                        operation: "describe",
                        permission: "DESCRIBE on the topic",
                        code,
                    }),
                    // Leader elections and the like: the topic is there.
                    _ if n > 0 => Ok(Some(n)),
                    _ => Err(unavailable(KafkaError::MetadataFetch(code))),
                }
            }
        }
    }
}

fn classify_create_error(topic: String, code: RDKafkaErrorCode) -> TopicError {
    match code {
        RDKafkaErrorCode::TopicAuthorizationFailed
        | RDKafkaErrorCode::ClusterAuthorizationFailed
        | RDKafkaErrorCode::PolicyViolation => TopicError::Denied {
            topic,
            operation: "create",
            permission: "CREATE on the topic or the cluster",
            code,
        },
        RDKafkaErrorCode::InvalidTopic
        | RDKafkaErrorCode::InvalidPartitions
        | RDKafkaErrorCode::InvalidReplicationFactor
        | RDKafkaErrorCode::InvalidReplicaAssignment
        | RDKafkaErrorCode::InvalidConfig
        | RDKafkaErrorCode::InvalidRequest
        | RDKafkaErrorCode::UnsupportedVersion
        | RDKafkaErrorCode::TopicDeletionDisabled => TopicError::Refused { topic, code },
        // Timeouts, controller moves, brokers not available: the next attempt may succeed.
        other => TopicError::Unavailable {
            topic,
            source: KafkaError::AdminOp(other),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_need_an_operator_and_outages_do_not() {
        let denied =
            classify_create_error("t.dlq".into(), RDKafkaErrorCode::TopicAuthorizationFailed);
        assert!(denied.needs_operator());
        let text = denied.to_string();
        assert!(text.contains("t.dlq") && text.contains("CREATE"), "{text}");
        let refused =
            classify_create_error("t.dlq".into(), RDKafkaErrorCode::InvalidReplicationFactor);
        assert!(matches!(refused, TopicError::Refused { .. }));
        assert!(refused.needs_operator());
        let outage = classify_create_error("t.dlq".into(), RDKafkaErrorCode::RequestTimedOut);
        assert!(!outage.needs_operator());
    }
}

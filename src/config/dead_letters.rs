//! Dead-letter settings: the topic name template, and how Strata creates the topics.

use std::collections::HashMap;

use super::{invalid, ConfigError};

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

    pub(super) fn from_vars(
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

//! Where schemas come from and how they are judged: the part of the configuration a replica and
//! `strata schemas check` share, read on its own so the check needs no replica variables.

use std::collections::HashMap;
use std::path::PathBuf;

use super::{invalid, value_of, ConfigError, RegistrySource, SubjectStrategy};
use crate::schema::compat::Compatibility;

/// The schema registry, the subject naming and the compatibility mode.
#[derive(Debug, Clone)]
pub struct SchemaSettings {
    pub registry: RegistrySource,
    pub strategy: SubjectStrategy,
    pub compatibility: Compatibility,
}

impl SchemaSettings {
    pub fn from_vars(vars: &HashMap<String, String>) -> Result<Self, ConfigError> {
        let get = |var: &'static str| value_of(vars, var);
        let required = |var: &'static str| super::required_of(vars, var);
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
        let compatibility =
            compatibility_text
                .parse()
                .map_err(|reason: crate::schema::compat::UnknownMode| {
                    invalid("STRATA_SCHEMA_COMPATIBILITY", &compatibility_text, reason)
                })?;
        Ok(Self {
            registry,
            strategy: subject_strategy,
            compatibility,
        })
    }
}

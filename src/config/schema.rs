//! Where schemas come from and how they are judged: the part of the configuration a replica and
//! `strata schemas check` share, read on its own so the check needs no replica variables.

use std::collections::HashMap;
use std::path::PathBuf;

use super::{invalid, value_of, ConfigError, RegistrySource, Secret, SubjectStrategy};
use crate::schema::compat::Compatibility;

/// How a Confluent registry is reached: its credentials and TLS material. The files are read and
/// checked when the client is built, at start-up.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RegistryAccess {
    pub auth: RegistryAuth,
    /// PEM file of the CA(s) the registry's certificate is checked against, besides the system's.
    pub ca_location: Option<PathBuf>,
    /// PEM files of the client certificate (chain) and its unencrypted private key (mutual TLS).
    pub identity: Option<(PathBuf, PathBuf)>,
}

/// The registry's credentials.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum RegistryAuth {
    #[default]
    None,
    /// `user:password` for HTTP basic auth.
    Basic(Secret),
    /// `Authorization: Bearer <token>`.
    Bearer(Secret),
}

impl std::fmt::Display for RegistryAccess {
    /// Says what is set, never a credential.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let auth = match self.auth {
            RegistryAuth::None => "no auth",
            RegistryAuth::Basic(_) => "basic auth (set)",
            RegistryAuth::Bearer(_) => "bearer token (set)",
        };
        write!(f, "{auth}")?;
        if let Some(ca) = &self.ca_location {
            write!(f, ", CA {}", ca.display())?;
        }
        if let Some((certificate, _)) = &self.identity {
            write!(f, ", client certificate {}", certificate.display())?;
        }
        Ok(())
    }
}

const CA_VAR: &str = "STRATA_SCHEMA_REGISTRY_SSL_CA_LOCATION";
const CERTIFICATE_VAR: &str = "STRATA_SCHEMA_REGISTRY_SSL_CERTIFICATE_LOCATION";
const KEY_VAR: &str = "STRATA_SCHEMA_REGISTRY_SSL_KEY_LOCATION";
const USER_INFO_VAR: &str = "STRATA_SCHEMA_REGISTRY_USER_INFO";
const TOKEN_VAR: &str = "STRATA_SCHEMA_REGISTRY_BEARER_TOKEN";

impl RegistryAccess {
    fn from_vars(vars: &HashMap<String, String>, url: &str) -> Result<Self, ConfigError> {
        let set = |var: &'static str| Some(value_of(vars, var)).filter(|v| !v.is_empty());
        let file = |var: &'static str| -> Result<Option<PathBuf>, ConfigError> {
            let Some(path) = set(var) else {
                return Ok(None);
            };
            if !url.starts_with("https://") {
                return Err(invalid(
                    var,
                    &path,
                    "TLS settings need an https:// registry URL",
                ));
            }
            match std::fs::metadata(&path) {
                Ok(meta) if meta.is_file() => Ok(Some(PathBuf::from(path))),
                Ok(_) => Err(invalid(var, &path, "not a file")),
                Err(e) => Err(invalid(var, &path, format!("cannot read it: {e}"))),
            }
        };
        let auth = match (set(USER_INFO_VAR), set(TOKEN_VAR)) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    TOKEN_VAR,
                    "",
                    format!("set either {USER_INFO_VAR} or {TOKEN_VAR}, not both"),
                ))
            }
            (Some(user_info), None) => RegistryAuth::Basic(Secret::new(user_info)),
            (None, Some(token)) => RegistryAuth::Bearer(Secret::new(token)),
            (None, None) => RegistryAuth::None,
        };
        let identity = match (file(CERTIFICATE_VAR)?, file(KEY_VAR)?) {
            (Some(certificate), Some(key)) => Some((certificate, key)),
            (None, None) => None,
            (Some(_), None) => {
                return Err(invalid(
                    KEY_VAR,
                    "",
                    format!("{CERTIFICATE_VAR} is set: mutual TLS needs the key too"),
                ))
            }
            (None, Some(_)) => {
                return Err(invalid(
                    CERTIFICATE_VAR,
                    "",
                    format!("{KEY_VAR} is set: mutual TLS needs the certificate too"),
                ))
            }
        };
        Ok(Self {
            auth,
            ca_location: file(CA_VAR)?,
            identity,
        })
    }
}

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
            // Credentials in the URL would be printed wherever the URL is: they have a variable.
            if let Ok(mut parsed) = url::Url::parse(&registry_url) {
                if !parsed.username().is_empty() || parsed.password().is_some() {
                    let _ = parsed.set_username("");
                    let _ = parsed.set_password(None);
                    return Err(invalid(
                        "STRATA_SCHEMA_REGISTRY_URL",
                        parsed.as_str(),
                        "credentials in the URL: set STRATA_SCHEMA_REGISTRY_USER_INFO instead",
                    ));
                }
            }
            RegistrySource::Confluent {
                access: RegistryAccess::from_vars(vars, &registry_url)?,
                url: registry_url.trim_end_matches('/').to_string(),
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

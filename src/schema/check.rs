//! `strata schemas check`: compares reader schema files with the registry's subjects under the
//! configured compatibility, so a producer team can gate its CI on it. The verdict is
//! `apache-avro`'s checker (see `compat`); the field-level list of changes is there for people.
//!
//! Exit codes: 0 every file is compatible (or its subject is new), 1 some file is incompatible,
//! 2 the check could not run (configuration, unreadable file, registry unreachable).

use std::fmt::Write as _;
use std::path::PathBuf;

use crate::config::{schema_files, RegistrySource, SubjectStrategy};
use crate::schema::compat::{field_changes, Compatibility};
use crate::schema::reader::ReaderSchema;
use crate::schema::registry::{RegistryError, SchemaRegistry};

/// What the check needs: a subset of the replica's variables.
pub struct CheckSettings {
    pub registry: RegistrySource,
    pub compatibility: Compatibility,
    pub strategy: SubjectStrategy,
    pub topics: Vec<String>,
    pub files: Vec<PathBuf>,
}

impl CheckSettings {
    /// From the environment and the command's arguments (schema files or folders; `schemas/` when
    /// none are given).
    pub fn from_env(args: &[String]) -> Result<Self, CheckSetupError> {
        let vars: std::collections::HashMap<String, String> = std::env::vars().collect();
        let schema = crate::config::SchemaSettings::from_vars(&vars)?;
        let topics: Vec<String> = vars
            .get("STRATA_TOPICS")
            .map(String::as_str)
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(String::from)
            .collect();
        if topics.is_empty() && schema.strategy != SubjectStrategy::Record {
            return Err(CheckSetupError::NoTopics(schema.strategy));
        }
        let paths = if args.is_empty() {
            "schemas".to_string()
        } else {
            args.join(",")
        };
        let files = schema_files(&paths)?;
        Ok(Self {
            registry: schema.registry,
            compatibility: schema.compatibility,
            strategy: schema.strategy,
            topics,
            files,
        })
    }
}

/// Why `strata schemas check` cannot start.
#[derive(Debug, thiserror::Error)]
pub enum CheckSetupError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("STRATA_TOPICS is required: subjects are named after topics under STRATA_SUBJECT_NAME_STRATEGY={0:?}")]
    NoTopics(SubjectStrategy),
    #[error("schema files: {0}")]
    Files(#[from] crate::config::SchemaFilesError),
}

/// The outcome of one file against one subject.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Compatible with the versions the mode looks at (how many).
    Compatible(usize),
    /// Already registered, as this version.
    Registered(i32),
    /// The subject does not exist yet: any schema may start it.
    NewSubject,
    /// Incompatible: the checker's reasons and the field-level changes against the latest version.
    Incompatible {
        reasons: Vec<String>,
        changes: Vec<String>,
    },
}

/// Runs the check and writes a report; returns the exit code.
pub async fn run(settings: &CheckSettings, out: &mut String) -> u8 {
    let registry = match SchemaRegistry::from_config(&settings.registry) {
        Ok(registry) => registry,
        Err(e) => {
            let _ = writeln!(out, "error: {e}");
            return 2;
        }
    };
    let mut worst = 0;
    for file in &settings.files {
        let reader = match ReaderSchema::read(file) {
            Ok(mut readers) if readers.len() == 1 => readers.remove(0),
            Ok(_) => {
                let _ = writeln!(
                    out,
                    "error: {}: a union of records; check one file per record type",
                    file.display()
                );
                worst = 2;
                continue;
            }
            Err(e) => {
                let _ = writeln!(out, "error: {e}");
                worst = 2;
                continue;
            }
        };
        let subjects: Vec<String> = if settings.strategy == SubjectStrategy::Record {
            vec![settings.strategy.subject("", &reader.record)]
        } else {
            settings
                .topics
                .iter()
                .map(|t| settings.strategy.subject(t, &reader.record))
                .collect()
        };
        for subject in subjects {
            let verdict = check_one(&registry, settings.compatibility, &reader, &subject).await;
            let _ = write!(out, "{} → subject {subject}: ", file.display());
            match verdict {
                Ok(Verdict::Compatible(n)) => {
                    let _ = writeln!(
                        out,
                        "compatible ({}, checked against {n} version{})",
                        settings.compatibility,
                        if n == 1 { "" } else { "s" }
                    );
                }
                Ok(Verdict::Registered(version)) => {
                    let _ = writeln!(out, "already registered as version {version}");
                }
                Ok(Verdict::NewSubject) => {
                    let _ = writeln!(out, "new subject (nothing to be compatible with)");
                }
                Ok(Verdict::Incompatible { reasons, changes }) => {
                    worst = worst.max(1);
                    let _ = writeln!(out, "INCOMPATIBLE under {}", settings.compatibility);
                    for reason in reasons {
                        let _ = writeln!(out, "  - {reason}");
                    }
                    if !changes.is_empty() {
                        let _ = writeln!(out, "  changes against the latest version:");
                        for change in changes {
                            let _ = writeln!(out, "    * {change}");
                        }
                    }
                }
                Err(e) => {
                    worst = 2;
                    let _ = writeln!(out, "error: {e}");
                }
            }
        }
    }
    worst
}

/// Checks one reader schema against every version of `subject`.
pub async fn check_one(
    registry: &SchemaRegistry,
    compatibility: Compatibility,
    reader: &ReaderSchema,
    subject: &str,
) -> Result<Verdict, RegistryError> {
    let versions = match registry.all_versions(subject).await {
        Ok(versions) => versions,
        Err(RegistryError::SubjectNotFound { .. }) => return Ok(Verdict::NewSubject),
        Err(e) => return Err(e),
    };
    let candidate =
        apache_avro::Schema::parse_str(&reader.json).map_err(|e| RegistryError::Unexpected {
            status: 0,
            code: None,
            message: format!("reader schema: {e}"),
        })?;
    let mut parsed = Vec::with_capacity(versions.len());
    for version in &versions {
        let schema = apache_avro::Schema::parse_str(&version.schema).map_err(|e| {
            RegistryError::Unexpected {
                status: 200,
                code: None,
                message: format!(
                    "version {} of {subject} is not valid Avro: {e}",
                    version.version
                ),
            }
        })?;
        // The same JSON (defaults included: Avro's canonical form drops them).
        if json_eq(&version.schema, &reader.json) {
            return Ok(Verdict::Registered(version.version));
        }
        parsed.push((format!("version {}", version.version), schema));
    }
    let previous: Vec<(String, &apache_avro::Schema)> =
        parsed.iter().map(|(n, s)| (n.clone(), s)).collect();
    let reasons = compatibility.problems(&candidate, &previous);
    if reasons.is_empty() {
        let checked = if compatibility.is_transitive() {
            previous.len()
        } else {
            previous.len().min(1)
        };
        return Ok(Verdict::Compatible(checked));
    }
    let changes = parsed
        .last()
        .map(|(_, latest)| field_changes(latest, &candidate))
        .unwrap_or_default();
    Ok(Verdict::Incompatible {
        reasons: reasons.iter().map(ToString::to_string).collect(),
        changes,
    })
}

fn json_eq(a: &str, b: &str) -> bool {
    match (
        serde_json::from_str::<serde_json::Value>(a),
        serde_json::from_str::<serde_json::Value>(b),
    ) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

//! Schema compatibility with exactly Confluent's meanings, decided by `apache-avro`'s checker (no
//! hand-written rules). "New" is a writer schema met on a topic; "previous" is the table's reader
//! schema (the last version), plus, for the transitive modes, every earlier writer version seen.
//!
//! - BACKWARD: a consumer using the new schema can read data written with the previous one.
//! - FORWARD: data written with the new schema can be read by a consumer using the previous one.
//! - FULL: both. The `_TRANSITIVE` modes check against all previous versions, not just the last.

use std::fmt;
use std::str::FromStr;

use apache_avro::schema_compatibility::SchemaCompatibility;
use apache_avro::Schema;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compatibility {
    None,
    Backward,
    BackwardTransitive,
    Forward,
    ForwardTransitive,
    Full,
    FullTransitive,
}

/// A compatibility mode Strata does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown mode {0:?} (BACKWARD, BACKWARD_TRANSITIVE, FORWARD, FORWARD_TRANSITIVE, FULL, FULL_TRANSITIVE or NONE)")]
pub struct UnknownMode(pub String);

/// One incompatibility: the mode, the version it is against, and the checker's reason (which
/// names the field).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not {mode} compatible with {version}: {reason}")]
pub struct Incompatible {
    pub mode: Compatibility,
    pub version: String,
    pub reason: String,
}

impl FromStr for Compatibility {
    type Err = UnknownMode;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Ok(match text.trim().to_ascii_uppercase().as_str() {
            "NONE" => Compatibility::None,
            "BACKWARD" => Compatibility::Backward,
            "BACKWARD_TRANSITIVE" => Compatibility::BackwardTransitive,
            "FORWARD" => Compatibility::Forward,
            "FORWARD_TRANSITIVE" => Compatibility::ForwardTransitive,
            "FULL" => Compatibility::Full,
            "FULL_TRANSITIVE" => Compatibility::FullTransitive,
            other => return Err(UnknownMode(other.to_string())),
        })
    }
}

impl fmt::Display for Compatibility {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Compatibility::None => "NONE",
            Compatibility::Backward => "BACKWARD",
            Compatibility::BackwardTransitive => "BACKWARD_TRANSITIVE",
            Compatibility::Forward => "FORWARD",
            Compatibility::ForwardTransitive => "FORWARD_TRANSITIVE",
            Compatibility::Full => "FULL",
            Compatibility::FullTransitive => "FULL_TRANSITIVE",
        })
    }
}

impl Compatibility {
    pub fn is_transitive(self) -> bool {
        matches!(
            self,
            Compatibility::BackwardTransitive
                | Compatibility::ForwardTransitive
                | Compatibility::FullTransitive
        )
    }

    fn backward(self) -> bool {
        matches!(
            self,
            Compatibility::Backward
                | Compatibility::BackwardTransitive
                | Compatibility::Full
                | Compatibility::FullTransitive
        )
    }

    fn forward(self) -> bool {
        matches!(
            self,
            Compatibility::Forward
                | Compatibility::ForwardTransitive
                | Compatibility::Full
                | Compatibility::FullTransitive
        )
    }

    /// Checks `new` against `previous`, oldest first and the last version last. Non-transitive
    /// modes look at the last one only. The error names the offending version and field.
    pub fn check(self, new: &Schema, previous: &[(String, &Schema)]) -> Result<(), Incompatible> {
        match self.problems(new, previous).into_iter().next() {
            Some(problem) => Err(problem),
            None => Ok(()),
        }
    }

    /// Every version `new` is incompatible with under this mode, each with the checker's reason.
    pub fn problems(self, new: &Schema, previous: &[(String, &Schema)]) -> Vec<Incompatible> {
        let against: &[(String, &Schema)] = if self.is_transitive() {
            previous
        } else {
            previous
                .last()
                .map(std::slice::from_ref)
                .unwrap_or_default()
        };
        let mut out = Vec::new();
        for (name, old) in against {
            // BACKWARD: the new schema reads what the old one wrote.
            let backward = self
                .backward()
                .then(|| SchemaCompatibility::can_read(old, new).err())
                .flatten();
            // FORWARD: the old schema reads what the new one writes.
            let forward = self
                .forward()
                .then(|| SchemaCompatibility::can_read(new, old).err())
                .flatten();
            if let Some(e) = backward.or(forward) {
                out.push(Incompatible {
                    mode: self,
                    version: name.clone(),
                    reason: describe(&e),
                });
            }
        }
        out
    }
}

/// The field-level changes from `old` to `new` of two record schemas, in words (for people; the
/// verdict is always the checker's).
pub fn field_changes(old: &Schema, new: &Schema) -> Vec<String> {
    let (Schema::Record(old), Schema::Record(new)) = (old, new) else {
        return vec!["the top-level type changed".to_string()];
    };
    let mut out = Vec::new();
    for field in &new.fields {
        match old.fields.iter().find(|f| f.name == field.name) {
            None if field.default.is_some() => {
                out.push(format!("field {} added, with a default", field.name))
            }
            None => out.push(format!("field {} added, without a default", field.name)),
            Some(before) if before.schema != field.schema => out.push(format!(
                "field {} changed type from {} to {}",
                field.name,
                kind(&before.schema),
                kind(&field.schema)
            )),
            Some(_) => {}
        }
    }
    for field in &old.fields {
        if !new.fields.iter().any(|f| f.name == field.name) {
            let default = if field.default.is_some() {
                "it had a default"
            } else {
                "it had no default"
            };
            out.push(format!("field {} removed ({default})", field.name));
        }
    }
    out
}

fn kind(schema: &Schema) -> String {
    serde_json::to_string(schema).unwrap_or_else(|_| format!("{:?}", schema))
}

/// The checker's message plus its causes (the nested cause names the inner field).
fn describe(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema(fields: &str) -> Schema {
        Schema::parse_str(&format!(
            r#"{{"type":"record","name":"Order","fields":[{fields}]}}"#
        ))
        .expect("schema")
    }

    const ID: &str = r#"{"name":"id","type":"long"}"#;

    fn check(mode: Compatibility, new: &Schema, previous: &[&Schema]) -> Result<(), String> {
        let named: Vec<(String, &Schema)> = previous
            .iter()
            .enumerate()
            .map(|(i, s)| (format!("v{}", i + 1), *s))
            .collect();
        mode.check(new, &named).map_err(|e| e.to_string())
    }

    #[test]
    fn parses_every_mode() {
        for text in [
            "NONE",
            "BACKWARD",
            "backward_transitive",
            "FORWARD",
            "FORWARD_TRANSITIVE",
            "FULL",
            "FULL_TRANSITIVE",
        ] {
            let mode: Compatibility = text.parse().expect(text);
            assert_eq!(mode.to_string(), text.to_ascii_uppercase());
        }
        assert!("SIDEWAYS".parse::<Compatibility>().is_err());
    }

    /// Confluent's documented cases for adding and deleting fields.
    #[test]
    fn adding_and_deleting_fields_follow_confluent() {
        let v1 = schema(ID);
        let with_default = schema(&format!(
            r#"{ID},{{"name":"coupon","type":["null","string"],"default":null}}"#
        ));
        let without_default = schema(&format!(r#"{ID},{{"name":"coupon","type":"string"}}"#));

        // Add a field with a default: allowed by all modes.
        for mode in [
            Compatibility::Backward,
            Compatibility::Forward,
            Compatibility::Full,
        ] {
            assert_eq!(check(mode, &with_default, &[&v1]), Ok(()), "{mode}");
        }
        // Add a field without a default: FORWARD only (the new reader has no value for old data).
        assert_eq!(
            check(Compatibility::Forward, &without_default, &[&v1]),
            Ok(())
        );
        let error = check(Compatibility::Backward, &without_default, &[&v1]).expect_err("backward");
        assert!(
            error.contains("coupon") && error.contains("BACKWARD"),
            "{error}"
        );
        assert!(check(Compatibility::Full, &without_default, &[&v1]).is_err());
        // Delete a field without a default: BACKWARD only (the old reader needs it).
        assert_eq!(
            check(Compatibility::Backward, &v1, &[&without_default]),
            Ok(())
        );
        let error = check(Compatibility::Forward, &v1, &[&without_default]).expect_err("forward");
        assert!(error.contains("coupon"), "{error}");
        // NONE accepts anything.
        assert_eq!(
            check(
                Compatibility::None,
                &schema(r#"{"name":"id","type":"string"}"#),
                &[&v1]
            ),
            Ok(())
        );
    }

    /// Transitive modes look at every earlier version; the plain ones at the last only.
    #[test]
    fn transitive_modes_check_every_earlier_version() {
        let v1 = schema(ID);
        let v2 = schema(&format!(
            r#"{ID},{{"name":"coupon","type":"string","default":""}}"#
        ));
        let v3 = schema(&format!(r#"{ID},{{"name":"coupon","type":"string"}}"#));
        // v3 reads v2's data (coupon present) but not v1's (no coupon, no default).
        assert_eq!(check(Compatibility::Backward, &v3, &[&v1, &v2]), Ok(()));
        let error =
            check(Compatibility::BackwardTransitive, &v3, &[&v1, &v2]).expect_err("transitive");
        assert!(error.contains("v1") && error.contains("coupon"), "{error}");

        // FORWARD with history [v3 (named "v1"), plain id (named "v2", the last)]: data written by
        // a plain-id schema is readable by the last version, but not by v3 (coupon, no default).
        let v4 = schema(ID);
        assert_eq!(check(Compatibility::Forward, &v4, &[&v3, &v1]), Ok(()));
        let error = check(Compatibility::ForwardTransitive, &v4, &[&v3, &v1])
            .expect_err("forward transitive");
        assert!(error.contains("v1") && error.contains("coupon"), "{error}");
        assert!(check(Compatibility::FullTransitive, &v4, &[&v3, &v1]).is_err());
        assert_eq!(check(Compatibility::Full, &v4, &[&v3, &v1]), Ok(()));
    }
}

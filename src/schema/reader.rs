//! Reader schemas: the shape each Silver table has, from a file or a registry subject version.
//! A record is one table; a top-level union of records is one table per branch. The table's name
//! is the record's short name in snake_case.

use crate::schema::registry::SubjectVersion;

/// A reader schema and where it came from.
#[derive(Debug, Clone)]
pub struct ReaderSchema {
    pub json: String,
    /// The record's full name (`shop.Order`): the routing key of its table.
    pub record: String,
    /// Under `latest`: the registry subject followed, and the schema id of this version.
    pub subject: Option<String>,
    pub id: Option<u32>,
}

/// A reader schema that cannot make a table. `origin` says where it came from (a file, a
/// subject version, a union branch).
#[derive(Debug, thiserror::Error)]
pub enum ReaderError {
    #[error("{origin}: top-level type must be a record, not {kind}")]
    NotARecord { origin: String, kind: String },
    #[error("{origin}: not a valid Avro schema: {reason}")]
    Invalid { origin: String, reason: String },
    #[error("{origin}: a top-level union without a record branch")]
    NoRecordBranch { origin: String },
    #[error("{origin}: {source}")]
    Unreadable {
        origin: String,
        source: std::io::Error,
    },
    #[error("subject {subject} version {version} has no record {record}")]
    NoSuchRecord {
        subject: String,
        version: i32,
        record: String,
    },
}

impl ReaderSchema {
    /// Parses `json`, which must be a record. `origin` names where it came from, for errors.
    pub fn parse(json: &str, origin: &str) -> Result<Self, ReaderError> {
        match apache_avro::Schema::parse_str(json) {
            Ok(apache_avro::Schema::Record(record)) => Ok(Self {
                json: json.to_string(),
                record: record.name.fullname(None),
                subject: None,
                id: None,
            }),
            Ok(other) => Err(ReaderError::NotARecord {
                origin: origin.to_string(),
                kind: format!("{:?}", apache_avro::schema::SchemaKind::from(&other)),
            }),
            Err(e) => Err(ReaderError::Invalid {
                origin: origin.to_string(),
                reason: e.to_string(),
            }),
        }
    }

    /// The record types of `json`: the record itself, or each record branch of a top-level union
    /// (one topic, several record types: each gets its own table).
    pub fn parse_all(json: &str, origin: &str) -> Result<Vec<Self>, ReaderError> {
        let Ok(apache_avro::Schema::Union(union)) = apache_avro::Schema::parse_str(json) else {
            return Self::parse(json, origin).map(|one| vec![one]);
        };
        let mut out = Vec::new();
        for (index, variant) in union.variants().iter().enumerate() {
            if let Some(branch) = branch_json(variant) {
                out.push(Self::parse(
                    &branch,
                    &format!("{origin}, union branch {index}"),
                )?);
            }
        }
        if out.is_empty() {
            return Err(ReaderError::NoRecordBranch {
                origin: origin.to_string(),
            });
        }
        Ok(out)
    }

    /// Reads a reader schema file (a record, or a union of records).
    pub fn read(path: &std::path::Path) -> Result<Vec<Self>, ReaderError> {
        let origin = format!("STRATA_READER_SCHEMA={}", path.display());
        let json = std::fs::read_to_string(path).map_err(|source| ReaderError::Unreadable {
            origin: origin.clone(),
            source,
        })?;
        Self::parse_all(&json, &origin)
    }

    /// The table name: the record's short name in snake_case.
    pub fn table_name(&self) -> String {
        snake_case(&self.record)
    }
}

/// A union branch as a standalone record schema, if it is a record that does not depend on types
/// defined in other branches.
pub fn branch_json(variant: &apache_avro::Schema) -> Option<String> {
    if !matches!(variant, apache_avro::Schema::Record(_)) {
        return None;
    }
    let json = serde_json::to_string(variant).ok()?;
    apache_avro::Schema::parse_str(&json).ok().map(|_| json)
}

/// The reader schemas of a subject version (several when it is a union of records), each
/// remembering the subject and id it came from.
pub fn readers_from_version(version: &SubjectVersion) -> Result<Vec<ReaderSchema>, ReaderError> {
    let mut readers = ReaderSchema::parse_all(
        &version.schema,
        &format!("subject {} version {}", version.subject, version.version),
    )?;
    for reader in &mut readers {
        reader.subject = Some(version.subject.clone());
        reader.id = Some(version.id);
    }
    Ok(readers)
}

/// The reader schema of record `record` in a subject version.
pub fn reader_from_version(
    version: &SubjectVersion,
    record: &str,
) -> Result<ReaderSchema, ReaderError> {
    readers_from_version(version)?
        .into_iter()
        .find(|r| r.record == record)
        .ok_or_else(|| ReaderError::NoSuchRecord {
            subject: version.subject.clone(),
            version: version.version,
            record: record.to_string(),
        })
}

/// The table's snake_case name from an Avro record name (`shop.OrderPlaced` → `order_placed`).
pub fn snake_case(record_name: &str) -> String {
    let short = record_name.rsplit('.').next().unwrap_or(record_name);
    let mut out = String::with_capacity(short.len() + 4);
    let chars: Vec<char> = short.chars().collect();
    for (i, &c) in chars.iter().enumerate() {
        if c.is_ascii_uppercase() {
            let prev_lower =
                i > 0 && (chars[i - 1].is_ascii_lowercase() || chars[i - 1].is_ascii_digit());
            let next_lower = chars.get(i + 1).is_some_and(|n| n.is_ascii_lowercase());
            if i > 0 && (prev_lower || (next_lower && chars[i - 1].is_ascii_uppercase())) {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else if c.is_ascii_alphanumeric() {
            out.push(c);
        } else {
            out.push('_');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snake_case_names() {
        assert_eq!(snake_case("shop.OrderPlaced"), "order_placed");
        assert_eq!(snake_case("HTTPRequest"), "http_request");
        assert_eq!(snake_case("Order"), "order");
        assert_eq!(snake_case("page_view2"), "page_view2");
    }
}

//! Schema references: a Confluent writer schema may name types that live in other subjects
//! (`"references": [{"name": …, "subject": …, "version": …}]`). Strata turns such a schema into
//! one self-contained schema text by writing each referenced named type in full where it is first
//! used, as if the producer had written it there. Everything downstream (compatibility checks,
//! resolution, decoding) then sees an ordinary schema.
//!
//! Names follow the Avro specification: a name without a dot takes the namespace of the nearest
//! enclosing named type, and a type is defined once, at its first appearance; later uses name it.

use std::collections::{HashMap, HashSet};

use serde_json::{Map, Value};

/// The primitive type names, which are never references.
const PRIMITIVES: [&str; 8] = [
    "null", "boolean", "int", "long", "float", "double", "bytes", "string",
];

/// Why a schema and its references could not be made into one schema.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InlineError {
    #[error("schema is not valid JSON: {0}")]
    Json(String),
    #[error("named type {0:?} is defined twice with different definitions")]
    Conflict(String),
}

/// Every named type (record, enum, fixed) a schema defines, by full name, each written with its
/// full name so that it can be placed anywhere.
pub fn named_types(schema_text: &str) -> Result<HashMap<String, Value>, InlineError> {
    let schema: Value =
        serde_json::from_str(schema_text).map_err(|e| InlineError::Json(e.to_string()))?;
    let mut found = HashMap::new();
    collect(&schema, "", &mut found)?;
    Ok(found)
}

/// `schema_text` with every name it uses that `library` defines (and that the schema does not
/// define itself) written out in full at its first use.
pub fn inline(schema_text: &str, library: &HashMap<String, Value>) -> Result<String, InlineError> {
    let mut schema: Value =
        serde_json::from_str(schema_text).map_err(|e| InlineError::Json(e.to_string()))?;
    let mut defined = HashSet::new();
    expand(&mut schema, "", library, &mut defined);
    Ok(schema.to_string())
}

/// The full name of `name` in `namespace`, and the namespace its children inherit.
fn full_name(name: &str, explicit_namespace: Option<&str>, enclosing: &str) -> String {
    if name.contains('.') {
        return name.to_string();
    }
    match explicit_namespace.unwrap_or(enclosing) {
        "" => name.to_string(),
        namespace => format!("{namespace}.{name}"),
    }
}

fn namespace_of(full: &str) -> &str {
    full.rsplit_once('.').map_or("", |(namespace, _)| namespace)
}

/// `{"type": "<a name>"}` without a logical type: the named type itself.
fn is_reference(object: &Map<String, Value>) -> bool {
    object.get("logicalType").is_none()
        && object.get("type").and_then(Value::as_str).is_some_and(|t| {
            !PRIMITIVES.contains(&t)
                && !matches!(t, "record" | "error" | "enum" | "fixed" | "array" | "map")
        })
}

fn is_named(object: &Map<String, Value>) -> bool {
    matches!(
        object.get("type").and_then(Value::as_str),
        Some("record" | "error" | "enum" | "fixed")
    ) && object.get("name").and_then(Value::as_str).is_some()
}

/// The definition's full name, with `name` rewritten to it; `namespace` is removed, or set to
/// the null namespace for a name without one (so it cannot take the namespace of wherever it is
/// written). An `error` (a record in Avro's protocol language) becomes a `record`.
fn qualify(object: &mut Map<String, Value>, enclosing: &str) -> String {
    let name = object
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let namespace = object.get("namespace").and_then(Value::as_str);
    let full = full_name(name, namespace, enclosing);
    object.insert("name".into(), Value::String(full.clone()));
    if full.contains('.') {
        object.remove("namespace");
    } else {
        object.insert("namespace".into(), Value::String(String::new()));
    }
    if object.get("type").and_then(Value::as_str) == Some("error") {
        object.insert("type".into(), Value::String("record".into()));
    }
    full
}

/// What `name` refers to in `namespace`: its full name in that namespace or, as Java's Avro (which
/// Confluent's registry runs) also tries, the name in the null namespace; with the definition to
/// write out when it has not been written yet.
fn lookup<'a>(
    name: &str,
    namespace: &str,
    library: &'a HashMap<String, Value>,
    defined: &HashSet<String>,
) -> Option<(String, Option<&'a Value>)> {
    let full = full_name(name, None, namespace);
    let mut candidates = vec![full];
    if !name.contains('.') {
        candidates.push(name.to_string());
    }
    candidates.into_iter().find_map(|candidate| {
        if defined.contains(&candidate) {
            Some((candidate, None))
        } else {
            library
                .get(&candidate)
                .map(|definition| (candidate, Some(definition)))
        }
    })
}

fn collect(
    schema: &Value,
    namespace: &str,
    found: &mut HashMap<String, Value>,
) -> Result<(), InlineError> {
    match schema {
        Value::Array(branches) => {
            for branch in branches {
                collect(branch, namespace, found)?;
            }
        }
        Value::Object(object) if is_named(object) => {
            let mut definition = object.clone();
            let full = qualify(&mut definition, namespace);
            if let Some(fields) = object.get("fields").and_then(Value::as_array) {
                for field in fields {
                    if let Some(kind) = field.get("type") {
                        collect(kind, namespace_of(&full), found)?;
                    }
                }
            }
            match found.get(&full) {
                Some(existing) if existing != &Value::Object(definition.clone()) => {
                    return Err(InlineError::Conflict(full));
                }
                _ => {
                    found.insert(full, Value::Object(definition));
                }
            }
        }
        Value::Object(object) => {
            for key in ["items", "values"] {
                if let Some(inner) = object.get(key) {
                    collect(inner, namespace, found)?;
                }
            }
        }
        _ => {}
    }
    Ok(())
}

fn expand(
    schema: &mut Value,
    namespace: &str,
    library: &HashMap<String, Value>,
    defined: &mut HashSet<String>,
) {
    match schema {
        Value::String(name) if !PRIMITIVES.contains(&name.as_str()) => {
            match lookup(name, namespace, library, defined) {
                // Written already: name it in full (its namespace may not be this one).
                Some((full, None)) => *schema = Value::String(full),
                Some((_, Some(definition))) => {
                    let mut definition = definition.clone();
                    expand(&mut definition, namespace, library, defined);
                    *schema = definition;
                }
                None => {}
            }
        }
        Value::Array(branches) => {
            for branch in branches {
                expand(branch, namespace, library, defined);
            }
        }
        Value::Object(object) if is_named(object) => {
            let full = qualify(object, namespace);
            if !defined.insert(full.clone()) {
                // Defined earlier (for instance inside another referenced type): name it here.
                *schema = Value::String(full);
                return;
            }
            if let Some(Value::Array(fields)) = object.get_mut("fields") {
                for field in fields {
                    if let Some(kind) = field.get_mut("type") {
                        expand(kind, namespace_of(&full), library, defined);
                    }
                }
            }
        }
        // `{"type": "shop.Address"}`: a reference in object form.
        Value::Object(object) if is_reference(object) => {
            if let Some(mut kind) = object.remove("type") {
                expand(&mut kind, namespace, library, defined);
                *schema = kind;
            }
        }
        Value::Object(object) => {
            for key in ["items", "values"] {
                if let Some(inner) = object.get_mut(key) {
                    expand(inner, namespace, library, defined);
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADDRESS: &str = r#"{"type": "record", "name": "Address", "namespace": "com.acme.common",
        "fields": [{"name": "city", "type": "string"},
                   {"name": "country", "type": {"type": "enum", "name": "Country", "symbols": ["DE", "FR"]}}]}"#;
    const MONEY: &str = r#"{"type": "fixed", "name": "com.acme.common.Money", "size": 8}"#;

    fn library(texts: &[&str]) -> HashMap<String, Value> {
        let mut all = HashMap::new();
        for text in texts {
            all.extend(named_types(text).expect("types"));
        }
        all
    }

    #[test]
    fn referenced_types_are_written_out_at_their_first_use_only() {
        let order = r#"{"type": "record", "name": "Order", "namespace": "com.acme.orders", "fields": [
            {"name": "ship_to", "type": "com.acme.common.Address"},
            {"name": "bill_to", "type": ["null", "com.acme.common.Address"]},
            {"name": "origin", "type": "com.acme.common.Country"},
            {"name": "price", "type": "com.acme.common.Money"},
            {"name": "id", "type": "long"}]}"#;
        let text = inline(order, &library(&[ADDRESS, MONEY])).expect("inline");
        let schema = apache_avro::Schema::parse_str(&text).expect("self-contained schema parses");
        let apache_avro::Schema::Record(record) = schema else {
            panic!("record expected: {text}");
        };
        assert_eq!(record.fields.len(), 5);
        assert_eq!(
            text.matches("\"city\"").count(),
            1,
            "Address is defined once: {text}"
        );
        assert_eq!(
            text.matches("\"symbols\"").count(),
            1,
            "Country once: {text}"
        );
    }

    #[test]
    fn a_type_the_schema_defines_itself_is_kept() {
        let own = r#"{"type": "record", "name": "Address", "namespace": "com.acme.common",
            "fields": [{"name": "street", "type": "string"}]}"#;
        let wrapper = format!(
            r#"{{"type": "record", "name": "W", "fields": [{{"name": "a", "type": {own}}}, {{"name": "b", "type": "com.acme.common.Address"}}]}}"#
        );
        let text = inline(&wrapper, &library(&[ADDRESS])).expect("inline");
        assert!(text.contains("street") && !text.contains("city"), "{text}");
    }

    #[test]
    fn references_of_references_are_resolved_and_relative_names_follow_their_namespace() {
        let line = r#"{"type": "record", "name": "Line", "namespace": "com.acme.orders",
            "fields": [{"name": "price", "type": "com.acme.common.Money"}, {"name": "next", "type": ["null", "Line"]}]}"#;
        let order = r#"{"type": "record", "name": "Order", "namespace": "com.acme.orders",
            "fields": [{"name": "lines", "type": {"type": "array", "items": "Line"}}]}"#;
        let text = inline(order, &library(&[line, MONEY])).expect("inline");
        apache_avro::Schema::parse_str(&text).expect("parses");
        assert!(text.contains("\"size\":8"), "{text}");
    }

    #[test]
    fn null_namespace_types_object_form_references_and_errors() {
        // A referenced type without a namespace, used from inside a namespaced record by its
        // bare name (Java's fallback; a second such use cannot be written in a form the Avro
        // parsers share, so it stays unresolved and the schema is refused), a reference in
        // object form, and an `error` type.
        let point =
            r#"{"type": "record", "name": "Point", "fields": [{"name": "x", "type": "int"}]}"#;
        let failure = r#"{"type": "error", "name": "Failure", "namespace": "shop",
            "fields": [{"name": "why", "type": "string"}]}"#;
        let order = r#"{"type": "record", "name": "Order", "namespace": "shop", "fields": [
            {"name": "at", "type": "Point"},
            {"name": "price", "type": {"type": "com.acme.common.Money"}},
            {"name": "again", "type": {"type": "com.acme.common.Money"}},
            {"name": "failure", "type": ["null", "Failure"]}]}"#;
        let text = inline(order, &library(&[point, failure, MONEY])).expect("inline");
        let schema = apache_avro::Schema::parse_str(&text).expect("parses");
        let apache_avro::Schema::Record(record) = schema else {
            panic!("record expected: {text}");
        };
        let apache_avro::Schema::Record(at) = &record.fields[0].schema else {
            panic!("Point written out: {text}");
        };
        assert_eq!(
            at.name.fullname(None),
            "Point",
            "kept in the null namespace: {text}"
        );
        assert!(
            matches!(&record.fields[1].schema, apache_avro::Schema::Fixed(_)),
            "object form written out: {text}"
        );
        assert!(
            matches!(&record.fields[2].schema, apache_avro::Schema::Ref { name } if name.fullname(None) == "com.acme.common.Money"),
            "the second use names it: {text}"
        );
    }

    #[test]
    fn conflicting_definitions_and_bad_json_are_errors_not_panics() {
        let other = r#"{"type": "fixed", "name": "com.acme.common.Money", "size": 16}"#;
        let mut all = named_types(MONEY).expect("types");
        let err = named_types(&format!("[{MONEY}, {other}]"));
        assert!(matches!(err, Err(InlineError::Conflict(_))), "{err:?}");
        all.extend(named_types(other).expect("types"));
        assert!(matches!(
            named_types("{not json"),
            Err(InlineError::Json(_))
        ));
        assert!(matches!(inline("[", &all), Err(InlineError::Json(_))));
    }
}

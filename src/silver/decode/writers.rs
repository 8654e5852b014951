//! Writer schemas as the registry answers them: each is checked against the reader schema under
//! the configured compatibility mode, and those accepted get an Arrow decoder that resolves them
//! to the reader. A refused writer keeps its reason, which becomes every such record's rejection.

use super::*;

impl BatchDecoder {
    /// Records the registry's answer for a writer schema id. Only record-level answers are accepted:
    /// a retryable registry error must be retried by the caller, never turned into a verdict.
    pub fn register(&mut self, schema_id: u32, answer: Result<&str, &RegistryError>) {
        if let Ok(writer_json) = answer {
            if !self.met.iter().any(|(id, _)| *id == schema_id) {
                self.met.push((schema_id, writer_json.to_string()));
            }
        }
        let verdict = match answer {
            Ok(writer_json) => match self.check_resolves(schema_id, writer_json) {
                Ok(writer) => {
                    self.history.push((schema_id, writer));
                    self.writers.insert(schema_id, writer_json.to_string());
                    self.decoders.remove(&schema_id);
                    return;
                }
                Err(rejection) => rejection,
            },
            Err(e @ RegistryError::NotFound { .. }) => {
                Rejection::new(ErrorKind::UnknownSchema, e.to_string())
            }
            Err(e @ RegistryError::NotAvro { .. }) => {
                Rejection::new(ErrorKind::UnsupportedSchemaType, e.to_string())
            }
            Err(_) => return,
        };
        if answer.is_err() {
            self.registry_refused.insert(schema_id, verdict.clone());
        }
        self.refused.insert(schema_id, verdict);
    }

    /// A writer schema is accepted when it passes the configured compatibility check and arrow-avro
    /// can resolve it to the reader schema.
    pub(super) fn check_resolves(
        &self,
        schema_id: u32,
        writer_json: &str,
    ) -> Result<apache_avro::Schema, Rejection> {
        let writer = apache_avro::Schema::parse_str(writer_json).map_err(|e| {
            Rejection::new(
                ErrorKind::IncompatibleSchema,
                format!("writer schema {schema_id} is not valid Avro: {e}"),
            )
        })?;
        // Which of the two is newer decides the direction of the check, as in a registry where
        // versions are ordered by registration (ids grow with it). A reader from a file has no id:
        // it counts as the newest, the consumer that upgraded first.
        let reader_is_newer = self.reader_id.is_none_or(|reader| reader > schema_id);
        let incompatible = |reason: String| {
            Rejection::new(
                ErrorKind::IncompatibleSchema,
                format!("writer schema {schema_id}: {reason}"),
            )
        };
        if reader_is_newer {
            let previous = [(format!("writer schema {schema_id}"), &writer)];
            self.compatibility
                .check(&self.reader_schema, &previous)
                .map_err(|e| incompatible(format!("the reader schema is {e}")))?;
        } else {
            let previous = [("the reader schema".to_string(), &self.reader_schema)];
            self.compatibility
                .check(&writer, &previous)
                .map_err(|e| incompatible(format!("it is {e}")))?;
        }
        // Transitive modes: also against every earlier writer version seen.
        if self.compatibility.is_transitive() {
            let earlier: Vec<(String, &apache_avro::Schema)> = self
                .history
                .iter()
                .filter(|(id, _)| *id < schema_id)
                .map(|(id, s)| (format!("writer schema {id}"), s))
                .collect();
            self.compatibility
                .check(&writer, &earlier)
                .map_err(|e| incompatible(format!("it is {e}")))?;
        }
        build_decoder(&self.reader_json, [(schema_id, writer_json)], 1)
            .map(|_| writer)
            .map_err(|e| {
                Rejection::new(
                    ErrorKind::IncompatibleSchema,
                    format!(
                        "writer schema {schema_id} cannot be resolved to the reader schema: {e}"
                    ),
                )
            })
    }

    /// The decoder of one writer schema, built on first use.
    pub(super) fn decoder(&mut self, schema_id: u32) -> Result<&mut Decoder, Rejection> {
        // One hash lookup per record: this runs for every record decoded.
        match self.decoders.entry(schema_id) {
            std::collections::hash_map::Entry::Occupied(entry) => Ok(entry.into_mut()),
            std::collections::hash_map::Entry::Vacant(entry) => {
                let writer = self.writers.get(&schema_id).ok_or_else(|| {
                    Rejection::new(
                        ErrorKind::UnknownSchema,
                        format!("schema id {schema_id} is not resolved"),
                    )
                })?;
                let built = build_decoder(
                    &self.reader_json,
                    [(schema_id, writer.as_str())],
                    self.batch_size,
                )
                .map_err(|e| {
                    Rejection::new(ErrorKind::DecodeError, format!("building decoder: {e}"))
                })?;
                Ok(entry.insert(built))
            }
        }
    }
}

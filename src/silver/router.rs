//! Writer schema id → table. Every id met for the first time is resolved once: its schema fetched
//! (a registry outage is waited out, never blamed on the record), its table found by record name
//! or, under `latest`, opened; a top-level union is routed branch by branch. The table's decoder
//! judges compatibility; a refusal becomes the route's dead-letter reason.

use crate::config::{ReaderSchemas, SubjectStrategy};
use crate::models::{ErrorKind, Rejection, SourceRecord, TopicPartition};
use crate::schema::lookup::{ask_registry, Answer, Ask};
use crate::schema::reader::reader_from_version;
use crate::schema::registry::RegistryError;
use crate::schema::wire;
use crate::schema::wire::frame_rejection;
use crate::silver::tables::{open_table, OpenError};

use super::pipeline::{PipelineError, Replica};
use super::routes::{Destination, Route};

impl Replica {
    /// Where one record goes, by its writer schema id's route.
    pub(super) fn destination(
        &self,
        record: &SourceRecord,
        reframed: &mut Vec<SourceRecord>,
    ) -> Destination {
        let frame = match record.value.as_deref().map(wire::parse) {
            Some(Ok(frame)) => frame,
            Some(Err(e)) => return Destination::Letter(frame_rejection(&e)),
            None => return Destination::Letter(frame_rejection(&wire::WireError::Empty)),
        };
        match self.routes.get(&frame.schema_id) {
            Some(Route::Table(index)) => Destination::Table(*index, None),
            Some(Route::Refused(rejection)) => Destination::Letter(rejection.clone()),
            Some(Route::Union(branches)) => {
                let Some((branch, used)) = wire::read_long(frame.body) else {
                    return Destination::Letter(Rejection::new(
                        ErrorKind::DecodeError,
                        "union branch index truncated or overlong".to_string(),
                    ));
                };
                match usize::try_from(branch).ok().and_then(|b| branches.get(b)) {
                    Some(Ok(index)) => {
                        let mut body = record.clone();
                        body.value = Some(
                            wire::frame(frame.schema_id, frame.body.get(used..).unwrap_or_default())
                                .into(),
                        );
                        reframed.push(body);
                        Destination::Table(*index, Some(reframed.len() - 1))
                    }
                    Some(Err(rejection)) => Destination::Letter(rejection.clone()),
                    None => Destination::Letter(Rejection::new(
                        ErrorKind::DecodeError,
                        format!(
                            "union branch {branch} does not exist in writer schema {} ({} branches)",
                            frame.schema_id,
                            branches.len()
                        ),
                    )),
                }
            }
            None => Destination::Letter(Rejection::new(
                ErrorKind::UnknownSchema,
                format!("schema id {} was not resolved", frame.schema_id),
            )),
        }
    }

    /// Routes every writer schema id of `records` not routed yet: fetches the schema, finds (or,
    /// under `latest`, opens) its table, follows the table's subject to its newest version, and has
    /// the table's decoder judge it. A registry outage is waited out (not ready meanwhile): it is
    /// never the record's fault. A table opened on the way may make a partition seek back
    /// (`reseek_behind`); the caller checks.
    pub(super) async fn resolve_schemas(
        &mut self,
        records: &[SourceRecord],
    ) -> Result<(), PipelineError> {
        let mut ids: Vec<(u32, &SourceRecord)> = Vec::new();
        for record in records {
            if let Some(frame) = record.value.as_deref().and_then(|v| wire::parse(v).ok()) {
                if !self.routes.contains_key(&frame.schema_id)
                    && !ids.iter().any(|(id, _)| *id == frame.schema_id)
                {
                    ids.push((frame.schema_id, record));
                }
            }
        }
        for (id, record) in ids {
            let writer = match self.ask(Ask::Id(id)).await {
                Answer::Schema(text) => text,
                Answer::Refused(e) => {
                    let kind = match e {
                        RegistryError::NotAvro { .. } => ErrorKind::UnsupportedSchemaType,
                        _ => ErrorKind::UnknownSchema,
                    };
                    self.routes
                        .insert(id, Route::Refused(Rejection::new(kind, e.to_string())));
                    continue;
                }
                // Leave the id unrouted: a shutdown must not wait for the registry.
                _ => return Ok(()),
            };
            self.metrics.schema_id_seen();
            let tp = TopicPartition::new(record.topic.clone(), record.partition);
            let variants = match apache_avro::Schema::parse_str(&writer) {
                Ok(apache_avro::Schema::Union(union)) => Some(union.variants().to_vec()),
                _ => None,
            };
            let route = match variants {
                None => match self.route_record(id, &tp, &writer).await? {
                    Ok(index) => Route::Table(index),
                    Err(rejection) => Route::Refused(rejection),
                },
                Some(variants) => {
                    let mut branches: Vec<Result<usize, Rejection>> = Vec::new();
                    for (branch, variant) in variants.iter().enumerate() {
                        let Some(json) = crate::schema::reader::branch_json(variant) else {
                            branches.push(Err(Rejection::new(
                                ErrorKind::UnknownRecordType,
                                format!("writer schema {id}: union branch {branch} is not a standalone record"),
                            )));
                            continue;
                        };
                        let routed = self.route_record(id, &tp, &json).await?;
                        // One branch per table: a table's decoder knows one schema per id.
                        let taken = routed
                            .as_ref()
                            .is_ok_and(|t| branches.iter().any(|b| b.as_ref() == Ok(t)));
                        branches.push(if taken {
                            Err(Rejection::new(
                                ErrorKind::UnknownRecordType,
                                format!("writer schema {id}: union branch {branch} has no table of its own"),
                            ))
                        } else {
                            routed
                        });
                    }
                    Route::Union(branches)
                }
            };
            self.routes.insert(id, route);
        }
        Ok(())
    }

    /// Routes one record schema (a writer, or a union branch registered under the union's id):
    /// its table, after following the table's subject and judging the schema there.
    pub(super) async fn route_record(
        &mut self,
        id: u32,
        tp: &TopicPartition,
        json: &str,
    ) -> Result<Result<usize, Rejection>, PipelineError> {
        let index = match self.route(id, tp, json).await? {
            Route::Table(index) => index,
            Route::Refused(rejection) => return Ok(Err(rejection)),
            Route::Union(_) => {
                return Ok(Err(Rejection::new(
                    ErrorKind::UnknownRecordType,
                    format!("writer schema {id}: nested unions are not routed"),
                )))
            }
        };
        self.follow_latest(index, tp).await?;
        let decoder = &mut self.tables.list[index].decoder;
        decoder.register(id, Ok(json));
        Ok(match decoder.verdict(id) {
            Some(Some(refused)) => Err(refused.clone()),
            _ => Ok(index),
        })
    }

    /// The table of a writer schema: by its record name; under `latest` with a record-based
    /// subject strategy, a record name met for the first time opens its table.
    pub(super) async fn route(
        &mut self,
        id: u32,
        tp: &TopicPartition,
        writer_json: &str,
    ) -> Result<Route, PipelineError> {
        let record = match apache_avro::Schema::parse_str(writer_json) {
            Ok(apache_avro::Schema::Record(r)) => Some(r.name.fullname(None)),
            _ => None,
        };
        if let Some(name) = &record {
            if let Some(index) = self.tables.by_record(name) {
                return Ok(Route::Table(index));
            }
            if self.config.reader_schemas == ReaderSchemas::Latest
                && self.config.subject_strategy != SubjectStrategy::Topic
            {
                let subject = self.config.subject_strategy.subject(&tp.topic, name);
                match self.ask(Ask::Latest(&subject)).await {
                    Answer::Version(version) => {
                        // A record type no table can be made for is dead-lettered; the replica
                        // goes on with the others.
                        let opened = match reader_from_version(&version, name) {
                            Ok(reader) => {
                                open_table(&self.config, reader, &self.metrics, &self.shutdown)
                                    .await?
                            }
                            Err(why) => Err(OpenError::Schema(why.to_string())),
                        };
                        let table = match opened {
                            Ok(table) => table,
                            Err(why) => {
                                tracing::error!(schema_id = id, %subject, reason = %why, "no table for this record type");
                                return Ok(Route::Refused(Rejection::new(
                                    ErrorKind::IncompatibleSchema,
                                    format!("writer schema {id}: no table can be made for record {name}: {why}"),
                                )));
                            }
                        };
                        self.metrics
                            .initialize(&self.config.topics, std::slice::from_ref(&table.name));
                        self.tables.list.push(table);
                        let index = self.tables.list.len() - 1;
                        let owned: Vec<TopicPartition> = self.parts.keys().cloned().collect();
                        self.claim_table(index, &owned).await?;
                        self.reseek_behind(index);
                        return Ok(Route::Table(index));
                    }
                    Answer::Refused(e) => {
                        tracing::warn!(schema_id = id, %subject, error = %e, "no subject for record type")
                    }
                    _ => {}
                }
            }
        }
        if self.tables.list.len() == 1 {
            // One table per topic (TopicNameStrategy): the compatibility check decides.
            return Ok(Route::Table(0));
        }
        Ok(Route::Refused(Rejection::new(
            ErrorKind::UnknownRecordType,
            format!(
                "writer schema {id} is {}; no Silver table is fed by it (tables: {})",
                record.map_or("not a record".to_string(), |r| format!("record {r}")),
                self.tables.names().join(", ")
            ),
        )))
    }

    /// One registry question, retried while the registry is unavailable (not ready meanwhile).
    pub(super) async fn ask(&self, question: Ask<'_>) -> Answer {
        ask_registry(&self.registry, &self.metrics, &self.shutdown, question).await
    }
}

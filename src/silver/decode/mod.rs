//! Confluent-framed Avro straight into Arrow, resolved from each writer schema to the table's reader
//! schema, with one verdict per record: a row of the output batch, or a [`Rejection`] with its reason.
//!
//! This module is pure and synchronous: the pipeline fetches unknown writer schemas first and hands
//! them in with [`BatchDecoder::register`]. It must never let one bad record corrupt or drop its
//! neighbours: after any decode error the Arrow decoder is rebuilt and the good records replayed.

use std::collections::BTreeMap;

use rustc_hash::FxHashMap;
use std::sync::Arc;

use arrow_avro::reader::{Decoder, ReaderBuilder};
use arrow_avro::schema::{AvroSchema, Fingerprint, FingerprintAlgorithm, SchemaStore};
use deltalake::arrow::array::{
    Array, ArrayRef, BooleanArray, Int32Array, Int64Array, RecordBatch, StringArray,
    TimestampMicrosecondArray,
};
use deltalake::arrow::compute::{cast, interleave_record_batch};
use deltalake::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};

use crate::models::{ErrorKind, Rejection, SourceRecord};
use crate::schema::compat::Compatibility;
use crate::schema::registry::RegistryError;
use crate::schema::wire;

/// The lineage column with the Kafka record's timestamp (microseconds).
pub const KAFKA_TIMESTAMP: &str = LINEAGE_COLUMNS[3];

/// Lineage columns appended to every Silver row, in this order.
pub const LINEAGE_COLUMNS: [&str; 6] = [
    "_topic",
    "_partition",
    "_offset",
    "_kafka_timestamp",
    "_schema_id",
    "_ingested_at",
];

const UTC: &str = "UTC";

/// Default of `STRATA_MAX_VALUE_BYTES`: Kafka's default `message.max.bytes` is about 1 MiB.
pub const DEFAULT_MAX_VALUE_BYTES: usize = 8 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum DecoderSetupError {
    #[error("reader schema is not valid Avro: {0}")]
    ReaderSchema(String),
    #[error("STRATA_EVENT_TIME_FIELD={field:?}: {reason}")]
    EventTime { field: String, reason: String },
}

/// What one call of [`BatchDecoder::decode`] produced.
#[derive(Debug, Default)]
pub struct Decoded {
    /// Accepted records as lake-ready rows (reader fields, then lineage columns), in input order.
    pub batch: Option<RecordBatch>,
    /// Rejected records: index into the input slice and why.
    pub rejected: Vec<(usize, Rejection)>,
}

/// The state of one [`BatchDecoder::decode`] call.
struct Chunk<'a> {
    records: &'a [&'a SourceRecord],
    /// Decoded batches, and for each the input index of each of its rows.
    batches: Vec<RecordBatch>,
    rows: Vec<Vec<usize>>,
    /// Per writer schema id: input indices of the rows still inside its decoder. A chunk holds a
    /// few writer versions at most, so a list searched from the front beats a hash map here.
    pending: Vec<(u32, Vec<usize>)>,
    /// Writer ids whose verdict this chunk has checked already (see [`BatchDecoder::admit`]).
    admitted: Vec<u32>,
    rejected: Vec<(usize, Rejection)>,
}

impl Chunk<'_> {
    /// The rows inside `schema_id`'s decoder, created empty when there are none.
    fn pending_mut(&mut self, schema_id: u32) -> &mut Vec<usize> {
        let slot = match self.pending.iter().position(|(id, _)| *id == schema_id) {
            Some(slot) => slot,
            None => {
                self.pending.push((schema_id, Vec::new()));
                self.pending.len() - 1
            }
        };
        &mut self.pending[slot].1
    }

    fn pending_len(&self, schema_id: u32) -> usize {
        self.pending
            .iter()
            .find(|(id, _)| *id == schema_id)
            .map_or(0, |(_, rows)| rows.len())
    }

    /// Takes `schema_id`'s pending rows out (empty when there are none).
    fn take_pending(&mut self, schema_id: u32) -> Vec<usize> {
        match self.pending.iter().position(|(id, _)| *id == schema_id) {
            Some(slot) => self.pending.swap_remove(slot).1,
            None => Vec::new(),
        }
    }
}

/// Decodes chunks of Kafka records of one table.
pub struct BatchDecoder {
    reader_json: String,
    /// The reader's registry id, when it came from the registry (orders it among the writers).
    reader_id: Option<u32>,
    event_time_field: String,
    /// Every writer schema the registry gave, in the order met (to re-judge them on a new reader).
    met: Vec<(u32, String)>,
    /// Writer ids the registry refused (unknown, not Avro): no reader change can help them.
    registry_refused: FxHashMap<u32, Rejection>,
    /// Writer schemas known to resolve to the reader schema, by id.
    writers: BTreeMap<u32, String>,
    /// Writer ids that can never be decoded, and why (cached verdicts).
    refused: FxHashMap<u32, Rejection>,
    reader_schema: apache_avro::Schema,
    compatibility: Compatibility,
    /// Accepted writer schemas in the order they were met (for the transitive modes).
    history: Vec<(u32, apache_avro::Schema)>,
    /// One Arrow decoder per writer schema: records of interleaved versions never force a flush.
    decoders: FxHashMap<u32, Decoder>,
    batch_size: usize,
    /// Values longer than this are refused before decoding: with Avro's rule that every length
    /// prefix must be backed by bytes, it bounds what one record can make the decoder hold.
    max_value_bytes: usize,
    /// Schema of the output rows: normalized for Delta, lineage columns appended.
    output_schema: SchemaRef,
    event_time_index: usize,
}

impl BatchDecoder {
    /// `reader_json` is the table's reader schema; `event_time_field` one of its timestamp fields.
    pub fn new(
        reader_json: &str,
        event_time_field: &str,
        batch_size: usize,
    ) -> Result<Self, DecoderSetupError> {
        let reader_schema = apache_avro::Schema::parse_str(reader_json)
            .map_err(|e| DecoderSetupError::ReaderSchema(e.to_string()))?;
        // The reader schema read as its own writer gives the Arrow shape of every decoded batch.
        let probe = build_decoder(reader_json, [(0u32, reader_json)], 1)
            .map_err(|e| DecoderSetupError::ReaderSchema(e.to_string()))?;
        let decoded_schema = probe.schema();
        let event_time_index = decoded_schema.index_of(event_time_field).map_err(|_| {
            DecoderSetupError::EventTime {
                field: event_time_field.to_string(),
                reason: "no such field in the reader schema".to_string(),
            }
        })?;
        if !matches!(
            decoded_schema.field(event_time_index).data_type(),
            DataType::Timestamp(_, _)
        ) {
            return Err(DecoderSetupError::EventTime {
                field: event_time_field.to_string(),
                reason: format!(
                    "field has Arrow type {}, expected an Avro timestamp-millis or timestamp-micros",
                    decoded_schema.field(event_time_index).data_type()
                ),
            });
        }
        let output_schema = output_schema(&decoded_schema);
        Ok(Self {
            reader_json: reader_json.to_string(),
            reader_id: None,
            event_time_field: event_time_field.to_string(),
            met: Vec::new(),
            registry_refused: FxHashMap::default(),
            writers: BTreeMap::new(),
            refused: FxHashMap::default(),
            reader_schema,
            compatibility: Compatibility::Backward,
            history: Vec::new(),
            decoders: FxHashMap::default(),
            batch_size: batch_size.max(1),
            max_value_bytes: DEFAULT_MAX_VALUE_BYTES,
            output_schema,
            event_time_index,
        })
    }

    /// A decoder for a new reader schema (the table evolved) that has judged again every writer
    /// schema this one met, in the same order, under the same compatibility mode.
    pub fn with_reader(
        &self,
        reader_json: &str,
        reader_id: Option<u32>,
    ) -> Result<Self, DecoderSetupError> {
        let mut next = Self::new(reader_json, &self.event_time_field, self.batch_size)?
            .with_compatibility(self.compatibility)
            .with_max_value_bytes(self.max_value_bytes)
            .with_reader_id(reader_id);
        next.registry_refused = self.registry_refused.clone();
        next.refused = self.registry_refused.clone();
        for (id, json) in &self.met {
            next.register(*id, Ok(json));
        }
        Ok(next)
    }

    /// The reader schema's JSON.
    pub fn reader_json(&self) -> &str {
        &self.reader_json
    }

    /// The verdict on a writer schema id, if any: `Some(None)` accepted, `Some(Some(why))` refused.
    pub fn verdict(&self, schema_id: u32) -> Option<Option<&Rejection>> {
        if self.writers.contains_key(&schema_id) {
            Some(None)
        } else {
            self.refused.get(&schema_id).map(Some)
        }
    }

    /// Sets the reader's registry id (under `STRATA_READER_SCHEMA=latest`). Set it before any
    /// writer is registered.
    pub fn with_reader_id(mut self, reader_id: Option<u32>) -> Self {
        self.reader_id = reader_id;
        self
    }

    /// Sets the largest value accepted (`STRATA_MAX_VALUE_BYTES`).
    pub fn with_max_value_bytes(mut self, max: usize) -> Self {
        self.max_value_bytes = max.max(wire::HEADER_LEN);
        self
    }

    /// Sets the compatibility mode writer schemas must pass (BACKWARD unless set). Verdicts already
    /// made are kept.
    pub fn with_compatibility(mut self, compatibility: Compatibility) -> Self {
        self.compatibility = compatibility;
        self
    }

    /// Schema of the rows [`Self::decode`] returns.
    pub fn output_schema(&self) -> SchemaRef {
        self.output_schema.clone()
    }

    /// Index of the event-time column in the output rows.
    pub fn event_time_index(&self) -> usize {
        self.event_time_index
    }

    /// Whether a verdict on this writer schema id is already known.
    pub fn knows(&self, schema_id: u32) -> bool {
        self.writers.contains_key(&schema_id) || self.refused.contains_key(&schema_id)
    }

    /// Decodes a chunk of records. Every input index ends up either as a row of `batch` (rows keep
    /// the input order) or in `rejected`.
    pub fn decode(&mut self, records: &[SourceRecord]) -> Decoded {
        let refs: Vec<&SourceRecord> = records.iter().collect();
        self.decode_refs(&refs)
    }

    /// [`Self::decode`] over borrowed records (the pipeline routes one chunk to several tables).
    pub fn decode_refs(&mut self, records: &[&SourceRecord]) -> Decoded {
        let mut chunk = Chunk {
            records,
            batches: Vec::new(),
            rows: Vec::new(),
            pending: Vec::new(),
            admitted: Vec::new(),
            rejected: Vec::new(),
        };
        for (index, record) in records.iter().enumerate() {
            let schema_id = match self.admit(record, &mut chunk.admitted) {
                Ok((schema_id, _)) => schema_id,
                Err(rejection) => {
                    chunk.rejected.push((index, rejection));
                    continue;
                }
            };
            match self.decode_one(schema_id, index, &mut chunk) {
                Ok(()) => chunk.pending_mut(schema_id).push(index),
                Err(rejection) => {
                    chunk.rejected.push((index, rejection));
                    // The decoder may hold half a row now: rebuild it and replay its good rows.
                    self.decoders.remove(&schema_id);
                    for good in chunk.take_pending(schema_id) {
                        match self.decode_one(schema_id, good, &mut chunk) {
                            Ok(()) => chunk.pending_mut(schema_id).push(good),
                            Err(again) => {
                                self.decoders.remove(&schema_id);
                                chunk.rejected.push((good, again));
                            }
                        }
                    }
                }
            }
        }
        // In any order: rows go back into input order at the end (`finish`).
        while let Some(&(schema_id, _)) = chunk.pending.first() {
            self.flush_pending(schema_id, &mut chunk);
        }
        let Chunk {
            batches,
            rows,
            mut rejected,
            ..
        } = chunk;
        rejected.sort_by_key(|(index, _)| *index);
        let batch = self.finish(records, &batches, &rows, &mut rejected);
        Decoded { batch, rejected }
    }

    /// Moves the rows inside one decoder into a batch. Some faults only show when Arrow arrays are
    /// built (invalid UTF-8 in a string, say), so a failed flush is not blamed on every row: each
    /// pending record is decoded alone, and only the ones that fail alone are rejected.
    fn flush_pending(&mut self, schema_id: u32, chunk: &mut Chunk<'_>) {
        let pending = chunk.take_pending(schema_id);
        if pending.is_empty() {
            return;
        }
        if let Some(Ok(Some(batch))) = self.decoders.get_mut(&schema_id).map(Decoder::flush) {
            if batch.num_rows() == pending.len() {
                chunk.batches.push(batch);
                chunk.rows.push(pending);
                return;
            }
        }
        for index in pending {
            match self.decode_alone(schema_id, chunk.records[index]) {
                Ok(batch) => {
                    chunk.batches.push(batch);
                    chunk.rows.push(vec![index]);
                }
                Err(rejection) => chunk.rejected.push((index, rejection)),
            }
        }
        self.decoders.remove(&schema_id);
    }

    /// Decodes one record with a fresh decoder into a batch of its own (the slow, exact path).
    fn decode_alone(
        &mut self,
        schema_id: u32,
        record: &SourceRecord,
    ) -> Result<RecordBatch, Rejection> {
        self.decoders.remove(&schema_id);
        let value = record.value.as_deref().unwrap_or_default();
        self.decode_into(schema_id, value, 0)?;
        match self.decoder(schema_id)?.flush() {
            Ok(Some(batch)) if batch.num_rows() == 1 => Ok(batch),
            Ok(_) => Err(Rejection::new(
                ErrorKind::DecodeError,
                "record produced no row".to_string(),
            )),
            Err(e) => Err(Rejection::new(ErrorKind::DecodeError, e.to_string())),
        }
    }

    /// Checks the framing and the writer schema of a record; returns its schema id and value.
    /// Ids in `admitted` passed that check earlier in the chunk: verdicts do not change within
    /// a chunk, so each is looked up once per chunk, not per record.
    fn admit<'r>(
        &self,
        record: &'r SourceRecord,
        admitted: &mut Vec<u32>,
    ) -> Result<(u32, &'r [u8]), Rejection> {
        let value = record.value.as_deref().unwrap_or_default();
        if value.len() > self.max_value_bytes {
            return Err(Rejection::new(
                ErrorKind::ValueTooLarge,
                format!(
                    "value of {} bytes exceeds STRATA_MAX_VALUE_BYTES={}",
                    value.len(),
                    self.max_value_bytes
                ),
            ));
        }
        let framed = wire::parse(value).map_err(|e| {
            let kind = match e {
                wire::WireError::Empty => ErrorKind::EmptyValue,
                _ => ErrorKind::BadMagic,
            };
            Rejection::new(kind, e.to_string())
        })?;
        if admitted.contains(&framed.schema_id) {
            return Ok((framed.schema_id, value));
        }
        if let Some(refused) = self.refused.get(&framed.schema_id) {
            return Err(refused.clone());
        }
        if !self.writers.contains_key(&framed.schema_id) {
            return Err(Rejection::new(
                ErrorKind::UnknownSchema,
                format!(
                    "schema id {} was not resolved before decoding",
                    framed.schema_id
                ),
            ));
        }
        admitted.push(framed.schema_id);
        Ok((framed.schema_id, value))
    }

    fn decode_one(
        &mut self,
        schema_id: u32,
        index: usize,
        chunk: &mut Chunk<'_>,
    ) -> Result<(), Rejection> {
        // Its decoder holds exactly its pending rows (`decode_into` checks each), so a full
        // batch shows in the count, without a look at the decoder.
        if chunk.pending_len(schema_id) >= self.batch_size {
            self.flush_pending(schema_id, chunk);
        }
        let value = chunk.records[index].value.as_deref().unwrap_or_default();
        let pending = chunk.pending_len(schema_id);
        self.decode_into(schema_id, value, pending)
    }

    /// Feeds one framed value to its schema's decoder, which holds `pending` rows, and checks that
    /// exactly this value became exactly one more row.
    fn decode_into(
        &mut self,
        schema_id: u32,
        value: &[u8],
        pending: usize,
    ) -> Result<(), Rejection> {
        let batch_size = self.batch_size;
        let decoder = self.decoder(schema_id)?;
        let consumed = decoder
            .decode(value)
            .map_err(|e| Rejection::new(ErrorKind::DecodeError, e.to_string()))?;
        if consumed != value.len() {
            return Err(Rejection::new(
                ErrorKind::DecodeError,
                format!(
                    "truncated or trailing bytes: {consumed} of {} bytes decoded",
                    value.len()
                ),
            ));
        }
        if batch_size - decoder.capacity() != pending + 1 {
            return Err(Rejection::new(
                ErrorKind::DecodeError,
                format!(
                    "value of {} bytes did not decode to exactly one record",
                    value.len()
                ),
            ));
        }
        // `admit` checked the header already.
        self.check_no_trailing_frame(schema_id, value.get(wire::HEADER_LEN..).unwrap_or_default())
    }

    /// The Arrow decoder reads bytes after a record as the next record's header. When the last five
    /// bytes of a value look like a header of a known schema, prove with a full Avro read that they
    /// belong to the body (rare, so the cost is fine).
    fn check_no_trailing_frame(&self, schema_id: u32, body: &[u8]) -> Result<(), Rejection> {
        let n = body.len();
        if n < wire::HEADER_LEN || body[n - wire::HEADER_LEN] != wire::MAGIC {
            return Ok(());
        }
        let tail_id = u32::from_be_bytes([body[n - 4], body[n - 3], body[n - 2], body[n - 1]]);
        if !self.writers.contains_key(&tail_id) {
            return Ok(());
        }
        let writer_json = self
            .writers
            .get(&schema_id)
            .map(String::as_str)
            .unwrap_or_default();
        let schema = apache_avro::Schema::parse_str(writer_json)
            .map_err(|e| Rejection::new(ErrorKind::DecodeError, e.to_string()))?;
        let mut reader = body;
        apache_avro::reader::datum::GenericDatumReader::builder(&schema)
            .build()
            .and_then(|datum_reader| datum_reader.read_value(&mut reader))
            .map_err(|e| Rejection::new(ErrorKind::DecodeError, e.to_string()))?;
        if reader.is_empty() {
            Ok(())
        } else {
            Err(Rejection::new(
                ErrorKind::DecodeError,
                format!("{} bytes after the Avro record", reader.len()),
            ))
        }
    }
}

mod rows;
mod writers;

use rows::{build_decoder, output_schema};

// Its fixtures (Avro bodies) come with the `demo` feature, which `make test` turns on.
#[cfg(all(test, feature = "demo"))]
mod tests;

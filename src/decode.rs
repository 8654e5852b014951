//! Confluent-framed Avro straight into Arrow, resolved from each writer schema to the table's reader
//! schema, with one verdict per record: a row of the output batch, or a [`Rejection`] with its reason.
//!
//! This module is pure and synchronous: the pipeline fetches unknown writer schemas first and hands
//! them in with [`BatchDecoder::register`]. It must never let one bad record corrupt or drop its
//! neighbours: after any decode error the Arrow decoder is rebuilt and the good records replayed.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arrow_avro::reader::{Decoder, ReaderBuilder};
use arrow_avro::schema::{AvroSchema, Fingerprint, FingerprintAlgorithm, SchemaStore};
use deltalake::arrow::array::{
    Array, ArrayRef, BooleanArray, Int32Array, Int64Array, RecordBatch, StringArray,
    TimestampMicrosecondArray,
};
use deltalake::arrow::compute::{cast, interleave_record_batch};
use deltalake::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};

use crate::compat::Compatibility;
use crate::models::{ErrorKind, Rejection, SourceRecord};
use crate::registry::RegistryError;
use crate::wire;

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
    /// Per writer schema id: input indices of the rows still inside its decoder.
    pending: HashMap<u32, Vec<usize>>,
    rejected: Vec<(usize, Rejection)>,
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
    registry_refused: HashMap<u32, Rejection>,
    /// Writer schemas known to resolve to the reader schema, by id.
    writers: BTreeMap<u32, String>,
    /// Writer ids that can never be decoded, and why (cached verdicts).
    refused: HashMap<u32, Rejection>,
    reader_schema: apache_avro::Schema,
    compatibility: Compatibility,
    /// Accepted writer schemas in the order they were met (for the transitive modes).
    history: Vec<(u32, apache_avro::Schema)>,
    /// One Arrow decoder per writer schema: records of interleaved versions never force a flush.
    decoders: HashMap<u32, Decoder>,
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
            registry_refused: HashMap::new(),
            writers: BTreeMap::new(),
            refused: HashMap::new(),
            reader_schema,
            compatibility: Compatibility::Backward,
            history: Vec::new(),
            decoders: HashMap::new(),
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
    fn check_resolves(
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
                .map_err(|reason| incompatible(format!("the reader schema is {reason}")))?;
        } else {
            let previous = [("the reader schema".to_string(), &self.reader_schema)];
            self.compatibility
                .check(&writer, &previous)
                .map_err(|reason| incompatible(format!("it is {reason}")))?;
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
                .map_err(|reason| incompatible(format!("it is {reason}")))?;
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
    fn decoder(&mut self, schema_id: u32) -> Result<&mut Decoder, Rejection> {
        if !self.decoders.contains_key(&schema_id) {
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
            self.decoders.insert(schema_id, built);
        }
        self.decoders
            .get_mut(&schema_id)
            .ok_or_else(|| Rejection::new(ErrorKind::DecodeError, "no decoder".to_string()))
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
            pending: HashMap::new(),
            rejected: Vec::new(),
        };
        for (index, record) in records.iter().enumerate() {
            let schema_id = match self.admit(record) {
                Ok((schema_id, _)) => schema_id,
                Err(rejection) => {
                    chunk.rejected.push((index, rejection));
                    continue;
                }
            };
            match self.decode_one(schema_id, index, &mut chunk) {
                Ok(()) => chunk.pending.entry(schema_id).or_default().push(index),
                Err(rejection) => {
                    chunk.rejected.push((index, rejection));
                    // The decoder may hold half a row now: rebuild it and replay its good rows.
                    self.decoders.remove(&schema_id);
                    for good in chunk.pending.remove(&schema_id).unwrap_or_default() {
                        match self.decode_one(schema_id, good, &mut chunk) {
                            Ok(()) => chunk.pending.entry(schema_id).or_default().push(good),
                            Err(again) => {
                                self.decoders.remove(&schema_id);
                                chunk.rejected.push((good, again));
                            }
                        }
                    }
                }
            }
        }
        let ids: Vec<u32> = chunk.pending.keys().copied().collect();
        for schema_id in ids {
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
        let pending = chunk.pending.remove(&schema_id).unwrap_or_default();
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
    fn admit<'r>(&self, record: &'r SourceRecord) -> Result<(u32, &'r [u8]), Rejection> {
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
        Ok((framed.schema_id, value))
    }

    fn decode_one(
        &mut self,
        schema_id: u32,
        index: usize,
        chunk: &mut Chunk<'_>,
    ) -> Result<(), Rejection> {
        if self.decoder(schema_id)?.batch_is_full() {
            self.flush_pending(schema_id, chunk);
        }
        let value = chunk.records[index].value.as_deref().unwrap_or_default();
        let pending = chunk.pending.get(&schema_id).map_or(0, Vec::len);
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

    /// Normalizes the decoded batches for Delta, adds lineage, and rejects rows without event time.
    fn finish(
        &self,
        records: &[&SourceRecord],
        batches: &[RecordBatch],
        rows_of: &[Vec<usize>],
        rejected: &mut Vec<(usize, Rejection)>,
    ) -> Option<RecordBatch> {
        // Back into input order: (input index, batch, row) sorted by input index.
        let mut order: Vec<(usize, usize, usize)> = rows_of
            .iter()
            .enumerate()
            .flat_map(|(b, rows)| {
                rows.iter()
                    .enumerate()
                    .map(move |(r, &input)| (input, b, r))
            })
            .collect();
        if order.is_empty() {
            return None;
        }
        order.sort_unstable();
        let rows: Vec<usize> = order.iter().map(|(input, _, _)| *input).collect();
        let rows = rows.as_slice();
        let picks: Vec<(usize, usize)> = order.iter().map(|(_, b, r)| (*b, *r)).collect();
        let refs: Vec<&RecordBatch> = batches.iter().collect();
        let decoded = match interleave_record_batch(&refs, &picks) {
            Ok(batch) => batch,
            Err(e) => {
                rejected.extend(
                    rows.iter()
                        .map(|&i| (i, Rejection::new(ErrorKind::DecodeError, e.to_string()))),
                );
                rejected.sort_by_key(|(index, _)| *index);
                return None;
            }
        };
        match self.lake_rows(records, &decoded, rows) {
            Ok((batch, bad)) => {
                rejected.extend(bad.into_iter().map(|(row, why)| (rows[row], why)));
                rejected.sort_by_key(|(index, _)| *index);
                Some(batch).filter(|b| b.num_rows() > 0)
            }
            Err(e) => {
                rejected.extend(
                    rows.iter()
                        .map(|&i| (i, Rejection::new(ErrorKind::DecodeError, e.to_string()))),
                );
                rejected.sort_by_key(|(index, _)| *index);
                None
            }
        }
    }

    /// The decoded rows in the lake's types, lineage added. Rows that cannot be lake rows are
    /// returned apart (by row index) with their reason: no event time, or a value that does not
    /// fit its lake type (a timestamp beyond the microsecond range, say), which a cast turns into
    /// a null where the column allows none.
    fn lake_rows(
        &self,
        records: &[&SourceRecord],
        decoded: &RecordBatch,
        rows: &[usize],
    ) -> Result<(RecordBatch, Vec<(usize, Rejection)>), deltalake::arrow::error::ArrowError> {
        let mut columns: Vec<ArrayRef> = Vec::with_capacity(self.output_schema.fields().len());
        let mut bad: BTreeMap<usize, Rejection> = BTreeMap::new();
        for (index, (column, field)) in decoded
            .columns()
            .iter()
            .zip(self.output_schema.fields())
            .enumerate()
        {
            let lake = if column.data_type() == field.data_type() {
                column.clone()
            } else {
                cast(column, field.data_type())?
            };
            let event_time = index == self.event_time_index;
            if (event_time || !field.is_nullable()) && lake.null_count() > column.null_count() {
                for row in (0..lake.len()).filter(|&r| lake.is_null(r) && !column.is_null(r)) {
                    bad.entry(row).or_insert_with(|| {
                        Rejection::new(
                            ErrorKind::DecodeError,
                            format!(
                                "field {}: value out of range for the table type {}",
                                field.name(),
                                field.data_type()
                            ),
                        )
                    });
                }
            }
            if event_time {
                for row in (0..column.len()).filter(|&r| column.is_null(r)) {
                    bad.entry(row).or_insert_with(|| {
                        Rejection::new(
                            ErrorKind::MissingEventTime,
                            "event time field is null".to_string(),
                        )
                    });
                }
            }
            columns.push(lake);
        }
        let picked = || rows.iter().map(|&i| records[i]);
        let ingested_at = chrono::Utc::now().timestamp_micros();
        columns.push(Arc::new(StringArray::from_iter_values(
            picked().map(|r| r.topic.as_ref()),
        )));
        columns.push(Arc::new(Int32Array::from_iter_values(
            picked().map(|r| r.partition),
        )));
        columns.push(Arc::new(Int64Array::from_iter_values(
            picked().map(|r| r.offset),
        )));
        columns.push(Arc::new(
            TimestampMicrosecondArray::from_iter(
                picked().map(|r| r.timestamp_ms.map(|ms| ms.saturating_mul(1000))),
            )
            .with_timezone(UTC),
        ));
        columns.push(Arc::new(Int64Array::from_iter(picked().map(|r| {
            r.value
                .as_deref()
                .and_then(|v| wire::parse(v).ok())
                .map(|f| i64::from(f.schema_id))
        }))));
        columns.push(Arc::new(
            TimestampMicrosecondArray::from_value(ingested_at, rows.len()).with_timezone(UTC),
        ));
        if !bad.is_empty() {
            let keep: BooleanArray = (0..rows.len())
                .map(|r| Some(!bad.contains_key(&r)))
                .collect();
            columns = columns
                .iter()
                .map(|c| deltalake::arrow::compute::filter(c, &keep))
                .collect::<Result<_, _>>()?;
        }
        let batch = RecordBatch::try_new(self.output_schema.clone(), columns)?;
        Ok((batch, bad.into_iter().collect()))
    }
}

/// Builds an arrow-avro decoder for Confluent framing over the given writer schemas.
fn build_decoder<'a>(
    reader_json: &str,
    writers: impl IntoIterator<Item = (u32, &'a str)>,
    batch_size: usize,
) -> Result<Decoder, deltalake::arrow::error::ArrowError> {
    let mut store = SchemaStore::new_with_type(FingerprintAlgorithm::Id);
    for (id, json) in writers {
        store.set(Fingerprint::Id(id), AvroSchema::new(json.to_string()))?;
    }
    ReaderBuilder::new()
        .with_reader_schema(AvroSchema::new(reader_json.to_string()))
        .with_writer_schema_store(store)
        .with_batch_size(batch_size)
        .build_decoder()
}

/// The Delta-ready form of a decoded column type: Delta has no dictionaries, fixed binaries,
/// time-of-day or non-microsecond timestamps, so those are cast to the nearest type it has.
fn lake_type(data_type: &DataType) -> DataType {
    match data_type {
        DataType::Dictionary(_, value) => lake_type(value),
        DataType::FixedSizeBinary(_) | DataType::BinaryView | DataType::LargeBinary => {
            DataType::Binary
        }
        DataType::Utf8View | DataType::LargeUtf8 => DataType::Utf8,
        DataType::Timestamp(_, _) => DataType::Timestamp(TimeUnit::Microsecond, Some(UTC.into())),
        DataType::Time32(_) | DataType::Time64(_) => DataType::Int64,
        DataType::UInt8 | DataType::UInt16 => DataType::Int32,
        DataType::UInt32 | DataType::UInt64 => DataType::Int64,
        other => other.clone(),
    }
}

/// Reader fields without Avro metadata (Delta would keep `avro.field.default` as column metadata),
/// then the lineage columns.
fn output_schema(decoded: &Schema) -> SchemaRef {
    let mut fields: Vec<Field> = decoded
        .fields()
        .iter()
        .map(|f| Field::new(f.name(), lake_type(f.data_type()), f.is_nullable()))
        .collect();
    let ts = DataType::Timestamp(TimeUnit::Microsecond, Some(UTC.into()));
    fields.push(Field::new(LINEAGE_COLUMNS[0], DataType::Utf8, false));
    fields.push(Field::new(LINEAGE_COLUMNS[1], DataType::Int32, false));
    fields.push(Field::new(LINEAGE_COLUMNS[2], DataType::Int64, false));
    fields.push(Field::new(LINEAGE_COLUMNS[3], ts.clone(), true));
    fields.push(Field::new(LINEAGE_COLUMNS[4], DataType::Int64, true));
    fields.push(Field::new(LINEAGE_COLUMNS[5], ts, false));
    Arc::new(Schema::new(fields))
}

#[cfg(test)]
mod tests {
    use super::*;
    use apache_avro::types::Value;
    use proptest::prelude::*;

    pub const V1: &str = r#"{"type":"record","name":"Order","namespace":"shop","fields":[
        {"name":"id","type":"long"},
        {"name":"customer","type":"string"},
        {"name":"amount","type":"double"},
        {"name":"event_time","type":{"type":"long","logicalType":"timestamp-millis"}}]}"#;
    pub const V2: &str = r#"{"type":"record","name":"Order","namespace":"shop","fields":[
        {"name":"id","type":"long"},
        {"name":"customer","type":"string"},
        {"name":"amount","type":"double"},
        {"name":"event_time","type":{"type":"long","logicalType":"timestamp-millis"}},
        {"name":"coupon","type":["null","string"],"default":null}]}"#;

    fn encode(schema_json: &str, id: u32, n: i64, coupon: Option<&str>) -> Vec<u8> {
        let schema = apache_avro::Schema::parse_str(schema_json).expect("schema");
        let mut fields = vec![
            ("id".to_string(), Value::Long(n)),
            ("customer".to_string(), Value::String(format!("c{n}"))),
            ("amount".to_string(), Value::Double(n as f64 / 2.0)),
            (
                "event_time".to_string(),
                Value::TimestampMillis(1_700_000_000_000 + n),
            ),
        ];
        if schema_json.contains("coupon") {
            let value = match coupon {
                Some(c) => Value::Union(1, Box::new(Value::String(c.to_string()))),
                None => Value::Union(0, Box::new(Value::Null)),
            };
            fields.push(("coupon".to_string(), value));
        }
        wire::frame(
            id,
            &crate::demo::avro_body(&schema, Value::Record(fields)).expect("encode"),
        )
    }

    fn record(offset: i64, value: Vec<u8>) -> SourceRecord {
        SourceRecord {
            topic: "orders".into(),
            partition: 3,
            offset,
            timestamp_ms: Some(1_700_000_000_000),
            key: None,
            value: Some(value),
            headers: Vec::new(),
        }
    }

    fn decoder(reader: &str) -> BatchDecoder {
        let mut d = BatchDecoder::new(reader, "event_time", 4).expect("decoder");
        d.register(1, Ok(V1));
        d.register(2, Ok(V2));
        d
    }

    fn offsets(batch: &RecordBatch) -> Vec<i64> {
        let column = batch.column_by_name("_offset").expect("_offset");
        column
            .as_any()
            .downcast_ref::<Int64Array>()
            .expect("i64")
            .values()
            .to_vec()
    }

    #[test]
    fn decodes_two_writer_versions_into_the_reader_shape() {
        let mut d = decoder(V2);
        let records: Vec<_> = (0..10)
            .map(|n| {
                if n % 3 == 0 {
                    record(n, encode(V1, 1, n, None))
                } else {
                    record(n, encode(V2, 2, n, Some("X")))
                }
            })
            .collect();
        let out = d.decode(&records);
        assert!(out.rejected.is_empty(), "{:?}", out.rejected);
        let batch = out.batch.expect("rows");
        assert_eq!(offsets(&batch), (0..10).collect::<Vec<_>>());
        let ids = batch
            .column_by_name("id")
            .expect("id")
            .as_any()
            .downcast_ref::<Int64Array>()
            .expect("i64")
            .clone();
        assert_eq!(ids.values().to_vec(), (0..10).collect::<Vec<_>>());
        let coupon = batch.column_by_name("coupon").expect("coupon");
        assert!(coupon.is_null(0) && coupon.is_null(3) && !coupon.is_null(1));
        let schema_ids = batch
            .column_by_name("_schema_id")
            .expect("id")
            .as_any()
            .downcast_ref::<Int64Array>()
            .expect("i64")
            .clone();
        assert_eq!(schema_ids.value(0), 1);
        assert_eq!(schema_ids.value(1), 2);
        assert_eq!(
            batch
                .schema()
                .field_with_name("event_time")
                .expect("f")
                .data_type(),
            &DataType::Timestamp(TimeUnit::Microsecond, Some(UTC.into()))
        );
    }

    #[test]
    fn bad_records_are_rejected_without_harming_neighbours() {
        let mut d = decoder(V1);
        let good = |n| record(n, encode(V1, 1, n, None));
        let mut truncated = encode(V1, 1, 2, None);
        truncated.truncate(truncated.len() - 3);
        let mut trailing = encode(V1, 1, 5, None);
        trailing.extend_from_slice(&[0, 0, 0, 0, 1]);
        let records = vec![
            good(0),
            good(1),
            record(2, truncated),
            record(3, b"{\"json\": true}".to_vec()),
            record(4, wire::frame(99, b"\x02")),
            record(5, trailing),
            good(6),
            record(7, Vec::new()),
            good(8),
        ];
        d.register(
            99,
            Err(&RegistryError::NotFound {
                id: 99,
                message: "Schema not found".into(),
            }),
        );
        let out = d.decode(&records);
        let kinds: Vec<_> = out.rejected.iter().map(|(i, r)| (*i, r.kind)).collect();
        assert_eq!(
            kinds,
            vec![
                (2, ErrorKind::DecodeError),
                (3, ErrorKind::BadMagic),
                (4, ErrorKind::UnknownSchema),
                (5, ErrorKind::DecodeError),
                (7, ErrorKind::EmptyValue)
            ]
        );
        assert_eq!(offsets(&out.batch.expect("rows")), vec![0, 1, 6, 8]);
    }

    #[test]
    fn invalid_utf8_is_rejected_alone() {
        let mut d = decoder(V1);
        let good = |n| record(n, encode(V1, 1, n, None));
        // A V1 record whose customer string holds the bytes ff fe: valid Avro, invalid UTF-8,
        // which arrow only notices when it builds the string array at flush.
        let mut body = vec![0x02, 0x04, 0xff, 0xfe, 0x00];
        body.extend_from_slice(&1.5f64.to_le_bytes());
        body.push(0x02);
        let records = vec![good(0), record(1, wire::frame(1, &body)), good(2), good(3)];
        let out = d.decode(&records);
        assert_eq!(out.rejected.len(), 1, "{:?}", out.rejected);
        assert_eq!(out.rejected[0].0, 1);
        assert_eq!(offsets(&out.batch.expect("rows")), vec![0, 2, 3]);
        // The decoder is healthy afterwards.
        let again = d.decode(&[good(4), good(5)]);
        assert_eq!(offsets(&again.batch.expect("rows")), vec![4, 5]);
    }

    #[test]
    fn incompatible_writer_is_refused() {
        let mut d = decoder(V1);
        let incompatible = r#"{"type":"record","name":"Order","namespace":"shop","fields":[{"name":"id","type":"string"}]}"#;
        d.register(7, Ok(incompatible));
        let out = d.decode(&[record(0, wire::frame(7, b"\x02a"))]);
        assert_eq!(out.rejected[0].1.kind, ErrorKind::IncompatibleSchema);
        assert!(out.batch.is_none());
    }

    #[test]
    fn compatibility_mode_decides_with_confluent_meaning() {
        // A writer that adds a required field. The reader ignores the field, so arrow-avro could
        // decode it; whether the mode allows it depends on which of the two is newer.
        let adds_required = V1.replace(
            r#"{"name":"amount","type":"double"},"#,
            r#"{"name":"amount","type":"double"},{"name":"channel","type":"string"},"#,
        );
        let schema = apache_avro::Schema::parse_str(&adds_required).expect("schema");
        let body = crate::demo::avro_body(
            &schema,
            Value::Record(vec![
                ("id".into(), Value::Long(7)),
                ("customer".into(), Value::String("c".into())),
                ("amount".into(), Value::Double(1.0)),
                ("channel".into(), Value::String("web".into())),
                ("event_time".into(), Value::TimestampMillis(5)),
            ]),
        )
        .expect("encode");
        let judged = |mode: Compatibility, reader_id: Option<u32>| {
            let mut d = BatchDecoder::new(V1, "event_time", 8)
                .expect("decoder")
                .with_compatibility(mode)
                .with_reader_id(reader_id);
            d.register(5, Ok(&adds_required));
            d.decode(&[record(0, wire::frame(5, &body))])
        };
        // The writer is newer (id 5 after the reader's 3): BACKWARD asks the writer to read the
        // reader's data, which lacks `channel`: refused, naming the field. FORWARD asks the reader to
        // read the writer's data: accepted.
        let out = judged(Compatibility::Backward, Some(3));
        assert_eq!(out.rejected[0].1.kind, ErrorKind::IncompatibleSchema);
        let message = &out.rejected[0].1.message;
        assert!(
            message.contains("channel") && message.contains("BACKWARD"),
            "{message}"
        );
        let out = judged(Compatibility::Forward, Some(3));
        assert!(out.rejected.is_empty(), "{:?}", out.rejected);
        assert_eq!(offsets(&out.batch.expect("rows")), vec![0]);
        // The reader is newer (a file, or a later id): the other way round.
        for reader_id in [None, Some(9)] {
            assert!(judged(Compatibility::Backward, reader_id)
                .rejected
                .is_empty());
            assert_eq!(judged(Compatibility::Forward, reader_id).rejected.len(), 1);
            assert_eq!(judged(Compatibility::Full, reader_id).rejected.len(), 1);
        }
    }

    #[test]
    fn null_event_time_is_rejected() {
        let reader = r#"{"type":"record","name":"E","fields":[{"name":"event_time","type":["null",{"type":"long","logicalType":"timestamp-micros"}]}]}"#;
        let mut d = BatchDecoder::new(reader, "event_time", 8).expect("decoder");
        d.register(1, Ok(reader));
        let schema = apache_avro::Schema::parse_str(reader).expect("schema");
        let body = |v: Value| {
            crate::demo::avro_body(&schema, Value::Record(vec![("event_time".into(), v)]))
                .expect("enc")
        };
        let records = vec![
            record(
                0,
                wire::frame(
                    1,
                    &body(Value::Union(1, Box::new(Value::TimestampMicros(5)))),
                ),
            ),
            record(
                1,
                wire::frame(1, &body(Value::Union(0, Box::new(Value::Null)))),
            ),
        ];
        let out = d.decode(&records);
        assert_eq!(out.rejected.len(), 1);
        assert_eq!(out.rejected[0].1.kind, ErrorKind::MissingEventTime);
        assert_eq!(offsets(&out.batch.expect("rows")), vec![0]);
    }

    #[test]
    fn a_new_reader_judges_every_writer_again() {
        const V3: &str = r#"{"type":"record","name":"Order","namespace":"shop","fields":[
            {"name":"id","type":"long"},
            {"name":"customer","type":"string"},
            {"name":"amount","type":"string"},
            {"name":"event_time","type":{"type":"long","logicalType":"timestamp-millis"}}]}"#;
        let mut d = BatchDecoder::new(V1, "event_time", 4).expect("decoder");
        d.register(1, Ok(V1));
        d.register(2, Ok(V2));
        d.register(3, Ok(V3));
        d.register(
            4,
            Err(&RegistryError::NotFound {
                id: 4,
                message: "gone".into(),
            }),
        );
        assert_eq!(d.verdict(2), Some(None));
        assert!(
            d.verdict(3).is_some_and(|r| r.is_some()),
            "amount changed type"
        );
        assert!(d.output_schema().field_with_name("coupon").is_err());

        let mut next = d.with_reader(V2, None).expect("v2 reader");
        assert_eq!(next.verdict(1), Some(None));
        assert_eq!(next.verdict(2), Some(None));
        assert_eq!(
            next.verdict(3).flatten().map(|r| r.kind),
            Some(ErrorKind::IncompatibleSchema)
        );
        assert_eq!(
            next.verdict(4).flatten().map(|r| r.kind),
            Some(ErrorKind::UnknownSchema)
        );
        let out = next.decode(&[
            record(0, encode(V1, 1, 0, None)),
            record(1, encode(V2, 2, 1, Some("SAVE"))),
        ]);
        assert!(out.rejected.is_empty(), "{:?}", out.rejected);
        let batch = out.batch.expect("rows");
        let coupons = batch.column_by_name("coupon").expect("coupon");
        assert!(coupons.is_null(0), "v1 rows read the default (null)");
        assert!(!coupons.is_null(1));
    }

    /// Avro's promotions: int → long, float → double, string ↔ bytes; and what they do not allow.
    #[test]
    fn promotions_follow_avro_rules() {
        let schema = |amount: &str, name: &str| {
            format!(
                r#"{{"type":"record","name":"P","fields":[
                {{"name":"n","type":"{amount}"}},
                {{"name":"x","type":"{name}"}},
                {{"name":"event_time","type":{{"type":"long","logicalType":"timestamp-millis"}}}}]}}"#
            )
        };
        let reader = schema("long", "bytes");
        let mut d = BatchDecoder::new(&reader, "event_time", 8).expect("decoder");
        let narrow = schema("int", "string");
        d.register(1, Ok(&narrow));
        assert_eq!(
            d.verdict(1),
            Some(None),
            "int → long and string → bytes promote"
        );
        let body = crate::demo::avro_body(
            &apache_avro::Schema::parse_str(&narrow).expect("schema"),
            Value::Record(vec![
                ("n".into(), Value::Int(-7)),
                ("x".into(), Value::String("hé".into())),
                ("event_time".into(), Value::TimestampMillis(1)),
            ]),
        )
        .expect("encode");
        let out = d.decode(&[record(0, wire::frame(1, &body))]);
        let batch = out.batch.expect("row");
        let n = batch.column_by_name("n").expect("n");
        assert_eq!(
            n.as_any()
                .downcast_ref::<Int64Array>()
                .expect("long")
                .value(0),
            -7
        );
        let x = batch.column_by_name("x").expect("x");
        assert_eq!(x.data_type(), &DataType::Binary);

        let doubles = schema("double", "string");
        let mut d = BatchDecoder::new(&doubles, "event_time", 8).expect("decoder");
        d.register(2, Ok(&schema("float", "bytes")));
        assert_eq!(
            d.verdict(2),
            Some(None),
            "float → double and bytes → string promote"
        );
        // No demotion: a long cannot be read as an int.
        let mut d = BatchDecoder::new(&schema("int", "string"), "event_time", 8).expect("decoder");
        d.register(3, Ok(&schema("long", "string")));
        assert_eq!(
            d.verdict(3).flatten().map(|r| r.kind),
            Some(ErrorKind::IncompatibleSchema)
        );
    }

    #[test]
    fn an_event_time_beyond_the_table_range_is_rejected_alone() {
        let mut d = decoder(V2);
        let schema = apache_avro::Schema::parse_str(V2).expect("schema");
        let far = crate::demo::avro_body(
            &schema,
            Value::Record(vec![
                ("id".into(), Value::Long(1)),
                ("customer".into(), Value::String("c".into())),
                ("amount".into(), Value::Double(1.0)),
                // Milliseconds whose microseconds overflow an i64.
                ("event_time".into(), Value::TimestampMillis(i64::MAX / 999)),
                ("coupon".into(), Value::Union(0, Box::new(Value::Null))),
            ]),
        )
        .expect("encode");
        let out = d.decode(&[
            record(0, encode(V2, 2, 0, None)),
            record(1, wire::frame(2, &far)),
            record(2, encode(V2, 2, 2, None)),
        ]);
        assert_eq!(out.rejected.len(), 1, "{:?}", out.rejected);
        assert_eq!(out.rejected[0].0, 1);
        assert!(out.rejected[0].1.message.contains("out of range"));
        assert_eq!(offsets(&out.batch.expect("rows")), vec![0, 2]);
    }

    #[test]
    fn event_time_field_is_checked_at_setup() {
        assert!(matches!(
            BatchDecoder::new(V1, "nope", 8),
            Err(DecoderSetupError::EventTime { .. })
        ));
        assert!(matches!(
            BatchDecoder::new(V1, "amount", 8),
            Err(DecoderSetupError::EventTime { .. })
        ));
    }

    proptest! {
        // 512 cases in `make test`; PROPTEST_CASES=100000 for a long hunt.
        #![proptest_config(ProptestConfig {
            cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(512),
            ..ProptestConfig::default()
        })]
        /// Hostile bodies: never a panic, and every input is accounted for exactly once.
        #[test]
        fn every_record_is_a_row_or_a_rejection(bodies in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 1..12), good_every in 1usize..4) {
            let mut d = decoder(V2);
            let records: Vec<_> = bodies.into_iter().enumerate().map(|(i, body)| {
                if i % good_every == 0 { record(i as i64, encode(V2, 2, i as i64, None)) } else { record(i as i64, wire::frame(1 + (i % 2) as u32, &body)) }
            }).collect();
            let out = d.decode(&records);
            let rows = out.batch.as_ref().map(offsets).unwrap_or_default();
            let mut seen: Vec<i64> = rows.clone();
            seen.extend(out.rejected.iter().map(|(i, _)| *i as i64));
            seen.sort_unstable();
            prop_assert_eq!(seen, (0..records.len() as i64).collect::<Vec<_>>());
            for (i, r) in records.iter().enumerate() {
                if i % good_every == 0 { prop_assert!(rows.contains(&r.offset)); }
            }
        }
    }
}

//! Decoded batches into the lake's shape: timestamps normalized for Delta, the event date and hour,
//! the lineage columns; a row without a usable event time is rejected alone.

use super::*;

impl BatchDecoder {
    /// Normalizes the decoded batches for Delta, adds lineage, and rejects rows without event time.
    pub(super) fn finish(
        &self,
        records: &[&SourceRecord],
        batches: &[RecordBatch],
        rows_of: &[Vec<usize>],
        rejected: &mut Vec<(usize, Rejection)>,
    ) -> Option<RecordBatch> {
        // One batch (one writer schema in the chunk, the usual case) holds its rows in input
        // order already: no copy.
        if let ([batch], [rows]) = (batches, rows_of) {
            return self.lake_batch(records, batch, rows, rejected);
        }
        // Back into input order: each input index is in at most one batch, so a table indexed by
        // input finds every row's (batch, row) without sorting.
        let mut at: Vec<Option<(usize, usize)>> = vec![None; records.len()];
        for (b, rows) in rows_of.iter().enumerate() {
            for (r, &input) in rows.iter().enumerate() {
                if let Some(slot) = at.get_mut(input) {
                    *slot = Some((b, r));
                }
            }
        }
        let (rows, picks): (Vec<usize>, Vec<(usize, usize)>) = at
            .iter()
            .enumerate()
            .filter_map(|(input, pick)| pick.map(|pick| (input, pick)))
            .unzip();
        if rows.is_empty() {
            return None;
        }
        let rows = rows.as_slice();
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
        self.lake_batch(records, &decoded, rows, rejected)
    }

    /// [`Self::lake_rows`], with its rejections (or, when the batch cannot be built, every row)
    /// added to `rejected`, which stays sorted by input index.
    fn lake_batch(
        &self,
        records: &[&SourceRecord],
        decoded: &RecordBatch,
        rows: &[usize],
        rejected: &mut Vec<(usize, Rejection)>,
    ) -> Option<RecordBatch> {
        if rows.is_empty() {
            return None;
        }
        match self.lake_rows(records, decoded, rows) {
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
    pub(super) fn lake_rows(
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
pub(super) fn build_decoder<'a>(
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
pub(super) fn lake_type(data_type: &DataType) -> DataType {
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
pub(super) fn output_schema(decoded: &Schema) -> SchemaRef {
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

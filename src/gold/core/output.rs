//! Gold rows as Arrow: `window_start`, `window_end`, the key fields under their own names, then one
//! column per aggregate (`count`, `sum_amount`, …). Salted sub-results must be merged back by plain
//! key before they get here: a Gold row never carries a salt.

use std::sync::Arc;

use deltalake::arrow::array::{
    ArrayRef, Float64Builder, Int64Builder, RecordBatch, StringBuilder, TimestampMicrosecondArray,
};
use deltalake::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use deltalake::arrow::error::ArrowError;

use super::aggregate::{Aggregate, Function, Output};
use super::closing::Closed;
use super::partial::KeyValue;

/// How a key field is typed in the Gold table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyType {
    Int,
    Str,
}

/// The Gold table's schema.
pub fn gold_schema(keys: &[(String, KeyType)], aggregates: &[Aggregate]) -> SchemaRef {
    let ts = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
    let mut fields = vec![
        Field::new("window_start", ts.clone(), false),
        Field::new("window_end", ts, false),
    ];
    for (name, kind) in keys {
        let data_type = match kind {
            KeyType::Int => DataType::Int64,
            KeyType::Str => DataType::Utf8,
        };
        fields.push(Field::new(name, data_type, true));
    }
    for aggregate in aggregates {
        let (data_type, nullable) = match aggregate.function {
            Function::Count | Function::ApproxDistinct => (DataType::Int64, false),
            _ => (DataType::Float64, true),
        };
        fields.push(Field::new(aggregate.column(), data_type, nullable));
    }
    Arc::new(Schema::new(fields))
}

/// Closed windows as Gold rows. Refuses salted results: merge them back by plain key first.
/// Reads the results in place: no key or result is copied on the way to the Arrow columns.
pub fn gold_rows(
    schema: &SchemaRef,
    keys: &[(String, KeyType)],
    aggregates: &[Aggregate],
    closed: &[&Closed],
) -> Result<RecordBatch, ArrowError> {
    if let Some(salted) = closed.iter().find(|c| c.salt != 0) {
        return Err(ArrowError::InvalidArgumentError(format!(
            "salted result for window {} (salt {}) must be merged back before it is written",
            salted.window_start, salted.salt
        )));
    }
    let mut columns: Vec<ArrayRef> = vec![
        Arc::new(
            TimestampMicrosecondArray::from_iter_values(closed.iter().map(|c| c.window_start))
                .with_timezone("UTC"),
        ),
        Arc::new(
            TimestampMicrosecondArray::from_iter_values(closed.iter().map(|c| c.window_end))
                .with_timezone("UTC"),
        ),
    ];
    for (index, (_, kind)) in keys.iter().enumerate() {
        fn value(c: &Closed, index: usize) -> &KeyValue {
            c.key.get(index).unwrap_or(&KeyValue::Null)
        }
        columns.push(match kind {
            KeyType::Int => {
                let mut b = Int64Builder::with_capacity(closed.len());
                for c in closed {
                    match value(c, index) {
                        KeyValue::Int(v) => b.append_value(*v),
                        _ => b.append_null(),
                    }
                }
                Arc::new(b.finish())
            }
            KeyType::Str => {
                let mut b = StringBuilder::with_capacity(closed.len(), closed.len() * 8);
                for c in closed {
                    match value(c, index) {
                        KeyValue::Str(v) => b.append_value(v),
                        KeyValue::Int(v) => b.append_value(v.to_string()),
                        KeyValue::Null => b.append_null(),
                    }
                }
                Arc::new(b.finish())
            }
        });
    }
    // One pass over the results fills every aggregate's column.
    enum Column {
        Int(Int64Builder),
        Float(Float64Builder),
    }
    let mut outputs: Vec<Column> = aggregates
        .iter()
        .map(|aggregate| match aggregate.function {
            Function::Count | Function::ApproxDistinct => {
                Column::Int(Int64Builder::with_capacity(closed.len()))
            }
            _ => Column::Float(Float64Builder::with_capacity(closed.len())),
        })
        .collect();
    for c in closed {
        let finished = c.accumulator.finish();
        for (index, column) in outputs.iter_mut().enumerate() {
            match (column, finished.get(index)) {
                (Column::Int(b), Some(Output::Int(v))) => b.append_value(*v),
                (Column::Int(b), _) => b.append_value(0),
                (Column::Float(b), Some(Output::Float(Some(v)))) => b.append_value(*v),
                (Column::Float(b), _) => b.append_null(),
            }
        }
    }
    for column in outputs {
        columns.push(match column {
            Column::Int(mut b) => Arc::new(b.finish()) as ArrayRef,
            Column::Float(mut b) => Arc::new(b.finish()),
        });
    }
    RecordBatch::try_new(schema.clone(), columns)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gold::core::aggregate::{parse_aggregates, Accumulator, Input};
    use deltalake::arrow::array::{Array, AsArray};
    use deltalake::arrow::datatypes::{Float64Type, Int64Type};

    #[test]
    fn closed_windows_become_gold_rows_without_salt() {
        let aggregates = parse_aggregates("count, sum(amount), min(amount)").expect("aggregates");
        let keys = vec![("customer_id".to_string(), KeyType::Str)];
        let schema = gold_schema(&keys, &aggregates);
        let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        assert_eq!(
            names,
            [
                "window_start",
                "window_end",
                "customer_id",
                "count",
                "sum_amount",
                "min_amount"
            ]
        );
        let mut acc = Accumulator::new(&aggregates);
        acc.add(&[Input::Null, Input::Number(2.5), Input::Number(2.5)]);
        acc.add(&[Input::Null, Input::Null, Input::Null]);
        let closed = vec![
            Closed {
                window_start: 0,
                window_end: 60_000_000,
                key: vec![KeyValue::Str("c1".into())],
                salt: 0,
                accumulator: acc.clone(),
            },
            Closed {
                window_start: 60_000_000,
                window_end: 120_000_000,
                key: vec![KeyValue::Null],
                salt: 0,
                accumulator: Accumulator::new(&aggregates),
            },
        ];
        let refs: Vec<&Closed> = closed.iter().collect();
        let batch = gold_rows(&schema, &keys, &aggregates, &refs).expect("rows");
        assert_eq!(batch.num_rows(), 2);
        assert_eq!(batch.column(2).as_string::<i32>().value(0), "c1");
        assert!(batch.column(2).is_null(1), "a null key stays null");
        assert_eq!(batch.column(3).as_primitive::<Int64Type>().value(0), 2);
        assert_eq!(batch.column(4).as_primitive::<Float64Type>().value(0), 2.5);
        assert!(batch.column(5).is_null(1), "min of nothing is null");

        let mut salted = closed;
        salted[0].salt = 3;
        let salted: Vec<&Closed> = salted.iter().collect();
        assert!(gold_rows(&schema, &keys, &aggregates, &salted).is_err());
    }
}

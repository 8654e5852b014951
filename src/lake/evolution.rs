//! Schema evolution plans: how a reader's rows meet an existing table (new columns added nullable,
//! unknown columns kept as nulls, type changes refused), and widening batches to the files' shape.

use std::sync::Arc;

use deltalake::arrow::array::{new_null_array, ArrayRef, RecordBatch};
use deltalake::arrow::compute::cast;
use deltalake::arrow::datatypes::{Field, Schema, SchemaRef};
use deltalake::arrow::error::ArrowError;
use deltalake::kernel::engine::arrow_conversion::{TryFromKernel, TryIntoKernel};
use deltalake::kernel::{StructField, StructType};

use super::PARTITION_COLUMNS;

/// How a reader's rows meet an existing table.
#[derive(Debug, Clone)]
pub struct Evolution {
    /// The Arrow schema of the files to write: the reader's columns (those new to the table made
    /// nullable), then the table's columns the reader does not know (written as nulls).
    pub file_schema: SchemaRef,
    /// Columns the table must gain first, in one metadata commit (all nullable).
    pub added: Vec<StructField>,
}

/// Plans the table schema for a reader's decoded rows (`rows`: data columns, then lineage).
/// Refused, with every offending column named: a column whose type differs, or a required table
/// column the reader cannot fill.
/// Why a reader's rows cannot meet the table: every offending column, named.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.join("; "))]
pub struct EvolutionRefused(pub Vec<String>);

pub fn plan_evolution(table: &StructType, rows: &Schema) -> Result<Evolution, EvolutionRefused> {
    let mut problems = Vec::new();
    let mut file_fields: Vec<Field> = Vec::with_capacity(rows.fields().len());
    let mut added = Vec::new();
    for field in rows.fields() {
        let kernel: StructField = match field.as_ref().try_into_kernel() {
            Ok(kernel) => kernel,
            Err(e) => {
                problems.push(format!("column {}: {e}", field.name()));
                continue;
            }
        };
        match table.field(field.name()) {
            Some(existing) if existing.data_type() != kernel.data_type() => problems.push(format!(
                "column {} has type {} in the table but {} in the reader schema",
                field.name(),
                existing.data_type(),
                kernel.data_type()
            )),
            Some(existing) if !existing.is_nullable() && field.is_nullable() => {
                problems.push(format!(
                    "column {} is required in the table but may be null in the reader schema",
                    field.name()
                ))
            }
            // The table's nullability rules: rows of older readers may hold nulls there.
            Some(existing) => {
                file_fields.push(field.as_ref().clone().with_nullable(existing.is_nullable()))
            }
            None => {
                file_fields.push(field.as_ref().clone().with_nullable(true));
                added.push(StructField::new(
                    field.name(),
                    kernel.data_type().clone(),
                    true,
                ));
            }
        }
    }
    for existing in table.fields() {
        if PARTITION_COLUMNS.contains(&existing.name().as_str())
            || rows.field_with_name(existing.name()).is_ok()
        {
            continue;
        }
        if !existing.is_nullable() {
            problems.push(format!(
                "column {} is required in the table but the reader schema has no such field",
                existing.name()
            ));
            continue;
        }
        match Field::try_from_kernel(existing) {
            Ok(field) => file_fields.push(field.with_nullable(true)),
            Err(e) => problems.push(format!("column {}: {e}", existing.name())),
        }
    }
    if !problems.is_empty() {
        return Err(EvolutionRefused(problems));
    }
    Ok(Evolution {
        file_schema: Arc::new(Schema::new(file_fields)),
        added,
    })
}

/// `batch` in the shape of `schema`: columns matched by name, cast where the type differs, and
/// nulls for columns the batch does not have (rows decoded before the table gained them).
pub fn conform(batch: &RecordBatch, schema: &SchemaRef) -> Result<RecordBatch, ArrowError> {
    if batch.schema() == *schema {
        return Ok(batch.clone());
    }
    let columns = schema
        .fields()
        .iter()
        .map(|field| match batch.column_by_name(field.name()) {
            Some(column) if column.data_type() == field.data_type() => Ok(column.clone()),
            Some(column) => cast(column, field.data_type()),
            None => Ok(new_null_array(field.data_type(), batch.num_rows())),
        })
        .collect::<Result<Vec<ArrayRef>, ArrowError>>()?;
    RecordBatch::try_new(schema.clone(), columns)
}

#[cfg(test)]
mod tests {
    use super::*;
    use deltalake::arrow::datatypes::DataType;

    fn table_of(fields: Vec<Field>) -> StructType {
        (&Schema::new(fields))
            .try_into_kernel()
            .expect("kernel schema")
    }

    #[test]
    fn evolution_adds_nullable_columns_and_keeps_unknown_ones() {
        let table = table_of(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("note", DataType::Utf8, true),
            Field::new(PARTITION_COLUMNS[0], DataType::Date32, false),
            Field::new(PARTITION_COLUMNS[1], DataType::Int32, false),
        ]);
        let rows = Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("quantity", DataType::Int32, false),
        ]);
        let plan = plan_evolution(&table, &rows).expect("compatible");
        let names: Vec<_> = plan.added.iter().map(|f| f.name().clone()).collect();
        assert_eq!(names, ["quantity"]);
        assert!(
            plan.added[0].is_nullable(),
            "old rows read the new column as null"
        );
        let file: Vec<_> = plan
            .file_schema
            .fields()
            .iter()
            .map(|f| (f.name().clone(), f.is_nullable()))
            .collect();
        assert_eq!(
            file,
            [
                ("id".to_string(), false),
                ("quantity".to_string(), true),
                ("note".to_string(), true)
            ]
        );

        let batch = RecordBatch::try_new(
            Arc::new(Schema::new(vec![Field::new("id", DataType::Int64, false)])),
            vec![Arc::new(deltalake::arrow::array::Int64Array::from(vec![
                1, 2,
            ]))],
        )
        .expect("batch");
        let widened = conform(&batch, &plan.file_schema).expect("conform");
        assert_eq!(widened.num_columns(), 3);
        assert_eq!(widened.column(1).null_count(), 2);
        assert_eq!(widened.column(2).null_count(), 2);
    }

    #[test]
    fn evolution_refuses_type_changes_and_unfillable_columns() {
        let table = table_of(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("sku", DataType::Utf8, false),
        ]);
        let rows = Schema::new(vec![Field::new("id", DataType::Utf8, false)]);
        let error = plan_evolution(&table, &rows)
            .expect_err("refused")
            .to_string();
        assert!(error.contains("column id has type long"), "{error}");
        assert!(error.contains("column sku is required"), "{error}");
    }
}

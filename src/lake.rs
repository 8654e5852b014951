//! Where tables live and how they are opened or created: `<lake>/<layer>/<table>` on a local folder
//! or S3 (endpoint and credentials from the standard `AWS_*` variables).

use std::sync::Arc;

use deltalake::arrow::array::{new_null_array, ArrayRef, RecordBatch};
use deltalake::arrow::compute::cast;
use deltalake::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use deltalake::arrow::error::ArrowError;
use deltalake::kernel::engine::arrow_conversion::{TryFromKernel, TryIntoKernel};
use deltalake::kernel::{StructField, StructType};
use deltalake::protocol::SaveMode;
use deltalake::{DeltaTable, DeltaTableError};
use url::Url;

/// The Silver partition columns, derived from event time (UTC).
pub const PARTITION_COLUMNS: [&str; 2] = ["event_date", "event_hour"];

/// Registers the S3 object-store handlers (idempotent; the `deltalake` crate's own constructor may
/// already have done it, but linking order must not decide whether `s3://` works).
pub fn register_object_stores() {
    deltalake::aws::register_handlers(None);
}

/// `<lake>/<layer>/<name>` as a table URL.
pub fn table_url(lake_url: &str, layer: &str, name: &str) -> Result<Url, DeltaTableError> {
    let text = format!("{}/{layer}/{name}", lake_url.trim_end_matches('/'));
    if let Some(path) = text.strip_prefix("file://") {
        std::fs::create_dir_all(path)
            .map_err(|e| DeltaTableError::InvalidTableLocation(format!("{text}: {e}")))?;
    }
    Url::parse(&text).map_err(|e| DeltaTableError::InvalidTableLocation(format!("{text}: {e}")))
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

/// Opens the table at `url`, creating it with `data_schema` plus the partition columns when it does
/// not exist yet. Several replicas may race to create it: the loser loads the winner's table.
/// An existing table is returned as it is: [`plan_evolution`] decides how it meets the reader.
pub async fn open_or_create(
    url: Url,
    data_schema: &Schema,
    table_name: &str,
) -> Result<DeltaTable, DeltaTableError> {
    let mut fields: Vec<Field> = data_schema
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    fields.push(Field::new(PARTITION_COLUMNS[0], DataType::Date32, false));
    fields.push(Field::new(PARTITION_COLUMNS[1], DataType::Int32, false));
    let delta_schema: StructType = Arc::new(Schema::new(fields)).as_ref().try_into_kernel()?;
    let mut last_error = None;
    for _ in 0..5 {
        let table = DeltaTable::try_from_url(url.clone()).await?;
        if table.version().is_some() {
            return Ok(table);
        }
        let created = table
            .create()
            .with_table_name(table_name)
            .with_columns(delta_schema.fields().cloned())
            .with_partition_columns(PARTITION_COLUMNS)
            .with_save_mode(SaveMode::Ignore)
            .with_comment("Written by Strata: Bronze Kafka records, decoded, exactly once")
            .await;
        match created {
            Ok(table) => return Ok(table),
            Err(e) => last_error = Some(e), // lost the creation race: load again
        }
    }
    Err(last_error
        .unwrap_or_else(|| DeltaTableError::Generic("table creation did not settle".into())))
}

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
pub fn plan_evolution(table: &StructType, rows: &Schema) -> Result<Evolution, String> {
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
        return Err(problems.join("; "));
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

    #[test]
    fn snake_case_names() {
        assert_eq!(snake_case("shop.OrderPlaced"), "order_placed");
        assert_eq!(snake_case("HTTPRequest"), "http_request");
        assert_eq!(snake_case("Order"), "order");
        assert_eq!(snake_case("page_view2"), "page_view2");
    }

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
        let error = plan_evolution(&table, &rows).expect_err("refused");
        assert!(error.contains("column id has type long"), "{error}");
        assert!(error.contains("column sku is required"), "{error}");
    }

    #[test]
    fn table_urls() {
        let url = table_url("s3://bucket/pre/", "silver", "orders").expect("url");
        assert_eq!(url.as_str(), "s3://bucket/pre/silver/orders");
    }
}

//! Where tables live and how they are opened or created: `<lake>/<layer>/<table>` on a local folder
//! or S3 (endpoint and credentials from the standard `AWS_*` variables).

use std::sync::Arc;

use deltalake::arrow::datatypes::{DataType, Field, Schema};
use deltalake::kernel::engine::arrow_conversion::TryIntoKernel;
use deltalake::kernel::StructType;
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
            check_schema(&table, &delta_schema)?;
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

/// Refuses to write into a table whose columns are not the ones this reader schema produces: the
/// files would carry columns the table does not know (readers would silently ignore them).
fn check_schema(table: &DeltaTable, expected: &StructType) -> Result<(), DeltaTableError> {
    let actual = table.snapshot()?.schema();
    let shape = |s: &StructType| -> Vec<(String, String)> {
        s.fields()
            .map(|f| (f.name().to_string(), format!("{:?}", f.data_type())))
            .collect()
    };
    let (have, want) = (shape(&actual), shape(expected));
    if have != want {
        let missing: Vec<_> = want
            .iter()
            .filter(|f| !have.contains(f))
            .map(|(n, t)| format!("{n}: {t}"))
            .collect();
        let extra: Vec<_> = have
            .iter()
            .filter(|f| !want.contains(f))
            .map(|(n, t)| format!("{n}: {t}"))
            .collect();
        return Err(DeltaTableError::Generic(format!(
            "table {} has other columns than STRATA_READER_SCHEMA gives (not in table: {missing:?}; only in table: {extra:?}); \
             schema evolution is not supported yet",
            table.table_url()
        )));
    }
    Ok(())
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

    #[test]
    fn table_urls() {
        let url = table_url("s3://bucket/pre/", "silver", "orders").expect("url");
        assert_eq!(url.as_str(), "s3://bucket/pre/silver/orders");
    }
}

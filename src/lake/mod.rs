//! Where tables live and how they are opened or created: `<lake>/<layer>/<table>` on a local folder
//! or S3 (endpoint and credentials from the standard `AWS_*` variables).

pub mod commit;
pub mod compaction;
pub mod evolution;
pub mod files;
pub mod maintenance;
pub mod verify;

use std::sync::Arc;

use deltalake::arrow::datatypes::{DataType, Field, Schema};
use deltalake::kernel::engine::arrow_conversion::TryIntoKernel;
use deltalake::kernel::StructType;
use deltalake::logstore::{ObjectStoreFactory, ObjectStoreRef, StorageConfig};
use deltalake::protocol::SaveMode;
use deltalake::{DeltaTable, DeltaTableError};
use url::Url;

/// Why a table could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The reader schema cannot make this table (no event time field, a column of another type in
    /// the existing table, …): retrying cannot help.
    #[error("{0}")]
    Schema(String),
    /// The lake could not be reached: try again.
    #[error("{0}")]
    Storage(String),
}

/// The Silver partition columns, derived from event time (UTC).
pub const PARTITION_COLUMNS: [&str; 2] = ["event_date", "event_hour"];

/// Registers the S3 object-store handlers (idempotent; the `deltalake` crate's own constructor may
/// already have done it, but linking order must not decide whether `s3://` works).
pub fn register_object_stores() {
    deltalake::aws::register_handlers(None);
}

/// How long one S3 request is retried inside the object store (a 503 SlowDown, a reset
/// connection) before its error reaches Strata. Short, so a flush that cannot write says so within
/// seconds (`/readyz`, the log) and Strata's own backoff takes over, which keeps the files already
/// uploaded. The object store's default, about a minute of retries per request, would hold a
/// flush silent that long. A table's own `max_retries` or `retry_timeout` options win.
const S3_REQUEST_RETRIES: [(&str, &str); 2] = [("max_retries", "3"), ("retry_timeout", "15s")];

/// [`register_object_stores`], with Strata's settings for S3 stores: request retries bounded
/// ([`S3_REQUEST_RETRIES`]), and with a CA bundle (`AWS_CA_BUNDLE`, as the AWS SDKs name it)
/// S3-compatible endpoints whose certificate a private CA signed (MinIO, Ceph, on-premises
/// stores) are trusted too, besides the system's roots.
pub fn register_object_stores_trusting(
    ca_bundle: Option<&std::path::Path>,
) -> Result<(), DeltaTableError> {
    register_object_stores();
    let trusted = match ca_bundle {
        Some(bundle) => {
            // Checked now, so a bad file fails start-up rather than the first table open.
            deltalake::logstore::client_options_from_certificate(&bundle.to_string_lossy())?;
            Some(StorageConfig::parse_options([(
                "certificate_path",
                bundle.to_string_lossy().into_owned(),
            )])?)
        }
        None => None,
    };
    let factory = Arc::new(StrataS3 {
        inner: deltalake::aws::storage::S3ObjectStoreFactory::default(),
        trusted,
        bounded: StorageConfig::parse_options(S3_REQUEST_RETRIES)?,
    });
    for scheme in ["s3", "s3a"] {
        let url = Url::parse(&format!("{scheme}://"))
            .map_err(|e| DeltaTableError::Generic(e.to_string()))?;
        deltalake::logstore::object_store_factories().insert(url, factory.clone());
    }
    Ok(())
}

/// delta-rs's S3 store, with Strata's request retries and the CA bundle's certificate settings
/// when a table's options set none.
#[derive(Debug)]
struct StrataS3 {
    inner: deltalake::aws::storage::S3ObjectStoreFactory,
    /// Only its `certificate` is used.
    trusted: Option<StorageConfig>,
    /// Only its `retry` is used.
    bounded: StorageConfig,
}

impl ObjectStoreFactory for StrataS3 {
    fn parse_url_opts(
        &self,
        url: &Url,
        config: &StorageConfig,
    ) -> deltalake::DeltaResult<(ObjectStoreRef, deltalake::Path)> {
        let mut config = config.clone();
        if config.certificate.is_none() {
            config.certificate = self.trusted.as_ref().and_then(|t| t.certificate.clone());
        }
        let own_retries = config
            .raw
            .keys()
            .any(|k| k.starts_with("max_retries") || k.starts_with("retry_timeout"));
        if !own_retries {
            config.retry = self.bounded.retry.clone();
        }
        self.inner.parse_url_opts(url, &config)
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_bundle_becomes_the_stores_certificate_setting() {
        let parsed =
            StorageConfig::parse_options([("certificate_path", "/etc/ca.pem")]).expect("options");
        assert!(
            parsed.certificate.is_some(),
            "the option key delta-rs reads"
        );
        let missing =
            register_object_stores_trusting(Some(std::path::Path::new("/nonexistent/ca.pem")));
        assert!(missing.is_err());
    }

    #[test]
    fn s3_request_retries_are_bounded() {
        let bounded = StorageConfig::parse_options(S3_REQUEST_RETRIES).expect("options");
        assert_eq!(bounded.retry.max_retries, 3);
        assert_eq!(
            bounded.retry.retry_timeout,
            std::time::Duration::from_secs(15)
        );
    }

    #[test]
    fn table_urls() {
        let url = table_url("s3://bucket/pre/", "silver", "orders").expect("url");
        assert_eq!(url.as_str(), "s3://bucket/pre/silver/orders");
    }
}

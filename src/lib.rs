//! Strata: Bronze Kafka topics (Confluent-framed Avro) into exactly-once Delta Lake tables.
//!
//! The modules, in the order a record meets them:
//!
//! - [`config`]: the one typed configuration, from environment variables.
//! - [`source`]: the Kafka consumer thread; rebalances as messages with an acknowledgement.
//! - [`wire`]: the Confluent wire format (magic byte, schema id, body).
//! - [`registry`]: writer schemas by id and subjects (Confluent Schema Registry or a folder), cached.
//! - [`catalog`]: registry questions retried through outages, reader schemas, opening tables.
//! - [`tables`]: one Silver table per record type: decoder, writer, committer, buffers, evolution.
//! - [`compat`]: schema compatibility modes with Confluent's meaning.
//! - [`decode`]: Avro straight into Arrow, writer resolved to reader; one verdict per record.
//! - [`dlq`]: rejected records to the dead-letter topic, with the reason in headers.
//! - [`kafka`]: client settings shared by producers and the admin client; topic creation.
//! - [`silver`]: Parquet files partitioned by event date and hour.
//! - [`commit`]: the commit protocol (files + `txn` offsets in one Delta commit, fenced).
//! - [`pipeline`]: the topology, the only module that knows how the others connect.
//! - [`metrics`]: Prometheus metrics, `/healthz`, `/readyz`.
//! - [`lake`]: table locations, creation, schema evolution plans.
//! - [`schemas_check`]: `strata schemas check`, for the people who own the schemas.
//! - [`gold`]: the pure cores of the Gold stage (windows, aggregates, sketches, partials).
//! - [`demo`]: the self-contained demo (embedded Kafka, generator, verification).
//! - [`verify`]: reads a table back, for the demo, tests and operators.
//! - [`models`]: the small types passed between stages.
//! - [`backoff`]: the retry pacing for every outside dependency.

pub mod backoff;
pub mod catalog;
pub mod commit;
pub mod compat;
pub mod config;
pub mod decode;
pub mod demo;
pub mod dlq;
#[cfg(feature = "failpoints")]
pub mod failpoints;
pub mod gold;
pub mod kafka;
pub mod lake;
pub mod metrics;
pub mod models;
pub mod pipeline;
pub mod registry;
pub mod schemas_check;
pub mod silver;
pub mod source;
pub mod tables;
pub mod verify;
pub mod wire;

/// A named crash point for the kill tests. Compiled to nothing unless the `failpoints` feature is
/// on; with it, `STRATA_FAILPOINT=name[:n]` freezes the process at the n-th hit (default 1) after
/// printing `STRATA_FAILPOINT_REACHED name` to stderr, so the test can SIGKILL it right there.
#[macro_export]
macro_rules! failpoint {
    ($name:literal) => {
        #[cfg(feature = "failpoints")]
        $crate::failpoints::hit($name);
    };
}

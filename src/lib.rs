//! Strata: Bronze Kafka topics (Confluent-framed Avro) into exactly-once Delta Lake tables.
//!
//! The folders follow a record through a replica; [`app`] is the only module that knows how they
//! connect. Dependencies point down this list: `app` uses everything, `silver` and `gold` use the
//! building blocks, and the building blocks use nothing above them.
//!
//! - [`app`]: the composition root: ordered start-up, the run, ordered shutdown.
//! - [`config`]: environment variables → typed settings, with `--help`.
//! - [`silver`]: the Silver pipeline: [`silver::pipeline`] (the event loop), [`silver::router`]
//!   (writer id → table), [`silver::decode`] (where a record is decoded), [`silver::ownership`]
//!   (where a partition is claimed, fenced and seeked back), [`silver::flush`] (files and commits),
//!   [`silver::dead_letters`] (rejected records, with their reason).
//! - [`gold`]: windowed aggregates: [`gold::stage1`] and [`gold::stage2`] run them; [`gold::core`]
//!   holds the pure cores ([`gold::core::closing`] is where a window closes).
//! - [`kafka`]: the consumer thread and its rebalance handshake, producer settings, topic admin.
//! - [`schema`]: the Confluent wire format, the registry client, compatibility, reader schemas,
//!   `strata schemas check`.
//! - [`lake`]: table locations and creation, schema evolution plans, Parquet files, and
//!   [`lake::commit`], the one place that decides durability.
//! - [`ops`]: metrics, readiness, the HTTP endpoint.
//! - [`models`]: the small types passed between stages; [`retry`]: the retry pacing;
//!   [`units`]: durations as text.
//! - `demo` (feature `demo`, not in production builds): the self-contained demo (embedded
//!   Kafka, generator, verification) and the fixtures tests and benchmarks share.

pub mod app;
pub mod config;
#[cfg(feature = "demo")]
pub mod demo;
#[cfg(feature = "failpoints")]
pub mod failpoints;
pub mod gold;
pub mod kafka;
pub mod lake;
pub mod models;
pub mod ops;
pub mod retry;
pub mod schema;
pub mod silver;
pub mod units;

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

//! The pure cores of Gold, each testable alone (no Kafka, no lake, no clock):
//!
//! - [`window`]: tumbling and hopping windows, and which windows an event time falls in;
//! - [`aggregate`]: the aggregate functions, their mergeable accumulators and final values
//!   (`count`, `sum`, `min`, `max`, `avg` exact whatever the merge order; `approx_distinct` with a
//!   HyperLogLog);
//! - [`hll`]: the HyperLogLog sketch and the stable hash everything here uses;
//! - [`heavy`]: a Space-Saving heavy-hitter sketch that finds hot keys;
//! - [`watermark`]: a source partition's watermark, row by row, and when a window is final;
//! - [`partial`]: a partial aggregate as it travels between stages (binary, versioned, bounded);
//! - [`epoch`]: an epoch's partials, salted when a key is hot, with partitions and sequences;
//! - [`preaggregate`]: local pre-aggregation of one source partition's epoch, with its hot keys;
//! - [`closing`]: merging partials, dropping replays, closing windows by watermark;
//! - [`merge`]: stage 2 of one partials partition with the merge hop of salted keys, and its
//!   snapshot;
//! - [`output`]: closed windows as Gold rows (no salt), and the Gold table's schema.

pub mod aggregate;
pub mod closing;
pub mod epoch;
pub mod heavy;
pub mod hll;
pub mod merge;
pub mod output;
pub mod partial;
pub mod preaggregate;
pub mod watermark;
pub mod window;

#[cfg(test)]
mod golden;

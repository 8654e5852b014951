//! The Silver pipeline: records from the consumer, routed to a table by writer schema id, decoded
//! into Arrow, buffered per table and partition, written as Parquet and committed exactly once.
//!
//! - [`pipeline`]: the replica's event loop (records, rebalances, ticks, shutdown, drain);
//! - [`router`]: writer schema id → table (unions included), the registry asked on the way;
//! - [`evolution`]: following a subject's newest version under `latest`;
//! - [`decode`]: Avro straight into Arrow, writer resolved to reader; one verdict per record;
//! - [`ownership`]: claiming partitions, fencing, seeking back, dropping work;
//! - [`flush`]: files and the commit of every table, then group offsets;
//! - [`tables`]: one Silver table per record type (decoder, writer, committer, buffers);
//! - [`to_gold`]: the hand-off to Gold stage 1 after each Silver commit;
//! - [`dead_letters`]: rejected records to the dead-letter topic, with the reason in headers.

pub mod dead_letters;
pub mod decode;
mod evolution;
mod flush;
mod ownership;
pub mod pipeline;
mod router;
mod routes;
pub mod tables;
mod to_gold;

//! Gold: event-time windowed aggregates. [`stage1`] (pre-aggregation after each Silver commit)
//! and [`stage2`] (merging partials, closing windows, committing Gold rows) run them in a
//! replica; [`core`] holds the pure cores, each testable alone.

pub mod core;
pub mod stage1;
pub mod stage2;

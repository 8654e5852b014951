//! What operators see: Prometheus metrics ([`metrics`]: registration; [`events`]: one call per
//! observable event, counting and logging together; [`gold`]: Gold's series), readiness
//! ([`readiness`]), and the HTTP endpoint serving them ([`http`]).

pub mod events;
pub mod gold;
pub mod http;
pub mod metrics;
pub mod readiness;
mod series;

pub use metrics::Metrics;
pub use readiness::NotReady;

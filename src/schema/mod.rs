//! Schemas: the Confluent wire format ([`wire`]), the registry client ([`registry`]), registry
//! questions retried through outages ([`lookup`]), schema references made self-contained
//! ([`references`]), reader schemas ([`reader`]), compatibility with
//! Confluent's meaning ([`compat`]), and `strata schemas check` ([`check`]).
//!
//! Nothing here touches Kafka or the lake.

pub mod check;
pub mod compat;
pub mod lookup;
pub mod reader;
pub mod references;
pub mod registry;
pub mod wire;

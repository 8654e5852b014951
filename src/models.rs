//! The small named types that flow between pipeline stages.

use std::fmt;
use std::sync::Arc;

/// A Kafka topic partition.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicPartition {
    pub topic: Arc<str>,
    pub partition: i32,
}

impl TopicPartition {
    pub fn new(topic: impl Into<Arc<str>>, partition: i32) -> Self {
        Self {
            topic: topic.into(),
            partition,
        }
    }
}

impl fmt::Display for TopicPartition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.topic, self.partition)
    }
}

/// One consumed Bronze record, owned: its key and value are copied once out of librdkafka's
/// buffer, into blocks the source shares between many records (no allocation per record).
#[derive(Debug, Clone)]
pub struct SourceRecord {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    /// Kafka timestamp (create or log-append time), milliseconds since the epoch.
    pub timestamp_ms: Option<i64>,
    pub key: Option<bytes::Bytes>,
    pub value: Option<bytes::Bytes>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

impl SourceRecord {
    /// Bytes this record holds in memory (for buffer budgets).
    pub fn size(&self) -> usize {
        self.key.as_ref().map_or(0, |k| k.len())
            + self.value.as_ref().map_or(0, |v| v.len())
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len))
                .sum::<usize>()
    }
}

/// Why a record was not accepted; the value of the `strata.error.kind` dead-letter header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    BadMagic,
    EmptyValue,
    UnknownSchema,
    UnsupportedSchemaType,
    IncompatibleSchema,
    UnknownRecordType,
    ValueTooLarge,
    DecodeError,
    MissingEventTime,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 9] = [
        ErrorKind::BadMagic,
        ErrorKind::EmptyValue,
        ErrorKind::UnknownSchema,
        ErrorKind::UnsupportedSchemaType,
        ErrorKind::IncompatibleSchema,
        ErrorKind::UnknownRecordType,
        ErrorKind::ValueTooLarge,
        ErrorKind::DecodeError,
        ErrorKind::MissingEventTime,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::BadMagic => "bad_magic",
            ErrorKind::EmptyValue => "empty_value",
            ErrorKind::UnknownSchema => "unknown_schema",
            ErrorKind::UnsupportedSchemaType => "unsupported_schema_type",
            ErrorKind::IncompatibleSchema => "incompatible_schema",
            ErrorKind::UnknownRecordType => "unknown_record_type",
            ErrorKind::ValueTooLarge => "value_too_large",
            ErrorKind::DecodeError => "decode_error",
            ErrorKind::MissingEventTime => "missing_event_time",
        }
    }
}

/// A record-level verdict: the record goes to the dead-letter topic with this reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub kind: ErrorKind,
    pub message: String,
}

impl Rejection {
    pub fn new(kind: ErrorKind, message: String) -> Self {
        // Headers travel with every dead letter: keep the message short.
        let message = if message.len() > 1024 {
            let mut cut = 1024;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            format!("{}…", &message[..cut])
        } else {
            message
        };
        Self { kind, message }
    }
}

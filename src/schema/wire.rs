//! The Confluent wire format: byte 0 is the magic `0`, bytes 1..5 the big-endian schema id, then the
//! Avro body. Pure functions only; this module never allocates from input-controlled sizes.

use crate::models::{ErrorKind, Rejection};

/// Bytes before the Avro body.
pub const HEADER_LEN: usize = 5;
pub const MAGIC: u8 = 0;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Framed<'a> {
    pub schema_id: u32,
    pub body: &'a [u8],
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("record has no value (tombstone)")]
    Empty,
    #[error("value of {0} bytes is shorter than the 5-byte Confluent header")]
    Truncated(usize),
    #[error("magic byte is {0:#04x}, expected 0x00 (not Confluent-framed Avro)")]
    BadMagic(u8),
}

/// Splits a Kafka value into its schema id and Avro body.
pub fn parse(value: &[u8]) -> Result<Framed<'_>, WireError> {
    match value {
        [] => Err(WireError::Empty),
        [magic, ..] if *magic != MAGIC => Err(WireError::BadMagic(*magic)),
        [_, id0, id1, id2, id3, body @ ..] => Ok(Framed {
            schema_id: u32::from_be_bytes([*id0, *id1, *id2, *id3]),
            body,
        }),
        short => Err(WireError::Truncated(short.len())),
    }
}

/// Frames an Avro body (used by producers in tests, the demo generator and benches).
/// Reads an Avro `long` (zigzag varint, at most 10 bytes) from the start of `bytes`; returns it and
/// the bytes it took. `None` when it is truncated or overlong.
pub fn read_long(bytes: &[u8]) -> Option<(i64, usize)> {
    let mut value: u64 = 0;
    for (i, byte) in bytes.iter().take(10).enumerate() {
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            let decoded = (value >> 1) as i64 ^ -((value & 1) as i64);
            return Some((decoded, i + 1));
        }
    }
    None
}

pub fn frame(schema_id: u32, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.push(MAGIC);
    out.extend_from_slice(&schema_id.to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// The rejection of a value whose Confluent framing is broken.
pub fn frame_rejection(error: &WireError) -> Rejection {
    let kind = match error {
        WireError::Empty => ErrorKind::EmptyValue,
        _ => ErrorKind::BadMagic,
    };
    Rejection::new(kind, error.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_avro_longs() {
        assert_eq!(read_long(&[0x00]), Some((0, 1)));
        assert_eq!(read_long(&[0x01]), Some((-1, 1)));
        assert_eq!(read_long(&[0x04, 0xff]), Some((2, 1)));
        assert_eq!(read_long(&[0x80, 0x01]), Some((64, 2)));
        assert_eq!(read_long(&[0x80]), None, "truncated");
        assert_eq!(read_long(&[0xff; 11]), None, "overlong");
        assert_eq!(read_long(&[]), None);
    }
    use proptest::prelude::*;

    #[test]
    fn parses_header() {
        let framed = frame(0x0102_0304, b"body");
        assert_eq!(
            parse(&framed),
            Ok(Framed {
                schema_id: 0x0102_0304,
                body: b"body"
            })
        );
        assert_eq!(
            parse(&[0, 0, 0, 0, 7]),
            Ok(Framed {
                schema_id: 7,
                body: &[]
            })
        );
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!(parse(&[]), Err(WireError::Empty));
        assert_eq!(parse(&[0, 1, 2]), Err(WireError::Truncated(3)));
        assert_eq!(parse(b"{\"json\":1}"), Err(WireError::BadMagic(b'{')));
    }

    proptest! {
        #[test]
        fn frame_then_parse_round_trips(id in any::<u32>(), body in proptest::collection::vec(any::<u8>(), 0..64)) {
            let framed = frame(id, &body);
            prop_assert_eq!(parse(&framed), Ok(Framed { schema_id: id, body: &body }));
        }

        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..16)) {
            let _ = parse(&bytes);
        }
    }
}

//! Riak's Protocol Buffers API (port 8087) as dynakv speaks it: the message codes, the
//! messages, and the framing.
//!
//! The messages are written from Riak's published PB API documentation: their field numbers
//! and message codes are the wire contract every official Riak client (Java 2.x, Go, Erlang
//! `riakc_pb_socket`, Ruby, Python) relies on. Riak's `.proto` files are proto2; every field
//! here is `optional` (an `Option`), even the ones Riak marks `required`, so that a missing
//! required field is seen and answered with an error instead of being read as its default.
//!
//! A frame is a 4-byte big-endian length (counting the code byte and the body), a 1-byte
//! message code, and the protobuf body.

use thiserror::Error;

pub mod dt;
pub mod messages;
pub use messages::*;

/// Message codes (Riak's `riak_pb_messages.csv`).
pub mod code {
    pub const ERROR_RESP: u8 = 0;
    pub const PING_REQ: u8 = 1;
    pub const PING_RESP: u8 = 2;
    pub const GET_CLIENT_ID_REQ: u8 = 3;
    pub const GET_CLIENT_ID_RESP: u8 = 4;
    pub const SET_CLIENT_ID_REQ: u8 = 5;
    pub const SET_CLIENT_ID_RESP: u8 = 6;
    pub const GET_SERVER_INFO_REQ: u8 = 7;
    pub const GET_SERVER_INFO_RESP: u8 = 8;
    pub const GET_REQ: u8 = 9;
    pub const GET_RESP: u8 = 10;
    pub const PUT_REQ: u8 = 11;
    pub const PUT_RESP: u8 = 12;
    pub const DEL_REQ: u8 = 13;
    pub const DEL_RESP: u8 = 14;
    pub const LIST_BUCKETS_REQ: u8 = 15;
    pub const LIST_BUCKETS_RESP: u8 = 16;
    pub const LIST_KEYS_REQ: u8 = 17;
    pub const LIST_KEYS_RESP: u8 = 18;
    pub const GET_BUCKET_REQ: u8 = 19;
    pub const GET_BUCKET_RESP: u8 = 20;
    pub const SET_BUCKET_REQ: u8 = 21;
    pub const SET_BUCKET_RESP: u8 = 22;
    pub const MAP_RED_REQ: u8 = 23;
    pub const INDEX_REQ: u8 = 25;
    pub const INDEX_RESP: u8 = 26;
    pub const SEARCH_QUERY_REQ: u8 = 27;
    pub const RESET_BUCKET_REQ: u8 = 29;
    pub const RESET_BUCKET_RESP: u8 = 30;
    pub const GET_BUCKET_TYPE_REQ: u8 = 31;
    pub const SET_BUCKET_TYPE_REQ: u8 = 32;
    pub const GET_BUCKET_KEY_PREFLIST_REQ: u8 = 33;
    pub const GET_BUCKET_KEY_PREFLIST_RESP: u8 = 34;
    pub const CS_BUCKET_REQ: u8 = 40;
    pub const COUNTER_UPDATE_REQ: u8 = 50;
    pub const COUNTER_GET_REQ: u8 = 52;
    pub const COVERAGE_REQ: u8 = 70;
    pub const DT_FETCH_REQ: u8 = 80;
    pub const DT_FETCH_RESP: u8 = 81;
    pub const DT_UPDATE_REQ: u8 = 82;
    pub const DT_UPDATE_RESP: u8 = 83;
    pub const AUTH_REQ: u8 = 253;
    pub const AUTH_RESP: u8 = 254;
    pub const START_TLS: u8 = 255;
}

/// The special quorum values of Riak's PB API (`uint32` fields r, w, dw, pr, pw, rw).
pub mod quorum {
    pub const ONE: u32 = 4_294_967_294;
    pub const QUORUM: u32 = 4_294_967_293;
    pub const ALL: u32 = 4_294_967_292;
    pub const DEFAULT: u32 = 4_294_967_291;
}

/// Riak's error codes in `RpbErrorResp.errcode` (Riak sends 0 for every error).
pub const ERRCODE_GENERIC: u32 = 0;

/// Bytes of a frame's length prefix.
pub const LENGTH_BYTES: usize = 4;

/// Why a frame cannot be read.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("a frame of length 0 (a frame holds at least its message code)")]
    Empty,
    #[error("a frame of {length} bytes, more than the limit of {limit}")]
    TooLarge { length: u64, limit: usize },
}

/// The length of the frame whose 4-byte prefix is `prefix` (code byte and body), checked
/// against `limit` before any of the body is read.
pub fn frame_length(prefix: [u8; LENGTH_BYTES], limit: usize) -> Result<usize, FrameError> {
    let length = u32::from_be_bytes(prefix);
    if length == 0 {
        return Err(FrameError::Empty);
    }
    match usize::try_from(length) {
        Ok(length) if length <= limit => Ok(length),
        _ => Err(FrameError::TooLarge {
            length: u64::from(length),
            limit,
        }),
    }
}

/// Append one frame (`code` and `message` encoded) to `out`. A message longer than a frame
/// can say (4 GiB) is not encoded; callers bound what they send far below that.
pub fn encode_frame(out: &mut Vec<u8>, code: u8, message: &impl prost::Message) {
    let body = message.encoded_len();
    let Ok(length) = u32::try_from(body.saturating_add(1)) else {
        return;
    };
    out.reserve(LENGTH_BYTES + 1 + body);
    out.extend_from_slice(&length.to_be_bytes());
    out.push(code);
    // Encoding into a Vec cannot run out of room.
    let _ = message.encode(out);
}

/// Append a frame that is only a message code (ping, the empty responses).
pub fn encode_empty(out: &mut Vec<u8>, code: u8) {
    out.extend_from_slice(&1u32.to_be_bytes());
    out.push(code);
}

/// Append an `RpbErrorResp` frame.
pub fn encode_error(out: &mut Vec<u8>, message: &str) {
    encode_frame(
        out,
        code::ERROR_RESP,
        &RpbErrorResp {
            errmsg: Some(message.as_bytes().to_vec()),
            errcode: Some(ERRCODE_GENERIC),
        },
    );
}

/// A field on the wire: its number, and the payload of a length-delimited one.
pub type Field<'a> = (u32, Option<&'a [u8]>);

/// The encoding is not a well-formed sequence of protobuf fields.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("not a well-formed protobuf encoding")]
pub struct MalformedFields;

/// The fields of a protobuf message's encoding, in order, read from the wire format without
/// knowing the message (so fields a decoder would skip can be seen): each field's number and,
/// for a length-delimited field, its payload. `None` when the bytes are not a well-formed
/// sequence of fields.
pub fn fields(mut bytes: &[u8]) -> Option<Vec<Field<'_>>> {
    fn varint(bytes: &mut &[u8]) -> Option<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = bytes.split_first()?;
            *bytes = rest;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(value);
            }
        }
        None
    }
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let key = varint(&mut bytes)?;
        let number = u32::try_from(key >> 3).ok()?;
        let (skip, delimited) = match key & 7 {
            0 => {
                varint(&mut bytes)?;
                (0, false)
            }
            1 => (8, false),
            2 => (usize::try_from(varint(&mut bytes)?).ok()?, true),
            5 => (4, false),
            _ => return None,
        };
        let payload = bytes.get(..skip)?;
        bytes = &bytes[skip..];
        out.push((number, delimited.then_some(payload)));
    }
    Some(out)
}

/// The first field number of `message`'s encoding outside `known`, if any (a field a
/// decoder would skip without a word); `Err` when the bytes are not well-formed.
pub fn unknown_field(
    message: &[u8],
    known: std::ops::RangeInclusive<u32>,
) -> Result<Option<u32>, MalformedFields> {
    let fields = fields(message).ok_or(MalformedFields)?;
    Ok(fields
        .into_iter()
        .map(|(n, _)| n)
        .find(|n| !known.contains(n)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use prost::Message as _;

    #[test]
    fn frames_are_length_code_body() {
        let mut out = Vec::new();
        encode_empty(&mut out, code::PING_REQ);
        assert_eq!(out, [0, 0, 0, 1, 1]);
        out.clear();
        let get = RpbGetReq {
            bucket: Some(b"b".to_vec()),
            key: Some(b"k".to_vec()),
            ..RpbGetReq::default()
        };
        encode_frame(&mut out, code::GET_REQ, &get);
        // bucket (field 1, bytes) and key (field 2, bytes), as Riak's clients encode them.
        assert_eq!(out, [0, 0, 0, 7, 9, 0x0a, 1, b'b', 0x12, 1, b'k']);
        let length = frame_length(out[..4].try_into().unwrap(), 100).unwrap();
        assert_eq!(length, 7);
        assert_eq!(RpbGetReq::decode(&out[5..]).unwrap(), get);
    }

    #[test]
    fn a_frame_length_is_checked_before_its_body() {
        assert_eq!(frame_length([0, 0, 0, 0], 10), Err(FrameError::Empty));
        assert_eq!(
            frame_length([0xff, 0xff, 0xff, 0xff], 10),
            Err(FrameError::TooLarge {
                length: u64::from(u32::MAX),
                limit: 10
            })
        );
        assert_eq!(frame_length([0, 0, 0, 10], 10), Ok(10));
    }

    #[test]
    fn fields_a_decoder_would_skip_are_seen() {
        // RpbBucketProps with n_val (1) and a field 40 no version of Riak has.
        let props = [0x08, 3, 0xc0, 0x02, 1];
        assert_eq!(unknown_field(&props, 1..=29), Ok(Some(40)));
        assert_eq!(unknown_field(&props[..2], 1..=29), Ok(None));
        // Nested in RpbSetBucketReq as field 2.
        let mut request = vec![0x0a, 1, b'b', 0x12, props.len() as u8];
        request.extend_from_slice(&props);
        let fields = fields(&request).unwrap();
        assert_eq!(fields[1], (2, Some(props.as_slice())));
        assert!(unknown_field(&[0x0a, 5, b'x'], 1..=2).is_err(), "truncated");
        assert!(unknown_field(&[0x0b], 1..=2).is_err(), "group wire type");
    }

    #[test]
    fn field_numbers_are_riaks() {
        // RpbPutReq: content is field 4, return_body 7, type 16 (wire bytes by hand).
        let put = RpbPutReq {
            bucket: Some(b"b".to_vec()),
            content: Some(RpbContent {
                value: Some(b"v".to_vec()),
                ..RpbContent::default()
            }),
            return_body: Some(true),
            r#type: Some(b"t".to_vec()),
            ..RpbPutReq::default()
        };
        assert_eq!(
            put.encode_to_vec(),
            [
                0x0a, 1, b'b', 0x22, 3, 0x0a, 1, b'v', 0x38, 1, 0x82, 0x01, 1, b't'
            ]
        );
        // A quorum of "quorum" is the uint32 4294967293, a 5-byte varint.
        let get = RpbGetReq {
            r: Some(quorum::QUORUM),
            ..RpbGetReq::default()
        };
        assert_eq!(get.encode_to_vec(), [0x18, 0xfd, 0xff, 0xff, 0xff, 0x0f]);
    }
}

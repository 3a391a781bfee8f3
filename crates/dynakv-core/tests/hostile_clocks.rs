//! Issue 17 row 7: a clock counter near `u64::MAX`, from a peer's object or a client's
//! context, must be impossible to store: otherwise the coordinator's next dot wraps, every
//! later write it coordinates reuses old dots, and those writes are silently lost (also after
//! a restart, since the counter floor is recovered from what is stored).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use dynakv_core::codec::{Reader, Writer};
use dynakv_core::context::{self, ContextKey};
use dynakv_core::limits::MAX_CLOCK_COUNTER;
use dynakv_core::object::{Content, Object, PrunePolicy, WriteError, decode_clock, encode_clock};
use dynakv_core::version::{ActorId, VersionVector};

fn content(value: &[u8]) -> Content {
    Content {
        value: value.to_vec(),
        content_type: "text/plain".into(),
        last_modified_ms: 1,
        meta: vec![],
        deleted: false,
        indexes: Vec::new(),
        expires_ms: None,
    }
}

fn policy() -> PrunePolicy {
    PrunePolicy {
        threshold: usize::MAX,
        min_age_ms: 0,
        hard_limit: usize::MAX,
    }
}

fn clock_with(counter: u64) -> VersionVector {
    let mut clock = VersionVector::new();
    clock.observe(ActorId(7), counter, 1);
    clock
}

/// A write by actor 7 whose dot takes the last counter allowed.
fn written_at_the_last_counter() -> Object {
    Object::new()
        .update(
            &clock_with(MAX_CLOCK_COUNTER - 1),
            content(b"v"),
            ActorId(7),
            1,
            policy(),
        )
        .unwrap()
}

fn encoded(clock: &VersionVector) -> Vec<u8> {
    let mut w = Writer::with_capacity(16);
    encode_clock(&mut w, clock);
    w.buf
}

#[test]
fn clocks_with_counters_past_the_limit_do_not_decode() {
    for counter in [u64::MAX - 1, u64::MAX, MAX_CLOCK_COUNTER + 1] {
        let bytes = encoded(&clock_with(counter));
        assert!(
            decode_clock(&mut Reader::new(&bytes)).is_err(),
            "counter {counter} decoded"
        );
    }
    let bytes = encoded(&clock_with(MAX_CLOCK_COUNTER));
    assert_eq!(
        decode_clock(&mut Reader::new(&bytes)).unwrap(),
        clock_with(MAX_CLOCK_COUNTER)
    );
}

#[test]
fn an_object_from_a_peer_with_a_huge_counter_does_not_decode() {
    // A legitimate object at the highest counter, then its bytes edited as a forger would:
    // the actor's counter (in the clock and in the dot) set to 2^64 - 2.
    let object = written_at_the_last_counter();
    let bytes = object.encode();
    assert!(Object::decode(&bytes).is_ok());
    let mut limit = Writer::with_capacity(16);
    limit.varint(MAX_CLOCK_COUNTER);
    let mut wrapped = Writer::with_capacity(16);
    wrapped.varint(u64::MAX - 1);
    // Header: version, flags, CRC-32 of the body (little-endian); the forger recomputes it.
    let mut forged = bytes[..6].to_vec();
    let body = replace_all(&bytes[6..], &limit.buf, &wrapped.buf);
    forged[2..6].copy_from_slice(&crc32fast::hash(&body).to_le_bytes());
    forged.extend_from_slice(&body);
    assert_eq!(
        Object::decode(&forged).map(|_| ()),
        Err(dynakv_core::codec::DecodeError::Invalid(
            "clock counter out of range"
        )),
        "a wrapped counter decoded"
    );
}

fn replace_all(haystack: &[u8], needle: &[u8], with: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut i = 0;
    let mut replaced = 0;
    while i < haystack.len() {
        if haystack[i..].starts_with(needle) {
            out.extend_from_slice(with);
            i += needle.len();
            replaced += 1;
        } else {
            out.push(haystack[i]);
            i += 1;
        }
    }
    assert!(replaced >= 2, "clock and dot counters both replaced");
    out
}

#[test]
fn a_client_context_with_a_huge_counter_is_refused_even_with_a_valid_mac() {
    // Row 2 gave an attacker the MAC key; with it they signed such a context. It must still
    // not decode.
    let key = ContextKey::from_bytes([3; 32]);
    let text = context::encode(&key, b"b", b"k", &clock_with(u64::MAX - 1));
    assert!(context::decode(&key, b"b", b"k", &text).is_err());
}

#[test]
fn a_write_whose_dot_would_pass_the_limit_is_refused_not_wrapped() {
    let at_limit = clock_with(MAX_CLOCK_COUNTER);
    let refused = Object::new().update(&at_limit, content(b"v"), ActorId(7), 1, policy());
    assert_eq!(
        refused,
        Err(WriteError::CounterExhausted {
            limit: MAX_CLOCK_COUNTER
        })
    );
    // The node-wide floor is checked the same way.
    let refused = Object::new().update_after(
        &VersionVector::new(),
        content(b"v"),
        ActorId(7),
        u64::MAX,
        1,
        policy(),
    );
    assert!(matches!(refused, Err(WriteError::CounterExhausted { .. })));
    // Just below, the write goes through with the last counter.
    let ok = written_at_the_last_counter();
    assert_eq!(ok.clock().counter(ActorId(7)), MAX_CLOCK_COUNTER);
}

//! Convergent data types (Riak 2.x's): state-based CRDTs whose replicas merge themselves, so a
//! key holding one never has siblings.
//!
//! - [`PnCounter`]: increments and decrements per actor; merge takes each actor's maxima.
//! - [`OrSet`]: add-wins observed-remove set without tombstones (Riak's ORSWOT): an element
//!   carries the dots of the adds that put it there; a remove drops only the dots the
//!   client's context had seen, so an add concurrent with the remove survives.
//! - [`GSet`]: a set that only grows (union).
//! - [`Hll`]: HyperLogLog cardinality estimate (register-wise maximum).
//! - [`LwwRegister`] (the later write by wall clock, then actor) and [`EwFlag`] (enable
//!   wins over a concurrent disable): the fields a map holds besides counters and sets.
//!
//! Every merge is commutative, associative and idempotent (property tests in `tests.rs`).
//! Every bound is a named constant here; an operation past one is refused with a
//! [`CrdtError`] and changes nothing. Actors are the writing node's [`ActorId`].

use crate::version::ActorId;
use thiserror::Error;

mod counter;
mod deferred;
mod gset;
mod hll;
mod map;
mod register;
mod set;
#[cfg(test)]
mod tests;
mod update;
mod value;

pub use counter::PnCounter;
pub use deferred::{MAX_DEFERRED, MAX_DEFERRED_MERGED};
pub use gset::GSet;
pub use hll::{DEFAULT_HLL_PRECISION, Hll, MAX_HLL_PRECISION, MIN_HLL_PRECISION};
pub use map::{
    FieldKey, FieldKind, FieldOp, FieldValue, MAX_MAP_DEPTH, MAX_MAP_FIELDS, MapOp, OrMap,
};
pub use register::{EwFlag, LwwRegister, MAX_REGISTER_BYTES};
pub use set::{OrSet, SetContext, decode_context, encode_context};
pub use update::{
    DATATYPE_CONTENT_TYPE, DATATYPE_UPDATE_CONTENT_TYPE, MAX_UPDATE_OPS, Update, apply_update,
    merged_value,
};
pub use value::{Crdt, DataTypeKind, Op, parse_op};

/// Most elements a set (or a grow-only set) holds: an add past it is refused.
pub const MAX_SET_ELEMENTS: usize = 65_536;
/// Most elements a set may reach by merges: adds made concurrently on replicas that could not
/// see each other may together pass [`MAX_SET_ELEMENTS`], and merges keep them (so replicas
/// converge) up to this; only past it does a merge drop what does not fit (and then replicas
/// may disagree on the excess). A stored set larger than this does not decode.
pub const MAX_SET_ELEMENTS_MERGED: usize = 4 * MAX_SET_ELEMENTS;
/// Longest element of a set, in bytes.
pub const MAX_ELEMENT_BYTES: usize = 1024;
/// Most actors a counter or a set's clock names (each a node generation that wrote it).
pub const MAX_CRDT_ACTORS: usize = 4096;

/// Why a data type operation or decoding was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CrdtError {
    #[error("the set holds {MAX_SET_ELEMENTS} elements, the most it may")]
    TooManyElements,
    #[error("an element is longer than {MAX_ELEMENT_BYTES} bytes")]
    ElementTooLarge,
    #[error("more than {MAX_CRDT_ACTORS} actors have written this value")]
    TooManyActors,
    #[error("the counter would overflow")]
    Overflow,
    #[error(
        "cannot remove {0:?}: the context given has not seen it (read the set, then remove \
         with the context of that read)"
    )]
    NotPresent(String),
    #[error("maps nest at most {} deep", map::MAX_MAP_DEPTH)]
    TooDeep,
    #[error("wrong operation: {0}")]
    WrongOp(String),
    #[error("malformed data type: {0}")]
    Malformed(#[from] crate::codec::DecodeError),
}

/// Check an element a client gives.
pub fn check_element(element: &[u8]) -> Result<(), CrdtError> {
    if element.len() > MAX_ELEMENT_BYTES {
        return Err(CrdtError::ElementTooLarge);
    }
    Ok(())
}

/// A printable form of an element for an error message.
fn shown(element: &[u8]) -> String {
    String::from_utf8_lossy(element).into_owned()
}

/// The next counter of `actor` in `clock`, refused past the actor bound or on overflow.
fn next_counter(
    clock: &mut std::collections::BTreeMap<ActorId, u64>,
    actor: ActorId,
) -> Result<u64, CrdtError> {
    if !clock.contains_key(&actor) && clock.len() >= MAX_CRDT_ACTORS {
        return Err(CrdtError::TooManyActors);
    }
    let counter = clock
        .get(&actor)
        .copied()
        .unwrap_or(0)
        .checked_add(1)
        .ok_or(CrdtError::Overflow)?;
    clock.insert(actor, counter);
    Ok(counter)
}

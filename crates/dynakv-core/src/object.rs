//! Objects: a key's sibling set and its causal context, using dotted version vectors.
//!
//! An [`Object`] is a version vector (`clock`, everything this replica has seen of the key) and
//! a set of [`Sibling`]s, each a value tagged with the [`Dot`] of the write that made it. This is
//! the "DVV set" representation of Riak 2 and of Preguiça/Almeida's dotted version vectors: the
//! dot of each sibling is what lets two writes with the same stale context through the same
//! coordinator be kept apart (no sibling explosion, no lost update).
//!
//! Invariants (checked by the property tests below and `Object::check_invariants`):
//! - every sibling's dot is covered by `clock`;
//! - siblings are sorted by dot and dots are unique (one dot, one value);
//! - `sync` is commutative, associative and idempotent, so replicas converge whatever order
//!   versions arrive in;
//! - a write made with the context of a read replaces exactly the siblings that read saw;
//! - pruning only removes clock entries that no sibling's dot depends on, so it never drops a
//!   sibling (it may, in the worst case, make an old overwritten value reappear as a sibling).
//!
//! Laws of `sync(a, b)`: a sibling of `a` survives when `b` holds the same dot or `b`'s clock has
//! not seen it, and symmetrically; the clock is the pointwise maximum.

use crate::codec::{DecodeError, Reader, Writer};
use crate::limits;
use crate::version::{ActorId, Dot, VersionVector};
use thiserror::Error;

/// The user-visible part of one version.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Content {
    /// The opaque value (empty for a tombstone).
    pub value: Vec<u8>,
    /// MIME type given at store time (with any charset parameter).
    pub content_type: String,
    /// Coordinator wall-clock time of the write, ms since the Unix epoch.
    pub last_modified_ms: u64,
    /// User metadata (`X-Riak-Meta-*` headers), names lower-cased without the prefix.
    pub meta: Vec<(String, String)>,
    /// A tombstone: the key was deleted with this write's context.
    pub deleted: bool,
    /// Secondary index entries (`index::normalize`d: sorted, unique; none on a tombstone).
    pub indexes: Vec<crate::index::IndexEntry>,
    /// When the value expires (ms since the Unix epoch, the coordinator's clock; `None`:
    /// never). An expired value is answered as not found and removed by a tombstone.
    pub expires_ms: Option<u64>,
}

impl Content {
    /// A tombstone written at `now_ms`.
    pub fn tombstone(now_ms: u64) -> Self {
        Content {
            value: Vec::new(),
            content_type: String::new(),
            last_modified_ms: now_ms,
            meta: Vec::new(),
            deleted: true,
            indexes: Vec::new(),
            expires_ms: None,
        }
    }

    /// Whether the value has expired at `now_ms`.
    pub fn expired(&self, now_ms: u64) -> bool {
        self.expires_ms.is_some_and(|at| at <= now_ms)
    }
}

/// One version of a key: its content and the dot of the write that created it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sibling {
    pub dot: Dot,
    pub content: Content,
}

impl Sibling {
    /// A stable, replica-independent tag for this version (Riak's vtag / ETag): base62 of a hash
    /// of the dot.
    pub fn vtag(&self) -> String {
        vtag_of(self.dot)
    }
}

/// The vtag of a dot.
pub fn vtag_of(dot: Dot) -> String {
    const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut hasher = blake3::Hasher::new();
    hasher.update(&dot.actor.0.to_le_bytes());
    hasher.update(&dot.counter.to_le_bytes());
    let hash = hasher.finalize();
    let mut first = [0u8; 16];
    first.copy_from_slice(&hash.as_bytes()[..16]);
    let mut n = u128::from_le_bytes(first);
    let mut out = Vec::with_capacity(22);
    for _ in 0..22 {
        out.push(ALPHABET[(n % 62) as usize]);
        n /= 62;
    }
    String::from_utf8(out).unwrap_or_default()
}

/// Why a write could not be applied.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum WriteError {
    /// The write would leave more siblings than allowed: the client must resolve first.
    #[error(
        "the object already has {existing} siblings (limit {limit}): fetch it, resolve the siblings and write back with the context"
    )]
    TooManySiblings { existing: usize, limit: usize },
    /// The new dot's counter would pass [`limits::MAX_CLOCK_COUNTER`] (only a forged or
    /// corrupt clock gets there).
    #[error(
        "the clock of this key is exhausted (counter past {limit}): it was forged or corrupted"
    )]
    CounterExhausted { limit: u64 },
    /// The write would leave the object (all its siblings) larger than allowed.
    #[error(
        "the object would hold {bytes} bytes with its siblings (limit {limit}): fetch it, resolve the siblings and write back with the context"
    )]
    ObjectTooLarge { bytes: usize, limit: usize },
    /// A merge of two versions would hold more than a node can read back; the stored version
    /// is kept as it is.
    #[error(
        "merging the versions would make an object of {bytes} bytes and {siblings} siblings (limits {limit_bytes} and {limit_siblings}): resolve the key's siblings"
    )]
    MergeTooLarge {
        bytes: usize,
        siblings: usize,
        limit_bytes: usize,
        limit_siblings: usize,
    },
}

/// A key's versions and causal context.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Object {
    clock: VersionVector,
    siblings: Vec<Sibling>,
}

/// When clock pruning may remove entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrunePolicy {
    /// Prune only when the clock has more entries than this.
    pub threshold: usize,
    /// Never prune entries younger than this (unless the hard limit forces it).
    pub min_age_ms: u64,
    /// Entries beyond this are pruned whatever their age.
    pub hard_limit: usize,
}

impl Default for PrunePolicy {
    fn default() -> Self {
        PrunePolicy {
            threshold: limits::CLOCK_PRUNE_THRESHOLD,
            min_age_ms: limits::CLOCK_PRUNE_MIN_AGE_MS,
            hard_limit: limits::MAX_CLOCK_ENTRIES - limits::MAX_SIBLINGS,
        }
    }
}

const ENCODING_VERSION: u8 = 1;
const FLAG_ALL_TOMBSTONES: u8 = 1;
/// Some live sibling carries secondary index entries.
const FLAG_HAS_INDEXES: u8 = 2;
/// Every live sibling expires (the object's expiry is the latest of theirs).
const FLAG_EXPIRES: u8 = 4;
const SIBLING_FLAG_DELETED: u8 = 1;
/// The sibling's content carries index entries (written after its metadata).
const SIBLING_FLAG_INDEXES: u8 = 2;
/// The sibling's content expires (its expiry written after its index entries).
const SIBLING_FLAG_EXPIRES: u8 = 4;
/// Most siblings an encoded object may carry: `sync` never drops a sibling, so two replicas at
/// the write limit can merge to twice it.
pub const MAX_STORED_SIBLINGS: usize = 2 * limits::MAX_SIBLINGS;

impl Object {
    /// This object with only its first sibling (by dot), the clock unchanged: a merge that
    /// drops what it saw. Only the simulator's planted bug (`node::Bug::DropSiblingOnMerge`)
    /// uses it, to show the checkers catch a lost sibling; nothing else in the crate may.
    #[cfg(any(test, feature = "sim"))]
    pub(crate) fn keep_first_sibling_only(&self) -> Object {
        Object {
            clock: self.clock.clone(),
            siblings: self.siblings.iter().take(1).cloned().collect(),
        }
    }

    /// This object with only the sibling of `dot`, the clock unchanged: the simulator's
    /// planted `node::Bug::DatatypeMaxMerge` only.
    #[cfg(feature = "sim")]
    pub(crate) fn keep_only(&self, dot: crate::version::Dot) -> Object {
        Object {
            clock: self.clock.clone(),
            siblings: self
                .siblings
                .iter()
                .filter(|s| s.dot == dot)
                .cloned()
                .collect(),
        }
    }

    /// An object that has seen nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// The causal context: everything this object has seen.
    pub fn clock(&self) -> &VersionVector {
        &self.clock
    }

    /// Every sibling, tombstones included, ordered by dot.
    pub fn siblings(&self) -> &[Sibling] {
        &self.siblings
    }

    /// Siblings that are not tombstones.
    pub fn live_siblings(&self) -> impl Iterator<Item = &Sibling> {
        self.siblings.iter().filter(|s| !s.content.deleted)
    }

    /// True when there is no live value (absent, or only tombstones).
    pub fn is_deleted(&self) -> bool {
        self.live_siblings().next().is_none()
    }

    /// True when nothing was ever written (no clock, no siblings).
    pub fn is_empty(&self) -> bool {
        self.clock.is_empty() && self.siblings.is_empty()
    }

    /// The sibling with this vtag.
    pub fn sibling_by_vtag(&self, vtag: &str) -> Option<&Sibling> {
        self.siblings.iter().find(|s| s.vtag() == vtag)
    }

    /// A write at coordinator `actor`: the new `content`, made by a client whose last read
    /// returned `context`. Siblings the context covers are replaced; others stay as siblings.
    pub fn update(
        &self,
        context: &VersionVector,
        content: Content,
        actor: ActorId,
        now_ms: u64,
        prune: PrunePolicy,
    ) -> Result<Object, WriteError> {
        self.update_after(context, content, actor, 0, now_ms, prune)
    }

    /// [`Object::update`] whose new dot's counter also exceeds `floor`: the last counter
    /// `actor` issued for any key. A coordinator that passes its node-wide counter never
    /// issues a dot twice, even for a key whose history it no longer holds (a reaped
    /// tombstone, a key dropped after a ring change and written again before its handoff
    /// arrived): a reissued dot would make a new value look already seen to every client
    /// context and replica that saw the old one (Riak's KV679).
    pub fn update_after(
        &self,
        context: &VersionVector,
        content: Content,
        actor: ActorId,
        floor: u64,
        now_ms: u64,
        prune: PrunePolicy,
    ) -> Result<Object, WriteError> {
        let counter = self
            .clock
            .counter(actor)
            .max(context.counter(actor))
            .max(floor)
            .checked_add(1)
            .filter(|c| *c <= limits::MAX_CLOCK_COUNTER)
            .ok_or(WriteError::CounterExhausted {
                limit: limits::MAX_CLOCK_COUNTER,
            })?;
        let mut siblings: Vec<Sibling> = self
            .siblings
            .iter()
            .filter(|s| !context.covers(s.dot))
            .cloned()
            .collect();
        let existing = siblings.iter().filter(|s| !s.content.deleted).count();
        if !content.deleted && existing >= limits::MAX_SIBLINGS {
            return Err(WriteError::TooManySiblings {
                existing,
                limit: limits::MAX_SIBLINGS,
            });
        }
        // A tombstone beside live siblings adds nothing a reader could use: it only has to
        // record (in the clock) what it overwrote.
        let dot = Dot { actor, counter };
        if !(content.deleted && existing > 0) {
            siblings.push(Sibling { dot, content });
        }
        siblings.sort_by_key(|s| s.dot);
        let mut clock = self.clock.clone();
        clock.merge(context);
        clock.observe(actor, counter, now_ms);
        let mut object = Object { clock, siblings };
        object.prune(now_ms, prune);
        let bytes = object.encoded_len();
        if bytes > limits::MAX_WRITE_OBJECT_BYTES && bytes > self.encoded_len() {
            return Err(WriteError::ObjectTooLarge {
                bytes,
                limit: limits::MAX_WRITE_OBJECT_BYTES,
            });
        }
        Ok(object)
    }

    /// Whether a node could read this object back (its encoding within `MAX_OBJECT_BYTES`,
    /// its siblings within `MAX_STORED_SIBLINGS`): checked before any object is stored, so
    /// an object a node cannot use is never written.
    pub fn check_storable(&self) -> Result<(), WriteError> {
        let bytes = self.encoded_len();
        if bytes > limits::MAX_OBJECT_BYTES || self.siblings.len() > MAX_STORED_SIBLINGS {
            return Err(WriteError::MergeTooLarge {
                bytes,
                siblings: self.siblings.len(),
                limit_bytes: limits::MAX_OBJECT_BYTES,
                limit_siblings: MAX_STORED_SIBLINGS,
            });
        }
        Ok(())
    }

    /// The length of [`Object::encode`]'s output, computed without encoding.
    pub fn encoded_len(&self) -> usize {
        let bytes = |len: usize| varint_len(len as u64).saturating_add(len);
        let mut body = varint_len(self.clock.len() as u64);
        for (_, entry) in self.clock.entries() {
            body = body
                .saturating_add(8)
                .saturating_add(varint_len(entry.counter))
                .saturating_add(varint_len(entry.timestamp_ms));
        }
        body = body.saturating_add(varint_len(self.siblings.len() as u64));
        for sibling in &self.siblings {
            let c = &sibling.content;
            body = body
                .saturating_add(8)
                .saturating_add(varint_len(sibling.dot.counter))
                .saturating_add(varint_len(c.last_modified_ms))
                .saturating_add(1)
                .saturating_add(bytes(c.content_type.len()))
                .saturating_add(varint_len(c.meta.len() as u64));
            for (name, value) in &c.meta {
                body = body
                    .saturating_add(bytes(name.len()))
                    .saturating_add(bytes(value.len()));
            }
            if let Some(at) = c.expires_ms {
                body = body.saturating_add(varint_len(at));
            }
            if !c.indexes.is_empty() {
                body = body.saturating_add(varint_len(c.indexes.len() as u64));
                for (name, term) in &c.indexes {
                    body = body
                        .saturating_add(bytes(name.len()))
                        .saturating_add(bytes(term.len()));
                }
            }
            body = body.saturating_add(bytes(c.value.len()));
        }
        body.saturating_add(6)
    }

    /// Merge two replicas' versions of the same key (commutative, associative, idempotent).
    #[must_use]
    pub fn sync(&self, other: &Object) -> Object {
        let mut siblings: Vec<Sibling> = Vec::with_capacity(self.siblings.len());
        let mut a = self.siblings.iter().peekable();
        let mut b = other.siblings.iter().peekable();
        loop {
            match (a.peek(), b.peek()) {
                (Some(x), Some(y)) if x.dot == y.dot => {
                    siblings.push((*x).clone());
                    a.next();
                    b.next();
                }
                (Some(x), Some(y)) if x.dot < y.dot => {
                    if !other.clock.covers(x.dot) {
                        siblings.push((*x).clone());
                    }
                    a.next();
                }
                (Some(x), None) => {
                    if !other.clock.covers(x.dot) {
                        siblings.push((*x).clone());
                    }
                    a.next();
                }
                (Some(_) | None, Some(y)) => {
                    if !self.clock.covers(y.dot) {
                        siblings.push((*y).clone());
                    }
                    b.next();
                }
                (None, None) => break,
            }
        }
        let mut clock = self.clock.clone();
        clock.merge(&other.clock);
        Object { clock, siblings }
    }

    /// Keep only the last written sibling (by last-modified time, then dot): the
    /// `last_write_wins` resolution. This loses concurrent writes by design.
    pub fn resolve_last_write_wins(&mut self) {
        if let Some(winner) = self
            .siblings
            .iter()
            .max_by_key(|s| (s.content.last_modified_ms, s.dot))
            .cloned()
        {
            self.siblings = vec![winner];
        }
    }

    /// The sibling a reader of an `allow_mult = false` bucket sees: the newest live one.
    pub fn newest_live_sibling(&self) -> Option<&Sibling> {
        self.live_siblings()
            .max_by_key(|s| (s.content.last_modified_ms, s.dot))
    }

    /// Remove the oldest clock entries past the policy's threshold, never an entry that a
    /// sibling's dot needs.
    pub fn prune(&mut self, now_ms: u64, policy: PrunePolicy) {
        if self.clock.len() <= policy.threshold {
            return;
        }
        let mut candidates: Vec<(u64, ActorId)> = self
            .clock
            .entries()
            .filter(|(actor, _)| !self.siblings.iter().any(|s| s.dot.actor == *actor))
            .map(|(actor, entry)| (entry.timestamp_ms, actor))
            .collect();
        candidates.sort_unstable();
        for (timestamp_ms, actor) in candidates {
            let len = self.clock.len();
            let old_enough = now_ms.saturating_sub(timestamp_ms) >= policy.min_age_ms;
            if len > policy.hard_limit || (len > policy.threshold && old_enough) {
                self.clock.remove(actor);
            } else {
                break;
            }
        }
    }

    /// Check the structural invariants; used by tests and after decoding.
    pub fn check_invariants(&self) -> Result<(), &'static str> {
        for pair in self.siblings.windows(2) {
            if pair[0].dot >= pair[1].dot {
                return Err("siblings not sorted by unique dot");
            }
        }
        if self.siblings.iter().any(|s| !self.clock.covers(s.dot)) {
            return Err("a sibling's dot is not covered by the clock");
        }
        Ok(())
    }

    /// Encode for storage or the wire (format in docs/architecture.md).
    pub fn encode(&self) -> Vec<u8> {
        let value_bytes: usize = self.siblings.iter().map(|s| s.content.value.len()).sum();
        let mut body = Writer::with_capacity(value_bytes + 64 + 64 * self.siblings.len());
        encode_clock(&mut body, &self.clock);
        body.varint(self.siblings.len() as u64);
        for sibling in &self.siblings {
            let c = &sibling.content;
            body.u64_fixed(sibling.dot.actor.0);
            body.varint(sibling.dot.counter);
            body.varint(c.last_modified_ms);
            let mut flags = if c.deleted { SIBLING_FLAG_DELETED } else { 0 };
            if !c.indexes.is_empty() {
                flags |= SIBLING_FLAG_INDEXES;
            }
            if c.expires_ms.is_some() {
                flags |= SIBLING_FLAG_EXPIRES;
            }
            body.u8(flags);
            body.bytes(c.content_type.as_bytes());
            body.varint(c.meta.len() as u64);
            for (name, value) in &c.meta {
                body.bytes(name.as_bytes());
                body.bytes(value.as_bytes());
            }
            if !c.indexes.is_empty() {
                body.varint(c.indexes.len() as u64);
                for (name, term) in &c.indexes {
                    body.bytes(name.as_bytes());
                    body.bytes(term);
                }
            }
            if let Some(at) = c.expires_ms {
                body.varint(at);
            }
            body.bytes(&c.value);
        }
        let mut out = Vec::with_capacity(body.buf.len() + 6);
        out.push(ENCODING_VERSION);
        let mut flags = if self.is_deleted() {
            FLAG_ALL_TOMBSTONES
        } else {
            0
        };
        if self.live_siblings().any(|s| !s.content.indexes.is_empty()) {
            flags |= FLAG_HAS_INDEXES;
        }
        if self.expires_ms().is_some() {
            flags |= FLAG_EXPIRES;
        }
        out.push(flags);
        out.extend_from_slice(&crc32fast::hash(&body.buf).to_le_bytes());
        out.extend_from_slice(&body.buf);
        out
    }

    /// Whether an encoded object holds no live value, read from its header alone.
    pub fn encoded_is_deleted(bytes: &[u8]) -> Result<bool, DecodeError> {
        match bytes {
            [ENCODING_VERSION, flags, ..] => Ok(flags & FLAG_ALL_TOMBSTONES != 0),
            [version, ..] => Err(DecodeError::UnknownVersion(*version)),
            [] => Err(DecodeError::Truncated),
        }
    }

    /// When every live sibling has expired (the latest of their expiries); `None` when some
    /// live sibling never expires, or there is none.
    pub fn expires_ms(&self) -> Option<u64> {
        let mut latest = None;
        for sibling in self.live_siblings() {
            let at = sibling.content.expires_ms?;
            latest = Some(latest.map_or(at, |l: u64| l.max(at)));
        }
        latest
    }

    /// This object as a client sees it at `now_ms`: its expired live siblings left out (the
    /// clock kept, so a write with its context overwrites them too).
    #[must_use]
    pub fn unexpired(&self, now_ms: u64) -> Object {
        if !self.siblings.iter().any(|s| s.content.expired(now_ms)) {
            return self.clone();
        }
        Object {
            clock: self.clock.clone(),
            siblings: self
                .siblings
                .iter()
                .filter(|s| s.content.deleted || !s.content.expired(now_ms))
                .cloned()
                .collect(),
        }
    }

    /// Whether an encoded object expires, read from its header alone.
    pub fn encoded_expires(bytes: &[u8]) -> bool {
        matches!(bytes, [ENCODING_VERSION, flags, ..] if flags & FLAG_EXPIRES != 0)
    }

    /// Whether an encoded object has live index entries, read from its header alone (an
    /// object that does not decode has none).
    pub fn encoded_has_indexes(bytes: &[u8]) -> bool {
        matches!(bytes, [ENCODING_VERSION, flags, ..] if flags & FLAG_HAS_INDEXES != 0)
    }

    /// Whether an encoded object uses what peer protocol version 3 cannot read: a value with
    /// index entries or an expiry. An object that does not decode is left to its receiver's
    /// own check (`false`).
    pub fn encoded_needs_v4(bytes: &[u8]) -> bool {
        if Self::encoded_expires(bytes) || Self::encoded_has_indexes(bytes) {
            return true;
        }
        Self::decode(bytes).is_ok_and(|object| {
            object
                .siblings
                .iter()
                .any(|s| !s.content.indexes.is_empty() || s.content.expires_ms.is_some())
        })
    }

    /// Decode, checking version, checksum, limits and invariants. Never panics.
    pub fn decode(bytes: &[u8]) -> Result<Object, DecodeError> {
        Self::decode_within(bytes, limits::MAX_OBJECT_BYTES)
    }

    /// [`Object::decode`] of an object read from this node's own storage, which may be up to
    /// `MAX_REPAIRABLE_OBJECT_BYTES` (written before writes checked sizes) so that its
    /// siblings can still be read and resolved.
    pub fn decode_stored(bytes: &[u8]) -> Result<Object, DecodeError> {
        Self::decode_within(bytes, limits::MAX_REPAIRABLE_OBJECT_BYTES)
    }

    fn decode_within(bytes: &[u8], max_bytes: usize) -> Result<Object, DecodeError> {
        if bytes.len() > max_bytes {
            return Err(DecodeError::LimitExceeded("object size"));
        }
        let mut header = Reader::new(bytes);
        let version = header.u8()?;
        if version != ENCODING_VERSION {
            return Err(DecodeError::UnknownVersion(version));
        }
        let _flags = header.u8()?;
        let crc_bytes = header.take(4)?;
        let mut crc = [0u8; 4];
        crc.copy_from_slice(crc_bytes);
        let body = &bytes[6..];
        if crc32fast::hash(body) != u32::from_le_bytes(crc) {
            return Err(DecodeError::Checksum);
        }
        let mut r = Reader::new(body);
        let clock = decode_clock(&mut r)?;
        let count = r.count(MAX_STORED_SIBLINGS, "sibling count")?;
        let mut siblings = Vec::with_capacity(count);
        for _ in 0..count {
            let actor = ActorId(r.u64_fixed()?);
            let counter = r.varint()?;
            if counter == 0 || counter > limits::MAX_CLOCK_COUNTER {
                return Err(DecodeError::Invalid("sibling dot counter out of range"));
            }
            let last_modified_ms = r.varint()?;
            let flags = r.u8()?;
            let content_type = r.string(limits::MAX_CONTENT_TYPE_BYTES, "content type")?;
            let meta_count = r.count(limits::MAX_META_ENTRIES, "metadata entries")?;
            let mut meta = Vec::with_capacity(meta_count);
            for _ in 0..meta_count {
                let name = r.string(limits::MAX_META_BYTES, "metadata name")?;
                let value = r.string(limits::MAX_META_BYTES, "metadata value")?;
                meta.push((name, value));
            }
            let mut indexes = Vec::new();
            if flags & SIBLING_FLAG_INDEXES != 0 {
                let count = r.count(crate::index::MAX_INDEX_ENTRIES, "index entries")?;
                for _ in 0..count {
                    let name = r.string(crate::index::MAX_INDEX_NAME_BYTES, "index name")?;
                    let term = r
                        .bytes(crate::index::MAX_INDEX_TERM_BYTES, "index term")?
                        .to_vec();
                    indexes.push((name, term));
                }
            }
            let expires_ms = if flags & SIBLING_FLAG_EXPIRES != 0 {
                Some(r.varint()?)
            } else {
                None
            };
            let value = r
                .bytes(limits::HARD_MAX_VALUE_BYTES, "value size")?
                .to_vec();
            siblings.push(Sibling {
                dot: Dot { actor, counter },
                content: Content {
                    value,
                    content_type,
                    last_modified_ms,
                    meta,
                    deleted: flags & SIBLING_FLAG_DELETED != 0,
                    indexes,
                    expires_ms,
                },
            });
        }
        r.finish()?;
        let object = Object { clock, siblings };
        object.check_invariants().map_err(DecodeError::Invalid)?;
        Ok(object)
    }
}

/// Bytes of a LEB128 varint of `value`.
fn varint_len(value: u64) -> usize {
    let bits = 64 - value.leading_zeros() as usize;
    bits.div_ceil(7).max(1)
}

/// Encode a version vector (entry count, then actor, counter, timestamp per entry).
pub fn encode_clock(w: &mut Writer, clock: &VersionVector) {
    w.varint(clock.len() as u64);
    for (actor, entry) in clock.entries() {
        w.u64_fixed(actor.0);
        w.varint(entry.counter);
        w.varint(entry.timestamp_ms);
    }
}

/// Decode an optional context sent between nodes (a forwarded put's), written by
/// [`encode_clock`].
pub fn decode_context(bytes: Option<&[u8]>) -> Result<Option<VersionVector>, DecodeError> {
    bytes.map(|b| decode_clock(&mut Reader::new(b))).transpose()
}

/// Decode a version vector written by [`encode_clock`]; actors must be strictly increasing
/// and counters non-zero.
pub fn decode_clock(r: &mut Reader<'_>) -> Result<VersionVector, DecodeError> {
    let count = r.count(limits::MAX_CLOCK_ENTRIES, "clock entries")?;
    let mut clock = VersionVector::new();
    let mut previous: Option<ActorId> = None;
    for _ in 0..count {
        let actor = ActorId(r.u64_fixed()?);
        let counter = r.varint()?;
        let timestamp_ms = r.varint()?;
        if counter == 0 {
            return Err(DecodeError::Invalid("zero counter in clock"));
        }
        if counter > limits::MAX_CLOCK_COUNTER {
            return Err(DecodeError::Invalid("clock counter out of range"));
        }
        if previous.is_some_and(|p| p >= actor) {
            return Err(DecodeError::Invalid("clock actors not strictly increasing"));
        }
        previous = Some(actor);
        clock.observe(actor, counter, timestamp_ms);
    }
    Ok(clock)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn value(len: usize, at: u64) -> Content {
        Content {
            value: vec![7u8; len],
            content_type: "text/plain".into(),
            last_modified_ms: at,
            meta: vec![("color".into(), "blue".into())],
            deleted: false,
            indexes: vec![("age_int".into(), b"5".to_vec())],
            expires_ms: Some(at + 60_000),
        }
    }

    #[test]
    fn encoded_len_is_the_length_of_the_encoding() {
        let mut object = Object::new();
        assert_eq!(object.encoded_len(), object.encode().len());
        for (i, len) in [0usize, 1, 127, 128, 300, 20_000].into_iter().enumerate() {
            let actor = ActorId(i as u64 % 3 + 1);
            object = object
                .update(
                    &VersionVector::new(),
                    value(len, 1 << (i * 9)),
                    actor,
                    5,
                    PrunePolicy::default(),
                )
                .unwrap();
            assert_eq!(object.encoded_len(), object.encode().len());
        }
        let tombstone = object
            .update(
                object.clock(),
                Content::tombstone(9),
                ActorId(9),
                9,
                PrunePolicy::default(),
            )
            .unwrap();
        assert_eq!(tombstone.encoded_len(), tombstone.encode().len());
    }

    /// Issue 17 row 13: blind writes of large values stop at `MAX_WRITE_OBJECT_BYTES` with a
    /// clear error (never an object no node can read back), and a write with the context
    /// resolves the siblings.
    #[test]
    fn blind_writes_stop_at_the_object_limit_and_a_resolving_write_passes() {
        const MIB: usize = 1024 * 1024;
        let mut object = Object::new();
        let mut refused = None;
        for i in 0..100u64 {
            match object.update(
                &VersionVector::new(),
                value(MIB, i),
                ActorId(1),
                i,
                PrunePolicy::default(),
            ) {
                Ok(next) => object = next,
                Err(e) => {
                    refused = Some((i, e));
                    break;
                }
            }
        }
        let (at, error) = refused.unwrap();
        assert!(
            matches!(error, WriteError::ObjectTooLarge { .. }),
            "{error}"
        );
        assert!(
            error.to_string().contains("resolve the siblings"),
            "{error}"
        );
        assert!(object.encoded_len() <= limits::MAX_WRITE_OBJECT_BYTES);
        assert_eq!(at as usize, object.siblings().len());
        assert!(object.check_storable().is_ok());
        let resolved = object
            .update(
                object.clock(),
                value(MIB, 200),
                ActorId(1),
                200,
                PrunePolicy::default(),
            )
            .unwrap();
        assert_eq!(resolved.siblings().len(), 1);
    }

    /// A merge that would make an object no node can read back is refused by
    /// `check_storable`; an object stored over the limit still decodes as a stored one.
    #[test]
    fn objects_over_the_decode_limit_are_not_storable_but_stored_ones_are_readable() {
        let sibling_bytes = limits::MAX_OBJECT_BYTES / 60 + 1;
        let mut clock = VersionVector::new();
        let mut siblings = Vec::new();
        for counter in 1..=60u64 {
            clock.observe(ActorId(1), counter, counter);
            siblings.push(Sibling {
                dot: Dot {
                    actor: ActorId(1),
                    counter,
                },
                content: value(sibling_bytes, counter),
            });
        }
        let big = Object { clock, siblings };
        assert!(matches!(
            big.check_storable(),
            Err(WriteError::MergeTooLarge { .. })
        ));
        let bytes = big.encode();
        assert_eq!(
            Object::decode(&bytes),
            Err(DecodeError::LimitExceeded("object size"))
        );
        assert_eq!(Object::decode_stored(&bytes).unwrap(), big);
        // A write with the context that saw every sibling replaces them all.
        let resolved = big
            .update(
                big.clock(),
                value(10, 100),
                ActorId(1),
                100,
                PrunePolicy::default(),
            )
            .unwrap();
        assert!(resolved.check_storable().is_ok());
        // A blind one would grow it: refused.
        assert!(matches!(
            big.update(
                &VersionVector::new(),
                value(10, 100),
                ActorId(1),
                100,
                PrunePolicy::default()
            ),
            Err(WriteError::ObjectTooLarge { .. })
        ));
    }

    /// An object expires when every live value does (at the latest expiry); a client never
    /// sees an expired value; a tombstone or a value without expiry keeps it from expiring.
    #[test]
    fn expiry_is_every_live_values_and_reads_leave_expired_ones_out() {
        let prune = PrunePolicy::default();
        let clock = VersionVector::new();
        let mut early = value(1, 10);
        early.expires_ms = Some(100);
        let mut late = value(1, 20);
        late.expires_ms = Some(200);
        let object = Object::new()
            .update(&clock, early, ActorId(1), 10, prune)
            .unwrap()
            .update(&clock, late, ActorId(2), 20, prune)
            .unwrap();
        assert_eq!(object.expires_ms(), Some(200));
        assert_eq!(object.unexpired(150).live_siblings().count(), 1);
        assert!(object.unexpired(200).is_deleted());
        assert_eq!(object.unexpired(200).clock(), object.clock());
        assert!(Object::encoded_expires(&object.encode()));
        assert_eq!(Object::decode(&object.encode()).unwrap(), object);
        let mut forever = value(1, 30);
        forever.expires_ms = None;
        let mixed = object
            .update(&clock, forever, ActorId(3), 30, prune)
            .unwrap();
        assert_eq!(mixed.expires_ms(), None);
        assert!(!Object::encoded_expires(&mixed.encode()));
        assert_eq!(mixed.unexpired(1000).live_siblings().count(), 1);
    }
}

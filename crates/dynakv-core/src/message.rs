//! Messages between nodes (the peer protocol, carried by the server's transport).
//!
//! Objects and clocks travel in their own versioned binary encodings (`Object::encode`,
//! `object::encode_clock`), so a message never holds a structure the receiver has not
//! validated: the receiver decodes and checks them like anything read from disk.
//! Every request carries the sender's ring version so a replica with a newer ring can refuse a
//! write coordinated from a stale one ([`PeerMessage::StaleRing`]).

use crate::membership::{ClusterState, Member};
use crate::storage::Durability;
use serde::{Deserialize, Serialize};

pub mod v3;

/// Byte strings as serde bytes (one length and a copy) rather than a sequence of `u8`s (one
/// call per byte). In postcard both are a varint length then the raw bytes, so the wire format
/// is the same; only the cost differs (values and objects are most of every message).
pub(crate) mod raw_bytes {
    use serde::{Deserializer, Serializer};

    #[allow(clippy::ptr_arg)] // serde's `with` passes the field as declared
    pub fn serialize<S: Serializer>(bytes: &Vec<u8>, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(bytes)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        deserializer.deserialize_byte_buf(ByteBuf)
    }

    pub(super) struct ByteBuf;

    impl<'de> serde::de::Visitor<'de> for ByteBuf {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a byte string")
        }

        fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }

        fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }

        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            // Self-describing formats (JSON) give bytes as a sequence of numbers.
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64 * 1024));
            while let Some(byte) = seq.next_element()? {
                out.push(byte);
            }
            Ok(out)
        }
    }
}

/// [`raw_bytes`] for an optional byte string.
pub(crate) mod optional_raw_bytes {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    /// Borrowed bytes, serialized as serde bytes (no copy).
    struct Borrowed<'a>(&'a [u8]);

    impl Serialize for Borrowed<'_> {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            serializer.serialize_bytes(self.0)
        }
    }

    #[derive(Deserialize)]
    struct Owned(#[serde(with = "super::raw_bytes")] Vec<u8>);

    #[allow(clippy::ref_option)] // serde's `with` passes the field as declared
    pub fn serialize<S: Serializer>(
        bytes: &Option<Vec<u8>>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match bytes {
            None => serializer.serialize_none(),
            Some(b) => serializer.serialize_some(&Borrowed(b)),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Vec<u8>>, D::Error> {
        Ok(Option::<Owned>::deserialize(deserializer)?.map(|w| w.0))
    }
}

/// A write's content as sent to a coordinator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireContent {
    #[serde(with = "raw_bytes")]
    pub value: Vec<u8>,
    pub content_type: String,
    pub meta: Vec<(String, String)>,
    pub deleted: bool,
    /// Secondary index entries (`index::normalize`d by the client API).
    pub indexes: Vec<crate::index::IndexEntry>,
    /// The value's time to live in seconds, when the client gave one (else the bucket's
    /// `ttl_secs`, if any, applies).
    pub ttl_secs: Option<u64>,
}

impl WireContent {
    /// When a value written at `now_ms` with this content expires (its own TTL), if it does.
    pub fn expires_at(&self, now_ms: u64) -> Option<u64> {
        self.ttl_secs
            .map(|secs| now_ms.saturating_add(secs.saturating_mul(1000)))
    }

    /// The stored content of a coordinator's write: stamped `stamp_ms` (the write's time, a
    /// forwarded write's carried from its forwarder), expiring its time to live after
    /// `wall_ms`, the coordinating node's own clock now. A forwarded stamp went through a
    /// clock offset estimated at the peers' handshake, which a slow handshake (packet loss)
    /// gets wrong by its delay; an expiry counted from it would let a value outlive its
    /// time to live by that much (the nemesis found 400 ms).
    pub fn into_content(self, stamp_ms: u64, wall_ms: u64) -> crate::object::Content {
        let expires_ms = self.expires_at(wall_ms);
        crate::object::Content {
            value: self.value,
            content_type: self.content_type,
            last_modified_ms: stamp_ms,
            meta: self.meta,
            deleted: self.deleted,
            indexes: self.indexes,
            expires_ms,
        }
    }
}

/// A secondary index query's share of one node (`PeerMessage::IndexQuery`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexRequest {
    pub bucket: String,
    pub index: String,
    #[serde(with = "raw_bytes")]
    pub start: Vec<u8>,
    #[serde(with = "raw_bytes")]
    pub end: Vec<u8>,
    pub after: Option<(Vec<u8>, String)>,
    pub limit: u32,
    pub partitions: Vec<u32>,
    pub partition_count: u32,
}

/// One key in a handoff batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoffEntry {
    pub bucket: String,
    pub key: String,
    /// `Object::encode` bytes.
    #[serde(with = "raw_bytes")]
    pub object: Vec<u8>,
}

/// A conditional write requirement, on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WirePrecondition {
    None,
    Absent,
    Matches(String),
    /// `encode_clock` bytes of the context the stored object must still have.
    Unmodified(#[serde(with = "raw_bytes")] Vec<u8>),
}

impl From<crate::replica::Precondition> for WirePrecondition {
    fn from(precondition: crate::replica::Precondition) -> Self {
        use crate::replica::Precondition;
        match precondition {
            Precondition::None => WirePrecondition::None,
            Precondition::Absent => WirePrecondition::Absent,
            Precondition::Matches(vtag) => WirePrecondition::Matches(vtag),
            Precondition::Unmodified(clock) => {
                let mut writer = crate::codec::Writer::default();
                crate::object::encode_clock(&mut writer, &clock);
                WirePrecondition::Unmodified(writer.buf)
            }
        }
    }
}

impl WirePrecondition {
    /// The precondition a peer sent; an `Unmodified` context that does not decode is an error.
    pub fn decode(self) -> Result<crate::replica::Precondition, crate::codec::DecodeError> {
        use crate::replica::Precondition;
        Ok(match self {
            WirePrecondition::None => Precondition::None,
            WirePrecondition::Absent => Precondition::Absent,
            WirePrecondition::Matches(vtag) => Precondition::Matches(vtag),
            WirePrecondition::Unmodified(bytes) => {
                let mut reader = crate::codec::Reader::new(&bytes);
                let clock = crate::object::decode_clock(&mut reader)?;
                reader.finish()?;
                Precondition::Unmodified(clock)
            }
        })
    }
}

/// Every peer request and reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerMessage {
    /// Gossip: the sender's state; the reply is the receiver's (merged) state.
    Gossip(Box<ClusterState>),
    /// A node asks to join; reply `JoinAccepted` or `Error`.
    JoinRequest {
        cluster_name: String,
        member: Member,
    },
    /// The cluster's state, for the new member to adopt. (No secret: every member derives its
    /// keys from the cluster secret its operator gave it, which never crosses the network.)
    JoinAccepted {
        state: Box<ClusterState>,
    },
    /// Read a replica's local copy; reply `ReplicaObject`.
    ReplicaGet {
        bucket: String,
        key: String,
        ring_version: u64,
        /// Asked of a fallback: also include what it holds as hints for this primary.
        hinted_for: Option<String>,
    },
    ReplicaObject {
        #[serde(with = "optional_raw_bytes")]
        object: Option<Vec<u8>>,
    },
    /// Merge a version into a replica; reply `Ack`, `StaleRing` or `Error`.
    ReplicaPut {
        bucket: String,
        key: String,
        #[serde(with = "raw_bytes")]
        object: Vec<u8>,
        durability: Durability,
        ring_version: u64,
    },
    /// Keep a version as a hint for `target` (sloppy quorum: the receiver stands in for an
    /// unreachable primary); reply `Ack`, `StaleRing` or `Error`.
    HintedPut {
        target: String,
        bucket: String,
        key: String,
        #[serde(with = "raw_bytes")]
        object: Vec<u8>,
        durability: Durability,
        ring_version: u64,
    },
    /// Coordinate a client write (sent by a node outside the key's preference list to one in
    /// it); reply `Coordinated` or `Failed`.
    CoordinatePut {
        bucket: String,
        key: String,
        /// `encode_clock` bytes of the client's authenticated context, if it sent one.
        #[serde(with = "optional_raw_bytes")]
        context: Option<Vec<u8>>,
        content: Box<WireContent>,
        w: Option<u32>,
        pw: Option<u32>,
        dw_given: bool,
        precondition: WirePrecondition,
        now_ms: u64,
        ring_version: u64,
    },
    /// The stored object after a coordinated write.
    Coordinated {
        #[serde(with = "raw_bytes")]
        object: Vec<u8>,
    },
    /// A coordinated write failed: the HTTP status and message to give the client.
    Failed {
        status: u16,
        message: String,
    },
    /// Keys moving to a node that enters their preference lists; reply `Ack`.
    Handoff {
        entries: Vec<HandoffEntry>,
        /// The sender's ring version: a receiver with a newer ring refuses (`StaleRing`), so
        /// keys are never handed to a node that has already dropped them.
        ring_version: u64,
    },
    /// One page of the receiver's live keys of a bucket, in key order, after `start_after`;
    /// reply `KeyPage`.
    ListKeys {
        bucket: String,
        start_after: Option<String>,
        limit: u32,
    },
    /// `next_after` is where the next page starts (`None` when the bucket is exhausted).
    KeyPage {
        keys: Vec<String>,
        next_after: Option<String>,
    },
    /// A secondary index query's share of the receiver: the results among the keys of
    /// `partitions` (of a ring of `partition_count`), see `index::Query`; reply `IndexPage`.
    IndexQuery(Box<IndexRequest>),
    /// At most the query's `limit` results, in (sortable term, key) order.
    IndexPage {
        hits: Vec<(Vec<u8>, String)>,
    },
    /// The buckets holding objects on the receiver; reply `Buckets`.
    ListBuckets,
    Buckets(Vec<String>),
    /// Anti-entropy: the receiver's segment hashes of a partition's tree; reply `AaeHashes`.
    AaeSegments {
        partition: u32,
    },
    AaeHashes {
        hashes: Vec<[u8; 16]>,
        /// The responder's own admission budget: the initiator repairs at most this many keys
        /// with it, so a peer whose foreground latency suffers slows the exchange too.
        budget: u32,
    },
    /// The leaves of the given segments; reply `AaeLeafHashes`.
    AaeLeaves {
        partition: u32,
        segments: Vec<u16>,
    },
    AaeLeafHashes {
        leaves: Vec<(u16, [u8; 16])>,
    },
    /// The keys (bucket, key, entry hash) in the given leaves; reply `AaeKeyHashes`.
    AaeKeys {
        partition: u32,
        leaves: Vec<u16>,
    },
    AaeKeyHashes {
        entries: Vec<(String, String, [u8; 16])>,
        /// More keys matched than one reply may carry.
        truncated: bool,
    },
    /// Tombstone reaping: delete the key if its stored bytes still hash to `expected` (the
    /// tombstone every primary was seen to hold); reply `Reaped`.
    Reap {
        bucket: String,
        key: String,
        expected: [u8; 16],
    },
    Reaped(bool),
    Ack,
    /// The receiver's ring is newer than the sender's: here is the receiver's state.
    StaleRing(Box<ClusterState>),
    Error(String),
    /// Before a reap: what does the receiver hold for this key? Reply `ReapState`.
    ReapCheck {
        bucket: String,
        key: String,
    },
    /// The receiver's stored object for the key (encoded), and whether it keeps a hint of it
    /// for any node.
    ReapState {
        #[serde(with = "optional_raw_bytes")]
        object: Option<Vec<u8>>,
        hinted: bool,
    },
}

impl PeerMessage {
    /// The durability a replica write (`ReplicaPut`, `HintedPut`) asks for; `None` for other
    /// messages.
    pub fn durability_mut(&mut self) -> Option<&mut Durability> {
        match self {
            PeerMessage::ReplicaPut { durability, .. }
            | PeerMessage::HintedPut { durability, .. } => Some(durability),
            _ => None,
        }
    }

    /// The variant's name, for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            PeerMessage::Gossip(_) => "Gossip",
            PeerMessage::JoinRequest { .. } => "JoinRequest",
            PeerMessage::JoinAccepted { .. } => "JoinAccepted",
            PeerMessage::ReplicaGet { .. } => "ReplicaGet",
            PeerMessage::ReplicaObject { .. } => "ReplicaObject",
            PeerMessage::ReplicaPut { .. } => "ReplicaPut",
            PeerMessage::HintedPut { .. } => "HintedPut",
            PeerMessage::Reap { .. } => "Reap",
            PeerMessage::Reaped(_) => "Reaped",
            PeerMessage::ReapCheck { .. } => "ReapCheck",
            PeerMessage::ReapState { .. } => "ReapState",
            PeerMessage::AaeSegments { .. } => "AaeSegments",
            PeerMessage::AaeHashes { .. } => "AaeHashes",
            PeerMessage::AaeLeaves { .. } => "AaeLeaves",
            PeerMessage::AaeLeafHashes { .. } => "AaeLeafHashes",
            PeerMessage::AaeKeys { .. } => "AaeKeys",
            PeerMessage::AaeKeyHashes { .. } => "AaeKeyHashes",
            PeerMessage::CoordinatePut { .. } => "CoordinatePut",
            PeerMessage::Coordinated { .. } => "Coordinated",
            PeerMessage::Failed { .. } => "Failed",
            PeerMessage::Handoff { .. } => "Handoff",
            PeerMessage::ListKeys { .. } => "ListKeys",
            PeerMessage::IndexQuery(_) => "IndexQuery",
            PeerMessage::IndexPage { .. } => "IndexPage",
            PeerMessage::ListBuckets => "ListBuckets",
            PeerMessage::Buckets(_) => "Buckets",
            PeerMessage::KeyPage { .. } => "KeyPage",
            PeerMessage::Ack => "Ack",
            PeerMessage::StaleRing(_) => "StaleRing",
            PeerMessage::Error(_) => "Error",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize)]
    struct Plain {
        object: Vec<u8>,
        context: Option<Vec<u8>>,
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Raw {
        #[serde(with = "raw_bytes")]
        object: Vec<u8>,
        #[serde(with = "optional_raw_bytes")]
        context: Option<Vec<u8>>,
    }

    #[test]
    fn byte_fields_keep_the_postcard_wire_format_and_round_trip() {
        let data: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        for context in [None, Some(Vec::new()), Some(data.clone())] {
            let plain = postcard::to_allocvec(&Plain {
                object: data.clone(),
                context: context.clone(),
            })
            .unwrap();
            let raw = Raw {
                object: data.clone(),
                context,
            };
            let encoded = postcard::to_allocvec(&raw).unwrap();
            assert_eq!(encoded, plain, "same bytes on the wire as a sequence of u8");
            assert_eq!(postcard::from_bytes::<Raw>(&encoded).unwrap(), raw);
        }
        let message = PeerMessage::ReplicaObject {
            object: Some(data.clone()),
        };
        let encoded = postcard::to_allocvec(&message).unwrap();
        assert_eq!(
            postcard::from_bytes::<PeerMessage>(&encoded).unwrap(),
            message
        );
        // A self-describing format gives the bytes back too.
        let json = serde_json::to_string(&raw_json()).unwrap();
        assert_eq!(serde_json::from_str::<Raw>(&json).unwrap(), raw_json());
    }

    fn raw_json() -> Raw {
        Raw {
            object: vec![1, 2, 3],
            context: Some(vec![4]),
        }
    }
}

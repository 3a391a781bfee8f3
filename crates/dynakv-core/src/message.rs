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

/// A write's content as sent to a coordinator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireContent {
    pub value: Vec<u8>,
    pub content_type: String,
    pub meta: Vec<(String, String)>,
    pub deleted: bool,
}

/// One key in a handoff batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoffEntry {
    pub bucket: String,
    pub key: String,
    /// `Object::encode` bytes.
    pub object: Vec<u8>,
}

/// A conditional write requirement, on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WirePrecondition {
    None,
    Absent,
    Matches(String),
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
    JoinAccepted {
        state: Box<ClusterState>,
        /// The cluster's context secret.
        secret: [u8; 32],
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
        object: Option<Vec<u8>>,
    },
    /// Merge a version into a replica; reply `Ack`, `StaleRing` or `Error`.
    ReplicaPut {
        bucket: String,
        key: String,
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
        context: Option<Vec<u8>>,
        content: WireContent,
        w: Option<u32>,
        pw: Option<u32>,
        dw_given: bool,
        precondition: WirePrecondition,
        now_ms: u64,
        ring_version: u64,
    },
    /// The stored object after a coordinated write.
    Coordinated {
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
}

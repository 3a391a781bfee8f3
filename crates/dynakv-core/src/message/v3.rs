//! Peer protocol version 3, the version before this one, still spoken to peers that have not
//! been upgraded yet (a rolling upgrade: see `docs/UPGRADING.md`).
//!
//! Version 4 changed two things on the wire:
//! - [`WireContent`](super::WireContent) gained `indexes` and `ttl_secs` (secondary indexes
//!   and expiry);
//! - [`PeerMessage::IndexQuery`](super::PeerMessage::IndexQuery) and `IndexPage` were added
//!   after `KeyPage`, which shifted the tags of every later variant.
//!
//! and it added what version 3 cannot read inside messages of the same shape: objects whose
//! values carry index entries or an expiry (object flags 2 and 4), data type updates (a put
//! whose content type is `crdt::DATATYPE_UPDATE_CONTENT_TYPE`, which a version 3 replica
//! would store as an opaque value) and the `riak_kv.index` permission in gossiped security
//! state.
//!
//! [`PeerMessage`] here is version 3's enum, variant for variant and field for field (its
//! postcard encoding is version 3's). [`to_v3`] converts a current message, refusing one
//! version 3 cannot carry (with the reason: the request fails as if that peer had failed,
//! and nothing is stored half-understood); [`from_v3`] converts back (always possible: a
//! version 3 write has no index entries and no time to live).

use super::{HandoffEntry, WireContent, WirePrecondition, optional_raw_bytes, raw_bytes};
use crate::membership::{ClusterState, Member};
use crate::storage::Durability;
use serde::{Deserialize, Serialize};

/// Version 3's write content: no index entries, no time to live.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireContentV3 {
    #[serde(with = "raw_bytes")]
    pub value: Vec<u8>,
    pub content_type: String,
    pub meta: Vec<(String, String)>,
    pub deleted: bool,
}

/// Version 3's peer messages (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub enum PeerMessage {
    Gossip(Box<ClusterState>),
    JoinRequest {
        cluster_name: String,
        member: Member,
    },
    JoinAccepted {
        state: Box<ClusterState>,
    },
    ReplicaGet {
        bucket: String,
        key: String,
        ring_version: u64,
        hinted_for: Option<String>,
    },
    ReplicaObject {
        #[serde(with = "optional_raw_bytes")]
        object: Option<Vec<u8>>,
    },
    ReplicaPut {
        bucket: String,
        key: String,
        #[serde(with = "raw_bytes")]
        object: Vec<u8>,
        durability: Durability,
        ring_version: u64,
    },
    HintedPut {
        target: String,
        bucket: String,
        key: String,
        #[serde(with = "raw_bytes")]
        object: Vec<u8>,
        durability: Durability,
        ring_version: u64,
    },
    CoordinatePut {
        bucket: String,
        key: String,
        #[serde(with = "optional_raw_bytes")]
        context: Option<Vec<u8>>,
        content: WireContentV3,
        w: Option<u32>,
        pw: Option<u32>,
        dw_given: bool,
        precondition: WirePrecondition,
        now_ms: u64,
        ring_version: u64,
    },
    Coordinated {
        #[serde(with = "raw_bytes")]
        object: Vec<u8>,
    },
    Failed {
        status: u16,
        message: String,
    },
    Handoff {
        entries: Vec<HandoffEntry>,
        ring_version: u64,
    },
    ListKeys {
        bucket: String,
        start_after: Option<String>,
        limit: u32,
    },
    KeyPage {
        keys: Vec<String>,
        next_after: Option<String>,
    },
    ListBuckets,
    Buckets(Vec<String>),
    AaeSegments {
        partition: u32,
    },
    AaeHashes {
        hashes: Vec<[u8; 16]>,
        budget: u32,
    },
    AaeLeaves {
        partition: u32,
        segments: Vec<u16>,
    },
    AaeLeafHashes {
        leaves: Vec<(u16, [u8; 16])>,
    },
    AaeKeys {
        partition: u32,
        leaves: Vec<u16>,
    },
    AaeKeyHashes {
        entries: Vec<(String, String, [u8; 16])>,
        truncated: bool,
    },
    Reap {
        bucket: String,
        key: String,
        expected: [u8; 16],
    },
    Reaped(bool),
    Ack,
    StaleRing(Box<ClusterState>),
    Error(String),
    ReapCheck {
        bucket: String,
        key: String,
    },
    ReapState {
        #[serde(with = "optional_raw_bytes")]
        object: Option<Vec<u8>>,
        hinted: bool,
    },
}

/// An encoded object version 3 can read: none of its values has index entries or an expiry.
fn object_for_v3(object: Vec<u8>) -> Result<Vec<u8>, String> {
    if crate::object::Object::encoded_needs_v4(&object) {
        Err("an object with secondary index entries or an expiry".to_owned())
    } else {
        Ok(object)
    }
}

fn state_for_v3(state: Box<ClusterState>) -> Result<Box<ClusterState>, String> {
    let uses_index = state.security.grants.values().any(|grant| {
        grant
            .value
            .as_ref()
            .is_some_and(|permissions| permissions.contains(&crate::security::Permission::Index))
    });
    if uses_index {
        Err("security state granting riak_kv.index".to_owned())
    } else {
        Ok(state)
    }
}

/// `message` as version 3 says it; `Err`: what in it version 3 cannot carry.
///
/// # Errors
/// Index queries and their pages, data type updates, writes with index entries or a time to
/// live, objects with either, and security state granting `riak_kv.index`.
pub fn to_v3(message: super::PeerMessage) -> Result<PeerMessage, String> {
    use super::PeerMessage as M;
    Ok(match message {
        M::Gossip(state) => PeerMessage::Gossip(state_for_v3(state)?),
        M::JoinRequest {
            cluster_name,
            member,
        } => PeerMessage::JoinRequest {
            cluster_name,
            member,
        },
        M::JoinAccepted { state } => PeerMessage::JoinAccepted {
            state: state_for_v3(state)?,
        },
        M::ReplicaGet {
            bucket,
            key,
            ring_version,
            hinted_for,
        } => PeerMessage::ReplicaGet {
            bucket,
            key,
            ring_version,
            hinted_for,
        },
        M::ReplicaObject { object } => PeerMessage::ReplicaObject {
            object: object.map(object_for_v3).transpose()?,
        },
        M::ReplicaPut {
            bucket,
            key,
            object,
            durability,
            ring_version,
        } => PeerMessage::ReplicaPut {
            bucket,
            key,
            object: object_for_v3(object)?,
            durability,
            ring_version,
        },
        M::HintedPut {
            target,
            bucket,
            key,
            object,
            durability,
            ring_version,
        } => PeerMessage::HintedPut {
            target,
            bucket,
            key,
            object: object_for_v3(object)?,
            durability,
            ring_version,
        },
        M::CoordinatePut {
            bucket,
            key,
            context,
            content,
            w,
            pw,
            dw_given,
            precondition,
            now_ms,
            ring_version,
        } => {
            let WireContent {
                value,
                content_type,
                meta,
                deleted,
                indexes,
                ttl_secs,
            } = *content;
            if !indexes.is_empty() {
                return Err("a write with secondary index entries".to_owned());
            }
            if ttl_secs.is_some() {
                return Err("a write with a time to live".to_owned());
            }
            if content_type == crate::crdt::DATATYPE_UPDATE_CONTENT_TYPE {
                return Err("a data type update".to_owned());
            }
            PeerMessage::CoordinatePut {
                bucket,
                key,
                context,
                content: WireContentV3 {
                    value,
                    content_type,
                    meta,
                    deleted,
                },
                w,
                pw,
                dw_given,
                precondition,
                now_ms,
                ring_version,
            }
        }
        M::Coordinated { object } => PeerMessage::Coordinated {
            object: object_for_v3(object)?,
        },
        M::Failed { status, message } => PeerMessage::Failed { status, message },
        M::Handoff {
            entries,
            ring_version,
        } => PeerMessage::Handoff {
            entries: entries
                .into_iter()
                .map(|entry| {
                    Ok(HandoffEntry {
                        object: object_for_v3(entry.object)?,
                        ..entry
                    })
                })
                .collect::<Result<_, String>>()?,
            ring_version,
        },
        M::ListKeys {
            bucket,
            start_after,
            limit,
        } => PeerMessage::ListKeys {
            bucket,
            start_after,
            limit,
        },
        M::KeyPage { keys, next_after } => PeerMessage::KeyPage { keys, next_after },
        M::IndexQuery(_) => return Err("a secondary index query".to_owned()),
        M::IndexPage { .. } => return Err("secondary index results".to_owned()),
        M::ListBuckets => PeerMessage::ListBuckets,
        M::Buckets(buckets) => PeerMessage::Buckets(buckets),
        M::AaeSegments { partition } => PeerMessage::AaeSegments { partition },
        M::AaeHashes { hashes, budget } => PeerMessage::AaeHashes { hashes, budget },
        M::AaeLeaves {
            partition,
            segments,
        } => PeerMessage::AaeLeaves {
            partition,
            segments,
        },
        M::AaeLeafHashes { leaves } => PeerMessage::AaeLeafHashes { leaves },
        M::AaeKeys { partition, leaves } => PeerMessage::AaeKeys { partition, leaves },
        M::AaeKeyHashes { entries, truncated } => PeerMessage::AaeKeyHashes { entries, truncated },
        M::Reap {
            bucket,
            key,
            expected,
        } => PeerMessage::Reap {
            bucket,
            key,
            expected,
        },
        M::Reaped(done) => PeerMessage::Reaped(done),
        M::Ack => PeerMessage::Ack,
        M::StaleRing(state) => PeerMessage::StaleRing(state_for_v3(state)?),
        M::Error(reason) => PeerMessage::Error(reason),
        M::ReapCheck { bucket, key } => PeerMessage::ReapCheck { bucket, key },
        M::ReapState { object, hinted } => PeerMessage::ReapState {
            object: object.map(object_for_v3).transpose()?,
            hinted,
        },
    })
}

/// A version 3 message as the current version says it.
pub fn from_v3(message: PeerMessage) -> super::PeerMessage {
    use super::PeerMessage as M;
    match message {
        PeerMessage::Gossip(state) => M::Gossip(state),
        PeerMessage::JoinRequest {
            cluster_name,
            member,
        } => M::JoinRequest {
            cluster_name,
            member,
        },
        PeerMessage::JoinAccepted { state } => M::JoinAccepted { state },
        PeerMessage::ReplicaGet {
            bucket,
            key,
            ring_version,
            hinted_for,
        } => M::ReplicaGet {
            bucket,
            key,
            ring_version,
            hinted_for,
        },
        PeerMessage::ReplicaObject { object } => M::ReplicaObject { object },
        PeerMessage::ReplicaPut {
            bucket,
            key,
            object,
            durability,
            ring_version,
        } => M::ReplicaPut {
            bucket,
            key,
            object,
            durability,
            ring_version,
        },
        PeerMessage::HintedPut {
            target,
            bucket,
            key,
            object,
            durability,
            ring_version,
        } => M::HintedPut {
            target,
            bucket,
            key,
            object,
            durability,
            ring_version,
        },
        PeerMessage::CoordinatePut {
            bucket,
            key,
            context,
            content,
            w,
            pw,
            dw_given,
            precondition,
            now_ms,
            ring_version,
        } => M::CoordinatePut {
            bucket,
            key,
            context,
            content: Box::new(WireContent {
                value: content.value,
                content_type: content.content_type,
                meta: content.meta,
                deleted: content.deleted,
                indexes: Vec::new(),
                ttl_secs: None,
            }),
            w,
            pw,
            dw_given,
            precondition,
            now_ms,
            ring_version,
        },
        PeerMessage::Coordinated { object } => M::Coordinated { object },
        PeerMessage::Failed { status, message } => M::Failed { status, message },
        PeerMessage::Handoff {
            entries,
            ring_version,
        } => M::Handoff {
            entries,
            ring_version,
        },
        PeerMessage::ListKeys {
            bucket,
            start_after,
            limit,
        } => M::ListKeys {
            bucket,
            start_after,
            limit,
        },
        PeerMessage::KeyPage { keys, next_after } => M::KeyPage { keys, next_after },
        PeerMessage::ListBuckets => M::ListBuckets,
        PeerMessage::Buckets(buckets) => M::Buckets(buckets),
        PeerMessage::AaeSegments { partition } => M::AaeSegments { partition },
        PeerMessage::AaeHashes { hashes, budget } => M::AaeHashes { hashes, budget },
        PeerMessage::AaeLeaves {
            partition,
            segments,
        } => M::AaeLeaves {
            partition,
            segments,
        },
        PeerMessage::AaeLeafHashes { leaves } => M::AaeLeafHashes { leaves },
        PeerMessage::AaeKeys { partition, leaves } => M::AaeKeys { partition, leaves },
        PeerMessage::AaeKeyHashes { entries, truncated } => M::AaeKeyHashes { entries, truncated },
        PeerMessage::Reap {
            bucket,
            key,
            expected,
        } => M::Reap {
            bucket,
            key,
            expected,
        },
        PeerMessage::Reaped(done) => M::Reaped(done),
        PeerMessage::Ack => M::Ack,
        PeerMessage::StaleRing(state) => M::StaleRing(state),
        PeerMessage::Error(reason) => M::Error(reason),
        PeerMessage::ReapCheck { bucket, key } => M::ReapCheck { bucket, key },
        PeerMessage::ReapState { object, hinted } => M::ReapState { object, hinted },
    }
}

#[cfg(test)]
mod tests {
    use super::{PeerMessage, WireContentV3 as WireContent, from_v3, to_v3};
    use crate::membership::{ClusterState, Member, MemberStatus};
    use crate::message::{HandoffEntry, WirePrecondition};
    use crate::ring::NodeId;
    use crate::storage::Durability;

    /// The postcard encodings of [`samples`] by dynakv at commit 9e2d5d7 (the last release
    /// speaking version 3), one per variant in its order: generated there with this same
    /// `samples` over its own `message::PeerMessage`.
    const GOLDEN: [&str; 28] = [
        "00016301026e31026e310e3132372e302e302e313a393030310e3132372e302e302e313a38303031017a010307010505050505050505050505050505050505050505050505050505050505050505010808026e31026e31026e31026e31026e31026e31026e31026e3101026e31017a000000000000000000",
        "010163026e310e3132372e302e302e313a393030310e3132372e302e302e313a38303031017a010307010505050505050505050505050505050505050505050505050505050505050505",
        "02016301026e31026e310e3132372e302e302e313a393030310e3132372e302e302e313a38303031017a010307010505050505050505050505050505050505050505050505050505050505050505010808026e31026e31026e31026e31026e31026e31026e31026e3101026e31017a000000000000000000",
        "030162016bac0201026e32",
        "0401080100090909090405",
        "050162016b0801000909090904050102",
        "06026e330162016b0801000909090904050002",
        "070162016b0102010201760a746578742f706c61696e0101610162000102000102017480d095ffbc3104",
        "08080100090909090405",
        "09f703026e6f",
        "0a010162016b08010009090909040505",
        "0b016201016164",
        "0c01016b00",
        "0d",
        "0e010162",
        "0f03",
        "1001010101010101010101010101010101010a",
        "1103020102",
        "12010102020202020202020202020202020202",
        "13030104",
        "14010162016b0303030303030303030303030303030301",
        "150162016b04040404040404040404040404040404",
        "1601",
        "17",
        "18016301026e31026e310e3132372e302e302e313a393030310e3132372e302e302e313a38303031017a010307010505050505050505050505050505050505050505050505050505050505050505010808026e31026e31026e31026e31026e31026e31026e31026e3101026e31017a000000000000000000",
        "190165",
        "1a0162016b",
        "1b0001",
    ];

    fn samples() -> Vec<PeerMessage> {
        let member = Member {
            id: NodeId("n1".into()),
            peer_addr: "127.0.0.1:9001".into(),
            http_addr: "127.0.0.1:8001".into(),
            zone: "z".into(),
            status: MemberStatus::Valid,
            version: 3,
            heartbeat: 7,
            public_key: Some([5; 32]),
        };
        let state = ClusterState::found("c", member.clone(), 8).unwrap();
        let object = vec![1_u8, 0, 9, 9, 9, 9, 4, 5];
        vec![
            PeerMessage::Gossip(Box::new(state.clone())),
            PeerMessage::JoinRequest {
                cluster_name: "c".into(),
                member,
            },
            PeerMessage::JoinAccepted {
                state: Box::new(state.clone()),
            },
            PeerMessage::ReplicaGet {
                bucket: "b".into(),
                key: "k".into(),
                ring_version: 300,
                hinted_for: Some("n2".into()),
            },
            PeerMessage::ReplicaObject {
                object: Some(object.clone()),
            },
            PeerMessage::ReplicaPut {
                bucket: "b".into(),
                key: "k".into(),
                object: object.clone(),
                durability: Durability::Buffered,
                ring_version: 2,
            },
            PeerMessage::HintedPut {
                target: "n3".into(),
                bucket: "b".into(),
                key: "k".into(),
                object: object.clone(),
                durability: Durability::Fsync,
                ring_version: 2,
            },
            PeerMessage::CoordinatePut {
                bucket: "b".into(),
                key: "k".into(),
                context: Some(vec![1, 2]),
                content: WireContent {
                    value: b"v".to_vec(),
                    content_type: "text/plain".into(),
                    meta: vec![("a".into(), "b".into())],
                    deleted: false,
                },
                w: Some(2),
                pw: None,
                dw_given: true,
                precondition: WirePrecondition::Matches("t".into()),
                now_ms: 1_700_000_000_000,
                ring_version: 4,
            },
            PeerMessage::Coordinated {
                object: object.clone(),
            },
            PeerMessage::Failed {
                status: 503,
                message: "no".into(),
            },
            PeerMessage::Handoff {
                entries: vec![HandoffEntry {
                    bucket: "b".into(),
                    key: "k".into(),
                    object: object.clone(),
                }],
                ring_version: 5,
            },
            PeerMessage::ListKeys {
                bucket: "b".into(),
                start_after: Some("a".into()),
                limit: 100,
            },
            PeerMessage::KeyPage {
                keys: vec!["k".into()],
                next_after: None,
            },
            PeerMessage::ListBuckets,
            PeerMessage::Buckets(vec!["b".into()]),
            PeerMessage::AaeSegments { partition: 3 },
            PeerMessage::AaeHashes {
                hashes: vec![[1; 16]],
                budget: 10,
            },
            PeerMessage::AaeLeaves {
                partition: 3,
                segments: vec![1, 2],
            },
            PeerMessage::AaeLeafHashes {
                leaves: vec![(1, [2; 16])],
            },
            PeerMessage::AaeKeys {
                partition: 3,
                leaves: vec![4],
            },
            PeerMessage::AaeKeyHashes {
                entries: vec![("b".into(), "k".into(), [3; 16])],
                truncated: true,
            },
            PeerMessage::Reap {
                bucket: "b".into(),
                key: "k".into(),
                expected: [4; 16],
            },
            PeerMessage::Reaped(true),
            PeerMessage::Ack,
            PeerMessage::StaleRing(Box::new(state)),
            PeerMessage::Error("e".into()),
            PeerMessage::ReapCheck {
                bucket: "b".into(),
                key: "k".into(),
            },
            PeerMessage::ReapState {
                object: None,
                hinted: true,
            },
        ]
    }

    fn hex(bytes: &[u8]) -> String {
        use std::fmt::Write;
        bytes.iter().fold(String::new(), |mut out, b| {
            let _ = write!(out, "{b:02x}");
            out
        })
    }

    fn unhex(text: &str) -> Vec<u8> {
        (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
            .collect()
    }

    /// Every variant encodes as version 3 did, and a version 3 frame read here and said
    /// again in version 3 is the same bytes.
    #[test]
    fn the_mirror_encodes_every_variant_as_version_3_did() {
        let samples = samples();
        assert_eq!(samples.len(), GOLDEN.len());
        for (sample, golden) in samples.into_iter().zip(GOLDEN) {
            let bytes = postcard::to_stdvec(&sample).unwrap();
            assert_eq!(hex(&bytes), golden, "{sample:?}");
            let decoded: PeerMessage = postcard::from_bytes(&unhex(golden)).unwrap();
            let current = from_v3(decoded);
            let again = to_v3(current.clone()).unwrap();
            assert_eq!(
                hex(&postcard::to_stdvec(&again).unwrap()),
                golden,
                "{current:?}"
            );
        }
    }

    fn object(expires: Option<u64>, indexes: Vec<crate::index::IndexEntry>) -> Vec<u8> {
        let content = crate::object::Content {
            value: b"v".to_vec(),
            content_type: "text/plain".into(),
            last_modified_ms: 1,
            meta: Vec::new(),
            deleted: false,
            indexes,
            expires_ms: expires,
        };
        crate::object::Object::new()
            .update(
                &crate::version::VersionVector::new(),
                content,
                crate::version::ActorId(1),
                1,
                crate::object::PrunePolicy::default(),
            )
            .unwrap()
            .encode()
    }

    /// What version 3 cannot read is refused by name, never sent half-understood.
    #[test]
    fn what_version_3_cannot_carry_is_refused() {
        let put = |object: Vec<u8>| crate::message::PeerMessage::ReplicaPut {
            bucket: "b".into(),
            key: "k".into(),
            object,
            durability: Durability::Fsync,
            ring_version: 1,
        };
        assert!(to_v3(put(object(None, Vec::new()))).is_ok());
        for refused in [
            put(object(Some(5), Vec::new())),
            put(object(None, vec![("age_int".into(), b"5".to_vec())])),
        ] {
            let reason = to_v3(refused).unwrap_err();
            assert!(reason.contains("index entries or an expiry"), "{reason}");
        }
        let coordinate =
            |content: crate::message::WireContent| crate::message::PeerMessage::CoordinatePut {
                bucket: "b".into(),
                key: "k".into(),
                context: None,
                content: Box::new(content),
                w: None,
                pw: None,
                dw_given: false,
                precondition: WirePrecondition::None,
                now_ms: 1,
                ring_version: 1,
            };
        let plain = crate::message::WireContent {
            value: b"v".to_vec(),
            content_type: "text/plain".into(),
            meta: Vec::new(),
            deleted: false,
            indexes: Vec::new(),
            ttl_secs: None,
        };
        assert!(to_v3(coordinate(plain.clone())).is_ok());
        let with_ttl = crate::message::WireContent {
            ttl_secs: Some(5),
            ..plain.clone()
        };
        let with_index = crate::message::WireContent {
            indexes: vec![("x_bin".into(), b"y".to_vec())],
            ..plain.clone()
        };
        let update = crate::message::WireContent {
            content_type: crate::crdt::DATATYPE_UPDATE_CONTENT_TYPE.into(),
            ..plain
        };
        assert_eq!(
            to_v3(coordinate(with_ttl)).unwrap_err(),
            "a write with a time to live"
        );
        assert_eq!(
            to_v3(coordinate(with_index)).unwrap_err(),
            "a write with secondary index entries"
        );
        assert_eq!(to_v3(coordinate(update)).unwrap_err(), "a data type update");
        let query =
            crate::message::PeerMessage::IndexQuery(Box::new(crate::message::IndexRequest {
                bucket: "b".into(),
                index: "x_bin".into(),
                start: Vec::new(),
                end: Vec::new(),
                after: None,
                limit: 1,
                partitions: vec![0],
                partition_count: 8,
            }));
        assert!(to_v3(query).is_err());
        assert!(to_v3(crate::message::PeerMessage::IndexPage { hits: Vec::new() }).is_err());
        // Gossip granting riak_kv.index.
        let mut state = crate::test_support::settled_cluster(&["a"], 8);
        assert!(to_v3(crate::message::PeerMessage::Gossip(Box::new(state.clone()))).is_ok());
        let mut permissions = std::collections::BTreeSet::new();
        permissions.insert(crate::security::Permission::Index);
        state.security.grants.insert(
            ("all".into(), crate::security::Scope::Any),
            crate::security::Lww {
                timestamp_ms: 1,
                node: "a".into(),
                value: Some(permissions),
            },
        );
        let reason = to_v3(crate::message::PeerMessage::Gossip(Box::new(state))).unwrap_err();
        assert!(reason.contains("riak_kv.index"), "{reason}");
    }
}

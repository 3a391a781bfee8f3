//! The replica side of the peer protocol: one synchronous function answers every request a
//! node serves from its own storage (replica reads and writes, hints, handoff batches,
//! anti-entropy questions, tombstone checks and reaps).
//!
//! The server's peer handler and the simulator's node both call [`serve`], so the simulation
//! runs the very code that answers peers in production: the `StaleRing` refusals, the hint
//! bound, the merge of a handoff batch, what anti-entropy reports. What the node must do
//! besides sending the reply (count a hint, check that a stored key is still one it
//! replicates) comes back in [`Served`].
//!
//! Invariants:
//! - a write from a sender whose ring is older than this node's is refused (`StaleRing`,
//!   reported as [`Reply::StaleRing`] so the caller attaches its state), so nothing is stored
//!   by a node that may already have dropped the key after a ring change;
//! - every object that arrives is checked (`Object::decode`) before it is merged;
//! - a handoff batch is merged buffered and synced once before it is acknowledged.

use crate::aae_trees::AaeTrees;
use crate::bucket::BucketProps;
use crate::keys;
use crate::message::PeerMessage;
use crate::object::Object;
use crate::replica::{Replica, ReplicaError};
use crate::storage::Durability;
use std::collections::{BTreeMap, BTreeSet};
use thiserror::Error;

/// A request [`serve`] could not answer.
#[derive(Debug, Error)]
pub enum ServeError {
    #[error(transparent)]
    Replica(#[from] ReplicaError),
    #[error("the sender's object is corrupt: {0}")]
    Corrupt(crate::codec::DecodeError),
    #[error("storage failure: {0}")]
    Storage(String),
    #[error("not a request this node serves from storage: {0}")]
    NotServed(&'static str),
}

/// The node's view a request is served under.
#[derive(Debug, Clone)]
pub struct ServeContext {
    /// This node's ring version: writes from an older ring are refused.
    pub ring_version: u64,
    /// The properties of every bucket the request names ([`buckets_named`]); a bucket
    /// missing here gets the defaults.
    pub props: BTreeMap<String, BucketProps>,
    /// Most hinted keys kept per target node.
    pub hint_limit: usize,
    /// Whether the target of a `HintedPut` is a member ([`hint_target`]); a hint for any other
    /// name is refused (it would never be delivered, and would fill the disk).
    pub hint_target_member: bool,
    /// Most keys one anti-entropy key listing returns.
    pub max_leaf_keys: usize,
    /// This node's admission budget, told to an anti-entropy initiator.
    pub aae_budget: u32,
    /// The caller makes writes durable itself (a sans-IO node asks its driver for a sync):
    /// a `Handoff` batch is merged without the final sync, and [`Served::needs_sync`] says
    /// a sync must complete before the reply is sent.
    pub defer_sync: bool,
}

impl ServeContext {
    fn props(&self, bucket: &str) -> BucketProps {
        self.props.get(bucket).cloned().unwrap_or_default()
    }
}

/// The reply to send.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(clippy::large_enum_variant)] // built once per request and moved to the sender
pub enum Reply {
    Message(PeerMessage),
    /// The sender's ring is older than ours: reply `StaleRing` with this node's state.
    StaleRing,
}

/// What a hinted write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HintOutcome {
    Stored,
    /// The target's hint store is full: the version is not kept here.
    Dropped,
}

/// The reply and what the node must do besides sending it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Served {
    pub reply: Reply,
    /// Keys (bucket, key) stored as replicas: the node checks it still replicates them (a
    /// write planned under an older ring may land after this node's cleanup).
    pub stored: Vec<(String, String)>,
    pub hint: Option<HintOutcome>,
    /// A tombstone was reaped here.
    pub reaped: bool,
    /// The reply may be sent only after a sync (`ServeContext::defer_sync`).
    pub needs_sync: bool,
}

impl Served {
    fn reply(message: PeerMessage) -> Self {
        Served {
            reply: Reply::Message(message),
            stored: Vec::new(),
            hint: None,
            reaped: false,
            needs_sync: false,
        }
    }

    fn stale_ring() -> Self {
        Served {
            reply: Reply::StaleRing,
            ..Served::reply(PeerMessage::Ack)
        }
    }
}

/// The storage work a request needs, so an async shell knows where to run it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageCall {
    /// No storage access (in-memory trees).
    None,
    /// Point reads.
    Read,
    /// A write with this durability.
    Write(Durability),
    /// Scans, or writes followed by a sync: may wait on the disk with any engine.
    Long,
}

/// The storage work `message` needs; `None` when [`serve`] does not answer it.
pub fn storage_call(message: &PeerMessage) -> Option<StorageCall> {
    Some(match message {
        PeerMessage::AaeSegments { .. } | PeerMessage::AaeLeaves { .. } => StorageCall::None,
        PeerMessage::ReplicaGet { .. } | PeerMessage::ReapCheck { .. } => StorageCall::Read,
        PeerMessage::ReplicaPut { durability, .. } | PeerMessage::HintedPut { durability, .. } => {
            StorageCall::Write(*durability)
        }
        PeerMessage::Reap { .. } => StorageCall::Write(Durability::Fsync),
        PeerMessage::Handoff { .. } | PeerMessage::AaeKeys { .. } => StorageCall::Long,
        _ => return None,
    })
}

/// The node a `HintedPut` keeps its object for.
pub fn hint_target(message: &PeerMessage) -> Option<&str> {
    match message {
        PeerMessage::HintedPut { target, .. } => Some(target.as_str()),
        _ => None,
    }
}

/// The buckets whose properties serving `message` needs.
pub fn buckets_named(message: &PeerMessage) -> Vec<&str> {
    match message {
        PeerMessage::ReplicaPut { bucket, .. } => vec![bucket.as_str()],
        PeerMessage::Handoff { entries, .. } => {
            let named: BTreeSet<&str> = entries.iter().map(|e| e.bucket.as_str()).collect();
            named.into_iter().collect()
        }
        _ => Vec::new(),
    }
}

fn decode(bytes: &[u8]) -> Result<Object, ServeError> {
    Object::decode(bytes).map_err(ServeError::Corrupt)
}

/// Answer one replica-side request from this node's storage.
///
/// # Errors
/// Storage failed, a stored or received object is corrupt, or `message` is not a request
/// this function serves (see [`storage_call`]).
pub fn serve(
    replica: &Replica,
    aae: &AaeTrees,
    context: &ServeContext,
    message: PeerMessage,
) -> Result<Served, ServeError> {
    match message {
        PeerMessage::ReplicaGet {
            bucket,
            key,
            hinted_for,
            ..
        } => {
            let object = match hinted_for {
                None => replica.get_raw(&bucket, &key)?,
                Some(target) => replica
                    .get_with_hint(&bucket, &key, Some(&target))?
                    .map(|o| o.encode()),
            };
            Ok(Served::reply(PeerMessage::ReplicaObject { object }))
        }
        PeerMessage::ReplicaPut {
            bucket,
            key,
            object,
            durability,
            ring_version,
        } => {
            if context.ring_version > ring_version {
                return Ok(Served::stale_ring());
            }
            let object = decode(&object)?;
            replica.merge(&bucket, &key, &object, &context.props(&bucket), durability)?;
            Ok(Served {
                stored: vec![(bucket, key)],
                ..Served::reply(PeerMessage::Ack)
            })
        }
        PeerMessage::HintedPut {
            target,
            bucket,
            key,
            object,
            durability,
            ring_version,
        } => {
            if context.ring_version > ring_version {
                return Ok(Served::stale_ring());
            }
            if !context.hint_target_member {
                return Ok(Served::reply(PeerMessage::Error(format!(
                    "no hints are kept for {target:?}: not a member"
                ))));
            }
            let object = decode(&object)?;
            let stored = replica.store_hint(
                &target,
                &bucket,
                &key,
                &object,
                context.hint_limit,
                durability,
            )?;
            let (message, outcome) = if stored {
                (PeerMessage::Ack, HintOutcome::Stored)
            } else {
                (
                    PeerMessage::Error("hint store for that node is full".into()),
                    HintOutcome::Dropped,
                )
            };
            Ok(Served {
                hint: Some(outcome),
                ..Served::reply(message)
            })
        }
        PeerMessage::Handoff {
            entries,
            ring_version,
        } => {
            if context.ring_version > ring_version {
                return Ok(Served::stale_ring());
            }
            // Every object is checked before any is merged.
            let objects = entries
                .iter()
                .map(|e| decode(&e.object))
                .collect::<Result<Vec<_>, _>>()?;
            for (entry, object) in entries.iter().zip(&objects) {
                replica.merge(
                    &entry.bucket,
                    &entry.key,
                    object,
                    &context.props(&entry.bucket),
                    Durability::Buffered,
                )?;
            }
            if !context.defer_sync {
                replica
                    .storage()
                    .sync()
                    .map_err(|e| ServeError::Storage(e.to_string()))?;
            }
            Ok(Served {
                stored: entries.into_iter().map(|e| (e.bucket, e.key)).collect(),
                needs_sync: context.defer_sync,
                ..Served::reply(PeerMessage::Ack)
            })
        }
        PeerMessage::ReapCheck { bucket, key } => Ok(Served::reply(PeerMessage::ReapState {
            object: replica.get_raw(&bucket, &key)?,
            hinted: replica.holds_hint(&bucket, &key)?,
        })),
        PeerMessage::Reap {
            bucket,
            key,
            expected,
        } => {
            let storage_key = keys::object_key(bucket.as_bytes(), key.as_bytes());
            let removed = replica.remove_if_unchanged(&storage_key, &expected)?;
            Ok(Served {
                reaped: removed,
                ..Served::reply(PeerMessage::Reaped(removed))
            })
        }
        PeerMessage::AaeSegments { partition } => Ok(Served::reply(PeerMessage::AaeHashes {
            hashes: aae.segments(partition),
            budget: context.aae_budget,
        })),
        PeerMessage::AaeLeaves {
            partition,
            segments,
        } => Ok(Served::reply(PeerMessage::AaeLeafHashes {
            leaves: aae.segment_leaves(partition, &segments),
        })),
        PeerMessage::AaeKeys { partition, leaves } => {
            let leaves: BTreeSet<u16> = leaves.into_iter().collect();
            let (entries, truncated) = aae
                .leaf_keys(partition, &leaves, context.max_leaf_keys)
                .map_err(ServeError::Storage)?;
            Ok(Served::reply(PeerMessage::AaeKeyHashes {
                entries,
                truncated,
            }))
        }
        other => Err(ServeError::NotServed(other.name())),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::message::HandoffEntry;
    use crate::object::Content;
    use crate::ring::{NodeId, Ring, RingNode};
    use crate::storage::Storage;
    use crate::test_support::MapStorage;
    use crate::version::{ActorId, VersionVector};
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    fn node() -> (Replica, Arc<AaeTrees>) {
        let storage: Arc<dyn Storage> = Arc::new(MapStorage::default());
        let replica = Replica::new(
            Arc::clone(&storage),
            ActorId(1),
            Arc::new(AtomicBool::new(false)),
        );
        let ring = Ring::new(
            8,
            RingNode {
                id: NodeId("n1".into()),
                zone: String::new(),
            },
        )
        .unwrap();
        let aae = Arc::new(AaeTrees::new(ring, storage));
        replica.attach_aae(Arc::clone(&aae));
        (replica, aae)
    }

    fn context(ring_version: u64) -> ServeContext {
        ServeContext {
            ring_version,
            props: BTreeMap::new(),
            hint_limit: 2,
            hint_target_member: true,
            max_leaf_keys: 100,
            aae_budget: 7,
            defer_sync: false,
        }
    }

    /// An object written by actor 9 (another node).
    fn version(value: &str) -> Object {
        let content = Content {
            value: value.as_bytes().to_vec(),
            last_modified_ms: 1,
            ..Content::default()
        };
        Object::default()
            .update(
                &VersionVector::new(),
                content,
                ActorId(9),
                1,
                crate::object::PrunePolicy::default(),
            )
            .unwrap()
    }

    fn put(key: &str, object: &Object, ring_version: u64) -> PeerMessage {
        PeerMessage::ReplicaPut {
            bucket: "b".into(),
            key: key.into(),
            object: object.encode(),
            durability: Durability::Fsync,
            ring_version,
        }
    }

    fn hinted(key: &str, ring_version: u64) -> PeerMessage {
        PeerMessage::HintedPut {
            target: "n2".into(),
            bucket: "b".into(),
            key: key.into(),
            object: version(key).encode(),
            durability: Durability::Fsync,
            ring_version,
        }
    }

    /// Issue 17 row 4: hints for a name that is no member are refused and store nothing
    /// (before, 200 MiB of hints for `ghost-*` targets filled the disk).
    #[test]
    fn hints_for_a_node_that_is_not_a_member_are_refused() {
        let (replica, aae) = node();
        let mut context = context(5);
        context.hint_target_member = false;
        let refused = serve(&replica, &aae, &context, hinted("k", 5)).unwrap();
        assert!(
            matches!(&refused.reply, Reply::Message(PeerMessage::Error(e)) if e.contains("not a member")),
            "{:?}",
            refused.reply
        );
        assert!(!replica.holds_hint("b", "k").unwrap());
        context.hint_target_member = true;
        serve(&replica, &aae, &context, hinted("k", 5)).unwrap();
        assert!(replica.holds_hint("b", "k").unwrap());
    }

    #[test]
    fn writes_from_an_older_ring_are_refused_and_store_nothing() {
        let (replica, aae) = node();
        let object = version("v");
        let refused = serve(&replica, &aae, &context(5), put("k", &object, 4)).unwrap();
        assert_eq!(refused.reply, Reply::StaleRing);
        assert!(refused.stored.is_empty());
        let refused = serve(&replica, &aae, &context(5), hinted("k", 4)).unwrap();
        assert_eq!(refused.reply, Reply::StaleRing);
        assert_eq!(replica.get("b", "k").unwrap(), None);
        assert!(replica.hint_counts().is_empty());

        let stored = serve(&replica, &aae, &context(5), put("k", &object, 5)).unwrap();
        assert_eq!(stored.reply, Reply::Message(PeerMessage::Ack));
        assert_eq!(stored.stored, vec![("b".to_owned(), "k".to_owned())]);
        assert_eq!(replica.get("b", "k").unwrap(), Some(object.clone()));
        // A replayed write changes nothing.
        serve(&replica, &aae, &context(5), put("k", &object, 6)).unwrap();
        assert_eq!(replica.get("b", "k").unwrap(), Some(object));
    }

    #[test]
    fn hints_past_the_limit_are_dropped_and_said_so() {
        let (replica, aae) = node();
        for key in ["a", "b"] {
            let served = serve(&replica, &aae, &context(1), hinted(key, 1)).unwrap();
            assert_eq!(served.hint, Some(HintOutcome::Stored));
        }
        // The same key again merges into the held hint: not a new one.
        let again = serve(&replica, &aae, &context(1), hinted("a", 1)).unwrap();
        assert_eq!(again.hint, Some(HintOutcome::Stored));
        let full = serve(&replica, &aae, &context(1), hinted("c", 1)).unwrap();
        assert_eq!(full.hint, Some(HintOutcome::Dropped));
        assert!(matches!(full.reply, Reply::Message(PeerMessage::Error(_))));
        assert_eq!(replica.hint_counts(), vec![("n2".to_owned(), 2)]);
        // A fallback's read for the primary includes the hint.
        let read = PeerMessage::ReplicaGet {
            bucket: "b".into(),
            key: "a".into(),
            ring_version: 1,
            hinted_for: Some("n2".into()),
        };
        let served = serve(&replica, &aae, &context(1), read).unwrap();
        assert_eq!(
            served.reply,
            Reply::Message(PeerMessage::ReplicaObject {
                object: Some(version("a").encode())
            })
        );
    }

    #[test]
    fn a_handoff_batch_with_a_corrupt_object_merges_nothing() {
        let (replica, aae) = node();
        let entries = vec![
            HandoffEntry {
                bucket: "b".into(),
                key: "good".into(),
                object: version("good").encode(),
            },
            HandoffEntry {
                bucket: "b".into(),
                key: "bad".into(),
                object: vec![1, 0, 0xde, 0xad],
            },
        ];
        let batch = PeerMessage::Handoff {
            entries,
            ring_version: 1,
        };
        assert!(matches!(
            serve(&replica, &aae, &context(1), batch),
            Err(ServeError::Corrupt(_))
        ));
        assert_eq!(replica.get("b", "good").unwrap(), None);
    }

    #[test]
    fn a_reap_removes_only_the_tombstone_that_was_checked() {
        let (replica, aae) = node();
        let object = version("v");
        serve(&replica, &aae, &context(1), put("k", &object, 1)).unwrap();
        let reap = |expected| PeerMessage::Reap {
            bucket: "b".into(),
            key: "k".into(),
            expected,
        };
        let other = crate::merkle::entry_hash(b"b", b"k", &version("other").encode());
        let kept = serve(&replica, &aae, &context(1), reap(other)).unwrap();
        assert_eq!(kept.reply, Reply::Message(PeerMessage::Reaped(false)));
        assert!(replica.get("b", "k").unwrap().is_some());
        let same = crate::merkle::entry_hash(b"b", b"k", &object.encode());
        let reaped = serve(&replica, &aae, &context(1), reap(same)).unwrap();
        assert!(reaped.reaped);
        assert_eq!(replica.get("b", "k").unwrap(), None);
        // Anti-entropy no longer sees it.
        assert_eq!(aae.entries().values().sum::<u64>(), 0);
    }

    /// An exchange driven the way both the server and the simulator drive it: each question
    /// answered by the peer's `serve`, each answer fed to `on_answer` with this node's side
    /// from its own trees. Two nodes that differ in one key end up comparing exactly that key.
    #[test]
    fn an_exchange_over_serve_finds_the_one_differing_key() {
        use crate::anti_entropy::{AaeExchange, AaeStep, BucketKey};
        let (ours, our_trees) = node();
        let (theirs, their_trees) = node();
        for key in ["a", "b", "c"] {
            for replica in [&ours, &theirs] {
                replica
                    .merge(
                        "b",
                        key,
                        &version(key),
                        &BucketProps::default(),
                        Durability::Fsync,
                    )
                    .unwrap();
            }
        }
        theirs
            .merge(
                "b",
                "only-theirs",
                &version("x"),
                &BucketProps::default(),
                Durability::Fsync,
            )
            .unwrap();
        let partition = their_trees.partition_of(b"b", b"only-theirs");
        let (mut exchange, mut ask) = AaeExchange::<BucketKey>::start(partition, 100);
        let compared = loop {
            let question = ask.clone().message(partition);
            let Reply::Message(answer) = serve(&theirs, &their_trees, &context(1), question)
                .unwrap()
                .reply
            else {
                panic!("no stale ring here");
            };
            let step = exchange
                .on_answer(
                    &our_trees,
                    answer,
                    |leaves| our_trees.leaf_keys(partition, leaves, 100).map(|(k, _)| k),
                    |_| true,
                )
                .unwrap();
            match step {
                AaeStep::Ask(next) => ask = next,
                AaeStep::Compare(keys) => break keys,
                AaeStep::Done { repaired } => panic!("done early: {repaired}"),
            }
        };
        assert_eq!(compared, vec![("b".to_owned(), "only-theirs".to_owned())]);
        // An answer to no anti-entropy question is an error, not a silent end.
        let (mut other, _) = AaeExchange::<BucketKey>::start(partition, 100);
        assert!(
            other
                .on_answer(&our_trees, PeerMessage::Ack, |_| Ok(Vec::new()), |_| true)
                .is_err()
        );
    }

    #[test]
    fn only_replica_side_requests_are_served() {
        let (replica, aae) = node();
        assert_eq!(storage_call(&PeerMessage::ListBuckets), None);
        assert!(matches!(
            serve(&replica, &aae, &context(1), PeerMessage::ListBuckets),
            Err(ServeError::NotServed("ListBuckets"))
        ));
        let segments = PeerMessage::AaeSegments { partition: 0 };
        assert_eq!(storage_call(&segments), Some(StorageCall::None));
        let served = serve(&replica, &aae, &context(1), segments).unwrap();
        assert!(matches!(
            served.reply,
            Reply::Message(PeerMessage::AaeHashes { budget: 7, .. })
        ));
    }
}

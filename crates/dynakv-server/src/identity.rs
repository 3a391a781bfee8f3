//! A node's persistent identity: its name, its causal actor id, the cluster's context secret
//! and the ring, kept in the `Meta` table of its storage.
//!
//! Invariants: the actor id is chosen at random when a data directory is first used and never
//! reused for another directory, so a node whose data is lost comes back as a new actor (its
//! old counters can never be issued twice). A data directory belongs to one node name; opening
//! it under another name is refused.

use dynakv_core::context::ContextKey;
use dynakv_core::ring::{NodeId, Ring, RingNode};
use dynakv_core::storage::{Durability, Storage, Table};
use dynakv_core::version::ActorId;
use thiserror::Error;

const KEY_NAME: &[u8] = b"node_name";
const KEY_ACTOR: &[u8] = b"actor_id";
const KEY_SECRET: &[u8] = b"cluster_secret";
const KEY_RING: &[u8] = b"ring";

/// The identity and ring of this node.
#[derive(Debug, Clone)]
pub struct NodeIdentity {
    pub name: String,
    pub actor: ActorId,
    pub secret: ContextKey,
    pub ring: Ring,
}

/// Why the identity could not be loaded or created.
#[derive(Debug, Error)]
pub enum IdentityError {
    #[error("storage: {0}")]
    Storage(String),
    #[error(
        "data directory belongs to node {found:?}, not {wanted:?}: use the right --name or another --data-dir"
    )]
    WrongNode { found: String, wanted: String },
    #[error("stored {0} is corrupt")]
    Corrupt(&'static str),
    #[error("ring: {0}")]
    Ring(String),
}

fn storage_error(e: impl std::fmt::Display) -> IdentityError {
    IdentityError::Storage(e.to_string())
}

impl NodeIdentity {
    /// Load the identity from `storage`, or create it (founding a one-node cluster) when the
    /// storage is new.
    pub fn load_or_create(
        storage: &dyn Storage,
        name: &str,
        zone: &str,
        ring_partitions: u32,
    ) -> Result<NodeIdentity, IdentityError> {
        let stored_name = storage.get(Table::Meta, KEY_NAME).map_err(storage_error)?;
        if let Some(stored) = stored_name {
            let found = String::from_utf8(stored).map_err(|_| IdentityError::Corrupt("name"))?;
            if found != name {
                return Err(IdentityError::WrongNode {
                    found,
                    wanted: name.to_owned(),
                });
            }
            let actor = storage
                .get(Table::Meta, KEY_ACTOR)
                .map_err(storage_error)?
                .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
                .map(|b| ActorId(u64::from_le_bytes(b)))
                .ok_or(IdentityError::Corrupt("actor id"))?;
            let secret = storage
                .get(Table::Meta, KEY_SECRET)
                .map_err(storage_error)?
                .and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok())
                .map(ContextKey::from_bytes)
                .ok_or(IdentityError::Corrupt("cluster secret"))?;
            let ring = storage
                .get(Table::Meta, KEY_RING)
                .map_err(storage_error)?
                .and_then(|b| serde_json::from_slice::<Ring>(&b).ok())
                .ok_or(IdentityError::Corrupt("ring"))?;
            return Ok(NodeIdentity {
                name: name.to_owned(),
                actor,
                secret,
                ring,
            });
        }
        let actor = ActorId(rand::random::<u64>());
        let secret = ContextKey::from_bytes(rand::random::<[u8; 32]>());
        let ring = Ring::new(
            ring_partitions,
            RingNode {
                id: NodeId(name.to_owned()),
                zone: zone.to_owned(),
            },
        )
        .map_err(|e| IdentityError::Ring(e.to_string()))?;
        let ring_json = serde_json::to_vec(&ring).map_err(storage_error)?;
        // Name last: a crash halfway leaves no name, and the next start begins afresh.
        for (key, value) in [
            (KEY_ACTOR, actor.0.to_le_bytes().to_vec()),
            (KEY_SECRET, secret.as_bytes().to_vec()),
            (KEY_RING, ring_json),
            (KEY_NAME, name.as_bytes().to_vec()),
        ] {
            storage
                .put(Table::Meta, key, &value, Durability::Fsync)
                .map_err(storage_error)?;
        }
        Ok(NodeIdentity {
            name: name.to_owned(),
            actor,
            secret,
            ring,
        })
    }
}

//! A node's persistent identity: its name and its causal actor id, kept in the `Meta` table.
//!
//! Invariants: the actor id is chosen at random when a data directory is first used and never
//! reused for another directory, so a node whose data is lost comes back as a new actor (its
//! old counters can never be issued twice). After an unclean shutdown (a crash, SIGKILL, power
//! loss) the node also takes a new actor id: writes of buckets with buffered durability that
//! were acknowledged but not yet flushed may be gone from its copy, and reusing the old id
//! would reissue their dots for different values. A clean shutdown writes a marker (fsync) that
//! the next start consumes. A data directory belongs to one node name; opening it under
//! another name is refused.

use dynakv_core::storage::{Durability, Storage, Table};
use dynakv_core::version::ActorId;
use thiserror::Error;

const KEY_NAME: &[u8] = b"node_name";
const KEY_ACTOR: &[u8] = b"actor_id";
const KEY_CLEAN_SHUTDOWN: &[u8] = b"clean_shutdown";

/// The identity of this node.
#[derive(Debug, Clone)]
pub struct NodeIdentity {
    pub name: String,
    pub actor: ActorId,
    /// True when this start took a new actor id because the last run did not end cleanly.
    pub new_generation: bool,
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
}

fn storage_error(e: impl std::fmt::Display) -> IdentityError {
    IdentityError::Storage(e.to_string())
}

impl NodeIdentity {
    /// Load the identity from `storage`, or create it when the storage is new.
    pub fn load_or_create(
        storage: &dyn Storage,
        name: &str,
    ) -> Result<NodeIdentity, IdentityError> {
        if let Some(stored) = storage.get(Table::Meta, KEY_NAME).map_err(storage_error)? {
            let found = String::from_utf8(stored).map_err(|_| IdentityError::Corrupt("name"))?;
            if found != name {
                return Err(IdentityError::WrongNode {
                    found,
                    wanted: name.to_owned(),
                });
            }
            let stored_actor = storage
                .get(Table::Meta, KEY_ACTOR)
                .map_err(storage_error)?
                .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
                .map(|b| ActorId(u64::from_le_bytes(b)));
            let clean = storage
                .get(Table::Meta, KEY_CLEAN_SHUTDOWN)
                .map_err(storage_error)?
                .is_some();
            let (actor, new_generation) = match stored_actor {
                Some(actor) if clean => (actor, false),
                // Unclean shutdown, or a lost/corrupt actor id: a new causal identity.
                _ => {
                    let actor = ActorId(rand::random::<u64>());
                    storage
                        .put(
                            Table::Meta,
                            KEY_ACTOR,
                            &actor.0.to_le_bytes(),
                            Durability::Fsync,
                        )
                        .map_err(storage_error)?;
                    (actor, true)
                }
            };
            // Running: the marker is gone until the next clean shutdown writes it.
            storage
                .delete(Table::Meta, KEY_CLEAN_SHUTDOWN, Durability::Fsync)
                .map_err(storage_error)?;
            return Ok(NodeIdentity {
                name: name.to_owned(),
                actor,
                new_generation,
            });
        }
        let actor = ActorId(rand::random::<u64>());
        // Name last: a crash halfway leaves no name, and the next start begins afresh.
        storage
            .put(
                Table::Meta,
                KEY_ACTOR,
                &actor.0.to_le_bytes(),
                Durability::Fsync,
            )
            .map_err(storage_error)?;
        storage
            .put(Table::Meta, KEY_NAME, name.as_bytes(), Durability::Fsync)
            .map_err(storage_error)?;
        Ok(NodeIdentity {
            name: name.to_owned(),
            actor,
            new_generation: false,
        })
    }

    /// Record that the node stopped cleanly (everything flushed): the next start may keep the
    /// actor id.
    pub fn mark_clean_shutdown(storage: &dyn Storage) -> Result<(), IdentityError> {
        storage
            .put(Table::Meta, KEY_CLEAN_SHUTDOWN, b"1", Durability::Fsync)
            .map_err(storage_error)
    }
}

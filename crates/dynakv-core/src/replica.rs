//! The node's local replica: reads and read-merge-writes objects in its storage engine.
//!
//! Invariants:
//! - a write is a read-modify-write under the key's stripe lock, so two concurrent writes to
//!   one key on this node never both read the same old version (no lost update); the storage
//!   call under the lock is always buffered, and a durable write syncs after releasing it
//!   (`settle`), so no stripe lock is held across an fsync;
//! - what is written is always `stored.update(context, ...)` or `stored.sync(incoming)`, so no
//!   sibling the writer did not see is dropped;
//! - nothing is stored that a node could not read back (`Object::check_storable`), and a
//!   client write that grows an object past `MAX_WRITE_OBJECT_BYTES` is refused before
//!   anything is stored (`Object::update_after`): one rule for the server and the simulated
//!   Node, which both write through here. An object stored too large before that rule is
//!   read back up to `MAX_REPAIRABLE_OBJECT_BYTES`, so a client can resolve it;
//! - an object that fails its checksum or decoding is reported as corrupt, never treated as
//!   absent (which would let a write silently replace it);
//! - this node's actor never issues a dot twice: a write's counter exceeds every counter the
//!   actor issued before, for any key (`update_after` with the node-wide counter), and the
//!   counter's high-water mark is reserved durably (a lease in `Meta`, fsync'd) before an
//!   object carrying a counter above it is stored. Per-key counters alone would restart at 1
//!   for a key whose tombstone was reaped here, reissuing an old dot for a new value.
//!
//! Calls are synchronous (sans-IO apart from the `Storage` calls): the server runs one inline
//! on its async worker when the engine says it cannot wait on the disk, else on tokio's
//! blocking pool (`dynakv_server::replica::run`); the simulator calls them directly over its
//! simulated disk.

use crate::aae_trees::AaeTrees;
use crate::bucket::BucketProps;
use crate::codec::DecodeError;
use crate::keys;
use crate::limits;
use crate::object::{Content, Object, PrunePolicy, WriteError};
use crate::storage::{Durability, Storage, Table};
use crate::version::{ActorId, VersionVector};
use parking_lot::Mutex;
use std::sync::Arc;
use thiserror::Error;

/// Number of stripe locks serialising writes per key.
const WRITE_LOCK_STRIPES: usize = 1024;
/// `Meta` key of the durable lease on this node's dot counters.
const KEY_COUNTER_LEASE: &[u8] = b"dot_counter_lease";
/// Counters reserved per lease write (one fsync'd `Meta` write per this many writes).
const COUNTER_LEASE_BLOCK: u64 = 100_000;
/// `Meta` key of the write actor epoch (see [`Replica::write_actor`]).
const KEY_WRITE_EPOCH: &[u8] = b"write_epoch";

/// A failed local operation.
#[derive(Debug, Error)]
pub enum ReplicaError {
    #[error("storage failure: {0}")]
    Storage(String),
    #[error("stored object is corrupt: {0}")]
    Corrupt(DecodeError),
    #[error(transparent)]
    Write(#[from] WriteError),
    #[error("precondition failed: {0}")]
    Precondition(&'static str),
    /// A data type update that cannot be applied (or a write of the wrong kind to a data type
    /// bucket).
    #[error("{0}")]
    DataType(#[from] crate::crdt::CrdtError),
}

impl ReplicaError {
    /// The HTTP status a client is answered with: 500 for a storage failure or a stored
    /// object that does not decode, 409 for a write refused by the sibling or size limits, 412
    /// for a failed precondition or a data type removal of what the context has not seen
    /// (Riak's precondition), 400 for another refused data type update.
    pub fn status(&self) -> u16 {
        use crate::crdt::CrdtError;
        match self {
            ReplicaError::Storage(_)
            | ReplicaError::Corrupt(_)
            | ReplicaError::DataType(CrdtError::Malformed(_)) => 500,
            ReplicaError::Write(_) => 409,
            ReplicaError::Precondition(_) | ReplicaError::DataType(CrdtError::NotPresent(_)) => 412,
            ReplicaError::DataType(_) => 400,
        }
    }
}

fn storage_error(e: impl std::fmt::Display) -> ReplicaError {
    ReplicaError::Storage(e.to_string())
}

/// Tombstoned objects of one page, and the last key listed (`None` when the list ended).
pub type TombstonePage = (Vec<crate::storage::Entry>, Option<Vec<u8>>);

/// A conditional-write requirement (`If-None-Match: *`, `If-Match: etag`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Precondition {
    None,
    /// Only write when the key has no live value.
    Absent,
    /// Only write when the key holds exactly one live sibling with this vtag.
    Matches(String),
    /// Only write when the key's causal context is exactly this one: nothing was written
    /// since the client read it (Riak PB's `if_not_modified`).
    Unmodified(VersionVector),
}

/// A write to apply.
#[derive(Debug)]
pub struct WriteRequest<'a> {
    pub bucket: &'a str,
    pub key: &'a str,
    /// The client's context; `None` for a client that has read nothing (a put then adds a
    /// sibling, a delete removes what this node currently holds, as Riak does).
    pub context: Option<VersionVector>,
    pub content: Content,
    pub props: &'a BucketProps,
    pub durability: Durability,
    pub precondition: Precondition,
    pub now_ms: u64,
    /// The coordinating node's own wall clock now: a bucket's time to live counts from it
    /// (see `WireContent::into_content`).
    pub wall_ms: u64,
}

/// The node's local store of objects and bucket properties.
#[derive(Debug)]
pub struct Replica {
    storage: Arc<dyn Storage>,
    actor: ActorId,
    stripes: Vec<Mutex<()>>,
    /// Hinted keys held per target node.
    hint_counts: Mutex<std::collections::HashMap<String, usize>>,
    aae: std::sync::OnceLock<Arc<AaeTrees>>,
    /// Set by every write made without fsync; the flusher syncs storage and clears it.
    unflushed: Arc<std::sync::atomic::AtomicBool>,
    /// Writes made with `Fsync` durability (for `/stats` and tests).
    fsync_writes: std::sync::atomic::AtomicU64,
    /// The highest dot counter this actor issued (or may have issued: after a restart, the
    /// stored lease).
    last_counter: std::sync::atomic::AtomicU64,
    /// The durably reserved counter high-water mark (valid once `lease_loaded`).
    counter_lease: std::sync::atomic::AtomicU64,
    lease_loaded: std::sync::atomic::AtomicBool,
    /// Held only to load the lease from `Meta` or to reserve a new one: writes below the
    /// lease touch nothing but the atomics.
    lease_lock: Mutex<()>,
    /// The write actor epoch and its actor (valid once `epoch_loaded`), and whether no write
    /// has used it yet (then a removal need not start a new one).
    write_epoch: std::sync::atomic::AtomicU64,
    epoch_actor: std::sync::atomic::AtomicU64,
    epoch_loaded: std::sync::atomic::AtomicBool,
    epoch_unused: std::sync::atomic::AtomicBool,
}

impl Replica {
    pub fn new(
        storage: Arc<dyn Storage>,
        actor: ActorId,
        unflushed: Arc<std::sync::atomic::AtomicBool>,
    ) -> Self {
        Replica {
            storage,
            actor,
            stripes: (0..WRITE_LOCK_STRIPES).map(|_| Mutex::new(())).collect(),
            hint_counts: Mutex::new(std::collections::HashMap::new()),
            aae: std::sync::OnceLock::new(),
            unflushed,
            fsync_writes: std::sync::atomic::AtomicU64::new(0),
            last_counter: std::sync::atomic::AtomicU64::new(0),
            counter_lease: std::sync::atomic::AtomicU64::new(0),
            lease_loaded: std::sync::atomic::AtomicBool::new(false),
            lease_lock: Mutex::new(()),
            write_epoch: std::sync::atomic::AtomicU64::new(0),
            epoch_actor: std::sync::atomic::AtomicU64::new(actor.0),
            epoch_loaded: std::sync::atomic::AtomicBool::new(false),
            epoch_unused: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn load_epoch(&self) -> Result<u64, ReplicaError> {
        use std::sync::atomic::Ordering;
        if !self.epoch_loaded.load(Ordering::Acquire) {
            let _guard = self.lease_lock.lock();
            if !self.epoch_loaded.load(Ordering::Acquire) {
                let stored = match self
                    .storage
                    .get(Table::Meta, KEY_WRITE_EPOCH)
                    .map_err(storage_error)?
                {
                    None => 0,
                    Some(bytes) => {
                        u64::from_be_bytes(bytes.as_slice().try_into().map_err(|_| {
                            ReplicaError::Storage("write actor epoch is corrupt".into())
                        })?)
                    }
                };
                self.set_epoch(stored);
                self.epoch_loaded.store(true, Ordering::Release);
            }
        }
        Ok(self.write_epoch.load(Ordering::SeqCst))
    }

    /// Take `epoch` and its actor (the node's identity for epoch 0, else derived from both).
    fn set_epoch(&self, epoch: u64) {
        use std::sync::atomic::Ordering;
        let actor = if epoch == 0 {
            self.actor
        } else {
            let mut hasher = blake3::Hasher::new();
            hasher.update(b"dynakv-write-actor");
            hasher.update(&self.actor.0.to_le_bytes());
            hasher.update(&epoch.to_le_bytes());
            let mut first = [0u8; 8];
            first.copy_from_slice(&hasher.finalize().as_bytes()[..8]);
            ActorId(u64::from_le_bytes(first))
        };
        self.epoch_actor.store(actor.0, Ordering::SeqCst);
        self.write_epoch.store(epoch, Ordering::SeqCst);
    }

    /// The actor this replica writes as: the dots of the versions it coordinates, and the
    /// entries of the data type values it updates. An actor's history of a key must never go
    /// back: a version it writes claims (in its clock) every earlier dot of its actor, and a
    /// counter's or a set's entry for an actor only grows. A replica coordinates every write
    /// of its actor on its own stored value first, so that holds while the value stays; it
    /// stops holding when the replica drops keys it no longer replicates (after a handoff)
    /// and later replicates them again (a write then would claim, and silently replace, the
    /// versions its actor wrote before the drop). Each such drop therefore starts a new
    /// epoch, and the actor is derived from the node's causal identity and the epoch (the
    /// identity itself changes after a wiped disk or an unclean stop).
    fn write_actor(&self) -> Result<ActorId, ReplicaError> {
        use std::sync::atomic::Ordering;
        self.load_epoch()?;
        if self.epoch_unused.load(Ordering::SeqCst) {
            self.epoch_unused.store(false, Ordering::SeqCst);
        }
        Ok(ActorId(self.epoch_actor.load(Ordering::SeqCst)))
    }

    /// Called before a stored object (`bytes`) is dropped: a live one starts a new write
    /// actor epoch ([`Replica::next_write_epoch`]); a tombstone (reaping) does not.
    fn before_drop(&self, bytes: &[u8]) -> Result<(), ReplicaError> {
        if Object::encoded_is_deleted(bytes).unwrap_or(false) {
            return Ok(());
        }
        self.next_write_epoch()
    }

    /// Before a key this replica held is dropped: start a new write actor epoch unless no
    /// write used the current one. Buffered: a crash before it is flushed is an unclean stop,
    /// after which the node has a new identity anyway.
    fn next_write_epoch(&self) -> Result<(), ReplicaError> {
        use std::sync::atomic::Ordering;
        let epoch = self.load_epoch()?;
        if self.epoch_unused.load(Ordering::SeqCst) {
            return Ok(());
        }
        let _guard = self.lease_lock.lock();
        let next = epoch.saturating_add(1);
        self.storage
            .put(
                Table::Meta,
                KEY_WRITE_EPOCH,
                &next.to_be_bytes(),
                Durability::Buffered,
            )
            .map_err(storage_error)?;
        self.set_epoch(next);
        self.epoch_unused.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// The floor for the next dot counter: every counter issued so far (by this process, or
    /// by an earlier one of the same actor, through the stored lease) is at most this.
    fn counter_floor(&self) -> Result<u64, ReplicaError> {
        use std::sync::atomic::Ordering;
        if !self.lease_loaded.load(Ordering::Acquire) {
            let _guard = self.lease_lock.lock();
            if !self.lease_loaded.load(Ordering::Acquire) {
                let stored = match self
                    .storage
                    .get(Table::Meta, KEY_COUNTER_LEASE)
                    .map_err(storage_error)?
                {
                    None => 0,
                    Some(bytes) => {
                        u64::from_be_bytes(bytes.as_slice().try_into().map_err(|_| {
                            ReplicaError::Storage("dot counter lease is corrupt".into())
                        })?)
                    }
                };
                self.last_counter.fetch_max(stored, Ordering::SeqCst);
                self.counter_lease.store(stored, Ordering::SeqCst);
                self.lease_loaded.store(true, Ordering::Release);
            }
        }
        Ok(self.last_counter.load(Ordering::SeqCst))
    }

    /// Record that `counter` was issued: reserve it durably first when it is above the lease
    /// (always true for a run's first write: the loaded lease may have been fully issued).
    fn reserve_counter(&self, counter: u64) -> Result<(), ReplicaError> {
        use std::sync::atomic::Ordering;
        if counter > self.counter_lease.load(Ordering::SeqCst) {
            let _guard = self.lease_lock.lock();
            if counter > self.counter_lease.load(Ordering::SeqCst) {
                self.lease_through(counter.saturating_add(COUNTER_LEASE_BLOCK))?;
            }
        }
        self.last_counter.fetch_max(counter, Ordering::SeqCst);
        Ok(())
    }

    /// Reserve the next block of dot counters ahead of need: when less than half a block of
    /// the lease is left (or none was taken in this run yet), reserve a new one now, so that
    /// client writes do not wait for the lease's fsync under their key's stripe lock. The
    /// server's flusher calls this on every tick; a write that still finds the lease used up
    /// reserves it itself. Returns whether a block was reserved.
    ///
    /// # Errors
    /// The lease could not be read or made durable.
    pub fn renew_counter_lease(&self) -> Result<bool, ReplicaError> {
        use std::sync::atomic::Ordering;
        self.counter_floor()?;
        if !self.counter_lease_low() {
            return Ok(false);
        }
        let _guard = self.lease_lock.lock();
        if !self.counter_lease_low() {
            return Ok(false);
        }
        let last = self.last_counter.load(Ordering::SeqCst);
        self.lease_through(last.saturating_add(COUNTER_LEASE_BLOCK))?;
        Ok(true)
    }

    /// Store the lease `reserved` durably, then let counters up to it be issued (called with
    /// `lease_lock` held, `reserved` above the current lease).
    fn lease_through(&self, reserved: u64) -> Result<(), ReplicaError> {
        self.storage
            .put(
                Table::Meta,
                KEY_COUNTER_LEASE,
                &reserved.to_be_bytes(),
                Durability::Fsync,
            )
            .map_err(storage_error)?;
        self.counter_lease
            .fetch_max(reserved, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    /// Whether [`Replica::renew_counter_lease`] has work to do (no storage call: cheap enough
    /// for an async worker).
    pub fn counter_lease_low(&self) -> bool {
        use std::sync::atomic::Ordering;
        !self.lease_loaded.load(Ordering::Acquire)
            || self
                .counter_lease
                .load(Ordering::SeqCst)
                .saturating_sub(self.last_counter.load(Ordering::SeqCst))
                < COUNTER_LEASE_BLOCK / 2
    }

    /// This replica's causal identity.
    pub fn actor(&self) -> ActorId {
        self.actor
    }

    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    fn stripe(&self, storage_key: &[u8]) -> &Mutex<()> {
        let hash = crc32fast::hash(storage_key) as usize;
        &self.stripes[hash % self.stripes.len()]
    }

    fn load(&self, storage_key: &[u8]) -> Result<Option<Object>, ReplicaError> {
        Ok(self.load_both(storage_key)?.map(|(object, _)| object))
    }

    /// The stored object and its bytes.
    fn load_both(&self, storage_key: &[u8]) -> Result<Option<(Object, Vec<u8>)>, ReplicaError> {
        match self
            .storage
            .get(Table::Objects, storage_key)
            .map_err(storage_error)?
        {
            None => Ok(None),
            Some(bytes) => Object::decode_stored(&bytes)
                .map(|o| Some((o, bytes)))
                .map_err(ReplicaError::Corrupt),
        }
    }

    /// Write an object's bytes and tell the anti-entropy trees.
    fn store(
        &self,
        storage_key: &[u8],
        old: Option<&[u8]>,
        new: &[u8],
        durability: Durability,
    ) -> Result<(), ReplicaError> {
        self.storage
            .put(Table::Objects, storage_key, new, Durability::Buffered)
            .map_err(storage_error)?;
        self.note_durability(durability);
        if let Some(aae) = self.aae.get() {
            aae.observe(storage_key, old, Some(new));
        }
        Ok(())
    }

    /// Make a write made under a stripe lock durable, after the lock is released. Every
    /// storage call under a stripe lock is buffered, so no lock is held across an fsync: a
    /// durable write of a hot key used to keep its stripe locked for the whole flush (tens to
    /// hundreds of ms), and the next write of that key, run inline on an async worker, stopped
    /// the worker with it. `sync` is a durability barrier for every write made before it
    /// (group commit), this one included.
    fn settle(&self, durability: Durability) -> Result<(), ReplicaError> {
        if durability == Durability::Fsync {
            self.storage.sync().map_err(storage_error)?;
        }
        Ok(())
    }

    /// Count a write made buffered under a stripe lock; `durability` is what its caller asked
    /// for ([`Replica::settle`] syncs the `Fsync` ones).
    fn note_durability(&self, durability: Durability) {
        self.unflushed
            .store(true, std::sync::atomic::Ordering::Release);
        if durability == Durability::Fsync {
            self.fsync_writes
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Count a write its caller stored buffered and then made durable itself (the server's
    /// group commit for async callers).
    pub fn count_fsync_write(&self) {
        self.fsync_writes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Object, hint and removal writes made with `Fsync` durability since start.
    pub fn fsync_writes(&self) -> u64 {
        self.fsync_writes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Attach the anti-entropy trees (once, at startup, after they are built).
    pub fn attach_aae(&self, aae: Arc<AaeTrees>) {
        let _ = self.aae.set(aae);
    }

    /// The stored object, if any (tombstones included).
    pub fn get(&self, bucket: &str, key: &str) -> Result<Option<Object>, ReplicaError> {
        self.load(&keys::object_key(bucket.as_bytes(), key.as_bytes()))
    }

    /// The stored object merged with what this node holds as a hint for `hinted_for` (a
    /// fallback answering a read for the primary it stands in for).
    pub fn get_with_hint(
        &self,
        bucket: &str,
        key: &str,
        hinted_for: Option<&str>,
    ) -> Result<Option<Object>, ReplicaError> {
        let own = self.get(bucket, key)?;
        let Some(target) = hinted_for else {
            return Ok(own);
        };
        let hint = self.get_hint(target, bucket, key)?;
        Ok(match (own, hint) {
            (Some(a), Some(b)) => Some(a.sync(&b)),
            (a, b) => a.or(b),
        })
    }

    /// Apply a client write (put or delete) as coordinator and return the stored result.
    pub fn write(&self, request: WriteRequest<'_>) -> Result<Object, ReplicaError> {
        let storage_key = keys::object_key(request.bucket.as_bytes(), request.key.as_bytes());
        let guard = self.stripe(&storage_key).lock();
        let (stored, old_bytes) = match self.load_both(&storage_key)? {
            Some((object, bytes)) => (object, Some(bytes)),
            None => (Object::default(), None),
        };
        match &request.precondition {
            Precondition::None => {}
            // What a client would read: expired values are not there.
            Precondition::Absent => {
                if !stored.unexpired(request.now_ms).is_deleted() {
                    return Err(ReplicaError::Precondition("the key already has a value"));
                }
            }
            Precondition::Matches(vtag) => {
                let visible = stored.unexpired(request.now_ms);
                let mut live = visible.live_siblings();
                let matches = match (live.next(), live.next()) {
                    (Some(only), None) => only.vtag() == *vtag,
                    _ => false,
                };
                if !matches {
                    return Err(ReplicaError::Precondition(
                        "the stored value does not match If-Match",
                    ));
                }
            }
            Precondition::Unmodified(context) => {
                if stored.clock() != context {
                    return Err(ReplicaError::Precondition(
                        "the object was modified since the given vclock was read",
                    ));
                }
            }
        }
        let mut content = request.content;
        let is_update = content.content_type == crate::crdt::DATATYPE_UPDATE_CONTENT_TYPE;
        let context = match (request.props.datatype, request.context) {
            // A data type update: applied to the merge of every version held here, and
            // stored as one version that replaces them all.
            (Some(kind), _) if !content.deleted => {
                if !is_update {
                    return Err(crate::crdt::CrdtError::WrongOp(format!(
                        "this bucket holds {}s: update it through the data types API",
                        kind.name()
                    ))
                    .into());
                }
                let update = crate::crdt::Update::decode(&content.value)?;
                if update.kind != kind {
                    return Err(crate::crdt::CrdtError::WrongOp(format!(
                        "this bucket holds {}s, not {}s",
                        kind.name(),
                        update.kind.name()
                    ))
                    .into());
                }
                let actor = self.write_actor()?;
                let value = crate::crdt::apply_update(&stored, &update, actor, request.now_ms)?;
                content = Content {
                    value: value.encode(),
                    content_type: crate::crdt::DATATYPE_CONTENT_TYPE.to_owned(),
                    last_modified_ms: content.last_modified_ms,
                    meta: Vec::new(),
                    deleted: false,
                    indexes: Vec::new(),
                    expires_ms: None,
                };
                stored.clock().clone()
            }
            (None, _) if is_update => {
                return Err(crate::crdt::CrdtError::WrongOp(
                    "this bucket holds no data type (its bucket type has no datatype)".into(),
                )
                .into());
            }
            (_, Some(context)) => context,
            // A delete without context removes what is here now; a put without context is a
            // write by a client that has seen nothing.
            (_, None) if content.deleted => stored.clock().clone(),
            (_, None) => VersionVector::new(),
        };
        // A value without a time to live of its own takes its bucket's (data types do not
        // expire).
        if content.expires_ms.is_none()
            && !content.deleted
            && request.props.datatype.is_none()
            && let Some(secs) = request.props.ttl_secs
        {
            content.expires_ms = Some(request.wall_ms.saturating_add(secs.saturating_mul(1000)));
        }
        let floor = self.counter_floor()?;
        let actor = self.write_actor()?;
        let mut updated = stored.update_after(
            &context,
            content,
            actor,
            floor,
            request.now_ms,
            PrunePolicy::default(),
        )?;
        self.reserve_counter(updated.clock().counter(actor))?;
        if request.props.last_write_wins {
            updated.resolve_last_write_wins();
        }
        updated.check_storable()?;
        self.store(
            &storage_key,
            old_bytes.as_deref(),
            &updated.encode(),
            request.durability,
        )?;
        drop(guard);
        self.settle(request.durability)?;
        Ok(updated)
    }

    /// Merge a version received from elsewhere (a replica, a handoff) into the local one.
    pub fn merge(
        &self,
        bucket: &str,
        key: &str,
        incoming: &Object,
        props: &BucketProps,
        durability: Durability,
    ) -> Result<Object, ReplicaError> {
        let storage_key = keys::object_key(bucket.as_bytes(), key.as_bytes());
        let guard = self.stripe(&storage_key).lock();
        let (stored, old_bytes) = match self.load_both(&storage_key)? {
            Some((object, bytes)) => (object, Some(bytes)),
            None => (Object::default(), None),
        };
        let mut merged = stored.sync(incoming);
        if props.last_write_wins {
            merged.resolve_last_write_wins();
        }
        if merged != stored {
            merged.check_storable()?;
            self.store(
                &storage_key,
                old_bytes.as_deref(),
                &merged.encode(),
                durability,
            )?;
            drop(guard);
            self.settle(durability)?;
        }
        Ok(merged)
    }

    /// The stored bytes of an object, undecoded (for peers, which decode and check them).
    pub fn get_raw(&self, bucket: &str, key: &str) -> Result<Option<Vec<u8>>, ReplicaError> {
        self.storage
            .get(
                Table::Objects,
                &keys::object_key(bucket.as_bytes(), key.as_bytes()),
            )
            .map_err(storage_error)
    }

    /// Up to `limit` stored objects after `start_after`, in storage-key order (for handoff
    /// and cleanup scans).
    pub fn scan_objects(
        &self,
        start_after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<crate::storage::Entry>, ReplicaError> {
        self.storage
            .scan(Table::Objects, &[], start_after, limit)
            .map_err(storage_error)
    }

    /// Up to `limit` stored objects that are all tombstones, after `start_after` (storage-key
    /// order), read through the tombstone list (for reaping).
    pub fn scan_tombstones(
        &self,
        start_after: Option<&[u8]>,
        limit: usize,
    ) -> Result<TombstonePage, ReplicaError> {
        let listed = self
            .storage
            .scan(Table::Tombstones, &[], start_after, limit)
            .map_err(storage_error)?;
        let last_listed = listed.last().map(|(key, _)| key.clone());
        let mut out = Vec::with_capacity(listed.len());
        for (storage_key, _) in listed {
            // A key listed but no longer present (or no longer deleted) is skipped; the list
            // is corrected by the next write of the key or the next rebuild.
            if let Some(value) = self
                .storage
                .get(Table::Objects, &storage_key)
                .map_err(storage_error)?
            {
                out.push((storage_key, value));
            }
        }
        Ok((out, last_listed))
    }

    /// Remove a key this node no longer replicates.
    pub fn remove(&self, storage_key: &[u8]) -> Result<(), ReplicaError> {
        let _guard = self.stripe(storage_key).lock();
        let old = self
            .storage
            .get(Table::Objects, storage_key)
            .map_err(storage_error)?;
        if let Some(old) = &old {
            self.before_drop(old)?;
        }
        self.storage
            .delete(Table::Objects, storage_key, Durability::Buffered)
            .map_err(storage_error)?;
        self.note_durability(Durability::Buffered);
        if let Some(aae) = self.aae.get() {
            aae.observe(storage_key, old.as_deref(), None);
        }
        Ok(())
    }

    /// Keep `incoming` as a hint for `target`, merged with any hint already held for the key.
    /// Returns false (and stores nothing) when `target` already has `limit` hinted keys.
    pub fn store_hint(
        &self,
        target: &str,
        bucket: &str,
        key: &str,
        incoming: &Object,
        limit: usize,
        durability: Durability,
    ) -> Result<bool, ReplicaError> {
        let hint_key = keys::hint_key(target, bucket.as_bytes(), key.as_bytes());
        let guard = self.stripe(&hint_key).lock();
        let existing = self
            .storage
            .get(Table::Hints, &hint_key)
            .map_err(storage_error)?;
        let merged = if let Some(bytes) = &existing {
            Object::decode_stored(bytes)
                .map_err(ReplicaError::Corrupt)?
                .sync(incoming)
        } else {
            let mut counts = self.hint_counts.lock();
            let count = counts.entry(target.to_owned()).or_insert(0);
            if *count >= limit {
                return Ok(false);
            }
            *count += 1;
            incoming.clone()
        };
        merged.check_storable()?;
        self.storage
            .put(
                Table::Hints,
                &hint_key,
                &merged.encode(),
                Durability::Buffered,
            )
            .map_err(storage_error)?;
        self.note_durability(durability);
        drop(guard);
        self.settle(durability)?;
        Ok(true)
    }

    /// The hint held for `target` on one key, if any.
    pub fn get_hint(
        &self,
        target: &str,
        bucket: &str,
        key: &str,
    ) -> Result<Option<Object>, ReplicaError> {
        let hint_key = keys::hint_key(target, bucket.as_bytes(), key.as_bytes());
        match self
            .storage
            .get(Table::Hints, &hint_key)
            .map_err(storage_error)?
        {
            None => Ok(None),
            Some(bytes) => Object::decode_stored(&bytes)
                .map(Some)
                .map_err(ReplicaError::Corrupt),
        }
    }

    /// Up to `limit` hints for `target` after `start_after`: (hint key, stored bytes).
    pub fn hint_page(
        &self,
        target: &str,
        start_after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<crate::storage::Entry>, ReplicaError> {
        self.storage
            .scan(Table::Hints, &keys::hint_prefix(target), start_after, limit)
            .map_err(storage_error)
    }

    /// Delete a delivered hint, unless it changed since it was read (a newer version merged
    /// in meanwhile must not be lost).
    pub fn delete_hint_if_unchanged(
        &self,
        hint_key: &[u8],
        delivered: &[u8],
    ) -> Result<bool, ReplicaError> {
        let guard = self.stripe(hint_key).lock();
        let current = self
            .storage
            .get(Table::Hints, hint_key)
            .map_err(storage_error)?;
        if current.as_deref() != Some(delivered) {
            return Ok(false);
        }
        self.storage
            .delete(Table::Hints, hint_key, Durability::Buffered)
            .map_err(storage_error)?;
        if let Some((target, _, _)) = keys::split_hint_key(hint_key) {
            let target = String::from_utf8_lossy(target).into_owned();
            let mut counts = self.hint_counts.lock();
            if let Some(count) = counts.get_mut(&target) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    counts.remove(&target);
                }
            }
        }
        drop(guard);
        self.settle(Durability::Fsync)?;
        Ok(true)
    }

    /// Whether this node keeps a hint of `bucket`/`key` for any node.
    pub fn holds_hint(&self, bucket: &str, key: &str) -> Result<bool, ReplicaError> {
        let targets: Vec<String> = self.hint_counts.lock().keys().cloned().collect();
        for target in targets {
            if self.get_hint(&target, bucket, key)?.is_some() {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Hinted keys held per target.
    pub fn hint_counts(&self) -> Vec<(String, usize)> {
        let mut counts: Vec<_> = self
            .hint_counts
            .lock()
            .iter()
            .map(|(t, c)| (t.clone(), *c))
            .collect();
        counts.sort();
        counts
    }

    /// Count the hints in storage (at startup).
    pub fn load_hint_counts(&self) -> Result<(), ReplicaError> {
        let mut counts: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
        let mut start_after: Option<Vec<u8>> = None;
        loop {
            let page = self
                .storage
                .scan(Table::Hints, &[], start_after.as_deref(), 1000)
                .map_err(storage_error)?;
            let Some((last, _)) = page.last() else { break };
            start_after = Some(last.clone());
            for (hint_key, _) in &page {
                if let Some((target, _, _)) = keys::split_hint_key(hint_key) {
                    *counts
                        .entry(String::from_utf8_lossy(target).into_owned())
                        .or_default() += 1;
                }
            }
        }
        *self.hint_counts.lock() = counts;
        Ok(())
    }

    /// Remove a key only if its stored bytes still hash to `expected` (tombstone reaping: a
    /// write that landed meanwhile must not be lost). Returns whether it was removed.
    pub fn remove_if_unchanged(
        &self,
        storage_key: &[u8],
        expected: &[u8; 16],
    ) -> Result<bool, ReplicaError> {
        self.remove_if_unchanged_with(storage_key, expected, Durability::Fsync)
    }

    /// [`Replica::remove_if_unchanged`] with the delete's durability (cleanup removes many
    /// keys buffered, then syncs once).
    pub fn remove_if_unchanged_with(
        &self,
        storage_key: &[u8],
        expected: &[u8; 16],
        durability: Durability,
    ) -> Result<bool, ReplicaError> {
        let guard = self.stripe(storage_key).lock();
        let Some(current) = self
            .storage
            .get(Table::Objects, storage_key)
            .map_err(storage_error)?
        else {
            return Ok(false);
        };
        let Some((bucket, key)) = keys::split_object_key(storage_key) else {
            return Ok(false);
        };
        if &crate::merkle::entry_hash(bucket, key, &current) != expected {
            return Ok(false);
        }
        self.before_drop(&current)?;
        self.storage
            .delete(Table::Objects, storage_key, Durability::Buffered)
            .map_err(storage_error)?;
        self.note_durability(durability);
        if let Some(aae) = self.aae.get() {
            aae.observe(storage_key, Some(&current), None);
        }
        drop(guard);
        self.settle(durability)?;
        Ok(true)
    }

    /// Whether the node stores any object at all.
    pub fn holds_data(&self) -> Result<bool, ReplicaError> {
        Ok(!self.scan_objects(None, 1)?.is_empty())
    }

    /// One page of a bucket's live keys, strictly after `start_after`. Returns the keys and
    /// the storage key to continue from (`None` when the bucket is exhausted).
    pub fn list_keys_page(
        &self,
        bucket: &str,
        start_after: Option<&[u8]>,
        limit: usize,
    ) -> Result<(Vec<String>, Option<Vec<u8>>), ReplicaError> {
        let prefix = keys::bucket_prefix(bucket.as_bytes());
        let limit = limit.clamp(1, limits::MAX_LIST_PAGE);
        let entries = self
            .storage
            .scan(Table::Objects, &prefix, start_after, limit)
            .map_err(storage_error)?;
        let next = if entries.len() == limit {
            entries.last().map(|(k, _)| k.clone())
        } else {
            None
        };
        let mut out = Vec::with_capacity(entries.len());
        for (storage_key, value) in &entries {
            if Object::encoded_is_deleted(value).map_err(ReplicaError::Corrupt)? {
                continue;
            }
            if let Some((_, key)) = keys::split_object_key(storage_key) {
                out.push(String::from_utf8_lossy(key).into_owned());
            }
        }
        Ok((out, next))
    }

    /// This node's results of a secondary index query among the keys `keep` admits (the
    /// partitions this node answers for): at most `query.limit`, in (term, key) order, after
    /// the query's continuation. Terms are in sortable form (`index::sortable`).
    pub fn index_page(
        &self,
        query: &crate::index::Query,
        keep: &dyn Fn(&str) -> bool,
    ) -> Result<Vec<crate::index::Hit>, ReplicaError> {
        if query.on_keys() {
            return self.key_index_page(query, keep);
        }
        let bucket = query.bucket.as_bytes();
        let prefix = crate::index::prefix(bucket, &query.index);
        let mut start_after = match &query.after {
            Some((term, key)) => {
                crate::index::storage_key(bucket, &query.index, term, key.as_bytes())
            }
            None => crate::index::scan_from(bucket, &query.index, &query.start),
        };
        let mut hits = Vec::new();
        // A node answers for part of the partitions it holds: the first scan reads a few
        // times the results asked for, and each next one twice the last.
        let mut page_size = query
            .limit
            .saturating_mul(4)
            .clamp(16, limits::MAX_LIST_PAGE);
        loop {
            let page = self
                .storage
                .scan(Table::Index, &prefix, Some(&start_after), page_size)
                .map_err(storage_error)?;
            let full = page.len() == page_size;
            page_size = page_size.saturating_mul(2).min(limits::MAX_LIST_PAGE);
            for (table_key, _) in &page {
                let Some((term, key)) = crate::index::split_storage_key(table_key, prefix.len())
                else {
                    continue;
                };
                if term > query.end {
                    return Ok(hits);
                }
                if term >= query.start && keep(&key) {
                    hits.push((term, key));
                    if hits.len() >= query.limit {
                        return Ok(hits);
                    }
                }
            }
            match page.last() {
                Some((last, _)) if full => start_after.clone_from(last),
                _ => return Ok(hits),
            }
        }
    }

    /// `$bucket` and `$key`: the live keys themselves (their terms are the keys).
    fn key_index_page(
        &self,
        query: &crate::index::Query,
        keep: &dyn Fn(&str) -> bool,
    ) -> Result<Vec<crate::index::Hit>, ReplicaError> {
        let mut hits = Vec::new();
        let in_range = |key: &str| {
            key.as_bytes() >= query.start.as_slice() && key.as_bytes() <= query.end.as_slice()
        };
        let mut after: Option<Vec<u8>> = if let Some((_, key)) = &query.after {
            Some(keys::object_key(query.bucket.as_bytes(), key.as_bytes()))
        } else {
            // The range's first key itself, then the keys after it.
            let first = String::from_utf8_lossy(&query.start).into_owned();
            if !first.is_empty()
                && keep(&first)
                && self
                    .get(&query.bucket, &first)?
                    .is_some_and(|o| !o.is_deleted())
            {
                hits.push((first.clone().into_bytes(), first));
            }
            (!query.start.is_empty())
                .then(|| keys::object_key(query.bucket.as_bytes(), &query.start))
        };
        while hits.len() < query.limit {
            let (page, next) =
                self.list_keys_page(&query.bucket, after.as_deref(), limits::MAX_LIST_PAGE)?;
            for key in page {
                if key.as_bytes() > query.end.as_slice() {
                    return Ok(hits);
                }
                if in_range(&key) && keep(&key) {
                    hits.push((key.clone().into_bytes(), key));
                    if hits.len() >= query.limit {
                        return Ok(hits);
                    }
                }
            }
            match next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        Ok(hits)
    }

    /// Keys whose every live value expired at or before `now_ms`, after `start_after` (an
    /// `expiry` table key), at most `limit`: `(table key, bucket, key)`, earliest first.
    pub fn expired_keys(
        &self,
        now_ms: u64,
        start_after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, String, String)>, ReplicaError> {
        let page = self
            .storage
            .scan(Table::Expiry, &[], start_after, limit)
            .map_err(storage_error)?;
        let mut out = Vec::new();
        for (table_key, _) in page {
            let Some((at, storage_key)) = table_key.split_first_chunk::<8>() else {
                continue;
            };
            if u64::from_be_bytes(*at) > now_ms {
                break;
            }
            if let Some((bucket, key)) = keys::split_object_key(storage_key) {
                let (bucket, key) = (
                    String::from_utf8_lossy(bucket).into_owned(),
                    String::from_utf8_lossy(key).into_owned(),
                );
                out.push((table_key.clone(), bucket, key));
            }
        }
        Ok(out)
    }

    /// Every bucket holding at least one stored object, skipping from bucket to bucket.
    pub fn list_buckets(&self) -> Result<Vec<String>, ReplicaError> {
        let mut buckets = Vec::new();
        let mut start_after: Option<Vec<u8>> = None;
        loop {
            let entries = self
                .storage
                .scan(Table::Objects, &[], start_after.as_deref(), 1)
                .map_err(storage_error)?;
            let Some((storage_key, _)) = entries.into_iter().next() else {
                break;
            };
            let Some((bucket, _)) = keys::split_object_key(&storage_key) else {
                break;
            };
            buckets.push(String::from_utf8_lossy(bucket).into_owned());
            // Past every key of this bucket: keys are at most MAX_KEY_BYTES long.
            let mut skip = keys::bucket_prefix(bucket);
            skip.extend(std::iter::repeat_n(0xff, limits::MAX_KEY_BYTES + 1));
            start_after = Some(skip);
        }
        Ok(buckets)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::bucket::BucketProps;
    use crate::keys;
    use crate::object::{Content, Object};
    use crate::storage::{Storage, Table};
    use crate::test_support::MapStorage;
    use crate::version::ActorId;
    use std::sync::Arc;

    fn replica(storage: &Arc<MapStorage>, actor: u64) -> Replica {
        let storage: Arc<dyn Storage> = Arc::clone(storage) as Arc<dyn Storage>;
        Replica::new(
            storage,
            ActorId(actor),
            Arc::new(std::sync::atomic::AtomicBool::new(false)),
        )
    }

    fn blind_put(replica: &Replica, key: &str, value: &[u8]) -> Object {
        replica
            .write(write_of(key, value, Durability::Fsync))
            .unwrap()
    }

    fn dot_of(object: &Object) -> crate::version::Dot {
        object.siblings().iter().map(|s| s.dot).max().unwrap()
    }

    /// A key whose object is gone here (a reaped tombstone) and is written again must not get
    /// a dot its actor issued before, within a run and after a restart (the lease).
    #[test]
    fn dots_are_never_reissued_for_a_key_whose_history_is_gone() {
        let storage = Arc::new(MapStorage::default());
        let first = replica(&storage, 7);
        let old = dot_of(&blind_put(&first, "k", b"old"));
        let storage_key = keys::object_key(b"b", b"k");
        storage
            .delete(Table::Objects, &storage_key, Durability::Fsync)
            .unwrap();
        let new = dot_of(&blind_put(&first, "k", b"new"));
        assert_eq!(new.actor, old.actor);
        assert!(new.counter > old.counter, "{new:?} reissues {old:?}");
        // Writes to other keys move the same counter.
        let other = dot_of(&blind_put(&first, "other", b"x"));
        assert!(other.counter > new.counter);

        // A restart of the same actor (clean shutdown): the counter continues past the lease.
        drop(first);
        storage
            .delete(Table::Objects, &storage_key, Durability::Fsync)
            .unwrap();
        let second = replica(&storage, 7);
        let after = dot_of(&blind_put(&second, "k", b"after restart"));
        assert!(after.counter > other.counter, "{after:?} after {other:?}");
    }

    /// A value's expiry counts from the coordinating node's own clock when it writes, not
    /// from the write's stamp: a forwarded write's stamp crossed a clock offset estimated at
    /// the peers' handshake, and a slow handshake makes it late (the nemesis found values
    /// readable 400 ms past their time to live). Its own TTL and its bucket's alike.
    #[test]
    fn expiry_counts_from_the_coordinators_clock_not_the_stamp() {
        let storage = Arc::new(MapStorage::default());
        let replica = replica(&storage, 7);
        let wire = crate::message::WireContent {
            value: b"v".to_vec(),
            content_type: "text/plain".into(),
            meta: Vec::new(),
            deleted: false,
            indexes: Vec::new(),
            ttl_secs: Some(2),
        };
        // Stamped 9,600 by a forwarder's clock as converted here; the coordinator's is 9,000.
        let content = wire.clone().into_content(9_600, 9_000);
        assert_eq!(
            (content.last_modified_ms, content.expires_ms),
            (9_600, Some(11_000))
        );
        let stored = replica
            .write(WriteRequest {
                content,
                now_ms: 9_600,
                wall_ms: 9_000,
                ..write_of("own", b"", Durability::Fsync)
            })
            .unwrap();
        assert_eq!(stored.expires_ms(), Some(11_000));
        let props = BucketProps {
            ttl_secs: Some(5),
            ..BucketProps::default()
        };
        let stored = replica
            .write(WriteRequest {
                content: crate::message::WireContent {
                    ttl_secs: None,
                    ..wire
                }
                .into_content(9_600, 9_000),
                props: &props,
                now_ms: 9_600,
                wall_ms: 9_000,
                ..write_of("bucket", b"", Durability::Fsync)
            })
            .unwrap();
        assert_eq!(stored.expires_ms(), Some(14_000));
    }

    /// `Unmodified` (PB's `if_not_modified`): a write with the context of the stored object
    /// goes through; one whose context is stale (another write came between) is refused and
    /// changes nothing. A context that travels between nodes comes back the same.
    #[test]
    fn an_unmodified_precondition_refuses_a_write_after_another() {
        let storage = Arc::new(MapStorage::default());
        let replica = replica(&storage, 7);
        let first = blind_put(&replica, "k", b"one");
        let conditional = |context: &VersionVector, value: &[u8]| {
            replica.write(WriteRequest {
                context: Some(context.clone()),
                precondition: Precondition::Unmodified(context.clone()),
                ..write_of("k", value, Durability::Fsync)
            })
        };
        let second = conditional(first.clock(), b"two").unwrap();
        let refused = conditional(first.clock(), b"three").unwrap_err();
        assert!(
            matches!(refused, ReplicaError::Precondition(_)),
            "{refused}"
        );
        let stored = blind_put(&replica, "other", b"x");
        assert_ne!(stored.clock(), second.clock());
        let now = replica.get("b", "k").unwrap().unwrap();
        let values: Vec<&[u8]> = now
            .live_siblings()
            .map(|s| s.content.value.as_slice())
            .collect();
        assert_eq!(values, [b"two".as_slice()]);
        let wire = crate::message::WirePrecondition::from(Precondition::Unmodified(
            second.clock().clone(),
        ));
        assert_eq!(
            wire.decode().unwrap(),
            Precondition::Unmodified(second.clock().clone())
        );
        let garbage = crate::message::WirePrecondition::Unmodified(vec![0xff; 3]);
        assert!(garbage.decode().is_err());
    }

    /// A storage whose `sync` waits until the test opens a gate, after saying it started.
    #[derive(Debug)]
    struct GatedSync {
        inner: MapStorage,
        started: std::sync::mpsc::SyncSender<()>,
        gate: parking_lot::Mutex<std::sync::mpsc::Receiver<()>>,
    }

    impl Storage for GatedSync {
        fn get(
            &self,
            table: Table,
            key: &[u8],
        ) -> Result<Option<Vec<u8>>, crate::storage::GetError> {
            self.inner.get(table, key)
        }
        fn put(
            &self,
            table: Table,
            key: &[u8],
            value: &[u8],
            durability: Durability,
        ) -> Result<(), crate::storage::PutError> {
            if table == Table::Objects {
                assert_eq!(
                    durability,
                    Durability::Buffered,
                    "object writes are buffered under the stripe lock; the fsync comes after"
                );
            }
            self.inner.put(table, key, value, durability)
        }
        fn delete(
            &self,
            table: Table,
            key: &[u8],
            durability: Durability,
        ) -> Result<(), crate::storage::DeleteError> {
            self.inner.delete(table, key, durability)
        }
        fn scan(
            &self,
            table: Table,
            prefix: &[u8],
            start_after: Option<&[u8]>,
            limit: usize,
        ) -> Result<Vec<crate::storage::Entry>, crate::storage::ScanError> {
            self.inner.scan(table, prefix, start_after, limit)
        }
        fn sync(&self) -> Result<(), crate::storage::SyncError> {
            let _ = self.started.send(());
            let _ = self.gate.lock().recv();
            Ok(())
        }
        fn engine_name(&self) -> &'static str {
            "gated"
        }
    }

    fn write_of<'a>(key: &'a str, value: &[u8], durability: Durability) -> WriteRequest<'a> {
        WriteRequest {
            bucket: "b",
            key,
            context: None,
            content: Content {
                value: value.to_vec(),
                ..Content::default()
            },
            props: &DEFAULT_PROPS,
            durability,
            precondition: Precondition::None,
            now_ms: 1,
            wall_ms: 1,
        }
    }

    static DEFAULT_PROPS: std::sync::LazyLock<BucketProps> =
        std::sync::LazyLock::new(BucketProps::default);

    /// A durable write waiting for its fsync does not hold its key's stripe lock: another
    /// write of the same key (which the server runs inline on an async worker) goes through
    /// meanwhile instead of stopping that worker for the whole flush.
    #[test]
    fn a_write_waiting_for_its_fsync_does_not_block_the_next_write_of_its_key() {
        let (started_tx, started_rx) = std::sync::mpsc::sync_channel(16);
        let (gate_tx, gate_rx) = std::sync::mpsc::channel();
        let storage = Arc::new(GatedSync {
            inner: MapStorage::default(),
            started: started_tx,
            gate: parking_lot::Mutex::new(gate_rx),
        });
        let replica = Arc::new(Replica::new(
            Arc::clone(&storage) as Arc<dyn Storage>,
            ActorId(3),
            Arc::new(std::sync::atomic::AtomicBool::new(false)),
        ));
        // The lease first (a durable put, not a sync): not what this test is about.
        replica.renew_counter_lease().unwrap();

        let durable = {
            let replica = Arc::clone(&replica);
            std::thread::spawn(move || {
                replica
                    .write(write_of("hot", b"durable", Durability::Fsync))
                    .unwrap()
            })
        };
        started_rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("the durable write reached its fsync");
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let buffered = {
            let replica = Arc::clone(&replica);
            std::thread::spawn(move || {
                let stored = replica
                    .write(write_of("hot", b"buffered", Durability::Buffered))
                    .unwrap();
                let _ = done_tx.send(());
                stored
            })
        };
        let finished = done_rx.recv_timeout(std::time::Duration::from_secs(5));
        gate_tx.send(()).unwrap();
        let first = durable.join().unwrap();
        let second = buffered.join().unwrap();
        assert!(
            finished.is_ok(),
            "the buffered write of the same key waited for the other write's fsync"
        );
        // Both writes are there: the second saw nothing (no context), so they are siblings.
        assert_eq!(second.siblings().len(), 2, "{second:?}");
        assert!(second.clock().descends(first.clock()));
        assert_eq!(replica.fsync_writes(), 1);
    }

    /// The flusher renews the dot-counter lease ahead of need, so a client write does not
    /// have to reserve it (an fsync under its key's stripe lock) itself.
    #[test]
    fn the_counter_lease_is_renewed_before_writes_need_it() {
        let storage = Arc::new(MapStorage::default());
        let replica = replica(&storage, 9);
        let lease = || {
            storage
                .get(Table::Meta, b"dot_counter_lease")
                .unwrap()
                .map(|b| u64::from_be_bytes(b.as_slice().try_into().unwrap()))
        };
        assert!(
            replica.counter_lease_low(),
            "nothing reserved in this run yet"
        );
        assert!(replica.renew_counter_lease().unwrap());
        let reserved = lease().unwrap();
        assert!(!replica.counter_lease_low());
        assert!(
            !replica.renew_counter_lease().unwrap(),
            "more than half is left"
        );
        for i in 0..10 {
            blind_put(&replica, &format!("k{i}"), b"v");
        }
        assert_eq!(
            lease(),
            Some(reserved),
            "no write reserved the lease itself"
        );
        // A restart of the same actor continues past the renewed lease.
        drop(replica);
        let again = Replica::new(
            Arc::clone(&storage) as Arc<dyn Storage>,
            ActorId(9),
            Arc::new(std::sync::atomic::AtomicBool::new(false)),
        );
        let dot = dot_of(&blind_put(&again, "k0", b"after"));
        assert!(
            dot.counter > reserved,
            "{dot:?} within the old lease {reserved}"
        );
    }

    fn counter_update(props: &BucketProps, delta: i64) -> WriteRequest<'_> {
        let update = crate::crdt::Update {
            kind: crate::crdt::DataTypeKind::Counter,
            op: crate::crdt::Op::Counter(delta),
            context: None,
        };
        WriteRequest {
            bucket: "b",
            key: "k",
            context: None,
            content: Content {
                value: update.encode(),
                content_type: crate::crdt::DATATYPE_UPDATE_CONTENT_TYPE.into(),
                ..Content::default()
            },
            props,
            durability: Durability::Fsync,
            precondition: Precondition::None,
            now_ms: 1,
            wall_ms: 1,
        }
    }

    fn counter_value(object: &Object) -> i64 {
        match crate::crdt::merged_value(object, crate::crdt::DataTypeKind::Counter).unwrap() {
            Some(crate::crdt::Crdt::Counter(c)) => c.value(),
            other => panic!("{other:?}"),
        }
    }

    /// A data type update is applied by the replica to the merge of what it holds and
    /// stored as one version that replaces every version it merged; a plain value is refused
    /// in a data type bucket and an update outside one. After the replica drops a live key (a
    /// handoff's cleanup), its updates are made as a new actor, so a value that comes back
    /// from elsewhere with the old actor's entries is not undercounted.
    #[test]
    fn data_type_updates_merge_what_is_held_and_a_new_actor_follows_a_drop() {
        let storage = Arc::new(MapStorage::default());
        let other = replica(&Arc::new(MapStorage::default()), 9);
        let replica = replica(&storage, 7);
        let props = BucketProps {
            datatype: Some(crate::crdt::DataTypeKind::Counter),
            ..BucketProps::default()
        };
        let first = replica.write(counter_update(&props, 5)).unwrap();
        // Another replica's concurrent increment arrives as a sibling.
        let elsewhere = other.write(counter_update(&props, 2)).unwrap();
        let both = replica
            .merge("b", "k", &elsewhere, &props, Durability::Fsync)
            .unwrap();
        assert_eq!(both.siblings().len(), 2);
        assert_eq!(counter_value(&both), 7);
        let after = replica.write(counter_update(&props, 1)).unwrap();
        assert_eq!(
            after.siblings().len(),
            1,
            "one version replaces the merged ones"
        );
        assert_eq!(counter_value(&after), 8);
        assert!(after.clock().covers(first.siblings()[0].dot));

        let plain = replica.write(WriteRequest {
            props: &props,
            ..write_of("k", b"plain", Durability::Fsync)
        });
        assert!(matches!(plain, Err(ReplicaError::DataType(_))), "{plain:?}");
        let outside = replica.write(counter_update(&DEFAULT_PROPS, 1));
        assert!(
            matches!(outside, Err(ReplicaError::DataType(_))),
            "{outside:?}"
        );

        // The replica drops the key (no longer its own), and is sent an older copy later.
        let storage_key = keys::object_key(b"b", b"k");
        let bytes = storage.get(Table::Objects, &storage_key).unwrap().unwrap();
        let expected = crate::merkle::entry_hash(b"b", b"k", &bytes);
        assert!(
            replica
                .remove_if_unchanged_with(&storage_key, &expected, Durability::Fsync)
                .unwrap()
        );
        let again = replica.write(counter_update(&props, 1)).unwrap();
        let merged = again.sync(&after);
        assert_eq!(counter_value(&merged), 9, "no increment is lost");
    }

    /// A replica drops a key (a handoff's cleanup) that another replica still holds, and is
    /// then written the key blind (it replicates it again, before its handoff arrived): the
    /// new version is a sibling of the old one, not its replacement (before the write actor
    /// epoch, the new dot's clock entry claimed every earlier dot of the same actor, and the
    /// old value was silently dropped wherever the two met).
    #[test]
    fn a_blind_write_after_a_drop_keeps_the_dropped_value_as_a_sibling() {
        let storage = Arc::new(MapStorage::default());
        let first = replica(&storage, 7);
        let old = blind_put(&first, "k", b"old");
        let storage_key = keys::object_key(b"b", b"k");
        let bytes = storage.get(Table::Objects, &storage_key).unwrap().unwrap();
        let expected = crate::merkle::entry_hash(b"b", b"k", &bytes);
        assert!(
            first
                .remove_if_unchanged_with(&storage_key, &expected, Durability::Buffered)
                .unwrap()
        );
        let new = blind_put(&first, "k", b"new");
        let met = new.sync(&old);
        let mut values: Vec<&[u8]> = met
            .live_siblings()
            .map(|s| s.content.value.as_slice())
            .collect();
        values.sort_unstable();
        assert_eq!(values, [b"new".as_slice(), b"old".as_slice()]);
        // A restart keeps the epoch: the next write is not made as an earlier actor.
        drop(first);
        let again = replica(&storage, 7);
        let after = blind_put(&again, "k", b"after");
        assert_eq!(dot_of(&after).actor, dot_of(&new).actor);
    }
}

//! Helpers shared by the core's unit tests.

use crate::membership::{Member, MemberStatus};
use crate::ring::NodeId;

pub fn id(name: &str) -> NodeId {
    NodeId(name.to_owned())
}

/// An object of one version holding `value`, written by `actor` (its first dot).
pub fn version(value: &[u8], actor: u64) -> crate::object::Object {
    crate::object::Object::default()
        .update(
            &crate::version::VersionVector::new(),
            crate::object::Content {
                value: value.to_vec(),
                ..crate::object::Content::default()
            },
            crate::version::ActorId(actor),
            1,
            crate::object::PrunePolicy::default(),
        )
        .unwrap_or_else(|e| panic!("{e:?}"))
}

/// An object of blind writes, one sibling per `(value, expiry)`, the i-th by actor i + 1.
pub fn siblings(values: &[(&[u8], Option<u64>)]) -> crate::object::Object {
    let mut object = crate::object::Object::default();
    for (i, (value, expires_ms)) in values.iter().enumerate() {
        object = object
            .update(
                &crate::version::VersionVector::new(),
                crate::object::Content {
                    value: value.to_vec(),
                    content_type: "text/plain".into(),
                    expires_ms: *expires_ms,
                    ..crate::object::Content::default()
                },
                crate::version::ActorId(i as u64 + 1),
                1,
                crate::object::PrunePolicy::default(),
            )
            .unwrap_or_else(|e| panic!("{e:?}"));
    }
    object
}

/// A member entry with empty addresses and zone.
pub fn member(name: &str, status: MemberStatus) -> Member {
    Member {
        id: id(name),
        peer_addr: String::new(),
        http_addr: String::new(),
        zone: String::new(),
        status,
        version: 1,
        heartbeat: 0,
        public_key: None,
    }
}

/// A cluster of `names` (the first founds it) over `partitions` partitions, with every
/// transition completed: all members valid, no `next` ring.
pub fn settled_cluster(names: &[&str], partitions: u32) -> crate::membership::ClusterState {
    let (first, rest) = names.split_first().unwrap_or_else(|| panic!("no member"));
    let mut state = crate::membership::ClusterState::found(
        "c",
        member(first, MemberStatus::Joining),
        partitions,
    )
    .unwrap_or_else(|e| panic!("found: {e:?}"));
    for n in rest {
        state
            .add_joining(member(n, MemberStatus::Joining))
            .unwrap_or_else(|e| panic!("join: {e:?}"));
    }
    settle(&mut state);
    state
}

/// Complete every pending transition: plan, mark every ring node's handoff done, until the
/// ring is settled.
pub fn settle(state: &mut crate::membership::ClusterState) {
    state.plan();
    while state.ring.next.is_some() {
        for n in state.ring.current.nodes().to_vec() {
            state.mark_handoff_done(&n.id);
        }
        state.plan();
    }
}

/// An in-memory `Storage` for unit tests of code above the engines (the real engines and
/// their conformance suite live in `dynakv-storage`, which depends on this crate).
#[derive(Debug, Default)]
pub struct MapStorage {
    map: parking_lot::Mutex<Tables>,
    /// While set, every call fails (a dead disk).
    pub failing: std::sync::atomic::AtomicBool,
    /// While set, puts and deletes to this table fail (an engine failing on one table).
    pub failing_table: parking_lot::Mutex<Option<crate::storage::Table>>,
}

impl MapStorage {
    fn check(&self) -> Result<(), crate::storage::EngineFailure> {
        if self.failing.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(crate::storage::EngineFailure {
                engine: "test-map",
                message: "injected failure".into(),
            });
        }
        Ok(())
    }

    /// `check`, and the failure of writes to `failing_table`.
    fn check_write(
        &self,
        table: crate::storage::Table,
    ) -> Result<(), crate::storage::EngineFailure> {
        self.check()?;
        if *self.failing_table.lock() == Some(table) {
            return Err(crate::storage::EngineFailure {
                engine: "test-map",
                message: format!("injected failure of {table:?}"),
            });
        }
        Ok(())
    }
}

type Tables = std::collections::BTreeMap<(crate::storage::Table, Vec<u8>), Vec<u8>>;

impl crate::storage::Storage for MapStorage {
    fn get(
        &self,
        table: crate::storage::Table,
        key: &[u8],
    ) -> Result<Option<Vec<u8>>, crate::storage::GetError> {
        self.check()?;
        Ok(self.map.lock().get(&(table, key.to_vec())).cloned())
    }

    fn put(
        &self,
        table: crate::storage::Table,
        key: &[u8],
        value: &[u8],
        _durability: crate::storage::Durability,
    ) -> Result<(), crate::storage::PutError> {
        self.check_write(table)?;
        self.map
            .lock()
            .insert((table, key.to_vec()), value.to_vec());
        Ok(())
    }

    fn delete(
        &self,
        table: crate::storage::Table,
        key: &[u8],
        _durability: crate::storage::Durability,
    ) -> Result<(), crate::storage::DeleteError> {
        self.check_write(table)?;
        self.map.lock().remove(&(table, key.to_vec()));
        Ok(())
    }

    fn scan(
        &self,
        table: crate::storage::Table,
        prefix: &[u8],
        start_after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<crate::storage::Entry>, crate::storage::ScanError> {
        self.check()?;
        let map = self.map.lock();
        let from = match start_after {
            Some(after) if after > prefix => after,
            _ => prefix,
        };
        Ok(map
            .range((table, from.to_vec())..)
            .take_while(|((t, k), _)| *t == table && k.starts_with(prefix))
            .filter(|((_, k), _)| start_after.is_none_or(|after| k.as_slice() > after))
            .take(limit)
            .map(|((_, k), v)| (k.clone(), v.clone()))
            .collect())
    }

    fn sync(&self) -> Result<(), crate::storage::SyncError> {
        self.check()?;
        Ok(())
    }

    fn engine_name(&self) -> &'static str {
        "test-map"
    }
}

/// A node's view for the request and listing machines' tests: default bucket properties,
/// every node up but those in `down`, request timeout 100 ms, forward timeout 500 ms.
pub struct TestView {
    pub me: NodeId,
    pub state: crate::membership::ClusterState,
    pub down: std::collections::BTreeSet<NodeId>,
}

impl TestView {
    /// `me` in a settled cluster of `names` over 16 partitions.
    pub fn new(me: &str, names: &[&str]) -> TestView {
        TestView {
            me: id(me),
            state: settled_cluster(names, 16),
            down: std::collections::BTreeSet::new(),
        }
    }
}

impl crate::request::View for TestView {
    fn me(&self) -> &NodeId {
        &self.me
    }
    fn state(&self) -> &crate::membership::ClusterState {
        &self.state
    }
    fn props(&self, _bucket: &str) -> crate::bucket::BucketProps {
        crate::bucket::BucketProps::default()
    }
    fn is_up(&self, node: &NodeId) -> bool {
        !self.down.contains(node)
    }
    fn request_timeout_ms(&self) -> u64 {
        100
    }
    fn forward_timeout_ms(&self) -> u64 {
        500
    }
}

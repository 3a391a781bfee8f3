//! Cluster membership and ring ownership, reconciled by gossip.
//!
//! A [`ClusterState`] is what every node believes about the cluster: the members (with their
//! addresses, zone, status and heartbeat), the ring (current owners, and during a transition
//! the next owners), the markers of finished handoffs, and the cluster-wide bucket properties.
//! Nodes exchange their states by gossip and [`ClusterState::merge`] them.
//!
//! Convergence (checked by the simulation tests below): `merge` is commutative, associative and
//! idempotent, so nodes that keep gossiping end with identical states whatever order the
//! messages arrive in:
//! - a member entry is last-writer-wins by `(version, status rank, addresses)`, its heartbeat is
//!   the maximum seen;
//! - the ring state is last-writer-wins by `(version, content)`; only the claimant (the
//!   smallest valid ring member, a deterministic choice) changes the ring, so conflicting
//!   versions only arise while nodes disagree on who the claimant is, and the deterministic
//!   tie-break then settles them;
//! - handoff markers are a grow-only set, pruned to the ring's current transition;
//! - bucket properties are last-writer-wins by `(timestamp, node)`.
//!
//! Ring transitions (`plan`, run by the claimant): pending joins and leaves become a `next`
//! ring computed with the ring's balanced, minimal-movement claim. Every node of the current
//! ring then sends each key to the nodes that enter its preference list and marks its handoff
//! done; when every node of the current ring has marked it, the claimant makes `next` current.
//! Only then do nodes drop keys they no longer replicate. Writes during a transition must reach
//! a quorum of both the current and the next preference list.

use crate::limits;
use crate::ring::{NodeId, PartitionId, Ring, RingError, RingNode};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// What a node waiting for its join answers every peer request: until the join is accepted
/// it serves nothing (a member's gossip merged before would make it a member of a cluster it
/// has not joined, and its join would then be refused). The server and the `Node` both keep
/// this rule.
pub const AWAITING_JOIN_REFUSAL: &str =
    "this node is joining a cluster: it serves no peer request yet";

/// Most members a cluster may have.
pub const MAX_MEMBERS: usize = 256;
/// Most buckets with custom properties.
pub const MAX_CUSTOM_BUCKETS: usize = 10_000;

/// Where a member is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberStatus {
    /// Asked to join; not yet in the ring.
    Joining,
    /// In the ring, serving.
    Valid,
    /// Asked to leave; its data is moving away.
    Leaving,
    /// Left: owns nothing; kept so the decision propagates.
    Exiting,
}

impl MemberStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            MemberStatus::Joining => "joining",
            MemberStatus::Valid => "valid",
            MemberStatus::Leaving => "leaving",
            MemberStatus::Exiting => "exiting",
        }
    }
}

/// One node as the cluster knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub id: NodeId,
    /// Peer transport address.
    pub peer_addr: String,
    /// Client HTTP address.
    pub http_addr: String,
    pub zone: String,
    pub status: MemberStatus,
    /// Bumped by whoever changes the entry (last-writer-wins).
    pub version: u64,
    /// Bumped by the member itself every gossip round (failure detection).
    pub heartbeat: u64,
    /// The node's public key, its identity on authenticated peer links (the name is a label);
    /// `None` where links carry no keys (the simulator) or in a state written before keys.
    #[serde(default)]
    pub public_key: Option<[u8; 32]>,
}

impl Member {
    fn rank(&self) -> (u64, MemberStatus, &str, &str, &str, Option<&[u8; 32]>) {
        (
            self.version,
            self.status,
            &self.peer_addr,
            &self.http_addr,
            &self.zone,
            self.public_key.as_ref(),
        )
    }
}

/// The ring and, during a transition, the ring it is moving to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingState {
    /// Bumped on every change (transition start, transition end).
    pub version: u64,
    /// Owners that reads use.
    pub current: Ring,
    /// Owners being moved to; `None` when settled.
    pub next: Option<Ring>,
    /// The version at which `next` was set (identifies the transition).
    pub transition: u64,
}

/// A bucket's properties as last written anywhere in the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketPropsEntry {
    pub timestamp_ms: u64,
    pub node: NodeId,
    /// The `props` JSON object; `None` when reset to defaults.
    pub props_json: Option<String>,
}

/// What one node believes about the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    pub cluster_name: String,
    pub members: BTreeMap<NodeId, Member>,
    pub ring: RingState,
    /// `(transition, node)`: `node` has handed off everything the transition needs from it.
    pub handoffs_done: BTreeSet<(u64, NodeId)>,
    pub bucket_props: BTreeMap<String, BucketPropsEntry>,
    /// Users, sources and grants (absent in states written before security).
    #[serde(default)]
    pub security: crate::security::SecurityState,
    /// Bucket types (absent in states written before types).
    #[serde(default)]
    pub bucket_types: BTreeMap<String, crate::bucket_types::BucketTypeEntry>,
}

/// The format of the persisted cluster state this version writes (see
/// [`ClusterState::encode_persisted`]).
/// Format 2 is written only by a state holding bucket types (which format 1's readers would
/// drop without a word, then write back without); a state without any is still format 1,
/// so a version before types can still read it.
pub const PERSISTED_STATE_FORMAT: u32 = 2;

/// Why a persisted cluster state cannot be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PersistedStateError {
    #[error(
        "the stored cluster state has format {found}, newer than this version reads \
         ({PERSISTED_STATE_FORMAT}): it was written by a newer dynakv; run that version"
    )]
    Newer { found: u32 },
    #[error("the stored cluster state is not readable: {0}")]
    Malformed(String),
}

/// The persisted form: the state with the format it was written in.
#[derive(Serialize)]
struct PersistedOut<'a> {
    format: u32,
    state: &'a ClusterState,
}

#[derive(Deserialize)]
struct PersistedIn {
    format: u32,
    state: serde_json::Value,
}

/// Meta-table key of a node's persisted cluster state.
pub const PERSISTED_STATE_KEY: &[u8] = b"cluster_state";

/// Read a node's persisted cluster state (`None`: it never wrote one, e.g. a wiped disk).
///
/// # Errors
/// The storage failed, or the stored state is unreadable or of a newer format.
pub fn load_persisted(
    storage: &dyn crate::storage::Storage,
) -> Result<Option<ClusterState>, String> {
    let stored = storage
        .get(crate::storage::Table::Meta, PERSISTED_STATE_KEY)
        .map_err(|e| e.to_string())?;
    stored
        .map(|bytes| ClusterState::decode_persisted(&bytes).map_err(|e| e.to_string()))
        .transpose()
}

/// Write a node's cluster state, durably (an fsync'd put: it may wait on the disk, so a
/// driver runs it off its event loop, in the order the states were made).
///
/// # Errors
/// The storage failed.
pub fn store_persisted(
    storage: &dyn crate::storage::Storage,
    state: &ClusterState,
) -> Result<(), String> {
    storage
        .put(
            crate::storage::Table::Meta,
            PERSISTED_STATE_KEY,
            &state.encode_persisted(),
            crate::storage::Durability::Fsync,
        )
        .map_err(|e| e.to_string())
}

impl ClusterState {
    /// Whether the two states persist the same (they differ at most in heartbeats, which are
    /// volatile): a node writes its state only when this changes.
    pub fn persists_as(&self, other: &ClusterState) -> bool {
        let same_member = |a: &Member, b: &Member| {
            // Destructured so that a new field is not forgotten here.
            let Member {
                id,
                peer_addr,
                http_addr,
                zone,
                status,
                version,
                heartbeat: _,
                public_key,
            } = a;
            *id == b.id
                && *peer_addr == b.peer_addr
                && *http_addr == b.http_addr
                && *zone == b.zone
                && *status == b.status
                && *version == b.version
                && *public_key == b.public_key
        };
        let ClusterState {
            cluster_name,
            members,
            ring,
            handoffs_done,
            bucket_props,
            security,
            bucket_types,
        } = self;
        *cluster_name == other.cluster_name
            && *ring == other.ring
            && *handoffs_done == other.handoffs_done
            && *bucket_props == other.bucket_props
            && *security == other.security
            && *bucket_types == other.bucket_types
            && members.len() == other.members.len()
            && members
                .values()
                .zip(other.members.values())
                .all(|(a, b)| same_member(a, b))
    }

    /// The bytes a node stores its cluster state as: JSON with a format marker, so a later
    /// version can tell what it reads and an older one refuses what it cannot. Heartbeats are
    /// left out (they are volatile).
    pub fn encode_persisted(&self) -> Vec<u8> {
        let mut state = self.clone();
        for member in state.members.values_mut() {
            member.heartbeat = 0;
        }
        let out = PersistedOut {
            format: if state.bucket_types.is_empty() {
                1
            } else {
                PERSISTED_STATE_FORMAT
            },
            state: &state,
        };
        // Serializing plain structs and maps of strings cannot fail.
        serde_json::to_vec(&out).unwrap_or_default()
    }

    /// Read what [`ClusterState::encode_persisted`] wrote, or the unmarked state of versions
    /// before the marker (format 0). A newer format is refused, not guessed at.
    pub fn decode_persisted(bytes: &[u8]) -> Result<ClusterState, PersistedStateError> {
        let malformed = |e: serde_json::Error| PersistedStateError::Malformed(e.to_string());
        let value: serde_json::Value = serde_json::from_slice(bytes).map_err(malformed)?;
        let marked = value.get("format").is_some() && value.get("state").is_some();
        if !marked {
            return serde_json::from_value(value).map_err(malformed);
        }
        let persisted: PersistedIn = serde_json::from_value(value).map_err(malformed)?;
        if persisted.format > PERSISTED_STATE_FORMAT {
            return Err(PersistedStateError::Newer {
                found: persisted.format,
            });
        }
        serde_json::from_value(persisted.state).map_err(malformed)
    }
}

/// Why a membership change was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MembershipError {
    #[error("node {0} is already a member")]
    AlreadyMember(NodeId),
    #[error("node {0} is not a member")]
    NotMember(NodeId),
    #[error("the cluster is full ({MAX_MEMBERS} members)")]
    Full,
    #[error("the last node of the ring cannot leave")]
    LastNode,
    #[error("node {sender} cannot ask for node {member} to join")]
    NotTheSender { member: NodeId, sender: NodeId },
    #[error("node {0} asked to join under a key other than the one it proved")]
    KeyMismatch(NodeId),
    #[error("cluster name mismatch: this cluster is {ours:?}, the request is for {theirs:?}")]
    WrongCluster { ours: String, theirs: String },
    #[error("ring: {0}")]
    Ring(#[from] RingError),
    #[error("a ring transition is in progress: wait until the ring has settled")]
    TransitionInProgress,
}

impl ClusterState {
    /// A new cluster founded by `founder`, owning every partition.
    pub fn found(
        cluster_name: &str,
        founder: Member,
        partitions: u32,
    ) -> Result<ClusterState, MembershipError> {
        let ring = Ring::new(
            partitions,
            RingNode {
                id: founder.id.clone(),
                zone: founder.zone.clone(),
            },
        )?;
        let mut members = BTreeMap::new();
        let mut founder = founder;
        founder.status = MemberStatus::Valid;
        members.insert(founder.id.clone(), founder);
        Ok(ClusterState {
            cluster_name: cluster_name.to_owned(),
            members,
            ring: RingState {
                version: 1,
                current: ring,
                next: None,
                transition: 0,
            },
            handoffs_done: BTreeSet::new(),
            bucket_props: BTreeMap::new(),
            security: crate::security::SecurityState::default(),
            bucket_types: BTreeMap::new(),
        })
    }

    /// Reconcile with another node's state (commutative, associative, idempotent).
    pub fn merge(&mut self, other: &ClusterState) {
        for (id, theirs) in &other.members {
            match self.members.get_mut(id) {
                None => {
                    if self.members.len() < MAX_MEMBERS {
                        self.members.insert(id.clone(), theirs.clone());
                    }
                }
                Some(ours) => {
                    let heartbeat = ours.heartbeat.max(theirs.heartbeat);
                    if theirs.rank() > ours.rank() {
                        *ours = theirs.clone();
                    }
                    ours.heartbeat = heartbeat;
                }
            }
        }
        let take_theirs = match other.ring.version.cmp(&self.ring.version) {
            std::cmp::Ordering::Greater => true,
            std::cmp::Ordering::Less => false,
            std::cmp::Ordering::Equal => ring_tiebreak(&other.ring) > ring_tiebreak(&self.ring),
        };
        if take_theirs {
            self.ring = other.ring.clone();
        }
        self.handoffs_done
            .extend(other.handoffs_done.iter().cloned());
        let transition = self.ring.transition;
        self.handoffs_done.retain(|(t, _)| *t >= transition);
        self.security.merge(&other.security);
        crate::bucket_types::merge(&mut self.bucket_types, &other.bucket_types);
        for (bucket, theirs) in &other.bucket_props {
            match self.bucket_props.get_mut(bucket) {
                None => {
                    if self.bucket_props.len() < MAX_CUSTOM_BUCKETS {
                        self.bucket_props.insert(bucket.clone(), theirs.clone());
                    }
                }
                Some(ours) => {
                    if (theirs.timestamp_ms, &theirs.node, &theirs.props_json)
                        > (ours.timestamp_ms, &ours.node, &ours.props_json)
                    {
                        *ours = theirs.clone();
                    }
                }
            }
        }
    }

    /// The member that plans ring transitions: the smallest valid member of the current ring
    /// (any ring member when none is valid).
    pub fn claimant(&self) -> Option<&NodeId> {
        let in_ring = |id: &NodeId| self.ring.current.nodes().iter().any(|n| &n.id == id);
        self.members
            .values()
            .filter(|m| m.status == MemberStatus::Valid && in_ring(&m.id))
            .map(|m| &m.id)
            .next()
            .or_else(|| self.ring.current.nodes().first().map(|n| &n.id))
    }

    /// Whether `member` may be asked to join by the peer `from`, which proved `from_key` on
    /// its link (`None` where links carry no keys): a node only asks for itself, under the
    /// key it proved. Whether a live member's name may move to another key is the link's
    /// check (the transport's verifier), made before any request is read.
    pub fn check_join_request(
        from: &NodeId,
        from_key: Option<&[u8; 32]>,
        member: &Member,
    ) -> Result<(), MembershipError> {
        if &member.id != from {
            return Err(MembershipError::NotTheSender {
                member: member.id.clone(),
                sender: from.clone(),
            });
        }
        if from_key.is_some() && member.public_key.as_ref() != from_key {
            return Err(MembershipError::KeyMismatch(member.id.clone()));
        }
        Ok(())
    }

    /// Record a new member asking to join (status joining). A member re-announcing itself
    /// keeps its state; new addresses or a new key replace the old ones (a node that came back
    /// with an empty data directory has a new key: see [`Self::check_join_request`]).
    pub fn add_joining(&mut self, member: Member) -> Result<(), MembershipError> {
        if let Some(existing) = self.members.get(&member.id)
            && existing.status != MemberStatus::Exiting
        {
            if existing.peer_addr == member.peer_addr
                && existing.http_addr == member.http_addr
                && (member.public_key.is_none() || existing.public_key == member.public_key)
            {
                return Ok(());
            }
            let mut updated = existing.clone();
            updated.peer_addr = member.peer_addr;
            updated.http_addr = member.http_addr;
            if member.public_key.is_some() {
                updated.public_key = member.public_key;
            }
            updated.version += 1;
            self.members.insert(updated.id.clone(), updated);
            return Ok(());
        }
        if self.members.len() >= MAX_MEMBERS {
            return Err(MembershipError::Full);
        }
        let version = self.members.get(&member.id).map_or(0, |m| m.version) + 1;
        self.members.insert(
            member.id.clone(),
            Member {
                status: MemberStatus::Joining,
                version,
                ..member
            },
        );
        Ok(())
    }

    /// Mark `node` as leaving.
    pub fn request_leave(&mut self, node: &NodeId) -> Result<(), MembershipError> {
        let in_ring = self.ring.current.nodes().len();
        let member = self
            .members
            .get_mut(node)
            .ok_or_else(|| MembershipError::NotMember(node.clone()))?;
        if member.status == MemberStatus::Leaving || member.status == MemberStatus::Exiting {
            return Ok(());
        }
        if in_ring <= 1 {
            return Err(MembershipError::LastNode);
        }
        member.status = MemberStatus::Leaving;
        member.version += 1;
        Ok(())
    }

    /// Take `node` out of the ring at once, without handoff (Riak's `force-remove`), for a
    /// node that is gone for good: its partitions go to the others by the claim rule a leave
    /// uses, and their new owners get the data from the key's other replicas (anti-entropy,
    /// read repair); what only that node held (an `n_val` 1 bucket's keys, hints it kept) is
    /// lost. Refused during a ring transition and for the last node.
    pub fn force_remove(&mut self, node: &NodeId) -> Result<(), MembershipError> {
        if self.ring.next.is_some() {
            return Err(MembershipError::TransitionInProgress);
        }
        if !self.members.contains_key(node) {
            return Err(MembershipError::NotMember(node.clone()));
        }
        if self.ring.current.nodes().iter().any(|n| &n.id == node) {
            self.ring.current = self
                .ring
                .current
                .with_node_removed(node)
                .map_err(|e| match e {
                    RingError::NoNodes => MembershipError::LastNode,
                    other => MembershipError::Ring(other),
                })?;
            self.ring.version += 1;
        }
        if let Some(member) = self.members.get_mut(node)
            && member.status != MemberStatus::Exiting
        {
            member.status = MemberStatus::Exiting;
            member.version += 1;
        }
        Ok(())
    }

    /// Bump `node`'s own heartbeat.
    pub fn beat(&mut self, node: &NodeId) {
        if let Some(member) = self.members.get_mut(node) {
            member.heartbeat += 1;
        }
    }

    /// The nodes that must mark their handoff done before the transition completes.
    pub fn transition_participants(&self) -> Vec<NodeId> {
        self.ring
            .current
            .nodes()
            .iter()
            .map(|n| n.id.clone())
            .collect()
    }

    /// Whether `node` has marked the current transition's handoff done.
    pub fn handoff_done(&self, node: &NodeId) -> bool {
        self.handoffs_done
            .contains(&(self.ring.transition, node.clone()))
    }

    /// Mark `node`'s handoff for the current transition done.
    pub fn mark_handoff_done(&mut self, node: &NodeId) {
        if self.ring.next.is_some() {
            self.handoffs_done
                .insert((self.ring.transition, node.clone()));
        }
    }

    /// True when no transition is pending and every member is valid or has exited.
    pub fn settled(&self) -> bool {
        self.ring.next.is_none()
            && self
                .members
                .values()
                .all(|m| matches!(m.status, MemberStatus::Valid | MemberStatus::Exiting))
    }

    /// The claimant's step: start, advance or finish a ring transition, and update member
    /// statuses. Returns whether anything changed. Deterministic.
    pub fn plan(&mut self) -> bool {
        let mut changed = false;
        if let Some(next) = self.ring.next.clone() {
            let all_done = self
                .transition_participants()
                .iter()
                .all(|n| self.handoff_done(n));
            if all_done {
                self.ring.current = next;
                self.ring.next = None;
                self.ring.version += 1;
                changed = true;
            }
        } else {
            let in_ring: BTreeSet<NodeId> = self
                .ring
                .current
                .nodes()
                .iter()
                .map(|n| n.id.clone())
                .collect();
            let mut target = self.ring.current.clone();
            for member in self.members.values() {
                if member.status == MemberStatus::Joining && !in_ring.contains(&member.id) {
                    let node = RingNode {
                        id: member.id.clone(),
                        zone: member.zone.clone(),
                    };
                    if let Ok(ring) = target.with_node_added(node) {
                        target = ring;
                    }
                }
            }
            for member in self.members.values() {
                if member.status == MemberStatus::Leaving
                    && in_ring.contains(&member.id)
                    && let Ok(ring) = target.with_node_removed(&member.id)
                {
                    target = ring;
                }
            }
            if target != self.ring.current {
                self.ring.version += 1;
                self.ring.transition = self.ring.version;
                self.ring.next = Some(target);
                changed = true;
            }
        }
        if self.ring.next.is_none() {
            let in_ring: BTreeSet<NodeId> = self
                .ring
                .current
                .nodes()
                .iter()
                .map(|n| n.id.clone())
                .collect();
            for member in self.members.values_mut() {
                let next_status = match member.status {
                    MemberStatus::Joining if in_ring.contains(&member.id) => MemberStatus::Valid,
                    MemberStatus::Leaving if !in_ring.contains(&member.id) => MemberStatus::Exiting,
                    other => other,
                };
                if next_status != member.status {
                    member.status = next_status;
                    member.version += 1;
                    changed = true;
                }
            }
        }
        let transition = self.ring.transition;
        self.handoffs_done.retain(|(t, _)| *t >= transition);
        changed
    }

    /// The preference list of a key's partition in the current ring.
    pub fn preference_list(&self, partition: PartitionId, n_val: u32) -> Vec<NodeId> {
        preflist(&self.ring.current, partition, n_val)
    }

    /// The preference list in the next ring, during a transition.
    pub fn next_preference_list(&self, partition: PartitionId, n_val: u32) -> Option<Vec<NodeId>> {
        self.ring
            .next
            .as_ref()
            .map(|next| preflist(next, partition, n_val))
    }

    /// The member `me` gossips with this round, among the members other than `me` that have
    /// not exited: `pick(count)` chooses one by index (the driver's seeded randomness or a
    /// counter; taken modulo `count`). `None` when there is none (`pick` is not called).
    pub fn gossip_peer(&self, me: &NodeId, pick: impl FnOnce(usize) -> usize) -> Option<NodeId> {
        let peers: Vec<&NodeId> = self
            .members
            .values()
            .filter(|m| m.id != *me && m.status != MemberStatus::Exiting)
            .map(|m| &m.id)
            .collect();
        if peers.is_empty() {
            return None;
        }
        Some(peers[pick(peers.len()) % peers.len()].clone())
    }

    /// A member by id.
    /// Whether `name` has a member entry (in any status).
    pub fn is_member(&self, name: &str) -> bool {
        self.members.contains_key(&NodeId(name.to_owned()))
    }

    pub fn member(&self, id: &NodeId) -> Option<&Member> {
        self.members.get(id)
    }
}

fn preflist(ring: &Ring, partition: PartitionId, n_val: u32) -> Vec<NodeId> {
    let n = (n_val.clamp(1, limits::MAX_N_VAL)) as usize;
    ring.preference_list(partition, n)
        .into_iter()
        .map(|(_, node)| node)
        .collect()
}

fn ring_tiebreak(ring: &RingState) -> (u64, Vec<&NodeId>, Option<Vec<&NodeId>>) {
    (
        ring.transition,
        ring.current.owners().iter().collect(),
        ring.next.as_ref().map(|n| n.owners().iter().collect()),
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_persisted_state_carries_its_format_and_old_or_newer_ones_are_told_apart() {
        let mut state = crate::test_support::settled_cluster(&["a", "b"], 8);
        if let Some(member) = state.members.values_mut().next() {
            member.heartbeat = 42;
        }
        let bytes = state.encode_persisted();
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(text.starts_with(r#"{"format":1,"#), "{text}");
        let back = ClusterState::decode_persisted(&bytes).unwrap();
        assert!(back.members.values().all(|m| m.heartbeat == 0));
        assert_eq!(back.ring, state.ring);
        // What versions before the marker wrote: the bare state.
        let legacy = serde_json::to_vec(&state).unwrap();
        assert_eq!(ClusterState::decode_persisted(&legacy).unwrap(), state);
        // A newer version's state is refused with what to do.
        let newer = text.replacen(r#""format":1"#, r#""format":3"#, 1);
        let err = ClusterState::decode_persisted(newer.as_bytes()).unwrap_err();
        assert_eq!(err, PersistedStateError::Newer { found: 3 });
        // A state with bucket types is format 2 (a reader of 1 would drop them), and reads back.
        let mut typed = state.clone();
        crate::bucket_types::apply(
            &mut typed,
            crate::bucket_types::TypeChange::Create {
                name: "t".into(),
                props: serde_json::Map::new(),
            },
            &crate::ring::NodeId("a".into()),
            1,
            &crate::bucket::BucketProps::default(),
        )
        .unwrap();
        let bytes = typed.encode_persisted();
        assert!(bytes.starts_with(br#"{"format":2,"#));
        assert_eq!(
            ClusterState::decode_persisted(&bytes).unwrap().bucket_types,
            typed.bucket_types
        );
        assert!(err.to_string().contains("newer dynakv"));
        assert!(matches!(
            ClusterState::decode_persisted(b"{\"format\":1,\"state\":7}"),
            Err(PersistedStateError::Malformed(_))
        ));
        assert!(ClusterState::decode_persisted(b"\xff").is_err());
    }

    use super::*;

    fn member(name: &str, zone: &str) -> Member {
        Member {
            id: NodeId(name.to_owned()),
            peer_addr: format!("{name}:1"),
            http_addr: format!("{name}:2"),
            zone: zone.to_owned(),
            status: MemberStatus::Joining,
            version: 0,
            heartbeat: 0,
            public_key: None,
        }
    }

    #[test]
    fn gossip_goes_to_another_member_that_has_not_exited() {
        let a = NodeId("a".into());
        let mut state =
            ClusterState::found("c", member("a", ""), 8).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(state.gossip_peer(&a, |_| 0), None, "alone");
        for n in ["b", "c"] {
            state
                .add_joining(member(n, ""))
                .unwrap_or_else(|e| panic!("{e:?}"));
        }
        let picks: std::collections::BTreeSet<NodeId> = (0..10)
            .filter_map(|i| state.gossip_peer(&a, |_| i))
            .collect();
        assert_eq!(picks.len(), 2);
        assert!(!picks.contains(&a));
        if let Some(c) = state.members.get_mut(&NodeId("c".into())) {
            c.status = MemberStatus::Exiting;
        }
        assert!((0..10).all(|i| state.gossip_peer(&a, |_| i) == Some(NodeId("b".into()))));
    }

    /// A tiny deterministic PRNG for the simulation (no ambient randomness in core).
    struct XorShift(u64);
    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// Simulates `nodes` exchanging gossip in random pairs; every node that is its own
    /// claimant plans, and every ring node marks its handoff done when it sees a transition.
    fn gossip_until_settled(
        nodes: &mut [ClusterState],
        ids: &[NodeId],
        rng: &mut XorShift,
    ) -> usize {
        for round in 0..10_000 {
            let a = rng.below(nodes.len());
            let b = rng.below(nodes.len());
            if a != b {
                let (sa, sb) = (nodes[a].clone(), nodes[b].clone());
                nodes[a].merge(&sb);
                nodes[b].merge(&sa);
            }
            for (i, state) in nodes.iter_mut().enumerate() {
                let me = &ids[i];
                if state.ring.next.is_some()
                    && state.ring.current.nodes().iter().any(|n| &n.id == me)
                {
                    state.mark_handoff_done(me);
                }
                if state.claimant() == Some(me) {
                    state.plan();
                }
            }
            let first = &nodes[0];
            if nodes.iter().all(|s| s == first) && first.settled() {
                return round;
            }
        }
        panic!("did not converge");
    }

    #[test]
    fn merge_is_commutative_associative_idempotent() {
        let mut a = ClusterState::found("c", member("a", ""), 16).unwrap();
        let mut b = a.clone();
        let mut c = a.clone();
        a.add_joining(member("x", "")).unwrap();
        b.add_joining(member("y", "")).unwrap();
        b.beat(&NodeId("a".into()));
        c.request_leave(&NodeId("a".into())).unwrap_err();
        c.bucket_props.insert(
            "bk".into(),
            BucketPropsEntry {
                timestamp_ms: 5,
                node: NodeId("a".into()),
                props_json: Some("{}".into()),
            },
        );
        a.plan();
        let merge = |x: &ClusterState, y: &ClusterState| {
            let mut m = x.clone();
            m.merge(y);
            m
        };
        assert_eq!(merge(&a, &b), merge(&b, &a));
        assert_eq!(merge(&merge(&a, &b), &c), merge(&a, &merge(&b, &c)));
        assert_eq!(merge(&a, &a), a);
    }

    #[test]
    fn concurrent_joins_and_leaves_at_different_nodes_converge_to_one_ring() {
        for seed in 1..40u64 {
            let mut rng = XorShift(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let founder = ClusterState::found("c", member("n0", "z0"), 64).unwrap();
            let ids: Vec<NodeId> = (0..5).map(|i| NodeId(format!("n{i}"))).collect();
            // n1..n4 each ask a different (random) existing node to admit them, concurrently.
            let mut nodes: Vec<ClusterState> = vec![founder.clone(); 5];
            for i in 1..5 {
                let mut m = member(&format!("n{i}"), &format!("z{}", i % 3));
                m.version = 0;
                let via = rng.below(i);
                nodes[via].add_joining(m).unwrap();
                nodes[i] = nodes[via].clone();
            }
            gossip_until_settled(&mut nodes, &ids, &mut rng);
            let ring = &nodes[0].ring.current;
            assert_eq!(ring.nodes().len(), 5, "seed {seed}");
            let counts: Vec<u32> = ring.ownership_counts().iter().map(|(_, c)| *c).collect();
            assert!(counts.iter().max().unwrap() - counts.iter().min().unwrap() <= 1);
            assert!(
                nodes[0]
                    .members
                    .values()
                    .all(|m| m.status == MemberStatus::Valid)
            );
            // Two nodes leave concurrently, asked at different nodes.
            let l1 = rng.below(5);
            let l2 = (l1 + 1 + rng.below(4)) % 5;
            nodes[l1].request_leave(&ids[l1]).unwrap();
            nodes[l2].request_leave(&ids[l2]).unwrap();
            gossip_until_settled(&mut nodes, &ids, &mut rng);
            let ring = &nodes[0].ring.current;
            assert_eq!(ring.nodes().len(), 3, "seed {seed}");
            assert!(
                !ring
                    .nodes()
                    .iter()
                    .any(|n| n.id == ids[l1] || n.id == ids[l2])
            );
            assert_eq!(nodes[0].members[&ids[l1]].status, MemberStatus::Exiting);
            assert!(
                nodes.iter().all(|s| s == &nodes[0]),
                "seed {seed}: all states equal"
            );
        }
    }

    #[test]
    fn transition_waits_for_every_handoff() {
        let mut state = ClusterState::found("c", member("a", ""), 16).unwrap();
        state.add_joining(member("b", "")).unwrap();
        assert!(state.plan());
        assert!(state.ring.next.is_some());
        assert!(!state.plan(), "no switch before the handoff is marked done");
        state.mark_handoff_done(&NodeId("a".into()));
        assert!(state.plan());
        assert!(state.ring.next.is_none());
        assert_eq!(state.ring.current.nodes().len(), 2);
        assert_eq!(
            state.members[&NodeId("b".into())].status,
            MemberStatus::Valid
        );
        assert!(state.settled());
    }

    /// Heartbeats alone do not make a state worth writing; anything else does, and what is
    /// written reads back the same.
    #[test]
    fn only_a_change_beyond_heartbeats_is_persisted() {
        let state = crate::test_support::settled_cluster(&["a", "b"], 8);
        let mut beaten = state.clone();
        beaten.beat(&NodeId("a".into()));
        assert!(beaten.persists_as(&state));
        let mut left = state.clone();
        left.request_leave(&NodeId("b".into())).unwrap();
        assert!(!left.persists_as(&state));
        let mut moved = state.clone();
        if let Some(m) = moved.members.get_mut(&NodeId("b".into())) {
            m.peer_addr = "127.0.0.1:1".into();
        }
        assert!(!moved.persists_as(&state));
        let storage = crate::test_support::MapStorage::default();
        assert_eq!(load_persisted(&storage), Ok(None));
        store_persisted(&storage, &left).unwrap();
        let read = load_persisted(&storage).unwrap().unwrap();
        assert!(read.persists_as(&left));
    }

    #[test]
    fn force_remove_takes_a_node_out_at_once_and_wins_in_gossip() {
        let mut state = crate::test_support::settled_cluster(&["a", "b", "c"], 16);
        let before = state.ring.version;
        let gone = crate::test_support::id("c");
        let mut stale = state.clone();
        state.force_remove(&gone).unwrap();
        assert!(state.ring.next.is_none());
        assert_eq!(state.ring.version, before + 1);
        assert!(!state.ring.current.nodes().iter().any(|n| n.id == gone));
        assert_eq!(state.members[&gone].status, MemberStatus::Exiting);
        assert!(state.settled());
        // Another member's older state takes the removal when they gossip.
        stale.merge(&state);
        assert_eq!(stale.ring.current.owners(), state.ring.current.owners());
        assert_eq!(stale.members[&gone].status, MemberStatus::Exiting);
        // Twice is once; an unknown node, the last node, and a transition are refused.
        state.force_remove(&gone).unwrap();
        assert_eq!(state.ring.version, before + 1);
        assert!(matches!(
            state.force_remove(&crate::test_support::id("zz")),
            Err(MembershipError::NotMember(_))
        ));
        state.force_remove(&crate::test_support::id("b")).unwrap();
        assert!(matches!(
            state.force_remove(&crate::test_support::id("a")),
            Err(MembershipError::LastNode)
        ));
        let mut moving = crate::test_support::settled_cluster(&["a", "b"], 16);
        moving.request_leave(&crate::test_support::id("b")).unwrap();
        moving.plan();
        assert!(moving.ring.next.is_some());
        assert!(matches!(
            moving.force_remove(&crate::test_support::id("b")),
            Err(MembershipError::TransitionInProgress)
        ));
    }
}

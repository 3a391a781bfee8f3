//! The consistent-hashing ring: key positions, partition ownership, claim and preference lists.
//!
//! This module owns the map from a key to the nodes that store it. `MD5(bucket, key)` gives a
//! 128-bit ring position ([`key_hash`]); the ring is cut into `Q` equal partitions (the paper's
//! strategy 3, `Q` a power of two fixed at creation), and a key lives in the partition named by
//! the top `log2(Q)` bits of its position. Each partition has exactly one owner. A key's
//! preference list is found by walking the ring clockwise from its partition, collecting
//! distinct owners, spreading over zones first.
//!
//! Claim (who owns what after a join or leave) is a pure function of the previous ring and the
//! change, so every node that applies the same change computes the same ring.
//!
//! Invariants every [`Ring`] keeps (checked on decode, and in debug builds after every change):
//! - `partitions` is a power of two in `1..=MAX_RING_PARTITIONS`, and `owners.len() == partitions`;
//! - `nodes` is non-empty, sorted by id, without duplicate ids, and holds at most `partitions`
//!   nodes;
//! - every owner is one of `nodes`, and every node owns at least one partition;
//! - rings built by [`Ring::new`], [`Ring::with_node_added`] and [`Ring::with_node_removed`] are
//!   balanced: the partition counts of any two nodes differ by at most one;
//! - a join moves only the partitions the new node takes; a leave moves only the leaving node's
//!   partitions.

use std::cmp::Reverse;
use std::fmt;

use md5::{Digest, Md5};
use serde::{Deserialize, Serialize};

use crate::limits::MAX_RING_PARTITIONS;

/// The index of one partition, `0..Ring::partition_count()`, in clockwise order.
pub type PartitionId = u32;

/// Replicas the claim aims to spread: a node tries not to own any of the
/// `CLAIM_TARGET_REPLICAS - 1` partitions on either side of each partition it owns.
const CLAIM_TARGET_REPLICAS: u32 = 3;

/// A ring position: MD5 over the bucket and key.
///
/// The digest covers the bucket length (`u32`, big-endian) then the bucket then the key, so
/// `("ab", "c")` and `("a", "bc")` land in different places. Buckets are far shorter than
/// `u32::MAX` bytes (see `limits::MAX_BUCKET_BYTES`); a longer one would hash with its length
/// saturated.
pub fn key_hash(bucket: &[u8], key: &[u8]) -> [u8; 16] {
    let bucket_length = u32::try_from(bucket.len()).unwrap_or(u32::MAX);
    let mut hasher = Md5::new();
    hasher.update(bucket_length.to_be_bytes());
    hasher.update(bucket);
    hasher.update(key);
    hasher.finalize().into()
}

/// The name of a physical node, unique in the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NodeId(pub String);

impl fmt::Display for NodeId {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&self.0)
    }
}

impl From<&str> for NodeId {
    fn from(name: &str) -> Self {
        NodeId(name.to_owned())
    }
}

/// A member of the ring: its id and its zone (data center); the zone is `""` when unset.
///
/// Unset zones are one zone like any other: a cluster without zones is a single zone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingNode {
    pub id: NodeId,
    pub zone: String,
}

/// Why a ring could not be built, changed or decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RingError {
    #[error("the partition count {partitions} is not a power of two")]
    PartitionCountNotPowerOfTwo { partitions: u32 },
    #[error("the partition count {partitions} is above the limit of {max}")]
    TooManyPartitions { partitions: u32, max: u32 },
    #[error("a ring needs at least one node")]
    NoNodes,
    #[error("a ring of {partitions} partitions holds at most {partitions} nodes")]
    TooManyNodes { partitions: u32 },
    #[error("node {0} is not in the ring")]
    UnknownNode(NodeId),
    #[error("node {0} is already in the ring")]
    DuplicateNode(NodeId),
    #[error("malformed ring: {0}")]
    Malformed(&'static str),
}

/// Partition ownership of the whole cluster. See the module documentation for its invariants.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(try_from = "RingEncoding")]
pub struct Ring {
    /// `Q`, a power of two.
    partitions: u32,
    /// The owner of each partition, indexed by `PartitionId`.
    owners: Vec<NodeId>,
    /// Every member, sorted by id.
    nodes: Vec<RingNode>,
    /// Derived from `owners` and `nodes` when the ring is made: the preference-list walk
    /// compares small integers instead of node names and zones (it runs several times per
    /// request).
    #[serde(skip)]
    walk: WalkIndex,
}

/// Two rings are equal when their partitions, members and owners are. Owners are compared
/// as indices into the (equal) member lists, not as names: a node compares its cluster state
/// with the one it last wrote at nearly every input (`Node`'s `Output::Persist`).
impl PartialEq for Ring {
    fn eq(&self, other: &Ring) -> bool {
        let indexed = |ring: &Ring| {
            ring.walk.owner.len() == ring.owners.len()
                && ring
                    .walk
                    .owner
                    .iter()
                    .all(|&i| (i as usize) < ring.nodes.len())
        };
        self.partitions == other.partitions
            && self.nodes == other.nodes
            && if indexed(self) && indexed(other) {
                self.walk.owner == other.walk.owner
            } else {
                self.owners == other.owners
            }
    }
}

impl Eq for Ring {}

/// Owners and zones as indices, for [`Ring::preference_list`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct WalkIndex {
    /// Index into `nodes` of each partition's owner (`nodes.len()` if it is not a member,
    /// which validation rules out).
    owner: Vec<u32>,
    /// A number per node naming its zone (equal zones, equal numbers).
    zone: Vec<u32>,
    /// How many distinct zones there are.
    zones: usize,
}

impl WalkIndex {
    fn new(owners: &[NodeId], nodes: &[RingNode]) -> WalkIndex {
        let owner = owners
            .iter()
            .map(|o| {
                let found = nodes.binary_search_by(|member| member.id.cmp(o));
                u32::try_from(found.unwrap_or(nodes.len())).unwrap_or(u32::MAX)
            })
            .collect();
        let mut names: Vec<&str> = Vec::new();
        let zone = nodes
            .iter()
            .map(|node| {
                let at = names
                    .iter()
                    .position(|z| *z == node.zone)
                    .unwrap_or_else(|| {
                        names.push(&node.zone);
                        names.len() - 1
                    });
                u32::try_from(at).unwrap_or(u32::MAX)
            })
            .collect();
        WalkIndex {
            owner,
            zone,
            zones: names.len(),
        }
    }
}

/// The wire shape of a [`Ring`], validated before it becomes one.
#[derive(Deserialize)]
struct RingEncoding {
    partitions: u32,
    owners: Vec<NodeId>,
    nodes: Vec<RingNode>,
}

impl TryFrom<RingEncoding> for Ring {
    type Error = RingError;

    fn try_from(encoding: RingEncoding) -> Result<Ring, RingError> {
        let mut ring = Ring {
            partitions: encoding.partitions,
            owners: encoding.owners,
            nodes: encoding.nodes,
            walk: WalkIndex::default(),
        };
        ring.validate()?;
        ring.walk = WalkIndex::new(&ring.owners, &ring.nodes);
        Ok(ring)
    }
}

impl Ring {
    /// A ring of `partitions` (power of two, `1..=MAX_RING_PARTITIONS`) all owned by `founder`.
    pub fn new(partitions: u32, founder: RingNode) -> Result<Ring, RingError> {
        check_partition_count(partitions)?;
        let owners = vec![founder.id.clone(); partitions as usize];
        let nodes = vec![founder];
        Ok(Ring {
            partitions,
            walk: WalkIndex::new(&owners, &nodes),
            owners,
            nodes,
        })
    }

    /// `Q`, the number of partitions.
    pub fn partition_count(&self) -> u32 {
        self.partitions
    }

    /// The partition holding a ring position: the top `log2(Q)` bits of the 128-bit hash.
    pub fn partition_of_hash(&self, hash: &[u8; 16]) -> PartitionId {
        partition_of_hash_in(self.partitions, hash)
    }

    /// The partition holding a key.
    pub fn partition_of(&self, bucket: &[u8], key: &[u8]) -> PartitionId {
        self.partition_of_hash(&key_hash(bucket, key))
    }

    /// The owner of `partition`. Panics if `partition >= partition_count()`.
    pub fn owner(&self, partition: PartitionId) -> &NodeId {
        &self.owners[partition as usize]
    }

    /// The owner of every partition, indexed by `PartitionId`.
    pub fn owners(&self) -> &[NodeId] {
        &self.owners
    }

    /// Every member, sorted by id.
    pub fn nodes(&self) -> &[RingNode] {
        &self.nodes
    }

    /// The partitions `node` owns, in ascending order (empty for an unknown node).
    pub fn partitions_of(&self, node: &NodeId) -> Vec<PartitionId> {
        (0..self.partitions)
            .filter(|&partition| self.owner(partition) == node)
            .collect()
    }

    /// Number of partitions each node owns, in node-id order, for stats.
    pub fn ownership_counts(&self) -> Vec<(NodeId, u32)> {
        let plan = ClaimPlan::from_ring(self);
        self.nodes
            .iter()
            .zip(plan.loads)
            .map(|(node, load)| (node.id.clone(), load))
            .collect()
    }

    /// The ring after `node` joins: balanced, zone-aware claim with minimal movement.
    ///
    /// Only partitions that go to the new node move. The new node takes one partition at a
    /// time from a node with the most partitions, until no node has two more than it. Among
    /// the candidates it prefers, in order: partitions far from its own partitions (within
    /// `CLAIM_TARGET_REPLICAS - 1` on either side, nearer weighs more); partitions far from
    /// other nodes of its zone; moves that leave zone totals most even; partitions that break
    /// up the donor's own runs; then the lowest donor id and partition index.
    pub fn with_node_added(&self, node: RingNode) -> Result<Ring, RingError> {
        let Err(insert_at) = self
            .nodes
            .binary_search_by(|member| member.id.cmp(&node.id))
        else {
            return Err(RingError::DuplicateNode(node.id));
        };
        if self.nodes.len() >= self.partitions as usize {
            return Err(RingError::TooManyNodes {
                partitions: self.partitions,
            });
        }
        let mut nodes = self.nodes.clone();
        nodes.insert(insert_at, node);
        let mut plan = ClaimPlan::new(self, &nodes);
        plan.claim_for(insert_at);
        let owners = plan.into_owners(&nodes)?;
        let ring = Ring {
            partitions: self.partitions,
            walk: WalkIndex::new(&owners, &nodes),
            owners,
            nodes,
        };
        debug_assert_eq!(ring.validate(), Ok(()));
        Ok(ring)
    }

    /// The ring after `node` leaves: only the leaving node's partitions move.
    ///
    /// Each of its partitions goes, one at a time, to a node with the fewest partitions. Among
    /// the candidate (recipient, partition) pairs the claim prefers, in order: partitions far
    /// from the recipient's own (within `CLAIM_TARGET_REPLICAS - 1` on either side, nearer
    /// weighs more); far from other nodes of the recipient's zone; moves that leave zone
    /// totals most even; then the lowest recipient id and partition index.
    pub fn with_node_removed(&self, node: &NodeId) -> Result<Ring, RingError> {
        let Ok(leaving) = self.nodes.binary_search_by(|member| member.id.cmp(node)) else {
            return Err(RingError::UnknownNode(node.clone()));
        };
        if self.nodes.len() == 1 {
            return Err(RingError::NoNodes);
        }
        let mut plan = ClaimPlan::from_ring(self);
        plan.hand_over_from(leaving);
        let owners = plan.into_owners(&self.nodes)?;
        let mut nodes = self.nodes.clone();
        nodes.remove(leaving);
        let ring = Ring {
            partitions: self.partitions,
            walk: WalkIndex::new(&owners, &nodes),
            owners,
            nodes,
        };
        debug_assert_eq!(ring.validate(), Ok(()));
        Ok(ring)
    }

    /// The preference list of `partition`: at most `min(n, number of nodes)` distinct nodes.
    ///
    /// Walk the ring clockwise from `partition`, collecting owners and skipping nodes already
    /// chosen: the first walk takes only nodes of zones not yet used, a second walk then takes
    /// any node not yet chosen. Each entry is the partition where the node was found and the
    /// node. The first entry is always the owner of `partition`, and the list for `n` is a
    /// prefix of the list for any larger `n`. Panics if `partition >= partition_count()`.
    pub fn preference_list(&self, partition: PartitionId, n: usize) -> Vec<(PartitionId, NodeId)> {
        assert!(
            partition < self.partitions,
            "partition {partition} is outside a ring of {}",
            self.partitions
        );
        let wanted = n.min(self.nodes.len());
        let mut chosen: Vec<(PartitionId, u32)> = Vec::with_capacity(wanted);
        let mut zones_used: Vec<u32> = Vec::new();
        let owner_at = |position: PartitionId| self.walk.owner[position as usize];
        let walk = (0..self.partitions).map(|step| (partition + step) % self.partitions);
        for position in walk.clone() {
            if chosen.len() == wanted || zones_used.len() == self.walk.zones {
                break;
            }
            let owner = owner_at(position);
            let Some(&zone) = self.walk.zone.get(owner as usize) else {
                continue;
            };
            if !zones_used.contains(&zone) && !chosen.iter().any(|(_, node)| *node == owner) {
                zones_used.push(zone);
                chosen.push((position, owner));
            }
        }
        for position in walk {
            if chosen.len() == wanted {
                break;
            }
            let owner = owner_at(position);
            if (owner as usize) < self.nodes.len() && !chosen.iter().any(|(_, node)| *node == owner)
            {
                chosen.push((position, owner));
            }
        }
        chosen
            .into_iter()
            .map(|(position, owner)| (position, self.nodes[owner as usize].id.clone()))
            .collect()
    }

    /// The zone of a member; `""` for a node that is not one (never, by the invariants).
    #[cfg(test)]
    fn zone_of(&self, node: &NodeId) -> &str {
        let found = self.nodes.binary_search_by(|member| member.id.cmp(node));
        debug_assert!(found.is_ok(), "owner {node} is not a member");
        found.map_or("", |index| self.nodes[index].zone.as_str())
    }

    /// Every node, in preference order, for sloppy-quorum fallbacks.
    ///
    /// This is `preference_list(partition, number of nodes)`: its first `n` entries are
    /// `preference_list(partition, n)` for every `n`, and the nodes after them come first from
    /// zones not yet covered, then in ring-walk order.
    pub fn extended_preference_list(&self, partition: PartitionId) -> Vec<(PartitionId, NodeId)> {
        self.preference_list(partition, self.nodes.len())
    }

    /// Checks every invariant in the module documentation.
    fn validate(&self) -> Result<(), RingError> {
        check_partition_count(self.partitions)?;
        if self.owners.len() != self.partitions as usize {
            return Err(RingError::Malformed(
                "the owner count differs from the partition count",
            ));
        }
        if self.nodes.is_empty() {
            return Err(RingError::NoNodes);
        }
        if self.nodes.len() > self.partitions as usize {
            return Err(RingError::TooManyNodes {
                partitions: self.partitions,
            });
        }
        if let Some(pair) = self.nodes.windows(2).find(|pair| pair[0].id >= pair[1].id) {
            return Err(if pair[0].id == pair[1].id {
                RingError::DuplicateNode(pair[1].id.clone())
            } else {
                RingError::Malformed("the nodes are not sorted by id")
            });
        }
        let mut loads = vec![0_u32; self.nodes.len()];
        for owner in &self.owners {
            match self.nodes.binary_search_by(|member| member.id.cmp(owner)) {
                Ok(index) => loads[index] += 1,
                Err(_) => return Err(RingError::UnknownNode(owner.clone())),
            }
        }
        if loads.contains(&0) {
            return Err(RingError::Malformed("a node owns no partition"));
        }
        Ok(())
    }
}

fn check_partition_count(partitions: u32) -> Result<(), RingError> {
    if !partitions.is_power_of_two() {
        return Err(RingError::PartitionCountNotPowerOfTwo { partitions });
    }
    if partitions > MAX_RING_PARTITIONS {
        return Err(RingError::TooManyPartitions {
            partitions,
            max: MAX_RING_PARTITIONS,
        });
    }
    Ok(())
}

/// Neighbour figures of one partition as a candidate for a claiming node (see
/// [`ClaimPlan::conflicts`]), and how much its current owner owns around it.
#[derive(Debug, Clone, Copy)]
struct ClaimScore {
    same_node: u32,
    same_zone: u32,
    owner_run: u32,
}

/// Working state of one claim: owners as indices into a node list sorted by id.
struct ClaimPlan {
    partitions: u32,
    /// Owner index of each partition; `None` while a leaving node's partition awaits a home.
    owners: Vec<Option<usize>>,
    /// Zone index of each node.
    zone_of_node: Vec<usize>,
    /// Partitions owned by each node.
    loads: Vec<u32>,
    /// Partitions owned by each zone; a leaving node's partitions count for its zone until
    /// they are handed over.
    zone_totals: Vec<i64>,
}

impl ClaimPlan {
    /// The plan of `ring` as it stands, over its own node list.
    fn from_ring(ring: &Ring) -> ClaimPlan {
        ClaimPlan::new(ring, &ring.nodes)
    }

    /// The plan of `ring`'s ownership over `nodes`, a superset of its members sorted by id.
    fn new(ring: &Ring, nodes: &[RingNode]) -> ClaimPlan {
        let mut zone_names: Vec<&str> = nodes.iter().map(|node| node.zone.as_str()).collect();
        zone_names.sort_unstable();
        zone_names.dedup();
        let zone_of_node: Vec<usize> = nodes
            .iter()
            .map(|node| {
                zone_names
                    .binary_search(&node.zone.as_str())
                    .unwrap_or_default()
            })
            .collect();
        let owners: Vec<Option<usize>> = ring
            .owners
            .iter()
            .map(|owner| nodes.binary_search_by(|node| node.id.cmp(owner)).ok())
            .collect();
        let mut loads = vec![0_u32; nodes.len()];
        let mut zone_totals = vec![0_i64; zone_names.len()];
        for owner in owners.iter().flatten() {
            loads[*owner] += 1;
            zone_totals[zone_of_node[*owner]] += 1;
        }
        ClaimPlan {
            partitions: ring.partitions,
            owners,
            zone_of_node,
            loads,
            zone_totals,
        }
    }

    /// The owners of the partitions within `CLAIM_TARGET_REPLICAS - 1` on either side of
    /// `partition` (not `partition` itself; vacant neighbours yield nothing), each with its
    /// weight: the number of windows of `CLAIM_TARGET_REPLICAS` consecutive partitions that
    /// hold both it and `partition` (2 at distance 1, 1 at distance 2, for N = 3).
    fn neighbours(&self, partition: PartitionId) -> impl Iterator<Item = (usize, u32)> + '_ {
        (1..CLAIM_TARGET_REPLICAS)
            .flat_map(move |distance| {
                let weight = CLAIM_TARGET_REPLICAS - distance;
                let distance = distance % self.partitions;
                [
                    ((partition + distance) % self.partitions, weight),
                    (
                        (partition + self.partitions - distance) % self.partitions,
                        weight,
                    ),
                ]
            })
            .filter(move |&(neighbour, _)| neighbour != partition)
            .filter_map(|(neighbour, weight)| Some((self.owners[neighbour as usize]?, weight)))
    }

    /// How close `partition` sits to other partitions of `node`, and to partitions of other
    /// nodes of its zone: the summed weights of those neighbours. The zone figure is always
    /// zero when every node is in one zone: there is no other zone to spread over.
    fn conflicts(&self, node: usize, partition: PartitionId) -> (u32, u32) {
        let zoned = self.zone_totals.len() > 1;
        let mut same_node = 0;
        let mut same_zone = 0;
        for (neighbour, weight) in self.neighbours(partition) {
            if neighbour == node {
                same_node += weight;
            } else if zoned && self.zone_of_node[neighbour] == self.zone_of_node[node] {
                same_zone += weight;
            }
        }
        (same_node, same_zone)
    }

    /// Change in the sum of squared zone totals if one partition moves from zone `from_zone`
    /// to zone `to_zone`.
    fn zone_imbalance_change(&self, from_zone: usize, to_zone: usize) -> i64 {
        if from_zone == to_zone {
            0
        } else {
            2 * (self.zone_totals[to_zone] - self.zone_totals[from_zone] + 1)
        }
    }

    fn assign(&mut self, partition: PartitionId, from: usize, to: usize) {
        self.owners[partition as usize] = Some(to);
        self.loads[from] -= 1;
        self.loads[to] += 1;
        self.zone_totals[self.zone_of_node[from]] -= 1;
        self.zone_totals[self.zone_of_node[to]] += 1;
    }

    /// The new node `claimant` (owning nothing yet) takes partitions from the most-loaded
    /// nodes until no node owns two more than it.
    ///
    /// Each partition's neighbour figures are computed once and refreshed only around the
    /// partition that moved, so a step costs one pass over plain arrays.
    fn claim_for(&mut self, claimant: usize) {
        debug_assert_eq!(self.loads[claimant], 0);
        let mut scores: Vec<ClaimScore> = (0..self.partitions)
            .map(|partition| self.claim_score(claimant, partition))
            .collect();
        let claimant_zone = self.zone_of_node[claimant];
        loop {
            let Some(&most) = self.loads.iter().max() else {
                return;
            };
            if most < self.loads[claimant] + 2 {
                return;
            }
            let zone_changes: Vec<i64> = (0..self.zone_totals.len())
                .map(|zone| self.zone_imbalance_change(zone, claimant_zone))
                .collect();
            let mut best = None;
            for (partition, (owner, score)) in
                (0..self.partitions).zip(self.owners.iter().zip(&scores))
            {
                let Some(donor) = *owner else {
                    continue;
                };
                if self.loads[donor] != most {
                    continue;
                }
                let key = (
                    score.same_node,
                    score.same_zone,
                    zone_changes[self.zone_of_node[donor]],
                    Reverse(score.owner_run),
                    donor,
                    partition,
                );
                if best.is_none_or(|(best_key, _, _)| key < best_key) {
                    best = Some((key, donor, partition));
                }
            }
            let Some((_, donor, partition)) = best else {
                return;
            };
            self.assign(partition, donor, claimant);
            for distance in 0..CLAIM_TARGET_REPLICAS {
                for nearby in [
                    (partition + distance) % self.partitions,
                    (partition + self.partitions - distance % self.partitions) % self.partitions,
                ] {
                    scores[nearby as usize] = self.claim_score(claimant, nearby);
                }
            }
        }
    }

    /// The neighbour figures of `partition` as a candidate for `claimant`.
    fn claim_score(&self, claimant: usize, partition: PartitionId) -> ClaimScore {
        let (same_node, same_zone) = self.conflicts(claimant, partition);
        let owner = self.owners[partition as usize];
        let owner_run = self
            .neighbours(partition)
            .filter(|&(neighbour, _)| Some(neighbour) == owner)
            .map(|(_, weight)| weight)
            .sum();
        ClaimScore {
            same_node,
            same_zone,
            owner_run,
        }
    }

    /// Hands every partition of `leaving` to the least-loaded of the other nodes.
    fn hand_over_from(&mut self, leaving: usize) {
        let mut vacant: Vec<PartitionId> = (0..self.partitions)
            .filter(|&partition| self.owners[partition as usize] == Some(leaving))
            .collect();
        for &partition in &vacant {
            self.owners[partition as usize] = None;
        }
        while !vacant.is_empty() {
            let Some(fewest) = (0..self.loads.len())
                .filter(|&node| node != leaving)
                .map(|node| self.loads[node])
                .min()
            else {
                return;
            };
            let plan: &ClaimPlan = self;
            let vacant_now = &vacant;
            let best = (0..plan.loads.len())
                .filter(|&node| node != leaving && plan.loads[node] == fewest)
                .flat_map(|recipient| {
                    vacant_now
                        .iter()
                        .enumerate()
                        .map(move |(slot, &partition)| {
                            let (same_node, same_zone) = plan.conflicts(recipient, partition);
                            let key = (
                                same_node,
                                same_zone,
                                plan.zone_imbalance_change(
                                    plan.zone_of_node[leaving],
                                    plan.zone_of_node[recipient],
                                ),
                                recipient,
                                partition,
                            );
                            (key, recipient, slot)
                        })
                })
                .min_by_key(|(key, _, _)| *key);
            let Some((_, recipient, slot)) = best else {
                return;
            };
            let partition = vacant.swap_remove(slot);
            self.assign(partition, leaving, recipient);
        }
    }

    /// The owner ids, through `plan_nodes` (the node list the plan was made over).
    fn into_owners(self, plan_nodes: &[RingNode]) -> Result<Vec<NodeId>, RingError> {
        self.owners
            .iter()
            .map(|owner| owner.map(|index| plan_nodes[index].id.clone()))
            .collect::<Option<Vec<NodeId>>>()
            .ok_or(RingError::Malformed(
                "a partition was left without an owner",
            ))
    }
}

/// The partition of a ring of `partitions` (a power of two) holding a ring position: the top
/// `log2(partitions)` bits of the 128-bit hash.
pub fn partition_of_hash_in(partitions: u32, hash: &[u8; 16]) -> PartitionId {
    let position = u128::from_be_bytes(*hash);
    let bits = partitions.trailing_zeros();
    // With one partition there are no bits to keep, and a shift by 128 would overflow.
    position.checked_shr(128 - bits).unwrap_or(0) as PartitionId
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// One membership change in a generated history.
    #[derive(Debug, Clone)]
    enum Change {
        /// Add node `node-{number}` in zone `zone` (an index into the test's zone names).
        Add { number: u16, zone: usize },
        /// Remove the member at `selector % member count`.
        Remove { selector: usize },
    }

    fn change_strategy() -> impl Strategy<Value = Change> {
        prop_oneof![
            3 => (0_u16..40, 0_usize..4).prop_map(|(number, zone)| Change::Add { number, zone }),
            1 => any::<usize>().prop_map(|selector| Change::Remove { selector }),
        ]
    }

    fn partition_count_strategy() -> impl Strategy<Value = u32> {
        prop::sample::select(vec![8_u32, 16, 64, 256])
    }

    fn node(name: &str, zone: &str) -> RingNode {
        RingNode {
            id: NodeId::from(name),
            zone: zone.to_owned(),
        }
    }

    /// Applies `change`, checking the refusals the API promises. Returns the new ring, or the
    /// old one when the change is refused.
    fn apply(ring: &Ring, change: &Change, zones: &[&str]) -> Ring {
        match change {
            Change::Add { number, zone } => {
                let added = node(&format!("node-{number:02}"), zones[zone % zones.len()]);
                let result = ring.with_node_added(added.clone());
                if ring.nodes().iter().any(|member| member.id == added.id) {
                    assert_eq!(result, Err(RingError::DuplicateNode(added.id)));
                    ring.clone()
                } else if ring.nodes().len() == ring.partition_count() as usize {
                    assert_eq!(
                        result,
                        Err(RingError::TooManyNodes {
                            partitions: ring.partition_count()
                        })
                    );
                    ring.clone()
                } else {
                    result.unwrap()
                }
            }
            Change::Remove { selector } => {
                let leaving = ring.nodes()[selector % ring.nodes().len()].id.clone();
                let result = ring.with_node_removed(&leaving);
                if ring.nodes().len() == 1 {
                    assert_eq!(result, Err(RingError::NoNodes));
                    ring.clone()
                } else {
                    result.unwrap()
                }
            }
        }
    }

    /// The ring after a founder (zone `zones[0]`) and then `changes`.
    fn build(partitions: u32, changes: &[Change], zones: &[&str]) -> Ring {
        let mut ring = Ring::new(partitions, node("node-founder", zones[0])).unwrap();
        for change in changes {
            ring = apply(&ring, change, zones);
        }
        ring
    }

    fn zone_sets() -> impl Strategy<Value = Vec<&'static str>> {
        prop::sample::select(vec![
            vec![""],
            vec!["zone-a", "zone-b"],
            vec!["zone-a", "zone-b", "zone-c"],
            vec!["zone-a", "zone-b", "zone-c", "zone-d"],
        ])
    }

    fn assert_balanced(ring: &Ring) {
        let counts = ring.ownership_counts();
        let most = counts.iter().map(|(_, count)| *count).max().unwrap();
        let fewest = counts.iter().map(|(_, count)| *count).min().unwrap();
        assert!(
            most - fewest <= 1,
            "unbalanced ring: {counts:?} (owners {:?})",
            ring.owners()
        );
        assert_eq!(ring.validate(), Ok(()));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// Law 1: after any history of joins and leaves, node partition counts differ by at
        /// most one.
        #[test]
        fn ring_balance_after_any_history(
            partitions in partition_count_strategy(),
            zones in zone_sets(),
            changes in prop::collection::vec(change_strategy(), 0..24),
        ) {
            let mut ring = Ring::new(partitions, node("node-founder", zones[0])).unwrap();
            assert_balanced(&ring);
            for change in &changes {
                ring = apply(&ring, change, &zones);
                assert_balanced(&ring);
            }
        }

        /// Law 2: a join moves only the partitions the new node takes; a leave moves exactly
        /// the leaving node's partitions.
        #[test]
        fn ring_minimal_movement(
            partitions in partition_count_strategy(),
            zones in zone_sets(),
            changes in prop::collection::vec(change_strategy(), 0..16),
            next in change_strategy(),
        ) {
            let before = build(partitions, &changes, &zones);
            let after = apply(&before, &next, &zones);
            let moved: Vec<PartitionId> = (0..partitions)
                .filter(|&partition| before.owner(partition) != after.owner(partition))
                .collect();
            match after.nodes().len().cmp(&before.nodes().len()) {
                std::cmp::Ordering::Greater => {
                let added = after
                    .nodes()
                    .iter()
                    .find(|member| !before.nodes().contains(member))
                    .unwrap();
                prop_assert_eq!(&moved, &after.partitions_of(&added.id));
                }
                std::cmp::Ordering::Less => {
                let removed = before
                    .nodes()
                    .iter()
                    .find(|member| !after.nodes().contains(member))
                    .unwrap();
                prop_assert_eq!(&moved, &before.partitions_of(&removed.id));
                }
                std::cmp::Ordering::Equal => prop_assert_eq!(&before, &after),
            }
        }

        /// Law 3: a preference list holds min(n, nodes) distinct nodes covering min(n, zones)
        /// zones, each found where it owns the partition; it is a prefix of the extended list,
        /// which holds every node.
        #[test]
        fn ring_preference_list_distinct_nodes_and_zones(
            partitions in partition_count_strategy(),
            zones in zone_sets(),
            changes in prop::collection::vec(change_strategy(), 0..24),
            start in any::<u32>(),
            n in 0_usize..8,
        ) {
            let ring = build(partitions, &changes, &zones);
            let partition = start % partitions;
            let list = ring.preference_list(partition, n);
            let node_count = ring.nodes().len();
            prop_assert_eq!(list.len(), n.min(node_count));
            let mut ids: Vec<&NodeId> = list.iter().map(|(_, id)| id).collect();
            ids.sort();
            ids.dedup();
            prop_assert_eq!(ids.len(), list.len());
            for (found_at, id) in &list {
                prop_assert_eq!(ring.owner(*found_at), id);
            }
            if let Some((first_at, first)) = list.first() {
                prop_assert_eq!(*first_at, partition);
                prop_assert_eq!(first, ring.owner(partition));
            }
            let mut all_zones: Vec<&str> = ring.nodes().iter().map(|member| member.zone.as_str()).collect();
            all_zones.sort_unstable();
            all_zones.dedup();
            let mut list_zones: Vec<&str> = list.iter().map(|(_, id)| ring.zone_of(id)).collect();
            list_zones.sort_unstable();
            list_zones.dedup();
            prop_assert_eq!(list_zones.len(), n.min(all_zones.len()));
            let extended = ring.extended_preference_list(partition);
            prop_assert_eq!(extended.len(), node_count);
            prop_assert_eq!(&extended[..list.len()], &list[..]);
        }

        /// Law 4: partition_of_hash keeps the top log2(Q) bits: any hash whose top bits spell
        /// `partition` lands there, whatever its other bits.
        #[test]
        fn ring_partition_of_hash_uses_top_bits(
            partitions in prop::sample::select(vec![1_u32, 2, 8, 16, 64, 256, 4096]),
            partition_seed in any::<u32>(),
            low_bits in any::<u128>(),
            bucket in prop::collection::vec(any::<u8>(), 0..16),
            key in prop::collection::vec(any::<u8>(), 0..16),
        ) {
            let ring = Ring::new(partitions, node("node-founder", "")).unwrap();
            let partition = partition_seed % partitions;
            let bits = partitions.trailing_zeros();
            let (top, rest) = if bits == 0 {
                (0, low_bits)
            } else {
                (u128::from(partition) << (128 - bits), low_bits >> bits)
            };
            let position = top | rest;
            prop_assert_eq!(ring.partition_of_hash(&position.to_be_bytes()), partition);
            let by_key = ring.partition_of(&bucket, &key);
            prop_assert!(by_key < partitions);
            prop_assert_eq!(by_key, ring.partition_of_hash(&key_hash(&bucket, &key)));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Law 5: the same history gives equal rings (claim is a pure function).
        #[test]
        fn ring_claim_is_deterministic(
            partitions in partition_count_strategy(),
            zones in zone_sets(),
            changes in prop::collection::vec(change_strategy(), 0..24),
        ) {
            let first = build(partitions, &changes, &zones);
            let second = build(partitions, &changes, &zones);
            prop_assert_eq!(&first, &second);
            let encoded = serde_json::to_string(&first).unwrap();
            let decoded: Ring = serde_json::from_str(&encoded).unwrap();
            prop_assert_eq!(&first, &decoded);
        }
    }

    #[test]
    fn ring_key_hash_known_vector() {
        // MD5 of 00 00 00 01 'b' 'k', as printed by `printf '\0\0\0\1bk' | md5sum`.
        assert_eq!(
            key_hash(b"b", b"k"),
            [
                0x93, 0x5d, 0x0e, 0x17, 0xd2, 0x23, 0xf8, 0x07, 0xe5, 0x3b, 0xef, 0xa7, 0x3c, 0xb7,
                0xeb, 0x31
            ]
        );
        assert_ne!(key_hash(b"ab", b"c"), key_hash(b"a", b"bc"));
    }

    #[test]
    fn ring_partition_of_hash_edges() {
        let ring = Ring::new(64, node("node-founder", "")).unwrap();
        assert_eq!(ring.partition_of_hash(&[0; 16]), 0);
        assert_eq!(ring.partition_of_hash(&[0xff; 16]), 63);
        let mut hash = [0; 16];
        hash[0] = 0b0000_0100; // the lowest of the top six bits
        assert_eq!(ring.partition_of_hash(&hash), 1);
        hash[0] = 0b0000_0011; // only bits below the top six
        assert_eq!(ring.partition_of_hash(&hash), 0);
        let single = Ring::new(1, node("node-founder", "")).unwrap();
        assert_eq!(single.partition_of_hash(&[0xff; 16]), 0);
    }

    #[test]
    fn ring_refuses_bad_changes() {
        assert_eq!(
            Ring::new(48, node("a", "")),
            Err(RingError::PartitionCountNotPowerOfTwo { partitions: 48 })
        );
        assert_eq!(
            Ring::new(0, node("a", "")),
            Err(RingError::PartitionCountNotPowerOfTwo { partitions: 0 })
        );
        assert_eq!(
            Ring::new(MAX_RING_PARTITIONS * 2, node("a", "")),
            Err(RingError::TooManyPartitions {
                partitions: MAX_RING_PARTITIONS * 2,
                max: MAX_RING_PARTITIONS
            })
        );
        let ring = Ring::new(2, node("a", "")).unwrap();
        assert_eq!(
            ring.with_node_added(node("a", "zone-b")),
            Err(RingError::DuplicateNode(NodeId::from("a")))
        );
        assert_eq!(
            ring.with_node_removed(&NodeId::from("b")),
            Err(RingError::UnknownNode(NodeId::from("b")))
        );
        assert_eq!(
            ring.with_node_removed(&NodeId::from("a")),
            Err(RingError::NoNodes)
        );
        let full = ring.with_node_added(node("b", "")).unwrap();
        assert_eq!(
            full.with_node_added(node("c", "")),
            Err(RingError::TooManyNodes { partitions: 2 })
        );
    }

    #[test]
    fn ring_decode_rejects_broken_invariants() {
        let ring = Ring::new(4, node("a", ""))
            .unwrap()
            .with_node_added(node("b", ""))
            .unwrap();
        let mut value = serde_json::to_value(&ring).unwrap();
        value["owners"][0] = serde_json::json!("stranger");
        assert!(serde_json::from_value::<Ring>(value).is_err());
        let mut value = serde_json::to_value(&ring).unwrap();
        value["owners"].as_array_mut().unwrap().pop();
        assert!(serde_json::from_value::<Ring>(value).is_err());
        let mut value = serde_json::to_value(&ring).unwrap();
        value["nodes"].as_array_mut().unwrap().reverse();
        assert!(serde_json::from_value::<Ring>(value).is_err());
    }

    /// Claim spreads owners: growing a 64-partition ring one node at a time to 12 nodes and
    /// shrinking it back, few partitions have an N = 3 preference list that is not found within
    /// three consecutive partitions (a regression guard on claim quality; the bounds are what
    /// the claim achieves today, a claim that ignores neighbours gives dozens).
    #[test]
    fn ring_claim_spreads_consecutive_owners() {
        fn repeats(ring: &Ring) -> usize {
            let partitions = ring.partition_count();
            (0..partitions)
                .filter(|&partition| {
                    ring.preference_list(partition, 3)
                        .iter()
                        .any(|(found_at, _)| (found_at + partitions - partition) % partitions >= 3)
                })
                .count()
        }
        let mut ring = Ring::new(64, node("node-00", "")).unwrap();
        for number in 1..12 {
            ring = ring
                .with_node_added(node(&format!("node-{number:02}"), ""))
                .unwrap();
            assert!(
                repeats(&ring) <= 2,
                "grown to {}: {:?}",
                number + 1,
                ring.owners()
            );
        }
        for number in [3, 7, 0, 10, 5, 1, 8, 11, 2] {
            ring = ring
                .with_node_removed(&NodeId(format!("node-{number:02}")))
                .unwrap();
            // Shrinking to three nodes cannot avoid repeats without moving more than the
            // leaving node's partitions, so the bound applies from four nodes up.
            if ring.nodes().len() >= 4 {
                assert!(repeats(&ring) <= 4, "shrunk: {:?}", ring.owners());
            }
        }
    }
}

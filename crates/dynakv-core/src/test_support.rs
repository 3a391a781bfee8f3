//! Helpers shared by the core's unit tests.

use crate::membership::{Member, MemberStatus};
use crate::ring::NodeId;

pub fn id(name: &str) -> NodeId {
    NodeId(name.to_owned())
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

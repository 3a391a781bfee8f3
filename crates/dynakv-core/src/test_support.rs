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

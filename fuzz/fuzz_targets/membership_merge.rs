//! Membership state from a peer's gossip (postcard, as on the wire), merged into a valid
//! state: no panic, and merging the same state again changes nothing (idempotence).
#![no_main]

use dynakv_core::membership::{ClusterState, Member, MemberStatus};
use dynakv_core::ring::NodeId;
use libfuzzer_sys::fuzz_target;

fn base() -> ClusterState {
    let member = Member {
        id: NodeId("n1".into()),
        peer_addr: "127.0.0.1:1".into(),
        http_addr: "127.0.0.1:2".into(),
        zone: String::new(),
        status: MemberStatus::Valid,
        version: 1,
        heartbeat: 0,
        public_key: Some([1; 32]),
    };
    ClusterState::found("dynakv", member, 64).unwrap()
}

fuzz_target!(|data: &[u8]| {
    let Ok(theirs) = postcard::from_bytes::<ClusterState>(data) else {
        return;
    };
    let mut ours = base();
    ours.merge(&theirs);
    let once = ours.clone();
    ours.merge(&theirs);
    assert_eq!(ours, once, "merging the same state twice changed it");
    let _ = ours.claimant();
    let _ = ours.settled();
});

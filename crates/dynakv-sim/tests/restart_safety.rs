//! Why a node that lost writes must come back as a new actor: with the core's own `update`
//! and `sync`, reissuing a dot whose first issue survives elsewhere silently drops one of the
//! two writes and leaves replicas that never converge. This is the hazard `--keep-actor`
//! models (a server with `durability: buffered` that loses its unflushed writes in a power
//! loss keeps its actor id today).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use dynakv_core::object::{Content, Object, PrunePolicy};
use dynakv_core::version::{ActorId, VersionVector};

fn put(stored: &Object, context: &VersionVector, value: &[u8], actor: u64, now: u64) -> Object {
    stored
        .update(
            context,
            Content {
                value: value.to_vec(),
                last_modified_ms: now,
                ..Content::default()
            },
            ActorId(actor),
            now,
            PrunePolicy::default(),
        )
        .unwrap()
}

fn values(o: &Object) -> Vec<Vec<u8>> {
    o.live_siblings().map(|s| s.content.value.clone()).collect()
}

#[test]
fn reissuing_a_lost_dot_drops_a_write_and_blocks_convergence() {
    let a = 1;
    // A coordinates v1 (dot a:1) and replicates it to B; both acknowledge.
    let at_a = put(&Object::new(), &VersionVector::new(), b"v1", a, 10);
    let at_b = Object::new().sync(&at_a);
    // A loses its unflushed write and restarts with the same actor: it holds nothing.
    let at_a = Object::new();
    // A blind write v2 through A issues a:1 again, and is acknowledged by A and B.
    let at_a = put(&at_a, &VersionVector::new(), b"v2", a, 20);
    let at_b = at_b.sync(&at_a);
    assert_eq!(
        values(&at_b),
        vec![b"v1".to_vec()],
        "B dropped v2: same dot"
    );
    assert_eq!(values(&at_a), vec![b"v2".to_vec()]);
    // Anti-entropy merges both ways: neither side changes, so they never converge.
    assert_eq!(at_a.sync(&at_b), at_a);
    assert_eq!(at_b.sync(&at_a), at_b);
    assert_ne!(at_a, at_b);
}

#[test]
fn a_new_actor_after_data_loss_keeps_both_writes() {
    let at_a = put(&Object::new(), &VersionVector::new(), b"v1", 1, 10);
    let at_b = Object::new().sync(&at_a);
    // A comes back empty as actor 2.
    let at_a = put(&Object::new(), &VersionVector::new(), b"v2", 2, 20);
    let at_b = at_b.sync(&at_a);
    let at_a = at_a.sync(&at_b);
    assert_eq!(at_a, at_b);
    assert_eq!(values(&at_a), vec![b"v1".to_vec(), b"v2".to_vec()]);
}

//! Gossip and joins: the rules of membership's messages, as functions the simulator's `Node`
//! and the server both call (each keeps only its scheduling: timers, the transport, where
//! the state lives and when it is persisted).
//!
//! - A gossip round ([`start_round`]): this node beats, picks a partner among the members
//!   that have not exited and sends it its whole state; when the exchange is over
//!   ([`end_round`], the reply merged or the exchange failed) the claimant plans the ring on
//!   the freshest state (before it was spread, not one round staler).
//! - A peer's state is merged only if it is of this cluster ([`merge`]): gossip, a replica's
//!   `StaleRing` answer. Every member's heartbeat in it is shown to the failure detector.
//! - A join ([`join_request`], [`check_can_join`], [`on_join_request`], [`join_answer`]):
//!   only a node that is alone and holds no data asks; the member asked checks the cluster
//!   name, that the request comes from the node it names (and, when the transport verified
//!   the sender's key, that the key is the one it announces) and admits it as joining; the
//!   joiner adopts the state it is sent, wholesale.

use crate::failure::FailureDetector;
use crate::membership::{ClusterState, Member, MemberStatus};
use crate::message::PeerMessage;
use crate::ring::NodeId;

/// A state that may not be merged here.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MergeError {
    #[error("gossip from cluster {theirs:?}, this node is in cluster {ours:?}")]
    OtherCluster { ours: String, theirs: String },
}

/// Why a join did not happen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoinError {
    /// This node may not ask: it has other members, or holds data.
    #[error("{0}")]
    CannotJoin(String),
    /// The member asked refused, with its reason.
    #[error("refused the join: {0}")]
    Refused(String),
    /// No answer, or not an answer to a join.
    #[error("did not admit this node: {0}")]
    NoAnswer(String),
}

/// Start a gossip round: beat, then pick a partner (`pick(n)` chooses one of `n` members
/// that have not exited) and the message to send it. `None`: no one to exchange with (plan
/// with [`end_round`] at once).
pub fn start_round(
    state: &mut ClusterState,
    me: &NodeId,
    pick: impl FnOnce(usize) -> usize,
) -> Option<(NodeId, PeerMessage)> {
    state.beat(me);
    let peer = state.gossip_peer(me, pick)?;
    Some((peer, PeerMessage::Gossip(Box::new(state.clone()))))
}

/// Merge `theirs` (a peer's state: gossip or a `StaleRing` answer) into `state`, after
/// showing its heartbeats to the failure detector.
///
/// # Errors
/// `theirs` is another cluster's: nothing is merged or observed.
pub fn merge(
    state: &mut ClusterState,
    detector: &mut FailureDetector,
    now_ms: u64,
    theirs: &ClusterState,
) -> Result<(), MergeError> {
    if theirs.cluster_name != state.cluster_name {
        return Err(MergeError::OtherCluster {
            ours: state.cluster_name.clone(),
            theirs: theirs.cluster_name.clone(),
        });
    }
    detector.observe_state(theirs, now_ms);
    state.merge(theirs);
    Ok(())
}

/// A peer's gossip: merge it, answer with this node's state (or the refusal).
pub fn on_gossip(
    state: &mut ClusterState,
    detector: &mut FailureDetector,
    now_ms: u64,
    theirs: &ClusterState,
) -> PeerMessage {
    match merge(state, detector, now_ms, theirs) {
        Ok(()) => PeerMessage::Gossip(Box::new(state.clone())),
        Err(e) => PeerMessage::Error(e.to_string()),
    }
}

/// The round's exchange is over (`reply`: the partner's answer, `None` when there was no
/// exchange or it failed): merge the partner's state, then plan the ring when this node is
/// the claimant. Returns whether the plan changed the ring, and a refused merge.
pub fn end_round(
    state: &mut ClusterState,
    me: &NodeId,
    detector: &mut FailureDetector,
    now_ms: u64,
    reply: Option<&PeerMessage>,
) -> (bool, Option<MergeError>) {
    let refused = match reply {
        Some(PeerMessage::Gossip(theirs)) => merge(state, detector, now_ms, theirs).err(),
        _ => None,
    };
    let planned = state.claimant() == Some(me) && state.plan();
    (planned, refused)
}

/// Whether this node may ask to join a cluster: it must be alone in its own and hold no data
/// (`holds_data`, read by the driver).
///
/// # Errors
/// Why it may not.
pub fn check_can_join(state: &ClusterState, holds_data: bool) -> Result<(), JoinError> {
    if state.members.len() > 1 {
        return Err(JoinError::CannotJoin(
            "this node is already part of a cluster with other members".into(),
        ));
    }
    if holds_data {
        return Err(JoinError::CannotJoin(
            "this node holds data; only an empty node can join a cluster".into(),
        ));
    }
    Ok(())
}

/// The request that asks a member to admit `me` (its own member entry, marked joining);
/// `None` when the state holds no entry for `me` (a node always founds its own cluster with
/// one).
pub fn join_request(state: &ClusterState, me: &NodeId) -> Option<PeerMessage> {
    let mut member = state.member(me).cloned()?;
    member.status = MemberStatus::Joining;
    Some(PeerMessage::JoinRequest {
        cluster_name: state.cluster_name.clone(),
        member,
    })
}

/// A node's request to join (`sender`, as the transport knows it, with the key the
/// handshake verified when it did): admitted as joining, answered with the state it is to
/// adopt, or refused with the reason.
pub fn on_join_request(
    state: &mut ClusterState,
    sender: &NodeId,
    sender_key: Option<&[u8; 32]>,
    cluster_name: &str,
    member: Member,
) -> PeerMessage {
    if cluster_name != state.cluster_name {
        return PeerMessage::Error(format!(
            "cluster name mismatch: this cluster is {:?}, the request is for {cluster_name:?}",
            state.cluster_name
        ));
    }
    let admitted = ClusterState::check_join_request(sender, sender_key, &member)
        .and_then(|()| state.add_joining(member));
    match admitted {
        Ok(()) => PeerMessage::JoinAccepted {
            state: Box::new(state.clone()),
        },
        Err(e) => PeerMessage::Error(e.to_string()),
    }
}

/// The joiner's reading of the answer (`None`: none came): the state to adopt.
///
/// # Errors
/// The member refused, or did not answer the join.
pub fn join_answer(reply: Option<PeerMessage>) -> Result<ClusterState, JoinError> {
    match reply {
        Some(PeerMessage::JoinAccepted { state }) => Ok(*state),
        Some(PeerMessage::Error(message)) => Err(JoinError::Refused(message)),
        Some(other) => Err(JoinError::NoAnswer(format!("it answered {}", other.name()))),
        None => Err(JoinError::NoAnswer("no answer".into())),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::test_support::{id, member, settled_cluster};

    fn detector(me: &str) -> FailureDetector {
        FailureDetector::new(id(me), 0, 5_000)
    }

    /// A state of another cluster is neither merged nor shown to the failure detector, on
    /// either side of an exchange.
    #[test]
    fn another_clusters_state_is_refused_everywhere() {
        let mut ours = settled_cluster(&["a", "b"], 8);
        let mut theirs = settled_cluster(&["a", "x"], 8);
        theirs.cluster_name = "other".into();
        let before = ours.clone();
        let mut fd = detector("a");
        let answer = on_gossip(&mut ours, &mut fd, 10, &theirs);
        assert!(matches!(answer, PeerMessage::Error(ref e) if e.contains("other")));
        let reply = PeerMessage::Gossip(Box::new(theirs.clone()));
        let (_, refused) = end_round(&mut ours, &id("b"), &mut fd, 10, Some(&reply));
        assert!(matches!(refused, Some(MergeError::OtherCluster { .. })));
        assert_eq!(ours, before);
        assert!(ours.member(&id("x")).is_none());
        // Same cluster: merged, answered with the merged state.
        theirs.cluster_name = ours.cluster_name.clone();
        let answer = on_gossip(&mut ours, &mut fd, 10, &theirs);
        assert!(ours.member(&id("x")).is_some());
        assert!(matches!(answer, PeerMessage::Gossip(s) if s.member(&id("x")).is_some()));
    }

    /// The claimant plans once the exchange's reply is merged (a join it brought is planned
    /// this round); a node that is not the claimant never plans.
    #[test]
    fn the_claimant_plans_after_merging_the_reply() {
        let state = settled_cluster(&["a", "b"], 8);
        let claimant = state.claimant().cloned().unwrap();
        let other = if claimant == id("a") {
            id("b")
        } else {
            id("a")
        };
        let mut theirs = state.clone();
        theirs
            .add_joining(member("c", MemberStatus::Joining))
            .unwrap();
        let reply = PeerMessage::Gossip(Box::new(theirs));

        let mut not_claimant = state.clone();
        let (planned, _) = end_round(
            &mut not_claimant,
            &other,
            &mut detector("b"),
            1,
            Some(&reply),
        );
        assert!(!planned);
        assert!(not_claimant.ring.next.is_none());

        let mut at_claimant = state.clone();
        let (planned, _) = end_round(
            &mut at_claimant,
            &claimant,
            &mut detector("a"),
            1,
            Some(&reply),
        );
        assert!(planned, "the join the reply brought is planned");
        assert!(at_claimant.ring.next.is_some());
    }

    /// A join: refused to a node with other members or data; the member asked checks the
    /// cluster name and that the request names its sender; the joiner adopts the answer.
    #[test]
    fn a_join_is_asked_checked_and_adopted() {
        let lone = ClusterState::found("c", member("n", MemberStatus::Valid), 8).unwrap();
        assert!(check_can_join(&lone, false).is_ok());
        assert!(matches!(
            check_can_join(&lone, true),
            Err(JoinError::CannotJoin(_))
        ));
        let two = settled_cluster(&["a", "b"], 8);
        assert!(check_can_join(&two, false).is_err());

        let Some(PeerMessage::JoinRequest {
            cluster_name,
            member: entry,
        }) = join_request(&lone, &id("n"))
        else {
            panic!("not a join request")
        };
        assert_eq!(entry.status, MemberStatus::Joining);
        let mut cluster = two.clone();
        let wrong_name = on_join_request(&mut cluster, &id("n"), None, "other", entry.clone());
        assert!(matches!(wrong_name, PeerMessage::Error(ref e) if e.contains("mismatch")));
        let impostor = on_join_request(&mut cluster, &id("m"), None, &cluster_name, entry.clone());
        assert!(matches!(impostor, PeerMessage::Error(_)), "{impostor:?}");
        assert_eq!(cluster, two, "nothing admitted");
        let accepted = on_join_request(&mut cluster, &id("n"), None, &cluster_name, entry);
        let adopted = join_answer(Some(accepted)).unwrap();
        assert_eq!(adopted, cluster);
        assert_eq!(
            adopted.member(&id("n")).map(|m| m.status),
            Some(MemberStatus::Joining)
        );
        assert!(matches!(
            join_answer(Some(PeerMessage::Error("no".into()))),
            Err(JoinError::Refused(_))
        ));
        assert!(matches!(join_answer(None), Err(JoinError::NoAnswer(_))));
    }
}

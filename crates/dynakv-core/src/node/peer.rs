//! The peer side of a `Node`: requests from other nodes (answered by the core's `serve`, or
//! coordinated here for a forwarder), and the replies to this node's own requests.
//!
//! Invariants: a durable replica write or handoff batch is acknowledged only after its sync;
//! a reply is taken only from the node it was asked of.

use super::{
    AaeRunEvent, AfterSync, ClientResult, Event, HintOutcome, MAX_AAE_KEYS_PER_EXCHANGE,
    MAX_HINTS_PER_TARGET, Machine, Node, NodeId, NodeView, Output, PeerMessage, Pending, Purpose,
    PutRequest, ReapAnswer, ReplicaError, Reply, ReplyTo, RequestId, RequestReply, ServeContext,
    ServeError, StoreDurability, serve,
};
use crate::gossip::{self, JoinError};
use crate::hints::HintEvent;
use crate::listing::ListEvent;
use crate::reaping::ReapEvent;
use crate::request::accept_forwarded;

impl Node {
    // ----- peer requests -----

    pub(super) fn on_request(&mut self, now: u64, from: &NodeId, id: RequestId, body: PeerMessage) {
        if !self.joined() {
            let refusal = crate::membership::AWAITING_JOIN_REFUSAL.to_owned();
            self.respond(from, id, PeerMessage::Error(refusal));
            return;
        }
        if serve::storage_call(&body).is_some() {
            self.serve_peer(from, id, body);
            return;
        }
        match body {
            message @ PeerMessage::CoordinatePut { .. } => {
                let offset = self.hellos.get(from).map_or(0, |h| h.offset_ms);
                let limit_ms = (!self.config.retry_unanswered_forward())
                    .then_some(self.config.timings.request_ms);
                let view = NodeView { node: self, now };
                // Its age: the forwarder's wall clock converted to this node's.
                match accept_forwarded(&view, message, self.wall_ms, offset, limit_ms) {
                    Ok((op, stamp_ms)) => {
                        let view = NodeView { node: self, now };
                        let (put, steps) = PutRequest::coordinate(&view, op, stamp_ms);
                        let reply = ReplyTo::Peer(from.clone(), id);
                        self.start_request(now, Machine::Put(put), reply, steps);
                    }
                    Err(refused) => {
                        if refused.late {
                            self.stats.late_forwards_refused += 1;
                        }
                        self.respond(from, id, *refused.answer);
                    }
                }
            }
            PeerMessage::ListKeys {
                bucket,
                start_after,
                limit,
            } => {
                let (keys, next_after) =
                    self.local_key_page(&bucket, start_after.as_deref(), limit as usize);
                self.respond(from, id, PeerMessage::KeyPage { keys, next_after });
            }
            message @ PeerMessage::IndexQuery(_) => {
                let answer = crate::index::answer(&self.replica, message);
                self.respond(from, id, answer);
            }
            PeerMessage::ListBuckets => {
                let buckets = self.replica.list_buckets();
                let buckets = self.must(buckets, "list buckets");
                self.respond(from, id, PeerMessage::Buckets(buckets));
            }
            PeerMessage::Gossip(theirs) => {
                let detector = &mut self.failure_detector;
                let answer = gossip::on_gossip(&mut self.cluster, detector, now, &theirs);
                self.respond(from, id, answer);
            }
            PeerMessage::JoinRequest {
                cluster_name,
                member,
            } => {
                // The key the sender proved in its hello (none in the simulator, whose
                // links carry no keys: the sender is who it says).
                let key = self.hellos.get(from).and_then(|h| h.key);
                let answer = gossip::on_join_request(
                    &mut self.cluster,
                    from,
                    key.as_ref(),
                    &cluster_name,
                    member,
                );
                self.respond(from, id, answer);
            }
            other => {
                let error = PeerMessage::Error(format!("unexpected request {}", other.name()));
                self.respond(from, id, error);
            }
        }
    }

    /// A replica-side request, answered by the core's `serve` (the server's peer handler
    /// calls the same function), then what the answer asks of the node: hint counts, stale
    /// ring refusals, and the stored keys' orphan check.
    pub(super) fn serve_peer(&mut self, from: &NodeId, id: RequestId, message: PeerMessage) {
        let (body, durable) = self.serve_here(message);
        if durable {
            // A durable replica write or handoff batch is acknowledged once it is on disk.
            let to = from.clone();
            self.after_sync(AfterSync::Respond { to, id, body });
        } else {
            self.respond(from, id, body);
        }
    }

    /// [`Node::serve_peer`]'s work: the reply to send, and whether it may only be sent once
    /// the writes are durable (a write that asked for `Fsync` is made buffered here and waits
    /// for a sync instead).
    pub(super) fn serve_here(&mut self, mut message: PeerMessage) -> (PeerMessage, bool) {
        let handoff = matches!(message, PeerMessage::Handoff { .. });
        let mut durable = false;
        if let Some(asked) = message.durability_mut()
            && *asked == StoreDurability::Fsync
        {
            *asked = StoreDurability::Buffered;
            durable = true;
        }
        let context = ServeContext {
            // The old rule: a handoff is merged whatever the sender's ring.
            ring_version: if handoff && !self.config.handoff_checks_ring() {
                0
            } else {
                self.cluster.ring.version
            },
            props: serve::buckets_named(&message)
                .into_iter()
                .map(|bucket| (bucket.to_owned(), self.props(bucket)))
                .collect(),
            hint_limit: MAX_HINTS_PER_TARGET,
            hint_target_member: serve::hint_target(&message)
                .is_some_and(|target| self.cluster.is_member(target)),
            max_leaf_keys: MAX_AAE_KEYS_PER_EXCHANGE,
            aae_budget: u32::try_from(self.anti_entropy.budget).unwrap_or(u32::MAX),
            defer_sync: true,
        };
        let served = match serve::serve(&self.replica, &self.aae, &context, message) {
            Ok(served) => served,
            // The node's own storage failed: it stops (nothing is answered).
            Err(e @ (ServeError::Storage(_) | ServeError::Replica(ReplicaError::Storage(_)))) => {
                self.must(Err::<(), _>(e), "serve a peer request");
                return (PeerMessage::Error("storage failed".into()), false);
            }
            // The sender's message (or a corrupt stored object) is refused.
            Err(e) => return (PeerMessage::Error(e.to_string()), false),
        };
        let durable = durable || served.needs_sync;
        if durable {
            self.request_sync();
        }
        match served.hint {
            Some(HintOutcome::Stored) => self.stats.hints_stored += 1,
            Some(HintOutcome::Dropped) => self.stats.hints_dropped += 1,
            None => {}
        }
        if served.reaped {
            self.stats.tombstones_reaped += 1;
        }
        for (bucket, key) in &served.stored {
            if let Ok(Some(merged)) = self.read(bucket, key)
                && self.planted_bug(bucket, key, &merged).is_none()
            {
                self.note_stored(&merged);
            }
        }
        if !handoff || self.config.handoff_checks_ring() {
            for (bucket, key) in &served.stored {
                self.check_orphan(bucket, key);
            }
        }
        match served.reply {
            Reply::Message(message) => (message, durable),
            Reply::StaleRing => {
                self.stats.stale_ring_refusals += 1;
                (
                    PeerMessage::StaleRing(Box::new(self.cluster.clone())),
                    false,
                )
            }
        }
    }

    pub(super) fn on_response(
        &mut self,
        now: u64,
        id: RequestId,
        pending: Pending,
        body: Option<PeerMessage>,
    ) {
        let from = pending.to;
        if let Some(PeerMessage::StaleRing(state)) = &body {
            // `store_replica`/`store_hinted`: catch up with the refusing replica's ring.
            self.merge_state(now, state);
        }
        match pending.purpose {
            Purpose::Request { request, tag } => {
                let reply = match body {
                    Some(message) => RequestReply::Message(message),
                    None if self.unsent == Some((id, true)) => RequestReply::NotSent(format!(
                        "{from}: runs the previous peer protocol version, which cannot carry \
                         this request (upgrade it)"
                    )),
                    None if self.unsent == Some((id, false)) => {
                        RequestReply::NotSent(format!("{from}: unreachable"))
                    }
                    // The rule before finding 5 retried a forward that timed out.
                    None if self.config.retry_unanswered_forward() => RequestReply::NotSent(
                        format!("{from}: no answer; the write may have been applied"),
                    ),
                    None => RequestReply::Unanswered(format!(
                        "{from}: no answer; the write may have been applied"
                    )),
                };
                self.request_event(now, request, Event::Reply { tag, reply });
            }
            Purpose::Store => {}
            Purpose::Gossip => self.after_gossip_exchange(now, body.as_ref()),
            Purpose::Join => {
                self.joining.pending = false;
                let client = self.joining.client.take();
                let result = match gossip::join_answer(body) {
                    // Adopt the cluster's state wholesale (unless the join was given up).
                    Ok(state) if !self.joining.via.is_empty() => {
                        self.cluster = state;
                        self.joining.via.clear();
                        ClientResult::Done
                    }
                    Ok(_) => ClientResult::unavailable(format!("{from}: the join was given up")),
                    Err(e @ JoinError::Refused(_)) => ClientResult::Failed {
                        status: 400,
                        message: format!("{from} {e}"),
                    },
                    Err(e) => ClientResult::unavailable(format!("{from} {e}")),
                };
                if let Some(id) = client {
                    // Asked by a client: one attempt, answered (the constructor's join retries).
                    if !matches!(result, ClientResult::Done) {
                        self.joining.via.clear();
                    }
                    self.outputs.push(Output::Reply { id, result });
                }
            }
            Purpose::Listing { listing, tag } => {
                let reply = match body {
                    Some(message) => RequestReply::Message(message),
                    None => RequestReply::Unanswered(format!("{from}: no answer")),
                };
                self.listing_event(now, listing, ListEvent::Reply { tag, reply });
            }
            Purpose::CleanupHandoff { tag } => {
                let ok = matches!(body, Some(PeerMessage::Ack));
                self.on_cleanup_handoff(now, tag, ok);
            }
            Purpose::TransitionHandoff => {
                let ok = matches!(body, Some(PeerMessage::Ack));
                self.on_transition_handoff_reply(now, ok);
            }
            Purpose::HintDelivery { target, tag } => {
                let ok = matches!(body, Some(PeerMessage::Ack));
                self.hint_event(now, &target, HintEvent::Reply { tag, ok });
            }
            Purpose::AaeAsk { id } => {
                self.aae_event(now, AaeRunEvent::Answer { id, answer: body });
            }
            Purpose::AaeFetch { id } => self.aae_event(now, AaeRunEvent::fetched(id, body)),
            Purpose::ReapCheck { id } => {
                let answer = match body {
                    Some(PeerMessage::ReapState { object, hinted }) => Some(ReapAnswer {
                        stored: object,
                        // The old rule looked at the primaries' copies only.
                        hinted: hinted && !self.config.primaries_only_reap(),
                    }),
                    _ => None,
                };
                self.reap_event(now, ReapEvent::Reply { id, from, answer });
            }
        }
    }
}

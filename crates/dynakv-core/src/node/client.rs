//! The client side of a `Node`: gets, puts (coordinated here or forwarded), bucket
//! properties, join and leave, key and bucket listings.
//!
//! Invariants: a put is coordinated only by a primary of the key, which writes its own copy
//! first (durably, before sending it on, when the write is durable); a client is answered
//! once per request (a key listing in pages, the last marked).

use super::{
    AfterSync, BucketListing, BucketProps, ClientListing, ClientOp, ClientRequest, ClientRequestId,
    ClientResult, Event, ExpiryEvent, GetRequest, KeyListing, KeyPage, LIST_PAGE_KEYS, ListEvent,
    ListStep, Listing, Machine, Node, NodeId, NodeView, Object, Output, PeerMessage, Purpose,
    PutRequest, ReplyTo, Step, StoreDurability, keys,
};

impl Node {
    // ----- client requests -----

    pub(super) fn on_client(&mut self, now: u64, id: ClientRequestId, op: ClientOp) {
        match op {
            ClientOp::Get { bucket, key, r, pr } => {
                let view = NodeView { node: self, now };
                let (get, steps) = GetRequest::start(&view, &bucket, &key, (r, pr));
                self.start_request(now, Machine::Get(get), ReplyTo::Client(id), steps);
            }
            ClientOp::SetBucketProps { bucket, props } => {
                let result = self.set_bucket_props(&bucket, props.as_ref());
                self.outputs.push(Output::Reply { id, result });
            }
            ClientOp::Join { via } => self.join(now, id, via),
            ClientOp::ListKeys { bucket } => {
                let view = NodeView { node: self, now };
                let (listing, steps) = KeyListing::start(&view, &bucket);
                self.start_listing(now, id, Listing::Keys(listing), steps);
            }
            ClientOp::ListBuckets => {
                let view = NodeView { node: self, now };
                let (listing, steps) = BucketListing::start(&view);
                self.start_listing(now, id, Listing::Buckets(listing), steps);
            }
            ClientOp::Security(change) => {
                let result =
                    match change.apply(&mut self.cluster.security, self.wall_ms, &self.me.0) {
                        Ok(()) => ClientResult::Done,
                        Err(e) => ClientResult::Failed {
                            status: e.status(),
                            message: e.to_string(),
                        },
                    };
                self.outputs.push(Output::Reply { id, result });
            }
            ClientOp::BucketType(change) => {
                let defaults = self.config.props.clone();
                let result = match crate::bucket_types::apply(
                    &mut self.cluster,
                    change,
                    &self.me,
                    self.wall_ms,
                    &defaults,
                ) {
                    Ok(()) => ClientResult::Done,
                    Err(e) => ClientResult::Failed {
                        status: e.status(),
                        message: e.to_string(),
                    },
                };
                self.outputs.push(Output::Reply { id, result });
            }
            ClientOp::ForceRemove { node } => {
                let result = if node == self.me {
                    Err("a node cannot force-remove itself: ask another member".to_owned())
                } else {
                    self.cluster.force_remove(&node).map_err(|e| e.to_string())
                };
                let result = match result {
                    Ok(()) => ClientResult::Done,
                    Err(message) => ClientResult::Failed {
                        status: 400,
                        message,
                    },
                };
                self.outputs.push(Output::Reply { id, result });
            }
            ClientOp::Leave => {
                let result = match self.request_leave() {
                    Ok(()) => ClientResult::Done,
                    Err(message) => ClientResult::Failed {
                        status: 400,
                        message,
                    },
                };
                self.outputs.push(Output::Reply { id, result });
            }
            ClientOp::Put(op) => {
                let view = NodeView { node: self, now };
                // Stamped by the wall clock.
                let (put, steps) = PutRequest::start(&view, op, self.wall_ms);
                self.start_request(now, Machine::Put(put), ReplyTo::Client(id), steps);
            }
        }
    }

    /// A new entry for `bucket` in the cluster state, newer than
    /// the one it replaces (last writer wins by timestamp when gossip merges), stamped by the
    /// wall clock (`bucket::set_props`).
    pub(super) fn set_bucket_props(
        &mut self,
        bucket: &str,
        props: Option<&BucketProps>,
    ) -> ClientResult {
        let wall_ms = self.wall_ms;
        match crate::bucket::set_props(&mut self.cluster, bucket, props, &self.me, wall_ms) {
            Ok(()) => ClientResult::Done,
            Err(e) => ClientResult::Failed {
                status: 400,
                message: e.to_string(),
            },
        }
    }

    /// One page of this node's live keys of `bucket` after `start_after`, and where the next
    /// page starts.
    pub(super) fn local_key_page(
        &mut self,
        bucket: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> KeyPage {
        let after = start_after.map(|k| keys::object_key(bucket.as_bytes(), k.as_bytes()));
        let limit = limit.clamp(1, LIST_PAGE_KEYS);
        let page = self.replica.list_keys_page(bucket, after.as_deref(), limit);
        let (keys, next) = self.must(page, "list keys");
        let next_after = next
            .as_deref()
            .and_then(keys::split_object_key)
            .map(|(_, k)| String::from_utf8_lossy(k).into_owned());
        (keys, next_after)
    }

    /// Start a listing's machine (`crate::listing`) and perform its first steps.
    fn start_listing(
        &mut self,
        now: u64,
        client: ClientRequestId,
        listing: Listing,
        steps: Vec<ListStep>,
    ) {
        let id = self.next_listing;
        self.next_listing += 1;
        let mut run = ClientListing { client, listing };
        if !self.perform_listing(now, id, &mut run, steps) {
            self.listings.insert(id, run);
        }
    }

    /// Feed an outcome to listing `id` and perform what it asks.
    pub(super) fn listing_event(&mut self, now: u64, id: u64, event: ListEvent) {
        let Some(mut run) = self.listings.remove(&id) else {
            return;
        };
        let steps = self.listing_handle(now, &mut run, event);
        if !self.perform_listing(now, id, &mut run, steps) {
            self.listings.insert(id, run);
        }
    }

    fn listing_handle(&self, now: u64, run: &mut ClientListing, event: ListEvent) -> Vec<ListStep> {
        run.listing.handle(&NodeView { node: self, now }, event)
    }

    /// Perform a listing's steps (local reads fed back at once); whether it ended.
    fn perform_listing(
        &mut self,
        now: u64,
        id: u64,
        run: &mut ClientListing,
        steps: Vec<ListStep>,
    ) -> bool {
        let mut ended = false;
        for step in steps {
            let event = match step {
                ListStep::Send {
                    tag,
                    to,
                    message,
                    timeout_ms,
                } => {
                    let purpose = Purpose::Listing { listing: id, tag };
                    self.send_request(now, &to, message, purpose, timeout_ms);
                    None
                }
                ListStep::ReadLocalPage {
                    tag,
                    bucket,
                    start_after,
                    limit,
                } => {
                    let page = self.local_key_page(&bucket, start_after.as_deref(), limit);
                    Some(ListEvent::Page {
                        tag,
                        page: Some(page),
                    })
                }
                ListStep::ReadLocalBuckets { tag } => {
                    let buckets = self.replica.list_buckets();
                    let buckets = self.must(buckets, "list buckets");
                    Some(ListEvent::Buckets {
                        tag,
                        buckets: Some(buckets),
                    })
                }
                ListStep::Keys { keys, last } => {
                    ended |= last;
                    let result = ClientResult::Keys { keys, last };
                    self.outputs.push(Output::Reply {
                        id: run.client,
                        result,
                    });
                    None
                }
                ListStep::Buckets(buckets) => {
                    ended = true;
                    let result = ClientResult::Buckets(buckets);
                    self.outputs.push(Output::Reply {
                        id: run.client,
                        result,
                    });
                    None
                }
                ListStep::Failed(e) => {
                    ended = true;
                    let result = ClientResult::Failed {
                        status: e.status(),
                        message: e.to_string(),
                    };
                    self.outputs.push(Output::Reply {
                        id: run.client,
                        result,
                    });
                    None
                }
            };
            if let Some(event) = event {
                let steps = self.listing_handle(now, run, event);
                ended |= self.perform_listing(now, id, run, steps);
            }
        }
        ended
    }

    /// A node alone in its cluster and holding no data asks `via` once.
    pub(super) fn join(&mut self, now: u64, id: ClientRequestId, via: NodeId) {
        let refuse = |message: &str| ClientResult::Failed {
            status: 400,
            message: message.to_owned(),
        };
        let result = if self.joining.pending || self.joining.client.is_some() {
            Some(refuse("a join is already in progress"))
        } else {
            let first = self.replica.scan_objects(None, 1);
            let holds_data = !self.must(first, "scan objects").is_empty();
            crate::gossip::check_can_join(&self.cluster, holds_data)
                .err()
                .map(|e| refuse(&e.to_string()))
        };
        if let Some(result) = result {
            self.outputs.push(Output::Reply { id, result });
            return;
        }
        self.joining.via = vec![via];
        self.joining.attempts = 0;
        self.joining.client = Some(id);
        self.send_join(now);
    }

    /// Start a client request's machine (the data plane, `crate::request`) and perform its
    /// first steps.
    pub(super) fn start_request(
        &mut self,
        now: u64,
        machine: Machine,
        reply: ReplyTo,
        steps: Vec<Step>,
    ) {
        let id = self.next_client_request;
        self.next_client_request += 1;
        let mut request = ClientRequest {
            machine,
            reply: Some(reply),
        };
        self.perform(now, id, &mut request, steps);
        if !request.machine.finished() {
            self.requests.insert(id, request);
        }
    }

    /// Feed an outcome to client request `id`'s machine and perform what it asks.
    pub(super) fn request_event(&mut self, now: u64, id: u64, event: Event) {
        let Some(mut request) = self.requests.remove(&id) else {
            return;
        };
        let view = NodeView { node: self, now };
        let steps = request.machine.handle(&view, event);
        self.perform(now, id, &mut request, steps);
        if !request.machine.finished() {
            self.requests.insert(id, request);
        }
    }

    /// Perform a request machine's steps in order; a local step's outcome is fed back at
    /// once and what it returns is performed before the next step.
    fn perform(&mut self, now: u64, id: u64, request: &mut ClientRequest, steps: Vec<Step>) {
        for step in steps {
            let event = match step {
                Step::Send {
                    tag,
                    to,
                    message,
                    timeout_ms,
                } => {
                    let purpose = if let Some(tag) = tag {
                        Purpose::Request { request: id, tag }
                    } else {
                        // Read repair: fire and forget.
                        if self.failed.is_some() {
                            return;
                        }
                        self.stats.read_repairs += 1;
                        Purpose::Store
                    };
                    self.send_request(now, &to, message, purpose, timeout_ms);
                    None
                }
                Step::ReadLocal {
                    tag,
                    bucket,
                    key,
                    hinted_for,
                } => {
                    let result = self.local_with_hint(&bucket, &key, hinted_for.as_ref());
                    Some(Event::Read { tag, result })
                }
                Step::MergeLocal {
                    bucket,
                    key,
                    object,
                } => {
                    if self.failed.is_some() {
                        return;
                    }
                    self.stats.read_repairs += 1;
                    let me = self.me.clone();
                    self.store_replica(now, &me, &bucket, &key, &object);
                    None
                }
                Step::Write {
                    op,
                    durability,
                    now_ms,
                } => {
                    let props = self.props(&op.bucket);
                    match self.write_local(now_ms, op, &props, StoreDurability::Buffered) {
                        Ok(stored) if durability == StoreDurability::Fsync => {
                            // The coordinator's own copy is durable before it is sent on.
                            self.after_sync(AfterSync::Written {
                                request: id,
                                stored,
                            });
                            None
                        }
                        written => Some(Event::Written(written)),
                    }
                }
                Step::KeepHint {
                    target,
                    bucket,
                    key,
                    object,
                    durability,
                } => {
                    self.keep_hint(&target, (&bucket, &key), &object, durability);
                    None
                }
                Step::CheckOrphan { bucket, key } => {
                    self.check_orphan(&bucket, &key);
                    None
                }
                Step::Replanned => {
                    self.stats.replans += 1;
                    None
                }
                Step::Answer(result) => {
                    if matches!(request.reply, Some(ReplyTo::Expiry)) {
                        // The expiry round's read (as stored) or tombstone.
                        request.reply = None;
                        let event = match &request.machine {
                            Machine::Get(_) => ExpiryEvent::Read(result.ok()),
                            Machine::Put(_) => ExpiryEvent::Written(result.is_ok()),
                        };
                        self.expiry_event(now, event);
                    } else if let Some(to) = request.reply.take() {
                        let result = match (result, &request.machine) {
                            // What a client reads: expired values left out (as the
                            // server's `requests::get`).
                            (Ok(object), Machine::Get(_))
                                if self.config.filters_expired_reads() =>
                            {
                                ClientResult::Got(object.unexpired(self.wall_ms))
                            }
                            (Ok(object), Machine::Get(_)) => ClientResult::Got(object),
                            (Ok(object), Machine::Put(_)) => ClientResult::Put(object),
                            (Err(e), _) => ClientResult::Failed {
                                status: e.status(),
                                message: e.to_string(),
                            },
                        };
                        self.answer(to, result);
                    }
                    None
                }
            };
            if let Some(event) = event {
                let view = NodeView { node: self, now };
                let steps = request.machine.handle(&view, event);
                self.perform(now, id, request, steps);
            }
        }
    }

    pub(super) fn answer(&mut self, to: ReplyTo, result: ClientResult) {
        match to {
            ReplyTo::Client(id) => self.outputs.push(Output::Reply { id, result }),
            // Answered in `perform` (never through here).
            ReplyTo::Expiry => {}
            ReplyTo::Peer(peer, id) => {
                let body = match result {
                    ClientResult::Put(object) | ClientResult::Got(object) => {
                        PeerMessage::Coordinated {
                            object: object.encode(),
                        }
                    }
                    ClientResult::Failed { status, message } => {
                        PeerMessage::Failed { status, message }
                    }
                    // Only puts are coordinated for a peer.
                    ClientResult::Done | ClientResult::Keys { .. } | ClientResult::Buckets(_) => {
                        PeerMessage::Ack
                    }
                };
                self.respond(&peer, id, body);
            }
        }
    }

    /// Store a replica without waiting for the outcome (read repair, anti-entropy).
    pub(super) fn store_replica(
        &mut self,
        now: u64,
        node: &NodeId,
        bucket: &str,
        key: &str,
        object: &Object,
    ) {
        if node == &self.me {
            self.merge_local(bucket, key, object);
            if self.config.handoff_checks_ring() {
                // A read repair planned under an older ring may land after this node's
                // cleanup.
                self.check_orphan(bucket, key);
            }
        } else {
            let durability = self.props(bucket).durability;
            let body = crate::request::replica_put(&self.cluster, bucket, key, object, durability);
            let timeout = self.config.timings.request_ms;
            self.send_request(now, node, body, Purpose::Store, timeout);
        }
    }

    /// A write stored here for a key this node no longer replicates
    /// (settled ring) asks for another cleanup.
    pub(super) fn check_orphan(&mut self, bucket: &str, key: &str) {
        let partition = self.partition_of(bucket, key);
        let n_val = self.n_val(bucket);
        self.passes
            .marker
            .on_stored(&self.cluster, &self.me, partition, n_val);
    }
}

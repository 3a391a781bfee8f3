//! The client side of a `Node`: gets, puts (coordinated here or forwarded), bucket
//! properties, join and leave, key and bucket listings.
//!
//! Invariants: a put is coordinated only by a primary of the key, which writes its own copy
//! first (durably, before sending it on, when the write is durable); a client is answered
//! once per request (a key listing in pages, the last marked).

use super::{
    AfterSync, BTreeSet, BucketListing, BucketProps, BucketPropsEntry, ClientOp, ClientRequest,
    ClientRequestId, ClientResult, Event, GetRequest, KeyListing, KeyPage, LIST_PAGE_KEYS,
    ListCursor, Machine, Node, NodeId, NodeView, Object, Output, PeerMessage, Purpose, PutRequest,
    ReplyTo, Step, StoreDurability, VecDeque, keys,
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
                let result = self.set_bucket_props(now, &bucket, props.as_ref());
                self.outputs.push(Output::Reply { id, result });
            }
            ClientOp::Join { via } => self.join(now, id, via),
            ClientOp::ListKeys { bucket } => self.start_key_listing(now, id, bucket),
            ClientOp::ListBuckets => self.start_bucket_listing(now, id),
            ClientOp::Leave => {
                let result = match self.leave() {
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
                let (put, steps) = PutRequest::start(&view, op, now);
                self.start_request(now, Machine::Put(put), ReplyTo::Client(id), steps);
            }
        }
    }

    /// `Cluster::set_bucket_props`: a new entry for `bucket` in the cluster state, newer than
    /// the one it replaces (last writer wins by timestamp when gossip merges).
    pub(super) fn set_bucket_props(
        &mut self,
        now: u64,
        bucket: &str,
        props: Option<&BucketProps>,
    ) -> ClientResult {
        if let Err(e) = crate::bucket::check_custom_bucket_room(&self.cluster, bucket) {
            return ClientResult::Failed {
                status: 400,
                message: e.to_string(),
            };
        }
        let timestamp_ms = self
            .cluster
            .bucket_props
            .get(bucket)
            .map_or(0, |e| e.timestamp_ms + 1)
            .max(now);
        let entry = BucketPropsEntry {
            timestamp_ms,
            node: self.me.clone(),
            props_json: props.map(|p| p.to_json(bucket).to_string()),
        };
        self.cluster.bucket_props.insert(bucket.to_owned(), entry);
        ClientResult::Done
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

    /// The nodes of the current ring (a listing asks each).
    pub(super) fn ring_nodes(&self) -> Vec<NodeId> {
        let nodes = self.cluster.ring.current.nodes();
        nodes.iter().map(|n| n.id.clone()).collect()
    }

    pub(super) fn start_key_listing(&mut self, now: u64, client: ClientRequestId, bucket: String) {
        let cursors = self
            .ring_nodes()
            .into_iter()
            .map(|node| ListCursor {
                node,
                buffer: VecDeque::new(),
                next_after: None,
                more: true,
                fetching: false,
                failed: false,
            })
            .collect();
        let listing = self.next_listing;
        self.next_listing += 1;
        let run = KeyListing {
            client,
            bucket,
            cursors,
            out: Vec::new(),
        };
        self.key_listings.insert(listing, run);
        self.advance_key_listing(now, listing);
    }

    /// Ask `cursor`'s node for its next page (this node's own pages are read at once).
    pub(super) fn fetch_key_page(&mut self, now: u64, listing: u64, cursor: usize) {
        let Some(run) = self.key_listings.get_mut(&listing) else {
            return;
        };
        let c = &mut run.cursors[cursor];
        c.fetching = true;
        let (node, bucket, after) = (c.node.clone(), run.bucket.clone(), c.next_after.clone());
        if node == self.me {
            let page = self.local_key_page(&bucket, after.as_deref(), LIST_PAGE_KEYS);
            self.on_key_page_only(listing, cursor, Some(page));
            return;
        }
        let body = PeerMessage::ListKeys {
            bucket,
            start_after: after,
            limit: LIST_PAGE_KEYS as u32,
        };
        let timeout = self.config.timings.request_ms * 5;
        let purpose = Purpose::KeyPage { listing, cursor };
        self.send_request(now, &node, body, purpose, timeout);
    }

    pub(super) fn on_key_page(
        &mut self,
        now: u64,
        listing: u64,
        cursor: usize,
        page: Option<KeyPage>,
    ) {
        self.on_key_page_only(listing, cursor, page);
        self.advance_key_listing(now, listing);
    }

    /// Fill `cursor` from its page, or leave its node out when it did not answer.
    pub(super) fn on_key_page_only(&mut self, listing: u64, cursor: usize, page: Option<KeyPage>) {
        let Some(run) = self.key_listings.get_mut(&listing) else {
            return;
        };
        let c = &mut run.cursors[cursor];
        c.fetching = false;
        if let Some((keys, next_after)) = page {
            c.buffer.extend(keys);
            c.more = next_after.is_some();
            c.next_after = next_after;
        } else {
            c.failed = true;
            c.more = false;
            c.buffer.clear();
        }
    }

    /// Merge as far as every node's page allows; fetch the pages that ran out; answer pages
    /// of `LIST_PAGE_KEYS` keys, and the last one when every node is exhausted.
    pub(super) fn advance_key_listing(&mut self, now: u64, listing: u64) {
        loop {
            let Some(run) = self.key_listings.get_mut(&listing) else {
                return;
            };
            let empty: Vec<usize> = (0..run.cursors.len())
                .filter(|&i| {
                    let c = &run.cursors[i];
                    c.buffer.is_empty() && c.more && !c.fetching
                })
                .collect();
            if !empty.is_empty() {
                for cursor in empty {
                    self.fetch_key_page(now, listing, cursor);
                }
                continue; // local pages are in; remote ones come back as inputs
            }
            if run.cursors.iter().any(|c| c.fetching) {
                return;
            }
            if run.cursors.iter().all(|c| c.failed) {
                let client = run.client;
                self.key_listings.remove(&listing);
                let message = "key listing: no node answered".to_owned();
                let result = ClientResult::unavailable(message);
                self.outputs.push(Output::Reply { id: client, result });
                return;
            }
            let Some(smallest) = run
                .cursors
                .iter()
                .filter_map(|c| c.buffer.front())
                .min()
                .cloned()
            else {
                let (client, keys) = (run.client, std::mem::take(&mut run.out));
                self.key_listings.remove(&listing);
                let result = ClientResult::Keys { keys, last: true };
                self.outputs.push(Output::Reply { id: client, result });
                return;
            };
            for c in &mut run.cursors {
                if c.buffer.front() == Some(&smallest) {
                    c.buffer.pop_front();
                }
            }
            run.out.push(smallest);
            if run.out.len() >= LIST_PAGE_KEYS {
                let (client, keys) = (run.client, std::mem::take(&mut run.out));
                let result = ClientResult::Keys { keys, last: false };
                self.outputs.push(Output::Reply { id: client, result });
            }
        }
    }

    pub(super) fn start_bucket_listing(&mut self, now: u64, client: ClientRequestId) {
        let nodes = self.ring_nodes();
        let listing = self.next_listing;
        self.next_listing += 1;
        self.bucket_listings.insert(
            listing,
            BucketListing {
                client,
                waiting: nodes.len(),
                answered: 0,
                buckets: BTreeSet::new(),
            },
        );
        let timeout = self.config.timings.request_ms * 5;
        for node in nodes {
            if node == self.me {
                let buckets = self.replica.list_buckets();
                let buckets = self.must(buckets, "list buckets");
                self.on_buckets(listing, Some(buckets));
            } else {
                let purpose = Purpose::Buckets { listing };
                self.send_request(now, &node, PeerMessage::ListBuckets, purpose, timeout);
            }
        }
    }

    /// One node's buckets (or its silence: left out); answer once every node is in.
    pub(super) fn on_buckets(&mut self, listing: u64, buckets: Option<Vec<String>>) {
        let Some(run) = self.bucket_listings.get_mut(&listing) else {
            return;
        };
        run.waiting -= 1;
        if let Some(buckets) = buckets {
            run.answered += 1;
            run.buckets.extend(buckets);
        }
        if run.waiting > 0 {
            return;
        }
        let Some(run) = self.bucket_listings.remove(&listing) else {
            return;
        };
        let result = if run.answered == 0 {
            ClientResult::unavailable("bucket listing: no node answered".into())
        } else {
            ClientResult::Buckets(run.buckets.into_iter().collect())
        };
        self.outputs.push(Output::Reply {
            id: run.client,
            result,
        });
    }

    /// `Cluster::join`: a node alone in its cluster and holding no data asks `via` once.
    pub(super) fn join(&mut self, now: u64, id: ClientRequestId, via: NodeId) {
        let refuse = |message: &str| ClientResult::Failed {
            status: 400,
            message: message.to_owned(),
        };
        let result = if self.cluster.members.len() > 1 {
            Some(refuse(
                "this node is already part of a cluster with other members",
            ))
        } else if self.join_pending || self.join_client.is_some() {
            Some(refuse("a join is already in progress"))
        } else {
            let first = self.replica.scan_objects(None, 1);
            let holds_data = !self.must(first, "scan objects").is_empty();
            holds_data
                .then(|| refuse("this node holds data; only an empty node can join a cluster"))
        };
        if let Some(result) = result {
            self.outputs.push(Output::Reply { id, result });
            return;
        }
        self.join_via = vec![via];
        self.join_attempts = 0;
        self.join_client = Some(id);
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
                    if let Some(to) = request.reply.take() {
                        let result = match (result, &request.machine) {
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

    /// `Cluster::store_replica` without waiting for the outcome (read repair, anti-entropy).
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
            if self.config.handoff_checks_ring {
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

    /// `Cluster::check_orphan`: a write stored here for a key this node no longer replicates
    /// (settled ring) asks for another cleanup.
    pub(super) fn check_orphan(&mut self, bucket: &str, key: &str) {
        let partition = self.partition_of(bucket, key);
        let n_val = self.n_val(bucket);
        self.cleanup_marker
            .on_stored(&self.cluster, &self.me, partition, n_val);
    }
}

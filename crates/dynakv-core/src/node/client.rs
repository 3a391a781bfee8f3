//! The client side of a `Node`: gets, puts (coordinated here or forwarded), bucket
//! properties, join and leave, key and bucket listings.
//!
//! Invariants: a put is coordinated only by a primary of the key, which writes its own copy
//! first (durably, before sending it on, when the write is durable); a client is answered
//! once per request (a key listing in pages, the last marked).

use super::{
    AfterSync, BTreeSet, BucketListing, BucketProps, BucketPropsEntry, ClientOp, ClientRequestId,
    ClientResult, GetCoord, GetCoordinator, GetStep, KeyListing, KeyPage, LIST_PAGE_KEYS,
    ListCursor, LocalWrite, Node, NodeId, Object, Output, PeerMessage, Purpose, PutCoord,
    PutCoordinator, PutForward, PutOp, PutPolicy, PutRoute, PutSend, PutStep, Quorum, ReplicaPlan,
    ReplyTo, StoreDurability, VecDeque, Writer, encode_clock, keys,
};

impl Node {
    // ----- client requests -----

    pub(super) fn replica_plan(&self, now: u64, bucket: &str, key: &str) -> ReplicaPlan {
        let partition = self.partition_of(bucket, key);
        ReplicaPlan::new(&self.cluster, partition, self.n_val(bucket), |node| {
            self.is_up(now, node)
        })
    }

    pub(super) fn on_client(&mut self, now: u64, id: ClientRequestId, op: ClientOp) {
        match op {
            ClientOp::Get { bucket, key, r, pr } => {
                self.start_get(now, ReplyTo::Client(id), &bucket, &key, (r, pr));
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
                let props = self.props(&op.bucket);
                let primaries = self.replica_plan(now, &op.bucket, &op.key).primaries;
                let forward = match PutForward::route(&primaries, &self.me, |n| self.is_up(now, n))
                {
                    PutRoute::Coordinate => {
                        self.coordinate_put(now, ReplyTo::Client(id), op);
                        return;
                    }
                    PutRoute::Forward(forward) => forward,
                };
                // As the server: W and PW resolved here against the preference list.
                let n = primaries.len() as u32;
                let body = PeerMessage::CoordinatePut {
                    bucket: op.bucket,
                    key: op.key,
                    context: op.context.as_ref().map(|c| {
                        let mut writer = Writer::default();
                        encode_clock(&mut writer, c);
                        writer.buf
                    }),
                    content: op.content,
                    w: op.w.map(|w| w.resolve(n, props.w)),
                    pw: op.pw.map(|pw| pw.resolve(n, props.pw)),
                    dw_given: op.dw_given,
                    precondition: op.precondition.into(),
                    now_ms: now,
                    ring_version: self.cluster.ring.version,
                };
                self.forward(now, id, forward, body);
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

    /// Forward a put to the next candidate primary (the core's `PutForward`), or answer the
    /// client when every one was tried.
    pub(super) fn forward(
        &mut self,
        now: u64,
        client: ClientRequestId,
        mut forward: PutForward,
        body: PeerMessage,
    ) {
        let Some(to) = forward.next_candidate() else {
            let message = format!("no coordinator: {}", forward.last_error());
            self.outputs.push(Output::Reply {
                id: client,
                result: ClientResult::unavailable(message),
            });
            return;
        };
        let purpose = Purpose::Forward {
            client,
            forward,
            body: Box::new(body.clone()),
        };
        let timeout = self.config.timings.forward_ms;
        self.send_request(now, &to, body, purpose, timeout);
    }

    pub(super) fn start_get(
        &mut self,
        now: u64,
        reply: ReplyTo,
        bucket: &str,
        key: &str,
        (r, pr): (Option<Quorum>, Option<Quorum>),
    ) {
        let props = self.props(bucket);
        let plan = self.replica_plan(now, bucket, key);
        let n = plan.primaries.len() as u32;
        let needed = r.unwrap_or(Quorum::Default).resolve(n, props.r).min(n) as usize;
        let needed_primaries = pr.unwrap_or(Quorum::Default).resolve(n, props.pr).min(n) as usize;
        let (coordinator, fetches) = match GetCoordinator::start(&plan, needed, needed_primaries) {
            Ok(started) => started,
            Err(e) => {
                let message = format!("quorum not met: {e}");
                self.answer(reply, ClientResult::unavailable(message));
                return;
            }
        };
        let coord = self.next_coord;
        self.next_coord += 1;
        self.gets.insert(
            coord,
            GetCoord {
                bucket: bucket.to_owned(),
                key: key.to_owned(),
                coordinator,
                reply: Some(reply),
            },
        );
        for slot in fetches {
            if slot.node == self.me {
                let local = self.local_with_hint(bucket, key, slot.stands_in_for.as_ref());
                self.on_get_reply(now, coord, &slot.node, local);
            } else {
                let body = self.replica_get(bucket, key, slot.stands_in_for.as_ref());
                let timeout = self.config.timings.request_ms;
                self.send_request(now, &slot.node, body, Purpose::GetFetch { coord }, timeout);
            }
        }
    }

    pub(super) fn on_get_reply(
        &mut self,
        now: u64,
        coord: u64,
        from: &NodeId,
        reply: Result<Option<Object>, ()>,
    ) {
        let Some(mut get) = self.gets.remove(&coord) else {
            return;
        };
        let steps = get.coordinator.on_reply(from, reply);
        let (bucket, key) = (get.bucket.clone(), get.key.clone());
        let mut to = None;
        if steps.iter().any(|s| matches!(s, GetStep::Answer(_))) {
            to = get.reply.take();
        }
        if !get.coordinator.finished() {
            self.gets.insert(coord, get);
        }
        for step in steps {
            match step {
                GetStep::Answer(result) => {
                    if let Some(to) = to.take() {
                        let result = match result {
                            Ok(object) => ClientResult::Got(object),
                            Err(e) => ClientResult::unavailable(format!("quorum not met: {e}")),
                        };
                        self.answer(to, result);
                    }
                }
                GetStep::Repair { merged, targets } => {
                    for node in targets {
                        if self.failed.is_some() {
                            return;
                        }
                        self.stats.read_repairs += 1;
                        self.store_replica(now, &node, &bucket, &key, &merged);
                    }
                }
            }
        }
    }

    /// `Cluster::store_replica` without waiting for the outcome.
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
            let body = self.replica_put(bucket, key, object, durability);
            let timeout = self.config.timings.request_ms;
            self.send_request(now, node, body, Purpose::Store, timeout);
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

    /// `Cluster::coordinate_put`: store locally, replicate, and re-plan once when the quorum
    /// failed and the ring version changed meanwhile.
    pub(super) fn coordinate_put(&mut self, now: u64, reply: ReplyTo, op: PutOp) {
        let props = self.props(&op.bucket);
        let plan = self.replica_plan(now, &op.bucket, &op.key);
        let n = plan.primaries.len() as u32;
        let w = op.w.unwrap_or(Quorum::Default).resolve(n, props.w).min(n) as usize;
        let pw = op.pw.unwrap_or(Quorum::Default).resolve(n, props.pw).min(n) as usize;
        let durability = if op.dw_given {
            StoreDurability::Fsync
        } else {
            props.durability
        };
        let (bucket, key) = (op.bucket.clone(), op.key.clone());
        let stored = match self.write_local(now, op, &props, StoreDurability::Buffered) {
            Ok(stored) => stored,
            Err(result) => {
                self.answer(reply, result);
                return;
            }
        };
        let planned_at = Some(self.cluster.ring.version);
        let write = LocalWrite {
            bucket,
            key,
            stored,
            w,
            pw,
            durability,
        };
        if durability == StoreDurability::Fsync {
            // As the server: the coordinator's own copy is durable before it is sent on.
            let action = AfterSync::Replicate {
                reply,
                write,
                plan,
                planned_at,
            };
            self.after_sync(action);
        } else {
            self.replicate(now, reply, write, plan, planned_at);
        }
    }

    /// `Cluster::replicate`: the core `PutCoordinator` plans the sends (the plan's slots and
    /// the next preference list), the hints and the answer (W of the current slots and W of
    /// the next list); this node performs its steps.
    pub(super) fn replicate(
        &mut self,
        now: u64,
        reply: ReplyTo,
        write: LocalWrite,
        plan: ReplicaPlan,
        planned_at: Option<u64>,
    ) {
        let policy = PutPolicy {
            w: write.w,
            pw: write.pw,
            buffered: write.durability == StoreDurability::Buffered,
        };
        let (coordinator, steps) = PutCoordinator::start(&self.me, plan, policy);
        let coord = self.next_coord;
        self.next_coord += 1;
        self.puts.insert(
            coord,
            PutCoord {
                write,
                coordinator,
                reply: Some(reply),
                planned_at,
            },
        );
        self.put_steps(now, coord, steps);
    }

    /// Perform a put coordinator's steps (answers and sends first, hints after, as the
    /// server's `PutRun` does); forget the put once every send came back.
    pub(super) fn put_steps(&mut self, now: u64, coord: u64, mut steps: Vec<PutStep>) {
        let Some(put) = self.puts.get(&coord) else {
            return;
        };
        let write = put.write.clone();
        let finished = put.coordinator.finished();
        steps.sort_by_key(|step| matches!(step, PutStep::KeepHint { .. }));
        for step in steps {
            match step {
                PutStep::Send(send) => self.send_put(now, coord, send, &write),
                PutStep::KeepHint { target } => {
                    self.keep_hint(&target, &write);
                }
                PutStep::Answer(result) => {
                    self.put_done(now, coord, result.map_err(|e| e.to_string()));
                }
            }
        }
        if finished {
            self.puts.remove(&coord);
        }
    }

    /// The first replication round's outcome (`coordinate_put` after `replicate` returned):
    /// check for an orphan write, re-plan once when the quorum failed under a ring that has
    /// changed since, else answer.
    pub(super) fn put_done(&mut self, now: u64, coord: u64, result: Result<(), String>) {
        let Some(put) = self.puts.get_mut(&coord) else {
            return;
        };
        let Some(to) = put.reply.take() else {
            return;
        };
        let (write, planned_at) = (put.write.clone(), put.planned_at);
        if planned_at.is_some() {
            self.check_orphan(&write.bucket, &write.key);
        }
        match result {
            Err(_) if planned_at.is_some_and(|v| v != self.cluster.ring.version) => {
                // The ring changed while the write was replicated (a replica answered
                // `StaleRing`): send the same stored version again under the new plan.
                self.stats.replans += 1;
                let plan = self.replica_plan(now, &write.bucket, &write.key);
                self.replicate(now, to, write, plan, None);
            }
            Ok(()) => self.answer(to, ClientResult::Put(write.stored)),
            Err(e) => self.answer(
                to,
                ClientResult::unavailable(format!("quorum not met: {e}")),
            ),
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

    pub(super) fn send_put(&mut self, now: u64, coord: u64, send: PutSend, write: &LocalWrite) {
        let (bucket, key, object) = (&write.bucket, &write.key, &write.stored);
        let body = match &send.stands_in_for {
            None => {
                let durability = if send.fsync {
                    StoreDurability::Fsync
                } else {
                    write.durability
                };
                self.replica_put(bucket, key, object, durability)
            }
            Some(primary) => PeerMessage::HintedPut {
                target: primary.0.clone(),
                bucket: bucket.clone(),
                key: key.clone(),
                object: object.encode(),
                durability: write.durability,
                ring_version: self.cluster.ring.version,
            },
        };
        let node = send.node.clone();
        let timeout = self.config.timings.request_ms;
        self.send_request(now, &node, body, Purpose::PutSend { coord, send }, timeout);
    }

    pub(super) fn on_put_reply(&mut self, now: u64, coord: u64, send: &PutSend, ok: bool) {
        let Some(put) = self.puts.get_mut(&coord) else {
            return;
        };
        let steps = put.coordinator.on_reply(send, ok);
        self.put_steps(now, coord, steps);
    }
}

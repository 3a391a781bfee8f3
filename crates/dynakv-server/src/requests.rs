//! The data plane's driver: a client's get or put (and a put a peer forwarded here) runs the
//! core's request machine (`dynakv_core::request`, the one the simulator's nodes run) in the
//! task of its HTTP request; this module only performs its steps.
//!
//! - `Step::Send` goes out as a peer request, a future the request's task polls (no task per
//!   send); its reply (or transport failure, or timeout) is fed to the machine; a `StaleRing`
//!   answer is merged into this node's state first.
//! - Local steps (read, merge, the coordinator's write, a hint) run on the replica, on the
//!   blocking pool when the engine may wait on the disk; a durable write awaits the flusher's
//!   group commit (`Cluster::run_write`).
//! - The client is answered at `Step::Answer`; what the machine still has to do after that
//!   (sends beyond W and their hints, read repair) goes on in a detached task until it is
//!   `finished`.

use crate::replica::{ReplicaRun, WriteRequest};
use crate::transport::TransportError;
use crate::view::Cluster;
use dynakv_core::bucket::{BucketProps, Quorum};
use dynakv_core::listing::{BucketListing, KeyListing, ListEvent, ListStep, Listing};
use dynakv_core::membership::ClusterState;
use dynakv_core::message::PeerMessage;
use dynakv_core::object::Object;
use dynakv_core::request::{
    Event, ForwardRefused, GetRequest, Machine, PutOp, PutRequest, Reply, RequestError, Step, Tag,
    View,
};
use dynakv_core::ring::NodeId;
use futures_util::FutureExt as _;
use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// The node as a request machine sees it: a snapshot of the cluster state taken for one call.
struct ServerView<'a> {
    cluster: &'a Cluster,
    state: Arc<ClusterState>,
}

impl<'a> ServerView<'a> {
    fn of(cluster: &'a Cluster) -> ServerView<'a> {
        ServerView {
            cluster,
            state: cluster.state(),
        }
    }
}

impl View for ServerView<'_> {
    fn me(&self) -> &NodeId {
        self.cluster.me()
    }

    fn state(&self) -> &ClusterState {
        &self.state
    }

    fn props(&self, bucket: &str) -> BucketProps {
        self.cluster.bucket_props(bucket)
    }

    fn is_up(&self, node: &NodeId) -> bool {
        self.cluster.is_up(node)
    }

    fn request_timeout_ms(&self) -> u64 {
        millis(self.cluster.timeouts().request)
    }

    fn forward_timeout_ms(&self) -> u64 {
        millis(self.cluster.timeouts().forward())
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A quorum read of `bucket/key` (`r`, `pr`: `None` is the bucket's), as a client sees it:
/// values that expired by this node's clock are left out (`Object::unexpired`).
pub async fn get(
    cluster: &Arc<Cluster>,
    bucket: &str,
    key: &str,
    r: Option<Quorum>,
    pr: Option<Quorum>,
) -> Result<Object, RequestError> {
    let (machine, steps) = GetRequest::start(&ServerView::of(cluster), bucket, key, (r, pr));
    let object = Driver::new(cluster, Machine::Get(machine))
        .run(steps)
        .await?;
    Ok(object.unexpired(cluster.now_ms()))
}

/// A client's write (a put or a delete), stamped `now_ms`: coordinated here when this node is
/// a primary of the key, else forwarded to one.
pub async fn put(cluster: &Arc<Cluster>, op: PutOp, now_ms: u64) -> Result<Object, RequestError> {
    let (machine, steps) = PutRequest::start(&ServerView::of(cluster), op, now_ms);
    Driver::new(cluster, Machine::Put(machine)).run(steps).await
}

/// The quorums of a client's delete (`None`: the bucket's).
#[derive(Debug, Clone, Copy, Default)]
pub struct DeleteQuorums {
    pub r: Option<Quorum>,
    pub pr: Option<Quorum>,
    pub w: Option<Quorum>,
    pub pw: Option<Quorum>,
    /// Riak's quorum for both halves of a delete: the read's `r` and the write's `w` where
    /// those are not given.
    pub rw: Option<Quorum>,
    pub dw_given: bool,
}

/// A client's delete of `bucket/key` (HTTP and PB): a quorum read, then a tombstone written
/// with the client's context, or without one with the context of what the replicas hold now
/// (as Riak does). `Ok(false)`: there was nothing live to delete, and nothing was written.
pub async fn delete(
    cluster: &Arc<Cluster>,
    (bucket, key): (String, String),
    context: Option<dynakv_core::version::VersionVector>,
    quorums: DeleteQuorums,
) -> Result<bool, RequestError> {
    let existing = get(cluster, &bucket, &key, quorums.r.or(quorums.rw), quorums.pr).await?;
    if existing.is_deleted() {
        return Ok(false);
    }
    let context = context.unwrap_or_else(|| existing.clock().clone());
    let mut op = PutOp::tombstone(&bucket, &key, context);
    op.w = quorums.w.or(quorums.rw);
    op.pw = quorums.pw;
    op.dw_given = quorums.dw_given;
    put(cluster, op, cluster.now_ms()).await?;
    Ok(true)
}

/// Whether to coordinate a put a peer forwarded here: the core's `accept_forwarded` at this
/// node's wall clock.
pub fn accept_forwarded(
    cluster: &Cluster,
    message: PeerMessage,
    clock_offset_ms: i64,
    limit_ms: u64,
) -> Result<(PutOp, u64), ForwardRefused> {
    let view = ServerView::of(cluster);
    dynakv_core::request::accept_forwarded(
        &view,
        message,
        cluster.now_ms(),
        clock_offset_ms,
        Some(limit_ms),
    )
}

/// A write a peer forwarded here, which this node coordinates (the forward's checks passed).
pub async fn coordinate(
    cluster: &Arc<Cluster>,
    op: PutOp,
    now_ms: u64,
) -> Result<Object, RequestError> {
    let (machine, steps) = PutRequest::coordinate(&ServerView::of(cluster), op, now_ms);
    Driver::new(cluster, Machine::Put(machine)).run(steps).await
}

/// A send of a request's machine: its tag (`None`: no reply is awaited) and the reply.
type SendFuture = Pin<Box<dyn Future<Output = Option<(Tag, Reply)>> + Send>>;

/// One request's machine and its sends in flight. The sends are polled by the request's own
/// task, not spawned: each is polled once when it is made (which queues its frame on the
/// peer's connection), then whenever the request waits for a reply.
struct Driver {
    cluster: Arc<Cluster>,
    machine: Machine,
    sends: FuturesUnordered<SendFuture>,
    /// Replies that came back at the first poll of their send (the peer has no address, or
    /// its connection is gone).
    ready: VecDeque<(Tag, Reply)>,
    answer: Option<Result<Object, RequestError>>,
}

impl Driver {
    fn new(cluster: &Arc<Cluster>, machine: Machine) -> Driver {
        Driver {
            cluster: Arc::clone(cluster),
            machine,
            sends: FuturesUnordered::new(),
            ready: VecDeque::new(),
            answer: None,
        }
    }

    /// Perform `steps` and what follows until the answer; the rest goes on detached.
    async fn run(mut self, steps: Vec<Step>) -> Result<Object, RequestError> {
        self.perform(steps).await;
        while self.answer.is_none() && self.next().await {}
        let answer = self.answer.take();
        if !self.sends.is_empty() || !self.ready.is_empty() {
            // Sends beyond the quorum (and their hints, read repair) finish after the answer;
            // a send no reply is awaited for is still driven when the machine is done.
            tokio::spawn(async move { while self.next().await {} });
        }
        answer.unwrap_or_else(|| {
            Err(RequestError::Internal(
                "the request ended unanswered".into(),
            ))
        })
    }

    /// Feed the next reply to the machine (dropped once it is finished); `false` when none
    /// can come.
    async fn next(&mut self) -> bool {
        let (tag, reply) = match self.ready.pop_front() {
            Some(ready) => ready,
            None => loop {
                match self.sends.next().await {
                    None => return false,
                    Some(Some(reply)) => break reply,
                    // A send no reply is awaited for ended.
                    Some(None) => {}
                }
            },
        };
        if self.machine.finished() {
            return true;
        }
        let steps = self
            .machine
            .handle(&ServerView::of(&self.cluster), Event::Reply { tag, reply });
        self.perform(steps).await;
        true
    }

    /// Perform steps in order; a local step's outcome is fed back at once and what it returns
    /// is performed before the next step.
    async fn perform(&mut self, steps: Vec<Step>) {
        let mut queue: std::collections::VecDeque<Step> = steps.into();
        while let Some(step) = queue.pop_front() {
            let Some(event) = self.step(step).await else {
                continue;
            };
            let steps = self.machine.handle(&ServerView::of(&self.cluster), event);
            for step in steps.into_iter().rev() {
                queue.push_front(step);
            }
        }
    }

    /// Perform one step; the event to feed back at once, if any.
    async fn step(&mut self, step: Step) -> Option<Event> {
        let cluster = &self.cluster;
        match step {
            Step::Send {
                tag,
                to,
                message,
                timeout_ms,
            } => {
                let cluster = Arc::clone(cluster);
                let timeout = Duration::from_millis(timeout_ms);
                let mut sending: SendFuture = Box::pin(async move {
                    let reply = send(&cluster, &to, message, timeout).await;
                    tag.map(|tag| (tag, reply))
                });
                match sending.as_mut().now_or_never() {
                    Some(Some(reply)) => self.ready.push_back(reply),
                    Some(None) => {}
                    None => self.sends.push(sending),
                }
                None
            }
            Step::ReadLocal {
                tag,
                bucket,
                key,
                hinted_for,
            } => {
                let replica = Arc::clone(cluster.replica());
                let read = cluster
                    .replica()
                    .run(None, move || {
                        replica.get_with_hint(
                            &bucket,
                            &key,
                            hinted_for.as_ref().map(|n| n.0.as_str()),
                        )
                    })
                    .await;
                let result = match read {
                    Ok(Ok(object)) => Ok(object),
                    _ => Err(()),
                };
                Some(Event::Read { tag, result })
            }
            Step::MergeLocal {
                bucket,
                key,
                object,
            } => {
                let props = cluster.bucket_props(&bucket);
                let durability = props.durability;
                // Boxed, as the hint below: a rare step's future would size every request's.
                if let Err(e) =
                    Box::pin(cluster.merge_local(&bucket, &key, &object, &props, durability)).await
                {
                    tracing::debug!(bucket, key, error = %e, "read repair of this node's copy failed");
                }
                None
            }
            Step::Write {
                op,
                durability,
                now_ms,
            } => {
                let props = cluster.bucket_props(&op.bucket);
                let replica = Arc::clone(cluster.replica());
                let wall_ms = cluster.now_ms();
                let written = cluster
                    .run_write(
                        durability,
                        move |durability| {
                            let content = op.content.into_content(now_ms, wall_ms);
                            replica.write(WriteRequest {
                                bucket: &op.bucket,
                                key: &op.key,
                                context: op.context,
                                content,
                                props: &props,
                                durability,
                                precondition: op.precondition,
                                now_ms,
                                wall_ms,
                            })
                        },
                        |_| true,
                    )
                    .await;
                let result = match written {
                    Ok(Ok(stored)) => Ok(stored),
                    Ok(Err(e)) => Err(RequestError::Replica(e)),
                    Err(e) => Err(RequestError::Internal(e.to_string())),
                };
                Some(Event::Written(result))
            }
            Step::KeepHint {
                target,
                bucket,
                key,
                object,
                durability,
            } => {
                Box::pin(cluster.keep_hint(&target, &bucket, &key, &object, durability)).await;
                None
            }
            Step::CheckOrphan { bucket, key } => {
                let n_val = cluster.bucket_props(&bucket).n_val;
                cluster.check_orphan(&bucket, &key, n_val);
                None
            }
            Step::Replanned => {
                tracing::debug!("a write's quorum failed under a changed ring: re-planned");
                None
            }
            Step::Answer(result) => {
                if self.answer.is_none() {
                    self.answer = Some(result);
                }
                None
            }
        }
    }
}

/// Send one request of a machine and classify the outcome: a `StaleRing` answer is merged
/// into this node's state (the machine sees the newer ring at its next step).
async fn send(cluster: &Cluster, to: &NodeId, message: PeerMessage, timeout: Duration) -> Reply {
    let Some(addr) = cluster.peer_address(to) else {
        return Reply::NotSent(format!("no address for node {to}"));
    };
    let timed = dynakv_core::pbs::kind_of(&message).map(|kind| (kind, std::time::Instant::now()));
    match cluster.client().request(addr, message, timeout).await {
        Ok(reply) => {
            if let Some((kind, sent)) = timed
                && dynakv_core::pbs::answered(kind, &reply)
            {
                cluster.record_round_trip(kind, sent.elapsed());
            }
            cluster.observe_contact(to);
            if let PeerMessage::StaleRing(state) = &reply
                && let Err(e) = Box::pin(cluster.merge_peer_state(state)).await
            {
                tracing::warn!(node = %to, error = %e, "cannot merge a replica's newer state");
            }
            Reply::Message(reply)
        }
        Err(e @ (TransportError::Timeout { .. } | TransportError::ConnectionLost { .. })) => {
            Reply::Unanswered(format!(
                "{to} did not answer ({e}); the write may or may not have been applied"
            ))
        }
        Err(e) => Reply::NotSent(format!("{to}: {e}")),
    }
}

/// Every live key of `bucket` across the ring's nodes, deduplicated and in key order, sent in
/// pages to `pages` (the core's `KeyListing`). A node that cannot be reached is left out; the
/// listing fails only when no node answers. Memory is one page per node; a slow reader of
/// `pages` holds the listing back.
pub async fn list_keys(
    cluster: &Arc<Cluster>,
    bucket: &str,
    pages: mpsc::Sender<Vec<String>>,
) -> Result<(), RequestError> {
    let (listing, steps) = KeyListing::start(&ServerView::of(cluster), bucket);
    let mut driver = ListDriver::new(cluster, Listing::Keys(listing), Some(pages));
    driver.run(steps).await.map(|_| ())
}

/// Every bucket holding an object on a node of the ring (the core's `BucketListing`).
pub async fn list_buckets(cluster: &Arc<Cluster>) -> Result<Vec<String>, RequestError> {
    let (listing, steps) = BucketListing::start(&ServerView::of(cluster));
    let mut driver = ListDriver::new(cluster, Listing::Buckets(listing), None);
    driver.run(steps).await
}

/// One listing's machine, the replies of its sends, and where its pages go.
struct ListDriver {
    cluster: Arc<Cluster>,
    listing: Listing,
    replies: mpsc::UnboundedReceiver<(Tag, Reply)>,
    reply_to: mpsc::UnboundedSender<(Tag, Reply)>,
    pages: Option<mpsc::Sender<Vec<String>>>,
    outstanding: usize,
    /// The listing ended: the buckets (empty for a key listing), or its failure.
    outcome: Option<Result<Vec<String>, RequestError>>,
}

impl ListDriver {
    fn new(
        cluster: &Arc<Cluster>,
        listing: Listing,
        pages: Option<mpsc::Sender<Vec<String>>>,
    ) -> ListDriver {
        let (reply_to, replies) = mpsc::unbounded_channel();
        ListDriver {
            cluster: Arc::clone(cluster),
            listing,
            replies,
            reply_to,
            pages,
            outstanding: 0,
            outcome: None,
        }
    }

    async fn run(&mut self, steps: Vec<ListStep>) -> Result<Vec<String>, RequestError> {
        self.perform(steps).await;
        while self.outcome.is_none() && self.outstanding > 0 {
            let Some((tag, reply)) = self.replies.recv().await else {
                break;
            };
            self.outstanding -= 1;
            let steps = self.handle(ListEvent::Reply { tag, reply });
            self.perform(steps).await;
        }
        self.outcome
            .take()
            .unwrap_or_else(|| Err(RequestError::Internal("the listing ended early".into())))
    }

    fn handle(&mut self, event: ListEvent) -> Vec<ListStep> {
        self.listing.handle(&ServerView::of(&self.cluster), event)
    }

    async fn perform(&mut self, steps: Vec<ListStep>) {
        let mut queue: std::collections::VecDeque<ListStep> = steps.into();
        while let Some(step) = queue.pop_front() {
            let event = match step {
                ListStep::Send {
                    tag,
                    to,
                    message,
                    timeout_ms,
                } => {
                    let cluster = Arc::clone(&self.cluster);
                    let reply_to = self.reply_to.clone();
                    self.outstanding += 1;
                    tokio::spawn(async move {
                        let timeout = Duration::from_millis(timeout_ms);
                        let reply = send(&cluster, &to, message, timeout).await;
                        if let Reply::NotSent(e) | Reply::Unanswered(e) = &reply {
                            tracing::warn!(node = %to, error = %e, "listing: node left out");
                        }
                        let _ = reply_to.send((tag, reply));
                    });
                    None
                }
                ListStep::ReadLocalPage {
                    tag,
                    bucket,
                    start_after,
                    limit,
                } => {
                    let page = self
                        .cluster
                        .local_key_page(&bucket, start_after.as_deref(), limit)
                        .await;
                    let page = page
                        .map_err(
                            |e| tracing::warn!(error = %e, "listing: this node's keys left out"),
                        )
                        .ok();
                    Some(ListEvent::Page { tag, page })
                }
                ListStep::ReadLocalBuckets { tag } => {
                    let replica = Arc::clone(self.cluster.replica());
                    let buckets = tokio::task::spawn_blocking(move || replica.list_buckets()).await;
                    let buckets = match buckets {
                        Ok(Ok(buckets)) => Some(buckets),
                        Ok(Err(e)) => {
                            tracing::warn!(error = %e, "listing: this node's buckets left out");
                            None
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "listing: this node's buckets left out");
                            None
                        }
                    };
                    Some(ListEvent::Buckets { tag, buckets })
                }
                ListStep::Keys { keys, last } => {
                    if !keys.is_empty()
                        && let Some(pages) = &self.pages
                        && pages.send(keys).await.is_err()
                    {
                        // The reader went away: nothing more to list for.
                        self.outcome = Some(Ok(Vec::new()));
                        return;
                    }
                    if last {
                        self.outcome = Some(Ok(Vec::new()));
                    }
                    None
                }
                ListStep::Buckets(buckets) => {
                    self.outcome = Some(Ok(buckets));
                    None
                }
                ListStep::Failed(e) => {
                    self.outcome = Some(Err(e));
                    None
                }
            };
            if let Some(event) = event {
                for step in self.handle(event).into_iter().rev() {
                    queue.push_front(step);
                }
            }
        }
    }
}

/// One page of a secondary index query over the ring (the core's `index::coverage_plan` and
/// `merge_pages`): each partition asked once, of a replica that is up (this node first), all
/// at once; the merged first `query.limit` results and whether more may follow. A partition
/// no replica that is up holds, or a node that does not answer for its partitions, fails the
/// query (503) rather than leaving their keys out.
///
/// # Errors
/// `Unavailable` as above, `Internal` for an answer that is not a page.
pub async fn index_page(
    cluster: &Arc<Cluster>,
    query: &dynakv_core::index::Query,
) -> Result<(Vec<dynakv_core::index::Hit>, bool), RequestError> {
    use dynakv_core::index;
    let state = cluster.state();
    let n_val = cluster.bucket_props(&query.bucket).n_val;
    let plan = index::coverage_plan(&state, n_val, cluster.me(), |n| cluster.is_up(n)).map_err(
        |uncovered| {
            RequestError::Unavailable(format!(
                "no replica that is up holds partitions {uncovered:?}: the query would miss \
                 their keys"
            ))
        },
    )?;
    let count = state.ring.current.partition_count();
    let timeout = Duration::from_millis(millis(cluster.timeouts().request).saturating_mul(5));
    let asks = plan.into_iter().map(|(node, partitions)| {
        let message = query.message(partitions, count);
        let cluster = Arc::clone(cluster);
        async move {
            let reply = if &node == cluster.me() {
                let replica = Arc::clone(cluster.replica());
                match tokio::task::spawn_blocking(move || index::answer(&replica, message)).await {
                    Ok(answer) => Reply::Message(answer),
                    Err(e) => Reply::NotSent(e.to_string()),
                }
            } else {
                send(&cluster, &node, message, timeout).await
            };
            (node, reply)
        }
    });
    let mut pages = Vec::new();
    for (node, reply) in futures_util::future::join_all(asks).await {
        match reply {
            Reply::Message(PeerMessage::IndexPage { hits }) => {
                // A page past its limit, or out of order, is not taken.
                if hits.len() > query.limit || hits.windows(2).any(|w| w[0] >= w[1]) {
                    return Err(RequestError::Internal(format!(
                        "{node} answered a malformed index page"
                    )));
                }
                pages.push(hits);
            }
            Reply::Message(PeerMessage::Error(e)) => {
                return Err(RequestError::Unavailable(format!("{node}: {e}")));
            }
            Reply::Message(other) => {
                return Err(RequestError::Internal(format!(
                    "{node} answered {} to an index query",
                    other.name()
                )));
            }
            Reply::NotSent(e) | Reply::Unanswered(e) => {
                return Err(RequestError::Unavailable(format!(
                    "the index query could not cover the partitions of {node}: {e}"
                )));
            }
        }
    }
    Ok(index::merge_pages(pages, query.limit))
}

/// Merge a restored object (a backup's: its clock, siblings and tombstones as stored) into
/// every primary of its key that is up, as read repair does: each replica keeps the causal
/// merge of what it holds and what arrives (`Object::sync`), so a restore never replaces
/// newer data and running it twice changes nothing. `Ok(n)`: stored on `n` primaries, at
/// least the bucket's W.
///
/// # Errors
/// Fewer than W primaries stored it (down, or refused), with their reasons.
pub async fn restore_object(
    cluster: &Arc<Cluster>,
    bucket: &str,
    key: &str,
    object: &Object,
) -> Result<usize, String> {
    let (bucket_type, _) = dynakv_core::bucket_types::split_bucket(bucket);
    if bucket_type != dynakv_core::bucket_types::DEFAULT_TYPE
        && !dynakv_core::bucket_types::is_active(&cluster.state(), bucket_type)
    {
        return Err(format!(
            "bucket type {bucket_type} is not active in this cluster: create and activate it \
             (with the same properties) before restoring"
        ));
    }
    let props = cluster.bucket_props(bucket);
    let primaries = cluster.preflist(bucket, key);
    let n = u32::try_from(primaries.len()).unwrap_or(u32::MAX);
    let needed = props.w.resolve(n, Quorum::Quorum).clamp(1, n.max(1));
    let state = cluster.state();
    let timeout = cluster.timeouts().request;
    // Encoded once, sent to every other primary.
    let message = dynakv_core::request::replica_put(&state, bucket, key, object, props.durability);
    let stores = primaries.into_iter().map(|(_, node)| {
        let (props, message) = (&props, &message);
        async move {
            if &node == cluster.me() {
                return cluster
                    .merge_local(bucket, key, object, props, props.durability)
                    .await
                    .map_err(|e| format!("{node}: {e}"));
            }
            if !cluster.is_up(&node) {
                return Err(format!("{node} is down"));
            }
            match send(cluster, &node, message.clone(), timeout).await {
                Reply::Message(PeerMessage::Ack) => Ok(()),
                Reply::Message(other) => Err(format!("{node} answered {}", other.name())),
                Reply::NotSent(e) | Reply::Unanswered(e) => Err(e),
            }
        }
    });
    let outcomes = futures_util::future::join_all(stores).await;
    let stored = outcomes.iter().filter(|o| o.is_ok()).count();
    if u32::try_from(stored).unwrap_or(u32::MAX) >= needed {
        Ok(stored)
    } else {
        let reasons: Vec<String> = outcomes.into_iter().filter_map(Result::err).collect();
        Err(format!(
            "stored on {stored} of {n} primaries, {needed} needed: {}",
            reasons.join("; ")
        ))
    }
}

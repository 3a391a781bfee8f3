//! The data plane's listings: every live key of a bucket across the ring's nodes (a k-way
//! merge of each node's pages, deduplicated, in key order, answered in pages), and every
//! bucket holding an object on a node of the ring. Sans-IO machines driven like
//! `crate::request`'s, by the simulator's `Node` and by the server.
//!
//! Invariants:
//! - memory is one page per node plus the page being filled: a node is asked for its next
//!   page only once the previous one is merged;
//! - a node that does not answer is left out (its keys have other replicas); the listing fails
//!   only when no node is left;
//! - the answer ends exactly once: the last page (`last`), the bucket list, or the failure.

use crate::limits::LIST_PAGE_KEYS;
use crate::message::PeerMessage;
use crate::request::{Reply, RequestError, Tag, View};
use crate::ring::NodeId;
use std::collections::{BTreeSet, VecDeque};

/// A page of keys and where the next one starts (`None`: the node's bucket is exhausted).
pub type KeyPage = (Vec<String>, Option<String>);

/// What a listing asks its driver to do.
#[derive(Debug)]
pub enum ListStep {
    /// Send `message` to `to` (never this node) and feed the outcome back as
    /// [`ListEvent::Reply`] with `tag`.
    Send {
        tag: Tag,
        to: NodeId,
        message: PeerMessage,
        timeout_ms: u64,
    },
    /// Read this node's page of `bucket`'s live keys after `start_after` (at most `limit`)
    /// and feed it back as [`ListEvent::Page`] with `tag`.
    ReadLocalPage {
        tag: Tag,
        bucket: String,
        start_after: Option<String>,
        limit: usize,
    },
    /// Read this node's buckets and feed them back as [`ListEvent::Buckets`] with `tag`.
    ReadLocalBuckets { tag: Tag },
    /// A page of the key listing; the last has `last`.
    Keys { keys: Vec<String>, last: bool },
    /// The bucket listing.
    Buckets(Vec<String>),
    /// The listing failed (no node answered).
    Failed(RequestError),
}

/// An outcome fed back to a listing.
#[derive(Debug)]
pub enum ListEvent {
    /// The outcome of [`ListStep::Send`] `tag`.
    Reply { tag: Tag, reply: Reply },
    /// This node's page for [`ListStep::ReadLocalPage`] `tag` (`None`: the read failed).
    Page { tag: Tag, page: Option<KeyPage> },
    /// This node's buckets for [`ListStep::ReadLocalBuckets`] `tag` (`None`: the read
    /// failed).
    Buckets {
        tag: Tag,
        buckets: Option<Vec<String>>,
    },
}

/// The timeout of one listing request: a node's page may need a long scan.
fn listing_timeout_ms(view: &dyn View) -> u64 {
    view.request_timeout_ms().saturating_mul(5)
}

/// The nodes of the current ring (a listing asks each).
fn ring_nodes(view: &dyn View) -> Vec<NodeId> {
    let nodes = view.state().ring.current.nodes();
    nodes.iter().map(|n| n.id.clone()).collect()
}

fn no_node_answered(what: &str) -> RequestError {
    RequestError::Unavailable(format!("{what}: no node answered"))
}

/// One node's side of a key listing: the page being merged and where the next one starts.
#[derive(Debug)]
struct Cursor {
    node: NodeId,
    buffer: VecDeque<String>,
    next_after: Option<String>,
    more: bool,
    fetching: bool,
    /// The node did not answer: left out.
    failed: bool,
}

/// A key listing: a k-way merge of every node's pages.
#[derive(Debug)]
pub struct KeyListing {
    bucket: String,
    cursors: Vec<Cursor>,
    out: Vec<String>,
    done: bool,
}

impl KeyListing {
    /// List `bucket`'s live keys across the ring's nodes.
    pub fn start(view: &dyn View, bucket: &str) -> (KeyListing, Vec<ListStep>) {
        let cursors = ring_nodes(view)
            .into_iter()
            .map(|node| Cursor {
                node,
                buffer: VecDeque::new(),
                next_after: None,
                more: true,
                fetching: false,
                failed: false,
            })
            .collect();
        let mut listing = KeyListing {
            bucket: bucket.to_owned(),
            cursors,
            out: Vec::new(),
            done: false,
        };
        let mut steps = Vec::new();
        listing.advance(view, &mut steps);
        (listing, steps)
    }

    /// Feed one page (or a node's silence).
    pub fn handle(&mut self, view: &dyn View, event: ListEvent) -> Vec<ListStep> {
        let (tag, page) = match event {
            ListEvent::Reply { tag, reply } => {
                let page = match reply {
                    Reply::Message(PeerMessage::KeyPage { keys, next_after }) => {
                        Some((keys, next_after))
                    }
                    _ => None,
                };
                (tag, page)
            }
            ListEvent::Page { tag, page } => (tag, page),
            ListEvent::Buckets { .. } => return Vec::new(),
        };
        let Ok(index) = usize::try_from(tag) else {
            return Vec::new();
        };
        let Some(cursor) = self.cursors.get_mut(index).filter(|c| c.fetching) else {
            return Vec::new();
        };
        cursor.fetching = false;
        if let Some((keys, next_after)) = page {
            cursor.buffer.extend(keys);
            cursor.more = next_after.is_some();
            cursor.next_after = next_after;
        } else {
            cursor.failed = true;
            cursor.more = false;
            cursor.buffer.clear();
        }
        let mut steps = Vec::new();
        self.advance(view, &mut steps);
        steps
    }

    /// The listing ended and every page asked for came back.
    pub fn finished(&self) -> bool {
        self.done && self.cursors.iter().all(|c| !c.fetching)
    }

    /// Merge as far as every node's page allows; ask for the pages that ran out; emit pages of
    /// `LIST_PAGE_KEYS` keys, and the last one when every node is exhausted.
    fn advance(&mut self, view: &dyn View, steps: &mut Vec<ListStep>) {
        if self.done {
            return;
        }
        loop {
            let mut asked = false;
            for (tag, cursor) in (0..).zip(self.cursors.iter_mut()) {
                if !(cursor.buffer.is_empty() && cursor.more && !cursor.fetching) {
                    continue;
                }
                cursor.fetching = true;
                asked = true;
                if &cursor.node == view.me() {
                    steps.push(ListStep::ReadLocalPage {
                        tag,
                        bucket: self.bucket.clone(),
                        start_after: cursor.next_after.clone(),
                        limit: LIST_PAGE_KEYS,
                    });
                } else {
                    steps.push(ListStep::Send {
                        tag,
                        to: cursor.node.clone(),
                        message: PeerMessage::ListKeys {
                            bucket: self.bucket.clone(),
                            start_after: cursor.next_after.clone(),
                            limit: LIST_PAGE_KEYS as u32,
                        },
                        timeout_ms: listing_timeout_ms(view),
                    });
                }
            }
            if asked || self.cursors.iter().any(|c| c.fetching) {
                return;
            }
            if self.cursors.iter().all(|c| c.failed) {
                self.done = true;
                let error = no_node_answered("key listing");
                steps.push(ListStep::Failed(error));
                return;
            }
            let Some(smallest) = self
                .cursors
                .iter()
                .filter_map(|c| c.buffer.front())
                .min()
                .cloned()
            else {
                self.done = true;
                let keys = std::mem::take(&mut self.out);
                steps.push(ListStep::Keys { keys, last: true });
                return;
            };
            for cursor in &mut self.cursors {
                if cursor.buffer.front() == Some(&smallest) {
                    cursor.buffer.pop_front();
                }
            }
            self.out.push(smallest);
            if self.out.len() >= LIST_PAGE_KEYS {
                let keys = std::mem::take(&mut self.out);
                steps.push(ListStep::Keys { keys, last: false });
            }
        }
    }
}

/// A bucket listing: every ring node's buckets, merged.
#[derive(Debug)]
pub struct BucketListing {
    waiting: BTreeSet<Tag>,
    answered: usize,
    buckets: BTreeSet<String>,
}

impl BucketListing {
    /// Ask every node of the ring for its buckets.
    pub fn start(view: &dyn View) -> (BucketListing, Vec<ListStep>) {
        let nodes = ring_nodes(view);
        let mut steps = Vec::with_capacity(nodes.len());
        for (tag, node) in (0..).zip(&nodes) {
            if node == view.me() {
                steps.push(ListStep::ReadLocalBuckets { tag });
            } else {
                steps.push(ListStep::Send {
                    tag,
                    to: node.clone(),
                    message: PeerMessage::ListBuckets,
                    timeout_ms: listing_timeout_ms(view),
                });
            }
        }
        let listing = BucketListing {
            waiting: (0..).take(nodes.len()).collect(),
            answered: 0,
            buckets: BTreeSet::new(),
        };
        (listing, steps)
    }

    /// Feed one node's buckets (or its silence: left out); answer once every node is in.
    pub fn handle(&mut self, event: ListEvent) -> Vec<ListStep> {
        let (tag, buckets) = match event {
            ListEvent::Reply { tag, reply } => match reply {
                Reply::Message(PeerMessage::Buckets(buckets)) => (tag, Some(buckets)),
                _ => (tag, None),
            },
            ListEvent::Buckets { tag, buckets } => (tag, buckets),
            ListEvent::Page { .. } => return Vec::new(),
        };
        if !self.waiting.remove(&tag) {
            return Vec::new();
        }
        if let Some(buckets) = buckets {
            self.answered += 1;
            self.buckets.extend(buckets);
        }
        if !self.waiting.is_empty() {
            return Vec::new();
        }
        if self.answered == 0 {
            let error = no_node_answered("bucket listing");
            return vec![ListStep::Failed(error)];
        }
        vec![ListStep::Buckets(std::mem::take(&mut self.buckets).into_iter().collect())]
    }

    /// Every node answered or was left out.
    pub fn finished(&self) -> bool {
        self.waiting.is_empty()
    }
}

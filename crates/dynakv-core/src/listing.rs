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

/// Whether a node's page answers the request for the keys after `after`: at most a page of
/// keys, strictly increasing, all past `after`, and a next start past `after` and not before
/// the last key.
fn well_formed((keys, next_after): &KeyPage, after: Option<&String>) -> bool {
    let past = |key: &String| after.is_none_or(|a| key > a);
    keys.len() <= LIST_PAGE_KEYS
        && keys.windows(2).all(|pair| pair[0] < pair[1])
        && keys.first().is_none_or(past)
        && next_after
            .as_ref()
            .is_none_or(|next| past(next) && keys.last().is_none_or(|last| next >= last))
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
        // A page that is not what was asked (too long, out of order, not past where it
        // started, or not moving on) leaves its node out: merging it would break the order,
        // and one that does not move on would be asked for again forever.
        let page = page.filter(|page| well_formed(page, cursor.next_after.as_ref()));
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
        vec![ListStep::Buckets(
            std::mem::take(&mut self.buckets).into_iter().collect(),
        )]
    }

    /// Every node answered or was left out.
    pub fn finished(&self) -> bool {
        self.waiting.is_empty()
    }
}

/// A listing's machine, for a driver that keeps both kinds in one place.
#[derive(Debug)]
pub enum Listing {
    Keys(KeyListing),
    Buckets(BucketListing),
}

impl Listing {
    /// Feed one outcome ([`KeyListing::handle`], [`BucketListing::handle`]).
    pub fn handle(&mut self, view: &dyn View, event: ListEvent) -> Vec<ListStep> {
        match self {
            Listing::Keys(listing) => listing.handle(view, event),
            Listing::Buckets(listing) => listing.handle(event),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;
    use crate::test_support::{TestView, id};

    fn view() -> TestView {
        TestView::new("a", &["a", "b", "c"])
    }

    fn page(keys: &[&str], next: Option<&str>) -> Reply {
        Reply::Message(PeerMessage::KeyPage {
            keys: keys.iter().map(|k| (*k).to_owned()).collect(),
            next_after: next.map(str::to_owned),
        })
    }

    /// The tags of the sends and local reads of `steps`, by node.
    fn asks(view: &TestView, steps: &[ListStep]) -> Vec<(Tag, NodeId)> {
        steps
            .iter()
            .filter_map(|s| match s {
                ListStep::Send { tag, to, .. } => Some((*tag, to.clone())),
                ListStep::ReadLocalPage { tag, .. } | ListStep::ReadLocalBuckets { tag } => {
                    Some((*tag, view.me.clone()))
                }
                _ => None,
            })
            .collect()
    }

    fn keys_of(steps: &[ListStep]) -> Vec<(Vec<String>, bool)> {
        steps
            .iter()
            .filter_map(|s| match s {
                ListStep::Keys { keys, last } => Some((keys.clone(), *last)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_key_listing_merges_pages_in_order_without_duplicates_and_leaves_out_a_silent_node() {
        let v = view();
        let (mut listing, steps) = KeyListing::start(&v, "b");
        let asked = asks(&v, &steps);
        assert_eq!(asked.len(), 3, "one page of each node: {steps:?}");
        let tag_of = |name: &str| asked.iter().find(|(_, n)| n == &id(name)).unwrap().0;
        let local = ListEvent::Page {
            tag: tag_of("a"),
            page: Some((vec!["k1".into(), "k3".into()], None)),
        };
        assert!(keys_of(&listing.handle(&v, local)).is_empty());
        let reply = page(&["k2"], Some("k2"));
        let out = listing.handle(
            &v,
            ListEvent::Reply {
                tag: tag_of("b"),
                reply,
            },
        );
        assert!(keys_of(&out).is_empty(), "c has not answered yet");
        let silent = Reply::Unanswered("timeout".into());
        let out = listing.handle(
            &v,
            ListEvent::Reply {
                tag: tag_of("c"),
                reply: silent,
            },
        );
        // b's page ran out: its next page is asked for before anything past k2 is merged.
        let again = asks(&v, &out);
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].1, id("b"));
        assert!(!listing.finished());
        let reply = page(&["k3", "k4"], None);
        let out = listing.handle(
            &v,
            ListEvent::Reply {
                tag: again[0].0,
                reply,
            },
        );
        let pages = keys_of(&out);
        let all: Vec<String> = pages.iter().flat_map(|(k, _)| k.clone()).collect();
        assert_eq!(all, ["k1", "k2", "k3", "k4"]);
        assert!(pages.last().unwrap().1, "the last page is marked");
        assert!(listing.finished());
    }

    #[test]
    fn a_listing_no_node_answers_fails_and_one_answer_is_enough() {
        let v = view();
        let (mut listing, steps) = KeyListing::start(&v, "b");
        let mut out = Vec::new();
        for (tag, node) in asks(&v, &steps) {
            out = if node == v.me {
                listing.handle(&v, ListEvent::Page { tag, page: None })
            } else {
                let reply = Reply::NotSent("down".into());
                listing.handle(&v, ListEvent::Reply { tag, reply })
            };
        }
        assert!(matches!(out.as_slice(), [ListStep::Failed(e)] if e.status() == 503));

        let (mut buckets, steps) = BucketListing::start(&v);
        let asked = asks(&v, &steps);
        assert_eq!(asked.len(), 3);
        let mut out = Vec::new();
        for (tag, node) in asked {
            out = if node == v.me {
                let mine = Some(vec!["x".into(), "y".into()]);
                buckets_handle(&mut buckets, tag, mine)
            } else if node == id("b") {
                let reply = Reply::Message(PeerMessage::Buckets(vec!["y".into(), "z".into()]));
                buckets.handle(ListEvent::Reply { tag, reply })
            } else {
                let reply = Reply::Unanswered("timeout".into());
                buckets.handle(ListEvent::Reply { tag, reply })
            };
        }
        assert!(
            matches!(out.as_slice(), [ListStep::Buckets(b)] if b == &["x", "y", "z"]),
            "{out:?}"
        );
        assert!(buckets.finished());
    }

    fn buckets_handle(
        listing: &mut BucketListing,
        tag: Tag,
        buckets: Option<Vec<String>>,
    ) -> Vec<ListStep> {
        listing.handle(ListEvent::Buckets { tag, buckets })
    }

    /// A node that answers a page out of order, too long, or one that does not move on is
    /// left out; the listing ends with the other nodes' keys.
    #[test]
    fn a_hostile_page_leaves_its_node_out_and_the_listing_still_ends() {
        let v = view();
        let hostile: [Reply; 2] = [page(&["k3", "k1"], None), page(&["x"; 2], None)];
        for bad in hostile {
            let (mut listing, steps) = KeyListing::start(&v, "b");
            let asked = asks(&v, &steps);
            let mut out = Vec::new();
            for (tag, node) in asked {
                let event = if node == id("b") {
                    ListEvent::Reply {
                        tag,
                        reply: bad.clone(),
                    }
                } else if node == v.me {
                    ListEvent::Page {
                        tag,
                        page: Some((vec!["k2".into()], None)),
                    }
                } else {
                    ListEvent::Reply {
                        tag,
                        reply: page(&["k4"], None),
                    }
                };
                out.extend(listing.handle(&v, event));
            }
            assert_eq!(
                keys_of(&out),
                [(vec!["k2".to_owned(), "k4".to_owned()], true)],
                "{bad:?}"
            );
            assert!(listing.finished());
        }
        // A node whose next page does not move on is asked once more, then left out.
        let (mut listing, steps) = KeyListing::start(&v, "b");
        let mut out = Vec::new();
        let mut b_tag = None;
        for (tag, node) in asks(&v, &steps) {
            let event = if node == id("b") {
                b_tag = Some(tag);
                let reply = page(&["k1"], Some("k1"));
                ListEvent::Reply { tag, reply }
            } else if node == v.me {
                let page = Some((vec!["k2".into()], None));
                ListEvent::Page { tag, page }
            } else {
                let reply = page(&["k4"], None);
                ListEvent::Reply { tag, reply }
            };
            out.extend(listing.handle(&v, event));
        }
        let again = asks(&v, &out);
        assert_eq!(
            again,
            [(b_tag.unwrap(), id("b"))],
            "b's next page is asked for"
        );
        let stuck = ListEvent::Reply {
            tag: again[0].0,
            reply: page(&[], Some("k1")),
        };
        out.extend(listing.handle(&v, stuck));
        let all: Vec<String> = keys_of(&out).into_iter().flat_map(|(k, _)| k).collect();
        assert_eq!(all, ["k1", "k2", "k4"]);
        assert!(listing.finished(), "not asked again");
        let too_long: Vec<String> = (0..=LIST_PAGE_KEYS).map(|i| format!("k{i:05}")).collect();
        assert!(!well_formed(&(too_long, None), None));
        assert!(well_formed(
            &(vec!["b".into()], Some("c".into())),
            Some(&"a".to_owned())
        ));
        assert!(!well_formed(
            &(vec!["a".into()], None),
            Some(&"a".to_owned())
        ));
    }
}

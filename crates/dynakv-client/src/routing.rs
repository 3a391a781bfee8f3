//! Client-driven coordination (Dynamo paper, section 6.4): the client keeps the cluster's ring
//! and sends each request straight to a node of the key's preference list, so no request pays
//! a forwarding hop to a replica.
//!
//! The ring comes from any node's `GET /admin/routing` (the very `Ring` structure the nodes
//! use, so preference lists are computed the same way), with its version. Every data response
//! carries `X-Dynakv-Ring-Version`; when it is newer than the client's ring the client fetches
//! the routing table again in the background (one refresh at a time). A node that cannot be
//! reached is skipped for the next replica of the list; when no replica works the request
//! goes to any node, which routes it server-side: routing is an optimisation, never a
//! condition of availability.
//!
//! Invariants: the routing table is replaced whole (readers see one version, never a mix);
//! a refresh never blocks a request.

use crate::{Client, ClientError};
use bytes::Bytes;
use dynakv_core::ring::{NodeId, Ring};
use hyper::{HeaderMap, Method, StatusCode};
use parking_lot::RwLock;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// The response header naming the ring version a node served a request under.
pub const RING_VERSION_HEADER: &str = "x-dynakv-ring-version";
/// Default replicas per key (the bucket default `n_val`).
pub const DEFAULT_N_VAL: usize = 3;

/// One version of the cluster's routing table.
#[derive(Debug)]
struct Table {
    version: u64,
    ring: Ring,
    /// A client per member with an HTTP address.
    nodes: HashMap<NodeId, Client>,
}

/// A client that routes each request to a replica of its key.
#[derive(Debug, Clone)]
pub struct RoutingClient {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    seeds: Vec<Client>,
    table: RwLock<Arc<Table>>,
    n_val: usize,
    refreshing: AtomicBool,
    /// Spreads requests over the replicas of a key.
    turn: AtomicU64,
    refreshes: AtomicU64,
}

impl RoutingClient {
    /// Fetch the routing table from the first seed that answers.
    ///
    /// # Errors
    /// No seed URL is valid, or none answered with a routing table.
    pub async fn connect(seed_urls: &[String], n_val: usize) -> Result<RoutingClient, ClientError> {
        let seeds: Vec<Client> = seed_urls
            .iter()
            .map(|u| Client::new(u))
            .collect::<Result<_, _>>()?;
        Self::connect_with(seeds, n_val).await
    }

    /// [`RoutingClient::connect`] with seed clients already made: the clients of the other
    /// members get their scheme, CA, credentials and time limit ([`Client::for_node`]).
    ///
    /// # Errors
    /// No seed answered with a routing table.
    pub async fn connect_with(
        seeds: Vec<Client>,
        n_val: usize,
    ) -> Result<RoutingClient, ClientError> {
        let table = fetch_table(&seeds).await?;
        Ok(RoutingClient {
            inner: Arc::new(Inner {
                seeds,
                table: RwLock::new(Arc::new(table)),
                n_val: n_val.max(1),
                refreshing: AtomicBool::new(false),
                turn: AtomicU64::new(0),
                refreshes: AtomicU64::new(0),
            }),
        })
    }

    /// The ring version the client routes with.
    pub fn version(&self) -> u64 {
        self.inner.table.read().version
    }

    /// How many times the table was fetched again after a newer version was seen.
    pub fn refreshes(&self) -> u64 {
        self.inner.refreshes.load(Ordering::Relaxed)
    }

    /// The clients of the key's replicas, starting from a rotating one of them, then any
    /// other node (for the last resort).
    fn candidates(&self, bucket: &str, key: &str) -> Vec<Client> {
        let table = Arc::clone(&self.inner.table.read());
        let partition = table.ring.partition_of(bucket.as_bytes(), key.as_bytes());
        let replicas: Vec<&Client> = table
            .ring
            .preference_list(partition, self.inner.n_val)
            .iter()
            .filter_map(|(_, node)| table.nodes.get(node))
            .collect();
        let mut out = Vec::with_capacity(replicas.len() + 1);
        if !replicas.is_empty() {
            let turn = self.inner.turn.fetch_add(1, Ordering::Relaxed);
            let first = usize::try_from(turn % replicas.len() as u64).unwrap_or(0);
            out.extend(
                replicas[first..]
                    .iter()
                    .chain(&replicas[..first])
                    .map(|c| (*c).clone()),
            );
        }
        if let Some(any) = self.inner.seeds.first() {
            out.push(any.clone());
        }
        out
    }

    /// Send a request about `bucket`/`key` to one of its replicas (the next one when a node
    /// cannot be reached). `path_and_query` is the full path, as for [`Client::request`].
    ///
    /// # Errors
    /// Every candidate failed to answer; the last failure is returned.
    pub async fn request(
        &self,
        bucket: &str,
        key: &str,
        method: Method,
        path_and_query: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Result<(StatusCode, HeaderMap, Bytes), ClientError> {
        let mut last = ClientError::Protocol("no node to send the request to".into());
        for client in self.candidates(bucket, key) {
            match client
                .request(method.clone(), path_and_query, headers, body.clone())
                .await
            {
                Ok(answer) => {
                    self.observe(&answer.1);
                    return Ok(answer);
                }
                Err(e @ (ClientError::Connect { .. } | ClientError::Timeout(_))) => last = e,
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }

    /// Note the ring version a node answered under; start a refresh when it is newer.
    fn observe(&self, headers: &HeaderMap) {
        let Some(seen) = headers
            .get(RING_VERSION_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
        else {
            return;
        };
        if seen <= self.version() || self.inner.refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        let inner = Arc::clone(&self.inner);
        tokio::spawn(async move {
            match fetch_table(&inner.seeds).await {
                Ok(table) => {
                    let mut current = inner.table.write();
                    if table.version > current.version {
                        *current = Arc::new(table);
                        inner.refreshes.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Err(error) => {
                    // Keep routing with the old table; the next newer header retries.
                    let _ = error;
                }
            }
            inner.refreshing.store(false, Ordering::Release);
        });
    }
}

/// The routing table from the first seed that gives one.
async fn fetch_table(seeds: &[Client]) -> Result<Table, ClientError> {
    let mut last = ClientError::Protocol("no seed node given".into());
    for seed in seeds {
        match seed.get_json("/admin/routing").await {
            Ok(value) => return parse_table(&value, seed),
            Err(e) => last = e,
        }
    }
    Err(last)
}

fn parse_table(value: &serde_json::Value, seed: &Client) -> Result<Table, ClientError> {
    let bad = |what: &str| ClientError::Protocol(format!("routing table: {what}"));
    let version = value["version"].as_u64().ok_or_else(|| bad("no version"))?;
    let ring: Ring =
        serde_json::from_value(value["ring"].clone()).map_err(|e| bad(&e.to_string()))?;
    let members = value["members"]
        .as_object()
        .ok_or_else(|| bad("no members"))?;
    let mut nodes = HashMap::new();
    for (name, member) in members {
        let Some(addr) = member["http_addr"].as_str() else {
            continue;
        };
        let client = seed.for_node(addr)?;
        nodes.insert(NodeId(name.clone()), client);
    }
    Ok(Table {
        version,
        ring,
        nodes,
    })
}

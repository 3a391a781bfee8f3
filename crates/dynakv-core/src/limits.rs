//! Every bound of the system as a named constant (TIGER_STYLE: a limit on everything).
//!
//! Configurable limits (such as the value size) have a default here and a hard ceiling that
//! configuration may not exceed. Compile-time assertions keep the constants consistent.

/// Longest bucket name, in bytes.
pub const MAX_BUCKET_BYTES: usize = 255;
/// Keys per handoff message: transition handoff, cleanup and hint delivery batches.
pub const HANDOFF_BATCH_KEYS: usize = 256;
/// Bytes per handoff message of transition handoff and cleanup (soft: a batch closes once
/// past it, so a batch holds at most one entry beyond it).
pub const HANDOFF_BATCH_BYTES: usize = 4 * 1024 * 1024;
/// Stored objects read per storage scan step of transition handoff and cleanup.
pub const SCAN_PAGE_KEYS: usize = 1000;
/// Most batches of a transition handoff or a cleanup pass the core `Node` has in flight at
/// once. (The server still sends its batches one after another. With one at a time the
/// simulator found a leaver's cleanup outlasting a 500 ms tombstone grace period and handing
/// an old copy over after the reap: seed 462 of `sibling_mode_loses_nothing_and_converges`.)
pub const HANDOFF_BATCHES_IN_FLIGHT: usize = 8;
/// Most key fetches one anti-entropy exchange has in flight (the keys of a comparison are
/// fetched a few at a time: a budget of thousands at once would compete with clients).
pub const AAE_FETCHES_IN_FLIGHT: usize = 8;
/// Most keys a node keeps as hints for one other node; past it, new hints are dropped (and
/// counted) and the node relies on read repair and anti-entropy.
pub const MAX_HINTS_PER_TARGET: usize = 100_000;
/// Keys per page of a key listing, asked of each node and answered to the client.
pub const LIST_PAGE_KEYS: usize = 1000;
/// Most bucket property sets a node keeps parsed (a cache of the cluster state's entries,
/// cleared when full).
pub const MAX_PARSED_PROPS: usize = 10_000;
/// Most tombstones one reaping round checks.
pub const MAX_REAPS_PER_ROUND: usize = 1000;
/// Most keys listed per leaf-key exchange of anti-entropy.
pub const MAX_AAE_KEYS_PER_EXCHANGE: usize = 10_000;
/// Default time limit of one request to a peer replica, in ms (the server's
/// `request_timeout_ms`, `ClusterTimeouts::request`, and the core's `Timings::SERVER`).
pub const DEFAULT_REQUEST_TIMEOUT_MS: u64 = 2000;
/// Longest key, in bytes.
pub const MAX_KEY_BYTES: usize = 1024;
/// Default largest value accepted by a put, in bytes (the paper's objects are < 1 MiB).
pub const DEFAULT_MAX_VALUE_BYTES: usize = 1024 * 1024;
/// Hard ceiling for the configurable value limit.
pub const HARD_MAX_VALUE_BYTES: usize = 64 * 1024 * 1024;
/// Most user metadata entries (`X-Riak-Meta-*`) on one value.
pub const MAX_META_ENTRIES: usize = 64;
/// Most bytes of user metadata (names plus values) on one value.
pub const MAX_META_BYTES: usize = 8 * 1024;
/// Longest content type, in bytes.
pub const MAX_CONTENT_TYPE_BYTES: usize = 255;
/// Most siblings one object may hold. A put that would exceed it is refused with a clear
/// error rather than silently dropping a sibling.
pub const MAX_SIBLINGS: usize = 100;
/// Clock entries above which the oldest entries that no sibling's dot depends on are pruned
/// (the paper prunes past 10).
pub const CLOCK_PRUNE_THRESHOLD: usize = 10;
/// Entries younger than this are never pruned, however many there are (Riak's `young_vclock`).
pub const CLOCK_PRUNE_MIN_AGE_MS: u64 = 20_000;
/// Most clock entries a decoded context or object may carry: anything larger is malformed.
pub const MAX_CLOCK_ENTRIES: usize = MAX_SIBLINGS + CLOCK_PRUNE_THRESHOLD + 64;
/// Largest counter a clock entry or a dot may carry. A decoded clock, object or context with a
/// larger one is malformed, and a write whose new dot would pass it is refused: an honest node
/// issues one counter per write and would take millennia to get here, so only a forged or
/// corrupt clock can, and it must not make a node's dot counter wrap (a wrapped counter
/// reissues dots, and the writes carrying them are silently lost).
pub const MAX_CLOCK_COUNTER: u64 = 1 << 62;
/// Longest encoded causal context accepted from a client, in bytes (base64 text).
pub const MAX_CONTEXT_BYTES: usize = 16 * 1024;
/// Longest actor (replica identity) name inside a clock, in bytes.
pub const MAX_ACTOR_BYTES: usize = 64;
/// Longest encoded object accepted from storage or a peer.
pub const MAX_OBJECT_BYTES: usize =
    MAX_SIBLINGS * (HARD_MAX_VALUE_BYTES / MAX_SIBLINGS + MAX_META_BYTES + 512) + 1024 * 1024;
/// Largest object (all siblings, encoded) a client write may leave behind when it makes the
/// object larger: half of `MAX_OBJECT_BYTES`, so that a merge of two replicas' versions,
/// each written under it, still decodes. A write past it is refused before anything is
/// stored, asking the client to resolve the siblings; a write that does not grow the object
/// (one that resolves siblings) is never refused by it.
pub const MAX_WRITE_OBJECT_BYTES: usize = MAX_OBJECT_BYTES / 2;
/// Largest object a node reads back from its own storage: objects stored over
/// `MAX_OBJECT_BYTES` before the write path checked sizes stay readable up to this, so a
/// client can fetch their siblings and resolve them (a peer's object is held to
/// `MAX_OBJECT_BYTES`).
pub const MAX_REPAIRABLE_OBJECT_BYTES: usize = 2 * MAX_OBJECT_BYTES;
/// Most keys returned by one page of a key listing.
pub const MAX_LIST_PAGE: usize = 10_000;
/// Largest accepted bucket-properties body, in bytes.
pub const MAX_PROPS_BODY_BYTES: usize = 16 * 1024;
/// Largest `n_val` a bucket may ask for.
pub const MAX_N_VAL: u32 = 9;
/// Default number of ring partitions (Q). Must be a power of two.
pub const DEFAULT_RING_PARTITIONS: u32 = 64;
/// Default most client data requests a node serves at once; one more is answered 503 at once
/// (load shedding) rather than queued. By Little's law the latency of admitted requests is
/// about this number over the node's throughput: 64 at ~5,000 ops/s is ~13 ms.
pub const DEFAULT_MAX_IN_FLIGHT_REQUESTS: usize = 64;
/// Highest configurable `max_in_flight_requests`.
pub const HARD_MAX_IN_FLIGHT_REQUESTS: usize = 65_536;
/// Most ring partitions allowed.
pub const MAX_RING_PARTITIONS: u32 = 4096;

const _: () = assert!(DEFAULT_RING_PARTITIONS.is_power_of_two());
const _: () = assert!(HANDOFF_BATCH_KEYS > 0 && SCAN_PAGE_KEYS > 0 && HANDOFF_BATCH_BYTES > 0);
const _: () = assert!(HANDOFF_BATCHES_IN_FLIGHT > 0 && AAE_FETCHES_IN_FLIGHT > 0);
const _: () = assert!(MAX_HINTS_PER_TARGET > 0 && MAX_REAPS_PER_ROUND > 0);
const _: () = assert!(LIST_PAGE_KEYS > 0 && LIST_PAGE_KEYS <= MAX_LIST_PAGE);
const _: () = assert!(MAX_PARSED_PROPS > 0 && MAX_AAE_KEYS_PER_EXCHANGE > 0);
const _: () = assert!(MAX_RING_PARTITIONS.is_power_of_two());
const _: () = assert!(DEFAULT_MAX_VALUE_BYTES <= HARD_MAX_VALUE_BYTES);
const _: () = assert!(CLOCK_PRUNE_THRESHOLD < MAX_CLOCK_ENTRIES);
const _: () = assert!(MAX_SIBLINGS + CLOCK_PRUNE_THRESHOLD <= MAX_CLOCK_ENTRIES);
const _: () = assert!(2 * MAX_WRITE_OBJECT_BYTES <= MAX_OBJECT_BYTES);
const _: () = assert!(MAX_WRITE_OBJECT_BYTES >= 16 * DEFAULT_MAX_VALUE_BYTES);

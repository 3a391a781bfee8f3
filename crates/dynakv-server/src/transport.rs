//! Peer transport: the TCP links between nodes, generic over the message type `M`.
//!
//! It owns the client side ([`PeerClient`]: one persistent, lazily created connection per peer
//! address, multiplexed by request id, with per-request timeouts and per-peer backoff) and the
//! server side ([`serve`]: accept, handshake, run a handler per request, reply). It knows
//! nothing of what the messages mean.
//!
//! # Wire format
//!
//! A frame is `u32 big-endian payload length | payload`, where the payload is the
//! [postcard](https://docs.rs/postcard) encoding of a value. The payload length never exceeds
//! the configured `max_frame_bytes` (itself at most [`MAX_FRAME_BYTES`]); the handshake frames
//! never exceed [`MAX_HANDSHAKE_FRAME_BYTES`].
//!
//! Every link is authenticated and encrypted with the Noise protocol
//! (`Noise_XXpsk0_25519_AESGCM_BLAKE2s`, see [`crate::link`]): both sides prove they hold
//! the cluster's secret and their node keys. The handshake, in plain frames:
//!
//! 1. The connecting side sends `MAGIC (6 bytes) | protocol_version (u16 big-endian) | Noise
//!    message 1`.
//! 2. The accepting side answers `0 | Noise message 2`, or `1 | reason (UTF-8)` and closes the
//!    connection: for a wrong magic, a protocol version other than [`PROTOCOL_VERSION`] (the
//!    reason says which versions), or a first message that does not decrypt (the reason is
//!    only "handshake refused": a stranger learns nothing about the cluster).
//! 3. The connecting side sends Noise message 3, whose payload is the [`Hello`]:
//!    `cluster_name: String`, `node_name: String` (varint length, then UTF-8 bytes),
//!    `wall_clock_ms: u64` (varint): the accepting side takes `wall_clock_ms` minus its own
//!    clock as the peer's clock offset ([`PeerInfo::clock_offset_ms`]).
//!
//! From then on the stream is encrypted records (see [`crate::link`]) whose plaintext is the
//! frame stream. Its first frame, from the accepting side, is a [`HelloReply`]: variant 0
//! `Accept { node_name }`, or variant 1 `Reject { reason }` (another cluster name, or a node
//! name that a live member holds with another key: [`TransportConfig::verifier`]) after which
//! it closes. The connecting side checks the accepting side's name and key with its own
//! verifier too. Every later frame is an [`Envelope`]: `request_id: u64` (varint), then a
//! [`Body`]: variant 0 `Request(M)` (only from the connecting side), variant 1 `Response(M)`
//! or variant 2 `Error(String)` (only from the accepting side, carrying the request's id).
//! Responses may come in any order.
//!
//! # Invariants
//!
//! - Every socket has `TCP_NODELAY` set (both sides).
//! - No request is read from, and no reply sent to, a peer that has not proven it holds the
//!   cluster secret; every frame after the handshake is authenticated.
//! - An accepted connection spends at most `handshake_timeout` in the handshake (at most
//!   [`MAX_HANDSHAKING_CONNECTIONS`] at once) and at most [`PEER_IDLE_TIMEOUT`] waiting for the
//!   next frame; one peer node name holds at most [`MAX_CONNECTIONS_PER_PEER_NAME`] of the
//!   [`MAX_INBOUND_CONNECTIONS`] authenticated slots, so no member (or intruder with the
//!   secret) can take the slots a joining node needs.
//! - Memory is bounded: a read buffer holds at most one frame (plus one read chunk); each
//!   outgoing queue holds at most [`OUTBOUND_QUEUE_FRAMES`] frames; a client connection has at
//!   most [`MAX_PENDING_PER_PEER`] requests awaiting a reply; a server connection runs at most
//!   `max_in_flight_per_connection` handlers (the reader stops reading beyond it:
//!   backpressure); a server holds at most [`MAX_INBOUND_CONNECTIONS`] connections; a client
//!   tracks at most [`MAX_PEERS`] peers.
//! - A frame over the limit, a payload that does not decode, or a message that breaks the
//!   protocol closes that one connection; the listener and other connections are untouched.
//!   Requests pending on a closed connection fail with [`TransportError::ConnectionLost`].
//! - A pending request leaves the pending map when it is answered, when it times out, when the
//!   caller drops its future, or when the connection closes: nothing leaks.
//! - After a failed connect, a refused handshake or a lost connection, the peer is in backoff
//!   (doubling from `backoff_initial` to `backoff_max`); while it lasts, requests fail at once
//!   with [`TransportError::Unreachable`] instead of waiting. An accepted handshake or
//!   [`PeerClient::mark_reachable`] ends it.
//! - A stalled link (packets silently dropped) never blocks a caller past its timeout; after
//!   [`MAX_CONSECUTIVE_TIMEOUTS`] timeouts in a row with no frame received in between, the
//!   connection is dropped so that the next request builds a fresh one.
//! - A handler that panics answers [`Body::Error`]; the connection and the server keep going.

use bytes::{Buf, BytesMut};
use futures_util::FutureExt;
use parking_lot::Mutex;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::link::{self, FrameBudget, LinkKeys, MAX_RECORD_PLAINTEXT, Opener, Sealer};

/// Version of this wire protocol, sent in the hello. A node accepts only its own version.
pub const PROTOCOL_VERSION: u16 = 3;
/// A peer whose wall clock differs from this node's by more than this (ms) is logged when it
/// connects.
pub const CLOCK_OFFSET_WARNING_MS: u64 = 1_000;
/// First bytes of every hello: what a dynakv peer says before anything else.
pub const MAGIC: [u8; 6] = *b"dynakv";
/// Hard limit on a frame's payload, in bytes (room for the largest object, `MAX_OBJECT_BYTES`
/// in dynakv-core's limits, plus its envelope). `TransportConfig::max_frame_bytes` may only
/// lower it.
pub const MAX_FRAME_BYTES: usize = 80 * 1024 * 1024;
/// Size of the length prefix of every frame.
pub const FRAME_HEADER_BYTES: usize = 4;
/// Largest hello or hello reply, in bytes: bounds what an unauthenticated socket can make a
/// node buffer, and therefore the cluster and node names.
pub const MAX_HANDSHAKE_FRAME_BYTES: usize = 4 * 1024;
/// Most requests awaiting a reply on one peer's connection; beyond it a request fails at once
/// with [`TransportError::Overloaded`]. Also the ceiling of `max_in_flight_per_connection`.
pub const MAX_PENDING_PER_PEER: usize = 4096;
/// Consecutive request timeouts (no frame received in between) after which a connection is
/// considered stalled and dropped.
pub const MAX_CONSECUTIVE_TIMEOUTS: u32 = 3;
/// Frames queued for a connection's writer task before senders wait.
pub const OUTBOUND_QUEUE_FRAMES: usize = 256;
/// The writer coalesces queued frames into one write up to about this many bytes.
pub const WRITE_BATCH_BYTES: usize = 64 * 1024;
/// Read buffer growth step: a buffer grows only as bytes arrive, never to a size a length
/// prefix merely claims.
pub const READ_CHUNK_BYTES: usize = 64 * 1024;
/// Most peers a [`PeerClient`] tracks; idle entries are evicted to make room.
pub const MAX_PEERS: usize = 1024;
/// Most connections one [`serve`] holds at once; connections beyond it are closed on accept.
pub const MAX_INBOUND_CONNECTIONS: usize = 1024;
/// Default memory for inbound frames being received, all connections of a node together
/// (past [`crate::link::FREE_BUFFER_BYTES`] each): enough for several frames of the largest
/// size at once.
pub const DEFAULT_INBOUND_FRAME_MEMORY_BYTES: usize = 6 * MAX_FRAME_BYTES;
/// Most accepted connections still in their handshake.
pub const MAX_HANDSHAKING_CONNECTIONS: usize = 128;
/// Most authenticated inbound connections from one node name (a node keeps one per peer).
pub const MAX_CONNECTIONS_PER_PEER_NAME: usize = 8;
/// An inbound connection on which no frame arrives for this long is closed (the peer
/// reconnects when it needs to); it also bounds how long a frame may take to arrive.
pub const PEER_IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// On shutdown, how long [`serve`] lets in-flight handlers finish and their replies go out
/// before it closes the remaining connections.
pub const SHUTDOWN_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause after a failed `accept` (e.g. out of file descriptors) before accepting again.
pub const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);
/// Longest request timeout or backoff honoured; longer ones are cut to it (so that no deadline
/// computation can overflow).
pub const MAX_WAIT: Duration = Duration::from_secs(24 * 60 * 60);
/// Default TCP connect timeout.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Default time allowed for the hello exchange.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
/// Default number of requests one inbound connection handles concurrently.
pub const DEFAULT_MAX_IN_FLIGHT_PER_CONNECTION: usize = 256;
/// Default first backoff after a failure.
pub const DEFAULT_BACKOFF_INITIAL: Duration = Duration::from_millis(100);
/// Default longest backoff.
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(5);

const _: () = assert!(MAX_FRAME_BYTES <= u32::MAX as usize);
const _: () = assert!(MAX_HANDSHAKE_FRAME_BYTES <= MAX_FRAME_BYTES);
const _: () = assert!(DEFAULT_MAX_IN_FLIGHT_PER_CONNECTION <= MAX_PENDING_PER_PEER);
const _: () = assert!(MAX_PENDING_PER_PEER <= Semaphore::MAX_PERMITS);
const _: () = assert!(MAX_INBOUND_CONNECTIONS <= Semaphore::MAX_PERMITS);
const _: () = assert!(MAX_HANDSHAKING_CONNECTIONS <= Semaphore::MAX_PERMITS);
const _: () = assert!(MAX_CONNECTIONS_PER_PEER_NAME <= MAX_INBOUND_CONNECTIONS);
const _: () = assert!(MAX_CONSECUTIVE_TIMEOUTS >= 1);

/// Settings of both sides of the transport.
#[derive(Debug, Clone)]
pub struct TransportConfig {
    /// Only peers announcing this cluster name are accepted.
    pub cluster_name: String,
    /// This node's name, sent in the handshake.
    pub node_name: String,
    /// Largest frame payload sent or accepted; capped at [`MAX_FRAME_BYTES`]. Give every node
    /// the same value: a reply larger than the receiver's limit closes the connection.
    pub max_frame_bytes: usize,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// Time allowed for the hello exchange, on both sides.
    pub handshake_timeout: Duration,
    /// An inbound connection with no frame arriving for this long is closed (default
    /// [`PEER_IDLE_TIMEOUT`]).
    pub idle_timeout: Duration,
    /// Memory for inbound frames being received, all connections together (default
    /// [`DEFAULT_INBOUND_FRAME_MEMORY_BYTES`]); a connection that would pass it is closed.
    pub inbound_frame_memory_bytes: usize,
    /// Requests handled concurrently per inbound connection; beyond it the reader waits
    /// (backpressure). Clamped to `1..=MAX_PENDING_PER_PEER`.
    pub max_in_flight_per_connection: usize,
    /// First backoff after a failure.
    pub backoff_initial: Duration,
    /// Longest backoff.
    pub backoff_max: Duration,
    /// The wall clock sent in the hello (and read when a hello arrives).
    pub clock: crate::clock::WallClock,
    /// The cluster's pre-shared key and this node's key pair.
    pub keys: LinkKeys,
    /// Checks the name and key of every peer after its handshake (both sides); `None`
    /// accepts any peer that holds the cluster secret.
    pub verifier: Option<PeerVerifier>,
}

/// The check of a peer's node name and public key, run after each handshake: `Err` refuses
/// the connection with that reason.
pub type VerifyFn = dyn Fn(&str, &[u8; 32]) -> Result<(), String> + Send + Sync;

/// A shared [`VerifyFn`].
#[derive(Clone)]
pub struct PeerVerifier(Arc<VerifyFn>);

impl fmt::Debug for PeerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PeerVerifier(..)")
    }
}

impl PeerVerifier {
    pub fn new(
        check: impl Fn(&str, &[u8; 32]) -> Result<(), String> + Send + Sync + 'static,
    ) -> Self {
        PeerVerifier(Arc::new(check))
    }
}

impl TransportConfig {
    /// A configuration with the default limits and timeouts.
    pub fn new(cluster_name: &str, node_name: &str, keys: LinkKeys) -> Self {
        Self {
            keys,
            verifier: None,
            cluster_name: cluster_name.to_owned(),
            node_name: node_name.to_owned(),
            max_frame_bytes: MAX_FRAME_BYTES,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            idle_timeout: PEER_IDLE_TIMEOUT,
            inbound_frame_memory_bytes: DEFAULT_INBOUND_FRAME_MEMORY_BYTES,
            max_in_flight_per_connection: DEFAULT_MAX_IN_FLIGHT_PER_CONNECTION,
            backoff_initial: DEFAULT_BACKOFF_INITIAL,
            backoff_max: DEFAULT_BACKOFF_MAX,
            clock: crate::clock::WallClock::default(),
        }
    }

    fn frame_limit(&self) -> usize {
        self.max_frame_bytes.min(MAX_FRAME_BYTES)
    }

    fn in_flight_limit(&self) -> usize {
        self.max_in_flight_per_connection
            .clamp(1, MAX_PENDING_PER_PEER)
    }

    fn first_backoff(&self) -> Duration {
        self.backoff_initial.min(self.backoff_max)
    }

    fn verify(&self, name: &str, key: &[u8; 32]) -> Result<(), String> {
        match &self.verifier {
            Some(verifier) => (verifier.0)(name, key),
            None => Ok(()),
        }
    }
}

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The connect failed, or the peer is in backoff after a recent failure (fail fast).
    #[error("peer {peer} is unreachable: {reason}")]
    Unreachable { peer: SocketAddr, reason: String },
    /// No reply within the request's timeout (connect included).
    #[error("request to {peer} timed out after {after:?}")]
    Timeout { peer: SocketAddr, after: Duration },
    /// The connection closed while the request was pending.
    #[error("connection to {peer} lost: {reason}")]
    ConnectionLost { peer: SocketAddr, reason: String },
    /// The peer refused the handshake (another cluster, another protocol version).
    #[error("peer {peer} refused the handshake: {reason}")]
    Rejected { peer: SocketAddr, reason: String },
    /// The message does not fit in a frame.
    #[error("frame of {size} bytes exceeds the limit of {limit} bytes")]
    FrameTooLarge { size: usize, limit: usize },
    /// The message could not be serialised.
    #[error("cannot encode the message: {0}")]
    Encode(String),
    /// The peer could not handle the request (its handler panicked, or its reply did not fit).
    #[error("the peer failed to handle the request: {0}")]
    RemoteError(String),
    /// A local bound was reached (too many pending requests to the peer, too many peers): the
    /// request was not sent.
    #[error("request to {peer} not sent: {reason}")]
    Overloaded { peer: SocketAddr, reason: String },
}

/// A frame that cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The length prefix announces more than the limit.
    #[error("frame of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    /// The payload is not a valid encoding of the expected type.
    #[error("malformed frame: {0}")]
    Malformed(String),
}

/// What the connecting side says of itself, in the last handshake message (encrypted).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub cluster_name: String,
    pub node_name: String,
    /// The sender's wall clock when it sent the hello (ms since the Unix epoch): the
    /// accepting side measures how far the peer's clock is from its own (version 2).
    pub wall_clock_ms: u64,
}

/// Bytes before the first Noise message: [`MAGIC`] and the protocol version.
const HELLO_PREFIX_BYTES: usize = MAGIC.len() + 2;
/// The accepting side's first answer: the handshake goes on.
const HANDSHAKE_CONTINUE: u8 = 0;
/// The accepting side's first answer: refused (a UTF-8 reason follows).
const HANDSHAKE_REFUSED: u8 = 1;
/// What a stranger is told (nothing about the cluster).
const REFUSED_REASON: &str = "handshake refused";

/// The accepting side's answer to a [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HelloReply {
    /// The connection is open for requests.
    Accept { node_name: String },
    /// The connection will be closed.
    Reject { reason: String },
}

/// Every frame after the handshake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope<M> {
    /// Chosen by the requester, unique per connection; the reply carries it back.
    pub request_id: u64,
    pub body: Body<M>,
}

/// What an [`Envelope`] carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Body<M> {
    Request(M),
    Response(M),
    /// The request failed on the peer (see [`TransportError::RemoteError`]).
    Error(String),
}

/// What the server side knows of the caller after the handshake.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// The name the peer announced in its hello (checked against its key by the verifier).
    pub node_name: String,
    /// The peer's static public key, proven in the handshake: who the peer is.
    pub public_key: [u8; 32],
    pub remote_addr: SocketAddr,
    /// How far the peer's wall clock is ahead of this node's (negative: behind), measured
    /// from its hello (within the hello's one-way delay). A wall-clock time the peer sends is
    /// this node's time plus this offset.
    pub clock_offset_ms: i64,
}

/// Encode `value` as one frame (length prefix included).
pub fn encode_frame<T: Serialize>(
    value: &T,
    max_frame_bytes: usize,
) -> Result<Vec<u8>, TransportError> {
    let limit = max_frame_bytes.min(MAX_FRAME_BYTES);
    let mut frame = postcard::to_extend(value, vec![0_u8; FRAME_HEADER_BYTES])
        .map_err(|e| TransportError::Encode(e.to_string()))?;
    let size = frame.len() - FRAME_HEADER_BYTES;
    if size > limit {
        return Err(TransportError::FrameTooLarge { size, limit });
    }
    let header = u32::try_from(size)
        .map_err(|_| TransportError::FrameTooLarge { size, limit })?
        .to_be_bytes();
    frame[..FRAME_HEADER_BYTES].copy_from_slice(&header);
    Ok(frame)
}

/// Take one frame's payload off the front of `buffer`. `Ok(None)`: the frame is not complete
/// yet (nothing is consumed). A length prefix over `max_frame_bytes` (or [`MAX_FRAME_BYTES`])
/// is an error as soon as the prefix is there. Pure: no I/O.
pub fn decode_frame(
    buffer: &mut BytesMut,
    max_frame_bytes: usize,
) -> Result<Option<BytesMut>, FrameError> {
    let limit = max_frame_bytes.min(MAX_FRAME_BYTES);
    let Some(header) = buffer.get(..FRAME_HEADER_BYTES) else {
        return Ok(None);
    };
    let mut prefix = [0_u8; FRAME_HEADER_BYTES];
    prefix.copy_from_slice(header);
    let size = u32::from_be_bytes(prefix) as usize;
    if size > limit {
        return Err(FrameError::TooLarge { size, limit });
    }
    if buffer.len() - FRAME_HEADER_BYTES < size {
        return Ok(None);
    }
    buffer.advance(FRAME_HEADER_BYTES);
    Ok(Some(buffer.split_to(size)))
}

/// Decode a whole payload as a `T`; trailing bytes are an error.
pub fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, FrameError> {
    let (value, rest) =
        postcard::take_from_bytes(payload).map_err(|e| FrameError::Malformed(e.to_string()))?;
    if rest.is_empty() {
        Ok(value)
    } else {
        Err(FrameError::Malformed(format!(
            "{} trailing bytes after the message",
            rest.len()
        )))
    }
}

/// [`decode_frame`] then [`decode_payload`]: the next [`Envelope`] in `buffer`, if complete.
pub fn decode_envelope<M: DeserializeOwned>(
    buffer: &mut BytesMut,
    max_frame_bytes: usize,
) -> Result<Option<Envelope<M>>, FrameError> {
    match decode_frame(buffer, max_frame_bytes)? {
        None => Ok(None),
        Some(payload) => decode_payload(&payload).map(Some),
    }
}

/// Read the next frame's payload into `buffer` (which keeps any bytes after it). `Ok(None)`:
/// the peer closed the connection between frames. Cancel-safe: the bytes read so far stay in
/// `buffer`.
async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
    buffer: &mut BytesMut,
    limit: usize,
) -> Result<Option<BytesMut>, String> {
    loop {
        if let Some(payload) = decode_frame(buffer, limit).map_err(|e| e.to_string())? {
            return Ok(Some(payload));
        }
        buffer.reserve(READ_CHUNK_BYTES);
        match reader.read_buf(buffer).await {
            Ok(0) if buffer.is_empty() => return Ok(None),
            Ok(0) => {
                return Err(format!(
                    "closed in the middle of a frame ({} bytes buffered)",
                    buffer.len()
                ));
            }
            Ok(_) => {}
            Err(e) => return Err(format!("read failed: {e}")),
        }
    }
}

/// Write queued frames, sealed, until the queue closes (then shut the write side down).
/// Frames already queued when one is taken go out in the same records and the same write.
async fn write_loop<W: AsyncWrite + Unpin>(
    mut writer: W,
    mut outbound: mpsc::Receiver<Vec<u8>>,
    mut sealer: Sealer,
) -> Result<(), String> {
    let mut plain = Vec::with_capacity(WRITE_BATCH_BYTES);
    let mut sealed = Vec::with_capacity(WRITE_BATCH_BYTES + WRITE_BATCH_BYTES / 64);
    while let Some(frame) = outbound.recv().await {
        plain.extend_from_slice(&frame);
        while plain.len() < WRITE_BATCH_BYTES {
            let Ok(frame) = outbound.try_recv() else {
                break;
            };
            plain.extend_from_slice(&frame);
        }
        // A large frame is sealed and written a batch at a time (bounded extra memory).
        for batch in plain.chunks(WRITE_BATCH_BYTES.max(MAX_RECORD_PLAINTEXT)) {
            sealed.clear();
            sealer.seal(batch, &mut sealed)?;
            writer
                .write_all(&sealed)
                .await
                .map_err(|e| format!("write failed: {e}"))?;
        }
        plain.clear();
        if plain.capacity() > WRITE_BATCH_BYTES * 4 {
            plain.shrink_to(WRITE_BATCH_BYTES);
        }
        writer
            .flush()
            .await
            .map_err(|e| format!("write failed: {e}"))?;
    }
    writer
        .shutdown()
        .await
        .map_err(|e| format!("shutdown failed: {e}"))
}

// ---------------------------------------------------------------------------------------------
// Client side
// ---------------------------------------------------------------------------------------------

/// Client side: one persistent connection per peer address, multiplexed by request id.
/// Cheap to clone (the clones share the connections).
pub struct PeerClient<M> {
    inner: Arc<ClientInner<M>>,
}

impl<M> Clone for PeerClient<M> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<M> fmt::Debug for PeerClient<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerClient")
            .field("node_name", &self.inner.config.node_name)
            .field("peers", &self.inner.peers.lock().len())
            .finish_non_exhaustive()
    }
}

struct ClientInner<M> {
    config: Arc<TransportConfig>,
    peers: Mutex<HashMap<SocketAddr, Arc<PeerEntry<M>>>>,
}

impl<M> Drop for ClientInner<M> {
    fn drop(&mut self) {
        let entries: Vec<_> = self.peers.lock().drain().map(|(_, entry)| entry).collect();
        for entry in entries {
            entry.client_dropped.store(true, Ordering::SeqCst);
            let connection = match &entry.state.lock().link {
                Link::Connected(connection) => Some(Arc::clone(connection)),
                Link::Idle | Link::Connecting(_) => None,
            };
            if let Some(connection) = connection {
                connection.close("the client was dropped");
            }
        }
    }
}

/// The outcome of a connect attempt, shared with every request waiting for it.
type ConnectSignal = watch::Receiver<Option<Result<(), ConnectFailure>>>;

#[derive(Debug, Clone)]
enum ConnectFailure {
    Unreachable(String),
    Rejected(String),
    Encode(String),
}

impl ConnectFailure {
    fn reason(&self) -> &str {
        match self {
            Self::Unreachable(reason) | Self::Rejected(reason) | Self::Encode(reason) => reason,
        }
    }

    fn into_error(self, peer: SocketAddr) -> TransportError {
        match self {
            Self::Unreachable(reason) => TransportError::Unreachable { peer, reason },
            Self::Rejected(reason) => TransportError::Rejected { peer, reason },
            Self::Encode(reason) => TransportError::Encode(reason),
        }
    }
}

/// Everything the client knows about one peer address.
struct PeerEntry<M> {
    peer: SocketAddr,
    config: Arc<TransportConfig>,
    state: Mutex<PeerState<M>>,
    /// Set when the owning client is dropped: a connect finishing later closes at once.
    client_dropped: AtomicBool,
}

struct PeerState<M> {
    link: Link<M>,
    /// While set and in the future, requests fail fast.
    backoff_until: Option<Instant>,
    /// The backoff the next failure will set.
    next_backoff: Duration,
    /// Why the last failure happened (reported by fail-fast errors).
    last_failure: String,
}

enum Link<M> {
    Idle,
    Connecting(ConnectSignal),
    Connected(Arc<Connection<M>>),
}

impl<M> PeerState<M> {
    fn backoff_remaining(&self, now: Instant) -> Option<Duration> {
        self.backoff_until
            .filter(|until| *until > now)
            .map(|until| until - now)
    }

    fn record_failure(&mut self, now: Instant, reason: String, config: &TransportConfig) {
        let delay = self.next_backoff.min(MAX_WAIT);
        self.backoff_until = Some(now + delay);
        self.next_backoff = delay.saturating_mul(2).min(config.backoff_max);
        self.last_failure = reason;
    }

    fn record_success(&mut self, config: &TransportConfig) {
        self.backoff_until = None;
        self.next_backoff = config.first_backoff();
        self.last_failure.clear();
    }
}

/// One established connection to a peer.
struct Connection<M> {
    peer: SocketAddr,
    outbound: mpsc::Sender<Vec<u8>>,
    shared: Mutex<ConnectionShared<M>>,
    next_request_id: AtomicU64,
    /// Timeouts since the last frame received.
    consecutive_timeouts: AtomicU32,
    /// Tells the connection's task to stop.
    closing: Notify,
}

type ReplySender<M> = oneshot::Sender<Result<M, TransportError>>;

struct ConnectionShared<M> {
    pending: HashMap<u64, ReplySender<M>>,
    /// Set once, when the connection closes: why.
    closed: Option<String>,
}

impl<M> Connection<M> {
    fn new(peer: SocketAddr, outbound: mpsc::Sender<Vec<u8>>) -> Self {
        Self {
            peer,
            outbound,
            shared: Mutex::new(ConnectionShared {
                pending: HashMap::new(),
                closed: None,
            }),
            next_request_id: AtomicU64::new(0),
            consecutive_timeouts: AtomicU32::new(0),
            closing: Notify::new(),
        }
    }

    fn is_closed(&self) -> bool {
        self.shared.lock().closed.is_some()
    }

    fn lost(&self) -> TransportError {
        let reason = self
            .shared
            .lock()
            .closed
            .clone()
            .unwrap_or_else(|| "connection closed".to_owned());
        TransportError::ConnectionLost {
            peer: self.peer,
            reason,
        }
    }

    fn register(
        &self,
        request_id: u64,
    ) -> Result<oneshot::Receiver<Result<M, TransportError>>, TransportError> {
        let mut shared = self.shared.lock();
        if let Some(reason) = &shared.closed {
            return Err(TransportError::ConnectionLost {
                peer: self.peer,
                reason: reason.clone(),
            });
        }
        if shared.pending.len() >= MAX_PENDING_PER_PEER {
            return Err(TransportError::Overloaded {
                peer: self.peer,
                reason: format!("{MAX_PENDING_PER_PEER} requests already awaiting a reply"),
            });
        }
        let (sender, receiver) = oneshot::channel();
        shared.pending.insert(request_id, sender);
        Ok(receiver)
    }

    fn complete(&self, request_id: u64, result: Result<M, TransportError>) {
        let sender = self.shared.lock().pending.remove(&request_id);
        // No entry: the request timed out or was abandoned; the late reply is dropped.
        if let Some(sender) = sender {
            let _ = sender.send(result);
        }
    }

    fn forget(&self, request_id: u64) {
        self.shared.lock().pending.remove(&request_id);
    }

    /// Close the connection: fail every pending request and stop the connection's task.
    /// Returns whether this call closed it (false if it was already closed).
    fn close(&self, reason: &str) -> bool {
        let pending = {
            let mut shared = self.shared.lock();
            if shared.closed.is_some() {
                return false;
            }
            shared.closed = Some(reason.to_owned());
            std::mem::take(&mut shared.pending)
        };
        for (_, sender) in pending {
            let _ = sender.send(Err(TransportError::ConnectionLost {
                peer: self.peer,
                reason: reason.to_owned(),
            }));
        }
        self.closing.notify_one();
        true
    }
}

/// Removes a request's pending entry however the request ends (reply, timeout, cancellation).
struct PendingGuard<'a, M> {
    connection: &'a Connection<M>,
    request_id: u64,
}

impl<M> Drop for PendingGuard<'_, M> {
    fn drop(&mut self) {
        self.connection.forget(self.request_id);
    }
}

/// A connection that passed the handshake, before its tasks start.
struct Established {
    stream: TcpStream,
    /// The receiving direction (holding any bytes read after the hello reply).
    opener: Opener,
    sealer: Sealer,
    remote_node: String,
}

impl<M> PeerEntry<M>
where
    M: Serialize + DeserializeOwned + Send + 'static,
{
    fn new(peer: SocketAddr, config: Arc<TransportConfig>) -> Self {
        let next_backoff = config.first_backoff();
        Self {
            peer,
            config,
            state: Mutex::new(PeerState {
                link: Link::Idle,
                backoff_until: None,
                next_backoff,
                last_failure: String::new(),
            }),
            client_dropped: AtomicBool::new(false),
        }
    }

    /// The live connection, connecting first if there is none (one attempt at a time, shared
    /// by every request that needs it). Fails fast while the peer is in backoff.
    async fn connection(self: &Arc<Self>) -> Result<Arc<Connection<M>>, TransportError> {
        loop {
            let mut signal = {
                let mut state = self.state.lock();
                match &state.link {
                    Link::Connected(connection) if !connection.is_closed() => {
                        return Ok(Arc::clone(connection));
                    }
                    // A live attempt: wait for it (a dead one, whose task is gone, is retried).
                    Link::Connecting(signal) if signal.has_changed().is_ok() => signal.clone(),
                    Link::Connected(_) | Link::Connecting(_) | Link::Idle => {
                        if let Some(remaining) = state.backoff_remaining(Instant::now()) {
                            return Err(TransportError::Unreachable {
                                peer: self.peer,
                                reason: format!(
                                    "in backoff for another {remaining:?} after: {}",
                                    state.last_failure
                                ),
                            });
                        }
                        let (done, signal) = watch::channel(None);
                        state.link = Link::Connecting(signal.clone());
                        tokio::spawn(connect_task(Arc::clone(self), done));
                        signal
                    }
                }
            };
            let outcome = signal
                .wait_for(Option::is_some)
                .await
                .map(|outcome| outcome.clone());
            match outcome {
                Ok(Some(Ok(()))) => {}
                Ok(Some(Err(failure))) => return Err(failure.into_error(self.peer)),
                Ok(None) | Err(_) => {
                    return Err(TransportError::Unreachable {
                        peer: self.peer,
                        reason: "the connection attempt was abandoned".to_owned(),
                    });
                }
            }
        }
    }

    /// Start using a connection that passed the handshake.
    fn install(self: &Arc<Self>, established: Established) {
        let (outbound, outbound_queue) = mpsc::channel(OUTBOUND_QUEUE_FRAMES);
        let connection = Arc::new(Connection::new(self.peer, outbound));
        {
            let mut state = self.state.lock();
            state.link = Link::Connected(Arc::clone(&connection));
            state.record_success(&self.config);
        }
        tracing::debug!(peer = %self.peer, remote_node = %established.remote_node, "peer connection established");
        tokio::spawn(run_connection(
            Arc::clone(self),
            Arc::clone(&connection),
            established.stream,
            (established.opener, established.sealer),
            outbound_queue,
        ));
        if self.client_dropped.load(Ordering::SeqCst) {
            connection.close("the client was dropped");
        }
    }

    fn connect_failed(&self, failure: &ConnectFailure) {
        tracing::debug!(peer = %self.peer, reason = failure.reason(), "peer connect failed");
        let mut state = self.state.lock();
        state.link = Link::Idle;
        state.record_failure(Instant::now(), failure.reason().to_owned(), &self.config);
    }

    /// `connection` is dead: fail its requests, forget it and back off.
    fn connection_lost(&self, connection: &Arc<Connection<M>>, reason: &str) {
        if !connection.close(reason) {
            return;
        }
        tracing::debug!(peer = %self.peer, reason, "peer connection lost");
        let mut state = self.state.lock();
        let current = match &state.link {
            Link::Connected(live) => Arc::ptr_eq(live, connection),
            // A newer attempt already started: its outcome decides the backoff.
            Link::Connecting(_) => false,
            Link::Idle => true,
        };
        if current {
            state.link = Link::Idle;
            state.record_failure(Instant::now(), reason.to_owned(), &self.config);
        }
    }

    fn note_timeout(&self, connection: &Arc<Connection<M>>) {
        let count = connection
            .consecutive_timeouts
            .fetch_add(1, Ordering::AcqRel)
            .saturating_add(1);
        if count >= MAX_CONSECUTIVE_TIMEOUTS {
            self.connection_lost(
                connection,
                &format!("{count} consecutive request timeouts (stalled link)"),
            );
        }
    }

    fn pending_requests(&self) -> usize {
        match &self.state.lock().link {
            Link::Connected(connection) => connection.shared.lock().pending.len(),
            Link::Idle | Link::Connecting(_) => 0,
        }
    }
}

async fn connect_task<M>(
    entry: Arc<PeerEntry<M>>,
    done: watch::Sender<Option<Result<(), ConnectFailure>>>,
) where
    M: Serialize + DeserializeOwned + Send + 'static,
{
    let outcome = match establish(&entry.config, entry.peer).await {
        Ok(established) => {
            entry.install(established);
            Ok(())
        }
        Err(failure) => {
            entry.connect_failed(&failure);
            Err(failure)
        }
    };
    done.send_replace(Some(outcome));
}

/// Connect to `peer` and run the handshake.
async fn establish(
    config: &TransportConfig,
    peer: SocketAddr,
) -> Result<Established, ConnectFailure> {
    let hello = postcard::to_stdvec(&Hello {
        cluster_name: config.cluster_name.clone(),
        node_name: config.node_name.clone(),
        wall_clock_ms: config.clock.now_ms(),
    })
    .map_err(|e| ConnectFailure::Encode(format!("hello: {e}")))?;
    let mut stream =
        match tokio::time::timeout(config.connect_timeout, TcpStream::connect(peer)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => return Err(ConnectFailure::Unreachable(format!("connect failed: {e}"))),
            Err(_) => {
                return Err(ConnectFailure::Unreachable(format!(
                    "connect timed out after {:?}",
                    config.connect_timeout
                )));
            }
        };
    stream
        .set_nodelay(true)
        .map_err(|e| ConnectFailure::Unreachable(format!("cannot set TCP_NODELAY: {e}")))?;
    let exchange = initiate(&mut stream, config, &hello);
    match tokio::time::timeout(config.handshake_timeout, exchange).await {
        Ok(Ok((opener, sealer, remote_node))) => Ok(Established {
            stream,
            opener,
            sealer,
            remote_node,
        }),
        Ok(Err(failure)) => Err(failure),
        Err(_) => Err(ConnectFailure::Unreachable(format!(
            "handshake timed out after {:?}",
            config.handshake_timeout
        ))),
    }
}

/// The connecting side's handshake: the two sides' secrets and keys proven, the hello
/// accepted, the accepting side's name and key checked.
async fn initiate(
    stream: &mut TcpStream,
    config: &TransportConfig,
    hello: &[u8],
) -> Result<(Opener, Sealer, String), ConnectFailure> {
    let unreachable = ConnectFailure::Unreachable;
    let mut handshake = config.keys.initiator().map_err(ConnectFailure::Encode)?;
    let mut message = vec![0_u8; MAX_HANDSHAKE_FRAME_BYTES];
    let mut first = Vec::with_capacity(HELLO_PREFIX_BYTES + 64);
    first.extend_from_slice(&MAGIC);
    first.extend_from_slice(&PROTOCOL_VERSION.to_be_bytes());
    let written = handshake
        .write_message(&[], &mut message)
        .map_err(|e| ConnectFailure::Encode(format!("noise: {e}")))?;
    first.extend_from_slice(&message[..written]);
    write_plain_frame(stream, &first)
        .await
        .map_err(unreachable)?;
    let mut buffer = BytesMut::new();
    let answer = read_frame(stream, &mut buffer, MAX_HANDSHAKE_FRAME_BYTES)
        .await
        .map_err(unreachable)?
        .ok_or_else(|| unreachable("closed during the handshake".to_owned()))?;
    match answer.first() {
        Some(&HANDSHAKE_CONTINUE) => {}
        Some(&HANDSHAKE_REFUSED) => {
            return Err(ConnectFailure::Rejected(format!(
                "{} (does this node hold the cluster's secret?)",
                String::from_utf8_lossy(&answer[1..])
            )));
        }
        _ => return Err(unreachable("not a dynakv peer".to_owned())),
    }
    let mut payload = vec![0_u8; MAX_HANDSHAKE_FRAME_BYTES];
    handshake
        .read_message(&answer[1..], &mut payload)
        .map_err(|_| {
            ConnectFailure::Rejected("the peer does not hold this cluster's secret".to_owned())
        })?;
    let written = handshake
        .write_message(hello, &mut message)
        .map_err(|e| ConnectFailure::Encode(format!("noise: {e}")))?;
    write_plain_frame(stream, &message[..written])
        .await
        .map_err(unreachable)?;
    let (remote_key, state) = link::finish(handshake).map_err(unreachable)?;
    let mut opener = Opener::new(Arc::clone(&state), buffer);
    let reply = opener
        .read_frame(stream, MAX_HANDSHAKE_FRAME_BYTES)
        .await
        .map_err(unreachable)?
        .ok_or_else(|| unreachable("closed during the handshake".to_owned()))?;
    match decode_payload::<HelloReply>(&reply)
        .map_err(|e| unreachable(format!("bad hello reply: {e}")))?
    {
        HelloReply::Accept { node_name } => {
            config
                .verify(&node_name, &remote_key)
                .map_err(ConnectFailure::Rejected)?;
            Ok((opener, Sealer::new(state), node_name))
        }
        HelloReply::Reject { reason } => Err(ConnectFailure::Rejected(reason)),
    }
}

/// Write one plain (handshake) frame.
async fn write_plain_frame(stream: &mut TcpStream, payload: &[u8]) -> Result<(), String> {
    let size = u32::try_from(payload.len()).map_err(|_| "handshake frame too large".to_owned())?;
    let mut frame = Vec::with_capacity(FRAME_HEADER_BYTES + payload.len());
    frame.extend_from_slice(&size.to_be_bytes());
    frame.extend_from_slice(payload);
    stream
        .write_all(&frame)
        .await
        .map_err(|e| format!("handshake write failed: {e}"))
}

/// The task of one client connection: reads replies, writes requests, until either side
/// fails or the connection is closed.
async fn run_connection<M>(
    entry: Arc<PeerEntry<M>>,
    connection: Arc<Connection<M>>,
    stream: TcpStream,
    (opener, sealer): (Opener, Sealer),
    outbound_queue: mpsc::Receiver<Vec<u8>>,
) where
    M: Serialize + DeserializeOwned + Send + 'static,
{
    let (reader, writer) = stream.into_split();
    let limit = entry.config.frame_limit();
    let reason = tokio::select! {
        reason = client_read_loop(&connection, reader, opener, limit) => reason,
        result = write_loop(writer, outbound_queue, sealer) => match result {
            Ok(()) => "the outbound queue closed".to_owned(),
            Err(reason) => reason,
        },
        () = connection.closing.notified() => "closed".to_owned(),
    };
    entry.connection_lost(&connection, &reason);
}

/// Deliver replies to their pending requests; returns why it stopped.
async fn client_read_loop<M: DeserializeOwned>(
    connection: &Connection<M>,
    mut reader: OwnedReadHalf,
    mut opener: Opener,
    limit: usize,
) -> String {
    loop {
        let payload = match opener.read_frame(&mut reader, limit).await {
            Ok(Some(payload)) => payload,
            Ok(None) => return "closed by the peer".to_owned(),
            Err(reason) => return reason,
        };
        connection.consecutive_timeouts.store(0, Ordering::Release);
        match decode_payload::<Envelope<M>>(&payload) {
            Ok(Envelope {
                request_id,
                body: Body::Response(message),
            }) => connection.complete(request_id, Ok(message)),
            Ok(Envelope {
                request_id,
                body: Body::Error(reason),
            }) => connection.complete(request_id, Err(TransportError::RemoteError(reason))),
            Ok(Envelope {
                body: Body::Request(_),
                ..
            }) => return "protocol violation: the peer sent a request".to_owned(),
            Err(e) => return e.to_string(),
        }
    }
}

impl<M> PeerClient<M>
where
    M: Serialize + DeserializeOwned + Send + 'static,
{
    pub fn new(config: TransportConfig) -> Self {
        Self {
            inner: Arc::new(ClientInner {
                config: Arc::new(config),
                peers: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Send `message` to `peer` and wait for its reply, at most `timeout` (connect included).
    pub async fn request(
        &self,
        peer: SocketAddr,
        message: M,
        timeout: Duration,
    ) -> Result<M, TransportError> {
        let deadline = Instant::now() + timeout.min(MAX_WAIT);
        let timed_out = TransportError::Timeout {
            peer,
            after: timeout,
        };
        let entry = self.entry(peer)?;
        let Ok(connection) = tokio::time::timeout_at(deadline, entry.connection()).await else {
            return Err(timed_out);
        };
        let connection = connection?;
        let request_id = connection.next_request_id.fetch_add(1, Ordering::Relaxed);
        let frame = encode_frame(
            &Envelope {
                request_id,
                body: Body::Request(message),
            },
            self.inner.config.max_frame_bytes,
        )?;
        let reply = connection.register(request_id)?;
        let pending = PendingGuard {
            connection: &connection,
            request_id,
        };
        let exchange = async {
            connection
                .outbound
                .send(frame)
                .await
                .map_err(|_| connection.lost())?;
            reply.await.map_err(|_| connection.lost())?
        };
        let outcome = tokio::time::timeout_at(deadline, exchange).await;
        drop(pending);
        if let Ok(result) = outcome {
            result
        } else {
            entry.note_timeout(&connection);
            Err(timed_out)
        }
    }

    /// Peers currently in backoff (marked unreachable after a failed connect or a lost
    /// connection), for stats and failure detection.
    pub fn unreachable_peers(&self) -> Vec<SocketAddr> {
        let now = Instant::now();
        let mut peers: Vec<SocketAddr> = self
            .inner
            .peers
            .lock()
            .values()
            .filter(|entry| entry.state.lock().backoff_remaining(now).is_some())
            .map(|entry| entry.peer)
            .collect();
        peers.sort_unstable();
        peers
    }

    /// Forget the backoff of `peer` (e.g. gossip heard from it): the next request connects.
    pub fn mark_reachable(&self, peer: SocketAddr) {
        let entry = self.inner.peers.lock().get(&peer).map(Arc::clone);
        if let Some(entry) = entry {
            entry.state.lock().record_success(&self.inner.config);
        }
    }

    /// Requests awaiting a reply, over all peers (for tests and stats).
    #[doc(hidden)]
    pub fn pending_requests(&self) -> usize {
        let entries: Vec<_> = self.inner.peers.lock().values().map(Arc::clone).collect();
        entries.iter().map(|entry| entry.pending_requests()).sum()
    }

    fn entry(&self, peer: SocketAddr) -> Result<Arc<PeerEntry<M>>, TransportError> {
        let mut peers = self.inner.peers.lock();
        if let Some(entry) = peers.get(&peer) {
            return Ok(Arc::clone(entry));
        }
        if peers.len() >= MAX_PEERS {
            let now = Instant::now();
            // Only entries nobody else holds (no connection task, no request, no connect in
            // progress) and not in backoff may go.
            peers.retain(|_, entry| {
                Arc::strong_count(entry) > 1 || {
                    let state = entry.state.lock();
                    !matches!(state.link, Link::Idle) || state.backoff_remaining(now).is_some()
                }
            });
            if peers.len() >= MAX_PEERS {
                return Err(TransportError::Overloaded {
                    peer,
                    reason: format!("already tracking {MAX_PEERS} peers"),
                });
            }
        }
        let entry = Arc::new(PeerEntry::new(peer, Arc::clone(&self.inner.config)));
        peers.insert(peer, Arc::clone(&entry));
        Ok(entry)
    }
}

// ---------------------------------------------------------------------------------------------
// Server side
// ---------------------------------------------------------------------------------------------

/// Server side: accept connections, handshake, run `handler` for each request (concurrently,
/// up to `max_in_flight_per_connection` per connection), send replies. Stops accepting when
/// `shutdown` resolves, lets in-flight handlers finish and their replies go out (at most
/// [`SHUTDOWN_DRAIN_TIMEOUT`]), closes every connection and returns `Ok(())`. Accept errors
/// (such as running out of file descriptors) are logged and retried after
/// [`ACCEPT_ERROR_PAUSE`]; they do not end the server.
pub async fn serve<M, H, Fut>(
    listener: TcpListener,
    config: TransportConfig,
    handler: H,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()>
where
    M: Serialize + DeserializeOwned + Send + 'static,
    H: Fn(PeerInfo, M) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = M> + Send + 'static,
{
    let config = Arc::new(config);
    let (stop, stopped) = watch::channel(false);
    let handshake_slots = Arc::new(Semaphore::new(MAX_HANDSHAKING_CONNECTIONS));
    let slots = Arc::new(InboundSlots {
        frame_memory: FrameBudget::new(config.inbound_frame_memory_bytes),
        per_name: Mutex::default(),
    });
    let mut connections = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, remote_addr)) => {
                    let Ok(handshake_slot) = Arc::clone(&handshake_slots).try_acquire_owned() else {
                        tracing::warn!(%remote_addr, limit = MAX_HANDSHAKING_CONNECTIONS, "too many peer connections in their handshake, closing the new one");
                        continue;
                    };
                    connections.spawn(serve_connection(
                        stream,
                        remote_addr,
                        Arc::clone(&config),
                        handler.clone(),
                        stopped.clone(),
                        (handshake_slot, Arc::clone(&slots)),
                    ));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a peer connection failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
            },
        }
    }
    drop(listener);
    let _ = stop.send(true);
    let drained = tokio::time::timeout(SHUTDOWN_DRAIN_TIMEOUT, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            remaining = connections.len(),
            "peer connections still busy after the drain timeout, closing them"
        );
        connections.shutdown().await;
    }
    Ok(())
}

/// The authenticated inbound connections: how many in all, and per peer node name; and the
/// memory their frames share.
#[derive(Debug)]
struct InboundSlots {
    per_name: Mutex<HashMap<String, usize>>,
    frame_memory: FrameBudget,
}

/// One authenticated connection's slot; given back when dropped.
struct InboundSlot {
    slots: Arc<InboundSlots>,
    name: String,
}

impl InboundSlots {
    /// A slot for a connection from `name`, or why there is none.
    fn take(self: &Arc<Self>, name: &str) -> Result<InboundSlot, String> {
        let mut per_name = self.per_name.lock();
        let total: usize = per_name.values().sum();
        if total >= MAX_INBOUND_CONNECTIONS {
            return Err(format!(
                "this node already holds {MAX_INBOUND_CONNECTIONS} peer connections"
            ));
        }
        let count = per_name.entry(name.to_owned()).or_insert(0);
        if *count >= MAX_CONNECTIONS_PER_PEER_NAME {
            return Err(format!(
                "node {name:?} already holds {MAX_CONNECTIONS_PER_PEER_NAME} connections to this node"
            ));
        }
        *count += 1;
        Ok(InboundSlot {
            slots: Arc::clone(self),
            name: name.to_owned(),
        })
    }
}

impl Drop for InboundSlot {
    fn drop(&mut self) {
        let mut per_name = self.slots.per_name.lock();
        if let Some(count) = per_name.get_mut(&self.name) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                per_name.remove(&self.name);
            }
        }
    }
}

async fn serve_connection<M, H, Fut>(
    mut stream: TcpStream,
    remote_addr: SocketAddr,
    config: Arc<TransportConfig>,
    handler: H,
    stop: watch::Receiver<bool>,
    (handshake_slot, slots): (OwnedSemaphorePermit, Arc<InboundSlots>),
) where
    M: Serialize + DeserializeOwned + Send + 'static,
    H: Fn(PeerInfo, M) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = M> + Send + 'static,
{
    if let Err(e) = stream.set_nodelay(true) {
        tracing::warn!(%remote_addr, error = %e, "cannot set TCP_NODELAY");
    }
    let handshake = accept_handshake(&mut stream, &config);
    let accepted = match tokio::time::timeout(config.handshake_timeout, handshake).await {
        Ok(Ok(accepted)) => accepted,
        Ok(Err(reason)) => {
            tracing::debug!(%remote_addr, reason, "peer handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%remote_addr, "peer handshake timed out");
            return;
        }
    };
    drop(handshake_slot);
    let Accepted {
        hello,
        public_key,
        arrived_ms,
        opener,
        mut sealer,
    } = accepted;
    // The hello is authenticated: check what it claims, then answer it (encrypted).
    let verdict =
        check_hello(&hello, &public_key, &config).and_then(|()| slots.take(&hello.node_name));
    let reply = match &verdict {
        Ok(_) => HelloReply::Accept {
            node_name: config.node_name.clone(),
        },
        Err(reason) => HelloReply::Reject {
            reason: reason.clone(),
        },
    };
    let sent = async {
        let frame = encode_frame(&reply, MAX_HANDSHAKE_FRAME_BYTES).map_err(|e| e.to_string())?;
        let mut sealed = Vec::new();
        sealer.seal(&frame, &mut sealed)?;
        stream
            .write_all(&sealed)
            .await
            .map_err(|e| format!("sending the hello reply failed: {e}"))
    };
    if let Err(reason) = tokio::time::timeout(config.handshake_timeout, sent)
        .await
        .unwrap_or_else(|_| Err("sending the hello reply timed out".to_owned()))
    {
        tracing::debug!(%remote_addr, reason, "peer handshake failed");
        return;
    }
    let _slot = match verdict {
        Ok(slot) => slot,
        Err(reason) => {
            tracing::warn!(%remote_addr, peer = %hello.node_name, reason, "peer refused");
            let _ = stream.shutdown().await;
            return;
        }
    };
    let clock_offset_ms = crate::clock::offset_ms(hello.wall_clock_ms, arrived_ms);
    let node_name = hello.node_name;
    if clock_offset_ms.unsigned_abs() > CLOCK_OFFSET_WARNING_MS {
        tracing::warn!(
            peer = %node_name,
            %remote_addr,
            clock_offset_ms,
            "the peer's wall clock differs from this node's (forwarded writes are corrected for it; last-write-wins buckets and Last-Modified are not)"
        );
    }
    let peer = PeerInfo {
        node_name,
        public_key,
        remote_addr,
        clock_offset_ms,
    };
    let (reader, writer) = stream.into_split();
    let (outbound, outbound_queue) = mpsc::channel(OUTBOUND_QUEUE_FRAMES);
    let mut writer = std::pin::pin!(write_loop(writer, outbound_queue, sealer));
    let opener = opener.with_budget(slots.frame_memory.clone());
    let reader = server_read_loop(reader, opener, peer, &config, handler, outbound, stop);
    tokio::select! {
        result = reader => match result {
            // The peer closed its side, went idle, or we are shutting down: the replies of
            // the handlers still running go out, then the writer closes the connection.
            Ok(()) => {
                if let Err(reason) = writer.await {
                    tracing::debug!(%remote_addr, reason, "peer connection closed while replying");
                }
            }
            Err(reason) => {
                tracing::warn!(%remote_addr, reason, "closing peer connection");
            }
        },
        result = &mut writer => {
            if let Err(reason) = result {
                tracing::debug!(%remote_addr, reason, "peer connection closed");
            }
        }
    }
}

/// A handshake the accepting side finished: the peer holds the cluster secret and the key
/// it presented; its hello is not yet judged.
struct Accepted {
    hello: Hello,
    public_key: [u8; 32],
    arrived_ms: u64,
    opener: Opener,
    sealer: Sealer,
}

/// The accepting side's handshake up to the decrypted hello. `Err`: why it failed (a
/// refusal was sent when the peer could be told something useful).
async fn accept_handshake(
    stream: &mut TcpStream,
    config: &TransportConfig,
) -> Result<Accepted, String> {
    let mut buffer = BytesMut::new();
    let first = read_frame(stream, &mut buffer, MAX_HANDSHAKE_FRAME_BYTES)
        .await?
        .ok_or_else(|| "closed before the hello".to_owned())?;
    if let Err(reason) = check_handshake_prefix(&first) {
        refuse(stream, &reason).await;
        return Err(reason);
    }
    let mut handshake = config.keys.responder()?;
    let mut payload = vec![0_u8; MAX_HANDSHAKE_FRAME_BYTES];
    if handshake
        .read_message(&first[HELLO_PREFIX_BYTES..], &mut payload)
        .is_err()
    {
        refuse(stream, REFUSED_REASON).await;
        return Err("the peer does not hold the cluster secret".to_owned());
    }
    let mut message = vec![0_u8; MAX_HANDSHAKE_FRAME_BYTES];
    message[0] = HANDSHAKE_CONTINUE;
    let written = handshake
        .write_message(&[], &mut message[1..])
        .map_err(|e| format!("noise: {e}"))?;
    write_plain_frame(stream, &message[..=written]).await?;
    let third = read_frame(stream, &mut buffer, MAX_HANDSHAKE_FRAME_BYTES)
        .await?
        .ok_or_else(|| "closed during the handshake".to_owned())?;
    let read = handshake
        .read_message(&third, &mut payload)
        .map_err(|_| "the last handshake message failed authentication".to_owned())?;
    let arrived_ms = config.clock.now_ms();
    let hello: Hello = decode_payload(&payload[..read]).map_err(|e| format!("bad hello: {e}"))?;
    let (public_key, state) = link::finish(handshake)?;
    Ok(Accepted {
        hello,
        public_key,
        arrived_ms,
        opener: Opener::new(Arc::clone(&state), buffer),
        sealer: Sealer::new(state),
    })
}

/// Tell the connecting side why it is refused (in the clear) and close.
async fn refuse(stream: &mut TcpStream, reason: &str) {
    let mut answer = vec![HANDSHAKE_REFUSED];
    answer.extend_from_slice(reason.as_bytes());
    let _ = write_plain_frame(stream, &answer).await;
    let _ = stream.shutdown().await;
}

/// Whether the first handshake frame starts with our magic and protocol version.
pub fn check_handshake_prefix(first: &[u8]) -> Result<(), String> {
    let (Some(magic), Some(version)) = (
        first.get(..MAGIC.len()),
        first.get(MAGIC.len()..HELLO_PREFIX_BYTES),
    ) else {
        return Err("not a dynakv hello".to_owned());
    };
    if magic != MAGIC {
        return Err("not a dynakv hello (bad magic)".to_owned());
    }
    let version = u16::from_be_bytes([version[0], version[1]]);
    if version != PROTOCOL_VERSION {
        return Err(format!(
            "protocol version {version} is not supported: this node speaks version {PROTOCOL_VERSION}"
        ));
    }
    Ok(())
}

/// Whether an authenticated hello is acceptable: our cluster, and a name the verifier binds
/// to the key the peer proved.
fn check_hello(hello: &Hello, key: &[u8; 32], config: &TransportConfig) -> Result<(), String> {
    if hello.cluster_name != config.cluster_name {
        return Err(format!(
            "cluster name {:?} does not match this node's cluster {:?}",
            hello.cluster_name, config.cluster_name
        ));
    }
    config.verify(&hello.node_name, key)
}

/// Read requests and start a handler for each, holding an in-flight permit until its reply is
/// queued. `Ok(())`: the peer closed its side, or the server is stopping. `Err`: the
/// connection must be dropped (bad frame, protocol violation).
async fn server_read_loop<M, H, Fut>(
    mut reader: OwnedReadHalf,
    mut opener: Opener,
    peer: PeerInfo,
    config: &TransportConfig,
    handler: H,
    outbound: mpsc::Sender<Vec<u8>>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), String>
where
    M: Serialize + DeserializeOwned + Send + 'static,
    H: Fn(PeerInfo, M) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = M> + Send + 'static,
{
    let limit = config.frame_limit();
    let in_flight = Arc::new(Semaphore::new(config.in_flight_limit()));
    loop {
        let payload = tokio::select! {
            biased;
            _ = stop.wait_for(|stopping| *stopping) => return Ok(()),
            read = tokio::time::timeout(config.idle_timeout, opener.read_frame(&mut reader, limit)) => match read {
                Ok(read) => match read? {
                    Some(payload) => payload,
                    None => return Ok(()),
                },
                Err(_) if opener.buffered() == 0 => return Ok(()),
                Err(_) => return Err(format!("no complete frame within {:?} ({} bytes buffered)", config.idle_timeout, opener.buffered())),
            },
        };
        let envelope: Envelope<M> = decode_payload(&payload).map_err(|e| e.to_string())?;
        let Envelope {
            request_id,
            body: Body::Request(message),
        } = envelope
        else {
            return Err(
                "protocol violation: the peer sent a reply on an inbound connection".to_owned(),
            );
        };
        let permit = tokio::select! {
            biased;
            _ = stop.wait_for(|stopping| *stopping) => return Ok(()),
            permit = Arc::clone(&in_flight).acquire_owned() => permit.map_err(|e| e.to_string())?,
        };
        tokio::spawn(handle_request(
            handler.clone(),
            peer.clone(),
            request_id,
            message,
            limit,
            outbound.clone(),
            permit,
        ));
    }
}

async fn handle_request<M, H, Fut>(
    handler: H,
    peer: PeerInfo,
    request_id: u64,
    message: M,
    limit: usize,
    outbound: mpsc::Sender<Vec<u8>>,
    _permit: OwnedSemaphorePermit,
) where
    M: Serialize + DeserializeOwned + Send + 'static,
    H: Fn(PeerInfo, M) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = M> + Send + 'static,
{
    let remote_addr = peer.remote_addr;
    let handled = AssertUnwindSafe(async move { handler(peer, message).await })
        .catch_unwind()
        .await;
    let body = if let Ok(reply) = handled {
        Body::Response(reply)
    } else {
        tracing::error!(%remote_addr, request_id, "peer request handler panicked");
        Body::Error("the request handler panicked".to_owned())
    };
    let frame = match encode_frame(&Envelope { request_id, body }, limit) {
        Ok(frame) => frame,
        Err(e) => {
            tracing::warn!(%remote_addr, request_id, error = %e, "cannot send a peer reply");
            let error: Envelope<M> = Envelope {
                request_id,
                body: Body::Error(format!("cannot send the reply: {e}")),
            };
            match encode_frame(&error, limit) {
                Ok(frame) => frame,
                Err(_) => return,
            }
        }
    };
    // Fails only when the connection is gone: nobody is left to tell.
    let _ = outbound.send(frame).await;
}

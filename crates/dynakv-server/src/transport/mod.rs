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
//!    connection: for a wrong magic, a protocol version not in [`SUPPORTED_PROTOCOL_VERSIONS`]
//!    (the reason says "this node speaks version N", which a connecting node of a newer
//!    version reads to connect again with version N if it can speak it), or a first message
//!    that does not decrypt (the reason is only "handshake refused": a stranger learns
//!    nothing about the cluster).
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
//! # Versions
//!
//! A node speaks [`PROTOCOL_VERSION`] and [`PREVIOUS_PROTOCOL_VERSION`], so that a cluster can
//! be upgraded one node at a time. The version of a connection is the one its connecting side
//! put in its first frame: a node connects with its own version, and when the peer refuses it
//! saying it speaks the previous one, connects again with that (and says so in its log). Every
//! envelope of a connection of the previous version carries the message's previous form
//! ([`WireMessage::Previous`]); a message that form cannot carry is not sent
//! ([`TransportError::OlderPeer`]), or, for a reply, answered with [`Body::Error`]. The
//! version is not authenticated before the handshake: a man in the middle can make two nodes
//! of the current version speak the previous one (a downgrade to a version that is
//! authenticated and encrypted the same way, losing only the newer messages).
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

/// Version of this wire protocol, sent in the hello.
///
/// Changing any peer message (a field, a variant, what an encoded object may hold) bumps it
/// and [`PREVIOUS_PROTOCOL_VERSION`], replaces `dynakv_core::message::v3` by a mirror of the
/// messages as they were (with its golden encoding test, the bytes generated at the last
/// commit of the old version), and points `scripts/build-previous-release.sh` at that commit:
/// see `docs/UPGRADING.md`.
pub const PROTOCOL_VERSION: u16 = 4;
/// The version before [`PROTOCOL_VERSION`], still spoken so that a cluster can be upgraded
/// one node at a time: a node accepts connections of either version, and connects with the
/// previous one to a peer that refuses the current one (see [`WireMessage`]).
pub const PREVIOUS_PROTOCOL_VERSION: u16 = 3;
/// Every version a node accepts.
pub const SUPPORTED_PROTOCOL_VERSIONS: [u16; 2] = [PREVIOUS_PROTOCOL_VERSION, PROTOCOL_VERSION];
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
    /// The newest protocol version this node speaks: [`PROTOCOL_VERSION`], or
    /// [`PREVIOUS_PROTOCOL_VERSION`] to behave as a node not yet upgraded (tests of mixed
    /// clusters). Other values are taken as [`PROTOCOL_VERSION`].
    pub protocol_version: u16,
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
            protocol_version: PROTOCOL_VERSION,
        }
    }

    /// The newest protocol version this node speaks (see [`TransportConfig::protocol_version`]).
    pub fn newest_version(&self) -> u16 {
        if self.protocol_version == PREVIOUS_PROTOCOL_VERSION {
            PREVIOUS_PROTOCOL_VERSION
        } else {
            PROTOCOL_VERSION
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
    /// The peer speaks an older protocol version that cannot carry this message (it was not
    /// sent; a reply that cannot be carried is answered with [`Body::Error`]).
    #[error(
        "peer {peer} speaks protocol version {version}, which cannot carry {reason}: upgrade it"
    )]
    OlderPeer {
        peer: SocketAddr,
        version: u16,
        reason: String,
    },
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
    /// The protocol version of the connection (one of [`SUPPORTED_PROTOCOL_VERSIONS`]).
    pub protocol_version: u16,
}

/// A message type the transport carries, in the current protocol version (its own serde
/// form) and in the previous one (the form of [`WireMessage::Previous`]), chosen per
/// connection.
pub trait WireMessage: Serialize + DeserializeOwned + Send + 'static {
    /// The message as [`PREVIOUS_PROTOCOL_VERSION`] encodes it.
    type Previous: Serialize + DeserializeOwned;

    /// This message in the previous version.
    ///
    /// # Errors
    /// What in it the previous version cannot carry.
    fn to_previous(self) -> Result<Self::Previous, String>;

    /// A message of the previous version in the current one.
    fn from_previous(previous: Self::Previous) -> Self;
}

/// Encode an envelope for a connection of protocol `version` to `peer` (length prefix
/// included).
///
/// # Errors
/// [`TransportError::OlderPeer`] when the message cannot be said in `version`; the frame
/// errors of [`encode_frame`].
pub fn encode_envelope<M: WireMessage>(
    envelope: Envelope<M>,
    version: u16,
    peer: SocketAddr,
    max_frame_bytes: usize,
) -> Result<Vec<u8>, TransportError> {
    if version != PREVIOUS_PROTOCOL_VERSION {
        return encode_frame(&envelope, max_frame_bytes);
    }
    let older = |reason| TransportError::OlderPeer {
        peer,
        version,
        reason,
    };
    let body = match envelope.body {
        Body::Request(message) => Body::Request(message.to_previous().map_err(older)?),
        Body::Response(message) => Body::Response(message.to_previous().map_err(older)?),
        Body::Error(reason) => Body::Error(reason),
    };
    encode_frame(
        &Envelope {
            request_id: envelope.request_id,
            body,
        },
        max_frame_bytes,
    )
}

/// Decode a whole payload of a connection of protocol `version` as an [`Envelope`].
///
/// # Errors
/// The payload is not a valid envelope of that version.
pub fn decode_envelope_payload<M: WireMessage>(
    payload: &[u8],
    version: u16,
) -> Result<Envelope<M>, FrameError> {
    if version != PREVIOUS_PROTOCOL_VERSION {
        return decode_payload(payload);
    }
    let Envelope { request_id, body } = decode_payload::<Envelope<M::Previous>>(payload)?;
    let body = match body {
        Body::Request(message) => Body::Request(M::from_previous(message)),
        Body::Response(message) => Body::Response(M::from_previous(message)),
        Body::Error(reason) => Body::Error(reason),
    };
    Ok(Envelope { request_id, body })
}

/// The version a refusal says the refusing node speaks, when it is one this node can speak
/// too and older than its own: "... this node speaks version N ...".
pub fn older_version_in_refusal(reason: &str, asked: u16) -> Option<u16> {
    let (_, rest) = reason.split_once("this node speaks version ")?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    let version: u16 = digits.parse().ok()?;
    (version < asked && SUPPORTED_PROTOCOL_VERSIONS.contains(&version)).then_some(version)
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

mod client;
mod server;
pub use client::*;
pub use server::*;

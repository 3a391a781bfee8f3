//! The encrypted record layer under the peer transport's frames, and the Noise handshake
//! state that keys it.
//!
//! A peer link runs the Noise protocol `Noise_XXpsk0_25519_AESGCM_BLAKE2s` ([`NOISE_PARAMS`],
//! implemented by the `snow` crate, AES-GCM by ring): both sides prove they hold the cluster's pre-shared key
//! (from the first message on: a stranger's first message fails to decrypt) and their static
//! X25519 node keys, which each side learns from the other (the node's identity). After the
//! handshake the byte stream is a sequence of records, `u16 big-endian length | ciphertext`,
//! each AES-256-GCM with a 16-byte tag and a per-direction nonce counting from 0 (a
//! record replayed, dropped, reordered or altered fails to open and closes the connection). The
//! plaintext of the records, concatenated, is the transport's frame stream
//! (`u32 length | payload`, see `transport`): records and frames are independent, so many small
//! frames share a record and a large frame spans many.
//!
//! Invariants: no record exceeds [`MAX_RECORD_BYTES`] (Noise's message limit); a nonce never
//! wraps (the connection is closed first); the raw buffer holds only bytes received and not
//! yet opened, the plain buffer only opened bytes not yet taken as a frame.

use crate::transport::decode_frame;
use bytes::{Buf, BytesMut};
use snow::StatelessTransportState;
use std::fmt;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt};

/// The cipher state of a finished handshake (both directions; nonces are kept by the caller).
pub type TransportState = StatelessTransportState;

/// The Noise protocol of every peer link.
pub const NOISE_PARAMS: &str = "Noise_XXpsk0_25519_AESGCM_BLAKE2s";
/// Largest record (ciphertext with its tag): the Noise message limit.
pub const MAX_RECORD_BYTES: usize = 65_535;
/// Authentication tag of every record.
pub const TAG_BYTES: usize = 16;
/// Most plaintext one record carries.
pub const MAX_RECORD_PLAINTEXT: usize = MAX_RECORD_BYTES - TAG_BYTES;
/// Bytes of a record's length prefix.
pub const RECORD_HEADER_BYTES: usize = 2;
/// Bytes read from the socket at a time.
const READ_CHUNK_BYTES: usize = 64 * 1024;

const _: () = assert!(MAX_RECORD_BYTES <= u16::MAX as usize);

/// What a node brings to a handshake: the cluster's pre-shared key and its own key pair.
#[derive(Clone)]
pub struct LinkKeys {
    pub psk: [u8; 32],
    pub private: [u8; 32],
    pub public: [u8; 32],
}

impl fmt::Debug for LinkKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LinkKeys(public {})", crate::secrets::hex(&self.public))
    }
}

impl LinkKeys {
    /// The keys of a node holding `secret` with key pair `node`.
    pub fn new(secret: &crate::secrets::ClusterSecret, node: &crate::secrets::NodeKey) -> Self {
        LinkKeys {
            psk: secret.link_psk(),
            private: *node.private(),
            public: *node.public(),
        }
    }

    fn builder(&self) -> Result<snow::Builder<'_>, String> {
        let params = NOISE_PARAMS
            .parse()
            .map_err(|e| format!("noise parameters: {e}"))?;
        snow::Builder::new(params)
            .local_private_key(&self.private)
            .and_then(|b| b.psk(0, &self.psk))
            .map_err(|e| format!("noise setup: {e}"))
    }

    /// A handshake state for the connecting side.
    pub fn initiator(&self) -> Result<snow::HandshakeState, String> {
        self.builder()?
            .build_initiator()
            .map_err(|e| format!("noise setup: {e}"))
    }

    /// A handshake state for the accepting side.
    pub fn responder(&self) -> Result<snow::HandshakeState, String> {
        self.builder()?
            .build_responder()
            .map_err(|e| format!("noise setup: {e}"))
    }
}

/// The remote static key of a finished handshake and its transport state.
pub fn finish(
    handshake: snow::HandshakeState,
) -> Result<([u8; 32], Arc<StatelessTransportState>), String> {
    let remote = handshake
        .get_remote_static()
        .and_then(|key| <[u8; 32]>::try_from(key).ok())
        .ok_or_else(|| "the handshake gave no remote key".to_owned())?;
    let state = handshake
        .into_stateless_transport_mode()
        .map_err(|e| format!("noise: {e}"))?;
    Ok((remote, Arc::new(state)))
}

/// The two ends of a link whose handshake ran in memory (for tests, benchmarks and fuzzing):
/// the initiator's and the responder's state, each with the remote key it learned, and the
/// payload the responder read from the last message (`hello`). `Err` when a side refuses.
pub fn in_memory_link(
    initiator_keys: &LinkKeys,
    responder_keys: &LinkKeys,
    hello: &[u8],
) -> Result<InMemoryLink, String> {
    let mut initiator = initiator_keys.initiator()?;
    let mut responder = responder_keys.responder()?;
    let (mut message, mut payload) = (vec![0; 65_535], vec![0; 65_535]);
    let mut step = |from: &mut snow::HandshakeState,
                    to: &mut snow::HandshakeState,
                    body: &[u8]|
     -> Result<Vec<u8>, String> {
        let written = from
            .write_message(body, &mut message)
            .map_err(|e| e.to_string())?;
        let read = to
            .read_message(&message[..written], &mut payload)
            .map_err(|e| e.to_string())?;
        Ok(payload[..read].to_vec())
    };
    step(&mut initiator, &mut responder, &[])?;
    step(&mut responder, &mut initiator, &[])?;
    let received = step(&mut initiator, &mut responder, hello)?;
    let (initiator_sees, initiator_state) = finish(initiator)?;
    let (responder_sees, responder_state) = finish(responder)?;
    Ok(InMemoryLink {
        initiator: (initiator_state, initiator_sees),
        responder: (responder_state, responder_sees),
        hello: received,
    })
}

/// See [`in_memory_link`].
#[derive(Debug)]
pub struct InMemoryLink {
    pub initiator: (Arc<StatelessTransportState>, [u8; 32]),
    pub responder: (Arc<StatelessTransportState>, [u8; 32]),
    pub hello: Vec<u8>,
}

/// The sending direction of a link.
pub struct Sealer {
    state: Arc<StatelessTransportState>,
    nonce: u64,
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sealer(nonce {})", self.nonce)
    }
}

impl Sealer {
    pub fn new(state: Arc<StatelessTransportState>) -> Self {
        Sealer { state, nonce: 0 }
    }

    /// Append the records carrying `plain` to `out`.
    pub fn seal(&mut self, plain: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
        for chunk in plain.chunks(MAX_RECORD_PLAINTEXT) {
            let sealed_len = chunk.len() + TAG_BYTES;
            let header = u16::try_from(sealed_len)
                .map_err(|_| "record too large".to_owned())?
                .to_be_bytes();
            out.extend_from_slice(&header);
            let start = out.len();
            out.resize(start + sealed_len, 0);
            let written = self
                .state
                .write_message(self.nonce, chunk, &mut out[start..])
                .map_err(|e| format!("sealing a record failed: {e}"))?;
            out.truncate(start + written);
            self.nonce = self
                .nonce
                .checked_add(1)
                .ok_or_else(|| "the link's send nonce is exhausted".to_owned())?;
        }
        Ok(())
    }
}

/// Bytes a connection may hold buffered without drawing on a [`FrameBudget`].
pub const FREE_BUFFER_BYTES: usize = 256 * 1024;

/// Memory for inbound frames shared by every connection of a node: past
/// [`FREE_BUFFER_BYTES`], a connection's buffered bytes (received, not yet taken as a frame)
/// are drawn from it, in KiB, and given back as frames are taken. A connection that would
/// pass it is closed (its peer retries later) rather than left to wait holding memory.
#[derive(Debug, Clone)]
pub struct FrameBudget {
    kib: Arc<tokio::sync::Semaphore>,
    total_kib: u32,
}

impl FrameBudget {
    pub fn new(bytes: usize) -> Self {
        let total_kib = u32::try_from(bytes.div_ceil(1024))
            .unwrap_or(u32::MAX)
            .min(u32::try_from(tokio::sync::Semaphore::MAX_PERMITS).unwrap_or(u32::MAX));
        FrameBudget {
            kib: Arc::new(tokio::sync::Semaphore::new(total_kib as usize)),
            total_kib,
        }
    }

    /// KiB not drawn now.
    pub fn available_kib(&self) -> usize {
        self.kib.available_permits()
    }
}

/// One connection's draw on a [`FrameBudget`].
#[derive(Debug)]
struct Draw {
    budget: FrameBudget,
    held: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Draw {
    fn held_kib(&self) -> usize {
        self.held
            .as_ref()
            .map_or(0, tokio::sync::OwnedSemaphorePermit::num_permits)
    }

    fn kib_for(bytes: usize) -> usize {
        bytes.saturating_sub(FREE_BUFFER_BYTES).div_ceil(1024)
    }

    /// Hold enough for `bytes` buffered.
    fn cover(&mut self, bytes: usize) -> Result<(), String> {
        let needed = Self::kib_for(bytes);
        let held = self.held_kib();
        if needed <= held {
            return Ok(());
        }
        let more = u32::try_from(needed - held).unwrap_or(u32::MAX);
        let permit = Arc::clone(&self.budget.kib)
            .try_acquire_many_owned(more)
            .map_err(|_| {
                format!(
                    "the node's memory for inbound frames ({} KiB) is in use: closing this connection",
                    self.budget.total_kib
                )
            })?;
        match &mut self.held {
            Some(held) => held.merge(permit),
            None => self.held = Some(permit),
        }
        Ok(())
    }

    /// Give back what `bytes` buffered do not need.
    fn release_to(&mut self, bytes: usize) {
        let needed = Self::kib_for(bytes);
        let held = self.held_kib();
        if held > needed
            && let Some(permit) = self.held.as_mut()
        {
            drop(permit.split(held - needed));
        }
    }
}

/// The receiving direction of a link.
pub struct Opener {
    state: Arc<StatelessTransportState>,
    nonce: u64,
    /// Draws on the node's inbound frame memory, when set ([`Opener::with_budget`]).
    draw: Option<Draw>,
    /// Received bytes not yet opened (at most one partial record after `open_available`).
    raw: BytesMut,
    /// Opened bytes not yet taken as a frame.
    plain: BytesMut,
}

impl fmt::Debug for Opener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Opener(nonce {}, {} raw, {} plain)",
            self.nonce,
            self.raw.len(),
            self.plain.len()
        )
    }
}

impl Opener {
    /// An opener that starts with `raw`, bytes already read from the socket.
    pub fn new(state: Arc<StatelessTransportState>, raw: BytesMut) -> Self {
        Opener {
            state,
            nonce: 0,
            draw: None,
            raw,
            plain: BytesMut::new(),
        }
    }

    /// This opener's buffers draw on `budget` past [`FREE_BUFFER_BYTES`].
    #[must_use]
    pub fn with_budget(mut self, budget: FrameBudget) -> Self {
        self.draw = Some(Draw { budget, held: None });
        self
    }

    /// Bytes held (received or opened, not yet taken).
    pub fn buffered(&self) -> usize {
        self.raw.len() + self.plain.len()
    }

    /// Open every complete record in the raw buffer; `Ok(true)` when one was opened.
    fn open_available(&mut self) -> Result<bool, String> {
        let mut opened = false;
        loop {
            let Some(header) = self.raw.get(..RECORD_HEADER_BYTES) else {
                return Ok(opened);
            };
            let len = usize::from(u16::from_be_bytes([header[0], header[1]]));
            if len < TAG_BYTES {
                return Err(format!("record of {len} bytes is shorter than its tag"));
            }
            if self.raw.len() - RECORD_HEADER_BYTES < len {
                return Ok(opened);
            }
            self.raw.advance(RECORD_HEADER_BYTES);
            let record = self.raw.split_to(len);
            let start = self.plain.len();
            self.plain.resize(start + len, 0);
            let read = self
                .state
                .read_message(self.nonce, &record, &mut self.plain[start..])
                .map_err(|_| "a record failed authentication".to_owned())?;
            self.plain.truncate(start + read);
            self.nonce = self
                .nonce
                .checked_add(1)
                .ok_or_else(|| "the link's receive nonce is exhausted".to_owned())?;
            opened = true;
        }
    }

    /// The next frame's payload (see `transport::read_frame`, whose contract this keeps).
    /// `Ok(None)`: the peer closed the connection between frames. Cancel-safe.
    pub async fn read_frame<R: AsyncRead + Unpin>(
        &mut self,
        reader: &mut R,
        limit: usize,
    ) -> Result<Option<BytesMut>, String> {
        loop {
            if let Some(payload) =
                decode_frame(&mut self.plain, limit).map_err(|e| e.to_string())?
            {
                let buffered = self.buffered();
                if let Some(draw) = &mut self.draw {
                    draw.release_to(buffered);
                }
                return Ok(Some(payload));
            }
            if self.open_available()? {
                continue;
            }
            // Opening a record moves bytes from raw to plain: at most one chunk more is held.
            let after_read = self.buffered().saturating_add(READ_CHUNK_BYTES);
            if let Some(draw) = &mut self.draw {
                draw.cover(after_read)?;
            }
            self.raw.reserve(READ_CHUNK_BYTES);
            match reader.read_buf(&mut self.raw).await {
                Ok(0) if self.raw.is_empty() && self.plain.is_empty() => return Ok(None),
                Ok(0) => {
                    return Err(format!(
                        "closed in the middle of a frame ({} bytes buffered)",
                        self.buffered()
                    ));
                }
                Ok(_) => {}
                Err(e) => return Err(format!("read failed: {e}")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::secrets::{ClusterSecret, NodeKey};

    fn keys(secret: &ClusterSecret) -> LinkKeys {
        LinkKeys::new(secret, &NodeKey::generate())
    }

    /// One side of a finished link: its sealer, its opener and the key it learned.
    type Side = (Sealer, Opener, [u8; 32]);

    fn handshake(
        initiator_keys: &LinkKeys,
        responder_keys: &LinkKeys,
    ) -> Result<(Side, Side), String> {
        let link = in_memory_link(initiator_keys, responder_keys, b"hello")?;
        assert_eq!(link.hello, b"hello");
        let side = |(state, sees): (Arc<StatelessTransportState>, [u8; 32])| {
            (
                Sealer::new(state.clone()),
                Opener::new(state, BytesMut::new()),
                sees,
            )
        };
        Ok((side(link.initiator), side(link.responder)))
    }

    fn frame(payload: &[u8]) -> Vec<u8> {
        let mut out = u32::try_from(payload.len()).unwrap().to_be_bytes().to_vec();
        out.extend_from_slice(payload);
        out
    }

    #[tokio::test]
    async fn frames_cross_sealed_both_ways_and_each_side_learns_the_others_key() {
        let secret = ClusterSecret::generate();
        let (a, b) = (keys(&secret), keys(&secret));
        let ((mut a_seal, mut a_open, a_sees), (mut b_seal, mut b_open, b_sees)) =
            handshake(&a, &b).unwrap();
        assert_eq!(a_sees, b.public);
        assert_eq!(b_sees, a.public);
        // A large frame spans many records; small ones share one.
        let big = vec![9_u8; 3 * MAX_RECORD_PLAINTEXT + 17];
        let mut wire = Vec::new();
        let mut plain = frame(&big);
        plain.extend(frame(b"x"));
        plain.extend(frame(b""));
        a_seal.seal(&plain, &mut wire).unwrap();
        assert!(
            !wire.windows(64).any(|w| w == &big[..64]),
            "plaintext on the wire"
        );
        let mut reader = &wire[..];
        assert_eq!(
            b_open
                .read_frame(&mut reader, 1 << 20)
                .await
                .unwrap()
                .unwrap(),
            &big[..]
        );
        assert_eq!(
            &b_open
                .read_frame(&mut reader, 1 << 20)
                .await
                .unwrap()
                .unwrap()[..],
            b"x"
        );
        assert!(
            b_open
                .read_frame(&mut reader, 1 << 20)
                .await
                .unwrap()
                .unwrap()
                .is_empty()
        );
        assert!(
            b_open
                .read_frame(&mut reader, 1 << 20)
                .await
                .unwrap()
                .is_none()
        );
        let mut back = Vec::new();
        b_seal.seal(&frame(b"reply"), &mut back).unwrap();
        let mut reader = &back[..];
        assert_eq!(
            &a_open
                .read_frame(&mut reader, 1 << 20)
                .await
                .unwrap()
                .unwrap()[..],
            b"reply"
        );
    }

    #[test]
    fn a_stranger_without_the_secret_fails_the_first_message() {
        let ours = keys(&ClusterSecret::generate());
        let stranger = keys(&ClusterSecret::generate());
        let mut initiator = stranger.initiator().unwrap();
        let mut responder = ours.responder().unwrap();
        let (mut message, mut payload) = (vec![0; 1024], vec![0; 1024]);
        let written = initiator.write_message(&[], &mut message).unwrap();
        assert!(
            responder
                .read_message(&message[..written], &mut payload)
                .is_err()
        );
        assert!(handshake(&stranger, &ours).is_err());
    }

    #[tokio::test]
    async fn altered_replayed_or_reordered_records_fail() {
        let secret = ClusterSecret::generate();
        let ((mut seal, _, _), (_, open, _)) = handshake(&keys(&secret), &keys(&secret)).unwrap();
        let mut first = Vec::new();
        seal.seal(&frame(b"one"), &mut first).unwrap();
        let mut second = Vec::new();
        seal.seal(&frame(b"two"), &mut second).unwrap();
        let state = open.state.clone();
        // Altered.
        let mut altered = first.clone();
        let last = altered.len() - 1;
        altered[last] ^= 1;
        let mut o = Opener::new(state.clone(), BytesMut::new());
        assert!(o.read_frame(&mut &altered[..], 1024).await.is_err());
        // Reordered: the second record first.
        let mut o = Opener::new(state.clone(), BytesMut::new());
        assert!(o.read_frame(&mut &second[..], 1024).await.is_err());
        // Replayed: the first record twice.
        let mut o = Opener::new(state, BytesMut::new());
        assert!(o.read_frame(&mut &first[..], 1024).await.unwrap().is_some());
        assert!(o.read_frame(&mut &first[..], 1024).await.is_err());
    }

    #[tokio::test]
    async fn a_record_shorter_than_its_tag_is_refused() {
        let secret = ClusterSecret::generate();
        let ((_, mut open, _), _) = handshake(&keys(&secret), &keys(&secret)).unwrap();
        let wire = [0_u8, 3, 1, 2, 3];
        assert!(open.read_frame(&mut &wire[..], 1024).await.is_err());
    }
}

//! The `intruder` fault's attacker: a process without the cluster secret that connects to
//! every node's peer port, over and over during the fault window, and tries to be heard.
//!
//! Each attempt is one new TCP connection carrying one of [`Attempt`]'s byte sequences, sent
//! whole (pipelined, as a peer that does not wait for answers would), then everything the
//! node sends back is read until it closes the connection or [`HOLD_LIMIT`] passes. The
//! node's answer is judged ([`Verdict`]): closed with nothing said, or one plain frame
//! `\x01 reason` (a refusal) then closed, is a refusal; **any other byte** the node sends (a
//! `\x00` handshake continuation, a hello reply, a response) is an accepted attempt, and a
//! connection still open after [`HOLD_LIMIT`] is one the node's handshake timeout failed to
//! close: both fail the run.
//!
//! What is sent (see `docs/RELIABILITY.md`, fault `intruder`):
//!
//! - (a) the version-2 plain protocol: a plain `Hello` as version 2 encoded it (postcard of
//!   `magic, protocol_version, cluster_name, node_name` claiming a live member's name,
//!   `wall_clock_ms`), then one forged request in the transport's `Envelope`: a `Gossip`
//!   whose ring (version 2^40) is owned by a fake member and which moves every live member
//!   to the intruder's address, a `JoinRequest` re-announcing a live member at the intruder's
//!   address, or a `ReplicaPut` of a value with a clock no real write has; also the same
//!   envelope with no hello at all.
//! - (b) a Noise `XXpsk0` first message made with a random (wrong) cluster secret and a
//!   random node key, in either protocol version a node accepts (4, or 3 for rolling
//!   upgrades, drawn per attempt), then the same forged frames, behind a plain-frame `Hello`
//!   claiming a live member's name, sealed with a transport state from a handshake the
//!   intruder ran with itself under its wrong secret (the only state it can have).
//! - (c) replays of bytes recorded during this run: the first [`RECORD_BYTES`] bytes a node
//!   answered to an attempt of (b) (its refusal), and the bytes of the (b) attempts
//!   themselves (a Noise first message and its sealed frames), each sent to *another* node.
//!   Traffic between two real nodes is **not** recorded (the intruder sees only its own
//!   connections): a real member's first handshake message is not replayed.
//! - (d) 256 random bytes; a frame header announcing 1,000 bytes followed by 10 (the node
//!   must close it at its handshake timeout); a frame header announcing 80 MiB followed by
//!   nothing, held open until the node closes it.

use anyhow::{Context, Result, anyhow};
use dynakv_core::limits::DEFAULT_RING_PARTITIONS;
use dynakv_core::membership::{ClusterState, Member, MemberStatus};
use dynakv_core::message::PeerMessage;
use dynakv_core::object::{Content, Object, PrunePolicy};
use dynakv_core::ring::{NodeId, Ring, RingNode};
use dynakv_core::storage::Durability;
use dynakv_core::version::{ActorId, VersionVector};
use dynakv_server::link::{self, LinkKeys, Sealer};
use dynakv_server::secrets::{ClusterSecret, NodeKey};
use dynakv_server::transport::{
    Body, Envelope, FRAME_HEADER_BYTES, Hello, MAGIC, MAX_FRAME_BYTES, MAX_HANDSHAKE_FRAME_BYTES,
    PREVIOUS_PROTOCOL_VERSION, PROTOCOL_VERSION, encode_frame,
};
use rand::Rng as _;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// TCP connect timeout of one attempt.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Timeout of each write of an attempt.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// Timeout of each read while waiting for the node's answer.
pub const READ_POLL: Duration = Duration::from_millis(250);
/// A node must have closed an attempt's connection within this time (its handshake timeout
/// is 2 s); a connection still open after it fails the run.
pub const HOLD_LIMIT: Duration = Duration::from_secs(10);
/// Most bytes of a node's answer kept (for replays and for the report).
pub const RECORD_BYTES: usize = 4096;
/// Pause between two attempts on one node (keeps two cores for the cluster).
pub const ATTEMPT_PAUSE: Duration = Duration::from_millis(50);
/// Random bytes of a garbage attempt.
pub const GARBAGE_BYTES: usize = 256;
/// What the short-frame attempt's header announces, and what it sends of it.
pub const SHORT_FRAME_ANNOUNCED: u32 = 1000;
pub const SHORT_FRAME_SENT: usize = 10;
/// The ring version and member versions of the forged gossip and join (far above any real).
pub const FORGED_VERSION: u64 = 1 << 40;
/// The name of the fake member the forged gossip gives the ring to.
pub const FAKE_MEMBER: &str = "intruder";
/// The refusal frame's first payload byte (`transport`'s handshake refusal).
pub const REFUSAL_BYTE: u8 = 1;
/// Answers kept in the report per verdict kind (all are counted).
const SAMPLES: usize = 5;
/// Hex digits of an answer shown in the report.
const ANSWER_HEX_BYTES: usize = 64;
/// Bucket and key of the forged replica write (the nemesis's primary set-add bucket).
const FORGED_BUCKET: &str = "sets";
const FORGED_KEY: &str = "s0";

/// One kind of attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Attempt {
    /// (a) version-2 plain hello, then a forged `Gossip`.
    V2Gossip,
    /// (a) version-2 plain hello, then a forged `JoinRequest`.
    V2Join,
    /// (a) version-2 plain hello, then a forged `ReplicaPut`.
    V2ReplicaPut,
    /// (a) a forged `Gossip` envelope with no hello.
    NoHelloGossip,
    /// (b) Noise first message under a wrong secret, then sealed forged `Gossip`.
    V3Gossip,
    /// (b) the same, `JoinRequest`.
    V3Join,
    /// (b) the same, `ReplicaPut`.
    V3ReplicaPut,
    /// (c) another node's recorded answer (its refusal) replayed.
    ReplayRefusal,
    /// (c) the bytes of a (b) attempt made to another node, replayed.
    ReplayHandshake,
    /// (d) random bytes.
    Garbage,
    /// (d) a header announcing 1,000 bytes, 10 sent.
    ShortFrame,
    /// (d) a header announcing 80 MiB, nothing sent.
    HugeHeader,
}

impl Attempt {
    pub const ALL: [Attempt; 12] = [
        Attempt::V2Gossip,
        Attempt::V2Join,
        Attempt::V2ReplicaPut,
        Attempt::NoHelloGossip,
        Attempt::V3Gossip,
        Attempt::V3Join,
        Attempt::V3ReplicaPut,
        Attempt::ReplayRefusal,
        Attempt::ReplayHandshake,
        Attempt::Garbage,
        Attempt::ShortFrame,
        Attempt::HugeHeader,
    ];
}

/// How a node answered one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// One refusal frame (its reason), then closed.
    Refused(String),
    /// Closed (or reset) with nothing said.
    Closed,
    /// Something other than a refusal: a failure.
    Answered(Vec<u8>),
    /// Still open after [`HOLD_LIMIT`] with nothing said: a failure.
    Held,
    /// The connect failed (the node is down): not counted as an attempt.
    Unreachable(String),
}

/// Counts of one node's answers to one kind of attempt.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Counts {
    pub attempts: u64,
    pub refused: u64,
    pub closed: u64,
    pub answered: u64,
    pub held: u64,
    pub unreachable: u64,
    /// Skipped: nothing recorded to replay yet.
    pub skipped: u64,
}

/// What the intruder did and saw; written as JSON to `--report`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    pub duration_ms: u64,
    /// `node address -> attempt kind -> counts`.
    pub per_node: BTreeMap<String, BTreeMap<Attempt, Counts>>,
    /// Totals over every node and kind.
    pub total: Counts,
    /// Distinct refusal reasons and how often each was given.
    pub refusal_reasons: BTreeMap<String, u64>,
    /// Failures: answers that are not refusals, connections held open (first few).
    pub failures: Vec<String>,
    /// What was replayed: a description of each recording used.
    pub recordings: Vec<String>,
}

impl Report {
    /// Whether every attempt was refused or closed in time.
    pub fn passed(&self) -> bool {
        self.total.answered == 0 && self.total.held == 0
    }

    /// One line: attempts and how they ended.
    pub fn summary(&self) -> String {
        let t = &self.total;
        format!(
            "{} attempts on {} nodes in {} ms: {} refused, {} closed, {} answered, {} held open, {} unreachable, {} replays skipped",
            t.attempts,
            self.per_node.len(),
            self.duration_ms,
            t.refused,
            t.closed,
            t.answered,
            t.held,
            t.unreachable,
            t.skipped
        )
    }

    fn record(&mut self, node: SocketAddr, attempt: Attempt, verdict: &Verdict) {
        let node_counts = self
            .per_node
            .entry(node.to_string())
            .or_default()
            .entry(attempt)
            .or_default();
        for c in [node_counts, &mut self.total] {
            match verdict {
                Verdict::Unreachable(_) => c.unreachable += 1,
                _ => c.attempts += 1,
            }
            match verdict {
                Verdict::Refused(_) => c.refused += 1,
                Verdict::Closed => c.closed += 1,
                Verdict::Answered(_) => c.answered += 1,
                Verdict::Held => c.held += 1,
                Verdict::Unreachable(_) => {}
            }
        }
        match verdict {
            Verdict::Refused(reason) => {
                *self.refusal_reasons.entry(reason.clone()).or_default() += 1;
            }
            Verdict::Answered(bytes) if self.failures.len() < SAMPLES => {
                self.failures.push(format!(
                    "{node} {attempt:?}: answered {} bytes that are not a refusal: {}",
                    bytes.len(),
                    hex_prefix(bytes)
                ));
            }
            Verdict::Held if self.failures.len() < SAMPLES => self.failures.push(format!(
                "{node} {attempt:?}: connection still open after {HOLD_LIMIT:?}"
            )),
            _ => {}
        }
    }
}

fn hex_prefix(bytes: &[u8]) -> String {
    let shown = dynakv_server::secrets::hex(&bytes[..bytes.len().min(ANSWER_HEX_BYTES)]);
    if bytes.len() > ANSWER_HEX_BYTES {
        format!("{shown}..")
    } else {
        shown
    }
}

/// What the intruder is told.
#[derive(Debug, Clone)]
pub struct Target {
    /// Every node's peer address.
    pub peers: Vec<SocketAddr>,
    /// Live member names to claim (in hellos, joins and gossip).
    pub names: Vec<String>,
    /// The cluster name to claim (dynakv's default unless told).
    pub cluster_name: String,
    /// The intruder's own address (where its forgeries move members to).
    pub own_addr: String,
}

/// The version-2 hello as version 2 encoded it (postcard, in a plain frame).
#[derive(Debug, Serialize)]
struct HelloV2<'a> {
    magic: [u8; 6],
    protocol_version: u16,
    cluster_name: &'a str,
    node_name: &'a str,
    wall_clock_ms: u64,
}

/// The protocol version before encryption.
const OLD_PROTOCOL_VERSION: u16 = 2;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The forged requests, each as a transport frame (`Envelope` postcard, length-prefixed).
struct Forgeries {
    gossip: Vec<u8>,
    join: Vec<u8>,
    replica_put: Vec<u8>,
}

fn forged_member(name: &str, target: &Target, public: [u8; 32]) -> Member {
    let host = target
        .own_addr
        .rsplit_once(':')
        .map_or(target.own_addr.as_str(), |(h, _)| h);
    Member {
        id: NodeId(name.to_owned()),
        peer_addr: target.own_addr.clone(),
        http_addr: format!("{host}:8098"),
        zone: String::new(),
        status: MemberStatus::Valid,
        version: FORGED_VERSION,
        heartbeat: FORGED_VERSION,
        public_key: Some(public),
    }
}

fn envelope(request_id: u64, message: PeerMessage) -> Result<Vec<u8>> {
    encode_frame(
        &Envelope {
            request_id,
            body: Body::Request(message),
        },
        MAX_FRAME_BYTES,
    )
    .map_err(|e| anyhow!("encoding a forged frame: {e}"))
}

fn forge(target: &Target, claimed: &str, public: [u8; 32]) -> Result<Forgeries> {
    // Gossip: a ring far newer than any real one, every partition owned by a fake member,
    // and every live member moved to the intruder's address.
    let fake = forged_member(FAKE_MEMBER, target, public);
    let mut state = ClusterState::found(&target.cluster_name, fake, DEFAULT_RING_PARTITIONS)
        .map_err(|e| anyhow!("forging a state: {e}"))?;
    state.ring.version = FORGED_VERSION;
    state.ring.current = Ring::new(
        DEFAULT_RING_PARTITIONS,
        RingNode {
            id: NodeId(FAKE_MEMBER.to_owned()),
            zone: String::new(),
        },
    )
    .map_err(|e| anyhow!("forging a ring: {e}"))?;
    for name in &target.names {
        let m = forged_member(name, target, public);
        state.members.insert(m.id.clone(), m);
    }
    let gossip = envelope(1, PeerMessage::Gossip(Box::new(state)))?;
    let join = envelope(
        2,
        PeerMessage::JoinRequest {
            cluster_name: target.cluster_name.clone(),
            member: forged_member(claimed, target, public),
        },
    )?;
    // A value no client wrote, with a clock no real write has.
    let now = now_ms();
    let mut context = VersionVector::new();
    context.observe(ActorId(u64::from(u32::MAX)), FORGED_VERSION, now);
    let object = Object::new()
        .update(
            &context,
            Content {
                value: b"intruder".to_vec(),
                content_type: "text/plain".to_owned(),
                last_modified_ms: now,
                meta: Vec::new(),
                deleted: false,
                indexes: Vec::new(),
                expires_ms: None,
            },
            ActorId(u64::from(u32::MAX)),
            now,
            PrunePolicy::default(),
        )
        .map_err(|e| anyhow!("forging an object: {e}"))?;
    let replica_put = envelope(
        3,
        PeerMessage::ReplicaPut {
            bucket: FORGED_BUCKET.to_owned(),
            key: FORGED_KEY.to_owned(),
            object: object.encode(),
            durability: Durability::Fsync,
            ring_version: FORGED_VERSION,
        },
    )?;
    Ok(Forgeries {
        gossip,
        join,
        replica_put,
    })
}

/// A plain frame around `payload`.
fn plain_frame(payload: &[u8]) -> Result<Vec<u8>> {
    let size = u32::try_from(payload.len()).context("frame too large")?;
    let mut frame = size.to_be_bytes().to_vec();
    frame.extend_from_slice(payload);
    Ok(frame)
}

/// (b): the Noise first message of a handshake under a wrong secret and a random node key,
/// then a plain-frame hello claiming `claimed`, then `frame` sealed with a transport state
/// the intruder made with itself (under its wrong secret).
fn wrong_secret_attempt(target: &Target, claimed: &str, frame: &[u8]) -> Result<Vec<u8>> {
    let keys = LinkKeys::new(&ClusterSecret::generate(), &NodeKey::generate());
    let mut handshake = keys.initiator().map_err(|e| anyhow!(e))?;
    let mut message = vec![0_u8; MAX_HANDSHAKE_FRAME_BYTES];
    let written = handshake
        .write_message(&[], &mut message)
        .map_err(|e| anyhow!("noise: {e}"))?;
    let version = if rand::rng().random_bool(0.5) {
        PROTOCOL_VERSION
    } else {
        PREVIOUS_PROTOCOL_VERSION
    };
    let mut first = MAGIC.to_vec();
    first.extend_from_slice(&version.to_be_bytes());
    first.extend_from_slice(&message[..written]);
    let mut bytes = plain_frame(&first)?;
    let hello = postcard_hello(target, claimed)?;
    bytes.extend_from_slice(&plain_frame(&hello)?);
    let other = LinkKeys::new(&ClusterSecret::generate(), &NodeKey::generate());
    let own = LinkKeys {
        psk: keys.psk,
        ..other.clone()
    };
    let session = link::in_memory_link(&keys, &own, &hello).map_err(|e| anyhow!(e))?;
    let mut sealer = Sealer::new(session.initiator.0);
    sealer.seal(frame, &mut bytes).map_err(|e| anyhow!(e))?;
    Ok(bytes)
}

fn postcard_hello(target: &Target, claimed: &str) -> Result<Vec<u8>> {
    let hello = Hello {
        cluster_name: target.cluster_name.clone(),
        node_name: claimed.to_owned(),
        wall_clock_ms: now_ms(),
    };
    let frame = encode_frame(&hello, MAX_HANDSHAKE_FRAME_BYTES)
        .map_err(|e| anyhow!("encoding a hello: {e}"))?;
    Ok(frame[FRAME_HEADER_BYTES..].to_vec())
}

fn v2_hello(target: &Target, claimed: &str) -> Result<Vec<u8>> {
    encode_frame(
        &HelloV2 {
            magic: MAGIC,
            protocol_version: OLD_PROTOCOL_VERSION,
            cluster_name: &target.cluster_name,
            node_name: claimed,
            wall_clock_ms: now_ms(),
        },
        MAX_HANDSHAKE_FRAME_BYTES,
    )
    .map_err(|e| anyhow!("encoding a version-2 hello: {e}"))
}

/// Bytes recorded during the run, for (c).
#[derive(Debug, Default)]
struct Recordings {
    /// `(node, first bytes it answered to a (b) attempt)`.
    answers: Vec<(SocketAddr, Vec<u8>)>,
    /// `(node, the bytes of a (b) attempt sent to it)`.
    handshakes: Vec<(SocketAddr, Vec<u8>)>,
}

impl Recordings {
    /// A recording made at another node than `node`.
    fn pick(list: &[(SocketAddr, Vec<u8>)], node: SocketAddr) -> Option<&(SocketAddr, Vec<u8>)> {
        list.iter().rev().find(|(from, _)| *from != node)
    }
}

/// Sends `bytes` on a new connection to `node` and judges what comes back.
pub fn attempt(node: SocketAddr, bytes: &[u8]) -> (Verdict, Vec<u8>) {
    let mut stream = match TcpStream::connect_timeout(&node, CONNECT_TIMEOUT) {
        Ok(s) => s,
        Err(e) => return (Verdict::Unreachable(e.to_string()), Vec::new()),
    };
    let _ = stream.set_nodelay(true);
    if let Err(e) = stream
        .set_write_timeout(Some(WRITE_TIMEOUT))
        .and_then(|()| stream.set_read_timeout(Some(READ_POLL)))
    {
        return (
            Verdict::Unreachable(format!("socket options: {e}")),
            Vec::new(),
        );
    }
    // A write that fails (the node closed or reset already) is fine: what it said, if
    // anything, is still read below.
    let _ = stream.write_all(bytes);
    let (answer, closed) = read_answer(&mut stream);
    let _ = stream.shutdown(Shutdown::Both);
    (judge(&answer, closed), answer)
}

/// Everything the node sends until it closes (`true`) or [`HOLD_LIMIT`] passes (`false`).
fn read_answer(stream: &mut TcpStream) -> (Vec<u8>, bool) {
    let deadline = Instant::now() + HOLD_LIMIT;
    let mut answer = Vec::new();
    let mut chunk = [0_u8; 1024];
    while Instant::now() < deadline {
        match stream.read(&mut chunk) {
            Ok(0) => return (answer, true),
            Ok(n) => {
                let room = RECORD_BYTES.saturating_sub(answer.len());
                answer.extend_from_slice(&chunk[..n.min(room)]);
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            // Reset, aborted, broken pipe: the node closed it.
            Err(_) => return (answer, true),
        }
    }
    (answer, false)
}

/// A refusal is nothing, or exactly one plain frame whose payload is `\x01` and a UTF-8
/// reason; anything else the node said is an answer.
pub fn judge(answer: &[u8], closed: bool) -> Verdict {
    if answer.is_empty() {
        return if closed {
            Verdict::Closed
        } else {
            Verdict::Held
        };
    }
    let refusal = answer
        .get(..FRAME_HEADER_BYTES)
        .and_then(|h| <[u8; FRAME_HEADER_BYTES]>::try_from(h).ok())
        .map(|h| u32::from_be_bytes(h) as usize)
        .filter(|&len| len >= 1 && answer.len() == FRAME_HEADER_BYTES + len)
        .and_then(|_| answer.get(FRAME_HEADER_BYTES..))
        .filter(|payload| payload.first() == Some(&REFUSAL_BYTE))
        .and_then(|payload| std::str::from_utf8(&payload[1..]).ok());
    match refusal {
        Some(reason) => Verdict::Refused(reason.to_owned()),
        None => Verdict::Answered(answer.to_vec()),
    }
}

/// Builds the bytes of `kind` for `node` (`None`: a replay with nothing recorded yet) and a
/// note of what a replay replays.
fn bytes_for(
    kind: Attempt,
    node: SocketAddr,
    target: &Target,
    forged: &Forgeries,
    recordings: &Mutex<Recordings>,
    claimed: &str,
) -> Result<Option<(Vec<u8>, Option<String>)>> {
    let with_v2_hello = |frame: &[u8]| -> Result<Vec<u8>> {
        let mut b = v2_hello(target, claimed)?;
        b.extend_from_slice(frame);
        Ok(b)
    };
    let bytes = match kind {
        Attempt::V2Gossip => with_v2_hello(&forged.gossip)?,
        Attempt::V2Join => with_v2_hello(&forged.join)?,
        Attempt::V2ReplicaPut => with_v2_hello(&forged.replica_put)?,
        Attempt::NoHelloGossip => forged.gossip.clone(),
        Attempt::V3Gossip => wrong_secret_attempt(target, claimed, &forged.gossip)?,
        Attempt::V3Join => wrong_secret_attempt(target, claimed, &forged.join)?,
        Attempt::V3ReplicaPut => wrong_secret_attempt(target, claimed, &forged.replica_put)?,
        Attempt::ReplayRefusal | Attempt::ReplayHandshake => {
            let rec = recordings
                .lock()
                .map_err(|_| anyhow!("recordings lock poisoned"))?;
            let list = if kind == Attempt::ReplayRefusal {
                &rec.answers
            } else {
                &rec.handshakes
            };
            return Ok(Recordings::pick(list, node).map(|(from, bytes)| {
                (
                    bytes.clone(),
                    Some(format!(
                        "{kind:?}: {} bytes recorded at {from} replayed to {node}",
                        bytes.len()
                    )),
                )
            }));
        }
        Attempt::Garbage => {
            let mut b = vec![0_u8; GARBAGE_BYTES];
            rand::rng().fill(&mut b[..]);
            b
        }
        Attempt::ShortFrame => {
            let mut b = SHORT_FRAME_ANNOUNCED.to_be_bytes().to_vec();
            b.extend_from_slice(&[0xAB_u8; SHORT_FRAME_SENT]);
            b
        }
        Attempt::HugeHeader => u32::try_from(MAX_FRAME_BYTES)
            .context("frame limit")?
            .to_be_bytes()
            .to_vec(),
    };
    Ok(Some((bytes, None)))
}

/// Attacks every node in `target` until `duration` has passed (each node in its own thread,
/// the kinds of [`Attempt::ALL`] in turn), then returns what happened.
pub fn run(target: &Target, duration: Duration) -> Result<Report> {
    let started = Instant::now();
    let deadline = started + duration;
    let intruder_key = NodeKey::generate();
    let report = Arc::new(Mutex::new(Report::default()));
    let recordings = Arc::new(Mutex::new(Recordings::default()));
    let threads: Vec<_> = target
        .peers
        .iter()
        .enumerate()
        .map(|(index, &node)| {
            let target = target.clone();
            let report = Arc::clone(&report);
            let recordings = Arc::clone(&recordings);
            let public = *intruder_key.public();
            std::thread::spawn(move || -> Result<()> {
                // Claim the name of another live member than the node attacked.
                let claimed = target
                    .names
                    .get((index + 1) % target.names.len().max(1))
                    .cloned()
                    .unwrap_or_else(|| "n1".to_owned());
                let forged = forge(&target, &claimed, public)?;
                let mut round = 0_usize;
                while Instant::now() < deadline {
                    let kind = Attempt::ALL[round % Attempt::ALL.len()];
                    round += 1;
                    let Some((bytes, note)) =
                        bytes_for(kind, node, &target, &forged, &recordings, &claimed)?
                    else {
                        let mut r = report.lock().map_err(|_| anyhow!("report lock"))?;
                        r.per_node
                            .entry(node.to_string())
                            .or_default()
                            .entry(kind)
                            .or_default()
                            .skipped += 1;
                        r.total.skipped += 1;
                        continue;
                    };
                    let (verdict, answer) = attempt(node, &bytes);
                    if matches!(
                        kind,
                        Attempt::V3Gossip | Attempt::V3Join | Attempt::V3ReplicaPut
                    ) && !matches!(verdict, Verdict::Unreachable(_))
                    {
                        let mut guard =
                            recordings.lock().map_err(|_| anyhow!("recordings lock"))?;
                        let rec = &mut *guard;
                        rec.answers.push((node, answer));
                        rec.handshakes.push((node, bytes));
                        // Keep the latest few only.
                        for list in [&mut rec.answers, &mut rec.handshakes] {
                            if list.len() > target.peers.len() * 2 {
                                list.remove(0);
                            }
                        }
                    }
                    {
                        let mut r = report.lock().map_err(|_| anyhow!("report lock"))?;
                        r.record(node, kind, &verdict);
                        if let Some(note) = note
                            && r.recordings.len() < target.peers.len() * 2
                        {
                            r.recordings.push(note);
                        }
                    }
                    std::thread::sleep(ATTEMPT_PAUSE);
                }
                Ok(())
            })
        })
        .collect();
    let mut errors = Vec::new();
    for t in threads {
        match t.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => errors.push(format!("{e:#}")),
            Err(_) => errors.push("an attack thread panicked".to_owned()),
        }
    }
    let mut report = report
        .lock()
        .map_err(|_| anyhow!("report lock poisoned"))?
        .clone();
    report.duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    for e in errors {
        report.failures.push(format!("intruder error: {e}"));
    }
    Ok(report)
}

/// Runs the intruder and writes its report to `path` (JSON).
pub fn run_to_file(target: &Target, duration: Duration, path: &Path) -> Result<Report> {
    let report = run(target, duration)?;
    std::fs::write(path, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn judge_tells_refusals_from_answers() {
        let refusal = plain_frame(b"\x01handshake refused").unwrap();
        assert_eq!(
            judge(&refusal, true),
            Verdict::Refused("handshake refused".to_owned())
        );
        assert_eq!(judge(&[], true), Verdict::Closed);
        assert_eq!(judge(&[], false), Verdict::Held);
        // A handshake continuation, or a refusal followed by anything, is an answer.
        let go_on = plain_frame(b"\x00abc").unwrap();
        assert!(matches!(judge(&go_on, true), Verdict::Answered(_)));
        let mut more = refusal.clone();
        more.push(0);
        assert!(matches!(judge(&more, true), Verdict::Answered(_)));
        assert!(matches!(judge(&refusal[..5], true), Verdict::Answered(_)));
    }

    #[test]
    fn forgeries_and_attempts_encode() {
        let target = Target {
            peers: vec!["127.0.0.1:1".parse().unwrap()],
            names: vec!["n1".to_owned(), "n2".to_owned()],
            cluster_name: "dynakv".to_owned(),
            own_addr: "10.77.0.2:9098".to_owned(),
        };
        let forged = forge(&target, "n2", [7; 32]).unwrap();
        for frame in [&forged.gossip, &forged.join, &forged.replica_put] {
            let env: Envelope<PeerMessage> =
                dynakv_server::transport::decode_payload(&frame[FRAME_HEADER_BYTES..]).unwrap();
            assert!(matches!(env.body, Body::Request(_)));
        }
        let hello = v2_hello(&target, "n2").unwrap();
        // magic, then version 2 as a varint: what version 2 sent.
        assert_eq!(&hello[4..10], b"dynakv");
        assert_eq!(hello[10], 2);
        let v3 = wrong_secret_attempt(&target, "n2", &forged.gossip).unwrap();
        assert_eq!(&v3[4..10], b"dynakv");
        assert!(
            [PROTOCOL_VERSION, PREVIOUS_PROTOCOL_VERSION]
                .iter()
                .any(|v| v3[10..12] == v.to_be_bytes()),
            "{:?}",
            &v3[10..12]
        );
    }
}

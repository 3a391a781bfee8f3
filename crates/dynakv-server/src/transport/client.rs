//! The client side: one persistent connection per peer address, multiplexed by request id,
//! with backoff and the handshake that opens it.

use super::{
    Arc, AsyncWriteExt, AtomicBool, AtomicU32, AtomicU64, Body, BytesMut, Duration, Envelope,
    FRAME_HEADER_BYTES, HANDSHAKE_CONTINUE, HANDSHAKE_REFUSED, HELLO_PREFIX_BYTES, HashMap, Hello,
    HelloReply, Instant, MAGIC, MAX_CONSECUTIVE_TIMEOUTS, MAX_HANDSHAKE_FRAME_BYTES, MAX_PEERS,
    MAX_PENDING_PER_PEER, MAX_WAIT, Mutex, Notify, OUTBOUND_QUEUE_FRAMES, Opener, Ordering,
    OwnedReadHalf, PROTOCOL_VERSION, Sealer, SocketAddr, TcpStream, TransportConfig,
    TransportError, WireMessage, decode_envelope_payload, decode_payload, encode_envelope, fmt,
    link, mpsc, older_version_in_refusal, oneshot, read_frame, watch, write_loop,
};

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

pub(super) struct ClientInner<M> {
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
pub(super) type ConnectSignal = watch::Receiver<Option<Result<(), ConnectFailure>>>;

#[derive(Debug, Clone)]
pub(super) enum ConnectFailure {
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
pub(super) struct PeerEntry<M> {
    peer: SocketAddr,
    config: Arc<TransportConfig>,
    state: Mutex<PeerState<M>>,
    /// Set when the owning client is dropped: a connect finishing later closes at once.
    client_dropped: AtomicBool,
    /// When a message was last refused for the peer's older protocol version and logged
    /// (at most one warning per [`OLDER_PEER_WARNING_INTERVAL`]).
    older_warned: Mutex<Option<Instant>>,
}

/// Least time between two warnings that messages to one peer were refused for its older
/// protocol version (during a rolling upgrade they may be many).
const OLDER_PEER_WARNING_INTERVAL: Duration = Duration::from_secs(10);

pub(super) struct PeerState<M> {
    link: Link<M>,
    /// While set and in the future, requests fail fast.
    backoff_until: Option<Instant>,
    /// The backoff the next failure will set.
    next_backoff: Duration,
    /// Why the last failure happened (reported by fail-fast errors).
    last_failure: String,
}

pub(super) enum Link<M> {
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
pub(super) struct Connection<M> {
    peer: SocketAddr,
    /// The protocol version the connection speaks.
    version: u16,
    outbound: mpsc::Sender<Vec<u8>>,
    shared: Mutex<ConnectionShared<M>>,
    next_request_id: AtomicU64,
    /// Timeouts since the last frame received.
    consecutive_timeouts: AtomicU32,
    /// Tells the connection's task to stop.
    closing: Notify,
}

pub(super) type ReplySender<M> = oneshot::Sender<Result<M, TransportError>>;

pub(super) struct ConnectionShared<M> {
    pending: HashMap<u64, ReplySender<M>>,
    /// Set once, when the connection closes: why.
    closed: Option<String>,
}

impl<M> Connection<M> {
    fn new(peer: SocketAddr, version: u16, outbound: mpsc::Sender<Vec<u8>>) -> Self {
        Self {
            peer,
            version,
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
pub(super) struct PendingGuard<'a, M> {
    connection: &'a Connection<M>,
    request_id: u64,
}

impl<M> Drop for PendingGuard<'_, M> {
    fn drop(&mut self) {
        self.connection.forget(self.request_id);
    }
}

/// A connection that passed the handshake, before its tasks start.
pub(super) struct Established {
    stream: TcpStream,
    /// The receiving direction (holding any bytes read after the hello reply).
    opener: Opener,
    sealer: Sealer,
    remote_node: String,
    version: u16,
}

impl<M> PeerEntry<M>
where
    M: WireMessage,
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
            older_warned: Mutex::new(None),
        }
    }

    /// Log (at most once per [`OLDER_PEER_WARNING_INTERVAL`]) that a message was not sent to
    /// this peer because its protocol version cannot carry it: the operator's answer to a
    /// write failing its quorum during a rolling upgrade.
    fn warn_older(&self, error: &TransportError) {
        let now = Instant::now();
        let mut last = self.older_warned.lock();
        if last.is_some_and(|at| now.duration_since(at) < OLDER_PEER_WARNING_INTERVAL) {
            return;
        }
        *last = Some(now);
        tracing::warn!(peer = %self.peer, error = %error, "a request was not sent: upgrade that node (further refusals to it are not logged for 10 s)");
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
        let connection = Arc::new(Connection::new(self.peer, established.version, outbound));
        {
            let mut state = self.state.lock();
            state.link = Link::Connected(Arc::clone(&connection));
            state.record_success(&self.config);
        }
        tracing::debug!(peer = %self.peer, remote_node = %established.remote_node, version = established.version, "peer connection established");
        if established.version != PROTOCOL_VERSION {
            tracing::info!(
                peer = %self.peer,
                remote_node = %established.remote_node,
                version = established.version,
                "the peer speaks only the previous protocol version: using it until the peer is upgraded"
            );
        }
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

pub(super) async fn connect_task<M>(
    entry: Arc<PeerEntry<M>>,
    done: watch::Sender<Option<Result<(), ConnectFailure>>>,
) where
    M: WireMessage,
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

/// Connect to `peer` and run the handshake, with this node's protocol version; when the
/// peer refuses it saying it speaks the previous version, connect again with that.
pub(super) async fn establish(
    config: &TransportConfig,
    peer: SocketAddr,
) -> Result<Established, ConnectFailure> {
    let newest = config.newest_version();
    match establish_with(config, peer, newest).await {
        Err(ConnectFailure::Rejected(reason)) => match older_version_in_refusal(&reason, newest) {
            Some(version) => establish_with(config, peer, version).await,
            None => Err(ConnectFailure::Rejected(reason)),
        },
        outcome => outcome,
    }
}

/// Connect to `peer` and run the handshake asking for protocol `version`.
async fn establish_with(
    config: &TransportConfig,
    peer: SocketAddr,
    version: u16,
) -> Result<Established, ConnectFailure> {
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
    let exchange = initiate(&mut stream, config, version);
    match tokio::time::timeout(config.handshake_timeout, exchange).await {
        Ok(Ok((opener, sealer, remote_node))) => Ok(Established {
            stream,
            opener,
            sealer,
            remote_node,
            version,
        }),
        Ok(Err(failure)) => Err(failure),
        Err(_) => Err(ConnectFailure::Unreachable(format!(
            "handshake timed out after {:?}",
            config.handshake_timeout
        ))),
    }
}

/// The hello, its clock read now: just before it is sent, so that the accepting side's
/// measure of the clock offset is off by the hello's one-way delay only (not by the connect
/// and the first handshake round trip, which a lost packet stretches to seconds).
fn hello_now(config: &TransportConfig) -> Result<Vec<u8>, ConnectFailure> {
    postcard::to_stdvec(&Hello {
        cluster_name: config.cluster_name.clone(),
        node_name: config.node_name.clone(),
        wall_clock_ms: config.clock.now_ms(),
    })
    .map_err(|e| ConnectFailure::Encode(format!("hello: {e}")))
}

/// The connecting side's handshake: the two sides' secrets and keys proven, the hello
/// accepted, the accepting side's name and key checked.
pub(super) async fn initiate(
    stream: &mut TcpStream,
    config: &TransportConfig,
    version: u16,
) -> Result<(Opener, Sealer, String), ConnectFailure> {
    let unreachable = ConnectFailure::Unreachable;
    let mut handshake = config.keys.initiator().map_err(ConnectFailure::Encode)?;
    let mut message = vec![0_u8; MAX_HANDSHAKE_FRAME_BYTES];
    let mut first = Vec::with_capacity(HELLO_PREFIX_BYTES + 64);
    first.extend_from_slice(&MAGIC);
    first.extend_from_slice(&version.to_be_bytes());
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
    let hello = hello_now(config)?;
    let written = handshake
        .write_message(&hello, &mut message)
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
pub(super) async fn write_plain_frame(
    stream: &mut TcpStream,
    payload: &[u8],
) -> Result<(), String> {
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
pub(super) async fn run_connection<M>(
    entry: Arc<PeerEntry<M>>,
    connection: Arc<Connection<M>>,
    stream: TcpStream,
    (opener, sealer): (Opener, Sealer),
    outbound_queue: mpsc::Receiver<Vec<u8>>,
) where
    M: WireMessage,
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
pub(super) async fn client_read_loop<M: WireMessage>(
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
        match decode_envelope_payload::<M>(&payload, connection.version) {
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
    M: WireMessage,
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
        let frame = encode_envelope(
            Envelope {
                request_id,
                body: Body::Request(message),
            },
            connection.version,
            peer,
            self.inner.config.max_frame_bytes,
        )
        .inspect_err(|e| {
            if matches!(e, TransportError::OlderPeer { .. }) {
                entry.warn_older(e);
            }
        })?;
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

    /// The newest protocol version this client speaks (its configuration's).
    pub fn newest_version(&self) -> u16 {
        self.inner.config.newest_version()
    }

    /// The protocol version of each live connection, by peer address (sorted).
    pub fn protocol_versions(&self) -> Vec<(SocketAddr, u16)> {
        let entries: Vec<_> = self.inner.peers.lock().values().map(Arc::clone).collect();
        let mut versions: Vec<(SocketAddr, u16)> = entries
            .iter()
            .filter_map(|entry| match &entry.state.lock().link {
                Link::Connected(connection) if !connection.is_closed() => {
                    Some((entry.peer, connection.version))
                }
                Link::Connected(_) | Link::Connecting(_) | Link::Idle => None,
            })
            .collect();
        versions.sort_unstable();
        versions
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

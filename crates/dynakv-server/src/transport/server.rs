//! The server side: accept, handshake, serve requests with bounded concurrency and memory.

use super::{
    ACCEPT_ERROR_PAUSE, Arc, AssertUnwindSafe, AsyncWriteExt, Body, BytesMut,
    CLOCK_OFFSET_WARNING_MS, Envelope, FrameBudget, Future, FutureExt, HANDSHAKE_CONTINUE,
    HANDSHAKE_REFUSED, HELLO_PREFIX_BYTES, HashMap, Hello, HelloReply, JoinSet, MAGIC,
    MAX_CONNECTIONS_PER_PEER_NAME, MAX_HANDSHAKE_FRAME_BYTES, MAX_HANDSHAKING_CONNECTIONS,
    MAX_INBOUND_CONNECTIONS, Mutex, OUTBOUND_QUEUE_FRAMES, Opener, OwnedReadHalf,
    OwnedSemaphorePermit, PROTOCOL_VERSION, PeerInfo, REFUSED_REASON, SHUTDOWN_DRAIN_TIMEOUT,
    SUPPORTED_PROTOCOL_VERSIONS, Sealer, Semaphore, SocketAddr, TcpListener, TcpStream,
    TransportConfig, WireMessage, decode_envelope_payload, decode_payload, encode_envelope,
    encode_frame, link, mpsc, read_frame, watch, write_loop, write_plain_frame,
};

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
    M: WireMessage,
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
pub(super) struct InboundSlots {
    per_name: Mutex<HashMap<String, usize>>,
    frame_memory: FrameBudget,
}

/// One authenticated connection's slot; given back when dropped.
pub(super) struct InboundSlot {
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

pub(super) async fn serve_connection<M, H, Fut>(
    mut stream: TcpStream,
    remote_addr: SocketAddr,
    config: Arc<TransportConfig>,
    handler: H,
    stop: watch::Receiver<bool>,
    (handshake_slot, slots): (OwnedSemaphorePermit, Arc<InboundSlots>),
) where
    M: WireMessage,
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
        version,
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
    if version != PROTOCOL_VERSION {
        tracing::info!(
            peer = %node_name,
            %remote_addr,
            version,
            "peer connected with the previous protocol version (it has not been upgraded yet)"
        );
    }
    let peer = PeerInfo {
        node_name,
        public_key,
        remote_addr,
        clock_offset_ms,
        protocol_version: version,
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
pub(super) struct Accepted {
    hello: Hello,
    public_key: [u8; 32],
    arrived_ms: u64,
    opener: Opener,
    sealer: Sealer,
    /// The protocol version the peer asked for (a supported one).
    version: u16,
}

/// The accepting side's handshake up to the decrypted hello. `Err`: why it failed (a
/// refusal was sent when the peer could be told something useful).
pub(super) async fn accept_handshake(
    stream: &mut TcpStream,
    config: &TransportConfig,
) -> Result<Accepted, String> {
    let mut buffer = BytesMut::new();
    let first = read_frame(stream, &mut buffer, MAX_HANDSHAKE_FRAME_BYTES)
        .await?
        .ok_or_else(|| "closed before the hello".to_owned())?;
    let version = match check_handshake_prefix(&first, config.newest_version()) {
        Ok(version) => version,
        Err(reason) => {
            refuse(stream, &reason).await;
            return Err(reason);
        }
    };
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
        version,
    })
}

/// Tell the connecting side why it is refused (in the clear) and close.
pub(super) async fn refuse(stream: &mut TcpStream, reason: &str) {
    let mut answer = vec![HANDSHAKE_REFUSED];
    answer.extend_from_slice(reason.as_bytes());
    let _ = write_plain_frame(stream, &answer).await;
    let _ = stream.shutdown().await;
}

/// Whether the first handshake frame starts with our magic and a protocol version this node
/// speaks (a supported one up to `newest`); `Ok`: that version.
///
/// # Errors
/// Why the frame is refused (the connecting side is told).
pub fn check_handshake_prefix(first: &[u8], newest: u16) -> Result<u16, String> {
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
    if version > newest || !SUPPORTED_PROTOCOL_VERSIONS.contains(&version) {
        let accepted: Vec<u16> = SUPPORTED_PROTOCOL_VERSIONS
            .into_iter()
            .filter(|v| *v <= newest)
            .collect();
        return Err(format!(
            "protocol version {version} is not supported: this node speaks version {newest} \
             (and accepts {accepted:?})"
        ));
    }
    Ok(version)
}

/// Whether an authenticated hello is acceptable: our cluster, and a name the verifier binds
/// to the key the peer proved.
pub(super) fn check_hello(
    hello: &Hello,
    key: &[u8; 32],
    config: &TransportConfig,
) -> Result<(), String> {
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
pub(super) async fn server_read_loop<M, H, Fut>(
    mut reader: OwnedReadHalf,
    mut opener: Opener,
    peer: PeerInfo,
    config: &TransportConfig,
    handler: H,
    outbound: mpsc::Sender<Vec<u8>>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), String>
where
    M: WireMessage,
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
        let envelope: Envelope<M> =
            decode_envelope_payload(&payload, peer.protocol_version).map_err(|e| e.to_string())?;
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

pub(super) async fn handle_request<M, H, Fut>(
    handler: H,
    peer: PeerInfo,
    request_id: u64,
    message: M,
    limit: usize,
    outbound: mpsc::Sender<Vec<u8>>,
    _permit: OwnedSemaphorePermit,
) where
    M: WireMessage,
    H: Fn(PeerInfo, M) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = M> + Send + 'static,
{
    let remote_addr = peer.remote_addr;
    let version = peer.protocol_version;
    let handled = AssertUnwindSafe(async move { handler(peer, message).await })
        .catch_unwind()
        .await;
    let body = if let Ok(reply) = handled {
        Body::Response(reply)
    } else {
        tracing::error!(%remote_addr, request_id, "peer request handler panicked");
        Body::Error("the request handler panicked".to_owned())
    };
    let frame = match encode_envelope(Envelope { request_id, body }, version, remote_addr, limit) {
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

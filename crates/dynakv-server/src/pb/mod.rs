//! Riak's Protocol Buffers API (port 8087): the listener, the framing, the connection's
//! security state, and the dispatch of each message to the same request paths as HTTP
//! (`crate::requests`: the core's request machines; `kv` and `props` only translate).
//!
//! Every input is bounded: a frame's length is checked before its body is read (longer than
//! the node's largest value plus [`FRAME_OVERHEAD_BYTES`]: an error response and the
//! connection closed, since the frame cannot be skipped safely); a frame's body must arrive
//! within `body_read_timeout` and is counted in the node's request-body budget; a connection
//! idle past `pb_idle_timeout` is closed; at most `max_connections` are open (the HTTP
//! port's cap, counted apart). A malformed message, a missing required field, an unknown
//! code or a message dynakv does not implement is answered with `RpbErrorResp` and the
//! connection is kept: the framing is intact.

use crate::http::AppState;
use crate::http_serve::ClientConnection;
use dynakv_pb::{code, encode_empty, encode_error, encode_frame};
use prost::Message as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

mod dt;
mod kv;
mod props;
mod secondary;

/// Bytes a frame may hold beyond the node's largest value (key, metadata, the other fields).
pub const FRAME_OVERHEAD_BYTES: usize = 64 * 1024;
/// A connection is closed when its client takes longer than this to read what it is sent.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest client id kept (`RpbSetClientIdReq`; Riak's are 4 bytes).
const MAX_CLIENT_ID_BYTES: usize = 64;
/// How long connections may finish their request once the node stops.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Bytes of responses gathered before they are written (pipelined requests are answered in
/// one write up to this).
const WRITE_BATCH_BYTES: usize = 64 * 1024;
/// Longest frame of any message but a put (the others carry names and small fields; prost
/// decodes repeated fields into structures several times their wire size).
const MAX_SMALL_FRAME_BYTES: usize = 64 * 1024;
/// The read buffer kept between frames; a larger one (after a large put) is given back.
const READ_BUFFER_BYTES: usize = 16 * 1024;

/// Serve the PB API on `listener` until `shutdown` turns true. `tls`: the node's TLS
/// configuration, which `RpbStartTls` switches a connection to.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    tls: Option<Arc<rustls::ServerConfig>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let cap = state.http.limits.max_connections.max(1);
    let slots = Arc::new(tokio::sync::Semaphore::new(cap));
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.wait_for(|stop| *stop) => break,
        };
        while connections.try_join_next().is_some() {}
        let (tcp, remote_addr) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "cannot accept a PB connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            let mut out = Vec::new();
            encode_error(
                &mut out,
                &format!("too many connections: this node serves at most {cap} PB clients"),
            );
            let _ = tcp.try_write(&out);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let session = Session {
            state: Arc::clone(&state),
            connection: ClientConnection {
                remote_addr,
                tls: false,
                client_certificate: None,
            },
            user: None,
            client_id: rand::random::<[u8; 4]>().to_vec(),
            held: Vec::new(),
            tls_available: acceptor.is_some(),
        };
        let (acceptor, shutdown) = (acceptor.clone(), shutdown.clone());
        connections.spawn(async move {
            connection(session, tcp, acceptor, shutdown).await;
            drop(slot);
        });
    }
    drop(listener);
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while connections.join_next().await.is_some() {}
    });
    if drained.await.is_err() {
        tracing::warn!("PB connections still open after the shutdown grace period");
    }
}

/// One client connection: plain until the client asks for `RpbStartTls`, TLS after.
async fn connection(
    mut session: Session,
    mut tcp: TcpStream,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut frames = Frames::default();
    if run(&mut session, &mut frames, &mut tcp, &mut shutdown).await != End::StartTls {
        return;
    }
    // The client starts its handshake once it has read the answer: bytes sent before that
    // would be a client that does not wait, and are not taken as part of the handshake.
    let (Some(acceptor), true) = (acceptor, frames.is_empty()) else {
        return;
    };
    let timeout = session.state.http.limits.header_read_timeout;
    let Ok(Ok(mut stream)) = tokio::time::timeout(timeout, acceptor.accept(tcp)).await else {
        tracing::debug!(client = %session.connection.remote_addr, "PB TLS handshake failed");
        return;
    };
    session.connection.tls = true;
    session.connection.client_certificate = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(<[_]>::first)
        .map(|cert| cert.clone().into_owned());
    let mut frames = Frames::default();
    let _ = run(&mut session, &mut frames, &mut stream, &mut shutdown).await;
    let _ = stream.shutdown().await;
}

#[derive(Debug, PartialEq, Eq)]
enum End {
    Closed,
    StartTls,
}

/// What a message asks of the connection after its answer.
pub(crate) enum Control {
    Continue,
    /// Switch to TLS once the answer is written.
    StartTls,
    /// A streamed listing: the frames come from this channel until it ends.
    Stream(tokio::sync::mpsc::Receiver<Vec<u8>>),
}

/// Read frames, answer them in order, until the client closes, a limit closes the
/// connection, the node stops, or the client asks for TLS.
async fn run<S: AsyncRead + AsyncWrite + Unpin>(
    session: &mut Session,
    frames: &mut Frames,
    stream: &mut S,
    shutdown: &mut watch::Receiver<bool>,
) -> End {
    let limits = session.state.http.limits.clone();
    let limit = session
        .state
        .max_value_bytes
        .saturating_add(FRAME_OVERHEAD_BYTES);
    let mut out = Vec::new();
    loop {
        if (!frames.has_frame() || out.len() >= WRITE_BATCH_BYTES) && !out.is_empty() {
            if !write(stream, &out).await {
                return End::Closed;
            }
            out.clear();
            session.held.clear();
        }
        if *shutdown.borrow() {
            return End::Closed;
        }
        let next = tokio::select! {
            next = frames.next(stream, &limits, limit, session) => next,
            _ = shutdown.wait_for(|stop| *stop) => return End::Closed,
        };
        let (code, body) = match next {
            Ok(Some(frame)) => frame,
            Ok(None) | Err(FrameFault::Gone) => return End::Closed,
            Err(FrameFault::Refused(message)) => {
                encode_error(&mut out, &message);
                let _ = write(stream, &out).await;
                return End::Closed;
            }
            Err(FrameFault::Skipped(message)) => {
                encode_error(&mut out, &message);
                continue;
            }
        };
        let control = session.handle(code, &frames.buf[body], &mut out).await;
        frames.release();
        match control {
            Control::Continue => {}
            Control::StartTls => {
                if !write(stream, &out).await {
                    return End::Closed;
                }
                session.held.clear();
                return End::StartTls;
            }
            Control::Stream(mut pages) => {
                if !write(stream, &out).await {
                    return End::Closed;
                }
                out.clear();
                session.held.clear();
                // Each page is written as it comes: memory is the channel's few pages. The
                // node's stop ends the listing (its task stops when the channel closes).
                loop {
                    let page = tokio::select! {
                        page = pages.recv() => page,
                        _ = shutdown.wait_for(|stop| *stop) => return End::Closed,
                    };
                    let Some(page) = page else { break };
                    if !write(stream, &page).await {
                        return End::Closed;
                    }
                }
            }
        }
    }
}

/// Write all of `bytes` within [`WRITE_TIMEOUT`]; false when the connection is unusable.
async fn write<S: AsyncWrite + Unpin>(stream: &mut S, bytes: &[u8]) -> bool {
    matches!(
        tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(bytes)).await,
        Ok(Ok(()))
    )
}

/// Why no frame was read.
enum FrameFault {
    /// Answer this and close: the frame's length is over the limit (its body is not read).
    Refused(String),
    /// Answer this and go on: the frame was read past (its body did not fit the budget).
    Skipped(String),
    /// The connection closed, failed or timed out in the middle of a frame, or sat idle.
    Gone,
}

/// Bytes read from a connection and not yet consumed.
#[derive(Default)]
struct Frames {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// The request-body budget held by the frame being handled.
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Frames {
    fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// A whole frame is buffered.
    fn has_frame(&self) -> bool {
        let buffered = &self.buf[self.start..self.end];
        buffered.len() >= dynakv_pb::LENGTH_BYTES
            && buffered[..dynakv_pb::LENGTH_BYTES]
                .try_into()
                .map(u32::from_be_bytes)
                .is_ok_and(|length| {
                    (length as usize).saturating_add(dynakv_pb::LENGTH_BYTES) <= buffered.len()
                })
    }

    /// The frame was handled: its budget is returned, and a buffer grown for a large frame
    /// is given back once nothing else is buffered.
    fn release(&mut self) {
        self.permit = None;
        if self.buf.len() > READ_BUFFER_BYTES && self.is_empty() {
            self.buf = Vec::new();
            self.start = 0;
            self.end = 0;
        }
    }

    /// The next frame's code and where its body is in `buf`; `None` when the client closed
    /// between frames.
    async fn next<S: AsyncRead + Unpin>(
        &mut self,
        stream: &mut S,
        limits: &crate::http_serve::HttpLimits,
        limit: usize,
        session: &Session,
    ) -> Result<Option<(u8, std::ops::Range<usize>)>, FrameFault> {
        // Between frames the client may be idle up to the idle timeout.
        match tokio::time::timeout(
            limits.pb_idle_timeout,
            self.fill_to(stream, dynakv_pb::LENGTH_BYTES),
        )
        .await
        {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) if self.is_empty() => return Ok(None),
            _ => return Err(FrameFault::Gone),
        }
        let mut prefix = [0u8; dynakv_pb::LENGTH_BYTES];
        prefix.copy_from_slice(&self.buf[self.start..self.start + dynakv_pb::LENGTH_BYTES]);
        let length = dynakv_pb::frame_length(prefix, limit)
            .map_err(|e| FrameFault::Refused(format!("{e}: the connection is closed")))?;
        if length > MAX_SMALL_FRAME_BYTES {
            // Only a put may be large: its code decides, before any of its body is read.
            match tokio::time::timeout(
                limits.body_read_timeout,
                self.fill_to(stream, dynakv_pb::LENGTH_BYTES + 1),
            )
            .await
            {
                Ok(Ok(true)) => {}
                _ => return Err(FrameFault::Gone),
            }
            let code = self.buf[self.start + dynakv_pb::LENGTH_BYTES];
            if code != code::PUT_REQ && code != code::DT_UPDATE_REQ {
                return Err(FrameFault::Refused(format!(
                    "a frame of {length} bytes for message code {code}: only a put or a data \
                     type update may be longer than {MAX_SMALL_FRAME_BYTES}; the connection is \
                     closed"
                )));
            }
        }
        self.start += dynakv_pb::LENGTH_BYTES;
        let permit = match session.state.http.reserve_request_body(length) {
            Ok(permit) => Some(permit),
            Err(message) => {
                // Read past the body so the next frame is found, without keeping it.
                let skipped =
                    tokio::time::timeout(limits.body_read_timeout, self.skip(stream, length)).await;
                return match skipped {
                    Ok(Ok(true)) => Err(FrameFault::Skipped(message)),
                    _ => Err(FrameFault::Gone),
                };
            }
        };
        match tokio::time::timeout(limits.body_read_timeout, self.fill_to(stream, length)).await {
            Ok(Ok(true)) => {}
            _ => return Err(FrameFault::Gone),
        }
        let code = self.buf[self.start];
        let body = self.start + 1..self.start + length;
        self.start += length;
        self.permit = permit;
        Ok(Some((code, body)))
    }

    /// Read until `want` bytes are buffered; false at end of stream first.
    async fn fill_to<S: AsyncRead + Unpin>(
        &mut self,
        stream: &mut S,
        want: usize,
    ) -> std::io::Result<bool> {
        while self.end - self.start < want {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            let room = want.max(READ_BUFFER_BYTES);
            if self.buf.len() < room {
                self.buf.resize(room, 0);
            }
            let n = stream.read(&mut self.buf[self.end..]).await?;
            if n == 0 {
                return Ok(false);
            }
            self.end += n;
        }
        Ok(true)
    }

    /// Consume `n` bytes, reading them in bounded pieces; false at end of stream first.
    async fn skip<S: AsyncRead + Unpin>(
        &mut self,
        stream: &mut S,
        mut n: usize,
    ) -> std::io::Result<bool> {
        loop {
            let here = n.min(self.end - self.start);
            self.start += here;
            n -= here;
            if n == 0 {
                return Ok(true);
            }
            if !self.fill_to(stream, 1).await? {
                return Ok(false);
            }
        }
    }
}

/// One connection's state.
pub(crate) struct Session {
    pub(crate) state: AppState,
    pub(crate) connection: ClientConnection,
    /// The user the connection authenticated as (`RpbAuthReq`), when security is enabled.
    user: Option<String>,
    client_id: Vec<u8>,
    /// Response-budget reservations of the answers in the write buffer, released once written.
    pub(crate) held: Vec<tokio::sync::OwnedSemaphorePermit>,
    /// The node has a TLS certificate: `RpbStartTls` can be served.
    tls_available: bool,
}

impl Session {
    /// Answer one message into `out`.
    async fn handle(&mut self, code: u8, body: &[u8], out: &mut Vec<u8>) -> Control {
        if let Err(refusal) = self.gate(code) {
            encode_error(out, &refusal);
            return Control::Continue;
        }
        match code {
            code::PING_REQ => encode_empty(out, code::PING_RESP),
            code::GET_CLIENT_ID_REQ => encode_frame(
                out,
                code::GET_CLIENT_ID_RESP,
                &dynakv_pb::RpbGetClientIdResp {
                    client_id: Some(self.client_id.clone()),
                },
            ),
            code::SET_CLIENT_ID_REQ => match dynakv_pb::RpbSetClientIdReq::decode(body) {
                Ok(dynakv_pb::RpbSetClientIdReq {
                    client_id: Some(id),
                }) if id.len() <= MAX_CLIENT_ID_BYTES => {
                    // Accepted and unused: dynakv's actors are the nodes' (Riak 1.x's
                    // client ids are not part of its causality).
                    self.client_id = id;
                    encode_empty(out, code::SET_CLIENT_ID_RESP);
                }
                Ok(_) => encode_error(
                    out,
                    &format!("client_id is required, at most {MAX_CLIENT_ID_BYTES} bytes"),
                ),
                Err(e) => encode_error(out, &format!("malformed RpbSetClientIdReq: {e}")),
            },
            code::GET_SERVER_INFO_REQ => encode_frame(
                out,
                code::GET_SERVER_INFO_RESP,
                &dynakv_pb::RpbGetServerInfoResp {
                    node: Some(self.state.node_name.as_bytes().to_vec()),
                    server_version: Some(crate::RIAK_COMPAT_VERSION.as_bytes().to_vec()),
                },
            ),
            code::START_TLS => return self.start_tls(out),
            code::AUTH_REQ => self.authenticate(body, out).await,
            code::GET_REQ
            | code::PUT_REQ
            | code::DEL_REQ
            | code::LIST_KEYS_REQ
            | code::LIST_BUCKETS_REQ
            | code::GET_BUCKET_KEY_PREFLIST_REQ
            | code::DT_FETCH_REQ
            | code::DT_UPDATE_REQ
            | code::INDEX_REQ => return self.data_request(code, body, out).await,
            code::GET_BUCKET_REQ
            | code::SET_BUCKET_REQ
            | code::RESET_BUCKET_REQ
            | code::GET_BUCKET_TYPE_REQ
            | code::SET_BUCKET_TYPE_REQ => {
                if let Err(message) = self.bucket_request(code, body, out).await {
                    encode_error(out, &message);
                }
            }
            other => encode_error(out, &unsupported(other)),
        }
        Control::Continue
    }

    /// With security enabled, a connection must switch to TLS and then authenticate before
    /// anything else (as Riak's PB port requires).
    fn gate(&self, code: u8) -> Result<(), String> {
        if !self.state.cluster.state().security.enabled() || self.user.is_some() {
            return Ok(());
        }
        match (self.connection.tls, code) {
            (false, code::START_TLS) | (true, code::AUTH_REQ) => Ok(()),
            (false, _) => Err("Security is enabled, please STARTTLS first".to_owned()),
            (true, _) => Err("Security is enabled, please authenticate first".to_owned()),
        }
    }

    fn start_tls(&mut self, out: &mut Vec<u8>) -> Control {
        if self.connection.tls {
            encode_error(out, "this connection is already TLS");
            return Control::Continue;
        }
        if !self.state.cluster.state().security.enabled() {
            encode_error(out, "Security not enabled; STARTTLS not allowed.");
            return Control::Continue;
        }
        if !self.tls_available {
            encode_error(
                out,
                "this node has no TLS certificate (--tls-cert, --tls-key): STARTTLS is not possible",
            );
            return Control::Continue;
        }
        encode_empty(out, code::START_TLS);
        Control::StartTls
    }

    async fn authenticate(&mut self, body: &[u8], out: &mut Vec<u8>) {
        let security = self.state.cluster.state();
        let security = &security.security;
        if !security.enabled() {
            encode_error(out, "Security not enabled; authentication is not needed");
            return;
        }
        let request = match dynakv_pb::RpbAuthReq::decode(body) {
            Ok(request) => request,
            Err(e) => return encode_error(out, &format!("malformed RpbAuthReq: {e}")),
        };
        let (Some(user), Some(password)) = (request.user, request.password) else {
            return encode_error(out, "RpbAuthReq needs user and password");
        };
        let (Ok(user), Ok(password)) = (String::from_utf8(user), String::from_utf8(password))
        else {
            return encode_error(out, "Authentication failed");
        };
        match crate::auth::authenticate(
            security,
            &self.state.http.auth,
            &self.connection,
            &user,
            &password,
        )
        .await
        {
            Ok(()) => {
                self.user = Some(user);
                encode_empty(out, code::AUTH_RESP);
            }
            Err(refusal) => {
                tracing::info!(?refusal, client = %self.connection.remote_addr, "PB authentication refused");
                encode_error(out, "Authentication failed");
            }
        }
    }

    /// With security enabled, whether the authenticated user holds `permission` (on
    /// `bucket`, or on any bucket for `None`).
    fn permitted(
        &self,
        permission: dynakv_core::security::Permission,
        bucket: Option<&str>,
    ) -> Result<(), String> {
        let state = self.state.cluster.state();
        if !state.security.enabled() {
            return Ok(());
        }
        let Some(user) = &self.user else {
            return Err("Security is enabled, please authenticate first".to_owned());
        };
        let needed = crate::auth::Required::Permission(permission, bucket.map(str::to_owned));
        crate::auth::permit(&state.security, user, needed).map_err(|refusal| match refusal {
            crate::auth::Refusal::Forbidden { user, needed } => {
                format!("Permission denied: user {user:?} needs {needed}")
            }
            _ => "Permission denied".to_owned(),
        })
    }
}

/// The error text for a message code dynakv does not serve.
fn unsupported(code: u8) -> String {
    let what = match code {
        code::MAP_RED_REQ => "MapReduce (RpbMapRedReq)",
        code::SEARCH_QUERY_REQ | 54..=60 => "Riak Search (Yokozuna)",
        code::CS_BUCKET_REQ => "bucket folds for Riak CS (RpbCSBucketReq)",
        code::COUNTER_UPDATE_REQ | code::COUNTER_GET_REQ => "Riak 1.4 counters",
        code::COVERAGE_REQ => "coverage plans (RpbCoverageReq)",
        90..=104 => "Riak TS",
        _ => return format!("unknown message code {code}"),
    };
    format!("{what} is not supported by dynakv (message code {code})")
}

/// Bind the PB port when one is configured: the listener and the address it got.
pub(crate) async fn bind(
    addr: Option<SocketAddr>,
) -> Result<(Option<TcpListener>, Option<SocketAddr>), crate::ServerError> {
    let Some(addr) = addr else {
        return Ok((None, None));
    };
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| crate::ServerError::Bind { addr, source })?;
    let bound = listener.local_addr()?;
    Ok((Some(listener), Some(bound)))
}

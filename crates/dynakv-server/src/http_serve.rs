//! The client HTTP port's accept loop: connections that cannot be held open.
//!
//! It owns the listener, the connections and their limits (issue 17, rows 11 and 12):
//! - **a connection cap** (`HttpLimits::max_connections`, and never more than a share of the
//!   process's open-file limit, which [`raise_open_file_limit`] raises to its hard limit at
//!   start): a connection past the cap gets a one-line 503 if its socket takes it at once
//!   and is closed, so a flood of idle connections cannot use up the process's descriptors
//!   (the peer port, storage and the other nodes of a `dynakv dev` process keep theirs);
//! - **a header read timeout**, which hyper counts from when it starts waiting for a
//!   request's head: a connection that sends no complete request head in that time (a
//!   slowloris, or a kept-alive connection left idle) is closed. It is also the idle
//!   keep-alive timeout;
//! - the **body read timeout** and the in-flight permit taken only once the body has
//!   arrived live in `http.rs` (`guard_request`), with the router;
//! - **TLS** when the node has a certificate ([`crate::tls`]): the handshake runs in the
//!   connection's own task, holding its slot under the cap, within the header read timeout;
//!   a handshake that fails or does not finish in time closes that connection only.
//!
//! Every request served carries a [`ClientConnection`] extension (the client's address,
//! whether the connection is TLS, and the client's verified certificate if it presented one),
//! for the handlers that need to know (authentication).
//!
//! Shutdown: when `shutdown` resolves the listener closes, every connection is told to
//! finish its request in flight and then close (hyper's graceful shutdown), and the loop
//! returns once all have, or after `HTTP_SHUTDOWN_GRACE`.

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

/// How long a connection may take to send a request's complete head (request line and
/// headers), counted from when the server starts waiting for it. On a kept-alive connection
/// the wait starts when the previous response was sent, so this is also the idle
/// keep-alive timeout.
pub const HTTP_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a request's body may take to arrive in full once its head has (at 1 MiB, the
/// default largest value, a client must send at least ~35 KB/s).
pub const HTTP_BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// A PB connection with no request for this long is closed (clients' pools reconnect).
pub const PB_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Most client HTTP connections one node holds open at once (the cap may be lower: see
/// [`OPEN_FILE_SHARE_DIVISOR`]). Connections past it are refused.
pub const MAX_HTTP_CONNECTIONS: usize = 16_384;
/// One node's HTTP connections take at most this fraction (1/divisor) of the process's
/// open-file limit: the rest is for storage, peer links and, in `dynakv dev`, the other
/// nodes of the process.
pub const OPEN_FILE_SHARE_DIVISOR: u64 = 4;
/// The connection cap is never below this (a process with a tiny open-file limit still
/// serves a few clients).
pub const MIN_HTTP_CONNECTIONS: usize = 16;
/// Bytes of request bodies all requests of a node may hold at once (being received or being
/// served). A request whose body does not fit is answered 503 at once.
pub const MAX_REQUEST_BODY_BYTES_IN_FLIGHT: usize = 256 * 1024 * 1024;
/// Bytes of object responses (values, multipart sibling sets) a node may hold at once while
/// they are sent. A response that does not fit is answered 503 (retry later); one larger
/// than the whole budget is answered 413 (resolve the siblings).
pub const MAX_RESPONSE_BYTES_IN_FLIGHT: usize = 256 * 1024 * 1024;
/// Pause after a failed `accept` (out of descriptors, out of memory) before the next one, so
/// the loop does not spin.
pub const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);
/// How long shutdown waits for open connections to finish their requests in flight.
pub const HTTP_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// At most one "connection refused at the cap" warning per this interval.
const REFUSAL_WARN_EVERY: Duration = Duration::from_secs(10);

const _: () = assert!(MIN_HTTP_CONNECTIONS <= MAX_HTTP_CONNECTIONS);
const _: () = assert!(MAX_REQUEST_BODY_BYTES_IN_FLIGHT / 1024 <= u32::MAX as usize);
const _: () = assert!(MAX_RESPONSE_BYTES_IN_FLIGHT / 1024 <= u32::MAX as usize);

/// The client HTTP port's limits. [`HttpLimits::default`] is what `dynakv server` runs with;
/// tests start nodes with lower ones (`dynakv_server::start_with_http`).
#[derive(Debug, Clone)]
pub struct HttpLimits {
    /// See [`HTTP_HEADER_READ_TIMEOUT`].
    pub header_read_timeout: Duration,
    /// See [`HTTP_BODY_READ_TIMEOUT`].
    pub body_read_timeout: Duration,
    /// See [`MAX_HTTP_CONNECTIONS`] (the open-file limit may lower it).
    pub max_connections: usize,
    /// See [`MAX_REQUEST_BODY_BYTES_IN_FLIGHT`].
    pub request_body_budget_bytes: usize,
    /// See [`MAX_RESPONSE_BYTES_IN_FLIGHT`].
    pub response_budget_bytes: usize,
    /// Origins (`scheme://host[:port]`, compared exactly) whose pages may make
    /// state-changing requests (PUT, POST, DELETE, PATCH). Empty by default: a
    /// state-changing request carrying any `Origin` header (a browser's cross-site request)
    /// is refused with 403. Clients that are not browsers send no `Origin` and are not
    /// affected.
    pub allowed_origins: Vec<String>,
    /// See [`PB_IDLE_TIMEOUT`]; a PB frame's body, once its length arrived, must arrive
    /// within `body_read_timeout`.
    pub pb_idle_timeout: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            header_read_timeout: HTTP_HEADER_READ_TIMEOUT,
            body_read_timeout: HTTP_BODY_READ_TIMEOUT,
            max_connections: MAX_HTTP_CONNECTIONS,
            request_body_budget_bytes: MAX_REQUEST_BODY_BYTES_IN_FLIGHT,
            response_budget_bytes: MAX_RESPONSE_BYTES_IN_FLIGHT,
            allowed_origins: Vec::new(),
            pb_idle_timeout: PB_IDLE_TIMEOUT,
        }
    }
}

/// Raise the process's soft open-file limit (`RLIMIT_NOFILE`) to its hard limit and return
/// the soft limit in force after (`None` when it cannot be read).
pub fn raise_open_file_limit() -> Option<u64> {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => Some(limit),
        Err(e) => {
            tracing::warn!(error = %e, "cannot raise the open-file limit");
            rlimit::getrlimit(rlimit::Resource::NOFILE)
                .ok()
                .map(|(soft, _)| soft)
        }
    }
}

/// The connection cap: `wanted`, but at most a share of `open_file_limit` and at least
/// `MIN_HTTP_CONNECTIONS`.
pub fn connection_cap(wanted: usize, open_file_limit: Option<u64>) -> usize {
    let share = open_file_limit.map_or(usize::MAX, |limit| {
        usize::try_from(limit / OPEN_FILE_SHARE_DIVISOR).unwrap_or(usize::MAX)
    });
    wanted
        .min(share)
        .max(MIN_HTTP_CONNECTIONS.min(wanted))
        .max(1)
}

/// What a refused connection is told before it is closed (written only if the socket takes
/// it at once).
const REFUSAL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n\
Connection: close\r\nRetry-After: 1\r\nContent-Length: 46\r\n\r\ntoo many open connections to this node; retry\n";

/// What the accept loop knows about the connection a request came on; every request served
/// carries it as an extension (`req.extensions().get::<ClientConnection>()`).
#[derive(Debug, Clone)]
pub struct ClientConnection {
    /// The client's address, as the TCP connection shows it.
    pub remote_addr: SocketAddr,
    /// Whether the connection is TLS (the request arrived encrypted and the client checked
    /// the node's certificate, if it checks certificates).
    pub tls: bool,
    /// The client's certificate (the end-entity one), when the node verifies client
    /// certificates (`--tls-client-ca`) and the client presented one: rustls verified it
    /// against the client CAs during the handshake.
    pub client_certificate: Option<rustls::pki_types::CertificateDer<'static>>,
}

/// A service that hands every request to `inner` with the connection's [`ClientConnection`]
/// inserted as an extension (one per connection).
#[derive(Debug, Clone)]
pub struct WithClientConnection<S> {
    inner: S,
    connection: ClientConnection,
}

impl<S> WithClientConnection<S> {
    /// `inner`, with `connection` given to each request.
    pub fn new(inner: S, connection: ClientConnection) -> Self {
        WithClientConnection { inner, connection }
    }
}

impl<S, B> hyper::service::Service<hyper::Request<B>> for WithClientConnection<S>
where
    S: hyper::service::Service<hyper::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn call(&self, mut request: hyper::Request<B>) -> Self::Future {
        request.extensions_mut().insert(self.connection.clone());
        self.inner.call(request)
    }
}

/// Serve `app` on `listener` until `shutdown` resolves (see the module documentation), over
/// TLS when `tls` is given.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: &HttpLimits,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: impl Future<Output = ()>,
) {
    let open_files = raise_open_file_limit();
    let cap = connection_cap(limits.max_connections, open_files);
    tracing::debug!(cap, open_file_limit = ?open_files, "HTTP connection cap");
    let slots = Arc::new(Semaphore::new(cap));
    let refused = AtomicU64::new(0);
    let mut last_warned: Option<std::time::Instant> = None;
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        // Not `pipeline_flush`: measured 1.05-1.09x for clients that pipeline, but with it
        // hyper never sent the 413 to a chunked body cut off at the limit (BENCHMARKS.md,
        // "HTTP pipelining"; test `oversized_values_are_refused_before_the_body_is_read`).
        .keep_alive(true);
    let graceful = GracefulShutdown::new();
    let service = TowerToHyperService::new(app);
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    // Turns true at shutdown: connections still in their TLS handshake give up at once.
    let (closing_tx, closing) = watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let (tcp, remote_addr) = match accepted {
            Ok(accepted) => accepted,
            Err(e) if connection_error(&e) => continue,
            Err(e) => {
                // Out of descriptors or memory: wait instead of spinning on the error.
                tracing::warn!(error = %e, "cannot accept an HTTP connection");
                tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            // A TLS client could not read a plain answer: it sees the connection close.
            if acceptor.is_none() {
                let _ = tcp.try_write(REFUSAL);
            }
            drop(tcp);
            let count = refused.fetch_add(1, Ordering::Relaxed).saturating_add(1);
            if last_warned.is_none_or(|at| at.elapsed() >= REFUSAL_WARN_EVERY) {
                tracing::warn!(
                    cap,
                    refused_total = count,
                    "HTTP connection cap reached: refusing connections"
                );
                last_warned = Some(std::time::Instant::now());
            }
            continue;
        };
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::warn!(error = %e, "cannot set TCP_NODELAY");
        }
        let info = ClientConnection {
            remote_addr,
            tls: acceptor.is_some(),
            client_certificate: None,
        };
        let watcher = graceful.watcher();
        let Some(acceptor) = acceptor.clone() else {
            let service = WithClientConnection::new(service.clone(), info);
            let connection = watcher.watch(builder.serve_connection(TokioIo::new(tcp), service));
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!(error = %e, "HTTP connection ended with an error");
                }
                drop(slot);
            });
            continue;
        };
        let (builder, mut closing) = (builder.clone(), closing.clone());
        let handshake_timeout = limits.header_read_timeout;
        let service = service.clone();
        tokio::spawn(async move {
            let handshake = tokio::select! {
                done = tls_handshake(&acceptor, tcp, handshake_timeout) => done,
                _ = closing.wait_for(|closing| *closing) => None,
            };
            if let Some(stream) = handshake {
                // The end-entity certificate comes first; rustls has verified the chain.
                let client_certificate = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(<[_]>::first)
                    .map(|cert| cert.clone().into_owned());
                let info = ClientConnection {
                    client_certificate,
                    ..info
                };
                let service = WithClientConnection::new(service, info);
                let connection =
                    watcher.watch(builder.serve_connection(TokioIo::new(stream), service));
                if let Err(e) = connection.await {
                    tracing::debug!(error = %e, "HTTPS connection ended with an error");
                }
            }
            drop(slot);
        });
    }
    drop(listener);
    let _ = closing_tx.send(true);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(HTTP_SHUTDOWN_GRACE) => {
            tracing::warn!("HTTP connections still open after the shutdown grace period");
        }
    }
}

/// The server side of a TLS handshake on `tcp`, within `limit`; `None` (the connection is
/// dropped, that is closed) when it fails or takes longer.
async fn tls_handshake(
    acceptor: &tokio_rustls::TlsAcceptor,
    tcp: TcpStream,
    limit: Duration,
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    match tokio::time::timeout(limit, acceptor.accept(tcp)).await {
        Ok(Ok(stream)) => Some(stream),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!(?limit, "TLS handshake timed out");
            None
        }
    }
}

/// Errors of one accepted connection (the peer gave up before it was accepted): the next
/// accept may succeed at once.
fn connection_error(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_is_a_share_of_the_open_file_limit() {
        assert_eq!(connection_cap(16_384, Some(1_048_576)), 16_384);
        assert_eq!(connection_cap(16_384, Some(4_096)), 1_024);
        assert_eq!(connection_cap(16_384, None), 16_384);
        assert_eq!(connection_cap(16_384, Some(8)), MIN_HTTP_CONNECTIONS);
        assert_eq!(connection_cap(5, Some(8)), 5);
        assert_eq!(connection_cap(0, None), 1);
    }

    #[test]
    fn the_refusal_is_one_well_formed_response() {
        let text = String::from_utf8_lossy(REFUSAL);
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or_default();
        assert!(head.starts_with("HTTP/1.1 503"));
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
    }
}

//! Serving gRPC: every gRPC port of a node goes through here.
//!
//! tonic's own TLS support cannot take a custom client-certificate verifier,
//! and ours must accept certificates from any issuer at the TLS layer (the
//! self-signed owner certificate has to reach Escrow). So TLS is terminated
//! here with tokio-rustls ([`accept`]), and the established connections are
//! served by our own HTTP/2 loop over tonic's routes ([`serve`]: tonic's
//! server costs several KiB more per connection), which still exposes the
//! peer certificates to the [`crate::AuthLayer`].
//!
//! Every transport limit of a node is a field of [`Limits`]: the accept loop
//! ([`tls_incoming`]), the HTTP/2 settings ([`builder`]) and the per-call
//! checks ([`LimitsLayer`]) all read it. A server is built as
//! `builder(&limits).layer(..).add_service(..)` and served with
//! `serve_with_incoming(tls_incoming(listener, tls, limits, ca))`.

mod accept;
mod layer;
mod serve;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tower::layer::util::{Identity, Stack};

pub use accept::{Conn, ConnInfo, tls_incoming};
pub use layer::{LimitsLayer, LimitsService};
pub use serve::{GrpcService, Router, Server};

/// What one node lets a network peer use. The defaults are what every port
/// of `metropolis-node` serves with; the reasoning is per field.
#[derive(Debug, Clone)]
pub struct Limits {
    // --- Before and during the TLS handshake (accept loop). ---
    /// A new connection that sends no byte within this is closed: a real
    /// client sends its ClientHello at once, an idle flood holds nothing
    /// longer than this.
    pub first_byte_timeout: Duration,
    /// A TLS handshake not finished this long after its first byte is
    /// dropped (a client sending a byte a second never finishes).
    pub handshake_timeout: Duration,
    /// Connections from one source address that have not finished their
    /// handshake; more are closed at once. Handshakes never wait for each
    /// other, so one address's flood delays nobody else; this bounds the
    /// descriptors one address can hold. A node's own connections (and the
    /// load generator's, all from one address) finish their handshakes in
    /// milliseconds.
    pub pending_per_source: usize,
    /// Established connections whose client presented no certificate issued
    /// by the cluster CA (no certificate, or a self-signed one: Escrow,
    /// RegisterNode, CA pinning). Nodes and operators always present one, so
    /// these are only bootstrapping clients; over the cap a connection is
    /// closed after its handshake.
    pub anonymous_connections: usize,
    /// The same, per source address.
    pub anonymous_per_source: usize,

    // --- HTTP/2 (advertised in SETTINGS or enforced by hyper). ---
    /// SETTINGS_MAX_CONCURRENT_STREAMS. A node keeps a heartbeat, a watch and
    /// a few calls open at once; an operator a few more.
    pub max_concurrent_streams: u32,
    /// SETTINGS_MAX_HEADER_LIST_SIZE: gRPC metadata is small.
    pub max_header_list_size: u32,
    /// SETTINGS_MAX_FRAME_SIZE (the HTTP/2 minimum, 16 KiB).
    pub max_frame_size: u32,
    /// SETTINGS_INITIAL_WINDOW_SIZE: request bytes one stream may have in
    /// flight before the handler reads them.
    pub stream_window: u32,
    /// The connection's flow-control window: request bytes buffered for all
    /// streams of a connection together.
    pub connection_window: u32,
    /// Client resets of streams not yet accepted by the server, per
    /// connection, before the connection is dropped ("rapid reset").
    pub max_pending_accept_reset_streams: usize,
    /// Streams the server itself reset because the client misbehaved, per
    /// connection, before the connection is dropped.
    pub max_local_error_reset_streams: usize,
    /// HTTP/2 PING interval; a peer that does not answer within
    /// `keepalive_timeout` is dropped (dead peers do not hold a connection).
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// A connection that carries no stream for this long is closed. Nodes
    /// always carry their heartbeat stream; an idle client reconnects on its
    /// next call.
    pub idle_timeout: Duration,

    // --- Per call (LimitsLayer). ---
    /// The largest request message any service accepts; a larger one is
    /// refused with RESOURCE_EXHAUSTED as soon as its length prefix arrives,
    /// before it is buffered.
    pub max_request_message: usize,
    /// The longest `grpc-message` a response carries (bytes before
    /// percent-encoding). Handlers quote user input briefly
    /// (`metropolis_api::quote`); this is the backstop that keeps every
    /// status readable by clients.
    pub max_status_message: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            first_byte_timeout: Duration::from_secs(2),
            handshake_timeout: Duration::from_secs(5),
            pending_per_source: 512,
            anonymous_connections: 1024,
            anonymous_per_source: 256,
            max_concurrent_streams: 128,
            max_header_list_size: 16 * 1024,
            max_frame_size: 16 * 1024,
            stream_window: 256 * 1024,
            connection_window: 1024 * 1024,
            max_pending_accept_reset_streams: 32,
            max_local_error_reset_streams: 256,
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            max_request_message: 4 * 1024 * 1024,
            max_status_message: 2048,
        }
    }
}

/// Sets the HTTP/2 settings that `Limits` holds on a hyper HTTP/2 server
/// builder: `hyper::server::conn::http2::Builder` (the gRPC ports) and
/// hyper-util's `auto::Http2Builder` (the metrics port) have the same setters
/// but share no trait, so the one list of settings lives here.
#[macro_export]
macro_rules! apply_http2_limits {
    ($builder:expr, $limits:expr) => {{
        let limits: &$crate::server::Limits = $limits;
        $builder
            .timer($crate::server::__TokioTimer::new())
            .max_concurrent_streams(limits.max_concurrent_streams)
            .max_header_list_size(limits.max_header_list_size)
            .max_frame_size(limits.max_frame_size)
            .initial_stream_window_size(limits.stream_window)
            .initial_connection_window_size(limits.connection_window)
            .max_pending_accept_reset_streams(limits.max_pending_accept_reset_streams)
            .max_local_error_reset_streams(limits.max_local_error_reset_streams)
            .keep_alive_interval(limits.keepalive_interval)
            .keep_alive_timeout(limits.keepalive_timeout)
    }};
}

#[doc(hidden)]
pub use hyper_util::rt::TokioTimer as __TokioTimer;

/// A server with every HTTP/2 setting from `limits`, and the
/// [`LimitsLayer`] outermost. Add the node's own layers and services to it.
pub fn builder(limits: &Limits) -> Server<Stack<LimitsLayer, Identity>> {
    Server::new(limits)
}

/// Binds a listening socket, with an error that says what to do about the
/// usual causes.
pub async fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        let hint = match e.kind() {
            io::ErrorKind::AddrInUse => " (is another node already running on this address?)",
            io::ErrorKind::AddrNotAvailable => " (the address is not configured on this machine)",
            _ => "",
        };
        io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}{hint}"))
    })
}

/// Stands in for a service this node does not serve itself (it is not the
/// curator): every call gets UNAVAILABLE with a message naming where to go,
/// so clients can retry there.
pub struct Redirect<S> {
    message: Arc<str>,
    _service: std::marker::PhantomData<fn() -> S>,
}

impl<S> Redirect<S> {
    pub fn new(message: impl Into<Arc<str>>) -> Self {
        Redirect {
            message: message.into(),
            _service: std::marker::PhantomData,
        }
    }
}

impl<S> Clone for Redirect<S> {
    fn clone(&self) -> Self {
        Redirect {
            message: self.message.clone(),
            _service: std::marker::PhantomData,
        }
    }
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for Redirect<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> tower::Service<http::Request<B>> for Redirect<S> {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Request<B>) -> Self::Future {
        std::future::ready(Ok(
            tonic::Status::unavailable(self.message.to_string()).into_http()
        ))
    }
}

//! Serving established connections: tonic's routes behind our layers, one
//! hyper HTTP/2 connection per [`Conn`].
//!
//! tonic's `Server` would do this too, but its per-connection task costs a
//! curator with 19,000 nodes about 5 KiB a node (issue #13): it keeps the
//! connection (TLS state inline) twice, once as the task's captured value and
//! once inside hyper-util's HTTP/1-or-2 connection, plus a clone of both
//! protocols' builders and a connection-age timer we never set. Here the
//! connection is one boxed hyper `http2::Connection` and the task only waits
//! for it or for shutdown. gRPC is HTTP/2 only; so was tonic's server.
//!
//! What tonic's server added per call is kept: the connection info in the
//! request extensions (for [`super::LimitsLayer`], the auth layer and
//! tonic's `Request::peer_certs`), a service error answered as a gRPC status,
//! and the client's `grpc-timeout` ([`super::LimitsLayer`] enforces it).

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;

use futures::{Stream, StreamExt};
use hyper::body::Incoming;
use hyper::server::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::watch;
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::service::Routes;
use tonic::transport::server::Connected;
use tower::layer::util::{Identity, Stack};
use tower::{Layer, Service, ServiceBuilder, ServiceExt};

use super::{Conn, ConnInfo, Limits, LimitsLayer};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type ResponseFuture =
    Pin<Box<dyn Future<Output = Result<http::Response<Body>, Infallible>> + Send>>;

/// The layers of a gRPC port and its HTTP/2 settings, before its services
/// are added; built by [`super::builder`].
pub struct Server<L> {
    layers: ServiceBuilder<L>,
    http2: http2::Builder<TokioExecutor>,
}

/// A tonic-generated service's bounds: what `Routes` takes.
pub trait GrpcService:
    Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
    + NamedService
    + Clone
    + Send
    + Sync
    + 'static
{
}

impl<S> GrpcService for S
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + NamedService
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
}

impl Server<Stack<LimitsLayer, Identity>> {
    pub(super) fn new(limits: &Limits) -> Self {
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        crate::apply_http2_limits!(http2, limits)
            // No HPACK dynamic table for request headers: a node's
            // connection would otherwise keep the headers of its calls
            // (paths, content type, user agent) for life, per connection;
            // gRPC headers are a few hundred bytes per call uncompressed.
            .header_table_size(0)
            // gRPC clients ignore `date`; formatting it costs every response.
            .auto_date_header(false);
        Server {
            layers: ServiceBuilder::new().layer(LimitsLayer::new(limits)),
            http2,
        }
    }
}

impl<L> Server<L> {
    /// Adds a layer inside the ones added before (the first is outermost).
    pub fn layer<T>(self, layer: T) -> Server<Stack<T, L>> {
        Server {
            layers: self.layers.layer(layer),
            http2: self.http2,
        }
    }

    pub fn add_service<S: GrpcService>(self, service: S) -> Router<L>
    where
        S::Future: Send + 'static,
    {
        self.add_routes(Routes::new(service))
    }

    pub fn add_routes(self, routes: Routes) -> Router<L> {
        Router {
            server: self,
            routes,
        }
    }
}

/// A gRPC port's layers and services, ready to serve connections.
pub struct Router<L> {
    server: Server<L>,
    routes: Routes,
}

impl<L> Router<L>
where
    L: Layer<Routes>,
    L::Service:
        Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    <L::Service as Service<http::Request<Body>>>::Future: Send + 'static,
    <L::Service as Service<http::Request<Body>>>::Error: Into<BoxError>,
{
    pub fn add_service<S: GrpcService>(mut self, service: S) -> Self
    where
        S::Future: Send + 'static,
    {
        self.routes = self.routes.add_service(service);
        self
    }

    /// Serves every connection of `incoming` until it ends.
    pub async fn serve_with_incoming<I>(self, incoming: I)
    where
        I: Stream<Item = Result<Conn, io::Error>>,
    {
        self.serve(incoming, None::<std::future::Pending<()>>).await
    }

    /// Serves until `signal` resolves, then asks every open connection to
    /// finish (HTTP/2 GOAWAY: calls in flight complete, no new ones) and
    /// returns once all have closed. Long streams never close on their own:
    /// the caller bounds the wait.
    pub async fn serve_with_incoming_shutdown<I, F>(self, incoming: I, signal: F)
    where
        I: Stream<Item = Result<Conn, io::Error>>,
        F: Future<Output = ()>,
    {
        self.serve(incoming, Some(signal)).await
    }

    async fn serve<I, F>(self, incoming: I, signal: Option<F>)
    where
        I: Stream<Item = Result<Conn, io::Error>>,
        F: Future<Output = ()>,
    {
        let service = self.server.layers.service(self.routes.prepare());
        let http2 = self.server.http2;
        let (stop_tx, stop_rx) = watch::channel(());
        let graceful = signal.is_some();
        let mut signal = std::pin::pin!(async move {
            match signal {
                Some(signal) => signal.await,
                None => std::future::pending().await,
            }
        });
        // Boxed so that it can be dropped (closing the listener) before the drain.
        let mut incoming = Box::pin(incoming);
        loop {
            let conn = tokio::select! {
                () = &mut signal => break,
                conn = incoming.next() => match conn {
                    Some(Ok(conn)) => conn,
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "connection not served");
                        continue;
                    }
                    None => break,
                },
            };
            let service = ConnService {
                info: conn.connect_info(),
                inner: service.clone(),
            };
            // Boxed, so that the task holds a pointer and not a second copy.
            let mut connection = Box::pin(http2.serve_connection(TokioIo::new(conn), service));
            let mut stop = stop_rx.clone();
            tokio::spawn(async move {
                let result = tokio::select! {
                    result = connection.as_mut() => result,
                    // A shutdown, or the server gone (its sender dropped):
                    // either way no new calls, and the ones in flight finish.
                    _ = stop.changed() => {
                        connection.as_mut().graceful_shutdown();
                        connection.await
                    }
                };
                if let Err(e) = result {
                    tracing::debug!(error = %e, "connection ended");
                }
                // `stop` is dropped here: the server's drain waits for it.
            });
        }
        // Accept no more connections from here on.
        drop(incoming);
        if graceful {
            let _ = stop_tx.send(());
            drop(stop_rx);
            stop_tx.closed().await;
        }
    }
}

/// One connection's service: the port's layered services, with the
/// connection's info put into every request.
#[derive(Clone)]
struct ConnService<S> {
    info: ConnInfo,
    inner: S,
}

impl<S> hyper::service::Service<http::Request<Incoming>> for ConnService<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    // Boxed: the stream's task keeps its future's size for the stream's
    // life, and a box is freed once the response has started.
    type Future = ResponseFuture;

    fn call(&self, req: http::Request<Incoming>) -> Self::Future {
        let mut req = req.map(Body::new);
        req.extensions_mut().insert(self.info.clone());
        let inner = self.inner.clone();
        Box::pin(async move {
            Ok(match inner.oneshot(req).await {
                Ok(response) => response,
                Err(e) => tonic::Status::from_error(e.into()).into_http(),
            })
        })
    }
}

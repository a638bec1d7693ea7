//! The accept loop: every gRPC port of a node goes through here.
//!
//! tonic's own TLS support cannot take a custom client-certificate verifier,
//! and ours must accept certificates from any issuer at the TLS layer (the
//! self-signed owner certificate has to reach Escrow). So TLS is terminated
//! here with tokio-rustls and the established streams are handed to tonic's
//! `serve_with_incoming`, which still exposes the peer certificates to the
//! [`crate::AuthLayer`].

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

/// A handshake that has not finished by then is dropped, so a client that
/// opens connections and sends nothing cannot hold resources forever.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in flight at once; more wait in the kernel's accept queue.
const MAX_CONCURRENT_HANDSHAKES: usize = 512;

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

/// Turns a listener into a stream of established TLS connections for
/// `Server::serve_with_incoming`. Handshakes run concurrently so one slow
/// client does not hold up the others; failed handshakes are logged and
/// dropped. The accept loop ends when the returned stream is dropped.
pub fn tls_incoming(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
) -> impl Stream<Item = Result<TlsStream<TcpStream>, io::Error>> + Send + 'static {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = TlsAcceptor::from(tls);
    let permits = Arc::new(Semaphore::new(MAX_CONCURRENT_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let permit = tokio::select! {
                _ = tx.closed() => return,
                permit = permits.clone().acquire_owned() => match permit {
                    Ok(p) => p,
                    Err(_) => return,
                },
            };
            let (tcp, peer) = tokio::select! {
                _ = tx.closed() => return,
                accepted = listener.accept() => match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
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

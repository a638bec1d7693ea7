//! The accept loop: TCP → TLS → tonic, bounded per source address.
//!
//! `accept()` never waits for anything: every connection gets its own task
//! at once, which waits (briefly) for a first byte, then for the handshake.
//! What a peer can hold is counted per source address (handshakes in
//! progress) and, after the handshake, for connections without a cluster
//! certificate; the counts are released when the connection goes.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use futures::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::{Instant, Sleep};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo, TlsConnectInfo};

use super::Limits;

/// Turns a listener into a stream of established TLS connections for
/// `Server::serve_with_incoming`. `ca_der` is the cluster CA: connections
/// whose client certificate it issued are not counted against the
/// anonymous caps (None: every connection counts). The accept loop ends when
/// the returned stream is dropped.
pub fn tls_incoming(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    limits: &Limits,
    ca_der: Option<Vec<u8>>,
) -> impl Stream<Item = Result<Conn, io::Error>> + Send + 'static {
    let (tx, rx) = mpsc::channel(64);
    let shared = Arc::new(Shared {
        acceptor: TlsAcceptor::from(tls),
        limits: limits.clone(),
        ca_der,
        pending: PerSource::default(),
        anonymous: PerSource::default(),
        anonymous_total: AtomicUsize::new(0),
    });
    tokio::spawn(async move {
        let mut refused = Refused::default();
        loop {
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
            let ip = peer.ip();
            let Some(pending) = shared.pending.take(ip, shared.limits.pending_per_source) else {
                refused.note(ip, "handshakes in progress");
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let shared = shared.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                match shared.handshake(tcp, ip).await {
                    Ok(conn) => {
                        drop(pending);
                        let _ = tx.send(Ok(conn)).await;
                    }
                    Err(why) => tracing::debug!(%peer, "connection dropped: {why}"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

struct Shared {
    acceptor: TlsAcceptor,
    limits: Limits,
    ca_der: Option<Vec<u8>>,
    pending: PerSource,
    anonymous: PerSource,
    anonymous_total: AtomicUsize,
}

impl Shared {
    async fn handshake(self: &Arc<Self>, tcp: TcpStream, ip: IpAddr) -> Result<Conn, String> {
        let mut first = [0u8; 1];
        match tokio::time::timeout(self.limits.first_byte_timeout, tcp.peek(&mut first)).await {
            Ok(Ok(n)) if n > 0 => {}
            Ok(Ok(_)) => return Err("closed before the handshake".into()),
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err("no first byte in time".into()),
        }
        let stream =
            match tokio::time::timeout(self.limits.handshake_timeout, self.acceptor.accept(tcp))
                .await
            {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => return Err(format!("TLS handshake failed: {e}")),
                Err(_) => return Err("TLS handshake timed out".into()),
            };
        let slot = if self.issued_by_cluster(&stream) {
            None
        } else {
            Some(self.anonymous_slot(ip).ok_or(
                "too many connections without a cluster certificate (from this address or in all)",
            )?)
        };
        Ok(Conn::new(stream, slot, self.limits.idle_timeout))
    }

    /// Whether the client presented a certificate the cluster CA issued.
    fn issued_by_cluster(&self, stream: &TlsStream<TcpStream>) -> bool {
        let (Some(ca), Some(leaf)) = (
            &self.ca_der,
            stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first()),
        ) else {
            return false;
        };
        metropolis_identity::parse_certificate(leaf).is_ok_and(|cert| {
            metropolis_identity::verify_signed_by(&cert, ca, time::OffsetDateTime::now_utc())
                .is_ok()
        })
    }

    fn anonymous_slot(self: &Arc<Self>, ip: IpAddr) -> Option<Slot> {
        let total = self.anonymous_total.fetch_add(1, Ordering::AcqRel);
        let release_total = |s: &Arc<Shared>| s.anonymous_total.fetch_sub(1, Ordering::AcqRel);
        if total >= self.limits.anonymous_connections {
            release_total(self);
            return None;
        }
        match self.anonymous.take(ip, self.limits.anonymous_per_source) {
            Some(per_source) => Some(Slot {
                shared: self.clone(),
                _per_source: per_source,
            }),
            None => {
                release_total(self);
                None
            }
        }
    }
}

/// A connection's place among the anonymous ones, given back on drop.
struct Slot {
    shared: Arc<Shared>,
    _per_source: SourceGuard,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.shared.anonymous_total.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Counts per source address; an address with no count left has no entry.
#[derive(Default, Clone)]
struct PerSource(Arc<Mutex<HashMap<IpAddr, usize>>>);

impl PerSource {
    fn take(&self, ip: IpAddr, max: usize) -> Option<SourceGuard> {
        let mut counts = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = counts.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(SourceGuard {
            counts: self.clone(),
            ip,
        })
    }
}

struct SourceGuard {
    counts: PerSource,
    ip: IpAddr,
}

impl Drop for SourceGuard {
    fn drop(&mut self) {
        let mut counts = self.counts.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

/// Logs refused connections at most once a minute, with how many there were.
#[derive(Default)]
struct Refused {
    count: u64,
    last_report: Option<Instant>,
}

impl Refused {
    fn note(&mut self, ip: IpAddr, what: &str) {
        self.count += 1;
        let due = self
            .last_report
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(60));
        if due {
            tracing::warn!(
                source = %ip,
                refused = self.count,
                "refusing connections: too many {what} from one address"
            );
            self.count = 0;
            self.last_report = Some(Instant::now());
        }
    }
}

/// Streams open on a connection, shared between the connection (which
/// closes itself when it has been idle for too long) and the
/// [`super::LimitsLayer`] (which counts streams in and out).
pub(super) struct Activity {
    streams: AtomicUsize,
    idle_since: Mutex<Instant>,
    /// The connection's reader, woken when the last stream ends so that it
    /// starts its idle timer.
    reader: AtomicWaker,
}

impl Activity {
    pub(super) fn stream_started(self: &Arc<Self>) -> StreamGuard {
        self.streams.fetch_add(1, Ordering::AcqRel);
        StreamGuard(self.clone())
    }
}

/// One open stream; the stream ends when this is dropped.
pub(super) struct StreamGuard(Arc<Activity>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if self.0.streams.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self.0.idle_since.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
            self.0.reader.wake();
        }
    }
}

/// What tonic puts into every request's extensions for a [`Conn`].
#[derive(Clone)]
pub struct ConnInfo {
    pub(super) tls: TlsConnectInfo<TcpConnectInfo>,
    pub(super) activity: Arc<Activity>,
}

/// An established connection, as served to tonic.
pub struct Conn {
    tls: TlsStream<TcpStream>,
    info: ConnInfo,
    idle_timeout: Duration,
    /// Armed only while no stream is open: a node's connection carries its
    /// heartbeat stream for life and never needs a timer.
    idle: Option<Pin<Box<Sleep>>>,
    _slot: Option<Slot>,
}

impl Conn {
    fn new(tls: TlsStream<TcpStream>, slot: Option<Slot>, idle_timeout: Duration) -> Conn {
        let now = Instant::now();
        let info = ConnInfo {
            tls: tls.connect_info(),
            activity: Arc::new(Activity {
                streams: AtomicUsize::new(0),
                idle_since: Mutex::new(now),
                reader: AtomicWaker::new(),
            }),
        };
        Conn {
            tls,
            info,
            idle_timeout,
            idle: None,
            _slot: slot,
        }
    }
}

impl Conn {
    /// The client's leaf certificate (DER), if it presented one: for a
    /// server other than tonic's (the metrics port) that checks it itself.
    pub fn peer_certificate(&self) -> Option<Vec<u8>> {
        let certs = self.tls.get_ref().1.peer_certificates()?;
        certs.first().map(|c| c.to_vec())
    }
}

impl Connected for Conn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for Conn {
    /// Reads, and ends the connection (end of file) once it has carried no
    /// stream for the idle timeout. hyper always has a read pending, so this
    /// is polled whenever the socket or the idle timer wakes it.
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Poll::Ready(r) = Pin::new(&mut this.tls).poll_read(cx, buf) {
            return Poll::Ready(r);
        }
        let activity = &this.info.activity;
        activity.reader.register(cx.waker());
        if activity.streams.load(Ordering::Acquire) > 0 {
            this.idle = None;
            return Poll::Pending;
        }
        let since = *activity
            .idle_since
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let deadline = since + this.idle_timeout;
        let idle = this
            .idle
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if idle.deadline() != deadline {
            idle.as_mut().reset(deadline);
        }
        match idle.as_mut().poll(cx) {
            Poll::Ready(()) => {
                tracing::debug!(
                    "closing a connection that carried no stream for {:?}",
                    this.idle_timeout
                );
                Poll::Ready(Ok(()))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tls).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tls).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tls).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tls).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tls.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_source_counts_are_bounded_and_given_back() {
        let counts = PerSource::default();
        let a: IpAddr = "127.0.0.2".parse().expect("ip");
        let b: IpAddr = "127.0.0.3".parse().expect("ip");
        let first = counts.take(a, 2).expect("first");
        let second = counts.take(a, 2).expect("second");
        assert!(counts.take(a, 2).is_none(), "a third from one address");
        assert!(
            counts.take(b, 2).is_some(),
            "another address is not affected"
        );
        drop(first);
        let third = counts.take(a, 2).expect("a place was given back");
        drop((second, third));
        assert!(
            counts.0.lock().expect("lock").is_empty(),
            "no entry is left for addresses with nothing open"
        );
    }
}

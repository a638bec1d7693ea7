//! A hostile network (issue #12): clients that hold no cluster certificate try
//! to slow down, exhaust or confuse a real node process. Every test prints the
//! figure it measures; none asserts a wall-clock time (the machine is shared).
//!
//! The full-size load forms are ignored by default:
//! `cargo test -p metropolis-node --test hostile -- --ignored --nocapture`.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use metropolis_api::api::{
    GetClusterInfoRequest, GetNodesRequest, UpdateNodeLabelsRequest,
    management_client::ManagementClient, node::Health, update_node_labels_request,
};
use metropolis_api::curator::{
    GetCurrentLeaderRequest, RegisterNodeRequest, curator_client::CuratorClient,
    curator_local_client::CuratorLocalClient,
};
use metropolis_identity::{ServerTrust, SigningKey, generate_key};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;
use tonic::Code;
use tonic::transport::Channel;

use support::*;

/// Raises this process's soft limit of open files to the hard limit (the
/// flood needs one descriptor per connection) and returns the new limit.
fn raise_fd_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
    lim.rlim_cur
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Attack {
    /// Open TCP and send nothing.
    Idle,
    /// Start a TLS record and send one more byte every second.
    Slow,
}

/// Connections held open against a node, each re-opened when the node
/// closes it.
struct Flood {
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    open: Arc<AtomicU64>,
    closed_by_node: Arc<AtomicU64>,
}

impl Flood {
    fn start(target: SocketAddr, sources: &[IpAddr], per_source: usize, attack: Attack) -> Flood {
        let (stop, stop_rx) = watch::channel(false);
        let open = Arc::new(AtomicU64::new(0));
        let closed_by_node = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for &src in sources {
            for _ in 0..per_source {
                tasks.push(tokio::spawn(hold_one(
                    target,
                    src,
                    attack,
                    stop_rx.clone(),
                    open.clone(),
                    closed_by_node.clone(),
                )));
            }
        }
        Flood {
            stop,
            tasks,
            open,
            closed_by_node,
        }
    }

    /// Waits (up to 30 s) until `want` connections are open at once.
    async fn wait_open(&self, want: u64) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.open.load(Ordering::Relaxed) < want && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.open.load(Ordering::Relaxed)
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

async fn connect_from(src: IpAddr, target: SocketAddr) -> std::io::Result<TcpStream> {
    let sock = TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(src, 0))?;
    match tokio::time::timeout(Duration::from_secs(5), sock.connect(target)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

async fn hold_one(
    target: SocketAddr,
    src: IpAddr,
    attack: Attack,
    mut stop: watch::Receiver<bool>,
    open: Arc<AtomicU64>,
    closed_by_node: Arc<AtomicU64>,
) {
    while !*stop.borrow() {
        let mut tcp = match connect_from(src, target).await {
            Ok(t) => t,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        open.fetch_add(1, Ordering::Relaxed);
        // The start of a TLS handshake record, then a byte a second.
        let slow_bytes = [0x16u8, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03];
        let mut sent = 0;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut buf = [0u8; 64];
        let closed = loop {
            tokio::select! {
                _ = stop.changed() => break false,
                r = tcp.read(&mut buf) => match r {
                    Ok(0) | Err(_) => break true,
                    Ok(_) => {}
                },
                _ = tick.tick(), if attack == Attack::Slow => {
                    let b = slow_bytes[sent % slow_bytes.len()];
                    sent += 1;
                    if tcp.write_all(&[b]).await.is_err() {
                        break true;
                    }
                }
            }
        };
        open.fetch_sub(1, Ordering::Relaxed);
        if closed {
            closed_by_node.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// An authenticated GetClusterInfo on a new connection, retried until it
/// answers (up to 60 s): the time from the first attempt to the answer, and
/// the number of attempts.
async fn call_on_new_connection(
    addr: SocketAddr,
    ca: &[u8],
    cert: &[u8],
    key: &SigningKey,
) -> (Duration, u32) {
    let start = Instant::now();
    let mut attempts = 0;
    loop {
        attempts += 1;
        let attempt = async {
            let ch = channel(addr, trust(ca), Some((cert.to_vec(), key.clone())))
                .await
                .map_err(|e| e.to_string())?;
            ManagementClient::new(ch)
                .get_cluster_info(GetClusterInfoRequest {})
                .await
                .map_err(|e| e.to_string())
        };
        match attempt.await {
            Ok(_) => return (start.elapsed(), attempts),
            Err(e) => assert!(
                start.elapsed() < Duration::from_secs(60),
                "no authenticated answer within 60 s: {e}"
            ),
        }
    }
}

async fn health_of_all(mgmt: &mut ManagementClient<Channel>) -> Vec<Health> {
    let nodes: Vec<_> = mgmt
        .get_nodes(GetNodesRequest::default())
        .await
        .expect("GetNodes")
        .into_inner()
        .try_collect()
        .await
        .expect("GetNodes stream");
    nodes
        .iter()
        .map(|n| Health::try_from(n.health).unwrap_or(Health::Invalid))
        .collect()
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

/// Floods a node with `sources × per_source` connections of one kind and
/// prints how long authenticated calls take meanwhile.
async fn flood_and_measure(sources: usize, per_source: usize, attack: Attack) {
    let limit = raise_fd_limit();
    let total = (sources * per_source) as u64;
    assert!(
        limit > total + 200,
        "the flood needs {total} descriptors; the limit is {limit}"
    );
    let tmp = tempfile::tempdir().expect("tmp");
    let owner = generate_key();
    let node = TestNode::bootstrap(tmp.path(), &owner).await;
    let addr = node.endpoint();
    let ca = fetch_ca(addr).await.expect("ca");
    let cert = escrow_owner(addr, &ca, &owner).await;
    let mut mgmt = ManagementClient::new(
        channel(addr, trust(&ca), Some((cert.clone(), owner.clone())))
            .await
            .expect("owner channel"),
    );
    // Health is only meaningful after one heartbeat timeout of leading.
    let deadline = Instant::now() + Duration::from_secs(30);
    while health_of_all(&mut mgmt).await != [Health::Healthy] {
        assert!(Instant::now() < deadline, "node never became HEALTHY");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (quiet, _) = call_on_new_connection(addr, &ca, &cert, &owner).await;

    let src: Vec<IpAddr> = (0..sources).map(|_| fresh_address()).collect();
    let flood = Flood::start(addr, &src, per_source, attack);
    let open = flood.wait_open(total).await;
    let mut fresh = Vec::new();
    let mut existing = Vec::new();
    let mut health = Vec::new();
    let mut retried = 0;
    // Long enough for the node's handshake timeouts to pass at least once.
    for _ in 0..12 {
        let (took, attempts) = call_on_new_connection(addr, &ca, &cert, &owner).await;
        fresh.push(took);
        retried += u32::from(attempts > 1);
        let t = Instant::now();
        mgmt.get_cluster_info(GetClusterInfoRequest {})
            .await
            .expect("GetClusterInfo on an open connection");
        existing.push(t.elapsed());
        health.extend(health_of_all(&mut mgmt).await);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let open_at_end = flood.open.load(Ordering::Relaxed);
    let closed = flood.closed_by_node.load(Ordering::Relaxed);
    flood.stop().await;
    fresh.sort();
    existing.sort();
    println!(
        "flood of {attack:?} connections: {total} attempted from {sources} source addresses, \
         {open} open at once, {open_at_end} open at the end, {closed} closed by the node; \
         authenticated GetClusterInfo on a new connection: median {}, max {} (quiet: {}), \
         {retried} of {} needed more than one connection attempt; \
         on an open connection: max {}; node health while flooded: {:?}",
        ms(fresh[fresh.len() / 2]),
        ms(fresh[fresh.len() - 1]),
        ms(quiet),
        fresh.len(),
        ms(existing[existing.len() - 1]),
        health.iter().collect::<std::collections::BTreeSet<_>>(),
    );
    // Connecting has a 5 s timeout: generous for a node that accepts at
    // once, too short for one whose handshakes wait behind the flood.
    assert_eq!(
        retried, 0,
        "a new connection did not get through on its first attempt"
    );
    assert!(
        health.iter().all(|h| *h == Health::Healthy),
        "the node stopped being HEALTHY under the flood: {health:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_do_not_delay_authenticated_calls() {
    flood_and_measure(4, 150, Attack::Idle).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_connections_do_not_delay_authenticated_calls() {
    flood_and_measure(4, 150, Attack::Slow).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "load test: 10,000 connections"]
async fn load_10000_idle_connections() {
    flood_and_measure(20, 500, Attack::Idle).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "load test: 10,000 connections"]
async fn load_10000_slow_connections() {
    flood_and_measure(20, 500, Attack::Slow).await;
}

/// Opens `n` GetCurrentLeader streams (allowed without a certificate) on one
/// connection without a client certificate, and prints how many the node
/// accepted and its memory before, meanwhile and after.
async fn stream_flood(n: usize, patience: Duration) {
    let tmp = tempfile::tempdir().expect("tmp");
    let node = TestNode::bootstrap(tmp.path(), &generate_key()).await;
    let addr = node.endpoint();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = node.rss_kib().expect("rss");
    let seen = Arc::new(std::sync::Mutex::new(None));
    let ch = channel(addr, ServerTrust::Capture(seen), None)
        .await
        .expect("connect without a certificate");
    let accepted = Arc::new(AtomicU64::new(0));
    let (stop, stop_rx) = watch::channel(false);
    let mut tasks = Vec::new();
    for _ in 0..n {
        let mut client = CuratorLocalClient::new(ch.clone());
        let accepted = accepted.clone();
        let mut stop = stop_rx.clone();
        tasks.push(tokio::spawn(async move {
            let first = tokio::time::timeout(patience, async {
                let mut s = client
                    .get_current_leader(GetCurrentLeaderRequest {})
                    .await?
                    .into_inner();
                s.message().await.map(|m| (s, m))
            })
            .await;
            if let Ok(Ok((stream, Some(_)))) = first {
                accepted.fetch_add(1, Ordering::Relaxed);
                let _ = stop.changed().await;
                drop(stream);
            }
        }));
    }
    // Every call has either its first answer or has given up by now.
    let deadline = Instant::now() + patience + Duration::from_secs(10);
    while Instant::now() < deadline && tasks.iter().any(|t| !t.is_finished()) {
        if accepted.load(Ordering::Relaxed) == n as u64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let during = node.rss_kib().expect("rss");
    let _ = stop.send(true);
    for t in tasks {
        t.abort();
        let _ = t.await;
    }
    drop(ch);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = node.rss_kib().expect("rss");
    let accepted = accepted.load(Ordering::Relaxed);
    println!(
        "stream flood: {accepted} of {n} GetCurrentLeader streams accepted (first answer within \
         {patience:?}) on one connection \
         without a certificate; node RSS before {} MiB, with the streams open {} MiB, \
         3 s after the connection closed {} MiB",
        before / 1024,
        during / 1024,
        after / 1024
    );
    assert!(accepted > 0, "the node accepted no stream at all");
    assert!(
        accepted < n as u64,
        "the node accepted all {n} concurrent streams on one connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_per_connection_are_bounded() {
    stream_flood(1_000, Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "load test: 10,000 streams"]
async fn load_10000_streams_on_one_connection() {
    stream_flood(10_000, Duration::from_secs(60)).await;
}

/// Writes the HTTP/2 client preface and an empty SETTINGS frame.
async fn h2_preface(tls: &mut (impl AsyncWriteExt + Unpin)) {
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .expect("preface");
    tls.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0])
        .await
        .expect("settings");
    tls.flush().await.expect("flush");
}

/// A TLS connection without a client certificate that sends the HTTP/2
/// preface and then nothing, not even acknowledgements; and the captured
/// node certificate, for further connections.
async fn silent_h2_client(
    addr: SocketAddr,
) -> (
    tokio_rustls::client::TlsStream<TcpStream>,
    Arc<std::sync::Mutex<Option<Vec<u8>>>>,
) {
    let seen = Arc::new(std::sync::Mutex::new(None));
    let tls = metropolis_identity::client_config(ServerTrust::Capture(seen.clone()), None)
        .expect("client config");
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let mut conn = tokio_rustls::TlsConnector::from(tls)
        .connect(
            rustls_pki_types::ServerName::IpAddress(addr.ip().into()),
            tcp,
        )
        .await
        .expect("TLS");
    h2_preface(&mut conn).await;
    (conn, seen)
}

/// Reads `conn` until the node closes it: what the node sent and how long
/// that took, or None if it was still open after `patience`.
async fn read_until_closed(
    conn: &mut (impl AsyncReadExt + Unpin),
    patience: Duration,
) -> Option<(Vec<u8>, Duration)> {
    let start = Instant::now();
    let mut received = Vec::new();
    tokio::time::timeout(patience, async {
        let mut buf = [0u8; 4096];
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .ok()?;
    Some((received, start.elapsed()))
}

/// A well-behaved client (tonic's HTTP/2 answers PINGs) with a
/// GetCurrentLeader stream open: the stream must still be open after
/// `open_for`.
async fn a_stream_stays_open(
    addr: SocketAddr,
    seen: Arc<std::sync::Mutex<Option<Vec<u8>>>>,
    open_for: Duration,
    what_closed_it: &str,
) {
    let ch = channel(addr, ServerTrust::Capture(seen), None)
        .await
        .expect("connect");
    let mut stream = CuratorLocalClient::new(ch)
        .get_current_leader(GetCurrentLeaderRequest {})
        .await
        .expect("GetCurrentLeader")
        .into_inner();
    stream.message().await.expect("first answer");
    let next = tokio::time::timeout(open_for, stream.message()).await;
    assert!(
        next.is_err(),
        "the stream ended while open: {next:?} ({what_closed_it})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_without_streams_are_closed_when_idle() {
    let tmp = tempfile::tempdir().expect("tmp");
    let params = tmp.path().join("bootstrap.pb");
    write_bootstrap_params(&params, &generate_key());
    let idle = Duration::from_secs(2);
    let node = TestNode::spawn_with(
        fresh_address(),
        &tmp.path().join("node"),
        Some(&params),
        &["--connection-idle-timeout", "2s"],
    );
    node.wait_serving().await;
    let addr = node.endpoint();

    // An HTTP/2 connection that opens no stream.
    let (mut conn, seen) = silent_h2_client(addr).await;
    let (_, after) = read_until_closed(&mut conn, Duration::from_secs(30))
        .await
        .expect("a connection without streams stayed open for 30 s");
    println!("a connection without streams was closed after {after:?} (idle timeout {idle:?})");

    // A connection that carries a stream stays open past the idle timeout.
    a_stream_stays_open(addr, seen, idle * 3, "the connection was closed as idle").await;
}

/// The HTTP/2 frame types in `bytes` (a connection's plaintext from its
/// start), as far as whole frames arrived.
fn frame_types(bytes: &[u8]) -> Vec<u8> {
    let mut types = Vec::new();
    let mut rest = bytes;
    while rest.len() >= 9 {
        let len = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
        if rest.len() < 9 + len {
            break;
        }
        types.push(rest[3]);
        rest = &rest[9 + len..];
    }
    types
}

/// A peer that stops answering (a machine that died or was cut off: nothing
/// closes its TCP connection) is dropped once it leaves the node's HTTP/2
/// PINGs unanswered, and a live client that answers them keeps its
/// connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_that_stop_answering_pings_are_dropped() {
    const PING: u8 = 0x6;
    let tmp = tempfile::tempdir().expect("tmp");
    let params = tmp.path().join("bootstrap.pb");
    write_bootstrap_params(&params, &generate_key());
    let (interval, timeout) = (Duration::from_secs(1), Duration::from_secs(1));
    let node = TestNode::spawn_with(
        fresh_address(),
        &tmp.path().join("node"),
        Some(&params),
        // The idle timeout out of the way: only the keepalive may close.
        &[
            "--connection-keepalive-interval",
            "1s",
            "--connection-keepalive-timeout",
            "1s",
            "--connection-idle-timeout",
            "1h",
        ],
    );
    node.wait_serving().await;
    let addr = node.endpoint();

    // A client that says hello, then falls silent: it reads what the node
    // sends but never answers (no SETTINGS or PING acknowledgement).
    let (mut conn, seen) = silent_h2_client(addr).await;
    let (received, after) = read_until_closed(&mut conn, Duration::from_secs(60))
        .await
        .expect("a silent peer kept its connection for 60 s");
    let types = frame_types(&received);
    let pings = types.iter().filter(|t| **t == PING).count();
    assert!(
        pings >= 1,
        "the connection was closed, but not after an unanswered PING: frame types {types:?}"
    );
    println!(
        "a peer that answered no PING was dropped after {after:?} ({pings} PING(s) sent; \
         interval {interval:?}, timeout {timeout:?})"
    );

    // A client that answers PINGs keeps its connection for many rounds.
    a_stream_stays_open(
        addr,
        seen,
        (interval + timeout) * 4,
        "its client answered every PING",
    )
    .await;
}

/// An UpdateNodeLabels request for the node, as the owner.
fn label_request(node_id: &str, key: &str, value: String) -> UpdateNodeLabelsRequest {
    UpdateNodeLabelsRequest {
        node: Some(update_node_labels_request::Node::Id(node_id.into())),
        upsert: vec![update_node_labels_request::Pair {
            key: key.into(),
            value,
        }],
        delete: vec![],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_requests_are_resource_exhausted() {
    let tmp = tempfile::tempdir().expect("tmp");
    let owner = generate_key();
    let node = TestNode::bootstrap(tmp.path(), &owner).await;
    let addr = node.endpoint();
    let ca = fetch_ca(addr).await.expect("ca");
    let mut mgmt = ManagementClient::new(owner_channel(addr, &ca, &owner).await);
    let (cert, _) = node_credentials(&node.data_dir);
    let id = metropolis_identity::parse_certificate(&cert)
        .expect("cert")
        .common_name;

    // Authenticated: 5 MiB in one label value.
    let err = mgmt
        .update_node_labels(label_request(&id, "big", "x".repeat(5 << 20)))
        .await
        .expect_err("5 MiB request");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
    println!(
        "5 MiB UpdateNodeLabels: {:?}: {}",
        err.code(),
        err.message()
    );

    // Without any certificate: 5 MiB of register ticket.
    let seen = Arc::new(std::sync::Mutex::new(None));
    let anon = channel(addr, ServerTrust::Capture(seen), None)
        .await
        .expect("connect");
    let err = CuratorClient::new(anon)
        .register_node(RegisterNodeRequest {
            register_ticket: vec![7; 5 << 20],
            labels: None,
            ..Default::default()
        })
        .await
        .expect_err("5 MiB request");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
    println!("5 MiB RegisterNode: {:?}: {}", err.code(), err.message());

    // The connection still serves.
    mgmt.get_cluster_info(GetClusterInfoRequest {})
        .await
        .expect("GetClusterInfo after the refusals");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_quote_user_input_briefly() {
    let tmp = tempfile::tempdir().expect("tmp");
    let owner = generate_key();
    let node = TestNode::bootstrap(tmp.path(), &owner).await;
    let addr = node.endpoint();
    let ca = fetch_ca(addr).await.expect("ca");
    let mut mgmt = ManagementClient::new(owner_channel(addr, &ca, &owner).await);
    let (cert, _) = node_credentials(&node.data_dir);
    let id = metropolis_identity::parse_certificate(&cert)
        .expect("cert")
        .common_name;

    let mib = "v".repeat(1 << 20);
    let cases: Vec<(&str, Result<tonic::Response<_>, tonic::Status>)> = vec![
        (
            "label value",
            mgmt.update_node_labels(label_request(&id, "zone", mib.clone()))
                .await
                .map(|_| tonic::Response::new(())),
        ),
        (
            "label key",
            mgmt.update_node_labels(label_request(&id, &mib, "a".into()))
                .await
                .map(|_| tonic::Response::new(())),
        ),
        (
            "node id",
            mgmt.update_node_labels(label_request(&mib, "zone", "a".into()))
                .await
                .map(|_| tonic::Response::new(())),
        ),
        (
            "filter",
            mgmt.get_nodes(GetNodesRequest {
                filter: format!("node.id == '{mib}'"),
            })
            .await
            .map(|_| tonic::Response::new(())),
        ),
    ];
    for (what, result) in cases {
        let err = result.expect_err(what);
        assert!(
            matches!(err.code(), Code::InvalidArgument | Code::NotFound),
            "{what}: {:?} {}",
            err.code(),
            &err.message()[..err.message().len().min(300)]
        );
        assert!(
            err.message().len() < 1024,
            "{what}: a {} byte message",
            err.message().len()
        );
        println!(
            "1 MiB {what}: {:?}, {} byte message: {}",
            err.code(),
            err.message().len(),
            err.message()
        );
    }
}

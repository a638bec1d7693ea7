//! What an idle connection costs in heap: a curator holds one TLS + HTTP/2
//! connection per node for the node's life, so this is the figure that
//! sets how many nodes fit on a machine (issue #13).
//!
//! The releases of h2 and rustls keep 16 + 8 + 4 + 4 KiB of I/O buffers on
//! every connection whether it carries anything or not; the patched copies
//! under `vendor/` free them while the connection waits for its peer. This
//! test counts live heap bytes (its own global allocator) across many idle
//! connections, client and server both in this process, and fails if the
//! buffers are back.

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Duration;

use metropolis_identity::{CertificateAuthority, ServerTrust, client_config, server_config};
use metropolis_rpc::server::{Limits, builder, tls_incoming};
use tokio::net::TcpListener;

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is forwarded to the system allocator unchanged; the
// counter only records sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_add(
                new_size as isize - layout.size() as isize,
                Ordering::Relaxed,
            );
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const CONNECTIONS: usize = 200;

/// Client and server side of one idle connection together (a tonic channel
/// on one end, our accept loop and HTTP/2 server on the other). Measured:
/// about 102 KiB with the released h2 and rustls, 38 KiB with the patched
/// ones behind tonic's server, 36 KiB behind ours; the budget sits between,
/// with room for either side's state to grow a little.
const BUDGET_PER_CONNECTION: isize = 56 * 1024;

/// Waits for the connections' tasks to reach their idle state; the
/// figure is read twice in a row and must agree, so a late task does not
/// pass for memory held.
async fn settled_live() -> isize {
    let mut last = LIVE.load(Ordering::Relaxed);
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = LIVE.load(Ordering::Relaxed);
        if (now - last).abs() < 4096 {
            return now;
        }
        last = now;
    }
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_hold_no_io_buffers() {
    let ca = CertificateAuthority::generate().expect("CA");
    let issue = |key: &metropolis_identity::SigningKey| {
        ca.issue_node_certificate(&key.verifying_key().to_bytes(), Duration::from_secs(3600))
            .expect("node certificate")
    };
    let server_key = metropolis_identity::generate_key();
    let server_cert = issue(&server_key);
    let client_key = metropolis_identity::generate_key();
    let client_cert = issue(&client_key);

    let listener = TcpListener::bind("127.0.0.2:0").await.expect("bind");
    let addr: SocketAddr = listener.local_addr().expect("address");
    let limits = Limits::default();
    let incoming = tls_incoming(
        listener,
        server_config(server_cert, &server_key).expect("server TLS"),
        &limits,
        Some(ca.cert_der().to_vec()),
    );
    let server = builder(&limits)
        .add_routes(tonic::service::Routes::default())
        .serve_with_incoming(incoming);
    tokio::spawn(server);

    let tls = client_config(
        ServerTrust::ClusterCa {
            ca_der: ca.cert_der().to_vec(),
            node_id: None,
        },
        Some((client_cert, client_key)),
    )
    .expect("client TLS");
    // One connection first: one-off allocations (runtime, accept loop,
    // session caches) are not a connection's.
    let first = metropolis_rpc::client::connect(addr, tls.clone())
        .await
        .expect("first connection");
    let mut channels = Vec::with_capacity(CONNECTIONS);
    let before = settled_live().await;

    for _ in 0..CONNECTIONS {
        channels.push(
            metropolis_rpc::client::connect(addr, tls.clone())
                .await
                .expect("connection"),
        );
    }
    let after = settled_live().await;
    let per_connection = (after - before) / CONNECTIONS as isize;
    println!("{per_connection} heap bytes per idle connection (client and server side)");
    assert!(
        per_connection < BUDGET_PER_CONNECTION,
        "an idle connection holds {per_connection} heap bytes (client and server side), over \
         the budget of {BUDGET_PER_CONNECTION}: are the patched h2 and rustls under vendor/ \
         still in use (Cargo.toml [patch.crates-io])?"
    );
    drop((first, channels));
}

//! The debug service exists only in builds with the `debug` feature: the
//! default build refuses connections on its port; a debug build serves logs
//! before the node has joined, and failpoints that tests use for faults.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use metropolis_api::admin::{
    DumpStateRequest, ListFailpointsRequest, SetFailpointRequest,
    node_faults_client::NodeFaultsClient,
};
use metropolis_api::api::{
    GetDebugKubeconfigRequest, GetNodesRequest, LogsRequest, Node, NodeParameters,
    UpdateNodeLabelsRequest, logs_request, management_client::ManagementClient, node::Health,
    node_debug_service_client::NodeDebugServiceClient, node_parameters, update_node_labels_request,
};
use metropolis_api::common::{ClusterDirectory, LogFilter, cluster_directory, log_filter};
use metropolis_identity::ServerTrust;
use prost::Message;
use tonic::Code;

use support::*;

async fn debug_channel(addr: std::net::IpAddr) -> Result<tonic::transport::Channel, String> {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(None));
    channel(
        SocketAddr::new(addr, 7837),
        ServerTrust::Capture(seen),
        None,
    )
    .await
    .map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_build_has_no_debug_port() {
    let tmp = tempfile::tempdir().expect("tmp");
    let node = TestNode::bootstrap(tmp.path(), &metropolis_identity::generate_key()).await;
    assert!(
        std::net::TcpStream::connect(node.endpoint()).is_ok(),
        "curator port serves"
    );
    let err = std::net::TcpStream::connect(SocketAddr::new(node.address, 7837))
        .expect_err("debug port closed");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debug_build_serves_logs_before_joining_and_failpoints() {
    let binary = debug_binary();
    let tmp = tempfile::tempdir().expect("tmp");

    // A node that registers into a cluster that is not there: it keeps
    // trying, and its logs are readable meanwhile.
    let nowhere = fresh_address();
    let ca = metropolis_identity::CertificateAuthority::generate().expect("ca");
    let params = NodeParameters {
        cluster: Some(node_parameters::Cluster::ClusterRegister(
            node_parameters::ClusterRegister {
                cluster_directory: Some(ClusterDirectory {
                    nodes: vec![cluster_directory::Node {
                        id: "metropolis-x".into(),
                        addresses: vec![cluster_directory::node::Address {
                            host: nowhere.to_string(),
                        }],
                    }],
                }),
                register_ticket: b"ticket".to_vec(),
                ca_certificate: ca.cert_der().to_vec(),
                labels: None,
            },
        )),
        network_config: None,
    };
    let p = tmp.path().join("register.pb");
    std::fs::write(&p, params.encode_to_vec()).expect("params");
    let addr = fresh_address();
    let mut waiting = std::process::Command::new(&binary)
        .args([
            "--data-dir",
            tmp.path().join("w").to_str().expect("utf8"),
            "--address",
            &addr.to_string(),
            "--params",
        ])
        .arg(&p)
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(20);
    let ch = loop {
        if let Ok(ch) = debug_channel(addr).await {
            break ch;
        }
        assert!(Instant::now() < deadline, "debug port never came up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut dbg = NodeDebugServiceClient::new(ch.clone());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let req = LogsRequest {
            dn: "root".into(),
            filters: vec![LogFilter {
                filter: Some(log_filter::Filter::WithChildren(
                    log_filter::WithChildren {},
                )),
            }],
            backlog_mode: logs_request::BacklogMode::All as i32,
            backlog_count: 0,
            stream_mode: logs_request::StreamMode::Disable as i32,
        };
        let resps: Vec<_> = dbg
            .logs(req)
            .await
            .expect("logs")
            .into_inner()
            .try_collect()
            .await
            .expect("stream");
        let text = format!("{resps:?}");
        if text.contains("cannot register yet") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no registration attempts logged: {text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let err = dbg
        .get_debug_kubeconfig(GetDebugKubeconfigRequest::default())
        .await
        .expect_err("no kubeconfig");
    assert_eq!(err.code(), Code::Unimplemented);
    let state = NodeFaultsClient::new(ch)
        .dump_state(DumpStateRequest {})
        .await
        .expect("dump")
        .into_inner()
        .json;
    assert!(state.contains("\"phase\":\"starting\""), "{state}");
    let _ = waiting.kill();
    let _ = waiting.wait();

    // A bootstrapped debug node: failpoints break heartbeats and commits.
    let owner = metropolis_identity::generate_key();
    let bp = tmp.path().join("bootstrap.pb");
    write_bootstrap_params(&bp, &owner);
    let addr = fresh_address();
    let mut node = std::process::Command::new(&binary)
        .args([
            "--data-dir",
            tmp.path().join("n").to_str().expect("utf8"),
            "--address",
            &addr.to_string(),
        ])
        .args([
            "--heartbeat-interval",
            "200ms",
            "--heartbeat-timeout",
            "1500ms",
            "--params",
        ])
        .arg(&bp)
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    let ep = SocketAddr::new(addr, 7835);
    let deadline = Instant::now() + Duration::from_secs(20);
    while fetch_ca(ep).await.is_err() {
        assert!(Instant::now() < deadline, "node never served");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let node_ca = fetch_ca(ep).await.expect("ca");
    let mut mgmt = ManagementClient::new(owner_channel(ep, &node_ca, &owner).await);
    let mut faults = NodeFaultsClient::new(debug_channel(addr).await.expect("debug"));
    let known = faults
        .list_failpoints(ListFailpointsRequest {})
        .await
        .expect("list")
        .into_inner()
        .known;
    assert!(
        known.contains(&"node::heartbeat_send".to_string()),
        "{known:?}"
    );
    let health = |nodes: &[Node]| nodes.first().map(|n| n.health);
    let wait_health = |want: Health| {
        let mut mgmt = mgmt.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let nodes: Vec<Node> = mgmt
                    .get_nodes(GetNodesRequest::default())
                    .await
                    .expect("n")
                    .into_inner()
                    .try_collect()
                    .await
                    .expect("s");
                if health(&nodes) == Some(want as i32) {
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "health never became {want:?}: {nodes:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    wait_health(Health::Healthy).await;
    faults
        .set_failpoint(SetFailpointRequest {
            name: "node::heartbeat_send".into(),
            actions: "return".into(),
        })
        .await
        .expect("set");
    wait_health(Health::HeartbeatTimeout).await;
    faults
        .set_failpoint(SetFailpointRequest {
            name: "node::heartbeat_send".into(),
            actions: "off".into(),
        })
        .await
        .expect("off");
    wait_health(Health::Healthy).await;

    let id = mgmt
        .get_nodes(GetNodesRequest::default())
        .await
        .expect("n")
        .into_inner()
        .try_collect::<Vec<Node>>()
        .await
        .expect("s")[0]
        .id
        .clone();
    let label = |v: &str| UpdateNodeLabelsRequest {
        node: Some(update_node_labels_request::Node::Id(id.clone())),
        upsert: vec![update_node_labels_request::Pair {
            key: "zone".into(),
            value: v.into(),
        }],
        delete: vec![],
    };
    faults
        .set_failpoint(SetFailpointRequest {
            name: "curator::store_commit".into(),
            actions: "return".into(),
        })
        .await
        .expect("set");
    let err = mgmt
        .update_node_labels(label("a"))
        .await
        .expect_err("commit fails");
    assert_eq!(err.code(), Code::Internal, "{err}");
    faults
        .set_failpoint(SetFailpointRequest {
            name: "curator::store_commit".into(),
            actions: "off".into(),
        })
        .await
        .expect("off");
    mgmt.update_node_labels(label("b"))
        .await
        .expect("commit works again");
    let err = faults
        .set_failpoint(SetFailpointRequest {
            name: "nope".into(),
            actions: "return".into(),
        })
        .await
        .expect_err("unknown");
    assert_eq!(err.code(), Code::NotFound);
    let _ = node.kill();
    let _ = node.wait();
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .map(str::to_string)
        })
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

/// Soak: a node producing 10,000 log lines a second for a minute while a
/// client follows its logs; prints the node's RSS over time. A measurement,
/// not a check of speed: run it with
/// `cargo test -p metropolis-node --test debug_service -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn log_soak_memory_stays_bounded() {
    use metropolis_api::admin::EmitLogsRequest;
    let binary = debug_binary();
    let tmp = tempfile::tempdir().expect("tmp");
    let owner = metropolis_identity::generate_key();
    let bp = tmp.path().join("bootstrap.pb");
    write_bootstrap_params(&bp, &owner);
    let addr = fresh_address();
    let mut node = std::process::Command::new(&binary)
        .args([
            "--data-dir",
            tmp.path().join("n").to_str().expect("utf8"),
            "--address",
            &addr.to_string(),
            "--params",
        ])
        .arg(&bp)
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(20);
    let ch = loop {
        if let Ok(ch) = debug_channel(addr).await {
            break ch;
        }
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut follow = NodeDebugServiceClient::new(ch.clone())
        .logs(LogsRequest {
            dn: "root".into(),
            filters: vec![LogFilter {
                filter: Some(log_filter::Filter::WithChildren(
                    log_filter::WithChildren {},
                )),
            }],
            backlog_mode: logs_request::BacklogMode::Disable as i32,
            backlog_count: 0,
            stream_mode: logs_request::StreamMode::Unbuffered as i32,
        })
        .await
        .expect("follow")
        .into_inner();
    let received = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let r = received.clone();
    tokio::spawn(async move {
        while let Ok(Some(m)) = follow.message().await {
            r.fetch_add(
                m.stream_entries.len() as u64,
                std::sync::atomic::Ordering::Relaxed,
            );
        }
    });
    let start_rss = rss_kib(node.id());
    NodeFaultsClient::new(ch)
        .emit_logs(EmitLogsRequest {
            lines_per_second: 10_000,
            seconds: 60,
        })
        .await
        .expect("emit");
    let mut samples = Vec::new();
    for i in 1..=13 {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let rss = rss_kib(node.id());
        let got = received.load(std::sync::atomic::Ordering::Relaxed);
        println!("t={:>3}s rss={:>7} KiB followed_entries={got}", i * 5, rss);
        samples.push(rss);
    }
    println!(
        "rss before: {start_rss} KiB, max during: {} KiB",
        samples.iter().max().copied().unwrap_or(0)
    );
    let _ = node.kill();
    let _ = node.wait();
    // Bounded: after the ring buffers fill (first seconds), RSS stops growing.
    let settled = samples[2];
    let last = *samples.last().unwrap_or(&0);
    assert!(last < settled + 32 * 1024, "RSS kept growing: {samples:?}");
}

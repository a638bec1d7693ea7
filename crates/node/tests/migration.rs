//! A cluster on the embedded store grows into one on etcd, online, with real
//! node processes: a second consensus member is refused while the move
//! cannot start (no etcd binary, the peer port taken) and the cluster goes
//! on serving; then it moves while a client keeps writing, and no
//! acknowledged write is lost. etcd's peer port then admits consensus
//! members only.
//!
//! The store is filled with node records first, and the test prints how long
//! writes were paused: `moves_a_cluster_of_20000_nodes` (ignored, long) gives
//! the figure at 20,000 nodes.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use metropolis_api::admin::ConsensusProgress;
use metropolis_api::admin::{AddIdentityRequest, Role, cluster_admin_client::ClusterAdminClient};
use metropolis_api::api::{
    ApproveNodeRequest, DeleteNodeRequest, delete_node_request, management_client::ManagementClient,
};
use metropolis_api::common::NodeState;
use metropolis_store::{Op, Store, Txn};
use prost::Message;

use support::*;

/// Node records shaped like a registered, heartbeating node's (no address:
/// they must not end up in the directory the real nodes dial).
async fn fill(store_path: &std::path::Path, records: usize) {
    let store = metropolis_store::EmbeddedStore::open(store_path)
        .await
        .expect("open the stopped node's store");
    let mut txn = Txn::new();
    for i in 0..records {
        let key = metropolis_identity::generate_key()
            .verifying_key()
            .to_bytes();
        let node = metropolis_api::private::Node {
            public_key: key.to_vec(),
            state: NodeState::Up as i32,
            roles: Some(Default::default()),
            status: Some(metropolis_api::common::NodeStatus {
                external_address: String::new(),
                running_curator: None,
                timestamp: Some(prost_types::Timestamp::from(std::time::SystemTime::now())),
                version: Some(Default::default()),
                boot_id: vec![7; 16],
            }),
            labels: Some(metropolis_api::common::NodeLabels {
                pairs: ["zone", "rack", "pool"]
                    .iter()
                    .map(|k| metropolis_api::common::node_labels::Pair {
                        key: (*k).into(),
                        value: format!("{k}-{}", i % 97),
                    })
                    .collect(),
            }),
            registered_at: Some(prost_types::Timestamp::from(std::time::SystemTime::now())),
            decommission_requested: false,
            tpm_usage: 0,
            clusternet: None,
        };
        txn = txn.and_then(Op::put(
            format!("/nodes/{}", metropolis_identity::node_id(&key)),
            node.encode_to_vec(),
        ));
        if txn.success.len() == 1000 || i + 1 == records {
            store
                .txn(std::mem::take(&mut txn))
                .await
                .expect("fill the store");
        }
    }
}

fn pem_cert(path: &std::path::Path) -> Vec<u8> {
    metropolis_identity::pem_to_cert_der(&std::fs::read_to_string(path).expect("read PEM"))
        .expect("a certificate")
}

async fn grows_into_etcd(records: usize) {
    metropolis_store::testing::find_etcd();
    let tmp = tempfile::tempdir().expect("tmp");
    let owner_key = metropolis_identity::generate_key();
    let params = tmp.path().join("bootstrap.pb");
    write_bootstrap_params(&params, &owner_key);
    let n1_dir = tmp.path().join("n1");
    let a1 = fresh_address();
    // No etcd to be had: the cluster cannot move.
    let no_etcd = ["--etcd-binary", "/nonexistent/etcd"];
    let mut n1 = TestNode::spawn_with(a1, &n1_dir, Some(&params), &no_etcd);
    n1.wait_leading().await;
    let ca = fetch_ca(n1.endpoint()).await.expect("ca");
    let cert = escrow_owner(n1.endpoint(), &ca, &owner_key).await;
    let owner = Arc::new(Owner {
        key: owner_key,
        cert,
        ca,
    });
    if records > 0 {
        n1.stop();
        let started = Instant::now();
        fill(&n1_dir.join("store/cluster.redb"), records).await;
        println!(
            "filled the store with {records} node records in {:?}",
            started.elapsed()
        );
        n1 = TestNode::spawn_with(a1, &n1_dir, None, &no_etcd);
        n1.wait_serving().await;
    }
    let ch = leader_now(&owner, &[n1.endpoint()]).await;
    let reg = tmp.path().join("register.pb");
    fetch_register_params(&mut ManagementClient::new(ch.clone()), &owner.ca, &reg).await;
    let a2 = fresh_address();
    let n2 = TestNode::spawn(a2, &tmp.path().join("n2"), Some(&reg));
    let addrs = vec![n1.endpoint(), n2.endpoint()];
    let n2_id: String = eventually("the second node UP", &owner, &addrs, |ch| async move {
        let list = nodes(ch.clone()).await.ok()?;
        for n in list.iter().filter(|n| n.state == NodeState::New as i32) {
            let _ = ManagementClient::new(ch.clone())
                .approve_node(ApproveNodeRequest {
                    pubkey: n.pubkey.clone(),
                })
                .await;
        }
        list.iter()
            .find(|n| {
                n.state == NodeState::Up as i32
                    && n.status
                        .as_ref()
                        .is_some_and(|s| s.external_address == a2.to_string())
            })
            .map(|n| n.id.clone())
    })
    .await;
    let list = nodes(ch.clone()).await.expect("nodes");
    assert_eq!(list.len(), records + 2);
    let n1_id = list
        .iter()
        .find(|n| n.consensus_progress == ConsensusProgress::Voter as i32)
        .expect("the bootstrap node is the embedded store's member")
        .id
        .clone();
    set_label(ch.clone(), &n1_id, "before", "yes")
        .await
        .expect("write before");

    // A move that cannot start: nothing changes, the cluster serves on.
    let refused = make_member(ch.clone(), &n2_id, true)
        .await
        .expect_err("no etcd binary");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused}");
    assert!(
        refused.message().contains("/nonexistent/etcd")
            && refused.message().contains("stays on the embedded store"),
        "{refused}"
    );
    n1.stop();
    let n1 = TestNode::spawn(a1, &n1_dir, None);
    n1.wait_serving().await;
    let ch = leader_now(&owner, &addrs).await;
    let peer_port = std::net::TcpListener::bind((a1, PEER_PORT)).expect("take the peer port");
    let refused = make_member(ch.clone(), &n2_id, true)
        .await
        .expect_err("peer port taken");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused}");
    assert!(refused.message().contains("7834"), "{refused}");
    drop(peer_port);
    let status = consensus(ch.clone()).await.expect("status");
    assert_eq!(status.backend, 1, "still on the embedded store: {status:?}");
    let list = nodes(ch.clone()).await.expect("nodes");
    let n2_now = list.iter().find(|n| n.id == n2_id).expect("n2");
    assert!(
        n2_now
            .roles
            .as_ref()
            .is_none_or(|r| r.consensus_member.is_none()),
        "the refused role was not recorded"
    );
    assert!(!n1_dir.join("etcd").exists(), "no etcd member left behind");
    set_label(ch.clone(), &n1_id, "refused", "still-writable")
        .await
        .expect("a write after the refusals");
    // An unknown node: NOT_FOUND.
    let unknown = make_member(
        ch.clone(),
        "metropolis-00000000000000000000000000000000",
        true,
    )
    .await
    .expect_err("unknown node");
    assert_eq!(unknown.code(), tonic::Code::NotFound, "{unknown}");

    // The move, with a client writing throughout.
    let (writes, stop, writer) = start_writer(owner.clone(), addrs.clone(), n1_id.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let asked = Instant::now();
    make_member(ch, &n2_id, true).await.expect("accepted");
    let accepted = asked.elapsed();
    let n2_id2 = n2_id.clone();
    eventually("the second node a voter on etcd", &owner, &addrs, |ch| {
        let n2_id = n2_id2.clone();
        async move {
            let s = consensus(ch.clone()).await.ok()?;
            let list = nodes(ch).await.ok()?;
            let n2 = list.iter().find(|n| n.id == n2_id)?;
            (s.backend == 2 && n2.consensus_progress == ConsensusProgress::Voter as i32)
                .then_some(())
        }
    })
    .await;
    let voter_after = asked.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await.expect("writer");
    let writes = std::mem::take(&mut *writes.lock().unwrap());
    let (last, _) = *writes.acked.last().expect("acknowledged writes");
    let gap = writes
        .acked
        .windows(2)
        .map(|w| w[1].1 - w[0].1)
        .max()
        .unwrap_or_default();
    let log = n1.log_text();
    let paused_ms = log
        .split("writes_paused_ms=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .map(str::to_string)
        .unwrap_or_else(|| "?".into());
    // From the switch to leading again on etcd, by the node's own clock.
    let at = |line: &str| log_time(line);
    let switched = log
        .lines()
        .find(|l| l.contains("moved the cluster state to etcd"))
        .and_then(at);
    let leading_again = log
        .lines()
        .filter(|l| l.contains("this curator is now the leader"))
        .filter_map(at)
        .find(|t| switched.is_some_and(|s| *t > s));
    // The node's own account of the move and its restart.
    let mut shown = false;
    for line in log.lines().filter(|l| !l.starts_with('{')) {
        shown |= line.contains("started the etcd member to move");
        if shown {
            println!("  n1: {}", line.chars().take(400).collect::<String>());
        }
        if shown && line.contains("this curator is now the leader") {
            break;
        }
    }
    let restart = match (switched, leading_again) {
        (Some(s), Some(l)) => format!("{:.0} ms", (l - s) * 1000.0),
        _ => "?".into(),
    };
    println!(
        "migration of {} node records: accepted in {accepted:?}; on the node, writes paused for \
         {paused_ms} ms (copy and check); a client writing throughout saw {} writes refused as \
         'migrating' and no acknowledged write for {gap:?} (pause + the curator's restart on etcd, \
         which led again {restart} after the switch); the new member was a voter after \
         {voter_after:?}",
        records + 2,
        writes.refused_migrating,
    );

    // Every acknowledged write is there, the last one last.
    let list = eventually("the nodes on etcd", &owner, &addrs, |ch| async move {
        nodes(ch).await.ok()
    })
    .await;
    assert_eq!(list.len(), records + 2);
    let n1_rec = list.iter().find(|n| n.id == n1_id).expect("n1");
    assert_eq!(label(n1_rec, "before").as_deref(), Some("yes"));
    assert_eq!(label(n1_rec, "refused").as_deref(), Some("still-writable"));
    assert_eq!(
        label(n1_rec, "w"),
        Some(last.to_string()),
        "the last acknowledged write"
    );

    // The data directory: etcd, and the embedded store kept read-only.
    assert!(n1_dir.join("etcd/config.pb").exists());
    assert!(!n1_dir.join("store").exists());
    assert!(!n1_dir.join("etcd/staged").exists());
    let kept = n1_dir.join("store.pre-etcd/cluster.redb");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&kept)
            .expect("the pre-migration copy")
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o400, "{}", kept.display());

    // etcd's peer port admits consensus members only: not the owner, not a
    // node's own certificate (both from the cluster CA), and no longer a
    // member whose role was removed.
    let n1_peer = (
        pem_cert(&n1_dir.join("etcd/peer.pem")),
        node_credentials(&n1_dir).1,
    );
    let n2_dir = tmp.path().join("n2");
    let n2_peer = (
        pem_cert(&n2_dir.join("etcd/peer.pem")),
        node_credentials(&n2_dir).1,
    );
    let at = |a| SocketAddr::new(a, PEER_PORT);
    match ask_peer_port(at(a2), Some(n1_peer.clone())).await {
        PeerAnswer::Replied(r) => {
            assert!(r.starts_with("HTTP/1.1 200") && r.contains(&n2_id), "{r}")
        }
        other => panic!("a member's peer certificate: {other:?}"),
    }
    let owner_id = (owner.cert.clone(), owner.key.clone());
    let reader = metropolis_identity::generate_key();
    ClusterAdminClient::new(leader_now(&owner, &addrs).await)
        .add_identity(AddIdentityRequest {
            name: "reader".into(),
            public_key: reader.verifying_key().to_bytes().to_vec(),
            role: Role::Reader as i32,
        })
        .await
        .expect("add a reader");
    let reader_cert = escrow_anywhere(&addrs, &owner.ca, "reader", &reader).await;
    for (who, identity) in [
        ("the owner", Some(owner_id)),
        ("a reader", Some((reader_cert, reader))),
        ("a node certificate", Some(node_credentials(&n2_dir))),
        ("no certificate", None),
    ] {
        let answer = ask_peer_port(at(a1), identity).await;
        assert!(
            matches!(answer, PeerAnswer::Refused(_)),
            "{who} on the peer port: {answer:?}"
        );
    }
    let n2_id2 = n2_id.clone();
    eventually("n2's role removed", &owner, &addrs, |ch| {
        let n2_id = n2_id2.clone();
        async move {
            match make_member(ch, &n2_id, false).await {
                Err(s) if s.code() == tonic::Code::Unavailable => None,
                other => {
                    other.expect("remove n2's role");
                    Some(())
                }
            }
        }
    })
    .await;
    // Refused as soon as the CRL reached the remaining member.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match ask_peer_port(at(a1), Some(n2_peer.clone())).await {
            PeerAnswer::Replied(r) => {
                assert!(
                    Instant::now() < deadline,
                    "a removed member still answered: {r}"
                )
            }
            PeerAnswer::Closed | PeerAnswer::Refused(_) => break,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A deleted node gets in with neither its node certificate nor its old
    // peer certificate.
    let n2_node = node_credentials(&n2_dir);
    let n2_id2 = n2_id.clone();
    eventually("n2 deleted", &owner, &addrs, |ch| {
        let n2_id = n2_id2.clone();
        async move {
            let deleted = ManagementClient::new(ch)
                .delete_node(DeleteNodeRequest {
                    node: Some(delete_node_request::Node::Id(n2_id)),
                    safety_bypass_has_roles: None,
                    safety_bypass_not_decommissioned: Some(
                        delete_node_request::SafetyBypassNotDecommissioned {},
                    ),
                })
                .await;
            match deleted {
                Err(s) if s.code() == tonic::Code::Unavailable => None,
                other => {
                    other.expect("delete n2");
                    Some(())
                }
            }
        }
    })
    .await;
    let answer = ask_peer_port(at(a1), Some(n2_node)).await;
    assert!(
        matches!(answer, PeerAnswer::Refused(_)),
        "a deleted node's certificate on the peer port: {answer:?}"
    );
    let answer = ask_peer_port(at(a1), Some(n2_peer)).await;
    assert!(
        matches!(answer, PeerAnswer::Refused(_) | PeerAnswer::Closed),
        "a deleted node's peer certificate on the peer port: {answer:?}"
    );
    drop(n2);
}

/// A certificate for the identity `name`, escrowed at whichever of `addrs`
/// serves it first.
async fn escrow_anywhere(
    addrs: &[SocketAddr],
    ca: &[u8],
    name: &str,
    key: &metropolis_identity::SigningKey,
) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut last = None;
        for addr in addrs {
            match escrow_as(*addr, ca, name, key).await {
                Ok(cert) => return cert,
                Err(e) => last = Some(e),
            }
        }
        assert!(Instant::now() < deadline, "escrow for {name}: {last:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedded_cluster_grows_into_etcd_without_losing_a_write() {
    grows_into_etcd(2_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: fills the store with 20,000 node records; run with --ignored --nocapture for the figure"]
async fn moves_a_cluster_of_20000_nodes() {
    grows_into_etcd(20_000).await;
}

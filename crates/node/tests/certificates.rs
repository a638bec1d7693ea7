//! Certificates that expire and renew themselves, with real node processes
//! and metroctl, on a cluster whose certificates live 60 s: the nodes stay
//! HEALTHY past two lifetimes on renewed certificates, metroctl renews the
//! owner certificate by itself, an old certificate is refused naming its
//! expiry, a node offline past expiry rejoins with its key, and renewals for
//! someone else or a deleted node are refused.

mod support;

use std::time::{Duration, Instant};

use futures::TryStreamExt;
use metropolis_api::admin::{RenewNodeCertificateRequest, node_curator_client::NodeCuratorClient};
use metropolis_api::api::{
    ApproveNodeRequest, ConfigureClusterRequest, DeleteNodeRequest, GetClusterInfoRequest,
    GetNodesRequest, Node, delete_node_request, management_client::ManagementClient, node::Health,
};
use metropolis_api::common::{ClusterConfiguration, NodeState};
use metropolis_identity::{ServerTrust, SigningKey};
use tonic::Code;
use tonic::transport::Channel;

use support::*;

const FAST: &[&str] = &["--heartbeat-interval", "500ms", "--heartbeat-timeout", "5s"];

const LIFETIME: Duration = Duration::from_secs(60);

async fn nodes(mgmt: &mut ManagementClient<Channel>) -> Vec<Node> {
    mgmt.get_nodes(GetNodesRequest {
        filter: String::new(),
    })
    .await
    .expect("GetNodes")
    .into_inner()
    .try_collect()
    .await
    .expect("stream")
}

/// A fresh owner channel: the owner certificate of this cluster lives 60 s,
/// so a channel is good for one phase of the test only.
async fn owner(node: &TestNode, ca: &[u8], key: &SigningKey) -> ManagementClient<Channel> {
    ManagementClient::new(owner_channel(node.endpoint(), ca, key).await)
}

/// The certificate a node serves, captured without trusting it.
async fn served_certificate(node: &TestNode) -> metropolis_identity::Certificate {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(None));
    let ch = channel(node.endpoint(), ServerTrust::Capture(seen.clone()), None)
        .await
        .expect("connect");
    // The handshake happens on the first call.
    let _ = metropolis_api::curator::curator_local_client::CuratorLocalClient::new(ch)
        .get_ca_certificate(metropolis_api::curator::GetCaCertificateRequest {})
        .await;
    let der = seen.lock().expect("lock").clone().expect("a certificate");
    metropolis_identity::parse_certificate(&der).expect("parse")
}

fn health_of(list: &[Node], id: &str) -> Option<Health> {
    list.iter()
        .find(|n| n.id == id)
        .and_then(|n| Health::try_from(n.health).ok())
}

/// RenewNodeCertificate presenting `identity` (any certificate over a key).
async fn renew(
    node: &TestNode,
    ca: &[u8],
    identity: (Vec<u8>, SigningKey),
    node_id: &str,
) -> Result<Vec<u8>, tonic::Status> {
    let ch = channel(node.endpoint(), trust(ca), Some(identity))
        .await
        .expect("connect");
    NodeCuratorClient::new(ch)
        .renew_node_certificate(RenewNodeCertificateRequest {
            node_id: node_id.to_string(),
        })
        .await
        .map(|r| r.into_inner().node_certificate)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_second_certificates_renew_and_expire() {
    let tmp = tempfile::tempdir().expect("tmp");
    let cfg = tmp.path().join("metroctl");
    let params = tmp.path().join("bootstrap.pb");
    let p = params.to_str().expect("utf-8");
    // Bad lifetimes are refused before anything is written.
    let out = metroctl(
        &cfg,
        &[
            "install",
            "params",
            "--bootstrap",
            "--node-certificate-lifetime",
            "30s",
            "-o",
            p,
        ],
    );
    assert!(
        !out.status.success() && stderr(&out).contains("at least 60s"),
        "{}",
        stderr(&out)
    );
    let out = metroctl(
        &cfg,
        &[
            "install",
            "params",
            "--bootstrap",
            "--node-certificate-lifetime",
            "60s",
            "--user-certificate-lifetime",
            "1m",
            "-o",
            p,
        ],
    );
    assert!(out.status.success(), "install params: {}", stderr(&out));
    let key_pem = std::fs::read_to_string(cfg.join("owner-key.pem")).expect("owner key");
    let owner_key = metropolis_identity::decode_owner_key_pem(&key_pem).expect("decode");

    let first = TestNode::spawn_with(fresh_address(), &tmp.path().join("n1"), Some(&params), FAST);
    first.wait_leading().await;
    let ca = fetch_ca(first.endpoint()).await.expect("ca");
    let ep = first.address.to_string();
    let out = metroctl(&cfg, &["takeownership", "--endpoints", &ep, "--yes"]);
    assert!(out.status.success(), "takeownership: {}", stderr(&out));
    let old_owner_pem = std::fs::read_to_string(cfg.join("owner.pem")).expect("owner.pem");
    let old_owner = metropolis_identity::pem_to_cert_der(&old_owner_pem).expect("pem");
    let old_owner_cert = metropolis_identity::parse_certificate(&old_owner).expect("parse");
    assert_eq!(old_owner_cert.lifetime(), LIFETIME);

    // The configuration says so; changes outside the bounds are refused.
    let out = metroctl(&cfg, &["cluster", "info"]);
    assert!(out.status.success(), "info: {}", stderr(&out));
    let info = stdout(&out);
    assert!(info.contains("CA expires") && info.contains("1m"), "{info}");
    let mut mgmt = owner(&first, &ca, &owner_key).await;
    for bad in [59, 11 * 366 * 86_400] {
        let err = mgmt
            .configure_cluster(ConfigureClusterRequest {
                base_config: None,
                new_config: Some(ClusterConfiguration {
                    node_certificate_lifetime: Some(prost_types::Duration {
                        seconds: bad,
                        nanos: 0,
                    }),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["node_certificate_lifetime".into()],
                }),
            })
            .await
            .expect_err("out of bounds");
        assert_eq!(err.code(), Code::InvalidArgument, "{bad}: {err}");
    }

    // A second node, registered and approved.
    let register = tmp.path().join("register.pb");
    fetch_register_params(&mut mgmt, &ca, &register).await;
    let mut second = TestNode::spawn_with(
        fresh_address(),
        &tmp.path().join("n2"),
        Some(&register),
        FAST,
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let second_id = loop {
        let list = nodes(&mut mgmt).await;
        if let Some(n) = list.iter().find(|n| n.state == NodeState::New as i32) {
            mgmt.approve_node(ApproveNodeRequest {
                pubkey: n.pubkey.clone(),
            })
            .await
            .expect("approve");
            break n.id.clone();
        }
        assert!(Instant::now() < deadline, "no NEW node: {list:#?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let first_id = served_certificate(&first).await.node_id();
    let first_serial = served_certificate(&first).await.serial;

    // Renewal for another node's ID, or with a stranger's key, is refused.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !second.data_dir.join("credentials.pb").exists() {
        assert!(Instant::now() < deadline, "second node not admitted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (second_cert, second_key) = node_credentials(&second.data_dir);
    let err = renew(
        &first,
        &ca,
        (second_cert.clone(), second_key.clone()),
        &first_id,
    )
    .await
    .expect_err("another node's ID");
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    let stranger = metropolis_identity::generate_key();
    let forged = metropolis_identity::self_signed_certificate(&stranger, &first_id).expect("ss");
    let err = renew(&first, &ca, (forged, stranger), &first_id)
        .await
        .expect_err("wrong key");
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    // Its own renewal keeps the node ID.
    let renewed = renew(
        &first,
        &ca,
        (second_cert.clone(), second_key.clone()),
        &second_id,
    )
    .await
    .expect("own renewal");
    let renewed = metropolis_identity::parse_certificate(&renewed).expect("parse");
    assert_eq!(renewed.node_id(), second_id);

    // Two lifetimes and more. The second node goes down for longer than its
    // certificate lives and comes back on its key.
    let start = Instant::now();
    second.stop();
    let mut renewed_owner = 0;
    let mut restarted = false;
    let mut first_serials = vec![first_serial.clone()];
    while start.elapsed() < 2 * LIFETIME + Duration::from_secs(20) {
        if !restarted && start.elapsed() > LIFETIME + Duration::from_secs(10) {
            let (cert, _) = node_credentials(&second.data_dir);
            let cert = metropolis_identity::parse_certificate(&cert).expect("parse");
            assert!(
                cert.not_after < time::OffsetDateTime::now_utc(),
                "the stopped node's certificate should have expired"
            );
            second = TestNode::spawn_with(second.address, &second.data_dir, None, FAST);
            restarted = true;
        }
        let out = metroctl(&cfg, &["node", "list"]);
        assert!(
            out.status.success(),
            "metroctl after {:?}: {}",
            start.elapsed(),
            stderr(&out)
        );
        if stderr(&out).contains("Renewed the certificate of owner") {
            renewed_owner += 1;
        }
        let serial = served_certificate(&first).await.serial;
        if first_serials.last() != Some(&serial) {
            first_serials.push(serial);
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    println!(
        "after {:?}: {} serving certificates of the first node, {renewed_owner} owner renewals by metroctl",
        start.elapsed(),
        first_serials.len()
    );
    assert!(
        first_serials.len() >= 3,
        "the first node should have renewed twice: {first_serials:?}\n{}",
        first.log_text()
    );
    assert!(renewed_owner >= 2, "metroctl renewed {renewed_owner} times");

    // Both nodes HEALTHY on renewed certificates; the metric says how long
    // the first one's has left.
    let mut mgmt = owner(&first, &ca, &owner_key).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let list = nodes(&mut mgmt).await;
        if health_of(&list, &first_id) == Some(Health::Healthy)
            && health_of(&list, &second_id) == Some(Health::Healthy)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "nodes not HEALTHY: {list:#?}\nsecond node log:\n{}",
            second.log_text()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (cert, _) = node_credentials(&second.data_dir);
    let cert = metropolis_identity::parse_certificate(&cert).expect("parse");
    assert!(
        cert.not_after > time::OffsetDateTime::now_utc(),
        "renewed after the restart"
    );
    assert!(
        second
            .log_text()
            .contains("expired while the node was down"),
        "{}",
        second.log_text()
    );
    let out = metroctl(&cfg, &["node", "metrics", &first_id]);
    assert!(out.status.success(), "metrics: {}", stderr(&out));
    let line = stdout(&out)
        .lines()
        .find(|l| l.starts_with("metropolis_node_certificate_expiry_seconds "))
        .map(str::to_string)
        .expect("expiry metric");
    let left: i64 = line
        .rsplit(' ')
        .next()
        .and_then(|v| v.parse().ok())
        .expect("value");
    assert!((0..=60).contains(&left), "{line}");

    // The saved old owner certificate: refused, naming when it expired.
    let ch = channel(
        first.endpoint(),
        trust(&ca),
        Some((old_owner, owner_key.clone())),
    )
    .await
    .expect("connect");
    let err = ManagementClient::new(ch)
        .get_cluster_info(GetClusterInfoRequest {})
        .await
        .expect_err("expired");
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");
    let at = metropolis_identity::rfc3339(old_owner_cert.not_after);
    assert!(
        err.message().contains(&format!("expired at {at}"))
            && err.message().contains("metroctl takeownership"),
        "{}",
        err.message()
    );

    // A deleted node cannot renew, whatever certificate it holds.
    second.stop();
    mgmt.delete_node(DeleteNodeRequest {
        node: Some(delete_node_request::Node::Id(second_id.clone())),
        safety_bypass_has_roles: None,
        safety_bypass_not_decommissioned: Some(Default::default()),
    })
    .await
    .expect("delete");
    let (cert, key) = node_credentials(&second.data_dir);
    let err = renew(&first, &ca, (cert, key), &second_id)
        .await
        .expect_err("deleted");
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
}

/// A node's etcd peer certificate, as its etcd reads it.
fn peer_certificate_of(node: &TestNode) -> Option<metropolis_identity::Certificate> {
    let pem = std::fs::read_to_string(node.data_dir.join("etcd").join("peer.pem")).ok()?;
    let der = metropolis_identity::pem_to_cert_der(&pem).ok()?;
    metropolis_identity::parse_certificate(&der).ok()
}

/// Each node's ID and boot ID, by address.
fn boot_ids(list: &[Node], of: &[&TestNode]) -> Vec<(String, Vec<u8>)> {
    of.iter()
        .map(|t| {
            let n = list
                .iter()
                .find(|n| {
                    n.status
                        .as_ref()
                        .is_some_and(|s| s.external_address == t.address.to_string())
                })
                .unwrap_or_else(|| panic!("no node at {}: {list:#?}", t.address));
            let boot = n
                .status
                .as_ref()
                .map(|s| s.boot_id.clone())
                .unwrap_or_default();
            (n.id.clone(), boot)
        })
        .collect()
}

/// The owner's way to whichever node leads.
struct Leader {
    addrs: Vec<std::net::SocketAddr>,
    ca: Vec<u8>,
    identity: (Vec<u8>, SigningKey),
}

impl Leader {
    async fn mgmt(&self) -> Result<ManagementClient<Channel>, String> {
        let tls = metropolis_identity::client_config(trust(&self.ca), Some(self.identity.clone()))
            .map_err(|e| e.to_string())?;
        let c = metropolis_rpc::client::connect_leader(&self.addrs, 0, tls)
            .await
            .map_err(|e| e.to_string())?;
        Ok(ManagementClient::new(c.channel))
    }

    /// A label write on node `id` through the curator leader, retried
    /// while there is none (an election after etcd lost its quorum); it
    /// must get through.
    async fn write_label(&self, id: &str, value: &str, patience: Duration) {
        use metropolis_api::api::{UpdateNodeLabelsRequest, update_node_labels_request};
        let deadline = Instant::now() + patience;
        loop {
            let req = UpdateNodeLabelsRequest {
                node: Some(update_node_labels_request::Node::Id(id.to_string())),
                upsert: vec![update_node_labels_request::Pair {
                    key: "written".into(),
                    value: value.into(),
                }],
                delete: vec![],
            };
            let result = match self.mgmt().await {
                Ok(mut m) => m.update_node_labels(req).await.map_err(|e| e.to_string()),
                Err(e) => Err(e),
            };
            match result {
                Ok(_) => return,
                Err(e) => assert!(Instant::now() < deadline, "write {value}: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn nodes(&self) -> Vec<Node> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(mut m) = self.mgmt().await
                && let Ok(resp) = m
                    .get_nodes(GetNodesRequest {
                        filter: String::new(),
                    })
                    .await
                && let Ok(list) = resp.into_inner().try_collect().await
            {
                return list;
            }
            assert!(Instant::now() < deadline, "no node list from a leader");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// etcd peer certificates live as long as node certificates and are renewed
/// without a restart: on a two-member etcd cluster whose certificates live
/// 60 s, each member's peer certificate is replaced before it ends, writes
/// (which need both members) succeed past two lifetimes, a member's etcd
/// killed after that comes back over new peer handshakes (which an expired
/// certificate on either side would fail), and no node restarts. Then both
/// members are down past their certificates' end and recover on stopgaps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_peer_certificates_renew_without_restarts() {
    use metropolis_api::api::{UpdateNodeRolesRequest, update_node_roles_request};
    use metropolis_api::curator::{GetConsensusStatusRequest, curator_client::CuratorClient};
    metropolis_store::testing::find_etcd();
    let tmp = tempfile::tempdir().expect("tmp");
    let cluster = Bootstrapped::start(
        tmp.path(),
        // The test's owner channel outlives the node certificates.
        &[
            "--ha",
            "--node-certificate-lifetime",
            "60s",
            "--user-certificate-lifetime",
            "1h",
        ],
        FAST,
    )
    .await;
    let ch = cluster.owner_channel().await;
    let Bootstrapped {
        node: mut first,
        owner:
            Owner {
                key: owner_key,
                cert: owner_cert,
                ca,
            },
        ..
    } = cluster;
    let mut mgmt = ManagementClient::new(ch.clone());
    let bootstrap_peer = peer_certificate_of(&first).expect("the first member's peer certificate");
    assert_eq!(bootstrap_peer.lifetime(), LIFETIME, "bootstrap --ha");

    // A second node, approved, then a consensus member (a voter).
    let register = tmp.path().join("register.pb");
    fetch_register_params(&mut mgmt, &ca, &register).await;
    let mut second = TestNode::spawn_with(
        fresh_address(),
        &tmp.path().join("n2"),
        Some(&register),
        FAST,
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let second_id = loop {
        let list = nodes(&mut mgmt).await;
        for n in list.iter().filter(|n| n.state == NodeState::New as i32) {
            mgmt.approve_node(ApproveNodeRequest {
                pubkey: n.pubkey.clone(),
            })
            .await
            .expect("approve");
        }
        let up = list.iter().find(|n| {
            n.state == NodeState::Up as i32
                && n.status
                    .as_ref()
                    .is_some_and(|s| s.external_address == second.address.to_string())
        });
        if let Some(n) = up {
            break n.id.clone();
        }
        assert!(Instant::now() < deadline, "second node not UP: {list:#?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    mgmt.update_node_roles(UpdateNodeRolesRequest {
        node: Some(update_node_roles_request::Node::Id(second_id.clone())),
        consensus_member: Some(true),
        ..Default::default()
    })
    .await
    .expect("give ConsensusMember");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = CuratorClient::new(ch.clone())
            .get_consensus_status(GetConsensusStatusRequest {})
            .await
            .map(|r| r.into_inner());
        if let Ok(s) = &s
            && s.members.iter().filter(|m| !m.is_learner).count() == 2
            && peer_certificate_of(&second).is_some()
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the second member did not become a voter: {s:?}\n{}",
            second.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Admitted with the configured lifetime as well.
    assert_eq!(
        peer_certificate_of(&second).expect("peer").lifetime(),
        LIFETIME
    );
    // Both HEALTHY and running their curators (the second restarted into
    // etcd, and may have served as a plain node until its member caught
    // up): from here on, nobody restarts.
    let deadline = Instant::now() + Duration::from_secs(60);
    let before = loop {
        let list = nodes(&mut mgmt).await;
        let ids = boot_ids(&list, &[&first, &second]);
        let settled = |id: &str| {
            list.iter().any(|n| {
                n.id == id
                    && n.health == Health::Healthy as i32
                    && n.status
                        .as_ref()
                        .is_some_and(|s| s.running_curator.is_some())
            })
        };
        if ids.iter().all(|(id, _)| settled(id)) {
            break ids;
        }
        assert!(Instant::now() < deadline, "not HEALTHY: {list:#?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let pids = (first.pid(), second.pid());
    let leader = Leader {
        addrs: vec![first.endpoint(), second.endpoint()],
        ca: ca.clone(),
        identity: (owner_cert, owner_key),
    };

    // Past two lifetimes: writes go on, and each member's peer certificate
    // is replaced while the one it replaces is still valid.
    let members = [&first, &second];
    let mut serials: Vec<Vec<Vec<u8>>> = vec![Vec::new(); 2];
    let start = Instant::now();
    let mut writes = 0;
    while start.elapsed() < 2 * LIFETIME + Duration::from_secs(10) {
        for (i, node) in members.iter().enumerate() {
            let cert = peer_certificate_of(node).expect("a peer certificate");
            let now = time::OffsetDateTime::now_utc();
            assert!(
                cert.not_after > now,
                "node {} runs etcd on a peer certificate that ended at {} ({:?} in)\n{}",
                node.address,
                metropolis_identity::rfc3339(cert.not_after),
                start.elapsed(),
                node.log_text()
            );
            if serials[i].last() != Some(&cert.serial) {
                serials[i].push(cert.serial);
            }
        }
        writes += 1;
        leader
            .write_label(&second_id, &format!("w{writes}"), Duration::from_secs(60))
            .await;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    println!(
        "after {:?}: {writes} writes; peer certificates seen: first {}, second {}",
        start.elapsed(),
        serials[0].len(),
        serials[1].len()
    );
    for (node, seen) in members.iter().zip(&serials) {
        assert!(
            seen.len() >= 3,
            "node {} should have renewed its peer certificate at least twice: {seen:?}\n{}",
            node.address,
            node.log_text()
        );
        assert!(
            node.log_text()
                .contains("renewed the etcd peer certificate")
        );
    }
    assert!(
        bootstrap_peer.not_after < time::OffsetDateTime::now_utc(),
        "the first peer certificate ended"
    );
    // Nobody restarted: same processes, same boot IDs.
    assert_eq!((first.pid(), second.pid()), pids);
    assert_eq!(
        boot_ids(&leader.nodes().await, &[&first, &second]),
        before,
        "a node restarted; second node's log:\n{}",
        second.log_text()
    );

    // New peer handshakes both ways: the second member's etcd starts again
    // and must reach the first (and be reached) for writes to go on.
    second.kill_etcd().await;
    leader
        .write_label(&second_id, "after-etcd-restart", Duration::from_secs(60))
        .await;
    let list = leader.nodes().await;
    let labelled = list
        .iter()
        .find(|n| n.id == second_id)
        .and_then(|n| n.labels.as_ref())
        .is_some_and(|l| {
            l.pairs
                .iter()
                .any(|p| p.key == "written" && p.value == "after-etcd-restart")
        });
    assert!(labelled, "{list:#?}");
    assert_eq!((first.pid(), second.pid()), pids);
    assert_eq!(
        boot_ids(&list, &[&first, &second]),
        before,
        "a node restarted after its etcd did; second node's log:\n{}",
        second.log_text()
    );

    // Every member down until its peer certificate ended: no member can
    // reach another, so none can renew through the cluster. Each issues
    // itself a stopgap, etcd forms its quorum again, and writes go on.
    first.stop();
    second.stop();
    let deadline = Instant::now() + 2 * LIFETIME;
    while [&first, &second].iter().any(|n| {
        peer_certificate_of(n).is_none_or(|c| c.not_after >= time::OffsetDateTime::now_utc())
    }) {
        assert!(Instant::now() < deadline, "peer certificates did not end");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let outage = Instant::now();
    let (first, second) = (
        TestNode::spawn_with(first.address, &first.data_dir, None, FAST),
        TestNode::spawn_with(second.address, &second.data_dir, None, FAST),
    );
    leader
        .write_label(&second_id, "after-outage", Duration::from_secs(120))
        .await;
    println!(
        "a write succeeded {:?} after both members came back on expired peer certificates",
        outage.elapsed()
    );
    for node in [&first, &second] {
        assert!(node.log_text().contains("stopgap"), "{}", node.log_text());
    }
}

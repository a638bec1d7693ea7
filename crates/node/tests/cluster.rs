//! Nodes join a cluster: register, approve, commit, heartbeat, health,
//! GetNodes with CEL filters — with three and more real node processes.

mod support;

use std::time::{Duration, Instant};

use futures::TryStreamExt;
use metropolis_api::admin::{
    RegenerateRegisterTicketRequest, cluster_admin_client::ClusterAdminClient,
};
use metropolis_api::api::{
    ApproveNodeRequest, GetClusterInfoRequest, GetNodesRequest, GetRegisterTicketRequest, Node,
    management_client::ManagementClient, node::Health,
};
use metropolis_api::common::NodeState;
use tonic::Code;
use tonic::transport::Channel;

use support::*;

/// Fast heartbeats so health changes show within a test's patience.
const FAST: &[&str] = &[
    "--heartbeat-interval",
    "200ms",
    "--heartbeat-timeout",
    "1500ms",
];

async fn nodes(
    mgmt: &mut ManagementClient<Channel>,
    filter: &str,
) -> Result<Vec<Node>, tonic::Status> {
    mgmt.get_nodes(GetNodesRequest {
        filter: filter.into(),
    })
    .await?
    .into_inner()
    .try_collect()
    .await
}

async fn ids(mgmt: &mut ManagementClient<Channel>, filter: &str) -> Vec<String> {
    let mut v: Vec<String> = nodes(mgmt, filter)
        .await
        .expect("GetNodes")
        .into_iter()
        .map(|n| n.id)
        .collect();
    v.sort();
    v
}

/// Polls until `pred` holds for the node list, or fails after `limit`.
async fn wait_for(
    mgmt: &mut ManagementClient<Channel>,
    what: &str,
    limit: Duration,
    pred: impl Fn(&[Node]) -> bool,
) {
    let deadline = Instant::now() + limit;
    loop {
        let list = nodes(mgmt, "").await.expect("GetNodes");
        if pred(&list) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {list:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn node_by_id<'a>(list: &'a [Node], id: &str) -> Option<&'a Node> {
    list.iter().find(|n| n.id == id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_register_heartbeat_and_filter() {
    let tmp = tempfile::tempdir().expect("tmp");
    let owner = metropolis_identity::generate_key();
    let params = tmp.path().join("bootstrap.pb");
    write_bootstrap_params(&params, &owner);
    let first = TestNode::spawn_with(fresh_address(), &tmp.path().join("n1"), Some(&params), FAST);
    first.wait_serving().await;
    let ca = fetch_ca(first.endpoint()).await.expect("ca");
    let ch = owner_channel(first.endpoint(), &ca, &owner).await;
    let mut mgmt = ManagementClient::new(ch.clone());
    let info = mgmt
        .get_cluster_info(GetClusterInfoRequest {})
        .await
        .expect("info")
        .into_inner();
    let dir = info.cluster_directory.expect("directory");
    let ticket = mgmt
        .get_register_ticket(GetRegisterTicketRequest {})
        .await
        .expect("ticket")
        .into_inner()
        .ticket;

    // Two nodes register: one with a valid label, one with an invalid label
    // that is dropped.
    let p2 = tmp.path().join("r2.pb");
    write_register_params(
        &p2,
        &dir,
        &ticket,
        &ca,
        &[("zone", "a"), ("example.com/rack", "r1")],
    );
    let p3 = tmp.path().join("r3.pb");
    write_register_params(&p3, &dir, &ticket, &ca, &[("bad key", "x")]);
    let mut second = TestNode::spawn_with(fresh_address(), &tmp.path().join("n2"), Some(&p2), FAST);
    let mut third = TestNode::spawn_with(fresh_address(), &tmp.path().join("n3"), Some(&p3), FAST);

    wait_for(&mut mgmt, "two NEW nodes", Duration::from_secs(30), |l| {
        l.iter()
            .filter(|n| n.state == NodeState::New as i32)
            .count()
            == 2
    })
    .await;
    let new = nodes(&mut mgmt, "node.state == NODE_STATE_NEW")
        .await
        .expect("new");
    for n in &new {
        // The node logged its ID for out-of-band comparison.
        let logs = second.log_text() + &third.log_text();
        assert!(logs.contains(&n.id), "node {} did not log its ID", n.id);
        assert!(n.status.is_none());
    }
    // Unknown and malformed keys.
    let err = mgmt
        .approve_node(ApproveNodeRequest {
            pubkey: vec![9; 32],
        })
        .await
        .expect_err("unknown");
    assert_eq!(err.code(), Code::NotFound, "{err}");
    let err = mgmt
        .approve_node(ApproveNodeRequest { pubkey: vec![9; 5] })
        .await
        .expect_err("short");
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    for n in &new {
        mgmt.approve_node(ApproveNodeRequest {
            pubkey: n.pubkey.clone(),
        })
        .await
        .expect("approve");
        mgmt.approve_node(ApproveNodeRequest {
            pubkey: n.pubkey.clone(),
        })
        .await
        .expect("approve again");
    }
    wait_for(
        &mut mgmt,
        "three healthy nodes",
        Duration::from_secs(30),
        |l| {
            l.len() == 3
                && l.iter()
                    .all(|n| n.state == NodeState::Up as i32 && n.health == Health::Healthy as i32)
        },
    )
    .await;
    let all = nodes(&mut mgmt, "").await.expect("all");
    for n in &all {
        let since = n
            .time_since_heartbeat
            .expect("time_since_heartbeat set when healthy");
        assert!(Duration::try_from(since).expect("duration") < Duration::from_millis(1500));
        let status = n.status.as_ref().expect("status reported");
        assert!(!status.boot_id.is_empty());
        assert!(status.version.is_some());
    }
    let first_id = all
        .iter()
        .find(|n| {
            n.roles
                .as_ref()
                .is_some_and(|r| r.consensus_member.is_some())
        })
        .expect("cm")
        .id
        .clone();
    let third_id = all
        .iter()
        .find(|n| {
            n.status
                .as_ref()
                .is_some_and(|s| s.external_address == third.address.to_string())
        })
        .expect("3")
        .id
        .clone();
    let second_id = all
        .iter()
        .find(|n| {
            n.status
                .as_ref()
                .is_some_and(|s| s.external_address == second.address.to_string())
        })
        .expect("2")
        .id
        .clone();
    assert_eq!(
        node_by_id(&all, &second_id)
            .and_then(|n| n.labels.as_ref())
            .map(|l| l.pairs.len()),
        Some(2)
    );
    assert_eq!(
        node_by_id(&all, &third_id)
            .and_then(|n| n.labels.as_ref())
            .map(|l| l.pairs.len()),
        Some(0)
    );

    // The directory lists every UP node with its address.
    let info = mgmt
        .get_cluster_info(GetClusterInfoRequest {})
        .await
        .expect("info")
        .into_inner();
    let mut hosts: Vec<String> = info
        .cluster_directory
        .expect("dir")
        .nodes
        .iter()
        .map(|n| n.addresses[0].host.clone())
        .collect();
    hosts.sort();
    let mut want = vec![
        first.address.to_string(),
        second.address.to_string(),
        third.address.to_string(),
    ];
    want.sort();
    assert_eq!(hosts, want);

    // The seed's filters, exactly as written.
    let mut everyone = vec![first_id.clone(), second_id.clone(), third_id.clone()];
    everyone.sort();
    assert_eq!(
        ids(&mut mgmt, "node.state == NODE_STATE_UP").await,
        everyone
    );
    assert_eq!(
        ids(&mut mgmt, "has(node.roles.kubernetes_worker)").await,
        Vec::<String>::new()
    );
    assert_eq!(
        ids(&mut mgmt, "has(node.roles.consensus_member)").await,
        vec![first_id.clone()]
    );
    assert_eq!(
        ids(&mut mgmt, "node.time_since_heartbeat < duration('6s')").await,
        everyone
    );
    assert_eq!(
        ids(&mut mgmt, "node.labels.pairs.exists(p, p.key == \"zone\")").await,
        vec![second_id.clone()]
    );
    assert_eq!(
        ids(
            &mut mgmt,
            "node.health == HEALTH_HEALTHY && node.id != \"x\""
        )
        .await,
        everyone
    );

    // Bad filters: INVALID_ARGUMENT, and the curator keeps serving.
    let hostile_chain = format!("{}1", "1+".repeat(10_000));
    let hostile_parens = format!("{}1{}", "(".repeat(10_000), ")".repeat(10_000));
    let megabyte = format!("node.id == \"{}\"", "a".repeat(1 << 20));
    for bad in [
        "node.state ==",
        "nodes.state == 1",
        "NODE_STATE_UPP == 1",
        "node.state",
        hostile_chain.as_str(),
        hostile_parens.as_str(),
        megabyte.as_str(),
    ] {
        let err = nodes(&mut mgmt, bad).await.expect_err("bad filter");
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{}: {err}",
            &bad[..bad.len().min(40)]
        );
        assert!(!err.message().is_empty());
    }
    assert_eq!(
        ids(&mut mgmt, "node.state == NODE_STATE_UP").await.len(),
        3,
        "curator still serves"
    );

    // Kill a node: HEARTBEAT_TIMEOUT. Restart it: HEALTHY again, same ID,
    // no new approval.
    let boot_before = node_by_id(&all, &third_id)
        .and_then(|n| n.status.clone())
        .expect("status")
        .boot_id;
    third.kill();
    wait_for(
        &mut mgmt,
        "heartbeat timeout",
        Duration::from_secs(20),
        |l| node_by_id(l, &third_id).is_some_and(|n| n.health == Health::HeartbeatTimeout as i32),
    )
    .await;
    assert_eq!(
        ids(&mut mgmt, "node.health == HEALTH_HEARTBEAT_TIMEOUT").await,
        vec![third_id.clone()]
    );
    let third_again = TestNode::spawn_with(third.address, &third.data_dir, None, FAST);
    wait_for(
        &mut mgmt,
        "restarted node healthy",
        Duration::from_secs(20),
        |l| {
            node_by_id(l, &third_id).is_some_and(|n| {
                n.health == Health::Healthy as i32
                    && n.status.as_ref().is_some_and(|s| s.boot_id != boot_before)
            })
        },
    )
    .await;
    assert_eq!(
        nodes(&mut mgmt, "").await.expect("all").len(),
        3,
        "no new node appeared"
    );

    // A wrong ticket is refused: the node exits with a reason and the
    // cluster is unchanged.
    let bad = tmp.path().join("bad.pb");
    write_register_params(&bad, &dir, b"not the ticket", &ca, &[]);
    let out = run_node(&[
        "--data-dir",
        tmp.path().join("n4").to_str().expect("utf8"),
        "--address",
        &fresh_address().to_string(),
        "--params",
        bad.to_str().expect("utf8"),
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("wrong register ticket"),
        "{}",
        stderr(&out)
    );
    assert_eq!(nodes(&mut mgmt, "").await.expect("all").len(), 3);

    // Regenerating the ticket invalidates the old one at once.
    let fresh = ClusterAdminClient::new(ch)
        .regenerate_register_ticket(RegenerateRegisterTicketRequest {})
        .await
        .expect("regenerate")
        .into_inner()
        .ticket;
    assert_ne!(fresh, ticket);
    let old = tmp.path().join("old.pb");
    write_register_params(&old, &dir, &ticket, &ca, &[]);
    let out = run_node(&[
        "--data-dir",
        tmp.path().join("n5").to_str().expect("utf8"),
        "--address",
        &fresh_address().to_string(),
        "--params",
        old.to_str().expect("utf8"),
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("wrong register ticket"),
        "{}",
        stderr(&out)
    );
    let newp = tmp.path().join("new.pb");
    write_register_params(&newp, &dir, &fresh, &ca, &[]);
    let mut fifth =
        TestNode::spawn_with(fresh_address(), &tmp.path().join("n6"), Some(&newp), FAST);
    wait_for(
        &mut mgmt,
        "registration with the new ticket",
        Duration::from_secs(20),
        |l| l.iter().any(|n| n.state == NodeState::New as i32),
    )
    .await;
    assert!(
        fifth.try_exit().is_none(),
        "the waiting node must keep waiting"
    );
    second.stop();
    drop(third_again);
}

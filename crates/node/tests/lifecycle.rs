//! Operating nodes through their whole life with real node processes: roles,
//! decommission, delete — and a deleted node's certificate stops working
//! everywhere, also after a curator restart.

mod support;

use std::time::{Duration, Instant};

use futures::TryStreamExt;
use metropolis_api::api::{
    ApproveNodeRequest, DecommissionNodeRequest, DeleteNodeRequest, GetClusterInfoRequest,
    GetNodesRequest, Node, UpdateNodeRolesRequest, decommission_node_request, delete_node_request,
    management_client::ManagementClient, node::Health, update_node_roles_request,
};
use metropolis_api::common::NodeState;
use tonic::Code;
use tonic::transport::Channel;

use support::*;

const FAST: &[&str] = &[
    "--heartbeat-interval",
    "200ms",
    "--heartbeat-timeout",
    "1500ms",
];

async fn all(mgmt: &mut ManagementClient<Channel>) -> Vec<Node> {
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

async fn wait_for(
    mgmt: &mut ManagementClient<Channel>,
    what: &str,
    pred: impl Fn(&[Node]) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let list = all(mgmt).await;
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

fn roles(id: &str, w: Option<bool>, k: Option<bool>, c: Option<bool>) -> UpdateNodeRolesRequest {
    UpdateNodeRolesRequest {
        node: Some(update_node_roles_request::Node::Id(id.into())),
        kubernetes_worker: w,
        kubernetes_controller: k,
        consensus_member: c,
    }
}

fn by_address<'a>(list: &'a [Node], node: &TestNode) -> &'a Node {
    list.iter()
        .find(|n| {
            n.status
                .as_ref()
                .is_some_and(|s| s.external_address == node.address.to_string())
        })
        .expect("node by address")
}

async fn wait_exit(node: &mut TestNode) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(s) = node.try_exit() {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "node did not exit; log:\n{}",
            node.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_decommission_and_delete() {
    let tmp = tempfile::tempdir().expect("tmp");
    let owner = metropolis_identity::generate_key();
    let bootstrap = tmp.path().join("bootstrap.pb");
    write_bootstrap_params(&bootstrap, &owner);
    let mut first = TestNode::spawn_with(
        fresh_address(),
        &tmp.path().join("n1"),
        Some(&bootstrap),
        FAST,
    );
    first.wait_serving().await;
    let ca = fetch_ca(first.endpoint()).await.expect("ca");
    let mut mgmt = ManagementClient::new(owner_channel(first.endpoint(), &ca, &owner).await);
    let register = tmp.path().join("register.pb");
    fetch_register_params(&mut mgmt, &ca, &register).await;
    let mut second = TestNode::spawn_with(
        fresh_address(),
        &tmp.path().join("n2"),
        Some(&register),
        FAST,
    );
    let mut third = TestNode::spawn_with(
        fresh_address(),
        &tmp.path().join("n3"),
        Some(&register),
        FAST,
    );
    let _waiting = TestNode::spawn_with(
        fresh_address(),
        &tmp.path().join("n4"),
        Some(&register),
        FAST,
    );
    wait_for(&mut mgmt, "three NEW nodes", |l| {
        l.iter()
            .filter(|n| n.state == NodeState::New as i32)
            .count()
            == 3
    })
    .await;
    // Approve two of them; the third stays NEW.
    let new: Vec<Node> = all(&mut mgmt)
        .await
        .into_iter()
        .filter(|n| n.state == NodeState::New as i32)
        .collect();
    let log2 = second.log_text();
    let log3 = third.log_text();
    for n in new
        .iter()
        .filter(|n| log2.contains(&n.id) || log3.contains(&n.id))
    {
        mgmt.approve_node(ApproveNodeRequest {
            pubkey: n.pubkey.clone(),
        })
        .await
        .expect("approve");
    }
    let pending = new
        .iter()
        .find(|n| !log2.contains(&n.id) && !log3.contains(&n.id))
        .expect("pending")
        .id
        .clone();
    wait_for(&mut mgmt, "three healthy UP nodes", |l| {
        l.iter()
            .filter(|n| n.state == NodeState::Up as i32 && n.health == Health::Healthy as i32)
            .count()
            == 3
    })
    .await;
    let list = all(&mut mgmt).await;
    let first_id = by_address(&list, &first).id.clone();
    let second_id = by_address(&list, &second).id.clone();
    let third_id = by_address(&list, &third).id.clone();

    // Roles: the rules and their codes.
    let err = mgmt
        .update_node_roles(roles(&pending, Some(true), None, None))
        .await
        .expect_err("NEW node");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    let err = mgmt
        .update_node_roles(roles(&second_id, None, Some(true), None))
        .await
        .expect_err("controller");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    assert!(err.message().contains("ConsensusMember"), "{err}");
    let err = mgmt
        .update_node_roles(roles(&first_id, None, None, Some(false)))
        .await
        .expect_err("last member");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    let err = mgmt
        .update_node_roles(roles("metropolis-none", Some(true), None, None))
        .await
        .expect_err("unknown");
    assert_eq!(err.code(), Code::NotFound, "{err}");
    mgmt.update_node_roles(roles(&second_id, Some(true), None, None))
        .await
        .expect("worker");
    let list = all(&mut mgmt).await;
    assert!(
        list.iter()
            .find(|n| n.id == second_id)
            .and_then(|n| n.roles.as_ref())
            .is_some_and(|r| r.kubernetes_worker.is_some())
    );
    // The node learns its roles through Watch.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !second.log_text().contains("kubernetes_worker=true") {
        assert!(
            Instant::now() < deadline,
            "node did not log its new role:\n{}",
            second.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Decommission: only without roles; then the node wipes itself and stops.
    let decom = |id: &str| DecommissionNodeRequest {
        node: Some(decommission_node_request::Node::Id(id.into())),
    };
    let err = mgmt
        .decommission_node(decom(&second_id))
        .await
        .expect_err("has roles");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    mgmt.update_node_roles(roles(&second_id, Some(false), None, None))
        .await
        .expect("drop worker");
    mgmt.decommission_node(decom(&second_id))
        .await
        .expect("decommission");
    let status = wait_exit(&mut second).await;
    assert!(
        status.success(),
        "decommissioned node exits cleanly: {status:?}\n{}",
        second.log_text()
    );
    assert!(!second.data_dir.exists(), "data directory wiped");
    wait_for(&mut mgmt, "DECOMMISSIONED", |l| {
        l.iter()
            .any(|n| n.id == second_id && n.state == NodeState::Decommissioned as i32)
    })
    .await;
    let again = run_node(&[
        "--data-dir",
        second.data_dir.to_str().expect("utf8"),
        "--address",
        &second.address.to_string(),
    ]);
    assert!(
        !again.status.success(),
        "a decommissioned node does not come back"
    );

    // Delete: by default only DECOMMISSIONED nodes without roles.
    let del = |id: &str, roles: bool, state: bool| DeleteNodeRequest {
        node: Some(delete_node_request::Node::Id(id.into())),
        safety_bypass_has_roles: roles.then_some(delete_node_request::SafetyBypassHasRoles {}),
        safety_bypass_not_decommissioned: state
            .then_some(delete_node_request::SafetyBypassNotDecommissioned {}),
    };
    let err = mgmt
        .delete_node(del(&third_id, false, false))
        .await
        .expect_err("not decommissioned");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    mgmt.delete_node(del(&second_id, false, false))
        .await
        .expect("delete decommissioned");
    assert!(all(&mut mgmt).await.iter().all(|n| n.id != second_id));

    // Deleting a running node (with the bypass): its certificate stops working
    // at once, the node notices and exits, and it never shows again.
    let (cert3, key3) = node_credentials(&third.data_dir);
    mgmt.delete_node(del(&third_id, false, true))
        .await
        .expect("delete running node");
    let status = wait_exit(&mut third).await;
    assert!(!status.success());
    assert!(
        third.log_text().contains("removed from the cluster"),
        "{}",
        third.log_text()
    );
    let as_third = channel(
        first.endpoint(),
        trust(&ca),
        Some((cert3.clone(), key3.clone())),
    )
    .await
    .expect("connect");
    let err = ManagementClient::new(as_third)
        .get_cluster_info(GetClusterInfoRequest {})
        .await
        .expect_err("deleted");
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    assert!(err.message().contains("removed from the cluster"), "{err}");

    // After a curator restart too.
    first.stop();
    let first = TestNode::spawn_with(first.address, &first.data_dir, None, FAST);
    first.wait_leading().await;
    let as_third = channel(first.endpoint(), trust(&ca), Some((cert3, key3)))
        .await
        .expect("connect");
    let err = ManagementClient::new(as_third)
        .get_cluster_info(GetClusterInfoRequest {})
        .await
        .expect_err("deleted");
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    let out = run_node(&[
        "--data-dir",
        third.data_dir.to_str().expect("utf8"),
        "--address",
        &third.address.to_string(),
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("removed from the cluster"),
        "{}",
        stderr(&out)
    );
    let mut mgmt = ManagementClient::new(owner_channel(first.endpoint(), &ca, &owner).await);
    let ids: Vec<String> = all(&mut mgmt).await.into_iter().map(|n| n.id).collect();
    assert!(
        !ids.contains(&second_id) && !ids.contains(&third_id),
        "{ids:?}"
    );
}

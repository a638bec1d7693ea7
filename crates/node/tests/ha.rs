//! High availability on etcd, with real node processes and real etcd
//! servers: three consensus members and two workers; the curator leader's
//! node is killed and comes back; a follower's etcd is killed alone.
//!
//! Needs the `etcd` binary (Debian: `apt-get install etcd-server`; `bash
//! scripts/setup` installs it) and fails, never skips, without it.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use metropolis_api::api::{
    ApproveNodeRequest, GetNodesRequest, Node, UpdateNodeLabelsRequest, UpdateNodeRolesRequest,
    management_client::ManagementClient, node::Health, update_node_labels_request,
    update_node_roles_request,
};
use metropolis_api::common::NodeState;
use metropolis_api::curator::{
    GetConsensusStatusRequest, GetConsensusStatusResponse, GetCurrentLeaderRequest,
    GetCurrentLeaderResponse, curator_client::CuratorClient,
    curator_local_client::CuratorLocalClient,
};
use tonic::transport::Channel;

use support::*;

/// Fast heartbeats and a short leader lease, so failover shows within a
/// test's patience.
const FLAGS: &[&str] = &[
    "--heartbeat-interval",
    "300ms",
    "--heartbeat-timeout",
    "2s",
    "--leader-lease-ttl",
    "2s",
];

/// An owner channel to whichever node leads now, found from any address.
async fn leader_channel(addrs: &[SocketAddr], owner: &Owner) -> Option<Channel> {
    let tls = metropolis_identity::client_config(
        trust(&owner.ca),
        Some((owner.cert.clone(), owner.key.clone())),
    )
    .ok()?;
    let c = metropolis_rpc::client::connect_leader(addrs, 0, tls)
        .await
        .ok()?;
    c.leader.then_some(c.channel)
}

async fn nodes(mgmt: &mut ManagementClient<Channel>) -> Result<Vec<Node>, tonic::Status> {
    mgmt.get_nodes(GetNodesRequest {
        filter: String::new(),
    })
    .await?
    .into_inner()
    .try_collect()
    .await
}

async fn consensus(ch: &Channel) -> Result<GetConsensusStatusResponse, tonic::Status> {
    Ok(CuratorClient::new(ch.clone())
        .get_consensus_status(GetConsensusStatusRequest {})
        .await?
        .into_inner())
}

/// Polls `check` against the current leader until it returns Some.
async fn eventually<T, F, Fut>(
    what: &str,
    limit: Duration,
    addrs: &[SocketAddr],
    owner: &Owner,
    check: F,
) -> T
where
    F: Fn(Channel) -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(ch) = leader_channel(addrs, owner).await
            && let Some(v) = check(ch).await
        {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// What the node at `addr` says about the curator leader.
async fn current_leader(addr: SocketAddr, ca: &[u8]) -> GetCurrentLeaderResponse {
    let ch = channel(addr, trust(ca), None).await.expect("connect");
    CuratorLocalClient::new(ch)
        .get_current_leader(GetCurrentLeaderRequest {})
        .await
        .expect("GetCurrentLeader")
        .into_inner()
        .message()
        .await
        .expect("GetCurrentLeader stream")
        .expect("a first message")
}

/// Waits until the leader reports node `id` with `health`.
async fn wait_health(addrs: &[SocketAddr], owner: &Owner, id: &str, health: Health) {
    let what = format!("{id} to be {}", health.as_str_name());
    eventually(
        &what,
        Duration::from_secs(60),
        addrs,
        owner,
        |ch| async move {
            let list = nodes(&mut ManagementClient::new(ch)).await.ok()?;
            list.iter()
                .any(|n| n.id == id && n.health == health as i32)
                .then_some(())
        },
    )
    .await
}

/// UpdateNodeRoles of ConsensusMember alone.
async fn set_consensus_member(ch: Channel, id: &str, on: bool) -> Result<(), tonic::Status> {
    ManagementClient::new(ch)
        .update_node_roles(UpdateNodeRolesRequest {
            node: Some(update_node_roles_request::Node::Id(id.to_string())),
            consensus_member: Some(on),
            ..Default::default()
        })
        .await
        .map(|_| ())
}

/// The curator leader as the node behind `ch` sees it.
async fn leader_seen_by(ch: Channel) -> Option<String> {
    let l = CuratorLocalClient::new(ch)
        .get_current_leader(GetCurrentLeaderRequest {})
        .await
        .ok()?
        .into_inner()
        .message()
        .await
        .ok()??;
    Some(l.leader_node_id)
}

/// A former consensus member that settled: no role, no curator, healthy.
fn a_healthy_plain_node(n: &Node) -> bool {
    let plain = n
        .roles
        .as_ref()
        .is_none_or(|r| r.consensus_member.is_none());
    let running_curator = n
        .status
        .as_ref()
        .is_some_and(|s| s.running_curator.is_some());
    plain && !running_curator && n.health == Health::Healthy as i32
}

fn by_address<'a>(list: &'a [Node], node: &TestNode) -> Option<&'a Node> {
    list.iter().find(|n| {
        n.status
            .as_ref()
            .is_some_and(|s| s.external_address == node.address.to_string())
    })
}

fn labels_of(n: &Node) -> BTreeMap<String, String> {
    n.labels
        .as_ref()
        .map(|l| {
            l.pairs
                .iter()
                .map(|p| (p.key.clone(), p.value.clone()))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_survive_losing_the_leader_and_a_follower_etcd() {
    // Fails (never skips) without etcd, saying how to install it.
    metropolis_store::testing::find_etcd();
    let tmp = tempfile::tempdir().expect("tmp");
    // The operator's way: metroctl writes HA bootstrap parameters (and
    // creates the owner key).
    let cluster = Bootstrapped::start(tmp.path(), &["--ha"], FLAGS).await;
    let ch = cluster.owner_channel().await;
    let Bootstrapped {
        cfg,
        node: mut first,
        owner,
        ..
    } = cluster;
    let ca = owner.ca.clone();
    let mut mgmt = ManagementClient::new(ch.clone());
    let status = consensus(&ch).await.expect("consensus status");
    assert_eq!(
        status.backend,
        metropolis_api::admin::ConsensusBackend::Etcd as i32,
        "bootstrapped with --ha: etcd backend: {status:?}"
    );
    assert_eq!(status.members.len(), 1);
    // Upstream's field names the member by node ID.
    assert_eq!(status.etcd_member.len(), 1, "{status:?}");
    assert_eq!(
        status.etcd_member[0].id, status.members[0].name,
        "{status:?}"
    );
    assert!(
        status.etcd_member[0].id.starts_with("metropolis-"),
        "{status:?}"
    );

    // Four more nodes register; all are approved.
    let reg = tmp.path().join("register.pb");
    fetch_register_params(&mut mgmt, &ca, &reg).await;
    let mut others: Vec<TestNode> = (2..=5)
        .map(|i| {
            TestNode::spawn_with(
                fresh_address(),
                &tmp.path().join(format!("n{i}")),
                Some(&reg),
                FLAGS,
            )
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let list = nodes(&mut mgmt).await.expect("nodes");
        for n in list.iter().filter(|n| n.state == NodeState::New as i32) {
            mgmt.approve_node(ApproveNodeRequest {
                pubkey: n.pubkey.clone(),
            })
            .await
            .expect("approve");
        }
        if list.len() == 5
            && list
                .iter()
                .all(|n| n.state == NodeState::Up as i32 && n.status.is_some())
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "nodes did not come up: {list:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let list = nodes(&mut mgmt).await.expect("nodes");
    let id_of = |n: &TestNode| by_address(&list, n).expect("node by address").id.clone();
    let ids: Vec<String> = std::iter::once(&first)
        .chain(others.iter())
        .map(id_of)
        .collect();

    // Nodes 2 and 3 become consensus members, one at a time: each joins etcd
    // as a learner and is promoted once caught up.
    for member in &ids[1..3] {
        set_consensus_member(ch.clone(), member, true)
            .await
            .expect("give ConsensusMember");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let s = consensus(&ch).await.expect("status");
            if s.members.iter().any(|m| &m.name == member && !m.is_learner) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{member} was not promoted to voter: {s:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    // Writes acknowledged before the failure: a label on every node, the
    // KubernetesWorker role on the workers.
    for (i, id) in ids.iter().enumerate() {
        mgmt.update_node_labels(UpdateNodeLabelsRequest {
            node: Some(update_node_labels_request::Node::Id(id.clone())),
            upsert: vec![update_node_labels_request::Pair {
                key: "written-before".into(),
                value: format!("v{i}"),
            }],
            delete: vec![],
        })
        .await
        .expect("label");
    }
    for id in &ids[3..] {
        mgmt.update_node_roles(UpdateNodeRolesRequest {
            node: Some(update_node_roles_request::Node::Id(id.clone())),
            kubernetes_worker: Some(true),
            ..Default::default()
        })
        .await
        .expect("worker role");
    }
    drop(mgmt);
    drop(ch);

    let addrs: Vec<SocketAddr> = std::iter::once(&first)
        .chain(others.iter())
        .map(|n| n.endpoint())
        .collect();
    let leader = current_leader(first.endpoint(), &ca).await;
    assert_eq!(leader.leader_node_id, ids[0], "the bootstrap node leads");

    // Kill the leader's node process (its etcd dies with it).
    let killed_at = Instant::now();
    first.kill();
    let new_leader: String = eventually(
        "a new leader",
        Duration::from_secs(60),
        &addrs[1..],
        &owner,
        |ch| async move {
            let mut m = ManagementClient::new(ch.clone());
            nodes(&mut m).await.ok()?;
            leader_seen_by(ch).await
        },
    )
    .await;
    let failover = killed_at.elapsed();
    // The bound: 2 × lease TTL + one heartbeat timeout (printed, not
    // asserted: tests never assert wall-clock times).
    println!("failover bound: 2 x 2s lease TTL + 2s heartbeat timeout = 6s");
    println!(
        "failover: a new curator leader ({new_leader}) served GetNodes {failover:?} after the leader was killed"
    );
    assert_ne!(new_leader, ids[0]);
    assert!(
        ids[1..3].contains(&new_leader),
        "the new leader is a consensus member"
    );

    // Every acknowledged write is still there.
    let list = eventually(
        "the node list",
        Duration::from_secs(30),
        &addrs[1..],
        &owner,
        |ch| async move { nodes(&mut ManagementClient::new(ch)).await.ok() },
    )
    .await;
    for (i, id) in ids.iter().enumerate() {
        let n = list
            .iter()
            .find(|n| &n.id == id)
            .unwrap_or_else(|| panic!("node {id} lost"));
        assert_eq!(n.state, NodeState::Up as i32, "{id} approved and up");
        assert_eq!(
            labels_of(n).get("written-before"),
            Some(&format!("v{i}")),
            "label of {id}"
        );
        let roles = n.roles.clone().unwrap_or_default();
        assert_eq!(
            roles.consensus_member.is_some(),
            i < 3,
            "consensus role of {id}"
        );
        assert_eq!(
            roles.kubernetes_worker.is_some(),
            i >= 3,
            "worker role of {id}"
        );
    }
    // The workers stay or come back HEALTHY with the new leader.
    for w in &ids[3..] {
        wait_health(&addrs[1..], &owner, w, Health::Healthy).await;
    }

    // metroctl keeps working against the cluster's addresses, the dead one
    // first.
    let endpoints = addrs
        .iter()
        .map(|a| a.ip().to_string())
        .collect::<Vec<_>>()
        .join(",");
    let out = metroctl(&cfg, &["--endpoints", &endpoints, "--yes", "takeownership"]);
    assert!(out.status.success(), "takeownership: {}", stderr(&out));
    let out = metroctl(
        &cfg,
        &["--endpoints", &endpoints, "node", "describe", "-o", "json"],
    );
    assert!(out.status.success(), "describe: {}", stderr(&out));
    assert!(stdout(&out).contains(&ids[4]));
    let out = metroctl(&cfg, &["--endpoints", &endpoints, "cluster", "status"]);
    assert!(out.status.success(), "status: {}", stderr(&out));
    let shown = stdout(&out);
    assert!(
        shown.contains(&new_leader) && shown.contains("voter"),
        "{shown}"
    );

    // Node health in metrics comes from the leader only (heartbeats go to
    // the leader; a follower would call every node timed out).
    let follower = ids[1..3]
        .iter()
        .find(|id| **id != new_leader)
        .expect("the other member");
    for (id, leads) in [(&new_leader, true), (follower, false)] {
        let out = metroctl(&cfg, &["--endpoints", &endpoints, "node", "metrics", id]);
        assert!(out.status.success(), "metrics: {}", stderr(&out));
        let text = stdout(&out);
        let flag = if leads { 1 } else { 0 };
        assert!(
            text.contains(&format!("\nmetropolis_curator_leader {flag}\n")),
            "{id}: {text}"
        );
        assert_eq!(text.contains("metropolis_nodes{"), leads, "{id}: {text}");
    }

    // The killed node comes back: it rejoins etcd and the curator pool as a
    // follower.
    let first = TestNode::spawn_with(first.address, &first.data_dir.clone(), None, FLAGS);
    first.wait_serving().await;
    let first_id = ids[0].clone();
    eventually(
        "the old leader back and healthy",
        Duration::from_secs(60),
        &addrs,
        &owner,
        |ch| {
            let first_id = first_id.clone();
            async move {
                let s = consensus(&ch).await.ok()?;
                let voters = s
                    .members
                    .iter()
                    .filter(|m| !m.is_learner && !m.name.is_empty())
                    .count();
                let list = nodes(&mut ManagementClient::new(ch)).await.ok()?;
                let healthy = list
                    .iter()
                    .any(|n| n.id == first_id && n.health == Health::Healthy as i32);
                (voters == 3 && healthy).then_some(())
            }
        },
    )
    .await;
    let back = current_leader(first.endpoint(), &ca).await;
    assert_eq!(back.this_node_id, ids[0]);
    assert!(
        !back.leader_node_id.is_empty(),
        "the restarted node knows the leader"
    );

    // Kill one follower's etcd only: the node restarts it and it catches up.
    // (The member that is neither the leader nor the restarted node.)
    let follower = if back.leader_node_id == ids[1] {
        &others[1]
    } else {
        &others[0]
    };
    follower.kill_etcd().await;
    // A write after the restart reaches the restarted member: read it from
    // that member's own etcd (serving it means it caught up).
    let worker = ids[3].clone();
    eventually(
        "a write after the etcd restart",
        Duration::from_secs(30),
        &addrs,
        &owner,
        |ch| {
            let worker = worker.clone();
            async move {
                ManagementClient::new(ch)
                    .update_node_labels(UpdateNodeLabelsRequest {
                        node: Some(update_node_labels_request::Node::Id(worker)),
                        upsert: vec![update_node_labels_request::Pair {
                            key: "written-after".into(),
                            value: "yes".into(),
                        }],
                        delete: vec![],
                    })
                    .await
                    .ok()
            }
        },
    )
    .await;
    let socket = follower.data_dir.join("etcd").join("client.sock:0");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(store) = metropolis_store::EtcdStore::connect_unix(&socket).await
            && let Ok(Some(kv)) = metropolis_store::Store::get(
                store.as_ref(),
                format!("/nodes/{}", ids[3]).as_bytes(),
            )
            .await
        {
            let node =
                <metropolis_api::private::Node as prost::Message>::decode(kv.value.as_slice())
                    .expect("node record");
            let labels = node.labels.unwrap_or_default();
            if labels.pairs.iter().any(|p| p.key == "written-after") {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the restarted etcd member did not catch up"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Taking ConsensusMember away: refused while another member is down
    // (two of the three would remain, one of them dead: no quorum)...
    let leader_id = back.leader_node_id.clone();
    let mut all: Vec<TestNode> = std::iter::once(first).chain(others.drain(..)).collect();
    let x = if leader_id == ids[1] { 2 } else { 1 };
    let y = (0..3)
        .find(|i| *i != x && ids[*i] != leader_id)
        .expect("a third member");
    all[y].kill();
    wait_health(&addrs, &owner, &ids[y], Health::HeartbeatTimeout).await;
    let refused = eventually(
        "a refusal",
        Duration::from_secs(30),
        &addrs,
        &owner,
        |ch| async {
            match set_consensus_member(ch, &ids[x], false).await {
                Err(s) if s.code() == tonic::Code::Unavailable => None,
                other => Some(other),
            }
        },
    )
    .await
    .expect_err("removing a member while another is down must be refused");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused}");
    assert!(
        refused.message().contains("would lose quorum")
            && refused.message().contains(&ids[x])
            && refused.message().contains(&ids[y]),
        "names the member to remove and the one down: {refused}"
    );

    // ... and done, once it is back: the etcd member goes first, then the
    // node restarts as a plain node.
    let y_node = TestNode::spawn_with(all[y].address, &all[y].data_dir.clone(), None, FLAGS);
    all[y] = y_node;
    wait_health(&addrs, &owner, &ids[y], Health::Healthy).await;
    eventually(
        "the role removed",
        Duration::from_secs(30),
        &addrs,
        &owner,
        |ch| async { set_consensus_member(ch, &ids[x], false).await.ok() },
    )
    .await;
    let x_id = ids[x].clone();
    eventually(
        "two members and the old member healthy",
        Duration::from_secs(60),
        &addrs,
        &owner,
        |ch| {
            let x_id = x_id.clone();
            async move {
                let s = consensus(&ch).await.ok()?;
                let list = nodes(&mut ManagementClient::new(ch)).await.ok()?;
                let n = list.iter().find(|n| n.id == x_id)?;
                (s.members.len() == 2 && a_healthy_plain_node(n)).then_some(())
            }
        },
    )
    .await;
    assert!(
        !all[x].data_dir.join("etcd").exists(),
        "the former member removed its etcd data"
    );

    // The leading curator's own membership: it steps down, and metroctl's
    // retry reaches the new leader, which removes it.
    let leader_now = current_leader(all[y].endpoint(), &ca).await.leader_node_id;
    let l = ids.iter().position(|id| *id == leader_now).expect("leader");
    let stays = (0..3)
        .find(|i| *i != x && *i != l)
        .expect("the other member");
    let out = metroctl(
        &cfg,
        &[
            "--endpoints",
            &endpoints,
            "node",
            "remove",
            "role",
            "ConsensusMember",
            &leader_now,
        ],
    );
    assert!(
        out.status.success(),
        "remove the leader's role: {}",
        stderr(&out)
    );
    let (l_id, stays_id) = (ids[l].clone(), ids[stays].clone());
    eventually(
        "the other member leading alone, the old leader a plain node",
        Duration::from_secs(60),
        &addrs,
        &owner,
        |ch| {
            let (l_id, stays_id) = (l_id.clone(), stays_id.clone());
            async move {
                let s = consensus(&ch).await.ok()?;
                let leader = leader_seen_by(ch.clone()).await?;
                let list = nodes(&mut ManagementClient::new(ch)).await.ok()?;
                let n = list.iter().find(|n| n.id == l_id)?;
                (s.members.len() == 1
                    && s.members[0].name == stays_id
                    && leader == stays_id
                    && a_healthy_plain_node(n))
                .then_some(())
            }
        },
    )
    .await;
    assert!(
        !all[l].data_dir.join("etcd").exists(),
        "the former leader removed its etcd data"
    );
}

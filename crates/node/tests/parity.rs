//! Parity with upstream Metropolis (issue #11): what clients built from the
//! upstream protos and operators used to upstream's metroctl do works here,
//! against real node processes, with clients from this project's protos.
//!
//! One cluster serves most points, in turn (each `point_*` function is one
//! numbered point of the issue): a bootstrap node on etcd (HA, so that its
//! ConsensusMember role carries certificates and peers, and its etcd writes
//! raw log lines through a wrapper that starts with invalid UTF-8) and a
//! registered node with labels. The 2000-entry log responses need more
//! entries than a fresh node has: a debug build's EmitLogs makes them.
//!
//! Needs the `etcd` binary (`bash scripts/setup` installs it).

mod support;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use metropolis_api::api::{
    ApproveNodeRequest, ConfigureClusterRequest, DecommissionNodeRequest, DeleteNodeRequest,
    GetClusterInfoRequest, GetNodesRequest, LogsRequest, LogsResponse, Node, NodeParameters,
    UpdateNodeLabelsRequest, UpdateNodeRolesRequest, decommission_node_request,
    delete_node_request, logs_request, management_client::ManagementClient, node::Health,
    node_management_client::NodeManagementClient, node_parameters, update_node_labels_request,
    update_node_roles_request,
};
use metropolis_api::common::{
    ClusterConfiguration, LogFilter, NodeRoles, NodeState,
    cluster_configuration::{Kubernetes, StorageSecurityPolicy, TpmMode},
    log_filter, node_roles,
};
use metropolis_api::curator::{RegisterNodeRequest, curator_client::CuratorClient};
use metropolis_api::osbase::logtree::proto::log_entry;
use metropolis_identity::{ServerTrust, SigningKey};
use prost::Message;
use tonic::Code;
use tonic::transport::Channel;

use support::*;

/// The bootstrap node's curator: a long heartbeat timeout, so that a node
/// reported UNKNOWN after a restart would stay so for longer than any wait
/// here (HEALTHY must come from the first beat, not from the timeout).
const CURATOR_FLAGS: &[&str] = &["--heartbeat-timeout", "90s"];
/// Written by the etcd wrapper before etcd starts: invalid UTF-8 between
/// two markers.
const BAD_UTF8_LINE: &[u8] = b"parity-marker \xff\xfe end";

struct Cluster {
    tmp: tempfile::TempDir,
    /// metroctl's configuration directory, holding the owner key.
    cfg: PathBuf,
    owner: SigningKey,
    owner_cert: Vec<u8>,
    ca: Vec<u8>,
    n1: TestNode,
    n1_params: PathBuf,
    n1_flags: Vec<String>,
    n1_id: String,
    n2: TestNode,
    n2_params: PathBuf,
    n2_id: String,
}

impl Cluster {
    async fn start() -> Cluster {
        let etcd = metropolis_store::testing::find_etcd();
        let tmp = tempfile::tempdir().expect("tmp");
        let wrapper = tmp.path().join("etcd-wrapper");
        let mut script = b"#!/bin/sh\nprintf '".to_vec();
        for b in BAD_UTF8_LINE {
            if b.is_ascii_graphic() || *b == b' ' {
                script.push(*b);
            } else {
                script.extend_from_slice(format!("\\{b:03o}").as_bytes());
            }
        }
        script.extend_from_slice(format!("\\n' >&2\nexec {} \"$@\"\n", etcd.display()).as_bytes());
        std::fs::write(&wrapper, script).expect("wrapper");
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).expect("chmod");

        // The operator's way: metroctl writes the bootstrap parameters and
        // the owner key.
        let mut n1_flags: Vec<String> = CURATOR_FLAGS.iter().map(|s| s.to_string()).collect();
        n1_flags.push("--etcd-binary".into());
        n1_flags.push(wrapper.display().to_string());
        let flags: Vec<&str> = n1_flags.iter().map(String::as_str).collect();
        let Bootstrapped {
            cfg,
            params: n1_params,
            node: n1,
            owner:
                Owner {
                    key: owner,
                    cert: owner_cert,
                    ca,
                },
        } = Bootstrapped::start(tmp.path(), &["--ha"], &flags).await;
        let mut mgmt = mgmt_of(&n1, &ca, &owner, &owner_cert).await;

        // The second node registers with labels given out of order.
        let info = mgmt
            .get_cluster_info(GetClusterInfoRequest {})
            .await
            .expect("info")
            .into_inner();
        let ticket = mgmt
            .get_register_ticket(metropolis_api::api::GetRegisterTicketRequest {})
            .await
            .expect("ticket")
            .into_inner()
            .ticket;
        let n2_params = tmp.path().join("register.pb");
        write_register_params(
            &n2_params,
            &info.cluster_directory.expect("directory"),
            &ticket,
            &ca,
            &[("zone", "a"), ("arch", "x86"), ("m", "1")],
        );
        let n2 = TestNode::spawn(fresh_address(), &tmp.path().join("n2"), Some(&n2_params));
        let n1_id = node_credentials_id(&n1.data_dir);
        let deadline = Instant::now() + Duration::from_secs(60);
        let n2_id = loop {
            let list = nodes(&mut mgmt).await;
            if let Some(n) = list.iter().find(|n| n.id != n1_id) {
                if n.state == NodeState::New as i32 {
                    mgmt.approve_node(ApproveNodeRequest {
                        pubkey: n.pubkey.clone(),
                    })
                    .await
                    .expect("approve");
                }
                if n.state == NodeState::Up as i32 && n.health == Health::Healthy as i32 {
                    break n.id.clone();
                }
            }
            assert!(
                Instant::now() < deadline,
                "the second node never came up: {list:#?}\n{}",
                n2.log_text()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        Cluster {
            tmp,
            cfg,
            owner,
            owner_cert,
            ca,
            n1,
            n1_params,
            n1_flags,
            n1_id,
            n2,
            n2_params,
            n2_id,
        }
    }

    async fn mgmt(&self) -> ManagementClient<Channel> {
        mgmt_of(&self.n1, &self.ca, &self.owner, &self.owner_cert).await
    }

    fn n1_flags(&self) -> Vec<&str> {
        self.n1_flags.iter().map(String::as_str).collect()
    }

    /// metroctl with the cluster's configuration directory and endpoints.
    fn metroctl(&self, args: &[&str]) -> std::process::Output {
        let ep = self.n1.address.to_string();
        let mut all = vec!["--endpoints", ep.as_str()];
        all.extend_from_slice(args);
        metroctl(&self.cfg, &all)
    }

    async fn node_mgmt(&self, node: &TestNode) -> NodeManagementClient<Channel> {
        let id = node_credentials_id(&node.data_dir);
        let ch = channel(
            SocketAddr::new(node.address, 7839),
            ServerTrust::ClusterCa {
                ca_der: self.ca.clone(),
                node_id: Some(id),
            },
            Some((self.owner_cert.clone(), self.owner.clone())),
        )
        .await
        .expect("node management channel");
        NodeManagementClient::new(ch)
    }

    /// A node registered from here (not a process): NEW until approved,
    /// and never more than STANDBY, since nothing commits it.
    async fn register(&self, key: &SigningKey) -> Result<String, tonic::Status> {
        let id = metropolis_identity::node_id(key.verifying_key().as_bytes());
        let self_signed =
            metropolis_identity::self_signed_certificate(key, &id).expect("self-signed");
        let ch = channel(
            self.n1.endpoint(),
            trust(&self.ca),
            Some((self_signed, key.clone())),
        )
        .await
        .expect("connect");
        let ticket = self
            .mgmt()
            .await
            .get_register_ticket(metropolis_api::api::GetRegisterTicketRequest {})
            .await
            .expect("ticket")
            .into_inner()
            .ticket;
        CuratorClient::new(ch)
            .register_node(RegisterNodeRequest {
                register_ticket: ticket,
                join_key: Vec::new(),
                have_local_tpm: false,
                labels: None,
            })
            .await?;
        Ok(id)
    }
}

async fn mgmt_of(
    node: &TestNode,
    ca: &[u8],
    owner: &SigningKey,
    cert: &[u8],
) -> ManagementClient<Channel> {
    ManagementClient::new(
        channel(
            node.endpoint(),
            trust(ca),
            Some((cert.to_vec(), owner.clone())),
        )
        .await
        .expect("owner channel"),
    )
}

fn node_credentials_id(data_dir: &Path) -> String {
    let (_, key) = node_credentials(data_dir);
    metropolis_identity::node_id(key.verifying_key().as_bytes())
}

async fn nodes(mgmt: &mut ManagementClient<Channel>) -> Vec<Node> {
    mgmt.get_nodes(GetNodesRequest::default())
        .await
        .expect("GetNodes")
        .into_inner()
        .try_collect()
        .await
        .expect("GetNodes stream")
}

async fn node(mgmt: &mut ManagementClient<Channel>, id: &str) -> Option<Node> {
    nodes(mgmt).await.into_iter().find(|n| n.id == id)
}

fn ok(out: std::process::Output) -> String {
    assert!(out.status.success(), "metroctl failed: {}", stderr(&out));
    stdout(&out)
}

fn logs_request(
    dn: &str,
    backlog: logs_request::BacklogMode,
    count: i64,
    stream_mode: i32,
    filters: usize,
) -> LogsRequest {
    LogsRequest {
        dn: dn.into(),
        filters: (0..filters)
            .map(|_| LogFilter {
                filter: Some(log_filter::Filter::WithChildren(
                    log_filter::WithChildren {},
                )),
            })
            .collect(),
        backlog_mode: backlog as i32,
        backlog_count: count,
        stream_mode,
    }
}

async fn logs(
    c: &mut NodeManagementClient<Channel>,
    req: LogsRequest,
) -> Result<Vec<LogsResponse>, tonic::Status> {
    tokio::time::timeout(Duration::from_secs(30), async {
        c.logs(req).await?.into_inner().try_collect().await
    })
    .await
    .expect("a Logs call without streaming ends")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_parity_on_one_cluster() {
    let mut c = Cluster::start().await;
    point_2_upstream_install_defaults(&c).await;
    point_3_get_nodes_as_upstream(&c).await;
    point_1_restart_with_the_same_command_line(&mut c).await;
    point_6_configure_cluster(&c).await;
    point_7_label_keys_and_count(&c).await;
    point_8_role_requests_upstream_refuses(&c).await;
    point_9_logs_requests_as_upstream(&c).await;
    point_12_metroctl_as_upstream_users_type_it(&c).await;
    point_5_delete_without_bypass_unless_up(&mut c).await;
}

/// 1. A service unit that always passes `--params` restarts the node; params
///    of another cluster are refused, naming why.
async fn point_1_restart_with_the_same_command_line(c: &mut Cluster) {
    // Another cluster's parameters, refused on both nodes.
    c.n1.stop();
    c.n2.stop();
    let other_owner = c.tmp.path().join("other-bootstrap.pb");
    write_bootstrap_params(&other_owner, &metropolis_identity::generate_key());
    let other_ca = metropolis_identity::CertificateAuthority::generate().expect("ca");
    let other_register = c.tmp.path().join("other-register.pb");
    let dir = metropolis_api::common::ClusterDirectory {
        nodes: vec![metropolis_api::common::cluster_directory::Node {
            id: c.n1_id.clone(),
            addresses: vec![metropolis_api::common::cluster_directory::node::Address {
                host: c.n1.address.to_string(),
            }],
        }],
    };
    write_register_params(&other_register, &dir, b"ticket", other_ca.cert_der(), &[]);
    for (node, params, what) in [
        (&c.n1, &other_owner, "owner key"),
        (&c.n2, &other_register, "ca_certificate"),
    ] {
        let out = run_node(&[
            "--data-dir",
            node.data_dir.to_str().expect("utf8"),
            "--address",
            &node.address.to_string(),
            "--params",
            params.to_str().expect("utf8"),
        ]);
        assert!(
            !out.status.success(),
            "another cluster's parameters accepted"
        );
        let err = stderr(&out);
        assert!(
            err.contains("another cluster") && err.contains(what),
            "{err}"
        );
    }

    // The same command line as the first start: both come back.
    let flags = c.n1_flags();
    c.n1 = TestNode::spawn_with(c.n1.address, &c.n1.data_dir, Some(&c.n1_params), &flags);
    c.n1.wait_leading().await;
    assert!(
        c.n1.log_text()
            .contains("bootstrap parameters are this cluster's"),
        "{}",
        c.n1.log_text()
    );
    c.n2 = TestNode::spawn(c.n2.address, &c.n2.data_dir, Some(&c.n2_params));
    // 3. (continued) The first beat of the restarted node to the new leader
    // makes it HEALTHY: the leader's timeout (90 s) is longer than this wait.
    let mut mgmt = c.mgmt().await;
    let deadline = Instant::now() + Duration::from_secs(45);
    loop {
        let n2 = node(&mut mgmt, &c.n2_id).await.expect("n2");
        if n2.health == Health::Healthy as i32 {
            assert!(n2.time_since_heartbeat.is_some(), "{n2:?}");
            break;
        }
        assert_eq!(
            n2.health,
            Health::Unknown as i32,
            "before its first beat to the new leader: {n2:?}"
        );
        assert!(
            Instant::now() < deadline,
            "the restarted node did not become HEALTHY with its first beat: {n2:?}\n{}",
            c.n2.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        c.n2.log_text()
            .contains("node parameters are this cluster's"),
        "{}",
        c.n2.log_text()
    );
    println!("point 1: restarted with the same --params; another cluster's refused");
}

/// 2. Upstream `metroctl install` defaults are refused naming what works;
///    the default cluster domain is upstream's.
async fn point_2_upstream_install_defaults(c: &Cluster) {
    let info = c
        .mgmt()
        .await
        .get_cluster_info(GetClusterInfoRequest {})
        .await
        .expect("info")
        .into_inner();
    assert_eq!(
        info.cluster_configuration.expect("config").cluster_domain,
        "cluster.internal"
    );
    let params = c.tmp.path().join("upstream-defaults.pb");
    let msg = NodeParameters {
        cluster: Some(node_parameters::Cluster::ClusterBootstrap(
            node_parameters::ClusterBootstrap {
                owner_public_key: c.owner.verifying_key().to_bytes().to_vec(),
                initial_cluster_configuration: Some(ClusterConfiguration {
                    cluster_domain: "cluster.internal".into(),
                    tpm_mode: TpmMode::Required as i32,
                    storage_security_policy: StorageSecurityPolicy::NeedsEncryptionAndAuthentication
                        as i32,
                    kubernetes: None,
                    ..Default::default()
                }),
                ..Default::default()
            },
        )),
        network_config: None,
    };
    std::fs::write(&params, msg.encode_to_vec()).expect("params");
    let data = c.tmp.path().join("refused");
    let out = run_node(&[
        "--data-dir",
        data.to_str().expect("utf8"),
        "--address",
        &fresh_address().to_string(),
        "--params",
        params.to_str().expect("utf8"),
    ]);
    assert!(!out.status.success());
    let err = stderr(&out);
    for want in [
        "TPM_MODE_REQUIRED",
        "TPM_MODE_BEST_EFFORT",
        "TPM_MODE_DISABLED",
        "NEEDS_ENCRYPTION_AND_AUTHENTICATION",
        "STORAGE_SECURITY_POLICY_PERMISSIVE",
        "--bootstrap-tpm-mode=best-effort",
    ] {
        assert!(err.contains(want), "{want} missing from: {err}");
    }
    assert!(!data.exists(), "nothing written for refused parameters");
    println!("point 2: upstream install defaults refused with the values that work");
}

/// 3. GetNodes: roles always set and as markers, labels sorted, time since
///    heartbeat set, a corrupt record skipped. (HEALTHY from the first beat
///    to a new leader: in point 1, which restarts the leader.)
async fn point_3_get_nodes_as_upstream(c: &Cluster) {
    let mut mgmt = c.mgmt().await;
    let list = nodes(&mut mgmt).await;
    let n1 = list.iter().find(|n| n.id == c.n1_id).expect("n1");
    let n2 = list.iter().find(|n| n.id == c.n2_id).expect("n2");
    assert_eq!(
        n1.roles,
        Some(NodeRoles {
            consensus_member: Some(node_roles::ConsensusMember::default()),
            ..Default::default()
        }),
        "the consensus member shows as a marker, without certificates or peers"
    );
    assert_eq!(n2.roles, Some(NodeRoles::default()), "roles always set");
    let keys: Vec<&str> = n2
        .labels
        .as_ref()
        .expect("labels")
        .pairs
        .iter()
        .map(|p| p.key.as_str())
        .collect();
    assert_eq!(keys, ["arch", "m", "zone"]);
    assert_eq!(n1.labels, Some(Default::default()), "labels always set");
    for n in [n1, n2] {
        assert!(n.time_since_heartbeat.is_some(), "{n:?}");
        assert_eq!(n.health, Health::Healthy as i32, "{n:?}");
    }

    // A record that does not decode (written straight into etcd, as a bug
    // or a disk fault could) is skipped, not a failed call.
    let store = metropolis_store::EtcdStore::connect_unix(
        &c.n1.data_dir.join("etcd").join("client.sock:0"),
    )
    .await
    .expect("the node's etcd");
    let key = "/nodes/metropolis-0000corrupt";
    let put = metropolis_store::Txn::new().and_then(metropolis_store::Op::put(
        key,
        b"\xff\xff\xff\xff\xff".to_vec(),
    ));
    metropolis_store::Store::txn(store.as_ref(), put)
        .await
        .expect("put");
    let listed = nodes(&mut mgmt).await;
    let del = metropolis_store::Txn::new().and_then(metropolis_store::Op::delete(key));
    metropolis_store::Store::txn(store.as_ref(), del)
        .await
        .expect("delete");
    let ids: Vec<&str> = listed.iter().map(|n| n.id.as_str()).collect();
    assert_eq!(ids.len(), 2, "{ids:?}");
    assert!(ids.contains(&c.n1_id.as_str()) && ids.contains(&c.n2_id.as_str()));
    assert!(
        c.n1.log_text().contains("does not decode"),
        "the skipped record is logged"
    );
    println!("point 3: GetNodes as upstream sends it; a corrupt record skipped");
}

/// 5. DeleteNode: NEW, STANDBY and DECOMMISSIONED go without a bypass, UP
///    needs one; the tombstone and the revocation stay.
async fn point_5_delete_without_bypass_unless_up(c: &mut Cluster) {
    let mut mgmt = c.mgmt().await;
    let del = |id: &str, bypass: bool| DeleteNodeRequest {
        node: Some(delete_node_request::Node::Id(id.into())),
        safety_bypass_has_roles: None,
        safety_bypass_not_decommissioned: bypass
            .then_some(delete_node_request::SafetyBypassNotDecommissioned {}),
    };
    let state = |n: Option<Node>| n.map(|n| n.state);

    let new_key = metropolis_identity::generate_key();
    let new_id = c.register(&new_key).await.expect("register");
    assert_eq!(
        state(node(&mut mgmt, &new_id).await),
        Some(NodeState::New as i32)
    );
    mgmt.delete_node(del(&new_id, false))
        .await
        .expect("delete NEW");

    let standby_key = metropolis_identity::generate_key();
    let standby_id = c.register(&standby_key).await.expect("register");
    mgmt.approve_node(ApproveNodeRequest {
        pubkey: standby_key.verifying_key().to_bytes().to_vec(),
    })
    .await
    .expect("approve");
    assert_eq!(
        state(node(&mut mgmt, &standby_id).await),
        Some(NodeState::Standby as i32)
    );
    mgmt.delete_node(del(&standby_id, false))
        .await
        .expect("delete STANDBY");

    let decom_key = metropolis_identity::generate_key();
    let decom_id = c.register(&decom_key).await.expect("register");
    mgmt.decommission_node(DecommissionNodeRequest {
        node: Some(decommission_node_request::Node::Id(decom_id.clone())),
    })
    .await
    .expect("decommission");
    assert_eq!(
        state(node(&mut mgmt, &decom_id).await),
        Some(NodeState::Decommissioned as i32)
    );
    mgmt.delete_node(del(&decom_id, false))
        .await
        .expect("delete DECOMMISSIONED");

    // The keys of deleted nodes cannot register again.
    for key in [&new_key, &standby_key, &decom_key] {
        let err = c.register(key).await.expect_err("tombstone");
        assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    }

    // UP needs the bypass; with it, the node's certificate stops working.
    let err = mgmt
        .delete_node(del(&c.n2_id, false))
        .await
        .expect_err("UP without bypass");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    let (cert, key) = node_credentials(&c.n2.data_dir);
    mgmt.delete_node(del(&c.n2_id, true))
        .await
        .expect("delete UP with bypass");
    let as_n2 = channel(c.n1.endpoint(), trust(&c.ca), Some((cert, key)))
        .await
        .expect("connect");
    let err = ManagementClient::new(as_n2)
        .get_cluster_info(GetClusterInfoRequest {})
        .await
        .expect_err("revoked");
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    let ids: Vec<String> = nodes(&mut mgmt).await.into_iter().map(|n| n.id).collect();
    for gone in [&new_id, &standby_id, &decom_id, &c.n2_id] {
        assert!(!ids.contains(gone), "{gone} still listed: {ids:?}");
    }
    println!("point 5: NEW, STANDBY, DECOMMISSIONED deleted without a bypass; UP with one");
}

/// 6. ConfigureCluster: an empty update mask changes nothing; an unset
///    `kubernetes` in new_config or base_config is INVALID_ARGUMENT.
async fn point_6_configure_cluster(c: &Cluster) {
    let mut mgmt = c.mgmt().await;
    let path = || {
        Some(prost_types::FieldMask {
            paths: vec!["kubernetes.node_labels_to_synchronize".into()],
        })
    };
    let sync = |re: &str| ClusterConfiguration {
        kubernetes: Some(Kubernetes {
            node_labels_to_synchronize: vec![
                metropolis_api::common::cluster_configuration::kubernetes::NodeLabelsToSynchronize {
                    regexp: re.into(),
                },
            ],
        }),
        ..Default::default()
    };
    let set = mgmt
        .configure_cluster(ConfigureClusterRequest {
            base_config: None,
            new_config: Some(sync("^zone$")),
            update_mask: path(),
        })
        .await
        .expect("a change")
        .into_inner()
        .resulting_config
        .expect("resulting");
    let same = mgmt
        .configure_cluster(ConfigureClusterRequest {
            base_config: None,
            new_config: Some(sync("^other$")),
            update_mask: Some(prost_types::FieldMask { paths: vec![] }),
        })
        .await
        .expect("an empty mask succeeds")
        .into_inner()
        .resulting_config
        .expect("resulting");
    assert_eq!(same, set, "an empty mask changes nothing");
    for (what, req) in [
        (
            "no mask",
            ConfigureClusterRequest {
                base_config: None,
                new_config: Some(sync("x")),
                update_mask: None,
            },
        ),
        (
            "new_config without kubernetes",
            ConfigureClusterRequest {
                base_config: None,
                new_config: Some(ClusterConfiguration::default()),
                update_mask: path(),
            },
        ),
        (
            "base_config without kubernetes",
            ConfigureClusterRequest {
                base_config: Some(ClusterConfiguration::default()),
                new_config: Some(sync("x")),
                update_mask: path(),
            },
        ),
    ] {
        let err = mgmt.configure_cluster(req).await.expect_err(what);
        assert_eq!(err.code(), Code::InvalidArgument, "{what}: {err}");
    }
    let now = mgmt
        .get_cluster_info(GetClusterInfoRequest {})
        .await
        .expect("info")
        .into_inner()
        .cluster_configuration;
    assert_eq!(now, Some(set), "refusals change nothing");
    println!("point 6: ConfigureCluster's mask and sub-message rules as upstream");
}

/// 7. UpdateNodeLabels: key prefixes as upstream validates them, too many
///    labels is OUT_OF_RANGE.
async fn point_7_label_keys_and_count(c: &Cluster) {
    let mut mgmt = c.mgmt().await;
    let req = |upsert: Vec<(String, String)>| UpdateNodeLabelsRequest {
        node: Some(update_node_labels_request::Node::Id(c.n2_id.clone())),
        upsert: upsert
            .into_iter()
            .map(|(key, value)| update_node_labels_request::Pair { key, value })
            .collect(),
        delete: vec![],
    };
    let one = |k: &str| req(vec![(k.into(), "v".into())]);
    for bad in ["10.0.0.1/zone", "example.0x1f/zone", "/zone", "a/b/c"] {
        let err = mgmt
            .update_node_labels(one(bad))
            .await
            .expect_err("invalid key");
        assert_eq!(err.code(), Code::InvalidArgument, "{bad}: {err}");
    }
    mgmt.update_node_labels(one("example.com/zone"))
        .await
        .expect("a valid prefix");
    let many = (0..130).map(|i| (format!("k{i}"), "v".into())).collect();
    let err = mgmt
        .update_node_labels(req(many))
        .await
        .expect_err("too many");
    assert_eq!(err.code(), Code::OutOfRange, "{err}");
    let labels = node(&mut mgmt, &c.n2_id)
        .await
        .expect("n2")
        .labels
        .expect("labels");
    assert_eq!(labels.pairs.len(), 4, "{labels:?}");
    println!("point 7: label keys and counts as upstream");
}

/// 8. UpdateNodeRoles: what upstream refuses gets upstream's code.
async fn point_8_role_requests_upstream_refuses(c: &Cluster) {
    let mut mgmt = c.mgmt().await;
    let roles =
        |id: &str, controller: Option<bool>, consensus: Option<bool>| UpdateNodeRolesRequest {
            node: Some(update_node_roles_request::Node::Id(id.into())),
            kubernetes_worker: None,
            kubernetes_controller: controller,
            consensus_member: consensus,
        };
    mgmt.update_node_roles(roles(&c.n1_id, Some(true), None))
        .await
        .expect("controller on a consensus member");
    // Removing controller and consensus member together.
    let err = mgmt
        .update_node_roles(roles(&c.n1_id, Some(false), Some(false)))
        .await
        .expect_err("both at once");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    assert!(err.message().contains("KubernetesController"), "{err}");
    let n1 = node(&mut mgmt, &c.n1_id).await.expect("n1");
    let r = n1.roles.expect("roles");
    assert!(r.kubernetes_controller.is_some() && r.consensus_member.is_some());
    mgmt.update_node_roles(roles(&c.n1_id, Some(false), None))
        .await
        .expect("controller off");
    // A controller that is not a consensus member.
    let err = mgmt
        .update_node_roles(roles(&c.n2_id, Some(true), None))
        .await
        .expect_err("controller without consensus");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    let err = mgmt
        .update_node_roles(UpdateNodeRolesRequest::default())
        .await
        .expect_err("no node");
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    let err = mgmt
        .update_node_roles(roles("metropolis-nobody", None, Some(true)))
        .await
        .expect_err("unknown node");
    assert_eq!(err.code(), Code::NotFound, "{err}");
    println!("point 8: role requests upstream refuses, with its codes");
}

/// 9. NodeManagement.Logs reads requests as upstream's svc_logs.go does.
///    (The 2000-entry responses: `logs_responses_hold_up_to_2000_entries`.)
async fn point_9_logs_requests_as_upstream(c: &Cluster) {
    use logs_request::BacklogMode as B;
    let mut nm = c.node_mgmt(&c.n1).await;
    let unset_stream = 0;
    let disable = logs_request::StreamMode::Disable as i32;
    let entries = |r: &[LogsResponse]| -> Vec<metropolis_api::osbase::logtree::proto::LogEntry> {
        r.iter().flat_map(|r| r.backlog_entries.clone()).collect()
    };
    // stream_mode 0 is no stream: the call ends after the backlog.
    let all = logs(&mut nm, logs_request("", B::All, 0, unset_stream, 1))
        .await
        .expect("unset stream mode");
    let all = entries(&all);
    assert!(all.len() > 10, "{}", all.len());
    // Neither backlog nor stream: an empty answer.
    let none = logs(&mut nm, logs_request("root", B::Disable, 0, disable, 0))
        .await
        .expect("nothing asked");
    assert!(none.is_empty(), "{none:?}");
    // backlog_count counts only with BACKLOG_MODE_COUNT.
    let counted = logs(&mut nm, logs_request("", B::All, 3, disable, 1))
        .await
        .expect("count ignored");
    assert!(entries(&counted).len() > 3);
    // DN "" is the whole tree, without WithChildren too.
    let exact = entries(
        &logs(&mut nm, logs_request("", B::All, 0, disable, 0))
            .await
            .expect("exact top"),
    );
    for dn in ["root.serve", "root.consensus.etcd"] {
        assert!(exact.iter().any(|e| e.dn == dn), "{dn} missing");
    }
    // Ten filters are fine, eleven are not.
    logs(&mut nm, logs_request("", B::All, 0, disable, 10))
        .await
        .expect("ten filters");
    let err = logs(&mut nm, logs_request("", B::All, 0, disable, 11))
        .await
        .expect_err("eleven filters");
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    // Invalid UTF-8 from a child process arrives replaced.
    let etcd = entries(
        &logs(
            &mut nm,
            logs_request("root.consensus.etcd", B::All, 0, disable, 0),
        )
        .await
        .expect("etcd logs"),
    );
    let marked = etcd
        .iter()
        .find_map(|e| match &e.kind {
            Some(log_entry::Kind::Raw(r)) if r.data.starts_with("parity-marker") => Some(r),
            _ => None,
        })
        .unwrap_or_else(|| panic!("the wrapper's line is missing: {etcd:#?}"));
    assert_eq!(marked.data, "parity-marker \u{fffd}\u{fffd} end");
    assert_eq!(marked.original_length, BAD_UTF8_LINE.len() as i64);
    println!("point 9: Logs requests read as upstream reads them");
}

/// 12. metroctl accepts what upstream users type.
async fn point_12_metroctl_as_upstream_users_type_it(c: &Cluster) {
    let mut mgmt = c.mgmt().await;
    // Upstream's spelling, and its flag to pin the CA without asking.
    let out = ok(c.metroctl(&[
        "--insecure-accept-and-persist-first-encountered-ca",
        "cluster",
        "takeownership",
    ]));
    assert!(out.contains("owner"), "{out}");
    assert!(c.cfg.join("ca.pem").exists());

    // Root `approve`.
    let key = metropolis_identity::generate_key();
    let waiting = c.register(&key).await.expect("register");
    ok(c.metroctl(&["approve", &waiting]));
    assert_eq!(
        node(&mut mgmt, &waiting).await.map(|n| n.state),
        Some(NodeState::Standby as i32)
    );

    // `node list ID...`, and `all`.
    let listed = ok(c.metroctl(&["node", "list", &c.n2_id]));
    assert_eq!(listed.lines().collect::<Vec<_>>(), [c.n2_id.as_str()]);
    let listed = ok(c.metroctl(&["node", "list", "all"]));
    assert_eq!(listed.lines().count(), 3, "{listed}");

    // The node table: upstream's columns, TPM and LABELS among them, and
    // --columns.
    let table = ok(c.metroctl(&["node", "describe"]));
    let header = table.lines().next().expect("header");
    for col in [
        "NODE ID",
        "STATE",
        "ADDRESS",
        "HEALTH",
        "ROLES",
        "TPM",
        "VERSION",
        "HEARTBEAT",
        "LABELS",
    ] {
        assert!(header.contains(col), "{col} missing: {header}");
    }
    let picked = ok(c.metroctl(&[
        "node",
        "describe",
        &c.n2_id,
        "--columns",
        "node id,tpm,labels",
    ]));
    let mut lines = picked.lines();
    let header: Vec<&str> = lines.next().expect("header").split_whitespace().collect();
    assert_eq!(header, ["NODE", "ID", "TPM", "LABELS"]);
    let row: Vec<&str> = lines.next().expect("row").split_whitespace().collect();
    assert_eq!(row[0], c.n2_id);
    assert_eq!(row[1], "no");
    assert!(
        row[2].starts_with("arch:x86,example.com/zone:v,m:1"),
        "{row:?}"
    );

    // Logs: --exact, --concise, --backlog -1 / 0 / N.
    let n1 = c.n1_id.as_str();
    let dn = ["--dn", "root.consensus.etcd", "--exact"];
    let three = ok(c.metroctl(
        &[
            &["node", "logs", n1, "--concise", "--backlog", "3"][..],
            &dn[..],
        ]
        .concat(),
    ));
    let lines: Vec<&str> = three.lines().collect();
    assert_eq!(lines.len(), 3, "{three}");
    for l in &lines {
        assert!(l.starts_with(" root.consensus.etcd R "), "{l:?}");
    }
    let none = ok(c.metroctl(&[&["node", "logs", n1, "--backlog", "0"][..], &dn[..]].concat()));
    assert!(none.trim().is_empty(), "{none}");
    let every = ok(c.metroctl(&[&["node", "logs", n1, "--backlog", "-1"][..], &dn[..]].concat()));
    assert!(every.lines().count() > 3, "{every}");
    assert!(every.contains("parity-marker"), "{every}");

    // Roles by upstream's names and aliases, in any case.
    ok(c.metroctl(&["node", "add", "role", "kw", &c.n2_id]));
    let worker = |n: Option<Node>| {
        n.and_then(|n| n.roles)
            .is_some_and(|r| r.kubernetes_worker.is_some())
    };
    assert!(worker(node(&mut mgmt, &c.n2_id).await));
    ok(c.metroctl(&["node", "remove", "role", "KUBERNETESWORKER", &c.n2_id]));
    assert!(!worker(node(&mut mgmt, &c.n2_id).await));

    // Reboot flags: clap refuses what upstream refuses; the node refuses
    // what a daemon cannot do.
    let out = c.metroctl(&["node", "reboot", &c.n2_id, "--kexec", "--firmware"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--firmware"), "{}", stderr(&out));
    let out = c.metroctl(&["--yes", "node", "reboot", &c.n2_id, "--firmware"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("no firmware setup"),
        "{}",
        stderr(&out)
    );
    assert!(
        c.n2.log_text().matches("reboot requested").count() == 0,
        "the node did not act on it"
    );

    // Trust on first use in any command: a directory with credentials but
    // no pinned CA pins the CA that issued them, without asking...
    let fresh = c.tmp.path().join("metroctl-fresh");
    std::fs::create_dir_all(&fresh).expect("dir");
    for f in ["owner-key.pem", "owner.pem"] {
        std::fs::copy(c.cfg.join(f), fresh.join(f)).expect("copy");
        std::fs::set_permissions(fresh.join(f), std::fs::Permissions::from_mode(0o600))
            .expect("chmod");
    }
    let ep = c.n1.address.to_string();
    let listed = ok(metroctl(&fresh, &["--endpoints", &ep, "node", "list"]));
    assert!(listed.contains(&c.n2_id), "{listed}");
    assert_eq!(
        std::fs::read(fresh.join("ca.pem")).expect("pinned"),
        std::fs::read(c.cfg.join("ca.pem")).expect("ca")
    );
    // ...and refuses a CA that did not issue them.
    let wrong = c.tmp.path().join("metroctl-wrong");
    std::fs::create_dir_all(&wrong).expect("dir");
    std::fs::copy(c.cfg.join("owner-key.pem"), wrong.join("owner-key.pem")).expect("copy");
    let stranger = metropolis_identity::self_signed_certificate(&c.owner, "owner").expect("cert");
    std::fs::write(
        wrong.join("owner.pem"),
        metropolis_identity::cert_to_pem(&stranger),
    )
    .expect("write");
    for f in ["owner-key.pem", "owner.pem"] {
        std::fs::set_permissions(wrong.join(f), std::fs::Permissions::from_mode(0o600))
            .expect("chmod");
    }
    let out = metroctl(&wrong, &["--endpoints", &ep, "node", "list"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("did not issue"), "{}", stderr(&out));
    assert!(!wrong.join("ca.pem").exists());

    // Where ours differs on purpose, --help says so.
    let help = ok(metroctl(&c.cfg, &["--help"]));
    assert!(
        help.contains("Differences from upstream metroctl") && help.contains("-o/--output"),
        "{help}"
    );
    println!("point 12: metroctl takes what upstream users type");
}

/// 9. (continued) Up to 2000 entries per response, as upstream chunks: a
///    debug build fills three DNs through EmitLogs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_responses_hold_up_to_2000_entries() {
    let binary = debug_binary();
    let tmp = tempfile::tempdir().expect("tmp");
    let owner = metropolis_identity::generate_key();
    let params = tmp.path().join("bootstrap.pb");
    write_bootstrap_params(&params, &owner);
    let node = TestNode::spawn_custom(
        &binary,
        fresh_address(),
        &tmp.path().join("n"),
        Some(&params),
        &[],
        &[],
    );
    node.wait_leading().await;
    let ca = fetch_ca(node.endpoint()).await.expect("ca");
    let cert = escrow_owner(node.endpoint(), &ca, &owner).await;
    let debug = channel(
        SocketAddr::new(node.address, 7837),
        ServerTrust::Capture(Default::default()),
        None,
    )
    .await
    .expect("debug port");
    metropolis_api::admin::node_faults_client::NodeFaultsClient::new(debug)
        .emit_logs(metropolis_api::admin::EmitLogsRequest {
            lines_per_second: 3000,
            seconds: 1,
            dns: 3,
        })
        .await
        .expect("emit");
    let id = node_credentials_id(&node.data_dir);
    let mut nm = NodeManagementClient::new(
        channel(
            SocketAddr::new(node.address, 7839),
            ServerTrust::ClusterCa {
                ca_der: ca.clone(),
                node_id: Some(id),
            },
            Some((cert, owner)),
        )
        .await
        .expect("node management"),
    );
    let req = logs_request(
        "",
        logs_request::BacklogMode::All,
        0,
        logs_request::StreamMode::Disable as i32,
        1,
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let responses = logs(&mut nm, req.clone()).await.expect("logs");
        let sizes: Vec<usize> = responses.iter().map(|r| r.backlog_entries.len()).collect();
        let total: usize = sizes.iter().sum();
        if total > 2000 + 900 {
            assert_eq!(sizes[0], 2000, "{sizes:?}");
            assert!(sizes.iter().all(|&n| n <= 2000), "{sizes:?}");
            println!("point 9: {total} entries in responses of {sizes:?}");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the synthetic lines did not arrive: {total} entries"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

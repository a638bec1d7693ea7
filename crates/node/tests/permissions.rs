//! The permission matrix: every RPC of the contract (from the generated
//! method table) called as every kind of caller, checking the exact gRPC
//! code. The authentication/authorization expectation is derived from each
//! method's `(metropolis.proto.ext.authorization)` option; what an authorized
//! call with an empty request returns is the handler's business and is listed
//! per method below.

mod support;

use std::time::Duration;

/// Lifetime of the certificates this test issues itself.
const DAY: std::time::Duration = std::time::Duration::from_secs(86_400);

use futures::TryStreamExt;
use metropolis_api::admin::{AddIdentityRequest, Role, cluster_admin_client::ClusterAdminClient};
use metropolis_api::api::{
    ApproveNodeRequest, DeleteNodeRequest, GetNodesRequest, Node, delete_node_request,
    management_client::ManagementClient,
};
use metropolis_api::authorization::{METHODS, MethodAuthorization};
use metropolis_api::common::NodeState;
use metropolis_api::ext::Permission;
use metropolis_identity::SigningKey;
use metropolis_rpc::Permissions;
use tonic::Code;
use tonic::transport::Channel;

use support::*;

/// Who calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    NoCertificate,
    SelfSigned,
    ForeignCa,
    Expired,
    Node,
    Reader,
    Operator,
    Owner,
    DeletedNode,
}

impl Who {
    /// What the caller is at the authorization layer: None if it has no
    /// valid cluster certificate; Some(permissions) otherwise.
    fn permissions(self) -> Option<Result<Permissions, Code>> {
        match self {
            Who::NoCertificate | Who::SelfSigned | Who::ForeignCa | Who::Expired => None,
            Who::Node => Some(Ok(Permissions::of(&[
                Permission::UpdateNodeSelf,
                Permission::ReadClusterStatus,
            ]))),
            Who::Reader => Some(Ok(Permissions::of(&[
                Permission::ReadClusterStatus,
                Permission::ReadNodeLogs,
            ]))),
            Who::Operator => Some(Ok(Permissions::ALL
                .without(Permission::ConfigureCluster)
                .without(Permission::DeleteNode))),
            Who::Owner => Some(Ok(Permissions::ALL)),
            Who::DeletedNode => Some(Err(Code::PermissionDenied)),
        }
    }

    fn is_node(self) -> bool {
        self == Who::Node
    }

    fn presents_certificate(self) -> bool {
        self != Who::NoCertificate
    }
}

/// The code of a call that passed the authorization layer, with an empty
/// request, from the handler.
fn handler_code(path: &str, who: Who) -> Code {
    let service = path.rsplit_once('/').map(|(s, _)| s).unwrap_or("");
    let method = path.rsplit('/').next().unwrap_or("");
    match (service, method) {
        // Not served on the curator port: the router answers.
        ("/metropolis.proto.api.NodeManagement", _)
        | ("/metropolis.proto.api.NodeDebugService", _)
        | ("/metropolis.proto.admin.NodeFaults", _) => Code::Unimplemented,
        ("/metropolis.proto.api.AAA", "Escrow") => Code::InvalidArgument,
        ("/metropolis.node.core.curator.proto.api.CuratorLocal", _) => Code::Ok,
        // Only nodes may call it on themselves; no decommission was asked.
        ("/metropolis.proto.admin.NodeCurator", "ReportDecommissioned") if who.is_node() => {
            Code::FailedPrecondition
        }
        ("/metropolis.proto.admin.NodeCurator", "ReportDecommissioned") => Code::PermissionDenied,
        // Open to any key holder; the empty request names no node, so
        // nobody's key is the named node's.
        ("/metropolis.proto.admin.NodeCurator", "RenewNodeCertificate")
            if !who.presents_certificate() =>
        {
            Code::Unauthenticated
        }
        ("/metropolis.proto.admin.NodeCurator", "RenewNodeCertificate") => Code::PermissionDenied,
        // The empty request names another node than the caller; callers
        // that are not nodes are refused as such.
        ("/metropolis.proto.admin.NodeCurator", "RenewPeerCertificate") => Code::PermissionDenied,
        ("/metropolis.node.core.curator.proto.api.Curator", m) => match m {
            "RegisterNode" if !who.presents_certificate() => Code::Unauthenticated,
            // Wrong (empty) ticket, or a deleted node's key.
            "RegisterNode" => Code::PermissionDenied,
            "CommitNode" if !who.presents_certificate() => Code::Unauthenticated,
            // The node's own key gets its certificate again.
            "CommitNode" if who.is_node() => Code::Ok,
            "CommitNode" => Code::NotFound,
            "Watch" => Code::InvalidArgument,
            // READ_CLUSTER_STATUS: every authenticated principal here has it.
            "GetConsensusStatus" => Code::Ok,
            // No Kubernetes here, whoever asks.
            "IssueCertificate" => Code::Unimplemented,
            // Methods only nodes may call on themselves.
            _ if !who.is_node() => Code::PermissionDenied,
            "Heartbeat" | "JoinNode" => Code::Ok,
            // No status or no clusternet in the empty request.
            "UpdateNodeStatus" | "UpdateNodeClusterNetworking" => Code::InvalidArgument,

            other => panic!("no expectation for Curator/{other}: add it"),
        },
        ("/metropolis.proto.api.Management", m) => match m {
            "GetRegisterTicket" | "GetClusterInfo" | "GetNodes" => Code::Ok,
            _ => Code::InvalidArgument,
        },
        (
            "/metropolis.proto.admin.ClusterAdmin",
            "RegenerateRegisterTicket" | "ListIdentities" | "GetAuditLog" | "Backup",
        ) => Code::Ok,
        // The snapshot of every node (empty filter) comes first.
        ("/metropolis.proto.admin.NodeWatch", "WatchNodes") => Code::Ok,
        ("/metropolis.proto.admin.ClusterAdmin", "AddIdentity" | "RemoveIdentity") => {
            Code::InvalidArgument
        }
        _ => panic!("no handler expectation for {path}: add it to the matrix"),
    }
}

/// The full expectation: authentication and authorization first, from the
/// method's option, then the handler.
fn expected(m: &MethodAuthorization, who: Who) -> Code {
    if !m.allow_unauthenticated {
        match who.permissions() {
            None => return Code::Unauthenticated,
            Some(Err(code)) => return code,
            Some(Ok(perms)) => {
                if m.need().any(|p| !perms.contains(p)) {
                    return Code::PermissionDenied;
                }
            }
        }
    }
    handler_code(m.path, who)
}

/// A client certificate and its key, if the caller presents one.
type Credentials = Option<(Vec<u8>, SigningKey)>;

/// Escrow for a named identity: a self-signed certificate over its key.
async fn escrow_identity(
    addr: std::net::SocketAddr,
    ca: &[u8],
    name: &str,
    key: &SigningKey,
) -> Vec<u8> {
    use metropolis_api::api::aaa_client::AaaClient;
    let ss = metropolis_identity::self_signed_certificate(key, "").expect("self-signed");
    let ch = channel(addr, trust(ca), Some((ss, key.clone())))
        .await
        .expect("connect");
    let mut s = AaaClient::new(ch)
        .escrow(tokio_stream::iter([escrow_request(
            name,
            key.verifying_key().as_bytes(),
        )]))
        .await
        .expect("escrow")
        .into_inner();
    s.message()
        .await
        .expect("escrow response")
        .expect("response")
        .emitted_certificate
}

/// Calls `path` with one empty message and returns the resulting code (the
/// first response counts as OK for streams that do not end).
async fn call(channel: Channel, path: &'static str) -> Code {
    let mut grpc = tonic::client::Grpc::new(channel);
    if let Err(e) = grpc.ready().await {
        panic!("channel not ready: {e}");
    }
    let codec = tonic_prost::ProstCodec::<(), ()>::default();
    let req = tonic::Request::new(futures::stream::iter([()]));
    let fut = async {
        match grpc
            .streaming(req, http::uri::PathAndQuery::from_static(path), codec)
            .await
        {
            Err(s) => s.code(),
            Ok(resp) => match resp.into_inner().message().await {
                Ok(_) => Code::Ok,
                Err(s) => s.code(),
            },
        }
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .unwrap_or(Code::DeadlineExceeded)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_method_refuses_every_caller_that_may_not_use_it() {
    let tmp = tempfile::tempdir().expect("tmp");
    let owner = metropolis_identity::generate_key();
    let mut first = TestNode::bootstrap(tmp.path(), &owner).await;
    let ca = fetch_ca(first.endpoint()).await.expect("ca");

    // An expired owner certificate from the real cluster CA: read the CA key
    // from the stopped node's store.
    first.stop();
    let expired_cert = {
        let store =
            metropolis_store::EmbeddedStore::open(&first.data_dir.join("store/cluster.redb"))
                .await
                .expect("store");
        let cluster = metropolis_curator::Cluster::open(store)
            .await
            .expect("cluster");
        let now = time::OffsetDateTime::now_utc();
        cluster
            .ca()
            .issue_user_certificate_with_validity(
                "owner",
                owner.verifying_key().as_bytes(),
                now - time::Duration::days(2),
                now - time::Duration::days(1),
            )
            .expect("expired cert")
    };
    // Let the store's background tasks release the file.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let first = TestNode::spawn(first.address, &first.data_dir, None);
    first.wait_leading().await;
    let addr = first.endpoint();
    let owner_cert = escrow_owner(addr, &ca, &owner).await;
    let mut mgmt = ManagementClient::new(
        channel(addr, trust(&ca), Some((owner_cert.clone(), owner.clone())))
            .await
            .expect("owner"),
    );

    // A second node that comes up and is then deleted.
    let register = tmp.path().join("register.pb");
    fetch_register_params(&mut mgmt, &ca, &register).await;
    let mut doomed = TestNode::spawn(fresh_address(), &tmp.path().join("doomed"), Some(&register));
    // Bounded waits: a node that cannot start (say, a full disk) must fail
    // the test with its log, not hang it.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let doomed_node = loop {
        let nodes: Vec<Node> = mgmt
            .get_nodes(GetNodesRequest {
                filter: "node.state == NODE_STATE_NEW".into(),
            })
            .await
            .expect("nodes")
            .into_inner()
            .try_collect()
            .await
            .expect("stream");
        if let Some(n) = nodes.into_iter().next() {
            break n;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the second node never registered; its log:\n{}",
            doomed.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    mgmt.approve_node(ApproveNodeRequest {
        pubkey: doomed_node.pubkey.clone(),
    })
    .await
    .expect("approve");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !doomed.data_dir.join("credentials.pb").exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the approved node never saved its credentials; its log:\n{}",
            doomed.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let doomed_creds = node_credentials(&doomed.data_dir);
    doomed.kill();
    mgmt.delete_node(DeleteNodeRequest {
        node: Some(delete_node_request::Node::Id(doomed_node.id.clone())),
        safety_bypass_has_roles: None,
        safety_bypass_not_decommissioned: Some(
            delete_node_request::SafetyBypassNotDecommissioned {},
        ),
    })
    .await
    .expect("delete");
    let ids: Vec<Node> = mgmt
        .get_nodes(GetNodesRequest::default())
        .await
        .expect("n")
        .into_inner()
        .try_collect()
        .await
        .expect("s");
    assert!(
        ids.iter()
            .all(|n| n.id != doomed_node.id && n.state == NodeState::Up as i32)
    );

    let stranger = metropolis_identity::generate_key();
    let foreign = metropolis_identity::CertificateAuthority::generate().expect("foreign CA");
    let reader = metropolis_identity::generate_key();
    let operator = metropolis_identity::generate_key();
    let mut admin = ClusterAdminClient::new(
        channel(addr, trust(&ca), Some((owner_cert.clone(), owner.clone())))
            .await
            .expect("c"),
    );
    for (name, key, role) in [
        ("reader", &reader, Role::Reader),
        ("operator", &operator, Role::Operator),
    ] {
        admin
            .add_identity(AddIdentityRequest {
                name: name.into(),
                public_key: key.verifying_key().to_bytes().to_vec(),
                role: role as i32,
            })
            .await
            .expect("add identity");
    }
    let reader_cert = escrow_identity(addr, &ca, "reader", &reader).await;
    let operator_cert = escrow_identity(addr, &ca, "operator", &operator).await;
    let callers: Vec<(Who, Credentials)> = vec![
        (Who::NoCertificate, None),
        (
            Who::SelfSigned,
            Some((
                metropolis_identity::self_signed_certificate(&stranger, "owner").expect("ss"),
                stranger.clone(),
            )),
        ),
        (
            Who::ForeignCa,
            Some((
                foreign
                    .issue_user_certificate("owner", stranger.verifying_key().as_bytes(), DAY)
                    .expect("f"),
                stranger.clone(),
            )),
        ),
        (Who::Expired, Some((expired_cert, owner.clone()))),
        (Who::Node, Some(node_credentials(&first.data_dir))),
        (Who::Reader, Some((reader_cert, reader.clone()))),
        (Who::Operator, Some((operator_cert, operator.clone()))),
        (Who::Owner, Some((owner_cert, owner.clone()))),
        (Who::DeletedNode, Some(doomed_creds)),
    ];

    let mut failures = Vec::new();
    let mut checked = 0;
    for (who, identity) in &callers {
        let ch = channel(addr, trust(&ca), identity.clone())
            .await
            .expect("connect");
        for m in METHODS {
            let want = expected(m, *who);
            let got = call(ch.clone(), m.path).await;
            checked += 1;
            if got != want {
                failures.push(format!(
                    "{:?} calling {}: got {got:?}, want {want:?}",
                    who, m.path
                ));
            }
        }
    }
    println!(
        "permission matrix: {} methods × {} callers = {checked} calls",
        METHODS.len(),
        callers.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {checked} calls returned the wrong code:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

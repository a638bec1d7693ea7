//! Named identities with roles and the audit log, against a real node over
//! real TLS: added by the owner, certificates through Escrow, each role's
//! permissions, removal taking effect at once, and the record of mutating
//! calls — directly over gRPC and through metroctl.

mod support;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;

use futures::TryStreamExt;
use metropolis_api::admin::{
    AddIdentityRequest, AuditEntry, GetAuditLogRequest, ListIdentitiesRequest,
    RemoveIdentityRequest, Role, audit_entry, cluster_admin_client::ClusterAdminClient,
};
use metropolis_api::api::{
    ApproveNodeRequest, ConfigureClusterRequest, DeleteNodeRequest, GetClusterInfoRequest,
    GetNodesRequest, GetRegisterTicketRequest, Node, delete_node_request,
    management_client::ManagementClient,
};
use metropolis_api::common::{ClusterConfiguration, NodeState};
use metropolis_api::curator::{RegisterNodeRequest, curator_client::CuratorClient};
use metropolis_identity::{SigningKey, generate_key};
use tonic::Code;
use tonic::transport::Channel;

use support::*;

const MGMT: &str = "/metropolis.proto.api.Management/";
const ADMIN: &str = "/metropolis.proto.admin.ClusterAdmin/";

async fn channel_as(addr: SocketAddr, ca: &[u8], cert: Vec<u8>, key: &SigningKey) -> Channel {
    channel(addr, trust(ca), Some((cert, key.clone())))
        .await
        .expect("connect")
}

fn add(name: &str, key: &SigningKey, role: Role) -> AddIdentityRequest {
    AddIdentityRequest {
        name: name.into(),
        public_key: key.verifying_key().to_bytes().to_vec(),
        role: role as i32,
    }
}

async fn nodes(mgmt: &mut ManagementClient<Channel>) -> Result<Vec<Node>, tonic::Status> {
    mgmt.get_nodes(GetNodesRequest::default())
        .await?
        .into_inner()
        .try_collect()
        .await
}

/// A node in state NEW, registered over gRPC with a fresh key: something for
/// ApproveNode to act on without starting a second process.
async fn register_new_node(addr: SocketAddr, ca: &[u8], ticket: Vec<u8>) -> Vec<u8> {
    let key = generate_key();
    let self_signed = metropolis_identity::self_signed_certificate(&key, "").expect("cert");
    let ch = channel_as(addr, ca, self_signed, &key).await;
    CuratorClient::new(ch)
        .register_node(RegisterNodeRequest {
            register_ticket: ticket,
            ..Default::default()
        })
        .await
        .expect("register node");
    key.verifying_key().to_bytes().to_vec()
}

fn principal(e: &AuditEntry) -> String {
    match &e.principal {
        Some(audit_entry::Principal::Identity(n)) => n.clone(),
        Some(audit_entry::Principal::NodeId(n)) => format!("node {n}"),
        None => String::new(),
    }
}

#[tokio::test]
async fn roles_escrow_removal_and_audit_log() {
    let tmp = tempfile::tempdir().expect("tmp");
    let owner = generate_key();
    let node = TestNode::bootstrap(tmp.path(), &owner).await;
    let addr = node.endpoint();
    let ca = fetch_ca(addr).await.expect("ca");
    let owner_ch = owner_channel(addr, &ca, &owner).await;
    let mut admin = ClusterAdminClient::new(owner_ch.clone());
    let mut owner_mgmt = ManagementClient::new(owner_ch);

    // The owner adds a reader and an operator.
    let (reader, operator) = (generate_key(), generate_key());
    let added = admin
        .add_identity(add("reader", &reader, Role::Reader))
        .await
        .expect("add reader")
        .into_inner()
        .identity
        .expect("identity");
    assert_eq!(added.name, "reader");
    assert_eq!(added.role, Role::Reader as i32);
    assert!(added.created_at.is_some());
    admin
        .add_identity(add("operator", &operator, Role::Operator))
        .await
        .expect("add operator");
    let err = admin
        .add_identity(add("reader", &generate_key(), Role::Owner))
        .await
        .expect_err("taken");
    assert_eq!(err.code(), Code::AlreadyExists, "{err}");
    for (req, what) in [
        (add("owner", &generate_key(), Role::Reader), "reserved"),
        (add("Bad Name", &generate_key(), Role::Reader), "bad name"),
        (add("carol", &generate_key(), Role::Unspecified), "no role"),
        (
            AddIdentityRequest {
                name: "carol".into(),
                public_key: vec![1; 31],
                role: Role::Reader as i32,
            },
            "short key",
        ),
    ] {
        let err = admin.add_identity(req).await.expect_err(what);
        assert_eq!(err.code(), Code::InvalidArgument, "{what}: {err}");
    }
    let listed = admin
        .list_identities(ListIdentitiesRequest {})
        .await
        .expect("list")
        .into_inner()
        .identities;
    let summary: Vec<(String, i32, bool)> = listed
        .iter()
        .map(|i| (i.name.clone(), i.role, i.bootstrap_owner))
        .collect();
    assert_eq!(
        summary,
        vec![
            ("owner".into(), Role::Owner as i32, true),
            ("operator".into(), Role::Operator as i32, false),
            ("reader".into(), Role::Reader as i32, false),
        ]
    );
    assert_eq!(listed[0].public_key, owner.verifying_key().to_bytes());

    // Escrow: unknown names are not offered, known names need their key.
    let err = escrow_as(addr, &ca, "nobody", &generate_key())
        .await
        .expect_err("unknown name");
    assert_eq!(err.code(), Code::Unimplemented, "{err}");
    let err = escrow_as(addr, &ca, "reader", &operator)
        .await
        .expect_err("another identity's key");
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    let err = escrow_as(addr, &ca, "reader", &generate_key())
        .await
        .expect_err("a foreign key");
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    let reader_cert = escrow_as(addr, &ca, "reader", &reader)
        .await
        .expect("reader escrow");
    let parsed = metropolis_identity::parse_certificate(&reader_cert).expect("cert");
    assert_eq!(parsed.common_name, "reader");
    assert!(parsed.client_auth && !parsed.server_auth && !parsed.is_ca);
    assert_eq!(parsed.public_key, reader.verifying_key().to_bytes());
    metropolis_identity::verify_signed_by(&parsed, &ca, time::OffsetDateTime::now_utc())
        .expect("chains to the CA");
    let operator_cert = escrow_as(addr, &ca, "operator", &operator)
        .await
        .expect("operator escrow");

    // The reader reads, and nothing else.
    let reader_ch = channel_as(addr, &ca, reader_cert, &reader).await;
    let mut as_reader = ManagementClient::new(reader_ch.clone());
    as_reader
        .get_cluster_info(GetClusterInfoRequest {})
        .await
        .expect("reader reads cluster info");
    assert_eq!(nodes(&mut as_reader).await.expect("reader lists").len(), 1);
    let err = as_reader
        .get_register_ticket(GetRegisterTicketRequest {})
        .await
        .expect_err("ticket");
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    assert!(
        err.message().contains("PERMISSION_GET_REGISTER_TICKET"),
        "{}",
        err.message()
    );
    let err = as_reader
        .approve_node(ApproveNodeRequest {
            pubkey: vec![1; 32],
        })
        .await
        .expect_err("approve");
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    let err = as_reader
        .configure_cluster(ConfigureClusterRequest::default())
        .await
        .expect_err("configure");
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    let mut reader_admin = ClusterAdminClient::new(reader_ch);
    let err = reader_admin
        .get_audit_log(GetAuditLogRequest::default())
        .await
        .expect_err("audit log");
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    let err = reader_admin
        .list_identities(ListIdentitiesRequest {})
        .await
        .expect_err("identities");
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");

    // The operator approves nodes, but neither configures the cluster, deletes
    // nodes nor manages identities.
    let operator_ch = channel_as(addr, &ca, operator_cert, &operator).await;
    let mut as_operator = ManagementClient::new(operator_ch.clone());
    let ticket = as_operator
        .get_register_ticket(GetRegisterTicketRequest {})
        .await
        .expect("operator gets the ticket")
        .into_inner()
        .ticket;
    let new_node = register_new_node(addr, &ca, ticket).await;
    as_operator
        .approve_node(ApproveNodeRequest {
            pubkey: new_node.clone(),
        })
        .await
        .expect("operator approves");
    let approved = nodes(&mut as_operator)
        .await
        .expect("nodes")
        .into_iter()
        .find(|n| n.pubkey == new_node)
        .expect("the new node");
    assert_eq!(approved.state, NodeState::Standby as i32);
    let err = as_operator
        .configure_cluster(ConfigureClusterRequest::default())
        .await
        .expect_err("configure");
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    assert!(
        err.message().contains("PERMISSION_CONFIGURE_CLUSTER"),
        "{}",
        err.message()
    );
    let err = as_operator
        .delete_node(DeleteNodeRequest {
            node: Some(delete_node_request::Node::Pubkey(new_node.clone())),
            ..Default::default()
        })
        .await
        .expect_err("delete");
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    let err = ClusterAdminClient::new(operator_ch)
        .add_identity(add("mallory", &generate_key(), Role::Owner))
        .await
        .expect_err("operator adds an owner");
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");

    // A failing mutating call by the owner, for the audit log.
    let err = owner_mgmt
        .configure_cluster(ConfigureClusterRequest {
            new_config: Some(ClusterConfiguration::default()),
            ..Default::default()
        })
        .await
        .expect_err("no update mask");
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");

    // Removal: the reader's open connection is refused with the next call.
    admin
        .remove_identity(RemoveIdentityRequest {
            name: "reader".into(),
        })
        .await
        .expect("remove reader");
    let err = as_reader
        .get_cluster_info(GetClusterInfoRequest {})
        .await
        .expect_err("removed");
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    assert!(
        err.message().contains("not known to this cluster"),
        "{}",
        err.message()
    );
    let err = escrow_as(addr, &ca, "reader", &reader)
        .await
        .expect_err("escrow after removal");
    assert_eq!(err.code(), Code::Unimplemented, "{err}");
    let err = admin
        .remove_identity(RemoveIdentityRequest {
            name: "reader".into(),
        })
        .await
        .expect_err("again");
    assert_eq!(err.code(), Code::NotFound, "{err}");
    let err = admin
        .remove_identity(RemoveIdentityRequest {
            name: "owner".into(),
        })
        .await
        .expect_err("the owner");
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");

    // Re-added with another key, the old certificate stays refused.
    let new_reader = generate_key();
    admin
        .add_identity(add("reader", &new_reader, Role::Reader))
        .await
        .expect("re-add");
    let err = as_reader
        .get_cluster_info(GetClusterInfoRequest {})
        .await
        .expect_err("old key");
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");

    // The audit log: every mutating call that passed authorization, newest
    // first, with who, what and the result.
    let log: Vec<AuditEntry> = admin
        .get_audit_log(GetAuditLogRequest { limit: 0 })
        .await
        .expect("audit log")
        .into_inner()
        .try_collect()
        .await
        .expect("entries");
    let rows: Vec<(String, String, Code)> = log
        .iter()
        .map(|e| (principal(e), e.method.clone(), Code::from_i32(e.code)))
        .collect();
    let m = |s: &str, p: &str| s.to_string() + p;
    let expected: Vec<(String, String, Code)> = vec![
        ("owner".into(), m(ADMIN, "AddIdentity"), Code::Ok),
        (
            "owner".into(),
            m(ADMIN, "RemoveIdentity"),
            Code::InvalidArgument,
        ),
        ("owner".into(), m(ADMIN, "RemoveIdentity"), Code::NotFound),
        ("owner".into(), m(ADMIN, "RemoveIdentity"), Code::Ok),
        (
            "owner".into(),
            m(MGMT, "ConfigureCluster"),
            Code::InvalidArgument,
        ),
        ("operator".into(), m(MGMT, "ApproveNode"), Code::Ok),
        (
            "owner".into(),
            m(ADMIN, "AddIdentity"),
            Code::InvalidArgument,
        ),
        (
            "owner".into(),
            m(ADMIN, "AddIdentity"),
            Code::InvalidArgument,
        ),
        (
            "owner".into(),
            m(ADMIN, "AddIdentity"),
            Code::InvalidArgument,
        ),
        (
            "owner".into(),
            m(ADMIN, "AddIdentity"),
            Code::InvalidArgument,
        ),
        ("owner".into(), m(ADMIN, "AddIdentity"), Code::AlreadyExists),
        ("owner".into(), m(ADMIN, "AddIdentity"), Code::Ok),
        ("owner".into(), m(ADMIN, "AddIdentity"), Code::Ok),
    ];
    assert_eq!(rows, expected);
    let time = |e: &AuditEntry| e.time.map(|t| (t.seconds, t.nanos)).expect("time");
    assert!(log.windows(2).all(|w| time(&w[0]) >= time(&w[1])));
    let configure = &log[4];
    assert!(
        configure.message.contains("update_mask"),
        "{}",
        configure.message
    );
    let approve = &log[5];
    assert!(approve.request.contains("pubkey"), "{}", approve.request);
    let first_add = log.last().expect("first");
    assert!(
        first_add.request.contains("\"reader\"") && first_add.request.contains("ROLE_READER"),
        "{}",
        first_add.request
    );
    let two: Vec<AuditEntry> = admin
        .get_audit_log(GetAuditLogRequest { limit: 2 })
        .await
        .expect("audit log")
        .into_inner()
        .try_collect()
        .await
        .expect("entries");
    assert_eq!(two, log[..2].to_vec());
}

#[tokio::test]
async fn metroctl_users_login_and_audit() {
    let tmp = tempfile::tempdir().expect("tmp");
    let owner_cfg = tmp.path().join("owner");
    let holder_cfg = tmp.path().join("holder");
    let params = tmp.path().join("params.pb");
    let path = |p: &std::path::Path| p.to_str().expect("utf8").to_string();
    let ok = |out: std::process::Output| {
        assert!(
            out.status.success(),
            "stdout:\n{}\nstderr:\n{}",
            stdout(&out),
            stderr(&out)
        );
        stdout(&out)
    };
    let fails = |out: std::process::Output| {
        assert!(!out.status.success(), "succeeded:\n{}", stdout(&out));
        stderr(&out)
    };
    ok(metroctl(
        &owner_cfg,
        &["install", "params", "--bootstrap", "-o", &path(&params)],
    ));
    let node = TestNode::spawn(fresh_address(), &tmp.path().join("node"), Some(&params));
    node.wait_serving().await;
    let ep = node.address.to_string();
    ok(metroctl(
        &owner_cfg,
        &["takeownership", "--endpoints", &ep, "--yes"],
    ));

    // The holder makes a key; the public half goes to the owner.
    let pubkey = tmp.path().join("alice.pub");
    let out = ok(metroctl(
        &holder_cfg,
        &["user", "keygen", "-o", &path(&pubkey)],
    ));
    let public = std::fs::read_to_string(&pubkey).expect("public key file");
    assert_eq!(public.trim().len(), 64, "{public}");
    assert!(out.contains(public.trim()), "{out}");
    let mode = std::fs::metadata(holder_cfg.join("identity-key.pem"))
        .expect("key")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    // Keygen again would lose the key: it asks.
    let err = fails(metroctl(&holder_cfg, &["user", "keygen"]));
    assert!(err.contains("--yes"), "{err}");

    // Before the owner adds it, login is refused with a hint.
    let err = fails(metroctl(
        &holder_cfg,
        &["login", "--identity", "alice", "--endpoints", &ep, "--yes"],
    ));
    assert!(
        err.contains("UNIMPLEMENTED") || err.contains("not supported"),
        "{err}"
    );
    assert!(err.contains("metroctl user add"), "{err}");

    ok(metroctl(
        &owner_cfg,
        &[
            "user",
            "add",
            "alice",
            "--role",
            "reader",
            "--pubkey",
            &path(&pubkey),
        ],
    ));
    let table = ok(metroctl(&owner_cfg, &["user", "list"]));
    assert!(
        table.contains("alice") && table.contains("reader"),
        "{table}"
    );
    assert!(table.contains(public.trim()), "{table}");
    let json: serde_json::Value =
        serde_json::from_str(&ok(metroctl(&owner_cfg, &["user", "list", "-o", "json"])))
            .expect("json");
    let names: Vec<&str> = json
        .as_array()
        .expect("array")
        .iter()
        .map(|i| i["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, vec!["owner", "alice"]);
    assert_eq!(json[1]["role"], "ROLE_READER");

    // The holder logs in and acts as alice, a reader.
    ok(metroctl(
        &holder_cfg,
        &["login", "--identity", "alice", "--endpoints", &ep, "--yes"],
    ));
    let cert = std::fs::read_to_string(holder_cfg.join("identity.pem")).expect("cert");
    let der = metropolis_identity::pem_to_cert_der(&cert).expect("pem");
    assert_eq!(
        metropolis_identity::parse_certificate(&der)
            .expect("cert")
            .common_name,
        "alice"
    );
    ok(metroctl(&holder_cfg, &["cluster", "info"]));
    ok(metroctl(&holder_cfg, &["node", "list"]));
    let err = fails(metroctl(&holder_cfg, &["cluster", "regenerate-ticket"]));
    assert!(err.contains("PERMISSION_GET_REGISTER_TICKET"), "{err}");
    let err = fails(metroctl(&holder_cfg, &["audit"]));
    assert!(err.contains("PERMISSION_CONFIGURE_CLUSTER"), "{err}");

    // The owner sees the mutating calls.
    let log = ok(metroctl(&owner_cfg, &["audit"]));
    assert!(log.contains("AddIdentity") && log.contains("OK"), "{log}");
    let json: serde_json::Value =
        serde_json::from_str(&ok(metroctl(&owner_cfg, &["audit", "-o", "json"]))).expect("json");
    let newest = &json.as_array().expect("array")[0];
    assert_eq!(newest["identity"], "owner");
    assert_eq!(
        newest["method"],
        "/metropolis.proto.admin.ClusterAdmin/AddIdentity"
    );
    assert!(newest.get("code").is_none(), "OK is the default: {newest}");
    let limited: serde_json::Value = serde_json::from_str(&ok(metroctl(
        &owner_cfg,
        &["audit", "--limit", "1", "-o", "json"],
    )))
    .expect("json");
    assert_eq!(limited.as_array().expect("array").len(), 1);

    // Removal asks first, and then takes effect at once.
    let err = fails(metroctl(&owner_cfg, &["user", "remove", "alice"]));
    assert!(err.contains("--yes"), "{err}");
    ok(metroctl(&owner_cfg, &["user", "remove", "alice", "--yes"]));
    let err = fails(metroctl(&holder_cfg, &["cluster", "info"]));
    assert!(err.contains("not known to this cluster"), "{err}");
    let err = fails(metroctl(&owner_cfg, &["user", "remove", "alice", "--yes"]));
    assert!(err.contains("not found"), "{err}");
    let table = ok(metroctl(&owner_cfg, &["user", "list"]));
    assert!(!table.contains("alice"), "{table}");

    // Owner credentials and an identity do not share a directory.
    ok(metroctl(&owner_cfg, &["user", "keygen", "--yes"]));
    let err = fails(metroctl(
        &owner_cfg,
        &["login", "--identity", "alice", "--yes"],
    ));
    assert!(err.contains("owner credentials"), "{err}");
}

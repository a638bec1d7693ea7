//! A single-node cluster: bootstrap, Escrow, authentication and authorization
//! of Management, restarts, and bad parameters — against real node processes
//! over real TLS.

mod support;

use std::os::unix::fs::PermissionsExt;

use metropolis_api::admin::{
    RegenerateRegisterTicketRequest, cluster_admin_client::ClusterAdminClient,
};
use metropolis_api::api::{
    EscrowRequest, GetClusterInfoRequest, GetRegisterTicketRequest, aaa_client::AaaClient,
    escrow_response::proof_request::Kind, management_client::ManagementClient,
};
use metropolis_identity::{CertificateAuthority, generate_key};
use tonic::Code;

use support::*;

#[tokio::test]
async fn escrow_follows_the_contract_order() {
    let tmp = tempfile::tempdir().expect("tmp");
    let owner = generate_key();
    let node = TestNode::bootstrap(tmp.path(), &owner).await;
    let addr = node.endpoint();
    let ca = fetch_ca(addr).await.expect("ca");
    let owner_pub = owner.verifying_key().to_bytes();
    let self_signed = |k: &metropolis_identity::SigningKey| {
        (
            metropolis_identity::self_signed_certificate(k, "").expect("cert"),
            k.clone(),
        )
    };
    async fn first(
        ch: tonic::transport::Channel,
        req: EscrowRequest,
    ) -> Result<metropolis_api::api::EscrowResponse, tonic::Status> {
        let mut s = AaaClient::new(ch)
            .escrow(tokio_stream::iter([req]))
            .await?
            .into_inner();
        s.message()
            .await?
            .ok_or_else(|| tonic::Status::internal("no message"))
    }

    // 2. parameters unset.
    let ch = channel(addr, trust(&ca), Some(self_signed(&owner)))
        .await
        .expect("connect");
    let err = first(ch.clone(), EscrowRequest::default())
        .await
        .expect_err("no parameters");
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    // 3. another identity name.
    let err = first(ch.clone(), escrow_request("admin", &owner_pub))
        .await
        .expect_err("other identity");
    assert_eq!(err.code(), Code::Unimplemented, "{err}");
    // 4. key not 32 bytes.
    let err = first(ch.clone(), escrow_request("owner", &owner_pub[..31]))
        .await
        .expect_err("short key");
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    // 6. key differs from the certificate's.
    let other = generate_key();
    let err = first(
        ch.clone(),
        escrow_request("owner", other.verifying_key().as_bytes()),
    )
    .await
    .expect_err("mismatch");
    assert_eq!(err.code(), Code::Unimplemented, "{err}");
    // 7. not the owner key (self-signed with a foreign key).
    let ch_other = channel(addr, trust(&ca), Some(self_signed(&other)))
        .await
        .expect("connect");
    let err = first(
        ch_other,
        escrow_request("owner", other.verifying_key().as_bytes()),
    )
    .await
    .expect_err("foreign key");
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");

    // 5. no client certificate: one response asking for it, then UNAUTHENTICATED.
    let ch_anon = channel(addr, trust(&ca), None).await.expect("connect");
    let mut s = AaaClient::new(ch_anon)
        .escrow(tokio_stream::iter([escrow_request("owner", &owner_pub)]))
        .await
        .expect("stream")
        .into_inner();
    let needed = s
        .message()
        .await
        .expect("first message")
        .expect("a response");
    assert_eq!(
        needed.needed.iter().map(|p| p.kind).collect::<Vec<_>>(),
        vec![Kind::RefreshCertificate as i32]
    );
    assert!(needed.emitted_certificate.is_empty());
    let err = s.message().await.expect_err("then unauthenticated");
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");

    // 8. success: a DER certificate, CN owner, client auth, chained to the CA.
    let resp = first(ch, escrow_request("owner", &owner_pub))
        .await
        .expect("escrow");
    assert_eq!(
        resp.fulfilled.iter().map(|p| p.kind).collect::<Vec<_>>(),
        vec![Kind::RefreshCertificate as i32]
    );
    let cert =
        metropolis_identity::parse_certificate(&resp.emitted_certificate).expect("DER certificate");
    assert_eq!(cert.common_name, "owner");
    assert!(cert.client_auth && !cert.server_auth && !cert.is_ca);
    assert_eq!(cert.public_key, owner_pub);
    metropolis_identity::verify_signed_by(&cert, &ca, time::OffsetDateTime::now_utc())
        .expect("chains to CA");

    // 1. already authenticated with a cluster certificate.
    let ch_owner = channel(
        addr,
        trust(&ca),
        Some((resp.emitted_certificate, owner.clone())),
    )
    .await
    .expect("connect");
    let err = first(ch_owner, escrow_request("owner", &owner_pub))
        .await
        .expect_err("authenticated");
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
}

#[tokio::test]
async fn management_requires_a_cluster_certificate_with_the_permission() {
    let tmp = tempfile::tempdir().expect("tmp");
    let owner = generate_key();
    let node = TestNode::bootstrap(tmp.path(), &owner).await;
    let addr = node.endpoint();
    let ca = fetch_ca(addr).await.expect("ca");

    // No certificate.
    let anon = channel(addr, trust(&ca), None).await.expect("connect");
    let err = ManagementClient::new(anon)
        .get_cluster_info(GetClusterInfoRequest {})
        .await
        .expect_err("anon");
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");

    // The self-signed owner certificate is good for Escrow only.
    let ss = metropolis_identity::self_signed_certificate(&owner, "owner").expect("cert");
    let ch = channel(addr, trust(&ca), Some((ss, owner.clone())))
        .await
        .expect("connect");
    let err = ManagementClient::new(ch)
        .get_cluster_info(GetClusterInfoRequest {})
        .await
        .expect_err("self-signed");
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");

    // A certificate named "owner" from a foreign CA, over the real owner key.
    let foreign = CertificateAuthority::generate().expect("ca");
    let forged = foreign
        .issue_user_certificate(
            "owner",
            owner.verifying_key().as_bytes(),
            std::time::Duration::from_secs(86_400),
        )
        .expect("forged");
    let ch = channel(addr, trust(&ca), Some((forged, owner.clone())))
        .await
        .expect("connect");
    let err = ManagementClient::new(ch)
        .get_register_ticket(GetRegisterTicketRequest {})
        .await
        .expect_err("foreign");
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");
    assert!(
        err.message().contains("not valid for this cluster"),
        "{}",
        err.message()
    );

    // The node's own certificate may read cluster status but not the ticket.
    let (node_cert, node_key) = node_credentials(&node.data_dir);
    let ch = channel(addr, trust(&ca), Some((node_cert, node_key)))
        .await
        .expect("connect");
    let mut as_node = ManagementClient::new(ch);
    as_node
        .get_cluster_info(GetClusterInfoRequest {})
        .await
        .expect("node reads cluster info");
    let err = as_node
        .get_register_ticket(GetRegisterTicketRequest {})
        .await
        .expect_err("node ticket");
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    assert!(
        err.message().contains("PERMISSION_GET_REGISTER_TICKET"),
        "{}",
        err.message()
    );

    // The owner may do both; the ticket is random, long and stable until
    // regenerated.
    let ch = owner_channel(addr, &ca, &owner).await;
    let mut mgmt = ManagementClient::new(ch.clone());
    let info = mgmt
        .get_cluster_info(GetClusterInfoRequest {})
        .await
        .expect("info")
        .into_inner();
    assert_eq!(info.ca_certificate, ca);
    let dir = info.cluster_directory.expect("directory");
    assert_eq!(dir.nodes.len(), 1);
    assert_eq!(dir.nodes[0].addresses[0].host, node.address.to_string());
    assert!(dir.nodes[0].id.starts_with("metropolis-"));
    assert_eq!(
        info.cluster_configuration.expect("config").cluster_domain,
        "cluster.internal"
    );
    let t1 = mgmt
        .get_register_ticket(GetRegisterTicketRequest {})
        .await
        .expect("ticket")
        .into_inner()
        .ticket;
    assert!(t1.len() >= 16);
    let t2 = mgmt
        .get_register_ticket(GetRegisterTicketRequest {})
        .await
        .expect("ticket")
        .into_inner()
        .ticket;
    assert_eq!(t1, t2);
    let t3 = ClusterAdminClient::new(ch)
        .regenerate_register_ticket(RegenerateRegisterTicketRequest {})
        .await
        .expect("regenerate")
        .into_inner()
        .ticket;
    assert_ne!(t1, t3);
    assert_eq!(
        mgmt.get_register_ticket(GetRegisterTicketRequest {})
            .await
            .expect("ticket")
            .into_inner()
            .ticket,
        t3
    );
}

#[tokio::test]
async fn restart_keeps_identity_and_refuses_a_second_bootstrap() {
    let tmp = tempfile::tempdir().expect("tmp");
    let owner = generate_key();
    let mut node = TestNode::bootstrap(tmp.path(), &owner).await;
    let ca = fetch_ca(node.endpoint()).await.expect("ca");
    let owner_cert = escrow_owner(node.endpoint(), &ca, &owner).await;
    let node_id = {
        let ch = channel(
            node.endpoint(),
            trust(&ca),
            Some((owner_cert.clone(), owner.clone())),
        )
        .await
        .expect("c");
        let info = ManagementClient::new(ch)
            .get_cluster_info(GetClusterInfoRequest {})
            .await
            .expect("info");
        info.into_inner().cluster_directory.expect("dir").nodes[0]
            .id
            .clone()
    };
    let mode = std::fs::metadata(node.data_dir.join("credentials.pb"))
        .expect("creds")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    node.stop();

    // A bootstrap of another cluster (another owner) over the same data
    // directory is refused, and changes nothing.
    let params = tmp.path().join("bootstrap.pb");
    let other_owner = generate_key();
    write_bootstrap_params(&params, &other_owner);
    let data = node.data_dir.to_string_lossy().into_owned();
    let addr = node.address.to_string();
    let out = run_node(&[
        "--data-dir",
        &data,
        "--address",
        &addr,
        "--params",
        params.to_str().expect("utf8"),
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("another cluster"), "{}", stderr(&out));

    // Without params it comes back with the same CA, node ID and owner.
    let restarted = TestNode::spawn(node.address, &node.data_dir, None);
    // Management answers only once the restarted curator leads again.
    restarted.wait_leading().await;
    assert_eq!(fetch_ca(restarted.endpoint()).await.expect("ca"), ca);
    let ch = channel(
        restarted.endpoint(),
        trust(&ca),
        Some((owner_cert, owner.clone())),
    )
    .await
    .expect("c");
    let info = ManagementClient::new(ch)
        .get_cluster_info(GetClusterInfoRequest {})
        .await
        .expect("owner cert still valid");
    assert_eq!(
        info.into_inner().cluster_directory.expect("dir").nodes[0].id,
        node_id
    );
}

#[test]
fn bad_parameters_exit_with_one_line_and_write_nothing() {
    let tmp = tempfile::tempdir().expect("tmp");
    let garbage = tmp.path().join("garbage.pb");
    std::fs::write(&garbage, b"\xff\xff\xff\xff not protobuf").expect("write");
    let empty = tmp.path().join("empty.pb");
    std::fs::write(&empty, b"").expect("write");
    let short_key = tmp.path().join("short.pb");
    {
        use metropolis_api::api::{NodeParameters, node_parameters};
        use prost::Message;
        let p = NodeParameters {
            cluster: Some(node_parameters::Cluster::ClusterBootstrap(
                node_parameters::ClusterBootstrap {
                    owner_public_key: vec![1; 31],
                    ..Default::default()
                },
            )),
            network_config: None,
        };
        std::fs::write(&short_key, p.encode_to_vec()).expect("write");
    }
    let cases = [
        (tmp.path().join("missing.pb"), "cannot read node parameters"),
        (garbage, "not a binary NodeParameters message"),
        (empty, "neither cluster_bootstrap nor cluster_register"),
        (short_key, "owner_public_key must be a 32-byte"),
    ];
    for (i, (params, expect)) in cases.iter().enumerate() {
        let data = tmp.path().join(format!("data{i}"));
        let out = run_node(&[
            "--data-dir",
            data.to_str().expect("utf8"),
            "--address",
            "127.0.0.1",
            "--params",
            params.to_str().expect("utf8"),
        ]);
        let err = stderr(&out);
        assert!(!out.status.success(), "case {expect}: exited successfully");
        assert_eq!(
            err.trim().lines().count(),
            1,
            "case {expect}: not one line:\n{err}"
        );
        assert!(err.contains(expect), "case {expect}: {err}");
        assert!(!data.exists(), "case {expect}: data directory was written");
    }
    // No params on a fresh directory.
    let data = tmp.path().join("fresh");
    let out = run_node(&[
        "--data-dir",
        data.to_str().expect("utf8"),
        "--address",
        "127.0.0.1",
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--params"), "{}", stderr(&out));
    assert!(!data.exists());
    // Durations the daemon cannot work with.
    for (flag, value, expect) in [
        ("--leader-lease-ttl", "500ms", "at least 1s"),
        ("--heartbeat-interval", "0s", "longer than zero"),
    ] {
        let out = run_node(&[
            "--data-dir",
            data.to_str().expect("utf8"),
            "--address",
            "127.0.0.1",
            flag,
            value,
        ]);
        assert!(!out.status.success());
        assert!(stderr(&out).contains(expect), "{flag}: {}", stderr(&out));
        assert!(!data.exists());
    }
}

#[tokio::test]
async fn metroctl_takes_ownership_and_shows_cluster_info() {
    let tmp = tempfile::tempdir().expect("tmp");
    let cfg = tmp.path().join("metroctl");
    let params = tmp.path().join("params.pb");
    let out = metroctl(
        &cfg,
        &[
            "install",
            "params",
            "--bootstrap",
            "-o",
            params.to_str().expect("utf8"),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let node = TestNode::spawn(fresh_address(), &tmp.path().join("node"), Some(&params));
    node.wait_serving().await;
    let ep = node.address.to_string();

    // Without --yes and without a terminal it refuses to pin the CA.
    let out = metroctl(&cfg, &["takeownership", "--endpoints", &ep]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--yes"), "{}", stderr(&out));
    assert!(!cfg.join("ca.pem").exists());

    let out = metroctl(&cfg, &["takeownership", "--endpoints", &ep, "--yes"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let ca = fetch_ca(node.endpoint()).await.expect("ca");
    assert!(
        stdout(&out).contains(&metropolis_identity::fingerprint_sha256(&ca)),
        "{}",
        stdout(&out)
    );
    for f in ["owner-key.pem", "owner.pem", "ca.pem"] {
        let mode = std::fs::metadata(cfg.join(f))
            .expect(f)
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{f}");
    }
    // Again: already the owner, and the endpoints are remembered.
    let out = metroctl(&cfg, &["takeownership"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("already the owner"),
        "{}",
        stdout(&out)
    );

    // Global flags go before or after the subcommand.
    let out = metroctl(&cfg, &["cluster", "info", "-o", "json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("json");
    assert_eq!(
        v["clusterDirectory"]["nodes"][0]["addresses"][0]["host"],
        ep
    );
    assert_eq!(v["clusterConfiguration"]["tpmMode"], "TPM_MODE_DISABLED");
    let out = std::process::Command::new(metroctl_binary())
        .args(["cluster", "--endpoints", &ep, "info", "--config"])
        .arg(&cfg)
        .args(["-o", "yaml"])
        .output()
        .expect("metroctl");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("clusterDomain: cluster.internal"),
        "{}",
        stdout(&out)
    );
    let out = metroctl(&cfg, &["cluster", "info"]);
    assert!(stdout(&out).contains(&metropolis_identity::fingerprint_sha256(&ca)));
}

#[tokio::test]
async fn metroctl_errors_are_one_clear_line() {
    let tmp = tempfile::tempdir().expect("tmp");
    let cfg = tmp.path().join("metroctl");

    // No owner key.
    let out = metroctl(
        &cfg,
        &["takeownership", "--endpoints", "127.0.0.1", "--yes"],
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("no owner key"), "{}", stderr(&out));
    assert_eq!(stderr(&out).trim().lines().count(), 1, "{}", stderr(&out));

    // Node unreachable.
    let params = tmp.path().join("p.pb");
    metroctl(
        &cfg,
        &[
            "install",
            "params",
            "--bootstrap",
            "-o",
            params.to_str().expect("utf8"),
        ],
    );
    let unused = fresh_address().to_string();
    let out = metroctl(&cfg, &["takeownership", "--endpoints", &unused, "--yes"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("connection refused"),
        "{}",
        stderr(&out)
    );
    assert_eq!(stderr(&out).trim().lines().count(), 1, "{}", stderr(&out));
    assert!(!stderr(&out).contains("panicked"));

    // Wrong cluster: pinned CA of cluster A, endpoint of cluster B.
    let a = TestNode::spawn(fresh_address(), &tmp.path().join("a"), Some(&params));
    let b_owner = generate_key();
    let b = TestNode::bootstrap(&tmp.path().join("b-dir").tap_mkdir(), &b_owner).await;
    a.wait_serving().await;
    let out = metroctl(
        &cfg,
        &[
            "takeownership",
            "--endpoints",
            &a.address.to_string(),
            "--yes",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let out = metroctl(
        &cfg,
        &["cluster", "info", "--endpoints", &b.address.to_string()],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("certificate was rejected"),
        "{}",
        stderr(&out)
    );
    assert_eq!(stderr(&out).trim().lines().count(), 1, "{}", stderr(&out));

    // Not the owner of cluster B: escrow is refused with the reason.
    let cfg_b = tmp.path().join("metroctl-b");
    std::fs::create_dir_all(&cfg_b).expect("mkdir");
    std::fs::copy(cfg.join("owner-key.pem"), cfg_b.join("owner-key.pem")).expect("copy");
    let out = metroctl(
        &cfg_b,
        &[
            "takeownership",
            "--endpoints",
            &b.address.to_string(),
            "--yes",
        ],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("not the cluster owner"),
        "{}",
        stderr(&out)
    );
}

trait TapMkdir {
    fn tap_mkdir(self) -> Self;
}

impl TapMkdir for std::path::PathBuf {
    fn tap_mkdir(self) -> Self {
        std::fs::create_dir_all(&self).expect("mkdir");
        self
    }
}

#[tokio::test]
async fn labels_and_configuration_through_metroctl() {
    let tmp = tempfile::tempdir().expect("tmp");
    let cfg = tmp.path().join("metroctl");
    let params = tmp.path().join("params.pb");
    metroctl(
        &cfg,
        &[
            "install",
            "params",
            "--bootstrap",
            "-o",
            params.to_str().expect("utf8"),
        ],
    );
    let node = TestNode::spawn(fresh_address(), &tmp.path().join("node"), Some(&params));
    node.wait_serving().await;
    let out = metroctl(
        &cfg,
        &[
            "takeownership",
            "--endpoints",
            &node.address.to_string(),
            "--yes",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let id = stdout(&metroctl(&cfg, &["node", "list"]))
        .trim()
        .to_string();
    assert!(id.starts_with("metropolis-"), "{id}");

    let out = metroctl(&cfg, &["node", "label", &id, "zone=a", "rack=r1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = metroctl(&cfg, &["node", "label", &id, "zone=b", "rack-"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_str(&stdout(&metroctl(
        &cfg,
        &["node", "describe", &id, "-o", "json"],
    )))
    .expect("json");
    assert_eq!(
        json[0]["labels"]["pairs"],
        serde_json::json!([{"key": "zone", "value": "b"}])
    );
    let out = metroctl(&cfg, &["node", "label", &id, "bad key=x"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("bad key"), "{}", stderr(&out));
    let out = metroctl(&cfg, &["node", "label", "metropolis-0000", "a=b"]);
    assert!(stderr(&out).contains("not found"), "{}", stderr(&out));

    let out = metroctl(
        &cfg,
        &[
            "cluster",
            "configure",
            "set",
            "kubernetes.node_labels_to_synchronize=^zone$,^rack",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let info: serde_json::Value =
        serde_json::from_str(&stdout(&metroctl(&cfg, &["cluster", "info", "-o", "json"])))
            .expect("json");
    assert_eq!(
        info["clusterConfiguration"]["kubernetes"]["nodeLabelsToSynchronize"],
        serde_json::json!([{"regexp": "^zone$"}, {"regexp": "^rack"}])
    );
    let out = metroctl(
        &cfg,
        &[
            "cluster",
            "configure",
            "set",
            "kubernetes.node_labels_to_synchronize=(",
        ],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("does not compile"),
        "{}",
        stderr(&out)
    );
    let out = metroctl(&cfg, &["cluster", "configure", "set", "cluster_domain=x"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("cluster_domain"), "{}", stderr(&out));
}

//! NodeManagement on real nodes: logs with every backlog mode and filter,
//! following, Reboot back with a new boot ID, power off, UpdateNode, and who
//! may do what.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use metropolis_api::admin::{AddIdentityRequest, Role, cluster_admin_client::ClusterAdminClient};
use metropolis_api::api::{
    GetNodesRequest, LogsRequest, Node, OsImageRef, RebootRequest, UpdateNodeRequest, logs_request,
    management_client::ManagementClient, node::Health,
    node_management_client::NodeManagementClient, reboot_request,
};
use metropolis_api::common::{LogFilter, log_filter};
use metropolis_api::osbase::logtree::proto::{LeveledLogSeverity, log_entry};
use tonic::Code;
use tonic::transport::Channel;

use support::*;

const FAST: &[&str] = &[
    "--heartbeat-interval",
    "200ms",
    "--heartbeat-timeout",
    "1500ms",
];

fn logs_req(
    dn: &str,
    backlog: logs_request::BacklogMode,
    count: i64,
    stream: bool,
    filters: Vec<log_filter::Filter>,
) -> LogsRequest {
    LogsRequest {
        dn: dn.into(),
        filters: filters
            .into_iter()
            .map(|f| LogFilter { filter: Some(f) })
            .collect(),
        backlog_mode: backlog as i32,
        backlog_count: count,
        stream_mode: if stream {
            logs_request::StreamMode::Unbuffered
        } else {
            logs_request::StreamMode::Disable
        } as i32,
    }
}

async fn backlog(
    c: &mut NodeManagementClient<Channel>,
    req: LogsRequest,
) -> Result<Vec<metropolis_api::osbase::logtree::proto::LogEntry>, tonic::Status> {
    let responses: Vec<_> = c.logs(req).await?.into_inner().try_collect().await?;
    Ok(responses
        .into_iter()
        .flat_map(|r| r.backlog_entries)
        .collect())
}

async fn the_node(mgmt: &mut ManagementClient<Channel>) -> Node {
    let nodes: Vec<Node> = mgmt
        .get_nodes(GetNodesRequest::default())
        .await
        .expect("nodes")
        .into_inner()
        .try_collect()
        .await
        .expect("s");
    nodes.into_iter().next().expect("one node")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_reboot_poweroff_update() {
    let tmp = tempfile::tempdir().expect("tmp");
    let owner = metropolis_identity::generate_key();
    let params = tmp.path().join("bootstrap.pb");
    write_bootstrap_params(&params, &owner);
    let mut node =
        TestNode::spawn_with(fresh_address(), &tmp.path().join("n1"), Some(&params), FAST);
    node.wait_serving().await;
    let ca = fetch_ca(node.endpoint()).await.expect("ca");
    let owner_cert = escrow_owner(node.endpoint(), &ca, &owner).await;
    let mgmt_addr = SocketAddr::new(node.address, 7839);
    let mut c = NodeManagementClient::new(
        channel(
            mgmt_addr,
            trust(&ca),
            Some((owner_cert.clone(), owner.clone())),
        )
        .await
        .expect("c"),
    );

    use log_filter::Filter as F;
    use logs_request::BacklogMode as B;
    let all = backlog(
        &mut c,
        logs_req(
            "root",
            B::All,
            0,
            false,
            vec![F::WithChildren(log_filter::WithChildren {})],
        ),
    )
    .await
    .expect("all");
    assert!(all.iter().any(|e| e.dn == "root.serve"), "{all:#?}");
    let root_only = backlog(&mut c, logs_req("root", B::All, 0, false, vec![]))
        .await
        .expect("root");
    assert!(root_only.iter().all(|e| e.dn == "root"));
    let last2 = backlog(
        &mut c,
        logs_req(
            "root",
            B::Count,
            2,
            false,
            vec![F::WithChildren(log_filter::WithChildren {})],
        ),
    )
    .await
    .expect("count");
    assert_eq!(last2.len(), 2);
    assert_eq!(last2, all[all.len() - 2..].to_vec());
    let leveled = backlog(
        &mut c,
        logs_req(
            "root",
            B::All,
            0,
            false,
            vec![
                F::WithChildren(log_filter::WithChildren {}),
                F::OnlyLeveled(log_filter::OnlyLeveled {}),
            ],
        ),
    )
    .await
    .expect("leveled");
    assert!(
        leveled
            .iter()
            .all(|e| matches!(e.kind, Some(log_entry::Kind::Leveled(_))))
    );
    let raw = backlog(
        &mut c,
        logs_req(
            "root",
            B::All,
            0,
            false,
            vec![
                F::WithChildren(log_filter::WithChildren {}),
                F::OnlyRaw(log_filter::OnlyRaw {}),
            ],
        ),
    )
    .await
    .expect("raw");
    assert!(
        raw.is_empty(),
        "a daemon without child processes has no raw entries"
    );
    let warn = LeveledLogSeverity::Warning as i32;
    let warnings = backlog(
        &mut c,
        logs_req(
            "root",
            B::All,
            0,
            false,
            vec![
                F::WithChildren(log_filter::WithChildren {}),
                F::LeveledWithMinimumSeverity(log_filter::LeveledWithMinimumSeverity {
                    minimum: warn,
                }),
            ],
        ),
    )
    .await
    .expect("min");
    assert!(
        warnings
            .iter()
            .all(|e| matches!(&e.kind, Some(log_entry::Kind::Leveled(l)) if l.severity >= warn))
    );
    for bad in [
        logs_req("root", B::Count, -1, false, vec![]),
        logs_req("root", B::Invalid, 0, false, vec![]),
        logs_req("root", B::Disable, 0, false, vec![]),
        logs_req("root..x", B::All, 0, false, vec![]),
        logs_req(
            "root",
            B::All,
            0,
            false,
            vec![
                F::OnlyRaw(log_filter::OnlyRaw {}),
                F::OnlyLeveled(log_filter::OnlyLeveled {}),
            ],
        ),
    ] {
        let err = backlog(&mut c, bad).await.expect_err("invalid");
        assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    }

    // Following: new entries arrive after the backlog (the owner's next call
    // makes the node log).
    let mut follow = c
        .logs(logs_req(
            "root",
            B::Disable,
            0,
            true,
            vec![F::WithChildren(log_filter::WithChildren {})],
        ))
        .await
        .expect("follow")
        .into_inner();
    let mut mgmt = ManagementClient::new(
        channel(
            node.endpoint(),
            trust(&ca),
            Some((owner_cert.clone(), owner.clone())),
        )
        .await
        .expect("m"),
    );
    metropolis_api::admin::cluster_admin_client::ClusterAdminClient::new(
        channel(
            node.endpoint(),
            trust(&ca),
            Some((owner_cert.clone(), owner.clone())),
        )
        .await
        .expect("a"),
    )
    .regenerate_register_ticket(metropolis_api::admin::RegenerateRegisterTicketRequest {})
    .await
    .expect("regenerate");
    let got = tokio::time::timeout(Duration::from_secs(10), follow.message())
        .await
        .expect("in time")
        .expect("ok")
        .expect("msg");
    assert!(got.backlog_entries.is_empty() && !got.stream_entries.is_empty());

    // A reader may read logs but not reboot.
    let reader = metropolis_identity::generate_key();
    ClusterAdminClient::new(
        channel(
            node.endpoint(),
            trust(&ca),
            Some((owner_cert.clone(), owner.clone())),
        )
        .await
        .expect("a"),
    )
    .add_identity(AddIdentityRequest {
        name: "reader".into(),
        public_key: reader.verifying_key().to_bytes().to_vec(),
        role: Role::Reader as i32,
    })
    .await
    .expect("add reader");
    let reader_cert = {
        use metropolis_api::api::aaa_client::AaaClient;
        let ss = metropolis_identity::self_signed_certificate(&reader, "").expect("ss");
        let ch = channel(node.endpoint(), trust(&ca), Some((ss, reader.clone())))
            .await
            .expect("c");
        let mut s = AaaClient::new(ch)
            .escrow(tokio_stream::iter([escrow_request(
                "reader",
                reader.verifying_key().as_bytes(),
            )]))
            .await
            .expect("escrow")
            .into_inner();
        s.message()
            .await
            .expect("m")
            .expect("r")
            .emitted_certificate
    };
    let mut as_reader = NodeManagementClient::new(
        channel(mgmt_addr, trust(&ca), Some((reader_cert, reader)))
            .await
            .expect("c"),
    );
    backlog(&mut as_reader, logs_req("root", B::Count, 1, false, vec![]))
        .await
        .expect("reader reads logs");
    let err = as_reader
        .reboot(RebootRequest {
            r#type: reboot_request::Type::Firmware as i32,
            next_boot: 0,
        })
        .await
        .expect_err("reader reboot");
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");

    // UpdateNode: validated; an OS image is refused with the reason (this
    // node installs metropolis-node binaries: see tests/update.rs).
    let err = c
        .update_node(UpdateNodeRequest::default())
        .await
        .expect_err("empty");
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    let img = OsImageRef {
        repository: "metropolis/node".into(),
        tag: "1.0".into(),
        ..Default::default()
    };
    let err = c
        .update_node(UpdateNodeRequest {
            os_image: Some(img),
            activation_mode: 2,
            ..Default::default()
        })
        .await
        .expect_err("no images");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    // Reboot: invalid type and next-boot modes that cannot apply.
    let err = c
        .reboot(RebootRequest {
            r#type: 0,
            next_boot: 0,
        })
        .await
        .expect_err("invalid type");
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    let err = c
        .reboot(RebootRequest {
            r#type: 1,
            next_boot: 1,
        })
        .await
        .expect_err("rollback of a node never updated");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");

    // Reboot: back UP with a new boot ID and the same node ID.
    let before = the_node(&mut mgmt).await;
    c.reboot(RebootRequest {
        r#type: reboot_request::Type::Kexec as i32,
        next_boot: 0,
    })
    .await
    .expect("reboot");
    let deadline = Instant::now() + Duration::from_secs(30);
    let after = loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            Instant::now() < deadline,
            "node did not come back; log:\n{}",
            node.log_text()
        );
        let Ok(ch) = channel(
            node.endpoint(),
            trust(&ca),
            Some((owner_cert.clone(), owner.clone())),
        )
        .await
        else {
            continue;
        };
        let mut m = ManagementClient::new(ch);
        let Ok(resp) = m.get_nodes(GetNodesRequest::default()).await else {
            continue;
        };
        let Ok(nodes) = resp.into_inner().try_collect::<Vec<Node>>().await else {
            continue;
        };
        if let Some(n) = nodes.into_iter().next()
            && n.status.as_ref().map(|s| &s.boot_id) != before.status.as_ref().map(|s| &s.boot_id)
        {
            break n;
        }
    };
    assert_eq!(after.id, before.id);
    assert!(
        node.try_exit().is_none(),
        "the same process image restarted in place"
    );

    // Power off: the daemon exits cleanly and stays down.
    let mut c = NodeManagementClient::new(
        channel(mgmt_addr, trust(&ca), Some((owner_cert, owner)))
            .await
            .expect("c"),
    );
    c.reboot(RebootRequest {
        r#type: reboot_request::Type::PowerOff as i32,
        next_boot: 0,
    })
    .await
    .expect("power off");
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = node.try_exit() {
            break s;
        }
        assert!(Instant::now() < deadline, "node did not power off");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(status.success(), "{status:?}");
    assert!(
        fetch_ca(node.endpoint()).await.is_err(),
        "port closed after power off"
    );
    let _ = Health::Unknown;
}

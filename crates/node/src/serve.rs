//! The node's gRPC servers, its membership loop, and its shutdown.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use metropolis_api::admin::cluster_admin_server::ClusterAdminServer;
use metropolis_api::admin::node_curator_server::NodeCuratorServer;
use metropolis_api::admin::node_watch_server::NodeWatchServer;
use metropolis_api::api::{aaa_server::AaaServer, management_server::ManagementServer};
use metropolis_api::common::node_roles;
use metropolis_api::curator::{
    GetCurrentLeaderResponse, curator_local_server::CuratorLocalServer,
    curator_server::CuratorServer,
};
use metropolis_curator::Cluster;
use metropolis_curator::aaa::AaaService;
use metropolis_curator::admin::ClusterAdminService;
use metropolis_curator::audit::AuditLayer;
use metropolis_curator::authz::{CertificateAuthorizer, ClusterAuthorizer};
use metropolis_curator::heartbeat::Heartbeats;
use metropolis_curator::leader::{self, LeaderGate, LeaderInfo, Leadership};
use metropolis_curator::local::CuratorLocalService;
use metropolis_curator::management::ManagementService;
use metropolis_curator::node_watch::NodeWatchService;
use metropolis_curator::nodes::{CuratorService, NodeCuratorService};
use metropolis_rpc::observe::ObserveLayer;
use metropolis_rpc::server::{Limits, Redirect};
use metropolis_rpc::{AuthLayer, Authorizer};
use tokio::sync::{mpsc, watch};

use crate::datadir::Credentials;
use crate::logtree::LogTree;
use crate::membership;
use crate::node_mgmt::{NodeManagementService, PowerAction};
use metropolis_api::api::node_management_server::NodeManagementServer;

/// Port of AAA, Management, ClusterAdmin, Curator, NodeCurator and CuratorLocal.
pub const CURATOR_PORT: u16 = 7835;
/// Port of NodeManagement.
pub const NODE_MANAGEMENT_PORT: u16 = 7839;

/// How long a stopping node waits for open calls to finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// ... and one whose cluster state just moved to etcd (see `Exit::MovedToEtcd`).
const MOVED_GRACE: Duration = Duration::from_millis(100);

pub struct Config {
    pub address: IpAddr,
    pub creds: Arc<Credentials>,
    /// The node certificate as renewed (`renewal`): what every handshake
    /// presents, as server and as client.
    pub live: Arc<metropolis_identity::LiveCertificate>,
    /// Set on nodes that hold the consensus store and so run the curator.
    pub cluster: Option<Arc<Cluster>>,
    /// Whether this node runs etcd (then `cluster` is etcd-backed, or None
    /// while the member catches up).
    pub runs_etcd: bool,
    /// While this node's etcd member does not serve yet: resolves when it
    /// does, and the node stops serving as a plain node (Exit::CuratorReady)
    /// to start again with its curator.
    pub until_curator: Option<futures::future::BoxFuture<'static, ()>>,
    /// On the embedded store: turns true once the cluster state has moved
    /// to etcd, and the node serves again with a curator on it.
    pub moved_to_etcd: Option<watch::Receiver<bool>>,
    /// Where this node's curator client looks for the leader.
    pub curators: Vec<SocketAddr>,
    pub heartbeat_interval: Duration,
    pub heartbeat_timeout: Duration,
    pub leader_lease_ttl: Duration,
    pub data_dir: std::path::PathBuf,
    pub logs: Arc<LogTree>,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// etcd's client socket on nodes that run etcd (its metrics).
    pub etcd_socket: Option<std::path::PathBuf>,
    /// Plain-HTTP metrics on this loopback address as well (off: None).
    pub metrics_plain_http: Option<SocketAddr>,
    /// Every transport limit of the node's gRPC ports.
    pub limits: Limits,
}

pub async fn run(cfg: Config) -> anyhow::Result<Exit> {
    let node_id = cfg.creds.node_id();
    let tls = metropolis_identity::server_config_live(cfg.live.clone())
        .context("building the TLS server configuration")?;
    let addr = SocketAddr::new(cfg.address, CURATOR_PORT);
    let listener = metropolis_rpc::server::bind(addr).await?;
    let ca = cfg.creds.ca_certificate.clone();

    let heartbeats = Arc::new(Heartbeats::new(cfg.heartbeat_timeout));
    // Who leads: consensus members campaign (and follow the outcome); other
    // nodes report the curator their membership loop reached.
    let this_node = GetCurrentLeaderResponse {
        this_node_id: node_id.clone(),
        ..Default::default()
    };
    let (leader_tx, leader_rx) = watch::channel(this_node);
    let mut background = Vec::new();
    let mut leadership = None;
    let mut membership_leader = Some(leader_tx.clone());
    if let Some(cluster) = &cfg.cluster {
        membership_leader = None;
        heartbeats.stop_leading();
        let me = LeaderInfo {
            node_id: node_id.clone(),
            host: cfg.address.to_string(),
            port: CURATOR_PORT,
        };
        let (rx, election) = leader::campaign(
            cluster.store().clone(),
            me.clone(),
            cfg.leader_lease_ttl,
            cluster.step_down().clone(),
        );
        background.push(election);
        // Health timeouts for NodeWatch (idle while nobody watches).
        background.push(tokio::spawn(heartbeats.clone().report_timeouts()));
        background.push(tokio::spawn(follow_leadership(
            rx.clone(),
            me,
            cluster.clone(),
            heartbeats.clone(),
            leader_tx,
        )));
        leadership = Some(rx);
    }
    let local = CuratorLocalServer::new(CuratorLocalService::new(ca.clone(), leader_rx))
        .max_decoding_message_size(cfg.limits.max_request_message);

    let authorizer: Arc<dyn Authorizer> = match &cfg.cluster {
        Some(cluster) => Arc::new(ClusterAuthorizer::new(cluster.clone())),
        None => Arc::new(CertificateAuthorizer),
    };
    let observe = ObserveLayer::new(cfg.metrics.rpc_observer());
    let limits = &cfg.limits;
    let max_request = limits.max_request_message;
    let router = match (&cfg.cluster, leadership) {
        (Some(cluster), Some(leadership)) => {
            let heartbeats = heartbeats.clone();
            let management = Arc::new(ManagementService::new(cluster.clone(), heartbeats.clone()));
            let node_watch = NodeWatchService::new(
                cluster.clone(),
                heartbeats.clone(),
                leadership.clone(),
                node_id.clone(),
            );
            // Layers added first are outermost: only the leader serves the
            // curator services; authentication runs before the audit layer,
            // which needs the established caller.
            metropolis_rpc::server::builder(limits)
                .layer(observe.clone())
                .layer(tower::util::option_layer(Some(LeaderGate::new(
                    leadership, &node_id,
                ))))
                .layer(AuthLayer::new(ca.clone(), authorizer.clone()))
                .layer(AuditLayer::new(cluster.store().clone()))
                .add_service(
                    AaaServer::new(AaaService::new(cluster.clone()))
                        .max_decoding_message_size(max_request),
                )
                .add_service(
                    ManagementServer::from_arc(management).max_decoding_message_size(max_request),
                )
                .add_service(
                    NodeWatchServer::new(node_watch).max_decoding_message_size(max_request),
                )
                .add_service(
                    ClusterAdminServer::new(ClusterAdminService::new(cluster.clone()))
                        .max_decoding_message_size(max_request),
                )
                .add_service(
                    CuratorServer::new(CuratorService::new(cluster.clone(), heartbeats.clone()))
                        .max_decoding_message_size(max_request),
                )
                .add_service(
                    NodeCuratorServer::new(NodeCuratorService::new(cluster.clone(), heartbeats))
                        .max_decoding_message_size(max_request),
                )
                .add_service(local)
        }
        _ => {
            let where_to = cfg
                .curators
                .iter()
                .map(|a| a.ip().to_string())
                .collect::<Vec<_>>()
                .join(", ");
            let msg =
                format!("node {node_id} does not run the curator; connect to one of: {where_to}");
            // Nothing here mutates cluster state; the disabled audit layer
            // only gives both routers the same type.
            metropolis_rpc::server::builder(limits)
                .layer(observe.clone())
                .layer(tower::util::option_layer(None::<LeaderGate>))
                .layer(AuthLayer::new(ca.clone(), authorizer.clone()))
                .layer(AuditLayer::disabled())
                .add_service(Redirect::<AaaServer<AaaService>>::new(msg.clone()))
                .add_service(Redirect::<ManagementServer<ManagementService>>::new(
                    msg.clone(),
                ))
                .add_service(Redirect::<NodeWatchServer<NodeWatchService>>::new(
                    msg.clone(),
                ))
                .add_service(Redirect::<ClusterAdminServer<ClusterAdminService>>::new(
                    msg.clone(),
                ))
                .add_service(Redirect::<CuratorServer<CuratorService>>::new(msg.clone()))
                .add_service(Redirect::<NodeCuratorServer<NodeCuratorService>>::new(msg))
                .add_service(local)
        }
    };

    let etcd_dir = cfg
        .runs_etcd
        .then(|| crate::datadir::DataDir::new(cfg.data_dir.clone()).etcd_dir());
    background.push(tokio::spawn(crate::renewal::run(crate::renewal::Renewal {
        live: cfg.live.clone(),
        ca_der: ca.clone(),
        data: crate::datadir::DataDir::new(cfg.data_dir.clone()),
        cluster: cfg.cluster.clone(),
        curators: cfg.curators.clone(),
        etcd_dir: etcd_dir.clone(),
    })));
    let (ended_tx, mut ended_rx) = mpsc::channel(1);
    let membership = tokio::spawn(membership::maintain(membership::Maintain {
        creds: cfg.creds.clone(),
        live: cfg.live.clone(),
        endpoints: std::sync::Mutex::new(cfg.curators.clone()),
        address: cfg.address,
        runs_curator: cfg.cluster.is_some(),
        runs_etcd: cfg.runs_etcd,
        etcd_dir: etcd_dir.clone(),
        leader: membership_leader,
        heartbeat_interval: cfg.heartbeat_interval,
        boot_id: membership::boot_id(),
        data_dir: cfg.data_dir.clone(),
        ended: ended_tx,
    }));

    // NodeManagement: this node's own operations, same TLS and auth layer.
    let mgmt_addr = SocketAddr::new(cfg.address, NODE_MANAGEMENT_PORT);
    let mgmt_listener = metropolis_rpc::server::bind(mgmt_addr).await?;
    // Metrics: TLS as upstream; plain HTTP only on loopback, if asked for.
    let metrics_addr = SocketAddr::new(cfg.address, crate::metrics::METRICS_PORT);
    let metrics_listener = metropolis_rpc::server::bind(metrics_addr).await?;
    let plain_metrics = match cfg.metrics_plain_http {
        Some(a) => Some(metropolis_rpc::server::bind(a).await?),
        None => None,
    };
    let (power_tx, mut power_rx) = mpsc::channel(1);
    let node_mgmt = metropolis_rpc::server::builder(limits)
        .layer(observe)
        .layer(AuthLayer::new(ca.clone(), authorizer.clone()))
        .add_service(
            NodeManagementServer::new(NodeManagementService::new(
                cfg.logs.clone(),
                power_tx,
                crate::update::Updater::new(&cfg.data_dir),
            ))
            .max_decoding_message_size(max_request),
        );

    // Both servers stop on one signal.
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let mut curator_srv = tokio::spawn(router.serve_with_incoming_shutdown(
        metropolis_rpc::server::tls_incoming(listener, tls.clone(), limits, Some(ca.clone())),
        stopped(stop_rx.clone()),
    ));
    let mut mgmt_srv = tokio::spawn(node_mgmt.serve_with_incoming_shutdown(
        metropolis_rpc::server::tls_incoming(mgmt_listener, tls.clone(), limits, Some(ca.clone())),
        stopped(stop_rx.clone()),
    ));
    let metrics_service = Arc::new(crate::metrics::server::MetricsService {
        metrics: cfg.metrics.clone(),
        cluster: cfg.cluster.clone().map(|c| (c, heartbeats.clone())),
        etcd_socket: cfg.etcd_socket.clone(),
        ca_der: ca.clone(),
        authorizer: authorizer.clone(),
    });
    let mut metrics_srv = tokio::spawn(crate::metrics::server::serve(
        metrics_listener,
        tls,
        limits.clone(),
        plain_metrics,
        metrics_service,
        stopped(stop_rx),
    ));
    tracing::info!(node = %node_id, %addr, %mgmt_addr, %metrics_addr, "serving");

    let curator_ready = async {
        match cfg.until_curator {
            Some(ready) => ready.await,
            None => std::future::pending().await,
        }
    };
    let moved_to_etcd = async {
        match cfg.moved_to_etcd {
            Some(mut moved) => {
                if moved.wait_for(|m| *m).await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
            None => std::future::pending().await,
        }
    };
    let outcome = tokio::select! {
        () = curator_ready => Ok(Exit::CuratorReady),
        // The node serves again, with a curator on etcd.
        () = moved_to_etcd => Ok(Exit::MovedToEtcd),
        r = &mut curator_srv => Err(anyhow::anyhow!("the curator port server stopped: {:?}", r)),
        r = &mut mgmt_srv => Err(anyhow::anyhow!("the node management server stopped: {:?}", r)),
        r = &mut metrics_srv => Err(anyhow::anyhow!("the metrics server stopped: {:?}", r)),
        _ = shutdown_signal() => Ok(Exit::Stopped),
        Some(action) = power_rx.recv() => Ok(match action {
            PowerAction::Restart => Exit::Restart,
            PowerAction::PowerOff => Exit::Stopped,
        }),
        Some(ended) = ended_rx.recv() => match ended {
            membership::Ended::Decommissioned(msg) => {
                tracing::info!("{msg}");
                Ok(Exit::Stopped)
            }
            membership::Ended::Fatal(e) => Err(e),
            membership::Ended::Consensus(role) => Ok(Exit::Consensus(role)),
        },
    };
    membership.abort();
    for task in background {
        task.abort();
    }
    // Streams in flight outlive the server (tonic's connections are tasks of
    // their own): heartbeat streams end at their next beat, so that nodes
    // reconnect to whoever serves next (LeaderGate refuses new calls on old
    // connections once the election is gone).
    heartbeats.stop_leading();
    // Graceful shutdown waits for every connection to close, and long-lived
    // streams (heartbeats, watches, log follows) never do on their own: give
    // in-flight calls a grace period, then exit regardless.
    let _ = stop_tx.send(true);
    let both = async {
        let _ = (&mut curator_srv).await;
        let _ = (&mut mgmt_srv).await;
        let _ = (&mut metrics_srv).await;
    };
    // After the move to etcd this curator can finish nothing (its store
    // takes no writes): every moment spent here is a moment without writes.
    let grace = match outcome {
        Ok(Exit::MovedToEtcd) => MOVED_GRACE,
        _ => SHUTDOWN_GRACE,
    };
    if tokio::time::timeout(grace, both).await.is_err() {
        tracing::info!("connections still open after {grace:?}; closing them");
        curator_srv.abort();
        mgmt_srv.abort();
        metrics_srv.abort();
    }
    tracing::info!(?outcome, "shut down");
    outcome
}

/// How the daemon ends.
#[derive(Debug, Clone, PartialEq)]
pub enum Exit {
    Stopped,
    /// Start again as a fresh process (Reboot).
    Restart,
    /// The cluster state moved from the embedded store to etcd: serve again,
    /// with a curator on the etcd member the move started.
    MovedToEtcd,
    /// This node's etcd member serves now: serve again, with the curator.
    CuratorReady,
    /// The node gained (Some) or lost (None) the ConsensusMember role of an
    /// etcd cluster: reconfigure, then start again.
    Consensus(Option<node_roles::ConsensusMember>),
}

/// Acts on leadership changes of this node's curator: a new leader fences
/// its writes with its leader key, starts heartbeat bookkeeping afresh (health
/// UNKNOWN for one timeout) and runs the consensus membership reconciler; a
/// curator that stops leading ends its heartbeat streams. CuratorLocal's
/// answer follows along.
async fn follow_leadership(
    mut leadership: watch::Receiver<Leadership>,
    me: LeaderInfo,
    cluster: Arc<Cluster>,
    heartbeats: Arc<Heartbeats>,
    leader_tx: watch::Sender<GetCurrentLeaderResponse>,
) {
    let mut reconciler: Option<tokio::task::JoinHandle<()>> = None;
    loop {
        let current = leadership.borrow_and_update().clone();
        leader_tx.send_replace(current.to_response(&me));
        match current {
            Leadership::Leading { key_revision } => {
                cluster.set_fence(key_revision);
                heartbeats.start_leading();
                if reconciler.is_none() {
                    reconciler = Some(tokio::spawn(metropolis_curator::consensus::reconcile(
                        cluster.clone(),
                        heartbeats.clone(),
                    )));
                }
            }
            Leadership::Following(_) | Leadership::Unknown => {
                heartbeats.stop_leading();
                if let Some(r) = reconciler.take() {
                    r.abort();
                }
            }
        }
        if leadership.changed().await.is_err() {
            break;
        }
    }
    if let Some(r) = reconciler {
        r.abort();
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term => {},
    }
    tracing::info!("shutdown requested");
}

//! The node's gRPC servers, its membership loop, and its shutdown.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use metropolis_api::admin::cluster_admin_server::ClusterAdminServer;
use metropolis_api::api::{aaa_server::AaaServer, management_server::ManagementServer};
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
use metropolis_curator::local::CuratorLocalService;
use metropolis_curator::management::ManagementService;
use metropolis_curator::nodes::CuratorService;
use metropolis_rpc::server::Redirect;
use metropolis_rpc::{AuthLayer, Authorizer};
use tokio::sync::{mpsc, watch};
use tonic::transport::Server;

use crate::datadir::Credentials;
use crate::membership;

/// Port of AAA, Management, Curator and CuratorLocal.
pub const CURATOR_PORT: u16 = 7835;

/// How long a stopping node waits for open calls to finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

pub struct Config {
    pub address: IpAddr,
    pub creds: Arc<Credentials>,
    /// Set on nodes that hold the consensus store and so run the curator.
    pub cluster: Option<Arc<Cluster>>,
    /// Where this node's curator client connects.
    pub curators: Vec<SocketAddr>,
    pub heartbeat_interval: Duration,
    pub heartbeat_timeout: Duration,
    pub data_dir: std::path::PathBuf,
}

pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let node_id = cfg.creds.node_id();
    let tls =
        metropolis_identity::server_config(cfg.creds.node_certificate.clone(), &cfg.creds.key)
            .context("building the TLS server configuration")?;
    let addr = SocketAddr::new(cfg.address, CURATOR_PORT);
    let listener = metropolis_rpc::server::bind(addr).await?;
    let ca = cfg.creds.ca_certificate.clone();

    let leader = match (&cfg.cluster, cfg.curators.first()) {
        (Some(_), _) => GetCurrentLeaderResponse {
            leader_node_id: node_id.clone(),
            leader_host: cfg.address.to_string(),
            leader_port: i32::from(CURATOR_PORT),
            this_node_id: node_id.clone(),
        },
        (None, Some(c)) => GetCurrentLeaderResponse {
            leader_node_id: String::new(),
            leader_host: c.ip().to_string(),
            leader_port: i32::from(c.port()),
            this_node_id: node_id.clone(),
        },
        (None, None) => GetCurrentLeaderResponse {
            this_node_id: node_id.clone(),
            ..Default::default()
        },
    };
    let (_leader_tx, leader_rx) = watch::channel(leader);
    let local = CuratorLocalServer::new(CuratorLocalService::new(ca.clone(), leader_rx));

    let router = match &cfg.cluster {
        Some(cluster) => {
            let heartbeats = Arc::new(Heartbeats::new(cfg.heartbeat_timeout));
            let management = Arc::new(ManagementService::new(cluster.clone(), heartbeats.clone()));
            let authorizer: Arc<dyn Authorizer> = Arc::new(ClusterAuthorizer::new(cluster.clone()));
            // Layers added first are outermost: authentication runs before
            // the audit layer, which needs the established caller.
            Server::builder()
                .layer(AuthLayer::new(ca, authorizer))
                .layer(AuditLayer::new(cluster.store().clone()))
                .add_service(AaaServer::new(AaaService::new(cluster.clone())))
                .add_service(ManagementServer::from_arc(management))
                .add_service(ClusterAdminServer::new(ClusterAdminService::new(
                    cluster.clone(),
                )))
                .add_service(CuratorServer::new(CuratorService::new(
                    cluster.clone(),
                    heartbeats,
                )))
                .add_service(local)
        }
        None => {
            let where_to = cfg
                .curators
                .iter()
                .map(|a| a.ip().to_string())
                .collect::<Vec<_>>()
                .join(", ");
            let msg =
                format!("node {node_id} does not run the curator; connect to one of: {where_to}");
            let authorizer: Arc<dyn Authorizer> = Arc::new(CertificateAuthorizer);
            // Nothing here mutates cluster state; the disabled audit layer
            // only gives both routers the same type.
            Server::builder()
                .layer(AuthLayer::new(ca, authorizer))
                .layer(AuditLayer::disabled())
                .add_service(Redirect::<AaaServer<AaaService>>::new(msg.clone()))
                .add_service(Redirect::<ManagementServer<ManagementService>>::new(
                    msg.clone(),
                ))
                .add_service(Redirect::<ClusterAdminServer<ClusterAdminService>>::new(
                    msg.clone(),
                ))
                .add_service(Redirect::<CuratorServer<CuratorService>>::new(msg))
                .add_service(local)
        }
    };

    let (ended_tx, mut ended_rx) = mpsc::channel(1);
    let membership = tokio::spawn(membership::maintain(membership::Maintain {
        creds: cfg.creds.clone(),
        endpoints: cfg.curators.clone(),
        address: cfg.address,
        runs_curator: cfg.cluster.is_some(),
        heartbeat_interval: cfg.heartbeat_interval,
        boot_id: membership::new_boot_id(),
        data_dir: cfg.data_dir.clone(),
        ended: ended_tx,
    }));

    tracing::info!(node = %node_id, %addr, "serving");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let serve = router.serve_with_incoming_shutdown(
        metropolis_rpc::server::tls_incoming(listener, tls),
        async {
            shutdown_signal().await;
            let _ = stop_tx.send(());
        },
    );
    // Graceful shutdown waits for every connection to close, and long-lived
    // streams (heartbeats, watches) never do on their own: give in-flight
    // calls a grace period, then exit regardless.
    let grace = async {
        if stop_rx.await.is_ok() {
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    let result = tokio::select! {
        served = serve => served.context("serving gRPC"),
        _ = grace => {
            tracing::info!("connections still open after {SHUTDOWN_GRACE:?}; closing them");
            Ok(())
        }
        Some(ended) = ended_rx.recv() => match ended {
            membership::Ended::Decommissioned(msg) => {
                tracing::info!("{msg}");
                Ok(())
            }
            membership::Ended::Fatal(e) => Err(e),
        },
    };
    membership.abort();
    tracing::info!("shut down");
    result
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

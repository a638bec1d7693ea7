//! The node's gRPC servers and its shutdown.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use anyhow::Context;
use metropolis_api::admin::cluster_admin_server::ClusterAdminServer;
use metropolis_api::api::{aaa_server::AaaServer, management_server::ManagementServer};
use metropolis_api::curator::{GetCurrentLeaderResponse, curator_local_server::CuratorLocalServer};
use metropolis_curator::Cluster;
use metropolis_curator::aaa::AaaService;
use metropolis_curator::authz::ClusterAuthorizer;
use metropolis_curator::local::CuratorLocalService;
use metropolis_curator::management::ManagementService;
use metropolis_rpc::AuthLayer;
use tokio::sync::watch;
use tonic::transport::Server;

use crate::datadir::Credentials;

/// Port of AAA, Management, Curator and CuratorLocal.
pub const CURATOR_PORT: u16 = 7835;

pub struct Config {
    pub address: IpAddr,
    pub creds: Arc<Credentials>,
    /// Set on nodes that hold the consensus store and so run the curator.
    pub cluster: Option<Arc<Cluster>>,
}

pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let node_id = cfg.creds.node_id();
    let tls =
        metropolis_identity::server_config(cfg.creds.node_certificate.clone(), &cfg.creds.key)
            .context("building the TLS server configuration")?;
    let addr = SocketAddr::new(cfg.address, CURATOR_PORT);
    let listener = metropolis_rpc::server::bind(addr).await?;

    let cluster = cfg
        .cluster
        .context("this node holds no consensus store; only consensus members serve yet")?;
    let (_leader_tx, leader_rx) = watch::channel(GetCurrentLeaderResponse {
        leader_node_id: node_id.clone(),
        leader_host: cfg.address.to_string(),
        leader_port: i32::from(CURATOR_PORT),
        this_node_id: node_id.clone(),
    });
    let auth = AuthLayer::new(
        cfg.creds.ca_certificate.clone(),
        Arc::new(ClusterAuthorizer::new(cluster.clone())),
    );
    let router = Server::builder()
        .layer(auth)
        .add_service(AaaServer::new(AaaService::new(cluster.clone())))
        .add_service(ManagementServer::from_arc(Arc::new(
            ManagementService::new(cluster.clone()),
        )))
        .add_service(ClusterAdminServer::new(ManagementService::new(
            cluster.clone(),
        )))
        .add_service(CuratorLocalServer::new(CuratorLocalService::new(
            cfg.creds.ca_certificate.clone(),
            leader_rx,
        )));

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
    tokio::select! {
        served = serve => served.context("serving gRPC")?,
        _ = grace => tracing::info!("connections still open after {SHUTDOWN_GRACE:?}; closing them"),
    }
    tracing::info!("shut down");
    Ok(())
}

/// How long a stopping node waits for open calls to finish.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

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

//! The node's side of cluster membership: registering (ClusterRegister
//! parameters), and afterwards joining, reporting status and heartbeating to
//! the curator for as long as the node runs.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use backon::BackoffBuilder;
use backon::{ExponentialBuilder, Retryable};
use futures::StreamExt;
use metropolis_api::admin::{ReportDecommissionedRequest, node_curator_client::NodeCuratorClient};
use metropolis_api::common::NodeStorageSecurity;
use metropolis_api::common::{
    ClusterDirectory, NodeLabels, NodeStatus, node_roles, node_status::RunningCurator,
};
use metropolis_api::curator::{
    CommitNodeRequest, GetCurrentLeaderResponse, HeartbeatRequest, JoinNodeRequest,
    RegisterNodeRequest, UpdateNodeStatusRequest, WatchRequest, curator_client::CuratorClient,
    watch_request,
};
use metropolis_identity::ServerTrust;
use rand::RngCore;
use tokio::sync::{mpsc, watch};
use tonic::Code;
use tonic::transport::Channel;

use crate::datadir::{Credentials, DataDir};
use crate::serve::CURATOR_PORT;

/// Curator endpoints listed in a cluster directory.
pub fn directory_endpoints(dir: &ClusterDirectory) -> Vec<SocketAddr> {
    dir.nodes
        .iter()
        .flat_map(|n| n.addresses.iter())
        .filter_map(|a| a.host.parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, CURATOR_PORT))
        .collect()
}

/// Backoff for reaching the cluster: quick first retries, then at most every
/// few seconds, never a busy loop.
fn backoff(max: Duration) -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(max)
        .with_jitter()
        .without_max_times()
}

/// Failures worth retrying: the cluster is unreachable or busy.
fn transient(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Unknown
            | Code::ResourceExhausted
            | Code::Aborted
    )
}

#[derive(Debug, thiserror::Error)]
enum CallError {
    #[error("{0}")]
    Connect(#[from] metropolis_rpc::client::ConnectError),
    #[error("{}", metropolis_rpc::client::explain_status(.0))]
    Status(tonic::Status),
}

impl CallError {
    fn retryable(&self) -> bool {
        match self {
            CallError::Connect(_) => true,
            CallError::Status(s) => transient(s.code()),
        }
    }
}

/// Registers this node into the cluster of `directory`, waits for approval,
/// commits and returns the node's credentials (sealed by the caller).
pub async fn register(
    data: &DataDir,
    directory: &ClusterDirectory,
    ticket: Vec<u8>,
    ca: Vec<u8>,
    labels: Option<NodeLabels>,
) -> anyhow::Result<Credentials> {
    data.create()?;
    // The key survives restarts while waiting for approval, so a restarted
    // node is still the one the operator approves.
    let key = data.pending_key()?;
    let id = metropolis_identity::node_id(key.verifying_key().as_bytes());
    tracing::info!(
        node = %id,
        public_key = %hex::encode(key.verifying_key().as_bytes()),
        "registering; compare this node ID and key with `metroctl node approve` before approving"
    );
    let self_signed = metropolis_identity::self_signed_certificate(&key, &id)?;
    let tls = metropolis_identity::client_config(
        ServerTrust::ClusterCa {
            ca_der: ca.clone(),
            node_id: None,
        },
        Some((self_signed, key.clone())),
    )?;
    let endpoints = directory_endpoints(directory);
    // Rotates where each retry starts looking for the leader.
    let attempts = std::sync::atomic::AtomicUsize::new(0);

    let call_register = || async {
        let start = attempts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let ch = metropolis_rpc::client::connect_leader(&endpoints, start, tls.clone())
            .await?
            .channel;
        CuratorClient::new(ch)
            .register_node(RegisterNodeRequest {
                register_ticket: ticket.clone(),
                // Rejoining is proven by the node certificate, not a join key.
                join_key: Vec::new(),
                have_local_tpm: false,
                labels: labels.clone(),
            })
            .await
            .map_err(CallError::Status)
    };
    call_register
        .retry(backoff(Duration::from_secs(10)))
        .when(CallError::retryable)
        .notify(|e, d| tracing::warn!(error = %e, "cannot register yet; retrying in {d:?}"))
        .await
        .map_err(|e| anyhow::anyhow!("the cluster refused to register this node: {e}"))?;
    tracing::info!(node = %id, "registered; waiting for approval");

    let call_commit = || async {
        let start = attempts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let ch = metropolis_rpc::client::connect_leader(&endpoints, start, tls.clone())
            .await?
            .channel;
        CuratorClient::new(ch)
            .commit_node(CommitNodeRequest {
                // This node keeps its data directory unencrypted.
                cluster_unlock_key: Vec::new(),
                storage_security: NodeStorageSecurity::Insecure as i32,
            })
            .await
            .map_err(CallError::Status)
    };
    let resp = call_commit
        .retry(backoff(Duration::from_secs(3)))
        .when(|e| e.retryable() || matches!(e, CallError::Status(s) if s.code() == Code::FailedPrecondition && s.message().contains("waiting for approval")))
        .notify(|e, d| tracing::info!(reason = %e, "not admitted yet; asking again in {d:?}"))
        .await
        .map_err(|e| anyhow::anyhow!("the cluster refused to admit this node: {e}"))?
        .into_inner();

    let cert = metropolis_identity::parse_certificate(&resp.node_certificate)
        .context("the cluster sent an invalid node certificate")?;
    if cert.public_key != key.verifying_key().to_bytes() || resp.ca_certificate != ca {
        bail!(
            "the cluster sent credentials that do not match this node's key or the CA in its parameters"
        );
    }
    metropolis_identity::verify_signed_by(&cert, &ca, time::OffsetDateTime::now_utc())
        .context("the node certificate does not chain to the cluster CA")?;
    tracing::info!(node = %id, "admitted to the cluster");
    Ok(Credentials {
        key,
        node_certificate: resp.node_certificate,
        ca_certificate: ca,
    })
}

/// What the node tells the curator about itself.
pub fn status(address: IpAddr, runs_curator: bool, boot_id: &[u8]) -> NodeStatus {
    NodeStatus {
        external_address: address.to_string(),
        running_curator: runs_curator.then_some(RunningCurator {
            port: i32::from(CURATOR_PORT),
        }),
        timestamp: Some(prost_types::Timestamp::from(std::time::SystemTime::now())),
        version: Some(crate::update::running_version()),
        boot_id: boot_id.to_vec(),
    }
}

/// This process's boot ID: random, drawn once per start of the node process
/// (under the update supervisor, once per child), as upstream draws one per
/// boot. Serving again within the process (a plain node whose etcd member
/// began to serve, the move to etcd) is not a boot and keeps it.
pub fn boot_id() -> Vec<u8> {
    static ID: std::sync::OnceLock<[u8; 16]> = std::sync::OnceLock::new();
    ID.get_or_init(|| {
        let mut id = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut id);
        id
    })
    .to_vec()
}

pub struct Maintain {
    pub creds: Arc<Credentials>,
    /// The node certificate as renewed; every new connection presents it.
    pub live: Arc<metropolis_identity::LiveCertificate>,
    /// Where to look for the curator leader; refreshed from the cluster
    /// directory after every join and now and then during a session, and
    /// saved for the next start.
    pub endpoints: std::sync::Mutex<Vec<SocketAddr>>,
    pub address: IpAddr,
    pub runs_curator: bool,
    /// Whether this node runs etcd (a consensus member of an etcd cluster).
    pub runs_etcd: bool,
    /// The etcd member's directory on nodes that run etcd. Its `peer.pem`
    /// is the peer certificate the member presents now (renewal replaces
    /// it): a role that revokes it means the member was admitted again
    /// (after etcd dropped it), and has to join afresh.
    pub etcd_dir: Option<std::path::PathBuf>,
    /// Non-consensus nodes publish the curator they reached here
    /// (CuratorLocal.GetCurrentLeader on this node).
    pub leader: Option<watch::Sender<GetCurrentLeaderResponse>>,
    pub heartbeat_interval: Duration,
    pub boot_id: Vec<u8>,
    /// The data directory, wiped when the node is decommissioned.
    pub data_dir: std::path::PathBuf,
    /// How the node's membership ended; the daemon exits with it.
    pub ended: mpsc::Sender<Ended>,
}

/// Why a node stops being a member.
#[derive(Debug)]
pub enum Ended {
    /// Decommissioned on request: data wiped, reported back. A clean exit.
    Decommissioned(String),
    /// Refused by the cluster (e.g. deleted), or unable to go on.
    Fatal(anyhow::Error),
    /// The node gained the ConsensusMember role on an etcd cluster (Some:
    /// what it needs to start etcd) or lost it (None); it restarts as what it
    /// now is.
    Consensus(Option<node_roles::ConsensusMember>),
}

/// Joins, reports status, heartbeats and watches the node's own record;
/// reconnects with backoff whenever the curator goes away. Returns only when
/// membership ended.
pub async fn maintain(m: Maintain) {
    let tls = match metropolis_identity::client_config_live(
        ServerTrust::ClusterCa {
            ca_der: m.creds.ca_certificate.clone(),
            node_id: None,
        },
        Some(m.live.clone()),
    ) {
        Ok(t) => t,
        Err(e) => {
            let _ = m
                .ended
                .send(Ended::Fatal(anyhow::anyhow!(
                    "building TLS client configuration: {e}"
                )))
                .await;
            return;
        }
    };
    let mut delay = backoff(Duration::from_secs(5)).build();
    let mut attempt = 0usize;
    loop {
        attempt += 1;
        match session(&m, tls.clone(), attempt).await {
            Ok(ended) => {
                let _ = m.ended.send(ended).await;
                return;
            }
            Err(CallError::Status(s)) if s.code() == Code::PermissionDenied => {
                let _ = m
                    .ended
                    .send(Ended::Fatal(anyhow::anyhow!(
                        "the cluster refused this node: {}",
                        s.message()
                    )))
                    .await;
                return;
            }
            Err(e) => {
                let wait = delay.next().unwrap_or(Duration::from_secs(5));
                if attempt == 1 {
                    // A starting cluster may still be electing its leader.
                    tracing::info!(reason = %e, "curator not reachable yet; retrying in {wait:?}");
                } else {
                    tracing::warn!(error = %e, "lost the curator; reconnecting in {wait:?}");
                }
                tokio::time::sleep(wait).await;
                if wait >= Duration::from_secs(5) {
                    delay = backoff(Duration::from_secs(5)).build();
                }
            }
        }
    }
}

/// One connection's worth of membership: join, status, then heartbeats and
/// the node's own record until the stream breaks or membership ends.
async fn session(
    m: &Maintain,
    tls: Arc<rustls::ClientConfig>,
    attempt: usize,
) -> Result<Ended, CallError> {
    let endpoints = m
        .endpoints
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    // Each attempt starts one node further, so a dead node is not asked
    // first every time.
    let connected =
        metropolis_rpc::client::connect_leader(&endpoints, attempt.saturating_sub(1), tls).await?;
    let mut curator = CuratorClient::new(connected.channel.clone());
    let joined = curator
        .join_node(JoinNodeRequest {
            using_sealed_configuration: false,
        })
        .await
        .map_err(CallError::Status)?
        .into_inner();
    log_roles(joined.roles.as_ref());
    curator
        .update_node_status(UpdateNodeStatusRequest {
            node_id: m.creds.node_id(),
            status: Some(status(m.address, m.runs_curator, &m.boot_id)),
        })
        .await
        .map_err(CallError::Status)?;
    tracing::info!(
        curator = %connected.addr,
        "joined the cluster; heartbeating every {:?}",
        m.heartbeat_interval
    );
    if let Some(tx) = &m.leader {
        tx.send_replace(GetCurrentLeaderResponse {
            leader_node_id: connected.leader_node_id.clone(),
            leader_host: connected.addr.ip().to_string(),
            leader_port: i32::from(connected.addr.port()),
            this_node_id: m.creds.node_id(),
        });
    }
    refresh_directory(m, connected.channel.clone(), true).await;
    if let Some(ended) = consensus_change(m, joined.roles.as_ref()) {
        return Ok(ended);
    }

    let mut watch = curator
        .watch(WatchRequest {
            kind: Some(watch_request::Kind::NodeInCluster(
                watch_request::NodeInCluster {
                    node_id: m.creds.node_id(),
                },
            )),
        })
        .await
        .map_err(CallError::Status)?
        .into_inner();
    let mut replies = curator
        .heartbeat(async_stream_interval(m.heartbeat_interval))
        .await
        .map_err(CallError::Status)?
        .into_inner();
    let mut roles = joined.roles;
    // The directory's consensus members as of the last read; a change means
    // members came or went since, and the directory is read again.
    let mut directory_digest = None;
    loop {
        tokio::select! {
            reply = replies.next() => match reply {
                Some(r) => {
                    let digest = r.map_err(CallError::Status)?.directory_digest;
                    if digest != 0 {
                        if directory_digest.is_some_and(|d| d != digest) {
                            tracing::info!("the cluster's consensus members changed; reading the cluster directory again");
                            refresh_directory(m, connected.channel.clone(), false).await;
                        }
                        directory_digest = Some(digest);
                    }
                }
                None => return Err(CallError::Status(tonic::Status::unavailable("the curator closed the heartbeat stream"))),
            },
            ev = watch.next() => {
                let ev = match ev {
                    Some(ev) => ev.map_err(CallError::Status)?,
                    None => return Err(CallError::Status(tonic::Status::unavailable("the curator closed the watch"))),
                };
                if !ev.node_tombstones.is_empty() {
                    return Err(CallError::Status(tonic::Status::permission_denied("node was removed from the cluster")));
                }
                for node in ev.nodes {
                    if node.roles != roles {
                        // A renewed peer certificate changes the role, not
                        // which roles the node holds.
                        if role_flags(node.roles.as_ref()) != role_flags(roles.as_ref()) {
                            log_roles(node.roles.as_ref());
                        }
                        roles = node.roles.clone();
                        if let Some(ended) = consensus_change(m, roles.as_ref()) {
                            return Ok(ended);
                        }
                    }
                    if node.decommission_requested {
                        return decommission(m, connected.channel.clone()).await;
                    }
                }
            }
        }
    }
}

/// Whether the node's roles ask it to become, or stop being, an etcd
/// member. An embedded-store node never changes: its cluster cannot have a
/// second member, and it cannot lose its role (it is the last member).
fn consensus_change(
    m: &Maintain,
    roles: Option<&metropolis_api::common::NodeRoles>,
) -> Option<Ended> {
    let role = roles.and_then(|r| r.consensus_member.as_ref());
    match (role, m.runs_etcd, m.runs_curator) {
        (Some(role), false, false) if !role.peer_certificate.is_empty() => {
            tracing::info!(
                "this node became a consensus member; restarting to run etcd and a curator"
            );
            Some(Ended::Consensus(Some(role.clone())))
        }
        (Some(role), true, _)
            if readmitted(
                m.etcd_dir
                    .as_deref()
                    .and_then(crate::consensus::peer_certificate)
                    .as_deref(),
                role,
            ) =>
        {
            tracing::info!(
                "this node's etcd member was dropped from etcd and admitted again (its old peer \
                 certificate is revoked); restarting to join etcd afresh"
            );
            Some(Ended::Consensus(Some(role.clone())))
        }
        (None, true, _) => {
            tracing::info!("this node is no longer a consensus member; restarting without etcd");
            Some(Ended::Consensus(None))
        }
        _ => None,
    }
}

/// Whether `role` admits this node to etcd anew: it carries another peer
/// certificate than the one this node's etcd runs with, and revokes that one
/// (the leader revokes the old certificate exactly when it admits a member
/// again, after etcd dropped it). Only then is the member's etcd data of no
/// use any more; a mere difference is not reason enough to throw it away:
/// a renewal (RenewPeerCertificate) writes a new certificate into the role
/// and revokes nothing.
fn readmitted(running: Option<&[u8]>, role: &node_roles::ConsensusMember) -> bool {
    let Some(running) = running else {
        return false;
    };
    if role.peer_certificate.is_empty() || role.peer_certificate == running {
        return false;
    }
    let Ok(cert) = metropolis_identity::parse_certificate(running) else {
        return false;
    };
    metropolis_identity::parse_crl(&role.initial_crl, &role.ca_certificate)
        .is_ok_and(|revoked| revoked.contains(&cert.serial))
}

/// Learns every node's address (GetClusterInfo), so that this node can find
/// the curator through any of them when the one it knew is gone; remembered
/// in the data directory for the next start (at a join always, later only
/// when it changed).
async fn refresh_directory(m: &Maintain, channel: Channel, at_join: bool) {
    use metropolis_api::api::{GetClusterInfoRequest, management_client::ManagementClient};
    // Bounded: the session's heartbeat replies wait meanwhile.
    let mut client = ManagementClient::new(channel);
    let call = client.get_cluster_info(GetClusterInfoRequest {});
    let info = match tokio::time::timeout(Duration::from_secs(10), call).await {
        Ok(Ok(r)) => r.into_inner(),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "cannot read the cluster directory");
            return;
        }
        Err(_) => {
            tracing::debug!("the cluster directory was not read within 10s");
            return;
        }
    };
    let Some(dir) = info.cluster_directory else {
        return;
    };
    let mut endpoints = directory_endpoints(&dir);
    if m.runs_curator {
        // Its own curator first: it may be the leader, and it knows who is.
        let own = SocketAddr::new(m.address, CURATOR_PORT);
        endpoints.retain(|e| *e != own);
        endpoints.insert(0, own);
    }
    if endpoints.is_empty() {
        return;
    }
    {
        let mut known = m.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        if *known == endpoints && !at_join {
            return;
        }
        if *known != endpoints {
            tracing::debug!(?endpoints, "the cluster directory changed");
        }
        *known = endpoints;
    }
    if let Err(e) = DataDir::new(m.data_dir.clone()).save_directory(&dir) {
        tracing::warn!(error = %e, "cannot save the cluster directory");
    }
}

/// This daemon runs the curator (on nodes that hold the consensus store) and
/// nothing for the Kubernetes roles; say so when roles change.
/// Which roles a node holds: consensus member, Kubernetes controller,
/// Kubernetes worker.
fn role_flags(roles: Option<&metropolis_api::common::NodeRoles>) -> (bool, bool, bool) {
    roles.map_or((false, false, false), |r| {
        (
            r.consensus_member.is_some(),
            r.kubernetes_controller.is_some(),
            r.kubernetes_worker.is_some(),
        )
    })
}

fn log_roles(roles: Option<&metropolis_api::common::NodeRoles>) {
    let (consensus_member, kubernetes_controller, kubernetes_worker) = role_flags(roles);
    tracing::info!(
        consensus_member,
        kubernetes_controller,
        kubernetes_worker,
        "node roles; role services running here: curator on consensus members only (no Kubernetes services in this implementation)"
    );
}

/// Destroys the node's credentials and data, then tells the curator, using
/// the certificate still held in memory.
async fn decommission(m: &Maintain, channel: Channel) -> Result<Ended, CallError> {
    tracing::warn!(
        "the cluster asked this node to decommission itself; wiping {}",
        m.data_dir.display()
    );
    if let Err(e) = std::fs::remove_dir_all(&m.data_dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        return Ok(Ended::Fatal(anyhow::anyhow!(
            "decommission: cannot wipe {}: {e}",
            m.data_dir.display()
        )));
    }
    NodeCuratorClient::new(channel)
        .report_decommissioned(ReportDecommissionedRequest {})
        .await
        .map_err(CallError::Status)?;
    Ok(Ended::Decommissioned(format!(
        "node {} was decommissioned: its credentials and data are gone and it will not rejoin",
        m.creds.node_id()
    )))
}

/// One heartbeat request now and then every `interval`.
fn async_stream_interval(
    interval: Duration,
) -> impl futures::Stream<Item = HeartbeatRequest> + Send + 'static {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    futures::stream::unfold(ticker, |mut t| async move {
        loop {
            t.tick().await;
            if !heartbeat_dropped() {
                break;
            }
        }
        Some((HeartbeatRequest {}, t))
    })
}

/// Debug builds: the `node::heartbeat_send` failpoint drops beats ("return")
/// or delays them ("sleep(MS)"). A no-op otherwise.
fn heartbeat_dropped() -> bool {
    fail::fail_point!("node::heartbeat_send", |_| true);
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only a role that revokes the certificate this node's etcd runs with
    /// makes it throw its etcd data away.
    #[test]
    fn readmission_needs_the_old_certificate_revoked() {
        use metropolis_identity::{CertificateAuthority, Revoked, generate_key};
        let ca = CertificateAuthority::generate_named("Metropolis Consensus CA").unwrap();
        let key = generate_key();
        let issue = || {
            ca.issue_peer_certificate(
                key.verifying_key().as_bytes(),
                "127.0.0.2".parse().unwrap(),
                std::time::Duration::from_secs(3600),
            )
            .unwrap()
        };
        let (running, other) = (issue(), issue());
        let serial = metropolis_identity::parse_certificate(&running)
            .unwrap()
            .serial;
        let role = |cert: &[u8], revoked: &[Revoked]| node_roles::ConsensusMember {
            ca_certificate: ca.cert_der().to_vec(),
            peer_certificate: cert.to_vec(),
            initial_crl: ca.issue_crl(revoked, 2).unwrap(),
            peers: Vec::new(),
        };
        let revoked = [Revoked {
            serial,
            revoked_at: time::OffsetDateTime::now_utc(),
        }];
        assert!(readmitted(Some(&running), &role(&other, &revoked)));
        // Another certificate, the old one not revoked (a renewal, or a role
        // written by a leader that issued one more): keep the data.
        assert!(!readmitted(Some(&running), &role(&other, &[])));
        // The same certificate, or none yet, or no etcd here.
        assert!(!readmitted(Some(&running), &role(&running, &revoked)));
        assert!(!readmitted(Some(&running), &role(&[], &revoked)));
        assert!(!readmitted(None, &role(&other, &revoked)));
    }
}

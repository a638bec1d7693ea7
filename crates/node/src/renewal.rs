//! Renewal of the node's certificates: when a third of its lifetime is
//! left, the node gets a new one for the same key (and so the same node ID),
//! checks it, stores it in the data directory, and from then on presents it
//! in every new TLS handshake; connections already open keep theirs. One
//! loop renews both certificates a node may hold:
//!
//! - the node certificate, presented as server and as client
//!   ([`LiveCertificate`]). Consensus members issue it from the CA in the
//!   store they hold (no call: this also serves a single-node cluster whose
//!   only node was offline past its certificate's end, when no curator with
//!   a valid certificate exists); other nodes ask the curator leader with
//!   NodeCurator.RenewNodeCertificate, proving their key with the
//!   certificate they hold, expired or not;
//! - on nodes that run etcd, the etcd peer certificate (consensus CA), from
//!   the curator leader with NodeCurator.RenewPeerCertificate, which writes
//!   it into the node's ConsensusMember role; then `etcd/peer.pem` is
//!   replaced, which etcd reads at every new peer handshake (no restart).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use metropolis_api::admin::{
    RenewNodeCertificateRequest, RenewPeerCertificateRequest,
    node_curator_client::NodeCuratorClient,
};
use metropolis_curator::Cluster;
use metropolis_identity::{Certificate, LiveCertificate, ServerTrust};
use time::OffsetDateTime;
use tonic::transport::Channel;

use crate::datadir::{Credentials, DataDir};

pub struct Renewal {
    pub live: Arc<LiveCertificate>,
    pub ca_der: Vec<u8>,
    pub data: DataDir,
    /// Set on consensus members: issue locally.
    pub cluster: Option<Arc<Cluster>>,
    /// Where to look for the curator leader first; the saved cluster
    /// directory follows.
    pub curators: Vec<SocketAddr>,
    /// On nodes that run etcd: the member's directory, whose peer
    /// certificate is renewed too.
    pub etcd_dir: Option<PathBuf>,
}

/// Which certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Node,
    Peer,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Node => "node certificate",
            Kind::Peer => "etcd peer certificate",
        }
    }
}

impl Renewal {
    /// The certificates this node renews, as it holds them now (the peer
    /// certificate as etcd reads it; none if its file is gone).
    fn held(&self) -> Vec<(Kind, Arc<Certificate>)> {
        let mut held = vec![(Kind::Node, self.live.certificate())];
        if let Some(cert) = self
            .etcd_dir
            .as_deref()
            .and_then(crate::consensus::peer_certificate)
            .and_then(|der| metropolis_identity::parse_certificate(&der).ok())
        {
            held.push((Kind::Peer, Arc::new(cert)));
        }
        held
    }
}

/// How long to wait after a failed renewal: often enough to renew well
/// before the end, never a busy loop.
fn retry_delay(lifetime: Duration) -> Duration {
    (lifetime / 20).clamp(Duration::from_secs(1), Duration::from_secs(60))
}

/// How long from `now` until `at`, zero if it passed.
fn until(at: OffsetDateTime, now: OffsetDateTime) -> Duration {
    Duration::try_from(at - now).unwrap_or_default()
}

/// Renews each certificate whenever it is due, for as long as the node
/// runs. Each due certificate is tried in every round, so one that cannot
/// be renewed (no curator leader for the peer certificate, say) does not
/// hold up the other.
pub async fn run(r: Renewal) {
    let mut attempt = 0usize;
    loop {
        let held = r.held();
        let now = OffsetDateTime::now_utc();
        let next = held.iter().map(|(_, c)| c.renew_at()).min().unwrap_or(now);
        if next > now {
            tracing::debug!(
                renew_at = %metropolis_identity::rfc3339(next),
                "certificate renewal scheduled"
            );
            tokio::time::sleep(until(next, now)).await;
            continue;
        }
        let mut retry: Option<Duration> = None;
        for (kind, cert) in held.iter().filter(|(_, c)| c.renewal_due(now)) {
            attempt += 1;
            let renewed = match kind {
                Kind::Node => renew_node(&r, attempt).await,
                Kind::Peer => match &r.etcd_dir {
                    Some(dir) => renew_peer(&r, dir, attempt).await,
                    None => Ok(()),
                },
            };
            if let Err(e) = renewed {
                let delay = retry_delay(cert.lifetime());
                retry = Some(retry.map_or(delay, |d| d.min(delay)));
                let what = kind.name();
                if OffsetDateTime::now_utc() > cert.not_after {
                    tracing::warn!(
                        error = %format!("{e:#}"),
                        expired_at = %metropolis_identity::rfc3339(cert.not_after),
                        "cannot renew the expired {what}; retrying in {delay:?}"
                    );
                } else {
                    tracing::warn!(
                        error = %format!("{e:#}"),
                        expires_at = %metropolis_identity::rfc3339(cert.not_after),
                        "cannot renew the {what} yet; retrying in {delay:?}"
                    );
                }
            }
        }
        match retry {
            None => attempt = 0,
            Some(delay) => tokio::time::sleep(delay).await,
        }
    }
}

/// One node certificate renewal: issue (or ask), check, seal, serve.
async fn renew_node(r: &Renewal, attempt: usize) -> anyhow::Result<()> {
    let key = r.live.key().clone();
    let public = key.verifying_key().to_bytes();
    let id = metropolis_identity::node_id(&public);
    let der = match &r.cluster {
        Some(cluster) => cluster
            .renew_node_certificate(public, &id)
            .await
            .context("issuing from this node's curator")?,
        None => {
            let resp = NodeCuratorClient::new(leader(r, attempt).await?)
                .renew_node_certificate(RenewNodeCertificateRequest {
                    node_id: id.clone(),
                })
                .await
                .map_err(|s| anyhow::anyhow!("{}", metropolis_rpc::client::explain_status(&s)))?;
            resp.into_inner().node_certificate
        }
    };
    let cert = metropolis_identity::parse_certificate(&der)
        .context("the cluster sent an invalid node certificate")?;
    if cert.public_key != public || !cert.is_node_certificate() || cert.node_id() != id {
        bail!("the cluster sent a certificate that is not this node's");
    }
    metropolis_identity::verify_signed_by(&cert, &r.ca_der, OffsetDateTime::now_utc())
        .context("the new node certificate does not chain to the cluster CA")?;
    // Sealed before it is served: a crash in between restarts with the new
    // certificate, never with one the node did not keep.
    r.data.seal(&Credentials {
        key,
        node_certificate: der.clone(),
        ca_certificate: r.ca_der.clone(),
    })?;
    r.live.replace(der)?;
    tracing::info!(
        node = %id,
        serial = %hex::encode(&cert.serial),
        not_after = %metropolis_identity::rfc3339(cert.not_after),
        "renewed the node certificate"
    );
    Ok(())
}

/// One etcd peer certificate renewal: always at the curator leader (only
/// it writes node records; the new certificate goes into this node's
/// role), then checked and written where etcd reads it. When no leader can
/// be asked and the certificate has expired, a stopgap from the consensus
/// CA's key this member keeps (after an outage of every member past its
/// certificate's end, the members could never reach each other again
/// otherwise); never when the cluster answered and refused (the role was
/// taken away).
async fn renew_peer(r: &Renewal, dir: &Path, attempt: usize) -> anyhow::Result<()> {
    let id = metropolis_identity::node_id(&r.live.key().verifying_key().to_bytes());
    let asked = async {
        let answer = NodeCuratorClient::new(leader(r, attempt).await?)
            .renew_peer_certificate(RenewPeerCertificateRequest {
                node_id: id.clone(),
            })
            .await;
        anyhow::Ok(answer.map(|resp| resp.into_inner().peer_certificate))
    };
    let explain =
        |s: tonic::Status| anyhow::anyhow!("{}", metropolis_rpc::client::explain_status(&s));
    let asked = match asked.await {
        Ok(Ok(der)) => Ok(der),
        Ok(Err(s)) if s.code() == tonic::Code::PermissionDenied => return Err(explain(s)),
        Ok(Err(s)) => Err(explain(s)),
        Err(e) => Err(e),
    };
    let der = match asked {
        Ok(der) => der,
        Err(e) => match crate::consensus::stopgap_peer_certificate(dir)? {
            Some(der) => {
                tracing::warn!(
                    error = %format!("{e:#}"),
                    "the etcd peer certificate expired and the cluster cannot renew it; \
                     issued a short-lived stopgap from the consensus CA so that etcd can reach \
                     its peers again (the cluster renews it once it serves)"
                );
                der
            }
            None => return Err(e),
        },
    };
    let cert = crate::consensus::replace_peer_certificate(dir, &der)?;
    tracing::info!(
        node = %id,
        serial = %hex::encode(&cert.serial),
        not_after = %metropolis_identity::rfc3339(cert.not_after),
        "renewed the etcd peer certificate"
    );
    Ok(())
}

/// A channel to the curator leader, presenting the node certificate as it
/// is now (expired or not).
async fn leader(r: &Renewal, attempt: usize) -> anyhow::Result<Channel> {
    let mut endpoints = r.curators.clone();
    if let Some(dir) = r.data.directory()? {
        for e in crate::membership::directory_endpoints(&dir) {
            if !endpoints.contains(&e) {
                endpoints.push(e);
            }
        }
    }
    let tls = metropolis_identity::client_config_live(
        ServerTrust::ClusterCa {
            ca_der: r.ca_der.clone(),
            node_id: None,
        },
        Some(r.live.clone()),
    )?;
    let connected =
        metropolis_rpc::client::connect_leader(&endpoints, attempt.saturating_sub(1), tls).await?;
    Ok(connected.channel)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_are_bounded() {
        assert_eq!(retry_delay(Duration::from_secs(60)), Duration::from_secs(3));
        assert_eq!(
            retry_delay(Duration::from_secs(86_400 * 30)),
            Duration::from_secs(60)
        );
        assert_eq!(retry_delay(Duration::ZERO), Duration::from_secs(1));
        let now = OffsetDateTime::now_utc();
        assert_eq!(until(now - time::Duration::SECOND, now), Duration::ZERO);
        assert_eq!(
            until(now + time::Duration::SECOND, now),
            Duration::from_secs(1)
        );
    }
}

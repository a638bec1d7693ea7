//! Renewal of the node certificate: when a third of its lifetime is left,
//! the node gets a new one for the same key (and so the same node ID),
//! checks it, seals it into the data directory, and from then on presents it
//! in every new TLS handshake, as server and as client
//! ([`LiveCertificate`]); connections already open keep theirs.
//!
//! Consensus members issue it from the CA in the store they hold (no call:
//! this also serves a single-node cluster whose only node was offline past
//! its certificate's end, when no curator with a valid certificate exists);
//! other nodes ask the curator leader with NodeCurator.RenewNodeCertificate,
//! proving their key with the certificate they hold, expired or not.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use metropolis_api::admin::{RenewNodeCertificateRequest, node_curator_client::NodeCuratorClient};
use metropolis_curator::Cluster;
use metropolis_identity::{LiveCertificate, ServerTrust};
use time::OffsetDateTime;

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

/// Renews the certificate whenever it is due, for as long as the node runs.
pub async fn run(r: Renewal) {
    let mut attempt = 0usize;
    loop {
        let cert = r.live.certificate();
        let wait = until(cert.renew_at(), OffsetDateTime::now_utc());
        if !wait.is_zero() {
            tracing::debug!(
                renew_at = %metropolis_identity::rfc3339(cert.renew_at()),
                "node certificate renewal scheduled"
            );
            tokio::time::sleep(wait).await;
        }
        attempt += 1;
        match renew(&r, attempt).await {
            Ok(()) => attempt = 0,
            Err(e) => {
                let delay = retry_delay(cert.lifetime());
                let now = OffsetDateTime::now_utc();
                if now > cert.not_after {
                    tracing::warn!(
                        error = %format!("{e:#}"),
                        expired_at = %metropolis_identity::rfc3339(cert.not_after),
                        "cannot renew the expired node certificate; retrying in {delay:?}"
                    );
                } else {
                    tracing::warn!(
                        error = %format!("{e:#}"),
                        expires_at = %metropolis_identity::rfc3339(cert.not_after),
                        "cannot renew the node certificate yet; retrying in {delay:?}"
                    );
                }
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// One renewal: issue (or ask), check, seal, serve.
async fn renew(r: &Renewal, attempt: usize) -> anyhow::Result<()> {
    let key = r.live.key().clone();
    let public = key.verifying_key().to_bytes();
    let id = metropolis_identity::node_id(&public);
    let der = match &r.cluster {
        Some(cluster) => cluster
            .renew_node_certificate(public, &id)
            .await
            .context("issuing from this node's curator")?,
        None => ask(r, &id, attempt).await?,
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

/// NodeCurator.RenewNodeCertificate at the curator leader.
async fn ask(r: &Renewal, id: &str, attempt: usize) -> anyhow::Result<Vec<u8>> {
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
    let resp = NodeCuratorClient::new(connected.channel)
        .renew_node_certificate(RenewNodeCertificateRequest {
            node_id: id.to_string(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("{}", metropolis_rpc::client::explain_status(&s)))?;
    Ok(resp.into_inner().node_certificate)
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

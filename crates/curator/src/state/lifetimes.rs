//! Certificate lifetimes (cluster configuration) and node certificate
//! renewal.
//!
//! Every certificate the CA issues ends: node certificates after the
//! configured node lifetime, user certificates (Escrow) after the user
//! lifetime. Holders renew at a third of the lifetime left
//! (`metropolis_identity::Certificate::renew_at`): nodes through
//! NodeCurator.RenewNodeCertificate ([`Cluster::renew_node_certificate`]),
//! metroctl through Escrow again.

use std::time::Duration;

use super::*;

/// Node certificates when the configuration names no lifetime.
pub const DEFAULT_NODE_CERTIFICATE_LIFETIME: Duration = Duration::from_secs(30 * 86_400);
/// User certificates (Escrow) when the configuration names no lifetime.
pub const DEFAULT_USER_CERTIFICATE_LIFETIME: Duration = Duration::from_secs(7 * 86_400);
/// The shortest lifetime accepted: shorter ones would be renewed more often
/// than a node can be expected to reach the curator.
pub const MIN_CERTIFICATE_LIFETIME: Duration = Duration::from_secs(60);

/// ConfigureCluster's update_mask path of the node certificate lifetime.
pub const PATH_NODE_CERTIFICATE_LIFETIME: &str = "node_certificate_lifetime";
/// ConfigureCluster's update_mask path of the user certificate lifetime.
pub const PATH_USER_CERTIFICATE_LIFETIME: &str = "user_certificate_lifetime";

/// The lifetimes a configuration sets, with defaults for what it leaves out
/// (clusters made before certificates had lifetimes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetimes {
    pub node: Duration,
    pub user: Duration,
}

impl Lifetimes {
    pub fn of(cfg: &ClusterConfiguration) -> Self {
        let get = |d: &Option<prost_types::Duration>, default| {
            d.and_then(|d| Duration::try_from(d).ok())
                .filter(|d| !d.is_zero())
                .unwrap_or(default)
        };
        Lifetimes {
            node: get(
                &cfg.node_certificate_lifetime,
                DEFAULT_NODE_CERTIFICATE_LIFETIME,
            ),
            user: get(
                &cfg.user_certificate_lifetime,
                DEFAULT_USER_CERTIFICATE_LIFETIME,
            ),
        }
    }
}

/// Checks one lifetime of a configuration, `None` meaning "leave as is /
/// default": at least [`MIN_CERTIFICATE_LIFETIME`], at most `ca_remaining`
/// (what is left of the CA's validity: nothing it issues outlives it).
pub(super) fn check_lifetime(
    field: &str,
    value: Option<prost_types::Duration>,
    ca_remaining: Duration,
) -> Result<Option<prost_types::Duration>, CuratorError> {
    let Some(d) = value else { return Ok(None) };
    let std = Duration::try_from(d).map_err(|_| {
        CuratorError::InvalidArgument(format!(
            "{field} must be a positive duration, got {}s {}ns",
            d.seconds, d.nanos
        ))
    })?;
    if std < MIN_CERTIFICATE_LIFETIME {
        return Err(CuratorError::InvalidArgument(format!(
            "{field} {} is too short; the minimum is {}",
            human(std),
            human(MIN_CERTIFICATE_LIFETIME)
        )));
    }
    if std > ca_remaining {
        return Err(CuratorError::InvalidArgument(format!(
            "{field} {} is longer than what is left of the cluster CA's validity ({}); \
             certificates cannot outlive their CA",
            human(std),
            human(ca_remaining)
        )));
    }
    Ok(Some(d))
}

/// A duration as an operator writes it (`30days`, `1m`), to the second.
pub fn human(d: Duration) -> String {
    humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
}

/// Fills in default lifetimes and checks both against the CA's remaining
/// validity.
pub(super) fn settle_lifetimes(
    cfg: &mut ClusterConfiguration,
    ca_remaining: Duration,
) -> Result<(), CuratorError> {
    check_lifetime(
        PATH_NODE_CERTIFICATE_LIFETIME,
        cfg.node_certificate_lifetime,
        ca_remaining,
    )?;
    check_lifetime(
        PATH_USER_CERTIFICATE_LIFETIME,
        cfg.user_certificate_lifetime,
        ca_remaining,
    )?;
    let defaults = Lifetimes::of(cfg);
    let proto = |d: Duration| prost_types::Duration::try_from(d).unwrap_or_default();
    cfg.node_certificate_lifetime = Some(proto(defaults.node));
    cfg.user_certificate_lifetime = Some(proto(defaults.user));
    Ok(())
}

impl Cluster {
    /// The lifetimes of certificates issued now.
    pub async fn lifetimes(&self) -> Result<Lifetimes, CuratorError> {
        Ok(Lifetimes::of(&self.configuration().await?))
    }

    /// A new node certificate for the node `node_id`, whose key the caller
    /// proved it holds (`presented_key`, from the TLS handshake). The node
    /// must exist, be UP, and be that key's node; anything else is
    /// PERMISSION_DENIED, the same answer for a stranger, another node and a
    /// deleted node, so that the refusal tells an impostor nothing.
    /// Reads only: the certificate is not recorded (the node record, which
    /// authorizes every call, is what a deletion removes).
    pub async fn renew_node_certificate(
        &self,
        presented_key: [u8; 32],
        node_id: &str,
    ) -> Result<Vec<u8>, CuratorError> {
        let own_id = metropolis_identity::node_id(&presented_key);
        if own_id != node_id {
            return Err(CuratorError::PermissionDenied(format!(
                "the presented key is node {own_id}'s, not node {}'s; a node renews only its own certificate",
                quote(node_id)
            )));
        }
        let entry = self.node(node_id).await?.ok_or_else(|| {
            CuratorError::PermissionDenied(format!(
                "node {own_id} is not part of this cluster (deleted, or never admitted); \
                 it cannot get a certificate"
            ))
        })?;
        if entry.node.public_key != presented_key {
            return Err(CuratorError::PermissionDenied(format!(
                "node {own_id} belongs to another key"
            )));
        }
        if entry.node.state != NodeState::Up as i32 {
            return Err(CuratorError::PermissionDenied(format!(
                "node {own_id} is {}; only UP nodes hold certificates",
                state_name(entry.node.state)
            )));
        }
        let lifetime = self.lifetimes().await?.node;
        self.ca
            .issue_node_certificate(&presented_key, lifetime)
            .map_err(|e| CuratorError::Internal(format!("issuing node certificate: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: i64) -> Option<prost_types::Duration> {
        Some(prost_types::Duration {
            seconds: s,
            nanos: 0,
        })
    }

    #[test]
    fn lifetimes_are_bounded_by_the_minimum_and_the_ca() {
        let year = Duration::from_secs(365 * 86_400);
        assert!(check_lifetime("x", secs(59), year).is_err());
        assert_eq!(check_lifetime("x", secs(60), year).unwrap(), secs(60));
        assert!(check_lifetime("x", secs(-5), year).is_err());
        let err = check_lifetime("x", secs(366 * 86_400), year).unwrap_err();
        assert!(
            matches!(&err, CuratorError::InvalidArgument(m) if m.contains("CA")),
            "{err}"
        );
        assert_eq!(check_lifetime("x", None, year).unwrap(), None);

        let mut cfg = ClusterConfiguration::default();
        settle_lifetimes(&mut cfg, year).unwrap();
        assert_eq!(
            Lifetimes::of(&cfg),
            Lifetimes {
                node: DEFAULT_NODE_CERTIFICATE_LIFETIME,
                user: DEFAULT_USER_CERTIFICATE_LIFETIME
            }
        );
        assert_eq!(cfg.node_certificate_lifetime, secs(30 * 86_400));
    }

    #[tokio::test]
    async fn only_the_node_itself_renews_and_keeps_its_id() {
        let t = test_support::bootstrapped().await;
        let c = &t.cluster;
        let entry = c.node(&t.first_id).await.unwrap().unwrap();
        let key: [u8; 32] = entry.node.public_key.as_slice().try_into().unwrap();
        let der = c.renew_node_certificate(key, &t.first_id).await.unwrap();
        let cert = metropolis_identity::parse_certificate(&der).unwrap();
        assert_eq!(cert.node_id(), t.first_id);
        assert!(cert.is_node_certificate());
        assert_eq!(cert.lifetime(), DEFAULT_NODE_CERTIFICATE_LIFETIME);

        // Another node's ID, or a stranger's key claiming this node.
        let stranger = *metropolis_identity::generate_key()
            .verifying_key()
            .as_bytes();
        for (k, id) in [(stranger, t.first_id.as_str()), (key, "metropolis-0000")] {
            let err = c.renew_node_certificate(k, id).await.unwrap_err();
            assert!(matches!(err, CuratorError::PermissionDenied(_)), "{err}");
        }
        // A node the cluster does not know (deleted or never admitted).
        let id = metropolis_identity::node_id(&stranger);
        let err = c.renew_node_certificate(stranger, &id).await.unwrap_err();
        assert!(
            matches!(&err, CuratorError::PermissionDenied(m) if m.contains("not part")),
            "{err}"
        );
    }
}

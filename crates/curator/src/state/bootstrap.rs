//! Bootstrap: the first transaction of a cluster, and the configuration a
//! new cluster starts with.

use super::*;
use metropolis_api::quote;

/// What a node needs to bootstrap a new cluster.
#[derive(Debug, Clone)]
pub struct BootstrapRequest {
    pub owner_public_key: [u8; 32],
    pub initial_configuration: Option<ClusterConfiguration>,
    pub labels: NodeLabels,
    pub node_public_key: [u8; 32],
    /// The address the first node serves on, recorded as its external address.
    pub node_address: String,
    /// The first node's ConsensusMember role: empty on the embedded store;
    /// on etcd, its peer certificate and itself as the only peer.
    pub consensus_role: node_roles::ConsensusMember,
    /// The consensus CA (made beforehand on etcd, whose first member needs
    /// its peer certificate before the store exists); None makes a new one.
    pub consensus_pki: Option<crate::consensus::pki::ConsensusPki>,
}

/// Credentials the bootstrapping node keeps.
pub struct Bootstrapped {
    pub ca_certificate: Vec<u8>,
    pub node_certificate: Vec<u8>,
}

/// Fills in defaults and checks a configuration for a new cluster. This
/// implementation runs as a daemon on machines whose disks and TPMs it does
/// not manage, so it refuses settings it could not honour rather than
/// pretending to.
pub fn initial_configuration(
    cfg: Option<ClusterConfiguration>,
) -> Result<ClusterConfiguration, CuratorError> {
    let mut cfg = cfg.unwrap_or_default();
    if cfg.cluster_domain.is_empty() {
        cfg.cluster_domain = "cluster.local".into();
    }
    validate_domain(&cfg.cluster_domain)?;
    match TpmMode::try_from(cfg.tpm_mode) {
        Ok(TpmMode::Invalid) => cfg.tpm_mode = TpmMode::Disabled as i32,
        Ok(TpmMode::Disabled | TpmMode::BestEffort) => {}
        Ok(TpmMode::Required) => {
            return Err(CuratorError::InvalidArgument(
                "tpm_mode TPM_MODE_REQUIRED cannot be honoured: metropolis-node does not use a TPM; \
                 use TPM_MODE_BEST_EFFORT or TPM_MODE_DISABLED"
                    .into(),
            ));
        }
        Err(_) => {
            return Err(CuratorError::InvalidArgument(format!(
                "unknown tpm_mode {}",
                cfg.tpm_mode
            )));
        }
    }
    match StorageSecurityPolicy::try_from(cfg.storage_security_policy) {
        Ok(StorageSecurityPolicy::Invalid) => {
            cfg.storage_security_policy = StorageSecurityPolicy::Permissive as i32
        }
        Ok(StorageSecurityPolicy::Permissive | StorageSecurityPolicy::NeedsInsecure) => {}
        Ok(p) => {
            return Err(CuratorError::InvalidArgument(format!(
                "storage_security_policy {} cannot be honoured: metropolis-node does not encrypt its data \
                 directory; use STORAGE_SECURITY_POLICY_PERMISSIVE",
                p.as_str_name()
            )));
        }
        Err(_) => {
            return Err(CuratorError::InvalidArgument(format!(
                "unknown storage_security_policy {}",
                cfg.storage_security_policy
            )));
        }
    }
    Ok(cfg)
}

fn validate_domain(d: &str) -> Result<(), CuratorError> {
    let ok = d.len() <= 253
        && d.split('.').all(|p| {
            !p.is_empty()
                && p.len() <= 63
                && p.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !p.starts_with('-')
                && !p.ends_with('-')
        });
    if ok {
        Ok(())
    } else {
        Err(CuratorError::InvalidArgument(format!(
            "cluster_domain {} is not a valid DNS name",
            quote(d)
        )))
    }
}

/// Writes the initial state of a new cluster in one transaction that fails if
/// the store already holds a cluster, so a second bootstrap can never replace
/// an existing CA or owner.
pub async fn bootstrap(
    store: &dyn Store,
    req: BootstrapRequest,
) -> Result<Bootstrapped, CuratorError> {
    let ca = CertificateAuthority::generate()
        .map_err(|e| CuratorError::Internal(format!("generating CA: {e}")))?;
    bootstrap_with_ca(store, req, &ca).await
}

/// [`bootstrap`] with a CA made beforehand: an etcd-backed cluster needs the
/// CA for etcd's peer certificates before the store exists.
pub async fn bootstrap_with_ca(
    store: &dyn Store,
    req: BootstrapRequest,
    ca: &CertificateAuthority,
) -> Result<Bootstrapped, CuratorError> {
    let config = initial_configuration(req.initial_configuration)?;
    let node_certificate = ca
        .issue_node_certificate(&req.node_public_key)
        .map_err(|e| CuratorError::Internal(format!("issuing node certificate: {e}")))?;
    let node_id = metropolis_identity::node_id(&req.node_public_key);
    let node = private::Node {
        public_key: req.node_public_key.to_vec(),
        state: NodeState::Up as i32,
        roles: Some(NodeRoles {
            consensus_member: Some(req.consensus_role),
            ..Default::default()
        }),
        status: Some(NodeStatus {
            external_address: req.node_address,
            ..Default::default()
        }),
        labels: Some(req.labels),
        registered_at: Some(prost_types::Timestamp::from(std::time::SystemTime::now())),
        decommission_requested: false,
        tpm_usage: NodeTpmUsage::NotPresent as i32,
        clusternet: None,
    };
    let ca_record = private::ClusterCa {
        certificate: ca.cert_der().to_vec(),
        key_seed: ca.key_seed().to_vec(),
    };
    let pki = match req.consensus_pki {
        Some(pki) => pki,
        None => crate::consensus::pki::ConsensusPki::generate()?,
    };
    let (_, pki_ops) = pki.write()?;
    let txn = Txn::new()
        .when(Compare::absent(KEY_CA))
        .and_then(Op::put(KEY_CA, ca_record.encode_to_vec()))
        .and_then(Op::put(KEY_OWNER, req.owner_public_key.to_vec()))
        .and_then(Op::put(KEY_CONFIG, config.encode_to_vec()))
        .and_then(Op::put(KEY_TICKET, random_ticket()))
        .and_then(Op::put(node_key(&node_id), node.encode_to_vec()));
    let txn = pki_ops.into_iter().fold(txn, Txn::and_then);
    if !store.txn(txn).await?.succeeded {
        return Err(CuratorError::AlreadyExists(
            "the consensus store already holds a cluster; refusing to bootstrap over it".into(),
        ));
    }
    Ok(Bootstrapped {
        ca_certificate: ca.cert_der().to_vec(),
        node_certificate,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> BootstrapRequest {
        BootstrapRequest {
            owner_public_key: [7; 32],
            initial_configuration: None,
            labels: NodeLabels::default(),
            node_public_key: *metropolis_identity::generate_key()
                .verifying_key()
                .as_bytes(),
            node_address: "127.0.0.2".into(),
            consensus_role: Default::default(),
            consensus_pki: None,
        }
    }

    #[tokio::test]
    async fn bootstrap_writes_state_once() {
        let (_dir, store, _) = test_support::store().await;
        let req = request();
        let out = bootstrap(store.as_ref(), req.clone())
            .await
            .expect("bootstrap");
        let cluster = Cluster::open(store.clone()).await.expect("open cluster");
        assert_eq!(cluster.ca().cert_der(), out.ca_certificate.as_slice());
        assert_eq!(cluster.owner_public_key().await.expect("owner"), [7; 32]);
        let cfg = cluster.configuration().await.expect("config");
        assert_eq!(cfg.cluster_domain, "cluster.local");
        assert_eq!(cfg.tpm_mode, TpmMode::Disabled as i32);
        assert!(cluster.register_ticket().await.expect("ticket").len() >= 16);
        let nodes = cluster.nodes().await.expect("nodes");
        assert_eq!(nodes.len(), 1);
        assert_eq!(
            nodes[0].id,
            metropolis_identity::node_id(&req.node_public_key)
        );
        assert_eq!(nodes[0].node.state, NodeState::Up as i32);
        let dir_nodes = cluster.directory().await.expect("directory").nodes;
        assert_eq!(dir_nodes[0].addresses[0].host, "127.0.0.2");

        let again = bootstrap(store.as_ref(), request()).await;
        assert!(matches!(again, Err(CuratorError::AlreadyExists(_))));
        assert_eq!(
            Cluster::open(store).await.expect("reopen").ca().cert_der(),
            out.ca_certificate.as_slice()
        );
    }

    #[tokio::test]
    async fn ticket_regeneration_replaces_ticket() {
        let (_dir, store, _) = test_support::store().await;
        bootstrap(store.as_ref(), request())
            .await
            .expect("bootstrap");
        let cluster = Cluster::open(store).await.expect("open");
        let t1 = cluster.register_ticket().await.expect("t1");
        assert_eq!(cluster.register_ticket().await.expect("stable"), t1);
        let t2 = cluster.regenerate_register_ticket().await.expect("regen");
        assert_ne!(t1, t2);
        assert_eq!(cluster.register_ticket().await.expect("t2"), t2);
    }

    #[test]
    fn configuration_defaults_and_refusals() {
        let cfg = initial_configuration(None).expect("defaults");
        assert_eq!(
            cfg.storage_security_policy,
            StorageSecurityPolicy::Permissive as i32
        );
        let bad = ClusterConfiguration {
            tpm_mode: TpmMode::Required as i32,
            ..Default::default()
        };
        assert!(matches!(
            initial_configuration(Some(bad)),
            Err(CuratorError::InvalidArgument(_))
        ));
        let bad = ClusterConfiguration {
            cluster_domain: "Not A Domain".into(),
            ..Default::default()
        };
        assert!(initial_configuration(Some(bad)).is_err());
    }
}

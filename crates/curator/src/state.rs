//! Cluster state in the consensus store.
//!
//! Key layout (all values are protobuf-encoded unless noted):
//!
//! | key                 | value                                   |
//! |---------------------|-----------------------------------------|
//! | `/cluster/ca`       | `private.ClusterCA` (certificate + key) |
//! | `/cluster/owner`    | raw 32-byte owner public key            |
//! | `/cluster/config`   | `common.ClusterConfiguration`           |
//! | `/cluster/ticket`   | raw register ticket bytes               |
//! | `/nodes/<node id>`  | `private.Node`                          |
//!
//! Every change is a compare-and-swap transaction on the keys it read, so
//! concurrent curator calls (and, with etcd, several curators) never overwrite
//! each other's writes.

use std::sync::Arc;

use metropolis_api::common::{
    ClusterConfiguration, ClusterDirectory, NodeLabels, NodeRoles, NodeState, NodeStatus,
    NodeTpmUsage,
    cluster_configuration::{StorageSecurityPolicy, TpmMode},
    cluster_directory, node_roles,
};
use metropolis_api::private;
use metropolis_identity::CertificateAuthority;
use metropolis_store::{Compare, Op, Store, Txn};
use prost::Message;
use rand::RngCore;

use crate::error::CuratorError;

pub const KEY_CA: &str = "/cluster/ca";
pub const KEY_OWNER: &str = "/cluster/owner";
pub const KEY_CONFIG: &str = "/cluster/config";
pub const KEY_TICKET: &str = "/cluster/ticket";
pub const NODES_PREFIX: &str = "/nodes/";

/// Register tickets are this many random bytes.
pub const TICKET_LEN: usize = 32;

pub fn node_key(id: &str) -> String {
    format!("{NODES_PREFIX}{id}")
}

/// What a node needs to bootstrap a new cluster.
#[derive(Debug, Clone)]
pub struct BootstrapRequest {
    pub owner_public_key: [u8; 32],
    pub initial_configuration: Option<ClusterConfiguration>,
    pub labels: NodeLabels,
    pub node_public_key: [u8; 32],
    /// The address the first node serves on, recorded as its external address.
    pub node_address: String,
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
            "cluster_domain {d:?} is not a valid DNS name"
        )))
    }
}

fn random_ticket() -> Vec<u8> {
    let mut t = vec![0u8; TICKET_LEN];
    rand::rngs::OsRng.fill_bytes(&mut t);
    t
}

fn decode<M: Message + Default>(key: &str, bytes: &[u8]) -> Result<M, CuratorError> {
    M::decode(bytes).map_err(|e| CuratorError::Corrupt(format!("{key}: {e}")))
}

/// Writes the initial state of a new cluster in one transaction that fails if
/// the store already holds a cluster, so a second bootstrap can never replace
/// an existing CA or owner.
pub async fn bootstrap(
    store: &dyn Store,
    req: BootstrapRequest,
) -> Result<Bootstrapped, CuratorError> {
    let config = initial_configuration(req.initial_configuration)?;
    let ca = CertificateAuthority::generate()
        .map_err(|e| CuratorError::Internal(format!("generating CA: {e}")))?;
    let node_certificate = ca
        .issue_node_certificate(&req.node_public_key)
        .map_err(|e| CuratorError::Internal(format!("issuing node certificate: {e}")))?;
    let node_id = metropolis_identity::node_id(&req.node_public_key);
    let node = private::Node {
        public_key: req.node_public_key.to_vec(),
        state: NodeState::Up as i32,
        roles: Some(NodeRoles {
            consensus_member: Some(node_roles::ConsensusMember::default()),
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
    };
    let ca_record = private::ClusterCa {
        certificate: ca.cert_der().to_vec(),
        key_seed: ca.key_seed().to_vec(),
    };
    let txn = Txn::new()
        .when(Compare::absent(KEY_CA))
        .and_then(Op::put(KEY_CA, ca_record.encode_to_vec()))
        .and_then(Op::put(KEY_OWNER, req.owner_public_key.to_vec()))
        .and_then(Op::put(KEY_CONFIG, config.encode_to_vec()))
        .and_then(Op::put(KEY_TICKET, random_ticket()))
        .and_then(Op::put(node_key(&node_id), node.encode_to_vec()));
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

/// A node record as read, with the revision to compare against on write.
#[derive(Debug, Clone)]
pub struct NodeEntry {
    pub id: String,
    pub node: private::Node,
    pub mod_revision: i64,
}

/// The cluster as seen by a curator: typed access to the store.
pub struct Cluster {
    store: Arc<dyn Store>,
    ca: CertificateAuthority,
}

impl Cluster {
    /// Opens the cluster held in `store`; fails if it was never bootstrapped.
    pub async fn open(store: Arc<dyn Store>) -> Result<Arc<Cluster>, CuratorError> {
        let kv = store.get(KEY_CA.as_bytes()).await?.ok_or_else(|| {
            CuratorError::FailedPrecondition("the consensus store holds no cluster (no CA)".into())
        })?;
        let rec: private::ClusterCa = decode(KEY_CA, &kv.value)?;
        let seed: [u8; 32] =
            rec.key_seed.as_slice().try_into().map_err(|_| {
                CuratorError::Corrupt(format!("{KEY_CA}: key seed is not 32 bytes"))
            })?;
        let ca = CertificateAuthority::from_parts(rec.certificate, seed)
            .map_err(|e| CuratorError::Corrupt(format!("{KEY_CA}: {e}")))?;
        Ok(Arc::new(Cluster { store, ca }))
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn ca(&self) -> &CertificateAuthority {
        &self.ca
    }

    pub async fn owner_public_key(&self) -> Result<[u8; 32], CuratorError> {
        let kv = self
            .store
            .get(KEY_OWNER.as_bytes())
            .await?
            .ok_or_else(|| CuratorError::Corrupt(format!("{KEY_OWNER} missing")))?;
        kv.value
            .as_slice()
            .try_into()
            .map_err(|_| CuratorError::Corrupt(format!("{KEY_OWNER} is not 32 bytes")))
    }

    pub async fn configuration(&self) -> Result<ClusterConfiguration, CuratorError> {
        let kv = self
            .store
            .get(KEY_CONFIG.as_bytes())
            .await?
            .ok_or_else(|| CuratorError::Corrupt(format!("{KEY_CONFIG} missing")))?;
        decode(KEY_CONFIG, &kv.value)
    }

    pub async fn register_ticket(&self) -> Result<Vec<u8>, CuratorError> {
        let kv = self
            .store
            .get(KEY_TICKET.as_bytes())
            .await?
            .ok_or_else(|| CuratorError::Corrupt(format!("{KEY_TICKET} missing")))?;
        Ok(kv.value)
    }

    /// Replaces the register ticket; the old one stops working with this
    /// write.
    pub async fn regenerate_register_ticket(&self) -> Result<Vec<u8>, CuratorError> {
        let ticket = random_ticket();
        self.store
            .txn(Txn::new().and_then(Op::put(KEY_TICKET, ticket.clone())))
            .await?;
        Ok(ticket)
    }

    pub async fn node(&self, id: &str) -> Result<Option<NodeEntry>, CuratorError> {
        let key = node_key(id);
        match self.store.get(key.as_bytes()).await? {
            Some(kv) => Ok(Some(NodeEntry {
                id: id.to_string(),
                node: decode(&key, &kv.value)?,
                mod_revision: kv.mod_revision,
            })),
            None => Ok(None),
        }
    }

    pub async fn nodes(&self) -> Result<Vec<NodeEntry>, CuratorError> {
        let range = self.store.range(NODES_PREFIX.as_bytes()).await?;
        range
            .kvs
            .into_iter()
            .map(|kv| {
                let key = String::from_utf8_lossy(&kv.key).into_owned();
                let id = key.trim_start_matches(NODES_PREFIX).to_string();
                Ok(NodeEntry {
                    id,
                    node: decode(&key, &kv.value)?,
                    mod_revision: kv.mod_revision,
                })
            })
            .collect()
    }

    /// Every UP node with a known address, for clients to find the cluster.
    pub async fn directory(&self) -> Result<ClusterDirectory, CuratorError> {
        let nodes = self
            .nodes()
            .await?
            .into_iter()
            .filter(|e| e.node.state == NodeState::Up as i32)
            .filter_map(|e| {
                let addr = e
                    .node
                    .status
                    .as_ref()
                    .map(|s| s.external_address.clone())
                    .filter(|a| !a.is_empty())?;
                Some(cluster_directory::Node {
                    id: e.id,
                    addresses: vec![cluster_directory::node::Address { host: addr }],
                })
            })
            .collect();
        Ok(ClusterDirectory { nodes })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metropolis_store::EmbeddedStore;

    fn request() -> BootstrapRequest {
        BootstrapRequest {
            owner_public_key: [7; 32],
            initial_configuration: None,
            labels: NodeLabels::default(),
            node_public_key: *metropolis_identity::generate_key()
                .verifying_key()
                .as_bytes(),
            node_address: "127.0.0.2".into(),
        }
    }

    #[tokio::test]
    async fn bootstrap_writes_state_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn Store> = EmbeddedStore::open(&dir.path().join("db"))
            .await
            .expect("open");
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
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn Store> = EmbeddedStore::open(&dir.path().join("db"))
            .await
            .expect("open");
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

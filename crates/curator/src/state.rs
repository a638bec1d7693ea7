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
use metropolis_store::{Compare, Consensus, Op, Store, Txn};
use prost::Message;
use rand::RngCore;

use crate::consensus::Liveness;
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
    /// The first node's ConsensusMember role: empty on the embedded store;
    /// on etcd, its peer certificate and itself as the only peer.
    pub consensus_role: node_roles::ConsensusMember,
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
    /// Creation revision of this curator's leader key while it leads: every
    /// write compares it, so a deposed leader cannot commit (see `leader`).
    fence: crate::leader::Fence,
    /// Lets code acting for this curator hand leadership to another member
    /// (see `consensus`); the node's election watches it.
    step_down: Arc<crate::leader::StepDown>,
    /// Membership of the etcd cluster behind `store`; None on the embedded
    /// store, which has exactly one member.
    consensus: Option<Arc<dyn Consensus>>,
    /// The node this curator runs on, when it is one of several.
    node_id: Option<String>,
    /// The owner key, once read. Written only by bootstrap, in the same
    /// transaction as the CA, and never again: the authorizer asks for it on
    /// every owner call, and it cannot go stale.
    owner_key: std::sync::OnceLock<[u8; 32]>,
    /// The register ticket as last read. Only a first guess: a registration
    /// whose ticket matches it still commits only if the store holds the same
    /// ticket (the transaction compares it), and one that does not match it
    /// reads the store again.
    ticket: std::sync::Mutex<Option<Vec<u8>>>,
    /// Node records as this curator last wrote them (see [`RecentNodes`]).
    recent: std::sync::Mutex<RecentNodes>,
}

/// Node records this curator wrote recently, with the revision each was
/// written at: a node's next change (approval after registration, commit
/// after approval) usually follows within moments, and starting from the
/// record just written spares it a store read.
///
/// Only ever a starting point for a compare-and-swap. A write based on a
/// remembered record compares the key's mod revision with the remembered one,
/// so it commits only if the stored record is still exactly that one; any
/// other outcome (a refusal, nothing to change) is decided again on a fresh
/// read. Bounded; the oldest entries go first.
#[derive(Default)]
struct RecentNodes {
    records: std::collections::HashMap<String, (private::Node, i64)>,
    order: std::collections::VecDeque<String>,
}

/// Enough for every registration in flight (one per connection) several
/// times over; a few hundred KiB at most.
const RECENT_NODES: usize = 1024;

impl RecentNodes {
    fn get(&self, id: &str) -> Option<(private::Node, i64)> {
        self.records.get(id).cloned()
    }

    fn insert(&mut self, id: &str, node: private::Node, mod_revision: i64) {
        if self
            .records
            .insert(id.to_string(), (node, mod_revision))
            .is_none()
        {
            self.order.push_back(id.to_string());
        }
        while self.records.len() > RECENT_NODES {
            match self.order.pop_front() {
                Some(old) => {
                    self.records.remove(&old);
                }
                None => break,
            }
        }
    }

    fn remove(&mut self, id: &str) {
        // The id stays in `order` until it comes up; removing a missing key
        // then is harmless, and re-inserting it meanwhile only makes it go a
        // little early.
        self.records.remove(id);
    }
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
        Ok(Arc::new(Cluster {
            store,
            ca,
            fence: crate::leader::Fence::default(),
            step_down: Arc::default(),
            consensus: None,
            node_id: None,
            owner_key: std::sync::OnceLock::new(),
            ticket: std::sync::Mutex::new(None),
            recent: std::sync::Mutex::new(RecentNodes::default()),
        }))
    }

    /// Opens the cluster held in an etcd cluster whose membership this
    /// curator manages (ConsensusMember role changes).
    pub async fn open_replicated(
        store: Arc<dyn Store>,
        consensus: Arc<dyn Consensus>,
        node_id: String,
    ) -> Result<Arc<Cluster>, CuratorError> {
        let opened = Cluster::open(store).await?;
        let mut cluster = Arc::try_unwrap(opened)
            .map_err(|_| CuratorError::Internal("cluster handle shared while opening".into()))?;
        cluster.consensus = Some(consensus);
        cluster.node_id = Some(node_id);
        Ok(Arc::new(cluster))
    }

    pub fn consensus(&self) -> Option<&Arc<dyn Consensus>> {
        self.consensus.as_ref()
    }

    pub(crate) fn node_id(&self) -> Option<&str> {
        self.node_id.as_deref()
    }

    /// From now on, writes commit only while the leader key created at
    /// `key_revision` exists (this curator leads).
    pub fn set_fence(&self, key_revision: i64) {
        self.fence.set(key_revision);
        // Another leader may have written in between; remembered records
        // would only cost failed transactions.
        *self.recent_nodes() = RecentNodes::default();
    }

    fn recent_nodes(&self) -> std::sync::MutexGuard<'_, RecentNodes> {
        self.recent.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What every write of cluster state is fenced with, for the writers
    /// outside this type (identities).
    pub fn fence(&self) -> &crate::leader::Fence {
        &self.fence
    }

    /// For the election of the curator using this cluster handle.
    pub fn step_down(&self) -> &Arc<crate::leader::StepDown> {
        &self.step_down
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Every write of cluster state goes through here, so one failpoint
    /// (`curator::store_commit`, debug builds) can fail or delay them all.
    async fn commit(&self, txn: Txn) -> Result<metropolis_store::TxnResponse, CuratorError> {
        fail::fail_point!("curator::store_commit", |arg| {
            if arg.as_deref() == Some("crash") {
                std::process::abort();
            }
            Err(CuratorError::Internal(
                "failpoint curator::store_commit".into(),
            ))
        });
        self.fence.commit(self.store.as_ref(), txn).await
    }

    pub fn ca(&self) -> &CertificateAuthority {
        &self.ca
    }

    pub async fn owner_public_key(&self) -> Result<[u8; 32], CuratorError> {
        if let Some(key) = self.owner_key.get() {
            return Ok(*key);
        }
        let kv = self
            .store
            .get(KEY_OWNER.as_bytes())
            .await?
            .ok_or_else(|| CuratorError::Corrupt(format!("{KEY_OWNER} missing")))?;
        let key: [u8; 32] = kv
            .value
            .as_slice()
            .try_into()
            .map_err(|_| CuratorError::Corrupt(format!("{KEY_OWNER} is not 32 bytes")))?;
        // Concurrent first reads all read the same immutable value; whichever
        // sets it first wins.
        Ok(*self.owner_key.get_or_init(|| key))
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
        self.commit(Txn::new().and_then(Op::put(KEY_TICKET, ticket.clone())))
            .await?;
        // Not needed for correctness (registrations compare the stored
        // ticket), but spares the next registration a failed transaction.
        self.forget_ticket();
        Ok(ticket)
    }

    fn cached_ticket(&self) -> Option<Vec<u8>> {
        self.ticket
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn remember_ticket(&self, ticket: &[u8]) {
        *self.ticket.lock().unwrap_or_else(|p| p.into_inner()) = Some(ticket.to_vec());
    }

    fn forget_ticket(&self) {
        *self.ticket.lock().unwrap_or_else(|p| p.into_inner()) = None;
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

/// Outcome of a read-modify-write on a node record.
pub enum Change<T> {
    /// Write the modified record and return `T`.
    Write(T),
    /// Leave the record as it is and return `T`.
    Keep(T),
}

/// How often a compare-and-swap is retried when another writer got there
/// first. Conflicts on one node's record are rare (the node itself and an
/// operator), so a small bound only guards against livelock.
const CAS_ATTEMPTS: usize = 16;

impl Cluster {
    /// Reads a node, lets `f` change it, and writes it back only if nobody
    /// else wrote it in between; retries on conflict.
    pub async fn update_node<T>(
        &self,
        id: &str,
        mut f: impl FnMut(&mut private::Node) -> Result<Change<T>, CuratorError>,
    ) -> Result<T, CuratorError> {
        let key = node_key(id);
        let mut remembered = self.recent_nodes().get(id);
        for _ in 0..CAS_ATTEMPTS {
            let from_memory = remembered.is_some();
            let (mut node, mod_revision) = match remembered.take() {
                Some(r) => r,
                None => {
                    let entry = self
                        .node(id)
                        .await?
                        .ok_or_else(|| CuratorError::NotFound(format!("node {id} not found")))?;
                    (entry.node, entry.mod_revision)
                }
            };
            let out = match f(&mut node) {
                Ok(Change::Write(out)) => out,
                // Only a write is checked against the store (by the compare
                // below); a refusal or a no-op decided on a remembered record
                // is decided again on what the store holds now.
                _ if from_memory => continue,
                Ok(Change::Keep(out)) => return Ok(out),
                Err(e) => return Err(e),
            };
            let txn = Txn::new()
                .when(Compare::mod_revision(key.clone(), mod_revision))
                .and_then(Op::put(key.clone(), node.encode_to_vec()));
            match self.commit(txn).await {
                Ok(resp) if resp.succeeded => {
                    self.recent_nodes().insert(id, node, resp.revision);
                    return Ok(out);
                }
                Ok(_) => self.recent_nodes().remove(id),
                Err(e) => {
                    self.recent_nodes().remove(id);
                    return Err(e);
                }
            }
        }
        Err(CuratorError::Internal(format!(
            "node {id} kept changing; gave up after {CAS_ATTEMPTS} attempts"
        )))
    }

    /// Adds a node in state NEW if the ticket is right. Registering again
    /// with the same key is a no-op.
    ///
    /// One transaction decides: the ticket, the node key and the node's
    /// tombstone are all compared in it, and when it fails it reads all three
    /// (at the same revision) to say why.
    pub async fn register_node(
        &self,
        public_key: [u8; 32],
        ticket: &[u8],
        labels: NodeLabels,
    ) -> Result<String, CuratorError> {
        let id = metropolis_identity::node_id(&public_key);
        let key = node_key(&id);
        let tombstone = tombstone_key(&id);
        // A ticket that matches the one last read is compared by the
        // transaction below; anything else is checked against the store, so
        // a stale guess never refuses a right ticket.
        let current = match self.cached_ticket() {
            Some(t) if constant_time_eq(&t, ticket) => t,
            _ => {
                let t = self.register_ticket().await?;
                self.remember_ticket(&t);
                t
            }
        };
        if !constant_time_eq(&current, ticket) {
            return Err(CuratorError::PermissionDenied(
                "wrong register ticket; get the current one with `metroctl install params --register`".into(),
            ));
        }
        let node = private::Node {
            public_key: public_key.to_vec(),
            state: NodeState::New as i32,
            labels: Some(labels),
            registered_at: Some(prost_types::Timestamp::from(std::time::SystemTime::now())),
            tpm_usage: NodeTpmUsage::NotPresent as i32,
            ..Default::default()
        };
        // All conditions in one transaction: a ticket regenerated or a node
        // deleted between our read and this write makes the registration fail.
        let txn = Txn::new()
            .when(Compare::value_equals(KEY_TICKET, current))
            .when(Compare::absent(key.clone()))
            .when(Compare::absent(tombstone.clone()))
            .and_then(Op::put(key.clone(), node.encode_to_vec()))
            .or_else(Op::get(tombstone))
            .or_else(Op::get(key.clone()))
            .or_else(Op::get(KEY_TICKET));
        let resp = self.commit(txn).await?;
        if resp.succeeded {
            self.recent_nodes().insert(&id, node, resp.revision);
            return Ok(id);
        }
        let mut found = resp.results.into_iter().map(|r| match r {
            metropolis_store::OpResult::Get(kvs) => kvs.into_iter().next(),
            _ => None,
        });
        let (deleted, existing, stored_ticket) = (found.next(), found.next(), found.next());
        let (Some(deleted), Some(existing), Some(stored_ticket)) =
            (deleted, existing, stored_ticket)
        else {
            return Err(CuratorError::Internal(
                "the store answered a failed registration without the reads it asked for".into(),
            ));
        };
        if deleted.is_some() {
            return Err(CuratorError::PermissionDenied(format!(
                "node {id} was removed from the cluster; a removed node cannot register again with the same key"
            )));
        }
        match existing {
            Some(kv) => {
                let existing: private::Node = decode(&key, &kv.value)?;
                if existing.public_key == public_key {
                    Ok(id)
                } else {
                    Err(CuratorError::AlreadyExists(format!(
                        "node ID {id} is taken by another key"
                    )))
                }
            }
            None => {
                match stored_ticket {
                    Some(kv) => self.remember_ticket(&kv.value),
                    None => self.forget_ticket(),
                }
                Err(CuratorError::PermissionDenied(
                    "the register ticket was regenerated; get the new one".into(),
                ))
            }
        }
    }

    /// NEW → STANDBY; a no-op for STANDBY and UP nodes.
    pub async fn approve_node(&self, id: &str) -> Result<(), CuratorError> {
        self.update_node(id, |node| match NodeState::try_from(node.state) {
            Ok(NodeState::New) => {
                node.state = NodeState::Standby as i32;
                Ok(Change::Write(()))
            }
            Ok(NodeState::Standby | NodeState::Up) => Ok(Change::Keep(())),
            _ => Err(CuratorError::FailedPrecondition(format!(
                "node {id} is {} and cannot be approved",
                state_name(node.state)
            ))),
        })
        .await
    }

    /// STANDBY → UP and the node's certificate. Also answers an UP node
    /// again (a node that crashed before it could seal its credentials).
    pub async fn commit_node(&self, public_key: [u8; 32]) -> Result<Vec<u8>, CuratorError> {
        let id = metropolis_identity::node_id(&public_key);
        self.update_node(&id, |node| {
            if node.public_key != public_key {
                return Err(CuratorError::PermissionDenied(format!(
                    "node ID {id} belongs to another key"
                )));
            }
            match NodeState::try_from(node.state) {
                Ok(NodeState::Standby) => {
                    node.state = NodeState::Up as i32;
                    Ok(Change::Write(()))
                }
                Ok(NodeState::Up) => Ok(Change::Keep(())),
                Ok(NodeState::New) => Err(CuratorError::FailedPrecondition(format!(
                    "node {id} is waiting for approval (metroctl node approve {id})"
                ))),
                _ => Err(CuratorError::FailedPrecondition(format!(
                    "node {id} is {} and cannot join",
                    state_name(node.state)
                ))),
            }
        })
        .await?;
        self.ca
            .issue_node_certificate(&public_key)
            .map_err(|e| CuratorError::Internal(format!("issuing node certificate: {e}")))
    }

    /// Records a node's status; a write only when something changed.
    pub async fn update_status(&self, id: &str, status: NodeStatus) -> Result<(), CuratorError> {
        self.update_node(id, |node| {
            let mut next = status.clone();
            if next.timestamp.is_none() {
                next.timestamp = Some(prost_types::Timestamp::from(std::time::SystemTime::now()));
            }
            let unchanged = node.status.as_ref().is_some_and(|cur| {
                let mut a = cur.clone();
                let mut b = next.clone();
                a.timestamp = None;
                b.timestamp = None;
                a == b
            });
            if unchanged {
                return Ok(Change::Keep(()));
            }
            node.status = Some(next);
            Ok(Change::Write(()))
        })
        .await
    }
}

pub fn state_name(state: i32) -> &'static str {
    NodeState::try_from(state)
        .map(|s| s.as_str_name())
        .unwrap_or("NODE_STATE_UNKNOWN_VALUE")
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A fresh cluster for the curator's unit tests.
#[cfg(test)]
pub(crate) mod test_support {
    use super::*;
    use metropolis_store::EmbeddedStore;
    use metropolis_store::testing::{EtcdServer, Listen};

    /// Keeps a test store's backing alive: a temp dir, or an etcd server.
    pub(crate) enum Backing {
        Dir(#[allow(dead_code)] tempfile::TempDir),
        Etcd(#[allow(dead_code)] EtcdServer),
    }

    /// A fresh, empty store for one test. The whole curator suite runs on
    /// the embedded store by default and on a real etcd with
    /// `METROPOLIS_TEST_STORE=etcd` (scripts/test runs both).
    pub(crate) async fn store() -> (Backing, Arc<dyn Store>, Option<Arc<dyn Consensus>>) {
        match std::env::var("METROPOLIS_TEST_STORE").as_deref() {
            Ok("etcd") => {
                let server = EtcdServer::start(Listen::Unix).await;
                let store = server.connect().await;
                (Backing::Etcd(server), store.clone(), Some(store))
            }
            Ok("embedded") | Err(_) => {
                let dir = tempfile::tempdir().expect("tempdir");
                let store: Arc<dyn Store> = EmbeddedStore::open(&dir.path().join("db"))
                    .await
                    .expect("open");
                (Backing::Dir(dir), store, None)
            }
            Ok(other) => panic!("METROPOLIS_TEST_STORE={other:?}: use `embedded` or `etcd`"),
        }
    }

    pub(crate) struct TestCluster {
        /// Keeps the store alive.
        pub dir: Backing,
        pub store: Arc<dyn Store>,
        pub cluster: Arc<Cluster>,
        /// The bootstrap node.
        pub first_id: String,
    }

    /// A single-node cluster bootstrapped on a fresh test store.
    pub(crate) async fn bootstrapped() -> TestCluster {
        let (dir, store, consensus) = store().await;
        let key = metropolis_identity::generate_key()
            .verifying_key()
            .to_bytes();
        let first_id = metropolis_identity::node_id(&key);
        bootstrap(
            store.as_ref(),
            BootstrapRequest {
                owner_public_key: [7; 32],
                initial_configuration: None,
                labels: NodeLabels::default(),
                node_public_key: key,
                node_address: "127.0.0.2".into(),
                consensus_role: Default::default(),
            },
        )
        .await
        .expect("bootstrap");
        let cluster = match consensus {
            Some(c) => Cluster::open_replicated(store.clone(), c, first_id.clone()).await,
            None => Cluster::open(store.clone()).await,
        }
        .expect("open");
        TestCluster {
            dir,
            store,
            cluster,
            first_id,
        }
    }
}

#[cfg(test)]
mod register_tests {
    use super::*;

    async fn cluster() -> (test_support::Backing, Arc<Cluster>) {
        let t = test_support::bootstrapped().await;
        (t.dir, t.cluster)
    }

    #[tokio::test]
    async fn register_approve_commit() {
        let (_d, c) = cluster().await;
        let key = metropolis_identity::generate_key()
            .verifying_key()
            .to_bytes();
        let ticket = c.register_ticket().await.expect("ticket");
        let bad = c.register_node(key, b"wrong", NodeLabels::default()).await;
        assert!(matches!(bad, Err(CuratorError::PermissionDenied(_))));
        assert_eq!(
            c.nodes().await.expect("nodes").len(),
            1,
            "a refused registration changes nothing"
        );

        let id = c
            .register_node(key, &ticket, NodeLabels::default())
            .await
            .expect("register");
        assert_eq!(
            c.register_node(key, &ticket, NodeLabels::default())
                .await
                .expect("again"),
            id
        );
        assert_eq!(
            c.node(&id).await.expect("read").expect("node").node.state,
            NodeState::New as i32
        );
        assert!(matches!(
            c.commit_node(key).await,
            Err(CuratorError::FailedPrecondition(_))
        ));

        c.approve_node(&id).await.expect("approve");
        c.approve_node(&id).await.expect("approve is idempotent");
        assert_eq!(
            c.node(&id).await.expect("read").expect("node").node.state,
            NodeState::Standby as i32
        );
        let cert = c.commit_node(key).await.expect("commit");
        let parsed = metropolis_identity::parse_certificate(&cert).expect("cert");
        assert_eq!(parsed.common_name, id);
        assert_eq!(
            c.node(&id).await.expect("read").expect("node").node.state,
            NodeState::Up as i32
        );
        c.approve_node(&id).await.expect("approve of UP is a no-op");
        c.commit_node(key).await.expect("commit again re-issues");
        assert!(matches!(
            c.approve_node("metropolis-nope").await,
            Err(CuratorError::NotFound(_))
        ));

        let t2 = c.regenerate_register_ticket().await.expect("regen");
        let other = metropolis_identity::generate_key()
            .verifying_key()
            .to_bytes();
        assert!(matches!(
            c.register_node(other, &ticket, NodeLabels::default()).await,
            Err(CuratorError::PermissionDenied(_))
        ));
        c.register_node(other, &t2, NodeLabels::default())
            .await
            .expect("new ticket works");
    }

    /// Writes behind the curator's back (another leader, an operator with
    /// etcdctl): what the curator remembers must never decide on its own.
    #[tokio::test]
    async fn remembered_records_and_ticket_are_only_guesses() {
        let (_d, c) = cluster().await;
        let put = |key: String, value: Vec<u8>| {
            let store = c.store().clone();
            async move {
                store
                    .txn(Txn::new().and_then(Op::put(key, value)))
                    .await
                    .expect("direct write");
            }
        };
        let ticket = c.register_ticket().await.expect("ticket");
        let register = |ticket: Vec<u8>| {
            let c = c.clone();
            async move {
                let key = metropolis_identity::generate_key()
                    .verifying_key()
                    .to_bytes();
                let r = c.register_node(key, &ticket, NodeLabels::default()).await;
                (key, r)
            }
        };

        // Decommissioned behind our back: approving must see it.
        let (_, id) = register(ticket.clone()).await;
        let id = id.expect("register");
        let mut node = c.node(&id).await.expect("read").expect("node").node;
        node.state = NodeState::Decommissioned as i32;
        put(node_key(&id), node.encode_to_vec()).await;
        assert!(matches!(
            c.approve_node(&id).await,
            Err(CuratorError::FailedPrecondition(_))
        ));

        // Labelled behind our back: approving keeps the label.
        let (key, id) = register(ticket.clone()).await;
        let id = id.expect("register");
        let mut node = c.node(&id).await.expect("read").expect("node").node;
        node.labels = Some(NodeLabels {
            pairs: vec![metropolis_api::common::node_labels::Pair {
                key: "k".into(),
                value: "v".into(),
            }],
        });
        put(node_key(&id), node.encode_to_vec()).await;
        c.approve_node(&id).await.expect("approve");
        c.commit_node(key).await.expect("commit");
        let node = c.node(&id).await.expect("read").expect("node").node;
        assert_eq!(node.state, NodeState::Up as i32);
        assert_eq!(node.labels.map(|l| l.pairs.len()), Some(1));

        // A ticket regenerated behind our back: the old one stops working,
        // the new one works at once.
        let t2 = random_ticket();
        put(KEY_TICKET.into(), t2.clone()).await;
        let (_, r) = register(ticket.clone()).await;
        assert!(
            matches!(r, Err(CuratorError::PermissionDenied(ref m)) if m.contains("regenerated")),
            "{r:?}"
        );
        register(t2.clone()).await.1.expect("new ticket");

        // A tombstone written after the ticket was remembered still refuses.
        let key = metropolis_identity::generate_key()
            .verifying_key()
            .to_bytes();
        let id = metropolis_identity::node_id(&key);
        put(tombstone_key(&id), key.to_vec()).await;
        let r = c.register_node(key, &t2, NodeLabels::default()).await;
        assert!(
            matches!(r, Err(CuratorError::PermissionDenied(ref m)) if m.contains("removed")),
            "{r:?}"
        );
        assert!(c.node(&id).await.expect("read").is_none());
    }

    #[tokio::test]
    async fn status_is_written_only_on_change() {
        let (_d, c) = cluster().await;
        let id = c.nodes().await.expect("nodes")[0].id.clone();
        let status = NodeStatus {
            external_address: "127.0.0.9".into(),
            ..Default::default()
        };
        c.update_status(&id, status.clone()).await.expect("update");
        let rev = c.node(&id).await.expect("read").expect("node").mod_revision;
        c.update_status(&id, status).await.expect("same again");
        assert_eq!(
            c.node(&id).await.expect("read").expect("node").mod_revision,
            rev
        );
        assert_eq!(
            c.directory().await.expect("dir").nodes[0].addresses[0].host,
            "127.0.0.9"
        );
    }
}

/// The one configuration path that may change after bootstrap.
pub const PATH_LABELS_TO_SYNC: &str = "kubernetes.node_labels_to_synchronize";

impl Cluster {
    /// Applies label upserts and deletes in one atomic change.
    pub async fn update_labels(
        &self,
        id: &str,
        upsert: Vec<(String, String)>,
        delete: Vec<String>,
    ) -> Result<(), CuratorError> {
        for (k, v) in &upsert {
            crate::labels::validate_key(k).map_err(CuratorError::InvalidArgument)?;
            crate::labels::validate_value(v).map_err(CuratorError::InvalidArgument)?;
        }
        for k in &delete {
            crate::labels::validate_key(k).map_err(CuratorError::InvalidArgument)?;
        }
        let mut seen = std::collections::HashSet::new();
        for (k, _) in &upsert {
            if !seen.insert(k.as_str()) {
                return Err(CuratorError::InvalidArgument(format!(
                    "label key {k:?} is upserted twice"
                )));
            }
        }
        if let Some(k) = delete.iter().find(|k| seen.contains(k.as_str())) {
            return Err(CuratorError::InvalidArgument(format!(
                "label key {k:?} is both upserted and deleted"
            )));
        }
        self.update_node(id, |node| {
            let labels = node.labels.get_or_insert_with(Default::default);
            let before = labels.clone();
            labels.pairs.retain(|p| !delete.contains(&p.key));
            for (k, v) in &upsert {
                match labels.pairs.iter_mut().find(|p| &p.key == k) {
                    Some(p) => p.value = v.clone(),
                    None => labels
                        .pairs
                        .push(metropolis_api::common::node_labels::Pair {
                            key: k.clone(),
                            value: v.clone(),
                        }),
                }
            }
            if labels.pairs.len() > crate::labels::MAX_LABELS {
                return Err(CuratorError::InvalidArgument(format!(
                    "node {id} would have {} labels; at most {} are allowed",
                    labels.pairs.len(),
                    crate::labels::MAX_LABELS
                )));
            }
            Ok(if *labels == before {
                Change::Keep(())
            } else {
                Change::Write(())
            })
        })
        .await
    }

    /// Changes the fields of the configuration named by `paths`, if the
    /// current values equal those in `base` (when given). Returns the
    /// resulting configuration.
    pub async fn configure(
        &self,
        base: Option<ClusterConfiguration>,
        new: ClusterConfiguration,
        paths: &[String],
    ) -> Result<ClusterConfiguration, CuratorError> {
        if paths.is_empty() {
            return Err(CuratorError::InvalidArgument(format!(
                "update_mask names no fields; the mutable field is {PATH_LABELS_TO_SYNC}"
            )));
        }
        for p in paths {
            if p != PATH_LABELS_TO_SYNC {
                return Err(CuratorError::InvalidArgument(format!(
                    "field {p:?} cannot be changed; the only mutable field is {PATH_LABELS_TO_SYNC}"
                )));
            }
        }
        let wanted = sync_regexps(&new);
        for r in &wanted {
            regex::Regex::new(r).map_err(|e| {
                CuratorError::InvalidArgument(format!("regexp {r:?} does not compile: {e}"))
            })?;
        }
        for _ in 0..CAS_ATTEMPTS {
            let kv = self
                .store
                .get(KEY_CONFIG.as_bytes())
                .await?
                .ok_or_else(|| CuratorError::Corrupt(format!("{KEY_CONFIG} missing")))?;
            let mut cfg: ClusterConfiguration = decode(KEY_CONFIG, &kv.value)?;
            if let Some(base) = &base
                && sync_regexps(base) != sync_regexps(&cfg)
            {
                return Err(CuratorError::FailedPrecondition(format!(
                    "{PATH_LABELS_TO_SYNC} is not what base_config says it is (someone changed it); \
                     read the configuration again and retry"
                )));
            }
            cfg.kubernetes
                .get_or_insert_with(Default::default)
                .node_labels_to_synchronize = new
                .kubernetes
                .clone()
                .unwrap_or_default()
                .node_labels_to_synchronize;
            let txn = Txn::new()
                .when(Compare::mod_revision(KEY_CONFIG, kv.mod_revision))
                .and_then(Op::put(KEY_CONFIG, cfg.encode_to_vec()));
            if self.commit(txn).await?.succeeded {
                return Ok(cfg);
            }
        }
        Err(CuratorError::Internal(
            "the configuration kept changing; gave up".into(),
        ))
    }
}

fn sync_regexps(cfg: &ClusterConfiguration) -> Vec<String> {
    cfg.kubernetes
        .as_ref()
        .map(|k| {
            k.node_labels_to_synchronize
                .iter()
                .map(|r| r.regexp.clone())
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod operate_tests {
    use super::*;
    use metropolis_api::common::cluster_configuration::{
        Kubernetes, kubernetes::NodeLabelsToSynchronize,
    };

    async fn cluster() -> (test_support::Backing, Arc<Cluster>, String) {
        let t = test_support::bootstrapped().await;
        (t.dir, t.cluster, t.first_id)
    }

    fn kv(k: &str, v: &str) -> (String, String) {
        (k.into(), v.into())
    }

    #[tokio::test]
    async fn labels_upsert_delete_and_validate() {
        let (_d, c, id) = cluster().await;
        c.update_labels(&id, vec![kv("zone", "a"), kv("rack", "1")], vec![])
            .await
            .expect("upsert");
        c.update_labels(&id, vec![kv("zone", "b")], vec!["rack".into()])
            .await
            .expect("mixed");
        let labels = c
            .node(&id)
            .await
            .expect("read")
            .expect("node")
            .node
            .labels
            .expect("labels");
        assert_eq!(labels.pairs.len(), 1);
        assert_eq!(
            (labels.pairs[0].key.as_str(), labels.pairs[0].value.as_str()),
            ("zone", "b")
        );
        for (upsert, delete) in [
            (vec![kv("bad key", "x")], vec![]),
            (vec![kv("zone", "-x")], vec![]),
            (vec![kv("zone", "a")], vec!["zone".to_string()]),
            (vec![kv("z", "a"), kv("z", "b")], vec![]),
            (vec![], vec!["/bad".to_string()]),
        ] {
            let r = c.update_labels(&id, upsert, delete).await;
            assert!(matches!(r, Err(CuratorError::InvalidArgument(_))), "{r:?}");
        }
        let many: Vec<_> = (0..129).map(|i| kv(&format!("k{i}"), "v")).collect();
        assert!(matches!(
            c.update_labels(&id, many, vec![]).await,
            Err(CuratorError::InvalidArgument(_))
        ));
        assert!(matches!(
            c.update_labels("metropolis-nope", vec![kv("a", "b")], vec![])
                .await,
            Err(CuratorError::NotFound(_))
        ));
    }

    fn sync(rs: &[&str]) -> ClusterConfiguration {
        ClusterConfiguration {
            kubernetes: Some(Kubernetes {
                node_labels_to_synchronize: rs
                    .iter()
                    .map(|r| NodeLabelsToSynchronize {
                        regexp: r.to_string(),
                    })
                    .collect(),
            }),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn configure_only_the_mutable_path_with_base_check() {
        let (_d, c, _) = cluster().await;
        let path = vec![PATH_LABELS_TO_SYNC.to_string()];
        let out = c
            .configure(None, sync(&["^zone$"]), &path)
            .await
            .expect("set");
        assert_eq!(sync_regexps(&out), vec!["^zone$"]);
        assert_eq!(
            out.cluster_domain, "cluster.local",
            "other fields untouched"
        );
        // A stale base fails and changes nothing.
        let stale = c.configure(Some(sync(&[])), sync(&["x"]), &path).await;
        assert!(matches!(stale, Err(CuratorError::FailedPrecondition(_))));
        assert_eq!(
            sync_regexps(&c.configuration().await.expect("cfg")),
            vec!["^zone$"]
        );
        c.configure(Some(sync(&["^zone$"])), sync(&["a.*", "b"]), &path)
            .await
            .expect("right base");
        let bad = c.configure(None, sync(&["("]), &path).await;
        assert!(matches!(bad, Err(CuratorError::InvalidArgument(_))));
        let other = c
            .configure(None, sync(&[]), &["cluster_domain".to_string()])
            .await;
        assert!(
            matches!(other, Err(CuratorError::InvalidArgument(ref m)) if m.contains("cluster_domain")),
            "{other:?}"
        );
        assert!(matches!(
            c.configure(None, sync(&[]), &[]).await,
            Err(CuratorError::InvalidArgument(_))
        ));
    }
}

/// Deleted nodes leave a tombstone so their key can never register again.
pub const TOMBSTONES_PREFIX: &str = "/tombstones/";

pub fn tombstone_key(id: &str) -> String {
    format!("{TOMBSTONES_PREFIX}{id}")
}

/// Requested role changes; `None` leaves a role as it is.
#[derive(Debug, Clone, Copy, Default)]
pub struct RoleChange {
    pub kubernetes_worker: Option<bool>,
    pub kubernetes_controller: Option<bool>,
    pub consensus_member: Option<bool>,
}

impl RoleChange {
    fn adds_any(&self) -> bool {
        [
            self.kubernetes_worker,
            self.kubernetes_controller,
            self.consensus_member,
        ]
        .contains(&Some(true))
    }
}

fn has_roles(node: &private::Node) -> bool {
    node.roles.as_ref().is_some_and(|r| {
        r.kubernetes_worker.is_some()
            || r.kubernetes_controller.is_some()
            || r.consensus_member.is_some()
    })
}

fn is_consensus_member(node: &private::Node) -> bool {
    node.roles
        .as_ref()
        .is_some_and(|r| r.consensus_member.is_some())
}

impl Cluster {
    /// Sets or clears roles. Controllers must be consensus members, roles go
    /// only to UP nodes, and the last consensus member keeps its role.
    ///
    /// On etcd, gaining ConsensusMember adds the node as an etcd learner and
    /// losing it removes its etcd member first (see `consensus`); `live`
    /// decides whether the remaining members keep a quorum.
    pub async fn update_roles(
        &self,
        id: &str,
        change: RoleChange,
        live: &dyn Liveness,
    ) -> Result<(), CuratorError> {
        for _ in 0..CAS_ATTEMPTS {
            // One key; the other nodes are read only when the consensus
            // rules need them (every node, in a large cluster, is a lot to
            // read for a worker role).
            let entry = &self
                .node(id)
                .await?
                .ok_or_else(|| CuratorError::NotFound(format!("node {id} not found")))?;
            let mut node = entry.node.clone();
            if change.adds_any() && node.state != NodeState::Up as i32 {
                return Err(CuratorError::FailedPrecondition(format!(
                    "node {id} is {}; roles can only be given to UP nodes",
                    state_name(node.state)
                )));
            }
            let roles = node.roles.get_or_insert_with(Default::default);
            let before = roles.clone();
            if let Some(on) = change.kubernetes_worker {
                roles.kubernetes_worker = on.then_some(node_roles::KubernetesWorker {});
            }
            if let Some(on) = change.kubernetes_controller {
                roles.kubernetes_controller = on.then_some(node_roles::KubernetesController {});
            }
            let joining_consensus =
                change.consensus_member == Some(true) && roles.consensus_member.is_none();
            if change.consensus_member == Some(false) {
                roles.consensus_member = None;
            }
            if roles.kubernetes_controller.is_some()
                && roles.consensus_member.is_none()
                && !joining_consensus
            {
                return Err(CuratorError::FailedPrecondition(
                    "a KubernetesController must also be a ConsensusMember: give the node both roles, \
                     or remove KubernetesController first"
                        .into(),
                ));
            }
            if *roles == before && !joining_consensus {
                return Ok(());
            }
            let losing_consensus =
                before.consensus_member.is_some() && roles.consensus_member.is_none();
            if joining_consensus {
                let role = self.admit_consensus_member(entry).await?;
                node.roles
                    .get_or_insert_with(Default::default)
                    .consensus_member = Some(role);
            }
            let key = node_key(id);
            let mut txn = Txn::new().when(Compare::mod_revision(key.clone(), entry.mod_revision));
            if losing_consensus {
                // Read after the node itself; the transaction compares every
                // revision read, so the order does not matter.
                let all = self.nodes().await?;
                let others: Vec<&NodeEntry> = all
                    .iter()
                    .filter(|e| e.id != id && is_consensus_member(&e.node))
                    .collect();
                if others.is_empty() {
                    return Err(CuratorError::FailedPrecondition(format!(
                        "node {id} is the last consensus member; removing its role would lose the cluster state. \
                         Give another node the ConsensusMember role first"
                    )));
                }
                // The other members must still be members when this commits,
                // so two concurrent removals cannot both succeed.
                for o in others {
                    txn = txn.when(Compare::mod_revision(node_key(&o.id), o.mod_revision));
                }
                self.retire_consensus_member(entry, live).await?;
            }
            let txn = txn.and_then(Op::put(key, node.encode_to_vec()));
            // Whatever the outcome, a remembered record of this node is
            // stale now (it would only cost update_node a failed attempt).
            let committed = self.commit(txn).await;
            self.recent_nodes().remove(id);
            if committed?.succeeded {
                return Ok(());
            }
        }
        Err(CuratorError::Internal(format!(
            "node {id} kept changing; gave up"
        )))
    }

    /// Asks a node to decommission itself. Only nodes without roles; nodes
    /// that never came up are decommissioned at once (they hold nothing to
    /// wipe).
    pub async fn request_decommission(&self, id: &str) -> Result<(), CuratorError> {
        self.update_node(id, |node| {
            if has_roles(node) {
                return Err(CuratorError::FailedPrecondition(format!(
                    "node {id} still has roles; remove them first (metroctl node remove role ROLE {id})"
                )));
            }
            match NodeState::try_from(node.state) {
                Ok(NodeState::Up) if node.decommission_requested => Ok(Change::Keep(())),
                Ok(NodeState::Up) => {
                    node.decommission_requested = true;
                    Ok(Change::Write(()))
                }
                Ok(NodeState::New | NodeState::Standby) => {
                    node.state = NodeState::Decommissioned as i32;
                    Ok(Change::Write(()))
                }
                Ok(NodeState::Decommissioned) => Ok(Change::Keep(())),
                _ => Err(CuratorError::FailedPrecondition(format!("node {id} is in an unknown state"))),
            }
        })
        .await
    }

    /// The node wiped itself after a decommission request.
    pub async fn complete_decommission(&self, id: &str) -> Result<(), CuratorError> {
        self.update_node(id, |node| {
            if !node.decommission_requested {
                return Err(CuratorError::FailedPrecondition(format!(
                    "node {id} was not asked to decommission"
                )));
            }
            node.state = NodeState::Decommissioned as i32;
            Ok(Change::Write(()))
        })
        .await
    }

    /// Removes a node for good. By default only DECOMMISSIONED nodes without
    /// roles; the bypasses lift each rule. The last consensus member can
    /// never be deleted.
    pub async fn delete_node(
        &self,
        id: &str,
        bypass_roles: bool,
        bypass_state: bool,
        live: &dyn Liveness,
    ) -> Result<(), CuratorError> {
        let entry = &self
            .node(id)
            .await?
            .ok_or_else(|| CuratorError::NotFound(format!("node {id} not found")))?;
        if has_roles(&entry.node) && !bypass_roles {
            return Err(CuratorError::FailedPrecondition(format!(
                "node {id} still has roles; remove them first or set safety_bypass_has_roles"
            )));
        }
        if entry.node.state != NodeState::Decommissioned as i32 && !bypass_state {
            return Err(CuratorError::FailedPrecondition(format!(
                "node {id} is {}, not DECOMMISSIONED; decommission it first or set safety_bypass_not_decommissioned",
                state_name(entry.node.state)
            )));
        }
        let mut txn = Txn::new().when(Compare::mod_revision(node_key(id), entry.mod_revision));
        if is_consensus_member(&entry.node) {
            // Only now every node: see update_roles.
            let all = self.nodes().await?;
            let others: Vec<&NodeEntry> = all
                .iter()
                .filter(|e| e.id != id && is_consensus_member(&e.node))
                .collect();
            if others.is_empty() {
                return Err(CuratorError::FailedPrecondition(format!(
                    "node {id} is the last consensus member and holds the cluster state; it cannot be deleted"
                )));
            }
            for o in others {
                txn = txn.when(Compare::mod_revision(node_key(&o.id), o.mod_revision));
            }
            // A deleted node's etcd member would stay a voter nobody runs.
            self.retire_consensus_member(entry, live).await?;
        }
        let txn = txn
            .and_then(Op::delete(node_key(id)))
            .and_then(Op::put(tombstone_key(id), entry.node.public_key.clone()));
        let committed = self.commit(txn).await;
        self.recent_nodes().remove(id);
        if !committed?.succeeded {
            return Err(CuratorError::FailedPrecondition(format!(
                "node {id} or the consensus members changed while deleting; retry"
            )));
        }
        Ok(())
    }

    pub async fn is_deleted(&self, id: &str) -> Result<bool, CuratorError> {
        Ok(self
            .store
            .get(tombstone_key(id).as_bytes())
            .await?
            .is_some())
    }
}

#[cfg(test)]
mod lifecycle_tests {
    use super::*;

    async fn cluster_with_worker() -> (
        test_support::Backing,
        Arc<Cluster>,
        String,
        String,
        [u8; 32],
    ) {
        let t = test_support::bootstrapped().await;
        let key = metropolis_identity::generate_key()
            .verifying_key()
            .to_bytes();
        let ticket = t.cluster.register_ticket().await.expect("ticket");
        let id = t
            .cluster
            .register_node(key, &ticket, NodeLabels::default())
            .await
            .expect("register");
        (t.dir, t.cluster, t.first_id, id, key)
    }

    struct AllLive;
    impl Liveness for AllLive {
        fn is_live(&self, _: &str) -> Option<bool> {
            Some(true)
        }
    }
    const ALL_LIVE: AllLive = AllLive;

    fn set(w: Option<bool>, k: Option<bool>, cm: Option<bool>) -> RoleChange {
        RoleChange {
            kubernetes_worker: w,
            kubernetes_controller: k,
            consensus_member: cm,
        }
    }

    #[tokio::test]
    async fn role_rules() {
        let (_d, c, first, id, key) = cluster_with_worker().await;
        // Not UP yet.
        let r = c
            .update_roles(&id, set(Some(true), None, None), &ALL_LIVE)
            .await;
        assert!(
            matches!(r, Err(CuratorError::FailedPrecondition(ref m)) if m.contains("UP")),
            "{r:?}"
        );
        c.approve_node(&id).await.expect("approve");
        c.commit_node(key).await.expect("commit");
        c.update_roles(&id, set(Some(true), None, None), &ALL_LIVE)
            .await
            .expect("worker");
        let r = c
            .update_roles(&id, set(None, Some(true), None), &ALL_LIVE)
            .await;
        assert!(
            matches!(r, Err(CuratorError::FailedPrecondition(ref m)) if m.contains("ConsensusMember")),
            "{r:?}"
        );
        if c.consensus().is_none() {
            // The embedded store has exactly one member, for good.
            let r = c
                .update_roles(&id, set(None, Some(true), Some(true)), &ALL_LIVE)
                .await;
            assert!(
                matches!(r, Err(CuratorError::FailedPrecondition(ref m)) if m.contains("--ha")),
                "{r:?}"
            );
        } else {
            consensus_member_on_etcd(&c, &first, &id).await;
        }
        // Unset fields change nothing.
        c.update_roles(&id, RoleChange::default(), &ALL_LIVE)
            .await
            .expect("no-op");
        let roles = c
            .node(&id)
            .await
            .expect("r")
            .expect("n")
            .node
            .roles
            .expect("roles");
        assert!(roles.kubernetes_worker.is_some() && roles.consensus_member.is_none());
        // The only member keeps its role.
        let r = c
            .update_roles(&first, set(None, None, Some(false)), &ALL_LIVE)
            .await;
        assert!(
            matches!(r, Err(CuratorError::FailedPrecondition(ref m)) if m.contains("last consensus member")),
            "{r:?}"
        );
        assert!(matches!(
            c.update_roles("metropolis-x", set(Some(true), None, None), &ALL_LIVE)
                .await,
            Err(CuratorError::NotFound(_))
        ));
    }

    /// On etcd the role makes the node a learner (its record carries what it
    /// needs to start etcd), and taking it away removes the member again.
    async fn consensus_member_on_etcd(c: &Cluster, first: &str, id: &str) {
        let consensus = c.consensus().expect("etcd").clone();
        let r = c
            .update_roles(id, set(None, None, Some(true)), &ALL_LIVE)
            .await;
        assert!(
            matches!(r, Err(CuratorError::FailedPrecondition(ref m)) if m.contains("IP address")),
            "{r:?}"
        );
        c.update_status(
            id,
            NodeStatus {
                external_address: "127.0.0.9".into(),
                ..Default::default()
            },
        )
        .await
        .expect("status");
        c.update_roles(id, set(None, None, Some(true)), &ALL_LIVE)
            .await
            .expect("consensus member");
        let consensus_role = |id: String| {
            let c = &c;
            async move {
                c.node(&id)
                    .await
                    .expect("read")
                    .expect("node")
                    .node
                    .roles
                    .and_then(|r| r.consensus_member)
            }
        };
        let role = consensus_role(id.to_string()).await.expect("role");
        assert_eq!(role.ca_certificate, c.ca().cert_der());
        let peer =
            metropolis_identity::parse_certificate(&role.peer_certificate).expect("peer cert");
        assert_eq!(peer.common_name, id);
        assert!(
            role.peers
                .iter()
                .any(|p| p.name == id && p.url == "https://127.0.0.9:7834"),
            "{role:?}"
        );
        let members = consensus.members().await.expect("members");
        assert!(
            members
                .iter()
                .any(|m| m.is_learner && m.peer_urls == ["https://127.0.0.9:7834"]),
            "{members:?}"
        );
        // The leading curator's own member: it steps down (another member
        // removes it when the call is retried there) and nothing changes.
        let r = c
            .update_roles(first, set(None, None, Some(false)), &ALL_LIVE)
            .await;
        assert!(
            matches!(r, Err(CuratorError::Unavailable(ref m)) if m.contains("stepped down")),
            "{r:?}"
        );
        assert!(c.step_down().abstaining());
        assert!(
            consensus_role(first.to_string()).await.is_some(),
            "the role stays until another leader removes the member"
        );
        c.update_roles(id, set(None, Some(false), Some(false)), &ALL_LIVE)
            .await
            .expect("leave the consensus");
        assert_eq!(consensus.members().await.expect("members").len(), 1);
    }

    #[tokio::test]
    async fn decommission_and_delete_rules() {
        let (_d, c, first, id, key) = cluster_with_worker().await;
        c.approve_node(&id).await.expect("approve");
        c.commit_node(key).await.expect("commit");
        c.update_roles(&id, set(Some(true), None, None), &ALL_LIVE)
            .await
            .expect("worker");
        assert!(matches!(
            c.request_decommission(&id).await,
            Err(CuratorError::FailedPrecondition(_))
        ));
        let r = c.delete_node(&id, false, true, &ALL_LIVE).await;
        assert!(
            matches!(r, Err(CuratorError::FailedPrecondition(ref m)) if m.contains("roles")),
            "{r:?}"
        );
        c.update_roles(&id, set(Some(false), None, None), &ALL_LIVE)
            .await
            .expect("drop role");
        let r = c.delete_node(&id, false, false, &ALL_LIVE).await;
        assert!(
            matches!(r, Err(CuratorError::FailedPrecondition(ref m)) if m.contains("DECOMMISSIONED")),
            "{r:?}"
        );
        c.request_decommission(&id).await.expect("request");
        assert!(
            c.node(&id)
                .await
                .expect("r")
                .expect("n")
                .node
                .decommission_requested
        );
        c.complete_decommission(&id).await.expect("complete");
        assert_eq!(
            c.node(&id).await.expect("r").expect("n").node.state,
            NodeState::Decommissioned as i32
        );
        c.delete_node(&id, false, false, &ALL_LIVE)
            .await
            .expect("delete");
        assert!(c.node(&id).await.expect("r").is_none());
        assert!(c.is_deleted(&id).await.expect("tombstone"));
        // The key cannot come back.
        let t = c.register_ticket().await.expect("ticket");
        assert!(matches!(
            c.register_node(key, &t, NodeLabels::default()).await,
            Err(CuratorError::PermissionDenied(_))
        ));
        // The last consensus member cannot be deleted, even with bypasses.
        let r = c.delete_node(&first, true, true, &ALL_LIVE).await;
        assert!(
            matches!(r, Err(CuratorError::FailedPrecondition(ref m)) if m.contains("last consensus member")),
            "{r:?}"
        );
    }
}

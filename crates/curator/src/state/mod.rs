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

use metropolis_api::quote;
use std::sync::Arc;

use metropolis_api::common::{
    ClusterConfiguration, ClusterDirectory, NodeLabels, NodeRoles, NodeState, NodeStatus,
    NodeStorageSecurity, NodeTpmUsage,
    cluster_configuration::{StorageSecurityPolicy, TpmMode},
    cluster_directory, node_roles,
};
use metropolis_api::private;
use metropolis_identity::CertificateAuthority;
use metropolis_store::{Compare, Consensus, Op, Store, Txn};
use prost::Message;
use rand::RngCore;

use crate::consensus::migration::WriteGate;
use crate::consensus::{EtcdHost, Liveness};
use crate::error::CuratorError;

mod bootstrap;
pub mod clusternet;
mod config;
mod directory;
mod labels;
mod lifecycle;
pub mod lifetimes;
mod register;
mod roles;
#[cfg(test)]
pub(crate) mod test_support;

pub use bootstrap::{
    BootstrapRequest, Bootstrapped, DEFAULT_CLUSTER_DOMAIN, bootstrap, bootstrap_with_ca,
    initial_configuration,
};
pub use config::PATH_LABELS_TO_SYNC;
pub use directory::DIRECTORY_NODES;
pub use lifetimes::{Lifetimes, PATH_NODE_CERTIFICATE_LIFETIME, PATH_USER_CERTIFICATE_LIFETIME};
pub use register::{recommended_storage_security, tpm_usage};
pub use roles::RoleChange;

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

pub(crate) fn decode<M: Message + Default>(key: &str, bytes: &[u8]) -> Result<M, CuratorError> {
    M::decode(bytes).map_err(|e| CuratorError::Corrupt(format!("{key}: {e}")))
}

/// A node record as read, with the revision to compare against on write.
#[derive(Debug, Clone)]
pub struct NodeEntry {
    pub id: String,
    pub node: private::Node,
    pub mod_revision: i64,
}

impl NodeEntry {
    /// The record a key/value under [`NODES_PREFIX`] holds.
    pub fn from_kv(kv: &metropolis_store::KeyValue) -> Result<NodeEntry, CuratorError> {
        let key = String::from_utf8_lossy(&kv.key);
        Ok(NodeEntry {
            id: key.trim_start_matches(NODES_PREFIX).to_string(),
            node: decode(&key, &kv.value)?,
            mod_revision: kv.mod_revision,
        })
    }
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
    /// On the embedded store: pauses writes while the state moves to etcd
    /// (`store` is this gate then).
    gate: Option<Arc<WriteGate>>,
    /// On the embedded store: what the node does to move the state to etcd.
    etcd_host: std::sync::OnceLock<Arc<dyn EtcdHost>>,
    /// Serializes consensus membership changes (role removals and the
    /// reconciler's passes), which read etcd's members and act on them.
    membership_lock: tokio::sync::Mutex<()>,
    /// Wakes the reconciler after a role change.
    membership_changed: tokio::sync::Notify,
    /// The index GetClusterInfo answers from (see [`directory`]).
    directory: directory::Directory,
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
    /// Opens the cluster held in `store`, the embedded store of its single
    /// consensus member; fails if it was never bootstrapped.
    pub async fn open(store: Arc<dyn Store>) -> Result<Arc<Cluster>, CuratorError> {
        let gate = Arc::new(WriteGate::new(store));
        Ok(Arc::new(
            Cluster::load(gate.clone(), Some(gate), None, None).await?,
        ))
    }

    /// Opens the cluster held in an etcd cluster whose membership this
    /// curator manages (ConsensusMember role changes).
    pub async fn open_replicated(
        store: Arc<dyn Store>,
        consensus: Arc<dyn Consensus>,
        node_id: String,
    ) -> Result<Arc<Cluster>, CuratorError> {
        Ok(Arc::new(
            Cluster::load(store, None, Some(consensus), Some(node_id)).await?,
        ))
    }

    async fn load(
        store: Arc<dyn Store>,
        gate: Option<Arc<WriteGate>>,
        consensus: Option<Arc<dyn Consensus>>,
        node_id: Option<String>,
    ) -> Result<Cluster, CuratorError> {
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
        Ok(Cluster {
            store,
            ca,
            fence: crate::leader::Fence::default(),
            step_down: Arc::default(),
            consensus,
            node_id,
            owner_key: std::sync::OnceLock::new(),
            ticket: std::sync::Mutex::new(None),
            recent: std::sync::Mutex::new(RecentNodes::default()),
            gate,
            etcd_host: std::sync::OnceLock::new(),
            membership_lock: tokio::sync::Mutex::new(()),
            membership_changed: tokio::sync::Notify::new(),
            directory: directory::Directory::default(),
        })
    }

    pub fn consensus(&self) -> Option<&Arc<dyn Consensus>> {
        self.consensus.as_ref()
    }

    pub(crate) fn node_id(&self) -> Option<&str> {
        self.node_id.as_deref()
    }

    /// Lets this curator move the cluster from its embedded store to etcd on
    /// `host`, its node (see `consensus::migration`). Set once, before the
    /// curator serves.
    pub fn set_etcd_host(&self, host: Arc<dyn EtcdHost>) {
        if self.etcd_host.set(host).is_err() {
            tracing::warn!("the etcd host of this curator was set twice; keeping the first");
        }
    }

    pub(crate) fn etcd_host(&self) -> Option<&Arc<dyn EtcdHost>> {
        self.etcd_host.get()
    }

    pub(crate) fn write_gate(&self) -> Option<&WriteGate> {
        self.gate.as_deref()
    }

    pub(crate) fn membership_lock(&self) -> &tokio::sync::Mutex<()> {
        &self.membership_lock
    }

    pub(crate) fn membership_changed(&self) -> &tokio::sync::Notify {
        &self.membership_changed
    }

    /// From now on, writes commit only while the leader key created at
    /// `key_revision` exists (this curator leads).
    pub fn set_fence(&self, key_revision: i64) {
        self.fence.set(key_revision);
        // Another leader may have written in between; remembered records
        // would only cost failed transactions.
        *self.recent_nodes() = RecentNodes::default();
        self.directory.invalidate();
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
    pub(crate) async fn commit(
        &self,
        txn: Txn,
    ) -> Result<metropolis_store::TxnResponse, CuratorError> {
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
        let mut cfg: ClusterConfiguration = decode(KEY_CONFIG, &kv.value)?;
        // Always there, as upstream answers it (a client may then name its
        // fields in an update mask without building the message).
        cfg.kubernetes.get_or_insert_with(Default::default);
        Ok(cfg)
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
        range.kvs.iter().map(NodeEntry::from_kv).collect()
    }

    /// Every node record that decodes; the others are logged and left out.
    /// For listings only: decisions that must see every node use
    /// [`Cluster::nodes`], which fails on a corrupt record.
    pub async fn nodes_readable(&self) -> Result<Vec<NodeEntry>, CuratorError> {
        let range = self.store.range(NODES_PREFIX.as_bytes()).await?;
        Ok(range
            .kvs
            .into_iter()
            .filter_map(|kv| {
                let key = String::from_utf8_lossy(&kv.key).into_owned();
                match private::Node::decode(kv.value.as_slice()) {
                    Ok(node) => Some(NodeEntry {
                        id: key.trim_start_matches(NODES_PREFIX).to_string(),
                        node,
                        mod_revision: kv.mod_revision,
                    }),
                    Err(e) => {
                        tracing::error!(key = %metropolis_api::quote(&key), error = %e, "skipping a node record that does not decode");
                        None
                    }
                }
            })
            .collect())
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
                    let entry = self.node(id).await?.ok_or_else(|| {
                        CuratorError::NotFound(format!("node {} not found", quote(id)))
                    })?;
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
                    self.node_written(id, resp.revision, Some(&node));
                    self.recent_nodes().insert(id, node, resp.revision);
                    return Ok(out);
                }
                Ok(_) => self.recent_nodes().remove(id),
                Err(e) => {
                    self.recent_nodes().remove(id);
                    // It may have committed.
                    self.directory.invalidate();
                    return Err(e);
                }
            }
        }
        Err(CuratorError::Internal(format!(
            "node {id} kept changing; gave up after {CAS_ATTEMPTS} attempts"
        )))
    }
}

pub(crate) fn random_ticket() -> Vec<u8> {
    let mut t = vec![0u8; TICKET_LEN];
    rand::rngs::OsRng.fill_bytes(&mut t);
    t
}

fn has_roles(node: &private::Node) -> bool {
    node.roles.as_ref().is_some_and(|r| {
        r.kubernetes_worker.is_some()
            || r.kubernetes_controller.is_some()
            || r.consensus_member.is_some()
    })
}

pub(crate) fn is_consensus_member(node: &private::Node) -> bool {
    node.roles
        .as_ref()
        .is_some_and(|r| r.consensus_member.is_some())
}

pub fn state_name(state: i32) -> &'static str {
    NodeState::try_from(state)
        .map(|s| s.as_str_name())
        .unwrap_or("NODE_STATE_UNKNOWN_VALUE")
}

/// Deleted nodes leave a tombstone so their key can never register again.
pub const TOMBSTONES_PREFIX: &str = "/tombstones/";

pub fn tombstone_key(id: &str) -> String {
    format!("{TOMBSTONES_PREFIX}{id}")
}

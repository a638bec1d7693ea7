//! The cluster directory (GetClusterInfo): where clients find the cluster.
//!
//! As upstream's curator: UP nodes with an address, in public-key order, at
//! most [`DIRECTORY_NODES`]. Unlike upstream, every consensus member is
//! always in it (clients find the curator through the directory, and only
//! consensus members run one), and answering does not read every node:
//! every node joins by asking for the directory, so an answer built from a
//! full read would cost the whole cluster per join.
//!
//! Instead the leader keeps an index of the listable nodes, built from one
//! read of all nodes the first time it is asked and then kept current by
//! the curator's own writes of node records (every one goes through
//! [`Cluster::node_written`]). Only the leader writes node records (the
//! fence), and a new leadership starts a fresh index, so the index misses
//! nothing; a write whose outcome is unknown drops it, to be rebuilt.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::*;

/// Most nodes in a directory besides consensus members, as upstream.
pub const DIRECTORY_NODES: usize = 15;

/// One node's place in the index: ordered by public key, then id.
type Place = (Vec<u8>, String);

#[derive(Default)]
pub(super) struct Directory {
    state: Mutex<IndexState>,
    /// One build at a time; callers meanwhile wait for it. (So a state of
    /// `Building` is always the build holding this.)
    build: tokio::sync::Mutex<()>,
}

#[derive(Default)]
enum IndexState {
    #[default]
    Empty,
    /// A build is reading the nodes; writes that commit meanwhile are kept
    /// here and applied once it is installed (the ones it read too are
    /// ignored then, by revision).
    Building {
        pending: Vec<(String, i64, Option<private::Node>)>,
    },
    Ready(Index),
}

#[derive(Default)]
struct Index {
    /// Revision of the newest write applied per node, so that an older
    /// write's update arriving late does not undo a newer one.
    revisions: HashMap<String, i64>,
    /// Deleted nodes (never to return: they leave a tombstone).
    deleted: HashSet<String>,
    /// Listable nodes (UP, with an address): their address.
    listed: BTreeMap<Place, String>,
    places: HashMap<String, Place>,
    /// The listed consensus members.
    members: BTreeSet<Place>,
}

impl Index {
    fn apply(&mut self, id: &str, revision: i64, node: Option<&private::Node>) {
        if self.deleted.contains(id) {
            return;
        }
        match self.revisions.get(id) {
            Some(&seen) if seen >= revision => return,
            _ => {}
        }
        if let Some(place) = self.places.remove(id) {
            self.listed.remove(&place);
            self.members.remove(&place);
        }
        let Some(node) = node else {
            self.revisions.remove(id);
            self.deleted.insert(id.to_string());
            return;
        };
        self.revisions.insert(id.to_string(), revision);
        let address = node
            .status
            .as_ref()
            .map(|s| s.external_address.as_str())
            .filter(|a| !a.is_empty());
        let Some(address) = address.filter(|_| node.state == NodeState::Up as i32) else {
            return;
        };
        let place = (node.public_key.clone(), id.to_string());
        if is_consensus_member(node) {
            self.members.insert(place.clone());
        }
        self.listed.insert(place.clone(), address.to_string());
        self.places.insert(id.to_string(), place);
    }

    /// Every listed consensus member, and the first other nodes by public
    /// key up to [`DIRECTORY_NODES`] in all; in public-key order.
    fn answer(&self) -> ClusterDirectory {
        let others = DIRECTORY_NODES.saturating_sub(self.members.len());
        let mut chosen: BTreeSet<&Place> = self.members.iter().collect();
        chosen.extend(
            self.listed
                .keys()
                .filter(|p| !self.members.contains(*p))
                .take(others),
        );
        ClusterDirectory {
            nodes: chosen
                .into_iter()
                .filter_map(|place| {
                    let address = self.listed.get(place)?;
                    Some(cluster_directory::Node {
                        id: place.1.clone(),
                        addresses: vec![cluster_directory::node::Address {
                            host: address.clone(),
                        }],
                    })
                })
                .collect(),
        }
    }
}

impl Directory {
    fn lock(&self) -> MutexGuard<'_, IndexState> {
        // Every statement leaves the state consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A node record was written at `revision` (`None`: deleted).
    pub(super) fn written(&self, id: &str, revision: i64, node: Option<&private::Node>) {
        match &mut *self.lock() {
            IndexState::Empty => {}
            IndexState::Building { pending, .. } => {
                pending.push((id.to_string(), revision, node.cloned()))
            }
            IndexState::Ready(index) => index.apply(id, revision, node),
        }
    }

    /// Forgets the index: the next answer reads every node again.
    pub(super) fn invalidate(&self) {
        *self.lock() = IndexState::Empty;
    }
}

/// Drops a build that did not finish (an error, or a caller that gave up),
/// so that writes stop collecting for it.
struct Unfinished<'a>(&'a Directory);

impl Drop for Unfinished<'_> {
    fn drop(&mut self) {
        self.0.invalidate();
    }
}

impl Cluster {
    /// The cluster directory: see the module documentation.
    pub async fn directory(&self) -> Result<ClusterDirectory, CuratorError> {
        if let IndexState::Ready(index) = &*self.directory.lock() {
            return Ok(index.answer());
        }
        let _building = self.directory.build.lock().await;
        // Someone else may have built it while this call waited.
        {
            let mut state = self.directory.lock();
            if let IndexState::Ready(index) = &*state {
                return Ok(index.answer());
            }
            // Set before the read: a write that commits after this point is
            // either in the read or in `pending`.
            *state = IndexState::Building {
                pending: Vec::new(),
            };
        }
        let unfinished = Unfinished(&self.directory);
        let mut index = Index::default();
        let nodes = self.nodes().await?;
        for e in &nodes {
            index.apply(&e.id, e.mod_revision, Some(&e.node));
        }
        std::mem::forget(unfinished);
        let mut state = self.directory.lock();
        match std::mem::take(&mut *state) {
            IndexState::Building { pending } => {
                for (id, revision, node) in &pending {
                    index.apply(id, *revision, node.as_ref());
                }
                let answer = index.answer();
                *state = IndexState::Ready(index);
                Ok(answer)
            }
            // Invalidated meanwhile: what was read is still a fresh answer,
            // but not one to keep.
            other => {
                *state = other;
                Ok(index.answer())
            }
        }
    }

    /// Every write of a node record reports here once it committed at
    /// `revision` (`None`: the record was deleted).
    pub(crate) fn node_written(&self, id: &str, revision: i64, node: Option<&private::Node>) {
        self.directory.written(id, revision, node);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use async_trait::async_trait;
    use metropolis_store::{
        KeyValue, LeaseId, RangeResponse, StoreError, TxnResponse, WatchStream,
    };

    use super::*;
    use crate::state::test_support::{ALL_LIVE, bootstrapped};

    /// The real store, counting full reads of the nodes.
    struct Counting {
        inner: Arc<dyn Store>,
        node_ranges: AtomicUsize,
    }

    #[async_trait]
    impl Store for Counting {
        async fn get(&self, key: &[u8]) -> Result<Option<KeyValue>, StoreError> {
            self.inner.get(key).await
        }
        async fn range(&self, prefix: &[u8]) -> Result<RangeResponse, StoreError> {
            if prefix == NODES_PREFIX.as_bytes() {
                self.node_ranges.fetch_add(1, Ordering::Relaxed);
            }
            self.inner.range(prefix).await
        }
        async fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError> {
            self.inner.txn(txn).await
        }
        async fn watch(&self, prefix: &[u8], rev: i64) -> Result<WatchStream, StoreError> {
            self.inner.watch(prefix, rev).await
        }
        async fn grant_lease(&self, ttl: std::time::Duration) -> Result<LeaseId, StoreError> {
            self.inner.grant_lease(ttl).await
        }
        async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
            self.inner.keep_alive(lease).await
        }
        async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
            self.inner.revoke_lease(lease).await
        }
        async fn revision(&self) -> Result<i64, StoreError> {
            self.inner.revision().await
        }
    }

    /// The rule, from a full read: every consensus member, then other UP
    /// nodes with an address by public key, DIRECTORY_NODES in all.
    async fn expected(c: &Cluster) -> Vec<String> {
        let mut up: Vec<NodeEntry> = c
            .nodes()
            .await
            .unwrap()
            .into_iter()
            .filter(|e| {
                e.node.state == NodeState::Up as i32
                    && e.node
                        .status
                        .as_ref()
                        .is_some_and(|s| !s.external_address.is_empty())
            })
            .collect();
        up.sort_by(|a, b| a.node.public_key.cmp(&b.node.public_key));
        let members = up.iter().filter(|e| is_consensus_member(&e.node)).count();
        let mut others = DIRECTORY_NODES.saturating_sub(members);
        let mut out = Vec::new();
        for e in up {
            if is_consensus_member(&e.node) {
                out.push(e.id);
            } else if others > 0 {
                others -= 1;
                out.push(e.id);
            }
        }
        out
    }

    fn ids(d: &ClusterDirectory) -> Vec<String> {
        d.nodes.iter().map(|n| n.id.clone()).collect()
    }

    async fn up_node(c: &Cluster, ticket: &[u8], address: &str) -> String {
        let key = metropolis_identity::generate_key()
            .verifying_key()
            .to_bytes();
        let id = c
            .register_node(key, ticket, NodeLabels::default())
            .await
            .unwrap();
        c.approve_node(&id).await.unwrap();
        c.commit_node(key).await.unwrap();
        c.update_status(
            &id,
            NodeStatus {
                external_address: address.into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        id
    }

    #[tokio::test]
    async fn bounded_by_public_key_with_every_member_and_no_full_read_per_join() {
        let t = bootstrapped().await;
        let store = Arc::new(Counting {
            inner: t.store.clone(),
            node_ranges: AtomicUsize::new(0),
        });
        let c = Cluster::open(store.clone()).await.unwrap();
        let ticket = c.register_ticket().await.unwrap();
        for i in 0..DIRECTORY_NODES + 5 {
            up_node(&c, &ticket, &format!("127.0.1.{i}")).await;
        }
        // Registered but never UP: not listed.
        let key = metropolis_identity::generate_key()
            .verifying_key()
            .to_bytes();
        c.register_node(key, &ticket, NodeLabels::default())
            .await
            .unwrap();

        let before = store.node_ranges.load(Ordering::Relaxed);
        let dir = c.directory().await.unwrap();
        assert_eq!(store.node_ranges.load(Ordering::Relaxed), before + 1);
        assert_eq!(dir.nodes.len(), DIRECTORY_NODES);
        assert_eq!(ids(&dir), expected(&c).await);
        assert!(
            ids(&dir).contains(&t.first_id),
            "the consensus member is listed"
        );

        // Joins, address changes and deletions after the first answer are
        // followed without reading every node again.
        let directory = || async {
            let before = store.node_ranges.load(Ordering::Relaxed);
            let dir = c.directory().await.unwrap();
            assert_eq!(
                store.node_ranges.load(Ordering::Relaxed),
                before,
                "the directory read every node again"
            );
            dir
        };
        for i in 0..10 {
            up_node(&c, &ticket, &format!("127.0.2.{i}")).await;
            let dir = directory().await;
            assert_eq!(dir.nodes.len(), DIRECTORY_NODES);
            assert!(ids(&dir).contains(&t.first_id));
        }
        let listed = ids(&directory().await);
        assert_eq!(listed, expected(&c).await);
        let victim = listed.iter().find(|id| **id != t.first_id).unwrap().clone();
        c.update_status(
            &victim,
            NodeStatus {
                external_address: "127.0.3.1".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let dir = directory().await;
        let entry = dir.nodes.iter().find(|n| n.id == victim).unwrap();
        assert_eq!(entry.addresses[0].host, "127.0.3.1");
        c.delete_node(&victim, true, true, &ALL_LIVE).await.unwrap();
        let dir = directory().await;
        assert!(!ids(&dir).contains(&victim));
        assert_eq!(ids(&dir), expected(&c).await);

        // A new leadership starts from a fresh read.
        c.set_fence(c.store().revision().await.unwrap());
        assert_eq!(ids(&c.directory().await.unwrap()), expected(&c).await);
    }
}

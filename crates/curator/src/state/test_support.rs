//! A fresh cluster for the curator's unit tests.

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
    store_for("default").await
}

/// [`store`], its etcd member (if on etcd) named `node`.
async fn store_for(node: &str) -> (Backing, Arc<dyn Store>, Option<Arc<dyn Consensus>>) {
    match std::env::var("METROPOLIS_TEST_STORE").as_deref() {
        Ok("etcd") => {
            let server = EtcdServer::start_named(Listen::Unix, node).await;
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
    let key = metropolis_identity::generate_key()
        .verifying_key()
        .to_bytes();
    let first_id = metropolis_identity::node_id(&key);
    // On etcd, the bootstrap node is the etcd member (by name) and holds an
    // admitted role, as a node bootstrapped with --ha does.
    let (dir, store, consensus) = store_for(&first_id).await;
    let pki = crate::consensus::pki::ConsensusPki::generate().expect("consensus pki");
    let consensus_role = match consensus {
        Some(_) => node_roles::ConsensusMember {
            ca_certificate: pki.ca_certificate().to_vec(),
            peer_certificate: pki
                .issue_peer_certificate(
                    &key,
                    "127.0.0.2".parse().expect("address"),
                    super::Lifetimes::of(&Default::default()).node,
                )
                .expect("peer certificate"),
            ..Default::default()
        },
        None => Default::default(),
    };
    bootstrap(
        store.as_ref(),
        BootstrapRequest {
            owner_public_key: [7; 32],
            initial_configuration: None,
            labels: NodeLabels::default(),
            node_public_key: key,
            node_address: "127.0.0.2".into(),
            consensus_role,
            consensus_pki: Some(pki),
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

pub(crate) async fn cluster_with_worker() -> (Backing, Arc<Cluster>, String, String, [u8; 32]) {
    let t = bootstrapped().await;
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

pub(crate) struct AllLive;
impl Liveness for AllLive {
    fn is_live(&self, _: &str) -> Option<bool> {
        Some(true)
    }
}
pub(crate) const ALL_LIVE: AllLive = AllLive;

pub(crate) fn set(w: Option<bool>, k: Option<bool>, cm: Option<bool>) -> RoleChange {
    RoleChange {
        kubernetes_worker: w,
        kubernetes_controller: k,
        consensus_member: cm,
    }
}

//! Moving a cluster from the embedded store to etcd, online.
//!
//! A cluster starts on the embedded store of its bootstrap node. When a
//! second node gets the ConsensusMember role, the leading curator (the only
//! one there is) moves the state to etcd, on its own node:
//!
//! 1. it starts etcd there as a new cluster of one, with a peer certificate
//!    from the consensus CA ([`EtcdHost::start`]; done already when the role
//!    was given, so that a node that cannot run etcd refuses the role at
//!    once);
//! 2. it pauses writes ([`WriteGate`]: writes in flight finish, later ones
//!    are answered UNAVAILABLE; reads go on) and copies every key of one
//!    consistent read of the embedded store into etcd;
//! 3. it compares key count and digest of both sides;
//! 4. it records its own node as etcd's member, and switches: one atomic
//!    change of the data directory ([`EtcdHost::switch`]), after which the
//!    node runs its curator on etcd (the same etcd process). The embedded store stays beside it,
//!    read-only, as the pre-migration copy. The reconciler on etcd then
//!    admits the pending members as usual.
//!
//! Until the switch the embedded store is the cluster's store, and after it
//! etcd is: a crash before it leaves the cluster on the embedded store (the
//! node removes the staged etcd member when it starts, and the pending role
//! makes the next leader try again), a crash after it on etcd. Writes
//! refused during the pause were never acknowledged, and every acknowledged
//! one was in the read that was copied. Debug builds have a failpoint after
//! each step (`migration::*`, action `return(crash)` aborts the process).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use metropolis_api::common::node_roles;
use metropolis_api::private;
use metropolis_store::transfer::{self, Digest};
use metropolis_store::{
    Compare, Consensus, EtcdStore, KeyValue, LeaseId, Op, RangeResponse, Store, StoreError, Txn,
    TxnResponse, WatchStream,
};
use prost::Message;
use tokio::sync::RwLock;

use super::members::{Pass, admitted_role};
use super::pki::ConsensusPki;
use crate::error::CuratorError;
use crate::state::{Cluster, node_key};

/// What a refused write says while the state moves.
pub const MIGRATING: &str = "migrating the cluster state to etcd; retry in a few seconds";

/// The etcd member a migration starts on this node.
#[derive(Debug, Clone)]
pub struct StagedMember {
    /// The consensus CA (DER), which etcd's peer port trusts.
    pub ca_certificate: Vec<u8>,
    /// This node's peer certificate (DER) from the consensus CA.
    pub peer_certificate: Vec<u8>,
    /// The consensus CRL (DER).
    pub crl: Vec<u8>,
}

/// What the node running the curator does for a migration: the curator
/// decides, the node owns the data directory and the etcd process.
#[async_trait]
pub trait EtcdHost: Send + Sync {
    /// The node this curator runs on.
    fn node_id(&self) -> &str;

    /// The address its etcd member serves peers on.
    fn address(&self) -> IpAddr;

    /// Starts etcd as a new cluster of one with `member`'s certificates, or
    /// returns the one started before if it still runs with the same CA;
    /// either way with the member it runs as. Fails with a reason an
    /// operator can act on (no etcd binary, the peer port taken, etcd's own
    /// complaint).
    async fn start(&self, member: &StagedMember) -> Result<(Arc<EtcdStore>, StagedMember), String>;

    /// Makes the started member this node's consensus store, atomically;
    /// the node then serves a curator on it.
    async fn switch(&self) -> Result<(), String>;

    /// Stops and removes the started member, if there is one.
    async fn abandon(&self);
}

/// A [`Store`] whose writes can be paused: while paused, a transaction that
/// writes fails with UNAVAILABLE ([`MIGRATING`]); reads, watches and leases
/// go on. Pausing waits for the writes in flight.
pub struct WriteGate {
    inner: Arc<dyn Store>,
    paused: RwLock<bool>,
}

impl WriteGate {
    pub fn new(inner: Arc<dyn Store>) -> WriteGate {
        WriteGate {
            inner,
            paused: RwLock::new(false),
        }
    }

    /// Refuses writes from now on; returns once no write is in flight.
    pub async fn pause(&self) {
        *self.paused.write().await = true;
    }

    pub async fn is_paused(&self) -> bool {
        *self.paused.read().await
    }

    pub async fn resume(&self) {
        *self.paused.write().await = false;
    }

    /// The store behind the gate, which the migration reads.
    pub fn inner(&self) -> &Arc<dyn Store> {
        &self.inner
    }
}

fn writes(txn: &Txn) -> bool {
    txn.success
        .iter()
        .chain(&txn.failure)
        .any(|op| !matches!(op, Op::Get { .. } | Op::GetPrefix { .. }))
}

#[async_trait]
impl Store for WriteGate {
    async fn get(&self, key: &[u8]) -> Result<Option<KeyValue>, StoreError> {
        self.inner.get(key).await
    }

    async fn range(&self, prefix: &[u8]) -> Result<RangeResponse, StoreError> {
        self.inner.range(prefix).await
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError> {
        if !writes(&txn) {
            return self.inner.txn(txn).await;
        }
        // Held across the write: pause() waits for it.
        let paused = self.paused.read().await;
        if *paused {
            return Err(StoreError::Unavailable(MIGRATING.into()));
        }
        self.inner.txn(txn).await
    }

    async fn watch(&self, prefix: &[u8], start_revision: i64) -> Result<WatchStream, StoreError> {
        self.inner.watch(prefix, start_revision).await
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
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

/// A failpoint between two steps (debug builds). `return(crash)` aborts the
/// process, as a SIGKILL would; any other return fails the migration.
fn step(name: &str) -> Result<(), CuratorError> {
    let _ = name;
    fail::fail_point!(name, |arg| {
        if arg.as_deref() == Some("crash") {
            std::process::abort();
        }
        Err(CuratorError::Internal(format!("failpoint {name}")))
    });
    Ok(())
}

/// Failpoints of the migration, in order.
pub const FAILPOINTS: &[&str] = &[
    "migration::etcd_started",
    "migration::paused",
    "migration::copied",
    "migration::verified",
    "migration::switched",
];

/// What a migration moved and how long writes were paused.
#[derive(Debug, Clone)]
pub struct Moved {
    pub digest: Digest,
    /// From pausing writes to the switch (the curator's restart on etcd
    /// comes on top).
    pub paused_for: Duration,
    pub copy: Duration,
    pub verify: Duration,
}

impl Cluster {
    /// Starts the etcd member this cluster would move to, so that a node
    /// that cannot run etcd refuses a second consensus member at once.
    /// Creates the consensus PKI if this cluster has none yet.
    pub(crate) async fn prepare_migration(&self) -> Result<(), CuratorError> {
        let host = self.etcd_host().ok_or_else(|| {
            CuratorError::FailedPrecondition(
                "this cluster keeps its state in the embedded store of a curator that cannot move it \
                 to etcd; a second ConsensusMember is not possible here"
                    .into(),
            )
        })?;
        if let Some(gate) = self.write_gate()
            && gate.is_paused().await
        {
            return Err(CuratorError::Unavailable(MIGRATING.into()));
        }
        let pki = self.ensure_consensus_pki().await?;
        let member = self.staged_member(host.as_ref(), &pki).await?;
        host.start(&member).await.map_err(|why| {
            CuratorError::FailedPrecondition(format!(
                "a second consensus member needs the cluster state on etcd, and this node cannot \
                 start etcd: {why}. The cluster stays on the embedded store; fix that, then retry"
            ))
        })?;
        Ok(())
    }

    /// The consensus PKI, created and stored if there is none.
    async fn ensure_consensus_pki(&self) -> Result<ConsensusPki, CuratorError> {
        if let Some(pki) = self.consensus_pki().await? {
            return Ok(pki);
        }
        let pki = ConsensusPki::generate()?;
        let (compare, ops) = pki.write()?;
        let txn = ops
            .into_iter()
            .fold(Txn::new().when(compare), Txn::and_then);
        self.commit(txn).await?;
        // Whoever won, the stored one counts.
        self.consensus_pki().await?.ok_or_else(|| {
            CuratorError::Internal("the consensus PKI vanished right after it was written".into())
        })
    }

    async fn staged_member(
        &self,
        host: &dyn EtcdHost,
        pki: &ConsensusPki,
    ) -> Result<StagedMember, CuratorError> {
        let me = self.node(host.node_id()).await?.ok_or_else(|| {
            CuratorError::Corrupt(format!(
                "this curator's node {} has no record",
                host.node_id()
            ))
        })?;
        let public_key: [u8; 32] = me
            .node
            .public_key
            .as_slice()
            .try_into()
            .map_err(|_| CuratorError::Corrupt(format!("node {}: bad public key", me.id)))?;
        let lifetime = self.lifetimes().await?.node;
        Ok(StagedMember {
            ca_certificate: pki.ca_certificate().to_vec(),
            peer_certificate: pki.issue_peer_certificate(&public_key, host.address(), lifetime)?,
            crl: pki.crl()?,
        })
    }

    /// The reconciler's step on the embedded store: moves the cluster to
    /// etcd when a node other than this one holds the ConsensusMember role.
    pub(crate) async fn migrate_if_wanted(&self) -> Result<Pass, CuratorError> {
        let Some(host) = self.etcd_host() else {
            return Ok(Pass::default());
        };
        let pending: Vec<String> = self
            .nodes()
            .await?
            .into_iter()
            .filter(|e| {
                e.id != host.node_id()
                    && e.node
                        .roles
                        .as_ref()
                        .is_some_and(|r| r.consensus_member.is_some())
            })
            .map(|e| e.id)
            .collect();
        if pending.is_empty() {
            return Ok(Pass::default());
        }
        let moved = self.migrate(host.as_ref()).await?;
        tracing::info!(
            moved = %moved.digest,
            writes_paused_ms = moved.paused_for.as_millis(),
            copy_ms = moved.copy.as_millis(),
            verify_ms = moved.verify.as_millis(),
            "moved the cluster state to etcd; restarting the curator on it"
        );
        Ok(Pass {
            pending,
            migrated: true,
            ..Pass::default()
        })
    }

    /// Steps 1 to 4 of the module documentation. On an error before the
    /// switch, the cluster goes on on the embedded store and the started
    /// member is removed.
    pub async fn migrate(&self, host: &dyn EtcdHost) -> Result<Moved, CuratorError> {
        let gate = self.write_gate().ok_or_else(|| {
            CuratorError::Internal("only a cluster on the embedded store moves to etcd".into())
        })?;
        let pki = self.ensure_consensus_pki().await?;
        let member = self.staged_member(host, &pki).await?;
        let (etcd, member) = host.start(&member).await.map_err(|why| {
            CuratorError::Unavailable(format!(
                "cannot start etcd to move the cluster state to ({why}); trying again later"
            ))
        })?;
        step("migration::etcd_started")?;
        gate.pause().await;
        let paused = Instant::now();
        let moved = self
            .copy_and_switch(host, gate, &etcd, &pki, member.peer_certificate)
            .await;
        match moved {
            Ok((digest, copy, verify)) => Ok(Moved {
                digest,
                paused_for: paused.elapsed(),
                copy,
                verify,
            }),
            Err(e) => {
                host.abandon().await;
                gate.resume().await;
                tracing::warn!(error = %e, "moving the cluster state to etcd failed; staying on the embedded store");
                Err(e)
            }
        }
    }

    async fn copy_and_switch(
        &self,
        host: &dyn EtcdHost,
        gate: &WriteGate,
        etcd: &Arc<EtcdStore>,
        pki: &ConsensusPki,
        peer_certificate: Vec<u8>,
    ) -> Result<(Digest, Duration, Duration), CuratorError> {
        step("migration::paused")?;
        let started = Instant::now();
        // The leader's claim is bound to a lease of this store: the curator
        // on etcd campaigns afresh.
        let kvs: Vec<KeyValue> = gate
            .inner()
            .range(b"")
            .await?
            .kvs
            .into_iter()
            .filter(|kv| kv.lease == 0)
            .collect();
        let expected = Digest::of(&kvs);
        if etcd.revision().await? > 1 {
            return Err(CuratorError::Internal(
                "the etcd member started for the move is not empty".into(),
            ));
        }
        transfer::load(etcd.as_ref(), &kvs).await?;
        drop(kvs);
        let copy = started.elapsed();
        step("migration::copied")?;
        let started = Instant::now();
        let got = etcd.digest_unleased().await?;
        if got != expected {
            return Err(CuratorError::Internal(format!(
                "the copy in etcd ({got}) differs from the embedded store ({expected})"
            )));
        }
        let verify = started.elapsed();
        step("migration::verified")?;
        // This node is etcd's first member now, and its role says so.
        let key = node_key(host.node_id());
        let kv = etcd.get(key.as_bytes()).await?.ok_or_else(|| {
            CuratorError::Internal(format!("node {} did not arrive in etcd", host.node_id()))
        })?;
        let mut node = private::Node::decode(kv.value.as_slice())
            .map_err(|e| CuratorError::Corrupt(format!("{key}: {e}")))?;
        let status = etcd.status().await?;
        let role: node_roles::ConsensusMember = admitted_role(
            etcd.as_ref() as &dyn Consensus,
            pki,
            host.node_id(),
            status.member_id,
            peer_certificate,
        )
        .await?;
        node.roles
            .get_or_insert_with(Default::default)
            .consensus_member = Some(role);
        let txn = Txn::new()
            .when(Compare::mod_revision(key.clone(), kv.mod_revision))
            .and_then(Op::put(key, node.encode_to_vec()));
        if !etcd.txn(txn).await?.succeeded {
            return Err(CuratorError::Internal(
                "this node's record changed in etcd during the move".into(),
            ));
        }
        host.switch()
            .await
            .map_err(|why| CuratorError::Internal(format!("switching this node to etcd: {why}")))?;
        step("migration::switched")?;
        Ok((expected, copy, verify))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_paused_gate_refuses_writes_and_serves_reads() {
        let (_dir, store, _) = crate::state::test_support::store().await;
        let gate = Arc::new(WriteGate::new(store));
        gate.txn(Txn::new().and_then(Op::put("/a", "1")))
            .await
            .expect("write");
        gate.pause().await;
        let err = gate
            .txn(Txn::new().and_then(Op::put("/a", "2")))
            .await
            .expect_err("paused");
        assert!(
            matches!(err, StoreError::Unavailable(ref m) if m == MIGRATING),
            "{err}"
        );
        // Reads, also in a transaction, go on.
        assert_eq!(gate.get(b"/a").await.expect("get").expect("a").value, b"1");
        gate.txn(Txn::new().and_then(Op::get("/a")))
            .await
            .expect("read txn");
        gate.resume().await;
        gate.txn(Txn::new().and_then(Op::put("/a", "3")))
            .await
            .expect("write after resume");
    }
}

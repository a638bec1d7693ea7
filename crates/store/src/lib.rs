//! The consensus store: cluster state as an etcd-shaped key-value space.
//!
//! The curator only ever talks to [`Store`]. The trait follows etcd's data model
//! (a single monotonically increasing revision, per-key create/mod revisions and
//! versions, compare-and-swap transactions, prefix watches and leases) so that the
//! etcd backend can drop in without the curator noticing. The embedded backend
//! ([`EmbeddedStore`]) implements the same semantics on redb for single-node
//! clusters.
//!
//! [`Consensus`] is the other half of the etcd backend: membership of the
//! etcd cluster itself (learners, promotion, removal), which the embedded
//! store, with its single fixed member, does not have.

mod consensus;
mod embedded;
mod etcd;
#[cfg(feature = "testing")]
pub mod testing;
pub mod transfer;
mod types;

pub use consensus::{Consensus, ConsensusStatus, Member};
pub use embedded::{CommitStats, EmbeddedOptions, EmbeddedStore};
pub use etcd::EtcdStore;
pub use types::*;

use async_trait::async_trait;
use std::time::Duration;

/// A consensus-backed key-value store.
///
/// All methods are linearizable with respect to each other. Revisions start at 1
/// for an empty store and increase by exactly one per successful write
/// transaction (a transaction with no writes does not bump the revision).
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Reads a single key.
    async fn get(&self, key: &[u8]) -> Result<Option<KeyValue>, StoreError>;

    /// Reads every key starting with `prefix`, in key order, together with the
    /// store revision the read was taken at.
    async fn range(&self, prefix: &[u8]) -> Result<RangeResponse, StoreError>;

    /// Atomically evaluates `txn.compares`; runs `txn.success` if all hold,
    /// otherwise `txn.failure`.
    async fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError>;

    /// Streams every change to keys under `prefix` with a revision greater than or
    /// equal to `start_revision` (0 = only changes after the call). Events are
    /// delivered in revision order. If `start_revision` has been compacted away,
    /// the stream yields [`StoreError::Compacted`] and ends.
    async fn watch(&self, prefix: &[u8], start_revision: i64) -> Result<WatchStream, StoreError>;

    /// Grants a lease that expires `ttl` after its last keep-alive. Keys put
    /// with the lease are deleted (as a normal, watched delete) when it expires
    /// or is revoked.
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError>;

    /// Refreshes a lease. Fails with [`StoreError::LeaseNotFound`] once it expired.
    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError>;

    /// Revokes a lease and deletes its keys.
    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError>;

    /// The current revision of the store.
    async fn revision(&self) -> Result<i64, StoreError>;

    /// Every key at one revision, in pages of at most `page_keys` keys,
    /// and how many of them start with `count_prefix` (a backup's header
    /// says how many nodes it holds before the first page is read).
    ///
    /// The default reads everything with one [`Store::range`]; the
    /// backends stream instead (a redb read transaction held open, etcd
    /// pages read at the snapshot's revision), so that a large store is
    /// never in memory whole.
    async fn snapshot(
        &self,
        count_prefix: &[u8],
        page_keys: usize,
    ) -> Result<Snapshot, StoreError> {
        let all = self.range(b"").await?;
        let counted = all
            .kvs
            .iter()
            .filter(|kv| kv.key.starts_with(count_prefix))
            .count() as u64;
        let page_keys = page_keys.max(1);
        let mut kvs = all.kvs.into_iter().peekable();
        let pages = std::iter::from_fn(move || {
            kvs.peek()?;
            Some(Ok(kvs.by_ref().take(page_keys).collect()))
        })
        .collect::<Vec<_>>();
        Ok(Snapshot {
            revision: all.revision,
            counted,
            pages: Box::pin(futures::stream::iter(pages)),
        })
    }
}

//! The embedded backend: etcd semantics on a single redb file, for single-node
//! clusters.
//!
//! Layout of the database file (`tables`):
//!
//! * `kv`: key → record (create/mod revision, version, lease, value).
//! * `meta`: the store revision, the compaction point of the watch history, the
//!   next lease id and the on-disk format version.
//! * `history`: revision → every event of that revision, for watch replay. Only
//!   the most recent [`EmbeddedOptions::history_revisions`] revisions are kept;
//!   older ones are compacted in the same write transaction that adds a new one.
//! * `leases`: lease id → TTL in milliseconds. Deadlines are deliberately not
//!   stored (`lease`).
//! * `lease_keys`: lease id → keys attached to it, so that revoking a lease does
//!   not have to scan the whole key space.
//!
//! Writes are group-committed (`commit`): concurrent write transactions share
//! one redb write transaction and one fsync, each keeping its own revision.
//! Reads take a redb snapshot and never wait for a commit. Watches (`watch`)
//! get live events from a broadcast channel and replay from the history.
//!
//! redb is synchronous and every write commit fsyncs, so commits, scans and
//! history reads run on Tokio's blocking pool (`spawn_blocking`).
//! `block_in_place` was rejected because it panics on the current-thread
//! runtime that `#[tokio::test]` and small tools use. Point reads (`get`, and
//! read-only transactions of single-key gets) run on the caller's thread: a
//! redb read never waits for a commit or its fsync (the header lock is held
//! only while a header is copied in memory), one key is a few pages from
//! redb's cache, and the hand-off to the pool cost more than the read itself
//! (`cargo bench -p metropolis-store --bench store -- get`: 35.8 µs through
//! the pool, 0.61 µs inline).

mod codec;
mod commit;
mod lease;
mod snapshot;
mod tables;
mod watch;

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use redb::{Database, ReadableDatabase};
use tokio::sync::{Notify, broadcast};
use tokio::task::AbortHandle;
use tokio::time::Instant;

pub use self::commit::CommitStats;
use self::commit::{Queue, Write, Written};
use self::lease::{LeaseState, deadline_after, expire_leases};
use self::tables::{
    KV, META, META_REVISION, Opened, backend, init_db, kv_get, kv_prefix, meta_get,
};
use self::watch::{Revision, Watcher};
use crate::{
    KeyValue, LeaseId, Op, OpResult, RangeResponse, Snapshot, Store, StoreError, Txn, TxnResponse,
    WatchStream,
};

/// Tuning knobs of [`EmbeddedStore`]. The defaults suit a production node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmbeddedOptions {
    /// Number of most recent write revisions whose events are kept on disk for
    /// watch replay. Watches starting further back get
    /// [`StoreError::Compacted`].
    pub history_revisions: i64,
    /// Number of revisions buffered in memory per watcher. A watcher that falls
    /// further behind does not slow writers down: it transparently catches up
    /// from the on-disk history (or, if that was compacted meanwhile, ends with
    /// [`StoreError::Compacted`]).
    pub watch_buffer: usize,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        EmbeddedOptions {
            history_revisions: 10_000,
            watch_buffer: 1024,
        }
    }
}

/// A [`Store`] kept in a single redb database file.
///
/// Obtain one with [`EmbeddedStore::open`]. A background task expires leases;
/// it stops when the last `Arc<EmbeddedStore>` is dropped, and open watch
/// streams then end with [`StoreError::Unavailable`].
pub struct EmbeddedStore {
    inner: Arc<Inner>,
    expiry_task: AbortHandle,
}

struct Inner {
    path: PathBuf,
    db: Database,
    options: EmbeddedOptions,
    /// Writes waiting for the next group commit. Only the task draining it
    /// writes, so commits (and the events they publish) are in revision order.
    queue: Mutex<Queue>,
    /// Mirror of the committed revision, updated by the committing task.
    revision: AtomicI64,
    events: broadcast::Sender<Arc<Revision>>,
    leases: Mutex<HashMap<LeaseId, LeaseState>>,
    lease_wakeup: Arc<Notify>,
}

impl EmbeddedStore {
    /// Opens the store at `path`, creating the database file if it does not
    /// exist, with default [`EmbeddedOptions`].
    ///
    /// This is async because the file is opened on the blocking pool and the
    /// lease expiry task is spawned on the current Tokio runtime; it must be
    /// called from within a Tokio runtime.
    ///
    /// Only one `EmbeddedStore` may have a given file open at a time; reopening
    /// succeeds once every `Arc` of the previous instance (including in-flight
    /// operations) has been dropped.
    pub async fn open(path: &Path) -> Result<Arc<EmbeddedStore>, StoreError> {
        Self::open_with(path, EmbeddedOptions::default()).await
    }

    /// Like [`EmbeddedStore::open`], with explicit options.
    pub async fn open_with(
        path: &Path,
        options: EmbeddedOptions,
    ) -> Result<Arc<EmbeddedStore>, StoreError> {
        if options.history_revisions < 1 {
            return Err(StoreError::Invalid(
                "history_revisions must be at least 1".into(),
            ));
        }
        if options.watch_buffer < 1 {
            return Err(StoreError::Invalid(
                "watch_buffer must be at least 1".into(),
            ));
        }
        let owned = path.to_path_buf();
        let Opened {
            db,
            revision,
            leases,
        } = tokio::task::spawn_blocking(move || init_db(&owned))
            .await
            .map_err(|e| StoreError::Backend(format!("opening store: worker failed: {e}")))??;

        let now = Instant::now();
        let leases = leases
            .into_iter()
            .map(|(id, ttl)| {
                (
                    id,
                    LeaseState {
                        ttl,
                        deadline: deadline_after(now, ttl),
                    },
                )
            })
            .collect();
        let (events, _) = broadcast::channel(options.watch_buffer);
        let inner = Arc::new(Inner {
            path: path.to_path_buf(),
            db,
            options,
            queue: Mutex::new(Queue::default()),
            revision: AtomicI64::new(revision),
            events,
            leases: Mutex::new(leases),
            lease_wakeup: Arc::new(Notify::new()),
        });
        // The task only holds a Weak so that it never keeps the database open.
        let task = tokio::spawn(expire_leases(
            Arc::downgrade(&inner),
            Arc::clone(&inner.lease_wakeup),
        ));
        tracing::debug!(path = %path.display(), revision, "opened embedded store");
        Ok(Arc::new(EmbeddedStore {
            inner,
            expiry_task: task.abort_handle(),
        }))
    }

    /// Path of the database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    async fn blocking<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
    {
        run_blocking(Arc::clone(&self.inner), f).await
    }
}

impl Drop for EmbeddedStore {
    fn drop(&mut self) {
        self.expiry_task.abort();
    }
}

impl fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("path", &self.inner.path)
            .field("revision", &self.inner.revision.load(Ordering::Acquire))
            .finish_non_exhaustive()
    }
}

async fn run_blocking<T, F>(inner: Arc<Inner>, f: F) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
{
    tokio::task::spawn_blocking(move || f(&inner))
        .await
        .map_err(|e| StoreError::Backend(format!("store worker failed: {e}")))?
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn get(&self, key: &[u8]) -> Result<Option<KeyValue>, StoreError> {
        let txn = self
            .inner
            .db
            .begin_read()
            .map_err(backend("begin read transaction"))?;
        let kv = txn.open_table(KV).map_err(backend("open kv table"))?;
        kv_get(&kv, key)
    }

    async fn snapshot(
        &self,
        count_prefix: &[u8],
        page_keys: usize,
    ) -> Result<Snapshot, StoreError> {
        snapshot::snapshot(Arc::clone(&self.inner), count_prefix.to_vec(), page_keys).await
    }

    async fn range(&self, prefix: &[u8]) -> Result<RangeResponse, StoreError> {
        let prefix = prefix.to_vec();
        self.blocking(move |inner| {
            let txn = inner
                .db
                .begin_read()
                .map_err(backend("begin read transaction"))?;
            let meta = txn.open_table(META).map_err(backend("open meta table"))?;
            let kv = txn.open_table(KV).map_err(backend("open kv table"))?;
            let revision = meta_get(&meta, META_REVISION)?;
            Ok(RangeResponse {
                kvs: kv_prefix(&kv, &prefix)?,
                revision,
            })
        })
        .await
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError> {
        validate_txn(&txn)?;
        let mut scans = false;
        let read_only = txn.success.iter().chain(&txn.failure).all(|op| match op {
            Op::Get { .. } => true,
            Op::GetPrefix { .. } => {
                scans = true;
                true
            }
            _ => false,
        });
        // Read-only transactions take a snapshot instead of a place in the
        // commit queue, so they neither wait for nor delay commits; only
        // those that scan a prefix are worth a trip to the pool.
        match (read_only, scans) {
            (true, false) => return self.inner.read_txn(&txn),
            (true, true) => return self.blocking(move |inner| inner.read_txn(&txn)).await,
            (false, _) => {}
        }
        self.inner.commit_txn(txn).await
    }

    async fn watch(&self, prefix: &[u8], start_revision: i64) -> Result<WatchStream, StoreError> {
        if start_revision < 0 {
            return Err(StoreError::Invalid(format!(
                "watch start revision {start_revision} is negative"
            )));
        }
        // Subscribing before reading the history is what makes the hand-over
        // gap-free: anything committed after the history snapshot is published
        // after this point and therefore reaches `rx`.
        let rx = self.inner.events.subscribe();
        let mut watcher = Watcher {
            inner: Arc::downgrade(&self.inner),
            prefix: prefix.to_vec(),
            rx,
            pending: VecDeque::new(),
            next_revision: start_revision,
            finished: false,
        };
        let prefix = prefix.to_vec();
        match self
            .blocking(move |inner| inner.read_history(&prefix, start_revision))
            .await
        {
            Ok(replay) => watcher.absorb(replay),
            // The trait promises compaction as a stream item, not a call error.
            Err(e @ StoreError::Compacted { .. }) => watcher.fail(e),
            Err(e) => return Err(e),
        }
        Ok(Box::pin(futures::stream::unfold(watcher, Watcher::step)))
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        if ttl.is_zero() {
            return Err(StoreError::Invalid("lease TTL must be positive".into()));
        }
        // Sub-millisecond TTLs round up rather than becoming zero on disk.
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX).max(1);
        // The deadline is registered by the committing task once the lease
        // is durable, so a caller that gives up waiting cannot leave a
        // persisted lease that never expires.
        self.inner
            .grant(Duration::from_millis(ttl_ms.unsigned_abs()))
            .await
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        let now = Instant::now();
        let mut leases = self.inner.lock_leases();
        match leases.get_mut(&lease) {
            // A lease past its deadline is expired even if the expiry task has
            // not got round to revoking it yet (etcd behaves the same).
            Some(state) if state.deadline > now => {
                state.deadline = deadline_after(now, state.ttl);
                Ok(())
            }
            Some(_) => {
                self.inner.lease_wakeup.notify_one();
                Err(StoreError::LeaseNotFound(lease))
            }
            None => Err(StoreError::LeaseNotFound(lease)),
        }
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        match self.inner.submit(Write::Revoke(lease)).await? {
            Written::Revoked => Ok(()),
            other => Err(StoreError::Backend(format!(
                "the store's commit task answered a revocation with {other:?}"
            ))),
        }
    }

    async fn revision(&self) -> Result<i64, StoreError> {
        Ok(self.inner.revision.load(Ordering::Acquire))
    }
}

impl Inner {
    fn lock_leases(&self) -> MutexGuard<'_, HashMap<LeaseId, LeaseState>> {
        // The map is always left consistent between statements, so a panic
        // elsewhere while holding the lock does not invalidate it.
        self.leases.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn read_txn(&self, txn: &Txn) -> Result<TxnResponse, StoreError> {
        let rtxn = self
            .db
            .begin_read()
            .map_err(backend("begin read transaction"))?;
        let meta = rtxn.open_table(META).map_err(backend("open meta table"))?;
        let kv = rtxn.open_table(KV).map_err(backend("open kv table"))?;
        let revision = meta_get(&meta, META_REVISION)?;
        let succeeded = tables::compares_hold(&kv, &txn.compares)?;
        let ops = if succeeded {
            &txn.success
        } else {
            &txn.failure
        };
        let mut results = Vec::with_capacity(ops.len());
        for op in ops {
            results.push(match op {
                Op::Get { key } => OpResult::Get(kv_get(&kv, key)?.into_iter().collect()),
                Op::GetPrefix { prefix } => OpResult::Get(kv_prefix(&kv, prefix)?),
                _ => unreachable!("read-only transaction contains only reads"),
            });
        }
        Ok(TxnResponse {
            succeeded,
            revision,
            results,
        })
    }
}

fn validate_txn(txn: &Txn) -> Result<(), StoreError> {
    for op in txn.success.iter().chain(&txn.failure) {
        match op {
            Op::Put { key, .. } | Op::Delete { key } | Op::Get { key } if key.is_empty() => {
                return Err(StoreError::Invalid("empty key".into()));
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;

//! The embedded backend: etcd semantics on a single redb file, for single-node
//! clusters.
//!
//! Layout of the database file:
//!
//! * `kv`: key → record (create/mod revision, version, lease, value).
//! * `meta`: the store revision, the compaction point of the watch history, the
//!   next lease id and the on-disk format version.
//! * `history`: revision → every event of that revision, for watch replay. Only
//!   the most recent [`EmbeddedOptions::history_revisions`] revisions are kept;
//!   older ones are compacted in the same write transaction that adds a new one.
//! * `leases`: lease id → TTL in milliseconds. Deadlines are deliberately not
//!   stored: like etcd after a leader change, a reopened store gives every
//!   surviving lease a fresh deadline of now + TTL.
//! * `lease_keys`: lease id → keys attached to it, so that revoking a lease does
//!   not have to scan the whole key space.
//!
//! redb is synchronous and every write commit fsyncs, so all database work runs
//! on Tokio's blocking pool (`spawn_blocking`). `block_in_place` was rejected
//! because it panics on the current-thread runtime that `#[tokio::test]` and
//! small tools use.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use async_trait::async_trait;
use redb::{
    Database, MultimapTable, MultimapTableDefinition, ReadableDatabase, ReadableTable, Table,
    TableDefinition,
};
use tokio::sync::{Notify, broadcast};
use tokio::task::AbortHandle;
use tokio::time::Instant;

use crate::{
    Compare, CompareOp, CompareTarget, EventKind, KeyValue, LeaseId, Op, OpResult, RangeResponse,
    Store, StoreError, Txn, TxnResponse, WatchEvent, WatchStream,
};

const KV: TableDefinition<&[u8], &[u8]> = TableDefinition::new("kv");
const META: TableDefinition<&str, i64> = TableDefinition::new("meta");
const HISTORY: TableDefinition<i64, &[u8]> = TableDefinition::new("history");
const LEASES: TableDefinition<i64, i64> = TableDefinition::new("leases");
const LEASE_KEYS: MultimapTableDefinition<i64, &[u8]> = MultimapTableDefinition::new("lease_keys");

const META_FORMAT: &str = "format_version";
const META_REVISION: &str = "revision";
/// Every history entry at or below this revision has been removed.
const META_COMPACTED: &str = "compacted_revision";
const META_NEXT_LEASE: &str = "next_lease_id";

const FORMAT_VERSION: i64 = 1;

/// How long the expiry task waits before retrying a lease whose revocation hit
/// a backend error, so that a failing disk does not turn into a busy loop.
const EXPIRY_RETRY: Duration = Duration::from_secs(1);

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
    /// Held from `begin_write` until the events of the commit are published.
    /// redb already serialises write transactions, but without this lock two
    /// writers could publish their events out of revision order.
    write_lock: Mutex<()>,
    /// Mirror of the committed revision, updated under `write_lock`.
    revision: AtomicI64,
    events: broadcast::Sender<Arc<Batch>>,
    leases: Mutex<HashMap<LeaseId, LeaseState>>,
    lease_wakeup: Arc<Notify>,
}

#[derive(Debug, Clone, Copy)]
struct LeaseState {
    ttl: Duration,
    deadline: Instant,
}

/// All events of one committed revision, as published to live watchers.
#[derive(Debug)]
struct Batch {
    revision: i64,
    events: Vec<WatchEvent>,
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
            write_lock: Mutex::new(()),
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
        let key = key.to_vec();
        self.blocking(move |inner| {
            let txn = inner
                .db
                .begin_read()
                .map_err(backend("begin read transaction"))?;
            let kv = txn.open_table(KV).map_err(backend("open kv table"))?;
            kv_get(&kv, &key)
        })
        .await
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
        self.blocking(move |inner| inner.txn(txn)).await
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
        let ttl = Duration::from_millis(ttl_ms.unsigned_abs());
        // Registering the deadline inside the blocking closure means a caller
        // that gives up waiting cannot leave a persisted lease that never
        // expires.
        self.blocking(move |inner| {
            let (id, _) = inner.write(|w| w.grant(ttl_ms))?;
            let deadline = deadline_after(Instant::now(), ttl);
            inner.lock_leases().insert(id, LeaseState { ttl, deadline });
            inner.lease_wakeup.notify_one();
            Ok(id)
        })
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
        // All in the blocking closure so that a cancelled caller cannot lose
        // the lease between the map and the disk.
        self.blocking(move |inner| {
            // Taking the lease out of the map first means the expiry task
            // cannot revoke it concurrently.
            let state = inner
                .lock_leases()
                .remove(&lease)
                .ok_or(StoreError::LeaseNotFound(lease))?;
            match inner.write(|w| w.revoke(lease)) {
                Ok(_) => Ok(()),
                Err(e @ StoreError::LeaseNotFound(_)) => Err(e),
                Err(e) => {
                    // Still on disk: keep tracking it so that it expires.
                    inner.lock_leases().insert(lease, state);
                    Err(e)
                }
            }
        })
        .await
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

    fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError> {
        let read_only = txn
            .success
            .iter()
            .chain(&txn.failure)
            .all(|op| matches!(op, Op::Get { .. } | Op::GetPrefix { .. }));
        if read_only {
            // Read-only transactions take a snapshot instead of the writer
            // lock, so they neither wait for nor delay commits.
            let rtxn = self
                .db
                .begin_read()
                .map_err(backend("begin read transaction"))?;
            let meta = rtxn.open_table(META).map_err(backend("open meta table"))?;
            let kv = rtxn.open_table(KV).map_err(backend("open kv table"))?;
            let revision = meta_get(&meta, META_REVISION)?;
            let succeeded = compares_hold(&kv, &txn.compares)?;
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
            return Ok(TxnResponse {
                succeeded,
                revision,
                results,
            });
        }

        let ((succeeded, results), revision) = self.write(|w| {
            let succeeded = compares_hold(&w.kv, &txn.compares)?;
            let ops = if succeeded { txn.success } else { txn.failure };
            let mut results = Vec::with_capacity(ops.len());
            for op in ops {
                results.push(match op {
                    Op::Put { key, value, lease } => {
                        w.put(&key, &value, lease)?;
                        OpResult::Put
                    }
                    Op::Delete { key } => OpResult::Delete(i64::from(w.delete(&key)?)),
                    Op::DeletePrefix { prefix } => OpResult::Delete(w.delete_prefix(&prefix)?),
                    Op::Get { key } => OpResult::Get(kv_get(&w.kv, &key)?.into_iter().collect()),
                    Op::GetPrefix { prefix } => OpResult::Get(kv_prefix(&w.kv, &prefix)?),
                });
            }
            Ok((succeeded, results))
        })?;
        Ok(TxnResponse {
            succeeded,
            revision,
            results,
        })
    }

    /// Runs `f` in a write transaction. If `f` produced events the store
    /// revision is bumped, the events are recorded in the history, the commit
    /// is made durable and only then published to watchers. If `f` fails,
    /// nothing is committed. Returns `f`'s output and the store revision after
    /// the transaction.
    fn write<T>(
        &self,
        f: impl FnOnce(&mut Writer<'_>) -> Result<T, StoreError>,
    ) -> Result<(T, i64), StoreError> {
        let _serial = self
            .write_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let txn = self
            .db
            .begin_write()
            .map_err(backend("begin write transaction"))?;
        let (out, events, revision, must_commit) = {
            let meta = txn.open_table(META).map_err(backend("open meta table"))?;
            let current = meta_get(&meta, META_REVISION)?;
            let mut w = Writer {
                meta,
                kv: txn.open_table(KV).map_err(backend("open kv table"))?,
                leases: txn
                    .open_table(LEASES)
                    .map_err(backend("open leases table"))?,
                lease_keys: txn
                    .open_multimap_table(LEASE_KEYS)
                    .map_err(backend("open lease_keys table"))?,
                revision: current + 1,
                events: Vec::new(),
                dirty: false,
            };
            let out = f(&mut w)?;
            let events = std::mem::take(&mut w.events);
            let revision = if events.is_empty() {
                current
            } else {
                w.meta
                    .insert(META_REVISION, w.revision)
                    .map_err(backend("write revision"))?;
                let mut history = txn
                    .open_table(HISTORY)
                    .map_err(backend("open history table"))?;
                history
                    .insert(w.revision, encode_events(&events).as_slice())
                    .map_err(backend("write history"))?;
                self.compact(&mut w.meta, &mut history, w.revision)?;
                w.revision
            };
            let must_commit = w.dirty || !events.is_empty();
            (out, events, revision, must_commit)
        };
        if must_commit {
            txn.commit().map_err(backend("commit write transaction"))?;
        } else {
            // Nothing changed: aborting skips the fsync of an empty commit.
            txn.abort()
                .map_err(backend("abort empty write transaction"))?;
        }
        if !events.is_empty() {
            self.revision.store(revision, Ordering::Release);
            // An error only means nobody is watching right now.
            let _ = self.events.send(Arc::new(Batch { revision, events }));
        }
        Ok((out, revision))
    }

    /// Drops history entries that fell out of the retention window.
    fn compact(
        &self,
        meta: &mut Table<'_, &'static str, i64>,
        history: &mut Table<'_, i64, &'static [u8]>,
        revision: i64,
    ) -> Result<(), StoreError> {
        let compact_to = revision - self.options.history_revisions;
        if compact_to <= meta_get(meta, META_COMPACTED)? {
            return Ok(());
        }
        meta.insert(META_COMPACTED, compact_to)
            .map_err(backend("write compaction point"))?;
        loop {
            let first = history
                .first()
                .map_err(backend("read history"))?
                .map(|(k, _)| k.value());
            match first {
                Some(rev) if rev <= compact_to => {
                    history.remove(rev).map_err(backend("compact history"))?;
                }
                _ => return Ok(()),
            }
        }
    }

    /// Reads the recorded events under `prefix` from revision `from` (0: from
    /// the current revision on, i.e. nothing) up to a snapshot. Returns the
    /// events and the snapshot's revision.
    fn read_history(&self, prefix: &[u8], from: i64) -> Result<Replay, StoreError> {
        let txn = self
            .db
            .begin_read()
            .map_err(backend("begin read transaction"))?;
        let meta = txn.open_table(META).map_err(backend("open meta table"))?;
        let history = txn
            .open_table(HISTORY)
            .map_err(backend("open history table"))?;
        let revision = meta_get(&meta, META_REVISION)?;
        let compacted = meta_get(&meta, META_COMPACTED)?;
        let from = if from == 0 { revision + 1 } else { from };
        if from <= compacted {
            return Err(StoreError::Compacted {
                requested: from,
                oldest: compacted + 1,
            });
        }
        let mut events = Vec::new();
        if from <= revision {
            for entry in history
                .range(from..=revision)
                .map_err(backend("read history"))?
            {
                let (rev, data) = entry.map_err(backend("read history"))?;
                decode_events(rev.value(), data.value(), prefix, &mut events)?;
            }
        }
        Ok(Replay { events, revision })
    }
}

struct Replay {
    events: Vec<WatchEvent>,
    /// Store revision of the snapshot the events were read from.
    revision: i64,
}

/// The tables of one write transaction plus what it has done so far.
struct Writer<'t> {
    kv: Table<'t, &'static [u8], &'static [u8]>,
    leases: Table<'t, i64, i64>,
    lease_keys: MultimapTable<'t, i64, &'static [u8]>,
    meta: Table<'t, &'static str, i64>,
    /// The revision this transaction commits at if it emits any event.
    revision: i64,
    events: Vec<WatchEvent>,
    /// Set for writes that need a commit without bumping the revision.
    dirty: bool,
}

impl Writer<'_> {
    fn put(&mut self, key: &[u8], value: &[u8], lease: LeaseId) -> Result<(), StoreError> {
        if lease != 0
            && self
                .leases
                .get(lease)
                .map_err(backend("read lease"))?
                .is_none()
        {
            return Err(StoreError::LeaseNotFound(lease));
        }
        let previous = kv_get(&self.kv, key)?;
        let (create_revision, version, old_lease) = match &previous {
            Some(kv) => (kv.create_revision, kv.version + 1, kv.lease),
            None => (self.revision, 1, 0),
        };
        if old_lease != 0 && old_lease != lease {
            self.lease_keys
                .remove(old_lease, key)
                .map_err(backend("detach key from lease"))?;
        }
        if lease != 0 {
            self.lease_keys
                .insert(lease, key)
                .map_err(backend("attach key to lease"))?;
        }
        let kv = KeyValue {
            key: key.to_vec(),
            value: value.to_vec(),
            create_revision,
            mod_revision: self.revision,
            version,
            lease,
        };
        self.kv
            .insert(key, encode_record(&kv).as_slice())
            .map_err(backend("write key"))?;
        self.events.push(WatchEvent {
            kind: EventKind::Put,
            kv,
        });
        Ok(())
    }

    fn delete(&mut self, key: &[u8]) -> Result<bool, StoreError> {
        let Some(previous) = kv_get(&self.kv, key)? else {
            return Ok(false);
        };
        self.kv.remove(key).map_err(backend("delete key"))?;
        if previous.lease != 0 {
            self.lease_keys
                .remove(previous.lease, key)
                .map_err(backend("detach key from lease"))?;
        }
        // etcd's delete events carry only the key and the delete's revision.
        self.events.push(WatchEvent {
            kind: EventKind::Delete,
            kv: KeyValue {
                key: key.to_vec(),
                value: Vec::new(),
                create_revision: 0,
                mod_revision: self.revision,
                version: 0,
                lease: 0,
            },
        });
        Ok(true)
    }

    fn delete_prefix(&mut self, prefix: &[u8]) -> Result<i64, StoreError> {
        // Collect first: redb does not allow mutating a table while iterating it.
        let keys: Vec<Vec<u8>> = kv_prefix(&self.kv, prefix)?
            .into_iter()
            .map(|kv| kv.key)
            .collect();
        for key in &keys {
            self.delete(key)?;
        }
        Ok(i64::try_from(keys.len()).unwrap_or(i64::MAX))
    }

    fn grant(&mut self, ttl_ms: i64) -> Result<LeaseId, StoreError> {
        // A persisted counter rather than "highest lease + 1", so that the id
        // of a revoked lease is never handed out again.
        let id = meta_get(&self.meta, META_NEXT_LEASE)?.max(1);
        self.meta
            .insert(META_NEXT_LEASE, id + 1)
            .map_err(backend("write next lease id"))?;
        self.leases
            .insert(id, ttl_ms)
            .map_err(backend("write lease"))?;
        self.dirty = true;
        Ok(id)
    }

    fn revoke(&mut self, lease: LeaseId) -> Result<(), StoreError> {
        if self
            .leases
            .remove(lease)
            .map_err(backend("delete lease"))?
            .is_none()
        {
            return Err(StoreError::LeaseNotFound(lease));
        }
        self.dirty = true;
        let keys = self
            .lease_keys
            .remove_all(lease)
            .map_err(backend("read lease keys"))?
            .map(|k| k.map(|k| k.value().to_vec()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(backend("read lease keys"))?;
        for key in keys {
            self.delete(&key)?;
        }
        Ok(())
    }
}

/// State of one watch stream. It owns no task: dropping the stream drops the
/// broadcast receiver and with it every resource of the watch.
struct Watcher {
    /// Weak so that an open watch does not keep the database open.
    inner: Weak<Inner>,
    prefix: Vec<u8>,
    rx: broadcast::Receiver<Arc<Batch>>,
    pending: VecDeque<Result<WatchEvent, StoreError>>,
    /// Events of revisions below this were delivered (or skipped) already.
    next_revision: i64,
    finished: bool,
}

impl Watcher {
    async fn step(mut self) -> Option<(Result<WatchEvent, StoreError>, Self)> {
        loop {
            if let Some(item) = self.pending.pop_front() {
                return Some((item, self));
            }
            if self.finished {
                return None;
            }
            match self.rx.recv().await {
                Ok(batch) => {
                    // Batches at or below the replayed snapshot were already
                    // delivered from the history.
                    if batch.revision >= self.next_revision {
                        self.next_revision = batch.revision + 1;
                        let events = batch
                            .events
                            .iter()
                            .filter(|e| e.kv.key.starts_with(&self.prefix));
                        self.pending.extend(events.cloned().map(Ok));
                    }
                }
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::debug!(
                        missed,
                        from = self.next_revision,
                        "watcher lagged, replaying history"
                    );
                    self.catch_up().await;
                }
                Err(broadcast::error::RecvError::Closed) => {
                    self.fail(StoreError::Unavailable("store was closed".into()));
                }
            }
        }
    }

    /// Recovers from falling behind the live channel by replaying the missed
    /// revisions from the on-disk history, the same way a new watch starts.
    async fn catch_up(&mut self) {
        self.rx = self.rx.resubscribe();
        let Some(inner) = self.inner.upgrade() else {
            return self.fail(StoreError::Unavailable("store was closed".into()));
        };
        let prefix = self.prefix.clone();
        let from = self.next_revision;
        match run_blocking(inner, move |inner| inner.read_history(&prefix, from)).await {
            Ok(replay) => self.absorb(replay),
            Err(e) => {
                tracing::warn!(error = %e, "watcher fell too far behind and is cancelled");
                self.fail(e);
            }
        }
    }

    fn absorb(&mut self, replay: Replay) {
        self.pending.extend(replay.events.into_iter().map(Ok));
        self.next_revision = self.next_revision.max(replay.revision + 1);
    }

    fn fail(&mut self, error: StoreError) {
        self.pending.push_back(Err(error));
        self.finished = true;
    }
}

/// Revokes leases whose deadline passed. Holds only a Weak reference and is
/// additionally aborted by `EmbeddedStore::drop`.
async fn expire_leases(inner: Weak<Inner>, wakeup: Arc<Notify>) {
    loop {
        let next_deadline = match inner.upgrade() {
            Some(inner) => inner.lock_leases().values().map(|l| l.deadline).min(),
            None => return,
        };
        // Created before sleeping so that a grant in between is not missed
        // (notify_one stores a permit if nobody is waiting yet).
        let notified = wakeup.notified();
        match next_deadline {
            Some(deadline) => tokio::select! {
                () = tokio::time::sleep_until(deadline) => {}
                () = notified => continue,
            },
            None => {
                notified.await;
                continue;
            }
        }

        let Some(strong) = inner.upgrade() else {
            return;
        };
        let now = Instant::now();
        let due: Vec<(LeaseId, LeaseState)> = {
            let mut leases = strong.lock_leases();
            let ids: Vec<LeaseId> = leases
                .iter()
                .filter(|(_, l)| l.deadline <= now)
                .map(|(id, _)| *id)
                .collect();
            ids.into_iter()
                .filter_map(|id| leases.remove(&id).map(|l| (id, l)))
                .collect()
        };
        for (id, state) in due {
            let result =
                run_blocking(Arc::clone(&strong), move |i| i.write(|w| w.revoke(id))).await;
            match result {
                Ok(_) => tracing::debug!(lease = id, "lease expired"),
                Err(StoreError::LeaseNotFound(_)) => {}
                Err(e) => {
                    tracing::warn!(lease = id, error = %e, "failed to expire lease, retrying");
                    strong.lock_leases().insert(
                        id,
                        LeaseState {
                            deadline: deadline_after(Instant::now(), EXPIRY_RETRY),
                            ..state
                        },
                    );
                }
            }
        }
    }
}

/// Opens or creates the database, making sure every table exists so that read
/// transactions never see a missing table. Returns the current revision and
/// the persisted leases.
fn init_db(path: &Path) -> Result<Opened, StoreError> {
    let ctx = |what: &str| format!("{what} {}", path.display());
    let db = Database::create(path)
        .map_err(|e| StoreError::Backend(format!("{}: {e}", ctx("opening database"))))?;
    let txn = db
        .begin_write()
        .map_err(backend("begin write transaction"))?;
    let (revision, leases) = {
        let mut meta = txn.open_table(META).map_err(backend("open meta table"))?;
        txn.open_table(KV).map_err(backend("open kv table"))?;
        txn.open_table(HISTORY)
            .map_err(backend("open history table"))?;
        txn.open_multimap_table(LEASE_KEYS)
            .map_err(backend("open lease_keys table"))?;
        let leases_table = txn
            .open_table(LEASES)
            .map_err(backend("open leases table"))?;

        let format = meta
            .get(META_FORMAT)
            .map_err(backend("read format version"))?
            .map(|v| v.value());
        match format {
            Some(FORMAT_VERSION) => {}
            Some(other) => {
                return Err(StoreError::Backend(format!(
                    "{}: unsupported format version {other} (expected {FORMAT_VERSION})",
                    ctx("opening database")
                )));
            }
            None => {
                meta.insert(META_FORMAT, FORMAT_VERSION)
                    .map_err(backend("write format version"))?;
                // etcd's empty store is at revision 1; the first write makes 2.
                meta.insert(META_REVISION, 1)
                    .map_err(backend("write revision"))?;
                meta.insert(META_COMPACTED, 0)
                    .map_err(backend("write compaction point"))?;
            }
        }
        let revision = meta_get(&meta, META_REVISION)?;
        let mut leases = Vec::new();
        for entry in leases_table.iter().map_err(backend("read leases"))? {
            let (id, ttl_ms) = entry.map_err(backend("read leases"))?;
            leases.push((
                id.value(),
                Duration::from_millis(ttl_ms.value().max(1).unsigned_abs()),
            ));
        }
        (revision, leases)
    };
    txn.commit().map_err(backend("commit initialisation"))?;
    Ok(Opened {
        db,
        revision,
        leases,
    })
}

struct Opened {
    db: Database,
    revision: i64,
    /// Persisted leases and their TTLs.
    leases: Vec<(LeaseId, Duration)>,
}

/// `now + ttl`, saturating far in the future for absurd TTLs instead of
/// panicking on overflow.
fn deadline_after(now: Instant, ttl: Duration) -> Instant {
    const FAR: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    now.checked_add(ttl.min(FAR))
        .unwrap_or_else(|| now + Duration::from_secs(24 * 3600))
}

fn backend<E: fmt::Display>(context: &'static str) -> impl FnOnce(E) -> StoreError {
    move |e| StoreError::Backend(format!("{context}: {e}"))
}

fn meta_get(
    meta: &impl ReadableTable<&'static str, i64>,
    key: &'static str,
) -> Result<i64, StoreError> {
    Ok(meta
        .get(key)
        .map_err(backend("read meta"))?
        .map_or(0, |v| v.value()))
}

fn kv_get(
    table: &impl ReadableTable<&'static [u8], &'static [u8]>,
    key: &[u8],
) -> Result<Option<KeyValue>, StoreError> {
    match table.get(key).map_err(backend("read key"))? {
        Some(record) => decode_record(key, record.value()).map(Some),
        None => Ok(None),
    }
}

fn kv_prefix(
    table: &impl ReadableTable<&'static [u8], &'static [u8]>,
    prefix: &[u8],
) -> Result<Vec<KeyValue>, StoreError> {
    let end = prefix_end(prefix);
    let upper = match &end {
        Some(end) => Bound::Excluded(end.as_slice()),
        None => Bound::Unbounded,
    };
    let range: (Bound<&[u8]>, Bound<&[u8]>) = (Bound::Included(prefix), upper);
    let mut out = Vec::new();
    for entry in table
        .range::<&[u8]>(range)
        .map_err(backend("read key range"))?
    {
        let (key, record) = entry.map_err(backend("read key range"))?;
        out.push(decode_record(key.value(), record.value())?);
    }
    Ok(out)
}

/// The smallest key greater than every key starting with `prefix`, or `None`
/// if there is none (empty prefix or all 0xff), as etcd's `GetPrefixRangeEnd`.
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

fn compares_hold(
    table: &impl ReadableTable<&'static [u8], &'static [u8]>,
    compares: &[Compare],
) -> Result<bool, StoreError> {
    for c in compares {
        if !compare_holds(kv_get(table, &c.key)?.as_ref(), c) {
            return Ok(false);
        }
    }
    Ok(true)
}

fn compare_holds(kv: Option<&KeyValue>, c: &Compare) -> bool {
    let ordering = match (&c.target, kv) {
        // etcd: a value compare against a missing key fails whatever the
        // operator, since there is no value to compare with.
        (CompareTarget::Value(_), None) => return false,
        (CompareTarget::Value(v), Some(kv)) => kv.value.as_slice().cmp(v.as_slice()),
        (CompareTarget::CreateRevision(r), kv) => kv.map_or(0, |kv| kv.create_revision).cmp(r),
        (CompareTarget::ModRevision(r), kv) => kv.map_or(0, |kv| kv.mod_revision).cmp(r),
        (CompareTarget::Version(v), kv) => kv.map_or(0, |kv| kv.version).cmp(v),
    };
    match c.op {
        CompareOp::Equal => ordering.is_eq(),
        CompareOp::NotEqual => ordering.is_ne(),
        CompareOp::Greater => ordering.is_gt(),
        CompareOp::Less => ordering.is_lt(),
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

// Record encoding: create_revision, mod_revision, version, lease as
// little-endian i64, followed by the value. The key is the table key.
const RECORD_HEADER: usize = 32;

fn encode_record(kv: &KeyValue) -> Vec<u8> {
    let mut out = Vec::with_capacity(RECORD_HEADER + kv.value.len());
    for n in [kv.create_revision, kv.mod_revision, kv.version, kv.lease] {
        out.extend_from_slice(&n.to_le_bytes());
    }
    out.extend_from_slice(&kv.value);
    out
}

fn decode_record(key: &[u8], data: &[u8]) -> Result<KeyValue, StoreError> {
    let corrupt = || StoreError::Backend(format!("corrupt record for key {}", key.escape_ascii()));
    let mut r = Reader { data };
    let create_revision = r.i64().ok_or_else(corrupt)?;
    let mod_revision = r.i64().ok_or_else(corrupt)?;
    let version = r.i64().ok_or_else(corrupt)?;
    let lease = r.i64().ok_or_else(corrupt)?;
    Ok(KeyValue {
        key: key.to_vec(),
        value: r.data.to_vec(),
        create_revision,
        mod_revision,
        version,
        lease,
    })
}

// History encoding, per revision: u32 event count, then per event: u8 kind,
// u32 key length, key, u32 value length, value, create_revision, version,
// lease (i64). mod_revision is the revision itself.
fn encode_events(events: &[WatchEvent]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&len_u32(events.len()).to_le_bytes());
    for e in events {
        out.push(match e.kind {
            EventKind::Put => 0,
            EventKind::Delete => 1,
        });
        for bytes in [&e.kv.key, &e.kv.value] {
            out.extend_from_slice(&len_u32(bytes.len()).to_le_bytes());
            out.extend_from_slice(bytes);
        }
        for n in [e.kv.create_revision, e.kv.version, e.kv.lease] {
            out.extend_from_slice(&n.to_le_bytes());
        }
    }
    out
}

fn len_u32(len: usize) -> u32 {
    // redb refuses keys and values of 4 GiB or more, so stored lengths fit.
    u32::try_from(len).unwrap_or(u32::MAX)
}

fn decode_events(
    revision: i64,
    data: &[u8],
    prefix: &[u8],
    out: &mut Vec<WatchEvent>,
) -> Result<(), StoreError> {
    let corrupt = || StoreError::Backend(format!("corrupt history entry at revision {revision}"));
    let mut r = Reader { data };
    let count = r.u32().ok_or_else(corrupt)?;
    for _ in 0..count {
        let kind = match r.u8().ok_or_else(corrupt)? {
            0 => EventKind::Put,
            1 => EventKind::Delete,
            _ => return Err(corrupt()),
        };
        let key = r.bytes().ok_or_else(corrupt)?;
        let value = r.bytes().ok_or_else(corrupt)?;
        let create_revision = r.i64().ok_or_else(corrupt)?;
        let version = r.i64().ok_or_else(corrupt)?;
        let lease = r.i64().ok_or_else(corrupt)?;
        if key.starts_with(prefix) {
            out.push(WatchEvent {
                kind,
                kv: KeyValue {
                    key: key.to_vec(),
                    value: value.to_vec(),
                    create_revision,
                    mod_revision: revision,
                    version,
                    lease,
                },
            });
        }
    }
    if !r.data.is_empty() {
        return Err(corrupt());
    }
    Ok(())
}

struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.data.len() < n {
            return None;
        }
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)?.try_into().ok().map(u32::from_le_bytes)
    }
    fn i64(&mut self) -> Option<i64> {
        self.take(8)?.try_into().ok().map(i64::from_le_bytes)
    }
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let len = usize::try_from(self.u32()?).ok()?;
        self.take(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use tempfile::TempDir;

    const WAIT: Duration = Duration::from_secs(5);

    fn db_path(dir: &TempDir) -> PathBuf {
        dir.path().join("store.redb")
    }

    async fn open(dir: &TempDir) -> Arc<EmbeddedStore> {
        EmbeddedStore::open(&db_path(dir))
            .await
            .expect("open store")
    }

    async fn open_with(dir: &TempDir, options: EmbeddedOptions) -> Arc<EmbeddedStore> {
        EmbeddedStore::open_with(&db_path(dir), options)
            .await
            .expect("open store")
    }

    async fn put(store: &EmbeddedStore, key: &str, value: &str) -> i64 {
        let resp = store
            .txn(Txn::new().and_then(Op::put(key, value)))
            .await
            .expect("put");
        assert!(resp.succeeded);
        resp.revision
    }

    async fn put_leased(store: &EmbeddedStore, key: &str, lease: LeaseId) -> i64 {
        let op = Op::Put {
            key: key.into(),
            value: b"v".to_vec(),
            lease,
        };
        store
            .txn(Txn::new().and_then(op))
            .await
            .expect("put")
            .revision
    }

    async fn next(stream: &mut WatchStream) -> WatchEvent {
        tokio::time::timeout(WAIT, stream.next())
            .await
            .expect("timed out waiting for a watch event")
            .expect("watch stream ended")
            .expect("watch stream error")
    }

    async fn assert_quiet(stream: &mut WatchStream) {
        let r = tokio::time::timeout(Duration::from_millis(50), stream.next()).await;
        assert!(r.is_err(), "unexpected watch item: {r:?}");
    }

    fn kv(key: &str, value: &str, create: i64, modr: i64, version: i64) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: value.into(),
            create_revision: create,
            mod_revision: modr,
            version,
            lease: 0,
        }
    }

    fn get_result(resp: &TxnResponse, i: usize) -> &[KeyValue] {
        match &resp.results[i] {
            OpResult::Get(kvs) => kvs,
            other => panic!("result {i} is {other:?}, not a get"),
        }
    }

    #[tokio::test]
    async fn revisions_and_metadata() {
        let dir = TempDir::new().unwrap();
        let s = open(&dir).await;
        assert_eq!(s.revision().await.unwrap(), 1);
        assert_eq!(
            s.range(b"").await.unwrap(),
            RangeResponse {
                kvs: vec![],
                revision: 1
            }
        );

        assert_eq!(put(&s, "a", "1").await, 2);
        assert_eq!(s.get(b"a").await.unwrap(), Some(kv("a", "1", 2, 2, 1)));
        assert_eq!(put(&s, "a", "2").await, 3);
        assert_eq!(s.get(b"a").await.unwrap(), Some(kv("a", "2", 2, 3, 2)));
        assert_eq!(put(&s, "b", "1").await, 4);

        // Neither reads nor deletes of nothing bump the revision.
        let r = s.txn(Txn::new().and_then(Op::get("a"))).await.unwrap();
        assert_eq!(r.revision, 4);
        let r = s
            .txn(Txn::new().and_then(Op::delete("missing")))
            .await
            .unwrap();
        assert_eq!(
            (r.revision, &r.results[..]),
            (4, &[OpResult::Delete(0)][..])
        );
        assert_eq!(s.revision().await.unwrap(), 4);

        let r = s.txn(Txn::new().and_then(Op::delete("a"))).await.unwrap();
        assert_eq!(
            (r.revision, &r.results[..]),
            (5, &[OpResult::Delete(1)][..])
        );
        assert_eq!(s.get(b"a").await.unwrap(), None);
        // Version and create revision restart after a delete.
        assert_eq!(put(&s, "a", "3").await, 6);
        assert_eq!(s.get(b"a").await.unwrap(), Some(kv("a", "3", 6, 6, 1)));

        let range = s.range(b"").await.unwrap();
        assert_eq!(range.revision, 6);
        assert_eq!(
            range.kvs,
            vec![kv("a", "3", 6, 6, 1), kv("b", "1", 4, 4, 1)]
        );
        assert_eq!(s.revision().await.unwrap(), 6);
    }

    #[tokio::test]
    async fn cas_branches() {
        let dir = TempDir::new().unwrap();
        let s = open(&dir).await;

        let create = || {
            Txn::new()
                .when(Compare::absent("k"))
                .and_then(Op::put("k", "first"))
                .or_else(Op::get("k"))
        };
        let r = s.txn(create()).await.unwrap();
        assert!(r.succeeded);
        assert_eq!((r.revision, &r.results[..]), (2, &[OpResult::Put][..]));
        let r = s.txn(create()).await.unwrap();
        assert!(!r.succeeded);
        assert_eq!(r.revision, 2);
        assert_eq!(get_result(&r, 0), [kv("k", "first", 2, 2, 1)]);

        // Stale mod revision fails and runs the failure branch's write.
        let r = s
            .txn(
                Txn::new()
                    .when(Compare::mod_revision("k", 1))
                    .and_then(Op::put("k", "won"))
                    .or_else(Op::put("conflicts", "1")),
            )
            .await
            .unwrap();
        assert!(!r.succeeded);
        assert_eq!(r.revision, 3);
        assert_eq!(s.get(b"k").await.unwrap().unwrap().value, b"first");

        let r = s
            .txn(
                Txn::new()
                    .when(Compare::mod_revision("k", 2))
                    .and_then(Op::put("k", "second")),
            )
            .await
            .unwrap();
        assert!(r.succeeded);
        assert_eq!(r.revision, 4);

        let check = |key: &str, op, target| {
            Txn::new().when(Compare {
                key: key.into(),
                op,
                target,
            })
        };
        let cases = [
            (
                "k",
                CompareOp::Equal,
                CompareTarget::Value(b"second".to_vec()),
                true,
            ),
            (
                "k",
                CompareOp::NotEqual,
                CompareTarget::Value(b"second".to_vec()),
                false,
            ),
            (
                "k",
                CompareOp::Greater,
                CompareTarget::Value(b"s".to_vec()),
                true,
            ),
            (
                "k",
                CompareOp::Less,
                CompareTarget::Value(b"t".to_vec()),
                true,
            ),
            ("k", CompareOp::Equal, CompareTarget::Version(2), true),
            ("k", CompareOp::Greater, CompareTarget::Version(2), false),
            ("k", CompareOp::Less, CompareTarget::Version(3), true),
            (
                "k",
                CompareOp::Equal,
                CompareTarget::CreateRevision(2),
                true,
            ),
            ("k", CompareOp::Greater, CompareTarget::ModRevision(3), true),
            // Missing keys: revisions and version compare as 0 ...
            ("nope", CompareOp::Equal, CompareTarget::Version(0), true),
            (
                "nope",
                CompareOp::Equal,
                CompareTarget::ModRevision(0),
                true,
            ),
            (
                "nope",
                CompareOp::Less,
                CompareTarget::CreateRevision(1),
                true,
            ),
            // ... and any value compare fails, as in etcd.
            (
                "nope",
                CompareOp::Equal,
                CompareTarget::Value(vec![]),
                false,
            ),
            (
                "nope",
                CompareOp::NotEqual,
                CompareTarget::Value(b"x".to_vec()),
                false,
            ),
            (
                "nope",
                CompareOp::Less,
                CompareTarget::Value(b"x".to_vec()),
                false,
            ),
        ];
        for (key, op, target, expected) in cases {
            let r = s.txn(check(key, op, target.clone())).await.unwrap();
            assert_eq!(r.succeeded, expected, "{key} {op:?} {target:?}");
        }
        // Multiple compares: all must hold.
        let r = s
            .txn(
                Txn::new()
                    .when(Compare::value_equals("k", "second"))
                    .when(Compare::absent("k"))
                    .and_then(Op::put("x", "1")),
            )
            .await
            .unwrap();
        assert!(!r.succeeded);
        assert_eq!(s.revision().await.unwrap(), 4);
    }

    #[tokio::test]
    async fn txn_reads_its_own_writes() {
        let dir = TempDir::new().unwrap();
        let s = open(&dir).await;
        put(&s, "gone", "x").await;
        let r = s
            .txn(
                Txn::new()
                    .and_then(Op::put("a", "1"))
                    .and_then(Op::get("a"))
                    .and_then(Op::put("a", "2"))
                    .and_then(Op::put("b", "1"))
                    .and_then(Op::delete("gone"))
                    .and_then(Op::get("gone"))
                    .and_then(Op::GetPrefix { prefix: vec![] }),
            )
            .await
            .unwrap();
        assert_eq!(r.revision, 3);
        assert_eq!(get_result(&r, 1), [kv("a", "1", 3, 3, 1)]);
        assert_eq!(r.results[4], OpResult::Delete(1));
        assert!(get_result(&r, 5).is_empty());
        assert_eq!(
            get_result(&r, 6),
            [kv("a", "2", 3, 3, 2), kv("b", "1", 3, 3, 1)]
        );
        // One revision for the whole transaction.
        assert_eq!(s.revision().await.unwrap(), 3);
    }

    #[tokio::test]
    async fn delete_prefix_and_ranges() {
        let dir = TempDir::new().unwrap();
        let s = open(&dir).await;
        for key in ["a/1", "a/2", "a", "ab", "b"] {
            put(&s, key, "v").await;
        }
        let s2 = &s;
        let keys = |prefix: &'static [u8]| async move {
            s2.range(prefix)
                .await
                .unwrap()
                .kvs
                .into_iter()
                .map(|kv| kv.key)
                .collect::<Vec<_>>()
        };
        assert_eq!(keys(b"a/").await, [b"a/1".to_vec(), b"a/2".to_vec()]);
        assert_eq!(keys(b"a").await.len(), 4);

        let r = s
            .txn(Txn::new().and_then(Op::DeletePrefix {
                prefix: b"a/".to_vec(),
            }))
            .await
            .unwrap();
        assert_eq!(
            (r.revision, &r.results[..]),
            (7, &[OpResult::Delete(2)][..])
        );
        assert_eq!(
            keys(b"").await,
            [b"a".to_vec(), b"ab".to_vec(), b"b".to_vec()]
        );

        // Prefixes ending in 0xff have no simple successor.
        for key in [&[0xff][..], &[0xff, 0xff, 1], &[0xfe, 0xff], &[0xff, 0]] {
            s.txn(Txn::new().and_then(Op::Put {
                key: key.to_vec(),
                value: vec![],
                lease: 0,
            }))
            .await
            .unwrap();
        }
        let range = s.range(&[0xff]).await.unwrap();
        let got: Vec<_> = range.kvs.into_iter().map(|kv| kv.key).collect();
        assert_eq!(got, [vec![0xff], vec![0xff, 0], vec![0xff, 0xff, 1]]);
        assert_eq!(s.range(&[0xfe]).await.unwrap().kvs.len(), 1);

        let r = s
            .txn(Txn::new().and_then(Op::DeletePrefix { prefix: vec![] }))
            .await
            .unwrap();
        assert_eq!(r.results, [OpResult::Delete(7)]);
        assert!(s.range(b"").await.unwrap().kvs.is_empty());
        // Deleting a prefix with nothing under it is not a write.
        let before = s.revision().await.unwrap();
        let r = s
            .txn(Txn::new().and_then(Op::DeletePrefix {
                prefix: b"z".to_vec(),
            }))
            .await
            .unwrap();
        assert_eq!(r.revision, before);
    }

    #[tokio::test]
    async fn invalid_requests() {
        let dir = TempDir::new().unwrap();
        let s = open(&dir).await;
        let err = s
            .txn(Txn::new().and_then(Op::put("", "v")))
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Invalid(_)), "{err}");
        assert!(matches!(
            s.watch(b"", -1).await,
            Err(StoreError::Invalid(_))
        ));
        assert!(matches!(
            s.grant_lease(Duration::ZERO).await,
            Err(StoreError::Invalid(_))
        ));
        // Absurd TTLs saturate instead of overflowing the deadline.
        let lease = s.grant_lease(Duration::MAX).await.unwrap();
        s.keep_alive(lease).await.unwrap();
        s.revoke_lease(lease).await.unwrap();
    }

    #[tokio::test]
    async fn durable_across_reopen() {
        let dir = TempDir::new().unwrap();
        let (range, lease) = {
            let s = open(&dir).await;
            put(&s, "a", "1").await;
            put(&s, "a", "2").await;
            put(&s, "b", "1").await;
            s.txn(Txn::new().and_then(Op::delete("b"))).await.unwrap();
            let lease = s.grant_lease(Duration::from_secs(60)).await.unwrap();
            put_leased(&s, "leased", lease).await;
            (s.range(b"").await.unwrap(), lease)
        };
        assert_eq!(range.revision, 6);

        let s = open(&dir).await;
        assert_eq!(s.range(b"").await.unwrap(), range);
        assert_eq!(s.revision().await.unwrap(), 6);
        assert_eq!(s.get(b"leased").await.unwrap().unwrap().lease, lease);
        // The lease survived and is still attached to its key.
        s.keep_alive(lease).await.unwrap();
        // History survived too.
        let mut w = s.watch(b"", 2).await.unwrap();
        let mut got = Vec::new();
        for _ in 0..5 {
            let e = next(&mut w).await;
            got.push((e.kind, e.kv.key, e.kv.mod_revision));
        }
        assert_eq!(
            got,
            [
                (EventKind::Put, b"a".to_vec(), 2),
                (EventKind::Put, b"a".to_vec(), 3),
                (EventKind::Put, b"b".to_vec(), 4),
                (EventKind::Delete, b"b".to_vec(), 5),
                (EventKind::Put, b"leased".to_vec(), 6),
            ]
        );
        assert_eq!(put(&s, "c", "1").await, 7);
        s.revoke_lease(lease).await.unwrap();
        assert_eq!(s.get(b"leased").await.unwrap(), None);
        // Lease ids are not reused after a restart.
        let next_lease = s.grant_lease(Duration::from_secs(60)).await.unwrap();
        assert!(next_lease > lease);
    }

    #[tokio::test]
    async fn watch_live_events() {
        let dir = TempDir::new().unwrap();
        let s = open(&dir).await;
        put(&s, "p/old", "x").await;
        let mut w = s.watch(b"p/", 0).await.unwrap();
        assert_quiet(&mut w).await;

        put(&s, "other", "x").await;
        put(&s, "p/a", "1").await;
        s.txn(
            Txn::new()
                .and_then(Op::put("p/b", "1"))
                .and_then(Op::delete("p/old")),
        )
        .await
        .unwrap();

        assert_eq!(
            next(&mut w).await,
            WatchEvent {
                kind: EventKind::Put,
                kv: kv("p/a", "1", 4, 4, 1)
            }
        );
        assert_eq!(
            next(&mut w).await,
            WatchEvent {
                kind: EventKind::Put,
                kv: kv("p/b", "1", 5, 5, 1)
            }
        );
        assert_eq!(
            next(&mut w).await,
            WatchEvent {
                kind: EventKind::Delete,
                kv: kv("p/old", "", 0, 5, 0)
            }
        );
        assert_quiet(&mut w).await;

        // A watch starting in the future skips revisions before it.
        let mut later = s.watch(b"p/", 7).await.unwrap();
        put(&s, "p/a", "2").await; // 6
        put(&s, "p/a", "3").await; // 7
        assert_eq!(next(&mut later).await.kv.mod_revision, 7);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn watch_replays_then_goes_live_without_gap_or_duplicate() {
        let dir = TempDir::new().unwrap();
        let s = open(&dir).await;
        for i in 0..20 {
            put(&s, &format!("k{i}"), "v").await;
        }
        // Watches keep starting while a writer commits, so that some of them
        // hand over from history to the live channel right as a revision is
        // committed and published.
        let writer = {
            let s = Arc::clone(&s);
            tokio::spawn(async move {
                for i in 0..100 {
                    put(&s, &format!("k{i}"), "w").await;
                }
            })
        };
        let mut watches = Vec::new();
        while !writer.is_finished() {
            watches.push(s.watch(b"", 5).await.unwrap());
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        writer.await.unwrap();
        assert!(watches.len() > 10, "only {} watches started", watches.len());
        for w in &mut watches {
            let mut revisions = Vec::new();
            while revisions.last() != Some(&121) {
                revisions.push(next(w).await.kv.mod_revision);
            }
            assert_eq!(revisions, (5..=121).collect::<Vec<_>>());
        }
        put(&s, "last", "v").await;
        for w in &mut watches {
            assert_eq!(
                next(w).await.kv.mod_revision,
                122,
                "duplicate or missing event"
            );
        }
    }

    #[tokio::test]
    async fn watch_of_compacted_revision_fails() {
        let dir = TempDir::new().unwrap();
        let s = open_with(
            &dir,
            EmbeddedOptions {
                history_revisions: 5,
                ..Default::default()
            },
        )
        .await;
        for i in 0..20 {
            put(&s, "k", &i.to_string()).await;
        }
        // Revision 21 is current; 17..=21 are kept.
        let mut w = s.watch(b"", 16).await.unwrap();
        let err = w.next().await.unwrap().unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::Compacted {
                    requested: 16,
                    oldest: 17
                }
            ),
            "unexpected error {err}"
        );
        assert!(w.next().await.is_none());

        let mut w = s.watch(b"", 17).await.unwrap();
        for rev in 17..=21 {
            assert_eq!(next(&mut w).await.kv.mod_revision, rev);
        }
        // Compaction state survives a reopen.
        drop(w);
        drop(s);
        let s = open_with(
            &dir,
            EmbeddedOptions {
                history_revisions: 5,
                ..Default::default()
            },
        )
        .await;
        let mut w = s.watch(b"", 3).await.unwrap();
        assert!(matches!(
            w.next().await,
            Some(Err(StoreError::Compacted { .. }))
        ));
    }

    #[tokio::test]
    async fn lagging_watcher_catches_up_from_history() {
        let dir = TempDir::new().unwrap();
        let s = open_with(
            &dir,
            EmbeddedOptions {
                history_revisions: 1000,
                watch_buffer: 4,
            },
        )
        .await;
        let mut w = s.watch(b"", 0).await.unwrap();
        // Writers are never blocked by a watcher that does not read.
        for i in 0..50 {
            put(&s, &format!("k{i}"), "v").await;
        }
        let mut revisions = Vec::new();
        for _ in 0..50 {
            revisions.push(next(&mut w).await.kv.mod_revision);
        }
        assert_eq!(revisions, (2..=51).collect::<Vec<_>>());
        assert_quiet(&mut w).await;
        put(&s, "live", "v").await;
        assert_eq!(next(&mut w).await.kv.mod_revision, 52);
    }

    #[tokio::test]
    async fn watcher_lagging_beyond_history_errors() {
        let dir = TempDir::new().unwrap();
        let s = open_with(
            &dir,
            EmbeddedOptions {
                history_revisions: 10,
                watch_buffer: 4,
            },
        )
        .await;
        let mut w = s.watch(b"", 0).await.unwrap();
        for i in 0..30 {
            put(&s, &format!("k{i}"), "v").await;
        }
        // The first buffered events may still arrive, then the gap is reported.
        let err = loop {
            match tokio::time::timeout(WAIT, w.next()).await.unwrap() {
                Some(Ok(_)) => continue,
                Some(Err(e)) => break e,
                None => panic!("stream ended without an error"),
            }
        };
        assert!(
            matches!(err, StoreError::Compacted { .. }),
            "unexpected error {err}"
        );
        assert!(w.next().await.is_none());
    }

    #[tokio::test]
    async fn dropping_streams_and_store_frees_resources() {
        let dir = TempDir::new().unwrap();
        let s = open(&dir).await;
        let w1 = s.watch(b"a", 0).await.unwrap();
        let mut w2 = s.watch(b"", 0).await.unwrap();
        assert_eq!(s.inner.events.receiver_count(), 2);
        drop(w1);
        assert_eq!(s.inner.events.receiver_count(), 1);

        let weak = Arc::downgrade(&s.inner);
        drop(s);
        // Open watches do not keep the store alive: they end.
        let item = tokio::time::timeout(WAIT, w2.next()).await.unwrap();
        assert!(
            matches!(item, Some(Err(StoreError::Unavailable(_)))),
            "{item:?}"
        );
        assert!(w2.next().await.is_none());
        assert!(weak.upgrade().is_none());
        // And the file can be opened again right away.
        let s = open(&dir).await;
        assert_eq!(s.revision().await.unwrap(), 1);
    }

    #[tokio::test]
    async fn lease_expiry_deletes_keys() {
        let dir = TempDir::new().unwrap();
        let s = open(&dir).await;
        let lease = s.grant_lease(Duration::from_millis(200)).await.unwrap();
        put_leased(&s, "l/a", lease).await;
        put_leased(&s, "l/b", lease).await;
        put(&s, "l/c", "unleased").await;
        let mut w = s.watch(b"l/", 0).await.unwrap();

        let started = Instant::now();
        let a = next(&mut w).await;
        let b = next(&mut w).await;
        assert!(started.elapsed() < Duration::from_secs(2));
        assert_eq!((a.kind, b.kind), (EventKind::Delete, EventKind::Delete));
        assert_eq!(
            (a.kv.key.as_slice(), b.kv.key.as_slice()),
            (&b"l/a"[..], &b"l/b"[..])
        );
        // Both keys go in one transaction.
        assert_eq!((a.kv.mod_revision, b.kv.mod_revision), (5, 5));
        assert_eq!(s.revision().await.unwrap(), 5);

        let left: Vec<_> = s
            .range(b"l/")
            .await
            .unwrap()
            .kvs
            .into_iter()
            .map(|kv| kv.key)
            .collect();
        assert_eq!(left, [b"l/c".to_vec()]);
        assert!(
            matches!(s.keep_alive(lease).await, Err(StoreError::LeaseNotFound(id)) if id == lease)
        );
        let err = s
            .txn(Txn::new().and_then(Op::Put {
                key: b"x".to_vec(),
                value: vec![],
                lease,
            }))
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::LeaseNotFound(_)));
    }

    #[tokio::test]
    async fn revoke_deletes_keys_in_one_revision() {
        let dir = TempDir::new().unwrap();
        let s = open(&dir).await;
        let lease = s.grant_lease(Duration::from_secs(60)).await.unwrap();
        let other = s.grant_lease(Duration::from_secs(60)).await.unwrap();
        assert_ne!(lease, other);
        // Granting is not a key-space write.
        assert_eq!(s.revision().await.unwrap(), 1);
        put_leased(&s, "a", lease).await;
        put_leased(&s, "b", lease).await;
        put_leased(&s, "c", other).await;
        // Re-putting without the lease detaches the key from it.
        put_leased(&s, "d", lease).await;
        put(&s, "d", "kept").await;
        let mut w = s.watch(b"", 0).await.unwrap();

        s.revoke_lease(lease).await.unwrap();
        let (a, b) = (next(&mut w).await, next(&mut w).await);
        assert_eq!(
            (a.kind, a.kv.key.as_slice(), a.kv.mod_revision),
            (EventKind::Delete, &b"a"[..], 7)
        );
        assert_eq!(
            (b.kind, b.kv.key.as_slice(), b.kv.mod_revision),
            (EventKind::Delete, &b"b"[..], 7)
        );
        assert_quiet(&mut w).await;
        let left: Vec<_> = s
            .range(b"")
            .await
            .unwrap()
            .kvs
            .into_iter()
            .map(|kv| kv.key)
            .collect();
        assert_eq!(left, [b"c".to_vec(), b"d".to_vec()]);

        assert!(matches!(
            s.revoke_lease(lease).await,
            Err(StoreError::LeaseNotFound(_))
        ));
        assert!(matches!(
            s.keep_alive(lease).await,
            Err(StoreError::LeaseNotFound(_))
        ));
        // A put to a dead lease fails the whole transaction.
        let err = s
            .txn(Txn::new().and_then(Op::put("e", "v")).and_then(Op::Put {
                key: b"f".to_vec(),
                value: vec![],
                lease,
            }))
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::LeaseNotFound(id) if id == lease));
        assert_eq!(s.get(b"e").await.unwrap(), None);
        assert_eq!(s.revision().await.unwrap(), 7);
        assert!(matches!(
            s.revoke_lease(12345).await,
            Err(StoreError::LeaseNotFound(12345))
        ));

        // Revoking a lease without keys does not bump the revision.
        s.txn(Txn::new().and_then(Op::delete("c"))).await.unwrap();
        s.revoke_lease(other).await.unwrap();
        assert_eq!(s.revision().await.unwrap(), 8);
    }

    #[tokio::test]
    async fn keep_alive_extends_lease() {
        let dir = TempDir::new().unwrap();
        let s = open(&dir).await;
        let lease = s.grant_lease(Duration::from_millis(300)).await.unwrap();
        put_leased(&s, "k", lease).await;
        // Well past the original TTL, kept alive every 100 ms.
        for _ in 0..7 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            s.keep_alive(lease).await.unwrap();
        }
        assert!(s.get(b"k").await.unwrap().is_some());
        let stopped = Instant::now();
        let mut w = s.watch(b"k", 0).await.unwrap();
        assert_eq!(next(&mut w).await.kind, EventKind::Delete);
        let lived = stopped.elapsed();
        assert!(
            lived >= Duration::from_millis(150),
            "expired after only {lived:?}"
        );
        assert_eq!(s.get(b"k").await.unwrap(), None);
    }

    #[tokio::test]
    async fn leases_restart_their_ttl_after_reopen() {
        let dir = TempDir::new().unwrap();
        let lease = {
            let s = open(&dir).await;
            let lease = s.grant_lease(Duration::from_millis(300)).await.unwrap();
            put_leased(&s, "k", lease).await;
            lease
        };
        tokio::time::sleep(Duration::from_millis(350)).await;
        let s = open(&dir).await;
        // The old deadline passed while closed, but the lease gets a fresh TTL.
        s.keep_alive(lease).await.unwrap();
        let mut w = s.watch(b"k", 0).await.unwrap();
        assert_eq!(next(&mut w).await.kind, EventKind::Delete);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writers_get_consecutive_revisions() {
        let dir = TempDir::new().unwrap();
        let s = open(&dir).await;
        let mut w = s.watch(b"", 0).await.unwrap();
        let tasks: Vec<_> = (0..8)
            .map(|t| {
                let s = Arc::clone(&s);
                tokio::spawn(async move {
                    let mut revs = Vec::new();
                    for i in 0..25 {
                        revs.push(put(&s, &format!("t{t}/{i}"), "v").await);
                    }
                    revs
                })
            })
            .collect();
        let mut all = Vec::new();
        for t in tasks {
            let revs = t.await.unwrap();
            assert!(
                revs.windows(2).all(|p| p[0] < p[1]),
                "per-task order {revs:?}"
            );
            all.extend(revs);
        }
        all.sort_unstable();
        assert_eq!(all, (2..=201).collect::<Vec<_>>());
        assert_eq!(s.revision().await.unwrap(), 201);
        // Watchers see them in revision order.
        for rev in 2..=201 {
            assert_eq!(next(&mut w).await.kv.mod_revision, rev);
        }
    }

    #[test]
    fn prefix_end_matches_etcd() {
        assert_eq!(prefix_end(b""), None);
        assert_eq!(prefix_end(b"a"), Some(b"b".to_vec()));
        assert_eq!(prefix_end(&[b'a', 0xff]), Some(b"b".to_vec()));
        assert_eq!(prefix_end(&[0xff, 0xff]), None);
    }

    #[test]
    fn corrupt_records_are_errors() {
        assert!(matches!(
            decode_record(b"k", &[1, 2, 3]),
            Err(StoreError::Backend(_))
        ));
        let mut out = Vec::new();
        let mut data = encode_events(&[WatchEvent {
            kind: EventKind::Put,
            kv: kv("k", "v", 1, 2, 1),
        }]);
        decode_events(2, &data, b"", &mut out).unwrap();
        assert_eq!(out[0].kv, kv("k", "v", 1, 2, 1));
        data.push(0);
        assert!(decode_events(2, &data, b"", &mut out).is_err());
        data.truncate(10);
        assert!(decode_events(2, &data, b"", &mut out).is_err());
    }
}

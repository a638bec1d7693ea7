//! Group commit: every write of the store goes through one queue, and
//! whatever queued up while the previous commit was on disk is applied in
//! one redb write transaction with one fsync.
//!
//! Each write of a batch is still its own store transaction: it gets its
//! own revision (if it changed anything), its compares see the state after
//! the writes before it in the batch, and its caller is answered only once
//! the batch's commit is durable. A write that fails on its own (a lease
//! that does not exist) fails before it wrote anything, so the rest of its
//! batch commits without it; a backend error fails the whole batch, and
//! nothing of it is committed.
//!
//! There is no committer thread: the first writer to find the queue idle
//! starts a blocking task that drains it, batch by batch, until it is empty.
//! So an idle store holds no thread, and the task's `Arc<Inner>` is released
//! with the last write, as an operation in flight releases it.

use std::sync::{Arc, MutexGuard, PoisonError};
use std::time::Duration;

use redb::{MultimapTable, ReadableTable, Table, WriteTransaction};
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::codec::{encode_events, encode_record};
use super::lease::{LeaseState, deadline_after};
use super::tables::{
    HISTORY, KV, LEASE_KEYS, LEASES, META, META_COMPACTED, META_NEXT_LEASE, META_REVISION, backend,
    compares_hold, kv_get, kv_prefix, meta_get,
};
use super::watch::Revision;
use super::{EmbeddedStore, Inner};
use crate::{EventKind, KeyValue, LeaseId, Op, OpResult, StoreError, Txn, TxnResponse, WatchEvent};

/// Most writes in one batch. It bounds the latency the last of them waits
/// for and the revisions published to watchers at once (each watcher
/// buffers `watch_buffer` of them before it falls back to the history).
pub(super) const MAX_BATCH: usize = 256;

/// A write the committer applies.
pub(super) enum Write {
    Txn(Txn),
    Grant(Duration),
    /// A caller's revocation: the lease is taken out of the deadline map
    /// inside the batch, so that the expiry task cannot revoke it as well.
    Revoke(LeaseId),
    /// The expiry task's revocation; it took the lease out of the map itself.
    Expire(LeaseId),
}

#[derive(Debug)]
pub(super) enum Written {
    Txn(TxnResponse),
    Grant(LeaseId),
    Revoked,
}

struct Request {
    write: Write,
    reply: Reply,
}

/// Writes waiting for the next batch, and whether a task is draining them.
#[derive(Default)]
pub(super) struct Queue {
    pending: Vec<Request>,
    running: bool,
    stats: CommitStats,
}

impl EmbeddedStore {
    /// How many batches have been committed, and how many writes they held:
    /// the ratio is the mean batch size.
    pub fn commit_stats(&self) -> CommitStats {
        self.inner.lock_queue().stats
    }
}

/// Counters of group commit, for benchmarks and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommitStats {
    pub batches: u64,
    pub writes: u64,
}

impl Inner {
    fn lock_queue(&self) -> MutexGuard<'_, Queue> {
        // The queue is consistent between statements.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `write` and waits until the batch it went into is durable.
    /// A caller that gives up waiting does not take its write back: it may
    /// still commit, as a cancelled etcd request may.
    pub(super) async fn submit(self: &Arc<Self>, write: Write) -> Result<Written, StoreError> {
        let (reply, answer) = oneshot::channel();
        let start = {
            let mut queue = self.lock_queue();
            queue.pending.push(Request { write, reply });
            !std::mem::replace(&mut queue.running, true)
        };
        if start {
            let inner = Arc::clone(self);
            tokio::task::spawn_blocking(move || Inner::drain(inner));
        }
        answer.await.map_err(|_| {
            StoreError::Backend("the store's commit task ended before committing".into())
        })?
    }

    pub(super) async fn commit_txn(self: &Arc<Self>, txn: Txn) -> Result<TxnResponse, StoreError> {
        match self.submit(Write::Txn(txn)).await? {
            Written::Txn(resp) => Ok(resp),
            other => Err(mismatch(&other)),
        }
    }

    pub(super) async fn grant(self: &Arc<Self>, ttl: Duration) -> Result<LeaseId, StoreError> {
        match self.submit(Write::Grant(ttl)).await? {
            Written::Grant(id) => Ok(id),
            other => Err(mismatch(&other)),
        }
    }

    /// Commits batches until the queue is empty. Owns its `Arc` so that,
    /// once the queue is empty, it can let go of the store before the last
    /// answers go out: a caller that drops the store after its write was
    /// answered can reopen the file at once.
    fn drain(self: Arc<Self>) {
        let mut running = Running {
            inner: &self,
            done: false,
        };
        loop {
            let batch: Vec<Request> = {
                let mut queue = self.lock_queue();
                if queue.pending.is_empty() {
                    // Only reached when the queue was empty from the start.
                    queue.running = false;
                    running.done = true;
                    return;
                }
                let n = queue.pending.len().min(MAX_BATCH);
                queue.pending.drain(..n).collect()
            };
            let answers = self.commit_batch(batch);
            let idle = {
                let mut queue = self.lock_queue();
                let idle = queue.pending.is_empty();
                if idle {
                    queue.running = false;
                }
                idle
            };
            if idle {
                running.done = true;
                drop(running);
                drop(self);
                answers.send();
                return;
            }
            answers.send();
        }
    }

    /// Commits one batch; the answers are for the caller to send.
    fn commit_batch(&self, batch: Vec<Request>) -> Answers {
        let (writes, replies): (Vec<Write>, Vec<_>) =
            batch.into_iter().map(|r| (r.write, r.reply)).unzip();
        let count = writes.len() as u64;
        let mut taken = Vec::new();
        let answers = match self.apply(writes, &mut taken) {
            Ok(applied) => {
                if let Some(last) = applied.revisions.last() {
                    self.revision
                        .store(last.revision, std::sync::atomic::Ordering::Release);
                }
                for revision in applied.revisions {
                    // An error only means nobody is watching right now.
                    let _ = self.events.send(Arc::new(revision));
                }
                if !applied.grants.is_empty() {
                    let now = Instant::now();
                    let mut leases = self.lock_leases();
                    for (id, ttl) in applied.grants {
                        let deadline = deadline_after(now, ttl);
                        leases.insert(id, LeaseState { ttl, deadline });
                    }
                    drop(leases);
                    self.lease_wakeup.notify_one();
                }
                Answers(replies.into_iter().zip(applied.results).collect())
            }
            Err(e) => {
                // Still on disk: keep tracking them so that they expire.
                self.lock_leases().extend(taken);
                Answers(replies.into_iter().map(|r| (r, Err(e.clone()))).collect())
            }
        };
        let mut queue = self.lock_queue();
        queue.stats.batches += 1;
        queue.stats.writes += count;
        answers
    }

    /// Applies a batch in one write transaction and commits it. `taken`
    /// collects the leases revocations took out of the deadline map, for the
    /// caller to put back if the batch fails.
    fn apply(
        &self,
        writes: Vec<Write>,
        taken: &mut Vec<(LeaseId, LeaseState)>,
    ) -> Result<Applied, StoreError> {
        let txn = self
            .db
            .begin_write()
            .map_err(backend("begin write transaction"))?;
        let (applied, must_commit) = {
            let mut w = Writer::open(&txn)?;
            let start = meta_get(&w.meta, META_REVISION)?;
            let mut current = start;
            let mut applied = Applied {
                results: Vec::with_capacity(writes.len()),
                revisions: Vec::new(),
                grants: Vec::new(),
            };
            for write in writes {
                w.revision = current + 1;
                let outcome = match write {
                    Write::Txn(t) => w.txn(t).map(Outcome::Txn),
                    Write::Grant(ttl) => w.grant(ttl).map(|id| Outcome::Grant(id, ttl)),
                    Write::Revoke(lease) => match self.lock_leases().remove(&lease) {
                        Some(state) => {
                            taken.push((lease, state));
                            w.revoke(lease).map(|()| Outcome::Revoked)
                        }
                        None => Err(StoreError::LeaseNotFound(lease)),
                    },
                    Write::Expire(lease) => w.revoke(lease).map(|()| Outcome::Revoked),
                };
                // Only a missing lease fails one write alone, and it is
                // found before that write changed anything; anything else
                // leaves the write transaction in an unknown state.
                if let Err(e) = &outcome
                    && !matches!(e, StoreError::LeaseNotFound(_))
                {
                    return Err(e.clone());
                }
                debug_assert!(outcome.is_ok() || w.events.is_empty());
                let events = std::mem::take(&mut w.events);
                if !events.is_empty() {
                    current = w.revision;
                    w.history
                        .insert(current, encode_events(&events).as_slice())
                        .map_err(backend("write history"))?;
                    self.compact(&mut w.meta, &mut w.history, current)?;
                    applied.revisions.push(Revision {
                        revision: current,
                        events,
                    });
                }
                applied.results.push(outcome.map(|o| match o {
                    Outcome::Txn((succeeded, results)) => Written::Txn(TxnResponse {
                        succeeded,
                        revision: current,
                        results,
                    }),
                    Outcome::Grant(id, ttl) => {
                        applied.grants.push((id, ttl));
                        Written::Grant(id)
                    }
                    Outcome::Revoked => Written::Revoked,
                }));
            }
            if current != start {
                w.meta
                    .insert(META_REVISION, current)
                    .map_err(backend("write revision"))?;
            }
            let must_commit = w.dirty || current != start;
            (applied, must_commit)
        };
        if must_commit {
            txn.commit().map_err(backend("commit write transaction"))?;
        } else {
            // Nothing changed: aborting skips the fsync of an empty commit.
            txn.abort()
                .map_err(backend("abort empty write transaction"))?;
        }
        Ok(applied)
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
}

fn mismatch(written: &Written) -> StoreError {
    StoreError::Backend(format!(
        "the store's commit task answered a write with {written:?}"
    ))
}

/// The outcome of each write of a committed batch, to its caller.
struct Answers(Vec<(Reply, Result<Written, StoreError>)>);

/// Where a write's outcome goes.
type Reply = oneshot::Sender<Result<Written, StoreError>>;

impl Answers {
    fn send(self) {
        for (reply, result) in self.0 {
            // The caller may have given up waiting.
            let _ = reply.send(result);
        }
    }
}

/// Resets the queue if the draining task panics, failing the writes still
/// queued (their callers see an error instead of waiting forever).
struct Running<'a> {
    inner: &'a Inner,
    done: bool,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        if !self.done {
            let mut queue = self.inner.lock_queue();
            queue.pending.clear();
            queue.running = false;
        }
    }
}

/// What a committed batch hands back.
struct Applied {
    results: Vec<Result<Written, StoreError>>,
    /// The events of each revision the batch made, in order.
    revisions: Vec<Revision>,
    /// Granted leases, whose deadlines start once they are durable.
    grants: Vec<(LeaseId, Duration)>,
}

enum Outcome {
    Txn((bool, Vec<OpResult>)),
    Grant(LeaseId, Duration),
    Revoked,
}

/// The tables of one write transaction plus what the current write of the
/// batch has done so far.
struct Writer<'t> {
    kv: Table<'t, &'static [u8], &'static [u8]>,
    leases: Table<'t, i64, i64>,
    lease_keys: MultimapTable<'t, i64, &'static [u8]>,
    meta: Table<'t, &'static str, i64>,
    history: Table<'t, i64, &'static [u8]>,
    /// The revision the current write commits at if it emits any event.
    revision: i64,
    events: Vec<WatchEvent>,
    /// Set for writes that need a commit without bumping the revision.
    dirty: bool,
}

impl<'t> Writer<'t> {
    fn open(txn: &'t WriteTransaction) -> Result<Self, StoreError> {
        Ok(Writer {
            meta: txn.open_table(META).map_err(backend("open meta table"))?,
            kv: txn.open_table(KV).map_err(backend("open kv table"))?,
            leases: txn
                .open_table(LEASES)
                .map_err(backend("open leases table"))?,
            lease_keys: txn
                .open_multimap_table(LEASE_KEYS)
                .map_err(backend("open lease_keys table"))?,
            history: txn
                .open_table(HISTORY)
                .map_err(backend("open history table"))?,
            revision: 0,
            events: Vec::new(),
            dirty: false,
        })
    }

    fn txn(&mut self, txn: Txn) -> Result<(bool, Vec<OpResult>), StoreError> {
        let succeeded = compares_hold(&self.kv, &txn.compares)?;
        let ops = if succeeded { txn.success } else { txn.failure };
        // Before the first write, so that a transaction failing on a lease
        // leaves nothing behind in its batch.
        for op in &ops {
            if let Op::Put { lease, .. } = op
                && *lease != 0
                && self
                    .leases
                    .get(*lease)
                    .map_err(backend("read lease"))?
                    .is_none()
            {
                return Err(StoreError::LeaseNotFound(*lease));
            }
        }
        let mut results = Vec::with_capacity(ops.len());
        for op in ops {
            results.push(match op {
                Op::Put { key, value, lease } => {
                    self.put(&key, &value, lease)?;
                    OpResult::Put
                }
                Op::Delete { key } => OpResult::Delete(i64::from(self.delete(&key)?)),
                Op::DeletePrefix { prefix } => OpResult::Delete(self.delete_prefix(&prefix)?),
                Op::Get { key } => OpResult::Get(kv_get(&self.kv, &key)?.into_iter().collect()),
                Op::GetPrefix { prefix } => OpResult::Get(kv_prefix(&self.kv, &prefix)?),
            });
        }
        Ok((succeeded, results))
    }

    fn put(&mut self, key: &[u8], value: &[u8], lease: LeaseId) -> Result<(), StoreError> {
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

    fn grant(&mut self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
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

#[cfg(test)]
mod tests {
    //! One batch assembled by hand: the writes are queued while the queue is
    //! marked running, so none of them can start a commit of its own, and
    //! one `drain` then commits them all together.

    use futures::StreamExt;
    use tempfile::TempDir;

    use super::*;
    use crate::{Compare, EventKind, Store};

    async fn queue_batch(
        store: &EmbeddedStore,
        writes: Vec<Write>,
    ) -> Vec<oneshot::Receiver<Result<Written, StoreError>>> {
        // A write answered just now may leave its drain task finishing.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut writes = Some(writes);
        loop {
            {
                let mut queue = store.inner.lock_queue();
                if !queue.running {
                    queue.running = true;
                    return writes
                        .take()
                        .into_iter()
                        .flatten()
                        .map(|write| {
                            let (reply, answer) = oneshot::channel();
                            queue.pending.push(Request { write, reply });
                            answer
                        })
                        .collect();
                }
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the queue never went idle"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    async fn drain(store: &EmbeddedStore) {
        let inner = Arc::clone(&store.inner);
        tokio::task::spawn_blocking(move || Inner::drain(inner))
            .await
            .expect("drain");
    }

    async fn answers(
        answers: Vec<oneshot::Receiver<Result<Written, StoreError>>>,
    ) -> Vec<Result<Written, StoreError>> {
        let mut out = Vec::new();
        for a in answers {
            out.push(a.await.expect("answered"));
        }
        out
    }

    fn txn_response(w: &Result<Written, StoreError>) -> &TxnResponse {
        match w {
            Ok(Written::Txn(r)) => r,
            other => panic!("not a committed transaction: {other:?}"),
        }
    }

    #[tokio::test]
    async fn one_batch_keeps_each_write_atomic_and_in_order() {
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("store.redb");
        let store = EmbeddedStore::open(&path).await.unwrap();
        let base = store.revision().await.unwrap();
        let mut watch = store.watch(b"", 0).await.unwrap();
        let create = |value: &str| {
            Write::Txn(
                Txn::new()
                    .when(Compare::absent("k"))
                    .and_then(Op::put("k", value))
                    .or_else(Op::get("k")),
            )
        };
        let queued = queue_batch(
            &store,
            vec![
                create("first"),
                // Conflicts with the first: its compare sees the first's write.
                create("second"),
                // Fails alone: the lease does not exist. Its other put must
                // not land either.
                Write::Txn(Txn::new().and_then(Op::put("x", "lost")).and_then(Op::Put {
                    key: b"y".to_vec(),
                    value: b"lost".to_vec(),
                    lease: 4242,
                })),
                // Reads its predecessors' writes and gets the next revision.
                Write::Txn(
                    Txn::new()
                        .when(Compare::value_equals("k", "first"))
                        .and_then(Op::put("z", "after")),
                ),
                // No change: no revision of its own.
                Write::Txn(Txn::new().and_then(Op::delete("missing"))),
            ],
        )
        .await;
        assert_eq!(store.commit_stats(), CommitStats::default());
        drain(&store).await;
        let got = answers(queued).await;

        let first = txn_response(&got[0]);
        assert!(first.succeeded);
        assert_eq!(first.revision, base + 1);
        let second = txn_response(&got[1]);
        assert!(!second.succeeded, "the second create saw no first one");
        assert_eq!(second.revision, base + 1);
        match &second.results[0] {
            OpResult::Get(kvs) => assert_eq!(kvs[0].value, b"first"),
            other => panic!("{other:?}"),
        }
        assert!(
            matches!(got[2], Err(StoreError::LeaseNotFound(4242))),
            "{:?}",
            got[2]
        );
        let fourth = txn_response(&got[3]);
        assert!(fourth.succeeded);
        assert_eq!(fourth.revision, base + 2);
        assert_eq!(txn_response(&got[4]).revision, base + 2);
        assert_eq!(
            store.commit_stats(),
            CommitStats {
                batches: 1,
                writes: 5
            }
        );

        assert_eq!(store.revision().await.unwrap(), base + 2);
        assert_eq!(store.get(b"x").await.unwrap(), None);
        assert_eq!(store.get(b"y").await.unwrap(), None);
        // Watchers get one revision per write, in order.
        let e = watch.next().await.unwrap().unwrap();
        assert_eq!(
            (e.kind, e.kv.key.as_slice(), e.kv.mod_revision),
            (EventKind::Put, &b"k"[..], base + 1)
        );
        let e = watch.next().await.unwrap().unwrap();
        assert_eq!(
            (e.kv.key.as_slice(), e.kv.mod_revision),
            (&b"z"[..], base + 2)
        );

        // Durable as acknowledged, with each write's revision.
        drop(watch);
        drop(store);
        let store = EmbeddedStore::open(&path).await.unwrap();
        assert_eq!(store.revision().await.unwrap(), base + 2);
        let k = store.get(b"k").await.unwrap().unwrap();
        assert_eq!(
            (k.value.as_slice(), k.mod_revision),
            (&b"first"[..], base + 1)
        );
        let z = store.get(b"z").await.unwrap().unwrap();
        assert_eq!(z.mod_revision, base + 2);
        let mut replay = store.watch(b"", base + 1).await.unwrap();
        assert_eq!(
            replay.next().await.unwrap().unwrap().kv.mod_revision,
            base + 1
        );
        assert_eq!(
            replay.next().await.unwrap().unwrap().kv.mod_revision,
            base + 2
        );
    }

    #[tokio::test]
    async fn leases_in_one_batch() {
        let dir = TempDir::new().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("store.redb"))
            .await
            .unwrap();
        let lease = store.grant_lease(Duration::from_secs(60)).await.unwrap();
        let queued = queue_batch(
            &store,
            vec![
                Write::Txn(Txn::new().and_then(Op::Put {
                    key: b"leased".to_vec(),
                    value: b"v".to_vec(),
                    lease,
                })),
                Write::Revoke(lease),
                // The revocation before it in the batch ended the lease.
                Write::Txn(Txn::new().and_then(Op::Put {
                    key: b"late".to_vec(),
                    value: b"v".to_vec(),
                    lease,
                })),
                Write::Revoke(lease),
                Write::Grant(Duration::from_secs(60)),
            ],
        )
        .await;
        drain(&store).await;
        let got = answers(queued).await;
        assert!(txn_response(&got[0]).succeeded);
        assert!(matches!(got[1], Ok(Written::Revoked)), "{:?}", got[1]);
        assert!(
            matches!(got[2], Err(StoreError::LeaseNotFound(_))),
            "{:?}",
            got[2]
        );
        assert!(
            matches!(got[3], Err(StoreError::LeaseNotFound(_))),
            "{:?}",
            got[3]
        );
        let Ok(Written::Grant(granted)) = got[4] else {
            panic!("{:?}", got[4]);
        };
        assert_ne!(granted, lease);
        assert_eq!(store.get(b"leased").await.unwrap(), None);
        assert_eq!(store.get(b"late").await.unwrap(), None);
        // The grant's deadline was registered with the batch.
        store.keep_alive(granted).await.unwrap();
        assert!(matches!(
            store.keep_alive(lease).await,
            Err(StoreError::LeaseNotFound(_))
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writers_share_commits() {
        let dir = TempDir::new().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("store.redb"))
            .await
            .unwrap();
        let writers = 64;
        let tasks: Vec<_> = (0..writers)
            .map(|i| {
                let store = Arc::clone(&store);
                tokio::spawn(async move {
                    for j in 0..5 {
                        let key = format!("w{i}/{j}");
                        let resp = store
                            .txn(
                                Txn::new()
                                    .when(Compare::absent(key.as_str()))
                                    .and_then(Op::put(key.as_str(), "v")),
                            )
                            .await
                            .unwrap();
                        assert!(resp.succeeded);
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let stats = store.commit_stats();
        assert_eq!(stats.writes, writers * 5);
        // Printed, not asserted: how much they shared depends on the disk.
        println!(
            "{} writes in {} commits ({:.1} per commit)",
            stats.writes,
            stats.batches,
            stats.writes as f64 / stats.batches as f64
        );
        assert_eq!(
            store.range(b"w").await.unwrap().kvs.len() as u64,
            writers * 5
        );
    }
}

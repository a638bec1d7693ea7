//! Backend-independent [`Store`] conformance tests.
//!
//! Every function in [`suite`] takes a fresh, empty store and checks one part of
//! the trait's contract. They run against [`EmbeddedStore`] and against
//! [`metropolis_store::EtcdStore`] connected over a unix socket to a real etcd
//! server that the test starts itself (the `etcd` binary must be on PATH; on
//! Debian: `apt-get install etcd-server`; without it these tests fail).
//!
//! Revisions are asserted relative to the store's revision at the start of
//! each test, so the suite does not depend on how a backend numbers its first
//! revision.

use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

use metropolis_store::{EmbeddedStore, Store};

/// A store under test plus whatever keeps it alive (temp dirs, servers).
struct Harness {
    store: Arc<dyn Store>,
    /// A lease TTL that is short for this backend (etcd TTLs are whole seconds).
    short_ttl: Duration,
    _guard: Box<dyn Any + Send>,
}

async fn embedded() -> Harness {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let store = EmbeddedStore::open(&dir.path().join("store.redb"))
        .await
        .expect("open embedded store");
    Harness {
        store,
        short_ttl: Duration::from_millis(200),
        _guard: Box::new(dir),
    }
}

/// Generates one `#[tokio::test]` per conformance check for a backend.
macro_rules! conformance {
    ($backend:ident, $make:path) => {
        mod $backend {
            use super::*;

            async fn run<F, Fut>(check: F)
            where
                F: FnOnce(Arc<dyn Store>, Duration) -> Fut,
                Fut: std::future::Future<Output = ()>,
            {
                let h = $make().await;
                check(Arc::clone(&h.store), h.short_ttl).await;
                drop(h);
            }

            #[tokio::test]
            async fn revisions_and_metadata() {
                run(|s, _| suite::revisions_and_metadata(s)).await;
            }
            #[tokio::test]
            async fn cas_branches() {
                run(|s, _| suite::cas_branches(s)).await;
            }
            #[tokio::test]
            async fn txn_reads_its_own_writes() {
                run(|s, _| suite::txn_reads_its_own_writes(s)).await;
            }
            #[tokio::test]
            async fn delete_prefix_and_ranges() {
                run(|s, _| suite::delete_prefix_and_ranges(s)).await;
            }
            #[tokio::test]
            async fn watch_live_events() {
                run(|s, _| suite::watch_live_events(s)).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn watch_replay_without_gap_or_duplicate() {
                run(|s, _| suite::watch_replay_without_gap_or_duplicate(s)).await;
            }
            #[tokio::test]
            async fn lease_expiry_deletes_keys() {
                run(suite::lease_expiry_deletes_keys).await;
            }
            #[tokio::test]
            async fn revoke_deletes_keys() {
                run(|s, _| suite::revoke_deletes_keys(s)).await;
            }
            #[tokio::test]
            async fn keep_alive_extends_lease() {
                run(suite::keep_alive_extends_lease).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn concurrent_cas_writers() {
                run(|s, _| suite::concurrent_cas_writers(s)).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn snapshot_at_one_revision() {
                run(|s, _| suite::snapshot_at_one_revision(s)).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn failing_txn_among_concurrent_writers() {
                run(|s, _| suite::failing_txn_among_concurrent_writers(s)).await;
            }
        }
    };
}

conformance!(embedded_store, embedded);
conformance!(etcd_store, etcd_server::start);

mod suite {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use futures::StreamExt;
    use metropolis_store::{
        Compare, CompareOp, CompareTarget, EventKind, KeyValue, LeaseId, Op, OpResult, Store,
        StoreError, Txn, TxnResponse, WatchEvent, WatchStream,
    };

    /// Generous: etcd revokes expired leases on a periodic check.
    const WAIT: Duration = Duration::from_secs(10);

    async fn put(s: &dyn Store, key: &str, value: &str) -> i64 {
        let resp = s
            .txn(Txn::new().and_then(Op::put(key, value)))
            .await
            .expect("put");
        assert!(resp.succeeded);
        resp.revision
    }

    async fn put_leased(s: &dyn Store, key: &str, lease: LeaseId) -> i64 {
        let op = Op::Put {
            key: key.into(),
            value: b"v".to_vec(),
            lease,
        };
        s.txn(Txn::new().and_then(op)).await.expect("put").revision
    }

    async fn next(stream: &mut WatchStream) -> WatchEvent {
        tokio::time::timeout(WAIT, stream.next())
            .await
            .expect("timed out waiting for a watch event")
            .expect("watch stream ended")
            .expect("watch stream error")
    }

    async fn assert_quiet(stream: &mut WatchStream) {
        let r = tokio::time::timeout(Duration::from_millis(100), stream.next()).await;
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

    async fn keys(s: &dyn Store, prefix: &[u8]) -> Vec<Vec<u8>> {
        s.range(prefix)
            .await
            .expect("range")
            .kvs
            .into_iter()
            .map(|kv| kv.key)
            .collect()
    }

    pub async fn revisions_and_metadata(s: Arc<dyn Store>) {
        let s = &*s;
        let b = s.revision().await.unwrap();
        let range = s.range(b"").await.unwrap();
        assert_eq!((range.kvs.len(), range.revision), (0, b));

        assert_eq!(put(s, "a", "1").await, b + 1);
        assert_eq!(
            s.get(b"a").await.unwrap(),
            Some(kv("a", "1", b + 1, b + 1, 1))
        );
        assert_eq!(put(s, "a", "2").await, b + 2);
        assert_eq!(
            s.get(b"a").await.unwrap(),
            Some(kv("a", "2", b + 1, b + 2, 2))
        );
        assert_eq!(put(s, "b", "1").await, b + 3);
        assert_eq!(s.get(b"missing").await.unwrap(), None);

        // Neither reads nor deletes of nothing bump the revision.
        let r = s.txn(Txn::new().and_then(Op::get("a"))).await.unwrap();
        assert_eq!(r.revision, b + 3);
        let r = s
            .txn(Txn::new().and_then(Op::delete("missing")))
            .await
            .unwrap();
        assert_eq!(
            (r.revision, &r.results[..]),
            (b + 3, &[OpResult::Delete(0)][..])
        );
        assert_eq!(s.revision().await.unwrap(), b + 3);

        let r = s.txn(Txn::new().and_then(Op::delete("a"))).await.unwrap();
        assert_eq!(
            (r.revision, &r.results[..]),
            (b + 4, &[OpResult::Delete(1)][..])
        );
        assert_eq!(s.get(b"a").await.unwrap(), None);
        // Version and create revision restart after a delete.
        assert_eq!(put(s, "a", "3").await, b + 5);
        assert_eq!(
            s.get(b"a").await.unwrap(),
            Some(kv("a", "3", b + 5, b + 5, 1))
        );

        let range = s.range(b"").await.unwrap();
        assert_eq!(range.revision, b + 5);
        assert_eq!(
            range.kvs,
            vec![kv("a", "3", b + 5, b + 5, 1), kv("b", "1", b + 3, b + 3, 1)]
        );
        assert_eq!(s.revision().await.unwrap(), b + 5);

        let err = s
            .txn(Txn::new().and_then(Op::put("", "v")))
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Invalid(_)), "{err}");
    }

    /// Pages of the asked size that together hold every key once, as the
    /// store was when the snapshot began, whatever is written meanwhile.
    pub async fn snapshot_at_one_revision(s: Arc<dyn Store>) {
        use futures::TryStreamExt;
        let s = &*s;
        for i in 0..23 {
            put(s, &format!("/nodes/{i:02}"), &"n".repeat(i)).await;
        }
        for i in 0..5 {
            put(s, &format!("/other/{i}"), "o").await;
        }
        let before = s.range(b"").await.unwrap();
        let snap = s.snapshot(b"/nodes/", 7).await.unwrap();
        assert_eq!((snap.revision, snap.counted), (before.revision, 23));
        // Written after the snapshot began, before its pages are read.
        put(s, "/nodes/99", "late").await;
        put(s, "/nodes/00", "changed").await;
        s.txn(Txn::new().and_then(Op::delete("/other/0")))
            .await
            .unwrap();
        let pages: Vec<Vec<KeyValue>> = snap.pages.try_collect().await.unwrap();
        assert!(
            pages.iter().all(|p| !p.is_empty() && p.len() <= 7),
            "{pages:?}"
        );
        assert_eq!(pages.len(), 4);
        let all: Vec<KeyValue> = pages.into_iter().flatten().collect();
        assert_eq!(all, before.kvs);

        let empty_count = s.snapshot(b"/none/", 1000).await.unwrap();
        assert_eq!(empty_count.counted, 0);
        let n: usize = empty_count
            .pages
            .map_ok(|p| p.len())
            .try_fold(0, |a, b| async move { Ok(a + b) })
            .await
            .unwrap();
        // /nodes/99 added, /other/0 deleted.
        assert_eq!(n, before.kvs.len());
    }

    pub async fn cas_branches(s: Arc<dyn Store>) {
        let s = &*s;
        let b = s.revision().await.unwrap();
        let create = || {
            Txn::new()
                .when(Compare::absent("k"))
                .and_then(Op::put("k", "first"))
                .or_else(Op::get("k"))
        };
        let r = s.txn(create()).await.unwrap();
        assert!(r.succeeded);
        assert_eq!((r.revision, &r.results[..]), (b + 1, &[OpResult::Put][..]));
        let r = s.txn(create()).await.unwrap();
        assert!(!r.succeeded);
        assert_eq!(r.revision, b + 1);
        assert_eq!(get_result(&r, 0), [kv("k", "first", b + 1, b + 1, 1)]);

        // A stale mod revision fails and runs the failure branch's write.
        let r = s
            .txn(
                Txn::new()
                    .when(Compare::mod_revision("k", b))
                    .and_then(Op::put("k", "won"))
                    .or_else(Op::put("conflicts", "1")),
            )
            .await
            .unwrap();
        assert!(!r.succeeded);
        assert_eq!((r.revision, &r.results[..]), (b + 2, &[OpResult::Put][..]));
        assert_eq!(s.get(b"k").await.unwrap().unwrap().value, b"first");
        assert!(s.get(b"conflicts").await.unwrap().is_some());

        let r = s
            .txn(
                Txn::new()
                    .when(Compare::mod_revision("k", b + 1))
                    .and_then(Op::put("k", "second")),
            )
            .await
            .unwrap();
        assert!(r.succeeded);
        assert_eq!(r.revision, b + 3);

        let value = |v: &str| CompareTarget::Value(v.as_bytes().to_vec());
        let cases = [
            ("k", CompareOp::Equal, value("second"), true),
            ("k", CompareOp::NotEqual, value("second"), false),
            ("k", CompareOp::Greater, value("s"), true),
            ("k", CompareOp::Less, value("t"), true),
            ("k", CompareOp::Equal, CompareTarget::Version(2), true),
            ("k", CompareOp::Greater, CompareTarget::Version(2), false),
            ("k", CompareOp::Less, CompareTarget::Version(3), true),
            (
                "k",
                CompareOp::Equal,
                CompareTarget::CreateRevision(b + 1),
                true,
            ),
            (
                "k",
                CompareOp::Greater,
                CompareTarget::ModRevision(b + 2),
                true,
            ),
            (
                "k",
                CompareOp::NotEqual,
                CompareTarget::ModRevision(b + 3),
                false,
            ),
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
            ("nope", CompareOp::NotEqual, value("x"), false),
            ("nope", CompareOp::Less, value("x"), false),
        ];
        for (key, op, target, expected) in cases {
            let txn = Txn::new().when(Compare {
                key: key.into(),
                op,
                target: target.clone(),
            });
            let r = s.txn(txn).await.unwrap();
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
        assert_eq!(s.revision().await.unwrap(), b + 3);
    }

    /// Note: no key is written twice, since etcd rejects that in one txn.
    pub async fn txn_reads_its_own_writes(s: Arc<dyn Store>) {
        let s = &*s;
        let b = put(s, "gone", "x").await;
        let r = s
            .txn(
                Txn::new()
                    .and_then(Op::put("a", "1"))
                    .and_then(Op::get("a"))
                    .and_then(Op::put("b", "1"))
                    .and_then(Op::delete("gone"))
                    .and_then(Op::get("gone"))
                    .and_then(Op::GetPrefix { prefix: vec![] }),
            )
            .await
            .unwrap();
        assert_eq!(r.revision, b + 1);
        assert_eq!(r.results[0], OpResult::Put);
        assert_eq!(get_result(&r, 1), [kv("a", "1", b + 1, b + 1, 1)]);
        assert_eq!(r.results[3], OpResult::Delete(1));
        assert!(get_result(&r, 4).is_empty());
        assert_eq!(
            get_result(&r, 5),
            [kv("a", "1", b + 1, b + 1, 1), kv("b", "1", b + 1, b + 1, 1)]
        );
        // One revision for the whole transaction.
        assert_eq!(s.revision().await.unwrap(), b + 1);
    }

    pub async fn delete_prefix_and_ranges(s: Arc<dyn Store>) {
        let s = &*s;
        for key in ["a/1", "a/2", "a", "ab", "b"] {
            put(s, key, "v").await;
        }
        let b = s.revision().await.unwrap();
        assert_eq!(keys(s, b"a/").await, [b"a/1".to_vec(), b"a/2".to_vec()]);
        assert_eq!(keys(s, b"a").await.len(), 4);

        let r = s
            .txn(Txn::new().and_then(Op::DeletePrefix {
                prefix: b"a/".to_vec(),
            }))
            .await
            .unwrap();
        assert_eq!(
            (r.revision, &r.results[..]),
            (b + 1, &[OpResult::Delete(2)][..])
        );
        assert_eq!(
            keys(s, b"").await,
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
        assert_eq!(
            keys(s, &[0xff]).await,
            [vec![0xff], vec![0xff, 0], vec![0xff, 0xff, 1]]
        );
        assert_eq!(keys(s, &[0xfe]).await.len(), 1);

        let r = s
            .txn(Txn::new().and_then(Op::DeletePrefix { prefix: vec![] }))
            .await
            .unwrap();
        assert_eq!(r.results, [OpResult::Delete(7)]);
        assert!(keys(s, b"").await.is_empty());
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

    pub async fn watch_live_events(s: Arc<dyn Store>) {
        let s = &*s;
        let b = put(s, "p/old", "x").await;
        let mut w = s.watch(b"p/", 0).await.unwrap();
        assert_quiet(&mut w).await;

        put(s, "other", "x").await; // b+1
        put(s, "p/a", "1").await; // b+2
        s.txn(
            Txn::new()
                .and_then(Op::put("p/b", "1"))
                .and_then(Op::delete("p/old")),
        )
        .await
        .unwrap(); // b+3

        assert_eq!(
            next(&mut w).await,
            WatchEvent {
                kind: EventKind::Put,
                kv: kv("p/a", "1", b + 2, b + 2, 1)
            }
        );
        assert_eq!(
            next(&mut w).await,
            WatchEvent {
                kind: EventKind::Put,
                kv: kv("p/b", "1", b + 3, b + 3, 1)
            }
        );
        assert_eq!(
            next(&mut w).await,
            WatchEvent {
                kind: EventKind::Delete,
                kv: kv("p/old", "", 0, b + 3, 0)
            }
        );
        assert_quiet(&mut w).await;

        // A watch starting in the future skips revisions before it.
        let mut later = s.watch(b"p/", b + 5).await.unwrap();
        put(s, "p/a", "2").await; // b+4
        put(s, "p/a", "3").await; // b+5
        assert_eq!(next(&mut later).await.kv.mod_revision, b + 5);

        // Dropping a watch is fine while events keep coming.
        drop(w);
        put(s, "p/a", "4").await;
        assert_eq!(next(&mut later).await.kv.mod_revision, b + 6);
    }

    pub async fn watch_replay_without_gap_or_duplicate(s: Arc<dyn Store>) {
        let b = s.revision().await.unwrap();
        for i in 0..20 {
            put(&*s, &format!("k{i}"), "v").await;
        }
        let start = b + 5;
        let end = b + 20 + 60;
        // Watches keep starting from an old revision while a writer commits,
        // so some of them switch from replay to live right at a commit.
        let writer = {
            let s = Arc::clone(&s);
            tokio::spawn(async move {
                for i in 0..60 {
                    put(&*s, &format!("k{i}"), "w").await;
                }
            })
        };
        let mut watches = Vec::new();
        while !writer.is_finished() {
            watches.push(s.watch(b"", start).await.unwrap());
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        writer.await.unwrap();
        assert!(watches.len() > 3, "only {} watches started", watches.len());
        for w in &mut watches {
            let mut revisions = Vec::new();
            while revisions.last() != Some(&end) {
                revisions.push(next(w).await.kv.mod_revision);
            }
            assert_eq!(revisions, (start..=end).collect::<Vec<_>>());
        }
        put(&*s, "last", "v").await;
        for w in &mut watches {
            assert_eq!(
                next(w).await.kv.mod_revision,
                end + 1,
                "duplicate or missing event"
            );
        }
    }

    pub async fn lease_expiry_deletes_keys(s: Arc<dyn Store>, ttl: Duration) {
        let s = &*s;
        let lease = s.grant_lease(ttl).await.unwrap();
        put_leased(s, "l/a", lease).await;
        let b = put_leased(s, "l/b", lease).await;
        put(s, "l/c", "unleased").await;
        assert_eq!(s.get(b"l/a").await.unwrap().unwrap().lease, lease);
        let mut w = s.watch(b"l/", 0).await.unwrap();

        let a = next(&mut w).await;
        let c = next(&mut w).await;
        assert_eq!((a.kind, c.kind), (EventKind::Delete, EventKind::Delete));
        assert_eq!(
            (a.kv.key.as_slice(), c.kv.key.as_slice()),
            (&b"l/a"[..], &b"l/b"[..])
        );
        // Both keys go in one transaction.
        assert_eq!((a.kv.mod_revision, c.kv.mod_revision), (b + 2, b + 2));
        assert_eq!(s.revision().await.unwrap(), b + 2);
        assert_eq!(keys(s, b"l/").await, [b"l/c".to_vec()]);

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
        assert!(matches!(err, StoreError::LeaseNotFound(_)), "{err}");
    }

    pub async fn revoke_deletes_keys(s: Arc<dyn Store>) {
        let s = &*s;
        let b = s.revision().await.unwrap();
        let lease = s.grant_lease(Duration::from_secs(60)).await.unwrap();
        let other = s.grant_lease(Duration::from_secs(60)).await.unwrap();
        assert_ne!(lease, other);
        // Granting is not a key-space write.
        assert_eq!(s.revision().await.unwrap(), b);
        put_leased(s, "a", lease).await;
        put_leased(s, "b", lease).await;
        put_leased(s, "c", other).await;
        // Re-putting without the lease detaches the key from it.
        put_leased(s, "d", lease).await;
        put(s, "d", "kept").await; // b+5
        let mut w = s.watch(b"", 0).await.unwrap();

        s.revoke_lease(lease).await.unwrap();
        let (x, y) = (next(&mut w).await, next(&mut w).await);
        assert_eq!(
            (x.kind, x.kv.key.as_slice(), x.kv.mod_revision),
            (EventKind::Delete, &b"a"[..], b + 6)
        );
        assert_eq!(
            (y.kind, y.kv.key.as_slice(), y.kv.mod_revision),
            (EventKind::Delete, &b"b"[..], b + 6)
        );
        assert_quiet(&mut w).await;
        assert_eq!(keys(s, b"").await, [b"c".to_vec(), b"d".to_vec()]);

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
        assert!(
            matches!(err, StoreError::LeaseNotFound(id) if id == lease),
            "{err}"
        );
        assert_eq!(s.get(b"e").await.unwrap(), None);
        assert_eq!(s.revision().await.unwrap(), b + 6);
        assert!(matches!(
            s.revoke_lease(12345).await,
            Err(StoreError::LeaseNotFound(12345))
        ));

        // Revoking a lease without keys does not bump the revision.
        s.txn(Txn::new().and_then(Op::delete("c"))).await.unwrap();
        s.revoke_lease(other).await.unwrap();
        assert_eq!(s.revision().await.unwrap(), b + 7);
    }

    /// 64 writers increment one counter by compare-and-swap, retrying on
    /// conflict (on the embedded store they share group commits, so
    /// conflicting compares meet inside one batch). Every increment lands
    /// exactly once, each successful write has a revision of its own, and a
    /// watcher sees every one of them in order.
    pub async fn concurrent_cas_writers(s: Arc<dyn Store>) {
        const WRITERS: usize = 64;
        const EACH: usize = 4;
        let b = s.revision().await.unwrap();
        let created = s
            .txn(Txn::new().and_then(Op::put("counter", "0")))
            .await
            .unwrap();
        assert_eq!(created.revision, b + 1);
        let mut w = s.watch(b"counter", 0).await.unwrap();
        let tasks: Vec<_> = (0..WRITERS)
            .map(|_| {
                let s = Arc::clone(&s);
                tokio::spawn(async move {
                    let mut revisions = Vec::new();
                    let mut conflicts = 0u32;
                    while revisions.len() < EACH {
                        let kv = s.get(b"counter").await.unwrap().unwrap();
                        let n: u64 = std::str::from_utf8(&kv.value).unwrap().parse().unwrap();
                        let resp = s
                            .txn(
                                Txn::new()
                                    .when(Compare::mod_revision("counter", kv.mod_revision))
                                    .and_then(Op::put("counter", (n + 1).to_string())),
                            )
                            .await
                            .unwrap();
                        if resp.succeeded {
                            revisions.push(resp.revision);
                        } else {
                            conflicts += 1;
                        }
                    }
                    (revisions, conflicts)
                })
            })
            .collect();
        let mut all = Vec::new();
        for t in tasks {
            let (revisions, _conflicts) = t.await.unwrap();
            all.extend(revisions);
        }
        all.sort_unstable();
        let total = (WRITERS * EACH) as i64;
        assert_eq!(all, (b + 2..=b + 1 + total).collect::<Vec<_>>());
        let kv = s.get(b"counter").await.unwrap().unwrap();
        assert_eq!(kv.value, total.to_string().into_bytes());
        assert_eq!(kv.mod_revision, b + 1 + total);
        for (i, rev) in (b + 2..=b + 1 + total).enumerate() {
            let e = next(&mut w).await;
            assert_eq!(e.kv.mod_revision, rev);
            assert_eq!(e.kv.value, (i + 1).to_string().into_bytes());
        }
        assert_quiet(&mut w).await;
    }

    /// A transaction that fails (a put to a lease that does not exist)
    /// while others commit around it changes nothing, and takes nothing of
    /// theirs with it.
    pub async fn failing_txn_among_concurrent_writers(s: Arc<dyn Store>) {
        const WRITERS: usize = 32;
        let b = s.revision().await.unwrap();
        let tasks: Vec<_> = (0..WRITERS)
            .map(|i| {
                let s = Arc::clone(&s);
                tokio::spawn(async move {
                    let key = format!("ok/{i:02}");
                    if i % 4 == 0 {
                        let bad = Txn::new()
                            .and_then(Op::put(format!("bad/{i:02}"), "v"))
                            .and_then(Op::Put {
                                key: key.clone().into_bytes(),
                                value: b"v".to_vec(),
                                lease: 987_654_321,
                            });
                        let err = s.txn(bad).await.unwrap_err();
                        assert!(matches!(err, StoreError::LeaseNotFound(_)), "{err}");
                    }
                    let resp = s
                        .txn(
                            Txn::new()
                                .when(Compare::absent(key.as_str()))
                                .and_then(Op::put(key.as_str(), "v")),
                        )
                        .await
                        .unwrap();
                    assert!(
                        resp.succeeded,
                        "{key} was written by its failed transaction"
                    );
                    resp.revision
                })
            })
            .collect();
        let mut revisions = Vec::new();
        for t in tasks {
            revisions.push(t.await.unwrap());
        }
        revisions.sort_unstable();
        revisions.dedup();
        assert_eq!(revisions.len(), WRITERS);
        assert_eq!(s.revision().await.unwrap(), b + WRITERS as i64);
        assert!(keys(s.as_ref(), b"bad/").await.is_empty());
        assert_eq!(keys(s.as_ref(), b"ok/").await.len(), WRITERS);
    }

    pub async fn keep_alive_extends_lease(s: Arc<dyn Store>, ttl: Duration) {
        let s = &*s;
        let lease = s.grant_lease(ttl).await.unwrap();
        put_leased(s, "k", lease).await;
        // Well past the TTL, kept alive every third of it.
        let started = Instant::now();
        while started.elapsed() < ttl * 3 {
            tokio::time::sleep(ttl / 3).await;
            s.keep_alive(lease).await.unwrap();
        }
        assert!(s.get(b"k").await.unwrap().is_some());
        let stopped = Instant::now();
        let mut w = s.watch(b"k", 0).await.unwrap();
        assert_eq!(next(&mut w).await.kind, EventKind::Delete);
        let lived = stopped.elapsed();
        assert!(lived >= ttl / 2, "expired after only {lived:?}");
        assert_eq!(s.get(b"k").await.unwrap(), None);
    }
}

mod etcd_server {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use futures::StreamExt;
    use metropolis_store::{EtcdStore, Op, Store, StoreError, Txn};

    use super::Harness;
    use metropolis_store::testing::{EtcdServer, Listen, free_port};

    /// The suite's etcd backend: a fresh server, reached over its unix
    /// socket as a node reaches its own member.
    pub async fn start() -> Harness {
        let server = EtcdServer::start(Listen::Unix).await;
        let store: Arc<dyn Store> = server.connect().await;
        Harness {
            store,
            short_ttl: Duration::from_secs(1),
            _guard: Box::new(server),
        }
    }

    // etcd-specific behaviour that the embedded store does not share.

    /// Also the test of plain `http://` endpoints ([`EtcdStore::connect`]);
    /// the raw client compacts, which the trait cannot.
    #[tokio::test]
    async fn compacted_watch_start_is_a_stream_error() {
        let server = EtcdServer::start(Listen::Http).await;
        let s = server.connect().await;
        assert_eq!(s.endpoints(), [server.client_url()]);
        for i in 0..10 {
            s.txn(Txn::new().and_then(Op::put("k", i.to_string())))
                .await
                .unwrap();
        }
        let head = s.revision().await.unwrap();
        let mut client = etcd_client::Client::connect([server.client_url()], None)
            .await
            .unwrap();
        client.compact(head - 3, None).await.unwrap();

        let mut w = s.watch(b"", 2).await.unwrap();
        match w.next().await {
            Some(Err(StoreError::Compacted { requested, oldest })) => {
                assert_eq!((requested, oldest), (2, head - 3));
            }
            other => panic!("expected a compaction error, got {other:?}"),
        }
        assert!(w.next().await.is_none());
        // The oldest kept revision can still be watched.
        let mut w = s.watch(b"", head - 3).await.unwrap();
        let first = w.next().await.unwrap().unwrap();
        assert_eq!(first.kv.mod_revision, head - 3);
    }

    #[tokio::test]
    async fn duplicate_writes_in_one_txn_are_invalid() {
        let h = start().await;
        let err = h
            .store
            .txn(
                Txn::new()
                    .and_then(Op::put("a", "1"))
                    .and_then(Op::put("a", "2")),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Invalid(_)), "{err}");
    }

    #[tokio::test]
    async fn unreachable_etcd_is_unavailable() {
        let endpoints = [format!("http://127.0.0.1:{}", free_port())];
        let err = EtcdStore::connect(&endpoints).await.unwrap_err();
        eprintln!("connect error: {err}");
        assert!(matches!(err, StoreError::Unavailable(_)), "{err}");
        assert!(err.to_string().contains(&endpoints[0]), "{err}");
    }

    #[tokio::test]
    async fn missing_unix_socket_is_unavailable() {
        let dir = tempfile::TempDir::new().unwrap();
        let path = dir.path().join("client.sock:0");
        let err = EtcdStore::connect_unix(&path).await.unwrap_err();
        eprintln!("connect error: {err}");
        assert!(matches!(err, StoreError::Unavailable(_)), "{err}");
        let msg = err.to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        // The cause, not only tonic's bare "transport error".
        assert!(msg.contains("No such file or directory"), "{msg}");
    }

    /// A unix-socket client outlives an etcd restart: its channel connects
    /// again through the same socket path.
    #[tokio::test]
    async fn unix_client_reconnects_after_restart() {
        let mut server = EtcdServer::start(Listen::Unix).await;
        let s = server.connect().await;
        let written = s
            .txn(Txn::new().and_then(Op::put("k", "v")))
            .await
            .unwrap()
            .revision;
        server.restart().await;
        let deadline = Instant::now() + Duration::from_secs(10);
        let kv = loop {
            match s.get(b"k").await {
                Ok(kv) => break kv,
                Err(e) if Instant::now() > deadline => panic!("no reconnect: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        assert_eq!(kv.map(|kv| kv.mod_revision), Some(written));
    }
}

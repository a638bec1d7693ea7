use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::codec::{decode_events, decode_record, encode_events};
use super::tables::prefix_end;
use super::*;
use crate::{Compare, CompareOp, CompareTarget, EventKind, WatchEvent};
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

/// Point reads run on the caller's thread (see the module documentation),
/// which is only sound if they never wait for a writer: here redb's one
/// writer is held, as a slow commit would hold it, and reads still answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_do_not_wait_for_a_writer() {
    let dir = TempDir::new().expect("tempdir");
    let store = open(&dir).await;
    put(&store, "k", "old").await;
    let writer = store.inner.db.begin_write().expect("hold the writer");
    let queued = {
        let store = Arc::clone(&store);
        tokio::spawn(async move {
            store
                .txn(Txn::new().and_then(Op::put("k", "new")))
                .await
                .expect("put")
        })
    };
    let got = tokio::time::timeout(WAIT, store.get(b"k"))
        .await
        .expect("a get waited for the writer")
        .expect("get")
        .expect("k exists");
    assert_eq!(got.value, b"old");
    let read_only = Txn::new()
        .when(Compare::value_equals("k", "old"))
        .and_then(Op::get("k"));
    let resp = tokio::time::timeout(WAIT, store.txn(read_only))
        .await
        .expect("a read-only transaction waited for the writer")
        .expect("read-only txn");
    assert!(resp.succeeded, "the read saw a write that is not committed");
    let scanned = tokio::time::timeout(WAIT, store.range(b"k"))
        .await
        .expect("a range waited for the writer")
        .expect("range");
    assert_eq!(scanned.kvs.len(), 1);
    drop(writer);
    let committed = tokio::time::timeout(WAIT, queued)
        .await
        .expect("the queued write never committed")
        .expect("write task");
    assert!(committed.succeeded);
    assert_eq!(
        store.get(b"k").await.expect("get").expect("k").value,
        b"new"
    );
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
    assert!(matches!(s.keep_alive(lease).await, Err(StoreError::LeaseNotFound(id)) if id == lease));
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

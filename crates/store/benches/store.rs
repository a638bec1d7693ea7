//! Latency of the embedded store's basic operations. Every write commits
//! durably (fsync), so the write figures mostly measure the disk.

use std::hint::black_box;

use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use metropolis_store::{Compare, EmbeddedStore, Op, Store, Txn};

fn store_benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let dir = tempfile::TempDir::new().expect("temp dir");
    let store = rt
        .block_on(EmbeddedStore::open(&dir.path().join("bench.redb")))
        .expect("open store");

    let mut group = c.benchmark_group("embedded_store");

    group.bench_function("put_txn", |b| {
        let mut i = 0u64;
        b.iter(|| {
            i += 1;
            let txn = Txn::new().and_then(Op::put(format!("put/{}", i % 1000), "value"));
            black_box(rt.block_on(store.txn(txn)).expect("put"))
        });
    });

    group.bench_function("cas_txn", |b| {
        let mut revision = rt
            .block_on(store.txn(Txn::new().and_then(Op::put("cas", "0"))))
            .expect("seed cas key")
            .revision;
        b.iter(|| {
            let txn = Txn::new()
                .when(Compare::mod_revision("cas", revision))
                .and_then(Op::put("cas", "next"))
                .or_else(Op::get("cas"));
            let resp = rt.block_on(store.txn(txn)).expect("cas");
            assert!(resp.succeeded, "CAS lost against itself");
            revision = resp.revision;
        });
    });

    // A point read, as the curator's handlers make several per call: what
    // it costs is mostly how it reaches redb, not redb's lookup.
    group.bench_function("get", |b| {
        b.iter(|| black_box(rt.block_on(store.get(b"cas")).expect("get")));
    });

    for batch in 0..10 {
        let mut txn = Txn::new();
        for i in 0..1000 {
            txn = txn.and_then(Op::put(
                format!("range/{:05}", batch * 1000 + i),
                vec![0u8; 100],
            ));
        }
        rt.block_on(store.txn(txn)).expect("fill range keys");
    }
    group.bench_function("range_10k_keys", |b| {
        b.iter(|| {
            let resp = rt.block_on(store.range(b"range/")).expect("range");
            assert_eq!(resp.kvs.len(), 10_000);
            black_box(resp)
        });
    });

    group.finish();

    // Group commit: node-sized compare-and-swap writes (each creates a key
    // and rewrites it on its last revision, as the curator's writes do), by
    // 1 and by 64 writers at once; the figure is transactions per second.
    let record = vec![0x5au8; 1200];
    let mut group = c.benchmark_group("embedded_store_writers");
    for writers in [1usize, 64] {
        group.throughput(Throughput::Elements(writers as u64));
        // Each writer's key and the revision it last wrote it at (0: absent).
        let mut last: Vec<i64> = vec![0; writers];
        group.bench_function(format!("cas_{writers}_writers"), |b| {
            b.iter(|| {
                let tasks: Vec<_> = last
                    .iter()
                    .enumerate()
                    .map(|(w, &rev)| {
                        let store = Arc::clone(&store);
                        let key = format!("writers{writers}/{w}");
                        let txn = Txn::new()
                            .when(Compare::mod_revision(key.as_str(), rev))
                            .and_then(Op::put(key, record.clone()));
                        rt.spawn(async move { store.txn(txn).await })
                    })
                    .collect();
                rt.block_on(async {
                    for (t, rev) in tasks.into_iter().zip(last.iter_mut()) {
                        let resp = t.await.expect("writer").expect("txn");
                        assert!(resp.succeeded, "a writer lost its own key");
                        *rev = resp.revision;
                    }
                });
            });
        });
    }
    group.finish();
}

criterion_group!(benches, store_benches);
criterion_main!(benches);

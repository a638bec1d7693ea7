//! Latency of the embedded store's basic operations. Every write commits
//! durably (fsync), so the write figures mostly measure the disk.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
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
}

criterion_group!(benches, store_benches);
criterion_main!(benches);

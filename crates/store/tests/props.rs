//! The store's key encoding under generated keys: whatever bytes a key
//! holds (empty, 0x00, 0xff runs, prefixes of each other), get and prefix
//! range answer what a plain ordered map of the same writes answers.

use std::collections::BTreeMap;
use std::sync::Mutex;

use metropolis_api::testing::props;
use metropolis_api::testing::proptest::prelude::*;
use metropolis_store::{EmbeddedStore, Op, Store, Txn};

fn key_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..12),
        prop::collection::vec(prop::sample::select(&[0u8, 1, 0x7f, 0xfe, 0xff][..]), 0..6),
    ]
}

#[test]
fn props_store_keys() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tmp");
    let store = rt
        .block_on(EmbeddedStore::open(&dir.path().join("db")))
        .expect("open");
    // Each case writes under its own prefix, so one store serves them all.
    let case = Mutex::new(0u64);
    let ops = prop::collection::vec((key_bytes(), prop::option::of(key_bytes())), 1..6);
    props("store key encoding", (ops, key_bytes()), |(ops, query)| {
        let n = {
            let mut c = case.lock().expect("lock");
            *c += 1;
            *c
        };
        let base = format!("/case/{n:016x}/").into_bytes();
        let at = |k: &[u8]| [base.as_slice(), k].concat();
        let mut model = BTreeMap::new();
        rt.block_on(async {
            for (key, value) in &ops {
                let op = match value {
                    Some(v) => {
                        model.insert(at(key), v.clone());
                        Op::put(at(key), v.clone())
                    }
                    None => {
                        model.remove(&at(key));
                        Op::delete(at(key))
                    }
                };
                let txn = Txn {
                    compares: vec![],
                    success: vec![op],
                    failure: vec![],
                };
                store.txn(txn).await.expect("txn");
            }
        });
        for (key, _) in &ops {
            let got = rt.block_on(store.get(&at(key))).expect("get");
            prop_assert_eq!(got.map(|kv| kv.value), model.get(&at(key)).cloned());
        }
        let prefix = at(&query);
        let range = rt.block_on(store.range(&prefix)).expect("range");
        let got: Vec<(Vec<u8>, Vec<u8>)> =
            range.kvs.into_iter().map(|kv| (kv.key, kv.value)).collect();
        let want: Vec<(Vec<u8>, Vec<u8>)> = model
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        prop_assert_eq!(got, want);
        Ok(())
    });
}

//! Moving a store's contents into etcd, and checking that they arrived: the
//! online migration of a cluster from the embedded store to etcd copies one
//! consistent read of the embedded store with [`load`] and compares
//! [`Digest`]s of both sides before it switches.
//!
//! Only the keys and values move. Revisions, versions and leases do not:
//! the target numbers its own revisions, and a leased key (the curator
//! leader's claim) belongs to a lease of the source that means nothing in
//! the target, so callers leave such keys out of both the copy and the
//! digest ([`KeyValue::lease`] ≠ 0).

use std::fmt;

use etcd_client::GetOptions;
use futures::{StreamExt, TryStreamExt};
use sha2::{Digest as _, Sha256};

use crate::etcd::{convert_kv, header_revision, map_err, prefix_range};
use crate::{EtcdStore, KeyValue, Op, Store, StoreError, Txn};

/// etcd's default `--max-txn-ops`.
const MAX_TXN_OPS: usize = 128;
/// Keys and values per transaction, well under etcd's default
/// `--max-request-bytes` (1.5 MiB).
const MAX_TXN_BYTES: usize = 1 << 20;
/// Transactions in flight at once: etcd commits concurrent proposals in one
/// batch (one fsync), so a few in flight cost little more than one.
const CONCURRENCY: usize = 16;
/// Keys per page when reading a whole etcd store: a page must fit the
/// client's 4 MiB response limit.
const PAGE_KEYS: i64 = 1000;

/// Number, size and SHA-256 of a sequence of keys and values, in key order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Digest {
    pub keys: u64,
    /// Bytes of keys and values together.
    pub bytes: u64,
    pub sha256: [u8; 32],
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} keys, {} bytes, sha256 {}",
            self.keys,
            self.bytes,
            hex::encode(&self.sha256[..8])
        )
    }
}

/// Accumulates a [`Digest`].
#[derive(Default)]
pub struct Digester {
    hash: Sha256,
    keys: u64,
    bytes: u64,
}

impl Digester {
    /// Adds one key and value; keys must come in ascending order.
    pub fn add(&mut self, key: &[u8], value: &[u8]) {
        // Lengths first, so that no two different sequences hash alike.
        for part in [key, value] {
            self.hash.update((part.len() as u64).to_be_bytes());
            self.hash.update(part);
        }
        self.keys += 1;
        self.bytes += (key.len() + value.len()) as u64;
    }

    pub fn finish(self) -> Digest {
        Digest {
            keys: self.keys,
            bytes: self.bytes,
            sha256: self.hash.finalize().into(),
        }
    }
}

impl Digest {
    /// The digest of `kvs`, which must be in ascending key order (as every
    /// range read returns them).
    pub fn of<'a>(kvs: impl IntoIterator<Item = &'a KeyValue>) -> Digest {
        let mut d = Digester::default();
        for kv in kvs {
            d.add(&kv.key, &kv.value);
        }
        d.finish()
    }
}

/// Puts every key of `kvs` into `target`: transactions of up to 128 puts and
/// 1 MiB, several in flight. Leases are not carried over (see the module
/// documentation). Not atomic: on an error, part of `kvs` may be written.
pub async fn load(target: &dyn Store, kvs: &[KeyValue]) -> Result<(), StoreError> {
    let mut batches = Vec::new();
    let mut txn = Txn::new();
    let mut bytes = 0;
    for kv in kvs {
        let size = kv.key.len() + kv.value.len();
        if !txn.success.is_empty()
            && (txn.success.len() == MAX_TXN_OPS || bytes + size > MAX_TXN_BYTES)
        {
            batches.push(std::mem::take(&mut txn));
            bytes = 0;
        }
        txn = txn.and_then(Op::put(kv.key.clone(), kv.value.clone()));
        bytes += size;
    }
    if !txn.success.is_empty() {
        batches.push(txn);
    }
    futures::stream::iter(batches)
        .map(|txn| target.txn(txn))
        .buffer_unordered(CONCURRENCY)
        .try_for_each(|_| async { Ok(()) })
        .await
}

impl EtcdStore {
    /// The [`Digest`] of every key not attached to a lease, read page by page
    /// at one revision (any size of store, within the client's response
    /// limit per page).
    pub async fn digest_unleased(&self) -> Result<Digest, StoreError> {
        let (mut from, end) = prefix_range(b"");
        let mut revision = 0;
        let mut digester = Digester::default();
        loop {
            let mut options = GetOptions::new()
                .with_range(end.clone())
                .with_limit(PAGE_KEYS);
            if revision > 0 {
                options = options.with_revision(revision);
            }
            let resp = self
                .kv()
                .get(from.clone(), Some(options))
                .await
                .map_err(map_err)?;
            if revision == 0 {
                revision = header_revision(resp.0.header.as_ref())?;
            }
            let more = resp.0.more;
            let kvs: Vec<KeyValue> = resp.0.kvs.into_iter().map(convert_kv).collect();
            for kv in kvs.iter().filter(|kv| kv.lease == 0) {
                digester.add(&kv.key, &kv.value);
            }
            match kvs.last() {
                Some(last) if more => {
                    from = last.key.clone();
                    from.push(0);
                }
                _ => return Ok(digester.finish()),
            }
        }
    }
}

#[cfg(all(test, feature = "testing"))]
mod tests {
    use super::*;
    use crate::testing::{EtcdServer, Listen};

    #[test]
    fn digests_tell_sequences_apart() {
        let kv = |k: &str, v: &str| KeyValue {
            key: k.as_bytes().to_vec(),
            value: v.as_bytes().to_vec(),
            create_revision: 1,
            mod_revision: 1,
            version: 1,
            lease: 0,
        };
        let a = Digest::of(&[kv("a", "bc")]);
        assert_eq!(a, Digest::of(&[kv("a", "bc")]));
        assert_ne!(a, Digest::of(&[kv("ab", "c")]));
        assert_ne!(a, Digest::of(&[kv("a", "bc"), kv("b", "")]));
        assert_eq!(a.keys, 1);
        assert_eq!(a.bytes, 3);
    }

    #[tokio::test]
    async fn a_loaded_store_has_the_same_digest_over_several_pages() {
        let server = EtcdServer::start(Listen::Unix).await;
        let etcd = server.connect().await;
        // Several transactions (by count and by size) and several pages.
        let kvs: Vec<KeyValue> = (0..2500)
            .map(|i| KeyValue {
                key: format!("/nodes/{i:05}").into_bytes(),
                value: vec![
                    u8::try_from(i % 251).unwrap();
                    if i % 100 == 0 { 300_000 } else { 200 }
                ],
                create_revision: 1,
                mod_revision: 1,
                version: 1,
                lease: 0,
            })
            .collect();
        load(etcd.as_ref(), &kvs).await.expect("load");
        // A leased key is left out of the digest.
        let lease = etcd
            .grant_lease(std::time::Duration::from_secs(30))
            .await
            .expect("lease");
        etcd.txn(Txn::new().and_then(Op::Put {
            key: b"/curator/leader".to_vec(),
            value: b"x".to_vec(),
            lease,
        }))
        .await
        .expect("leased put");
        assert_eq!(
            etcd.digest_unleased().await.expect("digest"),
            Digest::of(&kvs)
        );
        etcd.txn(Txn::new().and_then(Op::delete(b"/nodes/01234".to_vec())))
            .await
            .expect("delete");
        assert_ne!(
            etcd.digest_unleased().await.expect("digest"),
            Digest::of(&kvs)
        );
    }
}

//! [`crate::Store::snapshot`] on redb: one read transaction, held open on
//! a blocking thread while the pages go out through a small channel. redb
//! read transactions see the database as it was when they began and never
//! block writers, so the snapshot is consistent and the cluster keeps
//! working while a backup streams.

use std::ops::Bound;
use std::sync::Arc;

use redb::{ReadableDatabase, ReadableTable};
use tokio::sync::{mpsc, oneshot};

use super::Inner;
use super::codec::decode_record;
use super::tables::{KV, META, META_REVISION, backend, meta_get, prefix_end};
use crate::{KeyValue, Snapshot, StoreError};

/// Pages read ahead of the consumer: enough to overlap reading and sending,
/// few enough that a slow consumer holds little memory.
const READ_AHEAD: usize = 2;

pub(super) async fn snapshot(
    inner: Arc<Inner>,
    count_prefix: Vec<u8>,
    page_keys: usize,
) -> Result<Snapshot, StoreError> {
    let page_keys = page_keys.max(1);
    let (started_tx, started_rx) = oneshot::channel();
    let (pages_tx, pages_rx) = mpsc::channel(READ_AHEAD);
    tokio::task::spawn_blocking(move || {
        let read = || -> Result<_, StoreError> {
            let txn = inner
                .db
                .begin_read()
                .map_err(backend("begin read transaction"))?;
            let meta = txn.open_table(META).map_err(backend("open meta table"))?;
            let kv = txn.open_table(KV).map_err(backend("open kv table"))?;
            let revision = meta_get(&meta, META_REVISION)?;
            let upper = match prefix_end(&count_prefix) {
                Some(end) => Bound::Excluded(end),
                None => Bound::Unbounded,
            };
            let range = (Bound::Included(count_prefix.clone()), upper);
            let counted = kv
                .range::<&[u8]>((
                    range.0.as_ref().map(Vec::as_slice),
                    range.1.as_ref().map(Vec::as_slice),
                ))
                .map_err(backend("count keys"))?
                .count() as u64;
            Ok((kv, revision, counted))
        };
        let kv = match read() {
            Ok((kv, revision, counted)) => {
                if started_tx.send(Ok((revision, counted))).is_err() {
                    return;
                }
                kv
            }
            Err(e) => {
                let _ = started_tx.send(Err(e));
                return;
            }
        };
        let send_all = || -> Result<(), StoreError> {
            let mut page: Vec<KeyValue> = Vec::with_capacity(page_keys);
            for entry in kv.iter().map_err(backend("read keys"))? {
                let (key, record) = entry.map_err(backend("read keys"))?;
                page.push(decode_record(key.value(), record.value())?);
                if page.len() == page_keys {
                    let full = std::mem::replace(&mut page, Vec::with_capacity(page_keys));
                    if pages_tx.blocking_send(Ok(full)).is_err() {
                        // The consumer is gone; so is the reason to read on.
                        return Ok(());
                    }
                }
            }
            if !page.is_empty() {
                let _ = pages_tx.blocking_send(Ok(page));
            }
            Ok(())
        };
        if let Err(e) = send_all() {
            let _ = pages_tx.blocking_send(Err(e));
        }
    });
    let (revision, counted) = started_rx
        .await
        .map_err(|_| StoreError::Backend("store snapshot worker failed".into()))??;
    Ok(Snapshot {
        revision,
        counted,
        pages: Box::pin(tokio_stream::wrappers::ReceiverStream::new(pages_rx)),
    })
}

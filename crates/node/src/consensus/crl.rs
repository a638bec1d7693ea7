//! Keeping etcd's CRL current: a consensus member follows the consensus
//! CRL in the cluster state and hands every new version to its etcd, which
//! reads the file at every new peer connection. So a member whose role is
//! removed (its peer certificate revoked in the same transaction) is
//! refused on every other member's peer port as soon as the change reaches
//! it. On the way it copies the consensus CA's key next to etcd's files
//! (see `config::stopgap_peer_certificate`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use futures::StreamExt;
use metropolis_curator::consensus::pki::{ConsensusPki, KEY_CRL, KEY_PKI};
use metropolis_store::{EventKind, Store};

use super::config::{write_ca_key, write_crl};

/// Follows the CRL in `store` into `dir` (an etcd member's directory) until
/// the task is aborted.
pub async fn follow(store: Arc<dyn Store>, dir: PathBuf) {
    let mut last_error = String::new();
    loop {
        if let Err(e) = follow_once(store.as_ref(), &dir).await {
            let msg = format!("{e:#}");
            if msg != last_error {
                tracing::warn!(error = %msg, "following the consensus CRL; retrying");
                last_error = msg;
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn follow_once(store: &dyn Store, dir: &Path) -> anyhow::Result<()> {
    // The CA never changes (there is no rotation), so once is enough.
    if let Some(kv) = store.get(KEY_PKI.as_bytes()).await? {
        let pki = ConsensusPki::from_stored(&kv.value, kv.mod_revision)?;
        if write_ca_key(dir, &pki.ca_key_seed())? {
            tracing::info!("keeping the consensus CA's key for stopgap peer certificates");
        }
    }
    let from = match store.get(KEY_CRL.as_bytes()).await? {
        Some(kv) => {
            apply(dir, &kv.value)?;
            kv.mod_revision + 1
        }
        None => store.revision().await? + 1,
    };
    let mut watch = store.watch(KEY_CRL.as_bytes(), from).await?;
    while let Some(ev) = watch.next().await {
        let ev = ev?;
        if ev.kind == EventKind::Put && ev.kv.key == KEY_CRL.as_bytes() {
            apply(dir, &ev.kv.value)?;
        }
    }
    bail!("the watch of the consensus CRL ended")
}

fn apply(dir: &Path, crl: &[u8]) -> anyhow::Result<()> {
    if write_crl(dir, crl)? {
        tracing::info!("etcd's peer port follows a new consensus CRL");
    }
    Ok(())
}

//! `--restore FILE --owner-key PEM`: a new first consensus member from a
//! backup (`metroctl cluster backup`).
//!
//! Everything that can be wrong with the input is found before anything is
//! written: the data directory must be empty (or not exist), the owner key
//! must be metroctl's owner key file, and the whole backup is read once —
//! decrypted, every age chunk authenticated, the inner header compared with
//! the readable one, the digest of every entry compared with the trailer.
//! Only then is the file read a second time into a new embedded store,
//! chunk by chunk (never whole in memory), and `curator::backup::finish`
//! turns it into a cluster with this node as its only consensus member.
//! A failure past that point removes what was written.
//!
//! The node's own key and certificate are new: its sealed credentials were
//! lost with its disk. The node record at `--address` moves to the new key's
//! node ID (see `curator::backup`); the other nodes rejoin with their
//! existing credentials at the addresses their directories know.
//!
//! A backup of an etcd cluster is restored onto the embedded store too: the
//! state is the same, and the cluster grows back to high availability the
//! way a cluster on the embedded store does.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use metropolis_api::admin::{BackupEntries, ConsensusBackend};
use metropolis_curator::backup::{self as restore_state, Restoring};

use crate::datadir::{Credentials, DataDir};

/// Chunks decrypted ahead of the store writes.
const READ_AHEAD: usize = 2;

pub struct Restore<'a> {
    pub file: &'a Path,
    pub owner_key: &'a Path,
    pub address: std::net::IpAddr,
}

/// Restores the backup into `data` and returns the node's credentials and
/// its (embedded) store.
pub async fn restore(
    data: &DataDir,
    r: Restore<'_>,
) -> anyhow::Result<(Credentials, std::sync::Arc<metropolis_store::EmbeddedStore>)> {
    let what = || format!("cannot restore from {}", r.file.display());
    check_empty(data.root()).with_context(what)?;
    let owner = read_owner_key(r.owner_key).with_context(what)?;
    let file = r.file.to_path_buf();
    let key = owner.clone();
    let header = tokio::task::spawn_blocking(move || {
        metropolis_backup::verify(open(&file)?, &key).map_err(anyhow::Error::from)
    })
    .await
    .context("backup reader failed")?
    .with_context(what)?;
    tracing::info!(
        revision = header.revision,
        nodes = header.node_count,
        ca = %hex::encode(&header.ca_fingerprint),
        from = if header.backend == ConsensusBackend::Etcd as i32 { "etcd" } else { "embedded" },
        "backup verified; restoring it onto this node's embedded store"
    );

    data.create()?;
    let result = write(data, &r, owner).await;
    if result.is_err() {
        // Never leave a half-restored directory that a later start would
        // take for a member's; the directory itself may stay (it was empty).
        let cleared = std::fs::read_dir(data.root()).and_then(|entries| {
            entries.into_iter().try_for_each(|e| {
                let path = e?.path();
                if path.is_dir() {
                    std::fs::remove_dir_all(path)
                } else {
                    std::fs::remove_file(path)
                }
            })
        });
        if let Err(e) = cleared {
            tracing::warn!(error = %e, dir = %data.root().display(), "cannot clear the half-restored data directory");
        }
    }
    result.with_context(what)
}

async fn write(
    data: &DataDir,
    r: &Restore<'_>,
    owner: metropolis_identity::SigningKey,
) -> anyhow::Result<(Credentials, std::sync::Arc<metropolis_store::EmbeddedStore>)> {
    data.create_store()?;
    let store = metropolis_store::EmbeddedStore::open(&data.store_path())
        .await
        .with_context(|| format!("opening {}", data.store_path().display()))?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<anyhow::Result<BackupEntries>>(READ_AHEAD);
    let file = r.file.to_path_buf();
    let reader = tokio::task::spawn_blocking(move || {
        let run = || -> anyhow::Result<()> {
            let mut backup = metropolis_backup::Reader::open(open(&file)?, &owner)?;
            while let Some(entries) = backup.entries()? {
                if tx.blocking_send(Ok(entries)).is_err() {
                    return Ok(());
                }
            }
            Ok(())
        };
        if let Err(e) = run() {
            let _ = tx.blocking_send(Err(e));
        }
    });
    let mut keys = 0usize;
    while let Some(entries) = rx.recv().await {
        let entries = entries.context("reading the backup a second time")?;
        keys += entries.entries.len();
        restore_state::load(store.as_ref(), entries).await?;
    }
    reader.await.context("backup reader failed")?;

    let key = metropolis_identity::generate_key();
    let restored = restore_state::finish(
        store.as_ref(),
        &Restoring {
            node_public_key: key.verifying_key().to_bytes(),
            address: r.address.to_string(),
        },
    )
    .await?;
    let creds = Credentials {
        key,
        node_certificate: restored.node_certificate,
        ca_certificate: restored.ca_certificate,
    };
    data.seal(&creds)?;
    tracing::info!(
        node = %restored.node_id,
        replaces = restored.replaced.as_deref().unwrap_or("(no node had this address)"),
        demoted = ?restored.demoted,
        keys,
        "restored the cluster; this node is its only consensus member"
    );
    Ok((creds, store))
}

fn open(file: &PathBuf) -> anyhow::Result<std::io::BufReader<std::fs::File>> {
    let f = std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
    Ok(std::io::BufReader::new(f))
}

/// metroctl's owner key file (`owner-key.pem` in its configuration
/// directory).
fn read_owner_key(path: &Path) -> anyhow::Result<metropolis_identity::SigningKey> {
    let meta = std::fs::metadata(path)
        .with_context(|| format!("reading the owner key {}", path.display()))?;
    // A key file is a few hundred bytes; don't read a wrong argument whole.
    if meta.len() > 64 * 1024 {
        bail!(
            "{} is not an owner key ({} bytes); give metroctl's owner-key.pem",
            path.display(),
            meta.len()
        );
    }
    let pem = std::fs::read_to_string(path)
        .with_context(|| format!("reading the owner key {}", path.display()))?;
    metropolis_identity::decode_owner_key_pem(&pem).with_context(|| {
        format!(
            "{} is not an owner key; give metroctl's owner-key.pem",
            path.display()
        )
    })
}

/// A restore starts from nothing: an existing directory must be empty.
fn check_empty(dir: &Path) -> anyhow::Result<()> {
    match std::fs::read_dir(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("reading data directory {}", dir.display())),
        Ok(mut entries) => match entries.next() {
            None => Ok(()),
            Some(entry) => {
                let name = entry
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .unwrap_or_default();
                bail!(
                    "data directory {} is not empty (it holds {name:?}); a restore needs an empty or new directory",
                    dir.display()
                )
            }
        },
    }
}

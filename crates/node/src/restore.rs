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
//! A backup of an etcd cluster is restored onto a new etcd cluster of one
//! member, this node, with a peer certificate from the backup's consensus
//! CA (the old members' certificates are revoked); it grows again as any
//! etcd cluster does (`metroctl node add role ConsensusMember`). Without an
//! etcd binary it is restored onto the embedded store, which can move to
//! etcd later. A backup of the embedded store is restored onto the
//! embedded store.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use metropolis_api::admin::{BackupEntries, ConsensusBackend};
use metropolis_curator::backup::{self as restore_state, Restoring};
use metropolis_curator::consensus::pki::KEY_PKI;
use metropolis_curator::state::KEY_CONFIG;
use metropolis_store::{EmbeddedStore, EtcdStore, Store};

use crate::consensus;
use crate::datadir::{Credentials, DataDir};
use crate::logtree::LogTree;

/// Chunks decrypted ahead of the store writes.
const READ_AHEAD: usize = 2;

pub struct Restore<'a> {
    pub file: &'a Path,
    pub owner_key: &'a Path,
    pub address: std::net::IpAddr,
    pub etcd_binary: Option<&'a Path>,
    pub logs: Arc<LogTree>,
}

/// The store a restore wrote.
pub enum Restored {
    Embedded(Arc<EmbeddedStore>),
    Etcd {
        etcd: consensus::Etcd,
        store: Arc<EtcdStore>,
    },
}

/// Where the state goes.
enum Target {
    Embedded,
    /// The etcd binary, the backup's consensus PKI record and its cluster
    /// configuration (which sets the peer certificate's lifetime).
    Etcd(PathBuf, Vec<u8>, Option<Vec<u8>>),
}

/// Restores the backup into `data` and returns the node's credentials and
/// its store.
pub async fn restore(data: &DataDir, r: Restore<'_>) -> anyhow::Result<(Credentials, Restored)> {
    let what = || format!("cannot restore from {}", r.file.display());
    check_empty(data.root()).with_context(what)?;
    let owner = read_owner_key(r.owner_key).with_context(what)?;
    let file = r.file.to_path_buf();
    let key = owner.clone();
    let (header, pki, config) = tokio::task::spawn_blocking(move || {
        let mut backup = metropolis_backup::Reader::open(open(&file)?, &key)?;
        let (mut pki, mut config) = (None, None);
        while let Some(entries) = backup.entries()? {
            for e in entries.entries {
                if e.key == KEY_PKI.as_bytes() {
                    pki = Some(e.value);
                } else if e.key == KEY_CONFIG.as_bytes() {
                    config = Some(e.value);
                }
            }
        }
        Ok::<_, anyhow::Error>((backup.header().clone(), pki, config))
    })
    .await
    .context("backup reader failed")?
    .with_context(what)?;
    let from_etcd = header.backend == ConsensusBackend::Etcd as i32;
    let target = match (from_etcd, pki) {
        (true, Some(pki)) => match consensus::find_binary(r.etcd_binary) {
            Ok(binary) => Target::Etcd(binary, pki, config),
            Err(e) => {
                tracing::warn!(error = %e, "the backup comes from etcd, but there is no etcd binary here; restoring onto the embedded store (it can move to etcd later)");
                Target::Embedded
            }
        },
        _ => Target::Embedded,
    };
    tracing::info!(
        revision = header.revision,
        nodes = header.node_count,
        ca = %hex::encode(&header.ca_fingerprint),
        from = if from_etcd { "etcd" } else { "embedded" },
        onto = match target { Target::Etcd(..) => "etcd", Target::Embedded => "embedded" },
        "backup verified; restoring it"
    );

    data.create()?;
    let result = write(data, &r, owner, target).await;
    if result.is_err() {
        // Never leave a half-restored directory that a later start would
        // take for a member's; the directory itself may stay (it was empty).
        let cleared = std::fs::read_dir(data.root()).and_then(|mut entries| {
            entries.try_for_each(|e| {
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
    target: Target,
) -> anyhow::Result<(Credentials, Restored)> {
    let key = metropolis_identity::generate_key();
    let public = key.verifying_key().to_bytes();
    let node_id = metropolis_identity::node_id(&public);
    let (restored, role) = match target {
        Target::Embedded => {
            data.create_store()?;
            let store = EmbeddedStore::open(&data.store_path())
                .await
                .with_context(|| format!("opening {}", data.store_path().display()))?;
            (Restored::Embedded(store), Default::default())
        }
        Target::Etcd(binary, pki, config) => {
            let role =
                restore_state::peer_certificate(&pki, config.as_deref(), &public, r.address)?;
            let url = metropolis_curator::consensus::peer_url(r.address);
            let cfg = consensus::PeerConfig {
                name: node_id.clone(),
                address: r.address,
                peer_port: metropolis_curator::consensus::PEER_PORT,
                ca_der: role.ca_certificate.clone(),
                peer_cert_der: role.peer_certificate.clone(),
                crl_der: role.initial_crl.clone(),
                initial_cluster: vec![(node_id.clone(), url)],
                new_cluster: true,
                cluster_token: consensus::CLUSTER_TOKEN.into(),
                staged: false,
            };
            consensus::configure(&data.etcd_dir(), &cfg, &key)?;
            let etcd = consensus::Etcd::start(&data.etcd_dir(), &binary, r.logs.clone()).await?;
            let store = etcd.connect().await;
            (Restored::Etcd { etcd, store }, role)
        }
    };
    let store: Arc<dyn Store> = match &restored {
        Restored::Embedded(s) => s.clone(),
        Restored::Etcd { store, .. } => store.clone(),
    };
    let filled = async {
        let keys = load_all(store.as_ref(), r.file, owner).await?;
        let done = restore_state::finish(
            store.as_ref(),
            &Restoring {
                node_public_key: public,
                address: r.address.to_string(),
                consensus_role: role,
            },
        )
        .await?;
        Ok::<_, anyhow::Error>((keys, done))
    }
    .await;
    let (keys, done) = match filled {
        Ok(v) => v,
        Err(e) => {
            if let Restored::Etcd { etcd, .. } = restored {
                etcd.stop().await;
            }
            return Err(e);
        }
    };
    let creds = Credentials {
        key,
        node_certificate: done.node_certificate,
        ca_certificate: done.ca_certificate,
    };
    data.seal(&creds)?;
    tracing::info!(
        node = %done.node_id,
        replaces = done.replaced.as_deref().unwrap_or("(no node had this address)"),
        demoted = ?done.demoted,
        keys,
        "restored the cluster; this node is its only consensus member"
    );
    Ok((creds, restored))
}

/// The second read of the backup, into `store`, a few chunks ahead.
async fn load_all(
    store: &dyn Store,
    file: &Path,
    owner: metropolis_identity::SigningKey,
) -> anyhow::Result<usize> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<anyhow::Result<BackupEntries>>(READ_AHEAD);
    let file = file.to_path_buf();
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
        restore_state::load(store, entries).await?;
    }
    reader.await.context("backup reader failed")?;
    Ok(keys)
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

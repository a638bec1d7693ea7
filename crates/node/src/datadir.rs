//! The node's data directory: its sealed credentials and, on consensus
//! members, the consensus store.
//!
//! Layout:
//! - `credentials.pb`: `private.SealedCredentials` (node key, node certificate,
//!   CA certificate), mode 0600. Its presence means "this node belongs to a
//!   cluster"; it is written last, atomically, so a crash during the first
//!   start never leaves a directory that looks joined but is not.
//! - `store/cluster.redb`: the embedded consensus store (it holds the CA's
//!   private key), mode 0600.
//! - `pending-key`: a registering node's key until it is admitted, mode 0600.
//! - `etcd/`: this node's etcd member, on consensus members of a cluster on
//!   etcd: configuration, peer key and consensus CA key (0600) and data (see
//!   `consensus`).
//!   While a cluster on the embedded store moves to etcd, its new member runs
//!   in `etcd/` *staged* (`etcd/staged` exists): removing that marker is the
//!   switch, from which moment etcd holds the cluster state.
//!   [`DataDir::settle`], at every start, finishes either way: a staged
//!   `etcd/` beside the store is removed (the move did not happen), a
//!   `store/` beside a configured `etcd/` becomes `store.pre-etcd/`,
//!   read-only (the move happened; the copy stays).
//! - `update/`: the binary slots of a node that was updated (`update::slots`).
//! - `owner.pub`: on the node that bootstrapped the cluster, the owner key it
//!   was bootstrapped with (to recognize its own bootstrap parameters when
//!   started with them again).
//!
//! A node refuses to start while a file that holds a secret is readable by
//! others, and before anything else checks that its credentials belong
//! together (see [`DataDir::unseal`]).
//!
//! "Sealed" means owner-only file permissions: this daemon has no TPM to seal
//! against, and says so in ARCHITECTURE.md.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use metropolis_api::private::SealedCredentials;
use metropolis_identity::SigningKey;
use prost::Message;

const CREDENTIALS: &str = "credentials.pb";
const STORE_DIR: &str = "store";
const STORE_FILE: &str = "cluster.redb";
const PENDING_KEY: &str = "pending-key";
const DIRECTORY: &str = "directory.pb";
const ETCD_DIR: &str = "etcd";
const BOOTSTRAP_OWNER: &str = "owner.pub";
const PRE_ETCD_STORE_DIR: &str = "store.pre-etcd";

/// A node's long-term credentials.
pub struct Credentials {
    pub key: SigningKey,
    pub node_certificate: Vec<u8>,
    pub ca_certificate: Vec<u8>,
}

impl Credentials {
    pub fn node_id(&self) -> String {
        metropolis_identity::node_id(self.key.verifying_key().as_bytes())
    }
}

#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    pub fn new(root: PathBuf) -> Self {
        DataDir { root }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn store_path(&self) -> PathBuf {
        self.root.join(STORE_DIR).join(STORE_FILE)
    }

    /// Where a consensus member of an etcd cluster keeps its etcd member
    /// (configuration, certificates, data, client socket).
    pub fn etcd_dir(&self) -> PathBuf {
        self.root.join(ETCD_DIR)
    }

    pub fn has_store(&self) -> bool {
        self.store_path().exists()
    }

    /// The embedded store as it was when the cluster moved to etcd.
    pub fn pre_etcd_store_path(&self) -> PathBuf {
        self.root.join(PRE_ETCD_STORE_DIR).join(STORE_FILE)
    }

    /// The switch from the embedded store to etcd: the staged etcd member
    /// becomes this node's (one unlink, made durable), then the embedded
    /// store is set aside read-only.
    pub fn switch_to_etcd(&self) -> anyhow::Result<()> {
        let dir = self.etcd_dir();
        if !crate::consensus::is_staged(&dir) {
            bail!("{} holds no staged etcd member to switch to", dir.display());
        }
        crate::consensus::unstage(&dir)?;
        self.settle()
    }

    /// Finishes an interrupted move from the embedded store to etcd, either
    /// way (see the module documentation). Called at every start.
    pub fn settle(&self) -> anyhow::Result<()> {
        let etcd = self.etcd_dir();
        let store_dir = self.root.join(STORE_DIR);
        if crate::consensus::is_configured(&etcd) {
            if store_dir.exists() {
                let kept = self.root.join(PRE_ETCD_STORE_DIR);
                fs::rename(&store_dir, &kept).with_context(|| {
                    format!("renaming {} to {}", store_dir.display(), kept.display())
                })?;
                sync_dir(&self.root)?;
                let file = self.pre_etcd_store_path();
                if file.exists() {
                    fs::set_permissions(&file, fs::Permissions::from_mode(0o400))
                        .with_context(|| format!("making {} read-only", file.display()))?;
                }
                tracing::info!(
                    kept = %file.display(),
                    "the cluster state is on etcd now; the embedded store stays as the pre-migration copy, read-only"
                );
            }
        } else if etcd.exists() && self.has_store() {
            // Staged (or half made): the embedded store is the live one.
            fs::remove_dir_all(&etcd).with_context(|| format!("removing {}", etcd.display()))?;
            tracing::info!(
                "removed the etcd member of a move to etcd that did not finish; the cluster state is in the embedded store"
            );
        }
        Ok(())
    }

    fn credentials_path(&self) -> PathBuf {
        self.root.join(CREDENTIALS)
    }

    pub fn is_member(&self) -> bool {
        self.credentials_path().exists()
    }

    /// Refuses a directory that holds cluster state without credentials: a
    /// first start that died half-way. Starting over on top of it could mix
    /// two clusters' state.
    pub fn check_fresh(&self) -> anyhow::Result<()> {
        if self.has_store() || self.etcd_dir().exists() {
            bail!(
                "data directory {} holds a consensus store but no node credentials (an interrupted first start?); \
                 remove the directory to start over",
                self.root.display()
            );
        }
        Ok(())
    }

    /// Creates the directory tree, owner-only.
    pub fn create(&self) -> anyhow::Result<()> {
        self.create_dir(&self.root)?;
        fs::set_permissions(&self.root, fs::Permissions::from_mode(0o700))
            .with_context(|| format!("setting permissions of {}", self.root.display()))?;
        Ok(())
    }

    /// Creates the store's directory and its (empty) file, owner-only; only
    /// consensus members have one. The store opens an empty file as a new
    /// database, so it never exists with the default mode.
    pub fn create_store(&self) -> anyhow::Result<()> {
        self.create_dir(&self.root.join(STORE_DIR))?;
        let path = self.store_path();
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        Ok(())
    }

    /// Files that hold secrets (keys, or the store with the CA's key). etcd
    /// keeps its own data directory owner-only.
    fn secret_files(&self) -> [PathBuf; 5] {
        [
            self.credentials_path(),
            self.store_path(),
            self.root.join(PENDING_KEY),
            self.etcd_dir().join(crate::consensus::PEER_KEY_FILE),
            self.etcd_dir().join(crate::consensus::CA_KEY_FILE),
        ]
    }

    /// Refuses to go on while a file holding a secret is readable by others.
    pub fn check_private(&self) -> anyhow::Result<()> {
        for path in self.secret_files() {
            match fs::metadata(&path) {
                Ok(meta) if meta.permissions().mode() & 0o077 != 0 => bail!(
                    "{} holds secrets but is readable by others (mode {:o}); run chmod 600 on it \
                     (and check who could have read it)",
                    path.display(),
                    meta.permissions().mode() & 0o777
                ),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
            }
        }
        Ok(())
    }

    fn create_dir(&self, dir: &Path) -> anyhow::Result<()> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))
    }

    /// Writes the credentials atomically (temporary file, fsync, rename, fsync
    /// of the directory), mode 0600.
    pub fn seal(&self, creds: &Credentials) -> anyhow::Result<()> {
        let msg = SealedCredentials {
            node_key_seed: creds.key.to_bytes().to_vec(),
            node_certificate: creds.node_certificate.clone(),
            ca_certificate: creds.ca_certificate.clone(),
        };
        write_private(&self.root, CREDENTIALS, &msg.encode_to_vec())?;
        match fs::remove_file(self.root.join(PENDING_KEY)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).context("removing the pending registration key"),
        }
        Ok(())
    }

    /// The key of a node that registered but was not admitted yet; created
    /// on first use (mode 0600).
    pub fn pending_key(&self) -> anyhow::Result<SigningKey> {
        let path = self.root.join(PENDING_KEY);
        match fs::read(&path) {
            Ok(bytes) => {
                let seed: [u8; 32] = bytes.as_slice().try_into().map_err(|_| {
                    anyhow::anyhow!(
                        "{} is corrupt; remove it to register with a new key",
                        path.display()
                    )
                })?;
                Ok(SigningKey::from_bytes(&seed))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = metropolis_identity::generate_key();
                write_private(&self.root, PENDING_KEY, &key.to_bytes())?;
                Ok(key)
            }
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Remembers where the cluster's nodes are, for nodes that do not run
    /// the curator themselves.
    pub fn save_directory(
        &self,
        dir: &metropolis_api::common::ClusterDirectory,
    ) -> anyhow::Result<()> {
        write_private(&self.root, DIRECTORY, &dir.encode_to_vec())
    }

    pub fn directory(&self) -> anyhow::Result<Option<metropolis_api::common::ClusterDirectory>> {
        let path = self.root.join(DIRECTORY);
        match fs::read(&path) {
            Ok(b) => Ok(Some(
                metropolis_api::common::ClusterDirectory::decode(b.as_slice())
                    .with_context(|| format!("{} is corrupt", path.display()))?,
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Remembers the owner key a node bootstrapped its cluster with, so
    /// that it recognizes its own bootstrap parameters when started again
    /// with them.
    pub fn save_bootstrap_owner(&self, key: &[u8; 32]) -> anyhow::Result<()> {
        write_private(&self.root, BOOTSTRAP_OWNER, key)
    }

    /// The owner key this node bootstrapped its cluster with; None on nodes
    /// that registered.
    pub fn bootstrap_owner(&self) -> anyhow::Result<Option<[u8; 32]>> {
        let path = self.root.join(BOOTSTRAP_OWNER);
        match fs::read(&path) {
            Ok(b) => Ok(Some(b.as_slice().try_into().map_err(|_| {
                anyhow::anyhow!("{} is corrupt: not a 32-byte key", path.display())
            })?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Reads the credentials, after checking every secret file's mode, and
    /// checks that they belong together: the CA is a CA signed by itself, it
    /// signed the node certificate, and the certificate is for the node key.
    /// A node with damaged credentials would otherwise serve, lead, and fail
    /// every handshake.
    pub fn unseal(&self) -> anyhow::Result<Credentials> {
        self.check_private()?;
        let path = self.credentials_path();
        let bytes = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let msg = SealedCredentials::decode(bytes.as_slice())
            .with_context(|| format!("{} is corrupt", path.display()))?;
        let seed: [u8; 32] = msg.node_key_seed.as_slice().try_into().map_err(|_| {
            anyhow::anyhow!("{} is corrupt: node key is not 32 bytes", path.display())
        })?;
        let key = SigningKey::from_bytes(&seed);
        let damaged = |what: String| {
            anyhow::anyhow!(
                "{} is damaged: {what}; restore the data directory from a backup, or remove it \
                 and register this node again",
                path.display()
            )
        };
        let ca = metropolis_identity::parse_certificate(&msg.ca_certificate)
            .map_err(|e| damaged(format!("the CA certificate does not parse ({e})")))?;
        if !ca.is_ca {
            return Err(damaged("the CA certificate is not a CA".into()));
        }
        metropolis_identity::verify_self_signed(&ca)
            .map_err(|e| damaged(format!("the CA certificate is not valid ({e})")))?;
        let cert = metropolis_identity::parse_certificate(&msg.node_certificate)
            .map_err(|e| damaged(format!("the node certificate does not parse ({e})")))?;
        // An expired certificate is still this node's (renewal replaces it
        // with the node key), so it is checked as of its own end at the
        // latest.
        let now = time::OffsetDateTime::now_utc();
        metropolis_identity::verify_signed_by(&cert, &msg.ca_certificate, now.min(cert.not_after))
            .map_err(|e| {
                damaged(format!(
                    "the node certificate is not valid for its CA ({e})"
                ))
            })?;
        if !cert.is_node_certificate() {
            return Err(damaged(
                "the node certificate is not a node certificate".into(),
            ));
        }
        if cert.public_key != key.verifying_key().to_bytes() {
            return Err(damaged(
                "the node certificate does not match the node key".into(),
            ));
        }
        Ok(Credentials {
            key,
            node_certificate: msg.node_certificate,
            ca_certificate: msg.ca_certificate,
        })
    }
}

/// Writes `root/name` atomically (temporary file, fsync, rename, fsync of
/// the directory), mode 0600.
fn write_private(root: &Path, name: &str, contents: &[u8]) -> anyhow::Result<()> {
    let tmp = root.join(format!("{name}.tmp"));
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(contents)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, root.join(name)).with_context(|| format!("renaming {}", tmp.display()))?;
    sync_dir(root)
}

/// Makes renames in `dir` durable.
fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_round_trip_is_private() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dd = DataDir::new(tmp.path().join("node"));
        dd.create().expect("create");
        let ca = metropolis_identity::CertificateAuthority::generate().expect("ca");
        let key = metropolis_identity::generate_key();
        let cert = ca
            .issue_node_certificate(
                key.verifying_key().as_bytes(),
                std::time::Duration::from_secs(86_400),
            )
            .expect("cert");
        assert!(!dd.is_member());
        dd.seal(&Credentials {
            key: key.clone(),
            node_certificate: cert.clone(),
            ca_certificate: ca.cert_der().to_vec(),
        })
        .expect("seal");
        assert!(dd.is_member());
        let mode = fs::metadata(dd.credentials_path())
            .expect("meta")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        let back = dd.unseal().expect("unseal");
        assert_eq!(back.key.to_bytes(), key.to_bytes());
        assert_eq!(back.node_certificate, cert);
    }

    /// A move to etcd that stopped before the switch leaves the embedded
    /// store live and its staged etcd member goes; one that stopped after it
    /// leaves etcd live and the embedded store aside, read-only.
    #[test]
    fn settle_finishes_a_move_either_way() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dd = DataDir::new(tmp.path().join("node"));
        dd.create().expect("create");
        dd.create_store().expect("store");
        let etcd = dd.etcd_dir();
        let stage = || {
            fs::create_dir_all(&etcd).expect("etcd");
            fs::write(etcd.join("config.pb"), b"").expect("config");
            fs::write(etcd.join("staged"), b"").expect("marker");
            assert!(!crate::consensus::is_configured(&etcd));
        };

        // Before the switch.
        stage();
        dd.settle().expect("settle");
        assert!(dd.has_store() && !etcd.exists());

        // The switch, then a crash before the store was set aside.
        stage();
        crate::consensus::unstage(&etcd).expect("switch");
        assert!(dd.has_store() && crate::consensus::is_configured(&etcd));
        dd.settle().expect("settle");
        assert!(!dd.has_store());
        assert!(crate::consensus::is_configured(&etcd));
        let kept = fs::metadata(dd.pre_etcd_store_path()).expect("kept");
        assert_eq!(kept.permissions().mode() & 0o777, 0o400);
        // Nothing more to do, and nothing to switch to any more.
        dd.settle().expect("settle again");
        assert!(dd.switch_to_etcd().is_err());
    }
}

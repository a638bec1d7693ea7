//! The node's data directory: its sealed credentials and, on consensus
//! members, the consensus store.
//!
//! Layout:
//! - `credentials.pb`: `private.SealedCredentials` (node key, node certificate,
//!   CA certificate), mode 0600. Its presence means "this node belongs to a
//!   cluster"; it is written last, atomically, so a crash during the first
//!   start never leaves a directory that looks joined but is not.
//! - `store/cluster.redb`: the embedded consensus store.
//! - `update/`: the binary slots of a node that was updated (`update::slots`).
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

    /// Creates the store's directory; only consensus members have one.
    pub fn create_store_dir(&self) -> anyhow::Result<()> {
        self.create_dir(&self.root.join(STORE_DIR))
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

    pub fn unseal(&self) -> anyhow::Result<Credentials> {
        let path = self.credentials_path();
        let meta = fs::metadata(&path).with_context(|| format!("reading {}", path.display()))?;
        if meta.permissions().mode() & 0o077 != 0 {
            bail!(
                "{} is readable by others (mode {:o}); run chmod 600 on it",
                path.display(),
                meta.permissions().mode() & 0o777
            );
        }
        let bytes = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let msg = SealedCredentials::decode(bytes.as_slice())
            .with_context(|| format!("{} is corrupt", path.display()))?;
        let seed: [u8; 32] = msg.node_key_seed.as_slice().try_into().map_err(|_| {
            anyhow::anyhow!("{} is corrupt: node key is not 32 bytes", path.display())
        })?;
        let key = SigningKey::from_bytes(&seed);
        let cert = metropolis_identity::parse_certificate(&msg.node_certificate)
            .with_context(|| format!("{}: node certificate", path.display()))?;
        if cert.public_key != key.verifying_key().to_bytes() {
            bail!(
                "{} is corrupt: the node certificate does not match the node key",
                path.display()
            );
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
    File::open(root)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", root.display()))?;
    Ok(())
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
            .issue_node_certificate(key.verifying_key().as_bytes())
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
}

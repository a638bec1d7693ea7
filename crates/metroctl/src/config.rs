//! metroctl's configuration directory.
//!
//! Files (API.md, "Identities and credentials"), all mode 0600:
//! - `owner-key.pem`: the owner key (`METROPOLIS INITIAL OWNER PRIVATE KEY`).
//! - `owner.pem`: the owner certificate issued by the cluster (`CERTIFICATE`).
//! - `ca.pem`: the pinned cluster CA (`CERTIFICATE`).
//! - `cluster.json`: project-owned: the cluster endpoints remembered by
//!   `takeownership`, so later commands need no `--endpoints`.
//! - `identity-key.pem`: project-owned: the key of a named identity, written
//!   by `user keygen`. Same layout as `owner-key.pem` (seed followed by public
//!   key) under its own PEM type, `METROPOLIS IDENTITY PRIVATE KEY`, so one is
//!   never taken for the other.
//! - `identity.pem`: project-owned: the certificate `login --identity NAME`
//!   obtained for that key (`CERTIFICATE`, CN = NAME). When present, commands
//!   authenticate with it instead of the owner credentials.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use metropolis_identity::SigningKey;
use serde::{Deserialize, Serialize};

pub const OWNER_KEY: &str = "owner-key.pem";
pub const OWNER_CERT: &str = "owner.pem";
pub const CA_CERT: &str = "ca.pem";
pub const CLUSTER: &str = "cluster.json";
pub const IDENTITY_KEY: &str = "identity-key.pem";
pub const IDENTITY_CERT: &str = "identity.pem";

/// PEM block type of `identity-key.pem`.
pub const IDENTITY_KEY_PEM_TYPE: &str = "METROPOLIS IDENTITY PRIVATE KEY";

/// Encodes an identity key. The identity crate owns the key layout (that of
/// the owner key); only the block type differs.
pub fn encode_identity_key_pem(key: &SigningKey) -> String {
    metropolis_identity::encode_owner_key_pem(key).replace(
        metropolis_identity::OWNER_KEY_PEM_TYPE,
        IDENTITY_KEY_PEM_TYPE,
    )
}

/// Decodes what [`encode_identity_key_pem`] wrote.
pub fn decode_identity_key_pem(input: &str) -> anyhow::Result<SigningKey> {
    let begin = format!("-----BEGIN {IDENTITY_KEY_PEM_TYPE}-----");
    if input.trim_start().lines().next() != Some(begin.as_str()) {
        bail!("not a {IDENTITY_KEY_PEM_TYPE} PEM block");
    }
    Ok(metropolis_identity::decode_owner_key_pem(&input.replace(
        IDENTITY_KEY_PEM_TYPE,
        metropolis_identity::OWNER_KEY_PEM_TYPE,
    ))?)
}

/// Port of AAA, Management and CuratorLocal on every node.
pub const CURATOR_PORT: u16 = 7835;

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct ClusterFile {
    pub endpoints: Vec<String>,
}

pub struct ConfigDir {
    root: PathBuf,
}

impl ConfigDir {
    /// `--config`, else `$XDG_CONFIG_HOME/metroctl`, else `~/.config/metroctl`.
    pub fn locate(flag: Option<PathBuf>) -> anyhow::Result<Self> {
        let root = match flag {
            Some(p) => p,
            None => match std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
                Some(x) => PathBuf::from(x).join("metroctl"),
                None => match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
                    Some(h) => PathBuf::from(h).join(".config").join("metroctl"),
                    None => bail!(
                        "cannot find a configuration directory: set HOME or XDG_CONFIG_HOME, or pass --config DIR"
                    ),
                },
            },
        };
        Ok(ConfigDir { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    fn ensure_dir(&self) -> anyhow::Result<()> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.root)
            .with_context(|| format!("creating configuration directory {}", self.root.display()))
    }

    /// Writes a file atomically with mode 0600.
    pub fn write(&self, name: &str, contents: &[u8]) -> anyhow::Result<()> {
        self.ensure_dir()?;
        let path = self.path(name);
        let tmp = self.path(&format!(".{name}.tmp"));
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.write_all(contents)
            .and_then(|_| f.sync_all())
            .with_context(|| format!("writing {}", tmp.display()))?;
        fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }

    fn read_opt(&self, name: &str) -> anyhow::Result<Option<String>> {
        match fs::read_to_string(self.path(name)) {
            Ok(s) => Ok(Some(s)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", self.path(name).display())),
        }
    }

    pub fn owner_key(&self) -> anyhow::Result<Option<SigningKey>> {
        match self.read_opt(OWNER_KEY)? {
            Some(pem) => Ok(Some(
                metropolis_identity::decode_owner_key_pem(&pem).with_context(|| {
                    format!(
                        "{} is not a valid owner key",
                        self.path(OWNER_KEY).display()
                    )
                })?,
            )),
            None => Ok(None),
        }
    }

    /// The owner key, created on first use.
    pub fn owner_key_or_create(&self) -> anyhow::Result<(SigningKey, bool)> {
        if let Some(k) = self.owner_key()? {
            return Ok((k, false));
        }
        let key = metropolis_identity::generate_key();
        self.write(
            OWNER_KEY,
            metropolis_identity::encode_owner_key_pem(&key).as_bytes(),
        )?;
        Ok((key, true))
    }

    pub fn require_owner_key(&self) -> anyhow::Result<SigningKey> {
        self.owner_key()?.with_context(|| {
            format!(
                "no owner key in {}; create one with `metroctl install params --bootstrap -o FILE` \
                 (or pass --config pointing at the directory that holds it)",
                self.root.display()
            )
        })
    }

    fn cert(&self, name: &str) -> anyhow::Result<Option<Vec<u8>>> {
        match self.read_opt(name)? {
            Some(pem) => Ok(Some(
                metropolis_identity::pem_to_cert_der(&pem).with_context(|| {
                    format!("{} is not a PEM certificate", self.path(name).display())
                })?,
            )),
            None => Ok(None),
        }
    }

    pub fn ca(&self) -> anyhow::Result<Option<Vec<u8>>> {
        self.cert(CA_CERT)
    }

    pub fn owner_cert(&self) -> anyhow::Result<Option<Vec<u8>>> {
        self.cert(OWNER_CERT)
    }

    pub fn identity_cert(&self) -> anyhow::Result<Option<Vec<u8>>> {
        self.cert(IDENTITY_CERT)
    }

    pub fn identity_key(&self) -> anyhow::Result<Option<SigningKey>> {
        match self.read_opt(IDENTITY_KEY)? {
            Some(pem) => Ok(Some(decode_identity_key_pem(&pem).with_context(|| {
                format!(
                    "{} is not a valid identity key; make a new one with `metroctl user keygen`",
                    self.path(IDENTITY_KEY).display()
                )
            })?)),
            None => Ok(None),
        }
    }

    pub fn require_identity_key(&self) -> anyhow::Result<SigningKey> {
        self.identity_key()?.with_context(|| {
            format!(
                "no identity key in {}; make one with `metroctl user keygen` and give the \
                 public key file to the cluster owner (or pass --config pointing at the \
                 directory that holds it)",
                self.root.display()
            )
        })
    }

    /// Removes a file if it exists.
    pub fn remove(&self, name: &str) -> anyhow::Result<()> {
        match fs::remove_file(self.path(name)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("removing {}", self.path(name).display())),
        }
    }

    pub fn cluster(&self) -> anyhow::Result<ClusterFile> {
        match self.read_opt(CLUSTER)? {
            Some(s) => serde_json::from_str(&s)
                .with_context(|| format!("{} is corrupt", self.path(CLUSTER).display())),
            None => Ok(ClusterFile::default()),
        }
    }

    pub fn save_cluster(&self, c: &ClusterFile) -> anyhow::Result<()> {
        self.write(CLUSTER, serde_json::to_string_pretty(c)?.as_bytes())
    }

    /// Forgets a cluster's CA, owner and identity certificates and endpoints
    /// (the keys stay).
    pub fn forget_cluster(&self) -> anyhow::Result<Option<PathBuf>> {
        // Credentials are never destroyed: they move to `previous-<unix time>/`
        // so a cluster pinned before can still be reached.
        let present: Vec<&str> = [CA_CERT, OWNER_CERT, IDENTITY_CERT, CLUSTER]
            .into_iter()
            .filter(|n| self.path(n).exists())
            .collect();
        if present.is_empty() {
            return Ok(None);
        }
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let backup = self.root.join(format!("previous-{stamp}"));
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&backup)
            .with_context(|| format!("creating {}", backup.display()))?;
        for name in present {
            fs::rename(self.path(name), backup.join(name)).with_context(|| {
                format!(
                    "moving {} to {}",
                    self.path(name).display(),
                    backup.display()
                )
            })?;
        }
        Ok(Some(backup))
    }
}

/// Parses `IP` or `IP:PORT`; the port defaults to the curator port.
pub fn parse_endpoint(s: &str) -> anyhow::Result<SocketAddr> {
    let s = s.trim();
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(addr);
    }
    match s.parse::<IpAddr>() {
        Ok(ip) => Ok(SocketAddr::new(ip, CURATOR_PORT)),
        Err(_) => {
            bail!(
                "{} is not an IP address (endpoints are IP or IP:PORT, comma-separated)",
                metropolis_api::quote(s)
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(
            parse_endpoint("127.0.0.2").expect("ip"),
            "127.0.0.2:7835".parse().expect("addr")
        );
        assert_eq!(
            parse_endpoint("127.0.0.2:9").expect("ip:port"),
            "127.0.0.2:9".parse().expect("addr")
        );
        assert_eq!(
            parse_endpoint("::1").expect("v6"),
            "[::1]:7835".parse().expect("addr")
        );
        assert!(parse_endpoint("node1").is_err());
    }

    #[test]
    fn files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().expect("tmp");
        let cfg = ConfigDir::locate(Some(tmp.path().join("m"))).expect("dir");
        let (k, created) = cfg.owner_key_or_create().expect("create");
        assert!(created);
        let (k2, created) = cfg.owner_key_or_create().expect("reuse");
        assert!(!created);
        assert_eq!(k.to_bytes(), k2.to_bytes());
        let mode = fs::metadata(cfg.path(OWNER_KEY))
            .expect("meta")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn forgetting_a_cluster_keeps_its_credentials() {
        let tmp = tempfile::tempdir().expect("tmp");
        let cfg = ConfigDir::locate(Some(tmp.path().join("m"))).expect("dir");
        assert!(cfg.forget_cluster().expect("nothing to forget").is_none());
        cfg.write(CA_CERT, b"ca").expect("ca");
        cfg.write(OWNER_CERT, b"owner").expect("owner");
        let moved = cfg.forget_cluster().expect("forget").expect("moved");
        assert!(!cfg.path(CA_CERT).exists() && !cfg.path(OWNER_CERT).exists());
        assert_eq!(fs::read(moved.join(CA_CERT)).expect("kept"), b"ca");
        assert_eq!(fs::read(moved.join(OWNER_CERT)).expect("kept"), b"owner");
    }
}

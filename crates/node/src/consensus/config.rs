//! The etcd member's directory: its configuration, TLS files and command line.

use std::ffi::OsStr;
use std::fs::{self, OpenOptions};
use std::io::{self, Write as _};
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use metropolis_curator::consensus::peer_url_on;
use metropolis_identity::{SigningKey, cert_to_pem, encode_pkcs8_key_pem};
use prost::Message;

pub(super) const CONFIG_FILE: &str = "config.pb";
pub(super) const CA_FILE: &str = "ca.pem";
pub(super) const PEER_CERT_FILE: &str = "peer.pem";
pub(crate) const PEER_KEY_FILE: &str = "peer-key.pem";
/// The consensus CA's key seed (32 bytes, mode 0600), for a stopgap peer
/// certificate ([`stopgap_peer_certificate`]).
pub(crate) const CA_KEY_FILE: &str = "ca-key";
/// The longest a stopgap peer certificate lives: long enough for the
/// members to find each other again, short enough that one nobody recorded
/// dies soon after the cluster could have renewed it properly.
const STOPGAP_LIFETIME: std::time::Duration = std::time::Duration::from_secs(300);
pub(super) const CRL_FILE: &str = "peer.crl";
/// Present while the member is staged (see [`PeerConfig::staged`]).
const STAGED_FILE: &str = "staged";
pub(super) const DATA_DIR: &str = "data";
pub(super) const PID_FILE: &str = "etcd.pid";
/// The URL etcd is told to listen on; see the module documentation.
const CLIENT_URL: &str = "unix://client.sock:0";
/// The socket file [`CLIENT_URL`] makes etcd create in its working directory.
const CLIENT_SOCKET: &str = "client.sock:0";
/// `sun_path` is 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;

/// What a node needs to run its etcd member.
#[derive(Debug, Clone)]
pub struct PeerConfig {
    /// etcd member name: the node ID.
    pub name: String,
    /// The address etcd listens on for peers and advertises to them.
    pub address: IpAddr,
    /// The peer port, normally `metropolis_curator::consensus::PEER_PORT`
    /// (7834), which the curator owns since it adds members.
    pub peer_port: u16,
    /// The consensus CA certificate (DER): the only issuer etcd's peer port
    /// trusts.
    pub ca_der: Vec<u8>,
    /// This node's peer certificate (DER), from the consensus CA for
    /// `address`.
    pub peer_cert_der: Vec<u8>,
    /// The consensus CA's CRL (DER); kept current afterwards by [`write_crl`].
    pub crl_der: Vec<u8>,
    /// Every member of the cluster as it will be once this one has joined,
    /// as (name, peer URL); must contain this node.
    pub initial_cluster: Vec<(String, String)>,
    /// `true` to found a new cluster (`--initial-cluster-state new`), `false`
    /// to join an existing one (`existing`; the member must have been added
    /// to the cluster first).
    pub new_cluster: bool,
    /// `--initial-cluster-token`: keeps members of different clusters
    /// founded with the same member list apart.
    pub cluster_token: String,
    /// A member that runs but does not hold the node's cluster state yet:
    /// the one a cluster on the embedded store moves to. [`is_configured`]
    /// is false for it until [`unstage`] (the switch).
    pub staged: bool,
}

/// `config.pb`.
#[derive(Clone, PartialEq, Message)]
struct StoredConfig {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(string, tag = "2")]
    address: String,
    #[prost(uint32, tag = "3")]
    peer_port: u32,
    #[prost(message, repeated, tag = "4")]
    initial_cluster: Vec<StoredMember>,
    #[prost(bool, tag = "5")]
    new_cluster: bool,
    #[prost(string, tag = "6")]
    cluster_token: String,
}

#[derive(Clone, PartialEq, Message)]
struct StoredMember {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(string, tag = "2")]
    peer_url: String,
}

/// Whether [`configure`] has completed in `dir` for a member that holds
/// the node's cluster state (a staged one does not, until [`unstage`]).
pub fn is_configured(dir: &Path) -> bool {
    dir.join(CONFIG_FILE).is_file() && !is_staged(dir)
}

/// Whether `dir` holds a staged member (see [`PeerConfig::staged`]).
pub fn is_staged(dir: &Path) -> bool {
    dir.join(STAGED_FILE).exists()
}

/// Makes a staged member the node's: one unlink, made durable. From then
/// on [`is_configured`] holds.
pub fn unstage(dir: &Path) -> anyhow::Result<()> {
    let marker = dir.join(STAGED_FILE);
    fs::remove_file(&marker).with_context(|| format!("removing {}", marker.display()))?;
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))
}

/// The peer certificate (DER) the member in `dir` was configured with.
pub fn peer_certificate(dir: &Path) -> Option<Vec<u8>> {
    let pem = fs::read_to_string(dir.join(PEER_CERT_FILE)).ok()?;
    metropolis_identity::pem_to_cert_der(&pem).ok()
}

/// Writes etcd's configuration, the CA and the peer certificate and key
/// (`key` is the node's key, which the peer certificate certifies) into
/// `dir`, creating it (mode 0700). Done once, when the node becomes a
/// consensus member; once etcd has run, its data directory holds the
/// membership and a new configuration changes only name, address and TLS
/// files.
pub fn configure(dir: &Path, cfg: &PeerConfig, key: &SigningKey) -> anyhow::Result<()> {
    let dir = std::path::absolute(dir)
        .with_context(|| format!("resolving etcd directory {}", dir.display()))?;
    // Before anything is written: a path etcd cannot be reached at is better
    // reported now than at every start.
    client_socket_path(&dir)?;
    check_config(cfg, key)?;

    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("creating etcd directory {}", dir.display()))?;
    // An existing directory keeps its mode otherwise; it is about to hold a
    // private key and the cluster's data.
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
        .with_context(|| format!("setting permissions of {}", dir.display()))?;

    write_atomic(&dir, CA_FILE, cert_to_pem(&cfg.ca_der).as_bytes(), 0o644)?;
    write_atomic(
        &dir,
        PEER_CERT_FILE,
        cert_to_pem(&cfg.peer_cert_der).as_bytes(),
        0o644,
    )?;
    write_atomic(
        &dir,
        PEER_KEY_FILE,
        encode_pkcs8_key_pem(key).as_bytes(),
        0o600,
    )?;
    write_atomic(&dir, CRL_FILE, &cfg.crl_der, 0o644)?;
    if cfg.staged {
        // Before the configuration: a crash in between leaves a directory
        // that is staged, never one that looks like the node's store.
        write_atomic(&dir, STAGED_FILE, b"", 0o600)?;
    }
    let stored = StoredConfig {
        name: cfg.name.clone(),
        address: cfg.address.to_string(),
        peer_port: u32::from(cfg.peer_port),
        initial_cluster: cfg
            .initial_cluster
            .iter()
            .map(|(name, peer_url)| StoredMember {
                name: name.clone(),
                peer_url: peer_url.clone(),
            })
            .collect(),
        new_cluster: cfg.new_cluster,
        cluster_token: cfg.cluster_token.clone(),
    };
    // Last: its presence means the rest is in place.
    write_atomic(&dir, CONFIG_FILE, &stored.encode_to_vec(), 0o600)?;
    tracing::info!(dir = %dir.display(), name = %cfg.name, "configured etcd member");
    Ok(())
}

/// Rejects configurations etcd would misread or that could never form a
/// cluster, with a message naming the problem; etcd's own complaints would
/// only show up in its log, at every restart.
fn check_config(cfg: &PeerConfig, key: &SigningKey) -> anyhow::Result<()> {
    check_member_name(&cfg.name)?;
    if cfg.peer_port == 0 {
        bail!("etcd peer port must not be 0");
    }
    if cfg.cluster_token.is_empty() || cfg.cluster_token.chars().any(char::is_whitespace) {
        bail!(
            "etcd cluster token {:?} must be non-empty and without whitespace",
            cfg.cluster_token
        );
    }
    for (name, url) in &cfg.initial_cluster {
        check_member_name(name)?;
        if url.is_empty() || url.contains([',', '=']) || url.chars().any(char::is_whitespace) {
            bail!("invalid peer URL {url:?} for etcd member {name:?}");
        }
    }
    let own_url = peer_url_on(cfg.address, cfg.peer_port);
    if !cfg
        .initial_cluster
        .iter()
        .any(|(name, url)| *name == cfg.name && *url == own_url)
    {
        bail!(
            "the initial etcd cluster must contain this member ({}={own_url}), got {}",
            cfg.name,
            initial_cluster_flag(&cfg.initial_cluster)
        );
    }
    // A mismatch here would otherwise surface only as TLS handshake failures
    // in etcd's log.
    let cert = metropolis_identity::parse_certificate(&cfg.peer_cert_der)
        .context("invalid etcd peer certificate")?;
    if cert.public_key != key.verifying_key().to_bytes() {
        bail!("the etcd peer certificate is not for this node's key");
    }
    metropolis_identity::verify_signed_by(&cert, &cfg.ca_der, time::OffsetDateTime::now_utc())
        .context("the etcd peer certificate was not issued by the consensus CA")?;
    // etcd refuses every peer connection when its CRL file does not parse.
    let revoked = metropolis_identity::parse_crl(&cfg.crl_der, &cfg.ca_der)
        .context("invalid consensus CRL")?;
    if revoked.contains(&cert.serial) {
        bail!("this node's etcd peer certificate is revoked");
    }
    Ok(())
}

/// Replaces the CRL etcd checks peers against (`crl_der`, DER, issued by the
/// consensus CA in `dir`); etcd reads it at every new peer connection, so
/// this takes effect at once. Unchanged contents are not rewritten.
pub fn write_crl(dir: &Path, crl_der: &[u8]) -> anyhow::Result<bool> {
    let ca = read_ca(dir)?;
    metropolis_identity::parse_crl(crl_der, &ca).context("the consensus CRL is invalid")?;
    if fs::read(dir.join(CRL_FILE)).is_ok_and(|old| old == crl_der) {
        return Ok(false);
    }
    write_atomic(dir, CRL_FILE, crl_der, 0o644)?;
    Ok(true)
}

/// Replaces the peer certificate of the member in `dir` with `cert_der`, a
/// renewal of it: same key (the one in `peer-key.pem`) and addresses,
/// issued by the consensus CA in `dir`, valid now. etcd reads its
/// certificate files at every new peer handshake (as server and as
/// client), so the running member presents it from then on; connections
/// already open keep the old one. Written atomically: etcd never reads half
/// a file. Returns the new certificate.
pub fn replace_peer_certificate(
    dir: &Path,
    cert_der: &[u8],
) -> anyhow::Result<metropolis_identity::Certificate> {
    let old = peer_certificate(dir)
        .with_context(|| {
            format!(
                "{} is missing or corrupt",
                dir.join(PEER_CERT_FILE).display()
            )
        })
        .and_then(|der| {
            metropolis_identity::parse_certificate(&der).context("the current peer certificate")
        })?;
    let new = metropolis_identity::parse_certificate(cert_der)
        .context("invalid etcd peer certificate")?;
    if new.public_key != old.public_key || !new.is_node_certificate() {
        bail!("the new etcd peer certificate is not for this node's key");
    }
    if new.ip_addresses != old.ip_addresses {
        bail!(
            "the new etcd peer certificate is for {:?}, the member serves at {:?}",
            new.ip_addresses,
            old.ip_addresses
        );
    }
    let ca = read_ca(dir)?;
    metropolis_identity::verify_signed_by(&new, &ca, time::OffsetDateTime::now_utc())
        .context("the new etcd peer certificate was not issued by the consensus CA")?;
    write_atomic(dir, PEER_CERT_FILE, cert_to_pem(cert_der).as_bytes(), 0o644)?;
    Ok(new)
}

/// Keeps the consensus CA's key (`seed`, as the cluster state holds it) in
/// `dir`, after checking that it is the key of the CA in `ca.pem`. The
/// member holds it in its etcd data anyway; as a file it is at hand when
/// etcd cannot serve. Unchanged contents are not rewritten.
pub fn write_ca_key(dir: &Path, seed: &[u8]) -> anyhow::Result<bool> {
    let seed: [u8; 32] = seed
        .try_into()
        .map_err(|_| anyhow::anyhow!("the consensus CA's key seed is not 32 bytes"))?;
    metropolis_identity::CertificateAuthority::from_parts(read_ca(dir)?, seed)
        .context("the consensus CA key does not belong to this member's consensus CA")?;
    if fs::read(dir.join(CA_KEY_FILE)).is_ok_and(|old| old == seed) {
        return Ok(false);
    }
    write_atomic(dir, CA_KEY_FILE, &seed, 0o600)?;
    Ok(true)
}

/// A peer certificate this member issues itself when the one it holds has
/// expired and the cluster cannot renew it: after every member was down
/// past its certificate's end, none can reach another (etcd refuses expired
/// peer certificates), so there is no quorum, no curator, and no renewal.
/// Same key and address as the expired one, from the consensus CA
/// ([`write_ca_key`]), living as long as the expired one did but at most
/// [`STOPGAP_LIFETIME`]; the regular renewal replaces it (and records it)
/// once the cluster serves again. `None` while the current certificate is
/// valid, or without the CA's key.
pub fn stopgap_peer_certificate(dir: &Path) -> anyhow::Result<Option<Vec<u8>>> {
    let Some(current) = peer_certificate(dir) else {
        return Ok(None);
    };
    let current =
        metropolis_identity::parse_certificate(&current).context("the current peer certificate")?;
    if current.not_after >= time::OffsetDateTime::now_utc() {
        return Ok(None);
    }
    let seed = match fs::read(dir.join(CA_KEY_FILE)) {
        Ok(s) => s,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {CA_KEY_FILE}")),
    };
    let seed: [u8; 32] = seed
        .as_slice()
        .try_into()
        .map_err(|_| anyhow::anyhow!("{CA_KEY_FILE} is corrupt"))?;
    let ca = metropolis_identity::CertificateAuthority::from_parts(read_ca(dir)?, seed)
        .with_context(|| format!("{CA_KEY_FILE} does not fit {CA_FILE}"))?;
    let address = *current
        .ip_addresses
        .first()
        .context("the current peer certificate names no address")?;
    let der = ca.issue_peer_certificate(
        &current.public_key,
        address,
        current.lifetime().min(STOPGAP_LIFETIME),
    )?;
    Ok(Some(der))
}

fn read_ca(dir: &Path) -> anyhow::Result<Vec<u8>> {
    let ca_pem = fs::read_to_string(dir.join(CA_FILE))
        .with_context(|| format!("reading {}", dir.join(CA_FILE).display()))?;
    metropolis_identity::pem_to_cert_der(&ca_pem)
        .with_context(|| format!("{} is corrupt", dir.join(CA_FILE).display()))
}

/// Member names go into `--initial-cluster name=url,...` unquoted.
fn check_member_name(name: &str) -> anyhow::Result<()> {
    if name.is_empty()
        || name.contains([',', '='])
        || name.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        bail!("invalid etcd member name {name:?}: must be non-empty, without ',', '=' or spaces");
    }
    Ok(())
}

fn initial_cluster_flag(members: &[(String, String)]) -> String {
    members
        .iter()
        .map(|(name, url)| format!("{name}={url}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The client socket of the etcd running in `dir` (absolute), or why no
/// client could connect to it.
pub(super) fn client_socket_path(dir: &Path) -> anyhow::Result<PathBuf> {
    let socket = dir.join(CLIENT_SOCKET);
    let len = socket.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        bail!(
            "etcd client socket path {} is {len} bytes, longer than the {MAX_SOCKET_PATH} bytes \
             a unix socket path may have; use a shorter data directory",
            socket.display()
        );
    }
    Ok(socket)
}

/// Writes `dir/name` atomically (temporary file, fsync, rename, fsync of the
/// directory) with `mode`.
pub(super) fn write_atomic(
    dir: &Path,
    name: &str,
    contents: &[u8],
    mode: u32,
) -> anyhow::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    // A leftover from a crash would keep its old mode through the open below.
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", tmp.display())),
    }
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(contents)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    let path = dir.join(name);
    fs::rename(&tmp, &path).with_context(|| format!("renaming {}", tmp.display()))?;
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))?;
    Ok(())
}

fn load_config(dir: &Path) -> anyhow::Result<StoredConfig> {
    let path = dir.join(CONFIG_FILE);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            bail!(
                "{} does not exist: this node has no etcd configuration",
                path.display()
            )
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    StoredConfig::decode(bytes.as_slice()).with_context(|| format!("{} is corrupt", path.display()))
}

/// etcd's command line, from the configuration in `dir`.
pub(super) fn command_line(dir: &Path) -> anyhow::Result<Vec<String>> {
    etcd_args(&load_config(dir)?)
}

/// etcd's command line for `cfg`. Relative paths are relative to the etcd
/// directory, etcd's working directory.
fn etcd_args(cfg: &StoredConfig) -> anyhow::Result<Vec<String>> {
    let corrupt = || format!("{CONFIG_FILE} is corrupt");
    let address: IpAddr = cfg.address.parse().with_context(corrupt)?;
    let port = u16::try_from(cfg.peer_port).with_context(corrupt)?;
    let url = peer_url_on(address, port);
    let members: Vec<(String, String)> = cfg
        .initial_cluster
        .iter()
        .map(|m| (m.name.clone(), m.peer_url.clone()))
        .collect();
    let state = if cfg.new_cluster { "new" } else { "existing" };
    Ok(vec![
        format!("--name={}", cfg.name),
        format!("--data-dir={DATA_DIR}"),
        format!("--listen-client-urls={CLIENT_URL}"),
        format!("--advertise-client-urls={CLIENT_URL}"),
        format!("--listen-peer-urls={url}"),
        format!("--initial-advertise-peer-urls={url}"),
        format!("--initial-cluster={}", initial_cluster_flag(&members)),
        format!("--initial-cluster-state={state}"),
        format!("--initial-cluster-token={}", cfg.cluster_token),
        "--peer-client-cert-auth=true".into(),
        format!("--peer-trusted-ca-file={CA_FILE}"),
        format!("--peer-cert-file={PEER_CERT_FILE}"),
        format!("--peer-key-file={PEER_KEY_FILE}"),
        format!("--peer-crl-file={CRL_FILE}"),
        "--experimental-peer-skip-client-san-verification=true".into(),
        "--logger=zap".into(),
        "--log-outputs=stderr".into(),
        // The curator's watches replay history from a revision; keep as much
        // as the embedded store does.
        "--auto-compaction-mode=revision".into(),
        "--auto-compaction-retention=10000".into(),
        "--enable-pprof=false".into(),
        // A member that was cut off (or restarted) asks before it starts an
        // election, rather than deposing a healthy leader with a higher term:
        // every raft election also renews all leases, so the curator
        // leader's would then outlive its node.
        "--pre-vote=true".into(),
    ])
}

/// The etcd binary: `explicit` if given, else `etcd` on `PATH`.
pub fn find_binary(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    find_binary_in(explicit, std::env::var_os("PATH").as_deref())
}

fn find_binary_in(explicit: Option<&Path>, path_var: Option<&OsStr>) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit {
        if !is_executable(p) {
            bail!(
                "etcd binary {} does not exist or is not an executable file",
                p.display()
            );
        }
        // etcd runs in its own directory, where a relative path would mean
        // something else.
        return std::path::absolute(p).with_context(|| format!("resolving {}", p.display()));
    }
    path_var
        .into_iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("etcd"))
        .find(|p| p.is_absolute() && is_executable(p))
        .context(
            "no etcd binary on PATH; consensus members run etcd: install it \
             (`apt-get install etcd-server` on Debian) or pass --etcd-binary PATH",
        )
}

fn is_executable(p: &Path) -> bool {
    fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consensus::supervisor::Etcd;
    use crate::consensus::testing::*;
    use crate::logtree::LogTree;
    use metropolis_identity::{CertificateAuthority, generate_key};

    #[tokio::test]
    async fn socket_path_too_long() {
        let ca = CertificateAuthority::generate().unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let mut m = Member::new();
        m.dir = tmp.path().join("d".repeat(100)).join("etcd");
        let cfg = m.config(&ca, vec![(m.name.clone(), m.url())]);
        let err = configure(&m.dir, &cfg, &m.key).unwrap_err();
        let msg = format!("{err:#}");
        let socket = m.dir.join("client.sock:0");
        assert!(msg.contains(&socket.display().to_string()), "{msg}");
        assert!(msg.contains("107 bytes"), "{msg}");
        assert!(msg.contains("use a shorter data directory"), "{msg}");
        // Nothing was written.
        assert!(!m.dir.exists());

        let err = Etcd::start(&m.dir, &etcd_binary(), LogTree::new())
            .await
            .unwrap_err();
        assert!(
            format!("{err:#}").contains("use a shorter data directory"),
            "{err:#}"
        );
    }

    #[test]
    fn a_renewed_peer_certificate_replaces_the_file_only_if_it_fits() {
        let ca = CertificateAuthority::generate().unwrap();
        let m = Member::new();
        m.configure_alone(&ca);
        let first = peer_certificate(&m.dir).unwrap();
        let public = m.key.verifying_key().to_bytes();
        let hour = std::time::Duration::from_secs(3600);
        let refused = |der: &[u8]| {
            let err = replace_peer_certificate(&m.dir, der).unwrap_err();
            assert_eq!(peer_certificate(&m.dir).unwrap(), first, "{err:#}");
            format!("{err:#}")
        };
        let other_key = generate_key().verifying_key().to_bytes();
        let wrong_key = ca
            .issue_peer_certificate(&other_key, m.address, hour)
            .unwrap();
        assert!(refused(&wrong_key).contains("not for this node's key"));
        let elsewhere = "127.9.9.9".parse().unwrap();
        let moved = ca.issue_peer_certificate(&public, elsewhere, hour).unwrap();
        assert!(refused(&moved).contains("the member serves at"));
        let foreign = CertificateAuthority::generate()
            .unwrap()
            .issue_peer_certificate(&public, m.address, hour)
            .unwrap();
        assert!(refused(&foreign).contains("not issued by the consensus CA"));

        let renewed = ca.issue_peer_certificate(&public, m.address, hour).unwrap();
        let cert = replace_peer_certificate(&m.dir, &renewed).unwrap();
        assert_eq!(peer_certificate(&m.dir).unwrap(), renewed);
        assert_eq!(cert.lifetime(), hour);
        assert!(!m.dir.join(format!("{PEER_CERT_FILE}.tmp")).exists());
    }

    #[test]
    fn a_stopgap_certificate_only_replaces_an_expired_one() {
        use std::os::unix::fs::PermissionsExt as _;
        let ca = CertificateAuthority::generate().unwrap();
        let m = Member::new();
        m.configure_alone(&ca);
        // Valid: nothing to do, with or without the CA key.
        assert!(stopgap_peer_certificate(&m.dir).unwrap().is_none());
        let other = CertificateAuthority::generate().unwrap();
        assert!(
            write_ca_key(&m.dir, &other.key_seed()).is_err(),
            "another CA's key"
        );
        assert!(write_ca_key(&m.dir, &ca.key_seed()).unwrap());
        assert!(!write_ca_key(&m.dir, &ca.key_seed()).unwrap(), "unchanged");
        let mode = fs::metadata(m.dir.join(CA_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(stopgap_peer_certificate(&m.dir).unwrap().is_none());

        // Expired: a new one for the same key and address, short-lived.
        let public = m.key.verifying_key().to_bytes();
        let now = time::OffsetDateTime::now_utc();
        let expired = ca
            .issue_peer_certificate_with_validity(
                &public,
                m.address,
                now - time::Duration::days(2),
                now - time::Duration::days(1),
            )
            .unwrap();
        write_atomic(
            &m.dir,
            PEER_CERT_FILE,
            cert_to_pem(&expired).as_bytes(),
            0o644,
        )
        .unwrap();
        let der = stopgap_peer_certificate(&m.dir)
            .unwrap()
            .expect("a stopgap");
        let cert = metropolis_identity::parse_certificate(&der).unwrap();
        assert_eq!(cert.lifetime(), STOPGAP_LIFETIME);
        assert_eq!(cert.ip_addresses, vec![m.address]);
        replace_peer_certificate(&m.dir, &der).expect("it fits the member");
        // Without the key, no stopgap.
        write_atomic(
            &m.dir,
            PEER_CERT_FILE,
            cert_to_pem(&expired).as_bytes(),
            0o644,
        )
        .unwrap();
        fs::remove_file(m.dir.join(CA_KEY_FILE)).unwrap();
        assert!(stopgap_peer_certificate(&m.dir).unwrap().is_none());
    }

    #[test]
    fn configurations_etcd_would_trip_over_are_refused() {
        let ca = CertificateAuthority::generate().unwrap();
        let m = Member::new();
        let check = |cfg: &PeerConfig, key: &SigningKey| {
            let err = configure(&m.dir, cfg, key).unwrap_err();
            assert!(!m.dir.exists(), "nothing written for {cfg:?}");
            format!("{err:#}")
        };
        let good = m.config(&ca, vec![(m.name.clone(), m.url())]);

        let mut cfg = good.clone();
        cfg.initial_cluster = vec![("other".into(), m.url())];
        assert!(check(&cfg, &m.key).contains("must contain this member"));
        let mut cfg = good.clone();
        cfg.initial_cluster = vec![(m.name.clone(), peer_url_on(m.address, m.port ^ 1))];
        assert!(check(&cfg, &m.key).contains("must contain this member"));
        let mut cfg = good.clone();
        cfg.initial_cluster
            .push(("a=b".into(), "https://127.0.0.1:1".into()));
        assert!(check(&cfg, &m.key).contains("invalid etcd member name"));
        let mut cfg = good.clone();
        cfg.cluster_token = String::new();
        assert!(check(&cfg, &m.key).contains("cluster token"));
        assert!(check(&good, &generate_key()).contains("not for this node's key"));
        let mut cfg = good.clone();
        cfg.ca_der = CertificateAuthority::generate()
            .unwrap()
            .cert_der()
            .to_vec();
        assert!(check(&cfg, &m.key).contains("not issued by the consensus CA"));
        // etcd would refuse every peer on a CRL it cannot read, and a
        // member whose own certificate is revoked could never join.
        let mut cfg = good.clone();
        cfg.crl_der = b"not a CRL".to_vec();
        assert!(check(&cfg, &m.key).contains("invalid consensus CRL"));
        let mut cfg = good.clone();
        let serial = metropolis_identity::parse_certificate(&cfg.peer_cert_der)
            .unwrap()
            .serial;
        cfg.crl_der = ca
            .issue_crl(
                &[metropolis_identity::Revoked {
                    serial,
                    revoked_at: time::OffsetDateTime::now_utc(),
                }],
                2,
            )
            .unwrap();
        assert!(check(&cfg, &m.key).contains("revoked"));

        // Staged, a member is not the node's until unstaged.
        let mut staged = good.clone();
        staged.staged = true;
        configure(&m.dir, &staged, &m.key).unwrap();
        assert!(is_staged(&m.dir) && !is_configured(&m.dir));
        unstage(&m.dir).unwrap();
        assert!(!is_staged(&m.dir) && is_configured(&m.dir));
        configure(&m.dir, &good, &m.key).unwrap();
        assert!(is_configured(&m.dir));
    }

    #[test]
    fn binary_lookup() {
        let real = etcd_binary();
        assert!(real.is_absolute());
        assert_eq!(find_binary(Some(&real)).unwrap(), real);

        let err = find_binary(Some(Path::new("/nonexistent/etcd"))).unwrap_err();
        assert!(format!("{err:#}").contains("/nonexistent/etcd"), "{err:#}");
        // A directory is not a binary.
        let err = find_binary(Some(Path::new("/tmp"))).unwrap_err();
        assert!(format!("{err:#}").contains("not an executable"), "{err:#}");

        for path in [None, Some(OsStr::new("/nonexistent:relative/dir"))] {
            let msg = format!("{:#}", find_binary_in(None, path).unwrap_err());
            assert!(msg.contains("apt-get install etcd-server"), "{msg}");
            assert!(msg.contains("--etcd-binary PATH"), "{msg}");
        }
        let dir = real.parent().unwrap().as_os_str();
        assert_eq!(find_binary_in(None, Some(dir)).unwrap(), real);
    }
}

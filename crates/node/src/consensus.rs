//! The etcd server that consensus members run as a child process.
//!
//! # Directory
//! The caller owns `<data-dir>/etcd` and passes it as `dir` (mode 0700):
//! - `config.pb`: what starting etcd again needs (name, peer address and
//!   port, initial cluster, initial cluster state, cluster token). Written
//!   last and atomically by [`configure`]; its presence is what
//!   [`is_configured`] reports.
//! - `ca.pem`, `peer.pem`, `peer-key.pem`: the cluster CA and this node's
//!   peer certificate and key (PKCS#8, mode 0600), for etcd's peer mTLS.
//! - `data/`: etcd's `--data-dir`.
//! - `etcd.pid`: the PID of the current etcd process, rewritten on every
//!   (re)start and removed by [`Etcd::stop`].
//! - `client.sock:0`: the client socket (see below).
//!
//! # API
//! - [`configure`]`(dir, &`[`PeerConfig`]`, &key)` once, when the node becomes
//!   a consensus member; [`is_configured`]`(dir)` afterwards.
//! - [`Etcd::start`]`(dir, binary, logs)` on every start of the node; it
//!   returns once etcd accepts connections on [`Etcd::client_socket`], and
//!   keeps etcd running (restarts with backoff) until [`Etcd::stop`].
//! - [`find_binary`] locates etcd (`--etcd-binary` or `PATH`);
//!   `metropolis_curator::consensus::peer_url_on` builds the URLs of
//!   [`PeerConfig::initial_cluster`].
//!
//! etcd's output (zap JSON on stderr) goes into the log tree under
//! [`LOG_DN`]; the supervisor's own messages (starts, exits, restarts) are
//! tracing events under `root.consensus`.
//!
//! # etcd behaviour this works around
//! - etcd listens on a unix socket only as `unix://client.sock:0` (it wants
//!   a port in the URL), and creates the socket literally named
//!   `client.sock:0` relative to its working directory. So etcd runs in
//!   `dir`, and the socket is `dir/client.sock:0`, whose absolute path must
//!   fit the 107 bytes a unix socket path may have.
//! - Outgoing peer connections come from an address the kernel picks, not
//!   from the peer URL's address, so etcd's check of the client
//!   certificate's SAN against the source IP is turned off
//!   (`--experimental-peer-skip-client-san-verification`); the peer is still
//!   authenticated by its certificate's chain to the cluster CA.
//! - The `--initial-cluster*` flags are passed on every start; etcd ignores
//!   them once `data/member` exists.
//! - etcd reads any `ETCD_*` environment variable as a flag; the child gets
//!   none of them, so the node's environment cannot change its
//!   configuration.
//! - etcd 3.4 cannot restart a member that was killed after creating its WAL
//!   but before writing the first raft records into it (etcd-io/etcd#12578):
//!   it comes back with no voters, never elects a leader and never serves a
//!   client, without a word in its log. The window is easy to hit, since
//!   etcd listens on the client socket before it creates the WAL. Before
//!   every start the supervisor reads the WAL's record headers, and if it
//!   holds nothing but its header records, removes `data/` so that etcd
//!   bootstraps again (see [`reset_unbootstrapped`]).

use std::collections::VecDeque;
use std::ffi::OsStr;
use std::fs::{self, OpenOptions};
use std::io::{self, Write as _};
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use backon::{BackoffBuilder, ExponentialBuilder};
use metropolis_curator::consensus::peer_url_on;
use metropolis_identity::{SigningKey, cert_to_pem, encode_pkcs8_key_pem};
use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::UnixStream;
use tokio::process::{Child, Command};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::logtree::{LogTree, RawWriter};

/// The log tree DN of etcd's own output.
pub const LOG_DN: &str = "root.consensus.etcd";

const CONFIG_FILE: &str = "config.pb";
const CA_FILE: &str = "ca.pem";
const PEER_CERT_FILE: &str = "peer.pem";
pub(crate) const PEER_KEY_FILE: &str = "peer-key.pem";
const DATA_DIR: &str = "data";
const PID_FILE: &str = "etcd.pid";
/// The URL etcd is told to listen on; see the module documentation.
const CLIENT_URL: &str = "unix://client.sock:0";
/// The socket file [`CLIENT_URL`] makes etcd create in its working directory.
const CLIENT_SOCKET: &str = "client.sock:0";
/// `sun_path` is 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;

/// How long [`Etcd::start`] waits for the client socket.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long [`Etcd::stop`] lets etcd shut down after SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Restart delays: 250 ms, doubling up to 10 s ...
const RESTART_MIN_DELAY: Duration = Duration::from_millis(250);
const RESTART_MAX_DELAY: Duration = Duration::from_secs(10);
/// ... back to the shortest after a run at least this long, so that an etcd
/// that crashes once a day is not restarted 10 s late forever after.
const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(30);
/// After etcd exits, how long to wait for the rest of its output. Only a
/// grandchild holding the pipes open could make this matter.
const OUTPUT_DRAIN: Duration = Duration::from_secs(2);
/// Output kept for error messages: the last bytes of the current run...
const TAIL_BYTES: usize = 16 * 1024;
/// ... of which this many lines are shown.
const TAIL_LINES: usize = 20;

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
    /// The cluster CA certificate (DER).
    pub ca_der: Vec<u8>,
    /// This node's peer certificate (DER), from
    /// `CertificateAuthority::issue_peer_certificate` for `address`.
    pub peer_cert_der: Vec<u8>,
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

/// Whether [`configure`] has completed in `dir`.
pub fn is_configured(dir: &Path) -> bool {
    dir.join(CONFIG_FILE).is_file()
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
        .context("the etcd peer certificate was not issued by the cluster CA")?;
    Ok(())
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
fn client_socket_path(dir: &Path) -> anyhow::Result<PathBuf> {
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
fn write_atomic(dir: &Path, name: &str, contents: &[u8], mode: u32) -> anyhow::Result<()> {
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
        "--experimental-peer-skip-client-san-verification=true".into(),
        "--logger=zap".into(),
        "--log-outputs=stderr".into(),
        // The curator's watches replay history from a revision; keep as much
        // as the embedded store does.
        "--auto-compaction-mode=revision".into(),
        "--auto-compaction-retention=10000".into(),
        "--enable-pprof=false".into(),
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

/// A running, supervised etcd.
#[derive(Debug)]
pub struct Etcd {
    socket: PathBuf,
    shared: Arc<Shared>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

/// What the supervisor task shares with the [`Etcd`] handle.
#[derive(Debug)]
struct Shared {
    /// PID of the running etcd, 0 if none.
    pid: AtomicU32,
    /// The end of the current run's output.
    tail: Mutex<VecDeque<u8>>,
}

impl Shared {
    fn clear_tail(&self) {
        self.tail
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    fn push_tail(&self, data: &[u8]) {
        let mut tail = self.tail.lock().unwrap_or_else(PoisonError::into_inner);
        tail.extend(data);
        let excess = tail.len().saturating_sub(TAIL_BYTES);
        tail.drain(..excess);
    }

    /// The last [`TAIL_LINES`] lines of output, for error messages.
    fn tail_text(&self) -> String {
        let tail = self.tail.lock().unwrap_or_else(PoisonError::into_inner);
        let (a, b) = tail.as_slices();
        let text = String::from_utf8_lossy(&[a, b].concat()).into_owned();
        let lines: Vec<&str> = text.lines().collect();
        let shown = &lines[lines.len().saturating_sub(TAIL_LINES)..];
        if shown.is_empty() {
            "(no output)".into()
        } else {
            shown.join("\n")
        }
    }
}

/// What the supervisor reports to [`Etcd::start`] while it waits.
#[derive(Debug, Default, Clone)]
struct Progress {
    /// Why the first run ended, with the end of its output.
    first_exit: Option<(String, String)>,
}

/// Everything one run of etcd needs.
struct Supervisor {
    dir: PathBuf,
    socket: PathBuf,
    binary: PathBuf,
    args: Vec<String>,
    logs: Arc<LogTree>,
    shared: Arc<Shared>,
    spawner: Spawner,
    progress: watch::Sender<Progress>,
}

enum RunEnd {
    /// [`Etcd::stop`] (or dropping the handle) ended it.
    Stopped,
    /// etcd exited, or could not be started; why.
    Exited(String),
}

impl Etcd {
    /// Starts etcd from the configuration [`configure`] wrote into `dir`,
    /// and keeps it running: its output goes into `logs` under [`LOG_DN`],
    /// and whenever it exits it is started again after a delay (250 ms,
    /// doubling up to 10 s, back to 250 ms after a run of 30 s), each exit
    /// logged with its status.
    ///
    /// Returns once the client socket accepts connections (etcd listens
    /// before it has joined its cluster, so this does not wait for a
    /// quorum). Fails, with the end of etcd's output, if the first etcd exits
    /// or the socket does not accept within 30 s; nothing keeps running then.
    pub async fn start(dir: &Path, binary: &Path, logs: Arc<LogTree>) -> anyhow::Result<Etcd> {
        let dir = std::path::absolute(dir)
            .with_context(|| format!("resolving etcd directory {}", dir.display()))?;
        let socket = client_socket_path(&dir)?;
        let args = etcd_args(&load_config(&dir)?)?;
        let binary = std::path::absolute(binary)
            .with_context(|| format!("resolving {}", binary.display()))?;
        // Fail on a bad DN now, not in every run.
        drop(logs.raw_writer(LOG_DN)?);

        let shared = Arc::new(Shared {
            pid: AtomicU32::new(0),
            tail: Mutex::new(VecDeque::new()),
        });
        let (progress_tx, mut progress) = watch::channel(Progress::default());
        let (stop_tx, stop_rx) = oneshot::channel();
        let supervisor = Supervisor {
            dir,
            socket: socket.clone(),
            binary,
            args,
            logs,
            shared: shared.clone(),
            spawner: Spawner::new()?,
            progress: progress_tx,
        };
        let etcd = Etcd {
            socket,
            shared,
            stop: stop_tx,
            task: tokio::spawn(supervisor.run(stop_rx)),
        };

        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        loop {
            if UnixStream::connect(&etcd.socket).await.is_ok() {
                tracing::info!(socket = %etcd.socket.display(), "etcd accepts client connections");
                return Ok(etcd);
            }
            // Not in the `if let`: the borrow would live across the await below.
            let first_exit = progress.borrow_and_update().first_exit.clone();
            if let Some((why, output)) = first_exit {
                etcd.stop().await;
                bail!("etcd exited during startup ({why}); its last output:\n{output}");
            }
            if tokio::time::Instant::now() >= deadline {
                let output = etcd.shared.tail_text();
                let socket = etcd.socket.display().to_string();
                etcd.stop().await;
                bail!(
                    "etcd did not accept connections on {socket} within {}s; its last output:\n\
                     {output}",
                    READY_TIMEOUT.as_secs()
                );
            }
            // Poll the socket; wake early if the run ends.
            if let Ok(Err(_)) =
                tokio::time::timeout(Duration::from_millis(50), progress.changed()).await
            {
                // Only a panic ends the supervisor before stop().
                let output = etcd.shared.tail_text();
                etcd.stop().await;
                bail!("the etcd supervisor ended unexpectedly; etcd's last output:\n{output}");
            }
        }
    }

    /// The client socket (`<dir>/client.sock:0`, absolute); etcd clients
    /// connect to `unix://<this path>`.
    pub fn client_socket(&self) -> PathBuf {
        self.socket.clone()
    }

    /// The PID of the etcd process running now, if one is.
    #[cfg_attr(
        not(test),
        allow(dead_code, reason = "the daemon has no use for it yet; tests do")
    )]
    pub fn pid(&self) -> Option<u32> {
        match self.shared.pid.load(Ordering::SeqCst) {
            0 => None,
            pid => Some(pid),
        }
    }

    /// Stops etcd (SIGTERM, then SIGKILL after 5 s) and supervising it.
    /// Returns once the process is gone. Dropping the handle stops etcd the
    /// same way, in the background.
    pub async fn stop(self) {
        let Etcd { stop, task, .. } = self;
        // The supervisor may be gone already (it panicked); then so is etcd.
        let _ = stop.send(());
        if let Err(e) = task.await {
            tracing::error!(error = %e, "etcd supervisor failed");
        }
    }
}

impl Supervisor {
    async fn run(self, mut stop: oneshot::Receiver<()>) {
        let mut delays = restart_backoff();
        loop {
            let started = Instant::now();
            let why = match self.run_once(&mut stop).await {
                RunEnd::Stopped => break,
                RunEnd::Exited(why) => why,
            };
            let ran_for = started.elapsed();
            if ran_for >= BACKOFF_RESET_AFTER {
                delays = restart_backoff();
            }
            let delay = delays.next().unwrap_or(RESTART_MAX_DELAY);
            let output = self.shared.tail_text();
            tracing::warn!(
                status = %why,
                ran_for = ?ran_for,
                restart_in = ?delay,
                last_output = output.lines().last().unwrap_or_default(),
                "etcd exited; restarting it"
            );
            self.progress.send_modify(|p| {
                p.first_exit.get_or_insert((why, output));
            });
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                _ = &mut stop => break,
            }
        }
        remove_if_exists(&self.dir.join(PID_FILE));
    }

    /// Runs etcd once, until it exits or `stop` fires. Never polls `stop`
    /// after it has fired (a oneshot receiver must not be).
    async fn run_once(&self, stop: &mut oneshot::Receiver<()>) -> RunEnd {
        self.shared.clear_tail();
        reset_unbootstrapped(&self.dir.join(DATA_DIR));
        // etcd replaces it itself, but a stale socket left by a killed etcd
        // would look like a live one to anyone who only checks that it exists.
        remove_if_exists(&self.socket);
        let mut child = match self.spawner.spawn(self.command()).await {
            Ok(child) => child,
            Err(e) => return RunEnd::Exited(format!("cannot run {}: {e}", self.binary.display())),
        };
        let pid = child.id().unwrap_or(0);
        self.shared.pid.store(pid, Ordering::SeqCst);
        if let Err(e) = write_atomic(&self.dir, PID_FILE, format!("{pid}\n").as_bytes(), 0o644) {
            tracing::warn!(error = %format!("{e:#}"), "cannot record etcd's PID");
        }
        tracing::info!(pid, "etcd started");

        let mut pumps = Vec::new();
        for out in [
            child
                .stdout
                .take()
                .map(|o| Box::new(o) as Box<dyn AsyncRead + Send + Unpin>),
            child
                .stderr
                .take()
                .map(|e| Box::new(e) as Box<dyn AsyncRead + Send + Unpin>),
        ]
        .into_iter()
        .flatten()
        {
            match self.logs.raw_writer(LOG_DN) {
                Ok(writer) => pumps.push(tokio::spawn(pump(out, writer, self.shared.clone()))),
                Err(e) => tracing::error!(error = %e, "cannot log etcd's output"),
            }
        }

        let status = tokio::select! {
            status = child.wait() => status,
            _ = stop => {
                terminate(&mut child, pid).await;
                self.shared.pid.store(0, Ordering::SeqCst);
                drain(pumps).await;
                return RunEnd::Stopped;
            }
        };
        self.shared.pid.store(0, Ordering::SeqCst);
        // The reason etcd gives for exiting is its last line.
        drain(pumps).await;
        RunEnd::Exited(match status {
            Ok(status) => status.to_string(),
            Err(e) => format!("cannot wait for it: {e}"),
        })
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.args(&self.args)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group: a Ctrl-C at the node's terminal must not
            // take etcd down under a curator that is still shutting down;
            // the node stops etcd itself, last.
            .process_group(0)
            .kill_on_drop(true);
        for (name, _) in std::env::vars_os() {
            if name.as_encoded_bytes().starts_with(b"ETCD_") {
                cmd.env_remove(name);
            }
        }
        let parent = std::process::id();
        // SAFETY: the closure runs between fork and exec and only makes
        // async-signal-safe calls (prctl, getppid), allocating nothing.
        unsafe {
            cmd.pre_exec(move || {
                // If the node dies without stopping etcd (SIGKILL, OOM
                // killer, abort), an orphaned etcd would keep the peer port
                // and the data directory's lock, and the restarted node's
                // own etcd could not start; it would also keep voting in the
                // cluster for a node that is down. The kernel kills it with
                // the node instead. (The signal fires when the forking
                // *thread* exits, hence the dedicated spawner thread.)
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // The node may have died between fork and prctl.
                if u32::try_from(libc::getppid()).ok() != Some(parent) {
                    return Err(io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
        cmd
    }
}

fn restart_backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(RESTART_MIN_DELAY)
        .with_max_delay(RESTART_MAX_DELAY)
        .with_factor(2.0)
        .without_max_times()
        .build()
}

/// SIGTERM, up to [`STOP_GRACE`] to exit, then SIGKILL.
async fn terminate(child: &mut Child, pid: u32) {
    // The child is not reaped until `wait` below returns, so `pid` cannot
    // belong to another process yet.
    if let Ok(pid) = libc::pid_t::try_from(pid)
        && pid > 0
    {
        // SAFETY: kill has no memory effects.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
    match tokio::time::timeout(STOP_GRACE, child.wait()).await {
        Ok(Ok(status)) => tracing::info!(%status, "etcd stopped"),
        Ok(Err(e)) => tracing::warn!(error = %e, "cannot wait for etcd to stop"),
        Err(_) => {
            tracing::warn!(
                grace = ?STOP_GRACE,
                "etcd did not stop after SIGTERM; killing it"
            );
            if let Err(e) = child.kill().await {
                tracing::error!(error = %e, "cannot kill etcd");
            }
        }
    }
}

/// Copies one of etcd's output pipes into the log tree and the tail.
async fn pump(mut out: impl AsyncRead + Unpin, mut writer: RawWriter, shared: Arc<Shared>) {
    let mut chunk = vec![0u8; 8192];
    loop {
        match out.read(&mut chunk).await {
            Ok(0) => return,
            Ok(n) => {
                shared.push_tail(&chunk[..n]);
                // Cannot fail: the writer only appends to memory.
                let _ = writer.write_all(&chunk[..n]);
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read etcd's output");
                return;
            }
        }
    }
}

/// Waits for the pumps to reach the end of etcd's output, for a while.
async fn drain(pumps: Vec<JoinHandle<()>>) {
    for pump in pumps {
        match tokio::time::timeout(OUTPUT_DRAIN, pump).await {
            Ok(_) => {}
            Err(_) => tracing::warn!("etcd's output pipe is still open after it exited"),
        }
    }
}

/// Removes etcd's data directory `data` if its WAL exists but holds no raft
/// records: the state etcd 3.4 cannot start from (see the module
/// documentation).
///
/// Such a member has persisted no entry, term or vote, so it has promised
/// nothing to any peer and starting it afresh is the same as the start that
/// was interrupted. Anything short of a clean parse showing exactly that
/// (an unreadable or damaged WAL, an unknown layout) leaves the directory
/// alone.
fn reset_unbootstrapped(data: &Path) {
    let wal_dir = data.join("member").join("wal");
    match wal_has_raft_records(&wal_dir) {
        Ok(Some(false)) => {}
        Ok(None | Some(true)) => return,
        Err(e) => {
            tracing::warn!(
                dir = %wal_dir.display(),
                error = %e,
                "cannot read etcd's WAL; starting etcd on it as it is"
            );
            return;
        }
    }
    tracing::warn!(
        dir = %data.display(),
        "etcd was stopped before its first raft records reached its WAL, a state \
         etcd cannot start from (etcd-io/etcd#12578); removing its data so it \
         bootstraps again"
    );
    if let Err(e) = fs::remove_dir_all(data) {
        tracing::error!(dir = %data.display(), error = %e, "cannot remove etcd's data");
    }
}

/// Whether the WAL files (`*.wal`) in `wal_dir` hold raft records (entries
/// or hard state): `None` if there is no WAL, `Some(false)` if every file
/// parsed cleanly and holds header records only. Errors for anything else.
fn wal_has_raft_records(wal_dir: &Path) -> io::Result<Option<bool>> {
    let entries = match fs::read_dir(wal_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut found_wal = false;
    for entry in entries {
        let path = entry?.path();
        if path.extension() != Some(OsStr::new("wal")) {
            continue;
        }
        found_wal = true;
        if first_raft_record(&path)?.is_some() {
            return Ok(Some(true));
        }
    }
    Ok(found_wal.then_some(false))
}

/// etcd's `walpb.Record`.
#[derive(Clone, PartialEq, Message)]
struct WalRecord {
    #[prost(int64, tag = "1")]
    kind: i64,
    #[prost(uint32, tag = "2")]
    crc: u32,
    #[prost(bytes = "vec", tag = "3")]
    data: Vec<u8>,
}

/// WAL record types (etcd's `wal/wal.go`).
const WAL_METADATA: i64 = 1;
const WAL_ENTRY: i64 = 2;
const WAL_STATE: i64 = 3;
const WAL_CRC: i64 = 4;
const WAL_SNAPSHOT: i64 = 5;

/// The offset of the first raft record (entry or hard state) in the WAL file
/// `path`, or `None` if it ends after header records only (metadata, CRC,
/// snapshot). Fails on anything it cannot parse.
///
/// The format (etcd's `wal/encoder.go`): frames of a little-endian 64-bit
/// length word, whose low 56 bits are the record's length and whose top bit
/// says that the low 3 bits of the top byte are padding after it, then the
/// protobuf `walpb.Record`. The files are preallocated with zeros; a zero
/// length word is the end.
fn first_raft_record(path: &Path) -> io::Result<Option<u64>> {
    use std::io::Read as _;

    let invalid = |why: String| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {why}", path.display()),
        )
    };
    let file = fs::File::open(path)?;
    let size = file.metadata()?.len();
    let mut reader = io::BufReader::new(file);
    let mut offset = 0u64;
    loop {
        let mut word = [0u8; 8];
        match reader.read_exact(&mut word) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof && offset == size => {
                return Ok(None);
            }
            Err(e) => return Err(e),
        }
        let word = u64::from_le_bytes(word);
        if word == 0 {
            return Ok(None);
        }
        let len = word & 0x00ff_ffff_ffff_ffff;
        let padding = if word >> 63 == 1 {
            (word >> 56) & 0x7
        } else {
            0
        };
        let frame = len + padding;
        if frame > size.saturating_sub(offset + 8) {
            return Err(invalid(format!(
                "record at {offset} is {len} bytes, past the end of the file"
            )));
        }
        let mut buf = vec![0u8; usize::try_from(frame).map_err(|e| invalid(e.to_string()))?];
        reader.read_exact(&mut buf)?;
        buf.truncate(buf.len() - usize::try_from(padding).unwrap_or(0));
        let record = WalRecord::decode(buf.as_slice())
            .map_err(|e| invalid(format!("record at {offset}: {e}")))?;
        match record.kind {
            WAL_ENTRY | WAL_STATE => return Ok(Some(offset)),
            WAL_METADATA | WAL_CRC | WAL_SNAPSHOT => {}
            other => return Err(invalid(format!("record at {offset} has type {other}"))),
        }
        offset += 8 + frame;
    }
}

fn remove_if_exists(path: &Path) {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(path = %path.display(), error = %e, "cannot remove"),
    }
}

type SpawnRequest = (Command, oneshot::Sender<io::Result<Child>>);

/// Forks etcd from one thread that lives as long as its supervisor.
///
/// `PR_SET_PDEATHSIG` fires when the thread that forked the child exits, not
/// the process. Tokio's threads come and go (blocking-pool threads retire
/// when idle, a worker that ran `block_in_place` may end up as one), and etcd
/// would be killed for no visible reason whenever the thread that happened
/// to start it retired.
struct Spawner {
    requests: std::sync::mpsc::Sender<SpawnRequest>,
}

impl Spawner {
    fn new() -> anyhow::Result<Spawner> {
        let (requests, rx) = std::sync::mpsc::channel::<SpawnRequest>();
        // Children register with the runtime's process driver (SIGCHLD).
        let runtime = tokio::runtime::Handle::current();
        std::thread::Builder::new()
            .name("etcd-spawner".into())
            .spawn(move || {
                let _runtime = runtime.enter();
                // Ends when the supervisor drops its sender, after its
                // last child has been reaped.
                while let Ok((mut cmd, reply)) = rx.recv() {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .context("starting the etcd spawner thread")?;
        Ok(Spawner { requests })
    }

    async fn spawn(&self, cmd: Command) -> io::Result<Child> {
        let (reply, child) = oneshot::channel();
        let gone = || io::Error::other("the etcd spawner thread is gone");
        self.requests.send((cmd, reply)).map_err(|_| gone())?;
        child.await.map_err(|_| gone())?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metropolis_api::api::LogsRequest;
    use metropolis_api::api::logs_request::{BacklogMode, StreamMode};
    use metropolis_api::osbase::logtree::proto::log_entry;
    use metropolis_identity::{CertificateAuthority, generate_key, node_id};
    use metropolis_store::{EtcdStore, Op, Store, Txn};
    use rand::Rng;
    use tokio::io::AsyncWriteExt;

    /// The tests run a real etcd; without one they fail rather than pass
    /// vacuously.
    fn etcd_binary() -> PathBuf {
        find_binary(None).unwrap_or_else(|e| {
            panic!(
                "these tests run a real etcd server: {e:#} \
                 (on Debian: `apt-get install etcd-server`)"
            )
        })
    }

    /// A loopback address no other test process is likely to use.
    fn random_address() -> IpAddr {
        let mut rng = rand::thread_rng();
        let second = u8::try_from(std::process::id() % 250 + 1).unwrap();
        IpAddr::from([127, second, rng.gen_range(1..=254), rng.gen_range(1..=254)])
    }

    fn free_port(address: IpAddr) -> u16 {
        std::net::TcpListener::bind((address, 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    struct Member {
        // Keeps the directory alive.
        _tmp: tempfile::TempDir,
        dir: PathBuf,
        key: SigningKey,
        name: String,
        address: IpAddr,
        port: u16,
    }

    impl Member {
        fn new() -> Member {
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path().join("etcd");
            let key = generate_key();
            let address = random_address();
            Member {
                dir,
                name: node_id(key.verifying_key().as_bytes()),
                key,
                address,
                port: free_port(address),
                _tmp: tmp,
            }
        }

        fn url(&self) -> String {
            peer_url_on(self.address, self.port)
        }

        fn config(
            &self,
            ca: &CertificateAuthority,
            initial_cluster: Vec<(String, String)>,
        ) -> PeerConfig {
            PeerConfig {
                name: self.name.clone(),
                address: self.address,
                peer_port: self.port,
                ca_der: ca.cert_der().to_vec(),
                peer_cert_der: ca
                    .issue_peer_certificate(self.key.verifying_key().as_bytes(), self.address)
                    .unwrap(),
                initial_cluster,
                new_cluster: true,
                cluster_token: "test-cluster".into(),
            }
        }

        fn configure_alone(&self, ca: &CertificateAuthority) {
            let cfg = self.config(ca, vec![(self.name.clone(), self.url())]);
            configure(&self.dir, &cfg, &self.key).unwrap();
        }
    }

    /// etcd's output lines in `logs`.
    fn etcd_lines(logs: &LogTree) -> Vec<String> {
        let req = LogsRequest {
            dn: LOG_DN.into(),
            filters: Vec::new(),
            backlog_mode: BacklogMode::All as i32,
            backlog_count: 0,
            stream_mode: StreamMode::Disable as i32,
        };
        logs.read(&req)
            .unwrap()
            .backlog
            .into_iter()
            .filter_map(|e| match e.kind {
                Some(log_entry::Kind::Raw(r)) => Some(r.data),
                _ => None,
            })
            .collect()
    }

    fn pid_file(dir: &Path) -> Option<u32> {
        let text = fs::read_to_string(dir.join(PID_FILE)).ok()?;
        text.trim().parse().ok()
    }

    /// Whether `pid` is a live process (not gone, not a zombie waiting for
    /// whoever reaps orphans here).
    fn is_alive(pid: u32) -> bool {
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            return false;
        };
        // "pid (comm) state ...", where comm may contain anything.
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim().chars().next());
        !matches!(state, None | Some('Z' | 'X'))
    }

    /// One HTTP/1.1 request to etcd's gRPC gateway, which shares the client
    /// socket with gRPC; returns the whole response.
    async fn http(socket: &Path, method: &str, path: &str, body: &str) -> io::Result<String> {
        // etcd accepts connections long before it answers them.
        tokio::time::timeout(
            Duration::from_secs(5),
            http_inner(socket, method, path, body),
        )
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no answer from etcd"))?
    }

    async fn http_inner(socket: &Path, method: &str, path: &str, body: &str) -> io::Result<String> {
        let mut s = UnixStream::connect(socket).await?;
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: etcd\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).await?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    /// Polls `f` every 100 ms until it holds, for up to `secs` seconds.
    async fn eventually<F, Fut>(secs: u64, what: &str, mut f: F)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while !f().await {
            assert!(Instant::now() < deadline, "{what} within {secs}s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn healthy(socket: &Path) -> bool {
        http(socket, "GET", "/health", "")
            .await
            .is_ok_and(|r| r.contains(r#""health":"true""#))
    }

    #[tokio::test]
    async fn single_member_starts_logs_and_stops() {
        let binary = etcd_binary();
        let ca = CertificateAuthority::generate().unwrap();
        let m = Member::new();
        assert!(!is_configured(&m.dir));
        m.configure_alone(&ca);
        assert!(is_configured(&m.dir));
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&m.dir), 0o700);
        assert_eq!(mode(&m.dir.join(PEER_KEY_FILE)), 0o600);

        let logs = LogTree::new();
        let etcd = Etcd::start(&m.dir, &binary, logs.clone()).await.unwrap();
        let socket = etcd.client_socket();
        assert_eq!(socket, m.dir.join("client.sock:0"));
        UnixStream::connect(&socket).await.unwrap();
        let pid = etcd.pid().expect("etcd runs");
        assert_eq!(pid_file(&m.dir), Some(pid));
        eventually(30, "a healthy single-member cluster", || healthy(&socket)).await;
        let lines = etcd_lines(&logs);
        assert!(
            lines.iter().any(|l| l.contains("elected leader")),
            "etcd's log under {LOG_DN}:\n{}",
            lines.join("\n")
        );
        // zap JSON, one entry per line.
        assert!(lines.iter().all(|l| l.starts_with('{')), "{lines:#?}");

        etcd.stop().await;
        assert!(!is_alive(pid), "etcd {pid} still runs after stop()");
        assert!(!m.dir.join(PID_FILE).exists());
        assert!(UnixStream::connect(&socket).await.is_err());
        // The log tree got the shutdown too.
        let lines = etcd_lines(&logs);
        assert!(
            lines
                .iter()
                .any(|l| l.contains("SIGTERM") || l.contains("stopping")),
            "{lines:#?}"
        );

        // And it starts again from the same directory, keeping its data.
        let etcd = Etcd::start(&m.dir, &binary, LogTree::new()).await.unwrap();
        eventually(30, "healthy after a restart", || healthy(&socket)).await;
        etcd.stop().await;
    }

    /// The one WAL file of a fresh member.
    fn wal_file(dir: &Path) -> PathBuf {
        let wal_dir = dir.join(DATA_DIR).join("member").join("wal");
        let mut wals: Vec<PathBuf> = fs::read_dir(&wal_dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension() == Some(OsStr::new("wal")))
            .collect();
        assert_eq!(wals.len(), 1, "{wals:?}");
        wals.remove(0)
    }

    #[tokio::test]
    async fn member_killed_before_its_first_raft_records_is_reset() {
        let binary = etcd_binary();
        let ca = CertificateAuthority::generate().unwrap();
        let m = Member::new();
        m.configure_alone(&ca);
        let etcd = Etcd::start(&m.dir, &binary, LogTree::new()).await.unwrap();
        let socket = etcd.client_socket();
        eventually(30, "healthy", || healthy(&socket)).await;
        etcd.stop().await;

        // A real WAL, as etcd wrote it: header records, then raft records.
        let wal = wal_file(&m.dir);
        let wal_dir = wal.parent().unwrap().to_path_buf();
        let first = first_raft_record(&wal).unwrap().expect("raft records");
        assert!(first > 0);
        assert_eq!(wal_has_raft_records(&wal_dir).unwrap(), Some(true));
        // Nothing happens to a member that got that far.
        reset_unbootstrapped(&m.dir.join(DATA_DIR));
        assert!(wal.exists());

        // What etcd leaves behind when killed between creating the WAL and
        // its first raft records (the rest of the file is preallocated
        // zeros). Started on this, etcd 3.4 logs "voters=()" and hangs.
        let mut bytes = fs::read(&wal).unwrap();
        let cut = usize::try_from(first).unwrap();
        bytes[cut..].fill(0);
        fs::write(&wal, &bytes).unwrap();
        fs::remove_file(m.dir.join(DATA_DIR).join("member/snap/db")).unwrap();
        assert_eq!(first_raft_record(&wal).unwrap(), None);
        assert_eq!(wal_has_raft_records(&wal_dir).unwrap(), Some(false));

        let etcd = Etcd::start(&m.dir, &binary, LogTree::new()).await.unwrap();
        eventually(30, "healthy after the reset", || healthy(&socket)).await;
        etcd.stop().await;
        assert!(first_raft_record(&wal_file(&m.dir)).unwrap().is_some());

        // A damaged WAL is not taken for an empty one.
        let wal = wal_file(&m.dir);
        let mut bytes = fs::read(&wal).unwrap();
        bytes[8..16].fill(0xee);
        fs::write(&wal, &bytes).unwrap();
        assert!(wal_has_raft_records(&wal_dir).is_err());
        reset_unbootstrapped(&m.dir.join(DATA_DIR));
        assert!(wal.exists());
    }

    #[tokio::test]
    async fn killed_etcd_is_restarted() {
        let binary = etcd_binary();
        let ca = CertificateAuthority::generate().unwrap();
        let m = Member::new();
        m.configure_alone(&ca);
        let etcd = Etcd::start(&m.dir, &binary, LogTree::new()).await.unwrap();
        let socket = etcd.client_socket();
        for _ in 0..2 {
            let old = etcd.pid().unwrap();
            assert_eq!(pid_file(&m.dir), Some(old));
            // As a test or an operator would: by the PID in etcd.pid.
            // SAFETY: kill has no memory effects.
            let rc = unsafe { libc::kill(libc::pid_t::try_from(old).unwrap(), libc::SIGKILL) };
            assert_eq!(rc, 0);
            eventually(15, "a new etcd process", || {
                let pid = etcd.pid();
                async move { pid.is_some_and(|p| p != old) }
            })
            .await;
            let new = etcd.pid().unwrap();
            assert_eq!(pid_file(&m.dir), Some(new));
            assert!(!is_alive(old));
            eventually(30, "the restarted etcd healthy", || healthy(&socket)).await;
        }
        let last = etcd.pid().unwrap();
        etcd.stop().await;
        assert!(!is_alive(last));
    }

    /// Set for the child test process of [`etcd_dies_with_the_node`].
    const NODE_DIR_ENV: &str = "METROPOLIS_TEST_CONSENSUS_NODE_DIR";

    /// A stand-in for the node process: starts etcd from the directory in
    /// [`NODE_DIR_ENV`], prints its PID and waits to be killed. Does nothing
    /// when run on its own.
    #[tokio::test]
    #[ignore = "the child process of etcd_dies_with_the_node"]
    async fn node_process() {
        let Some(dir) = std::env::var_os(NODE_DIR_ENV) else {
            return;
        };
        let etcd = Etcd::start(Path::new(&dir), &etcd_binary(), LogTree::new())
            .await
            .unwrap();
        println!("ETCD_PID={}", etcd.pid().unwrap());
        std::future::pending::<()>().await;
    }

    #[tokio::test]
    async fn etcd_dies_with_the_node() {
        use std::io::BufRead as _;

        etcd_binary();
        let ca = CertificateAuthority::generate().unwrap();
        let m = Member::new();
        m.configure_alone(&ca);
        let mut node = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "consensus::tests::node_process",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(NODE_DIR_ENV, &m.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = node.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                // libtest's "test ... " has no newline of its own.
                if let Some((_, pid)) = line.split_once("ETCD_PID=") {
                    let _ = tx.send(pid.trim().parse::<u32>().unwrap());
                }
            }
        });
        let etcd_pid = rx.recv_timeout(Duration::from_secs(30));
        // The node dies as abruptly as it can: no chance to stop etcd.
        node.kill().unwrap();
        node.wait().unwrap();
        let etcd_pid = etcd_pid.expect("the node process reports etcd's PID within 30s");
        eventually(
            10,
            "etcd gone after the node was SIGKILLed",
            || async move { !is_alive(etcd_pid) },
        )
        .await;
    }

    #[tokio::test]
    async fn two_members_form_a_cluster_over_mutual_tls() {
        let binary = etcd_binary();
        let ca = CertificateAuthority::generate().unwrap();
        let (a, b) = (Member::new(), Member::new());
        let cluster = vec![(a.name.clone(), a.url()), (b.name.clone(), b.url())];
        configure(&a.dir, &a.config(&ca, cluster.clone()), &a.key).unwrap();
        configure(&b.dir, &b.config(&ca, cluster), &b.key).unwrap();
        let (logs_a, logs_b) = (LogTree::new(), LogTree::new());
        let (ea, eb) = tokio::join!(
            Etcd::start(&a.dir, &binary, logs_a.clone()),
            Etcd::start(&b.dir, &binary, logs_b.clone()),
        );
        let (ea, eb) = (ea.unwrap(), eb.unwrap());
        let (sa, sb) = (ea.client_socket(), eb.client_socket());

        // /health is true only with a leader, i.e. after the peers have
        // talked to each other over TLS.
        eventually(30, "member A healthy", || healthy(&sa)).await;
        eventually(30, "member B healthy", || healthy(&sb)).await;
        for (name, logs) in [("A", &logs_a), ("B", &logs_b)] {
            let lines = etcd_lines(logs);
            assert!(
                lines.iter().any(|l| l.contains("elected leader")),
                "member {name}'s log:\n{}",
                lines.join("\n")
            );
        }

        // A write through one member is read (linearizably) through the
        // other, by the store client the curator uses.
        let (store_a, store_b) = (
            EtcdStore::connect_unix(&sa).await.unwrap(),
            EtcdStore::connect_unix(&sb).await.unwrap(),
        );
        let put = Txn::new().and_then(Op::put(b"metropolis".to_vec(), b"replicated".to_vec()));
        assert!(store_a.txn(put).await.unwrap().succeeded);
        let got = store_b.get(b"metropolis").await.unwrap().expect("the key");
        assert_eq!(got.value, b"replicated");
        drop((store_a, store_b));

        let (pa, pb) = (ea.pid().unwrap(), eb.pid().unwrap());
        tokio::join!(ea.stop(), eb.stop());
        assert!(!is_alive(pa) && !is_alive(pb));
    }

    #[tokio::test]
    async fn etcd_exiting_during_startup_is_reported_with_its_output() {
        let binary = etcd_binary();
        let ca = CertificateAuthority::generate().unwrap();
        let mut m = Member::new();
        // TEST-NET-1: not an address of this machine, so etcd cannot listen.
        m.address = "192.0.2.1".parse().unwrap();
        m.configure_alone(&ca);
        let err = Etcd::start(&m.dir, &binary, LogTree::new())
            .await
            .unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("etcd exited during startup"), "{msg}");
        assert!(msg.contains("192.0.2.1"), "{msg}");
        assert!(msg.contains("cannot assign requested address"), "{msg}");
        assert!(!m.dir.join(PID_FILE).exists());
    }

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
        assert!(check(&cfg, &m.key).contains("not issued by the cluster CA"));

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

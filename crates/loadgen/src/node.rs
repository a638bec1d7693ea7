//! The one real `metropolis-node` under test: its process, and what /proc
//! says about it.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use metropolis_api::api::{
    NodeParameters,
    node_parameters::{Cluster, ClusterBootstrap},
};
use metropolis_identity::SigningKey;
use prost::Message;
use tokio::process::{Child, Command};

/// Port of AAA, Management and Curator on every node.
pub const CURATOR_PORT: u16 = 7835;
/// Port of NodeManagement (logs) on every node.
pub const NODE_MGMT_PORT: u16 = 7839;
/// Port etcd's peers talk to each other on, on the node's address; a
/// high-availability node binds it at bootstrap.
pub const ETCD_PEER_PORT: u16 = 7834;
/// The node's Prometheus metrics over plain HTTP, which the loadgen asks
/// its node for (`--metrics-plain-http`, loopback only): port 7840 itself
/// is TLS for cluster certificates, and the loadgen reads one gauge.
pub const PLAIN_METRICS_PORT: u16 = 7841;
/// The node keeps its etcd here, under its data directory.
const ETCD_DIR: &str = "etcd";
/// etcd can listen on a unix socket only as `unix://client.sock:0`, which
/// makes it create a file with literally this name.
const ETCD_SOCKET: &str = "client.sock:0";
/// The node writes the PID of its current etcd child here.
const ETCD_PID_FILE: &str = "etcd.pid";

pub struct NodeProcess {
    child: Child,
    pub pid: u32,
    pub binary: PathBuf,
    pub addr: SocketAddr,
    pub log: PathBuf,
    /// The node's `--data-dir`.
    pub data_dir: PathBuf,
    pub started: Instant,
}

/// How the node ended when asked to stop.
pub enum Stopped {
    /// It had exited before it was asked.
    AlreadyExited(ExitStatus),
    /// It exited after SIGTERM.
    Terminated(ExitStatus),
    /// It ignored SIGTERM for the whole grace period and was killed.
    Killed,
}

pub struct Spawn<'a> {
    pub binary: &'a Path,
    pub dir: &'a Path,
    pub address: IpAddr,
    pub owner: &'a SigningKey,
    pub heartbeat_timeout: Duration,
    pub leader_lease_ttl: Duration,
    pub log_level: &'a str,
    /// Bootstrap on an etcd the node runs (found on its PATH) instead of
    /// the embedded store.
    pub high_availability: bool,
}

/// The binary this loadgen was built with: cargo puts both in the same
/// target directory.
pub fn default_binary() -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe().context("finding this executable's path")?;
    Ok(me.with_file_name("metropolis-node"))
}

/// Fails if something already listens on `port` of `address`, or the
/// address is not usable: a node started there would fail late and
/// obscurely.
pub fn check_port_free(address: IpAddr, port: u16) -> anyhow::Result<()> {
    let addr = SocketAddr::new(address, port);
    match std::net::TcpListener::bind(addr) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => bail!(
            "{addr} is already in use (is another metropolis-node running there?); \
             stop it or pick another loopback address with --address"
        ),
        Err(e) => bail!("cannot use {addr}: {e}"),
    }
}

impl NodeProcess {
    /// Writes bootstrap parameters for a new cluster owned by `owner` and
    /// starts the node on a fresh data directory under `dir`.
    pub fn spawn(s: Spawn<'_>) -> anyhow::Result<NodeProcess> {
        if !s.binary.is_file() {
            bail!(
                "node binary {} does not exist; build it with `cargo build --release -p metropolis-node` \
                 or point --node-binary at it",
                s.binary.display()
            );
        }
        let params_path = s.dir.join("bootstrap.pb");
        let params = NodeParameters {
            cluster: Some(Cluster::ClusterBootstrap(ClusterBootstrap {
                owner_public_key: s.owner.verifying_key().to_bytes().to_vec(),
                high_availability: s.high_availability,
                ..Default::default()
            })),
            network_config: None,
        };
        std::fs::write(&params_path, params.encode_to_vec())
            .with_context(|| format!("writing node parameters {}", params_path.display()))?;
        let log = s.dir.join("node.log");
        let out = std::fs::File::create(&log)
            .with_context(|| format!("creating node log {}", log.display()))?;
        let err = out
            .try_clone()
            .with_context(|| format!("opening node log {}", log.display()))?;
        let data_dir = s.dir.join("data");
        let child = Command::new(s.binary)
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--params")
            .arg(&params_path)
            .arg("--address")
            .arg(s.address.to_string())
            .arg("--heartbeat-timeout")
            .arg(humantime::format_duration(s.heartbeat_timeout).to_string())
            .arg("--leader-lease-ttl")
            .arg(humantime::format_duration(s.leader_lease_ttl).to_string())
            .arg("--metrics-plain-http")
            .arg(SocketAddr::new(s.address, PLAIN_METRICS_PORT).to_string())
            .env("RUST_LOG", s.log_level)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            // Its own process group, so a Ctrl-C meant for the loadgen does
            // not stop the node under it mid-measurement; the loadgen stops
            // it itself, and kill_on_drop covers the paths where it cannot.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", s.binary.display()))?;
        let pid = child
            .id()
            .context("the node process exited before its PID could be read")?;
        Ok(NodeProcess {
            child,
            pid,
            binary: s.binary.to_path_buf(),
            addr: SocketAddr::new(s.address, CURATOR_PORT),
            log,
            data_dir,
            started: Instant::now(),
        })
    }

    /// Where a high-availability node's etcd listens for clients.
    pub fn etcd_socket(&self) -> PathBuf {
        self.data_dir.join(ETCD_DIR).join(ETCD_SOCKET)
    }

    /// The PID of the node's current etcd child. Read afresh each time: the
    /// node restarts etcd if it dies, under a new PID.
    pub fn etcd_pid(&self) -> anyhow::Result<u32> {
        let path = self.data_dir.join(ETCD_DIR).join(ETCD_PID_FILE);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        text.trim()
            .parse()
            .with_context(|| format!("{} does not hold a PID", path.display()))
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// The exit status if the node is no longer running.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Fails if the node died, with the end of its log.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        match self.exited() {
            None => Ok(()),
            Some(status) => bail!(
                "the node process exited unexpectedly ({status}); last lines of its log:\n{}",
                self.log_tail(20)
            ),
        }
    }

    /// SIGTERM, then SIGKILL if it has not exited after `grace`.
    pub async fn stop(&mut self, grace: Duration) -> anyhow::Result<Stopped> {
        if let Some(status) = self.exited() {
            return Ok(Stopped::AlreadyExited(status));
        }
        // SAFETY: kill(2) with a PID of our own unreaped child; no memory is
        // involved.
        let rc = unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGTERM) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            tracing::warn!(pid = self.pid, error = %e, "cannot send SIGTERM to the node");
        }
        match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(status) => Ok(Stopped::Terminated(
                status.context("waiting for the node to exit")?,
            )),
            Err(_) => {
                self.child
                    .kill()
                    .await
                    .context("killing the node after it ignored SIGTERM")?;
                Ok(Stopped::Killed)
            }
        }
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    pub fn rss(&self) -> anyhow::Result<u64> {
        proc_status_kib(self.pid, "VmRSS").map(|k| k * 1024)
    }

    pub fn peak_rss(&self) -> anyhow::Result<u64> {
        proc_status_kib(self.pid, "VmHWM").map(|k| k * 1024)
    }

    pub fn cpu_time(&self) -> anyhow::Result<Duration> {
        cpu_time(&format!("/proc/{}/stat", self.pid))
    }

    pub fn open_fds(&self) -> anyhow::Result<usize> {
        let dir = format!("/proc/{}/fd", self.pid);
        Ok(std::fs::read_dir(&dir)
            .with_context(|| format!("listing {dir}"))?
            .count())
    }

    pub fn threads(&self) -> anyhow::Result<u64> {
        proc_status_kib(self.pid, "Threads")
    }

    /// The node's own RLIMIT_NOFILE (soft, hard), as it set it for itself.
    pub fn nofile_limit(&self) -> anyhow::Result<(String, String)> {
        let path = format!("/proc/{}/limits", self.pid);
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        let line = text
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .with_context(|| format!("{path} has no \"Max open files\" line"))?;
        let mut fields = line["Max open files".len()..].split_whitespace();
        let soft = fields.next().unwrap_or("?").to_string();
        let hard = fields.next().unwrap_or("?").to_string();
        Ok((soft, hard))
    }
}

/// A `Name:   1234 kB` (or plain number) field of /proc/<pid>/status.
fn proc_status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_status_field(&text, field).with_context(|| format!("{path} has no readable {field}"))
}

fn parse_status_field(text: &str, field: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// User + system CPU time from a /proc/.../stat file.
fn cpu_time(path: &str) -> anyhow::Result<Duration> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    // The command name (field 2) may contain spaces and parentheses; the
    // numeric fields start after the last ')'.
    let rest = text
        .rsplit_once(')')
        .map(|(_, r)| r)
        .with_context(|| format!("{path} is not in the expected format"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, so 12 and 13
    // after the state field that follows the ')'.
    let ticks = |i: usize| -> anyhow::Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .with_context(|| format!("{path} has no CPU time field"))
    };
    let total = ticks(11)? + ticks(12)?;
    // SAFETY: sysconf only reads a system constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as u64 } else { 100 };
    Ok(Duration::from_secs_f64(total as f64 / hz as f64))
}

/// CPU time and resident memory of another process, such as the node's etcd.
pub fn pid_cpu_time(pid: u32) -> anyhow::Result<Duration> {
    cpu_time(&format!("/proc/{pid}/stat"))
}

pub fn pid_rss(pid: u32) -> anyhow::Result<u64> {
    proc_status_kib(pid, "VmRSS").map(|k| k * 1024)
}

/// This process's own CPU time and resident memory.
pub fn own_cpu_time() -> anyhow::Result<Duration> {
    cpu_time("/proc/self/stat")
}

pub fn own_rss() -> anyhow::Result<u64> {
    let text = std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    parse_status_field(&text, "VmRSS")
        .map(|k| k * 1024)
        .context("/proc/self/status has no VmRSS")
}

/// A resource limit value, in the C library's own type.
pub type Rlim = libc::rlim_t;

/// The current (soft, hard) RLIMIT_NOFILE, or an error saying what to do if
/// the hard limit is below `needed`.
pub fn check_nofile(needed: Rlim) -> anyhow::Result<(Rlim, Rlim)> {
    let (soft, hard) = nofile()?;
    if hard < needed {
        bail!(
            "the hard limit on open files (RLIMIT_NOFILE) is {hard}, but {needed} are needed \
             (one TLS connection per simulated node, plus some headroom); raise it \
             (`ulimit -Hn {needed}` as root, `LimitNOFILE=` for a systemd unit, \
             /etc/security/limits.conf) or simulate fewer nodes with --nodes"
        );
    }
    Ok((soft, hard))
}

/// Raises this process's soft RLIMIT_NOFILE to its hard limit, which must be
/// at least `needed`. Returns the limits from before.
pub fn raise_nofile(needed: Rlim) -> anyhow::Result<(Rlim, Rlim)> {
    let (soft, hard) = check_nofile(needed)?;
    if soft < hard {
        let lim = libc::rlimit {
            rlim_cur: hard,
            rlim_max: hard,
        };
        // SAFETY: setrlimit reads the struct we pass and nothing else.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            let e = std::io::Error::last_os_error();
            bail!("cannot raise the open-file limit from {soft} to {hard}: {e}");
        }
    }
    Ok((soft, hard))
}

/// Current (soft, hard) RLIMIT_NOFILE.
pub fn nofile() -> anyhow::Result<(Rlim, Rlim)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes only the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        let e = std::io::Error::last_os_error();
        bail!("cannot read the open-file limit: {e}");
    }
    Ok((lim.rlim_cur, lim.rlim_max))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_fields() {
        let text = "Name:\tx\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\nThreads:\t5\n";
        assert_eq!(parse_status_field(text, "VmRSS"), Some(1024));
        assert_eq!(parse_status_field(text, "VmHWM"), Some(2048));
        assert_eq!(parse_status_field(text, "Threads"), Some(5));
        assert_eq!(parse_status_field(text, "VmSwap"), None);
    }

    #[test]
    fn own_figures_are_readable() {
        assert!(own_rss().unwrap() > 0);
        own_cpu_time().unwrap();
        let (soft, hard) = nofile().unwrap();
        assert!(soft <= hard);
    }
}

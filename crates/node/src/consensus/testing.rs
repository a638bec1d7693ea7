//! What the consensus tests share: a real etcd binary, members on their
//! own loopback addresses, and ways to look at a running etcd.

use std::fs;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use metropolis_api::api::LogsRequest;
use metropolis_api::api::logs_request::{BacklogMode, StreamMode};
use metropolis_api::osbase::logtree::proto::log_entry;
use metropolis_curator::consensus::peer_url_on;
use metropolis_identity::{CertificateAuthority, SigningKey, generate_key, node_id};
use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use super::config::{PID_FILE, PeerConfig, configure, find_binary};
use super::supervisor::LOG_DN;
use crate::logtree::LogTree;

/// The tests run a real etcd; without one they fail rather than pass
/// vacuously.
pub(crate) fn etcd_binary() -> PathBuf {
    find_binary(None).unwrap_or_else(|e| {
        panic!(
            "these tests run a real etcd server: {e:#} \
             (on Debian: `apt-get install etcd-server`)"
        )
    })
}

/// A loopback address no other test process is likely to use.
pub(crate) fn random_address() -> IpAddr {
    let mut rng = rand::thread_rng();
    let second = u8::try_from(std::process::id() % 250 + 1).unwrap();
    IpAddr::from([127, second, rng.gen_range(1..=254), rng.gen_range(1..=254)])
}

pub(crate) fn free_port(address: IpAddr) -> u16 {
    std::net::TcpListener::bind((address, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub(crate) struct Member {
    // Keeps the directory alive.
    pub(crate) _tmp: tempfile::TempDir,
    pub(crate) dir: PathBuf,
    pub(crate) key: SigningKey,
    pub(crate) name: String,
    pub(crate) address: IpAddr,
    pub(crate) port: u16,
}

impl Member {
    pub(crate) fn new() -> Member {
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

    pub(crate) fn url(&self) -> String {
        peer_url_on(self.address, self.port)
    }

    pub(crate) fn config(
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
                .issue_peer_certificate(
                    self.key.verifying_key().as_bytes(),
                    self.address,
                    std::time::Duration::from_secs(86_400),
                )
                .unwrap(),
            crl_der: ca.issue_crl(&[], 1).unwrap(),
            initial_cluster,
            new_cluster: true,
            cluster_token: "test-cluster".into(),
            staged: false,
        }
    }

    pub(crate) fn configure_alone(&self, ca: &CertificateAuthority) {
        let cfg = self.config(ca, vec![(self.name.clone(), self.url())]);
        configure(&self.dir, &cfg, &self.key).unwrap();
    }
}

/// etcd's output lines in `logs`.
pub(crate) fn etcd_lines(logs: &LogTree) -> Vec<String> {
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

pub(crate) fn pid_file(dir: &Path) -> Option<u32> {
    let text = fs::read_to_string(dir.join(PID_FILE)).ok()?;
    text.trim().parse().ok()
}

/// Whether `pid` is a live process (not gone, not a zombie waiting for
/// whoever reaps orphans here).
pub(crate) fn is_alive(pid: u32) -> bool {
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
pub(crate) async fn http(
    socket: &Path,
    method: &str,
    path: &str,
    body: &str,
) -> io::Result<String> {
    // etcd accepts connections long before it answers them.
    tokio::time::timeout(
        Duration::from_secs(5),
        http_inner(socket, method, path, body),
    )
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no answer from etcd"))?
}

pub(crate) async fn http_inner(
    socket: &Path,
    method: &str,
    path: &str,
    body: &str,
) -> io::Result<String> {
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
pub(crate) async fn eventually<F, Fut>(secs: u64, what: &str, mut f: F)
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

pub(crate) async fn healthy(socket: &Path) -> bool {
    http(socket, "GET", "/health", "")
        .await
        .is_ok_and(|r| r.contains(r#""health":"true""#))
}

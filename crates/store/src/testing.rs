//! Test support (feature `testing`): real etcd servers started by the tests
//! themselves, for this crate's etcd tests and for the curator's suite on
//! the etcd backend. The `etcd` binary must be on PATH (`bash scripts/setup`
//! installs it); without it the tests fail, they are never skipped.
//!
//! Test code: it panics, with etcd's output, on anything unexpected.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::{EtcdStore, StoreError};

/// The member name of every etcd started by [`EtcdServer::start`].
pub const NAME: &str = "test";

/// Where a test etcd serves clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listen {
    /// `unix://client.sock:0`, in the server's directory (as on a node).
    Unix,
    /// `http://127.0.0.1:<free port>`.
    Http,
}

/// One etcd member in a temp dir, killed on drop.
pub struct EtcdServer {
    member: MemberConfig,
    child: Child,
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What starting one member (again) needs.
struct MemberConfig {
    etcd: PathBuf,
    /// Data, log and (with [`Listen::Unix`]) the client socket.
    dir: tempfile::TempDir,
    listen: Listen,
    name: String,
    client_url: String,
    peer_url: String,
    initial_cluster: String,
    /// Joins an existing cluster rather than founding one.
    joins: bool,
}

impl MemberConfig {
    /// Starts etcd in its directory (as its working directory, so that a
    /// unix socket lands there), appending its output to `etcd.log`.
    fn spawn(&self) -> Child {
        let dir = self.dir.path();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("etcd.log"))
            .expect("open etcd log");
        let state = if self.joins { "existing" } else { "new" };
        Command::new(&self.etcd)
            .current_dir(dir)
            .arg(format!("--name={}", self.name))
            .arg(format!("--data-dir={}", dir.join("data").display()))
            .arg(format!("--listen-client-urls={}", self.client_url))
            .arg(format!("--advertise-client-urls={}", self.client_url))
            .arg(format!("--listen-peer-urls={}", self.peer_url))
            .arg(format!("--initial-advertise-peer-urls={}", self.peer_url))
            .arg(format!("--initial-cluster={}", self.initial_cluster))
            .arg(format!("--initial-cluster-state={state}"))
            // A short election timeout lowers etcd's minimum lease TTL
            // (1.5 × election timeout) to below one second.
            .arg("--heartbeat-interval=50")
            .arg("--election-timeout=500")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.etcd.display()))
    }
}

/// The etcd binary on PATH; panics, saying how to install it, without one.
pub fn find_etcd() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("etcd"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "the etcd binary is not on PATH; the etcd backend's tests need a real \
                 server: install it with `apt-get install etcd-server` (or run `bash scripts/setup`)"
            )
        })
}

/// A TCP port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("pick a free port")
        .port()
}

impl EtcdServer {
    /// Starts a single-member cluster and waits until it serves clients.
    pub async fn start(listen: Listen) -> EtcdServer {
        EtcdServer::start_named(listen, NAME).await
    }

    /// [`EtcdServer::start`] with a member name of the caller's choosing
    /// (the curator's tests name it after the node it stands for).
    pub async fn start_named(listen: Listen, name: &str) -> EtcdServer {
        let peer_url = format!("http://127.0.0.1:{}", free_port());
        let initial_cluster = format!("{name}={peer_url}");
        let mut server = EtcdServer::spawn(listen, name, peer_url, initial_cluster, false);
        server.wait_ready().await;
        server
    }

    /// Starts a member joining `existing`'s cluster at `peer_url`, which must
    /// already have been added there (as a learner, say). Does not wait: a
    /// learner serves clients hardly anything until it is promoted.
    pub fn join(listen: Listen, name: &str, peer_url: &str, existing: &EtcdServer) -> EtcdServer {
        let initial_cluster = format!("{},{name}={peer_url}", existing.member.initial_cluster);
        EtcdServer::spawn(listen, name, peer_url.to_string(), initial_cluster, true)
    }

    fn spawn(
        listen: Listen,
        name: &str,
        peer_url: String,
        initial_cluster: String,
        joins: bool,
    ) -> EtcdServer {
        let client_url = match listen {
            // etcd creates the socket file `client.sock:0` in its working
            // directory; it accepts no other form of unix URL.
            Listen::Unix => "unix://client.sock:0".to_string(),
            Listen::Http => format!("http://127.0.0.1:{}", free_port()),
        };
        let member = MemberConfig {
            etcd: find_etcd(),
            dir: tempfile::TempDir::new().expect("temp dir"),
            listen,
            name: name.to_string(),
            client_url,
            peer_url,
            initial_cluster,
            joins,
        };
        let child = member.spawn();
        EtcdServer { member, child }
    }

    /// Stops etcd (SIGKILL) and starts it again on the same data.
    pub async fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // etcd 3.4 does not replace a socket file left by a killed etcd: it
        // fails with "bind: address already in use".
        if self.member.listen == Listen::Unix {
            let _ = std::fs::remove_file(self.socket_path());
        }
        self.child = self.member.spawn();
        self.wait_ready().await;
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            self.assert_running();
            match self.try_connect().await {
                Ok(_) => return,
                Err(e) if Instant::now() > deadline => {
                    panic!("etcd did not become ready: {e}\n{}", self.log());
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// Panics with etcd's output if it has exited.
    pub fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("etcd exited with {status}:\n{}", self.log());
        }
    }

    /// A new client, or the error connecting gives.
    pub async fn try_connect(&self) -> Result<Arc<EtcdStore>, StoreError> {
        match self.member.listen {
            Listen::Unix => EtcdStore::connect_unix(&self.socket_path()).await,
            Listen::Http => EtcdStore::connect(std::slice::from_ref(&self.member.client_url)).await,
        }
    }

    /// A new client of the (ready) server.
    pub async fn connect(&self) -> Arc<EtcdStore> {
        self.try_connect()
            .await
            .unwrap_or_else(|e| panic!("connect to etcd: {e}\n{}", self.log()))
    }

    /// The unix socket etcd serves clients on ([`Listen::Unix`] only).
    pub fn socket_path(&self) -> PathBuf {
        self.member.dir.path().join("client.sock:0")
    }

    /// The client URL etcd was started with.
    pub fn client_url(&self) -> &str {
        &self.member.client_url
    }

    /// The member's peer URL.
    pub fn peer_url(&self) -> &str {
        &self.member.peer_url
    }

    pub fn dir(&self) -> &Path {
        self.member.dir.path()
    }

    /// etcd's output so far, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.member.dir.path().join("etcd.log")).unwrap_or_default()
    }
}

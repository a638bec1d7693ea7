//! Test harness: real `metropolis-node` processes on their own loopback
//! addresses, and clients that talk to them over real TLS.
#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use metropolis_api::api::{
    EscrowRequest, NodeParameters,
    escrow_request::Parameters,
    node_parameters::{Cluster, ClusterBootstrap},
};
use metropolis_api::curator::{
    GetCaCertificateRequest, GetCurrentLeaderRequest, curator_local_client::CuratorLocalClient,
};
use metropolis_identity::{ServerTrust, SigningKey};
use prost::Message;
use tonic::transport::Channel;

mod owner;
#[allow(unused_imports, reason = "not every test uses them")]
pub use owner::*;

pub const CURATOR_PORT: u16 = 7835;

pub fn node_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_metropolis-node"))
}

/// metroctl is built by `cargo test --workspace` next to metropolis-node.
pub fn metroctl_binary() -> PathBuf {
    let p = node_binary().with_file_name("metroctl");
    assert!(
        p.is_file(),
        "{} is missing: run the tests with `cargo test --workspace`",
        p.display()
    );
    p
}

/// Builds metropolis-node with `--features debug` into its own target
/// directory (so the default build used by every other test stays as is).
pub fn debug_binary() -> PathBuf {
    let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let target = workspace.join("target/debug-feature");
    let status = Command::new(env!("CARGO"))
        .args([
            "build",
            "-p",
            "metropolis-node",
            "--features",
            "debug",
            "--target-dir",
        ])
        .arg(&target)
        .current_dir(&workspace)
        .status()
        .expect("run cargo");
    assert!(
        status.success(),
        "building metropolis-node with --features debug failed"
    );
    target.join("debug/metropolis-node")
}

/// A loopback address no other test (in this or another test process) uses:
/// a per-process random /16 inside 127/8, then a counter, skipping addresses
/// whose port is taken.
pub fn fresh_address() -> IpAddr {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    static BASE: std::sync::OnceLock<u8> = std::sync::OnceLock::new();
    let base = *BASE.get_or_init(|| 1 + (std::process::id() % 250) as u8);
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let ip = IpAddr::V4(Ipv4Addr::new(
            127,
            base,
            (n / 250) as u8,
            2 + (n % 250) as u8,
        ));
        if std::net::TcpListener::bind(SocketAddr::new(ip, CURATOR_PORT)).is_ok() {
            return ip;
        }
    }
}

pub fn write_bootstrap_params(path: &Path, owner: &SigningKey) {
    let params = NodeParameters {
        cluster: Some(Cluster::ClusterBootstrap(ClusterBootstrap {
            owner_public_key: owner.verifying_key().to_bytes().to_vec(),
            ..Default::default()
        })),
        network_config: None,
    };
    std::fs::write(path, params.encode_to_vec()).expect("write params");
}

/// A running node process, killed when dropped.
pub struct TestNode {
    pub address: IpAddr,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
}

impl TestNode {
    pub fn spawn(address: IpAddr, data_dir: &Path, params: Option<&Path>) -> TestNode {
        Self::spawn_with(address, data_dir, params, &[])
    }

    /// Like `spawn`, with extra command-line flags.
    pub fn spawn_with(
        address: IpAddr,
        data_dir: &Path,
        params: Option<&Path>,
        extra: &[&str],
    ) -> TestNode {
        Self::spawn_custom(&node_binary(), address, data_dir, params, extra, &[])
    }

    /// Like `spawn_with`, running `binary` (the debug build, say) with
    /// `env` added to its environment.
    pub fn spawn_custom(
        binary: &Path,
        address: IpAddr,
        data_dir: &Path,
        params: Option<&Path>,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> TestNode {
        let log = data_dir.with_extension("log");
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log file");
        let mut cmd = Command::new(binary);
        cmd.envs(env.iter().copied());
        cmd.arg("--data-dir")
            .arg(data_dir)
            .arg("--address")
            .arg(address.to_string());
        if let Some(p) = params {
            cmd.arg("--params").arg(p);
        }
        cmd.args(extra);
        let child = cmd
            // METROPOLIS_TEST_NODE_LOG: a filter for the nodes' logs when a
            // test needs more than info (e.g. `info,metropolis_curator=debug`).
            .env(
                "RUST_LOG",
                std::env::var("METROPOLIS_TEST_NODE_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("clone"))
            .stderr(out)
            .spawn()
            .expect("spawn metropolis-node");
        TestNode {
            address,
            data_dir: data_dir.to_path_buf(),
            log,
            child: Some(child),
        }
    }

    /// Bootstraps a new cluster owned by `owner` and waits until it serves.
    pub async fn bootstrap(dir: &Path, owner: &SigningKey) -> TestNode {
        let params = dir.join("bootstrap.pb");
        write_bootstrap_params(&params, owner);
        let node = TestNode::spawn(fresh_address(), &dir.join("node"), Some(&params));
        node.wait_leading().await;
        node
    }

    pub fn endpoint(&self) -> SocketAddr {
        SocketAddr::new(self.address, CURATOR_PORT)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the node answers CuratorLocal over TLS.
    pub async fn wait_serving(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if fetch_ca(self.endpoint()).await.is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "node {} did not start serving; log:\n{}",
                self.address,
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the node serves and its own curator leads (it says so in
    /// CuratorLocal.GetCurrentLeader). The curator port serves a few
    /// moments before the election ends; until then the cluster services
    /// answer UNAVAILABLE.
    pub async fn wait_leading(&self) {
        self.wait_serving().await;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let leader = async {
                let ch = channel(
                    self.endpoint(),
                    ServerTrust::Capture(Default::default()),
                    None,
                )
                .await
                .ok()?;
                let mut s = CuratorLocalClient::new(ch)
                    .get_current_leader(GetCurrentLeaderRequest {})
                    .await
                    .ok()?
                    .into_inner();
                s.message().await.ok().flatten()
            };
            if let Some(l) = leader.await
                && !l.leader_node_id.is_empty()
                && l.leader_node_id == l.this_node_id
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "node {} never led its curator; log:\n{}",
                self.address,
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM, then wait for the exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            unsafe { libc_kill(child.id() as i32, 15) };
            let _ = child.wait();
        }
    }

    /// The process ID while the node runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// The node process's resident memory in KiB (Linux `VmRSS`).
    pub fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()
    }

    /// Whether the process has exited, and with what status.
    pub fn try_exit(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Waits up to `limit` for the process to exit on its own.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.try_exit() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The PID of the etcd this node runs, from its supervisor's pid file.
    pub fn etcd_pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.data_dir.join("etcd").join("etcd.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// SIGKILLs the etcd this node runs (the node itself goes on) and waits
    /// until the node has started it again; returns the new PID.
    pub async fn kill_etcd(&self) -> i32 {
        let old = self.etcd_pid().expect("an etcd pid file");
        // SAFETY: plain kill(2) of a process this test's node started.
        unsafe { libc_kill(old, 9) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self.etcd_pid() {
                Some(p) if p != old && Path::new(&format!("/proc/{p}")).exists() => return p,
                _ => {}
            }
            assert!(
                Instant::now() < deadline,
                "node {}'s etcd was not restarted:\n{}",
                self.address,
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGKILL: the node gets no chance to clean up.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        self.kill();
    }
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

/// Runs metropolis-node to completion (for starts that must fail).
pub fn run_node(args: &[&str]) -> Output {
    Command::new(node_binary())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run metropolis-node")
}

/// Runs metroctl with a config directory.
pub fn metroctl(config: &Path, args: &[&str]) -> Output {
    Command::new(metroctl_binary())
        .arg("--config")
        .arg(config)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run metroctl")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A channel with the given trust and client identity.
pub async fn channel(
    addr: SocketAddr,
    trust: ServerTrust,
    identity: Option<(Vec<u8>, SigningKey)>,
) -> Result<Channel, metropolis_rpc::client::ConnectError> {
    let tls = metropolis_identity::client_config(trust, identity).expect("client config");
    metropolis_rpc::client::connect(addr, tls).await
}

pub fn trust(ca: &[u8]) -> ServerTrust {
    ServerTrust::ClusterCa {
        ca_der: ca.to_vec(),
        node_id: None,
    }
}

/// The CA a node serves, fetched without trusting it.
pub async fn fetch_ca(addr: SocketAddr) -> Result<Vec<u8>, String> {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(None));
    let ch = channel(addr, ServerTrust::Capture(seen), None)
        .await
        .map_err(|e| e.to_string())?;
    let resp = CuratorLocalClient::new(ch)
        .get_ca_certificate(GetCaCertificateRequest {})
        .await
        .map_err(|e| e.to_string())?;
    Ok(resp.into_inner().identity_ca_certificate)
}

pub fn escrow_request(name: &str, key: &[u8]) -> EscrowRequest {
    EscrowRequest {
        parameters: Some(Parameters {
            requested_identity_name: name.into(),
            public_key: key.to_vec(),
        }),
        proofs: None,
    }
}

/// Escrow for `name`, proving `key` with a self-signed certificate.
pub async fn escrow_as(
    addr: SocketAddr,
    ca: &[u8],
    name: &str,
    key: &SigningKey,
) -> Result<Vec<u8>, tonic::Status> {
    use metropolis_api::api::aaa_client::AaaClient;
    let self_signed = metropolis_identity::self_signed_certificate(key, "").expect("self-signed");
    let ch = channel(addr, trust(ca), Some((self_signed, key.clone())))
        .await
        .expect("connect");
    let mut s = AaaClient::new(ch)
        .escrow(tokio_stream::iter([escrow_request(
            name,
            key.verifying_key().as_bytes(),
        )]))
        .await?
        .into_inner();
    let resp = s
        .message()
        .await?
        .ok_or_else(|| tonic::Status::internal("no response"))?;
    Ok(resp.emitted_certificate)
}

/// Runs the owner escrow flow over gRPC and returns the owner certificate.
pub async fn escrow_owner(addr: SocketAddr, ca: &[u8], owner: &SigningKey) -> Vec<u8> {
    metropolis_rpc::client::escrow_owner(addr, ca, owner)
        .await
        .expect("escrow the owner certificate")
}

/// A Management-capable channel authenticated as the owner.
pub async fn owner_channel(addr: SocketAddr, ca: &[u8], owner: &SigningKey) -> Channel {
    let cert = escrow_owner(addr, ca, owner).await;
    channel(addr, trust(ca), Some((cert, owner.clone())))
        .await
        .expect("connect as owner")
}

/// The node's own credentials, read from its data directory.
pub fn node_credentials(data_dir: &Path) -> (Vec<u8>, SigningKey) {
    let bytes = std::fs::read(data_dir.join("credentials.pb")).expect("credentials");
    let sealed =
        metropolis_api::private::SealedCredentials::decode(bytes.as_slice()).expect("decode");
    let seed: [u8; 32] = sealed.node_key_seed.as_slice().try_into().expect("seed");
    (sealed.node_certificate, SigningKey::from_bytes(&seed))
}

/// Writes ClusterRegister parameters.
pub fn write_register_params(
    path: &Path,
    dir: &metropolis_api::common::ClusterDirectory,
    ticket: &[u8],
    ca: &[u8],
    labels: &[(&str, &str)],
) {
    use metropolis_api::common::{NodeLabels, node_labels::Pair};
    let params = NodeParameters {
        cluster: Some(Cluster::ClusterRegister(
            metropolis_api::api::node_parameters::ClusterRegister {
                cluster_directory: Some(dir.clone()),
                register_ticket: ticket.to_vec(),
                ca_certificate: ca.to_vec(),
                labels: Some(NodeLabels {
                    pairs: labels
                        .iter()
                        .map(|(k, v)| Pair {
                            key: k.to_string(),
                            value: v.to_string(),
                        })
                        .collect(),
                }),
            },
        )),
        network_config: None,
    };
    std::fs::write(path, params.encode_to_vec()).expect("write params");
}

/// Register parameters for the cluster `mgmt` talks to, made the way
/// `metroctl install params --register` makes them.
pub async fn fetch_register_params(
    mgmt: &mut metropolis_api::api::management_client::ManagementClient<Channel>,
    ca: &[u8],
    path: &Path,
) {
    use metropolis_api::api::{GetClusterInfoRequest, GetRegisterTicketRequest};
    let info = mgmt
        .get_cluster_info(GetClusterInfoRequest {})
        .await
        .expect("info")
        .into_inner();
    let ticket = mgmt
        .get_register_ticket(GetRegisterTicketRequest {})
        .await
        .expect("ticket")
        .into_inner()
        .ticket;
    write_register_params(
        path,
        &info.cluster_directory.unwrap_or_default(),
        &ticket,
        ca,
        &[],
    );
}

/// etcd's peer port (7834) of a consensus member.
pub const PEER_PORT: u16 = 7834;

/// What etcd's peer port did with a client.
#[derive(Debug)]
pub enum PeerAnswer {
    /// The TLS handshake failed, or the server answered it with an alert
    /// (with TLS 1.3 a client learns that its certificate was refused at its
    /// first read): the error as rustls saw it.
    Refused(String),
    /// The handshake went through, then the connection closed without an
    /// answer or an alert.
    Closed,
    /// An HTTP answer.
    Replied(String),
}

/// `GET /members` on the peer port at `addr` over TLS, presenting `identity`
/// (certificate DER and key) if given, trusting any server certificate.
pub async fn ask_peer_port(
    addr: SocketAddr,
    identity: Option<(Vec<u8>, SigningKey)>,
) -> PeerAnswer {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let seen = std::sync::Arc::new(std::sync::Mutex::new(None));
    let tls = metropolis_identity::client_config(ServerTrust::Capture(seen), identity)
        .expect("client config");
    // etcd's peer endpoints speak HTTP/1.1 here; no gRPC ALPN.
    let mut tls = (*tls).clone();
    tls.alpn_protocols.clear();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls));
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the peer port");
    let name = rustls::pki_types::ServerName::from(addr.ip());
    let exchange = async {
        let mut stream = connector.connect(name, tcp).await?;
        stream
            .write_all(b"GET /members HTTP/1.1\r\nHost: etcd\r\nConnection: close\r\n\r\n")
            .await?;
        let mut out = Vec::new();
        match stream.read_to_end(&mut out).await {
            Err(e) if out.is_empty() && e.kind() != std::io::ErrorKind::UnexpectedEof => Err(e),
            // A close without close_notify, after a complete answer or none.
            _ => Ok(out),
        }
    };
    match tokio::time::timeout(Duration::from_secs(10), exchange).await {
        Err(_) => panic!("etcd's peer port at {addr} did not answer within 10s"),
        Ok(Err(e)) => PeerAnswer::Refused(e.to_string()),
        Ok(Ok(out)) if out.is_empty() => PeerAnswer::Closed,
        Ok(Ok(out)) => PeerAnswer::Replied(String::from_utf8_lossy(&out).into_owned()),
    }
}

/// A cluster bootstrapped the operator's way: `metroctl install params
/// --bootstrap` writes the parameters and creates the owner key, the first
/// node starts on them, and the owner escrows its certificate.
pub struct Bootstrapped {
    /// metroctl's configuration directory (`owner-key.pem`).
    pub cfg: PathBuf,
    /// The bootstrap parameters, for tests that start from them again.
    pub params: PathBuf,
    /// The first node (data directory `dir/n1`), leading.
    pub node: TestNode,
    /// The owner's key, escrowed certificate and the cluster CA.
    pub owner: Owner,
}

impl Bootstrapped {
    /// `install` follows `--bootstrap` (`--ha`, certificate lifetimes);
    /// `flags` are the node's. Returns once the node leads.
    pub async fn start(dir: &Path, install: &[&str], flags: &[&str]) -> Bootstrapped {
        let cfg = dir.join("metroctl");
        let params = dir.join("bootstrap.pb");
        let mut args = vec!["install", "params", "--bootstrap"];
        args.extend_from_slice(install);
        args.extend(["-o", params.to_str().expect("utf-8")]);
        let out = metroctl(&cfg, &args);
        assert!(out.status.success(), "install params: {}", stderr(&out));
        let key = metropolis_identity::decode_owner_key_pem(
            &std::fs::read_to_string(cfg.join("owner-key.pem")).expect("owner key"),
        )
        .expect("owner key PEM");
        let node = TestNode::spawn_with(fresh_address(), &dir.join("n1"), Some(&params), flags);
        node.wait_leading().await;
        let ca = fetch_ca(node.endpoint()).await.expect("ca");
        let cert = escrow_owner(node.endpoint(), &ca, &key).await;
        Bootstrapped {
            cfg,
            params,
            node,
            owner: Owner { key, cert, ca },
        }
    }

    /// A channel to the first node, authenticated as the owner.
    pub async fn owner_channel(&self) -> Channel {
        channel(
            self.node.endpoint(),
            trust(&self.owner.ca),
            Some((self.owner.cert.clone(), self.owner.key.clone())),
        )
        .await
        .expect("owner channel")
    }
}

/// A cluster made the operator's way: metroctl's bootstrap parameters and
/// takeownership, then nodes registered with metroctl's register parameters
/// and approved with `metroctl node approve`. Nodes are killed when dropped.
pub struct OperatorCluster {
    /// metroctl's configuration directory (owner credentials, pinned CA,
    /// endpoints).
    pub cfg: PathBuf,
    pub nodes: Vec<TestNode>,
    /// Node IDs, in the order of `nodes`.
    pub ids: Vec<String>,
}

impl OperatorCluster {
    /// Bootstraps on one node and adds `n - 1` more, each started with
    /// `flags`; returns once every node is UP and HEALTHY.
    pub async fn start(dir: &Path, n: usize, flags: &[&str]) -> OperatorCluster {
        let cfg = dir.join("metroctl");
        let path = |p: &Path| p.to_str().expect("utf-8").to_string();
        let params = dir.join("bootstrap.pb");
        let out = metroctl(
            &cfg,
            &["install", "params", "--bootstrap", "-o", &path(&params)],
        );
        assert!(out.status.success(), "install params: {}", stderr(&out));
        let first = TestNode::spawn_with(fresh_address(), &dir.join("n1"), Some(&params), flags);
        first.wait_leading().await;
        let ep = first.address.to_string();
        let out = metroctl(&cfg, &["takeownership", "--endpoints", &ep, "--yes"]);
        assert!(out.status.success(), "takeownership: {}", stderr(&out));
        let mut nodes = vec![first];
        let register = dir.join("register.pb");
        let out = metroctl(
            &cfg,
            &["install", "params", "--register", "-o", &path(&register)],
        );
        assert!(out.status.success(), "register params: {}", stderr(&out));
        for i in 2..=n {
            let node = TestNode::spawn_with(
                fresh_address(),
                &dir.join(format!("n{i}")),
                Some(&register),
                flags,
            );
            nodes.push(node);
        }
        let mut c = OperatorCluster {
            cfg,
            nodes,
            ids: Vec::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let new = c.list("node.state == NODE_STATE_NEW");
            for id in &new {
                let out = metroctl(&c.cfg, &["node", "approve", id]);
                assert!(out.status.success(), "approve: {}", stderr(&out));
            }
            let up = c.list("node.state == NODE_STATE_UP && node.health == HEALTH_HEALTHY");
            if up.len() == n {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} of {n} nodes UP and HEALTHY after 60 s",
                up.len()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // IDs in the order of the nodes, by address.
        let out = metroctl(&c.cfg, &["node", "describe", "-o", "json"]);
        let all: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("describe JSON");
        for node in &c.nodes {
            let addr = node.address.to_string();
            let id = all
                .as_array()
                .into_iter()
                .flatten()
                .find(|n| n["status"]["externalAddress"] == addr.as_str())
                .and_then(|n| n["id"].as_str())
                .expect("every node in describe");
            c.ids.push(id.to_string());
        }
        c
    }

    /// `metroctl node list --filter FILTER`.
    pub fn list(&self, filter: &str) -> Vec<String> {
        let out = metroctl(&self.cfg, &["node", "list", "--filter", filter]);
        assert!(out.status.success(), "node list: {}", stderr(&out));
        stdout(&out).lines().map(str::to_string).collect()
    }

    /// The owner's key, certificate and the CA, from metroctl's files.
    pub fn owner(&self) -> (SigningKey, Vec<u8>, Vec<u8>) {
        let read = |f: &str| std::fs::read_to_string(self.cfg.join(f)).expect(f);
        let key = metropolis_identity::decode_owner_key_pem(&read("owner-key.pem")).expect("key");
        let cert = metropolis_identity::pem_to_cert_der(&read("owner.pem")).expect("owner.pem");
        let ca = metropolis_identity::pem_to_cert_der(&read("ca.pem")).expect("ca.pem");
        (key, cert, ca)
    }

    /// A channel to the first node as the owner.
    pub async fn owner_channel(&self) -> Channel {
        let (key, cert, ca) = self.owner();
        channel(self.nodes[0].endpoint(), trust(&ca), Some((cert, key)))
            .await
            .expect("connect as owner")
    }
}

/// Stops a launched cluster however the test ends, so that a failed test
/// does not leave nodes running.
pub struct StopOnDrop {
    pub cfg: PathBuf,
    pub dir: PathBuf,
}

impl StopOnDrop {
    pub fn stop(&self) -> std::process::Output {
        metroctl(
            &self.cfg,
            &["cluster", "stop", "--dir", self.dir.to_str().expect("utf8")],
        )
    }
}

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.stop();
    }
}

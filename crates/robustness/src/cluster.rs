//! The clusters under test: real `metropolis-node` processes on loopback
//! addresses that the suite starts, signals (SIGKILL, SIGSTOP, SIGCONT) and
//! restarts, and the owner's TLS configuration to talk to them.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::TryStreamExt;
use metropolis_api::api::{
    ApproveNodeRequest, GetClusterInfoRequest, GetNodesRequest, GetRegisterTicketRequest, Node,
    NodeParameters, UpdateNodeRolesRequest,
    management_client::ManagementClient,
    node::Health,
    node_parameters::{Cluster as ParamsCluster, ClusterBootstrap, ClusterRegister},
    update_node_roles_request,
};
use metropolis_api::common::NodeState;
use metropolis_api::curator::{
    GetCurrentLeaderRequest, GetCurrentLeaderResponse, curator_local_client::CuratorLocalClient,
};
use metropolis_identity::{ServerTrust, SigningKey};
use metropolis_rpc::client::explain_status;
use prost::Message;
use tokio::process::{Child, Command};
use tonic::transport::Channel;

pub const CURATOR_PORT: u16 = 7835;
pub const DEBUG_PORT: u16 = 7837;
/// Every port a node binds on its address: a node started where one is
/// taken would fail late and obscurely.
const NODE_PORTS: [u16; 5] = [7834, CURATOR_PORT, DEBUG_PORT, 7839, 7840];

/// The lease TTL the suite runs nodes with: short, so that failover (and
/// the pause that outlasts a lease) fit in a short run.
pub const LEASE_TTL: Duration = Duration::from_secs(2);
const NODE_FLAGS: &[&str] = &[
    "--heartbeat-interval",
    "300ms",
    "--heartbeat-timeout",
    "2s",
    "--leader-lease-ttl",
    "2s",
];
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Loopback addresses in one /16 of 127/8 picked at random, so that runs
/// (and tests) side by side do not collide.
pub struct Addresses {
    base: [u8; 2],
    next: u32,
}

impl Addresses {
    pub fn new(rng: &mut impl rand::Rng) -> Self {
        Addresses {
            base: [rng.gen_range(100..=250), rng.gen_range(0..=255)],
            next: 0,
        }
    }

    pub fn fresh(&mut self) -> anyhow::Result<IpAddr> {
        while self.next < 250 {
            let ip = IpAddr::V4(Ipv4Addr::new(
                127,
                self.base[0],
                self.base[1],
                2 + self.next as u8,
            ));
            self.next += 1;
            if NODE_PORTS
                .iter()
                .all(|p| std::net::TcpListener::bind(SocketAddr::new(ip, *p)).is_ok())
            {
                return Ok(ip);
            }
        }
        bail!(
            "no free loopback address left in 127.{}.{}.0/24",
            self.base[0],
            self.base[1]
        )
    }
}

/// One node process.
pub struct NodeProc {
    pub name: String,
    pub address: IpAddr,
    pub dir: PathBuf,
    binary: PathBuf,
    child: Option<Child>,
    /// Set once the cluster knows it.
    pub id: String,
}

impl NodeProc {
    pub fn spawn(
        binary: &Path,
        dir: &Path,
        name: &str,
        address: IpAddr,
        params: Option<&Path>,
    ) -> anyhow::Result<NodeProc> {
        let dir = dir.join(name);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut n = NodeProc {
            name: name.into(),
            address,
            dir,
            binary: binary.to_path_buf(),
            child: None,
            id: String::new(),
        };
        n.start(params)?;
        Ok(n)
    }

    fn start(&mut self, params: Option<&Path>) -> anyhow::Result<()> {
        let log_path = self.log();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--data-dir")
            .arg(self.dir.join("data"))
            .arg("--address")
            .arg(self.address.to_string())
            .args(NODE_FLAGS);
        if let Some(p) = params {
            cmd.arg("--params").arg(p);
        }
        let child = cmd
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // A Ctrl-C for the suite is not delivered to the nodes under it
            // mid-fault; kill_on_drop ends them with the suite.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", self.binary.display()))?;
        self.child = Some(child);
        Ok(())
    }

    pub fn log(&self) -> PathBuf {
        self.dir.join("node.log")
    }

    pub fn endpoint(&self) -> SocketAddr {
        SocketAddr::new(self.address, CURATOR_PORT)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(self.log()).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Sends `sig` to the node process.
    pub fn signal(&self, sig: i32) -> anyhow::Result<()> {
        let pid = self
            .pid()
            .with_context(|| format!("{} is not running", self.name))?;
        signal(pid, sig)
    }

    /// SIGKILL, and reaps it: no chance to clean up. Its etcd dies with it
    /// (the node sets PDEATHSIG).
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.child.take() {
            c.start_kill().ok();
            c.wait().await.context("reaping the killed node")?;
        }
        Ok(())
    }

    /// Starts it again on its data directory (no parameters: it rejoins).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.start(None)
    }

    /// The node's current etcd child, from the PID file it keeps.
    pub fn etcd_pid(&self) -> anyhow::Result<u32> {
        let path = self.dir.join("data/etcd/etcd.pid");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        text.trim()
            .parse()
            .with_context(|| format!("{} does not hold a PID", path.display()))
    }

    /// Waits until the node answers CuratorLocal, failing early if it died.
    pub async fn wait_serving(&mut self) -> anyhow::Result<Vec<u8>> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                bail!(
                    "{} exited ({status}); last lines of {}:\n{}",
                    self.name,
                    self.log().display(),
                    self.log_tail(20)
                );
            }
            match metropolis_rpc::client::fetch_ca_unverified(self.endpoint()).await {
                Ok(ca) => return Ok(ca),
                Err(e) if Instant::now() > deadline => bail!(
                    "{} did not serve on {} within {START_TIMEOUT:?} ({e}); see {}",
                    self.name,
                    self.endpoint(),
                    self.log().display()
                ),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        // A stopped process dies of SIGKILL too; its etcd, which the suite
        // may have stopped alone, is woken so that PDEATHSIG can end it.
        if let Ok(pid) = self.etcd_pid() {
            let _ = signal(pid, libc::SIGCONT);
        }
        if let Some(c) = self.child.as_mut() {
            let _ = c.start_kill();
        }
    }
}

pub fn signal(pid: u32, sig: i32) -> anyhow::Result<()> {
    // SAFETY: kill(2) on a PID of a process this suite started (a node, or
    // the etcd a node started); no memory is involved.
    if unsafe { libc::kill(pid as libc::pid_t, sig) } != 0 {
        let e = std::io::Error::last_os_error();
        bail!("cannot send signal {sig} to process {pid}: {e}");
    }
    Ok(())
}

/// A cluster of nodes and its owner.
pub struct Cluster {
    pub nodes: Vec<NodeProc>,
    pub ca: Vec<u8>,
    pub tls: Arc<rustls::ClientConfig>,
}

pub fn trust(ca: &[u8]) -> ServerTrust {
    ServerTrust::ClusterCa {
        ca_der: ca.to_vec(),
        node_id: None,
    }
}

impl Cluster {
    /// One node, bootstrapped on the embedded store (`high_availability`
    /// false) or on etcd, owned by a fresh key.
    async fn bootstrap(
        binary: &Path,
        dir: &Path,
        addrs: &mut Addresses,
        high_availability: bool,
    ) -> anyhow::Result<(Cluster, SigningKey)> {
        if !binary.is_file() {
            bail!(
                "node binary {} does not exist; build it with `cargo build -p metropolis-node` or pass --node-binary",
                binary.display()
            );
        }
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let owner = metropolis_identity::generate_key();
        let params = dir.join("bootstrap.pb");
        let p = NodeParameters {
            cluster: Some(ParamsCluster::ClusterBootstrap(ClusterBootstrap {
                owner_public_key: owner.verifying_key().to_bytes().to_vec(),
                high_availability,
                ..Default::default()
            })),
            network_config: None,
        };
        std::fs::write(&params, p.encode_to_vec())
            .with_context(|| format!("writing {}", params.display()))?;
        let mut first = NodeProc::spawn(binary, dir, "node1", addrs.fresh()?, Some(&params))?;
        let ca = first.wait_serving().await?;
        let cert = metropolis_rpc::client::escrow_owner(first.endpoint(), &ca, &owner).await?;
        let tls = metropolis_identity::client_config(trust(&ca), Some((cert, owner.clone())))
            .context("building the owner's TLS configuration")?;
        let mut c = Cluster {
            nodes: vec![first],
            ca,
            tls,
        };
        let list = c.get_nodes().await?;
        c.nodes[0].id = list
            .first()
            .map(|n| n.id.clone())
            .context("the bootstrapped cluster lists no node")?;
        Ok((c, owner))
    }

    pub async fn single(binary: &Path, dir: &Path, addrs: &mut Addresses) -> anyhow::Result<Self> {
        Ok(Self::bootstrap(binary, dir, addrs, false).await?.0)
    }

    /// Three consensus members on etcd, made the operator's way: bootstrap
    /// with high availability, register two more nodes, approve them, give
    /// each the ConsensusMember role (one at a time: etcd takes one learner
    /// at a time).
    pub async fn ha(binary: &Path, dir: &Path, addrs: &mut Addresses) -> anyhow::Result<Self> {
        let (mut c, _) = Self::bootstrap(binary, dir, addrs, true).await?;
        let register = dir.join("register.pb");
        let mut mgmt = ManagementClient::new(c.leader().await?);
        let ticket = mgmt
            .get_register_ticket(GetRegisterTicketRequest {})
            .await
            .map_err(|s| anyhow::anyhow!("GetRegisterTicket: {}", explain_status(&s)))?
            .into_inner()
            .ticket;
        let info = mgmt
            .get_cluster_info(GetClusterInfoRequest {})
            .await
            .map_err(|s| anyhow::anyhow!("GetClusterInfo: {}", explain_status(&s)))?
            .into_inner();
        let p = NodeParameters {
            cluster: Some(ParamsCluster::ClusterRegister(ClusterRegister {
                cluster_directory: info.cluster_directory,
                register_ticket: ticket,
                ca_certificate: info.ca_certificate,
                labels: None,
            })),
            network_config: None,
        };
        std::fs::write(&register, p.encode_to_vec())
            .with_context(|| format!("writing {}", register.display()))?;
        for i in 2..=3 {
            let n = NodeProc::spawn(
                binary,
                dir,
                &format!("node{i}"),
                addrs.fresh()?,
                Some(&register),
            )?;
            c.nodes.push(n);
        }
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let list = c.get_nodes().await?;
            for n in list.iter().filter(|n| n.state == NodeState::New as i32) {
                mgmt.approve_node(ApproveNodeRequest {
                    pubkey: n.pubkey.clone(),
                })
                .await
                .map_err(|s| anyhow::anyhow!("ApproveNode: {}", explain_status(&s)))?;
            }
            if list.len() == 3
                && list
                    .iter()
                    .all(|n| n.state == NodeState::Up as i32 && n.status.is_some())
            {
                for node in &mut c.nodes {
                    node.id = list
                        .iter()
                        .find(|n| {
                            n.status
                                .as_ref()
                                .is_some_and(|s| s.external_address == node.address.to_string())
                        })
                        .map(|n| n.id.clone())
                        .with_context(|| format!("{} is not in the node list", node.name))?;
                }
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "the nodes did not come up within {START_TIMEOUT:?}; see the logs in {}",
                    dir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        for i in 1..3 {
            let id = c.nodes[i].id.clone();
            mgmt.update_node_roles(UpdateNodeRolesRequest {
                node: Some(update_node_roles_request::Node::Id(id.clone())),
                consensus_member: Some(true),
                ..Default::default()
            })
            .await
            .map_err(|s| anyhow::anyhow!("UpdateNodeRoles of {id}: {}", explain_status(&s)))?;
            // A member runs a curator once its etcd serves, which needs it
            // promoted from learner: then it names the leader itself.
            let deadline = Instant::now() + START_TIMEOUT;
            loop {
                let seen = current_leader(c.nodes[i].endpoint(), &c.ca).await;
                if seen.is_some_and(|l| l.this_node_id == id && !l.leader_node_id.is_empty())
                    && c.running_curator(&id).await
                {
                    break;
                }
                if Instant::now() > deadline {
                    bail!(
                        "{id} did not become a serving consensus member within {START_TIMEOUT:?}; see {}",
                        c.nodes[i].log().display()
                    );
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
        c.wait_settled(START_TIMEOUT).await?;
        Ok(c)
    }

    async fn running_curator(&self, id: &str) -> bool {
        self.get_nodes().await.is_ok_and(|list| {
            list.iter().any(|n| {
                n.id == id
                    && n.status
                        .as_ref()
                        .is_some_and(|s| s.running_curator.is_some())
            })
        })
    }

    pub fn endpoints(&self) -> Vec<SocketAddr> {
        self.nodes.iter().map(|n| n.endpoint()).collect()
    }

    /// A channel to the curator leader.
    pub async fn leader(&self) -> anyhow::Result<Channel> {
        let c =
            metropolis_rpc::client::connect_leader(&self.endpoints(), 0, self.tls.clone()).await?;
        if !c.leader {
            bail!("no node says it leads right now");
        }
        Ok(c.channel)
    }

    pub async fn get_nodes(&self) -> anyhow::Result<Vec<Node>> {
        let mut mgmt = ManagementClient::new(self.leader().await?);
        mgmt.get_nodes(GetNodesRequest::default())
            .await
            .map_err(|s| anyhow::anyhow!("GetNodes: {}", explain_status(&s)))?
            .into_inner()
            .try_collect()
            .await
            .map_err(|s| anyhow::anyhow!("GetNodes: {}", explain_status(&s)))
    }

    /// The index of the node whose curator leads, as the nodes say.
    pub async fn leader_index(&self) -> Option<usize> {
        for n in &self.nodes {
            if let Some(l) = current_leader(n.endpoint(), &self.ca).await
                && !l.leader_node_id.is_empty()
            {
                return self.nodes.iter().position(|n| n.id == l.leader_node_id);
            }
        }
        None
    }

    /// Waits until the cluster is whole again after a fault: every node
    /// serves and names the same leader, which lists every node HEALTHY.
    pub async fn wait_settled(&self, limit: Duration) -> anyhow::Result<Duration> {
        let start = Instant::now();
        loop {
            let mut leaders = Vec::new();
            for n in &self.nodes {
                leaders.push(
                    current_leader(n.endpoint(), &self.ca)
                        .await
                        .map(|l| l.leader_node_id),
                );
            }
            let agreed = leaders
                .first()
                .cloned()
                .flatten()
                .filter(|l| !l.is_empty() && leaders.iter().all(|x| x.as_ref() == Some(l)));
            if agreed.is_some()
                && let Ok(list) = self.get_nodes().await
                && list.len() == self.nodes.len()
                && list.iter().all(|n| n.health == Health::Healthy as i32)
            {
                return Ok(start.elapsed());
            }
            if start.elapsed() > limit {
                bail!(
                    "the cluster did not settle within {limit:?} (leaders seen: {leaders:?}); see the node logs under {}",
                    self.nodes[0]
                        .dir
                        .parent()
                        .unwrap_or(Path::new("."))
                        .display()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// What the node at `addr` says about the curator leader; None if it does
/// not answer within a second.
pub async fn current_leader(addr: SocketAddr, ca: &[u8]) -> Option<GetCurrentLeaderResponse> {
    let ask = async {
        let tls = metropolis_identity::client_config(trust(ca), None).ok()?;
        let ch = metropolis_rpc::client::connect(addr, tls).await.ok()?;
        CuratorLocalClient::new(ch)
            .get_current_leader(GetCurrentLeaderRequest {})
            .await
            .ok()?
            .into_inner()
            .message()
            .await
            .ok()?
    };
    tokio::time::timeout(Duration::from_secs(1), ask)
        .await
        .ok()
        .flatten()
}

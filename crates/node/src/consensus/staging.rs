//! The node's part in moving its cluster from the embedded store to etcd
//! (`metropolis_curator::consensus::migration` decides and copies): it
//! starts the new etcd member in `etcd/`, staged ([`PeerConfig::staged`]),
//! and at the switch unstages it (`DataDir::switch_to_etcd`) and hands it,
//! running, to the node, which serves on it from then on
//! ([`Staging::take_switched`]): no restart of etcd, no raft election.

use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use metropolis_curator::consensus::{EtcdHost, PEER_PORT, StagedMember, peer_url};
use metropolis_identity::SigningKey;
use metropolis_store::EtcdStore;
use tokio::sync::{Mutex, watch};

use super::{CLUSTER_TOKEN, Etcd, PeerConfig, configure, find_binary};
use crate::datadir::DataDir;
use crate::logtree::LogTree;

/// How long a freshly started member of one may take to serve.
const SERVE_TIMEOUT: Duration = Duration::from_secs(30);

/// An [`EtcdHost`] on this node.
pub struct Staging {
    node_id: String,
    address: IpAddr,
    key: SigningKey,
    binary: Option<PathBuf>,
    logs: Arc<LogTree>,
    data: DataDir,
    /// The staged member; after the switch, the node's, until taken.
    staged: Mutex<Option<Staged>>,
    switched: watch::Sender<bool>,
}

struct Staged {
    etcd: Etcd,
    store: Arc<EtcdStore>,
    /// What it was started with.
    member: StagedMember,
}

impl Staging {
    /// The host, and what turns true once the node's store is etcd (the
    /// node then serves on [`Staging::take_switched`]).
    pub fn new(
        key: SigningKey,
        address: IpAddr,
        binary: Option<PathBuf>,
        logs: Arc<LogTree>,
        data: DataDir,
    ) -> (Arc<Staging>, watch::Receiver<bool>) {
        let (switched, rx) = watch::channel(false);
        let staging = Staging {
            node_id: metropolis_identity::node_id(key.verifying_key().as_bytes()),
            address,
            key,
            binary,
            logs,
            data,
            staged: Mutex::new(None),
            switched,
        };
        (Arc::new(staging), rx)
    }

    /// After the switch: the running etcd member, now this node's, and a
    /// client of it.
    pub async fn take_switched(&self) -> Option<(Etcd, Arc<EtcdStore>)> {
        if !*self.switched.borrow() {
            return None;
        }
        let staged = self.staged.lock().await.take()?;
        Some((staged.etcd, staged.store))
    }

    async fn start_new(&self, member: &StagedMember) -> anyhow::Result<Staged> {
        use anyhow::Context;
        let binary = find_binary(self.binary.as_deref())?;
        // etcd's own complaint would come only after it started; this one
        // names the port.
        let peer = SocketAddr::new(self.address, PEER_PORT);
        TcpListener::bind(peer).with_context(|| {
            format!("etcd's peer port {peer} is not free (another process listens on it)")
        })?;
        let dir = self.data.etcd_dir();
        if super::is_configured(&dir) {
            anyhow::bail!(
                "{} holds this node's etcd member already; refusing to stage another",
                dir.display()
            );
        }
        remove_dir(&dir)?;
        let cfg = PeerConfig {
            name: self.node_id.clone(),
            address: self.address,
            peer_port: PEER_PORT,
            ca_der: member.ca_certificate.clone(),
            peer_cert_der: member.peer_certificate.clone(),
            crl_der: member.crl.clone(),
            initial_cluster: vec![(self.node_id.clone(), peer_url(self.address))],
            new_cluster: true,
            cluster_token: CLUSTER_TOKEN.into(),
            staged: true,
        };
        configure(&dir, &cfg, &self.key)?;
        let etcd = match Etcd::start(&dir, &binary, self.logs.clone()).await {
            Ok(etcd) => etcd,
            Err(e) => {
                let _ = remove_dir(&dir);
                return Err(e);
            }
        };
        match tokio::time::timeout(SERVE_TIMEOUT, etcd.connect()).await {
            Ok(store) => Ok(Staged {
                etcd,
                store,
                member: member.clone(),
            }),
            Err(_) => {
                etcd.stop().await;
                let _ = remove_dir(&dir);
                anyhow::bail!(
                    "the new etcd member did not serve within {}s",
                    SERVE_TIMEOUT.as_secs()
                )
            }
        }
    }
}

fn remove_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(anyhow::Error::new(e).context(format!("removing {}", dir.display()))),
    }
}

#[async_trait]
impl EtcdHost for Staging {
    fn node_id(&self) -> &str {
        &self.node_id
    }

    fn address(&self) -> IpAddr {
        self.address
    }

    async fn start(&self, member: &StagedMember) -> Result<(Arc<EtcdStore>, StagedMember), String> {
        let mut staged = self.staged.lock().await;
        if *self.switched.borrow() {
            return Err("this node has moved to etcd already".into());
        }
        if let Some(s) = staged.as_ref()
            && s.member.ca_certificate == member.ca_certificate
        {
            return Ok((s.store.clone(), s.member.clone()));
        }
        if let Some(old) = staged.take() {
            old.etcd.stop().await;
        }
        let new = self.start_new(member).await.map_err(|e| format!("{e:#}"))?;
        tracing::info!(dir = %self.data.etcd_dir().display(), "started the etcd member to move the cluster state to, staged");
        let started = (new.store.clone(), new.member.clone());
        *staged = Some(new);
        Ok(started)
    }

    async fn switch(&self) -> Result<(), String> {
        // Held throughout: no start may touch the directory meanwhile.
        let staged = self.staged.lock().await;
        if staged.is_none() {
            return Err("no etcd member was started to switch to".into());
        }
        self.data.switch_to_etcd().map_err(|e| format!("{e:#}"))?;
        tracing::info!("this node's consensus store is etcd now; serving on it");
        self.switched.send_replace(true);
        drop(staged);
        Ok(())
    }

    async fn abandon(&self) {
        let mut staged = self.staged.lock().await;
        if *self.switched.borrow() {
            return;
        }
        if let Some(s) = staged.take() {
            s.etcd.stop().await;
        }
        let dir = self.data.etcd_dir();
        if super::is_configured(&dir) {
            // Not ours to remove (nothing stages over a configured member).
            return;
        }
        if let Err(e) = remove_dir(&dir) {
            tracing::warn!(error = %format!("{e:#}"), "removing the abandoned etcd member");
        }
        drop(staged);
    }
}

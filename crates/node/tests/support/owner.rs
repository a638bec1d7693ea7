//! The owner's side of a test cluster: channels to the leader, the calls
//! the tests make, a background writer that records acknowledged writes.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use metropolis_api::api::{
    GetNodesRequest, Node, UpdateNodeLabelsRequest, UpdateNodeRolesRequest,
    management_client::ManagementClient, update_node_labels_request, update_node_roles_request,
};
use metropolis_api::curator::{
    GetConsensusStatusRequest, GetConsensusStatusResponse, curator_client::CuratorClient,
};
use metropolis_identity::SigningKey;
use tonic::transport::Channel;

use super::trust;

pub struct Owner {
    pub key: SigningKey,
    pub cert: Vec<u8>,
    pub ca: Vec<u8>,
}

impl Owner {
    /// A channel to whichever node leads now.
    pub async fn leader(&self, addrs: &[SocketAddr]) -> Option<Channel> {
        let tls = metropolis_identity::client_config(
            trust(&self.ca),
            Some((self.cert.clone(), self.key.clone())),
        )
        .ok()?;
        let c = metropolis_rpc::client::connect_leader(addrs, 0, tls)
            .await
            .ok()?;
        c.leader.then_some(c.channel)
    }
}

pub async fn nodes(ch: Channel) -> Result<Vec<Node>, tonic::Status> {
    ManagementClient::new(ch)
        .get_nodes(GetNodesRequest {
            filter: String::new(),
        })
        .await?
        .into_inner()
        .try_collect()
        .await
}

pub async fn consensus(ch: Channel) -> Result<GetConsensusStatusResponse, tonic::Status> {
    Ok(CuratorClient::new(ch)
        .get_consensus_status(GetConsensusStatusRequest {})
        .await?
        .into_inner())
}

pub async fn make_member(ch: Channel, id: &str, on: bool) -> Result<(), tonic::Status> {
    ManagementClient::new(ch)
        .update_node_roles(UpdateNodeRolesRequest {
            node: Some(update_node_roles_request::Node::Id(id.to_string())),
            consensus_member: Some(on),
            ..Default::default()
        })
        .await
        .map(|_| ())
}

pub async fn set_label(ch: Channel, id: &str, key: &str, value: &str) -> Result<(), tonic::Status> {
    ManagementClient::new(ch)
        .update_node_labels(UpdateNodeLabelsRequest {
            node: Some(update_node_labels_request::Node::Id(id.to_string())),
            upsert: vec![update_node_labels_request::Pair {
                key: key.into(),
                value: value.into(),
            }],
            delete: vec![],
        })
        .await
        .map(|_| ())
}

pub fn label(n: &Node, key: &str) -> Option<String> {
    n.labels
        .as_ref()?
        .pairs
        .iter()
        .find(|p| p.key == key)
        .map(|p| p.value.clone())
}

/// Polls `check` against the leader until it returns Some.
pub async fn eventually<T, F, Fut>(what: &str, owner: &Owner, addrs: &[SocketAddr], check: F) -> T
where
    F: Fn(Channel) -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(ch) = owner.leader(addrs).await
            && let Some(v) = check(ch).await
        {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Acknowledged writes of one label, kept by a background writer.
#[derive(Default)]
pub struct Writes {
    pub acked: Vec<(u64, Instant)>,
    pub refused_migrating: usize,
}

/// Writes `w=1, 2, ...` on node `id` through whoever leads, until stopped.
pub fn start_writer(
    owner: Arc<Owner>,
    addrs: Vec<SocketAddr>,
    id: String,
) -> (
    Arc<Mutex<Writes>>,
    Arc<std::sync::atomic::AtomicBool>,
    tokio::task::JoinHandle<()>,
) {
    let writes = Arc::new(Mutex::new(Writes::default()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (w, s) = (writes.clone(), stop.clone());
    let task = tokio::spawn(async move {
        let mut n = 0u64;
        let mut ch = None;
        while !s.load(std::sync::atomic::Ordering::Relaxed) {
            if ch.is_none() {
                ch = owner.leader(&addrs).await;
            }
            let Some(c) = ch.clone() else {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            };
            n += 1;
            match set_label(c, &id, "w", &n.to_string()).await {
                Ok(()) => w.lock().unwrap().acked.push((n, Instant::now())),
                Err(e) => {
                    if e.message().contains("migrating the cluster state to etcd") {
                        w.lock().unwrap().refused_migrating += 1;
                    }
                    ch = None;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    });
    (writes, stop, task)
}

/// Seconds since midnight of a log line's timestamp (`2026-12-01T14:41:58.123456Z ...`).
pub fn log_time(line: &str) -> Option<f64> {
    let stamp = line.split_whitespace().next()?;
    let (_, time) = stamp.split_once('T')?;
    let mut parts = time.trim_end_matches('Z').split(':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

/// A channel to the leader, once there is one.
pub async fn leader_now(owner: &Owner, addrs: &[SocketAddr]) -> Channel {
    eventually(
        "a curator leader",
        owner,
        addrs,
        |ch| async move { Some(ch) },
    )
    .await
}

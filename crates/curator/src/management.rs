//! Management: the operator-facing cluster API.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use futures::{Stream, StreamExt};
use metropolis_api::admin::ConsensusProgress;
use metropolis_api::api::{
    ApproveNodeRequest, ApproveNodeResponse, ConfigureClusterRequest, ConfigureClusterResponse,
    DecommissionNodeRequest, DecommissionNodeResponse, DeleteNodeRequest, DeleteNodeResponse,
    GetClusterInfoRequest, GetClusterInfoResponse, GetNodesRequest, GetRegisterTicketRequest,
    GetRegisterTicketResponse, Node, UpdateNodeLabelsRequest, UpdateNodeLabelsResponse,
    UpdateNodeRolesRequest, UpdateNodeRolesResponse, decommission_node_request,
    delete_node_request, management_server::Management, update_node_labels_request,
    update_node_roles_request,
};
use metropolis_api::common::{NodeRoles, node_roles};
use tonic::{Request, Response, Status};

use crate::consensus::Progress;
use crate::filter::Filter;
use crate::heartbeat::Heartbeats;
use crate::state::{Cluster, NodeEntry, RoleChange};

pub struct ManagementService {
    cluster: Arc<Cluster>,
    heartbeats: Arc<Heartbeats>,
}

impl ManagementService {
    pub fn new(cluster: Arc<Cluster>, heartbeats: Arc<Heartbeats>) -> Self {
        ManagementService {
            cluster,
            heartbeats,
        }
    }
}

/// A node as the Management API shows it, with health computed now and its
/// consensus progress (`None`: not a consensus member), in upstream's form:
/// roles always set and as markers only (the consensus member's
/// certificates and peers are the node's business, not an operator's),
/// labels always set and sorted by key.
pub fn api_node(
    entry: NodeEntry,
    heartbeats: &Heartbeats,
    now: Instant,
    consensus: Option<Progress>,
) -> Node {
    let (health, since) = heartbeats.health(&entry.id, entry.node.state, now);
    let roles = entry.node.roles.unwrap_or_default();
    let mut labels = entry.node.labels.unwrap_or_default();
    labels.pairs.sort_by(|a, b| a.key.cmp(&b.key));
    Node {
        consensus_progress: consensus
            .map(ConsensusProgress::from)
            .unwrap_or(ConsensusProgress::None) as i32,
        pubkey: entry.node.public_key,
        id: entry.id,
        state: entry.node.state,
        status: entry.node.status,
        roles: Some(NodeRoles {
            kubernetes_worker: roles
                .kubernetes_worker
                .map(|_| node_roles::KubernetesWorker {}),
            consensus_member: roles
                .consensus_member
                .map(|_| node_roles::ConsensusMember::default()),
            kubernetes_controller: roles
                .kubernetes_controller
                .map(|_| node_roles::KubernetesController {}),
        }),
        health: health as i32,
        time_since_heartbeat: since.and_then(|d| prost_types::Duration::try_from(d).ok()),
        tpm_usage: entry.node.tpm_usage,
        labels: Some(labels),
    }
}

/// Nodes as Management.GetNodes shows them, and NodeWatch too: converted
/// with [`api_node`], then kept if the request's CEL filter matches.
pub struct NodeView {
    filter: Option<Filter>,
}

impl NodeView {
    /// Compiles a request's filter; empty or blank means every node.
    pub fn new(filter: &str) -> Result<Self, Status> {
        let filter = if filter.trim().is_empty() {
            None
        } else {
            Some(Filter::compile(filter).map_err(|e| Status::invalid_argument(e.to_string()))?)
        };
        Ok(NodeView { filter })
    }

    /// The node as shown at `now`, or None if the filter does not match it.
    pub fn show(
        &self,
        entry: NodeEntry,
        heartbeats: &Heartbeats,
        now: Instant,
        consensus: Option<Progress>,
    ) -> Result<Option<Node>, Status> {
        let node = api_node(entry, heartbeats, now, consensus);
        match self.filter.as_ref().map(|f| f.matches(&node)) {
            None | Some(Ok(true)) => Ok(Some(node)),
            Some(Ok(false)) => Ok(None),
            Some(Err(e)) => Err(Status::invalid_argument(format!("invalid filter: {e}"))),
        }
    }
}

/// The node ID for a public key given in a request.
pub fn node_id_of_pubkey(pubkey: &[u8]) -> Result<String, Status> {
    let key: [u8; 32] = pubkey.try_into().map_err(|_| {
        Status::invalid_argument(format!("pubkey must be 32 bytes, got {}", pubkey.len()))
    })?;
    Ok(metropolis_identity::node_id(&key))
}

type NodeStream = Pin<Box<dyn Stream<Item = Result<Node, Status>> + Send>>;

#[tonic::async_trait]
impl Management for ManagementService {
    async fn get_register_ticket(
        &self,
        _: Request<GetRegisterTicketRequest>,
    ) -> Result<Response<GetRegisterTicketResponse>, Status> {
        Ok(Response::new(GetRegisterTicketResponse {
            ticket: self.cluster.register_ticket().await?,
        }))
    }

    async fn get_cluster_info(
        &self,
        _: Request<GetClusterInfoRequest>,
    ) -> Result<Response<GetClusterInfoResponse>, Status> {
        Ok(Response::new(GetClusterInfoResponse {
            cluster_directory: Some(self.cluster.directory().await?),
            ca_certificate: self.cluster.ca().cert_der().to_vec(),
            cluster_configuration: Some(self.cluster.configuration().await?),
        }))
    }

    type GetNodesStream = NodeStream;

    async fn get_nodes(
        &self,
        request: Request<GetNodesRequest>,
    ) -> Result<Response<NodeStream>, Status> {
        let view = NodeView::new(&request.into_inner().filter)?;
        // As upstream: a record that does not decode is skipped (and logged),
        // not a failed call.
        let entries = self.cluster.nodes_readable().await?;
        let progress = self.cluster.consensus_progress(&entries).await?;
        let heartbeats = self.heartbeats.clone();
        let now = Instant::now();
        // Nodes are converted and filtered one at a time as the stream is
        // polled: only the store's read result is held, not a second copy.
        let nodes = entries.into_iter().filter_map(move |entry| {
            let p = progress.get(&entry.id).copied();
            view.show(entry, &heartbeats, now, p).transpose()
        });
        // The first error ends the stream.
        let mut failed = false;
        let nodes = futures::stream::iter(nodes).take_while(move |r| {
            let go = !failed;
            failed |= r.is_err();
            futures::future::ready(go)
        });
        Ok(Response::new(Box::pin(nodes)))
    }

    async fn approve_node(
        &self,
        request: Request<ApproveNodeRequest>,
    ) -> Result<Response<ApproveNodeResponse>, Status> {
        let id = node_id_of_pubkey(&request.get_ref().pubkey)?;
        self.cluster.approve_node(&id).await?;
        tracing::info!(node = %id, "node approved");
        Ok(Response::new(ApproveNodeResponse {}))
    }

    async fn update_node_roles(
        &self,
        request: Request<UpdateNodeRolesRequest>,
    ) -> Result<Response<UpdateNodeRolesResponse>, Status> {
        let req = request.into_inner();
        let id = match req.node {
            Some(update_node_roles_request::Node::Pubkey(k)) => node_id_of_pubkey(&k)?,
            Some(update_node_roles_request::Node::Id(id)) => id,
            None => return Err(Status::invalid_argument("name the node by pubkey or id")),
        };
        let change = RoleChange {
            kubernetes_worker: req.kubernetes_worker,
            kubernetes_controller: req.kubernetes_controller,
            consensus_member: req.consensus_member,
        };
        self.cluster
            .update_roles(&id, change, self.heartbeats.as_ref())
            .await?;
        tracing::info!(node = %id, ?change, "node roles updated");
        Ok(Response::new(UpdateNodeRolesResponse {}))
    }

    async fn decommission_node(
        &self,
        request: Request<DecommissionNodeRequest>,
    ) -> Result<Response<DecommissionNodeResponse>, Status> {
        let id = match request.into_inner().node {
            Some(decommission_node_request::Node::Pubkey(k)) => node_id_of_pubkey(&k)?,
            Some(decommission_node_request::Node::Id(id)) => id,
            None => return Err(Status::invalid_argument("name the node by pubkey or id")),
        };
        self.cluster.request_decommission(&id).await?;
        tracing::info!(node = %id, "decommission requested");
        Ok(Response::new(DecommissionNodeResponse {}))
    }

    async fn delete_node(
        &self,
        request: Request<DeleteNodeRequest>,
    ) -> Result<Response<DeleteNodeResponse>, Status> {
        let req = request.into_inner();
        let id = match req.node {
            Some(delete_node_request::Node::Pubkey(k)) => node_id_of_pubkey(&k)?,
            Some(delete_node_request::Node::Id(id)) => id,
            None => return Err(Status::invalid_argument("name the node by pubkey or id")),
        };
        self.cluster
            .delete_node(
                &id,
                req.safety_bypass_has_roles.is_some(),
                req.safety_bypass_not_decommissioned.is_some(),
                self.heartbeats.as_ref(),
            )
            .await?;
        // Open heartbeat streams of the node end with its next beat.
        self.heartbeats.remove(&id);
        tracing::info!(node = %id, "node deleted");
        Ok(Response::new(DeleteNodeResponse {}))
    }

    async fn update_node_labels(
        &self,
        request: Request<UpdateNodeLabelsRequest>,
    ) -> Result<Response<UpdateNodeLabelsResponse>, Status> {
        let req = request.into_inner();
        let id = match req.node {
            Some(update_node_labels_request::Node::Pubkey(k)) => node_id_of_pubkey(&k)?,
            Some(update_node_labels_request::Node::Id(id)) => id,
            None => return Err(Status::invalid_argument("name the node by pubkey or id")),
        };
        let upsert = req.upsert.into_iter().map(|p| (p.key, p.value)).collect();
        self.cluster.update_labels(&id, upsert, req.delete).await?;
        Ok(Response::new(UpdateNodeLabelsResponse {}))
    }

    async fn configure_cluster(
        &self,
        request: Request<ConfigureClusterRequest>,
    ) -> Result<Response<ConfigureClusterResponse>, Status> {
        let req = request.into_inner();
        let new = req
            .new_config
            .ok_or_else(|| Status::invalid_argument("new_config must be set"))?;
        let paths = req
            .update_mask
            .ok_or_else(|| Status::invalid_argument("update_mask must be set"))?
            .paths;
        let resulting = self.cluster.configure(req.base_config, new, &paths).await?;
        tracing::info!(?paths, "cluster configuration changed");
        Ok(Response::new(ConfigureClusterResponse {
            resulting_config: Some(resulting),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metropolis_api::common::{NodeLabels, node_labels::Pair};
    use metropolis_api::private;

    #[test]
    fn nodes_are_shown_as_upstream_shows_them() {
        let pair = |k: &str| Pair {
            key: k.into(),
            value: "v".into(),
        };
        let entry = |roles, labels| NodeEntry {
            id: "metropolis-x".into(),
            node: private::Node {
                state: metropolis_api::common::NodeState::Up as i32,
                roles,
                labels,
                ..Default::default()
            },
            mod_revision: 1,
        };
        let hb = Heartbeats::new(std::time::Duration::from_secs(5));
        let full = NodeRoles {
            consensus_member: Some(node_roles::ConsensusMember {
                ca_certificate: vec![1; 10],
                peer_certificate: vec![2; 10],
                initial_crl: vec![3],
                peers: vec![node_roles::consensus_member::Peer {
                    name: "n".into(),
                    url: "https://127.0.0.1:7834".into(),
                }],
            }),
            kubernetes_worker: Some(node_roles::KubernetesWorker {}),
            kubernetes_controller: None,
        };
        let labels = NodeLabels {
            pairs: vec![pair("zone"), pair("arch"), pair("m")],
        };
        let shown = api_node(entry(Some(full), Some(labels)), &hb, Instant::now(), None);
        let roles = shown.roles.expect("roles");
        assert_eq!(
            roles.consensus_member,
            Some(node_roles::ConsensusMember::default())
        );
        assert!(roles.kubernetes_worker.is_some() && roles.kubernetes_controller.is_none());
        let keys: Vec<_> = shown
            .labels
            .expect("labels")
            .pairs
            .into_iter()
            .map(|p| p.key)
            .collect();
        assert_eq!(keys, ["arch", "m", "zone"]);
        // Nothing set: still both set, empty.
        let bare = api_node(entry(None, None), &hb, Instant::now(), None);
        assert_eq!(bare.roles, Some(NodeRoles::default()));
        assert_eq!(bare.labels, Some(NodeLabels::default()));
    }

    #[tokio::test]
    async fn a_corrupt_record_is_left_out_of_listings() {
        let t = crate::state::test_support::bootstrapped().await;
        let key = crate::state::node_key("metropolis-corrupt");
        let garbage = metropolis_store::Txn::new()
            .and_then(metropolis_store::Op::put(key, b"\xff\xff\xff\xff".to_vec()));
        t.store.txn(garbage).await.expect("put");
        assert!(t.cluster.nodes().await.is_err(), "decisions see it");
        let listed = t.cluster.nodes_readable().await.expect("listing");
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].id, t.first_id);
    }
}

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
/// consensus progress (`None`: not a consensus member).
pub fn api_node(
    entry: NodeEntry,
    heartbeats: &Heartbeats,
    now: Instant,
    consensus: Option<Progress>,
) -> Node {
    let (health, since) = heartbeats.health(&entry.id, entry.node.state, now);
    Node {
        consensus_progress: consensus
            .map(ConsensusProgress::from)
            .unwrap_or(ConsensusProgress::None) as i32,
        pubkey: entry.node.public_key,
        id: entry.id,
        state: entry.node.state,
        status: entry.node.status,
        roles: entry.node.roles,
        health: health as i32,
        time_since_heartbeat: since.and_then(|d| prost_types::Duration::try_from(d).ok()),
        tpm_usage: entry.node.tpm_usage,
        labels: entry.node.labels,
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
        let src = request.into_inner().filter;
        let filter = if src.trim().is_empty() {
            None
        } else {
            Some(Filter::compile(&src).map_err(|e| Status::invalid_argument(e.to_string()))?)
        };
        let entries = self.cluster.nodes().await?;
        let progress = self.cluster.consensus_progress(&entries).await?;
        let heartbeats = self.heartbeats.clone();
        let now = Instant::now();
        // Nodes are converted and filtered one at a time as the stream is
        // polled: only the store's read result is held, not a second copy.
        let nodes = entries.into_iter().filter_map(move |entry| {
            let p = progress.get(&entry.id).copied();
            let node = api_node(entry, &heartbeats, now, p);
            match filter.as_ref().map(|f| f.matches(&node)) {
                None | Some(Ok(true)) => Some(Ok(node)),
                Some(Ok(false)) => None,
                Some(Err(e)) => Some(Err(Status::invalid_argument(format!(
                    "invalid filter: {e}"
                )))),
            }
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
        let paths = req.update_mask.map(|m| m.paths).unwrap_or_default();
        let resulting = self.cluster.configure(req.base_config, new, &paths).await?;
        tracing::info!(?paths, "cluster configuration changed");
        Ok(Response::new(ConfigureClusterResponse {
            resulting_config: Some(resulting),
        }))
    }
}

//! Management: the operator-facing cluster API.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use metropolis_api::admin::{
    RegenerateRegisterTicketRequest, RegenerateRegisterTicketResponse,
    cluster_admin_server::ClusterAdmin,
};
use metropolis_api::api::{
    ApproveNodeRequest, ApproveNodeResponse, ConfigureClusterRequest, ConfigureClusterResponse,
    DecommissionNodeRequest, DecommissionNodeResponse, DeleteNodeRequest, DeleteNodeResponse,
    GetClusterInfoRequest, GetClusterInfoResponse, GetNodesRequest, GetRegisterTicketRequest,
    GetRegisterTicketResponse, Node, UpdateNodeLabelsRequest, UpdateNodeLabelsResponse,
    UpdateNodeRolesRequest, UpdateNodeRolesResponse, management_server::Management,
};
use metropolis_rpc::Caller;
use tonic::{Request, Response, Status};

use crate::state::Cluster;

pub struct ManagementService {
    cluster: Arc<Cluster>,
}

impl ManagementService {
    pub fn new(cluster: Arc<Cluster>) -> Self {
        ManagementService { cluster }
    }
}

type NodeStream = Pin<Box<dyn Stream<Item = Result<Node, Status>> + Send>>;

fn not_yet(method: &str) -> Status {
    Status::unimplemented(format!(
        "{method} is not available in this version of metropolis-node"
    ))
}

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

    async fn get_nodes(&self, _: Request<GetNodesRequest>) -> Result<Response<NodeStream>, Status> {
        Err(not_yet("GetNodes"))
    }

    async fn approve_node(
        &self,
        _: Request<ApproveNodeRequest>,
    ) -> Result<Response<ApproveNodeResponse>, Status> {
        Err(not_yet("ApproveNode"))
    }

    async fn update_node_roles(
        &self,
        _: Request<UpdateNodeRolesRequest>,
    ) -> Result<Response<UpdateNodeRolesResponse>, Status> {
        Err(not_yet("UpdateNodeRoles"))
    }

    async fn decommission_node(
        &self,
        _: Request<DecommissionNodeRequest>,
    ) -> Result<Response<DecommissionNodeResponse>, Status> {
        Err(not_yet("DecommissionNode"))
    }

    async fn delete_node(
        &self,
        _: Request<DeleteNodeRequest>,
    ) -> Result<Response<DeleteNodeResponse>, Status> {
        Err(not_yet("DeleteNode"))
    }

    async fn update_node_labels(
        &self,
        _: Request<UpdateNodeLabelsRequest>,
    ) -> Result<Response<UpdateNodeLabelsResponse>, Status> {
        Err(not_yet("UpdateNodeLabels"))
    }

    async fn configure_cluster(
        &self,
        _: Request<ConfigureClusterRequest>,
    ) -> Result<Response<ConfigureClusterResponse>, Status> {
        Err(not_yet("ConfigureCluster"))
    }
}

#[tonic::async_trait]
impl ClusterAdmin for ManagementService {
    async fn regenerate_register_ticket(
        &self,
        request: Request<RegenerateRegisterTicketRequest>,
    ) -> Result<Response<RegenerateRegisterTicketResponse>, Status> {
        let who = Caller::of(&request)?.principal.clone();
        let ticket = self.cluster.regenerate_register_ticket().await?;
        tracing::info!(by = ?who, "register ticket regenerated");
        Ok(Response::new(RegenerateRegisterTicketResponse { ticket }))
    }
}

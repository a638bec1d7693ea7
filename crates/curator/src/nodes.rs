//! Curator: the node-to-cluster service (register, commit, join, heartbeat,
//! status).

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use metropolis_api::common::NodeState;
use metropolis_api::curator::{
    CommitNodeRequest, CommitNodeResponse, HeartbeatUpdateRequest, HeartbeatUpdateResponse,
    JoinNodeRequest, JoinNodeResponse, RegisterNodeRequest, RegisterNodeResponse,
    UpdateNodeStatusRequest, UpdateNodeStatusResponse, WatchEvent, WatchRequest,
    curator_server::Curator,
};
use metropolis_rpc::Caller;
use tonic::{Request, Response, Status, Streaming};

use crate::heartbeat::Heartbeats;
use crate::state::Cluster;

pub struct CuratorService {
    cluster: Arc<Cluster>,
    heartbeats: Arc<Heartbeats>,
}

impl CuratorService {
    pub fn new(cluster: Arc<Cluster>, heartbeats: Arc<Heartbeats>) -> Self {
        CuratorService {
            cluster,
            heartbeats,
        }
    }
}

/// The key a not-yet-admitted node proved it holds (its self-signed TLS
/// client certificate).
fn presented_key(caller: &Caller) -> Result<[u8; 32], Status> {
    caller
        .certificate
        .as_ref()
        .map(|c| c.public_key)
        .ok_or_else(|| {
            Status::unauthenticated(
                "present a self-signed certificate over the node key at the TLS layer",
            )
        })
}

type HeartbeatStream = Pin<Box<dyn Stream<Item = Result<HeartbeatUpdateResponse, Status>> + Send>>;
type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Curator for CuratorService {
    type WatchStream = WatchStream;

    async fn watch(&self, _: Request<WatchRequest>) -> Result<Response<WatchStream>, Status> {
        Err(Status::unimplemented(
            "Watch is not available in this version of metropolis-node",
        ))
    }

    async fn update_node_status(
        &self,
        request: Request<UpdateNodeStatusRequest>,
    ) -> Result<Response<UpdateNodeStatusResponse>, Status> {
        let caller = Caller::of(&request)?.node_id()?.to_string();
        let req = request.into_inner();
        if !req.node_id.is_empty() && req.node_id != caller {
            return Err(Status::permission_denied(format!(
                "node {caller} may only update its own status"
            )));
        }
        let status = req
            .status
            .ok_or_else(|| Status::invalid_argument("status must be set"))?;
        self.cluster.update_status(&caller, status).await?;
        Ok(Response::new(UpdateNodeStatusResponse {}))
    }

    type HeartbeatStream = HeartbeatStream;

    async fn heartbeat(
        &self,
        request: Request<Streaming<HeartbeatUpdateRequest>>,
    ) -> Result<Response<HeartbeatStream>, Status> {
        let node_id = Caller::of(&request)?.node_id()?.to_string();
        let heartbeats = self.heartbeats.clone();
        let beats = request.into_inner().map(move |beat| {
            beat?;
            heartbeats.beat(&node_id);
            Ok(HeartbeatUpdateResponse {})
        });
        Ok(Response::new(Box::pin(beats)))
    }

    async fn register_node(
        &self,
        request: Request<RegisterNodeRequest>,
    ) -> Result<Response<RegisterNodeResponse>, Status> {
        let key = presented_key(Caller::of(&request)?)?;
        let req = request.into_inner();
        let (labels, dropped) = crate::labels::sanitize_initial(req.labels);
        let node_id = self
            .cluster
            .register_node(key, &req.register_ticket, labels)
            .await?;
        for problem in dropped {
            tracing::warn!(node = %node_id, %problem, "dropped invalid label of registering node");
        }
        tracing::info!(node = %node_id, "node registered");
        Ok(Response::new(RegisterNodeResponse { node_id }))
    }

    async fn commit_node(
        &self,
        request: Request<CommitNodeRequest>,
    ) -> Result<Response<CommitNodeResponse>, Status> {
        let key = presented_key(Caller::of(&request)?)?;
        let node_certificate = self.cluster.commit_node(key).await?;
        tracing::info!(node = %metropolis_identity::node_id(&key), "node committed");
        Ok(Response::new(CommitNodeResponse {
            ca_certificate: self.cluster.ca().cert_der().to_vec(),
            node_certificate,
        }))
    }

    async fn join_node(
        &self,
        request: Request<JoinNodeRequest>,
    ) -> Result<Response<JoinNodeResponse>, Status> {
        let node_id = Caller::of(&request)?.node_id()?.to_string();
        let entry = self.cluster.node(&node_id).await?.ok_or_else(|| {
            Status::permission_denied(format!("node {node_id} was removed from the cluster"))
        })?;
        if entry.node.state != NodeState::Up as i32 {
            return Err(Status::failed_precondition(format!(
                "node {node_id} is {} and cannot join",
                crate::state::state_name(entry.node.state)
            )));
        }
        Ok(Response::new(JoinNodeResponse {
            roles: entry.node.roles,
        }))
    }
}

//! ClusterAdmin: the project-owned management calls (register ticket,
//! identities, audit log, backup). Who may call them is in admin.proto; this module
//! only translates between the wire and the cluster state.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use metropolis_api::admin::{
    AddIdentityRequest, AddIdentityResponse, AuditEntry, BackupChunk, BackupRequest,
    GetAuditLogRequest, Identity, ListIdentitiesRequest, ListIdentitiesResponse,
    RegenerateRegisterTicketRequest, RegenerateRegisterTicketResponse, RemoveIdentityRequest,
    RemoveIdentityResponse, Role, audit_entry, cluster_admin_server::ClusterAdmin,
};
use metropolis_api::private::{self, audit_record};
use metropolis_rpc::Caller;
use tonic::{Request, Response, Status};

use crate::aaa::OWNER;
use crate::state::Cluster;
use crate::{audit, identities};

pub struct ClusterAdminService {
    cluster: Arc<Cluster>,
}

impl ClusterAdminService {
    pub fn new(cluster: Arc<Cluster>) -> Self {
        ClusterAdminService { cluster }
    }
}

fn api_identity(i: private::Identity) -> Identity {
    Identity {
        name: i.name,
        public_key: i.public_key,
        role: i.role,
        created_at: i.created_at,
        bootstrap_owner: false,
    }
}

fn api_entry(r: private::AuditRecord) -> AuditEntry {
    AuditEntry {
        time: r.time,
        principal: r.principal.map(|p| match p {
            audit_record::Principal::Identity(n) => audit_entry::Principal::Identity(n),
            audit_record::Principal::NodeId(n) => audit_entry::Principal::NodeId(n),
        }),
        method: r.method,
        request: r.request,
        code: r.code,
        message: r.message,
    }
}

fn who<T>(request: &Request<T>) -> String {
    Caller::of(request)
        .ok()
        .and_then(|c| c.principal.as_ref())
        .map(|p| p.to_string())
        .unwrap_or_else(|| "unknown caller".into())
}

type AuditStream = Pin<Box<dyn Stream<Item = Result<AuditEntry, Status>> + Send>>;
type BackupStream = Pin<Box<dyn Stream<Item = Result<BackupChunk, Status>> + Send>>;

#[tonic::async_trait]
impl ClusterAdmin for ClusterAdminService {
    async fn regenerate_register_ticket(
        &self,
        request: Request<RegenerateRegisterTicketRequest>,
    ) -> Result<Response<RegenerateRegisterTicketResponse>, Status> {
        let who = Caller::of(&request)?.principal.clone();
        let ticket = self.cluster.regenerate_register_ticket().await?;
        tracing::info!(by = ?who, "register ticket regenerated");
        Ok(Response::new(RegenerateRegisterTicketResponse { ticket }))
    }

    async fn add_identity(
        &self,
        request: Request<AddIdentityRequest>,
    ) -> Result<Response<AddIdentityResponse>, Status> {
        let by = who(&request);
        let req = request.into_inner();
        let owner = self.cluster.owner_public_key().await?;
        let added = identities::add(
            self.cluster.store().as_ref(),
            self.cluster.fence(),
            owner,
            &req.name,
            &req.public_key,
            req.role,
        )
        .await?;
        tracing::info!(%by, identity = %added.name, role = identities::role_name(added.role),
            "identity added");
        Ok(Response::new(AddIdentityResponse {
            identity: Some(api_identity(added)),
        }))
    }

    async fn list_identities(
        &self,
        _: Request<ListIdentitiesRequest>,
    ) -> Result<Response<ListIdentitiesResponse>, Status> {
        let owner = Identity {
            name: OWNER.into(),
            public_key: self.cluster.owner_public_key().await?.to_vec(),
            role: Role::Owner as i32,
            created_at: None,
            bootstrap_owner: true,
        };
        let named = identities::list(self.cluster.store().as_ref()).await?;
        Ok(Response::new(ListIdentitiesResponse {
            identities: std::iter::once(owner)
                .chain(named.into_iter().map(api_identity))
                .collect(),
        }))
    }

    async fn remove_identity(
        &self,
        request: Request<RemoveIdentityRequest>,
    ) -> Result<Response<RemoveIdentityResponse>, Status> {
        let by = who(&request);
        let name = request.into_inner().name;
        identities::remove(self.cluster.store().as_ref(), self.cluster.fence(), &name).await?;
        tracing::info!(%by, identity = %name, "identity removed");
        Ok(Response::new(RemoveIdentityResponse {}))
    }

    type GetAuditLogStream = AuditStream;

    async fn get_audit_log(
        &self,
        request: Request<GetAuditLogRequest>,
    ) -> Result<Response<AuditStream>, Status> {
        let limit = usize::try_from(request.into_inner().limit).unwrap_or(usize::MAX);
        let records = audit::read(self.cluster.store().as_ref(), limit).await?;
        // Converted one at a time as the stream is polled.
        Ok(Response::new(Box::pin(futures::stream::iter(
            records.into_iter().map(|r| Ok(api_entry(r))),
        ))))
    }

    type BackupStream = BackupStream;

    async fn backup(
        &self,
        request: Request<BackupRequest>,
    ) -> Result<Response<BackupStream>, Status> {
        let by = who(&request);
        let chunks = self.cluster.backup().await?;
        tracing::info!(%by, "backup started");
        Ok(Response::new(Box::pin(
            chunks.map(|c| c.map_err(Status::from)),
        )))
    }
}

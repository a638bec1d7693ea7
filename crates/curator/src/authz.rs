//! Who may do what: the cluster's answer to the RPC layer's question.

use std::sync::Arc;

use async_trait::async_trait;
use metropolis_api::ext::Permission;
use metropolis_rpc::{Authorizer, Permissions, Principal};
use tonic::Status;

use crate::aaa::OWNER;
use crate::state::Cluster;

/// What a node identity may do: act on itself and read cluster state (to
/// watch its own roles and find other nodes), nothing more.
pub fn node_permissions() -> Permissions {
    Permissions::of(&[Permission::UpdateNodeSelf, Permission::ReadClusterStatus])
}

/// Authorizes against cluster state: nodes must still be members, the owner
/// holds every permission.
pub struct ClusterAuthorizer {
    cluster: Arc<Cluster>,
}

impl ClusterAuthorizer {
    pub fn new(cluster: Arc<Cluster>) -> Self {
        ClusterAuthorizer { cluster }
    }
}

#[async_trait]
impl Authorizer for ClusterAuthorizer {
    async fn permissions(&self, principal: &Principal) -> Result<Permissions, Status> {
        match principal {
            Principal::Node { id, public_key } => match self.cluster.node(id).await? {
                Some(entry) if entry.node.public_key == public_key => Ok(node_permissions()),
                _ => Err(Status::permission_denied(format!(
                    "node {id} was removed from the cluster"
                ))),
            },
            Principal::User { name, public_key } if name == OWNER => {
                // The owner certificate is only ever issued for the owner key;
                // checking it again guards against a CA key compromise being
                // used to mint "owner" certificates for other keys.
                if *public_key == self.cluster.owner_public_key().await? {
                    Ok(Permissions::ALL)
                } else {
                    Err(Status::permission_denied(
                        "certificate names the owner but not with the owner key",
                    ))
                }
            }
            Principal::User { name, .. } => Err(Status::permission_denied(format!(
                "identity {name:?} is not known to this cluster"
            ))),
        }
    }
}

/// Authorizes by certificate alone, for nodes that hold no cluster state (not
/// consensus members): a certificate the cluster CA issued to `owner` only
/// ever went to the owner key, and node certificates only to admitted nodes.
pub struct CertificateAuthorizer;

#[async_trait]
impl Authorizer for CertificateAuthorizer {
    async fn permissions(&self, principal: &Principal) -> Result<Permissions, Status> {
        match principal {
            Principal::Node { .. } => Ok(node_permissions()),
            Principal::User { name, .. } if name == OWNER => Ok(Permissions::ALL),
            Principal::User { name, .. } => Err(Status::permission_denied(format!(
                "identity {name:?} is not known to this cluster"
            ))),
        }
    }
}

//! Who may do what: the cluster's answer to the RPC layer's question.

use std::sync::Arc;

use async_trait::async_trait;
use metropolis_api::admin::Role;
use metropolis_api::ext::Permission;
use metropolis_rpc::{Authorizer, Permissions, Principal};
use tonic::Status;

use crate::aaa::OWNER;
use crate::identities;
use crate::state::Cluster;

/// What a node identity may do: act on itself and read cluster state (to
/// watch its own roles and find other nodes), nothing more.
pub fn node_permissions() -> Permissions {
    Permissions::of(&[Permission::UpdateNodeSelf, Permission::ReadClusterStatus])
}

/// Authorizes against cluster state: nodes must still be members, the owner
/// holds every permission, a named identity holds its role's permissions for
/// as long as it exists with the key its certificate names.
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
            Principal::User { name, public_key } => {
                let identity = identities::get(self.cluster.store().as_ref(), name).await?;
                let Some(identity) = identity else {
                    return Err(Status::permission_denied(format!(
                        "identity {name:?} is not known to this cluster (was it removed?); \
                         ask the owner to add it again (`metroctl user add`)"
                    )));
                };
                // A name removed and added again with a new key must not
                // accept certificates issued for the old key.
                if identity.public_key != public_key {
                    return Err(Status::permission_denied(format!(
                        "this certificate for identity {name:?} was issued for another key \
                         (the identity was removed and added again); run \
                         `metroctl login --identity {name}` with the current key"
                    )));
                }
                let role = Role::try_from(identity.role).unwrap_or(Role::Unspecified);
                identities::role_permissions(role).ok_or_else(|| {
                    Status::internal(format!(
                        "identity {name:?} has no valid role in the cluster state ({}); \
                         remove it and add it again",
                        identity.role
                    ))
                })
            }
        }
    }
}

/// Authorizes by certificate alone, for nodes that hold no cluster state (not
/// consensus members): a certificate the cluster CA issued to `owner` only
/// ever went to the owner key, and node certificates only to admitted nodes.
///
/// Named identities other than `owner` are refused here: their roles live in
/// the cluster state and they can be removed at any time, so a certificate
/// alone does not say what (if anything) they may still do. Such callers are
/// served by the consensus members, which check the state on every call.
pub struct CertificateAuthorizer;

#[async_trait]
impl Authorizer for CertificateAuthorizer {
    async fn permissions(&self, principal: &Principal) -> Result<Permissions, Status> {
        match principal {
            Principal::Node { .. } => Ok(node_permissions()),
            Principal::User { name, .. } if name == OWNER => Ok(Permissions::ALL),
            Principal::User { name, .. } => Err(Status::permission_denied(format!(
                "identity {name:?} is not the owner, and this node holds no cluster state to \
                 look it up; connect to a consensus member"
            ))),
        }
    }
}

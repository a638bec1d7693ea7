//! Curator: the node-to-cluster service (register, commit, join, heartbeat,
//! status, cluster networking), and NodeCurator, our additions to it.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use metropolis_api::admin::{
    RenewNodeCertificateRequest, RenewNodeCertificateResponse, RenewPeerCertificateRequest,
    RenewPeerCertificateResponse, ReportDecommissionedRequest, ReportDecommissionedResponse,
    node_curator_server::NodeCurator,
};
use metropolis_api::common::NodeState;
use metropolis_api::curator::{
    CommitNodeRequest, CommitNodeResponse, GetConsensusStatusRequest, GetConsensusStatusResponse,
    HeartbeatRequest, HeartbeatResponse, IssueCertificateRequest, IssueCertificateResponse,
    JoinNodeRequest, JoinNodeResponse, RegisterNodeRequest, RegisterNodeResponse,
    UpdateNodeClusterNetworkingRequest, UpdateNodeClusterNetworkingResponse,
    UpdateNodeStatusRequest, UpdateNodeStatusResponse, WatchEvent, WatchRequest,
    curator_server::Curator,
};
use metropolis_rpc::Caller;
use tonic::{Request, Response, Status, Streaming};

use crate::CuratorError;
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

type HeartbeatStream = Pin<Box<dyn Stream<Item = Result<HeartbeatResponse, Status>> + Send>>;
type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Curator for CuratorService {
    type WatchStream = WatchStream;

    async fn watch(&self, request: Request<WatchRequest>) -> Result<Response<WatchStream>, Status> {
        let stream = crate::watch::watch(self.cluster.store(), request.into_inner()).await?;
        Ok(Response::new(Box::pin(stream)))
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
        request: Request<Streaming<HeartbeatRequest>>,
    ) -> Result<Response<HeartbeatStream>, Status> {
        let node_id = Caller::of(&request)?.node_id()?.to_string();
        let heartbeats = self.heartbeats.clone();
        let cluster = self.cluster.clone();
        let beats = request.into_inner().map(move |beat| {
            beat?;
            if heartbeats.is_removed(&node_id) {
                return Err(Status::permission_denied(format!(
                    "node {node_id} was removed from the cluster"
                )));
            }
            if !heartbeats.is_leading() {
                return Err(Status::unavailable(
                    "this curator is no longer the leader; reconnect to the cluster to find the new one",
                ));
            }
            heartbeats.beat(&node_id);
            Ok(HeartbeatResponse {
                directory_digest: cluster.directory_digest().unwrap_or(0),
            })
        });
        Ok(Response::new(Box::pin(beats)))
    }

    async fn register_node(
        &self,
        request: Request<RegisterNodeRequest>,
    ) -> Result<Response<RegisterNodeResponse>, Status> {
        let key = presented_key(Caller::of(&request)?)?;
        let req = request.into_inner();
        // Upstream's later JoinNode proves this key; here the node
        // certificate does, so a well-formed key is accepted and not kept.
        if !req.join_key.is_empty() && req.join_key.len() != 32 {
            return Err(Status::invalid_argument(format!(
                "join_key must be an Ed25519 public key of 32 bytes, got {} bytes",
                req.join_key.len()
            )));
        }
        let config = self.cluster.configuration().await?;
        let tpm_usage = crate::state::tpm_usage(&config, req.have_local_tpm)?;
        let storage_security = crate::state::recommended_storage_security(&config)?;
        let (labels, dropped) = crate::labels::sanitize_initial(req.labels);
        let node_id = self
            .cluster
            .register_node_using(key, &req.register_ticket, labels, tpm_usage)
            .await?;
        for problem in dropped {
            tracing::warn!(node = %node_id, %problem, "dropped invalid label of registering node");
        }
        tracing::info!(node = %node_id, "node registered");
        Ok(Response::new(RegisterNodeResponse {
            cluster_configuration: Some(config),
            tpm_usage: tpm_usage as i32,
            recommended_node_storage_security: storage_security as i32,
        }))
    }

    async fn commit_node(
        &self,
        request: Request<CommitNodeRequest>,
    ) -> Result<Response<CommitNodeResponse>, Status> {
        // The cluster unlock key and storage security are upstream's disk
        // encryption, which this implementation does not do: not kept.
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
            cluster_unlock_key: Vec::new(),
            roles: entry.node.roles,
        }))
    }

    async fn issue_certificate(
        &self,
        _: Request<IssueCertificateRequest>,
    ) -> Result<Response<IssueCertificateResponse>, Status> {
        Err(CuratorError::Unimplemented(
            "IssueCertificate issues Kubernetes component certificates, and this implementation runs no Kubernetes".into(),
        )
        .into())
    }

    async fn update_node_cluster_networking(
        &self,
        request: Request<UpdateNodeClusterNetworkingRequest>,
    ) -> Result<Response<UpdateNodeClusterNetworkingResponse>, Status> {
        let node_id = Caller::of(&request)?.node_id()?.to_string();
        let cn = request
            .into_inner()
            .clusternet
            .ok_or_else(|| Status::invalid_argument("clusternet must be set"))?;
        self.cluster.update_clusternet(&node_id, cn).await?;
        Ok(Response::new(UpdateNodeClusterNetworkingResponse {}))
    }

    async fn get_consensus_status(
        &self,
        _: Request<GetConsensusStatusRequest>,
    ) -> Result<Response<GetConsensusStatusResponse>, Status> {
        Ok(Response::new(self.cluster.consensus_status().await?))
    }
}

/// NodeCurator: the node-to-cluster calls upstream's Curator lacks.
pub struct NodeCuratorService {
    cluster: Arc<Cluster>,
    heartbeats: Arc<Heartbeats>,
}

impl NodeCuratorService {
    pub fn new(cluster: Arc<Cluster>, heartbeats: Arc<Heartbeats>) -> Self {
        NodeCuratorService {
            cluster,
            heartbeats,
        }
    }
}

#[tonic::async_trait]
impl NodeCurator for NodeCuratorService {
    async fn report_decommissioned(
        &self,
        request: Request<ReportDecommissionedRequest>,
    ) -> Result<Response<ReportDecommissionedResponse>, Status> {
        let node_id = Caller::of(&request)?.node_id()?.to_string();
        self.cluster.complete_decommission(&node_id).await?;
        self.heartbeats.forget(&node_id);
        tracing::info!(node = %node_id, "node decommissioned itself");
        Ok(Response::new(ReportDecommissionedResponse {}))
    }

    async fn renew_node_certificate(
        &self,
        request: Request<RenewNodeCertificateRequest>,
    ) -> Result<Response<RenewNodeCertificateResponse>, Status> {
        // Any certificate over the node key proves possession (the TLS
        // handshake checked it): the current one, an expired one, or a
        // self-signed one.
        let key = presented_key(Caller::of(&request)?)?;
        let node_id = request.into_inner().node_id;
        let node_certificate = self.cluster.renew_node_certificate(key, &node_id).await?;
        tracing::info!(node = %node_id, "renewed node certificate");
        Ok(Response::new(RenewNodeCertificateResponse {
            node_certificate,
        }))
    }

    async fn renew_peer_certificate(
        &self,
        request: Request<RenewPeerCertificateRequest>,
    ) -> Result<Response<RenewPeerCertificateResponse>, Status> {
        let caller = Caller::of(&request)?.node_id()?.to_string();
        let node_id = request.into_inner().node_id;
        let peer_certificate = self
            .cluster
            .renew_peer_certificate(&caller, &node_id)
            .await?;
        tracing::info!(node = %node_id, "renewed etcd peer certificate");
        Ok(Response::new(RenewPeerCertificateResponse {
            peer_certificate,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metropolis_api::common::{
        NodeClusterNetworking, NodeLabels, NodeStatus, NodeStorageSecurity, NodeTpmUsage,
    };
    use metropolis_api::curator::{watch_event::Progress, watch_request};
    use metropolis_rpc::Principal;
    use metropolis_store::{Op, Txn};
    use std::time::Duration;

    fn service(cluster: &Arc<Cluster>) -> CuratorService {
        CuratorService::new(
            cluster.clone(),
            Arc::new(Heartbeats::new(Duration::from_secs(5))),
        )
    }

    /// A request as the authentication layer hands it on: from a node with
    /// its node certificate, or from a key's self-signed certificate.
    fn as_node<T>(msg: T, id: &str) -> Request<T> {
        let mut req = Request::new(msg);
        req.extensions_mut().insert(Caller {
            certificate: None,
            principal: Some(Principal::Node {
                id: id.to_string(),
                public_key: [0; 32],
            }),
        });
        req
    }

    fn self_signed<T>(msg: T, key: &metropolis_identity::SigningKey) -> Request<T> {
        let der = metropolis_identity::self_signed_certificate(key, "").expect("self-signed");
        let cert = metropolis_identity::parse_certificate(&der).expect("parse");
        let mut req = Request::new(msg);
        req.extensions_mut().insert(Caller {
            certificate: Some(Arc::new(cert)),
            principal: None,
        });
        req
    }

    #[tokio::test]
    async fn register_answers_configuration_and_tpm_usage_and_checks_the_join_key() {
        let t = crate::state::test_support::bootstrapped().await;
        let svc = service(&t.cluster);
        let key = metropolis_identity::generate_key();
        let ticket = t.cluster.register_ticket().await.expect("ticket");
        let req = |join_key: Vec<u8>| RegisterNodeRequest {
            register_ticket: ticket.clone(),
            join_key,
            have_local_tpm: true,
            labels: None,
        };
        let bad = svc
            .register_node(self_signed(req(vec![1; 5]), &key))
            .await
            .expect_err("short join key");
        assert_eq!(bad.code(), tonic::Code::InvalidArgument, "{bad}");
        let resp = svc
            .register_node(self_signed(req(vec![1; 32]), &key))
            .await
            .expect("register")
            .into_inner();
        let config = t.cluster.configuration().await.expect("config");
        assert_eq!(resp.cluster_configuration, Some(config));
        // The bootstrap default is TPM_MODE_DISABLED: a TPM, unused.
        assert_eq!(resp.tpm_usage, NodeTpmUsage::PresentButUnused as i32);
        assert_eq!(
            resp.recommended_node_storage_security,
            NodeStorageSecurity::AuthenticatedEncrypted as i32
        );
        let id = metropolis_identity::node_id(key.verifying_key().as_bytes());
        let stored = t.cluster.node(&id).await.expect("read").expect("node");
        assert_eq!(stored.node.tpm_usage, NodeTpmUsage::PresentButUnused as i32);
    }

    #[tokio::test]
    async fn issue_certificate_is_unimplemented() {
        let t = crate::state::test_support::bootstrapped().await;
        let err = service(&t.cluster)
            .issue_certificate(as_node(IssueCertificateRequest::default(), &t.first_id))
            .await
            .expect_err("no kubernetes");
        assert_eq!(err.code(), tonic::Code::Unimplemented);
        assert!(err.message().contains("no Kubernetes"), "{}", err.message());
    }

    #[tokio::test]
    async fn cluster_networking_shows_in_watch() {
        let t = crate::state::test_support::bootstrapped().await;
        let svc = service(&t.cluster);
        let id = t.first_id.clone();
        let unset = svc
            .update_node_cluster_networking(as_node(Default::default(), &id))
            .await
            .expect_err("unset");
        assert_eq!(unset.code(), tonic::Code::InvalidArgument);
        svc.update_node_status(as_node(
            UpdateNodeStatusRequest {
                node_id: id.clone(),
                status: Some(NodeStatus {
                    external_address: "127.0.0.2".into(),
                    ..Default::default()
                }),
            },
            &id,
        ))
        .await
        .expect("status");
        let cn = NodeClusterNetworking {
            wireguard_pubkey: "GaNXuc/yl8IaXduX6PQ+ZxIG4HtBACubHrRI7rqfA20=".into(),
            prefixes: vec![metropolis_api::common::node_cluster_networking::Prefix {
                cidr: "127.0.0.2/32".into(),
            }],
        };
        svc.update_node_cluster_networking(as_node(
            UpdateNodeClusterNetworkingRequest {
                clusternet: Some(cn.clone()),
            },
            &id,
        ))
        .await
        .expect("update");
        let only = WatchRequest {
            kind: Some(watch_request::Kind::NodeInCluster(
                watch_request::NodeInCluster { node_id: id },
            )),
        };
        let mut s = svc
            .watch(Request::new(only))
            .await
            .expect("watch")
            .into_inner();
        let ev = s.next().await.expect("backlog").expect("ok");
        assert_eq!(ev.nodes[0].clusternet, Some(cn));
    }

    #[tokio::test]
    async fn watch_sends_backlog_then_changes_and_tombstones() {
        let t = crate::state::test_support::bootstrapped().await;
        let (store, cluster, id) = (t.store.clone(), t.cluster.clone(), t.first_id.clone());
        let svc = service(&cluster);

        let req = WatchRequest {
            kind: Some(watch_request::Kind::NodesInCluster(Default::default())),
        };
        let mut all = svc
            .watch(Request::new(req))
            .await
            .expect("watch")
            .into_inner();
        let only = WatchRequest {
            kind: Some(watch_request::Kind::NodeInCluster(
                watch_request::NodeInCluster {
                    node_id: id.clone(),
                },
            )),
        };
        let mut mine = svc
            .watch(Request::new(only))
            .await
            .expect("watch")
            .into_inner();
        for s in [&mut all, &mut mine] {
            let first = s.next().await.expect("backlog").expect("ok");
            assert_eq!(first.progress, Progress::LastBacklogged as i32);
            assert_eq!(first.nodes.len(), 1);
            assert_eq!(first.nodes[0].id, id);
        }

        // A new node shows in the cluster-wide watch only.
        let other = metropolis_identity::generate_key()
            .verifying_key()
            .to_bytes();
        let ticket = cluster.register_ticket().await.expect("ticket");
        let other_id = cluster
            .register_node(other, &ticket, NodeLabels::default())
            .await
            .expect("register");
        let ev = all.next().await.expect("event").expect("ok");
        assert_eq!(ev.nodes[0].id, other_id);

        // A change to our node shows in both.
        cluster
            .update_labels(&id, vec![("zone".into(), "a".into())], vec![])
            .await
            .expect("label");
        for s in [&mut all, &mut mine] {
            let ev = tokio::time::timeout(Duration::from_secs(5), s.next())
                .await
                .expect("in time")
                .expect("ev");
            let ev = ev.expect("ok");
            assert_eq!(ev.nodes[0].id, id);
            assert_eq!(ev.nodes[0].labels.as_ref().map(|l| l.pairs.len()), Some(1));
        }

        // Removal is a tombstone.
        store
            .txn(Txn::new().and_then(Op::delete(crate::state::node_key(&other_id))))
            .await
            .expect("delete");
        let ev = all.next().await.expect("event").expect("ok");
        assert_eq!(ev.node_tombstones[0].node_id, other_id);
        assert!(ev.nodes.is_empty());

        let bad = svc.watch(Request::new(WatchRequest { kind: None })).await;
        assert_eq!(
            bad.err().map(|e| e.code()),
            Some(tonic::Code::InvalidArgument)
        );
    }
}

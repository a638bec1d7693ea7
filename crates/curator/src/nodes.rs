//! Curator: the node-to-cluster service (register, commit, join, heartbeat,
//! status).

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use metropolis_api::common::NodeState;
use metropolis_api::curator::{
    CommitNodeRequest, CommitNodeResponse, GetConsensusStatusRequest, GetConsensusStatusResponse,
    HeartbeatUpdateRequest, HeartbeatUpdateResponse, JoinNodeRequest, JoinNodeResponse, Node,
    RegisterNodeRequest, RegisterNodeResponse, ReportDecommissionedRequest,
    ReportDecommissionedResponse, UpdateNodeStatusRequest, UpdateNodeStatusResponse, WatchEvent,
    WatchRequest,
    curator_server::Curator,
    watch_event::{NodeTombstone, Progress},
    watch_request,
};
use metropolis_rpc::Caller;
use metropolis_store::EventKind;
use prost::Message;
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

fn node_id_of_key(key: &[u8]) -> String {
    String::from_utf8_lossy(key)
        .trim_start_matches(crate::state::NODES_PREFIX)
        .to_string()
}

/// A node record as the Watch stream shows it to nodes.
fn watch_node(key: &[u8], value: &[u8]) -> Result<Node, Status> {
    let id = node_id_of_key(key);
    let n = metropolis_api::private::Node::decode(value)
        .map_err(|e| Status::internal(format!("node record {id} is corrupt: {e}")))?;
    Ok(Node {
        id,
        pubkey: n.public_key,
        state: n.state,
        roles: n.roles,
        status: n.status,
        labels: n.labels,
        decommission_requested: n.decommission_requested,
    })
}

type HeartbeatStream = Pin<Box<dyn Stream<Item = Result<HeartbeatUpdateResponse, Status>> + Send>>;
type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Curator for CuratorService {
    type WatchStream = WatchStream;

    async fn watch(&self, request: Request<WatchRequest>) -> Result<Response<WatchStream>, Status> {
        let only = match request.into_inner().kind {
            Some(watch_request::Kind::NodeInCluster(n)) if !n.node_id.is_empty() => Some(n.node_id),
            Some(watch_request::Kind::NodeInCluster(_)) => {
                return Err(Status::invalid_argument(
                    "node_in_cluster.node_id must be set",
                ));
            }
            Some(watch_request::Kind::NodesInCluster(_)) => None,
            None => {
                return Err(Status::invalid_argument(
                    "kind must be node_in_cluster or nodes_in_cluster",
                ));
            }
        };
        let prefix = match &only {
            Some(id) => crate::state::node_key(id),
            None => crate::state::NODES_PREFIX.to_string(),
        };
        // The backlog and the changes after it come from one revision, so
        // nothing is missed or seen twice in between.
        let store = self.cluster.store().clone();
        let range = store
            .range(prefix.as_bytes())
            .await
            .map_err(crate::CuratorError::from)?;
        let wanted = only.map(|id| crate::state::node_key(&id).into_bytes());
        let matches = move |key: &[u8]| wanted.as_deref().is_none_or(|w| key == w);
        let backlog: Vec<Node> = range
            .kvs
            .iter()
            .filter(|kv| matches(&kv.key))
            .map(|kv| watch_node(&kv.key, &kv.value))
            .collect::<Result<_, _>>()?;
        let first = WatchEvent {
            nodes: backlog,
            node_tombstones: vec![],
            progress: Progress::LastBacklogged as i32,
        };
        let changes = store
            .watch(prefix.as_bytes(), range.revision + 1)
            .await
            .map_err(crate::CuratorError::from)?;
        let changes = changes.filter_map(move |ev| {
            let out = match ev {
                Err(e) => Some(Err(Status::from(crate::CuratorError::from(e)))),
                Ok(ev) if !matches(&ev.kv.key) => None,
                Ok(ev) => Some(match ev.kind {
                    EventKind::Put => watch_node(&ev.kv.key, &ev.kv.value).map(|n| WatchEvent {
                        nodes: vec![n],
                        ..Default::default()
                    }),
                    EventKind::Delete => Ok(WatchEvent {
                        node_tombstones: vec![NodeTombstone {
                            node_id: node_id_of_key(&ev.kv.key),
                        }],
                        ..Default::default()
                    }),
                }),
            };
            futures::future::ready(out)
        });
        Ok(Response::new(Box::pin(
            futures::stream::iter([Ok(first)]).chain(changes),
        )))
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

    async fn get_consensus_status(
        &self,
        _: Request<GetConsensusStatusRequest>,
    ) -> Result<Response<GetConsensusStatusResponse>, Status> {
        Ok(Response::new(self.cluster.consensus_status().await?))
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

#[cfg(test)]
mod tests {
    use super::*;
    use metropolis_api::common::NodeLabels;
    use metropolis_store::{Op, Txn};
    use std::time::Duration;

    #[tokio::test]
    async fn watch_sends_backlog_then_changes_and_tombstones() {
        let t = crate::state::test_support::bootstrapped().await;
        let (store, cluster, id) = (t.store.clone(), t.cluster.clone(), t.first_id.clone());
        let svc = CuratorService::new(
            cluster.clone(),
            Arc::new(Heartbeats::new(Duration::from_secs(5))),
        );

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

//! The consensus: which nodes hold the cluster state, and how that changes.
//!
//! A node's ConsensusMember role is desired state. Giving it writes the role
//! *pending* (no peer certificate yet) and nothing else; the leading
//! curator's reconciler ([`members::reconcile`]) then makes the store follow:
//!
//! - on the embedded store, a pending member means moving the cluster state
//!   to etcd first ([`migration`]): the leader starts etcd on its own node,
//!   copies the state, checks the copy and switches over;
//! - on etcd, pending members are admitted one at a time (etcd allows one
//!   learner), each promoted to voter once in sync;
//! - drift is repaired: an etcd member without a role is removed, a role
//!   without an etcd member admitted again.
//!
//! Peer certificates come from the cluster's consensus CA ([`pki`]), whose
//! CRL cuts former members off etcd's peer port.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use metropolis_api::admin::{ConsensusBackend, ConsensusMember};
use metropolis_api::curator::{GetConsensusStatusResponse, get_consensus_status_response};

use crate::error::CuratorError;
use crate::state::{Cluster, NodeEntry};

pub mod members;
pub mod migration;
pub mod pki;

pub use members::{Pass, reconcile, reconcile_once};
pub use migration::{EtcdHost, StagedMember};

/// Port of etcd's peer traffic on every consensus member.
pub const PEER_PORT: u16 = 7834;

/// The URL etcd members reach a member at.
pub fn peer_url(address: IpAddr) -> String {
    peer_url_on(address, PEER_PORT)
}

/// [`peer_url`] on another port (tests run several members per address).
/// SocketAddr's Display brackets IPv6 addresses.
pub fn peer_url_on(address: IpAddr, port: u16) -> String {
    format!("https://{}", SocketAddr::new(address, port))
}

/// Tells whether a node is alive as far as this curator knows: Some(true)
/// healthy, Some(false) not, None not known yet (a new leader for one
/// heartbeat timeout).
pub trait Liveness: Send + Sync {
    fn is_live(&self, node_id: &str) -> Option<bool>;

    /// How long ago this curator last heard from the node (None: not since
    /// it leads). Picks the freshest of several live candidates.
    fn last_heard(&self, _node_id: &str) -> Option<std::time::Duration> {
        None
    }
}

/// The node running this curator is alive, whatever its heartbeats say (a
/// new leader has not heard its own node's yet).
pub(crate) struct SelfIsLive<'a> {
    pub me: Option<&'a str>,
    pub others: &'a dyn Liveness,
}

impl Liveness for SelfIsLive<'_> {
    fn is_live(&self, node_id: &str) -> Option<bool> {
        if self.me == Some(node_id) {
            return Some(true);
        }
        self.others.is_live(node_id)
    }

    fn last_heard(&self, node_id: &str) -> Option<std::time::Duration> {
        if self.me == Some(node_id) {
            return Some(std::time::Duration::ZERO);
        }
        self.others.last_heard(node_id)
    }
}

/// How far a node with the ConsensusMember role has got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Accepted; waiting for its turn (or for the move to etcd).
    Pending,
    /// An etcd learner, catching up.
    Learner,
    /// A voting member.
    Voter,
}

impl From<Progress> for metropolis_api::admin::ConsensusProgress {
    fn from(p: Progress) -> Self {
        use metropolis_api::admin::ConsensusProgress as P;
        match p {
            Progress::Pending => P::Pending,
            Progress::Learner => P::Learner,
            Progress::Voter => P::Voter,
        }
    }
}

/// The node's IP address as it reported it, if it did.
pub(crate) fn reported_address(entry: &NodeEntry) -> Option<IpAddr> {
    entry
        .node
        .status
        .as_ref()
        .and_then(|s| s.external_address.parse().ok())
}

impl Cluster {
    /// The progress of every node in `entries` that holds the
    /// ConsensusMember role.
    pub async fn consensus_progress(
        &self,
        entries: &[NodeEntry],
    ) -> Result<HashMap<String, Progress>, CuratorError> {
        let holders = entries.iter().filter_map(|e| {
            let role = e.node.roles.as_ref()?.consensus_member.as_ref()?;
            Some((e, role))
        });
        let Some(consensus) = self.consensus() else {
            // The embedded store's member is the node whose store it is;
            // everyone else waits for the move to etcd.
            return Ok(holders
                .map(|(e, _)| {
                    let p = if self.holds_consensus_state(e) {
                        Progress::Voter
                    } else {
                        Progress::Pending
                    };
                    (e.id.clone(), p)
                })
                .collect());
        };
        let members = consensus.members().await?;
        Ok(holders
            .map(|(e, role)| {
                let p = match members::member_of(&members, e) {
                    _ if role.peer_certificate.is_empty() => Progress::Pending,
                    None => Progress::Pending,
                    Some(m) if m.is_learner => Progress::Learner,
                    Some(_) => Progress::Voter,
                };
                (e.id.clone(), p)
            })
            .collect())
    }

    /// The consensus store's state, for Curator.GetConsensusStatus:
    /// upstream's member list, and our details in fields 1000 and up.
    pub async fn consensus_status(&self) -> Result<GetConsensusStatusResponse, CuratorError> {
        use get_consensus_status_response::{EtcdMember, etcd_member::Status};
        let Some(consensus) = self.consensus() else {
            // The embedded store has one member, the node serving it: this
            // curator's own (a curator on the embedded store is alone).
            let me = match self.node_id() {
                Some(id) => Some(id.to_string()),
                None => self.embedded_member().await?,
            };
            return Ok(GetConsensusStatusResponse {
                etcd_member: me
                    .into_iter()
                    .map(|id| EtcdMember {
                        id,
                        status: Status::Full as i32,
                    })
                    .collect(),
                backend: ConsensusBackend::Embedded as i32,
                revision: self.store().revision().await?,
                ..Default::default()
            });
        };
        let members = consensus.members().await?;
        let status = consensus.status().await?;
        Ok(GetConsensusStatusResponse {
            etcd_member: members
                .iter()
                .map(|m| EtcdMember {
                    id: m.name.clone(),
                    status: if m.is_learner {
                        Status::Learner
                    } else {
                        Status::Full
                    } as i32,
                })
                .collect(),
            backend: ConsensusBackend::Etcd as i32,
            members: members
                .into_iter()
                .map(|m| ConsensusMember {
                    id: m.id,
                    name: m.name,
                    peer_urls: m.peer_urls,
                    is_learner: m.is_learner,
                })
                .collect(),
            raft_leader_id: status.leader_id,
            raft_term: status.raft_term,
            revision: status.revision,
        })
    }

    /// The node whose embedded store this is: the one its etcd host names,
    /// or else the only node with the ConsensusMember role.
    async fn embedded_member(&self) -> Result<Option<String>, CuratorError> {
        if let Some(host) = self.etcd_host() {
            return Ok(Some(host.node_id().to_string()));
        }
        let mut members = self
            .nodes()
            .await?
            .into_iter()
            .filter(|e| crate::state::is_consensus_member(&e.node));
        Ok(match (members.next(), members.next()) {
            (Some(only), None) => Some(only.id),
            _ => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn consensus_status_fills_upstream_members_and_our_details() {
        use get_consensus_status_response::etcd_member::Status;
        let t = crate::state::test_support::bootstrapped().await;
        let s = t.cluster.consensus_status().await.expect("status");
        assert!(s.revision > 0);
        match t.cluster.consensus() {
            None => {
                assert_eq!(s.backend, ConsensusBackend::Embedded as i32);
                assert_eq!(s.etcd_member.len(), 1, "{s:?}");
                assert_eq!(s.etcd_member[0].id, t.first_id);
                assert_eq!(s.etcd_member[0].status, Status::Full as i32);
                assert!(s.members.is_empty());
            }
            Some(_) => {
                assert_eq!(s.backend, ConsensusBackend::Etcd as i32);
                assert!(!s.members.is_empty());
                assert_eq!(s.etcd_member.len(), s.members.len());
                for (up, ours) in s.etcd_member.iter().zip(&s.members) {
                    assert_eq!(up.id, ours.name);
                    let want = if ours.is_learner {
                        Status::Learner
                    } else {
                        Status::Full
                    };
                    assert_eq!(up.status, want as i32);
                }
            }
        }
    }

    #[test]
    fn peer_urls_bracket_ipv6() {
        assert_eq!(
            peer_url("127.0.0.2".parse().unwrap()),
            "https://127.0.0.2:7834"
        );
        assert_eq!(peer_url("::1".parse().unwrap()), "https://[::1]:7834");
        assert_eq!(
            peer_url_on("fd00::1".parse().unwrap(), 1234),
            "https://[fd00::1]:1234"
        );
    }
}

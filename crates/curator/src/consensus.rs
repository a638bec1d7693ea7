//! Consensus membership: the ConsensusMember role on an etcd-backed cluster.
//!
//! Giving a node the role adds it to etcd as a *learner* first (a learner
//! replicates but does not vote, so a slow or failing newcomer can never cost
//! the cluster its quorum) and hands the node, in its role, what it needs to
//! start etcd: a peer certificate for its address, the CA, and the current
//! peers. The leader promotes learners to voters once etcd says they have
//! caught up ([`promote_learners`]). Removing the role removes the etcd
//! member first, and only if the remaining voters keep a healthy quorum. The
//! leading curator cannot remove its own member (its store would vanish
//! mid-call): it steps down and answers UNAVAILABLE, and the retried call
//! reaches a new leader that can.
//!
//! On the embedded store there is exactly one member and no way to add
//! another: such a change is refused with the way to get HA.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use metropolis_api::admin::{ConsensusBackend, ConsensusMember};
use metropolis_api::common::node_roles;
use metropolis_api::curator::{GetConsensusStatusResponse, get_consensus_status_response};
use metropolis_store::{Consensus, Member};

use crate::error::CuratorError;
use crate::state::{Cluster, NodeEntry};

/// Port of etcd's peer traffic on every consensus member.
pub const PEER_PORT: u16 = 7834;

/// How long a leader that stepped down to have its own member removed stays
/// out of elections: enough for another member to win and the caller to
/// retry there. If nobody retries, it campaigns again afterwards.
const STEP_DOWN_ABSTAIN: Duration = Duration::from_secs(10);

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
}

/// The node running this curator is alive, whatever its heartbeats say (a
/// new leader has not heard its own node's yet).
struct SelfIsLive<'a> {
    me: Option<&'a str>,
    others: &'a dyn Liveness,
}

impl Liveness for SelfIsLive<'_> {
    fn is_live(&self, node_id: &str) -> Option<bool> {
        if self.me == Some(node_id) {
            return Some(true);
        }
        self.others.is_live(node_id)
    }
}

const EMBEDDED_REFUSAL: &str = "this cluster keeps its state in the embedded store of its single consensus \
     member, which cannot be replicated: a second ConsensusMember is not possible. For high availability, \
     bootstrap a cluster on etcd (`metroctl install params --bootstrap --ha`)";

impl Cluster {
    /// The role content for a node joining the consensus: the node becomes
    /// an etcd learner here, before its record says so, so that when it sees
    /// the role the cluster already expects it.
    pub(crate) async fn admit_consensus_member(
        &self,
        entry: &NodeEntry,
    ) -> Result<node_roles::ConsensusMember, CuratorError> {
        let consensus = self
            .consensus()
            .ok_or_else(|| CuratorError::FailedPrecondition(EMBEDDED_REFUSAL.into()))?;
        let address: IpAddr = entry
            .node
            .status
            .as_ref()
            .and_then(|s| s.external_address.parse().ok())
            .ok_or_else(|| {
                CuratorError::FailedPrecondition(format!(
                    "node {} has not reported an IP address yet; wait until it is UP and heartbeating",
                    entry.id
                ))
            })?;
        let public_key: [u8; 32] = entry
            .node
            .public_key
            .as_slice()
            .try_into()
            .map_err(|_| CuratorError::Corrupt(format!("node {}: bad public key", entry.id)))?;
        let peer_certificate = self
            .ca()
            .issue_peer_certificate(&public_key, address)
            .map_err(|e| CuratorError::Internal(format!("issuing a peer certificate: {e}")))?;
        let url = peer_url(address);
        let added = add_learner_patiently(consensus.as_ref(), &url).await?;
        tracing::info!(node = %entry.id, member = added.id, %url, "added etcd learner");
        let peers = consensus
            .members()
            .await?
            .into_iter()
            .filter_map(|m| {
                let name = if m.id == added.id {
                    entry.id.clone()
                } else if m.name.is_empty() {
                    // Not started yet: etcd's initial cluster lists started
                    // members only.
                    return None;
                } else {
                    m.name
                };
                Some(node_roles::consensus_member::Peer {
                    name,
                    url: m.peer_urls.into_iter().next()?,
                })
            })
            .collect();
        Ok(node_roles::ConsensusMember {
            ca_certificate: self.ca().cert_der().to_vec(),
            peer_certificate,
            initial_crl: Vec::new(),
            peers,
        })
    }

    /// Removes a node's etcd member, unless that would cost the cluster its
    /// quorum or this curator its own store.
    pub(crate) async fn retire_consensus_member(
        &self,
        entry: &NodeEntry,
        live: &dyn Liveness,
    ) -> Result<(), CuratorError> {
        let Some(consensus) = self.consensus() else {
            return Ok(());
        };
        let address = entry
            .node
            .status
            .as_ref()
            .and_then(|s| s.external_address.parse::<IpAddr>().ok());
        let members = consensus.members().await?;
        let target = members.iter().find(|m| {
            m.name == entry.id || address.is_some_and(|a| m.peer_urls.contains(&peer_url(a)))
        });
        if let Some(target) = target
            && !target.is_learner
        {
            let live = SelfIsLive {
                me: self.node_id(),
                others: live,
            };
            check_quorum_after_removal(&members, target, &live)?;
        }
        if self.node_id() == Some(entry.id.as_str()) {
            // This curator's store is that member: removing it would cut the
            // ground from under the rest of this call. Hand over instead; the
            // next leader is another member and can do it.
            self.step_down().request(STEP_DOWN_ABSTAIN);
            return Err(CuratorError::Unavailable(format!(
                "node {} runs the leading curator, whose store is the etcd member to remove: it has \
                 stepped down so that another consensus member leads; retry, and the new leader \
                 removes it",
                entry.id
            )));
        }
        let Some(target) = target else {
            return Ok(());
        };
        consensus.remove(target.id).await?;
        tracing::info!(node = %entry.id, member = target.id, "removed etcd member");
        Ok(())
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
                None => self.sole_member().await?,
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

    /// The one node with the ConsensusMember role (the embedded store's
    /// holder), if there is exactly one.
    async fn sole_member(&self) -> Result<Option<String>, CuratorError> {
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

/// etcd refuses membership changes ("unhealthy cluster") until every voter
/// has been connected for 5 s, e.g. right after a bootstrap or a member's
/// restart. Wait that out here rather than fail the operator's call.
async fn add_learner_patiently(
    consensus: &dyn Consensus,
    url: &str,
) -> Result<Member, CuratorError> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match consensus.add_learner(url).await {
            Err(e)
                if e.to_string().contains("unhealthy cluster")
                    && std::time::Instant::now() < deadline =>
            {
                tracing::debug!(error = %e, "etcd not ready for a membership change yet");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) if e.to_string().contains("unhealthy cluster") => {
                return Err(CuratorError::FailedPrecondition(format!(
                    "etcd refuses membership changes while not every member has been connected for 5 s \
                     ({e}); check that all consensus members are up (metroctl cluster status), then retry"
                )));
            }
            other => return Ok(other?),
        }
    }
}

/// Refuses to remove `target` (a voter) when the voters left behind would
/// not have a majority of healthy members.
fn check_quorum_after_removal(
    members: &[Member],
    target: &Member,
    live: &dyn Liveness,
) -> Result<(), CuratorError> {
    let remaining: Vec<&Member> = members
        .iter()
        .filter(|m| !m.is_learner && m.id != target.id)
        .collect();
    if remaining.is_empty() {
        return Err(CuratorError::FailedPrecondition(format!(
            "removing consensus member {} would leave no voting member: give another node the \
             ConsensusMember role first, wait until it is a voter (`metroctl cluster status`), then \
             retry",
            target.name
        )));
    }
    let quorum = remaining.len() / 2 + 1;
    let label = |m: &Member| {
        if m.name.is_empty() {
            m.peer_urls.join(",")
        } else {
            m.name.clone()
        }
    };
    let liveness = |m: &Member| match m.name.as_str() {
        // A member that never started has no node to ask about.
        "" => Some(false),
        name => live.is_live(name),
    };
    let down: Vec<String> = remaining
        .iter()
        .filter(|m| liveness(m) != Some(true))
        .map(|m| label(m))
        .collect();
    let up = remaining.len() - down.len();
    if up >= quorum {
        return Ok(());
    }
    let unknown: Vec<String> = remaining
        .iter()
        .filter(|m| liveness(m).is_none())
        .map(|m| label(m))
        .collect();
    if up + unknown.len() >= quorum {
        // Not known yet is not known to be down: a new leader learns within
        // one heartbeat timeout, so the same call can succeed shortly.
        return Err(CuratorError::Unavailable(format!(
            "removing consensus member {} needs {quorum} healthy members to remain, and the health \
             of {} is not known yet (this curator leads since less than a heartbeat timeout); retry \
             in a few seconds",
            target.name,
            unknown.join(", "),
        )));
    }
    Err(CuratorError::FailedPrecondition(format!(
        "removing consensus member {} would lose quorum: of the {} members that would remain, {} ({}) {} \
         not known to be healthy, leaving {up}, fewer than the quorum of {quorum}. Bring {} back (or remove \
         {} first), then retry",
        target.name,
        remaining.len(),
        down.len(),
        down.join(", "),
        if down.len() == 1 { "is" } else { "are" },
        if down.len() == 1 { "it" } else { "them" },
        if down.len() == 1 { "it" } else { "them" },
    )))
}

/// Promotes etcd learners to voters once they have caught up. Runs on the
/// leader for as long as it leads.
pub async fn promote_learners(consensus: Arc<dyn Consensus>) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let members = match consensus.members().await {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(error = %e, "listing etcd members");
                continue;
            }
        };
        // A learner that never started has nothing to catch up with.
        for m in members
            .iter()
            .filter(|m| m.is_learner && !m.name.is_empty())
        {
            match consensus.promote(m.id).await {
                Ok(true) => {
                    tracing::info!(node = %m.name, member = m.id, "promoted etcd learner to voter")
                }
                Ok(false) => tracing::debug!(node = %m.name, "etcd learner still catching up"),
                Err(e) => tracing::warn!(node = %m.name, error = %e, "promoting etcd learner"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct Live(HashMap<&'static str, Option<bool>>);
    impl Liveness for Live {
        fn is_live(&self, id: &str) -> Option<bool> {
            self.0.get(id).copied().flatten()
        }
    }

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

    fn member(id: u64, name: &str, learner: bool) -> Member {
        Member {
            id,
            name: name.into(),
            peer_urls: vec![format!("https://127.0.0.{id}:7834")],
            is_learner: learner,
        }
    }

    #[test]
    fn removal_keeps_a_healthy_quorum() {
        let members = [
            member(1, "a", false),
            member(2, "b", false),
            member(3, "c", false),
            member(4, "d", true),
        ];
        let all_up = Live(HashMap::from([
            ("a", Some(true)),
            ("b", Some(true)),
            ("c", Some(true)),
        ]));
        assert!(check_quorum_after_removal(&members, &members[2], &all_up).is_ok());
        // b is down: removing c would leave {a, b} with only a running.
        let b_down = Live(HashMap::from([
            ("a", Some(true)),
            ("b", Some(false)),
            ("c", Some(true)),
        ]));
        let err = check_quorum_after_removal(&members, &members[2], &b_down).expect_err("refused");
        let msg = err.to_string();
        assert!(
            msg.contains("would lose quorum") && msg.contains("(b) is"),
            "{msg}"
        );
        // Removing the member that is down is how one repairs that.
        assert!(check_quorum_after_removal(&members, &members[1], &b_down).is_ok());
        // Unknown health (a fresh leader): not now, but maybe in a moment.
        let unknown = Live(HashMap::from([
            ("a", Some(true)),
            ("b", None),
            ("c", Some(true)),
        ]));
        let err = check_quorum_after_removal(&members, &members[2], &unknown).expect_err("refused");
        assert!(
            matches!(err, CuratorError::Unavailable(ref m) if m.contains("not known yet")),
            "{err}"
        );
        // ... while one known to be down is not worth a retry.
        let b_down_c_unknown = Live(HashMap::from([
            ("a", Some(true)),
            ("b", Some(false)),
            ("c", None),
        ]));
        let err = check_quorum_after_removal(&members, &members[0], &b_down_c_unknown)
            .expect_err("refused");
        assert!(matches!(err, CuratorError::FailedPrecondition(_)), "{err}");
        // Learners neither count nor vote.
        let two = [
            member(1, "a", false),
            member(2, "b", false),
            member(3, "c", true),
        ];
        assert!(check_quorum_after_removal(&two, &two[1], &all_up).is_ok());
        // The last voter, with only a learner beside it.
        let err = check_quorum_after_removal(&two[1..], &two[1], &all_up).expect_err("refused");
        assert!(err.to_string().contains("no voting member"), "{err}");
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

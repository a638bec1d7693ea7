//! Consensus membership on etcd: the ConsensusMember role records made real.
//!
//! [`reconcile_once`], run every second by the leading curator
//! ([`reconcile`]), compares the role records with etcd's member list and
//! takes one step towards them:
//!
//! - an etcd member no role record accounts for is removed (a voter only if
//!   the voters left keep a healthy quorum; the leader's own member by
//!   stepping down, so that another leader can);
//! - learners that have caught up are promoted to voters;
//! - with no learner left, the next role holder without an etcd member
//!   (pending, or dropped from etcd) is admitted: etcd adds it as a learner,
//!   then its record gets what it needs to start etcd (a peer certificate
//!   from the consensus CA, the CA, the CRL, the peers). A learner first:
//!   it replicates but does not vote, so a slow or failing newcomer cannot
//!   cost the cluster its quorum, and etcd admits one learner at a time;
//! - raft leadership is kept off this curator's node, so that losing the
//!   curator leader's node costs one election (the curator's lease), not
//!   two (raft's, which also renews every lease, then the lease).
//!
//! Every step is decided afresh from the records and etcd, so a leader that
//! crashes half-way is simply continued by the next one. Removing a role is
//! not left to the reconciler: `update_roles` removes the etcd member first
//! (refusing when quorum would be lost), then the role, so that a member
//! never stops while it still counts towards the quorum.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use metropolis_api::common::node_roles;
use metropolis_store::{Compare, Consensus, Member, Op, Txn};
use prost::Message;

use super::pki::ConsensusPki;
use super::{Liveness, SelfIsLive, peer_url, reported_address};
use crate::error::CuratorError;
use crate::state::{Cluster, NodeEntry, node_key};

/// How often the reconciler looks, when nothing wakes it earlier.
const RECONCILE_INTERVAL: Duration = Duration::from_secs(1);

/// How long a leader that stepped down to have its own member removed stays
/// out of elections: enough for another member to win and the caller to
/// retry there. If nobody retries, it campaigns again afterwards.
const STEP_DOWN_ABSTAIN: Duration = Duration::from_secs(10);

/// The etcd member of a node: by name once it has started, by peer URL
/// before.
pub(crate) fn member_of<'a>(members: &'a [Member], entry: &NodeEntry) -> Option<&'a Member> {
    let url = reported_address(entry).map(peer_url);
    members
        .iter()
        .find(|m| m.name == entry.id || url.as_ref().is_some_and(|u| m.peer_urls.contains(u)))
}

fn label(m: &Member) -> String {
    if m.name.is_empty() {
        m.peer_urls.join(",")
    } else {
        m.name.clone()
    }
}

impl Cluster {
    /// Removes a node's etcd member, unless that would cost the cluster its
    /// quorum or this curator its own store. Called before the role goes
    /// from the record.
    pub(crate) async fn retire_consensus_member(
        &self,
        entry: &NodeEntry,
        live: &dyn Liveness,
    ) -> Result<(), CuratorError> {
        let Some(consensus) = self.consensus() else {
            return Ok(());
        };
        let members = consensus.members().await?;
        let target = member_of(&members, entry);
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
}

/// What one pass of the reconciler did or waits for.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Pass {
    /// etcd members removed because no role record accounts for them.
    pub removed: Vec<String>,
    /// Learners promoted to voters.
    pub promoted: Vec<String>,
    /// The node added as a learner.
    pub admitted: Option<String>,
    /// A learner still catching up: nobody else is admitted until it is
    /// promoted.
    pub catching_up: Option<String>,
    /// Role holders waiting for their turn.
    pub pending: Vec<String>,
    /// Raft leadership handed to this etcd member, away from this node.
    pub moved_raft_leader: Option<u64>,
    /// The cluster state moved to etcd on this pass (embedded store only);
    /// the node restarts its curator on etcd.
    pub migrated: bool,
}

impl Pass {
    fn did_something(&self) -> bool {
        !self.removed.is_empty()
            || !self.promoted.is_empty()
            || self.admitted.is_some()
            || self.moved_raft_leader.is_some()
            || self.migrated
    }
}

/// How often an error that lasts is logged again.
const REPEAT_WARNING: Duration = Duration::from_secs(30);

/// Runs [`reconcile_once`] every second (or when a role change asks) for as
/// long as the task runs: the node runs it while its curator leads.
pub async fn reconcile(cluster: Arc<Cluster>, live: Arc<dyn Liveness>) {
    let mut last_error = String::new();
    let mut warned = std::time::Instant::now();
    loop {
        match reconcile_once(&cluster, live.as_ref()).await {
            Ok(pass) => {
                last_error.clear();
                if pass.did_something() {
                    tracing::info!(?pass, "consensus membership reconciled");
                }
                if pass.migrated {
                    // The node restarts on etcd; this curator's store is the
                    // pre-migration copy now, and reads only.
                    return;
                }
            }
            Err(e) => {
                // Say it once, not every second; again now and then while it
                // lasts, so that a stuck reconciler shows in the log.
                let msg = e.to_string();
                if msg != last_error || warned.elapsed() >= REPEAT_WARNING {
                    tracing::warn!(error = %msg, "reconciling consensus membership");
                    last_error = msg;
                    warned = std::time::Instant::now();
                } else {
                    tracing::debug!(error = %msg, "reconciling consensus membership");
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(RECONCILE_INTERVAL) => {}
            () = cluster.membership_changed().notified() => {}
        }
    }
}

/// One step of making etcd's membership match the role records (see the
/// module documentation). On the embedded store, a pending member moves the
/// cluster to etcd.
pub async fn reconcile_once(cluster: &Cluster, live: &dyn Liveness) -> Result<Pass, CuratorError> {
    let _serialized = cluster.membership_lock().lock().await;
    let Some(consensus) = cluster.consensus() else {
        return cluster.migrate_if_wanted().await;
    };
    let live = SelfIsLive {
        me: cluster.node_id(),
        others: live,
    };
    let mut pass = Pass::default();
    let nodes = cluster.nodes().await?;
    let holders: Vec<(&NodeEntry, &node_roles::ConsensusMember)> = nodes
        .iter()
        .filter_map(|e| Some((e, e.node.roles.as_ref()?.consensus_member.as_ref()?)))
        .collect();
    let mut members = consensus.members().await?;

    // Members nobody holds the role for.
    let strays: Vec<Member> = members
        .iter()
        .filter(|m| {
            !holders
                .iter()
                .any(|(e, _)| member_of(std::slice::from_ref(m), e).is_some())
        })
        .cloned()
        .collect();
    for m in &strays {
        if cluster.node_id() == Some(m.name.as_str()) {
            tracing::warn!(
                "this curator's own etcd member has no ConsensusMember role; stepping down so that \
                 another leader removes it"
            );
            cluster.step_down().request(STEP_DOWN_ABSTAIN);
            return Ok(pass);
        }
        if !m.is_learner
            && let Err(e) = check_quorum_after_removal(&members, m, &live)
        {
            tracing::warn!(member = %label(m), error = %e, "etcd member without a ConsensusMember role kept for now");
            continue;
        }
        consensus.remove(m.id).await?;
        tracing::info!(member = %label(m), id = m.id, "removed etcd member without a ConsensusMember role");
        pass.removed.push(label(m));
    }
    members.retain(|m| !pass.removed.contains(&label(m)));

    // Learners: promote the ones in sync; drop the ones whose node is gone
    // (their role is admitted again once the node is back).
    for m in members.iter().filter(|m| m.is_learner) {
        let holder = holders
            .iter()
            .find(|(e, _)| member_of(std::slice::from_ref(m), e).is_some());
        let Some((entry, role)) = holder else {
            continue;
        };
        if role.peer_certificate.is_empty() {
            // Added, but its record never got what it needs to start (the
            // leader stopped in between): it is admitted again below.
            continue;
        }
        if live.is_live(&entry.id) == Some(false) {
            consensus.remove(m.id).await?;
            tracing::info!(node = %entry.id, "removed the etcd learner of a node that is down");
            pass.removed.push(label(m));
            continue;
        }
        // A learner that never started has nothing to catch up with.
        if !m.name.is_empty() && consensus.promote(m.id).await? {
            tracing::info!(node = %entry.id, member = m.id, "promoted etcd learner to voter");
            pass.promoted.push(entry.id.clone());
        } else {
            pass.catching_up = Some(entry.id.clone());
        }
    }

    // Admission, one at a time, in node ID order.
    let mut waiting: Vec<&(&NodeEntry, &node_roles::ConsensusMember)> = holders
        .iter()
        .filter(|(e, role)| {
            role.peer_certificate.is_empty()
                || member_of(&members, e).is_none_or(|m| pass.removed.contains(&label(m)))
        })
        .collect();
    // One that etcd has as a learner already goes first: etcd takes no
    // second learner.
    waiting.sort_by_key(|(e, _)| member_of(&members, e).is_none_or(|m| !m.is_learner));
    pass.pending = waiting.iter().map(|(e, _)| e.id.clone()).collect();
    if pass.catching_up.is_none() {
        // A node that is not known to be up would be a learner that never
        // starts, and would keep everyone else waiting.
        if let Some((entry, role)) = waiting
            .iter()
            .find(|(e, _)| live.is_live(&e.id) == Some(true))
        {
            admit(cluster, consensus.as_ref(), entry, role).await?;
            pass.pending.retain(|id| *id != entry.id);
            pass.admitted = Some(entry.id.clone());
        }
    }

    pass.moved_raft_leader =
        keep_raft_leader_elsewhere(consensus.as_ref(), &members, &nodes, &live)
            .await
            .unwrap_or_else(|e| {
                tracing::debug!(error = %e, "moving raft leadership");
                None
            });
    Ok(pass)
}

/// Makes `entry` an etcd learner and writes what it needs to start etcd into
/// its role. A node admitted before (its member was dropped) gets a new peer
/// certificate, and the old one is revoked.
async fn admit(
    cluster: &Cluster,
    consensus: &dyn Consensus,
    entry: &NodeEntry,
    role: &node_roles::ConsensusMember,
) -> Result<(), CuratorError> {
    let address: IpAddr = reported_address(entry).ok_or_else(|| {
        CuratorError::FailedPrecondition(format!(
            "node {} has not reported an IP address; it is admitted to etcd once it has",
            entry.id
        ))
    })?;
    let public_key: [u8; 32] = entry
        .node
        .public_key
        .as_slice()
        .try_into()
        .map_err(|_| CuratorError::Corrupt(format!("node {}: bad public key", entry.id)))?;
    let mut pki = cluster.consensus_pki_or_new().await?;
    pki.revoke(&entry.id, &role.peer_certificate);
    let lifetime = cluster.lifetimes().await?.node;
    let peer_certificate = pki.issue_peer_certificate(&public_key, address, lifetime)?;
    let url = peer_url(address);
    let added = consensus.add_learner(&url).await?;
    tracing::info!(node = %entry.id, member = added.id, %url, "added etcd learner");
    let new_role = admitted_role(consensus, &pki, &entry.id, added.id, peer_certificate).await?;
    let mut node = entry.node.clone();
    node.roles
        .get_or_insert_with(Default::default)
        .consensus_member = Some(new_role);
    let (pki_compare, pki_ops) = pki.write()?;
    let key = node_key(&entry.id);
    let mut txn = Txn::new()
        .when(Compare::mod_revision(key.clone(), entry.mod_revision))
        .when(pki_compare)
        .and_then(Op::put(key, node.encode_to_vec()));
    for op in pki_ops {
        txn = txn.and_then(op);
    }
    let resp = cluster.commit(txn).await?;
    if resp.succeeded {
        cluster.node_written(&entry.id, resp.revision, Some(&node));
    } else {
        // The role changed meanwhile (taken away?): the next pass decides
        // again, and removes the learner if nobody holds the role any more.
        return Err(CuratorError::Unavailable(format!(
            "node {} changed while being admitted to etcd; trying again",
            entry.id
        )));
    }
    Ok(())
}

/// The ConsensusMember role of a node etcd knows as member `member_id`.
pub(crate) async fn admitted_role(
    consensus: &dyn Consensus,
    pki: &ConsensusPki,
    node_id: &str,
    member_id: u64,
    peer_certificate: Vec<u8>,
) -> Result<node_roles::ConsensusMember, CuratorError> {
    let peers = consensus
        .members()
        .await?
        .into_iter()
        .filter_map(|m| {
            let name = if m.id == member_id {
                node_id.to_string()
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
        ca_certificate: pki.ca_certificate().to_vec(),
        peer_certificate,
        initial_crl: pki.crl()?,
        peers,
    })
}

/// If this node's etcd member leads raft, hands leadership to a voter whose
/// node is live. Returns the member it went to.
async fn keep_raft_leader_elsewhere(
    consensus: &dyn Consensus,
    members: &[Member],
    nodes: &[NodeEntry],
    live: &dyn Liveness,
) -> Result<Option<u64>, CuratorError> {
    let status = consensus.status().await?;
    if status.leader_id == 0 || status.leader_id != status.member_id {
        return Ok(None);
    }
    let Some(to) = raft_leader_target(members, nodes, status.member_id, live) else {
        tracing::debug!(
            "etcd's raft leader is on the curator leader's node, and no other voter is known to be live"
        );
        return Ok(None);
    };
    consensus.move_leader(to.id).await?;
    tracing::info!(to = %to.name, "moved etcd raft leadership away from the curator leader's node");
    Ok(Some(to.id))
}

/// The voter to hand etcd's raft leadership to: another live voter that is
/// a node of this cluster, the one heard from most recently (a beat seconds
/// old is likelier to be from a member about to stop answering); members
/// never heard from since this curator leads come last.
fn raft_leader_target<'a>(
    members: &'a [Member],
    nodes: &[NodeEntry],
    me: u64,
    live: &dyn Liveness,
) -> Option<&'a Member> {
    members
        .iter()
        .filter(|m| {
            m.id != me
                && !m.is_learner
                && nodes.iter().any(|e| e.id == m.name)
                && live.is_live(&m.name) == Some(true)
        })
        .min_by_key(|m| live.last_heard(&m.name).unwrap_or(std::time::Duration::MAX))
}

/// Refuses to remove `target` (a voter) when the voters left behind would
/// not have a majority of healthy members.
pub(crate) fn check_quorum_after_removal(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::test_support::{ALL_LIVE, cluster_with_worker, set};
    use metropolis_api::common::NodeStatus;
    use std::collections::HashMap;

    /// Drift, on a real etcd: a member without a role goes, a learner added
    /// by a leader that stopped before writing the record is adopted, and a
    /// role whose member etcd dropped is admitted again with a new
    /// certificate (the old one revoked).
    #[tokio::test]
    async fn drift_is_repaired_from_the_records() {
        let (_d, c, _first, id, key) = cluster_with_worker().await;
        let Some(consensus) = c.consensus().cloned() else {
            // Membership drift is etcd's (METROPOLIS_TEST_STORE=etcd).
            return;
        };
        c.approve_node(&id).await.expect("approve");
        c.commit_node(key).await.expect("commit");
        c.update_status(
            &id,
            NodeStatus {
                external_address: "127.0.0.9".into(),
                ..Default::default()
            },
        )
        .await
        .expect("status");

        // A member nobody holds the role for (a learner: no quorum at stake).
        consensus
            .add_learner("https://127.0.0.77:7834")
            .await
            .expect("stray learner");
        let pass = reconcile_once(&c, &ALL_LIVE).await.expect("reconcile");
        assert_eq!(pass.removed, ["https://127.0.0.77:7834"], "{pass:?}");
        assert_eq!(consensus.members().await.expect("members").len(), 1);

        // The leader added the learner, then stopped before the record said
        // so: the role is pending, the learner there; the next pass adopts it
        // (etcd would refuse a second learner).
        c.update_roles(&id, set(None, None, Some(true)), &ALL_LIVE)
            .await
            .expect("role");
        let added = consensus
            .add_learner("https://127.0.0.9:7834")
            .await
            .expect("learner");
        let pass = reconcile_once(&c, &ALL_LIVE).await.expect("reconcile");
        assert_eq!(pass.admitted.as_deref(), Some(id.as_str()), "{pass:?}");
        let members = consensus.members().await.expect("members");
        assert_eq!(members.len(), 2, "{members:?}");
        assert!(members.iter().any(|m| m.id == added.id));
        let role = || async {
            c.node(&id)
                .await
                .expect("read")
                .expect("node")
                .node
                .roles
                .and_then(|r| r.consensus_member)
                .expect("role")
        };
        let first_cert = role().await.peer_certificate;
        assert!(!first_cert.is_empty());

        // etcd drops the member (an operator with etcdctl, say): the role is
        // admitted again, with a new certificate, the old one revoked.
        consensus.remove(added.id).await.expect("drop");
        // etcd may take a moment to settle the removal (UNAVAILABLE): the
        // reconciler tries again on its next pass.
        let mut tries = 0;
        let pass = loop {
            match reconcile_once(&c, &ALL_LIVE).await {
                Ok(pass) => break pass,
                Err(CuratorError::Store(metropolis_store::StoreError::Unavailable(e)))
                    if tries < 10 =>
                {
                    eprintln!("reconcile: {e}");
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                Err(e) => panic!("reconcile: {e}"),
            }
        };
        assert_eq!(pass.admitted.as_deref(), Some(id.as_str()), "{pass:?}");
        let second_cert = role().await.peer_certificate;
        assert_ne!(second_cert, first_cert);
        let pki = c.consensus_pki().await.expect("pki").expect("pki");
        let serial = |der: &[u8]| {
            metropolis_identity::parse_certificate(der)
                .expect("cert")
                .serial
        };
        assert!(pki.is_revoked(&serial(&first_cert)));
        assert!(!pki.is_revoked(&serial(&second_cert)));
        assert_eq!(consensus.members().await.expect("members").len(), 2);
    }

    struct Live(HashMap<&'static str, Option<bool>>);
    impl Liveness for Live {
        fn is_live(&self, id: &str) -> Option<bool> {
            self.0.get(id).copied().flatten()
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

    struct Heard(HashMap<&'static str, (Option<bool>, Option<u64>)>);
    impl Liveness for Heard {
        fn is_live(&self, id: &str) -> Option<bool> {
            self.0.get(id).and_then(|h| h.0)
        }
        fn last_heard(&self, id: &str) -> Option<std::time::Duration> {
            self.0
                .get(id)
                .and_then(|h| h.1)
                .map(std::time::Duration::from_millis)
        }
    }

    #[test]
    fn raft_leadership_goes_to_the_freshest_live_voter() {
        let members = [
            member(1, "me", false),
            member(2, "stale", false),
            member(3, "fresh", false),
            member(4, "learner", true),
            member(5, "down", false),
            member(6, "gone", false),
        ];
        let nodes: Vec<NodeEntry> = ["me", "stale", "fresh", "learner", "down"]
            .into_iter()
            .map(|id| NodeEntry {
                id: id.into(),
                node: Default::default(),
                mod_revision: 0,
            })
            .collect();
        let live = Heard(HashMap::from([
            ("me", (Some(true), Some(0))),
            ("stale", (Some(true), Some(3_000))),
            ("fresh", (Some(true), Some(200))),
            ("learner", (Some(true), Some(1))),
            ("down", (Some(false), Some(9_000))),
            // Live but not a node of this cluster any more.
            ("gone", (Some(true), Some(0))),
        ]));
        let to = raft_leader_target(&members, &nodes, 1, &live).map(|m| m.name.as_str());
        assert_eq!(to, Some("fresh"));
        // Not heard from since this curator leads: after any that was.
        let live = Heard(HashMap::from([
            ("stale", (Some(true), None)),
            ("fresh", (Some(true), Some(4_000))),
        ]));
        let to = raft_leader_target(&members, &nodes, 1, &live).map(|m| m.name.as_str());
        assert_eq!(to, Some("fresh"));
        let nobody = Heard(HashMap::from([("down", (Some(false), Some(0)))]));
        assert!(raft_leader_target(&members, &nodes, 1, &nobody).is_none());
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
}

//! Node roles (UpdateNodeRoles).

use super::*;
use metropolis_api::quote;

/// Requested role changes; `None` leaves a role as it is.
#[derive(Debug, Clone, Copy, Default)]
pub struct RoleChange {
    pub kubernetes_worker: Option<bool>,
    pub kubernetes_controller: Option<bool>,
    pub consensus_member: Option<bool>,
}

impl RoleChange {
    fn adds_any(&self) -> bool {
        [
            self.kubernetes_worker,
            self.kubernetes_controller,
            self.consensus_member,
        ]
        .contains(&Some(true))
    }
}

impl Cluster {
    /// Sets or clears roles. Controllers must be consensus members, roles go
    /// only to UP nodes, and the last consensus member keeps its role.
    ///
    /// On etcd, gaining ConsensusMember adds the node as an etcd learner and
    /// losing it removes its etcd member first (see `consensus`); `live`
    /// decides whether the remaining members keep a quorum.
    pub async fn update_roles(
        &self,
        id: &str,
        change: RoleChange,
        live: &dyn Liveness,
    ) -> Result<(), CuratorError> {
        for _ in 0..CAS_ATTEMPTS {
            // One key; the other nodes are read only when the consensus
            // rules need them (every node, in a large cluster, is a lot to
            // read for a worker role).
            let entry = &self
                .node(id)
                .await?
                .ok_or_else(|| CuratorError::NotFound(format!("node {} not found", quote(id))))?;
            let mut node = entry.node.clone();
            if change.adds_any() && node.state != NodeState::Up as i32 {
                return Err(CuratorError::FailedPrecondition(format!(
                    "node {id} is {}; roles can only be given to UP nodes",
                    state_name(node.state)
                )));
            }
            let roles = node.roles.get_or_insert_with(Default::default);
            let before = roles.clone();
            if let Some(on) = change.kubernetes_worker {
                roles.kubernetes_worker = on.then_some(node_roles::KubernetesWorker {});
            }
            if let Some(on) = change.kubernetes_controller {
                roles.kubernetes_controller = on.then_some(node_roles::KubernetesController {});
            }
            let joining_consensus =
                change.consensus_member == Some(true) && roles.consensus_member.is_none();
            if change.consensus_member == Some(false) {
                roles.consensus_member = None;
            }
            if roles.kubernetes_controller.is_some()
                && roles.consensus_member.is_none()
                && !joining_consensus
            {
                return Err(CuratorError::FailedPrecondition(
                    "a KubernetesController must also be a ConsensusMember: give the node both roles, \
                     or remove KubernetesController first"
                        .into(),
                ));
            }
            if *roles == before && !joining_consensus {
                return Ok(());
            }
            let losing_consensus =
                before.consensus_member.is_some() && roles.consensus_member.is_none();
            if joining_consensus {
                let role = self.admit_consensus_member(entry).await?;
                node.roles
                    .get_or_insert_with(Default::default)
                    .consensus_member = Some(role);
            }
            let key = node_key(id);
            let mut txn = Txn::new().when(Compare::mod_revision(key.clone(), entry.mod_revision));
            if losing_consensus {
                // Read after the node itself; the transaction compares every
                // revision read, so the order does not matter.
                let all = self.nodes().await?;
                let others: Vec<&NodeEntry> = all
                    .iter()
                    .filter(|e| e.id != id && is_consensus_member(&e.node))
                    .collect();
                if others.is_empty() {
                    return Err(CuratorError::FailedPrecondition(format!(
                        "node {id} is the last consensus member; removing its role would lose the cluster state. \
                         Give another node the ConsensusMember role first"
                    )));
                }
                // The other members must still be members when this commits,
                // so two concurrent removals cannot both succeed.
                for o in others {
                    txn = txn.when(Compare::mod_revision(node_key(&o.id), o.mod_revision));
                }
                self.retire_consensus_member(entry, live).await?;
            }
            let txn = txn.and_then(Op::put(key, node.encode_to_vec()));
            // Whatever the outcome, a remembered record of this node is
            // stale now (it would only cost update_node a failed attempt).
            let committed = self.commit(txn).await;
            self.recent_nodes().remove(id);
            match committed {
                Ok(resp) if resp.succeeded => {
                    self.node_written(id, resp.revision, Some(&node));
                    return Ok(());
                }
                Ok(_) => {}
                Err(e) => {
                    self.directory.invalidate();
                    return Err(e);
                }
            }
        }
        Err(CuratorError::Internal(format!(
            "node {id} kept changing; gave up"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::test_support::{ALL_LIVE, cluster_with_worker, set};

    #[tokio::test]
    async fn role_rules() {
        let (_d, c, first, id, key) = cluster_with_worker().await;
        // Not UP yet.
        let r = c
            .update_roles(&id, set(Some(true), None, None), &ALL_LIVE)
            .await;
        assert!(
            matches!(r, Err(CuratorError::FailedPrecondition(ref m)) if m.contains("UP")),
            "{r:?}"
        );
        c.approve_node(&id).await.expect("approve");
        c.commit_node(key).await.expect("commit");
        c.update_roles(&id, set(Some(true), None, None), &ALL_LIVE)
            .await
            .expect("worker");
        let r = c
            .update_roles(&id, set(None, Some(true), None), &ALL_LIVE)
            .await;
        assert!(
            matches!(r, Err(CuratorError::FailedPrecondition(ref m)) if m.contains("ConsensusMember")),
            "{r:?}"
        );
        if c.consensus().is_none() {
            // The embedded store has exactly one member, for good.
            let r = c
                .update_roles(&id, set(None, Some(true), Some(true)), &ALL_LIVE)
                .await;
            assert!(
                matches!(r, Err(CuratorError::FailedPrecondition(ref m)) if m.contains("--ha")),
                "{r:?}"
            );
        } else {
            consensus_member_on_etcd(&c, &first, &id).await;
        }
        // Unset fields change nothing.
        c.update_roles(&id, RoleChange::default(), &ALL_LIVE)
            .await
            .expect("no-op");
        let roles = c
            .node(&id)
            .await
            .expect("r")
            .expect("n")
            .node
            .roles
            .expect("roles");
        assert!(roles.kubernetes_worker.is_some() && roles.consensus_member.is_none());
        // The only member keeps its role.
        let r = c
            .update_roles(&first, set(None, None, Some(false)), &ALL_LIVE)
            .await;
        assert!(
            matches!(r, Err(CuratorError::FailedPrecondition(ref m)) if m.contains("last consensus member")),
            "{r:?}"
        );
        assert!(matches!(
            c.update_roles("metropolis-x", set(Some(true), None, None), &ALL_LIVE)
                .await,
            Err(CuratorError::NotFound(_))
        ));
    }

    /// On etcd the role makes the node a learner (its record carries what it
    /// needs to start etcd), and taking it away removes the member again.
    async fn consensus_member_on_etcd(c: &Cluster, first: &str, id: &str) {
        let consensus = c.consensus().expect("etcd").clone();
        let r = c
            .update_roles(id, set(None, None, Some(true)), &ALL_LIVE)
            .await;
        assert!(
            matches!(r, Err(CuratorError::FailedPrecondition(ref m)) if m.contains("IP address")),
            "{r:?}"
        );
        c.update_status(
            id,
            NodeStatus {
                external_address: "127.0.0.9".into(),
                ..Default::default()
            },
        )
        .await
        .expect("status");
        c.update_roles(id, set(None, None, Some(true)), &ALL_LIVE)
            .await
            .expect("consensus member");
        let consensus_role = |id: String| {
            let c = &c;
            async move {
                c.node(&id)
                    .await
                    .expect("read")
                    .expect("node")
                    .node
                    .roles
                    .and_then(|r| r.consensus_member)
            }
        };
        let role = consensus_role(id.to_string()).await.expect("role");
        assert_eq!(role.ca_certificate, c.ca().cert_der());
        let peer =
            metropolis_identity::parse_certificate(&role.peer_certificate).expect("peer cert");
        assert_eq!(peer.common_name, id);
        assert!(
            role.peers
                .iter()
                .any(|p| p.name == id && p.url == "https://127.0.0.9:7834"),
            "{role:?}"
        );
        let members = consensus.members().await.expect("members");
        assert!(
            members
                .iter()
                .any(|m| m.is_learner && m.peer_urls == ["https://127.0.0.9:7834"]),
            "{members:?}"
        );
        // The leading curator's own member: it steps down (another member
        // removes it when the call is retried there) and nothing changes.
        let r = c
            .update_roles(first, set(None, None, Some(false)), &ALL_LIVE)
            .await;
        assert!(
            matches!(r, Err(CuratorError::Unavailable(ref m)) if m.contains("stepped down")),
            "{r:?}"
        );
        assert!(c.step_down().abstaining());
        assert!(
            consensus_role(first.to_string()).await.is_some(),
            "the role stays until another leader removes the member"
        );
        c.update_roles(id, set(None, Some(false), Some(false)), &ALL_LIVE)
            .await
            .expect("leave the consensus");
        assert_eq!(consensus.members().await.expect("members").len(), 1);
    }
}

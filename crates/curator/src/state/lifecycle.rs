//! Decommissioning and deleting nodes, and their tombstones.

use super::*;
use metropolis_api::quote;

impl Cluster {
    /// Asks a node to decommission itself. Only nodes without roles; nodes
    /// that never came up are decommissioned at once (they hold nothing to
    /// wipe).
    pub async fn request_decommission(&self, id: &str) -> Result<(), CuratorError> {
        self.update_node(id, |node| {
            if has_roles(node) {
                return Err(CuratorError::FailedPrecondition(format!(
                    "node {id} still has roles; remove them first (metroctl node remove role ROLE {id})"
                )));
            }
            match NodeState::try_from(node.state) {
                Ok(NodeState::Up) if node.decommission_requested => Ok(Change::Keep(())),
                Ok(NodeState::Up) => {
                    node.decommission_requested = true;
                    Ok(Change::Write(()))
                }
                Ok(NodeState::New | NodeState::Standby) => {
                    node.state = NodeState::Decommissioned as i32;
                    Ok(Change::Write(()))
                }
                Ok(NodeState::Decommissioned) => Ok(Change::Keep(())),
                _ => Err(CuratorError::FailedPrecondition(format!("node {id} is in an unknown state"))),
            }
        })
        .await
    }

    /// The node wiped itself after a decommission request.
    pub async fn complete_decommission(&self, id: &str) -> Result<(), CuratorError> {
        self.update_node(id, |node| {
            if !node.decommission_requested {
                return Err(CuratorError::FailedPrecondition(format!(
                    "node {id} was not asked to decommission"
                )));
            }
            node.state = NodeState::Decommissioned as i32;
            Ok(Change::Write(()))
        })
        .await
    }

    /// Removes a node for good. By default only DECOMMISSIONED nodes without
    /// roles; the bypasses lift each rule. The last consensus member can
    /// never be deleted.
    pub async fn delete_node(
        &self,
        id: &str,
        bypass_roles: bool,
        bypass_state: bool,
        live: &dyn Liveness,
    ) -> Result<(), CuratorError> {
        let entry = &self
            .node(id)
            .await?
            .ok_or_else(|| CuratorError::NotFound(format!("node {} not found", quote(id))))?;
        if has_roles(&entry.node) && !bypass_roles {
            return Err(CuratorError::FailedPrecondition(format!(
                "node {id} still has roles; remove them first or set safety_bypass_has_roles"
            )));
        }
        if entry.node.state != NodeState::Decommissioned as i32 && !bypass_state {
            return Err(CuratorError::FailedPrecondition(format!(
                "node {id} is {}, not DECOMMISSIONED; decommission it first or set safety_bypass_not_decommissioned",
                state_name(entry.node.state)
            )));
        }
        let mut txn = Txn::new().when(Compare::mod_revision(node_key(id), entry.mod_revision));
        // Serialized with the reconciler, which acts on the same members.
        let _serialized = self.membership_lock().lock().await;
        if is_consensus_member(&entry.node) {
            // Only now every node: see update_roles.
            let all = self.nodes().await?;
            let others: Vec<&NodeEntry> = all
                .iter()
                .filter(|e| e.id != id && self.holds_consensus_state(e))
                .collect();
            if self.holds_consensus_state(entry) && others.is_empty() {
                return Err(CuratorError::FailedPrecondition(format!(
                    "node {id} is the last consensus member and holds the cluster state; it cannot be deleted"
                )));
            }
            for o in others {
                txn = txn.when(Compare::mod_revision(node_key(&o.id), o.mod_revision));
            }
            // A deleted node's etcd member would stay a voter nobody runs.
            self.retire_consensus_member(entry, live).await?;
            txn = self.revoke_peer_certificate(txn, entry).await?;
        }
        let txn = txn
            .and_then(Op::delete(node_key(id)))
            .and_then(Op::put(tombstone_key(id), entry.node.public_key.clone()));
        let committed = self.commit(txn).await;
        self.recent_nodes().remove(id);
        let committed = committed.inspect_err(|_| self.directory.invalidate())?;
        if committed.succeeded {
            self.node_written(id, committed.revision, None);
        }
        if !committed.succeeded {
            return Err(CuratorError::FailedPrecondition(format!(
                "node {id} or the consensus members changed while deleting; retry"
            )));
        }
        Ok(())
    }

    pub async fn is_deleted(&self, id: &str) -> Result<bool, CuratorError> {
        Ok(self
            .store
            .get(tombstone_key(id).as_bytes())
            .await?
            .is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::test_support::{ALL_LIVE, cluster_with_worker, set};

    #[tokio::test]
    async fn decommission_and_delete_rules() {
        let (_d, c, first, id, key) = cluster_with_worker().await;
        c.approve_node(&id).await.expect("approve");
        c.commit_node(key).await.expect("commit");
        c.update_roles(&id, set(Some(true), None, None), &ALL_LIVE)
            .await
            .expect("worker");
        assert!(matches!(
            c.request_decommission(&id).await,
            Err(CuratorError::FailedPrecondition(_))
        ));
        let r = c.delete_node(&id, false, true, &ALL_LIVE).await;
        assert!(
            matches!(r, Err(CuratorError::FailedPrecondition(ref m)) if m.contains("roles")),
            "{r:?}"
        );
        c.update_roles(&id, set(Some(false), None, None), &ALL_LIVE)
            .await
            .expect("drop role");
        let r = c.delete_node(&id, false, false, &ALL_LIVE).await;
        assert!(
            matches!(r, Err(CuratorError::FailedPrecondition(ref m)) if m.contains("DECOMMISSIONED")),
            "{r:?}"
        );
        c.request_decommission(&id).await.expect("request");
        assert!(
            c.node(&id)
                .await
                .expect("r")
                .expect("n")
                .node
                .decommission_requested
        );
        c.complete_decommission(&id).await.expect("complete");
        assert_eq!(
            c.node(&id).await.expect("r").expect("n").node.state,
            NodeState::Decommissioned as i32
        );
        c.delete_node(&id, false, false, &ALL_LIVE)
            .await
            .expect("delete");
        assert!(c.node(&id).await.expect("r").is_none());
        assert!(c.is_deleted(&id).await.expect("tombstone"));
        // The key cannot come back.
        let t = c.register_ticket().await.expect("ticket");
        assert!(matches!(
            c.register_node(key, &t, NodeLabels::default()).await,
            Err(CuratorError::PermissionDenied(_))
        ));
        // The last consensus member cannot be deleted, even with bypasses.
        let r = c.delete_node(&first, true, true, &ALL_LIVE).await;
        assert!(
            matches!(r, Err(CuratorError::FailedPrecondition(ref m)) if m.contains("last consensus member")),
            "{r:?}"
        );
    }
}

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
    /// Giving ConsensusMember records it *pending* and returns: the leader's
    /// reconciler admits pending members (see `consensus`). On the embedded
    /// store, this node's etcd is started first, so that a cluster that
    /// cannot move to etcd refuses at once. Taking it away removes the etcd
    /// member first (refused if the rest would lose quorum; `live` says who
    /// is up), then the role, revoking its peer certificate.
    pub async fn update_roles(
        &self,
        id: &str,
        change: RoleChange,
        live: &dyn Liveness,
    ) -> Result<(), CuratorError> {
        let losing = change.consensus_member == Some(false);
        // Serialized with the reconciler, which acts on the same members.
        let _serialized = if losing {
            Some(self.membership_lock().lock().await)
        } else {
            None
        };
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
            if joining_consensus {
                roles.consensus_member = Some(node_roles::ConsensusMember::default());
            }
            if losing {
                roles.consensus_member = None;
            }
            if roles.kubernetes_controller.is_some() && roles.consensus_member.is_none() {
                return Err(CuratorError::FailedPrecondition(
                    "a KubernetesController must also be a ConsensusMember: give the node both roles, \
                     or remove KubernetesController first"
                        .into(),
                ));
            }
            if *roles == before {
                return Ok(());
            }
            let losing_consensus =
                before.consensus_member.is_some() && roles.consensus_member.is_none();
            if joining_consensus {
                if crate::consensus::reported_address(entry).is_none() {
                    return Err(CuratorError::FailedPrecondition(format!(
                        "node {id} has not reported an IP address yet; wait until it is UP and heartbeating"
                    )));
                }
                if self.consensus().is_none() {
                    self.prepare_migration().await?;
                }
            }
            let key = node_key(id);
            let mut txn = Txn::new().when(Compare::mod_revision(key.clone(), entry.mod_revision));
            if losing_consensus {
                // Read after the node itself; the transaction compares every
                // revision read, so the order does not matter.
                let all = self.nodes().await?;
                let others: Vec<&NodeEntry> = all
                    .iter()
                    .filter(|e| e.id != id && self.holds_consensus_state(e))
                    .collect();
                if self.holds_consensus_state(entry) && others.is_empty() {
                    return Err(CuratorError::FailedPrecondition(format!(
                        "node {id} is the last consensus member; removing its role would lose the cluster state. \
                         Give another node the ConsensusMember role first, and wait until it is a voter"
                    )));
                }
                // The other members must still be members when this commits,
                // so two concurrent removals cannot both succeed.
                for o in others {
                    txn = txn.when(Compare::mod_revision(node_key(&o.id), o.mod_revision));
                }
                self.retire_consensus_member(entry, live).await?;
                txn = self.revoke_peer_certificate(txn, entry).await?;
            }
            let txn = txn.and_then(Op::put(key, node.encode_to_vec()));
            // Whatever the outcome, a remembered record of this node is
            // stale now (it would only cost update_node a failed attempt).
            let committed = self.commit(txn).await;
            self.recent_nodes().remove(id);
            match committed {
                Ok(resp) if resp.succeeded => {
                    self.node_written(id, resp.revision, Some(&node));
                    // On the embedded store the reconciler's next tick
                    // (within a second) starts the move to etcd: by then this
                    // call's audit record is written, which the paused store
                    // would refuse.
                    if (joining_consensus || losing_consensus) && self.consensus().is_some() {
                        self.membership_changed().notify_one();
                    }
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

    /// Whether `entry` holds a copy of the cluster state: an admitted
    /// consensus member (on etcd, one with a peer certificate; on the
    /// embedded store, the node whose store it is). A pending member does
    /// not yet.
    pub(crate) fn holds_consensus_state(&self, entry: &NodeEntry) -> bool {
        let Some(role) = entry
            .node
            .roles
            .as_ref()
            .and_then(|r| r.consensus_member.as_ref())
        else {
            return false;
        };
        match self.consensus() {
            Some(_) => !role.peer_certificate.is_empty(),
            // The embedded store's member was given its role at bootstrap;
            // every later one waits for the move to etcd.
            None => match self.etcd_host() {
                Some(host) => host.node_id() == entry.id,
                None => true,
            },
        }
    }

    /// Adds to `txn` the revocation of `entry`'s etcd peer certificate, if it
    /// has one.
    pub(crate) async fn revoke_peer_certificate(
        &self,
        txn: Txn,
        entry: &NodeEntry,
    ) -> Result<Txn, CuratorError> {
        let Some(cert) = entry
            .node
            .roles
            .as_ref()
            .and_then(|r| r.consensus_member.as_ref())
            .map(|r| &r.peer_certificate)
            .filter(|c| !c.is_empty())
        else {
            return Ok(txn);
        };
        let Some(mut pki) = self.consensus_pki().await? else {
            return Ok(txn);
        };
        if !pki.revoke(&entry.id, cert) {
            return Ok(txn);
        }
        let (compare, ops) = pki.write()?;
        Ok(ops.into_iter().fold(txn.when(compare), Txn::and_then))
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
            // A second member means moving to etcd, which needs a node that
            // can run it (see consensus::migration for one that can).
            c.update_status(
                &id,
                NodeStatus {
                    external_address: "127.0.0.9".into(),
                    ..Default::default()
                },
            )
            .await
            .expect("status");
            let r = c
                .update_roles(&id, set(None, Some(true), Some(true)), &ALL_LIVE)
                .await;
            assert!(
                matches!(r, Err(CuratorError::FailedPrecondition(ref m)) if m.contains("cannot move")),
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

    /// On etcd the role is accepted pending, the reconciler makes the node a
    /// learner (its record then carries what it needs to start etcd), and
    /// taking the role away removes the member again and revokes its peer
    /// certificate.
    async fn consensus_member_on_etcd(c: &Cluster, first: &str, id: &str) {
        use crate::consensus::{Progress, reconcile_once};
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
        let pending = consensus_role(id.to_string()).await.expect("role");
        assert!(
            pending.peer_certificate.is_empty(),
            "accepted, not admitted yet"
        );
        assert_eq!(consensus.members().await.expect("members").len(), 1);
        assert_eq!(
            c.consensus_progress(&c.nodes().await.expect("nodes"))
                .await
                .expect("progress")
                .get(id),
            Some(&Progress::Pending)
        );

        let pass = reconcile_once(c, &ALL_LIVE).await.expect("reconcile");
        assert_eq!(pass.admitted.as_deref(), Some(id), "{pass:?}");
        let role = consensus_role(id.to_string()).await.expect("role");
        let pki = c
            .consensus_pki()
            .await
            .expect("pki")
            .expect("a consensus PKI");
        assert_eq!(role.ca_certificate, pki.ca_certificate());
        assert_ne!(role.ca_certificate, c.ca().cert_der(), "not the cluster CA");
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
        assert_eq!(
            c.consensus_progress(&c.nodes().await.expect("nodes"))
                .await
                .expect("progress")
                .get(id),
            Some(&Progress::Learner)
        );
        // While the learner has not caught up (here: never starts), it stays
        // and nobody else is admitted.
        let pass = reconcile_once(c, &ALL_LIVE).await.expect("reconcile");
        assert_eq!(pass.catching_up.as_deref(), Some(id), "{pass:?}");
        assert_eq!(pass.admitted, None, "{pass:?}");
        assert_eq!(consensus.members().await.expect("members").len(), 2);

        // The leading curator's own member, the only voter: it stays (with a
        // second voter, the leader would step down so that another leader
        // removes it; the HA integration test does that).
        let r = c
            .update_roles(first, set(None, None, Some(false)), &ALL_LIVE)
            .await;
        assert!(
            matches!(r, Err(CuratorError::FailedPrecondition(ref m)) if m.contains("no voting member")),
            "{r:?}"
        );
        assert!(!c.step_down().abstaining());
        assert!(consensus_role(first.to_string()).await.is_some());
        c.update_roles(id, set(None, Some(false), Some(false)), &ALL_LIVE)
            .await
            .expect("leave the consensus");
        assert_eq!(consensus.members().await.expect("members").len(), 1);
        let pki = c
            .consensus_pki()
            .await
            .expect("pki")
            .expect("a consensus PKI");
        assert!(
            pki.is_revoked(&peer.serial),
            "the former member's certificate is revoked"
        );
        let crl = c
            .store()
            .get(crate::consensus::pki::KEY_CRL.as_bytes())
            .await
            .expect("crl")
            .expect("a CRL");
        let revoked =
            metropolis_identity::parse_crl(&crl.value, pki.ca_certificate()).expect("crl");
        assert_eq!(revoked, vec![peer.serial]);
    }
}

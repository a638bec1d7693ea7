//! The register flow: RegisterNode (NEW), ApproveNode (STANDBY), CommitNode
//! (UP), and the status nodes report afterwards.

use super::*;

impl Cluster {
    /// Adds a node in state NEW if the ticket is right. Registering again
    /// with the same key is a no-op.
    ///
    /// One transaction decides: the ticket, the node key and the node's
    /// tombstone are all compared in it, and when it fails it reads all three
    /// (at the same revision) to say why.
    pub async fn register_node(
        &self,
        public_key: [u8; 32],
        ticket: &[u8],
        labels: NodeLabels,
    ) -> Result<String, CuratorError> {
        self.register_node_using(public_key, ticket, labels, NodeTpmUsage::NotPresent)
            .await
    }

    /// [`Cluster::register_node`], recording how the node uses its TPM (see
    /// [`tpm_usage`]).
    pub async fn register_node_using(
        &self,
        public_key: [u8; 32],
        ticket: &[u8],
        labels: NodeLabels,
        tpm_usage: NodeTpmUsage,
    ) -> Result<String, CuratorError> {
        let id = metropolis_identity::node_id(&public_key);
        let key = node_key(&id);
        let tombstone = tombstone_key(&id);
        // A ticket that matches the one last read is compared by the
        // transaction below; anything else is checked against the store, so
        // a stale guess never refuses a right ticket.
        let current = match self.cached_ticket() {
            Some(t) if constant_time_eq(&t, ticket) => t,
            _ => {
                let t = self.register_ticket().await?;
                self.remember_ticket(&t);
                t
            }
        };
        if !constant_time_eq(&current, ticket) {
            return Err(CuratorError::PermissionDenied(
                "wrong register ticket; get the current one with `metroctl install params --register`".into(),
            ));
        }
        let node = private::Node {
            public_key: public_key.to_vec(),
            state: NodeState::New as i32,
            labels: Some(labels),
            registered_at: Some(prost_types::Timestamp::from(std::time::SystemTime::now())),
            tpm_usage: tpm_usage as i32,
            ..Default::default()
        };
        // All conditions in one transaction: a ticket regenerated or a node
        // deleted between our read and this write makes the registration fail.
        let txn = Txn::new()
            .when(Compare::value_equals(KEY_TICKET, current))
            .when(Compare::absent(key.clone()))
            .when(Compare::absent(tombstone.clone()))
            .and_then(Op::put(key.clone(), node.encode_to_vec()))
            .or_else(Op::get(tombstone))
            .or_else(Op::get(key.clone()))
            .or_else(Op::get(KEY_TICKET));
        let resp = self.commit(txn).await?;
        if resp.succeeded {
            self.node_written(&id, resp.revision, Some(&node));
            self.recent_nodes().insert(&id, node, resp.revision);
            return Ok(id);
        }
        let mut found = resp.results.into_iter().map(|r| match r {
            metropolis_store::OpResult::Get(kvs) => kvs.into_iter().next(),
            _ => None,
        });
        let (deleted, existing, stored_ticket) = (found.next(), found.next(), found.next());
        let (Some(deleted), Some(existing), Some(stored_ticket)) =
            (deleted, existing, stored_ticket)
        else {
            return Err(CuratorError::Internal(
                "the store answered a failed registration without the reads it asked for".into(),
            ));
        };
        if deleted.is_some() {
            return Err(CuratorError::PermissionDenied(format!(
                "node {id} was removed from the cluster; a removed node cannot register again with the same key"
            )));
        }
        match existing {
            Some(kv) => {
                let existing: private::Node = decode(&key, &kv.value)?;
                if existing.public_key == public_key {
                    Ok(id)
                } else {
                    Err(CuratorError::AlreadyExists(format!(
                        "node ID {id} is taken by another key"
                    )))
                }
            }
            None => {
                match stored_ticket {
                    Some(kv) => self.remember_ticket(&kv.value),
                    None => self.forget_ticket(),
                }
                Err(CuratorError::PermissionDenied(
                    "the register ticket was regenerated; get the new one".into(),
                ))
            }
        }
    }

    /// NEW → STANDBY; a no-op for STANDBY and UP nodes.
    pub async fn approve_node(&self, id: &str) -> Result<(), CuratorError> {
        self.update_node(id, |node| match NodeState::try_from(node.state) {
            Ok(NodeState::New) => {
                node.state = NodeState::Standby as i32;
                Ok(Change::Write(()))
            }
            Ok(NodeState::Standby | NodeState::Up) => Ok(Change::Keep(())),
            _ => Err(CuratorError::FailedPrecondition(format!(
                "node {id} is {} and cannot be approved",
                state_name(node.state)
            ))),
        })
        .await
    }

    /// STANDBY → UP and the node's certificate. Also answers an UP node
    /// again (a node that crashed before it could seal its credentials).
    pub async fn commit_node(&self, public_key: [u8; 32]) -> Result<Vec<u8>, CuratorError> {
        let id = metropolis_identity::node_id(&public_key);
        self.update_node(&id, |node| {
            if node.public_key != public_key {
                return Err(CuratorError::PermissionDenied(format!(
                    "node ID {id} belongs to another key"
                )));
            }
            match NodeState::try_from(node.state) {
                Ok(NodeState::Standby) => {
                    node.state = NodeState::Up as i32;
                    Ok(Change::Write(()))
                }
                Ok(NodeState::Up) => Ok(Change::Keep(())),
                Ok(NodeState::New) => Err(CuratorError::FailedPrecondition(format!(
                    "node {id} is waiting for approval (metroctl node approve {id})"
                ))),
                _ => Err(CuratorError::FailedPrecondition(format!(
                    "node {id} is {} and cannot join",
                    state_name(node.state)
                ))),
            }
        })
        .await?;
        let lifetime = self.lifetimes().await?.node;
        self.ca
            .issue_node_certificate(&public_key, lifetime)
            .map_err(|e| CuratorError::Internal(format!("issuing node certificate: {e}")))
    }

    /// Records a node's status; a write only when something changed.
    pub async fn update_status(&self, id: &str, status: NodeStatus) -> Result<(), CuratorError> {
        self.update_node(id, |node| {
            let mut next = status.clone();
            if next.timestamp.is_none() {
                next.timestamp = Some(prost_types::Timestamp::from(std::time::SystemTime::now()));
            }
            let unchanged = node.status.as_ref().is_some_and(|cur| {
                let mut a = cur.clone();
                let mut b = next.clone();
                a.timestamp = None;
                b.timestamp = None;
                a == b
            });
            if unchanged {
                return Ok(Change::Keep(()));
            }
            node.status = Some(next);
            Ok(Change::Write(()))
        })
        .await
    }
}

/// Whether a registering node uses its TPM, from the cluster's TPM mode and
/// whether the node has one (as upstream decides it). PERMISSION_DENIED when
/// the cluster requires a TPM the node lacks.
pub fn tpm_usage(
    config: &ClusterConfiguration,
    have_tpm: bool,
) -> Result<NodeTpmUsage, CuratorError> {
    let use_tpm = match TpmMode::try_from(config.tpm_mode) {
        Ok(TpmMode::Disabled) => false,
        Ok(TpmMode::BestEffort) => have_tpm,
        Ok(TpmMode::Required) if have_tpm => true,
        Ok(TpmMode::Required) => {
            return Err(CuratorError::PermissionDenied(
                "the cluster requires a TPM (tpm_mode TPM_MODE_REQUIRED) and this node reported none".into(),
            ));
        }
        _ => {
            return Err(CuratorError::Corrupt(format!(
                "cluster configuration has an unknown tpm_mode {}",
                config.tpm_mode
            )));
        }
    };
    Ok(match (have_tpm, use_tpm) {
        (false, _) => NodeTpmUsage::NotPresent,
        (true, false) => NodeTpmUsage::PresentButUnused,
        (true, true) => NodeTpmUsage::PresentAndUsed,
    })
}

/// The storage security the cluster suggests to a registering node, from
/// its storage security policy (as upstream suggests it: the strongest the
/// policy allows).
pub fn recommended_storage_security(
    config: &ClusterConfiguration,
) -> Result<NodeStorageSecurity, CuratorError> {
    match StorageSecurityPolicy::try_from(config.storage_security_policy) {
        Ok(
            StorageSecurityPolicy::Permissive
            | StorageSecurityPolicy::NeedsEncryptionAndAuthentication,
        ) => Ok(NodeStorageSecurity::AuthenticatedEncrypted),
        Ok(StorageSecurityPolicy::NeedsEncryption) => Ok(NodeStorageSecurity::Encrypted),
        Ok(StorageSecurityPolicy::NeedsInsecure) => Ok(NodeStorageSecurity::Insecure),
        _ => Err(CuratorError::Corrupt(format!(
            "cluster configuration has an unknown storage_security_policy {}",
            config.storage_security_policy
        ))),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod register_tests {
    use super::*;

    async fn cluster() -> (test_support::Backing, Arc<Cluster>) {
        let t = test_support::bootstrapped().await;
        (t.dir, t.cluster)
    }

    #[test]
    fn tpm_usage_and_storage_security_follow_the_policy() {
        let cfg = |tpm: TpmMode, sec: StorageSecurityPolicy| ClusterConfiguration {
            tpm_mode: tpm as i32,
            storage_security_policy: sec as i32,
            ..Default::default()
        };
        use NodeTpmUsage::*;
        for (mode, have, want) in [
            (TpmMode::Disabled, false, Some(NotPresent)),
            (TpmMode::Disabled, true, Some(PresentButUnused)),
            (TpmMode::BestEffort, false, Some(NotPresent)),
            (TpmMode::BestEffort, true, Some(PresentAndUsed)),
            (TpmMode::Required, true, Some(PresentAndUsed)),
            (TpmMode::Required, false, None),
        ] {
            let got = tpm_usage(&cfg(mode, StorageSecurityPolicy::Permissive), have).ok();
            assert_eq!(got, want, "{mode:?} with TPM {have}");
        }
        assert!(tpm_usage(&ClusterConfiguration::default(), false).is_err());
        for (policy, want) in [
            (
                StorageSecurityPolicy::Permissive,
                NodeStorageSecurity::AuthenticatedEncrypted,
            ),
            (
                StorageSecurityPolicy::NeedsEncryption,
                NodeStorageSecurity::Encrypted,
            ),
            (
                StorageSecurityPolicy::NeedsEncryptionAndAuthentication,
                NodeStorageSecurity::AuthenticatedEncrypted,
            ),
            (
                StorageSecurityPolicy::NeedsInsecure,
                NodeStorageSecurity::Insecure,
            ),
        ] {
            let got = recommended_storage_security(&cfg(TpmMode::Disabled, policy)).ok();
            assert_eq!(got, Some(want), "{policy:?}");
        }
        assert!(recommended_storage_security(&ClusterConfiguration::default()).is_err());
    }

    #[tokio::test]
    async fn register_approve_commit() {
        let (_d, c) = cluster().await;
        let key = metropolis_identity::generate_key()
            .verifying_key()
            .to_bytes();
        let ticket = c.register_ticket().await.expect("ticket");
        let bad = c.register_node(key, b"wrong", NodeLabels::default()).await;
        assert!(matches!(bad, Err(CuratorError::PermissionDenied(_))));
        assert_eq!(
            c.nodes().await.expect("nodes").len(),
            1,
            "a refused registration changes nothing"
        );

        let id = c
            .register_node(key, &ticket, NodeLabels::default())
            .await
            .expect("register");
        assert_eq!(
            c.register_node(key, &ticket, NodeLabels::default())
                .await
                .expect("again"),
            id
        );
        assert_eq!(
            c.node(&id).await.expect("read").expect("node").node.state,
            NodeState::New as i32
        );
        assert!(matches!(
            c.commit_node(key).await,
            Err(CuratorError::FailedPrecondition(_))
        ));

        c.approve_node(&id).await.expect("approve");
        c.approve_node(&id).await.expect("approve is idempotent");
        assert_eq!(
            c.node(&id).await.expect("read").expect("node").node.state,
            NodeState::Standby as i32
        );
        let cert = c.commit_node(key).await.expect("commit");
        let parsed = metropolis_identity::parse_certificate(&cert).expect("cert");
        assert_eq!(parsed.common_name, id);
        assert_eq!(
            c.node(&id).await.expect("read").expect("node").node.state,
            NodeState::Up as i32
        );
        c.approve_node(&id).await.expect("approve of UP is a no-op");
        c.commit_node(key).await.expect("commit again re-issues");
        assert!(matches!(
            c.approve_node("metropolis-nope").await,
            Err(CuratorError::NotFound(_))
        ));

        let t2 = c.regenerate_register_ticket().await.expect("regen");
        let other = metropolis_identity::generate_key()
            .verifying_key()
            .to_bytes();
        assert!(matches!(
            c.register_node(other, &ticket, NodeLabels::default()).await,
            Err(CuratorError::PermissionDenied(_))
        ));
        c.register_node(other, &t2, NodeLabels::default())
            .await
            .expect("new ticket works");
    }

    /// Writes behind the curator's back (another leader, an operator with
    /// etcdctl): what the curator remembers must never decide on its own.
    #[tokio::test]
    async fn remembered_records_and_ticket_are_only_guesses() {
        let (_d, c) = cluster().await;
        let put = |key: String, value: Vec<u8>| {
            let store = c.store().clone();
            async move {
                store
                    .txn(Txn::new().and_then(Op::put(key, value)))
                    .await
                    .expect("direct write");
            }
        };
        let ticket = c.register_ticket().await.expect("ticket");
        let register = |ticket: Vec<u8>| {
            let c = c.clone();
            async move {
                let key = metropolis_identity::generate_key()
                    .verifying_key()
                    .to_bytes();
                let r = c.register_node(key, &ticket, NodeLabels::default()).await;
                (key, r)
            }
        };

        // Decommissioned behind our back: approving must see it.
        let (_, id) = register(ticket.clone()).await;
        let id = id.expect("register");
        let mut node = c.node(&id).await.expect("read").expect("node").node;
        node.state = NodeState::Decommissioned as i32;
        put(node_key(&id), node.encode_to_vec()).await;
        assert!(matches!(
            c.approve_node(&id).await,
            Err(CuratorError::FailedPrecondition(_))
        ));

        // Labelled behind our back: approving keeps the label.
        let (key, id) = register(ticket.clone()).await;
        let id = id.expect("register");
        let mut node = c.node(&id).await.expect("read").expect("node").node;
        node.labels = Some(NodeLabels {
            pairs: vec![metropolis_api::common::node_labels::Pair {
                key: "k".into(),
                value: "v".into(),
            }],
        });
        put(node_key(&id), node.encode_to_vec()).await;
        c.approve_node(&id).await.expect("approve");
        c.commit_node(key).await.expect("commit");
        let node = c.node(&id).await.expect("read").expect("node").node;
        assert_eq!(node.state, NodeState::Up as i32);
        assert_eq!(node.labels.map(|l| l.pairs.len()), Some(1));

        // A ticket regenerated behind our back: the old one stops working,
        // the new one works at once.
        let t2 = random_ticket();
        put(KEY_TICKET.into(), t2.clone()).await;
        let (_, r) = register(ticket.clone()).await;
        assert!(
            matches!(r, Err(CuratorError::PermissionDenied(ref m)) if m.contains("regenerated")),
            "{r:?}"
        );
        register(t2.clone()).await.1.expect("new ticket");

        // A tombstone written after the ticket was remembered still refuses.
        let key = metropolis_identity::generate_key()
            .verifying_key()
            .to_bytes();
        let id = metropolis_identity::node_id(&key);
        put(tombstone_key(&id), key.to_vec()).await;
        let r = c.register_node(key, &t2, NodeLabels::default()).await;
        assert!(
            matches!(r, Err(CuratorError::PermissionDenied(ref m)) if m.contains("removed")),
            "{r:?}"
        );
        assert!(c.node(&id).await.expect("read").is_none());
    }

    #[tokio::test]
    async fn status_is_written_only_on_change() {
        let (_d, c) = cluster().await;
        let id = c.nodes().await.expect("nodes")[0].id.clone();
        let status = NodeStatus {
            external_address: "127.0.0.9".into(),
            ..Default::default()
        };
        c.update_status(&id, status.clone()).await.expect("update");
        let rev = c.node(&id).await.expect("read").expect("node").mod_revision;
        c.update_status(&id, status).await.expect("same again");
        assert_eq!(
            c.node(&id).await.expect("read").expect("node").mod_revision,
            rev
        );
        assert_eq!(
            c.directory().await.expect("dir").nodes[0].addresses[0].host,
            "127.0.0.9"
        );
    }
}

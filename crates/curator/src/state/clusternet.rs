//! Cluster networking: the WireGuard key and prefixes each node announces
//! (Curator.UpdateNodeClusterNetworking), checked the way upstream checks
//! them and kept in the node's record, where Watch shows them.

use std::net::IpAddr;

use base64::Engine as _;
use ipnet::IpNet;
use metropolis_api::common::NodeClusterNetworking;

use super::*;

/// The network pod and node prefixes must lie in. Upstream hard-codes it too
/// (its Kubernetes cluster network); no configuration field sets it.
pub const CLUSTER_NETWORK: &str = "10.192.0.0/11";

/// Checks `cn` for the node whose external address is `external`: a
/// WireGuard public key (base64 of 32 bytes), and prefixes in canonical CIDR
/// form that lie within [`CLUSTER_NETWORK`] or are the node's own address as
/// a single-address prefix. Returns it with the key in canonical base64.
pub fn validate(
    mut cn: NodeClusterNetworking,
    external: Option<IpAddr>,
) -> Result<NodeClusterNetworking, CuratorError> {
    let invalid = CuratorError::InvalidArgument;
    if cn.wireguard_pubkey.is_empty() {
        return Err(invalid("clusternet.wireguard_pubkey must be set".into()));
    }
    let engine = base64::engine::general_purpose::STANDARD;
    let key = engine
        .decode(&cn.wireguard_pubkey)
        .ok()
        .filter(|k| k.len() == 32)
        .ok_or_else(|| {
            invalid(format!(
                "clusternet.wireguard_pubkey must be a valid WireGuard public key (base64 of 32 bytes), got {:?}",
                short(&cn.wireguard_pubkey)
            ))
        })?;
    cn.wireguard_pubkey = engine.encode(key);
    let cluster: IpNet = CLUSTER_NETWORK
        .parse()
        .map_err(|e| CuratorError::Internal(format!("cluster network: {e}")))?;
    for (i, prefix) in cn.prefixes.iter().enumerate() {
        let p: IpNet = prefix.cidr.parse().map_err(|e| {
            invalid(format!(
                "clusternet.prefixes[{i}].cidr {:?} is not an address/length prefix: {e}",
                short(&prefix.cidr)
            ))
        })?;
        if p.trunc() != p {
            return Err(invalid(format!(
                "clusternet.prefixes[{i}].cidr {p} must be in canonical form (address bits beyond the prefix length zero: {})",
                p.trunc()
            )));
        }
        let own_address = p.prefix_len() == p.max_prefix_len() && Some(p.addr()) == external;
        if !cluster.contains(&p) && !own_address {
            return Err(invalid(format!(
                "clusternet.prefixes[{i}].cidr {p} must lie within the cluster network {cluster} or be the node's external address {}",
                external.map_or_else(|| "(none reported)".to_string(), |a| a.to_string())
            )));
        }
    }
    Ok(cn)
}

/// A short prefix of user input for error messages.
fn short(s: &str) -> String {
    s.chars().take(60).collect()
}

impl Cluster {
    /// Records a node's cluster networking after [`validate`]. A node must
    /// have reported its status first (its external address decides which
    /// single-address prefix it may announce), and a WireGuard key belongs to
    /// one node only.
    pub async fn update_clusternet(
        &self,
        id: &str,
        cn: NodeClusterNetworking,
    ) -> Result<(), CuratorError> {
        let entry = self
            .node(id)
            .await?
            .ok_or_else(|| CuratorError::NotFound(format!("node {id} not found")))?;
        let external = entry
            .node
            .status
            .as_ref()
            .map(|s| s.external_address.as_str())
            .filter(|a| !a.is_empty())
            .ok_or_else(|| {
                CuratorError::FailedPrecondition(format!(
                    "node {id} must report its status (UpdateNodeStatus) before its cluster networking"
                ))
            })?
            .parse::<IpAddr>()
            .ok();
        let cn = validate(cn, external)?;
        // A key claimed by two nodes would route one node's traffic to the
        // other. Checked against every record; two nodes racing for one key
        // at the same moment are not caught (neither gains anything it could
        // not get by announcing its own key).
        let taken_by = self.nodes().await?.into_iter().find(|e| {
            e.id != id
                && e.node
                    .clusternet
                    .as_ref()
                    .is_some_and(|c| c.wireguard_pubkey == cn.wireguard_pubkey)
        });
        if let Some(other) = taken_by {
            return Err(CuratorError::InvalidArgument(format!(
                "clusternet.wireguard_pubkey is already used by node {}",
                other.id
            )));
        }
        self.update_node(id, |node| {
            if node.clusternet.as_ref() == Some(&cn) {
                return Ok(Change::Keep(()));
            }
            node.clusternet = Some(cn.clone());
            Ok(Change::Write(()))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metropolis_api::common::node_cluster_networking::Prefix;

    const KEY: &str = "w9RbFvF14pytyraq16IEuMov032XXrPBOQUr59kcxHg=";

    fn cn(key: &str, prefixes: &[&str]) -> NodeClusterNetworking {
        NodeClusterNetworking {
            wireguard_pubkey: key.into(),
            prefixes: prefixes
                .iter()
                .map(|p| Prefix { cidr: (*p).into() })
                .collect(),
        }
    }

    #[test]
    fn validation_follows_upstream() {
        let ext: Option<IpAddr> = "203.0.113.43".parse().ok();
        let refused = [
            (cn("", &[]), "must be set"),
            (cn("beep boop i'm a key", &[]), "valid WireGuard"),
            // Base64, but 16 bytes.
            (cn("AAAAAAAAAAAAAAAAAAAAAA==", &[]), "valid WireGuard"),
            (cn(KEY, &[""]), "not an address/length"),
            (cn(KEY, &["10.192.0.128/16"]), "canonical form"),
            (cn(KEY, &["10.192.0.0/10"]), "within the cluster network"),
            (cn(KEY, &["8.8.8.8/32"]), "within the cluster network"),
            (cn(KEY, &["203.0.113.0/24"]), "within the cluster network"),
        ];
        for (req, want) in refused {
            let err = validate(req.clone(), ext).expect_err(&format!("{req:?} accepted"));
            assert!(
                matches!(&err, CuratorError::InvalidArgument(m) if m.contains(want)),
                "{req:?}: {err} lacks {want:?}"
            );
        }
        let ok = cn(
            KEY,
            &[
                "10.192.0.0/24",
                "10.192.0.0/11",
                "10.195.12.23/32",
                "203.0.113.43/32",
            ],
        );
        assert_eq!(validate(ok.clone(), ext).expect("valid"), ok);
        assert!(validate(cn(KEY, &[]), ext).is_ok());
        // Without a known address, no single-address prefix outside.
        assert!(validate(cn(KEY, &["203.0.113.43/32"]), None).is_err());
    }

    #[tokio::test]
    async fn stored_in_the_record_and_keys_are_unique() {
        let t = test_support::bootstrapped().await;
        let (cluster, id) = (t.cluster.clone(), t.first_id.clone());
        // The bootstrap node reported 127.0.0.2.
        let want = cn(KEY, &["10.192.0.0/24", "127.0.0.2/32"]);
        cluster
            .update_clusternet(&id, want.clone())
            .await
            .expect("update");
        let stored = cluster.node(&id).await.expect("read").expect("node");
        assert_eq!(stored.node.clusternet, Some(want));

        // A node that has reported no status yet is refused.
        let other = metropolis_identity::generate_key()
            .verifying_key()
            .to_bytes();
        let ticket = cluster.register_ticket().await.expect("ticket");
        let other_id = cluster
            .register_node(other, &ticket, NodeLabels::default())
            .await
            .expect("register");
        let err = cluster
            .update_clusternet(&other_id, cn(KEY, &[]))
            .await
            .expect_err("no status");
        assert!(matches!(err, CuratorError::FailedPrecondition(_)), "{err}");
        cluster
            .update_status(
                &other_id,
                NodeStatus {
                    external_address: "203.0.113.44".into(),
                    ..Default::default()
                },
            )
            .await
            .expect("status");
        // Nor can it claim the first node's key.
        let err = cluster
            .update_clusternet(&other_id, cn(KEY, &[]))
            .await
            .expect_err("taken");
        assert!(
            matches!(&err, CuratorError::InvalidArgument(m) if m.contains(&id)),
            "{err}"
        );
        let other_key = "GaNXuc/yl8IaXduX6PQ+ZxIG4HtBACubHrRI7rqfA20=";
        cluster
            .update_clusternet(&other_id, cn(other_key, &["203.0.113.44/32"]))
            .await
            .expect("own key");
    }
}

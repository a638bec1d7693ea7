//! Cluster configuration after bootstrap (ConfigureCluster).

use super::*;
use metropolis_api::quote;

/// The one configuration path that may change after bootstrap.
pub const PATH_LABELS_TO_SYNC: &str = "kubernetes.node_labels_to_synchronize";
impl Cluster {
    /// Changes the fields of the configuration named by `paths`, if the
    /// current values equal those in `base` (when given). Returns the
    /// resulting configuration.
    pub async fn configure(
        &self,
        base: Option<ClusterConfiguration>,
        new: ClusterConfiguration,
        paths: &[String],
    ) -> Result<ClusterConfiguration, CuratorError> {
        if paths.is_empty() {
            return Err(CuratorError::InvalidArgument(format!(
                "update_mask names no fields; the mutable field is {PATH_LABELS_TO_SYNC}"
            )));
        }
        for p in paths {
            if p != PATH_LABELS_TO_SYNC {
                return Err(CuratorError::InvalidArgument(format!(
                    "field {} cannot be changed; the only mutable field is {PATH_LABELS_TO_SYNC}",
                    quote(p)
                )));
            }
        }
        let wanted = sync_regexps(&new);
        for r in &wanted {
            regex::Regex::new(r).map_err(|e| {
                CuratorError::InvalidArgument(format!(
                    "regexp {} does not compile: {}",
                    quote(r),
                    metropolis_api::quote::cut(&e.to_string())
                ))
            })?;
        }
        for _ in 0..CAS_ATTEMPTS {
            let kv = self
                .store
                .get(KEY_CONFIG.as_bytes())
                .await?
                .ok_or_else(|| CuratorError::Corrupt(format!("{KEY_CONFIG} missing")))?;
            let mut cfg: ClusterConfiguration = decode(KEY_CONFIG, &kv.value)?;
            if let Some(base) = &base
                && sync_regexps(base) != sync_regexps(&cfg)
            {
                return Err(CuratorError::FailedPrecondition(format!(
                    "{PATH_LABELS_TO_SYNC} is not what base_config says it is (someone changed it); \
                     read the configuration again and retry"
                )));
            }
            cfg.kubernetes
                .get_or_insert_with(Default::default)
                .node_labels_to_synchronize = new
                .kubernetes
                .clone()
                .unwrap_or_default()
                .node_labels_to_synchronize;
            let txn = Txn::new()
                .when(Compare::mod_revision(KEY_CONFIG, kv.mod_revision))
                .and_then(Op::put(KEY_CONFIG, cfg.encode_to_vec()));
            if self.commit(txn).await?.succeeded {
                return Ok(cfg);
            }
        }
        Err(CuratorError::Internal(
            "the configuration kept changing; gave up".into(),
        ))
    }
}

fn sync_regexps(cfg: &ClusterConfiguration) -> Vec<String> {
    cfg.kubernetes
        .as_ref()
        .map(|k| {
            k.node_labels_to_synchronize
                .iter()
                .map(|r| r.regexp.clone())
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod operate_tests {
    use super::*;
    use metropolis_api::common::cluster_configuration::{
        Kubernetes, kubernetes::NodeLabelsToSynchronize,
    };

    async fn cluster() -> (test_support::Backing, Arc<Cluster>, String) {
        let t = test_support::bootstrapped().await;
        (t.dir, t.cluster, t.first_id)
    }

    fn sync(rs: &[&str]) -> ClusterConfiguration {
        ClusterConfiguration {
            kubernetes: Some(Kubernetes {
                node_labels_to_synchronize: rs
                    .iter()
                    .map(|r| NodeLabelsToSynchronize {
                        regexp: r.to_string(),
                    })
                    .collect(),
            }),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn configure_only_the_mutable_path_with_base_check() {
        let (_d, c, _) = cluster().await;
        let path = vec![PATH_LABELS_TO_SYNC.to_string()];
        let out = c
            .configure(None, sync(&["^zone$"]), &path)
            .await
            .expect("set");
        assert_eq!(sync_regexps(&out), vec!["^zone$"]);
        assert_eq!(
            out.cluster_domain, "cluster.local",
            "other fields untouched"
        );
        // A stale base fails and changes nothing.
        let stale = c.configure(Some(sync(&[])), sync(&["x"]), &path).await;
        assert!(matches!(stale, Err(CuratorError::FailedPrecondition(_))));
        assert_eq!(
            sync_regexps(&c.configuration().await.expect("cfg")),
            vec!["^zone$"]
        );
        c.configure(Some(sync(&["^zone$"])), sync(&["a.*", "b"]), &path)
            .await
            .expect("right base");
        let bad = c.configure(None, sync(&["("]), &path).await;
        assert!(matches!(bad, Err(CuratorError::InvalidArgument(_))));
        let other = c
            .configure(None, sync(&[]), &["cluster_domain".to_string()])
            .await;
        assert!(
            matches!(other, Err(CuratorError::InvalidArgument(ref m)) if m.contains("cluster_domain")),
            "{other:?}"
        );
        assert!(matches!(
            c.configure(None, sync(&[]), &[]).await,
            Err(CuratorError::InvalidArgument(_))
        ));
    }

    #[test]
    fn props_configure_cluster_masks() {
        use metropolis_api::testing::props;
        use metropolis_api::testing::proptest::prelude::*;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let (_d, c, _) = rt.block_on(cluster());
        let path = prop_oneof![
            Just(PATH_LABELS_TO_SYNC.to_string()),
            Just("cluster_domain".to_string()),
            "[a-z_.]{0,40}",
            any::<String>(),
        ];
        let regexp = prop_oneof!["[a-z^$.*()\\[\\]+?|{},0-9-]{0,20}", any::<String>()];
        let masks = prop::collection::vec(path, 0..4);
        let regexps = prop::collection::vec(regexp, 0..4);
        props("ConfigureCluster masks", (masks, regexps), |(paths, rs)| {
            let rs: Vec<&str> = rs.iter().map(String::as_str).collect();
            let result = rt.block_on(c.configure(None, sync(&rs), &paths));
            let mutable_only = !paths.is_empty() && paths.iter().all(|p| p == PATH_LABELS_TO_SYNC);
            match result {
                Ok(out) => {
                    prop_assert!(mutable_only, "accepted mask {paths:?}");
                    prop_assert_eq!(sync_regexps(&out), rs.clone());
                    prop_assert_eq!(out.cluster_domain, "cluster.local");
                }
                Err(CuratorError::InvalidArgument(m)) => {
                    prop_assert!(m.len() < 1024, "a {} byte message", m.len())
                }
                Err(other) => prop_assert!(false, "unexpected error {other}"),
            }
            Ok(())
        });
    }
}

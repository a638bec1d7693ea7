//! Cluster configuration after bootstrap (ConfigureCluster).

use super::*;
use metropolis_api::quote;

/// The configuration path of the label regexps, mutable after bootstrap.
pub const PATH_LABELS_TO_SYNC: &str = "kubernetes.node_labels_to_synchronize";

/// Every path ConfigureCluster may change.
const MUTABLE_PATHS: [&str; 3] = [
    PATH_LABELS_TO_SYNC,
    lifetimes::PATH_NODE_CERTIFICATE_LIFETIME,
    lifetimes::PATH_USER_CERTIFICATE_LIFETIME,
];

fn mutable_paths() -> String {
    MUTABLE_PATHS.join(", ")
}

/// The value at `path` of `cfg`, for the base_config comparison.
fn field(cfg: &ClusterConfiguration, path: &str) -> Vec<String> {
    let lifetime = |d: &Option<prost_types::Duration>| {
        vec![
            d.map(|d| format!("{}.{}", d.seconds, d.nanos))
                .unwrap_or_default(),
        ]
    };
    match path {
        lifetimes::PATH_NODE_CERTIFICATE_LIFETIME => lifetime(&cfg.node_certificate_lifetime),
        lifetimes::PATH_USER_CERTIFICATE_LIFETIME => lifetime(&cfg.user_certificate_lifetime),
        _ => sync_regexps(cfg),
    }
}

impl Cluster {
    /// Changes the fields of the configuration named by `paths`, if the
    /// current values equal those in `base` (when given). Returns the
    /// resulting configuration. No paths: nothing changes (as upstream, which
    /// merges field by field).
    pub async fn configure(
        &self,
        base: Option<ClusterConfiguration>,
        new: ClusterConfiguration,
        paths: &[String],
    ) -> Result<ClusterConfiguration, CuratorError> {
        if paths.is_empty() {
            return self.configuration().await;
        }
        for p in paths {
            check_path(p)?;
        }
        // Upstream's checks of the sub-message the path goes through.
        if paths.iter().any(|p| p == PATH_LABELS_TO_SYNC) {
            if new.kubernetes.is_none() {
                return Err(CuratorError::InvalidArgument(format!(
                    "new_config.kubernetes must be set to change {PATH_LABELS_TO_SYNC}"
                )));
            }
            if base.as_ref().is_some_and(|b| b.kubernetes.is_none()) {
                return Err(CuratorError::InvalidArgument(format!(
                    "base_config.kubernetes must be set when base_config is given for {PATH_LABELS_TO_SYNC}"
                )));
            }
        }
        let has = |p: &str| paths.iter().any(|q| q == p);
        if has(PATH_LABELS_TO_SYNC) {
            for r in &sync_regexps(&new) {
                regex::Regex::new(r).map_err(|e| {
                    CuratorError::InvalidArgument(format!(
                        "regexp {} does not compile: {}",
                        quote(r),
                        metropolis_api::quote::cut(&e.to_string())
                    ))
                })?;
            }
        }
        let ca_remaining = self.ca.remaining(time::OffsetDateTime::now_utc());
        for (path, value) in [
            (
                lifetimes::PATH_NODE_CERTIFICATE_LIFETIME,
                new.node_certificate_lifetime,
            ),
            (
                lifetimes::PATH_USER_CERTIFICATE_LIFETIME,
                new.user_certificate_lifetime,
            ),
        ] {
            if has(path) {
                if value.is_none() {
                    return Err(CuratorError::InvalidArgument(format!(
                        "update_mask names {path} but new_config does not set it"
                    )));
                }
                lifetimes::check_lifetime(path, value, ca_remaining)?;
            }
        }
        for _ in 0..CAS_ATTEMPTS {
            let kv = self
                .store
                .get(KEY_CONFIG.as_bytes())
                .await?
                .ok_or_else(|| CuratorError::Corrupt(format!("{KEY_CONFIG} missing")))?;
            let mut cfg: ClusterConfiguration = decode(KEY_CONFIG, &kv.value)?;
            if let Some(base) = &base {
                for p in paths {
                    if field(base, p) != field(&cfg, p) {
                        return Err(CuratorError::FailedPrecondition(format!(
                            "{p} is not what base_config says it is (someone changed it); \
                             read the configuration again and retry"
                        )));
                    }
                }
            }
            if has(PATH_LABELS_TO_SYNC) {
                cfg.kubernetes
                    .get_or_insert_with(Default::default)
                    .node_labels_to_synchronize = new
                    .kubernetes
                    .clone()
                    .unwrap_or_default()
                    .node_labels_to_synchronize;
            }
            if has(lifetimes::PATH_NODE_CERTIFICATE_LIFETIME) {
                cfg.node_certificate_lifetime = new.node_certificate_lifetime;
            }
            if has(lifetimes::PATH_USER_CERTIFICATE_LIFETIME) {
                cfg.user_certificate_lifetime = new.user_certificate_lifetime;
            }
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

/// Field paths of `ClusterConfiguration` a mask may name.
const KNOWN_PATHS: &[&str] = &[
    "cluster_domain",
    "tpm_mode",
    "storage_security_policy",
    "kubernetes",
    PATH_LABELS_TO_SYNC,
    lifetimes::PATH_NODE_CERTIFICATE_LIFETIME,
    lifetimes::PATH_USER_CERTIFICATE_LIFETIME,
];

/// Whether a mask path may be changed, in upstream's terms: an unknown field,
/// the `kubernetes` message as a whole, and the immutable fields are refused.
fn check_path(p: &str) -> Result<(), CuratorError> {
    let short = quote(p);
    if !KNOWN_PATHS.contains(&p) {
        return Err(CuratorError::InvalidArgument(format!(
            "update_mask names {short}, which is not a field of ClusterConfiguration; \
             the mutable fields are {}",
            mutable_paths()
        )));
    }
    if p == "kubernetes" {
        return Err(CuratorError::InvalidArgument(format!(
            "kubernetes cannot be changed as a whole, only its fields: {PATH_LABELS_TO_SYNC}"
        )));
    }
    if !MUTABLE_PATHS.contains(&p) {
        return Err(CuratorError::InvalidArgument(format!(
            "field {short} cannot be changed; the mutable fields are {}",
            mutable_paths()
        )));
    }
    Ok(())
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
            out.cluster_domain, "cluster.internal",
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
        // An empty mask changes nothing.
        let same = c
            .configure(None, ClusterConfiguration::default(), &[])
            .await
            .expect("empty mask");
        assert_eq!(sync_regexps(&same), vec!["a.*", "b"]);
        // The sub-message the path goes through must be there, in new and base.
        let no_k8s = c
            .configure(None, ClusterConfiguration::default(), &path)
            .await;
        assert!(
            matches!(no_k8s, Err(CuratorError::InvalidArgument(ref m)) if m.contains("new_config.kubernetes")),
            "{no_k8s:?}"
        );
        let base_no_k8s = c
            .configure(Some(ClusterConfiguration::default()), sync(&[]), &path)
            .await;
        assert!(
            matches!(base_no_k8s, Err(CuratorError::InvalidArgument(ref m)) if m.contains("base_config.kubernetes")),
            "{base_no_k8s:?}"
        );
        for bad in [
            "kubernetes",
            "nope",
            "kubernetes.node_labels_to_synchronize.regexp",
        ] {
            let r = c.configure(None, sync(&[]), &[bad.to_string()]).await;
            assert!(
                matches!(r, Err(CuratorError::InvalidArgument(_))),
                "{bad}: {r:?}"
            );
        }
        assert_eq!(
            sync_regexps(&c.configuration().await.expect("cfg")),
            vec!["a.*", "b"],
            "refusals change nothing"
        );
    }

    #[tokio::test]
    async fn lifetimes_change_within_bounds() {
        let (_d, c, _) = cluster().await;
        let before = c.configuration().await.expect("cfg");
        assert_eq!(
            lifetimes::Lifetimes::of(&before).node,
            lifetimes::DEFAULT_NODE_CERTIFICATE_LIFETIME
        );
        let d = |s| {
            Some(prost_types::Duration {
                seconds: s,
                nanos: 0,
            })
        };
        let path = vec![lifetimes::PATH_USER_CERTIFICATE_LIFETIME.to_string()];
        let new = ClusterConfiguration {
            user_certificate_lifetime: d(120),
            ..Default::default()
        };
        let out = c.configure(None, new, &path).await.expect("set");
        assert_eq!(out.user_certificate_lifetime, d(120));
        assert_eq!(
            out.node_certificate_lifetime,
            before.node_certificate_lifetime
        );
        assert_eq!(c.lifetimes().await.expect("l").user.as_secs(), 120);
        for bad in [d(59), d(11 * 365 * 86_400), None] {
            let new = ClusterConfiguration {
                user_certificate_lifetime: bad,
                ..Default::default()
            };
            let err = c.configure(None, new, &path).await.unwrap_err();
            assert!(matches!(err, CuratorError::InvalidArgument(_)), "{err}");
        }
        // base_config is compared per named path.
        let stale = ClusterConfiguration {
            user_certificate_lifetime: d(999),
            ..Default::default()
        };
        let new = ClusterConfiguration {
            user_certificate_lifetime: d(300),
            ..Default::default()
        };
        let err = c.configure(Some(stale), new, &path).await.unwrap_err();
        assert!(matches!(err, CuratorError::FailedPrecondition(_)), "{err}");
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
            let mutable_only = paths.iter().all(|p| MUTABLE_PATHS.contains(&p.as_str()));
            match result {
                // An empty mask changes nothing and answers the configuration.
                Ok(_) if paths.is_empty() => {}
                Ok(out) => {
                    prop_assert!(mutable_only, "accepted mask {paths:?}");
                    prop_assert_eq!(sync_regexps(&out), rs.clone());
                    prop_assert_eq!(out.cluster_domain, DEFAULT_CLUSTER_DOMAIN);
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

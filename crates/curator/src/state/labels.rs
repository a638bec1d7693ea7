//! Node labels.

use super::*;
use metropolis_api::quote;

impl Cluster {
    /// Applies label upserts and deletes in one atomic change.
    pub async fn update_labels(
        &self,
        id: &str,
        upsert: Vec<(String, String)>,
        delete: Vec<String>,
    ) -> Result<(), CuratorError> {
        for (k, v) in &upsert {
            crate::labels::validate_key(k).map_err(CuratorError::InvalidArgument)?;
            crate::labels::validate_value(v).map_err(CuratorError::InvalidArgument)?;
        }
        for k in &delete {
            crate::labels::validate_key(k).map_err(CuratorError::InvalidArgument)?;
        }
        let mut seen = std::collections::HashSet::new();
        for (k, _) in &upsert {
            if !seen.insert(k.as_str()) {
                return Err(CuratorError::InvalidArgument(format!(
                    "label key {} is upserted twice",
                    quote(k)
                )));
            }
        }
        if let Some(k) = delete.iter().find(|k| seen.contains(k.as_str())) {
            return Err(CuratorError::InvalidArgument(format!(
                "label key {} is both upserted and deleted",
                quote(k)
            )));
        }
        self.update_node(id, |node| {
            let labels = node.labels.get_or_insert_with(Default::default);
            let before = labels.clone();
            labels.pairs.retain(|p| !delete.contains(&p.key));
            for (k, v) in &upsert {
                match labels.pairs.iter_mut().find(|p| &p.key == k) {
                    Some(p) => p.value = v.clone(),
                    None => labels
                        .pairs
                        .push(metropolis_api::common::node_labels::Pair {
                            key: k.clone(),
                            value: v.clone(),
                        }),
                }
            }
            if labels.pairs.len() > crate::labels::MAX_LABELS {
                return Err(CuratorError::InvalidArgument(format!(
                    "node {id} would have {} labels; at most {} are allowed",
                    labels.pairs.len(),
                    crate::labels::MAX_LABELS
                )));
            }
            Ok(if *labels == before {
                Change::Keep(())
            } else {
                Change::Write(())
            })
        })
        .await
    }
}

#[cfg(test)]
mod operate_tests {
    use super::*;

    async fn cluster() -> (test_support::Backing, Arc<Cluster>, String) {
        let t = test_support::bootstrapped().await;
        (t.dir, t.cluster, t.first_id)
    }

    fn kv(k: &str, v: &str) -> (String, String) {
        (k.into(), v.into())
    }

    #[tokio::test]
    async fn labels_upsert_delete_and_validate() {
        let (_d, c, id) = cluster().await;
        c.update_labels(&id, vec![kv("zone", "a"), kv("rack", "1")], vec![])
            .await
            .expect("upsert");
        c.update_labels(&id, vec![kv("zone", "b")], vec!["rack".into()])
            .await
            .expect("mixed");
        let labels = c
            .node(&id)
            .await
            .expect("read")
            .expect("node")
            .node
            .labels
            .expect("labels");
        assert_eq!(labels.pairs.len(), 1);
        assert_eq!(
            (labels.pairs[0].key.as_str(), labels.pairs[0].value.as_str()),
            ("zone", "b")
        );
        for (upsert, delete) in [
            (vec![kv("bad key", "x")], vec![]),
            (vec![kv("zone", "-x")], vec![]),
            (vec![kv("zone", "a")], vec!["zone".to_string()]),
            (vec![kv("z", "a"), kv("z", "b")], vec![]),
            (vec![], vec!["/bad".to_string()]),
        ] {
            let r = c.update_labels(&id, upsert, delete).await;
            assert!(matches!(r, Err(CuratorError::InvalidArgument(_))), "{r:?}");
        }
        let many: Vec<_> = (0..129).map(|i| kv(&format!("k{i}"), "v")).collect();
        assert!(matches!(
            c.update_labels(&id, many, vec![]).await,
            Err(CuratorError::InvalidArgument(_))
        ));
        assert!(matches!(
            c.update_labels("metropolis-nope", vec![kv("a", "b")], vec![])
                .await,
            Err(CuratorError::NotFound(_))
        ));
    }
}

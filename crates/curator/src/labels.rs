//! Node label validation, with Kubernetes' rules so labels can be synchronized
//! to Kubernetes nodes unchanged.

use metropolis_api::common::NodeLabels;
use metropolis_api::quote;

/// Most labels a node may carry.
pub const MAX_LABELS: usize = 128;
const MAX_NAME: usize = 63;
const MAX_PREFIX: usize = 253;

/// Checks a label key: an optional DNS-subdomain prefix and `/`, then a name.
pub fn validate_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        validate_dns_subdomain(prefix)
            .map_err(|e| format!("label key {}: prefix {e}", quote(key)))?;
    }
    validate_name(name).map_err(|e| format!("label key {}: name {e}", quote(key)))
}

/// Checks a label value: empty, or a name.
pub fn validate_value(value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Ok(());
    }
    validate_name(value).map_err(|e| format!("label value {}: {e}", quote(value)))
}

fn validate_name(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s.len() > MAX_NAME {
        return Err(format!(
            "is {} characters long; at most {MAX_NAME} are allowed",
            s.len()
        ));
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err("may contain only letters, digits, '-', '_' and '.'".into());
    }
    let alnum = |b: Option<u8>| b.is_some_and(|b| b.is_ascii_alphanumeric());
    if !alnum(s.bytes().next()) || !alnum(s.bytes().last()) {
        return Err("must start and end with a letter or digit".into());
    }
    Ok(())
}

fn validate_dns_subdomain(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > MAX_PREFIX {
        return Err(format!("must be 1 to {MAX_PREFIX} characters long"));
    }
    for part in s.split('.') {
        let ok = !part.is_empty()
            && part.len() <= 63
            && part
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !part.starts_with('-')
            && !part.ends_with('-');
        if !ok {
            return Err(format!(
                "{} is not a DNS subdomain (lowercase letters, digits, '-' and '.')",
                quote(s)
            ));
        }
    }
    Ok(())
}

/// Keeps the valid labels of a node's initial set (from its Node Parameters)
/// and returns a description of each dropped one, for the caller to log: a
/// node must come up even when its parameters carry a bad label.
pub fn sanitize_initial(labels: Option<NodeLabels>) -> (NodeLabels, Vec<String>) {
    let mut kept = NodeLabels::default();
    let mut dropped = Vec::new();
    for pair in labels.map(|l| l.pairs).unwrap_or_default() {
        let check = validate_key(&pair.key).and_then(|_| validate_value(&pair.value));
        if let Err(e) = check {
            dropped.push(e);
        } else if kept.pairs.iter().any(|p| p.key == pair.key) {
            dropped.push(format!("label key {}: duplicate", quote(&pair.key)));
        } else if kept.pairs.len() >= MAX_LABELS {
            dropped.push(format!(
                "label key {}: more than {MAX_LABELS} labels",
                quote(&pair.key)
            ));
        } else {
            kept.pairs.push(pair);
        }
    }
    (kept, dropped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use metropolis_api::common::node_labels::Pair;

    #[test]
    fn keys() {
        for ok in ["zone", "a", "example.com/zone", "k8s.io/a-b_c.d", "A1"] {
            assert!(validate_key(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "a b",
            "/a",
            "Example.com/a",
            "a/",
            &"x".repeat(64),
            "a/b/c",
        ] {
            assert!(validate_key(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn values() {
        assert!(validate_value("").is_ok());
        assert!(validate_value("eu-west.1").is_ok());
        assert!(validate_value(&"v".repeat(63)).is_ok());
        assert!(validate_value(&"v".repeat(64)).is_err());
        assert!(validate_value("a/b").is_err());
    }

    #[test]
    fn initial_labels_drop_invalid_and_duplicates() {
        let pair = |k: &str, v: &str| Pair {
            key: k.into(),
            value: v.into(),
        };
        let (kept, dropped) = sanitize_initial(Some(NodeLabels {
            pairs: vec![
                pair("zone", "a"),
                pair("bad key", "x"),
                pair("zone", "b"),
                pair("rack", "-x"),
            ],
        }));
        assert_eq!(kept.pairs, vec![pair("zone", "a")]);
        assert_eq!(dropped.len(), 3);
    }
}

#[cfg(test)]
mod props {
    use super::*;
    use metropolis_api::testing::props;
    use metropolis_api::testing::proptest::prelude::*;

    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<String>(),
            "[a-zA-Z0-9._/-]{0,80}",
            "([a-z0-9-]{1,10}\\.){0,4}[a-z0-9-]{0,10}/[a-zA-Z0-9._-]{0,70}",
            "[a-z]{0,5}".prop_map(|s| s.repeat(60)),
        ]
    }

    #[test]
    fn props_label_keys_and_values() {
        props("label keys and values", (text(), text()), |(key, value)| {
            let name_ok = |n: &str| {
                !n.is_empty()
                    && n.len() <= MAX_NAME
                    && n.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            };
            match validate_key(&key) {
                Ok(()) => {
                    let name = key.rsplit_once('/').map_or(key.as_str(), |(_, n)| n);
                    prop_assert!(name_ok(name), "accepted key {key:?}");
                    prop_assert!(key.len() <= MAX_PREFIX + 1 + MAX_NAME);
                }
                Err(e) => prop_assert!(e.len() < 512, "a {} byte message", e.len()),
            }
            match validate_value(&value) {
                Ok(()) => prop_assert!(value.is_empty() || name_ok(&value), "{value:?}"),
                Err(e) => prop_assert!(e.len() < 512, "a {} byte message", e.len()),
            }
            let pairs = vec![metropolis_api::common::node_labels::Pair { key, value }; 2];
            let (kept, dropped) = sanitize_initial(Some(NodeLabels { pairs }));
            prop_assert_eq!(kept.pairs.len() + dropped.len(), 2);
            prop_assert!(kept.pairs.len() <= 1, "a duplicate was kept");
            Ok(())
        });
    }
}

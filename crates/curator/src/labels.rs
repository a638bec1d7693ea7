//! Node label validation as upstream's `ValidateLabelKey` and
//! `ValidateLabelValue` (Kubernetes' rules, so labels can be synchronized to
//! Kubernetes nodes unchanged; the key prefix is a domain name that does not
//! end in a number).

use metropolis_api::common::NodeLabels;
use metropolis_api::quote;

/// Most labels a node may carry.
pub const MAX_LABELS: usize = 128;
const MAX_NAME: usize = 63;

/// Checks a label key: an optional DNS-subdomain prefix and `/`, then a name.
pub fn validate_key(key: &str) -> Result<(), String> {
    let short = quote(key);
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        if prefix.is_empty() {
            return Err(format!("label key {short}: empty prefix"));
        }
        if name.contains('/') {
            return Err(format!(
                "label key {short}: at most one '/' (between prefix and name)"
            ));
        }
        crate::dns::validate_domain_name(prefix)
            .map_err(|e| format!("label key {short}: invalid prefix: {e}"))?;
    }
    validate_name(name).map_err(|e| format!("label key {short}: name {e}"))
}

/// Checks a label value: empty, or a name.
pub fn validate_value(value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Ok(());
    }
    let short = quote(value);
    validate_name(value).map_err(|e| format!("label value {short}: {e}"))
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
            dropped.push(format!("label key {:?}: duplicate", pair.key));
        } else if kept.pairs.len() >= MAX_LABELS {
            dropped.push(format!(
                "label key {:?}: more than {MAX_LABELS} labels",
                pair.key
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
        for ok in [
            "zone",
            "a",
            "example.com/zone",
            "k8s.io/a-b_c.d",
            "A1",
            "10.0.0.1a/zone",
        ] {
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
            "10.0.0.1/zone",
            "example.0x1f/zone",
            "example.com./zone",
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

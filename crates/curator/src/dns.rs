//! Domain names as upstream validates them (`metropolis/node/validation.go`):
//! the cluster domain and the prefix of a label key.

/// Longest domain name DNS carries, without the trailing dot.
const DOMAIN_NAME_MAX: usize = 253;
/// Longest cluster domain: leaves room for names under it within 253.
pub const CLUSTER_DOMAIN_MAX: usize = 80;
const LABEL_MAX: usize = 63;

/// A DNS name without a trailing dot: labels of 1 to 63 lowercase letters,
/// digits and `-`, not starting or ending with `-`, separated by `.`; and
/// not ending in a number (`10.0.0.1`, `a.0x1f`), which URL parsers would
/// read as an IPv4 address.
pub fn validate_domain_name(d: &str) -> Result<(), &'static str> {
    if d.len() > DOMAIN_NAME_MAX {
        return Err("too long, must have length at most 253");
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= LABEL_MAX
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if !d.split('.').all(label_ok) {
        return Err(
            "must consist of labels separated by '.', where each label has between 1 and 63 lowercase \
             letters, digits or '-', and must not start or end with '-'",
        );
    }
    let last = d.rsplit('.').next().unwrap_or(d);
    let hex = last
        .strip_prefix("0x")
        .is_some_and(|h| h.bytes().all(|b| b.is_ascii_hexdigit()));
    if hex || last.bytes().all(|b| b.is_ascii_digit()) {
        return Err("must not end in a number");
    }
    Ok(())
}

/// A cluster domain: a domain name of at most [`CLUSTER_DOMAIN_MAX`] bytes.
pub fn validate_cluster_domain(d: &str) -> Result<(), &'static str> {
    if d.len() > CLUSTER_DOMAIN_MAX {
        return Err("too long, must have length at most 80");
    }
    validate_domain_name(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_names_as_upstream() {
        for ok in [
            "cluster.internal",
            "a",
            "example.com",
            "k8s.io",
            "a-b.c1",
            "1a.b2c",
            "0xg",
        ] {
            assert_eq!(validate_domain_name(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "10.0.0.1",
            "a.1",
            "123",
            "a.0x1f",
            "0x",
            "Example.com",
            "a..b",
            "a.",
            "-a",
            "a-",
            "a_b",
            &"a".repeat(64),
            &format!("{}.b", "a.".repeat(130)),
        ] {
            assert!(validate_domain_name(bad).is_err(), "{bad}");
        }
        assert!(validate_cluster_domain(&format!("{}.x", "a".repeat(60))).is_ok());
        assert!(validate_cluster_domain(&format!("{}.x", "a".repeat(60).repeat(2))).is_err());
    }
}

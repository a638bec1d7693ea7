//! The method → permissions table, generated from the .proto options.

use crate::ext::Permission;

/// What one RPC method requires of its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MethodAuthorization {
    /// gRPC path, `/package.Service/Method`.
    pub path: &'static str,
    /// Raw `Permission` numbers; see [`MethodAuthorization::need`].
    pub need: &'static [i32],
    pub allow_unauthenticated: bool,
}

impl MethodAuthorization {
    /// The permissions a caller must hold, all of them.
    pub fn need(&self) -> impl Iterator<Item = Permission> + '_ {
        // The build script only emits numbers it read from the enum, so the
        // conversion cannot fail for a table generated from the same protos.
        self.need
            .iter()
            .filter_map(|n| Permission::try_from(*n).ok())
    }
}

include!(concat!(env!("OUT_DIR"), "/authorization_table.rs"));

/// Looks up a method by its gRPC path.
pub fn lookup(path: &str) -> Option<&'static MethodAuthorization> {
    METHODS
        .binary_search_by(|m| m.path.cmp(path))
        .ok()
        .map(|i| &METHODS[i])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_sorted_and_complete() {
        assert!(METHODS.windows(2).all(|w| w[0].path < w[1].path));
        let escrow = lookup("/metropolis.proto.api.AAA/Escrow").expect("escrow");
        assert!(escrow.allow_unauthenticated && escrow.need.is_empty());
        let info = lookup("/metropolis.proto.api.Management/GetClusterInfo").expect("info");
        assert!(!info.allow_unauthenticated);
        assert_eq!(
            info.need().collect::<Vec<_>>(),
            vec![Permission::ReadClusterStatus]
        );
        let del = lookup("/metropolis.proto.api.Management/DeleteNode").expect("delete");
        assert_eq!(del.need().collect::<Vec<_>>(), vec![Permission::DeleteNode]);
        assert!(lookup("/metropolis.proto.api.Management/Nope").is_none());
        // Every service method the contract lists is present.
        for svc in ["AAA", "Management", "NodeManagement", "NodeDebugService"] {
            assert!(
                METHODS
                    .iter()
                    .any(|m| m.path.starts_with(&format!("/metropolis.proto.api.{svc}/")))
            );
        }
        assert_eq!(
            METHODS
                .iter()
                .filter(|m| m.path.starts_with("/metropolis.proto.api.Management/"))
                .count(),
            9
        );
    }
}

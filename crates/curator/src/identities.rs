//! Named identities besides the bootstrap owner, and what their roles allow.
//!
//! Key layout (next to the cluster state in [`crate::state`]):
//!
//! | key                  | value              |
//! |----------------------|--------------------|
//! | `/identities/<name>` | `private.Identity` |
//!
//! The bootstrap owner is not stored here: its key lives at `/cluster/owner`
//! from the moment the cluster exists, and the name `owner` is reserved for
//! it. Every call is authorized against these records (see
//! [`crate::authz::ClusterAuthorizer`]), so removing a record is what makes
//! the identity's certificate stop working; certificates themselves never
//! expire and are not revoked.

use metropolis_api::quote;
use std::time::SystemTime;

use metropolis_api::admin::Role;
use metropolis_api::ext::Permission;
use metropolis_api::private;
use metropolis_rpc::Permissions;
use metropolis_store::{Compare, Op, Store, Txn};
use prost::Message;

use crate::aaa::OWNER;
use crate::error::CuratorError;
use crate::leader::Fence;

pub const IDENTITIES_PREFIX: &str = "/identities/";

/// Longest identity name; also the limit the certificate authority puts on
/// common names.
pub const MAX_NAME_LEN: usize = 64;

/// How often a remove is retried when the record changed under it.
const CAS_ATTEMPTS: usize = 16;

pub fn identity_key(name: &str) -> String {
    format!("{IDENTITIES_PREFIX}{name}")
}

/// The one place roles turn into permissions.
pub fn role_permissions(role: Role) -> Option<Permissions> {
    match role {
        Role::Unspecified => None,
        Role::Owner => Some(Permissions::ALL),
        Role::Operator => Some(
            Permissions::ALL
                .without(Permission::ConfigureCluster)
                .without(Permission::DeleteNode),
        ),
        Role::Reader => Some(Permissions::of(&[
            Permission::ReadClusterStatus,
            Permission::ReadNodeLogs,
        ])),
    }
}

/// The role named by a raw enum number, if it is one a caller may assign.
pub fn parse_role(role: i32) -> Result<Role, CuratorError> {
    match Role::try_from(role) {
        Ok(Role::Unspecified) | Err(_) => Err(CuratorError::InvalidArgument(format!(
            "role {role} is not a role; use ROLE_OWNER, ROLE_OPERATOR or ROLE_READER"
        ))),
        Ok(r) => Ok(r),
    }
}

/// Short lowercase name of a role (`owner`, `operator`, `reader`).
pub fn role_name(role: i32) -> &'static str {
    match Role::try_from(role) {
        Ok(Role::Owner) => "owner",
        Ok(Role::Operator) => "operator",
        Ok(Role::Reader) => "reader",
        _ => "unknown",
    }
}

/// Checks the syntax of a name: 1–64 characters of `[a-z0-9._-]`, starting
/// with a letter or digit. Names end up in store keys and certificate common
/// names, so nothing that could be read as a path or need escaping is allowed.
pub fn validate_name(name: &str) -> Result<(), CuratorError> {
    let bad = |why: &str| {
        Err(CuratorError::InvalidArgument(format!(
            "identity name {} {why}; names are 1 to {MAX_NAME_LEN} characters of \
             a-z, 0-9, '.', '_' and '-', starting with a letter or digit",
            quote(name)
        )))
    };
    let Some(first) = name.bytes().next() else {
        return bad("is empty");
    };
    if name.len() > MAX_NAME_LEN {
        return bad("is too long");
    }
    if !(first.is_ascii_lowercase() || first.is_ascii_digit()) {
        return bad("does not start with a letter or digit");
    }
    if !name.bytes().all(|b| {
        b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'_' || b == b'-'
    }) {
        return bad("contains other characters");
    }
    Ok(())
}

/// A name a new identity may take: valid and not the owner's.
fn validate_new_name(name: &str) -> Result<(), CuratorError> {
    validate_name(name)?;
    if name == OWNER {
        return Err(CuratorError::InvalidArgument(format!(
            "{OWNER:?} is reserved for the bootstrap owner; choose another name \
             (a named identity with role owner has the same permissions)"
        )));
    }
    Ok(())
}

fn decode(key: &str, bytes: &[u8]) -> Result<private::Identity, CuratorError> {
    private::Identity::decode(bytes).map_err(|e| CuratorError::Corrupt(format!("{key}: {e}")))
}

/// A 32-byte public key that is a point on the curve.
pub fn parse_public_key(key: &[u8]) -> Result<[u8; 32], CuratorError> {
    let bytes: [u8; 32] = key.try_into().map_err(|_| {
        CuratorError::InvalidArgument(format!(
            "public_key must be a raw 32-byte Ed25519 public key, got {} bytes \
             (the holder makes one with `metroctl user keygen`)",
            key.len()
        ))
    })?;
    metropolis_identity::VerifyingKey::from_bytes(&bytes).map_err(|_| {
        CuratorError::InvalidArgument("public_key is not a valid Ed25519 public key".into())
    })?;
    Ok(bytes)
}

/// The identity called `name`, if there is one. The owner is not an entry;
/// invalid names are simply not found.
pub async fn get(store: &dyn Store, name: &str) -> Result<Option<private::Identity>, CuratorError> {
    if validate_name(name).is_err() || name == OWNER {
        return Ok(None);
    }
    let key = identity_key(name);
    match store.get(key.as_bytes()).await? {
        Some(kv) => Ok(Some(decode(&key, &kv.value)?)),
        None => Ok(None),
    }
}

/// Every named identity, by name.
pub async fn list(store: &dyn Store) -> Result<Vec<private::Identity>, CuratorError> {
    let range = store.range(IDENTITIES_PREFIX.as_bytes()).await?;
    range
        .kvs
        .iter()
        .map(|kv| decode(&String::from_utf8_lossy(&kv.key), &kv.value))
        .collect()
}

/// Registers a new identity. Fails with ALREADY_EXISTS if the name is taken:
/// changing a key or role is a remove and an add, so that nobody replaces an
/// identity by accident.
pub async fn add(
    store: &dyn Store,
    fence: &Fence,
    owner_public_key: [u8; 32],
    name: &str,
    public_key: &[u8],
    role: i32,
) -> Result<private::Identity, CuratorError> {
    validate_new_name(name)?;
    let public_key = parse_public_key(public_key)?;
    let role = parse_role(role)?;
    // One key, one identity: a certificate names one identity, and a key
    // shared between two would make "who did this" ambiguous in the audit
    // log. Not part of the transaction below: a race only produces the
    // ambiguity this check is for, never more access.
    if public_key == owner_public_key {
        return Err(CuratorError::InvalidArgument(
            "this public key is the bootstrap owner's; each identity needs its own key \
             (the holder makes one with `metroctl user keygen`)"
                .into(),
        ));
    }
    if let Some(other) = list(store)
        .await?
        .into_iter()
        .find(|i| i.public_key == public_key)
    {
        return Err(CuratorError::InvalidArgument(format!(
            "this public key already belongs to identity {:?}; each identity needs its own key \
             (the holder makes one with `metroctl user keygen`)",
            other.name
        )));
    }
    let identity = private::Identity {
        name: name.to_string(),
        public_key: public_key.to_vec(),
        role: role as i32,
        created_at: Some(prost_types::Timestamp::from(SystemTime::now())),
    };
    let key = identity_key(name);
    let txn = Txn::new()
        .when(Compare::absent(key.clone()))
        .and_then(Op::put(key, identity.encode_to_vec()));
    if !fence.commit(store, txn).await?.succeeded {
        return Err(CuratorError::AlreadyExists(format!(
            "identity {} already exists; remove it first to change its key or role",
            quote(name)
        )));
    }
    Ok(identity)
}

/// Forgets an identity; its certificates stop working with the next call.
pub async fn remove(
    store: &dyn Store,
    fence: &Fence,
    name: &str,
) -> Result<private::Identity, CuratorError> {
    validate_name(name)?;
    if name == OWNER {
        return Err(CuratorError::InvalidArgument(format!(
            "{OWNER:?} is the bootstrap owner and cannot be removed"
        )));
    }
    let key = identity_key(name);
    for _ in 0..CAS_ATTEMPTS {
        let Some(kv) = store.get(key.as_bytes()).await? else {
            return Err(CuratorError::NotFound(format!(
                "identity {} not found; `metroctl user list` shows the identities",
                quote(name)
            )));
        };
        let identity = decode(&key, &kv.value)?;
        // Only delete the record we read: a remove racing with a remove and
        // re-add must not take away the new identity.
        let txn = Txn::new()
            .when(Compare::mod_revision(key.clone(), kv.mod_revision))
            .and_then(Op::delete(key.clone()));
        if fence.commit(store, txn).await?.succeeded {
            return Ok(identity);
        }
    }
    Err(CuratorError::Internal(format!(
        "identity {} kept changing; gave up after {CAS_ATTEMPTS} attempts",
        quote(name)
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    async fn store() -> (crate::state::test_support::Backing, Arc<dyn Store>) {
        let (backing, store, _) = crate::state::test_support::store().await;
        (backing, store)
    }

    fn key() -> [u8; 32] {
        metropolis_identity::generate_key()
            .verifying_key()
            .to_bytes()
    }

    const OWNER_KEY: [u8; 32] = [7; 32];

    /// Writes outside any leadership (no fence set), as most tests need.
    async fn add_unfenced(
        s: &dyn Store,
        name: &str,
        key: &[u8],
        role: i32,
    ) -> Result<private::Identity, CuratorError> {
        add(s, &Fence::default(), OWNER_KEY, name, key, role).await
    }

    async fn names_in(s: &dyn Store) -> Vec<String> {
        list(s)
            .await
            .expect("list")
            .into_iter()
            .map(|i| i.name)
            .collect()
    }

    async fn remove_unfenced(s: &dyn Store, name: &str) -> Result<private::Identity, CuratorError> {
        remove(s, &Fence::default(), name).await
    }

    #[test]
    fn names() {
        for ok in ["a", "alice", "ci-bot.2", "0", "a_b", &"x".repeat(64)] {
            validate_name(ok).unwrap_or_else(|e| panic!("{ok:?}: {e}"));
        }
        for bad in [
            "",
            "Alice",
            "-a",
            ".a",
            "_a",
            "a b",
            "a/b",
            "ä",
            &"x".repeat(65),
        ] {
            assert!(
                matches!(validate_name(bad), Err(CuratorError::InvalidArgument(_))),
                "{bad:?}"
            );
        }
        assert!(validate_name("owner").is_ok());
        assert!(validate_new_name("owner").is_err());
    }

    #[test]
    fn roles() {
        let owner = role_permissions(Role::Owner).expect("owner");
        let operator = role_permissions(Role::Operator).expect("operator");
        let reader = role_permissions(Role::Reader).expect("reader");
        assert!(role_permissions(Role::Unspecified).is_none());
        for p in [
            Permission::GetRegisterTicket,
            Permission::ReadClusterStatus,
            Permission::ApproveNode,
            Permission::UpdateNodeRoles,
            Permission::ReadNodeLogs,
            Permission::UpdateNode,
            Permission::DecommissionNode,
            Permission::DeleteNode,
            Permission::UpdateNodeLabels,
            Permission::NodePowerManagement,
            Permission::ConfigureCluster,
        ] {
            assert!(owner.contains(p), "owner {p:?}");
            let operator_may = !matches!(p, Permission::ConfigureCluster | Permission::DeleteNode);
            assert_eq!(operator.contains(p), operator_may, "operator {p:?}");
            let reader_may = matches!(p, Permission::ReadClusterStatus | Permission::ReadNodeLogs);
            assert_eq!(reader.contains(p), reader_may, "reader {p:?}");
        }
        assert!(parse_role(Role::Reader as i32).is_ok());
        assert!(parse_role(0).is_err());
        assert!(parse_role(99).is_err());
    }

    /// Identities grant access: a curator deposed while adding or removing
    /// one must not commit it.
    #[tokio::test]
    async fn writes_commit_only_under_the_fencing_leadership() {
        let (_d, s) = store().await;
        let leader = crate::leader::KEY_LEADER;
        let claim = s
            .txn(Txn::new().and_then(Op::put(leader, b"me".to_vec())))
            .await
            .expect("claim");
        assert!(claim.succeeded);
        let rev = s
            .get(leader.as_bytes())
            .await
            .expect("get")
            .expect("leader key")
            .create_revision;
        let fence = Fence::default();
        fence.set(rev);
        add(
            s.as_ref(),
            &fence,
            OWNER_KEY,
            "bob",
            &key(),
            Role::Reader as i32,
        )
        .await
        .expect("add while leading");

        // Deposed: the key is gone (or belongs to a newer leader).
        s.txn(Txn::new().and_then(Op::delete(leader)))
            .await
            .expect("depose");
        let lost = |r: Result<private::Identity, CuratorError>| {
            matches!(
                r,
                Err(CuratorError::Store(
                    metropolis_store::StoreError::Unavailable(_)
                ))
            )
        };
        assert!(lost(
            add(
                s.as_ref(),
                &fence,
                OWNER_KEY,
                "eve",
                &key(),
                Role::Owner as i32
            )
            .await
        ));
        assert!(lost(remove(s.as_ref(), &fence, "bob").await));
        let names = names_in(s.as_ref()).await;
        assert_eq!(names, ["bob"]);
    }

    #[tokio::test]
    async fn add_get_list_remove() {
        let (_d, s) = store().await;
        let (k1, k2) = (key(), key());
        let added = add_unfenced(s.as_ref(), "bob", &k1, Role::Reader as i32)
            .await
            .expect("add");
        assert_eq!(added.public_key, k1);
        assert!(added.created_at.is_some());
        add_unfenced(s.as_ref(), "alice", &k2, Role::Operator as i32)
            .await
            .expect("add");
        let got = get(s.as_ref(), "bob").await.expect("get").expect("bob");
        assert_eq!(got, added);
        let names = names_in(s.as_ref()).await;
        assert_eq!(names, vec!["alice", "bob"]);

        // Taken names, reserved names, bad input.
        let again = add_unfenced(s.as_ref(), "bob", &key(), Role::Owner as i32).await;
        assert!(
            matches!(again, Err(CuratorError::AlreadyExists(_))),
            "{again:?}"
        );
        for (name, k, role) in [
            ("owner", key().to_vec(), Role::Owner as i32),
            ("Bad", key().to_vec(), Role::Reader as i32),
            ("carol", vec![1; 31], Role::Reader as i32),
            ("carol", key().to_vec(), 0),
            ("carol", key().to_vec(), 42),
            ("carol", k1.to_vec(), Role::Reader as i32),
            ("carol", OWNER_KEY.to_vec(), Role::Reader as i32),
        ] {
            let r = add_unfenced(s.as_ref(), name, &k, role).await;
            assert!(
                matches!(r, Err(CuratorError::InvalidArgument(_))),
                "{name} {role}: {r:?}"
            );
        }
        // 32 bytes that are not a curve point.
        let not_a_point = (0u8..=255)
            .map(|b| [b; 32])
            .find(|k| metropolis_identity::VerifyingKey::from_bytes(k).is_err())
            .expect("some byte pattern is not a curve point");
        let r = add_unfenced(s.as_ref(), "dave", &not_a_point, 3).await;
        assert!(matches!(r, Err(CuratorError::InvalidArgument(_))), "{r:?}");
        assert!(get(s.as_ref(), "owner").await.expect("get").is_none());
        assert!(
            get(s.as_ref(), "../cluster/ca")
                .await
                .expect("get")
                .is_none()
        );

        let removed = remove_unfenced(s.as_ref(), "bob").await.expect("remove");
        assert_eq!(removed.name, "bob");
        assert!(get(s.as_ref(), "bob").await.expect("get").is_none());
        assert!(matches!(
            remove_unfenced(s.as_ref(), "bob").await,
            Err(CuratorError::NotFound(_))
        ));
        assert!(matches!(
            remove_unfenced(s.as_ref(), "owner").await,
            Err(CuratorError::InvalidArgument(_))
        ));
        assert!(matches!(
            remove_unfenced(s.as_ref(), "no such/name").await,
            Err(CuratorError::InvalidArgument(_))
        ));
        // The name is free again, for another key.
        add_unfenced(s.as_ref(), "bob", &key(), Role::Owner as i32)
            .await
            .expect("re-add");
    }
}

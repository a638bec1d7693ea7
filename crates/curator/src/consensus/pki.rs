//! The consensus PKI: a CA of its own for etcd's peer port.
//!
//! etcd trusts, on its peer port, every certificate its trusted CA signed.
//! Were that the cluster CA, any owner, reader, operator or node certificate
//! would pass (etcd's peer endpoints include `/members` and raft itself). So
//! a cluster has a second CA, the *consensus CA*, which issues etcd peer
//! certificates to consensus members and nothing else, and a CRL of the peer
//! certificates of former members: etcd reads it on every new peer
//! connection, and every consensus member keeps its copy current from
//! [`KEY_CRL`], so a member whose role is removed is refused at once.
//!
//! Both live in the cluster state: the CA (with its key) and the revoked
//! serials at [`KEY_PKI`], the CRL made from them at [`KEY_CRL`]. A
//! revocation is written in the same transaction as the role change that
//! causes it.
//!
//! Peer certificates live as long as node certificates (the configured node
//! lifetime). A member renews its own at a third left
//! ([`Cluster::renew_peer_certificate`]): the new certificate replaces the
//! old one in its ConsensusMember role, so a later removal revokes the one
//! it holds, and the ones before it expire by themselves. A revoked serial
//! leaves the CRL once its certificate is past its end (and
//! [`CLOCK_SKEW`]): etcd refuses it then anyway.
//!
//! [`CLOCK_SKEW`]: metropolis_identity::CLOCK_SKEW

use std::net::IpAddr;
use std::time::Duration;

use metropolis_api::private;
use metropolis_identity::{CertificateAuthority, Revoked};
use metropolis_store::{Compare, Op};
use prost::Message;

use crate::error::CuratorError;
use crate::state::Cluster;

/// The consensus CA and the revoked peer certificates (`private.ConsensusPKI`).
pub const KEY_PKI: &str = "/cluster/consensus-pki";
/// The consensus CA's CRL (DER), which consensus members hand to etcd.
pub const KEY_CRL: &str = "/cluster/consensus-crl";

/// Subject common name of the consensus CA.
const CA_NAME: &str = "Metropolis Consensus CA";

/// The consensus PKI as read from the store (or made for a new cluster).
#[derive(Clone)]
pub struct ConsensusPki {
    ca: CertificateAuthority,
    record: private::ConsensusPki,
    /// Revision of [`KEY_PKI`] as read; 0 for one not stored yet.
    mod_revision: i64,
}

impl std::fmt::Debug for ConsensusPki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsensusPki")
            .field("ca", &self.ca)
            .field("revoked", &self.record.revoked.len())
            .finish_non_exhaustive()
    }
}

impl ConsensusPki {
    /// A new consensus CA with nothing revoked, not stored yet.
    pub fn generate() -> Result<ConsensusPki, CuratorError> {
        let ca = CertificateAuthority::generate_named(CA_NAME)
            .map_err(|e| CuratorError::Internal(format!("generating the consensus CA: {e}")))?;
        let record = private::ConsensusPki {
            ca_certificate: ca.cert_der().to_vec(),
            ca_key_seed: ca.key_seed().to_vec(),
            revoked: Vec::new(),
            crl_number: 1,
        };
        Ok(ConsensusPki {
            ca,
            record,
            mod_revision: 0,
        })
    }

    fn decode(bytes: &[u8], mod_revision: i64) -> Result<ConsensusPki, CuratorError> {
        let record = private::ConsensusPki::decode(bytes)
            .map_err(|e| CuratorError::Corrupt(format!("{KEY_PKI}: {e}")))?;
        let seed: [u8; 32] =
            record.ca_key_seed.as_slice().try_into().map_err(|_| {
                CuratorError::Corrupt(format!("{KEY_PKI}: key seed is not 32 bytes"))
            })?;
        let ca = CertificateAuthority::from_parts(record.ca_certificate.clone(), seed)
            .map_err(|e| CuratorError::Corrupt(format!("{KEY_PKI}: {e}")))?;
        Ok(ConsensusPki {
            ca,
            record,
            mod_revision,
        })
    }

    /// The PKI as stored at [`KEY_PKI`] (a restore reads it from a backup).
    pub fn from_stored(value: &[u8], mod_revision: i64) -> Result<ConsensusPki, CuratorError> {
        Self::decode(value, mod_revision)
    }

    /// The consensus CA certificate (DER): what etcd's peer port trusts.
    pub fn ca_certificate(&self) -> &[u8] {
        self.ca.cert_der()
    }

    /// The consensus CA's key seed: every consensus member keeps a copy, to
    /// issue itself a stopgap peer certificate when every member's expired
    /// (the node's `consensus::stopgap_peer_certificate`).
    pub fn ca_key_seed(&self) -> [u8; 32] {
        self.ca.key_seed()
    }

    /// An etcd peer certificate for the node with `public_key`, serving at
    /// `address`, valid for `lifetime` (the node certificate lifetime:
    /// [`crate::state::Lifetimes::node`]).
    pub fn issue_peer_certificate(
        &self,
        public_key: &[u8; 32],
        address: IpAddr,
        lifetime: Duration,
    ) -> Result<Vec<u8>, CuratorError> {
        self.ca
            .issue_peer_certificate(public_key, address, lifetime)
            .map_err(|e| CuratorError::Internal(format!("issuing an etcd peer certificate: {e}")))
    }

    /// The CRL of everything revoked so far (DER).
    pub fn crl(&self) -> Result<Vec<u8>, CuratorError> {
        let revoked: Vec<Revoked> = self
            .record
            .revoked
            .iter()
            .map(|r| Revoked {
                serial: r.serial.clone(),
                revoked_at: r
                    .revoked_at
                    .and_then(|t| time::OffsetDateTime::from_unix_timestamp(t.seconds).ok())
                    .unwrap_or(time::OffsetDateTime::UNIX_EPOCH),
            })
            .collect();
        self.ca
            .issue_crl(&revoked, self.record.crl_number)
            .map_err(|e| CuratorError::Internal(format!("issuing the consensus CRL: {e}")))
    }

    /// Whether the certificate with this serial is revoked.
    pub fn is_revoked(&self, serial: &[u8]) -> bool {
        self.record.revoked.iter().any(|r| r.serial == serial)
    }

    /// Revokes the peer certificate `cert_der` of `node_id` (a no-op for an
    /// empty or unreadable certificate, or one revoked already). Returns
    /// whether anything changed; [`Self::write`] stores it. Serials of
    /// certificates past their end leave the list meanwhile, except this
    /// one: the role that replaces it carries the CRL with it, which is how
    /// its node learns that its etcd member was dropped (even when the
    /// certificate expired while the node was down).
    pub fn revoke(&mut self, node_id: &str, cert_der: &[u8]) -> bool {
        let Ok(cert) = metropolis_identity::parse_certificate(cert_der) else {
            return false;
        };
        if self.is_revoked(&cert.serial) {
            return false;
        }
        self.drop_expired(time::OffsetDateTime::now_utc());
        let not_after =
            (cert.not_after < metropolis_identity::NO_EXPIRY).then(|| prost_types::Timestamp {
                seconds: cert.not_after.unix_timestamp(),
                nanos: 0,
            });
        self.record.revoked.push(private::consensus_pki::Revoked {
            serial: cert.serial,
            node_id: node_id.to_string(),
            revoked_at: Some(prost_types::Timestamp::from(std::time::SystemTime::now())),
            not_after,
        });
        self.record.crl_number += 1;
        true
    }

    /// Forgets revoked serials whose certificates ended more than
    /// [`CLOCK_SKEW`](metropolis_identity::CLOCK_SKEW) before `now`: a peer
    /// refuses them without a CRL (a clock that far behind is out of
    /// bounds everywhere). Revocations recorded without an end stay.
    fn drop_expired(&mut self, now: time::OffsetDateTime) {
        let horizon = (now - metropolis_identity::CLOCK_SKEW).unix_timestamp();
        self.record
            .revoked
            .retain(|r| r.not_after.is_none_or(|t| t.seconds >= horizon));
    }

    /// The compare and writes that store this PKI (and its CRL) in a
    /// transaction: the compare fails if someone else changed it since it
    /// was read.
    pub fn write(&self) -> Result<(Compare, Vec<Op>), CuratorError> {
        Ok((
            Compare::mod_revision(KEY_PKI, self.mod_revision),
            vec![
                Op::put(KEY_PKI, self.record.encode_to_vec()),
                Op::put(KEY_CRL, self.crl()?),
            ],
        ))
    }
}

impl Cluster {
    /// The consensus PKI, if this cluster has one (every cluster bootstrapped
    /// since it exists; older embedded-store clusters get one when they move
    /// to etcd).
    pub async fn consensus_pki(&self) -> Result<Option<ConsensusPki>, CuratorError> {
        match self.store().get(KEY_PKI.as_bytes()).await? {
            Some(kv) => Ok(Some(ConsensusPki::decode(&kv.value, kv.mod_revision)?)),
            None => Ok(None),
        }
    }

    /// A new etcd peer certificate for consensus member `node_id`, at the
    /// request of `caller` (the node ID its node certificate names): same
    /// key and address as the one its ConsensusMember role holds, valid for
    /// the node certificate lifetime from now, written into the role in the
    /// same transaction (compared against the record it replaces), so that
    /// removing the role revokes this one. The certificate it replaces is
    /// not revoked: it ends by itself, and the member keeps using it until
    /// it has the new one on disk. PERMISSION_DENIED unless the caller is
    /// that node and holds an admitted role (with a peer certificate).
    pub async fn renew_peer_certificate(
        &self,
        caller: &str,
        node_id: &str,
    ) -> Result<Vec<u8>, CuratorError> {
        if caller != node_id {
            return Err(CuratorError::PermissionDenied(format!(
                "node {caller} asked for node {}'s etcd peer certificate; a node renews only its own",
                metropolis_api::quote(node_id)
            )));
        }
        let pki = self.consensus_pki().await?.ok_or_else(|| {
            CuratorError::FailedPrecondition(
                "this cluster has no consensus CA (it runs on the embedded store, or its etcd \
                 predates the consensus CA); there is no etcd peer certificate to renew"
                    .into(),
            )
        })?;
        let lifetime = self.lifetimes().await?.node;
        let not_a_member = || {
            CuratorError::PermissionDenied(format!(
                "node {caller} is not an admitted consensus member (no etcd peer certificate in \
                 its ConsensusMember role); only members renew one"
            ))
        };
        let renewed = self
            .update_node(node_id, |node| {
                let role = node
                    .roles
                    .as_mut()
                    .and_then(|r| r.consensus_member.as_mut())
                    .filter(|r| !r.peer_certificate.is_empty())
                    .ok_or_else(not_a_member)?;
                let current = metropolis_identity::parse_certificate(&role.peer_certificate)
                    .map_err(|e| {
                        CuratorError::Corrupt(format!(
                            "node {node_id}'s etcd peer certificate: {e}"
                        ))
                    })?;
                if current.public_key.as_slice() != node.public_key.as_slice() {
                    return Err(CuratorError::Corrupt(format!(
                        "node {node_id}'s etcd peer certificate is not for its key"
                    )));
                }
                let address = *current.ip_addresses.first().ok_or_else(|| {
                    CuratorError::Corrupt(format!(
                        "node {node_id}'s etcd peer certificate names no address"
                    ))
                })?;
                let der = pki.issue_peer_certificate(&current.public_key, address, lifetime)?;
                role.peer_certificate = der.clone();
                Ok(crate::state::Change::Write(der))
            })
            .await;
        match renewed {
            Err(CuratorError::NotFound(_)) => Err(not_a_member()),
            other => other,
        }
    }

    /// The consensus PKI, or a new one (not stored yet: its [`ConsensusPki::write`]
    /// compares that the key is absent).
    pub(crate) async fn consensus_pki_or_new(&self) -> Result<ConsensusPki, CuratorError> {
        match self.consensus_pki().await? {
            Some(pki) => Ok(pki),
            None => ConsensusPki::generate(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revocations_reach_the_crl_once() {
        let mut pki = ConsensusPki::generate().expect("pki");
        let key = metropolis_identity::generate_key();
        let peer = pki
            .issue_peer_certificate(
                key.verifying_key().as_bytes(),
                "127.0.0.3".parse().unwrap(),
                Duration::from_secs(3600),
            )
            .expect("peer");
        assert_eq!(
            metropolis_identity::parse_certificate(&peer)
                .expect("parse")
                .lifetime(),
            Duration::from_secs(3600)
        );
        let parsed = metropolis_identity::parse_certificate(&peer).expect("parse");
        assert_eq!(
            parsed.common_name,
            metropolis_identity::node_id(key.verifying_key().as_bytes())
        );
        // Issued by the consensus CA, not by anything else.
        metropolis_identity::verify_signed_by(
            &parsed,
            pki.ca_certificate(),
            time::OffsetDateTime::now_utc(),
        )
        .expect("consensus CA");

        let empty = metropolis_identity::parse_crl(&pki.crl().expect("crl"), pki.ca_certificate())
            .expect("parse crl");
        assert!(empty.is_empty());
        assert!(pki.revoke("n", &peer));
        assert!(!pki.revoke("n", &peer), "revoked once");
        assert!(!pki.revoke("n", b"not a certificate"));
        assert!(pki.is_revoked(&parsed.serial));
        let crl = metropolis_identity::parse_crl(&pki.crl().expect("crl"), pki.ca_certificate())
            .expect("parse crl");
        assert_eq!(crl, vec![parsed.serial]);

        let (_, ops) = pki.write().expect("write");
        let Op::Put { value, .. } = &ops[0] else {
            panic!("{ops:?}")
        };
        let back = ConsensusPki::decode(value, 5).expect("decode");
        assert_eq!(back.ca_certificate(), pki.ca_certificate());
        assert_eq!(back.record.crl_number, 2);
    }

    #[test]
    fn expired_revocations_leave_the_crl() {
        let mut pki = ConsensusPki::generate().expect("pki");
        let key = *metropolis_identity::generate_key()
            .verifying_key()
            .as_bytes();
        let address = "127.0.0.3".parse().unwrap();
        let now = time::OffsetDateTime::now_utc();
        let ended = pki
            .ca
            .issue_peer_certificate_with_validity(
                &key,
                address,
                now - time::Duration::hours(2),
                now - time::Duration::hours(1),
            )
            .expect("ended");
        let current = pki
            .issue_peer_certificate(&key, address, Duration::from_secs(3600))
            .expect("current");
        let serial = |der: &[u8]| {
            metropolis_identity::parse_certificate(der)
                .expect("p")
                .serial
        };
        // The one being revoked stays, even when it ended already.
        assert!(pki.revoke("a", &ended));
        assert!(pki.is_revoked(&serial(&ended)));
        // The next revocation drops it, and keeps the one still valid.
        assert!(pki.revoke("b", &current));
        assert!(!pki.is_revoked(&serial(&ended)));
        assert!(pki.is_revoked(&serial(&current)));
        let crl = metropolis_identity::parse_crl(&pki.crl().expect("crl"), pki.ca_certificate())
            .expect("parse crl");
        assert_eq!(crl, vec![serial(&current)]);
    }

    /// The node's ConsensusMember role, as the store holds it.
    async fn role_of(c: &Cluster, id: &str) -> metropolis_api::common::node_roles::ConsensusMember {
        c.node(id)
            .await
            .expect("read")
            .expect("node")
            .node
            .roles
            .and_then(|r| r.consensus_member)
            .unwrap_or_default()
    }

    #[tokio::test]
    async fn a_member_renews_its_own_peer_certificate_into_its_role() {
        use crate::state::{Change, PATH_NODE_CERTIFICATE_LIFETIME};
        let t = crate::state::test_support::bootstrapped().await;
        let c = &t.cluster;
        let id = t.first_id.as_str();
        // No role with a peer certificate (the embedded store's member):
        // nothing to renew.
        let pki = c.consensus_pki().await.expect("read").expect("pki");
        if role_of(c, id).await.peer_certificate.is_empty() {
            let err = c.renew_peer_certificate(id, id).await.unwrap_err();
            assert!(
                matches!(&err, CuratorError::PermissionDenied(m) if m.contains("not an admitted")),
                "{err}"
            );
        }
        // Admitted with a certificate that lives a day.
        let entry = c.node(id).await.expect("read").expect("node");
        let key: [u8; 32] = entry.node.public_key.as_slice().try_into().expect("key");
        let address: IpAddr = "127.0.0.2".parse().unwrap();
        let old = pki
            .issue_peer_certificate(&key, address, Duration::from_secs(86_400))
            .expect("old");
        c.update_node(id, |node| {
            node.roles
                .get_or_insert_with(Default::default)
                .consensus_member
                .get_or_insert_with(Default::default)
                .peer_certificate = old.clone();
            Ok(Change::Write(()))
        })
        .await
        .expect("admit");
        // The configured node lifetime is what it gets.
        let lifetime = Duration::from_secs(120);
        c.configure(
            None,
            metropolis_api::common::ClusterConfiguration {
                node_certificate_lifetime: Some(lifetime.try_into().expect("proto")),
                ..Default::default()
            },
            &[PATH_NODE_CERTIFICATE_LIFETIME.to_string()],
        )
        .await
        .expect("configure");

        // Someone else, for this node: refused, and nothing changes.
        let other = metropolis_identity::node_id(&[9; 32]);
        let err = c.renew_peer_certificate(&other, id).await.unwrap_err();
        assert!(matches!(err, CuratorError::PermissionDenied(_)), "{err}");
        // Another node, not a member: refused.
        let err = c.renew_peer_certificate(&other, &other).await.unwrap_err();
        assert!(matches!(err, CuratorError::PermissionDenied(_)), "{err}");
        assert_eq!(role_of(c, id).await.peer_certificate, old);

        let der = c.renew_peer_certificate(id, id).await.expect("renew");
        let new = metropolis_identity::parse_certificate(&der).expect("parse");
        let old_cert = metropolis_identity::parse_certificate(&old).expect("parse");
        assert_eq!(new.lifetime(), lifetime);
        assert_ne!(new.serial, old_cert.serial);
        assert_eq!(new.public_key, key);
        assert_eq!(new.ip_addresses, vec![address]);
        assert!(new.is_node_certificate());
        metropolis_identity::verify_signed_by(
            &new,
            pki.ca_certificate(),
            time::OffsetDateTime::now_utc(),
        )
        .expect("consensus CA");
        // In the role; the old one is not revoked (it ends by itself).
        assert_eq!(role_of(c, id).await.peer_certificate, der);
        let pki = c.consensus_pki().await.expect("read").expect("pki");
        assert!(!pki.is_revoked(&old_cert.serial));

        // What a removal revokes is the certificate the role holds now.
        let entry = c.node(id).await.expect("read").expect("node");
        let txn = c
            .revoke_peer_certificate(metropolis_store::Txn::new(), &entry)
            .await
            .expect("revocation");
        assert!(c.commit(txn).await.expect("commit").succeeded);
        let pki = c.consensus_pki().await.expect("read").expect("pki");
        assert!(pki.is_revoked(&new.serial));
        assert!(!pki.is_revoked(&old_cert.serial));
    }
}

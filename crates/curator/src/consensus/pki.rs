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
//! Peer certificates do not expire yet ([`NO_EXPIRY`], like node
//! certificates); when certificates get lifetimes and renewal, peer
//! certificates get them here, and the CRL can drop what has expired.
//!
//! [`NO_EXPIRY`]: metropolis_identity::NO_EXPIRY

use std::net::IpAddr;

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

    /// An etcd peer certificate for the node with `public_key`, serving at
    /// `address`.
    pub fn issue_peer_certificate(
        &self,
        public_key: &[u8; 32],
        address: IpAddr,
    ) -> Result<Vec<u8>, CuratorError> {
        self.ca
            .issue_peer_certificate(public_key, address)
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
    /// whether anything changed; [`Self::write`] stores it.
    pub fn revoke(&mut self, node_id: &str, cert_der: &[u8]) -> bool {
        let Ok(cert) = metropolis_identity::parse_certificate(cert_der) else {
            return false;
        };
        if self.is_revoked(&cert.serial) {
            return false;
        }
        self.record.revoked.push(private::consensus_pki::Revoked {
            serial: cert.serial,
            node_id: node_id.to_string(),
            revoked_at: Some(prost_types::Timestamp::from(std::time::SystemTime::now())),
        });
        self.record.crl_number += 1;
        true
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
            .issue_peer_certificate(key.verifying_key().as_bytes(), "127.0.0.3".parse().unwrap())
            .expect("peer");
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
}

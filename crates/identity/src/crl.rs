//! Certificate revocation lists.
//!
//! The consensus CA revokes the etcd peer certificate of every node that stops being a
//! consensus member; etcd reads the list on every new peer connection
//! (`--peer-crl-file`), so a former member is refused as soon as the list reaches the
//! remaining members. etcd compares serial numbers only, so a CRL here is a signed list of
//! serials; [`parse_crl`] checks the signature for readers that take a CRL from elsewhere.

use rcgen::{
    CertificateRevocationListParams, KeyIdMethod, RevocationReason, RevokedCertParams, SerialNumber,
};
use time::OffsetDateTime;
use x509_parser::prelude::FromDer;
use x509_parser::revocation_list::CertificateRevocationList;

use crate::ca::{CertificateAuthority, NO_EXPIRY};
use crate::cert::{check_ed25519_signature, parse_x509};
use crate::{IdentityError, VerifyError, parse_certificate};

/// One revoked certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revoked {
    /// The certificate's serial number as encoded ([`crate::Certificate::serial`]).
    pub serial: Vec<u8>,
    /// When it was revoked.
    pub revoked_at: OffsetDateTime,
}

impl CertificateAuthority {
    /// A CRL listing `revoked`, numbered `number` (RFC 5280's CRL number: later lists carry
    /// larger numbers). Valid from now; the next update is [`NO_EXPIRY`], like the
    /// certificates: a list is replaced when something is revoked, not on a schedule.
    pub fn issue_crl(&self, revoked: &[Revoked], number: u64) -> Result<Vec<u8>, IdentityError> {
        let params = CertificateRevocationListParams {
            this_update: OffsetDateTime::now_utc(),
            next_update: NO_EXPIRY,
            crl_number: SerialNumber::from_slice(&number.to_be_bytes()),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|r| RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&r.serial),
                    revocation_time: r.revoked_at,
                    reason_code: Some(RevocationReason::CessationOfOperation),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        Ok(params.signed_by(&self.issuer()?)?.der().to_vec())
    }
}

/// Parses a CRL and checks that the CA certificate `ca_der` signed it; returns the revoked
/// serial numbers.
pub fn parse_crl(der: &[u8], ca_der: &[u8]) -> Result<Vec<Vec<u8>>, VerifyError> {
    let ca = parse_certificate(ca_der).map_err(|e| VerifyError::InvalidCa(e.to_string()))?;
    let ca_x509 = parse_x509(ca_der).map_err(|e| VerifyError::InvalidCa(e.to_string()))?;
    let (rest, crl) = CertificateRevocationList::from_der(der)
        .map_err(|e| VerifyError::Malformed(format!("CRL: {e}")))?;
    if !rest.is_empty() {
        return Err(VerifyError::Malformed(format!(
            "CRL: {} trailing bytes",
            rest.len()
        )));
    }
    if crl.issuer().as_raw() != ca_x509.subject().as_raw() {
        return Err(VerifyError::IssuerMismatch {
            issuer: crl.issuer().to_string(),
            ca_subject: ca_x509.subject().to_string(),
        });
    }
    check_ed25519_signature(
        &crl.signature_algorithm,
        &crl.signature_value.data,
        crl.tbs_cert_list.as_ref(),
        &ca.public_key,
    )?;
    Ok(crl
        .iter_revoked_certificates()
        .map(|r| r.raw_serial().to_vec())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate_key;

    #[test]
    fn revoked_serials_round_trip_and_the_signature_is_checked() {
        let ca = CertificateAuthority::generate_named("Metropolis Consensus CA").unwrap();
        let key = generate_key();
        let peer = ca
            .issue_peer_certificate(
                key.verifying_key().as_bytes(),
                "127.0.0.2".parse().unwrap(),
                std::time::Duration::from_secs(3600),
            )
            .unwrap();
        let serial = parse_certificate(&peer).unwrap().serial;
        assert_eq!(serial.len(), 16, "{serial:?}");

        let empty = ca.issue_crl(&[], 1).unwrap();
        assert!(parse_crl(&empty, ca.cert_der()).unwrap().is_empty());

        let revoked = Revoked {
            serial: serial.clone(),
            revoked_at: OffsetDateTime::now_utc(),
        };
        let crl = ca.issue_crl(std::slice::from_ref(&revoked), 2).unwrap();
        assert_eq!(parse_crl(&crl, ca.cert_der()).unwrap(), vec![serial]);

        // Another CA's list is not this CA's.
        let other = CertificateAuthority::generate().unwrap();
        let err = parse_crl(&crl, other.cert_der()).unwrap_err();
        assert!(matches!(err, VerifyError::IssuerMismatch { .. }), "{err}");
        let forged = CertificateAuthority::generate_named("Metropolis Consensus CA").unwrap();
        let err = parse_crl(&forged.issue_crl(&[revoked], 3).unwrap(), ca.cert_der()).unwrap_err();
        assert!(matches!(err, VerifyError::BadSignature(_)), "{err}");
        // Nor is a certificate a CRL.
        assert!(parse_crl(&peer, ca.cert_der()).is_err());
    }
}

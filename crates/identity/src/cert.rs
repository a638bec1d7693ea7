//! Parsing and verification of certificates.
//!
//! Verification is deliberately narrow: one Ed25519 CA signs leaf certificates directly, so a
//! "chain" is a single signature, an issuer name and a validity window. The TLS layer uses
//! webpki for server chains; this module serves the RPC layer, which checks client
//! certificates per call (owner, nodes, and the self-signed initial owner credentials).

use ed25519_dalek::{Signature, VerifyingKey};
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::oid_registry::OID_SIG_ED25519;
use x509_parser::prelude::FromDer;

use crate::{CLOCK_SKEW, IdentityError, NO_EXPIRY, VerifyError, node_id};

/// The parts of a certificate the control plane cares about.
///
/// Only [`parse_certificate`] creates it, so the fields always describe `der`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Certificate {
    /// The certificate as it was parsed.
    pub der: Vec<u8>,
    /// The first subject common name, or empty if there is none (upstream's self-signed
    /// initial owner credentials have an empty subject).
    pub common_name: String,
    /// The raw Ed25519 public key.
    pub public_key: [u8; 32],
    /// Basic constraints say CA.
    pub is_ca: bool,
    /// Extended key usage includes serverAuth.
    pub server_auth: bool,
    /// Extended key usage includes clientAuth.
    pub client_auth: bool,
    /// DNS names of the subject alternative names.
    pub dns_names: Vec<String>,
    /// IP addresses of the subject alternative names (etcd peer certificates carry the
    /// member's address).
    pub ip_addresses: Vec<std::net::IpAddr>,
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
    /// The serial number as encoded (big-endian, without the DER header): what a CRL lists.
    pub serial: Vec<u8>,
}

impl Certificate {
    /// The ID of the node owning this certificate's key (whether or not it is a node).
    pub fn node_id(&self) -> String {
        node_id(&self.public_key)
    }

    /// Whether this has the shape of a node certificate: CN and a DNS SAN equal to the node ID
    /// of its key, server and client auth, not a CA. Says nothing about who issued it.
    pub fn is_node_certificate(&self) -> bool {
        self.node_certificate_problem().is_none()
    }

    /// Why this is not a node certificate, or `None` if it is one.
    pub(crate) fn node_certificate_problem(&self) -> Option<String> {
        let id = self.node_id();
        if self.is_ca {
            Some("it is a CA certificate".into())
        } else if self.common_name != id {
            Some(format!(
                "common name {:?} is not the node ID {id} of its key",
                self.common_name
            ))
        } else if !self.dns_names.contains(&id) {
            Some(format!("no DNS name {id} in its subject alternative names"))
        } else if !(self.server_auth && self.client_auth) {
            Some("extended key usage lacks server or client auth".into())
        } else {
            None
        }
    }

    /// Whether the certificate is valid at `now`: not expired, and started, allowing
    /// [`CLOCK_SKEW`] for a clock running behind the issuer's. Says nothing about who issued it.
    pub fn validity_at(&self, now: OffsetDateTime) -> Result<(), VerifyError> {
        if now + CLOCK_SKEW < self.not_before {
            return Err(VerifyError::NotYetValid {
                not_before: self.not_before,
                now,
            });
        }
        if now > self.not_after {
            return Err(VerifyError::Expired {
                not_after: self.not_after,
                now,
            });
        }
        Ok(())
    }

    /// How long the certificate was issued for: its validity without the [`CLOCK_SKEW`] it
    /// starts early by.
    pub fn lifetime(&self) -> std::time::Duration {
        std::time::Duration::try_from(self.not_after - self.not_before - CLOCK_SKEW)
            .unwrap_or_default()
    }

    /// When its holder should get a new one: once a third of its [`Self::lifetime`] is left.
    /// A certificate without an end ([`NO_EXPIRY`], issued before certificates had lifetimes)
    /// is due at once, so that it is replaced by a bounded one.
    pub fn renew_at(&self) -> OffsetDateTime {
        if self.not_after >= NO_EXPIRY {
            return self.not_before;
        }
        let third = self.lifetime() / 3;
        self.not_after - time::Duration::try_from(third).unwrap_or(time::Duration::ZERO)
    }

    /// Whether the certificate is due for renewal at `now` ([`Self::renew_at`]).
    pub fn renewal_due(&self, now: OffsetDateTime) -> bool {
        now >= self.renew_at()
    }

    /// Whether this has the shape of a user certificate (owner and other named identities):
    /// client auth, not a CA, not a node certificate. The identity is [`Self::common_name`].
    pub fn is_user_certificate(&self) -> bool {
        !self.is_ca && self.client_auth && !self.is_node_certificate()
    }
}

pub(crate) fn parse_x509(der: &[u8]) -> Result<X509Certificate<'_>, IdentityError> {
    let (rest, x509) = X509Certificate::from_der(der)
        .map_err(|e| IdentityError::MalformedCertificate(e.to_string()))?;
    if !rest.is_empty() {
        return Err(IdentityError::MalformedCertificate(format!(
            "{} trailing bytes after the certificate",
            rest.len()
        )));
    }
    Ok(x509)
}

fn malformed(e: impl std::fmt::Display) -> IdentityError {
    IdentityError::MalformedCertificate(e.to_string())
}

/// Parses a DER certificate, rejecting anything whose key is not Ed25519.
pub fn parse_certificate(der: &[u8]) -> Result<Certificate, IdentityError> {
    let x509 = parse_x509(der)?;

    let spki = x509.public_key();
    if spki.algorithm.algorithm != OID_SIG_ED25519 {
        return Err(IdentityError::NotEd25519(
            spki.algorithm.algorithm.to_id_string(),
        ));
    }
    let public_key: [u8; 32] = spki
        .subject_public_key
        .data
        .as_ref()
        .try_into()
        .map_err(|_| {
            malformed(format!(
                "Ed25519 public key is {} bytes, not 32",
                spki.subject_public_key.data.len()
            ))
        })?;

    let common_name = match x509.subject().iter_common_name().next() {
        Some(cn) => cn
            .as_str()
            .map_err(|e| malformed(format!("common name: {e}")))?
            .to_string(),
        None => String::new(),
    };

    let is_ca = x509
        .basic_constraints()
        .map_err(|e| malformed(format!("basic constraints: {e}")))?
        .is_some_and(|bc| bc.value.ca);
    let (server_auth, client_auth) = match x509
        .extended_key_usage()
        .map_err(|e| malformed(format!("extended key usage: {e}")))?
    {
        Some(eku) => (eku.value.server_auth, eku.value.client_auth),
        None => (false, false),
    };
    let names = match x509
        .subject_alternative_name()
        .map_err(|e| malformed(format!("subject alternative name: {e}")))?
    {
        Some(san) => san.value.general_names.clone(),
        None => Vec::new(),
    };
    let dns_names = names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(name) => Some(name.to_string()),
            _ => None,
        })
        .collect();
    let ip_addresses = names
        .iter()
        .filter_map(|n| match n {
            GeneralName::IPAddress(b) => match b.len() {
                4 => <[u8; 4]>::try_from(*b).ok().map(std::net::IpAddr::from),
                16 => <[u8; 16]>::try_from(*b).ok().map(std::net::IpAddr::from),
                _ => None,
            },
            _ => None,
        })
        .collect();

    Ok(Certificate {
        der: der.to_vec(),
        common_name,
        public_key,
        is_ca,
        server_auth,
        client_auth,
        dns_names,
        ip_addresses,
        not_before: x509.validity().not_before.to_datetime(),
        not_after: x509.validity().not_after.to_datetime(),
        serial: x509.tbs_certificate.raw_serial().to_vec(),
    })
}

/// Checks that `x509` carries a valid Ed25519 signature by `signer`.
fn check_signature(x509: &X509Certificate<'_>, signer: &[u8; 32]) -> Result<(), VerifyError> {
    check_ed25519_signature(
        &x509.signature_algorithm,
        &x509.signature_value.data,
        x509.tbs_certificate.as_ref(),
        signer,
    )
}

/// Checks an Ed25519 signature over `signed` (a certificate's or a CRL's TBS part).
pub(crate) fn check_ed25519_signature(
    alg: &x509_parser::x509::AlgorithmIdentifier<'_>,
    signature: &[u8],
    signed: &[u8],
    signer: &[u8; 32],
) -> Result<(), VerifyError> {
    if alg.algorithm != OID_SIG_ED25519 {
        return Err(VerifyError::UnsupportedSignatureAlgorithm(
            alg.algorithm.to_id_string(),
        ));
    }
    // RFC 8410: the parameters MUST be absent.
    if alg.parameters.is_some() {
        return Err(VerifyError::BadSignature(
            "Ed25519 algorithm identifier has parameters",
        ));
    }
    let key = VerifyingKey::from_bytes(signer)
        .map_err(|_| VerifyError::BadSignature("signer key is not a valid Ed25519 point"))?;
    let signature = Signature::from_slice(signature)
        .map_err(|_| VerifyError::BadSignature("signature is not 64 bytes"))?;
    key.verify_strict(signed, &signature)
        .map_err(|_| VerifyError::BadSignature("signature does not verify"))
}

/// Verifies that `cert` was issued by the CA certificate `ca_der` and is valid at `now`.
///
/// Checks that the CA is an Ed25519 CA certificate, that the issuer name of `cert` is the CA's
/// subject, the Ed25519 signature, and then the validity window (so expiry is only reported
/// for certificates that are genuine). The CA's own validity is not checked: it is a pinned
/// trust anchor, as in webpki. Usage (node or user) is up to the caller, see
/// [`Certificate::is_node_certificate`].
pub fn verify_signed_by(
    cert: &Certificate,
    ca_der: &[u8],
    now: OffsetDateTime,
) -> Result<(), VerifyError> {
    let ca = parse_certificate(ca_der).map_err(|e| VerifyError::InvalidCa(e.to_string()))?;
    if !ca.is_ca {
        return Err(VerifyError::InvalidCa(IdentityError::NotCa.to_string()));
    }
    let ca_x509 = parse_x509(ca_der).map_err(|e| VerifyError::InvalidCa(e.to_string()))?;
    let x509 = parse_x509(&cert.der).map_err(|e| VerifyError::Malformed(e.to_string()))?;
    if x509.issuer().as_raw() != ca_x509.subject().as_raw() {
        return Err(VerifyError::IssuerMismatch {
            issuer: x509.issuer().to_string(),
            ca_subject: ca_x509.subject().to_string(),
        });
    }
    check_signature(&x509, &ca.public_key)?;
    cert.validity_at(now)
}

/// Verifies that `cert` is self-signed: its issuer is its subject and its own key signed it.
///
/// Used for the initial owner credentials, whose worth is the key alone (the TLS handshake
/// proves possession, the key is compared with the owner key). Validity times are therefore
/// not checked: a client clock running behind must not lock the owner out.
pub fn verify_self_signed(cert: &Certificate) -> Result<(), VerifyError> {
    let x509 = parse_x509(&cert.der).map_err(|e| VerifyError::Malformed(e.to_string()))?;
    if x509.issuer().as_raw() != x509.subject().as_raw() {
        return Err(VerifyError::NotSelfSigned(format!(
            "issuer {:?} differs from subject {:?}",
            x509.issuer().to_string(),
            x509.subject().to_string()
        )));
    }
    check_signature(&x509, &cert.public_key).map_err(|e| match e {
        VerifyError::BadSignature(_) => {
            VerifyError::NotSelfSigned("not signed by its own key".into())
        }
        e => e,
    })
}
